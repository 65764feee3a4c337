"""Calico's natOutgoing: traffic from a pool with `natOutgoing: true` to a destination outside
every IP pool is masqueraded as it leaves the node; nothing else is.

As Felix does it (its masquerade manager): two sets, the natOutgoing pools' CIDRs and all pools'
CIDRs (disabled pools count: their addresses are still pods'), and one chain in the nat table,
hooked from POSTROUTING:

    -A weft-nat-outgoing -m set --match-set weft-masq-pools src -m set ! --match-set weft-all-pools dst -j MASQUERADE

So pod to pod, pod to another pool (of this node or another) and traffic of pools without
natOutgoing keep their source address. FelixConfiguration's natOutgoingAddress (SNAT to that
address instead, IPv4) and natPortRange (TCP and UDP get source ports from that range) shape
the rule as they do Felix's. Felix programs this on every node, whatever the pools'
nodeSelector: a pod's traffic is masqueraded on the node it leaves. Nothing is rendered while no
pool of the family has natOutgoing (no chain, no hook, no sets). The guard (reconciler.guard)
allows MASQUERADE and SNAT in exactly these rules.

Each family's pools in its own nat table (`family`: "nat" for IPv4, "nat6" for IPv6, with sets
weft-masq6-pools and weft-all6-pools of family inet6).
"""
from __future__ import annotations

import ipaddress

from weft.model.cluster import ClusterState
from weft.model.kernel import PREFIX, Chain, Hooks, IpSet
from weft.renderers.ipsets import ipset_net
from weft.renderers.rules import Spec, chain_lines

NAT_TABLES = {4: "nat", 6: "nat6"}          # table labels: iptables' nat, ip6tables' nat
NAT_CHAIN = f"{PREFIX}nat-outgoing"
SETS = {4: (f"{PREFIX}masq-pools", f"{PREFIX}all-pools"),       # the natOutgoing pools' CIDRs, every
        6: (f"{PREFIX}masq6-pools", f"{PREFIX}all6-pools")}     # pool's CIDR (disabled ones too)
MASQ_SET, ALL_SET = SETS[4]
HOOK = "POSTROUTING"


def masq_match(family: int) -> str:
    masq, every = SETS[family]
    return f"-m set --match-set {masq} src -m set ! --match-set {every} dst"


def render_nat_outgoing(state: ClusterState, family: int = 4, node: str = ""
                        ) -> tuple[dict[tuple[str, str], Chain], dict[str, IpSet], dict[tuple[str, str], Hooks]]:
    """(chains, sets, hooks) of natOutgoing for the pools of `family` on `node`; all empty when
    no pool of the family has natOutgoing."""
    pools = [p for p in state.ippools if ipaddress.ip_network(p.cidr).version == family]
    masq = [p.cidr for p in pools if p.nat_outgoing]
    if not masq:
        return {}, {}, {}
    masq_set, all_set = SETS[family]
    kind = "inet" if family == 4 else "inet6"
    sets = {
        masq_set: IpSet(masq_set, "hash:net", _members(masq), kind, about="the CIDRs of the pools with natOutgoing"),
        all_set: IpSet(all_set, "hash:net", _members([p.cidr for p in pools]), kind,
                       about="the CIDRs of every pool (natOutgoing's destinations not masqueraded)"),
    }
    table = NAT_TABLES[family]
    rules = chain_lines(NAT_CHAIN, _specs(state, family, node))
    chains = {(table, NAT_CHAIN): Chain(table, NAT_CHAIN, rules,
                                        "natOutgoing: pool traffic to outside every pool, masqueraded")}
    hooks = {(table, HOOK): Hooks(table, HOOK, chain_lines(HOOK, [Spec(target=f"-j {NAT_CHAIN}")]))}
    return chains, sets, hooks


def _specs(state: ClusterState, family: int, node: str) -> list[Spec]:
    """Felix's rules (its NATOutgoingChain): MASQUERADE, or SNAT to FelixConfiguration's
    natOutgoingAddress (IPv4 only); with a natPortRange, TCP and UDP first get source ports from
    that range, then everything else the plain rule. Where the node's iptables and kernel support
    it (Felix's detected features MASQFullyRandom and SNATFullyRandom, named in
    FelixConfiguration's featureDetectOverride: docs.tigera.io/calico/latest/reference/resources/
    felixconfig; probes.backend.nat_features detects them as Felix does: iptables >= 1.6.2 and
    kernel >= 3.14), every rule takes `--random-fully`: source ports are chosen at random, so
    two pods' connections to one server cannot race for the same masqueraded port."""
    settings = state.felix_settings(node)
    address = settings.nat_outgoing_address if family == 4 else None
    fully = " --random-fully" if settings.masq_fully_random else ""
    plain = (f"-j SNAT --to-source {address}" if address else "-j MASQUERADE") + fully
    ports = settings.nat_port_range
    if ports is None:
        return [Spec(extra=masq_match(family), target=plain)]
    span = f"{ports.start}-{ports.end}"
    ranged = (f"-j SNAT --to-source {address}:{span}" if address else f"-j MASQUERADE --to-ports {span}") + fully
    return [Spec(f"-p {protocol}", masq_match(family), ranged) for protocol in ("tcp", "udp")] + \
        [Spec(extra=masq_match(family), target=plain)]


def _members(cidrs: list[str]) -> frozenset[str]:
    return frozenset(m for cidr in cidrs for m in ipset_net(cidr))
