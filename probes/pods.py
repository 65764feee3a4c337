"""What the kernel says about the pods weft wired, from the pods' side of the node.

The CNI plugin names each pod's host-side interface `weft...` (model.names.host_iface_name),
gives it the alias `weft:<container id>:<ifname>`, and routes the pod's addresses to it with
weft's route protocol. Those three facts survive the loss of every file in the state dir, so
`weft ipam check` compares the IPAM records with them, IPAM recovery rebuilds from them, and no
address routed to a live weft interface is handed out again (`routed_addresses`).
"""
from __future__ import annotations

import json
import sys
from collections import namedtuple

from weft.model.names import HOST_IFACE_PREFIX, ROUTE_PROTOCOL
from weft.probes.runner import Runner


def ip_json(runner: Runner, *argv: str, ip: str = "ip") -> list:
    """`ip -j ARGV` parsed (an empty answer is an empty list); `ip`: the binary."""
    out = runner.run([ip, "-j", *argv])
    return json.loads(out) if out.strip() else []


# links: weft host-side interface -> its alias; routes: (destination, device) of every proto-201
# route. A namedtuple, not a dataclass: the CNI plugin imports this module on every ADD, and
# `dataclasses` costs more to import than it does.
WiredPods = namedtuple("WiredPods", "links routes")


def wired_pods(runner: Runner | None = None, ip: str = "ip") -> WiredPods:
    """weft's interfaces and routes in this network namespace (`ip`: the binary, when the
    caller's PATH cannot be trusted to find it, as a CNI plugin's)."""
    runner = runner or Runner()
    links = {link["ifname"]: link.get("ifalias") for link in ip_json(runner, "link", "show", ip=ip)
             if link.get("ifname", "").startswith(HOST_IFACE_PREFIX)}
    routes = tuple((r["dst"], r.get("dev")) for family in ("-4", "-6")
                   for r in ip_json(runner, family, "route", "show", "proto", str(ROUTE_PROTOCOL), ip=ip))
    return WiredPods(links, routes)


def routed_addresses(proc_net: str = "/proc/thread-self/net") -> set[str]:
    """Every address with a host route (/32, /128) through a `weft*` interface in the calling
    thread's network namespace: the addresses live pods hold, whatever any record says.

    Read from /proc (the kernel's main table, no process started: ~0.1 ms for a node's routes),
    not from `ip -j route show proto 201` (~3 ms): the CNI plugin reads it for every batch of
    allocations. A route through a weft interface is a pod's, whoever added it.
    """
    held = set()
    try:
        with open(f"{proc_net}/route") as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[0].startswith(HOST_IFACE_PREFIX) and fields[7] == "FFFFFFFF":
            raw = int(fields[1], 16).to_bytes(4, sys.byteorder)   # printed as a host-order integer
            held.add(".".join(str(b) for b in raw))
    try:
        with open(f"{proc_net}/ipv6_route") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:                     # no IPv6 in this kernel
        lines = []
    v6 = [fields[0] for fields in map(str.split, lines)
          if len(fields) >= 10 and fields[1] == "80" and fields[9].startswith(HOST_IFACE_PREFIX)]
    if v6:
        import ipaddress
        held.update(str(ipaddress.IPv6Address(int(dst, 16))) for dst in v6)
    return held
