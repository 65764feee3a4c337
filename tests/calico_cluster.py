"""Small clusters for Calico semantics tests: manifest-shaped objects and the verdicts of
desired.verdict for flows between pods and addresses."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from weft.desired.loader import build_cluster_state
from weft.desired.manifests import load_manifest_dir
from weft.desired.verdict import Evaluator, Packet, Verdict
from weft.model.cluster import EGRESS, INGRESS, ClusterState

CALICO = "projectcalico.org/v3"
NODE = "node1"
EXAMPLES = Path(__file__).resolve().parent / "calico"


def node(name: str = NODE) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}}


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def service_account(name: str, ns: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "labels": labels}}


def pod(name: str, ns: str, ip: str, labels: dict | None = None, sa: str | None = None,
        ports: dict[str, int] | None = None, node_name: str = NODE) -> dict:
    spec: dict = {"nodeName": node_name, "containers": [{"name": "c", "ports": [
        {"name": n, "containerPort": p, "protocol": "TCP"} for n, p in (ports or {}).items()]}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": spec, "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def gnp(name: str, **spec) -> dict:
    return {"apiVersion": CALICO, "kind": "GlobalNetworkPolicy", "metadata": {"name": name}, "spec": spec}


def np(name: str, ns: str, **spec) -> dict:
    return {"apiVersion": CALICO, "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def tier(name: str, order: float | None, default_action: str = "Deny") -> dict:
    spec: dict = {"defaultAction": default_action}
    if order is not None:
        spec["order"] = order
    return {"apiVersion": CALICO, "kind": "Tier", "metadata": {"name": name}, "spec": spec}


def kind(kind_name: str, name: str, spec: dict, ns: str | None = None, **labels: str) -> dict:
    meta: dict = {"name": name, "labels": labels}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": CALICO, "kind": kind_name, "metadata": meta, "spec": spec}


def cluster(*docs: dict, namespaces: tuple[str, ...] = ("ns1", "ns2")) -> ClusterState:
    """A state of `docs`, with node1 and the namespaces given (unless `docs` define them)."""
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    base = [] if ("Node", NODE) in defined else [node()]
    base += [namespace(n) for n in namespaces if ("Namespace", n) not in defined]
    return build_cluster_state([("test.yaml", d) for d in (*base, *docs)])


def example(*paths: str) -> ClusterState:
    """The state of some files of tests/calico (a directory: all its files)."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, rel in enumerate(paths):
            source = EXAMPLES / rel
            files = sorted(source.glob("*.yaml")) if source.is_dir() else [source]
            for f in files:
                shutil.copy(f, Path(tmp) / f"{i:02d}-{f.name}")
        return build_cluster_state(load_manifest_dir(tmp))


class Flows:
    """Verdicts for flows in one state: endpoints named "ns/pod", anything else is an address."""

    def __init__(self, state: ClusterState):
        self.state = state
        self.evaluator = Evaluator(state)
        self.pods = {ep.key: ep for ep in state.endpoints}

    def address(self, who: str) -> str:
        return self.pods[who].ips[0] if who in self.pods else who

    def packet(self, src: str, dst: str, port: int | None = 80, protocol: str = "tcp", **kw) -> Packet:
        if protocol in ("icmp", "icmpv6"):
            port = None
        return Packet(self.address(src), self.address(dst), protocol, kw.pop("src_port", 40000 if port else None),
                      port, **kw)

    def decide(self, src: str, dst: str, port: int | None = 80, protocol: str = "tcp", **kw):
        packet = self.packet(src, dst, port, protocol, **kw)
        if src in self.pods and dst in self.pods:
            return self.evaluator.between(self.pods[src], self.pods[dst], packet)
        if src in self.pods:
            return self.evaluator.workload(self.pods[src], EGRESS, packet)
        return self.evaluator.workload(self.pods[dst], INGRESS, packet)

    def __call__(self, src: str, dst: str, port: int | None = 80, protocol: str = "tcp", **kw) -> Verdict:
        return self.decide(src, dst, port, protocol, **kw).verdict

    def allowed(self, src: str, dst: str, port: int | None = 80, protocol: str = "tcp", **kw) -> bool:
        return self(src, dst, port, protocol, **kw) == Verdict.ALLOW
