"""The shape of kernel state weft owns: what renderers produce and probes read back.

Both sides use the kernel's own printed form (iptables-save lines, ipset save members), so
"in sync" is plain equality and an unchanged system diffs as empty.

Each IP family has its own tables, labelled by family: chains and hooks of the "filter" label
are iptables' (IPv4), those of "filter6" ip6tables' (both are the kernel's filter table). Sets
say their family themselves ("inet" / "inet6").

`Dataplane.to_data()` / `from_data()` turn a whole state into JSON-able data and back (lists
and strings only): a rendered state kept between runs is data, never code.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weft.model import codec

PREFIX = "weft-"


@dataclass(frozen=True)
class IpSet:
    name: str
    type: str                       # "hash:ip", "hash:net", "hash:ip,port"
    members: frozenset[str]
    family: str = "inet"            # "inet" (IPv4 members) or "inet6" (IPv6 members)
    about: str = field(default="", compare=False)   # what it is for; desired side only
    # How many members the kernel's set can hold (probed side only; a rendered set says 0: apply
    # sizes it for its members, reconciler.ipsets). Not part of equality: a set is "the same"
    # whatever its size, and a size is judged only against the members it must hold.
    maxelem: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Chain:
    table: str                      # the table's label: "filter" (IPv4), "filter6" (IPv6), see renderers.rules
    name: str
    rules: tuple[str, ...]          # full iptables-save lines, "-A <name> ..."
    about: str = field(default="", compare=False)


@dataclass(frozen=True)
class Hooks:
    """weft's rules in one built-in chain: they must be exactly `rules`, at the top."""
    table: str
    chain: str
    rules: tuple[str, ...]
    at_top: bool = True


@dataclass(frozen=True)
class Route:
    """A route weft owns (marked with its route protocol), as `ip -j route` shows it."""
    dst: str                        # "198.18.1.11/32"
    dev: str | None = None          # None for a blackhole
    type: str = "unicast"           # unicast / blackhole
    about: str = field(default="", compare=False)


@dataclass(frozen=True)
class Link:
    """A pod's host-side interface and the sysctls weft sets on it ("net/ipv4/conf/X/rp_filter")."""
    iface: str
    sysctls: tuple[tuple[str, str], ...]
    about: str = field(default="", compare=False)


@dataclass(frozen=True)
class Dataplane:
    chains: Mapping[tuple[str, str], Chain]
    ipsets: Mapping[str, IpSet]
    hooks: Mapping[tuple[str, str], Hooks]
    routes: Mapping[str, Route] = field(default_factory=dict)   # by destination
    links: Mapping[str, Link] = field(default_factory=dict)     # by interface; probed: every weft interface
    # Probed only: destinations another tool routes (another route protocol). weft never
    # replaces those routes: a pod routed by someone else stays theirs.
    occupied: frozenset[str] = field(default=frozenset(), compare=False)

    def to_json(self) -> dict:
        return {
            "chains": {f"{t}/{n}": list(c.rules) for (t, n), c in sorted(self.chains.items())},
            "ipsets": {n: {"type": s.type, "family": s.family, "members": sorted(s.members)}
                       for n, s in sorted(self.ipsets.items())},
            "hooks": {f"{t}/{c}": {"rules": list(h.rules), "at_top": h.at_top}
                      for (t, c), h in sorted(self.hooks.items())},
            "routes": {d: {"dev": r.dev, "type": r.type} for d, r in sorted(self.routes.items())},
            "links": {i: dict(link.sysctls) for i, link in sorted(self.links.items())},
        }

    def to_data(self) -> dict[str, Any]:
        """Everything, descriptions included, as JSON-able data (see from_data)."""
        return {
            "chains": [[c.table, c.name, list(c.rules), c.about] for c in self.chains.values()],
            "ipsets": [[s.name, s.type, s.family, list(s.members), s.about] for s in self.ipsets.values()],
            "hooks": [[h.table, h.chain, list(h.rules), h.at_top] for h in self.hooks.values()],
            "routes": [[r.dst, r.dev, r.type, r.about] for r in self.routes.values()],
            "links": [[link.iface, [list(kv) for kv in link.sysctls], link.about] for link in self.links.values()],
            "occupied": sorted(self.occupied),
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Dataplane:
        """The Dataplane `to_data` described (in the same order). TypeError/ValueError/KeyError
        when `data` is not of that shape: the caller treats it as no data at all."""
        chains = {}
        for table, name, rules, about in data["chains"]:
            chains[(str(table), str(name))] = Chain(str(table), str(name), tuple(map(str, rules)), str(about))
        hooks = {}
        for table, chain, rules, at_top in data["hooks"]:
            hooks[(str(table), str(chain))] = Hooks(str(table), str(chain), tuple(map(str, rules)), bool(at_top))
        routes = {}
        for dst, dev, kind, about in data["routes"]:
            routes[str(dst)] = Route(str(dst), None if dev is None else str(dev), str(kind), str(about))
        links = {}
        for iface, sysctls, about in data["links"]:
            links[str(iface)] = Link(str(iface), tuple((str(k), str(v)) for k, v in sysctls), str(about))
        return cls(chains, ipsets_from_data(data["ipsets"]), hooks, routes, links,
                   frozenset(map(str, data.get("occupied", ()))))

    def fingerprint(self) -> str:
        """Identifies this exact state; a saved plan is valid only against the state it was made on.
        What to_json holds, fed to the hash directly (no JSON of 50k set members to build)."""
        h = hashlib.sha256()
        for (t, n), chain in sorted(self.chains.items()):
            h.update(f"\0chain {t}/{n}\n".encode())
            h.update("\n".join(chain.rules).encode())
        for n, s in sorted(self.ipsets.items()):
            h.update(f"\0set {n} {s.type} {s.family}\n".encode())
            h.update("\n".join(sorted(s.members)).encode())
        for (t, c), hooks in sorted(self.hooks.items()):
            h.update(f"\0hooks {t}/{c} {hooks.at_top}\n".encode())
            h.update("\n".join(hooks.rules).encode())
        for d, r in sorted(self.routes.items()):
            h.update(f"\0route {d} {r.dev} {r.type}".encode())
        for i, link in sorted(self.links.items()):
            h.update(f"\0link {i} {link.sysctls}".encode())
        return h.hexdigest()


def ipsets_from_data(items: Any) -> dict[str, IpSet]:
    """The `ipsets` part of Dataplane.to_data() alone (a render reuses a previous one's sets)."""
    sets = {}
    for name, kind, family, members, about in items:
        sets[str(name)] = IpSet(str(name), str(kind), frozenset(map(str, members)), str(family), str(about))
    return sets


EMPTY = Dataplane({}, {}, {})


codec.register_module(globals())   # these types may be kept in the desired-state cache
