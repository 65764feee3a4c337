"""The eBPF data plane's map contents, as weft reasons about them and as the kernel stores them.

The renderer (weft.renderers.bpf_policy) produces a `BpfMaps`; the probe (weft.probes.bpf)
reads the pinned maps back into the same form, so "in sync" is plain equality and a diff is
key by key. Keys and values are small named tuples; `pack_*`/`unpack_*` turn them into the
exact bytes of the C structs in renderers/bpf/maps.h (native byte order, as the kernel keeps
map data; addresses and ports in network order, as they appear in packets).

Endpoint entries are keyed by interface name here; the kernel keys them by ifindex, which the
probe and the writer translate in the node's network namespace.
"""
from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

# Verdict actions and flags (maps.h WEFT_*).
ALLOW, DENY, DPORTS, SPORTS = 1, 2, 3, 4
ACTION_NAMES = {ALLOW: "allow", DENY: "deny", DPORTS: "by destination port", SPORTS: "by source port"}
FLAG_LOG = 1
PROFILE_OPEN, PROFILE_CLOSED = 0, 1            # reserved profile ids, see maps.h
RESERVED_IDS = (0, 1)                          # never given to a profile, classifier, class, table, rule or log

PROTOCOL_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items()}


class DirectionPolicy(NamedTuple):
    """One direction of an endpoint: the profile that judges it, the classifiers of source and
    destination addresses, and the digest of the profile's verdicts (tracked connections are
    judged again when it changes)."""
    profile: int
    src_classifier: int = 0
    dst_classifier: int = 0
    digest: int = 0


class EndpointEntry(NamedTuple):
    egress: DirectionPolicy
    ingress: DirectionPolicy


class ClassifierKey(NamedTuple):
    classifier: int
    net: str                                    # "198.18.1.11/32"


class VerdictKey(NamedTuple):
    profile: int
    src_class: int
    dst_class: int
    proto: int | None                           # None: every protocol without an entry of its own


class PortKey(NamedTuple):
    table: int
    port: int                                   # the prefix's first port
    prefixlen: int                              # 0..16 bits of the port


class Verdict(NamedTuple):
    action: int                                 # ALLOW / DENY (a leaf) or DPORTS / SPORTS (a table)
    rule: int = 0                               # the deciding rule's id (leaves)
    arg: int = 0                                # the table id, or the log id of a leaf with FLAG_LOG
    flags: int = 0

    def describe(self) -> str:
        if self.action in (DPORTS, SPORTS):
            return f"{ACTION_NAMES[self.action]}: table {self.arg:08x}"
        text = f"{ACTION_NAMES.get(self.action, self.action)} (rule {self.rule:08x})"
        return text + (f", log {self.arg:08x}" if self.flags & FLAG_LOG else "")


class ServiceKey(NamedTuple):
    """A service address: the cluster IP, the service port, the protocol number."""
    addr: str
    port: int
    proto: int


class ServiceEntry(NamedTuple):
    id: int                                     # its backends are BackendKey(id, 0 .. count - 1)
    # Named as in struct weft_svc (renderers/bpf/maps.h); the field hides tuple.count, which
    # nothing calls on an entry (mypy sees a method overridden by an int).
    count: int                                  # type: ignore[assignment]
    affinity: int = 0                           # ClientIP affinity timeout (seconds), 0: none


class BackendKey(NamedTuple):
    id: int
    # Named as in struct weft_backend_key (renderers/bpf/maps.h); hides tuple.index, as `count` above.
    index: int                                  # type: ignore[assignment]


class Backend(NamedTuple):
    addr: str
    port: int


# Reconciled maps; conntrack, counters, log, nat and affinity are runtime state.
MAP_NAMES = ("endpoints", "classifiers", "verdicts", "ports", "services", "backends")


@dataclass(frozen=True)
class BpfMaps:
    """Everything weft writes into the pinned policy maps of one node."""
    endpoints: Mapping[str, EndpointEntry]
    classifiers: Mapping[ClassifierKey, int]
    verdicts: Mapping[VerdictKey, Verdict]
    ports: Mapping[PortKey, Verdict]
    services: Mapping[ServiceKey, ServiceEntry] = field(default_factory=dict)
    backends: Mapping[BackendKey, Backend] = field(default_factory=dict)
    # What each key means ("map name", key) -> text: for plan and drift output; desired side only.
    about: Mapping[tuple[str, tuple | str], str] = field(default_factory=dict, compare=False)
    # Each rule id a verdict carries -> the rule it stands for, in evaluation order; desired side only.
    rules: Mapping[int, str] = field(default_factory=dict, compare=False)
    # Each profile id -> the ids of its rules (and tier ends) in evaluation order; desired side only.
    profiles: Mapping[int, tuple[int, ...]] = field(default_factory=dict, compare=False)

    def tables(self) -> dict[str, Mapping]:
        return {name: getattr(self, name) for name in MAP_NAMES}

    def size(self) -> int:
        return sum(len(t) for t in self.tables().values())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, table in self.tables().items():
            h.update(f"\0{name}\n".encode())
            # by text: a key's fields may be None beside numbers (a verdict for any protocol)
            for line in sorted(f"{key!r}={value!r}\n" for key, value in table.items()):
                h.update(line.encode())
        return h.hexdigest()


EMPTY = BpfMaps({}, {}, {}, {})


# --- The kernel's bytes (renderers/bpf/maps.h). -----------------------------------------------

class MapSpec(NamedTuple):
    kind: str                                   # bpftool's name of the map type
    key_size: int
    value_size: int


_EP = struct.Struct("=2I4I2I")                  # profile[2], classifier[2][2], digest[2]
_CLS_KEY = struct.Struct("=II4s")               # prefixlen, classifier, address (network order)
_U32 = struct.Struct("=I")
_VERDICT_KEY = struct.Struct("=IIIBBH")
_VERDICT = struct.Struct("=BBHII")
_PORT_KEY = struct.Struct("=II2s")              # packed: prefixlen, table, port (network order)
CT_KEY = struct.Struct("=I4s4s2s2sB3x")                   # ifindex, addr a, addr b, port a, port b, proto
CT_VALUE = struct.Struct("=QI2s2sBBBx4x")       # seen, digest, policy sport, dport, origin, origin is a, flags
COUNT_KEY = struct.Struct("=II")             # ifindex, rule
COUNT = struct.Struct("=QQ")
_SVC_KEY = struct.Struct("=4s2sBx")             # address, port (network order), protocol
_SVC = struct.Struct("=IIII")
_BACKEND_KEY = struct.Struct("=II")
_BACKEND = struct.Struct("=4s2s2x")
NAT_KEY = struct.Struct("=4s4s2s2sB3x")         # source, destination, ports, protocol
NAT = struct.Struct("=Q4s2sH")                  # seen, address, port, kind (0: a service translation)
AFF_KEY = struct.Struct("=4sI")
AFF = struct.Struct("=Q4s2sH")

SPECS = {
    "endpoints": MapSpec("hash", _U32.size, _EP.size),
    "classifiers": MapSpec("lpm_trie", _CLS_KEY.size, _U32.size),
    "verdicts": MapSpec("hash", _VERDICT_KEY.size, _VERDICT.size),
    "ports": MapSpec("lpm_trie", _PORT_KEY.size, _VERDICT.size),
    "conntrack": MapSpec("lru_hash", CT_KEY.size, CT_VALUE.size),
    "counters": MapSpec("percpu_hash", COUNT_KEY.size, COUNT.size),
    "services": MapSpec("hash", _SVC_KEY.size, _SVC.size),
    "backends": MapSpec("hash", _BACKEND_KEY.size, _BACKEND.size),
    "nat": MapSpec("lru_hash", NAT_KEY.size, NAT.size),
    "affinity": MapSpec("lru_hash", AFF_KEY.size, AFF.size),
}


def pack_key(name: str, key) -> bytes:
    if name == "endpoints":
        return _U32.pack(key)                   # the ifindex
    if name == "classifiers":
        net = ipaddress.IPv4Network(key.net)
        return _CLS_KEY.pack(32 + net.prefixlen, key.classifier, net.network_address.packed)
    if name == "verdicts":
        any_proto = key.proto is None
        return _VERDICT_KEY.pack(key.profile, key.src_class, key.dst_class, 0 if any_proto else key.proto,
                                 1 if any_proto else 0, 0)
    if name == "ports":
        return _PORT_KEY.pack(32 + key.prefixlen, key.table, key.port.to_bytes(2, "big"))
    if name == "services":
        return _SVC_KEY.pack(ipaddress.IPv4Address(key.addr).packed, key.port.to_bytes(2, "big"), key.proto)
    if name == "backends":
        return _BACKEND_KEY.pack(key.id, key.index)
    raise KeyError(name)


def unpack_key(name: str, data: bytes):
    if name == "endpoints":
        return _U32.unpack(data)[0]
    if name == "classifiers":
        prefixlen, classifier, addr = _CLS_KEY.unpack(data)
        return ClassifierKey(classifier, str(ipaddress.IPv4Network((addr, max(prefixlen - 32, 0)), strict=False)))
    if name == "verdicts":
        profile, src, dst, proto, any_proto, _ = _VERDICT_KEY.unpack(data)
        return VerdictKey(profile, src, dst, None if any_proto else proto)
    if name == "ports":
        prefixlen, table, port = _PORT_KEY.unpack(data)
        return PortKey(table, int.from_bytes(port, "big"), prefixlen - 32)
    if name == "services":
        addr, port, proto = _SVC_KEY.unpack(data)
        return ServiceKey(str(ipaddress.IPv4Address(addr)), int.from_bytes(port, "big"), proto)
    if name == "backends":
        return BackendKey(*_BACKEND_KEY.unpack(data))
    raise KeyError(name)


def pack_value(name: str, value) -> bytes:
    if name == "endpoints":
        e, i = value.egress, value.ingress
        return _EP.pack(e.profile, i.profile, e.src_classifier, e.dst_classifier, i.src_classifier,
                        i.dst_classifier, e.digest, i.digest)
    if name == "classifiers":
        return _U32.pack(value)
    if name in ("verdicts", "ports"):
        return _VERDICT.pack(value.action, value.flags, 0, value.rule, value.arg)
    if name == "services":
        return _SVC.pack(value.id, value.count, value.affinity, 0)
    if name == "backends":
        return _BACKEND.pack(ipaddress.IPv4Address(value.addr).packed, value.port.to_bytes(2, "big"))
    raise KeyError(name)


def unpack_value(name: str, data: bytes):
    if name == "endpoints":
        ep, ip, es, ed, is_, id_, edig, idig = _EP.unpack(data)
        return EndpointEntry(DirectionPolicy(ep, es, ed, edig), DirectionPolicy(ip, is_, id_, idig))
    if name == "classifiers":
        return _U32.unpack(data)[0]
    if name in ("verdicts", "ports"):
        action, flags, _, rule, arg = _VERDICT.unpack(data)
        return Verdict(action, rule, arg, flags)
    if name == "services":
        ident, count, affinity, _ = _SVC.unpack(data)
        return ServiceEntry(ident, count, affinity)
    if name == "backends":
        addr, port = _BACKEND.unpack(data)
        return Backend(str(ipaddress.IPv4Address(addr)), int.from_bytes(port, "big"))
    raise KeyError(name)


# --- As data (the render cache keeps a node's maps between runs; never code). -------------------

def maps_to_data(maps: BpfMaps) -> dict:
    """`maps` as JSON-able lists (see maps_from_data)."""
    def key_data(name: str, key) -> object:
        return key if name == "endpoints" else list(key)

    def value_data(name: str, value) -> object:
        if name == "endpoints":
            return [list(value.egress), list(value.ingress)]
        return value if name == "classifiers" else list(value)

    data: dict = {name: [[key_data(name, k), value_data(name, v)] for k, v in table.items()]
                  for name, table in maps.tables().items()}
    data["about"] = [[name, key_data(name, key), text] for (name, key), text in maps.about.items()]
    data["rules"] = [[rule, text] for rule, text in maps.rules.items()]
    data["profiles"] = [[profile, list(rules)] for profile, rules in maps.profiles.items()]
    return data


def _int(value: object) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError(f"not a map integer: {value!r}")
    return value


def _key_from(name: str, data: object):
    if name == "endpoints":
        if not isinstance(data, str):
            raise ValueError("an endpoint key is an interface name")
        return data
    if not isinstance(data, list):
        raise ValueError(f"a {name} key is a list")
    if name == "classifiers":
        classifier, net = data
        if not isinstance(net, str):
            raise ValueError("a classifier key's network is text")
        return ClassifierKey(_int(classifier), str(ipaddress.IPv4Network(net)))
    if name == "verdicts":
        profile, src, dst, proto = data
        return VerdictKey(_int(profile), _int(src), _int(dst), None if proto is None else _int(proto))
    if name == "ports":
        table, port, prefixlen = data
        return PortKey(_int(table), _int(port), _int(prefixlen))
    if name == "services":
        addr, port, proto = data
        return ServiceKey(_addr(addr), _int(port), _int(proto))
    if name == "backends":
        ident, index = data
        return BackendKey(_int(ident), _int(index))
    raise ValueError(f"no map {name!r}")


def _addr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("an address is text")
    return str(ipaddress.IPv4Address(value))


def _value_from(name: str, data: object):
    if name == "classifiers":
        return _int(data)
    if not isinstance(data, list):
        raise ValueError(f"a {name} value is a list")
    if name == "endpoints":
        egress, ingress = data
        return EndpointEntry(DirectionPolicy(*map(_int, egress)), DirectionPolicy(*map(_int, ingress)))
    if name == "services":
        return ServiceEntry(*map(_int, data))
    if name == "backends":
        addr, port = data
        return Backend(_addr(addr), _int(port))
    return Verdict(*map(_int, data))


def maps_from_data(data: object) -> BpfMaps:
    """The BpfMaps `maps_to_data` described; ValueError (or TypeError) for anything else: the
    caller renders anew."""
    if not isinstance(data, Mapping):
        raise ValueError("not a description of eBPF maps")
    tables = {}
    for name in MAP_NAMES:
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise ValueError(f"map {name} is not a list")
        tables[name] = {_key_from(name, k): _value_from(name, v) for k, v in entries}
    about = {}
    for name, key, text in data["about"]:
        if name not in MAP_NAMES or not isinstance(text, str):
            raise ValueError("a key's description is (map, key, text)")
        about[(name, _key_from(name, key))] = text
    rules = {}
    for rule, text in data["rules"]:
        if not isinstance(text, str):
            raise ValueError("a rule's description is text")
        rules[_int(rule)] = text
    profiles = {_int(profile): tuple(map(_int, ids)) for profile, ids in data["profiles"]}
    return BpfMaps(**tables, about=about, rules=rules, profiles=profiles)
