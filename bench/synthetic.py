"""A synthetic cluster shaped like a busy real one, for benchmarks.

100 namespaces x 100 pods = 10,000 pods spread over 91 nodes (110 on the benchmark's node),
10 NetworkPolicies per namespace (1,000) mixing pod selectors, namespace selectors, ipBlocks,
named ports and egress rules. Deterministic: the same arguments give the same objects.
"""

from __future__ import annotations

import ipaddress
import random

NODE = "node-000"


def pod_ip(i: int) -> str:
    return str(ipaddress.ip_address("198.18.0.0") + 10 + i)


def cluster(
    pods: int = 10_000, policies: int = 1_000, namespaces: int = 100, local: int = 110, seed: int = 1
) -> list[dict]:
    rnd = random.Random(seed)
    objs: list[dict] = []
    other_nodes = [f"node-{i:03d}" for i in range(1, 91)]
    for n in range(namespaces):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": f"ns-{n:03d}",
                    "labels": {"team": f"team-{n % 10}", "env": "prod" if n % 3 else "dev"},
                },
            }
        )
    for node in [NODE, *other_nodes]:
        objs.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    for i in range(pods):
        ns = f"ns-{i % namespaces:03d}"
        node = NODE if i < local else other_nodes[i % len(other_nodes)]
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"pod-{i:05d}",
                    "namespace": ns,
                    "labels": {
                        "app": f"app-{i % 20}",
                        "tier": ("web", "api", "db")[i % 3],
                        "pod-template-hash": f"{i % 7:x}",
                    },
                },
                "spec": {
                    "nodeName": node,
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.k8s.io/pause:3.9",
                            "ports": [
                                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                            ],
                        }
                    ],
                },
                "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]},
            }
        )
    for p in range(policies):
        ns = f"ns-{p % namespaces:03d}"
        objs.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": f"policy-{p:04d}", "namespace": ns},
                "spec": policy_spec(p, rnd),
            }
        )
    return objs


def policy_spec(p: int, rnd: random.Random) -> dict:
    app = f"app-{p % 20}"
    kind = p % 5
    if kind == 0:
        return {
            "podSelector": {"matchLabels": {"app": app}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}], "ports": [{"port": "http"}]}],
        }
    if kind == 1:
        return {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": f"team-{rnd.randrange(10)}"}},
                            "podSelector": {
                                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]
                            },
                        }
                    ],
                    "ports": [{"port": 8080}, {"port": 9000, "endPort": 9100}],
                }
            ],
        }
    if kind == 2:
        return {
            "podSelector": {"matchLabels": {"tier": "db"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "api"}}}], "ports": [{"port": 5432}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{rnd.randrange(256)}.0.0/16"]}}]}],
        }
    if kind == 3:
        return {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], "ports": [{"port": "metrics"}]}
            ],
        }
    return {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]},
            {"to": [{"podSelector": {"matchLabels": {"app": app}}}]},
        ],
    }
