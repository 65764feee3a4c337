"""Desired vs actual kernel state -> the smallest set of changes. Pure.

Like Felix's drivers, the diff takes the full desired set and classifies what it finds as in
sync (left alone), out of sync (rewritten) or orphaned (removed); only weft-named objects are
ever considered, so foreign state cannot appear here.
"""
from __future__ import annotations

from dataclasses import dataclass

from weft.model.kernel import Chain, Dataplane, Hooks, IpSet, Link, Route

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
class RouteChange:
    dst: str
    action: str                      # create / update / delete
    dev: str | None = None           # the desired route (create/update)
    type: str = "unicast"
    previous_dev: str | None = None
    previous_type: str | None = None
    about: str = ""


@dataclass(frozen=True)
class LinkChange:
    iface: str
    action: str                      # update: some sysctls differ
    sysctls: tuple[tuple[str, str], ...] = ()    # (key, desired value) that differ
    previous: tuple[tuple[str, str], ...] = ()   # (key, kernel value) of the same keys
    about: str = ""


@dataclass(frozen=True)
class Changes:
    sets: tuple[SetChange, ...] = ()
    chains: tuple[ChainChange, ...] = ()
    hooks: tuple[HookChange, ...] = ()
    routes: tuple[RouteChange, ...] = ()
    links: tuple[LinkChange, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.sets or self.chains or self.hooks or self.routes or self.links)

    def summary(self) -> dict[str, int]:
        items = [c.action for c in (*self.sets, *self.chains, *self.hooks, *self.routes, *self.links)]
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
    return Changes(tuple(sets), tuple(chains), tuple(hooks), *_routing(desired, actual))


def _routing(desired: Dataplane, actual: Dataplane) -> tuple[tuple[RouteChange, ...], tuple[LinkChange, ...]]:
    """Routes and interface settings. A route through an interface that does not exist (the pod
    is not wired yet, or gone) cannot be wanted, nor one to a destination another tool routes;
    interfaces are the CNI plugin's to create and delete, so only the settings of the ones that
    exist are compared."""
    present = actual.links
    routes = []
    for dst, want in sorted(desired.routes.items()):
        if (want.dev is not None and want.dev not in present) or dst in actual.occupied:
            continue
        have = actual.routes.get(dst)
        if have is None:
            routes.append(RouteChange(dst, CREATE, want.dev, want.type, about=want.about))
        elif have != want:
            routes.append(RouteChange(dst, UPDATE, want.dev, want.type, have.dev, have.type, want.about))
    for dst, have in sorted(actual.routes.items()):
        want = desired.routes.get(dst)
        if want is None or (want.dev is not None and want.dev not in present):
            routes.append(RouteChange(dst, DELETE, previous_dev=have.dev, previous_type=have.type))
    links = []
    for iface, want in sorted(desired.links.items()):
        have = dict(present[iface].sysctls) if iface in present else None
        if have is None:
            continue
        wrong = tuple((k, v) for k, v in want.sysctls if have.get(k) != v)
        if wrong:
            links.append(LinkChange(iface, UPDATE, wrong, tuple((k, have.get(k, "")) for k, _ in wrong), want.about))
    return tuple(routes), tuple(links)


def names_set(rule: str, set_name: str) -> bool:
    return f"--match-set {set_name} " in rule


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
    routes = dict(actual.routes)
    for r in changes.routes:
        if r.action == DELETE:
            routes.pop(r.dst, None)
        else:
            routes[r.dst] = Route(r.dst, r.dev, r.type)
    links = dict(actual.links)
    for link in changes.links:
        links[link.iface] = Link(link.iface, tuple(sorted({**dict(links[link.iface].sysctls), **dict(link.sysctls)}
                                                            .items())))
    return Dataplane(chains, sets, hooks, routes, links)
