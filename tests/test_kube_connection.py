"""The API connection: credentials resolved by the official client, kept for later runs.

A run that finds nothing to do should not pay the official client's import (~0.25 s of CPU):
desired.kube.connect keeps the resolved profile and uses it without the client while the
config files are unchanged; refused credentials or a failed handshake resolve it anew. The
server here speaks https and requires a client certificate, as a kubeadm cluster does.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import replace

import pytest

from tests.kubeapi import FakeKubeAPI, TLSFiles
from weft.desired.api import RESOURCES as RESOURCES_BY_KIND
from weft.desired.api import ApiError, Connection, Profile, connect, load_objects, resolve
from weft.model.errors import SourceError


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TLSFiles:
    return TLSFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(tls):
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns1"}}
    with FakeKubeAPI([ns], tls=tls) as api:
        yield api


def namespaces(api: Connection) -> list[str]:
    return [n["metadata"]["name"] for n in api.request("GET", "/api/v1/namespaces")["items"]]


def without_official_client(monkeypatch) -> None:
    """Any import of the kubernetes package fails from here on."""
    for name in [m for m in sys.modules if m == "kubernetes" or m.startswith("kubernetes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "kubernetes", None)


def test_lists_over_tls_with_a_client_certificate(server, tmp_path):
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    assert [o["metadata"]["name"] for o in load_objects(kubeconfig) if o["kind"] == "Namespace"] == ["ns1"]


def test_a_kept_profile_needs_no_official_client(server, tmp_path, monkeypatch):
    kubeconfig, keep = server.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "api.json"
    with connect(kubeconfig, keep=keep) as api:
        assert namespaces(api) == ["ns1"]
    assert stat.S_IMODE(os.stat(keep).st_mode) == 0o600      # it holds the client key and token

    without_official_client(monkeypatch)
    with connect(kubeconfig, keep=keep) as api:
        assert namespaces(api) == ["ns1"]
    with pytest.raises(ImportError):
        resolve(kubeconfig)                                  # the proof that it was not needed


def test_refused_credentials_are_resolved_anew(server, tmp_path):
    """A kept token that expired (as an exec plugin's do) is replaced, and kept anew."""
    kubeconfig, keep = server.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "api.json"
    connect(kubeconfig, keep=keep).close()
    kept = json.loads(keep.read_text())
    kept["profile"]["authorization"] = "Bearer expired"
    keep.write_text(json.dumps(kept))

    with connect(kubeconfig, keep=keep) as api:
        assert namespaces(api) == ["ns1"]
    assert json.loads(keep.read_text())["profile"]["authorization"] == f"Bearer {server.token}"


def test_a_kept_ca_the_server_no_longer_matches_is_resolved_anew(server, tmp_path_factory, tmp_path):
    """The cluster's CA was rotated: the handshake with the kept profile fails, the kubeconfig's new CA works."""
    kubeconfig, keep = server.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "api.json"
    connect(kubeconfig, keep=keep).close()
    kept = json.loads(keep.read_text())
    kept["profile"]["ca_pem"] = TLSFiles.make(tmp_path_factory.mktemp("old"), ca_name="old-ca").ca.read_text()
    keep.write_text(json.dumps(kept))

    with connect(kubeconfig, keep=keep) as api:
        assert namespaces(api) == ["ns1"]
    assert json.loads(keep.read_text())["profile"]["ca_pem"] == server.tls.ca.read_text()


def test_credentials_refused_after_renewal_are_an_error(server, tmp_path):
    renewals = []

    def renew() -> Profile:
        renewals.append(1)
        return Profile(server.url, "Bearer still-wrong", ca_pem=server.tls.ca.read_text(),
                       cert_pem=server.tls.client_cert.read_text(), key_pem=server.tls.client_key.read_text())

    with Connection(renew(), renew) as api, pytest.raises(ApiError) as refused:
        namespaces(api)
    assert refused.value.status == 401 and len(renewals) == 2      # the first profile, then one renewal


def test_a_changed_kubeconfig_is_not_served_by_the_kept_profile(server, tls, tmp_path):
    kubeconfig, keep = server.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "api.json"
    connect(kubeconfig, keep=keep).close()
    other_ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}}
    with FakeKubeAPI([other_ns], tls=tls) as other:
        other.write_kubeconfig(kubeconfig)
        with connect(kubeconfig, keep=keep) as api:
            assert api.host == other.url and namespaces(api) == ["elsewhere"]


def test_a_server_certificate_of_another_ca_is_refused(server, tmp_path_factory, tmp_path):
    stranger = TLSFiles.make(tmp_path_factory.mktemp("stranger"), ca_name="stranger-ca")
    profile = resolve(server.write_kubeconfig(tmp_path / "kubeconfig"))
    refused = f"no answer from the API server at {server.url}.*CERTIFICATE_VERIFY_FAILED"
    with Connection(replace(profile, ca_pem=stranger.ca.read_text())) as api, pytest.raises(SourceError, match=refused):
        namespaces(api)


def test_bgp_passwords_come_from_the_secrets_peers_name(tls, tmp_path):
    """One GET per referenced Secret, in calico-system then kube-system; one found nowhere is left out."""
    from weft.desired.kinds.bgp import fetch_peer_secrets
    from weft.model.cluster import BGPPeer, Secret, SecretKeyRef
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}},
               {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp", "namespace": "kube-system"},
                "data": {"tor": "czNjcjN0"}}]
    peers = [BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001, password=SecretKeyRef("bgp", "tor")),
             BGPPeer("gone", peer_ip="198.18.0.253", as_number=65001, password=SecretKeyRef("absent", "x"))]
    with FakeKubeAPI(objects, tls=tls) as server, connect(server.write_kubeconfig(tmp_path / "kc")) as api:
        assert fetch_peer_secrets(api, peers) == (Secret("kube-system", "bgp", {"tor": "s3cr3t"}),)
        asked = [path for method, path in server.requests if "/secrets/" in path]
    assert asked == ["/api/v1/namespaces/calico-system/secrets/absent", "/api/v1/namespaces/kube-system/secrets/absent",
                     "/api/v1/namespaces/calico-system/secrets/bgp", "/api/v1/namespaces/kube-system/secrets/bgp"]


def test_a_watch_the_server_answers_slowly_is_read_whole(server, tmp_path):
    """The quiet gap ends a watch once its answer began; a slow start is not a quiet server."""
    import time

    from weft.desired.api import RESOURCES, watch_since
    namespaces_kind = next(r for r in RESOURCES if r.kind == "Namespace")
    since = server.resource_version
    server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}})
    server.on_request = lambda method, path: "watch=true" in path and time.sleep(0.5)
    with connect(server.write_kubeconfig(tmp_path / "kubeconfig")) as api:
        events, last = watch_since(api, namespaces_kind, since, quiet=0.1)
    assert [(kind, obj["metadata"]["name"]) for kind, obj in events] == [("ADDED", "late")]
    assert last == server.resource_version


# --- bounded waits and hostile answers ---------------------------------------------------------

class RawServer:
    """A TCP server on 127.0.0.1 that accepts connections and answers each request with `answer`
    (bytes, sent as they are), or never answers when it is None: a black hole. It counts the
    connections made to it, so a retry shows."""

    def __init__(self, answer: bytes | None = None):
        import socket
        import threading
        self.answer, self.connections, self._held = answer, 0, []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)
            if self.answer is not None:
                conn.recv(65536)
                conn.sendall(self.answer)

    def close(self) -> None:
        self._sock.close()
        for conn in self._held:
            conn.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def http_answer(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{headers}Connection: close\r\n\r\n").encode() + body


def test_a_black_hole_api_server_fails_a_read_within_the_bound(tmp_path):
    """A server that accepts connections and never answers (a stopped kube-apiserver): one
    attempt, READ_TIMEOUT later a clear SourceError. It cost 4 x 30 s before (urllib3's retries)."""
    import time

    from weft.desired.api import CONNECT_TIMEOUT, READ_TIMEOUT
    with RawServer(None) as hole:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": hole.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        started = time.monotonic()
        with pytest.raises(SourceError, match=f"no answer from the API server at {hole.url}.*timed out"):
            load_objects(str(kubeconfig), concurrent=False)
        took = time.monotonic() - started
        assert hole.connections == 1, "the request was retried"
    assert READ_TIMEOUT - 0.5 <= took <= READ_TIMEOUT + CONNECT_TIMEOUT, took


HOSTILE_ANSWERS = [
    ("not JSON", http_answer(b"<html>hello</html>"), "not JSON"),
    ("a JSON array", http_answer(b"[1, 2]"), "not a JSON object"),
    ("nested too deep", http_answer(b'{"items": ' + b"[" * 500 + b"]" * 500 + b"}"), "nested deeper than 100"),
    ("nested past the recursion limit", http_answer(b"[" * 100_000 + b"]" * 100_000), "nested deeper than 100"),
    ("a number Python cannot hold", http_answer(b'{"items": [], "metadata": {"x": ' + b"9" * 5000 + b"}}"),
     "not JSON"),
    ("larger than the bound", http_answer(b"{}", headers=f"Content-Length: {(64 << 20) + 1}\r\n")
     .replace(b"Content-Length: 2\r\n", b""), "more than 64 MiB"),
    ("compressed unasked", http_answer(b"\x1f\x8b\x08", headers="Content-Encoding: gzip\r\n"), "Content-Encoding"),
    ("items that are not a list", http_answer(b'{"items": {"a": 1}, "metadata": {}}'), "items must be a list"),
    ("an item that is not a mapping", http_answer(b'{"items": [5], "metadata": {}}'), r"items\[0\] must be a mapping"),
    ("an item's metadata a list", http_answer(b'{"items": [{"metadata": []}], "metadata": {}}'),
     r"items\[0\].metadata must be a mapping"),
    ("an item's name a map", http_answer(b'{"items": [{"metadata": {"name": {"a": 1}}}], "metadata": {}}'),
     r"items\[0\].metadata.name must be a string"),
    ("a continue token that is a list", http_answer(b'{"items": [], "metadata": {"continue": [1]}}'),
     "metadata.continue must be a string"),
]


@pytest.mark.parametrize("answer, problem", [a[1:] for a in HOSTILE_ANSWERS], ids=[a[0] for a in HOSTILE_ANSWERS])
def test_hostile_list_answers_are_clear_source_errors(answer, problem):
    """Whatever a server (or something pretending to be one) answers: a SourceError naming the
    request, never a RecursionError, MemoryError, ValueError or AttributeError."""
    from weft.desired.api import list_kind
    pods = next(r for r in RESOURCES_BY_KIND if r.kind == "Pod")
    with RawServer(answer) as server, Connection(Profile(server.url)) as api:
        with pytest.raises(SourceError, match=problem) as failure:
            list_kind(api, pods)
    assert "/api/v1/pods" in str(failure.value) and len(str(failure.value)) < 400


WATCH_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
              b"Connection: close\r\n\r\n")


def chunked(*lines: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(line + b"\n"), line + b"\n") for line in lines)
    return WATCH_HEAD + body + b"0\r\n\r\n"


HOSTILE_EVENTS = [
    ("not JSON", chunked(b"{nope"), "not JSON"),
    ("nested too deep", chunked(b'{"type": "ADDED", "object": ' + b"[" * 200 + b"]" * 200 + b"}"), "nested deeper"),
    ("a list", chunked(b"[1]"), "type is not one of"),
    ("an unknown type", chunked(b'{"type": ["ADDED"], "object": {}}'), "type is not one of"),
    ("an object without metadata", chunked(b'{"type": "ADDED", "object": {"metadata": 5}}'),
     "ADDED event's object.metadata must be a mapping"),
    ("an error that is not a Status", chunked(b'{"type": "ERROR", "object": "boom"}'), "object must be a mapping"),
]


@pytest.mark.parametrize("answer, problem", [a[1:] for a in HOSTILE_EVENTS], ids=[a[0] for a in HOSTILE_EVENTS])
def test_hostile_watch_events_are_clear_source_errors(answer, problem):
    from weft.desired.api import watch_since
    pods = next(r for r in RESOURCES_BY_KIND if r.kind == "Pod")
    with RawServer(answer) as server, Connection(Profile(server.url)) as api:
        with pytest.raises(SourceError, match=problem):
            watch_since(api, pods, "1", quiet=0.5)


def test_a_watch_that_never_goes_quiet_ends_within_its_bound():
    """A server streaming events without a pause: the watch stops after its timeout and returns
    what it read, the cursor at the last event (the next run goes on from there)."""
    import socket
    import threading
    import time

    from weft.desired.api import watch_since
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def stream() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(WATCH_HEAD)
        n = 0
        while not stop.is_set():
            n += 1
            line = json.dumps({"type": "ADDED", "object": {"metadata": {"name": f"p{n}", "namespace": "x",
                                                                        "resourceVersion": str(n)}}}).encode()
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(line) + 1, line + b"\n"))
            except OSError:
                break
            time.sleep(0.01)
        conn.close()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    pods = next(r for r in RESOURCES_BY_KIND if r.kind == "Pod")
    started = time.monotonic()
    try:
        with Connection(Profile(f"http://127.0.0.1:{listener.getsockname()[1]}")) as api:
            events, last = watch_since(api, pods, "0", quiet=0.5, timeout=2)
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - started < 4
    assert events and last == events[-1][1]["metadata"]["resourceVersion"]


def test_the_kept_profile_is_read_and_written_safely(server, tmp_path):
    """It holds the client key and token: never written through a link, a link in its place is
    refused, and a file of another shape is simply resolved anew."""
    from weft.store.statedir import UnsafeState
    kubeconfig, keep = server.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "api.json"
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    keep.symlink_to(victim)
    with pytest.raises(UnsafeState, match="symbolic link"):
        connect(kubeconfig, keep=keep)
    assert victim.read_text() == "untouched"

    keep.unlink()
    keep.write_text(json.dumps({"key": "x", "at": "now", "profile": {"host": ["a list"]}}))
    os.chmod(keep, 0o600)
    with connect(kubeconfig, keep=keep) as api:
        assert namespaces(api) == ["ns1"]
    assert not keep.is_symlink() and json.loads(keep.read_text())["profile"]["host"] == server.url
