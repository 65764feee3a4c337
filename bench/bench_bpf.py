"""Data-plane benchmark: new connections from one pod to another through the node, iptables vs eBPF.

A lab node (playbooks.netlab: namespaces and veths only, addresses from 198.18.0.0/15) with a
client and a server pod. The server is selected by one NetworkPolicy whose ingress has 0, 1,000
or 10,000 peers (ipBlocks of single addresses that are not the client) before the one that
admits the client, on TCP port 80: every rule "selects the destination", and iptables must walk
them all for each new connection. For each count, each data plane is put in place as weft does it
(iptables: `weft apply` in the node namespace; eBPF: renderers.bpf_policy + reconciler.bpf_apply),
then the client opens, reads and closes connections one after another; printed side by side:
connections per second and the latency of one connection (p50, p99), and each figure relative to
the same plane without policy.

Then a ClusterIP service in front of the server: the latency of a connection to the service
address against one straight to the server (eBPF translates on the client's interface),
interleaved round by round.

Then, with the synthetic cluster of bench_reconcile (10,000 pods, 1,000 policies): the policy maps'
size for the benchmark node, and what one changed policy costs (render, keys to write; no compile).

Run as root:  .venv/bin/python -m bench.bench_bpf [--connections N] [--rounds N] [--only-services]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from bench.installed import compile_weft

NODE = "bench-node"
CLIENT_IP, SERVER_IP = "198.18.0.3", "198.18.0.2"
COUNTS = (0, 1_000, 10_000)
VIP = "198.19.200.10"                       # the ClusterIP (decoy peers stay below 198.19.40.0)
# The service's target port: not the port direct connections use. The server keeps a TIME_WAIT for
# every connection; a client port reused towards the same server port, once translated and once
# not, starts with an unrelated sequence number and timestamp (each derived from the addresses the
# client used): on one port, conn/s fell to a fraction of 1/p50 on both sides (a tail of slow
# connections, most likely SYNs answered by the stale TIME_WAIT and retried a second later), a
# tail the bench made, not the data plane; on separate ports it is gone.
SERVICE_PORT = 81

CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    ip, port, count, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    def one():
        t = time.perf_counter()
        with socket.create_connection((ip, port), timeout=2) as s:
            while s.recv(16):               # to the server's FIN: the server closes first, so the
                pass                        # TIME_WAIT is the server's and the client's ports stay free
        return time.perf_counter() - t
    for _ in range(200):
        one()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        lat = [one() for _ in range(count)]
        out.append({"seconds": time.perf_counter() - start, "latencies": lat})
    json.dump(out, sys.stdout)
""")


def manifests(directory: Path, peers: int, service: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
    ]
    for name, ip in (("server", SERVER_IP), ("client", CLIENT_IP)):
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
                     "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
                     "status": {"podIP": ip, "phase": "Running"}})
    if peers:
        decoys = [{"ipBlock": {"cidr": f"198.19.{i >> 8 & 255}.{i & 255}/32"}} for i in range(peers)]
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "server", "namespace": "bench"},
                     "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                              "ingress": [{"from": decoys + [{"ipBlock": {"cidr": f"{CLIENT_IP}/32"}}],
                                           "ports": [{"port": 80}]}]}})
    if service:
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": "bench"},
                     "spec": {"clusterIP": VIP, "ports": [{"name": "http", "port": 80, "targetPort": SERVICE_PORT}]}})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                     "metadata": {"name": "server-1", "namespace": "bench",
                                  "labels": {"kubernetes.io/service-name": "server"}},
                     "endpoints": [{"addresses": [SERVER_IP], "conditions": {"ready": True}}],
                     "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]})
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


def connections(lab, count: int, rounds: int, target: str = SERVER_IP, port: int = 80) -> dict:
    client = next(p for p in lab.pods if p.name == "client")
    done = subprocess.run(["ip", "netns", "exec", lab.pod_netns(client), sys.executable, "-I", "-S", "-c", CLIENT,
                           target, str(port), str(count), str(rounds)], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"client failed: {done.stderr.strip()}")
    runs = json.loads(done.stdout)
    # A shared machine disturbs some rounds: the median round's rate, and latency percentiles over
    # every connection of every round.
    lat = sorted(x for r in runs for x in r["latencies"])
    return {"cps": count / statistics.median(r["seconds"] for r in runs), "p50": lat[len(lat) // 2] * 1e6,
            "p99": lat[int(len(lat) * 0.99)] * 1e6, "mean": statistics.fmean(lat) * 1e6}


def weft_cli(lab, argv: list[str], source: Path, state: Path) -> None:
    done = lab.node_run([sys.executable, "-m", "weft.reconciler.cli", *argv, "--from", str(source), "--node", NODE,
                         "--state-dir", str(state)], timeout=900)
    if done.returncode:
        raise SystemExit(f"weft {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")


def measure(args) -> dict:
    from weft.desired.loader import build_cluster_state
    from weft.desired.manifests import load_manifest_dir
    from weft.playbooks.bpflab import BpfNode
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    from weft.renderers.bpf_policy import render_bpf

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="weft-bench-bpf-") as tmp:
        tmp = Path(tmp)
        base = manifests(tmp / "base", 0)
        with NodeLab(pods_from_manifests(base, NODE), ports=(80,)) as lab:
            ebpf = BpfNode(lab.node_netns, tmp / "state-ebpf")
            try:
                for peers in COUNTS:
                    source = manifests(tmp / f"src-{peers}", peers)
                    state_dir = tmp / f"state-ipt-{peers}"
                    started = time.perf_counter()
                    weft_cli(lab, ["apply"], source, state_dir)
                    ipt_setup = time.perf_counter() - started
                    lab.node_run(["conntrack", "-F"])
                    results[("iptables", peers)] = connections(lab, args.connections, args.rounds) | \
                        {"setup": ipt_setup}
                    weft_cli(lab, ["apply", "--destroy"], source, state_dir)

                    started = time.perf_counter()
                    maps = render_bpf(build_cluster_state(load_manifest_dir(source)), NODE)
                    report = ebpf.apply(maps)
                    results[("ebpf", peers)] = connections(lab, args.connections, args.rounds) | {
                        "setup": time.perf_counter() - started, "keys": maps.size(), "compiled": report.compiled}
                    ebpf.forget_connections()
            finally:
                ebpf.destroy()
    return results


def cluster_ip(args) -> dict:
    """Connections to the ClusterIP vs straight to its one backend, on the eBPF plane, interleaved:
    each figure is the median over rounds (p50 latency, conn/s), with the rounds' spread."""
    from weft.desired.loader import build_cluster_state
    from weft.desired.manifests import load_manifest_dir
    from weft.playbooks.bpflab import BpfNode
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    from weft.renderers.bpf_policy import render_bpf
    out: dict = {"direct": [], "service": []}
    with tempfile.TemporaryDirectory(prefix="weft-bench-svc-") as tmp:
        tmp = Path(tmp)
        source = manifests(tmp / "svc", 0, service=True)
        with NodeLab(pods_from_manifests(source, NODE), ports=(80, SERVICE_PORT)) as lab:
            ebpf = BpfNode(lab.node_netns, tmp / "state-svc")
            try:
                ebpf.apply(render_bpf(build_cluster_state(load_manifest_dir(source)), NODE))
                for _ in range(args.rounds):
                    for name, target in (("direct", SERVER_IP), ("service", VIP)):
                        ebpf.forget_connections()
                        out[name].append(connections(lab, args.connections, 1, target))
            finally:
                ebpf.destroy()
    return {name: {"p50": statistics.median(r["p50"] for r in runs), "cps": statistics.median(r["cps"] for r in runs),
                   "p50_spread": (min(r["p50"] for r in runs), max(r["p50"] for r in runs))}
            for name, runs in out.items()}


def print_cluster_ip(args) -> None:
    svc = cluster_ip(args)
    d, s = svc["direct"], svc["service"]
    print(f"\nClusterIP (eBPF, {args.rounds} interleaved rounds of {args.connections} connections): direct to the "
          f"backend p50 {d['p50']:.0f} us (rounds {d['p50_spread'][0]:.0f}-{d['p50_spread'][1]:.0f}), "
          f"{d['cps']:.0f} conn/s; via the service address p50 {s['p50']:.0f} us "
          f"(rounds {s['p50_spread'][0]:.0f}-{s['p50_spread'][1]:.0f}), {s['cps']:.0f} conn/s: "
          f"{s['p50'] / d['p50'] - 1:+.1%} latency")


def one_change() -> dict:
    """The synthetic 10k-pod cluster: policy maps of its benchmark node, and one policy changed."""
    from bench.synthetic import NODE as SYN_NODE
    from bench.synthetic import cluster
    from weft.desired.loader import build_cluster_state
    from weft.reconciler.bpf_apply import diff_maps
    from weft.renderers.bpf_policy import render_bpf
    objs = cluster()
    state = build_cluster_state([("synthetic", o) for o in objs])
    started = time.perf_counter()
    first = render_bpf(state, SYN_NODE)
    first_s = time.perf_counter() - started
    changed = copy.deepcopy(objs)
    policy = next(o for o in changed
                  if o["kind"] == "NetworkPolicy" and (o["spec"].get("ingress") or [{}])[0].get("ports"))
    policy["spec"]["ingress"][0]["ports"] = [{"port": 8443, "protocol": "TCP"}]
    state2 = build_cluster_state([("synthetic", o) for o in changed])
    started = time.perf_counter()
    second = render_bpf(state2, SYN_NODE)
    second_s = time.perf_counter() - started
    d = diff_maps(second, first)
    return {"keys": first.size(), "render": first_s, "render_changed": second_s,
            "written": sum(len(w) for w in d.writes.values()), "deleted": sum(len(x) for x in d.deletes.values()),
            "policy": f"{policy['metadata']['namespace']}/{policy['metadata']['name']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000, help="connections per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (default 5)")
    parser.add_argument("--only-services", action="store_true", help="only the ClusterIP measurement")
    args = parser.parse_args()
    compile_weft()
    if args.only_services:
        print_cluster_ip(args)
        return
    results = measure(args)
    print(f"New TCP connections client -> server through the node ({args.rounds} rounds of {args.connections}; "
          f"conn/s of the median round, latency percentiles of all); rules = ingress peers of the server's policy "
          f"before the one admitting the client; 'p50 vs 0' = p50 latency against the same plane without policy")
    print(f"{'rules':>6} | {'iptables conn/s':>15} {'p50 us':>7} {'p99 us':>7} {'p50 vs 0':>8} | "
          f"{'eBPF conn/s':>11} {'p50 us':>7} {'p99 us':>7} {'p50 vs 0':>8} | {'eBPF keys':>9}")
    for peers in COUNTS:
        ipt, ebpf = results[("iptables", peers)], results[("ebpf", peers)]
        ipt0, ebpf0 = results[("iptables", 0)], results[("ebpf", 0)]
        print(f"{peers:>6} | {ipt['cps']:>15.0f} {ipt['p50']:>7.0f} {ipt['p99']:>7.0f} "
              f"{ipt['p50'] / ipt0['p50'] - 1:>+8.1%} | {ebpf['cps']:>11.0f} {ebpf['p50']:>7.0f} {ebpf['p99']:>7.0f} "
              f"{ebpf['p50'] / ebpf0['p50'] - 1:>+8.1%} | {ebpf['keys']:>9}")
    setup = ", ".join(f"{peers}: iptables {results[('iptables', peers)]['setup']:.1f} s, "
                      f"eBPF {results[('ebpf', peers)]['setup']:.1f} s" for peers in COUNTS)
    print(f"Putting the policy in place (iptables: `weft apply` from nothing; eBPF: render and apply, the first "
          f"with its one compile, then updates of the same maps): {setup}")
    print_cluster_ip(args)
    change = one_change()
    print(f"\nSynthetic cluster (10,000 pods, 1,000 policies), node-000's policy maps: {change['keys']} keys, "
          f"rendered in {change['render']:.2f} s")
    print(f"One policy changed ({change['policy']}: ingress port -> 8443): render {change['render_changed']:.2f} s, "
          f"{change['written']} keys to write, {change['deleted']} to delete, no compile")


if __name__ == "__main__":
    main()
