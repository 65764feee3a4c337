"""CNI plugin benchmark: ADD and DEL latency, alone and 20 at once, against Debian's ptp + host-local.

Every plugin is run the same way, as a container runtime runs it: a new process in the node's
network namespace, CNI_* variables, the network configuration on stdin, one fresh pod namespace
per ADD. Prints p50/p99 wall latency per case -- weft served by its resident helper (the usual
case: the node's first call starts it), and with "helper": false (every call does all the work
in its own process) -- then where one weft ADD's time goes: interpreter start-up, imports, and
the work itself (IPAM, wiring, the endpoint's policy), measured apart.
Targets (issue #3): ADD alone <= 50 ms; 20 concurrent p50 <= 150 ms, p99 <= 400 ms.

Run as root:  .venv/bin/python -m bench.bench_cni [--rounds N]
Needs Debian's containernetworking-plugins (ptp, host-local under /usr/lib/cni) for the reference.
Everything happens in namespaces it creates (addresses from 198.18.0.0/15), removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from bench.installed import compile_weft

REPO = Path(__file__).resolve().parent.parent
NODE = "bench-node"
REFERENCE_DIR = Path("/usr/lib/cni")
CONCURRENT = 20
ENV_BASE = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


# ---- inside the node namespace -------------------------------------------------------------

class Bench:
    def __init__(self, prefix: str, work: Path):
        self.prefix, self.work = prefix, work
        self.count = 0

    def pod_netns(self) -> str:
        self.count += 1
        name = f"{self.prefix}-p{self.count}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        return name

    def call(self, binary: list[str], command: str, netns: str, config: dict, container: str) -> tuple[float, str]:
        env = {**ENV_BASE, "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": f"/run/netns/{netns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(REFERENCE_DIR),
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"}
        start = time.perf_counter()
        done = subprocess.run(binary, input=json.dumps(config).encode(), env=env, capture_output=True)
        elapsed = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{' '.join(binary)} {command} {container} failed: {done.stdout.decode()} "
                             f"{done.stderr.decode()}")
        return elapsed, done.stdout.decode()

    def run_case(self, binary: list[str], config: dict, rounds: int, concurrent: int) -> dict[str, list[float]]:
        """`rounds` rounds of `concurrent` pods: all ADDs of a round at once, then all DELs at once."""
        times: dict[str, list[float]] = {"ADD": [], "DEL": []}
        for r in range(rounds):
            pods = [(self.pod_netns(), f"{self.prefix}-r{r}-{i}".replace("-", "")) for i in range(concurrent)]
            for command in ("ADD", "DEL"):
                with ThreadPoolExecutor(concurrent) as pool:
                    results = list(pool.map(lambda p, c=command: self.call(binary, c, p[0], config, p[1])[0], pods))
                times[command] += results
            for netns, _ in pods:
                subprocess.run(["ip", "netns", "del", netns], check=False)
        return times


def weft_config(state: Path, manifests: Path) -> dict:
    return {"cniVersion": "1.1.0", "name": "weft", "type": "weft", "node": NODE, "state_dir": str(state),
            "manifests": str(manifests)}


def reference_config(work: Path) -> dict:
    return {"cniVersion": "1.0.0", "name": "bench", "type": "ptp", "ipMasq": False, "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": "198.18.96.0/24", "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": str(work / "host-local")}}


def startup_and_imports(python: str, paths: list[str], repeat: int = 15) -> dict[str, float]:
    """Median wall time of a bare interpreter, with `site`, and with the plugin's imports."""
    def median(argv: list[str]) -> float:
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    setup = f"import sys; sys.path[:0] = {paths!r}"
    lean = median([python, "-IS", "-c", setup])
    return {
        "start-up, -I -S (the installed launcher)": lean,
        "start-up with site (the console script)": median([python, "-c", "pass"]),
        "imports: weft.cni.client (all a call the helper serves)": median(
            [python, "-IS", "-c", setup + "; import weft.cni.client"]) - lean,
        "imports: weft.cni.plugin (a call without the helper)": median(
            [python, "-IS", "-c", setup + "; import weft.cni.plugin"]) - lean,
        "imports: weft.reconciler.endpoint (add_endpoint)": median(
            [python, "-IS", "-c", setup + "; import weft.cni.plugin, weft.reconciler.endpoint"])
        - median([python, "-IS", "-c", setup + "; import weft.cni.plugin"]),
    }


def work_breakdown(bench: Bench, state: Path, repeat: int = 15) -> dict[str, float]:
    """The plugin's own steps in this process (no start-up): IPAM, wiring, the endpoint's policy."""
    from weft.cni import wiring
    from weft.probes.pods import routed_addresses
    from weft.reconciler.endpoint import add_endpoint, remove_endpoint
    from weft.store import ipam
    store = ipam.Store(state, held=routed_addresses)
    held = statistics.median(_timed(routed_addresses) for _ in range(repeat))
    steps: dict[str, list[float]] = {"IPAM: allocate (lock, read /proc routes, choose, fsync + rename)": [],
                                     "wiring: veth, pod side, sysctls, host route (ip x2)": [],
                                     "policy: add_endpoint (iptables-restore)": [],
                                     "DEL: remove_endpoint + delete veth + release": []}
    for i in range(repeat):
        netns, name = bench.pod_netns(), f"breakdown{i}"
        iface = f"weftbench{i:05d}"
        t0 = time.perf_counter()
        allocation, _ = store.allocate("weft", name, "eth0", "bench", name, iface)
        t1 = time.perf_counter()
        wiring.wire(f"/run/netns/{netns}", "eth0", iface, list(allocation.ips), 1500, wiring.alias_for(name, "eth0"))
        t2 = time.perf_counter()
        add_endpoint(state, "bench", name, iface, allocation.ips)
        t3 = time.perf_counter()
        remove_endpoint(state, iface)
        wiring.delete_host_side(iface)
        store.release("weft", name, "eth0")
        t4 = time.perf_counter()
        for key, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[key].append(value)
        subprocess.run(["ip", "netns", "del", netns], check=False)
    result = {}
    for key, values in steps.items():
        result[key] = statistics.median(values)
        if key.startswith("IPAM"):
            result["  of which: the live pods' addresses, from /proc"] = held
    return result


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inside(opts) -> int:
    work = Path(opts.work)
    state, manifests = work / "state", work / "manifests"
    manifests.mkdir()
    pool = {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "bench"},
            "spec": {"cidr": "198.18.0.0/16", "blockSize": 26}}
    blocks = [{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
               "metadata": {"name": f"198-18-{n}-0-26"}, "spec": {"cidr": f"198.18.{n}.0/26",
                                                                "affinity": f"host:{NODE}"}} for n in (8, 9)]
    (manifests / "ipam.yaml").write_text(yaml.safe_dump_all([pool, *blocks]))
    subprocess.run([sys.executable, "-m", "weft.reconciler.cli", "apply", "--from", str(manifests), "--node", NODE,
                    "--state-dir", str(state)], check=True, capture_output=True, cwd=REPO)
    from weft.cni.install import install, launcher_paths
    launcher = str(install(work / "bin" / "weft"))
    console = str(Path(sys.executable).parent / "weft-cni")
    bench = Bench(opts.prefix, work)
    config = weft_config(state, manifests)
    bench.run_case([launcher], config, 1, 1)                  # first ADD: reads the manifests, writes node.json
    cases = [("weft (installed launcher)", [launcher], config),
             ("weft, \"helper\": false", [launcher], {**config, "helper": False}),
             ("weft (weft-cni console script)", [console], config)]
    if (REFERENCE_DIR / "ptp").exists():
        cases.append(("ptp + host-local (Debian)", [str(REFERENCE_DIR / "ptp")], reference_config(work)))
    else:
        print(f"({REFERENCE_DIR}/ptp not found: install containernetworking-plugins for the reference)")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    print(f"{'case':<46} {'ADD p50':>8} {'p99':>7}   {'DEL p50':>8} {'p99':>7}   (ms, wall, n)")
    for name, binary, conf in cases:
        for label, rounds, concurrent in (("alone", opts.rounds * CONCURRENT, 1), (f"{CONCURRENT} at once",
                                                                                    opts.rounds, CONCURRENT)):
            if "console" in name and concurrent > 1:
                continue
            t = bench.run_case(binary, conf, rounds, concurrent)
            print(f"{name + ', ' + label:<46} {ms(statistics.median(t['ADD']))} {ms(percentile(t['ADD'], 99))}   "
                  f"{ms(statistics.median(t['DEL']))} {ms(percentile(t['DEL'], 99))}   n={len(t['ADD'])}")
    print("\nWhere one weft ADD's time goes (medians, ms; the work is what the helper does per pod alone):")
    for key, value in startup_and_imports(sys.executable, launcher_paths()).items():
        print(f"  {key:<52} {ms(value)}")
    for key, value in work_breakdown(bench, state).items():
        print(f"  {key:<52} {ms(value)}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Creates the node namespace and runs the benchmark inside it; removes every namespace after."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help=f"rounds of {CONCURRENT} pods per case")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.inside:
        return inside(opts)
    if os.geteuid() != 0:
        raise SystemExit("bench_cni: run as root (it creates network namespaces)")
    compile_weft()
    prefix = f"wcb-{uuid.uuid4().hex[:6]}"
    node = f"{prefix}-node"
    subprocess.run(["ip", "netns", "add", node], check=True)
    try:
        with tempfile.TemporaryDirectory(prefix="weft-bench-cni-") as work:
            subprocess.run(["ip", "-n", node, "link", "set", "lo", "up"], check=True)
            argv = [sys.executable, "-m", "bench.bench_cni", "--inside", "--rounds", str(opts.rounds),
                    "--prefix", prefix, "--work", work]
            return subprocess.run(["ip", "netns", "exec", node, *argv], cwd=REPO).returncode
    finally:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in [n for n in names if n.startswith(prefix + "-")]:
            subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    sys.exit(main())
