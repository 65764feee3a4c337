"""The CNI plugin on an eBPF node: ADD writes the pod's endpoint entry and attaches the pinned
programs to its veth before it returns (no compile), DEL deletes the entry before the veth goes,
and a node whose pin directory has no programs of this build refuses ADD (fail closed).

The plugin and weft run inside the test's node namespace through `nsenter --net` (bpffs stays
visible); each test has its own state dir, hence its own pin directory, destroyed and checked
gone afterwards. Traffic is between the test's pod namespaces only (198.18.0.0/15).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cninode import NODE, block, node, plugin_binary  # noqa: F401  (fixtures)
from tests.nodens import namespace, pod, policy
from tests.test_bpf_dataplane import require_bcc
from weft.model.names import host_iface_name

SERVER = ("import socket,sys\nsocks=[socket.create_server(('0.0.0.0',int(p))) for p in sys.argv[1:]]\n"
          "print('ready',flush=True)\nimport selectors\nsel=selectors.DefaultSelector()\n"
          "[sel.register(s,selectors.EVENT_READ) for s in socks]\nwhile True:\n"
          " for k,_ in sel.select():\n  c,_=k.fileobj.accept(); c.sendall(b'ok'); c.close()")
PROBE = ("import socket,sys\ntry:\n s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1)\n"
         " print(s.recv(2)==b'ok')\nexcept OSError: print(False)")


def weft(cn, *argv: str, expect: int = 0) -> subprocess.CompletedProcess:
    command = ["nsenter", f"--net=/run/netns/{cn.ns}", sys.executable, "-m", "weft.reconciler.cli", *argv,
               "--node", NODE, "--state-dir", str(cn.state_dir)]
    if argv[0] != "apply" or "--destroy" not in argv:
        command += ["--from", str(cn.manifests)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, f"weft {' '.join(argv)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def serve(cn, name: str, *ports: int) -> None:
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{cn.pod_ns(name)}", sys.executable, "-I", "-S", "-c",
                             SERVER, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    cn.stack.callback(proc.kill)
    assert proc.stdout.readline().strip() == "ready"


def reaches(cn, src: str, ip: str, port: int) -> bool:
    out = subprocess.run(["nsenter", f"--net=/run/netns/{cn.pod_ns(src)}", sys.executable, "-I", "-S", "-c", PROBE,
                          ip, str(port)], capture_output=True, text=True, timeout=30).stdout
    return out.strip() == "True"


def ifindex(cn, iface: str) -> int:
    return json.loads(cn.sh("ip", "-j", "link", "show", "dev", iface))[0]["ifindex"]


def endpoint_keys(root) -> set[int]:
    """The ifindexes (of the node namespace) the node's endpoints map has an entry for."""
    from weft.model import bpf as m
    from weft.probes.bpf import MapHandle
    from weft.reconciler.bpf_apply import build_for
    with MapHandle(build_for(root).maps_dir(root) / "endpoints") as handle:
        return {m.unpack_key("endpoints", key) for key in handle.keys()}


@pytest.fixture
def ebpf(node):                                     # noqa: F811
    """The CNI node, on the eBPF data plane once the test's first apply runs; destroyed after."""
    require_bcc()
    from weft.reconciler.bpf_apply import node_pin_dir
    root = node_pin_dir(node.state_dir)
    try:
        yield node, root
    finally:
        subprocess.run(
            ["nsenter", f"--net=/run/netns/{node.ns}", sys.executable, "-m", "weft.reconciler.cli", "apply",
             "--destroy", "--node", NODE, "--state-dir", str(node.state_dir)], capture_output=True, timeout=300)
        if root.exists():
            from weft.playbooks.bpflab import in_netns
            from weft.reconciler.bpf_apply import destroy_bpf
            in_netns(node.ns, destroy_bpf, root)
        assert not root.exists(), f"pins left behind in {root}"


def _manifests(cn, ips: dict[str, str]) -> None:
    """Namespace x: `server` (app=server) takes TCP 80 from role=friend pods only; `friend`,
    `stranger` are unselected. Pods without an address yet are listed without status (the run
    knows them, and their interface names, before ADD)."""
    labels = {"server": {"app": "server"}, "friend": {"role": "friend"}, "stranger": {}}
    objects = [block("198.18.4.0/26"), namespace("x"),
               policy("x", "server-in", {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}],
                                                      "ports": [{"protocol": "TCP", "port": 80}]}]})]
    for name, pod_labels in labels.items():
        manifest = pod("x", name, ips.get(name, ""), pod_labels)
        if name not in ips:
            del manifest["status"]
        objects.append(manifest)
    cn.write(objects)


def test_add_on_an_ebpf_node_enforces_before_the_next_run_and_del_leaves_no_key(ebpf):
    cn, root = ebpf
    _manifests(cn, {})
    weft(cn, "apply", "--dataplane", "ebpf")
    assert root.exists()
    ips = {name: cn.add(name) for name in ("friend", "stranger")}
    _manifests(cn, ips)
    weft(cn, "apply", "--dataplane", "ebpf")        # the peers' addresses are known: the friend is a friend
    serve(cn, "server", 80, 81)                     # listening before ADD: enforced the moment ADD returns
    ips["server"] = cn.add("server")
    iface = host_iface_name("x", "server")
    index = ifindex(cn, iface)
    assert index in endpoint_keys(root), "ADD wrote no endpoint entry"
    filters = cn.sh("tc", "filter", "show", "dev", iface, "ingress") + cn.sh("tc", "filter", "show", "dev", iface,
                                                                                "egress")
    assert filters.count("direct-action") == 2, f"the programs are not on both hooks of {iface}:\n{filters}"
    assert not [ln for ln in cn.sh("iptables-nft-save").splitlines() if f"weft-tw-{iface}" in ln], \
        "ADD on an eBPF node programmed iptables chains"
    assert reaches(cn, "friend", ips["server"], 80), "allowed traffic was dropped"
    assert not reaches(cn, "stranger", ips["server"], 80), "a peer the policy does not allow got through"
    assert not reaches(cn, "friend", ips["server"], 81), "a port the policy does not allow got through"

    _manifests(cn, ips)
    again = json.loads(weft(cn, "apply", "--dataplane", "ebpf", "--output", "json").stdout)
    touched = [c for c in again["changes"].get("bpf", []) if iface in c["target"] or c["kind"] in ("attach", "programs")
               or (c["kind"] == "map" and c["target"] == "endpoints")]
    assert not touched, f"the run after ADD changed the pod's eBPF state: {touched}"
    assert reaches(cn, "friend", ips["server"], 80) and not reaches(cn, "stranger", ips["server"], 80)

    cn.ok("CHECK", "server")
    cn.ok("DEL", "server")
    assert index not in endpoint_keys(root), "DEL left the pod's endpoint key"
    assert iface not in cn.links()
    for name in ("friend", "stranger"):
        cn.ok("DEL", name)
    assert endpoint_keys(root) == set()


def test_add_fails_closed_when_the_pinned_programs_are_missing(ebpf):
    cn, root = ebpf
    _manifests(cn, {})
    weft(cn, "apply", "--dataplane", "ebpf")
    from weft.reconciler.bpf_apply import _remove_tree, build_for
    _remove_tree(build_for(root).progs_dir(root))      # the programs gone (say, a newer weft not applied yet)
    code, out, err = cn.call(cn.env("ADD", "server"))
    assert code != 0 and out["code"] == 102, (out, err)
    assert "no eBPF programs on this weft's maps are pinned" in out["details"] and "weft apply" in out["details"], out
    assert host_iface_name("x", "server") not in cn.links(), "the failed ADD left the pod wired"
    assert cn.allocations() == []


def test_a_dual_stack_pod_on_an_ebpf_node_gets_ipv4_in_the_maps_and_ipv6_in_ip6tables(ebpf):
    """The programs judge IPv4 and pass IPv6, which ip6tables enforces on an eBPF node as on any:
    ADD writes the endpoint entry and the pod's IPv6 chains, CHECK reads both, DEL removes both."""
    from tests.test_ipv6 import POOL6
    cn, root = ebpf
    cn.write([block("198.18.4.0/26"), POOL6, block("2001:db8:4::/122"), namespace("x"),
              policy("x", "deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    weft(cn, "apply", "--dataplane", "ebpf")
    out = cn.ok("ADD", "a")
    assert [ip["address"] for ip in out["ips"]] == ["198.18.4.0/32", "2001:db8:4::/128"]
    iface = host_iface_name("x", "a")
    index = ifindex(cn, iface)
    assert index in endpoint_keys(root)
    save4, save6 = cn.sh("iptables-nft-save", "-t", "filter"), cn.sh("ip6tables-nft-save", "-t", "filter")
    assert f"weft-fw-{iface}" not in save4, "IPv4 chains on an eBPF node"
    assert f":weft-fw-{iface}" in save6 and f"-A weft-to-wl-dispatch -o {iface}" in save6, save6
    cn.ok("CHECK", "a")
    cn.ok("DEL", "a")
    assert index not in endpoint_keys(root)
    assert f"weft-fw-{iface}" not in cn.sh("ip6tables-nft-save", "-t", "filter")


def test_an_add_begun_on_iptables_waits_for_its_veth_when_the_node_switched_to_ebpf(ebpf):
    """The plugin chose the iptables order (the policy step while it wires the pod) and the node
    switched to eBPF before the step took the node lock: the step, deciding under the lock, finds
    an eBPF node and the pod's veth not there yet. It waits for the veth (reconciler.bpf
    IFACE_WAIT) and programs it, instead of failing the ADD."""
    import threading
    import time

    from weft.model.bpf import PROFILE_CLOSED, DirectionPolicy, EndpointEntry
    from weft.playbooks.bpflab import in_netns
    from weft.reconciler import bpf
    cn, root = ebpf
    _manifests(cn, {})
    weft(cn, "apply", "--dataplane", "ebpf")
    iface = host_iface_name("x", "server")
    closed = DirectionPolicy(PROFILE_CLOSED, digest=PROFILE_CLOSED)
    wiring = threading.Timer(0.5, cn.sh, ("ip", "link", "add", iface, "type", "veth", "peer", "name", "wefttest-peer"))
    started = time.monotonic()
    wiring.start()
    try:
        attached = in_netns(cn.ns, bpf.program_endpoint, cn.state_dir, iface, EndpointEntry(closed, closed))
        waited = time.monotonic() - started
        assert sorted(attached) == [f"{iface}/egress", f"{iface}/ingress"], attached
        assert waited >= 0.4, f"the veth was there after {waited:.2f} s: the test raced nothing"
        assert ifindex(cn, iface) in endpoint_keys(root), "no endpoint entry for the veth"
    finally:
        wiring.join()
        cn.sh("ip", "link", "del", iface)


def test_an_add_whose_node_switched_to_ebpf_after_its_iptables_step_programs_the_pod_before_it_returns(
        ebpf, monkeypatch):
    """The race of a plane switch during ADD: the plugin chose the iptables order, its step put
    the pod's chains in, then (while the veth was being made) a run switched the node to eBPF:
    it removed the pods' IPv4 chains and attached programs to the veths it found, not this one,
    and weft-FORWARD accepts pod traffic on an eBPF node. The plugin asks the plane again once
    the pod is wired and programs its endpoint then. Ordered with a hook on the wiring: it waits
    for the step's chains, runs the real switch (`weft apply --dataplane ebpf`), then wires.
    The plugin runs in this process, in the node's namespace (setns, bpffs visible)."""
    import time

    from weft.cni import plugin, wiring
    from weft.playbooks.bpflab import in_netns
    cn, root = ebpf
    _manifests(cn, {})
    weft(cn, "apply")                                     # the iptables plane
    ips = {name: cn.add(name) for name in ("friend", "stranger")}
    _manifests(cn, ips)
    weft(cn, "apply")
    serve(cn, "server", 80, 81)
    iface = host_iface_name("x", "server")
    order = []
    real_wire = wiring.wire

    def wire_after_the_switch(*args, **kwargs):
        deadline = time.monotonic() + 60
        while f":weft-fw-{iface}" not in cn.sh("iptables-nft-save", "-t", "filter"):
            assert time.monotonic() < deadline, "the ADD's iptables step never put the pod's chains in"
            time.sleep(0.05)
        order.append("iptables step")
        weft(cn, "apply", "--dataplane", "ebpf")          # waits for the step's shared lock, if still held
        assert root.exists() and f":weft-fw-{iface}" not in cn.sh("iptables-nft-save", "-t", "filter")
        order.append("switched")
        return real_wire(*args, **kwargs)

    monkeypatch.setattr(wiring, "wire", wire_after_the_switch)
    config = json.dumps(cn.config).encode()
    code, out = in_netns(cn.ns, plugin.run, cn.env("ADD", "server"), config)
    monkeypatch.setattr(wiring, "wire", real_wire)
    assert code == 0, out
    assert order == ["iptables step", "switched"], order
    ips["server"] = next(ip["address"].split("/")[0] for ip in out["ips"] if "." in ip["address"])

    assert ifindex(cn, iface) in endpoint_keys(root), "the ADD returned with no endpoint entry for its veth"
    filters = cn.sh("tc", "filter", "show", "dev", iface, "ingress") + cn.sh("tc", "filter", "show", "dev", iface,
                                                                                "egress")
    assert filters.count("direct-action") == 2, f"the programs are not on both hooks of {iface}:\n{filters}"
    assert not reaches(cn, "stranger", ips["server"], 80), "the pod ran open: a peer its policy denies got through"
    assert not reaches(cn, "friend", ips["server"], 81), "the pod ran open: a port its policy denies got through"
    assert reaches(cn, "friend", ips["server"], 80), "allowed traffic was dropped"
    cn.ok("CHECK", "server")
    for name in ("server", "friend", "stranger"):
        cn.ok("DEL", name)
    assert endpoint_keys(root) == set()
