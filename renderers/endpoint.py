"""One endpoint's chains, rendered at pod creation without the whole cluster.

The CNI plugin must put a new pod's policy in place before the pod runs, in milliseconds. The
reconcile run leaves a small snapshot for it: which policies exist (their selectors, order and
chain names), the labels of the pods scheduled to this node, and which policy chains the node
has. With it the plugin renders the pod's two endpoint chains exactly as a full run would, or
closed where that is not possible yet (pod not seen, policy chain not on the node).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from desired.model import EGRESS, INGRESS, ClusterState, Tier
from renderers.dataplane import PREFIX, Dataplane
from renderers.iptables import (
    chain_lines,
    endpoint_specs,
    might_apply,
    order_policies,
    pending_specs,
    policy_chain_name,
)


@dataclass(frozen=True)
class PolicyHead:
    """What deciding "does this policy apply, and where is its chain" needs of a policy."""
    key: str
    namespace: str | None
    selector: object                    # anything with matches(labels)
    types: frozenset[str]
    tier: str
    order: float | None


@dataclass(frozen=True)
class EndpointSnapshot:
    node: str
    token: str                          # the desired state it was made from
    heads: tuple[PolicyHead, ...]
    tiers: Mapping[str, Tier]
    pods: Mapping[str, Mapping[str, str]] = field(default_factory=dict)   # "ns/pod" -> labels
    chains: frozenset[str] = frozenset()


def make_snapshot(state: ClusterState, node: str, dataplane: Dataplane, token: str) -> EndpointSnapshot:
    heads = tuple(PolicyHead(p.key, p.namespace, p.selector, p.types, p.tier, p.order) for p in state.policies)
    pods = {e.key: dict(e.labels) for e in state.endpoints if e.node == node}
    return EndpointSnapshot(node, token, heads, dict(state.tiers), pods, frozenset(n for _t, n in dataplane.chains))


def endpoint_chains(snap: EndpointSnapshot | None, namespace: str, pod: str, iface: str) -> dict[str, tuple[str, ...]]:
    """The pod's egress (weft-fw-) and ingress (weft-tw-) chains, as iptables-save lines."""
    labels = snap.pods.get(f"{namespace}/{pod}") if snap else None
    chains = {}
    for direction, kind in ((EGRESS, "fw"), (INGRESS, "tw")):
        name = f"{PREFIX}{kind}-{iface}"
        if snap is None:
            specs = pending_specs(True)         # no snapshot: nothing is known, stay closed
        elif labels is None:
            specs = pending_specs(might_apply(snap.heads, namespace, direction))
        else:
            applicable = order_policies([h for h in snap.heads if direction in h.types
                                         and h.namespace in (None, namespace) and h.selector.matches(labels)],
                                        snap.tiers)
            if all(policy_chain_name(h, direction) in snap.chains for h in applicable):
                specs = endpoint_specs(applicable, direction)
            else:
                specs = pending_specs(True)
        chains[name] = chain_lines(name, specs)
    return chains
