"""A pod's wiring, Calico style, over netlink and /proc/sys: the kernel work of ADD, DEL and CHECK.

The pod gets one veth: its side is CNI_IFNAME in the pod's namespace, with the pod's address as a
/32 (/128), a default route via 169.254.1.1 (IPv6: the host side's link-local address) `onlink`,
and a PERMANENT neighbour entry mapping that gateway to the host side's fixed MAC
ee:ee:ee:ee:ee:ee. With the neighbour entry the pod never has to ARP for its gateway, so nothing
depends on proxy ARP on the host side -- which answers for 169.254.1.1 only when the node itself
has a route to that address through another interface (a fresh node may have none). The host
side, named by desired.endpoints.host_iface_name, gets a /32 (/128) route to the pod marked with
weft's route protocol (desired.endpoints.ROUTE_PROTOCOL, 201), an alias naming the attachment
("weft:<container id>:<ifname>", so any process can tell whose it is), and the sysctls of
desired.endpoints.host_sysctls, on that interface only.

The plugin runs in the node's namespace and configures both sides over netlink
(probes.netlink), as iproute2 would: for the pod's side, through a socket made inside the pod's
namespace (the calling thread enters it with setns just to make the socket, and goes back).
Unlike `ip netns exec`, this takes any netns path and does not remount /sys; unlike running
`ip`, it starts no process: an `ip` costs ~5 ms of CPU here, most of it its own start-up, and an
ADD needed two. pyroute2 would cost 0.4 s to import, more than a whole ADD. CHECK, GC and the
rare look-ups of an interface's alias still read with `ip -j` (`_run`): read back by another
tool, what ADD made is checked independently of how it was made.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess

from weft.model.names import ROUTE_PROTOCOL, host_sysctls  # defined once, for the reconciler too
from weft.probes.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, Netlink, attr, attr_str, attr_u32, attrs, setns

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"   # the EUI-64 link-local address of HOST_MAC
DEFAULT_MTU = 1500
ALIAS_PREFIX = "weft:"
ALIAS_MAX = 255                            # IFALIASZ - 1: the kernel refuses a longer alias


class WiringError(Exception):
    """A wiring command failed; the message names the command and what the kernel said."""


def alias_for(container_id: str, ifname: str) -> str:
    return f"{ALIAS_PREFIX}{container_id}:{ifname}"


def _binary(name: str) -> str:
    """An absolute path: a runtime's PATH for plugins may be minimal."""
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        path = f"{directory}/{name}"
        if os.access(path, os.X_OK):
            return path
    return name


IP = _binary("ip")


def _run(argv: list[str], check: bool = True, netns: str | None = None) -> str:
    """Run one read-only command (`ip -j ...`: CHECK, GC), in the network namespace `netns` (a
    path) if given; WiringError when it fails."""
    where = f" (in {netns})" if netns else ""
    try:
        proc = _start(argv) if netns is None else _start_in_netns(netns, argv)
        out, err = proc.communicate()
    except OSError as exc:
        raise WiringError(f"{argv[0]}{where}: {exc.strerror}") from None
    if check and proc.returncode != 0:
        raise WiringError(f"{' '.join(argv)}{where}: {err.strip() or f'exit {proc.returncode}'}")
    return out


def _start_in_netns(netns: str, argv: list[str]) -> subprocess.Popen:
    """Start `argv` inside the network namespace at path `netns`: this thread enters it, the child
    inherits it, and the thread goes back before anything else runs in it."""
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise WiringError(f"cannot open network namespace {netns}: {exc.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns(target)
        except OSError as exc:
            raise WiringError(f"cannot enter network namespace {netns}: {exc.strerror}") from None
        try:
            return _start(argv)
        finally:
            setns(home)                       # cannot fail: it is where this thread came from
    finally:
        os.close(target)
        os.close(home)


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def host_links() -> set[str]:
    """Interface names in this process's network namespace (/proc/self/net is per namespace)."""
    with open("/proc/self/net/dev") as f:
        return {line.split(":", 1)[0].strip() for line in f.readlines()[2:]}


def link_info(name: str) -> dict | None:
    """`ip -j -d link show NAME` in this namespace, or None when there is no such interface."""
    out = _run([IP, "-j", "-d", "link", "show", "dev", name], check=False)
    try:
        links = json.loads(out) if out.strip() else []
    except ValueError:
        return None
    return links[0] if links else None


def link_alias(name: str) -> str | None:
    """The alias of interface `name` in this namespace; None when it has none, or there is no such interface."""
    try:
        with Netlink() as sock:
            answers = sock.request(RTM_GETLINK, _link(0) + attr_str(IFLA_IFNAME, name))
    except OSError:
        return None
    for kind, payload in answers:
        if kind == RTM_NEWLINK:
            alias = attrs(payload, struct.calcsize("=BxHiII")).get(IFLA_IFALIAS)
            return alias.rstrip(b"\0").decode(errors="replace") if alias is not None else None
    return None


def random_mac() -> str:
    """A locally administered unicast MAC for the pod side, chosen here so ADD need not read it back."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def wire(netns: str, ifname: str, host_iface: str, ips: list[str], mtu: int, alias: str, *,
         netns_fd: int | None = None) -> str:
    """Create and configure the veth pair; returns the pod side's MAC. Raises WiringError (the
    caller removes what was made). `netns_fd`: the pod's namespace, opened and checked by the
    caller (else `netns` is opened here).

    Over netlink (probes.netlink), as `ip` would do it, in this order: the pair made from the pod's
    side, the pod side up with its addresses, gateway neighbour and default route; then the host
    side's sysctls, its alias, up, and its routes."""
    pod_mac = random_mac()
    v6 = [ip for ip in ips if ":" in ip]
    v4 = [ip for ip in ips if ":" not in ip]
    where = f" (in {netns})"
    try:
        target = os.dup(netns_fd) if netns_fd is not None else os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise WiringError(f"cannot open network namespace {netns}: {exc.strerror}") from None
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                pod = Netlink(netns_fd=target)
            except OSError as exc:
                raise WiringError(f"cannot enter network namespace {netns}: {exc.strerror}") from None
            with pod:
                _step(f"link add {ifname} type veth peer name {host_iface}{where}", pod.request, RTM_NEWLINK,
                      _veth(ifname, pod_mac, mtu, host_iface, HOST_MAC, home), NLM_F_CREATE | NLM_F_EXCL)
                index = _step(f"link show {ifname}{where}", _link_index, pod, ifname)
                for ip in v4:
                    _step(f"addr add {ip}/32 dev {ifname}{where}", pod.request, RTM_NEWADDR,
                          _address(socket.AF_INET, ip, 32, index), NLM_F_CREATE | NLM_F_EXCL)
                for ip in v6:
                    _step(f"addr add {ip}/128 dev {ifname} nodad{where}", pod.request, RTM_NEWADDR,
                          _address(socket.AF_INET6, ip, 128, index, IFA_F_NODAD), NLM_F_CREATE | NLM_F_EXCL)
                for family, gateway, present in ((socket.AF_INET, GATEWAY_V4, v4), (socket.AF_INET6, GATEWAY_V6, v6)):
                    if not present:
                        continue
                    _step(f"neigh add {gateway} lladdr {HOST_MAC} dev {ifname} nud permanent{where}", pod.request,
                          RTM_NEWNEIGH, _neighbour(family, gateway, HOST_MAC, index), NLM_F_CREATE | NLM_F_EXCL)
                    onlink = family == socket.AF_INET
                    _step(f"route add default via {gateway} dev {ifname}{' onlink' if onlink else ''}{where}",
                          pod.request, RTM_NEWROUTE, _route(family, None, gateway, index, RTPROT_BOOT,
                                                            RT_SCOPE_UNIVERSE, RTNH_F_ONLINK if onlink else 0),
                          NLM_F_CREATE | NLM_F_EXCL)
        finally:
            os.close(home)
    finally:
        os.close(target)
    for key, value in host_sysctls(host_iface, bool(v6)).items():
        _write_sysctl(key, value)
    with _step("open a netlink socket", Netlink) as host:
        _step(f"link set {host_iface} alias {alias} up", host.request, RTM_NEWLINK,
              _link(0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, host_iface) + attr(IFLA_IFALIAS, alias.encode()))
        index = _step(f"link show {host_iface}", _link_index, host, host_iface)
        for ip in v4:
            _step(f"route replace {ip}/32 dev {host_iface} scope link proto {ROUTE_PROTOCOL}", host.request,
                  RTM_NEWROUTE, _route(socket.AF_INET, ip, None, index, ROUTE_PROTOCOL, RT_SCOPE_LINK),
                  NLM_F_CREATE | NLM_F_REPLACE)
        for ip in v6:
            _step(f"route replace {ip}/128 dev {host_iface} proto {ROUTE_PROTOCOL}", host.request, RTM_NEWROUTE,
                  _route(socket.AF_INET6, ip, None, index, ROUTE_PROTOCOL, RT_SCOPE_UNIVERSE),
                  NLM_F_CREATE | NLM_F_REPLACE)
    return pod_mac


# ---- rtnetlink messages (linux/rtnetlink.h, linux/if_link.h), as iproute2 builds them -----------

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH = 16, 17, 18, 20, 24, 28
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 1, 3, 4, 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFF_UP = 0x1
IFA_ADDRESS, IFA_LOCAL, IFA_F_NODAD = 1, 2, 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST, RTNH_F_ONLINK = 254, 3, 1, 0x4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
NDA_DST, NDA_LLADDR, NUD_PERMANENT = 1, 2, 0x80


def _step(what: str, fn, *args):
    """One netlink step; WiringError naming it (as the `ip` command it stands for) if refused."""
    try:
        return fn(*args)
    except OSError as exc:
        raise WiringError(f"{what}: {exc.strerror}") from None


def _link(index: int, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)     # struct ifinfomsg


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _veth(ifname: str, mac: str, mtu: int, peer: str, peer_mac: str, peer_netns: int) -> bytes:
    """The pod side (up) and, as its peer, the host side (down until configured) in `peer_netns`."""
    peer_info = (_link(0) + attr_str(IFLA_IFNAME, peer) + attr(IFLA_ADDRESS, _mac(peer_mac))
                 + attr_u32(IFLA_MTU, mtu) + attr_u32(IFLA_NET_NS_FD, peer_netns))
    info = attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))
    return (_link(0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, ifname) + attr(IFLA_ADDRESS, _mac(mac))
            + attr_u32(IFLA_MTU, mtu) + attr(IFLA_LINKINFO, info))


def _link_index(sock: Netlink, name: str) -> int:
    for kind, payload in sock.request(RTM_GETLINK, _link(0) + attr_str(IFLA_IFNAME, name)):
        if kind == RTM_NEWLINK:
            return struct.unpack_from("=BxHiII", payload)[2]
    raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))


def _address(family: int, ip: str, prefix: int, index: int, flags: int = 0) -> bytes:
    raw = socket.inet_pton(family, ip)
    return struct.pack("=BBBBI", family, prefix, flags, RT_SCOPE_UNIVERSE, index) + attr(IFA_LOCAL, raw) + \
        attr(IFA_ADDRESS, raw)


def _neighbour(family: int, ip: str, mac: str, index: int) -> bytes:
    return struct.pack("=BxxxiHBB", family, index, NUD_PERMANENT, 0, 0) + attr(NDA_DST, socket.inet_pton(family, ip)) \
        + attr(NDA_LLADDR, _mac(mac))


def _route(family: int, dst: str | None, gateway: str | None, index: int, protocol: int, scope: int,
           flags: int = 0) -> bytes:
    """A unicast route in the main table: to `dst` (a host route) or the default, via `gateway` or not."""
    length = 0 if dst is None else (32 if family == socket.AF_INET else 128)
    out = struct.pack("=BBBBBBBBI", family, length, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, flags)
    if dst is not None:
        out += attr(RTA_DST, socket.inet_pton(family, dst))
    if gateway is not None:
        out += attr(RTA_GATEWAY, socket.inet_pton(family, gateway))
    return out + attr_u32(RTA_OIF, index)


def _write_sysctl(key: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
    except OSError as exc:
        raise WiringError(f"setting {key.replace('/', '.')}={value}: {exc.strerror}") from None


def _read_sysctl(key: str) -> str | None:
    try:
        with open(f"/proc/sys/{key}") as f:
            return f.read().strip()
    except OSError:
        return None


def delete_host_side(host_iface: str) -> None:
    """Delete the host side (the pod side goes with it); quiet when it is already gone."""
    try:
        with Netlink() as sock:
            sock.request(RTM_DELLINK, _link(0) + attr_str(IFLA_IFNAME, host_iface))
    except OSError as exc:
        if exc.errno != errno.ENODEV and host_iface in host_links():
            raise WiringError(f"ip link del dev {host_iface}: {exc.strerror}") from None


def check(netns: str, ifname: str, host_iface: str, ips: list[str], mtu: int, alias: str) -> list[str]:
    """Everything ADD made, read back; one line per missing or changed thing (empty: all there)."""
    problems: list[str] = []
    host = link_info(host_iface)
    if host is None:
        return [f"host interface {host_iface} is missing"]
    if host.get("ifalias") != alias:
        problems.append(f"host interface {host_iface} belongs to {host.get('ifalias')!r}, not {alias!r}")
    if "UP" not in host.get("flags", ()):
        problems.append(f"host interface {host_iface} is down")
    if host.get("address") != HOST_MAC:
        problems.append(f"host interface {host_iface} has MAC {host.get('address')}, not {HOST_MAC}")
    if host.get("mtu") != mtu:
        problems.append(f"host interface {host_iface} has MTU {host.get('mtu')}, not {mtu}")
    v6 = any(":" in ip for ip in ips)
    for key, value in host_sysctls(host_iface, v6).items():
        actual = _read_sysctl(key)
        if actual != value:
            problems.append(f"sysctl {key.replace('/', '.')} is {actual}, not {value}")
    routes = json.loads(_run([IP, "-j", "route", "show", "dev", host_iface, "proto", str(ROUTE_PROTOCOL)]) or "[]")
    routes += json.loads(_run([IP, "-j", "-6", "route", "show", "dev", host_iface, "proto",
                               str(ROUTE_PROTOCOL)]) or "[]") if v6 else []
    routed = {r.get("dst") for r in routes}
    problems += [f"host route {ip} dev {host_iface} proto {ROUTE_PROTOCOL} is missing"
                 for ip in ips if ip not in routed]
    problems += _check_pod(netns, ifname, ips, mtu, host)
    return problems


def _check_pod(netns: str, ifname: str, ips: list[str], mtu: int, host: dict) -> list[str]:
    """The pod's side. One `ip` per query: in batch mode `ip` keeps filters from one command to the next."""
    def query(*argv: str) -> list:
        out = _run([IP, "-j", *argv], check=False, netns=netns)
        try:
            return json.loads(out) if out.strip() else []
        except ValueError:
            return []

    links = query("-d", "addr", "show", "dev", ifname)
    if not links:
        return [f"interface {ifname} is missing in {netns}"]
    link, problems = links[0], []
    if "UP" not in link.get("flags", ()):
        problems.append(f"interface {ifname} in {netns} is down")
    if link.get("mtu") != mtu:
        problems.append(f"interface {ifname} in {netns} has MTU {link.get('mtu')}, not {mtu}")
    if link.get("link_index") != host.get("ifindex") or host.get("link_index") != link.get("ifindex"):
        problems.append(f"interface {ifname} in {netns} is not the peer of host interface {host.get('ifname')}")
    have = {(a.get("local"), a.get("prefixlen")) for a in link.get("addr_info", ())}
    for ip in ips:
        if (ip, 128 if ":" in ip else 32) not in have:
            problems.append(f"address {ip}/{128 if ':' in ip else 32} is missing on {ifname} in {netns}")
    neighbours = query("neigh", "show", "dev", ifname)
    for family, gateway in (("-4", GATEWAY_V4), ("-6", GATEWAY_V6)):
        if not any((":" in ip) == (family == "-6") for ip in ips):
            continue
        if not any(r.get("dst") == "default" and r.get("gateway") == gateway
                   for r in query(family, "route", "show", "dev", ifname)):
            problems.append(f"default route via {gateway} on {ifname} is missing in {netns}")
        if not any(n.get("dst") == gateway and n.get("lladdr") == HOST_MAC and "PERMANENT" in n.get("state", ())
                   for n in neighbours):
            problems.append(f"permanent neighbour {gateway} -> {HOST_MAC} on {ifname} is missing in {netns}")
    return problems
