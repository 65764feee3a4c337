"""One pod's policy, programmed at creation (CNI ADD) and removed at deletion (DEL).

The CNI plugin calls these; they must be quick and must never race a reconcile run:
- the node lock is taken in shared mode: pods being added at once do not wait for each other
  (each touches only its own two chains and inserts its own dispatch rules, atomically), while
  a reconcile run, which holds it exclusively, is never interleaved with them;
- if a reconcile run already programmed the pod (it knew the pod was scheduled here: the
  interface name is fixed in advance), there is nothing to do;
- otherwise the pod's chains come from the snapshot the last run left (renderers.endpoint):
  exactly its policy when that is known, closed where a policy might apply and is not known.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager

from weft.model.errors import WeftError
from weft.probes.backend import Backend, detect
from weft.probes.runner import KernelCommandError, Runner
from weft.renderers.rules import FROM_DISPATCH, TABLE, TO_DISPATCH, chain_lines, pending_specs
from weft.store.groupcommit import Call, GroupCommit, together_or_alone

# Standard library and weft's light modules only: this is on the CNI plugin's hot path.
LOCK_FILE = "weft.lock"
SNAPSHOT_FILE = "endpoints.json"
LOCK_TIMEOUT = 60.0


@contextmanager
def node_lock(state_dir, shared: bool, timeout: float = LOCK_TIMEOUT, name: str = LOCK_FILE):
    """The node lock (the same file and flock the reconcile run holds exclusively)."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WeftError(f"{os.path.join(state_dir, name)}: a weft run held the node lock for "
                                    f"{timeout:g}s") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)                      # closing releases the flock


def save_snapshot(state_dir, snap: dict) -> None:
    """Left by the reconcile run (renderers.endpoint.make_snapshot), replaced atomically."""
    tmp = os.path.join(state_dir, f".{SNAPSHOT_FILE}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(snap, f, separators=(",", ":"))
    os.replace(tmp, os.path.join(state_dir, SNAPSHOT_FILE))


def load_snapshot(state_dir) -> dict | None:
    try:
        with open(os.path.join(state_dir, SNAPSHOT_FILE)) as f:
            snap = json.load(f)
    except (OSError, ValueError):
        return None
    return snap if isinstance(snap, dict) and snap.get("format") == 1 else None


def endpoint_chains(snap: dict | None, namespace: str, pod: str, iface: str) -> dict[str, tuple[str, ...]]:
    """The pod's egress (weft-fw-) and ingress (weft-tw-) chains, as iptables-save lines: as the
    last run rendered them if it knew the pod, else closed where a policy might apply."""
    fw, tw = f"weft-fw-{iface}", f"weft-tw-{iface}"
    known = snap["pods"].get(f"{namespace}/{pod}") if snap else None
    if known:
        return {fw: tuple(known["fw"]), tw: tuple(known["tw"])}
    egress, ingress = (True, True) if snap is None else snap["closed"].get(namespace, snap["default"])
    return {fw: chain_lines(fw, pending_specs(egress)), tw: chain_lines(tw, pending_specs(ingress))}


def _backend(runner: Runner) -> Backend:
    return detect(runner, "auto")


def _listing(runner: Runner, backend: Backend, chain: str) -> list[str] | None:
    """`iptables -S chain` lines, None if the chain does not exist."""
    try:
        out = runner.run(backend.list_chain + ["-t", TABLE, "-S", chain])
    except KernelCommandError as exc:
        if exc.missing:
            return None
        raise
    return [ln for ln in out.splitlines() if ln.startswith("-A ")]


def _dispatch_rules(lines: list[str] | None, flag: str, iface: str) -> list[str]:
    return [ln for ln in lines or () if f" {flag} {iface} " in ln + " "]


def _run_batch(key: tuple[str, str], calls: list[Call]) -> None:
    kind, state_dir = key
    work = _add_lines if kind == "add" else _remove_lines
    together_or_alone(calls, lambda pods: _restore(state_dir, work, pods))


# Pods added or removed at once by one process (the CNI helper's threads) share one listing of
# the dispatch chains and one iptables-restore.
_BATCHES = GroupCommit(_run_batch, linger=True)


def _restore(state_dir: str, work, pods: list[tuple]) -> None:
    runner = Runner()
    with node_lock(state_dir, shared=True):
        backend = _backend(runner)
        from_lines = _listing(runner, backend, FROM_DISPATCH)
        if from_lines is None and work is _add_lines:
            _first_run(state_dir, runner)            # weft never ran here: put its base in place
            from_lines = _listing(runner, backend, FROM_DISPATCH)
        if from_lines is None:
            return                                   # weft never ran here: no pod of ours to remove
        to_lines = _listing(runner, backend, TO_DISPATCH)
        lines = work(state_dir, pods, from_lines, to_lines)
        if lines:
            runner.run(backend.restore, "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n", writes=True)


def _add_lines(state_dir: str, pods: list[tuple], from_lines: list[str], to_lines: list[str]) -> list[str]:
    """Each pod's two chains and its dispatch rules, unless a reconcile run already programmed it
    (its dispatch rules exist: a rule can only jump to a chain that exists)."""
    chains, rules = {}, []
    snap = load_snapshot(state_dir) if pods else None
    for iface, namespace, pod in pods:
        have_from = _dispatch_rules(from_lines, "-i", iface)
        have_to = _dispatch_rules(to_lines, "-o", iface)
        if have_from and have_to:
            continue
        chains.update(endpoint_chains(snap, namespace, pod, iface))
        if not have_from:
            rules.append(f'-I {FROM_DISPATCH} 1 -i {iface} -m comment --comment "weft:cni" -g weft-fw-{iface}')
        if not have_to:
            rules.append(f'-I {TO_DISPATCH} 1 -o {iface} -m comment --comment "weft:cni" -g weft-tw-{iface}')
    lines = [f":{name} - [0:0]" for name in chains]
    for body in chains.values():
        lines.extend(body)
    return lines + rules


def _remove_lines(state_dir: str, pods: list[tuple], from_lines: list[str], to_lines: list[str]) -> list[str]:
    """Each pod's dispatch rules, then its chains: declared first (which creates a missing one),
    so that deleting them needs no look-up and cannot fail because one is already gone."""
    stale, chains = [], []
    for iface, *_ in pods:
        stale += [("-D" + ln[2:]) for ln in _dispatch_rules(from_lines, "-i", iface)]
        stale += [("-D" + ln[2:]) for ln in _dispatch_rules(to_lines, "-o", iface)]
        chains += [f"weft-fw-{iface}", f"weft-tw-{iface}"]
    return [*stale, *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains)]


def add_endpoint(state_dir, namespace: str, pod: str, iface: str, ips: tuple[str, ...] = ()) -> None:
    """Make sure the pod's policy is in the kernel before it runs; raise WeftError if not."""
    _BATCHES.run(("add", str(state_dir)), iface, namespace, pod)


def remove_endpoint(state_dir, iface: str) -> None:
    """Remove the pod's chains and dispatch rules; nothing to do is fine (idempotent)."""
    _BATCHES.run(("remove", str(state_dir)), iface)


def check_endpoint(state_dir, namespace: str, pod: str, iface: str) -> list[str]:
    """What is missing of the pod's policy plumbing (empty when all is there)."""
    runner = Runner()
    backend = _backend(runner)
    problems = []
    for chain, flag in ((FROM_DISPATCH, "-i"), (TO_DISPATCH, "-o")):
        lines = _listing(runner, backend, chain)
        if lines is None:
            problems.append(f"chain {chain} is missing (weft's base chains are not in place)")
        elif not _dispatch_rules(lines, flag, iface):
            problems.append(f"no rule for interface {iface} in chain {chain}")
    for chain in (f"weft-fw-{iface}", f"weft-tw-{iface}"):
        if _listing(runner, backend, chain) is None:
            problems.append(f"chain {chain} (policy of pod {namespace}/{pod}) is missing")
    return problems


def _first_run(state_dir, runner: Runner) -> None:
    """weft's base chains and hooks, for a node where no reconcile run happened yet: without
    them no policy is enforced at all. Pods not in any snapshot stay closed where needed."""
    from weft.model.cluster import ClusterState
    from weft.reconciler.engine import write_base
    from weft.renderers.iptables import render_node

    backend = _backend(runner)
    with node_lock(state_dir, shared=False, name="base.lock"):   # two first ADDs: one sets up
        if _listing(runner, backend, FROM_DISPATCH) is not None:
            return
        base = render_node(ClusterState(namespaces={}, endpoints=(), policies=(), nodes={}), "")
        write_base(runner, backend, base)     # through the engine's one apply path (and its guard)
