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

from desired.errors import WeftError
from probes.backend import Backend, detect
from probes.runner import KernelCommandError, Runner
from renderers.rules import FROM_DISPATCH, TABLE, TO_DISPATCH, chain_lines, pending_specs

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


def add_endpoint(state_dir, namespace: str, pod: str, iface: str, ips: tuple[str, ...] = ()) -> None:
    """Make sure the pod's policy is in the kernel before it runs; raise WeftError if not."""
    runner = Runner()
    with node_lock(state_dir, shared=True):
        backend = _backend(runner)
        from_lines = _listing(runner, backend, FROM_DISPATCH)
        if from_lines is None:
            _first_run(state_dir, runner)            # weft never ran here: put its base in place
            from_lines = _listing(runner, backend, FROM_DISPATCH)
        to_lines = _listing(runner, backend, TO_DISPATCH)
        have_from = _dispatch_rules(from_lines, "-i", iface)
        have_to = _dispatch_rules(to_lines, "-o", iface)
        fw, tw = f"weft-fw-{iface}", f"weft-tw-{iface}"
        if have_from and have_to and _listing(runner, backend, fw) is not None \
                and _listing(runner, backend, tw) is not None:
            return                                   # a reconcile run already programmed this pod
        chains = endpoint_chains(load_snapshot(state_dir), namespace, pod, iface)
        lines = [f"*{TABLE}"] + [f":{name} - [0:0]" for name in chains]
        for rules in chains.values():
            lines.extend(rules)
        if not have_from:
            lines.append(f'-I {FROM_DISPATCH} 1 -i {iface} -m comment --comment "weft:cni" -g {fw}')
        if not have_to:
            lines.append(f'-I {TO_DISPATCH} 1 -o {iface} -m comment --comment "weft:cni" -g {tw}')
        lines.append("COMMIT")
        runner.run(backend.restore, "\n".join(lines) + "\n", writes=True)


def remove_endpoint(state_dir, iface: str) -> None:
    """Remove the pod's chains and dispatch rules; nothing to do is fine (idempotent)."""
    runner = Runner()
    with node_lock(state_dir, shared=True):
        backend = _backend(runner)
        stale = [("-D" + ln[2:]) for chain, flag in ((FROM_DISPATCH, "-i"), (TO_DISPATCH, "-o"))
                 for ln in _dispatch_rules(_listing(runner, backend, chain), flag, iface)]
        existing = [c for c in (f"weft-fw-{iface}", f"weft-tw-{iface}") if _listing(runner, backend, c) is not None]
        if not stale and not existing:
            return
        lines = [f"*{TABLE}", *stale, *(f":{c} - [0:0]" for c in existing), *(f"-X {c}" for c in existing),
                 "COMMIT"]
        runner.run(backend.restore, "\n".join(lines) + "\n", writes=True)


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
    from desired.model import ClusterState
    from reconciler.apply import execute
    from reconciler.diff import diff
    from renderers.dataplane import Dataplane
    from renderers.iptables import render_node

    backend = _backend(runner)
    with node_lock(state_dir, shared=False, name="base.lock"):   # two first ADDs: one sets up
        if _listing(runner, backend, FROM_DISPATCH) is not None:
            return
        base = render_node(ClusterState(namespaces={}, endpoints=(), policies=(), nodes={}), "")
        execute(diff(base, Dataplane({}, {}, {})), backend, runner)
