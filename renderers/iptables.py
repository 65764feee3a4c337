"""The filter-table chains this node needs, in the exact text iptables-save prints.

Flow of a forwarded packet (Felix's design, with weft's names):

  FORWARD -> weft-FORWARD: established/related accepted at once (fast path), invalid dropped;
    from a pod:  weft-from-wl-dispatch -> weft-fw-<iface> (the pod's egress policy)
    to a pod:    weft-to-wl-dispatch   -> weft-tw-<iface> (the pod's ingress policy)
    then ACCEPT. An endpoint chain drops what its policies deny, RETURNs what they allow.
    Through a Calico host endpoint's interface (renderers.calico.host_forward_chains): its
    applyOnForward policies, before the pods' egress (coming in) and after their ingress (going out).
  INPUT -> weft-INPUT: traffic from pods to the host passes the pod's egress policy, then
    FelixConfiguration's defaultEndpointToHostAction: DROP (Felix's default), ACCEPT, or RETURN
    to the host's own INPUT rules; traffic through an interface a Calico host endpoint of this
    node names goes to that endpoint's chain (renderers.calico: failsafe ports, its policies,
    its profiles), which accepts or drops. preDNAT and doNotTrack policies run earlier, in the
    mangle and raw tables (renderers.calico), and what they allowed is accepted here.

Endpoint chains walk the tiers in order; in each tier the applicable policies are tried in
order: an Allow sets the accept mark and returns, Deny drops, Pass sets the pass mark which
skips the rest of the tier; a tier that had policies and neither passed nor allowed ends with its
defaultAction (Deny drops, Pass goes on). The policy chains' rules are renderers.calico's.
An endpoint that no policy selects for a direction is open in that direction.
Unknown weft interfaces fall through the dispatch chains to DROP (fail closed).

Both IP families get the same chains, under the same names, each in its own table (labels
"filter" for iptables, "filter6" for ip6tables, renderers.rules): a family's table holds the
pods with an address of that family (or with no address known yet), its rules match only nets of
that family, and its sets hold that family's addresses (renderers.ipsets). A pod's traffic in a
family its table does not hold falls to the dispatch chains' DROP. IPv6 needs one thing IPv4
does not: neighbour discovery between a pod and its host side is ICMPv6, which iptables sees
(ARP it does not). As Calico does, weft-INPUT of the IPv6 table accepts from pods the ICMPv6
types of neighbour discovery and multicast listener discovery, whatever the policy: router
solicitation (133), neighbour solicitation and advertisement (135, 136), MLD (130-132); nothing
else passes unconditionally, and nothing of it is forwarded to other pods.

Every rule carries a comment "weft:<id>" (renderers.rules).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import replace

from weft.desired.index import EndpointIndex
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    ClusterState,
    Direction,
    Endpoint,
    Policy,
    Tier,
)
from weft.model.errors import WeftError
from weft.model.kernel import PREFIX, Chain, Dataplane, Hooks, IpSet
from weft.renderers.calico import (
    PREROUTING_CHAIN,
    RAW_CHAINS,
    host_endpoint_chains,
    host_forward_chains,
    host_prednat_chains,
    host_untracked_chains,
    policy_specs,
    tier_specs,
)
from weft.renderers.ipsets import SetCatalog, short_hash
from weft.renderers.natoutgoing import render_nat_outgoing
from weft.renderers.routes import render_links, render_routes
from weft.renderers.rules import (
    FAMILIES,
    FAMILY_TABLES,
    FROM_DISPATCH,
    TO_DISPATCH,
    Spec,
    chain_lines,
    families_of,
    pending_specs,
    tiered_specs,
)

WL_GLOB = PREFIX.rstrip("-") + "+"            # matches every weft host-side veth: "weft+"
FORWARD_CHAIN = f"{PREFIX}FORWARD"
INPUT_CHAIN = f"{PREFIX}INPUT"
OUTPUT_CHAIN = f"{PREFIX}OUTPUT"              # hooked only on a node with host endpoints
HOOKED = {"FORWARD": FORWARD_CHAIN, "INPUT": INPUT_CHAIN}
# ICMPv6 a pod sends its host whatever the policy (Felix's list): MLD query, report and done,
# router solicitation, neighbour solicitation and advertisement.
ICMPV6_FROM_POD = (130, 131, 132, 133, 135, 136)
MATCH_SET = re.compile(r"--match-set (\S+)")     # the sets a rule refers to
MANGLE_TABLES = {4: "mangle", 6: "mangle6"}   # preDNAT policies (renderers.calico.host_prednat_chains)
RAW_TABLES = {4: "raw", 6: "raw6"}            # doNotTrack policies (renderers.calico.host_untracked_chains)


def policy_chain_name(policy: Policy, direction: str) -> str:
    return f"{PREFIX}p{'i' if direction == INGRESS else 'o'}-{short_hash('policy', policy.tier, policy.key)}"


def render_node(state: ClusterState, node: str, pending: tuple[Endpoint, ...] = (),
                reuse: Mapping[str, IpSet] | None = None) -> Dataplane:
    """Everything weft should own on `node`, as kernel text. A pure function of its input.

    `reuse`: the sets of a previous render whose members were computed from the same endpoints
    (as addressed here) and namespaces; the caller vouches for that. A peer or named-port set
    found there is taken as it is, and the index of every endpoint is built only for sets that
    are not: the result equals a render without `reuse`.
    """
    return render_node_sets(state, node, pending, reuse)[0]


def render_node_sets(state: ClusterState, node: str, pending: tuple[Endpoint, ...] = (),
                     reuse: Mapping[str, IpSet] | None = None, *, chains: Mapping[tuple[str, str], Chain] | None = None,
                     meanings: Mapping[str, tuple] | None = None,
                     index: Callable[[], EndpointIndex] | None = None) -> tuple[Dataplane, dict[str, tuple]]:
    """`render_node`, and what each of its peers and named-port sets means (SetCatalog.meanings:
    renderers.incremental computes a later render's members from them).

    `chains` and `meanings`: a previous render's chains and set meanings, from the same policies
    (renderers.incremental vouches for that): a policy's chain is taken from there as it is, with
    the sets it refers to (from `reuse`), instead of rendering its rules again; a chain's rules
    depend only on its policy and its sets' names while selectors can pick only pods. `index`:
    what builds the index of every endpoint when a set must be computed (by default, of `state`)."""
    sets = SetCatalog(index or (lambda: EndpointIndex(state)), reuse, meanings)
    return _render_filter(state, node, sets, pending, chains or {}), sets.meanings


def _render_filter(state: ClusterState, node: str, sets: SetCatalog, pending: tuple[Endpoint, ...],
                   reused: Mapping[tuple[str, str], Chain] | None = None) -> Dataplane:
    """`pending`: local pods wired by the CNI plugin that the desired state does not show yet
    (their labels are unknown): closed wherever a policy of their namespace could apply."""
    known = state.local_endpoints(node)
    local = tuple(sorted(known + tuple(p for p in pending if p.key not in {e.key for e in known}),
                         key=lambda e: e.iface))
    refuse_shared_interfaces(local)
    applying = _policies_by_endpoint(state, known)
    chains: dict[tuple[str, str], Chain] = {}
    hooks = {}
    for family in FAMILIES:
        table = FAMILY_TABLES[family]
        members = tuple(ep for ep in local if family in families_of(ep.ips))
        family_chains = _family_chains(state, node, family, members, applying, sets, reused or {})
        chains.update(((c.table, c.name), c) for c in family_chains)
        hooked = {**HOOKED, **({"OUTPUT": OUTPUT_CHAIN} if any(c.name == OUTPUT_CHAIN for c in family_chains) else {})}
        for builtin, target in hooked.items():
            hooks[(table, builtin)] = Hooks(table, builtin, chain_lines(builtin, [Spec(target=f"-j {target}")]))
        for extra, builtin, target in ((MANGLE_TABLES[family], "PREROUTING", PREROUTING_CHAIN),
                                       (RAW_TABLES[family], "PREROUTING", RAW_CHAINS[INGRESS]),
                                       (RAW_TABLES[family], "OUTPUT", RAW_CHAINS[EGRESS])):
            if (extra, target) in chains:
                hooks[(extra, builtin)] = Hooks(extra, builtin, chain_lines(builtin, [Spec(target=f"-j {target}")]))
    ipsets = dict(sets.sets)
    for family in FAMILIES:                                  # the nat tables: renderers.natoutgoing
        nat_chains, nat_sets, nat_hooks = render_nat_outgoing(state, family, node)
        chains.update(nat_chains)
        ipsets.update(nat_sets)
        hooks.update(nat_hooks)
    # Sets by name: their order does not depend on which rules were rendered and which reused.
    return Dataplane(chains, dict(sorted(ipsets.items())), hooks, render_routes(local), render_links(local))


def _family_chains(state: ClusterState, node: str, family: int, local: tuple[Endpoint, ...],
                   applying: dict[str, dict[Direction, list[Policy]]], sets: SetCatalog,
                   reused: Mapping[tuple[str, str], Chain]) -> list[Chain]:
    """The chains of one family's table for the local pods it holds."""
    table = FAMILY_TABLES[family]
    chains: dict[str, Chain] = {}

    def add(name: str, specs: list[Spec], about: str) -> None:
        chains[name] = Chain(table, name, chain_lines(name, specs), about)

    pods_only = not (state.network_sets or state.host_endpoints)     # what selectors can pick
    prednat = host_prednat_chains(state, node, sets, policy_chain_name, order_policies, pods_only, family)
    untracked, raw = host_untracked_chains(state, node, sets, policy_chain_name, order_policies, pods_only, family,
                                           marks_read=frozenset({INGRESS}) if prednat else frozenset())
    accepted_in = bool(prednat) or INGRESS in untracked      # the accept mark may come from mangle or raw
    from_hosts, to_hosts, chains_fwd = host_forward_chains(state, node, sets, policy_chain_name, order_policies,
                                                           pods_only, family, accepted_before=accepted_in)
    add(FORWARD_CHAIN, _forward_specs(from_hosts, to_hosts), "entry from FORWARD: pod traffic through this node")
    hosts_in, chains_in = host_endpoint_chains(state, node, sets, policy_chain_name, order_policies, pods_only,
                                               family=family, accepted_before=accepted_in)
    hosts_out, chains_out = host_endpoint_chains(state, node, sets, policy_chain_name, order_policies, pods_only,
                                                 EGRESS, family=family, accepted_before=EGRESS in untracked)
    to_host = state.felix_settings(node).default_endpoint_to_host_action
    add(INPUT_CHAIN, _input_specs(family, to_host) + hosts_in, "entry from INPUT: pod traffic to this host")
    if hosts_out:
        add(OUTPUT_CHAIN, hosts_out, "entry from OUTPUT: this host's traffic through its host endpoints")
    for name, specs, about in chains_in + chains_out + chains_fwd:
        if name not in chains:
            add(name, specs, about)
    add(FROM_DISPATCH, _dispatch(local, "-i", "fw"), "pod egress: one branch per local pod interface")
    add(TO_DISPATCH, _dispatch(local, "-o", "tw"), "pod ingress: one branch per local pod interface")

    for ep in local:
        for direction, kind in ((EGRESS, "fw"), (INGRESS, "tw")):
            name = f"{PREFIX}{kind}-{ep.iface}"
            if ep.key not in applying:
                closed = might_apply(state.policies, ep.namespace, direction)
                add(name, pending_specs(closed), f"{direction.lower()} of pod {ep.key}, not in the desired state yet")
                continue
            policies = applying[ep.key][direction]
            add(name, endpoint_specs(policies, direction, state.tiers),
                f"{direction.lower()} of pod {ep.key} ({len(policies)} policies)")
            for policy in policies:
                pname = policy_chain_name(policy, direction)
                kept = reused.get((table, pname)) if pname not in chains else None
                if kept is not None and sets.adopt(MATCH_SET.findall("\n".join(kept.rules))):
                    chains[pname] = kept
                elif pname not in chains:
                    add(pname, policy_specs(policy, direction, sets, family, pods_only=pods_only),
                        f"{direction.lower()} rules of {policy.origin or policy.key}")
    extra = [(MANGLE_TABLES[family], c) for c in prednat] + [(RAW_TABLES[family], c) for c in raw]
    return list(chains.values()) + [Chain(table, n, chain_lines(n, specs), about) for table, (n, specs, about) in extra]


class SharedInterfaceName(WeftError):
    """Two endpoints of one node would get one host interface name: one pod's traffic would be
    judged by the other's policy (or left open). Refused before anything is written."""


def refuse_shared_interfaces(local: tuple[Endpoint, ...]) -> None:
    """Raise SharedInterfaceName naming both pods if two of `local` (sorted by iface) share one.

    Validation keeps names apart (namespaces are DNS labels, so "a.b"/"c" and "a"/"b.c" cannot
    both exist), and the name is 44 bits of a hash; this is the last line of defence."""
    for first, second in itertools.pairwise(local):
        if first.iface == second.iface:
            a, b = sorted((first.key, second.key))
            raise SharedInterfaceName(
                f"pods {a} and {b} would both get host interface {first.iface} (named after "
                f"\"<namespace>.<pod>\"): rename one of them; nothing was changed")


def _forward_specs(from_hosts: list[Spec], to_hosts: list[Spec]) -> list[Spec]:
    """`from_hosts`, `to_hosts`: host endpoints' applyOnForward checks (renderers.calico), around
    the pods' own, in Felix's order."""
    specs = []
    for flag in ("-i", "-o"):
        specs.append(Spec(f"{flag} {WL_GLOB}", "-m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"))
    for flag in ("-i", "-o"):
        specs.append(Spec(f"{flag} {WL_GLOB}", "-m conntrack --ctstate INVALID", "-j DROP"))
    specs += from_hosts
    specs.append(Spec(f"-i {WL_GLOB}", target=f"-j {FROM_DISPATCH}"))
    specs.append(Spec(f"-o {WL_GLOB}", target=f"-j {TO_DISPATCH}"))
    specs += to_hosts
    specs.append(Spec(f"-i {WL_GLOB}", target="-j ACCEPT"))
    specs.append(Spec(f"-o {WL_GLOB}", target="-j ACCEPT"))
    return specs


def _input_specs(family: int, to_host: str = "Drop") -> list[Spec]:
    """Pod traffic to this host: the pod's egress policy (the dispatch chain drops what it
    denies), then FelixConfiguration's defaultEndpointToHostAction (Felix's default Drop;
    Accept; Return: on to the host's own INPUT rules)."""
    specs = [
        Spec(f"-i {WL_GLOB}", "-m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"),
        Spec(f"-i {WL_GLOB}", "-m conntrack --ctstate INVALID", "-j DROP"),
    ]
    if family == 6:
        specs += [Spec(f"-i {WL_GLOB} -p ipv6-icmp", f"-m icmp6 --icmpv6-type {t}", "-j ACCEPT")
                  for t in ICMPV6_FROM_POD]
    specs.append(Spec(f"-i {WL_GLOB}", target=f"-j {FROM_DISPATCH}"))
    if to_host != "Return":
        specs.append(Spec(f"-i {WL_GLOB}", target="-j ACCEPT" if to_host == "Accept" else "-j DROP"))
    return specs


def _dispatch(local: tuple[Endpoint, ...], flag: str, kind: str) -> list[Spec]:
    specs = [Spec(f"{flag} {ep.iface}", target=f"-g {PREFIX}{kind}-{ep.iface}") for ep in local]
    specs.append(Spec(target="-j DROP"))     # a weft interface weft does not know: fail closed
    return specs


def _sort_key(order: float | None, name: str) -> tuple:
    return (order is None, order or 0.0, name)


def _policies_by_endpoint(state: ClusterState, local: tuple[Endpoint, ...]) -> dict[str, dict[Direction, list[Policy]]]:
    """For each local endpoint and direction: its applicable policies in evaluation order.

    Selection is per endpoint, so an index of the local endpoints alone selects the same ones
    as the index of every endpoint would, at a fraction of the cost."""
    index = EndpointIndex(replace(state, endpoints=local))
    result: dict[str, dict[Direction, list[Policy]]] = {ep.key: {INGRESS: [], EGRESS: []} for ep in local}
    for policy in state.policies:
        selected = index.policy_endpoints(policy)       # its selector, namespace and scoping selectors
        for i in selected:
            ep = index.endpoints[i]
            for direction in policy.types:
                result[ep.key][direction].append(policy)
    for per_dir in result.values():
        for direction, policies in per_dir.items():
            per_dir[direction] = order_policies(policies, state.tiers)
    return result


policies_by_endpoint = _policies_by_endpoint     # public: the eBPF plane selects policies the same way


def might_apply(policies: tuple[Policy, ...], namespace: str | None, direction: Direction) -> bool:
    """Could some policy select a pod of `namespace` whose labels are not known, for `direction`?"""
    scopes = _scopes(policies)
    return (direction, None) in scopes or (direction, namespace) in scopes


_last_scopes: tuple = ((), frozenset())


def _scopes(policies: tuple[Policy, ...]) -> frozenset[tuple[Direction, str | None]]:
    """(direction, namespace or None) of every policy. The snapshot asks for each namespace of the
    same policies: the last tuple's answer is kept (the reference keeps its identity valid)."""
    global _last_scopes
    if _last_scopes[0] is policies:
        return _last_scopes[1]
    scopes = frozenset((d, p.namespace) for p in policies for d in p.types)
    if isinstance(policies, tuple):
        _last_scopes = (policies, scopes)
    return scopes


def order_policies(policies, tiers) -> list:
    """Evaluation order: tiers by (order, name), then policies by (order, name); unset last."""
    return sorted(policies, key=lambda p: (_sort_key(tiers[p.tier].order, p.tier), _sort_key(p.order, p.key)))


def endpoint_specs(policies: list[Policy], direction: Direction, tiers: Mapping[str, Tier]) -> list[Spec]:
    """A pod's chain for `direction` from its policies in evaluation order (rules.tiered_specs:
    the CNI plugin renders the same chain from the snapshot's chain names; each tier's end as
    its defaultAction says: renderers.calico)."""
    return tiered_specs(tier_specs(policies, direction, tiers, policy_chain_name))
