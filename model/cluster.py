"""The desired-state model: immutable, typed, and shaped after Calico's semantics.

Every source (manifest directory, API server) and every resource kind (Kubernetes
NetworkPolicy, Calico's GlobalNetworkPolicy, NetworkPolicy, Tier, (Global)NetworkSet,
HostEndpoint, FelixConfiguration) is converted into these few types, so the renderers only
ever see one policy language: policies ordered within tiers, rules with actions, entity
matches over labels, nets and ports. What Calico means by them is desired.verdict's (the
reference evaluator); which endpoints, host endpoints and network sets a selector picks is
desired.index's, over the labels model.labels describes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum

from weft.model import codec
from weft.model import labels as calico_labels
from weft.model.selector import And, Eq, Expr, Has
from weft.model.services import EndpointSlice, Service


class Action(StrEnum):
    """What a rule does with the packets it matches. Log records the packet and goes on to the
    next rule; Pass skips the rest of the tier; Allow and Deny are final."""
    ALLOW = "Allow"
    DENY = "Deny"
    PASS = "Pass"
    LOG = "Log"


class Direction(StrEnum):
    """Which traffic a policy or rule is about, relative to the endpoint it applies to. The
    values are Calico's and Kubernetes' policyTypes spelling; they compare equal to it."""
    INGRESS = "Ingress"
    EGRESS = "Egress"


INGRESS = Direction.INGRESS
EGRESS = Direction.EGRESS
PROTOCOLS = ("tcp", "udp", "sctp")            # the protocols with ports (container ports, k8s rules)
# Calico's protocol names (lower case, as weft keeps them) and their IP protocol numbers.
PROTOCOL_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132, "udplite": 136}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}
PORT_PROTOCOLS = frozenset(("tcp", "udp", "sctp"))


def protocol_number(protocol: str) -> int:
    """The IP protocol number of a protocol as weft keeps it (a name of PROTOCOL_NUMBERS or a
    decimal number of one with no name)."""
    return PROTOCOL_NUMBERS[protocol] if protocol in PROTOCOL_NUMBERS else int(protocol)


@dataclass(frozen=True, order=True)
class PortRange:
    """Numeric ports `start`..`end`, both inclusive."""
    start: int
    end: int


@dataclass(frozen=True, order=True)
class NamedPort:
    """A port named by the destination endpoint's container ports."""
    name: str


Port = PortRange | NamedPort


@dataclass(frozen=True)
class IcmpMatch:
    """ICMP (or ICMPv6) type, and code within it (None: any code)."""
    type: int
    code: int | None = None


@dataclass(frozen=True)
class EntityMatch:
    """One side (source or destination) of a rule, as Calico's EntityRule.

    The positive endpoint constraint is present when any of `selector`, `namespace_selector`,
    `namespace` or the service-account fields is set: it matches the addresses of the
    selectable things (workload and host endpoints, network sets) that `endpoint_selector()`
    selects. `namespace` is the namespace a namespaced policy confines its rule selectors to
    (the converters set it where Calico does); `namespace_selector` may be `global()`.
    `not_selector` is not confined to any namespace, as in Calico: the rule matches packets
    to/from anywhere except the addresses it selects. Selectors are Calico selector trees in
    normal form (Kubernetes label selectors are converted to them when loaded).
    """
    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    selector: Expr | None = None
    namespace_selector: Expr | None = None
    namespace: str | None = None
    ports: tuple[Port, ...] = ()
    not_selector: Expr | None = None
    not_ports: tuple[Port, ...] = ()
    service_account_names: tuple[str, ...] = ()
    service_account_selector: Expr | None = None

    @property
    def has_endpoint_constraint(self) -> bool:
        return (self.selector is not None or self.namespace_selector is not None or self.namespace is not None
                or self.has_service_accounts)

    @property
    def has_service_accounts(self) -> bool:
        return bool(self.service_account_names) or self.service_account_selector is not None

    def endpoint_selector(self) -> Expr | None:
        """The one selector, over the labels of model.labels, that Calico evaluates for the
        positive endpoint constraint (None when there is none)."""
        if not self.has_endpoint_constraint:
            return None
        parts: list[Expr] = []
        if self.namespace_selector is not None:
            parts.append(calico_labels.namespace_scope(self.namespace_selector))
        elif self.namespace is not None:
            parts.append(Eq(calico_labels.NAMESPACE, self.namespace))
        if self.has_service_accounts:
            parts.append(calico_labels.service_account_scope(self.service_account_names, self.service_account_selector))
        if self.selector is not None:
            parts.append(self.selector)
        return And(tuple(parts)).normalize()

    def named_ports(self) -> tuple[tuple[NamedPort, ...], tuple[NamedPort, ...]]:
        """(named ports, named notPorts)."""
        return (tuple(p for p in self.ports if isinstance(p, NamedPort)),
                tuple(p for p in self.not_ports if isinstance(p, NamedPort)))


@dataclass(frozen=True)
class Rule:
    """A Calico rule. `protocol` and `not_protocol` are lower-case names of PROTOCOL_NUMBERS or
    the decimal number of a protocol without one; `ip_version` (4 or 6) or None for both.
    `origin` names the rule in the user's object ("spec.ingress[2]"), for plan text and logs."""
    action: Action
    protocol: str | None = None
    source: EntityMatch = EntityMatch()
    destination: EntityMatch = EntityMatch()
    not_protocol: str | None = None
    icmp: IcmpMatch | None = None
    not_icmp: IcmpMatch | None = None
    ip_version: int | None = None
    origin: str = ""


@dataclass(frozen=True)
class Policy:
    """A policy in Calico's form: GlobalNetworkPolicy (namespace None), Calico NetworkPolicy, or
    a Kubernetes NetworkPolicy converted as Calico converts it (tier default, order 1000, named
    "knp.default.<name>").

    `selector`, `namespace_selector` (global policies) and `service_account_selector` are what
    the user wrote; `endpoint_selector()` combines them as Calico does. `apply_on_forward`,
    `pre_dnat` and `do_not_track` only matter for host endpoints. `origin` names the user's
    object ("GlobalNetworkPolicy security.deny-all"); each rule's own origin names the rule.
    """
    name: str                             # Calico name, e.g. "knp.default.allow-web", "security.deny"
    namespace: str | None                 # None for global policies
    selector: Expr                        # which endpoints it applies to (within `namespace` when set)
    types: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    tier: str = "default"
    order: float | None = 1000.0
    origin: str = ""                      # "NetworkPolicy x/allow-web": what a user wrote
    namespace_selector: Expr | None = None
    service_account_selector: Expr | None = None
    apply_on_forward: bool = False
    pre_dnat: bool = False
    do_not_track: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.ingress if direction == INGRESS else self.egress

    def endpoint_selector(self) -> Expr:
        """Which endpoints the policy applies to, as one selector over model.labels' labels:
        Calico's combination of the selector, the policy's namespace, its namespaceSelector
        (all() meaning any namespaced endpoint) and its serviceAccountSelector (all() meaning,
        in a global policy, any endpoint with a service account)."""
        parts: list[Expr] = [self.selector]
        if self.namespace is not None:
            parts.append(Eq(calico_labels.NAMESPACE, self.namespace))
        if self.namespace_selector is not None:
            parts.append(calico_labels.namespace_scope(self.namespace_selector))
        if self.service_account_selector is not None:
            all_means = Has(calico_labels.SERVICE_ACCOUNT) if self.namespace is None else None
            parts.append(calico_labels.prefixed(self.service_account_selector, calico_labels.SERVICE_ACCOUNT_PREFIX,
                                                all_means))
        return And(tuple(parts)).normalize()


@dataclass(frozen=True)
class ContainerPort:
    """A named port of an endpoint (a pod's container port, a host endpoint's `ports`)."""
    name: str
    port: int
    protocol: str                          # one of PROTOCOLS


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class ServiceAccount:
    """A Kubernetes ServiceAccount: its labels are its pods' `pcsa.*` labels."""
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class Endpoint:
    """A workload endpoint: a pod with an address, on some node."""
    namespace: str
    pod: str
    node: str
    iface: str                             # host-side veth, see desired.endpoints
    ips: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)
    ports: tuple[ContainerPort, ...] = ()
    service_account: str | None = None     # spec.serviceAccountName

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod}"

    @property
    def profiles(self) -> tuple[str, ...]:
        """Calico's profiles of a pod: its namespace's, then its service account's."""
        ns = calico_labels.NAMESPACE_PROFILE_PREFIX + self.namespace
        if not self.service_account:
            return (ns,)
        return (ns, f"{calico_labels.SERVICE_ACCOUNT_PROFILE_PREFIX}{self.namespace}.{self.service_account}")


@dataclass(frozen=True)
class HostEndpoint:
    """Calico HostEndpoint: one interface of a node (`interface` a name, or None: the interface
    holding one of `expected_ips`), or all of its interfaces (`interface` "*")."""
    name: str
    node: str
    interface: str | None
    expected_ips: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)
    profiles: tuple[str, ...] = ()
    ports: tuple[ContainerPort, ...] = ()

    @property
    def key(self) -> str:
        return self.name

    @property
    def wildcard(self) -> bool:
        return self.interface == "*"


@dataclass(frozen=True)
class NetworkSet:
    """Calico NetworkSet (namespaced) or GlobalNetworkSet (namespace None): labelled CIDRs that
    rule selectors can select; their nets become members where they match."""
    name: str
    namespace: str | None
    nets: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class NodeBGP:
    """A node's BGP identity, as Calico keeps it (Node spec.bgp, or projectcalico.org/*
    annotations on the Kubernetes Node)."""
    ipv4_address: str | None = None         # "198.18.0.1/24": the address and its subnet
    ipv6_address: str | None = None
    as_number: int | None = None            # None: the BGPConfiguration's asNumber
    route_reflector_cluster_id: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)
    bgp: NodeBGP | None = None
    addresses: tuple[str, ...] = ()         # status.addresses of type InternalIP


@dataclass(frozen=True)
class IPPool:
    """Calico IPPool: where pod addresses come from, carved into blocks with node affinity."""
    name: str
    cidr: str
    block_size: int                         # prefix length of its blocks (26 for IPv4 by default)
    node_selector: Expr | None = None       # over node labels (None: all nodes)
    disabled: bool = False
    disable_bgp_export: bool = False
    nat_outgoing: bool = False


@dataclass(frozen=True)
class Block:
    """An address block owned by one node (Calico IPAMBlock affinity / confirmed BlockAffinity)."""
    cidr: str
    node: str
    origin: str = ""                        # "IPAMBlock 198-18-4-0-26": where the claim is recorded


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class Community:
    name: str
    value: str                              # "aa:nn" or "aa:nn:mm"


@dataclass(frozen=True)
class PrefixAdvertisement:
    cidr: str
    communities: tuple[str, ...]            # community values (names already resolved)


@dataclass(frozen=True)
class BGPConfiguration:
    """Calico BGPConfiguration: "default" (cluster-wide) or "node.<name>" (one node's override)."""
    name: str
    as_number: int | None = None            # default 64512 when unset everywhere
    node_to_node_mesh: bool | None = None   # default True
    listen_port: int | None = None          # default 179
    log_severity: str | None = None         # default "Info"
    service_cluster_ips: tuple[str, ...] = ()
    service_external_ips: tuple[str, ...] = ()
    service_loadbalancer_ips: tuple[str, ...] = ()
    communities: tuple[Community, ...] = ()
    prefix_advertisements: tuple[PrefixAdvertisement, ...] = ()
    node_mesh_password: SecretKeyRef | None = None      # mesh sessions' password ("default" only)
    node_mesh_max_restart_time: str | None = None       # mesh sessions' graceful restart, e.g. "120s"


@dataclass(frozen=True)
class BGPPeer:
    """Calico BGPPeer: an explicit peer of every node, one node, or the nodes a selector picks."""
    name: str
    peer_ip: str | None = None              # address (port separately); None with peer_selector
    peer_port: int | None = None
    as_number: int | None = None
    node: str | None = None
    node_selector: Expr | None = None       # over node labels
    peer_selector: Expr | None = None       # peer with the nodes it selects
    password: SecretKeyRef | None = None
    keep_original_next_hop: bool = False
    next_hop_mode: str | None = None        # Auto / Self / Keep
    max_restart_time: str | None = None     # a duration, e.g. "120s"
    keepalive_time: str | None = None
    ttl_security: int | None = None
    source_address: str = "UseNodeIP"       # UseNodeIP / None


@dataclass(frozen=True)
class Secret:
    namespace: str
    name: str
    data: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)   # decoded


@dataclass(frozen=True)
class Tier:
    """Calico Tier: tiers apply in order (None last, then by name); a tier that has policies for
    an endpoint and direction, none of which decided, ends with its default action (Deny, or
    Pass to the next tier)."""
    name: str
    order: float | None = None
    default_action: Action = Action.DENY


DEFAULT_TIER = Tier("default", 1_000_000.0, Action.DENY)   # Calico's: fixed order, always present


@dataclass(frozen=True)
class ProtoPort:
    """A failsafe port: protocol (tcp, udp or sctp), port, and the peer net it is open to (None: any)."""
    protocol: str
    port: int
    net: str | None = None


def _ports(*entries: str) -> tuple[ProtoPort, ...]:
    return tuple(ProtoPort(e.split(":")[0], int(e.split(":")[1])) for e in entries)


# Felix's defaults: SSH, DHCP, BGP, etcd, Typha and the Kubernetes API stay reachable whatever the policy.
DEFAULT_FAILSAFE_INBOUND = _ports("tcp:22", "udp:68", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473",
                                  "tcp:6443", "tcp:6666", "tcp:6667")
DEFAULT_FAILSAFE_OUTBOUND = _ports("udp:53", "udp:67", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473",
                                   "tcp:6443", "tcp:6666", "tcp:6667")


@dataclass(frozen=True)
class FelixConfiguration:
    """One FelixConfiguration object ("default", or "node.<name>" for one node): the fields weft
    uses, None where the object does not set them (FelixSettings holds the effective values)."""
    name: str
    failsafe_inbound_host_ports: tuple[ProtoPort, ...] | None = None
    failsafe_outbound_host_ports: tuple[ProtoPort, ...] | None = None
    bpf_enabled: bool | None = None
    default_endpoint_to_host_action: str | None = None      # Drop / Accept / Return
    filter_allow_action: str | None = None                  # iptablesFilterAllowAction: Accept / Return
    filter_deny_action: str | None = None                   # iptablesFilterDenyAction: Drop / Reject
    log_prefix: str | None = None
    ipv6_support: bool | None = None
    nat_outgoing_address: str | None = None
    nat_port_range: PortRange | None = None


@dataclass(frozen=True)
class FelixSettings:
    """The Felix configuration in effect on one node: "node.<name>" over "default" over Felix's
    defaults, field by field (as Felix merges them)."""
    failsafe_inbound_host_ports: tuple[ProtoPort, ...] = DEFAULT_FAILSAFE_INBOUND
    failsafe_outbound_host_ports: tuple[ProtoPort, ...] = DEFAULT_FAILSAFE_OUTBOUND
    bpf_enabled: bool = False
    default_endpoint_to_host_action: str = "Drop"
    filter_allow_action: str = "Accept"
    filter_deny_action: str = "Drop"
    log_prefix: str = "calico-packet"
    ipv6_support: bool = True
    nat_outgoing_address: str | None = None
    nat_port_range: PortRange | None = None
    # Felix's detected features (not configuration): what this node's iptables and kernel support.
    masq_fully_random: bool = False        # MASQFullyRandom / SNATFullyRandom: `--random-fully`


@dataclass(frozen=True)
class ClusterState:
    """Everything the cluster says, already validated."""
    namespaces: Mapping[str, Namespace]
    endpoints: tuple[Endpoint, ...]
    policies: tuple[Policy, ...]
    nodes: Mapping[str, Node]
    tiers: Mapping[str, Tier] = field(default_factory=lambda: {"default": DEFAULT_TIER})
    ignored_kinds: tuple[str, ...] = ()    # kinds seen and not understood, reported to the user
    ippools: tuple[IPPool, ...] = ()
    blocks: tuple[Block, ...] = ()
    bgp_configurations: tuple[BGPConfiguration, ...] = ()
    bgp_peers: tuple[BGPPeer, ...] = ()
    secrets: tuple[Secret, ...] = ()
    network_sets: tuple[NetworkSet, ...] = ()
    host_endpoints: tuple[HostEndpoint, ...] = ()
    felix_configurations: tuple[FelixConfiguration, ...] = ()
    service_accounts: tuple[ServiceAccount, ...] = ()
    warnings: tuple[str, ...] = ()         # "Kind: field": fields of known kinds weft does not use
    services: tuple[Service, ...] = ()                  # model.services: the eBPF plane's load balancing
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    # (node, feature) for what a node's tools and kernel support (probes.backend.nat_features):
    # Felix's detected features, part of FelixSettings.
    node_features: tuple[tuple[str, str], ...] = ()

    def local_endpoints(self, node: str) -> tuple[Endpoint, ...]:
        return tuple(sorted((e for e in self.endpoints if e.node == node), key=lambda e: e.iface))

    def local_host_endpoints(self, node: str) -> tuple[HostEndpoint, ...]:
        return tuple(sorted((h for h in self.host_endpoints if h.node == node), key=lambda h: h.name))

    def felix_settings(self, node: str) -> FelixSettings:
        """The Felix configuration in effect on `node` (FelixSettings)."""
        by_name = {c.name: c for c in self.felix_configurations}
        values: dict = {}
        for config in (by_name.get("default"), by_name.get(f"node.{node}")):
            if config is not None:
                values.update({f.name: getattr(config, f.name) for f in fields(config)
                               if f.name != "name" and getattr(config, f.name) is not None})
        return FelixSettings(**values, masq_fully_random=(node, "MASQFullyRandom") in self.node_features)

    def with_node_features(self, node: str, features: Mapping[str, bool]) -> ClusterState:
        """This state with what `node`'s iptables and kernel support (Felix's feature detection,
        probes.backend.nat_features), in place of what it said before."""
        kept = tuple(f for f in self.node_features if f[0] != node)
        return replace(self, node_features=kept + tuple((node, name) for name, on in sorted(features.items()) if on))

    def with_host_interfaces(self, node: str, interfaces: Mapping[str, tuple[str, ...]]) -> ClusterState:
        """This state with the host endpoints of `node` that name their interface by address only
        (no interfaceName, expectedIPs) resolved on the node's interfaces (`interfaces`: name ->
        addresses, as probes.hostaddrs reads them), as Calico applies them: an interface a host
        endpoint names is that one's; another holding one of an endpoint's expectedIPs is the
        first such endpoint's (by name, as desired.verdict's host_endpoint_for picks); an endpoint
        whose addresses no free interface holds stays unresolved (not policed). An endpoint whose
        addresses are on several interfaces takes the first by name (weft polices one interface
        per host endpoint)."""
        mine = self.local_host_endpoints(node)
        if not any(h.interface is None for h in mine):
            return self
        taken = {h.interface for h in mine if h.interface is not None}
        resolved: dict[str, HostEndpoint] = {}
        for h in mine:
            if h.interface is not None:
                continue
            wanted = set(h.expected_ips)
            found = next((name for name, ips in sorted(interfaces.items())
                          if name not in taken and wanted & set(ips)), None)
            if found is not None:
                taken.add(found)
                resolved[h.name] = replace(h, interface=found)
        if not resolved:
            return self
        return replace(self, host_endpoints=tuple(resolved.get(h.name, h) if h.node == node else h
                                                  for h in self.host_endpoints))

    def unresolved_host_endpoints(self, node: str) -> tuple[str, ...]:
        """Names of `node`'s host endpoints without an interface (after with_host_interfaces:
        none of the node's interfaces holds one of their expectedIPs): not policed."""
        return tuple(h.name for h in self.local_host_endpoints(node) if h.interface is None)

    def with_local_addresses(self, node: str, addresses: Mapping[str, tuple[str, ...]]) -> ClusterState:
        """This state with the addresses this node's IPAM gave its pods ("ns/pod" -> ips): they are
        known here before the API server's pod status shows them."""
        if not addresses:
            return self
        endpoints = tuple(replace(e, ips=addresses[e.key]) if e.node == node and e.key in addresses else e
                          for e in self.endpoints)
        return replace(self, endpoints=endpoints)


codec.register_module(globals())   # these types may be kept in the desired-state cache
