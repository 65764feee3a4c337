"""`weft ipam show|check|rebuild`: the node's pod addresses, for operators.

They read the state dir (store/ipam.py) and, for check and rebuild, the kernel of the namespace
they run in: run them where the plugin runs (the node's namespace). check exits 0 when all is
consistent, 2 when it found problems (each named), 1 on error -- like `weft drift`.

rebuild writes allocations.json anew from the pods' interfaces (alias `weft:<container id>:<ifname>`)
and their proto-201 routes, after the records were lost or corrupted (a corrupt file is kept
aside as allocations.json.corrupt-<time>). The kernel does not know which pod an interface is
for: the old records, the CNI snapshot and, with --from or --kubeconfig, the desired state's pods
of --node name them (the interface name is a hash of the pod's). An interface nothing names keeps
its address (the plugin never hands out an address routed to a live weft interface) but gets no
record; rebuild names it and exits 2.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from collections import Counter
from pathlib import Path

from weft.model.errors import WeftError
from weft.model.names import ROUTE_PROTOCOL, host_iface_name
from weft.probes.pods import wired_pods
from weft.reconciler.output import emit
from weft.store import ipam
from weft.store.statedir import default_state_dir

EXIT_OK, EXIT_ERROR, EXIT_PROBLEMS = 0, 1, 2


def add_parsers(subparsers) -> None:
    """Add `ipam show` and `ipam check` to the `weft` command's subparsers."""
    top = subparsers.add_parser("ipam", help="the node's pod addresses (CNI IPAM): show, check, rebuild")
    sub = top.add_subparsers(dest="ipam_command", required=True)
    for name, text in (("show", "pools, the node's blocks and every pod's addresses"),
                       ("check", "find leaks, double allocations, addresses outside pools (exit 2 if any)"),
                       ("rebuild", "write the records anew from the pods' interfaces (after they were lost)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, default=None, help="weft's state dir (default: /var/lib/weft)")
        p.add_argument("--output", choices=("text", "json"), default="text")
        if name == "rebuild":
            p.add_argument("--network", default=None,
                           help="the CNI network name of the records (default: the old records', else weft)")
            p.add_argument("--node", default=None, help="this node's name (default: the hostname)")
            p.add_argument("--from", dest="from_dir", metavar="DIR", help="name the pods from a manifest directory")
            p.add_argument("--kubeconfig", default=None, help="name the pods from the API server")
            p.add_argument("--context", default=None)


def run(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or Path(default_state_dir())
    if args.ipam_command == "rebuild":
        try:
            return rebuild(args, state_dir)
        except (WeftError, OSError) as exc:
            print(f"weft: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_ERROR
    try:
        node_doc = ipam.read_node_ipam(state_dir)
        allocations = ipam.read_allocations(state_dir, unnamed=True)
        if args.ipam_command == "show":
            data = show(node_doc, allocations)
            _emit(args, data, format_show(data))
            return EXIT_OK
        problems = check(node_doc, allocations, kernel_view())
    except (WeftError, OSError) as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _emit(args, {"problems": problems, "clean": not problems},
          "".join(f"{p['kind']}: {p['detail']}\n" for p in problems)
          or f"IPAM consistent: {len(allocations)} allocations, no problems.\n")
    return EXIT_PROBLEMS if problems else EXIT_OK


def _emit(args, data: dict, text: str) -> None:
    emit(args.output, data, text)


def show(node_doc: dict | None, allocations: list[ipam.Allocation]) -> dict:
    used = [ipaddress.ip_address(ip) for a in allocations for ip in a.ips]
    blocks = []
    for block in (node_doc or {}).get("blocks", ()):
        net = ipaddress.ip_network(block["cidr"])
        blocks.append(block | {"size": net.num_addresses, "used": sum(1 for ip in used if ip in net)})
    return {"node": (node_doc or {}).get("node"), "source": (node_doc or {}).get("source"),
            "pools": (node_doc or {}).get("pools", []), "blocks": blocks,
            "allocations": [a._asdict() | {"ips": list(a.ips)} for a in allocations]}


def format_show(data: dict) -> str:
    if data["node"] is None:
        lines = ["No reconcile run or CNI ADD has written this node's IPAM state yet."]
    else:
        source = data["source"] or {}
        where = f"manifests {source['manifests']}" if "manifests" in source else "the Kubernetes API"
        lines = [f"Node {data['node']} (desired state from {where})", "", "IPPools:"]
        for p in data["pools"]:
            state = "disabled" if p["disabled"] else ("selects this node" if p["selects_node"] else
                                                      "does not select this node")
            lines.append(f"  {p['name']:<20} {p['cidr']:<20} blockSize {p['block_size']:<4} "
                         f"nodeSelector {p['node_selector']}: {state}")
        lines += ["", f"Blocks of {data['node']}:"]
        lines += [f"  {b['cidr']:<20} {b['used']:>5}/{b['size']:<5} in use  pool {b['pool']}  ({b['origin']})"
                  for b in data["blocks"]] or ["  none"]
    lines += ["", f"Allocations ({len(data['allocations'])}):"]
    for a in sorted(data["allocations"], key=lambda a: (a["namespace"], a["pod"])):
        flag = "" if a["active"] else "  (replaced by a newer sandbox, waiting for its DEL)"
        lines.append(f"  {a['namespace'] + '/' + a['pod']:<30} {', '.join(a['ips']):<18} {a['iface']}  "
                     f"container {a['container_id'][:12]} {a['ifname']}{flag}")
    return "\n".join(lines) + "\n"


def kernel_view() -> dict:
    """weft's interfaces and routes in this namespace."""
    wired = wired_pods()
    return {"links": wired.links, "routes": list(wired.routes)}


def check(node_doc: dict | None, allocations: list[ipam.Allocation], kernel: dict) -> list[dict]:
    """Every inconsistency between the records, the pools and blocks, and the kernel (pure)."""
    problems = []

    def problem(kind: str, detail: str) -> None:
        problems.append({"kind": kind, "detail": detail})

    holders: dict[str, list[ipam.Allocation]] = {}
    for a in allocations:
        for ip in a.ips:
            holders.setdefault(ip, []).append(a)
    for ip, owners in sorted(holders.items()):
        if len(owners) > 1:
            problem("double allocation", f"{ip} is held by " + ", ".join(
                f"{a.namespace}/{a.pod} (container {a.container_id} {a.ifname})" for a in owners))
    if node_doc is not None:
        pools = [(ipaddress.ip_network(p["cidr"]), p["name"]) for p in node_doc["pools"]]
        blocks = [ipaddress.ip_network(b["cidr"]) for b in node_doc["blocks"]]
        for ip, owners in sorted(holders.items()):
            addr = ipaddress.ip_address(ip)
            who = f"{owners[0].namespace}/{owners[0].pod}"
            if not any(addr in net for net, _ in pools):
                problem("outside pools", f"{ip} of {who} is in no IPPool")
            elif not any(addr in net for net in blocks):
                problem("outside blocks", f"{ip} of {who} is in none of node {node_doc['node']}'s blocks")
    for a in allocations:
        if not a.pod:
            problem("unnamed record", f"{', '.join(a.ips)} of interface {a.iface} (container {a.container_id} "
                                      f"{a.ifname}): no pod is known for it; `weft ipam rebuild --from/--kubeconfig`")
    active = [a for a in allocations if a.active]
    for iface, count in Counter(a.iface for a in active).items():
        if count > 1:
            problem("interface held twice", f"{iface} is the interface of {count} active attachments")
    for a in active:
        if a.iface not in kernel["links"]:
            problem("leaked address", f"{', '.join(a.ips)} of {a.namespace}/{a.pod} (container {a.container_id} "
                                      f"{a.ifname}): its interface {a.iface} does not exist")
    owned = {a.iface for a in active}
    for name, alias in sorted(kernel["links"].items()):
        if name not in owned:
            problem("leaked interface", f"{name} ({alias or 'no alias'}) has no allocation")
    routed = {(ip, a.iface) for a in active for ip in a.ips}
    for dst, dev in sorted(kernel["routes"]):
        if (dst.split("/")[0], dev) not in routed:
            problem("leaked route", f"{dst} dev {dev} proto {ROUTE_PROTOCOL} matches no allocation")
    return problems


def rebuild(args: argparse.Namespace, state_dir: Path) -> int:
    """`weft ipam rebuild` (see the module docstring)."""
    import os
    from collections import Counter

    from weft.store.snapshot import load_snapshot
    from weft.store.statedir import StateDir
    sd = StateDir(state_dir)
    wired = wired_pods()
    try:
        old = ipam.read_allocations(sd)
    except ipam.CorruptRecords:
        old = []
    identities = {a.iface: (a.namespace, a.pod) for a in old}
    for key in (load_snapshot(sd) or {}).get("pods", ()):
        namespace, _, pod = key.partition("/")
        identities.setdefault(host_iface_name(namespace, pod), (namespace, pod))
    if args.from_dir or args.kubeconfig:
        from weft.desired import sources
        node = args.node or os.uname().nodename
        state = sources.read(state_dir, args.from_dir, args.kubeconfig, args.context).state()
        identities.update({ep.iface: (ep.namespace, ep.pod) for ep in state.endpoints if ep.node == node})
    network = args.network or (Counter(a.network for a in old).most_common(1) or [("weft", 0)])[0][0]
    records, unknown = ipam.records_from_kernel(wired.links, wired.routes, identities, network)
    aside = ipam.rebuild(sd, records)
    unnamed = [a.iface for a in records if not a.pod]
    lines = [f"Rebuilt {len(records)} records (network {network}) from the pods' interfaces."]
    if aside:
        lines.append(f"The corrupt file was kept as {aside}.")
    lines += [f"{iface}: its pod is not known here (give --from or --kubeconfig, and --node): recorded without "
              "a pod; the reconcile run does not program it until a CNI ADD names it" for iface in unnamed]
    lines += [f"{iface}: no weft alias or no route: no record (its addresses stay held)" for iface in unknown]
    _emit(args, {"records": [a._asdict() | {"ips": list(a.ips)} for a in records], "unnamed": unnamed,
                 "unknown": unknown, "set_aside": aside}, "\n".join(lines) + "\n")
    return EXIT_PROBLEMS if unknown or unnamed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m weft.reconciler.ipam_cli show|check|rebuild`: the same as `weft ipam ...`."""
    top = argparse.ArgumentParser(prog="weft")
    add_parsers(top.add_subparsers(dest="command", required=True))
    return run(top.parse_args(["ipam", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
