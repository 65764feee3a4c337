"""The resource engine: plan, apply, verify and drift over a node's resources, in one order.

The declared order (reconciler.resource explains the phases):

  ipsets            sets that grow come first (GROW), sets that go come last (SHRINK)
  bpf               the eBPF plane: programs attached before the chains they replace change,
                    detached after the chains that replace them are in (reconciler.bpf)
  filter, filter6   the run's own backend's table per IP family (iptables, ip6tables): one
                    transaction each, which commits the sets' step
  filter@<other>, filter6@<other>   weft's leftovers in the other backend: removed
  nat, nat6         natOutgoing's chain and hook (renderers.natoutgoing)
  mangle, mangle6   preDNAT policies' chains and hook (renderers.calico.host_prednat_chains)
  raw, raw6         doNotTrack policies' chains and hooks (renderers.calico.host_untracked_chains)
  nat@<other>, ..., raw6@<other>   weft's leftovers in those tables of the other backend: removed
  routes            a pod becomes reachable only once its rules are in place
  links             the settings of pods' interfaces
  bird              BIRD's configuration (where BGP is on)

The engine knows nothing of what a change is: each resource diffs, describes, writes, verifies
and phrases drift for its own. One plan document (reconciler.plan), one apply path
(reconciler.apply: every write checked by the guard first).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from weft.model.kernel import EMPTY, Dataplane
from weft.probes.backend import Backend, detect, has_ipv6, other_weft_tables
from weft.probes.runner import Runner
from weft.reconciler import guard
from weft.reconciler.apply import Executor
from weft.reconciler.bird import Bird
from weft.reconciler.bpf import BpfPlane
from weft.reconciler.ipsets import IpSets
from weft.reconciler.links import InterfaceSettings
from weft.reconciler.rendered import RenderedNode
from weft.reconciler.resource import Action, DriftItem, Phase, ProbeSession, Resource, Restore, Step, digest
from weft.reconciler.routes import Routes
from weft.reconciler.tables import Table
from weft.renderers.rules import FAMILY_TABLES

AnyResource = Resource[Any, Any]
Changes = dict[str, tuple[Any, ...]]


def kernel_resources(runner: Runner, backend_preference: str = "auto",
                     bpf: BpfPlane | None = None) -> tuple[Backend, list[AnyResource]]:
    """The node's kernel resources in the declared order, for the backend this run uses (weft's
    chains left in the other backend are a table resource too, to be removed). `bpf`: the node's
    eBPF plane (present whatever the node's plane: leaving eBPF removes it)."""
    backend = detect(runner, backend_preference)
    families = (4, 6) if has_ipv6() else (4,)
    tables: list[AnyResource] = [Table(FAMILY_TABLES[f], backend, main=True) for f in families]
    leftovers = [(family, *other_weft_tables(runner, backend, family)) for family in families]
    for family, other, found in leftovers:
        if "filter" in found:
            tables.append(Table(f"{FAMILY_TABLES[family]}@{other.name}", other, main=False))
    for family in families:                                   # natOutgoing, preDNAT (renderers.natoutgoing,
        for table in ("nat", "mangle", "raw"):                # renderers.calico)
            tables.append(Table(f"{table}{'6' if family == 6 else ''}", backend, main=False))
    for family, other, found in leftovers:                    # weft's nat/mangle/raw left in the other backend
        tables += [Table(f"{t}{'6' if family == 6 else ''}@{other.name}", other, main=False) for t in found
                   if t != "filter"]
    return backend, [IpSets(), *([bpf] if bpf is not None else []), *tables, Routes(), InterfaceSettings()]


@dataclass
class Found:
    """What each resource found, by name, and its fingerprint (made where the dumps are parsed:
    in the caller's worker, while the desired state is read)."""
    have: dict[str, Any]
    prints: dict[str, str]


def start_probe(resources: Sequence[AnyResource], runner: Runner) -> Callable[[], Found]:
    """Start every resource's reads at once; call the result for what each found."""
    session = ProbeSession(runner)
    pending = [(r, r.start_probe(session)) for r in resources]

    def finish() -> Found:
        have = {r.name: done() for r, done in pending}
        return Found(have, {r.name: r.fingerprint(have[r.name]) for r, _ in pending})
    return finish


def start_confirm(resources: Sequence[AnyResource], have: dict[str, Any], runner: Runner) -> Callable[[], bool]:
    """Start checking that what was read before the node lock was taken is still true (see
    Resource.start_confirm); call the result for the answer."""
    session = ProbeSession(runner)
    checks = [r.start_confirm(have[r.name], session) for r in resources]
    return lambda: all([check() for check in checks])


@dataclass
class Planned:
    """What the resources found, and the changes that make it what the node should have."""
    resources: list[AnyResource]
    backend: Backend
    have: dict[str, Any]
    changes: Changes
    prints: dict[str, str] = field(default_factory=dict)     # fingerprints already made, by resource

    @property
    def empty(self) -> bool:
        return not any(self.changes.values())

    def fingerprint(self) -> str:
        """Identifies the found state (what a saved plan was made against)."""
        prints = [self.prints[r.name] if r.name in self.prints else r.fingerprint(self.have[r.name])
                  for r in self.resources]
        return digest(*(f"{r.name}:{p}" for r, p in zip(self.resources, prints, strict=True)))

    def summary(self) -> dict[str, int]:
        counts = {"add": 0, "change": 0, "destroy": 0}
        for r in self.resources:
            for action in r.counts(self.changes[r.name]):
                counts[action.counted_as] += 1
        return counts

    def sections(self) -> dict[str, list[dict[str, Any]]]:
        """The changes as JSON, by plan section ("ipsets", "chains", "hooks", "routes", ...)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.resources:
            for section in r.sections():
                out.setdefault(section, [])
            for change in self.changes[r.name]:
                section, item = r.to_json(change)
                out[section].append(item)
        return out

    def text_blocks(self) -> list[str]:
        return [line for r in self.resources for change in self.changes[r.name] for line in r.describe(change)]

    def drift_items(self) -> list[DriftItem]:
        return [item for r in self.resources for change in self.changes[r.name] for item in r.drift_items(change)]

    def steps(self) -> list[Step]:
        ordered = [(Phase.PREPARE, self.resources), (Phase.GROW, self.resources),
                   (Phase.SHRINK, list(reversed(self.resources)))]
        return [step for phase, resources in ordered for r in resources
                for step in r.steps(self.changes[r.name], phase)]

    def known(self) -> guard.Known:
        sets = self.have.get("ipsets", {})
        bpf = next((r for r in self.resources if isinstance(r, BpfPlane)), None)
        return guard.Known({name: (s.type, s.family) for name, s in sets.items()}, bpf.pin_dir if bpf else None)


def plan(resources: list[AnyResource], backend: Backend, have: dict[str, Any], node: RenderedNode,
         check: bool = True, prints: dict[str, str] | None = None) -> Planned:
    """Diff every resource in order (each sees the changes of those before it). `check`: let the
    resources refuse what their daemon would reject (a BIRD configuration)."""
    changes: Changes = {}
    for r in resources:
        changes[r.name] = r.diff(r.want(node), have[r.name], dict(changes))
        if check and changes[r.name]:
            r.check(changes[r.name])
    return Planned(resources, backend, have, changes, dict(prints or {}))


def execute(planned: Planned, runner: Runner) -> None:
    """Write the planned changes (PREPARE and GROW in order, SHRINK in reverse), every write
    checked by the guard before the first one runs."""
    bird = next((r for r in planned.resources if isinstance(r, Bird)), None)
    bpf = next((r for r in planned.resources if isinstance(r, BpfPlane)), None)
    Executor(runner, bird.load if bird else None, bpf.write if bpf else None).run(planned.steps(), planned.known())


def verify(planned: Planned, runner: Runner) -> Changes:
    """What still differs, among what the plan touched (empty tuples when all landed)."""
    session = ProbeSession(runner)
    pending = [(r.name, r.start_verify(planned.have[r.name], planned.changes[r.name], session))
               for r in planned.resources if planned.changes[r.name]]
    leftover: Changes = {r.name: () for r in planned.resources}
    leftover.update((name, finish()) for name, finish in pending)
    return leftover


def settle(planned: Planned) -> None:
    """After a successful apply: what the resources record about what they found."""
    for r in planned.resources:
        r.settle(planned.have[r.name])


def write_base(runner: Runner, backend: Backend, dataplane: Dataplane, families: Sequence[int] = (4, 6)) -> None:
    """Write `dataplane`'s sets and filter chains of `families` on a node where weft never ran in
    them (the CNI plugin's first pod): nothing of weft's is there, so nothing is read first."""
    resources: list[AnyResource] = [IpSets(), *(Table(FAMILY_TABLES[f], backend, main=True) for f in families)]
    empty = RenderedNode(EMPTY)
    have = {r.name: r.want(empty) for r in resources}
    execute(plan(resources, backend, have, RenderedNode(dataplane), check=False), runner)


def restore_texts(desired: Dataplane, actual: Dataplane = EMPTY, backend: str = "nft") -> list[str]:
    """The input apply would feed the kernel's restore tools to make `actual` into `desired`
    (sets and both families' filter tables), in order. Pure: for tests and tools."""
    resources: list[AnyResource] = [IpSets(), *(Table(t, Backend(backend), main=True) for t in FAMILY_TABLES.values())]
    have = {r.name: r.want(RenderedNode(actual)) for r in resources}
    planned = plan(resources, Backend(backend), have, RenderedNode(desired), check=False)
    return [step.write.text for step in planned.steps() if isinstance(step.write, Restore)]


__all__ = ["Action", "Found", "Planned", "execute", "kernel_resources", "plan", "restore_texts", "settle",
           "start_confirm", "start_probe", "verify", "write_base"]
