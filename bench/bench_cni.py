"""CNI plugin benchmark: weft against Debian's ptp + host-local, interleaved call by call.

Every plugin is run as a container runtime runs it: a new process in the node's network
namespace, CNI_* variables, the network configuration on stdin, a fresh pod namespace per ADD.
The machine is shared (other work moves its load from minute to minute), so absolute figures
drift; what this benchmark stands on is the ratio of calls made side by side. Each round runs
weft and the reference once each, in an order that alternates from round to round (A B, B A),
so neither always goes first:

  ADD alone        one pod per plugin, one call after the other
  20 ADDs at once  20 pods per plugin, started together
  DEL alone, 20 DELs at once   the same pods, removed the same way

A pair is weft's call (or, at once, the median of its 20) and the reference's in the same round;
the table prints the median of the pairs' ratios next to each side's p50/p99 and the mean CPU time
a call costs (the caller's process and its children; for weft served by its helper, plus the
helper's own CPU and its children's over the calls it served).
weft runs four ways, each against the reference in a run of its own: served by its resident
helper (the usual case: the node's first call starts it) through the installed plugin (the
native client where a C compiler was there, cni/client.c); the same with another program
changing the ruleset before each batch (the helper lists the dispatch chains again each time:
reconciler.endpoint.DispatchCache); served through the Python launcher; and with "helper":
false (every call does all the work in its own process).

Then where one served call's time goes, each part measured directly (never as a difference of
two noisy medians): a served call end to end (VERSION: the caller and one round trip to the
helper) with either client, the Python interpreter's start-up (a process of its own), the
client's and the plugin's imports (timed inside one process), and the plugin's steps in this
process.

Run as root:  .venv/bin/python -m bench.bench_cni [--rounds N] [--rounds-at-once M] [--modes ...]
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
import threading
import time
import uuid
from pathlib import Path

import yaml

from bench.installed import compile_weft

REPO = Path(__file__).resolve().parent.parent
NODE = "bench-node"
REFERENCE_DIR = Path("/usr/lib/cni")
CONCURRENT = 20
ENV_BASE = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
TICK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.1f}"


class Outcome:
    """One call: wall time, CPU time of the process and its children, exit code, output."""
    __slots__ = ("wall", "cpu", "code", "out", "err")

    def __init__(self, wall: float, cpu: float, code: int, out: bytes, err: bytes):
        self.wall, self.cpu, self.code, self.out, self.err = wall, cpu, code, out, err


def spawn(argv: list[str], env: dict, data: bytes) -> Outcome:
    """Run one plugin process; its CPU time comes from wait4 (its own and its reaped children's)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(data)
    proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)         # reaped here: Popen must not wait again
    proc.stdout.close()
    proc.stderr.close()
    return Outcome(wall, usage.ru_utime + usage.ru_stime, proc.returncode, out, err)


# ---- inside the node namespace -------------------------------------------------------------

class Plugin:
    """A plugin as the runtime sees it: the executable and its network configuration. `helper`:
    weft served by its resident helper, whose CPU is counted to the calls it serves; `busy`:
    another program commits to the node's ruleset before each of its batches (as kube-proxy
    does on a busy node), so the helper never finds the dispatch chains as it left them."""

    def __init__(self, name: str, argv: list[str], config: dict, helper: bool = False, busy: bool = False):
        self.name, self.argv, self.config, self.helper, self.busy = name, argv, config, helper, busy
        self.stdin = json.dumps(config).encode()


class Bench:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.count = 0

    def pod_netns(self, n: int) -> list[str]:
        names = []
        for _ in range(n):
            self.count += 1
            names.append(f"{self.prefix}-p{self.count}")
        run_all([["ip", "netns", "add", name] for name in names])
        return names

    def drop_netns(self, names: list[str]) -> None:
        run_all([["ip", "netns", "del", name] for name in names], check=False)

    def call(self, plugin: Plugin, command: str, netns: str, container: str) -> Outcome:
        env = {**ENV_BASE, "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": f"/run/netns/{netns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(REFERENCE_DIR),
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"}
        done = spawn(plugin.argv, env, plugin.stdin)
        if done.code:
            raise SystemExit(f"{plugin.name} {command} {container} failed: {done.out.decode()} {done.err.decode()}")
        return done

    def batch(self, plugin: Plugin, command: str, pods: list[tuple[str, str]]) -> tuple[list[float], float, float]:
        """All `pods` at once (started together); (wall times, the callers' CPU per call, the
        helper's CPU per call)."""
        before = helper_cpu() if plugin.helper else 0.0
        results: list[Outcome | None] = [None] * len(pods)
        failures: list[str] = []
        gate = threading.Barrier(len(pods))

        def one(i: int) -> None:
            gate.wait()
            try:
                results[i] = self.call(plugin, command, *pods[i])
            except SystemExit as exc:
                failures.append(str(exc))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pods))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise SystemExit(failures[0])
        done = [r for r in results if r is not None]
        served = (helper_cpu() - before) if plugin.helper else 0.0
        return [r.wall for r in done], sum(r.cpu for r in done) / len(done), served / len(done)


def run_all(commands: list[list[str]], check: bool = True) -> None:
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    for c, p in zip(commands, procs, strict=True):
        _, err = p.communicate()
        if check and p.returncode:
            raise SystemExit(f"{' '.join(c)}: {err.decode().strip()}")


def helper_pid() -> int | None:
    """The weft CNI helper serving this network namespace (the benchmark's own namespace)."""
    here = os.stat("/proc/self/ns/net").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if b"weft.cni.helper" in Path(f"/proc/{entry}/cmdline").read_bytes() and \
                    os.stat(f"/proc/{entry}/ns/net").st_ino == here:
                return int(entry)
        except OSError:
            continue
    return None


def helper_cpu() -> float:
    """CPU seconds of the helper so far, its own and its reaped children's (ip, iptables)."""
    pid = helper_pid()
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICK


class Pairs:
    """Per case and plugin: every wall time and CPU figure, and per round each plugin's figure."""

    def __init__(self) -> None:
        self.walls: dict[tuple[str, str], list[float]] = {}
        self.cpu: dict[tuple[str, str], list[float]] = {}
        self.helper: dict[tuple[str, str], list[float]] = {}
        self.rounds: dict[tuple[str, str], list[float]] = {}

    def add(self, case: str, plugin: str, walls: list[float], cpu: float, helper: float) -> None:
        self.walls.setdefault((case, plugin), []).extend(walls)
        self.cpu.setdefault((case, plugin), []).append(cpu + helper)
        self.helper.setdefault((case, plugin), []).append(helper)
        self.rounds.setdefault((case, plugin), []).append(statistics.median(walls))

    def ratio(self, case: str, plugin: str, reference: str) -> tuple[float, float, float]:
        """Median, and first and last quartile, of the per-round ratios plugin / reference."""
        ratios = [a / b for a, b in zip(self.rounds[(case, plugin)], self.rounds[(case, reference)], strict=True)]
        if len(ratios) < 4:
            return statistics.median(ratios), min(ratios), max(ratios)
        q = statistics.quantiles(ratios, n=4)
        return statistics.median(ratios), q[0], q[2]


def interleaved(bench: Bench, plugins: list[Plugin], rounds: int, concurrent: int, pairs: Pairs,
                label: str) -> None:
    """`rounds` rounds; in each, every plugin ADDs `concurrent` pods at once (in an order that
    rotates round by round), then every plugin DELs them (same order)."""
    for r in range(rounds):
        order = plugins[r % len(plugins):] + plugins[:r % len(plugins)]
        netns = bench.pod_netns(concurrent * len(plugins))
        pods = {p.name: [(netns[i * concurrent + j], f"{bench.prefix}{label.split()[0]}{r}x{i}x{j}".replace("-", ""))
                         for j in range(concurrent)] for i, p in enumerate(plugins)}
        for command in ("ADD", "DEL"):
            for plugin in order:
                if plugin.busy:
                    another_program_commits()
                walls, cpu, helper = bench.batch(plugin, command, pods[plugin.name])
                pairs.add(f"{command} {label}", plugin.name, walls, cpu, helper)
        bench.drop_netns(netns)


def another_program_commits() -> None:
    """A change to the ruleset that is not weft's: a chain of the raw table made or removed."""
    exists = subprocess.run(["iptables-nft", "-t", "raw", "-S", "bench-churn"], capture_output=True).returncode == 0
    subprocess.run(["iptables-nft", "-t", "raw", "-X" if exists else "-N", "bench-churn"], check=True)


def weft_config(state: Path, manifests: Path) -> dict:
    return {"cniVersion": "1.1.0", "name": "weft", "type": "weft", "node": NODE, "state_dir": str(state),
            "manifests": str(manifests)}


def reference_config(work: Path) -> dict:
    return {"cniVersion": "1.0.0", "name": "bench", "type": "ptp", "ipMasq": False, "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": "198.18.96.0/24", "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": str(work / "host-local")}}


# ---- where the time goes ----------------------------------------------------------------------

IMPORTS = """\
import sys, time
sys.path[:0] = {paths!r}
t0 = time.perf_counter()
import weft.cni.client
t1 = time.perf_counter()
import weft.cni.plugin
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, len(sys.modules))
"""


def startup_and_imports(python: str, paths: list[str], clients: dict[str, str], config: dict,
                        repeat: int = 15) -> dict[str, float]:
    """Each part measured on its own: a served VERSION call through each client (wall and CPU of
    the caller), a bare interpreter's start-up (wall and CPU of a process that does nothing),
    and the imports, timed inside one process each run."""
    lean, site, lean_cpu = [], [], []
    client, plugin = [], []
    served: dict[str, list[float]] = {}
    env = {**ENV_BASE, "CNI_COMMAND": "VERSION"}
    for _ in range(repeat):
        for name, binary in clients.items():
            done = spawn([binary], env, json.dumps(config).encode())
            served.setdefault(f"a served call (VERSION), {name}, wall", []).append(done.wall)
            served.setdefault(f"a served call (VERSION), {name}, CPU of the caller", []).append(done.cpu)
        done = spawn([python, "-IS", "-c", "pass"], {}, b"")
        lean.append(done.wall)
        lean_cpu.append(done.cpu)
        site.append(spawn([python, "-c", "pass"], {}, b"").wall)
        out = subprocess.run([python, "-IS", "-c", IMPORTS.format(paths=paths)], capture_output=True, text=True,
                             check=True).stdout.split()
        client.append(float(out[0]))
        plugin.append(float(out[1]))
    return {
        **{key: statistics.median(values) for key, values in served.items()},
        "start-up, -I -S (the Python launcher), wall": statistics.median(lean),
        "start-up, -I -S, CPU": statistics.median(lean_cpu),
        "start-up with site (the console script), wall": statistics.median(site),
        "import weft.cni.client (all a served call imports)": statistics.median(client),
        "import weft.cni.plugin after it (a call without helper)": statistics.median(plugin),
    }


def work_breakdown(bench: Bench, state: Path, repeat: int = 15) -> dict[str, float]:
    """The plugin's own steps in this process, one pod at a time (what the helper does per pod
    alone), each timed directly. The policy steps twice: with the ruleset unchanged since this
    process last wrote it (the helper's usual case: one restore), and changed by another program
    in between (the dispatch chains listed again first)."""
    from weft.cni import wiring
    from weft.probes.pods import routed_addresses
    from weft.reconciler.endpoint import DispatchCache, add_endpoints, remove_endpoints
    from weft.store import ipam
    store = ipam.Store(state, held=routed_addresses)
    steps: dict[str, list[float]] = {}

    def timed(key: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        steps.setdefault(key, []).append(time.perf_counter() - start)
        return value
    kept = DispatchCache()
    for changed in (False, True):
        how = "ruleset changed since (2 listings, restore)" if changed else "ruleset unchanged since (restore)"
        for i in range(repeat):
            (netns,) = bench.pod_netns(1)
            name, iface = f"breakdown{int(changed)}x{i}", f"weftbench{int(changed)}{i:04d}"
            timed("ADD: the live pods' addresses, from /proc", routed_addresses)
            allocation, _ = timed("ADD: IPAM allocate (lock, read, choose, fsync + rename)", store.allocate,
                                  "weft", name, "eth0", "bench", name, iface)
            timed("ADD: wiring (veth, pod side, sysctls, host side)", wiring.wire, f"/run/netns/{netns}", "eth0",
                  iface, list(allocation.ips), 1500, wiring.alias_for(name, "eth0"))
            cache = DispatchCache() if changed else kept
            timed(f"ADD: policy, {how}", add_endpoints, state, [(iface, "bench", name)], cache)
            timed("DEL: delete the veth", wiring.delete_host_side, iface)
            cache = DispatchCache() if changed else kept
            timed(f"DEL: policy, {how}", remove_endpoints, state, [(iface,)], cache)
            timed("DEL: IPAM release (lock, read, fsync + rename)", store.release, "weft", name, "eth0")
            bench.drop_netns([netns])
    return {key: statistics.median(values) for key, values in steps.items()}


# ---- the run ------------------------------------------------------------------------------------

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
    from weft.cni.install import install, is_native, launcher_paths
    launcher = str(install(work / "bin" / "weft"))              # the native client when there is a C compiler
    python_launcher = str(install(work / "python-bin" / "weft", native=False))
    bench = Bench(opts.prefix)
    config = weft_config(state, manifests)
    served = Plugin("weft, served by its helper", [launcher], config, helper=True)
    served_py = Plugin("weft, served, Python launcher", [python_launcher], config, helper=True)
    busy = Plugin("weft, served, busy ruleset", [launcher], config, helper=True, busy=True)
    alone = Plugin("weft, \"helper\": false", [launcher], {**config, "helper": False})
    client = "native client" if is_native(launcher) else "Python launcher: no C compiler"
    if not (REFERENCE_DIR / "ptp").exists():
        raise SystemExit(f"{REFERENCE_DIR}/ptp not found: install containernetworking-plugins for the reference")
    reference = Plugin("ptp + host-local", [str(REFERENCE_DIR / "ptp")], reference_config(work))
    warm = Pairs()
    interleaved(bench, [served], 1, 1, warm, "warm-up")          # the first ADD starts the helper
    for _ in range(50):
        if helper_pid() is not None:
            break
        time.sleep(0.1)
    interleaved(bench, [served, served_py, alone, reference], 2, 1, warm, "warm-up")   # files in the page cache

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {opts.rounds} rounds alone, "
          f"{opts.rounds_at_once} rounds of {CONCURRENT} at once; order alternating round by round; CPU: mean "
          "per call, the caller's process and its children (weft served: and the helper's share, also shown "
          "apart)")
    print(f"weft served: the installed plugin ({client}); busy: another program changed the ruleset before "
          "each batch; py: the Python launcher\n")
    print(f"{'':<30} {'weft':^28} {'ptp + host-local':^21}  {'weft / ptp, pair by pair':^26}")
    print(f"{'case (ms)':<30} {'p50':>6} {'p99':>6} {'CPU':>6} {'helper':>6}   {'p50':>6} {'p99':>6} {'CPU':>6}   "
          f"{'median':>8} {'(quartiles)':>16}")
    # One weft mode at a time against the reference: the plugin processes of "helper": false
    # commit to the same ruleset as the helper does, which it would see as another program's
    # change (reconciler.endpoint.DispatchCache) after every one of them.
    for plugin, short in ((served, "served"), (busy, "served, busy"), (served_py, "served, py"),
                          (alone, "no helper")):
        if short not in opts.modes:
            continue
        pairs = Pairs()
        interleaved(bench, [plugin, reference], opts.rounds, 1, pairs, "alone")
        interleaved(bench, [plugin, reference], opts.rounds_at_once, CONCURRENT, pairs, f"{CONCURRENT} at once")
        for command in ("ADD", "DEL"):
            for label in ("alone", f"{CONCURRENT} at once"):
                case = f"{command} {label}"
                rw, pw = pairs.walls[(case, plugin.name)], pairs.walls[(case, reference.name)]
                rc, pc = pairs.cpu[(case, plugin.name)], pairs.cpu[(case, reference.name)]
                helper = f"{ms(statistics.mean(pairs.helper[(case, plugin.name)]))}" if plugin.helper else \
                    f"{'-':>6}"
                mid, low, high = pairs.ratio(case, plugin.name, reference.name)
                print(f"{case + ', ' + short:<30} {ms(statistics.median(rw))} {ms(percentile(rw, 99))} "
                      f"{ms(statistics.mean(rc))} {helper}   {ms(statistics.median(pw))} {ms(percentile(pw, 99))} "
                      f"{ms(statistics.mean(pc))}   {mid:7.2f}x {f'({low:.2f}-{high:.2f})':>16}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print("\nWhere a served call's time goes (medians, ms; each part measured on its own):")
    clients = {"native client": launcher} if is_native(launcher) else {}
    for key, value in startup_and_imports(sys.executable, launcher_paths(), {**clients, "Python launcher":
                                                                            python_launcher}, config).items():
        print(f"  {key:<62} {ms(value)}")
    for key, value in work_breakdown(bench, state).items():
        print(f"  {key:<62} {ms(value)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Creates the node namespace and runs the benchmark inside it; removes every namespace after."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds of one call per plugin (alone)")
    parser.add_argument("--rounds-at-once", type=int, default=6, help=f"rounds of {CONCURRENT} calls per plugin")
    modes = ["served", "served, busy", "served, py", "no helper"]
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes, help="the ways of running weft to measure")
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
                    "--rounds-at-once", str(opts.rounds_at_once), "--prefix", prefix, "--work", work,
                    "--modes", *opts.modes]
            return subprocess.run(["ip", "netns", "exec", node, *argv], cwd=REPO).returncode
    finally:
        _stop_helper(node)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in [n for n in names if n.startswith(prefix + "-")]:
            subprocess.run(["ip", "netns", "del", name], check=False)


def _stop_helper(node: str) -> None:
    """The helper the benchmark's first call started in its node namespace (it would exit by
    itself once its state dir is gone; stopping it now frees the namespace at once)."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            if b"weft.cni.helper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), 15)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
