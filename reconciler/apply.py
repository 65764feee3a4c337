"""The one place a run writes: every step checked by the guard first, then run in order.

Steps come from the resources in phase order (reconciler.resource). A step that `commits` (the
iptables transaction of the run's own backend) makes the earlier steps' undo final when it
succeeds, and runs their undo when it fails: the previous rules then keep running against the
previous set members. Routes go through netlink, settings through /proc/sys, BIRD through its
resource; everything else through the kernel's own restore tools.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from weft.probes.runner import KernelCommandError, Runner
from weft.reconciler import guard
from weft.reconciler.resource import BirdWrite, BpfWrite, Restore, RouteWrite, Step, SysctlWrite, Write


class Executor:
    """Runs checked writes; `bird` loads BIRD's configuration (reconciler.bird.Bird.load), `bpf`
    changes the eBPF data plane (reconciler.bpf.BpfPlane.write)."""

    def __init__(self, runner: Runner, bird: Callable[[BirdWrite, Runner], None] | None = None,
                 bpf: Callable[[BpfWrite, Runner], None] | None = None) -> None:
        self.runner = runner
        self.bird = bird
        self.bpf = bpf
        self._netlink: Any = None

    def run(self, steps: Sequence[Step], known: guard.Known) -> None:
        """Check every step, then run them; on failure raise, having undone what the failed
        transaction was to commit."""
        guard.check(steps, known)
        pending_undo: list[Write] = []
        try:
            for step in steps:
                try:
                    self._write(step.write)
                except Exception:
                    if step.commits:
                        for write in reversed(pending_undo):
                            self._write(write)
                    raise
                if step.commits:
                    pending_undo.clear()
                elif step.undo is not None:
                    pending_undo.append(step.undo)
        finally:
            if self._netlink is not None:
                self._netlink.close()
                self._netlink = None

    def _write(self, write: Write) -> None:
        if isinstance(write, Restore):
            self.runner.run(list(write.argv), write.text, writes=True)
        elif isinstance(write, RouteWrite):
            self._route(write)
        elif isinstance(write, SysctlWrite):
            self._sysctl(write)
        elif isinstance(write, BirdWrite):
            if self.bird is None:
                raise KernelCommandError("BIRD's configuration cannot be written here")
            self.bird(write, self.runner)
        elif isinstance(write, BpfWrite):
            if self.bpf is None:
                raise KernelCommandError("the eBPF data plane cannot be written here")
            self.bpf(write, self.runner)

    def _sysctl(self, write: SysctlWrite) -> None:
        shown = f"{write.key.replace('/', '.')}={write.value}"
        self.runner.writes.append(f"sysctl {shown}")
        try:
            fd = os.open(f"/proc/sys/{write.key}", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, write.value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise KernelCommandError(f"setting {shown}: {exc.strerror}") from None

    def _route(self, write: RouteWrite) -> None:
        from pyroute2.netlink.exceptions import NetlinkError
        what = f"route {'del' if write.delete else 'replace'} {write.dst}" + (f" dev {write.dev}" if write.dev else "")
        self.runner.writes.append(f"netlink {what}")
        if self._netlink is None:
            from pyroute2 import IPRoute
            self._netlink = IPRoute()
        ipr = self._netlink
        try:
            if write.delete:
                _delete_route(ipr, write.dst, write.proto)
            elif write.type == "blackhole":
                ipr.route("replace", dst=write.dst, proto=write.proto, type="blackhole")
            else:
                index = ipr.link_lookup(ifname=write.dev)
                if not index:
                    raise KernelCommandError(f"{what}: no interface {write.dev}")
                ipr.route("replace", dst=write.dst, oif=index[0], proto=write.proto,
                          scope=0 if ":" in write.dst else 253)     # IPv4 /32: scope link
        except NetlinkError as exc:
            raise KernelCommandError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}") from None


def _delete_route(ipr: Any, dst: str, proto: int) -> None:
    """The kernel matches a deletion on scope too: weft's IPv4 pod routes are scope link, its
    blackholes and IPv6 routes scope universe; one of the two is the route's."""
    from pyroute2.netlink.exceptions import NetlinkError
    for scope in (253, 0):
        try:
            ipr.route("del", dst=dst, proto=proto, scope=scope)
            return
        except NetlinkError as exc:
            if exc.code != 3:                 # ESRCH: not with this scope
                raise
    raise KernelCommandError(f"route del {dst}: no such route")
