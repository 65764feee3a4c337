"""The reference evaluator (desired.verdict) against Calico's documented examples (tests/calico)
and a table of semantics cases, each a small cluster with the verdicts Calico's documentation
gives. These verdicts are what the data planes' tests compare their kernels with.
"""
from __future__ import annotations

import pytest

from tests.calico_cluster import (
    CALICO,
    Flows,
    cluster,
    example,
    gnp,
    kind,
    namespace,
    np,
    pod,
    service_account,
    tier,
)
from weft.desired.verdict import Evaluator, Packet, Verdict, verdict
from weft.model.cluster import EGRESS, INGRESS

ALLOW, DENY, UNMANAGED = Verdict.ALLOW, Verdict.DENY, Verdict.UNMANAGED
OUTSIDE = "198.19.200.1"          # stands in for "google.com" and the rest of the world


# --- Calico's documented examples ---------------------------------------------------------------

def test_default_deny_with_dns_allowed():
    """"Enable default deny for Kubernetes pods": deny-app-policy denies application pods'
    traffic, except DNS to kube-dns; the system namespaces are left alone."""
    open_cluster = Flows(example("default-deny/cluster.yaml"))
    assert open_cluster.allowed("engineering/api", "shop/web", 80)
    flows = Flows(example("default-deny/cluster.yaml", "default-deny/deny-app-policy.yaml"))
    assert flows("engineering/api", "shop/web", 80) == DENY
    assert flows("engineering/api", "kube-system/coredns", 53, "udp") == ALLOW
    assert flows("shop/web", "kube-system/coredns", 53, "tcp") == ALLOW
    assert flows("engineering/api", "kube-system/coredns", 54, "udp") == DENY
    assert flows("engineering/api", OUTSIDE, 443) == DENY
    assert flows("kube-system/coredns", OUTSIDE, 53, "udp") == ALLOW          # kube-system: not selected
    assert flows("kube-system/coredns", "shop/web", 80) == DENY               # web's ingress: no rule
    decision = flows.decide("engineering/api", "shop/web", 80)
    assert decision.by == "end of tier default (its defaultAction)"


def test_namespaced_default_deny_calico_and_kubernetes():
    flows = Flows(example("default-deny/cluster.yaml", "default-deny/namespaced.yaml"))
    assert flows("engineering/api", "shop/web") == DENY
    assert flows("shop/web", "engineering/api") == DENY
    assert flows("shop/web", "kube-system/coredns", 53, "udp") == ALLOW        # other namespaces: open


def test_calico_policy_tutorial_step_by_step():
    """"Calico policy tutorial": each step's verdicts as the document shows them."""
    steps = ["tutorial/1-cluster.yaml", "tutorial/2-default-deny.yaml", "tutorial/3-allow-busybox-egress.yaml",
             "tutorial/4-allow-nginx-ingress.yaml"]
    nginx, access = "advanced-policy-demo/nginx", "advanced-policy-demo/access"
    expected = [(ALLOW, ALLOW), (DENY, DENY), (DENY, ALLOW), (ALLOW, ALLOW)]   # (to nginx, to outside)
    for n, (to_nginx, to_outside) in enumerate(expected, start=1):
        flows = Flows(example(*steps[:n]))
        assert (flows(access, nginx, 80), flows(access, OUTSIDE, 80)) == (to_nginx, to_outside), f"step {n}"
    flows = Flows(example(*steps))
    assert flows(nginx, access, 80) == DENY          # only the access pod's egress was opened
    assert flows(OUTSIDE, nginx, 80) == DENY         # only from the access pod


def test_tiers_security_platform_application():
    """"Get started with policy tiers": the devops tier (defaultAction Pass) Denies cross-env
    traffic of staging pods and Passes the rest; the security tier Denies the blocked network
    set; the application's Kubernetes policy (tier default) decides last."""
    flows = Flows(example("tiers"))
    # devops: production may not reach staging.
    decision = flows.decide("app/prod-web", "app/stage-db", 5432)
    assert decision.verdict == DENY and decision.by == "GlobalNetworkPolicy devops.stage-env spec.ingress[0]"
    # devops passes staging-to-staging; security has no ingress policy (skipped); the default
    # tier's Kubernetes policy allows only web pods: end of tier.
    decision = flows.decide("app/stage-api", "app/stage-db", 5432)
    assert decision.verdict == DENY and decision.by == "end of tier default (its defaultAction)"
    # Selectors select network sets too: the blocked set has no env label, so devops'
    # `env != "stage"` matches its nets and denies staging pods first...
    assert flows.decide("app/stage-api", "198.19.66.7", 443).by == "GlobalNetworkPolicy devops.stage-env spec.egress[0]"
    # ... and the security tier denies it for pods devops does not select; everything else
    # passes on to the profiles.
    decision = flows.decide("app/prod-web", "198.19.66.7", 443)
    assert decision.verdict == DENY and decision.by == "GlobalNetworkPolicy security.block-zone spec.egress[0]"
    assert flows("app/stage-api", "198.19.67.1", 443) == ALLOW
    assert flows("app/prod-web", "198.19.67.1", 443) == ALLOW
    # devops denies staging pods reaching production pods.
    assert flows("app/stage-api", "app/prod-web", 8080) == DENY


def test_host_endpoint_protection():
    """"Protect hosts": the k8s-worker policy on my-host's eth0."""
    state = example("hosts/protect-hosts.yaml")
    hep = state.host_endpoints[0]
    ev = Evaluator(state)

    def into(src, port, proto="tcp", **kw):
        return ev.host(hep, INGRESS, Packet(src, "198.18.0.21", proto, 40000, port, **kw)).verdict

    def out(dst, port, proto="tcp"):
        return ev.host(hep, EGRESS, Packet("198.18.0.21", dst, proto, 40000, port)).verdict
    assert into("198.18.100.5", 22) == ALLOW
    assert into("198.18.100.5", 10250) == ALLOW
    assert into("198.19.1.1", 8080) == DENY
    assert ev.host(hep, INGRESS, Packet("198.19.1.1", "198.18.0.21", "icmp", icmp_type=8, icmp_code=0)).allowed
    assert out("198.18.0.10", 2379) == ALLOW
    assert out("198.19.1.1", 53, "udp") == ALLOW
    assert out("198.19.1.1", 443) == DENY
    # SSH from anywhere: the failsafe (the policy would allow only the management net).
    assert ev.host(hep, INGRESS, Packet("198.19.1.1", "198.18.0.21", "tcp", 40000, 22)).by == "failsafe tcp:22"
    # k8s-worker is not applyOnForward: forwarded traffic through eth0 is not its business.
    assert ev.host(hep, INGRESS, Packet("198.19.1.1", "198.18.4.9", "tcp", 40000, 8080), forwarded=True).allowed


def test_pre_dnat_host_protection():
    """"Protect hosts tutorial": pre-DNAT policy closes the nodes to the outside, also for
    traffic forwarded to pods, except the NodePort pinhole."""
    state = example("hosts/pre-dnat.yaml")
    ev = Evaluator(state)
    hep = state.host_endpoints[0]
    outside, node_ip = "198.19.1.1", "198.18.0.1"
    assert ev.host(hep, INGRESS, Packet(outside, node_ip, "tcp", 40000, 80)).verdict == DENY
    assert ev.host(hep, INGRESS, Packet(outside, "198.18.4.30", "tcp", 40000, 8080), forwarded=True).verdict == DENY
    assert ev.host(hep, INGRESS, Packet(outside, node_ip, "tcp", 40000, 31852), forwarded=True).allowed
    assert ev.host(hep, INGRESS, Packet("198.18.0.5", node_ip, "tcp", 40000, 80)).allowed
    assert ev.host(hep, INGRESS, Packet("198.18.4.7", "198.18.4.30", "tcp", 40000, 8080), forwarded=True).allowed
    assert ev.host(hep, EGRESS, Packet(node_ip, outside, "tcp", 40000, 443)).allowed
    assert ev.host(hep, INGRESS, Packet(outside, node_ip, "tcp", 40000, 22)).by == "failsafe tcp:22"


def test_pre_dnat_pinhole_needs_the_host_endpoints_expected_ips():
    """Without expectedIPs a host endpoint has no address that selectors could match."""
    state = example("hosts/pre-dnat.yaml")
    from dataclasses import replace
    bare = replace(state, host_endpoints=(replace(state.host_endpoints[0], expected_ips=()),))
    hep = bare.host_endpoints[0]
    packet = Packet("198.19.1.1", "198.18.0.1", "tcp", 40000, 31852)
    assert verdict(bare, hep, INGRESS, packet, forwarded=True).verdict == DENY


@pytest.mark.parametrize("direction, proto, port, expected", [
    (INGRESS, "tcp", 22, ALLOW), (INGRESS, "tcp", 179, ALLOW), (INGRESS, "tcp", 6443, ALLOW),
    (INGRESS, "udp", 68, ALLOW), (INGRESS, "tcp", 2379, ALLOW), (INGRESS, "tcp", 80, DENY),
    (INGRESS, "udp", 53, DENY),
    (EGRESS, "udp", 53, ALLOW), (EGRESS, "tcp", 179, ALLOW), (EGRESS, "tcp", 6443, ALLOW),
    (EGRESS, "udp", 67, ALLOW), (EGRESS, "tcp", 443, DENY), (EGRESS, "tcp", 22, DENY),
])
def test_deny_all_on_every_interface_never_cuts_ssh_bgp_or_the_api_server(direction, proto, port, expected):
    state = example("hosts/deny-all-failsafe.yaml")
    hep = state.host_endpoints[0]
    assert hep.wildcard
    packet = Packet("198.19.1.1", "198.18.0.1", proto, 40000, port) if direction == INGRESS else \
        Packet("198.18.0.1", "198.19.1.1", proto, 40000, port)
    assert verdict(state, hep, direction, packet).verdict == expected


# --- the semantics table --------------------------------------------------------------------------

POD_A, POD_B = pod("a", "ns1", "198.18.4.1", {"app": "a"}), pod("b", "ns1", "198.18.4.2", {"app": "b"})
ALLOW_ALL = [{"action": "Allow"}]
DENY_ALL = [{"action": "Deny"}]


def test_no_policy_at_all_is_the_namespace_profile_allow():
    flows = Flows(cluster(POD_A, POD_B))
    decision = flows.decide("ns1/a", "ns1/b")
    assert decision.allowed and decision.by == "profile kns.ns1"


@pytest.mark.parametrize("first, second, expected", [
    (("deny", 10), ("allow", 20), DENY),
    (("deny", 20), ("allow", 10), ALLOW),
    (("a-deny", 10), ("b-allow", 10), DENY),       # equal order: by name
    (("b-deny", 10), ("a-allow", 10), ALLOW),
    (("deny", None), ("allow", 1000), ALLOW),      # no order: last
])
def test_policy_order_and_ties(first, second, expected):
    (deny_name, deny_order), (allow_name, allow_order) = first, second
    deny = gnp(deny_name, selector="app == 'b'", ingress=DENY_ALL, **({"order": deny_order} if deny_order else {}))
    allow = gnp(allow_name, selector="app == 'b'", ingress=ALLOW_ALL, order=allow_order)
    assert Flows(cluster(POD_A, POD_B, deny, allow))("ns1/a", "ns1/b") == expected


@pytest.mark.parametrize("orders, expected", [
    ((10, 20), DENY), ((20, 10), ALLOW), ((10, 10), ALLOW),    # equal: "first" < "second" by name
    ((None, 10), ALLOW),                                       # a tier without order comes last
])
def test_tier_order_and_ties(orders, expected):
    first, second = orders
    docs = [tier("second", first), tier("first", second),
            gnp("second.deny", tier="second", selector="app == 'b'", ingress=DENY_ALL),
            gnp("first.allow", tier="first", selector="app == 'b'", ingress=ALLOW_ALL)]
    assert Flows(cluster(POD_A, POD_B, *docs))("ns1/a", "ns1/b") == expected


def test_pass_goes_to_the_next_tier_and_the_last_pass_to_the_profiles():
    t1 = tier("t1", 10)
    passing = gnp("t1.pass", tier="t1", selector="app == 'b'", ingress=[{"action": "Pass"}, {"action": "Deny"}])
    assert Flows(cluster(POD_A, POD_B, t1, passing)).decide("ns1/a", "ns1/b").by == "profile kns.ns1"
    t2 = tier("t2", 20)
    denying = gnp("t2.deny", tier="t2", selector="all()", ingress=DENY_ALL)
    assert Flows(cluster(POD_A, POD_B, t1, passing, t2, denying))("ns1/a", "ns1/b") == DENY
    # A Pass skips the rest of its own tier: a later policy of t1 that would deny is not reached.
    later = gnp("t1.later", tier="t1", order=100, selector="all()", ingress=DENY_ALL)
    passing = gnp("t1.pass", tier="t1", order=1, selector="app == 'b'", ingress=[{"action": "Pass"}])
    assert Flows(cluster(POD_A, POD_B, t1, passing, later))("ns1/a", "ns1/b") == ALLOW


@pytest.mark.parametrize("default_action, expected_selected", [("Deny", DENY), ("Pass", ALLOW)])
def test_tier_default_action_applies_only_to_endpoints_its_policies_select(default_action, expected_selected):
    docs = [tier("t1", 10, default_action),
            gnp("t1.only-from-x", tier="t1", selector="app == 'b'",
                ingress=[{"action": "Allow", "source": {"selector": "app == 'x'"}}])]
    flows = Flows(cluster(POD_A, POD_B, *docs))
    assert flows("ns1/a", "ns1/b") == expected_selected        # b selected: the tier ends with its action
    assert flows("ns1/b", "ns1/a") == ALLOW                    # a selected by no policy of t1: skipped


def test_a_policy_without_the_direction_in_types_does_not_apply():
    docs = [tier("t1", 10), gnp("t1.egress-only", tier="t1", selector="all()", types=["Egress"],
                                egress=ALLOW_ALL, ingress=DENY_ALL)]
    assert Flows(cluster(POD_A, POD_B, *docs))("198.18.9.9", "ns1/b") == ALLOW


def test_deny_before_allow_and_allow_before_deny():
    deny_first = gnp("p", selector="app == 'b'", ingress=[{"action": "Deny", "protocol": "TCP"}, {"action": "Allow"}])
    flows = Flows(cluster(POD_A, POD_B, deny_first))
    assert flows("ns1/a", "ns1/b", 80) == DENY and flows("ns1/a", "ns1/b", 53, "udp") == ALLOW
    allow_first = gnp("p", selector="app == 'b'", ingress=[{"action": "Allow", "protocol": "TCP"}, {"action": "Deny"}])
    flows = Flows(cluster(POD_A, POD_B, allow_first))
    assert flows("ns1/a", "ns1/b", 80) == ALLOW and flows("ns1/a", "ns1/b", 53, "udp") == DENY


def test_log_records_and_goes_on():
    policy = gnp("logged", selector="app == 'b'", ingress=[{"action": "Log", "protocol": "TCP"}, {"action": "Allow"}])
    decision = Flows(cluster(POD_A, POD_B, policy)).decide("ns1/a", "ns1/b")
    assert decision.allowed and decision.logged == ("GlobalNetworkPolicy logged spec.ingress[0]",)


def test_nets_and_not_nets():
    policy = np("p", "ns1", selector="app == 'a'", types=["Egress"], egress=[
        {"action": "Allow", "destination": {"nets": ["198.19.0.0/16"], "notNets": ["198.19.5.0/24"]}}])
    flows = Flows(cluster(POD_A, policy))
    assert flows("ns1/a", "198.19.1.1") == ALLOW
    assert flows("ns1/a", "198.19.5.1") == DENY
    assert flows("ns1/a", "198.20.0.1") == DENY


def test_ports_not_ports_and_ranges():
    policy = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["8000:8100", 443], "notPorts": [8080]}}])
    flows = Flows(cluster(POD_A, POD_B, policy))
    assert [flows("ns1/a", "ns1/b", p) for p in (8000, 8080, 8100, 8101, 443, 80)] == \
        [ALLOW, DENY, ALLOW, DENY, ALLOW, DENY]
    assert flows("ns1/a", "ns1/b", 443, "udp") == DENY
    source_ports = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "protocol": "UDP", "source": {"ports": [53]}}])
    flows = Flows(cluster(POD_A, POD_B, source_ports))
    assert flows("ns1/a", "ns1/b", 5000, "udp", src_port=53) == ALLOW
    assert flows("ns1/a", "ns1/b", 5000, "udp", src_port=54) == DENY


def test_not_selector_matches_everything_but_what_it_selects():
    """"selector: !has(foo)" matches endpoints without the label; "notSelector: has(foo)"
    matches anywhere, outside the cluster too, except endpoints with it."""
    bad = pod("bad", "ns1", "198.18.4.3", {"foo": "x"})
    not_selector = gnp("p", selector="app == 'b'", ingress=[{"action": "Allow", "source": {"notSelector": "has(foo)"}}])
    flows = Flows(cluster(POD_A, POD_B, bad, not_selector))
    assert (flows("ns1/bad", "ns1/b"), flows("ns1/a", "ns1/b"), flows(OUTSIDE, "ns1/b")) == (DENY, ALLOW, ALLOW)
    negated = gnp("p", selector="app == 'b'", ingress=[{"action": "Allow", "source": {"selector": "!has(foo)"}}])
    flows = Flows(cluster(POD_A, POD_B, bad, negated))
    assert (flows("ns1/bad", "ns1/b"), flows("ns1/a", "ns1/b"), flows(OUTSIDE, "ns1/b")) == (DENY, ALLOW, DENY)


def test_not_selector_in_a_namespaced_policy_is_not_confined_but_the_rule_is():
    """Calico confines a namespaced policy's rule to its namespace as soon as the rule uses a
    selector field, notSelector too; the notSelector itself selects across namespaces."""
    other = pod("c", "ns2", "198.18.4.5", {"app": "c"})
    policy = np("p", "ns1", selector="app == 'b'",
                ingress=[{"action": "Allow", "source": {"notSelector": "app == 'c'"}}])
    flows = Flows(cluster(POD_A, POD_B, other, policy))
    assert flows("ns1/a", "ns1/b") == ALLOW
    assert flows("ns2/c", "ns1/b") == DENY
    assert flows(OUTSIDE, "ns1/b") == DENY           # confined to ns1's endpoints


def test_protocols_by_name_and_number_and_not_protocol():
    by_number = gnp("p", selector="app == 'b'", ingress=[{"action": "Allow", "protocol": 6}])
    flows = Flows(cluster(POD_A, POD_B, by_number))
    assert flows("ns1/a", "ns1/b", 80, "tcp") == ALLOW and flows("ns1/a", "ns1/b", 80, "udp") == DENY
    not_udp = gnp("p", selector="app == 'b'", ingress=[{"action": "Allow", "notProtocol": "UDP"}])
    flows = Flows(cluster(POD_A, POD_B, not_udp))
    assert flows("ns1/a", "ns1/b", 80, "tcp") == ALLOW and flows("ns1/a", "ns1/b", 80, "udp") == DENY
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=8, icmp_code=0) == ALLOW


def test_icmp_type_and_code():
    ping = gnp("p", selector="app == 'b'", ingress=[{"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}}])
    flows = Flows(cluster(POD_A, POD_B, ping))
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=8, icmp_code=0) == ALLOW
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=13, icmp_code=0) == DENY
    coded = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 3, "code": 4}}])
    flows = Flows(cluster(POD_A, POD_B, coded))
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=3, icmp_code=4) == ALLOW
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=3, icmp_code=3) == DENY
    not_ping = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 8}}])
    flows = Flows(cluster(POD_A, POD_B, not_ping))
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=8, icmp_code=0) == DENY
    assert flows("ns1/a", "ns1/b", None, "icmp", icmp_type=13, icmp_code=0) == ALLOW


def test_icmpv6_and_ip_version():
    a6 = pod("a", "ns1", "2001:db8::1", {"app": "a"})
    b6 = pod("b", "ns1", "2001:db8::2", {"app": "b"})
    policy = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "protocol": "ICMPv6", "icmp": {"type": 128}},
        {"action": "Allow", "ipVersion": 4}])
    flows = Flows(cluster(a6, b6, policy))
    assert flows("ns1/a", "ns1/b", None, "icmpv6", icmp_type=128, icmp_code=0) == ALLOW
    assert flows("ns1/a", "ns1/b", 80) == DENY                        # ipVersion 4 only
    v6_nets = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "source": {"nets": ["2001:db8::/64"]}}])
    assert Flows(cluster(a6, b6, v6_nets))("ns1/a", "ns1/b", 80) == ALLOW
    assert Flows(cluster(POD_A, POD_B, v6_nets))("ns1/a", "ns1/b", 80) == DENY     # v6 nets never match IPv4


def test_named_ports_across_pods():
    a = pod("a", "ns1", "198.18.4.1", {"app": "srv"}, ports={"http": 8080})
    b = pod("b", "ns1", "198.18.4.2", {"app": "srv"}, ports={"http": 9090})
    client = pod("client", "ns1", "198.18.4.9", {"app": "client"})
    policy = gnp("p", selector="app == 'srv'", ingress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}}])
    flows = Flows(cluster(a, b, client, policy))
    assert [flows("ns1/client", "ns1/a", 8080), flows("ns1/client", "ns1/a", 9090),
            flows("ns1/client", "ns1/b", 9090), flows("ns1/client", "ns1/b", 8080)] == [ALLOW, DENY, ALLOW, DENY]
    egress = np("e", "ns1", selector="app == 'client'", types=["Egress"], egress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"selector": "app == 'srv'", "ports": ["http"]}}])
    flows = Flows(cluster(a, b, client, egress))
    assert flows("ns1/client", "ns1/a", 8080) == ALLOW and flows("ns1/client", "ns1/a", 9090) == DENY
    assert flows("ns1/client", "198.18.4.2", 9090) == ALLOW
    assert flows("ns1/client", "ns1/a", 8080, "udp") == DENY


def test_service_account_names_and_selectors():
    docs = [service_account("frontend", "ns1", team="web"), service_account("backend", "ns1", team="data"),
            pod("fe", "ns1", "198.18.4.1", {"app": "x"}, sa="frontend"),
            pod("be", "ns1", "198.18.4.2", {"app": "x"}, sa="backend"),
            pod("db", "ns1", "198.18.4.3", {"app": "db"}, sa="backend")]
    by_name = gnp("p", selector="app == 'db'", ingress=[{"action": "Allow", "source": {"serviceAccounts": {
        "names": ["frontend"]}}}])
    flows = Flows(cluster(*docs, by_name))
    assert flows("ns1/fe", "ns1/db") == ALLOW and flows("ns1/be", "ns1/db") == DENY
    by_labels = gnp("p", selector="app == 'db'", ingress=[{"action": "Allow", "source": {"serviceAccounts": {
        "selector": "team == 'data'"}}}])
    flows = Flows(cluster(*docs, by_labels))
    assert flows("ns1/fe", "ns1/db") == DENY and flows("ns1/be", "ns1/db") == ALLOW
    # A policy's serviceAccountSelector picks the pods it applies to by their account's labels.
    applies = gnp("p", selector="all()", serviceAccountSelector="team == 'web'", types=["Egress"], egress=DENY_ALL)
    flows = Flows(cluster(*docs, applies))
    assert flows("ns1/fe", "ns1/db") == DENY and flows("ns1/be", "ns1/db") == ALLOW


def test_network_sets_scopes():
    """A namespaced NetworkSet is seen by its namespace's policies and global ones; a
    GlobalNetworkSet by global policies and, with namespaceSelector global(), namespaced ones."""
    docs = [pod("x", "ns1", "198.18.4.1"), pod("y", "ns2", "198.18.4.2"),
            kind("NetworkSet", "db", {"nets": ["198.19.5.0/24"]}, "ns1", role="db"),
            kind("GlobalNetworkSet", "gdb", {"nets": ["198.19.6.0/24"]}, role="db")]
    rule = {"action": "Allow", "destination": {"selector": "role == 'db'"}}
    policies = [np("p", ns, selector="all()", types=["Egress"], egress=[rule]) for ns in ("ns1", "ns2")]
    flows = Flows(cluster(*docs, *policies))
    assert (flows("ns1/x", "198.19.5.1"), flows("ns1/x", "198.19.6.1")) == (ALLOW, DENY)
    assert (flows("ns2/y", "198.19.5.1"), flows("ns2/y", "198.19.6.1")) == (DENY, DENY)
    global_rule = {"action": "Allow", "destination": {"selector": "role == 'db'", "namespaceSelector": "global()"}}
    flows = Flows(cluster(*docs, np("p", "ns2", selector="all()", types=["Egress"], egress=[global_rule])))
    assert (flows("ns2/y", "198.19.5.1"), flows("ns2/y", "198.19.6.1")) == (DENY, ALLOW)
    flows = Flows(cluster(*docs, gnp("g", selector="all()", types=["Egress"], egress=[rule])))
    assert (flows("ns2/y", "198.19.5.1"), flows("ns2/y", "198.19.6.1"), flows("ns2/y", "198.19.7.1")) == \
        (ALLOW, ALLOW, DENY)


def test_namespaced_versus_global_policy():
    docs = [pod("a", "ns1", "198.18.4.1", {"app": "x"}), pod("b", "ns2", "198.18.4.2", {"app": "x"}),
            pod("t", "ns1", "198.18.4.9", {"app": "t"})]
    namespaced = np("deny", "ns1", selector="app == 'x'", ingress=DENY_ALL)
    flows = Flows(cluster(*docs, namespaced))
    assert flows("ns1/t", "ns1/a") == DENY and flows("ns1/t", "ns2/b") == ALLOW
    flows = Flows(cluster(*docs, gnp("deny", selector="app == 'x'", ingress=DENY_ALL)))
    assert flows("ns1/t", "ns1/a") == DENY and flows("ns1/t", "ns2/b") == DENY
    by_namespace = gnp("deny", selector="app == 'x'", namespaceSelector="projectcalico.org/name == 'ns2'",
                       ingress=DENY_ALL)
    flows = Flows(cluster(*docs, by_namespace))
    assert flows("ns1/t", "ns1/a") == ALLOW and flows("ns1/t", "ns2/b") == DENY
    # A namespaced policy's rule selectors see its own namespace, unless a namespaceSelector says otherwise.
    from_x = [np("only-x", "ns1", selector="app == 't'", ingress=[{"action": "Allow", "source": rule}])
              for rule in ({"selector": "app == 'x'"}, {"selector": "app == 'x'", "namespaceSelector": "all()"})]
    flows = Flows(cluster(*docs, from_x[0]))
    assert flows("ns1/a", "ns1/t") == ALLOW and flows("ns2/b", "ns1/t") == DENY
    flows = Flows(cluster(*docs, from_x[1]))
    assert flows("ns1/a", "ns1/t") == ALLOW and flows("ns2/b", "ns1/t") == ALLOW


def test_namespace_selector_sees_namespace_labels_and_names():
    docs = [namespace("ns1", team="blue"), namespace("ns2", team="red"),
            pod("a", "ns1", "198.18.4.1"), pod("b", "ns2", "198.18.4.2"), pod("t", "ns2", "198.18.4.9", {"app": "t"})]
    for selector in ("team == 'blue'", "projectcalico.org/name == 'ns1'", "kubernetes.io/metadata.name == 'ns1'"):
        policy = gnp("p", selector="app == 't'",
                     ingress=[{"action": "Allow", "source": {"namespaceSelector": selector}}])
        flows = Flows(cluster(*docs, policy))
        assert flows("ns1/a", "ns2/t") == ALLOW and flows("ns2/b", "ns2/t") == DENY, selector


def test_kubernetes_network_policy_is_in_the_default_tier_at_order_1000():
    knp = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "from-a", "namespace": "ns1"},
           "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}}
    before = gnp("deny-first", order=500, selector="app == 'b'", ingress=DENY_ALL)
    after = gnp("deny-after", order=2000, selector="app == 'b'", ingress=DENY_ALL)
    assert Flows(cluster(POD_A, POD_B, knp, before))("ns1/a", "ns1/b") == DENY
    assert Flows(cluster(POD_A, POD_B, knp, after))("ns1/a", "ns1/b") == ALLOW
    assert Flows(cluster(POD_A, POD_B, knp))(OUTSIDE, "ns1/b") == DENY


def test_host_endpoint_profiles_and_default_deny():
    host = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]})
    state = cluster(host)
    packet = Packet("198.19.1.1", "198.18.0.1", "tcp", 40000, 80)
    assert verdict(state, state.host_endpoints[0], INGRESS, packet).verdict == DENY
    allow = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"],
                                             "profiles": ["projectcalico-default-allow"]})
    state = cluster(allow)
    decision = verdict(state, state.host_endpoints[0], INGRESS, packet)
    assert decision.allowed and decision.by == "profile projectcalico-default-allow"


def test_host_endpoints_are_selected_by_global_policy_rules_by_their_expected_ips():
    host = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0",
                                            "expectedIPs": ["198.18.0.1"]}, role="gateway")
    rule = {"action": "Allow", "destination": {"selector": "role == 'gateway'"}}
    flows = Flows(cluster(POD_A, host, gnp("g", selector="app == 'a'", types=["Egress"], egress=[rule])))
    assert flows("ns1/a", "198.18.0.1") == ALLOW and flows("ns1/a", "198.18.0.2") == DENY
    namespaced = np("p", "ns1", selector="app == 'a'", types=["Egress"], egress=[rule])
    assert Flows(cluster(POD_A, host, namespaced))("ns1/a", "198.18.0.1") == DENY
    global_scope = np("p", "ns1", selector="app == 'a'", types=["Egress"], egress=[
        rule | {"destination": {"selector": "role == 'gateway'", "namespaceSelector": "global()"}}])
    assert Flows(cluster(POD_A, host, global_scope))("ns1/a", "198.18.0.1") == ALLOW


def test_failsafes_follow_felix_configuration_per_node():
    host = kind("HostEndpoint", "n1-all", {"node": "node1", "interfaceName": "*"})
    ssh = Packet("198.19.1.1", "198.18.0.1", "tcp", 40000, 22)
    custom = Packet("198.19.1.1", "198.18.0.1", "tcp", 40000, 2222)
    none = kind("FelixConfiguration", "default", {"failsafeInboundHostPorts": []})
    state = cluster(host, none)
    assert verdict(state, state.host_endpoints[0], INGRESS, ssh).verdict == DENY
    node_override = kind("FelixConfiguration", "node.node1", {"failsafeInboundHostPorts": [
        {"protocol": "TCP", "port": 2222, "net": "198.19.0.0/16"}]})
    state = cluster(host, none, node_override)
    assert verdict(state, state.host_endpoints[0], INGRESS, custom).allowed
    assert verdict(state, state.host_endpoints[0], INGRESS, ssh).verdict == DENY
    outside_net = Packet("198.20.1.1", "198.18.0.1", "tcp", 40000, 2222)
    assert verdict(state, state.host_endpoints[0], INGRESS, outside_net).verdict == DENY


def test_untracked_and_pre_dnat_policies_decide_before_normal_policy():
    host = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]},
                edge="yes")
    deny = gnp("deny", selector="edge == 'yes'", ingress=DENY_ALL)
    untracked = gnp("fast", selector="edge == 'yes'", doNotTrack=True, applyOnForward=True, order=1,
                    ingress=[{"action": "Allow", "protocol": "UDP", "destination": {"ports": [4789]}}])
    state = cluster(host, deny, untracked)
    hep = state.host_endpoints[0]
    vxlan = Packet("198.19.1.1", "198.18.0.1", "udp", 40000, 4789)
    decision = verdict(state, hep, INGRESS, vxlan)
    assert decision.allowed and decision.by == "untracked: GlobalNetworkPolicy fast spec.ingress[0]"
    assert verdict(state, hep, INGRESS, Packet("198.19.1.1", "198.18.0.1", "udp", 40000, 4790)).verdict == DENY
    # Untracked policy does not apply to "*" host endpoints.
    star = kind("HostEndpoint", "n1-all", {"node": "node1", "interfaceName": "*"}, edge="yes")
    state = cluster(star, deny, untracked)
    assert verdict(state, state.host_endpoints[0], INGRESS, vxlan).verdict == DENY
    # Pre-DNAT: no default drop; a Deny stops even forwarded traffic to pods.
    pre = gnp("pre", selector="edge == 'yes'", preDNAT=True, applyOnForward=True,
              ingress=[{"action": "Deny", "source": {"nets": ["198.19.66.0/24"]}}])
    state = cluster(host, pre, POD_A)
    hep = state.host_endpoints[0]
    blocked = Packet("198.19.66.1", "198.18.4.1", "tcp", 1, 80)
    assert verdict(state, hep, INGRESS, blocked, forwarded=True).verdict == DENY
    assert verdict(state, hep, INGRESS, Packet("198.19.67.1", "198.18.4.1", "tcp", 1, 80), forwarded=True).allowed


def test_apply_on_forward():
    host = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]},
                edge="yes")
    to_pod = Packet("198.19.1.1", "198.18.4.1", "tcp", 40000, 80)
    local_only = gnp("local", selector="edge == 'yes'", ingress=DENY_ALL)
    state = cluster(host, local_only)
    hep = state.host_endpoints[0]
    assert verdict(state, hep, INGRESS, to_pod, forwarded=True).allowed          # not applyOnForward
    forwarded = gnp("fwd", selector="edge == 'yes'", applyOnForward=True, ingress=DENY_ALL)
    state = cluster(host, forwarded)
    assert verdict(state, state.host_endpoints[0], INGRESS, to_pod, forwarded=True).verdict == DENY
    passing = [tier("t1", 10), gnp("t1.fwd", tier="t1", selector="edge == 'yes'", applyOnForward=True,
                                   ingress=[{"action": "Pass"}])]
    state = cluster(host, *passing)
    assert verdict(state, state.host_endpoints[0], INGRESS, to_pod, forwarded=True).verdict == UNMANAGED


@pytest.mark.parametrize("action, expected", [(None, DENY), ("Drop", DENY), ("Accept", ALLOW), ("Return", UNMANAGED)])
def test_pod_to_host_follows_default_endpoint_to_host_action(action, expected):
    config = kind("FelixConfiguration", "default", {"defaultEndpointToHostAction": action})
    docs = [POD_A] + ([config] if action else [])
    state = cluster(*docs)
    ev = Evaluator(state)
    ep = state.endpoints[0]
    assert ev.to_host(ep, Packet("198.18.4.1", "198.18.0.1", "tcp", 40000, 10250)).verdict == expected
    assert ev.from_host(ep, Packet("198.18.0.1", "198.18.4.1", "tcp", 40000, 8080)).allowed
    egress_deny = cluster(*docs, gnp("no-egress", selector="all()", types=["Egress"]))
    assert Evaluator(egress_deny).to_host(egress_deny.endpoints[0],
                                          Packet("198.18.4.1", "198.18.0.1", "tcp", 40000, 10250)).verdict == DENY


def test_host_endpoint_for_an_interface():
    named = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0"})
    by_ip = kind("HostEndpoint", "n1-ip", {"node": "node1", "expectedIPs": ["198.18.0.7"]})
    star = kind("HostEndpoint", "n1-all", {"node": "node1", "interfaceName": "*"})
    ev = Evaluator(cluster(named, by_ip, star))
    assert ev.host_endpoint_for("node1", "eth0").name == "n1-eth0"
    assert ev.host_endpoint_for("node1", "eth1", ["198.18.0.7"]).name == "n1-ip"
    assert ev.host_endpoint_for("node1", "eth2").name == "n1-all"
    assert Evaluator(cluster(named)).host_endpoint_for("node1", "eth2") is None
    assert ev.host_endpoint_for("node2", "eth0") is None


def test_calico_crd_storage_form_means_the_same_policy():
    """crd.projectcalico.org/v1 objects (Calico's storage form, "default." prefixed names) give
    the same verdicts as the v3 ones."""
    v3 = gnp("deny-b", selector="app == 'b'", ingress=DENY_ALL)
    stored = v3 | {"apiVersion": "crd.projectcalico.org/v1", "metadata": {"name": "default.deny-b"}}
    assert Flows(cluster(POD_A, POD_B, v3))("ns1/a", "ns1/b") == DENY
    state = cluster(POD_A, POD_B, stored)
    assert Flows(state)("ns1/a", "ns1/b") == DENY and state.policies[0].name == "deny-b"
    assert CALICO == "projectcalico.org/v3"


def test_kubernetes_peers_are_pods_only():
    """Calico converts a Kubernetes peer to `projectcalico.org/orchestrator == 'k8s'` and its
    selectors: network sets and host endpoints never match it, whatever the namespaces."""
    docs = [POD_A, POD_B, kind("NetworkSet", "n", {"nets": ["198.19.5.0/24"]}, "ns1"),
            kind("HostEndpoint", "h", {"node": "node1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]})]
    knp = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "peers", "namespace": "ns1"},
           "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{"from": [
               {"podSelector": {}},
               {"namespaceSelector": {"matchExpressions": [
                   {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["ns2"]}]}}]}]}}
    flows = Flows(cluster(*docs, knp))
    assert flows("ns1/a", "ns1/b") == ALLOW
    assert flows("198.19.5.1", "ns1/b") == DENY
    assert flows("198.18.0.1", "ns1/b") == DENY
    calico = np("peers", "ns1", selector="app == 'b'", ingress=[{"action": "Allow", "source": {"selector": "all()"}}])
    assert Flows(cluster(*docs, calico))("198.19.5.1", "ns1/b") == ALLOW      # Calico's own selectors do


def test_failsafe_traffic_skips_untracked_and_pre_dnat_policies_even_when_forwarded():
    """Felix's raw and mangle chains accept failsafe traffic before their policies, whatever its
    destination (before routing, forwarded traffic is not told apart), and raw also replies from
    the other direction's failsafe ports: the normal (here forwarded) policies judge it instead."""
    host = kind("HostEndpoint", "n1-eth0", {"node": "node1", "interfaceName": "eth0"}, edge="yes")
    raw = gnp("raw", selector="edge == 'yes'", doNotTrack=True, applyOnForward=True, ingress=DENY_ALL)
    pre = gnp("pre", selector="edge == 'yes'", preDNAT=True, applyOnForward=True, ingress=DENY_ALL)
    state = cluster(host, raw, pre)
    hep = state.host_endpoints[0]
    reply_from_dns = Packet(OUTSIDE, "198.18.4.9", "udp", 53, 5000)      # outbound failsafe udp:53's reply
    to_ssh = Packet(OUTSIDE, "198.18.4.9", "tcp", 40000, 22)             # inbound failsafe tcp:22
    other = Packet(OUTSIDE, "198.18.4.9", "udp", 54, 5000)
    assert verdict(state, hep, INGRESS, other, forwarded=True).by.startswith("untracked: ")
    untracked_only = cluster(host, raw)
    assert verdict(untracked_only, hep, INGRESS, reply_from_dns, forwarded=True).verdict == ALLOW   # no forward policy
    assert verdict(state, hep, INGRESS, reply_from_dns, forwarded=True).by.startswith("pre-DNAT: ")
    assert verdict(state, hep, INGRESS, to_ssh, forwarded=True).verdict == ALLOW
