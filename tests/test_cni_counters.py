"""The plugin's calls are counted in its state dir (cni/counting.py), whoever ran them: the
resident helper, the call that started it, a call with "helper": false; and the apply run's
metrics file carries them (weft_cni_requests_total). Real kernel, node namespaces only.
"""
from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cninode import block, helper_pids, node, plugin_binary, wait_for_helper
from tests.nodens import WeftNode, namespace, usable
from weft.cni import spec
from weft.reconciler.metrics import CniCounters

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node, plugin_binary = node, plugin_binary  # the fixtures


def _counts(node) -> dict[str, tuple[int, int]]:
    return {command: (entry["ok"], entry["error"]) for command, entry in CniCounters.load(node.state_dir).items()}


def _wait_for_counts(node, expected: dict[str, tuple[int, int]], within: float = 10) -> None:
    """The helper adds its counts at most once a second, off the calls' path."""
    deadline = time.monotonic() + within
    while _counts(node) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _counts(node) == expected


def test_every_call_is_counted_once_whoever_ran_it(node, tmp_path):
    node.add("a")                                  # no helper yet: run here; the helper it starts counts it
    helper = wait_for_helper(node)
    node.add("b")                                  # served
    code, out, _ = node.call(node.env("ADD", "c"), mtu=5)    # served, refused
    assert (code, out["code"]) == (1, spec.INVALID_CONFIG)
    node.ok("DEL", "b", config={"helper": False})  # run by the plugin's own process
    _wait_for_counts(node, {"ADD": (2, 1), "DEL": (1, 0)})
    totals = CniCounters.load(node.state_dir)
    assert sum(totals["ADD"]["buckets"]) <= 3 and 0 < totals["ADD"]["sum"] < 60
    assert helper_pids(node) == [helper]
    node.ok("DEL", "a")
    _wait_for_counts(node, {"ADD": (2, 1), "DEL": (2, 0)})

    node.write([block("198.18.4.0/26"), namespace("x")])
    metrics = tmp_path / "weft.prom"
    WeftNode(node.ns, node.state_dir).weft("apply", "--metrics-file", str(metrics), from_dir=node.manifests)
    requests = {(s.labels["cni_command"], s.labels["result"]): s.value
                for family in text_string_to_metric_families(metrics.read_text()) for s in family.samples
                if s.name == "weft_cni_requests_total"}
    assert {k: v for k, v in requests.items() if v} == {("ADD", "ok"): 2, ("ADD", "error"): 1, ("DEL", "ok"): 2}


def test_a_call_on_a_state_dir_that_is_not_weft_s_counts_nothing_there(node):
    node.state_dir.mkdir(mode=0o700)
    node.state_dir.chmod(0o777)                    # writable by others: weft does not trust it
    code, out, _ = node.call(node.env("ADD", "a"))
    assert (code, out["code"]) == (1, spec.DESIRED_STATE)
    time.sleep(1.5)
    assert list(node.state_dir.iterdir()) == []
