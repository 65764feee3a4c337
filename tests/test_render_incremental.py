"""Incremental rendering: reusing a previous render's sets gives exactly what a full render gives.

A run after policies changed, while the endpoints and namespaces did not, takes the members of
the peer and named-port sets from the last render instead of matching every endpoint again.
The result must not depend on what was reused: same chains, same sets, same descriptions, in
the same order, so the same bytes reach the kernel. Checked on random clusters and random
changes between them, through several runs in a row, and through `desired_state` with its cache.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nodens import namespace, pod, policy, write_manifests
from tests.test_render import kernel_input
from weft.desired.loader import build_cluster_state
from weft.model.kernel import Dataplane
from weft.reconciler import run
from weft.renderers.iptables import render_node

NODE = "n1"
NAMESPACES = [namespace("a", team="a"), namespace("b", team="b", env="prod"), namespace("c", env="dev")]
LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y", "web"]), max_size=2)
PORTS = st.lists(st.one_of(st.integers(1, 65535).map(lambda p: {"port": p}),
                           st.sampled_from(["http", "dns"]).map(lambda n: {"port": n}),
                           st.sampled_from(["UDP", "TCP"]).map(lambda p: {"protocol": p, "port": 53})),
                 max_size=3)
PEER = st.one_of(
    LABELS.map(lambda labels: {"podSelector": {"matchLabels": labels}}),
    st.sampled_from(["a", "b"]).map(lambda t: {"namespaceSelector": {"matchLabels": {"team": t}}}),
    st.just({"namespaceSelector": {}}),
    st.sampled_from(["198.18.0.0/16", "198.19.7.0/24"]).map(lambda c: {"ipBlock": {"cidr": c}}),
    st.just({"ipBlock": {"cidr": "198.18.0.0/15", "except": ["198.18.9.0/24", "198.18.10.0/24"]}}),
)
RULE = st.fixed_dictionaries({"ports": PORTS}, optional={"from": st.lists(PEER, max_size=2)})
SPEC = st.fixed_dictionaries({
    "podSelector": LABELS.map(lambda labels: {"matchLabels": labels}),
    "ingress": st.lists(RULE, max_size=2),
    "egress": st.lists(RULE.map(lambda r: {"ports": r["ports"], "to": r.get("from", [])}), max_size=2),
    "policyTypes": st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
})
PODS = st.lists(st.tuples(st.sampled_from("abc"), LABELS, st.sampled_from([NODE, NODE, "n2"])), max_size=8)
POLICIES = st.dictionaries(st.tuples(st.sampled_from("abc"), st.sampled_from(["p0", "p1", "p2", "p3"])), SPEC,
                           max_size=6)


def cluster(pods, policies) -> list[dict]:
    ports = (("http", 8080, "TCP"), ("dns", 53, "UDP"))
    return NAMESPACES + [pod(ns, f"pod{i}", f"198.18.0.{i + 10}", labels, node, ports)
                         for i, (ns, labels, node) in enumerate(pods)] + \
        [policy(ns, name, spec) for (ns, name), spec in sorted(policies.items())]


def basis(state) -> str:
    """What set members are computed from (the caller's digest, here of the values themselves)."""
    return hashlib.sha256(repr((state.endpoints, sorted(state.namespaces.items()))).encode()).hexdigest()


def same_render(a: Dataplane, b: Dataplane) -> None:
    """Equal, and equal in what equality does not look at: descriptions and order."""
    assert a == b
    assert [(k, c.about) for k, c in a.chains.items()] == [(k, c.about) for k, c in b.chains.items()]
    assert [(k, s.about) for k, s in a.ipsets.items()] == [(k, s.about) for k, s in b.ipsets.items()]
    assert kernel_input(a) == kernel_input(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(PODS, POLICIES, st.booleans()), min_size=2, max_size=4))
def test_incremental_render_equals_a_full_render(steps):
    """Each step is a new cluster (pods kept as they were when the flag says so, to reuse sets)."""
    previous, pods = None, None
    for new_pods, policies, keep_pods in steps:
        pods = pods if keep_pods and pods is not None else new_pods
        state = build_cluster_state([("t.yaml", o) for o in cluster(pods, policies)])
        reuse = previous[1].ipsets if previous and previous[0] == basis(state) else None
        incremental = render_node(state, NODE, reuse=reuse)
        same_render(incremental, render_node(state, NODE))
        previous = basis(state), incremental


def test_one_changed_policy_reuses_every_peer_set():
    pods = [("a", {"app": "x"}, NODE), ("b", {"app": "y", "tier": "web"}, NODE), ("c", {}, "n2")]
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "y"}}}],
                                            "ports": [{"port": "http"}]}]}
    policies = {("a", "p0"): spec, ("b", "p1"): spec}
    before = build_cluster_state([("t.yaml", o) for o in cluster(pods, policies)])
    first = render_node(before, NODE)
    changed = {("a", "p0"): spec | {"ingress": [spec["ingress"][0] | {"ports": [{"port": 8443}]}]},
               ("b", "p1"): spec}
    after = build_cluster_state([("t.yaml", o) for o in cluster(pods, changed)])
    assert basis(after) == basis(before)
    again = render_node(after, NODE, reuse=first.ipsets)
    same_render(again, render_node(after, NODE))
    assert again.ipsets and all(again.ipsets[n] is first.ipsets[n] for n in again.ipsets)


def test_desired_state_through_the_cache_equals_a_fresh_render(tmp_path: Path):
    """Runs with one change each, against the state dir's cache, end where a fresh run does."""
    pods = [("a", {"app": "x"}, NODE), ("b", {"app": "y"}, NODE), ("a", {"tier": "web"}, "n2")]
    spec = {"podSelector": {"matchLabels": {"app": "x"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}], "ports": [{"port": "http"}]}]}
    changes = [
        (pods, {("a", "p0"): spec}),
        (pods, {("a", "p0"): spec | {"ingress": [{"ports": [{"port": 8443}]}]}}),   # a policy changed
        (pods, {("a", "p0"): spec, ("b", "p1"): spec}),                               # one added
        (pods + [("b", {"tier": "web"}, NODE)], {("a", "p0"): spec, ("b", "p1"): spec}),   # a pod added
        (pods, {("b", "p1"): spec}),                                                  # both removed
    ]
    for i, (p, policies) in enumerate(changes):
        write_manifests(tmp_path / "src", cluster(p, policies))
        opts = run.Options(node=NODE, state_dir=tmp_path / "state", from_dir=str(tmp_path / "src"))
        cached = run.desired_state(opts)
        fresh = run.desired_state(run.Options(node=NODE, state_dir=tmp_path / f"fresh{i}",
                                              from_dir=str(tmp_path / "src")))
        assert cached.dataplane == fresh.dataplane
        assert kernel_input(cached.dataplane) == kernel_input(fresh.dataplane)
        assert cached.snapshot["pods"] == fresh.snapshot["pods"]
