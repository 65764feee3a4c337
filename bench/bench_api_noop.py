"""What a no-op run costs the API server on a quiet cluster: requests, bytes, connections.

A real cluster's resourceVersion moves every few seconds even when nothing weft reads changes
(leases, events), so a timer's run almost never takes the one-request "unchanged" path: it
watches every kind from its cursor. This measures, against tests/kubeapi.py's FakeKubeAPI (a
real HTTP server) holding the synthetic cluster (bench/synthetic.py), the read of the desired
state (desired.sources.read, as `weft apply` does it, in this process) for:
  (a) a first run (a full list);
  (b) a run where the cluster's resourceVersion did not move (the "unchanged" path);
  (c) a run after the resourceVersion moved through an object weft does not read (a ConfigMap,
      as a lease would), with API discovery kept in the state dir (desired.discovery);
  (d) the same without a kept discovery (what every such run cost before it was kept).
Each over TLS (as a real API server is reached) twice: with HTTP/2 offered by ALPN, as
kube-apiserver does (a run's watches are streams of one connection: desired.h2link), and with a
server that speaks HTTP/1.1 only (each watch on a connection of its own: what every run cost
before HTTP/2). "conns" are the TCP connections the server accepted during the run; "read s"
the API part (sources.read), "total s" with the state built from the cache too.
Run:  .venv/bin/python -m bench.bench_api_noop [--pods N --policies N --runs N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.synthetic import cluster
from tests.kubeapi import FakeKubeAPI, TLSFiles
from weft.desired import sources
from weft.desired.discovery import DISCOVERY_FILE


def read(state_dir: Path, kubeconfig: str) -> float:
    """One read as a run makes it; returns how long the API part took (sources.read, before
    the state is built from the cache)."""
    start = time.perf_counter()
    reading = sources.read(state_dir, None, kubeconfig)
    asked = time.perf_counter() - start
    reading.state()
    if reading.dirty:
        sources.commit(state_dir, reading)
    return asked


def measured(api: FakeKubeAPI, state_dir: Path, kubeconfig: str) -> dict:
    requests, sent, connections = len(api.requests), api.bytes_sent, api.connections
    start = time.perf_counter()
    api_seconds = read(state_dir, kubeconfig)
    took = time.perf_counter() - start
    asked = api.requests[requests:]
    return {"requests": len(asked), "bytes": api.bytes_sent - sent, "connections": api.connections - connections,
            "seconds": took, "read": api_seconds,
            "discovery": sum(1 for _m, p in asked if p.count("/") == 3 and p.startswith("/apis/") and "?" not in p),
            "watches": sum("watch=true" in p for _m, p in asked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5, help="runs of (c) and (d) each; medians are printed")
    args = parser.parse_args()
    objs = cluster(pods=args.pods, policies=args.policies)
    print(f"API server cost of reading the desired state ({args.pods} pods, {args.policies} policies; "
          "FakeKubeAPI over TLS on 127.0.0.1; medians of (c), (d) over "
          f"{args.runs} runs)")
    with tempfile.TemporaryDirectory() as tmp:
        tls = TLSFiles.make(Path(tmp) / "tls")
        for http2 in (True, False):
            print(f"\n{'HTTP/2 offered (as kube-apiserver does)' if http2 else 'HTTP/1.1 only'}")
            table(objs, tls, Path(tmp) / f"h2-{http2}", args.runs, http2)


def table(objs: list, tls: TLSFiles, tmp: Path, runs_of_each: int, http2: bool) -> None:
    tmp.mkdir()
    with FakeKubeAPI(objs, crds=True, history=100_000, tls=tls, http2=http2) as api:
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        state_dir = tmp / "state"
        state_dir.mkdir(mode=0o700)
        rows = {"(a) first run: full list": measured(api, state_dir, kubeconfig)}
        read(state_dir, kubeconfig)      # the watches' second confirmation (see desired.sources)
        rows["(b) resourceVersion unchanged"] = measured(api, state_dir, kubeconfig)
        kinds = {"(c) moved, nothing weft reads; discovery kept": True,
                 "(d) moved, nothing weft reads; no kept discovery": False}
        runs: dict[str, list[dict]] = {label: [] for label in kinds}
        for n in range(runs_of_each):                  # interleaved, so load on the machine hits both alike
            for label, keep in kinds.items():
                api.put({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": f"lease-{label[:3]}-{n}", "namespace": "kube-system"}})
                if not keep:
                    (state_dir / DISCOVERY_FILE).unlink(missing_ok=True)
                runs[label].append(measured(api, state_dir, kubeconfig))
        for label, measures in runs.items():
            rows[label] = {k: statistics.median(r[k] for r in measures) for k in measures[0]}
    print(f"{'run':52} {'requests':>8} {'discovery':>9} {'watches':>7} {'bytes':>10} {'conns':>5} {'read s':>7} "
          f"{'total s':>7}")
    for label, r in rows.items():
        print(f"{label:52} {r['requests']:8.0f} {r['discovery']:9.0f} {r['watches']:7.0f} {r['bytes']:10.0f} "
              f"{r['connections']:5.0f} {r['read']:7.3f} {r['seconds']:7.3f}")


if __name__ == "__main__":
    main()
