"""One reconcile run: read desired state, probe the kernel, render, diff, apply, verify."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock, Timeout

from weft.model import codec
from weft.model.errors import WeftError
from weft.model.kernel import EMPTY, Dataplane
from weft.probes.backend import Backend, detect, other_has_weft
from weft.probes.dataplane import probe_dataplane, start_probe
from weft.probes.runner import Runner
from weft.reconciler import bird
from weft.reconciler.apply import execute, verify
from weft.reconciler.diff import diff
from weft.reconciler.endpoint import LOCK_FILE, load_snapshot, save_snapshot
from weft.reconciler.plan import Plan, PlanError
from weft.store.cache import gc_paused
from weft.store.statedir import default_state_dir  # noqa: F401  (re-exported for callers)


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


@dataclass(frozen=True)
class Desired:
    """What this node should have: the dataplane, the kinds ignored on the way, and the
    snapshot a CNI ADD needs to program a new pod alone (renderers.endpoint)."""
    dataplane: Dataplane
    ignored: tuple[str, ...] = ()
    snapshot: dict | None = None            # renderers.endpoint.make_snapshot
    bird_config: str | None = None      # None: BGP is off for this node (BIRD is left alone)
    ipam: tuple = ()                    # (pools, blocks, node labels): what the CNI plugin allocates from


codec.register(Desired)          # kept in the desired-state cache as the node's last render


def local_allocations(state_dir: Path) -> list:
    """The addresses this node's IPAM gave its pods (the CNI plugin's records)."""
    from weft.store.ipam import read_allocations
    # An inactive record is an old sandbox of the pod whose interface a newer one took over.
    return [a for a in read_allocations(state_dir) if a.active]


def desired_state(opts: Options, destroy: bool = False, started=None) -> Desired:
    """The desired dataplane of this node.

    Local pods take their addresses from the node's IPAM allocations, and pods the CNI plugin
    wired that the desired state does not show yet are kept, closed where a policy might
    apply. When neither the desired state nor the allocations changed since the last run, the
    dataplane rendered then is used as it is: rendering is a pure function of both.
    """
    from weft.desired import sources
    if destroy:
        return Desired(EMPTY)
    allocations = local_allocations(opts.state_dir)
    started = started or sources.start(opts.state_dir, opts.from_dir, opts.kubeconfig, opts.context)
    reading = started.finish()
    addressed = hashlib.sha256(repr(sorted((a.namespace, a.pod, a.iface, tuple(a.ips))
                                           for a in allocations)).encode()).hexdigest()[:16]
    key = reading.token + ":" + hashlib.sha256(repr((opts.bird_socket, addressed)).encode()).hexdigest()[:16]
    desired = reading.cache.rendered_for(opts.node, key)
    if desired is None:
        # Only a run with something to render needs the model, the converters and the renderers.
        from weft.desired.loader import ENDPOINT_KINDS
        from weft.model.cluster import Endpoint
        from weft.renderers.endpoint import make_snapshot
        from weft.renderers.iptables import render_node
        state = reading.state()
        addresses = {f"{a.namespace}/{a.pod}": tuple(a.ips) for a in allocations}
        state = state.with_local_addresses(opts.node, addresses)
        pending = tuple(Endpoint(a.namespace, a.pod, opts.node, a.iface, tuple(a.ips)) for a in allocations)
        # What set members are computed from: every endpoint (as addressed here) and namespace.
        basis = f"{reading.cache.basis(ENDPOINT_KINDS)}:{opts.node}:{addressed}"
        last = reading.cache.last_render(opts.node, basis)
        dataplane = render_node(state, opts.node, pending, last.dataplane.ipsets if last else None)
        state = _with_peer_secrets(opts, state)
        me = state.nodes.get(opts.node)
        desired = Desired(dataplane, state.ignored_kinds, make_snapshot(state, opts.node, dataplane, key),
                          bird.desired_config(state, opts.node, opts.state_dir, opts.bird_socket),
                          (state.ippools, state.blocks, dict(me.labels) if me else {}))
        reading.cache.keep_render(opts.node, key, desired, basis)
        reading.dirty = True
    if reading.dirty:
        sources.commit(opts.state_dir, reading)
    return desired


def _with_peer_secrets(opts: Options, state):
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


def make_plan(opts: Options, runner: Runner, destroy: bool = False) -> Plan:
    return _plan_and_probe(opts, runner, destroy)[0]


def _plan_and_probe(opts: Options, runner: Runner, destroy: bool) -> tuple[Plan, Dataplane, Desired]:
    """Validate the desired state before touching the kernel at all, then compare."""
    from weft.desired import sources
    # The read begins first (from the API server it runs in a child process), then the kernel's
    # dumps; the dumps are parsed (and fingerprinted) in a worker while the read is finished.
    reading = nullcontext() if destroy else sources.start(opts.state_dir, opts.from_dir, opts.kubeconfig, opts.context)
    with reading as started, gc_paused():
        backend = detect(runner, opts.backend)
        # weft's chains left in the other backend (a run with the other --iptables-backend) still
        # filter packets: they are read too, and never desired, so the plan removes them.
        others = [b for b in (other_has_weft(runner, backend),) if b]
        probing = start_probe(runner, backend, others)
        with ThreadPoolExecutor(1, thread_name_prefix="weft-probe") as pool:
            parsed = pool.submit(_parsed, probing)
            try:
                desired = desired_state(opts, destroy, started)
            except BaseException:
                parsed.exception()          # no dump outlives a failed read; the read's error is the one
                raise
            actual, fingerprint = parsed.result()
    if destroy:
        # A running pod's wiring (its route, its interface settings) belongs to the pod: it goes
        # with the pod (CNI DEL), not with weft's policy. Routes to pods that are gone do go.
        live = {dst: r for dst, r in actual.routes.items() if r.dev in actual.links}
        desired = Desired(Dataplane({}, {}, {}, live, actual.links))
    bird_change = bird.plan_config(desired.bird_config, opts.state_dir, opts.bird_socket)
    plan = Plan(opts.node, backend.name, fingerprint, diff(desired.dataplane, actual), desired.ignored,
                bird_change)
    return plan, actual, desired


def _parsed(probing) -> tuple[Dataplane, str]:
    actual = probing()
    return actual, actual.fingerprint()


def lock(opts: Options) -> FileLock:
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(opts.state_dir / LOCK_FILE), timeout=opts.lock_timeout)


def apply(opts: Options, runner: Runner, plan_file: Plan | None = None, destroy: bool = False) -> Plan:
    """Apply a fresh plan (or exactly `plan_file`), under the node's lock; verify the result."""
    try:
        with lock(opts):
            desired = None
            if plan_file is None:
                plan, before, desired = _plan_and_probe(opts, runner, destroy)
                backend = Backend(plan.backend)
            else:
                plan = plan_file
                if plan.node != opts.node:
                    raise PlanError(f"the plan is for node {plan.node!r}, not {opts.node!r}")
                backend = detect(runner, plan.backend)
                before = probe_dataplane(runner, backend, [b for b in (other_has_weft(runner, backend),) if b])
                if before.fingerprint() != plan.base_fingerprint:
                    raise PlanError("the saved plan is stale: the kernel state changed since it was made; "
                                    "run `weft plan` again")
                plan = _with_current_bird(opts, plan)
            if plan.bird is not None:
                bird.check_bird(plan.bird)      # a config BIRD rejects stops the run before any change
            if not plan.changes.empty:
                execute(plan.changes, backend, runner)
                leftover = verify(runner, backend, before, plan.changes)
                if not leftover.empty:
                    s = leftover.summary()
                    raise WeftError(f"after apply the kernel still differs from the plan: {s['add']} missing, "
                                    f"{s['change']} different, {s['destroy']} unexpected; see `weft drift`")
            if plan.bird is not None:
                runner.writes.extend(bird.apply_bird(plan.bird, opts.bird_socket))
            _leave_for_cni(opts, desired)
            return plan
    except Timeout as exc:
        raise WeftError(f"another weft run holds {exc.lock_file}; gave up after {opts.lock_timeout:g}s") from exc


def _with_current_bird(opts: Options, plan: Plan) -> Plan:
    """A saved plan carries BIRD's file with passwords redacted: render it again, and refuse the
    plan if what it would write, or what it would replace, is no longer what was planned."""
    if plan.bird is None:
        return plan
    current = bird.plan_config(desired_state(opts).bird_config, opts.state_dir, opts.bird_socket)
    now = replace(plan, bird=current, bird_sha=None).bird_digests()
    if current is None or now != plan.bird_digests():
        raise PlanError("the saved plan is stale: BIRD's configuration (the live file or the desired one) "
                        "changed since it was made; run `weft plan` again")
    return replace(plan, bird=current, bird_sha=None)


def _leave_for_cni(opts: Options, desired: Desired | None) -> None:
    """Leave the CNI plugin what it needs, once the kernel matches the state it describes: the
    snapshot to program a new pod's policy, and the pools and blocks it allocates from."""
    if desired is None or desired.snapshot is None:
        return
    current = load_snapshot(opts.state_dir)
    if current is None or current.get("token") != desired.snapshot["token"]:
        save_snapshot(opts.state_dir, desired.snapshot)
    from weft.store.ipam import source_of, write_node_ipam
    pools, blocks, labels = desired.ipam
    write_node_ipam(opts.state_dir, opts.node, pools, blocks,
                    source_of(opts.from_dir, opts.kubeconfig, opts.context), labels)

