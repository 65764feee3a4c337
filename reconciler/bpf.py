"""The eBPF data plane as a resource of the engine: programs, pinned policy maps, tc attachments.

On a node whose data plane is eBPF (`weft apply --dataplane ebpf`) the rendered node carries the
policy maps' contents (renderers.bpf_policy.render_bpf); on any other node it carries none, and
whatever weft left of an eBPF plane there is removed. So switching a node between planes is one
apply: the declared order puts this resource before the filter table, so switching to eBPF
attaches the programs (GROW) before the policy chains go, and switching back installs the chains
(GROW) before the programs are detached and unpinned (SHRINK). Both planes judge a packet in
between, never neither.

What it finds (the probe): the node's pin directory (reconciler.bpf_apply.node_pin_dir), whether
the programs of this build are pinned and use the pinned maps, the policy maps' contents
(probes.bpf.read_maps), the other interfaces with IPv4 addresses (uplinks), and which program
weft's tc filter runs on each hook of each of them. What it changes, each as one change of the
plan:

  programs   compiled and pinned (only when no programs of this build are: a second run
             compiles nothing)
  map        one per policy map: the keys written and deleted, each named in the plan by the
             policy and rule it comes from (only changed keys: a second run writes nothing)
  attach     weft's program on a hook of a weft interface (missing, or another program's), or
             the node-port programs on an uplink holding an address a node port is on
  detach     weft's program off a hook (the node left eBPF, or weft is destroyed; an uplink's
             when no node port is on its addresses any more)
  pins       a stale build's or layout's pins, or, leaving eBPF, the node's whole pin directory

Endpoint entries are written only for interfaces that exist here (no traffic can use the others);
every weft interface gets the programs, so one without an entry drops everything (fail closed,
as the iptables plane's dispatch drops an interface weft does not know).

The CNI plugin's step on such a node (reconciler.endpoint, at the end of this module): ADD writes
the new pod's entry and attaches the pinned programs before it returns, DEL deletes the entry
before the veth goes; nothing is compiled there.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weft.model import bpf as m
from weft.model.errors import WeftError
from weft.probes.bpf import (
    MapHandle,
    interfaces,
    ipv4_addresses,
    prog_info,
    read_attachments,
    read_maps,
    read_pins,
)
from weft.probes.runner import Runner
from weft.reconciler.bpf_apply import (
    DELETE_ORDER,
    HOOKS,
    WRITE_ORDER,
    BpfApplyError,
    MapWriter,
    build_for,
    compile_programs,
    diff_maps,
    drop_clsact,
    ensure_bpffs,
    forget_stale_udp,
    programs_current,
)
from weft.reconciler.bpf_apply import _key_text as key_text
from weft.reconciler.bpf_apply import _remove_tree as remove_tree
from weft.reconciler.resource import (
    Action,
    BpfWrite,
    DriftItem,
    Phase,
    ProbeSession,
    Problem,
    Resource,
    Step,
    digest,
)

TC_HOOKS = tuple(HOOKS)                 # ("ingress", "egress") of the host-side veth
# The uplink's programs (node ports), keyed as in BpfFound.programs.
_UPLINK_PROGRAMS = {"uplink/ingress": "from_up", "uplink/egress": "to_up"}


def program_for(iface: str, hook: str) -> str:
    """The key of BpfFound.programs (and the pinned program) weft runs on `hook` of `iface`: a
    pod's veth gets the policy programs, any other interface (an uplink) the node-port ones."""
    from weft.model.names import HOST_IFACE_PREFIX
    return hook if iface.startswith(HOST_IFACE_PREFIX) else f"uplink/{hook}"


def uplinks_for(want: m.BpfMaps, have: BpfFound) -> tuple[str, ...]:
    """The interfaces weft's node-port programs belong on: those holding an address some
    service key has (a node port on the node's address; cluster addresses are on no interface)."""
    addresses = {key.addr for key in want.services}
    return tuple(sorted(name for name, addrs in have.uplinks.items() if addresses & set(addrs)))
SHOWN_KEYS = 200                        # keys listed per map in a plan; the rest are counted


@dataclass(frozen=True)
class BpfFound:
    """The node's eBPF plane as found."""
    root: Path
    pinned: bool                                            # the pin directory exists
    current: bool                                           # this build's programs pinned, on the pinned maps
    maps: m.BpfMaps = m.EMPTY                               # the policy maps of this layout (EMPTY: none)
    maps_pinned: bool = False
    capacity: Mapping[str, int] = field(default_factory=dict)
    ifaces: tuple[str, ...] = ()                            # weft interfaces here
    attached: Mapping[tuple[str, str], int | None] = field(default_factory=dict)   # (iface, hook) -> program id
    programs: Mapping[str, int] = field(default_factory=dict)   # tc hook -> id of this build's pinned program
    stale: tuple[str, ...] = ()                             # pinned builds and layouts other than this one's
    uplinks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # other interfaces -> IPv4 addresses


@dataclass(frozen=True)
class BpfChange:
    kind: str                               # "programs", "map", "attach", "detach", "pins"
    action: Action
    target: str                             # progs dir, map name, "iface/hook", pinned path
    path: str                               # what the write acts on (map path, progs dir, pin path)
    writes: tuple[tuple[Any, Any], ...] = ()
    deletes: tuple[Any, ...] = ()
    lines: tuple[str, ...] = ()             # each key written or deleted, as text (policy and rule)


def weft_ifaces() -> tuple[str, ...]:
    from weft.model.names import HOST_IFACE_PREFIX
    return tuple(sorted(name for name in interfaces().values() if name.startswith(HOST_IFACE_PREFIX)))


def probe(root: Path, runner: Runner, look_at_hooks: bool) -> BpfFound:
    """What weft's eBPF plane is on this node (the calling thread's network namespace). Hooks
    are read (one `tc -batch`) when the pin directory exists or `look_at_hooks`."""
    pinned = root.exists()
    if not pinned and not look_at_hooks:       # nothing of weft's plane here: no tc process for nothing
        ifaces = weft_ifaces()
        return BpfFound(root, False, False, ifaces=ifaces,
                        attached={(iface, hook): None for iface in ifaces for hook in TC_HOOKS})
    build = build_for(root)
    maps_dir, progs_dir = build.maps_dir(root), build.progs_dir(root)
    # A compile killed half way leaves some of the layout's maps: not there until a compile makes the rest.
    complete = maps_dir.exists() and all((maps_dir / name).exists() for name in (*m.SPECS, "log"))
    current = pinned and complete and programs_current(build, root)
    maps, capacity = m.EMPTY, {}
    if complete:
        maps = read_maps(maps_dir)
        for name in m.MAP_NAMES:
            with MapHandle(maps_dir / name) as handle:
                capacity[name] = handle.info.max_entries
    programs = {hook: prog_info(progs_dir / prog).id for hook, prog in (*HOOKS.items(), *_UPLINK_PROGRAMS.items())
                } if current else {}
    ifaces = weft_ifaces()
    uplinks = {name: addrs for name, addrs in ipv4_addresses(runner).items() if name not in ifaces}
    attached = {key: a.prog_id for key, a in read_attachments(runner, [*ifaces, *sorted(uplinks)]).items()}
    pins = read_pins(root)
    stale = tuple(d for d in (*pins.maps_dirs, *pins.progs_dirs) if d not in (maps_dir.name, progs_dir.name))
    if pinned:                  # a compile killed before it renamed its staging directory (the run holds the lock)
        stale += tuple(sorted(p.name for p in root.iterdir() if p.name.startswith("staging-")))
    return BpfFound(root, pinned, current, maps, complete, capacity, ifaces, attached, programs, stale, uplinks)


class BpfPlane(Resource[Any, BpfChange]):
    """weft's eBPF data plane on this node (see the module docstring). `enabled`: the node's
    data plane is eBPF (its hooks are read even before anything is pinned)."""

    name = "bpf"

    def __init__(self, root: Path, enabled: bool) -> None:
        self.root = root
        self.pin_dir = str(root)
        self.enabled = enabled

    # -- reading -----------------------------------------------------------------------------

    def start_probe(self, session: ProbeSession) -> Callable[[], BpfFound]:
        return lambda: probe(self.root, session.runner, self.enabled)

    def want(self, node: Any) -> m.BpfMaps | None:
        return getattr(node, "bpf", None)

    def fingerprint(self, have: BpfFound) -> str:
        return digest(str(have.pinned), str(have.current), have.maps.fingerprint(),
                      repr(sorted(have.attached.items())), repr(sorted(have.programs.items())), *have.stale)

    # -- diffing -----------------------------------------------------------------------------

    def diff(self, want: m.BpfMaps | None, have: BpfFound, earlier: Mapping[str, tuple[Any, ...]]
             ) -> tuple[BpfChange, ...]:
        changes: list[BpfChange] = []
        root = self.root
        mine = [(key, prog) for key, prog in sorted(have.attached.items()) if prog is not None]
        if want is None:
            changes += [BpfChange("detach", Action.DELETE, f"{iface}/{hook}", str(root)) for (iface, hook), _ in mine]
            if have.pinned:
                changes.append(BpfChange("pins", Action.DELETE, str(root), str(root)))
            return tuple(changes)
        build = build_for(root)
        progs_dir, maps_dir = build.progs_dir(root), build.maps_dir(root)
        if not have.current:
            changes.append(BpfChange("programs", Action.CREATE, progs_dir.name, str(progs_dir)))
        present = set(have.ifaces)
        here = replace(want, endpoints={k: v for k, v in want.endpoints.items() if k in present})
        delta = diff_maps(here, have.maps)
        for name in WRITE_ORDER:
            writes = delta.writes.get(name) or {}
            deletes = delta.deletes.get(name) or []
            if not writes and not deletes:
                continue
            lines = []
            for key, value in writes.items():
                verb = "change" if key in have.maps.tables()[name] else "add"
                lines.append(f"{verb} {key_text(key)}: {want.about.get((name, key), _value_text(value))}")
            lines += [f"delete {key_text(key)}" for key in deletes]
            action = Action.UPDATE if have.maps_pinned else Action.CREATE
            changes.append(BpfChange("map", action, name, str(maps_dir / name), tuple(writes.items()),
                                     tuple(deletes), tuple(lines)))
        wanted_up = uplinks_for(want, have)
        for iface in (*have.ifaces, *sorted(have.uplinks)):
            for hook in TC_HOOKS:
                now = have.attached.get((iface, hook))
                if iface in have.uplinks and iface not in wanted_up:
                    if now is not None:         # no node port on its addresses (any more)
                        changes.append(BpfChange("detach", Action.DELETE, f"{iface}/{hook}", str(root)))
                    continue
                if have.current and now == have.programs.get(program_for(iface, hook)):
                    continue
                action = Action.CREATE if now is None else Action.UPDATE
                changes.append(BpfChange("attach", action, f"{iface}/{hook}", str(progs_dir)))
        changes += [BpfChange("pins", Action.DELETE, name, str(root / name)) for name in have.stale]
        return tuple(changes)

    def check(self, changes: tuple[BpfChange, ...]) -> None:
        """A map that would overflow is refused before anything is written (the probe knows the
        pinned maps' sizes; maps made by this run's compile are checked when written)."""

    # -- describing --------------------------------------------------------------------------

    def describe(self, change: BpfChange) -> list[str]:
        c = change
        if c.kind == "map":
            head = f"  # eBPF map {c.target} will be {c.action.verb}: {len(c.writes)} keys written, " \
                   f"{len(c.deletes)} deleted"
            shown = [f"  {'-' if line.startswith('delete') else '~'} {line}" for line in c.lines[:SHOWN_KEYS]]
            more = [f"  ... and {len(c.lines) - SHOWN_KEYS} more keys"] if len(c.lines) > SHOWN_KEYS else []
            return [head, *shown, *more, ""]
        text = {"programs": f"eBPF programs {c.target} (compiled and pinned)",
                "attach": f"eBPF program on {c.target}",
                "detach": f"eBPF program on {c.target}",
                "pins": f"eBPF pins {c.path}"}[c.kind]
        return [f"  # {text} will be {c.action.verb}", f"  {c.action.symbol} {c.kind} {c.target}", ""]

    def to_json(self, change: BpfChange) -> tuple[str, dict[str, Any]]:
        c = change
        item: dict[str, Any] = {"kind": c.kind, "action": c.action.value, "target": c.target, "path": c.path}
        if c.kind == "map":
            item |= {"written": len(c.writes), "deleted": len(c.deletes), "keys": list(c.lines[:SHOWN_KEYS])}
        return self.name, item

    def drift_items(self, change: BpfChange) -> list[DriftItem]:
        c = change
        if c.kind == "map":
            items = []
            for line in c.lines:
                verb, _, rest = line.partition(" ")
                problem = {"add": Problem.MISSING, "delete": Problem.UNEXPECTED}.get(verb, Problem.CHANGED)
                items.append({"kind": "bpf map", "name": f"{c.target} {rest.split(']', 1)[0]}]",
                              "problem": problem.value, "rule": rest.partition("]: ")[2]})
            return items
        if c.kind == "attach":
            problem = Problem.MISSING if c.action is Action.CREATE else Problem.CHANGED
            return [{"kind": "bpf program", "name": c.target, "problem": problem.value,
                     "rule": "weft's program is not attached" if c.action is Action.CREATE
                     else "another program than weft's pinned one is attached"}]
        if c.kind == "programs":
            return [{"kind": "bpf programs", "name": c.target, "problem": Problem.MISSING.value,
                     "rule": "this build's programs are not pinned"}]
        return [{"kind": f"bpf {c.kind}", "name": c.target, "problem": Problem.UNEXPECTED.value, "rule": c.path}]

    def counts(self, changes: tuple[BpfChange, ...]) -> list[Action]:
        return [c.action for c in changes]

    # -- writing -----------------------------------------------------------------------------

    def steps(self, changes: tuple[BpfChange, ...], phase: Phase) -> list[Step]:
        """GROW: compile, write keys (ports, verdicts, classifiers, then endpoints: nothing
        refers to a new id before it exists), attach. SHRINK: delete keys (the reverse), detach,
        unpin."""
        by_kind: dict[str, list[BpfChange]] = {}
        for c in changes:
            by_kind.setdefault(c.kind, []).append(c)
        maps = {c.target: c for c in by_kind.get("map", [])}
        if phase is Phase.GROW:
            steps = [Step(BpfWrite("compile", c.path), f"compile and pin {c.target}")
                     for c in by_kind.get("programs", [])]
            steps += [Step(BpfWrite("map", maps[n].path, writes=maps[n].writes), f"write {len(maps[n].writes)} keys "
                           f"of map {n}") for n in WRITE_ORDER if n in maps and maps[n].writes]
            for c in by_kind.get("attach", []):
                iface, hook = c.target.split("/")
                op = "attach" if program_for(iface, hook) == hook else "attach-uplink"
                steps.append(Step(BpfWrite(op, c.path, iface, hook), f"attach on {c.target}"))
            return steps
        if phase is Phase.SHRINK:
            steps = [Step(BpfWrite("map", maps[n].path, deletes=maps[n].deletes), f"delete {len(maps[n].deletes)} "
                          f"keys of map {n}") for n in DELETE_ORDER if n in maps and maps[n].deletes]
            for c in by_kind.get("detach", []):
                iface, hook = c.target.split("/")
                op = "detach" if program_for(iface, hook) == hook else "detach-uplink"
                steps.append(Step(BpfWrite(op, c.path, iface, hook), f"detach from {c.target}"))
            steps += [Step(BpfWrite("unpin", c.path), f"unpin {c.path}") for c in by_kind.get("pins", [])]
            return steps
        return []

    def write(self, write: BpfWrite, runner: Runner) -> None:
        """Run one checked eBPF write (reconciler.apply calls this)."""
        path = Path(write.path)
        if write.op == "compile":
            runner.writes.append(f"bpf compile {path.name}")
            ensure_bpffs(runner)
            build = build_for(self.root)
            if build.progs_dir(self.root) != path:
                raise BpfApplyError(f"the build to pin is {build.progs_dir(self.root)}, the plan said {path}")
            compile_programs(build, self.root)
        elif write.op == "map":
            runner.writes.append(f"bpf map {path.parent.name}/{path.name}: {len(write.writes)} written, "
                                 f"{len(write.deletes)} deleted")
            _write_map(path, write)
            if path.name in ("services", "backends"):
                forgotten = forget_stale_udp(path.parent)
                if forgotten:
                    runner.writes.append(f"bpf nat: {forgotten} UDP translations to removed backends forgotten")
        elif write.op in ("attach", "attach-uplink"):
            self._attach(write, runner)
        elif write.op in ("detach", "detach-uplink"):
            runner.run(["tc", "filter", "del", "dev", write.iface, write.hook, "pref", "49152"], writes=True)
            drop_clsact(runner, write.iface)
        elif write.op == "unpin":
            runner.writes.append(f"bpf unpin {path}")
            remove_tree(path)
            if path == self.root:
                try:
                    path.parent.rmdir()         # the last node's pins gone: weft's directory too
                except OSError:
                    pass
        else:
            raise BpfApplyError(f"unknown eBPF write {write.op!r}")

    def _attach(self, write: BpfWrite, runner: Runner) -> None:
        from weft.probes.bpf import FILTER_HANDLE, FILTER_PREF, read_attachment
        if not read_attachment(runner, write.iface, write.hook).clsact:
            runner.run(["tc", "qdisc", "replace", "dev", write.iface, "clsact"], writes=True)
        runner.run(["tc", "filter", "replace", "dev", write.iface, write.hook, "pref", str(FILTER_PREF), "handle",
                    FILTER_HANDLE, "bpf", "direct-action", "object-pinned",
                    str(Path(write.path) / (HOOKS[write.hook] if write.op == "attach"
                                            else _UPLINK_PROGRAMS[f"uplink/{write.hook}"]))], writes=True)

    # -- verifying ---------------------------------------------------------------------------

    def start_verify(self, have: BpfFound, changes: tuple[BpfChange, ...], session: ProbeSession
                     ) -> Callable[[], tuple[BpfChange, ...]]:
        def finish() -> tuple[BpfChange, ...]:
            now = probe(self.root, session.runner, True)
            left = []
            for c in changes:
                if c.kind == "programs" and not now.current:
                    left.append(c)
                elif c.kind == "map":
                    table = now.maps.tables()[c.target]
                    if any(table.get(k) != v for k, v in c.writes) or any(k in table for k in c.deletes):
                        left.append(c)
                elif c.kind == "attach":
                    iface, hook = c.target.split("/")
                    if now.attached.get((iface, hook)) != now.programs.get(program_for(iface, hook)):
                        left.append(c)
                elif c.kind == "detach":
                    iface, hook = c.target.split("/")
                    if now.attached.get((iface, hook)) is not None:
                        left.append(c)
                elif c.kind == "pins" and Path(c.path).exists():
                    left.append(c)
            return tuple(left)
        return finish


def _value_text(value: Any) -> str:
    return value.describe() if isinstance(value, m.Verdict) else repr(value)


def _write_map(path: Path, write: BpfWrite) -> None:
    """Write and delete the keys of one pinned policy map. Endpoints are keyed by interface name
    in the model and by ifindex in the kernel; one whose interface went away is skipped."""
    name = path.name
    index = {iface: i for i, iface in interfaces().items()} if name == "endpoints" else {}
    with MapWriter(path) as writer:
        if write.writes:
            size = sum(1 for _ in writer.keys())
            if size + len(write.writes) > writer.info.max_entries:
                new = sum(1 for k, _ in write.writes if writer.get(_raw_key(name, k, index) or b"") is None)
                if size + new > writer.info.max_entries:
                    raise BpfApplyError(f"the policy needs {size + new} entries in map {name!r}, which holds "
                                        f"{writer.info.max_entries}: fewer rules, or a larger map in "
                                        f"renderers/bpf/maps.h")
        for key, value in write.writes:
            raw = _raw_key(name, key, index)
            if raw is not None:
                writer.update(raw, m.pack_value(name, value))
        for key in write.deletes:
            raw = _raw_key(name, key, index)
            if raw is not None:
                writer.delete(raw)


def _raw_key(name: str, key: Any, index: Mapping[str, int]) -> bytes | None:
    if name != "endpoints":
        return m.pack_key(name, key)
    if key.startswith("ifindex:"):
        return m.pack_key(name, int(key.split(":", 1)[1]))
    return m.pack_key(name, index[key]) if key in index else None


# ---- the CNI plugin's step on an eBPF node -------------------------------------------------------

MAX_ID = (1 << 32) - 1


def endpoint_entry(snapshot: Mapping[str, Any] | None, pod: str) -> m.EndpointEntry:
    """The endpoint entry of `pod` ("namespace/name") from the CNI snapshot the last run left
    (store.snapshot.load_snapshot: checked there, but for its "bpf" part, checked here): the
    rendered one; for a pod the run did not know, closed in each direction where a policy of its
    namespace might select it ("closed", else "default"), open elsewhere. No snapshot, no eBPF
    part, or an entry that is not what weft writes: closed both ways until the next run (as the
    iptables plane does with a snapshot it cannot use)."""
    from weft.renderers.bpf_policy import CLOSED, OPEN
    shut = m.EndpointEntry(CLOSED, CLOSED)
    part = snapshot.get("bpf") if isinstance(snapshot, Mapping) else None
    endpoints = part.get("endpoints") if isinstance(part, Mapping) else None
    if snapshot is None or not isinstance(endpoints, Mapping):
        return shut
    known = endpoints.get(pod)
    if known is not None:
        try:
            egress, ingress = known
            if any(not isinstance(side, list) or len(side) != 4 for side in (egress, ingress)) or \
                    any(type(v) is not int or not 0 <= v <= MAX_ID for side in (egress, ingress) for v in side):
                return shut
        except (TypeError, ValueError):
            return shut
        return m.EndpointEntry(m.DirectionPolicy(*egress), m.DirectionPolicy(*ingress))
    namespace = pod.partition("/")[0]
    closed = snapshot.get("closed", {}).get(namespace, snapshot.get("default"))
    if not isinstance(closed, list) or len(closed) != 2:
        return shut
    return m.EndpointEntry(*(CLOSED if flag is not False else OPEN for flag in closed))


def pinned_build(root: Path):
    """The build whose programs are pinned at `root` and use the pinned maps of this weft's layout
    (None: none is). This build's first; else the one a run pinned (a run removes every other):
    the plugin may run in an interpreter that sees another bcc version than the run's (a digest
    input), and it only attaches what is pinned, it never compiles."""
    build = build_for(root)
    if programs_current(build, root):
        return build
    others = sorted(p.name for p in root.glob("progs-*")) if root.exists() else []
    for name in others:
        other = replace(build, digest=name.removeprefix("progs-"))
        if other.progs_dir(root) != build.progs_dir(root) and programs_current(other, root):
            return other
    return None


def ebpf_node(state_dir: Path | str) -> bool:
    """Is this node's data plane eBPF (a `weft apply --dataplane ebpf` pinned this build's programs
    for it)? What the CNI plugin asks before choosing the pod's policy step."""
    from weft.reconciler.bpf_apply import node_pin_dir
    root = node_pin_dir(state_dir)
    return root.exists() and pinned_build(root) is not None


def program_endpoint(state_dir: Path | str, iface: str, entry: m.EndpointEntry, runner: Runner | None = None
                     ) -> list[str]:
    """CNI ADD on an eBPF node, in the node's network namespace, once the pod's host-side veth
    exists: write endpoints[ifindex of `iface`] = `entry`, then attach the pinned programs on both
    tc hooks. Nothing is compiled: without this build's pinned programs (no `weft apply
    --dataplane ebpf` ran yet) it raises, and the ADD fails rather than wiring an unpoliced pod.
    Returns the hooks it attached. The next run finds exactly this (a no-op for the pod)."""
    from weft.model.names import HOST_IFACE_PREFIX
    from weft.reconciler.bpf_apply import attach, node_pin_dir
    runner = runner or Runner()
    if not iface.startswith(HOST_IFACE_PREFIX):
        raise WeftError(f"{iface!r} is not a weft interface")
    root = node_pin_dir(state_dir)
    build = pinned_build(root)
    if build is None:
        raise BpfApplyError(f"no eBPF programs on this weft's maps are pinned in {root}: `weft apply --dataplane ebpf` "
                            f"must run on this node before pods are added")
    index = _ifindex_when_there(iface)
    if index is None:
        raise WeftError(f"no interface {iface} here (waited {IFACE_WAIT:g} s for the plugin to wire it)")
    with MapWriter(build.maps_dir(root) / "endpoints") as writer:
        writer.update(m.pack_key("endpoints", index), m.pack_value("endpoints", entry))
    return attach(runner, [iface], build.progs_dir(root))


# How long an ADD's eBPF step waits for the pod's veth. The plugin wires an eBPF node's pod before
# its policy step; but an ADD that began on an iptables node runs the step while it wires, and if
# the node switched to eBPF meanwhile (the step decides under the node lock) the veth may not be
# there yet: the ADD waits for it rather than failing.
IFACE_WAIT = 5.0


def _ifindex_when_there(iface: str, timeout: float = IFACE_WAIT) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        index = {name: i for i, name in interfaces().items()}.get(iface)
        if index is not None or time.monotonic() >= deadline:
            return index
        time.sleep(0.02)


def forget_endpoint(state_dir: Path | str, iface: str) -> bool:
    """CNI DEL on an eBPF node, before the veth is removed: delete its endpoint entry (a later
    interface given the same ifindex must not inherit it). The filters go with the interface."""
    from weft.reconciler.bpf_apply import node_pin_dir
    root = node_pin_dir(state_dir)
    path = build_for(root).maps_dir(root) / "endpoints"
    index = {name: i for i, name in interfaces().items()}.get(iface)
    if index is None or not path.exists():
        return False
    with MapWriter(path) as writer:
        return writer.delete(m.pack_key("endpoints", index))


def endpoint_problems(state_dir: Path | str, iface: str, runner: Runner | None = None) -> list[str]:
    """CNI CHECK on an eBPF node: what is missing of the pod's entry and programs (empty: all there)."""
    from weft.reconciler.bpf_apply import node_pin_dir
    runner = runner or Runner()
    root = node_pin_dir(state_dir)
    build = pinned_build(root)
    if build is None:
        return [f"no eBPF programs on this weft's maps are pinned in {root}"]
    index = {name: i for i, name in interfaces().items()}.get(iface)
    if index is None:
        return [f"no interface {iface}"]
    problems = []
    with MapHandle(build.maps_dir(root) / "endpoints") as handle:
        if handle.get(m.pack_key("endpoints", index)) is None:
            problems.append(f"no endpoint entry for {iface} in the eBPF map endpoints")
    wanted = {hook: prog_info(build.progs_dir(root) / prog).id for hook, prog in HOOKS.items()}
    for (name, hook), found in read_attachments(runner, [iface]).items():
        if found.prog_id != wanted[hook]:
            problems.append(f"weft's eBPF program is not attached on {name} {hook}")
    return problems


__all__ = ["BpfChange", "BpfFound", "BpfPlane", "WeftError", "ebpf_node", "endpoint_entry", "endpoint_problems",
           "forget_endpoint", "probe", "program_endpoint"]
