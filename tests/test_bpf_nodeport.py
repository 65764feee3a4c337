"""Node ports on the eBPF plane, with real packets from outside the node: a client namespace
connected to the node namespace's uplink (198.19.200.0/24) opens TCP and UDP connections to the
node's address at a Service's node port; weft's programs on the uplink send each to a ready
backend and put the node's address back on the replies. externalTrafficPolicy Local serves
only this node's backends (and drops when it has none); Cluster also serves a backend on another
node (here an address of the client's namespace, routed there), reached from the node's address
(SNAT). The uplink's programs are reconciled like the rest (plan/apply/drift), and go when no
node port needs them.

weft runs in the lab's node namespace through `nsenter --net`, with a state (and pin) directory
of the test's own; the client namespace and the uplink are the test's, removed after.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from tests.matrices import BASE_CLUSTER, NODE, POD_IPS, write_source
from tests.test_bpf_engine import EbpfNode, lab  # noqa: F401  (the lab fixture)
from tests.test_bpf_services import CLIENT, SERVER, start_server

NODE_IP, CLIENT_IP = "198.19.200.1", "198.19.200.2"
VIP = "198.19.0.10"
UPLINK = "up0"
BACKENDS = ("y/a", "y/b", "y/c")
REMOTE = "198.18.9.50"                  # a backend on another node: an address of the client's namespace



def sources(directory, service_type: str = "NodePort", local: bool = False, backends=BACKENDS,
            remote: bool = False, policy: str = ""):
    """The lab's cluster with the node's InternalIP, a Service `y/web` (TCP 80 -> 9090 on node
    port 30080, UDP 53 -> 9090 on node port 30053) and its slice."""
    source = write_source(directory)
    docs = [d for d in yaml.safe_load_all(BASE_CLUSTER.read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Node" and doc["metadata"]["name"] == NODE:
            doc["status"] = {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}
    (source / "cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    ports = [{"name": "http", "port": 80, "targetPort": 9090}, {"name": "dns", "port": 53, "protocol": "UDP",
                                                                   "targetPort": 9090}]
    if service_type != "ClusterIP":
        ports[0]["nodePort"], ports[1]["nodePort"] = 30080, 30053
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "y"},
           "spec": {"type": service_type, "clusterIP": VIP, "ports": ports}}
    if local:
        svc["spec"]["externalTrafficPolicy"] = "Local"
    addresses = [POD_IPS[key] for key in backends] + ([REMOTE] if remote else [])
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "web-1", "namespace": "y", "labels": {"kubernetes.io/service-name": "web"}},
           "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in addresses],
           "ports": [{"name": "http", "port": 9090, "protocol": "TCP"},
                     {"name": "dns", "port": 9090, "protocol": "UDP"}]}
    (source / "svc.yaml").write_text(json.dumps(svc))
    (source / "slice.yaml").write_text(json.dumps(eps))
    if policy:
        (source / "policy.yaml").write_text(policy)
    return source


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def outside(lab, tmp_path):  # noqa: F811
    """(node, connect): the lab's node with an uplink to a client namespace, backends serving."""
    client_ns = f"weft-np-{secrets.token_hex(3)}"
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    servers = []
    node = EbpfNode(lab, tmp_path / "state")
    sh("ip", "netns", "add", client_ns)
    try:
        sh("ip", "-n", lab.node_netns, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns",
           client_ns)
        sh("ip", "-n", lab.node_netns, "addr", "add", f"{NODE_IP}/24", "dev", UPLINK)
        sh("ip", "-n", lab.node_netns, "link", "set", UPLINK, "up")
        sh("ip", "-n", client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        sh("ip", "-n", client_ns, "link", "set", "eth0", "up")
        sh("ip", "-n", client_ns, "link", "set", "lo", "up")
        sh("ip", "-n", client_ns, "addr", "add", f"{REMOTE}/32", "dev", "lo")
        sh("ip", "-n", lab.node_netns, "route", "add", f"{REMOTE}/32", "via", CLIENT_IP, "dev", UPLINK)
        servers.append(start_server(client_ns, SERVER.replace('"0.0.0.0"', f'"{REMOTE}"'), "remote"))
        for key in BACKENDS:
            servers.append(start_server(pod_ns[key], SERVER, key))

        def connect(count: int = 30) -> dict[str, list[str]]:
            done = subprocess.run(["nsenter", f"--net=/run/netns/{client_ns}", sys.executable, "-c", CLIENT,
                                   NODE_IP, "30080", "30053", str(count)], capture_output=True, text=True, timeout=120,
                                  check=True)
            return json.loads(done.stdout)
        yield node, connect
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        try:
            node.cleanup()
        finally:
            subprocess.run(["ip", "netns", "del", client_ns], check=False)
            subprocess.run(["ip", "-n", lab.node_netns, "link", "del", UPLINK], capture_output=True, check=False)
        assert UPLINK not in sh("ip", "-n", lab.node_netns, "-o", "link", "show")


def uplink_filters(lab) -> str:  # noqa: F811
    return "".join(lab.node_run(["tc", "filter", "show", "dev", UPLINK, hook], check=True).stdout
                   for hook in ("ingress", "egress"))


def test_node_port_balances_outside_connections_with_reverse_nat(lab, outside, tmp_path):  # noqa: F811
    node, connect = outside
    first = node.json("apply", "--dataplane", "ebpf", source=sources(tmp_path / "np"))
    attached = {c["target"] for c in first["changes"]["bpf"] if c["kind"] == "attach"}
    assert {f"{UPLINK}/ingress", f"{UPLINK}/egress"} <= attached, attached
    seen = connect()
    for proto in ("tcp", "udp"):
        assert set(Counter(seen[proto])) == set(BACKENDS), (proto, Counter(seen[proto]))
    nat = node.json("bpf", "nat")
    assert any(s["address"] == f"{NODE_IP}:30080" and s["protocol"] == "tcp" for s in nat["services"]), nat
    again = node.json("apply", "--dataplane", "ebpf", source=sources(tmp_path / "np-again"))
    assert not again["commands"], f"the second run was not a no-op: {again['commands']}"

    # Drift: the uplink's program detached by hand is named, and put back.
    lab.node_run(["tc", "filter", "del", "dev", UPLINK, "ingress", "pref", "49152"], check=True)
    drift = node.weft("drift", "--dataplane", "ebpf", source=sources(tmp_path / "np-drift"), expect=None)
    assert drift.returncode != 0 and f"{UPLINK}/ingress" in drift.stdout, drift.stdout + drift.stderr
    node.json("apply", "--dataplane", "ebpf", source=sources(tmp_path / "np-fix"))
    assert set(Counter(connect()["tcp"])) == set(BACKENDS)

    # No node port any more: the uplink's programs go, the node address refuses.
    gone = node.json("apply", "--dataplane", "ebpf", source=sources(tmp_path / "cip", service_type="ClusterIP"))
    assert {c["target"] for c in gone["changes"]["bpf"] if c["kind"] == "detach"} == \
        {f"{UPLINK}/ingress", f"{UPLINK}/egress"}, gone["changes"]["bpf"]
    assert "bpf" not in uplink_filters(lab)
    assert set(connect(3)["tcp"]) <= {"ConnectionRefusedError", "TimeoutError"}


def test_external_traffic_policy_local_and_cluster_with_remote_backends(lab, outside, tmp_path):  # noqa: F811
    node, connect = outside
    node.weft("apply", "--dataplane", "ebpf", source=sources(tmp_path / "local", local=True, remote=True))
    for proto, answers in connect(24).items():
        assert set(answers) == set(BACKENDS), (proto, Counter(answers))     # never the remote backend

    node.weft("apply", "--dataplane", "ebpf", source=sources(tmp_path / "cluster", remote=True))
    for proto, answers in connect(40).items():
        assert set(answers) == {*BACKENDS, "remote"}, (proto, Counter(answers))
    nat = node.json("bpf", "nat")
    snat = [t for t in nat["translations"] if t["destination"].startswith(f"{REMOTE}:")]
    assert snat, f"no translation towards the remote backend: {nat['translations']}"

    # Local with no backend on this node: nothing answers (dropped), though the service has one.
    node.weft("apply", "--dataplane", "ebpf", source=sources(tmp_path / "none", local=True, backends=(), remote=True))
    seen = connect(3)
    assert set(seen["tcp"]) == {"TimeoutError"} and set(seen["udp"]) == {"TimeoutError"}, seen


def test_remote_backends_through_a_node_whose_forward_policy_is_drop(lab, outside, tmp_path):  # noqa: F811
    """externalTrafficPolicy Cluster on a node whose FORWARD policy is DROP: a connection sent to
    the backend on another node crosses the node uplink to uplink, and its replies come back the
    same way; weft-FORWARD accepts what the uplink's program translated (its mark). Then the
    test fallback (bpf_apply.destroy_bpf) takes the uplink's programs away too, not only the
    pods'."""
    from weft.playbooks.bpflab import in_netns
    from weft.reconciler.bpf_apply import destroy_bpf
    node, connect = outside
    lab.node_run(["iptables", "-P", "FORWARD", "DROP"], check=True)
    try:
        node.weft("apply", "--dataplane", "ebpf", source=sources(tmp_path / "cluster", remote=True))
        for proto, answers in connect(40).items():
            assert set(answers) == {*BACKENDS, "remote"}, (proto, Counter(answers))
    finally:
        lab.node_run(["iptables", "-P", "FORWARD", "ACCEPT"], check=True)
    assert "bpf" in uplink_filters(lab)
    removed = in_netns(lab.node_netns, destroy_bpf, node.root)
    assert {f"{UPLINK}/ingress", f"{UPLINK}/egress"} <= set(removed), removed
    assert "bpf" not in uplink_filters(lab) and not node.root.exists()


def test_policy_judges_the_backend_with_the_clients_address(lab, outside, tmp_path):  # noqa: F811
    """A policy on y/c admitting only pods: the outside client never reaches it through the node
    port, while y/a and y/b (no policy) answer."""
    node, connect = outside
    policy = json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"name": "c-from-pods", "namespace": "y"},
                         "spec": {"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"],
                                  "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/16"}}]}]}})
    node.weft("apply", "--dataplane", "ebpf", source=sources(tmp_path / "pol", policy=policy))
    seen = connect(30)
    assert "y/c" not in seen["tcp"] and {"y/a", "y/b"} <= set(seen["tcp"]), Counter(seen["tcp"])
    assert "TimeoutError" in seen["tcp"], "the connections sent to y/c were not dropped"
