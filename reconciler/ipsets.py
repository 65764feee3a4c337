"""weft's IP sets as a resource: `weft-*` sets, their type, family, size and members.

Sets are written in two steps around the tables that use them: new and changed sets first
(GROW, before the iptables transactions; undone if the first of them is refused, so the previous
rules keep running against the previous members), sets no longer used last (SHRINK: the kernel
cannot destroy a set a rule refers to). A set of the wrong type is destroyed and made again
(REPLACE); the tables resource empties the chains that refer to it beforehand.

Sets are sized for their members: ipset's default size (maxelem 65536) refuses the member past
it ("Hash is full"). A set is created with room for half as many members again (`set_size`). A
set whose members outgrow its size is replaced without a window: a new set of the new size is
made under a temporary name (`temp_name`), filled, swapped in (`ipset swap` exchanges the two
atomically; rules refer to the set by name and keep matching, nothing else changes), and the old
one destroyed. That is a REPLACE too, shown with the sizes and only the members that change. A
set made bigger by hand is fine; only one too small for its members is a difference.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from weft.model.kernel import PREFIX, IpSet
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
DEFAULT_MAXELEM = 65536         # ipset's default size; what a set created without one holds
DEFAULT_HASHSIZE = 1024         # ipset's default hash size
MAX_MAXELEM = 1 << 27           # the largest set weft makes (134M members; 150k pods need 262144)


def set_size(members: int) -> tuple[int, int]:
    """(hashsize, maxelem) of a set made to hold `members`: room for half as many again before
    it must be replaced (a power of two, at least ipset's default), and a hash table that needs
    no resize while it is filled (a power of two, about one bucket per two members)."""
    maxelem = max(DEFAULT_MAXELEM, 1 << max(members + members // 2 - 1, 0).bit_length())
    hashsize = max(DEFAULT_HASHSIZE, 1 << max((members + 1) // 2 - 1, 0).bit_length())
    return hashsize, min(maxelem, MAX_MAXELEM)


def temp_name(name: str) -> str:
    """The name a replacement of set `name` is filled under before it is swapped in:
    "weft-s-x" -> "weft-t-s-x" (two characters longer; weft's set names leave room for them)."""
    return f"{PREFIX}t-{name[len(PREFIX):]}"


@dataclass(frozen=True)
class SetChange:
    name: str
    action: Action                  # create / update (members) / replace (type, or size) / delete
    type: str
    family: str
    add: tuple[str, ...] = ()       # create/replace: every member; a resize: the members it gains
    remove: tuple[str, ...] = ()
    about: str = ""
    hashsize: int = 0               # create/replace: the new set's size
    maxelem: int = 0
    resized_from: int = 0           # a resize: the kernel's maxelem now (too small for the members)
    keep: tuple[str, ...] = ()      # a resize: the members it keeps


def replaced(changes: tuple[SetChange, ...]) -> frozenset[str]:
    """Sets that become new kernel objects: rules naming them must be loaded again (a resized set
    is swapped in under its name: rules keep referring to it)."""
    return frozenset(s.name for s in changes if s.action is Action.REPLACE and not s.resized_from)


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
                changes.append(SetChange(name, Action.CREATE, w.type, w.family, tuple(sorted(w.members)), (), w.about,
                                         *set_size(len(w.members))))
            elif (h.type, h.family) != (w.type, w.family):
                changes.append(SetChange(name, Action.REPLACE, w.type, w.family, tuple(sorted(w.members)),
                                         tuple(sorted(h.members)), w.about, *set_size(len(w.members))))
            elif len(w.members) > (h.maxelem or DEFAULT_MAXELEM):
                changes.append(SetChange(name, Action.REPLACE, w.type, w.family, tuple(sorted(w.members - h.members)),
                                         tuple(sorted(h.members - w.members)), w.about, *set_size(len(w.members)),
                                         resized_from=h.maxelem or DEFAULT_MAXELEM,
                                         keep=tuple(sorted(w.members & h.members))))
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
        if s.resized_from:
            size = len(s.keep) + len(s.add)
            return [head, f"  #   {size} members outgrow its maxelem {s.resized_from}: a set of maxelem {s.maxelem} "
                          f"is filled as {temp_name(s.name)} and swapped in (rules keep using it)",
                    f"  {s.action.symbol} ipset {s.name} ({s.type}, maxelem {s.resized_from} -> {s.maxelem}) {{",
                    *[f"      + {m}" for m in s.add], *[f"      - {m}" for m in s.remove],
                    *([f"        ({len(s.keep)} unchanged members)"] if s.keep else []), "    }", ""]
        lines = [head, f"  {s.action.symbol} ipset {s.name} ({s.type}) {{"]
        lines += [f"      + {m}" for m in s.add] + [f"      - {m}" for m in s.remove]
        return lines + ["    }", ""]

    def to_json(self, change: SetChange) -> tuple[str, dict[str, Any]]:
        return self.name, asdict(change)

    def steps(self, changes: tuple[SetChange, ...], phase: Phase) -> list[Step]:
        # A temporary set a resize left (killed between create and destroy) goes before the
        # resize that needs its name, not with the other sets that go.
        temps = {temp_name(s.name) for s in changes if s.resized_from}
        if phase is Phase.GROW:
            before, undo = grow_scripts(changes, temps)
            if not before:
                return []
            return [Step(Restore(RESTORE, before), "ipset restore (new and changed sets)",
                         undo=Restore(RESTORE, undo) if undo else None)]
        if phase is Phase.SHRINK:
            after = "".join(f"destroy {s.name}\n" for s in changes if s.action is Action.DELETE and s.name not in temps)
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
        items = []
        if s.resized_from:
            items.append({"kind": "ipset", "name": s.name, "problem": f"too small (maxelem {s.resized_from}, "
                                                                      f"{len(s.keep) + len(s.add)} members wanted)"})
        elif s.action is Action.REPLACE:
            return [{"kind": "ipset", "name": s.name, "problem": f"wrong type (want {s.type})"}]
        items += [{"kind": "ipset-member", "name": s.name, "member": m, "problem": Problem.MISSING.value}
                  for m in s.add]
        return items + [{"kind": "ipset-member", "name": s.name, "member": m, "problem": Problem.UNEXPECTED.value}
                        for m in s.remove]

    def fingerprint(self, have: Sets) -> str:
        parts = []
        for n, s in sorted(have.items()):
            parts.append(f"set {n} {s.type} {s.family} {s.maxelem}\n" + "\n".join(sorted(s.members)))
        return digest(*parts)


def grow_scripts(changes: tuple[SetChange, ...], temps: frozenset[str] | set[str] = frozenset()) -> tuple[str, str]:
    """(the ipset restore input for new, changed, replaced and resized sets, its inverse).
    `temps`: leftover temporary sets to destroy before a resize makes one again."""
    before: list[str] = [f"destroy {s.name}" for s in changes if s.action is Action.DELETE and s.name in temps]
    undo: list[str] = []
    for s in changes:
        if s.resized_from:
            before += _swap_in(s, (*s.keep, *s.add), s.hashsize, s.maxelem)
            undo += reversed(_swap_in(s, (*s.keep, *s.remove), s.hashsize, s.resized_from))
        elif s.action in (Action.CREATE, Action.REPLACE):
            if s.action is Action.REPLACE:
                before.append(f"destroy {s.name}")
            before.append(_create(s.name, s, s.hashsize, s.maxelem))
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.append(f"destroy {s.name}")
        elif s.action is Action.UPDATE:
            before.extend(f"del {s.name} {m}" for m in s.remove)
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.extend(f"del {s.name} {m}" for m in s.add)
            undo.extend(f"add {s.name} {m}" for m in s.remove)
    return _script(before), _script(reversed(undo))


def _create(name: str, s: SetChange, hashsize: int, maxelem: int) -> str:
    return f"create {name} {s.type} family {s.family} hashsize {hashsize} maxelem {maxelem}"


def _swap_in(s: SetChange, members: tuple[str, ...], hashsize: int, maxelem: int) -> list[str]:
    """A set of `members` and this size made under the temporary name, swapped with the live one,
    and the old one (now under the temporary name) destroyed."""
    temp = temp_name(s.name)
    return [_create(temp, s, hashsize, maxelem), *(f"add {temp} {m}" for m in members),
            f"swap {temp} {s.name}", f"destroy {temp}"]


    def fingerprint(self, have: Sets) -> str:
        parts = []
        for n, s in sorted(have.items()):
            parts.append(f"set {n} {s.type} {s.family}\n" + "\n".join(sorted(s.members)))
        return digest(*parts)


def _script(lines: Any) -> str:
    lines = list(lines)
    return "\n".join(lines) + "\n" if lines else ""


def simulate(have: Sets, changes: tuple[SetChange, ...]) -> dict[str, IpSet]:
    """The sets `changes` should leave. Pure."""
    sets = dict(have)
    for s in changes:
        if s.resized_from:
            sets[s.name] = IpSet(s.name, s.type, frozenset(s.keep) | set(s.add), s.family, maxelem=s.maxelem)
        elif s.action in (Action.CREATE, Action.REPLACE):
            sets[s.name] = IpSet(s.name, s.type, frozenset(s.add), s.family, maxelem=s.maxelem)
        elif s.action is Action.UPDATE:
            old = sets[s.name]
            sets[s.name] = IpSet(s.name, s.type, (old.members - set(s.remove)) | set(s.add), s.family,
                                 maxelem=old.maxelem)
        else:
            sets.pop(s.name, None)
    return sets
