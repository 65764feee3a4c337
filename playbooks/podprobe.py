"""The lab's prober: from inside one pod namespace, tries every target at once and says which answered.

Reads {"timeout": seconds, "targets": [{"ip": ..., "proto": "tcp"|"udp", "port": ...}, ...]} as
JSON on stdin and prints a JSON list of booleans in the same order. Probes run concurrently, so a
whole row of the matrix costs about one timeout however many targets are dropped. A refused
connection (REJECT, ICMP unreachable) fails fast; a dropped one waits out the timeout; both are
False. Standard library only, so it can start without site-packages (`python -I -S podprobe.py`).
"""
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PAYLOAD = b"weft-lab-probe"


def probe_tcp(ip: str, port: int, timeout: float) -> bool:
    """Connected means the handshake completed and the server's reply arrived."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((ip, port), timeout=timeout) as sock:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        return bool(sock.recv(64))


def probe_udp(ip: str, port: int, timeout: float) -> bool:
    """Connected means the echo came back; a connected socket also reports ICMP unreachable."""
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.send(PAYLOAD)
        return sock.recv(2048) == PAYLOAD


PROBES = {"tcp": probe_tcp, "udp": probe_udp}


def probe(target: dict, timeout: float) -> bool:
    try:
        return PROBES[target["proto"].lower()](target["ip"], int(target["port"]), timeout)
    except OSError:
        return False


def main() -> None:
    request = json.load(sys.stdin)
    targets, timeout = request["targets"], float(request["timeout"])
    with ThreadPoolExecutor(max_workers=max(len(targets), 1)) as pool:
        results = list(pool.map(lambda target: probe(target, timeout), targets))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
