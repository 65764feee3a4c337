"""What users install is what runs: the wheel, from any directory, not this checkout.

Tox and playbooks/setup.sh install weft as a wheel (never editable). These tests run the
installed `weft` console script with the working directory outside the checkout, so nothing can
be found relative to it: the lab on the built-in example (its manifests and the CNI plugin come
from the package), and a plan on a BGP node (BIRD's templates are package data, and `weft plan`
checks the rendered config with `bird -p`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import weft.reconciler
from tests.nodens import REPO, describe, node_ns, usable  # noqa: F401  (node_ns is a fixture)

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")

WEFT = Path(sys.executable).parent / "weft"


def test_weft_is_an_installed_wheel_not_the_checkout():
    installed = Path(weft.reconciler.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert installed.is_relative_to(site), f"weft imported from outside site-packages: {installed}"
    dist = next(metadata.distributions(name="weft", path=[str(site)]))     # not a build's weft.egg-info
    direct = dist.read_text("direct_url.json")
    assert not (direct and json.loads(direct).get("dir_info", {}).get("editable")), "an editable install"
    files = {str(f) for f in dist.files or ()}
    assert {"weft/bgp_config/bird.conf.j2", "weft/playbooks/example/cluster.yaml",
            "weft/renderers/bpf/policy.c", "weft/model/py.typed"} <= files
    top = {f.split("/")[0] for f in files if "/" in f} - {".."} - {f.split("/")[0] for f in files if ".dist-info/" in f}
    assert top == {"weft"}, f"generic top-level names installed into site-packages: {sorted(top - {'weft'})}"
    checkout_modules = {p.relative_to(REPO).with_suffix("").as_posix()
                        for d in ("model", "store", "desired", "renderers", "probes", "reconciler", "cni")
                        for p in (REPO / d).rglob("*.py")}
    wheel_modules = {f[len("weft/"):-3] for f in files if f.endswith(".py") and f.startswith("weft/")
                     and f.split("/")[1] in ("model", "store", "desired", "renderers", "probes", "reconciler", "cni")}
    assert wheel_modules == checkout_modules, "the wheel's modules differ from the checkout's (a stale build dir?)"


def test_lab_runs_from_another_directory(tmp_path):
    proc = subprocess.run([str(WEFT), "lab"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert "324 of 324 probes connected" in proc.stdout and "the lab is removed" in proc.stdout


def _bgp_node_manifests(directory: Path) -> Path:
    directory.mkdir()
    docs = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "annotations": {
            "projectcalico.org/IPv4Address": "198.18.0.1/24", "projectcalico.org/ASNumber": "64512"}}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-2", "annotations": {
            "projectcalico.org/IPv4Address": "198.18.0.2/24", "projectcalico.org/ASNumber": "64512"}}},
        {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "pool"},
         "spec": {"cidr": "198.18.4.0/22", "blockSize": 26}},
        {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "198-18-4-0-26"},
         "spec": {"cidr": "198.18.4.0/26", "affinity": "host:node-1"}},
    ]
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(docs))
    return directory


def test_bgp_plan_from_another_directory(node_ns, tmp_path):  # noqa: F811
    source = _bgp_node_manifests(tmp_path / "manifests")
    state = tmp_path / "state"
    argv = ["ip", "netns", "exec", node_ns, str(WEFT), "plan", "--from", str(source), "--node", "node-1",
            "--state-dir", str(state), "--output", "json"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, describe(proc)
    plan = json.loads(proc.stdout)
    text = json.dumps(plan["changes"])
    assert "Mesh_198_18_0_2" in text and "198.18.4.0/26" in text, "BIRD's config rendered from the packaged templates"
