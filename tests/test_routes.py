"""Routes to local pods and their host-side interface settings, reconciled on a real kernel.

A pod's host-side interface here is one end of a veth pair inside the node namespace (the
other end stays there too): enough for routes and sysctls, no traffic needed.
"""
from __future__ import annotations

import json

import pytest

from tests.nodens import WeftNode, in_ns, namespace, node_ns, pod, usable, write_manifests
from weft.model.names import host_iface_name

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node_ns = node_ns  # the fixture

PODS = [namespace("x"), pod("x", "a", "198.18.3.11"), pod("x", "b", "198.18.3.12"),
        pod("x", "remote", "198.18.3.99", node="elsewhere")]


def veth(ns: str, iface: str) -> None:
    in_ns(ns, "ip", "link", "add", iface, "type", "veth", "peer", "name", "p" + iface[4:])
    in_ns(ns, "ip", "link", "set", iface, "up")


def weft_routes(ns: str) -> dict[str, str]:
    entries = json.loads(in_ns(ns, "ip", "-j", "-4", "route", "show", "proto", "201") or "[]")
    return {e["dst"]: e.get("dev", e.get("type")) for e in entries}


def sysctl(ns: str, key: str) -> str:
    return in_ns(ns, "cat", f"/proc/sys/{key}").strip()


@pytest.fixture
def node(node_ns, tmp_path):
    for name in ("a", "b"):
        veth(node_ns, host_iface_name("x", name))
    in_ns(node_ns, "sysctl", "-qw", f"net.ipv4.conf.{host_iface_name('x', 'a')}.rp_filter=0")
    node = WeftNode(node_ns, tmp_path / "state")
    node.src = write_manifests(tmp_path / "src", PODS)
    node.weft("apply", from_dir=node.src)
    return node


def test_local_pods_get_routes_and_settings(node):
    a, b = host_iface_name("x", "a"), host_iface_name("x", "b")
    assert weft_routes(node.ns) == {"198.18.3.11": a, "198.18.3.12": b}, "remote pods get no route here"
    for iface in (a, b):
        assert sysctl(node.ns, f"net/ipv4/conf/{iface}/rp_filter") == "1"
        assert sysctl(node.ns, f"net/ipv4/conf/{iface}/forwarding") == "1"
    assert node.weft_json("apply", from_dir=node.src)["commands"] == []


def test_drifted_route_and_setting_are_reported_and_repaired(node):
    a = host_iface_name("x", "a")
    in_ns(node.ns, "ip", "route", "del", "198.18.3.11/32", "proto", "201")
    in_ns(node.ns, "sysctl", "-qw", f"net.ipv4.conf.{a}.rp_filter=2")
    drift = node.weft("drift", "--output", "json", from_dir=node.src, expect=2)
    items = json.loads(drift.stdout)["items"]
    assert {"kind": "route", "name": "198.18.3.11/32", "problem": "missing", "rule": f"dev {a}"} in items
    assert any(i["kind"] == "sysctl" and i["name"] == a and "rp_filter" in i["member"] for i in items)
    node.weft("apply", from_dir=node.src)
    node.weft("drift", from_dir=node.src, expect=0)
    assert weft_routes(node.ns)["198.18.3.11"] == a


def test_a_running_pods_route_outlives_its_record_and_goes_with_its_interface(node, tmp_path):
    """#9.3: a route through an existing weft interface is never deleted by a run (the pod runs;
    the CNI plugin removes interface and route at DEL), neither when the desired state forgets
    the pod nor by destroy; other tools' routes are never touched."""
    a, b = host_iface_name("x", "a"), host_iface_name("x", "b")
    in_ns(node.ns, "ip", "route", "add", "198.18.3.0/24", "dev", b, "proto", "static")
    in_ns(node.ns, "ip", "route", "add", "198.18.3.50/32", "dev", b)
    foreign = in_ns(node.ns, "ip", "route", "show", "proto", "static") + in_ns(node.ns, "ip", "route", "show",
                                                                              "proto", "boot")
    write_manifests(node.src, [o for o in PODS if o["metadata"]["name"] != "a"])
    plan = node.weft_json("plan", from_dir=node.src)
    assert plan["changes"]["routes"] == [], "a live pod's route is not the run's to delete"
    node.weft("apply", from_dir=node.src)
    assert weft_routes(node.ns) == {"198.18.3.11": a, "198.18.3.12": b}
    node.weft("drift", from_dir=node.src, expect=0)

    in_ns(node.ns, "ip", "link", "del", a)                   # CNI DEL: the interface goes, its route with it
    node.weft("apply", from_dir=node.src)
    assert weft_routes(node.ns) == {"198.18.3.12": b}
    node.weft("apply", "--destroy")
    assert weft_routes(node.ns) == {"198.18.3.12": b}, "a running pod's route goes with the pod, not with destroy"
    after = in_ns(node.ns, "ip", "route", "show", "proto", "static") + in_ns(node.ns, "ip", "route", "show",
                                                                             "proto", "boot")
    assert after == foreign


def test_a_route_is_moved_when_the_address_belongs_to_another_pod_now(node):
    """The desired state routes a's address to pod c: the route is replaced, not added beside."""
    c = host_iface_name("x", "c")
    veth(node.ns, c)
    moved = [namespace("x"), pod("x", "b", "198.18.3.12"), pod("x", "c", "198.18.3.11")]
    write_manifests(node.src, moved)
    plan = node.weft_json("plan", from_dir=node.src)
    assert [(r["dst"], r["action"], r["previous_dev"], r["dev"]) for r in plan["changes"]["routes"]] == [
        ("198.18.3.11/32", "update", host_iface_name("x", "a"), c)]
    node.weft("apply", from_dir=node.src)
    assert weft_routes(node.ns) == {"198.18.3.11": c, "198.18.3.12": host_iface_name("x", "b")}


def test_weft_routes_through_foreign_interfaces_are_removed(node):
    """A route of weft's protocol through an interface that is not weft's is no pod's: it goes."""
    in_ns(node.ns, "ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    in_ns(node.ns, "ip", "link", "set", "other0", "up")
    in_ns(node.ns, "ip", "route", "add", "198.18.3.77/32", "dev", "other0", "proto", "201")
    drift = node.weft("drift", "--output", "json", from_dir=node.src, expect=2)
    assert json.loads(drift.stdout)["items"] == [
        {"kind": "route", "name": "198.18.3.77/32", "problem": "unexpected", "rule": "dev other0"}]
    node.weft("apply", from_dir=node.src)
    assert "198.18.3.77" not in weft_routes(node.ns)
    node.weft("drift", from_dir=node.src, expect=0)


def test_pod_whose_interface_does_not_exist_yet_wants_no_route(node):
    in_ns(node.ns, "ip", "link", "del", host_iface_name("x", "b"))
    plan = node.weft("plan", "--detailed-exitcode", from_dir=node.src, expect=None)
    assert plan.returncode == 0, "a route through a missing interface is not wanted, and the kernel " \
                                 "already dropped it with the interface:\n" + plan.stdout
    assert set(weft_routes(node.ns)) == {"198.18.3.11"}


def test_a_pod_routed_by_another_tool_is_left_to_it(node_ns, tmp_path):
    a = host_iface_name("x", "a")
    veth(node_ns, a)
    in_ns(node_ns, "ip", "route", "add", "198.18.3.11/32", "dev", a, "scope", "link")    # proto boot: not weft's
    node = WeftNode(node_ns, tmp_path / "state")
    src = write_manifests(tmp_path / "src", PODS)
    node.weft("apply", from_dir=src)
    node.weft("plan", "--detailed-exitcode", from_dir=src, expect=0)
    assert "198.18.3.11" not in weft_routes(node_ns)
    node.weft("apply", "--destroy")
    assert "198.18.3.11 dev " + a in in_ns(node_ns, "ip", "route", "show", "proto", "boot")
