"""A render made from the previous one after policies changed equals a full render (issue #14).

When the change since the last render is policies (Kubernetes NetworkPolicies, Calico
NetworkPolicies and GlobalNetworkPolicies added, changed or removed), possibly with pod and
namespace changes, renderers.incremental renders the chains again taking every unchanged
policy's chain and every set from the previous render; only the changed policies' chains are
rendered from their rules, and a set of a selector the previous render lacks is computed from
every pod. Checked over random sequences of policy edits (selectors old and new, ports by number
and name, ipBlocks with excepts, Calico nets, notSelectors, tiers and orders) mixed with pod
changes, each step made from the previous step's incremental render; and through `desired_state`
from the API server and from a manifest directory, where a policy edit whose sets the last render
has is rendered without decoding a single pod.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nodens import namespace, pod, policy
from tests.test_render import kernel_input
from tests.test_render_endpoint_changes import CHANGE, LABELS, NODE, PORTS, apply_change, changes_between
from tests.test_render_incremental import POLICIES, SPEC, same_render
from weft.desired.loader import build_cluster_state
from weft.model.cluster import ClusterState, Endpoint
from weft.reconciler import run
from weft.renderers import incremental
from weft.renderers.incremental import EndpointChanges, address_counts, rerender
from weft.renderers.iptables import render_node_sets

CALICO = "projectcalico.org/v3"
STORED = "crd.projectcalico.org/v1"
TIER = {"apiVersion": CALICO, "kind": "Tier", "metadata": {"name": "sec"},
        "spec": {"order": 10, "defaultAction": "Pass"}}
NETS = {4: [{"nets": ["198.18.0.0/16"]}, {"nets": ["198.18.0.0/16", "198.19.7.0/24"]},
            {"notNets": ["198.18.0.16/30"]}, {"nets": ["198.18.0.0/15"], "notNets": ["198.18.0.16/30"]}],
        6: [{"nets": ["2001:db8::/64"]}, {"notNets": ["2001:db8::10/126"]}]}


def entity(family: int):
    """A rule side; its nets of `family` (a rule's CIDRs are of one family)."""
    return st.fixed_dictionaries({}, optional={
        "selector": st.sampled_from(["app == 'x'", "tier == 'web'", "has(app)", "app == 'z'"]),
        "namespaceSelector": st.sampled_from(["team == 'a'", "all()", "env == 'prod'"]),
        "notSelector": st.sampled_from(["app == 'y'"]),
        "ports": st.sampled_from([[8080], ["http"], [53, "dns"], ["1000:2000"]]),
    }).flatmap(lambda side: st.sampled_from([{}, *NETS[family]]).map(lambda nets: side | nets))


CALICO_RULE = st.sampled_from([4, 6]).flatmap(lambda family: st.fixed_dictionaries(
    {"action": st.sampled_from(["Allow", "Deny", "Pass", "Log"]), "protocol": st.sampled_from(["TCP", "UDP"])},
    optional={"source": entity(family), "destination": entity(family)}))
CALICO_SPEC = st.fixed_dictionaries({
    "selector": st.sampled_from(["all()", "app == 'x'", "tier == 'web'", "has(tier)"]),
    "types": st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
    "ingress": st.lists(CALICO_RULE, max_size=2),
    "egress": st.lists(CALICO_RULE, max_size=2),
}, optional={"order": st.sampled_from([5, 100, 1000]), "tier": st.just("sec"),
             "namespaceSelector": st.sampled_from(["team == 'a'", "all()"])})
# (kind, namespace or None, name): a Calico NetworkPolicy ("cnp") or GlobalNetworkPolicy ("gnp").
CALICO_KEY = st.one_of(st.tuples(st.just("cnp"), st.sampled_from("abc"), st.sampled_from(["c0", "c1"])),
                       st.tuples(st.just("gnp"), st.none(), st.sampled_from(["g0", "g1"])))
EDIT = st.one_of(          # a policy added, replaced or removed (None); or an existing one (by position) changed
    st.tuples(st.just("k8s"), st.tuples(st.sampled_from("abc"), st.sampled_from(["p0", "p1", "p2", "p3"])),
              st.one_of(st.none(), SPEC)),
    st.tuples(st.just("calico"), CALICO_KEY, st.one_of(st.none(), CALICO_SPEC)),
    st.tuples(st.just("k8s"), st.integers(0, 5), SPEC),
    st.tuples(st.just("calico"), st.integers(0, 5), CALICO_SPEC),
    st.tuples(st.just("k8s-rules"), st.integers(0, 5), SPEC),         # its rules only: it selects the same pods
    st.tuples(st.just("calico-rules"), st.integers(0, 5), CALICO_SPEC),
)
# More of this node's pods than tests.test_render_endpoint_changes' POD: a changed policy's chain
# is often there before and after.
LOCAL_POD = st.tuples(st.sampled_from("abc"), LABELS, st.sampled_from([NODE, NODE, "n2"]),
                      st.one_of(st.none(), st.integers(1, 6)), st.one_of(st.none(), st.integers(1, 6))) \
    .filter(lambda p: p[3] is not None or p[4] is not None)


def calico_object(key: tuple, spec: dict, version: str = CALICO) -> dict:
    """A Calico policy as a user writes it (a tier's policies are named "<tier>.<name>")."""
    kind, ns, name = key
    spec = dict(spec)
    for direction in ("ingress", "egress"):
        if direction.capitalize() not in spec["types"]:
            spec.pop(direction, None)
    if kind == "cnp":
        spec.pop("namespaceSelector", None)
    meta = {"name": f"{spec['tier']}.{name}" if "tier" in spec else name}
    if ns is not None:
        meta["namespace"] = ns
    return {"apiVersion": version, "kind": "NetworkPolicy" if kind == "cnp" else "GlobalNetworkPolicy",
            "metadata": meta, "spec": spec}


class World:
    """Pods, namespaces and policies of both kinds, as the objects a source holds."""

    def __init__(self, pods: dict, kube: dict, calico: dict):
        self.pods, self.kube, self.calico = pods, kube, calico
        self.namespaces = {"a": {"team": "a"}, "b": {"team": "b", "env": "prod"}, "c": {"env": "prod"}}

    def objects(self, version: str = CALICO) -> list[dict]:
        """`version`: the API group of the Calico objects (an API server serving both is read
        from crd.projectcalico.org/v1: desired.api.choose_resources)."""
        out = [namespace(n, **labels) for n, labels in sorted(self.namespaces.items())]
        out.append(TIER | {"apiVersion": version})
        for (ns, name), (labels, node, v4, v6) in sorted(self.pods.items()):
            ip = f"198.18.0.{v4 + 10}" if v4 is not None else f"2001:db8::{v6 + 10:x}"
            out.append(pod(ns, name, ip, labels, node, PORTS,
                           f"2001:db8::{v6 + 10:x}" if v4 is not None and v6 else None))
        out += [policy(ns, name, spec) for (ns, name), spec in sorted(self.kube.items())]
        return out + [calico_object(k, spec, version) for k, spec in sorted(self.calico.items(), key=repr)]

    def state(self) -> ClusterState:
        return build_cluster_state([("t.yaml", o) for o in self.objects()])

    def apply(self, change: tuple) -> None:
        what, target, arg = change
        if what in ("k8s", "calico", "k8s-rules", "calico-rules"):
            table = self.kube if what.startswith("k8s") else self.calico
            if isinstance(target, int):
                if not table:
                    return
                target = sorted(table, key=repr)[target % len(table)]
            if what.endswith("-rules"):
                kept = ("podSelector",) if what == "k8s-rules" else ("selector", "namespaceSelector", "tier", "order")
                arg = {k: v for k, v in arg.items() if k not in kept} | {k: v for k, v in table[target].items()
                                                                          if k in kept}
            if arg is None:
                table.pop(target, None)
            else:
                table[target] = arg
        else:
            apply_change(self.pods, self.namespaces, change)


# A pod the CNI plugin wired that the desired state does not show yet: its chains are closed
# where a policy of its namespace (or a global one) might apply, which policy edits change.
PENDING = (Endpoint("b", "wired", NODE, "weftpending0", ("198.18.0.99",)),)


def changes_with_policies(before: ClusterState, after: ClusterState) -> EndpointChanges:
    """What the run's cache diff gives, policies included (their previous and current versions)."""
    was = {p.key: p for p in before.policies}
    now = {p.key: p for p in after.policies}
    keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    return replace(changes_between(before, after),
                   policies=tuple(was[k] for k in keys if k in was) + tuple(now[k] for k in keys if k in now))


def selection_sets(rendered) -> bool:
    """Whether a render holds sets of notSelectors (not computed from meanings: a render made from
    it is refused, and the run renders from scratch)."""
    return any(n.startswith(("weft-c-", "weft-c6-")) for n in rendered.ipsets)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(LOCAL_POD, min_size=1, max_size=7), POLICIES, st.dictionaries(CALICO_KEY, CALICO_SPEC, max_size=3),
       st.lists(st.one_of(EDIT, EDIT, CHANGE), min_size=1, max_size=6))
def test_policy_edits_render_as_a_full_render(first, kube, calico, changes):
    world = World({(ns, f"p{i}"): (labels, node, v4, v6) for i, (ns, labels, node, v4, v6) in enumerate(first)},
                  dict(kube), dict(calico))
    state = world.state()
    rendered, meanings = render_node_sets(state, NODE, PENDING)
    counts = address_counts(state.endpoints)
    for change in changes:
        world.apply(change)
        after = world.state()
        diff = changes_with_policies(state, after)
        made = rerender(after, NODE, PENDING, rendered, meanings, diff, counts)
        full, full_meanings = render_node_sets(after, NODE, PENDING)
        if made is None:
            assert selection_sets(rendered)          # refused only where the meanings cannot say
            state, rendered, meanings, counts = after, full, full_meanings, address_counts(after.endpoints)
            continue
        same_render(made[0], full)
        assert made[1].keys() == full_meanings.keys()
        assert made[2] == address_counts(after.endpoints)
        # With only this node's pods and the changed namespaces' (what a run has without decoding
        # every pod): the same render, or None where a set must be computed from every pod.
        touched = replace(after, endpoints=tuple(e for e in after.endpoints
                                                 if e.namespace in diff.namespaces or e.node == NODE))
        partly = rerender(touched, NODE, PENDING, rendered, meanings, diff, counts, partial=True)
        if partly is not None:
            same_render(partly[0], full)
            assert partly[1].keys() == made[1].keys() and partly[2] == made[2]
        state, (rendered, meanings, counts) = after, made


def test_a_changed_policy_renders_only_its_own_chains(monkeypatch):
    """A policy gains a port: its chain is rendered again; every other policy's chain and every
    set is the previous render's (no set is computed: the index of the pods is never built)."""
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}],
                                            "ports": [{"port": "http"}]}]}
    world = World({("a", "one"): ({}, NODE, 1, 1), ("a", "two"): ({"app": "x"}, "n2", 2, None)},
                  {("a", "p"): spec, ("a", "q"): spec | {"podSelector": {"matchLabels": {"app": "y"}}}},
                  {("gnp", None, "g0"): {"selector": "all()", "types": ["Ingress"], "ingress": [
                      {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'x'"}}]}})
    world.pods[("a", "three")] = ({"app": "y"}, NODE, 3, None)
    before = world.state()
    rendered, meanings = render_node_sets(before, NODE)
    world.kube[("a", "p")] = spec | {"ingress": [spec["ingress"][0] | {"ports": [{"port": "http"}, {"port": 8443}]}]}
    after = world.state()

    def no_index():
        raise AssertionError("a set was computed from every pod")
    monkeypatch.setattr(incremental, "_not_whole", no_index)
    made, *_ = rerender(after, NODE, (), rendered, meanings, changes_with_policies(before, after),
                        address_counts(before.endpoints), partial=True)
    same_render(made, render_node_sets(after, NODE)[0])
    changed = [k for k in made.chains if made.chains[k] is not rendered.chains.get(k)]
    policy_chains = [k for k in changed if k[1].startswith(("weft-pi-", "weft-po-"))]
    assert len(policy_chains) == 2 and {k[0] for k in policy_chains} == {"filter", "filter6"}   # p, both tables
    assert all(made.chains[k] != rendered.chains[k] for k in policy_chains)
    assert all(made.ipsets[n] is rendered.ipsets[n] for n in made.ipsets)


def test_a_removed_policys_sets_go_and_a_new_selector_needs_every_pod():
    """A policy removed: its chain and the sets only it referred to are gone, as in a full render.
    A policy added with a selector no chain had: its set needs every pod (None with a partial state)."""
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}]}]}
    world = World({("a", "one"): ({}, NODE, 1, None), ("b", "two"): ({"tier": "web"}, "n2", 2, None)},
                  {("a", "p"): spec}, {})
    before = world.state()
    rendered, meanings = render_node_sets(before, NODE)
    assert [n for n in rendered.ipsets if n.startswith("weft-s-")]
    world.kube.clear()
    after = world.state()
    counts = address_counts(before.endpoints)
    made, *_ = rerender(after, NODE, (), rendered, meanings, changes_with_policies(before, after), counts,
                        partial=True)
    same_render(made, render_node_sets(after, NODE)[0])
    assert not [n for n in made.ipsets if n.startswith("weft-s-")]
    world.kube[("a", "p")] = spec | {"ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "db"}}}]}]}
    again = world.state()
    diff = changes_with_policies(after, again)
    local_only = replace(again, endpoints=again.local_endpoints(NODE))
    assert rerender(local_only, NODE, (), made, meanings, diff, counts, partial=True) is None
    whole, *_ = rerender(again, NODE, (), made, meanings, diff, counts)
    same_render(whole, render_node_sets(again, NODE)[0])


STEPS = [  # (change, whether the whole state (every pod) is decoded)
    (("k8s", ("a", "p0"), {"podSelector": {"matchLabels": {"app": "x"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                                        "ports": [{"port": "http"}, {"port": 8443}]}]}), False),
    (("calico", ("gnp", None, "g0"), {"selector": "app == 'x'", "types": ["Ingress"], "order": 5, "ingress": [
        {"action": "Deny", "protocol": "TCP", "source": {"nets": ["198.18.0.0/16", "198.19.7.0/24"]},
         "destination": {"ports": [8080]}}]}), False),
    (("calico", ("cnp", "a", "c0"), {"selector": "all()", "types": ["Ingress"], "tier": "sec", "ingress": [
        {"action": "Pass", "protocol": "TCP",       # the set of policy p0's peers (a Kubernetes selector)
         "source": {"selector": "projectcalico.org/orchestrator == 'k8s' && tier == 'web'"}}]}), False),
    (("calico", ("gnp", None, "g1"), {"selector": "all()", "types": ["Ingress"], "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "tier == 'web'"}}]}), True),   # any namespace's
    (("k8s", ("b", "p1"), {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "q"}}}]}]}),
     True),                                               # a selector no set had: every pod is needed
    (("relabel", 1, {"tier": "db"}), False),
    (("k8s", ("a", "p0"), None), False),
    (("calico", ("gnp", None, "g0"), None), False),
]


def start_world() -> World:
    web = {"podSelector": {"matchLabels": {"app": "x"}},
           "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}], "ports": [{"port": "http"}]}]}
    return World({("a", "l1"): ({"app": "x"}, NODE, 1, 1), ("b", "r1"): ({"tier": "web"}, "n2", 2, None),
                  ("c", "r2"): ({}, "n2", 3, 3), ("b", "l2"): ({"tier": "web"}, NODE, 4, None)},
                 {("a", "p0"): web, ("b", "p1"): web}, {})


def write_by_kind(src: Path, objects: list[dict]) -> None:
    """A manifest directory with a file per kind: a policy edit leaves the pods' file as it was."""
    src.mkdir(exist_ok=True)
    by_kind: dict[str, list] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for old in src.glob("*.yaml"):
        if old.stem not in by_kind:
            old.unlink()
    for kind, objs in by_kind.items():
        (src / f"{kind}.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))


def test_a_policy_edit_reports_unused_fields_as_a_full_render_does(tmp_path: Path, monkeypatch, capsys):
    """Fields of Calico's kinds weft does not use are reported by a run that renders after a
    policy edit, from the last render as from scratch: once, on one line."""
    calls = []
    real = incremental.rerender
    monkeypatch.setattr(incremental, "rerender", lambda *a, **k: calls.append(r := real(*a, **k)) or r)
    world = start_world()
    world.calico[("gnp", None, "g0")] = {"selector": "all()", "types": ["Ingress"], "futureField": {"x": 1},
                                         "ingress": [{"action": "Allow", "protocol": "TCP"}]}
    write_by_kind(tmp_path / "src", world.objects())
    options = run.Options(node=NODE, state_dir=tmp_path / "state", from_dir=str(tmp_path / "src"))
    line = "weft: warning: fields weft does not use, ignored: GlobalNetworkPolicy: spec.futureField"
    run.desired_state(options)
    assert capsys.readouterr().err.splitlines() == [line]
    world.apply(STEPS[0][0])
    write_by_kind(tmp_path / "src", world.objects())
    run.desired_state(options)
    assert calls and calls[-1] is not None
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("source", ["api", "dir"])
def test_runs_render_policy_edits_without_the_whole_state(tmp_path: Path, monkeypatch, source):
    """Through the state dir's cache, from the API server and from a manifest directory: each
    policy edit is rendered from the last render, decoding no pod while the sets it needs are
    there, and ends where a fresh run does (chains, sets, CNI snapshot)."""
    from tests.kubeapi import FakeKubeAPI
    from weft.desired import sources
    built, calls = [], []
    assembled, real = sources._assembled, incremental.rerender
    monkeypatch.setattr(sources, "_assembled", lambda table: built.append(1) or assembled(table))
    monkeypatch.setattr(incremental, "rerender", lambda *a, **k: calls.append(r := real(*a, **k)) or r)
    world = start_world()
    version = STORED if source == "api" else CALICO
    with FakeKubeAPI(world.objects(version)) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kc")

        def options(state: Path) -> run.Options:
            if source == "api":
                return run.Options(node=NODE, state_dir=state, kubeconfig=kubeconfig)
            return run.Options(node=NODE, state_dir=state, from_dir=str(tmp_path / "src"))

        def publish() -> None:
            if source == "api":
                for obj in world.objects(version):
                    api.put(obj)
                for group, kind, ns, name in gone - identities():
                    api.delete(kind, ns, name, api_version=group)
            else:
                write_by_kind(tmp_path / "src", world.objects(version))

        def identities() -> set[tuple]:
            return {(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
                    for o in world.objects(version)}

        gone: set = set()
        publish()
        run.desired_state(options(tmp_path / "state"))
        for i, (change, whole) in enumerate(STEPS):
            gone = identities()
            world.apply(change)
            publish()
            built.clear()
            calls.clear()
            cached = run.desired_state(options(tmp_path / "state"))
            assert bool(built) == whole, change
            assert any(c is not None for c in calls) != whole, change
            fresh = run.desired_state(options(tmp_path / f"fresh{i}"))
            assert cached.dataplane == fresh.dataplane
            assert kernel_input(cached.dataplane) == kernel_input(fresh.dataplane)
            assert {k: v for k, v in cached.snapshot.items() if k != "token"} == \
                {k: v for k, v in fresh.snapshot.items() if k != "token"}
            assert (cached.bird_config, cached.ipam, cached.ignored) == (fresh.bird_config, fresh.ipam, fresh.ignored)


def test_with_natoutgoing_pools_edits_render_from_the_last_render(tmp_path: Path, monkeypatch):
    """An IP pool with natOutgoing (Calico's default pool has it) gives the render sets of the
    pools' CIDRs, which no selector means: pod and policy edits are still rendered from the last
    render (before, such a render was refused: every run rendered in full), the nat chains with
    this node's detected features as in a render from scratch."""
    calls = []
    real = incremental.rerender
    monkeypatch.setattr(incremental, "rerender", lambda *a, **k: calls.append(r := real(*a, **k)) or r)
    world = start_world()
    pool = {"apiVersion": CALICO, "kind": "IPPool", "metadata": {"name": "masq"},
            "spec": {"cidr": "198.18.0.0/24", "natOutgoing": True}}
    steps = [STEPS[0][0], ("relabel", 2, {"tier": "db"}), ("relabel", 1, {"tier": "db"}), STEPS[1][0]]
    write_by_kind(tmp_path / "src", [*world.objects(), pool])
    options = run.Options(node=NODE, state_dir=tmp_path / "state", from_dir=str(tmp_path / "src"))
    first = run.desired_state(options)
    assert any(name == "weft-masq-pools" for name in first.dataplane.ipsets)
    for i, change in enumerate(steps):
        world.apply(change)
        write_by_kind(tmp_path / "src", [*world.objects(), pool])
        calls.clear()
        cached = run.desired_state(options)
        assert calls and calls[-1] is not None, change
        fresh = run.desired_state(run.Options(node=NODE, state_dir=tmp_path / f"fresh{i}",
                                              from_dir=str(tmp_path / "src")))
        assert cached.dataplane == fresh.dataplane
        assert kernel_input(cached.dataplane) == kernel_input(fresh.dataplane)


def test_api_policy_edits_decode_only_the_policies_of_this_nodes_namespaces(tmp_path: Path, monkeypatch):
    """From the API server, a namespaced policy edited (or this node's pod relabelled): the
    policies of namespaces holding none of this node's pods (nor an edited policy) are not
    decoded (they select no pod of this node);
    the CNI snapshot's word on those namespaces is the last render's. A global policy edited:
    every policy is decoded (it changes what the snapshot says of every namespace). Each run ends
    where a fresh one does."""
    from tests.kubeapi import FakeKubeAPI
    from weft.store import cache as cachemod
    asked: list = []
    group = cachemod.DesiredCache.group
    monkeypatch.setattr(cachemod.DesiredCache, "group", lambda self, g: asked.append(g) or group(self, g))
    world = World({("a", "l1"): ({"app": "x"}, NODE, 1, None), ("b", "r1"): ({"tier": "web"}, "n2", 2, None),
                   ("c", "r2"): ({}, "n2", 3, None)},
                  {(ns, "p0"): {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 80}]}]}
                   for ns in "abc"}, {})
    world.kube[("c", "p1")] = {"podSelector": {}, "policyTypes": ["Egress"], "egress": []}
    steps = [  # (change, the namespaces whose policies are decoded)
        (("k8s", ("b", "p0"), {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 81}]}]}),
         {"a", "b"}),
        (("k8s", ("b", "p0"), {"podSelector": {}, "policyTypes": ["Egress"], "egress": []}), {"a", "b"}),
        (("k8s", ("a", "p0"), {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}), {"a"}),
        (("k8s", ("c", "p1"), None), {"a", "c"}),
        (("relabel", 0, {"app": "y"}), {"a"}),         # this node's pod: its chains are rendered again
        (("relabel", 1, {"tier": "db"}), set()),       # another node's: no chain is
        (("calico", ("gnp", None, "g0"), {"selector": "all()", "types": ["Egress"], "egress": []}), {"a", "b", "c"}),
    ]
    with FakeKubeAPI(world.objects(STORED)) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kc")
        options = run.Options(node=NODE, state_dir=tmp_path / "state", kubeconfig=kubeconfig)
        run.desired_state(options)
        def by_identity() -> dict[tuple, dict]:
            return {(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
                    for o in world.objects(STORED)}

        for i, (change, decoded) in enumerate(steps):
            before = by_identity()
            world.apply(change)
            after = by_identity()
            for k in after:                         # only what changed: a watch's events name it alone
                if before.get(k) != after[k]:
                    api.put(after[k])
            for version, kind, ns, name in before.keys() - after.keys():
                api.delete(kind, ns, name, api_version=version)
            asked.clear()
            cached = run.desired_state(options)
            assert {g[2] for g in asked if g[1] == "NetworkPolicy" and g[2] is not None} == decoded, change
            fresh = run.desired_state(run.Options(node=NODE, state_dir=tmp_path / f"fresh{i}", kubeconfig=kubeconfig))
            assert cached.dataplane == fresh.dataplane
            assert kernel_input(cached.dataplane) == kernel_input(fresh.dataplane)
            assert {k: v for k, v in cached.snapshot.items() if k != "token"} == \
                {k: v for k, v in fresh.snapshot.items() if k != "token"}
