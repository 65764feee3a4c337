"""Rendering Calico's policy model at scale, side by side with Kubernetes NetworkPolicy.

bench/synthetic.py's cluster (10,000 pods, 100 namespaces, 110 pods on the benchmark's node),
once with its Kubernetes policies and once with the same count of Calico policies in 5 tiers
(GlobalNetworkPolicy and namespaced NetworkPolicy, every rule field weft renders: Pass, Log,
Deny, notNets, notPorts, notSelector, ICMP, named ports, service accounts, network sets).
For each: the conversion of the manifests, the first render of the node (renderers.iptables,
every set computed), a no-op render (the previous render's sets reused, as a run whose
endpoints did not change does), and a render after one policy changed. Pure Python, no kernel:
the kernel's part is bench/bench_reconcile.py's.

    .venv/bin/python bench/bench_calico.py [--policies 2000] [--pods 10000]
"""
from __future__ import annotations

import argparse
import json
import random
import time

from bench import synthetic
from weft.desired.loader import build_cluster_state
from weft.renderers.iptables import render_node

TIERS = (("security", 100), ("platform", 200), ("devops", 300), ("application", 400))


def calico_policies(count: int, namespaces: int, seed: int = 2) -> list[dict]:
    rnd = random.Random(seed)
    objs: list[dict] = [{"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": name},
                         "spec": {"order": order, "defaultAction": "Pass" if i % 2 else "Deny"}}
                        for i, (name, order) in enumerate(TIERS)]
    objs.append({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet", "metadata": {
        "name": "partners", "labels": {"kind": "partner"}}, "spec": {"nets": ["198.19.0.0/24", "198.19.8.0/22"]}})
    for p in range(count):
        tier = (*(t for t, _ in TIERS), "default")[p % 5]
        app = f"app-{p % 20}"
        rules = [
            {"action": "Log", "protocol": "TCP", "destination": {"ports": [22]}},
            {"action": "Deny", "source": {"notNets": ["198.18.0.0/15"], "notSelector": "kind == 'partner'"}},
            {"action": "Allow", "protocol": "TCP", "source": {"selector": f"tier == '{('web', 'api')[p % 2]}'"},
             "destination": {"ports": ["http", 8443, "9000:9100"], "notPorts": [9050]}},
            {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}},
            {"action": "Pass" if tier != "default" else "Allow", "protocol": "UDP", "destination": {"ports": [53]}},
        ]
        spec = {"order": rnd.choice((10, 100, 500)), "selector": f"app == '{app}'",
                "types": ["Ingress", "Egress"], "ingress": rules[:4],
                "egress": [rules[4], {"action": "Allow", "destination": {"selector": "kind == 'partner'"}}]}
        if tier != "default":
            spec["tier"] = tier
        name = f"policy-{p:04d}" if tier == "default" else f"{tier}.policy-{p:04d}"
        if p % 3 == 0:
            spec["namespaceSelector"] = f"team == 'team-{p % 10}'"
            objs.append({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                         "metadata": {"name": name}, "spec": spec})
        else:
            objs.append({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                         "metadata": {"name": name, "namespace": f"ns-{p % namespaces:03d}"}, "spec": spec})
    return objs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(objs: list[dict], change) -> dict:
    convert, state = timed(lambda: build_cluster_state(("bench.yaml", o) for o in objs))
    first, dataplane = timed(lambda: render_node(state, synthetic.NODE))
    noop, again = timed(lambda: render_node(state, synthetic.NODE, reuse=dataplane.ipsets))
    assert again == dataplane
    changed = build_cluster_state(("bench.yaml", o) for o in change(objs))
    one, _ = timed(lambda: render_node(changed, synthetic.NODE, reuse=dataplane.ipsets))
    rules = sum(len(c.rules) for c in dataplane.chains.values())
    return {"policies": len(state.policies), "chains": len(dataplane.chains), "rules": rules,
            "sets": len(dataplane.ipsets), "convert_s": round(convert, 2), "first_render_s": round(first, 2),
            "noop_render_s": round(noop, 2), "one_change_render_s": round(one, 2)}


def change_one(kind: str):
    def change(objs: list[dict]) -> list[dict]:
        out, done = [], False
        for o in objs:
            if not done and o["kind"] == kind:
                o = json.loads(json.dumps(o))
                rules = o["spec"]["ingress"]
                if kind == "NetworkPolicy" and "podSelector" in o["spec"]:
                    rules[0]["ports"] = [{"port": 8444}]
                else:
                    rules[2]["destination"]["ports"] = ["http", 8444]
                done = True
            out.append(o)
        return out
    return change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=2000)
    parser.add_argument("--pods", type=int, default=10_000)
    args = parser.parse_args()
    base = synthetic.cluster(pods=args.pods, policies=0)
    kubernetes = synthetic.cluster(pods=args.pods, policies=args.policies)
    calico = base + calico_policies(args.policies, 100)
    table = {"kubernetes": measure(kubernetes, change_one("NetworkPolicy")),
             "calico (5 tiers)": measure(calico, change_one("GlobalNetworkPolicy"))}
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
