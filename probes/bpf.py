"""Reading weft's eBPF state back from the kernel: pinned maps, pinned programs, tc attachments.

Maps are read with the bpf(2) system call on their pinned paths (read-only opens), so reading
needs neither bcc nor a compile, and costs about a microsecond a key. The policy maps come back
as a weft.model.bpf.BpfMaps, the form the renderer produces, so a diff is key by key. Endpoint
entries are keyed by ifindex in the kernel and by interface name here: the translation uses the
interfaces of the calling thread's network namespace (the node's).

The small `Bpf` syscall layer here is shared with the writer (reconciler.bpf_apply), which adds
updates and deletes on descriptors it opens for writing; this module only reads.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from weft.model import bpf as m
from weft.model.errors import WeftError
from weft.probes.runner import KernelCommandError, Runner

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
MAP_LOOKUP_BATCH = 24
BATCH = 4096                               # keys per batched lookup
_NO_BATCH = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, 524})   # 524: the kernel's ENOTSUPP
OBJ_GET, OBJ_GET_INFO_BY_FD = 7, 15
F_RDONLY, F_WRONLY = 1 << 3, 1 << 4
_MAP_TYPES = {1: "hash", 5: "percpu_hash", 9: "lru_hash", 11: "lpm_trie", 27: "ringbuf"}

PROGRAMS = ("from_wl", "to_wl", "from_up", "to_up")  # pinned programs: pod egress (tc ingress of its veth),
#                                                    pod ingress (tc egress), node ports in and out (the uplink)
FILTER_PREF = 49152                        # the tc filter priority and handle weft's programs use
FILTER_HANDLE = "0x1"


class BpfError(WeftError):
    """A bpf(2) call failed; the message names the object and the kernel's answer."""


class _Libc:
    _lib = None

    @classmethod
    def syscall(cls):
        if cls._lib is None:
            cls._lib = ctypes.CDLL(None, use_errno=True)
            cls._lib.syscall.restype = ctypes.c_long
        return cls._lib.syscall


def bpf(cmd: int, attr: ctypes.Array) -> int:
    """One bpf(2) call; raises OSError with the kernel's errno."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise BpfError(f"bpf(2): unknown system call number on {platform.machine()}")
    result = _Libc.syscall()(ctypes.c_long(number), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def obj_get(path: Path | str, flags: int = 0) -> int:
    """A descriptor of the object pinned at `path` (F_RDONLY / F_WRONLY for maps)."""
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=QII", attr, 0, ctypes.addressof(name), 0, flags)
    try:
        return bpf(OBJ_GET, attr)
    except OSError as exc:
        raise BpfError(f"cannot open pinned object {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class MapInfo:
    kind: str
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    bpf(OBJ_GET_INFO_BY_FD, attr)
    kind, ident, ks, vs, me, flags = struct.unpack_from("=6I", info, 0)
    name = info.raw[24:40].split(b"\0")[0].decode()
    return MapInfo(_MAP_TYPES.get(kind, str(kind)), ident, ks, vs, me, flags, name)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    map_ids: tuple[int, ...]


def prog_info(path: Path | str) -> ProgInfo:
    """The program pinned at `path`: its id, name and the ids of the maps it uses."""
    fd = obj_get(path)
    try:
        ids = (ctypes.c_uint32 * 64)()
        info = ctypes.create_string_buffer(80)
        struct.pack_into("=IQ", info, 52, len(ids), ctypes.addressof(ids))   # nr_map_ids, map_ids
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
        bpf(OBJ_GET_INFO_BY_FD, attr)
        ident = struct.unpack_from("=I", info, 4)[0]
        count = min(struct.unpack_from("=I", info, 52)[0], len(ids))
        name = info.raw[64:80].split(b"\0")[0].decode()
        return ProgInfo(ident, name, tuple(ids[:count]))
    finally:
        os.close(fd)


class MapHandle:
    """A pinned map opened for reading (or, by the writer, for writing)."""

    def __init__(self, path: Path | str, flags: int = F_RDONLY):
        self.path = Path(path)
        self.fd = obj_get(path, flags)
        self.info = map_info(self.fd)
        self._value_len = self.info.value_size
        if self.info.kind.startswith("percpu"):
            self._value_len = ((self.info.value_size + 7) // 8 * 8) * possible_cpus()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _elem(self, cmd: int, key: bytes | None, value, flags: int = 0) -> int:
        attr = ctypes.create_string_buffer(128)
        kbuf = ctypes.create_string_buffer(key, self.info.key_size) if key is not None else None
        struct.pack_into("=IIQQQ", attr, 0, self.fd, 0, ctypes.addressof(kbuf) if kbuf else 0,
                         ctypes.addressof(value) if value is not None else 0, flags)
        return bpf(cmd, attr)

    def keys(self) -> Iterator[bytes]:
        """Every key; one that disappears while iterating is simply not seen."""
        key = None
        nxt = ctypes.create_string_buffer(self.info.key_size)
        while True:
            try:
                self._elem(MAP_GET_NEXT_KEY, key, nxt)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise BpfError(f"cannot list the keys of map {self.path}: {exc.strerror}") from None
            key = nxt.raw
            yield key

    def get(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self._value_len)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, value)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise BpfError(f"cannot read map {self.path}: {exc.strerror}") from None
        return value.raw

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value): in batches of BATCH where the kernel has batched lookups for the
        map's type (hash maps: one call per 4,096 keys instead of two per key), else key by key."""
        batched = self._batched_items()
        if batched is not None:
            yield from batched
            return
        for key in list(self.keys()):
            value = self.get(key)
            if value is not None:
                yield key, value

    def _batched_items(self) -> list[tuple[bytes, bytes]] | None:
        """None when the kernel has no batched lookup for this map (LPM tries, older kernels)."""
        ks, vs, count = self.info.key_size, self._value_len, BATCH
        token_in, token_out = ctypes.create_string_buffer(max(ks, 8)), ctypes.create_string_buffer(max(ks, 8))
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            keys, values = ctypes.create_string_buffer(ks * count), ctypes.create_string_buffer(vs * count)
            attr = ctypes.create_string_buffer(128)
            struct.pack_into("=QQQQIIQQ", attr, 0, 0 if first else ctypes.addressof(token_in),
                             ctypes.addressof(token_out), ctypes.addressof(keys), ctypes.addressof(values), count,
                             self.fd, 0, 0)
            done = False
            try:
                bpf(MAP_LOOKUP_BATCH, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    done = True
                elif exc.errno == errno.ENOSPC and count < 1 << 20:
                    count *= 4                  # a hash bucket holds more keys than a batch: larger batches
                    continue
                elif first and exc.errno in _NO_BATCH:
                    return None
                else:
                    raise BpfError(f"cannot read map {self.path}: {exc.strerror}") from None
            got = struct.unpack_from("=I", attr, 32)[0]
            raw_keys, raw_values = keys.raw, values.raw
            out += [(raw_keys[i * ks:(i + 1) * ks], raw_values[i * vs:(i + 1) * vs]) for i in range(got)]
            if done:
                return out
            ctypes.memmove(token_in, token_out, len(token_in))
            first = False


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


# --- Pins. ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pins:
    """What weft has pinned for one node: the maps directory of each layout, the programs
    directory of each build (names carry their digests)."""
    root: Path
    maps_dirs: tuple[str, ...]
    progs_dirs: tuple[str, ...]

    @property
    def exists(self) -> bool:
        return self.root.exists()


def read_pins(root: Path) -> Pins:
    try:
        names = sorted(p.name for p in root.iterdir())
    except FileNotFoundError:
        return Pins(root, (), ())
    return Pins(root, tuple(n for n in names if n.startswith("maps-")),
                tuple(n for n in names if n.startswith("progs-")))


def ipv4_addresses(runner: Runner) -> dict[str, tuple[str, ...]]:
    """Interface -> its IPv4 addresses, for every interface that has one but the loopback (where
    a node's own addresses are: the uplinks its node ports are reached by)."""
    found: dict[str, tuple[str, ...]] = {}
    for link in json.loads(runner.run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        name = link.get("ifname")
        addrs = tuple(a["local"] for a in link.get("addr_info", ()) if a.get("family") == "inet" and "local" in a)
        if isinstance(name, str) and name != "lo" and addrs:
            found[name] = addrs
    return found


def interfaces() -> dict[int, str]:
    """ifindex -> name in this thread's network namespace."""
    return dict(socket.if_nameindex())


def read_maps(maps_dir: Path) -> m.BpfMaps:
    """The reconciled policy maps of `maps_dir`, as the renderer's form. An endpoint entry whose
    ifindex names no interface here is returned as "ifindex:N" (nothing weft renders: a diff
    deletes it)."""
    if not maps_dir.exists():
        return m.EMPTY
    names = interfaces()
    tables: dict[str, dict] = {}
    for name in m.MAP_NAMES:
        with MapHandle(maps_dir / name) as handle:
            check_spec(name, handle)
            table = {}
            for key, value in handle.items():
                k = m.unpack_key(name, key)
                if name == "endpoints":
                    k = names.get(k, f"ifindex:{k}")
                table[k] = m.unpack_value(name, value)
            tables[name] = table
    return m.BpfMaps(**tables)


def check_spec(name: str, handle: MapHandle) -> None:
    spec = m.SPECS[name]
    info = handle.info
    if (info.kind, info.key_size, info.value_size) != (spec.kind, spec.key_size, spec.value_size):
        raise BpfError(f"pinned map {handle.path} is a {info.kind} of {info.key_size}/{info.value_size}-byte "
                       f"keys/values, weft expects a {spec.kind} of {spec.key_size}/{spec.value_size}")


@dataclass(frozen=True)
class Connection:
    ifindex: int
    proto: int
    source: tuple[str, int]                 # the side that opened the connection
    destination: tuple[str, int]
    origin: str                             # "egress", "ingress" or "host"
    digest: int
    age_ns: int
    flags: int


def read_conntrack(maps_dir: Path) -> list[Connection]:
    """weft's tracked connections (ports in host order; ICMP: the query identifier)."""
    out = []
    now = time.monotonic_ns()                 # bpf_ktime_get_ns() is CLOCK_MONOTONIC too
    with MapHandle(maps_dir / "conntrack") as handle:
        for key, value in handle.items():
            ifindex, a, b, pa, pb, proto = m.CT_KEY.unpack(key)
            seen, digest, _, _, origin, origin_is_a, flags = m.CT_VALUE.unpack(value)
            ends = [(socket.inet_ntoa(a), int.from_bytes(pa, "big")), (socket.inet_ntoa(b), int.from_bytes(pb, "big"))]
            if not origin_is_a:
                ends.reverse()
            out.append(Connection(ifindex, proto, ends[0], ends[1], ("egress", "ingress", "host")[min(origin, 2)],
                                  digest, max(now - seen, 0), flags))
    return out


@dataclass(frozen=True)
class Translation:
    """One direction of a connection to a service: packets from `source` to `destination` get
    `to` as their destination (forward, client -> service address) or as their source (reverse,
    backend -> client)."""
    proto: int
    source: tuple[str, int]
    destination: tuple[str, int]
    to: tuple[str, int]
    age_ns: int


def read_nat(maps_dir: Path) -> list[Translation]:
    out = []
    now = time.monotonic_ns()
    with MapHandle(maps_dir / "nat") as handle:
        for key, value in handle.items():
            saddr, daddr, sport, dport, proto = m.NAT_KEY.unpack(key)
            seen, addr, port, _kind = m.NAT.unpack(value)
            out.append(Translation(proto, (socket.inet_ntoa(saddr), int.from_bytes(sport, "big")),
                                   (socket.inet_ntoa(daddr), int.from_bytes(dport, "big")),
                                   (socket.inet_ntoa(addr), int.from_bytes(port, "big")), max(now - seen, 0)))
    return out


def read_counters(maps_dir: Path) -> dict[tuple[int, int], tuple[int, int]]:
    """(ifindex, rule id) -> (packets, bytes), summed over CPUs."""
    out = {}
    with MapHandle(maps_dir / "counters") as handle:
        step = (m.COUNT.size + 7) // 8 * 8
        for key, value in handle.items():
            ifindex, rule = m.COUNT_KEY.unpack(key)
            packets = sum(m.COUNT.unpack_from(value, i)[0] for i in range(0, len(value), step))
            size = sum(m.COUNT.unpack_from(value, i)[1] for i in range(0, len(value), step))
            out[(ifindex, rule)] = (packets, size)
    return out


# --- tc attachments. -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    iface: str
    hook: str                               # "ingress" / "egress"
    prog_id: int | None                     # the program weft's filter runs, None if no such filter
    clsact: bool


HOOKS = ("ingress", "egress")


def read_attachments(runner: Runner, ifaces: list[str]) -> dict[tuple[str, str], Attachment]:
    """weft's filter (priority FILTER_PREF) on both hooks of every interface, from one
    `tc -batch` (a process per interface would cost seconds on a node with a hundred pods)."""
    if not ifaces:
        return {}
    commands = [f"{what} show dev {iface}{hook}" for iface in ifaces
                for what, hook in (("qdisc", ""), ("filter", " ingress"), ("filter", " egress"))]
    try:
        out = runner.run(["tc", "-j", "-force", "-batch", "-"], "\n".join(commands) + "\n")
    except KernelCommandError as exc:
        out = exc.said if exc.said.lstrip().startswith("[") else ""
    answers: list[list[dict[str, Any]]] = []        # one JSON list of qdiscs or filters per command
    decoder, pos = json.JSONDecoder(), 0
    while len(answers) < len(commands):
        while pos < len(out) and out[pos].isspace():
            pos += 1
        if pos >= len(out):
            break
        value, pos = decoder.raw_decode(out, pos)
        answers.append(value)
    answers += [[]] * (len(commands) - len(answers))        # an interface gone meanwhile: nothing there
    result = {}
    for i, iface in enumerate(ifaces):
        qdiscs, *filters = answers[3 * i:3 * i + 3]
        clsact = any(q.get("kind") == "clsact" for q in qdiscs or [])
        for hook, found in zip(HOOKS, filters, strict=True):
            prog = None
            for f in found or []:
                options = f.get("options") or {}
                if clsact and f.get("pref") == FILTER_PREF and f.get("kind") == "bpf" and "prog" in options:
                    prog = options["prog"].get("id")
            result[(iface, hook)] = Attachment(iface, hook, prog, clsact)
    return result


def read_attachment(runner: Runner, iface: str, hook: str) -> Attachment:
    return read_attachments(runner, [iface])[(iface, hook)]
