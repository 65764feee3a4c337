"""plan_bird / apply_bird / format / drift without a running BIRD: the file is written and checked,
the reload skipped and said so; passwords never leave the file; BGP off means hands off."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from weft.model.cluster import BGPPeer, Block, ClusterState, IPPool, Node, NodeBGP, Secret, SecretKeyRef
from weft.model.errors import WeftError
from weft.reconciler.bird import CREATE, UPDATE, apply_bird, bird_drift_items, format_bird_change, main, plan_bird

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
    assert (change.action, change.reload, change.old) == (CREATE, False, None)
    assert "BIRD is not running" in change.note and change.socket == str(tmp_path / "bird.ctl")
    text = format_bird_change(change)
    assert "+ bird " in text and "t0ps3cret" not in text and '"(redacted)"' in text
    assert "t0ps3cret" not in json.dumps(change.public()) and "t0ps3cret" in change.new
    assert bird_drift_items(change) == [{"kind": "bird-config", "name": str(tmp_path / "bird.conf"),
                                         "problem": "missing"}]
    commands = apply_bird(change, None)
    assert commands == [f"bird -p -c {tmp_path / '.bird.conf.new'}"]             # no birdc: nothing to reload
    live = tmp_path / "bird.conf"
    assert live.read_text() == change.new and live.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bird.conf"]
    assert plan_bird(state(), "node-1", tmp_path, None) is None                  # second run: nothing


@needs_bird
def test_update_is_a_diff_and_drift_names_lines(tmp_path):
    apply_bird(plan_bird(state(), "node-1", tmp_path, None), None)
    moved = replace(state(), blocks=(Block("198.18.4.64/26", "node-1"),))
    change = plan_bird(moved, "node-1", tmp_path, None)
    assert change.action == UPDATE
    text = format_bird_change(change)
    assert "-  route 198.18.4.0/26 blackhole;" in text.replace("      ", "")
    assert "+  route 198.18.4.64/26 blackhole;" in text.replace("      ", "")
    problems = {(i["problem"], i["rule"].strip()) for i in bird_drift_items(change)}
    assert ("missing", "route 198.18.4.64/26 blackhole;") in problems
    assert ("unexpected", "route 198.18.4.0/26 blackhole;") in problems


@needs_bird
def test_rejected_config_names_the_peer_and_leaves_the_file(tmp_path):
    apply_bird(plan_bird(state(), "node-1", tmp_path, None), None)
    before = (tmp_path / "bird.conf").read_text()
    bad = replace(state(), bgp_peers=(BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001,
                                              keepalive_time="300s"),))
    named = r"in protocol Global_198_18_0_254 \(BGPPeer tor\): Keepalive time must be at most"
    with pytest.raises(WeftError, match=named):
        apply_bird(plan_bird(bad, "node-1", tmp_path, None), None)
    assert (tmp_path / "bird.conf").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bird.conf"]


def test_module_main_reports_invalid_manifests(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "peer.yaml").write_text(
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: x}\nspec: {peerIP: 1.2.3, asNumber: 1}\n")
    code = main(["--from", str(tmp_path / "m"), "--node", "node-1", "--state-dir", str(tmp_path / "s")])
    assert code == 1 and "BGPPeer x: spec.peerIP" in capsys.readouterr().err
