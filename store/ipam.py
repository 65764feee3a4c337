"""Node-local IPAM: the node hands out pod addresses from its own blocks, with no API round-trip.

Two files under <state dir>/ipam/, each replaced atomically (write a temporary file, fsync,
rename, fsync the directory), so a reader never sees half a file and a crash at any point
leaves either the old or the new content:

  node.json         what the node may allocate from: the IPPools (whether each selects this node,
                    whether it is disabled) and the node's blocks. Written by every reconcile run
                    (`write_node_ipam`), and by the plugin itself when it claims a block or has to
                    read the desired state because no run has happened yet.
  allocations.json  one record per attachment (network, container id, ifname): the pod, its
                    host interface and its addresses.

Writers hold an exclusive flock on ipam/lock for the read-modify-write; readers do not need it.
Addresses are chosen next-fit (the first free address after the last one handed out), so an
address just released is the last to be reused: other nodes' rules may still name it as the old
pod's until their next run.

Stdlib only: this is on the plugin's ADD path.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections import namedtuple

from weft.model.errors import WeftError
from weft.store.groupcommit import GroupCommit

IPAM_DIR = "ipam"
NODE_FILE = "node.json"
ALLOCATIONS_FILE = "allocations.json"
LOCK_FILE = "lock"
FORMAT = 1
POD_LOCK_STRIPES = 64

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


class Lock:
    """An exclusive flock on a file in the IPAM directory, for one `with` block."""

    def __init__(self, path: str):
        self.path, self.fd = path, -1

    def __enter__(self) -> Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)          # closing drops the lock
        self.fd = -1


def ipam_dir(state_dir) -> str:
    path = os.path.join(os.fspath(state_dir), IPAM_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def ipam_lock(state_dir) -> Lock:
    return Lock(os.path.join(ipam_dir(state_dir), LOCK_FILE))


def pod_lock(state_dir, iface: str) -> Lock:
    """Serialises ADD and DEL of one pod's interface (an old and a new sandbox of the same pod).

    Striped over POD_LOCK_STRIPES files, so lock files do not pile up one per pod ever seen.
    """
    stripe = sum(iface.encode()) % POD_LOCK_STRIPES
    directory = os.path.join(ipam_dir(state_dir), "locks")
    os.makedirs(directory, exist_ok=True)
    return Lock(os.path.join(directory, f"{stripe:02d}"))


def atomic_write(path: str, data: dict) -> None:
    """Replace `path` with `data` as JSON so that a crash leaves the old or the new file, whole."""
    tmp = path + ".tmp"               # fixed name: writers hold the lock, one at a time
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode())  # C encoder
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise Unavailable(f"cannot read {path}: not a weft IPAM file of format {FORMAT}")
    return data


# ---- node.json: what this node allocates from --------------------------------------------

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
    import ipaddress
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
        pool = next((name for pool_net, name in nets if pool_net.version == net.version and net.subnet_of(pool_net)),
                    None)
        block_docs[block.cidr] = {"cidr": block.cidr, "pool": pool, "origin": block.origin}
    ordered = sorted(block_docs.values(), key=lambda b: (":" in b["cidr"], ipaddress.ip_network(b["cidr"])))
    return {"format": FORMAT, "node": node, "source": source, "pools": pool_docs, "blocks": ordered}


def write_node_ipam(state_dir, node: str, pools, blocks, source: dict, node_labels=None) -> bool:
    """Record what `node` allocates from, for the CNI plugin (called by every reconcile run).

    `pools`/`blocks`: the desired state's IPPools and Blocks (all of them; the node's are picked
    here); `source`: `source_of(...)` of the run; `node_labels`: the node's labels, for the pools'
    nodeSelectors. Blocks the plugin claimed since are kept (the run's read may predate the claim).
    Returns whether the file changed.
    """
    doc = node_ipam_document(node, pools, blocks, source, node_labels)
    path = os.path.join(ipam_dir(state_dir), NODE_FILE)
    with ipam_lock(state_dir):
        try:
            old = _read_json(path)
        except Unavailable:
            old = None
        if old and old.get("node") == node:
            known = {b["cidr"] for b in doc["blocks"]}
            claimed = [b for b in old.get("blocks", ()) if b.get("claimed") and b["cidr"] not in known]
            if claimed:
                doc["blocks"] = doc["blocks"] + claimed
        if old is not None and {k: v for k, v in old.items() if k != "written"} == doc:
            return False
        atomic_write(path, doc | {"written": time.time()})
    return True


def read_node_ipam(state_dir) -> dict | None:
    """node.json as written by `write_node_ipam`; None when no run has written it yet."""
    return _read_json(os.path.join(os.fspath(state_dir), IPAM_DIR, NODE_FILE))


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

def _record(a: Allocation) -> dict:
    return {k: (list(v) if k == "ips" else v) for k, v in a._asdict().items()}


def _allocation(rec: dict) -> Allocation:
    return Allocation(rec["namespace"], rec["pod"], rec["iface"], tuple(rec["ips"]), rec["container_id"],
                      rec["ifname"], rec["network"], rec.get("active", True), rec.get("created", 0.0))


def read_allocations(state_dir) -> list[Allocation]:
    """Every attachment's addresses on this node (no lock needed: the file is replaced whole)."""
    data = _read_json(os.path.join(os.fspath(state_dir), IPAM_DIR, ALLOCATIONS_FILE))
    return [_allocation(rec) for rec in (data or {}).get("allocations", ())]


class Store:
    """Read-modify-write of allocations.json (and node.json for claims) under the IPAM lock."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.dir = ipam_dir(state_dir)
        self.path = os.path.join(self.dir, ALLOCATIONS_FILE)

    def get(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        for a in read_allocations(self.state_dir):
            if (a.network, a.container_id, a.ifname) == (network, container_id, ifname):
                return a
        return None

    def allocate(self, network: str, container_id: str, ifname: str, namespace: str, pod: str, iface: str,
                 claim=None) -> tuple[Allocation, bool]:
        """The attachment's addresses: its existing ones, or new ones, one per family the node's
        pools give. Returns (allocation, created). `claim(node_doc, family)` is asked for a new
        block (a dict like node.json's) when the node's blocks are full; without it that is Exhausted.
        Attachments allocated at once by threads of this process share one write (cni.groupcommit).
        """
        return _WRITES.run(self.dir, self._allocate, (network, container_id, ifname, namespace, pod, iface, claim))

    def release(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        """Forget the attachment's addresses; None when it had none (DEL twice, unknown container)."""
        return _WRITES.run(self.dir, self._release, (network, container_id, ifname))

    def _allocate(self, state: dict, network: str, container_id: str, ifname: str, namespace: str, pod: str,
                  iface: str, claim) -> tuple[tuple[Allocation, bool], bool]:
        """((allocation, created), whether `state` changed). Raises before changing anything."""
        records = state["allocations"]
        key = (network, container_id, ifname)
        mine = next((r for r in records if (r["network"], r["container_id"], r["ifname"]) == key), None)
        taken_over = []                         # a new sandbox of the pod takes over its interface
        for r in records:
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
            return (_allocation(mine), False), changed
        node_doc = read_node_ipam(self.state_dir)
        if node_doc is None:
            raise Unavailable(f"{os.path.join(self.dir, NODE_FILE)} is missing")
        used = {ip for r in records for ip in r["ips"]}
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
        records.append(_record(new))
        return (new, True), True

    def _release(self, state: dict, network: str, container_id: str, ifname: str) -> tuple[Allocation | None, bool]:
        key = (network, container_id, ifname)
        gone = [r for r in state["allocations"] if (r["network"], r["container_id"], r["ifname"]) == key]
        if not gone:
            return None, False
        state["allocations"] = [r for r in state["allocations"] if r not in gone]
        return _allocation(gone[0]), True

    def _add_block(self, block: dict) -> dict:
        """Record a block the plugin claimed in node.json (the IPAM lock is held)."""
        path = os.path.join(self.dir, NODE_FILE)
        doc = _read_json(path)
        if block["cidr"] not in {b["cidr"] for b in doc["blocks"]}:
            doc["blocks"].append(dict(block, claimed=True))
            atomic_write(path, doc)
        return doc

    def stale(self, network: str, valid: set[tuple[str, str]]) -> list[Allocation]:
        """The network's attachments that are not in `valid` ((container id, ifname) pairs): GC's work."""
        return [a for a in read_allocations(self.state_dir)
                if a.network == network and (a.container_id, a.ifname) not in valid]

    def iface_owner(self, iface: str) -> Allocation | None:
        """The active attachment that holds `iface`, if any."""
        return next((a for a in read_allocations(self.state_dir) if a.iface == iface and a.active), None)


def _write_batch(ipam_path: str, calls) -> None:
    """One read-modify-write of allocations.json for a batch of allocate/release calls."""
    with Lock(os.path.join(ipam_path, LOCK_FILE)):
        path = os.path.join(ipam_path, ALLOCATIONS_FILE)
        state = _read_json(path) or {"format": FORMAT, "cursor": {}, "allocations": []}
        changed, outcomes = False, []
        for call in calls:
            step, args = call.args
            try:
                result, did = step(state, *args)
            except Exception as exc:
                outcomes.append((call, None, exc))
            else:
                changed |= did
                outcomes.append((call, result, None))
        if changed:
            atomic_write(path, state)           # if this fails, every call of the batch fails
        for call, result, error in outcomes:
            call.settle(result, error)


_WRITES = GroupCommit(_write_batch)


def _next_free(blocks: list[str], used: set[str], cursor: str | None) -> str | None:
    """The first address of `blocks` (in order, wrapping) after `cursor` that is not in `used`."""
    import ipaddress
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
    import ipaddress
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
