"""A pod's wiring, Calico style, with iproute2 and /proc/sys: the kernel work of ADD, DEL and CHECK.

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

The plugin runs in the node's namespace; the pod's side is configured by one `ip -batch` started
from inside the pod's namespace: the calling thread enters it (setns), starts `ip`, which inherits
it, and returns at once. Unlike `ip netns exec`, this takes any netns path and does not remount
/sys; unlike `nsenter`, it costs no extra process. The host side of pods wired at once (the CNI
helper's threads) is one `ip -batch` for all of them (cni.groupcommit). pyroute2 would cost 0.4 s
to import, more than a whole ADD, and more CPU per pod than `ip` once imported.
"""
from __future__ import annotations

import json
import os
import subprocess

from weft.model.names import ROUTE_PROTOCOL, host_sysctls  # defined once, for the reconciler too

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
CLONE_NEWNET = 0x40000000


def _run(argv: list[str], commands: list[str] | None = None, check: bool = True, netns: str | None = None,
         netns_fd: int | None = None) -> str:
    """Run one command (an `ip -batch -` reads `commands` on stdin), in the network namespace
    `netns` (a path; or the open descriptor `netns_fd` of it) if given; WiringError when it fails."""
    stdin = "".join(c + "\n" for c in commands) if commands else None
    where = f" (in {netns})" if netns else ""
    try:
        proc = _start(argv, stdin is not None) if netns is None else \
            _start_in_netns(netns, argv, stdin is not None, netns_fd)
        out, err = proc.communicate(stdin)
    except OSError as exc:
        raise WiringError(f"{argv[0]}{where}: {exc.strerror}") from None
    if check and proc.returncode != 0:
        shown = " ".join(argv) + where + (" <<< " + "; ".join(commands) if commands else "")
        raise WiringError(f"{shown}: {err.strip() or f'exit {proc.returncode}'}")
    return out


def _start_in_netns(netns: str, argv: list[str], with_stdin: bool, netns_fd: int | None = None) -> subprocess.Popen:
    """Start `argv` inside the network namespace at path `netns` (or open as `netns_fd`): this
    thread enters it, the child inherits it, and the thread goes back before anything else runs in it."""
    try:
        target = os.dup(netns_fd) if netns_fd is not None else os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise WiringError(f"cannot open network namespace {netns}: {exc.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as exc:
            raise WiringError(f"cannot enter network namespace {netns}: {exc.strerror}") from None
        try:
            return _start(argv, with_stdin)
        finally:
            _setns(home)                       # cannot fail: it is where this thread came from
    finally:
        os.close(target)
        os.close(home)


def _start(argv: list[str], with_stdin: bool) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE if with_stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):                  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


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


def random_mac() -> str:
    """A locally administered unicast MAC for the pod side, chosen here so ADD need not read it back."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def wire(netns: str, ifname: str, host_iface: str, ips: list[str], mtu: int, alias: str, *,
         netns_fd: int | None = None, host_side=None) -> str:
    """Create and configure the veth pair; returns the pod side's MAC. Raises WiringError (the
    caller removes what was made). `netns_fd`: the pod's namespace, opened and checked by the
    caller; `host_side(lines)`: runs the host side's `ip -batch` lines (default: at once)."""
    pod_mac = random_mac()
    v6 = [ip for ip in ips if ":" in ip]
    v4 = [ip for ip in ips if ":" not in ip]
    node_netns = f"/proc/{os.getpid()}/ns/net"
    pod = [f"link add {ifname} address {pod_mac} mtu {mtu} type veth peer name {host_iface} "
           f"address {HOST_MAC} mtu {mtu} netns {node_netns}",
           f"link set {ifname} up"]
    pod += [f"addr add {ip}/32 dev {ifname}" for ip in v4]
    pod += [f"addr add {ip}/128 dev {ifname} nodad" for ip in v6]
    if v4:
        pod += [f"neigh add {GATEWAY_V4} lladdr {HOST_MAC} dev {ifname} nud permanent",
                f"route add default via {GATEWAY_V4} dev {ifname} onlink"]
    if v6:
        pod += [f"neigh add {GATEWAY_V6} lladdr {HOST_MAC} dev {ifname} nud permanent",
                f"route add default via {GATEWAY_V6} dev {ifname}"]
    _run([IP, "-batch", "-"], pod, netns=netns, netns_fd=netns_fd)
    for key, value in host_sysctls(host_iface, bool(v6)).items():
        _write_sysctl(key, value)
    host = [f"link set {host_iface} alias {alias} up"]
    host += [f"route replace {ip}/32 dev {host_iface} scope link proto {ROUTE_PROTOCOL}" for ip in v4]
    host += [f"route replace {ip}/128 dev {host_iface} proto {ROUTE_PROTOCOL}" for ip in v6]
    (host_side or configure_host_sides)(host)
    return pod_mac


def configure_host_sides(lines: list[str]) -> None:
    """The host side of one or more pods, in one `ip -batch` (each line is idempotent)."""
    _run([IP, "-batch", "-"], lines)


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
    out = subprocess.run([IP, "link", "del", "dev", host_iface], capture_output=True, text=True)
    if out.returncode != 0 and host_iface in host_links():
        raise WiringError(f"ip link del dev {host_iface}: {out.stderr.strip()}")


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
