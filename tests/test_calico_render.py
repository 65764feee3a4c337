"""renderers/calico.py without a kernel: the text of Calico's rule fields, tier ends, Log
prefixes, network sets as set members, and the CNI snapshot of pods whose tiers pass.
(tests/test_calico_kernel.py holds the same renders against the reference evaluator on a real
kernel.)"""
from __future__ import annotations

import json

import pytest

from tests.calico_cluster import NODE, cluster, gnp, kind, np, pod, tier
from weft.renderers import calico as calico_renderer
from weft.renderers import rules
from weft.renderers.endpoint import endpoint_chains, make_snapshot
from weft.renderers.iptables import policy_chain_name, render_node
from weft.store import snapshot

A, B = pod("a", "ns1", "198.18.4.1", {"app": "a"}), pod("b", "ns1", "198.18.4.2", {"app": "b"})


def chain_of(state, name: str, direction: str = "Ingress") -> tuple[str, ...]:
    policy = next(p for p in state.policies if p.name == name)
    return render_node(state, NODE).chains[("filter", policy_chain_name(policy, direction))].rules


def test_protocol_numbers_print_as_iptables_save_prints_them():
    assert [calico_renderer.protocol_text(p) for p in ("tcp", "6", "47", "icmpv6", "udplite", "250")] == \
        ["tcp", "tcp", "gre", "ipv6-icmp", "udplite", "250"]


def test_rule_fields_as_iptables_text():
    policy = gnp("p", selector="app == 'b'", ingress=[
        {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 1}, "notICMP": {"type": 8, "code": 0}},
        {"action": "Deny", "notProtocol": 47, "source": {"nets": ["198.19.0.0/16"], "notNets": ["198.19.5.0/24"]}},
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80, "1000:2000"], "notPorts": [1500]}},
        {"action": "Allow", "ipVersion": 6}])
    lines = chain_of(cluster(A, B, policy), "p")
    assert "-p icmp" in lines[0] and "-m icmp --icmp-type 8/1 -m icmp ! --icmp-type 8/0" in lines[0]
    assert "-s 198.19.0.0/16 ! -p gre" in lines[2] and "-m set ! --match-set weft-n-" in lines[2]
    assert lines[2].endswith("-j DROP")
    assert "-p tcp" in lines[3] and "-m multiport ! --dports 1500 -m multiport --dports 80,1000:2000" not in lines[3]
    assert "-m multiport --dports 80,1000:2000 -m multiport ! --dports 1500" in lines[3]
    assert len(lines) == 5, "the IPv6-only rule renders nothing in the IPv4 table"


def test_a_tier_ends_as_its_default_action_says():
    docs = [tier("t-deny", 10, "Deny"), tier("t-pass", 20, "Pass"),
            gnp("t-deny.x", tier="t-deny", selector="app == 'b'", ingress=[{"action": "Log"}]),
            gnp("t-pass.x", tier="t-pass", selector="app == 'b'", ingress=[{"action": "Log"}])]
    state = cluster(A, B, *docs)
    b = next(ep for ep in state.endpoints if ep.pod == "b")
    chain = render_node(state, NODE).chains[("filter", f"weft-tw-{b.iface}")].rules
    drops = [line for line in chain if line.endswith("-m mark --mark 0x0/0x20000 -j DROP")]
    assert len(drops) == 1, "only the Deny tier ends in a drop"
    passing = policy_chain_name(next(p for p in state.policies if p.name == "t-pass.x"), "Ingress")
    assert chain.index(drops[0]) < next(i for i, line in enumerate(chain) if line.endswith(f"-j {passing}")), \
        "the Deny tier (order 10) ends before the Pass tier starts"


def test_log_prefix_names_policy_and_rule_within_the_limit():
    assert calico_renderer.log_prefix("ns1/audit", "i0") == "weft ns1/audit i0: "
    long = calico_renderer.log_prefix("a-very-long-namespace/a-very-long-policy-name", "e12")
    assert len(long) <= calico_renderer.LOG_PREFIX_MAX and long.startswith("weft a-very") and long.endswith(" e12: ")
    other = calico_renderer.log_prefix("a-very-long-namespace/a-very-long-policy-other", "e12")
    assert long != other, "a cut name keeps a hash of the whole"
    policy = np("audit", "ns1", selector="all()", ingress=[{"action": "Log"}, {"action": "Allow"}])
    assert '-j LOG --log-prefix "weft ns1/audit i0: "' in chain_of(cluster(A, B, policy), "audit")[0]


def test_network_sets_and_not_selectors_become_set_members():
    docs = [kind("GlobalNetworkSet", "partners", {"nets": ["198.19.5.0/24"]}, role="partner"),
            kind("NetworkSet", "local", {"nets": ["198.19.6.0/24"]}, "ns1", role="partner"),
            gnp("p", selector="app == 'b'", ingress=[
                {"action": "Allow", "source": {"selector": "role == 'partner' || app == 'a'"}},
                {"action": "Allow", "source": {"notSelector": "app == 'a'"}}])]
    state = cluster(A, B, *docs)
    dataplane = render_node(state, NODE)
    lines = chain_of(state, "p")
    selected, negated = (line.split("--match-set ")[1].split()[0] for line in (lines[0], lines[2]))
    assert dataplane.ipsets[selected].type == "hash:net"
    assert dataplane.ipsets[selected].members == {"198.18.4.1", "198.19.5.0/24", "198.19.6.0/24"}
    assert "! --match-set" in lines[2]
    assert dataplane.ipsets[negated].type == "hash:ip" and dataplane.ipsets[negated].members == {"198.18.4.1"}


def test_pods_with_passing_tiers_are_in_the_snapshot_and_render_the_same():
    assert rules.TIER_PASSES == snapshot.TIER_PASSES
    docs = [tier("t1", 10, "Pass"), tier("t2", 20),
            gnp("t1.a", tier="t1", selector="all()", ingress=[{"action": "Log"}]),
            gnp("t2.a", tier="t2", selector="app == 'b'", ingress=[{"action": "Allow"}]),
            gnp("b", selector="app == 'b'", types=["Egress"], egress=[{"action": "Allow"}])]
    state = cluster(A, B, *docs)
    dataplane = render_node(state, NODE)
    snap = json.loads(json.dumps(make_snapshot(state, NODE, dataplane, "token")))
    assert snapshot.check_snapshot(snap) is snap
    assert sorted(snap["pods"]) == ["ns1/a", "ns1/b"]
    assert snap["pods"]["ns1/b"]["ingress"][0][-1] == rules.TIER_PASSES
    for ep in state.endpoints:
        names = (f"weft-fw-{ep.iface}", f"weft-tw-{ep.iface}")
        run = {name: dataplane.chains[("filter", name)].rules for name in names}
        assert endpoint_chains(snap, ep.namespace, ep.pod, ep.iface) == run, ep.key


@pytest.mark.parametrize("tiers", [[["pass"]], [["pass", "weft-pi-aaaa"]], [["weft-pi-aaaa", "pass", "pass"]]])
def test_the_snapshot_accepts_pass_only_after_a_tiers_chains(tiers):
    snap = {"format": snapshot.FORMAT, "node": NODE, "token": "t", "closed": {}, "default": [False, False],
            "pods": {"ns1/a": {"egress": [], "ingress": tiers, "families": [4]}}}
    with pytest.raises(ValueError, match="is not a weft ingress policy chain"):
        snapshot.check_snapshot(snap)


def test_a_render_reusing_the_last_ones_sets_equals_a_fresh_one_with_network_sets():
    """Selections of network sets and notSelectors are named after their meaning: a render that
    takes them from the last render (same endpoints, network sets, host endpoints) is the same."""
    sets_ = [kind("GlobalNetworkSet", "partners", {"nets": ["198.19.5.0/24"]}, role="partner"),
             kind("HostEndpoint", "h", {"node": NODE, "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"]},
                  role="partner")]
    rule = {"action": "Allow", "source": {"selector": "role == 'partner' || app == 'a'"}}
    before = cluster(A, B, *sets_, gnp("p", selector="app == 'b'", ingress=[rule, {
        "action": "Allow", "source": {"notSelector": "app == 'a'", "selector": "app == 'a'"}}]))
    after = cluster(A, B, *sets_, gnp("p", selector="app == 'b'", ingress=[rule | {"protocol": "TCP"}, {
        "action": "Allow", "source": {"notSelector": "app == 'a'", "selector": "app == 'a'"}}]))
    first = render_node(before, NODE)
    assert any(s.type == "hash:net" and "198.18.0.1" in s.members for s in first.ipsets.values())
    for state in (before, after):
        again = render_node(state, NODE, reuse=first.ipsets)
        assert again == render_node(state, NODE)
        assert all(again.ipsets[n] is first.ipsets[n] for n in again.ipsets if n in first.ipsets)


def test_a_fresh_process_decodes_a_calico_render_before_importing_the_selector_model():
    """A run with nothing to do decodes its cached render before anything imports
    model.selector (the import budget keeps a no-op run lean); a Calico policy's set meanings
    hold the selector's types. Before, that decode failed ("unknown model type 'Eq'") and every
    run rendered anew: ~5 s of a 2,000-Calico-policy no-op run went to re-reading and rendering."""
    import subprocess
    import sys

    from weft.model import codec
    from weft.renderers.iptables import render_node_sets
    state = cluster(pod("a", "ns1", "198.18.4.1", {"app": "a"}),
                    gnp("p", selector="app == 'a' && has(app)", ingress=[
                        {"action": "Allow", "protocol": "TCP", "source": {"selector": "app in {'a', 'b'}"},
                         "destination": {"ports": ["http"]}}]))
    _, meanings = render_node_sets(state, NODE)
    assert meanings, "the render has set meanings (they hold selector types)"
    text = codec.dumps(meanings)
    code = ("import sys\nfrom weft.model import codec\nassert 'weft.model.selector' not in sys.modules\n"
            "value = codec.loads(sys.stdin.read())\nprint(len(value))")
    done = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(meanings)
