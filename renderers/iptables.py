"""The filter-table chains this node needs, in the exact text iptables-save prints.

Flow of a forwarded packet (Felix's design, with weft's names):

  FORWARD -> weft-FORWARD: established/related accepted at once (fast path), invalid dropped;
    from a pod:  weft-from-wl-dispatch -> weft-fw-<iface> (the pod's egress policy)
    to a pod:    weft-to-wl-dispatch   -> weft-tw-<iface> (the pod's ingress policy)
    then ACCEPT. An endpoint chain drops what its policies deny, RETURNs what they allow.
  INPUT -> weft-INPUT: traffic from pods to the host passes the pod's egress policy, then
    RETURNs to the host's own INPUT rules (weft does not override the host firewall).

Endpoint chains walk the tiers in order; in each tier the applicable policies are tried in
order: an Allow sets the accept mark and returns, Deny drops, Pass sets the pass mark which
skips the rest of the tier; a tier that had policies and neither passed nor allowed drops.
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

import ipaddress
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache

from weft.desired.index import EndpointIndex
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    Action,
    ClusterState,
    Direction,
    Endpoint,
    EntityMatch,
    NamedPort,
    Policy,
    Rule,
)
from weft.model.errors import WeftError
from weft.model.kernel import PREFIX, Chain, Dataplane, Hooks, IpSet
from weft.renderers.ipsets import SetCatalog, short_hash
from weft.renderers.routes import render_links, render_routes
from weft.renderers.rules import (
    FAMILIES,
    FAMILY_TABLES,
    FROM_DISPATCH,
    MARK_ACCEPT,
    MARK_PASS,
    TO_DISPATCH,
    Spec,
    base_matches,
    chain_lines,
    families_of,
    pending_specs,
    tiered_specs,
)

WL_GLOB = PREFIX.rstrip("-") + "+"            # matches every weft host-side veth: "weft+"
FORWARD_CHAIN = f"{PREFIX}FORWARD"
INPUT_CHAIN = f"{PREFIX}INPUT"
HOOKED = {"FORWARD": FORWARD_CHAIN, "INPUT": INPUT_CHAIN}
MULTIPORT_MAX = 15                            # xt_multiport's limit, a range counting twice
# ICMPv6 a pod sends its host whatever the policy (Felix's list): MLD query, report and done,
# router solicitation, neighbour solicitation and advertisement.
ICMPV6_FROM_POD = (130, 131, 132, 133, 135, 136)


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
    return _render_filter(state, node, SetCatalog(lambda: EndpointIndex(state), reuse), pending)


def _render_filter(state: ClusterState, node: str, sets: SetCatalog, pending: tuple[Endpoint, ...]) -> Dataplane:
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
        chains.update(((table, c.name), c) for c in _family_chains(state, family, members, applying, sets))
        for builtin, target in HOOKED.items():
            hooks[(table, builtin)] = Hooks(table, builtin, chain_lines(builtin, [Spec(target=f"-j {target}")]))
    return Dataplane(chains, dict(sets.sets), hooks, render_routes(local), render_links(local))


def _family_chains(state: ClusterState, family: int, local: tuple[Endpoint, ...],
                   applying: dict[str, dict[Direction, list[Policy]]], sets: SetCatalog) -> list[Chain]:
    """The chains of one family's table for the local pods it holds."""
    table = FAMILY_TABLES[family]
    chains: dict[str, Chain] = {}

    def add(name: str, specs: list[Spec], about: str) -> None:
        chains[name] = Chain(table, name, chain_lines(name, specs), about)

    add(FORWARD_CHAIN, _forward_specs(), "entry from FORWARD: pod traffic through this node")
    add(INPUT_CHAIN, _input_specs(family), "entry from INPUT: pod traffic to this host")
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
            add(name, endpoint_specs(policies, direction),
                f"{direction.lower()} of pod {ep.key} ({len(policies)} policies)")
            for policy in policies:
                pname = policy_chain_name(policy, direction)
                if pname not in chains:
                    rules = policy.ingress if direction == INGRESS else policy.egress
                    specs = [s for rule in rules for s in _rule_specs(rule, sets, family)]
                    add(pname, specs, f"{direction.lower()} rules of {policy.origin or policy.key}")
    return list(chains.values())


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


def _forward_specs() -> list[Spec]:
    specs = []
    for flag in ("-i", "-o"):
        specs.append(Spec(f"{flag} {WL_GLOB}", "-m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"))
    for flag in ("-i", "-o"):
        specs.append(Spec(f"{flag} {WL_GLOB}", "-m conntrack --ctstate INVALID", "-j DROP"))
    specs.append(Spec(f"-i {WL_GLOB}", target=f"-j {FROM_DISPATCH}"))
    specs.append(Spec(f"-o {WL_GLOB}", target=f"-j {TO_DISPATCH}"))
    specs.append(Spec(f"-i {WL_GLOB}", target="-j ACCEPT"))
    specs.append(Spec(f"-o {WL_GLOB}", target="-j ACCEPT"))
    return specs


def _input_specs(family: int) -> list[Spec]:
    specs = [
        Spec(f"-i {WL_GLOB}", "-m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"),
        Spec(f"-i {WL_GLOB}", "-m conntrack --ctstate INVALID", "-j DROP"),
    ]
    if family == 6:
        specs += [Spec(f"-i {WL_GLOB} -p ipv6-icmp", f"-m icmp6 --icmpv6-type {t}", "-j ACCEPT")
                  for t in ICMPV6_FROM_POD]
    specs.append(Spec(f"-i {WL_GLOB}", target=f"-j {FROM_DISPATCH}"))
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


def endpoint_specs(policies: list[Policy], direction: str) -> list[Spec]:
    """A pod's chain for `direction` from its policies in evaluation order (rules.tiered_specs:
    the CNI plugin renders the same chain from the snapshot's chain names)."""
    return tiered_specs(policy_tiers(policies, direction))


def policy_tiers(policies: list[Policy], direction: str) -> list[list[str]]:
    """The policies' chains for `direction`, one list per tier, in evaluation order."""
    return [[policy_chain_name(p, direction) for p in group]
            for _tier, group in itertools.groupby(policies, key=lambda p: p.tier)]


def _rule_specs(rule: Rule, sets: SetCatalog, family: int = 4) -> list[Spec]:
    """One policy rule as rules of `family`'s table (several when ports must be split); [] if it
    can never match a packet of that family (its ipVersion is the other one, or its nets, or
    its protocol, are all of the other family)."""
    if not _protocol_in_family(rule.protocol, family) or rule.ip_version not in (None, family):
        return []
    src = _side(rule.source, "src", rule.protocol, sets, family)
    dst = _side(rule.destination, "dst", rule.protocol, sets, family)
    if src is None or dst is None:
        return []
    target = {
        Action.ALLOW: f"-j MARK --set-xmark {MARK_ACCEPT}/{MARK_ACCEPT}",
        Action.PASS: f"-j MARK --set-xmark {MARK_PASS}/{MARK_PASS}",
        Action.DENY: "-j DROP",
        Action.LOG: '-j LOG --log-prefix "weft-policy "',
    }[rule.action]
    base = base_matches(src=src.net, dst=dst.net, proto=rule.protocol or "")
    specs = [Spec(base, " ".join(p for p in (sp, dp, src.sets, dst.sets) if p), target)
             for sp, dp in itertools.product(src.ports, dst.ports)]
    mark = {Action.ALLOW: MARK_ACCEPT, Action.PASS: MARK_PASS}.get(rule.action)
    if mark:
        specs.append(Spec(extra=f"-m mark --mark {mark}/{mark}", target="-j RETURN"))
    return specs


# Protocols of one family only (Calico's ICMP is IPv4's, ICMPv6 IPv6's); any other is both's.
_FAMILY_ONLY = {"icmp": 4, "icmpv6": 6, "ipv6-icmp": 6}


def _protocol_in_family(protocol: str | None, family: int) -> bool:
    return _FAMILY_ONLY.get((protocol or "").lower(), family) == family


@dataclass(frozen=True)
class _Side:
    net: str                  # for -s / -d
    sets: str                 # set matches
    ports: tuple[str, ...]    # alternatives (OR); ("",) for any port


def _side(entity: EntityMatch, direction: str, protocol: str | None, sets: SetCatalog,
          family: int = 4) -> _Side | None:
    nets = [n for n in entity.nets if _network(n).version == family]
    not_nets = [n for n in entity.not_nets if _network(n).version == family]
    if entity.nets and not nets:
        return None
    if any(_network(n).prefixlen == 0 for n in not_nets):
        return None
    net, matches = "", []
    if len(nets) == 1:
        network = _network(nets[0])
        net = "" if network.prefixlen == 0 else str(network)    # iptables-save omits 0.0.0.0/0 and ::/0
    elif nets:
        matches.append(f"-m set --match-set {sets.nets(tuple(nets), family)} {direction}")
    if not_nets:
        matches.append(f"-m set ! --match-set {sets.nets(tuple(not_nets), family)} {direction}")
    if entity.has_endpoint_constraint:
        matches.append(f"-m set --match-set {sets.peers(entity, family)} {direction}")
    ports = _port_alternatives(entity, direction, protocol, sets, family)
    return _Side(net, " ".join(matches), ports)


@cache
def _network(net: str):
    """Nets repeat across rules (a namespace's every policy allows the same CIDRs): parse once."""
    return ipaddress.ip_network(net)


def _port_alternatives(entity: EntityMatch, direction: str, protocol: str | None, sets: SetCatalog,
                       family: int = 4) -> tuple[str, ...]:
    if not entity.ports:
        return ("",)
    flag = "--dports" if direction == "dst" else "--sports"
    numeric = [p for p in entity.ports if not isinstance(p, NamedPort)]
    alternatives, chunk, used = [], [], 0
    for p in numeric:
        text, cost = (str(p.start), 1) if p.start == p.end else (f"{p.start}:{p.end}", 2)
        if used + cost > MULTIPORT_MAX:
            alternatives.append(f"-m multiport {flag} {','.join(chunk)}")
            chunk, used = [], 0
        chunk.append(text)
        used += cost
    if chunk:
        alternatives.append(f"-m multiport {flag} {','.join(chunk)}")
    for p in entity.ports:
        if isinstance(p, NamedPort):
            name = sets.named_port(entity, p.name, protocol, family)
            alternatives.append(f"-m set --match-set {name} {direction},{direction}")
    return tuple(alternatives)
