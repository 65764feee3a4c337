"""Services as eBPF map contents: each service address -> its ready backends (pure).

For every port of every Service with a cluster address, the backends are the ready endpoints of
its EndpointSlices, at the slice port of the same name and protocol (the endpoints controller
has already resolved a named targetPort into each slice's port number); sorted, so the same
backends always get the same indexes and an unchanged service rewrites nothing. A service
address with no ready backend is written with count 0: the programs drop its packets (nothing
to send them to) rather than let them leave the node towards an address no one has.

Ids are stable digests of "namespace/name:port-name/protocol": a backend added or removed
rewrites the service's count and the backends whose index moved, nothing else.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

from weft.model.bpf import PROTOCOL_NUMBERS, RESERVED_IDS, Backend, BackendKey, ServiceEntry, ServiceKey
from weft.model.cluster import ClusterState


def _id(ident: str) -> int:
    value = int.from_bytes(hashlib.sha256(ident.encode()).digest()[:4], "little")
    return value if value not in RESERVED_IDS else value + 2


def render_services(state: ClusterState) -> tuple[dict[ServiceKey, ServiceEntry], dict[BackendKey, Backend],
                                                   dict[tuple[str, tuple | str], str]]:
    """(services, backends, what each key means) for every node (a service is the same everywhere)."""
    slices = defaultdict(list)
    for s in state.endpoint_slices:
        slices[s.service_key].append(s)
    services: dict[ServiceKey, ServiceEntry] = {}
    backends: dict[BackendKey, Backend] = {}
    about: dict[tuple[str, tuple | str], str] = {}
    used: set[int] = set()
    for svc in sorted(state.services, key=lambda s: s.key):
        if not svc.cluster_ips:
            continue
        for port in svc.ports:
            proto = PROTOCOL_NUMBERS[port.protocol.lower()]
            found = sorted({(address, p.port) for s in slices.get(svc.key, ()) for p in s.ports
                            if p.name == port.name and p.protocol == port.protocol
                            for e in s.endpoints for address in e.addresses})
            ident = _id(f"{svc.key}:{port.name}/{port.protocol}")
            while ident in used:                # a collision: the next free id (stable in practice)
                ident += 1
            used.add(ident)
            for index, (address, target) in enumerate(found):
                backend_key = BackendKey(ident, index)
                backends[backend_key] = Backend(address, target)
                about[("backends", backend_key)] = f"service {svc.key} port {port.name or port.port}: " \
                                           f"backend {address}:{target}"
            for cluster_ip in svc.cluster_ips:
                if ":" in cluster_ip:
                    continue
                key = ServiceKey(cluster_ip, port.port, proto)
                services[key] = ServiceEntry(ident, len(found), svc.affinity_seconds)
                about[("services", key)] = (f"service {svc.key} {cluster_ip}:{port.port}/{port.protocol}: "
                                            f"{len(found)} backends" + (f", ClientIP affinity {svc.affinity_seconds} s"
                                                                        if svc.affinity_seconds else ""))
    return services, backends, about
