"""The API source's warnings honour `--log-format json` (desired.discovery's `warn` callback).

API discovery warns when a newer Calico kind (Tier, FelixConfiguration) is served by neither of
Calico's groups; it runs in the forked child that reads the API server. With `--log-format json`
every stderr line must be one JSON event of the run (a log pipeline parses them), so the warning
goes through the run's event log, not as a `weft: warning:` line.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr

import pytest

from tests.cninode import entered
from tests.kubeapi import FakeKubeAPI
from tests.nodens import NODE, WeftNode, namespace, node_netns, pod, usable
from weft.reconciler.logs import EventLog
from weft.reconciler.observe import Observer

NO_NEWER_KINDS = "serves no Tier, FelixConfiguration"


def test_observer_warnings_are_log_events_when_there_is_a_log_else_lines():
    out = io.StringIO()
    Observer(log=EventLog("json", node="n1", command="apply", stream=out)).warning("careful\nnow")
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (record["level"], record["phase"], record["msg"]) == ("warning", "read", "careful\nnow")
    err = io.StringIO()
    with redirect_stderr(err):
        Observer().warning("careful")
    assert err.getvalue() == "weft: warning: careful\n"


def test_a_json_logged_run_whose_discovery_warns_writes_only_json_lines(tmp_path):
    """`weft plan --log-format json` against an API server without Tier or FelixConfiguration:
    the discovery warning is a JSON event of the run (level warning), and nothing else is on
    stderr; without --log-format json it is the usual `weft: warning:` line."""
    if usable():
        pytest.skip(usable())
    with node_netns() as ns:
        fake = FakeKubeAPI([namespace("a"), pod("a", "web", "198.18.0.10", {"app": "web"})])  # needed kinds only
        with entered(ns):
            fake.__enter__()
        try:
            kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
            node = WeftNode(ns, tmp_path / "state")
            done = node.weft("plan", "--kubeconfig", kubeconfig, "--log-format", "json")
            lines = done.stderr.splitlines()
            events = [json.loads(line) for line in lines]          # every line is JSON
            warned = [e for e in events if NO_NEWER_KINDS in e["msg"]]
            assert len(warned) == 1 and warned[0]["level"] == "warning", done.stderr
            assert {e["run_id"] for e in events} == {events[0]["run_id"]}
            assert all(e["node"] == NODE and e["command"] == "plan" for e in events)
            (tmp_path / "state" / "api-discovery.json").unlink()     # discovered again: warned again
            fake.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "moved", "namespace": "a"}})
            text = node.weft("plan", "--kubeconfig", kubeconfig)
            assert [line for line in text.stderr.splitlines() if NO_NEWER_KINDS in line] == [
                f"weft: warning: the API server at {fake.url} {NO_NEWER_KINDS}: weft reads none (policies are in "
                "the default tier, Felix's settings are the defaults); to read them, apply weft's CRDs "
                "(kubectl apply -f playbooks/kubernetes/crds.yaml) or install Calico"], text.stderr
        finally:
            fake.__exit__(None, None, None)
