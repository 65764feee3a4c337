"""The settings of pods' host-side interfaces as a resource: sysctls under /proc/sys.

The interfaces are the CNI plugin's (it creates and deletes them); a run only checks and
repairs the settings of the ones that exist. Only the settings weft knows (model.names
.host_sysctls) are read, and only on interfaces named as the plugin names them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from weft.model.kernel import Link
from weft.model.names import host_sysctls
from weft.probes import routes as probe
from weft.reconciler.resource import Action, DriftItem, Phase, ProbeSession, Resource, Step, SysctlWrite, digest

if TYPE_CHECKING:
    from weft.reconciler.rendered import RenderedNode

Links = Mapping[str, Link]


@dataclass(frozen=True)
class LinkChange:
    iface: str
    action: Action                               # update: some settings differ
    sysctls: tuple[tuple[str, str], ...] = ()    # (key, desired value) that differ
    previous: tuple[tuple[str, str], ...] = ()   # (key, kernel value) of the same keys
    about: str = ""


class InterfaceSettings(Resource[Links, LinkChange]):
    name = "links"

    def start_probe(self, session: ProbeSession) -> Callable[[], Links]:
        dump = session.start(probe.LINKS)

        def finish() -> Links:
            found = {}
            for name in sorted(probe.weft_links(dump.result())):
                if probe.is_pod_iface(name):
                    # every setting weft may want; the diff compares those the pod needs
                    found[name] = Link(name, tuple(sorted((k, probe.read_sysctl(k))
                                                          for k in host_sysctls(name, True))))
            return found
        return finish

    def want(self, node: RenderedNode) -> Links:
        return node.dataplane.links

    def diff(self, want: Links, have: Links, earlier: Mapping[str, tuple[Any, ...]]) -> tuple[LinkChange, ...]:
        changes = []
        for iface, w in sorted(want.items()):
            if iface not in have:
                continue
            now = dict(have[iface].sysctls)
            wrong = tuple((k, v) for k, v in w.sysctls if now.get(k) != v)
            if wrong:
                changes.append(LinkChange(iface, Action.UPDATE, wrong, tuple((k, now.get(k, "")) for k, _ in wrong),
                                          w.about))
        return tuple(changes)

    def describe(self, change: LinkChange) -> list[str]:
        head = f"  # settings of interface {change.iface} will be updated in-place"
        head += f"  ({change.about})" if change.about else ""
        lines = [head, f"  ~ interface {change.iface} {{"]
        for (key, want), (_, have) in zip(change.sysctls, change.previous, strict=True):
            lines.append(f"      ~ {key.replace('/', '.')} = {have or '(unset)'} -> {want}")
        return lines + ["    }", ""]

    def to_json(self, change: LinkChange) -> tuple[str, dict[str, Any]]:
        return self.name, asdict(change)

    def steps(self, changes: tuple[LinkChange, ...], phase: Phase) -> list[Step]:
        if phase is not Phase.GROW:
            return []
        return [Step(SysctlWrite(key, value), f"sysctl {key.replace('/', '.')}={value}")
                for change in changes for key, value in change.sysctls]

    def start_verify(self, have: Links, changes: tuple[LinkChange, ...],
                     session: ProbeSession) -> Callable[[], tuple[LinkChange, ...]]:
        def finish() -> tuple[LinkChange, ...]:
            leftover = []
            for change in changes:
                now = tuple((k, probe.read_sysctl(k)) for k, _ in change.sysctls)
                wrong = tuple((k, v) for (k, v), (_, got) in zip(change.sysctls, now, strict=True) if got != v)
                if wrong:
                    leftover.append(LinkChange(change.iface, Action.UPDATE, wrong,
                                               tuple((k, got) for (k, got) in now if k in dict(wrong))))
            return tuple(leftover)
        return finish

    def drift_items(self, change: LinkChange) -> list[DriftItem]:
        return [{"kind": "sysctl", "name": change.iface, "problem": f"is {have or '(unset)'}, want {want}",
                 "member": key.replace("/", ".")}
                for (key, want), (_, have) in zip(change.sysctls, change.previous, strict=True)]

    def fingerprint(self, have: Links) -> str:
        return digest(*(f"link {i} {link.sysctls}" for i, link in sorted(have.items())))
