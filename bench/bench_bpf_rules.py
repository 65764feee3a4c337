"""Rules vs connection cost: iptables and eBPF side by side, both put in place by `weft apply`.

A lab node (playbooks.netlab: namespaces and veths only, addresses from 198.18.0.0/15) with a
client and a server pod. The server is selected by one NetworkPolicy with 0, 1,000 or 10,000
ingress rules before the one that admits the client (each rule: one /32 peer that is not the
client, TCP port 80): every rule selects the destination, so iptables walks them all for each new
connection, while eBPF looks the verdict up in maps whose lookups do not depend on the count.

For each count and each plane, `weft apply --dataplane iptables|ebpf` (in the node namespace,
through nsenter so bpffs stays visible; a state directory per plane, destroyed after) puts the
policy in place; then the client opens, reads and closes connections one after another. One run,
printed side by side: connections per second, per-connection latency (p50, p99), eBPF relative to
iptables, and each plane relative to itself without rules.

Run as root:  .venv/bin/python -m bench.bench_bpf_rules [--connections N] [--counts 0,1000,10000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.bench_bpf import CLIENT, CLIENT_IP, NODE, SERVER_IP
from bench.installed import compile_weft

COUNTS = (0, 1_000, 10_000)
PLANES = ("iptables", "ebpf")


def manifests(directory: Path, rules: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    docs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}},
                        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}]
    for name, ip in (("server", SERVER_IP), ("client", CLIENT_IP)):
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
                     "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
                     "status": {"podIP": ip, "phase": "Running"}})
    if rules:
        decoys = [{"from": [{"ipBlock": {"cidr": f"198.19.{i >> 8 & 255}.{i & 255}/32"}}],
                   "ports": [{"port": 80, "protocol": "TCP"}]} for i in range(rules)]
        admit = {"from": [{"ipBlock": {"cidr": f"{CLIENT_IP}/32"}}], "ports": [{"port": 80, "protocol": "TCP"}]}
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "server", "namespace": "bench"},
                     "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                              "ingress": [*decoys, admit]}})
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


def weft(netns: str, argv: list[str], state: Path, source: Path | None = None) -> float:
    """`weft ARGV` in the node namespace (nsenter: bpffs stays visible); its wall time."""
    command = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "weft.reconciler.cli", *argv,
               "--node", NODE, "--state-dir", str(state)]
    if source is not None:
        command += ["--from", str(source)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"weft {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def connections(lab, count: int) -> dict:
    client = next(p for p in lab.pods if p.name == "client")
    done = subprocess.run(["nsenter", f"--net=/run/netns/{lab.pod_netns(client)}", sys.executable, "-I", "-S", "-c",
                           CLIENT, SERVER_IP, "80", str(count), "1"], capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"client failed: {done.stderr.strip()}")
    run = json.loads(done.stdout)[0]
    lat = sorted(run["latencies"])
    return {"cps": count / run["seconds"], "p50": lat[len(lat) // 2] * 1e6, "p99": lat[int(len(lat) * 0.99)] * 1e6,
            "mean": statistics.fmean(lat) * 1e6}


def measure(counts: tuple[int, ...], count: int) -> dict:
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="weft-bench-rules-") as tmp:
        tmp = Path(tmp)
        with NodeLab(pods_from_manifests(manifests(tmp / "base", 0), NODE), ports=(80,)) as lab:
            for plane in PLANES:
                state = tmp / f"state-{plane}"
                try:
                    for rules in counts:
                        setup = weft(lab.node_netns, ["apply", "--dataplane", plane], state,
                                     manifests(tmp / f"src-{rules}", rules))
                        lab.node_run(["conntrack", "-F"])
                        results[(plane, rules)] = connections(lab, count) | {"setup": setup}
                        print(f"  {plane:8} {rules:>6} rules: {results[(plane, rules)]['cps']:.0f} conn/s "
                              f"(apply {setup:.1f} s)", file=sys.stderr, flush=True)
                finally:
                    weft(lab.node_netns, ["apply", "--destroy"], state)
    return results


def table(results: dict, counts: tuple[int, ...], count: int) -> str:
    lines = [f"New TCP connections pod -> pod through the node, one run of {count} per case (after 200 warm-up); "
             f"rules = ingress rules of the server's policy before the one admitting the client",
             f"{'rules':>6} | {'iptables conn/s':>15} {'p50 us':>7} {'p99 us':>7} {'vs 0':>7} | "
             f"{'eBPF conn/s':>11} {'p50 us':>7} {'p99 us':>7} {'vs 0':>7} | {'eBPF/ipt conn/s':>15} {'p50':>6}"]
    for rules in counts:
        ipt, ebpf = results[("iptables", rules)], results[("ebpf", rules)]
        ipt0, ebpf0 = results[("iptables", counts[0])], results[("ebpf", counts[0])]
        lines.append(f"{rules:>6} | {ipt['cps']:>15.0f} {ipt['p50']:>7.0f} {ipt['p99']:>7.0f} "
                     f"{ipt['p50'] / ipt0['p50'] - 1:>+7.0%} | {ebpf['cps']:>11.0f} {ebpf['p50']:>7.0f} "
                     f"{ebpf['p99']:>7.0f} {ebpf['p50'] / ebpf0['p50'] - 1:>+7.0%} | "
                     f"{ebpf['cps'] / ipt['cps']:>14.2f}x {ebpf['p50'] / ipt['p50']:>5.2f}x")
    lines.append("'vs 0': p50 latency against the same plane with no rules; eBPF/ipt: eBPF's figure over iptables'. "
                 "weft apply: " + ", ".join(f"{rules} rules iptables {results[('iptables', rules)]['setup']:.1f} s / "
                                            f"eBPF {results[('ebpf', rules)]['setup']:.1f} s" for rules in counts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000, help="connections per case (default 3000)")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="rule counts (default 0,1000,10000)")
    args = parser.parse_args()
    counts = tuple(int(c) for c in args.counts.split(","))
    compile_weft()
    print(table(measure(counts, args.connections), counts, args.connections))


if __name__ == "__main__":
    main()
