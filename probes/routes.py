"""Read back weft's routes (its route protocol) and the sysctls of pods' host-side interfaces.

`ip -j` rather than pyroute2 for reading: one subprocess that runs alongside the iptables dumps
costs ~5 ms, where importing pyroute2 costs ~0.4 s every run.
"""
from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable

from weft.model.kernel import Route
from weft.model.names import HOST_IFACE_PREFIX, ROUTE_PROTOCOL

ROUTES = (("ip", "-j", "-4", "route", "show", "table", "main"),
          ("ip", "-j", "-6", "route", "show", "table", "main"))
LINKS = ("ip", "-j", "link", "show")
HOST_IFACE_LENGTH = len(HOST_IFACE_PREFIX) + 11       # model.names.host_iface_name


def parse_routes(dumps: Iterable[str]) -> tuple[dict[str, Route], frozenset[str]]:
    """(weft's routes by destination, the destinations other tools route) from `ip -j route`."""
    routes, occupied = {}, set()
    for dump in dumps:
        for entry in json.loads(dump or "[]"):
            if entry.get("dst") == "default":
                continue
            route = _route(entry)
            if str(entry.get("protocol")) == str(ROUTE_PROTOCOL):
                routes[route.dst] = route
            else:
                occupied.add(route.dst)
    return routes, frozenset(occupied)


def weft_links(dump: str) -> frozenset[str]:
    """The names of every interface whose name is weft's (`weft...`), from `ip -j link show`."""
    return frozenset(name for entry in json.loads(dump or "[]")
                     if (name := str(entry.get("ifname", ""))).startswith(HOST_IFACE_PREFIX))


def is_pod_iface(name: str) -> bool:
    """A pod's host-side interface as the CNI plugin names it (not just any `weft...` name)."""
    return name.startswith(HOST_IFACE_PREFIX) and len(name) == HOST_IFACE_LENGTH


def _route(entry: dict) -> Route:
    dst = entry["dst"]
    if "/" not in dst:
        dst = str(ipaddress.ip_network(dst))            # ip prints a host route without its length
    return Route(dst, entry.get("dev"), entry.get("type", "unicast"))


def read_sysctl(key: str) -> str:
    """/proc/sys/<key> ("" when it cannot be read: the interface went away)."""
    try:
        fd = os.open(f"/proc/sys/{key}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
