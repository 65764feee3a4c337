"""A synthetic cluster shaped like a busy real one, for benchmarks.

100 namespaces x 100 pods = 10,000 pods spread over 91 nodes (110 on the benchmark's node),
10 NetworkPolicies per namespace (1,000) mixing pod selectors, namespace selectors, ipBlocks,
named ports and egress rules. Deterministic: the same arguments give the same objects.

Pod addresses come from 198.18.0.0/15; its 131,072 addresses do not cover 150,000 pods, so pods
past it take addresses from 100.64.0.0/10. They are only ever members of IP sets inside the
benchmark's own network namespace: no interface, route or packet uses them.
"""

from __future__ import annotations

import ipaddress
import random

NODE = "node-000"


_FIRST = ipaddress.ip_address("198.18.0.0")
_IN_FIRST = (1 << 17) - 10
_SECOND = ipaddress.ip_address("100.64.0.0")


def pod_ip(i: int) -> str:
    return str(_FIRST + 10 + i if i < _IN_FIRST else _SECOND + (i - _IN_FIRST))


def cluster(
    pods: int = 10_000, policies: int = 1_000, namespaces: int = 100, local: int = 110, seed: int = 1,
    nodes: int = 91, calico: int = 0,
) -> list[dict]:
    """The objects; with `calico` = k > 0, every k-th policy is one of Calico's kinds instead."""
    rnd = random.Random(seed)
    objs: list[dict] = []
    other_nodes = [f"node-{i:03d}" for i in range(1, nodes)]
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
        if calico and p % calico == calico - 1:
            objs.append(calico_policy(p, namespaces))
            continue
        objs.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": f"policy-{p:04d}", "namespace": ns},
                "spec": policy_spec(p, rnd),
            }
        )
    return objs


def calico_policy(p: int, namespaces: int) -> dict:
    """Policy `p` as one of Calico's own kinds (projectcalico.org/v3): every third a
    GlobalNetworkPolicy, the others namespaced NetworkPolicies; the same shapes of selection as
    policy_spec (pods by label, peers by label and by namespace, ports by number and name)."""
    app, ns = f"app-{p % 20}", f"ns-{p % namespaces:03d}"
    rule = {"action": "Allow", "protocol": "TCP",
            "source": {"selector": "tier in {'web', 'api'}"} if p % 2 else
            {"namespaceSelector": f"team == 'team-{p % 10}'"},
            "destination": {"ports": [8080, "metrics"] if p % 2 else ["9000:9100"]}}
    spec = {"selector": f"app == '{app}'", "order": 100 + p % 50, "types": ["Ingress"], "ingress": [rule]}
    if p % 3 == 0:
        return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                "metadata": {"name": f"gnp-{p:05d}"},
                "spec": spec | {"namespaceSelector": f"env == '{('dev', 'prod')[p % 2]}'"}}
    return {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": f"cnp-{p:05d}", "namespace": ns}, "spec": spec}


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
