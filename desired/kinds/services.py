"""Service and EndpointSlice (discovery.k8s.io/v1) -> weft.model.services, field by field.

Only what weft's eBPF plane load-balances is kept, every field it keeps is checked the way the
API server checks it (ports 1-65535, protocols, a target port's name a valid port name), and
nothing else of the objects is looked at. An ExternalName Service translates nothing and models
nothing; endpoints whose `conditions.ready` is false are left out (Kubernetes sends no new
connections to them).
"""
from __future__ import annotations

import re
from typing import Any

from weft.desired.validation import Checker, ip_of, labels_of, name_of, namespace_of, shown, valid_dns_subdomain
from weft.model.services import PROTOCOLS, EndpointSlice, Service, ServicePort, SliceEndpoint, SlicePort

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_PORT_NAME = re.compile(r"^(?=.{1,15}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?$")      # IANA_SVC_NAME
_DIGITS = re.compile(r"^[0-9]{1,5}$")
MAX_PORTS = 256
MAX_ENDPOINTS = 1000                        # the API server's limit per slice
MAX_AFFINITY = 86400


def _port(check: Checker, value: Any, path: str, zero: bool = False) -> int:
    if type(value) is not int or not (0 if zero else 1) <= value <= 65535:
        check.fail(path, f"must be a port number 1-65535, got {shown(value)}")
        return 0
    return value


def _protocol(check: Checker, value: Any, path: str) -> str:
    value = "TCP" if value is None else value
    if value not in PROTOCOLS:
        check.fail(path, f"must be one of {', '.join(PROTOCOLS)}, got {shown(value)}")
        return "TCP"
    return value


def _name(check: Checker, value: Any, path: str, required: bool) -> str:
    if value is None or value == "":
        if required:
            check.fail(path, "missing (a Service with several ports names each)")
        return ""
    if not isinstance(value, str) or not _PORT_NAME.match(value):
        check.fail(path, f"must be a port name (lower case letters, digits, '-'; at most 15), got {shown(value)}")
        return ""
    return value


def service(check: Checker, raw: dict) -> Service | None:
    name = name_of(check, raw, dns_label=True)
    ns = namespace_of(raw)
    spec = check.typed(raw.get("spec"), "spec", dict, "a mapping", {})
    kind = spec.get("type") or "ClusterIP"
    if kind == "ExternalName":
        return None
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer"):
        check.fail("spec.type", f"must be ClusterIP, NodePort, LoadBalancer or ExternalName, got {shown(kind)}")
        return None
    ips_raw = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    ips = []
    for i, value in enumerate(check.typed(ips_raw, "spec.clusterIPs", list, "a list", [])):
        if value == "None":                 # headless
            continue
        ip = ip_of(check, value, f"spec.clusterIPs[{i}]")
        if ip:
            ips.append(ip)
    ports_raw = check.typed(spec.get("ports"), "spec.ports", list, "a list", [])
    if len(ports_raw) > MAX_PORTS:
        check.fail("spec.ports", f"at most {MAX_PORTS} ports")
        return None
    ports = []
    for i, p in enumerate(ports_raw):
        path = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            check.fail(path, f"must be a mapping, got {shown(p)}")
            continue
        port = _port(check, p.get("port"), f"{path}.port")
        target_raw = p.get("targetPort", port)
        if isinstance(target_raw, str) and _DIGITS.match(target_raw):
            target_raw = int(target_raw)
        if isinstance(target_raw, str):
            target: int | str = _name(check, target_raw, f"{path}.targetPort", True)
        else:
            target = _port(check, target_raw, f"{path}.targetPort")
        node_port = _port(check, p.get("nodePort", 0), f"{path}.nodePort", zero=True) if kind != "ClusterIP" else 0
        ports.append(ServicePort(_name(check, p.get("name"), f"{path}.name", len(ports_raw) > 1),
                                 _protocol(check, p.get("protocol"), f"{path}.protocol"), port, target, node_port))
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        config = check.typed(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig", dict, "a mapping", {})
        client = check.typed(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP", dict, "a mapping", {})
        affinity = client.get("timeoutSeconds", 10800)
        if type(affinity) is not int or not 1 <= affinity <= MAX_AFFINITY:
            check.fail("spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"must be 1-{MAX_AFFINITY}, "
                                                                             f"got {shown(affinity)}")
            affinity = 0
    elif spec.get("sessionAffinity") not in (None, "None"):
        check.fail("spec.sessionAffinity", f"must be None or ClientIP, got {shown(spec.get('sessionAffinity'))}")
    external = spec.get("externalTrafficPolicy") or "Cluster"
    if external not in ("Cluster", "Local"):
        check.fail("spec.externalTrafficPolicy", f"must be Cluster or Local, got {shown(external)}")
    return Service(ns, name, kind, tuple(ips), tuple(ports), affinity, external == "Local" and kind != "ClusterIP")


def endpoint_slice(check: Checker, raw: dict) -> EndpointSlice | None:
    name = name_of(check, raw)
    ns = namespace_of(raw)
    labels = labels_of(check, raw["metadata"].get("labels"), "metadata.labels")
    owner = labels.get(SERVICE_NAME_LABEL)
    if raw.get("addressType", "IPv4") != "IPv4" or not owner:
        return None                         # IPv6 and FQDN slices, and slices of no Service: nothing to balance
    if not valid_dns_subdomain(owner):
        check.fail(f"metadata.labels.{SERVICE_NAME_LABEL}", f"must be a Service's name, got {shown(owner)}")
        return None
    endpoints_raw = check.typed(raw.get("endpoints"), "endpoints", list, "a list", []) or []
    if len(endpoints_raw) > MAX_ENDPOINTS:
        check.fail("endpoints", f"at most {MAX_ENDPOINTS} endpoints in a slice")
        return None
    endpoints = []
    for i, e in enumerate(endpoints_raw):
        path = f"endpoints[{i}]"
        if not isinstance(e, dict):
            check.fail(path, f"must be a mapping, got {shown(e)}")
            continue
        conditions = check.typed(e.get("conditions"), f"{path}.conditions", dict, "a mapping", {})
        addresses = [ip_of(check, a, f"{path}.addresses[{j}]")
                     for j, a in enumerate(check.typed(e.get("addresses"), f"{path}.addresses", list, "a list", []))]
        ref = check.typed(e.get("targetRef"), f"{path}.targetRef", dict, "a mapping", {})
        pod = None
        if ref.get("kind") == "Pod" and isinstance(ref.get("name"), str):
            pod = f"{ref.get('namespace') or ns}/{ref['name']}"
        if conditions.get("ready") is False:
            continue
        endpoints.append(SliceEndpoint(tuple(a for a in addresses if a and ":" not in a), pod))
    ports = []
    for i, p in enumerate(check.typed(raw.get("ports"), "ports", list, "a list", []) or []):
        path = f"ports[{i}]"
        if not isinstance(p, dict):
            check.fail(path, f"must be a mapping, got {shown(p)}")
            continue
        ports.append(SlicePort(_name(check, p.get("name"), f"{path}.name", False),
                               _protocol(check, p.get("protocol"), f"{path}.protocol"),
                               _port(check, p.get("port"), f"{path}.port")))
    return EndpointSlice(ns, name, owner, tuple(endpoints), tuple(ports))
