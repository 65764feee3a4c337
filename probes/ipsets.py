"""Read back weft's IP sets from `ipset save` (members as the kernel prints them)."""
from __future__ import annotations

from renderers.dataplane import PREFIX, IpSet


def parse_save(text: str) -> dict[str, IpSet]:
    header: dict[str, tuple[str, str]] = {}
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].startswith(PREFIX):
            continue
        if parts[0] == "create":
            opts = parts[3:]
            family = opts[opts.index("family") + 1] if "family" in opts else "inet"
            header[parts[1]] = (parts[2], family)
            members[parts[1]] = set()
        elif parts[0] == "add":
            members.setdefault(parts[1], set()).add(parts[2])
    return {n: IpSet(n, t, frozenset(members[n]), f) for n, (t, f) in header.items()}
