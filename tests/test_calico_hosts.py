"""Calico host endpoints named by their addresses only (no interfaceName, expectedIPs) and host
endpoints' named ports (spec.ports), on a real kernel.

Calico applies a host endpoint without interfaceName to the interface holding one of its
expectedIPs: weft reads the node's interfaces (probes.hostaddrs, netlink) and resolves the
endpoints before the pure render (model.cluster.ClusterState.with_host_interfaces). A host
endpoint's named ports are, at its expectedIPs, members of rules' named-port sets, as in Felix's
named-port index. Traffic: tests/calico_kernel.KernelNode (real packets, the kernel's verdict
against desired.verdict's); the `weft` command itself: a node namespace whose address moves from
one interface to another.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests import nodens
from tests.calico_cluster import NODE, cluster, gnp, kind, namespace, pod
from tests.calico_kernel import Flow, KernelNode, in_ns
from weft.model.cluster import HostEndpoint
from weft.renderers.iptables import render_node

HOST_IP = "198.18.0.1"


def hep(name: str, node: str = NODE, interface: str | None = None, ips: tuple[str, ...] = ()) -> HostEndpoint:
    return HostEndpoint(name, node, interface, ips)


# --- resolution (pure) ----------------------------------------------------------------------------

def test_host_endpoints_by_address_take_the_interface_holding_one_of_them():
    state = cluster()
    heps = (hep("a-named", interface="eth1"), hep("b-by-ip", ips=("198.18.0.9", HOST_IP)),
            hep("c-also-eth0", ips=(HOST_IP,)), hep("d-on-named", ips=("198.18.1.1",)),
            hep("e-nowhere", ips=("198.18.3.3",)), hep("f-other-node", node="n2", ips=(HOST_IP,)),
            hep("g-star", interface="*"))
    interfaces = {"eth0": ("198.18.0.1", "fe80::1"), "eth1": ("198.18.1.1",), "eth2": ("198.18.0.9",)}
    resolved = replace(state, host_endpoints=heps).with_host_interfaces(NODE, interfaces)
    got = {h.name: h.interface for h in resolved.host_endpoints}
    # eth0 is the first interface (by name) holding one of b's addresses; c finds none left
    # (one host endpoint per interface, the first by name: desired.verdict's host_endpoint_for);
    # eth1 is a's by name; another node's endpoints are that node's to resolve.
    assert got == {"a-named": "eth1", "b-by-ip": "eth0", "c-also-eth0": None, "d-on-named": None,
                   "e-nowhere": None, "f-other-node": None, "g-star": "*"}
    assert resolved.unresolved_host_endpoints(NODE) == ("c-also-eth0", "d-on-named", "e-nowhere")
    assert replace(state, host_endpoints=heps[:1]).with_host_interfaces(NODE, interfaces).host_endpoints == heps[:1]


def test_a_host_endpoint_by_address_renders_on_its_interface_and_its_named_ports():
    by_ip = kind("HostEndpoint", "by-ip", {"node": NODE, "expectedIPs": [HOST_IP],
                                           "ports": [{"name": "admin", "port": 2222, "protocol": "TCP"}]}, role="w")
    allow = gnp("admin", selector="role == 'w'", ingress=[{"action": "Allow", "protocol": "TCP",
                                                           "destination": {"ports": ["admin"]}}])
    state = cluster(by_ip, allow)
    unresolved = render_node(state, NODE)
    assert not [c for (t, n), c in unresolved.chains.items() if n.startswith("weft-hi-")], "no interface: not policed"
    dataplane = render_node(state.with_host_interfaces(NODE, {"eth0": (HOST_IP,)}), NODE)
    entry = dataplane.chains[("filter", "weft-INPUT")].rules
    assert [r for r in entry if " -i eth0 " in r and "-g weft-hi-" in r], entry
    named = [s for s in dataplane.ipsets.values() if s.type == "hash:ip,port" and s.family == "inet"]
    assert [s.members for s in named] == [frozenset({f"{HOST_IP},tcp:2222"})]


# --- on a real kernel, with traffic -----------------------------------------------------------------

BY_IP = kind("HostEndpoint", "node1-by-ip", {"node": NODE, "expectedIPs": [HOST_IP], "ports": [
    {"name": "admin", "port": 2222, "protocol": "TCP"}, {"name": "metrics", "port": 10250, "protocol": "TCP"}]},
    role="worker")
STATE = cluster(
    namespace("ns1"),
    pod("a", "ns1", "198.18.4.1", {"app": "a"}), pod("b", "ns1", "198.18.4.2", {"app": "b"}),
    BY_IP,
    kind("FelixConfiguration", "default", {"failsafeInboundHostPorts": [{"protocol": "TCP", "port": 22}],
                                           "failsafeOutboundHostPorts": [],
                                           "defaultEndpointToHostAction": "Return"}),
    # The host endpoint's named ports in its own policy (destination) ...
    gnp("host-admin", selector="role == 'worker'", types=["Ingress", "Egress"], ingress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["admin"]}},
        {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.19.5.0/24"]},
         "destination": {"ports": ["metrics"]}}],
        egress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]),
    # ... and in a pod's policy, selecting the host endpoint.
    gnp("a-to-admin", selector="app == 'a'", types=["Egress"], egress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"selector": "role == 'worker'", "ports": ["admin"]}}]),
    namespaces=())
PEERS = ("198.19.1.5", "198.19.5.1")
PORTS = (22, 80, 2222, 2223, 10250)


def probed_interfaces(node: KernelNode) -> dict[str, tuple[str, ...]]:
    """probes.hostaddrs run in the node namespace, as `weft` runs there."""
    out = in_ns(node.node_ns, sys.executable, "-c", "import json; from weft.probes.hostaddrs import "
                "host_interface_addresses as read; print(json.dumps(read()))")
    return {name: tuple(ips) for name, ips in json.loads(out).items()}


@pytest.mark.skipif(nodens.usable() is not None, reason=str(nodens.usable()))
def test_host_endpoint_by_address_and_its_named_ports_with_traffic():
    with KernelNode(STATE, NODE, HOST_IP) as node:
        interfaces = probed_interfaces(node)
        assert HOST_IP in interfaces.get("eth0", ()), interfaces
        assert not [n for n in interfaces if n == "lo" or n.startswith("weft")], interfaces
        flows = [Flow(peer, "host", "tcp", port) for peer in PEERS for port in PORTS]
        flows += [Flow(p, "host", "tcp", port) for p in ("ns1/a", "ns1/b") for port in PORTS]
        flows += [Flow("host", peer, "tcp", port) for peer in PEERS for port in (80, 2222)]

        # Unresolved (as weft rendered it before): eth0 is not policed at all.
        node.load(STATE)
        assert all(node.delivered(node.probes([Flow("198.19.1.5", "host", "tcp", 2223)])))

        resolved = STATE.with_host_interfaces(NODE, interfaces)
        assert [h.interface for h in resolved.host_endpoints] == ["eth0"]
        node.load(resolved)
        wrong = node.mismatches(flows)
        assert not wrong, f"{len(wrong)} flows differ, e.g.\n" + "\n".join(wrong[:15])
        # What the evaluator and the kernel agree on, spelled out.
        spelled = {("198.19.1.5", 2222): True, ("198.19.1.5", 2223): False, ("198.19.1.5", 22): True,
                   ("198.19.1.5", 10250): False, ("198.19.5.1", 10250): True, ("ns1/a", 2222): True,
                   ("ns1/a", 10250): False, ("ns1/b", 10250): True}
        got = node.delivered(node.probes([Flow(src, "host", "tcp", port) for src, port in spelled]))
        assert dict(zip(spelled, got, strict=True)) == spelled


# --- the `weft` command: the address moves, the host endpoint follows --------------------------------

MANIFESTS = [
    {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint", "metadata": {"name": "by-ip", "labels": {"r": "w"}},
     "spec": {"node": nodens.NODE, "expectedIPs": [HOST_IP]}},
    {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": "web"},
     "spec": {"selector": "r == 'w'",
              "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]}},
]


def input_interfaces(node: nodens.WeftNode) -> list[str]:
    """The interfaces weft-INPUT sends to a host endpoint's chain."""
    return [r.split(" -i ")[1].split()[0] for r in nodens.chain_rules(node.ns, "weft-INPUT") if "-g weft-hi-" in r]


@pytest.mark.skipif(nodens.usable() is not None, reason=str(nodens.usable()))
def test_weft_follows_the_expected_address_from_interface_to_interface(node_ns, tmp_path: Path):
    for name in ("up0", "up1"):
        nodens.in_ns(node_ns, "ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}-peer")
        nodens.in_ns(node_ns, "ip", "link", "set", name, "up")
    nodens.in_ns(node_ns, "ip", "addr", "add", f"{HOST_IP}/32", "dev", "up0")
    node = nodens.WeftNode(node_ns, tmp_path / "state", "nft")
    src = nodens.write_manifests(tmp_path / "src", MANIFESTS)
    done = node.weft("apply", from_dir=src)
    assert "not policed" not in done.stderr, done.stderr
    assert input_interfaces(node) == ["up0"]
    node.weft("drift", from_dir=src, expect=0)

    nodens.in_ns(node_ns, "ip", "addr", "del", f"{HOST_IP}/32", "dev", "up0")
    nodens.in_ns(node_ns, "ip", "addr", "add", f"{HOST_IP}/32", "dev", "up1")
    drift = node.weft("drift", from_dir=src, expect=2).stdout
    assert "filter/weft-INPUT" in drift and "-i up1" in drift, drift
    node.weft("apply", from_dir=src)
    assert input_interfaces(node) == ["up1"]

    nodens.in_ns(node_ns, "ip", "addr", "del", f"{HOST_IP}/32", "dev", "up1")
    done = node.weft("apply", from_dir=src)
    assert "host endpoint by-ip: no interface of this node holds one of its expectedIPs: not policed" in done.stderr
    assert input_interfaces(node) == []
    node.weft("apply", "--destroy")
    assert nodens.weft_names(node_ns) == []


node_ns = nodens.node_ns


# --- weft's mark bits never outlive the packet's pass through weft's tables ------------------------

UNDERLAY = "198.19.1.5"                       # the outside's address: the far end of a VXLAN tunnel
MARKS = cluster(
    kind("HostEndpoint", "node1-eth0", {"node": NODE, "interfaceName": "eth0"}, role="worker"),
    kind("HostEndpoint", "node1-all", {"node": NODE, "interfaceName": "*"}, role="star"),
    # The tunnel's own packets (UDP 4789) are allowed on eth0: a policy's Allow, the accept mark.
    gnp("underlay", selector="role == 'worker'", types=["Ingress", "Egress"],
        ingress=[{"action": "Allow", "protocol": "UDP", "destination": {"ports": [4789]}}],
        egress=[{"action": "Allow", "protocol": "UDP"}]),
    # A preDNAT policy: the mangle table reads the accept mark (doNotTrack allowed it), and the
    # filter table accepts what preDNAT allowed; no doNotTrack policy, so no raw chain of its own.
    gnp("pre", selector="role == 'worker'", preDNAT=True, applyOnForward=True,
        ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [9999]}}]),
    # What comes out of the tunnel (any other interface: the "*" endpoint) may reach port 80 only.
    gnp("inner", selector="role == 'star'", ingress=[{"action": "Allow", "protocol": "TCP",
                                                      "destination": {"ports": [80]}}]),
    namespaces=())


def tunnel(node: KernelNode) -> None:
    """A VXLAN tunnel between the node (198.18.60.1 on vx0, over eth0's 198.18.0.1) and the
    outside (198.18.60.2, over 198.19.1.5): both ends in the test's namespaces, static neighbours."""
    node_mac, outside_mac = "02:00:00:00:60:01", "02:00:00:00:60:02"
    ends = ((node.node_ns, HOST_IP, UNDERLAY, "198.18.60.1", node_mac, "198.18.60.2", outside_mac),
            (node.outside_ns, UNDERLAY, HOST_IP, "198.18.60.2", outside_mac, "198.18.60.1", node_mac))
    for netns, local, remote, inner, mac, peer, peer_mac in ends:
        in_ns(netns, "ip", "-batch", "-", stdin="\n".join([
            *([f"addr add {UNDERLAY}/32 dev eth0"] if netns == node.outside_ns else []),
            f"link add vx0 address {mac} type vxlan id 42 local {local} remote {remote} dstport 4789 dev eth0",
            f"addr add {inner}/24 dev vx0", "link set vx0 up",
            f"neigh add {peer} lladdr {peer_mac} dev vx0 nud permanent"]) + "\n")


@pytest.mark.skipif(nodens.usable() is not None, reason=str(nodens.usable()))
def test_no_weft_mark_survives_into_a_decapsulated_packet():
    """A VXLAN packet eth0's policy allowed carries weft's accept mark; the kernel decapsulates it
    in the node's namespace with that mark. Its inner packet must still be judged by the "*"
    endpoint's policy: raw PREROUTING clears weft's mark bits whenever a later table reads the
    accept mark (here the preDNAT chains in mangle; before, only while doNotTrack chains existed)."""
    with KernelNode(MARKS, NODE, HOST_IP) as node:
        dataplane = node.load(MARKS)
        assert ("mangle", "weft-PREROUTING") in dataplane.chains
        tunnel(node)

        def arrives(port: int) -> bool:
            probe = {"id": 40000 + port, "from": node.outside_ns, "to": node.node_ns, "src": "198.18.60.2",
                     "dst": "198.18.60.1", "proto": 6, "sport": 31000 + port % 1000, "dport": port,
                     "icmp_type": 0, "icmp_code": 0}
            return node.delivered([probe]) == [True]

        assert arrives(80), "the tunnel carries what the inner policy allows"
        assert not arrives(8080), "a decapsulated packet was accepted on its outer packet's mark"
        assert dataplane.chains[("raw", "weft-PREROUTING")].rules == (
            dataplane.chains[("raw", "weft-PREROUTING")].rules[0],) and \
            dataplane.chains[("raw", "weft-PREROUTING")].rules[0].endswith("-j MARK --set-xmark 0x0/0x30000")
