"""Probes: read back the kernel state weft owns, normalised as the kernel prints it."""
from __future__ import annotations

from probes import ipsets, iptables
from probes.backend import Backend
from probes.runner import Runner
from renderers.dataplane import Dataplane


def probe_dataplane(runner: Runner, backend: Backend) -> Dataplane:
    """weft's chains, hook rules and sets as they are in this network namespace now."""
    chains, hooks = iptables.parse_save(runner.run(backend.save + ["-t", "filter"]), "filter")
    sets = ipsets.parse_save(runner.run(["ipset", "save"]))
    return Dataplane(chains, sets, hooks)
