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
