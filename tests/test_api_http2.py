"""A run's watches share one HTTP/2 connection (desired.h2link), and miss nothing for it.

The usual run on a live cluster is "moved, nothing weft reads changed": it watches every kind
from its cursor until each goes quiet. Over HTTP/1.1 each of those watches needed a TLS
connection of its own (a watch ended early cannot give its connection back); over HTTP/2, which
kube-apiserver offers by ALPN, they are streams of one. FakeKubeAPI with TLS offers h2 as the
real server does and counts the TCP connections it accepts.
"""
from __future__ import annotations

import copy

import pytest

from tests.kubeapi import FakeKubeAPI, TLSFiles
from tests.nodens import namespace, pod, policy
from weft.desired import sources
from weft.desired.api import connect, watch_since
from weft.desired.discovery import Discovery
from weft.model.errors import SourceError

OBJECTS = [namespace("x"), namespace("y"), pod("x", "a", "198.18.5.1", {"app": "web"}),
           pod("y", "b", "198.18.5.2"), policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})]
# A quiet moved run: the version probe and every watch are streams of one HTTP/2 connection.
QUIET_RUN_CONNECTIONS = 1


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return TLSFiles.make(tmp_path_factory.mktemp("tls"))


def serve(tls, tmp_path, http2: bool = True, **options) -> FakeKubeAPI:
    fake = FakeKubeAPI(copy.deepcopy(OBJECTS), tls=tls, http2=http2, crds=True, **options)
    fake.__enter__()
    fake.kubeconfig = fake.write_kubeconfig(tmp_path / f"kubeconfig-{http2}")
    return fake


def run(fake: FakeKubeAPI, state_dir) -> tuple[sources.Reading, dict]:
    """One read as `weft apply` makes it (the reading child), and what it cost the server."""
    before = (len(fake.requests), fake.connections)
    reading = sources.read(state_dir, None, fake.kubeconfig)
    state = reading.state()
    if reading.dirty:
        sources.commit(state_dir, reading)
    asked = fake.requests[before[0]:]
    return reading, {"requests": len(asked), "connections": fake.connections - before[1],
                     "watches": sum("watch=true" in p for _m, p in asked),
                     "pods": sorted(e.key for e in state.endpoints)}


def lease(n: int) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": f"node-{n}", "namespace": "kube-node-lease"}, "spec": {"leaseDurationSeconds": n}}


def test_a_quiet_moved_run_uses_one_connection_not_one_per_kind(tls, tmp_path):
    figures = {}
    for http2 in (False, True):
        fake = serve(tls, tmp_path, http2)
        try:
            state_dir = tmp_path / f"state-{http2}"
            run(fake, state_dir)
            fake.put(lease(1))
            _, figures[http2] = run(fake, state_dir)
        finally:
            fake.__exit__(None, None, None)
    kinds = figures[True]["watches"]
    assert kinds >= 19 and figures[False]["watches"] == kinds
    # Before (and with a server without HTTP/2): one per watch, and the offer of h2 it declined.
    assert figures[False]["connections"] == kinds + 1, figures
    assert figures[True]["connections"] == QUIET_RUN_CONNECTIONS, figures     # now: one, shared
    assert figures[True]["requests"] == figures[False]["requests"] == kinds + 1


def test_changes_arrive_over_http2_and_match_a_full_read(tls, tmp_path):
    fake = serve(tls, tmp_path)
    try:
        run(fake, tmp_path / "s")
        fake.put(pod("y", "c", "198.18.5.3", {"app": "web"}))
        fake.delete("Pod", "x", "a")
        _, seen = run(fake, tmp_path / "s")
        assert seen["pods"] == ["y/b", "y/c"] and seen["connections"] <= QUIET_RUN_CONNECTIONS
        _, fresh = run(fake, tmp_path / "fresh")
        assert fresh["pods"] == seen["pods"]
    finally:
        fake.__exit__(None, None, None)


def test_an_event_in_flight_when_the_streams_went_quiet_is_found_by_the_next_run(tls, tmp_path):
    """No change is missed for sharing a connection: a write the watch cache has not delivered
    when a run's streams go quiet is read by the next run, even if the version never moves."""
    fake = serve(tls, tmp_path)
    try:
        run(fake, tmp_path / "s")
        fake.put(lease(1))
        with fake.watch_lag():
            fake.put(pod("x", "late", "198.18.5.7"))
            _, seen = run(fake, tmp_path / "s")
            assert "x/late" not in seen["pods"]
        _, seen = run(fake, tmp_path / "s")                  # the version did not move since
        assert "x/late" in seen["pods"] and seen["watches"]
    finally:
        fake.__exit__(None, None, None)


def test_a_compacted_history_over_http2_lists_that_kind_again(tls, tmp_path):
    fake = serve(tls, tmp_path)
    try:
        run(fake, tmp_path / "s")
        fake.put(pod("y", "c", "198.18.5.3"))
        fake.compact()
        _, seen = run(fake, tmp_path / "s")
        assert "y/c" in seen["pods"]
        assert any("/pods?" in p and "watch" not in p for _m, p in fake.requests[-seen["requests"]:]), "relisted"
    finally:
        fake.__exit__(None, None, None)


def test_a_refused_watch_over_http2_names_the_verb(tls, tmp_path):
    fake = serve(tls, tmp_path)
    try:
        with connect(fake.kubeconfig) as api:
            (pods,) = [r for r in Discovery(api, None).resources() if r.kind == "Pod"]
            fake.fail("watch=true", 403, "Forbidden", times=1)
            with pytest.raises(SourceError, match=r"HTTP 403 Forbidden.*needs `watch` on pods"):
                watch_since(api, pods, fake.resource_version)
            events, _at = watch_since(api, pods, "1")
            assert api.watch_session() is not None, "the watches used HTTP/2"
            assert {o["metadata"]["name"] for _t, o in events} >= {"a", "b"}
    finally:
        fake.__exit__(None, None, None)


def test_refused_credentials_on_the_http2_connection_fall_back_to_http1(tls, tmp_path):
    """A 401 on a stream: the watch is made again over HTTP/1.1, whose path renews credentials
    (a kept profile's token expired); later watches use HTTP/1.1 too."""
    fake = serve(tls, tmp_path)
    try:
        with connect(fake.kubeconfig) as api:
            (pods,) = [r for r in Discovery(api, None).resources() if r.kind == "Pod"]
            assert api.watch_session() is not None
            fake.fail("watch=true", 401, "Unauthorized", times=1)
            events, _at = watch_since(api, pods, "1")
            assert {o["metadata"]["name"] for _t, o in events} >= {"a", "b"}
            assert api.watch_session() is None
    finally:
        fake.__exit__(None, None, None)


def test_a_large_answer_comes_whole_through_the_flow_control_windows(tls, tmp_path):
    """Megabytes on one stream: the server sends as the window allows, weft gives the window
    back as it reads (no more than the window is ever held unread)."""
    fake = serve(tls, tmp_path)
    try:
        for n in range(40):
            fake.put(pod("x", f"big-{n}", f"198.18.6.{n + 1}") | {
                "metadata": {"name": f"big-{n}", "namespace": "x", "annotations": {"pad": "p" * 60_000}}})
        with connect(fake.kubeconfig) as api:
            (pods,) = [r for r in Discovery(api, None).resources() if r.kind == "Pod"]
            events, _at = watch_since(api, pods, "1", quiet=1.0)
            assert api.watch_session() is not None
        assert sum(1 for _t, o in events if o["metadata"]["name"].startswith("big-")) == 40
    finally:
        fake.__exit__(None, None, None)


def test_a_server_allowing_fewer_streams_than_kinds_gets_the_rest_over_http1(tls, tmp_path):
    fake = serve(tls, tmp_path, http2_streams=4)
    try:
        run(fake, tmp_path / "s")
        fake.put(pod("y", "c", "198.18.5.3"))
        _, seen = run(fake, tmp_path / "s")
        assert "y/c" in seen["pods"]
        assert 2 < seen["connections"] < seen["watches"]
    finally:
        fake.__exit__(None, None, None)


def test_small_gets_over_http2_keep_their_errors_and_bounds(tls, tmp_path, monkeypatch):
    """The version probe and discovery go as streams too: a refusal names the permission, an
    answer past the bounds is refused, as over HTTP/1.1."""
    from weft.desired import api as kube
    fake = serve(tls, tmp_path)
    try:
        with connect(fake.kubeconfig) as api:
            assert kube.current_resource_version(api) == fake.resource_version
            assert api.watch_session() is not None and fake.connections == 1, "one HTTP/2 connection"
            fake.fail("/api/v1/namespaces?limit=1", 403, "Forbidden", times=1)
            with pytest.raises(SourceError, match=r"HTTP 403 Forbidden.*needs `list` on namespaces"):
                kube.current_resource_version(api)
            monkeypatch.setattr(kube, "MAX_RESPONSE_BYTES", 100)
            with pytest.raises(SourceError, match="answered with more than"):
                kube.served_plurals(api, kube.CALICO_API_VERSION)
    finally:
        fake.__exit__(None, None, None)


# --- the same against a real cluster ($KUBECONFIG), counted at the client ----------------------

@pytest.fixture
def opened(monkeypatch) -> list:
    """The TCP connections this process opens (urllib3's and desired.h2link's), as they open."""
    import socket

    import urllib3.util.connection as urllib3_connection
    seen: list = []
    for module in (socket, urllib3_connection):
        real = module.create_connection

        def counting(address, *args, real=real, **kwargs):
            seen.append(address)
            return real(address, *args, **kwargs)
        monkeypatch.setattr(module, "create_connection", counting)
    return seen


@pytest.fixture
def cluster(tls, tmp_path):
    """The cluster $KUBECONFIG names when set (as the kube_source tests do), else FakeKubeAPI over
    TLS offering HTTP/2; a fresh namespace in it either way."""
    from tests.kubeapi import kube_source
    with kube_source(tmp_path, objects=copy.deepcopy(OBJECTS), tls=tls) as source:
        yield source


def test_a_quiet_moved_run_opens_one_connection_on_this_cluster(cluster, opened, tmp_path):
    """Counted where weft opens them, so it holds against a real kube-apiserver too: a run after
    the version moved through something weft does not read opens one connection."""
    from weft.desired import h2link
    from weft.desired.api import resolve
    state_dir = tmp_path / "state"
    reading = sources.read(state_dir, None, cluster.kubeconfig)
    sources.commit(state_dir, reading)
    cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "moved"}})
    opened.clear()
    second = sources.read(state_dir, None, cluster.kubeconfig)
    if len(opened) > QUIET_RUN_CONNECTIONS and cluster.real:
        session = h2link.connect(resolve(cluster.kubeconfig), None, {}, 5.0)
        if session is None:
            pytest.skip("this API server is not reached over TLS with HTTP/2 (a proxy, or plain http)")
        session.close()
    assert len(opened) == QUIET_RUN_CONNECTIONS, opened
    assert second.dirty, "the run took the watching path (the version moved), not the unchanged one"
