"""A pod's policy programmed at creation (the CNI plugin's add_endpoint), on a real kernel.

The rules: a pod a reconcile run already knew is left as that run programmed it; a pod it did
not know is closed in a direction where a policy of its namespace might apply, open where none
could; a node where weft never ran gets weft's base chains first; removal is idempotent; pods
added at the same time all end up dispatched exactly once.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.nodens import REPO, WeftNode, chain_rules, namespace, node_ns, pod, policy, usable, write_manifests
from weft.model.names import host_iface_name

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node_ns = node_ns  # the fixture

DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}


def endpoint_call(ns: str, state_dir, call: str) -> subprocess.CompletedProcess:
    code = f"from pathlib import Path\nfrom weft.reconciler.endpoint import *\n{call}"
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def add(ns, state_dir, namespace_, name, ips: tuple[str, ...] = ()):
    """add_endpoint as the CNI plugin calls it; without `ips` (addresses not known) in both families."""
    proc = endpoint_call(ns, state_dir, f"add_endpoint(Path({str(state_dir)!r}), {namespace_!r}, {name!r}, "
                                        f"{host_iface_name(namespace_, name)!r}, {tuple(ips)!r})")
    assert proc.returncode == 0, proc.stderr
    return host_iface_name(namespace_, name)


def applied(ns, tmp_path, objects) -> WeftNode:
    node = WeftNode(ns, tmp_path / "state")
    node.weft("apply", from_dir=write_manifests(tmp_path / "src", objects))
    return node


CLUSTER = [namespace("open"), namespace("guarded"),
           pod("guarded", "known", "198.18.2.10", {"app": "db"}), pod("open", "other", "198.18.2.11")]


def test_pod_programmed_by_the_reconcile_run_is_left_alone(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER + [policy("guarded", "deny", DENY_INGRESS)])
    before = node.state()
    iface = add(node_ns, node.state_dir, "guarded", "known", ("198.18.2.10",))
    assert node.state() == before
    assert chain_rules(node_ns, f"weft-tw-{iface}"), "the reconcile run's ingress chain is there"


def test_unknown_pod_is_closed_only_where_a_policy_might_apply(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER + [policy("guarded", "deny", DENY_INGRESS)])
    guarded = add(node_ns, node.state_dir, "guarded", "newcomer")
    opened = add(node_ns, node.state_dir, "open", "newcomer")
    assert [r.endswith("-j DROP") for r in chain_rules(node_ns, f"weft-tw-{guarded}")] == [True]
    assert chain_rules(node_ns, f"weft-fw-{guarded}") == [], "no egress policy in its namespace: open"
    assert chain_rules(node_ns, f"weft-tw-{opened}") == [] and chain_rules(node_ns, f"weft-fw-{opened}") == []
    for iface in (guarded, opened):
        assert sum(f"-i {iface} " in r for r in chain_rules(node_ns, "weft-from-wl-dispatch")) == 1
        assert sum(f"-o {iface} " in r for r in chain_rules(node_ns, "weft-to-wl-dispatch")) == 1
    # a dispatch chain still ends in the fail-closed DROP
    assert chain_rules(node_ns, "weft-from-wl-dispatch")[-1].endswith("-j DROP")


def test_known_pod_gets_its_exact_policy_when_its_chains_exist(node_ns, tmp_path):
    """A pod the snapshot knows (labels) whose policy chains exist gets the full run's chain."""
    allow = {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {}}]}]}
    node = applied(node_ns, tmp_path, CLUSTER + [policy("guarded", "allow", allow)])
    iface = host_iface_name("guarded", "known")
    expected = chain_rules(node_ns, f"weft-tw-{iface}")
    remove = endpoint_call(node_ns, node.state_dir, f"remove_endpoint(Path({str(node.state_dir)!r}), {iface!r})")
    assert remove.returncode == 0, remove.stderr
    assert chain_rules(node_ns, f"weft-tw-{iface}") == []
    add(node_ns, node.state_dir, "guarded", "known")
    assert chain_rules(node_ns, f"weft-tw-{iface}") == expected
    node.weft("apply", from_dir=tmp_path / "src")           # the next run: only dispatch order changes
    node.weft("drift", from_dir=tmp_path / "src", expect=0)


def test_remove_is_idempotent_and_leaves_no_trace(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER)
    before = node.state()
    iface = add(node_ns, node.state_dir, "open", "gone")
    for _ in range(2):
        proc = endpoint_call(node_ns, node.state_dir, f"remove_endpoint(Path({str(node.state_dir)!r}), {iface!r})")
        assert proc.returncode == 0, proc.stderr
    assert node.state() == before


def test_first_pod_on_a_node_where_weft_never_ran_gets_the_base_chains(node_ns, tmp_path):
    state = tmp_path / "state"
    iface = add(node_ns, state, "any", "first")
    rules = chain_rules(node_ns, "FORWARD")
    assert len([r for r in rules if "-j weft-FORWARD" in r]) == 1
    assert chain_rules(node_ns, f"weft-tw-{iface}")[-1].endswith("-j DROP"), "nothing known: closed"


def test_pods_added_at_once_are_each_dispatched_once(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER)
    names = [f"p{i}" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        ifaces = list(pool.map(lambda n: add(node_ns, node.state_dir, "open", n), names))
    dispatch = chain_rules(node_ns, "weft-from-wl-dispatch")
    for iface in ifaces:
        assert sum(f"-i {iface} " in r for r in dispatch) == 1
    assert dispatch[-1].endswith("-j DROP")
