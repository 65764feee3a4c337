"""The CNI plugin and its state dir, on a real kernel: nothing there is trusted, and losing it
never hands a running pod's address out again nor cuts the pod off (issue #9, items 1 and 3).

The harness is tests/cninode.py: a node namespace, its state dir, pods wired by the plugin as a
container runtime calls it. Nothing is done in the root namespace.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.cninode import NODE, POOL, api_in_netns, block, helper_pids, node, plugin_binary, reaches, serve
from tests.nodens import WeftNode, chain_rules, namespace, pod, policy, usable
from weft.cni import spec
from weft.model.names import host_iface_name

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node, plugin_binary = node, plugin_binary  # the fixtures

NOBODY = 65534


# ---- nothing in the state dir is trusted --------------------------------------------------------

ATTACKS = {   # name -> (what the attacker did, what the error must name)
    "state dir of another user": (lambda sd, victim: _chown_tree(sd, NOBODY), "state belongs to uid 65534"),
    "state dir writable by others": (lambda sd, victim: sd.chmod(0o777), "state is writable by group or others"),
    "allocations.json a link": (lambda sd, victim: _link(sd / "ipam" / "allocations.json", victim),
                                "allocations.json is a symbolic link"),
    "node.json a link": (lambda sd, victim: _link(sd / "ipam" / "node.json", victim), "node.json is a symbolic link"),
    "node.json of another user": (lambda sd, victim: os.chown(sd / "ipam" / "node.json", NOBODY, NOBODY),
                                  "node.json belongs to uid 65534"),
    "allocations.json writable by others": (lambda sd, victim: (sd / "ipam" / "allocations.json").chmod(0o622),
                                            "allocations.json is writable by group or others"),
    "the snapshot a link": (lambda sd, victim: _link(sd / "endpoints.snapshot", victim),
                            "endpoints.snapshot is a symbolic link"),
    "weft.lock a link": (lambda sd, victim: _link(sd / "weft.lock", sd.parent / "created-through-the-link"),
                         "weft.lock is a symbolic link"),
    "weft.lock of another user": (lambda sd, victim: os.chown(sd / "weft.lock", NOBODY, NOBODY),
                                  "weft.lock belongs to uid 65534"),
    "the IPAM lock a link": (lambda sd, victim: _link(sd / "ipam" / "lock", sd.parent / "created-through-the-link"),
                             "lock is a symbolic link"),
}


def _chown_tree(path, uid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)
    os.chown(path, uid, uid)


def _link(path, target) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_unsafe_state_dir_or_file_is_refused_and_nothing_outside_is_written(node, tmp_path, attack):
    """ADD fails with 103 naming what weft does not trust, before anything is written through it;
    DEL and STATUS either do not need that file or fail alike (50 for STATUS); never a traceback."""
    node.write([block("198.18.4.0/26"), namespace("x")])
    WeftNode(node.ns, node.state_dir).weft("apply", from_dir=node.manifests)
    node.add("a")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.chmod(victim, 0o600)
    setup, named = ATTACKS[attack]
    setup(node.state_dir, victim)
    outside = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")
               if not p.is_symlink() and node.state_dir not in p.parents and p != node.state_dir}
    code, out, err = node.call(node.env("ADD", "b"))
    assert (code, out["code"]) == (1, spec.DESIRED_STATE), (out, err)
    assert named in out["details"], out
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for command, refused in (("DEL", spec.DESIRED_STATE), ("STATUS", spec.NOT_AVAILABLE)):
        env = node.env(command, "b") if command == "DEL" else {"PATH": "/usr/sbin:/usr/bin", "CNI_COMMAND": command}
        code, out, err = node.call(env)
        assert code == 0 or (out["code"], named in out["details"]) == (refused, True), (command, out, err)
        assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    assert victim.read_text() == "precious"
    assert not (tmp_path / "created-through-the-link").exists()
    assert {p: p.stat().st_mtime_ns for p in outside} == outside, "something outside the state dir was written"
    assert host_iface_name("x", "b") not in node.links()


def test_a_linked_helper_log_is_not_written_and_no_helper_starts_on_it(node, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    node.state_dir.mkdir(mode=0o700)
    (node.state_dir / "cni-helper.log").symlink_to(victim)
    node.add("a")                                  # the call itself needs no log: it succeeds
    time.sleep(0.5)
    assert helper_pids(node) == [], "a helper logging through the link was started"
    assert victim.read_text() == "precious"
    node.ok("DEL", "a")


def test_files_are_made_0600_in_a_0700_dir(node):
    node.add("a")
    node.ok("CHECK", "a")
    found = [p for p in node.state_dir.rglob("*")]
    assert {p.stat().st_mode & 0o777 for p in found if p.is_dir()} | {node.state_dir.stat().st_mode & 0o777} == {0o700}
    assert {p.stat().st_mode & 0o777 for p in found if p.is_file()} == {0o600}
    assert {p.name for p in found} >= {"ipam", "node.json", "allocations.json", "lock", "weft.lock"}


# ---- losing state ------------------------------------------------------------------------------

def _pods(node, ips: dict[str, str], late: tuple[str, ...] = ()) -> None:
    """The desired state as the API server would have it: every pod of the node, with the address
    the plugin gave it, except `late` pods, whose status the kubelet has not reported yet."""
    objects = [block("198.18.4.0/26"), namespace("x"), namespace("guarded"),
               policy("guarded", "deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    for name, ip in ips.items():
        manifest = pod("guarded" if name.startswith("g") else "x", name, ip)
        if name in late:
            del manifest["status"]
        objects.append(manifest)
    node.write(objects)


def _lose(node, case: str) -> None:
    state = node.state_dir
    if case == "the whole state dir":
        shutil.rmtree(state)
    elif case == "allocations.json corrupt":
        (state / "ipam" / "allocations.json").write_text('{"format":1}')
    elif case == "allocations.json with a record missing a field":
        doc = json.loads((state / "ipam" / "allocations.json").read_text())
        del doc["allocations"][0]["ips"]
        (state / "ipam" / "allocations.json").write_text(json.dumps(doc))
    else:
        name = case.removesuffix(" removed")
        (state / "ipam" / name if name in ("allocations.json", "node.json") else state / name).unlink()


LOSSES = ["allocations.json removed", "allocations.json corrupt", "allocations.json with a record missing a field",
          "node.json removed", "endpoints.snapshot removed", "weft.lock removed", "desired-cache.json removed",
          "the whole state dir"]


@pytest.mark.parametrize("case", LOSSES)
def test_losing_state_never_duplicates_an_address_or_cuts_a_running_pod_off(node, case):
    """Pods run (one of them not yet reported by the API server); a state file is lost; more pods
    come; the next reconcile run. Every address stays unique, every pod reachable as its policy
    says (the guarded one stays closed), and the records match the kernel again."""
    run = WeftNode(node.ns, node.state_dir)
    _pods(node, {})
    run.weft("apply", from_dir=node.manifests)
    ips = {name: node.add(name, k8s_ns="guarded" if name.startswith("g") else "x")
           for name in ("client", "a", "b", "g1", "late")}
    _pods(node, ips, late=("late",))
    run.weft("apply", from_dir=node.manifests)
    for name in ("a", "b", "g1", "late"):
        serve(node, name)
    _lose(node, case)
    outcome = {}
    for name in ("c", "d"):
        code, out, err = node.call(node.env("ADD", name))
        assert code == 0, (out, err)
        ips[name] = out["ips"][0]["address"].split("/")[0]
        outcome[name] = err
        serve(node, name)
    if "corrupt" in case or "missing a field" in case:
        log = outcome["c"] + ((node.state_dir / "cni-helper.log").read_text()
                              if (node.state_dir / "cni-helper.log").exists() else "")
        assert "kept it as allocations.json.corrupt-" in log, log
    assert len(set(ips.values())) == len(ips), f"an address was handed out twice: {ips}"
    _pods(node, ips, late=("late",))
    run.weft("apply", from_dir=node.manifests)
    routed = [line.split()[0] for line in node.weft_routes().splitlines()]
    assert sorted(routed) == sorted(ips.values())
    for name in ("a", "b", "late", "c", "d"):
        assert reaches(node, "client", ips[name]), f"{name} ({ips[name]}) was cut off after {case}"
    assert not reaches(node, "client", ips["g1"]), "the guarded pod must stay closed"
    check = node.ipam_check()
    assert check.returncode == 0, check.stdout + check.stderr
    assert {a["pod"] for a in node.allocations()} == set(ips)


def test_a_run_while_the_records_are_lost_keeps_a_live_pods_route(node):
    """The run comes before any ADD could rebuild the records, and the API server has not
    reported the pod's address yet: nothing but the kernel knows it."""
    run = WeftNode(node.ns, node.state_dir)
    _pods(node, {})
    run.weft("apply", from_dir=node.manifests)
    ips = {"client": node.add("client"), "late": node.add("late")}
    _pods(node, ips, late=("late",))
    serve(node, "late")
    (node.state_dir / "ipam" / "allocations.json").unlink()
    run.weft("apply", from_dir=node.manifests)
    assert ips["late"] in node.weft_routes(), "the run deleted a live pod's route"
    assert reaches(node, "client", ips["late"])


def test_twenty_one_first_adds_on_a_fresh_node_make_one_read_of_the_api(node, tmp_path):
    """No run has written node.json yet: the plugin reads the pools and blocks itself, in its own
    process (never forking from the helper's threads), once: the others wait for that read."""
    from concurrent.futures import ThreadPoolExecutor
    pods = [f"p{i:02d}" for i in range(21)]
    for name in pods:
        node.pod_ns(name)
    with api_in_netns(node.ns, [POOL, block("198.18.4.0/26")]) as fake:
        del node.config["manifests"]
        node.config["kubeconfig"] = fake.write_kubeconfig(tmp_path / "kubeconfig")
        with ThreadPoolExecutor(21) as workers:
            added = list(workers.map(lambda name: node.call(node.env("ADD", name)), pods))
        assert [code for code, _, _ in added] == [0] * 21, [out for code, out, _ in added if code]
        reads = [path for method, path in fake.requests if method == "GET" and path.split("?")[0].endswith("/ippools")]
    assert len(reads) == 1, f"{len(reads)} reads of the pools for one node"
    assert len({out["ips"][0]["address"] for _, out, _ in added}) == 21


def test_rule_text_planted_in_the_snapshot_never_reaches_iptables(node):
    """The snapshot used to carry iptables lines that went to iptables-restore as they were."""
    node.write([block("198.18.4.0/26"), namespace("x")])
    WeftNode(node.ns, node.state_dir).weft("apply", from_dir=node.manifests)
    path = node.state_dir / "endpoints.snapshot"
    snap = json.loads(path.read_text())
    snap["pods"]["x/a"] = {"egress": [["weft-po-aaaa -j ACCEPT"]], "ingress": [], "families": [4]}
    path.write_text(json.dumps(snap))
    (node.state_dir / "endpoints.json").write_text(json.dumps(            # the old file, rule text
        {"format": 1, "pods": {"x/a": {"fw": ["-A weft-fw-x -j ACCEPT"], "tw": []}}, "closed": {}, "default": [0, 0]}))
    code, out, err = node.call(node.env("ADD", "a"), helper=False)
    assert code == 0, (out, err)
    assert "endpoints.snapshot is not what weft writes" in err and "not a weft egress policy chain" in err
    iface = host_iface_name("x", "a")
    rules = {kind: chain_rules(node.ns, f"weft-{kind}-{iface}") for kind in ("fw", "tw")}
    assert [r.split()[-2:] for r in rules["fw"] + rules["tw"]] == [["-j", "DROP"]] * 2, "closed both ways"
    assert "aaaa" not in node.sh("iptables-nft-save")


def test_weft_ipam_rebuild_names_the_pods_from_the_desired_state(node):
    ips = {name: node.add(name) for name in ("a", "b")}
    _pods(node, ips)
    (node.state_dir / "ipam" / "allocations.json").write_text('{"format":1}')
    argv = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "weft.reconciler.cli", "ipam", "rebuild",
            "--state-dir", str(node.state_dir)]
    bare = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2, bare.stdout + bare.stderr     # no snapshot, no source: the pods are not named
    assert "Rebuilt 2 records" in bare.stdout and "kept as" in bare.stdout and "its pod is not known" in bare.stdout
    assert node.ipam_check().returncode == 2
    named = subprocess.run(argv + ["--from", str(node.manifests), "--node", NODE, "--output", "json"],
                           capture_output=True, text=True, timeout=60)
    assert named.returncode == 0, named.stdout + named.stderr
    assert sorted((r["pod"], tuple(r["ips"])) for r in json.loads(named.stdout)["records"]) == [
        ("a", (ips["a"],)), ("b", (ips["b"],))]
    assert node.ipam_check().returncode == 0
    assert node.call(node.env("CHECK", "a"))[0] == 0
