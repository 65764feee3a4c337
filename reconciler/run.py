"""One reconcile run: read the desired state, then, under the node lock, probe, diff, apply, verify.

The desired state (from the API server or a manifest dir) is read, converted and validated, and
this node's state rendered, before the node lock is taken: a slow or silent API server never
holds up the CNI plugin, whose per-pod steps take the same lock (shared). The lock covers only
the kernel work: probe, diff, apply and verify.

The kernel's dumps start at once, alongside the read (they are parsed in a worker meanwhile). A
read made before the lock is a guess that the lock then confirms: no other run held the lock when
it began nor wrote since (a run marks, in `kernel-writes.json`, that it is about to write), and no
per-pod step of the CNI plugin wrote since (the resources re-read what those change); otherwise
the kernel is read again, under the lock. The pods the plugin allocated addresses to meanwhile
are rendered in too.
"""
from __future__ import annotations

import functools
import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weft.model.errors import WeftError
from weft.probes.runner import Runner
from weft.reconciler import engine
from weft.reconciler.bird import Bird, desired_config
from weft.reconciler.observe import QUIET, Observer
from weft.reconciler.plan import Plan, PlanError, check_same, check_target
from weft.reconciler.rendered import DESTROYED, RenderedNode
from weft.store.cache import gc_paused
from weft.store.statedir import CorruptState, StateDir, UnsafeState, default_state_dir  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from weft.desired.sources import Reading
    from weft.model.cluster import ClusterState

MARKER = "kernel-writes.json"       # a run's writes: a new token before the first and after the last


@dataclass(frozen=True)
class Options:
    node: str
    state_dir: Path
    from_dir: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    backend: str = "auto"
    lock_timeout: float = 300.0
    bird_socket: str | None = None      # BIRD's control socket (default <state dir>/bird.ctl)
    bird_log: str | None = None         # where BIRD logs (default <state dir>/bird.log; or syslog, stderr)
    dataplane: str = "auto"             # "iptables", "ebpf" (reconciler.bpf), "auto": bpfEnabled decides
    observer: Observer = field(default=QUIET, compare=False)   # phase timings and events (--metrics-file, logs)

    def source(self) -> dict[str, Any]:
        from weft.store.ipam import source_of
        return source_of(self.from_dir, self.kubeconfig, self.context)


# ---- the desired side -------------------------------------------------------------------------

def local_allocations(state_dir: Path) -> list[Any]:
    """The addresses this node's IPAM gave its pods (the CNI plugin's records)."""
    from weft.store.ipam import IpamError, read_allocations
    try:
        allocations = read_allocations(state_dir)
    except IpamError as exc:
        raise WeftError(f"this node's IPAM records cannot be read: {exc}") from None
    # An inactive record is an old sandbox of the pod whose interface a newer one took over.
    return [a for a in allocations if a.active]


def _allocations_digest(allocations: list[Any]) -> str:
    return hashlib.sha256(repr(sorted((a.namespace, a.pod, a.iface, tuple(a.ips))
                                      for a in allocations)).encode()).hexdigest()[:16]


@dataclass
class DesiredRead:
    """A finished read of the desired state and this node's render of it."""
    reading: Reading | None             # None for --destroy (nothing is read)
    node: RenderedNode


def desired_state(opts: Options, destroy: bool = False, started: Any = None) -> RenderedNode:
    """This node's rendered state (see `read_desired`)."""
    if destroy:
        return DESTROYED
    from weft.desired import sources
    with started or sources.start(opts.state_dir, opts.from_dir, opts.kubeconfig, opts.context,
                                  warn=opts.observer.warning) as begun:
        return read_desired(opts, begun).node


def read_desired(opts: Options, started: Any) -> DesiredRead:
    """Finish the read and render this node's state.

    Local pods take their addresses from the node's IPAM allocations, and pods the CNI plugin
    wired that the desired state does not show yet are kept, closed where a policy might apply.
    When neither the desired state nor the allocations changed since the last run, the state
    rendered then is used as it is: rendering is a pure function of both.
    """
    allocations = local_allocations(opts.state_dir)
    reading = started.finish()
    node = _rendered(opts, reading, allocations)
    _commit(opts, reading)
    return DesiredRead(reading, node)


def _commit(opts: Options, reading: Reading) -> None:
    if reading.dirty:
        from weft.desired import sources
        sources.commit(opts.state_dir, reading)


def _rendered(opts: Options, reading: Reading, allocations: list[Any],
              bird: RenderedNode | None = None) -> RenderedNode:
    """The render for these allocations: the cached one, or made and cached. `bird`: a render of
    the same read whose BIRD configuration holds (it does not depend on the allocations; making
    it again could ask the API server for Secrets)."""
    addressed = _allocations_digest(allocations)
    host = _host_interfaces(opts)       # host endpoints named by expectedIPs resolve on these
    key = reading.token + ":" + hashlib.sha256(repr((opts.bird_socket, opts.bird_log, addressed,
                                                     opts.dataplane, host)).encode()).hexdigest()[:16]
    node = RenderedNode.from_data(reading.cache.rendered_for(opts.node, key))
    if node is not None:
        return node
    # Only a run with something to render needs the model, the converters and the renderers.
    from weft.desired.loader import ENDPOINT_KINDS
    from weft.model.cluster import Endpoint
    from weft.model.kernel import ipsets_from_data
    from weft.renderers.endpoint import make_snapshot
    from weft.renderers.iptables import render_node_sets
    from weft.store.ipam import node_ipam_document
    addresses = {f"{a.namespace}/{a.pod}": tuple(a.ips) for a in allocations}
    pending = tuple(Endpoint(a.namespace, a.pod, opts.node, a.iface, tuple(a.ips)) for a in allocations)
    # What set members are computed from: every endpoint (as addressed here) and namespace.
    basis = f"{reading.cache.basis(ENDPOINT_KINDS)}:{opts.node}:{addressed}"
    # Only pods, namespaces and policies changed since a last render this one can be made from?
    diff = _since_last(opts, reading, key, addresses)
    last_render = functools.cache(lambda: _last_render(opts, reading))      # decoded once, if at all
    quick = None if bird is not None or diff is None else \
        _without_state(opts, reading, pending, key, addresses, addressed, diff, last_render())
    if quick is not None:
        node, data = quick
        reading.cache.keep_render(opts.node, key, data, basis)
        reading.dirty = True
        return node
    state = reading.state()
    if state.warnings:      # fields of Calico's kinds weft does not use: reported once per change, not refused
        opts.observer.warning(f"fields weft does not use, ignored: {'; '.join(state.warnings)}")
    state = state.with_local_addresses(opts.node, addresses).with_host_interfaces(opts.node, host)
    if any(p.nat_outgoing for p in state.ippools):       # natOutgoing's rules follow the node's iptables
        state = state.with_node_features(opts.node, _nat_features(opts))
    for name in state.unresolved_host_endpoints(opts.node):
        opts.observer.warning(f"host endpoint {name}: no interface of this node holds one of its expectedIPs: "
                              f"not policed")
    last = reading.cache.last_render(opts.node, basis)
    try:
        reuse = ipsets_from_data(last["dataplane"]["ipsets"]) if last else None
    except (KeyError, TypeError, ValueError):
        reuse = None
    ebpf = opts.dataplane == "ebpf" or opts.dataplane == "auto" and state.felix_settings(opts.node).bpf_enabled
    made = None if reuse is not None or ebpf or diff is None else \
        _incremental(state, opts.node, pending, diff, last_render())
    if made is None:
        from weft.renderers.incremental import address_counts
        made = (*render_node_sets(state, opts.node, pending, reuse), address_counts(state.endpoints))
    dataplane, meanings, counts = made
    bpf = None
    if ebpf:
        from weft.renderers.bpf_policy import host_dataplane, render_bpf
        from weft.renderers.bpf_services import unserved
        for line in unserved(state, opts.node):     # no service silently does nothing
            opts.observer.warning(line)
        bpf = render_bpf(state, opts.node, pending)
        dataplane = host_dataplane(dataplane)
    bird_config = bird.bird_config if bird is not None else _bird_config(opts, state)
    me = state.nodes.get(opts.node)
    ipam = node_ipam_document(opts.node, state.ippools, state.blocks, opts.source(), dict(me.labels) if me else {})
    snapshot = make_snapshot(state, opts.node, dataplane, key)
    if bpf is not None:                 # the plugin writes a new pod's entry (reconciler.bpf.program_endpoint)
        from weft.renderers.bpf_policy import cni_snapshot
        snapshot["bpf"] = cni_snapshot(bpf, state.local_endpoints(opts.node))
    node = RenderedNode(dataplane, state.ignored_kinds, snapshot, bird_config, ipam, addressed, bpf)
    kept = _render_data(node, None, None, None) if ebpf else \
        _render_data(node, meanings, counts, state.local_endpoints(opts.node))
    reading.cache.keep_render(opts.node, key, kept, basis)
    reading.dirty = True
    return node


def _nat_features(opts: Options) -> dict[str, bool]:
    """Felix's detected NAT features of this node's iptables (probes.backend.nat_features)."""
    from weft.probes.backend import detect, nat_features
    from weft.probes.runner import Runner
    runner = Runner()
    return nat_features(runner, detect(runner, opts.backend))


def _host_interfaces(opts: Options) -> dict[str, tuple[str, ...]]:
    """This node's interfaces and their addresses (probes.hostaddrs); none when netlink cannot
    be read (then only host endpoints naming their interface are policed, with a warning each)."""
    from weft.probes.hostaddrs import host_interface_addresses
    try:
        return host_interface_addresses()
    except OSError as exc:
        opts.observer.warning(f"this node's addresses cannot be read ({exc}): host endpoints named by "
                              f"expectedIPs are not policed")
        return {}


def _since_last(opts: Options, reading: Reading, key: str, addresses: dict[str, tuple[str, ...]]) -> Any:
    """The pods, namespaces and policies changed since the last render (renderers.incremental's
    EndpointChanges), when nothing else changed and that render was made with the same options
    and allocations (the part of its key after the read's token); else None. Only the changed
    groups are decoded."""
    have = reading.cache.rendered.get(opts.node, ("", None))[0]
    if not have or have.partition(":")[2] != key.partition(":")[2]:
        return None
    changes = reading.cache.changes_since_load()
    return None if changes is None else _endpoint_changes(*changes, opts.node, addresses)


def _last_render(opts: Options, reading: Reading) -> tuple[dict, RenderedNode, Any, Any] | None:
    """The last render (its data, the node, its address counts, this node's pods as rendered) if
    a render can be made from it: the loaded cache file holds it with the very objects it was
    rendered from, for the iptables plane."""
    from collections import Counter

    from weft.model.cluster import Endpoint
    previous = reading.cache.previous_render(opts.node)
    last = RenderedNode.from_data(previous)
    if last is None or last.bpf is not None or not isinstance(previous, dict):
        return None
    addresses, local = previous.get("addresses"), previous.get("local")
    if not (isinstance(local, list | tuple) and all(isinstance(e, Endpoint) and e.node == opts.node for e in local)):
        local = None
    return previous, last, Counter(addresses.split()) if isinstance(addresses, str) else None, local


def _render_data(node: RenderedNode, meanings: dict | None, counts: Any, local: Any) -> dict:
    """What the cache keeps of a render: the node, and what a later render made from it needs
    (renderers.incremental: what its sets mean, how many pods hold each address, this node's pods)."""
    return node.to_data() | {"sets": meanings, "addresses": None if counts is None else " ".join(counts.elements()),
                             "local": None if local is None else tuple(local)}


def _without_state(opts: Options, reading: Reading, pending: tuple[Any, ...], key: str,
                   addresses: dict[str, tuple[str, ...]], addressed: str, diff: Any,
                   found: tuple[dict, RenderedNode, Any, Any] | None) -> tuple[RenderedNode, dict] | None:
    """The render made from the last one without assembling the whole desired state (decoding
    every cached pod). When only pods and namespaces' labels changed, BIRD's configuration and
    the IPAM document are the last render's, and only the sets the changed pods (and the pods of
    the relabelled namespaces, which are decoded) were or are selected by change
    (renderers.incremental). When none of this node's pods is among them, the chains and the CNI
    snapshot (but its token) are the last render's too, and only namespaces and service accounts
    are decoded besides; otherwise everything but the other nodes' pods is (this node's pods are
    kept with the render), and this node's chains are rendered. Policies changed (added, changed
    or removed): likewise everything but the other nodes' pods is decoded, and the chains are
    rendered, every unchanged policy's chain and every set taken from the last render; a set of a
    selector that render lacks needs every pod (None then). From the API server, the policies of
    namespaces holding none of this node's pods are not decoded either, unless a global policy
    changed (see `keep`). None when that does not hold."""
    if opts.dataplane == "ebpf" or found is None or found[2] is None or found[3] is None or found[1].snapshot is None:
        return None
    if any(v is None for v in diff.namespaces.values()):
        return None                                   # a namespace came: the snapshot names every one
    cache = reading.cache
    kinds: frozenset[str] = frozenset().union(*cache.kinds.values()) if cache.kinds else frozenset()
    if kinds & {"NetworkSet", "GlobalNetworkSet", "HostEndpoint"}:
        return None
    previous, last, counts, local = found
    touched = set(diff.namespaces)
    # The pods of the relabelled namespaces: an API read groups them by kind and namespace; a
    # manifest dir's groups are blocks of a file's documents, any namespace's, and a block can
    # hold one of those pods only if its text holds the namespace's name as encoded (model.codec
    # writes a string the same way wherever it is). A block holding the name for another reason
    # is decoded for nothing: only those namespaces' pods are taken from what is decoded.
    from weft.model.codec import CodecError, dumps
    by_namespace = cache.source.startswith("api:")
    needles = [] if by_namespace else [dumps(n).encode() for n in sorted(touched)]
    changed = {e.key for e in diff.old} | {e.key for e in diff.new}
    mine = {e.key: e for e in local if e.key not in changed} | {e.key: e for e in diff.new if e.node == opts.node}
    # This node's pods are among the changed ones, or in a relabelled namespace, or policies
    # changed: its chains change (they are rendered from every policy and this node's pods).
    whole = any(e.node == opts.node for e in diff.old + diff.new) or any(e.namespace in touched for e in local) \
        or bool(diff.policies)
    # From the API server, when no global policy changed: a namespaced policy selects only its
    # namespace's pods, so the policies of a namespace holding none of this node's pods (known or
    # wired by the CNI plugin) nor a changed policy cannot change this node's chains, and their
    # groups are not decoded; what the CNI snapshot says of such a namespace is the last render's
    # (and their unused Calico fields, reported when they changed, are not reported again).
    from weft.desired.loader import POLICY_KINDS
    closed_before = (last.snapshot or {}).get("closed")
    keep: set[str] | None = None
    if by_namespace and all(p.namespace is not None for p in diff.policies) \
            and isinstance(closed_before, dict) and all(isinstance(v, list) and len(v) == 2 and
                                                        all(isinstance(b, bool) for b in v)
                                                        for v in closed_before.values()):
        keep = {e.namespace for e in mine.values()} | {e.namespace for e in pending} | \
            {str(p.namespace) for p in diff.policies} | touched

    def wanted(group: Any, kinds: frozenset[str]) -> bool:
        if kinds & {"Namespace", "ServiceAccount"}:
            return True
        if keep is not None and kinds and kinds <= POLICY_KINDS and isinstance(group, tuple) and len(group) == 3 \
                and group[2] is not None and group[2] not in keep:
            return False
        if whole and kinds != frozenset({"Pod"}):
            return True
        if not touched or "Pod" not in kinds:
            return False
        if by_namespace:
            return isinstance(group, tuple) and len(group) == 3 and group[2] in touched
        text = bytes(cache.blobs[group])            # (a slice of the loaded file)
        return any(needle in text for needle in needles)
    from weft.desired.kinds.kubernetes import BUILTIN_NAMESPACES, NAMESPACE_NAME_LABEL
    from weft.desired.loader import Converted, assemble
    from weft.model.cluster import ClusterState, Endpoint, Namespace, ServiceAccount
    from weft.model.errors import InvalidDesiredState
    from weft.renderers.incremental import rerender
    try:
        read = _converted({g: cache.group(g) for g in cache.blobs if wanted(g, cache.kinds.get(g, frozenset()))})
    except (CodecError, ValueError, TypeError, RecursionError):
        return None
    if read is None or not all(isinstance(c, Converted) for c in read[0].values()):
        return None
    if whole:
        try:
            state = assemble(read[0].values(), read[1])
        except InvalidDesiredState:
            return None                               # the whole state's checks say what is wrong
        if any(p.nat_outgoing for p in state.ippools):    # its chains are rendered: as `_rendered` does
            state = state.with_node_features(opts.node, _nat_features(opts))
    else:
        namespaces = {n: Namespace(n, {NAMESPACE_NAME_LABEL: n}) for n in BUILTIN_NAMESPACES}
        namespaces |= {c.name: c.value for c in read[0].values() if c.kind == "Namespace" and c.value is not None}
        accounts = [c.value for c in read[0].values() if c.kind == "ServiceAccount" and c.value is not None]
        if not all(isinstance(n, Namespace) for n in namespaces.values()) or \
                not all(isinstance(a, ServiceAccount) for a in accounts):
            return None
        state = ClusterState(namespaces, (), (), {},
                             service_accounts=tuple(sorted(accounts, key=lambda a: (a.namespace, a.name))))
    # Of the pods: those of the relabelled namespaces, and when this node's chains are rendered,
    # this node's (as kept with the last render, changed as read now).
    decoded = [c.value for c in read[0].values() if c.kind == "Pod" and c.value is not None]
    if not all(isinstance(e, Endpoint) for e in decoded):
        return None
    pods = {e.key: e for e in decoded if e.namespace in touched} | (mine if whole else {})
    if any(e.namespace not in state.namespaces for e in pods.values()) or touched - set(state.namespaces):
        return None                                   # the whole state's checks say what is wrong
    endpoints = tuple(sorted(pods.values(), key=lambda e: (e.namespace, e.pod)))
    state = replace(state, endpoints=endpoints).with_local_addresses(opts.node, addresses)
    if not whole and any(e.node == opts.node for e in state.endpoints):
        return None
    made = rerender(state, opts.node, pending, last.dataplane, previous.get("sets"), diff, counts, partial=True)
    if made is None:
        return None
    if state.warnings and diff.policies:              # as a render from the whole state reports them
        opts.observer.warning(f"fields weft does not use, ignored: {'; '.join(state.warnings)}")
    dataplane, meanings, counts = made
    if whole:
        from weft.renderers.endpoint import make_snapshot
        snapshot = make_snapshot(state, opts.node, dataplane, key)
        if keep is not None:                          # the namespaces whose policies were not decoded
            assert isinstance(closed_before, dict)
            if any(n not in keep and n not in closed_before for n in snapshot["closed"]):
                return None
            snapshot["closed"] = {n: v if n in keep else closed_before[n] for n, v in snapshot["closed"].items()}
    else:
        snapshot = {**(last.snapshot or {}), "token": key}
    node = RenderedNode(dataplane, last.ignored, snapshot, last.bird_config, last.ipam, addressed, None)
    return node, _render_data(node, meanings, counts, state.local_endpoints(opts.node) if whole else local)


def _incremental(state: ClusterState, node: str, pending: tuple[Any, ...], diff: Any,
                 found: tuple[dict, RenderedNode, Any, Any] | None) -> tuple[Any, dict[str, tuple], Any] | None:
    """The render made from the last one (`found`: `_last_render`) when only pods and namespaces
    changed since (`diff`: renderers.incremental), or None."""
    if found is None:
        return None
    from weft.renderers.incremental import rerender
    previous, last, counts, _local = found
    return rerender(state, node, pending, last.dataplane, previous.get("sets"), diff, counts)


def _endpoint_changes(before: dict, now: dict, node: str, addresses: dict[str, tuple[str, ...]]) -> Any:
    """The pods, namespaces and policies (Kubernetes' and Calico's) that differ between the objects
    of the changed groups as loaded (`before`) and now, or None when anything else changed (or a
    group is not what a read keeps)."""
    from weft.desired.kinds.kubernetes import BUILTIN_NAMESPACES, NAMESPACE_NAME_LABEL
    from weft.desired.loader import POLICY_KINDS
    from weft.model.cluster import Endpoint, Namespace, Policy
    from weft.renderers.incremental import EndpointChanges
    one, other = _converted(before), _converted(now)
    if one is None or other is None or one[1] != other[1]:      # an ignored kind came or went
        return None
    was, has = one[0], other[0]
    old: list[Endpoint] = []
    new: list[Endpoint] = []
    namespaces: dict[str, Namespace | None] = {}
    policies: list[Policy] = []
    for k in was.keys() | has.keys():
        a, b = was.get(k), has.get(k)
        if a is not None and b is not None and a.value == b.value:
            continue
        either = a if a is not None else b
        assert either is not None           # k is a key of one of them
        kind = either.kind
        for entry, into in ((a, old), (b, new)):
            value = None if entry is None else entry.value
            if kind == "Pod" and value is not None:
                if not isinstance(value, Endpoint):
                    return None
                if value.node == node and value.key in addresses:
                    value = replace(value, ips=addresses[value.key])
                into.append(value)
        if kind == "Namespace":
            name = either.name
            value = None if a is None else a.value
            if value is None and name in BUILTIN_NAMESPACES:
                value = Namespace(name, {NAMESPACE_NAME_LABEL: name})
            if not (value is None or isinstance(value, Namespace)):
                return None
            namespaces[name] = value
        elif kind in POLICY_KINDS:
            for entry in (a, b):
                value = None if entry is None else entry.value
                if value is not None and not isinstance(value, Policy):
                    return None
                if value is not None:
                    policies.append(value)
        elif kind != "Pod":
            return None
    return EndpointChanges(tuple(old), tuple(new), namespaces, tuple(policies))


def _converted(groups: dict) -> tuple[dict, list[str]] | None:
    """Every converted object in `groups` (of either source's layout: an API read's objects by
    identity, a manifest dir's documents) by identity, and the names of the ignored kinds met;
    None on anything unexpected (two objects of one identity, a value of an unknown type)."""
    from weft.desired.loader import Converted
    found: dict[tuple, Any] = {}
    ignored: list[str] = []
    stack: list[Any] = list(groups.values())
    while stack:
        value = stack.pop()
        if isinstance(value, Converted):
            k = (value.api_version, value.kind, value.namespace, value.name)
            if k in found:
                return None
            found[k] = value
        elif isinstance(value, str):
            ignored.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif is_dataclass(value) and not isinstance(value, type) and hasattr(value, "entries"):
            stack.append(value.entries)             # a manifest document: its objects
        else:
            return None
    return found, sorted(ignored)


def _bird_config(opts: Options, state: ClusterState) -> str | None:
    me = state.nodes.get(opts.node)
    if me is None or me.bgp is None:
        return None
    return desired_config(_with_peer_secrets(opts, state), opts.node, opts.state_dir, opts.bird_socket,
                          opts.bird_log)


def _with_peer_secrets(opts: Options, state: ClusterState) -> ClusterState:
    """BGP passwords: from the API server weft reads only the Secrets peers and the mesh refer to."""
    if opts.from_dir:
        return state
    from weft.desired.kinds.bgp import fetch_secrets, password_refs
    if not password_refs(state):
        return state
    from weft.desired.api import connect
    from weft.desired.sources import API_PROFILE
    with connect(opts.kubeconfig, opts.context, keep=opts.state_dir / API_PROFILE) as api:
        return replace(state, secrets=state.secrets + fetch_secrets(api, password_refs(state)))


# ---- plan ---------------------------------------------------------------------------------------

@dataclass
class _Begun:
    """The read finished, the kernel read (before any lock), and what is needed to judge it."""
    desired: DesiredRead
    backend: Any
    resources: list[engine.AnyResource]
    found: engine.Found
    marker: dict[str, Any]              # the write marker as the dumps began ({"running": ...}: a run held the lock)


def _begin(opts: Options, state_dir: StateDir, runner: Runner, destroy: bool) -> _Begun:
    """Start the read (from the API server it runs in a child process), then the kernel's dumps;
    the dumps are parsed (and fingerprinted) in a worker while the read is finished. The
    desired state is valid before anything else happens."""
    from weft.desired import sources
    marker = _read_marker(state_dir)
    if _held_exclusively(state_dir):
        marker = {"running": True}           # a run is writing: the dumps cannot be trusted
    reading: AbstractContextManager[Any] = nullcontext() if destroy else \
        sources.start(opts.state_dir, opts.from_dir, opts.kubeconfig, opts.context, warn=opts.observer.warning)
    with reading as started, gc_paused():
        backend, resources = engine.kernel_resources(runner, opts.backend, _bpf_plane(opts, destroy))
        probing = engine.start_probe(resources, runner)
        with ThreadPoolExecutor(1, thread_name_prefix="weft-probe") as pool:
            found = pool.submit(probing)
            try:
                desired = DesiredRead(None, DESTROYED) if destroy else read_desired(opts, started)
            except BaseException:
                found.exception()       # no dump outlives a failed read; the read's error is the one
                raise
            result = found.result()
    return _Begun(desired, backend, resources, result, marker)


def _bpf_plane(opts: Options, destroy: bool) -> Any:
    """The node's eBPF plane as a resource: wanted on an eBPF node, removed anywhere else."""
    from weft.reconciler.bpf import BpfPlane
    from weft.reconciler.bpf_apply import node_pin_dir
    return BpfPlane(node_pin_dir(opts.state_dir), enabled=opts.dataplane == "ebpf" and not destroy)


def _planned(opts: Options, state_dir: StateDir, runner: Runner, begun: _Begun, check: bool) -> engine.Planned:
    """Diff every resource; BIRD is one where BGP is on for this node (its probe is small and
    is made now, once the desired state says so)."""
    resources, have = list(begun.resources), dict(begun.found.have)
    if begun.desired.node.bird_config is not None:
        bird = Bird(state_dir, opts.bird_socket, runner)
        resources.append(bird)
        have[bird.name] = bird.probe()
    return engine.plan(resources, begun.backend, have, begun.desired.node, check=check, prints=begun.found.prints)


def _document(opts: Options, planned: engine.Planned, node: RenderedNode, destroy: bool) -> Plan:
    return Plan(opts.node, os.path.abspath(opts.state_dir), opts.source(), destroy, planned.backend.name,
                planned.fingerprint(), planned.summary(), planned.sections(), node.ignored,
                tuple(planned.text_blocks()))


def make_plan(opts: Options, runner: Runner, destroy: bool = False, check: bool = True) -> Plan:
    """What apply would do now (read only: no lock, no kernel write). `check`: run `bird -p` on a
    changed BIRD configuration (a configuration BIRD would reject is an error)."""
    return plan_and_drift(opts, runner, destroy, check)[0]


def plan_and_drift(opts: Options, runner: Runner, destroy: bool = False,
                   check: bool = True) -> tuple[Plan, list[dict[str, str]]]:
    state_dir = StateDir(opts.state_dir)
    with opts.observer.phase("read"):
        begun = _begin(opts, state_dir, runner, destroy)
    with opts.observer.phase("diff"):
        planned = _planned(opts, state_dir, runner, begun, check)
    return _document(opts, planned, begun.desired.node, destroy), planned.drift_items()


# ---- apply --------------------------------------------------------------------------------------

def apply(opts: Options, runner: Runner, saved: dict[str, Any] | None = None, saved_path: str = "",
          destroy: bool = False) -> Plan:
    """Plan and apply under the node lock, then verify what was touched. With `saved` (a plan
    document from `weft plan --out`), apply only if the plan made now is exactly that one."""
    state_dir = StateDir(opts.state_dir)
    if saved is not None:
        target = Plan(opts.node, os.path.abspath(opts.state_dir), opts.source(), destroy, "", "", {}, {})
        check_target(saved, target, saved_path)
    observe = opts.observer
    with observe.phase("read"):
        begun = _begin(opts, state_dir, runner, destroy)
    with ExitStack() as held:
        with observe.phase("lock"):
            held.enter_context(state_dir.lock(shared=False, timeout=opts.lock_timeout))
        return _apply_locked(opts, state_dir, runner, begun, saved, saved_path, destroy)


def _apply_locked(opts: Options, state_dir: StateDir, runner: Runner, begun: _Begun, saved: dict[str, Any] | None,
                  saved_path: str, destroy: bool) -> Plan:
    observe = opts.observer
    with observe.phase("diff"):
        unchanged = begun.marker is not None and begun.marker == _read_marker(state_dir)
        confirming = engine.start_confirm(begun.resources, begun.found.have, runner)
        handoff = None
        if begun.desired.reading is not None:
            begun.desired.node = _with_current_allocations(opts, begun.desired)
            handoff = _ipam_handoff(opts, begun.desired)
            begun.desired.reading = None        # the desired objects are not needed any more: free them
        planned = _planned(opts, state_dir, runner, begun, check=True)
        if not (unchanged and confirming()):
            # Another run, or a CNI step, wrote since the dumps were made: read again, now.
            begun.backend, begun.resources = engine.kernel_resources(runner, opts.backend, _bpf_plane(opts, destroy))
            begun.found = engine.start_probe(begun.resources, runner)()
            planned = _planned(opts, state_dir, runner, begun, check=True)
    if saved is not None:
        check_same(saved, _document(opts, planned, begun.desired.node, destroy), saved_path)
    if not planned.empty:
        _write_marker(state_dir)
        with observe.phase("apply"):
            engine.execute(planned, runner)
        with observe.phase("verify"):
            leftover = engine.verify(planned, runner)
        if any(leftover.values()):
            s = replace(planned, changes=leftover).summary()
            raise WeftError(f"after apply the kernel still differs from the plan: {s['add']} missing, "
                            f"{s['change']} different, {s['destroy']} unexpected; see `weft drift`")
    engine.settle(planned)
    with observe.phase("handoff"):
        _leave_for_cni(opts, begun.desired.node, handoff)
    # The document last: its JSON and text need not coexist with the writes' input and read-back.
    return _document(opts, planned, begun.desired.node, destroy)


def _with_current_allocations(opts: Options, desired: DesiredRead) -> RenderedNode:
    """The render for the pods the CNI plugin allocated addresses to up to now (under the lock:
    no pod is half-added while the run writes)."""
    assert desired.reading is not None
    allocations = local_allocations(opts.state_dir)
    if _allocations_digest(allocations) == desired.node.allocations:
        return desired.node
    node = _rendered(opts, desired.reading, allocations, bird=desired.node)
    _commit(opts, desired.reading)
    return node


def _read_marker(state_dir: StateDir) -> dict[str, Any]:
    try:
        data = state_dir.read_json(MARKER, 4096)
    except CorruptState:
        return {"corrupt": True}
    return data if isinstance(data, dict) else {}


def _write_marker(state_dir: StateDir) -> None:
    """Before a run's first write: a run that read the kernel before it took the lock then knows
    that its read may have seen these writes half done."""
    import json
    state_dir.replace(MARKER, json.dumps({"format": 1, "token": uuid.uuid4().hex}) + "\n")


def _held_exclusively(state_dir: StateDir) -> bool:
    """Does a run hold the node lock now (it may be writing)? A shared lock is tried, not waited for."""
    try:
        with state_dir.lock(shared=True, timeout=0):
            return False
    except UnsafeState:
        raise
    except WeftError:
        return True


def _ipam_handoff(opts: Options, desired: DesiredRead) -> tuple[Any, ...] | None:
    """The IPAM pools, blocks and node labels to write for the CNI plugin, or None when its
    node.json already says what this render does."""
    node = desired.node
    if node.ipam is None or desired.reading is None or _ipam_current(opts.state_dir, node.ipam):
        return None
    state = desired.reading.state()
    me = state.nodes.get(opts.node)
    return state.ippools, state.blocks, dict(me.labels) if me else {}


def _leave_for_cni(opts: Options, node: RenderedNode, ipam: tuple[Any, ...] | None) -> None:
    """Leave the CNI plugin what it needs, once the kernel matches the state it describes: the
    snapshot to program a new pod's policy, and the pools and blocks it allocates from."""
    if node.snapshot is None:
        return
    from weft.reconciler.endpoint import load_snapshot, save_snapshot
    current = load_snapshot(opts.state_dir)
    if current is None or current.get("token") != node.snapshot.get("token"):
        save_snapshot(opts.state_dir, node.snapshot)
    if ipam is not None:
        from weft.store.ipam import write_node_ipam
        pools, blocks, labels = ipam
        write_node_ipam(opts.state_dir, opts.node, pools, blocks, opts.source(), labels)


def _ipam_current(state_dir: Path, doc: dict[str, Any]) -> bool:
    """Does node.json already say what `doc` does (store.ipam.write_node_ipam would not change it;
    blocks the plugin claimed since are kept there, as it keeps them)?"""
    from weft.store.ipam import IpamError, read_node_ipam
    try:
        old = read_node_ipam(state_dir)
    except IpamError:
        return False
    if not old or old.get("node") != doc.get("node"):
        return False
    known = {b["cidr"] for b in doc.get("blocks", ())}
    claimed = [b for b in old.get("blocks", ())
               if isinstance(b, dict) and b.get("claimed") and b.get("cidr") not in known]
    return {k: v for k, v in old.items() if k != "written"} == doc | {"blocks": doc.get("blocks", []) + claimed}


__all__ = ["Options", "PlanError", "apply", "desired_state", "make_plan", "plan_and_drift", "read_desired"]
