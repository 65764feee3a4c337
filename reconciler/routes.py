"""weft's routes as a resource: routes marked with weft's route protocol (201).

Each local pod is routed through its host-side interface. Interfaces are the CNI plugin's: a
route through one that does not exist yet is not wanted (the pod is not wired), and a route
through an existing `weft*` interface is never deleted by a run, whatever the records say (the
pod runs; its route goes with its interface at CNI DEL). Such a route is replaced only when the
desired state routes its address through another existing interface. A destination another
tool routes (another protocol) is left to it. What a run deletes: weft's routes through
interfaces that are not weft's, and blackholes it no longer wants.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from weft.model.kernel import Route
from weft.probes import routes as probe
from weft.reconciler.resource import (
    Action,
    DriftItem,
    Phase,
    ProbeSession,
    Problem,
    Resource,
    RouteWrite,
    Step,
    digest,
)

if TYPE_CHECKING:
    from weft.reconciler.rendered import RenderedNode


@dataclass(frozen=True)
class RoutingState:
    routes: Mapping[str, Route] = field(default_factory=dict)   # weft's, by destination
    ifaces: frozenset[str] = frozenset()        # every existing interface with a weft name
    occupied: frozenset[str] = frozenset()      # destinations other tools route


@dataclass(frozen=True)
class RouteChange:
    dst: str
    action: Action                   # create / update / delete
    dev: str | None = None           # the desired route (create/update)
    type: str = "unicast"
    previous_dev: str | None = None
    previous_type: str | None = None
    about: str = ""


class Routes(Resource[RoutingState, RouteChange]):
    name = "routes"

    def start_probe(self, session: ProbeSession) -> Callable[[], RoutingState]:
        dumps = [session.start(argv) for argv in probe.ROUTES]
        links = session.start(probe.LINKS)

        def finish() -> RoutingState:
            routes, occupied = probe.parse_routes(d.result() for d in dumps)
            return RoutingState(routes, probe.weft_links(links.result()), occupied)
        return finish

    def want(self, node: RenderedNode) -> RoutingState:
        return RoutingState(node.dataplane.routes)

    def diff(self, want: RoutingState, have: RoutingState,
             earlier: Mapping[str, tuple[Any, ...]]) -> tuple[RouteChange, ...]:
        changes = []
        for dst, w in sorted(want.routes.items()):
            if (w.dev is not None and w.dev not in have.ifaces) or dst in have.occupied:
                continue
            found = have.routes.get(dst)
            if found is None:
                changes.append(RouteChange(dst, Action.CREATE, w.dev, w.type, about=w.about))
            elif (found.dev, found.type) != (w.dev, w.type):
                changes.append(RouteChange(dst, Action.UPDATE, w.dev, w.type, found.dev, found.type, w.about))
        for dst, h in sorted(have.routes.items()):
            wanted = want.routes.get(dst)
            if wanted is not None and (wanted.dev is None or wanted.dev in have.ifaces):
                continue                                # wanted: created or replaced above
            if h.type == "unicast" and h.dev in have.ifaces:
                continue                                # a live pod's route: it goes with its interface
            changes.append(RouteChange(dst, Action.DELETE, previous_dev=h.dev, previous_type=h.type))
        return tuple(changes)

    def describe(self, change: RouteChange) -> list[str]:
        r = change
        lines = [f"  # route {r.dst} will be {r.action.verb}" + (f"  ({r.about})" if r.about else "")]
        if r.action is not Action.CREATE:
            lines.append(f"  - route {_text(r.dst, r.previous_dev, r.previous_type)}")
        if r.action is not Action.DELETE:
            lines.append(f"  + route {_text(r.dst, r.dev, r.type)}")
        return lines + [""]

    def to_json(self, change: RouteChange) -> tuple[str, dict[str, Any]]:
        return self.name, asdict(change)

    def steps(self, changes: tuple[RouteChange, ...], phase: Phase) -> list[Step]:
        if phase is Phase.GROW:
            return [Step(RouteWrite(False, r.dst, r.dev if r.type != "blackhole" else None, r.type),
                         f"route replace {r.dst}") for r in changes if r.action is not Action.DELETE]
        if phase is Phase.SHRINK:
            return [Step(RouteWrite(True, r.dst, None, r.previous_type or "unicast"), f"route del {r.dst}")
                    for r in changes if r.action is Action.DELETE]
        return []

    def start_verify(self, have: RoutingState, changes: tuple[RouteChange, ...],
                     session: ProbeSession) -> Callable[[], tuple[RouteChange, ...]]:
        touched = {r.dst for r in changes}
        routes = dict(have.routes)
        for r in changes:
            if r.action is Action.DELETE:
                routes.pop(r.dst, None)
            else:
                routes[r.dst] = Route(r.dst, r.dev, r.type)
        expected = {d: r for d, r in routes.items() if d in touched}
        probing = self.start_probe(session)

        def finish() -> tuple[RouteChange, ...]:
            found = probing().routes
            leftover = []
            for dst in sorted(touched):
                e, f = expected.get(dst), found.get(dst)
                if e is not None and f is not None:
                    if (e.dev, e.type) != (f.dev, f.type):
                        leftover.append(RouteChange(dst, Action.UPDATE, e.dev, e.type, f.dev, f.type))
                elif e is not None:
                    leftover.append(RouteChange(dst, Action.CREATE, e.dev, e.type))
                elif f is not None:
                    leftover.append(RouteChange(dst, Action.DELETE, previous_dev=f.dev, previous_type=f.type))
            return tuple(leftover)
        return finish

    def drift_items(self, change: RouteChange) -> list[DriftItem]:
        r = change
        problem = {Action.CREATE: Problem.MISSING, Action.DELETE: Problem.UNEXPECTED}.get(r.action, Problem.CHANGED)
        return [{"kind": "route", "name": r.dst, "problem": problem.value,
                 "rule": f"dev {r.previous_dev or r.dev}" if r.type != "blackhole" else "blackhole"}]

    def fingerprint(self, have: RoutingState) -> str:
        return digest(*(f"route {d} {r.dev} {r.type}" for d, r in sorted(have.routes.items())))


def _text(dst: str, dev: str | None, kind: str | None) -> str:
    return f"{dst} dev {dev}" if kind != "blackhole" else f"blackhole {dst}"
