"""Calico's resources read and validated as Calico's API server validates them: field-level
errors naming file, object and field; nothing loaded from an invalid state; fields weft does not
use are warnings (once per kind and field), typos of fields it uses stay errors; both of
Calico's apiVersions; the same object served by both API groups is read once.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests import nodens
from tests.calico_cluster import CALICO, EXAMPLES, cluster, example, gnp, kind, namespace, node, np, pod, tier
from tests.kubeapi import FakeKubeAPI
from weft.desired import sources
from weft.desired.loader import KINDS
from weft.model.cluster import EGRESS, INGRESS, Action, IcmpMatch, NamedPort, PortRange, ProtoPort
from weft.model.errors import InvalidDesiredState

STORED = "crd.projectcalico.org/v1"
RULE = {"action": "Allow"}


def refused(*docs: dict) -> list:
    with pytest.raises(InvalidDesiredState) as caught:
        cluster(*docs)
    return caught.value.errors


def one_error(*docs: dict):
    errors = refused(*docs)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


@pytest.mark.parametrize("example_dir", ["default-deny", "tutorial", "tiers"])
def test_documented_examples_load_without_warnings(example_dir):
    state = example(example_dir)
    assert state.policies and not state.warnings and not state.ignored_kinds


def test_no_calico_policy_kind_is_ignored():
    calico_kinds = {"GlobalNetworkPolicy", "NetworkPolicy", "Tier", "NetworkSet", "GlobalNetworkSet", "HostEndpoint",
                    "FelixConfiguration", "StagedNetworkPolicy", "StagedGlobalNetworkPolicy",
                    "StagedKubernetesNetworkPolicy"}
    for api in (STORED, CALICO):
        assert {k for (a, k) in KINDS if a == api} >= calico_kinds
    staged = kind("StagedGlobalNetworkPolicy", "preview", {"selector": "all()", "ingress": [{"action": "Deny"}]})
    profile = kind("Profile", "dev-apps", {"labelsToApply": {"stage": "dev"}})
    state = cluster(staged, profile)
    assert state.ignored_kinds == (f"{CALICO}/Profile",) and not state.policies    # staged: enforces nothing


def test_a_global_network_policy_in_full():
    state = cluster(tier("security", 100), gnp(
        "security.allow-dns", tier="security", order=5, selector="app == 'x'", namespaceSelector="team == 'a'",
        serviceAccountSelector="all()", applyOnForward=True,
        egress=[{"action": "Allow", "protocol": "udp", "ipVersion": 4, "metadata": {"annotations": {"why": "dns"}},
                 "destination": {"nets": ["198.19.0.0/16"], "notNets": ["198.19.5.0/24"],
                                 "ports": [53, "8000:8080", "dns"],
                                 "notPorts": [54], "selector": "k8s-app == 'kube-dns'", "notSelector": "bad == 'yes'",
                                 "namespaceSelector": "global()", "serviceAccounts": {"names": ["b", "a"],
                                                                                     "selector": "t == 'x'"}}},
                {"action": "Pass", "protocol": 1, "icmp": {"type": 8, "code": 0}, "notICMP": {"type": 3}},
                {"action": "Log", "notProtocol": "SCTP"}]))
    (p,) = state.policies
    assert (p.name, p.tier, p.order, p.types, p.apply_on_forward, p.origin) == (
        "security.allow-dns", "security", 5.0, frozenset({EGRESS}), True, "GlobalNetworkPolicy security.allow-dns")
    assert p.namespace_selector.canonical() == "team == 'a'" and p.service_account_selector.canonical() == "all()"
    dns, ping, log = p.egress
    assert (dns.action, dns.protocol, dns.ip_version, dns.origin) == (Action.ALLOW, "udp", 4, "spec.egress[0]")
    d = dns.destination
    assert (d.nets, d.not_nets) == (("198.19.0.0/16",), ("198.19.5.0/24",))
    assert d.ports == (PortRange(53, 53), PortRange(8000, 8080), NamedPort("dns"))
    assert d.not_ports == (PortRange(54, 54),)
    assert d.namespace_selector.canonical() == "global()" and d.namespace is None
    assert d.service_account_names == ("a", "b") and d.service_account_selector.canonical() == "t == 'x'"
    assert (ping.action, ping.protocol, ping.icmp, ping.not_icmp) == (
        Action.PASS, "icmp", IcmpMatch(8, 0), IcmpMatch(3))
    assert (log.action, log.not_protocol) == (Action.LOG, "sctp")
    assert state.tiers["security"].order == 100.0 and state.tiers["default"].order == 1_000_000.0


def test_calicos_views_of_kubernetes_policies_are_not_read_twice():
    """Calico's API server lists Kubernetes NetworkPolicies among its NetworkPolicies, named
    knp.default.<name> (and ClusterNetworkPolicies as kcnp.*): weft reads the originals."""
    knp = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x", "namespace": "ns1"},
           "spec": {"podSelector": {}}}
    view = np("knp.default.x", "ns1", order=1000, selector="projectcalico.org/orchestrator == 'k8s'",
              types=["Ingress"])
    cluster_view = gnp("kcnp.kube-admin.y", tier="kube-admin", selector="all()")
    state = cluster(knp, view, cluster_view)
    assert [p.key for p in state.policies] == ["ns1/knp.default.x"] and not state.ignored_kinds
    assert [p.origin for p in state.policies] == ["NetworkPolicy ns1/x"]


def test_types_default_as_calico_defaults_them():
    def types(**spec):
        return cluster(gnp("p", **spec)).policies[0].types
    assert types() == {INGRESS}
    assert types(ingress=[RULE]) == {INGRESS}
    assert types(egress=[RULE]) == {EGRESS}
    assert types(ingress=[RULE], egress=[RULE]) == {INGRESS, EGRESS}
    assert types(types=[]) == {INGRESS}
    # Rules of a direction the policy does not apply to have no effect.
    assert cluster(gnp("p", types=["Ingress"], egress=[RULE])).policies[0].egress == ()


def test_namespaced_policy_rules_are_confined_to_their_namespace_where_calico_confines_them():
    state = cluster(np("p", "ns1", ingress=[
        {"action": "Allow", "source": {"selector": "a == 'b'"}},
        {"action": "Allow", "source": {"notSelector": "a == 'b'"}},
        {"action": "Allow", "source": {"serviceAccounts": {"names": ["x"]}}},
        {"action": "Allow", "source": {"selector": "a == 'b'", "namespaceSelector": "all()"}},
        {"action": "Allow", "source": {"nets": ["198.19.0.0/16"]}}]))
    assert [r.source.namespace for r in state.policies[0].ingress] == ["ns1", "ns1", "ns1", None, None]
    assert state.policies[0].endpoint_selector().canonical() == "projectcalico.org/namespace == 'ns1'"
    assert cluster(gnp("p", ingress=[{"action": "Allow", "source": {"selector": "a == 'b'"}}])) \
        .policies[0].ingress[0].source.namespace is None


def test_the_stored_form_and_the_v3_form_are_one_policy():
    v3 = gnp("deny-b", selector="all()", ingress=[{"action": "Deny"}])
    stored = v3 | {"apiVersion": STORED, "metadata": {"name": "default.deny-b"}}
    assert cluster(stored).policies[0].name == cluster(v3).policies[0].name == "deny-b"
    error = one_error(v3, stored)          # one manifest directory defining it twice
    assert error.field == "metadata.name" and "more than once" in error.message


def test_an_object_served_by_both_calico_groups_is_read_once(tmp_path):
    """With Calico's API server, each object is served as stored (crd.projectcalico.org/v1,
    default-tier policies named "default.<name>") and as the v3 API shows it."""
    stored = [gnp("default.deny-b", selector="all()", ingress=[{"action": "Deny"}]) | {"apiVersion": STORED},
              kind("IPPool", "pool", {"cidr": "198.18.4.0/22"}) | {"apiVersion": STORED},
              kind("Tier", "security", {"order": 10}) | {"apiVersion": STORED},
              gnp("security.x", tier="security", selector="all()") | {"apiVersion": STORED}]
    served = [gnp("deny-b", selector="all()", ingress=[{"action": "Deny"}]),
              kind("IPPool", "pool", {"cidr": "198.18.4.0/22"}), kind("Tier", "security", {"order": 10}),
              gnp("security.x", tier="security", selector="all()")]
    with FakeKubeAPI([namespace("ns1"), *copy.deepcopy(stored), *copy.deepcopy(served)]) as api:
        state = sources.read(tmp_path / "state", None, api.write_kubeconfig(tmp_path / "kubeconfig")).state()
    assert [p.key for p in state.policies] == ["deny-b", "security.x"]
    assert len(state.ippools) == 1 and set(state.tiers) == {"default", "security"}


def test_a_pods_service_account_defaults_as_the_api_server_sets_it():
    state = cluster(pod("a", "ns1", "198.18.4.1"), pod("b", "ns1", "198.18.4.2", sa="web"))
    assert [e.service_account for e in state.endpoints] == ["default", "web"]
    assert state.endpoints[1].profiles == ("kns.ns1", "ksa.ns1.web")


def test_host_endpoints_network_sets_felix_configuration_and_service_accounts():
    state = cluster(
        kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"],
                                         "profiles": ["projectcalico-default-allow"],
                                         "ports": [{"name": "ssh", "port": 22, "protocol": "TCP"}]}, role="edge"),
        kind("NetworkSet", "db", {"nets": ["198.19.5.7/24", "198.19.9.9"]}, "ns1", role="db"),
        kind("GlobalNetworkSet", "world", {"nets": ["0.0.0.0/0"]}),
        kind("FelixConfiguration", "default", {"failsafeInboundHostPorts": [{"protocol": "UDP", "port": 500}],
                                               "defaultEndpointToHostAction": "accept", "logPrefix": "calico-packet"}),
        kind("FelixConfiguration", "node.node1", {"failsafeOutboundHostPorts": [], "bpfEnabled": True}),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "ns1",
                                                                    "labels": {"team": "a"}}})
    (hep,) = state.host_endpoints
    assert (hep.node, hep.interface, hep.expected_ips, hep.profiles, hep.labels) == (
        "node1", "eth0", ("198.18.0.1",), ("projectcalico-default-allow",), {"role": "edge"})
    assert [(p.name, p.port, p.protocol) for p in hep.ports] == [("ssh", 22, "tcp")]
    assert [(s.key, s.nets) for s in state.network_sets] == [
        ("ns1/db", ("198.19.5.0/24", "198.19.9.9/32")), ("world", ("0.0.0.0/0",))]
    here, elsewhere = state.felix_settings("node1"), state.felix_settings("node2")
    assert here.failsafe_inbound_host_ports == (ProtoPort("udp", 500),) and here.failsafe_outbound_host_ports == ()
    assert here.bpf_enabled and not elsewhere.bpf_enabled and here.default_endpoint_to_host_action == "Accept"
    assert elsewhere.failsafe_outbound_host_ports[0] == ProtoPort("udp", 53)
    assert [(a.namespace, a.name, a.labels) for a in state.service_accounts] == [("ns1", "web", {"team": "a"})]


# --- refused, with the field named ------------------------------------------------------------

def _gnp_rule(**rule) -> dict:
    return gnp("p", selector="all()", ingress=[{"action": "Allow", **rule}])


REFUSALS = [
    # names and tiers
    (gnp("other.x"), "metadata.name", "tier 'default'"),
    (gnp("x", tier="security"), "metadata.name", "must be named 'security.<name>'"),
    (gnp("a.b.c"), "metadata.name", "must be"),
    (gnp("nowhere.x", tier="nowhere"), "spec.tier", "tier 'nowhere' does not exist"),
    (gnp("x", tier="Bad_Tier"), "spec.tier", "must be a tier name"),
    (np("x", "ns9"), "metadata.namespace", "namespace 'ns9' does not exist"),
    (tier("default", 5), "spec.order", "must be 1000000"),
    (tier("security", 1, "Allow"), "spec.defaultAction", "must be Deny or Pass"),
    (tier("a.b", 1), "metadata.name", "no dots"),
    # spec fields
    (gnp("x", order="high"), "spec.order", "must be a number"),
    (gnp("x", order=float("nan")), "spec.order", "finite"),
    (gnp("x", selector="app =="), "spec.selector", "expected a quoted string"),
    (gnp("x", selector="global()"), "spec.selector", "global() can only be used in a rule's namespaceSelector"),
    (gnp("x", namespaceSelector="global()"), "spec.namespaceSelector", "global()"),
    (gnp("x", types=["Ingress", "Ingress"]), "spec.types[1]", "more than once"),
    (gnp("x", types=["Sideways"]), "spec.types[0]", "must be Ingress or Egress"),
    (gnp("x", preDNAT=True, applyOnForward=True, egress=[RULE]), "spec.egress", "preDNAT policy cannot have egress"),
    (gnp("x", preDNAT=True, doNotTrack=True, applyOnForward=True), "spec.preDNAT", "cannot both be true"),
    (gnp("x", doNotTrack=True), "spec.applyOnForward", "must be true when preDNAT or doNotTrack"),
    (gnp("x", preDNAT="yes", applyOnForward=True), "spec.preDNAT", "true or false"),
    (gnp("x", performanceHints=["GoFast"]), "spec.performanceHints[0]", "AssumeNeededOnEveryNode"),
    (gnp("x", selecter="all()"), "spec.selecter", "did you mean 'selector'?"),
    (gnp("x", Selector="all()"), "spec.Selector", "did you mean 'selector'?"),
    # rules
    (gnp("x", ingress=[{}]), "spec.ingress[0].action", "missing"),
    (gnp("x", ingress=[{"action": "allow"}]), "spec.ingress[0].action", "must be one of Allow, Deny, Pass, Log"),
    (gnp("x", ingress=["Allow"]), "spec.ingress[0]", "must be a mapping"),
    (_gnp_rule(http={"methods": ["GET"]}), "spec.ingress[0].http", "not supported: weft has no L7 proxy"),
    (_gnp_rule(destination={"services": {"name": "web", "namespace": "ns1"}}), "spec.ingress[0].destination.services",
     "not supported"),
    (_gnp_rule(destinaton={}), "spec.ingress[0].destinaton", "did you mean 'destination'?"),
    (_gnp_rule(domains=["example.com"]), "spec.ingress[0].domains", "unknown field"),
    (_gnp_rule(source={"domains": ["x"]}), "spec.ingress[0].source.domains", "unknown field"),
    (_gnp_rule(protocol="tcpx"), "spec.ingress[0].protocol", "must be one of TCP, UDP, ICMP"),
    (_gnp_rule(protocol=0), "spec.ingress[0].protocol", "1-255"),
    (_gnp_rule(protocol=256), "spec.ingress[0].protocol", "1-255"),
    (_gnp_rule(notProtocol=True), "spec.ingress[0].notProtocol", "1-255"),
    (_gnp_rule(destination={"ports": [80]}), "spec.ingress[0].destination.ports", "must set protocol to TCP, UDP"),
    (_gnp_rule(protocol="ICMP", source={"notPorts": [80]}), "spec.ingress[0].source.notPorts", "got icmp"),
    (_gnp_rule(protocol="TCP", destination={"ports": [0]}), "spec.ingress[0].destination.ports[0]", "1-65535"),
    (_gnp_rule(protocol="TCP", destination={"ports": ["90:80"]}), "spec.ingress[0].destination.ports[0]",
     "first <= last"),
    (_gnp_rule(protocol="TCP", destination={"ports": [70000]}), "spec.ingress[0].destination.ports[0]", "1-65535"),
    (_gnp_rule(protocol="TCP", destination={"ports": ["bad name!"]}), "spec.ingress[0].destination.ports[0]",
     "port name"),
    (_gnp_rule(protocol="ICMP", icmp={"type": 255}), "spec.ingress[0].icmp.type", "0-254"),
    (_gnp_rule(protocol="ICMP", icmp={"type": 8, "code": 256}), "spec.ingress[0].icmp.code", "0-255"),
    (_gnp_rule(protocol="ICMP", icmp={"code": 0}), "spec.ingress[0].icmp.code", "needs an ICMP type"),
    (_gnp_rule(icmp={"type": 8}), "spec.ingress[0].icmp", "requires protocol ICMP or ICMPv6"),
    (_gnp_rule(protocol="TCP", notICMP={"type": 8}), "spec.ingress[0].notICMP", "requires protocol ICMP"),
    (_gnp_rule(ipVersion=5), "spec.ingress[0].ipVersion", "must be 4 or 6"),
    (_gnp_rule(ipVersion=6, protocol="ICMP"), "spec.ingress[0].ipVersion", "must be 4 with protocol ICMP"),
    (_gnp_rule(ipVersion=4, notProtocol="ICMPv6"), "spec.ingress[0].ipVersion", "must be 6 with notProtocol"),
    (_gnp_rule(ipVersion=4, source={"nets": ["2001:db8::/64"]}), "spec.ingress[0].source.nets", "ipVersion is 4"),
    (_gnp_rule(source={"nets": ["198.19.0.0/16"]}, destination={"notNets": ["2001:db8::/64"]}),
     "spec.ingress[0].destination.notNets", "cannot mix IPv4 and IPv6"),
    (_gnp_rule(source={"nets": ["198.19.0.1/16"]}), "spec.ingress[0].source.nets[0]", "host bits set: the network is "
                                                                                      "198.19.0.0/16"),
    (_gnp_rule(source={"nets": ["198.19.0.1"]}), "spec.ingress[0].source.nets[0]", "prefix length"),
    (_gnp_rule(source={"nets": "198.19.0.0/16"}), "spec.ingress[0].source.nets", "a list of CIDRs"),
    (_gnp_rule(source={"selector": "has(a) && global()"}), "spec.ingress[0].source.selector", "global()"),
    (_gnp_rule(source={"namespaceSelector": "global() || a == 'b'"}), "spec.ingress[0].source.namespaceSelector",
     "cannot be combined"),
    (_gnp_rule(source={"serviceAccounts": {"names": ["Bad Name"]}}), "spec.ingress[0].source.serviceAccounts.names[0]",
     "DNS subdomain"),
    (_gnp_rule(source={"serviceAccounts": {"name": ["x"]}}), "spec.ingress[0].source.serviceAccounts.name",
     "did you mean 'names'?"),
    (_gnp_rule(metadata={"annotations": {"k": 1}}), "spec.ingress[0].metadata.annotations", "strings to strings"),
    # other kinds
    (kind("NetworkSet", "s", {"nets": ["198.19.0.0/33"]}, "ns1"), "spec.nets[0]", "invalid CIDR"),
    (kind("GlobalNetworkSet", "s", {"nets": []}, **{"projectcalico.org/namespace": "x"}),
     "metadata.labels.projectcalico.org/namespace", "Calico's own label"),
    (kind("HostEndpoint", "h", {"interfaceName": "eth0"}), "spec.node", "missing"),
    (kind("HostEndpoint", "h", {"node": "node1"}), "spec.interfaceName", "needs an interface name"),
    (kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "a-very-long-interface"}), "spec.interfaceName",
     "1-15"),
    (kind("HostEndpoint", "h", {"node": "node1", "expectedIPs": ["198.18.0.300"]}), "spec.expectedIPs[0]",
     "invalid IP address"),
    (kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "*",
                                "ports": [{"name": "ping", "port": 1, "protocol": "ICMP"}]}),
     "spec.ports[0].protocol", "protocol with ports"),
    (kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "*",
                                "ports": [{"name": "Web_Port", "port": 80, "protocol": "TCP"}]}),
     "spec.ports[0].name", "port name"),
    (kind("FelixConfiguration", "default", {"failsafeInboundHostPorts": [{"protocol": "ICMP", "port": 1}]}),
     "spec.failsafeInboundHostPorts[0].protocol", "TCP, UDP or SCTP"),
    (kind("FelixConfiguration", "default", {"failsafeOutboundHostPorts": [{"port": 0}]}),
     "spec.failsafeOutboundHostPorts[0].port", "1-65535"),
    (kind("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Deny"}),
     "spec.defaultEndpointToHostAction", "Drop, Accept, Return"),
    (kind("FelixConfiguration", "default", {"natOutgoingAddress": "2001:db8::1"}), "spec.natOutgoingAddress", "IPv4"),
    (kind("FelixConfiguration", "default", {"bpfEnabeld": True}), "spec.bpfEnabeld", "did you mean 'bpfEnabled'?"),
    (kind("IPPool", "p", {"cidr": "198.18.4.0/22", "natOutgoin": True}), "spec.natOutgoin",
     "did you mean 'natOutgoing'?"),
    (kind("BGPPeer", "p", {"peerIP": "198.18.0.254", "asNumber": 64513, "peerSelecter": "all()"}),
     "spec.peerSelecter", "did you mean 'peerSelector'?"),
]


@pytest.mark.parametrize("doc, field, message", REFUSALS, ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_calico_objects_are_refused_naming_file_object_and_field(doc, field, message):
    docs = [doc] if doc["kind"] == "Tier" else [tier("security", 100), doc]
    errors = refused(*docs)
    found = [e for e in errors if e.field == field]
    assert found, [str(e) for e in errors]
    error = found[0]
    assert error.where == "test.yaml" and error.obj.split(" ")[0] == doc["kind"]
    assert message in error.message, str(error)


def test_an_invalid_policy_among_valid_ones_loads_nothing(tmp_path):
    (tmp_path / "ok.yaml").write_text((EXAMPLES / "tutorial" / "1-cluster.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\n"
        "spec:\n  ingress:\n  - action: Allow\n    http: {methods: [GET]}\n")
    with pytest.raises(InvalidDesiredState) as caught:
        sources.read(tmp_path / "state", str(tmp_path))
    assert str(caught.value).endswith("bad.yaml: GlobalNetworkPolicy p: spec.ingress[0].http: not supported: weft "
                                      "has no L7 proxy (Calico's application layer policy needs one); match on ports "
                                      "and peers instead")


# --- unknown fields: warnings, once per kind and field -------------------------------------------

def test_unknown_fields_of_calico_kinds_are_warnings_once_per_kind_and_field():
    """Calico 3.31's CRDs default spec.serviceLoadBalancerAggregation in BGPConfiguration: a
    field weft does not use. It is reported, not refused, for BGP, policy and Felix kinds."""
    bgp = [kind("BGPConfiguration", name, {"asNumber": 64512, "serviceLoadBalancerAggregation": "Enabled"})
           for name in ("default", "node.node1")]
    policies = [gnp(f"p{i}", selector="all()", futureField={"x": 1}) for i in range(3)]
    felix = kind("FelixConfiguration", "default", {"logSeverityScreen": "Info", "vxlanEnabled": True,
                                                   "bpfEnabled": False})
    pool = kind("IPPool", "pool", {"cidr": "198.18.4.0/22", "ipipMode": "Never", "vxlanMode": "Always",
                                   "namespaceSelector": "all()"})
    state = cluster(*bgp, *policies, felix, pool)
    assert state.warnings == ("BGPConfiguration: spec.serviceLoadBalancerAggregation",
                              "FelixConfiguration: spec.logSeverityScreen", "FelixConfiguration: spec.vxlanEnabled",
                              "GlobalNetworkPolicy: spec.futureField", "IPPool: spec.namespaceSelector")
    assert len(state.bgp_configurations) == 2 and len(state.policies) == 3


node_ns = nodens.node_ns


def test_a_run_reports_unused_fields_on_one_line_when_the_desired_state_changes(node_ns, tmp_path):
    objects = [node(nodens.NODE) | {"metadata": {"name": nodens.NODE}},
               kind("FelixConfiguration", "default", {"logSeverityScreen": "Info", "reportingInterval": "0s"})]
    src = nodens.write_manifests(tmp_path / "src", objects)
    weft = nodens.WeftNode(node_ns, tmp_path / "state")
    first = weft.weft("apply", from_dir=src)
    assert first.stderr.splitlines() == ["weft: warning: fields weft does not use, ignored: "
                                         "FelixConfiguration: spec.logSeverityScreen; "
                                         "FelixConfiguration: spec.reportingInterval"], first.stderr
    assert weft.weft("apply", from_dir=src).stderr == ""          # nothing changed: said already


def test_kubernetes_kinds_keep_refusing_unknown_fields():
    knp = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x", "namespace": "ns1"},
           "spec": {"podSelector": {}, "futureField": 1}}
    assert one_error(knp).field == "spec.futureField"


# --- every example file is valid YAML of the kinds weft reads ----------------------------------

@pytest.mark.parametrize("path", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml")))
def test_every_example_file_loads_on_its_own_or_with_its_cluster(path):
    cluster_file = next((f"{Path(path).parent}/{c}" for c in ("cluster.yaml", "1-cluster.yaml")
                         if (EXAMPLES / Path(path).parent / c).exists()), None)
    files = [path] if cluster_file in (None, path) else [cluster_file, path]
    if Path(path).parent.name == "tiers":
        files = ["tiers"]
    state = example(*files)
    assert not state.ignored_kinds
    # Everything the examples use is enforced: no warning.
    assert set(state.warnings) == set()


def test_host_endpoint_by_address_and_untracked_policy_are_enforced_without_warning():
    """A host endpoint named by its addresses only is resolved on the node's interfaces at render
    time (model.cluster.with_host_interfaces), doNotTrack and applyOnForward are enforced
    (renderers.calico): no warning."""
    hep = kind("HostEndpoint", "by-ip", {"node": "node1", "expectedIPs": ["198.18.0.1"]})
    untracked = gnp("fast", selector="all()", doNotTrack=True, applyOnForward=True, ingress=[{"action": "Allow"}])
    state = cluster(hep, untracked)
    assert set(state.warnings) == set()
    assert len(state.host_endpoints) == 1 and len(state.policies) == 1
