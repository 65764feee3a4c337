"""BIRD configuration rendering, without a kernel: who peers with whom, what is exported and
imported, determinism, passwords; every rendered file is checked by `bird -p`."""
from __future__ import annotations

import ipaddress
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from weft.model.cluster import (
    BGPConfiguration,
    BGPPeer,
    Block,
    ClusterState,
    Community,
    IPPool,
    Node,
    NodeBGP,
    PrefixAdvertisement,
    Secret,
    SecretKeyRef,
)
from weft.model.errors import InvalidDesiredState, WeftError
from weft.model.selector import parse_selector
from weft.renderers.bird import bgp_sessions, parse_protocol_name, protocol_name, redact, render_bird_config

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird (Debian package bird2)")


def node(i: int, labels: dict | None = None, asn: int | None = None, rr: str | None = None,
         v6: bool = False) -> Node:
    return Node(f"node-{i}", labels or {}, NodeBGP(f"198.18.0.{i}/24", f"2001:db8::{i}/64" if v6 else None, asn, rr))


def cluster(nodes: list[Node], **fields) -> ClusterState:
    pool = list(ipaddress.ip_network("198.18.4.0/22").subnets(new_prefix=26))
    blocks = tuple(Block(str(pool[int(n.name.split("-")[1]) - 1]), n.name) for n in nodes)
    base = dict(namespaces={}, endpoints=(), policies=(), nodes={n.name: n for n in nodes},
                ippools=(IPPool("pool", "198.18.4.0/22", 26),), blocks=blocks)
    return ClusterState(**(base | fields))


def names(state: ClusterState, node: str) -> list[str]:
    return [s.name for s in bgp_sessions(state, node)]


def definition(text: str, role: str, version: int = 4) -> str:
    """The text of the filter (or function) for `role`, from its first line to its closing brace."""
    match = re.search(rf"^(filter|function) weft_{role}_v{version}_[0-9a-f]{{12}}(\(\))? {{\n.*?^}}$", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"no {role} filter for IPv{version} in:\n{text}"
    return match.group(0)


def render(state: ClusterState, node: str, **options) -> str:
    """render_bird_config, and `bird -p` must accept what it rendered (when BIRD is installed)."""
    text = render_bird_config(state, node, **options)
    if shutil.which("bird"):
        with tempfile.NamedTemporaryFile("w", suffix=".conf") as f:
            f.write(text)
            f.flush()
            done = subprocess.run(["bird", "-p", "-c", f.name], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr + "\n" + text
    return text


def bird_check(text: str, tmp_path) -> None:
    path = tmp_path / "bird.conf"
    path.write_text(text)
    done = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + "\n" + text


def test_full_mesh_lower_address_is_passive():
    state = cluster([node(1), node(2), node(3)])
    assert names(state, "node-1") == ["Mesh_198_18_0_2", "Mesh_198_18_0_3"]
    one = {s.name: s for s in bgp_sessions(state, "node-1")}
    three = {s.name: s for s in bgp_sessions(state, "node-3")}
    assert all(s.passive for s in one.values()) and not any(s.passive for s in three.values())
    assert bgp_sessions(state, "node-2")[0].passive is False and bgp_sessions(state, "node-2")[1].passive is True
    assert all(s.hops is None for s in one.values())                  # same subnet: direct


def test_mesh_off_and_nodes_without_bgp():
    state = cluster([node(1), node(2), Node("node-3")],
                    bgp_configurations=(BGPConfiguration("default", node_to_node_mesh=False),))
    assert names(state, "node-1") == []
    state = cluster([node(1), node(2), Node("node-3")])
    assert names(state, "node-1") == ["Mesh_198_18_0_2"]              # node-3 has BGP off
    assert bgp_sessions(state, "node-3") == ()


def test_route_reflector_and_clients():
    rr = node(1, {"rr": "true"}, rr="244.0.0.1")
    state = cluster([rr, node(2), node(3)], bgp_peers=(
        BGPPeer("to-rr", node_selector=parse_selector("all()"), peer_selector=parse_selector("has(rr)")),))
    # mesh stays on for the clients; the RR is out of the mesh and reaches them by reverse peerings
    assert names(state, "node-1") == ["Node_198_18_0_2", "Node_198_18_0_3"]
    assert all(s.rr_client and s.rr_cluster_id == "244.0.0.1" for s in bgp_sessions(state, "node-1"))
    assert names(state, "node-2") == ["Mesh_198_18_0_3", "Node_198_18_0_1"]
    assert not any(s.rr_client for s in bgp_sessions(state, "node-2"))
    off = replace(state, bgp_configurations=(BGPConfiguration("default", node_to_node_mesh=False),))
    assert names(off, "node-2") == ["Node_198_18_0_1"]                 # clients peer only with the RR
    assert "rr client;" in render(state, "node-1")
    assert "source = RTS_BGP && net ~ [ 198.18.4.0/22+ ]" in render(state, "node-1")
    assert "source = RTS_BGP && net ~" not in render(state, "node-2")


def test_global_wins_over_node_specific_and_explicit_over_mesh():
    state = cluster([node(1), node(2)], bgp_peers=(
        BGPPeer("a-node", peer_ip="198.18.0.2", as_number=64512, node="node-1"),
        BGPPeer("b-global", peer_ip="198.18.0.2", as_number=64512),
        BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001, node_selector=parse_selector("rack == 'a'"))))
    assert names(state, "node-1") == ["Global_198_18_0_2"]
    state = replace(state, nodes={**state.nodes, "node-1": replace(state.nodes["node-1"], labels={"rack": "a"})})
    assert names(state, "node-1") == ["Global_198_18_0_2", "Node_198_18_0_254"]
    assert names(state, "node-2") == ["Node_198_18_0_1"]              # the reverse of b-global
    tor = bgp_sessions(state, "node-1")[1]
    assert (tor.peer_as, tor.local_as, tor.export, tor.passive) == (65001, 64512, "external", False)
    assert tor.peer_node is None


def test_peer_ip_of_a_node_gets_the_reverse_peering_only_with_matching_as():
    state = cluster([node(1), node(2), node(3)], bgp_configurations=(
        BGPConfiguration("default", node_to_node_mesh=False),), bgp_peers=(
        BGPPeer("one-to-three", peer_ip="198.18.0.3", as_number=64512, node="node-1"),))
    assert names(state, "node-1") == ["Node_198_18_0_3"] and names(state, "node-3") == ["Node_198_18_0_1"]
    assert names(state, "node-2") == []
    other_as = replace(state, bgp_peers=(replace(state.bgp_peers[0], as_number=65000),))
    assert names(other_as, "node-3") == []                            # not that node: an external router
    assert bgp_sessions(other_as, "node-1")[0].export == "external"


def test_ebgp_by_node_as_and_ports():
    state = cluster([node(1, asn=65101), node(2, asn=65102)], bgp_configurations=(
        BGPConfiguration("default", listen_port=1790),))
    (s,) = bgp_sessions(state, "node-1")
    assert (s.local_as, s.peer_as, s.port, s.name) == (65101, 65102, 1790, "Mesh_198_18_0_2_port_1790")
    assert "local 198.18.0.1 port 1790 as 65101;" in render(state, "node-1")


def test_exports_own_blocks_only_and_imports_pools_only():
    state = cluster([node(1), node(2)], ippools=(IPPool("pool", "198.18.4.0/22", 26),
                                               IPPool("quiet", "198.18.8.0/24", 26, disable_bgp_export=True)),
                    blocks=(Block("198.18.4.0/26", "node-1"), Block("198.18.8.0/26", "node-1"),
                            Block("198.18.4.64/26", "node-2")))
    text = render(state, "node-1")
    assert 'if proto = "weft_blocks_v4" && net ~ [ 198.18.4.0/26 ] then' in text
    assert "route 198.18.8.0/26 blackhole;" in text                    # still a blackhole here
    assert "if net ~ [ 198.18.4.0/26+, 198.18.8.0/26+ ] then reject;" in text
    assert "if net ~ [ 198.18.4.0/22+, 198.18.8.0/24+ ] then accept;" in text
    assert "198.18.4.64" not in text
    assert "learn off;" in text and "import none;" in text


def test_services_to_external_peers_and_communities():
    state = cluster([node(1), node(2)], bgp_configurations=(BGPConfiguration(
        "default", service_cluster_ips=("198.19.0.0/16",), service_external_ips=("198.19.9.9/32",),
        communities=(Community("lab", "65001:100"),),
        prefix_advertisements=(PrefixAdvertisement("198.18.4.0/22", ("65001:100", "65001:1:2")),)),),
        bgp_peers=(BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001),))
    text = render(state, "node-1")
    external, to_nodes = definition(text, "export_external"), definition(text, "export_node")
    assert 'proto = "weft_services_v4"' in external and "weft_services" not in to_nodes
    assert "route 198.19.0.0/16 blackhole;" in text and "route 198.19.9.9/32 blackhole;" in text
    assert "bgp_community.add((65001, 100));" in text and "bgp_large_community.add((65001, 1, 2));" in text
    assert "weft_services" not in definition(text, "kernel")


def test_password_from_secret_redacted_and_missing():
    peer = BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001, password=SecretKeyRef("bgp", "tor"))
    state = cluster([node(1)], bgp_peers=(peer,), secrets=(Secret("kube-system", "bgp", {"tor": "s3cr3t"}),))
    text = render(state, "node-1")
    assert 'password "s3cr3t";' in text
    assert "s3cr3t" not in redact(text) and 'password "(redacted)";' in redact(text)
    with pytest.raises(InvalidDesiredState, match=r"BGPPeer tor: spec.password.secretKeyRef: no Secret 'bgp'"):
        render(replace(state, secrets=()), "node-1")
    bad = replace(state, secrets=(Secret("calico-system", "bgp", {"tor": 'a"b'}),))
    with pytest.raises(InvalidDesiredState, match="double quotes"):
        render(bad, "node-1")


def test_deterministic_whatever_the_input_order():
    nodes = [node(i, {"rack": "a" if i % 2 else "b"}) for i in range(1, 9)]
    peers = tuple(BGPPeer(f"p{i}", peer_ip=f"198.18.1.{i}", as_number=65000 + i) for i in range(10))
    state = cluster(nodes, bgp_peers=peers)
    first = render(state, "node-3")
    rng = random.Random(7)
    for _ in range(5):
        shuffled = nodes[:]
        rng.shuffle(shuffled)
        again = cluster(shuffled, bgp_peers=tuple(rng.sample(peers, len(peers))),
                        blocks=tuple(rng.sample(state.blocks, len(state.blocks))))
        assert render(again, "node-3") == first
    assert not re.search(r"\d{4}-\d{2}-\d{2}", first)                 # no timestamps


def test_protocol_names_map_back():
    for kind, address, port in [("Mesh", "198.18.0.2", 179), ("Global", "2001:db8::1", 179),
                                ("Node", "198.18.0.254", 1790)]:
        name = protocol_name(kind, address, port)
        assert parse_protocol_name(name) == (kind, address, None if port == 179 else port)
    assert parse_protocol_name("weft_kernel_v4") is None


@needs_bird
def test_rendered_configs_pass_bird_check(tmp_path):
    rr = node(1, {"rr": "true"}, rr="244.0.0.1", v6=True)
    state = cluster([rr, node(2, v6=True), node(3, asn=65003)],
                    ippools=(IPPool("pool", "198.18.4.0/22", 26), IPPool("v6", "2001:db8:1::/48", 122)),
                    blocks=(Block("198.18.4.0/26", "node-1"), Block("2001:db8:1::/122", "node-2")),
                    bgp_configurations=(BGPConfiguration(
                        "default", log_severity="Debug", service_loadbalancer_ips=("198.19.0.0/24",),
                        prefix_advertisements=(PrefixAdvertisement("198.18.4.0/22", ("1:2",)),),
                        node_mesh_password=SecretKeyRef("bgp", "mesh"), node_mesh_max_restart_time="2m"),),
                    bgp_peers=(BGPPeer("to-rr", node_selector=parse_selector("all()"),
                                       peer_selector=parse_selector("has(rr)")),
                               BGPPeer("tor", peer_ip="198.18.9.1", peer_port=1790, as_number=65001, ttl_security=3,
                                       next_hop_mode="Self", keepalive_time="3s", max_restart_time="90s",
                                       source_address="None", password=SecretKeyRef("bgp", "k")),
                               BGPPeer("tor6", peer_ip="2001:db8::fe", as_number=65001, keep_original_next_hop=True)),
                    secrets=(Secret("calico-system", "bgp", {"k": "pw", "mesh": "m3sh pw!"}),))
    for n in state.nodes:
        for target in ("stderr", str(tmp_path / "bird.log")):
            text = render(state, n, hold_time=9, log_target=target)
            bird_check(text, tmp_path)
    assert "Global_2001_db8__fe" in names(state, "node-2")
    text = render(state, "node-2")
    assert {"import_external", "export_external", "import_node", "communities"} <= set(filter_names(text))
    assert 'password "m3sh pw!";' in text and "graceful restart time 120;" in text
    assert not (tmp_path / "bird.log").exists()                # `bird -p` does not open the log file


# --- filters named by their content (#9.6: a new block must always be announced) ----------------

def filter_names(text: str) -> dict[str, str]:
    """role -> rendered name, for every IPv4 filter and function of the config."""
    return {m.group(2): m.group(1) for m in
            re.finditer(r"^(?:filter|function) (weft_(\w+?)_v4_[0-9a-f]{12})", text, re.MULTILINE)}


def test_a_changed_filter_gets_a_new_name_and_sessions_use_it():
    """BIRD 2.0.12 compares a filter with the old one *of the same name* on `configure` and took a
    prefix set grown inside one /24 for unchanged, so the new block was never exported. A filter
    whose body changed must therefore carry a new name; an unchanged one must keep its name (or
    every session would be re-fed on every run)."""
    state = cluster([node(1), node(2), node(3)])
    before = render(state, "node-1")
    grown = replace(state, blocks=state.blocks + (Block("198.18.4.192/26", "node-1"),))
    after = render(grown, "node-1")
    old, new = filter_names(before), filter_names(after)
    assert set(old) == set(new) == {"import_node", "export_node", "kernel"}     # mesh only: no external filters
    assert new["export_node"] != old["export_node"] and new["import_node"] != old["import_node"]
    assert new["kernel"] == old["kernel"]
    assert "198.18.4.0/26, 198.18.4.192/26 ]" in definition(after, "export_node")
    for name in ("Mesh_198_18_0_2", "Mesh_198_18_0_3"):
        block = after[after.index(f"protocol bgp {name} "):]
        block = block[:block.index("\n}\n")]
        assert f"import filter {new['import_node']};" in block and f"export filter {new['export_node']};" in block
    assert old["export_node"] not in after                                   # nothing refers to the old one
    assert render(grown, "node-1") == after                      # names are stable
    # another node's new block changes nothing here: node-1 has no external peer
    assert render(replace(state, blocks=state.blocks + (Block("198.18.5.0/26", "node-2"),)),
                              "node-1") == before


def test_a_changed_function_renames_the_filters_that_call_it():
    advert = PrefixAdvertisement("198.18.4.0/22", ("65001:100",))
    state = cluster([node(1), node(2)],
                    bgp_configurations=(BGPConfiguration("default", prefix_advertisements=(advert,)),))
    before = filter_names(render(state, "node-1"))
    changed = replace(state, bgp_configurations=(BGPConfiguration("default", prefix_advertisements=(
        replace(advert, communities=("65001:200",)),)),))
    text = render(changed, "node-1")
    after = filter_names(text)
    assert after["communities"] != before["communities"]
    assert after["export_node"] != before["export_node"]                     # its body calls the new name
    assert f"{after['communities']}();" in definition(text, "export_node")
    assert after["import_node"] == before["import_node"]


# --- what routers that are not weft nodes may announce ---------------------------------------------

def test_external_peers_give_only_whole_blocks_of_other_nodes():
    state = cluster([node(1), node(2), node(3)],
                    ippools=(IPPool("pool", "198.18.4.0/22", 26),
                             IPPool("quiet", "198.18.8.0/24", 26, disable_bgp_export=True)),
                    blocks=(Block("198.18.4.0/26", "node-1"), Block("198.18.4.64/26", "node-2"),
                            Block("198.18.5.0/26", "node-2"), Block("198.18.4.128/26", "node-3"),
                            Block("198.18.8.0/26", "node-3")),
                    bgp_peers=(BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001),))
    text = render(state, "node-1")
    external = definition(text, "import_external")
    assert "if net ~ [ 198.18.4.0/26+ ] then reject;" in external              # own block and anything inside
    assert "if net ~ [ 198.18.4.64/26, 198.18.4.128/26, 198.18.5.0/26 ] then accept;" in external   # exact only
    assert "198.18.8.0" not in external                                       # a pool BGP does not carry
    assert "/22" not in external                                              # no other address of a pool
    assert external.rstrip("}").rstrip().endswith("reject;")
    tor = next(s for s in bgp_sessions(state, "node-1") if s.name == "Global_198_18_0_254")
    names = filter_names(text)
    block = text[text.index("protocol bgp Global_198_18_0_254 "):]
    assert f"import filter {names['import_external']};" in block[:block.index("\n}\n")] and tor.export == "external"
    # nodes still trade anything inside the pools (a route reflector reflects what it learned)
    assert "if net ~ [ 198.18.4.0/22+, 198.18.8.0/24+ ] then accept;" in definition(text, "import_node")
    # a block allocated anywhere in the cluster renames the external import filter (peers resend)
    grown = render(replace(state, blocks=state.blocks + (Block("198.18.6.0/26", "node-3"),)), "node-1")
    assert filter_names(grown)["import_external"] != names["import_external"]


# --- the node-to-node mesh: password and graceful restart ----------------------------------------------

MESH_SECRET = Secret("kube-system", "bgp-mesh", {"password": "m3sh-s3cr3t"})
MESH_REF = SecretKeyRef("bgp-mesh", "password")


def mesh_state(password: SecretKeyRef | None = MESH_REF, secrets=(MESH_SECRET,), **config) -> ClusterState:
    return cluster([node(1), node(2), node(3)], secrets=secrets,
                   bgp_configurations=(BGPConfiguration("default", node_mesh_password=password, **config),),
                   bgp_peers=(BGPPeer("tor", peer_ip="198.18.0.254", as_number=65001),))


def test_mesh_password_and_restart_time_apply_to_mesh_sessions_only():
    state = mesh_state(node_mesh_max_restart_time="90s")
    sessions = {s.name: s for s in bgp_sessions(state, "node-1")}
    assert {n: (s.password, s.restart_time) for n, s in sessions.items()} == {
        "Global_198_18_0_254": (None, None), "Mesh_198_18_0_2": ("m3sh-s3cr3t", 90),
        "Mesh_198_18_0_3": ("m3sh-s3cr3t", 90)}
    text = render(state, "node-1")
    assert text.count('password "m3sh-s3cr3t";') == 2 and text.count("graceful restart time 90;") == 2
    assert "m3sh-s3cr3t" not in redact(text) and redact(text).count('password "(redacted)";') == 2
    # the same on every node: both ends of a session agree
    assert {s.name: s.password for s in bgp_sessions(state, "node-3") if s.kind == "Mesh"} == {
        "Mesh_198_18_0_1": "m3sh-s3cr3t", "Mesh_198_18_0_2": "m3sh-s3cr3t"}
    # a route reflector is out of the mesh: its Node_ sessions keep the BGPPeer's settings
    rr = replace(state, nodes={**state.nodes, "node-1": node(1, rr="244.0.0.1")})
    assert all(s.password is None for s in bgp_sessions(rr, "node-1"))


def test_mesh_password_secret_missing_or_unusable_names_the_configuration():
    with pytest.raises(InvalidDesiredState, match=r"BGPConfiguration default: spec\.nodeMeshPassword\.secretKeyRef: "
                                                  r"no Secret 'bgp-mesh' with key 'password'"):
        render(mesh_state(secrets=()), "node-1")
    wrong_key = mesh_state(password=SecretKeyRef("bgp-mesh", "other"))
    with pytest.raises(InvalidDesiredState, match="no Secret 'bgp-mesh' with key 'other'"):
        render(wrong_key, "node-2")
    for bad in ('a"b', "", "x" * 81, "tab\there"):
        with pytest.raises(InvalidDesiredState, match=r"BGPConfiguration default: spec\.nodeMeshPassword.*1-80 bytes"):
            render(mesh_state(secrets=(Secret("calico-system", "bgp-mesh", {"password": bad}),)), "node-1")
    # the mesh turned off: the password is not used, so not needed
    off = mesh_state(secrets=(), node_to_node_mesh=False)
    assert "password" not in render(off, "node-1")


# --- BIRD's log --------------------------------------------------------------------------------------

def test_log_to_a_file_that_bird_rotates():
    state = cluster([node(1), node(2)])
    text = render(state, "node-1", log_target="/var/lib/weft/bird.log")
    assert ('log "/var/lib/weft/bird.log" 8388608 "/var/lib/weft/bird.log.1" '
            "{ info, remote, warning, error, auth, fatal, bug, trace };") in text
    assert 'log "/x/b.log" 4096 "/x/b.log.1" all;' in render(
        replace(state, bgp_configurations=(BGPConfiguration("default", log_severity="Debug"),)), "node-1",
        log_target=Path("/x/b.log"), log_limit=4096)
    assert "log stderr {" in render(state, "node-1", log_target="stderr")
    assert "log syslog {" in render(state, "node-1")
    for bad, why in (("bird.log", "absolute path"), ('/tmp/a"b', "double quote"), ("/tmp/a\nb", "newline")):
        with pytest.raises(WeftError, match=why):
            render(state, "node-1", log_target=bad)
