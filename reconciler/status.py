"""`weft status`: this node's BGP sessions, like `calicoctl node status`, from BIRD itself.

Peers come from `birdc show protocols` (the protocol names say kind and address, see
renderers.bird), the node's blocks and the routes learned from each peer from `birdc show route`.
Exit 0 when BIRD answers, 1 when it does not (like calicoctl's "process is not running").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from weft.reconciler.output import emit

FORMAT_VERSION = 1
BLOCKS_PROTOCOLS = ("weft_blocks_v4", "weft_blocks_v6")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("status", help="show this node's BGP sessions, blocks and learned routes")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="weft's state dir, where bird.ctl is (default: /var/lib/weft)")
    p.add_argument("--socket", default=None, help="BIRD's control socket (default: <state dir>/bird.ctl)")
    p.add_argument("--output", choices=("text", "json"), default="text")


def collect(socket: str) -> dict[str, Any]:
    """Everything status shows, as data. {"running": False, ...} when BIRD does not answer."""
    from weft.probes import bird as probe  # here: the parser is built on every weft command's path
    peers: list[dict[str, Any]] = []
    other: list[str] = []
    data: dict[str, Any] = {"format_version": FORMAT_VERSION, "socket": socket, "running": probe.running(socket),
                            "peers": peers, "blocks": [], "other_bgp": other}
    if not data["running"]:
        return data
    from weft.renderers.bird import KINDS, parse_protocol_name  # not on every weft command's import path
    routes = probe.show_routes(socket)
    by_protocol: dict[str, list] = {}
    for route in routes:
        by_protocol.setdefault(route.protocol, []).append(route)
    for p in probe.show_protocols(socket):
        if p.proto != "BGP":
            continue
        parsed = parse_protocol_name(p.name)
        if parsed is None:
            other.append(p.name)
            continue
        kind, address, port = parsed
        learned = [{"prefix": r.prefix, "via": list(r.via), "primary": r.primary}
                   for r in by_protocol.get(p.name, ())]
        peers.append({"name": p.name, "address": address, "port": port, "kind": KINDS[kind],
                      "state": p.state, "since": p.since, "info": p.info, "routes": learned})
    data["blocks"] = sorted(r.prefix for name in BLOCKS_PROTOCOLS for r in by_protocol.get(name, ()))
    return data


def format_text(data: dict) -> str:
    if not data["running"]:
        return f"BIRD is not running (nothing answers on {data['socket']}).\n"
    rows = [("PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO")]
    rows += [(p["address"] + (f":{p['port']}" if p["port"] else ""), p["kind"], p["state"], p["since"], p["info"])
             for p in data["peers"]]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    table = [rule, lines[0], rule, *lines[1:], rule]
    out = [f"BIRD is running (control socket {data['socket']}).", "", "BGP peers", *table, ""]
    out.append("This node's blocks: " + (", ".join(data["blocks"]) or "none"))
    out.append("")
    out.append("Routes learned")
    learned = [(p, r) for p in data["peers"] for r in p["routes"]]
    for p, r in learned:
        out.append(f"  {r['prefix']:<20} via {', '.join(r['via']) or '-':<28} from {p['address']} ({p['kind']})"
                   + ("" if r["primary"] else "  (not selected)"))
    if not learned:
        out.append("  none")
    return "\n".join(out) + "\n"


def run(args) -> int:
    from weft.probes import bird as probe
    from weft.reconciler.bird import default_socket
    from weft.store.statedir import default_state_dir
    socket = args.socket or default_socket(args.state_dir or Path(default_state_dir()))
    try:
        data = collect(socket)
    except probe.BirdCommandError as exc:
        data = {"format_version": FORMAT_VERSION, "socket": socket, "running": False, "error": str(exc)}
    emit(args.output, data, format_text(data) if "error" not in data else f"weft: error: {data['error']}\n")
    return 0 if data["running"] else 1
