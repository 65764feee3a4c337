"""Rules vs connection cost: iptables and eBPF side by side, both put in place by `weft apply`.

A lab node (playbooks.netlab: namespaces and veths only, addresses from 198.18.0.0/15) with a
client and a server pod. The server is selected by one NetworkPolicy with 0, 1,000 or 10,000
ingress rules before the one that admits the client (each rule: one /32 peer that is not the
client, TCP port 80): every rule selects the destination, so iptables walks them all for each new
connection, while eBPF looks the verdict up in maps whose lookups do not depend on the count.

Every case (plane, count) is `weft apply --dataplane iptables|ebpf` on the same node (in the node
namespace, through nsenter so bpffs stays visible), switching plane or policy as weft does, then the
client opens, reads and closes connections one after another. The cases are measured in rounds,
interleaved, every other round in reverse order: measured once each in a fixed order (as this bench
did before), one case's figure moved by more than the 5% in question from run to run, and whatever
drifts during a run (other work on a shared machine, TIME_WAIT sockets piling up) fell on the
later cases, the larger counts. Printed: per case the medians over rounds of connections per
second and latency (p50, p99); against no rules, the median of the per-round ratios (and their
range); eBPF relative to iptables; and, on eBPF, the programs' own run time per packet
(bench_bpf_testrun, BPF_PROG_TEST_RUN: kernel-timed, no traffic) in each round.

Run as root:  .venv/bin/python -m bench.bench_bpf_rules [--connections N] [--counts 0,1000,10000] [--rounds N]
              [--testrun N]
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


def program_times(lab, state: Path, runs: int) -> dict:
    """The eBPF programs' own run time per packet, kernel-timed (bench_bpf_testrun), in the node namespace."""
    from weft.model.names import host_iface_name
    from weft.reconciler.bpf_pins import node_pin_dir
    done = subprocess.run(["nsenter", f"--net=/run/netns/{lab.node_netns}", sys.executable, "-m",
                           "bench.bench_bpf_testrun", "--inside", str(node_pin_dir(state)),
                           host_iface_name("bench", "client"), host_iface_name("bench", "server"), str(runs),
                           "20000"], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise SystemExit(f"test run failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def order(counts: tuple[int, ...], round_: int) -> list[tuple[str, int]]:
    """Every (plane, count) once; odd rounds run the even rounds' order backwards, so that a drift
    of the machine (or what earlier cases leave behind: TIME_WAIT sockets, conntrack) is spread
    over every case instead of falling on the last."""
    cases = [(plane, rules) for plane in PLANES for rules in counts]
    return cases[::-1] if round_ % 2 else cases


def measure(counts: tuple[int, ...], count: int, rounds: int, testrun: int) -> dict:
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    results: dict = {(plane, rules): [] for plane in PLANES for rules in counts}
    with tempfile.TemporaryDirectory(prefix="weft-bench-rules-") as tmp:
        tmp = Path(tmp)
        state = tmp / "state"           # one node: each case is an apply, switching planes as weft does
        with NodeLab(pods_from_manifests(manifests(tmp / "base", 0), NODE), ports=(80,)) as lab:
            try:
                for round_ in range(rounds):
                    for plane, rules in order(counts, round_):
                        setup = weft(lab.node_netns, ["apply", "--dataplane", plane], state,
                                     manifests(tmp / f"src-{rules}", rules))
                        lab.node_run(["conntrack", "-F"])
                        one = connections(lab, count) | {"setup": setup}
                        if plane == "ebpf" and testrun:
                            one |= {f"prog_{k}": v for k, v in program_times(lab, state, testrun).items()}
                        results[(plane, rules)].append(one)
                        print(f"  round {round_ + 1} {plane:8} {rules:>6} rules: {one['cps']:.0f} conn/s, p50 "
                              f"{one['p50']:.0f} us (apply {setup:.1f} s)" +
                              (f", program {one['prog_syn']:.0f} ns judged / {one['prog_est']:.0f} ns tracked"
                               if "prog_syn" in one else ""), file=sys.stderr, flush=True)
            finally:
                weft(lab.node_netns, ["apply", "--destroy"], state)
    return results


def _median(runs: list[dict], name: str) -> float:
    return statistics.median(r[name] for r in runs)


def ratios(runs: list[dict], base: list[dict], name: str) -> list[float]:
    """Per round: this case's figure over the base case's of the same round."""
    return sorted(r[name] / b[name] for r, b in zip(runs, base, strict=True))


def table(results: dict, counts: tuple[int, ...], count: int, rounds: int) -> str:
    lines = [f"New TCP connections pod -> pod through the node: {rounds} rounds, each of {count} connections per "
             f"case (after 200 warm-up), planes and counts interleaved (odd rounds in reverse order); rules = "
             f"ingress rules of the server's policy before the one admitting the client. Figures: medians over "
             f"rounds; 'vs 0': the median of the per-round ratios of p50 latency to the same plane's with no "
             f"policy (range over rounds in brackets); 'best': the best round's p50 over the best round's with no "
             f"policy (interference from other work only adds time, so the best rounds are the least disturbed)",
             f"{'rules':>6} | {'iptables conn/s':>15} {'p50 us':>7} {'p99 us':>7} {'vs 0':>20} {'best':>7} | "
             f"{'eBPF conn/s':>11} {'p50 us':>7} {'p99 us':>7} {'vs 0':>20} {'best':>7} | {'eBPF/ipt conn/s':>15}"]
    for rules in counts:
        cells = []
        for plane in PLANES:
            runs, base = results[(plane, rules)], results[(plane, counts[0])]
            r = ratios(runs, base, "p50")
            spread = f"{statistics.median(r) - 1:+.1%} [{r[0] - 1:+.0%}..{r[-1] - 1:+.0%}]"
            best = min(x["p50"] for x in runs) / min(x["p50"] for x in base) - 1
            cells.append(f"{_median(runs, 'cps'):>{15 if plane == 'iptables' else 11}.0f} {_median(runs, 'p50'):>7.0f} "
                         f"{_median(runs, 'p99'):>7.0f} {spread:>20} {best:>+7.1%}")
        cps = statistics.median(e["cps"] / i["cps"] for e, i in
                                zip(results[("ebpf", rules)], results[("iptables", rules)], strict=True))
        lines.append(f"{rules:>6} | " + " | ".join(cells) + f" | {cps:>14.2f}x")
    lines.append("weft apply (median): " + ", ".join(
        f"{rules} rules iptables {_median(results[('iptables', rules)], 'setup'):.1f} s / eBPF "
        f"{_median(results[('ebpf', rules)], 'setup'):.1f} s" for rules in counts) +
        " (each a switch of plane or of policy on the same node)")
    if all("prog_syn" in r for r in results[("ebpf", counts[0])]):
        base = results[("ebpf", counts[0])]
        lines.append("eBPF programs' own run time per packet (BPF_PROG_TEST_RUN on the server's to_wl, kernel-timed; "
                     "median over rounds): " + ", ".join(
                         f"{rules} rules: judged SYN {_median(results[('ebpf', rules)], 'prog_syn'):.0f} ns "
                         f"({statistics.median(ratios(results[('ebpf', rules)], base, 'prog_syn')) - 1:+.0%}), "
                         f"tracked {_median(results[('ebpf', rules)], 'prog_est'):.0f} ns "
                         f"({statistics.median(ratios(results[('ebpf', rules)], base, 'prog_est')) - 1:+.0%})"
                         for rules in counts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000, help="connections per case and round (default 2000)")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="rule counts (default 0,1000,10000)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--testrun", type=int, default=1000,
                        help="judged SYNs a round for the programs' own run time (0: not measured; default 1000)")
    args = parser.parse_args()
    counts = tuple(int(c) for c in args.counts.split(","))
    compile_weft()
    print(table(measure(counts, args.connections, args.rounds, args.testrun), counts, args.connections, args.rounds))


if __name__ == "__main__":
    main()
