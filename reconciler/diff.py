"""Line diffs: how a plan shows, and drift names, the lines of a chain or a file that differ.

The one comparison of ordered lines every resource uses (a chain's rules, a hook's rules, BIRD's
configuration): only the lines that differ, in order; the kernel keeps the others as they are.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence

from weft.reconciler.resource import DriftItem, Problem


def _opcodes(before: Sequence[str], after: Sequence[str]) -> Iterator[tuple[str, int, int, int, int]]:
    yield from difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes()


def rule_lines(before: Sequence[str], after: Sequence[str]) -> list[str]:
    """Plan text: the lines that change ("- old", "+ new"), runs of unchanged ones counted."""
    lines = []
    for op, a0, a1, b0, b1 in _opcodes(before, after):
        if op == "equal":
            if a1 - a0:
                lines.append(f"        ({a1 - a0} unchanged rule{'s' if a1 - a0 > 1 else ''})")
            continue
        lines += [f"      - {r}" for r in before[a0:a1]] + [f"      + {r}" for r in after[b0:b1]]
    return lines


def line_items(kind: str, name: str, have: Sequence[str], want: Sequence[str]) -> list[DriftItem]:
    """Drift items: each wanted line that is missing, each found line that is unexpected."""
    items: list[DriftItem] = []
    for op, a0, a1, b0, b1 in _opcodes(have, want):
        if op == "equal":
            continue
        items += [{"kind": kind, "name": name, "rule": r, "problem": Problem.MISSING.value} for r in want[b0:b1]]
        items += [{"kind": kind, "name": name, "rule": r, "problem": Problem.UNEXPECTED.value} for r in have[a0:a1]]
    return items
