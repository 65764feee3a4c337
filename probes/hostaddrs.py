"""The host's own interfaces and their addresses, read over netlink (read-only).

Calico's host endpoints may name their interface by address only: `interfaceName` left out and
one of the interface's addresses in `expectedIPs` ("A host endpoint for one specific real
interface is configured by `interfaceName: <name-of-that-interface>` ... or by leaving
`interfaceName` empty and including one of the interface's IPs in `expectedIPs`", Calico's
HostEndpoint reference, docs.tigera.io/calico/latest/reference/resources/hostendpoint). Which
interface that is, only the node knows: this read gives it, and
model.cluster.ClusterState.with_host_interfaces resolves the endpoints before the (pure)
render. One netlink dump (RTM_GETADDR), tens of microseconds: it runs on every run, as what it
reads is part of what the render depends on.

Left out: `lo` (the host always reaches itself; weft never polices it) and weft's own `weft*`
interfaces (pods' host sides, which host endpoints never cover).
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from weft.model.names import HOST_IFACE_PREFIX
from weft.probes.netlink import Netlink, attrs

RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_DUMP = 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
_IFADDRMSG = struct.Struct("=BBBBI")      # family, prefix length, flags, scope, interface index


def host_interface_addresses(sock: Netlink | None = None) -> dict[str, tuple[str, ...]]:
    """{interface name: its addresses (both families, sorted)} of this network namespace's
    interfaces, but `lo` and weft's."""
    own = sock is None
    sock = sock or Netlink()
    try:
        answers = sock.request(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), NLM_F_DUMP)
    finally:
        if own:
            sock.close()
    found: dict[str, set[str]] = {}
    names: dict[int, str | None] = {}
    for kind, payload in answers:
        if kind != RTM_NEWADDR or len(payload) < _IFADDRMSG.size:
            continue
        family, _, _, _, index = _IFADDRMSG.unpack_from(payload)
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        found_attrs = attrs(payload, _IFADDRMSG.size)
        raw = found_attrs.get(IFA_LOCAL) or found_attrs.get(IFA_ADDRESS)   # IFA_LOCAL: ours (IFA_ADDRESS: a peer's)
        if raw is None or len(raw) != (4 if family == socket.AF_INET else 16):
            continue
        if index not in names:
            try:
                names[index] = socket.if_indextoname(index)
            except OSError:                     # gone since the dump
                names[index] = None
        name = names[index]
        if name is None or name == "lo" or name.startswith(HOST_IFACE_PREFIX):
            continue
        found.setdefault(name, set()).add(str(ipaddress.ip_address(raw)))
    return {name: tuple(sorted(ips, key=lambda a: (":" in a, ipaddress.ip_address(a).packed)))
            for name, ips in sorted(found.items())}
