"""Which iptables backend (nf_tables or legacy) this node uses, and its tools, per IP family.

The two backends keep separate rule sets; writing to the wrong one leaves the real firewall
untouched. weft follows where its own chains already are, else the system's `iptables`. Both
families use the backend chosen so (iptables for IPv4, ip6tables for IPv6); weft's leftovers in
the other backend are found and removed family by family.
"""
from __future__ import annotations

import os
import re
from collections import namedtuple

from weft.probes.runner import KernelCommandError, Runner

BACKENDS = ("nft", "legacy")


class Backend(namedtuple("Backend", "name family", defaults=(4,))):
    """A backend by name ("nft", "legacy") and its tools for one IP family (4: iptables, 6:
    ip6tables). A plain tuple: it is on the CNI plugin's hot path, where every import counts."""
    __slots__ = ()

    def in_family(self, family: int) -> Backend:
        return Backend(self.name, family)

    @property
    def tool(self) -> str:
        return "ip6tables" if self.family == 6 else "iptables"

    @property
    def save(self) -> list[str]:
        return [f"{self.tool}-{self.name}-save"]

    @property
    def list_chain(self) -> list[str]:
        return [f"{self.tool}-{self.name}"] + (["-w", "5"] if self.name == "legacy" else [])

    @property
    def restore(self) -> list[str]:
        # legacy takes one host-wide lock shared by all namespaces: always wait for it.
        return [f"{self.tool}-{self.name}-restore", "--noflush"] + (["-w", "5"] if self.name == "legacy" else [])


def has_ipv6() -> bool:
    """Does this kernel (this network namespace) have IPv6? Without it there is no IPv6 table to
    program, and no pod can get an IPv6 address either."""
    return os.path.exists("/proc/net/if_inet6")


def detect(runner: Runner, preference: str = "auto") -> Backend:
    if preference in BACKENDS:
        return Backend(preference)
    if _legacy_has_weft(runner):
        return Backend("legacy")
    return Backend(_system_backend(runner))


_SYSTEM_BACKEND: dict[str, str] = {}


def _system_backend(runner: Runner) -> str:
    """The backend of the system's `iptables`, from its `-V`; remembered per binary (resolved
    through the alternatives symlinks), as the CNI helper asks again for every batch of pods."""
    binary = next((os.path.realpath(f"{d}/iptables") for d in os.environ.get("PATH", "").split(":")
                   if d and os.access(f"{d}/iptables", os.X_OK)), None)
    if binary in _SYSTEM_BACKEND:
        return _SYSTEM_BACKEND[binary]
    match = re.search(r"\((nf_tables|legacy)\)", runner.run(["iptables", "-V"]))
    name = "legacy" if match and match.group(1) == "legacy" else "nft"
    if binary is not None:
        _SYSTEM_BACKEND[binary] = name
    return name


_TABLE_NAMES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}


def _legacy_has_weft(runner: Runner, family: int = 4) -> bool:
    # Reading the file is free and, unlike running iptables-legacy-save, never loads modules.
    try:
        with open(_TABLE_NAMES[family]) as f:
            if "filter" not in f.read().split():
                return False
    except FileNotFoundError:
        return False
    return ":weft-" in runner.run(Backend("legacy", family).save + ["-t", "filter"])


def other_has_weft(runner: Runner, chosen: Backend, family: int = 4) -> Backend | None:
    """The other backend (for `family`), if weft's chains are there too (left by a run with the
    other backend).

    Both backends filter packets, and ipsets are shared by both: such leftovers cannot be ignored.
    """
    other = Backend("nft" if chosen.name == "legacy" else "legacy", family)
    if other.name == "legacy":
        return other if _legacy_has_weft(runner, family) else None
    try:
        runner.run(other.list_chain + ["-t", "filter", "-S", "weft-FORWARD"])
    except KernelCommandError:
        return None
    return other
