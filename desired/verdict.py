"""A reference evaluator of Calico's policy semantics: the verdict Calico gives one packet.

It is the oracle that the data planes' tests (iptables now, eBPF later) compare their kernel's
behaviour with, so it is written to be obviously correct, not fast: every selector is matched
against each thing's full label set (desired.index gives the labels; its set algebra is not
used here), every rule field is checked one after the other, in Calico's order.

Calico's semantics, as documented (Tier, NetworkPolicy, GlobalNetworkPolicy, HostEndpoint and
"host endpoint" references) and as Felix renders them:

- A policy applies to an endpoint when its selector (with its namespace, namespaceSelector and
  serviceAccountSelector: Policy.endpoint_selector) matches the endpoint's labels and its types
  include the direction. Tiers apply in order (nil last, ties by name); a tier with no
  applicable policy is skipped. Within a tier, policies by order (nil last), then by name.
- Rules in order: the first whose every field matches decides. Allow and Deny are final; Log
  records and goes on; Pass leaves the tier (the next applicable tier decides). A tier whose
  policies decided nothing ends with its defaultAction: Deny, or Pass (to the next tier).
- Past the last tier (or with no applicable policy at all) the endpoint's profiles decide: a
  pod's kns.<namespace> profile allows everything; host endpoints have the profiles they list
  (projectcalico-default-allow allows everything). No profile allowed: Deny.
- A rule side matches addresses: a selector matches the addresses of the workload endpoints,
  host endpoints (their expectedIPs) and network sets (their nets) it selects; notSelector
  matches every address but those; named ports resolve to (address, protocol, port) of the
  endpoints the side's selector picks (all endpoints without one).
- Host endpoints: failsafe ports first (traffic to and from the host itself); then untracked
  (doNotTrack) policies (not for "*" host endpoints; only ingress rules for forwarded traffic),
  then pre-DNAT policies (ingress only): either decides only on Allow or Deny, with no tier
  default and no profiles; then normal policies. For traffic to/from the host, those that
  select the host endpoint, with tier defaults and profiles as above (no policy and no
  profile: Deny). For forwarded traffic, only applyOnForward policies: none at all allows it;
  if they decide nothing past their last tier, Calico leaves the packet to the host's rules.
- Traffic from the host to its local pods is never policed; traffic from a pod to its host
  passes the pod's egress policy, then FelixConfiguration's defaultEndpointToHostAction
  (Drop, Accept, or Return: left to the host's own rules).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from weft.desired.index import EndpointIndex, Selection
from weft.model import labels as calico_labels
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    PROTOCOL_NAMES,
    Action,
    ClusterState,
    Direction,
    Endpoint,
    EntityMatch,
    HostEndpoint,
    NamedPort,
    Policy,
    PortRange,
    ProtoPort,
    Rule,
    protocol_number,
)


class Verdict(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"
    UNMANAGED = "Unmanaged"       # Calico leaves the packet to the host's own rules


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection: addresses, IP protocol (a name weft knows or a number),
    ports (TCP, UDP, SCTP) or ICMP type and code."""
    src: str
    dst: str
    protocol: str | int = "tcp"
    src_port: int | None = None
    dst_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    def __post_init__(self):
        src, dst = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        if src.version != dst.version:
            raise ValueError(f"a packet from {src} to {dst} mixes IP versions")
        object.__setattr__(self, "src", str(src))
        object.__setattr__(self, "dst", str(dst))
        proto = self.protocol
        number = proto if isinstance(proto, int) else protocol_number(str(proto).lower())
        object.__setattr__(self, "protocol", PROTOCOL_NAMES.get(number, str(number)))

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version

    @property
    def number(self) -> int:
        return protocol_number(str(self.protocol))


@dataclass(frozen=True)
class Decision:
    """A verdict and what gave it: `by` names the policy and rule, tier default, profile,
    failsafe or default that decided; `logged` the Log rules the packet met on the way."""
    verdict: Verdict
    by: str
    logged: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.verdict == Verdict.ALLOW


@dataclass
class _Outcome:
    action: Action | None = None          # ALLOW or DENY when decided
    by: str = ""

    def decision(self, logged: list[str], prefix: str = "") -> Decision:
        assert self.action is not None, "no verdict to give"
        return Decision(Verdict(self.action.value), prefix + self.by, tuple(logged))


class Evaluator:
    """Calico's verdicts for one ClusterState."""

    def __init__(self, state: ClusterState):
        self.state = state
        self.index = EndpointIndex(state)

    # --- labels and selection, by brute force ------------------------------------------------

    def workload_labels(self, endpoint: Endpoint) -> dict[str, str]:
        ns = self.state.namespaces.get(endpoint.namespace)
        sa = next((a for a in self.state.service_accounts
                   if a.namespace == endpoint.namespace and a.name == endpoint.service_account), None)
        return calico_labels.workload_labels(endpoint.namespace, endpoint.labels, endpoint.service_account,
                                             ns.labels if ns else {}, sa.labels if sa else {})

    def _selected(self, selector) -> Selection:
        """Everything `selector` selects, matched one by one against full label sets."""
        return Selection(
            frozenset(i for i, ep in enumerate(self.state.endpoints) if selector.matches(self.workload_labels(ep))),
            tuple(h for h in self.state.host_endpoints if selector.matches(self.index.host_labels(h))),
            tuple(s for s in self.state.network_sets if selector.matches(self.index.set_labels(s))))

    # --- rules ---------------------------------------------------------------------------------

    def rule_matches(self, rule: Rule, packet: Packet) -> bool:
        if rule.ip_version is not None and rule.ip_version != packet.version:
            return False
        for side in (rule.source, rule.destination):
            # Felix renders a rule per IP version: nets only of the other version never match.
            if side.nets and not any(ipaddress.ip_network(n).version == packet.version for n in side.nets):
                return False
        if rule.protocol is not None and protocol_number(rule.protocol) != packet.number:
            return False
        if rule.not_protocol is not None and protocol_number(rule.not_protocol) == packet.number:
            return False
        if rule.icmp is not None and not _icmp_matches(rule.icmp.type, rule.icmp.code, packet):
            return False
        if rule.not_icmp is not None and _icmp_matches(rule.not_icmp.type, rule.not_icmp.code, packet):
            return False
        return (self._side_matches(rule.source, packet.src, packet.src_port, packet)
                and self._side_matches(rule.destination, packet.dst, packet.dst_port, packet))

    def _side_matches(self, entity: EntityMatch, address: str, port: int | None, packet: Packet) -> bool:
        ip = ipaddress.ip_address(address)
        same_family = [ipaddress.ip_network(n) for n in entity.nets if ipaddress.ip_network(n).version == ip.version]
        if entity.nets and not any(ip in n for n in same_family):
            return False
        if any(ip in ipaddress.ip_network(n) for n in entity.not_nets
               if ipaddress.ip_network(n).version == ip.version):
            return False
        selector = entity.endpoint_selector()
        if selector is not None and not self._selected(selector).contains(self.index, address):
            return False
        if entity.not_selector is not None and self._selected(entity.not_selector).contains(self.index, address):
            return False
        if entity.ports and not self._port_in(entity.ports, entity, address, port, packet):
            return False
        return not (entity.not_ports and self._port_in(entity.not_ports, entity, address, port, packet))

    def _port_in(self, ports, entity: EntityMatch, address: str, port: int | None, packet: Packet) -> bool:
        for p in ports:
            if isinstance(p, PortRange) and port is not None and p.start <= port <= p.end:
                return True
            if isinstance(p, NamedPort) and port is not None and \
                    (address, packet.protocol, port) in self._named(entity, p.name):
                return True
        return False

    def _named(self, entity: EntityMatch, name: str) -> set[tuple[str, str, int]]:
        selector = entity.endpoint_selector()
        if selector is None:
            chosen = Selection(frozenset(range(len(self.state.endpoints))), self.state.host_endpoints, ())
        else:
            chosen = self._selected(selector)
        members = {(ip, p.protocol, p.port) for i in chosen.endpoints for p in self.state.endpoints[i].ports
                   for ip in self.state.endpoints[i].ips if p.name == name}
        members |= {(ip, p.protocol, p.port) for h in chosen.host_endpoints for p in h.ports
                    for ip in h.expected_ips if p.name == name}
        return members

    # --- policies, tiers, profiles -------------------------------------------------------------

    def _ordered(self, policies: Iterable[Policy]) -> list[list[Policy]]:
        """Applicable policies grouped by tier, both in evaluation order (as renderers.iptables
        orders them: tiers by (order, name), policies by (order, namespace/name), nil last)."""
        def key(order: float | None, name: str) -> tuple:
            return (order is None, order or 0.0, name)
        ordered = sorted(policies, key=lambda p: (key(self.state.tiers[p.tier].order, p.tier), key(p.order, p.key)))
        groups: list[list[Policy]] = []
        for p in ordered:
            if groups and groups[-1][0].tier == p.tier:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups

    def _evaluate(self, policies: Iterable[Policy], direction: Direction, packet: Packet, logged: list[str], *,
                  tier_ends: bool) -> _Outcome:
        """Allow or Deny if some rule (or, with `tier_ends`, a tier's default action) decides;
        no action when every tier passed (or none applied)."""
        for group in self._ordered(policies):
            passed = False
            for policy in group:
                for rule in policy.rules(direction):
                    if not self.rule_matches(rule, packet):
                        continue
                    where = f"{policy.origin or policy.key} {rule.origin}".strip()
                    if rule.action == Action.LOG:
                        logged.append(where)
                        continue
                    if rule.action == Action.PASS:
                        passed = True
                        break
                    return _Outcome(rule.action, where)
                if passed:
                    break
            if passed or not tier_ends:
                continue
            tier = self.state.tiers[group[0].tier]
            if tier.default_action == Action.PASS:
                continue
            return _Outcome(Action.DENY, f"end of tier {tier.name} (its defaultAction)")
        return _Outcome()

    def _profiles(self, profiles: Iterable[str]) -> _Outcome:
        """Profiles in order; kns.<namespace> and projectcalico-default-allow allow everything
        (ksa.* profiles carry labels only); none allowing: Deny."""
        for profile in profiles:
            ns = profile[len(calico_labels.NAMESPACE_PROFILE_PREFIX):]
            if profile == calico_labels.DEFAULT_ALLOW_PROFILE or (
                    profile.startswith(calico_labels.NAMESPACE_PROFILE_PREFIX) and ns in self.state.namespaces):
                return _Outcome(Action.ALLOW, f"profile {profile}")
        return _Outcome(Action.DENY, "no policy or profile allowed it (Calico's default)")

    # --- workload endpoints --------------------------------------------------------------------

    def applicable(self, endpoint: Endpoint | HostEndpoint, direction: Direction) -> list[Policy]:
        """The policies that apply to `endpoint` in `direction` (of any kind, for host endpoints)."""
        if isinstance(endpoint, HostEndpoint):
            labels = self.index.host_labels(endpoint)
            candidates = [p for p in self.state.policies if p.namespace is None]
        else:
            labels = self.workload_labels(endpoint)
            candidates = list(self.state.policies)
        return [p for p in candidates if direction in p.types and p.endpoint_selector().matches(labels)]

    def workload(self, endpoint: Endpoint, direction: Direction, packet: Packet) -> Decision:
        """Calico's verdict on `packet` entering (INGRESS) or leaving (EGRESS) a pod."""
        logged: list[str] = []
        outcome = self._evaluate(self.applicable(endpoint, direction), direction, packet, logged, tier_ends=True)
        if outcome.action is None:
            outcome = self._profiles(endpoint.profiles)
        return outcome.decision(logged)

    def between(self, src: Endpoint, dst: Endpoint, packet: Packet) -> Decision:
        """A packet from one pod to another: the source's egress, then the destination's ingress."""
        out = self.workload(src, EGRESS, packet)
        if not out.allowed:
            return out
        into = self.workload(dst, INGRESS, packet)
        return Decision(into.verdict, into.by, out.logged + into.logged)

    def to_host(self, endpoint: Endpoint, packet: Packet) -> Decision:
        """A packet from a pod to its own host: the pod's egress, then defaultEndpointToHostAction."""
        out = self.workload(endpoint, EGRESS, packet)
        if not out.allowed:
            return out
        action = self.state.felix_settings(endpoint.node).default_endpoint_to_host_action
        verdict = {"Drop": Verdict.DENY, "Accept": Verdict.ALLOW, "Return": Verdict.UNMANAGED}[action]
        return Decision(verdict, f"defaultEndpointToHostAction {action}", out.logged)

    @staticmethod
    def from_host(endpoint: Endpoint, packet: Packet) -> Decision:
        """A packet from a host to its local pod: never policed (kubelet's probes must work)."""
        return Decision(Verdict.ALLOW, "host to local workload: not policed")

    # --- host endpoints ------------------------------------------------------------------------

    def host(self, endpoint: HostEndpoint, direction: Direction, packet: Packet, *,
             forwarded: bool = False) -> Decision:
        """Calico's verdict on `packet` entering (INGRESS) or leaving (EGRESS) the host through
        `endpoint`: to or from a process of the host, or `forwarded` (to or from a pod of the
        host, or another interface)."""
        logged: list[str] = []
        settings = self.state.felix_settings(endpoint.node)
        if not forwarded:
            failsafe = _failsafe(settings.failsafe_inbound_host_ports if direction == INGRESS
                                 else settings.failsafe_outbound_host_ports, direction, packet)
            if failsafe is not None:
                return Decision(Verdict.ALLOW, f"failsafe {failsafe.protocol}:{failsafe.port}"
                                               f"{' from ' + failsafe.net if failsafe.net else ''}")
        policies = self.applicable(endpoint, direction)
        phases = []
        # Felix's raw and mangle chains skip their policies for failsafe traffic whatever its
        # destination (before routing, forwarded traffic is not told apart); raw also for
        # replies from the other direction's failsafe ports (their source port).
        inbound, outbound = settings.failsafe_inbound_host_ports, settings.failsafe_outbound_host_ports
        to_failsafe = _failsafe(inbound if direction == INGRESS else outbound, direction, packet)
        from_failsafe = _failsafe(outbound if direction == INGRESS else inbound, direction, packet, reply=True)
        if not endpoint.wildcard and (not forwarded or direction == INGRESS) and to_failsafe is from_failsafe is None:
            phases.append(("untracked", [p for p in policies if p.do_not_track]))
        if direction == INGRESS and to_failsafe is None:
            phases.append(("pre-DNAT", [p for p in policies if p.pre_dnat]))
        for name, chosen in phases:
            outcome = self._evaluate(chosen, direction, packet, logged, tier_ends=False)
            if outcome.action is not None:
                return outcome.decision(logged, f"{name}: ")
        normal = [p for p in policies if not p.do_not_track and not p.pre_dnat]
        if forwarded:
            normal = [p for p in normal if p.apply_on_forward]
            if not normal:
                return Decision(Verdict.ALLOW, "forwarded: no applyOnForward policy applies", tuple(logged))
        outcome = self._evaluate(normal, direction, packet, logged, tier_ends=True)
        if outcome.action is None:
            if forwarded:
                return Decision(Verdict.UNMANAGED, "forwarded: every tier passed", tuple(logged))
            outcome = self._profiles(endpoint.profiles)
        return outcome.decision(logged)

    def host_endpoint_for(self, node: str, interface: str, addresses: Iterable[str] = ()) -> HostEndpoint | None:
        """The host endpoint Calico applies to `interface` of `node`: the one naming it, else one
        expecting one of its addresses, else the node's "*" one; None: the interface is not policed."""
        mine = self.state.local_host_endpoints(node)
        named = [h for h in mine if h.interface == interface]
        by_ip = [h for h in mine if h.interface is None and set(h.expected_ips) & {str(a) for a in addresses}]
        wildcard = [h for h in mine if h.wildcard]
        for found in (named, by_ip, wildcard):
            if found:
                return found[0]
        return None


def _icmp_matches(icmp_type: int, icmp_code: int | None, packet: Packet) -> bool:
    return packet.protocol in ("icmp", "icmpv6") and packet.icmp_type == icmp_type and \
        (icmp_code is None or packet.icmp_code == icmp_code)


def _failsafe(ports: Iterable[ProtoPort], direction: Direction, packet: Packet, *,
              reply: bool = False) -> ProtoPort | None:
    """The failsafe port `packet` is to (`reply`: from), if any (peer: the source inbound, the
    destination outbound)."""
    peer = ipaddress.ip_address(packet.src if direction == INGRESS else packet.dst)
    for fp in ports:
        if fp.protocol != packet.protocol or fp.port != (packet.src_port if reply else packet.dst_port):
            continue
        if fp.net is None:
            return fp
        net = ipaddress.ip_network(fp.net)
        if net.version == peer.version and peer in net:
            return fp
    return None


def verdict(state: ClusterState, endpoint: Endpoint | HostEndpoint, direction: Direction, packet: Packet, *,
            forwarded: bool = False) -> Decision:
    """Calico's verdict on `packet` in `direction` at `endpoint` (a pod, or a host endpoint:
    see Evaluator.host for `forwarded`). Build an Evaluator to ask many questions of one state."""
    evaluator = Evaluator(state)
    if isinstance(endpoint, HostEndpoint):
        return evaluator.host(endpoint, direction, packet, forwarded=forwarded)
    return evaluator.workload(endpoint, direction, packet)
