"""Service and EndpointSlice: converted from manifests into weft.model.services, checked field by
field (a bad one is an error naming the object and the field), only ready endpoints kept."""
from __future__ import annotations

import pytest

from weft.desired.loader import build_cluster_state
from weft.model.errors import InvalidDesiredState
from weft.model.services import Service, ServicePort, SliceEndpoint, SlicePort

NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}


def service(name="web", **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "x"},
            "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80, "targetPort": 8080}]} | spec}


def endpoint_slice(endpoints, ports=({"name": "", "port": 8080, "protocol": "TCP"},), service_name="web"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service_name}-abc", "namespace": "x",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "endpoints": list(endpoints), "ports": list(ports)}


def state(*objects):
    return build_cluster_state([(f"doc{i}", o) for i, o in enumerate([NS, *objects])])


def test_cluster_ip_nodeport_affinity_and_named_target_ports():
    s = state(service(), service("np", type="NodePort", sessionAffinity="ClientIP",
                                 ports=[{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080},
                                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]))
    web, np = sorted(s.services, key=lambda x: x.name)[::-1]
    assert web == Service("x", "web", "ClusterIP", ("198.19.0.10",), (ServicePort("", "TCP", 80, 8080),))
    assert np.type == "NodePort" and np.affinity_seconds == 10800
    assert np.ports == (ServicePort("http", "TCP", 80, "web", 30080), ServicePort("dns", "UDP", 53, 5353, 0))


def test_only_ready_endpoints_are_kept():
    s = state(service(), endpoint_slice([
        {"addresses": ["198.18.1.11"], "conditions": {"ready": True},
         "targetRef": {"kind": "Pod", "name": "a", "namespace": "x"}},
        {"addresses": ["198.18.1.12"], "conditions": {"ready": False}},
        {"addresses": ["198.18.1.13"]},                            # no conditions: ready
    ]))
    (slice_,) = s.endpoint_slices
    assert slice_.service_key == "x/web"
    assert slice_.endpoints == (SliceEndpoint(("198.18.1.11",), "x/a"), SliceEndpoint(("198.18.1.13",), None))
    assert slice_.ports == (SlicePort("", "TCP", 8080),)


def test_external_name_and_headless_translate_nothing():
    s = state(service(type="ExternalName", externalName="example.org"), service("h", clusterIP="None"))
    assert [x.name for x in s.services] == ["h"] and s.services[0].cluster_ips == ()


@pytest.mark.parametrize("spec, field", [
    ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
    ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
    ({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}, "spec.ports[0].targetPort"),
    ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name"),
    ({"clusterIP": "300.1.1.1"}, "spec.clusterIPs[0]"),
    ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
    ({"type": "Balanced"}, "spec.type"),
])
def test_a_bad_service_names_the_object_and_field(spec, field):
    with pytest.raises(InvalidDesiredState) as caught:
        state(service(**spec))
    assert field in str(caught.value) and "web" in str(caught.value), str(caught.value)


def test_a_bad_slice_names_the_field():
    with pytest.raises(InvalidDesiredState, match=r"endpoints\[0\]\.addresses\[0\]"):
        state(endpoint_slice([{"addresses": ["not-an-ip"]}]))
    with pytest.raises(InvalidDesiredState, match=r"ports\[0\]\.port"):
        state(endpoint_slice([], ports=[{"port": 70000}]))
