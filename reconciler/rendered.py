"""What a run renders for this node, kept as data between runs (never code).

Rendering is a pure function of the desired state and this node's IPAM allocations, so when
neither changed the last render is used as it is; `to_data()` / `from_data()` make it JSON-able
for the state dir's cache.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weft.model.bpf import BpfMaps, maps_from_data, maps_to_data
from weft.model.kernel import EMPTY, Dataplane

FORMAT = 1


@dataclass(frozen=True)
class RenderedNode:
    """This node's desired kernel state, BIRD's configuration, and what the CNI plugin is left."""
    dataplane: Dataplane
    ignored: tuple[str, ...] = ()            # apiVersion/kind of objects weft does not handle (yet)
    snapshot: dict[str, Any] | None = None   # renderers.endpoint.make_snapshot: a new pod's policy
    bird_config: str | None = None           # None: BGP is off for this node (BIRD is left alone)
    ipam: dict[str, Any] | None = None       # store.ipam.node_ipam_document: what the plugin allocates from
    allocations: str = ""                    # digest of the IPAM allocations it was rendered with
    bpf: BpfMaps | None = None               # the eBPF plane's policy maps (None: the node's plane is iptables)

    def to_data(self) -> dict[str, Any]:
        return {"format": FORMAT, "dataplane": self.dataplane.to_data(), "ignored": list(self.ignored),
                "snapshot": self.snapshot, "bird_config": self.bird_config, "ipam": self.ipam,
                "allocations": self.allocations, "bpf": None if self.bpf is None else maps_to_data(self.bpf)}

    @classmethod
    def from_data(cls, data: Any) -> RenderedNode | None:
        """The node state `to_data` described, or None when `data` is not that (another format,
        damaged): the caller renders anew."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            return None
        try:
            snapshot, ipam, bird = data["snapshot"], data["ipam"], data["bird_config"]
            if not (snapshot is None or isinstance(snapshot, dict)) or not (ipam is None or isinstance(ipam, dict)):
                return None
            if not (bird is None or isinstance(bird, str)):
                return None
            bpf = data.get("bpf")
            return cls(Dataplane.from_data(data["dataplane"]), tuple(map(str, data["ignored"])), snapshot, bird,
                       ipam, str(data["allocations"]), None if bpf is None else maps_from_data(bpf))
        except (KeyError, TypeError, ValueError):
            return None


DESTROYED = RenderedNode(EMPTY)
