"""The desired-state model: immutable, typed, and shaped after Calico's semantics.

Every source (manifest directory, API server) and every resource kind (Kubernetes
NetworkPolicy now, Calico's own kinds later) is converted into these few types, so the
renderers only ever see one policy language: policies ordered within tiers, rules with
actions, entity matches over labels, nets and ports.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from desired.selectors import Selector


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"
    PASS = "Pass"
    LOG = "Log"


INGRESS = "Ingress"
EGRESS = "Egress"
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
    `namespace` is set, that live in that namespace.
    """
    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    selector: Selector | None = None
    namespace_selector: Selector | None = None
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
    selector: Selector                    # which endpoints it applies to (within `namespace` when set)
    types: frozenset[str]                 # subset of {INGRESS, EGRESS}
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
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)


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

    def local_endpoints(self, node: str) -> tuple[Endpoint, ...]:
        return tuple(sorted((e for e in self.endpoints if e.node == node), key=lambda e: e.iface))
