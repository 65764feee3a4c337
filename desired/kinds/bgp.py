"""Converters for the BGP kinds: BGPConfiguration, BGPPeer (both Calico apiVersions) and the
Secrets that BGP passwords (peers', the mesh's) refer to, plus the parsers they share with the Node converter
(AS numbers, durations, community values).

Fields are Calico's. Fields Calico has and weft does not use (bindMode, ignoredInterfaces,
filters, ...) are accepted and ignored, so Calico's own manifests load; a field Calico does not
have is reported, so a typo never silently changes routing.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any

from weft.desired.validation import Checker, cidr_of, name_of, namespace_of
from weft.model.cluster import BGPConfiguration, BGPPeer, Community, PrefixAdvertisement, Secret, SecretKeyRef
from weft.model.selector import SelectorError, parse_selector

DEFAULT_AS_NUMBER = 64512
MAX_AS_NUMBER = 4294967295
LOG_SEVERITIES = ("Debug", "Info", "Warning", "Error", "Fatal")
NEXT_HOP_MODES = ("Auto", "Self", "Keep")
SOURCE_ADDRESSES = ("UseNodeIP", "None")
# Where a password Secret (a BGPPeer's, or BGPConfiguration nodeMeshPassword) is looked up, in
# order: the namespaces Calico's node agent runs in (operator install, manifest install). Calico
# reads it from its own namespace.
SECRET_NAMESPACES = ("calico-system", "kube-system")

_CONFIG_FIELDS = {
    "asNumber", "nodeToNodeMeshEnabled", "listenPort", "logSeverityScreen", "serviceClusterIPs",
    "serviceExternalIPs", "serviceLoadBalancerIPs", "communities", "prefixAdvertisements",
    "nodeMeshPassword", "nodeMeshMaxRestartTime",
    # Calico fields weft accepts and does not use:
    "bindMode", "ignoredInterfaces", "localWorkloadPeeringIPV4", "localWorkloadPeeringIPV6", "programClusterRoutes",
    "ipv4NormalRoutePriority", "ipv6NormalRoutePriority",
}
_PEER_FIELDS = {
    "peerIP", "asNumber", "node", "nodeSelector", "peerSelector", "password", "keepOriginalNextHop",
    "nextHopMode", "maxRestartTime", "keepaliveTime", "ttlSecurity", "sourceAddress",
    # Calico fields weft accepts and does not use:
    "numAllowedLocalASNumbers", "reachableBy", "filters", "localWorkloadSelector", "reversePeering",
    "localASNumber",
}
# Set only on "default", as Calico requires: both ends of a mesh session must agree on them, so a
# per-node value could only break the sessions of that node.
_DEFAULT_ONLY = ("nodeMeshPassword", "nodeMeshMaxRestartTime")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


# --- shared parsers ------------------------------------------------------------------------

def parse_as_number(value: Any) -> int | None:
    """An AS number as Calico writes it: an integer, its decimal text, or asdot "a.b" (a*65536+b).
    None when it is not one (0 and values above 4294967295 included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isdigit():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+\.\d+", value):
        high, low = (int(part) for part in value.split("."))
        if high > 65535 or low > 65535:
            return None
        number = high * 65536 + low
    else:
        return None
    return number if 1 <= number <= MAX_AS_NUMBER else None


def as_number_of(check: Checker, value: Any, path: str) -> int | None:
    number = parse_as_number(value)
    if number is None:
        check.fail(path, f"must be an AS number 1-{MAX_AS_NUMBER} (or asdot a.b with a, b 0-65535), got {value!r}")
    return number


def duration_seconds(text: str) -> float | None:
    """Seconds of a Go duration ("120s", "1m30s", "1.5h"); None when it is not one."""
    if not isinstance(text, str) or not text:
        return None
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def community_problem(value: Any) -> str | None:
    """Why `value` is not a BGP community ("aa:nn", each 0-65535, or large "aa:nn:mm", each
    0-4294967295); None when it is one."""
    if not isinstance(value, str) or not re.fullmatch(r"\d+(:\d+){1,2}", value):
        return f"must be a community aa:nn or a large community aa:nn:mm, got {value!r}"
    parts = [int(p) for p in value.split(":")]
    limit = 65535 if len(parts) == 2 else MAX_AS_NUMBER
    if any(p > limit for p in parts):
        kind = "standard community parts" if len(parts) == 2 else "large community parts"
        return f"{kind} must be 0-{limit}, got {value!r}"
    return None


def parse_peer_ip(text: Any) -> tuple[str, int | None] | None:
    """Calico's peerIP: "ip", "ip:port" or "[ipv6]:port" -> (canonical ip, port or None)."""
    if not isinstance(text, str) or not text:
        return None
    host, port = text, None
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([0-9.]+):(\d+)", text)
    if match:
        host, port = match.group(1), int(match.group(2))
        if not 1 <= port <= 65535:
            return None
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


def _selector(check: Checker, text: Any, path: str):
    """A Calico selector AST, or None when unset; problems recorded."""
    if text is None or text == "":
        return None
    try:
        return parse_selector(text)
    except SelectorError as exc:
        check.fail(path, f"invalid selector: {exc}")
        return None


def _spec(check: Checker, raw: dict) -> dict | None:
    if raw.get("spec") is None:
        return {}
    return check.typed(raw.get("spec"), "spec", dict, "a mapping", None)


# --- BGPConfiguration ----------------------------------------------------------------------

def bgp_configuration(check: Checker, raw: dict) -> BGPConfiguration | None:
    name = name_of(check, raw)
    if name != "default" and not name.startswith("node."):
        check.fail("metadata.name", f'must be "default" or "node.<node name>", got {name!r}')
    spec = _spec(check, raw)
    if spec is None:
        return None
    check.known_fields(spec, "spec", _CONFIG_FIELDS)
    as_number = as_number_of(check, spec["asNumber"], "spec.asNumber") if spec.get("asNumber") is not None else None
    mesh = check.typed(spec.get("nodeToNodeMeshEnabled"), "spec.nodeToNodeMeshEnabled", bool, "a boolean (true/false)")
    port = check.typed(spec.get("listenPort"), "spec.listenPort", int, "an integer")
    if port is not None and not 1 <= port <= 65535:
        check.fail("spec.listenPort", f"must be 1-65535, got {port}")
    severity = spec.get("logSeverityScreen")
    if severity is not None and severity not in LOG_SEVERITIES:
        check.fail("spec.logSeverityScreen", f"must be one of {', '.join(LOG_SEVERITIES)}, got {severity!r}")
    communities = _communities(check, spec.get("communities"))
    for field in _DEFAULT_ONLY:
        if name != "default" and spec.get(field) is not None:
            check.fail(f"spec.{field}", 'can only be set on the "default" BGPConfiguration '
                                        "(both ends of every mesh session must use the same value)")
    return BGPConfiguration(
        name=name, as_number=as_number, node_to_node_mesh=mesh, listen_port=port, log_severity=severity,
        service_cluster_ips=_service_cidrs(check, spec, "serviceClusterIPs"),
        service_external_ips=_service_cidrs(check, spec, "serviceExternalIPs"),
        service_loadbalancer_ips=_service_cidrs(check, spec, "serviceLoadBalancerIPs"),
        communities=communities,
        prefix_advertisements=_prefix_advertisements(check, spec.get("prefixAdvertisements"), communities),
        node_mesh_password=_password(check, spec.get("nodeMeshPassword"), "spec.nodeMeshPassword"),
        node_mesh_max_restart_time=_duration(check, spec.get("nodeMeshMaxRestartTime"),
                                             "spec.nodeMeshMaxRestartTime", 1, 4095),
    )


def _service_cidrs(check: Checker, spec: dict, key: str) -> tuple[str, ...]:
    cidrs = []
    for i, entry in enumerate(check.typed(spec.get(key), f"spec.{key}", list, "a list of {cidr: ...}", [])):
        if not isinstance(entry, dict) or "cidr" not in entry:
            check.fail(f"spec.{key}[{i}]", "must be a mapping with a cidr")
            continue
        cidr = cidr_of(check, entry["cidr"], f"spec.{key}[{i}].cidr")
        if cidr:
            cidrs.append(cidr)
    return tuple(sorted(set(cidrs)))


def _communities(check: Checker, raw: Any) -> tuple[Community, ...]:
    found: dict[str, Community] = {}
    for i, entry in enumerate(check.typed(raw, "spec.communities", list, "a list", [])):
        path = f"spec.communities[{i}]"
        if not isinstance(entry, dict):
            check.fail(path, "must be a mapping with name and value")
            continue
        name, value = entry.get("name"), entry.get("value")
        if not isinstance(name, str) or not name:
            check.fail(f"{path}.name", f"must be a non-empty string, got {name!r}")
            continue
        problem = community_problem(value)
        if problem:
            check.fail(f"{path}.value", problem)
        elif name in found:
            check.fail(f"{path}.name", f"community {name!r} is defined twice")
        else:
            found[name] = Community(name, str(value))
    return tuple(sorted(found.values(), key=lambda c: c.name))


def _prefix_advertisements(check: Checker, raw: Any, communities: tuple[Community, ...]
                           ) -> tuple[PrefixAdvertisement, ...]:
    """Each advertisement's communities are names from spec.communities or literal values."""
    by_name = {c.name: c.value for c in communities}
    adverts = []
    for i, entry in enumerate(check.typed(raw, "spec.prefixAdvertisements", list, "a list", [])):
        path = f"spec.prefixAdvertisements[{i}]"
        if not isinstance(entry, dict):
            check.fail(path, "must be a mapping with cidr and communities")
            continue
        cidr = cidr_of(check, entry.get("cidr"), f"{path}.cidr")
        values = []
        for j, item in enumerate(check.typed(entry.get("communities"), f"{path}.communities", list, "a list", [])):
            if isinstance(item, str) and item in by_name:
                values.append(by_name[item])
            elif community_problem(item) is None:
                values.append(item)
            else:
                check.fail(f"{path}.communities[{j}]",
                           f"must name one of spec.communities ({', '.join(by_name) or 'none defined'}) "
                           f"or be a community value aa:nn / aa:nn:mm, got {item!r}")
        if cidr:
            adverts.append(PrefixAdvertisement(cidr, tuple(dict.fromkeys(values))))
    return tuple(sorted(adverts, key=lambda a: a.cidr))


# --- BGPPeer -------------------------------------------------------------------------------

def bgp_peer(check: Checker, raw: dict) -> BGPPeer | None:
    name = name_of(check, raw)
    spec = _spec(check, raw)
    if spec is None:
        return None
    check.known_fields(spec, "spec", _PEER_FIELDS)
    peer_ip = port = None
    if spec.get("peerIP") is not None:
        parsed = parse_peer_ip(spec["peerIP"])
        if parsed is None:
            check.fail("spec.peerIP", "must be an IP address, ip:port or [ipv6]:port (port 1-65535), "
                                      f"got {spec['peerIP']!r}")
        else:
            peer_ip, port = parsed
    peer_selector = _selector(check, spec.get("peerSelector"), "spec.peerSelector")
    if spec.get("peerIP") and spec.get("peerSelector"):
        check.fail("spec.peerSelector", "cannot be used with peerIP: set one of them")
    elif not spec.get("peerIP") and not spec.get("peerSelector"):
        check.fail("spec.peerIP", "missing: set peerIP (an external peer) or peerSelector (peer nodes)")
    as_number = as_number_of(check, spec["asNumber"], "spec.asNumber") if spec.get("asNumber") is not None else None
    if spec.get("peerIP") and spec.get("asNumber") is None:
        check.fail("spec.asNumber", "missing: a peer given by peerIP needs its AS number")
    node = check.typed(spec.get("node"), "spec.node", str, "a node name", None) or None
    node_selector = _selector(check, spec.get("nodeSelector"), "spec.nodeSelector")
    if node and spec.get("nodeSelector"):
        check.fail("spec.nodeSelector", "cannot be used with node: set one of them")
    keep = check.typed(spec.get("keepOriginalNextHop"), "spec.keepOriginalNextHop", bool, "a boolean", False)
    mode = spec.get("nextHopMode")
    if mode is not None and mode not in NEXT_HOP_MODES:
        check.fail("spec.nextHopMode", f"must be one of {', '.join(NEXT_HOP_MODES)}, got {mode!r}")
    elif keep and mode == "Self":
        check.fail("spec.nextHopMode", "Self contradicts keepOriginalNextHop: true")
    ttl = check.typed(spec.get("ttlSecurity"), "spec.ttlSecurity", int, "an integer (hops)")
    if ttl is not None and not 0 <= ttl <= 255:
        check.fail("spec.ttlSecurity", f"must be 0-255 hops, got {ttl}")
    source = spec.get("sourceAddress", "UseNodeIP")
    if source not in SOURCE_ADDRESSES:
        check.fail("spec.sourceAddress", f"must be one of {', '.join(SOURCE_ADDRESSES)}, got {source!r}")
    return BGPPeer(
        name=name, peer_ip=peer_ip, peer_port=port, as_number=as_number, node=node,
        node_selector=node_selector, peer_selector=peer_selector,
        password=_password(check, spec.get("password"), "spec.password"),
        keep_original_next_hop=keep, next_hop_mode=mode,
        max_restart_time=_duration(check, spec.get("maxRestartTime"), "spec.maxRestartTime", 1, 4095),
        keepalive_time=_duration(check, spec.get("keepaliveTime"), "spec.keepaliveTime", 1, 65535),
        ttl_security=ttl or None, source_address=source,
    )


def _duration(check: Checker, value: Any, path: str, low: int, high: int) -> str | None:
    """A Go duration BIRD can take: whole seconds once rounded, within [low, high]."""
    if value is None:
        return None
    seconds = duration_seconds(value)
    if seconds is None:
        check.fail(path, f'must be a duration such as "120s" or "2m", got {value!r}')
        return None
    if not low <= round(seconds) <= high:
        check.fail(path, f"must be {low}s-{high}s, got {value!r}")
        return None
    return value


def _password(check: Checker, raw: Any, path: str) -> SecretKeyRef | None:
    if raw is None:
        return None
    ref = raw.get("secretKeyRef") if isinstance(raw, dict) else None
    if not isinstance(ref, dict):
        check.fail(path, "must be {secretKeyRef: {name: ..., key: ...}}")
        return None
    name, key = ref.get("name"), ref.get("key")
    for field, value in (("name", name), ("key", key)):
        if not isinstance(value, str) or not value:
            check.fail(f"{path}.secretKeyRef.{field}", f"must be a non-empty string, got {value!r}")
    if not (isinstance(name, str) and name and isinstance(key, str) and key):
        return None
    return SecretKeyRef(name, key)


# --- Secret --------------------------------------------------------------------------------

def secret(check: Checker, raw: dict) -> Secret | None:
    """A v1 Secret: `data` is base64, `stringData` plain text (and wins, as the API server does)."""
    name = name_of(check, raw)
    data: dict[str, str] = {}
    for key, value in check.typed(raw.get("data"), "data", dict, "a mapping", {}).items():
        try:
            data[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, TypeError, ValueError):
            check.fail(f"data.{key}", "must be base64 of UTF-8 text")
    for key, value in check.typed(raw.get("stringData"), "stringData", dict, "a mapping", {}).items():
        if not isinstance(value, str):
            check.fail(f"stringData.{key}", f"must be a string, got {value!r}")
        else:
            data[key] = value
    return Secret(namespace_of(raw), name, data)


def secret_value(secrets, ref: SecretKeyRef) -> str | None:
    """The referenced value from the first of SECRET_NAMESPACES holding that Secret, else None."""
    by_key = {(s.namespace, s.name): s for s in secrets}
    for ns in SECRET_NAMESPACES:
        found = by_key.get((ns, ref.name))
        if found is not None:
            return found.data.get(ref.key)
    return None


def password_refs(state) -> tuple[SecretKeyRef, ...]:
    """Every Secret reference a BGP password of the cluster state makes: BGPPeers' passwords and
    BGPConfiguration nodeMeshPassword."""
    refs = {p.password for p in state.bgp_peers if p.password is not None}
    refs |= {c.node_mesh_password for c in state.bgp_configurations if c.node_mesh_password is not None}
    return tuple(sorted(refs, key=lambda r: (r.name, r.key)))


def fetch_peer_secrets(api, peers) -> tuple[Secret, ...]:
    """fetch_secrets for the passwords of `peers` (BGPPeers)."""
    return fetch_secrets(api, [p.password for p in peers if p.password is not None])


def fetch_secrets(api, refs) -> tuple[Secret, ...]:
    """From the API server: the Secrets `refs` name, one targeted GET each (weft does not list
    Secrets). A Secret found nowhere is left out; the renderer then names the BGPPeer or
    BGPConfiguration whose password is missing."""
    from weft.desired.api import ApiError
    from weft.model.errors import SourceError
    found = []
    for name in sorted({ref.name for ref in refs}):
        forbidden = []
        for ns in SECRET_NAMESPACES:
            try:
                raw = api.request("GET", f"/api/v1/namespaces/{ns}/secrets/{name}")
            except ApiError as exc:
                if exc.status == 403:
                    forbidden.append(ns)           # it may be in the next namespace
                if exc.status in (403, 404):
                    if ns == SECRET_NAMESPACES[-1] and forbidden:
                        raise SourceError(
                            f"reading Secret {name} from {api.host}: forbidden in namespace "
                            f"{', '.join(forbidden)} (HTTP 403): the user needs `get` on secrets there "
                            "(playbooks/kubernetes/rbac.yaml)") from None
                    continue
                raise
            errors: list = []
            raw = {"apiVersion": "v1", "kind": "Secret", **raw}
            value = secret(Checker("api", raw, errors, namespaced=True), raw)
            if value is not None and not errors:
                found.append(value)
                break
    return tuple(found)
