"""Checking one object's fields, with messages that name the file, the object and the field.

Shared by every converter (Kubernetes kinds, Calico kinds): a problem is recorded, never raised,
so one load reports every problem at once.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from typing import Any

from weft.model.errors import ValidationError

LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
NAMESPACED_DEFAULT = "default"


class Checker:
    """Collects problems for one object; file and "Kind namespace/name" prefix every message.

    The object's label is made only when a problem is found: most objects have none, and
    there are tens of thousands of them.
    """
    __slots__ = ("where", "raw", "errors", "namespaced")

    def __init__(self, where: str, raw: dict, errors: list[ValidationError], namespaced: bool = False):
        self.where, self.raw, self.errors, self.namespaced = where, raw, errors, namespaced

    @property
    def obj(self) -> str:
        return object_label(self.raw, self.namespaced)

    def fail(self, path: str, message: str) -> None:
        self.errors.append(ValidationError(self.where, self.obj, path, message))

    def typed(self, value: Any, path: str, kind: type | tuple, what: str, default: Any = None) -> Any:
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(path, f"must be {what}, got {value!r}")
            return default
        return value

    def known_fields(self, mapping: dict, path: str, allowed: set[str]) -> None:
        for key in sorted(set(mapping) - allowed):
            self.fail(f"{path}.{key}" if path else key, f"unknown field (known: {', '.join(sorted(allowed))})")


def object_label(raw: dict, namespaced: bool) -> str:
    """"Kind namespace/name" (or "Kind name" for cluster-scoped kinds), as errors show objects."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    ns = (meta.get("namespace") or NAMESPACED_DEFAULT) if namespaced else None
    return f"{raw.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def namespace_of(raw: dict) -> str:
    return raw["metadata"].get("namespace") or NAMESPACED_DEFAULT


def name_of(check: Checker, raw: dict) -> str:
    name = raw["metadata"].get("name")
    if not isinstance(name, str) or not name or not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        check.fail("metadata.name", f"must be a DNS subdomain name, got {name!r}")
        return str(name)
    return name


def labels_of(check: Checker, raw: Any, path: str) -> dict[str, str]:
    labels = check.typed(raw, path, dict, "a mapping of label keys to values", {})
    try:
        problems = _label_problems(tuple(labels.items()))
    except TypeError:                       # an unhashable value: certainly not a string
        problems = _label_problems(tuple((k, repr(v) + "\0") for k, v in labels.items()))
    for key, message in problems:
        check.fail(f"{path}.{key}", message)
    return {k: v for k, v in labels.items() if k not in dict(problems)} if problems else labels


@lru_cache(maxsize=4096)
def _label_problems(items: tuple) -> tuple[tuple[str, str], ...]:
    """Many pods share one label set (a Deployment's replicas): check each set once."""
    problems = []
    for key, value in items:
        if not valid_label_key(key):
            problems.append((key, "invalid label key"))
        elif not valid_label_value(value):
            problems.append((key, f"invalid label value {value!r}"))
    return tuple(problems)


def valid_label_key(key: Any) -> bool:
    if not isinstance(key, str) or not key:
        return False
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(LABEL_NAME.match(name))


def valid_label_value(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(LABEL_NAME.match(value))


def ip_of(check: Checker, value: Any, path: str) -> str | None:
    """A canonical IP address text, or None (with the problem recorded)."""
    try:
        if isinstance(value, str) and "." in value:     # IPv4: the common case, checked 20x cheaper
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value))
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError, OSError):
        check.fail(path, f"invalid IP address {value!r}")
        return None


def cidr_of(check: Checker, value: Any, path: str) -> str | None:
    """A CIDR normalised to its network address (host bits dropped), or None."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except (ValueError, TypeError):
        check.fail(path, f"invalid CIDR {value!r}")
        return None
