"""A plan is data first: a versioned JSON document of what apply would change, and why.

A saved plan (`weft plan --out FILE`) is a statement of intent, never a script: `weft apply FILE`
reads the desired state and the kernel again, computes the plan anew, and applies it only if the
new document equals the saved one; otherwise it refuses, naming the first differences. A plan
made for another node, state dir or source is refused before anything is read.

The document (format_version 2):

  format_version    2
  node              the node it was made for
  state_dir         the state dir (absolute) it was made with
  source            {"manifests": DIR} or {"kubeconfig": FILE|null, "context": NAME|null}
  destroy           whether it removes everything weft owns (`--destroy`)
  backend           the iptables backend ("nft" / "legacy")
  base_fingerprint  identifies the kernel state it was made against (no secret goes into it)
  summary           {"add": N, "change": N, "destroy": N}
  ignored_kinds     apiVersion/kind of objects weft does not handle (yet)
  changes           one list per section, each change as its resource describes it:
     ipsets   {name, action, type, family, add, remove, about}
     chains   {table, name, action, rules, previous, about, releases}
     hooks    {table, chain, action, rules, previous, previous_at_top}
     routes   {dst, action, dev, type, previous_dev, previous_type, about}
     links    {iface, action, sysctls, previous, about}
     bird     {path, old, new, reload, socket, action, note} with BGP passwords redacted (and no
              digest of the unredacted text, which would allow guessing them offline)

The text form reads like `terraform plan`: one block per change with + / ~ / - and the changed
lines, then a summary line.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from weft.desired.bounds import BoundExceeded, check_depth, read_bounded
from weft.model.errors import WeftError

FORMAT_VERSION = 2
MAX_PLAN_BYTES = 256 << 20       # a plan's sets for 100k pods are tens of MB
MAX_DEPTH = 16                   # levels of objects and lists; the document nests 5
DIFFERENCES_SHOWN = 3


class PlanError(WeftError):
    """A saved plan that cannot be applied (unreadable, another format, another target, stale)."""


@dataclass(frozen=True)
class Plan:
    node: str
    state_dir: str
    source: dict[str, Any]
    destroy: bool
    backend: str
    base_fingerprint: str
    summary: dict[str, int]
    changes: dict[str, list[dict[str, Any]]]
    ignored: tuple[str, ...] = ()
    blocks: tuple[str, ...] = field(default=(), compare=False)    # the plan text's change blocks

    @property
    def empty(self) -> bool:
        return not any(self.changes.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "node": self.node,
            "state_dir": self.state_dir,
            "source": self.source,
            "destroy": self.destroy,
            "backend": self.backend,
            "base_fingerprint": self.base_fingerprint,
            "summary": dict(self.summary),
            "ignored_kinds": list(self.ignored),
            "changes": self.changes,
        }


def save_plan(plan: Plan, path: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(plan.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
    except OSError as exc:
        raise PlanError(f"{path}: cannot save the plan: {exc.strerror}") from None


def load_plan(path: str) -> dict[str, Any]:
    """A saved plan's document, checked for shape and size only (it is hostile input: it is
    compared with a plan weft makes, never executed)."""
    data = read_bounded(path, MAX_PLAN_BYTES, "saved plan", PlanError)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"{path}: not a weft plan (not JSON: {str(exc)[:80]})") from None
    try:
        check_depth(doc, "not a weft plan", MAX_DEPTH)
    except BoundExceeded as exc:
        raise PlanError(f"{path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        got = doc.get("format_version") if isinstance(doc, dict) else None
        raise PlanError(f"{path}: not a weft plan of format_version {FORMAT_VERSION} (got {_short(got)}); "
                        "make it again with `weft plan --out`")
    for key, kind in (("node", str), ("state_dir", str), ("source", dict), ("destroy", bool)):
        if not isinstance(doc.get(key), kind):
            raise PlanError(f"{path}: not a weft plan (field {key!r} missing or not a {kind.__name__})")
    return doc


def check_target(saved: dict[str, Any], fresh: Plan, path: str) -> None:
    """Refuse a plan made for another node, state dir, source or kind of run."""
    for key, what in (("node", "node"), ("state_dir", "state dir"), ("source", "desired-state source")):
        if saved[key] != getattr(fresh, key):
            show = describe_source if key == "source" else _short
            raise PlanError(f"{path}: the plan is for {what} {show(saved[key])}, not {show(getattr(fresh, key))}; "
                            "apply it with the options it was made with, or make a plan for these with "
                            "`weft plan --out`")
    if saved["destroy"] != fresh.destroy:
        kind = "removal of everything weft owns (--destroy)" if saved["destroy"] else "reconcile"
        raise PlanError(f"{path}: the plan is a {kind} plan; apply it the way it was made")


def check_same(saved: dict[str, Any], fresh: Plan, path: str) -> None:
    """Refuse the saved plan unless it is exactly what weft would do now."""
    now = json.loads(json.dumps(fresh.to_json()))
    if saved == now:
        return
    why = ("the kernel state changed since it was made" if saved.get("base_fingerprint") != now["base_fingerprint"]
           else "the desired state or the kernel changed since it was made, or it was edited")
    shown = list(_differences(saved, now))
    raise PlanError(f"{path}: the saved plan is stale: {why}; it differs from what weft would do now in "
                    f"{'; '.join(shown[:DIFFERENCES_SHOWN])}{'; ...' if len(shown) > DIFFERENCES_SHOWN else ''}; "
                    "nothing was applied; run `weft plan` again")


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> Iterator[str]:
    """The first differences, as `path: saved -> now`, section by section (deepdiff, imported
    here only: this is the one path that needs it)."""
    from deepdiff import DeepDiff
    parts: list[tuple[str, Any, Any]] = []
    for key in sorted(set(saved) | set(now)):
        if key == "changes" and isinstance(saved.get(key), dict) and isinstance(now.get(key), dict):
            for section in sorted(set(saved[key]) | set(now[key])):
                if saved[key].get(section) != now[key].get(section):
                    parts.append((f"['changes'][{section!r}]", saved[key].get(section), now[key].get(section)))
        elif saved.get(key) != now.get(key):
            parts.append((f"[{key!r}]", saved.get(key), now.get(key)))
    for root, old, new in parts:
        tree = DeepDiff(old, new, view="tree", verbose_level=2)
        for _kind, found in sorted(tree.items()):
            for level in found:
                yield f"{level.path(root='root' + root)}: {_short(level.t1)} -> {_short(level.t2)}"


def describe_source(source: Any) -> str:
    if isinstance(source, dict) and isinstance(source.get("manifests"), str):
        return f"--from {source['manifests'][:400]}"
    if isinstance(source, dict) and set(source) == {"kubeconfig", "context"}:
        return (f"the API server (--kubeconfig {_short(source['kubeconfig'])}, "
                f"--context {_short(source['context'])})")
    return _short(source)


def _short(value: Any) -> str:
    text = repr(value) if not type(value).__name__ == "NotPresent" else "(absent)"
    return text if len(text) <= 80 else text[:77] + "..."


def summary_line(plan: Plan, verb: str = "Plan") -> str:
    s = plan.summary
    return f"{verb}: {s['add']} to add, {s['change']} to change, {s['destroy']} to destroy."


def format_text(plan: Plan) -> str:
    note = f"Ignored objects of kinds weft does not handle: {', '.join(plan.ignored)}\n\n" if plan.ignored else ""
    if plan.empty:
        return note + (f"No changes. The kernel of node {plan.node} matches the desired state "
                       f"(iptables {plan.backend} backend).\n")
    out = [f"weft will perform the following actions on node {plan.node} (iptables {plan.backend} backend):", ""]
    out.extend(plan.blocks)
    out.append(summary_line(plan))
    return note + "\n".join(out) + "\n"
