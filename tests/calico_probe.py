"""Send single packets between test namespaces and report which arrived (run as a script, as root).

Input (stdin, JSON): {"captures": [netns, ...], "local": [netns, ...], "probes": [{"id", "from", "to", "src", "dst",
"proto", "sport", "dport", "icmp_type", "icmp_code"}, ...]}, where "from" is the namespace a
probe is sent in and "to" the namespace it should arrive in. Output (stdout, JSON): the ids of
the probes that arrived.

Each probe is one IPv4 packet built whole (IP_HDRINCL, correct checksums): a TCP SYN, a UDP
datagram, an ICMP query (echo, timestamp: the types conntrack tracks as new connections), or a
bare IP packet of another protocol. Arrival is seen by an AF_PACKET socket on the destination
namespace's eth0, so it is the node's forwarding verdict, whatever the destination's own stack
does with the packet; in a "local" namespace (a host), arrival is seen by raw sockets (ICMP,
TCP, UDP), which get a packet only once the host's INPUT chain let it in. Namespaces are entered
with setns(2) (never `ip netns exec`), one socket each; the process never enters the root
namespace's configuration.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
ETH_P_IP = 0x0800
SO_RCVBUFFORCE = 33                      # not in the socket module; root may exceed rmem_max
CAPTURE_BUFFER = 16 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def enter(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def payload(probe: dict) -> tuple[int, bytes]:
    src, dst = socket.inet_aton(probe["src"]), socket.inet_aton(probe["dst"])
    proto = probe["proto"]
    marker = struct.pack("!I", probe["id"])
    if proto == 6:
        header = struct.pack("!HHIIBBHHH", probe["sport"], probe["dport"], probe["id"], 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(header))
        return 6, header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
    if proto == 17:
        length = 8 + len(marker)
        header = struct.pack("!HHHH", probe["sport"], probe["dport"], length, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
        value = checksum(pseudo + header + marker) or 0xFFFF
        return 17, header[:6] + struct.pack("!H", value) + marker
    if proto == 1:
        rest = struct.pack("!HH", probe["id"] & 0xFFFF, 1) + (b"\0" * 12 if probe["icmp_type"] == 13 else marker)
        header = struct.pack("!BBH", probe["icmp_type"], probe["icmp_code"], 0) + rest
        return 1, header[:2] + struct.pack("!H", checksum(header)) + header[4:]
    return proto, marker * 2


def packet(probe: dict) -> bytes:
    proto, body = payload(probe)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), probe["id"] & 0xFFFF, 0, 64, proto, 0,
                         socket.inet_aton(probe["src"]), socket.inet_aton(probe["dst"]))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + body


def key(data: bytes) -> tuple | None:
    """(src, dst, proto, ip id) of a captured IPv4 packet."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    return (socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]), data[9], struct.unpack("!H", data[4:6])[0])


def main() -> None:
    spec = json.load(sys.stdin)
    captures = {}
    for netns in spec["captures"]:
        enter(netns)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        # Every probe is sent before any is read: room for thousands (the default buffer holds a
        # few hundred small packets; the rest would be lost and read as dropped).
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
        sock.bind(("eth0", ETH_P_IP))
        sock.setblocking(False)
        captures[sock] = netns
    for netns in spec.get("local", ()):
        enter(netns)
        for proto in (socket.IPPROTO_ICMP, socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
            sock.setblocking(False)
            captures[sock] = netns
    senders = {}
    for netns in sorted({p["from"] for p in spec["probes"]}):
        enter(netns)
        senders[netns] = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    wanted = {}
    for probe in spec["probes"]:
        wanted[(probe["to"], (probe["src"], probe["dst"], probe["proto"], probe["id"] & 0xFFFF))] = probe["id"]
        try:
            senders[probe["from"]].sendto(packet(probe), (probe["dst"], 0))
        except PermissionError:
            pass                 # dropped by the sender's own OUTPUT chain: it does not arrive
    arrived = set()
    deadline = time.monotonic() + spec.get("wait", 0.5)
    socks = captures
    while time.monotonic() < deadline:
        ready, _, _ = select.select(list(socks), [], [], max(deadline - time.monotonic(), 0))
        for sock in ready:
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                found = wanted.get((socks[sock], key(data)))
                if found is not None:
                    arrived.add(found)
    json.dump(sorted(arrived), sys.stdout)


if __name__ == "__main__":
    main()
