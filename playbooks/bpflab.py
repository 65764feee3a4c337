"""The eBPF data plane on a lab node: weft's programs and maps on the node namespace's pod veths.

The lab (playbooks.netlab.NodeLab) builds the node and its pods; this puts weft's eBPF data
plane there as a reconcile run would, with the node's own pin directory, and takes it away
again. Everything that touches interfaces runs in a thread that joined the node's network
namespace with setns(2): unlike `ip netns exec`, that keeps this process's view of /sys, where
bpffs holds the pins. The calling thread never leaves its own namespace.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from weft.model.bpf import BpfMaps
from weft.probes.bpf import read_maps
from weft.reconciler.bpf_apply import (
    BpfApplyReport,
    apply_bpf,
    build_for,
    clear_map,
    destroy_bpf,
    node_pin_dir,
)

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(netns: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a new thread inside network namespace /run/netns/<netns>: its
    sockets, netlink requests and child processes are the namespace's."""
    outcome: dict = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:           # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class BpfNode:
    """weft's eBPF data plane on one lab node; `state_dir` names the node (its pin directory)."""

    def __init__(self, netns: str, state_dir: Path):
        self.netns = netns
        self.root = node_pin_dir(state_dir)

    @property
    def maps_dir(self) -> Path:
        return build_for(self.root).maps_dir(self.root)

    def apply(self, maps: BpfMaps, cflags: tuple[str, ...] = ()) -> BpfApplyReport:
        return in_netns(self.netns, apply_bpf, maps, self.root, None, cflags)

    def read(self) -> BpfMaps:
        return in_netns(self.netns, read_maps, self.maps_dir)

    def forget_connections(self) -> int:
        """Forget every tracked connection, so the next probes are judged as new ones."""
        path = self.maps_dir / "conntrack"
        return clear_map(path) if path.exists() else 0

    def destroy(self) -> list[str]:
        return in_netns(self.netns, destroy_bpf, self.root)
