"""The throwaway lab itself: it must connect everything with no policy and leave nothing behind.

These build real network namespaces, so they need root and iproute2. Every test also checks that
the root namespace's links, addresses, routes and rules are exactly as they were.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("the lab builds network namespaces: needs root and iproute2 (`ip`)", allow_module_level=True)

from weft.model.names import host_iface_name  # noqa: E402
from weft.playbooks import lab as lab_cli  # noqa: E402
from weft.playbooks.netlab import LabError, LabPod, NodeLab, format_matrix, pods_from_manifests  # noqa: E402

EXAMPLE_DIR = Path(lab_cli.__file__).parent / "example"
EXAMPLE_IPS = {
    "x/a": "198.18.1.11", "x/b": "198.18.1.12", "x/c": "198.18.1.13",
    "y/a": "198.18.1.21", "y/b": "198.18.1.22", "y/c": "198.18.1.23",
    "z/a": "198.18.1.31", "z/b": "198.18.1.32", "z/c": "198.18.1.33",
}


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, text=True, capture_output=True).stdout


def root_namespace_state() -> dict:
    """What the lab must never change in the root namespace (stable fields only, no counters)."""
    links = json.loads(sh("ip", "-j", "addr"))
    return {
        "links": sorted(link["ifname"] for link in links),
        "addrs": sorted((link["ifname"], a["local"], a["prefixlen"]) for link in links
                        for a in link.get("addr_info", [])),
        "routes": sh("ip", "route", "show", "table", "all"),
        "rules": sh("ip", "rule"),
    }


@pytest.fixture(autouse=True)
def root_namespace_untouched():
    before = root_namespace_state()
    yield
    assert root_namespace_state() == before


@pytest.fixture(scope="module")
def example_pods() -> list[LabPod]:
    return pods_from_manifests(EXAMPLE_DIR, "lab-node")


def lab_pids(lab: NodeLab) -> list[int]:
    """Every process running in one of the lab's namespaces."""
    pids = []
    for name in lab.netns_names:
        if Path("/run/netns", name).exists():
            pids += map(int, sh("ip", "netns", "pids", name).split())
    return pids


def assert_gone(lab: NodeLab, pids: list[int]) -> None:
    assert [name for name in sh("ip", "netns", "list").split() if name.startswith(lab.prefix + "-")] == []
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


def test_example_cluster_pods(example_pods):
    assert {pod.key: pod.ip for pod in example_pods} == EXAMPLE_IPS
    assert pods_from_manifests(EXAMPLE_DIR, "other-node") == []


def test_manifests_multi_document_yml_and_pending_pods(tmp_path):
    (tmp_path / "pods.yml").write_text(
        "kind: Pod\nmetadata: {namespace: n, name: p}\nspec: {nodeName: n1}\nstatus: {podIP: 198.18.0.5}\n"
        "---\nkind: Pod\nmetadata: {namespace: n, name: pending}\nspec: {nodeName: n1}\nstatus: {}\n"
        "---\nkind: Pod\nmetadata: {namespace: n, name: elsewhere}\nspec: {nodeName: n2}\n"
        "status: {podIP: 198.18.0.6}\n---\n")
    (tmp_path / "notes.txt").write_text("kind: Pod\n")
    assert pods_from_manifests(tmp_path, "n1") == [LabPod("n", "p", "198.18.0.5")]


def test_no_policy_everything_connects_and_close_leaves_nothing(example_pods):
    with NodeLab(example_pods) as lab:
        matrix = lab.matrix()
        pids = lab_pids(lab)
    assert len(matrix) == 9 * 9 * 4
    assert [key for key, connected in matrix.items() if not connected] == []
    assert len(pids) == 9  # one server per pod, nothing else left running
    assert_gone(lab, pids)
    lab.close()  # a second close is harmless


STALE_FLOW = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 40000))
    sock.settimeout(0.5)
    sock.connect((sys.argv[1], 80))
    sock.send(b"again")
    try:
        print(sock.recv(64) == b"again")
    except OSError:
        print(False)
"""


def test_matrix_counts_dropped_and_rejected_paths_as_blocked(example_pods):
    """A DROP waits out the probe timeout, a REJECT fails fast: both must read as blocked, nothing else.

    A flow established before the rules (same 5-tuple each time) must not outlive a matrix either.
    """
    pods = example_pods[:3]
    with NodeLab(pods) as lab:
        def same_udp_flow_to_x_c() -> bool:
            argv = ["ip", "netns", "exec", lab.pod_netns(pods[0]), sys.executable, "-c", STALE_FLOW, pods[2].ip]
            return sh(*argv).strip() == "True"

        lab.node_run(["iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"],
                     check=True)
        assert same_udp_flow_to_x_c()
        lab.node_run(["iptables", "-A", "FORWARD", "-d", pods[1].ip, "-p", "tcp", "-j", "DROP"], check=True)
        lab.node_run(["iptables", "-A", "FORWARD", "-d", pods[2].ip, "-j", "REJECT"], check=True)
        assert same_udp_flow_to_x_c()  # still established: the kernel's view, not the policy's
        matrix = lab.matrix(timeout=0.5)
        assert not same_udp_flow_to_x_c()  # matrix() forgot old flows
    dropped = {(src, "x/b", "tcp", port) for src in ("x/a", "x/c") for port in (80, 81)}
    rejected = {(src, "x/c", proto, port) for src in ("x/a", "x/b") for proto in ("tcp", "udp") for port in (80, 81)}
    assert {key for key, connected in matrix.items() if not connected} == dropped | rejected


@pytest.mark.parametrize("failure", ["duplicate pod IP", "Ctrl-C"])
def test_failed_create_leaves_nothing(example_pods, monkeypatch, failure):
    """A lab that fails half-way (servers already running) removes everything before raising."""
    seen = {}
    real_close = NodeLab.close

    def observed_close(self):
        seen.setdefault("pids", lab_pids(self))
        real_close(self)

    monkeypatch.setattr(NodeLab, "close", observed_close)
    pods = list(example_pods)
    if failure == "duplicate pod IP":
        pods.append(LabPod("z", "d", example_pods[0].ip))  # the node's route for it already exists
        expected = LabError
    else:
        def interrupted(self):
            raise KeyboardInterrupt
        monkeypatch.setattr(NodeLab, "_wait_ready", interrupted)
        expected = KeyboardInterrupt
    lab = NodeLab(pods)
    with pytest.raises(expected):
        lab.create()
    assert len(seen["pids"]) == 9  # the failure came after every first pod's server had started
    assert_gone(lab, seen["pids"])


@pytest.mark.parametrize("pods, error", [
    ([LabPod("x", "a", "198.18.1.11"), LabPod("x", "b", "10.1.2.3")], "outside the lab's IPv4 range"),
    ([LabPod("x", "a", "198.18.1.11"), LabPod("x", "b", "198.18.1.300")], "not an IPv4 address"),
    ([LabPod("x", "a", "198.18.1.11"), LabPod("x", "a", "198.18.1.12")], "named more than once"),
])
def test_bad_pods_are_refused_before_anything_is_built(pods, error):
    lab = NodeLab(pods)
    with pytest.raises(ValueError, match=error):
        lab.create()
    assert_gone(lab, [])


def test_a_lab_never_removes_namespaces_it_did_not_make(example_pods):
    """A second lab given a prefix already in use fails, and the first lab is left whole."""
    with NodeLab(example_pods[:2]) as first:
        pids = lab_pids(first)
        with pytest.raises(LabError, match="File exists"):
            NodeLab(example_pods[:2], prefix=first.prefix).create()
        assert lab_pids(first) == pids and len(pids) == 2
        assert all(first.matrix(probes=[("tcp", 80)], timeout=0.5).values())


def test_format_matrix():
    pods = [LabPod("x", "a", "198.18.1.11"), LabPod("y", "b", "198.18.1.22")]
    matrix = {(s.key, d.key, "tcp", 80): s == d for s in pods for d in pods}
    assert format_matrix(pods, matrix).splitlines()[1:] == ["-   x/a y/b", "x/a .   X", "y/b X   ."]


FAKE_WEFT = """\
import json, os, subprocess, sys
verb, destroy = sys.argv[1], "--destroy" in sys.argv
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "links": sorted(os.listdir("/sys/class/net"))}}) + "\\n")
if verb == {fail!r}:
    sys.exit("fake weft: " + verb + " failed")
if verb == "apply":
    for tool, address in (("iptables", "198.18.1.21"), ("ip6tables", "2001:db8:1::21")):
        subprocess.run([tool, "-D" if destroy else "-I", "FORWARD", "-d", address, "-j", "REJECT"], check=True)
print("fake weft", verb)
sys.exit(2 if verb == "plan" else 0)
"""


def run_lab_main(tmp_path, monkeypatch, capsys, fail: str | None):
    """lab.main against a stand-in weft that logs each call and REJECTs traffic to y/a while applied.

    Returns the logged calls and the captured output, after checking the lab left nothing behind.
    """
    log = tmp_path / "weft.log"
    script = tmp_path / "fake_weft.py"
    script.write_text(FAKE_WEFT.format(log=str(log), fail=fail))
    monkeypatch.setattr(lab_cli, "WEFT", [sys.executable, str(script)])
    assert lab_cli.main(["--no-cni", "--timeout", "0.5"]) == (1 if fail else 0)
    output = capsys.readouterr()
    prefix = re.search(r"node namespace (\S+)-node", output.out).group(1)
    assert [name for name in sh("ip", "netns", "list").split() if name.startswith(prefix + "-")] == []
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert not Path(calls[0]["argv"][2]).parent.exists()  # the temporary manifests and state are gone
    return calls, output


def test_lab_main_runs_every_step_with_weft_in_the_node(example_pods, tmp_path, monkeypatch, capsys):
    calls, output = run_lab_main(tmp_path, monkeypatch, capsys, fail=None)
    assert [call["argv"][:2] for call in calls] == [
        ["plan", "--from"], ["apply", "--from"], ["drift", "--from"], ["apply", "--destroy"]]
    assert all("--node" in call["argv"] and "--state-dir" in call["argv"] for call in calls)
    node_links = sorted(["lo", *(host_iface_name(pod.namespace, pod.name) for pod in example_pods)])
    assert all(call["links"] == node_links for call in calls)  # weft ran in the node namespace
    # the fake's REJECT while applied: 8 pods x 4 probes, to y/a and (replies) from it; each matrix
    # over IPv4 and IPv6 (the example pods are dual-stack)
    assert output.out.count("324 of 324 probes connected") == 4
    assert output.out.count("260 of 324 probes connected") == 2 and "(IPv6)" in output.out


def test_lab_main_stops_and_cleans_up_when_a_step_fails(tmp_path, monkeypatch, capsys):
    calls, output = run_lab_main(tmp_path, monkeypatch, capsys, fail="plan")
    assert [call["argv"][0] for call in calls] == ["plan"]
    assert "weft plan exited 1" in output.err
