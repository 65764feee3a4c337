"""Convergence on a real kernel: wherever a node starts from, one apply of state S leaves exactly
what applying S to a bare node leaves -- after any sequence of earlier states, and after an apply
killed with SIGKILL at any moment.

The reference for each desired state is made once, in a fresh node namespace. States differ in
their policies (none, default deny, pod and namespace selectors, ipBlock with except, named ports,
several at once) and in their pods (some added, some removed). Examples are bounded and
derandomized so that the file runs in well under two minutes and CI sees the same cases each time.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import nodens
from tests.nodens import (
    REPO,
    describe,
    kernel_state,
    namespace,
    node_netns,
    pod,
    policy,
    run_weft,
    start_weft,
    weft_argv,
)

if (why := nodens.usable()) is not None:
    pytest.skip(why, allow_module_level=True)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow])

NAMESPACES = [namespace("alpha", team="a"), namespace("beta", team="b"), namespace("gamma", team="c")]
WEB = pod("alpha", "web", "198.18.0.10", {"app": "web"}, ports=(("http", 80, "TCP"), ("metrics", 9100, "TCP")))
API = pod("alpha", "api", "198.18.0.11", {"app": "api"}, ports=(("http", 8080, "TCP"), ("dns", 53, "UDP")))
BETA_WEB = pod("beta", "web", "198.18.0.20", {"app": "web"}, ports=(("http", 8000, "TCP"), ("chat", 9000, "SCTP")))
WORKER = pod("beta", "worker", "198.18.0.21", {"app": "worker"})
DB = pod("gamma", "db", "198.18.0.30", {"app": "db"}, ports=(("pg", 5432, "TCP"),))
REMOTE = pod("alpha", "remote", "198.18.1.10", {"app": "web"}, node="n2", ports=(("http", 81, "TCP"),))
CLIENT = pod("gamma", "client", "198.18.1.30", {"app": "client"}, node="n2")
BASE_PODS = [WEB, API, BETA_WEB, WORKER, DB, REMOTE, CLIENT]
CHANGED_PODS = [WEB, BETA_WEB, WORKER, DB, REMOTE, CLIENT,                       # alpha/api removed
                pod("beta", "new", "198.18.0.22", {"app": "web"}, ports=(("http", 8001, "TCP"),)),
                pod("alpha", "remote2", "198.18.1.11", {"app": "api"}, node="n2", ports=(("dns", 5353, "UDP"),)),
                pod("gamma", "web", "198.18.0.31", {"app": "web"}, ports=(("http", 80, "TCP"),))]

DEFAULT_DENY = [
    policy("alpha", "deny-ingress", {"podSelector": {}}),
    policy("gamma", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
]
POD_SELECTOR = [
    policy("alpha", "allow-web", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": 80}]}]}),
    policy("beta", "worker-to-web", {
        "podSelector": {"matchLabels": {"app": "worker"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
]
NAMESPACE_SELECTOR = [
    policy("gamma", "db-clients", {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}}],
            "ports": [{"port": "pg"}]}]}),
    policy("alpha", "from-anywhere-in-cluster", {
        "podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
]
IP_BLOCK = [
    policy("beta", "egress-in-range", {
        "podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.18.0.0/15", "except": ["198.18.1.0/24", "198.18.0.20/32"]}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"port": 1000, "endPort": 2000}]}],
        "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.2.0/24"}}, {"ipBlock": {"cidr": "2001:db8::/32"}},
                              {"ipBlock": {"cidr": "198.18.4.0/24"}}]}]}),
]
NAMED_PORT = [
    policy("alpha", "http-by-name", {
        "podSelector": {}, "ingress": [{"ports": [{"port": "http"}, {"protocol": "UDP", "port": "dns"}]}]}),
    policy("beta", "egress-named", {
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {}}],
                    "ports": [{"protocol": "UDP", "port": "dns"}, {"port": "http"},
                              {"protocol": "SCTP", "port": "chat"}]}]}),
]

POOL = {
    "none": NAMESPACES + BASE_PODS,
    "default-deny": NAMESPACES + BASE_PODS + DEFAULT_DENY,
    "pod-selector": NAMESPACES + BASE_PODS + POD_SELECTOR,
    "namespace-selector": NAMESPACES + BASE_PODS + NAMESPACE_SELECTOR,
    "ip-block": NAMESPACES + BASE_PODS + IP_BLOCK,
    "named-port": NAMESPACES + BASE_PODS + NAMED_PORT,
    "several-pods-changed": NAMESPACES + CHANGED_PODS + POD_SELECTOR + NAMESPACE_SELECTOR + IP_BLOCK,
    "named-port-pods-changed": NAMESPACES + CHANGED_PODS + NAMED_PORT + DEFAULT_DENY,
}
NAMES = sorted(POOL)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("desired")
    return {name: nodens.write_manifests(root / name, objects) for name, objects in POOL.items()}


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory) -> dict[str, dict]:
    """name -> the kernel state (both backends, ipsets; portable form) of a bare node after one
    apply of that state."""
    refs = {}
    for name, src in sources.items():
        with node_netns() as ns:
            proc = run_weft(ns, "apply", state_dir=tmp_path_factory.mktemp("ref-state"), from_dir=src)
            assert proc.returncode == 0, f"reference apply of {name}: " + describe(proc)
            refs[name] = kernel_state(ns, portable=True)
    assert len({json.dumps(r, sort_keys=True) for r in refs.values()}) == len(refs), "two pool states render alike"
    return refs


def apply_ok(ns: str, state_dir: str, src: Path) -> dict:
    proc = run_weft(ns, "apply", "--output", "json", state_dir=state_dir, from_dir=src)
    assert proc.returncode == 0, describe(proc)
    return json.loads(proc.stdout)


@SETTINGS
@given(sequence=st.lists(st.sampled_from(NAMES), min_size=1, max_size=5))
def test_any_sequence_ends_in_the_last_states_reference(sources, references, sequence):
    """Each state is written in turn into the same --from directory (as a checkout or a sync
    job would update it), so what weft keeps in its state dir between runs is exercised too."""
    with node_netns() as ns, tempfile.TemporaryDirectory() as state_dir, tempfile.TemporaryDirectory() as src:
        for name in sequence:
            apply_ok(ns, state_dir, nodens.write_manifests(Path(src), POOL[name]))
        assert kernel_state(ns, portable=True) == references[sequence[-1]], f"after {sequence}"
        assert apply_ok(ns, state_dir, sources[sequence[-1]])["commands"] == []


def _wait_until_empty(ns: str) -> None:
    for _ in range(200):
        if not nodens.sh("ip", "netns", "pids", ns, check=False).stdout.split():
            return
        time.sleep(0.01)
    raise AssertionError(f"processes still running in {ns} after SIGKILL")


def kill_and_rerun(sources, references, start: str, target: str, kill) -> None:
    """Apply `start`; start applying `target` and kill it (SIGKILL, with the tool it runs) where
    `kill(ns, state_dir, source, tools)` says; apply `target` again: the node must end exactly
    like a bare node given `target`, and a further apply do nothing."""
    with node_netns() as ns, tempfile.TemporaryDirectory() as state_dir, tempfile.TemporaryDirectory() as tools:
        apply_ok(ns, state_dir, sources[start])
        where = kill(ns, state_dir, sources[target], Path(tools))
        _wait_until_empty(ns)
        apply_ok(ns, state_dir, sources[target])
        assert kernel_state(ns, portable=True) == references[target], f"{start} -> {target}, {where}"
        assert apply_ok(ns, state_dir, sources[target])["commands"] == [], where


def _killed(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)    # weft and whatever kernel tool it was running
    except ProcessLookupError:
        pass                                   # it had already finished
    proc.communicate(timeout=30)


def after_delay(delay_ms: float):
    def kill(ns: str, state_dir: str, src: Path, tools: Path) -> str:
        proc = start_weft(ns, "apply", state_dir=state_dir, from_dir=src)
        time.sleep(delay_ms / 1000)
        _killed(proc)
        return f"killed {delay_ms} ms after it started: exit {proc.returncode}"
    return kill


@SETTINGS
@given(pair=st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES)).filter(lambda p: p[0] != p[1]),
       delay_ms=st.integers(0, 300))
def test_apply_killed_at_a_random_moment_then_rerun_converges(sources, references, pair, delay_ms):
    kill_and_rerun(sources, references, *pair, after_delay(delay_ms))


# --- killed at each kernel command, named ----------------------------------------------------
#
# Every kernel tool weft runs is reached through PATH; the test puts a directory in front of it
# whose scripts log each command and run the real tool, except at the target: the n-th command
# that starts with the target's words. There the script marks the target hit and waits to be
# killed, either before the real tool runs ("before") or once it has finished ("after"), so the
# run dies exactly there. An apply from "named-port" to "several-pods-changed" creates, updates
# and destroys sets and chains; its kernel commands are, in order: iptables -V (the backend); the
# dumps: iptables-nft-save, ipset save, ip -j route/link; under the lock, the dispatch chains read
# again (iptables-nft -S); ipset restore (new sets, members), iptables-nft-restore (one
# transaction), ipset restore (sets no longer used); the read-back (ipset save, iptables-nft ...).

TOOLS = ("iptables", "iptables-nft", "iptables-nft-save", "iptables-nft-restore", "ipset", "ip")
TARGETS = {
    "the kernel dump": ("iptables-nft-save", 1),
    "the set dump": ("ipset save", 1),
    "the confirmation under the lock": ("iptables-nft -t filter -S", 1),
    "the first ipset restore": ("ipset restore", 1),
    "the iptables transaction": ("iptables-nft-restore", 1),
    "the final ipset restore": ("ipset restore", 2),
    "the read-back": ("ipset save", 2),
}
SHIM = """#!/bin/sh
# test shim for {tool}: log, then run the real tool; at the target, mark it and wait to be killed
exec 9>>"$WEFT_SHIM_LOG"
flock 9
echo "{tool} $*" >&9
seen=$(grep -c -F -e "$WEFT_SHIM_TARGET" "$WEFT_SHIM_LOG")
flock -u 9
exec 9>&-
case "{tool} $*" in
  "$WEFT_SHIM_TARGET"*)
    if [ "$seen" = "$WEFT_SHIM_COUNT" ]; then
      if [ -n "$WEFT_SHIM_RELEASE" ]; then        # hold after the real tool ran, until released
        {real} "$@"; rc=$?
        echo hit > "$WEFT_SHIM_HIT"
        while [ ! -e "$WEFT_SHIM_RELEASE" ]; do sleep 0.01; done
        exit $rc
      fi
      [ "$WEFT_SHIM_WHEN" = after ] && {real} "$@"
      echo hit > "$WEFT_SHIM_HIT"
      exec sleep 60
    fi;;
esac
exec {real} "$@"
"""


def shimmed(tools: Path) -> dict:
    """PATH with the shims in front (the real tools resolved first)."""
    for tool in TOOLS:
        real = shutil.which(tool)
        assert real, f"{tool} is not installed"
        (tools / tool).write_text(SHIM.format(tool=tool, real=real))
        (tools / tool).chmod(0o755)
    return {"PATH": f"{tools}:{os.environ['PATH']}"}


def at_command(words: str, count: int, when: str):
    def kill(ns: str, state_dir: str, src: Path, tools: Path) -> str:
        hit = tools / "hit"
        env = os.environ | shimmed(tools) | {"WEFT_SHIM_LOG": str(tools / "log"), "WEFT_SHIM_TARGET": words,
                                             "WEFT_SHIM_COUNT": str(count), "WEFT_SHIM_WHEN": when,
                                             "WEFT_SHIM_HIT": str(hit)}
        proc = subprocess.Popen(weft_argv(ns, "apply", state_dir=state_dir, from_dir=src), env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while not hit.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        reached = hit.exists()
        _killed(proc)
        ran = (tools / "log").read_text() if (tools / "log").exists() else ""
        assert reached, f"the target `{words}` #{count} was never run; the commands were:\n{ran}"
        return f"killed {when} `{words}` #{count}"
    return kill


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_apply_killed_at_each_kernel_command_then_rerun_converges(sources, references, target, when):
    kill_and_rerun(sources, references, "named-port", "several-pods-changed", at_command(*TARGETS[target], when))


def test_a_run_whose_early_read_another_run_outdated_reads_again(sources, references):
    """A run reads the kernel before it takes the lock; another run applies meanwhile. Under the
    lock the first sees the other's write marker and reads again: it has nothing left to do
    (were it to trust its early read, it would redo or undo what the other wrote)."""
    with node_netns() as ns, tempfile.TemporaryDirectory() as state_dir, tempfile.TemporaryDirectory() as tmp:
        tools = Path(tmp)
        apply_ok(ns, state_dir, sources["none"])
        hit, release = tools / "hit", tools / "release"
        env = os.environ | shimmed(tools) | {"WEFT_SHIM_LOG": str(tools / "log"), "WEFT_SHIM_TARGET": "ipset save",
                                             "WEFT_SHIM_COUNT": "1", "WEFT_SHIM_WHEN": "after",
                                             "WEFT_SHIM_HIT": str(hit), "WEFT_SHIM_RELEASE": str(release)}
        early = subprocess.Popen([*weft_argv(ns, "apply", state_dir=state_dir, from_dir=sources["named-port"]),
                                  "--output", "json"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not hit.exists() and early.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert hit.exists(), "the first run never read the sets"
            other = apply_ok(ns, state_dir, sources["named-port"])      # meanwhile, another run applies
            assert other["commands"], "the other run should have had work to do"
            release.touch()
            out, err = early.communicate(timeout=60)
        finally:
            _killed(early) if early.poll() is None else None
        assert early.returncode == 0, err
        assert json.loads(out)["commands"] == [], "the first run trusted a read the other run had outdated"
        assert kernel_state(ns, portable=True) == references["named-port"]
