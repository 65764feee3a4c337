"""desired.kube against a real HTTP server speaking the Kubernetes API (FakeKubeAPI), or a real cluster.

Tests taking `kube_source` also run against the cluster named by $KUBECONFIG; the others need
the fake's fault injection or request log and build their own FakeKubeAPI.
"""
from __future__ import annotations

import http.client
import json
import threading
from collections import Counter

import pytest
from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from tests.kubeapi import FakeKubeAPI
from weft.desired.api import CALICO_API_VERSION, RESOURCES, ApiError, configuration, connect, load_objects
from weft.model.errors import SourceError

NEVER = "weft-test == 'never'"   # Calico selector matching nothing: harmless on a live cluster


def namespace(name):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod(name, ns="ns1", node="weft-test-node"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]}}


def manifest(kind: str, api_version: str, ns: str, tag: str) -> dict:
    """One valid object of each kind weft reads, chosen to do nothing on a live cluster."""
    node = f"weft-test-node-{tag}"
    calico = {
        "GlobalNetworkPolicy": {"selector": NEVER, "order": 100, "ingress": [{"action": "Allow"}]},
        "NetworkPolicy": {"selector": NEVER, "ingress": [{"action": "Deny"}]},
        "GlobalNetworkSet": {"nets": ["198.18.9.0/24"]},
        "NetworkSet": {"nets": ["198.18.10.0/24"]},
        "IPPool": {"cidr": "198.18.64.0/18", "blockSize": 26, "disabled": True, "nodeSelector": "!all()"},
        "IPAMBlock": {"cidr": "198.18.64.0/26", "affinity": f"host:{node}", "allocations": [None] * 64,
                      "unallocated": list(range(64)), "attributes": [], "strictAffinity": False},
        "BlockAffinity": {"node": node, "cidr": "198.18.64.0/26", "state": "confirmed", "deleted": "false"},
        "BGPConfiguration": {"asNumber": 64512},
        "BGPPeer": {"peerIP": "198.18.0.254", "asNumber": 64513, "nodeSelector": "!all()"},
        "HostEndpoint": {"node": node, "interfaceName": "eth0", "expectedIPs": ["198.18.0.10"]},
        "Tier": {"order": 500, "defaultAction": "Pass"},
        "FelixConfiguration": {"logPrefix": "weft-test"},     # not "default" nor "node.<name>": no effect
    }
    spec = calico[kind] if "projectcalico.org/" in api_version else {
        "Node": {"podCIDR": "198.18.5.0/24"},
        "Pod": pod("x", node=node)["spec"],   # status: see below
        "NetworkPolicy": {"podSelector": {}, "policyTypes": ["Ingress"]},
        "ServiceAccount": {},
        "Service": {"ports": [{"port": 80, "protocol": "TCP"}], "selector": {"weft-test": "never"}},
        "EndpointSlice": None,
    }[kind]
    name = f"node.{node}" if kind == "BGPConfiguration" else f"weft-test-{kind.lower()}-{tag}"
    if kind == "EndpointSlice":     # its fields are top-level, not a spec
        return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "addressType": "IPv4",
                "endpoints": [], "ports": []}
    obj = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec}
    if kind == "Pod":   # weft needs pod IPs, which only the status carries
        obj["status"] = {"phase": "Running", "podIP": "198.18.1.5", "podIPs": [{"ip": "198.18.1.5"}]}
    return obj


def key(obj):
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]


@pytest.fixture
def fake(tmp_path):
    """A bare FakeKubeAPI with a namespace and 7 pods, and its kubeconfig."""
    with FakeKubeAPI([namespace("ns1")] + [pod(f"p{i}") for i in range(7)], max_page=2) as api:
        api.kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        yield api


# --- reading every kind ------------------------------------------------------------------------

@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: f"{r.api_version}/{r.kind}")
def test_each_kind_comes_back_shaped_like_a_manifest(kube_source, resource):
    if resource.kind == "Namespace":
        stored = kube_source.api.request("GET", f"/api/v1/namespaces/{kube_source.namespace}")
    else:
        stored = kube_source.create(manifest(resource.kind, resource.api_version, kube_source.namespace,
                                             kube_source.namespace[-8:]))
    objects = load_objects(kube_source.kubeconfig)

    assert all(list(o)[:2] == ["apiVersion", "kind"] for o in objects)
    found = {key(o): o for o in objects}[key(stored)]
    assert found["metadata"]["uid"] == stored["metadata"]["uid"]
    assert found.get("spec") == stored.get("spec")
    if resource.kind == "Pod":
        assert found["status"]["podIP"] == "198.18.1.5"


def test_sequential_and_concurrent_reads_agree(kube_source):
    for i in range(3):
        kube_source.create(pod(f"p{i}", kube_source.namespace))

    def mine(objects):
        return [o for o in objects if o["metadata"].get("namespace") == kube_source.namespace]
    sequential = mine(load_objects(kube_source.kubeconfig, concurrent=False))
    assert len(sequential) == 3 and sequential == mine(load_objects(kube_source.kubeconfig))


# --- pagination --------------------------------------------------------------------------------

def test_small_pages_return_every_object_once(kube_source):
    for i in range(7):
        kube_source.create(pod(f"p{i}", kube_source.namespace))
    objects = load_objects(kube_source.kubeconfig, page_size=2)

    assert not [k for k, n in Counter(map(key, objects)).items() if n > 1]
    mine = sorted(o["metadata"]["name"] for o in objects
                  if o["kind"] == "Pod" and o["metadata"]["namespace"] == kube_source.namespace)
    assert mine == [f"p{i}" for i in range(7)]


def test_server_page_cap_is_followed_with_continue_tokens(fake):
    objects = load_objects(fake.kubeconfig, page_size=500)

    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Pod"] == [f"p{i}" for i in range(7)]
    pod_requests = [path for method, path in fake.requests if path.startswith("/api/v1/pods?")]
    assert len(pod_requests) == 4 and sum("continue=" in p for p in pod_requests) == 3


def test_continued_list_is_a_consistent_snapshot(fake):
    """Objects changed between pages show as they were when the list began, as on a real server."""
    with connect(fake.kubeconfig) as api:
        first = api.request("GET", "/api/v1/pods", query=[("limit", 2)])
        fake.delete("Pod", "ns1", "p5")
        fake.put(pod("p9"))
        names = [p["metadata"]["name"] for p in first["items"]]
        token = first["metadata"]["continue"]
        while token:
            page = api.request("GET", "/api/v1/pods", query=[("limit", 2), ("continue", token)])
            assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
            names += [p["metadata"]["name"] for p in page["items"]]
            token = page["metadata"].get("continue")
    assert names == [f"p{i}" for i in range(7)]


def test_expired_continue_token_restarts_the_list(fake):
    expired = []

    def expire_once(method, path):
        if "continue=" in path and not expired:
            fake.put(pod("p9"))   # the relist must see the newer state
            fake.expire_continue_tokens()
            expired.append(path)
    fake.on_request = expire_once

    pods = [o["metadata"]["name"] for o in load_objects(fake.kubeconfig) if o["kind"] == "Pod"]

    assert pods == [f"p{i}" for i in range(7)] + ["p9"]
    pod_requests = [p for _, p in fake.requests if p.startswith("/api/v1/pods?")]
    assert "continue=" not in pod_requests[pod_requests.index(expired[0]) + 1]   # relisted from the start


def test_continue_tokens_that_keep_expiring_give_up(fake):
    fake.on_request = lambda method, path: "continue=" in path and fake.expire_continue_tokens()
    with pytest.raises(SourceError, match=r"listing Pod \(/api/v1/pods\).*expired 3 times"):
        load_objects(fake.kubeconfig)


# --- missing CRDs and errors ---------------------------------------------------------------------

def test_missing_calico_crds_are_skipped(tmp_path):
    pool = manifest("IPPool", CALICO_API_VERSION, "", "x")
    with FakeKubeAPI([namespace("ns1"), pod("a"), pool]) as api:
        objects = load_objects(api.write_kubeconfig(tmp_path / "kc"))
        assert sorted(o["kind"] for o in objects) == ["IPPool", "Namespace", "Pod"]
        assert ("GET", "/apis/crd.projectcalico.org/v1/globalnetworkpolicies?limit=500") in api.requests


def test_missing_builtin_resource_is_an_error(fake):
    fake.fail("GET /api/v1/nodes", 404, "NotFound", "the server could not find the requested resource")
    with pytest.raises(SourceError, match=r"listing Node \(/api/v1/nodes\).*HTTP 404 NotFound"):
        load_objects(fake.kubeconfig)


def test_wrong_credentials_are_reported(fake, tmp_path):
    kubeconfig = fake.write_kubeconfig(tmp_path / "bad", token="wrong")
    with pytest.raises(SourceError, match=r"HTTP 401 Unauthorized.*check the kubeconfig's credentials"):
        load_objects(kubeconfig)


@pytest.mark.parametrize("code, reason", [(403, "Forbidden"), (500, "InternalError")])
def test_server_errors_name_the_resource_and_status(fake, code, reason):
    fake.fail("GET /api/v1/pods", code, reason, "pods is forbidden: User \"weft\" cannot list resource")
    with pytest.raises(SourceError) as failure:
        load_objects(fake.kubeconfig)
    message = str(failure.value)
    assert f"listing Pod (/api/v1/pods) from {fake.url}: HTTP {code} {reason}: pods is forbidden" in message


def test_unreachable_server(tmp_path):
    with FakeKubeAPI() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kc")
    with pytest.raises(SourceError, match=f"no answer from the API server at {api.url}"):
        load_objects(kubeconfig)


# --- finding the kubeconfig --------------------------------------------------------------------

def test_kubeconfig_from_env_list(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{fake.kubeconfig}")
    assert len([o for o in load_objects() if o["kind"] == "Pod"]) == 7


def test_kubeconfig_from_home(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    fake.write_kubeconfig((tmp_path / ".kube").mkdir() or tmp_path / ".kube" / "config")
    assert len([o for o in load_objects() if o["kind"] == "Pod"]) == 7


def test_no_configuration_anywhere(tmp_path, monkeypatch):
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SourceError, match=r"KUBECONFIG.*not set.*\.kube/config \(not found\).*in-cluster"):
        load_objects()


@pytest.mark.parametrize("problem", ["missing file", "unknown context"])
def test_bad_kubeconfig(fake, tmp_path, problem):
    path = str(tmp_path / "absent") if problem == "missing file" else fake.kubeconfig
    with pytest.raises(SourceError, match="cannot use kubeconfig"):
        load_objects(path, context="nope" if problem == "unknown context" else None)


# --- the fake's wire contract: watches and writes (also checked against a real cluster) ----------

def configmap(name, **data):
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def test_watch_streams_changes_after_a_resource_version(kube_source):
    """ConfigMaps, not pods: a real cluster deletes pods gracefully (MODIFIED first)."""
    ns, api = kube_source.namespace, kube_source.api
    kube_source.create(configmap("a"))
    since = api.request("GET", f"/api/v1/namespaces/{ns}/configmaps")["metadata"]["resourceVersion"]
    b = kube_source.create(configmap("b", v="1"))
    api.request("PUT", f"/api/v1/namespaces/{ns}/configmaps/b", body={**b, "data": {"v": "2"}})
    api.request("DELETE", f"/api/v1/namespaces/{ns}/configmaps/a")

    seen = []
    stream = watch.Watch()
    with kube_source.official_client() as official:
        for event in stream.stream(k8s.CoreV1Api(official).list_namespaced_config_map, ns, resource_version=since,
                                   timeout_seconds=10, _request_timeout=15):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 3:
                stream.stop()
    assert seen == [("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a")]


def test_watch_wire_format_is_chunked_json_lines_with_a_bookmark(fake):
    since = fake.resource_version
    fake.put(pod("new"))
    conn = http.client.HTTPConnection(fake.url.removeprefix("http://"), timeout=10)
    conn.request("GET", f"/api/v1/namespaces/ns1/pods?watch=true&resourceVersion={since}"
                        "&allowWatchBookmarks=true&timeoutSeconds=1",
                 headers={"Authorization": f"Bearer {fake.token}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    events = [json.loads(line) for line in response.read().splitlines()]
    conn.close()

    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [("ADDED", "new"),
                                                                                  ("BOOKMARK", None)]
    assert events[0]["object"]["kind"] == "Pod"   # watch events carry kind, unlike list items
    assert events[1]["object"]["metadata"]["resourceVersion"] == fake.resource_version


def test_watch_from_a_compacted_resource_version_is_expired(fake):
    since = fake.resource_version
    fake.put(pod("new"))
    fake.compact()
    with k8s.ApiClient(configuration(fake.kubeconfig)) as api, pytest.raises(ApiException) as expired:
        for _ in watch.Watch().stream(k8s.CoreV1Api(api).list_namespaced_pod, "ns1",
                                      resource_version=since, timeout_seconds=5):
            pass
    assert expired.value.status == 410 and "too old resource version" in expired.value.reason


def test_watch_ends_when_the_server_stops():
    """An open watch must not keep a test's server (or its thread) alive."""
    api = FakeKubeAPI().__enter__()
    conn = http.client.HTTPConnection(api.url.removeprefix("http://"), timeout=10)
    conn.request("GET", "/api/v1/pods?watch=1", headers={"Authorization": f"Bearer {api.token}"})
    response = conn.getresponse()
    stopper = threading.Timer(0.1, api.__exit__, (None, None, None))
    stopper.start()
    assert response.read() == b""
    stopper.join()


def test_create_twice_is_already_exists(kube_source):
    cm = configmap("once", a="1")
    kube_source.create(cm)
    with pytest.raises(ApiError) as conflict:
        kube_source.create(cm)
    assert conflict.value.status == 409 and json.loads(conflict.value.body)["reason"] == "AlreadyExists"


def test_update_with_a_stale_resource_version_conflicts(kube_source):
    api, path = kube_source.api, f"/api/v1/namespaces/{kube_source.namespace}/configmaps/cas"
    stale = kube_source.create(configmap("cas", owner="a"))
    fresh = api.request("PUT", path, body={**stale, "data": {"owner": "b"}})
    assert int(fresh["metadata"]["resourceVersion"]) > int(stale["metadata"]["resourceVersion"])

    with pytest.raises(ApiError) as conflict:
        api.request("PUT", path, body={**stale, "data": {"owner": "c"}})
    assert conflict.value.status == 409 and json.loads(conflict.value.body)["reason"] == "Conflict"
    assert api.request("GET", path)["data"] == {"owner": "b"}

    api.request("DELETE", path)
    with pytest.raises(ApiError) as gone:
        api.request("GET", path)
    assert gone.value.status == 404


def test_custom_resource_update_needs_a_resource_version(kube_source):
    created = kube_source.create(manifest("GlobalNetworkSet", CALICO_API_VERSION, "", kube_source.namespace[-8:]))
    path = f"/apis/{CALICO_API_VERSION}/globalnetworksets/{created['metadata']['name']}"
    unconditional = {**created, "metadata": {"name": created["metadata"]["name"]}}
    with pytest.raises(ApiError) as invalid:
        kube_source.api.request("PUT", path, body=unconditional)
    assert invalid.value.status == 422


def test_status_subresource_changes_only_status(kube_source):
    api, ns = kube_source.api, kube_source.namespace
    created = kube_source.create(pod("s", ns))
    path = f"/api/v1/namespaces/{ns}/pods/s/status"
    updated = api.request("PUT", path, body={**created, "spec": {}, "status": {"phase": "Running",
                                                                                "podIP": "198.18.1.9"}})
    assert updated["status"]["podIP"] == "198.18.1.9" and updated["spec"] == created["spec"]


def test_create_in_a_missing_namespace_is_not_found(kube_source):
    with pytest.raises(ApiError) as missing:
        kube_source.create({**configmap("x"), "metadata": {"name": "x", "namespace": "weft-test-absent"}})
    assert missing.value.status == 404


# --- one run's requests: connections kept, TLS sessions resumed -----------------------------------

def test_a_runs_watches_resume_the_tls_session_of_its_first_request(tmp_path):
    """Every watch of a run needs a connection of its own; over TLS, each resumes the session of
    the run's first request instead of a full handshake (certificates are checked once)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.kubeapi import TLSFiles
    from weft.desired.api import current_resource_version

    # HTTP/1.1 only: over HTTP/2 a run's watches share one connection (tests/test_api_http2.py).
    with FakeKubeAPI([namespace("ns1"), pod("a")], tls=TLSFiles.make(tmp_path / "tls"), http2=False) as fake:
        with connect(fake.write_kubeconfig(tmp_path / "kc")) as api:
            since = current_resource_version(api)
            fake.put(pod("b"))

            def watch(resource):
                response = api.open("GET", resource.path(), query=[("watch", "true"), ("resourceVersion", since),
                                                                   ("timeoutSeconds", 1)])
                try:
                    return response.connection.sock.session_reused, response.read()
                finally:
                    response.release_conn()

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(watch, [r for r in RESOURCES if not r.crd]))
    assert sum(reused for reused, _body in answers) >= 3     # one may take the first request's connection
    assert b'"name":"b"' in next(body for (reused, body), r in zip(answers, RESOURCES, strict=False)
                                 if r.kind == "Pod")


def test_lists_run_at_once_keep_their_connections(tmp_path):
    """Pages of lists run by several threads reuse the connections they opened."""
    with FakeKubeAPI([namespace("ns1")] + [pod(f"p{i}") for i in range(40)], max_page=2) as fake:
        load_objects(fake.write_kubeconfig(tmp_path / "kc"))
    assert len(fake.requests) > 30 and fake.connections <= 8
