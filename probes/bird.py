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

from weft.model.errors import WeftError
from weft.store.statedir import StateDir

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


class BirdCommandError(WeftError):
    """birdc or bird failed (or is missing, or timed out); the message is BIRD's own."""


CONFIG_LIMIT = 16 << 20          # no configuration weft renders comes near this


def read_live(state_dir: StateDir, name: str) -> str | None:
    """The configuration file's text, or None when there is none. Read through the state dir's
    checks: a symbolic link, a file of another user's or one others may write is refused."""
    data = state_dir.read_bytes(name, CONFIG_LIMIT)
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data.decode(errors="replace")       # not weft's text: it differs from any desired one


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


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    """BIRD's tool, with its failures to run at all as BirdCommandError (one line each)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise BirdCommandError(f"{argv[0]} is not installed (Debian package bird2): weft needs it for BGP") from None
    except subprocess.TimeoutExpired:
        raise BirdCommandError(f"`{' '.join(argv)}` did not finish within {TIMEOUT:g}s") from None
    except OSError as exc:
        raise BirdCommandError(f"cannot run {argv[0]}: {exc.strerror}") from None


def check_config(path: str | Path) -> str | None:
    """BIRD's complaint about the configuration file (`bird -p -c`), or None when it parses."""
    done = _run([BIRD, "-p", "-c", str(path)])
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip().removeprefix("bird: ") or f"bird -p exited {done.returncode}"


def birdc(socket_path: str, *command: str) -> str:
    """Run one birdc command; BIRD's banner line is dropped. Raises BirdCommandError with BIRD's
    message when birdc fails (no BIRD on the socket, a command BIRD refuses)."""
    done = _run([BIRDC, "-s", socket_path, *command])
    lines = [ln for ln in done.stdout.splitlines() if not ln.startswith("BIRD ") or not ln.endswith(" ready.")]
    if done.returncode != 0:
        message = "; ".join(ln.strip() for ln in lines + done.stderr.splitlines() if ln.strip())
        raise BirdCommandError(f"birdc {' '.join(command)}: {message or f'exited {done.returncode}'}")
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
