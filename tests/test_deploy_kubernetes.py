"""The Kubernetes side of deployment: the RBAC role is exactly what weft's code asks for, every
manifest is valid against the schemas the `kubernetes` package's models imply, the per-node
CronJobs match their generator, the fleet drift report, IPAM GC against FakeKubeAPI, `weft version`.
"""
from __future__ import annotations

import argparse
import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from kubernetes import client

import weft.cni.claims
import weft.desired.api
import weft.desired.kinds.bgp
from tests.kubeapi import FakeKubeAPI
from weft.reconciler import ipam_gc, nodejobs, version

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "playbooks" / "kubernetes"
WEFT = Path(weft.desired.api.__file__).resolve().parents[1]          # the installed weft package
CALICO = "crd.projectcalico.org"
CALICO_GROUPS = (CALICO, "projectcalico.org")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


# --- RBAC: every API call in weft's code, and the role ----------------------------------------

# Every call site of the API client in weft's code (file, method, path expression) and the
# permissions it needs. A new call site fails the test until it is added here and to the role.
RESOURCE_LIST, RESOURCE_WATCH = "every kind of desired/api.RESOURCES", "watch RESOURCES"
CALL_SITES = {
    ("desired/api.py", "GET", "path"): RESOURCE_LIST,                                   # list_kind
    ("desired/api.py", "GET", "resource.path()"): RESOURCE_WATCH,                       # watch_since
    ("desired/api.py", "GET", '"/api/v1/namespaces"'): {("", "namespaces", "list")},    # limit=1
    ("desired/kinds/bgp.py", "GET", 'f"/api/v1/namespaces/{ns}/secrets/{name}"'): "secrets",
    # block claims, in whichever of Calico's groups serves the IPAM kinds
    ("cni/claims.py", "GET", 'f"/apis/{version}/ipamblocks"'): {(g, "ipamblocks", "list") for g in CALICO_GROUPS},
    ("cni/claims.py", "POST", "blocks"): {(g, "ipamblocks", "create") for g in CALICO_GROUPS},
    ("cni/claims.py", "GET", 'f"{blocks}/{block_name(cidr)}"'): {(g, "ipamblocks", "get") for g in CALICO_GROUPS},
    ("cni/claims.py", "POST", 'f"/apis/{version}/blockaffinities"'): {(g, "blockaffinities", "create")
                                                                     for g in CALICO_GROUPS},
    # the plugin's own read of pools, blocks, its node (by fieldSelector) and its pods
    ("cni/nodesource.py", "GET", "path"): {("", "pods", "list"), ("", "nodes", "list"),
                                           *((g, plural, "list") for g in CALICO_GROUPS
                                             for plural in ("ippools", "ipamblocks", "blockaffinities"))},
}
# Modules that talk to the API server with their own identity, not the node's.
OTHER_IDENTITIES = {"reconciler/ipam_gc.py", "reconciler/nodejobs.py"}
_CALL = re.compile(r"(?:\b(?!self\b)(\w+)\.(?:request|open)\(|\b_request\(api, node, \"\w+\",)\s*"
                   r"\"(GET|POST|PUT|PATCH|DELETE)\",\s*((?:f?\"[^\"]*\")|[\w.()]+)")


def _call_sites() -> set[tuple[str, str, str]]:
    found = set()
    for path in WEFT.rglob("*.py"):
        rel = str(path.relative_to(WEFT))
        if rel in OTHER_IDENTITIES:
            continue
        for m in _CALL.finditer(path.read_text()):
            found.add((rel, m.group(2), m.group(3)))
    return found


def _needed() -> set[tuple[str, str, str]]:
    need = set()
    for grants in CALL_SITES.values():
        if grants == RESOURCE_LIST or grants == RESOURCE_WATCH:
            verb = "list" if grants == RESOURCE_LIST else "watch"
            for r in weft.desired.api.RESOURCES:
                group = "" if r.api_version == "v1" else r.api_version.split("/")[0]
                need.add((group, r.plural, verb))
        elif grants != "secrets":
            need |= grants
    # Reading tiered policies through Calico's API server also needs its pseudo-resources.
    return need | set(weft.desired.api.TIERED_POLICY_GRANTS)


def test_calico_kinds_are_read_from_both_calico_groups():
    calico = [r for r in weft.desired.api.RESOURCES if r.crd]
    by_group: dict[str, set[str]] = {}
    for r in calico:
        by_group.setdefault(r.api_version, set()).add(r.kind)
    assert set(by_group) == {f"{CALICO}/v1", "projectcalico.org/v3"}
    assert by_group[f"{CALICO}/v1"] == by_group["projectcalico.org/v3"] == {
        "GlobalNetworkPolicy", "NetworkPolicy", "Tier", "GlobalNetworkSet", "NetworkSet", "HostEndpoint",
        "FelixConfiguration", "IPPool", "IPAMBlock", "BlockAffinity", "BGPConfiguration", "BGPPeer"}
    core = {(r.api_version, r.kind) for r in weft.desired.api.RESOURCES if not r.crd}
    assert ("v1", "ServiceAccount") in core


def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert "*" not in (g, r, v), rule
                    out.add((g, r, v))
    return out


def test_every_api_call_in_weft_is_known():
    assert _call_sites() == set(CALL_SITES), (
        "weft's code calls the API server somewhere new (or no longer somewhere): add the call to "
        "CALL_SITES with the permission it needs, and to playbooks/kubernetes/rbac.yaml")
    assert weft.cni.claims.BLOCKS_PATH == f"/apis/{CALICO}/v1/ipamblocks"
    assert weft.cni.claims.AFFINITIES_PATH == f"/apis/{CALICO}/v1/blockaffinities"


def test_the_node_role_grants_exactly_what_weft_uses():
    docs = _docs("rbac.yaml") + _docs("rbac-calico-system.yaml")
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert _grants(role["rules"]) == _needed()
    # The Secrets of BGP passwords: get, only in the namespaces weft looks in, bound to weft-node.
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == set(weft.desired.kinds.bgp.SECRET_NAMESPACES)
    for r in roles.values():
        assert _grants(r["rules"]) == {("", "secrets", "get")}
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert len(bindings) == 3
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "weft-node", "namespace": "weft-system"}]
        assert b["roleRef"]["name"] in ("weft-node", "weft-node-bgp-secrets")


def test_the_ipam_gc_role_is_what_ipam_gc_uses():
    (role,) = [d for d in _docs("ipam-gc.yaml") if d["kind"] == "ClusterRole"]
    source = (WEFT / "reconciler/ipam_gc.py").read_text()
    assert set(re.findall(r'api\.request\("(\w+)"', source)) == {"GET", "PUT", "DELETE"}
    assert _grants(role["rules"]) == {("", "nodes", "list"), ("", "pods", "list")} | {
        (g, r, v) for g in CALICO_GROUPS for r in ("ipamblocks", "blockaffinities")
        for v in ("list", "get", "update", "delete")}


# --- manifests, validated offline against the kubernetes package's models -------------------

def _model(api_version: str, kind: str) -> str:
    group_version = api_version.split("/")[-1]
    prefix = {"v1": "V1"}.get(group_version, group_version.capitalize())
    return prefix + kind


def _check(data, type_name: str, where: str) -> None:
    """`data` against the model `type_name`: no unknown field, the right JSON types, required fields."""
    type_name = re.sub(r"^List\[(.*)\]$", r"list[\1]", re.sub(r"^Dict\[(.*)\]$", r"dict(\1)", type_name))
    if type_name.startswith("list["):
        assert isinstance(data, list), f"{where}: a list expected"
        for i, item in enumerate(data):
            _check(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(data, dict), f"{where}: a map expected"
        value_type = type_name[5:-1].split(", ", 1)[1]
        for k, v in data.items():
            _check(v, value_type, f"{where}.{k}")
        return
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}
    if type_name in simple:
        assert isinstance(data, simple[type_name]) and not (type_name == "int" and isinstance(data, bool)), \
            f"{where}: {type_name} expected, got {data!r}"
        return
    if type_name == "object":
        return
    model = getattr(client, type_name)
    assert isinstance(data, dict), f"{where}: an object ({type_name}) expected"
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    unknown = set(data) - set(by_json)
    assert not unknown, f"{where}: fields unknown to {type_name}: {sorted(unknown)}"
    for key, value in data.items():
        _check(value, model.openapi_types[by_json[key]], f"{where}.{key}")
    # Required fields: the model's constructor refuses None for them.
    client.ApiClient()._ApiClient__deserialize(data, type_name)


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifests_are_valid_kubernetes_objects(name):
    docs = _docs(name)
    assert docs
    for doc in docs:
        _check(doc, _model(doc["apiVersion"], doc["kind"]), f"{name}: {doc['kind']} {doc['metadata']['name']}")


def test_the_crds_serve_every_calico_kind_weft_reads():
    """Calico's own CRDs (crd.projectcalico.org), for clusters without Calico: the v3 group is
    Calico's API server's (or its newer CRDs'), which a cluster without Calico does not need."""
    crds = {d["spec"]["names"]["kind"]: d for d in _docs("crds.yaml")}
    calico = [r for r in weft.desired.api.RESOURCES if r.crd and r.api_version == f"{CALICO}/v1"]
    assert set(crds) == {r.kind for r in calico}
    for r in calico:
        crd = crds[r.kind]
        group, version_name = r.api_version.split("/")
        assert crd["metadata"]["name"] == f"{r.plural}.{group}" and crd["spec"]["group"] == group
        assert crd["spec"]["names"]["plural"] == r.plural
        assert crd["spec"]["scope"] == ("Namespaced" if r.namespaced else "Cluster")
        (v,) = crd["spec"]["versions"]
        assert v["name"] == version_name and v["served"] and v["storage"]
        schema = v["schema"]["openAPIV3Schema"]
        # Structural, and Calico's newer fields are kept (not pruned) for any release's objects.
        assert schema["type"] == "object" and schema["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"]


def test_cronjobs_run_weft_commands_that_exist():
    for name in ("ipam-gc.yaml", "drift-report.yaml"):
        (job,) = [d for d in _docs(name) if d["kind"] == "CronJob"]
        command = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
        module = {"ipam-gc": ipam_gc, "node-jobs": nodejobs}[command[1]]
        parser = argparse.ArgumentParser(prog="weft")
        module.add_parser(parser.add_subparsers(dest="command", required=True))
        parser.parse_args(command[1:])
        assert job["spec"]["concurrencyPolicy"] == "Forbid"


# --- per-node CronJobs and the fleet drift report --------------------------------------------

def test_the_shipped_node_cronjobs_are_the_generators():
    assert _docs("node-cronjobs.yaml") == nodejobs.cronjobs(["node-1"], "weft:0.1.0")


def test_node_cronjobs_are_pinned_privileged_on_the_host_network_and_never_overlap():
    long_node = "n" * 60 + ".example.org"
    jobs = nodejobs.cronjobs(["node-1", long_node], "img")
    assert [j["metadata"]["name"] for j in jobs][:2] == ["weft-reconcile-node-1", "weft-drift-node-1"]
    assert all(len(j["metadata"]["name"]) <= 52 for j in jobs)
    assert len({j["metadata"]["name"] for j in jobs}) == 4
    assert len(nodejobs.job_name("drift", long_node + "x")) <= 52
    assert nodejobs.job_name("drift", long_node + "x") != nodejobs.job_name("drift", long_node)
    for job in jobs:
        spec = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
        assert spec["nodeName"] in ("node-1", long_node) and spec["hostNetwork"] is True
        assert spec["containers"][0]["securityContext"] == {"privileged": True}
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/var/lib/weft", "/sys/fs/bpf", "/run/xtables.lock"} <= mounts
        command = spec["containers"][0]["command"]
        assert command[command.index("--node") + 1] == spec["nodeName"]
    drift = jobs[1]["spec"]["jobTemplate"]["spec"]
    assert drift["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]


def _job(node: str, start: str, condition: tuple[str, str] | None) -> dict:
    status = {"startTime": start}
    if condition:
        status["conditions"] = [{"type": condition[0], "status": "True", "reason": condition[1]}]
    return {"metadata": {"name": f"weft-drift-{node}-{start[-2:]}", "labels": {
        "app.kubernetes.io/name": "weft", "app.kubernetes.io/component": "drift", "weft/node": node}},
        "status": status}


def test_the_fleet_report_takes_each_nodes_latest_drift_job():
    other = {"metadata": {"name": "x", "labels": {"app.kubernetes.io/name": "weft",
                                                  "app.kubernetes.io/component": "reconcile", "weft/node": "a"}},
             "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    data = nodejobs.summarise([
        _job("a", "2026-12-01T10:00:00Z", ("Failed", "PodFailurePolicy")),
        _job("a", "2026-12-01T10:15:00Z", ("Complete", "")),                 # latest: in sync
        _job("b", "2026-12-01T10:15:00Z", ("Failed", "PodFailurePolicy")),   # drift (exit 2)
        _job("c", "2026-12-01T10:15:00Z", ("Failed", "DeadlineExceeded")),   # could not check
        _job("d", "2026-12-01T10:15:00Z", None), other])
    assert {n["node"]: n["result"] for n in data["nodes"]} == {"a": "in-sync", "b": "drifted", "c": "failed",
                                                               "d": "running"}
    assert data["counts"] == {"in-sync": 1, "drifted": 1, "failed": 1, "running": 1}
    assert nodejobs.format_report(data).startswith("4 nodes: 1 in sync, 1 drifted, 1 could not be checked")


# --- IPAM GC -----------------------------------------------------------------------------------

def _block(cidr: str, node: str) -> dict:
    name = cidr.replace(".", "-").replace("/", "-")
    return {"apiVersion": f"{CALICO}/v1", "kind": "IPAMBlock", "metadata": {"name": name},
            "spec": {"cidr": cidr, "affinity": f"host:{node}"}}


def _affinity(cidr: str, node: str) -> dict:
    name = f"{node}-" + cidr.replace(".", "-").replace("/", "-")
    return {"apiVersion": f"{CALICO}/v1", "kind": "BlockAffinity", "metadata": {"name": name},
            "spec": {"cidr": cidr, "node": node, "state": "confirmed", "deleted": "false"}}


def test_ipam_gc_plan_waits_out_the_grace_period_and_spares_nodes_that_are_back():
    t0 = 1_800_000_000.0
    found = ipam_gc.items([_block("198.18.1.0/26", "gone"), _block("198.18.2.0/26", "live"),
                           _block("198.18.3.0/26", "pods-left"),
                           {"metadata": {"name": "no-affinity"}, "spec": {"cidr": "198.18.4.0/26"}},
                           "not an object"], [_affinity("198.18.1.0/26", "gone")])
    assert {(i.kind, i.node) for i in found} == {("IPAMBlock", "gone"), ("IPAMBlock", "live"),
                                                 ("IPAMBlock", "pods-left"), ("BlockAffinity", "gone")}
    first = ipam_gc.plan(found, {"live"}, {"pods-left"}, t0, 900)
    assert {(i.kind, i.node) for i in first.mark} == {("IPAMBlock", "gone"), ("BlockAffinity", "gone")}
    assert not first.release and not first.unmark
    marked = [ipam_gc.Item(i.kind, i.name, i.node, i.cidr, i.uid, i.resource_version, t0) for i in found]
    assert {i.node for i in ipam_gc.plan(marked, {"live"}, {"pods-left"}, t0 + 899, 900).waiting} == {"gone"}
    later = ipam_gc.plan(marked, {"live"}, {"pods-left"}, t0 + 900, 900)
    assert [(i.kind, i.node) for i in later.release] == [("BlockAffinity", "gone"), ("IPAMBlock", "gone")]
    assert {i.node for i in later.unmark} == {"live", "pods-left"}
    # A mark in the future (clock skew, or forged) does not shorten the wait: it starts again.
    future = [ipam_gc.Item(i.kind, i.name, i.node, i.cidr, i.uid, i.resource_version, t0 + 10_000) for i in found]
    assert not ipam_gc.plan(future, {"live"}, {"pods-left"}, t0, 900).release


def _gc(api: FakeKubeAPI, tmp_path: Path, now: float, *extra: str) -> tuple[int, str]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    parser = argparse.ArgumentParser(prog="weft")
    ipam_gc.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ipam-gc", "--kubeconfig", kubeconfig, "--grace-period", "15m", *extra])
    out = io.StringIO()
    with redirect_stdout(out):
        code = ipam_gc.run(args, now=now)
    return code, out.getvalue()


def test_ipam_gc_releases_a_deleted_nodes_blocks_through_the_api(tmp_path):
    t0 = 1_800_000_000.0
    objects = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "live"}},
               _block("198.18.1.0/26", "gone"), _affinity("198.18.1.0/26", "gone"),
               _block("198.18.2.0/26", "live"), _affinity("198.18.2.0/26", "live")]
    with FakeKubeAPI(objects) as api:
        def names(kind):
            plural = {"IPAMBlock": "ipamblocks", "BlockAffinity": "blockaffinities"}[kind]
            items = api_get(f"/apis/{CALICO}/v1/{plural}")["items"]
            return {i["metadata"]["name"]: (i["metadata"].get("annotations") or {}).get(ipam_gc.MARK)
                    for i in items}

        def api_get(path):
            from weft.desired.api import connect
            with connect(api.write_kubeconfig(tmp_path / "kc")) as c:
                return c.request("GET", path)

        code, out = _gc(api, tmp_path, t0, "--dry-run")
        assert code == 0 and "would mark IPAMBlock 198-18-1-0-26" in out
        assert names("IPAMBlock") == {"198-18-1-0-26": None, "198-18-2-0-26": None}       # dry run: nothing
        code, out = _gc(api, tmp_path, t0)
        assert code == 0 and "marked BlockAffinity gone-198-18-1-0-26" in out, out
        assert names("IPAMBlock") == {"198-18-1-0-26": "2027-01-15T08:00:00Z", "198-18-2-0-26": None}
        code, out = _gc(api, tmp_path, t0 + 600)
        assert "Nothing to release" in out and "2 orphaned objects inside" in out
        code, out = _gc(api, tmp_path, t0 + 900, "--output", "json")
        report = json.loads(out)
        assert [(r["kind"], r["name"]) for r in report["release"]] == [
            ("BlockAffinity", "gone-198-18-1-0-26"), ("IPAMBlock", "198-18-1-0-26")]
        assert names("IPAMBlock") == {"198-18-2-0-26": None}
        assert names("BlockAffinity") == {"live-198-18-2-0-26": None}
        deletes = [p for m, p in api.requests if m == "DELETE"]
        assert len(deletes) == 2 and "blockaffinities" in deletes[0]


# --- weft version ------------------------------------------------------------------------------

def test_weft_version_names_weft_and_the_data_plane_tools():
    data = version.collect()
    assert data["weft"] == __import__("importlib.metadata").metadata.version("weft")
    tools = {t["name"]: t for t in data["tools"]}
    assert set(tools) == {"iptables", "ipset", "ip", "bird", "bpftool", "bcc"}
    assert tools["iptables"]["found"] and tools["iptables"]["backend"] in ("nft", "legacy")
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", tools["iptables"]["version"])
    assert tools["bird"]["found"] and tools["bird"]["version"].startswith("2.")
    text = version.format_text(data)
    assert text.startswith(f"weft {data['weft']}\n") and "backend)" in text
