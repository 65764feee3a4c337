"""Kubernetes Services and their EndpointSlices, as weft's eBPF plane load-balances them.

Only what the data plane needs: a Service's cluster addresses, its ports (a target port is a
number or the name of a container port of the backends), whether it is a NodePort and with which
node ports (and its externalTrafficPolicy), and its session affinity; an EndpointSlice's ready
endpoints (address, the pod it is, if any) and its ports by name. Validated by desired.kinds.services.
"""
from __future__ import annotations

from dataclasses import dataclass

from weft.model import codec

PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class ServicePort:
    name: str                       # "" for a Service's single unnamed port
    protocol: str                   # TCP / UDP / SCTP
    port: int                       # on the cluster address
    target: int | str               # the backends' port: a number, or a container port's name
    node_port: int = 0              # NodePort / LoadBalancer: the port on every node's addresses


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    type: str                       # ClusterIP / NodePort / LoadBalancer (ExternalName is not modelled)
    cluster_ips: tuple[str, ...]    # () for a headless Service (nothing to translate)
    ports: tuple[ServicePort, ...]
    affinity_seconds: int = 0       # sessionAffinity ClientIP: its timeout; 0 without affinity
    external_local: bool = False    # externalTrafficPolicy Local: node ports reach this node's backends only

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    pod: str | None                 # "namespace/name" of the backend pod (targetRef), if a pod


@dataclass(frozen=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str                    # the kubernetes.io/service-name label: the Service in the same namespace
    endpoints: tuple[SliceEndpoint, ...]     # ready endpoints only (conditions.ready not false)
    ports: tuple[SlicePort, ...]

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"


codec.register_module(globals())    # kept in the desired-state cache
