"""`weft lab`: weft's whole loop, end to end, on a throwaway node built from network namespaces.

Builds the example cluster's node (playbooks/example/cluster.yaml), shows who reaches whom with no
policy, runs `weft plan` and `weft apply` with the example policies inside the node namespace,
shows the matrix again, checks `weft drift` reports nothing, removes weft's state with
`weft apply --destroy`, confirms everything is open again, and removes the lab. Nothing outside
the lab's own namespaces is touched. The pods are created by weft's CNI plugin, called as a
container runtime calls it (env vars + stdin config), after a first `weft apply` of the cluster
alone (the node's reconcile run before any pod arrives); --no-cni wires them directly.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from weft.playbooks.netlab import LabCni, LabError, NodeLab, format_matrix, pods_from_manifests

EXAMPLE_DIR = Path(__file__).parent / "example"
NODE = "lab-node"
WEFT = [sys.executable, "-m", "weft.reconciler.cli"]  # run inside the node namespace; tests swap it
PLAN_OK = (0, 2)  # terraform-style detailed exit codes: 0 nothing to do, 2 changes planned


class StepFailed(Exception):
    """A step of the demo did not give the expected result; the message says which and why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="weft lab", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the lab up at the end and print how to enter and remove it")
    parser.add_argument("--no-cni", dest="cni", action="store_false",
                        help="wire the pods directly instead of through weft's CNI plugin (which is "
                             "called as a container runtime calls it, by default)")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="seconds a probe waits for an answer before the path counts as blocked")
    return parser.parse_args(argv)


def guarded(body, also: tuple = ()) -> int:
    """Run a lab's steps: 0 when they pass, 1 (saying why) when one fails, 130 on Ctrl-C.
    Removing the lab is the caller's `finally`."""
    try:
        body()
    except (LabError, StepFailed, subprocess.TimeoutExpired, *also) as err:
        print(f"\nweft lab: FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nweft lab: interrupted", file=sys.stderr)
        return 130
    return 0


def section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


@contextlib.contextmanager
def sigterm_as_exit():
    """Turn SIGTERM into SystemExit, so the lab's cleanup runs when a job runner stops us too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def show_matrix(lab: NodeLab, title: str, timeout: float) -> dict:
    """The matrix over IPv4, and over IPv6 too when the pods are dual-stack (then both must be
    the same: weft enforces the families alike). Returns IPv4's."""
    families = (4, 6) if any(p.ip6 for p in lab.pods) else (4,)
    found = {}
    for family in families:
        section(f"{title} (IPv{family})")
        matrix = found[family] = lab.matrix(timeout=timeout, family=family)
        print(format_matrix(lab.pods, matrix))
        print(f"\n{sum(matrix.values())} of {len(matrix)} probes connected")
    if len(found) == 2 and found[4] != found[6]:
        differ = sorted(k for k in found[4] if found[4][k] != found[6][k])
        raise StepFailed(f"{title}: IPv6 differs from IPv4 for {len(differ)} probes, e.g. {differ[0]}")
    return found[4]


def weft(lab: NodeLab, verb: str, manifests: Path, state: Path, *extra: str, ok=(0,)) -> None:
    """Run one weft command in the node namespace, show its output, fail the step on a bad exit code."""
    args = [verb, *extra, "--from", str(manifests), "--node", NODE, "--state-dir", str(state)]
    section("weft " + " ".join(args))
    done = lab.node_run([*WEFT, *args])
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr, flush=True)
    if done.returncode not in ok:
        raise StepFailed(f"weft {verb} exited {done.returncode} (expected {' or '.join(map(str, ok))})")


def demo(lab: NodeLab, manifests: Path, state: Path, timeout: float) -> None:
    """The steps after the lab is up; raises StepFailed at the first one that goes wrong."""
    if not all(show_matrix(lab, "Connectivity with no policy", timeout).values()):
        raise StepFailed("the lab itself is broken: with no policy every pod should reach every pod")
    weft(lab, "plan", manifests, state, ok=PLAN_OK)
    weft(lab, "apply", manifests, state)
    show_matrix(lab, "Connectivity with the example policies applied", timeout)
    weft(lab, "drift", manifests, state)
    weft(lab, "apply", manifests, state, "--destroy")
    if not all(show_matrix(lab, "Connectivity after apply --destroy", timeout).values()):
        raise StepFailed("apply --destroy left some path blocked: weft's rules were not all removed")


def cni_runtime(workdir: Path, state: Path) -> LabCni:
    """This environment's plugin, with the example cluster (pools, the node's block) but not the policies:
    the no-policy matrix comes first."""
    cluster = workdir / "cluster"
    cluster.mkdir()
    shutil.copy(EXAMPLE_DIR / "cluster.yaml", cluster)
    return LabCni(str(Path(sys.executable).parent / "weft-cni"),
                  {"node": NODE, "state_dir": str(state), "manifests": str(cluster)},
                  node_setup=lambda lab: weft(lab, "apply", cluster, state))


def print_keep(lab: NodeLab, workdir: Path) -> None:
    section("The lab is still up (--keep)")
    print(f"node:      ip netns exec {lab.node_netns} bash")
    for pod in lab.pods:
        print(f"pod {pod.key:<5} ip netns exec {lab.pod_netns(pod)} bash    # {pod.ip}")
    print(f"manifests and weft state: {workdir}")
    weft_args = f"--from {workdir / 'manifests'} --node {NODE} --state-dir {workdir / 'state'}"
    print(f"apply the example policies again: ip netns exec {lab.node_netns} {' '.join(WEFT)} apply {weft_args}")
    names = " ".join(lab.netns_names)
    print(f"remove it: for ns in {names}; do ip netns pids $ns | xargs -r kill; ip netns del $ns; done;"
          f" rm -rf {workdir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="weft-lab-"))
    manifests, state = workdir / "manifests", workdir / "state"
    manifests.mkdir()
    state.mkdir()
    for path in EXAMPLE_DIR.glob("*.yaml"):
        shutil.copy(path, manifests)
    lab = NodeLab(pods_from_manifests(manifests, NODE), cni=cni_runtime(workdir, state) if args.cni else None)
    created = False

    def steps() -> None:
        nonlocal created
        section(f"Building the lab from {EXAMPLE_DIR / 'cluster.yaml'} (node {NODE})")
        lab.create()
        created = True
        print(f"node namespace {lab.node_netns}, {len(lab.pods)} pods")
        demo(lab, manifests, state, args.timeout)

    with sigterm_as_exit():
        try:
            code = guarded(steps)
            if code:
                return code
        finally:
            if args.keep and created:
                print_keep(lab, workdir)
            else:
                lab.close()
                shutil.rmtree(workdir, ignore_errors=True)
    section("Done: the lab is removed" if not args.keep else "Done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
