"""`weft ipam-gc`: release the address blocks of nodes that are gone, cluster-wide.

A node claims blocks itself (an IPAMBlock with `affinity: host:<node>` and a BlockAffinity,
cni/claims.py) and keeps its per-pod allocations on the node. When a node is deleted its
blocks stay claimed, and a pool can run dry of free blocks. This job (a CronJob,
playbooks/kubernetes/ipam-gc.yaml) releases them, the way Calico's kube-controllers does, with
its caution:

  - a block or affinity is an orphan when its node has no Node object AND no Pod is bound to that
    node (pods of a deleted node are still being torn down, or a Node object was deleted and is
    being re-registered by its kubelet);
  - an orphan is released only after it has been seen orphaned for the grace period (default
    15 minutes, Calico's leakGracePeriod): the first run that sees it marks it (annotation
    `weft/orphaned-since`, written with the object's resourceVersion, so a concurrent change
    wins); a later run past the grace period deletes it; a run that sees its node back removes
    the mark;
  - deletes carry the object's uid and resourceVersion as preconditions: an object that changed
    since it was read (re-claimed) is not deleted. A BlockAffinity goes before its IPAMBlock, so
    a crash in between leaves a block still naming its node, released next time.

The decision (`plan`) is a pure function of what was read and the time; `--dry-run` prints it.

IPAMBlock and BlockAffinity are read and changed in whichever of Calico's groups serves them:
crd.projectcalico.org/v1 (its CRDs) where served, else projectcalico.org/v3 (Calico's newer CRD
mode), found by API discovery (desired.discovery.serving) as the node's reads and the CNI's
claims do. A cluster serving them in neither has no blocks: nothing to release.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

from weft.reconciler.output import emit

MARK = "weft/orphaned-since"
DEFAULT_GRACE = 15 * 60.0
KINDS = ("IPAMBlock", "BlockAffinity")
EXIT_OK, EXIT_ERROR = 0, 1


def add_parser(subparsers, name: str = "ipam-gc") -> None:
    p = subparsers.add_parser(name, help="release the blocks and affinities of deleted nodes (after a grace period)")
    p.add_argument("--grace-period", type=_duration, default=DEFAULT_GRACE, metavar="DURATION",
                   help="how long a node's blocks must have been orphaned before they are released "
                        "(seconds, or 30s/15m/2h; default 15m)")
    p.add_argument("--dry-run", action="store_true", help="say what would be marked and released, change nothing")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context")
    p.add_argument("--output", choices=("text", "json"), default="text")


def _duration(text: str) -> float:
    import argparse
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 900, 15m)") from None
    if not 0 <= seconds < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"duration out of range: {text!r}")
    return seconds


@dataclass(frozen=True)
class Item:
    kind: str                # IPAMBlock | BlockAffinity
    name: str
    node: str
    cidr: str
    uid: str
    resource_version: str
    orphaned_since: float | None      # from the mark; None when unmarked (or the mark is unreadable)


@dataclass
class Plan:
    mark: list[Item] = field(default_factory=list)          # orphaned now, not marked yet
    unmark: list[Item] = field(default_factory=list)        # marked, but the node is back
    release: list[Item] = field(default_factory=list)       # orphaned for the grace period: delete
    waiting: list[Item] = field(default_factory=list)       # orphaned, inside the grace period

    def to_json(self) -> dict:
        def rows(items):
            return [{"kind": i.kind, "name": i.name, "node": i.node, "cidr": i.cidr} for i in items]
        return {"format_version": 1, "mark": rows(self.mark), "unmark": rows(self.unmark),
                "release": rows(self.release), "waiting": rows(self.waiting)}


def items(blocks: list[dict], affinities: list[dict]) -> list[Item]:
    """The node-owned IPAMBlocks (affinity host:<node>) and BlockAffinities, as read."""
    out = []
    for kind, objects in (("IPAMBlock", blocks), ("BlockAffinity", affinities)):
        for obj in objects:
            if not isinstance(obj, dict):
                continue
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            if not isinstance(meta, dict) or not isinstance(spec, dict):
                continue
            if kind == "IPAMBlock":
                affinity = spec.get("affinity")
                if not isinstance(affinity, str) or not affinity.startswith("host:"):
                    continue            # not a node's (a block without affinity is not ours to judge)
                node = affinity[len("host:"):]
            else:
                node = spec.get("node") or ""
            if not isinstance(node, str) or not node or not isinstance(meta.get("name"), str):
                continue
            annotations = meta.get("annotations") or {}
            mark = annotations.get(MARK) if isinstance(annotations, dict) else None
            out.append(Item(kind, meta["name"], node, str(spec.get("cidr", "")), str(meta.get("uid", "")),
                            str(meta.get("resourceVersion", "")), _parse_time(mark)))
    return out


def plan(found: list[Item], nodes: set[str], pod_nodes: set[str], now: float, grace: float) -> Plan:
    """What to do with each item: pure, so every case is tested without a cluster."""
    result = Plan()
    for item in found:
        gone = item.node not in nodes and item.node not in pod_nodes
        if not gone:
            if item.orphaned_since is not None:
                result.unmark.append(item)
        elif item.orphaned_since is None or item.orphaned_since > now:
            result.mark.append(item)            # a mark in the future is not trusted: start the wait now
        elif now - item.orphaned_since >= grace:
            result.release.append(item)
        else:
            result.waiting.append(item)
    # Affinities before blocks (see the module docstring).
    result.release.sort(key=lambda i: (i.kind != "BlockAffinity", i.node, i.name))
    return result


def _parse_time(text) -> float | None:
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        value = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return value.timestamp()


def _format_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def collect(api) -> tuple[list[Item], set[str], set[str], dict[str, str]]:
    """Read what the plan needs: blocks, affinities, node names, nodes that still have pods,
    and the collection path of each IPAM kind in the group that serves it."""
    from weft.desired.api import RESOURCES, list_kind
    from weft.desired.discovery import serving
    by_kind = {(r.api_version, r.kind): r for r in RESOURCES}
    nodes = {_text((o.get("metadata") or {}).get("name")) for o in list_kind(api, by_kind[("v1", "Node")])[0]}
    pods = list_kind(api, by_kind[("v1", "Pod")])[0]
    pod_nodes = {_text((p.get("spec") or {}).get("nodeName")) for p in pods}
    ipam = serving(api, KINDS)
    blocks, affinities = (list_kind(api, ipam[kind])[0] if kind in ipam else [] for kind in KINDS)
    return (items(blocks, affinities), nodes - {""}, pod_nodes - {""},
            {kind: resource.path() for kind, resource in ipam.items()})


def _text(value: object) -> str:
    """A name from an API answer, "" when it is not a string (then it names nothing)."""
    return value if isinstance(value, str) else ""


def execute(api, todo: Plan, now: float, paths: dict[str, str]) -> list[str]:
    """Carry the plan out (`paths`: each kind's collection path, from collect); returns what was
    done, one line each. An object changed since it was read (409) or already gone (404) is
    skipped: the next run looks again."""
    from weft.desired.api import ApiError
    done = []

    def update(item: Item, mark: str | None) -> None:
        current = api.request("GET", f"{paths[item.kind]}/{item.name}")
        meta = current.setdefault("metadata", {})
        if meta.get("resourceVersion") != item.resource_version or meta.get("uid", "") != item.uid:
            raise ApiError(409, "Conflict")
        annotations = dict(meta.get("annotations") or {})
        if mark is None:
            annotations.pop(MARK, None)
        else:
            annotations[MARK] = mark
        meta["annotations"] = annotations
        api.request("PUT", f"{paths[item.kind]}/{item.name}", body=current)

    for item in todo.mark:
        try:
            update(item, _format_time(now))
            done.append(f"marked {item.kind} {item.name} (node {item.node} is gone)")
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
    for item in todo.unmark:
        try:
            update(item, None)
            done.append(f"unmarked {item.kind} {item.name} (node {item.node} is back)")
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
    for item in todo.release:
        body = {"apiVersion": "v1", "kind": "DeleteOptions",
                "preconditions": {"uid": item.uid or None, "resourceVersion": item.resource_version or None}}
        try:
            api.request("DELETE", f"{paths[item.kind]}/{item.name}", body=body)
            done.append(f"released {item.kind} {item.name} ({item.cidr}, node {item.node})")
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
    return done


def format_text(todo: Plan, done: list[str] | None, grace: float) -> str:
    if done is not None:
        lines = done or ["Nothing to release."]
    else:
        lines = ([f"would mark {i.kind} {i.name} (node {i.node} is gone)" for i in todo.mark]
                 + [f"would unmark {i.kind} {i.name} (node {i.node} is back)" for i in todo.unmark]
                 + [f"would release {i.kind} {i.name} ({i.cidr}, node {i.node})" for i in todo.release]) \
            or ["Nothing to release."]
    if todo.waiting:
        lines.append(f"{len(todo.waiting)} orphaned objects inside the {grace:g}s grace period.")
    return "\n".join(lines) + "\n"


def run(args, now: float | None = None) -> int:
    import time

    from weft.desired.api import ApiError, connect
    from weft.model.errors import WeftError
    now = time.time() if now is None else now
    try:
        with connect(args.kubeconfig, args.context) as api:
            found, nodes, pod_nodes, paths = collect(api)
            todo = plan(found, nodes, pod_nodes, now, args.grace_period)
            done = None if args.dry_run else execute(api, todo, now, paths)
    except ApiError as exc:
        print(f"weft: error: ipam-gc: the API server answered HTTP {exc.status} {exc.reason}", file=sys.stderr)
        return EXIT_ERROR
    except WeftError as exc:
        print(f"weft: error: ipam-gc: {exc}", file=sys.stderr)
        return EXIT_ERROR
    emit(args.output, todo.to_json() | {"done": done}, format_text(todo, done, args.grace_period))
    return EXIT_OK
