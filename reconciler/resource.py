"""The resource engine's protocol: one interface for every kind of state weft owns on a node.

A resource is one kind of kernel or daemon state (IP sets, one iptables table, routes, interface
settings, BIRD's configuration). Like Felix's per-subsystem managers, each is given the full
desired set and the state it finds, and answers the same questions:

  probe      read what is there (started early, finished later: dumps overlap other work)
  want       its part of the rendered node state
  diff       desired vs found, key by key -> its own change objects (pure)
  describe   each change as plan text and as JSON
  steps      the writes that make its changes, per phase (data: checked before any runs)
  verify     read back only what its changes touched -> what still differs
  drift      each change phrased from the kernel's side

The engine (reconciler.engine) runs them in one declared order; it never looks inside a change.

Phases order the writes of all resources together:
  PREPARE  (declared order)  what must let go of something before it changes (a chain emptied
           before the set it refers to is replaced);
  GROW     (declared order)  sets that grow before the tables that use them, tables before the
           routes and interface settings of the pods they protect;
  SHRINK   (reverse order)   what goes, after everything that used it changed.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from weft.model.names import ROUTE_PROTOCOL
from weft.probes.runner import Pending, Runner

if TYPE_CHECKING:
    from weft.reconciler.rendered import RenderedNode


class Action(StrEnum):
    """What a change does to one object (a set, a chain, a route, BIRD's file)."""
    CREATE = "create"
    UPDATE = "update"            # in place (members, rules, settings)
    REPLACE = "replace"          # destroyed and made again (a set of the wrong type)
    DELETE = "delete"
    RELOAD = "reload"            # nothing to write: a daemon loads what is there

    @property
    def symbol(self) -> str:
        return {"create": "+", "delete": "-", "update": "~", "replace": "-/+", "reload": "~"}[self.value]

    @property
    def verb(self) -> str:
        return {"create": "created", "delete": "destroyed", "update": "updated in-place", "replace": "replaced",
                "reload": "reloaded"}[self.value]

    @property
    def counted_as(self) -> str:
        """Its column in a plan's summary: add / change / destroy."""
        return {"create": "add", "delete": "destroy"}.get(self.value, "change")


class Phase(Enum):
    PREPARE = "prepare"
    GROW = "grow"
    SHRINK = "shrink"


class Problem(StrEnum):
    """How drift names what it found (some problems add details: "is 0, want 1")."""
    MISSING = "missing"
    UNEXPECTED = "unexpected"
    CHANGED = "changed"
    NOT_FIRST = "not first in chain"
    NOT_LOADED = "not loaded by BIRD"


DriftItem = dict[str, str]


# ---- writes: what apply does, as data the guard checks before anything runs ------------------

@dataclass(frozen=True)
class Restore:
    """Input for a kernel tool's restore command (iptables-restore, ipset restore)."""
    argv: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class RouteWrite:
    """A route weft owns (its route protocol), replaced or deleted through netlink."""
    delete: bool
    dst: str
    dev: str | None = None          # None for a blackhole or a deletion
    type: str = "unicast"
    proto: int = ROUTE_PROTOCOL


@dataclass(frozen=True)
class SysctlWrite:
    """One setting of a pod's host-side interface: /proc/sys/<key>."""
    key: str                        # "net/ipv4/conf/<iface>/rp_filter"
    value: str


@dataclass(frozen=True)
class BirdWrite:
    """BIRD's configuration file in the state dir (checked, then renamed over the live one), then
    `birdc configure` when BIRD runs."""
    name: str                       # the file's name in the state dir
    text: str | None                # None: the file is current, BIRD only loads it
    socket: str
    old: str | None                 # the live file's text, put back if BIRD refuses to load the new one


@dataclass(frozen=True)
class BpfWrite:
    """A change to weft's eBPF data plane (reconciler.bpf runs it), always under the node's pin
    directory (the guard checks `path`):

      compile  build the programs, pin them at `path` (progs-<build>) with their maps
      map      write `writes` and delete `deletes` in the pinned map `path`
      attach   the programs pinned at `path` on tc hook `hook` of interface `iface`
      detach   weft's program from tc hook `hook` of interface `iface` (`path`: the pin dir)
      unpin    remove the pins at `path` (a stale build or layout, or the whole pin dir)
    """
    op: str
    path: str
    iface: str = ""
    hook: str = ""
    writes: tuple[tuple[Any, Any], ...] = ()
    deletes: tuple[Any, ...] = ()


Write = Restore | RouteWrite | SysctlWrite | BirdWrite | BpfWrite


@dataclass(frozen=True)
class Step:
    """One write in the order apply runs them.

    `undo`: what takes this step back if a later `commits` step fails (an ipset restore's
    inverse, when the iptables transaction that was to use the new members is refused).
    `commits`: this step's failure undoes the earlier steps that have an undo; its success
    makes them final.
    """
    write: Write
    what: str                       # for messages: "ipset restore (new and changed sets)"
    undo: Write | None = None
    commits: bool = False


# ---- probing ----------------------------------------------------------------------------------

class ProbeSession:
    """Starts each read once: resources that need the same dump (routes and interface settings
    both read `ip -j link show`) share one process."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._started: dict[tuple[str, ...], Pending] = {}

    def start(self, argv: Sequence[str]) -> Pending:
        key = tuple(argv)
        if key not in self._started:
            self._started[key] = self.runner.start(list(key))
        return self._started[key]


S = TypeVar("S")        # what a resource finds (and wants): its part of the node's state
C = TypeVar("C")        # its change objects


class Resource(ABC, Generic[S, C]):
    """One kind of state weft owns on a node. See the module docstring for the protocol."""

    name: str                       # "ipsets", "filter", "filter@legacy", "routes", "links", "bird"

    @abstractmethod
    def start_probe(self, session: ProbeSession) -> Callable[[], S]:
        """Start reading what is there; call the result to have it."""

    @abstractmethod
    def want(self, node: RenderedNode) -> S:
        """Its part of the rendered node state."""

    @abstractmethod
    def diff(self, want: S, have: S, earlier: Mapping[str, tuple[Any, ...]]) -> tuple[C, ...]:
        """The changes that make `have` into `want`. Pure. `earlier`: the changes of the resources
        before this one in the declared order, by name."""

    @abstractmethod
    def describe(self, change: C) -> list[str]:
        """The change as a block of plan text."""

    @abstractmethod
    def to_json(self, change: C) -> tuple[str, dict[str, Any]]:
        """(section of the plan's "changes", the change as JSON)."""

    @abstractmethod
    def steps(self, changes: tuple[C, ...], phase: Phase) -> list[Step]:
        """The writes of `changes` that belong to `phase`."""

    @abstractmethod
    def start_verify(self, have: S, changes: tuple[C, ...], session: ProbeSession) -> Callable[[], tuple[C, ...]]:
        """Start reading back what `changes` touched; call the result for what still differs
        (empty when every change landed). Nothing else is judged: a pod the CNI plugin wired
        meanwhile is not this run's business."""

    @abstractmethod
    def drift_items(self, change: C) -> list[DriftItem]:
        """The change phrased from the kernel's side, item by item."""

    def sections(self) -> tuple[str, ...]:
        """The plan sections its changes go to (present, maybe empty, in every plan)."""
        return (self.name,)

    def fingerprint(self, have: S) -> str:
        """Identifies what was found (a saved plan holds them all); never a digest of a secret."""
        return ""

    def check(self, changes: tuple[C, ...]) -> None:
        """Raise WeftError when a daemon would refuse these changes (called when planning, so a
        refused change stops the run before anything is written)."""

    def start_confirm(self, have: S, session: ProbeSession) -> Callable[[], bool]:
        """After the node lock is taken: is a read made before it still true? Only writers under
        the exclusive lock (other runs, which the engine detects) and the CNI plugin's per-pod
        steps under the shared lock write weft's state; a resource the latter touch re-reads what
        they change. Routes and interfaces change without any lock (the plugin wires pods at any
        time): a read of them is as good before the lock as after."""
        return lambda: True

    def settle(self, have: S) -> None:
        """After a successful apply: record what a later run needs to judge what it finds
        (BIRD's reconfiguration time). Never a kernel write."""

    def counts(self, changes: tuple[C, ...]) -> list[Action]:
        return [change.action for change in changes]  # type: ignore[attr-defined]


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()
