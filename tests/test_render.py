"""Rendering, pure and fast (no kernel): the desired model -> iptables lines and ipsets.

What is checked: the output is a function of the input's meaning only (same bytes for the same
state in any object order, in any process); chains do not grow with the number of pods a selector
matches; multiport's 15-port limit; IPv6 peers never become IPv4 rules; named ports resolve per
protocol; and the NetworkPolicy conversion details that are easy to get wrong.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from tests.nodens import REPO, namespace, pod, policy
from weft.desired.loader import build_cluster_state
from weft.model.cluster import EGRESS, INGRESS
from weft.model.kernel import EMPTY, Dataplane
from weft.model.names import host_iface_name
from weft.reconciler.engine import restore_texts
from weft.renderers.iptables import policy_chain_name, render_node

NODE = "n1"
NAMESPACES = [namespace("a", team="a"), namespace("b", team="b")]


def render(objects: list[dict]) -> tuple:
    state = build_cluster_state([("test.yaml", o) for o in objects])
    return state, render_node(state, NODE)


def kernel_input(dp: Dataplane) -> str:
    """Exactly what an apply on a bare node would feed the kernel tools."""
    return "\n".join(restore_texts(dp, EMPTY))


def policy_rules(state, dp: Dataplane, key: str, direction: str = INGRESS) -> tuple[str, ...]:
    """The rules of policy `key` ("ns/knp.default.name") for `direction`."""
    (pol,) = [p for p in state.policies if p.key == key]
    return dp.chains[("filter", policy_chain_name(pol, direction))].rules


def has_policy_chain(state, dp: Dataplane, key: str, direction: str) -> bool:
    (pol,) = [p for p in state.policies if p.key == key]
    return ("filter", policy_chain_name(pol, direction)) in dp.chains


def endpoint_rules(dp: Dataplane, ns: str, name: str, kind: str) -> tuple[str, ...]:
    return dp.chains[("filter", f"weft-{kind}-{host_iface_name(ns, name)}")].rules


def allow_rules(rules) -> list[str]:
    return [r for r in rules if "--set-xmark 0x10000/0x10000" in r]


def sets_of(rule: str) -> list[str]:
    return re.findall(r"--match-set (\S+) ", rule)


def members(dp: Dataplane, rule: str, set_type: str = "hash:ip") -> set[str]:
    """Members of the one set of `set_type` that `rule` matches on."""
    (name,) = [n for n in sets_of(rule) if dp.ipsets[n].type == set_type]
    return set(dp.ipsets[name].members)


# --- determinism -----------------------------------------------------------------------------

RICH = NAMESPACES + [
    pod("a", "web", "198.18.0.10", {"app": "web", "tier": "front"}, ports=(("http", 80, "TCP"), ("dns", 53, "UDP"))),
    pod("a", "db", "198.18.0.11", {"app": "db"}, ports=(("pg", 5432, "TCP"),)),
    pod("b", "web", "198.18.0.20", {"app": "web"}, ports=(("http", 8080, "TCP"), ("chat", 9000, "SCTP"))),
    pod("b", "far", "198.18.1.20", {"app": "client"}, node="n2"),
    policy("a", "web", {"podSelector": {"matchLabels": {"app": "web"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}},
                                              {"ipBlock": {"cidr": "198.18.0.0/15", "except": ["198.18.1.0/24"]}}],
                                     "ports": [{"port": "http"}, {"port": 443}, {"protocol": "UDP", "port": 53}]}]}),
    policy("a", "db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
                       "egress": [{"to": [{"ipBlock": {"cidr": "198.18.4.0/24"}},
                                          {"ipBlock": {"cidr": "2001:db8::/64"}}],
                                   "ports": [{"port": 1000, "endPort": 1100}]}]}),
    policy("b", "deny", {"podSelector": {}}),
    policy("b", "egress", {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]},
                           "egress": [{"to": [{"namespaceSelector": {}}],
                                       "ports": [{"protocol": "SCTP", "port": "chat"}]}]}),
]


def _reordered(objects: list[dict], seed: int) -> list[dict]:
    """The same objects in another order, with each pod's labels and ports listed in another order
    (neither order means anything)."""
    rng = random.Random(seed)
    result = json.loads(json.dumps(objects))
    rng.shuffle(result)
    for obj in result:
        meta = obj["metadata"]
        meta["labels"] = dict(reversed(list(meta.get("labels", {}).items())))
        for container in obj.get("spec", {}).get("containers", []):
            rng.shuffle(container["ports"])
    return result


def test_render_is_deterministic_in_any_input_order():
    _, dp = render(RICH)
    text = kernel_input(dp)
    assert "weft-pi-" in text and "weft-s-" in text and "weft-p-" in text and "weft-n-" in text
    assert kernel_input(render(RICH)[1]) == text
    for seed in range(6):
        _, other = render(_reordered(RICH, seed))
        assert other.to_json() == dp.to_json(), f"seed {seed}"
        assert kernel_input(other) == text, f"seed {seed}"
        assert other.fingerprint() == dp.fingerprint()


def test_fingerprint_changes_with_every_part_of_the_state():
    """A saved plan is refused when any of it changed: a rule, a set member, a hook, a route, a sysctl."""
    from dataclasses import replace

    from weft.model.kernel import Link, Route
    _, dp = render(RICH)
    chain_key, chain = next(iter(dp.chains.items()))
    set_name, ipset = next(iter(dp.ipsets.items()))
    hook_key, hooks = next(iter(dp.hooks.items()))
    variants = [
        replace(dp, chains={**dp.chains, chain_key: replace(chain, rules=chain.rules[:-1])}),
        replace(dp, ipsets={**dp.ipsets, set_name: replace(ipset, members=ipset.members | {"198.18.9.9"})}),
        replace(dp, ipsets={**dp.ipsets, set_name: replace(ipset, family="inet6")}),
        replace(dp, hooks={**dp.hooks, hook_key: replace(hooks, at_top=not hooks.at_top)}),
        replace(dp, routes={**dp.routes, "198.18.9.9/32": Route("198.18.9.9/32", "weftabc")}),
        replace(dp, links={**dp.links, "weftabc": Link("weftabc", (("net/ipv4/conf/weftabc/rp_filter", "1"),))}),
    ]
    prints = {dp.fingerprint(), *(v.fingerprint() for v in variants)}
    assert len(prints) == len(variants) + 1


RENDER_SNIPPET = """
import json, sys
from weft.desired.loader import build_cluster_state
from weft.reconciler.engine import restore_texts
from weft.renderers.iptables import render_node
objects = json.load(sys.stdin)
dp = render_node(build_cluster_state([("test.yaml", o) for o in objects]), "n1")
print("\\n".join(restore_texts(dp)))
"""


def test_render_is_the_same_in_every_process():
    """Nothing depends on Python's per-process string hashing (set and dict iteration order)."""
    outputs = set()
    for seed in ("0", "1", "12345"):
        proc = subprocess.run([sys.executable, "-c", RENDER_SNIPPET], input=json.dumps(RICH), text=True,
                              capture_output=True, cwd=REPO, env=os.environ | {"PYTHONHASHSEED": seed}, check=True)
        outputs.add(proc.stdout)
    assert outputs == {kernel_input(render(RICH)[1]) + "\n"}


# --- size ------------------------------------------------------------------------------------

def _selector_cluster(clients: int) -> list[dict]:
    remote = [pod("b", f"client-{i}", f"198.18.{2 + i // 250}.{1 + i % 250}", {"app": "client"}, node="n2",
                  ports=(("http", 80, "TCP"),)) for i in range(clients)]
    return NAMESPACES + remote + [
        pod("a", "target", "198.18.0.10", {"app": "target"}, ports=(("http", 80, "TCP"),)),
        policy("a", "from-clients", {"podSelector": {"matchLabels": {"app": "target"}},
                                     "ingress": [{"from": [{"namespaceSelector": {},
                                                            "podSelector": {"matchLabels": {"app": "client"}}}],
                                                  "ports": [{"port": "http"}]}]}),
        policy("a", "to-clients", {"podSelector": {}, "policyTypes": ["Egress"],
                                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    ]


def test_chains_do_not_grow_with_the_pods_a_selector_matches():
    small_state, small = render(_selector_cluster(10))
    big_state, big = render(_selector_cluster(500))
    assert small.chains == big.chains, "a chain depends on how many pods a selector matches"
    assert small.ipsets.keys() == big.ipsets.keys()
    rule = allow_rules(policy_rules(big_state, big, "a/knp.default.from-clients"))[0]
    assert len(members(small, rule)) == 10 and len(members(big, rule)) == 500
    egress = allow_rules(policy_rules(big_state, big, "a/knp.default.to-clients", EGRESS))[0]
    assert len(members(big, egress)) == 500


# --- multiport -------------------------------------------------------------------------------

def _ports_rules(ports: list[dict]) -> list[str]:
    state, dp = render(NAMESPACES + [
        pod("a", "p", "198.18.0.10", {"app": "p"}),
        policy("a", "ports", {"podSelector": {}, "ingress": [{"ports": ports}]})])
    return allow_rules(policy_rules(state, dp, "a/knp.default.ports"))


def _multiport_lists(rules: list[str]) -> list[list[str]]:
    lists = []
    for rule in rules:
        (spec,) = re.findall(r"-m multiport --dports (\S+)", rule)
        lists.append(spec.split(","))
    return lists


def _cost(items: list[str]) -> int:
    return sum(2 if ":" in i else 1 for i in items)


@pytest.mark.parametrize(("ports", "rules"), [
    ([{"port": p} for p in range(1, 16)], 1),                                   # exactly 15
    ([{"port": p} for p in range(1, 21)], 2),                                   # 20 singles
    ([{"port": p} for p in range(1, 46)], 3),                                   # 45 singles
    ([{"port": 1000 + 10 * i, "endPort": 1001 + 10 * i} for i in range(7)] + [{"port": 5}], 1),   # 7 ranges + 1 = 15
    ([{"port": 1000 + 10 * i, "endPort": 1001 + 10 * i} for i in range(8)], 2),                   # 8 ranges = 16
    ([{"port": p} for p in range(1, 15)] + [{"port": 100, "endPort": 200}], 2),                    # 14 + a range
])
def test_multiport_is_split_at_fifteen(ports, rules):
    found = _ports_rules(ports)
    lists = _multiport_lists(found)
    assert len(found) == rules
    assert all(_cost(items) <= 15 for items in lists), lists
    wanted = {str(p["port"]) if "endPort" not in p else f"{p['port']}:{p['endPort']}" for p in ports}
    got = [i for items in lists for i in items]
    assert sorted(got) == sorted(wanted), "ports lost or repeated when splitting"
    assert all(r.startswith("-A weft-pi-") and " -p tcp " in r for r in found)


# --- IPv6 ------------------------------------------------------------------------------------

def test_ipv6_only_ip_block_renders_no_ipv4_rule():
    state, dp = render(NAMESPACES + [
        pod("a", "p", "198.18.0.10", {"app": "p"}),
        policy("a", "v6-out", {"podSelector": {}, "policyTypes": ["Egress"],
                               "egress": [{"to": [{"ipBlock": {"cidr": "2001:db8::/32",
                                                               "except": ["2001:db8:1::/48"]}}]}]}),
        policy("a", "v6-and-v4-in", {"podSelector": {},
                                     "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8::/32"}},
                                                           {"ipBlock": {"cidr": "198.18.2.0/24"}},
                                                           {"ipBlock": {"cidr": "::/0"}}],
                                                  "ports": [{"port": 80}]}]}),
    ])
    assert allow_rules(policy_rules(state, dp, "a/knp.default.v6-out", EGRESS)) == []
    ingress = allow_rules(policy_rules(state, dp, "a/knp.default.v6-and-v4-in"))
    assert len(ingress) == 1 and " -s 198.18.2.0/24 " in ingress[0]
    assert not any(":" in m for s in dp.ipsets.values() for m in s.members if "," not in m)
    assert not any(re.search(r"[-sd] [0-9a-f]*:[0-9a-f:]*/", r) for c in dp.chains.values() for r in c.rules)
    # The pod is still isolated for egress: nothing is allowed, everything is dropped.
    assert endpoint_rules(dp, "a", "p", "fw")[-1].endswith("-j DROP")


def test_a_calico_rule_with_an_ip_version_is_rendered_in_that_family_only():
    state, dp = render(NAMESPACES + [
        pod("a", "p", "198.18.0.10", {"app": "p"}, ip6="2001:db8::10"),
        {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy", "metadata": {"namespace": "a", "name": "ipv"},
         "spec": {"selector": "app == 'p'", "types": ["Ingress"],
                  "ingress": [{"action": "Allow", "ipVersion": 6, "protocol": "TCP", "destination": {"ports": [80]}},
                              {"action": "Allow", "ipVersion": 4, "protocol": "TCP", "destination": {"ports": [81]}},
                              {"action": "Allow", "protocol": "TCP", "destination": {"ports": [82]}}]}},
    ])
    (pol,) = [p for p in state.policies if p.namespace == "a"]
    ports = {table: [r.split("--dports ")[1].split()[0] for r in allow_rules(
                 dp.chains[(table, policy_chain_name(pol, INGRESS))].rules)] for table in ("filter", "filter6")}
    assert ports == {"filter": ["81", "82"], "filter6": ["80", "82"]}


# --- named ports -----------------------------------------------------------------------------

NAMED_PODS = NAMESPACES + [
    pod("a", "p1", "198.18.0.1", {"app": "x"}, ports=(("web", 80, "TCP"), ("dns", 53, "UDP"))),
    pod("a", "p2", "198.18.0.2", {"app": "x"}, ports=(("web", 8080, "TCP"), ("dns", 5353, "TCP"))),
    pod("a", "p4", "198.18.0.4", {"app": "x"}),
    pod("b", "p3", "198.18.0.3", {"app": "y"}, ports=(("web", 8081, "UDP"),)),
    pod("b", "p6", "198.18.0.6", {"app": "y"}, ports=(("web", 82, "TCP"), ("ship", 9000, "SCTP"))),
]


def test_named_ports_resolve_per_protocol():
    dual = pod("a", "p5", "198.18.0.5", {"app": "x"}, ports=(("web", 81, "TCP"),))
    dual["status"]["podIPs"] = [{"ip": "198.18.0.5"}, {"ip": "2001:db8::5"}]
    state, dp = render(NAMED_PODS + [dual] + [
        policy("a", "web-in", {"podSelector": {"matchLabels": {"app": "x"}},
                               "ingress": [{"ports": [{"port": "web"}]}]}),
        policy("b", "web-udp-in", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP", "port": "web"},
                                                                             {"protocol": "SCTP", "port": "ship"}]}]}),
        policy("a", "dns-out", {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Egress"],
                                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "x"}}}],
                                            "ports": [{"protocol": "UDP", "port": "dns"},
                                                      {"protocol": "TCP", "port": "dns"}]}]}),
    ])
    (web_in,) = allow_rules(policy_rules(state, dp, "a/knp.default.web-in"))
    assert " -p tcp " in web_in and "dst,dst" in web_in
    assert dp.ipsets[sets_of(web_in)[0]].type == "hash:ip,port"
    tcp_web = {"198.18.0.1,tcp:80", "198.18.0.2,tcp:8080", "198.18.0.5,tcp:81", "198.18.0.6,tcp:82"}
    got = members(dp, web_in, "hash:ip,port")
    assert {"198.18.0.1,tcp:80", "198.18.0.2,tcp:8080", "198.18.0.5,tcp:81"} <= got <= tcp_web

    udp_in = allow_rules(policy_rules(state, dp, "b/knp.default.web-udp-in"))
    by_proto = {re.search(r" -p (\w+) ", r).group(1): members(dp, r, "hash:ip,port") for r in udp_in}
    assert set(by_proto) == {"udp", "sctp"}
    assert by_proto["udp"] == {"198.18.0.3,udp:8081"}, "a UDP named port must not match the TCP ports of that name"
    assert by_proto["sctp"] == {"198.18.0.6,sctp:9000"}

    dns_out = allow_rules(policy_rules(state, dp, "a/knp.default.dns-out", EGRESS))
    by_proto = {re.search(r" -p (\w+) ", r).group(1): r for r in dns_out}
    assert set(by_proto) == {"tcp", "udp"}
    assert members(dp, by_proto["udp"], "hash:ip,port") == {"198.18.0.1,udp:53"}
    assert members(dp, by_proto["tcp"], "hash:ip,port") == {"198.18.0.2,tcp:5353"}
    assert members(dp, by_proto["udp"]) == {"198.18.0.1", "198.18.0.2", "198.18.0.4", "198.18.0.5"}


# --- NetworkPolicy conversion details ----------------------------------------------------------

ONE_POD = NAMESPACES + [pod("a", "p", "198.18.0.10", {"app": "p"}), pod("b", "q", "198.18.0.20", {"app": "p"})]


@pytest.mark.parametrize(("spec", "types"), [
    ({"podSelector": {}}, {INGRESS}),
    ({"podSelector": {}, "ingress": [{}], "egress": []}, {INGRESS}),            # egress: [] is no egress section
    ({"podSelector": {}, "egress": [{}]}, {INGRESS, EGRESS}),
    ({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}, {EGRESS}),
    # The API server defaults an empty policyTypes list exactly like a missing one
    # (SetDefaults_NetworkPolicy: `if len(PolicyTypes) == 0`); a manifest directory must agree.
    ({"podSelector": {}, "policyTypes": [], "ingress": [{}]}, {INGRESS}),
    ({"podSelector": {}, "policyTypes": [], "ingress": [{}], "egress": [{}]}, {INGRESS, EGRESS}),
], ids=["nothing", "egress-empty-list", "egress-rules", "egress-only-with-ingress-rules",
        "empty-types-list", "empty-types-list-with-egress"])
def test_policy_types_default(spec, types):
    state, dp = render(ONE_POD + [policy("a", "pt", spec)])
    (pol,) = state.policies
    assert pol.types == types
    for direction, kind in ((INGRESS, "tw"), (EGRESS, "fw")):
        isolated = direction in types
        assert has_policy_chain(state, dp, pol.key, direction) == isolated
        rules = endpoint_rules(dp, "a", "p", kind)
        assert (rules[-1].endswith("-j DROP") if isolated else rules == ()), (direction, rules)
    if INGRESS not in types:
        assert pol.ingress == ()
    assert endpoint_rules(dp, "b", "q", "tw") == () and endpoint_rules(dp, "b", "q", "fw") == (), \
        "a policy selects pods of its own namespace only"


def test_ingress_empty_list_denies_and_empty_rule_allows():
    state, dp = render(ONE_POD + [policy("a", "deny", {"podSelector": {}, "ingress": []}),
                                  policy("b", "allow", {"podSelector": {}, "ingress": [{}]})])
    assert allow_rules(policy_rules(state, dp, "a/knp.default.deny")) == []
    (allow,) = allow_rules(policy_rules(state, dp, "b/knp.default.allow"))
    assert allow.startswith("-A weft-pi-")
    assert "--match-set" not in allow and " -s " not in allow and " -p " not in allow


def test_ip_block_except_is_normalised():
    spelled = [("one", "198.18.3.4/15", ["198.18.1.7/24", "198.18.1.0/24", "198.18.2.9/32"]),
               ("two", "198.18.0.0/15", ["198.18.2.9/32", "198.18.1.0/24"])]
    state, dp = render(ONE_POD + [
        policy("a", name, {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr, "except": exc}}]}]})
        for name, cidr, exc in spelled])
    rules = [allow_rules(policy_rules(state, dp, f"a/knp.default.{name}"))[0] for name, _, _ in spelled]
    for rule in rules:
        assert " -s 198.18.0.0/15 " in rule and "-m set ! --match-set weft-n-" in rule
    assert sets_of(rules[0]) == sets_of(rules[1]), "the same except list must map to the same set"
    (name,) = sets_of(rules[0])
    assert dp.ipsets[name].type == "hash:net"
    assert set(dp.ipsets[name].members) == {"198.18.1.0/24", "198.18.2.9"}
    (pol,) = [p for p in state.policies if p.key == "a/knp.default.one"]
    assert pol.ingress[0].source.nets == ("198.18.0.0/15",)
    assert pol.ingress[0].source.not_nets == ("198.18.1.0/24", "198.18.2.9/32")


@pytest.mark.parametrize(("ports", "expected"), [
    ([{"protocol": "UDP"}], ["udp:any"]),
    ([{"protocol": "TCP"}, {"protocol": "TCP", "port": 80}], ["tcp:any"]),
    ([{"port": 80}, {"protocol": "TCP"}], ["tcp:any"]),
    ([{"protocol": "TCP", "port": 80}, {"protocol": "UDP"}], ["tcp:80", "udp:any"]),
    ([{"protocol": "SCTP"}, {"port": 443}], ["sctp:any", "tcp:443"]),
])
def test_ports_with_protocol_only_open_the_whole_protocol(ports, expected):
    state, dp = render(ONE_POD + [policy("a", "pp", {"podSelector": {}, "ingress": [{"ports": ports}]})])
    found = []
    for rule in allow_rules(policy_rules(state, dp, "a/knp.default.pp")):
        proto = re.search(r" -p (\w+) ", rule).group(1)
        spec = re.search(r"--dports (\S+)", rule)
        found.append(f"{proto}:{spec.group(1) if spec else 'any'}")
    assert sorted(found) == expected


PEER_PODS = [namespace("a", team="a"), namespace("b", team="b"), namespace("c", team="c"),
             pod("a", "x1", "198.18.0.1", {"app": "x"}), pod("a", "y1", "198.18.0.2", {"app": "y"}),
             pod("b", "x2", "198.18.0.3", {"app": "x"}), pod("b", "y2", "198.18.0.4", {"app": "y"}),
             pod("c", "x3", "198.18.1.5", {"app": "x"}, node="n2")]


@pytest.mark.parametrize(("peer", "expected"), [
    ({"podSelector": {}}, {"198.18.0.1", "198.18.0.2"}),                                  # own namespace only
    ({"podSelector": {"matchLabels": {"app": "x"}}}, {"198.18.0.1"}),
    ({"namespaceSelector": {}}, {"198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.1.5"}),
    ({"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}},
     {"198.18.0.1", "198.18.0.3", "198.18.1.5"}),
    ({"namespaceSelector": {"matchLabels": {"team": "b"}}}, {"198.18.0.3", "198.18.0.4"}),
    ({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["b"]}]},
      "podSelector": {"matchLabels": {"app": "x"}}}, {"198.18.0.1", "198.18.1.5"}),
])
def test_peer_namespace_selector_empty_vs_absent(peer, expected):
    state, dp = render(PEER_PODS + [policy("a", "peer", {"podSelector": {}, "ingress": [{"from": [peer]}]})])
    (rule,) = allow_rules(policy_rules(state, dp, "a/knp.default.peer"))
    assert members(dp, rule) == expected


# --- one host interface per endpoint -------------------------------------------------------------

def test_dotted_namespace_and_pod_names_cannot_share_an_interface():
    """Namespace "a.b" with pod "c" and namespace "a" with pod "b.c" hashed to one interface name,
    and one of them was left open with "0 changes". Namespaces are DNS labels now: "a.b" is refused."""
    from weft.model.errors import InvalidDesiredState
    assert host_iface_name("a.b", "c") == host_iface_name("a", "b.c")
    with pytest.raises(InvalidDesiredState) as refused:
        render([namespace("a.b"), namespace("a"), pod("a.b", "c", "198.18.0.1"), pod("a", "b.c", "198.18.0.2")])
    assert "Namespace a.b: metadata.name: must be a DNS label" in str(refused.value)
    state, dp = render([namespace("a"), pod("a", "b.c", "198.18.0.2")])     # a dotted pod name is fine
    assert endpoint_rules(dp, "a", "b.c", "tw") == ()


def test_the_renderer_refuses_two_endpoints_with_one_interface():
    """Whatever let two endpoints get one name (a hash collision, an old record), nothing renders."""
    from dataclasses import replace

    from weft.model.cluster import Endpoint
    from weft.renderers.iptables import SharedInterfaceName
    state = build_cluster_state([("test.yaml", o) for o in [*NAMESPACES, pod("a", "x", "198.18.0.1"),
                                                              pod("b", "y", "198.18.0.2")]])
    x, y = state.endpoints
    forced = replace(state, endpoints=(x, replace(y, iface=x.iface)))
    with pytest.raises(SharedInterfaceName, match=f"pods a/x and b/y would both get host interface {x.iface}"):
        render_node(forced, NODE)
    pending = (Endpoint("b", "wired", NODE, x.iface, ("198.18.0.3",)),)    # a pod the CNI plugin wired
    with pytest.raises(SharedInterfaceName, match="pods a/x and b/wired"):
        render_node(state, NODE, pending)
