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
concurrent calls, which share one iptables-restore per IP family, and its DispatchCache, which
spares the listing of the dispatch chains while nothing else changed the ruleset.

A pod's policy goes into the table of each IP family of its addresses (renderers.rules.families_of:
both while none are known), with iptables and ip6tables, listed and restored at once; a family
whose restore fails fails the call (the plugin then undoes the ADD: a pod never runs in a family
whose policy is not in place). Removal looks in both families.
"""
from __future__ import annotations

from weft.probes.backend import Backend, detect, has_ipv6
from weft.probes.netlink import nft_generation
from weft.probes.runner import KernelCommandError, Runner
from weft.renderers.endpoint import endpoint_chains
from weft.renderers.rules import FAMILIES, FROM_DISPATCH, TABLE, TO_DISPATCH, families_of
from weft.store.snapshot import load_snapshot, save_snapshot  # noqa: F401  (save_snapshot: run.py)
from weft.store.statedir import LOCK_FILE, StateDir  # noqa: F401  (LOCK_FILE: run.py)

# Standard library and weft's light modules only: this is on the CNI plugin's hot path.
LOCK_TIMEOUT = 60.0


def _backend(runner: Runner) -> Backend:
    return detect(runner, "auto")


def _listing(runner: Runner, backend: Backend, chain: str) -> list[str] | None:
    """`iptables -S chain` lines, None if the chain does not exist."""
    return _listed(runner.start(backend.list_chain + ["-t", TABLE, "-S", chain]))


def _listed(pending) -> list[str] | None:
    try:
        out = pending.result()
    except KernelCommandError as exc:
        if exc.missing:
            return None
        raise
    return [ln for ln in out.splitlines() if ln.startswith("-A ")]


def _dispatch_listings(runner: Runner, backend: Backend,
                       families) -> dict[int, tuple[list[str] | None, list[str] | None]]:
    """Per family, the two dispatch chains' rules (None where weft's base is not in place), all
    listed at once."""
    started = {f: [runner.start(backend.in_family(f).list_chain + ["-t", TABLE, "-S", chain])
                   for chain in (FROM_DISPATCH, TO_DISPATCH)] for f in families}
    return {f: (_listed(from_dispatch), _listed(to_dispatch)) for f, (from_dispatch, to_dispatch) in started.items()}


def _dispatch_rules(lines: list[str] | None, flag: str, iface: str) -> list[str]:
    return [ln for ln in lines or () if f" {flag} {iface} " in ln + " "]


class DispatchCache:
    """What weft's two dispatch chains held, per IP family, when this process last listed or wrote
    them, and the nf_tables ruleset generation of that moment (probes.netlink.nft_generation).

    The generation moves on with every commit to any nf_tables table of the namespace (ip and ip6
    alike), whoever makes it, so while it has not moved the chains are exactly as remembered and
    need no listing: a policy step is then one iptables-restore per family instead of two
    `iptables -S` and one restore (each a process of ~5 ms of CPU). Read before listing, so a
    change made while this process lists makes the memory stale, never wrong; after this
    process's own restores, kept only if the generation moved by exactly their number of commits.
    Legacy iptables has no generation: it is listed every time. The CNI fast path keeps one per
    process (cni.fastpath.FastPath); `lock` is held for a whole step: listing (or not), restores,
    and what is remembered."""

    def __init__(self) -> None:
        import threading
        self.lock = threading.Lock()
        self._known: dict[int, tuple[tuple[str, int], tuple[list[str], list[str]]]] = {}

    def get(self, backend: Backend, family: int, generation: int | None) -> tuple[list[str], list[str]] | None:
        """`family`'s chains' rules (from, to) if nothing was committed since they were remembered."""
        known = self._known.get(family)
        if generation is None or known is None or known[0] != (backend.name, generation):
            return None
        return list(known[1][0]), list(known[1][1])

    def keep(self, backend: Backend, family: int, generation: int | None, from_lines, to_lines) -> None:
        """Remember `family`'s chains' rules as of `generation` (None, or a chain missing: forget)."""
        if generation is None or from_lines is None or to_lines is None:
            self._known.pop(family, None)
            return
        self._known[family] = ((backend.name, generation), (list(from_lines), list(to_lines)))

    def forget(self) -> None:
        self._known.clear()


def _families(pods: list[tuple], adding: bool) -> list[int]:
    """The families a batch touches: those of the pods' addresses when adding, both when removing;
    IPv6 only where the kernel has it, unless a pod has an IPv6 address (then its step must fail)."""
    wanted = {f for p in pods for f in families_of(p[3])} if adding else set(FAMILIES)
    if not has_ipv6() and not (adding and any(":" in ip for p in pods for ip in p[3])):
        wanted.discard(6)
    return sorted(wanted)


def _restore(state_dir, adding: bool, pods: list[tuple], cache: DispatchCache | None = None) -> None:
    runner = Runner()
    sd = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    cache = cache if cache is not None else DispatchCache()
    with sd.lock(shared=True, timeout=LOCK_TIMEOUT), cache.lock:
        backend = _backend(runner)
        families = _families(pods, adding)
        generation = nft_generation() if backend.name == "nft" else None
        found: dict[int, tuple[list[str] | None, list[str] | None]] = {}
        for family in families:
            known = cache.get(backend, family, generation)
            if known is not None:
                found[family] = known
        unknown = [f for f in families if f not in found]
        if unknown:
            found.update(_dispatch_listings(runner, backend, unknown))
        missing = [f for f in families if found[f][0] is None]
        if adding and missing:
            _first_run(sd, runner, missing)              # weft never ran here (in these families): its base
            generation = None                            # (a commit of its own: not remembered)
            found.update(_dispatch_listings(runner, backend, missing))
        snap = load_snapshot(sd) if adding and pods else None
        writes, after = [], {}
        for family in families:
            from_lines, to_lines = found[family]
            if from_lines is None:
                after[family] = (None, None)             # weft never ran here: no pod of ours to remove
                continue
            if adding:
                lines, from_after, to_after = _add_lines(
                    snap, family, [p for p in pods if family in families_of(p[3])], from_lines, to_lines or [])
            else:
                lines, from_after, to_after = _remove_lines(pods, from_lines, to_lines or [], family)
            after[family] = (from_after, to_after if to_lines is not None else None)
            if lines:
                text = "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n"
                writes.append(runner.start(backend.in_family(family).restore, text, writes=True))
        cache.forget()                                   # until the restores are known to have landed alone
        for write in writes:
            write.result()
        if generation is not None and (not writes or nft_generation() == generation + len(writes)):
            for family, (from_after, to_after) in after.items():
                cache.keep(backend, family, generation + len(writes), from_after, to_after)


def _add_lines(snap: dict | None, family: int, pods: list[tuple], from_lines: list[str], to_lines: list[str]):
    """Each pod's two chains and its dispatch rules in `family`'s table, unless a reconcile run
    already programmed it (its dispatch rules exist: a rule can only jump to a chain that exists).
    Returns the restore's lines and the dispatch chains' rules once they are in (from, to)."""
    chains, rules = {}, []
    from_after, to_after = list(from_lines), list(to_lines)
    for iface, namespace, pod, _ips in pods:
        have_from = _dispatch_rules(from_lines, "-i", iface)
        have_to = _dispatch_rules(to_lines, "-o", iface)
        if have_from and have_to:
            continue
        chains.update(endpoint_chains(snap, namespace, pod, iface, family))
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


def _remove_lines(pods: list[tuple], from_lines: list[str], to_lines: list[str], family: int):
    """Each pod's dispatch rules, then its chains: declared first (which creates a missing one),
    so that deleting them needs no look-up and cannot fail because one is already gone. In the
    IPv6 table only pods it dispatches to (a pod without an IPv6 address has nothing there).
    Returns the restore's lines and the dispatch chains' rules once they are in (from, to)."""
    stale, chains, gone = [], [], set()
    for iface, *_ in pods:
        found = _dispatch_rules(from_lines, "-i", iface) + _dispatch_rules(to_lines, "-o", iface)
        if family != 4 and not found:
            continue
        stale += [("-D" + ln[2:]) for ln in found]
        gone.update(found)
        chains += [f"weft-fw-{iface}", f"weft-tw-{iface}"]
    lines = [*stale, *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains)]
    return lines, [ln for ln in from_lines if ln not in gone], [ln for ln in to_lines if ln not in gone]


def add_endpoints(state_dir, pods: list[tuple[str, str, str, tuple[str, ...]]],
                  cache: DispatchCache | None = None) -> None:
    """Make sure each pod's policy ((iface, namespace, pod, its addresses) each) is in the kernel,
    in each family of its addresses, before it runs; raise WeftError if not. `cache`: the
    process's DispatchCache, if it keeps one."""
    _restore(state_dir, True, pods, cache)


def remove_endpoints(state_dir, pods: list[tuple[str]], cache: DispatchCache | None = None) -> None:
    """Remove each pod's ((iface,) each) chains and dispatch rules; nothing to do is fine."""
    _restore(state_dir, False, pods, cache)


def add_endpoint(state_dir, namespace: str, pod: str, iface: str, ips: tuple[str, ...] = ()) -> None:
    """One pod's policy, alone (add_endpoints); without `ips`, in both families."""
    add_endpoints(state_dir, [(iface, namespace, pod, tuple(ips))])


def remove_endpoint(state_dir, iface: str) -> None:
    """One pod's chains and dispatch rules, alone (remove_endpoints); idempotent."""
    remove_endpoints(state_dir, [(iface,)])


def check_endpoint(state_dir, namespace: str, pod: str, iface: str, ips: tuple[str, ...] = ()) -> list[str]:
    """What is missing of the pod's policy plumbing, in each family of its addresses (empty when
    all is there)."""
    runner = Runner()
    backend = _backend(runner)
    problems = []
    for family in families_of(ips):
        if family == 6 and not ips and not has_ipv6():
            continue
        fam = backend.in_family(family)
        where = "" if family == 4 else " (IPv6)"
        for chain, flag in ((FROM_DISPATCH, "-i"), (TO_DISPATCH, "-o")):
            lines = _listing(runner, fam, chain)
            if lines is None:
                problems.append(f"chain {chain}{where} is missing (weft's base chains are not in place)")
            elif not _dispatch_rules(lines, flag, iface):
                problems.append(f"no rule for interface {iface} in chain {chain}{where}")
        for chain in (f"weft-fw-{iface}", f"weft-tw-{iface}"):
            if _listing(runner, fam, chain) is None:
                problems.append(f"chain {chain}{where} (policy of pod {namespace}/{pod}) is missing")
    return problems


def _first_run(state_dir, runner: Runner, families) -> None:
    """weft's base chains and hooks in `families`, for a node where no reconcile run happened yet
    (in them): without them no policy is enforced at all. Pods not in any snapshot stay closed
    where needed."""
    from weft.model.cluster import ClusterState
    from weft.reconciler.engine import write_base
    from weft.renderers.iptables import render_node

    backend = _backend(runner)
    with state_dir.lock(shared=False, timeout=LOCK_TIMEOUT, name="base.lock"):   # two first ADDs: one sets up
        found = _dispatch_listings(runner, backend, families)
        missing = [f for f in families if found[f][0] is None]
        if not missing:
            return
        base = render_node(ClusterState(namespaces={}, endpoints=(), policies=(), nodes={}), "")
        write_base(runner, backend, base, missing)     # through the engine's one apply path (and its guard)
