"""Scale benchmark: the runs a node makes on a large cluster, from the API server and from manifests.

Runs the real `weft apply` (a subprocess, as a timer or CronJob would) inside a network
namespace it creates, against a synthetic cluster (bench.synthetic) served by a local HTTP
server speaking the Kubernetes API (tests/kubeapi.py), then written as a manifest directory in
two layouts (1,000 objects per file; one file per kind). For each source it measures the first
run, then each change below (median of --repeats runs, each after a fresh change of that kind):

  nothing to do          nothing changed anywhere
  moved, nothing weft reads  (API only) the cluster's resourceVersion moved: Leases renewed, as on
                         every live cluster all the time
  one policy             a policy selecting a local pod gains a port
  remote pod relabelled  a pod of another node moves to another `app`
  local pod relabelled   a pod of this node moves to another `app`
  remote pod added       a new pod on another node
  namespace relabelled   a namespace's `team` label changes (namespace selectors see it)

Per run: wall time, peak RSS, bytes, requests and connections the API server answered (the
server counts them: a client on a live cluster reads the same plus TLS), bytes fed to the
kernel (iptables-restore / ipset restore input) and the plan's summary; the no-op run is also
set against the kernel dumps it cannot avoid (`iptables-save` + `ipset save`).

Sizes: the default is issue #14's 10k table (10,000 pods, 1,000 policies, 91 nodes, 110 pods
on this node); `--scale` is 150,000 pods, 10,000 policies, 5,000 nodes, 1,000 namespaces (it takes
many minutes). `--calico K` makes every K-th policy one of Calico's kinds (GlobalNetworkPolicy /
NetworkPolicy of projectcalico.org/v3) once weft models them. If the first apply fails, the
failure is printed and the changes are measured with `weft plan` instead, which reads, renders
and diffs the same way but writes nothing.

Run as root:  .venv/bin/python -m bench.bench_scale [--scale] [--sources api,chunks,kinds]
              [--repeats N] [--changes C,..] [--profile C,..]   (C: a key of CHANGES, e.g. relabel-remote)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.installed import rerun_inside_namespace
from bench.synthetic import NODE, cluster, pod_ip
from tests.kubeapi import FakeKubeAPI

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

SCALE = {"pods": 150_000, "policies": 10_000, "nodes": 5_000, "namespaces": 1_000}
CHANGES = {
    "noop": "nothing to do",
    "moved": "moved, nothing weft reads",
    "policy": "one policy",
    "relabel-remote": "remote pod relabelled",
    "relabel-local": "local pod relabelled",
    "add-pod": "remote pod added",
    "ns-relabel": "namespace relabelled",
}
# Issue #14's targets: (API source, manifest dir) seconds for every change at 10k pods; 2 s at 150k.
TARGET_10K = (1.0, 1.2)
TARGET_150K = 2.0
FILE_BYTES = 40 << 20          # a "kinds" layout file is cut before this size (weft reads 64 MiB at most)


# ---- the cluster and its changes ------------------------------------------------------------

def key(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


class Cluster:
    """The synthetic objects, and the changes the benchmark makes to them (each returns the
    objects to write, already changed here)."""

    def __init__(self, objs: list[dict], local: int):
        self.objs = {key(o): o for o in objs}
        self.order = [key(o) for o in objs]
        self.pods = [k for k in self.order if k[1] == "Pod"]
        self.local = local
        self.added = 0
        namespaces = sum(k[1] == "Namespace" for k in self.order)
        self.remote = next(i for i in range(local, len(self.pods)) if i % namespaces == 0 and i % 3 == 0)

    def _edit(self, k: tuple) -> dict:
        obj = copy.deepcopy(self.objs[k])
        obj["metadata"].pop("resourceVersion", None)
        self.objs[k] = obj
        return obj

    def change(self, what: str, round: int) -> list[dict]:
        if what == "noop":
            return []
        if what == "moved":
            return [{"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": f"node-{i:03d}", "namespace": "kube-node-lease"},
                     "spec": {"holderIdentity": f"node-{i:03d}", "renewTime": f"2026-12-01T00:00:{round:02d}Z"}}
                    for i in range(5)]
        if what == "policy":      # policy-0000 selects the local pod ns-000/pod-00000 (app-0)
            pol = self._edit(next(k for k in self.order if k[1] == "NetworkPolicy" and k[3] == "policy-0000"))
            pol["spec"]["ingress"][0]["ports"].append({"port": 8443 + round})
            return [pol]
        if what in ("relabel-remote", "relabel-local"):
            # A web pod of ns-000, where the local pods' policies select peers: it becomes a db pod
            # (and back), leaving and joining the peer sets those policies use.
            pod = self._edit(self.pods[self.remote if what == "relabel-remote" else 0])
            labels = pod["metadata"]["labels"]
            labels["tier"] = "db" if labels["tier"] == "web" else "web"
            labels["app"] = f"app-{(int(labels['app'].split('-')[1]) + 1) % 20}"
            return [pod]
        if what == "add-pod":
            self.added += 1
            template = self._edit(self.pods[self.local + 11])
            new = copy.deepcopy(template)
            new["metadata"]["name"] = f"added-{self.added:04d}"
            ip = pod_ip(len(self.pods) + self.added)
            new["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            self.objs[key(new)] = new
            self.order.append(key(new))
            return [new]
        if what == "ns-relabel":
            ns = self._edit(next(k for k in self.order if k[1] == "Namespace" and k[3] == "ns-005"))
            labels = ns["metadata"]["labels"]
            labels["team"] = f"team-{(int(labels['team'].split('-')[1]) + 1) % 10}"
            return [ns]
        raise ValueError(what)


class ManifestDir:
    """The cluster as YAML files; a change rewrites only the document of the changed object
    (and its file), as an editor or a GitOps tool would."""

    def __init__(self, root: Path, objs: list[dict], layout: str):
        self.root, self.layout = root, layout
        self.files: dict[str, list[str]] = {}
        self.where: dict[tuple, tuple[str, int]] = {}
        root.mkdir(parents=True)
        size: dict[str, int] = {}
        for i, obj in enumerate(objs):
            text = yaml.dump(obj, Dumper=_Dumper, sort_keys=False)
            if layout == "chunks":
                name = f"part-{i // 1000:04d}.yaml"
            else:
                base = obj["kind"].lower()
                part = 0
                while size.get(f"{base}-{part}.yaml", 0) + len(text) > FILE_BYTES:
                    part += 1
                name = f"{base}-{part}.yaml"
                size[name] = size.get(name, 0) + len(text) + 4
            docs = self.files.setdefault(name, [])
            self.where[key(obj)] = (name, len(docs))
            docs.append(text)
        for name in self.files:
            self._write(name)

    def _write(self, name: str) -> None:
        (self.root / name).write_text("---\n".join(self.files[name]))

    def put(self, obj: dict) -> None:
        text = yaml.dump(obj, Dumper=_Dumper, sort_keys=False)
        k = key(obj)
        if k in self.where:
            name, index = self.where[k]
            self.files[name][index] = text
        else:
            name = "zz-added.yaml"
            self.where[k] = (name, len(self.files.setdefault(name, [])))
            self.files[name].append(text)
        self._write(name)

    @property
    def bytes(self) -> int:
        return sum((self.root / name).stat().st_size for name in self.files)


# ---- running weft ---------------------------------------------------------------------------

@dataclass
class Run:
    wall: float
    rss: int                  # MiB
    ok: bool
    out: str = ""
    err: str = ""
    api_bytes: int = 0
    api_requests: int = 0
    api_connections: int = 0
    written: int | None = None
    summary: dict = field(default_factory=dict)


def timed(argv: list[str]) -> Run:
    """Wall seconds, peak RSS and output of one command; wait4 gives that child's own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        run = Run(elapsed, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status) == 0,
                  out.read().decode(), err.read().decode())
    if run.ok:
        report = json.loads(run.out)
        run.written, run.summary = report.get("bytes_written"), report.get("summary") or {}
    return run


def weft_argv(command: str, state: Path, source: list[str], prefix: list[str] | None = None) -> list[str]:
    return [*(prefix or [sys.executable, "-m", "weft.reconciler.cli"]), command, *source, "--node", NODE,
            "--state-dir", str(state), "--output", "json"]


def profiled(out: Path) -> list[str]:
    """A prefix that runs `weft` (cli.main: `weft` itself ends with os._exit) under cProfile."""
    code = ("import cProfile, sys\nfrom weft.reconciler import cli\nprofile = cProfile.Profile()\n"
            "code = profile.runcall(cli.main, sys.argv[1:])\n"
            f"profile.dump_stats({str(out)!r})\nsys.exit(code)")
    return [sys.executable, "-c", code]


class Source:
    """One source of the desired state: how weft is pointed at it and how a change reaches it."""

    def __init__(self, name: str, args: list[str], state: Path, put: Callable[[dict], None],
                 api: FakeKubeAPI | None = None, python: str = sys.executable):
        self.name, self.args, self.state, self.put, self.api = name, args, state, put, api
        self.command, self.python = "apply", python

    def run_as(self, command: str) -> Run:
        was, self.command = self.command, command
        try:
            return self.run()
        finally:
            self.command = was

    def run(self, prefix: list[str] | None = None) -> Run:
        api = self.api
        sent, asked, opened = (api.bytes_sent, len(api.requests), api.connections) if api else (0, 0, 0)
        run = timed(weft_argv(self.command, self.state, self.args,
                              prefix or [self.python, "-m", "weft.reconciler.cli"]))
        if api:
            run.api_bytes, run.api_requests = api.bytes_sent - sent, len(api.requests) - asked
            run.api_connections = api.connections - opened
        return run


def kernel_dumps() -> tuple[float, int]:
    """Best of 3: seconds for `iptables-save -t filter` + `ipset save`, and their bytes."""
    best, size = float("inf"), 0
    for _ in range(3):
        start = time.perf_counter()
        rules = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, check=True).stdout
        sets = subprocess.run(["ipset", "save"], capture_output=True, check=True).stdout
        best, size = min(best, time.perf_counter() - start), len(rules) + len(sets)
    return best, size


def failure(run: Run) -> str:
    lines = [line for line in run.err.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "exit status != 0")[:300]


def measure(source: Source, world: Cluster, changes: list[str], repeats: int) -> dict[str, Run | str]:
    """The first run, then each change `repeats` times (the median run by wall time)."""
    results: dict[str, Run | str] = {}
    first = source.run()
    results["first"] = first
    if not first.ok:
        print(f"   first `weft apply` FAILED after {first.wall:.1f} s (peak {first.rss} MiB): {failure(first)}")
        print("   the changes below are measured with `weft plan` (read, render, diff; nothing written)")
        source.command = "plan"
        source.run()                        # a plan run leaves the read cache as apply would
    for change in changes:
        if change == "moved" and source.api is None:
            continue
        runs = []
        for i in range(repeats):
            for obj in world.change(change, i):
                source.put(obj)
            run = source.run()
            if not run.ok:
                results[change] = f"FAILED: {failure(run)}"
                break
            runs.append(run)
        else:
            results[change] = sorted(runs, key=lambda r: r.wall)[len(runs) // 2]
    return results


def compare(ours: Source, theirs: Source, world: Cluster, changes: list[str], repeats: int) -> None:
    """This weft against another (--compare), run by run after the same change, in alternating
    order, both with `weft plan` (read, render, diff: the kernel is one, so applying would leave
    the second nothing to do); the first runs apply (ours) and plan (theirs) to fill the caches."""
    firsts = (ours.run(), theirs.run_as("plan"))
    print(f"   first run: {firsts[0].wall:.2f} s (apply) / {firsts[1].wall:.2f} s (plan)")
    ours.command = theirs.command = "plan"
    print(f"   {'change':26} {'this s':>7} {'other s':>8} {'ratio':>6}   "
          f"(median of {repeats}; each pair after the same change)")
    for change in changes:
        if change == "moved" and ours.api is None:
            continue
        pairs = []
        for i in range(repeats):
            for obj in world.change(change, i):
                ours.put(obj)
            first, second = (ours, theirs) if i % 2 == 0 else (theirs, ours)
            a, b = first.run(), second.run()
            for run in (a, b):
                if not run.ok:
                    print(f"   {CHANGES[change]}: a run FAILED: {failure(run)}")
            pairs.append((a.wall, b.wall) if first is ours else (b.wall, a.wall))
        this, other = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"   {CHANGES[change]:26} {this:7.2f} {other:8.2f} {this / other:6.2f}")


def show(title: str, results: dict[str, Run | str], dumps: tuple[float, int] | None, target: float | None,
         full_list: int | None) -> None:
    print(f"\n== {title}")
    print(f"   {'run':26} {'wall s':>7} {'peak MiB':>9} {'API bytes':>11} {'reqs/conns':>10} "
          f"{'kernel bytes':>13}  plan summary")
    for name, run in results.items():
        label = "first run" if name == "first" else CHANGES[name]
        if isinstance(run, str):
            print(f"   {label:26} {run}")
            continue
        written = "-" if run.written is None else f"{run.written:,}"
        mark = ""
        if target is not None and name != "first":
            mark = "  ok" if run.wall <= target else f"  MISSED (target {target:g} s)"
        summary = " ".join(f"{k}={v}" for k, v in run.summary.items()) if run.ok else f"FAILED: {failure(run)}"
        asked = f"{run.api_requests}/{run.api_connections}"
        print(f"   {label:26} {run.wall:7.2f} {run.rss:9d} {run.api_bytes:11,} {asked:>10} "
              f"{written:>13}  {summary}{mark}")
    noop = results.get("noop")
    if dumps and isinstance(noop, Run):
        print(f"   kernel dumps (iptables-save + ipset save, best of 3): {dumps[0]:.2f} s for {dumps[1]:,} bytes; "
              f"nothing to do = {noop.wall / dumps[0]:.1f}x (target <= 1.5x)")
    moved = results.get("moved")
    if full_list and isinstance(moved, Run):
        print(f"   a full list answers {full_list:,} bytes; the 'moved' run read "
              f"{100 * moved.api_bytes / full_list:.3f}% of it (target < 1%)")


def profile(source: Source, world: Cluster, change: str, work: Path) -> None:
    """One more run after `change`, under cProfile: where the main process's time goes."""
    for obj in world.change(change, 99):
        source.put(obj)
    out = work / f"profile-{source.name.split()[0]}-{change}.pstats"
    run = source.run(profiled(out))
    print(f"\n-- profile of '{CHANGES[change]}' from {source.name}: {run.wall:.2f} s (with the profiler's "
          f"overhead; the API reading child is not profiled)")
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


# ---- main -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Creates a network namespace and runs the benchmark inside it (server, weft and all)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", action="store_true", help="150,000 pods, 10,000 policies, 5,000 nodes")
    parser.add_argument("--pods", type=int)
    parser.add_argument("--policies", type=int)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--namespaces", type=int)
    parser.add_argument("--local", type=int, default=110)
    parser.add_argument("--calico", type=int, default=0, metavar="K",
                        help="every K-th policy is a Calico GlobalNetworkPolicy/NetworkPolicy (0: none)")
    parser.add_argument("--sources", default="api,chunks,kinds",
                        help="comma-separated: api, chunks (1,000 objects a file), kinds (a file per kind)")
    parser.add_argument("--changes", default=",".join(CHANGES), help="comma-separated, of: " + ", ".join(CHANGES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default="", metavar="CHANGES",
                        help="comma-separated changes (as --changes) each profiled in one more run after it")
    parser.add_argument("--compare", metavar="PYTHON",
                        help="also run another weft (the interpreter of its venv), run by run: before/after figures")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    for name, value in (SCALE if opts.scale else {"pods": 10_000, "policies": 1_000, "nodes": 91,
                                                   "namespaces": 100}).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.inside:
        return inside(opts)
    if os.geteuid() != 0:
        raise SystemExit("bench_scale: run as root (it makes a network namespace)")
    return rerun_inside_namespace("bench.bench_scale", argv)


def inside(opts) -> int:
    started = time.perf_counter()
    objs = cluster(pods=opts.pods, policies=opts.policies, namespaces=opts.namespaces, local=opts.local,
                   nodes=opts.nodes, calico=opts.calico)
    kinds = f"every {opts.calico}-th Calico" if opts.calico else "Kubernetes"
    size = (f"{opts.pods:,} pods, {opts.policies:,} policies ({kinds}), "
            f"{opts.nodes:,} nodes, {opts.namespaces:,} namespaces, {opts.local} pods on {NODE}")
    print(f"synthetic cluster: {size}; machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    sources = opts.sources.split(",")
    changes = [c for c in opts.changes.split(",") if c]
    target = TARGET_150K if opts.scale else None
    with tempfile.TemporaryDirectory(prefix="weft-bench-") as tmp:
        tmp = Path(tmp)
        if "api" in sources:
            world = Cluster(objs, opts.local)
            with FakeKubeAPI(objs, history=100_000) as api:
                kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
                print(f"API server ready ({time.perf_counter() - started:.0f} s)")
                full_before = api.bytes_sent
                source = Source("API server (FakeKubeAPI over HTTP, paginated lists, watches)",
                                ["--kubeconfig", kubeconfig], tmp / "state-api", api.put, api)
                if opts.compare:
                    print(f"\n== {source.name}: this weft against {opts.compare}")
                    other = Source("other", source.args, tmp / "state-api-other", api.put, api, opts.compare)
                    compare(source, other, world, changes, opts.repeats)
                else:
                    results = measure(source, world, changes, opts.repeats)
                    first = results["first"]
                    full = first.api_bytes if isinstance(first, Run) else api.bytes_sent - full_before
                    dumps = kernel_dumps() if isinstance(first, Run) and first.ok else None
                    show(source.name, results, dumps, target or TARGET_10K[0], full)
                    for change in filter(None, opts.profile.split(",")):
                        profile(source, world, change, tmp)
                _destroy(source)
        for layout in ("chunks", "kinds"):
            if layout not in sources:
                continue
            world = Cluster(objs, opts.local)
            made = time.perf_counter()
            files = ManifestDir(tmp / f"manifests-{layout}", objs, layout)
            what = "1,000 objects a file" if layout == "chunks" else "one file per kind"
            print(f"\nmanifest directory ({what}): {len(files.files)} files, {files.bytes / 2**20:.1f} MiB of YAML "
                  f"(written in {time.perf_counter() - made:.0f} s)")
            source = Source(f"manifest directory, {what}", ["--from", str(files.root)], tmp / f"state-{layout}",
                            files.put)
            if opts.compare:
                print(f"\n== {source.name}: this weft against {opts.compare}")
                other = Source("other", source.args, tmp / f"state-{layout}-other", files.put, None, opts.compare)
                compare(source, other, world, changes, opts.repeats)
            else:
                results = measure(source, world, changes, opts.repeats)
                first = results["first"]
                dumps = kernel_dumps() if isinstance(first, Run) and first.ok else None
                show(source.name, results, dumps, target or TARGET_10K[1], None)
                for change in filter(None, opts.profile.split(",")):
                    if change != "moved":
                        profile(source, world, change, tmp)
            _destroy(source)
    print(f"\nbenchmark took {time.perf_counter() - started:.0f} s; machine load now {os.getloadavg()[0]:.1f}")
    return 0


def _destroy(source: Source) -> None:
    """Leave the namespace empty for the next source."""
    subprocess.run(weft_argv("apply", source.state, source.args) + ["--destroy"], capture_output=True, check=False)


if __name__ == "__main__":
    sys.exit(main())
