"""BGP on a real kernel with real BIRD: multi-node labs (playbooks.multinode) in namespaces the
tests create and always remove, BIRD processes included.

Covers: 2- and 3-node full mesh (Established, blocks learned, cross-node TCP, policy across
nodes), blocks added one by one to a running mesh reaching every other kernel, a mesh password
(and a mismatched one that never establishes), a route reflector with two clients, an eBGP ToR
router receiving blocks and service ranges, and one announcing a pod's /32 that must not cut the
pod off, reloads that keep unchanged sessions and no reload when nothing changed, bad input that
leaves the old config live, a hand-edited BIRD file reported as drift, BIRD's rotated log file,
and the BGP benchmark.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from weft.desired import loader
from weft.desired.loader import build_cluster_state
from weft.desired.manifests import load_manifest_dir
from weft.model.errors import InvalidDesiredState
from weft.model.names import host_iface_name
from weft.playbooks.multinode import BLOCK_PREFIX, NAMESPACE, POOL, MultiNodeLab, block_object, has_lab_cni
from weft.playbooks.netlab import LabError
from weft.probes import bird as probe
from weft.reconciler import bird as birdmod
from weft.reconciler import status
from weft.reconciler.bird import same_instant
from weft.renderers.bird import render_bird_config

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
            labels: dict | None = None, pods: int = 1, tor: bool | str = False, tor_announces: tuple = ()):
    """A lab with BIRD configured and running on every node, all sessions Established. `tor`: a
    ToR router too (a string: with that password), announcing `tor_announces` to every node."""
    lab = MultiNodeLab(nodes, pods, labels=labels)
    try:
        lab.create()
        lab.write_manifests(extra or [], annotations)
        for node in lab.nodes:
            lab.apply(node)
        for node in lab.nodes:
            lab.start_bird(node)
        if tor:
            lab.add_router("tor", f"{TOR_IP}/24", tor_config(lab, tor if isinstance(tor, str) else None, tor_announces))
        lab.wait_established()
        _settled(lab)
        yield lab
    finally:
        names = [n for node in lab.nodes for n in node.netlab.netns_names] + [lab.fabric_netns]
        lab.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [n for n in names if n in left], "the lab left namespaces behind"


def tor_config(lab: MultiNodeLab, password: str | None = None, announce: tuple = ()) -> str:
    """A plain BIRD as top-of-rack router: eBGP to every node, keeps what it learns to itself and
    announces to every node the prefixes of `announce` (blackholes here: next hop the ToR)."""
    auth = f'password "{password}";' if password else ""
    routes = "".join(f"  route {prefix} blackhole;\n" for prefix in announce)
    peers = "\n".join(f"""protocol bgp node{i} {{
  local {TOR_IP} as {TOR_AS};
  neighbor {node.ip} as 64512;
  connect delay time 1;
  {auth}
  ipv4 {{ import all; export {'where proto = "announced"' if announce else "none"}; }};
}}""" for i, node in enumerate(lab.nodes))
    statics = f"protocol static announced {{\n  ipv4;\n{routes}}}\n" if announce else ""
    return f"router id {TOR_IP};\ntimeformat protocol iso long ms;\nprotocol device {{}}\n{statics}{peers}\n"


def tor_routes(lab: MultiNodeLab) -> set[str]:
    socket = str(lab.workdir / "tor" / "bird.ctl")
    return {r.prefix for r in probe.show_routes(socket)}


def kernel_routes(lab: MultiNodeLab, node) -> str:
    return node.netlab.node_run(["ip", "route", "show", "proto", "bird"], check=True).stdout


def reconfigured_at(node) -> object:
    return probe.last_reconfiguration(node.socket)


def same_sessions(lab: MultiNodeLab, since: dict) -> bool:
    now = {n.name: {name: p.since for name, p in lab.sessions(n).items()} for n in lab.nodes}
    return now.keys() == since.keys() and all(
        now[n].keys() == since[n].keys() and all(same_instant(now[n][k], since[n][k]) for k in since[n]) for n in since)


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


def test_blocks_added_one_by_one_reach_every_other_nodes_kernel():
    """#9.6: BIRD 2.0.12 took a prefix set grown inside one /24 for unchanged on `configure`, so a
    new block sharing a /24 with an exported one was never announced (10 of 13 here, before
    filter names carried a digest of their body). Every free block of the pool goes to node-1,
    one per weft run on every node: each must reach both other kernels, and no session may be
    reset for it (BIRD re-feeds the channels; it does not restart them)."""
    with bgp_lab(3) as lab:
        owner, *others = lab.nodes
        since = {n.name: {name: p.since for name, p in lab.sessions(n).items()} for n in lab.nodes}
        taken = {n.block for n in lab.nodes}
        free = [str(b) for b in POOL.subnets(new_prefix=BLOCK_PREFIX) if str(b) not in taken]
        added, missing = [], []
        for cidr in free:
            added.append(block_object(cidr, owner.name))
            lab.write_manifests(added)
            lab.apply_all()
            for other in others:
                if not _eventually(lambda o=other, c=cidr: f"via {owner.ip} " in lab.kernel_route(o, c), 5.0):
                    missing.append((cidr, other.name))
        assert len(free) == 13 and sum(c.startswith(("198.18.4.", "198.18.5.")) for c in free) >= 4
        assert missing == [], f"{len(missing)} of {2 * len(free)} new block routes never reached a kernel: {missing}"
        assert same_sessions(lab, since), since
        assert all(f"blackhole {c}" in kernel_routes(lab, owner) for c in free)


def test_mesh_password_from_a_secret_establishes_and_a_mismatch_does_not():
    """nodeMeshPassword (TCP MD5 on every mesh session) from a Secret; nodeMeshMaxRestartTime."""
    def mesh(password: str) -> list[dict]:
        return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "calico-system"}},
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp-mesh", "namespace": "calico-system"},
                 "stringData": {"password": password}},
                bgp_config(nodeMeshPassword={"secretKeyRef": {"name": "bgp-mesh", "key": "password"}},
                           nodeMeshMaxRestartTime="90s")]

    with bgp_lab(2, extra=mesh("m3sh-one")) as lab:
        one, two = lab.nodes
        for node in lab.nodes:
            text = node.config.read_text()
            assert 'password "m3sh-one";' in text and "graceful restart time 90;" in text
        lab.wait_routes(one, [two.block])
        assert all(lab.matrix().values())
        # node-2 alone moves to another password: the ends disagree, the session must not come back
        lab.write_manifests(mesh("m3sh-two"))
        lab.apply(two)
        session = "Mesh_198_18_0_2"
        assert _eventually(lambda: lab.sessions(one)[session].info != "Established")
        deadline = time.monotonic() + 8.0                # connect delay 1 s, retry 5 s: several tries
        while time.monotonic() < deadline:
            states = (lab.sessions(one)[session].info, lab.sessions(two)["Mesh_198_18_0_1"].info)
            assert "Established" not in states, states
            time.sleep(0.2)
        lab.apply(one)                                   # the same password again at both ends
        lab.wait_established()
        lab.wait_routes(one, [two.block])


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


def import_updates(node, protocol: str) -> int:
    """How many route updates `protocol` received (BIRD's "Import updates: received" counter)."""
    text = probe.birdc(node.socket, "show", "protocols", "all", protocol)
    line = next((ln for ln in text.splitlines() if ln.strip().startswith("Import updates:")), "")
    return int(line.split()[2]) if line else 0


def test_an_external_router_cannot_cut_pods_off():
    """#9.6: a router that is not a weft node announces node-2's pod as a /32, a piece of node-2's
    block, an unallocated block of the pool, node-1's own block, node-3's whole block and a range
    outside the pools. Accepted, the /32 would win over node-2's block by longest prefix and send
    node-1's traffic for that pod to the router. Only node-3's whole block may be taken from it."""
    hijack = ("198.18.4.66/32", "198.18.4.96/27", "198.18.7.0/26", "198.18.4.0/26", "198.18.4.128/26",
              "198.19.50.0/24")
    with bgp_lab(3, extra=[TOR_PEER], tor=True, tor_announces=hijack) as lab:
        one, two, three = lab.nodes
        assert two.pods[0].ip == "198.18.4.66" and (one.block, three.block) == ("198.18.4.0/26", "198.18.4.128/26")
        tor = "Global_198_18_0_254"
        assert _eventually(lambda: all(import_updates(n, tor) >= len(hijack) for n in lab.nodes)), \
            {n.name: import_updates(n, tor) for n in lab.nodes}
        lab.wait_routes(one, [two.block, three.block])
        from_tor = {n.name: {r.prefix for r in probe.show_routes(n.socket) if r.protocol == tor} for n in lab.nodes}
        assert from_tor == {"node-1": {three.block}, "node-2": {one.block, three.block}, "node-3": {one.block}}
        rejected = {ipaddress.ip_network(p) for p in hijack[:3] + hijack[5:]}
        for node in lab.nodes:                           # BIRD put none of the others in a kernel
            learned = {ipaddress.ip_network(line.split()[1] if line.startswith(("blackhole ", "unreachable "))
                                            else line.split()[0]) for line in kernel_routes(lab, node).splitlines()}
            assert {ipaddress.ip_network(n.block) for n in lab.nodes} <= learned and not learned & rejected, learned
        # the mesh's route to each block wins over the router's copy (shorter AS path)
        assert lab.learned(one)[three.block] == "Mesh_198_18_0_3"
        assert f"{three.block} via {three.ip} dev fabric0" in kernel_routes(lab, one)
        via = one.netlab.node_run(["ip", "route", "get", "198.18.4.66"], check=True).stdout
        assert f"via {two.ip} dev fabric0" in via, via
        assert all(lab.matrix().values())
        # 198.18.7.0/26 becomes node-3's: node-1's filter for the router changes name, BIRD asks the
        # router to send its routes again (route refresh) and now takes that whole block too, with
        # the session kept up; node-3's own route to it still wins.
        since = lab.sessions(one)[tor].since
        lab.write_manifests([TOR_PEER, block_object("198.18.7.0/26", three.name)])
        lab.apply_all()
        assert _eventually(lambda: {r.prefix for r in probe.show_routes(one.socket) if r.protocol == tor}
                           == {three.block, "198.18.7.0/26"})
        lab.wait_routes(one, ["198.18.7.0/26"])
        assert lab.learned(one)["198.18.7.0/26"] == "Mesh_198_18_0_3"
        assert same_instant(lab.sessions(one)[tor].since, since) and lab.sessions(one)[tor].info == "Established"


# --- reloads -----------------------------------------------------------------------------------

def test_changed_peer_reloads_without_resetting_other_sessions_and_no_op_never_reloads():
    with bgp_lab(2, extra=[TOR_PEER], tor=True) as lab:
        one, _ = lab.nodes
        mesh_since = lab.sessions(one)["Mesh_198_18_0_2"].since
        before = reconfigured_at(one)
        for _ in range(3):
            assert apply_all_bird(lab) == {"node-1": [], "node-2": []}
        assert same_instant(reconfigured_at(one), before)                        # no reload at all
        lab.write_manifests([bgp_peer("tor", peerIP=TOR_IP, asNumber=TOR_AS, keepaliveTime="20s")])
        commands = apply_all_bird(lab)
        assert [c for c in commands["node-1"] if "configure" in c] and not same_instant(reconfigured_at(one), before)
        lab.wait_established()
        assert same_instant(lab.sessions(one)["Mesh_198_18_0_2"].since, mesh_since)       # untouched by the reload
        lab.write_manifests([])                                              # the ToR peer removed
        apply_all_bird(lab)
        assert "Global_198_18_0_254" not in lab.sessions(one)
        assert same_instant(lab.sessions(one)["Mesh_198_18_0_2"].since, mesh_since)


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
        assert one.config.read_text() == live and same_instant(reconfigured_at(one), loaded)
        assert same_instant(lab.sessions(one)["Mesh_198_18_0_2"].since, since)
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
        assert one.config.read_text() == live and same_instant(reconfigured_at(one), loaded)
        assert not list(one.state_dir.glob(".bird.conf.*"))
        # nothing else of the run was applied either: the same plan is still pending
        assert lab.weft(one, "plan", "--output", "json").stdout == before
        assert same_instant(lab.sessions(one)["Mesh_198_18_0_2"].since, since)
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


def _settled(lab: MultiNodeLab, quiet: float = 1.0, timeout: float = 20.0) -> None:
    """Wait until no node's sessions changed state for `quiet` seconds: a session just up may go
    down and up again within milliseconds (both ends connected at once), and the tests compare
    sessions' `since` before and after a change to prove no session was reset."""
    def snapshot() -> dict:
        return {n.name: {name: (p.since, p.info) for name, p in lab.sessions(n).items()} for n in lab.nodes}

    def same_session(x: tuple, y: tuple) -> bool:      # `since` within BIRD's print jitter: one instant
        return x[1] == y[1] and (x[0] == y[0] or same_instant(x[0], y[0]))

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(
            a[n].keys() == b[n].keys() and all(same_session(a[n][k], b[n][k]) for k in a[n]) for n in a)
    last, changed = snapshot(), time.monotonic()
    deadline = changed + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = snapshot()
        if not same(now, last):
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed >= quiet:
            return
    raise AssertionError(f"BGP sessions still changing after {timeout:g}s: {last}")


def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_bird_logs_to_a_file_it_rotates():
    """The log file weft renders (`log_target`, ENGINE passes <state dir>/bird.log) is BIRD's own,
    bounded: past `log_limit` bytes BIRD renames it to bird.log.1 and starts a new one."""
    lab = MultiNodeLab(1, 1)
    try:
        lab.create()
        (one,) = lab.nodes
        state = build_cluster_state(load_manifest_dir(lab.write_manifests([bgp_config(logSeverityScreen="Debug")])))
        log, limit = one.state_dir / "bird.log", 4096
        one.config.write_text(render_bird_config(state, one.name, socket_path=one.socket, log_target=log,
                                                 log_limit=limit))
        lab.start_bird(one)
        backup = log.with_name("bird.log.1")
        for _ in range(200):
            if backup.exists() and log.exists() and log.stat().st_size > 0:
                break
            probe.birdc(one.socket, "configure")              # each one logs its reconfiguration
        assert backup.exists(), log.read_text()[-500:]
        assert 0 < log.stat().st_size <= limit and limit // 2 < backup.stat().st_size <= limit
        assert "Reconfigur" in log.read_text() + backup.read_text()
        assert "Reconfigur" not in (one.state_dir / "bird.out").read_text()
    finally:
        lab.close()


def test_bgp_benchmark_runs_and_prints_its_figures():
    """bench.bench_bgp at a small size, as a user runs it (it crashed on a lab method that no
    longer existed)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "bench.bench_bgp", "--peers", "20", "--blocks", "40", "--nodes", "2",
                           "--noop-runs", "2", "--new-blocks", "3"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    decoder, text, figures = json.JSONDecoder(), done.stdout, {}
    while text.strip():
        value, end = decoder.raw_decode(text.strip())
        figures.update(value)
        text = text.strip()[end:]
    assert figures["render"]["bird_accepts"] and figures["render"]["no_change_plan_is_none"]
    lab = figures["lab"]
    assert lab["reload_commands"] == 0 and lab["nodes_bird_reconfigured"] == 0
    assert lab["new_blocks_never_arrived"] == 0 and lab["new_block_in_remote_kernel_s"]["max"] < 10


def test_labs_leave_no_namespaces_or_bird_processes():
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"wml-{os.getpid()}-" not in left
    # BIRD runs in the foreground as a child of this process; other test sessions' labs are not ours.
    ours = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "weft-multinode-"], capture_output=True,
                          text=True).stdout.split()
    assert not ours, f"BIRD processes left: {ours}"


def test_lab_main_runs_end_to_end(capsys):
    from weft.playbooks.multinode import main
    assert main(["--nodes", "2", "--pods", "1"]) == 0
    out = capsys.readouterr().out
    assert "Established" in out and "Done: the lab is removed" in out
