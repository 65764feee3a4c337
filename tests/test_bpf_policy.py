"""The eBPF policy encoding gives exactly the iptables data plane's verdicts.

Both renderings of the same desired state are evaluated in Python: the iptables chains and
ipsets by tests/iptables_eval.py (an interpreter of the rules as the kernel reads them), the map
contents by renderers.bpf_policy.judge (the programs' lookups). They must agree for every cell
the NetworkPolicy scenario matrices probe, and for random Calico-style policies (tiers, orders,
Allow/Deny/Pass/Log, nets/notNets, selectors, namespace selectors, ports, ranges and named ports
on either side, notSelector, notProtocol, a tier whose defaultAction is Pass) on random packets.
No root needed: this is the pure half.
"""
from __future__ import annotations

import ipaddress
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.iptables_eval import Evaluator, Packet
from tests.matrices import NODE, POD_IPS, POD_KEYS, PROBES, SCENARIOS, write_source
from tests.test_connectivity import SCENARIO_LIST
from weft.desired.loader import build_cluster_state
from weft.desired.manifests import load_manifest_dir
from weft.model.bpf import ALLOW, DENY, DPORTS, PROFILE_CLOSED, PROFILE_OPEN, BpfMaps
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    Action,
    ClusterState,
    ContainerPort,
    Endpoint,
    EntityMatch,
    NamedPort,
    Namespace,
    Policy,
    PortRange,
    Rule,
    Tier,
)
from weft.model.names import host_iface_name
from weft.model.selector import parse_selector
from weft.renderers.bpf_policy import address_prefixes, assign_ids, judge, port_prefixes, render_bpf
from weft.renderers.iptables import render_node

PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1}


def iptables_allows(ev: Evaluator, iface: str, direction: str, pkt: Packet) -> bool:
    chain = f"weft-{'fw' if direction == EGRESS else 'tw'}-{iface}"
    return ev.run(chain, pkt) == "RETURN"


def bpf_allows(maps: BpfMaps, iface: str, direction: str, pkt: Packet) -> bool:
    v = judge(maps, iface, direction, pkt.saddr, pkt.daddr, pkt.proto, pkt.sport, pkt.dport)
    assert v.action in (ALLOW, DENY)
    return v.action == ALLOW


# --- The suite's NetworkPolicy scenarios, cell by cell. ------------------------------------------

def scenario_steps():
    return [pytest.param(s, i, step, id=f"{s.name}[{i + 1}]") for s in SCENARIO_LIST for i, step in enumerate(s.steps)]


@pytest.mark.parametrize("scenario, index, step", scenario_steps())
def test_scenario_verdicts_equal_iptables(tmp_path, scenario, index, step):
    """Every cell of the scenario's matrix: the forward path through iptables (weft-FORWARD,
    dispatch, both endpoint chains) and the two eBPF verdicts (source's egress, destination's
    ingress) agree, and both equal the hand-written Kubernetes expectation."""
    files = [SCENARIOS / step.policies] if step.policies else []
    state = build_cluster_state(load_manifest_dir(write_source(tmp_path, *files, relabel=step.relabel)))
    ev, maps = Evaluator(render_node(state, NODE)), render_bpf(state, NODE)
    expected = step.expect.matrix()
    iface = {key: host_iface_name(*key.split("/")) for key in POD_KEYS}
    wrong = []
    for src in POD_KEYS:
        for dst in POD_KEYS:
            if src == dst:
                continue                                  # never leaves the pod: not the node's business
            for proto, port in PROBES:
                pkt = Packet(POD_IPS[src], POD_IPS[dst], PROTO[proto], 40000, port, iface[src], iface[dst])
                by_iptables = ev.run("weft-FORWARD", pkt) in ("ACCEPT", "RETURN")
                by_bpf = bpf_allows(maps, iface[src], EGRESS, pkt) and bpf_allows(maps, iface[dst], INGRESS, pkt)
                if not by_iptables == by_bpf == expected[(src, dst, proto, port)]:
                    wrong.append(f"{src} -> {dst} {proto}/{port}: expected {expected[(src, dst, proto, port)]}, "
                                 f"iptables {by_iptables}, eBPF {by_bpf}")
    assert not wrong, "\n".join(wrong)


# --- Random Calico-style policies on random packets. ------------------------------------------------

LABELS = {"app": ("web", "db"), "tier": ("front", "back")}
NETS = ("198.18.0.0/24", "198.18.0.0/28", "198.18.0.8/29", "198.18.0.5/32", "198.18.0.128/25",
        "0.0.0.0/0", "198.18.0.0/16", "2001:db8::/64", "198.18.0.16/30")
EXCEPT = NETS[1:]                                             # notNets, a /0 and an IPv6 net among them
PORT_NAMES = ("http", "dns")
ADDRESSES = tuple(f"198.18.0.{i}" for i in (1, 2, 3, 5, 6, 9, 12, 17, 130)) + ("198.19.0.1",)

labels = st.dictionaries(st.sampled_from(sorted(LABELS)), st.sampled_from(("web", "db", "front", "back")), max_size=2)
VALUES = ("web", "db", "front", "back")
requirement = st.one_of(
    st.builds(lambda k, v: f"{k} == '{v}'", st.sampled_from(sorted(LABELS)), st.sampled_from(VALUES)),
    st.builds(lambda k, v: f"{k} in {{{', '.join(repr(x) for x in sorted(set(v)))}}}",
              st.sampled_from(sorted(LABELS)), st.lists(st.sampled_from(VALUES), min_size=1, max_size=2)),
    st.builds(lambda k, v: f"{k} != '{v}'", st.sampled_from(sorted(LABELS)), st.sampled_from(VALUES)),
    st.builds(lambda k: f"has({k})", st.sampled_from(sorted(LABELS))),
    st.builds(lambda k: f"!has({k})", st.sampled_from(sorted(LABELS))),
)
# Calico selectors (the one selector model): conjunctions, sometimes a disjunction of two.
selector = st.one_of(
    st.just(parse_selector("all()")),
    st.builds(lambda reqs: parse_selector(" && ".join(reqs)), st.lists(requirement, min_size=1, max_size=2)),
    st.builds(lambda a, b: parse_selector(f"({a}) || ({b})"), requirement, requirement),
)
port = st.one_of(
    st.builds(lambda a, w: PortRange(a, a + w), st.integers(1, 10), st.sampled_from((0, 0, 1, 3))),
    st.builds(NamedPort, st.sampled_from(PORT_NAMES)),
)


@st.composite
def entity(draw, numeric_ports: bool):
    constraint = draw(st.sampled_from(("none", "none", "none", "selector", "nssel", "both", "namespace")))
    ports = draw(st.lists(port, max_size=3)) if draw(st.booleans()) else []
    if not numeric_ports:
        ports = [p for p in ports if isinstance(p, NamedPort)]
    return EntityMatch(
        nets=tuple(draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True))) if draw(st.booleans()) else (),
        not_nets=tuple(draw(st.lists(st.sampled_from(EXCEPT), max_size=1))) if draw(st.booleans()) else (),
        selector=draw(selector) if constraint in ("selector", "both") else None,
        namespace_selector=draw(selector) if constraint in ("nssel", "both") else None,
        namespace=draw(st.sampled_from(("a", "b"))) if constraint == "namespace" else None,
        ports=tuple(ports),
        not_selector=draw(selector) if draw(st.integers(0, 4)) == 0 else None,
    )


@st.composite
def rule(draw):
    protocol = draw(st.sampled_from((None, "tcp", "udp", "sctp")))
    # Numeric ports need a protocol (iptables' multiport does; Calico's validation too).
    not_protocol = draw(st.sampled_from((None, None, "tcp", "udp"))) if protocol is None else None
    return Rule(action=draw(st.sampled_from(list(Action))), protocol=protocol,
                source=draw(entity(protocol is not None)), destination=draw(entity(protocol is not None)),
                not_protocol=not_protocol)


@st.composite
def policy(draw, n: int):
    types = draw(st.sampled_from(({INGRESS}, {EGRESS}, {INGRESS, EGRESS})))
    return Policy(
        name=f"p{n}", namespace=draw(st.sampled_from(("a", "b", None))), selector=draw(selector),
        types=frozenset(types),
        ingress=tuple(draw(st.lists(rule(), max_size=3))) if INGRESS in types else (),
        egress=tuple(draw(st.lists(rule(), max_size=3))) if EGRESS in types else (),
        tier=draw(st.sampled_from(("default", "security"))),
        order=draw(st.sampled_from((None, 1.0, 2.0, 1000.0))),
    )


@st.composite
def cluster(draw):
    n_pods = draw(st.integers(2, 6))
    ips = draw(st.lists(st.sampled_from(ADDRESSES[:-1]), min_size=n_pods, max_size=n_pods, unique=True))
    endpoints = []
    for i, ip in enumerate(ips):
        ns = draw(st.sampled_from(("a", "b")))
        ports = draw(st.lists(st.builds(ContainerPort, st.sampled_from(PORT_NAMES), st.integers(1, 10),
                                        st.sampled_from(("tcp", "udp"))), max_size=2,
                              unique_by=lambda p: (p.name, p.protocol)))
        endpoints.append(Endpoint(ns, f"pod{i}", draw(st.sampled_from(("n", "n", "other"))),
                                  host_iface_name(ns, f"pod{i}"), (ip,), draw(labels), tuple(ports)))
    policies = [draw(policy(i)) for i in range(draw(st.integers(1, 6)))]
    namespaces = {ns: Namespace(ns, {**draw(labels), "kubernetes.io/metadata.name": ns}) for ns in ("a", "b")}
    return ClusterState(namespaces=namespaces, endpoints=tuple(endpoints),
                        policies=tuple(sorted(policies, key=lambda p: p.key)), nodes={},
                        tiers={"default": Tier("default", 1_000_000.0),
                               "security": Tier("security", 10.0, draw(st.sampled_from((Action.DENY, Action.PASS))))})


packet = st.builds(
    lambda s, d, proto, sp, dp: Packet(s, d, proto, sp if proto != 1 else 0, dp),
    st.sampled_from(ADDRESSES), st.sampled_from(ADDRESSES), st.sampled_from((6, 17, 132, 1, 47)),
    st.sampled_from((1, 2, 4, 5, 9, 40000)), st.sampled_from((0, 1, 2, 3, 4, 5, 8, 11, 13, 65535)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=cluster(), packets=st.lists(packet, min_size=1, max_size=12))
def test_random_policies_verdicts_equal_iptables(state, packets):
    ev, maps = Evaluator(render_node(state, "n")), render_bpf(state, "n")
    for ep in state.local_endpoints("n"):
        for direction in (EGRESS, INGRESS):
            for pkt in packets:
                if direction == EGRESS:
                    pkt = Packet(ep.ips[0], pkt.daddr, pkt.proto, pkt.sport, pkt.dport)
                else:
                    pkt = Packet(pkt.saddr, ep.ips[0], pkt.proto, pkt.sport, pkt.dport)
                assert bpf_allows(maps, ep.iface, direction, pkt) == iptables_allows(ev, ep.iface, direction, pkt), \
                    f"{ep.key} {direction} {pkt}"
                # Off the endpoint's own address too: rules about the local side are rules like others.
                other = Packet(pkt.daddr, pkt.saddr, pkt.proto, pkt.dport, pkt.sport)
                same = bpf_allows(maps, ep.iface, direction, other) == iptables_allows(ev, ep.iface, direction, other)
                assert same, f"{ep.key} {direction} {other}"


# --- The encoding's own properties. -----------------------------------------------------------------

def test_pending_pods_are_closed_where_a_policy_might_select_them():
    state = ClusterState(
        namespaces={"a": Namespace("a"), "b": Namespace("b")}, endpoints=(), nodes={},
        policies=(Policy("deny", "a", parse_selector("all()"), frozenset({INGRESS})),))
    pending = (Endpoint("a", "new", "n", host_iface_name("a", "new"), ()),
               Endpoint("b", "new", "n", host_iface_name("b", "new"), ()))
    maps = render_bpf(state, "n", pending)
    a, b = maps.endpoints[host_iface_name("a", "new")], maps.endpoints[host_iface_name("b", "new")]
    assert (a.ingress.profile, a.egress.profile) == (PROFILE_CLOSED, PROFILE_OPEN)
    assert (b.ingress.profile, b.egress.profile) == (PROFILE_OPEN, PROFILE_OPEN)
    assert not judge(maps, host_iface_name("a", "new"), INGRESS, "198.18.0.1", "198.18.0.2", 6, 1, 80).action == ALLOW


def test_prefix_decompositions_are_exact():
    rng = random.Random(7)
    for _ in range(300):
        lo = rng.randrange(1 << 16)
        hi = rng.randrange(lo, 1 << 16)
        covered = [p for port, plen in port_prefixes(lo, hi) for p in range(port, port + (1 << (16 - plen)))]
        assert covered == list(range(lo, hi + 1))
    first, last = int(ipaddress.IPv4Address("198.18.0.3")), int(ipaddress.IPv4Address("198.18.1.6"))
    for lo, hi in ((0, (1 << 32) - 1), (first, last)):
        nets = [ipaddress.IPv4Network(n) for n in address_prefixes(lo, hi)]
        assert int(nets[0].network_address) == lo and int(nets[-1].broadcast_address) == hi
        assert sum(n.num_addresses for n in nets) == hi - lo + 1


def test_ids_are_stable_and_avoid_the_reserved_ones():
    first = assign_ids("rule", [f"r{i}" for i in range(2000)])
    again = assign_ids("rule", [f"r{i}" for i in range(2000)] + ["extra"])
    assert all(again[k] == v for k, v in first.items())
    assert len(set(first.values())) == 2000 and not {0, 1} & set(first.values())


def many_rules_state(n_rules: int, nets_per_rule: bool = True) -> ClusterState:
    """One destination pod selected by `n_rules` ingress rules (each from its own /32, on its own
    port), plus a client: the shape of bench/bench_bpf.py."""
    rules = tuple(Rule(Action.ALLOW, "tcp", EntityMatch(nets=(f"10.{i >> 8 & 255}.{i & 255}.1/32",)),
                       EntityMatch(ports=(PortRange(1000 + i % 5000, 1000 + i % 5000),))) for i in range(n_rules))
    eps = (Endpoint("a", "server", "n", host_iface_name("a", "server"), ("198.18.0.2",), {"app": "server"}),
           Endpoint("a", "client", "n", host_iface_name("a", "client"), ("198.18.0.3",), {"app": "client"}))
    return ClusterState(namespaces={"a": Namespace("a")}, endpoints=eps, nodes={},
                        policies=(Policy("many", "a", parse_selector("app == 'server'"), frozenset({INGRESS}),
                                         ingress=rules),))


def test_lookups_do_not_grow_with_rules():
    """10,000 rules: the maps grow, the lookups a packet costs do not (a verdict entry per class,
    then at most two port lookups); and the render stays fast enough for a reconcile run."""
    started = time.monotonic()
    maps = render_bpf(many_rules_state(10_000), "n")
    elapsed = time.monotonic() - started
    server = host_iface_name("a", "server")
    assert judge(maps, server, INGRESS, "10.0.7.1", "198.18.0.2", 6, 5, 1007).action == ALLOW
    assert judge(maps, server, INGRESS, "10.0.7.1", "198.18.0.2", 6, 5, 1008).action == DENY
    assert judge(maps, server, INGRESS, "198.18.0.3", "198.18.0.2", 6, 5, 1007).action == DENY
    assert all(v.action != DPORTS or maps.ports for v in maps.verdicts.values())
    assert elapsed < 20, f"render of 10,000 rules took {elapsed:.1f} s"


def test_plan_lines_name_the_rule_behind_each_key():
    """The writer's readable diff: which keys change and what they mean; one more rule rewrites
    nothing of what stays; a policy too large for the maps is refused before anything is written."""
    from weft.reconciler.bpf_apply import BpfApplyError, check_capacity, describe_changes, diff_maps
    before = render_bpf(many_rules_state(3), "n")
    after = render_bpf(many_rules_state(4), "n")
    lines = describe_changes(diff_maps(after, before), after, before)
    assert any(line.startswith("add ports") and "port 1003: allow: a/many ingress rule 4 (Allow" in line
               for line in lines), lines
    assert any(line.startswith("add verdicts") and "from [nets 10.0.3.1/32]" in line for line in lines), lines
    classifier_lines = [line for line in lines if " classifiers " in line]
    assert len(classifier_lines) == 1 and classifier_lines[0].startswith("add") and "10.0.3.1/32" in classifier_lines[0]
    assert not any(line.startswith("delete") for line in lines), lines
    assert not describe_changes(diff_maps(after, after), after, after)
    with pytest.raises(BpfApplyError, match="'classifiers'"):
        check_capacity(after, {"endpoints": 10, "classifiers": 3, "verdicts": 100, "ports": 100})
