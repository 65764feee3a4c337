"""Calico's policy model as iptables rules: a policy's rules and a pod's tiers, as Felix renders them.

renderers.iptables lays out the chains (hooks, dispatch, one chain per pod and direction, one per
policy and direction); this module fills a policy chain with the policy's rules and decides how
each tier of a pod's chain ends. What the rules mean is Calico's (desired.verdict is the oracle
the tests hold the kernel's verdicts against):

- Actions: Allow sets the accept mark and returns, Deny drops, Pass sets the pass mark and
  returns (the pod's chain skips the rest of the tier), Log writes a kernel log line with a
  prefix naming the policy and the rule ("weft <policy> i0: ", at most 29 characters: the
  LOG target's limit; a long name is cut and ends in a hash of the whole) and goes on to the next
  rule, as Calico's Log does (Calico's default: not rate-limited).
- A tier's end: where no policy of the tier decided, its defaultAction: Deny drops; Pass goes on
  to the next tier (renderers.rules.TIER_PASSES). A tier applies to a pod only when one of its
  policies selects the pod (the chain jumps only to those).
- Matches, all of which must hold: ipVersion (a rule of the other family renders nothing);
  protocol / notProtocol by name or number (`-p`, `! -p`, printed as iptables-save prints
  them: PROTOCOL_SAVE_NAMES); icmp / notICMP type and code; per side nets (one net: `-s`/`-d`,
  more: a hash:net set), notNets (a negated set; a notNet of /0 never matches), the
  selector's addresses (workload endpoints, host endpoints' expectedIPs and network sets' nets:
  a hash:ip set when only pods are selected -- renderers.ipsets' peers set -- else a hash:net
  set), notSelector (a negated set of what it selects, in any namespace), ports (alternatives:
  one rule per multiport group or named-port set) and notPorts (negated multiport groups and
  named-port sets, all in the same rule).

Host endpoints (host_endpoint_chains): traffic to and from the host through an interface a host
endpoint of the node names ("*": every interface but lo and the pods'), failsafe ports first;
traffic forwarded through such an interface (host_forward_chains: policies with applyOnForward),
preDNAT policies in the mangle table (host_prednat_chains), doNotTrack policies in the raw
table (host_untracked_chains). A host endpoint that names its interface by expectedIPs only is
rendered on the interface holding one of them: model.cluster.ClusterState.with_host_interfaces
resolves it from the node's probed addresses (probes.hostaddrs) before the render; one no
interface holds is not rendered. Host endpoints' named ports (spec.ports, at their expectedIPs)
are members of rules' named-port sets (renderers.ipsets.set_members). (Pods' traffic to their
own host, FelixConfiguration's defaultEndpointToHostAction, is renderers.iptables'.)

Each IP family's table gets its own rendering (`family`): a rule's nets, sets, protocols, ICMP
matches and failsafe ports of the other family render nothing there; a rule that can match
nothing in a family is left out of that family's chain.
"""
from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Mapping
from functools import cache

from weft.desired.index import Selection
from weft.model import labels as calico_labels
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    Action,
    ClusterState,
    Direction,
    EntityMatch,
    NamedPort,
    Policy,
    Port,
    PortRange,
    ProtoPort,
    Rule,
    Tier,
    protocol_number,
)
from weft.model.kernel import PREFIX, IpSet
from weft.renderers.ipsets import SET_FAMILY, SetCatalog, entity_key, ipset_net, set_prefix, short_hash
from weft.renderers.rules import MARK_ACCEPT, MARK_ALL, MARK_PASS, TIER_PASSES, Spec, base_matches, tiered_specs

MULTIPORT_MAX = 15                            # xt_multiport's limit, a range counting twice
LOG_PREFIX_MAX = 29                           # the LOG target's limit on --log-prefix
# How iptables-save prints an IP protocol number: the name /etc/protocols gives it (Debian's
# netbase, which weft's platform ships), else the number. Rendering the same text keeps a rule
# with a numeric protocol from showing as drift.
PROTOCOL_SAVE_NAMES = {
    0: "ip", 1: "icmp", 2: "igmp", 3: "ggp", 4: "ipencap", 5: "st", 6: "tcp", 8: "egp", 9: "igp", 12: "pup",
    17: "udp", 20: "hmp", 22: "xns-idp", 27: "rdp", 29: "iso-tp4", 33: "dccp", 36: "xtp", 37: "ddp",
    38: "idpr-cmtp", 41: "ipv6", 43: "ipv6-route", 44: "ipv6-frag", 45: "idrp", 46: "rsvp", 47: "gre", 50: "esp",
    51: "ah", 57: "skip", 58: "ipv6-icmp", 59: "ipv6-nonxt", 60: "ipv6-opts", 73: "rspf", 81: "vmtp", 88: "eigrp",
    89: "ospf", 93: "ax.25", 94: "ipip", 97: "etherip", 98: "encap", 103: "pim", 108: "ipcomp", 112: "vrrp",
    115: "l2tp", 124: "isis", 132: "sctp", 133: "fc", 135: "mobility-header", 136: "udplite", 137: "mpls-in-ip",
    138: "manet", 139: "hip", 140: "shim6", 141: "wesp", 142: "rohc", 143: "ethernet",
}
_FAMILY_ONLY = {1: 4, 58: 6}                  # ICMP is IPv4's, ICMPv6 IPv6's; any other protocol both's


def protocol_text(protocol: str) -> str:
    """A protocol as weft keeps it (Calico's name or a number), as iptables-save prints it."""
    number = protocol_number(protocol)
    return PROTOCOL_SAVE_NAMES.get(number, str(number))


def tier_specs(policies: list[Policy], direction: Direction, tiers: Mapping[str, Tier],
               chain_name: Callable[[Policy, Direction], str]) -> list[list[str]]:
    """A pod's policies for `direction` (in evaluation order) as renderers.rules.tiered_specs
    takes them: the policy chains of each tier (`chain_name`: renderers.iptables' layout), and
    TIER_PASSES last where the tier's defaultAction is Pass."""
    result = []
    for name, group in itertools.groupby(policies, key=lambda p: p.tier):
        chains = [chain_name(p, direction) for p in group]
        tier: Tier | None = tiers.get(name)
        if tier is not None and tier.default_action == Action.PASS:
            chains.append(TIER_PASSES)
        result.append(chains)
    return result


def policy_specs(policy: Policy, direction: Direction, sets: SetCatalog, family: int = 4, *,
                 pods_only: bool = False) -> list[Spec]:
    """The rules of `policy` for `direction`, in order, as iptables rules of `family`.
    `pods_only`: the state has no network sets or host endpoints, so selectors can pick only pods
    (their sets are renderers.ipsets' peers sets, found in a reused render without the index)."""
    tag = "i" if direction == INGRESS else "e"
    specs: list[Spec] = []
    for i, rule in enumerate(policy.rules(direction)):
        specs += rule_specs(rule, sets, family, log_prefix(policy.key, f"{tag}{i}"), pods_only=pods_only)
    return specs


def log_prefix(policy: str, rule: str) -> str:
    """"weft <policy> <rule>: " within the LOG target's 29 characters."""
    text = f"weft {policy} {rule}: "
    if len(text) <= LOG_PREFIX_MAX:
        return text
    room = LOG_PREFIX_MAX - len(f"weft  {rule}: ") - 5
    return f"weft {policy[:room]}~{short_hash('log', policy, length=4)} {rule}: "


def rule_specs(rule: Rule, sets: SetCatalog, family: int = 4, prefix: str = "weft-policy ", *,
               pods_only: bool = False) -> list[Spec]:
    """One Calico rule as iptables rules of `family` (several when its ports are alternatives);
    [] when it can never match a packet of that family."""
    if rule.ip_version not in (None, family):
        return []
    if rule.protocol is not None and _FAMILY_ONLY.get(protocol_number(rule.protocol), family) != family:
        return []
    if rule.protocol is not None and rule.not_protocol is not None and \
            protocol_number(rule.protocol) == protocol_number(rule.not_protocol):
        return []
    if not (_may_match(rule.source, family) and _may_match(rule.destination, family)):
        return []                   # (asked first: a side's sets are made only for a rule that is)
    src = _side(rule.source, "src", rule.protocol, sets, family, pods_only)
    dst = _side(rule.destination, "dst", rule.protocol, sets, family, pods_only)
    if src is None or dst is None:
        return []
    base = base_matches(src=src.net, dst=dst.net, proto=protocol_text(rule.protocol) if rule.protocol else "")
    if rule.protocol is None and rule.not_protocol is not None:
        base = f"{base} ! -p {protocol_text(rule.not_protocol)}".strip()
    icmp = _icmp_matches(rule, family)
    target = {
        Action.ALLOW: f"-j MARK --set-xmark {MARK_ACCEPT}/{MARK_ACCEPT}",
        Action.PASS: f"-j MARK --set-xmark {MARK_PASS}/{MARK_PASS}",
        Action.DENY: "-j DROP",
        Action.LOG: f'-j LOG --log-prefix "{prefix}"',
    }[rule.action]
    specs = [Spec(base, " ".join(p for p in (icmp, sp, dp, src.matches, dst.matches) if p), target)
             for sp, dp in itertools.product(src.ports, dst.ports)]
    mark = {Action.ALLOW: MARK_ACCEPT, Action.PASS: MARK_PASS}.get(rule.action)
    if mark:
        specs.append(Spec(extra=f"-m mark --mark {mark}/{mark}", target="-j RETURN"))
    return specs


def _icmp_matches(rule: Rule, family: int) -> str:
    module, flag = ("icmp", "--icmp-type") if family == 4 else ("icmp6", "--icmpv6-type")
    parts = []
    for match, negate in ((rule.icmp, ""), (rule.not_icmp, "! ")):
        if match is not None:
            value = str(match.type) if match.code is None else f"{match.type}/{match.code}"
            parts.append(f"-m {module} {negate}{flag} {value}")
    return " ".join(parts)


class _Side:
    """A rule side's matches: `net` for -s/-d, `matches` (set and negated port matches, all of
    which must hold), `ports` (alternatives, one rule each; ("",) for any port)."""

    def __init__(self, net: str, matches: str, ports: tuple[str, ...]):
        self.net, self.matches, self.ports = net, matches, ports


def _may_match(entity: EntityMatch, family: int) -> bool:
    """Whether a rule side's nets leave it able to match a packet of `family` (`_side` is None
    otherwise)."""
    if entity.nets and not any(_network(n).version == family for n in entity.nets):
        return False
    return not any(_network(n).version == family and _network(n).prefixlen == 0 for n in entity.not_nets)


def _side(entity: EntityMatch, direction: str, protocol: str | None, sets: SetCatalog, family: int,
          pods_only: bool) -> _Side | None:
    nets = [n for n in entity.nets if _network(n).version == family]
    not_nets = [n for n in entity.not_nets if _network(n).version == family]
    if entity.nets and not nets:
        return None
    if any(_network(n).prefixlen == 0 for n in not_nets):
        return None
    net, matches = "", []
    if len(nets) == 1:
        network = _network(nets[0])
        net = "" if network.prefixlen == 0 else str(network)    # iptables-save omits 0.0.0.0/0
    elif nets:
        matches.append(f"-m set --match-set {sets.nets(tuple(nets), family)} {direction}")
    if not_nets:
        matches.append(f"-m set ! --match-set {sets.nets(tuple(not_nets), family)} {direction}")
    if entity.has_endpoint_constraint:
        matches.append(f"-m set --match-set {_selected_set(entity, sets, family, pods_only)} {direction}")
    if entity.not_selector is not None:
        matches.append(f"-m set ! --match-set {_not_selected_set(entity, sets, family)} {direction}")
    matches += _not_port_matches(entity, direction, protocol, sets, family)
    return _Side(net, " ".join(matches), _port_alternatives(entity, direction, protocol, sets, family))


@cache
def _network(net: str):
    return ipaddress.ip_network(net)


def _selected_set(entity: EntityMatch, sets: SetCatalog, family: int, pods_only: bool) -> str:
    """The set of the addresses a side's selector picks: renderers.ipsets' peers set while it
    picks only pods; a set of its own when it picks host endpoints or network sets. A set the
    reused render has is taken without selecting again (the reuse's basis covers all three)."""
    if pods_only:
        return sets.peers(entity, family)
    key = entity_key(entity)
    meaning = f"selected {key}"
    found = _known(sets, meaning, family)
    if found is None and f"{set_prefix('s', family)}{short_hash('peers', key)}" in sets.reuse:
        return sets.peers(entity, family)
    if found is not None:
        return found
    selection = sets.index.side(entity)
    if selection is None or not (selection.host_endpoints or selection.network_sets):
        return sets.peers(entity, family)
    return _selection_set(sets, meaning, selection, family)


def _not_selected_set(entity: EntityMatch, sets: SetCatalog, family: int) -> str:
    assert entity.not_selector is not None
    meaning = f"notSelector {entity.not_selector.canonical()}"
    found = _known(sets, meaning, family)
    if found is not None:
        return found
    selection = sets.index.side_not(entity)
    assert selection is not None
    return _selection_set(sets, meaning, selection, family)


def _selection_name(meaning: str, kind: str, family: int) -> str:
    return f"{set_prefix('c', family)}{short_hash('selection', meaning, kind, str(family))}"


def _known(sets: SetCatalog, meaning: str, family: int) -> str | None:
    """The name of the set for `meaning` if this render or the reused one has it."""
    for kind in ("hash:ip", "hash:net"):
        name = _selection_name(meaning, kind, family)
        if name in sets.sets:
            return name
        if name in sets.reuse:
            sets.sets[name] = sets.reuse[name]
            return name
    return None


def _selection_set(sets: SetCatalog, meaning: str, selection: Selection, family: int) -> str:
    """A set named after `meaning` with the addresses of `selection`: hash:ip when they are all
    single addresses, else hash:net (the type is part of the name: a set never changes type)."""
    nets = selection.nets(sets.index, family)
    single = all(_network(n).prefixlen == _network(n).max_prefixlen for n in nets)
    kind = "hash:ip" if single else "hash:net"
    name = _selection_name(meaning, kind, family)
    if name not in sets.sets:
        members = frozenset(str(_network(n).network_address) for n in nets) if single else \
            frozenset(m for n in nets for m in ipset_net(n))
        sets.sets[name] = IpSet(name, kind, members, SET_FAMILY[family], about=meaning)
    return name


def _numeric_groups(ports: tuple[Port, ...]) -> list[str]:
    """Numeric ports as multiport lists of at most MULTIPORT_MAX (a range counting twice)."""
    groups: list[str] = []
    chunk: list[str] = []
    used = 0
    for p in ports:
        if isinstance(p, NamedPort):
            continue
        text, cost = (str(p.start), 1) if p.start == p.end else (f"{p.start}:{p.end}", 2)
        if used + cost > MULTIPORT_MAX:
            groups.append(",".join(chunk))
            chunk, used = [], 0
        chunk.append(text)
        used += cost
    if chunk:
        groups.append(",".join(chunk))
    return groups


def _port_alternatives(entity: EntityMatch, direction: str, protocol: str | None, sets: SetCatalog,
                       family: int) -> tuple[str, ...]:
    if not entity.ports:
        return ("",)
    flag = "--dports" if direction == "dst" else "--sports"
    alternatives = [f"-m multiport {flag} {group}" for group in _numeric_groups(entity.ports)]
    for p in entity.ports:
        if isinstance(p, NamedPort):
            name = sets.named_port(entity, p.name, protocol, family)
            alternatives.append(f"-m set --match-set {name} {direction},{direction}")
    return tuple(alternatives)


def _not_port_matches(entity: EntityMatch, direction: str, protocol: str | None, sets: SetCatalog,
                      family: int) -> list[str]:
    """notPorts: the port is in none of them (every negated match must hold)."""
    flag = "--dports" if direction == "dst" else "--sports"
    matches = [f"-m multiport ! {flag} {group}" for group in _numeric_groups(entity.not_ports)]
    for p in entity.not_ports:
        if isinstance(p, NamedPort):
            name = sets.named_port(entity, p.name, protocol, family)
            matches.append(f"-m set ! --match-set {name} {direction},{direction}")
    return matches


# --- host endpoints: traffic to the host itself ---------------------------------------------------

def host_endpoint_chains(state: ClusterState, node: str, sets: SetCatalog,
                         chain_name: Callable[[Policy, Direction], str], order: Callable, pods_only: bool,
                         direction: Direction = INGRESS, family: int = 4, *, accepted_before: bool = False
                         ) -> tuple[list[Spec], list[tuple[str, list[Spec], str]]]:
    """Calico's host endpoints of `node` for traffic to the host (INGRESS: the rules that end
    weft-INPUT) or from it (EGRESS: the rules of weft-OUTPUT), and the chains to add: (name,
    rules, about), the policies' own chains included. ([], []) when the node has none.

    Only host endpoints with an interface are rendered (one named by expectedIPs has it once
    ClusterState.with_host_interfaces resolved it on the node's addresses): the named ones,
    then the first "*" one for every other interface but `lo` (the host always reaches
    itself). Pod interfaces keep their own path (RETURN: the host's rules; the host's traffic
    to its pods is never policed). Each host endpoint's chain: connections already accepted
    pass, invalid ones drop, then the failsafe ports of the direction (FelixConfiguration,
    Felix's defaults: SSH, BGP, DNS, the API server, ...) are accepted whatever the policy,
    then the applicable policies' tiers (normal policies only: preDNAT and doNotTrack policies
    have their own tables, host_prednat_chains and host_untracked_chains), then Allow accepts,
    and what no policy decided goes to the endpoint's profiles (projectcalico-default-allow, or
    kns.<namespace> of an existing namespace, accept), else drops: Calico's default for host
    endpoints. `accepted_before`: a
    preDNAT or doNotTrack policy may have allowed the packet already (the accept mark:
    host_prednat_chains, host_untracked_chains): then it is accepted before the host endpoints'
    chains, as Felix's INPUT and OUTPUT do.
    """
    heps = [h for h in state.local_host_endpoints(node) if h.interface is not None]
    if not heps:
        return [], []
    ingress = direction == INGRESS
    flag, kinds = ("-i", ("hi", "hp")) if ingress else ("-o", ("ho", "hq"))
    wildcard = [h for h in heps if h.wildcard][:1]
    chosen = [h for h in heps if not h.wildcard] + wildcard
    entry = [Spec(f"{flag} {PREFIX.rstrip('-')}+", target="-j RETURN")]
    if accepted_before:
        entry.append(Spec(extra=f"-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT}", target="-j ACCEPT"))
    chains: list[tuple[str, list[Spec], str]] = []
    rendered: set[str] = set()
    settings = state.felix_settings(node)
    failsafes = settings.failsafe_inbound_host_ports if ingress else settings.failsafe_outbound_host_ports
    for hep in chosen:
        name, tiers_name = (f"{PREFIX}{k}-{short_hash('host-endpoint', hep.name, length=16)}" for k in kinds)
        entry.append(Spec(f"! {flag} lo" if hep.wildcard else f"{flag} {hep.interface}", target=f"-g {name}"))
        applicable = order([p for p in state.policies if direction in p.types and not p.pre_dnat
                            and not p.do_not_track and hep in sets.index.policy_host_endpoints(p)], state.tiers)
        specs = [Spec(extra="-m conntrack --ctstate RELATED,ESTABLISHED", target="-j ACCEPT"),
                 Spec(extra="-m conntrack --ctstate INVALID", target="-j DROP")]
        specs += _failsafe_specs(failsafes, "src" if ingress else "dst", family)
        specs += [Spec(target=f"-j MARK --set-xmark 0x0/{MARK_ALL}"),
                  Spec(target=f"-j {tiers_name}"),
                  Spec(extra=f"-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT}", target="-j ACCEPT")]
        specs.append(Spec(target="-j ACCEPT" if _profiles_allow(state, hep.profiles) else "-j DROP"))
        chains.append((name, specs, f"traffic {'to' if ingress else 'from'} this host through host endpoint "
                                    f"{hep.name}"))
        tiered = tiered_specs(tier_specs(applicable, direction, state.tiers, chain_name))
        chains.append((tiers_name, tiered, f"the {direction.lower()} policies of host endpoint {hep.name} "
                                           f"({len(applicable)})"))
        chains += _own_chains(applicable, direction, sets, family, pods_only, chain_name, rendered)
    return entry, chains


def host_forward_chains(state: ClusterState, node: str, sets: SetCatalog,
                        chain_name: Callable[[Policy, Direction], str], order: Callable, pods_only: bool,
                        family: int = 4, *, accepted_before: bool = False
                        ) -> tuple[list[Spec], list[Spec], list[tuple[str, list[Spec], str]]]:
    """Calico's applyOnForward: traffic the host forwards (to or from its pods, or between its
    interfaces) through an interface a host endpoint of `node` names passes that endpoint's
    policies with applyOnForward (ingress where it comes in, egress where it goes out). Returns
    (the rules of weft-FORWARD before the pods' egress, those after the pods' ingress, the chains
    to add); nothing when no such policy applies to a host endpoint of the node.

    As Felix does it: no failsafe ports and no profiles for forwarded traffic; a host endpoint
    that no applyOnForward policy applies to lets it through; where policies apply, their tiers
    end with the tier's defaultAction, Allow returns to weft-FORWARD (the pods' own policies still
    apply), and where every tier passed the packet goes on. Established connections and the pods'
    own interfaces are not host endpoints' forwarded traffic (the dispatch chains return first).
    `accepted_before`: a packet a preDNAT or doNotTrack policy allowed (the accept mark) skips
    the ingress applyOnForward policies, as in Felix's FORWARD.
    """
    chosen = _chosen_host_endpoints(state, node)
    applicable = {(hep.name, direction): order([p for p in state.policies if direction in p.types and p.apply_on_forward
                                                and not p.pre_dnat and not p.do_not_track
                                                and hep in sets.index.policy_host_endpoints(p)], state.tiers)
                  for hep in chosen for direction in (INGRESS, EGRESS)}
    if not any(applicable.values()):
        return [], [], []
    chains: list[tuple[str, list[Spec], str]] = []
    rendered: set[str] = set()
    entries = []
    for direction, flag, dispatch, kind in ((INGRESS, "-i", f"{PREFIX}from-hep-fwd", "hfi"),
                                            (EGRESS, "-o", f"{PREFIX}to-hep-fwd", "hfo")):
        specs = [Spec(extra="-m conntrack --ctstate RELATED,ESTABLISHED", target="-j RETURN"),
                 Spec(f"{flag} {PREFIX.rstrip('-')}+", target="-j RETURN")]
        for hep in chosen:
            match = f"! {flag} lo" if hep.wildcard else f"{flag} {hep.interface}"
            policies = applicable[(hep.name, direction)]
            if not policies:
                specs.append(Spec(match, target="-j RETURN"))
                continue
            name = f"{PREFIX}{kind}-{short_hash('host-endpoint-forward', hep.name, length=16)}"
            specs.append(Spec(match, target=f"-g {name}"))
            chains.append((name, tiered_specs(tier_specs(policies, direction, state.tiers, chain_name)),
                           f"forwarded {direction.lower()} through host endpoint {hep.name} "
                           f"({len(policies)} applyOnForward policies)"))
            chains += _own_chains(policies, direction, sets, family, pods_only, chain_name, rendered)
        chains.append((dispatch, specs, f"forwarded traffic {'from' if direction == INGRESS else 'to'} host "
                                        f"endpoints: one branch per interface"))
        gate = f"-m mark --mark 0x0/{MARK_ACCEPT}" if accepted_before and direction == INGRESS else ""
        entries.append([Spec(extra=gate, target=f"-j {dispatch}")])
    return entries[0], entries[1], chains


PREROUTING_CHAIN = f"{PREFIX}PREROUTING"     # mangle PREROUTING -> weft-PREROUTING: preDNAT policies


def host_prednat_chains(state: ClusterState, node: str, sets: SetCatalog,
                        chain_name: Callable[[Policy, Direction], str], order: Callable, pods_only: bool,
                        family: int = 4) -> list[tuple[str, list[Spec], str]]:
    """Calico's preDNAT policies: the mangle table's chains (weft-PREROUTING first, hooked from
    PREROUTING), or [] when no preDNAT policy applies to a host endpoint of `node`.

    A new connection coming in through a host endpoint's interface (to the host or forwarded:
    before DNAT, the two are not told apart) passes the failsafe inbound ports first (they skip
    preDNAT policy, as Felix's failsafe-in chain in mangle does), then the preDNAT policies' tiers
    (ingress only) without the tiers' default drop: Deny drops here, Allow sets the accept mark
    (the filter table then accepts the packet to the host and skips the ingress applyOnForward
    policies of forwarded traffic; the pods' own policies still apply), and a packet no preDNAT
    rule decided goes on to the normal policies. Established connections and the pods'
    interfaces return at once.
    """
    chosen = _chosen_host_endpoints(state, node)
    applicable = {hep.name: order([p for p in state.policies if INGRESS in p.types and p.pre_dnat
                                   and hep in sets.index.policy_host_endpoints(p)], state.tiers) for hep in chosen}
    if not any(applicable.values()):
        return []
    entry = [Spec(extra="-m conntrack --ctstate RELATED,ESTABLISHED", target="-j RETURN"),
             Spec(extra=f"-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT}", target="-j RETURN"),    # doNotTrack allowed
             Spec(f"-i {PREFIX.rstrip('-')}+", target="-j RETURN")]
    chains: list[tuple[str, list[Spec], str]] = []
    rendered: set[str] = set()
    failsafes = _failsafe_specs(state.felix_settings(node).failsafe_inbound_host_ports, "src", family, "-j RETURN")
    for hep in chosen:
        match = "! -i lo" if hep.wildcard else f"-i {hep.interface}"
        policies = applicable[hep.name]
        if not policies:
            entry.append(Spec(match, target="-j RETURN"))
            continue
        name = f"{PREFIX}hd-{short_hash('host-endpoint-prednat', hep.name, length=16)}"
        entry.append(Spec(match, target=f"-g {name}"))
        chains += _undropped_tiers(name, failsafes, f"new connections into host endpoint {hep.name}, before DNAT "
                                   f"({len(policies)} preDNAT policies)", policies, INGRESS, "preDNAT",
                                   state, sets, family, pods_only, chain_name, rendered)
    return [(PREROUTING_CHAIN, entry, "entry from mangle PREROUTING: host endpoints' preDNAT policies"), *chains]


def _undropped_tiers(name: str, head: list[Spec], about: str, policies: list[Policy], direction: Direction,
                     kind: str, state: ClusterState, sets: SetCatalog, family: int, pods_only: bool,
                     chain_name: Callable[[Policy, Direction], str], rendered: set[str]
                     ) -> list[tuple[str, list[Spec], str]]:
    """A host endpoint's chain of preDNAT or doNotTrack policies (`kind`): `head` (its failsafe
    ports), then the policies' tiers without the tiers' default drop (Felix renders these so),
    and the policies' own chains not yet in `rendered`."""
    tiers = [chains_ if TIER_PASSES in chains_ else [*chains_, TIER_PASSES]
             for chains_ in tier_specs(policies, direction, state.tiers, chain_name)]
    return [(name, head + tiered_specs(tiers), about),
            *_own_chains(policies, direction, sets, family, pods_only, chain_name, rendered, f" ({kind})")]


def _own_chains(policies: list[Policy], direction: Direction, sets: SetCatalog, family: int, pods_only: bool,
                chain_name: Callable[[Policy, Direction], str], rendered: set[str], note: str = ""
                ) -> list[tuple[str, list[Spec], str]]:
    """The policies' own chains (their rules) not yet in `rendered`, which they join."""
    out = []
    for policy in policies:
        pname = chain_name(policy, direction)
        if pname not in rendered:
            rendered.add(pname)
            out.append((pname, policy_specs(policy, direction, sets, family, pods_only=pods_only),
                        f"{direction.lower()} rules of {policy.origin or policy.key}{note}"))
    return out


RAW_CHAINS = {INGRESS: f"{PREFIX}PREROUTING", EGRESS: f"{PREFIX}OUTPUT"}     # hooked from raw's namesakes


def host_untracked_chains(state: ClusterState, node: str, sets: SetCatalog,
                          chain_name: Callable[[Policy, Direction], str], order: Callable, pods_only: bool,
                          family: int = 4, *, marks_read: frozenset[Direction] = frozenset()
                          ) -> tuple[set[Direction], list[tuple[str, list[Spec], str]]]:
    """Calico's doNotTrack policies: the raw table's chains, and the directions they police (an
    empty set and no chains when no doNotTrack policy applies to a host endpoint of `node`).

    raw PREROUTING -> weft-PREROUTING (ingress, to the host or forwarded) and raw OUTPUT ->
    weft-OUTPUT (egress, from the host's processes), as Felix renders them: weft's mark bits are
    cleared, the pods' interfaces return, and by interface a host endpoint's chain (weft-hu-* in,
    weft-hv-* out; not "*" endpoints: Calico applies no untracked policy to them) runs the failsafe
    ports first (they, and replies to them, skip untracked policy), then the doNotTrack policies'
    tiers without the tiers' default drop: Deny drops, Allow sets the accept mark, and a packet
    with the mark is not tracked (NOTRACK); the filter table then accepts it, and forwarded
    traffic with it skips the ingress applyOnForward policies (the pods' own still apply).

    `marks_read`: directions whose later tables read weft's accept mark before setting it (the
    mangle table's preDNAT chains, INGRESS): their raw entry chain is rendered even without
    doNotTrack policies, clearing weft's mark bits first, as Felix's raw PREROUTING always does.
    Otherwise a mark set on an earlier pass survives into the packet's later tables: a VXLAN
    packet a host endpoint's policy accepted (the accept mark) is decapsulated in this namespace
    with its mark, and its inner packet would be taken as accepted by a preDNAT policy.
    """
    heps = [h for h in _chosen_host_endpoints(state, node) if not h.wildcard]
    applicable = {(hep.name, d): order([p for p in state.policies if d in p.types and p.do_not_track
                                        and hep in sets.index.policy_host_endpoints(p)], state.tiers)
                  for hep in heps for d in (INGRESS, EGRESS)}
    settings = state.felix_settings(node)
    inbound, outbound = settings.failsafe_inbound_host_ports, settings.failsafe_outbound_host_ports
    directions: set[Direction] = set()
    chains: list[tuple[str, list[Spec], str]] = []
    rendered: set[str] = set()
    for direction, flag, kind in ((INGRESS, "-i", "hu"), (EGRESS, "-o", "hv")):
        if not any(applicable[(hep.name, direction)] for hep in heps):
            if direction in marks_read:
                chains.insert(0, (RAW_CHAINS[direction], [Spec(target=f"-j MARK --set-xmark 0x0/{MARK_ALL}")],
                                  f"entry from raw {'PREROUTING' if direction == INGRESS else 'OUTPUT'}: weft's "
                                  f"mark bits cleared (later tables read the accept mark)"))
            continue
        directions.add(direction)
        peer = "src" if direction == INGRESS else "dst"
        # Failsafe ports of this direction, and replies from the other direction's (source ports).
        failsafes = _failsafe_specs(inbound if direction == INGRESS else outbound, peer, family, "-j RETURN") + \
            _failsafe_specs(outbound if direction == INGRESS else inbound, peer, family, "-j RETURN", "--sports")
        entry = [Spec(target=f"-j MARK --set-xmark 0x0/{MARK_ALL}"),
                 Spec(f"{flag} {PREFIX.rstrip('-')}+", target="-j RETURN")]
        for hep in heps:
            policies = applicable[(hep.name, direction)]
            if not policies:
                continue
            name = f"{PREFIX}{kind}-{short_hash('host-endpoint-untracked', hep.name, length=16)}"
            entry.append(Spec(f"{flag} {hep.interface}", target=f"-j {name}"))
            chains += _undropped_tiers(name, failsafes, f"untracked {direction.lower()} through host endpoint "
                                       f"{hep.name} ({len(policies)} doNotTrack policies)", policies, direction,
                                       "doNotTrack", state, sets, family, pods_only, chain_name, rendered)
        entry.append(Spec(extra=f"-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT}", target="-j NOTRACK"))
        chains.insert(0, (RAW_CHAINS[direction], entry,
                          f"entry from raw {'PREROUTING' if direction == INGRESS else 'OUTPUT'}: host endpoints' "
                          f"doNotTrack policies"))
    return directions, chains


def _chosen_host_endpoints(state: ClusterState, node: str) -> list:
    """The node's host endpoints that weft polices: those naming their interface, then the first "*"."""
    heps = [h for h in state.local_host_endpoints(node) if h.interface is not None]
    return [h for h in heps if not h.wildcard] + [h for h in heps if h.wildcard][:1]


def _failsafe_specs(ports: tuple[ProtoPort, ...], peer: str, family: int, target: str = "-j ACCEPT",
                    port_flag: str = "--dports") -> list[Spec]:
    """Failsafe ports as ACCEPT rules (or `target`), one per (net, protocol) and multiport group,
    in order; a port's net is the peer's: the source inbound (`peer` "src"), the destination
    outbound. `port_flag` "--sports": replies from the ports (the raw table's failsafes)."""
    groups: dict[tuple[str, str], list[PortRange]] = {}
    for fp in ports:
        groups.setdefault((fp.net or "", fp.protocol), []).append(PortRange(fp.port, fp.port))
    specs = []
    for (net, protocol), group in groups.items():
        source = "" if not net or _network(net).prefixlen == 0 else str(_network(net))
        if net and _network(net).version != family:
            continue
        for ports_text in _numeric_groups(tuple(group)):
            matches = base_matches(src=source, proto=protocol) if peer == "src" else \
                base_matches(dst=source, proto=protocol)
            specs.append(Spec(matches, f"-m multiport {port_flag} {ports_text}", target))
    return specs


def _profiles_allow(state: ClusterState, profiles: tuple[str, ...]) -> bool:
    """Whether a host endpoint's profiles allow what no policy decided (desired.verdict's rule)."""
    return any(p == calico_labels.DEFAULT_ALLOW_PROFILE or (p.startswith(calico_labels.NAMESPACE_PROFILE_PREFIX) and
               p[len(calico_labels.NAMESPACE_PROFILE_PREFIX):] in state.namespaces) for p in profiles)
