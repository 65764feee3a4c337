"""Which iptables backend (nf_tables or legacy) this node uses, and its tools.

The two backends keep separate rule sets; writing to the wrong one leaves the real firewall
untouched. weft follows where its own chains already are, else the system's `iptables`.
"""
from __future__ import annotations

import os
import re
from collections import namedtuple

from weft.probes.runner import KernelCommandError, Runner

BACKENDS = ("nft", "legacy")


class Backend(namedtuple("Backend", "name")):
    """A backend by name ("nft", "legacy") and its tools. A plain tuple: it is on the CNI
    plugin's hot path, where every import counts."""
    __slots__ = ()

    @property
    def save(self) -> list[str]:
        return [f"iptables-{self.name}-save"]

    @property
    def list_chain(self) -> list[str]:
        return [f"iptables-{self.name}"] + (["-w", "5"] if self.name == "legacy" else [])

    @property
    def restore(self) -> list[str]:
        # legacy takes one host-wide lock shared by all namespaces: always wait for it.
        return [f"iptables-{self.name}-restore", "--noflush"] + (["-w", "5"] if self.name == "legacy" else [])


def table_label(table: str, backend: Backend, chosen: Backend) -> str:
    """How a table of `backend` is named in a Dataplane: "filter", or "filter@legacy" when it is
    not the backend this run uses (weft's leftovers there are to be removed)."""
    return table if backend == chosen else f"{table}@{backend.name}"


def table_backend(label: str, chosen: Backend) -> Backend:
    _, _, name = label.partition("@")
    return Backend(name) if name else chosen


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


def _legacy_has_weft(runner: Runner) -> bool:
    # Reading the file is free and, unlike running iptables-legacy-save, never loads modules.
    try:
        with open("/proc/net/ip_tables_names") as f:
            if "filter" not in f.read().split():
                return False
    except FileNotFoundError:
        return False
    return ":weft-" in runner.run(["iptables-legacy-save", "-t", "filter"])


def other_has_weft(runner: Runner, chosen: Backend) -> Backend | None:
    """The other backend, if weft's chains are there too (left by a run with the other backend).

    Both backends filter packets, and ipsets are shared by both: such leftovers cannot be ignored.
    """
    other = Backend("nft" if chosen.name == "legacy" else "legacy")
    if other.name == "legacy":
        return other if _legacy_has_weft(runner) else None
    try:
        runner.run(other.list_chain + ["-t", "filter", "-S", "weft-FORWARD"])
    except KernelCommandError:
        return None
    return other
