"""Read back weft's IP sets from `ipset save`: type, family, size (maxelem) and members as the
kernel prints them."""
from __future__ import annotations

from weft.model.kernel import PREFIX, IpSet

DEFAULT_MAXELEM = 65536          # what ipset makes a set hold when its create line names no size


def _option(opts: list[str], key: str) -> str | None:
    """The value after `key` in a "create" line's options ("family inet6 hashsize 1024 ...")."""
    return opts[opts.index(key) + 1] if key in opts[:-1] else None


def parse_save(text: str) -> dict[str, IpSet]:
    """weft's sets in `ipset save` output: each set's "create" line, then its "add" lines.

    A node's sets print megabytes: the text is cut at the "create" lines and each of weft's
    sets takes its members by slicing, which is several times faster than splitting every line.
    """
    sets = {}
    for block in ("\n" + text).split("\ncreate ")[1:]:
        header, _, body = block.partition("\n")
        parts = header.split()
        if len(parts) < 2 or not parts[0].startswith(PREFIX):
            continue
        name, opts = parts[0], parts[2:]
        family = _option(opts, "family") or "inet"
        maxelem = _option(opts, "maxelem")
        add = f"add {name} "
        start = len(add)
        members = frozenset(line[start:].split(" ", 1)[0] for line in body.split("\n") if line.startswith(add))
        sets[name] = IpSet(name, parts[1], members, family,
                           maxelem=int(maxelem) if maxelem and maxelem.isdigit() else DEFAULT_MAXELEM)
    return sets
