"""One iptables table as a resource: weft's `weft-*` chains and its hook rules in built-in chains.

A resource per table label: "filter" is the IPv4 family's table (iptables) of the backend this
run uses, "filter6" the IPv6 family's (ip6tables' filter table), "nat", "mangle6", "raw", ... the
other tables weft writes; "filter@legacy" (or "nat6@nft", "raw@legacy", ...) holds weft's
leftovers in that table of the other backend (probes.backend.other_weft_tables), which still
filter, rewrite or mark packets and are never wanted, so the plan removes them. A label is the
kernel's table name, a "6" for the IPv6 family, and "@<backend>" for the other backend. Plan text
and JSON name a table by its label.

A table's changes are one `iptables-restore --noflush` transaction: changed chains are declared
(which flushes them) and refilled, removed chains emptied and deleted, hook rules fixed; the
kernel takes all of it or none. For the run's own backend that transaction commits the IP sets'
GROW step (its failure undoes it). A table whose only changes are removals goes in SHRINK, after
the routes of the pods it protected.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from weft.model.kernel import Chain, Hooks
from weft.probes import iptables as probe
from weft.probes.backend import Backend
from weft.probes.runner import KernelCommandError
from weft.reconciler.diff import line_items, rule_lines
from weft.reconciler.ipsets import SetChange, replaced
from weft.reconciler.resource import (
    Action,
    DriftItem,
    Phase,
    ProbeSession,
    Problem,
    Resource,
    Restore,
    Step,
    digest,
)
from weft.renderers.rules import FROM_DISPATCH, TO_DISPATCH

if TYPE_CHECKING:
    from weft.reconciler.rendered import RenderedNode

VERIFY_ONE_BY_ONE = 40      # up to this many changed chains and hooks, read back just those
# The chains the CNI plugin's per-pod steps change (under the shared node lock): a pod's dispatch
# rules come and go together with its own two chains.
SHARED_WRITERS_CHANGE = (FROM_DISPATCH, TO_DISPATCH)


@dataclass(frozen=True)
class TableState:
    chains: Mapping[str, Chain] = field(default_factory=dict)     # weft-* chains by name
    hooks: Mapping[str, Hooks] = field(default_factory=dict)      # weft's rules by built-in chain


@dataclass(frozen=True)
class ChainChange:
    table: str                       # the table label ("filter", "filter@legacy")
    name: str
    action: Action                   # create / update / delete
    rules: tuple[str, ...] = ()      # the desired rules (empty for delete)
    previous: tuple[str, ...] = ()   # what the kernel has now
    about: str = ""
    releases: tuple[str, ...] = ()   # replaced sets its present rules name: it is emptied first


@dataclass(frozen=True)
class HookChange:
    table: str
    chain: str                       # a built-in chain
    action: Action
    rules: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()
    previous_at_top: bool = True     # whether the kernel has weft's rules first in the chain


TableChange = ChainChange | HookChange


def kernel_table(label: str) -> tuple[str, int]:
    """(the kernel's table name, the IP family) of a table label: "filter6@legacy" -> ("filter", 6)."""
    base = label.partition("@")[0]
    return (base[:-1], 6) if base.endswith("6") else (base, 4)


def names_set(rule: str, set_name: str) -> bool:
    return f"--match-set {set_name} " in rule


class Table(Resource[TableState, TableChange]):
    """`label`: "filter" or "filter@<backend>"; `backend`: whose tools read and write it."""

    def __init__(self, label: str, backend: Backend, main: bool) -> None:
        self.name = label
        self.table, self.family = kernel_table(label)
        self.backend = backend.in_family(self.family)
        self.main = main             # the run's own backend: its transaction commits the sets' step

    def sections(self) -> tuple[str, ...]:
        return ("chains", "hooks")

    def start_probe(self, session: ProbeSession) -> Callable[[], TableState]:
        if self.table != "filter" and not probe.table_may_exist(self.backend.name, self.table, self.family):
            return lambda: TableState()    # reading a legacy table would create it: nothing of weft's there
        dump = session.start([*self.backend.save, "-t", self.table])
        return lambda: self._parse(dump.result())

    def _parse(self, save: str) -> TableState:
        chains, hooks = probe.parse_save(save, self.table, self.name)
        return TableState({n: c for (_t, n), c in chains.items()}, {c: h for (_t, c), h in hooks.items()})

    def want(self, node: RenderedNode) -> TableState:
        dp = node.dataplane
        return TableState({n: c for (t, n), c in dp.chains.items() if t == self.name},
                          {c: h for (t, c), h in dp.hooks.items() if t == self.name})

    def diff(self, want: TableState, have: TableState,
             earlier: Mapping[str, tuple[Any, ...]]) -> tuple[TableChange, ...]:
        set_changes: tuple[SetChange, ...] = earlier.get("ipsets", ())
        renewed = replaced(set_changes)
        changes: list[TableChange] = []
        for name, w in sorted(want.chains.items()):
            h = have.chains.get(name)
            if h is None:
                changes.append(ChainChange(self.name, name, Action.CREATE, w.rules, (), w.about))
                continue
            # A replaced set is a new kernel object: rules naming it must be loaded again.
            releases = tuple(sorted(s for s in renewed if any(names_set(r, s) for r in h.rules)))
            if h.rules != w.rules or releases or any(names_set(r, s) for s in renewed for r in w.rules):
                changes.append(ChainChange(self.name, name, Action.UPDATE, w.rules, h.rules, w.about, releases))
        for name, h in sorted(have.chains.items()):
            if name not in want.chains:
                releases = tuple(sorted(s for s in renewed if any(names_set(r, s) for r in h.rules)))
                changes.append(ChainChange(self.name, name, Action.DELETE, (), h.rules, "", releases))
        for chain in sorted(set(want.hooks) | set(have.hooks)):
            wh, hh = want.hooks.get(chain), have.hooks.get(chain)
            if wh == hh:
                continue
            action = Action.CREATE if hh is None else Action.DELETE if wh is None else Action.UPDATE
            changes.append(HookChange(self.name, chain, action, wh.rules if wh else (), hh.rules if hh else (),
                                      hh.at_top if hh else True))
        return tuple(changes)

    def describe(self, change: TableChange) -> list[str]:
        c = change
        if isinstance(c, HookChange):
            head = f"  # weft's rules in built-in chain {c.table}/{c.chain} will be {c.action.verb}"
            return [head, f"  {c.action.symbol} hook {c.table}/{c.chain} {{", *rule_lines(c.previous, c.rules),
                    "    }", ""]
        head = f"  # chain {c.table}/{c.name} will be {c.action.verb}" + (f"  ({c.about})" if c.about else "")
        return [head, f"  {c.action.symbol} chain {c.table}/{c.name} {{", *rule_lines(c.previous, c.rules),
                "    }", ""]

    def to_json(self, change: TableChange) -> tuple[str, dict[str, Any]]:
        return ("hooks" if isinstance(change, HookChange) else "chains"), asdict(change)

    def steps(self, changes: tuple[TableChange, ...], phase: Phase) -> list[Step]:
        if not changes:
            return []
        if phase is Phase.PREPARE:
            emptied = [c.name for c in changes if isinstance(c, ChainChange) and c.releases]
            if not emptied:
                return []
            text = f"*{self.table}\n" + "".join(f":{n} - [0:0]\n" for n in emptied) + "COMMIT\n"
            return [Step(Restore(tuple(self.backend.restore), text),
                         f"{' '.join(self.backend.restore)} (chains that refer to replaced sets, emptied)")]
        if phase is Phase.GROW:
            return [Step(Restore(tuple(self.backend.restore), restore_input(self.table, changes)),
                         f"{' '.join(self.backend.restore)} (table {self.name})", commits=self.main)]
        return []

    def start_verify(self, have: TableState, changes: tuple[TableChange, ...],
                     session: ProbeSession) -> Callable[[], tuple[TableChange, ...]]:
        chains = {c.name for c in changes if isinstance(c, ChainChange)}
        hooks = {c.chain for c in changes if isinstance(c, HookChange)}
        expected = _restricted(simulate(have, changes), chains, hooks)
        if len(chains) + len(hooks) > VERIFY_ONE_BY_ONE:
            dump = session.start([*self.backend.save, "-t", self.table])
            return lambda: self.diff(expected, _restricted(self._parse(dump.result()), chains, hooks), {})
        reads = {name: session.start([*self.backend.list_chain, "-t", self.table, "-S", name])
                 for name in sorted(chains | hooks)}

        def finish() -> tuple[TableChange, ...]:
            found_chains: dict[str, Chain] = {}
            found_hooks: dict[str, Hooks] = {}
            for name, pending in reads.items():
                try:
                    text = pending.result()
                except KernelCommandError as exc:
                    if exc.missing:
                        continue
                    raise
                state = self._parse(probe.as_save(text, self.table))
                found_chains.update((n, c) for n, c in state.chains.items() if n == name)
                found_hooks.update((n, h) for n, h in state.hooks.items() if n == name)
            leftover = self.diff(expected, _restricted(TableState(found_chains, found_hooks), chains, hooks), {})
            if not leftover:
                return leftover
            # A per-chain read can misreport (iptables-nft calls some chains "incompatible"): a
            # full dump has the last word before an apply is declared failed.
            full = self._parse(session.runner.run([*self.backend.save, "-t", self.table]))
            return self.diff(expected, _restricted(full, chains, hooks), {})
        return finish

    def drift_items(self, change: TableChange) -> list[DriftItem]:
        c = change
        if isinstance(c, HookChange):
            name = f"{c.table}/{c.chain}"
            items = line_items("hook", name, c.previous, c.rules)
            if c.rules and set(c.rules) <= set(c.previous) and not c.previous_at_top:
                items.append({"kind": "hook", "name": name, "rule": c.rules[0], "problem": Problem.NOT_FIRST.value})
            return items
        name = f"{c.table}/{c.name}"
        if c.action is Action.CREATE:
            return [{"kind": "chain", "name": name, "problem": Problem.MISSING.value}]
        if c.action is Action.DELETE:
            return [{"kind": "chain", "name": name, "problem": Problem.UNEXPECTED.value}]
        return line_items("rule", name, c.previous, c.rules)

    def fingerprint(self, have: TableState) -> str:
        parts = [f"chain {n}\n" + "\n".join(c.rules) for n, c in sorted(have.chains.items())]
        parts += [f"hooks {n} {h.at_top}\n" + "\n".join(h.rules) for n, h in sorted(have.hooks.items())]
        return digest(self.name, *parts)

    def start_confirm(self, have: TableState, session: ProbeSession) -> Callable[[], bool]:
        """The CNI plugin's per-pod steps add or remove a pod's dispatch rules together with its
        chains: the dispatch chains as they are now tell whether such a step came since `have`."""
        if self.table in ("nat", "mangle", "raw"):
            return lambda: True            # only apply writes these tables (the CNI plugin only filter)
        reads = {name: session.start([*self.backend.list_chain, "-t", self.table, "-S", name])
                 for name in SHARED_WRITERS_CHANGE}

        def finish() -> bool:
            for name, pending in reads.items():
                try:
                    text = pending.result()
                except KernelCommandError as exc:
                    if not exc.missing:
                        raise
                    text = None
                now = self._parse(probe.as_save(text, self.table)).chains.get(name) if text is not None else None
                if now != have.chains.get(name):
                    return False
            return True
        return finish


def restore_input(table: str, changes: tuple[TableChange, ...]) -> str:
    """The iptables-restore input for one table's changes (one transaction)."""
    lines = [f"*{table}"]
    written = [c for c in changes if isinstance(c, ChainChange)]
    lines.extend(f":{c.name} - [0:0]" for c in written)            # declaring flushes
    for c in written:
        lines.extend(c.rules)
    for h in changes:
        if not isinstance(h, HookChange):
            continue
        lines.extend("-D" + r[2:] for r in h.previous)               # "-A X ..." -> "-D X ..."
        lines.extend(f"-I {h.chain} {i + 1}" + r[2 + len(h.chain) + 1:] for i, r in enumerate(h.rules))
    lines.extend(f"-X {c.name}" for c in written if c.action is Action.DELETE)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def simulate(have: TableState, changes: tuple[TableChange, ...]) -> TableState:
    """The table `changes` should leave. Pure."""
    chains = dict(have.chains)
    hooks = dict(have.hooks)
    for c in changes:
        if isinstance(c, HookChange):
            if c.rules:
                hooks[c.chain] = Hooks(c.table, c.chain, c.rules, True)
            else:
                hooks.pop(c.chain, None)
        elif c.action is Action.DELETE:
            chains.pop(c.name, None)
        else:
            chains[c.name] = Chain(c.table, c.name, c.rules)
    return TableState(chains, hooks)


def _restricted(state: TableState, chains: set[str], hooks: set[str]) -> TableState:
    return TableState({n: c for n, c in state.chains.items() if n in chains},
                      {n: h for n, h in state.hooks.items() if n in hooks})
