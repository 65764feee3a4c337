"""What a no-op reconcile run imports: the heavy libraries only where the run needs them.

Lazy imports are a contract (issue #10), not folklore: a timer runs weft every minute on every
node, and a run that finds nothing to do should cost the kernel dumps, not the start-up of the
Kubernetes client, the eBPF toolchain, the template engine or the plan comparer. The CNI ADD
path has its own budget (tests/test_cni_entry.py)."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.nodens import NODE, namespace, node_ns, pod, policy, write_manifests

node_ns = node_ns  # the fixture

# Not needed by a no-op run from a manifest directory on an iptables node without BGP.
HEAVY = ("kubernetes", "urllib3", "bcc", "jinja2", "deepdiff", "hypothesis", "pyroute2")

RUN = """
import sys
from weft.reconciler.cli import main
code = main(sys.argv[1:])
print(repr((code, sorted(sys.modules))))
"""


def _run(ns: str, *argv: str) -> tuple[int, list[str]]:
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", RUN, *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip(), done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_a_no_op_run_imports_nothing_heavy(node_ns, tmp_path):
    source = write_manifests(tmp_path / "src", [
        namespace("x"), pod("x", "a", "198.18.0.10", {"app": "a"}),
        policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    common = ("--from", str(source), "--node", NODE, "--state-dir", str(tmp_path / "state"))
    code, _ = _run(node_ns, "apply", *common)
    assert code == 0
    code, modules = _run(node_ns, "apply", *common)
    assert code == 0
    assert [m for m in modules if m.split(".")[0] in HEAVY] == [], "a no-op run imported a heavy library"
    assert "weft.reconciler.engine" in modules, "the run did its work (the probe and the diff)"
    _run(node_ns, "apply", "--destroy", *common)
