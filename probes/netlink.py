"""Netlink, the kernel's own interface for network configuration, spoken with the standard library.

The CNI plugin configures every pod's interface on the pod's creation path, and a process per
step (`ip`, ~5 ms of CPU each here, mostly its start-up) is the largest cost it can avoid; a
request over a netlink socket costs tens of microseconds. pyroute2 speaks it too, but importing
it costs ~0.4 s. So this module holds the little that weft needs: a socket in a given network
namespace, requests acknowledged one by one (a failure raises the kernel's errno and, where the
kernel gives one, its message: what `ip` prints after "Error:"), attributes packed and parsed,
and one read of nf_tables: the ruleset's generation, which changes with every commit.

What weft writes over it is built where it is decided (cni/wiring.py); this module knows no
policy. Standard library only, quick to import: the CNI plugin loads it on every call.
"""
from __future__ import annotations

import errno as _errno
import os
import socket
import struct

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10                  # errors do not echo our request back
NETLINK_EXT_ACK = 11                  # errors carry the kernel's message

NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200                # on an error: attributes follow
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGERR_ATTR_MSG = 1

_HEADER = struct.Struct("=IHHII")     # struct nlmsghdr: length, type, flags, sequence, port
_ATTR = struct.Struct("=HH")          # struct nlattr: length, type
CLONE_NEWNET = 0x40000000


class NetlinkError(OSError):
    """The kernel refused a request: errno, strerror, and the kernel's own message if it gave one."""

    def __init__(self, code: int, said: str = ""):
        super().__init__(code, os.strerror(code) + (f" ({said})" if said else ""))
        self.said = said


def attr(kind: int, data: bytes) -> bytes:
    """One attribute, padded to 4 bytes (nested attributes are attributes of attributes)."""
    length = _ATTR.size + len(data)
    return _ATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def attr_str(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute (names)."""
    return attr(kind, text.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes of a message from `offset` (the first of each type; flags masked off)."""
    found: dict[int, bytes] = {}
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found.setdefault(kind & 0x3FFF, data[offset + _ATTR.size:offset + length])
        offset += (length + 3) & ~3
    return found


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd`."""
    if hasattr(os, "setns"):                  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Netlink:
    """A netlink socket of `protocol`, bound in the network namespace the calling thread is in,
    or in namespace `netns_fd` (the thread enters it just to make the socket: a socket stays in
    the namespace it was made in). Use it from one thread at a time."""

    def __init__(self, protocol: int = NETLINK_ROUTE, netns_fd: int | None = None):
        if netns_fd is None:
            self.sock = self._open(protocol)
        else:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(netns_fd)
                try:
                    self.sock = self._open(protocol)
                finally:
                    setns(home)               # cannot fail: it is where this thread came from
            finally:
                os.close(home)
        self.seq = 0

    @staticmethod
    def _open(protocol: int) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    sock.setsockopt(SOL_NETLINK, option, 1)
                except OSError:               # older kernels: errors without the kernel's message
                    pass
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, body: bytes, flags: int = 0) -> list[tuple[int, bytes]]:
        """Send one request and wait for its acknowledgement; the messages answered before it
        ((type, payload) each). NetlinkError when the kernel refuses it."""
        self.seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
                       + body)
        answers: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, got, got_flags, seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise NetlinkError(_errno.EPROTO, "a malformed answer")
                payload = data[offset + _HEADER.size:offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue                  # not the answer to this request
                if got == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code == 0:
                        return answers
                    said = ""
                    if got_flags & NLM_F_ACK_TLVS:   # after the error code and our (capped) header
                        said = attrs(payload, 4 + _HEADER.size).get(NLMSGERR_ATTR_MSG, b"").rstrip(b"\0").decode(
                            errors="replace")
                    raise NetlinkError(-code, said)
                if got == NLMSG_DONE:
                    return answers
                answers.append((got, payload))


# ---- nf_tables: the ruleset's generation ------------------------------------------------------

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1


def nft_generation(sock: Netlink | None = None) -> int | None:
    """The nf_tables ruleset generation of this network namespace: every committed change to
    any nf_tables table (iptables-nft's included) moves it on by one. None when the kernel has
    no nf_tables to ask."""
    own = sock is None
    try:
        sock = sock or Netlink(NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        # struct nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, resource id 0
        for kind, payload in sock.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, struct.pack("=BBH", 0, 0, 0)):
            if kind & 0xFF != NFT_MSG_GETGEN - 1:                   # NFT_MSG_NEWGEN answers
                continue
            value = attrs(payload, 4).get(NFTA_GEN_ID)
            if value is not None and len(value) == 4:
                return struct.unpack(">I", value)[0]
        return None
    except OSError:
        return None
    finally:
        if own:
            sock.close()
