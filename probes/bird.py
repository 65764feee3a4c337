"""Reading back BIRD: the live configuration file, whether BIRD runs, its protocols and routes.

Everything goes through BIRD's own tools (`bird -p`, `birdc -s SOCKET ...`), so weft needs no
knowledge of BIRD's control protocol; the parsers read the tables `birdc` prints with the
`timeformat ... iso long ms` weft's configuration sets.
"""
from __future__ import annotations

import re
import socket as socketlib
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BIRD = "bird"
BIRDC = "birdc"
TIMEOUT = 10.0
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ENTRY = re.compile(r"^(unicast|blackhole|unreachable|prohibited)\s+\[(\S+)[^\]]*\]\s*(\*?)")
_VIA = re.compile(r"^(?:via\s+(\S+)\s+on\s+(\S+)|dev\s+(\S+))")


@dataclass(frozen=True)
class Protocol:
    """One line of `birdc show protocols`."""
    name: str
    proto: str          # BGP, Kernel, Static, Device, Direct
    table: str
    state: str          # up, start, down, ...
    since: str          # "2026-01-02 10:20:30.123"
    info: str           # for BGP: Established, Active, Connect, Passive, ...


@dataclass(frozen=True)
class Route:
    """One route of `birdc show route`."""
    prefix: str
    kind: str           # unicast, blackhole, unreachable
    protocol: str       # the BIRD protocol it came from
    primary: bool       # the one BIRD selected (and exports)
    via: tuple[str, ...] = field(default=())   # "198.18.0.2 on eth0" (several when multipath)


class BirdCommandError(RuntimeError):
    """birdc or bird failed; the message is BIRD's own."""


def read_live(path: Path) -> str | None:
    """The configuration file's text, or None when there is none."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def running(socket_path: str) -> bool:
    """True when a BIRD answers on the control socket (a stale socket file does not count)."""
    if not Path(socket_path).exists():
        return False
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(socket_path)
        except OSError:
            return False
    return True


def check_config(path: Path) -> str | None:
    """BIRD's complaint about the configuration file (`bird -p -c`), or None when it parses."""
    done = subprocess.run([BIRD, "-p", "-c", str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip().removeprefix("bird: ") or f"bird -p exited {done.returncode}"


def birdc(socket_path: str, *command: str) -> str:
    """Run one birdc command; BIRD's banner line is dropped. Raises BirdCommandError with BIRD's
    message when birdc fails (no BIRD on the socket, a command BIRD refuses)."""
    done = subprocess.run([BIRDC, "-s", socket_path, *command], capture_output=True, text=True, timeout=TIMEOUT)
    lines = [ln for ln in done.stdout.splitlines() if not ln.startswith("BIRD ") or not ln.endswith(" ready.")]
    if done.returncode != 0:
        message = "\n".join(lines + done.stderr.strip().splitlines()).strip()
        raise BirdCommandError(message or f"birdc {' '.join(command)} exited {done.returncode}")
    return "\n".join(lines)


def parse_protocols(text: str) -> list[Protocol]:
    protocols = []
    for line in text.splitlines():
        parts = line.split(None, 6)
        if len(parts) < 5 or parts[0] == "Name":
            continue
        name, proto, table, state, *rest = parts
        if rest and len(rest) > 1 and _DATE.match(rest[0]):
            since, info = f"{rest[0]} {rest[1]}", " ".join(rest[2:])
        else:
            since, info = rest[0] if rest else "", " ".join(rest[1:])
        protocols.append(Protocol(name, proto, table, state, since, " ".join(info.split())))
    return protocols


def show_protocols(socket_path: str) -> list[Protocol]:
    return parse_protocols(birdc(socket_path, "show", "protocols"))


def parse_routes(text: str) -> list[Route]:
    """Routes of `birdc show route`: a line with a prefix starts a route; an indented line of the
    same shape is another route to that prefix; indented `via`/`dev` lines are next hops."""
    routes: list[Route] = []
    prefix = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith("Table "):
            continue
        if not line[0].isspace():
            prefix, _, line = line.partition(" ")
        entry = _ENTRY.match(line.strip())
        if entry:
            routes.append(Route(prefix, entry.group(1), entry.group(2), entry.group(3) == "*"))
            continue
        hop = _VIA.match(line.strip())
        if hop and routes:
            last = routes[-1]
            routes[-1] = Route(last.prefix, last.kind, last.protocol, last.primary,
                               (*last.via, " on ".join(g for g in hop.groups() if g)))
    return routes


def show_routes(socket_path: str, protocol: str | None = None) -> list[Route]:
    """Every route in BIRD's tables (or only those of one protocol)."""
    command = ["show", "route"] + (["protocol", protocol] if protocol else [])
    return parse_routes(birdc(socket_path, *command))


def last_reconfiguration(socket_path: str) -> datetime | None:
    """When BIRD last read a configuration (start or reload), from `show status`; None if unknown."""
    text = birdc(socket_path, "show", "status")
    match = re.search(r"Last reconfiguration on (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?)", text)
    if not match:
        return None
    return datetime.fromisoformat(match.group(1))
