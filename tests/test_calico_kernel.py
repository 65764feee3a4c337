"""Calico's policy model in both data planes, on a real kernel: for Calico's documented
examples (tests/calico), a table of semantics cases and random tiered policies, every flow of a
matrix (every pair of pods, pods to and from addresses outside the node, over TCP, UDP, ICMP
types and codes and a protocol by number) is sent as a real packet through the node namespace
holding weft's render, and the kernel's verdict must equal the reference evaluator's
(desired.verdict). The render's text must also read back exactly from iptables-save (no drift).

The `plane` fixture runs a test on the iptables data plane and on the eBPF one (the same
matrix, the same oracle); the eBPF half shares one pin directory per module, so weft's
programs are compiled once.
"""
from __future__ import annotations

import random
import re

import pytest

from tests import nodens
from tests.calico_cluster import NODE, cluster, example, gnp, kind, namespace, np, pod, service_account, tier
from tests.calico_kernel import DATAPLANES, Flow, KernelNode, bpf_pins, bpf_usable, in_ns

pytestmark = pytest.mark.skipif(nodens.usable() is not None, reason=str(nodens.usable()))


@pytest.fixture(scope="module")
def pins():
    """The module's eBPF pin directory (one compile for every eBPF test here), removed after."""
    yield from bpf_pins("calico")


@pytest.fixture(params=DATAPLANES)
def plane(request) -> dict:
    """KernelNode's arguments for one data plane."""
    if request.param == "iptables":
        return {"dataplane": "iptables"}
    if why := bpf_usable():
        pytest.skip(why)
    return {"dataplane": "ebpf", "bpf_root": request.getfixturevalue("pins")}

OUTSIDE = ("198.19.1.5", "198.19.5.1", "198.19.6.1", "198.19.66.7", "198.19.200.1")
# (protocol, destination port, source port, icmp type, icmp code)
PROBES = (("tcp", 80, None, None, None), ("tcp", 443, None, None, None), ("tcp", 5432, None, None, None),
          ("tcp", 8080, None, None, None), ("tcp", 9090, None, None, None), ("udp", 53, None, None, None),
          ("udp", 5000, 53, None, None), ("icmp", None, None, 8, 0), ("icmp", None, None, 8, 1),
          ("icmp", None, None, 13, 0), (47, None, None, None, None))


def matrix(node: KernelNode, probes=PROBES, outside=OUTSIDE) -> list[Flow]:
    pods = sorted(node.pods)
    pairs = [(a, b) for a in pods for b in pods if a != b]
    pairs += [(p, o) for p in pods for o in outside] + [(o, p) for p in pods for o in outside]
    return [Flow(src, dst, proto, dport, sport, itype, icode)
            for src, dst in pairs for proto, dport, sport, itype, icode in probes]


def saved_chains(node: KernelNode, table: str = "filter") -> dict[str, list[str]]:
    """weft's chains of `table` as iptables-save prints them in the node (without counters)."""
    chains: dict[str, list[str]] = {}
    for line in in_ns(node.node_ns, "iptables-save", "-t", table).splitlines():
        if line.startswith(":weft-"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A weft-"):
            chains.setdefault(line.split()[1], []).append(line)
    return chains


def check(state, name: str = "", plane: dict | None = None) -> None:
    with KernelNode(state, NODE, **(plane or {})) as node:
        dataplane = node.load(state)
        rendered = {c.name: list(c.rules) for (table, _), c in dataplane.chains.items() if table == "filter"}
        assert saved_chains(node) == rendered, f"{name}: iptables-save differs from the render (drift)"
        wrong = node.mismatches(matrix(node))
        assert not wrong, f"{name}: {len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])


# --- Calico's documented examples ---------------------------------------------------------------

EXAMPLES = {
    "default-deny": ("default-deny/cluster.yaml", "default-deny/deny-app-policy.yaml"),
    "namespaced-default-deny": ("default-deny/cluster.yaml", "default-deny/namespaced.yaml"),
    "tutorial-2": ("tutorial/1-cluster.yaml", "tutorial/2-default-deny.yaml"),
    "tutorial-3": ("tutorial/1-cluster.yaml", "tutorial/2-default-deny.yaml", "tutorial/3-allow-busybox-egress.yaml"),
    "tutorial-4": ("tutorial",),
    "tiers": ("tiers",),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_documented_example_on_the_kernel(name, plane):
    check(example(*EXAMPLES[name]), name, plane)


# --- the semantics table ----------------------------------------------------------------------------

A = pod("a", "ns1", "198.18.4.1", {"app": "a"}, sa="frontend", ports={"http": 8080})
B = pod("b", "ns1", "198.18.4.2", {"app": "b"}, sa="backend", ports={"http": 9090, "db": 5432})
C = pod("c", "ns2", "198.18.4.3", {"app": "c", "foo": "x"})
D = pod("d", "ns2", "198.18.4.4", {"app": "b"})
BASE = (namespace("ns1", team="blue"), namespace("ns2", team="red"),
        service_account("frontend", "ns1", team="web"), service_account("backend", "ns1", team="data"),
        A, B, C, D,
        kind("NetworkSet", "partners", {"nets": ["198.19.5.0/24"]}, "ns1", role="db"),
        kind("GlobalNetworkSet", "blocked", {"nets": ["198.19.66.0/24", "198.19.6.0/24"]}, role="db"),
        kind("GlobalNetworkSet", "world", {"nets": ["198.19.0.0/16"]}, zone="world"))
ALLOW_ALL, DENY_ALL = [{"action": "Allow"}], [{"action": "Deny"}]

CASES = {
    "order-and-ties": [gnp("b-deny", order=10, selector="app == 'b'", ingress=DENY_ALL),
                       gnp("a-allow", order=10, selector="app == 'b'",
                           ingress=[{"action": "Allow", "protocol": "TCP"}]),
                       gnp("late", selector="app == 'b'", ingress=ALLOW_ALL)],
    "tiers-pass-and-ends": [tier("t1", 10), tier("t2", 20, "Pass"), tier("t3", None),
                            gnp("t1.pass", tier="t1", selector="app == 'b'",
                                ingress=[{"action": "Pass", "protocol": "TCP"},
                                         {"action": "Allow", "protocol": "UDP"}]),
                            gnp("t2.only-icmp", tier="t2", selector="has(app)",
                                ingress=[{"action": "Deny", "protocol": "ICMP", "icmp": {"type": 13}}]),
                            gnp("t3.deny-80", tier="t3", selector="app in {'b', 'c'}",
                                ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [80]}},
                                         {"action": "Pass"}])],
    "default-action-deny-only-where-selected": [
        tier("t1", 10), gnp("t1.only-from-a", tier="t1", selector="app == 'b'",
                            ingress=[{"action": "Allow", "source": {"selector": "app == 'a'"}}])],
    "deny-before-allow-and-log": [
        gnp("p", selector="all()", types=["Ingress", "Egress"],
            ingress=[{"action": "Log", "protocol": "TCP"}, {"action": "Deny", "protocol": "TCP"}, {"action": "Allow"}],
            egress=[{"action": "Log"}, {"action": "Allow", "protocol": "UDP"},
                    {"action": "Allow", "protocol": "ICMP"}])],
    "nets-not-nets-ports-not-ports": [
        np("p", "ns1", selector="app == 'a'", types=["Egress", "Ingress"], egress=[
            {"action": "Allow", "destination": {"nets": ["198.19.0.0/16", "198.18.4.0/24"],
                                                 "notNets": ["198.19.5.0/24", "198.18.4.3/32"]}}],
           ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["400:500", 8080, 5432],
                                                                          "notPorts": [5432, 450]}},
                    {"action": "Allow", "protocol": "UDP", "source": {"ports": [53], "notNets": ["198.19.1.0/24"]}}])],
    "not-selector-and-not-protocol": [
        np("p", "ns1", selector="app == 'b'", ingress=[{"action": "Allow", "source": {"notSelector": "app == 'c'"}}]),
        gnp("g", selector="app == 'c'", ingress=[{"action": "Allow", "notProtocol": "TCP",
                                                  "source": {"notSelector": "has(zone) || app == 'a'"}}])],
    "protocols-by-number-and-icmp": [
        gnp("p", selector="all()", ingress=[
            {"action": "Allow", "protocol": 47},
            {"action": "Allow", "protocol": 6, "destination": {"ports": [443]}},
            {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 1}},
            {"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 8}},
            {"action": "Deny", "protocol": "UDP", "ipVersion": 4}, {"action": "Allow", "ipVersion": 6}])],
    "named-ports": [
        gnp("p", selector="app in {'a', 'b'}", ingress=[
            {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}}]),
        np("e", "ns2", selector="app == 'c'", types=["Egress"], egress=[
            {"action": "Allow", "protocol": "TCP", "destination": {"selector": "app == 'b'", "ports": ["db", 80]}},
            {"action": "Allow", "protocol": "TCP", "destination": {"notPorts": ["http"]}}])],
    "service-accounts": [
        gnp("p", selector="app == 'b'",
            ingress=[{"action": "Allow", "source": {"serviceAccounts": {"names": ["frontend"]}}}]),
        gnp("q", selector="app == 'a'", ingress=[{"action": "Allow", "source": {
            "serviceAccounts": {"selector": "team == 'data'"}}}]),
        gnp("r", selector="all()", serviceAccountSelector="team == 'web'", types=["Egress"], egress=[
            {"action": "Deny", "destination": {"selector": "app == 'c'"}}, {"action": "Allow"}])],
    "network-sets": [
        np("p", "ns1", selector="all()", types=["Egress"], egress=[
            {"action": "Allow", "destination": {"selector": "role == 'db'"}}]),
        np("q", "ns2", selector="all()", types=["Egress"], egress=[
            {"action": "Allow", "destination": {"selector": "role == 'db'", "namespaceSelector": "global()"}}]),
        gnp("g", selector="app == 'b'", ingress=[{"action": "Deny", "source": {"selector": "zone == 'world'"}},
                                                {"action": "Allow"}])],
    "namespaced-versus-global": [
        np("deny", "ns1", selector="app == 'b'", ingress=DENY_ALL),
        gnp("by-ns", selector="app == 'b'", namespaceSelector="team == 'red'", ingress=[
            {"action": "Allow", "source": {"namespaceSelector": "team == 'red'"}}]),
        np("from-b", "ns2", selector="app == 'c'", ingress=[
            {"action": "Allow", "source": {"selector": "app == 'b'"}},
            {"action": "Allow", "source": {"selector": "app == 'a'", "namespaceSelector": "all()"}}])],
}


@pytest.mark.parametrize("name", CASES)
def test_semantics_case_on_the_kernel(name, plane):
    check(cluster(*BASE, *CASES[name], namespaces=()), name, plane)


# --- random tiered policies -----------------------------------------------------------------------

SELECTORS = ("all()", "app == 'b'", "app in {'a', 'c'}", "has(foo)", "!has(foo)", "role == 'db'", "zone == 'world'",
             "app == 'a' || app == 'd'")


def _random_side(rng: random.Random, protocol) -> dict:
    side: dict = {}
    if rng.random() < 0.3:
        side["nets"] = rng.sample(["198.19.0.0/16", "198.19.5.0/24", "198.18.4.0/30", "198.18.4.3/32"],
                                  rng.randint(1, 2))
    if rng.random() < 0.2:
        side["notNets"] = rng.sample(["198.19.6.0/24", "198.18.4.2/32", "198.19.1.0/24"], 1)
    if rng.random() < 0.3:
        side["selector"] = rng.choice(SELECTORS)
    if rng.random() < 0.15:
        side["notSelector"] = rng.choice(SELECTORS)
    if rng.random() < 0.1:
        side["namespaceSelector"] = rng.choice(("global()", "all()", "team == 'red'"))
    if protocol in ("TCP", "UDP") and rng.random() < 0.4:
        side["ports"] = rng.sample([80, 443, "5000:5432", "http", 53, "db"], rng.randint(1, 2))
    if protocol in ("TCP", "UDP") and rng.random() < 0.2:
        side["notPorts"] = rng.sample([443, 5432, "http"], 1)
    return side


def _random_rule(rng: random.Random) -> dict:
    rule: dict = {"action": rng.choice(("Allow", "Allow", "Deny", "Pass", "Log"))}
    protocol = rng.choice((None, None, "TCP", "UDP", "ICMP", 47))
    if protocol is not None:
        rule["protocol"] = protocol
    elif rng.random() < 0.2:
        rule["notProtocol"] = rng.choice(("TCP", "UDP", 1))
    if protocol == "ICMP" and rng.random() < 0.5:
        rule["icmp" if rng.random() < 0.6 else "notICMP"] = {"type": rng.choice((8, 13))} | (
            {"code": rng.choice((0, 1))} if rng.random() < 0.5 else {})
    for side in ("source", "destination"):
        if rng.random() < 0.6:
            if entity := _random_side(rng, protocol):
                rule[side] = entity
    return rule


def random_policies(seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs: list[dict] = []
    tiers = ["default"] + [f"t{i}" for i in range(rng.randint(0, 2))]
    for name in tiers[1:]:
        docs.append(tier(name, rng.choice((None, 10, 20, 20)), rng.choice(("Deny", "Pass"))))
    for i in range(rng.randint(1, 5)):
        t = rng.choice(tiers)
        name = f"p{i}" if t == "default" else f"{t}.p{i}"
        types = rng.choice((["Ingress"], ["Egress"], ["Ingress", "Egress"]))
        spec = {"selector": rng.choice(SELECTORS[:5] + ("app == 'c' || app == 'a'",)), "types": types,
                "ingress": [_random_rule(rng) for _ in range(rng.randint(0, 3))],
                "egress": [_random_rule(rng) for _ in range(rng.randint(0, 3))]}
        if rng.random() < 0.7:
            spec["order"] = rng.choice((1, 10, 10, 100))
        if t != "default":
            spec["tier"] = t
        docs.append(np(name, rng.choice(("ns1", "ns2")), **spec) if rng.random() < 0.4 else gnp(name, **spec))
    return docs


@pytest.mark.parametrize("seed", range(12))
def test_random_tiered_policies_on_the_kernel(seed, plane):
    check(cluster(*BASE, *random_policies(seed), namespaces=()), f"seed {seed}", plane)


# --- Log -----------------------------------------------------------------------------------------

def test_log_rules_count_the_packets_they_log_and_let_them_on():
    """A Log rule logs (its LOG rule's counter, with a prefix naming the policy and rule) and
    the next rule decides."""
    policy = gnp("audit-b", selector="app == 'b'", ingress=[{"action": "Log", "protocol": "TCP"},
                                                          {"action": "Allow", "protocol": "TCP",
                                                           "destination": {"ports": [80]}}])
    state = cluster(*BASE, policy, namespaces=())
    with KernelNode(state, NODE) as node:
        node.load(state)
        flows = [Flow("ns1/a", "ns1/b", "tcp", 80), Flow("ns1/a", "ns1/b", "tcp", 81),
                 Flow("ns2/c", "ns1/b", "tcp", 80)]
        assert node.delivered(node.probes(flows)) == [True, False, True]
        saved = in_ns(node.node_ns, "iptables-save", "-c", "-t", "filter")
        logged = [line for line in saved.splitlines() if "-j LOG" in line]
        assert len(logged) == 1 and '--log-prefix "weft audit-b i0: "' in logged[0]
        assert re.match(r"\[3:\d+\]", logged[0]), logged[0]


# --- through weft itself: plan, apply, drift, destroy ---------------------------------------------

@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_every_calico_rule_field_applies_with_no_drift_and_is_destroyed(tmp_path, backend):
    """`weft apply` of every case above at once, on both iptables backends: a second plan has
    nothing to do, drift finds nothing (the kernel prints every rule as weft renders it), and
    destroy removes it all."""
    policies = []
    for i, case in enumerate([*CASES.values(), random_policies(3), HOST_CASES["tiers-on-a-host"],
                              HOST_CASES["egress-from-a-host"][2:], FORWARD_CASES["forward-tiers-and-pod-policies"][2:],
                              PREDNAT_CASES["tiers-log-pass-and-forward-policies"][2:],
                              UNTRACKED_CASES["untracked-before-pre-dnat-and-normal"][2:]]):
        for d in case:
            if d["kind"] != "Tier":       # the cases reuse names: each gets its own prefix
                tier_name, dot, name = d["metadata"]["name"].rpartition(".")
                policies.append(d | {"metadata": d["metadata"] | {"name": f"{tier_name}{dot}c{i}-{name}"}})
    docs = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}, *BASE, *policies,
            tier("t0", 5), tier("t1", 10), tier("t2", 20, "Pass"), tier("t3", None), tier("t-deny", 30)]
    assert len(policies) > 20
    src = nodens.write_manifests(tmp_path / "src", docs)
    with nodens.node_netns() as ns:
        node = nodens.WeftNode(ns, tmp_path / "state", backend, node=NODE)
        first = node.weft_json("apply", from_dir=src)
        assert first["commands"]
        saved = node.save()
        for text in ("--icmp-type 8/1", "! --icmp-type 8", "-p gre", "! -p tcp", "-j LOG --log-prefix"):
            assert text in saved, text
        for text in ("-m multiport ! --dports", "-m set ! --match-set weft-c-", "-m set --match-set weft-c-",
                     "-i eth0 -m comment", "-j weft-hp-", "-A OUTPUT", "-o eth0 -m comment", "-j weft-hq-",
                     "-j weft-from-hep-fwd", "-g weft-hfi-", "-g weft-hfo-", "-A PREROUTING", "-g weft-hd-",
                     "-j weft-hu-", "-j weft-hv-", "-j NOTRACK"):
            assert text in saved, text
        node.weft("plan", "--detailed-exitcode", from_dir=src, expect=0)
        assert "No drift" in node.weft("drift", from_dir=src, expect=0).stdout
        # Without host endpoints, the OUTPUT and PREROUTING hooks and the host endpoints' chains go.
        nodens.write_manifests(src, [d for d in docs if d["kind"] != "HostEndpoint"])
        node.weft("apply", from_dir=src)
        assert not [line for line in node.save().splitlines() if "OUTPUT" in line and "weft" in line]
        assert "weft-h" not in node.save() and "weft-PREROUTING" not in node.save()
        node.weft("plan", "--detailed-exitcode", from_dir=src, expect=0)
        node.weft("apply", "--destroy")
        assert nodens.weft_names(ns) == []


# --- host endpoints: traffic to the host itself ---------------------------------------------------

HOST_PROBES = (("tcp", 22, None, None, None), ("tcp", 179, None, None, None), ("tcp", 6443, None, None, None),
               ("tcp", 80, None, None, None), ("tcp", 10250, None, None, None), ("tcp", 2222, None, None, None),
               ("udp", 53, None, None, None), ("udp", 68, None, None, None), ("icmp", None, None, 8, 0))
HOST_PEERS = ("198.19.1.5", "198.19.5.1", "198.18.100.7")
HEP = kind("HostEndpoint", "node1-eth0", {"node": NODE, "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]},
           role="worker")
HOST_CASES = {
    "no-policy-no-profile": [HEP],
    "default-allow-profile": [kind("HostEndpoint", "node1-eth0", {"node": NODE, "interfaceName": "eth0",
                                                                  "profiles": ["projectcalico-default-allow"]})],
    "no-failsafes": [HEP, kind("FelixConfiguration", "default", {"failsafeInboundHostPorts": []}),
                     gnp("allow-icmp", selector="role == 'worker'", ingress=[{"action": "Allow", "protocol": "ICMP"}])],
    "node-failsafes-with-net": [
        HEP, kind("FelixConfiguration", "default", {"failsafeInboundHostPorts": []}),
        kind("FelixConfiguration", f"node.{NODE}", {"failsafeInboundHostPorts": [
            {"protocol": "TCP", "port": 2222, "net": "198.19.0.0/16"}, {"protocol": "UDP", "port": 53}]})],
    "tiers-on-a-host": [
        HEP, tier("t1", 10, "Pass"),
        gnp("t1.no-udp", tier="t1", selector="role == 'worker'", ingress=[
            {"action": "Log", "protocol": "UDP"},
            {"action": "Deny", "protocol": "UDP", "source": {"nets": ["198.19.5.0/24"]}}]),
        gnp("web", selector="role == 'worker'", ingress=[
            {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80], "notPorts": [22]}},
            {"action": "Allow", "protocol": "UDP", "source": {"notSelector": "role == 'db'"}}]),
        kind("GlobalNetworkSet", "db", {"nets": ["198.19.1.0/24"]}, role="db")],
    "egress-from-a-host": [
        HEP, kind("FelixConfiguration", "default", {"failsafeOutboundHostPorts": [
            {"protocol": "UDP", "port": 53, "net": "198.19.1.0/24"}]}),
        gnp("out", selector="role == 'worker'", types=["Egress"], egress=[
            {"action": "Allow", "protocol": "TCP", "destination": {"nets": ["198.19.0.0/16"], "ports": [80, 6443]}},
            {"action": "Deny", "protocol": "UDP", "destination": {"selector": "role == 'db'"}},
            {"action": "Allow", "protocol": "UDP"}]),
        kind("GlobalNetworkSet", "db", {"nets": ["198.19.5.0/24"]}, role="db")],
    "star-deny-all": [kind("HostEndpoint", "node1-all", {"node": NODE, "interfaceName": "*"}, role="worker"),
                      gnp("deny-all", selector="all()", ingress=DENY_ALL, egress=DENY_ALL)],
}
HOST_EXAMPLES = {"deny-all-failsafe": ("hosts/deny-all-failsafe.yaml", NODE, "198.18.0.1"),
                 "protect-hosts": ("hosts/protect-hosts.yaml", "my-host", "198.18.0.21")}


def check_host(state, node_name: str, host_ip: str, name: str, plane: dict) -> None:
    with KernelNode(state, node_name, host_ip, **plane) as node:
        dataplane = node.load(state)
        rendered = {c.name: list(c.rules) for (table, _), c in dataplane.chains.items() if table == "filter"}
        assert saved_chains(node) == rendered, f"{name}: iptables-save differs from the render (drift)"
        flows = [Flow(peer, "host", *probe) for peer in HOST_PEERS for probe in HOST_PROBES]
        flows += [Flow("host", peer, *probe) for peer in HOST_PEERS for probe in HOST_PROBES]
        wrong = node.mismatches(flows)
        assert not wrong, f"{name}: {len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])


@pytest.mark.parametrize("name", HOST_CASES)
def test_host_endpoint_case_on_the_kernel(name, plane):
    check_host(cluster(*BASE, *HOST_CASES[name], namespaces=()), NODE, "198.18.0.1", name, plane)


@pytest.mark.parametrize("name", HOST_EXAMPLES)
def test_documented_host_example_on_the_kernel(name, plane):
    path, node_name, host_ip = HOST_EXAMPLES[name]
    check_host(example(path), node_name, host_ip, name, plane)


def test_deny_all_on_every_interface_never_cuts_ssh_bgp_or_the_api_server(plane):
    state = example("hosts/deny-all-failsafe.yaml")
    with KernelNode(state, NODE, "198.18.0.1", **plane) as node:
        node.load(state)
        flows = [Flow("198.19.1.5", "host", "tcp", port) for port in (22, 179, 6443, 80, 8080)]
        assert node.delivered(node.probes(flows)) == [True, True, True, False, False]
        out = [Flow("host", "198.19.1.5", "udp", 53), Flow("host", "198.19.1.5", "tcp", 6443),
               Flow("host", "198.19.1.5", "tcp", 80)]
        assert node.delivered(node.probes(out)) == [True, True, False]


# --- host endpoints: forwarded traffic (applyOnForward) ----------------------------------------------

FWD = {"applyOnForward": True}
FORWARD_CASES = {
    "forward-tiers-and-pod-policies": [
        HEP, tier("t1", 10, "Pass"),
        gnp("t1.fwd", tier="t1", selector="role == 'worker'", types=["Ingress", "Egress"], **FWD, ingress=[
            {"action": "Log", "protocol": "UDP"},
            {"action": "Deny", "protocol": "UDP", "source": {"nets": ["198.19.5.0/24"]}}],
            egress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}}]),
        gnp("fwd", selector="role == 'worker'", types=["Ingress", "Egress"], **FWD, ingress=[
            {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80, 443, 8080]}},
            {"action": "Allow", "protocol": "UDP"}, {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}}],
            egress=[{"action": "Allow", "protocol": "TCP", "destination": {"nets": ["198.19.0.0/16"],
                                                                           "notPorts": [5432]}},
                    {"action": "Deny", "protocol": "UDP", "destination": {"selector": "role == 'db'"}},
                    {"action": "Allow", "protocol": "UDP"}]),
        gnp("host-only", selector="role == 'worker'", types=["Ingress", "Egress"], ingress=DENY_ALL, egress=DENY_ALL),
        np("pod-b", "ns1", selector="app == 'b'", ingress=[{"action": "Allow", "protocol": "TCP"}]),
        kind("GlobalNetworkSet", "db", {"nets": ["198.19.66.0/24"]}, role="db")],
    "star-forward-deny-all": [
        kind("HostEndpoint", "node1-all", {"node": NODE, "interfaceName": "*"}, role="worker"),
        gnp("deny-all", selector="role == 'worker'", types=["Ingress", "Egress"], **FWD, ingress=DENY_ALL,
            egress=DENY_ALL)],
    "named-endpoint-without-forward-policy": [
        HEP, kind("HostEndpoint", "node1-all", {"node": NODE, "interfaceName": "*"}, role="all"),
        gnp("deny-all", selector="role == 'all'", types=["Ingress", "Egress"], **FWD, ingress=DENY_ALL,
            egress=DENY_ALL),
        gnp("egress-only", selector="role == 'worker'", types=["Egress"], **FWD, egress=[
            {"action": "Deny", "protocol": "ICMP"}])],
}


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forwarded_traffic_through_a_host_endpoint_on_the_kernel(name, plane):
    """Pods to and from the outside cross eth0, a host endpoint: its applyOnForward policies
    judge that traffic too (others do not); pod to pod traffic is not a host endpoint's."""
    state = cluster(*BASE, *FORWARD_CASES[name], namespaces=())
    with KernelNode(state, NODE, "198.18.0.1", **plane) as node:
        dataplane = node.load(state)
        rendered = {c.name: list(c.rules) for (table, _), c in dataplane.chains.items() if table == "filter"}
        assert saved_chains(node) == rendered, f"{name}: iptables-save differs from the render (drift)"
        assert any(n.startswith("weft-hf") for n in rendered), f"{name}: no forward chain rendered"
        wrong = node.mismatches(matrix(node))
        assert not wrong, f"{name}: {len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])


# --- host endpoints: preDNAT policies (mangle PREROUTING) ---------------------------------------------

PRE = {"preDNAT": True, "applyOnForward": True}
INTERNAL_PEER = "198.18.7.200"          # in the pods' 198.18.4.0/22: cluster-internal
PREDNAT_CASES = {
    "documented-protect-hosts": (),          # tests/calico/hosts/pre-dnat.yaml alone
    "tiers-log-pass-and-forward-policies": (
        HEP, tier("t1", 10),
        gnp("t1.pre", tier="t1", selector="role == 'worker'", **PRE, ingress=[
            {"action": "Log", "protocol": "UDP"}, {"action": "Pass", "protocol": "TCP", "destination": {"ports": [80]}},
            {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 13}}]),
        gnp("pre-allow", selector="role == 'worker'", **PRE, ingress=[
            {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.19.0.0/16"]},
             "destination": {"ports": [443, 8080]}},
            {"action": "Deny", "protocol": "UDP", "source": {"nets": ["198.19.5.0/24"]}}]),
        gnp("fwd", selector="role == 'worker'", **FWD, ingress=[
            {"action": "Deny", "protocol": "TCP", "destination": {"ports": [443, 8080]}}, {"action": "Allow"}]),
        gnp("host", selector="role == 'worker'", ingress=[{"action": "Allow", "protocol": "TCP",
                                                          "destination": {"ports": [80]}}]),
        np("pod-b", "ns1", selector="app == 'b'", ingress=[{"action": "Allow", "protocol": "TCP"}])),
}


@pytest.mark.parametrize("name", PREDNAT_CASES)
def test_pre_dnat_policies_on_the_kernel(name, plane):
    """New connections into eth0 (a host endpoint), to the host or forwarded to pods, from the
    outside and from a peer node: preDNAT policies decide first (in mangle), the host's and the
    forwarded traffic's normal policies after them; the kernel's verdicts equal desired.verdict's."""
    state = example("hosts/pre-dnat.yaml") if not PREDNAT_CASES[name] else \
        cluster(*BASE, *PREDNAT_CASES[name], namespaces=())
    with KernelNode(state, NODE, "198.18.0.1", **plane) as node:
        dataplane = node.load(state)
        for table in ("filter", "mangle"):
            rendered = {c.name: list(c.rules) for (t, _), c in dataplane.chains.items() if t == table}
            assert saved_chains(node, table) == rendered, f"{name}: iptables-save differs from the render (drift)"
        assert any(t == "mangle" for t, _ in dataplane.chains), f"{name}: no mangle chain rendered"
        peers = (*HOST_PEERS, INTERNAL_PEER)
        probes = (*HOST_PROBES, ("tcp", 31852, None, None, None), ("tcp", 443, None, None, None),
                  ("icmp", None, None, 13, 0))
        flows = matrix(node, outside=(*OUTSIDE, INTERNAL_PEER))
        flows += [Flow(peer, "host", *probe) for peer in peers for probe in probes]
        flows += [Flow("host", peer, *probe) for peer in peers for probe in probes]
        wrong = node.mismatches(flows)
        assert not wrong, f"{name}: {len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])


# --- host endpoints: doNotTrack policies (raw PREROUTING and OUTPUT) ------------------------------------

RAW = {"doNotTrack": True, "applyOnForward": True}
UNTRACKED_CASES = {
    "untracked-before-pre-dnat-and-normal": (
        HEP, tier("t1", 10),
        gnp("t1.raw", tier="t1", selector="role == 'worker'", types=["Ingress", "Egress"], **RAW, ingress=[
            {"action": "Log", "protocol": "TCP"},
            {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.19.0.0/16"]},
             "destination": {"ports": [8080, 9090]}},
            {"action": "Deny", "protocol": "UDP", "source": {"nets": ["198.19.5.0/24"]}},
            {"action": "Pass", "protocol": "ICMP"}],
            egress=[{"action": "Allow", "protocol": "TCP", "destination": {"nets": ["198.19.1.0/24"], "ports": [443]}},
                    {"action": "Deny", "protocol": "UDP", "destination": {"ports": [5000, 68]}}]),
        gnp("pre", selector="role == 'worker'", **PRE, ingress=[
            {"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080, 443]}}]),
        gnp("fwd", selector="role == 'worker'", **FWD, ingress=[
            {"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}}, {"action": "Allow"}]),
        gnp("host", selector="role == 'worker'", types=["Ingress", "Egress"],
            ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80, 9090]}}],
            egress=[{"action": "Allow", "protocol": "ICMP"}]),
        np("pod-b", "ns1", selector="app == 'b'", ingress=[{"action": "Allow", "protocol": "TCP"}])),
    "star-endpoint-has-no-untracked-policy": (
        kind("HostEndpoint", "node1-all", {"node": NODE, "interfaceName": "*"}, role="worker"),
        gnp("raw", selector="role == 'worker'", types=["Ingress", "Egress"], **RAW, ingress=DENY_ALL, egress=DENY_ALL),
        gnp("host", selector="role == 'worker'", types=["Ingress", "Egress"], ingress=ALLOW_ALL, egress=ALLOW_ALL)),
}


@pytest.mark.parametrize("name", UNTRACKED_CASES)
def test_do_not_track_policies_on_the_kernel(name, plane):
    """doNotTrack policies judge eth0's traffic first (in raw, before conntrack: an allowed
    packet is not tracked and accepted), then preDNAT, applyOnForward and normal policies; a "*"
    host endpoint gets none; the kernel's verdicts equal desired.verdict's."""
    state = cluster(*BASE, *UNTRACKED_CASES[name], namespaces=())
    with KernelNode(state, NODE, "198.18.0.1", **plane) as node:
        dataplane = node.load(state)
        for table in ("filter", "mangle", "raw"):
            rendered = {c.name: list(c.rules) for (t, _), c in dataplane.chains.items() if t == table}
            assert saved_chains(node, table) == rendered, f"{name}: iptables-save differs from the render (drift)"
        assert any(t == "raw" for t, _ in dataplane.chains) == (name != "star-endpoint-has-no-untracked-policy")
        peers = (*HOST_PEERS, INTERNAL_PEER)
        probes = (*HOST_PROBES, ("tcp", 8080, None, None, None), ("tcp", 9090, None, None, None),
                  ("tcp", 443, None, None, None), ("udp", 5000, None, None, None))
        flows = matrix(node, outside=(*OUTSIDE, INTERNAL_PEER))
        flows += [Flow(peer, "host", *probe) for peer in peers for probe in probes]
        flows += [Flow("host", peer, *probe) for peer in peers for probe in probes]
        wrong = node.mismatches(flows)
        assert not wrong, f"{name}: {len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])
        if name != "star-endpoint-has-no-untracked-policy":      # allowed untracked: not in conntrack
            in_ns(node.node_ns, "conntrack", "-F", check=False)
            assert node.delivered(node.probes([Flow("198.19.1.5", "host", "tcp", 8080)])) == [True]
            tracked = in_ns(node.node_ns, "conntrack", "-L", check=False)
            assert "dport=8080" not in tracked, tracked


# --- FelixConfiguration defaultEndpointToHostAction: pods to their own host ------------------------------

TO_HOST_CASES = {
    "felix-default-drop": (),
    "drop": (kind("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Drop"}),),
    "accept-with-star-endpoint": (
        kind("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Accept"}),
        kind("HostEndpoint", "node1-all", {"node": NODE, "interfaceName": "*"}, role="worker"),
        gnp("deny-all", selector="role == 'worker'", types=["Ingress", "Egress"], ingress=DENY_ALL, egress=DENY_ALL)),
    "return-per-node": (kind("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Drop"}),
                        kind("FelixConfiguration", f"node.{NODE}", {"defaultEndpointToHostAction": "Return"})),
}
NO_KUBELET = gnp("no-kubelet", selector="app == 'a'", types=["Egress"], egress=[
    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [10250]}}, {"action": "Allow"}])


@pytest.mark.parametrize("name", TO_HOST_CASES)
def test_pods_to_their_host_on_the_kernel(name, plane):
    """A pod's packets to its own host pass the pod's egress policy, then the configured
    defaultEndpointToHostAction (Felix's default: Drop); host endpoints do not apply to them and
    the host reaches its pods whatever the policy; the kernel's verdicts equal desired.verdict's."""
    state = cluster(*BASE, NO_KUBELET, *TO_HOST_CASES[name], namespaces=())
    with KernelNode(state, NODE, "198.18.0.1", **plane) as node:
        node.load(state)
        flows = [Flow(pod, "host", *probe) for pod in sorted(node.pods) for probe in HOST_PROBES]
        flows += [Flow("host", pod, *probe) for pod in sorted(node.pods) for probe in HOST_PROBES[:4]]
        wrong = node.mismatches(flows)
        assert not wrong, f"{name}: {len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])
        delivered = node.delivered(node.probes([Flow("ns2/c", "host", "tcp", 22), Flow("ns1/a", "host", "tcp", 10250)]))
        assert delivered == {"felix-default-drop": [False, False], "drop": [False, False],
                             "accept-with-star-endpoint": [True, False], "return-per-node": [True, False]}[name]
