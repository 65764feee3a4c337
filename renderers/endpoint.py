"""A pod's two chains, rendered by the CNI plugin alone from the snapshot each reconcile run leaves.

The plugin must put a pod's policy in place before the pod runs, in milliseconds, without
loading the cluster. So each run leaves data (store.snapshot documents its shape): per pod of
this node the chains of its policies per direction and tier and the IP families whose tables
the run put them in, and per namespace whether a pod the run did not know must be closed. From
that the plugin renders the pod's chains, per family, with the very functions the run uses
(renderers.rules.tiered_specs, chain_lines), so they are equal to what the run renders for that
pod -- `make_snapshot` checks it for every pod and family it records.

The plugin imports only `endpoint_chains` (standard library and renderers.rules); the run's
side, `make_snapshot`, imports the renderer when it is called.
"""
from __future__ import annotations

import re

from weft.renderers.rules import (
    FAMILIES,
    FAMILY_TABLES,
    MARK_PASS,
    TIER_PASSES,
    chain_lines,
    pending_specs,
    tiered_specs,
)
from weft.store.snapshot import FORMAT

TYPE_CHECKING = False              # not typing's: importing typing costs the plugin ~5 ms (mypy knows the name)
if TYPE_CHECKING:
    from weft.model.cluster import ClusterState
    from weft.model.kernel import Dataplane

_TIER_START = f"-j MARK --set-xmark 0x0/{MARK_PASS}"
_TIER_DROP = f"-m mark --mark 0x0/{MARK_PASS} -j DROP"      # a tier's end when its defaultAction is Deny
_POLICY_JUMP = re.compile(r" -j (weft-p[io]-\S+)$")


def endpoint_chains(snap: dict | None, namespace: str, pod: str, iface: str,
                    family: int = 4) -> dict[str, tuple[str, ...]]:
    """The pod's egress (weft-fw-) and ingress (weft-tw-) chains in `family`'s table, as
    iptables-save lines: as the last run rendered them if it put the pod's policy in that
    family's table, else closed where a policy might apply (and closed in both directions
    without a snapshot)."""
    fw, tw = f"weft-fw-{iface}", f"weft-tw-{iface}"
    known = snap["pods"].get(f"{namespace}/{pod}") if snap else None
    if known and family in known["families"]:
        return {fw: chain_lines(fw, tiered_specs(known["egress"])), tw: chain_lines(tw, tiered_specs(known["ingress"]))}
    egress, ingress = (True, True) if snap is None else snap["closed"].get(namespace, snap["default"])
    return {fw: chain_lines(fw, pending_specs(egress)), tw: chain_lines(tw, pending_specs(ingress))}


def make_snapshot(state: ClusterState, node: str, dataplane: Dataplane, token: str) -> dict:
    """The snapshot of a run that rendered `dataplane` from `state` for `node` (pure)."""
    from weft.model.cluster import EGRESS, INGRESS
    from weft.renderers.iptables import might_apply
    pods = {}
    for ep in state.endpoints:
        if ep.node != node:
            continue
        recorded: dict | None = None
        families = []
        for family in FAMILIES:
            table = FAMILY_TABLES[family]
            chains = {direction: dataplane.chains.get((table, f"weft-{kind}-{ep.iface}"))
                      for direction, kind in (("egress", "fw"), ("ingress", "tw"))}
            tiers = {direction: _tiers(chain.name, chain.rules) if chain else None
                     for direction, chain in chains.items()}
            if any(t is None for t in tiers.values()):
                continue
            recorded = recorded or tiers
            if tiers == recorded:             # the same policies in both tables (always, as rendered)
                families.append(family)
        if recorded is not None:
            pods[ep.key] = {**recorded, "families": families}
    closed = {ns: [might_apply(state.policies, ns, EGRESS), might_apply(state.policies, ns, INGRESS)]
              for ns in state.namespaces}
    default = [might_apply(state.policies, None, EGRESS), might_apply(state.policies, None, INGRESS)]
    return {"format": FORMAT, "node": node, "token": token, "pods": pods, "closed": closed, "default": default}


def _tiers(name: str, rules: tuple[str, ...]) -> list[list[str]] | None:
    """The tiers of policy chains a rendered endpoint chain jumps to; None if rendering them
    again does not give exactly `rules` (a pod the snapshot cannot describe is left out of it,
    so the plugin closes it until the next run)."""
    tiers: list[list[str]] = []
    dropping: list[bool] = []
    for line in rules:
        if line.endswith(_TIER_START):
            tiers.append([])
            dropping.append(False)
        elif (jump := _POLICY_JUMP.search(line)) and tiers:
            tiers[-1].append(jump.group(1))
        elif line.endswith(_TIER_DROP) and tiers:
            dropping[-1] = True
    tiers = [chains if drops else [*chains, TIER_PASSES] for chains, drops in zip(tiers, dropping, strict=True)]
    return tiers if chain_lines(name, tiered_specs(tiers)) == tuple(rules) else None
