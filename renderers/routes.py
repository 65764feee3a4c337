"""The routes and interface settings of this node's pods. Pure.

Each local pod with an address gets a route to it through its host-side interface, marked with
weft's route protocol (so weft recognises and removes only its own), and the host-side sysctls
the CNI plugin sets (desired.endpoints is the one definition of both).
"""
from __future__ import annotations

from weft.model.cluster import Endpoint
from weft.model.kernel import Link, Route
from weft.model.names import host_sysctls


def render_routes(local: tuple[Endpoint, ...]) -> dict[str, Route]:
    routes = {}
    for ep in local:
        for ip in ep.ips:
            dst = f"{ip}/128" if ":" in ip else f"{ip}/32"
            routes[dst] = Route(dst, ep.iface, about=f"pod {ep.key}")
    return routes


def render_links(local: tuple[Endpoint, ...]) -> dict[str, Link]:
    return {ep.iface: Link(ep.iface, tuple(sorted(host_sysctls(ep.iface, any(":" in ip for ip in ep.ips)).items())),
                           about=f"pod {ep.key}")
            for ep in local if ep.ips}
