"""Converters for Calico's non-policy kinds weft enforces: NetworkSet, GlobalNetworkSet,
HostEndpoint, FelixConfiguration (both apiVersions), and Kubernetes' ServiceAccount (its labels
are its pods' `pcsa.*` labels). Staged policies are accepted and model nothing: Calico does not
enforce them either.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from weft.desired.kinds.calicofields import flag, network_of, port_of, protocol_of, spec_of, supports_ports
from weft.desired.validation import (
    Checker,
    ip_of,
    labels_of,
    name_of,
    namespace_of,
    shown,
    valid_dns_subdomain,
)
from weft.model import labels as calico_labels
from weft.model.cluster import (
    ContainerPort,
    FelixConfiguration,
    HostEndpoint,
    NetworkSet,
    PortRange,
    ProtoPort,
    ServiceAccount,
)

INTERFACE_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")
# Kubernetes' IANA service names: what an endpoint's named port may be called.
IANA_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENDPOINT_TO_HOST_ACTIONS = ("Drop", "Accept", "Return")
FILTER_ALLOW_ACTIONS = ("Accept", "Return")
FILTER_DENY_ACTIONS = ("Drop", "Reject")
FELIX_FIELDS = {"failsafeInboundHostPorts", "failsafeOutboundHostPorts", "bpfEnabled",
                "defaultEndpointToHostAction", "iptablesFilterAllowAction", "iptablesFilterDenyAction",
                "logPrefix", "ipv6Support", "natOutgoingAddress", "natPortRange"}
MAX_LOG_PREFIX = 64


def _labels(check: Checker, raw: dict, *, namespaced_label_ok: bool = True) -> dict[str, str]:
    labels = labels_of(check, raw["metadata"].get("labels"), "metadata.labels")
    if not namespaced_label_ok and calico_labels.NAMESPACE in labels:
        check.fail(f"metadata.labels.{calico_labels.NAMESPACE}",
                   "is Calico's own label (it names a thing's namespace): it cannot be set")
    return labels


# --- network sets ---------------------------------------------------------------------------

def network_set(check: Checker, raw: dict) -> NetworkSet | None:
    return _network_set(check, raw, namespace_of(raw))


def global_network_set(check: Checker, raw: dict) -> NetworkSet | None:
    return _network_set(check, raw, None)


def _network_set(check: Checker, raw: dict, ns: str | None) -> NetworkSet | None:
    before = len(check.errors)
    name = name_of(check, raw)
    labels = _labels(check, raw, namespaced_label_ok=False)
    spec = spec_of(check, raw, required=False)
    if spec is None:
        return None
    check.known_fields(spec, "spec", {"nets"})
    items = check.typed(spec.get("nets"), "spec.nets", list, "a list of CIDRs", [])
    nets = [network_of(check, value, f"spec.nets[{i}]", strict=False) for i, value in enumerate(items)]
    if len(check.errors) != before:
        return None
    return NetworkSet(name, ns, tuple(dict.fromkeys(str(n) for n in nets if n is not None)), labels)


# --- host endpoints -------------------------------------------------------------------------

def host_endpoint(check: Checker, raw: dict) -> HostEndpoint | None:
    before = len(check.errors)
    name = name_of(check, raw)
    labels = _labels(check, raw)
    spec = spec_of(check, raw)
    if spec is None:
        return None
    check.known_fields(spec, "spec", {"node", "interfaceName", "expectedIPs", "profiles", "ports"})
    node = spec.get("node")
    if node is None or node == "":
        check.fail("spec.node", "missing: the node whose interface this is")
    elif not valid_dns_subdomain(node):
        check.fail("spec.node", f"must be a node name (a DNS subdomain), got {shown(node)}")
    interface = spec.get("interfaceName") or None
    if interface is not None and interface != "*" and (not isinstance(interface, str)
                                                       or not INTERFACE_NAME.match(interface)):
        check.fail("spec.interfaceName", f"must be \"*\" or an interface name (1-15 of A-Za-z0-9_.-), "
                                         f"got {shown(interface)}")
    ips = [ip_of(check, value, f"spec.expectedIPs[{i}]") for i, value in
           enumerate(check.typed(spec.get("expectedIPs"), "spec.expectedIPs", list, "a list of IP addresses", []))]
    if interface is None and not [ip for ip in ips if ip]:
        check.fail("spec.interfaceName", "missing: a host endpoint needs an interface name (or \"*\") or expectedIPs")
    profiles = check.typed(spec.get("profiles"), "spec.profiles", list, "a list of profile names", [])
    for i, profile in enumerate(profiles):
        if not valid_dns_subdomain(profile):
            check.fail(f"spec.profiles[{i}]", f"must be a profile name, got {shown(profile)}")
    ports = _endpoint_ports(check, spec.get("ports"), "spec.ports")
    if len(check.errors) != before or not isinstance(node, str):
        return None
    return HostEndpoint(name, node, interface, tuple(dict.fromkeys(ip for ip in ips if ip)), labels,
                        tuple(dict.fromkeys(profiles)), ports)


def _endpoint_ports(check: Checker, raw: Any, path: str) -> tuple[ContainerPort, ...]:
    ports = []
    for i, entry in enumerate(check.typed(raw, path, list, "a list of named ports", [])):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            check.fail(where, f"must be a mapping with name, port and protocol, got {shown(entry)}")
            continue
        check.known_fields(entry, where, {"name", "port", "protocol"}, strict=True)
        name = entry.get("name")
        if not isinstance(name, str) or len(name) > 15 or not IANA_PORT_NAME.match(name):
            check.fail(f"{where}.name", f"must be a port name (at most 15 of a-z, 0-9, '-'), got {shown(name)}")
            continue
        number = port_of(check, entry.get("port"), f"{where}.port")
        protocol = protocol_of(check, entry.get("protocol"), f"{where}.protocol")
        if entry.get("protocol") is None:
            check.fail(f"{where}.protocol", "missing (TCP, UDP or SCTP)")
        elif protocol is not None and not supports_ports(protocol):
            check.fail(f"{where}.protocol",
                       f"must be a protocol with ports (TCP, UDP or SCTP), got {shown(entry.get('protocol'))}")
        elif isinstance(number, PortRange) and number.start == number.end and protocol is not None:
            ports.append(ContainerPort(name, number.start, protocol))
        elif number is not None:
            check.fail(f"{where}.port", f"must be one port number, got {shown(entry.get('port'))}")
    return tuple(sorted(set(ports), key=lambda p: (p.name, p.protocol, p.port)))


# --- Felix configuration ----------------------------------------------------------------------

def felix_configuration(check: Checker, raw: dict) -> FelixConfiguration | None:
    """The fields weft uses; every other field of Calico's (there are a few hundred) is a warning."""
    before = len(check.errors)
    name = name_of(check, raw)
    spec = spec_of(check, raw, required=False)
    if spec is None:
        return None
    check.known_fields(spec, "spec", FELIX_FIELDS)
    inbound = _failsafes(check, spec.get("failsafeInboundHostPorts"), "spec.failsafeInboundHostPorts")
    outbound = _failsafes(check, spec.get("failsafeOutboundHostPorts"), "spec.failsafeOutboundHostPorts")
    to_host = _choice(check, spec.get("defaultEndpointToHostAction"), "spec.defaultEndpointToHostAction",
                      ENDPOINT_TO_HOST_ACTIONS)
    allow = _choice(check, spec.get("iptablesFilterAllowAction"), "spec.iptablesFilterAllowAction",
                    FILTER_ALLOW_ACTIONS)
    deny = _choice(check, spec.get("iptablesFilterDenyAction"), "spec.iptablesFilterDenyAction", FILTER_DENY_ACTIONS)
    log_prefix = spec.get("logPrefix")
    if log_prefix is not None and (not isinstance(log_prefix, str) or len(log_prefix) > MAX_LOG_PREFIX
                                   or not log_prefix.isprintable() or '"' in log_prefix):
        check.fail("spec.logPrefix", f"must be a printable string of at most {MAX_LOG_PREFIX} characters without "
                                     f"'\"', got {shown(log_prefix)}")
    nat_address = spec.get("natOutgoingAddress") or None
    if nat_address is not None:
        nat_address = ip_of(check, nat_address, "spec.natOutgoingAddress")
        if nat_address is not None and ipaddress.ip_address(nat_address).version != 4:
            check.fail("spec.natOutgoingAddress", f"must be an IPv4 address, got {nat_address}")
    nat_ports = None
    if spec.get("natPortRange") is not None:
        nat_ports = port_of(check, spec.get("natPortRange"), "spec.natPortRange")
        if nat_ports is not None and not isinstance(nat_ports, PortRange):
            check.fail("spec.natPortRange",
                       f"must be a port or a range 'first:last', got {shown(spec.get('natPortRange'))}")
    config = FelixConfiguration(
        name=name, failsafe_inbound_host_ports=inbound, failsafe_outbound_host_ports=outbound,
        bpf_enabled=flag(check, spec, "bpfEnabled", "spec.bpfEnabled"),
        default_endpoint_to_host_action=to_host, filter_allow_action=allow, filter_deny_action=deny,
        log_prefix=log_prefix, ipv6_support=flag(check, spec, "ipv6Support", "spec.ipv6Support"),
        nat_outgoing_address=nat_address, nat_port_range=nat_ports if isinstance(nat_ports, PortRange) else None,
    )
    return config if len(check.errors) == before else None


def _choice(check: Checker, value: Any, path: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices`, matched case-insensitively as Felix does; None when absent or empty."""
    if value is None or value == "":
        return None
    folded = {c.lower(): c for c in choices}
    if not isinstance(value, str) or value.lower() not in folded:
        check.fail(path, f"must be one of {', '.join(choices)}, got {shown(value)}")
        return None
    return folded[value.lower()]


def _failsafes(check: Checker, raw: Any, path: str) -> tuple[ProtoPort, ...] | None:
    """A failsafe port list; None when absent (Felix's defaults), () when empty (none at all)."""
    if raw is None:
        return None
    ports = []
    for i, entry in enumerate(check.typed(raw, path, list, "a list of {protocol, port, net}", [])):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            check.fail(where, f"must be a mapping with protocol, port and net, got {shown(entry)}")
            continue
        check.known_fields(entry, where, {"protocol", "port", "net"}, strict=True)
        protocol = entry.get("protocol") or "TCP"
        name = protocol.lower() if isinstance(protocol, str) else None
        if name not in ("tcp", "udp", "sctp"):
            check.fail(f"{where}.protocol", f"must be TCP, UDP or SCTP, got {shown(protocol)}")
            continue
        port = entry.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            check.fail(f"{where}.port", f"must be a port number 1-65535, got {shown(port)}")
            continue
        net = entry.get("net") or None
        if net is not None:
            network = network_of(check, net, f"{where}.net", strict=False)
            if network is None:
                continue
            net = str(network)
        ports.append(ProtoPort(name, port, net))
    return tuple(dict.fromkeys(ports))


# --- Kubernetes ServiceAccount, staged policies -----------------------------------------------

def service_account(check: Checker, raw: dict) -> ServiceAccount:
    name = name_of(check, raw)
    return ServiceAccount(namespace_of(raw), name, labels_of(check, raw["metadata"].get("labels"), "metadata.labels"))


def staged_policy(check: Checker, raw: dict) -> None:
    """A staged policy previews a change and enforces nothing (in Calico too): accepted, unmodelled."""
    name_of(check, raw)

