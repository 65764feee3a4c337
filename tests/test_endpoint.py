"""A pod's policy programmed at creation (the CNI plugin's add_endpoint), on a real kernel.

The rules: a pod a reconcile run already knew is left as that run programmed it; a pod it did
not know is closed in a direction where a policy of its namespace might apply, open where none
could; a node where weft never ran gets weft's base chains first; removal is idempotent; pods
added at the same time all end up dispatched exactly once.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.nodens import (
    REPO,
    WeftNode,
    chain_rules,
    iptables_save,
    namespace,
    node_ns,
    pod,
    policy,
    usable,
    write_manifests,
)
from weft.model.names import host_iface_name

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node_ns = node_ns  # the fixture

DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}


def endpoint_call(ns: str, state_dir, call: str) -> subprocess.CompletedProcess:
    code = f"from pathlib import Path\nfrom weft.reconciler.endpoint import *\n{call}"
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def add(ns, state_dir, namespace_, name, ips: tuple[str, ...] = ()):
    """add_endpoint as the CNI plugin calls it; without `ips` (addresses not known) in both families."""
    proc = endpoint_call(ns, state_dir, f"add_endpoint(Path({str(state_dir)!r}), {namespace_!r}, {name!r}, "
                                        f"{host_iface_name(namespace_, name)!r}, {tuple(ips)!r})")
    assert proc.returncode == 0, proc.stderr
    return host_iface_name(namespace_, name)


def applied(ns, tmp_path, objects) -> WeftNode:
    node = WeftNode(ns, tmp_path / "state")
    node.weft("apply", from_dir=write_manifests(tmp_path / "src", objects))
    return node


CLUSTER = [namespace("open"), namespace("guarded"),
           pod("guarded", "known", "198.18.2.10", {"app": "db"}), pod("open", "other", "198.18.2.11")]


def test_pod_programmed_by_the_reconcile_run_is_left_alone(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER + [policy("guarded", "deny", DENY_INGRESS)])
    before = node.state()
    iface = add(node_ns, node.state_dir, "guarded", "known", ("198.18.2.10",))
    assert node.state() == before
    assert chain_rules(node_ns, f"weft-tw-{iface}"), "the reconcile run's ingress chain is there"


def test_unknown_pod_is_closed_only_where_a_policy_might_apply(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER + [policy("guarded", "deny", DENY_INGRESS)])
    guarded = add(node_ns, node.state_dir, "guarded", "newcomer")
    opened = add(node_ns, node.state_dir, "open", "newcomer")
    assert [r.endswith("-j DROP") for r in chain_rules(node_ns, f"weft-tw-{guarded}")] == [True]
    assert chain_rules(node_ns, f"weft-fw-{guarded}") == [], "no egress policy in its namespace: open"
    assert chain_rules(node_ns, f"weft-tw-{opened}") == [] and chain_rules(node_ns, f"weft-fw-{opened}") == []
    for iface in (guarded, opened):
        assert sum(f"-i {iface} " in r for r in chain_rules(node_ns, "weft-from-wl-dispatch")) == 1
        assert sum(f"-o {iface} " in r for r in chain_rules(node_ns, "weft-to-wl-dispatch")) == 1
    # a dispatch chain still ends in the fail-closed DROP
    assert chain_rules(node_ns, "weft-from-wl-dispatch")[-1].endswith("-j DROP")


def test_known_pod_gets_its_exact_policy_when_its_chains_exist(node_ns, tmp_path):
    """A pod the snapshot knows (labels) whose policy chains exist gets the full run's chain."""
    allow = {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {}}]}]}
    node = applied(node_ns, tmp_path, CLUSTER + [policy("guarded", "allow", allow)])
    iface = host_iface_name("guarded", "known")
    expected = chain_rules(node_ns, f"weft-tw-{iface}")
    remove = endpoint_call(node_ns, node.state_dir, f"remove_endpoint(Path({str(node.state_dir)!r}), {iface!r})")
    assert remove.returncode == 0, remove.stderr
    assert chain_rules(node_ns, f"weft-tw-{iface}") == []
    add(node_ns, node.state_dir, "guarded", "known")
    assert chain_rules(node_ns, f"weft-tw-{iface}") == expected
    node.weft("apply", from_dir=tmp_path / "src")           # the next run: only dispatch order changes
    node.weft("drift", from_dir=tmp_path / "src", expect=0)


def test_remove_is_idempotent_and_leaves_no_trace(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER)
    before = node.state()
    iface = add(node_ns, node.state_dir, "open", "gone")
    for _ in range(2):
        proc = endpoint_call(node_ns, node.state_dir, f"remove_endpoint(Path({str(node.state_dir)!r}), {iface!r})")
        assert proc.returncode == 0, proc.stderr
    assert node.state() == before


def test_first_pod_on_a_node_where_weft_never_ran_gets_the_base_chains(node_ns, tmp_path):
    state = tmp_path / "state"
    iface = add(node_ns, state, "any", "first")
    rules = chain_rules(node_ns, "FORWARD")
    assert len([r for r in rules if "-j weft-FORWARD" in r]) == 1
    assert chain_rules(node_ns, f"weft-tw-{iface}")[-1].endswith("-j DROP"), "nothing known: closed"


def test_pods_added_at_once_are_each_dispatched_once(node_ns, tmp_path):
    node = applied(node_ns, tmp_path, CLUSTER)
    names = [f"p{i}" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        ifaces = list(pool.map(lambda n: add(node_ns, node.state_dir, "open", n), names))
    dispatch = chain_rules(node_ns, "weft-from-wl-dispatch")
    for iface in ifaces:
        assert sum(f"-i {iface} " in r for r in dispatch) == 1
    assert dispatch[-1].endswith("-j DROP")


CACHED = """
import json
from pathlib import Path
from weft.reconciler import endpoint
from weft.model.names import host_iface_name
state = Path({state!r})
listings = []
real = endpoint._dispatch_listings


def counting(runner, backend, families):
    listings.extend((f, chain) for f in families for chain in ("from", "to"))
    return real(runner, backend, families)


endpoint._dispatch_listings = counting
cache = endpoint.DispatchCache()
out = {{"v6": endpoint.has_ipv6()}}
a, b = host_iface_name("open", "a"), host_iface_name("open", "b")
endpoint.add_endpoints(state, [(a, "open", "a", ("198.18.0.10",))], cache)
out["first"] = len(listings)
endpoint.add_endpoints(state, [(b, "open", "b", ("198.18.0.11",))], cache)
endpoint.remove_endpoints(state, [(b,)], cache)
out["then"] = len(listings)
{between}
listings.clear()
endpoint.{step}
out["after"] = len(listings)
print(json.dumps(out))
"""


def _cached(ns, state_dir, between: str, step: str) -> dict:
    import json
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                           CACHED.format(state=str(state_dir), between=between, step=step)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_process_lists_the_dispatch_chains_only_when_the_ruleset_changed(node_ns, tmp_path):
    """The CNI helper remembers the dispatch chains with nf_tables' generation: while nothing
    else committed, a policy step is one iptables-restore, without listing."""
    node = applied(node_ns, tmp_path, CLUSTER)
    a = host_iface_name("open", "a")
    seen = _cached(node_ns, node.state_dir, "", f"add_endpoints(state, [({host_iface_name('open', 'c')!r}, 'open', "
                                                "'c', ('198.18.0.12',))], cache)")
    # an IPv4 pod's steps list the IPv4 chains once; a removal looks in both families (IPv6's once)
    assert (seen["first"], seen["then"], seen["after"]) == (2, 4 if seen["v6"] else 2, 0), seen
    assert sum(f"-i {a} " in r for r in chain_rules(node_ns, "weft-from-wl-dispatch")) == 1


@pytest.mark.parametrize("change", ["dispatch rules removed", "dispatch rules added"])
def test_a_change_made_by_anyone_else_is_listed_again(node_ns, tmp_path, change):
    """Whoever commits in between (a reconcile run, another plugin process, an admin), the next
    step lists again: the pod whose rules went is dispatched again, the pod whose rules came is
    removed whole."""
    node = applied(node_ns, tmp_path, CLUSTER)
    a, d = host_iface_name("open", "a"), host_iface_name("open", "d")
    if change == "dispatch rules removed":
        between = (f"import subprocess\nfor flag, chain, kind in (('-i', 'weft-from-wl-dispatch', 'fw'), "
                   f"('-o', 'weft-to-wl-dispatch', 'tw')):\n"
                   f"    subprocess.run(['iptables-nft', '-D', chain, flag, {a!r}, '-m', 'comment', '--comment', "
                   f"'weft:cni', '-g', f'weft-{{kind}}-{a}'], check=True)")
        step = f"add_endpoints(state, [({a!r}, 'open', 'a', ('198.18.0.10',))], cache)"
    else:
        between = (f"import subprocess\nsubprocess.run(['iptables-nft-restore', '--noflush'], check=True, input="
                   f"b'*filter\\n:weft-fw-{d} - [0:0]\\n:weft-tw-{d} - [0:0]\\n"
                   f"-I weft-from-wl-dispatch 1 -i {d} -g weft-fw-{d}\\n"
                   f"-I weft-to-wl-dispatch 1 -o {d} -g weft-tw-{d}\\nCOMMIT\\n')")
        step = f"remove_endpoints(state, [({d!r},)], cache)"
    seen = _cached(node_ns, node.state_dir, between, step)
    families = 2 if seen["v6"] and change == "dispatch rules added" else 1     # a removal looks in both
    assert seen["after"] == 2 * families, f"the change was not seen: {seen}"
    dispatch = chain_rules(node_ns, "weft-from-wl-dispatch") + chain_rules(node_ns, "weft-to-wl-dispatch")
    assert sum(f" {a} " in r for r in dispatch) == 2, dispatch
    assert not [r for r in dispatch if f" {d} " in r] and f":weft-fw-{d} " not in iptables_save(node_ns, "nft")
