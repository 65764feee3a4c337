"""Converters for Calico's policy kinds: GlobalNetworkPolicy, NetworkPolicy and Tier (both
apiVersions), checked as Calico's API server checks them (libcalico-go's validator and the
CRDs' rules), with field-level errors.

What weft refuses that Calico accepts, because it cannot enforce it: `http` matches (weft has no
L7 proxy), `services` matches (weft does not read Kubernetes Services), and `notICMP` without
protocol ICMP/ICMPv6 (the kernel's icmp match needs the protocol, Felix could not program it
either). Unknown fields inside a rule are refused too: ignoring a match criterion would widen
what the rule matches. Unknown fields elsewhere are warnings (see desired.validation.Checker).

Policy names are Calico's v3 names: a policy in a tier other than "default" is named
"<tier>.<name>" (Calico's rule up to 3.31; its CRD storage keeps that form too), one in the
default tier "<name>" (the stored form "default.<name>" means the same policy).
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from weft.desired.kinds.calicofields import (
    flag,
    network_of,
    order_of,
    ports_of,
    protocol_of,
    selector_of,
    spec_of,
    supports_ports,
)
from weft.desired.validation import Checker, name_of, namespace_of, shown, valid_dns_subdomain
from weft.model import labels as calico_labels
from weft.model.cluster import (
    DEFAULT_TIER,
    EGRESS,
    INGRESS,
    Action,
    Direction,
    EntityMatch,
    IcmpMatch,
    Policy,
    Rule,
    Tier,
)
from weft.model.selector import All, Expr, SelectorError

DEFAULT_TIER_NAME = DEFAULT_TIER.name
_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
GLOBAL_POLICY_NAME = re.compile(rf"^({_LABEL}\.)?{_LABEL}$")
POLICY_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})?$")
TIER_NAME = re.compile(rf"^{_LABEL}$")
# Calico's API server lists Kubernetes (Cluster)NetworkPolicies among its own, converted and named
# with these prefixes: views of objects weft reads (or not) from Kubernetes' own API.
CONVERTED_PREFIXES = ("knp.", "kcnp.")
PERFORMANCE_HINTS = ("AssumeNeededOnEveryNode",)

_COMMON_SPEC = {"tier", "order", "selector", "types", "ingress", "egress", "serviceAccountSelector"}
GLOBAL_SPEC_FIELDS = _COMMON_SPEC | {"namespaceSelector", "doNotTrack", "preDNAT", "applyOnForward"}
NAMESPACED_SPEC_FIELDS = _COMMON_SPEC
SPEC_IGNORED = {"performanceHints"}                        # known, no effect on enforcement
RULE_FIELDS = {"action", "ipVersion", "protocol", "notProtocol", "icmp", "notICMP", "source", "destination",
               "http", "metadata"}
ENTITY_FIELDS = {"nets", "notNets", "selector", "notSelector", "namespaceSelector", "ports", "notPorts",
                 "serviceAccounts", "services"}
ICMP_PROTOCOLS = {"icmp": 4, "icmpv6": 6}                  # and the IP version each implies
ACTIONS = tuple(a.value for a in Action)


# --- names and tiers ------------------------------------------------------------------------

def _tier_of(check: Checker, spec: dict) -> str:
    value = spec.get("tier")
    if value is None or value == "":
        return DEFAULT_TIER_NAME
    if not isinstance(value, str) or len(value) > 63 or not TIER_NAME.match(value):
        check.fail("spec.tier", f"must be a tier name (a DNS label: at most 63 of a-z, 0-9, '-'), got {shown(value)}")
        return DEFAULT_TIER_NAME
    return value


def policy_name(raw: dict) -> str:
    """The v3 name of a valid policy object: "default.x" (how Calico stores a default-tier
    policy) is the policy "x"."""
    name = raw["metadata"]["name"]
    spec = raw.get("spec") or {}
    tier = spec.get("tier") or DEFAULT_TIER_NAME
    prefix = DEFAULT_TIER_NAME + "."
    return name[len(prefix):] if tier == DEFAULT_TIER_NAME and name.startswith(prefix) else name


def _check_name(check: Checker, name: str, tier: str, pattern: re.Pattern, kind_rule: str) -> None:
    if name.startswith("ossg."):                          # OpenStack's security groups: Calico names them
        return
    if not pattern.match(name):
        check.fail("metadata.name", f"{name!r} must be {kind_rule} (lower case a-z, 0-9, '-')")
    elif tier == DEFAULT_TIER_NAME:
        if "." in name and not name.startswith(DEFAULT_TIER_NAME + "."):
            check.fail("metadata.name", f"{name!r}: a name with a '.' names its tier first, and this policy is in "
                                        f"tier 'default' (spec.tier): name it without the prefix, or set spec.tier")
    elif not name.startswith(tier + "."):
        check.fail("metadata.name", f"{name!r}: a policy in tier {tier!r} must be named '{tier}.<name>' "
                                    f"(Calico requires the tier as the name's prefix)")


def tier(check: Checker, raw: dict) -> Tier | None:
    name = raw["metadata"].get("name")
    if not isinstance(name, str) or len(name) > 63 or not TIER_NAME.match(name):
        check.fail("metadata.name", f"must be a tier name (a DNS label: at most 63 of a-z, 0-9, '-', no dots), "
                                    f"got {shown(name)}")
        return None
    spec = spec_of(check, raw, required=False)
    if spec is None:
        return None
    check.known_fields(spec, "spec", {"order", "defaultAction"})
    order = order_of(check, spec.get("order"), "spec.order")
    action = spec.get("defaultAction", "Deny")
    if action not in ("Deny", "Pass"):
        check.fail("spec.defaultAction", f"must be Deny or Pass, got {shown(action)}")
        return None
    if name == DEFAULT_TIER_NAME and order != DEFAULT_TIER.order:
        check.fail("spec.order", f"the default tier's order is fixed: it must be {DEFAULT_TIER.order:.0f}, "
                                 f"got {shown(spec.get('order'))}")
        return None
    return Tier(name, order, Action(action))


# --- policies -------------------------------------------------------------------------------

def global_network_policy(check: Checker, raw: dict) -> Policy | None:
    return _policy(check, raw, None)


def network_policy(check: Checker, raw: dict) -> Policy | None:
    """A Calico NetworkPolicy: applies to its own namespace's workload endpoints."""
    return _policy(check, raw, namespace_of(raw))


def _policy(check: Checker, raw: dict, ns: str | None) -> Policy | None:
    before = len(check.errors)
    name = name_of(check, raw)
    if isinstance(name, str) and name.startswith(CONVERTED_PREFIXES):
        return None                     # Calico's view of a Kubernetes policy: weft reads the original
    spec = spec_of(check, raw)
    if spec is None:
        return None
    check.known_fields(spec, "spec", NAMESPACED_SPEC_FIELDS if ns else GLOBAL_SPEC_FIELDS, ignored=SPEC_IGNORED)
    tier_name = _tier_of(check, spec)
    if isinstance(name, str) and valid_dns_subdomain(name):
        if ns is None:
            _check_name(check, name, tier_name, GLOBAL_POLICY_NAME, "'<name>' or '<tier>.<name>'")
        else:
            _check_name(check, name, tier_name, POLICY_NAME, "'<name>' or '<tier>.<name>'")
    order = order_of(check, spec.get("order"), "spec.order")
    selector = selector_of(check, spec.get("selector"), "spec.selector")
    ns_selector = selector_of(check, spec.get("namespaceSelector"), "spec.namespaceSelector") if ns is None else None
    sa_selector = selector_of(check, spec.get("serviceAccountSelector"), "spec.serviceAccountSelector")
    _check_prefixable(check, ns_selector, "spec.namespaceSelector", calico_labels.NAMESPACE_PREFIX)
    _check_prefixable(check, sa_selector, "spec.serviceAccountSelector", calico_labels.SERVICE_ACCOUNT_PREFIX)
    _check_hints(check, spec.get("performanceHints"))
    do_not_track = bool(flag(check, spec, "doNotTrack", "spec.doNotTrack")) if ns is None else False
    pre_dnat = bool(flag(check, spec, "preDNAT", "spec.preDNAT")) if ns is None else False
    apply_on_forward = bool(flag(check, spec, "applyOnForward", "spec.applyOnForward")) if ns is None else True
    ingress_raw = check.typed(spec.get("ingress"), "spec.ingress", list, "a list of rules", [])
    egress_raw = check.typed(spec.get("egress"), "spec.egress", list, "a list of rules", [])
    types = _types(check, spec.get("types"), bool(ingress_raw), bool(egress_raw))
    if do_not_track and pre_dnat:
        check.fail("spec.preDNAT", "preDNAT and doNotTrack cannot both be true")
    if pre_dnat and egress_raw:
        check.fail("spec.egress", "a preDNAT policy cannot have egress rules")
    if pre_dnat and EGRESS in types and spec.get("types"):
        check.fail("spec.types", "a preDNAT policy cannot have type Egress")
    if (pre_dnat or do_not_track) and not apply_on_forward:
        check.fail("spec.applyOnForward", "must be true when preDNAT or doNotTrack is true (such rules apply to "
                                          "forwarded traffic anyway)")
    ingress = [_rule(check, r, f"spec.ingress[{i}]", ns) for i, r in enumerate(ingress_raw)]
    egress = [_rule(check, r, f"spec.egress[{i}]", ns) for i, r in enumerate(egress_raw)]
    if len(check.errors) != before:
        return None
    kind = "GlobalNetworkPolicy" if ns is None else "NetworkPolicy"
    v3_name = policy_name(raw)
    return Policy(
        name=v3_name, namespace=ns, selector=selector if selector is not None else All(),
        types=frozenset(types),
        ingress=tuple(r for r in ingress if r is not None) if INGRESS in types else (),
        egress=tuple(r for r in egress if r is not None) if EGRESS in types else (),
        tier=tier_name, order=order,
        origin=f"{kind} {ns + '/' if ns else ''}{v3_name}",
        namespace_selector=ns_selector, service_account_selector=sa_selector,
        apply_on_forward=apply_on_forward, pre_dnat=pre_dnat, do_not_track=do_not_track,
    )


def _check_prefixable(check: Checker, expr: Expr | None, path: str, prefix: str) -> None:
    """Scoped selectors are evaluated with Calico's prefixes on every key: the prefixed key
    must still be a valid label key."""
    if expr is None:
        return
    try:
        calico_labels.prefixed(expr, prefix)
    except SelectorError as e:
        check.fail(path, f"too long once scoped: {e}")


def _check_hints(check: Checker, hints: Any) -> None:
    for i, hint in enumerate(check.typed(hints, "spec.performanceHints", list, "a list", [])):
        if hint not in PERFORMANCE_HINTS:
            check.fail(f"spec.performanceHints[{i}]",
                       f"must be one of {', '.join(PERFORMANCE_HINTS)}, got {shown(hint)}")


def _types(check: Checker, raw: Any, has_ingress: bool, has_egress: bool) -> set[Direction]:
    """spec.types; when empty or absent, Calico's default: Ingress, or Egress if there are only
    egress rules, or both if there are both."""
    if not raw:
        if raw is not None and not isinstance(raw, list):
            check.fail("spec.types", f"must be a list of Ingress and/or Egress, got {shown(raw)}")
        if has_egress:
            return {INGRESS, EGRESS} if has_ingress else {EGRESS}
        return {INGRESS}
    types: set[Direction] = set()
    for i, t in enumerate(check.typed(raw, "spec.types", list, "a list of Ingress and/or Egress", [])):
        if not isinstance(t, str) or t not in (INGRESS, EGRESS):
            check.fail(f"spec.types[{i}]", f"must be Ingress or Egress, got {shown(t)}")
        elif Direction(t) in types:
            check.fail(f"spec.types[{i}]", f"{t!r} is given more than once")
        else:
            types.add(Direction(t))
    return types


# --- rules ----------------------------------------------------------------------------------

def _rule(check: Checker, raw: Any, path: str, ns: str | None) -> Rule | None:
    if not isinstance(raw, dict):
        check.fail(path, f"must be a mapping (a rule), got {shown(raw)}")
        return None
    before = len(check.errors)
    check.known_fields(raw, path, RULE_FIELDS, strict=True)
    action = raw.get("action")
    if action is None:
        check.fail(f"{path}.action", f"missing (one of {', '.join(ACTIONS)})")
    elif action not in ACTIONS:
        check.fail(f"{path}.action", f"must be one of {', '.join(ACTIONS)}, got {shown(action)}")
    if raw.get("http") is not None:
        check.fail(f"{path}.http", "not supported: weft has no L7 proxy (Calico's application layer policy "
                                   "needs one); match on ports and peers instead")
    metadata = check.typed(raw.get("metadata"), f"{path}.metadata", dict, "a mapping", {})
    check.known_fields(metadata, f"{path}.metadata", {"annotations"})
    annotations = check.typed(metadata.get("annotations"), f"{path}.metadata.annotations", dict, "a mapping", {})
    for key, value in annotations.items():
        if not isinstance(key, str) or not isinstance(value, str):
            check.fail(f"{path}.metadata.annotations", f"must map strings to strings, got {shown(key)}: {shown(value)}")
            break
    ip_version = raw.get("ipVersion")
    if ip_version is not None and (isinstance(ip_version, bool) or ip_version not in (4, 6)):
        check.fail(f"{path}.ipVersion", f"must be 4 or 6, got {shown(ip_version)}")
        ip_version = None
    protocol = protocol_of(check, raw.get("protocol"), f"{path}.protocol")
    not_protocol = protocol_of(check, raw.get("notProtocol"), f"{path}.notProtocol")
    for proto, field in ((protocol, "protocol"), (not_protocol, "notProtocol")):
        implied = ICMP_PROTOCOLS.get(proto or "")
        if implied and ip_version is not None and ip_version != implied:
            check.fail(f"{path}.ipVersion", f"must be {implied} with {field} {raw.get(field)!s}")
    icmp = _icmp(check, raw.get("icmp"), f"{path}.icmp", protocol, "icmp")
    not_icmp = _icmp(check, raw.get("notICMP"), f"{path}.notICMP", protocol, "notICMP")
    source = _entity(check, raw.get("source"), f"{path}.source", ns)
    destination = _entity(check, raw.get("destination"), f"{path}.destination", ns)
    for side, entity in (("source", source), ("destination", destination)):
        if entity is None:
            continue
        for field, ports in (("ports", entity.ports), ("notPorts", entity.not_ports)):
            if ports and not supports_ports(protocol):
                check.fail(f"{path}.{side}.{field}", "rules that match ports must set protocol to TCP, UDP or "
                                                     f"SCTP, got {'no protocol' if protocol is None else protocol}")
    _check_families(check, raw, path, ip_version)
    if len(check.errors) != before or source is None or destination is None or not isinstance(action, str):
        return None
    return Rule(Action(action), protocol, source, destination, not_protocol=not_protocol, icmp=icmp,
                not_icmp=not_icmp, ip_version=ip_version, origin=path)


def _icmp(check: Checker, raw: Any, path: str, protocol: str | None, field: str) -> IcmpMatch | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        check.fail(path, f"must be a mapping with type and code, got {shown(raw)}")
        return None
    check.known_fields(raw, path, {"type", "code"}, strict=True)
    if protocol not in ICMP_PROTOCOLS:
        why = "" if field == "icmp" else " (the kernel's icmp match needs the protocol)"
        check.fail(path, f"{field} requires protocol ICMP or ICMPv6{why}")
        return None
    icmp_type, code = raw.get("type"), raw.get("code")
    ok = True
    for value, name, high in ((icmp_type, "type", 254), (code, "code", 255)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high):
            check.fail(f"{path}.{name}", f"must be an integer 0-{high}, got {shown(value)}")
            ok = False
    if icmp_type is None:
        if code is not None:
            check.fail(f"{path}.code", "an ICMP code needs an ICMP type")
        elif ok:
            check.fail(path, "must set type (and optionally code)")
        return None
    return IcmpMatch(icmp_type, code) if ok else None


def _check_families(check: Checker, raw: dict, path: str, ip_version: int | None) -> None:
    """A rule's nets are all of one IP version, and of its ipVersion when it has one."""
    seen: set[int] = set()
    for side in ("source", "destination"):
        entity = raw.get(side)
        if not isinstance(entity, dict):
            continue
        for field in ("nets", "notNets"):
            values = entity.get(field)
            if not isinstance(values, list):
                continue
            versions = set()
            for value in values:
                if not isinstance(value, str):
                    continue
                try:
                    versions.add(ipaddress.ip_network(value, strict=False).version)
                except (ValueError, TypeError):
                    continue
            where = f"{path}.{side}.{field}"
            if ip_version is not None and versions - {ip_version}:
                check.fail(where, f"holds IPv{min(versions - {ip_version})} CIDRs, but the rule's ipVersion is "
                                  f"{ip_version}")
            elif len(versions | seen) > 1:
                check.fail(where, "a rule cannot mix IPv4 and IPv6 CIDRs")
            seen |= versions


def _entity(check: Checker, raw: Any, path: str, ns: str | None) -> EntityMatch | None:
    if raw is None:
        return EntityMatch()
    if not isinstance(raw, dict):
        check.fail(path, f"must be a mapping, got {shown(raw)}")
        return None
    before = len(check.errors)
    check.known_fields(raw, path, ENTITY_FIELDS, strict=True)
    if raw.get("services") is not None:
        check.fail(f"{path}.services", "not supported: weft does not read Kubernetes Services; select the "
                                       "service's pods with a selector instead")
    nets = _nets(check, raw.get("nets"), f"{path}.nets")
    not_nets = _nets(check, raw.get("notNets"), f"{path}.notNets")
    selector = selector_of(check, raw.get("selector"), f"{path}.selector")
    not_selector = selector_of(check, raw.get("notSelector"), f"{path}.notSelector")
    ns_selector = selector_of(check, raw.get("namespaceSelector"), f"{path}.namespaceSelector", global_ok=True)
    _check_prefixable(check, ns_selector, f"{path}.namespaceSelector", calico_labels.NAMESPACE_PREFIX)
    sa_names, sa_selector = _service_accounts(check, raw.get("serviceAccounts"), f"{path}.serviceAccounts")
    ports = ports_of(check, raw.get("ports"), f"{path}.ports")
    not_ports = ports_of(check, raw.get("notPorts"), f"{path}.notPorts")
    if len(check.errors) != before:
        return None
    has_sa = bool(sa_names) or sa_selector is not None
    # Calico confines a namespaced policy's rule selectors to its namespace, unless the rule
    # names namespaces itself (libcalico-go's rule conversion).
    scoped = ns if ns_selector is None and (selector is not None or not_selector is not None or has_sa) else None
    return EntityMatch(nets=nets, not_nets=not_nets, selector=selector, namespace_selector=ns_selector,
                       namespace=scoped, ports=ports, not_selector=not_selector, not_ports=not_ports,
                       service_account_names=sa_names, service_account_selector=sa_selector)


def _nets(check: Checker, raw: Any, path: str) -> tuple[str, ...]:
    items = check.typed(raw, path, list, "a list of CIDRs", [])
    nets = [network_of(check, value, f"{path}[{i}]", strict=True) for i, value in enumerate(items)]
    return tuple(dict.fromkeys(str(n) for n in nets if n is not None))


def _service_accounts(check: Checker, raw: Any, path: str) -> tuple[tuple[str, ...], Expr | None]:
    if raw is None:
        return (), None
    if not isinstance(raw, dict):
        check.fail(path, f"must be a mapping with names and/or selector, got {shown(raw)}")
        return (), None
    check.known_fields(raw, path, {"names", "selector"}, strict=True)
    names = []
    for i, name in enumerate(check.typed(raw.get("names"), f"{path}.names", list, "a list of names", [])):
        if not valid_dns_subdomain(name):
            check.fail(f"{path}.names[{i}]", f"must be a service account name (a DNS subdomain), got {shown(name)}")
        else:
            names.append(name)
    selector = selector_of(check, raw.get("selector"), f"{path}.selector")
    _check_prefixable(check, selector, f"{path}.selector", calico_labels.SERVICE_ACCOUNT_PREFIX)
    return tuple(sorted(set(names))), selector
