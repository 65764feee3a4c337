"""The CNI plugin on a real kernel, called exactly as a container runtime calls it (the harness:
tests/cninode.py). Nothing is done in the root namespace.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cninode import (
    NODE,
    NSENTER,
    POOL,
    api_in_netns,
    block,
    gone,
    helper_pids,
    node,
    plugin_binary,
    pod_sh,
    reaches,
    request_json,
    serve,
    wait_for_helper,
)
from tests.nodens import WeftNode, namespace, policy, usable, write_manifests
from weft.cni import spec
from weft.cni.wiring import GATEWAY_V4, HOST_MAC, ROUTE_PROTOCOL
from weft.model.names import host_iface_name

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node, plugin_binary = node, plugin_binary  # the fixtures


# ---- ADD ------------------------------------------------------------------------------------

def test_add_wires_the_pod_calico_style(node):
    out = node.ok("ADD", "a")
    iface = host_iface_name("x", "a")
    assert out == {"cniVersion": "1.1.0", "dns": {},
                   "interfaces": [{"name": iface, "mac": HOST_MAC, "mtu": 1400},
                                  {"name": "eth0", "mac": out["interfaces"][1]["mac"], "mtu": 1400,
                                   "sandbox": f"/run/netns/{node.pod_ns('a')}"}],
                   "ips": [{"address": "198.18.4.0/32", "gateway": GATEWAY_V4, "interface": 1}],
                   "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY_V4}]}
    host = json.loads(node.sh("ip", "-j", "-d", "link", "show", iface))[0]
    assert (host["address"], host["mtu"], host["ifalias"], "UP" in host["flags"]) == (
        HOST_MAC, 1400, "weft:c-a:eth0", True)
    assert node.weft_routes().split() == ["198.18.4.0", "dev", iface, "scope", "link"]
    for key, value in (("ipv4/conf/{}/forwarding", "1"), ("ipv4/conf/{}/rp_filter", "1")):
        assert node.sh("cat", f"/proc/sys/net/{key.format(iface)}").strip() == value
    assert node.sh("cat", "/proc/sys/net/ipv4/conf/lo/forwarding").strip() == "0", "host-side sysctls only"
    pod = json.loads(pod_sh(node, "a", "ip", "-j", "addr", "show", "eth0"))[0]
    assert [(a["local"], a["prefixlen"]) for a in pod["addr_info"] if a["family"] == "inet"] == [("198.18.4.0", 32)]
    assert pod_sh(node, "a", "ip", "route").strip() == f"default via {GATEWAY_V4} dev eth0 onlink"
    assert pod_sh(node, "a", "ip", "neigh").split() == [GATEWAY_V4, "dev", "eth0", "lladdr", HOST_MAC, "PERMANENT"]


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_add_answers_in_the_configs_version(node, version):
    out = node.ok("ADD", "a", config={"cniVersion": version})
    assert out["cniVersion"] == version
    assert ("version" in out["ips"][0]) == (version < "1.0.0")
    assert ("mtu" in out["interfaces"][0]) == (version == "1.1.0")


def test_add_chained_after_another_plugin_keeps_its_result(node):
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "dummy"}], "ips": [], "dns": {"nameservers": ["1.1.1.1"]}}
    out = node.ok("ADD", "a", config={"cniVersion": "1.0.0", "prevResult": prev})
    assert [i["name"] for i in out["interfaces"]] == ["dummy", host_iface_name("x", "a"), "eth0"]
    assert out["ips"][0]["interface"] == 2 and out["dns"] == {"nameservers": ["1.1.1.1"]}


def test_add_after_a_crash_between_allocation_and_wiring_returns_the_same_address(node):
    """The plugin died after recording the address, before or half-way through wiring."""
    first = node.add("a")
    iface = host_iface_name("x", "a")
    node.sh("ip", "link", "del", iface)                 # as if the wiring never happened...
    node.sh("ip", "link", "add", iface, "type", "veth", "peer", "name", "halfmade")   # ...or half did
    assert node.add("a") == first
    assert node.links() == ["lo", iface]
    assert node.call(node.env("CHECK", "a"))[0] == 0


def test_a_new_sandbox_of_the_same_pod_takes_over_and_the_old_del_leaves_it_alone(node):
    old = node.add("a", cid="old")
    new = node.add("a", cid="new", sandbox="a-new")
    assert old != new
    node.ok("DEL", "a", cid="old")
    assert node.call(node.env("CHECK", "a", cid="new", sandbox="a-new"))[0] == 0
    assert [a["container_id"] for a in node.allocations()] == ["new"]


def test_a_second_weft_interface_in_one_sandbox_is_refused(node):
    node.add("a")
    code, out, _ = node.call(node.env("ADD", "a", ifname="net1"))
    assert (code, out["code"]) == (1, spec.INVALID_ENVIRONMENT) and "one interface per pod" in out["details"]
    assert node.call(node.env("CHECK", "a"))[0] == 0, "the first interface is untouched"
    assert len(node.allocations()) == 1


# ---- DEL ------------------------------------------------------------------------------------

def test_del_removes_everything_and_may_be_repeated(node):
    node.add("a")
    node.ok("DEL", "a")
    node.clean()
    node.ok("DEL", "a")                                    # twice
    node.ok("DEL", "b", cid="never-added")                 # an unknown container
    env = node.env("DEL", "a")
    del env["CNI_NETNS"]                                   # optional for DEL
    assert node.call(env)[0] == 0
    node.clean()


def test_del_after_the_pod_namespace_is_gone(node, tmp_path):
    node.add("a")
    subprocess.run(["ip", "netns", "del", node.pod_ns("a")], check=True)
    code, out, err = node.call(node.env("DEL", "a"))
    assert code == 0, (out, err)
    node.clean()


# ---- CHECK ----------------------------------------------------------------------------------

def test_check_passes_after_add_and_names_each_thing_tampered_with(node):
    result = node.ok("ADD", "a")
    iface = host_iface_name("x", "a")
    env = node.env("CHECK", "a")
    assert node.call(env, prevResult=result)[0] == 0
    tamper = [
        (["ip", "route", "del", "198.18.4.0/32"], f"host route 198.18.4.0 dev {iface} proto 201 is missing"),
        (["sysctl", "-qw", f"net.ipv4.conf.{iface}.rp_filter=0"], f"sysctl net.ipv4.conf.{iface}.rp_filter is 0"),
        (["nsenter", f"--net=/run/netns/{node.pod_ns('a')}", "ip", "neigh", "del", GATEWAY_V4, "dev", "eth0"],
         "permanent neighbour 169.254.1.1"),
        (["nsenter", f"--net=/run/netns/{node.pod_ns('a')}", "ip", "addr", "del", "198.18.4.0/32", "dev", "eth0"],
         "address 198.18.4.0/32 is missing on eth0"),
        (["iptables-nft", "-F", "weft-from-wl-dispatch"], f"no rule for interface {iface} in chain"),
    ]
    for argv, expected in tamper:
        node.sh(*argv)
        code, out, _ = node.call(env, prevResult=result)
        assert (code, out["code"]) == (1, spec.CHECK_FAILED) and expected in out["details"], out
    node.sh("ip", "link", "set", iface, "down")
    assert f"host interface {iface} is down" in node.call(env)[1]["details"]
    node.sh("ip", "link", "del", iface)
    assert f"host interface {iface} is missing" in node.call(env)[1]["details"]


def test_check_without_an_allocation_or_with_a_foreign_prev_result_fails(node):
    code, out, _ = node.call(node.env("CHECK", "a"))
    assert out["code"] == spec.CHECK_FAILED and "no address is allocated" in out["details"]
    node.add("a")
    foreign = {"cniVersion": "1.1.0", "ips": [{"address": "198.18.9.9/32"}]}
    code, out, _ = node.call(node.env("CHECK", "a"), prevResult=foreign)
    assert "198.18.9.9 of prevResult is not allocated" in out["details"]


# ---- GC and STATUS --------------------------------------------------------------------------

def test_gc_releases_what_is_not_valid_and_removes_leaked_interfaces(node):
    for pod in ("a", "b", "c"):
        node.add(pod)
    node.sh("ip", "link", "add", "weftleaked0000", "type", "veth", "peer", "name", "leakpeer")
    node.sh("ip", "link", "set", "weftleaked0000", "alias", "weft:gone:eth0")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}
    valid = [{"containerID": "c-b", "ifname": "eth0"}]
    code, out, err = node.call(env, **{"cni.dev/valid-attachments": valid})
    assert (code, out) == (0, None), err
    assert node.links() == ["lo", host_iface_name("x", "b")]
    assert [a["container_id"] for a in node.allocations()] == ["c-b"]
    assert len(node.weft_routes().splitlines()) == 1
    assert node.ipam_check().returncode == 0


def test_status_says_when_the_pool_is_exhausted_and_add_names_the_pool(node):
    small = {**POOL, "spec": {"cidr": "198.18.8.0/24", "blockSize": 30}}
    write_manifests(node.manifests, [small, block("198.18.8.0/30")])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "STATUS"}
    assert node.call(env)[0] == 0
    for pod in "abcd":
        node.add(pod)
    code, out, _ = node.call(env)
    assert out["code"] == spec.NOT_AVAILABLE and "IPPool pods (198.18.8.0/24) is exhausted" in out["details"]
    code, out, _ = node.call(node.env("ADD", "e"))
    assert out["code"] == spec.NO_ADDRESS and "IPPool pods (198.18.8.0/24) is exhausted" in out["details"]
    assert node.links().count(host_iface_name("x", "e")) == 0
    (node.state_dir / "ipam" / "allocations.json").write_text("{garbage")
    code, out, _ = node.call(env)
    assert out["code"] == spec.NOT_AVAILABLE and "is exhausted" in out["details"], \
        "the corrupt records were rebuilt from the pods' interfaces: their addresses are still taken"
    assert len(list((node.state_dir / "ipam").glob("allocations.json.corrupt-*"))) == 1


# ---- traffic and policy ----------------------------------------------------------------------

def test_pods_reach_each_other_and_a_default_deny_is_in_force_when_add_returns(node, tmp_path):
    node.write([block("198.18.4.0/26"), namespace("x"), namespace("guarded"),
                policy("guarded", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    WeftNode(node.ns, node.state_dir).weft("apply", from_dir=node.manifests)   # the node's last reconcile run
    node.add("client")
    open_ip = node.add("open")
    serve(node, "open")
    assert reaches(node, "client", open_ip)
    # The guarded pod's server is listening before ADD: the probe right after ADD returns must fail.
    serve(node, "guarded-pod")
    guarded_ip = node.add("guarded-pod", k8s_ns="guarded")
    assert not reaches(node, "client", guarded_ip)
    assert reaches(node, "client", open_ip), "only the guarded pod is closed"


# ---- many at once, and killed half-way ------------------------------------------------------

def test_thirty_parallel_adds_and_dels_leave_no_duplicate_and_no_leak(node):
    node.write([block("198.18.4.0/26")])
    pods = [f"p{i:02d}" for i in range(30)]
    for pod in pods:
        node.pod_ns(pod)

    def run(command: str, pod: str):
        return node.call(node.env(command, pod))

    with ThreadPoolExecutor(30) as pool:
        added = list(pool.map(lambda p: run("ADD", p), pods))
    assert [code for code, _, _ in added] == [0] * 30, [out for code, out, _ in added if code]
    ips = [out["ips"][0]["address"] for _, out, _ in added]
    assert len(set(ips)) == 30
    assert len(node.links()) == 31 and len(node.weft_routes().splitlines()) == 30
    done = node.ipam_check()
    assert done.returncode == 0, done.stdout + done.stderr
    with ThreadPoolExecutor(30) as pool:
        deleted = list(pool.map(lambda p: run("DEL", p), pods))
    assert [code for code, _, _ in deleted] == [0] * 30
    node.clean()
    assert node.ipam_check().returncode == 0


def test_kill_9_at_any_point_of_add_then_del_and_add_again_is_clean(node):
    """SIGKILL the plugin at spread-out moments of ADD; the runtime then DELs (as after any failed
    ADD) and ADDs again: every time the end state is exactly one good attachment, then nothing.
    The plugin runs in its own process here ("helper": false); killing the helper is tested below."""
    own = {"helper": False}
    start = time.monotonic()
    node.ok("DEL", "a", cid="warm-up", config=own)
    node.add("a", cid="timing", config=own)
    duration = time.monotonic() - start
    node.ok("DEL", "a", cid="timing", config=own)
    rng = random.Random(4)
    left = set()
    for attempt in range(8):
        proc = node.start(node.env("ADD", "a", cid=f"k{attempt}"), **own)
        time.sleep(rng.uniform(0, duration))
        os.killpg(proc.pid, signal.SIGKILL)      # the plugin and whatever it was running (ip, iptables-restore)
        proc.wait()
        left.add((bool(node.allocations()), len(node.links()) > 1, bool(node.weft_chains())))
        node.ok("DEL", "a", cid=f"k{attempt}", config=own)
        assert node.links() == ["lo"] and node.weft_routes() == "" and node.allocations() == []
        node.add("a", cid=f"k{attempt}", config=own)
        assert node.call(node.env("CHECK", "a", cid=f"k{attempt}"), **own)[0] == 0
        node.ok("DEL", "a", cid=f"k{attempt}", config=own)
    node.clean()
    assert helper_pids(node) == [], "\"helper\": false started a helper"
    assert len(left) > 1, f"every kill left the same state {left}: the kill points are not spread over ADD"
    print("states the kills left (allocation, interface, chains):", sorted(left))


# ---- the resident helper (cni/helper.py) ------------------------------------------------------

def test_the_first_call_starts_a_helper_that_serves_the_next_ones(node):
    assert helper_pids(node) == []
    node.add("a")                                  # no helper yet: done in the plugin's process, which starts one
    helper = wait_for_helper(node)
    os.kill(helper, signal.SIGSTOP)
    try:
        proc = node.start(node.env("ADD", "b"))
        time.sleep(1)
        assert proc.poll() is None, "ADD did not wait for the stopped helper: the helper did not serve it"
    finally:
        os.kill(helper, signal.SIGCONT)
    code, out, err = node.finish(proc)
    assert code == 0, (out, err)
    assert out["ips"][0]["address"] == "198.18.4.1/32"
    assert node.call(node.env("CHECK", "b"))[0] == 0
    node.ok("DEL", "a")
    node.ok("DEL", "b")
    node.clean()


def test_a_call_from_another_mount_namespace_is_left_to_the_plugin(node, tmp_path):
    """CNI_NETNS is a path: a bind mount the caller sees may not exist for the helper. Here the
    pod's namespace is mounted only in the caller's own mount namespace: served by the helper,
    ADD would fail to enter it."""
    node.add("a")
    wait_for_helper(node)
    target = tmp_path / "private-netns"
    target.touch()
    env = node.env("ADD", "b")
    script = f"mount --bind {env['CNI_NETNS']} {target} && exec {NSENTER} --net=/run/netns/{node.ns} {node.binary}"
    env["CNI_NETNS"] = str(target)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                          input=json.dumps(node.config).encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert node.call(node.env("CHECK", "b"))[0] == 0
    node.ok("DEL", "a")
    node.ok("DEL", "b")
    node.clean()


def test_a_helper_killed_during_add_leaves_the_call_to_the_plugin(node):
    node.add("warm-up")
    rng = random.Random(7)
    helper = None
    for attempt in range(6):
        helper = wait_for_helper(node, other_than=helper)
        proc = node.start(node.env("ADD", f"k{attempt}"))
        time.sleep(rng.uniform(0, 0.05))
        os.kill(helper, signal.SIGKILL)
        code, out, err = node.finish(proc)
        assert code == 0, (out, err)
        assert node.call(node.env("CHECK", f"k{attempt}"))[0] == 0
    for pod in ["warm-up", *(f"k{attempt}" for attempt in range(6))]:
        node.ok("DEL", pod)
    node.clean()
    assert node.ipam_check().returncode == 0


def test_the_runtimes_del_after_a_killed_add_waits_for_the_helper_to_finish_it(node):
    """SIGKILL the caller while the helper may be serving its ADD; the runtime DELs at once. The
    ADD is finished before the DEL, never after it: the DEL leaves nothing."""
    node.add("warm-up")
    wait_for_helper(node)
    rng = random.Random(11)
    for attempt in range(6):
        proc = node.start(node.env("ADD", "a", cid=f"k{attempt}"))
        time.sleep(rng.uniform(0.005, 0.04))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        node.ok("DEL", "a", cid=f"k{attempt}")
        assert node.links() == ["lo", host_iface_name("x", "warm-up")], f"attempt {attempt}"
        assert [a["pod"] for a in node.allocations()] == ["warm-up"], f"attempt {attempt}"
        node.add("a", cid=f"k{attempt}")
        assert node.call(node.env("CHECK", "a", cid=f"k{attempt}"))[0] == 0
        node.ok("DEL", "a", cid=f"k{attempt}")
    node.ok("DEL", "warm-up")
    node.clean()


def test_new_code_on_disk_replaces_the_helper(node):
    node.add("a")
    old = wait_for_helper(node)
    assert node.call(node.env("CHECK", "a"))[0] == 0   # served: the helper has noted its code's mtimes
    source = Path(spec.__file__)
    before = source.stat()
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))   # as an upgrade would
    try:
        node.add("b")                              # the old helper answers "stale" and goes
        assert gone(old), "the stale helper is still running"
        assert wait_for_helper(node, other_than=old)
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    node.ok("DEL", "a")
    node.ok("DEL", "b")
    node.clean()


def test_the_helper_exits_when_its_state_dir_is_gone(node):
    node.add("a")
    helper = wait_for_helper(node)
    node.ok("DEL", "a")
    shutil.rmtree(node.state_dir)
    assert gone(helper), "the helper outlived the node's state dir"


# ---- bad input leaves nothing behind ----------------------------------------------------------

@pytest.mark.parametrize("case, code", [
    ("malformed JSON", spec.DECODE_FAILURE),
    ("unsupported cniVersion", spec.INCOMPATIBLE_VERSION),
    ("missing CNI_NETNS", spec.INVALID_ENVIRONMENT),
    ("netns path that does not exist", spec.UNKNOWN_CONTAINER),
    ("netns path that is a regular file", spec.UNKNOWN_CONTAINER),
    ("netns path that is a directory", spec.UNKNOWN_CONTAINER),
    ("netns path that is a FIFO", spec.UNKNOWN_CONTAINER),
    ("netns path that is another kind of namespace", spec.UNKNOWN_CONTAINER),
    ("container id too long for the interface alias", spec.INVALID_ENVIRONMENT),
    ("interface name too long", spec.INVALID_ENVIRONMENT),
    ("interface exists in the pod", spec.WIRING_FAILED),
])
def test_bad_input_gets_the_specs_error_and_leaves_nothing(node, case, code, tmp_path):
    """Each is refused before an address is allocated or anything is wired (the issue: a file or
    a directory as CNI_NETNS passed and failed with 100 at setns; a 246-character container id
    failed with 100 once the pod side was wired)."""
    env, stdin = node.env("ADD", "a"), None
    if case == "malformed JSON":
        stdin = b'{"cniVersion": "1.1.0", "name": '
    elif case == "unsupported cniVersion":
        stdin = json.dumps({**node.config, "cniVersion": "0.2.0"}).encode()
    elif case == "missing CNI_NETNS":
        del env["CNI_NETNS"]
    elif case == "netns path that does not exist":
        env["CNI_NETNS"] = "/run/netns/wtr-does-not-exist"
    elif case == "netns path that is a regular file":
        (tmp_path / "file").write_text("")
        env["CNI_NETNS"] = str(tmp_path / "file")
    elif case == "netns path that is a directory":
        env["CNI_NETNS"] = str(tmp_path)
    elif case == "netns path that is a FIFO":
        os.mkfifo(tmp_path / "fifo")
        env["CNI_NETNS"] = str(tmp_path / "fifo")
    elif case == "netns path that is another kind of namespace":
        env["CNI_NETNS"] = "/proc/self/ns/uts"
    elif case == "container id too long for the interface alias":
        env["CNI_CONTAINERID"] = "c" * 246             # "weft:" + 246 + ":eth0" is 256 characters
    elif case == "interface name too long":
        env["CNI_IFNAME"] = "eth0-much-too-long"
    else:
        pod_sh(node, "a", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other")
    returned, out, err = node.call(env, stdin)
    assert (returned, out["code"]) == (1, code), (out, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, "one line for the runtime's log on stderr"
    assert node.links() == ["lo"] and node.weft_routes() == "" and node.allocations() == []
    if code != spec.WIRING_FAILED:
        assert not (node.state_dir / "ipam" / "allocations.json").exists(), "refused before any allocation"


def test_add_whose_policy_cannot_be_programmed_fails_and_leaves_nothing(node):
    env = node.env("ADD", "a")
    env["PATH"] = "/nonexistent"                       # no iptables for add_endpoint: it must fail
    code, out, err = node.call(env)
    assert (code, out["code"]) == (1, spec.POLICY_FAILED), (out, err)
    assert node.links() == ["lo"] and node.weft_routes() == "" and node.allocations() == []


# ---- IPv6, and blocks claimed through the API ----------------------------------------------------

def test_dual_stack_pod_gets_a_128_and_a_link_local_gateway(node):
    if not Path("/proc/sys/net/ipv6").exists():
        pytest.skip("IPv6 is not enabled in this kernel")
    v6pool = {**POOL, "metadata": {"name": "pods6"}, "spec": {"cidr": "2001:2::/48", "blockSize": 122}}
    node.write([block("198.18.4.0/26"), v6pool, block("2001:2::/122")])
    out = node.ok("ADD", "a")
    assert [ip["address"] for ip in out["ips"]] == ["198.18.4.0/32", "2001:2::/128"]
    assert "2001:2:: dev" in node.sh("ip", "-6", "route", "show", "proto", str(ROUTE_PROTOCOL))
    assert pod_sh(node, "a", "ip", "-6", "route", "show", "default").startswith("default via fe80::ecee:eeff:feee:eeee")
    assert node.call(node.env("CHECK", "a"))[0] == 0
    node.ok("DEL", "a")
    node.clean()


def test_lab_node_creates_its_pods_through_the_plugin(tmp_path, plugin_binary):
    """NodeLab(cni=...) calls the plugin as a runtime would; pods get the pool's addresses and connect."""
    from tests.nodens import pod as pod_manifest
    from weft.playbooks.netlab import LabCni, LabPod, NodeLab
    manifests = write_manifests(tmp_path / "m", [POOL, block("198.18.4.0/26", "lab-node"), namespace("x"),
                                                 pod_manifest("x", "a", "198.18.200.1", node="lab-node"),
                                                 pod_manifest("x", "b", "198.18.200.2", node="lab-node")])
    state = tmp_path / "state"

    def first_run(lab):
        done = lab.node_run([sys.executable, "-m", "weft.reconciler.cli", "apply", "--from", str(manifests), "--node",
                             "lab-node", "--state-dir", str(state)])
        assert done.returncode == 0, done.stderr

    cni = LabCni(plugin_binary, {"node": "lab-node", "state_dir": str(state), "manifests": str(manifests)}, first_run)
    with NodeLab([LabPod("x", "a", "198.18.200.1"), LabPod("x", "b", "198.18.200.2")], cni=cni) as lab:
        assert sorted(p.ip for p in lab.pods) == ["198.18.4.0", "198.18.4.1"]
        assert all(lab.matrix(probes=[("tcp", 80)], timeout=0.5).values())
    assert json.loads((state / "ipam" / "allocations.json").read_text())["allocations"] == []


def test_blocks_are_claimed_through_the_api_when_the_node_has_none_free(node, tmp_path):
    from weft.cni.claims import BLOCKS_PATH
    pool = {**POOL, "spec": {"cidr": "198.18.32.0/25", "blockSize": 26}}
    taken = block("198.18.32.0/26", node="elsewhere")
    with api_in_netns(node.ns, [pool, taken]) as fake:
        del node.config["manifests"]
        node.config["kubeconfig"] = fake.write_kubeconfig(tmp_path / "kubeconfig")
        assert node.add("a") == "198.18.32.64"
        assert node.add("b") == "198.18.32.65"
        assert fake.requests.count(("POST", BLOCKS_PATH)) == 1, "one claim serves the whole block"
        stored = request_json(fake, node.ns, f"{BLOCKS_PATH}/198-18-32-64-26")
        assert stored["spec"]["affinity"] == f"host:{NODE}"
        affinity = request_json(fake, node.ns, "/apis/crd.projectcalico.org/v1/blockaffinities/n1-198-18-32-64-26")
        assert affinity["spec"] == {"node": NODE, "cidr": "198.18.32.64/26", "state": "confirmed", "deleted": "false"}
        blocks = json.loads((node.state_dir / "ipam" / "node.json").read_text())["blocks"]
        assert [(b["cidr"], b.get("claimed")) for b in blocks] == [("198.18.32.64/26", True)]
        code, out, _ = node.call(node.env("ADD", "c"), **{"cniVersion": "1.1.0"})
        assert code == 0                                  # 62 more addresses before another claim
    code, out, _ = node.call(node.env("ADD", "d"))
    assert code == 0, "claims are not on the path while the node has free addresses"


