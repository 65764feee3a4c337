"""The IPv6 family gets the same policy as IPv4, on a real kernel (namespaces only; IPv6 addresses
from 2001:db8::/32, inside the namespaces the tests create).

- a pod isolated by a policy is closed over IPv6 too (before, its IPv6 traffic passed with no
  policy at all), and what the policy allows passes over IPv6 as over IPv4;
- the host side's needs of IPv6: neighbour discovery between a pod and its host passes whatever
  the pod's egress policy, and nothing else does (an ICMPv6 echo to the host is judged);
- plan, apply, drift and destroy treat the IPv6 table ("filter6") and the inet6 sets as the IPv4 ones;
- the CNI plugin programs a dual-stack pod in both families, and fails its ADD (leaving nothing)
  when the node's ip6tables cannot be programmed: no pod runs in a family whose policy is not in place.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cninode import POOL, block, node, plugin_binary
from tests.nodens import (
    WeftNode,
    iptables_save,
    namespace,
    node_ns,
    pod,
    policy,
    usable,
    weft_names,
    write_manifests,
)
from weft.cni import spec
from weft.model.names import host_iface_name

pytestmark = pytest.mark.skipif(usable() is not None or not Path("/proc/net/if_inet6").exists(),
                                reason=usable() or "IPv6 is not enabled in this kernel")
node, plugin_binary, node_ns = node, plugin_binary, node_ns  # the fixtures

NODE = "lab-node"


# ---- real packets ---------------------------------------------------------------------------------

LAB_PODS = {"x/a": ("198.18.1.11", "2001:db8:1::11"), "x/b": ("198.18.1.12", "2001:db8:1::12"),
            "y/c": ("198.18.1.23", "2001:db8:1::23")}
LAB_OBJECTS = [
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
    # Pods may reach their host (Felix's default is Drop): their egress policy still judges it.
    {"apiVersion": "crd.projectcalico.org/v1", "kind": "FelixConfiguration", "metadata": {"name": "default"},
     "spec": {"defaultEndpointToHostAction": "Accept"}},
    namespace("x", ns="x"), namespace("y", ns="y"),
    *(pod(key.split("/")[0], key.split("/")[1], v4, {"pod": key.split("/")[1]}, node=NODE, ip6=v6,
          ports=(("http", 80, "TCP"),))
      for key, (v4, v6) in LAB_PODS.items()),
    # x/a admits x/b on its named port only; x/b may only talk to x/a.
    policy("x", "a-from-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                                          "ports": [{"port": "http"}]}]}),
    policy("x", "b-to-a", {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
]
# (from, to) -> connected on TCP 80, the same in both families
EXPECTED = {("x/a", "x/a"): True, ("x/a", "x/b"): True, ("x/a", "y/c"): True,
            ("x/b", "x/a"): True, ("x/b", "x/b"): True, ("x/b", "y/c"): False,
            ("y/c", "x/a"): False, ("y/c", "x/b"): True, ("y/c", "y/c"): True}
# An ICMPv6 echo to the host side's link-local address, from inside a pod: True if answered.
ECHO_TO_HOST = """
import os, socket, struct, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
ident = os.getpid() & 0xffff
s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"weft", ("fe80::ecee:eeff:feee:eeee", 0, 0,
         socket.if_nametoindex("eth0")))
s.settimeout(1.0)
deadline = time.monotonic() + 1.0
try:
    while time.monotonic() < deadline:
        data = s.recv(1500)
        if data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident:
            print(True)
            sys.exit()
except OSError:
    pass
print(False)
"""


@pytest.fixture
def lab(tmp_path):
    from weft.playbooks.netlab import LabPod, NodeLab
    pods = [LabPod(*key.split("/"), v4, v6) for key, (v4, v6) in LAB_PODS.items()]
    with NodeLab(pods, ports=(80,)) as node_lab:
        yield node_lab


def weft_in(lab, *args: str, source: Path, state: Path) -> subprocess.CompletedProcess:
    return lab.node_run([sys.executable, "-m", "weft.reconciler.cli", *args, "--from", str(source), "--node", NODE,
                         "--state-dir", str(state)])


def observed(lab, family: int) -> dict:
    return {(src, dst): ok for (src, dst, _proto, _port), ok in
            lab.matrix(probes=[("tcp", 80)], timeout=1.0, family=family).items()}


def echo_answered(lab, pod_key: str) -> bool:
    pod_ = next(p for p in lab.pods if p.key == pod_key)
    done = subprocess.run(["ip", "netns", "exec", lab.pod_netns(pod_), sys.executable, "-I", "-S", "-c",
                           ECHO_TO_HOST], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_a_pod_isolated_by_a_policy_is_closed_over_ipv6(lab, tmp_path):
    """The regression test for the hole: with the policies applied, IPv6 connectivity is what
    IPv4's is (before, every IPv6 probe connected). x/b's egress is isolated, yet x/a reaches it
    over IPv6: the node resolves x/b's address by neighbour discovery, whose answer comes from x/b
    to the host and passes whatever x/b's egress policy says."""
    assert all(observed(lab, 6).values()), "the lab is open over IPv6 before weft runs"
    source = write_manifests(tmp_path / "src", LAB_OBJECTS)
    done = weft_in(lab, "apply", source=source, state=tmp_path / "state")
    assert done.returncode == 0, done.stderr
    for family in (4, 6):
        assert observed(lab, family) == EXPECTED, f"IPv{family}"
    # Neighbour discovery passes unconditionally; an echo to the host is judged like anything else.
    assert echo_answered(lab, "y/c"), "y/c has no egress policy: the host answers it"
    assert not echo_answered(lab, "x/b"), "x/b's egress policy allows only x/a: no echo to the host"
    done = weft_in(lab, "apply", "--destroy", source=source, state=tmp_path / "state")
    assert done.returncode == 0, done.stderr
    assert all(observed(lab, 6).values()), "destroy reopens IPv6 too"


def test_a_dual_stack_pod_on_an_ebpf_node_is_enforced_over_ipv6_by_ip6tables(lab, tmp_path):
    """The eBPF programs judge IPv4 and pass IPv6 untouched: on an eBPF node the IPv6 table and
    sets stay (renderers.bpf_policy.host_dataplane), so IPv6 is as closed as IPv4."""
    from tests.test_bpf_dataplane import require_bcc
    from tests.test_bpf_engine import EbpfNode
    require_bcc()
    source = write_manifests(tmp_path / "src", LAB_OBJECTS)
    node = EbpfNode(lab, tmp_path / "state")
    try:
        node.weft("apply", "--dataplane", "ebpf", source=source)
        for family in (4, 6):
            assert observed(lab, family) == EXPECTED, f"IPv{family}"
        node.weft("plan", "--dataplane", "ebpf", "--detailed-exitcode", source=source, expect=0)
    finally:
        node.cleanup()
    assert all(observed(lab, 6).values()), "destroy reopens IPv6 too"


# ---- plan / apply / drift / destroy of the IPv6 table and sets ------------------------------------

CLUSTER = [
    namespace("alpha"), namespace("beta", team="beta"),
    pod("alpha", "web", "198.18.0.10", {"app": "web"}, ports=(("http", 80, "TCP"),), ip6="2001:db8::a"),
    pod("alpha", "db", "198.18.0.11", {"app": "db"}, ip6="2001:db8::b"),
    pod("beta", "client", "198.18.0.20", {"app": "client"}),                        # IPv4 only
    pod("beta", "far", "198.18.9.9", {"app": "client"}, node="n2", ip6="2001:db8:9::9"),
    policy("alpha", "web-from-beta", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "beta"}}},
                              {"ipBlock": {"cidr": "2001:db8:5::/48", "except": ["2001:db8:5:1::/64"]}}],
                     "ports": [{"port": "http"}]}]}),
    policy("alpha", "db-from-web", {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}]}),
]


def sets_of(node: WeftNode) -> dict[str, tuple[str, set[str]]]:
    """weft's sets: name -> (family, members)."""
    sets: dict[str, tuple[str, set[str]]] = {}
    for line in node.sh("ipset", "save").splitlines():
        parts = line.split()
        if parts[0] == "create" and parts[1].startswith("weft-"):
            sets[parts[1]] = (parts[parts.index("family") + 1], set())
        elif parts[0] == "add" and parts[1] in sets:
            sets[parts[1]][1].add(parts[2])
    return sets


def test_the_ipv6_table_and_sets_are_planned_applied_drift_checked_and_destroyed(node_ns, tmp_path):
    src = write_manifests(tmp_path / "src", CLUSTER)
    node = WeftNode(node_ns, tmp_path / "state")
    plan = node.weft_json("plan", from_dir=src)
    tables = {c["table"] for c in plan["changes"]["chains"]} | {h["table"] for h in plan["changes"]["hooks"]}
    assert tables == {"filter", "filter6"}
    text = node.weft("plan", from_dir=src, expect=0).stdout
    assert "chain filter6/weft-FORWARD will be created" in text and "hook filter6/FORWARD" in text
    node.weft_json("apply", from_dir=src)

    web, db, client = (host_iface_name("alpha", "web"), host_iface_name("alpha", "db"),
                       host_iface_name("beta", "client"))
    save6 = iptables_save(node_ns, "nft", 6)
    assert f":weft-fw-{web}" in save6 and f":weft-tw-{db}" in save6
    assert f"weft-fw-{client}" not in save6, "a pod without an IPv6 address has no place in the IPv6 table"
    assert f"-A weft-from-wl-dispatch -i {web}" in save6 and "-A weft-from-wl-dispatch -m comment" in save6
    assert "-A FORWARD -m comment" in save6 and "-j weft-FORWARD" in save6
    nd = [ln for ln in save6.splitlines() if "ipv6-icmp" in ln]
    assert [ln.split("--icmpv6-type ")[1].split()[0] for ln in nd] == ["130", "131", "132", "133", "135", "136"]
    assert all(ln.startswith("-A weft-INPUT -i weft+ -p ipv6-icmp") and ln.endswith("-j ACCEPT") for ln in nd)
    assert "ipv6-icmp" not in iptables_save(node_ns, "nft", 4), "IPv4 has no neighbour discovery to allow"
    assert "2001:db8:5::/48" not in iptables_save(node_ns, "nft", 4) and "198.18." not in save6

    sets = sets_of(node)
    peers = {name: members for name, (family, members) in sets.items() if name.startswith("weft-s")}
    assert sorted(peers.values(), key=sorted) == [{"198.18.0.10", "198.18.0.11"}, {"198.18.0.20", "198.18.9.9"},
                                                  {"2001:db8:9::9"}, {"2001:db8::a", "2001:db8::b"}] or \
        {frozenset(m) for m in peers.values()} >= {frozenset({"2001:db8:9::9"}), frozenset({"198.18.0.20",
                                                                                          "198.18.9.9"})}
    v6 = {name: members for name, (family, members) in sets.items() if family == "inet6"}
    assert v6 and all(name.startswith(("weft-s6-", "weft-n6-", "weft-p6-")) for name in v6)
    assert {"2001:db8:9::9"} in v6.values(), "beta's pods' IPv6 addresses (the remote pod's too)"
    assert {"2001:db8:5::/48"} - set().union(*v6.values()) == set() or \
        any("2001:db8:5:1::/64" in m for m in v6.values())
    assert all(family == "inet" for name, (family, _) in sets.items() if name not in v6)
    ports6 = next(members for name, members in v6.items() if name.startswith("weft-p6-"))
    assert ports6 == {"2001:db8::a,tcp:80"}

    again = node.weft_json("apply", from_dir=src)
    assert again["commands"] == [], "a second apply changes nothing"
    node.weft("drift", from_dir=src, expect=0)

    rule = [ln for ln in save6.splitlines() if ln.startswith("-A weft-FORWARD ")][2]
    node.sh("ip6tables-nft", "-D", "weft-FORWARD", "3")
    peers6 = next(name for name, members in v6.items() if members == {"2001:db8:9::9"})
    node.sh("ipset", "del", peers6, "2001:db8:9::9")
    doc = json.loads(node.weft("drift", "--output", "json", from_dir=src, expect=2).stdout)
    items = {(i["kind"], i["name"], i["problem"], i.get("rule") or i.get("member")) for i in doc["items"]}
    assert items == {("rule", "filter6/weft-FORWARD", "missing", rule),
                     ("ipset-member", peers6, "missing", "2001:db8:9::9")}
    repair = node.weft_json("apply", from_dir=src)
    assert "ip6tables-nft-restore --noflush" in repair["commands"]
    node.weft("drift", from_dir=src, expect=0)

    node.weft("apply", "--destroy")
    assert weft_names(node_ns) == [], "nothing of weft's is left in either family"
    node.weft("plan", "--destroy", "--detailed-exitcode", expect=0)


def test_ipv6_leftovers_in_the_other_backend_are_removed(node_ns, tmp_path):
    """weft's IPv6 chains in the backend this run does not use (legacy here) are weft's too."""
    src = write_manifests(tmp_path / "src", CLUSTER)
    legacy = WeftNode(node_ns, tmp_path / "state", "legacy")
    legacy.weft("apply", from_dir=src)
    assert ":weft-FORWARD" in iptables_save(node_ns, "legacy", 6)
    WeftNode(node_ns, legacy.state_dir, "nft").weft("apply", from_dir=src)
    assert "weft" not in iptables_save(node_ns, "legacy", 6) and ":weft-FORWARD" in iptables_save(node_ns, "nft", 6)
    WeftNode(node_ns, legacy.state_dir, "nft").weft("apply", "--destroy")
    assert weft_names(node_ns) == []


# ---- the CNI plugin ---------------------------------------------------------------------------------

POOL6 = {**POOL, "metadata": {"name": "pods6"}, "spec": {"cidr": "2001:db8:4::/48", "blockSize": 122}}


def dual_stack(node) -> None:
    node.write([block("198.18.4.0/26"), POOL6, block("2001:db8:4::/122"), namespace("x"),
                policy("x", "deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]})])


def test_a_dual_stack_pod_gets_its_policy_in_both_families(node):
    dual_stack(node)
    out = node.ok("ADD", "a")
    assert [ip["address"] for ip in out["ips"]] == ["198.18.4.0/32", "2001:db8:4::/128"]
    iface = host_iface_name("x", "a")
    save6 = node.sh("ip6tables-nft-save", "-t", "filter")
    assert f":weft-fw-{iface}" in save6 and f"-A weft-to-wl-dispatch -o {iface}" in save6
    assert f"-A weft-tw-{iface}" in save6 and save6.count(f"-A weft-tw-{iface} ") == 1, \
        "no snapshot yet and x has an ingress policy: closed (one DROP)"
    assert node.call(node.env("CHECK", "a"))[0] == 0
    node.sh("ip6tables-nft", "-D", "weft-to-wl-dispatch", "1")
    code, out, _ = node.call(node.env("CHECK", "a"))
    assert code == 1 and "weft-to-wl-dispatch (IPv6)" in out["details"], out
    node.ok("DEL", "a")
    assert f"weft-fw-{iface}" not in node.sh("ip6tables-nft-save", "-t", "filter")
    node.clean()


def test_add_of_a_dual_stack_pod_fails_when_ip6tables_cannot_be_programmed(node, tmp_path):
    """Fail closed: the node's iptables works, its ip6tables does not. An IPv4-only pod is added;
    a dual-stack pod is refused (policy error) and nothing of it is left: no interface, route,
    address or rule in either family."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for path in Path("/usr/sbin").iterdir():
        if path.name.startswith(("iptables", "ipset", "xtables")):
            (tools / path.name).symlink_to(path)
        elif path.name.startswith("ip6tables"):
            (tools / path.name).write_text("#!/bin/sh\necho 'ip6tables: cannot initialize (test)' >&2\nexit 1\n")
            os.chmod(tools / path.name, 0o755)
    broken = {"PATH": f"{tools}:/usr/bin:/bin"}

    node.write([block("198.18.4.0/26"), namespace("x")])                         # IPv4 only
    env = {**node.env("ADD", "v4"), **broken}
    code, out, err = node.call(env, helper=False)
    assert code == 0, (out, err)
    node.ok("DEL", "v4")

    dual_stack(node)
    (node.state_dir / "ipam" / "node.json").unlink()   # read once; a reconcile run would rewrite it
    env = {**node.env("ADD", "a"), **broken}
    code, out, err = node.call(env, helper=False)
    assert (code, out.get("code")) == (1, spec.POLICY_FAILED), (out, err)
    assert "ip6tables" in out["details"]
    assert node.links() == ["lo"] and node.weft_routes() == "" and node.allocations() == []
    assert "2001:db8:4::" not in node.sh("ip", "-6", "route", "show")
    assert host_iface_name("x", "a") not in node.sh("iptables-nft-save", "-t", "filter")
    node.clean()
