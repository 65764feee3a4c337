"""The eBPF data plane as a resource of the reconcile engine: `weft plan|apply|drift
--dataplane ebpf` on a real lab node, with real packets.

weft runs inside the lab's node namespace through `nsenter --net` (never `ip netns exec`, which
remounts /sys and hides bpffs); every test has a state directory of its own, hence a pin
directory of its own (reconciler.bpf_apply.node_pin_dir), removed after the test and checked gone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.matrices import NODE, SCENARIOS, Expect, diff, is_no_op, write_source
from tests.test_bpf_dataplane import lab
from weft.model.names import host_iface_name

PEER = Expect().isolate_ingress("x/a").allow_ingress(dst="x/a", src="x/b")


lab = lab        # the lab of every pod of the base cluster (a fixture, one per module)


class EbpfNode:
    """weft run in the lab's node namespace with a state (and pin) directory of its own."""

    def __init__(self, lab, state: Path):
        from weft.reconciler.bpf_apply import build_for, node_pin_dir
        self.lab = lab
        self.state = state
        self.root = node_pin_dir(state)
        self.maps_dir = build_for(self.root).maps_dir(self.root)

    def weft(self, *argv: str, source: Path | None = None, expect: int | None = 0,
             timeout: float = 300) -> subprocess.CompletedProcess:
        verb = list(argv[:2] if argv[0] == "bpf" else argv[:1])     # `weft bpf policy --node ...`
        command = ["nsenter", f"--net=/run/netns/{self.lab.node_netns}", sys.executable, "-m", "weft.reconciler.cli",
                   *verb, "--node", NODE, "--state-dir", str(self.state), *argv[len(verb):]]
        if source is not None:
            command += ["--from", str(source)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if expect is not None and done.returncode != expect:
            pytest.fail(f"`{' '.join(command)}` exited {done.returncode}, not {expect}\n--- stdout\n{done.stdout}"
                        f"\n--- stderr\n{done.stderr}", pytrace=False)
        return done

    def json(self, *argv: str, **kwargs) -> dict:
        return json.loads(self.weft(*argv, "--output", "json", **kwargs).stdout)

    def forget_connections(self) -> None:
        from weft.reconciler.bpf_apply import clear_map
        if (self.maps_dir / "conntrack").exists():
            clear_map(self.maps_dir / "conntrack")

    def hooks(self) -> dict[str, str]:
        """Interface -> its qdiscs (but the default) and tc filters, as `tc` shows them."""
        out = {}
        for pod in self.lab.pods:
            iface = host_iface_name(pod.namespace, pod.name)
            shown = [self.lab.node_run(["tc", *what, "show", "dev", iface, *hook], check=True).stdout.strip()
                     for what, hook in ((("qdisc",), ()), (("filter",), ("ingress",)), (("filter",), ("egress",)))]
            out[iface] = "\n".join(line for s in shown for line in s.splitlines() if "noqueue" not in line)
        return out

    def cleanup(self) -> None:
        """Whatever a failed test left: destroyed through weft, else by hand; then checked."""
        from weft.playbooks.bpflab import in_netns
        from weft.reconciler.bpf_apply import destroy_bpf
        self.weft("apply", "--destroy", expect=None)
        if self.root.exists():
            in_netns(self.lab.node_netns, destroy_bpf, self.root)
        assert not self.root.exists(), f"pins left behind in {self.root}"


@pytest.fixture
def node(lab, tmp_path):
    ebpf = EbpfNode(lab, tmp_path / "state")
    try:
        yield ebpf
    finally:
        ebpf.cleanup()


IPV6_SETS = ("weft-s6-", "weft-n6-", "weft-p6-", "weft-c6-")    # IPv6 stays with ip6tables on eBPF

def check_matrix(lab, node: EbpfNode, expected, context: str) -> None:
    from weft.playbooks.netlab import format_matrix
    for _ in range(2):                        # a loaded machine can lose a probe: look again
        node.forget_connections()
        observed = lab.matrix()
        differences = diff(expected, observed)
        if not differences:
            return
    pytest.fail(f"{context}: {len(differences)} cells differ\n" + "\n".join(differences)
                + "\n\nEXPECTED\n" + format_matrix(lab.pods, expected)
                + "\n\nOBSERVED\n" + format_matrix(lab.pods, observed), pytrace=False)


def weft_chains(lab) -> list[str]:
    return [line for line in lab.node_run(["iptables-nft-save"], check=True).stdout.splitlines()
            if line.startswith("-A") and "weft" in line]


def test_plan_apply_drift_destroy(lab, node, tmp_path):
    """The same contract as the iptables plane: the plan names the policy behind each key; apply
    compiles, writes and attaches; a second run writes and compiles nothing; drift names a key
    changed by hand and a program detached, and the next run puts back exactly those; destroy
    leaves no pin, filter or qdisc."""
    from weft.model import bpf as m
    from weft.reconciler.bpf_apply import MapWriter
    source = write_source(tmp_path / "src", SCENARIOS / "pod-selector-peer.yaml")

    plan = node.weft("plan", "--dataplane", "ebpf", "--detailed-exitcode", source=source, expect=2).stdout
    assert "eBPF programs progs-" in plan and "eBPF map verdicts will be created" in plan, plan
    assert "x/a-from-b" in plan, "the plan does not name the policy a key comes from:\n" + plan
    assert not node.root.exists(), "plan wrote pins"

    first = node.json("apply", "--dataplane", "ebpf", source=source)
    assert any(c.startswith("bpf compile") for c in first["commands"]), first["commands"]
    assert any(c.startswith("bpf map") and "verdicts" in c for c in first["commands"]), first["commands"]
    attached = [c for c in first["changes"]["bpf"] if c["kind"] == "attach"]
    assert len(attached) == 2 * len(lab.pods)
    assert not any("-fw-" in line or "-tw-" in line for line in weft_chains(lab)), \
        "an eBPF node still has policy chains"
    check_matrix(lab, node, PEER.matrix(), "after the first eBPF apply")

    again = node.json("apply", "--dataplane", "ebpf", source=source)
    assert is_no_op(again), f"the second run was not a no-op: {again['commands']}"
    node.weft("plan", "--dataplane", "ebpf", "--detailed-exitcode", source=source, expect=0)

    # Drift: a verdict changed by hand, a program detached.
    verdicts = node.json("plan", "--dataplane", "ebpf", source=source)   # nothing to do: no keys listed
    assert verdicts["changes"]["bpf"] == []
    from weft.playbooks.bpflab import in_netns
    from weft.probes.bpf import read_maps
    found = in_netns(lab.node_netns, read_maps, node.maps_dir)
    key = next(k for k, v in found.verdicts.items() if v.action == m.DENY)
    with MapWriter(node.maps_dir / "verdicts") as writer:
        writer.update(m.pack_key("verdicts", key), m.pack_value("verdicts", m.Verdict(m.ALLOW, 12345)))
    iface = host_iface_name("x", "a")
    lab.node_run(["tc", "filter", "del", "dev", iface, "egress", "pref", "49152"], check=True)
    node.forget_connections()
    assert diff(PEER.matrix(), lab.matrix()), "the verdict changed by hand opened nothing"   # the drift is real
    drift = node.json("drift", "--dataplane", "ebpf", source=source, expect=2)
    items = {(i["kind"], i["name"], i["problem"]) for i in drift["items"]}
    assert ("bpf program", f"{iface}/egress", "missing") in items, drift["items"]
    changed = [i for i in drift["items"] if i["kind"] == "bpf map"]
    assert len(changed) == 1 and changed[0]["name"].startswith("verdicts [profile") \
        and changed[0]["problem"] == "changed" and "x/a-from-b" in changed[0]["rule"], drift["items"]
    assert len(drift["items"]) == 2, drift["items"]

    fixed = node.json("apply", "--dataplane", "ebpf", source=source)
    assert not any(c.startswith("bpf compile") for c in fixed["commands"])
    assert [c for c in fixed["commands"] if c.startswith("bpf map")] == \
        ["bpf map " + f"{node.maps_dir.name}/verdicts: 1 written, 0 deleted"], fixed["commands"]
    assert fixed["summary"] == {"add": 1, "change": 1, "destroy": 0}, fixed["summary"]
    check_matrix(lab, node, PEER.matrix(), "after the drift was put back")

    node.weft("apply", "--destroy")
    assert not node.root.exists(), "destroy left pins"
    assert not any(node.hooks().values()), node.hooks()
    assert not weft_chains(lab)


def test_guard_allows_map_writes_only_under_the_pin_dir(tmp_path):
    """Pure: the guard refuses an eBPF write outside the node's pin directory, to a map that is
    not one of weft's policy maps, of a value of the wrong type, or on a foreign interface."""
    from weft.model import bpf as m
    from weft.reconciler import guard
    from weft.reconciler.resource import BpfWrite, Step
    root = "/sys/fs/bpf/weft/0123456789abcdef"
    maps = f"{root}/maps-{'a' * 16}"
    progs = f"{root}/progs-{'b' * 16}"
    known = guard.Known({}, root)
    ok = [BpfWrite("compile", progs), BpfWrite("attach", progs, "weft1234abcd", "ingress"),
          BpfWrite("map", f"{maps}/verdicts", writes=((m.VerdictKey(5, 0, 0, 6), m.Verdict(m.ALLOW, 7)),)),
          BpfWrite("map", f"{maps}/endpoints", deletes=("ifindex:7",)),
          BpfWrite("detach", root, "weft1234abcd", "egress"), BpfWrite("unpin", progs), BpfWrite("unpin", root)]
    guard.check([Step(w, "ok") for w in ok], known)
    refused = [
        BpfWrite("map", f"/sys/fs/bpf/other/maps-{'a' * 16}/verdicts", writes=()),
        BpfWrite("map", f"{maps}/../../other/maps-{'a' * 16}/verdicts"),
        BpfWrite("map", f"{maps}/conntrack", deletes=()),
        BpfWrite("map", f"{maps}/verdicts", writes=((m.VerdictKey(5, 0, 0, 6), "allow"),)),
        BpfWrite("map", f"{maps}/endpoints", writes=(("eth0", m.EndpointEntry(m.DirectionPolicy(0),
                                                                                m.DirectionPolicy(0))),)),
        BpfWrite("attach", progs, "eth0", "ingress"),
        BpfWrite("attach", f"{root}/elsewhere", "weft1234abcd", "ingress"),
        BpfWrite("detach", "/sys/fs/bpf", "weft1234abcd", "egress"),
        BpfWrite("unpin", "/sys/fs/bpf/weft"),
        BpfWrite("unpin", f"{root}/maps-{'a' * 16}/verdicts"),
        BpfWrite("load", progs),
    ]
    for write in refused:
        with pytest.raises(guard.Refused):
            guard.check([Step(write, "bad")], known)
    with pytest.raises(guard.Refused, match="no pin directory"):
        guard.check([Step(ok[0], "no root")], guard.Known({}))


def test_bpf_policy_conntrack_counters(lab, node, tmp_path):
    """`weft bpf policy POD` lists the rules in force for each direction with the packets each
    decided; `conntrack` the tracked connections; `counters` every counter; text and JSON."""
    source = write_source(tmp_path / "src", SCENARIOS / "pod-selector-peer.yaml")
    ip = {p.key: p.ip for p in lab.pods}
    node.weft("bpf", "policy", "x/a", source=source, expect=1)          # nothing pinned yet: one line
    node.weft("apply", "--dataplane", "ebpf", source=source)
    node.forget_connections()
    lab.matrix()                                  # x/b gets through to x/a, the others are denied

    shown = node.json("bpf", "policy", "x/a", source=source)
    assert shown["in_force"] and shown["egress"] == {"state": "open", "rules": []}, shown
    ingress = shown["ingress"]
    assert ingress["state"] == "policed", ingress
    texts = [r["text"] for r in ingress["rules"]]
    assert texts[0].startswith("NetworkPolicy x/a-from-b ingress rule 1 (Allow") and "end of tier" in texts[1], texts
    allowed, denied = ingress["rules"][0], ingress["rules"][1]
    assert allowed["packets"] > 0 and allowed["bytes"] > 0, ingress        # x/b's probes
    assert denied["packets"] >= 8 * 2, ingress                             # 8 other pods' TCP probes at least
    text = node.weft("bpf", "policy", "x/a", source=source).stdout
    assert "x/a-from-b ingress rule 1" in text and "egress: open" in text, text
    other = node.json("bpf", "policy", "y/b", source=source)
    assert other["ingress"]["state"] == "open", other

    err = node.weft("bpf", "policy", "x/nope", source=source, expect=1)
    assert err.stderr.count("\n") == 1 and "x/nope" in err.stderr, err.stderr

    tracked = node.json("bpf", "conntrack")["connections"]
    assert any(c["protocol"] == "tcp" and c["source"].startswith(ip["x/b"] + ":")
               and c["destination"] == f"{ip['x/a']}:80" for c in tracked), tracked
    assert "tracked connections" in node.weft("bpf", "conntrack").stdout

    rows = node.json("bpf", "counters")["counters"]
    iface = host_iface_name("x", "a")
    assert {r["rule"] for r in rows if r["interface"] == iface and r["packets"]} >= {allowed["rule"], denied["rule"]}


PROBE_LOOP = """
import socket, sys, time
target, port = sys.argv[1], int(sys.argv[2])
tries = connected = 0
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline and not __import__("os").path.exists(sys.argv[4]):
    tries += 1
    try:
        socket.create_connection((target, port), timeout=0.2).close()
        connected += 1
    except OSError:
        pass
print(tries, connected, flush=True)
"""


def test_switching_planes_leaves_no_window(lab, node, tmp_path):
    """iptables -> eBPF -> iptables, each in one apply, while x/c (denied) and x/b (allowed) open
    new connections to x/a as fast as they can: x/c never gets through, x/b keeps getting through,
    and each apply leaves only its own plane (no policy chains on eBPF, no pins or filters on
    iptables)."""
    source = write_source(tmp_path / "src", SCENARIOS / "pod-selector-peer.yaml")
    ip = {p.key: p.ip for p in lab.pods}
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    node.weft("apply", source=source)
    check_matrix(lab, node, PEER.matrix(), "iptables before the switch")
    stop = tmp_path / "stop"
    loops = {src: subprocess.Popen(["nsenter", f"--net=/run/netns/{pod_ns[src]}", sys.executable, "-c", PROBE_LOOP,
                                    ip["x/a"], "80", "600", str(stop)], stdout=subprocess.PIPE, text=True)
             for src in ("x/c", "x/b")}
    try:
        for loop in loops.values():
            assert loop.stdout.readline().strip() == "ready"
        probing_since = time.monotonic()
        to_ebpf = node.json("apply", "--dataplane", "ebpf", source=source)
        assert any(c.startswith("bpf compile") for c in to_ebpf["commands"])
        assert not [line for line in weft_chains(lab) if "-fw-" in line or "-tw-" in line or "DISPATCH" in line]
        left = lab.node_run(["ipset", "list", "-n"], check=True).stdout.split()
        assert not [name for name in left if not name.startswith(IPV6_SETS)], "IPv4 sets: the programs judge IPv4"
        back = node.json("apply", "--dataplane", "iptables", source=source)
        assert any(c.startswith("bpf unpin") for c in back["commands"]), back["commands"]
        assert not node.root.exists() and not any(node.hooks().values()), node.hooks()
        time.sleep(max(0.0, probing_since + 6.0 - time.monotonic()))   # enough tries however fast the switch
    finally:
        stop.touch()
        results = {src: loop.communicate(timeout=30)[0].split() for src, loop in loops.items()}
    denied_tries, denied_connected = map(int, results["x/c"])
    allowed_tries, allowed_connected = map(int, results["x/b"])
    assert denied_tries > 20 and denied_connected == 0, f"x/c got through {denied_connected} of {denied_tries} times"
    assert allowed_connected > 20, f"x/b connected only {allowed_connected} of {allowed_tries} times"
    check_matrix(lab, node, PEER.matrix(), "iptables after the round trip")
    assert is_no_op(node.json("apply", source=source))


def test_cni_step_writes_the_entry_and_attaches_without_compiling(lab, node, tmp_path):
    """What the CNI plugin calls on an eBPF node (reconciler.bpf): the pod's entry from the
    snapshot the run left, written and attached with no compile; the next run is a no-op. A pod
    the run did not know is closed where a policy of its namespace might select it."""
    from weft.playbooks.bpflab import in_netns
    from weft.reconciler.bpf import ebpf_node, endpoint_entry, forget_endpoint, program_endpoint
    from weft.reconciler.bpf_apply import BpfApplyError
    from weft.renderers.bpf_policy import CLOSED, OPEN
    from weft.store.snapshot import load_snapshot
    source = write_source(tmp_path / "src", SCENARIOS / "pod-selector-peer.yaml")
    iface = host_iface_name("x", "a")
    with pytest.raises(BpfApplyError, match="must run on this node"):       # nothing pinned: no unpoliced pod
        in_netns(lab.node_netns, program_endpoint, node.state, iface, endpoint_entry(
            {"bpf": {"endpoints": {}}, "closed": {}, "default": [False, False]}, "x/a"))
    node.weft("apply", "--dataplane", "ebpf", source=source)
    snapshot = load_snapshot(node.state)
    entry = endpoint_entry(snapshot, "x/a")
    assert entry.ingress.profile not in (0, 1) and entry.egress == OPEN
    assert endpoint_entry(snapshot, "x/new") == (OPEN, CLOSED)        # x has an ingress policy
    assert endpoint_entry(snapshot, "y/new") == (OPEN, OPEN)
    shut = (CLOSED, CLOSED)                       # what cannot be used closes the pod until the next run
    assert endpoint_entry(snapshot | {"bpf": {"endpoints": {"x/a": [[1, 2, 3], [True, 0, 0, 0]]}}}, "x/a") == shut
    assert endpoint_entry(None, "y/new") == shut and endpoint_entry({"closed": {}}, "y/new") == shut
    assert in_netns(lab.node_netns, ebpf_node, node.state) and not ebpf_node(tmp_path / "other-state")

    # x/a as the plugin finds a new pod: no entry, no programs (and so, for now, open).
    assert in_netns(lab.node_netns, forget_endpoint, node.state, iface)
    for hook in ("ingress", "egress"):
        lab.node_run(["tc", "filter", "del", "dev", iface, hook, "pref", "49152"], check=True)
    lab.node_run(["tc", "qdisc", "del", "dev", iface, "clsact"], check=True)
    node.forget_connections()
    assert lab.matrix()[("x/c", "x/a", "tcp", 80)], "x/a without programs should be unpoliced"

    attached = in_netns(lab.node_netns, program_endpoint, node.state, iface, entry)
    assert sorted(attached) == [f"{iface}/egress", f"{iface}/ingress"]
    check_matrix(lab, node, PEER.matrix(), "after the CNI step")
    again = node.json("apply", "--dataplane", "ebpf", source=source)
    assert is_no_op(again), again["commands"]


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.5, 6.0])
def test_switch_killed_at_a_moment_then_rerun_converges(lab, node, tmp_path, delay):
    """iptables -> eBPF, the apply killed with SIGKILL `delay` seconds in (reading, compiling,
    writing maps, attaching, replacing the chains): x/c (denied) never gets through meanwhile, and
    the next apply leaves the node as one uninterrupted apply would (a third is a no-op)."""
    import os
    import signal
    import time
    source = write_source(tmp_path / "src", SCENARIOS / "pod-selector-peer.yaml")
    ip = {p.key: p.ip for p in lab.pods}
    pod_ns = {p.key: lab.pod_netns(p) for p in lab.pods}
    node.weft("apply", source=source)
    stop = tmp_path / "stop"
    loop = subprocess.Popen(["nsenter", f"--net=/run/netns/{pod_ns['x/c']}", sys.executable, "-c", PROBE_LOOP,
                             ip["x/a"], "80", "600", str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert loop.stdout.readline().strip() == "ready"
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.node_netns}", sys.executable, "-m",
                                 "weft.reconciler.cli", "apply", "--node", NODE, "--state-dir", str(node.state),
                                 "--dataplane", "ebpf", "--from", str(source)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)     # weft and whatever tool it was running
        proc.wait()
        node.weft("apply", "--dataplane", "ebpf", source=source)
    finally:
        stop.touch()
        tries, connected = map(int, loop.communicate(timeout=30)[0].split())
    assert tries > 5 and connected == 0, f"x/c got through {connected} of {tries} times"
    again = node.json("apply", "--dataplane", "ebpf", source=source)
    assert is_no_op(again), again["commands"]
    assert not [line for line in weft_chains(lab) if "-fw-" in line or "-tw-" in line]
    assert not [p for p in node.root.iterdir() if p.name.startswith("staging-")]
    check_matrix(lab, node, PEER.matrix(), f"after a kill at {delay} s and a rerun")


def test_felix_configuration_bpf_enabled_chooses_the_plane(lab, node, tmp_path):
    """Without --dataplane, FelixConfiguration's bpfEnabled decides: true puts the eBPF plane in
    place (programs on every pod's hooks from the first run), false takes it away again."""
    def felix(enabled: bool) -> dict[str, str]:
        return {"felix.yaml": json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
                                          "metadata": {"name": "default"}, "spec": {"bpfEnabled": enabled}})}
    on = write_source(tmp_path / "on", SCENARIOS / "pod-selector-peer.yaml", texts=felix(True))
    first = node.json("apply", source=on)
    assert len([c for c in first["changes"]["bpf"] if c["kind"] == "attach"]) == 2 * len(lab.pods)
    check_matrix(lab, node, PEER.matrix(), "bpfEnabled: true")
    assert is_no_op(node.json("apply", source=on))
    off = write_source(tmp_path / "off", SCENARIOS / "pod-selector-peer.yaml", texts=felix(False))
    node.weft("apply", source=off)
    assert not node.root.exists() and not any(node.hooks().values())
    check_matrix(lab, node, PEER.matrix(), "bpfEnabled: false (iptables)")


def test_host_endpoints_on_an_ebpf_node_go_through_plan_apply_drift_destroy(lab, node, tmp_path):
    """An eBPF node keeps weft's iptables chains for its host endpoints
    (renderers.bpf_policy.host_dataplane): normal, applyOnForward, preDNAT and doNotTrack
    policies and defaultEndpointToHostAction go in with the programs, the pods' own chains do
    not; a second plan has nothing to do, drift finds nothing, destroy removes every chain, set
    and pin."""
    from tests.calico_cluster import gnp, kind
    from tests.matrices import NODE as LAB_NODE
    worker = {"selector": "role == 'worker'", "types": ["Ingress", "Egress"]}
    docs = [kind("HostEndpoint", "lab-eth9", {"node": LAB_NODE, "interfaceName": "eth9"}, role="worker"),
            kind("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Drop"}),
            gnp("host", **worker, ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}],
                egress=[{"action": "Allow"}]),
            gnp("fwd", **worker, applyOnForward=True, ingress=[{"action": "Deny", "protocol": "UDP"}],
                egress=[{"action": "Allow"}]),
            gnp("pre", selector="role == 'worker'", preDNAT=True, applyOnForward=True,
                ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}}]),
            gnp("raw", **worker, doNotTrack=True, applyOnForward=True,
                ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [9090]}}],
                egress=[{"action": "Allow", "protocol": "TCP", "source": {"ports": [9090]}}])]
    source = write_source(tmp_path / "src", SCENARIOS / "pod-selector-peer.yaml",
                          texts={"hosts.yaml": "\n---\n".join(json.dumps(d) for d in docs)})
    node.weft("apply", "--dataplane", "ebpf", source=source)
    saved = lab.node_run(["iptables-nft-save"], check=True).stdout
    for text in ("-i eth9 -m comment", "-g weft-hi-", "-o eth9 -m comment", "-g weft-ho-", "-j weft-from-hep-fwd",
                 "-A PREROUTING", "-g weft-hd-", "-j NOTRACK", "-A weft-INPUT -i weft+"):
        assert text in saved, f"{text!r} not in the eBPF node's iptables:\n{saved}"
    assert not any("-fw-" in line or "-tw-" in line or "wl-dispatch" in line for line in weft_chains(lab)), \
        "an eBPF node has pod policy chains"
    check_matrix(lab, node, PEER.matrix(), "eBPF with host endpoints")
    node.weft("plan", "--dataplane", "ebpf", "--detailed-exitcode", source=source, expect=0)
    node.weft("drift", "--dataplane", "ebpf", source=source, expect=0)
    node.weft("apply", "--destroy")
    left = [line for line in lab.node_run(["iptables-nft-save"], check=True).stdout.splitlines() if "weft" in line]
    assert not left, left
    assert "weft" not in lab.node_run(["ipset", "list", "-n"], check=True).stdout
    assert not node.root.exists()
