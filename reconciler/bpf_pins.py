"""Where a node's eBPF pins live, and whether it has any: stdlib only, for the CNI plugin's path.

Pins are machine-wide and several nodes (a lab, tests) can share one kernel, so each node's pins
are under a directory of its own, named by a hash of its state directory. The directory exists
exactly while the node's data plane is eBPF (an apply that leaves eBPF, or `--destroy`, removes
it), which is what the plugin asks before choosing a pod's policy step.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "weft"


def node_pin_dir(state_dir: Path | str) -> Path:
    """The node's pin directory: pins are machine-wide, state directories are per node."""
    return PIN_ROOT / hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]


def pinned(state_dir: Path | str) -> bool:
    """Does the node have an eBPF plane (its pin directory exists)?"""
    return node_pin_dir(state_dir).exists()
