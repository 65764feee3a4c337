"""A reconcile run and the CNI plugin on one node at once (#9.2), on a real kernel.

The run reads the desired state before it takes the node lock, and holds the lock only for its
kernel work: a silent API server never holds up a pod's start. And it judges only what it
changed: pods the plugin adds while it applies are not "unexpected" state.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cninode import block, entered
from tests.cninode import node as node  # noqa: F401,PLC0414  (the fixture: a CniNode)
from tests.cninode import plugin_binary as plugin_binary  # noqa: F401,PLC0414  (its fixture)
from tests.nodens import WeftNode, describe, in_ns, namespace, pod, policy, start_weft, usable

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")


@contextlib.contextmanager
def black_hole(ns: str):
    """An API server address inside `ns` that accepts connections and never answers."""
    with entered(ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def kubeconfig(path, port: int):
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def test_a_silent_api_server_does_not_hold_up_a_pods_start(node, tmp_path):  # noqa: F811
    node.write([block("198.18.4.0/26"), namespace("x")])
    WeftNode(node.ns, node.state_dir).weft("apply", from_dir=node.manifests)
    with black_hole(node.ns) as port:
        run = start_weft(node.ns, "apply", "--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", port)),
                         state_dir=node.state_dir)
        try:
            time.sleep(1.0)                  # the run is waiting for the API server now
            assert run.poll() is None, "the run should be waiting for the silent API server"
            started = time.monotonic()
            node.add("first")
            took = time.monotonic() - started
            assert run.poll() is None, "the run ended before the ADD: the test proves nothing"
            assert took < 15, f"ADD waited {took:.1f}s for a run that waits for its API server"
        finally:
            stop(run)
    assert node.weft_routes().count("dev weft") == 1


def test_an_apply_while_pods_are_added_judges_only_what_it_changed(node, tmp_path):  # noqa: F811
    """20 ADDs while an apply runs that changes chains, sets and routes: the apply succeeds (its
    read-back looks only at what it touched), every ADD succeeds, and the next run converges."""
    node.write([block("198.18.4.0/26"), namespace("x")])
    weft = WeftNode(node.ns, node.state_dir)
    weft.weft("apply", from_dir=node.manifests)
    early = [node.add(f"early{i}") for i in range(3)]
    for ip in early:                                                # drift the apply must repair
        in_ns(node.ns, "ip", "route", "del", f"{ip}/32", "proto", "201")
    remote = [pod("x", f"r{i}", f"198.18.9.{i + 1}", {"app": f"a{i % 7}"}, node="n2") for i in range(200)]
    policies = [policy("x", f"p{i}", {"podSelector": {}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": f"a{i % 7}"}}}], "ports": [{"port": 1000 + i}]}]})
        for i in range(60)]
    node.write([block("198.18.4.0/26"), namespace("x"), *remote, *policies])
    names = [f"late{i:02d}" for i in range(20)]
    for name in names:
        node.pod_ns(name)

    def add(i: int) -> tuple:
        time.sleep(0.15 * i)                 # spread over the whole run: during its read, apply and read-back
        return node.call(node.env("ADD", names[i]))

    apply = start_weft(node.ns, "apply", "--output", "json", state_dir=node.state_dir, from_dir=node.manifests)
    with ThreadPoolExecutor(len(names)) as pool:
        added = list(pool.map(add, range(len(names))))
    out, err = apply.communicate(timeout=120)
    assert apply.returncode == 0, describe(subprocess.CompletedProcess(apply.args, apply.returncode, out, err))
    report = json.loads(out)
    assert report["summary"]["add"] > 0 and any(c.startswith("netlink route replace") for c in report["commands"])
    assert [code for code, _, _ in added] == [0] * len(names), [e for code, _, e in added if code]

    weft.weft("apply", from_dir=node.manifests)
    weft.weft("drift", from_dir=node.manifests, expect=0)
    routes = node.weft_routes()
    assert routes.count("dev weft") == len(names) + len(early)
    assert all(f"{ip} dev" in routes for ip in early)
