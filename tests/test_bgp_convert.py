"""BGP kinds in, model out: Calico's fields, both apiVersions, and errors that name object and field."""
from __future__ import annotations

import base64

import pytest

from weft.desired.kinds.bgp import community_problem, duration_seconds, parse_as_number, parse_peer_ip
from weft.desired.loader import build_cluster_state
from weft.model.cluster import NodeBGP, SecretKeyRef
from weft.model.errors import InvalidDesiredState
from weft.model.selector import parse_selector

V1, V3 = "crd.projectcalico.org/v1", "projectcalico.org/v3"


def obj(kind: str, name: str, spec: dict | None = None, api: str = V3, **extra) -> tuple[str, dict]:
    raw = {"apiVersion": api, "kind": kind, "metadata": {"name": name}, **extra}
    if spec is not None:
        raw["spec"] = spec
    return ("bgp.yaml", raw)


def load(*objects):
    return build_cluster_state(list(objects))


def errors(*objects) -> list[str]:
    with pytest.raises(InvalidDesiredState) as info:
        load(*objects)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize("api", [V1, V3])
def test_bgp_configuration_fields(api):
    state = load(obj("BGPConfiguration", "default", {
        "asNumber": "1.10", "nodeToNodeMeshEnabled": False, "listenPort": 1790, "logSeverityScreen": "Debug",
        "serviceClusterIPs": [{"cidr": "198.19.0.0/16"}], "serviceExternalIPs": [{"cidr": "198.19.1.5/32"}],
        "serviceLoadBalancerIPs": [{"cidr": "198.19.2.0/24"}],
        "communities": [{"name": "lab", "value": "65001:100"}],
        "prefixAdvertisements": [{"cidr": "198.18.4.0/22", "communities": ["lab", "65001:100:7"]}],
        "bindMode": "NodeIP"}, api=api))
    (config,) = state.bgp_configurations
    assert config.as_number == 65546 and config.node_to_node_mesh is False and config.listen_port == 1790
    assert config.service_cluster_ips == ("198.19.0.0/16",)
    assert config.prefix_advertisements[0].communities == ("65001:100", "65001:100:7")


@pytest.mark.parametrize("api", [V1, V3])
def test_bgp_peer_fields(api):
    state = load(obj("BGPPeer", "tor", {
        "peerIP": "198.18.0.254:1790", "asNumber": 65001, "nodeSelector": "rack == 'a'",
        "password": {"secretKeyRef": {"name": "bgp", "key": "tor"}}, "keepOriginalNextHop": True,
        "maxRestartTime": "2m", "keepaliveTime": "10s", "ttlSecurity": 2, "sourceAddress": "None"}, api=api))
    (peer,) = state.bgp_peers
    assert (peer.peer_ip, peer.peer_port, peer.as_number) == ("198.18.0.254", 1790, 65001)
    assert peer.node_selector == parse_selector("rack == 'a'")
    assert peer.password == SecretKeyRef("bgp", "tor") and peer.ttl_security == 2
    assert peer.source_address == "None"


def test_peer_selector_peer_needs_no_as_number():
    (peer,) = load(obj("BGPPeer", "rrs", {"nodeSelector": "all()", "peerSelector": "has(rr)"})).bgp_peers
    assert peer.peer_ip is None and peer.peer_selector is not None


def test_node_bgp_annotations_and_internal_ip():
    node = ("nodes.yaml", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "annotations": {
        "projectcalico.org/IPv4Address": "198.18.0.1/24", "projectcalico.org/IPv6Address": "2001:db8::1/64",
        "projectcalico.org/ASNumber": "64600", "projectcalico.org/RouteReflectorClusterID": "244.0.0.1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"},
                                 {"type": "Hostname", "address": "n1"}]}})
    plain = ("nodes.yaml", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}})
    nodes = load(node, plain).nodes
    assert nodes["n1"].bgp == NodeBGP("198.18.0.1/24", "2001:db8::1/64", 64600, "244.0.0.1")
    assert nodes["n1"].addresses == ("198.18.0.1",)
    assert nodes["n2"].bgp is None


def test_secret_data_and_string_data():
    raw = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp", "namespace": "kube-system"},
           "data": {"a": base64.b64encode(b"one").decode()}, "stringData": {"b": "two"}}
    (secret,) = load(("s.yaml", raw), ("s.yaml", {"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": "kube-system"}})).secrets
    assert dict(secret.data) == {"a": "one", "b": "two"}


@pytest.mark.parametrize("spec, field, words", [
    ({"peerIP": "198.18.0.300", "asNumber": 1}, "spec.peerIP", "must be an IP address"),
    ({"peerIP": "198.18.0.1:70000", "asNumber": 1}, "spec.peerIP", "port 1-65535"),
    ({"peerIP": "198.18.0.1", "asNumber": 0}, "spec.asNumber", "AS number 1-4294967295"),
    ({"peerIP": "198.18.0.1", "asNumber": 4294967296}, "spec.asNumber", "AS number"),
    ({"peerIP": "198.18.0.1", "asNumber": "65536.1"}, "spec.asNumber", "asdot"),
    ({"peerIP": "198.18.0.1"}, "spec.asNumber", "missing"),
    ({"asNumber": 1}, "spec.peerIP", "missing"),
    ({"peerIP": "198.18.0.1", "asNumber": 1, "peerSelector": "all()"}, "spec.peerSelector", "cannot be used"),
    ({"peerSelector": "rack = 'a'"}, "spec.peerSelector", "invalid selector"),
    ({"peerSelector": "all()", "node": "n1", "nodeSelector": "all()"}, "spec.nodeSelector", "cannot be used"),
    ({"peerSelector": "all()", "nextHopMode": "Sometimes"}, "spec.nextHopMode", "Auto, Self, Keep"),
    ({"peerSelector": "all()", "keepaliveTime": "soon"}, "spec.keepaliveTime", "duration"),
    ({"peerSelector": "all()", "maxRestartTime": "2h"}, "spec.maxRestartTime", "1s-4095s"),
    ({"peerSelector": "all()", "ttlSecurity": 256}, "spec.ttlSecurity", "0-255"),
    ({"peerSelector": "all()", "sourceAddress": "Mine"}, "spec.sourceAddress", "UseNodeIP, None"),
    ({"peerSelector": "all()", "password": {"secretKeyRef": {"name": "x"}}}, "spec.password.secretKeyRef.key",
     "non-empty"),
    ({"peerSelector": "all()", "peerIp": "198.18.0.1"}, "spec.peerIp", "unknown field"),
])
def test_bad_bgp_peer_names_object_and_field(spec, field, words):
    (message,) = errors(obj("BGPPeer", "tor", spec))
    assert message.startswith(f"bgp.yaml: BGPPeer tor: {field}: "), message
    assert words in message


@pytest.mark.parametrize("spec, field, words", [
    ({"nodeToNodeMeshEnabled": "yes"}, "spec.nodeToNodeMeshEnabled", "boolean"),
    ({"listenPort": 0}, "spec.listenPort", "1-65535"),
    ({"listenPort": 65536}, "spec.listenPort", "1-65535"),
    ({"logSeverityScreen": "Verbose"}, "spec.logSeverityScreen", "Debug, Info"),
    ({"asNumber": -1}, "spec.asNumber", "AS number"),
    ({"communities": [{"name": "a", "value": "65536:1"}]}, "spec.communities[0].value", "0-65535"),
    ({"communities": [{"name": "a", "value": "1:2:3:4"}]}, "spec.communities[0].value", "aa:nn"),
    ({"prefixAdvertisements": [{"cidr": "198.18.4.0/24", "communities": ["nope"]}]},
     "spec.prefixAdvertisements[0].communities[0]", "must name one of"),
    ({"serviceClusterIPs": [{"cidr": "198.19.0.0/33"}]}, "spec.serviceClusterIPs[0].cidr", "invalid CIDR"),
    ({"nodeMeshPassword": "s3cr3t"}, "spec.nodeMeshPassword", "{secretKeyRef: {name: ..., key: ...}}"),
    ({"nodeMeshPassword": {"secretKeyRef": {"name": "bgp", "key": ""}}}, "spec.nodeMeshPassword.secretKeyRef.key",
     "non-empty"),
    ({"nodeMeshMaxRestartTime": "forever"}, "spec.nodeMeshMaxRestartTime", "duration"),
    ({"nodeMeshMaxRestartTime": "4096s"}, "spec.nodeMeshMaxRestartTime", "1s-4095s"),
])
def test_bad_bgp_configuration_names_object_and_field(spec, field, words):
    (message,) = errors(obj("BGPConfiguration", "default", spec))
    assert message.startswith(f"bgp.yaml: BGPConfiguration default: {field}: "), message
    assert words in message


@pytest.mark.parametrize("api", [V1, V3])
def test_node_mesh_password_and_restart_time(api):
    (config,) = load(obj("BGPConfiguration", "default", {
        "nodeMeshPassword": {"secretKeyRef": {"name": "bgp-mesh", "key": "password"}},
        "nodeMeshMaxRestartTime": "2m"}, api=api)).bgp_configurations
    assert config.node_mesh_password == SecretKeyRef("bgp-mesh", "password")
    assert config.node_mesh_max_restart_time == "2m"


@pytest.mark.parametrize("field, value", [
    ("nodeMeshPassword", {"secretKeyRef": {"name": "bgp-mesh", "key": "password"}}),
    ("nodeMeshMaxRestartTime", "90s"),
])
def test_mesh_settings_only_on_the_default_configuration(field, value):
    """Both ends of a mesh session must agree, so (as in Calico) only "default" sets them."""
    (message,) = errors(obj("BGPConfiguration", "node.n1", {field: value}))
    assert message.startswith(f"bgp.yaml: BGPConfiguration node.n1: spec.{field}: "), message
    assert 'only be set on the "default" BGPConfiguration' in message


def test_password_refs_and_their_secrets_from_the_api_server(tmp_path):
    """One GET per Secret a BGP password names (a peer's or the mesh's); weft lists no Secrets."""
    from tests.kubeapi import FakeKubeAPI
    from weft.desired.api import connect
    from weft.desired.kinds.bgp import fetch_secrets, password_refs
    from weft.model.cluster import Secret
    mesh = {"nodeMeshPassword": {"secretKeyRef": {"name": "mesh", "key": "pw"}}}
    state = load(obj("BGPConfiguration", "default", mesh),
                 obj("BGPPeer", "tor", {"peerIP": "198.18.0.254", "asNumber": 65001,
                                        "password": {"secretKeyRef": {"name": "bgp", "key": "tor"}}}))
    assert password_refs(state) == (SecretKeyRef("bgp", "tor"), SecretKeyRef("mesh", "pw"))
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "calico-system"}},
               {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mesh", "namespace": "calico-system"},
                "data": {"pw": base64.b64encode(b"m3sh").decode()}},
               {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other", "namespace": "calico-system"},
                "data": {"pw": base64.b64encode(b"unread").decode()}}]
    with FakeKubeAPI(objects) as server, connect(server.write_kubeconfig(tmp_path / "kc")) as api:
        assert fetch_secrets(api, password_refs(state)) == (Secret("calico-system", "mesh", {"pw": "m3sh"}),)
        asked = [path for _, path in server.requests if "/secrets" in path]
    assert asked == ["/api/v1/namespaces/calico-system/secrets/bgp", "/api/v1/namespaces/kube-system/secrets/bgp",
                     "/api/v1/namespaces/calico-system/secrets/mesh"]


def test_bgp_configuration_name_and_node_annotation_errors():
    assert "must be \"default\" or \"node.<node name>\"" in errors(obj("BGPConfiguration", "global", {}))[0]
    node = ("n.yaml", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "annotations": {
        "projectcalico.org/IPv4Address": "198.18.0.1/33", "projectcalico.org/ASNumber": "0",
        "projectcalico.org/RouteReflectorClusterID": "cluster-a"}}})
    found = errors(node)
    assert any("projectcalico.org/IPv4Address: must be an IPv4 address" in e for e in found)
    assert any("projectcalico.org/ASNumber: must be an AS number" in e for e in found)
    assert any("projectcalico.org/RouteReflectorClusterID: must be a route reflector cluster ID" in e for e in found)


def test_parsers():
    assert parse_as_number("0.1") == 1 and parse_as_number("65535.65535") == 4294967295
    assert parse_as_number(True) is None and parse_as_number("1e3") is None
    assert duration_seconds("1m30s") == 90 and duration_seconds("1.5h") == 5400 and duration_seconds("90") is None
    assert parse_peer_ip("[2001:db8::1]:180") == ("2001:db8::1", 180)
    assert parse_peer_ip("2001:db8::1") == ("2001:db8::1", None)
    assert community_problem("65535:65535") is None and community_problem("4294967295:0:1") is None
