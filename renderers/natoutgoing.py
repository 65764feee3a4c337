"""Calico's natOutgoing: traffic from a pool with `natOutgoing: true` to a destination outside
every IP pool is masqueraded as it leaves the node; nothing else is.

As Felix does it (its masquerade manager): two sets, the natOutgoing pools' CIDRs and all pools'
CIDRs (disabled pools count: their addresses are still pods'), and one chain in the nat table,
hooked from POSTROUTING:

    -A weft-nat-outgoing -m set --match-set weft-masq-pools src -m set ! --match-set weft-all-pools dst -j MASQUERADE

So pod to pod, pod to another pool (of this node or another) and traffic of pools without
natOutgoing keep their source address. Felix programs this on every node, whatever the pools'
nodeSelector: a pod's traffic is masqueraded on the node it leaves. Nothing is rendered while no
pool of the family has natOutgoing (no chain, no hook, no sets). The guard (reconciler.guard)
allows MASQUERADE in exactly this rule.

Only IPv4 pools are rendered here (`family`: the seam for the ip6 nat table).
"""
from __future__ import annotations

import ipaddress

from weft.model.cluster import ClusterState
from weft.model.kernel import PREFIX, Chain, Hooks, IpSet
from weft.renderers.ipsets import ipset_net
from weft.renderers.rules import Spec, chain_lines

NAT_TABLE = "nat"
NAT_CHAIN = f"{PREFIX}nat-outgoing"
MASQ_SET = f"{PREFIX}masq-pools"             # the natOutgoing pools' CIDRs
ALL_SET = f"{PREFIX}all-pools"               # every pool's CIDR, disabled ones too
HOOK = "POSTROUTING"
MASQ_MATCH = f"-m set --match-set {MASQ_SET} src -m set ! --match-set {ALL_SET} dst"


def render_nat_outgoing(state: ClusterState, family: int = 4
                        ) -> tuple[dict[tuple[str, str], Chain], dict[str, IpSet], dict[tuple[str, str], Hooks]]:
    """(chains, sets, hooks) of natOutgoing for the pools of `family`; all empty when no pool of
    the family has natOutgoing."""
    pools = [p for p in state.ippools if ipaddress.ip_network(p.cidr).version == family]
    masq = [p.cidr for p in pools if p.nat_outgoing]
    if not masq:
        return {}, {}, {}
    sets = {
        MASQ_SET: IpSet(MASQ_SET, "hash:net", _members(masq), about="the CIDRs of the pools with natOutgoing"),
        ALL_SET: IpSet(ALL_SET, "hash:net", _members([p.cidr for p in pools]),
                       about="the CIDRs of every pool (natOutgoing's destinations not masqueraded)"),
    }
    rules = chain_lines(NAT_CHAIN, [Spec(extra=MASQ_MATCH, target="-j MASQUERADE")])
    chains = {(NAT_TABLE, NAT_CHAIN): Chain(NAT_TABLE, NAT_CHAIN, rules,
                                            "natOutgoing: pool traffic to outside every pool, masqueraded")}
    hooks = {(NAT_TABLE, HOOK): Hooks(NAT_TABLE, HOOK, chain_lines(HOOK, [Spec(target=f"-j {NAT_CHAIN}")]))}
    return chains, sets, hooks


def _members(cidrs: list[str]) -> frozenset[str]:
    return frozenset(m for cidr in cidrs for m in ipset_net(cidr))
