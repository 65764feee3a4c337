"""The write guard (reconciler.guard), fed hostile writes: each is refused, naming what; the
writes weft renders pass. No kernel needed: the guard judges the data before anything runs, and
reconciler.apply runs nothing of an apply with one refused write."""
from __future__ import annotations

import pytest

from tests.nodens import namespace, pod, policy
from weft.desired.loader import build_cluster_state
from weft.model.kernel import EMPTY
from weft.probes.runner import Runner
from weft.reconciler import guard
from weft.reconciler.apply import Executor
from weft.reconciler.engine import restore_texts
from weft.reconciler.resource import BirdWrite, Restore, RouteWrite, Step, SysctlWrite
from weft.renderers.iptables import render_node

IPT = ("iptables-nft-restore", "--noflush")
IP6T = ("ip6tables-nft-restore", "--noflush")
IPSET = ("ipset", "restore")
HOOK = '-I FORWARD 1 -m comment --comment "weft:abcDEF12_-" -j weft-FORWARD'
KNOWN = guard.Known({"weft-s-known": ("hash:ip", "inet"), "weft-n-nets": ("hash:net", "inet")})


def table(*lines: str, name: str = "filter") -> str:
    return "\n".join([f"*{name}", *lines, "COMMIT"]) + "\n"


def refused(write, match: str) -> None:
    with pytest.raises(guard.Refused, match=match):
        guard.check([Step(write, "test")], KNOWN)


# --- what weft renders passes ---------------------------------------------------------------

def test_what_weft_renders_passes():
    """Both families: a dual-stack pod's IPv4 and IPv6 sets, iptables and ip6tables input."""
    objects = [namespace("a"), namespace("b", team="b"),
               pod("a", "web", "198.18.0.10", {"app": "web"}, ports=(("http", 80, "TCP"),), ip6="2001:db8::a"),
               pod("b", "c", "198.18.0.20", {"app": "c"}, ip6="2001:db8::14"),
               policy("a", "p", {"podSelector": {}, "ingress": [
                   {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}},
                             {"ipBlock": {"cidr": "198.18.0.0/15", "except": ["198.18.1.0/24", "198.18.2.0/24"]}},
                             {"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48", "2001:db8:2::/48"]}}],
                    "ports": [{"port": "http"}, {"protocol": "UDP", "port": 53}]}]})]
    dp = render_node(build_cluster_state([("t.yaml", o) for o in objects]), "n1")
    texts = restore_texts(dp, EMPTY)
    assert len(texts) == 3 and texts[0].startswith("create ") and texts[1].startswith("*filter")
    assert "family inet6" in texts[0] and "add weft-s6-" in texts[0] and "2001:db8::14" in texts[0]
    assert "-p ipv6-icmp" in texts[2] and "-s 198.18" not in texts[2] and "2001:db8" not in texts[1]
    guard.check([Step(Restore(IPSET, texts[0]), "sets"), Step(Restore(IPT, texts[1]), "table"),
                 Step(Restore(IP6T, texts[2]), "table6")], KNOWN)
    removal = restore_texts(EMPTY, dp)
    guard.check([Step(Restore(IPT if t.startswith("*") else IPSET, t), "x") for t in removal], KNOWN)
    guard.check([Step(Restore(IP6T, t), "x") for t in removal if t.startswith("*")], KNOWN)
    guard.check([Step(Restore(IPT, table(HOOK, '-D INPUT -m comment --comment "weft:x" -j weft-INPUT')), "h")],
                KNOWN)
    guard.check([Step(RouteWrite(False, "198.18.0.10/32", "weft0123456789a"), "r"),
                 Step(RouteWrite(False, "2001:db8::10/128", "weft0123456789a"), "r"),
                 Step(RouteWrite(False, "198.18.4.0/26", None, "blackhole"), "r"),
                 Step(RouteWrite(True, "198.18.0.10/32"), "r"),
                 Step(SysctlWrite("net/ipv4/conf/weft0123456789a/rp_filter", "1"), "s"),
                 Step(SysctlWrite("net/ipv6/conf/weft0123456789a/accept_ra", "0"), "s"),
                 Step(BirdWrite("bird.conf", "router id 1.2.3.4;\n", "/run/bird.ctl", None), "b")], KNOWN)


# --- iptables -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    (table(":weft-x - [0:0]", "-A weft-x -p tcp -j DNAT --to-destination 198.18.9.9", name="nat"), "DNAT"),
    (table("-A PREROUTING -j DNAT --to-destination 198.18.9.9", name="nat"), "nat/PREROUTING"),
    (table("-A INPUT -j ACCEPT"), "INPUT"),
    (table("-I INPUT 1 -j ACCEPT"), "other than weft's hook"),
    (table('-I FORWARD 1 -m comment --comment "weft:x" -j weft-INPUT'), "other than weft's hook"),
    (table("-D INPUT -p tcp --dport 22 -j ACCEPT"), "not weft's"),
    (table(":KUBE-SERVICES - [0:0]"), "not weft's"),
    (table("-X KUBE-SERVICES"), "not weft's"),
    (table("-F"), "not a rule"),
    (table("-X"), "not a rule"),
    (table("-F INPUT"), "INPUT"),
    (table(":FORWARD DROP [0:0]"), "policy"),
    (table("-P FORWARD ACCEPT"), "FORWARD"),
    (table("-E weft-x KUBE-x"), "not a change weft makes"),
    (table("-A weft-x -j KUBE-SERVICES"), "KUBE-SERVICES"),
    (table("-A weft-x -g DOCKER"), "DOCKER"),
    (table("-A weft-x -m set --match-set KUBE-xyz src -j ACCEPT"), "KUBE-xyz"),
    (table("-A weft-x -j ACCEPT -A INPUT"), "more than one command"),
    (table("-A weft-x\t-j KUBE-SERVICES"), "control characters"),
    (table("-A weft-x -j ACCEPT --append INPUT -j ACCEPT"), "more than one command"),
    (table("-A weft-x -t nat -j ACCEPT"), "more than one command"),
    (table(":weft-x - [0:0]", name="security"), "security"),
    ("-A weft-x -j ACCEPT\n", "outside any table"),
    ("*filter\n:weft-x - [0:0]\n", "not committed"),
])
def test_iptables_input_touching_what_weft_does_not_own_is_refused(text, match):
    refused(Restore(IPT, text), match)


def test_iptables_restore_without_noflush_is_refused():
    refused(Restore(("iptables-nft-restore",), table(":weft-x - [0:0]")), "noflush")
    refused(Restore(("ip6tables-legacy-restore", "-w", "5"), table(":weft-x - [0:0]")), "noflush")


@pytest.mark.parametrize("text, match", [
    (table("-A INPUT -p ipv6-icmp -j ACCEPT"), "INPUT"),
    (table("-I INPUT 1 -s 2001:db8::/32 -j ACCEPT"), "other than weft's hook"),
    (table("-A weft-x -s 2001:db8::/32 -j KUBE-SERVICES"), "KUBE-SERVICES"),
    (table("-A weft-x -m set --match-set KUBE-6 src -j ACCEPT"), "KUBE-6"),
    (table(":weft-x - [0:0]", name="nat"), None),
])
def test_ip6tables_input_is_judged_as_iptables_input(text, match):
    """The IPv6 family's input passes the same checks (the table is "filter" in both tools)."""
    if match is None:
        guard.check([Step(Restore(IP6T, text), "x")], KNOWN)
    else:
        refused(Restore(IP6T, text), match)


def test_only_the_restore_tools_are_run():
    refused(Restore(("sh", "-c", "reboot"), ""), "not a tool weft writes with")


# --- ipset ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("create foo hash:ip family inet\n", "not weft's"),
    ("add KUBE-xyz 198.18.0.1\n", "not weft's"),
    ("destroy KUBE-xyz\n", "not weft's"),
    ("flush\n", "not weft's"),
    ("swap weft-a weft-b\n", "not weft's sets of one type"),
    ("swap weft-s-known KUBE-xyz\n", "not weft's"),
    ("swap weft-s-known weft-n-nets\n", "not weft's sets of one type"),
    ("create weft-t hash:ip family inet6\nswap weft-t weft-s-known\n", "not weft's sets of one type"),
    ("rename weft-a foo\n", "not a change weft makes"),
    ("create weft-x list:set\n", "list:set"),
    ("create weft-x hash:ip family inet hashsize 1 maxelem 1\n", "hashsize 1"),
    ("create weft-x hash:ip family inet maxelem 1000000000\n", "maxelem 1000000000"),
    ("create weft-x hash:ip family inet maxelem 100000\n", "maxelem 100000"),
    ("create weft-x hash:ip family inet timeout 5\n", "options"),
    ("create weft-x hash:ip family inet maxelem 65536 maxelem 65536\n", "options"),
    ("create weft-x hash:ip family inet6\nadd weft-x 2001:db8::/64\n", "not a member"),
    ("create weft-x hash:ip family inet6\nadd weft-x 2001:db8::g\n", "not a member"),
    ("create weft-x hash:ip,port family inet6\nadd weft-x 2001:db8::1,tcp:65536\n", "not a member"),
    ("add weft-s-known 198.18.0.300\n", "not a member"),
    ("add weft-s-known 198.18.0.0/24\n", "not a member"),
    ("add weft-s-known 198.18.0.1 timeout 0\n", "options"),
    ("add weft-n-nets 198.18.0.0/33\n", "not a member"),
    ("add weft-unknown 198.18.0.1\n", "does not know"),
    ("create weft-p hash:ip,port family inet\nadd weft-p 198.18.0.1,tcp:70000\n", "not a member"),
    ("create weft-6 hash:ip family inet6\nadd weft-6 198.18.0.1\n", "not a member"),
    ("create weft-4 hash:ip family inet\nadd weft-4 2001:db8::1\n", "not a member"),
])
def test_ipset_input_touching_what_weft_does_not_own_is_refused(text, match):
    refused(Restore(IPSET, text), match)


def test_ipset_members_valid_for_their_type_pass():
    guard.check([Step(Restore(IPSET, "create weft-p hash:ip,port family inet\nadd weft-p 198.18.0.1,sctp:9000\n"
                                     "create weft-6 hash:net family inet6\nadd weft-6 2001:db8::/32\n"
                                     "add weft-n-nets 198.18.0.0/16\nadd weft-n-nets 198.18.0.1\n"
                                     "del weft-s-known 198.18.0.2\ndestroy weft-s-known\n"), "x")], KNOWN)


def test_a_resize_passes():
    """A set outgrowing its size: a bigger one filled under a temporary name and swapped in."""
    text = ("create weft-t-s-known hash:ip family inet hashsize 65536 maxelem 131072\n"
            "add weft-t-s-known 198.18.0.1\nswap weft-t-s-known weft-s-known\ndestroy weft-t-s-known\n")
    guard.check([Step(Restore(IPSET, text), "x")], KNOWN)


# --- routes and sysctls ---------------------------------------------------------------------

@pytest.mark.parametrize("write, match", [
    (RouteWrite(False, "198.18.0.10/32", "weft0123456789a", proto=4), "protocol 4"),
    (RouteWrite(True, "198.18.0.10/32", proto=2), "protocol 2"),
    (RouteWrite(False, "0.0.0.0/0", "weft0123456789a"), "pods' addresses only"),
    (RouteWrite(False, "198.18.0.0/24", "weft0123456789a"), "pods' addresses only"),
    (RouteWrite(False, "198.18.0.10/32", "eth0"), "not a weft interface"),
    (RouteWrite(False, "198.18.0.10/32", None), "not a weft interface"),
    (RouteWrite(False, "0.0.0.0/0", None, "blackhole"), "blocks"),
    (RouteWrite(False, "198.18.0.10/32", "weft0123456789a", "nat"), "type"),
    (RouteWrite(False, "not-a-net", "weft0123456789a"), "not a network"),
])
def test_routes_weft_does_not_own_are_refused(write, match):
    refused(write, match)


@pytest.mark.parametrize("key, value, match", [
    ("../../tmp/x", "1", "not an interface setting"),
    ("net/ipv4/conf/../../../../tmp/x/forwarding", "1", "not an interface setting"),
    ("net/ipv4/conf/eth0/forwarding", "1", "not a weft interface"),
    ("net/ipv4/conf/all/forwarding", "1", "not a weft interface"),
    ("net/ipv4/conf/weft0123456789a/route_localnet", "1", "does not set route_localnet"),
    ("net/ipv4/ip_forward", "1", "not an interface setting"),
    ("net/ipv4/conf/weft0123456789a/rp_filter", "1; reboot", "writes 0, 1 or 2"),
])
def test_sysctls_weft_does_not_own_are_refused(key, value, match):
    refused(SysctlWrite(key, value), match)


def test_bird_writes_only_its_file():
    refused(BirdWrite("../../etc/passwd", "x", "/s", None), "not '../../etc/passwd'")


def test_one_refused_write_and_nothing_of_the_apply_runs():
    """The executor checks every step first: a good first step does not run when a later one is
    refused (the runner would record any command it ran)."""
    runner = Runner()
    steps = [Step(SysctlWrite("net/ipv4/conf/weft0123456789a/rp_filter", "1"), "fine"),
             Step(Restore(IPT, table("-A INPUT -j ACCEPT")), "iptables-nft-restore (table filter)")]
    with pytest.raises(guard.Refused) as info:
        Executor(runner).run(steps, KNOWN)
    assert runner.writes == [] and "nothing was applied" in str(info.value)
    assert "iptables-nft-restore (table filter)" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind, member", [
    ("hash:ip", lambda i: f"2001:db8::{i:x}"),
    ("hash:net", lambda i: f"2001:db8:{i:x}::/48"),
    ("hash:ip,port", lambda i: f"2001:db8::1:{i:x},tcp:80"),
])
def test_a_bad_ipv6_member_deep_in_a_long_run_is_found(kind, member):
    good = f"create weft-big {kind} family inet6\n" + "".join(f"add weft-big {member(i)}\n" for i in range(5000))
    guard.check([Step(Restore(IPSET, good), "x")], KNOWN)
    for bad in ("198.18.0.1", "2001:db8::1::2", "2001:db8::/129", "2001:db8::1 timeout 5", "2001:db8::1\tx"):
        lines = good.split("\n")
        lines[3000] = f"add weft-big {bad}"
        with pytest.raises(guard.Refused, match="not a member|options"):
            guard.check([Step(Restore(IPSET, "\n".join(lines)), "x")], KNOWN)


def test_a_bad_member_deep_in_a_long_run_is_found():
    members = [f"198.18.{i // 250}.{i % 250}" for i in range(5000)]
    good = "create weft-big hash:ip family inet\n" + "".join(f"add weft-big {m}\n" for m in members)
    guard.check([Step(Restore(IPSET, good), "x"), Step(Restore(IPSET, good.rstrip("\n")), "no final newline")], KNOWN)
    for bad in ("198.18.0.256", "198.18.0.1 timeout 5", "198.18.0.1,tcp:80", "198.18.0.1\tx"):
        lines = good.split("\n")
        lines[3000] = f"add weft-big {bad}"
        with pytest.raises(guard.Refused, match="not a member|options"):
            guard.check([Step(Restore(IPSET, "\n".join(lines)), "x")], KNOWN)
