"""Reading back everything weft owns in this network namespace: chains, hook rules, sets,
routes and interface settings, as a Dataplane."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from weft.model.kernel import Dataplane
from weft.probes import ipsets, iptables
from weft.probes.backend import Backend, table_label
from weft.probes.routes import start_route_probe
from weft.probes.runner import KernelCommandError, Runner

TABLE = "filter"


def start_probe(runner: Runner, backend: Backend, others: Iterable[Backend] = ()) -> Callable[[], Dataplane]:
    """Start reading weft's chains, hook rules and sets; call the result to get them.

    The dumps run at once, and the caller can read the desired state meanwhile. Chains of
    `others` (backends this run does not use) come under tables labelled "filter@<backend>".
    """
    rules = {b: runner.start(b.save + ["-t", TABLE]) for b in (backend, *others)}
    sets = runner.start(["ipset", "save"])
    routing = start_route_probe(runner)

    def finish() -> Dataplane:
        chains, hooks = {}, {}
        for b, pending in rules.items():
            found, found_hooks = iptables.parse_save(pending.result(), TABLE, table_label(TABLE, b, backend))
            chains.update(found)
            hooks.update(found_hooks)
        routes, links, occupied = routing()
        return Dataplane(chains, ipsets.parse_save(sets.result()), hooks, routes, links, occupied)
    return finish


def probe_dataplane(runner: Runner, backend: Backend, others: Iterable[Backend] = ()) -> Dataplane:
    return start_probe(runner, backend, others)()


def probe_some(runner: Runner, backend: Backend, chains: Iterable[str], sets: Iterable[str],
               builtin: Iterable[str]) -> Dataplane:
    """Only the named chains, sets and built-in chains (a few ms each, against a full dump)."""
    chain_reads = {name: runner.start(backend.list_chain + ["-t", TABLE, "-S", name]) for name in chains}
    builtin_reads = {name: runner.start(backend.list_chain + ["-t", TABLE, "-S", name]) for name in builtin}
    set_reads = {name: runner.start(["ipset", "save", name]) for name in sets}
    found_chains, hooks, found_sets = {}, {}, {}
    for pending in chain_reads.values():
        text = _unless_missing(pending)
        if text is not None:
            found_chains.update(iptables.parse_save(iptables.as_save(text, TABLE), TABLE)[0])
    for name, pending in builtin_reads.items():
        hook = iptables.parse_save(iptables.as_save(pending.result(), TABLE), TABLE)[1].get((TABLE, name))
        if hook is not None:
            hooks[(TABLE, name)] = hook
    for pending in set_reads.values():
        text = _unless_missing(pending)
        if text is not None:
            found_sets.update(ipsets.parse_save(text))
    return Dataplane(found_chains, found_sets, hooks)


def _unless_missing(pending) -> str | None:
    try:
        return pending.result()
    except KernelCommandError as exc:
        if exc.missing:
            return None
        raise

