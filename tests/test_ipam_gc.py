"""`weft ipam-gc` in whichever of Calico's groups serves the IPAM kinds (reconciler/ipam_gc.py).

Calico's newer CRD mode serves IPAMBlock and BlockAffinity in projectcalico.org/v3 only: there
the job must find them by API discovery, as the node's reads and the CNI's claims do, and mark
and release them there (it used to list crd.projectcalico.org/v1 only: a 404, so nothing).
"""
from __future__ import annotations

import argparse
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from tests.kubeapi import FakeKubeAPI
from weft.desired.api import connect
from weft.reconciler import ipam_gc

V3 = "projectcalico.org/v3"
T0 = 1_800_000_000.0


def _name(cidr: str) -> str:
    return cidr.replace(".", "-").replace("/", "-")


def block(cidr: str, node: str, api_version: str = V3) -> dict:
    return {"apiVersion": api_version, "kind": "IPAMBlock", "metadata": {"name": _name(cidr)},
            "spec": {"cidr": cidr, "affinity": f"host:{node}"}}


def affinity(cidr: str, node: str, api_version: str = V3) -> dict:
    return {"apiVersion": api_version, "kind": "BlockAffinity", "metadata": {"name": f"{node}-{_name(cidr)}"},
            "spec": {"cidr": cidr, "node": node, "state": "confirmed", "deleted": "false"}}


def gc(api: FakeKubeAPI, tmp_path: Path, now: float, *extra: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="weft")
    ipam_gc.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ipam-gc", "--kubeconfig", api.write_kubeconfig(tmp_path / "kubeconfig"),
                              "--grace-period", "15m", *extra])
    out = io.StringIO()
    with redirect_stdout(out):
        code = ipam_gc.run(args, now=now)
    return code, out.getvalue()


def test_ipam_gc_marks_and_releases_in_projectcalico_v3_when_only_it_serves_ipam(tmp_path):
    objects = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "live"}},
               block("198.18.1.0/26", "gone"), affinity("198.18.1.0/26", "gone"),
               block("198.18.2.0/26", "live"), affinity("198.18.2.0/26", "live")]
    with FakeKubeAPI(objects, crds=False) as api:
        def marks(plural: str) -> dict:
            with connect(api.write_kubeconfig(tmp_path / "kc")) as c:
                items = c.request("GET", f"/apis/{V3}/{plural}")["items"]
            return {i["metadata"]["name"]: (i["metadata"].get("annotations") or {}).get(ipam_gc.MARK)
                    for i in items}

        code, out = gc(api, tmp_path, T0)
        assert code == 0 and "marked IPAMBlock 198-18-1-0-26" in out and "marked BlockAffinity" in out, out
        assert marks("ipamblocks") == {"198-18-1-0-26": "2027-01-15T08:00:00Z", "198-18-2-0-26": None}
        code, out = gc(api, tmp_path, T0 + 900, "--output", "json")
        assert code == 0
        assert [(r["kind"], r["name"]) for r in json.loads(out)["release"]] == [
            ("BlockAffinity", "gone-198-18-1-0-26"), ("IPAMBlock", "198-18-1-0-26")]
        assert marks("ipamblocks") == {"198-18-2-0-26": None}
        assert marks("blockaffinities") == {"live-198-18-2-0-26": None}
        changes = [(m, p) for m, p in api.requests if m in ("PUT", "DELETE")]
        assert changes and all(p.startswith(f"/apis/{V3}/") for _m, p in changes)
        assert not [p for _m, p in api.requests if p.startswith("/apis/crd.projectcalico.org/v1/")]


def test_ipam_gc_prefers_calicos_crds_where_both_groups_serve_ipam(tmp_path):
    """Where both groups serve them (Calico's API server over its CRDs), the CRDs are what
    Calico itself keeps: the job reads and changes those, as the CNI's claims do."""
    objects = [block("198.18.1.0/26", "gone", "crd.projectcalico.org/v1"),
               block("198.18.1.0/26", "gone"), affinity("198.18.3.0/26", "gone")]
    with FakeKubeAPI(objects, crds=False) as api:
        code, out = gc(api, tmp_path, T0, "--dry-run", "--output", "json")
    assert code == 0
    assert [(r["kind"], r["name"]) for r in json.loads(out)["mark"]] == [("IPAMBlock", "198-18-1-0-26"),
                                                                         ("BlockAffinity", "gone-198-18-3-0-26")]
    listed = [p.partition("?")[0] for m, p in api.requests if "ipamblocks" in p]
    assert listed == ["/apis/crd.projectcalico.org/v1/ipamblocks"]


def test_ipam_gc_on_a_cluster_serving_no_ipam_kinds_has_nothing_to_release(tmp_path):
    with FakeKubeAPI([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "live"}}], crds=False) as api:
        code, out = gc(api, tmp_path, T0)
    assert code == 0 and "Nothing to release" in out
    assert not [p for _m, p in api.requests if "ipamblocks" in p or "blockaffinities" in p]
