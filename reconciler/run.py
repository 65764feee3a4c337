"""One reconcile run: read desired state, probe the kernel, render, diff, apply, verify."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from desired.errors import WeftError
from probes import probe_dataplane, probe_some, start_probe
from probes.backend import Backend, detect, other_has_weft, table_backend
from probes.runner import Runner
from reconciler.apply import execute
from reconciler.diff import CREATE, DELETE, REPLACE, UPDATE, Changes, diff
from reconciler.plan import Plan, PlanError
from renderers.dataplane import EMPTY, Chain, Dataplane, Hooks, IpSet
from renderers.iptables import render_node


@dataclass(frozen=True)
class Options:
    node: str
    state_dir: Path
    from_dir: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    backend: str = "auto"
    lock_timeout: float = 300.0


def desired_dataplane(opts: Options, destroy: bool = False) -> tuple[Dataplane, tuple[str, ...]]:
    """What this node should have, and the kinds of objects that were ignored.

    When the desired state did not change since the last run (same token), the dataplane
    rendered then is used as it is: rendering is a pure function of the state.
    """
    from desired import sources
    if destroy:
        return EMPTY, ()
    reading = sources.read(opts.state_dir, opts.from_dir, opts.kubeconfig, opts.context)
    rendered = reading.cache.rendered_for(opts.node)
    if rendered is None:
        state = reading.state()
        rendered = (render_node(state, opts.node), state.ignored_kinds)
        reading.cache.rendered[opts.node] = (reading.token, rendered)
        reading.dirty = True
    if reading.dirty:
        sources.commit(opts.state_dir, reading)
    return rendered


def make_plan(opts: Options, runner: Runner, destroy: bool = False) -> Plan:
    return _plan_and_probe(opts, runner, destroy)[0]


def _plan_and_probe(opts: Options, runner: Runner, destroy: bool) -> tuple[Plan, Dataplane]:
    """Validate the desired state before touching the kernel at all, then compare."""
    backend = detect(runner, opts.backend)
    # weft's chains left in the other backend (a run with the other --iptables-backend) still
    # filter packets: they are read too, and never desired, so the plan removes them.
    others = [b for b in (other_has_weft(runner, backend),) if b]
    probing = start_probe(runner, backend, others)   # the dumps run while the desired state is read
    try:
        desired, ignored = desired_dataplane(opts, destroy)
    except BaseException:
        _reap(probing)
        raise
    actual = probing()
    return Plan(opts.node, backend.name, actual.fingerprint(), diff(desired, actual), ignored), actual


def lock(opts: Options) -> FileLock:
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(opts.state_dir / "weft.lock"), timeout=opts.lock_timeout)


def apply(opts: Options, runner: Runner, plan_file: Plan | None = None, destroy: bool = False) -> Plan:
    """Apply a fresh plan (or exactly `plan_file`), under the node's lock; verify the result."""
    try:
        with lock(opts):
            if plan_file is None:
                plan, before = _plan_and_probe(opts, runner, destroy)
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
            if plan.changes.empty:
                return plan
            execute(plan.changes, backend, runner)
            leftover = verify(runner, backend, before, plan.changes)
            if not leftover.empty:
                raise WeftError(f"after apply the kernel still differs from the plan in "
                                f"{len(leftover.chains)} chains, {len(leftover.sets)} sets, "
                                f"{len(leftover.hooks)} hook chains; see `weft drift`")
            return plan
    except Timeout as exc:
        raise WeftError(f"another weft run holds {exc.lock_file}; gave up after {opts.lock_timeout:g}s") from exc


VERIFY_ONE_BY_ONE = 40      # up to this many changed items, read back just those


def verify(runner: Runner, backend: Backend, before: Dataplane, changes: Changes) -> Changes:
    """What still differs from what `changes` should have made of `before` (empty when all landed)."""
    expected = simulate(before, changes)
    elsewhere = {table_backend(c.table, backend) for c in (*changes.chains, *changes.hooks)} - {backend}
    if elsewhere or len(changes.chains) + len(changes.sets) + len(changes.hooks) > VERIFY_ONE_BY_ONE:
        return diff(expected, probe_dataplane(runner, backend, sorted(elsewhere, key=lambda b: b.name)))
    chains = {(c.table, c.name) for c in changes.chains}
    sets = {s.name for s in changes.sets}
    hooks = {(h.table, h.chain) for h in changes.hooks}
    after = probe_some(runner, backend, [n for _t, n in chains], sets, [c for _t, c in hooks])
    expected = Dataplane({k: v for k, v in expected.chains.items() if k in chains},
                         {k: v for k, v in expected.ipsets.items() if k in sets},
                         {k: v for k, v in expected.hooks.items() if k in hooks})
    return diff(expected, after)


def _reap(probing) -> None:
    """Wait for started dumps so no child outlives a failed read."""
    try:
        probing()
    except Exception:  # noqa: BLE001 - the read's own error is the one to report
        pass


def simulate(actual: Dataplane, changes: Changes) -> Dataplane:
    """The kernel state `changes` should produce from `actual`. Pure."""
    sets = dict(actual.ipsets)
    for s in changes.sets:
        if s.action in (CREATE, REPLACE):
            sets[s.name] = IpSet(s.name, s.type, frozenset(s.add), s.family)
        elif s.action == UPDATE:
            old = sets[s.name]
            sets[s.name] = IpSet(s.name, s.type, (old.members - set(s.remove)) | set(s.add), s.family)
        else:
            sets.pop(s.name, None)
    chains = dict(actual.chains)
    for c in changes.chains:
        if c.action == DELETE:
            chains.pop((c.table, c.name), None)
        else:
            chains[(c.table, c.name)] = Chain(c.table, c.name, c.rules)
    hooks = dict(actual.hooks)
    for h in changes.hooks:
        if h.rules:
            hooks[(h.table, h.chain)] = Hooks(h.table, h.chain, h.rules, True)
        else:
            hooks.pop((h.table, h.chain), None)
    return Dataplane(chains, sets, hooks)


def default_state_dir() -> Path:
    return Path(os.environ.get("WEFT_STATE_DIR", "/var/lib/weft"))
