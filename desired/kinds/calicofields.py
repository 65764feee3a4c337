"""The field types Calico's resources share, checked as Calico's API server checks them:
selectors, orders, protocols, ports, CIDRs, booleans. Each takes the Checker, the raw value and
its path, records any problem there and returns the model value (None when invalid or absent).
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from weft.desired.validation import Checker, shown
from weft.model.cluster import PROTOCOL_NAMES, PROTOCOL_NUMBERS, NamedPort, Port, PortRange
from weft.model.selector import Expr, SelectorError, parse_selector

# Calico's protocol names, as its API spells them (matched case-insensitively, as its JSON
# decoding does), and weft's spelling of each.
PROTOCOL_SPELLINGS = {"TCP": "tcp", "UDP": "udp", "ICMP": "icmp", "ICMPv6": "icmpv6", "SCTP": "sctp",
                      "UDPLite": "udplite"}
_PROTOCOL_BY_FOLDED = {k.lower(): v for k, v in PROTOCOL_SPELLINGS.items()}
PORT_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")          # numorstring's named-port syntax
_PORT_RANGE = re.compile(r"^(\d+):(\d+)$")
_DIGITS = re.compile(r"^\d+$")
MAX_SELECTOR_LENGTH = 1024                                  # Calico's CRD schema limit (kubebuilder MaxLength)
GLOBAL_CALL = "global("


def spec_of(check: Checker, raw: dict, required: bool = True) -> dict | None:
    spec = raw.get("spec")
    if spec is None:
        if required:
            check.fail("spec", "missing")
            return None
        return {}
    if not isinstance(spec, dict):
        check.fail("spec", f"must be a mapping, got {shown(spec)}")
        return None
    return spec


def flag(check: Checker, mapping: dict, key: str, path: str) -> bool | None:
    """A boolean field; None when absent."""
    value = mapping.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        check.fail(path, f"must be true or false, got {shown(value)}")
        return None
    return value


def order_of(check: Checker, value: Any, path: str) -> float | None:
    """Calico's `order`: any finite number; absent means last."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        check.fail(path, f"must be a number, got {shown(value)}")
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        check.fail(path, f"must be a finite number, got {shown(value)}")
        return None
    return number


def selector_of(check: Checker, value: Any, path: str, *, global_ok: bool = False) -> Expr | None:
    """A Calico selector string, parsed to its normal form. `global()` is only valid where
    `global_ok` (a rule's namespaceSelector, and then alone), as Calico's validator says."""
    if value is None:
        return None
    if not isinstance(value, str):
        check.fail(path, f"must be a selector string, got {shown(value)}")
        return None
    if len(value) > MAX_SELECTOR_LENGTH:
        check.fail(path, f"is {len(value)} characters long: a selector has at most {MAX_SELECTOR_LENGTH}")
        return None
    try:
        expr = parse_selector(value)
    except SelectorError as e:
        check.fail(path, str(e))
        return None
    if GLOBAL_CALL in value:
        if not global_ok:
            check.fail(path, "global() can only be used in a rule's namespaceSelector")
            return None
        if expr.canonical() != "global()":
            check.fail(path, "global() cannot be combined with other selectors")
            return None
    return expr


def protocol_of(check: Checker, value: Any, path: str) -> str | None:
    """TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite (any case) or a protocol number 1-255 (also as a
    string of digits), as weft keeps it: the lower-case name, or the number of a protocol
    without a name."""
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.match(value) and len(value) <= 3:
        number = int(value)
    elif isinstance(value, str) and value.lower() in _PROTOCOL_BY_FOLDED:
        return _PROTOCOL_BY_FOLDED[value.lower()]
    if number is not None and 1 <= number <= 255:
        return PROTOCOL_NAMES.get(number, str(number))
    check.fail(path, f"must be one of {', '.join(PROTOCOL_SPELLINGS)} or a protocol number 1-255, got {shown(value)}")
    return None


def supports_ports(protocol: str | None) -> bool:
    return protocol is not None and PROTOCOL_NUMBERS.get(protocol, 0) in (6, 17, 132)


def port_of(check: Checker, value: Any, path: str) -> Port | None:
    """80, "80", "1000:2000" or a port name (numorstring.Port)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= 65535:
            return PortRange(value, value)
    elif isinstance(value, str):
        if _DIGITS.match(value) and len(value) <= 5 and 1 <= int(value) <= 65535:
            return PortRange(int(value), int(value))
        match = _PORT_RANGE.match(value)
        if match and len(value) <= 11:
            low, high = int(match.group(1)), int(match.group(2))
            if 1 <= low <= high <= 65535:
                return PortRange(low, high)
            check.fail(path, f"port range {value!r} must be first:last with 1 <= first <= last <= 65535")
            return None
        if PORT_NAME.match(value) and not _DIGITS.match(value):
            return NamedPort(value)
    check.fail(path, f"must be a port 1-65535, a range 'first:last' or a port name, got {shown(value)}")
    return None


def ports_of(check: Checker, value: Any, path: str) -> tuple[Port, ...]:
    items = check.typed(value, path, list, "a list of ports", [])
    ports = [port_of(check, item, f"{path}[{i}]") for i, item in enumerate(items)]
    return tuple(dict.fromkeys(p for p in ports if p is not None))


def network_of(check: Checker, value: Any, path: str, *,
               strict: bool) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A CIDR. `strict`: a prefix length is required and no host bit may be set (a rule's nets,
    as Calico's validator checks them); else a bare address is a /32 (/128) and host bits are
    dropped (network sets, failsafe nets)."""
    if not isinstance(value, str):
        check.fail(path, f"must be a CIDR string, got {shown(value)}")
        return None
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        check.fail(path, f"invalid CIDR {shown(value)}")
        return None
    if strict and "/" not in value:
        check.fail(path, f"must be a CIDR with its prefix length, e.g. {network}")
        return None
    if strict and str(network.network_address) != str(ipaddress.ip_interface(value).ip):
        check.fail(path, f"{value} has host bits set: the network is {network}")
        return None
    return network
