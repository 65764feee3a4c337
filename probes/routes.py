"""Read back weft's routes (its route protocol) and the sysctls of pods' host-side interfaces.

`ip -j` rather than pyroute2 for reading: one subprocess that runs alongside the iptables dumps
costs ~5 ms, where importing pyroute2 costs ~0.4 s every run.
"""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable

from weft.model.kernel import Link, Route
from weft.model.names import HOST_IFACE_PREFIX, ROUTE_PROTOCOL, host_sysctls
from weft.probes.runner import Runner


def start_route_probe(runner: Runner) -> Callable[[], tuple[dict[str, Route], dict[str, Link], frozenset[str]]]:
    """weft's routes, the pods' host-side interfaces, and the destinations other tools route."""
    v4 = runner.start(["ip", "-j", "-4", "route", "show", "table", "main"])
    v6 = runner.start(["ip", "-j", "-6", "route", "show", "table", "main"])
    links = runner.start(["ip", "-j", "link", "show"])

    def finish() -> tuple[dict[str, Route], dict[str, Link], frozenset[str]]:
        routes, occupied = {}, set()
        for pending in (v4, v6):
            for entry in json.loads(pending.result() or "[]"):
                if entry.get("dst") == "default":
                    continue
                route = _route(entry)
                if str(entry.get("protocol")) == str(ROUTE_PROTOCOL):
                    routes[route.dst] = route
                else:
                    occupied.add(route.dst)
        found = {}
        for entry in json.loads(links.result() or "[]"):
            name = entry.get("ifname", "")
            if name.startswith(HOST_IFACE_PREFIX) and len(name) == len(HOST_IFACE_PREFIX) + 11:
                # every setting weft may want; the diff compares those the pod needs
                found[name] = Link(name, tuple(sorted((k, _read(k)) for k in host_sysctls(name, True))))
        return routes, found, frozenset(occupied)
    return finish


def _route(entry: dict) -> Route:
    dst = entry["dst"]
    if "/" not in dst:
        dst = str(ipaddress.ip_network(dst))            # ip prints a host route without its length
    return Route(dst, entry.get("dev"), entry.get("type", "unicast"))


def _read(key: str) -> str:
    try:
        with open(f"/proc/sys/{key}") as f:
            return f.read().strip()
    except OSError:
        return ""
