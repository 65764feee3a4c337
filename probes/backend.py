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
    if "filter" not in _legacy_tables(family):
        return False
    return ":weft-" in runner.run(Backend("legacy", family).save + ["-t", "filter"])


# Where weft's rules in each table see packets: the chains the built-in chains jump to
# (renderers.iptables, renderers.natoutgoing, renderers.calico; reconciler.guard's HOOKS). A hook
# rule cannot outlive its chain, so a table without any of these holds nothing of weft's that
# filters, rewrites or marks a packet (filter's weft-INPUT and weft-OUTPUT come with weft-FORWARD;
# raw's two come alone, with doNotTrack policies of one direction).
ENTRY_CHAINS = {"filter": ("weft-FORWARD",), "nat": ("weft-nat-outgoing",),
                "mangle": ("weft-PREROUTING",), "raw": ("weft-PREROUTING", "weft-OUTPUT")}


def other_weft_tables(runner: Runner, chosen: Backend, family: int = 4) -> tuple[Backend, tuple[str, ...]]:
    """The other backend (for `family`) and those of its tables (filter, nat, mangle, raw) where
    weft's chains are too (left by a run with the other backend, or by hand).

    Both backends see every packet, and ipsets are shared by both: such leftovers cannot be
    ignored. The reads start at once and never create a table: legacy's tables are read only
    when the kernel lists them (their names file, free to read) with one `iptables-legacy-save`;
    nft's by listing weft's entry chains (`-S CHAIN`: a few ms even beside thousands of foreign
    rules, where a full dump takes 100+ ms).
    """
    other = Backend("nft" if chosen.name == "legacy" else "legacy", family)
    if other.name == "legacy":
        existing = _legacy_tables(family) & set(ENTRY_CHAINS)
        if not existing:
            return other, ()
        found: set[str] = set()
        table = ""
        for line in runner.run(other.save).splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":weft-") and table in existing:
                found.add(table)
        return other, tuple(t for t in ENTRY_CHAINS if t in found)
    found = set()
    pending = [(table, runner.start(other.list_chain + ["-t", table, "-S", chain]))
               for table, chains in ENTRY_CHAINS.items() for chain in chains]
    for table, read in pending:
        try:
            read.result()
        except KernelCommandError:
            continue
        found.add(table)
    return other, tuple(t for t in ENTRY_CHAINS if t in found)


def _legacy_tables(family: int) -> set[str]:
    """The legacy backend's tables in this namespace. Reading the file is free and, unlike running
    iptables-legacy-save, never loads modules or creates a table."""
    try:
        with open(_TABLE_NAMES[family]) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


def _version(text: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in match.groups()) if match else ()


def nat_features(runner: Runner, backend: Backend) -> dict[str, bool]:
    """Felix's detected NAT features for this node's `backend` (its feature detection:
    MASQFullyRandom needs iptables >= 1.6.2, both need kernel >= 3.14): whether MASQUERADE and
    SNAT take `--random-fully`. One `iptables -V`; a tool that cannot say: not supported."""
    try:
        tool = _version(runner.run([f"{backend.tool}-{backend.name}", "-V"]))
    except KernelCommandError:
        tool = ()
    kernel = _version(os.uname().release)
    fully = bool(tool) and tool >= (1, 6, 2) and kernel >= (3, 14, 0)
    return {"MASQFullyRandom": fully, "SNATFullyRandom": fully}
