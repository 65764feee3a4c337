"""The reconcile contract on a real kernel: idempotence, drift and its repair, saved plans,
removal, failed applies, both iptables backends, and the node lock.

Each test gets a bare node network namespace (tests/nodens.py) and runs the real `weft`
command inside it; what is compared is the kernel's own state (iptables-save, ipset save),
never weft's idea of it. Pods need not exist: no traffic is sent here (test_connectivity.py
does that).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import nodens
from tests.nodens import (
    REPO,
    WeftNode,
    chain_rules,
    describe,
    iptables_save,
    namespace,
    pod,
    policy,
    run_weft,
    start_weft,
    weft_names,
    write_manifests,
)
from weft.model.names import host_iface_name

if (why := nodens.usable()) is not None:
    pytest.skip(why, allow_module_level=True)

node_ns = nodens.node_ns
ZERO = {"add": 0, "change": 0, "destroy": 0}

# --- desired states --------------------------------------------------------------------------

CLUSTER = [
    namespace("alpha", team="a"),
    namespace("beta", team="b"),
    pod("alpha", "web", "198.18.0.10", {"app": "web"}, ports=(("http", 80, "TCP"), ("dns", 53, "UDP"))),
    pod("alpha", "db", "198.18.0.11", {"app": "db"}, ports=(("pg", 5432, "TCP"),)),
    pod("alpha", "client", "198.18.0.12", {"app": "client"}),
    pod("beta", "client", "198.18.0.20", {"app": "client"}),
    pod("beta", "web", "198.18.0.21", {"app": "web"}, ports=(("http", 8080, "TCP"), ("chat", 9000, "SCTP"))),
    pod("alpha", "far", "198.18.1.10", {"app": "client"}, node="n2"),
]
LOCAL_PODS = [("alpha", "web"), ("alpha", "db"), ("alpha", "client"), ("beta", "client"), ("beta", "web")]

ALLOW_WEB = policy("alpha", "allow-web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}},
                          {"namespaceSelector": {"matchLabels": {"team": "b"}}}],
                 "ports": [{"protocol": "TCP", "port": 80}, {"port": "http"}]}],
})
DB_FROM_WEB = policy("alpha", "db-from-web", {
    "podSelector": {"matchLabels": {"app": "db"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "pg"}]}],
})
BETA_EGRESS = policy("beta", "egress-limit", {
    "podSelector": {},
    "policyTypes": ["Egress"],
    "egress": [
        {"to": [{"ipBlock": {"cidr": "198.18.0.0/15", "except": ["198.18.1.0/24"]}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 1000, "endPort": 2000}]},
        {"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}, {"protocol": "SCTP", "port": "chat"}]},
    ],
})
BETA_DENY_INGRESS = policy("beta", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})
MANY_PORTS = policy("beta", "many-ports", {      # more than multiport's 15 ports in one rule: split
    "podSelector": {"matchLabels": {"app": "client"}},
    "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/16"}}],
                 "ports": [{"port": p} for p in range(7000, 7018)]
                 + [{"port": 8000 + 100 * i, "endPort": 8050 + 100 * i} for i in range(4)]
                 + [{"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 9000, "endPort": 9010}]}],
})
POLICIES = [ALLOW_WEB, DB_FROM_WEB, BETA_EGRESS, BETA_DENY_INGRESS, MANY_PORTS]


def applied(node_ns: str, tmp_path: Path, objects: list[dict], backend: str | None = None) -> tuple:
    """A node with `objects` applied: (node, source dir, kernel state after the first apply)."""
    src = write_manifests(tmp_path / "src", objects)
    node = WeftNode(node_ns, tmp_path / "state", backend)
    first = node.weft_json("apply", from_dir=src)
    assert first["commands"], "the first apply on a bare node must write to the kernel"
    return node, src, node.state()


def drift_items(node: WeftNode, src: Path) -> tuple[set, str]:
    """(items of `drift --output json` as (kind, name, problem, detail) tuples, drift's text)."""
    as_json = node.weft("drift", "--output", "json", from_dir=src, expect=2)
    text = node.weft("drift", from_dir=src, expect=2).stdout
    doc = json.loads(as_json.stdout)
    assert doc["drifted"] is True and doc["format_version"] == 1
    items = {(i["kind"], i["name"], i["problem"], i.get("rule") or i.get("member")) for i in doc["items"]}
    assert len(items) == len(doc["items"]), "drift listed an item twice"
    return items, text


def weft_sets(node: WeftNode, prefix: str = "weft-") -> list[str]:
    return sorted(n for n in node.sh("ipset", "list", "-n").split() if n.startswith(prefix))


def weft_chains(node: WeftNode, prefix: str = "weft-") -> list[str]:
    return sorted(ln[1:].split()[0] for ln in node.save().splitlines() if ln.startswith(f":{prefix}"))


def hook_lines(node: WeftNode, chain: str) -> list[str]:
    return chain_rules(node.ns, chain, node.backend or "nft")


# --- idempotence and the whole cycle, on both backends ----------------------------------------

@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_cycle_apply_idempotent_drift_destroy(node_ns, tmp_path, backend):
    node, src, first = applied(node_ns, tmp_path, CLUSTER + POLICIES, backend)
    other = "legacy" if backend == "nft" else "nft"
    assert ":weft-FORWARD" in iptables_save(node_ns, backend)
    assert "weft" not in iptables_save(node_ns, other), f"weft wrote to the {other} backend"

    again = node.weft_json("apply", from_dir=src)
    assert again["commands"] == [] and again["summary"] == ZERO and again["backend"] == backend
    node.weft("plan", "--detailed-exitcode", from_dir=src, expect=0)
    assert "No drift" in node.weft("drift", from_dir=src, expect=0).stdout
    assert node.state() == first

    rule = hook_lines(node, "weft-FORWARD")[2]
    node.sh(node.iptables, "-D", "weft-FORWARD", "3")
    items, _ = drift_items(node, src)
    assert items == {("rule", "filter/weft-FORWARD", "missing", rule)}
    node.weft("apply", from_dir=src)
    node.weft("drift", from_dir=src, expect=0)
    assert node.state() == first

    node.weft("apply", "--destroy")
    assert weft_names(node_ns) == []
    node.weft("plan", "--destroy", "--detailed-exitcode", expect=0)
    node.weft("plan", "--detailed-exitcode", from_dir=src, expect=2)


def test_auto_backend_keeps_using_legacy(node_ns, tmp_path):
    legacy, src, first = applied(node_ns, tmp_path, CLUSTER + POLICIES, "legacy")
    auto = WeftNode(node_ns, legacy.state_dir, None)
    plan = auto.weft_json("plan", from_dir=src)
    assert plan["backend"] == "legacy" and plan["summary"] == ZERO
    assert auto.weft_json("apply", from_dir=src)["commands"] == []

    legacy.sh("iptables-legacy", "-F", "weft-FORWARD")
    auto.weft("drift", from_dir=src, expect=2)
    repair = auto.weft_json("apply", from_dir=src)
    assert repair["backend"] == "legacy"
    assert [c for c in repair["commands"] if "iptables" in c] == ["iptables-legacy-restore --noflush -w 5"]
    assert "weft" not in iptables_save(node_ns, "nft")
    assert auto.state() == first


def test_switching_backend_moves_weft_rules(node_ns, tmp_path):
    """apply with nft, then with legacy: the nft copy of weft's chains (still hooked into FORWARD
    and INPUT, still filtering every packet) is removed by the legacy run, not left behind."""
    nft, src, _ = applied(node_ns, tmp_path, CLUSTER + POLICIES, "nft")
    WeftNode(node_ns, nft.state_dir, "legacy").weft("apply", from_dir=src)
    assert ":weft-FORWARD" not in iptables_save(node_ns, "nft") and "weft-" not in iptables_save(node_ns, "nft")
    assert ":weft-FORWARD" in iptables_save(node_ns, "legacy")
    auto = WeftNode(node_ns, nft.state_dir, None)
    auto.weft("drift", from_dir=src, expect=0)
    auto.weft("apply", "--destroy")
    assert weft_names(node_ns) == []


def test_weft_rules_left_in_the_other_backend_are_not_ignored(node_ns, tmp_path):
    """weft's chains found in the backend this run does not use (copied there by hand: a crash
    between two backends, an old node image) are weft's: drift names them, apply removes them."""
    legacy, src, _ = applied(node_ns, tmp_path, CLUSTER + POLICIES, "legacy")
    leftover = "\n".join(ln for ln in iptables_save(node_ns, "legacy").splitlines() if not ln.startswith("#")) + "\n"
    subprocess.run(["ip", "netns", "exec", node_ns, "iptables-nft-restore", "--noflush"], input=leftover,
                   text=True, check=True)
    assert ":weft-FORWARD" in iptables_save(node_ns, "nft")
    auto = WeftNode(node_ns, legacy.state_dir, None)
    drift = auto.weft("drift", from_dir=src, expect=None)
    assert drift.returncode == 2, "weft's rules in the nft backend are not reported:\n" + describe(drift)
    assert "filter@nft/weft-FORWARD" in drift.stdout
    auto.weft("apply", from_dir=src)
    assert "weft-" not in iptables_save(node_ns, "nft")
    auto.weft("drift", from_dir=src, expect=0)
    auto.weft("apply", "--destroy")
    assert weft_names(node_ns) == []


# --- drift: detected item by item, repaired --------------------------------------------------

def tamper_delete_rule(node: WeftNode) -> set:
    rule = hook_lines(node, "weft-FORWARD")[2]
    node.sh(node.iptables, "-D", "weft-FORWARD", "3")
    return {("rule", "filter/weft-FORWARD", "missing", rule)}


def tamper_add_member(node: WeftNode) -> set:
    name = weft_sets(node, "weft-s-")[0]
    node.sh("ipset", "add", name, "198.18.200.200")
    return {("ipset-member", name, "unexpected", "198.18.200.200")}


def tamper_flush_chain(node: WeftNode) -> set:
    chain = f"weft-tw-{host_iface_name('alpha', 'web')}"
    rules = hook_lines(node, chain)
    assert rules, f"{chain} should have rules (alpha/web is selected by a policy)"
    node.sh(node.iptables, "-F", chain)
    return {("rule", f"filter/{chain}", "missing", r) for r in rules}


def tamper_foreign_rule(node: WeftNode) -> set:
    chain = weft_chains(node, "weft-pi-")[0]
    node.sh(node.iptables, "-I", chain, "1", "-s", "198.18.9.9/32", "-j", "ACCEPT")
    rule = f"-A {chain} -s 198.18.9.9/32 -j ACCEPT"
    assert rule in hook_lines(node, chain)
    return {("rule", f"filter/{chain}", "unexpected", rule)}


TAMPERS = {
    "delete-rule": [tamper_delete_rule],
    "add-member": [tamper_add_member],
    "flush-chain": [tamper_flush_chain],
    "foreign-rule": [tamper_foreign_rule],
    "all-four": [tamper_delete_rule, tamper_add_member, tamper_flush_chain, tamper_foreign_rule],
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_drift_is_reported_and_repaired(node_ns, tmp_path, case):
    node, src, first = applied(node_ns, tmp_path, CLUSTER + POLICIES)
    expected = set().union(*(tamper(node) for tamper in TAMPERS[case]))
    items, text = drift_items(node, src)
    assert items == expected
    for _kind, name, problem, detail in expected:
        assert name in text and detail in text and problem in text, f"drift's text misses {name} {detail}"

    node.weft("apply", from_dir=src)
    node.weft("drift", from_dir=src, expect=0)
    assert node.state() == first


def _jump(node: WeftNode, builtin: str) -> str:
    jumps = [r for r in hook_lines(node, builtin) if f"-j weft-{builtin}" in r]
    assert len(jumps) == 1
    return jumps[0]


FOREIGN_TOP = "-A FORWARD -s 198.18.9.9/32 -j ACCEPT"


@pytest.mark.parametrize("case", ["delete-jump", "delete-input-jump", "foreign-rule-on-top", "duplicate-jump",
                                  "foreign-on-top-and-duplicate"])
def test_hook_drift_is_repaired_around_foreign_rules(node_ns, tmp_path, case):
    node, src, first = applied(node_ns, tmp_path, CLUSTER + POLICIES)
    jump, input_jump = _jump(node, "FORWARD"), _jump(node, "INPUT")
    assert hook_lines(node, "FORWARD")[0] == jump and hook_lines(node, "INPUT")[0] == input_jump
    expected = None
    if case == "delete-jump":
        node.sh(node.iptables, "-D", "FORWARD", "1")
        expected = {("hook", "filter/FORWARD", "missing", jump)}
    elif case == "delete-input-jump":
        node.sh(node.iptables, "-D", "INPUT", "1")
        expected = {("hook", "filter/INPUT", "missing", input_jump)}
    if "foreign" in case:
        node.sh(node.iptables, "-I", "FORWARD", "1", *shlex.split(FOREIGN_TOP)[2:])
        expected = {("hook", "filter/FORWARD", "not first in chain", jump)}
    if "duplicate" in case:
        node.sh(node.iptables, "-A", "FORWARD", *shlex.split(jump)[2:])
        expected = (expected or set()) | {("hook", "filter/FORWARD", "unexpected", jump)}
    foreign_before = node.state()["nft"]["foreign"]

    items, text = drift_items(node, src)
    assert items == expected
    assert all(name in text for _, name, _, _ in items)

    node.weft("apply", from_dir=src)
    node.weft("drift", from_dir=src, expect=0)
    forward = hook_lines(node, "FORWARD")
    assert forward[0] == jump and sum("weft" in r for r in forward) == 1
    assert hook_lines(node, "INPUT")[0] == input_jump and sum("weft" in r for r in hook_lines(node, "INPUT")) == 1
    if "foreign" in case:
        assert forward == [jump, FOREIGN_TOP]
    after = node.state()
    assert after["nft"]["foreign"] == foreign_before, "weft changed a rule it does not own"
    assert nodens.weft_part(after) == nodens.weft_part(first)


def test_unexpected_weft_set_is_destroyed(node_ns, tmp_path):
    node, src, first = applied(node_ns, tmp_path, CLUSTER + POLICIES)
    node.sh("ipset", "create", "weft-s-bogus", "hash:ip")
    node.sh("ipset", "add", "weft-s-bogus", "198.18.3.3")
    node.sh("ipset", "create", "foreign-set", "hash:ip")
    items, text = drift_items(node, src)
    assert items == {("ipset", "weft-s-bogus", "unexpected", None)} and "weft-s-bogus" in text
    node.weft("apply", from_dir=src)
    assert "weft-s-bogus" not in weft_sets(node) and "foreign-set" in node.sh("ipset", "list", "-n").split()
    node.weft("drift", from_dir=src, expect=0)
    assert nodens.weft_part(node.state()) == nodens.weft_part(first)


def test_unreferenced_set_of_wrong_type_is_replaced(node_ns, tmp_path):
    """A set with a weft name but the wrong type, that no rule uses yet: apply replaces it."""
    src = write_manifests(tmp_path / "src", CLUSTER + POLICIES)
    node = WeftNode(node_ns, tmp_path / "state")
    wanted = node.weft_json("plan", from_dir=src)["changes"]["ipsets"]
    name = sorted(s["name"] for s in wanted if s["type"] == "hash:ip")[0]
    node.sh("ipset", "create", name, "hash:net")
    node.sh("ipset", "add", name, "198.18.128.0/24")
    plan = node.weft_json("plan", from_dir=src)["changes"]["ipsets"]
    assert [s["action"] for s in plan if s["name"] == name] == ["replace"]
    node.weft("apply", from_dir=src)
    node.weft("drift", from_dir=src, expect=0)
    assert f"create {name} hash:ip" in node.sh("ipset", "save", name)
    assert "198.18.128.0/24" not in node.sh("ipset", "save", name)
    assert [n for n in weft_sets(node) if n.startswith("weft-t-")] == [], "the set put aside was left behind"


def _swap_set_type(node: WeftNode, name: str, new_type: str) -> None:
    """Recreate weft set `name` with another type, with weft's rules referring to it exactly as
    before (what an older weft that used another type for this set would have left)."""
    save = node.save().splitlines()
    users = sorted({ln.split()[1] for ln in save if ln.startswith("-A ") and f"--match-set {name} " in ln})
    assert users, f"no weft rule uses {name}"
    lines = [ln for ln in save if ln.startswith("-A ") and ln.split()[1] in users]
    for chain in users:
        node.sh(node.iptables, "-F", chain)
    node.sh("ipset", "destroy", name)
    node.sh("ipset", "create", name, new_type)
    node.sh(f"{node.iptables}-restore", "--noflush", stdin="*filter\n" + "\n".join(lines) + "\nCOMMIT\n")
    assert [ln for ln in node.save().splitlines() if not ln.startswith("#")] == \
        [ln for ln in save if not ln.startswith("#")], "the rules did not come back as they were"


def test_referenced_set_of_wrong_type_is_replaced(node_ns, tmp_path):
    """weft's rules use a weft set that has the wrong type: drift says so, and apply must bring
    the node back to the desired state (a set of the right type, the rules using it)."""
    node, src, first = applied(node_ns, tmp_path, CLUSTER + POLICIES)
    first_portable = node.state(portable=True)
    name = weft_sets(node, "weft-s-")[0]
    _swap_set_type(node, name, "hash:net")
    items, text = drift_items(node, src)
    assert items == {("ipset", name, "wrong type (want hash:ip)", None)} and name in text

    repair = node.weft("apply", from_dir=src, expect=None)
    assert repair.returncode == 0, describe(repair)
    node.weft("drift", from_dir=src, expect=0)
    assert f"create {name} hash:ip" in node.sh("ipset", "save", name)
    assert nodens.weft_part(node.state(portable=True)) == nodens.weft_part(first_portable)


# --- saved plans -----------------------------------------------------------------------------

def test_saved_plan_is_refused_when_stale_or_for_another_node(node_ns, tmp_path):
    node, src, _ = applied(node_ns, tmp_path, CLUSTER + [ALLOW_WEB])
    src2 = write_manifests(tmp_path / "src2", CLUSTER + POLICIES)
    plan_file = tmp_path / "plan.json"
    shown = node.weft_json("plan", "--out", str(plan_file), from_dir=src2)
    saved = json.loads(plan_file.read_text())
    assert saved["format_version"] == 2 and shown["format_version"] == 2
    assert saved["summary"] == shown["summary"] and saved["summary"]["add"] > 0
    assert set(saved["summary"]) == {"add", "change", "destroy"} and saved["node"] == "n1"
    assert saved["state_dir"] == str(node.state_dir) and saved["source"] == {"manifests": str(src2)}

    node.sh("ipset", "add", weft_sets(node, "weft-s-")[0], "198.18.200.1")
    tampered = node.state()
    stale = node.weft("apply", str(plan_file), from_dir=src2, expect=1)
    assert "stale" in stale.stderr and "kernel state changed" in stale.stderr, describe(stale)
    assert len(stale.stderr.strip().splitlines()) == 1, "one clear line"
    assert node.state() == tampered, "a refused plan changed the kernel"

    fresh = tmp_path / "fresh.json"
    node.weft("plan", "--out", str(fresh), from_dir=src2)
    (node.state_dir / "endpoints.snapshot").unlink()
    node.weft("apply", str(fresh), from_dir=src2)
    node.weft("drift", from_dir=src2, expect=0)
    assert (node.state_dir / "endpoints.snapshot").exists(), "apply PLAN leaves the CNI plugin its snapshot too"

    other = tmp_path / "other.json"
    node.weft("plan", "--out", str(other), from_dir=src, node="other-node")
    before = node.state()
    wrong = node.weft("apply", str(other), from_dir=src, expect=1)
    assert "other-node" in wrong.stderr
    elsewhere = node.weft("apply", str(fresh), expect=1)              # the plan is of --from src2
    assert "desired-state source" in elsewhere.stderr and str(src2) in elsewhere.stderr
    state_dir2 = tmp_path / "state2"
    moved = run_weft(node_ns, "apply", str(fresh), state_dir=state_dir2, from_dir=src2)
    assert moved.returncode == 1 and "state dir" in moved.stderr, describe(moved)
    assert node.state() == before

    nothing = tmp_path / "nothing.json"
    node.weft("plan", "--out", str(nothing), from_dir=src2)
    assert json.loads(nothing.read_text())["summary"] == ZERO
    result = node.weft_json("apply", str(nothing), from_dir=src2)
    assert result["commands"] == [] and node.state() == before


def _hostile(doc: dict, edit: str, canary: Path) -> dict:
    """A saved plan edited to make weft write what it does not own (issue #9.1's attacks)."""
    changes = doc["changes"]
    if edit == "nat-dnat":
        changes["chains"].append({"table": "nat", "name": "weft-evil", "action": "create", "about": "",
                                  "rules": ["-A weft-evil -p tcp -j DNAT --to-destination 198.18.9.9:22"],
                                  "previous": [], "releases": []})
    elif edit == "input-accept":
        changes["hooks"].append({"table": "filter", "chain": "INPUT", "action": "update", "previous_at_top": True,
                                 "rules": ["-A INPUT -j ACCEPT"], "previous": []})
    elif edit == "foreign-chain":
        changes["chains"].append({"table": "filter", "name": "KUBE-SERVICES", "action": "delete", "about": "",
                                  "rules": [], "previous": [], "releases": []})
    elif edit == "extra-ipset":
        changes["ipsets"].append({"name": "foo", "action": "create", "type": "hash:ip", "family": "inet",
                                  "add": ["198.18.9.9"], "remove": [], "about": ""})
    elif edit == "sysctl-path":
        changes["links"].append({"iface": "weftx", "action": "update", "about": "",
                                 "sysctls": [[f"../../..{canary}", "1"]], "previous": [[f"../../..{canary}", ""]]})
    elif edit == "default-route":
        changes["routes"].append({"dst": "0.0.0.0/0", "action": "create", "dev": "lo", "type": "unicast",
                                  "previous_dev": None, "previous_type": None, "about": ""})
    doc["summary"]["add"] += 1
    return doc


@pytest.mark.parametrize("edit", ["nat-dnat", "input-accept", "foreign-chain", "extra-ipset", "sysctl-path",
                                  "default-route"])
def test_an_edited_saved_plan_is_refused_and_the_kernel_stays_byte_identical(node_ns, tmp_path, edit):
    """#9.1: a saved plan is intent, re-derived: an edit makes it differ from what weft would do,
    so nothing runs (the guard would refuse each of these writes too: tests/test_guard.py)."""
    node, src, _ = applied(node_ns, tmp_path, CLUSTER + [ALLOW_WEB])
    src2 = write_manifests(tmp_path / "src2", CLUSTER + POLICIES)
    plan_file = tmp_path / "plan.json"
    node.weft("plan", "--out", str(plan_file), from_dir=src2)
    canary = tmp_path / "canary"
    plan_file.write_text(json.dumps(_hostile(json.loads(plan_file.read_text()), edit, canary)))
    before = node.state(), node.sh("ip", "-d", "route", "show", "table", "all")
    refused = node.weft("apply", str(plan_file), from_dir=src2, expect=1)
    assert "stale" in refused.stderr and "nothing was applied" in refused.stderr, describe(refused)
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert (node.state(), node.sh("ip", "-d", "route", "show", "table", "all")) == before
    assert not canary.exists()


@pytest.mark.parametrize("content, named", [
    ('{"format_version": 1, "node": "n1"}', "format_version 2"),
    ("[" * 100_000, "not a weft plan"),
    ('{"format_version": 2, "node": "n1", "state_dir": 3}', "field 'state_dir'"),
    ("not json", "not JSON"),
])
def test_a_malformed_saved_plan_is_a_clear_error(node_ns, tmp_path, content, named):
    node, src, first = applied(node_ns, tmp_path, CLUSTER)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(content)
    refused = node.weft("apply", str(plan_file), from_dir=src, expect=1)
    assert named in refused.stderr and "Traceback" not in refused.stderr, describe(refused)
    assert node.state() == first


# --- removal ---------------------------------------------------------------------------------

def test_removing_policies_then_destroy(node_ns, tmp_path):
    node, _, _ = applied(node_ns, tmp_path, CLUSTER + POLICIES)
    assert weft_chains(node, "weft-pi-") and weft_sets(node)
    no_policies = write_manifests(tmp_path / "none", CLUSTER)
    node.weft("apply", from_dir=no_policies)
    node.weft("drift", from_dir=no_policies, expect=0)

    assert weft_chains(node, "weft-pi-") == [] and weft_chains(node, "weft-po-") == []
    assert weft_sets(node) == []
    expected = {"weft-FORWARD", "weft-INPUT", "weft-from-wl-dispatch", "weft-to-wl-dispatch"}
    expected |= {f"weft-{kind}-{host_iface_name(ns, name)}" for ns, name in LOCAL_PODS for kind in ("tw", "fw")}
    assert set(weft_chains(node)) == expected
    for builtin in ("FORWARD", "INPUT"):
        rules = hook_lines(node, builtin)
        assert len(rules) == 1 and rules[0].endswith(f"-j weft-{builtin}")

    node.weft("apply", "--destroy")
    assert weft_names(node_ns) == []
    node.weft("plan", "--destroy", "--detailed-exitcode", expect=0)


# --- a failed apply leaves the last good state ------------------------------------------------

def test_failed_apply_leaves_the_previous_state(node_ns, tmp_path):
    node, src, _ = applied(node_ns, tmp_path, CLUSTER + POLICIES)
    chains_now = weft_chains(node, "weft-pi-")
    doomed = _policy_chain(node, tmp_path, "db-from-web", chains_now)

    # The next state: db-from-web goes (its chain must be deleted), a new pod joins an existing
    # set, a new policy needs a new set.
    newcomer = pod("alpha", "client2", "198.18.0.13", {"app": "client"})
    new_policy = policy("alpha", "new-one", {
        "podSelector": {"matchLabels": {"app": "client"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "fresh"}}}]}]})
    src2 = write_manifests(tmp_path / "src2", CLUSTER + [newcomer, ALLOW_WEB, BETA_EGRESS, BETA_DENY_INGRESS,
                                                         new_policy])
    change = node.weft_json("plan", from_dir=src2)["changes"]
    actions = {s["action"] for s in change["ipsets"]}
    assert {"create", "update", "delete"} <= actions, change["ipsets"]
    assert any(c["name"] == doomed and c["action"] == "delete" for c in change["chains"])

    node.sh(node.iptables, "-N", "FOREIGN")
    node.sh(node.iptables, "-A", "FOREIGN", "-j", doomed)
    before = node.state()
    failed = node.weft("apply", from_dir=src2, expect=1)
    assert "iptables-nft-restore" in failed.stderr and doomed in failed.stderr, describe(failed)
    assert node.state() == before, "a failed apply must leave iptables and ipsets as they were"

    node.sh(node.iptables, "-F", "FOREIGN")
    node.sh(node.iptables, "-X", "FOREIGN")
    node.weft("apply", from_dir=src2)
    node.weft("drift", from_dir=src2, expect=0)
    assert doomed not in weft_chains(node)


def _policy_chain(node: WeftNode, tmp_path: Path, policy_name: str, candidates: list[str]) -> str:
    """The weft-pi chain of one policy: the chain that disappears when only that policy is dropped
    (asked of weft's own plan, not computed from its internals)."""
    without = write_manifests(tmp_path / f"without-{policy_name}",
                              CLUSTER + [p for p in POLICIES if p["metadata"]["name"] != policy_name])
    changes = node.weft_json("plan", from_dir=without)["changes"]["chains"]
    gone = [c["name"] for c in changes if c["action"] == "delete" and c["name"] in candidates]
    assert len(gone) == 1, changes
    return gone[0]


# --- the lock ------------------------------------------------------------------------------

def test_simultaneous_applies_are_serialised(node_ns, tmp_path):
    src = write_manifests(tmp_path / "src", CLUSTER + POLICIES)
    node = WeftNode(node_ns, tmp_path / "state")
    for round_ in range(3):
        procs = [start_weft(node_ns, "apply", "--output", "json", state_dir=node.state_dir, from_dir=src)
                 for _ in range(2)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"round {round_}: exit {proc.returncode}: {err}"
            results.append(json.loads(out))
        assert sorted(bool(r["commands"]) for r in results) == [False, True], \
            "exactly one of two overlapping runs should have had work to do"
        node.weft("drift", from_dir=src, expect=0)
        assert len([r for r in hook_lines(node, "FORWARD") if "weft" in r]) == 1
        node.weft("apply", "--destroy")


def test_apply_waits_for_the_lock(node_ns, tmp_path):
    src = write_manifests(tmp_path / "src", CLUSTER + POLICIES)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with held_lock(state_dir):
        proc = start_weft(node_ns, "apply", state_dir=state_dir, from_dir=src)
        time.sleep(1.5)
        assert proc.poll() is None, "apply ran while another process held the lock"
        assert weft_names(node_ns) == []
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    WeftNode(node_ns, state_dir).weft("drift", from_dir=src, expect=0)


@contextlib.contextmanager
def held_lock(state_dir: Path):
    """The node lock held exclusively, as another run holds it (flock on weft.lock)."""
    state_dir.mkdir(exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "weft.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


LOCK_TIMEOUT_SNIPPET = """
import sys
from pathlib import Path
from weft.model.errors import WeftError
from weft.probes.runner import Runner
from weft.reconciler import run
opts = run.Options(node="n1", state_dir=Path(sys.argv[1]), from_dir=sys.argv[2], lock_timeout=1.0)
try:
    run.apply(opts, Runner())
except WeftError as exc:
    print(exc)
    sys.exit(1)
"""


def test_lock_held_beyond_timeout_is_a_clear_error(node_ns, tmp_path):
    # The CLI has no --lock-timeout (Options.lock_timeout defaults to 300 s), so the run is
    # started through reconciler.run with a 1 s timeout.
    src = write_manifests(tmp_path / "src", CLUSTER)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with held_lock(state_dir):
        started = time.monotonic()
        proc = subprocess.run(["ip", "netns", "exec", node_ns, sys.executable, "-c", LOCK_TIMEOUT_SNIPPET,
                               str(state_dir), str(src)], capture_output=True, text=True, cwd=REPO, timeout=60)
        waited = time.monotonic() - started
    assert proc.returncode == 1, describe(proc)
    assert "another weft run held the node lock" in proc.stdout and "weft.lock" in proc.stdout, describe(proc)
    assert 1.0 <= waited < 10
    assert weft_names(node_ns) == []
