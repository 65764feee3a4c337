"""A plan is data first: versioned JSON that `apply FILE` executes exactly, or refuses as stale.

The text form reads like `terraform plan`: one block per chain, set or hook, with + / ~ / -
and the changed lines, then a summary line.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass

from weft.model.errors import WeftError
from weft.reconciler.bird import BirdChange, format_bird_change
from weft.reconciler.diff import (
    CREATE,
    DELETE,
    REPLACE,
    ChainChange,
    Changes,
    HookChange,
    LinkChange,
    RouteChange,
    SetChange,
)

FORMAT_VERSION = 1
_SYMBOL = {CREATE: "+", DELETE: "-", "update": "~", REPLACE: "-/+"}
_VERB = {CREATE: "created", DELETE: "destroyed", "update": "updated in-place", REPLACE: "replaced"}


class PlanError(WeftError):
    """A saved plan that cannot be applied (unreadable, other format, stale)."""


@dataclass(frozen=True)
class Plan:
    node: str
    backend: str
    base_fingerprint: str        # the kernel state the plan was made against
    changes: Changes
    ignored: tuple[str, ...] = ()   # apiVersion/kind of objects weft does not understand (yet)
    bird: BirdChange | None = None  # BIRD's configuration (passwords redacted when loaded from a file)
    bird_sha: tuple[str, str] | None = None   # sha256 of the live and the new BIRD file

    @property
    def empty(self) -> bool:
        return self.changes.empty and self.bird is None

    def summary(self) -> dict[str, int]:
        counts = self.changes.summary()
        if self.bird is not None:
            counts["add" if self.bird.action == "create" else "change"] += 1
        return counts

    def bird_digests(self) -> tuple[str, str] | None:
        if self.bird is None:
            return None
        return self.bird_sha or (_sha(self.bird.old or ""), _sha(self.bird.new))

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "node": self.node,
            "backend": self.backend,
            "base_fingerprint": self.base_fingerprint,
            "summary": self.summary(),
            "ignored_kinds": list(self.ignored),
            "changes": {
                "ipsets": [asdict(s) for s in self.changes.sets],
                "chains": [asdict(c) for c in self.changes.chains],
                "hooks": [asdict(h) for h in self.changes.hooks],
                "routes": [asdict(r) for r in self.changes.routes],
                "links": [asdict(link) for link in self.changes.links],
                "bird": None if self.bird is None else self.bird.public() | dict(
                    zip(("old_sha256", "new_sha256"), self.bird_digests(), strict=True)),
            },
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "plan") -> Plan:
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            got = data.get("format_version") if isinstance(data, dict) else None
            raise PlanError(f"{source}: not a weft plan of format_version {FORMAT_VERSION} (got {got!r})")
        try:
            ch = data["changes"]
            changes = Changes(
                tuple(SetChange(**_tuples(s)) for s in ch["ipsets"]),
                tuple(ChainChange(**_tuples(c)) for c in ch["chains"]),
                tuple(HookChange(**_tuples(h)) for h in ch["hooks"]),
                tuple(RouteChange(**r) for r in ch.get("routes", ())),
                tuple(LinkChange(**{**link, "sysctls": _pairs(link["sysctls"]), "previous": _pairs(link["previous"])})
                      for link in ch.get("links", ())),
            )
            bird = ch.get("bird")
            sha = (bird.pop("old_sha256"), bird.pop("new_sha256")) if bird else None
            return cls(data["node"], data["backend"], data["base_fingerprint"], changes,
                       tuple(data.get("ignored_kinds", ())), BirdChange(**bird) if bird else None, sha)
        except (KeyError, TypeError) as exc:
            raise PlanError(f"{source}: malformed plan ({exc})") from exc


def _pairs(items) -> tuple:
    return tuple((k, v) for k, v in items)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def save_plan(plan: Plan, path: str) -> None:
    with open(path, "w") as f:
        json.dump(plan.to_json(), f, indent=1, sort_keys=True)
        f.write("\n")


def load_plan(path: str) -> Plan:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read plan: {exc}") from exc
    return Plan.from_json(data, path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def summary_line(plan: Plan, verb: str = "Plan") -> str:
    s = plan.summary()
    return f"{verb}: {s['add']} to add, {s['change']} to change, {s['destroy']} to destroy."


def format_text(plan: Plan) -> str:
    changes = plan.changes
    note = f"Ignored objects of kinds weft does not handle: {', '.join(plan.ignored)}\n\n" if plan.ignored else ""
    if plan.empty:
        return note + (f"No changes. The kernel of node {plan.node} matches the desired state "
                       f"(iptables {plan.backend} backend).\n")
    out = [f"weft will perform the following actions on node {plan.node} (iptables {plan.backend} backend):", ""]
    for s in changes.sets:
        out.extend(_set_block(s))
    for c in changes.chains:
        out.extend(_chain_block(c))
    for h in changes.hooks:
        out.extend(_hook_block(h))
    for r in changes.routes:
        out.extend(_route_block(r))
    for link in changes.links:
        out.extend(_link_block(link))
    if plan.bird is not None:
        out.append(format_bird_change(plan.bird))
    out.append(summary_line(plan))
    return note + "\n".join(out) + "\n"


def _set_block(s: SetChange) -> list[str]:
    head = f"  # ipset {s.name} will be {_VERB[s.action]}" + (f"  ({s.about})" if s.about else "")
    lines = [head, f"  {_SYMBOL[s.action]} ipset {s.name} ({s.type}) {{"]
    lines += [f"      + {m}" for m in s.add] + [f"      - {m}" for m in s.remove]
    return lines + ["    }", ""]


def _chain_block(c: ChainChange) -> list[str]:
    head = f"  # chain {c.table}/{c.name} will be {_VERB[c.action]}" + (f"  ({c.about})" if c.about else "")
    return [head, f"  {_SYMBOL[c.action]} chain {c.table}/{c.name} {{", *_rule_lines(c.previous, c.rules), "    }", ""]


def _hook_block(h: HookChange) -> list[str]:
    head = f"  # weft's rules in built-in chain {h.table}/{h.chain} will be {_VERB[h.action]}"
    return [head, f"  {_SYMBOL[h.action]} hook {h.table}/{h.chain} {{", *_rule_lines(h.previous, h.rules), "    }", ""]


def _route_text(dst: str, dev: str | None, kind: str | None) -> str:
    return f"{dst} dev {dev}" if kind != "blackhole" else f"blackhole {dst}"


def _route_block(r: RouteChange) -> list[str]:
    head = f"  # route {r.dst} will be {_VERB[r.action]}" + (f"  ({r.about})" if r.about else "")
    lines = [head]
    if r.action != CREATE:
        lines.append(f"  - route {_route_text(r.dst, r.previous_dev, r.previous_type)}")
    if r.action != DELETE:
        lines.append(f"  + route {_route_text(r.dst, r.dev, r.type)}")
    return lines + [""]


def _link_block(link: LinkChange) -> list[str]:
    head = f"  # settings of interface {link.iface} will be updated in-place"
    head += f"  ({link.about})" if link.about else ""
    lines = [head, f"  ~ interface {link.iface} {{"]
    for (key, want), (_, have) in zip(link.sysctls, link.previous, strict=True):
        lines.append(f"      ~ {key.replace('/', '.')} = {have or '(unset)'} -> {want}")
    return lines + ["    }", ""]


def _rule_lines(before: tuple[str, ...], after: tuple[str, ...]) -> list[str]:
    """Only the lines that change, in order (the kernel keeps the others as they are)."""
    lines = []
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            if a1 - a0:
                lines.append(f"        ({a1 - a0} unchanged rule{'s' if a1 - a0 > 1 else ''})")
            continue
        lines += [f"      - {r}" for r in before[a0:a1]] + [f"      + {r}" for r in after[b0:b1]]
    return lines
