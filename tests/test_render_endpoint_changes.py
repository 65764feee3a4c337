"""A render made from the previous one after pods and namespaces changed equals a full render.

renderers.incremental computes again only the sets a changed pod (or a pod of a changed
namespace) was or is selected by, and renders the chains again only when a changed pod is on
this node. Checked over random sequences of pod additions, removals, relabels, moves to another
namespace and namespace relabels, with IPv4-only, IPv6 and dual-stack pods and shared addresses,
each step made from the previous step's incremental render; and through `desired_state` with
the state dir's cache (which is where the previous render comes from in a real run).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nodens import namespace, pod, policy, write_manifests
from tests.test_render import kernel_input
from tests.test_render_incremental import POLICIES, same_render
from weft.desired.loader import build_cluster_state
from weft.model.cluster import ClusterState
from weft.reconciler import run
from weft.renderers import incremental
from weft.renderers.incremental import EndpointChanges, address_counts, rerender, valid_meanings
from weft.renderers.iptables import render_node_sets

NODE = "n1"
LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y", "web"]), max_size=2)
NS_LABELS = st.dictionaries(st.sampled_from(["team", "env"]), st.sampled_from(["a", "b", "prod"]), max_size=2)
# (namespace, labels, node, IPv4 address number or None, IPv6 address number or None): few
# numbers, so pods sometimes share an address.
POD = st.tuples(st.sampled_from("abc"), LABELS, st.sampled_from([NODE, "n2", "n2"]),
                st.one_of(st.none(), st.integers(1, 6)), st.one_of(st.none(), st.integers(1, 6))) \
    .filter(lambda p: p[3] is not None or p[4] is not None)
CHANGE = st.one_of(
    st.tuples(st.just("add"), st.sampled_from([f"q{i}" for i in range(8)]), POD),
    st.tuples(st.just("remove"), st.integers(0, 7), st.none()),
    st.tuples(st.just("relabel"), st.integers(0, 7), LABELS),
    st.tuples(st.just("move"), st.integers(0, 7), st.sampled_from("abc")),
    st.tuples(st.just("ns"), st.sampled_from("abc"), NS_LABELS),
)
PORTS = (("http", 8080, "TCP"), ("dns", 53, "UDP"))


def objects(pods: dict, namespaces: dict, policies: dict) -> list[dict]:
    out = [namespace(n, **labels) for n, labels in sorted(namespaces.items())]
    for (ns, name), (labels, node, v4, v6) in sorted(pods.items()):
        ip = f"198.18.0.{v4 + 10}" if v4 is not None else f"2001:db8::{v6 + 10:x}"
        out.append(pod(ns, name, ip, labels, node, PORTS, f"2001:db8::{v6 + 10:x}" if v4 is not None and v6 else None))
    return out + [policy(ns, name, spec) for (ns, name), spec in sorted(policies.items())]


def state_of(pods: dict, namespaces: dict, policies: dict) -> ClusterState:
    return build_cluster_state([("t.yaml", o) for o in objects(pods, namespaces, policies)])


def changes_between(before: ClusterState, after: ClusterState) -> EndpointChanges:
    """What the run's cache diff gives: changed pods' old and new versions, changed namespaces' old."""
    old = {e.key: e for e in before.endpoints}
    new = {e.key: e for e in after.endpoints}
    keys = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
    namespaces = {n: before.namespaces.get(n) for n in before.namespaces.keys() | after.namespaces.keys()
                  if before.namespaces.get(n) != after.namespaces.get(n)}
    return EndpointChanges(tuple(old[k] for k in sorted(keys) if k in old),
                           tuple(new[k] for k in sorted(keys) if k in new), namespaces)


def apply_change(pods: dict, namespaces: dict, change: tuple) -> None:
    what, target, arg = change
    keys = sorted(pods)
    if what == "add":
        ns, labels, node, v4, v6 = arg
        pods[(ns, target)] = (labels, node, v4, v6)
    elif what == "ns":
        namespaces[target] = arg
    elif keys:
        key = keys[target % len(keys)]
        labels, node, v4, v6 = pods.pop(key)
        if what == "relabel":
            pods[key] = (arg, node, v4, v6)
        elif what == "move":
            pods[(arg, key[1])] = (labels, node, v4, v6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(POD, max_size=6), POLICIES, st.lists(CHANGE, min_size=1, max_size=6))
def test_incremental_endpoint_changes_equal_a_full_render(first, policies, changes):
    pods = {(ns, f"p{i}"): (labels, node, v4, v6) for i, (ns, labels, node, v4, v6) in enumerate(first)}
    namespaces = {"a": {"team": "a"}, "b": {"team": "b", "env": "prod"}, "c": {"env": "prod"}}
    state = state_of(pods, namespaces, policies)
    rendered, meanings = render_node_sets(state, NODE)
    counts = address_counts(state.endpoints)
    for change in changes:
        apply_change(pods, namespaces, change)
        after = state_of(pods, namespaces, policies)
        diff = changes_between(state, after)
        made = rerender(after, NODE, (), rendered, meanings, diff, counts)
        full, full_meanings = render_node_sets(after, NODE)
        assert made is not None                     # pods only: never refused
        same_render(made[0], full)
        assert made[1].keys() == full_meanings.keys()   # (of two selectors of one meaning, either is kept)
        assert made[2] == address_counts(after.endpoints)
        # With only this node's pods and the changed namespaces' (what a run has without decoding
        # every pod): the same render, or None where that is not enough.
        touched = replace(after, endpoints=tuple(e for e in after.endpoints
                                                 if e.namespace in diff.namespaces or e.node == NODE))
        partly = rerender(touched, NODE, (), rendered, meanings, diff, counts, partial=True)
        if partly is not None:
            same_render(partly[0], full)
            assert partly[1].keys() == made[1].keys() and partly[2] == made[2]
        state, (rendered, meanings, counts) = after, made


def test_a_remote_change_renders_no_chain(monkeypatch):
    """A remote pod relabelled: only the sets that selected it, or select it now, change."""
    namespaces = {"a": {"team": "a"}, "b": {}, "c": {}}
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}],
                                            "ports": [{"port": "http"}]},
                                           {"from": [{"podSelector": {"matchLabels": {"app": "y"}}}]}]}
    pods = {("a", "local"): ({}, NODE, 1, None), ("a", "remote"): ({"app": "x"}, "n2", 2, None)}
    before = state_of(pods, namespaces, {("a", "p"): spec})
    rendered, meanings = render_node_sets(before, NODE)
    pods[("a", "remote")] = ({"app": "y"}, "n2", 2, None)
    after = state_of(pods, namespaces, {("a", "p"): spec})
    monkeypatch.setattr(incremental, "render_node_sets", None)      # must not be called
    made, *_ = rerender(after, NODE, (), rendered, meanings, changes_between(before, after))
    assert made.chains is rendered.chains
    changed = [n for n in made.ipsets if made.ipsets[n] is not rendered.ipsets[n]]
    assert len(changed) == 2                        # app == x (now empty), app == y (now the pod)
    assert sorted(sorted(made.ipsets[n].members) for n in changed) == [[], ["198.18.0.12"]]
    assert all(made.ipsets[n] is rendered.ipsets[n] for n in made.ipsets if n not in changed)


@pytest.mark.parametrize("damage", [
    lambda m: None, lambda m: [], lambda m: {},
    lambda m: {n: ("peers", "app == 'x'", "", None, 4) for n in m},            # not an EntityMatch
    lambda m: {n: (v[0], v[1], v[2], v[3], 5) for n, v in m.items()},           # no such family
    lambda m: {n: ("named-port" if v[0] == "peers" else "peers", *v[1:]) for n, v in m.items()},
])
def test_damaged_meanings_are_refused(damage):
    """Meanings come back from the cache: any that do not describe the render's sets are refused."""
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}],
                                            "ports": [{"port": "http"}]}]}
    state = state_of({("a", "l"): ({}, NODE, 1, 1)}, {"a": {}, "b": {}, "c": {}}, {("a", "p"): spec})
    rendered, meanings = render_node_sets(state, NODE)
    assert valid_meanings(meanings, rendered.ipsets) == meanings
    assert valid_meanings(damage(meanings), rendered.ipsets) is None


def test_runs_through_the_cache_render_incrementally(tmp_path: Path, monkeypatch):
    """In a real run the previous render comes from the state dir's cache: pod and namespace
    changes from one run to the next take the incremental path and end where a fresh run does."""
    calls = []
    real = incremental.rerender
    monkeypatch.setattr(incremental, "rerender", lambda *a, **k: calls.append(r := real(*a, **k)) or r)
    spec = {"podSelector": {"matchLabels": {"app": "x"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}},
                                  {"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                         "ports": [{"port": "http"}]}]}
    policies = {("a", "p0"): spec, ("b", "p1"): spec}
    namespaces = {"a": {"team": "a"}, "b": {"team": "b"}, "c": {}}
    pods = {("a", "l1"): ({"app": "x"}, NODE, 1, 1), ("b", "r1"): ({"tier": "web"}, "n2", 2, None),
            ("c", "r2"): ({}, "n2", 3, 3)}
    steps = [("relabel", 1, {"tier": "db"}), ("ns", "c", {"team": "a"}), ("add", "r3", ("c", {}, "n2", 4, None)),
             ("relabel", 0, {"app": "y"}), ("move", 2, "a"), ("remove", 0, None)]
    made = []
    for i, change in enumerate([None, *steps]):
        if change is not None:
            apply_change(pods, namespaces, change)
        calls.clear()
        write_manifests(tmp_path / "src", objects(pods, namespaces, policies))
        cached = run.desired_state(run.Options(node=NODE, state_dir=tmp_path / "state", from_dir=str(tmp_path / "src")))
        fresh = run.desired_state(run.Options(node=NODE, state_dir=tmp_path / f"fresh{i}",
                                              from_dir=str(tmp_path / "src")))
        assert cached.dataplane == fresh.dataplane
        assert kernel_input(cached.dataplane) == kernel_input(fresh.dataplane)
        assert cached.snapshot["pods"] == fresh.snapshot["pods"]
        made.append(any(c is not None for c in calls))
    assert made == [False] + [True] * len(steps)


def test_a_local_change_renders_only_its_pods_chains():
    """A local pod relabelled: its own chains are rendered again; the policies' chains are the
    previous render's (their rules depend only on the policy and its sets' names)."""
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}],
                                            "ports": [{"port": "http"}]}]}
    policies = {("a", "p"): spec, ("a", "q"): spec | {"podSelector": {"matchLabels": {"app": "x"}}}}
    namespaces = {"a": {}, "b": {}, "c": {}}
    pods = {("a", "one"): ({}, NODE, 1, 1), ("a", "two"): ({"app": "x"}, NODE, 2, None)}
    before = state_of(pods, namespaces, policies)
    rendered, meanings = render_node_sets(before, NODE)
    pods[("a", "one")] = ({"app": "x"}, NODE, 1, 1)
    after = state_of(pods, namespaces, policies)
    made, *_ = rerender(after, NODE, (), rendered, meanings, changes_between(before, after))
    same_render(made, render_node_sets(after, NODE)[0])
    policy_chains = [k for k in made.chains if k[1].startswith("weft-pi-")]
    # p in both tables, q in the IPv4 one (pod two, IPv4 only) and now in the IPv6 one (pod one)
    assert len(policy_chains) == 4
    assert [k for k in policy_chains if k not in rendered.chains] == [("filter6", policy_chains[-1][1])]
    assert all(made.chains[k] is rendered.chains[k] for k in policy_chains if k in rendered.chains)


def test_api_runs_render_pod_changes_without_the_whole_state(tmp_path: Path, monkeypatch):
    """From the API server, pod changes and namespace relabels are rendered from the last render
    with only this node's pods and the changed namespaces' decoded (the whole state is never
    assembled), and end where a fresh run does; a namespace added assembles it."""
    from tests.kubeapi import FakeKubeAPI
    from weft.desired import sources
    built = []
    real = sources._assembled
    monkeypatch.setattr(sources, "_assembled", lambda table: built.append(1) or real(table))
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}},
                                                     {"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                                            "ports": [{"port": "http"}]}]}
    namespaces = {"a": {"team": "a"}, "b": {"team": "b"}, "c": {}}
    pods = {("a", "l1"): ({"app": "x"}, NODE, 1, 1), ("b", "r1"): ({"tier": "web"}, "n2", 2, None),
            ("c", "r2"): ({}, "n2", 3, 3), ("c", "r3"): ({"tier": "web"}, "n2", 4, None)}
    first = objects(pods, namespaces, {("a", "p0"): spec})
    steps = [(("relabel", 1, {"tier": "db"}), False), (("ns", "c", {"team": "a"}), False),
             (("relabel", 3, {"tier": "db"}), False), (("relabel", 0, {"tier": "web"}), False),
             (("add", "l2", ("b", {"app": "x"}, NODE, 5, None)), False), (("ns", "a", {}), False),
             (("ns", "d", {"team": "a"}), True), (("move", 1, "d"), False), (("remove", 0, None), False)]
    with FakeKubeAPI(first) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kc")
        options = run.Options(node=NODE, state_dir=tmp_path / "state", kubeconfig=kubeconfig)
        run.desired_state(options)
        for i, (change, whole) in enumerate(steps):
            apply_change(pods, namespaces, change)
            for obj in objects(pods, namespaces, {("a", "p0"): spec}):
                api.put(obj)
            built.clear()
            cached = run.desired_state(options)
            assert bool(built) == whole, change
            fresh = run.desired_state(run.Options(node=NODE, state_dir=tmp_path / f"fresh{i}", kubeconfig=kubeconfig))
            assert cached.dataplane == fresh.dataplane
            assert kernel_input(cached.dataplane) == kernel_input(fresh.dataplane)
            assert {k: v for k, v in cached.snapshot.items() if k != "token"} == \
                {k: v for k, v in fresh.snapshot.items() if k != "token"}
            assert (cached.bird_config, cached.ipam, cached.ignored) == (fresh.bird_config, fresh.ipam, fresh.ignored)
