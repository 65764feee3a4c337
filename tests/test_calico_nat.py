"""Calico's natOutgoing (renderers.natoutgoing): pool traffic to outside every pool leaves the node
with the node's address; nothing else is masqueraded. The render, the guard's one MASQUERADE
rule, and on a real kernel: pod namespaces -> node namespace -> a "router" namespace (198.19.0.2,
no route out) that answers each datagram with the source address it saw, through the real `weft`
command's apply, drift, repair and destroy, foreign nat rules left byte for byte.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests import nodens
from tests.nodens import WeftNode, namespace, pod, write_manifests
from weft.desired.loader import build_cluster_state
from weft.model.names import host_iface_name
from weft.probes import backend as backend_probe
from weft.probes.runner import Runner
from weft.reconciler import guard
from weft.renderers.iptables import render_node
from weft.renderers.natoutgoing import ALL_SET, MASQ_SET, NAT_CHAIN, render_nat_outgoing

CRD = "crd.projectcalico.org/v1"


def pool(name: str, cidr: str, **spec) -> dict:
    return {"apiVersion": CRD, "kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr, **spec}}


POOLS = [pool("masq", "198.18.4.0/24", natOutgoing=True), pool("plain", "198.18.9.0/24"),
         pool("other", "198.18.8.0/24"), pool("old", "198.18.10.0/24", disabled=True, natOutgoing=True),
         pool("v6", "2001:db8:4::/48", natOutgoing=True)]


def state_of(objects: list[dict]):
    return build_cluster_state(("m.yaml", o) for o in objects)


# --- the render ------------------------------------------------------------------------------------

def test_masquerade_sets_hold_natoutgoing_pools_and_every_pool():
    chains, sets, hooks = render_nat_outgoing(state_of(POOLS))
    assert sets[MASQ_SET].members == {"198.18.4.0/24", "198.18.10.0/24"}       # disabled pools' too
    assert sets[ALL_SET].members == {"198.18.4.0/24", "198.18.9.0/24", "198.18.8.0/24", "198.18.10.0/24"}
    assert {s.family for s in sets.values()} == {"inet"} and {s.type for s in sets.values()} == {"hash:net"}
    [rule] = chains[("nat", NAT_CHAIN)].rules
    assert rule.endswith(f"-m set --match-set {MASQ_SET} src -m set ! --match-set {ALL_SET} dst -j MASQUERADE")
    [hook] = hooks[("nat", "POSTROUTING")].rules
    assert hook.startswith("-A POSTROUTING ") and hook.endswith(f"-j {NAT_CHAIN}")


def test_ipv6_pools_in_the_ip6tables_nat_table():
    chains, sets, hooks = render_nat_outgoing(state_of(POOLS), 6)
    assert set(chains) == {("nat6", NAT_CHAIN)} and set(hooks) == {("nat6", "POSTROUTING")}
    assert sets["weft-masq6-pools"].members == sets["weft-all6-pools"].members == {"2001:db8:4::/48"}
    assert {s.family for s in sets.values()} == {"inet6"}
    [rule] = chains[("nat6", NAT_CHAIN)].rules
    guard.check_iptables(restore("nat", f":{NAT_CHAIN} - [0:0]", rule))
    with pytest.raises(guard.Refused):      # one family's masquerade set with the other's pools
        guard.check_iptables(restore("nat", rule.replace("weft-all6-pools", ALL_SET)))


def test_nothing_in_nat_without_natoutgoing():
    plain = [pool("plain", "198.18.9.0/24"), pool("v6", "2001:db8:4::/48", natOutgoing=True)]
    assert render_nat_outgoing(state_of(plain)) == ({}, {}, {})
    dataplane = render_node(state_of(plain), "n1")
    assert not [t for t, _ in dataplane.chains if t == "nat"] and not [t for t, _ in dataplane.hooks if t == "nat"]


def test_render_node_carries_the_nat_table():
    dataplane = render_node(state_of(POOLS), "n1")
    assert ("nat", NAT_CHAIN) in dataplane.chains and ("nat", "POSTROUTING") in dataplane.hooks
    assert {MASQ_SET, ALL_SET} <= set(dataplane.ipsets)


# --- the guard: MASQUERADE in exactly natOutgoing's rule ---------------------------------------------

RULE = (f'-A {NAT_CHAIN} -m comment --comment "weft:abc" -m set --match-set {MASQ_SET} src '
        f'-m set ! --match-set {ALL_SET} dst -j MASQUERADE')
HOOK = f'-I POSTROUTING 1 -m comment --comment "weft:abc" -j {NAT_CHAIN}'


def restore(table: str, *lines: str) -> str:
    return "\n".join([f"*{table}", *lines, "COMMIT"]) + "\n"


def test_guard_allows_natoutgoing_chain_and_hook():
    guard.check_iptables(restore("nat", f":{NAT_CHAIN} - [0:0]", RULE, HOOK))
    guard.check_iptables(restore("nat", f":{NAT_CHAIN} - [0:0]", HOOK.replace("-I POSTROUTING 1", "-D POSTROUTING"),
                                 f"-X {NAT_CHAIN}"))


@pytest.mark.parametrize("text, why", [
    (restore("filter", ":weft-x - [0:0]", RULE.replace(NAT_CHAIN, "weft-x")), "MASQUERADE"),
    (restore("filter", f":{NAT_CHAIN} - [0:0]", RULE), "MASQUERADE"),
    (restore("nat", ":weft-x - [0:0]", RULE.replace(NAT_CHAIN, "weft-x")), "MASQUERADE"),
    (restore("nat", RULE.replace(" -j MASQUERADE", " -j MASQUERADE --to-ports 1-2 --random")), "MASQUERADE"),
    (restore("nat", RULE.replace(" -m comment", " -p icmp -m comment")), "MASQUERADE"),
    (restore("nat", RULE.replace(f"! --match-set {ALL_SET}", "! --match-set weft-other")), "MASQUERADE"),
    (restore("nat", RULE.replace(f"--match-set {MASQ_SET} src", f"--match-set {MASQ_SET} dst")), "MASQUERADE"),
    (restore("nat", f'-A {NAT_CHAIN} -m comment --comment "weft:abc" -j MASQUERADE'), "MASQUERADE"),
    (restore("nat", f'-A {NAT_CHAIN} -j SNAT --to-source 198.18.0.1'), "SNAT"),
    (restore("nat", HOOK.replace("POSTROUTING", "PREROUTING")), "nat/PREROUTING"),
    (restore("nat", HOOK.replace(NAT_CHAIN, "weft-FORWARD")), "hook"),
    (restore("nat", "-A POSTROUTING -j MASQUERADE"), "POSTROUTING"),
])
def test_guard_refuses_any_other_masquerade(text, why):
    with pytest.raises(guard.Refused, match=why):
        guard.check_iptables(text)


# --- on a real kernel ---------------------------------------------------------------------------------

if nodens.usable() is None:
    node_ns = nodens.node_ns
kernel = pytest.mark.skipif(nodens.usable() is not None, reason=str(nodens.usable()))

PORT = 7777
GATEWAY, HOST_MAC = "169.254.1.1", "ee:ee:ee:ee:ee:ee"
NODE_UP, ROUTER = "198.19.0.1", "198.19.0.2"
NODE_SNAT = "198.19.0.3"                              # the node's second address: natOutgoingAddress
A_IP, B_IP = "198.18.4.1", "198.18.9.1"              # pod a: pool masq (natOutgoing); pod b: pool plain
OTHER_POOL, DISABLED_POOL = "198.18.8.5", "198.18.10.5"    # addresses of pools, on the router
ECHO = ("import socket,sys\nfamily=socket.AF_INET6 if sys.argv[1:]==['6'] else socket.AF_INET\n"
        "s=socket.socket(family,socket.SOCK_DGRAM)\n"
        "if family==socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1)\n"
        "s.bind(('::' if family==socket.AF_INET6 else '0.0.0.0',PORT))\n"
        "print('ready',flush=True)\nwhile True:\n d,a=s.recvfrom(64)\n s.sendto(f'{a[0]} {a[1]}'.encode(),a)\n"
        ).replace("PORT", str(PORT))
ASK = ("import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,"
       "socket.SOCK_DGRAM)\ns.settimeout(1.5)\n"
       "for _ in range(3):\n s.sendto(b'?',(sys.argv[1],PORT))\n try:\n  print(s.recv(64).decode()); break\n"
       " except TimeoutError: pass\nelse: print('timeout')\n").replace("PORT", str(PORT))
# IPv6 (the same topology, dual-stack): pods a and b, the node's and router's link, another pool.
A6, B6, NODE_UP6, ROUTER6, OTHER_POOL6 = "2001:db8:4::1", "2001:db8:9::1", "2001:db8:ff::1", "2001:db8:ff::2", \
    "2001:db8:8::5"
GATEWAY6 = "fe80::ecee:eeff:feee:eeee"               # the host side's link-local (from its MAC)

FOREIGN_NAT = """\
*nat
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 198.18.250.0/24 -j MASQUERADE
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
COMMIT
"""


class Net:
    """The node namespace, pods a and b wired like Calico's, and the router behind the node."""

    def __init__(self, stack: ExitStack, node: str, v6: bool = False):
        self.node = node
        self.a, self.b, self.router = (stack.enter_context(nodens.node_netns()) for _ in range(3))
        nodens.in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for netns, name, ip, ip6 in ((self.a, "a", A_IP, A6), (self.b, "b", B_IP, B6)):
            iface = host_iface_name("ns1", name)
            nodens.in_ns(node, "ip", "-batch", "-", stdin="\n".join([
                f"link add {iface} address {HOST_MAC} type veth peer name eth0 netns {netns}",
                f"link set {iface} up"]) + "\n")
            nodens.in_ns(netns, "ip", "-batch", "-", stdin="\n".join([
                "link set eth0 up", f"addr add {ip}/32 dev eth0",
                f"neigh add {GATEWAY} lladdr {HOST_MAC} dev eth0 nud permanent",
                f"route add default via {GATEWAY} dev eth0 onlink",
                *([f"addr add {ip6}/128 dev eth0 nodad",
                   f"neigh add {GATEWAY6} lladdr {HOST_MAC} dev eth0 nud permanent",
                   f"route add ::/0 via {GATEWAY6} dev eth0"] if v6 else [])]) + "\n")
        if v6:
            nodens.in_ns(node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        nodens.in_ns(node, "ip", "-batch", "-", stdin="\n".join([
            f"link add up0 type veth peer name up0 netns {self.router}", "link set up0 up",
            f"addr add {NODE_UP}/24 dev up0", f"addr add {NODE_SNAT}/24 dev up0",
            f"route add 198.18.8.0/24 via {ROUTER}", f"route add 198.18.10.0/24 via {ROUTER}"]) + "\n")
        nodens.in_ns(self.router, "ip", "-batch", "-", stdin="\n".join([
            "link set up0 up", f"addr add {ROUTER}/24 dev up0",
            f"addr add {OTHER_POOL}/32 dev lo", f"addr add {DISABLED_POOL}/32 dev lo",
            f"route add 198.18.4.0/24 via {NODE_UP}", f"route add 198.18.9.0/24 via {NODE_UP}"]) + "\n")
        if v6:
            nodens.in_ns(node, "ip", "-batch", "-", stdin="\n".join([
                f"addr add {NODE_UP6}/64 dev up0 nodad", f"route add 2001:db8:8::/64 via {ROUTER6}"]) + "\n")
            nodens.in_ns(self.router, "ip", "-batch", "-", stdin="\n".join([
                f"addr add {ROUTER6}/64 dev up0 nodad", f"addr add {OTHER_POOL6}/128 dev lo",
                f"route add 2001:db8:4::/64 via {NODE_UP6}", f"route add 2001:db8:9::/64 via {NODE_UP6}"]) + "\n")
        self.servers = [self._serve(ns, family) for ns in (self.router, self.b) for family in ("4", "6")[:1 + v6]]
        stack.callback(self._stop)

    def _serve(self, netns: str, family: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", ECHO, family],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def _stop(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()

    def seen(self, src: str, dst: str, port: bool = False) -> str:
        """The source address (`port`: and port, "address port") `dst` saw a datagram from pod
        `src` ("a", "b") come from."""
        netns = {"a": self.a, "b": self.b}[src]
        nodens.in_ns(self.node, "conntrack", "-F", check=False)
        answer = nodens.in_ns(netns, sys.executable, "-I", "-S", "-c", ASK, dst).strip()
        return answer if port else answer.split()[0]

    def all_seen(self) -> dict[tuple[str, str], str]:
        return {(s, d): self.seen(s, d) for s, d in (("a", ROUTER), ("a", OTHER_POOL), ("a", DISABLED_POOL),
                                                      ("a", B_IP), ("b", ROUTER))}


def cluster(nat: bool, *extra: dict) -> list[dict]:
    pools = [pool("masq", "198.18.4.0/24", natOutgoing=nat), pool("plain", "198.18.9.0/24"),
             pool("other", "198.18.8.0/24"), pool("old", "198.18.10.0/24", disabled=True)]
    return [namespace("ns1"), pod("ns1", "a", A_IP), pod("ns1", "b", B_IP), *pools, *extra]


def felix(name: str = "default", **spec) -> dict:
    return {"apiVersion": CRD, "kind": "FelixConfiguration", "metadata": {"name": name}, "spec": spec}


UNCHANGED = {("a", ROUTER): A_IP, ("a", OTHER_POOL): A_IP, ("a", DISABLED_POOL): A_IP, ("a", B_IP): A_IP,
             ("b", ROUTER): B_IP}
MASQUERADED = {**UNCHANGED, ("a", ROUTER): NODE_UP}


def nat_part(node: WeftNode) -> dict[str, str]:
    """weft's and the foreign lines of the node's nat table (nodens.split_iptables_save)."""
    save = nodens.in_ns(node.ns, f"{node.iptables}-save", "-t", "nat")
    return nodens.split_iptables_save(save)


@kernel
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_natoutgoing_on_the_kernel(node_ns, tmp_path: Path, backend):
    with ExitStack() as stack:
        net = Net(stack, node_ns)
        node = WeftNode(node_ns, tmp_path / "state", backend)
        nodens.in_ns(node_ns, f"iptables-{backend}-restore", "--noflush", stdin=FOREIGN_NAT)
        foreign = nat_part(node)["foreign"]
        src = tmp_path / "src"

        # Without natOutgoing: nothing of weft's in nat, every source address is the pod's own.
        node.weft("apply", from_dir=write_manifests(src, cluster(nat=False)))
        assert nat_part(node) == {"weft": "", "foreign": foreign}
        assert net.all_seen() == UNCHANGED

        # natOutgoing on: only pool traffic to outside every pool leaves with the node's address.
        plan = node.weft_json("plan", from_dir=write_manifests(src, cluster(nat=True)))
        assert {(c["table"], c["name"], c["action"]) for c in plan["changes"]["chains"]} == \
            {("nat", NAT_CHAIN, "create")}
        node.weft("apply", from_dir=src)
        assert net.all_seen() == MASQUERADED
        assert nat_part(node)["foreign"] == foreign
        # Felix's feature detection, as weft runs it on this node: --random-fully where supported.
        fully = backend_probe.nat_features(Runner(), backend_probe.Backend(backend))["MASQFullyRandom"]
        assert ("-j MASQUERADE --random-fully" in nat_part(node)["weft"]) == fully, nat_part(node)["weft"]
        node.weft("drift", from_dir=src, expect=0)
        assert node.weft_json("plan", from_dir=src)["summary"] == {"add": 0, "change": 0, "destroy": 0}

        # A hand-edited rule and a removed hook are drift, named; apply repairs them.
        iptables = f"iptables-{backend}"
        nodens.in_ns(node_ns, iptables, "-t", "nat", "-A", NAT_CHAIN, "-j", "RETURN")
        hook = next(line for line in nat_part(node)["weft"].splitlines() if "-A POSTROUTING" in line)
        nodens.in_ns(node_ns, iptables, "-t", "nat", "-D", *shlex.split(hook.split(": ", 1)[1])[1:])
        drift = node.weft("drift", from_dir=src, expect=2).stdout
        assert f"nat/{NAT_CHAIN}" in drift and "-j RETURN" in drift and "nat/POSTROUTING" in drift, drift
        assert net.seen("a", ROUTER) == A_IP                        # the hook is gone: not masqueraded
        node.weft("apply", from_dir=src)
        node.weft("drift", from_dir=src, expect=0)
        assert net.all_seen() == MASQUERADED

        # Destroy: weft's nat chain, hook and sets go; the foreign nat rules stay byte for byte.
        node.weft("apply", "--destroy", from_dir=src)
        assert nat_part(node) == {"weft": "", "foreign": foreign}
        assert not [n for n in nodens.weft_names(node_ns) if "weft" in n]


@kernel
def test_natoutgoing_address_and_port_range_on_the_kernel(node_ns, tmp_path: Path):
    """FelixConfiguration natOutgoingAddress: SNAT to that address instead; natPortRange: TCP and
    UDP get source ports from that range (per node over default, as Felix merges them)."""
    with ExitStack() as stack:
        net = Net(stack, node_ns)
        node = WeftNode(node_ns, tmp_path / "state")
        src = tmp_path / "src"
        node.weft("apply", from_dir=write_manifests(src, cluster(True, felix(natPortRange="40000:40009"))))
        address, port = net.seen("a", ROUTER, port=True).split()
        assert address == NODE_UP and 40000 <= int(port) <= 40009
        node.weft("apply", from_dir=write_manifests(src, cluster(True, felix(natPortRange="40000:40009"),
                                                                 felix("node.n1", natOutgoingAddress=NODE_SNAT))))
        address, port = net.seen("a", ROUTER, port=True).split()
        assert address == NODE_SNAT and 40000 <= int(port) <= 40009
        assert net.all_seen() == {**MASQUERADED, ("a", ROUTER): NODE_SNAT}
        node.weft("drift", from_dir=src, expect=0)
        node.weft("apply", "--destroy", from_dir=src)
        assert nat_part(node)["weft"] == ""


def test_natoutgoing_rules_follow_felix_configuration():
    address = felix(natOutgoingAddress="198.18.0.7", natPortRange="1024:2047")
    chains, _, _ = render_nat_outgoing(state_of([*POOLS, address]), 4, "n1")
    rules = chains[("nat", NAT_CHAIN)].rules
    assert [r.split(" -j ", 1)[1] for r in rules] == ["SNAT --to-source 198.18.0.7:1024-2047"] * 2 + \
        ["SNAT --to-source 198.18.0.7"]
    assert rules[0].startswith(f"-A {NAT_CHAIN} -p tcp ") and rules[1].startswith(f"-A {NAT_CHAIN} -p udp ")
    guard.check_iptables(restore("nat", f":{NAT_CHAIN} - [0:0]", *rules))
    v6, _, _ = render_nat_outgoing(state_of([*POOLS, address]), 6, "n1")     # the address is IPv4's
    assert [r.split(" -j ", 1)[1] for r in v6[("nat6", NAT_CHAIN)].rules] == ["MASQUERADE --to-ports 1024-2047"] * 2 \
        + ["MASQUERADE"]
    for bad in (" -j SNAT --to-source 2001:db8::1", " -j SNAT --to-source 198.18.0.7 --random",
                " -j MASQUERADE --to-ports 1024", " -j DNAT --to-destination 198.18.0.7"):
        with pytest.raises(guard.Refused):
            guard.check_iptables(restore("nat", rules[2].split(" -j ", 1)[0] + bad))


def test_random_fully_where_the_node_supports_it():
    """Felix's MASQFullyRandom / SNATFullyRandom (detected per node: probes.backend.nat_features):
    every natOutgoing rule takes --random-fully there, and only there; the guard allows it only
    at the end of natOutgoing's rules."""
    supported = {"MASQFullyRandom": True, "SNATFullyRandom": True}
    plain = state_of(POOLS)
    assert not plain.felix_settings("n1").masq_fully_random
    chains, _, _ = render_nat_outgoing(plain.with_node_features("n1", supported), 4, "n1")
    [rule] = chains[("nat", NAT_CHAIN)].rules
    assert rule.endswith("-j MASQUERADE --random-fully")
    guard.check_iptables(restore("nat", f":{NAT_CHAIN} - [0:0]", rule))
    other, _, _ = render_nat_outgoing(plain.with_node_features("n2", supported), 4, "n1")
    assert not other[("nat", NAT_CHAIN)].rules[0].endswith("--random-fully")
    shaped = state_of([*POOLS, felix(natOutgoingAddress="198.18.0.7", natPortRange="1024:2047")])
    chains, _, _ = render_nat_outgoing(shaped.with_node_features("n1", supported), 4, "n1")
    rules = chains[("nat", NAT_CHAIN)].rules
    assert [r.split(" -j ", 1)[1] for r in rules] == ["SNAT --to-source 198.18.0.7:1024-2047 --random-fully"] * 2 + \
        ["SNAT --to-source 198.18.0.7 --random-fully"]
    guard.check_iptables(restore("nat", f":{NAT_CHAIN} - [0:0]", *rules))
    v6, _, _ = render_nat_outgoing(shaped.with_node_features("n1", supported), 6, "n1")
    assert [r.split(" -j ", 1)[1] for r in v6[("nat6", NAT_CHAIN)].rules] == \
        ["MASQUERADE --to-ports 1024-2047 --random-fully"] * 2 + ["MASQUERADE --random-fully"]
    for bad in (" --random-fully --random-fully", " --random", " --random-fully -j ACCEPT"):
        with pytest.raises(guard.Refused):
            guard.check_iptables(restore("nat", rule.replace(" --random-fully", bad)))


def test_nat_features_follow_the_iptables_and_kernel_versions():
    assert backend_probe._version("iptables v1.8.9 (nf_tables)") == (1, 8, 9)
    assert backend_probe._version("6.18.44-fc-v1147") == (6, 18, 44)
    assert backend_probe._version("3.13") == (3, 13, 0) and backend_probe._version("no version") == ()


@kernel
@pytest.mark.skipif(not Path("/proc/net/if_inet6").exists(), reason="IPv6 is not enabled in this kernel")
def test_natoutgoing_ipv6_on_the_kernel(node_ns, tmp_path: Path):
    """IPv6 pools: the same in ip6tables' nat table (weft-masq6-pools / weft-all6-pools)."""
    with ExitStack() as stack:
        net = Net(stack, node_ns, v6=True)
        node = WeftNode(node_ns, tmp_path / "state")
        pools6 = [pool("masq6", "2001:db8:4::/64", natOutgoing=True), pool("plain6", "2001:db8:9::/64"),
                  pool("other6", "2001:db8:8::/64")]
        objects = [namespace("ns1"), pod("ns1", "a", A_IP, ip6=A6), pod("ns1", "b", B_IP, ip6=B6),
                   pool("plain", "198.18.0.0/16"), *pools6]
        src = write_manifests(tmp_path / "src", objects)
        node.weft("apply", from_dir=src)
        seen = {(s, d): net.seen(s, d) for s, d in (("a", ROUTER6), ("a", OTHER_POOL6), ("a", B6), ("b", ROUTER6),
                                                     ("a", ROUTER))}
        assert seen == {("a", ROUTER6): NODE_UP6, ("a", OTHER_POOL6): A6, ("a", B6): A6, ("b", ROUTER6): B6,
                        ("a", ROUTER): A_IP}, seen                 # no IPv4 pool has natOutgoing here
        save6 = nodens.in_ns(node_ns, "ip6tables-nft-save", "-t", "nat")
        assert f"-j {NAT_CHAIN}" in save6 and "weft-masq6-pools" in save6
        assert NAT_CHAIN not in nodens.in_ns(node_ns, "iptables-nft-save", "-t", "nat")
        node.weft("drift", from_dir=src, expect=0)
        node.weft("apply", "--destroy", from_dir=src)
        assert NAT_CHAIN not in nodens.in_ns(node_ns, "ip6tables-nft-save", "-t", "nat")


def test_an_ebpf_node_keeps_natoutgoing():
    """natOutgoing is not policy: a node whose policy plane is eBPF keeps the nat tables and sets."""
    from weft.renderers.bpf_policy import host_dataplane
    rendered = render_node(state_of(POOLS), "n1")
    kept = host_dataplane(rendered)
    assert {k for k in kept.chains if k[0].startswith("nat")} == {("nat", NAT_CHAIN), ("nat6", NAT_CHAIN)}
    assert {k for k in kept.hooks if k[0].startswith("nat")} == {("nat", "POSTROUTING"), ("nat6", "POSTROUTING")}
    assert {MASQ_SET, ALL_SET, "weft-masq6-pools", "weft-all6-pools"} <= set(kept.ipsets)
