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
from weft.renderers.rules import FAMILY_TABLES, TABLE
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
        pod("shop", "db", "198.18.2.10", {"app": "db"}, ip6="2001:db8:2::10"),
        pod("shop", "web", "198.18.2.11", {"app": "web"}),
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
    db = snap["pods"]["shop/db"]
    assert [len(db["egress"]), len(db["ingress"])] == [1, 2], "egress: 1 tier, ingress: 2"
    assert {key: pod["families"] for key, pod in snap["pods"].items()} == \
        {"shop/db": [4, 6], "shop/web": [4], "open/o": [4]}, "a family's table holds the pods with its addresses"
    for ep in local:
        for family in snap["pods"][ep.key]["families"]:
            table = FAMILY_TABLES[family]
            run = {name: dataplane.chains[(table, name)].rules
                   for name in (f"weft-fw-{ep.iface}", f"weft-tw-{ep.iface}")}
            assert endpoint_chains(snap, ep.namespace, ep.pod, ep.iface, family) == run, (ep.key, family)


def test_a_family_the_run_did_not_put_a_pod_in_is_closed_where_a_policy_might_apply():
    """shop/web had only an IPv4 address when the run rendered: given an IPv6 one by the plugin
    now, its IPv6 chains are those of a pod the run did not know (the IPv6 table has no chains of
    its policies to jump to)."""
    state = cluster()
    snap = make_snapshot(state, NODE, render_node(state, NODE), "token")
    web = next(ep for ep in state.endpoints if ep.key == "shop/web")
    chains = endpoint_chains(snap, "shop", "web", web.iface, 6)
    assert snap["closed"]["shop"] == [True, True] and [len(rules) for rules in chains.values()] == [1, 1]
    assert all(rules[-1].endswith("-j DROP") for rules in chains.values()), "shop has policies both ways: closed"
    assert endpoint_chains(snap, "shop", "web", web.iface, 4) != chains, "IPv4: the policies the run rendered"


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


F = {"families": [4, 6]}
GOOD = {"format": 3, "node": NODE, "token": "t", "pods": {"a/b": {"egress": [], "ingress": [["weft-pi-abc"]], **F}},
        "closed": {"a": [False, True]}, "default": [False, False]}
HOSTILE = [
    ({"pods": {"a/b": {"egress": [], "ingress": [["weft-pi-abc -j ACCEPT"]], **F}}}, "not a weft ingress policy chain"),
    ({"pods": {"a/b": {"egress": [], "ingress": [["weft-po-abc"]], **F}}}, "not a weft ingress policy chain"),
    ({"pods": {"a/b": {"egress": [["ACCEPT"]], "ingress": [], **F}}}, "not a weft egress policy chain"),
    ({"pods": {"a/b": {"egress": [], "ingress": [[]], **F}}}, "non-empty list"),
    ({"pods": {"a/b": {"egress": [], "ingress": [], "fw": ["-A weft-fw-x -j ACCEPT"], **F}}}, "nothing else"),
    ({"pods": {"a/b": {"fw": ["-A weft-fw-x -j ACCEPT"], "tw": []}}}, "nothing else"),
    ({"pods": {"a/b": {"egress": [], "ingress": []}}}, "nothing else"),
    ({"pods": {"ab": {"egress": [], "ingress": [], **F}}}, "not <namespace>/<pod>"),
    ({"pods": {"a/b": {"egress": [], "ingress": [["weft-pi-a"]] * 101, **F}}}, "at most 100 tiers"),
    ({"pods": {"a/b": {"egress": [], "ingress": [], "families": [6, 4]}}}, "families"),
    ({"pods": {"a/b": {"egress": [], "ingress": [], "families": [4.0]}}}, "families"),
    ({"pods": {"a/b": {"egress": [], "ingress": [], "families": []}}}, "families"),
    ({"pods": {"a/b": {"egress": [], "ingress": [], "families": "4"}}}, "families"),
    ({"closed": {"a": [False]}}, "two booleans"),
    ({"closed": {"a": ["no", True]}}, "two booleans"),
    ({"default": None}, "two booleans"),
    ({"format": 4}, "format 3"),
    ({"format": 1}, "format 3"),
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


def test_a_format_2_snapshot_from_before_ipv6_reads_as_ipv4_only(tmp_path):
    """A node upgraded from a weft that enforced IPv4 only keeps its last run's snapshot usable
    until the next run: its pods' policies are known in the IPv4 table (an IPv6 address of a
    new pod is then treated as unknown: closed where a policy might apply)."""
    old = {**GOOD, "format": 2, "pods": {"a/b": {"egress": [], "ingress": [["weft-pi-abc"]]}}}
    (tmp_path / snapshot.FILE).write_text(json.dumps(old))
    os.chmod(tmp_path / snapshot.FILE, 0o600)
    assert snapshot.read_snapshot(tmp_path)["pods"]["a/b"]["families"] == [4]


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
