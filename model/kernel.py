"""The shape of kernel state weft owns: what renderers produce and probes read back.

Both sides use the kernel's own printed form (iptables-save lines, ipset save members), so
"in sync" is plain equality and an unchanged system diffs as empty.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from weft.model import codec

PREFIX = "weft-"


@dataclass(frozen=True)
class IpSet:
    name: str
    type: str                       # "hash:ip", "hash:net", "hash:ip,port"
    members: frozenset[str]
    family: str = "inet"
    about: str = field(default="", compare=False)   # what it is for; desired side only


@dataclass(frozen=True)
class Chain:
    table: str
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

    def fingerprint(self) -> str:
        """Identifies this exact state; a saved plan is valid only against the state it was made on.
        What to_json holds, fed to the hash directly (no JSON of 50k set members to build)."""
        h = hashlib.sha256()
        for (t, n), c in sorted(self.chains.items()):
            h.update(f"\0chain {t}/{n}\n".encode())
            h.update("\n".join(c.rules).encode())
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


EMPTY = Dataplane({}, {}, {})


codec.register_module(globals())   # these types may be kept in the desired-state cache
