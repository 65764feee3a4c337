"""BGP on a real kernel with real BIRD: multi-node labs (playbooks.multinode) in namespaces the
tests create and always remove, BIRD processes included.

Covers: 2- and 3-node full mesh (Established, blocks learned, cross-node TCP, policy across
nodes), a route reflector with two clients, an eBGP ToR router receiving blocks and service
ranges, reloads that keep unchanged sessions and no reload when nothing changed, bad input that
leaves the old config live, and a hand-edited BIRD file reported as drift.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import shutil
import subprocess
import time
from argparse import Namespace

import pytest

from weft.desired import loader
from weft.desired.loader import build_cluster_state
from weft.desired.manifests import load_manifest_dir
from weft.model.errors import InvalidDesiredState
from weft.model.names import host_iface_name
from weft.playbooks.multinode import NAMESPACE, MultiNodeLab, has_lab_cni
from weft.playbooks.netlab import LabError
from weft.probes import bird as probe
from weft.reconciler import bird as birdmod
from weft.reconciler import status

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bird", "birdc", "ip")),
    reason="needs root, ip and BIRD 2 (Debian package bird2)")

TOR_IP, TOR_AS = "198.18.0.254", 65001


def bgp_config(**spec) -> dict:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
            "spec": spec}


def bgp_peer(name: str, **spec) -> dict:
    return {"apiVersion": "crd.projectcalico.org/v1", "kind": "BGPPeer", "metadata": {"name": name}, "spec": spec}


TOR_PEER = bgp_peer("tor", peerIP=TOR_IP, asNumber=TOR_AS)


@contextlib.contextmanager
def bgp_lab(nodes: int, *, extra: list | None = None, annotations: dict | None = None,
            labels: dict | None = None, pods: int = 1, tor: bool | str = False, full_apply: bool = False):
    """A lab with BIRD configured and running on every node, all sessions Established."""
    lab = MultiNodeLab(nodes, pods, labels=labels)
    try:
        lab.create()
        lab.write_manifests(extra or [], annotations)
        for node in lab.nodes:
            lab.apply(node)
        for node in lab.nodes:
            lab.start_bird(node)
        if tor:
            lab.add_router("tor", f"{TOR_IP}/24", tor_config(lab, tor if isinstance(tor, str) else None))
        lab.wait_established()
        yield lab
    finally:
        names = [n for node in lab.nodes for n in node.netlab.netns_names] + [lab.fabric_netns]
        lab.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [n for n in names if n in left], "the lab left namespaces behind"


def tor_config(lab: MultiNodeLab, password: str | None = None) -> str:
    """A plain BIRD as top-of-rack router: eBGP to every node, keeps what it learns to itself."""
    auth = f'password "{password}";' if password else ""
    peers = "\n".join(f"""protocol bgp node{i} {{
  local {TOR_IP} as {TOR_AS};
  neighbor {node.ip} as 64512;
  connect delay time 1;
  {auth}
  ipv4 {{ import all; export none; }};
}}""" for i, node in enumerate(lab.nodes))
    return f"router id {TOR_IP};\ntimeformat protocol iso long ms;\nprotocol device {{}}\n{peers}\n"


def tor_routes(lab: MultiNodeLab) -> set[str]:
    socket = str(lab.workdir / "tor" / "bird.ctl")
    return {r.prefix for r in probe.show_routes(socket)}


def kernel_routes(lab: MultiNodeLab, node) -> str:
    return node.netlab.node_run(["ip", "route", "show", "proto", "bird"], check=True).stdout


def reconfigured_at(node) -> object:
    return probe.last_reconfiguration(node.socket)


def apply_all_bird(lab: MultiNodeLab) -> dict[str, list[str]]:
    return {node.name: lab.apply(node) for node in lab.nodes}


# --- full mesh -----------------------------------------------------------------------------

def test_two_node_mesh_routes_pods_and_enforces_policy_across_nodes():
    """Pods created through weft's CNI plugin when this checkout's lab can (else wired directly)."""
    lab = MultiNodeLab(2, 2, cni=has_lab_cni())
    try:
        lab.create()
        one, two = lab.nodes
        state = build_cluster_state(load_manifest_dir(lab.manifests))
        change = birdmod.plan_bird(state, one.name, one.state_dir, one.socket)
        if change is not None:                              # (weft apply may already have written it)
            assert not change.reload and "BIRD is not running" in change.note
        lab.apply_all()                                     # weft apply + BIRD config, BIRD not running yet
        assert one.config.exists() and oct(one.config.stat().st_mode & 0o777) == "0o600"
        # a /32 of weft's route protocol (as the CNI plugin writes them) must stay out of BGP
        veth = host_iface_name(one.pods[0].namespace, one.pods[0].name)
        one.netlab.node_run(["ip", "route", "add", "198.18.4.60/32", "dev", veth, "proto", "201"], check=True)
        for node in lab.nodes:
            lab.start_bird(node)
        lab.wait_established()
        lab.wait_routes(one, [two.block])
        lab.wait_routes(two, [one.block])
        assert f"{two.block} via {two.ip} dev fabric0" in kernel_routes(lab, one)
        assert f"blackhole {one.block}" in kernel_routes(lab, one)
        assert set(lab.learned(two)) == {one.block}         # the block, never the /32 beneath
        assert "198.18.4.60 " in one.netlab.node_run(["ip", "route", "show", "proto", "201"], check=True).stdout
        matrix = lab.matrix()
        assert all(matrix.values()), matrix
        # policy from the manifests, enforced by weft's iptables on the destination node
        only_node_one = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"namespace": NAMESPACE, "name": "only-from-node-1"},
                         "spec": {"podSelector": {"matchLabels": {"node": "node-2"}}, "policyTypes": ["Ingress"],
                                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"node": "node-1"}}}]}]}}
        lab.write_manifests([only_node_one])
        commands = [lab.apply(node) for node in lab.nodes]
        assert commands == [[], []]                          # the policy does not touch BIRD
        matrix = lab.matrix()
        for (src, dst, _, _), ok in matrix.items():
            expect = not dst.startswith("lab/n2-") or src.startswith("lab/n1-") or src == dst
            assert ok == expect, (src, dst, ok)
    finally:
        lab.close()


def test_three_node_mesh_and_status():
    with bgp_lab(3) as lab:
        for node in lab.nodes:
            lab.wait_routes(node, [n.block for n in lab.nodes if n is not node])
            assert sorted(lab.sessions(node)) == sorted(f"Mesh_{n.ip.replace('.', '_')}"
                                                        for n in lab.nodes if n is not node)
        assert all(lab.matrix().values())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = status.run(Namespace(state_dir=lab.nodes[1].state_dir, socket=None, output="json"))
        data = json.loads(out.getvalue())
        assert code == 0 and data["blocks"] == [lab.nodes[1].block]
        peers = {p["address"]: p for p in data["peers"]}
        assert set(peers) == {"198.18.0.1", "198.18.0.3"}
        assert {p["kind"] for p in peers.values()} == {"node-to-node mesh"}
        assert all(p["info"] == "Established" and p["since"] for p in peers.values())
        assert peers["198.18.0.3"]["routes"][0]["prefix"] == lab.nodes[2].block
        text = status.format_text(status.collect(lab.nodes[0].socket))
        assert "node-to-node mesh" in text and "Established" in text and lab.nodes[1].block in text


# --- route reflector -------------------------------------------------------------------------

def test_route_reflector_clients_learn_each_other_via_the_rr():
    rr_peering = bgp_peer("peer-with-rrs", nodeSelector="all()", peerSelector="route-reflector == 'true'")
    with bgp_lab(3, extra=[bgp_config(nodeToNodeMeshEnabled=False), rr_peering],
                 labels={"node-1": {"route-reflector": "true"}},
                 annotations={"node-1": {"projectcalico.org/RouteReflectorClusterID": "244.0.0.1"}}) as lab:
        rr, a, b = lab.nodes
        assert sorted(lab.sessions(rr)) == ["Node_198_18_0_2", "Node_198_18_0_3"]
        assert list(lab.sessions(a)) == ["Node_198_18_0_1"] and list(lab.sessions(b)) == ["Node_198_18_0_1"]
        lab.wait_routes(a, [b.block])
        lab.wait_routes(b, [a.block])
        assert lab.learned(a)[b.block] == "Node_198_18_0_1"                 # learned from the RR...
        assert f"{b.block} via {b.ip} dev fabric0" in kernel_routes(lab, a)  # ...next hop kept: straight to b
        assert all(lab.matrix().values())


# --- external router -------------------------------------------------------------------------

def test_tor_router_over_ebgp_receives_blocks_and_service_ranges():
    """The ToR session also proves the BGP password (TCP MD5) read from a Secret."""
    secret = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}},
              {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp", "namespace": "kube-system"},
               "stringData": {"tor": "s3cr3t-md5"}}]
    tor_peer = bgp_peer("tor", peerIP=TOR_IP, asNumber=TOR_AS, password={"secretKeyRef": {"name": "bgp", "key": "tor"}})
    with bgp_lab(2, extra=[*secret, tor_peer], tor="s3cr3t-md5") as lab:
        one, two = lab.nodes
        assert "Global_198_18_0_254" in lab.sessions(one)
        lab.wait_routes(one, [two.block])
        assert _eventually(lambda: tor_routes(lab) == {one.block, two.block}), tor_routes(lab)
        lab.write_manifests([*secret, tor_peer, bgp_config(serviceClusterIPs=[{"cidr": "198.19.0.0/16"}],
                                                  serviceExternalIPs=[{"cidr": "198.19.200.0/24"}])])
        apply_all_bird(lab)
        want = {one.block, two.block, "198.19.0.0/16", "198.19.200.0/24"}
        assert _eventually(lambda: tor_routes(lab) == want), tor_routes(lab)
        assert set(lab.learned(one)) == {two.block}                          # nodes do not trade services
        assert "198.19." not in kernel_routes(lab, one)


# --- reloads -----------------------------------------------------------------------------------

def test_changed_peer_reloads_without_resetting_other_sessions_and_no_op_never_reloads():
    with bgp_lab(2, extra=[TOR_PEER], tor=True) as lab:
        one, _ = lab.nodes
        mesh_since = lab.sessions(one)["Mesh_198_18_0_2"].since
        before = reconfigured_at(one)
        for _ in range(3):
            assert apply_all_bird(lab) == {"node-1": [], "node-2": []}
        assert reconfigured_at(one) == before                                 # no reload at all
        lab.write_manifests([bgp_peer("tor", peerIP=TOR_IP, asNumber=TOR_AS, keepaliveTime="20s")])
        commands = apply_all_bird(lab)
        assert [c for c in commands["node-1"] if "configure" in c] and reconfigured_at(one) != before
        lab.wait_established()
        assert lab.sessions(one)["Mesh_198_18_0_2"].since == mesh_since       # untouched by the reload
        lab.write_manifests([])                                              # the ToR peer removed
        apply_all_bird(lab)
        assert "Global_198_18_0_254" not in lab.sessions(one)
        assert lab.sessions(one)["Mesh_198_18_0_2"].since == mesh_since


# --- bad input ---------------------------------------------------------------------------------

def _run_bird_main(lab: MultiNodeLab, node) -> tuple[int, str]:
    done = lab.weft(node, "apply", "--bird-socket", node.socket)     # BIRD is a resource of `weft apply`
    return done.returncode, done.stderr


@pytest.mark.parametrize("bad, named", [
    (bgp_peer("bad-ip", peerIP="198.18.0.300", asNumber=TOR_AS), "BGPPeer bad-ip: spec.peerIP"),
    (bgp_peer("bad-as", peerIP=TOR_IP, asNumber=4294967296), "BGPPeer bad-as: spec.asNumber"),
])
def test_invalid_input_is_refused_and_old_config_stays_live(bad, named):
    with bgp_lab(2) as lab:
        one = lab.nodes[0]
        live, since, loaded = one.config.read_text(), lab.sessions(one)["Mesh_198_18_0_2"].since, reconfigured_at(one)
        lab.write_manifests([bad])
        code, err = _run_bird_main(lab, one)
        assert code == 1 and named in err, err
        assert one.config.read_text() == live and reconfigured_at(one) == loaded
        assert lab.sessions(one)["Mesh_198_18_0_2"].since == since
        assert lab.sessions(one)["Mesh_198_18_0_2"].info == "Established"


def test_overlapping_pools_are_refused():
    if "check_state" not in inspect.getsource(loader):
        pytest.skip("desired.ipam.check_state is not called by desired.loader yet")
    pools = [{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": name},
              "spec": {"cidr": cidr}} for name, cidr in (("a", "198.18.4.0/22"), ("b", "198.18.6.0/24"))]
    with pytest.raises(InvalidDesiredState, match="IPPool b: spec.cidr: .*overlaps"):
        build_cluster_state([("pools.yaml", p) for p in pools])


def test_config_bird_rejects_is_reported_and_never_goes_live():
    with bgp_lab(2, extra=[TOR_PEER], tor=True) as lab:
        one = lab.nodes[0]
        live, since, loaded = one.config.read_text(), lab.sessions(one)["Mesh_198_18_0_2"].since, reconfigured_at(one)
        # valid for weft's checks, but BIRD wants keepalive <= hold time (240 s by default)
        lab.write_manifests([bgp_peer("tor", peerIP=TOR_IP, asNumber=TOR_AS, keepaliveTime="300s")])
        before = lab.weft(one, "plan", "--output", "json").stdout
        with pytest.raises(LabError) as info:
            lab.apply(one)
        message = str(info.value)
        assert "Keepalive time must be at most hold time" in message and "BGPPeer tor" in message
        assert "Global_198_18_0_254" in message and "old configuration stays live" in message
        assert one.config.read_text() == live and reconfigured_at(one) == loaded
        assert not list(one.state_dir.glob(".bird.conf.*"))
        # nothing else of the run was applied either: the same plan is still pending
        assert lab.weft(one, "plan", "--output", "json").stdout == before
        assert lab.sessions(one)["Mesh_198_18_0_2"].since == since
        code, err = _run_bird_main(lab, one)
        assert code == 1 and "Keepalive time" in err


# --- drift -------------------------------------------------------------------------------------

def test_hand_edited_bird_file_is_drift_and_apply_repairs_it():
    with bgp_lab(2) as lab:
        one = lab.nodes[0]
        state = build_cluster_state(load_manifest_dir(lab.manifests))
        assert birdmod.plan_bird(state, one.name, one.state_dir, None) is None
        good = one.config.read_text()
        one.config.write_text(good.replace("connect retry time 5;", "connect retry time 60;"))
        change = birdmod.plan_bird(state, one.name, one.state_dir, None)
        items = birdmod.bird_drift_items(change)
        assert {(i["problem"], i["rule"].strip()) for i in items} == {
            ("missing", "connect retry time 5;"), ("unexpected", "connect retry time 60;")}
        assert all(i["kind"] == "bird-config" and i["name"] == str(one.config) for i in items)
        # the same through the weft command: drift exits 2 naming the file and the lines
        drift = lab.weft(one, "drift", "--bird-socket", one.socket, "--output", "json")
        assert drift.returncode == 2, drift.stderr
        assert {(i["kind"], i["name"], i["problem"]) for i in json.loads(drift.stdout)["items"]} == {
            ("bird-config", str(one.config), "missing"), ("bird-config", str(one.config), "unexpected")}
        text = birdmod.format_bird_change(change)
        assert "-  connect retry time 60;" in text.replace("      ", "") and "~ bird" in text
        commands = lab.apply(one)                        # weft apply repairs it
        assert one.config.read_text() == good and any("configure" in c for c in commands)
        assert lab.weft(one, "drift", "--bird-socket", one.socket).returncode == 0
        assert birdmod.plan_bird(state, one.name, one.state_dir, None) is None
        one.config.unlink()
        missing = birdmod.plan_bird(state, one.name, one.state_dir, None)
        assert birdmod.bird_drift_items(missing) == [
            {"kind": "bird-config", "name": str(one.config), "problem": "missing"}]


def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_labs_leave_no_namespaces_or_bird_processes():
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"wml-{os.getpid()}-" not in left
    ours = subprocess.run(["pgrep", "-f", "weft-multinode-"], capture_output=True, text=True).stdout.split()
    assert not ours, f"BIRD processes left: {ours}"


def test_lab_main_runs_end_to_end(capsys):
    from weft.playbooks.multinode import main
    assert main(["--nodes", "2", "--pods", "1"]) == 0
    out = capsys.readouterr().out
    assert "Established" in out and "Done: the lab is removed" in out
