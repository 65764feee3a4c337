"""weft's IP sets as a resource: `weft-*` sets, their type, family and members.

Sets are written in two steps around the tables that use them: new and changed sets first
(GROW, before the iptables transaction; undone if that transaction is refused, so the previous
rules keep running against the previous members), sets no longer used last (SHRINK: the kernel
cannot destroy a set a rule refers to). A set of the wrong type is destroyed and made again
(REPLACE); the tables resource empties the chains that refer to it beforehand.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from weft.model.kernel import IpSet
from weft.probes import ipsets as probe
from weft.probes.runner import KernelCommandError
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

if TYPE_CHECKING:
    from weft.reconciler.rendered import RenderedNode

Sets = Mapping[str, IpSet]
RESTORE = ("ipset", "restore")
VERIFY_ONE_BY_ONE = 40          # up to this many changed sets, read back just those


@dataclass(frozen=True)
class SetChange:
    name: str
    action: Action                  # create / update (members) / replace (type) / delete
    type: str
    family: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    about: str = ""


def replaced(changes: tuple[SetChange, ...]) -> frozenset[str]:
    """Sets that become new kernel objects: rules naming them must be loaded again."""
    return frozenset(s.name for s in changes if s.action is Action.REPLACE)


class IpSets(Resource[Sets, SetChange]):
    name = "ipsets"

    def start_probe(self, session: ProbeSession) -> Callable[[], Sets]:
        dump = session.start(["ipset", "save"])
        return lambda: probe.parse_save(dump.result())

    def want(self, node: RenderedNode) -> Sets:
        return node.dataplane.ipsets

    def diff(self, want: Sets, have: Sets, earlier: Mapping[str, tuple[Any, ...]]) -> tuple[SetChange, ...]:
        changes = []
        for name, w in sorted(want.items()):
            h = have.get(name)
            if h is None:
                changes.append(SetChange(name, Action.CREATE, w.type, w.family, tuple(sorted(w.members)), (), w.about))
            elif (h.type, h.family) != (w.type, w.family):
                changes.append(SetChange(name, Action.REPLACE, w.type, w.family, tuple(sorted(w.members)),
                                         tuple(sorted(h.members)), w.about))
            elif h.members != w.members:
                changes.append(SetChange(name, Action.UPDATE, w.type, w.family, tuple(sorted(w.members - h.members)),
                                         tuple(sorted(h.members - w.members)), w.about))
        for name, h in sorted(have.items()):
            if name not in want:
                changes.append(SetChange(name, Action.DELETE, h.type, h.family, (), tuple(sorted(h.members))))
        return tuple(changes)

    def describe(self, change: SetChange) -> list[str]:
        s = change
        head = f"  # ipset {s.name} will be {s.action.verb}" + (f"  ({s.about})" if s.about else "")
        lines = [head, f"  {s.action.symbol} ipset {s.name} ({s.type}) {{"]
        lines += [f"      + {m}" for m in s.add] + [f"      - {m}" for m in s.remove]
        return lines + ["    }", ""]

    def to_json(self, change: SetChange) -> tuple[str, dict[str, Any]]:
        return self.name, asdict(change)

    def steps(self, changes: tuple[SetChange, ...], phase: Phase) -> list[Step]:
        if phase is Phase.GROW:
            before, undo = grow_scripts(changes)
            if not before:
                return []
            return [Step(Restore(RESTORE, before), "ipset restore (new and changed sets)",
                         undo=Restore(RESTORE, undo) if undo else None)]
        if phase is Phase.SHRINK:
            after = "".join(f"destroy {s.name}\n" for s in changes if s.action is Action.DELETE)
            return [Step(Restore(RESTORE, after), "ipset restore (sets no longer used)")] if after else []
        return []

    def start_verify(self, have: Sets, changes: tuple[SetChange, ...],
                     session: ProbeSession) -> Callable[[], tuple[SetChange, ...]]:
        touched = {s.name for s in changes}
        expected = {n: s for n, s in simulate(have, changes).items() if n in touched}
        if len(touched) > VERIFY_ONE_BY_ONE:
            dump = session.start(["ipset", "save"])
            return lambda: self.diff(expected, {n: s for n, s in probe.parse_save(dump.result()).items()
                                                if n in touched}, {})
        reads = {name: session.start(["ipset", "save", name]) for name in sorted(touched)}

        def finish() -> tuple[SetChange, ...]:
            found: dict[str, IpSet] = {}
            for pending in reads.values():
                try:
                    found.update(probe.parse_save(pending.result()))
                except KernelCommandError as exc:
                    if not exc.missing:
                        raise
            return self.diff(expected, found, {})
        return finish

    def drift_items(self, change: SetChange) -> list[DriftItem]:
        s = change
        if s.action is Action.CREATE:
            return [{"kind": "ipset", "name": s.name, "problem": Problem.MISSING.value}]
        if s.action is Action.DELETE:
            return [{"kind": "ipset", "name": s.name, "problem": Problem.UNEXPECTED.value}]
        if s.action is Action.REPLACE:
            return [{"kind": "ipset", "name": s.name, "problem": f"wrong type (want {s.type})"}]
        items = [{"kind": "ipset-member", "name": s.name, "member": m, "problem": Problem.MISSING.value}
                 for m in s.add]
        return items + [{"kind": "ipset-member", "name": s.name, "member": m, "problem": Problem.UNEXPECTED.value}
                        for m in s.remove]

    def fingerprint(self, have: Sets) -> str:
        parts = []
        for n, s in sorted(have.items()):
            parts.append(f"set {n} {s.type} {s.family}\n" + "\n".join(sorted(s.members)))
        return digest(*parts)


def grow_scripts(changes: tuple[SetChange, ...]) -> tuple[str, str]:
    """(the ipset restore input for new, changed and replaced sets, its inverse)."""
    before: list[str] = []
    undo: list[str] = []
    for s in changes:
        if s.action in (Action.CREATE, Action.REPLACE):
            if s.action is Action.REPLACE:
                before.append(f"destroy {s.name}")
            before.append(f"create {s.name} {s.type} family {s.family}")
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.append(f"destroy {s.name}")
        elif s.action is Action.UPDATE:
            before.extend(f"del {s.name} {m}" for m in s.remove)
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.extend(f"del {s.name} {m}" for m in s.add)
            undo.extend(f"add {s.name} {m}" for m in s.remove)
    return _script(before), _script(reversed(undo))


def _script(lines: Any) -> str:
    lines = list(lines)
    return "\n".join(lines) + "\n" if lines else ""


def simulate(have: Sets, changes: tuple[SetChange, ...]) -> dict[str, IpSet]:
    """The sets `changes` should leave. Pure."""
    sets = dict(have)
    for s in changes:
        if s.action in (Action.CREATE, Action.REPLACE):
            sets[s.name] = IpSet(s.name, s.type, frozenset(s.add), s.family)
        elif s.action is Action.UPDATE:
            old = sets[s.name]
            sets[s.name] = IpSet(s.name, s.type, (old.members - set(s.remove)) | set(s.add), s.family)
        else:
            sets.pop(s.name, None)
    return sets
