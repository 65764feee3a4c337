"""A rule that cannot match in a family (an ipBlock of the other family) makes no set there: a
full render and one made from the last render (reusing the policy's chain, with the sets it
refers to) hold the same sets. Before, the full render made the rule's named-port set for its
other side anyway, unreferenced, and an incremental render after a namespace relabel did not:
the two differed (found by tests/test_render_endpoint_changes.py's hypothesis test)."""
from __future__ import annotations

from tests.test_render_endpoint_changes import NODE, address_counts, changes_between, state_of
from tests.test_render_incremental import same_render
from weft.renderers.incremental import rerender
from weft.renderers.iptables import render_node_sets

SPEC = {"podSelector": {"matchLabels": {}}, "policyTypes": ["Ingress"], "egress": [],
        "ingress": [{"ports": [{"port": "http"}], "from": [{"ipBlock": {"cidr": "198.18.0.0/16"}}]}]}


def test_a_rule_of_the_other_family_makes_no_set_and_renders_alike():
    pods = {("a", "p0"): ({}, NODE, None, 1)}                  # IPv6 only, on this node
    namespaces = {"a": {"team": "a"}, "b": {}, "c": {}}
    before = state_of(pods, namespaces, {("a", "p0"): SPEC})
    rendered, meanings = render_node_sets(before, NODE)
    assert not [n for n in rendered.ipsets if n.startswith("weft-p6")]      # the rule is IPv4-only
    assert [n for n in rendered.ipsets if n.startswith("weft-p4")] == []    # (and no IPv4 pod has the port)
    namespaces["a"] = {}
    after = state_of(pods, namespaces, {("a", "p0"): SPEC})
    made = rerender(after, NODE, (), rendered, meanings, changes_between(before, after),
                    address_counts(before.endpoints))
    assert made is not None
    same_render(made[0], render_node_sets(after, NODE)[0])
