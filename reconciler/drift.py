"""Drift: what in the kernel differs from what weft last made it, item by item.

Drift is the same comparison as a plan, phrased from the kernel's side by each resource (what is
missing, what is unexpected, what was changed by someone else); this module prints it.
"""
from __future__ import annotations

from collections.abc import Sequence

from weft.reconciler.resource import DriftItem

FORMAT_VERSION = 1


def format_text(node: str, items: Sequence[DriftItem]) -> str:
    if not items:
        return f"No drift: the kernel of node {node} matches the desired state.\n"
    count = "1 item differs" if len(items) == 1 else f"{len(items)} items differ"
    out = [f"Drift on node {node}: {count} from the desired state.", ""]
    for it in items:
        detail = it.get("member") or it.get("rule") or ""
        out.append(f"  {it['problem']:<18} {it['kind']:<12} {it['name']}" + (f"\n      {detail}" if detail else ""))
    out += ["", "Run `weft apply` to repair."]
    return "\n".join(out) + "\n"
