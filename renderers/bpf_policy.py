"""Policy as eBPF map contents: the desired policy of one node, compiled into lookup tables.

weft's eBPF programs (renderers/bpf/policy.c) judge a new connection with a fixed number of map
lookups, however many policies and rules there are. This module computes what those maps must
hold so that every verdict is exactly the one weft's iptables chains (renderers.iptables) give.

The encoding
------------
An endpoint direction (a pod's egress or ingress) is judged by the ordered list of policies that
select it (tiers by order, policies by order; renderers.iptables.order_policies). Endpoints
judged by the same list share one **profile**: its verdict is a function of the packet only, of

  * the source and the destination address,
  * the protocol,
  * the destination and the source port (for ICMP: type << 8 | code as the destination "port").

Every address condition in the profile's rules is an **atom**: a set of CIDRs (a rule's nets, its
notNets, the addresses of the endpoints a selector matches, the endpoints having a named port
as one (protocol, number)). Addresses are partitioned by which atoms hold them: all addresses
in the same atoms are one **class** (of a side: source atoms and destination atoms are
classified apart). Each side of a profile has a **classifier**: an LPM trie maps (classifier,
address) to the class, so the source and the destination are each classified by one lookup,
whatever the number of atoms; an address in no atom is in class 0 and needs no entry. Classes
are named by a hash of their atoms and classifiers by their profile and side, so both stay
stable when a rule changes: only the addresses whose class changed are rewritten.

Inside one (source class, destination class) pair every address condition of every rule is
decided, and the rest of the verdict depends only on protocol and ports. For every protocol a
rule names (and one entry for all others) the verdict is walked exactly as the iptables chains
walk it (below) over every elementary port interval the rules' port sets create, and merged:

  weft_verdicts  (profile, src class, dst class, protocol | any) -> allow/deny + rule
                 or "by destination port: table T" (or by source port)
  weft_ports     (table, port/prefix) -> allow/deny + rule, or "by source port: table U"

Port tables are named by a hash of their content and shared by every profile that needs them.
A packet costs: endpoint (hash), two classifications (LPM), one or two verdict lookups (hash:
the protocol's own entry, else the "any protocol" one), at most two port lookups (LPM) -- no
lookup depends on the number of policies, rules, selectors or ports.

The walk (iptables semantics: renderers.iptables endpoint_specs / _rule_specs)
-----------------------------------------------------------------------------
For the rules that match the packet, in order (tier, policy, rule): Allow allows; Deny denies;
Pass ends the tier (its remaining rules and policies are skipped, and so is the tier's end); Log
is noted and the walk goes on. A tier that neither allowed, denied nor passed ends with its
defaultAction: Deny, or Pass on to the next tier (every tier in a profile has a policy that
selects the endpoint). Passing every tier allows.
An endpoint no policy selects for a direction is open (profile 0); a pod the desired state does
not know yet is closed (profile 1) where some policy might select it, open where none could.
Each leaf carries the id of the rule (or tier end) that decided, for counters, and the id of the
Log rules met on the way (the program reports those packets on its log ring buffer).

Connections: the digest of each profile's content is written with each endpoint; a tracked
connection remembers the digest under which it was allowed, and a different digest makes the
program judge its opening packet again: connections the new policy still allows survive a
change, the others are cut (and are, unlike with iptables, where an established connection
outlives any policy change until conntrack forgets it).

Where the two planes cannot differ, and how it is checked: tests/test_bpf_policy.py evaluates
the iptables chains and these maps for every cell of the suite's NetworkPolicy scenarios and for
random tiered Calico-style policies; tests/test_bpf_dataplane.py runs the scenarios with real
packets. Kept from renderers.iptables on purpose: the programs police IPv4 only (IPv6 stays with
ip6tables: host_dataplane; an IPv6 classifier would be a second LPM trie keyed the same way); numeric ports
without a protocol match TCP, UDP and SCTP (iptables cannot express them; Calico requires a
protocol); connections the host opens to its pods are not policed. Of a fragmented datagram
only the first fragment is judged (the later ones carry no ports; without the first they
cannot be reassembled).

Cost, measured on bench/synthetic.py's cluster (10,000 pods, 1,000 policies, 110 local pods):
~210,000 keys (mostly classifier entries: every ingress profile whose rules name a port
classifies the 10,000 endpoints having it) rendered in a few seconds (bench/bench_bpf.py prints
it); one changed policy port: 9 keys written, 2 deleted.

Calico's other matches, in the same encoding: notSelector is a negative atom (as notNets is;
selectors pick pods, host endpoints' expected IPs and network sets' nets); notPorts the
complement of a port set; ICMP type/code a destination "port" (type << 8 | code) under protocol
1; notProtocol a protocol entry of its own with the rule left out, the rule kept in the "any
protocol" entry; ipVersion 6 (or ICMPv6) keeps a rule out of the IPv4 classification;
serviceAccount selectors are endpoint selectors; a tier whose defaultAction is Pass goes on to
the next tier where iptables' TIER_PASSES does. Only the compilation of a rule into atoms and
port sets grew; the maps and the programs did not change. tests/test_calico_kernel.py runs
Calico's documented examples, semantics cases and random tiered policies on both planes against
the reference evaluator (desired.verdict).
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cache, partial

from weft.desired.index import EndpointIndex
from weft.model.bpf import (
    ALLOW,
    DENY,
    DPORTS,
    FLAG_LOG,
    PROFILE_CLOSED,
    PROFILE_OPEN,
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    RESERVED_IDS,
    SPORTS,
    BpfMaps,
    ClassifierKey,
    DirectionPolicy,
    EndpointEntry,
    PortKey,
    Verdict,
    VerdictKey,
)
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    Action,
    ClusterState,
    Endpoint,
    EntityMatch,
    IcmpMatch,
    NamedPort,
    Policy,
    Rule,
    Tier,
    protocol_number,
)
from weft.model.kernel import PREFIX, Chain, Dataplane
from weft.renderers.bpf_services import render_services
from weft.renderers.ipsets import entity_key
from weft.renderers.iptables import FORWARD_CHAIN, MATCH_SET, WL_GLOB, might_apply, policies_by_endpoint
from weft.renderers.rules import FROM_DISPATCH, TABLE, TO_DISPATCH, Spec, chain_lines, rule_id

ADDRESSES = 1 << 32
PORTS = 1 << 16
PORT_PROTOCOLS = frozenset({PROTOCOL_NUMBERS["tcp"], PROTOCOL_NUMBERS["udp"], PROTOCOL_NUMBERS["sctp"]})
ICMP = PROTOCOL_NUMBERS["icmp"]
ICMPV6 = 58                         # IPv6's: never an IPv4 packet's protocol
OTHER = -1                          # stands for every protocol no rule of the profile names
OPEN = DirectionPolicy(PROFILE_OPEN)
CLOSED = DirectionPolicy(PROFILE_CLOSED, digest=PROFILE_CLOSED)


# --- What rules mean, as atoms and intervals. ---------------------------------------------------

@dataclass(frozen=True)
class Atom:
    ident: str
    about: str
    ranges: tuple[tuple[int, int], ...]      # disjoint, sorted, not adjacent: [first, last] addresses


@dataclass(frozen=True)
class PortMatch:
    ranges: tuple[tuple[int, int], ...]      # numeric ports, for the rule's protocol (or TCP/UDP/SCTP)
    named: tuple[tuple[str, int, int], ...]  # (atom of the addresses having it, protocol, port)


@dataclass(frozen=True)
class Side:
    pos: tuple[str, ...]                     # atoms the address must be in
    neg: tuple[str, ...]                     # atoms it must not be in
    ports: PortMatch | None                  # None: any port
    not_ports: PortMatch | None = None       # notPorts: None, or ports the packet's must not be

    @property
    def ported(self) -> bool:
        return self.ports is not None or self.not_ports is not None


@dataclass(frozen=True)
class CompiledRule:
    position: int
    tier: int
    action: Action
    protos: frozenset[int] | None            # None: any protocol
    src: Side
    dst: Side
    ident: str
    not_protos: frozenset[int] = frozenset() # notProtocol (with protos None): every protocol but these
    icmp: tuple[tuple[int, int], ...] | None = None   # ICMP type << 8 | code intervals (protocol 1 only)


class Leaf(tuple):
    """(action, rule identity, log rule identities): a decided verdict, before ids are given."""
    __slots__ = ()


class Table(tuple):
    """(kind DPORTS/SPORTS, ((first, last, Leaf | Table), ...)): a verdict that depends on a port."""
    __slots__ = ()


def _merge(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


@cache
def _net_range(net: str) -> tuple[int, int]:
    n = ipaddress.ip_network(net, strict=False)
    return int(n.network_address), int(n.broadcast_address)


@cache
def _normal_net(net: str) -> str:
    return str(ipaddress.ip_network(net, strict=False))


@cache
def _ip4(address: str) -> int:
    return int.from_bytes(socket.inet_aton(address), "big")


@cache
def _is_v4(net: str) -> bool:
    return ipaddress.ip_network(net, strict=False).version == 4


class Atoms:
    """The atoms a node's rules refer to, named by meaning (as renderers.ipsets names its sets)."""

    def __init__(self, index: Callable[[], EndpointIndex]):
        self._make_index = index
        self._index: EndpointIndex | None = None
        self.atoms: dict[str, Atom] = {}
        self._named: dict[tuple, tuple] = {}
        self._classified: dict[tuple[str, ...], tuple] = {}

    def classify(self, atom_ids: tuple[str, ...]) -> tuple[list[tuple[int, int, frozenset]], set[frozenset]]:
        """_classify, once per atom list (profiles often share theirs)."""
        if atom_ids not in self._classified:
            self._classified[atom_ids] = _classify(atom_ids, self)
        return self._classified[atom_ids]

    @property
    def index(self) -> EndpointIndex:
        if self._index is None:
            self._index = self._make_index()
        return self._index

    def _add(self, ident: str, about: str, ranges: Callable[[], Iterable[tuple[int, int]]]) -> str:
        if ident not in self.atoms:
            self.atoms[ident] = Atom(ident, about, _merge(ranges()))
        return ident

    def nets(self, nets: tuple[str, ...]) -> str:
        normal = sorted({_normal_net(n) for n in nets})
        return self._add("nets:" + ",".join(normal), "nets " + ", ".join(normal),
                         lambda: (_net_range(n) for n in normal))

    def peers(self, entity: EntityMatch) -> str:
        """The addresses a side's positive selector picks: pods, host endpoints' expected IPs and
        network sets' nets (renderers.calico's selection sets)."""
        key = entity_key(entity)

        def ranges():
            selection = self.index.side(entity)
            if selection is None:
                return
            if not (selection.host_endpoints or selection.network_sets):
                eps = self.index.endpoints
                for i in self.index.match(entity):
                    for ip in eps[i].ips:
                        if ":" not in ip:
                            a = _ip4(ip)
                            yield a, a
                return
            yield from (_net_range(n) for n in selection.nets(self.index, 4))
        return self._add("peers:" + key, "endpoints matching " + key, ranges)

    def not_selected(self, entity: EntityMatch) -> str:
        """The addresses a side's notSelector picks (anywhere: it is not confined to a namespace)."""
        assert entity.not_selector is not None
        key = entity.not_selector.canonical()

        def ranges():
            selection = self.index.side_not(entity)
            return () if selection is None else (_net_range(n) for n in selection.nets(self.index, 4))
        return self._add("not:" + key, "addresses selected by notSelector " + key, ranges)

    def named_port(self, entity: EntityMatch, name: str, protocol: str | None) -> tuple[tuple[str, int, int], ...]:
        """One (atom, protocol, port) per number the name has among the matching endpoints (with the
        rule's protocol when it has one): the members of renderers.ipsets' hash:ip,port set."""
        key = entity_key(entity)
        cached = self._named.get((key, name, protocol))
        if cached is not None:
            return cached
        eps = self.index.endpoints
        by_number: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i in self.index.match(entity):
            for cp in eps[i].ports:
                if cp.name == name and (protocol is None or cp.protocol == protocol):
                    for ip in eps[i].ips:
                        if ":" not in ip:
                            by_number[(PROTOCOL_NUMBERS[cp.protocol], cp.port)].add(_ip4(ip))
        out = []
        for (proto, port), addresses in sorted(by_number.items()):
            ident = f"port:{key};name={name};{PROTOCOL_NAMES[proto]}:{port}"
            about = f"endpoints matching {key} with port {name!r} = {PROTOCOL_NAMES[proto]}/{port}"
            out.append((self._add(ident, about, partial(_points, addresses)), proto, port))
        self._named[(key, name, protocol)] = result = tuple(out)
        return result


def _points(addresses: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Each address as a one-address range."""
    return ((x, x) for x in addresses)


def _compile_side(entity: EntityMatch, protocol: str | None, atoms: Atoms) -> Side | None:
    """renderers.iptables._side as atoms: None if the side can never match an IPv4 packet."""
    nets = tuple(n for n in entity.nets if _is_v4(n))
    not_nets = tuple(n for n in entity.not_nets if _is_v4(n))
    if entity.nets and not nets:
        return None
    if any(_net_range(n) == (0, ADDRESSES - 1) for n in not_nets):
        return None
    pos, neg = [], []
    if nets:
        pos.append(atoms.nets(nets))
    if not_nets:
        neg.append(atoms.nets(not_nets))
    if entity.has_endpoint_constraint:
        pos.append(atoms.peers(entity))
    if entity.not_selector is not None:
        neg.append(atoms.not_selected(entity))
    return Side(tuple(pos), tuple(neg), _port_match(entity.ports, entity, protocol, atoms),
                _port_match(entity.not_ports, entity, protocol, atoms))


def _port_match(ports, entity: EntityMatch, protocol: str | None, atoms: Atoms) -> PortMatch | None:
    if not ports:
        return None
    ranges = _merge((p.start, p.end) for p in ports if not isinstance(p, NamedPort))
    named = tuple(x for p in ports if isinstance(p, NamedPort) for x in atoms.named_port(entity, p.name, protocol))
    return PortMatch(ranges, named)


def _icmp_ranges(rule: Rule) -> tuple[tuple[int, int], ...] | None:
    """icmp/notICMP as intervals of the programs' ICMP "destination port" (type << 8 | code)."""
    if rule.icmp is None and rule.not_icmp is None:
        return None

    def span(match: IcmpMatch) -> tuple[int, int]:
        return (match.type << 8 | match.code,) * 2 if match.code is not None else \
            (match.type << 8, match.type << 8 | 0xff)
    out = [(0, PORTS - 1)] if rule.icmp is None else [span(rule.icmp)]
    if rule.not_icmp is not None:
        out = _subtract(out, [span(rule.not_icmp)])
    return _merge(out)


def _subtract(ranges, holes) -> list[tuple[int, int]]:
    """Intervals `ranges` without the intervals `holes`."""
    out = []
    for lo, hi in ranges:
        for h_lo, h_hi in sorted(holes):
            if h_hi < lo or h_lo > hi:
                continue
            if h_lo > lo:
                out.append((lo, h_lo - 1))
            lo = h_hi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


def _rule_protocols(rule: Rule) -> tuple[frozenset[int] | None, frozenset[int]] | None:
    """(protocols, excluded protocols) of an IPv4 rule; None if it can never match IPv4."""
    if rule.ip_version not in (None, 4):
        return None
    protos = None if rule.protocol is None else frozenset({protocol_number(rule.protocol)})
    excluded = frozenset() if rule.not_protocol is None else frozenset({protocol_number(rule.not_protocol)})
    if protos is not None and (ICMPV6 in protos or protos <= excluded):
        return None
    if protos is None and (rule.icmp is not None or rule.not_icmp is not None):
        protos = frozenset({ICMP})      # ICMP matches need the ICMP protocol (as iptables' -m icmp)
    return (protos, frozenset()) if protos is not None else (None, excluded)


def rule_ident(policy: Policy, direction: str, index: int) -> str:
    return f"{direction}|{policy.tier}|{policy.key}|{index}"


def tier_end_ident(tier: str, direction: str) -> str:
    return f"{direction}|{tier}|end"


def passed_ident(direction: str) -> str:
    return f"{direction}|passed"


# --- One profile: classify, walk, merge. -----------------------------------------------------------

@dataclass
class Profile:
    """What one ordered policy list decides, before ids are given (identities are strings)."""
    ident: str
    direction: str
    about: str
    src_atoms: tuple[str, ...]
    dst_atoms: tuple[str, ...]
    src_intervals: list[tuple[int, int, frozenset]]    # classified address space (non-empty classes)
    dst_intervals: list[tuple[int, int, frozenset]]
    verdicts: dict[tuple[frozenset, frozenset, int | None], Leaf | Table]
    rules: tuple[str, ...] = ()                          # every rule (and tier end) in evaluation order


def _compile_profile(direction: str, policies: list[Policy], atoms: Atoms, about: dict[str, str],
                     tier_of: Mapping[str, Tier] | None = None) -> Profile:
    tiers = list(dict.fromkeys(p.tier for p in policies))
    passing = frozenset(t for t in tiers if tier_of is not None and t in tier_of
                        and tier_of[t].default_action == Action.PASS)
    rules: list[CompiledRule] = []
    order: list[str] = []
    for position, policy in enumerate(policies):
        for i, rule in enumerate(policy.ingress if direction == INGRESS else policy.egress):
            protocols = _rule_protocols(rule)
            if protocols is None:
                continue
            src = _compile_side(rule.source, rule.protocol, atoms)
            dst = _compile_side(rule.destination, rule.protocol, atoms)
            if src is None or dst is None:
                continue
            ident = rule_ident(policy, direction, i)
            rules.append(CompiledRule(len(rules), tiers.index(policy.tier), rule.action, protocols[0], src, dst,
                                      ident, protocols[1], _icmp_ranges(rule)))
            about.setdefault(ident, f"{policy.origin or policy.key} {direction.lower()} rule {i + 1} "
                                    f"({rule.action.value}, tier {policy.tier})")
            order.append(ident)
        if position + 1 == len(policies) or policies[position + 1].tier != policy.tier:
            order.append(tier_end_ident(policy.tier, direction))
    for tier in tiers:
        about.setdefault(tier_end_ident(tier, direction),
                         f"end of tier {tier} ({direction.lower()}): no policy allowed or passed")
    order = [o for o in order if o not in {tier_end_ident(t, direction) for t in passing}]
    about.setdefault(passed_ident(direction), f"every tier passed ({direction.lower()})")
    order.append(passed_ident(direction))

    src_atoms = tuple(sorted({a for r in rules for a in (*r.src.pos, *r.src.neg, *_named_atoms(r.src))}))
    dst_atoms = tuple(sorted({a for r in rules for a in (*r.dst.pos, *r.dst.neg, *_named_atoms(r.dst))}))
    src_intervals, src_sigs = atoms.classify(src_atoms)
    dst_intervals, dst_sigs = atoms.classify(dst_atoms)

    named_protos: set[int] = set()          # every protocol some rule names
    for r in rules:
        if r.protos is not None:
            named_protos |= r.protos
        named_protos |= r.not_protos
        for side in (r.src, r.dst):
            for match in (side.ports, side.not_ports):
                if match is not None:
                    named_protos |= {proto for _, proto, _ in match.named}
                    if match.ranges and r.protos is None:
                        named_protos |= PORT_PROTOCOLS
    walk = _walker(rules, tiers, direction, passing)
    src_of, dst_of = _candidates(rules, lambda r: r.src), _candidates(rules, lambda r: r.dst)
    src_cand = {sig: src_of(sig) for sig in src_sigs}
    dst_cand = {sig: {r.position for r in dst_of(sig)} for sig in dst_sigs}
    verdicts: dict = {}
    for s_sig, s_rules in src_cand.items():
        for d_sig, d_rules in dst_cand.items():
            cand = [r for r in s_rules if r.position in d_rules]
            other = _port_function([(r, None, None) for r in cand if r.protos is None
                                    and not r.src.ported and not r.dst.ported], walk)
            verdicts[(s_sig, d_sig, None)] = other
            for proto in sorted(named_protos):
                entries = []
                for r in cand:
                    if r.protos is not None and proto not in r.protos or proto in r.not_protos:
                        continue
                    sports = _port_set(r.src, s_sig, proto)
                    dports = _port_set(r.dst, d_sig, proto)
                    if r.icmp is not None:
                        dports = _merge(_intersect(dports or ((0, PORTS - 1),), r.icmp))
                    if sports != () and dports != ():
                        entries.append((r, sports, dports))
                value = _port_function(entries, walk)
                if value != other:
                    verdicts[(s_sig, d_sig, proto)] = value
    ident = direction + "|" + "|".join(f"{p.tier}/{p.key}" for p in policies)
    text = f"{direction.lower()} by " + ", ".join(p.origin or p.key for p in policies)
    return Profile(ident, direction, text, src_atoms, dst_atoms, src_intervals, dst_intervals, verdicts,
                   tuple(dict.fromkeys(order)))


def _named_atoms(side: Side) -> tuple[str, ...]:
    return tuple(a for match in (side.ports, side.not_ports) if match is not None for a, _, _ in match.named)


def _intersect(a, b) -> list[tuple[int, int]]:
    return [(max(lo, b_lo), min(hi, b_hi)) for lo, hi in a for b_lo, b_hi in b if max(lo, b_lo) <= min(hi, b_hi)]


def _candidates(rules: list[CompiledRule], side: Callable[[CompiledRule], Side]) -> Callable[[frozenset], list]:
    """For a class of one side: the rules whose address conditions on that side hold for its
    addresses, in order. Indexed by atom, so a class costs the rules that can concern it."""
    wild = [r for r in rules if not side(r).pos]
    by_atom: dict[str, list[CompiledRule]] = defaultdict(list)
    for r in rules:
        for a in side(r).pos:
            by_atom[a].append(r)

    def holds(r: CompiledRule, sig: frozenset) -> bool:
        s = side(r)
        return all(a in sig for a in s.pos) and not any(a in sig for a in s.neg)

    def of(sig: frozenset) -> list[CompiledRule]:
        found = {r.position: r for r in wild if holds(r, sig)}
        for a in sig:
            for r in by_atom.get(a, ()):
                if r.position not in found and holds(r, sig):
                    found[r.position] = r
        return [found[k] for k in sorted(found)]
    return of


def _port_set(side: Side, sig: frozenset, proto: int):
    """The ports (intervals) a side's ports and notPorts admit for `proto` and an address of
    class `sig`; None for any port, () for none."""
    if not side.ported:
        return None

    def admitted(ports: PortMatch) -> list[tuple[int, int]]:
        out = list(ports.ranges) if proto in PORT_PROTOCOLS else []
        return out + [(port, port) for atom, p, port in ports.named if p == proto and atom in sig]
    allowed = admitted(side.ports) if side.ports is not None else [(0, PORTS - 1)]
    if side.not_ports is not None:
        allowed = _subtract(_merge(allowed), _merge(admitted(side.not_ports)))
    return _merge(allowed)


def _classify(atom_ids: tuple[str, ...], atoms: Atoms) -> tuple[list[tuple[int, int, frozenset]], set[frozenset]]:
    """Sweep the address space once: the intervals of non-empty classes (adjacent equal ones
    merged) and every class that occurs (the empty class too, if some address is in no atom)."""
    events: dict[int, list[tuple[str, bool]]] = defaultdict(list)
    for a in atom_ids:
        for lo, hi in atoms.atoms[a].ranges:
            events[lo].append((a, True))
            events[hi + 1].append((a, False))
    active: set[str] = set()
    intervals: list[tuple[int, int, frozenset]] = []
    sigs: set[frozenset] = set()
    positions = sorted(events)
    if not positions or positions[0] > 0:
        sigs.add(frozenset())
    for i, pos in enumerate(positions):
        for a, entering in events[pos]:
            (active.add if entering else active.discard)(a)
        end = positions[i + 1] - 1 if i + 1 < len(positions) else ADDRESSES - 1
        if pos > end:
            continue
        sig = frozenset(active)
        sigs.add(sig)
        if not sig:
            continue
        if intervals and intervals[-1][2] == sig and intervals[-1][1] + 1 == pos:
            intervals[-1] = (intervals[-1][0], end, sig)
        else:
            intervals.append((pos, end, sig))
    return intervals, sigs


def _walker(rules: list[CompiledRule], tiers: list[str], direction: str,
            passing: frozenset[str] = frozenset()) -> Callable[[list], Leaf]:
    ends = [tier_end_ident(t, direction) for t in tiers]
    passes = [t in passing for t in tiers]
    passed = passed_ident(direction)

    def walk(matching: list[CompiledRule]) -> Leaf:
        matching = sorted(matching, key=lambda r: r.position)
        logs: list[str] = []
        i, n = 0, len(matching)
        for t in range(len(tiers)):
            passed_tier = False
            while i < n and matching[i].tier == t:
                r = matching[i]
                i += 1
                if r.action == Action.ALLOW:
                    return Leaf((ALLOW, r.ident, tuple(logs)))
                if r.action == Action.DENY:
                    return Leaf((DENY, r.ident, tuple(logs)))
                if r.action == Action.PASS:
                    passed_tier = True
                    break
                logs.append(r.ident)
            if not passed_tier and not passes[t]:        # the tier's defaultAction: Deny, or Pass
                return Leaf((DENY, ends[t], tuple(logs)))
            while i < n and matching[i].tier == t:
                i += 1
        return Leaf((ALLOW, passed, tuple(logs)))
    return walk


def _port_function(entries: list, walk: Callable[[list], Leaf]):
    """entries: (rule, source ports, destination ports) -> a Leaf, or a Table over destination
    ports whose values are Leaves or Tables over source ports."""
    def by_sport(active: list) -> Leaf | Table:
        return _collapse(SPORTS, _piecewise(active, 1, lambda act: walk([e[0] for e in act])))
    return _collapse(DPORTS, _piecewise(entries, 2, by_sport))


def _piecewise(entries: list, dim: int, inner: Callable[[list], object]) -> list[tuple[int, int, object]]:
    """Sweep one port dimension: [(first, last, inner(entries whose ports there hold))], merged."""
    always = [e for e in entries if e[dim] is None]
    events: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for n, e in enumerate(entries):
        if e[dim] is not None:
            for lo, hi in e[dim]:
                events[lo].append((n, True))
                events[hi + 1].append((n, False))
    positions = sorted(set(events) | {0})
    active: set[int] = set()
    out: list[tuple[int, int, object]] = []
    for i, pos in enumerate(positions):
        if pos >= PORTS:
            break
        for n, entering in events.get(pos, ()):
            (active.add if entering else active.discard)(n)
        end = positions[i + 1] - 1 if i + 1 < len(positions) and positions[i + 1] <= PORTS else PORTS - 1
        value = inner(always + [entries[n] for n in sorted(active)])
        if out and out[-1][2] == value:
            out[-1] = (out[-1][0], end, value)
        else:
            out.append((pos, end, value))
    return out


def _collapse(kind: int, pieces: list[tuple[int, int, object]]):
    return pieces[0][2] if len(pieces) == 1 else Table((kind, tuple(pieces)))


# --- Ids, and the maps. ------------------------------------------------------------------------------

def _id(kind: str, ident: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{kind}\0{ident}\0{salt}".encode()).digest()[:4], "little")


def assign_ids(kind: str, identities: Iterable[str]) -> dict[str, int]:
    """Stable 32-bit ids for identities: a hash, salted again on a collision (in sorted order, so
    the same set always gets the same ids); 0 and 1 are never given."""
    out: dict[str, int] = {}
    used = set(RESERVED_IDS)
    for ident in sorted(set(identities)):
        salt = 0
        value = _id(kind, ident, salt)
        while value in used:
            salt += 1
            value = _id(kind, ident, salt)
        used.add(value)
        out[ident] = value
    return out


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """[first, last] as (port, prefix length) blocks, the fewest that cover it exactly."""
    out = []
    while first <= last:
        size = first & -first if first else PORTS
        while first + size - 1 > last:
            size //= 2
        out.append((first, 16 - size.bit_length() + 1))
        first += size
    return out


def address_prefixes(first: int, last: int) -> list[str]:
    """[first, last] as the fewest CIDRs that cover it exactly."""
    if first == last:
        return [f"{socket.inet_ntoa(first.to_bytes(4, 'big'))}/32"]
    out = []
    while first <= last:
        size = first & -first if first else ADDRESSES
        while first + size - 1 > last:
            size //= 2
        out.append(f"{socket.inet_ntoa(first.to_bytes(4, 'big'))}/{33 - size.bit_length()}")
        first += size
    return out


def _table_text(value) -> str:
    if isinstance(value, Table):
        return f"{value[0]}[" + ";".join(f"{lo}-{hi}={_table_text(v)}" for lo, hi, v in value[1]) + "]"
    return repr(tuple(value))


def render_bpf(state: ClusterState, node: str, pending: tuple[Endpoint, ...] = ()) -> BpfMaps:
    """The policy map contents of `node`. A pure function of its input.

    `pending`: local pods wired by the CNI plugin that the desired state does not show yet:
    closed where a policy of their namespace might select them (as renderers.iptables does)."""
    known = state.local_endpoints(node)
    known_keys = {e.key for e in known}
    local = sorted(known + tuple(p for p in pending if p.key not in known_keys), key=lambda e: e.iface)
    applying = policies_by_endpoint(state, known)
    atoms = Atoms(lambda: EndpointIndex(state))
    rule_about: dict[str, str] = {}
    profiles: dict[str, Profile] = {}
    chosen: dict[str, dict[str, str | DirectionPolicy]] = {}
    for ep in local:
        chosen[ep.iface] = {}
        for direction in (EGRESS, INGRESS):
            if ep.key not in applying:
                closed = might_apply(state.policies, ep.namespace, direction)
                chosen[ep.iface][direction] = CLOSED if closed else OPEN
                continue
            policies = applying[ep.key][direction]
            if not policies:
                chosen[ep.iface][direction] = OPEN
                continue
            ident = direction + "|" + "|".join(f"{p.tier}/{p.key}" for p in policies)
            if ident not in profiles:
                profiles[ident] = _compile_profile(direction, policies, atoms, rule_about, state.tiers)
            chosen[ep.iface][direction] = ident
    maps = _materialise(local, chosen, profiles, atoms, rule_about)
    services, backends, about = render_services(state, node, local)
    return replace(maps, services=services, backends=backends, about={**maps.about, **about})


def _materialise(local, chosen, profiles: dict[str, Profile], atoms: Atoms, rule_about: dict[str, str]) -> BpfMaps:
    about: dict = {}
    profile_ids = assign_ids("profile", profiles)
    # A classifier belongs to one side of one profile: a rule change that adds or drops an atom
    # then rewrites only the addresses whose class changed, not the whole classifier.
    classifier_ids = assign_ids("classifier", (f"{ident}|{side}" for ident, p in profiles.items()
                                               for side, atom_list in (("src", p.src_atoms), ("dst", p.dst_atoms))
                                               if atom_list))
    rule_ids = assign_ids("rule", rule_about)
    leaves, tables = set(), {}

    def visit(value):
        if isinstance(value, Table):
            tables[_table_text(value)] = value
            for _, _, inner in value[1]:
                visit(inner)
        else:
            leaves.add(value)
    for p in profiles.values():
        for value in p.verdicts.values():
            visit(value)
    log_ids = assign_ids("log", ("|".join(leaf[2]) for leaf in leaves if leaf[2]))
    table_ids = assign_ids("ports", tables)

    # Class ids are scoped by classifier, that is by profile and side.
    class_ids: dict[tuple[str, str], dict[frozenset, int]] = {}
    for ident, p in profiles.items():
        for side, sigs in _side_classes(p).items():
            texts = {sig: _sig_text(sig) for sig in sigs if sig}
            ids = assign_ids("class", texts.values())
            class_ids[(ident, side)] = {sig: ids[text] for sig, text in texts.items()}

    def class_of(ident: str, side: str, sig: frozenset) -> int:
        return class_ids[(ident, side)][sig] if sig else 0

    def leaf_verdict(leaf: Leaf) -> Verdict:
        action, rule, logs = leaf
        if logs:
            return Verdict(action, rule_ids[rule], log_ids["|".join(logs)], FLAG_LOG)
        return Verdict(action, rule_ids[rule])

    def leaf_text(leaf: Leaf) -> str:
        action, rule, logs = leaf
        text = f"{'allow' if action == ALLOW else 'deny'}: {rule_about[rule]}"
        return text + ("; logged by " + ", ".join(rule_about[r] for r in logs) if logs else "")

    def verdict_of(value) -> Verdict:
        if isinstance(value, Table):
            return Verdict(value[0], 0, table_ids[_table_text(value)])
        return leaf_verdict(value)

    ports: dict[PortKey, Verdict] = {}
    for text, table in tables.items():
        tid = table_ids[text]
        kind = "destination" if table[0] == DPORTS else "source"
        # The value covering the most ports is the table's /0 entry; the others are exact prefixes,
        # all longer, so the longest match finds them first.
        width: dict = defaultdict(int)
        for lo, hi, value in table[1]:
            width[value] += hi - lo + 1
        default = max(table[1], key=lambda piece: (width[piece[2]], -piece[0]))[2]
        pieces = [(0, PORTS - 1, default)] + [piece for piece in table[1] if piece[2] != default]
        for lo, hi, value in pieces:
            v = verdict_of(value)
            for port, plen in port_prefixes(lo, hi):
                key = PortKey(tid, port, plen)
                ports[key] = v
                shown = "every other port" if plen == 0 else f"{lo}" if lo == hi else f"{lo}-{hi}"
                about[("ports", key)] = (f"table {tid:08x}, {kind} port {shown}: "
                                         + (leaf_text(value) if isinstance(value, Leaf) else v.describe()))

    classifiers: dict[ClassifierKey, int] = {}
    classifier_digests: dict[int, bytes] = {}

    def classifier(cid: int, ident: str, side: str, intervals) -> bytes:
        """The classifier's entries; its digest."""
        if cid not in classifier_digests:
            h, texts = hashlib.sha256(), {}
            for lo, hi, sig in intervals:
                klass = class_of(ident, side, sig)
                h.update(f"{lo}-{hi}={klass}\n".encode())
                if klass not in texts:
                    texts[klass] = f"is class {klass:08x}, in " + "; ".join(atoms.atoms[a].about for a in sorted(sig))
                for net in address_prefixes(lo, hi):
                    key = ClassifierKey(cid, net)
                    classifiers[key] = klass
                    about[("classifiers", key)] = f"classifier {cid:08x}: {net} {texts[klass]}"
            classifier_digests[cid] = h.digest()
        return classifier_digests[cid]

    verdicts: dict[VerdictKey, Verdict] = {}
    digests: dict[str, int] = {}
    for ident, p in profiles.items():
        pid = profile_ids[ident]
        h = hashlib.sha256(ident.encode())
        sides = (("src", p.src_atoms, p.src_intervals), ("dst", p.dst_atoms, p.dst_intervals))
        for side, atom_list, intervals in sides:
            if atom_list:
                h.update(classifier(classifier_ids[f"{ident}|{side}"], ident, side, intervals))
        for (s_sig, d_sig, proto), value in sorted(p.verdicts.items(), key=lambda kv: _verdict_order(kv[0])):
            vkey = VerdictKey(pid, class_of(ident, "src", s_sig), class_of(ident, "dst", d_sig), proto)
            verdicts[vkey] = verdict_of(value)
            h.update(f"v{vkey}={_table_text(value)}\n".encode())
            shown = "any other protocol" if proto is None else PROTOCOL_NAMES.get(proto, str(proto))
            about[("verdicts", vkey)] = (
                f"{p.about}: {shown} from {_class_text(s_sig, atoms)} to {_class_text(d_sig, atoms)}: "
                + (leaf_text(value) if isinstance(value, Leaf) else verdicts[vkey].describe()))
        digest = int.from_bytes(h.digest()[:4], "little")
        digests[ident] = digest if digest not in RESERVED_IDS else digest + 2

    endpoints: dict[str, EndpointEntry] = {}
    for ep in local:
        directions: list[DirectionPolicy] = []
        for direction in (EGRESS, INGRESS):
            what = chosen[ep.iface][direction]
            if isinstance(what, DirectionPolicy):
                directions.append(what)
                continue
            p = profiles[what]
            directions.append(DirectionPolicy(profile_ids[what],
                                         classifier_ids[f"{what}|src"] if p.src_atoms else 0,
                                         classifier_ids[f"{what}|dst"] if p.dst_atoms else 0,
                                         digests[what]))
        endpoints[ep.iface] = EndpointEntry(*directions)
        about[("endpoints", ep.iface)] = f"pod {ep.key}: " + "; ".join(
            _direction_text(chosen[ep.iface][d], profiles, profile_ids) for d in (EGRESS, INGRESS))
    rules = {rule_ids[ident]: text for ident, text in rule_about.items()}
    in_force = {profile_ids[ident]: tuple(rule_ids[r] for r in p.rules) for ident, p in profiles.items()}
    return BpfMaps(endpoints, classifiers, verdicts, ports, about=about, rules=rules, profiles=in_force)


def _side_classes(p: Profile) -> dict[str, set[frozenset]]:
    """Every class a profile's classifiers and verdicts name, by side."""
    out = {"src": {sig for _, _, sig in p.src_intervals}, "dst": {sig for _, _, sig in p.dst_intervals}}
    for s_sig, d_sig, _ in p.verdicts:
        out["src"].add(s_sig)
        out["dst"].add(d_sig)
    return out


def _sig_text(sig: frozenset) -> str:
    return "|".join(sorted(sig))


def _verdict_order(key) -> tuple:
    s, d, proto = key
    return (_sig_text(s), _sig_text(d), -2 if proto is None else proto)


def _class_text(sig: frozenset, atoms: Atoms) -> str:
    if not sig:
        return "addresses in none of its atoms"
    return " and ".join(f"[{atoms.atoms[a].about}]" for a in sorted(sig))


def _direction_text(what, profiles, profile_ids) -> str:
    if what == OPEN:
        return "open (no policy)"
    if what == CLOSED:
        return "closed (not in the desired state yet)"
    return f"profile {profile_ids[what]:08x} ({profiles[what].about})"


# --- The programs' lookups, in Python: what a packet gets from the maps (tests, `weft bpf`). ----

def judge(maps: BpfMaps, iface: str, direction: str, saddr: str, daddr: str, proto: int,
          sport: int = 0, dport: int = 0) -> Verdict:
    """The verdict policy.c's judge() finds in `maps` for a new connection's first packet on
    `iface` (ICMP: dport = type << 8 | code). A missing endpoint or entry denies (fail closed)."""
    entry = maps.endpoints.get(iface)
    if entry is None:
        return Verdict(DENY)
    side = entry.egress if direction == EGRESS else entry.ingress
    if side.profile == PROFILE_OPEN:
        return Verdict(ALLOW)
    if side.profile == PROFILE_CLOSED:
        return Verdict(DENY)
    src = _lookup_class(maps, side.src_classifier, saddr)
    dst = _lookup_class(maps, side.dst_classifier, daddr)
    v = maps.verdicts.get(VerdictKey(side.profile, src, dst, proto))
    if v is None:
        v = maps.verdicts.get(VerdictKey(side.profile, src, dst, None))
    for _ in range(2):
        if v is not None and v.action in (DPORTS, SPORTS):
            v = _lookup_port(maps, v.arg, dport if v.action == DPORTS else sport)
    if v is None or v.action not in (ALLOW, DENY):
        return Verdict(DENY)
    return v


def _lookup_class(maps: BpfMaps, classifier: int, address: str) -> int:
    if classifier == 0:
        return 0
    a = int(ipaddress.IPv4Address(address))
    for plen in range(32, -1, -1):
        net = ipaddress.IPv4Network((a & ((ADDRESSES - 1) << (32 - plen)) & (ADDRESSES - 1), plen))
        klass = maps.classifiers.get(ClassifierKey(classifier, str(net)))
        if klass is not None:
            return klass
    return 0


def _lookup_port(maps: BpfMaps, table: int, port: int) -> Verdict | None:
    for plen in range(16, -1, -1):
        v = maps.ports.get(PortKey(table, port & ((PORTS - 1) << (16 - plen)) & (PORTS - 1), plen))
        if v is not None:
            return v
    return None




def host_dataplane(rendered: Dataplane) -> Dataplane:
    """What an eBPF node keeps of the iptables render: everything but the pods' own policy.

    The programs on the pods' interfaces judge pod traffic (IPv4); iptables keeps what is not a
    pod's policy, rendered exactly as on an iptables node, so its semantics are the same by
    construction:

      * routes and interface settings;
      * the host endpoints (Calico's eBPF mode puts programs on the host's interfaces; weft keeps
        its iptables chains instead, a smaller change): traffic to and from the host (weft-INPUT,
        weft-OUTPUT, the failsafes first), applyOnForward (weft-from-hep-fwd/weft-to-hep-fwd),
        preDNAT (mangle) and doNotTrack (raw) policies, with the policy chains and sets they use;
      * defaultEndpointToHostAction for a pod's traffic to its host (weft-INPUT, after the
        program judged the pod's egress);
      * natOutgoing (the nat tables and their sets);
      * the IPv6 table and sets whole: the programs judge IPv4 only and pass IPv6 untouched, so a
        dual-stack pod's IPv6 is enforced by ip6tables as on an iptables node.

    Removed: the IPv4 dispatch chains, the pods' chains and the IPv4 chains and sets only they
    used; weft-FORWARD and weft-INPUT accept a pod's traffic where they would have dispatched it
    (the node's FORWARD policy may be DROP), and drop no "INVALID" pod traffic (the programs
    track pod connections and translate services themselves: the kernel's conntrack may not have
    seen a connection's start). weft-FORWARD also accepts what a node port's program translated
    (NODEPORT_MARK): a backend on another node is reached uplink to uplink.

    A node switched from iptables gets this in the same apply, after the programs are attached
    (reconciler.engine's order), so no pod is open in between."""
    pods = (FROM_DISPATCH, TO_DISPATCH)
    chains: dict = {}
    for key, chain in rendered.chains.items():
        table, name = key
        if table != TABLE:
            chains[key] = chain
        elif name not in pods and not name.startswith(POD_CHAIN_PREFIXES):
            chains[key] = replace(chain, rules=tuple(r for r in chain.rules if not _pod_policy_rule(r)))
    hooks = dict(rendered.hooks)
    forward = chains.get((TABLE, FORWARD_CHAIN)) or Chain(TABLE, FORWARD_CHAIN, chain_lines(
        FORWARD_CHAIN, [Spec(f"-i {WL_GLOB}", target="-j ACCEPT"), Spec(f"-o {WL_GLOB}", target="-j ACCEPT")]))
    chains[(TABLE, FORWARD_CHAIN)] = _appended(forward, Spec(extra=f"-m mark --mark {NODEPORT_MARK}/{NODEPORT_MARK}",
                                                             target="-j ACCEPT"))
    chains = _referenced(chains, hooks)
    used = {name for c in chains.values() for r in c.rules for name in MATCH_SET.findall(r)}
    # IPv6 sets stay whole: the CNI plugin's IPv6 step programs a new pod from the snapshot with
    # chains and sets no local pod may use yet.
    sets = {name: s for name, s in rendered.ipsets.items() if name in used or s.family == "inet6"}
    return Dataplane(chains, sets, hooks, rendered.routes, rendered.links)


POD_CHAIN_PREFIXES = (f"{PREFIX}fw-", f"{PREFIX}tw-")
# policy.c's WEFT_MARK_NODEPORT: the uplink's program sent this packet to a node port's backend
# (or brought a remote backend's reply back): uplink to uplink for a backend on another node,
# which the node's FORWARD policy (maybe DROP) must not stop: weft-FORWARD accepts it.
NODEPORT_MARK = "0x40000"


def _appended(chain: Chain, spec: Spec) -> Chain:
    """`chain` with one more rule at its end (its id chained on the last one, as chain_lines does)."""
    found = re.search(r'--comment "weft:([^"]+)"', chain.rules[-1]) if chain.rules else None
    previous = found.group(1) if found else ""
    body = " ".join(p for p in (spec.matches, spec.extra, spec.target) if p)
    ident = rule_id(chain.name, previous, body)
    line = " ".join(p for p in (f"-A {chain.name}", spec.matches, f'-m comment --comment "weft:{ident}"',
                                spec.extra, spec.target) if p)
    return replace(chain, rules=(*chain.rules, line))


def _pod_policy_rule(rule: str) -> bool:
    """A rule of weft-FORWARD/weft-INPUT that hands pod traffic to its policy (the programs'
    job on an eBPF node), or drops a pod's "INVALID" packets."""
    return any(f"-j {d}" in rule or f"-g {d}" in rule for d in (FROM_DISPATCH, TO_DISPATCH)) or \
        (f" {WL_GLOB} " in rule and "--ctstate INVALID" in rule)


def _referenced(chains: dict, hooks: dict) -> dict:
    """The IPv4 filter table's chains reachable from its hooks (through -j/-g of kept rules): the
    policy chains host endpoints use, not those only the pods' chains did; other tables whole."""
    kept: dict = {key: c for key, c in chains.items() if key[0] != TABLE}
    todo = [(table, target) for (table, _), h in hooks.items() if table == TABLE for r in h.rules
            for target in _jumps(r)]
    while todo:
        key = todo.pop()
        if key in kept or key not in chains:
            continue
        kept[key] = chains[key]
        todo += [(key[0], target) for r in chains[key].rules for target in _jumps(r)]
    return {key: chains[key] for key in chains if key in kept}


def _jumps(rule: str) -> list[str]:
    words = rule.split()
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g") and words[i + 1].startswith(PREFIX)]


def cni_snapshot(maps: BpfMaps, local: Iterable[Endpoint]) -> dict:
    """The eBPF part of the CNI snapshot (renderers.endpoint.make_snapshot's "bpf" key): each
    local pod's endpoint entry, so the plugin writes it on ADD without rendering anything:

        {"endpoints": {"<namespace>/<pod>": [[egress profile, src classifier, dst classifier,
                                               digest], [ingress ...]]}}

    A pod not listed is closed or open as the snapshot's "closed"/"default" say."""
    out = {}
    for ep in local:
        entry = maps.endpoints.get(ep.iface)
        if entry is not None:
            out[ep.key] = [list(entry.egress), list(entry.ingress)]
    return {"endpoints": out}
