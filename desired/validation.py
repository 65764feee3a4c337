"""Checking one object's fields, with messages that name the file, the object and the field.

Shared by every converter (Kubernetes kinds, Calico kinds): a problem is recorded, never raised,
so one load reports every problem at once. Whatever a message quotes of the input is cut to a
readable length (`shown`): a value may be megabytes, or a structure built of YAML aliases.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
import reprlib
import socket
from functools import lru_cache
from typing import Any

from weft.model.errors import ValidationError

LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN_MAX, DNS_LABEL_MAX = 253, 63
NAMESPACED_DEFAULT = "default"
SHOWN_LENGTH = 80                   # characters of an offending value a message quotes
MESSAGE_LENGTH = 400                # a message longer than this is cut (its start names the problem)

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = SHOWN_LENGTH
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist = 3, 4, 6


def shown(value: Any) -> str:
    """`value` as a message quotes it: its repr, cut to about SHOWN_LENGTH characters, never
    walking more than a few levels and items of a structure (reprlib)."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int of more digits than Python will print
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= SHOWN_LENGTH + 10 else text[:SHOWN_LENGTH] + "..."


def child(path: str, key: Any) -> str:
    """The path of `key` below `path` ("spec.ingress" + "from"): a key that is not a short
    string is shown as a value is."""
    text = key if isinstance(key, str) and len(key) <= SHOWN_LENGTH and key.isprintable() else shown(key)
    return f"{path}.{text}" if path else text


class Checker:
    """Collects problems for one object; file and "Kind namespace/name" prefix every message.

    The object's label is made only when a problem is found: most objects have none, and
    there are tens of thousands of them.

    `warnings`, when given (Calico's kinds, whose schema grows with every release), collects
    the paths of fields weft does not know instead of refusing them (see known_fields).
    """
    __slots__ = ("where", "raw", "errors", "namespaced", "warnings")

    def __init__(self, where: str, raw: dict, errors: list[ValidationError], namespaced: bool = False,
                 warnings: list[str] | None = None):
        self.where, self.raw, self.errors, self.namespaced = where, raw, errors, namespaced
        self.warnings = warnings

    @property
    def obj(self) -> str:
        return object_label(self.raw, self.namespaced)

    def fail(self, path: str, message: str) -> None:
        if len(message) > MESSAGE_LENGTH:
            message = message[:MESSAGE_LENGTH] + "..."
        self.errors.append(ValidationError(self.where, self.obj, path, message))

    def typed(self, value: Any, path: str, kind: type | tuple, what: str, default: Any = None) -> Any:
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(path, f"must be {what}, got {shown(value)}")
            return default
        return value

    def known_fields(self, mapping: dict, path: str, allowed: set[str] | frozenset[str], *,
                     ignored: set[str] | frozenset[str] = frozenset(), strict: bool = False) -> None:
        """Every key of `mapping` not in `allowed` (the fields weft uses) or `ignored` (fields it
        knows it does not use) is a problem (keys of any type: YAML allows ints, dates, ... as
        keys, and a typo must never be silently dropped). Where the checker collects warnings
        and not `strict`, an unknown field is only reported as a warning, unless it looks like
        a typo of a field weft uses (same letters in another case, or nearly the same name)."""
        unknown = [key for key in mapping if key not in allowed and key not in ignored]
        for key in sorted(unknown, key=lambda k: (not isinstance(k, str), k if isinstance(k, str) else shown(k))):
            typo = _close_to(key, allowed)
            if self.warnings is not None and not strict and typo is None and isinstance(key, str) \
                    and key.isprintable() and len(key) <= SHOWN_LENGTH:
                self.warnings.append(child(path, key))
                continue
            hint = f"did you mean {typo!r}? " if typo else ""
            self.fail(child(path, key), f"unknown field ({hint}known: {', '.join(sorted(allowed | ignored))})")


def _close_to(key: Any, known: set[str] | frozenset[str]) -> str | None:
    """The field of `known` that `key` is probably a misspelling of, if any."""
    if not isinstance(key, str) or len(key) > SHOWN_LENGTH:
        return None
    folded = {k.lower(): k for k in known}
    if key.lower() in folded:
        return folded[key.lower()]
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return close[0] if close else None


def object_label(raw: dict, namespaced: bool) -> str:
    """"Kind namespace/name" (or "Kind name" for cluster-scoped kinds), as errors show objects;
    parts that are not plain names (the object is being refused) are shown cut."""
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    ns = (meta.get("namespace") or NAMESPACED_DEFAULT) if namespaced else None
    return f"{_plain(raw.get('kind'))} {_plain(ns) + '/' if ns else ''}{_plain(meta.get('name'))}"


def _plain(value: Any) -> str:
    if isinstance(value, str) and len(value) <= DNS_SUBDOMAIN_MAX and value.isprintable():
        return value
    return shown(value)


def namespace_problem(value: Any) -> str | None:
    """Why `value` cannot be an object's metadata.namespace (None when absent: "default")."""
    if value is None or value == "" or valid_dns_label(value):
        return None
    return f"must be a namespace name (a DNS label: at most {DNS_LABEL_MAX} of a-z, 0-9, '-'), got {shown(value)}"


def namespace_of(raw: dict) -> str:
    """The object's namespace; the loader has checked it (namespace_problem) before converting."""
    return raw["metadata"].get("namespace") or NAMESPACED_DEFAULT


def name_of(check: Checker, raw: dict, dns_label: bool = False) -> str:
    """metadata.name, checked as the API server checks most kinds' names (a DNS subdomain), or a
    DNS label where the kind's names must be one (`dns_label`, e.g. Namespace)."""
    name = raw["metadata"].get("name")
    if dns_label and not valid_dns_label(name):
        check.fail("metadata.name", f"must be a DNS label (at most {DNS_LABEL_MAX} of a-z, 0-9, '-', "
                                    f"no dots), got {shown(name)}")
        return _plain(name)
    if not valid_dns_subdomain(name):
        check.fail("metadata.name", f"must be a DNS subdomain name (at most {DNS_SUBDOMAIN_MAX} of a-z, 0-9, "
                                    f"'-', '.'), got {shown(name)}")
        return _plain(name)
    return name


def valid_dns_label(value: Any) -> bool:
    """RFC 1123 label, as Kubernetes validates namespace names."""
    return isinstance(value, str) and 0 < len(value) <= DNS_LABEL_MAX and bool(DNS_LABEL.match(value))


def valid_dns_subdomain(value: Any) -> bool:
    """RFC 1123 subdomain, as Kubernetes validates most objects' names (pods, nodes, policies)."""
    return isinstance(value, str) and 0 < len(value) <= DNS_SUBDOMAIN_MAX and bool(DNS_SUBDOMAIN.match(value))


def labels_of(check: Checker, raw: Any, path: str) -> dict[str, str]:
    labels = check.typed(raw, path, dict, "a mapping of label keys to values", {})
    try:
        problems = _label_problems(tuple(labels.items()))
    except TypeError:                       # an unhashable value (certainly not a string): uncached
        problems = _label_problems.__wrapped__(tuple(labels.items()))
    for key, message in problems:
        check.fail(child(path, key), message)
    if not problems:
        return labels
    bad = {key for key, _ in problems}
    return {k: v for k, v in labels.items() if k not in bad}


@lru_cache(maxsize=4096)
def _label_problems(items: tuple) -> tuple[tuple[Any, str], ...]:
    """Many pods share one label set (a Deployment's replicas): check each set once."""
    problems = []
    for key, value in items:
        if not valid_label_key(key):
            problems.append((key, "invalid label key"))
        elif not valid_label_value(value):
            problems.append((key, f"invalid label value {shown(value)}"))
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
        if not isinstance(value, str):                  # ipaddress would take an int as an address
            raise TypeError(value)
        if "." in value:                                # IPv4: the common case, checked 20x cheaper
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value))
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError, OSError):
        check.fail(path, f"invalid IP address {shown(value)}")
        return None


def cidr_of(check: Checker, value: Any, path: str) -> str | None:
    """A CIDR normalised to its network address (host bits dropped), or None."""
    try:
        if not isinstance(value, str):
            raise TypeError(value)
        return str(ipaddress.ip_network(value, strict=False))
    except (ValueError, TypeError):
        check.fail(path, f"invalid CIDR {shown(value)}")
        return None
