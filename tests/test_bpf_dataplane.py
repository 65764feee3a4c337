"""The eBPF data plane on a real kernel: weft's tc programs on a lab node's pod veths, the policy
written into pinned maps, real TCP and UDP probes between pod namespaces.

Every NetworkPolicy scenario of tests/test_connectivity.py runs here with the eBPF data plane
instead of iptables, and must give the same (hand-written, Kubernetes) matrix. Then what makes
maps reconcilable state: a second run writes and compiles nothing, the probe reads back exactly
what was rendered, a key changed by hand is seen and put back alone; what tracked connections do
across a policy change; and `destroy` leaves no pin, no filter, no qdisc.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest

from tests.matrices import (
    NODE,
    SCENARIOS,
    all_open,
    diff,
    require_lab,
    write_source,
)
from tests.test_connectivity import SCENARIO_LIST
from weft.desired.loader import build_cluster_state
from weft.desired.manifests import load_manifest_dir
from weft.model.bpf import SPECS, Verdict
from weft.model.names import host_iface_name


def require_bcc() -> None:
    require_lab()
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("needs bcc (Debian's python3-bpfcc) in the interpreter: see playbooks/setup.sh")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_bcc()
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    cluster_dir = write_source(tmp_path_factory.mktemp("cluster"))
    with NodeLab(pods_from_manifests(cluster_dir, NODE)) as node:
        yield node


@pytest.fixture(scope="module")
def ebpf(lab, tmp_path_factory):
    """weft's eBPF data plane on the lab node, with a pin directory of its own; removed after,
    and checked gone."""
    from weft.playbooks.bpflab import BpfNode
    node = BpfNode(lab.node_netns, tmp_path_factory.mktemp("weft-bpf-state"))
    try:
        yield node
    finally:
        node.destroy()
        assert not node.root.exists(), f"pins left behind in {node.root}"


def desired(tmp_path, *policy_files, texts=None, relabel=None):
    from weft.renderers.bpf_policy import render_bpf
    source = write_source(tmp_path, *policy_files, texts=texts or {}, relabel=relabel or {})
    return render_bpf(build_cluster_state(load_manifest_dir(source)), NODE)


def observe(lab, ebpf):
    """A matrix of new connections only: weft's tracked connections are forgotten first."""
    ebpf.forget_connections()
    return lab.matrix()


def check_matrix(lab, ebpf, expected, context):
    from weft.playbooks.netlab import format_matrix
    observed = observe(lab, ebpf)
    differences = diff(expected, observed)
    if differences:                               # a loaded machine can lose a probe: look again
        observed = observe(lab, ebpf)
        differences = diff(expected, observed)
    if differences:
        pytest.fail(f"{context}: {len(differences)} cells differ\n" + "\n".join(differences)
                    + "\n\nEXPECTED\n" + format_matrix(lab.pods, expected)
                    + "\n\nOBSERVED\n" + format_matrix(lab.pods, observed), pytrace=False)


def test_lab_is_open_with_programs_and_no_policy(lab, ebpf, tmp_path):
    report = ebpf.apply(desired(tmp_path))
    assert report.attached, "the programs were not attached"
    check_matrix(lab, ebpf, all_open(), "eBPF, no policy")


@pytest.mark.parametrize("scenario", SCENARIO_LIST, ids=lambda s: s.name)
def test_scenario_on_ebpf(lab, ebpf, tmp_path, scenario):
    for i, step in enumerate(scenario.steps):
        context = f"eBPF {scenario.name} step {i + 1} ({step.policies or 'no policies'})"
        files = [SCENARIOS / step.policies] if step.policies else []
        maps = desired(tmp_path / f"step-{i + 1}", *files, relabel=step.relabel)
        ebpf.apply(maps)
        check_matrix(lab, ebpf, step.expect.matrix(), context)
        again = ebpf.apply(maps)
        assert (again.compiled, again.keys_written, again.attached) == (False, 0, []), \
            f"{context}: the second run was not a no-op: {again}"
        assert ebpf.read() == maps, f"{context}: the maps read back differ from the rendered ones"


def test_maps_are_reconciled_key_by_key(lab, ebpf, tmp_path):
    """The pinned maps have the layout weft packs; a key changed by hand is drift, named alone,
    and the next run writes that key only -- no compile, no reattach."""
    from weft.model import bpf as m
    from weft.probes.bpf import MapHandle
    from weft.reconciler.bpf_apply import MapWriter, diff_maps
    maps = desired(tmp_path, SCENARIOS / "pod-selector-peer.yaml")
    ebpf.apply(maps)
    for name, spec in SPECS.items():
        with MapHandle(ebpf.maps_dir / name) as handle:
            assert (handle.info.kind, handle.info.key_size, handle.info.value_size) == spec, name

    key = next(k for k, v in maps.verdicts.items())
    wrong = Verdict(m.ALLOW, 12345)
    with MapWriter(ebpf.maps_dir / "verdicts") as writer:
        writer.update(m.pack_key("verdicts", key), m.pack_value("verdicts", wrong))
    drift = diff_maps(maps, ebpf.read())
    assert drift.writes["verdicts"] == {key: maps.verdicts[key]}
    assert not any(drift.deletes.values()) and sum(len(w) for w in drift.writes.values()) == 1
    report = ebpf.apply(maps)
    assert (report.compiled, report.attached, report.keys_written) == (False, [], 1)
    assert ebpf.read() == maps


def test_a_new_build_replaces_the_programs_and_keeps_maps_and_connections(lab, ebpf, tmp_path):
    """Other build flags: one compile, every hook re-attached, the old build's pins removed; the
    policy maps are not rewritten and tracked connections are kept. A detached program is drift:
    the next run attaches it again, and does nothing else."""
    from weft.probes.bpf import read_conntrack, read_pins
    maps = desired(tmp_path, SCENARIOS / "pod-selector-peer.yaml")
    ebpf.apply(maps)
    before = read_pins(ebpf.root).progs_dirs
    lab.matrix()                                  # leaves tracked connections behind
    tracked = len(read_conntrack(ebpf.maps_dir))
    try:
        report = ebpf.apply(maps, cflags=("-DWEFT_TEST_REBUILD=1",))
        assert report.compiled and report.keys_written == 0
        assert len(report.attached) == 2 * len(lab.pods)
        assert report.removed == list(before) and read_pins(ebpf.root).progs_dirs != before
        assert len(read_conntrack(ebpf.maps_dir)) >= tracked > 0
        check_matrix(lab, ebpf, next(s for s in SCENARIO_LIST if s.name == "pod-selector-peer").steps[0]
                     .expect.matrix(), "after a rebuild")
    finally:
        report = ebpf.apply(maps)                 # back to the usual build
    assert report.compiled
    iface = host_iface_name("y", "b")
    lab.node_run(["tc", "filter", "del", "dev", iface, "egress", "pref", "49152"], check=True)
    report = ebpf.apply(maps)
    assert (report.compiled, report.attached, report.keys_written) == (False, [f"{iface}/egress"], 0)


def test_an_interface_without_endpoint_entry_drops(lab, ebpf, tmp_path):
    """Fail closed: a workload interface whose entry is gone passes nothing."""
    maps = desired(tmp_path)
    ebpf.apply(maps)
    iface = host_iface_name("x", "a")
    ebpf.apply(replace(maps, endpoints={k: v for k, v in maps.endpoints.items() if k != iface}))
    observed = observe(lab, ebpf)
    assert not any(ok for (src, dst, _, _), ok in observed.items() if "x/a" in (src, dst) and src != dst)
    assert all(ok for (src, dst, _, _), ok in observed.items() if "x/a" not in (src, dst))
    ebpf.apply(maps)


CLIENT = textwrap.dedent("""
    import socket, sys
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("connected", flush=True)
    for line in sys.stdin:
        word, timeout = line.split()
        sock.settimeout(float(timeout))
        try:
            sock.sendall(word.encode() + b"\\n")
            print(sock.recv(100).decode().strip() or "closed", flush=True)
        except OSError as exc:
            print(type(exc).__name__, flush=True)
""")
# Echoes each line; "later" is echoed after 3 s, so the server's packet is the first of the
# connection after a policy change made meanwhile.
SERVER = textwrap.dedent("""
    import socket, threading, time
    srv = socket.create_server(("0.0.0.0", 8080))
    print("ready", flush=True)
    def echo(conn):
        with conn:
            while data := conn.recv(100):
                if data.startswith(b"later"):
                    time.sleep(3)
                conn.sendall(data)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
""")


def x_a_policy(*ingress_from: str) -> str:
    """x/a: ingress on 8080 from the given pods of x; egress closed (no rule)."""
    peers = "".join(f"\n    - podSelector: {{matchLabels: {{pod: {p}}}}}" for p in ingress_from)
    return textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-8080, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Ingress, Egress]
          ingress:
          - ports: [{port: 8080}]
            from:""") + peers + "\n"


def test_established_connections_follow_policy_changes(lab, ebpf, tmp_path):
    """A connection x/b -> x/a:8080 survives a policy change that still allows it and is cut by
    one that no longer does. x/a's egress is closed, so after the first change the server's own
    packet (sent first) passes only because the connection's opening packet is judged again under
    the new policy -- not as a new flow picked up mid-stream, which egress would drop."""
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    ip = {p.key: p.ip for p in lab.pods}
    ebpf.apply(desired(tmp_path / "1", texts={"p.yaml": x_a_policy("b")}))
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{pod_ns['x/a']}", sys.executable, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    client = None
    try:
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.Popen(["nsenter", f"--net=/run/netns/{pod_ns['x/b']}", sys.executable, "-c", CLIENT,
                                   ip["x/a"], "8080"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)

        def send(word: str, timeout: float) -> None:
            client.stdin.write(f"{word} {timeout}\n")
            client.stdin.flush()

        assert client.stdout.readline().strip() == "connected"
        send("one", 2)
        assert client.stdout.readline().strip() == "one"
        send("later", 8)                        # the server answers in 3 s, after the change below
        time.sleep(0.5)                         # the server has acknowledged it: the client sends nothing more
        changed = ebpf.apply(desired(tmp_path / "2", texts={"p.yaml": x_a_policy("b", "c")}))
        assert changed.keys_written and not changed.compiled
        assert client.stdout.readline().strip() == "later", "a connection the changed policy still allows was cut"
        ebpf.apply(desired(tmp_path / "3", texts={"p.yaml": x_a_policy("c")}))
        send("three", 2)
        assert client.stdout.readline().strip() in ("TimeoutError", "timeout"), \
            "a connection the policy no longer allows went on"
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()


PROBE_ICMP_UDP = textwrap.dedent("""
    import json, os, socket, struct, sys
    def checksum(data):
        total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF
    def ping(ip):
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.settimeout(1)
            ident = os.getpid() & 0xFFFF
            body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"weft"
            s.sendto(struct.pack("!BBHHH", 8, 0, checksum(body), ident, 1) + b"weft", (ip, 0))
            try:
                while True:
                    data, addr = s.recvfrom(1500)
                    if addr[0] == ip and data[20] == 0 and struct.unpack("!H", data[24:26])[0] == ident:
                        return "reply"
            except TimeoutError:
                return "timeout"
    def udp_closed(ip):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((ip, 9))
            s.send(b"x")
            try:
                s.recv(10)
                return "answer"
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                return "timeout"
    print(json.dumps([ping(sys.argv[1]), udp_closed(sys.argv[1])]))
""")


def test_icmp_queries_and_errors(lab, ebpf, tmp_path):
    """ICMP: an echo request is judged like any protocol (a port-less rule admits it), its reply
    follows the tracked query; an ICMP error about a tracked connection (port unreachable for a
    UDP datagram) reaches the sender, one about nothing tracked does not."""
    ebpf.apply(desired(tmp_path, SCENARIOS / "pod-selector-peer.yaml"))     # x/a admits x/b only
    ebpf.forget_connections()
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    xa = next(p.ip for p in lab.pods if p.key == "x/a")

    def probe(src: str) -> list[str]:
        done = subprocess.run(["nsenter", f"--net=/run/netns/{pod_ns[src]}", sys.executable, "-c", PROBE_ICMP_UDP, xa],
                              capture_output=True, text=True, timeout=30, check=True)
        return json.loads(done.stdout)

    assert probe("x/b") == ["reply", "refused"]
    assert probe("x/c") == ["timeout", "timeout"]


def test_rule_counters_count_new_connections(lab, ebpf, tmp_path):
    from weft.playbooks.bpflab import in_netns
    from weft.probes.bpf import interfaces, read_counters
    maps = desired(tmp_path, SCENARIOS / "pod-selector-peer.yaml")
    ebpf.apply(maps)
    observe(lab, ebpf)
    counters = read_counters(ebpf.maps_dir)
    index = {name: i for i, name in in_netns(lab.node_netns, interfaces).items()}
    xa = index[host_iface_name("x", "a")]
    decided = {rule for (ifindex, rule), (packets, _) in counters.items() if ifindex == xa and packets}
    allow_rule = next(v.rule for k, v in maps.verdicts.items() if v.action == 1 and v.rule)
    assert allow_rule in decided, json.dumps({str(k): v for k, v in counters.items()})


def test_destroy_removes_everything(lab, tmp_path):
    """`destroy` detaches weft's filters, removes the clsact qdiscs it added and every pin."""
    from weft.playbooks.bpflab import BpfNode
    node = BpfNode(lab.node_netns, tmp_path / "state")
    node.apply(desired(tmp_path / "src", SCENARIOS / "deny-ingress-namespace.yaml"))
    assert node.root.exists()
    node.destroy()
    assert not node.root.exists()
    for pod in lab.pods:
        iface = host_iface_name(pod.namespace, pod.name)
        qdiscs = lab.node_run(["tc", "qdisc", "show", "dev", iface], check=True).stdout
        filters = [lab.node_run(["tc", "filter", "show", "dev", iface, hook]).stdout for hook in ("ingress", "egress")]
        assert "clsact" not in qdiscs and not any(f.strip() for f in filters), (iface, qdiscs, filters)
