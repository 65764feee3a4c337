"""Convergence on a real kernel: wherever a node starts from, one apply of state S leaves exactly
what applying S to a bare node leaves -- after any sequence of earlier states, and after an apply
killed with SIGKILL at any moment.

The reference for each desired state is made once, in a fresh node namespace. States differ in
their policies (none, default deny, pod and namespace selectors, ipBlock with except, named ports,
several at once) and in their pods (some added, some removed). Examples are bounded and
derandomized so that the file runs in well under two minutes and CI sees the same cases each time.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import nodens
from tests.nodens import describe, kernel_state, namespace, node_netns, pod, policy, run_weft, start_weft

if (why := nodens.usable()) is not None:
    pytest.skip(why, allow_module_level=True)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow])

NAMESPACES = [namespace("alpha", team="a"), namespace("beta", team="b"), namespace("gamma", team="c")]
WEB = pod("alpha", "web", "198.18.0.10", {"app": "web"}, ports=(("http", 80, "TCP"), ("metrics", 9100, "TCP")))
API = pod("alpha", "api", "198.18.0.11", {"app": "api"}, ports=(("http", 8080, "TCP"), ("dns", 53, "UDP")))
BETA_WEB = pod("beta", "web", "198.18.0.20", {"app": "web"}, ports=(("http", 8000, "TCP"), ("chat", 9000, "SCTP")))
WORKER = pod("beta", "worker", "198.18.0.21", {"app": "worker"})
DB = pod("gamma", "db", "198.18.0.30", {"app": "db"}, ports=(("pg", 5432, "TCP"),))
REMOTE = pod("alpha", "remote", "198.18.1.10", {"app": "web"}, node="n2", ports=(("http", 81, "TCP"),))
CLIENT = pod("gamma", "client", "198.18.1.30", {"app": "client"}, node="n2")
BASE_PODS = [WEB, API, BETA_WEB, WORKER, DB, REMOTE, CLIENT]
CHANGED_PODS = [WEB, BETA_WEB, WORKER, DB, REMOTE, CLIENT,                       # alpha/api removed
                pod("beta", "new", "198.18.0.22", {"app": "web"}, ports=(("http", 8001, "TCP"),)),
                pod("alpha", "remote2", "198.18.1.11", {"app": "api"}, node="n2", ports=(("dns", 5353, "UDP"),)),
                pod("gamma", "web", "198.18.0.31", {"app": "web"}, ports=(("http", 80, "TCP"),))]

DEFAULT_DENY = [
    policy("alpha", "deny-ingress", {"podSelector": {}}),
    policy("gamma", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
]
POD_SELECTOR = [
    policy("alpha", "allow-web", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": 80}]}]}),
    policy("beta", "worker-to-web", {
        "podSelector": {"matchLabels": {"app": "worker"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
]
NAMESPACE_SELECTOR = [
    policy("gamma", "db-clients", {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}}],
            "ports": [{"port": "pg"}]}]}),
    policy("alpha", "from-anywhere-in-cluster", {
        "podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
]
IP_BLOCK = [
    policy("beta", "egress-in-range", {
        "podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.18.0.0/15", "except": ["198.18.1.0/24", "198.18.0.20/32"]}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"port": 1000, "endPort": 2000}]}],
        "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.2.0/24"}}, {"ipBlock": {"cidr": "2001:db8::/32"}},
                              {"ipBlock": {"cidr": "198.18.4.0/24"}}]}]}),
]
NAMED_PORT = [
    policy("alpha", "http-by-name", {
        "podSelector": {}, "ingress": [{"ports": [{"port": "http"}, {"protocol": "UDP", "port": "dns"}]}]}),
    policy("beta", "egress-named", {
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {}}],
                    "ports": [{"protocol": "UDP", "port": "dns"}, {"port": "http"},
                              {"protocol": "SCTP", "port": "chat"}]}]}),
]

POOL = {
    "none": NAMESPACES + BASE_PODS,
    "default-deny": NAMESPACES + BASE_PODS + DEFAULT_DENY,
    "pod-selector": NAMESPACES + BASE_PODS + POD_SELECTOR,
    "namespace-selector": NAMESPACES + BASE_PODS + NAMESPACE_SELECTOR,
    "ip-block": NAMESPACES + BASE_PODS + IP_BLOCK,
    "named-port": NAMESPACES + BASE_PODS + NAMED_PORT,
    "several-pods-changed": NAMESPACES + CHANGED_PODS + POD_SELECTOR + NAMESPACE_SELECTOR + IP_BLOCK,
    "named-port-pods-changed": NAMESPACES + CHANGED_PODS + NAMED_PORT + DEFAULT_DENY,
}
NAMES = sorted(POOL)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("desired")
    return {name: nodens.write_manifests(root / name, objects) for name, objects in POOL.items()}


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory) -> dict[str, dict]:
    """name -> the kernel state (both backends, ipsets; portable form) of a bare node after one
    apply of that state."""
    refs = {}
    for name, src in sources.items():
        with node_netns() as ns:
            proc = run_weft(ns, "apply", state_dir=tmp_path_factory.mktemp("ref-state"), from_dir=src)
            assert proc.returncode == 0, f"reference apply of {name}: " + describe(proc)
            refs[name] = kernel_state(ns, portable=True)
    assert len({json.dumps(r, sort_keys=True) for r in refs.values()}) == len(refs), "two pool states render alike"
    return refs


def apply_ok(ns: str, state_dir: str, src: Path) -> dict:
    proc = run_weft(ns, "apply", "--output", "json", state_dir=state_dir, from_dir=src)
    assert proc.returncode == 0, describe(proc)
    return json.loads(proc.stdout)


@SETTINGS
@given(sequence=st.lists(st.sampled_from(NAMES), min_size=1, max_size=5))
def test_any_sequence_ends_in_the_last_states_reference(sources, references, sequence):
    """Each state is written in turn into the same --from directory (as a checkout or a sync
    job would update it), so what weft keeps in its state dir between runs is exercised too."""
    with node_netns() as ns, tempfile.TemporaryDirectory() as state_dir, tempfile.TemporaryDirectory() as src:
        for name in sequence:
            apply_ok(ns, state_dir, nodens.write_manifests(Path(src), POOL[name]))
        assert kernel_state(ns, portable=True) == references[sequence[-1]], f"after {sequence}"
        assert apply_ok(ns, state_dir, sources[sequence[-1]])["commands"] == []


def _wait_until_empty(ns: str) -> None:
    for _ in range(200):
        if not nodens.sh("ip", "netns", "pids", ns, check=False).stdout.split():
            return
        time.sleep(0.01)
    raise AssertionError(f"processes still running in {ns} after SIGKILL")


def _wait_for_child(proc, count: int) -> int:
    """Wait until `proc` has started its `count`-th child (a kernel tool: iptables-save, ipset
    restore, ...) or has ended; return how many children were seen."""
    seen: set[str] = set()
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while len(seen) < count and proc.poll() is None:
        try:
            seen.update(children.read_text().split())
        except OSError:
            break
        time.sleep(0.0002)
    return len(seen)


def kill_and_rerun(sources, references, start: str, target: str, after_child: int, delay_ms: float) -> None:
    """Apply `start`; start applying `target`, SIGKILL it (and the tool it runs) `delay_ms` after
    its `after_child`-th kernel command began (0: after it started); apply `target` again: the
    node must end exactly like a bare node given `target`, and a further apply do nothing."""
    with node_netns() as ns, tempfile.TemporaryDirectory() as state_dir:
        apply_ok(ns, state_dir, sources[start])
        proc = start_weft(ns, "apply", state_dir=state_dir, from_dir=sources[target])
        seen = _wait_for_child(proc, after_child)
        time.sleep(delay_ms / 1000)
        try:
            os.killpg(proc.pid, signal.SIGKILL)    # weft and whatever kernel tool it was running
        except ProcessLookupError:
            pass                                   # it had already finished
        proc.communicate(timeout=30)
        _wait_until_empty(ns)
        where = f"{start} -> {target}, killed {delay_ms} ms after child {after_child} (saw {seen}): " \
                f"exit {proc.returncode}"

        apply_ok(ns, state_dir, sources[target])
        assert kernel_state(ns, portable=True) == references[target], where
        assert apply_ok(ns, state_dir, sources[target])["commands"] == [], where


@SETTINGS
@given(pair=st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES)).filter(lambda p: p[0] != p[1]),
       delay_ms=st.integers(0, 300))
def test_apply_killed_at_a_random_moment_then_rerun_converges(sources, references, pair, delay_ms):
    kill_and_rerun(sources, references, *pair, after_child=0, delay_ms=delay_ms)


# An apply from "named-port" to "several-pods-changed" creates, updates and destroys sets and
# chains. Its kernel commands, in order: iptables -V, iptables-nft-save, ipset save (probe);
# ipset restore (new sets, members), iptables-nft-restore (one transaction), ipset restore
# (destroy unused sets); iptables-nft-save, ipset save (verify).
@pytest.mark.parametrize("after_child", range(1, 9))
def test_apply_killed_during_each_kernel_command_then_rerun_converges(sources, references, after_child):
    kill_and_rerun(sources, references, "named-port", "several-pods-changed", after_child, delay_ms=0.5)
