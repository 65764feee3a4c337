"""The shape of kernel state weft owns: what renderers produce and probes read back.

Both sides use the kernel's own printed form (iptables-save lines, ipset save members), so
"in sync" is plain equality and an unchanged system diffs as empty.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

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
class Dataplane:
    chains: Mapping[tuple[str, str], Chain]
    ipsets: Mapping[str, IpSet]
    hooks: Mapping[tuple[str, str], Hooks]

    def to_json(self) -> dict:
        return {
            "chains": {f"{t}/{n}": list(c.rules) for (t, n), c in sorted(self.chains.items())},
            "ipsets": {n: {"type": s.type, "family": s.family, "members": sorted(s.members)}
                       for n, s in sorted(self.ipsets.items())},
            "hooks": {f"{t}/{c}": {"rules": list(h.rules), "at_top": h.at_top}
                      for (t, c), h in sorted(self.hooks.items())},
        }

    def fingerprint(self) -> str:
        """Identifies this exact state; a saved plan is valid only against the state it was made on."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


EMPTY = Dataplane({}, {}, {})
