"""BIRD's configuration as a resource: plan (with `bird -p`), apply, drift, with and without a
running BIRD. Passwords never leave the file (nor a digest of them); an edited password line is
drift; a reconfiguration weft did not make is drift; BGP off means hands off; every BIRD failure
is one clear line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import replace

import pytest

from tests import nodens
from weft.model.cluster import BGPPeer, Block, ClusterState, IPPool, Node, NodeBGP, Secret, SecretKeyRef
from weft.model.errors import WeftError
from weft.probes import bird as probe
from weft.reconciler.bird import Bird, BirdState, apply_bird, bird_drift_items, format_bird_change, plan_bird
from weft.reconciler.resource import Action
from weft.store.statedir import StateDir, UnsafeState

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird (Debian package bird2)")


def state(**fields) -> ClusterState:
    nodes = {f"node-{i}": Node(f"node-{i}", {}, NodeBGP(f"198.18.0.{i}/24")) for i in (1, 2)}
    base = dict(namespaces={}, endpoints=(), policies=(), nodes=nodes, ippools=(IPPool("p", "198.18.4.0/22", 26),),
                blocks=(Block("198.18.4.0/26", "node-1"),),
                bgp_peers=(BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001, password=SecretKeyRef("s", "k")),),
                secrets=(Secret("kube-system", "s", {"k": "t0ps3cret"}),))
    return ClusterState(**(base | fields))


def test_bgp_off_means_no_bird_config(tmp_path):
    off = replace(state(), nodes={"node-1": Node("node-1")})
    assert plan_bird(off, "node-1", tmp_path, None) is None
    assert plan_bird(state(), "unknown-node", tmp_path, None) is None
    assert not list(tmp_path.iterdir())


@needs_bird
def test_without_bird_running_the_file_is_written_checked_and_reload_skipped(tmp_path):
    change = plan_bird(state(), "node-1", tmp_path, None)
    assert (change.action, change.reload, change.old) == (Action.CREATE, False, None)
    assert "BIRD is not running" in change.note and change.socket == str(tmp_path / "bird.ctl")
    assert f'log "{tmp_path / "bird.log"}"' in change.new, "BIRD logs to a file in the state dir"
    text = format_bird_change(change)
    assert "+ bird " in text and "t0ps3cret" not in text and '"(redacted)"' in text
    assert "t0ps3cret" not in json.dumps(change.public()) and "t0ps3cret" in change.new
    assert bird_drift_items(change) == [{"kind": "bird-config", "name": str(tmp_path / "bird.conf"),
                                         "problem": "missing"}]
    commands = apply_bird(change, tmp_path)
    assert commands == [f"bird -p -c {tmp_path / '.bird.conf.new'}"]             # no birdc: nothing to reload
    live = tmp_path / "bird.conf"
    assert live.read_text() == change.new and live.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bird.conf"]
    assert plan_bird(state(), "node-1", tmp_path, None) is None                  # second run: nothing


@needs_bird
def test_update_is_a_diff_and_drift_names_lines(tmp_path):
    apply_bird(plan_bird(state(), "node-1", tmp_path, None), tmp_path)
    moved = replace(state(), blocks=(Block("198.18.4.64/26", "node-1"),))
    change = plan_bird(moved, "node-1", tmp_path, None)
    assert change.action is Action.UPDATE
    text = format_bird_change(change)
    assert "-  route 198.18.4.0/26 blackhole;" in text.replace("      ", "")
    assert "+  route 198.18.4.64/26 blackhole;" in text.replace("      ", "")
    problems = {(i["problem"], i["rule"].strip()) for i in bird_drift_items(change)}
    assert ("missing", "route 198.18.4.64/26 blackhole;") in problems
    assert ("unexpected", "route 198.18.4.0/26 blackhole;") in problems


@needs_bird
def test_an_edited_password_line_is_drift_and_no_digest_of_it_leaves(tmp_path):
    """#9.6: the unredacted texts are compared; what is shown stays redacted."""
    apply_bird(plan_bird(state(), "node-1", tmp_path, None), tmp_path)
    live = tmp_path / "bird.conf"
    live.write_text(live.read_text().replace("t0ps3cret", "guessed"))
    change = plan_bird(state(), "node-1", tmp_path, None)
    assert change is not None and change.action is Action.UPDATE
    assert bird_drift_items(change) == [{"kind": "bird-config", "name": str(live), "problem": "changed",
                                         "rule": "a line holding a secret (redacted here) differs"}]
    public = json.dumps(change.public())
    assert "t0ps3cret" not in public and "guessed" not in public and "sha256" not in public
    assert "secret (redacted here) differs" in format_bird_change(change)


@needs_bird
def test_rejected_config_names_the_peer_and_leaves_the_file(tmp_path):
    apply_bird(plan_bird(state(), "node-1", tmp_path, None), tmp_path)
    before = (tmp_path / "bird.conf").read_text()
    bad = replace(state(), bgp_peers=(BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001,
                                              keepalive_time="300s"),))
    named = (r"in protocol Global_198_18_0_254 \(BGPPeer tor\): Keepalive time must be at most"
             r".*old configuration stays live")
    change = plan_bird(bad, "node-1", tmp_path, None)
    with pytest.raises(WeftError, match=named):
        Bird(StateDir(tmp_path)).check((change,))                    # what `weft plan` runs
    with pytest.raises(WeftError, match=named):
        apply_bird(change, tmp_path)
    assert (tmp_path / "bird.conf").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bird.conf"]


def test_a_symlinked_bird_conf_is_refused(tmp_path):
    """The live file is read through the state dir's checks: a link is never followed."""
    secret = tmp_path / "elsewhere"
    secret.write_text("not BIRD's\n")
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "bird.conf").symlink_to(secret)
    with pytest.raises(UnsafeState, match="symbolic link"):
        plan_bird(state(), "node-1", state_dir, None)


@pytest.mark.parametrize("how", ["missing", "hangs"])
def test_bird_failing_to_run_is_one_clear_error(tmp_path, monkeypatch, how):
    fake = tmp_path / "bird"
    fake.write_text("#!/bin/sh\nsleep 5\n")
    fake.chmod(0o755)
    monkeypatch.setattr(probe, "BIRD", str(tmp_path / "nowhere") if how == "missing" else str(fake))
    monkeypatch.setattr(probe, "TIMEOUT", 0.3)
    change = plan_bird(state(), "node-1", tmp_path / "state", None)
    with pytest.raises(WeftError) as info:
        Bird(StateDir(tmp_path / "state")).check((change,))
    message = str(info.value)
    assert "\n" not in message and ("not installed" if how == "missing" else "did not finish") in message


# --- through `weft`, with a running BIRD -----------------------------------------------------

NODE_WITH_BGP = [
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": "n1", "annotations": {"projectcalico.org/IPv4Address": "198.18.0.1/24"}}},
    {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "pool"},
     "spec": {"cidr": "198.18.4.0/22", "blockSize": 26}},
    {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "b"},
     "spec": {"cidr": "198.18.4.0/26", "affinity": "host:n1"}},
    {"apiVersion": "crd.projectcalico.org/v1", "kind": "BGPPeer", "metadata": {"name": "tor"},
     "spec": {"peerIP": "198.18.0.254", "asNumber": 65001, "password": {"secretKeyRef": {"name": "s", "key": "k"}}}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "kube-system"},
     "stringData": {"k": "t0ps3cret"}},
]


@pytest.fixture
def bird_node(tmp_path):
    if (why := nodens.usable()) is not None or shutil.which("bird") is None:
        pytest.skip(why or "needs bird")
    with nodens.node_netns() as ns:
        node = nodens.WeftNode(ns, tmp_path / "state")
        node.src = nodens.write_manifests(tmp_path / "src", NODE_WITH_BGP)
        node.bird = None
        try:
            yield node
        finally:
            if node.bird is not None:
                node.bird.kill()
                node.bird.wait(timeout=10)


def start_bird(node) -> None:
    socket = str(node.state_dir / "bird.ctl")
    node.bird = subprocess.Popen(["ip", "netns", "exec", node.ns, "bird", "-f", "-c", str(node.state_dir / "bird.conf"),
                                  "-s", socket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    for _ in range(250):
        if probe.running(socket):
            return
        time.sleep(0.02)
    raise AssertionError("BIRD did not start")


def test_a_reconfiguration_weft_did_not_make_is_drift(bird_node):
    node = bird_node
    node.weft("apply", from_dir=node.src)
    conf = node.state_dir / "bird.conf"
    assert conf.exists() and oct(conf.stat().st_mode & 0o777) == "0o600"
    start_bird(node)
    node.weft("drift", from_dir=node.src, expect=0)      # BIRD read weft's file when it started
    assert node.weft_json("apply", from_dir=node.src)["commands"] == []
    assert (node.state_dir / "bird-loaded.json").exists(), "weft records BIRD's reconfiguration"

    other = node.state_dir / "other.conf"
    other.write_text(conf.read_text().replace("connect retry time 5;", "connect retry time 50;"))
    done = subprocess.run(["ip", "netns", "exec", node.ns, "birdc", "-s", str(node.state_dir / "bird.ctl"),
                           "configure", f'"{other}"'], capture_output=True, text=True)
    assert "Reconfigur" in done.stdout, done.stdout + done.stderr
    drift = node.weft("drift", "--output", "json", from_dir=node.src, expect=2)
    items = json.loads(drift.stdout)["items"]
    assert [(i["kind"], i["problem"]) for i in items] == [("bird-config", "loaded by someone else")], items
    assert "did not load" in items[0]["rule"]
    repaired = node.weft_json("apply", from_dir=node.src)
    assert any("configure" in c for c in repaired["commands"])
    node.weft("drift", from_dir=node.src, expect=0)

    conf.write_text(conf.read_text().replace("t0ps3cret", "guessed"))     # only a password line
    drift = node.weft("drift", "--output", "json", from_dir=node.src, expect=2)
    assert [i["problem"] for i in json.loads(drift.stdout)["items"]] == ["changed"]
    plan = node.weft("plan", "--output", "json", from_dir=node.src)
    assert "guessed" not in plan.stdout and "t0ps3cret" not in plan.stdout
    node.weft("apply", from_dir=node.src)
    node.weft("drift", from_dir=node.src, expect=0)


def test_a_plan_bird_would_reject_fails_and_nothing_is_applied(bird_node, tmp_path):
    node = bird_node
    bad = NODE_WITH_BGP[:3] + [{"apiVersion": "crd.projectcalico.org/v1", "kind": "BGPPeer",
                                "metadata": {"name": "tor"},
                                "spec": {"peerIP": "198.18.0.254", "asNumber": 65001, "keepaliveTime": "300s"}}]
    src = nodens.write_manifests(tmp_path / "bad", bad)
    plan = node.weft("plan", from_dir=src, expect=1)
    assert "Keepalive time must be at most" in plan.stderr and "BGPPeer tor" in plan.stderr
    assert len(plan.stderr.strip().splitlines()) == 1 and "Traceback" not in plan.stderr
    before = node.state()
    node.weft("apply", from_dir=src, expect=1)
    assert node.state() == before and not (node.state_dir / "bird.conf").exists()
    assert not [p for p in os.listdir(node.state_dir) if p.startswith(".bird.conf")]


def test_invalid_bgp_manifests_are_reported_by_plan(bird_node, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "peer.yaml").write_text(
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: x}\nspec: {peerIP: 1.2.3, asNumber: 1}\n")
    done = bird_node.weft("plan", from_dir=src, expect=1)
    assert "BGPPeer x: spec.peerIP" in done.stderr


def test_bird_state_is_judged_without_a_running_bird(tmp_path):
    """A file that is current and no BIRD: nothing to do (BIRD reads it when it starts)."""
    resource = Bird(StateDir(tmp_path))
    have = BirdState(resource.path, "x", False)
    assert resource.diff(BirdState(resource.path, "x", False), have, {}) == ()
    assert resource.diff(BirdState(resource.path, None, False), have, {}) == ()     # BGP off
    assert resource.diff(BirdState(resource.path, "y", False), have, {})[0].action is Action.UPDATE
