"""Drift: what in the kernel differs from what weft last made it, item by item.

Drift is the same comparison as a plan, phrased from the kernel's side: what is missing,
what is unexpected, what was changed by someone else.
"""
from __future__ import annotations

import difflib

from weft.reconciler.diff import CREATE, DELETE, REPLACE, Changes

FORMAT_VERSION = 1


def drift_items(changes: Changes) -> list[dict]:
    items = []
    for s in changes.sets:
        if s.action == CREATE:
            items.append({"kind": "ipset", "name": s.name, "problem": "missing"})
        elif s.action == DELETE:
            items.append({"kind": "ipset", "name": s.name, "problem": "unexpected"})
        elif s.action == REPLACE:
            items.append({"kind": "ipset", "name": s.name, "problem": f"wrong type (want {s.type})"})
        else:
            items.extend({"kind": "ipset-member", "name": s.name, "member": m, "problem": "missing"} for m in s.add)
            items.extend({"kind": "ipset-member", "name": s.name, "member": m, "problem": "unexpected"}
                         for m in s.remove)
    for c in changes.chains:
        name = f"{c.table}/{c.name}"
        if c.action == CREATE:
            items.append({"kind": "chain", "name": name, "problem": "missing"})
        elif c.action == DELETE:
            items.append({"kind": "chain", "name": name, "problem": "unexpected"})
        else:
            items.extend(_rule_items("rule", name, c.previous, c.rules))
    for r in changes.routes:
        problem = {CREATE: "missing", DELETE: "unexpected"}.get(r.action, "changed")
        items.append({"kind": "route", "name": r.dst, "problem": problem,
                      "rule": f"dev {r.previous_dev or r.dev}" if r.type != "blackhole" else "blackhole"})
    for link in changes.links:
        for (key, want), (_, have) in zip(link.sysctls, link.previous, strict=True):
            items.append({"kind": "sysctl", "name": link.iface, "problem": f"is {have or '(unset)'}, want {want}",
                          "member": key.replace("/", ".")})
    for h in changes.hooks:
        name = f"{h.table}/{h.chain}"
        items.extend(_rule_items("hook", name, h.previous, h.rules))
        if h.rules and set(h.rules) <= set(h.previous) and not h.previous_at_top:
            items.append({"kind": "hook", "name": name, "rule": h.rules[0], "problem": "not first in chain"})
    return items


def _rule_items(kind: str, name: str, have: tuple[str, ...], want: tuple[str, ...]) -> list[dict]:
    items = []
    matcher = difflib.SequenceMatcher(a=have, b=want, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            continue
        items += [{"kind": kind, "name": name, "rule": r, "problem": "missing"} for r in want[b0:b1]]
        items += [{"kind": kind, "name": name, "rule": r, "problem": "unexpected"} for r in have[a0:a1]]
    return items


def format_text(node: str, items: list[dict]) -> str:
    if not items:
        return f"No drift: the kernel of node {node} matches the desired state.\n"
    count = "1 item differs" if len(items) == 1 else f"{len(items)} items differ"
    out = [f"Drift on node {node}: {count} from the desired state.", ""]
    for it in items:
        detail = it.get("member") or it.get("rule") or ""
        out.append(f"  {it['problem']:<18} {it['kind']:<12} {it['name']}" + (f"\n      {detail}" if detail else ""))
    out += ["", "Run `weft apply` to repair."]
    return "\n".join(out) + "\n"
