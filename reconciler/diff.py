"""Desired vs actual kernel state -> the smallest set of changes. Pure.

Like Felix's drivers, the diff takes the full desired set and classifies what it finds as in
sync (left alone), out of sync (rewritten) or orphaned (removed); only weft-named objects are
ever considered, so foreign state cannot appear here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from renderers.dataplane import Dataplane

CREATE, UPDATE, REPLACE, DELETE = "create", "update", "replace", "delete"


@dataclass(frozen=True)
class SetChange:
    name: str
    action: str                      # create / update (members) / replace (type) / delete
    type: str
    family: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    about: str = ""


@dataclass(frozen=True)
class ChainChange:
    table: str
    name: str
    action: str                      # create / update / delete
    rules: tuple[str, ...] = ()      # the desired rules (empty for delete)
    previous: tuple[str, ...] = ()   # what the kernel has now
    about: str = ""


@dataclass(frozen=True)
class HookChange:
    table: str
    chain: str                       # a built-in chain
    action: str
    rules: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()
    previous_at_top: bool = True     # whether the kernel has weft's rules first in the chain


@dataclass(frozen=True)
class Changes:
    sets: tuple[SetChange, ...] = ()
    chains: tuple[ChainChange, ...] = ()
    hooks: tuple[HookChange, ...] = ()
    counts: dict = field(default_factory=dict, compare=False)

    @property
    def empty(self) -> bool:
        return not (self.sets or self.chains or self.hooks)

    def summary(self) -> dict[str, int]:
        items = [c.action for c in (*self.sets, *self.chains, *self.hooks)]
        return {
            "add": items.count(CREATE),
            "change": items.count(UPDATE) + items.count(REPLACE),
            "destroy": items.count(DELETE),
        }


def diff(desired: Dataplane, actual: Dataplane) -> Changes:
    sets = []
    for name, want in sorted(desired.ipsets.items()):
        have = actual.ipsets.get(name)
        if have is None:
            sets.append(SetChange(name, CREATE, want.type, want.family, tuple(sorted(want.members)), (), want.about))
        elif (have.type, have.family) != (want.type, want.family):
            sets.append(SetChange(name, REPLACE, want.type, want.family, tuple(sorted(want.members)),
                                  tuple(sorted(have.members)), want.about))
        elif have.members != want.members:
            sets.append(SetChange(name, UPDATE, want.type, want.family, tuple(sorted(want.members - have.members)),
                                  tuple(sorted(have.members - want.members)), want.about))
    for name, have in sorted(actual.ipsets.items()):
        if name not in desired.ipsets:
            sets.append(SetChange(name, DELETE, have.type, have.family, (), tuple(sorted(have.members))))

    # A replaced set is a new kernel object: rules naming it must be loaded again to refer to it.
    replaced = [s.name for s in sets if s.action == REPLACE]
    chains = []
    for key, want in sorted(desired.chains.items()):
        have = actual.chains.get(key)
        if have is None:
            chains.append(ChainChange(want.table, want.name, CREATE, want.rules, (), want.about))
        elif have.rules != want.rules or any(names_set(r, s) for s in replaced for r in want.rules):
            chains.append(ChainChange(want.table, want.name, UPDATE, want.rules, have.rules, want.about))
    for key, have in sorted(actual.chains.items()):
        if key not in desired.chains:
            chains.append(ChainChange(have.table, have.name, DELETE, (), have.rules))

    hooks = []
    for key in sorted(set(desired.hooks) | set(actual.hooks)):
        want, have = desired.hooks.get(key), actual.hooks.get(key)
        if have == want:
            continue
        table, chain = key
        action = CREATE if have is None else DELETE if want is None else UPDATE
        hooks.append(HookChange(table, chain, action, want.rules if want else (), have.rules if have else (),
                                have.at_top if have else True))
    return Changes(tuple(sets), tuple(chains), tuple(hooks))


def names_set(rule: str, set_name: str) -> bool:
    return f"--match-set {set_name} " in rule
