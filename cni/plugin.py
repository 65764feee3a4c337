"""weft's CNI plugin: the executable the container runtime runs as /opt/cni/bin/weft.

One call per CNI command (spec 1.1.0): ADD allocates the pod an address from the node's own
blocks (store/ipam.py), wires it (cni/wiring.py) and puts the endpoint's policy in the kernel
before it answers (reconciler/endpoint.py); DEL undoes that and may be repeated; CHECK reads
everything back; GC releases what the runtime no longer knows; STATUS says whether an ADD could
succeed; VERSION lists the versions. The calls of one process share their IPAM write and policy
step through the `FastPath` given to `respond` (cni/fastpath.py).

Every file it reads is in the state dir, through store.statedir.StateDir: a state dir or file
weft must not trust (not root's, writable by others, a link) is error 103 (50 for STATUS) naming
it. Lost or corrupt IPAM records are rebuilt from the pods' interfaces, and no address a live
weft interface holds is handed out again (store.ipam). Every error is the spec's JSON on stdout
and one line on stderr; only a bug (999) prints a traceback.

Its import path is kept thin (stdlib and weft's light modules; no yaml, kubernetes, pyroute2):
the runtime waits for it on every pod start. Network configuration keys weft reads, besides the
spec's:

    "node"        this node's name (default: the hostname), as the desired state names it
    "state_dir"   weft's state directory (default /var/lib/weft), shared with the reconcile run
    "manifests"   a manifest directory, or
    "kubeconfig"  a kubeconfig ("context" optional): where to read pools and blocks when no
                  reconcile run has left them in the state dir yet, and (kubeconfig) where to
                  claim new blocks
    "mtu"         the pod interface's MTU (default 1500)
    "helper"      false: never hand the call to the resident helper (cni/helper.py); default true
"""
from __future__ import annotations

import os
import sys

from weft.cni import spec, wiring
from weft.cni.fastpath import FastPath
from weft.cni.spec import CniError
from weft.model.errors import WeftError
from weft.model.names import host_iface_name
from weft.probes.pods import routed_addresses
from weft.reconciler.bpf_pins import pinned
from weft.store import ipam
from weft.store.statedir import StateDir, UnsafeState, default_state_dir

SOURCE_LOCK = "ipam/source.lock"        # one read of the desired state per node at a time
SOURCE_TIMEOUT = 120.0


class Config:
    """The network configuration's keys weft uses, checked."""
    __slots__ = ("raw", "version", "network", "node", "state_dir", "manifests", "kubeconfig", "context", "mtu",
                 "prev_result", "dns", "valid", "_sd")

    def __init__(self, raw: dict, command: str):
        self.raw, self.version, self.network = raw, raw["cniVersion"], raw["name"]
        self.node = _string(raw, "node") or os.uname().nodename
        self.state_dir = _string(raw, "state_dir") or default_state_dir()
        if not self.state_dir.startswith("/"):
            raise CniError(spec.INVALID_CONFIG, "invalid network configuration",
                           f"state_dir {self.state_dir!r}: must be an absolute path")
        self.manifests, self.kubeconfig, self.context = (_string(raw, k) for k in ("manifests", "kubeconfig",
                                                                                   "context"))
        if self.manifests and self.kubeconfig:
            raise CniError(spec.INVALID_CONFIG, "invalid network configuration",
                           "give either \"manifests\" or \"kubeconfig\", not both")
        mtu = raw.get("mtu", wiring.DEFAULT_MTU)
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
            raise CniError(spec.INVALID_CONFIG, "invalid network configuration", f"mtu {mtu!r}: must be 68-65535")
        self.mtu = mtu
        if not isinstance(raw.get("helper", True), bool):
            raise CniError(spec.INVALID_CONFIG, "invalid network configuration",
                           f"helper {raw['helper']!r}: must be true or false")
        ipam_conf = raw.get("ipam") or {}
        if not isinstance(ipam_conf, dict) or ipam_conf.get("type") not in (None, "", "weft"):
            raise CniError(spec.UNSUPPORTED_FIELD, "unsupported field",
                           f"ipam={ipam_conf!r}: weft allocates from its own IPPools; leave ipam out")
        if raw.get("ipMasq"):
            raise CniError(spec.UNSUPPORTED_FIELD, "unsupported field",
                           "ipMasq=true: weft does not masquerade per network; set natOutgoing on the IPPool")
        prev = raw.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CniError(spec.INVALID_CONFIG, "invalid network configuration", "prevResult must be an object")
        self.prev_result = prev
        self.dns = raw.get("dns") if isinstance(raw.get("dns"), dict) else {}
        self.valid = _valid_attachments(raw) if command == "GC" else set()
        self._sd: StateDir | None = None

    @property
    def sd(self) -> StateDir:
        """The state dir, checked (once per call): UnsafeState when weft must not trust it."""
        if self._sd is None:
            self._sd = StateDir(self.state_dir)
        return self._sd

    def source(self) -> dict | None:
        if self.manifests:
            return ipam.source_of(from_dir=self.manifests)
        if self.kubeconfig:
            return ipam.source_of(kubeconfig=self.kubeconfig, context=self.context)
        return None


def _string(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise CniError(spec.INVALID_CONFIG, "invalid network configuration", f"{key} {value!r}: must be a string")
    return value


def _valid_attachments(raw: dict) -> set[tuple[str, str]]:
    entries = raw.get("cni.dev/valid-attachments", raw.get("cni.dev/attachments", []))
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("containerID"), str) and isinstance(e.get("ifname"), str)
            for e in entries):
        raise CniError(spec.INVALID_CONFIG, "invalid network configuration",
                       "cni.dev/valid-attachments must be a list of {\"containerID\", \"ifname\"}")
    return {(e["containerID"], e["ifname"]) for e in entries}


def given_identity(inv: spec.Invocation) -> tuple[str, str] | None:
    """(namespace, pod) from CNI_ARGS, as the kubelet passes them, if it does."""
    namespace, pod = inv.args.get("K8S_POD_NAMESPACE"), inv.args.get("K8S_POD_NAME")
    return (namespace, pod) if namespace and pod else None


def pod_identity(inv: spec.Invocation) -> tuple[str, str]:
    """(namespace, pod) from CNI_ARGS; error 4 without them."""
    identity = given_identity(inv)
    if identity is None:
        raise CniError(spec.INVALID_ENVIRONMENT, "invalid CNI_ARGS",
                       "K8S_POD_NAMESPACE and K8S_POD_NAME must be set in CNI_ARGS: weft names the pod's host "
                       "interface after them")
    return identity


def host_iface(namespace: str, pod: str) -> str:
    return host_iface_name(namespace, pod)


# ---- the node's IPAM state -------------------------------------------------------------------

def node_ipam(conf: Config) -> dict:
    """node.json; if no reconcile run has written it (or it is corrupt), read the desired state
    in this process and write it. Concurrent callers (threads of the helper, or processes) wait
    for the one that reads."""
    doc = _read_node_ipam(conf)
    if doc is not None:
        return doc
    source = conf.source()
    if source is None:
        raise CniError(spec.DESIRED_STATE, "no IPAM state for this node yet",
                       f"no reconcile run has written {conf.sd.file('ipam/node.json')} and the network "
                       "configuration names no source (\"manifests\" or \"kubeconfig\")")
    conf.sd.subdir(ipam.IPAM_DIR)
    with conf.sd.lock(shared=False, timeout=SOURCE_TIMEOUT, name=SOURCE_LOCK):
        doc = _read_node_ipam(conf)                 # another call read it while this one waited
        if doc is not None:
            return doc
        from weft.cni.nodesource import read_node_ipam
        try:
            read = read_node_ipam(source, conf.node)
        except WeftError as exc:
            raise CniError(spec.DESIRED_STATE, "cannot read the desired state", _line(exc)) from None
        ipam.write_node_ipam(conf.sd, conf.node, read.pools, read.blocks, source, read.labels)
        doc = _read_node_ipam(conf)
        if doc is None:
            raise CniError(spec.DESIRED_STATE, "weft's IPAM state is unreadable", "node.json vanished once written")
        return doc


def _read_node_ipam(conf: Config) -> dict | None:
    """node.json, or None when there is none; a corrupt one is set aside (and read again)."""
    try:
        return ipam.read_node_ipam(conf.sd)
    except ipam.CorruptNodeFile as exc:
        if conf.source() is None:
            raise CniError(spec.DESIRED_STATE, "weft's IPAM state is unreadable",
                           f"{_line(exc)}; run `weft apply` to write it again") from None
        aside = ipam.set_aside(conf.sd, ipam.NODE_FILE)
        ipam.log(f"{_line(exc)}; kept it as {os.path.basename(aside)} and read the desired state again")
        return None


def _line(exc: BaseException) -> str:
    """An error's message on one line, cut to a readable length."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 500 else text[:497] + "..."


def store(conf: Config, fast: FastPath) -> ipam.Store:
    """The node's IPAM records, with the kernel's facts: addresses live weft interfaces hold are
    never handed out, and lost records are rebuilt from those interfaces."""
    return ipam.Store(conf.sd, held=routed_addresses, recover=lambda: _recover(conf), commit=fast.ipam_commit)


def _recover(conf: Config) -> tuple[list[ipam.Allocation], list[str]]:
    """Records for the pods weft wired (their interfaces, aliases and routes), named by the last
    run's snapshot and, for interfaces it does not name, by the desired state's pods of this node."""
    from weft.probes.pods import wired_pods
    from weft.store.snapshot import load_snapshot
    try:
        wired = wired_pods(ip=wiring.IP)
    except WeftError as exc:
        raise ipam.IpamError(f"cannot read the pods' interfaces to rebuild the IPAM records: {_line(exc)}") from None
    identities = {}
    for key in (load_snapshot(conf.sd) or {}).get("pods", ()):
        namespace, _, pod = key.partition("/")
        identities[host_iface_name(namespace, pod)] = (namespace, pod)
    source = conf.source() or {}
    if set(wired.links) - set(identities) and source:
        from weft.cni.nodesource import read_local_pods
        try:
            identities.update(read_local_pods(source, conf.node))
        except WeftError as exc:
            ipam.log(f"rebuilding IPAM records: cannot read the pods of node {conf.node}: {_line(exc)}")
    return ipam.records_from_kernel(wired.links, wired.routes, identities, conf.network)


def _claimer(conf: Config, doc: dict):
    """Block claims through the API server, when the source is one; None for a manifest directory."""
    source = conf.source() or doc.get("source") or {}
    if "manifests" in source:
        return None

    def claim(node_doc: dict, family: int) -> dict:
        from weft.cni.claims import claim_block
        pools = [p for p in node_doc["pools"] if p["selects_node"] and not p["disabled"]
                 and (":" in p["cidr"]) == (family == 6)]
        return claim_block(conf.node, pools, source.get("kubeconfig"), source.get("context"),
                           skip={b["cidr"] for b in node_doc["blocks"]})
    return claim


# ---- the commands ------------------------------------------------------------------------------

def cmd_add(inv: spec.Invocation, conf: Config, fast: FastPath) -> dict:
    namespace, pod = pod_identity(inv)
    alias = _alias(inv)
    netns = spec.open_netns(inv.netns)          # before anything is allocated: error 3 if it is not one
    try:
        return _add(inv, conf, fast, namespace, pod, alias, netns)
    finally:
        os.close(netns)


def _alias(inv: spec.Invocation) -> str:
    """The host side's alias; error 4 up front when the kernel would refuse it as too long."""
    alias = wiring.alias_for(inv.container_id, inv.ifname)
    if len(alias.encode()) > wiring.ALIAS_MAX:
        raise CniError(spec.INVALID_ENVIRONMENT, "invalid CNI_CONTAINERID",
                       f"{len(inv.container_id)} characters: weft names the attachment in the host interface's "
                       f"alias {wiring.ALIAS_PREFIX}<container id>:<ifname>, which the kernel limits to "
                       f"{wiring.ALIAS_MAX} characters")
    return alias


def _add(inv: spec.Invocation, conf: Config, fast: FastPath, namespace: str, pod: str, alias: str,
         netns: int) -> dict:
    iface = host_iface(namespace, pod)
    records = store(conf, fast)
    with ipam.pod_lock(conf.sd, iface):
        doc = node_ipam(conf)
        try:
            allocation, created = records.allocate(conf.network, inv.container_id, inv.ifname, namespace, pod,
                                                   iface, claim=_claimer(conf, doc))
        except ipam.Exhausted as exc:
            raise CniError(spec.NO_ADDRESS, "no address for the pod", str(exc)) from None
        except ipam.SecondInterface as exc:
            raise CniError(spec.INVALID_ENVIRONMENT, "invalid CNI_IFNAME", f"{inv.ifname}: {exc}") from None
        except ipam.IpamError as exc:
            code = (spec.TRY_AGAIN_LATER if isinstance(exc, ipam.ClaimUnavailable) else
                    spec.FORBIDDEN if isinstance(exc, ipam.ClaimForbidden) else spec.DESIRED_STATE)
            raise CniError(code, "cannot allocate an address", _line(exc)) from None
        # The endpoint's policy goes in while the pod is wired: neither needs the other, and ADD
        # returns only when both are done. On an eBPF node the programs attach to the veth: after.
        ebpf = pinned(conf.state_dir)
        step = (_add_endpoint, conf, fast, namespace, pod, iface, tuple(allocation.ips))
        policy = None if ebpf else _Background(*step)
        wired = False
        try:
            if iface in wiring.host_links():
                # A leftover: this attachment's own (a crashed ADD) or an older sandbox's of the same pod.
                wiring.delete_host_side(iface)
            wired = True
            pod_mac = wiring.wire(inv.netns, inv.ifname, iface, list(allocation.ips), conf.mtu, alias,
                                  netns_fd=netns)
        except BaseException as exc:
            if policy is not None:
                policy.join()
            undo = _undo_add(conf, fast, inv, iface, alias, wired, created, records)
            if isinstance(exc, wiring.WiringError):
                raise CniError(spec.WIRING_FAILED, "cannot wire the pod", str(exc) + undo) from None
            raise
        failed = policy.join() if policy is not None else _Background(*step).join()
        if failed is None and not ebpf:
            failed = _replane(conf, step)
        if failed is not None:
            undo = _undo_add(conf, fast, inv, iface, alias, wired, created, records)
            if isinstance(failed, CniError):
                failed.details += undo
            raise failed
    return result(inv, conf, iface, pod_mac, allocation.ips)


class _Background:
    """fn(*args) in a thread of its own; join() waits and returns what it raised, or None."""

    def __init__(self, fn, *args):
        import threading
        self.error: BaseException | None = None

        def target():
            try:
                fn(*args)
            except BaseException as exc:          # handed to the caller by join()
                self.error = exc
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> BaseException | None:
        self.thread.join()
        return self.error


def _replane(conf: Config, step: tuple) -> BaseException | None:
    """After an ADD that began on an iptables node wired its pod: if the node switched to eBPF
    since, run the step again (it now writes the pod's endpoint entry and attaches the pinned
    programs; nothing is compiled). Returns what that raised, or None.

    The race it closes: the iptables step put the pod's chains in, then a run switched the node
    to eBPF while the veth was being made; the run removed the pods' IPv4 chains and attached its
    programs to the veths it found, which did not include this one, and weft-FORWARD accepts pod
    traffic on an eBPF node: the pod ran open until the next run. The plane is asked under the
    node lock (shared): a run switching now has either finished (its pins are there) or starts
    after the veth exists, and then its probe finds the veth and attaches the programs itself."""
    from weft.reconciler.endpoint import LOCK_TIMEOUT
    try:
        with conf.sd.lock(shared=True, timeout=LOCK_TIMEOUT):
            switched = pinned(conf.state_dir)
    except UnsafeState as exc:
        return CniError(spec.DESIRED_STATE, "weft's state dir is not safe to use", _line(exc))
    except WeftError as exc:
        return CniError(spec.POLICY_FAILED, "cannot put the pod's policy in place", _line(exc))
    return _Background(*step).join() if switched else None


def _add_endpoint(conf: Config, fast: FastPath, namespace: str, pod: str, iface: str, ips: tuple[str, ...]) -> None:
    """The endpoint's rules, in the kernel before ADD returns: a pod under a policy never runs open.

    Fail closed per IP family: the rules go into the table of every family the pod has an address
    in (an IPv6 address: ip6tables too); if one family's cannot be programmed, ADD fails and is
    undone, so a pod is never wired in a family whose policy is not enforced."""
    try:
        fast.add_endpoint(conf.sd, namespace, pod, iface, ips)
    except UnsafeState as exc:
        raise CniError(spec.DESIRED_STATE, "weft's state dir is not safe to use", _line(exc)) from None
    except WeftError as exc:
        raise CniError(spec.POLICY_FAILED, "cannot put the pod's policy in place", _line(exc)) from None


def _undo_add(conf: Config, fast: FastPath, inv: spec.Invocation, iface: str, alias: str, wired: bool,
              created: bool, records: ipam.Store) -> str:
    """A failed ADD leaves nothing behind: the wiring it made, the rules, the address it took.

    Each step is tried whatever the others do; what fails (the runtime's DEL retries it) is
    returned as text to add to the ADD's own error, which stays one line.
    """
    steps: list = [lambda: fast.remove_endpoint(conf.sd, iface)]   # first: an eBPF entry is keyed by the veth's ifindex
    if wired:
        def unwire():
            if iface in wiring.host_links() and wiring.link_alias(iface) in (alias, None):
                wiring.delete_host_side(iface)      # the pod side goes with it
        steps.append(unwire)
    if created:
        steps.append(lambda: records.release(conf.network, inv.container_id, inv.ifname))
    failed = []
    for step in steps:
        try:
            step()
        except (wiring.WiringError, WeftError, OSError) as exc:
            failed.append(_line(exc))
    return f"; undoing the ADD failed too: {'; '.join(failed)}" if failed else ""


def result(inv: spec.Invocation, conf: Config, iface: str, pod_mac: str, ips) -> dict:
    interfaces = [{"name": iface, "mac": wiring.HOST_MAC, "mtu": conf.mtu},
                  {"name": inv.ifname, "mac": pod_mac, "mtu": conf.mtu, "sandbox": inv.netns}]
    addresses, routes = [], []
    for ip in ips:
        v6 = ":" in ip
        gateway = wiring.GATEWAY_V6 if v6 else wiring.GATEWAY_V4
        addresses.append({"address": f"{ip}/{128 if v6 else 32}", "gateway": gateway, "interface": 1})
        routes.append({"dst": "::/0" if v6 else "0.0.0.0/0", "gw": gateway})
    ours = {"interfaces": interfaces, "ips": addresses, "routes": routes, "dns": conf.dns}
    return spec.format_result(spec.merge_results(conf.prev_result, ours), conf.version)


def cmd_del(inv: spec.Invocation, conf: Config, fast: FastPath) -> None:
    """Undo ADD as far as anything of it is left; success when nothing is (DEL twice, unknown container)."""
    records = store(conf, fast)
    allocation = records.get(conf.network, inv.container_id, inv.ifname)
    identity = given_identity(inv)
    iface = allocation.iface if allocation else (host_iface(*identity) if identity else None)
    if iface is None:
        return                                   # nothing recorded and no pod named: nothing of ours
    with ipam.pod_lock(conf.sd, iface):
        teardown(conf, fast, inv.container_id, inv.ifname, iface, allocation, records)


def teardown(conf: Config, fast: FastPath, container_id: str, ifname: str, iface: str, allocation,
             records: ipam.Store) -> None:
    """Remove one attachment: its interface and rules if it still owns them, and its addresses.

    Deleting the host side deletes the pod side too (a veth pair goes as one), so the pod's
    namespace need not be entered, nor even exist any more. The three steps run at once, none
    waits for another: the kernel takes ~20 ms to delete a veth (RCU grace periods), the rules
    are an iptables-restore, the record an fsync'd write. Their order does not matter: a weft
    interface whose dispatch rules are gone falls through to DROP (fail closed), and an address
    routed to a live weft interface is never handed out again (store.ipam `held`), so it is not
    reused before the interface is gone. What is decided first is whether the interface is this
    attachment's (a newer sandbox of the same pod keeps its interface and rules).
    """
    owner = records.iface_owner(iface)
    ours = owner is None or (owner.container_id, owner.ifname, owner.network) == (container_id, ifname, conf.network)
    present = iface in wiring.host_links()
    if not present or not ours:
        delete = False
    elif owner is not None:
        delete = True                           # the records say it is ours: no need to ask the kernel
    else:                                       # nobody's on record: only if its alias names this attachment
        found = wiring.link_alias(iface)
        delete = found == wiring.alias_for(container_id, ifname) or (found is None and allocation is not None)
    rules = _Background(_remove_endpoint, conf, fast, iface) if ours and (delete or not present) else None
    if rules is not None and delete and pinned(conf.state_dir):
        rules.join()                            # eBPF: the entry (keyed by ifindex) goes before the veth
    release = _Background(records.release, conf.network, container_id, ifname)
    unwired: BaseException | None = None
    try:
        if delete:
            wiring.delete_host_side(iface)
    except BaseException as exc:                # reported once the other steps are done
        unwired = exc
    failures = [unwired, rules.join() if rules else None, release.join()]
    failed = next((exc for exc in failures if exc is not None), None)
    if isinstance(failed, wiring.WiringError):
        raise CniError(spec.WIRING_FAILED, "cannot remove the pod's interface", str(failed)) from None
    if failed is not None:
        raise failed


def _remove_endpoint(conf: Config, fast: FastPath, iface: str) -> None:
    try:
        fast.remove_endpoint(conf.sd, iface)
    except UnsafeState:
        raise
    except WeftError as exc:
        raise CniError(spec.POLICY_FAILED, "cannot remove the pod's policy", _line(exc)) from None


def cmd_check(inv: spec.Invocation, conf: Config, fast: FastPath) -> None:
    os.close(spec.open_netns(inv.netns))
    alias = _alias(inv)
    allocation = store(conf, fast).get(conf.network, inv.container_id, inv.ifname)
    if allocation is None:
        raise CniError(spec.CHECK_FAILED, "CHECK failed",
                       f"no address is allocated to container {inv.container_id} interface {inv.ifname}")
    problems = []
    if conf.prev_result is not None:
        listed = {ip.get("address", "").split("/")[0] for ip in conf.prev_result.get("ips") or ()
                  if isinstance(ip, dict)}
        problems += [f"address {ip} of prevResult is not allocated to this attachment"
                     for ip in sorted(listed - set(allocation.ips)) if ip]
    problems += wiring.check(inv.netns, inv.ifname, allocation.iface, list(allocation.ips), conf.mtu, alias)
    from weft.reconciler.endpoint import check_endpoint
    problems += check_endpoint(conf.sd, allocation.namespace, allocation.pod, allocation.iface, tuple(allocation.ips))
    if problems:
        raise CniError(spec.CHECK_FAILED, "CHECK failed", "; ".join(problems))


def cmd_gc(inv: spec.Invocation, conf: Config, fast: FastPath) -> None:
    """Release every attachment of this network the runtime does not list as valid, and remove
    weft interfaces whose attachment is not valid either; report all failures at the end."""
    records = store(conf, fast)
    errors = []
    for allocation in records.stale(conf.network, conf.valid):
        try:
            with ipam.pod_lock(conf.sd, allocation.iface):
                teardown(conf, fast, allocation.container_id, allocation.ifname, allocation.iface, allocation,
                         records)
        except CniError as exc:
            errors.append(str(exc))
    errors += _gc_interfaces(conf, fast, records)
    if errors:
        raise CniError(spec.WIRING_FAILED, "GC could not remove everything", "; ".join(errors))


def _gc_interfaces(conf: Config, fast: FastPath, records: ipam.Store) -> list[str]:
    """Host interfaces that name an attachment (alias) nobody holds an address for any more."""
    import json
    out = wiring._run([wiring.IP, "-j", "link", "show", "type", "veth"], check=False)
    held = {(a.container_id, a.ifname) for a in records.allocations()}
    errors = []
    for link in json.loads(out) if out.strip() else []:
        alias = link.get("ifalias") or ""
        if not alias.startswith(wiring.ALIAS_PREFIX):
            continue
        container_id, _, ifname = alias[len(wiring.ALIAS_PREFIX):].rpartition(":")
        if (container_id, ifname) in held or (container_id, ifname) in conf.valid:
            continue
        try:
            with ipam.pod_lock(conf.sd, link["ifname"]):
                if records.iface_owner(link["ifname"]) is None:    # first: an eBPF entry is keyed by ifindex
                    _remove_endpoint(conf, fast, link["ifname"])
                wiring.delete_host_side(link["ifname"])
        except (wiring.WiringError, CniError) as exc:
            errors.append(str(exc))
    return errors


def cmd_status(inv: spec.Invocation, conf: Config, fast: FastPath) -> None:
    """Ready when the node's IPAM state is readable and a new pod would get an address."""
    try:
        doc = node_ipam(conf)
        allocations = store(conf, fast).allocations()
    except (CniError, WeftError, OSError) as exc:
        raise CniError(spec.NOT_AVAILABLE, "weft cannot serve ADD", _line(exc)) from None
    fams = ipam.families(doc)
    if not fams:
        raise CniError(spec.NOT_AVAILABLE, "weft cannot serve ADD", f"no enabled IPPool selects node {doc['node']!r}")
    if _claimer(conf, doc) is not None:
        return                                     # more blocks can be claimed from the API server
    used = {ip for a in allocations for ip in a.ips} | routed_addresses()
    for family in fams:
        if ipam._next_free(ipam.usable_blocks(doc, family), used, None) is None:
            raise CniError(spec.NOT_AVAILABLE, "weft cannot serve ADD", ipam.exhausted_message(doc, family, used))


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def run(environ, stdin: bytes, fast: FastPath | None = None) -> tuple[int, dict | None]:
    """One invocation: (exit code, JSON object for stdout or None). `fast`: the process's batches
    (the helper passes its own; a plain call gets a fresh one, every batch a batch of one)."""
    config = None
    command = environ.get("CNI_COMMAND", "")
    try:
        inv = spec.Invocation(environ)
        config = spec.parse_config(stdin, inv.command)
        if inv.command == "VERSION":
            return 0, spec.version_result(config)
        out = COMMANDS[inv.command](inv, Config(config, inv.command), fast or FastPath())
        return 0, out
    except CniError as exc:
        return 1, exc.to_json(_answer_version(config, stdin))
    except (WeftError, OSError) as exc:           # the state dir (unsafe, corrupt, unreadable), named
        code = spec.NOT_AVAILABLE if command == "STATUS" else (
            spec.DESIRED_STATE if isinstance(exc, WeftError) else spec.IO_FAILURE)
        what = "weft's state dir is not safe to use" if isinstance(exc, UnsafeState) else \
            "weft's state is unreadable" if isinstance(exc, WeftError) else "I/O error"
        return 1, CniError(code, what, _line(exc)).to_json(_answer_version(config, stdin))
    except Exception as exc:                      # a bug: still answer in the protocol
        import traceback
        traceback.print_exc()
        return 1, CniError(spec.INTERNAL, "internal error", f"{type(exc).__name__}: {exc}").to_json(
            _answer_version(config, stdin))


def _answer_version(config: dict | None, stdin: bytes) -> str:
    """The configuration's version, also when the call failed before the configuration was
    accepted (a bad CNI_* variable, a command the version does not have)."""
    return spec.config_version(config if config is not None else spec.peek_version(stdin))


def respond(environ, stdin: bytes, fast: FastPath | None = None) -> tuple[int, bytes, bytes]:
    """One invocation as the runtime sees it: (exit code, stdout, stderr)."""
    code, out = run(environ, stdin, fast)
    stdout = spec.dumps(out).encode() if out is not None else b""
    stderr = b""
    if code and out is not None:                 # one line for the runtime's log
        text = f"weft-cni: {environ.get('CNI_COMMAND', '?')}: {out['msg']}" + (
            f": {out['details']}" if out.get("details") else "")
        stderr = (" ".join(text.split()) + "\n").encode()
    return code, stdout, stderr


def helper_settings(stdin: bytes) -> tuple[bool, str]:
    """Whether the configuration lets the resident helper (cni/helper.py) serve it, and its state dir."""
    import json
    try:
        raw = json.loads(stdin)
    except ValueError:
        return True, default_state_dir()
    if not isinstance(raw, dict):
        return True, default_state_dir()
    state_dir = raw.get("state_dir")
    return raw.get("helper", True) is not False, state_dir if isinstance(state_dir, str) and \
        state_dir.startswith("/") else default_state_dir()


def main(stdin: bytes | None = None) -> int:
    """The plugin in this process (cni/client.py calls it when no helper answers)."""
    if stdin is None:
        try:
            stdin = sys.stdin.buffer.read()
        except OSError as exc:
            out = CniError(spec.IO_FAILURE, "cannot read the network configuration from stdin",
                           exc.strerror or str(exc)).to_json(spec.LATEST)
            sys.stdout.write(spec.dumps(out))
            return 1
    code, stdout, stderr = respond(os.environ, stdin)
    sys.stdout.buffer.write(stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
