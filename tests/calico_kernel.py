"""A real node for Calico semantics tests: weft's rendered tables in a network namespace,
pods in their own namespaces, an "outside" namespace behind the node, and single packets sent
between them (tests/calico_probe.py) to read the kernel's verdict.

Network safety: every namespace is the test's own (named `wcal-<pid>-<n>`), addresses are pod
addresses of the test's state (198.18.0.0/15) and the outside's 198.19.0.0/16; nothing is
added to the root namespace (the node's sysctls, rules and sets are the node namespace's), and
every namespace is removed when the node is closed, also on failure.

The node is wired like netlab's (a /32 route per pod to its host-side veth, the pod's default
route via 169.254.1.1 with a permanent neighbour entry), and weft's render of the state for the
node (chains, hooks, sets) is loaded whole with iptables-restore and ipset restore.

Either data plane: `dataplane="ebpf"` loads what an eBPF node keeps of the iptables render
(renderers.bpf_policy.host_dataplane) and puts weft's eBPF programs and policy maps on the pods'
veths (reconciler.bpf_apply, in the node namespace through setns: never `ip netns exec`, which
hides bpffs), pinned under `bpf_root`: a pin directory the test owns and removes (tests share
one per module, so the programs are compiled once).
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from weft.desired.verdict import Decision, Evaluator, Packet, Verdict
from weft.model.cluster import EGRESS, INGRESS, ClusterState, Endpoint
from weft.model.kernel import Dataplane
from weft.renderers.iptables import render_node

DATAPLANES = ("iptables", "ebpf")

PROBE = Path(__file__).resolve().parent / "calico_probe.py"
GATEWAY_IP = "169.254.1.1"
HOST_SIDE_MAC = "ee:ee:ee:ee:ee:ee"
OUTSIDE_NEXT_HOP, OUTSIDE_MAC = "169.254.2.2", "ee:ee:ee:00:00:02"
OUTSIDE_NET = "198.19.0.0/16"
# Behind the outside too: cluster-internal addresses that are not this node's pods (a peer node's
# pod, say). Above every pod address, so the outside never sends and receives in one batch.
INTERNAL_NET = "198.18.7.0/24"
TABLES = ("filter", "mangle", "raw", "nat")
_counter = itertools.count()
_ids = itertools.count(1)


def run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def in_ns(netns: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    return run("nsenter", f"--net=/run/netns/{netns}", *argv, stdin=stdin, check=check)


def restore_text(dataplane: Dataplane) -> tuple[str, str]:
    """(iptables-restore input for every IPv4 table of a render, ipset restore input)."""
    lines = []
    for name in sorted({t for t, _ in dataplane.chains} | {t for t, _ in dataplane.hooks}):
        if name.endswith("6"):
            continue                    # the IPv6 family's tables (filter6, ...): this node is IPv4
        lines.append(f"*{name}")
        chains = [c for (table, _), c in sorted(dataplane.chains.items()) if table == name]
        lines += [f":{c.name} - [0:0]" for c in chains]
        for c in chains:
            lines += c.rules
        for (table, _), hook in sorted(dataplane.hooks.items()):
            if table == name:
                lines += hook.rules
        lines.append("COMMIT")
    sets = []
    for s in sorted(dataplane.ipsets.values(), key=lambda s: s.name):
        sets.append(f"create {s.name} {s.type} family {s.family}")
        sets += [f"add {s.name} {m}" for m in sorted(s.members)]
    return "\n".join(lines) + "\n", "\n".join(sets) + "\n"


@dataclass(frozen=True)
class Flow:
    """One packet: from a pod ("ns/pod") or an outside address, to a pod or an outside address."""
    src: str
    dst: str
    protocol: str | int = "tcp"
    dst_port: int | None = 80
    src_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


def _order(probe: dict) -> bool:
    return ipaddress.ip_address(probe["src"]) < ipaddress.ip_address(probe["dst"])


class KernelNode:
    """Namespaces for `state`'s pods on `node`, and the outside."""

    def __init__(self, state: ClusterState, node: str, host_ip: str | None = None, dataplane: str = "iptables",
                 bpf_root: Path | None = None):
        assert dataplane in DATAPLANES and (dataplane == "iptables" or bpf_root is not None)
        self.dataplane = dataplane
        self.bpf_root = bpf_root
        self.node = node
        self.host_ip = host_ip             # the node's address on eth0 (its host endpoint's), if any
        self.prefix = f"wcal-{os.getpid()}-{next(_counter)}"
        self.node_ns = f"{self.prefix}-n"
        self.outside_ns = f"{self.prefix}-o"
        self.created: list[str] = []
        self.pods: dict[str, tuple[Endpoint, str]] = {}
        self.state = state

    def __enter__(self) -> KernelNode:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add(self, name: str) -> None:
        self.created.append(name)
        run("ip", "netns", "add", name)
        in_ns(name, "ip", "link", "set", "lo", "up")

    def _create(self) -> None:
        self._add(self.node_ns)
        in_ns(self.node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, ep in enumerate(self.state.local_endpoints(self.node)):
            netns = f"{self.prefix}-{i}"
            self._add(netns)
            self.pods[ep.key] = (ep, netns)
            ip = next(a for a in ep.ips if ":" not in a)
            in_ns(self.node_ns, "ip", "-batch", "-", stdin="\n".join([
                f"link add {ep.iface} address {HOST_SIDE_MAC} type veth peer name eth0 netns {netns}",
                f"link set {ep.iface} up",
                f"route add {ip}/32 dev {ep.iface} scope link"]) + "\n")
            in_ns(netns, "ip", "-batch", "-", stdin="\n".join([
                "link set eth0 up", f"addr add {ip}/32 dev eth0",
                f"neigh add {GATEWAY_IP} lladdr {HOST_SIDE_MAC} dev eth0 nud permanent",
                f"route add default via {GATEWAY_IP} dev eth0 onlink"]) + "\n")
        self._add(self.outside_ns)
        in_ns(self.node_ns, "ip", "-batch", "-", stdin="\n".join([
            f"link add eth0 address {HOST_SIDE_MAC} type veth peer name eth0 netns {self.outside_ns}",
            "link set eth0 up",
            *([f"addr add {self.host_ip}/32 dev eth0"] if self.host_ip else []),
            f"neigh add {OUTSIDE_NEXT_HOP} lladdr {OUTSIDE_MAC} dev eth0 nud permanent",
            f"route add {OUTSIDE_NET} via {OUTSIDE_NEXT_HOP} dev eth0 onlink",
            f"route add 198.18.100.0/24 via {OUTSIDE_NEXT_HOP} dev eth0 onlink",
            f"route add {INTERNAL_NET} via {OUTSIDE_NEXT_HOP} dev eth0 onlink"]) + "\n")
        in_ns(self.outside_ns, "ip", "-batch", "-", stdin="\n".join([
            f"link set eth0 address {OUTSIDE_MAC}", "link set eth0 up",
            f"neigh add {GATEWAY_IP} lladdr {HOST_SIDE_MAC} dev eth0 nud permanent",
            f"route add default via {GATEWAY_IP} dev eth0 onlink"]) + "\n")

    def close(self) -> None:
        for name in reversed(self.created):
            run("ip", "netns", "del", name, check=False)
        self.created.clear()

    # --- policy ----------------------------------------------------------------------------

    def load(self, state: ClusterState) -> Dataplane:
        """Replace the node's filter table and sets with weft's render of `state` (the same
        pods); forget every connection."""
        assert {ep.key for ep in state.local_endpoints(self.node)} == set(self.pods), "the pods are fixed"
        self.state = state
        dataplane = render_node(state, self.node)
        if self.dataplane == "ebpf":
            from weft.renderers.bpf_policy import host_dataplane
            dataplane = host_dataplane(dataplane)
        rules, sets = restore_text(dataplane)
        for table in TABLES:
            in_ns(self.node_ns, "iptables", "-t", table, "-F")
            in_ns(self.node_ns, "iptables", "-t", table, "-X")
        in_ns(self.node_ns, "ipset", "destroy")
        in_ns(self.node_ns, "ipset", "restore", stdin=sets)
        in_ns(self.node_ns, "iptables-restore", stdin=rules)
        if self.dataplane == "ebpf":
            self.load_bpf(state)
        self.forget()
        return dataplane

    def load_bpf(self, state: ClusterState):
        """weft's eBPF plane for `state` on the pods' veths (compiled only if the pin directory
        has no current build); the maps must read back exactly as rendered."""
        from weft.playbooks.bpflab import in_netns
        from weft.probes.bpf import read_maps
        from weft.reconciler.bpf_apply import apply_bpf, build_for
        from weft.renderers.bpf_policy import render_bpf
        assert self.bpf_root is not None
        maps = render_bpf(state, self.node)
        in_netns(self.node_ns, apply_bpf, maps, self.bpf_root)
        found = in_netns(self.node_ns, read_maps, build_for(self.bpf_root).maps_dir(self.bpf_root))
        assert found == maps, "the eBPF maps read back differ from the render"
        return maps

    def forget(self) -> None:
        """Forget every tracked connection: the kernel's, and weft's eBPF conntrack."""
        in_ns(self.node_ns, "conntrack", "-F", check=False)
        if self.dataplane == "ebpf":
            from weft.reconciler.bpf_apply import build_for, clear_map
            assert self.bpf_root is not None
            clear_map(build_for(self.bpf_root).maps_dir(self.bpf_root) / "conntrack")

    # --- packets -----------------------------------------------------------------------------

    def _where(self, who: str) -> tuple[str, str]:
        """(address, namespace) of a pod key, "host" (the node) or an outside address."""
        if who == "host":
            assert self.host_ip is not None
            return self.host_ip, self.node_ns
        if who in self.pods:
            ep, netns = self.pods[who]
            return next(a for a in ep.ips if ":" not in a), netns
        return who, self.outside_ns

    def probes(self, flows: list[Flow]) -> list[dict]:
        """One probe (tests/calico_probe.py) per flow; a source port is picked where none is given."""
        probes = []
        for flow in flows:
            src, src_ns = self._where(flow.src)
            dst, dst_ns = self._where(flow.dst)
            assert src_ns != dst_ns, f"{flow}: both ends in one namespace"
            number = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132}.get(str(flow.protocol), flow.protocol)
            ident = next(_ids) % 60000 + 1
            probes.append({"id": ident, "from": src_ns, "to": dst_ns, "src": src, "dst": dst, "proto": int(number),
                           "sport": flow.src_port or 20000 + ident % 40000, "dport": flow.dst_port or 0,
                           "icmp_type": flow.icmp_type or 0, "icmp_code": flow.icmp_code or 0})
        return probes

    def delivered(self, probes: list[dict]) -> list[bool]:
        """For each probe, whether the node forwarded it. A protocol without ports is tracked by
        its addresses alone, so a probe the other way would be the reply of an allowed one: the
        probes go in two batches (lower source address first, then the others) with the node's
        connections forgotten in between."""
        arrived: set[int] = set()
        for batch in ([p for p in probes if _order(p)], [p for p in probes if not _order(p)]):
            if batch:
                captures = sorted({p["to"] for p in batch} - {self.node_ns})
                local = [self.node_ns] if any(p["to"] == self.node_ns for p in batch) else []
                out = run(sys.executable, str(PROBE),
                          stdin=json.dumps({"captures": captures, "local": local, "probes": batch}))
                arrived |= set(json.loads(out))
                self.forget()
        return [p["id"] in arrived for p in probes]

    def expected(self, flows: list[Flow], probes: list[dict]) -> list[bool]:
        """The reference evaluator's verdict for each flow (desired.verdict)."""
        evaluator = Evaluator(self.state)
        result = []
        for flow, probe in zip(flows, probes, strict=True):
            ported = probe["proto"] in (6, 17, 132)
            icmp = probe["proto"] == 1
            packet = Packet(probe["src"], probe["dst"], probe["proto"], probe["sport"] if ported else None,
                            probe["dport"] if ported else None, probe["icmp_type"] if icmp else None,
                            probe["icmp_code"] if icmp else None)
            if flow.dst == "host" and flow.src in self.pods:
                decision = evaluator.to_host(self.pods[flow.src][0], packet)
                if decision.verdict == Verdict.UNMANAGED:      # Return: the node's own INPUT accepts
                    decision = Decision(Verdict.ALLOW, decision.by, decision.logged)
            elif flow.src == "host" and flow.dst in self.pods:
                decision = evaluator.from_host(self.pods[flow.dst][0], packet)
            elif "host" in (flow.src, flow.dst):
                hep = evaluator.host_endpoint_for(self.node, "eth0", [self.host_ip])
                direction = INGRESS if flow.dst == "host" else EGRESS
                decision = evaluator.host(hep, direction, packet) if hep else Decision(Verdict.ALLOW, "not policed")
            elif flow.src in self.pods and flow.dst in self.pods:
                decision = evaluator.between(self.pods[flow.src][0], self.pods[flow.dst][0], packet)
            elif flow.src in self.pods:
                decision = evaluator.workload(self.pods[flow.src][0], EGRESS, packet)
                decision = self._forwarded(evaluator, EGRESS, packet, decision)
            else:
                decision = self._forwarded(evaluator, INGRESS, packet)
                decision = evaluator.workload(self.pods[flow.dst][0], INGRESS, packet) if decision.allowed \
                    else decision
            result.append(decision.allowed)
        return result

    def _forwarded(self, evaluator: Evaluator, direction, packet: Packet, before: Decision | None = None) -> Decision:
        """A pod's packet from or to the outside also crosses eth0: its host endpoint's verdict on
        forwarded traffic (applyOnForward policies); one that leaves it to the next rules (every
        tier passed) is forwarded here (the node's FORWARD accepts)."""
        if before is not None and not before.allowed:
            return before
        hep = evaluator.host_endpoint_for(self.node, "eth0", [self.host_ip] if self.host_ip else [])
        if hep is None:
            return before or Decision(Verdict.ALLOW, "no host endpoint")
        decision = evaluator.host(hep, direction, packet, forwarded=True)
        if decision.verdict == Verdict.UNMANAGED:
            return Decision(Verdict.ALLOW, decision.by, decision.logged)
        return decision

    def mismatches(self, flows: list[Flow]) -> list[str]:
        """Flows where the kernel and the reference evaluator disagree, described."""
        probes = self.probes(flows)
        got, want = self.delivered(probes), self.expected(flows, probes)
        return [f"{f}: kernel {'passed' if g else 'dropped'}, Calico {'allows' if w else 'denies'}"
                for f, g, w in zip(flows, got, want, strict=True) if g != w]


def bpf_usable() -> str | None:
    """Why the eBPF plane cannot be loaded here, or None."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (Debian's python3-bpfcc) in the interpreter: see playbooks/setup.sh"
    return None


def bpf_pins(prefix: str):
    """A pin directory of its own (under weft's, named by this process and `prefix`), removed
    after, also on failure: a generator for a pytest fixture."""
    from weft.reconciler.bpf_apply import node_pin_dir, remove_pins
    root = node_pin_dir(f"/nonexistent/weft-test-{prefix}-{os.getpid()}-{next(_counter)}")
    try:
        yield root
    finally:
        remove_pins(root)
        assert not root.exists(), f"pins left behind in {root}"
