"""Reconcile-run benchmark: 10,000 pods, 1,000 policies, 110 pods on this node.

Runs the real `weft apply` (a subprocess, as a timer or CronJob would) inside a network
namespace it creates, with the desired state served by a local HTTP server speaking the
Kubernetes API (tests/kubeapi.py), then from a manifest directory. Prints, per source:
  (a) first run, (b) a run with nothing to do, (c) a run after one policy changed:
  wall time and peak memory; for (c) the bytes fed to iptables-restore/ipset against the size
  of the full ruleset; and (b) relative to `iptables-save` + `ipset save` on the same state.
Run as root:  .venv/bin/python -m bench.bench_reconcile [--pods N --policies N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from bench.installed import compile_weft
from bench.synthetic import NODE, cluster
from tests.kubeapi import FakeKubeAPI

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one command; wait4 gives that child's own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{err.read().decode()}")
        return elapsed, usage.ru_maxrss // 1024, out.read().decode()


def weft(state: Path, source: list[str], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "weft.reconciler.cli",
        "apply",
        *source,
        "--node",
        NODE,
        "--state-dir",
        str(state),
        "--output",
        "json",
        *extra,
    ]


REPEATS = 3      # (b) and (c) are measured this many times; the median is printed


def changed_policy(objs: list[dict], round: int = 0) -> dict:
    """policy-0000 selects a local pod (ns-000/pod-00000, app-0): give it one more port."""
    pol = copy.deepcopy(
        next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "policy-0000")
    )
    pol["spec"]["ingress"][0]["ports"].append({"port": 8443 + round})
    return pol


def median_run(argv: list[str], before=None) -> tuple[float, int, str]:
    """The median (by time) of REPEATS runs of `argv`, each after `before(round)` if given."""
    runs = []
    for i in range(REPEATS):
        if before:
            before(i)
        runs.append(timed(argv))
    return sorted(runs, key=lambda r: r[0])[REPEATS // 2]


def run_source(name: str, source: list[str], change, state: Path) -> None:
    a_t, a_rss, _ = timed(weft(state, source))
    b_t, b_rss, b_out = median_run(weft(state, source))
    assert json.loads(b_out)["commands"] == [], "the no-op run changed something"
    save_t = _save_time()
    full = len(
        subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True, check=True).stdout.encode()
    )
    full_sets = len(subprocess.run(["ipset", "save"], capture_output=True, text=True, check=True).stdout.encode())
    c_t, c_rss, c_out = median_run(weft(state, source), change)
    report = json.loads(c_out)
    written = report["bytes_written"]
    print(f"\n== source: {name}")
    print(f"(a) first run        {a_t:6.2f} s   peak {a_rss:5d} MiB        (b), (c): median of {REPEATS}")
    print(
        f"(b) nothing to do    {b_t:6.2f} s   peak {b_rss:5d} MiB   "
        f"= {b_t / save_t:.1f}x iptables-save + ipset save ({save_t:.2f} s)"
    )
    print(
        f"(c) one policy       {c_t:6.2f} s   peak {c_rss:5d} MiB   wrote {written} bytes = "
        f"{100 * written / (full + full_sets):.2f}% of the full ruleset ({full} B rules + {full_sets} B sets); "
        f"summary {report['summary']}"
    )


def _save_time() -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, check=True)
        subprocess.run(["ipset", "save"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    """Creates a network namespace and runs the benchmark inside it (server, weft and all)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.inside:
        return inside(opts)
    compile_weft()
    ns = f"weft-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        argv = [
            sys.executable,
            "-m",
            "bench.bench_reconcile",
            "--inside",
            "--pods",
            str(opts.pods),
            "--policies",
            str(opts.policies),
        ]
        return subprocess.run(["ip", "netns", "exec", ns, *argv]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def inside(opts) -> int:
    objs = cluster(pods=opts.pods, policies=opts.policies)
    print(f"synthetic cluster: {opts.pods} pods, {opts.policies} policies, node {NODE} with 110 local pods")
    with tempfile.TemporaryDirectory() as tmp, FakeKubeAPI(objs) as api:
        tmp = Path(tmp)
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        run_source(
            "API server (HTTP, paginated lists)",
            ["--kubeconfig", kubeconfig],
            lambda i: api.put(changed_policy(objs, i)),
            tmp / "state-api",
        )
        subprocess.run(weft(tmp / "state-api", [], "--destroy"), check=True, capture_output=True)
        manifests = tmp / "manifests"
        manifests.mkdir()
        for i in range(0, len(objs), 1000):
            (manifests / f"part-{i // 1000:03d}.yaml").write_text(yaml.dump_all(objs[i : i + 1000], Dumper=_Dumper))

        def change_file(i: int) -> None:
            # the changed copy replaces the original: drop the original from its file
            for part in sorted(manifests.glob("part-*.yaml")):
                docs = list(yaml.load_all(part.read_text(), Loader=yaml.CSafeLoader))
                kept = [
                    d for d in docs if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "policy-0000")
                ]
                if len(kept) != len(docs):
                    part.write_text(yaml.dump_all(kept, Dumper=_Dumper))
            (manifests / "zz-changed.yaml").write_text(yaml.dump(changed_policy(objs, i), Dumper=_Dumper))

        run_source("manifest directory", ["--from", str(manifests)], change_file, tmp / "state-dir")
    return 0


if __name__ == "__main__":
    sys.exit(main())
