"""One pod's policy, programmed at creation (CNI ADD) and removed at deletion (DEL).

The CNI plugin calls these; they must be quick and must never race a reconcile run:
- the node lock (store.statedir.StateDir.lock) is taken in shared mode: pods being added at once
  do not wait for each other (each touches only its own two chains and inserts its own dispatch
  rules, atomically), while a reconcile run, which holds it exclusively, is never interleaved
  with them;
- if a reconcile run already programmed the pod (it knew the pod was scheduled here: the
  interface name is fixed in advance), there is nothing to do;
- otherwise the pod's chains are rendered from the snapshot the last run left (store.snapshot,
  renderers.endpoint): exactly its policy when that is known, closed where a policy might apply
  and is not known, closed in both directions when there is no usable snapshot.
Each function takes a list of pods: the CNI fast path (cni.fastpath) hands it the pods of
concurrent calls, which share one iptables-restore, and its DispatchCache, which spares the
listing of the dispatch chains while nothing else changed the ruleset.
"""
from __future__ import annotations

from weft.probes.backend import Backend, detect
from weft.probes.netlink import nft_generation
from weft.probes.runner import KernelCommandError, Runner
from weft.reconciler.bpf_pins import pinned
from weft.renderers.endpoint import endpoint_chains
from weft.renderers.rules import FROM_DISPATCH, TABLE, TO_DISPATCH
from weft.store.snapshot import load_snapshot, save_snapshot  # noqa: F401  (save_snapshot: run.py)
from weft.store.statedir import LOCK_FILE, StateDir  # noqa: F401  (LOCK_FILE: run.py)

# Standard library and weft's light modules only: this is on the CNI plugin's hot path.
LOCK_TIMEOUT = 60.0


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


class DispatchCache:
    """What weft's two dispatch chains held when this process last listed or wrote them, and the
    nf_tables ruleset generation of that moment (probes.netlink.nft_generation).

    The generation moves on with every commit to any nf_tables table of the namespace, whoever
    makes it, so while it has not moved the chains are exactly as remembered and need no
    listing: a policy step is then one iptables-restore instead of two `iptables -S` and one
    restore (each a process of ~5 ms of CPU). Read before listing, so a change made while this
    process lists makes the memory stale, never wrong; after this process's own restore, kept
    only if the generation moved by exactly that one commit. Legacy iptables has no generation:
    it is listed every time. The CNI fast path keeps one per process (cni.fastpath.FastPath);
    `lock` is held for a whole step: listing (or not), restore, and what is remembered."""

    def __init__(self) -> None:
        import threading
        self.lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._lines: tuple[list[str], list[str]] = ([], [])

    def get(self, backend: Backend, generation: int | None) -> tuple[list[str], list[str]] | None:
        """The chains' rules (from, to) if nothing was committed since they were remembered."""
        if generation is None or self._key != (backend.name, generation):
            return None
        return list(self._lines[0]), list(self._lines[1])

    def keep(self, backend: Backend, generation: int | None, from_lines, to_lines) -> None:
        """Remember the chains' rules as of `generation` (None, or a chain missing: forget)."""
        if generation is None or from_lines is None or to_lines is None:
            self._key = None
            return
        self._key, self._lines = (backend.name, generation), (list(from_lines), list(to_lines))


def _restore(state_dir, work, pods: list[tuple], cache: DispatchCache | None = None) -> None:
    runner = Runner()
    sd = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    cache = cache if cache is not None else DispatchCache()
    with sd.lock(shared=True, timeout=LOCK_TIMEOUT), cache.lock:
        if pinned(sd.path):                          # an eBPF node: map entries and programs, no chains
            _bpf_step(sd, work, pods, runner)
            return
        backend = _backend(runner)
        generation = nft_generation() if backend.name == "nft" else None
        known = cache.get(backend, generation)
        from_lines: list[str] | None
        to_lines: list[str] | None
        if known is not None:
            from_lines, to_lines = known
        else:
            from_lines = _listing(runner, backend, FROM_DISPATCH)
            if from_lines is None and work is _add_lines:
                _first_run(sd, runner)               # weft never ran here: put its base in place
                generation = None                    # (a commit of its own: not remembered)
                from_lines = _listing(runner, backend, FROM_DISPATCH)
            if from_lines is None:
                cache.keep(backend, None, None, None)
                return                               # weft never ran here: no pod of ours to remove
            to_lines = _listing(runner, backend, TO_DISPATCH)
        lines, from_after, to_after = work(sd, pods, from_lines, to_lines or [])
        if not lines:
            cache.keep(backend, generation, from_lines, to_lines)
            return
        cache.keep(backend, None, None, None)        # until the restore is known to have landed alone
        runner.run(backend.restore, "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n", writes=True)
        if generation is not None and nft_generation() == generation + 1:
            cache.keep(backend, generation + 1, from_after, to_after if to_lines is not None else None)


def _bpf_step(sd: StateDir, work, pods: list[tuple], runner: Runner) -> None:
    """On an eBPF node (reconciler.bpf): ADD writes each pod's endpoint entry (from the snapshot,
    as the iptables step renders its chains from it) and attaches the pinned programs to its veth,
    which must exist (the plugin wires first on such a node); nothing is compiled, and without
    this build's pinned programs it raises (the ADD fails closed). DEL deletes the entry before
    the veth goes."""
    from weft.reconciler import bpf
    if work is _add_lines:
        snap = load_snapshot(sd)
        for iface, namespace, pod in pods:
            bpf.program_endpoint(sd.path, iface, bpf.endpoint_entry(snap, f"{namespace}/{pod}"), runner)
    else:
        for iface, *_ in pods:
            bpf.forget_endpoint(sd.path, iface)


def _add_lines(sd: StateDir, pods: list[tuple], from_lines: list[str], to_lines: list[str]):
    """Each pod's two chains and its dispatch rules, unless a reconcile run already programmed it
    (its dispatch rules exist: a rule can only jump to a chain that exists). Returns the restore's
    lines and the dispatch chains' rules once they are in (from, to)."""
    chains, rules = {}, []
    from_after, to_after = list(from_lines), list(to_lines)
    snap = load_snapshot(sd) if pods else None
    for iface, namespace, pod in pods:
        have_from = _dispatch_rules(from_lines, "-i", iface)
        have_to = _dispatch_rules(to_lines, "-o", iface)
        if have_from and have_to:
            continue
        chains.update(endpoint_chains(snap, namespace, pod, iface))
        if not have_from:
            rule = f'{FROM_DISPATCH} -i {iface} -m comment --comment "weft:cni" -g weft-fw-{iface}'
            rules.append(f"-I {rule.replace(' ', ' 1 ', 1)}")
            from_after.insert(0, f"-A {rule}")
        if not have_to:
            rule = f'{TO_DISPATCH} -o {iface} -m comment --comment "weft:cni" -g weft-tw-{iface}'
            rules.append(f"-I {rule.replace(' ', ' 1 ', 1)}")
            to_after.insert(0, f"-A {rule}")
    lines = [f":{name} - [0:0]" for name in chains]
    for body in chains.values():
        lines.extend(body)
    return lines + rules, from_after, to_after


def _remove_lines(sd: StateDir, pods: list[tuple], from_lines: list[str], to_lines: list[str]):
    """Each pod's dispatch rules, then its chains: declared first (which creates a missing one),
    so that deleting them needs no look-up and cannot fail because one is already gone. Returns
    the restore's lines and the dispatch chains' rules once they are in (from, to)."""
    stale, chains, gone = [], [], set()
    for iface, *_ in pods:
        found = _dispatch_rules(from_lines, "-i", iface) + _dispatch_rules(to_lines, "-o", iface)
        stale += [("-D" + ln[2:]) for ln in found]
        gone.update(found)
        chains += [f"weft-fw-{iface}", f"weft-tw-{iface}"]
    lines = [*stale, *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains)]
    return lines, [ln for ln in from_lines if ln not in gone], [ln for ln in to_lines if ln not in gone]


def add_endpoints(state_dir, pods: list[tuple[str, str, str]], cache: DispatchCache | None = None) -> None:
    """Make sure each pod's policy ((iface, namespace, pod) each) is in the kernel before it runs;
    raise WeftError if not. `cache`: the process's DispatchCache, if it keeps one."""
    _restore(state_dir, _add_lines, pods, cache)


def remove_endpoints(state_dir, pods: list[tuple[str]], cache: DispatchCache | None = None) -> None:
    """Remove each pod's ((iface,) each) chains and dispatch rules; nothing to do is fine."""
    _restore(state_dir, _remove_lines, pods, cache)


def add_endpoint(state_dir, namespace: str, pod: str, iface: str, ips: tuple[str, ...] = ()) -> None:
    """One pod's policy, alone (add_endpoints)."""
    add_endpoints(state_dir, [(iface, namespace, pod)])


def remove_endpoint(state_dir, iface: str) -> None:
    """One pod's chains and dispatch rules, alone (remove_endpoints); idempotent."""
    remove_endpoints(state_dir, [(iface,)])


def check_endpoint(state_dir, namespace: str, pod: str, iface: str) -> list[str]:
    """What is missing of the pod's policy plumbing (empty when all is there)."""
    runner = Runner()
    path = state_dir.path if isinstance(state_dir, StateDir) else state_dir
    if pinned(path):
        from weft.reconciler.bpf import endpoint_problems
        return endpoint_problems(path, iface, runner)
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
    with state_dir.lock(shared=False, timeout=LOCK_TIMEOUT, name="base.lock"):   # two first ADDs: one sets up
        if _listing(runner, backend, FROM_DISPATCH) is not None:
            return
        base = render_node(ClusterState(namespaces={}, endpoints=(), policies=(), nodes={}), "")
        write_base(runner, backend, base)     # through the engine's one apply path (and its guard)
