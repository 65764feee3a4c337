"""Node-local IPAM: the node hands out pod addresses from its own blocks, with no API round-trip.

Two files under <state dir>/ipam/, read and replaced only through store.statedir.StateDir (no
symlink followed, owner and mode checked, atomic replace with fsync), and validated on every read:

  node.json         what the node may allocate from: the IPPools (whether each selects this node,
                    whether it is disabled) and the node's blocks. Written by every reconcile run
                    (`write_node_ipam`), and by the plugin itself when it claims a block or has to
                    read the desired state because no run has happened yet.
  allocations.json  one record per attachment (network, container id, ifname): the pod, its
                    host interface and its addresses.

Writers hold the exclusive lock `ipam/lock` for the read-modify-write; readers do not need it.
Addresses are chosen next-fit (the first free address after the last one handed out), so an
address just released is the last to be reused: other nodes' rules may still name it as the old
pod's until their next run.

Losing these files must never hand a running pod's address out again. So a write (`transact`)
takes two facts from the kernel through hooks its caller gives (this layer does not probe):
`held()`, the addresses routed to live weft interfaces (never allocated, whatever the records
say), and `recover()`, records rebuilt from the live interfaces when allocations.json is missing
or corrupt. A corrupt file (unparsable, or parsable but not what weft writes: `{"format":1}`
without "allocations", a record missing a field) is kept aside as
`allocations.json.corrupt-<time>`, never read as "no allocations".

The kernel shows an interface's attachment (its alias) and addresses, not its pod: a rebuilt
record whose pod nothing names (not the snapshot, not the desired state) is kept apart, under
"unnamed" (namespace and pod ""): the plugin's own commands use it (DEL releases it, CHECK finds
it, an ADD of the attachment names it again), but `read_allocations`, which the reconcile run
renders pods from, does not return it.

Stdlib only: this is on the plugin's ADD path.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from weft.model.errors import WeftError
from weft.store.statedir import CorruptState, StateDir

IPAM_DIR = "ipam"
NODE_FILE = "node.json"
ALLOCATIONS_FILE = "allocations.json"
LOCK_FILE = "lock"
FORMAT = 1
POD_LOCK_STRIPES = 64
LOCK_TIMEOUT = 60.0                 # seconds to wait for the IPAM lock or a pod's lock
MAX_RECORDS = 65536                 # far more attachments than a node has addresses for
MAX_FILE = 32 << 20
_NAME_MAX = 253                     # a DNS subdomain: the longest pod name, namespace, network
_ID_MAX = 255                       # a container id: the interface alias "weft:<id>:<ifname>" is <= 255

# A namedtuple, not a dataclass: `dataclasses` costs more to import than the plugin's whole IPAM.
Allocation = namedtuple("Allocation", "namespace pod iface ips container_id ifname network active created")
Allocation.__doc__ = """One attachment's addresses. `active` is False once a newer attachment of the same
pod (a new sandbox) took over the host interface: the address stays held until this one's DEL."""


class IpamError(WeftError):
    """An IPAM failure a user can act on; the message says what and where."""


class Unavailable(IpamError):
    """The node's IPAM state is missing or cannot be read."""


class Exhausted(IpamError):
    """No free address in the node's blocks (and no block can be claimed)."""


class SecondInterface(IpamError):
    """The sandbox already has a weft interface: weft wires one per pod (the host side is named after the pod)."""


class ClaimUnavailable(IpamError):
    """A block could not be claimed because the API server could not be used: try again later."""


class ClaimForbidden(IpamError):
    """The API server refused the node a permission a claim needs (HTTP 403): trying again will
    not help until an administrator grants it."""


class CorruptRecords(CorruptState, Unavailable):
    """allocations.json is there but is not what weft writes."""


def state_dir_of(state_dir) -> StateDir:
    """`state_dir` as a checked StateDir (a path is checked now: owner, mode, no link)."""
    return state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)


def ipam_dir(state_dir) -> str:
    return state_dir_of(state_dir).subdir(IPAM_DIR)


def _name(file: str) -> str:
    return f"{IPAM_DIR}/{file}"


@contextmanager
def ipam_lock(state_dir) -> Iterator[None]:
    """The exclusive lock of the IPAM files' read-modify-write."""
    sd = state_dir_of(state_dir)
    sd.subdir(IPAM_DIR)
    with sd.lock(shared=False, timeout=LOCK_TIMEOUT, name=_name(LOCK_FILE)):
        yield


@contextmanager
def pod_lock(state_dir, iface: str) -> Iterator[None]:
    """Serialises ADD and DEL of one pod's interface (an old and a new sandbox of the same pod).

    Striped over POD_LOCK_STRIPES files, so lock files do not pile up one per pod ever seen.
    """
    sd = state_dir_of(state_dir)
    sd.subdir(IPAM_DIR)
    sd.subdir(_name("locks"))
    stripe = sum(iface.encode()) % POD_LOCK_STRIPES
    with sd.lock(shared=False, timeout=LOCK_TIMEOUT, name=_name(f"locks/{stripe:02d}")):
        yield


def _write_json(sd: StateDir, name: str, data: dict) -> None:
    sd.replace(name, json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")   # the C encoder


# ---- validation: every file here is hostile until checked ----------------------------------

class _Bad(Exception):
    """A field that is not what weft writes (caught and reported with the file's name)."""


def _str(value, what: str, limit: int = _NAME_MAX, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (not value and not empty):
        raise _Bad(f"{what} must be a string of 1-{limit} characters")
    return value


def _bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{what} must be true or false")
    return value


def _ip(value, what: str) -> str:
    try:
        if isinstance(value, str) and str(ipaddress.ip_address(value)) == value:
            return value
    except ValueError:
        pass
    raise _Bad(f"{what} must be an IP address in canonical form, not {str(value)[:60]!r}")


def _cidr(value, what: str) -> str:
    try:
        if isinstance(value, str) and str(ipaddress.ip_network(value)) == value:
            return value
    except ValueError:
        pass
    raise _Bad(f"{what} must be a network in canonical form, not {str(value)[:60]!r}")


def _iface(value, what: str) -> str:
    _str(value, what, 15)
    if any(c in "/:" or c.isspace() for c in value) or value in (".", ".."):
        raise _Bad(f"{what} must be an interface name")
    return value


def _check_record(rec, at: str, named: bool = True) -> dict:
    if not isinstance(rec, dict):
        raise _Bad(f"{at} must be an object")
    for key in ("namespace", "pod"):
        if named:
            _str(rec.get(key), f"{at}.{key}")
        elif rec.get(key) != "":
            raise _Bad(f"{at}.{key} must be \"\" (a record whose pod is not known)")
    for key in ("network", "ifname"):
        _str(rec.get(key), f"{at}.{key}")
    _str(rec.get("container_id"), f"{at}.container_id", _ID_MAX)
    _iface(rec.get("iface"), f"{at}.iface")
    ips = rec.get("ips")
    if not isinstance(ips, list) or not 1 <= len(ips) <= 2:
        raise _Bad(f"{at}.ips must be a list of one or two addresses")
    for i, ip in enumerate(ips):
        _ip(ip, f"{at}.ips[{i}]")
    _bool(rec.get("active", True), f"{at}.active")
    created = rec.get("created", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise _Bad(f"{at}.created must be a number")
    return rec


def check_allocations(data) -> dict:
    """allocations.json's content if it is what weft writes; _Bad naming the first wrong field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _Bad(f"not a weft IPAM file of format {FORMAT}")
    records, unnamed, cursor = data.get("allocations"), data.get("unnamed", []), data.get("cursor", {})
    if not isinstance(records, list) or not isinstance(unnamed, list):
        raise _Bad("\"allocations\" (and \"unnamed\") must be lists")
    if len(records) + len(unnamed) > MAX_RECORDS:
        raise _Bad(f"{len(records) + len(unnamed)} records, more than the {MAX_RECORDS} weft allows")
    for i, rec in enumerate(records):
        _check_record(rec, f"allocations[{i}]")
    for i, rec in enumerate(unnamed):
        _check_record(rec, f"unnamed[{i}]", named=False)
    data["unnamed"] = unnamed
    if not isinstance(cursor, dict) or not set(cursor) <= {"4", "6"}:
        raise _Bad("\"cursor\" must be an object with keys \"4\" and \"6\"")
    for family, ip in cursor.items():
        _ip(ip, f"cursor.{family}")
    data.setdefault("cursor", cursor)
    return data


def check_node_document(doc) -> dict:
    """node.json's content if it is what weft writes; _Bad naming the first wrong field."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _Bad(f"not a weft IPAM file of format {FORMAT}")
    _str(doc.get("node"), "node")
    source = doc.get("source")
    if not isinstance(source, dict) or not (set(source) == {"manifests"} or set(source) <= {"kubeconfig", "context"}):
        raise _Bad("\"source\" must name \"manifests\", or \"kubeconfig\" and \"context\"")
    for key, value in source.items():
        if value is not None:
            _str(value, f"source.{key}", 4096)
    pools, blocks = doc.get("pools"), doc.get("blocks")
    if not isinstance(pools, list) or not isinstance(blocks, list) or len(pools) + len(blocks) > MAX_RECORDS:
        raise _Bad("\"pools\" and \"blocks\" must be lists")
    for i, pool in enumerate(pools):
        at = f"pools[{i}]"
        if not isinstance(pool, dict):
            raise _Bad(f"{at} must be an object")
        _str(pool.get("name"), f"{at}.name")
        _cidr(pool.get("cidr"), f"{at}.cidr")
        size = pool.get("block_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 128:
            raise _Bad(f"{at}.block_size must be a prefix length")
        _str(pool.get("node_selector"), f"{at}.node_selector", 4096)
        for key in ("disabled", "selects_node", "nat_outgoing", "disable_bgp_export"):
            _bool(pool.get(key), f"{at}.{key}")
    for i, block in enumerate(blocks):
        at = f"blocks[{i}]"
        if not isinstance(block, dict):
            raise _Bad(f"{at} must be an object")
        _cidr(block.get("cidr"), f"{at}.cidr")
        if block.get("pool") is not None:
            _str(block["pool"], f"{at}.pool")
        _str(block.get("origin"), f"{at}.origin", 4096)
        _bool(block.get("claimed", False), f"{at}.claimed")
    return doc


def _read_checked(sd: StateDir, file: str, check, error) -> dict | None:
    """The file parsed and checked; None when it does not exist; `error` when it is corrupt."""
    try:
        data = sd.read_json(_name(file), MAX_FILE)
    except CorruptState as exc:
        raise error(str(exc)) from None
    if data is None:
        return None
    try:
        return check(data)
    except _Bad as exc:
        raise error(f"{sd.file(_name(file))} is not what weft writes: {exc}") from None


# ---- node.json: what this node allocates from --------------------------------------------

class CorruptNodeFile(CorruptState, Unavailable):
    """node.json is there but is not what weft writes."""


def source_of(from_dir=None, kubeconfig=None, context=None) -> dict:
    """The desired-state source as node.json and the CNI configuration name it."""
    if from_dir:
        return {"manifests": os.path.abspath(os.fspath(from_dir))}
    return {"kubeconfig": os.fspath(kubeconfig) if kubeconfig else None, "context": context}


def node_ipam_document(node: str, pools, blocks, source: dict, node_labels=None) -> dict:
    """The content of node.json for `node`, from model IPPools and Blocks (pure).

    Each pool says whether it selects this node (its nodeSelector against `node_labels`); each of
    the node's blocks names its pool. Blocks given twice (an IPAMBlock and its BlockAffinity) are
    listed once.
    """
    labels = dict(node_labels or {})
    pool_docs, nets = [], []
    for pool in sorted(pools, key=lambda p: p.name):
        selector = pool.node_selector
        pool_docs.append({
            "name": pool.name, "cidr": pool.cidr, "block_size": pool.block_size, "disabled": pool.disabled,
            "node_selector": selector.canonical() if selector is not None else "all()",
            "selects_node": selector is None or selector.matches(labels),
            "nat_outgoing": pool.nat_outgoing, "disable_bgp_export": pool.disable_bgp_export,
        })
        nets.append((ipaddress.ip_network(pool.cidr), pool.name))
    block_docs = {}
    for block in blocks:
        if block.node != node or block.cidr in block_docs:
            continue
        net = ipaddress.ip_network(block.cidr)
        pool = next((name for pool_net, name in nets
                     if pool_net.version == net.version and net.subnet_of(pool_net)),  # type: ignore[arg-type]
                    None)
        block_docs[block.cidr] = {"cidr": block.cidr, "pool": pool, "origin": block.origin}
    ordered = sorted(block_docs.values(), key=lambda b: (":" in b["cidr"], ipaddress.ip_network(b["cidr"])))
    return {"format": FORMAT, "node": node, "source": source, "pools": pool_docs, "blocks": ordered}


def write_node_ipam(state_dir, node: str, pools, blocks, source: dict, node_labels=None) -> bool:
    """Record what `node` allocates from, for the CNI plugin (called by every reconcile run).

    `pools`/`blocks`: the desired state's IPPools and Blocks (all of them; the node's are picked
    here); `source`: `source_of(...)` of the run; `node_labels`: the node's labels, for the pools'
    nodeSelectors. Blocks the plugin claimed since are kept (the run's read may predate the claim).
    A corrupt node.json is replaced. Returns whether the file changed.
    """
    sd = state_dir_of(state_dir)
    doc = node_ipam_document(node, pools, blocks, source, node_labels)
    with ipam_lock(sd):
        try:
            old = _read_checked(sd, NODE_FILE, check_node_document, CorruptNodeFile)
        except CorruptNodeFile:
            old = None
        if old and old.get("node") == node:
            known = {b["cidr"] for b in doc["blocks"]}
            claimed = [b for b in old.get("blocks", ()) if b.get("claimed") and b["cidr"] not in known]
            if claimed:
                doc["blocks"] = doc["blocks"] + claimed
        if old is not None and {k: v for k, v in old.items() if k != "written"} == doc:
            return False
        _write_json(sd, _name(NODE_FILE), doc | {"written": time.time()})
    return True


def read_node_ipam(state_dir) -> dict | None:
    """node.json as written by `write_node_ipam`; None when no run has written it yet.
    CorruptNodeFile when it is not what weft writes, UnsafeState when weft must not trust it."""
    return _read_checked(state_dir_of(state_dir), NODE_FILE, check_node_document, CorruptNodeFile)


def set_aside(state_dir, file: str) -> str:
    """Rename a corrupt IPAM file to `<file>.corrupt-<time>` (kept for a post-mortem); its new path."""
    sd = state_dir_of(state_dir)
    path = sd.file(_name(file))
    aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    os.rename(path, aside)              # inside the checked dir; a rename never follows a link
    return aside


def families(node_doc: dict) -> list[int]:
    """Address families the node's pods get an address of: those of enabled pools selecting it."""
    return sorted({6 if ":" in p["cidr"] else 4 for p in node_doc["pools"] if _usable_pool(p)})


def _usable_pool(pool: dict) -> bool:
    return pool["selects_node"] and not pool["disabled"]


def usable_blocks(node_doc: dict, family: int) -> list[str]:
    pools = {p["name"] for p in node_doc["pools"] if _usable_pool(p)}
    return [b["cidr"] for b in node_doc["blocks"]
            if b.get("pool") in pools and (":" in b["cidr"]) == (family == 6)]


# ---- allocations.json ---------------------------------------------------------------------

def record(a: Allocation) -> dict:
    return {k: (list(v) if k == "ips" else v) for k, v in a._asdict().items()}


def _allocation(rec: dict) -> Allocation:
    return Allocation(rec["namespace"], rec["pod"], rec["iface"], tuple(rec["ips"]), rec["container_id"],
                      rec["ifname"], rec["network"], rec.get("active", True), rec.get("created", 0.0))


def read_allocations(state_dir, unnamed: bool = False) -> list[Allocation]:
    """Every attachment's addresses on this node (no lock needed: the file is replaced whole),
    with `unnamed` also those whose pod is not known. [] when there is no file; CorruptRecords
    when it is not what weft writes (`weft ipam rebuild` or the next CNI ADD rebuilds it)."""
    sd = state_dir_of(state_dir)
    return _records(_read_checked(sd, ALLOCATIONS_FILE, check_allocations, _corrupt_records), unnamed)


def _records(data: dict | None, unnamed: bool) -> list[Allocation]:
    if data is None:
        return []
    return [_allocation(rec) for rec in data["allocations"] + (data["unnamed"] if unnamed else [])]


def _corrupt_records(message: str) -> CorruptRecords:
    return CorruptRecords(f"{message}; `weft ipam rebuild` (or the next CNI ADD) rebuilds the records from "
                          "the pods' interfaces")


def records_from_kernel(links: dict[str, str | None], routes: Iterable[tuple[str, str | None]],
                        identities: dict[str, tuple[str, str]], network: str,
                        now: float | None = None) -> tuple[list[Allocation], list[str]]:
    """Records rebuilt from what the kernel shows of the pods weft wired (pure).

    `links`: weft host interfaces and their aliases ("weft:<container id>:<ifname>"); `routes`:
    (destination, device) of weft's routes; `identities`: interface -> (namespace, pod), from
    whatever still knows (the CNI snapshot, the desired state). Returns (records, interfaces that
    could not be recorded: no alias of weft's or no route); the addresses of those stay held
    anyway (`held`). A record whose pod is not known has namespace and pod "" (unnamed).
    """
    prefix = "weft:"
    by_dev: dict[str, list[str]] = {}
    for dst, dev in routes:
        address, _, length = dst.partition("/")
        if dev and length in ("", "32", "128"):
            by_dev.setdefault(dev, []).append(address)
    records, unknown = [], []
    for iface, alias in sorted(links.items()):
        ips = sorted(by_dev.get(iface, ()), key=lambda ip: (":" in ip, ip))[:2]
        container_id, _, ifname = (alias or "")[len(prefix):].rpartition(":")
        who = identities.get(iface, ("", ""))
        if not (alias or "").startswith(prefix) or not container_id or not ifname or not ips:
            unknown.append(iface)
            continue
        records.append(Allocation(who[0], who[1], iface, tuple(ips), container_id, ifname, network, True,
                                  time.time() if now is None else now))
    return records, unknown


def log(line: str) -> None:
    """One line for the operator: the CNI runtime's log, or the helper's (cni-helper.log)."""
    print(f"weft-cni: {line}", file=sys.stderr, flush=True)


Step = Callable[[dict], tuple[object, bool]]     # state -> (result, whether the state changed)


def transact(state_dir, steps: list[Step], held: Callable[[], set[str]] | None = None,
             recover: Callable[[], tuple[list[Allocation], list[str]]] | None = None) -> list[tuple]:
    """One read-modify-write of allocations.json for `steps`, under the IPAM lock.

    Each step gets the state (with "held": the addresses live weft interfaces hold, read once
    for the batch) and returns (its result, whether it changed the state); it raises before
    changing anything. Returns (result, None) or (None, exception) per step; if the write fails
    every step fails with that. A missing or corrupt file is rebuilt with `recover()` first.
    """
    sd = state_dir_of(state_dir)
    name = _name(ALLOCATIONS_FILE)
    with ipam_lock(sd):
        rebuilt = False
        try:
            state = _read_checked(sd, ALLOCATIONS_FILE, check_allocations, _corrupt_records)
        except CorruptRecords as exc:
            aside = set_aside(sd, ALLOCATIONS_FILE)
            state, rebuilt = _recovered(recover), True
            log(f"{exc.args[0].split(';')[0]}; kept it as {os.path.basename(aside)} and rebuilt "
                f"{_summary(state)} from the pods' interfaces")
        if state is None:
            state, rebuilt = _recovered(recover), True
            if state["allocations"] or state["unnamed"] or state["unknown"]:
                log(f"{sd.file(name)} was missing: rebuilt {_summary(state)} from the pods' interfaces")
        state.pop("unknown", None)
        state["held"] = held() if held is not None else set()
        changed = rebuilt
        outcomes: list[tuple[object, Exception | None]] = []
        for step in steps:
            try:
                result, did = step(state)
            except Exception as exc:
                outcomes.append((None, exc))
            else:
                changed |= did
                outcomes.append((result, None))
        del state["held"]
        if changed:
            _write_json(sd, name, state)        # if this fails, every step of the batch fails
    return outcomes


def _recovered(recover) -> dict:
    records, unknown = recover() if recover is not None else ([], [])
    return {"format": FORMAT, "cursor": {}, "allocations": [record(a) for a in records if a.pod],
            "unnamed": [record(a) for a in records if not a.pod], "unknown": unknown}


def _summary(state: dict) -> str:
    """What a rebuild found, for its one log line."""
    text = f"{len(state['allocations'])} records"
    if state["unnamed"]:
        names = [r["iface"] for r in state["unnamed"]]
        text += (f" and {len(names)} of pods nothing names ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}:"
                 " `weft ipam rebuild --from/--kubeconfig` names them)")
    if state["unknown"]:
        text += f"; {len(state['unknown'])} interfaces without weft's alias or a route keep their addresses"
    return text


class Store:
    """The IPAM records of one state dir: reads, and read-modify-writes through `transact`.

    `held` and `recover`: the kernel facts `transact` takes (see there); `commit(key, step)` runs
    a step, by default alone; the CNI fast path (cni.fastpath) passes one that joins the steps
    of concurrent calls into one transaction.
    """

    def __init__(self, state_dir, *, held=None, recover=None, commit=None):
        self.sd = state_dir_of(state_dir)
        self.held, self.recover = held, recover
        self._commit = commit

    def run(self, step: Step):
        """`step` in a transaction; its result, or its exception raised."""
        if self._commit is not None:
            return self._commit(self, step)
        ((result, error),) = transact(self.sd, [step], self.held, self.recover)
        if error is not None:
            raise error
        return result

    def allocations(self) -> list[Allocation]:
        """Every record. With `recover`, a missing or corrupt file is rebuilt first (a corrupt one
        set aside): a DEL, CHECK or GC after the state was lost finds the live pods' records."""
        try:
            data = _read_checked(self.sd, ALLOCATIONS_FILE, check_allocations, _corrupt_records)
        except CorruptRecords:
            if self.recover is None:
                raise
            data = None
        if data is None and self.recover is not None:
            self.run(lambda state: (None, False))
            return read_allocations(self.sd, unnamed=True)
        return _records(data, unnamed=True)

    def get(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        for a in self.allocations():
            if (a.network, a.container_id, a.ifname) == (network, container_id, ifname):
                return a
        return None

    def allocate(self, network: str, container_id: str, ifname: str, namespace: str, pod: str, iface: str,
                 claim=None) -> tuple[Allocation, bool]:
        """The attachment's addresses: its existing ones, or new ones, one per family the node's
        pools give. Returns (allocation, created). `claim(node_doc, family)` is asked for a new
        block (a dict like node.json's) when the node's blocks are full; without it that is Exhausted.
        """
        return self.run(lambda state: self._allocate(state, network, container_id, ifname, namespace, pod, iface,
                                                     claim))

    def release(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        """Forget the attachment's addresses; None when it had none (DEL twice, unknown container)."""
        return self.run(lambda state: self._release(state, network, container_id, ifname))

    def _allocate(self, state: dict, network: str, container_id: str, ifname: str, namespace: str, pod: str,
                  iface: str, claim) -> tuple[tuple[Allocation, bool], bool]:
        """((allocation, created), whether `state` changed). Raises before changing anything."""
        records = state["allocations"]
        key = (network, container_id, ifname)
        mine = next((r for r in records + state["unnamed"] if (r["network"], r["container_id"], r["ifname"]) == key),
                    None)
        taken_over = []                         # a new sandbox of the pod takes over its interface
        for r in records + state["unnamed"]:
            if r is not mine and r["iface"] == iface and r.get("active", True):
                if r["container_id"] == container_id and r["network"] == network:
                    raise SecondInterface(f"pod {namespace}/{pod} already has weft interface {r['ifname']} in "
                                          f"this sandbox; weft wires one interface per pod")
                taken_over.append(r)
        if mine is not None:
            changed = bool(taken_over) or not mine.get("active", True)
            for r in taken_over:
                r["active"] = False
            mine["active"] = True
            if not mine["pod"]:                 # an unnamed record: the runtime names its pod again
                state["unnamed"].remove(mine)
                records.append(mine | {"namespace": namespace, "pod": pod})
                mine, changed = records[-1], True
            return (_allocation(mine), False), changed
        node_doc = read_node_ipam(self.sd)
        if node_doc is None:
            raise Unavailable(f"{self.sd.file(_name(NODE_FILE))} is missing")
        # Addresses live weft interfaces hold are taken, whatever the records say.
        used = {ip for r in records + state["unnamed"] for ip in r["ips"]} | state["held"]
        ips = []
        fams = families(node_doc)
        if not fams:
            raise Exhausted(f"no enabled IPPool selects node {node_doc['node']!r} "
                            f"(pools: {', '.join(p['name'] for p in node_doc['pools']) or 'none'})")
        for family in fams:
            ip = _next_free(usable_blocks(node_doc, family), used, state["cursor"].get(str(family)))
            if ip is None and claim is not None:
                node_doc = self._add_block(claim(node_doc, family))
                ip = _next_free(usable_blocks(node_doc, family), used, state["cursor"].get(str(family)))
            if ip is None:
                raise Exhausted(exhausted_message(node_doc, family, used))
            ips.append(ip)
        for r in taken_over:
            r["active"] = False
        for ip in ips:
            state["cursor"]["6" if ":" in ip else "4"] = ip
        new = Allocation(namespace, pod, iface, tuple(ips), container_id, ifname, network, True, time.time())
        records.append(record(new))
        return (new, True), True

    @staticmethod
    def _release(state: dict, network: str, container_id: str, ifname: str) -> tuple[Allocation | None, bool]:
        key = (network, container_id, ifname)
        gone = [r for r in state["allocations"] + state["unnamed"]
                if (r["network"], r["container_id"], r["ifname"]) == key]
        if not gone:
            return None, False
        for part in ("allocations", "unnamed"):
            state[part] = [r for r in state[part] if r not in gone]
        return _allocation(gone[0]), True

    def _add_block(self, block: dict) -> dict:
        """Record a block the plugin claimed in node.json (the IPAM lock is held)."""
        doc = read_node_ipam(self.sd)
        if doc is None:
            raise Unavailable(f"{self.sd.file(_name(NODE_FILE))} is missing")
        if block["cidr"] not in {b["cidr"] for b in doc["blocks"]}:
            doc["blocks"].append(dict(block, claimed=True))
            _write_json(self.sd, _name(NODE_FILE), doc)
        return doc

    def stale(self, network: str, valid: set[tuple[str, str]]) -> list[Allocation]:
        """The network's attachments that are not in `valid` ((container id, ifname) pairs): GC's work."""
        return [a for a in self.allocations()
                if a.network == network and (a.container_id, a.ifname) not in valid]

    def iface_owner(self, iface: str) -> Allocation | None:
        """The active attachment that holds `iface`, if any."""
        return next((a for a in self.allocations() if a.iface == iface and a.active), None)


def rebuild(state_dir, records: list[Allocation]) -> str | None:
    """Replace allocations.json with `records` (`weft ipam rebuild`), keeping a corrupt file aside.
    Returns where the old file went, if it was set aside."""
    sd = state_dir_of(state_dir)
    aside = None
    with ipam_lock(sd):
        try:
            old = _read_checked(sd, ALLOCATIONS_FILE, check_allocations, _corrupt_records)
        except CorruptRecords:
            old, aside = None, set_aside(sd, ALLOCATIONS_FILE)
        cursor = old["cursor"] if old else {}
        _write_json(sd, _name(ALLOCATIONS_FILE), {"format": FORMAT, "cursor": cursor,
                                                  "allocations": [record(a) for a in records if a.pod],
                                                  "unnamed": [record(a) for a in records if not a.pod]})
    return aside


def _next_free(blocks: list[str], used: set[str], cursor: str | None) -> str | None:
    """The first address of `blocks` (in order, wrapping) after `cursor` that is not in `used`."""
    nets = [ipaddress.ip_network(b) for b in blocks]
    sizes = [n.num_addresses for n in nets]
    total = sum(sizes)
    if not total:
        return None
    start = -1
    if cursor:
        at = ipaddress.ip_address(cursor)
        offset = 0
        for net, size in zip(nets, sizes, strict=True):
            if at in net:
                start = offset + int(at) - int(net.network_address)
                break
            offset += size
    for step in range(1, total + 1):
        index = (start + step) % total
        for net, size in zip(nets, sizes, strict=True):
            if index < size:
                ip = str(net.network_address + index)
                break
            index -= size
        if ip not in used:
            return ip
    return None


def exhausted_message(node_doc: dict, family: int, used: set[str]) -> str:
    """Why there is no address: the pools (by name) and the node's blocks in them."""
    pools = [p for p in node_doc["pools"] if _usable_pool(p) and (":" in p["cidr"]) == (family == 6)]
    names = ", ".join(f"{p['name']} ({p['cidr']})" for p in pools)
    blocks = usable_blocks(node_doc, family)
    if not blocks:
        return (f"IPPool {names}: node {node_doc['node']!r} has no block of it; declare one for the node "
                f"(an IPAMBlock with spec.affinity host:{node_doc['node']}, or a confirmed BlockAffinity)")
    size = sum(ipaddress.ip_network(b).num_addresses for b in blocks)
    taken = sum(1 for ip in used if any(ipaddress.ip_address(ip) in ipaddress.ip_network(b) for b in blocks))
    return (f"IPPool {names} is exhausted on node {node_doc['node']!r}: its blocks {', '.join(blocks)} "
            f"have no free address ({taken} of {size} in use)")

