"""A throwaway multi-node cluster routed with BGP: `weft lab --nodes N`, and the BGP tests' fixture.

Each node is a playbooks.netlab.NodeLab (a node namespace with Calico-style veth pods) plus an
uplink `fabric0` into a shared "fabric" namespace, where a bridge joins all nodes on 198.18.0.0/24.
Every node has its own weft state dir and runs its own BIRD (foreground, control socket
`<state dir>/bird.ctl`, config `<state dir>/bird.conf`; what BIRD prints before its configuration
takes over goes to `<state dir>/bird.out`, as `bird.log` is its own log file's name). The cluster
is written as manifests (Nodes with Calico's BGP annotations, one IPPool, one IPAMBlock per node,
the pods) and weft is applied on each node inside its namespace. Nothing has a route out of the lab; every namespace and
BIRD process is removed on close, also after a failure half-way or a Ctrl-C.
"""
from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from weft.desired.kinds.ipam import block_name
from weft.playbooks.netlab import PROBER, LabError, LabPod, NodeLab, format_matrix, ip_batch, remove_netns, run
from weft.probes import bird as probe

FABRIC = ipaddress.ip_network("198.18.0.0/24")
POOL = ipaddress.IPv4Network("198.18.4.0/22")
BLOCK_PREFIX = 26
UPLINK = "fabric0"
NAMESPACE = "lab"
WEFT = [sys.executable, "-m", "weft.reconciler.cli"]
PREFIX = "wml"
_NS_NAME = re.compile(rf"^{PREFIX}-(\d+)-")
_counter = itertools.count()


@dataclass
class LabNode:
    name: str
    address: str                   # "198.18.0.1/24"
    block: str                     # this node's IPAM block
    netlab: NodeLab
    state_dir: Path
    bird: subprocess.Popen | None = None
    labels: dict = field(default_factory=dict)

    @property
    def pods(self) -> list[LabPod]:
        """The node's pods, with the addresses they really have (the CNI plugin's, when it wired them)."""
        return self.netlab.pods

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def netns(self) -> str:
        return self.netlab.node_netns

    @property
    def socket(self) -> str:
        return str(self.state_dir / "bird.ctl")

    @property
    def config(self) -> Path:
        return self.state_dir / "bird.conf"


def block_object(cidr: str, node: str) -> dict:
    """A Calico IPAMBlock of `node` (affinity host:<node>), as the manifests hold it."""
    return {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": block_name(cidr)},
            "spec": {"cidr": cidr, "affinity": f"host:{node}"}}


def sweep_orphans() -> None:
    """Remove lab namespaces whose creating process is gone (it was killed before cleaning up)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not Path(f"/proc/{match.group(1)}").exists():
            remove_netns(name)


class MultiNodeLab:
    """N nodes on one fabric, `pods_per_node` pods each; `labels` per node name for selectors."""

    def __init__(self, nodes: int = 2, pods_per_node: int = 2, *, workdir: Path | None = None,
                 labels: dict[str, dict] | None = None, ports: Sequence[int] = (80, 81), cni: bool = False):
        if not 1 <= nodes <= 16:
            raise ValueError("a lab has 1 to 16 nodes (one /26 block each in 198.18.4.0/22)")
        self.prefix = f"{PREFIX}-{os.getpid()}-{next(_counter)}{secrets.token_hex(2)}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="weft-multinode-"))
        self.manifests = self.workdir / "manifests"
        self.fabric_netns = f"{self.prefix}-fabric"
        self.nodes: list[LabNode] = []
        self.routers: dict[str, tuple[str, subprocess.Popen]] = {}    # name -> (netns, BIRD)
        self._created: list[str] = []
        self.cni = cni
        self._wired = not cni            # pod addresses known (the manifests can say them)
        blocks = list(POOL.subnets(new_prefix=BLOCK_PREFIX))
        for i in range(nodes):
            name = f"node-{i + 1}"
            block = blocks[i]
            pods = [LabPod(NAMESPACE, f"n{i + 1}-{chr(ord('a') + j)}", str(block.network_address + 2 + j))
                    for j in range(pods_per_node)]
            state_dir = self.workdir / name
            netlab = NodeLab(pods, ports, prefix=f"{self.prefix}-n{i + 1}",
                             **({"cni": self._lab_cni(name, state_dir)} if cni else {}))
            self.nodes.append(LabNode(name, f"{FABRIC.network_address + 1 + i}/{FABRIC.prefixlen}", str(block),
                                      netlab, state_dir, labels=dict((labels or {}).get(name, {}))))

    def __enter__(self) -> MultiNodeLab:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pods(self) -> list[LabPod]:
        return [pod for node in self.nodes for pod in node.pods]

    def _lab_cni(self, name: str, state_dir: Path):
        """Pods through weft's CNI plugin, as a container runtime calls it in the node's namespace;
        the node's first `weft apply` (its IPAM state) runs before the first pod."""
        try:
            from weft.playbooks.netlab import LabCni
        except ImportError:
            raise LabError("this checkout's playbooks.netlab cannot create pods through the CNI plugin") from None
        plugin = Path(sys.executable).parent / "weft-cni"

        def first_run(netlab: NodeLab) -> None:
            (state_dir).mkdir(parents=True, exist_ok=True)
            done = netlab.node_run([*WEFT, "apply", "--from", str(self.manifests), "--node", name,
                                    "--state-dir", str(state_dir)])
            if done.returncode != 0:
                raise LabError(f"weft apply on {name} exited {done.returncode}: {done.stderr.strip()}")

        return LabCni(str(plugin), {"node": name, "state_dir": str(state_dir), "manifests": str(self.manifests)},
                      node_setup=first_run)

    def node(self, name: str) -> LabNode:
        return next(n for n in self.nodes if n.name == name)

    # --- building ------------------------------------------------------------------------

    def create(self) -> None:
        """Fabric, nodes and pods, manifests; on any failure remove what was built."""
        sweep_orphans()
        try:
            self._add_netns(self.fabric_netns)
            ip_batch(self.fabric_netns, ["link set lo up", "link add br0 type bridge", "link set br0 up"])
            self.write_manifests()
            for node in self.nodes:
                node.state_dir.mkdir(parents=True, exist_ok=True)
                node.netlab.create()
                self._plug(node.netns, f"p-{node.name}", node.address)
            self._wired = True
            self.write_manifests()       # now with every pod's address, as kubelets would report them
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        self._created.append(name)
        try:
            run(["ip", "netns", "add", name])
        except LabError:
            self._created.remove(name)
            raise

    def _plug(self, netns: str, port: str, address: str) -> None:
        """A veth from `netns` (UPLINK, with `address`) to the fabric bridge."""
        if ipaddress.ip_interface(address).ip not in FABRIC:
            raise ValueError(f"{address} is outside the lab fabric {FABRIC}")
        ip_batch(self.fabric_netns, [f"link add {port} type veth peer name {UPLINK} netns {netns}",
                                     f"link set {port} master br0", f"link set {port} up"])
        ip_batch(netns, [f"addr add {address} dev {UPLINK}", f"link set {UPLINK} up"])

    def base_objects(self) -> list[dict]:
        """The cluster as Kubernetes/Calico objects: Nodes, the pool, one block per node, pods."""
        objects: list[dict] = [{"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": NAMESPACE, "labels": {"ns": NAMESPACE}}},
                               {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
                                "metadata": {"name": "lab-pool"},
                                "spec": {"cidr": str(POOL), "blockSize": BLOCK_PREFIX}}]
        for node in self.nodes:
            objects.append({"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": node.name, "labels": {"kubernetes.io/hostname": node.name, **node.labels},
                "annotations": {"projectcalico.org/IPv4Address": node.address}},
                "status": {"addresses": [{"type": "InternalIP", "address": node.ip}]}})
            objects.append(block_object(node.block, node.name))
            for pod in node.pods:
                objects.append({"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"namespace": pod.namespace, "name": pod.name,
                                             "labels": {"pod": pod.name, "node": node.name}},
                                "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "pause"}]},
                                "status": {"phase": "Running", **({"podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
                                                                  if self._wired else {})}})
        return objects

    def write_manifests(self, extra: Iterable[dict] = (), node_annotations: dict[str, dict] | None = None) -> Path:
        """(Re)write the manifest dir: the base cluster plus `extra` objects (BGPConfiguration,
        BGPPeers, policies, more blocks (`block_object`), ...); `node_annotations` adds
        annotations to Nodes by name."""
        objects = self.base_objects()
        for obj in objects:
            if obj["kind"] == "Node":
                obj["metadata"]["annotations"].update((node_annotations or {}).get(obj["metadata"]["name"], {}))
        self.manifests.mkdir(parents=True, exist_ok=True)
        for old in self.manifests.glob("*.yaml"):
            old.unlink()
        (self.manifests / "cluster.yaml").write_text(yaml.safe_dump_all([*objects, *extra], sort_keys=False))
        return self.manifests

    # --- weft and BIRD -------------------------------------------------------------------

    def weft(self, node: LabNode, *args: str) -> subprocess.CompletedProcess:
        """`weft ARGS --from manifests --node N --state-dir D` inside the node's namespace."""
        argv = [*WEFT, *args, "--from", str(self.manifests), "--node", node.name, "--state-dir", str(node.state_dir)]
        return node.netlab.node_run(argv)

    def apply(self, node: LabNode) -> list[str]:
        """`weft apply` on the node (policy, routes and BIRD's configuration: written, checked,
        reloaded if BIRD runs); the BIRD commands it ran. Raises LabError when weft fails."""
        done = self.weft(node, "apply", "--bird-socket", node.socket, "--output", "json")
        if done.returncode != 0:
            raise LabError(f"weft apply on {node.name} exited {done.returncode}: {done.stderr.strip()}")
        return [c for c in json.loads(done.stdout)["commands"] if c.startswith(("bird ", "birdc "))]

    def apply_all(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(self.apply, self.nodes))

    def start_bird(self, node: LabNode, timeout: float = 5.0) -> None:
        """BIRD in the node's namespace, in the foreground of its own process group."""
        node.bird = self._start_bird(node.netns, node.config, node.socket, node.state_dir / "bird.out", timeout)

    def _start_bird(self, netns: str, config: Path, socket: str, log: Path, timeout: float) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", netns, probe.BIRD, "-f", "-c", str(config), "-s", socket],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not probe.running(socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill(proc)
                raise LabError(f"BIRD in {netns} did not start: {log.read_text().strip()[-500:]}")
            time.sleep(0.02)
        return proc

    def add_router(self, name: str, address: str, config_text: str) -> str:
        """A plain BIRD (a ToR router, say) in a namespace of its own on the fabric; its socket."""
        netns = f"{self.prefix}-{name}"
        self._add_netns(netns)
        ip_batch(netns, ["link set lo up"])
        self._plug(netns, f"p-{name}"[:15], address)
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        (home / "bird.conf").write_text(config_text)
        socket = str(home / "bird.ctl")
        self.routers[name] = (netns, self._start_bird(netns, home / "bird.conf", socket, home / "bird.out", 5.0))
        return socket

    def sessions(self, node: LabNode) -> dict[str, probe.Protocol]:
        return {p.name: p for p in probe.show_protocols(node.socket) if p.proto == "BGP"}

    def wait_established(self, nodes: Sequence[LabNode] | None = None, timeout: float = 20.0) -> float:
        """Wait until every BGP session of every node is Established; the seconds it took."""
        start = time.monotonic()
        pending: dict = {}
        while time.monotonic() - start < timeout:
            pending = {n.name: [p.name for p in self.sessions(n).values() if p.info != "Established"]
                       for n in nodes or self.nodes}
            if not any(pending.values()) and all(self.sessions(n) for n in nodes or self.nodes):
                return time.monotonic() - start
            time.sleep(0.05)
        raise LabError(f"BGP sessions not Established after {timeout:g}s: {pending}")

    def kernel_route(self, node: LabNode, prefix: str) -> str:
        """`ip route show PREFIX` in the node's namespace (empty when the kernel has no such route)."""
        return node.netlab.node_run(["ip", "route", "show", prefix], check=True).stdout.strip()

    def learned(self, node: LabNode) -> dict[str, str]:
        """Prefix -> protocol of the routes this node's BIRD selected from its BGP peers."""
        return {r.prefix: r.protocol for r in probe.show_routes(node.socket)
                if r.primary and r.protocol.split("_")[0] in ("Mesh", "Node", "Global")}

    def wait_routes(self, node: LabNode, prefixes: Iterable[str], timeout: float = 15.0) -> None:
        want = set(prefixes)
        deadline = time.monotonic() + timeout
        while not want <= set(self.learned(node)):
            if time.monotonic() > deadline:
                raise LabError(f"{node.name} did not learn {sorted(want - set(self.learned(node)))}")
            time.sleep(0.05)

    # --- traffic ---------------------------------------------------------------------------

    def matrix(self, probes: Sequence[tuple[str, int]] = (("tcp", 80),), timeout: float = 1.0) -> dict:
        """Every pod to every pod, across nodes: (src, dst, proto, port) -> connected?"""
        for node in self.nodes:
            node.netlab.node_run(["conntrack", "-F"])
        targets = [(dst, proto, port) for dst in self.pods for proto, port in probes]
        request = json.dumps({"timeout": timeout, "targets": [{"ip": d.ip, "proto": p, "port": n}
                                                              for d, p, n in targets]})

        def row(src: tuple[LabNode, LabPod]) -> list[bool]:
            node, pod = src
            done = subprocess.run(["ip", "netns", "exec", node.netlab.pod_netns(pod), *PROBER], input=request,
                                  text=True, capture_output=True, timeout=timeout * 2 + 30)
            if done.returncode != 0:
                raise LabError(f"prober in pod {pod.key} failed: {done.stderr.strip()}")
            return json.loads(done.stdout)

        sources = [(node, pod) for node in self.nodes for pod in node.pods]
        with ThreadPoolExecutor(max_workers=len(sources)) as pool:
            rows = list(pool.map(row, sources))
        return {(pod.key, dst.key, proto, port): ok
                for (_, pod), answers in zip(sources, rows, strict=True)
                for (dst, proto, port), ok in zip(targets, answers, strict=True)}

    # --- removal ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every BIRD, remove every namespace this lab made and its work dir; safe twice."""
        for node in self.nodes:
            if node.bird is not None:
                _kill(node.bird)
                node.bird = None
            node.netlab.close()
        for _, proc in self.routers.values():
            _kill(proc)
        self.routers.clear()
        while self._created:
            remove_netns(self._created.pop())
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- weft lab --nodes N -----------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="weft lab --nodes N", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2)")
    parser.add_argument("--pods", type=int, default=2, help="pods per node (default 2)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up and print how to remove it")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds a probe waits")
    parser.add_argument("--wire", choices=("cni", "direct"), default="cni",
                        help="create pods through weft's CNI plugin (default) or wire them directly")
    return parser.parse_args(argv)


DEMO_POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"namespace": NAMESPACE, "name": "only-from-node-1"},
    "spec": {"podSelector": {"matchLabels": {"node": "node-2"}}, "policyTypes": ["Ingress"],
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"node": "node-1"}}}]}]},
}


def demo(lab: MultiNodeLab, timeout: float) -> None:
    from weft.playbooks.lab import StepFailed, section
    from weft.reconciler.status import collect, format_text
    section(f"weft apply on {len(lab.nodes)} nodes (BIRD not running yet: its configuration is written and checked)")
    lab.apply_all()
    start = time.monotonic()
    for node in lab.nodes:
        lab.start_bird(node)
    took = lab.wait_established()
    section(f"BGP sessions Established {took:.1f}s after BIRD started")
    for node in lab.nodes:
        lab.wait_routes(node, [n.block for n in lab.nodes if n is not node])
        print(f"--- weft status on {node.name} ({node.ip})")
        print(format_text(collect(node.socket)))
    print(f"every node learned every other node's block {time.monotonic() - start:.1f}s after BIRD started")
    section("Cross-node connectivity, no policy (TCP/80)")
    matrix = lab.matrix(timeout=timeout)
    print(format_matrix(lab.pods, matrix))
    if not all(matrix.values()):
        raise StepFailed("some pods cannot reach each other with no policy: routing is broken")
    if len(lab.nodes) > 1:
        section("NetworkPolicy only-from-node-1: pods of node-2 accept only pods of node-1")
        lab.write_manifests([DEMO_POLICY])
        lab.apply_all()
        print(format_matrix(lab.pods, lab.matrix(timeout=timeout)))


def has_lab_cni() -> bool:
    from weft.playbooks import netlab
    return hasattr(netlab, "LabCni") and (Path(sys.executable).parent / "weft-cni").exists()


def main(argv: list[str] | None = None) -> int:
    from weft.playbooks.lab import guarded, section, sigterm_as_exit
    args = parse_args(argv)
    lab = MultiNodeLab(args.nodes, args.pods, cni=args.wire == "cni" and has_lab_cni())

    def steps() -> None:
        section(f"Building {args.nodes} nodes on fabric {FABRIC} (pool {POOL}, one /{BLOCK_PREFIX} per node)")
        lab.create()
        for node in lab.nodes:
            print(f"{node.name}: {node.netns}  {node.address}  block {node.block}  "
                  f"pods {', '.join(p.ip for p in node.pods)}")
        demo(lab, args.timeout)

    with sigterm_as_exit():
        try:
            code = guarded(steps, also=(OSError,))
            if code:
                return code
        finally:
            if args.keep:
                section("The lab is still up (--keep)")
                for node in lab.nodes:
                    print(f"{node.name}: ip netns exec {node.netns} bash; birdc -s {node.socket} show protocols")
                names = " ".join([*(n for node in lab.nodes for n in node.netlab.netns_names), *lab._created])
                print(f"remove it: for ns in {names}; do ip netns pids $ns | xargs -r kill; ip netns del $ns; done;"
                      f" rm -rf {lab.workdir}")
            else:
                lab.close()
    section("Done: the lab is removed" if not args.keep else "Done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
