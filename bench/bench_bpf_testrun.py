"""The eBPF programs' own run time per packet at 0, 1,000 and 10,000 rules (BPF_PROG_TEST_RUN).

The lab and the policy are bench_bpf_rules': a lab node (playbooks.netlab: namespaces and veths
only, addresses from 198.18.0.0/15) with a client and a server pod, the server selected by one
NetworkPolicy with N ingress rules (one /32 peer each, TCP 80) before the one that admits the
client, put in place by `weft apply --dataplane ebpf` in the node namespace.

Then, in the node namespace, the pinned programs are run by the kernel on crafted packets
(bpf(2) BPF_PROG_TEST_RUN: the kernel times the program itself, no traffic, no global setting
changed) with the interfaces a real packet has (`ifindex`, `ingress_ifindex`):

  * syn:   the client's SYN to the server on the server's veth (to_wl: a new connection, judged by
           the policy: endpoint, two classifications, verdict, port table), a new client port
           each run so that every run is judged (its tracked entry is deleted after each run);
  * cold:  one such SYN in COLD_EVERY, run after a pass over more memory than the last-level
           cache holds (a connection on a node where other work ran since the last one);
  * est:   a packet of that connection once tracked (to_wl: the connection-tracking path);
  * egress: the client's SYN on the client's veth (from_wl: no policy selects the client).

This is the per-packet figure that must not grow with the rules. Each figure is the median of
`--rounds` rounds (each: `--runs` single runs for syn/egress, one run of `--repeat` for est),
the rounds of every count interleaved (every other round in reverse order) so that the machine's
drift falls on all of them alike. With `--connections N`, each case of a round first attaches the
count's pinned programs to both veths (tc filter replace, as weft's apply does) and times N real
connections (bench_bpf_rules' client): the three policies stay in place in their own pin
directories, so no apply runs between the cases and only the maps differ.

Run as root:  .venv/bin/python -m bench.bench_bpf_testrun [--counts 0,1000,10000] [--rounds N] [--connections N]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_bpf import CLIENT_IP, NODE, SERVER_IP
from bench.bench_bpf_rules import connections as bench_connections
from bench.bench_bpf_rules import manifests, weft
from bench.installed import compile_weft
from tests.calico_probe import checksum

COUNTS = (0, 1_000, 10_000)
PROG_TEST_RUN = 10
SKB_SIZE = 192                  # sizeof(struct __sk_buff)
SKB_INGRESS_IFINDEX, SKB_IFINDEX = 36, 40
EVICT_BYTES = 64 << 20          # written over before a cold run: more than any last-level cache here
COLD_EVERY = 10                 # one cold run every this many judged runs


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """Ethernet + IPv4 + TCP (no options, no payload), checksums right."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)
    tcp_sum = checksum(saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", tcp_sum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, socket.IPPROTO_TCP, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0800)
    return eth + ip + tcp


def test_run(prog_fd: int, packet: bytes, ifindex: int, ingress_ifindex: int, repeat: int = 1) -> tuple[int, int]:
    """Run the program `repeat` times on `packet` as seen on `ifindex`: (its return value, the
    kernel's mean run time in ns)."""
    from weft.probes.bpf import bpf
    data = ctypes.create_string_buffer(packet, len(packet))
    out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = ctypes.create_string_buffer(SKB_SIZE)
    struct.pack_into("=I", ctx, SKB_INGRESS_IFINDEX, ingress_ifindex)
    struct.pack_into("=I", ctx, SKB_IFINDEX, ifindex)
    attr = ctypes.create_string_buffer(80)
    struct.pack_into("=IIIIQQII", attr, 0, prog_fd, 0, len(packet), len(out), ctypes.addressof(data),
                     ctypes.addressof(out), repeat, 0)
    struct.pack_into("=IIQQ", attr, 40, SKB_SIZE, 0, ctypes.addressof(ctx), 0)
    bpf(PROG_TEST_RUN, attr)
    _, retval, _, _, _, _, _, duration = struct.unpack_from("=IIIIQQII", attr, 0)
    return retval, duration


def ct_key(ifindex: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    """weft_ct's key for a TCP packet (policy.c ct_key: the lower address/port pair first, compared
    as the program loads them: network-order bytes as native integers)."""
    a = (struct.unpack("=I", socket.inet_aton(src))[0], struct.unpack("=H", struct.pack("!H", sport))[0])
    b = (struct.unpack("=I", socket.inet_aton(dst))[0], struct.unpack("=H", struct.pack("!H", dport))[0])
    first, second = (a, b) if a <= b else (b, a)
    return struct.pack("=IIIHHB3x", ifindex, first[0], second[0], first[1], second[1], socket.IPPROTO_TCP)


def inside(pin_dir: Path, client_if: str, server_if: str, runs: int, repeat: int) -> dict:
    """In the node namespace: one round of each figure (ns per program run). Only the entries the
    runs made are deleted, by key: walking the tracking map between runs would evict the caches
    the next run is timed with."""
    from weft.probes.bpf import obj_get
    from weft.reconciler.bpf_apply import MapWriter
    progs = next(pin_dir.glob("progs-*"))
    maps = next(pin_dir.glob("maps-*"))
    client, server = socket.if_nametoindex(client_if), socket.if_nametoindex(server_if)
    to_wl, from_wl = obj_get(progs / "to_wl"), obj_get(progs / "from_wl")
    figures: dict[str, list[int]] = {"syn": [], "egress": [], "cold": []}
    evict = ctypes.create_string_buffer(EVICT_BYTES)
    try:
        with MapWriter(maps / "conntrack") as ct:
            for i in range(runs):
                sport = 1024 + i % 30000          # below the client's ephemeral ports: no real connection's
                syn = tcp_packet(CLIENT_IP, SERVER_IP, sport, 80, 0x02)
                if i % COLD_EVERY == 0:
                    # Caches evicted first (a pass over more memory than the last-level cache holds): what
                    # a connection costs when other work ran since the last one, as on a busy node.
                    ctypes.memset(evict, i & 0xFF, EVICT_BYTES)
                    verdict, ns = test_run(to_wl, syn, server, client)
                    figures["cold"].append(ns)
                    ct.delete(ct_key(server, CLIENT_IP, sport, SERVER_IP, 80))
                verdict, ns = test_run(to_wl, syn, server, client)
                if verdict != 0:
                    raise SystemExit(f"to_wl dropped the client's SYN (tc verdict {verdict})")
                figures["syn"].append(ns)
                verdict, ns = test_run(from_wl, syn, client, client)
                if verdict != 0:
                    raise SystemExit(f"from_wl dropped the client's SYN (tc verdict {verdict})")
                figures["egress"].append(ns)
                for ifindex in (server, client):
                    if not ct.delete(ct_key(ifindex, CLIENT_IP, sport, SERVER_IP, 80)):
                        raise SystemExit("the run's tracked entry is not where ct_key says (key layout changed?)")
            syn = tcp_packet(CLIENT_IP, SERVER_IP, 1023, 80, 0x02)
            test_run(to_wl, syn, server, client)
            ack = tcp_packet(CLIENT_IP, SERVER_IP, 1023, 80, 0x10)
            verdict, est = test_run(to_wl, ack, server, client, repeat)
            if verdict != 0:
                raise SystemExit(f"to_wl dropped a tracked connection's packet (tc verdict {verdict})")
            ct.delete(ct_key(server, CLIENT_IP, 1023, SERVER_IP, 80))
    finally:
        os.close(to_wl)
        os.close(from_wl)
    return {"syn": statistics.median(figures["syn"]), "egress": statistics.median(figures["egress"]),
            "cold": statistics.median(figures["cold"]), "est": est}


def attach(lab, progs: Path) -> None:
    """Both pods' veths run the programs pinned in `progs` (weft's own filter, replaced in place),
    and the node forgets its connections, as before every case of bench_bpf_rules."""
    from weft.model.names import host_iface_name
    from weft.reconciler.bpf_apply import FILTER_HANDLE, FILTER_PREF, HOOKS
    commands = [f"tc filter replace dev {host_iface_name('bench', pod)} {hook} pref {FILTER_PREF} handle "
                f"{FILTER_HANDLE} bpf direct-action object-pinned {progs / prog}"
                for pod in ("client", "server") for hook, prog in HOOKS.items()]
    subprocess.run(["nsenter", f"--net=/run/netns/{lab.node_netns}", "sh", "-ec",
                    " && ".join(commands) + " && conntrack -F 2>/dev/null || true"], check=True, timeout=60)


def measure(counts: tuple[int, ...], rounds: int, runs: int, repeat: int, connections: int = 0) -> dict:
    from weft.model.names import host_iface_name
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    from weft.reconciler.bpf_pins import node_pin_dir
    results: dict[int, dict[str, list[float]]] = {rules: {"syn": [], "egress": [], "est": [], "cold": [], "p50": []}
                                                   for rules in counts}
    with tempfile.TemporaryDirectory(prefix="weft-bench-testrun-") as tmp:
        tmp_dir = Path(tmp)
        with NodeLab(pods_from_manifests(manifests(tmp_dir / "base", 0), NODE), ports=(80,)) as lab:
            states = {rules: tmp_dir / f"state-{rules}" for rules in counts}
            try:
                # One state directory (so one pin directory: programs and maps) per count, all in
                # place at once; a test run needs no attachment, only the program and its maps.
                for rules in counts:
                    weft(lab.node_netns, ["apply", "--dataplane", "ebpf"], states[rules],
                         manifests(tmp_dir / f"src-{rules}", rules))
                for round_ in range(rounds):
                    for rules in counts if round_ % 2 == 0 else counts[::-1]:
                        if connections:
                            # The same node and the same programs, only the maps differ: no apply
                            # between the cases, so nothing but the policy's maps tells them apart.
                            attach(lab, next(node_pin_dir(states[rules]).glob("progs-*")))
                            results[rules]["p50"].append(bench_connections(lab, connections)["p50"])
                        done = subprocess.run(
                            ["nsenter", f"--net=/run/netns/{lab.node_netns}", sys.executable, "-m",
                             "bench.bench_bpf_testrun", "--inside", str(node_pin_dir(states[rules])),
                             host_iface_name("bench", "client"), host_iface_name("bench", "server"),
                             str(runs), str(repeat)], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parent.parent)
                        if done.returncode:
                            raise SystemExit(f"test run failed: {done.stderr.strip()}")
                        one = json.loads(done.stdout)
                        for name, value in one.items():
                            results[rules][name].append(value)
                        print(f"  {rules:>6} rules: syn {one['syn']:.0f} ns, cold {one['cold']:.0f} ns, est "
                              f"{one['est']:.0f} ns, egress {one['egress']:.0f} ns" +
                              (f", connection p50 {results[rules]['p50'][-1]:.0f} us" if connections else ""),
                              file=sys.stderr, flush=True)
            finally:
                for state in states.values():
                    if state.exists():
                        weft(lab.node_netns, ["apply", "--destroy"], state)
    return results


def table(results: dict, counts: tuple[int, ...], rounds: int, runs: int, repeat: int) -> str:
    base = results[counts[0]]
    columns = (("syn", "judged SYN ns"), ("cold", "judged, cold ns"), ("est", "tracked ns"),
               ("egress", "client egress ns"))
    lines = [f"eBPF program run time per packet (BPF_PROG_TEST_RUN, kernel-timed), median of {rounds} interleaved "
             f"rounds (a round: {runs} judged SYNs and client egress SYNs, one in {COLD_EVERY} also judged with the "
             f"caches evicted first; {repeat} repeats of a tracked packet)",
             f"{'rules':>6} | " + " | ".join(f"{title:>16} {'vs 0':>6}" for _, title in columns)]
    for rules in counts:
        row = results[rules]
        cells = []
        for name, _ in columns:
            value, zero = statistics.median(row[name]), statistics.median(base[name])
            cells.append(f"{value:>16.0f} {value / zero - 1:>+6.0%}")
        lines.append(f"{rules:>6} | " + " | ".join(cells))
    if all(results[rules]["p50"] for rules in counts):
        def p50(rules: int) -> str:
            runs, zero = results[rules]["p50"], base["p50"]
            per_round = statistics.median(a / b for a, b in zip(runs, zero, strict=True)) - 1
            return (f"{rules} rules {statistics.median(runs):.0f} us (per-round ratio to {counts[0]} rules "
                    f"{per_round:+.1%}, best round to best {min(runs) / min(zero) - 1:+.1%})")
        lines.append("Connections (bench_bpf_rules' client, the count's pinned programs attached in turn, no apply "
                     "between cases): p50 " + ", ".join(p50(rules) for rules in counts))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        pin_dir, client_if, server_if, runs, repeat = sys.argv[2:7]
        json.dump(inside(Path(pin_dir), client_if, server_if, int(runs), int(repeat)), sys.stdout)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="rule counts (default 0,1000,10000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--runs", type=int, default=2000, help="judged SYNs a round (default 2000)")
    parser.add_argument("--repeat", type=int, default=100_000, help="repeats of the tracked packet (default 100000)")
    parser.add_argument("--connections", type=int, default=0,
                        help="also this many connections a case and round through the count's programs (default 0)")
    args = parser.parse_args()
    counts = tuple(int(c) for c in args.counts.split(","))
    compile_weft()
    print(table(measure(counts, args.rounds, args.runs, args.repeat, args.connections), counts, args.rounds,
                args.runs, args.repeat))


if __name__ == "__main__":
    main()
