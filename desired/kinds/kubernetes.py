"""Converters for Kubernetes' own kinds: one object (a plain dict, from YAML or the API
server) -> its model value, recording every problem with its field path (see desired.loader).

NetworkPolicy is converted the way Calico does it: tier "default", order 1000, Allow rules,
named "knp.default.<name>", selecting pods of its own namespace.
"""
from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any

from weft.desired.kinds.bgp import as_number_of
from weft.desired.validation import (
    Checker,
    child,
    ip_of,
    labels_of,
    name_of,
    namespace_of,
    shown,
    valid_dns_subdomain,
    valid_label_key,
    valid_label_value,
)
from weft.model import labels as calico_labels
from weft.model.cluster import (
    EGRESS,
    INGRESS,
    Action,
    ContainerPort,
    Direction,
    Endpoint,
    EntityMatch,
    NamedPort,
    Namespace,
    Node,
    NodeBGP,
    Policy,
    Port,
    PortRange,
    Rule,
)
from weft.model.names import host_iface_name
from weft.model.selector import All, And, Eq, Expr, Has, In, Not, NotIn

# Namespaces every API server has; a manifest directory need not declare them.
BUILTIN_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_K8S_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_POLICY_SPEC_FIELDS = {"podSelector", "policyTypes", "ingress", "egress"}
_INGRESS_FIELDS = {"from", "ports"}
_EGRESS_FIELDS = {"to", "ports"}
_PEER_FIELDS = {"podSelector", "namespaceSelector", "ipBlock"}
_PORT_FIELDS = {"protocol", "port", "endPort"}
# A Kubernetes label selector's matchExpressions operators, as Calico selector atoms.
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def namespace(check: Checker, raw: dict) -> Namespace:
    name = name_of(check, raw, dns_label=True)     # it is part of pods' names: "a.b"/"c" is not "a"/"b.c"
    labels = labels_of(check, raw["metadata"].get("labels"), "metadata.labels")
    return Namespace(name, {**labels, NAMESPACE_NAME_LABEL: name})   # the API server always sets it


# Calico's Kubernetes-datastore annotations on a Node that carry its BGP identity.
_BGP_ANNOTATIONS = {
    "ipv4": "projectcalico.org/IPv4Address",
    "ipv6": "projectcalico.org/IPv6Address",
    "as": "projectcalico.org/ASNumber",
    "rr": "projectcalico.org/RouteReflectorClusterID",
}


def node(check: Checker, raw: dict) -> Node:
    """A Node: labels, its InternalIP addresses, and its BGP identity from Calico's annotations."""
    name = name_of(check, raw)
    labels = labels_of(check, raw["metadata"].get("labels"), "metadata.labels")
    annotations = check.typed(raw["metadata"].get("annotations"), "metadata.annotations", dict, "a mapping", {})
    status = check.typed(raw.get("status"), "status", dict, "a mapping", {})
    addresses = []
    for i, entry in enumerate(check.typed(status.get("addresses"), "status.addresses", list, "a list", [])):
        if isinstance(entry, dict) and entry.get("type") == "InternalIP":
            ip = ip_of(check, entry.get("address"), f"status.addresses[{i}].address")
            if ip:
                addresses.append(ip)
    return Node(name, labels, _node_bgp(check, annotations), tuple(dict.fromkeys(addresses)))


def _node_bgp(check: Checker, annotations: dict) -> NodeBGP | None:
    """None when the node has none of Calico's BGP annotations (BGP is off for it)."""
    values = {k: annotations.get(key) for k, key in _BGP_ANNOTATIONS.items()}
    if all(v is None for v in values.values()):
        return None
    path = "metadata.annotations." + "{}"
    ipv4 = _interface(check, values["ipv4"], 4, path.format(_BGP_ANNOTATIONS["ipv4"]))
    ipv6 = _interface(check, values["ipv6"], 6, path.format(_BGP_ANNOTATIONS["ipv6"]))
    as_number = None
    if values["as"] is not None:
        as_number = as_number_of(check, values["as"], path.format(_BGP_ANNOTATIONS["as"]))
    cluster_id = values["rr"] or None
    if cluster_id is not None:
        try:
            cluster_id = str(ipaddress.IPv4Address(cluster_id))
        except ValueError:
            check.fail(path.format(_BGP_ANNOTATIONS["rr"]),
                       f"must be a route reflector cluster ID in IPv4 form (e.g. 244.0.0.1), got {shown(cluster_id)}")
            cluster_id = None
    return NodeBGP(ipv4, ipv6, as_number, cluster_id)


def _interface(check: Checker, value: Any, version: int, path: str) -> str | None:
    """"198.18.0.1/24": the node's address and its subnet (a bare address means a /32 or /128)."""
    if value is None or value == "":
        return None
    try:
        iface = ipaddress.ip_interface(value)
    except (ValueError, TypeError):
        iface = None
    if iface is None or iface.version != version:
        check.fail(path, f"must be an IPv{version} address with its prefix length (e.g. "
                         f"{'198.18.0.1/24' if version == 4 else '2001:db8::1/64'}), got {shown(value)}")
        return None
    return str(iface)


def endpoint(check: Checker, raw: dict) -> Endpoint | None:
    """A Pod: a workload endpoint when it is scheduled, has an address and is not host-networked."""
    name = name_of(check, raw)
    ns = namespace_of(raw)
    labels = labels_of(check, raw["metadata"].get("labels"), "metadata.labels")
    spec = check.typed(raw.get("spec"), "spec", dict, "a mapping", {})
    status = check.typed(raw.get("status"), "status", dict, "a mapping", {})
    ports = _container_ports(check, spec)
    ips = []
    pod_ips = status.get("podIPs")
    if pod_ips:
        for i, entry in enumerate(check.typed(pod_ips, "status.podIPs", list, "a list", [])):
            value = entry.get("ip") if isinstance(entry, dict) else None
            ip = ip_of(check, value, f"status.podIPs[{i}].ip")
            if ip:
                ips.append(ip)
    elif status.get("podIP"):
        ip = ip_of(check, status.get("podIP"), "status.podIP")
        if ip:
            ips.append(ip)
    node = spec.get("nodeName")
    if node is not None and node != "" and not valid_dns_subdomain(node):
        check.fail("spec.nodeName", f"must be a node name (a DNS subdomain), got {shown(node)}")
        return None
    # Calico's rules: host-networked pods are not workload endpoints, finished pods no longer are.
    # A scheduled pod without an address yet is kept: its node programs its policy before the
    # CNI plugin wires it (the interface name is known in advance), and takes its address from
    # the node's own IPAM allocations.
    if not node or spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    return Endpoint(
        namespace=ns, pod=name, node=node, iface=host_iface_name(ns, name), ips=tuple(dict.fromkeys(ips)),
        labels=labels, ports=ports, service_account=_service_account(check, spec),
    )


def _service_account(check: Checker, spec: dict) -> str:
    """The pod's service account (Calico's projectcalico.org/serviceaccount label, and its
    profile): "default" when a manifest does not say, as the API server sets it."""
    for key in ("serviceAccountName", "serviceAccount"):           # the second: deprecated spelling
        value = spec.get(key)
        if value is None or value == "":
            continue
        if not valid_dns_subdomain(value):
            check.fail(f"spec.{key}", f"must be a service account name (a DNS subdomain), got {shown(value)}")
            return "default"
        return value
    return "default"


def _container_ports(check: Checker, spec: dict) -> tuple[ContainerPort, ...]:
    """Named container ports of a pod (the only ones policy can refer to by name)."""
    containers = check.typed(spec.get("containers"), "spec.containers", list, "a list", [])
    entries = []
    for ci, container in enumerate(containers):
        if not isinstance(container, dict):
            check.fail(f"spec.containers[{ci}]", "must be a mapping")
            continue
        ports = container.get("ports") or []
        if not isinstance(ports, list):
            check.fail(f"spec.containers[{ci}].ports", "must be a list")
            continue
        for pi, port in enumerate(ports):
            if not isinstance(port, dict):
                check.fail(f"spec.containers[{ci}].ports[{pi}]", "must be a mapping")
                continue
            entries.append((ci, pi, port.get("name"), port.get("containerPort"), port.get("protocol")))
    key = tuple(entries)
    try:
        result, problems = _check_ports(key)
    except TypeError:                       # unhashable field values: check without the cache
        result, problems = _check_ports.__wrapped__(key)
    for path, message in problems:
        check.fail(path, message)
    return result


@lru_cache(maxsize=4096)
def _check_ports(entries: tuple) -> tuple[tuple[ContainerPort, ...], tuple[tuple[str, str], ...]]:
    """Pods of one workload share their port list: validate each distinct list once."""
    ports, problems = set(), []
    for ci, pi, name, number, protocol in entries:
        path = f"spec.containers[{ci}].ports[{pi}]"
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            problems.append((f"{path}.containerPort", f"must be 1-65535, got {shown(number)}"))
            continue
        proto = "tcp" if protocol is None else _K8S_PROTOCOLS.get(protocol) if isinstance(protocol, str) else None
        if proto is None:
            problems.append((f"{path}.protocol", f"must be one of TCP, UDP, SCTP, got {shown(protocol)}"))
            continue
        if name is not None and (not isinstance(name, str) or len(name) > 15 or not _PORT_NAME.match(name)):
            problems.append((f"{path}.name",
                             f"must be an IANA service name (<= 15 of a-z, 0-9, '-'), got {shown(name)}"))
            continue
        if name:
            ports.add(ContainerPort(name, number, proto))
    return tuple(sorted(ports, key=lambda p: (p.name, p.protocol, p.port))), tuple(problems)


def _protocol(check: Checker, value: Any, path: str) -> str | None:
    if value is None:
        return "tcp"
    proto = _K8S_PROTOCOLS.get(value) if isinstance(value, str) else None
    if proto is None:
        check.fail(path, f"must be one of TCP, UDP, SCTP, got {shown(value)}")
    return proto


def _selector(check: Checker, raw: Any, path: str) -> Expr | None:
    """A Kubernetes LabelSelector as the Calico selector it means (the conjunction of its
    requirements, in normal form); None (with a recorded error) if invalid. Keys and values are
    checked as the API server checks them (label keys, label values)."""
    raw = check.typed(raw, path, dict, "a label selector mapping", None)
    if raw is None:
        return None
    before = len(check.errors)
    check.known_fields(raw, path, {"matchLabels", "matchExpressions"})
    atoms: list[Expr] = []
    for key, value in check.typed(raw.get("matchLabels"), f"{path}.matchLabels", dict, "a mapping", {}).items():
        if not valid_label_key(key):
            check.fail(child(f"{path}.matchLabels", key), "invalid label key")
        elif not valid_label_value(value):
            check.fail(child(f"{path}.matchLabels", key), f"invalid label value {shown(value)}")
        else:
            atoms.append(In(key, (value,)))
    exprs = check.typed(raw.get("matchExpressions"), f"{path}.matchExpressions", list, "a list", [])
    for i, expr in enumerate(exprs):
        epath = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            check.fail(epath, "must be a mapping")
            continue
        check.known_fields(expr, epath, {"key", "operator", "values"})
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not valid_label_key(key):
            check.fail(f"{epath}.key", f"invalid label key {shown(key)}")
        if not isinstance(op, str) or op not in SELECTOR_OPERATORS:
            check.fail(f"{epath}.operator", f"must be one of {', '.join(SELECTOR_OPERATORS)}, got {shown(op)}")
            continue
        if not isinstance(values, list):
            check.fail(f"{epath}.values", f"must be a list of label values, got {shown(values)}")
            continue
        bad = [j for j, v in enumerate(values) if not valid_label_value(v)]
        for j in bad:
            check.fail(f"{epath}.values[{j}]", f"invalid label value {shown(values[j])}")
        if bad:
            continue
        if op in ("In", "NotIn") and not values:
            check.fail(f"{epath}.values", f"must be non-empty for operator {op}")
        elif op in ("Exists", "DoesNotExist") and values:
            check.fail(f"{epath}.values", f"must be empty for operator {op}")
        elif isinstance(key, str) and valid_label_key(key):
            atoms.append({"In": In, "NotIn": NotIn}[op](key, tuple(values)) if op in ("In", "NotIn")
                         else Has(key) if op == "Exists" else Not(Has(key)))
    if len(check.errors) != before:
        return None
    return And(tuple(atoms)).normalize()


def network_policy(check: Checker, raw: dict) -> Policy | None:
    name = name_of(check, raw)
    ns = namespace_of(raw)
    spec = check.typed(raw.get("spec"), "spec", dict, "a mapping", None)
    if spec is None:
        check.fail("spec", "missing")
        return None
    before = len(check.errors)
    check.known_fields(spec, "spec", _POLICY_SPEC_FIELDS)
    if "podSelector" not in spec:
        check.fail("spec.podSelector", "missing (use {} to select every pod of the namespace)")
    pod_selector = _selector(check, spec.get("podSelector") or {}, "spec.podSelector")
    ingress_raw = check.typed(spec.get("ingress"), "spec.ingress", list, "a list", [])
    egress_raw = check.typed(spec.get("egress"), "spec.egress", list, "a list", [])
    types_raw = spec.get("policyTypes")
    types: set[Direction] = set()
    if not types_raw:
        # The API server's default for a missing or empty list: Ingress always, Egress when
        # there are egress rules.
        types = {INGRESS} | ({EGRESS} if egress_raw else set())
    else:
        for i, t in enumerate(check.typed(types_raw, "spec.policyTypes", list, "a list", [])):
            if isinstance(t, str) and t in (INGRESS, EGRESS):
                types.add(Direction(t))
            else:
                check.fail(f"spec.policyTypes[{i}]", f"must be Ingress or Egress, got {shown(t)}")
    ingress = [r for i, rule in enumerate(ingress_raw)
               for r in _k8s_rule(check, rule, f"spec.ingress[{i}]", ns, INGRESS)]
    egress = [r for i, rule in enumerate(egress_raw)
              for r in _k8s_rule(check, rule, f"spec.egress[{i}]", ns, EGRESS)]
    if len(check.errors) != before or pod_selector is None:
        return None
    return Policy(
        name=f"knp.default.{name}", namespace=ns, selector=pod_selector, types=frozenset(types),
        ingress=tuple(ingress) if INGRESS in types else (), egress=tuple(egress) if EGRESS in types else (),
        origin=f"NetworkPolicy {ns}/{name}",
    )


def _k8s_rule(check: Checker, raw: Any, path: str, ns: str | None, direction: Direction) -> list[Rule]:
    """One Kubernetes rule -> Calico rules: one per (peer, protocol) pair, all Allow; each
    names the rule it came from (its origin)."""
    if not isinstance(raw, dict):
        check.fail(path, "must be a mapping")
        return []
    peer_key = "from" if direction == INGRESS else "to"
    check.known_fields(raw, path, _INGRESS_FIELDS if direction == INGRESS else _EGRESS_FIELDS)
    peers_raw = check.typed(raw.get(peer_key), f"{path}.{peer_key}", list, "a list", [])
    ports_raw = check.typed(raw.get("ports"), f"{path}.ports", list, "a list", [])
    peers = [_peer(check, p, f"{path}.{peer_key}[{i}]", ns) for i, p in enumerate(peers_raw)] or [EntityMatch()]
    port_groups = _port_groups(check, ports_raw, f"{path}.ports") if ports_raw else {None: ()}
    rules = []
    for peer in peers:
        if peer is None:
            continue
        for proto, ports in sorted(port_groups.items(), key=lambda kv: kv[0] or ""):
            if direction == INGRESS:
                rules.append(Rule(Action.ALLOW, proto, source=peer, destination=EntityMatch(ports=ports),
                                  origin=path))
            else:
                dest = EntityMatch(peer.nets, peer.not_nets, peer.selector, peer.namespace_selector,
                                   peer.namespace, ports)
                rules.append(Rule(Action.ALLOW, proto, destination=dest, origin=path))
    return rules


def _peer(check: Checker, raw: Any, path: str, ns: str | None) -> EntityMatch | None:
    if not isinstance(raw, dict):
        check.fail(path, "must be a mapping")
        return None
    check.known_fields(raw, path, _PEER_FIELDS)
    present = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if raw.get(k) is not None]
    if not present:
        check.fail(path, "must have podSelector, namespaceSelector or ipBlock")
        return None
    if "ipBlock" in present:
        if len(present) > 1:
            check.fail(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
            return None
        return _ip_block(check, raw["ipBlock"], f"{path}.ipBlock")
    pod_sel = _selector(check, raw.get("podSelector"), f"{path}.podSelector") if "podSelector" in present else None
    ns_sel = _selector(check, raw.get("namespaceSelector"), f"{path}.namespaceSelector") \
        if "namespaceSelector" in present else None
    # A Kubernetes peer is pods: Calico adds `projectcalico.org/orchestrator == 'k8s'`, so that
    # neither network sets nor host endpoints match it.
    pods = And((pod_sel or All(), Eq(calico_labels.ORCHESTRATOR, calico_labels.KUBERNETES))).normalize()
    if "namespaceSelector" in present:
        return EntityMatch(selector=pods, namespace_selector=ns_sel)
    return EntityMatch(selector=pods, namespace=ns)


def _ip_block(check: Checker, raw: Any, path: str) -> EntityMatch | None:
    if not isinstance(raw, dict):
        check.fail(path, "must be a mapping")
        return None
    check.known_fields(raw, path, {"cidr", "except"})
    try:
        cidr = _network(raw.get("cidr"))
    except (ValueError, TypeError):
        check.fail(f"{path}.cidr", f"invalid CIDR {shown(raw.get('cidr'))}")
        return None
    excepts = []
    for i, value in enumerate(check.typed(raw.get("except"), f"{path}.except", list, "a list", [])):
        try:
            net = _network(value)
        except (ValueError, TypeError):
            check.fail(f"{path}.except[{i}]", f"invalid CIDR {shown(value)}")
            continue
        if net.version != cidr.version or not net.subnet_of(cidr) or net.prefixlen <= cidr.prefixlen:  # type: ignore[arg-type]
            check.fail(f"{path}.except[{i}]", f"{value} must be strictly within cidr {cidr}")
            continue
        excepts.append(str(net))
    return EntityMatch(nets=(str(cidr),), not_nets=tuple(sorted(set(excepts))))


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR text (host bits allowed, as Kubernetes allows them); not an integer, which
    `ipaddress` would take as an address."""
    if not isinstance(value, str):
        raise TypeError(value)
    return ipaddress.ip_network(value, strict=False)


def _port_groups(check: Checker, ports_raw: list, path: str) -> dict[str | None, tuple[Port, ...]]:
    """Ports of one rule grouped by protocol; an entry with no port opens the whole protocol."""
    groups: dict[str | None, set[Port] | None] = {}
    for i, entry in enumerate(ports_raw):
        ppath = f"{path}[{i}]"
        if not isinstance(entry, dict):
            check.fail(ppath, "must be a mapping")
            continue
        check.known_fields(entry, ppath, _PORT_FIELDS)
        proto = _protocol(check, entry.get("protocol"), f"{ppath}.protocol")
        port, end = entry.get("port"), entry.get("endPort")
        if proto is None:
            continue
        if port is None:
            if end is not None:
                check.fail(f"{ppath}.endPort", "requires port")
            groups[proto] = None      # every port of this protocol
            continue
        spec = _port(check, port, end, ppath)
        ports = groups.setdefault(proto, set())
        if spec is not None and ports is not None:      # None: the protocol's every port already
            ports.add(spec)
    return {proto: tuple(sorted(ports, key=_port_order)) if ports else () for proto, ports in groups.items()}


def _port_order(p: Port) -> tuple:
    return (0, p.start, p.end, "") if isinstance(p, PortRange) else (1, 0, 0, p.name)


def _port(check: Checker, port: Any, end: Any, path: str) -> Port | None:
    if isinstance(port, str):
        if end is not None:
            check.fail(f"{path}.endPort", "cannot be used with a named port")
            return None
        if len(port) > 15 or not _PORT_NAME.match(port):
            check.fail(f"{path}.port", f"must be 1-65535 or an IANA service name, got {shown(port)}")
            return None
        return NamedPort(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        check.fail(f"{path}.port", f"must be 1-65535 or a port name, got {shown(port)}")
        return None
    if end is None:
        return PortRange(port, port)
    if not isinstance(end, int) or isinstance(end, bool) or not port <= end <= 65535:
        check.fail(f"{path}.endPort", f"must be an integer from port ({port}) to 65535, got {shown(end)}")
        return None
    return PortRange(port, end)
