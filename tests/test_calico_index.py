"""Selection over the labels Calico adds: the index (set algebra, Calico's labels answered from
namespaces and service accounts) agrees with brute force over each thing's full label set;
network sets and host endpoints are selected where Calico's scopes say; a policy's endpoints.
"""
from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.calico_cluster import cluster, gnp, kind, namespace, np, pod, service_account
from tests.test_calico_selector import exprs
from weft.desired.index import EndpointIndex
from weft.model import labels as calico_labels
from weft.model.cluster import ClusterState, Endpoint, EntityMatch, Namespace, ServiceAccount
from weft.model.selector import Global, parse_selector

KEYS = ["app", "team", "pcns.team", "pcsa.team", "pcns.projectcalico.org/name", "pcsa.projectcalico.org/name",
        calico_labels.NAMESPACE, calico_labels.SERVICE_ACCOUNT, calico_labels.ORCHESTRATOR]
VALUES = ["a", "b", "ns1", "ns2", "sa1", "k8s"]
keys, values = st.sampled_from(KEYS), st.sampled_from(VALUES)


@st.composite
def states(draw) -> ClusterState:
    namespaces = {n: Namespace(n, draw(st.dictionaries(st.sampled_from(["team", "app"]), values, max_size=2)))
                  for n in ("ns1", "ns2")}
    accounts = tuple(ServiceAccount(n, a, draw(st.dictionaries(st.sampled_from(["team"]), values, max_size=1)))
                     for n in ("ns1", "ns2") for a in ("sa1", "sa2") if draw(st.booleans()))
    endpoints = tuple(Endpoint(draw(st.sampled_from(["ns1", "ns2"])), f"p{i}", "n", f"weft{i}", (f"198.18.4.{i + 1}",),
                               draw(st.dictionaries(keys, values, max_size=3)),
                               service_account=draw(st.sampled_from([None, "sa1", "sa2"])))
                      for i in range(draw(st.integers(0, 8))))
    return ClusterState(namespaces=namespaces, endpoints=endpoints, policies=(), nodes={}, service_accounts=accounts)


@settings(max_examples=300, deadline=None)
@given(states(), st.lists(exprs.map(lambda e: e.normalize()), min_size=1, max_size=4),
       st.lists(st.tuples(keys, values), max_size=3))
def test_the_index_answers_calicos_labels_as_brute_force_does(state, es, atoms):
    index = EndpointIndex(state)
    from weft.model.selector import Eq, Has, Ne
    es = es + [Eq(k, v) for k, v in atoms] + [Has(k) for k, _ in atoms] + [Ne(k, v) for k, v in atoms]
    for e in es:
        expected = frozenset(i for i in range(len(state.endpoints)) if e.matches(index.labels_of(i)))
        assert index.select(e) == expected, (e.canonical(), [index.labels_of(i) for i in range(len(state.endpoints))])


def test_a_pods_labels_as_calico_gives_them():
    state = cluster(namespace("ns1", team="blue"), service_account("web", "ns1", tier="front"),
                    pod("a", "ns1", "198.18.4.1", {"app": "x", "pcns.team": "own"}, sa="web"))
    labels = EndpointIndex(state).labels_of(0)
    assert labels == {"app": "x", "pcns.team": "own", "pcns.kubernetes.io/metadata.name": "ns1",
                      "pcns.projectcalico.org/name": "ns1", "pcsa.tier": "front", "pcsa.projectcalico.org/name": "web",
                      "projectcalico.org/namespace": "ns1", "projectcalico.org/orchestrator": "k8s",
                      "projectcalico.org/serviceaccount": "web"}


def test_rule_sides_select_network_sets_and_host_endpoints_in_their_scope():
    state = cluster(pod("a", "ns1", "198.18.4.1", {"role": "db"}), pod("b", "ns2", "198.18.4.2", {"role": "db"}),
                    kind("NetworkSet", "n1", {"nets": ["198.19.1.0/24"]}, "ns1", role="db"),
                    kind("NetworkSet", "n2", {"nets": ["198.19.2.0/24"]}, "ns2", role="db"),
                    kind("GlobalNetworkSet", "g", {"nets": ["198.19.3.0/24"]}, role="db"),
                    kind("GlobalNetworkSet", "other", {"nets": ["198.19.4.0/24"]}, role="web"),
                    kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]},
                         role="db"))
    index = EndpointIndex(state)
    db = parse_selector("role == 'db'")

    def nets(entity):
        return index.side(entity).nets(index)
    assert nets(EntityMatch(selector=db, namespace="ns1")) == ("198.18.4.1/32", "198.19.1.0/24")
    assert nets(EntityMatch(selector=db)) == ("198.18.0.1/32", "198.18.4.1/32", "198.18.4.2/32", "198.19.1.0/24",
                                              "198.19.2.0/24", "198.19.3.0/24")
    assert nets(EntityMatch(selector=db, namespace_selector=Global())) == ("198.18.0.1/32", "198.19.3.0/24")
    assert nets(EntityMatch(selector=db, namespace_selector=parse_selector("all()"))) == (
        "198.18.4.1/32", "198.18.4.2/32", "198.19.1.0/24", "198.19.2.0/24")
    assert index.side(EntityMatch()) is None and index.side_not(EntityMatch()) is None
    assert index.side_not(EntityMatch(not_selector=db)).nets(index, 4)[-1] == "198.19.3.0/24"
    assert index.match(EntityMatch(selector=db, namespace="ns2")) == {1}


def test_which_endpoints_and_host_endpoints_a_policy_applies_to():
    state = cluster(namespace("ns1", team="blue"), pod("a", "ns1", "198.18.4.1", {"app": "x"}),
                    pod("b", "ns2", "198.18.4.2", {"app": "x"}),
                    kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "*"}, app="x"),
                    gnp("global", selector="app == 'x'"),
                    gnp("blue", selector="app == 'x'", namespaceSelector="team == 'blue'"),
                    np("local", "ns2", selector="app == 'x'"))
    index = EndpointIndex(state)
    by_name = {p.name: p for p in state.policies}
    assert index.policy_endpoints(by_name["global"]) == {0, 1}
    assert [h.name for h in index.policy_host_endpoints(by_name["global"])] == ["h"]
    assert index.policy_endpoints(by_name["blue"]) == {0} and index.policy_host_endpoints(by_name["blue"]) == ()
    assert index.policy_endpoints(by_name["local"]) == {1} and index.policy_host_endpoints(by_name["local"]) == ()


def test_named_port_members_come_from_the_sides_selector():
    state = cluster(pod("a", "ns1", "198.18.4.1", {"app": "srv"}, ports={"http": 8080}),
                    pod("b", "ns2", "198.18.4.2", {"app": "other"}, ports={"http": 9090}),
                    kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"],
                                               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}))
    index = EndpointIndex(state)
    assert index.named_port_members(EntityMatch(selector=parse_selector("app == 'srv'")), "http", "tcp") == {
        ("198.18.4.1", "tcp", 8080)}
    assert index.named_port_members(EntityMatch(), "http", "tcp") == {
        ("198.18.4.1", "tcp", 8080), ("198.18.4.2", "tcp", 9090), ("198.18.0.1", "tcp", 80)}
    assert index.named_port_members(EntityMatch(), "http", "udp") == frozenset()


def test_selection_stays_cheap_at_10k_pods():
    """10,000 pods in 100 namespaces with service accounts: building the index and answering
    namespace-, account- and label-scoped selectors stays well under a second."""
    namespaces = {f"ns{i}": Namespace(f"ns{i}", {"team": f"t{i % 7}"}) for i in range(100)}
    accounts = tuple(ServiceAccount(f"ns{i}", "web", {"tier": "front"}) for i in range(100))
    endpoints = tuple(Endpoint(f"ns{i % 100}", f"p{i}", "n", f"weft{i}", (f"198.18.{i // 250}.{i % 250 + 1}",),
                               {"app": f"a{i % 50}"}, service_account="web" if i % 2 else "default")
                      for i in range(10_000))
    state = ClusterState(namespaces=namespaces, endpoints=endpoints, policies=(), nodes={}, service_accounts=accounts)
    started = time.perf_counter()
    index = EndpointIndex(state)
    selectors = ["app == 'a3' && pcns.team == 't3'", "pcsa.tier == 'front'", "projectcalico.org/namespace == 'ns4'",
                 "pcns.projectcalico.org/name in {'ns1', 'ns2'} && !has(x)",
                 "projectcalico.org/serviceaccount == 'web'"]
    sizes = [len(index.select(parse_selector(s))) for s in selectors]
    elapsed = time.perf_counter() - started
    assert sizes == [100, 5000, 100, 200, 5000]
    assert elapsed < 1.0, elapsed


def test_todays_renderer_applies_a_policy_where_its_scoping_selectors_say():
    """renderers.iptables selects a policy's endpoints through the index (namespaceSelector and
    serviceAccountSelector included), and rule sides differing only in service accounts get
    sets of their own."""
    from weft.renderers.ipsets import entity_key
    from weft.renderers.iptables import policy_chain_name, render_node
    state = cluster(namespace("ns1", team="blue"), pod("a", "ns1", "198.18.4.1", {"app": "x"}),
                    pod("b", "ns2", "198.18.4.2", {"app": "x"}),
                    gnp("blue", selector="app == 'x'", namespaceSelector="team == 'blue'",
                        ingress=[{"action": "Deny"}]))
    plane = render_node(state, "node1")
    chain = policy_chain_name(state.policies[0], "Ingress")
    jumps = {ep.key: any(chain in line for line in plane.chains[("filter", f"weft-tw-{ep.iface}")].rules)
             for ep in state.endpoints}
    assert jumps == {"ns1/a": True, "ns2/b": False}
    plain = EntityMatch(selector=parse_selector("app == 'x'"))
    with_accounts = EntityMatch(selector=parse_selector("app == 'x'"), service_account_names=("web",))
    assert entity_key(plain) == "selector=app == 'x';namespaceSelector=-;namespace=-"
    assert entity_key(with_accounts) != entity_key(plain)
