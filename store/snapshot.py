"""The CNI snapshot: what the plugin needs to program a new pod's policy alone, left by each run.

`<state dir>/endpoints.snapshot` is data that weft renders, never rule text (renderers.endpoint
makes it and renders a pod's chains from it):

    {"format": 3, "node": "n1", "token": "<the desired state's token>",
     "pods":    {"<namespace>/<pod>": {"egress":   [["weft-po-<hash>", ...], ...],
                                       "ingress":  [["weft-pi-<hash>", ...], ...],
                                       "families": [4, 6]}},
     "closed":  {"<namespace>": [<egress closed>, <ingress closed>]},
     "default": [<egress closed>, <ingress closed>]}

"pods": every pod of this node the run rendered, its policies per direction in evaluation
order, one list per tier, as the chain names of those policies (which the run put on the node),
the list ending in TIER_PASSES ("pass") where the tier's defaultAction is Pass, and the IP
families (4, 6) whose tables the run put those chains in (a pod's policies are the same in both
families; in a family not listed the plugin treats the pod as one the run did not know);
"closed": per namespace, whether a pod the run did not know must be closed for egress and for
ingress (some policy of the namespace might select it); "default" for namespaces the run did not
know (only global policies could apply).

The file is read through StateDir (no link followed, owner and mode checked, size bounded) and
validated: a chain name must match weft's pattern for its direction (model.names), sizes are
bounded. A snapshot that fails is not used: a new pod is closed in both directions until the
next run replaces it (fail closed), and the reason is logged.
Stdlib only: this is on the plugin's ADD path.
"""
from __future__ import annotations

import json
import re
import sys

from weft.model.names import POLICY_CHAIN_PATTERNS
from weft.store.statedir import CorruptState, StateDir

FILE = "endpoints.snapshot"
OLD_FILE = "endpoints.json"          # weft before December 2026 kept rule text there: never read
FORMAT = 3                           # 3: "families" per pod (2 had IPv4 only)
MAX_FILE = 32 << 20
MAX_PODS = 10000                     # pods of one node
MAX_NAMESPACES = 200000
MAX_TIERS = 100
MAX_POLICIES = 10000                 # policies of one pod in one direction
_KEY_MAX = 512
_CHAINS = {direction: re.compile(pattern) for direction, pattern in POLICY_CHAIN_PATTERNS.items()}
TIER_PASSES = "pass"                 # last of a tier whose defaultAction is Pass (renderers.rules)


class CorruptSnapshot(CorruptState):
    """endpoints.snapshot is there but is not what weft writes."""


def _state_dir(state_dir) -> StateDir:
    return state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)


def save_snapshot(state_dir, snap: dict) -> None:
    """Replace the snapshot (made by renderers.endpoint.make_snapshot) atomically and durably."""
    check_snapshot(snap)                 # weft never writes what it would refuse to read
    sd = _state_dir(state_dir)
    sd.replace(FILE, json.dumps(snap, separators=(",", ":"), sort_keys=True))
    sd.remove(OLD_FILE)


def load_snapshot(state_dir) -> dict | None:
    """The snapshot, checked; None when there is none, or when it is not what weft writes (one
    line on stderr says so: new pods are then closed until a run writes it again, and the run
    replaces it). UnsafeState when weft must not trust the file at all."""
    try:
        return read_snapshot(state_dir)
    except CorruptSnapshot as exc:
        print(f"weft: {' '.join(str(exc).split())}: not used; new pods are closed until a reconcile run "
              "writes it again", file=sys.stderr, flush=True)
        return None


def read_snapshot(state_dir) -> dict | None:
    """The snapshot, checked; None when there is none; CorruptSnapshot when it is not what weft
    writes, UnsafeState when weft must not trust the file."""
    sd = _state_dir(state_dir)
    try:
        data = sd.read_json(FILE, MAX_FILE)
    except CorruptState as exc:
        raise CorruptSnapshot(str(exc)) from None
    if data is None:
        return None
    try:
        return check_snapshot(data)
    except ValueError as exc:
        raise CorruptSnapshot(f"{sd.file(FILE)} is not what weft writes: {exc}") from None


def check_snapshot(snap) -> dict:
    """`snap` if it has the documented shape, names and sizes; ValueError naming the first problem."""
    if isinstance(snap, dict) and snap.get("format") == 2 and isinstance(snap.get("pods"), dict):
        # format 2 (before IPv6 was enforced): the run put every pod's chains in the IPv4 table only
        snap = {**snap, "format": FORMAT, "pods": {key: {**pod, "families": [4]} if isinstance(pod, dict) else pod
                                                   for key, pod in snap["pods"].items()}}
    if not isinstance(snap, dict) or snap.get("format") != FORMAT:
        raise ValueError(f"not a weft CNI snapshot of format {FORMAT}")
    for key in ("node", "token"):
        if not isinstance(snap.get(key), str) or len(snap[key]) > _KEY_MAX:
            raise ValueError(f"\"{key}\" must be a string")
    pods, closed = snap.get("pods"), snap.get("closed")
    if not isinstance(pods, dict) or len(pods) > MAX_PODS:
        raise ValueError(f"\"pods\" must be an object of at most {MAX_PODS} pods")
    for key, pod in pods.items():
        namespace, slash, name = key.partition("/")
        if not (namespace and slash and name) or len(key) > _KEY_MAX:
            raise ValueError(f"pods: {key[:80]!r} is not <namespace>/<pod>")
        if not isinstance(pod, dict) or set(pod) != {"egress", "ingress", "families"}:
            raise ValueError(f"pods.{key}: must have \"egress\", \"ingress\" and \"families\", and nothing else")
        for direction in ("egress", "ingress"):
            _check_tiers(pod[direction], direction, f"pods.{key}.{direction}")
        families = pod["families"]
        if not isinstance(families, list) or any(type(f) is not int for f in families) \
                or families not in ([4], [6], [4, 6]):
            raise ValueError(f"pods.{key}.families: must be [4], [6] or [4, 6]")
    if not isinstance(closed, dict) or len(closed) > MAX_NAMESPACES:
        raise ValueError(f"\"closed\" must be an object of at most {MAX_NAMESPACES} namespaces")
    for namespace, flags in closed.items():
        if len(namespace) > _KEY_MAX:
            raise ValueError("closed: a namespace name is too long")
        _check_flags(flags, f"closed.{namespace}")
    _check_flags(snap.get("default"), "default")
    return snap


def _check_tiers(tiers, direction: str, where: str) -> None:
    if not isinstance(tiers, list) or len(tiers) > MAX_TIERS:
        raise ValueError(f"{where}: must be a list of at most {MAX_TIERS} tiers")
    pattern, count = _CHAINS[direction], 0
    for i, tier in enumerate(tiers):
        if not isinstance(tier, list) or not tier:
            raise ValueError(f"{where}[{i}]: a tier is a non-empty list of policy chains")
        count += len(tier)
        if count > MAX_POLICIES:
            raise ValueError(f"{where}: more than {MAX_POLICIES} policies")
        for j, chain in enumerate(tier):
            if chain == TIER_PASSES and 0 < j == len(tier) - 1:
                continue
            if not isinstance(chain, str) or not pattern.fullmatch(chain):
                raise ValueError(f"{where}[{i}]: {str(chain)[:80]!r} is not a weft {direction} policy chain")


def _check_flags(flags, where: str) -> None:
    if not isinstance(flags, list) or len(flags) != 2 or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"{where}: must be [egress closed, ingress closed], two booleans")
