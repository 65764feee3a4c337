"""BGP benchmark: BIRD config render + diff at scale, lab convergence, reloads on no-op runs.

Prints:
  (a) render, diff and `bird -p` check of one node's config with 500 peers and 1,000 blocks
      (a 501-node mesh; the blocks owned by this node, the worst case for its own config);
  (b) a real N-node lab (playbooks.multinode): seconds from lab start to every session
      Established and to the first cross-node TCP packet (pod on node-1 -> pod on node-2);
  (c) BIRD reloads over 10 runs with nothing changed (target 0), counted from the commands run
      and from BIRD's own "Last reconfiguration" time, and the time of one such `weft apply`;
  (d) blocks added to node-1 one by one (each in a /24 it already exports): seconds from the
      start of the `weft apply` that adds one to the route in node-2's kernel, and how many
      never arrived (target 0).
Run as root:  .venv/bin/python -m bench.bench_bgp [--peers 500 --blocks 1000 --nodes 2 --new-blocks 5]
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.installed import compile_weft
from weft.model.cluster import BGPPeer, Block, ClusterState, IPPool, Node, NodeBGP
from weft.playbooks.multinode import BLOCK_PREFIX, POOL, MultiNodeLab, block_object
from weft.probes import bird as probe
from weft.reconciler.bird import format_bird_change, plan_bird, same_instant
from weft.renderers.bird import render_bird_config


def synthetic(peers: int, blocks: int) -> ClusterState:
    """This node plus `peers` mesh nodes on 198.18.0.0/15 addresses; `blocks` /26s owned by this node."""
    hosts = ipaddress.ip_network("198.18.0.0/20").hosts()
    nodes = {f"n{i}": Node(f"n{i}", {"rack": str(i % 8)}, NodeBGP(f"{next(hosts)}/20")) for i in range(peers + 1)}
    pool = ipaddress.ip_network("198.18.64.0/18")
    owned = [Block(str(net), "n0") for net, _ in zip(pool.subnets(new_prefix=26), range(blocks), strict=False)]
    return ClusterState(namespaces={}, endpoints=(), policies=(), nodes=nodes,
                        ippools=(IPPool("pool", str(pool), 26),), blocks=tuple(owned))


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_render(peers: int, blocks: int) -> dict:
    state = synthetic(peers, blocks)
    cold_start = time.perf_counter()
    text = render_bird_config(state, "n0")
    cold = time.perf_counter() - cold_start
    warm, _ = timed(lambda: render_bird_config(state, "n0"))
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp)
        (state_dir / "bird.conf").write_text(plan_bird(state, "n0", state_dir, None).new)
        none_time, none = timed(lambda: plan_bird(state, "n0", state_dir, None))
        changed = replace(state, bgp_peers=(BGPPeer("tor", peer_ip="198.19.0.1", as_number=65001),))
        plan_time, change = timed(lambda: plan_bird(changed, "n0", state_dir, None))
        diff_time, diff = timed(lambda: format_bird_change(change))
        check_start = time.perf_counter()
        ok = probe.check_config(state_dir / "bird.conf") is None
        check = time.perf_counter() - check_start
    return {"peers": peers, "blocks": blocks, "config_lines": text.count("\n"), "config_bytes": len(text),
            "render_first_s": round(cold, 4), "render_s": round(warm, 4),
            "plan_no_change_s": round(none_time, 4), "no_change_plan_is_none": none is None,
            "plan_one_peer_added_s": round(plan_time, 4), "format_diff_s": round(diff_time, 4),
            "diff_lines": diff.count("\n"), "bird_p_check_s": round(check, 4), "bird_accepts": ok}


def bench_lab(nodes: int, noop_runs: int, new_blocks: int) -> dict:
    start = time.monotonic()
    with MultiNodeLab(nodes, 1) as lab:
        built = time.monotonic() - start
        lab.apply_all()
        applied = time.monotonic() - start
        for node in lab.nodes:
            lab.start_bird(node)
        lab.wait_established(timeout=60)
        established = time.monotonic() - start
        src, dst = lab.nodes[0].pods[0], lab.nodes[1].pods[0]
        while True:
            matrix = lab.matrix(timeout=0.2)
            if matrix[(src.key, dst.key, "tcp", 80)]:
                break
            if time.monotonic() - start > 60:
                raise SystemExit("no cross-node packet after 60 s")
        first_packet = time.monotonic() - start
        reloaded_before = {n.name: probe.last_reconfiguration(n.socket) for n in lab.nodes}
        reload_commands = 0
        for _ in range(noop_runs):
            for node in lab.nodes:
                reload_commands += sum("configure" in c for c in lab.apply(node))
        bird_reloads = sum(not same_instant(probe.last_reconfiguration(n.socket), reloaded_before[n.name])
                           for n in lab.nodes)
        noop_start = time.perf_counter()
        lab.apply(lab.nodes[0])
        noop = time.perf_counter() - noop_start
        arrival, missing = new_block_arrival(lab, new_blocks)
    return {"nodes": nodes, "lab_built_s": round(built, 2), "weft_applied_s": round(applied, 2),
            "all_established_s": round(established, 2), "first_cross_node_packet_s": round(first_packet, 2),
            "noop_runs": noop_runs, "reload_commands": reload_commands, "nodes_bird_reconfigured": bird_reloads,
            "noop_weft_apply_s": round(noop, 4), "new_blocks": new_blocks,
            "new_block_in_remote_kernel_s": {"min": round(min(arrival), 2), "max": round(max(arrival), 2)}
            if arrival else None, "new_blocks_never_arrived": missing}


def new_block_arrival(lab: MultiNodeLab, count: int, timeout: float = 10.0) -> tuple[list[float], int]:
    """Add `count` blocks to node-1, one per `weft apply` there; per block, the seconds until
    node-2's kernel routes it to node-1; and how many did not arrive within `timeout`."""
    owner, remote = lab.nodes[0], lab.nodes[1]
    taken = {n.block for n in lab.nodes}
    free = [str(b) for b in POOL.subnets(new_prefix=BLOCK_PREFIX) if str(b) not in taken][:count]
    added, times, missing = [], [], 0
    for cidr in free:
        added.append(block_object(cidr, owner.name))
        lab.write_manifests(added)
        start = time.monotonic()
        lab.apply(owner)
        while f"via {owner.ip} " not in lab.kernel_route(remote, cidr):
            if time.monotonic() - start > timeout:
                missing += 1
                break
            time.sleep(0.01)
        else:
            times.append(time.monotonic() - start)
    return times, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--noop-runs", type=int, default=10)
    parser.add_argument("--new-blocks", type=int, default=5)
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes: the lab figures need 2 nodes at least")
    compile_weft()
    print(json.dumps({"render": bench_render(args.peers, args.blocks)}, indent=1), flush=True)
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0":
        print(json.dumps({"lab": bench_lab(args.nodes, args.noop_runs, args.new_blocks)}, indent=1))
    else:
        print("(lab figures need root)")


if __name__ == "__main__":
    main()
