"""The CNI snapshot (store/snapshot.py, renderers/endpoint.py) without a kernel: it is data, the
pod chains the plugin renders from it equal what the reconcile run renders, and what is read
back is checked before anything of it reaches iptables."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from tests.nodens import namespace, pod, policy
from weft.desired.loader import build_cluster_state
from weft.model.cluster import Endpoint, Tier
from weft.renderers.endpoint import endpoint_chains, make_snapshot
from weft.renderers.iptables import policy_chain_name, render_node
from weft.renderers.rules import TABLE
from weft.store import snapshot
from weft.store.statedir import UnsafeState

NODE = "n1"
ALLOW_DB = {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "198.18.0.0/15"}}]}]}
DENY_IN = {"podSelector": {}, "policyTypes": ["Ingress"]}
WEB = {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}


def cluster():
    """Pods on this node and another, policies in two tiers (a `security` tier before `default`)."""
    state = build_cluster_state(("m.yaml", o) for o in [
        namespace("shop"), namespace("open"), namespace("other"),
        pod("shop", "db", "198.18.2.10", {"app": "db"}), pod("shop", "web", "198.18.2.11", {"app": "web"}),
        pod("shop", "elsewhere", "198.18.3.10", {"app": "db"}, node="n2"), pod("open", "o", "198.18.2.12"),
        policy("shop", "allow-db", ALLOW_DB), policy("shop", "deny-in", DENY_IN), policy("shop", "web", WEB),
        policy("other", "deny-in", DENY_IN)])
    security = {"knp.default.deny-in"}
    policies = tuple(replace(p, tier="security", order=5.0) if p.name in security and p.namespace == "shop" else p
                     for p in state.policies)
    return replace(state, policies=policies, tiers={**state.tiers, "security": Tier("security", 10.0)})


def test_pod_chains_from_the_snapshot_equal_the_runs():
    state = cluster()
    dataplane = render_node(state, NODE)
    snap = json.loads(json.dumps(make_snapshot(state, NODE, dataplane, "token")))     # as saved and read
    assert snapshot.check_snapshot(snap) is snap
    local = [ep for ep in state.endpoints if ep.node == NODE]
    assert sorted(snap["pods"]) == sorted(ep.key for ep in local) == ["open/o", "shop/db", "shop/web"]
    assert [len(tiers) for tiers in snap["pods"]["shop/db"].values()] == [1, 2], "egress: 1 tier, ingress: 2"
    for ep in local:
        run = {name: dataplane.chains[(TABLE, name)].rules for name in (f"weft-fw-{ep.iface}", f"weft-tw-{ep.iface}")}
        assert endpoint_chains(snap, ep.namespace, ep.pod, ep.iface) == run, ep.key


def test_a_pod_the_run_did_not_know_is_closed_where_a_policy_might_apply():
    state = cluster()
    snap = make_snapshot(state, NODE, render_node(state, NODE), "token")
    for ns in ("shop", "open", "other", "not-known-yet"):
        newcomer = Endpoint(ns, "new", NODE, f"weftnew{ns[:4]}", ("198.18.2.99",))
        run = render_node(state, NODE, pending=(newcomer,))
        names = (f"weft-fw-{newcomer.iface}", f"weft-tw-{newcomer.iface}")
        assert endpoint_chains(snap, ns, "new", newcomer.iface) == {n: run.chains[(TABLE, n)].rules for n in names}
    assert snap["closed"]["other"] == [False, True] and snap["default"] == [False, False]
    closed = endpoint_chains(None, "open", "new", "weftnone")
    assert all(rules and rules[-1].endswith("-j DROP") for rules in closed.values()), "no snapshot: closed both ways"


def test_policy_chain_names_match_the_pattern_the_snapshot_is_checked_against():
    for p in cluster().policies:
        for direction in ("ingress", "egress"):
            name = policy_chain_name(p, direction.capitalize())
            assert snapshot._CHAINS[direction].fullmatch(name), name
            assert not snapshot._CHAINS["egress" if direction == "ingress" else "ingress"].fullmatch(name)


GOOD = {"format": 2, "node": NODE, "token": "t", "pods": {"a/b": {"egress": [], "ingress": [["weft-pi-abc"]]}},
        "closed": {"a": [False, True]}, "default": [False, False]}
HOSTILE = [
    ({"pods": {"a/b": {"egress": [], "ingress": [["weft-pi-abc -j ACCEPT"]]}}}, "not a weft ingress policy chain"),
    ({"pods": {"a/b": {"egress": [], "ingress": [["weft-po-abc"]]}}}, "not a weft ingress policy chain"),
    ({"pods": {"a/b": {"egress": [["ACCEPT"]], "ingress": []}}}, "not a weft egress policy chain"),
    ({"pods": {"a/b": {"egress": [], "ingress": [[]]}}}, "non-empty list"),
    ({"pods": {"a/b": {"egress": [], "ingress": [], "fw": ["-A weft-fw-x -j ACCEPT"]}}}, "nothing else"),
    ({"pods": {"a/b": {"fw": ["-A weft-fw-x -j ACCEPT"], "tw": []}}}, "nothing else"),
    ({"pods": {"ab": {"egress": [], "ingress": []}}}, "not <namespace>/<pod>"),
    ({"pods": {"a/b": {"egress": [], "ingress": [["weft-pi-a"]] * 101}}}, "at most 100 tiers"),
    ({"closed": {"a": [False]}}, "two booleans"),
    ({"closed": {"a": ["no", True]}}, "two booleans"),
    ({"default": None}, "two booleans"),
    ({"format": 1}, "format 2"),
    ({"token": ["x"]}, "\"token\""),
]


@pytest.mark.parametrize("change, message", HOSTILE, ids=[m for _, m in HOSTILE])
def test_a_snapshot_that_is_not_what_weft_writes_is_refused(tmp_path, capsys, change, message):
    (tmp_path / snapshot.FILE).write_text(json.dumps(GOOD | change))
    os.chmod(tmp_path / snapshot.FILE, 0o600)
    with pytest.raises(snapshot.CorruptSnapshot, match=message):
        snapshot.read_snapshot(tmp_path)
    assert snapshot.load_snapshot(tmp_path) is None, "not used: new pods closed, the next run replaces it"
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "endpoints.snapshot" in err and "closed" in err


def test_the_old_rule_text_snapshot_is_never_read_and_goes_at_the_next_save(tmp_path):
    (tmp_path / snapshot.OLD_FILE).write_text(json.dumps(
        {"format": 1, "pods": {"a/b": {"fw": ["-A weft-fw-x -j ACCEPT"], "tw": []}}, "closed": {}, "default": [1, 1]}))
    assert snapshot.load_snapshot(tmp_path) is None
    snapshot.save_snapshot(tmp_path, GOOD)
    assert snapshot.load_snapshot(tmp_path) == GOOD and not (tmp_path / snapshot.OLD_FILE).exists()
    assert (tmp_path / snapshot.FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        snapshot.save_snapshot(tmp_path, GOOD | {"default": "open"})     # weft never writes what it refuses


def test_a_linked_or_foreign_snapshot_is_not_trusted(tmp_path):
    victim = tmp_path / "elsewhere.json"
    victim.write_text(json.dumps(GOOD))
    (tmp_path / snapshot.FILE).symlink_to(victim)
    with pytest.raises(UnsafeState, match="symbolic link"):
        snapshot.load_snapshot(tmp_path)
    (tmp_path / snapshot.FILE).unlink()
    snapshot.save_snapshot(tmp_path, GOOD)
    os.chown(tmp_path / snapshot.FILE, 65534, 65534)
    with pytest.raises(UnsafeState, match="belongs to uid 65534"):
        snapshot.load_snapshot(tmp_path)
    assert victim.read_text() == json.dumps(GOOD)
