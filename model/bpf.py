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


MAP_NAMES = ("endpoints", "classifiers", "verdicts", "ports")   # reconciled; conntrack, counters, log are runtime


@dataclass(frozen=True)
class BpfMaps:
    """Everything weft writes into the pinned policy maps of one node."""
    endpoints: Mapping[str, EndpointEntry]
    classifiers: Mapping[ClassifierKey, int]
    verdicts: Mapping[VerdictKey, Verdict]
    ports: Mapping[PortKey, Verdict]
    # What each key means ("map name", key) -> text: for plan and drift output; desired side only.
    about: Mapping[tuple[str, tuple | str], str] = field(default_factory=dict, compare=False)

    def tables(self) -> dict[str, Mapping]:
        return {name: getattr(self, name) for name in MAP_NAMES}

    def size(self) -> int:
        return sum(len(t) for t in self.tables().values())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, table in self.tables().items():
            h.update(f"\0{name}\n".encode())
            for key, value in sorted(table.items()):
                h.update(f"{key!r}={value!r}\n".encode())
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

SPECS = {
    "endpoints": MapSpec("hash", _U32.size, _EP.size),
    "classifiers": MapSpec("lpm_trie", _CLS_KEY.size, _U32.size),
    "verdicts": MapSpec("hash", _VERDICT_KEY.size, _VERDICT.size),
    "ports": MapSpec("lpm_trie", _PORT_KEY.size, _VERDICT.size),
    "conntrack": MapSpec("lru_hash", CT_KEY.size, CT_VALUE.size),
    "counters": MapSpec("percpu_hash", COUNT_KEY.size, COUNT.size),
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
    raise KeyError(name)
