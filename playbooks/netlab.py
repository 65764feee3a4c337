"""A throwaway node in network namespaces, wired the way Calico wires pods, for demos and tests.

The node is a namespace of its own with one veth per pod and nothing else: no uplink, no default
route, so lab traffic cannot leave the lab. Each pod namespace gets `eth0` with its /32 and a
default route to 169.254.1.1 on the host side of its veth; the node routes each pod's /32 to that
pod's veth. A dual-stack pod (an IPv6 address in its podIPs) gets its /128 too, with a default
route to the host side's link-local address fe80::ecee:eeff:feee:eeee (Calico's), and the node
forwards IPv6. weft then programs the node namespace exactly as it would a real node, and
`matrix()` shows what the policies let through, over IPv4 or IPv6. Only addresses in
198.18.0.0/15 (RFC 2544 benchmarking) and 2001:db8::/32 (documentation) are accepted, and every
namespace and process the lab makes is removed on close, also after a failure half-way through
`create()` or a Ctrl-C.

With `cni=LabCni(...)` the lab does not wire pods itself: it creates each pod's namespace and calls
the CNI plugin in the node's namespace exactly as a container runtime would (CNI_* variables, the
network configuration on stdin), takes the pod's address from the plugin's result, and calls DEL
when it closes.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from weft.desired.manifests import load_manifest_dir
from weft.model.names import host_iface_name

log = logging.getLogger(__name__)

LAB_NETWORK = ipaddress.ip_network("198.18.0.0/15")
LAB_NETWORK6 = ipaddress.ip_network("2001:db8::/32")
GATEWAY_IP = "169.254.1.1"
GATEWAY_IP6 = "fe80::ecee:eeff:feee:eeee"     # the host side's link-local address (EUI-64 of its MAC)
HOST_SIDE_MAC = "ee:ee:ee:ee:ee:ee"  # Calico's fixed host-side MAC: the pod's gateway neighbour
DEFAULT_PROBES = (("tcp", 80), ("tcp", 81), ("udp", 80), ("udp", 81))
READY_TIMEOUT = 10.0
# The server and prober are stdlib-only scripts started once per pod and per source pod per matrix:
# run by path with -I -S they skip site-packages set-up, which halves their start-up CPU.
SERVER = [sys.executable, "-I", "-S", str(Path(__file__).with_name("podserver.py"))]
PROBER = [sys.executable, "-I", "-S", str(Path(__file__).with_name("podprobe.py"))]


class LabError(RuntimeError):
    """The lab could not be built; the message names the command and what the kernel said."""


@dataclass(frozen=True)
class LabPod:
    namespace: str
    name: str
    ip: str
    ip6: str | None = None               # a dual-stack pod's IPv6 address

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def address(self, family: int) -> str:
        if family == 6:
            if self.ip6 is None:
                raise LabError(f"pod {self.key} has no IPv6 address")
            return self.ip6
        return self.ip


@dataclass(frozen=True)
class LabCni:
    """Create the lab's pods through a CNI plugin instead of wiring them directly."""
    binary: str                            # the plugin executable, e.g. .venv/bin/weft-cni
    config: Mapping                        # the network configuration's plugin keys (node, state_dir, manifests)
    node_setup: Callable[[NodeLab], None] | None = None   # once the node exists, before the first pod
    cni_version: str = "1.1.0"
    network: str = "weft"
    ifname: str = "eth0"


def pods_from_manifests(directory: str | Path, node: str) -> list[LabPod]:
    """Pods of YAML manifests in `directory` (all *.yaml / *.yml, multi-document) whose
    spec.nodeName == node, with their status.podIP (and the IPv6 address of status.podIPs, if any).

    Read with weft's own `--from` loader, so the lab wires exactly the pods weft will see. Pods
    without an IP yet (Pending) are left out: there is nothing to wire for them.
    """
    pods = []
    for _, doc in load_manifest_dir(directory):
        if not isinstance(doc, dict) or doc.get("kind") != "Pod":
            continue
        spec, status, meta = doc.get("spec") or {}, doc.get("status") or {}, doc["metadata"]
        if spec.get("nodeName") == node and status.get("podIP"):
            ip6 = next((entry["ip"] for entry in status.get("podIPs") or () if ":" in str(entry.get("ip"))), None)
            pods.append(LabPod(meta.get("namespace", "default"), meta["name"], status["podIP"], ip6))
    return pods


def check_lab_pods(pods: Sequence[LabPod]) -> None:
    """Refuse any address outside the lab range (network safety) and pods named twice, before
    touching the kernel."""
    keys = [pod.key for pod in pods]
    if len(set(keys)) != len(keys):
        raise ValueError(f"pods named more than once: {sorted({key for key in keys if keys.count(key) > 1})}")
    for pod in pods:
        for family, text, network in ((4, pod.ip, LAB_NETWORK), (6, pod.ip6, LAB_NETWORK6)):
            if text is None:
                continue
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                address = None
            if address is None or address.version != family:
                raise ValueError(f"pod {pod.key}: {text!r} is not an IPv{family} address")
            if address not in network:
                raise ValueError(f"pod {pod.key}: {text} is outside the lab's IPv{family} range {network}")


def run(argv: list[str], *, input: str | None = None) -> str:
    """Run a set-up command; a failure becomes a LabError that says which command and why."""
    done = subprocess.run(argv, input=input, text=True, capture_output=True)
    if done.returncode != 0:
        shown = " ".join(argv) + (f" <<< {input.strip()!r}" if input else "")
        raise LabError(f"{shown} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ip_batch(netns: str, commands: list[str]) -> None:
    """One `ip` process per namespace and step instead of one per command."""
    run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")


def remove_netns(name: str) -> None:
    """Kill whatever still runs in namespace `name`, then delete it; quiet if it is already gone.

    A namespace is only freed when its last process exits, so the kill comes first.
    """
    if not Path("/run/netns", name).exists():
        return
    pids = subprocess.run(["ip", "netns", "pids", name], text=True, capture_output=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = subprocess.run(["ip", "netns", "del", name], text=True, capture_output=True)
    if done.returncode != 0:
        log.warning("could not delete network namespace %s: %s", name, done.stderr.strip())


class NodeLab:
    """One throwaway node: a network namespace for the node, one per pod, a veth pair for each pod."""

    def __init__(self, pods: Sequence[LabPod], ports: Sequence[int] = (80, 81), prefix: str | None = None,
                 cni: LabCni | None = None):
        self.pods = list(pods)
        self.cni = cni
        self._cni_added: list[LabPod] = []   # pods the plugin ADDed: close() DELs them
        self.ports = [int(port) for port in ports]
        self.prefix = prefix or f"weft-lab-{secrets.token_hex(3)}"
        self.node_netns = f"{self.prefix}-node"
        self._pod_netns = {pod.key: f"{self.prefix}-{i}" for i, pod in enumerate(self.pods)}
        self._servers: list[subprocess.Popen] = []
        self._created: list[str] = []  # the namespaces close() may remove: only those this lab made

    def __enter__(self) -> NodeLab:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def netns_names(self) -> list[str]:
        """Every namespace this lab owns, pods first (deleting them removes their veths)."""
        return [*self._pod_netns.values(), self.node_netns]

    def pod_netns(self, pod: LabPod) -> str:
        return self._pod_netns[pod.key]

    def create(self) -> None:
        """Build the node, wire and start every pod; on any failure or Ctrl-C remove what was built."""
        check_lab_pods(self.pods)
        try:
            self._create_node()
            if self.cni and self.cni.node_setup:
                self.cni.node_setup(self)
            for i, pod in enumerate(self.pods):
                if self.cni:
                    self.pods[i] = pod = self._add_pod_cni(pod)
                else:
                    self._wire_pod(pod)
                self._servers.append(self._start_server(pod))
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        """Create a namespace and own it; one that already existed (explicit prefix) is not ours."""
        self._created.append(name)  # before the command: a Ctrl-C during it must not leak the namespace
        try:
            run(["ip", "netns", "add", name])
        except LabError:
            self._created.remove(name)
            raise

    def _create_node(self) -> None:
        self._add_netns(self.node_netns)
        ip_batch(self.node_netns, ["link set lo up"])
        self.node_run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        if any(pod.ip6 for pod in self.pods) or self.cni:
            # The host sides' link-local addresses must be usable at once (no duplicate address
            # detection: each is alone on its veth), or the node cannot ask a pod's neighbour
            # address for the first second or two.
            self.node_run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0",
                           "net.ipv6.conf.all.accept_dad=0"], check=True)

    def _wire_pod(self, pod: LabPod) -> None:
        netns, host_iface = self.pod_netns(pod), host_iface_name(pod.namespace, pod.name)
        self._add_netns(netns)
        ip_batch(self.node_netns, [
            f"link add {host_iface} address {HOST_SIDE_MAC} type veth peer name eth0 netns {netns}",
            f"link set {host_iface} up",
            f"route add {pod.ip}/32 dev {host_iface} scope link",
            *([f"route add {pod.ip6}/128 dev {host_iface}"] if pod.ip6 else []),
        ])
        ip_batch(netns, [
            "link set lo up",
            "link set eth0 up",
            f"addr add {pod.ip}/32 dev eth0",
            f"neigh add {GATEWAY_IP} lladdr {HOST_SIDE_MAC} dev eth0 nud permanent",
            f"route add default via {GATEWAY_IP} dev eth0 onlink",
            *([f"addr add {pod.ip6}/128 dev eth0 nodad",
               f"neigh add {GATEWAY_IP6} lladdr {HOST_SIDE_MAC} dev eth0 nud permanent",
               f"route add default via {GATEWAY_IP6} dev eth0"] if pod.ip6 else []),
        ])

    def _add_pod_cni(self, pod: LabPod) -> LabPod:
        """The runtime's part (namespace, loopback), then the plugin's ADD; the pod with its new address."""
        netns = self.pod_netns(pod)
        self._add_netns(netns)
        ip_batch(netns, ["link set lo up"])
        self._cni_added.append(pod)
        result = self._cni_call("ADD", pod) or {}     # no answer: no address, said below
        addresses = [ip["address"].split("/")[0] for ip in result.get("ips", ()) if "." in ip["address"]]
        if not addresses:
            raise LabError(f"CNI ADD of pod {pod.key} gave no IPv4 address: {result}")
        addresses6 = [ip["address"].split("/")[0] for ip in result.get("ips", ()) if ":" in ip["address"]]
        wired = LabPod(pod.namespace, pod.name, addresses[0], addresses6[0] if addresses6 else None)
        check_lab_pods([wired])                # network safety: the plugin's pools must be lab addresses
        return wired

    def _cni_call(self, command: str, pod: LabPod) -> dict | None:
        """One plugin call in the node's namespace, with the environment and stdin a runtime gives."""
        cni = self.cni
        assert cni is not None                 # only a lab made with cni= calls the plugin
        container_id = self.pod_netns(pod)     # stable per pod, and unique
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
               "CNI_CONTAINERID": container_id, "CNI_NETNS": f"/run/netns/{self.pod_netns(pod)}",
               "CNI_IFNAME": cni.ifname, "CNI_PATH": str(Path(cni.binary).parent),
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                           f"K8S_POD_INFRA_CONTAINER_ID={container_id}"}
        config = {"cniVersion": cni.cni_version, "name": cni.network, "type": "weft", **cni.config}
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.node_netns}", cni.binary], env=env,
                              input=json.dumps(config), text=True, capture_output=True, timeout=120)
        if done.returncode != 0:
            raise LabError(f"CNI {command} of pod {pod.key} failed ({done.returncode}): "
                           f"{done.stdout.strip() or done.stderr.strip()}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def _start_server(self, pod: LabPod) -> subprocess.Popen:
        """Start the pod's server in its own process group, so close() can kill it whole."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.pod_netns(pod), *SERVER, *map(str, self.ports)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )

    def _wait_ready(self) -> None:
        """Wait for every server's "ready" line: the servers start in parallel, the wait is shared."""
        deadline = time.monotonic() + READY_TIMEOUT
        for pod, server in zip(self.pods, self._servers, strict=True):
            out, err = server.stdout, server.stderr
            assert out is not None and err is not None     # _start_server pipes both
            ready, _, _ = select.select([out], [], [], max(deadline - time.monotonic(), 0))
            line = out.readline() if ready else ""
            if line.strip() != "ready":
                if server.poll() is None:
                    server.kill()
                raise LabError(f"server in pod {pod.key} did not start: {line}{err.read().strip()}")

    def close(self) -> None:
        """Stop the servers and delete every namespace; safe to call twice or on a half-built lab."""
        for server in self._servers:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.wait()
            for pipe in (server.stdout, server.stderr):
                if pipe is not None:
                    pipe.close()
        self._servers.clear()
        while self._cni_added:
            pod = self._cni_added.pop()
            try:
                self._cni_call("DEL", pod)
            except (LabError, subprocess.TimeoutExpired) as exc:
                log.warning("%s", exc)
        while self._created:
            remove_netns(self._created.pop())

    def node_run(self, argv: list[str], *, input: str | None = None, check: bool = False,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        """Run argv inside the node namespace (ip netns exec), text mode, stdout/stderr captured."""
        return subprocess.run(["ip", "netns", "exec", self.node_netns, *argv], input=input, text=True,
                              capture_output=True, check=check, timeout=timeout)

    def matrix(self, probes: Sequence[tuple[str, int]] = DEFAULT_PROBES,
               timeout: float = 1.0, family: int = 4) -> dict[tuple[str, str, str, int], bool]:
        """Probe every ordered pod pair (src != dst and src == dst both included) on each (proto, port),
        to the pods' addresses of `family` (4 or 6): key (src.key, dst.key, proto, port) -> connected?

        One prober per source pod, all in parallel, so the whole matrix costs about one timeout.
        """
        self._forget_flows()
        cases = [(dst, proto, port) for dst in self.pods for proto, port in probes]
        request = json.dumps({"timeout": timeout, "targets": [
            {"ip": dst.address(family), "proto": proto, "port": port} for dst, proto, port in cases]})
        with ThreadPoolExecutor(max_workers=max(len(self.pods), 1)) as pool:
            rows = pool.map(lambda src: self._probe_from(src, request, timeout), self.pods)
            return {
                (src.key, dst.key, proto, port): connected
                for src, row in zip(self.pods, rows, strict=True)
                for (dst, proto, port), connected in zip(cases, row, strict=True)
            }

    def _forget_flows(self) -> None:
        """Flush the node's conntrack table, so every probe is a new flow judged by the policy in force now.

        Probes reuse ephemeral source ports: a UDP flow an earlier matrix left established (30 s)
        would let the same 5-tuple through a rule that now blocks it.
        """
        if shutil.which("conntrack"):
            run(["ip", "netns", "exec", self.node_netns, "conntrack", "-F"])
        else:
            log.warning("conntrack (Debian package conntrack) is not installed: the lab cannot flush old flows, "
                        "so a probe may pass as part of a flow an earlier matrix established")

    def _probe_from(self, src: LabPod, request: str, timeout: float) -> list[bool]:
        """One prober process per source pod; all its targets are probed concurrently inside it."""
        argv = ["ip", "netns", "exec", self.pod_netns(src), *PROBER]
        done = subprocess.run(argv, input=request, text=True, capture_output=True, timeout=timeout * 2 + 30)
        if done.returncode != 0:
            raise LabError(f"prober in pod {src.key} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)


def format_matrix(pods: Sequence[LabPod], matrix: dict) -> str:
    """Human table like the upstream netpol e2e tests print: one table per (proto, port),
    rows = from, columns = to, '.' for connected and 'X' for blocked ('?' if not probed)."""
    probes = list(dict.fromkeys((proto, port) for _, _, proto, port in matrix))
    keys = [pod.key for pod in pods]
    width = max([len(key) for key in keys] + [1]) + 1
    marks: dict[bool | None, str] = {True: ".", False: "X"}
    tables = []
    for proto, port in probes:
        lines = [f"{proto.upper()}/{port}  (rows: from, columns: to; . connected, X blocked)",
                 "-".ljust(width) + "".join(key.ljust(width) for key in keys).rstrip()]
        for src in keys:
            cells = [marks.get(matrix.get((src, dst, proto, port)), "?") for dst in keys]
            lines.append(src.ljust(width) + "".join(cell.ljust(width) for cell in cells).rstrip())
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
