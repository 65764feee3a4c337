"""Calico's policy model at scale, side by side with Kubernetes NetworkPolicy, in one run.

bench/synthetic.py's cluster (10,000 pods, 100 namespaces, 110 pods on the benchmark's node),
once with its Kubernetes policies and once with the same count of Calico policies in 5 tiers
(GlobalNetworkPolicy and namespaced NetworkPolicy, every rule field weft renders: Pass, Log,
Deny, notNets, notPorts, notSelector, ICMP, named ports, service accounts, network sets).

Runs (as root): the real `weft apply` in a network namespace the benchmark makes (bench_scale's
machinery, a manifest directory of 1,000 objects a file): the first run (every chain and set
written), a run with nothing to do, and a run after one policy selecting a local pod changed
(the median of --repeats runs each). Renders (pure Python, no kernel): the conversion of the
manifests, the first render of the node, a render with the previous render's sets reused (as a
run whose endpoints did not change makes it), and a render after one policy changed.

    .venv/bin/python -m bench.bench_calico [--policies 2000] [--pods 10000] [--repeats 3] [--renders-only]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import synthetic
from weft.desired.loader import build_cluster_state
from weft.renderers.iptables import render_node

TIERS = (("security", 100), ("platform", 200), ("devops", 300), ("application", 400))


def calico_policies(count: int, namespaces: int, seed: int = 2) -> list[dict]:
    rnd = random.Random(seed)
    objs: list[dict] = [{"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": name},
                         "spec": {"order": order, "defaultAction": "Pass" if i % 2 else "Deny"}}
                        for i, (name, order) in enumerate(TIERS)]
    objs.append({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet", "metadata": {
        "name": "partners", "labels": {"kind": "partner"}}, "spec": {"nets": ["198.19.0.0/24", "198.19.8.0/22"]}})
    for p in range(count):
        tier = (*(t for t, _ in TIERS), "default")[p % 5]
        app = f"app-{p % 20}"
        rules = [
            {"action": "Log", "protocol": "TCP", "destination": {"ports": [22]}},
            {"action": "Deny", "source": {"notNets": ["198.18.0.0/15"], "notSelector": "kind == 'partner'"}},
            {"action": "Allow", "protocol": "TCP", "source": {"selector": f"tier == '{('web', 'api')[p % 2]}'"},
             "destination": {"ports": ["http", 8443, "9000:9100"], "notPorts": [9050]}},
            {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}},
            {"action": "Pass" if tier != "default" else "Allow", "protocol": "UDP", "destination": {"ports": [53]}},
        ]
        spec = {"order": rnd.choice((10, 100, 500)), "selector": f"app == '{app}'",
                "types": ["Ingress", "Egress"], "ingress": rules[:4],
                "egress": [rules[4], {"action": "Allow", "destination": {"selector": "kind == 'partner'"}}]}
        if tier != "default":
            spec["tier"] = tier
        name = f"policy-{p:04d}" if tier == "default" else f"{tier}.policy-{p:04d}"
        if p % 3 == 0:
            spec["namespaceSelector"] = f"team == 'team-{p % 10}'"
            objs.append({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                         "metadata": {"name": name}, "spec": spec})
        else:
            objs.append({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                         "metadata": {"name": name, "namespace": f"ns-{p % namespaces:03d}"}, "spec": spec})
    return objs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(objs: list[dict], change) -> dict:
    convert, state = timed(lambda: build_cluster_state(("bench.yaml", o) for o in objs))
    first, dataplane = timed(lambda: render_node(state, synthetic.NODE))
    noop, again = timed(lambda: render_node(state, synthetic.NODE, reuse=dataplane.ipsets))
    assert again == dataplane
    changed = build_cluster_state(("bench.yaml", o) for o in change(objs))
    one, _ = timed(lambda: render_node(changed, synthetic.NODE, reuse=dataplane.ipsets))
    rules = sum(len(c.rules) for c in dataplane.chains.values())
    return {"policies": len(state.policies), "chains": len(dataplane.chains), "rules": rules,
            "sets": len(dataplane.ipsets), "convert_s": round(convert, 2), "first_render_s": round(first, 2),
            "noop_render_s": round(noop, 2), "one_change_render_s": round(one, 2)}


def change_one(kind: str, round: int = 0):
    """The objects with the first `kind` policy's ingress ports changed (a new port per round);
    the first of either kind selects the local pod ns-000/pod-00000 (app-0)."""
    def change(objs: list[dict]) -> list[dict]:
        out, done = [], False
        for o in objs:
            if not done and o["kind"] == kind:
                o = json.loads(json.dumps(o))
                rules = o["spec"]["ingress"]
                if kind == "NetworkPolicy" and "podSelector" in o["spec"]:
                    rules[0]["ports"] = [{"port": 8444 + round}]
                else:
                    rules[2]["destination"]["ports"] = ["http", 8444 + round]
                done = True
            out.append(o)
        return out
    return change


def runs(objs: list[dict], kind: str, work: Path, repeats: int) -> dict:
    """The first `weft apply`, the median no-op run and the median run after one policy changed."""
    from bench.bench_scale import ManifestDir, Source, failure
    files = ManifestDir(work / "manifests", objs, "chunks")
    source = Source(kind, ["--from", str(files.root)], work / "state", files.put)
    first = source.run()
    if not first.ok:
        raise SystemExit(f"bench_calico: the first `weft apply` ({kind}) failed: {failure(first)}")
    noop = sorted((source.run() for _ in range(repeats)), key=lambda r: r.wall)[repeats // 2]
    changed = []
    for i in range(repeats):
        for obj in change_one(kind, i + 1)(objs):
            if obj["kind"] == kind and obj["metadata"]["name"] == _first_name(objs, kind):
                files.put(obj)
                break
        changed.append(source.run())
    one = sorted(changed, key=lambda r: r.wall)[repeats // 2]
    if not (noop.ok and one.ok):
        raise SystemExit(f"bench_calico: a run ({kind}) failed: {failure(noop if not noop.ok else one)}")
    subprocess.run([sys.executable, "-m", "weft.reconciler.cli", "apply", "--destroy", "--state-dir",
                    str(work / "state"), "--node", synthetic.NODE], capture_output=True, check=False)
    return {"first_run_s": round(first.wall, 2), "first_run_MiB": first.rss, "first_kernel_bytes": first.written,
            "noop_run_s": round(noop.wall, 2), "one_change_run_s": round(one.wall, 2),
            "one_change_summary": one.summary}


def _first_name(objs: list[dict], kind: str) -> str:
    return next(o["metadata"]["name"] for o in objs if o["kind"] == kind)


def table(results: dict[str, dict]) -> str:
    columns = [("policies", "policies"), ("rules", "rules"), ("sets", "sets"),
               ("first_run_s", "first run s"), ("noop_run_s", "no-op run s"), ("one_change_run_s", "one change run s"),
               ("first_run_MiB", "first run MiB"), ("convert_s", "convert s"), ("first_render_s", "first render s"),
               ("noop_render_s", "no-op render s"), ("one_change_render_s", "one change render s")]
    shown = [(k, title) for k, title in columns if any(k in r for r in results.values())]
    lines = ["| | " + " | ".join(title for _, title in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r[k]:,}" if isinstance(r.get(k), int) else str(r.get(k, "-")) for k, _ in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=2000)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--renders-only", action="store_true", help="no `weft apply` runs (no root needed)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.renders_only and not args.inside:
        if os.geteuid() != 0:
            raise SystemExit("bench_calico: run as root (it makes a network namespace), or with --renders-only")
        from bench.installed import rerun_inside_namespace
        return rerun_inside_namespace("bench.bench_calico", argv)
    started = time.perf_counter()
    print(f"{args.pods:,} pods, {args.policies:,} policies of each kind; machine load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    base = synthetic.cluster(pods=args.pods, policies=0)
    worlds = {"kubernetes": (synthetic.cluster(pods=args.pods, policies=args.policies), "NetworkPolicy"),
              "calico (5 tiers)": (base + calico_policies(args.policies, 100), "GlobalNetworkPolicy")}
    results = {}
    for name, (objs, kind) in worlds.items():
        results[name] = measure(objs, change_one(kind))
        if not args.renders_only:
            with tempfile.TemporaryDirectory(prefix="weft-bench-calico-") as tmp:
                results[name].update(runs(objs, kind, Path(tmp), args.repeats))
    print(table(results))
    print(f"\nbenchmark took {time.perf_counter() - started:.0f} s; machine load now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
