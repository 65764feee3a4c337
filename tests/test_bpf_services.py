"""Services on the eBPF plane, with real packets: a pod's connections to a ClusterIP service are
load-balanced over the service's ready backends (TCP and UDP), replies come back from the
service address, a backend removed from the slice gets no new connections, ClientIP affinity
keeps a client on one backend, and policy judges the backend pod after the translation.

Each backend pod (y/a, y/b, y/c) runs a small server on port 9090 that answers with its own
name; the client is x/a. weft runs in the node namespace through `nsenter --net`, with a state
(and pin) directory of the test's own, removed after.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from tests.matrices import write_source
from tests.test_bpf_engine import EbpfNode, lab  # noqa: F401  (the lab fixture)

VIP = "198.19.0.10"
BACKENDS = ("y/a", "y/b", "y/c")

SERVER = textwrap.dedent("""
    import selectors, socket, sys
    name = sys.argv[1].encode()
    tcp = socket.create_server(("0.0.0.0", 9090), backlog=256)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 9090))
    sel = selectors.DefaultSelector()
    sel.register(tcp, selectors.EVENT_READ, "tcp")
    sel.register(udp, selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            try:
                if key.data == "tcp":
                    conn, _ = tcp.accept()
                    with conn:
                        conn.sendall(name)
                else:
                    _, peer = udp.recvfrom(100)
                    udp.sendto(name, peer)
            except OSError:
                pass
""")

CLIENT = textwrap.dedent("""
    import json, socket, sys
    addr, tcp_port, udp_port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    out = {"tcp": [], "udp": []}
    for _ in range(count):
        try:
            with socket.create_connection((addr, tcp_port), timeout=1) as s:
                out["tcp"].append(s.recv(100).decode())
        except OSError as exc:
            out["tcp"].append(type(exc).__name__)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((addr, udp_port))          # a reply from any other address is not received
            s.send(b"?")
            try:
                out["udp"].append(s.recv(100).decode())
            except OSError as exc:
                out["udp"].append(type(exc).__name__)
    print(json.dumps(out))
""")


def manifests(backends=BACKENDS, affinity=False, policy: str = "") -> dict[str, str]:
    ips = {}
    from tests.matrices import POD_IPS
    ips = {key: POD_IPS[key] for key in backends}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "y"},
           "spec": {"clusterIP": VIP, "ports": [{"name": "http", "port": 80, "targetPort": "ident"},
                                                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 9090}]}}
    if affinity:
        svc["spec"]["sessionAffinity"] = "ClientIP"
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "web-1", "namespace": "y", "labels": {"kubernetes.io/service-name": "web"}},
           "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                          "targetRef": {"kind": "Pod", "namespace": "y", "name": key.split("/")[1]}}
                         for key, ip in ips.items()]
           + [{"addresses": ["198.18.1.99"], "conditions": {"ready": False}}],     # never chosen
           "ports": [{"name": "http", "port": 9090, "protocol": "TCP"},
                     {"name": "dns", "port": 9090, "protocol": "UDP"}]}
    texts = {"svc.yaml": json.dumps(svc), "slice.yaml": json.dumps(eps)}
    if policy:
        texts["policy.yaml"] = policy
    return texts


def start_server(netns: str, script: str, *args: str) -> subprocess.Popen:
    """`script` started in network namespace `netns` (its own session), once it says "ready"."""
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        proc.kill()
        pytest.fail(f"the server in {netns} did not start")
    return proc


@pytest.fixture
def services(lab, tmp_path):  # noqa: F811
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    servers = []
    node = EbpfNode(lab, tmp_path / "state")
    try:
        for key in BACKENDS:
            servers.append(start_server(pod_ns[key], SERVER, key))

        def connect(count: int = 30) -> dict[str, list[str]]:
            done = subprocess.run(["nsenter", f"--net=/run/netns/{pod_ns['x/a']}", sys.executable, "-c", CLIENT,
                                   VIP, "80", "53", str(count)],
                                  capture_output=True, text=True, timeout=120, check=True)
            return json.loads(done.stdout)
        yield node, connect
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        node.cleanup()


def apply(node: EbpfNode, tmp_path, name: str, **kwargs) -> dict:
    source = write_source(tmp_path / name, texts=manifests(**kwargs))
    return node.json("apply", "--dataplane", "ebpf", source=source)


def test_cluster_ip_balances_tcp_and_udp_over_ready_backends(services, tmp_path):
    node, connect = services
    first = apply(node, tmp_path, "three")
    assert [c for c in first["changes"]["bpf"] if c["kind"] == "map" and c["target"] == "services"]
    seen = connect()
    for proto in ("tcp", "udp"):
        counts = Counter(seen[proto])
        assert set(counts) == set(BACKENDS), (proto, counts)       # all answered, from the service address
    from tests.matrices import POD_IPS
    shown = node.json("bpf", "nat")
    web = next(x for x in shown["services"] if x["address"] == f"{VIP}:80")
    assert web["protocol"] == "tcp" and web["backends"] == sorted(f"{POD_IPS[k]}:9090" for k in BACKENDS), web
    forward = [t for t in shown["translations"] if t["destination"] == f"{VIP}:80"]
    assert forward and all(t["source"].startswith(POD_IPS["x/a"] + ":") for t in forward), shown["translations"]
    assert {t["translated_to"] for t in forward} <= set(web["backends"])
    assert "service addresses" in node.weft("bpf", "nat").stdout
    again = node.json("apply", "--dataplane", "ebpf", source=write_source(tmp_path / "three-again",
                                                                           texts=manifests()))
    assert again["commands"] == [], again["commands"]

    # y/c leaves the slice: no new connection goes to it; the others keep answering.
    apply(node, tmp_path, "two", backends=BACKENDS[:2])
    seen = connect()
    for proto in ("tcp", "udp"):
        assert set(Counter(seen[proto])) == set(BACKENDS[:2]), (proto, seen[proto])


UDP_FROM_PORT = textwrap.dedent("""
    import socket, sys
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 40053))
        s.settimeout(1)
        s.connect((sys.argv[1], 53))
        s.send(b"?")
        print(s.recv(100).decode())
""")


def test_udp_client_port_leaves_a_removed_backend(services, tmp_path):
    """UDP has no opening packet: a client port keeps its backend while it is one, and is sent
    to another once the backend leaves the slice (its translation is forgotten, as kube-proxy
    clears UDP conntrack of removed endpoints)."""
    node, _ = services
    from tests.matrices import POD_IPS
    pod_ns = {p.key: node.lab.pod_netns(p) for p in node.lab.pods}

    def ask() -> str:
        return subprocess.run(["nsenter", f"--net=/run/netns/{pod_ns['x/a']}", sys.executable, "-c",
                               UDP_FROM_PORT, VIP], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    apply(node, tmp_path, "three")
    first = ask()
    assert first in BACKENDS and {ask() for _ in range(3)} == {first}     # the port keeps its backend
    apply(node, tmp_path, "two", backends=tuple(b for b in BACKENDS if b != first))
    assert not [t for t in node.json("bpf", "nat")["translations"]
                if t["translated_to"] == f"{POD_IPS[first]}:9090"]
    assert {ask() for _ in range(3)} <= set(BACKENDS) - {first}


def test_client_ip_affinity_keeps_one_backend(services, tmp_path):
    node, connect = services
    apply(node, tmp_path, "affinity", affinity=True)
    seen = connect(20)
    assert len(set(seen["tcp"])) == 1 and seen["tcp"][0] in BACKENDS, seen["tcp"]


def test_policy_judges_the_backend_after_translation(services, tmp_path):
    """y/a admits only namespace z: x/a's connections that the service sends to y/a are
    refused, those sent to y/b and y/c go through."""
    node, connect = services
    policy = textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-z, namespace: y}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from: [{namespaceSelector: {matchLabels: {ns: z}}}]
        """)
    apply(node, tmp_path, "policy", policy=policy)
    seen = connect(30)
    for proto in ("tcp", "udp"):
        counts = Counter(seen[proto])
        assert "y/a" not in counts and {"y/b", "y/c"} <= set(counts), (proto, counts)
        assert sum(n for k, n in counts.items() if k not in BACKENDS) > 0, (proto, counts)   # y/a's share failed


SAME_PORT = textwrap.dedent("""
    import json, socket, sys
    vip, ips = sys.argv[1], json.loads(sys.argv[2])
    def connect(address, port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(2)
            s.bind(("0.0.0.0", 40123))
            s.connect((address, port))
            return s.recv(100).decode()
    backend = connect(vip, 80)
    try:
        direct = connect(ips[backend], 9090)
    except OSError as exc:
        direct = type(exc).__name__
    print(json.dumps([backend, direct]))
""")


def test_a_direct_connection_from_a_port_a_service_connection_used(services, tmp_path, lab):  # noqa: F811
    """x/a reaches a backend through the service from port 40123, then the same backend directly
    from the same port: the direct connection's replies keep the backend's address (the earlier
    translation is not applied to them)."""
    from tests.matrices import POD_IPS
    node, _ = services
    apply(node, tmp_path, "same-port")
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    done = subprocess.run(["nsenter", f"--net=/run/netns/{pod_ns['x/a']}", sys.executable, "-c", SAME_PORT, VIP,
                           json.dumps({k: POD_IPS[k] for k in BACKENDS})], capture_output=True, text=True,
                          timeout=60, check=True)
    backend, direct = json.loads(done.stdout)
    assert backend in BACKENDS and direct == backend, (backend, direct)


def test_hairpin_a_backend_reaches_its_own_service_and_itself_through_it(services, tmp_path, lab):  # noqa: F811
    """y/a connects to the service it backs: with y/a the only backend every connection (TCP and
    UDP) comes back to it, answered from the service address; with three, y/a is one of those
    answering. A policy closing y/a to everyone does not cut its hairpin (the way in is judged as
    from the node, which Kubernetes always allows); its egress policy still applies."""
    node, _ = services
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}

    def connect(count: int) -> dict[str, list[str]]:
        node.forget_connections()
        done = subprocess.run(["nsenter", f"--net=/run/netns/{pod_ns['y/a']}", sys.executable, "-c", CLIENT, VIP,
                               "80", "53", str(count)], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout)

    apply(node, tmp_path, "alone", backends=("y/a",))
    for proto, answers in connect(6).items():
        assert set(answers) == {"y/a"}, (proto, answers)
    apply(node, tmp_path, "three")
    for proto, answers in connect(30).items():
        assert set(answers) == set(BACKENDS), (proto, Counter(answers))
    closed = textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-closed, namespace: y}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Ingress]
        """)
    apply(node, tmp_path, "closed", backends=("y/a",), policy=closed)
    for proto, answers in connect(4).items():
        assert set(answers) == {"y/a"}, (proto, answers)
    no_egress = closed.replace("a-closed", "a-no-egress").replace("[Ingress]", "[Egress]")
    apply(node, tmp_path, "no-egress", backends=("y/a",), policy=no_egress)
    for proto, answers in connect(3).items():
        assert "y/a" not in answers, (proto, answers)


def unserved_manifests() -> dict[str, str]:
    """manifests(), plus services the eBPF plane cannot serve whole: `y/dual` (IPv4 and IPv6
    cluster addresses, TCP 80), `y/six` (an IPv6 cluster address only), `y/diameter` (SCTP 3868 and
    TCP 3869), `y/calls` (SCTP only, with a node port), `y/np` (a TCP node port: the lab's node has
    no InternalIP) and `y/headless` (nothing to serve)."""
    def svc(name: str, ips: list[str], ports: list[dict], kind: str = "ClusterIP") -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "y"},
                           "spec": {"type": kind, "clusterIPs": ips, "ports": ports}})
    texts = manifests()
    texts["unserved.yaml"] = "\n---\n".join([
        svc("dual", ["198.19.0.11", "2001:db8:77::11"], [{"port": 80, "targetPort": 9090}]),
        svc("six", ["2001:db8:77::12"], [{"port": 80, "targetPort": 9090}]),
        svc("diameter", ["198.19.0.13"], [{"name": "d", "port": 3868, "protocol": "SCTP"},
                                          {"name": "t", "port": 3869, "protocol": "TCP"}]),
        svc("calls", ["198.19.0.14"], [{"port": 5060, "protocol": "SCTP", "nodePort": 30060}], kind="NodePort"),
        svc("np", ["198.19.0.15"], [{"port": 8080, "targetPort": 9090, "nodePort": 30081}], kind="NodePort"),
        svc("headless", ["None"], [{"port": 80}]),
    ])
    return texts


UNSERVED = [
    "service y/calls: not served at all by the eBPF data plane: its SCTP port 5060 (node port 30060) "
    "(TCP and UDP only)",
    "service y/diameter: not served by the eBPF data plane: its SCTP port 3868 (TCP and UDP only)",
    "service y/dual: not served by the eBPF data plane: its IPv6 cluster address 2001:db8:77::11 (IPv4 only)",
    "service y/np: not served by the eBPF data plane: its node port 30081 (node lab-node has no IPv4 InternalIP)",
    "service y/six: not served at all by the eBPF data plane: its IPv6 cluster address 2001:db8:77::12 "
    "(IPv4 only)",
]


def test_what_the_ebpf_plane_cannot_serve_gets_no_keys_and_is_named(tmp_path):
    """Pure: IPv6 cluster addresses and SCTP ports get no service key (the programs translate
    IPv4 TCP and UDP only), nor node ports on a node without an IPv4 InternalIP, and
    renderers.bpf_services.unserved names each such service."""
    from dataclasses import replace

    from tests.matrices import NODE
    from weft.desired.loader import build_cluster_state
    from weft.desired.manifests import load_manifest_dir
    from weft.renderers.bpf_services import render_services, unserved
    state = build_cluster_state(load_manifest_dir(write_source(tmp_path / "src", texts=unserved_manifests())))
    services, _, _ = render_services(state, NODE)
    served = [(VIP, 53, 17), (VIP, 80, 6), ("198.19.0.11", 80, 6), ("198.19.0.13", 3869, 6), ("198.19.0.15", 8080, 6)]
    assert sorted((k.addr, k.port, k.proto) for k in services) == served
    assert unserved(state, NODE) == UNSERVED
    addressed = replace(state, nodes={**state.nodes, NODE: replace(state.nodes[NODE], addresses=("198.19.200.1",))})
    services, _, _ = render_services(addressed, NODE)
    assert sorted((k.addr, k.port, k.proto) for k in services) == sorted([*served, ("198.19.200.1", 30081, 6)])
    assert unserved(addressed, NODE) == [line for line in UNSERVED if not line.startswith("service y/np:")]


def test_a_run_warns_about_each_service_the_ebpf_plane_does_not_serve(services, tmp_path):
    """The run names them (one warning each) instead of letting them silently do nothing; what
    it can serve it serves."""
    node, connect = services
    done = node.weft("apply", "--dataplane", "ebpf", source=write_source(tmp_path / "src",
                                                                         texts=unserved_manifests()))
    warned = [line.removeprefix("weft: warning: ") for line in done.stderr.splitlines() if "eBPF data plane" in line]
    assert warned == UNSERVED, done.stderr
    shown = node.json("bpf", "nat")["services"]
    assert not [s for s in shown if s["protocol"] == "sctp" or ":" in s["address"].rpartition(":")[0]], shown
    assert "198.19.0.11:80" in {s["address"] for s in shown}, shown
    assert set(connect(6)["tcp"]) <= set(BACKENDS)
