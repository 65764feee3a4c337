"""The desired-state model: immutable, typed, and shaped after Calico's semantics.

Every source (manifest directory, API server) and every resource kind (Kubernetes
NetworkPolicy now, Calico's own kinds later) is converted into these few types, so the
renderers only ever see one policy language: policies ordered within tiers, rules with
actions, entity matches over labels, nets and ports.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from weft.model import codec
from weft.model.selector import Expr
from weft.model.services import EndpointSlice, Service


class Action(StrEnum):
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
PROTOCOLS = ("tcp", "udp", "sctp")


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
class EntityMatch:
    """One side (source or destination) of a rule, as Calico's EntityRule.

    The endpoint constraint is present when any of `selector`, `namespace_selector` or
    `namespace` is set: it matches endpoints whose labels match `selector` (all when None),
    whose namespace's labels match `namespace_selector` (any namespace when None) and, when
    `namespace` is set, that live in that namespace. Selectors are Calico selector trees in
    normal form (Kubernetes label selectors are converted to them when loaded).
    """
    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    selector: Expr | None = None
    namespace_selector: Expr | None = None
    namespace: str | None = None
    ports: tuple[Port, ...] = ()

    @property
    def has_endpoint_constraint(self) -> bool:
        return self.selector is not None or self.namespace_selector is not None or self.namespace is not None


@dataclass(frozen=True)
class Rule:
    action: Action
    protocol: str | None = None          # one of PROTOCOLS, or None for any
    source: EntityMatch = EntityMatch()
    destination: EntityMatch = EntityMatch()


@dataclass(frozen=True)
class Policy:
    """A policy in Calico's form; Kubernetes NetworkPolicies become these (tier default, order 1000)."""
    name: str                             # Calico name, e.g. "knp.default.allow-web"
    namespace: str | None                 # None for global policies
    selector: Expr                        # which endpoints it applies to (within `namespace` when set)
    types: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    tier: str = "default"
    order: float | None = 1000.0
    origin: str = ""                      # "NetworkPolicy x/allow-web": what a user wrote

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class ContainerPort:
    name: str
    port: int
    protocol: str                          # one of PROTOCOLS


@dataclass(frozen=True)
class Namespace:
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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod}"


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
    name: str
    order: float | None = None


@dataclass(frozen=True)
class ClusterState:
    """Everything the cluster says, already validated."""
    namespaces: Mapping[str, Namespace]
    endpoints: tuple[Endpoint, ...]
    policies: tuple[Policy, ...]
    nodes: Mapping[str, Node]
    tiers: Mapping[str, Tier] = field(default_factory=lambda: {"default": Tier("default", 1_000_000.0)})
    ignored_kinds: tuple[str, ...] = ()    # kinds seen and not understood, reported to the user
    ippools: tuple[IPPool, ...] = ()
    blocks: tuple[Block, ...] = ()
    bgp_configurations: tuple[BGPConfiguration, ...] = ()
    bgp_peers: tuple[BGPPeer, ...] = ()
    secrets: tuple[Secret, ...] = ()
    services: tuple[Service, ...] = ()                  # model.services: the eBPF plane's load balancing
    endpoint_slices: tuple[EndpointSlice, ...] = ()

    def local_endpoints(self, node: str) -> tuple[Endpoint, ...]:
        return tuple(sorted((e for e in self.endpoints if e.node == node), key=lambda e: e.iface))

    def with_local_addresses(self, node: str, addresses: Mapping[str, tuple[str, ...]]) -> ClusterState:
        """This state with the addresses this node's IPAM gave its pods ("ns/pod" -> ips): they are
        known here before the API server's pod status shows them."""
        if not addresses:
            return self
        endpoints = tuple(replace(e, ips=addresses[e.key]) if e.node == node and e.key in addresses else e
                          for e in self.endpoints)
        return replace(self, endpoints=endpoints)


codec.register_module(globals())   # these types may be kept in the desired-state cache
