"""Metrics (Prometheus text, parsed back with prometheus_client's own parser) and JSON logs."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from weft.model.errors import WeftError
from weft.reconciler import logs, metrics
from weft.store.statedir import StateDir, UnsafeState


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _run() -> metrics.RunMetrics:
    run = metrics.RunMetrics(node="n1", command="apply", started=1_790_000_000.5)
    with run.phase("read"):
        pass
    run.phases["apply"] = 0.25
    run.success = True
    run.changes = metrics.changes_by_kind({"changes": {"ipsets": [{}], "chains": [{}, {}, {}], "hooks": [],
                                                       "routes": [{}], "links": [], "bird": [{"action": "update"}]}})
    run.drift_items = 4
    run.bgp_established, run.bgp_sessions = metrics.bgp_counts({"running": True, "peers": [
        {"info": "Established"}, {"info": "Established   "}, {"info": "Active        Socket: Connection refused"}]})
    run.ipam_blocks = metrics.ipam_blocks({"blocks": [{"cidr": "198.18.1.0/26", "used": 5, "size": 64}]})
    return run


def test_a_runs_metrics_parse_back_with_prometheus_clients_parser(tmp_path):
    counters = metrics.CniCounters()
    for seconds in (0.02, 0.03, 0.2, 30.0):
        counters.observe("ADD", seconds, ok=True)
    counters.observe("DEL", 0.004, ok=False)
    counters.flush(tmp_path / "state")
    path = tmp_path / "weft.prom"
    metrics.write(path, _run(), metrics.CniCounters.load(tmp_path / "state"))
    s = _samples(path.read_text())
    base = (("command", "apply"), ("node", "n1"))
    assert s[("weft_last_run_timestamp_seconds", base)] == 1_790_000_000.5
    assert s[("weft_last_run_success", base)] == 1.0
    assert s[("weft_last_run_duration_seconds", base)] >= 0
    assert s[("weft_last_run_phase_seconds", tuple(sorted(base + (("phase", "apply"),))))] == 0.25
    assert ("weft_last_run_phase_seconds", tuple(sorted(base + (("phase", "read"),)))) in s
    kinds = {k: s[("weft_last_run_changes", tuple(sorted(base + (("kind", k),))))] for k in metrics.CHANGE_KINDS}
    assert kinds == {"ipsets": 1, "chains": 3, "hooks": 0, "routes": 1, "links": 0, "bird": 1}
    assert s[("weft_drift_items", base)] == 4
    assert s[("weft_bgp_sessions_established", base)] == 2
    assert s[("weft_bgp_sessions", base)] == 3
    block = base + (("block", "198.18.1.0/26"),)
    assert s[("weft_ipam_block_addresses", tuple(sorted(block + (("state", "used"),))))] == 5
    assert s[("weft_ipam_block_addresses", tuple(sorted(block + (("state", "free"),))))] == 59
    add = (("cni_command", "ADD"), ("node", "n1"))
    assert s[("weft_cni_requests_total", tuple(sorted(add + (("result", "ok"),))))] == 4
    assert s[("weft_cni_requests_total", (("cni_command", "DEL"), ("node", "n1"), ("result", "error")))] == 1
    le = {b: s[("weft_cni_request_duration_seconds_bucket", tuple(sorted(add + (("le", b),))))]
          for b in ("0.025", "0.05", "0.25", "10.0", "+Inf")}
    assert le == {"0.025": 1, "0.05": 2, "0.25": 3, "10.0": 3, "+Inf": 4}
    assert s[("weft_cni_request_duration_seconds_count", add)] == 4
    assert s[("weft_cni_request_duration_seconds_sum", add)] == pytest.approx(30.25)
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_unmeasured_metrics_are_left_out():
    s = _samples(metrics.render(metrics.RunMetrics(node="n1", command="drift")).decode())
    names = {name for name, _ in s}
    assert names == {"weft_last_run_timestamp_seconds", "weft_last_run_success", "weft_last_run_duration_seconds"}
    assert s[("weft_last_run_success", (("command", "drift"), ("node", "n1")))] == 0.0


def test_the_metrics_file_is_replaced_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    path = tmp_path / "weft.prom"
    path.symlink_to(victim)
    metrics.write(path, _run())
    assert victim.read_text() == "untouched"
    assert not path.is_symlink() and "weft_last_run_success" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim", "weft.prom"]     # no temporary file left


def test_a_metrics_dir_others_can_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(WeftError, match="writable by group or others"):
        metrics.write(shared / "weft.prom", _run())
    assert list(shared.iterdir()) == []


def test_cni_counters_add_up_across_flushes_and_distrust_a_file_weft_did_not_write(tmp_path):
    state = tmp_path / "state"
    a, b = metrics.CniCounters(), metrics.CniCounters()
    a.observe("ADD", 0.03, ok=True)
    b.observe("ADD", 0.5, ok=False)
    b.observe("ADD", float("nan"), ok=True)         # not a duration: ignored
    b.observe("bogus", 0.1, ok=True)                # not a CNI command: ignored
    a.flush(state)
    b.flush(state)
    a.flush(state)                                  # nothing pending: nothing added
    assert metrics.CniCounters.load(state) == {"ADD": {"ok": 1, "error": 1, "sum": pytest.approx(0.53),
                                                       "buckets": [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]}}
    sd = StateDir(state)
    def add(**entry):
        return {"format_version": 1, "commands": {"ADD": {"ok": 1, "error": 0, "sum": 0, "buckets": [0] * 10} | entry}}

    for hostile in (add(ok=-1), add(buckets=[5] * 10), add(sum=1e999), add(ok=True), add(buckets=[0] * 9),
                    {"format_version": 2, "commands": {}}, [1, 2], "x"):
        sd.replace(metrics.CNI_FILE, json.dumps(hostile))
        assert metrics.CniCounters.load(state) == {}
    sd.replace(metrics.CNI_FILE, b"{not json")
    assert metrics.CniCounters.load(state) == {}
    c = metrics.CniCounters()
    c.observe("DEL", 0.01, ok=True)
    c.flush(state)                                  # a file weft did not write is started afresh
    assert metrics.CniCounters.load(state)["DEL"]["ok"] == 1
    sd.replace(metrics.CNI_FILE, b" " * (metrics.CNI_FILE_LIMIT + 1))
    with pytest.raises(UnsafeState):
        metrics.CniCounters.load(state)
    os.unlink(sd.file(metrics.CNI_FILE))
    os.symlink(tmp_path / "elsewhere.json", sd.file(metrics.CNI_FILE))
    with pytest.raises(UnsafeState, match="symbolic link"):
        metrics.CniCounters.load(state)


def test_metrics_and_logs_cost_nothing_to_import():
    """The CNI plugin may import them: no third-party module comes with them."""
    code = ("import sys; before = set(sys.modules); import weft.reconciler.metrics, weft.reconciler.logs; "
            "print(' '.join(sorted(m for m in set(sys.modules) - before if not m.startswith('weft'))))")
    loaded = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    extra = set(loaded.stdout.split())
    assert not extra & {"prometheus_client", "yaml", "kubernetes", "jinja2", "json", "urllib3"}, extra


# --- logs ----------------------------------------------------------------------------------------

def test_json_logs_are_one_valid_object_per_line_with_run_node_phase_and_counts():
    out = io.StringIO()
    log = logs.EventLog("json", node="n1", command="apply", stream=out, clock=lambda: 1_790_000_000.25)
    log.event("read", "desired state read", objects=120, changed=3)
    log.event("apply", "applied\nwith a newline\x1b[31m", chains=3, ipsets=1)
    log.error("bird", "BIRD rejected the config", peer="Global_198_18_0_9")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert all(r["run_id"] == log.run_id and r["node"] == "n1" and r["command"] == "apply" for r in records)
    assert records[0] == {"ts": "2026-09-21T14:13:20.250Z", "level": "info", "run_id": log.run_id, "node": "n1",
                          "command": "apply", "phase": "read", "msg": "desired state read", "objects": 120,
                          "changed": 3}
    assert records[1]["msg"] == "applied\nwith a newline\x1b[31m" and records[1]["chains"] == 3
    assert records[2]["level"] == "error" and records[2]["peer"] == "Global_198_18_0_9"


def test_a_field_cannot_overwrite_the_records_own_keys():
    out = io.StringIO()
    logs.EventLog("json", node="n1", command="apply", stream=out).event("read", "x", node="other", run_id="forged")
    record = json.loads(out.getvalue())
    assert record["node"] == "n1" and record["run_id"] != "forged"


def test_the_run_id_is_systemds_invocation_id(monkeypatch):
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert logs.EventLog("json").run_id == "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("INVOCATION_ID", "not-an-id\n")
    run_id = logs.EventLog("json").run_id
    assert len(run_id) == 32 and run_id != "not-an-id\n"


def test_text_logs_are_one_line_for_a_person():
    out = io.StringIO()
    log = logs.EventLog("text", node="n1", command="apply", stream=out)
    log.event("apply", "applied\nsecond line", chains=3)
    log.event("bird", "reload skipped", level="warning")
    assert out.getvalue().splitlines() == ["weft apply [n1] apply: applied\\nsecond line chains=3",
                                           "WARNING: weft apply [n1] bird: reload skipped"]
    with pytest.raises(ValueError):
        logs.EventLog("xml")


def test_a_real_run_writes_its_metrics_and_logs_json_lines(tmp_path):
    """`weft apply --metrics-file F --log-format json` on a node namespace: F parses back with
    prometheus_client and names the run's phases and changes; every stderr line is one JSON event
    of this run; a failed run (bad input) still writes F, with success 0."""
    from tests.nodens import NODE, WeftNode, namespace, node_netns, pod, policy, usable, write_manifests
    if usable():
        pytest.skip(usable())
    manifests = write_manifests(tmp_path / "m", [
        namespace("a"), pod("a", "web", "198.18.0.10", {"app": "web"}),
        policy("a", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    prom = tmp_path / "weft.prom"
    with node_netns() as ns:
        node = WeftNode(ns, tmp_path / "state")
        done = node.weft("apply", "--metrics-file", str(prom), "--log-format", "json", from_dir=manifests)
        events = [json.loads(line) for line in done.stderr.splitlines()]
        assert events and {e["run_id"] for e in events} == {events[0]["run_id"]}
        assert {"read", "lock", "diff", "apply", "verify"} <= {e["phase"] for e in events}
        assert all(e["node"] == NODE and e["command"] == "apply" for e in events)
        samples = _samples(prom.read_text())
        assert samples[("weft_last_run_success", (("command", "apply"), ("node", NODE)))] == 1.0
        assert samples[("weft_last_run_changes", (("command", "apply"), ("kind", "chains"), ("node", NODE)))] > 0
        assert ("weft_last_run_phase_seconds", (("command", "apply"), ("node", NODE), ("phase", "apply"))) in samples
        (manifests / "bad.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_Name}\n")
        failed = node.weft("apply", "--metrics-file", str(prom), "--log-format", "json", from_dir=manifests,
                           expect=1)
        errors = [json.loads(line) for line in failed.stderr.splitlines()]
        assert any(e["level"] == "error" and "Bad_Name" in e["msg"] for e in errors)
        assert _samples(prom.read_text())[("weft_last_run_success", (("command", "apply"), ("node", NODE)))] == 0.0
