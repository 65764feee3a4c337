"""`weft bpf policy POD | conntrack | counters`: what this node's eBPF data plane does, from its
pinned maps (run it where weft runs: in the node's network namespace, with the node's state dir).

  policy POD   the rules in force for the pod, each direction in evaluation order, with the
               packets and bytes of the connections each rule decided (the per-CPU counters,
               summed); the rules' names come from the desired state (read like `weft plan`)
  conntrack    the connections weft's programs track: who opened them, where, how long ago
  nat          the service addresses and their backends, and the connections translated
  counters     every (interface, rule) counter
"""
from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from weft.model import bpf as m
from weft.model.errors import WeftError
from weft.reconciler.output import emit
from weft.store.statedir import default_state_dir

FORMAT_VERSION = 1


class RuleRow(TypedDict):
    """One rule of `weft bpf policy`'s JSON, with what it decided."""
    rule: str                           # its id, 8 hex digits
    text: str
    packets: int
    bytes: int


class ServiceRow(TypedDict):
    """One service address of `weft bpf nat`'s JSON."""
    address: str                        # "addr:port"
    protocol: str
    backends: list[str]                 # "addr:port" each
    affinity_seconds: int


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    top = sub.add_parser("bpf", help="show the eBPF data plane of this node: a pod's rules and counters, "
                                     "tracked connections")
    bsub = top.add_subparsers(dest="bpf_command", required=True)
    policy = bsub.add_parser("policy", help="the rules in force for a pod, with per-rule packet and byte counters")
    common(policy)
    policy.add_argument("pod", metavar="POD", help="the pod, as namespace/name")
    for name, text in (("conntrack", "the connections weft's programs track"),
                       ("nat", "service addresses, their backends, and the connections translated"),
                       ("counters", "packets and bytes per interface and rule")):
        p = bsub.add_parser(name, help=text)
        p.add_argument("--node", default=socket.gethostname(), help="this node's name (default: the hostname)")
        p.add_argument("--state-dir", type=Path, default=None,
                       help="where weft keeps its state (default: /var/lib/weft)")
        p.add_argument("--output", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    try:
        show = {"policy": policy, "conntrack": conntrack, "nat": nat, "counters": counters}[args.bpf_command]
        data, text = show(args)
    except (WeftError, OSError) as exc:
        message = str(exc) if isinstance(exc, WeftError) else f"{exc.filename or 'weft'}: {exc.strerror or exc}"
        if args.output == "json":
            print(f'{{"format_version": {FORMAT_VERSION}, "error": {_quote(message)}}}')
        print(f"weft: error: {message}", file=sys.stderr)
        return 1
    emit(args.output, {"format_version": FORMAT_VERSION, "node": args.node, **data}, text)
    return 0


def _quote(text: str) -> str:
    import json
    return json.dumps(text)


def _maps_dir(args: argparse.Namespace) -> Path:
    from weft.reconciler.bpf_apply import build_for, node_pin_dir
    root = node_pin_dir(args.state_dir or Path(default_state_dir()))
    maps_dir = build_for(root).maps_dir(root)
    if not maps_dir.exists():
        raise WeftError(f"node {args.node} has no eBPF data plane here (no maps in {maps_dir}): "
                        f"`weft apply --dataplane ebpf` puts it in place")
    return maps_dir


def _ifaces() -> dict[int, str]:
    from weft.probes.bpf import interfaces
    return interfaces()


# ---- policy POD ---------------------------------------------------------------------------------

def policy(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from weft.model.names import host_iface_name
    from weft.probes.bpf import MapHandle, read_counters
    from weft.reconciler import run as runmod
    namespace, _, name = args.pod.partition("/")
    if not namespace or not name:
        raise WeftError(f"POD is namespace/name, not {args.pod!r}")
    maps_dir = _maps_dir(args)
    opts = runmod.Options(node=args.node, state_dir=args.state_dir or Path(default_state_dir()), from_dir=args.from_dir,
                          kubeconfig=args.kubeconfig, context=args.context, dataplane="ebpf")
    rendered = runmod.desired_state(opts).bpf
    assert rendered is not None
    iface = host_iface_name(namespace, name)
    entry = rendered.endpoints.get(iface)
    if entry is None:
        raise WeftError(f"pod {args.pod} is not a pod of node {args.node} in the desired state")
    index = {n: i for i, n in _ifaces().items()}.get(iface)
    pinned = None
    if index is not None:
        with MapHandle(maps_dir / "endpoints") as handle:
            raw = handle.get(m.pack_key("endpoints", index))
            pinned = None if raw is None else m.unpack_value("endpoints", raw)
    counts = {rule: value for (ifindex, rule), value in read_counters(maps_dir).items() if ifindex == index}
    data: dict[str, Any] = {"pod": args.pod, "interface": iface, "ifindex": index, "in_force": pinned == entry}
    where = f", ifindex {index})" if index is not None else ", not wired here)"
    lines = [f"pod {args.pod} (interface {iface}{where}"]
    if pinned != entry:
        lines.append("  the node's maps do not hold this policy yet: `weft apply --dataplane ebpf`")
    for direction, side in (("egress", entry.egress), ("ingress", entry.ingress)):
        if side.profile == m.PROFILE_OPEN:
            data[direction] = {"state": "open", "rules": []}
            lines.append(f"  {direction}: open (no policy selects it)")
            continue
        if side.profile == m.PROFILE_CLOSED:
            data[direction] = {"state": "closed", "rules": []}
            lines.append(f"  {direction}: closed (not in the desired state yet, and a policy may select it)")
            continue
        rules: list[RuleRow] = []
        for rule in rendered.profiles.get(side.profile, ()):
            packets, size = counts.get(rule, (0, 0))
            rules.append({"rule": f"{rule:08x}", "text": rendered.rules.get(rule, "?"), "packets": packets,
                          "bytes": size})
        data[direction] = {"state": "policed", "profile": f"{side.profile:08x}", "rules": rules}
        lines.append(f"  {direction}: profile {side.profile:08x}, {len(rules)} rules (packets, bytes decided)")
        width = max((len(r["text"]) for r in rules), default=0)
        lines += [f"    {r['rule']}  {r['text']:<{width}}  {r['packets']:>10} {r['bytes']:>12}" for r in rules]
    return data, "\n".join(lines) + "\n"


# ---- conntrack, counters ------------------------------------------------------------------------

def conntrack(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from weft.probes.bpf import read_conntrack
    names = _ifaces()
    rows = []
    for c in sorted(read_conntrack(_maps_dir(args)), key=lambda c: (c.ifindex, c.proto, c.source, c.destination)):
        rows.append({"interface": names.get(c.ifindex, f"ifindex:{c.ifindex}"),
                     "protocol": m.PROTOCOL_NAMES.get(c.proto, str(c.proto)),
                     "source": f"{c.source[0]}:{c.source[1]}", "destination": f"{c.destination[0]}:{c.destination[1]}",
                     "origin": c.origin, "age_seconds": round(c.age_ns / 1e9, 1), "policy_digest": f"{c.digest:08x}"})
    text = [f"{len(rows)} tracked connections"]
    text += [f"  {r['interface']:<16} {r['protocol']:<5} {r['source']:>21} -> {r['destination']:<21} "
             f"{r['origin']:<8} {r['age_seconds']:>8}s" for r in rows]
    return {"connections": rows}, "\n".join(text) + "\n"


def nat(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from weft.probes.bpf import read_maps, read_nat
    maps_dir = _maps_dir(args)
    maps = read_maps(maps_dir)
    services: list[ServiceRow] = []
    for key, entry in sorted(maps.services.items()):
        backends = [f"{b.addr}:{b.port}" for i in range(entry.count)
                    if (b := maps.backends.get(m.BackendKey(entry.id, i))) is not None]
        services.append({"address": f"{key.addr}:{key.port}",
                         "protocol": m.PROTOCOL_NAMES.get(key.proto, str(key.proto)),
                         "backends": backends, "affinity_seconds": entry.affinity})
    rows = [{"protocol": m.PROTOCOL_NAMES.get(t.proto, str(t.proto)), "source": f"{t.source[0]}:{t.source[1]}",
             "destination": f"{t.destination[0]}:{t.destination[1]}", "translated_to": f"{t.to[0]}:{t.to[1]}",
             "age_seconds": round(t.age_ns / 1e9, 1)}
            for t in sorted(read_nat(maps_dir), key=lambda t: (t.proto, t.source, t.destination))]
    text = [f"{len(services)} service addresses"]
    text += [f"  {s['address']:>21}/{s['protocol']:<4} -> {', '.join(s['backends']) or '(no ready backend)'}"
             + (f"  (ClientIP affinity {s['affinity_seconds']} s)" if s["affinity_seconds"] else "") for s in services]
    text.append(f"{len(rows)} translations (both directions of each connection)")
    text += [f"  {r['protocol']:<4} {r['source']:>21} -> {r['destination']:<21} as {r['translated_to']}" for r in rows]
    return {"services": services, "translations": rows}, "\n".join(text) + "\n"


def counters(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from weft.probes.bpf import read_counters
    names = _ifaces()
    rows = [{"interface": names.get(ifindex, f"ifindex:{ifindex}"), "rule": f"{rule:08x}", "packets": packets,
             "bytes": size} for (ifindex, rule), (packets, size) in sorted(read_counters(_maps_dir(args)).items())]
    text = [f"{len(rows)} counters (interface, rule: packets, bytes)"]
    text += [f"  {r['interface']:<16} {r['rule']}  {r['packets']:>10} {r['bytes']:>12}" for r in rows]
    return {"counters": rows}, "\n".join(text) + "\n"
