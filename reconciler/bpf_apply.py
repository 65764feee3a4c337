"""Putting weft's eBPF data plane on a node: compile once, pin, attach, write only what changed.

Pins live in bpffs (mounted at /sys/fs/bpf if it is not), under a directory of the node's own,
because pins are machine-wide and several nodes (a lab, tests) can share one kernel:

  /sys/fs/bpf/weft/<node key>/        node key: a hash of the node's state directory
    maps-<layout>/   endpoints classifiers verdicts ports (the policy, reconciled key by key)
                     conntrack counters log (runtime state: tracked connections, rule counters,
                     Log events)
    progs-<build>/   from_wl to_wl (tc programs: a workload's egress and ingress)

<layout> is a digest of renderers/bpf/maps.h, <build> a digest of the sources, the build flags,
bcc's version and the kernel release. A run compiles only when no programs of its build are
pinned (or they no longer use the pinned maps), so a run with unchanged sources compiles
nothing; a new build keeps the maps (policy and tracked connections survive a program update)
unless their layout changed.

Order of a run, so that no packet meets a half-written policy that is more open than both the
old and the new one: new and changed port tables, verdicts, classifiers (nothing refers to new
ids yet), then endpoints (each switches at once to a complete profile), then deletions (what no
endpoint refers to any more); programs are attached to an interface after its entry exists.

Everything here acts on the calling thread's network namespace (the node's): weft runs there.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from weft.model import bpf as m
from weft.model.errors import WeftError
from weft.model.names import HOST_IFACE_PREFIX
from weft.probes.bpf import (
    FILTER_HANDLE,
    FILTER_PREF,
    PROGRAMS,
    MapHandle,
    bpf,
    interfaces,
    map_info,
    obj_get,
    prog_info,
    read_attachments,
    read_maps,
    read_pins,
)
from weft.probes.runner import KernelCommandError, Runner
from weft.reconciler.bpf_pins import BPFFS, PIN_ROOT, node_pin_dir  # noqa: F401  (re-exported)

OBJ_PIN = 6
HOOKS = {"ingress": "from_wl", "egress": "to_wl"}      # tc hook of the host-side veth -> program
# Order of writes and deletions (see the module docstring).
WRITE_ORDER = ("ports", "verdicts", "classifiers", "endpoints", "backends", "services")
DELETE_ORDER = ("services", "backends", "endpoints", "classifiers", "verdicts", "ports")


class BpfApplyError(WeftError):
    """The eBPF data plane could not be put in place; the message says what and why."""


def bpffs_mounted() -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(BPFFS) and " - bpf " in line for line in f)


def ensure_bpffs(runner: Runner) -> bool:
    """Mount bpffs at /sys/fs/bpf unless it is there; True if this call mounted it."""
    if bpffs_mounted():
        return False
    BPFFS.mkdir(parents=True, exist_ok=True)
    runner.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], writes=True)
    return True


# --- The build. ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Build:
    source: Path                    # the directory holding policy.c and maps.h
    layout: str
    digest: str
    cflags: tuple[str, ...]

    def maps_dir(self, root: Path) -> Path:
        return root / f"maps-{self.layout}"

    def progs_dir(self, root: Path) -> Path:
        return root / f"progs-{self.digest}"


def build_for(root: Path, cflags: tuple[str, ...] = ()) -> Build:
    """The build of weft's programs for the node pinned at `root`, with extra compiler flags."""
    source = Path(str(resources.files("weft.renderers") / "bpf"))
    maps_h = (source / "maps.h").read_bytes()
    policy_c = (source / "policy.c").read_bytes()
    layout = hashlib.sha256(maps_h).hexdigest()[:16]
    defines = (f'-DWEFT_MAPS="{root / f"maps-{layout}"}"', *cflags)
    h = hashlib.sha256()
    for part in (maps_h, policy_c, "\0".join(defines).encode(), _bcc_version().encode(), os.uname().release.encode()):
        h.update(hashlib.sha256(part).digest())
    return Build(source, layout, h.hexdigest()[:16], (*defines, f"-I{source}"))


def _bcc_version() -> str:
    try:
        from importlib.metadata import version
        return version("bcc")
    except Exception:                       # Debian's python3-bpfcc ships no metadata
        return "python3-bpfcc"


def programs_current(build: Build, root: Path) -> bool:
    """Are this build's programs pinned, using only maps pinned in its layout's directory? (Maps
    removed by hand and made again would leave the programs on the old ones.)"""
    progs, maps = build.progs_dir(root), build.maps_dir(root)
    try:
        pinned = set()
        for path in maps.iterdir():
            fd = obj_get(path)
            try:
                pinned.add(map_info(fd).id)
            finally:
                os.close(fd)
        return all(set(prog_info(progs / p).map_ids) <= pinned for p in PROGRAMS)
    except (WeftError, OSError):
        return False


def compile_programs(build: Build, root: Path) -> None:
    """Compile with bcc, which creates and pins the maps missing from the layout's directory,
    and pin the programs in this build's directory (in a temporary one first, renamed whole)."""
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BpfApplyError(f"the eBPF data plane needs bcc (Debian's python3-bpfcc) importable: {exc}") from None
    build.maps_dir(root).mkdir(parents=True, exist_ok=True)
    target = build.progs_dir(root)
    staging = target.with_name(f"staging-{os.getpid()}")       # bpffs refuses dots in names
    _remove_tree(staging)
    try:
        loaded = BPF(src_file=str(build.source / "policy.c").encode(), cflags=list(build.cflags))
    except Exception as exc:                # bcc raises bare Exceptions
        raise BpfApplyError(f"bcc could not compile {build.source / 'policy.c'}: {exc} (kernel headers: "
                            f"/lib/modules/{os.uname().release}/build, see playbooks/setup.sh)") from None
    try:
        staging.mkdir(parents=True)
        for name in PROGRAMS:
            try:
                fn = loaded.load_func(f"weft_{name}".encode(), BPF.SCHED_CLS)
            except Exception as exc:
                raise BpfApplyError(f"the kernel refused program weft_{name}: {exc}") from None
            _pin(fn.fd, staging / name)
        _remove_tree(target)
        os.rename(staging, target)
    finally:
        loaded.cleanup()
        _remove_tree(staging)


def _pin(fd: int, path: Path) -> None:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), fd)
    try:
        bpf(OBJ_PIN, attr)
    except OSError as exc:
        raise BpfApplyError(f"cannot pin {path}: {exc.strerror}") from None


def _remove_tree(path: Path) -> None:
    """Unpin everything under `path` (bpffs has no recursive removal of its own)."""
    if not path.exists():
        return
    if path.is_dir():
        for child in path.iterdir():
            _remove_tree(child)
        path.rmdir()
    else:
        path.unlink()


# --- Writing maps. ----------------------------------------------------------------------------------

class MapWriter(MapHandle):
    """A pinned map opened for writing."""

    def __init__(self, path: Path):
        super().__init__(path, flags=0)

    def update(self, key: bytes, value: bytes) -> None:
        buf = ctypes.create_string_buffer(value, len(value))
        try:
            self._elem(2, key, buf)             # BPF_MAP_UPDATE_ELEM, BPF_ANY
        except OSError as exc:
            raise BpfApplyError(f"cannot write map {self.path}: {exc.strerror}") from None

    def delete(self, key: bytes) -> bool:
        try:
            self._elem(3, key, None)            # BPF_MAP_DELETE_ELEM
            return True
        except OSError as exc:
            if exc.errno == 2:
                return False
            raise BpfApplyError(f"cannot delete from map {self.path}: {exc.strerror}") from None


@dataclass
class MapChanges:
    """The key-by-key difference between two BpfMaps: what a run writes and deletes."""
    writes: dict[str, dict] = field(default_factory=dict)     # map -> key -> new value
    deletes: dict[str, list] = field(default_factory=dict)    # map -> keys

    @property
    def empty(self) -> bool:
        return not any(self.writes.values()) and not any(self.deletes.values())

    def counts(self) -> dict[str, tuple[int, int]]:
        return {name: (len(self.writes.get(name, {})), len(self.deletes.get(name, []))) for name in m.MAP_NAMES}


def diff_maps(desired: m.BpfMaps, current: m.BpfMaps) -> MapChanges:
    changes = MapChanges()
    have = current.tables()
    for name, table in desired.tables().items():
        now = have[name]
        changes.writes[name] = {k: v for k, v in table.items() if now.get(k) != v}
        changes.deletes[name] = [k for k in now if k not in table]
    return changes


def check_capacity(desired: m.BpfMaps, capacity: dict[str, int]) -> None:
    """Refuse, before writing anything, a policy that does not fit the maps (max_entries)."""
    for name, table in desired.tables().items():
        if len(table) > capacity[name]:
            raise BpfApplyError(f"the policy needs {len(table)} entries in map {name!r}, which holds "
                                f"{capacity[name]}: nothing was written (fewer rules, or a larger map in "
                                f"renderers/bpf/maps.h)")


def describe_changes(changes: MapChanges, desired: m.BpfMaps, current: m.BpfMaps) -> list[str]:
    """One readable line per key a run writes or deletes, saying what the key means (the policy
    and rule behind it), for plan and drift output."""
    lines = []
    for name in WRITE_ORDER:
        for key, value in (changes.writes.get(name) or {}).items():
            verb = "change" if key in current.tables()[name] else "add"
            lines.append(f"{verb} {name} {_key_text(key)}: {desired.about.get((name, key), repr(value))}")
    for name in DELETE_ORDER:
        for key in changes.deletes.get(name) or []:
            lines.append(f"delete {name} {_key_text(key)}")
    return lines


def _key_text(key) -> str:
    if isinstance(key, m.ClassifierKey):
        return f"[classifier {key.classifier:08x} {key.net}]"
    if isinstance(key, m.VerdictKey):
        proto = "any" if key.proto is None else m.PROTOCOL_NAMES.get(key.proto, str(key.proto))
        return f"[profile {key.profile:08x} {key.src_class:08x} -> {key.dst_class:08x} {proto}]"
    if isinstance(key, m.PortKey):
        return f"[table {key.table:08x} {key.port}/{key.prefixlen}]"
    if isinstance(key, m.ServiceKey):
        return f"[service {key.addr}:{key.port} {m.PROTOCOL_NAMES.get(key.proto, key.proto)}]"
    if isinstance(key, m.BackendKey):
        return f"[backend {key.id:08x} #{key.index}]"
    return f"[{key}]"


def write_maps(maps_dir: Path, changes: MapChanges, ifindex: dict[str, int]) -> list[str]:
    """Apply `changes` in the safe order; endpoints whose interface does not exist here are not
    written (no traffic can use them) and are returned."""
    missing = []
    for name in WRITE_ORDER:
        entries = changes.writes.get(name) or {}
        if not entries:
            continue
        with MapWriter(maps_dir / name) as writer:
            for key, value in entries.items():
                if name == "endpoints":
                    if key not in ifindex:
                        missing.append(key)
                        continue
                    raw_key = m.pack_key(name, ifindex[key])
                else:
                    raw_key = m.pack_key(name, key)
                writer.update(raw_key, m.pack_value(name, value))
    for name in DELETE_ORDER:
        keys = changes.deletes.get(name) or []
        if not keys:
            continue
        with MapWriter(maps_dir / name) as writer:
            for key in keys:
                if name == "endpoints":
                    index = int(key.split(":", 1)[1]) if key.startswith("ifindex:") else ifindex.get(key)
                    if index is None:
                        continue
                    writer.delete(m.pack_key(name, index))
                else:
                    writer.delete(m.pack_key(name, key))
    return missing


def forget_stale_udp(maps_dir: Path) -> int:
    """Delete, both ways, the UDP translations whose backend its service no longer has in the
    pinned maps (or whose service is gone); return how many connections that was. UDP has no
    opening packet, so without this a client port that sent to a removed backend would keep
    sending to it; kube-proxy clears UDP conntrack entries of removed endpoints alike. TCP keeps
    its backend until the connection closes (a terminating backend finishes what it serves).

    A forward translation (client -> service, sent to a backend) is known by its reply entry
    (backend -> client, given the service address back); replies, hairpin and node-port SNAT
    entries are left alone."""
    maps = read_maps(maps_dir)
    backends = {key: {(b.addr, b.port) for i in range(entry.count)
                      if (b := maps.backends.get(m.BackendKey(entry.id, i))) is not None}
                for key, entry in maps.services.items()}
    with MapHandle(maps_dir / "nat") as handle:
        entries = dict(handle.items())
    stale = []
    for raw_key, raw_value in entries.items():
        saddr, daddr, sport, dport, proto = m.NAT_KEY.unpack(raw_key)
        _seen, addr, port, kind = m.NAT.unpack(raw_value)
        if proto != socket.IPPROTO_UDP or kind != 0:
            continue
        reply_key = m.NAT_KEY.pack(addr, saddr, port, sport, proto)
        reply = entries.get(reply_key)
        if reply is None or m.NAT.unpack(reply)[1:3] != (daddr, dport):
            continue                            # not a forward translation
        service = m.ServiceKey(socket.inet_ntoa(daddr), int.from_bytes(dport, "big"), proto)
        if (socket.inet_ntoa(addr), int.from_bytes(port, "big")) not in backends.get(service, ()):
            stale += [raw_key, reply_key]
    if stale:
        with MapWriter(maps_dir / "nat") as writer:
            for raw_key in stale:
                writer.delete(raw_key)
    return len(stale) // 2


def clear_map(path: Path) -> int:
    """Delete every key of a pinned map (e.g. forget every tracked connection)."""
    with MapWriter(path) as writer:
        return sum(writer.delete(key) for key in list(writer.keys()))


# --- Attaching. ---------------------------------------------------------------------------------------

def attach(runner: Runner, ifaces: list[str], progs_dir: Path) -> list[str]:
    """weft's programs on both tc hooks of each interface (replacing an older build's); returns
    the hooks it changed ("iface/hook"). Reads what is attached with one tc process."""
    changed = []
    wanted = {hook: prog_info(progs_dir / prog).id for hook, prog in HOOKS.items()}
    current = read_attachments(runner, ifaces)
    for iface in ifaces:
        if not any(current[(iface, hook)].clsact for hook in HOOKS):
            runner.run(["tc", "qdisc", "add", "dev", iface, "clsact"], writes=True)
        for hook, prog in HOOKS.items():
            if current[(iface, hook)].prog_id == wanted[hook]:
                continue
            runner.run(["tc", "filter", "replace", "dev", iface, hook, "pref", str(FILTER_PREF), "handle",
                        FILTER_HANDLE, "bpf", "direct-action", "object-pinned", str(progs_dir / prog)], writes=True)
            changed.append(f"{iface}/{hook}")
    return changed


def detach(runner: Runner, ifaces: list[str], ours: set[int] | None = None) -> list[str]:
    """Remove weft's filters from the interfaces (with `ours`, only those running one of these
    program ids), and the clsact qdisc of each if nothing else is left on it."""
    removed = []
    current = read_attachments(runner, ifaces)
    for iface in ifaces:
        mine = [hook for hook in HOOKS if current[(iface, hook)].prog_id is not None
                and (ours is None or current[(iface, hook)].prog_id in ours)]
        for hook in mine:
            runner.run(["tc", "filter", "del", "dev", iface, hook, "pref", str(FILTER_PREF)], writes=True)
            removed.append(f"{iface}/{hook}")
        if mine:
            drop_clsact(runner, iface)
    return removed


def drop_clsact(runner: Runner, iface: str) -> None:
    """The clsact qdisc goes too once no filter is left on either hook (weft added it)."""
    try:
        left = [runner.run(["tc", "filter", "show", "dev", iface, hook]).strip() for hook in HOOKS]
        if not any(left):
            runner.run(["tc", "qdisc", "del", "dev", iface, "clsact"], writes=True)
    except KernelCommandError:
        pass                                    # the interface went away meanwhile


def weft_interfaces() -> list[str]:
    return sorted(name for name in interfaces().values() if name.startswith(HOST_IFACE_PREFIX))


# --- A run. ---------------------------------------------------------------------------------------------

@dataclass
class BpfApplyReport:
    compiled: bool = False
    mounted: bool = False
    changes: dict[str, tuple[int, int]] = field(default_factory=dict)   # map -> (keys written, deleted)
    attached: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)                     # endpoints without an interface here
    removed: list[str] = field(default_factory=list)                     # stale pins

    @property
    def keys_written(self) -> int:
        return sum(w + d for w, d in self.changes.values())


def apply_bpf(desired: m.BpfMaps, root: Path, runner: Runner | None = None,
              cflags: tuple[str, ...] = ()) -> BpfApplyReport:
    """Make the node's eBPF data plane `desired`: programs (compiled only if needed), maps (only
    changed keys), attachments (only where missing or stale)."""
    runner = runner or Runner()
    report = BpfApplyReport()
    report.mounted = ensure_bpffs(runner)
    build = build_for(root, cflags)
    if not programs_current(build, root):
        compile_programs(build, root)
        report.compiled = True
    maps_dir, progs_dir = build.maps_dir(root), build.progs_dir(root)
    names = interfaces()
    ifindex = {name: index for index, name in names.items()}
    capacity = {}
    for name in m.MAP_NAMES:
        with MapHandle(maps_dir / name) as handle:
            capacity[name] = handle.info.max_entries
    check_capacity(desired, capacity)
    changes = diff_maps(desired, read_maps(maps_dir))
    report.missing = write_maps(maps_dir, changes, ifindex)
    for key in report.missing:                  # not written: no interface to key them by
        del changes.writes["endpoints"][key]
    report.changes = changes.counts()
    report.attached = attach(runner, sorted(i for i in desired.endpoints if i in ifindex), progs_dir)
    pins = read_pins(root)
    for stale in (*pins.progs_dirs, *pins.maps_dirs):
        if stale not in (progs_dir.name, maps_dir.name):
            _remove_tree(root / stale)
            report.removed.append(stale)
    return report


def destroy_bpf(root: Path, runner: Runner | None = None) -> list[str]:
    """Detach weft's programs from every weft interface here, and this node's node-port programs
    from its uplinks, and remove the node's pins."""
    runner = runner or Runner()
    removed = detach(runner, weft_interfaces())
    removed += detach_uplinks(runner, root)
    return removed + remove_pins(root)


def detach_uplinks(runner: Runner, root: Path) -> list[str]:
    """Remove weft's filter from the hooks of interfaces other than pods' where it runs one of
    the programs pinned under `root` (any build): another node's or tool's filters stay."""
    ours = set()
    if root.exists():
        for build in root.iterdir():
            if build.name.startswith("progs-") and build.is_dir():
                for pin in build.iterdir():
                    try:
                        ours.add(prog_info(pin).id)
                    except (WeftError, OSError):
                        continue
    others = sorted(name for name in interfaces().values() if not name.startswith(HOST_IFACE_PREFIX))
    if not ours or not others:
        return []
    return detach(runner, others, ours)


def remove_pins(root: Path) -> list[str]:
    """Remove a node's pin directory (programs and maps), and weft's directory once it is the
    last; attachments are left alone (a namespace's go with its interfaces)."""
    removed = []
    if root.exists():
        _remove_tree(root)
        removed.append(str(root))
    try:
        PIN_ROOT.rmdir()                        # the last node's pins gone: weft's directory too
    except OSError:
        pass
    return removed

