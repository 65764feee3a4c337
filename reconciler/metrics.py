"""A run's metrics in Prometheus' text format, for node_exporter's textfile collector.

A batch job has no endpoint to scrape: each run leaves its figures in a `.prom` file that
node_exporter (`--collector.textfile.directory`) serves with the node's other metrics. The
file is replaced atomically (a new file, fsync'd, renamed over the old), because the collector
may read it at any moment and a half-written file drops every metric in it.

One file per command (the units give `weft.prom` to apply and `weft-drift.prom` to drift): each
run replaces its whole file, and every series carries `command`, so two files never hold the
same series (node_exporter rejects duplicates). The CNI plugin's figures come from its
counters in the state dir (CniCounters) and are written by the apply run only.

prometheus_client costs ~50 ms to import, so it is imported only when a file is rendered: this
module is importable for free on the CNI plugin's path, where only CniCounters is used.
"""
from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from weft.store.statedir import atomic_write

# Upper bounds (seconds) of the CNI latency histogram: an ADD served by the resident helper
# takes ~30 ms alone and ~150 ms twenty at once; a cold start several hundred.
CNI_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CNI_COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
CNI_FILE = "cni-metrics.json"
CNI_LOCK = "cni-metrics.lock"
CNI_FILE_LIMIT = 64 << 10           # a few hundred numbers; anything larger is not ours
CHANGE_KINDS = ("ipsets", "chains", "hooks", "routes", "links", "bird")


def add_arguments(parser) -> None:
    """`--metrics-file` for the commands that write one (apply, drift)."""
    parser.add_argument("--metrics-file", metavar="FILE",
                        help="write this run's metrics to FILE (Prometheus text format, replaced atomically; "
                             "for node_exporter's textfile collector, e.g. "
                             "/var/lib/prometheus/node-exporter/weft.prom)")


@dataclass
class RunMetrics:
    """What one run measured. Fields left None were not measured and are not written."""
    node: str
    command: str                                  # apply | drift | plan
    started: float = field(default_factory=time.time)
    success: bool = False
    phases: dict[str, float] = field(default_factory=dict)       # seconds by phase
    changes: dict[str, int] | None = None         # changes applied, by kind (CHANGE_KINDS)
    drift_items: int | None = None
    bgp_established: int | None = None
    bgp_sessions: int | None = None
    ipam_blocks: list[tuple[str, int, int]] | None = None        # (cidr, used, size)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (read, probe, render, diff, apply, verify, bird, ...); a phase timed twice
        adds up."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - start

    @property
    def duration(self) -> float:
        return time.monotonic() - self._t0


def changes_by_kind(plan_json: Mapping) -> dict[str, int]:
    """Changes by kind from a plan's JSON document (`Plan.to_json()`, format_version 2)."""
    changes = plan_json.get("changes") or {}
    return {kind: len(changes.get(kind) or ()) for kind in CHANGE_KINDS}


def bgp_counts(status: Mapping) -> tuple[int, int]:
    """(established, configured) BGP sessions from `weft status`'s data (reconciler.status.collect)."""
    peers = status.get("peers") or () if status.get("running") else ()
    return sum(1 for p in peers if str(p.get("info", "")).startswith("Established")), len(peers)


def ipam_blocks(show: Mapping) -> list[tuple[str, int, int]]:
    """(cidr, used, size) of the node's blocks from `weft ipam show`'s data (ipam_cli.show)."""
    return [(b["cidr"], int(b["used"]), int(b["size"])) for b in show.get("blocks") or ()]


def render(run: RunMetrics, cni: Mapping | None = None) -> bytes:
    """The Prometheus text of a run (and of the CNI counters, `CniCounters.snapshot()`)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["node", "command", *labels])
        family.add_metric([run.node, run.command, *labels.values()], value)
        return family

    def families():
        yield gauge("weft_last_run_timestamp_seconds", "When the last run started (unix time).", {}, run.started)
        yield gauge("weft_last_run_success", "1 if the last run succeeded, else 0.", {}, 1.0 if run.success else 0.0)
        yield gauge("weft_last_run_duration_seconds", "How long the last run took.", {}, run.duration)
        phases = GaugeMetricFamily("weft_last_run_phase_seconds", "How long each phase of the last run took.",
                                   labels=["node", "command", "phase"])
        for name, seconds in sorted(run.phases.items()):
            phases.add_metric([run.node, run.command, name], seconds)
        yield phases
        if run.changes is not None:
            changes = GaugeMetricFamily("weft_last_run_changes", "Changes the last run applied, by kind of state.",
                                        labels=["node", "command", "kind"])
            for kind in CHANGE_KINDS:
                changes.add_metric([run.node, run.command, kind], run.changes.get(kind, 0))
            yield changes
        if run.drift_items is not None:
            yield gauge("weft_drift_items", "Items where the kernel differs from the desired state.", {},
                        run.drift_items)
        if run.bgp_established is not None:
            yield gauge("weft_bgp_sessions_established", "BGP sessions of BIRD in state Established.", {},
                        run.bgp_established)
        if run.bgp_sessions is not None:
            yield gauge("weft_bgp_sessions", "BGP sessions BIRD is configured with.", {}, run.bgp_sessions)
        if run.ipam_blocks is not None:
            addresses = GaugeMetricFamily("weft_ipam_block_addresses", "Addresses of the node's blocks, used or free.",
                                          labels=["node", "command", "block", "state"])
            for cidr, used, size in run.ipam_blocks:
                addresses.add_metric([run.node, run.command, cidr, "used"], used)
                addresses.add_metric([run.node, run.command, cidr, "free"], max(size - used, 0))
            yield addresses
        if cni is not None:
            yield from _cni_families(run.node, cni)

    class Collector:
        def collect(self):
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


def _cni_families(node: str, cni: Mapping):
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    requests = CounterMetricFamily("weft_cni_requests", "CNI calls served on this node, by command and result.",
                                   labels=["node", "cni_command", "result"])
    latency = HistogramMetricFamily("weft_cni_request_duration_seconds", "How long CNI calls took, by command.",
                                    labels=["node", "cni_command"])
    for command in CNI_COMMANDS:
        entry = cni.get(command)
        if not entry:
            continue
        for result in ("ok", "error"):
            requests.add_metric([node, command, result], entry[result])
        cumulative, buckets = 0, []
        for bound, count in zip(CNI_BUCKETS, entry["buckets"], strict=False):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        buckets.append(("+Inf", entry["ok"] + entry["error"]))
        latency.add_metric([node, command], buckets, entry["sum"])
    yield requests
    yield latency


def _le(bound: float) -> str:
    return repr(float(bound))


def write_textfile(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically (store.statedir.atomic_write), in a directory only
    root may write to: node_exporter only reads files ending in .prom, so the temporary file is
    never read."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(os.path.dirname(path))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        from weft.model.errors import WeftError
        raise WeftError(f"metrics file {path}: its directory is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}); weft (as root) does not write there")
    atomic_write(path, data, mode)


def write(path: str | os.PathLike, run: RunMetrics, cni: Mapping | None = None) -> None:
    """Render the run's metrics and replace `path` with them."""
    write_textfile(path, render(run, cni))


class CniCounters:
    """The CNI plugin's call counts and latency histogram, kept in the state dir.

    Standard library only (the plugin's path). The plugin records calls in memory (`observe`)
    and adds them to `<state dir>/cni-metrics.json` (`flush`, under a lock of its own: the
    resident helper and one-off plugin processes may flush at once); the apply run writes them
    to its metrics file (`load`). The file is hostile like every state file: read through
    StateDir (no links, owner and mode checked, size bounded) and checked number by number; a
    file that is not what weft writes is started afresh rather than trusted.
    """

    def __init__(self) -> None:
        self.pending: dict[str, dict] = {}

    def observe(self, command: str, seconds: float, ok: bool) -> None:
        if command not in CNI_COMMANDS or not math.isfinite(seconds) or seconds < 0:
            return
        entry = self.pending.setdefault(command, _empty_entry())
        entry["ok" if ok else "error"] += 1
        entry["sum"] += seconds
        for i, bound in enumerate(CNI_BUCKETS):
            if seconds <= bound:
                entry["buckets"][i] += 1
                break

    def flush(self, state_dir, timeout: float = 1.0) -> None:
        """Add what was observed to the state dir's totals (and forget it here)."""
        if not self.pending:
            return
        import json

        from weft.store.statedir import StateDir
        sd = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        with sd.lock(shared=False, timeout=timeout, name=CNI_LOCK):
            totals = _checked(_read(sd))
            for command, entry in self.pending.items():
                total = totals.setdefault(command, _empty_entry())
                for key in ("ok", "error", "sum"):
                    total[key] += entry[key]
                total["buckets"] = [a + b for a, b in zip(total["buckets"], entry["buckets"], strict=True)]
            sd.replace(CNI_FILE, json.dumps({"format_version": 1, "commands": totals}, sort_keys=True))
        self.pending = {}

    @staticmethod
    def load(state_dir) -> dict[str, dict]:
        """The totals in the state dir ({} when there are none, or when the file is not weft's)."""
        from weft.store.statedir import StateDir
        sd = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir, create=False)
        return _checked(_read(sd))


def _empty_entry() -> dict:
    return {"ok": 0, "error": 0, "sum": 0.0, "buckets": [0] * len(CNI_BUCKETS)}


def _read(sd):
    from weft.store.statedir import CorruptState
    try:
        return sd.read_json(CNI_FILE, limit=CNI_FILE_LIMIT)
    except CorruptState:
        return None


def _checked(data) -> dict[str, dict]:
    """The totals if `data` is exactly the shape weft writes, else {}."""
    if not isinstance(data, dict) or data.get("format_version") != 1 or not isinstance(data.get("commands"), dict):
        return {}
    out = {}
    for command, entry in data["commands"].items():
        if command not in CNI_COMMANDS or not isinstance(entry, dict):
            return {}
        counts: list = [entry.get("ok"), entry.get("error")]
        buckets = entry.get("buckets")
        if (not all(type(c) is int and c >= 0 for c in counts)
                or not isinstance(entry.get("sum"), int | float) or not math.isfinite(entry["sum"])
                or entry["sum"] < 0 or not isinstance(buckets, list) or len(buckets) != len(CNI_BUCKETS)
                or not all(type(b) is int and b >= 0 for b in buckets) or sum(buckets) > sum(counts)):
            return {}
        out[command] = {"ok": counts[0], "error": counts[1], "sum": float(entry["sum"]), "buckets": list(buckets)}
    return out

