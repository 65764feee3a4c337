"""What the kernel says about the pods weft wired, from the pods' side of the node.

The CNI plugin names each pod's host-side interface `weft...` (model.names.host_iface_name),
gives it the alias `weft:<container id>:<ifname>`, and routes the pod's addresses to it with
weft's route protocol. Those three facts survive the loss of every file in the state dir, so
`weft ipam check` compares the IPAM records with them, and IPAM recovery rebuilds from them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from weft.model.names import HOST_IFACE_PREFIX, ROUTE_PROTOCOL
from weft.probes.runner import Runner


def ip_json(runner: Runner, *argv: str) -> list:
    """`ip -j ARGV` parsed (an empty answer is an empty list)."""
    out = runner.run(["ip", "-j", *argv])
    return json.loads(out) if out.strip() else []


@dataclass(frozen=True)
class WiredPods:
    links: dict[str, str | None]           # weft host-side interface -> its alias
    routes: tuple[tuple[str, str], ...]    # (destination, device) of every proto-201 route


def wired_pods(runner: Runner | None = None) -> WiredPods:
    """weft's interfaces and routes in this network namespace."""
    runner = runner or Runner()
    links = {link["ifname"]: link.get("ifalias") for link in ip_json(runner, "link", "show")
             if link.get("ifname", "").startswith(HOST_IFACE_PREFIX)}
    routes = tuple((r["dst"], r.get("dev")) for family in ("-4", "-6")
                   for r in ip_json(runner, family, "route", "show", "proto", str(ROUTE_PROTOCOL)))
    return WiredPods(links, routes)
