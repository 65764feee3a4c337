"""Services as eBPF map contents: each service address -> its ready backends (pure).

For every port of every Service with a cluster address, the backends are the ready endpoints of
its EndpointSlices, at the slice port of the same name and protocol (the endpoints controller
has already resolved a named targetPort into each slice's port number); sorted, so the same
backends always get the same indexes and an unchanged service rewrites nothing. A service
address with no ready backend is written with count 0: the programs drop its packets (nothing
to send them to) rather than let them leave the node towards an address no one has.

Ids are stable digests of "namespace/name:port-name/protocol": a backend added or removed
rewrites the service's count and the backends whose index moved, nothing else.

Node ports (Service type NodePort, and LoadBalancer's nodePort) are keys of the same map, with
the node's own IPv4 addresses (its InternalIPs) as the address: the programs on the node's
uplink translate a connection from outside, and a pod's connection to a node address is
translated like one to a cluster address. With externalTrafficPolicy Cluster a node port has the
service's backends (one on another node gets the connection from this node's address: the
uplink's programs translate its source); with Local it has backends of its own (another id):
this node's backends only, none if it has none (its packets are dropped).

Not served (the programs translate IPv4 TCP and UDP): a Service's IPv6 cluster addresses and its
SCTP ports get no keys, nor do node ports on a node without an IPv4 InternalIP; `unserved` names
each such service, for the run to warn about, so that no service silently does nothing.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

from weft.model.bpf import PROTOCOL_NUMBERS, RESERVED_IDS, Backend, BackendKey, ServiceEntry, ServiceKey
from weft.model.cluster import ClusterState, Endpoint


def _id(ident: str) -> int:
    value = int.from_bytes(hashlib.sha256(ident.encode()).digest()[:4], "little")
    return value if value not in RESERVED_IDS else value + 2


def render_services(state: ClusterState, node: str = "", local: Iterable[Endpoint] = ()
                    ) -> tuple[dict[ServiceKey, ServiceEntry], dict[BackendKey, Backend],
                               dict[tuple[str, tuple | str], str]]:
    """(services, backends, what each key means) on `node`, whose pods are `local`
    (cluster addresses are the same on every node; node ports are the node's addresses)."""
    me = state.nodes.get(node)
    node_addresses = sorted(a for a in (me.addresses if me else ()) if ":" not in a)
    local = tuple(local)
    local_pods = {e.key for e in local}
    local_ips = {ip for e in local for ip in e.ips}
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
            if port.protocol not in SERVED_PROTOCOLS:
                continue                        # not translated by the programs: see unserved()
            proto = PROTOCOL_NUMBERS[port.protocol.lower()]
            found = sorted({(address, p.port) for s in slices.get(svc.key, ()) for p in s.ports
                            if p.name == port.name and p.protocol == port.protocol
                            for e in s.endpoints for address in e.addresses})
            here = sorted({(address, p.port) for s in slices.get(svc.key, ()) for p in s.ports
                           if p.name == port.name and p.protocol == port.protocol
                           for e in s.endpoints if e.pod in local_pods or set(e.addresses) & local_ips
                           for address in e.addresses})

            named = f"service {svc.key} port {port.name or port.port}"
            ident = _unused(f"{svc.key}:{port.name}/{port.protocol}", used)
            _add_backends(backends, about, ident, found, named)
            if port.node_port and node_addresses:
                if here == found or not svc.external_local:
                    node_ident, node_found = ident, found
                else:
                    node_ident, node_found = _unused(f"{svc.key}:{port.name}/{port.protocol}@{node}", used), here
                    _add_backends(backends, about, node_ident, here, f"{named} (node port {port.node_port})")
                policy = "Local" if svc.external_local else "Cluster"
                for address in node_addresses:
                    key = ServiceKey(address, port.node_port, proto)
                    services[key] = ServiceEntry(node_ident, len(node_found), svc.affinity_seconds)
                    about[("services", key)] = (f"service {svc.key} node port {address}:{port.node_port}/"
                                                f"{port.protocol} ({policy}): {len(node_found)} backends")
            for cluster_ip in svc.cluster_ips:
                if ":" in cluster_ip:
                    continue
                key = ServiceKey(cluster_ip, port.port, proto)
                services[key] = ServiceEntry(ident, len(found), svc.affinity_seconds)
                about[("services", key)] = (f"service {svc.key} {cluster_ip}:{port.port}/{port.protocol}: "
                                            f"{len(found)} backends" + (f", ClientIP affinity {svc.affinity_seconds} s"
                                                                        if svc.affinity_seconds else ""))
    return services, backends, about


SERVED_PROTOCOLS = ("TCP", "UDP")


def unserved(state: ClusterState, node: str = "") -> list[str]:
    """One line per Service the eBPF plane serves only in part or not at all on `node`, saying
    what it does not serve: IPv6 cluster addresses (the programs translate IPv4), SCTP ports (TCP
    and UDP only; SCTP's checksum covers the ports, and the programs do not recompute it), and
    node ports when the node has no IPv4 InternalIP (node ports are served on those only). A
    headless Service has nothing to serve and is not named."""
    me = state.nodes.get(node)
    node_ipv4 = any(":" not in a for a in (me.addresses if me else ()))
    lines = []
    for svc in sorted(state.services, key=lambda s: s.key):
        if not svc.cluster_ips:
            continue
        ipv6 = [ip for ip in svc.cluster_ips if ":" in ip]
        ipv4 = [ip for ip in svc.cluster_ips if ":" not in ip]
        sctp = [port for port in svc.ports if port.protocol not in SERVED_PROTOCOLS]
        served = [port for port in svc.ports if port.protocol in SERVED_PROTOCOLS]
        missing = []
        if ipv6:
            missing.append(f"its IPv6 cluster address{'es' if len(ipv6) > 1 else ''} {', '.join(ipv6)} "
                           f"(IPv4 only)")
        if sctp:
            named = ", ".join(f"{p.port}" + (f" (node port {p.node_port})" if p.node_port else "") for p in sctp)
            missing.append(f"its SCTP port{'s' if len(sctp) > 1 else ''} {named} (TCP and UDP only)")
        node_ports = [str(p.node_port) for p in served if p.node_port]
        if node_ports and not node_ipv4:
            missing.append(f"its node port{'s' if len(node_ports) > 1 else ''} {', '.join(node_ports)} (node "
                           f"{node or '?'} has no IPv4 InternalIP)")
        if missing:
            what = "not served at all" if not ipv4 or not served else "not served"
            lines.append(f"service {svc.key}: {what} by the eBPF data plane: {'; '.join(missing)}")
    return lines


def _add_backends(backends: dict, about: dict, ident: int, chosen: list, named: str) -> None:
    for index, (address, target) in enumerate(chosen):
        key = BackendKey(ident, index)
        backends[key] = Backend(address, target)
        about[("backends", key)] = f"{named}: backend {address}:{target}"


def _unused(ident: str, used: set[int]) -> int:
    value = _id(ident)
    while value in used:                        # a collision: the next free id (stable in practice)
        value += 1
    used.add(value)
    return value
