"""IPAM without a kernel: the IPPool/IPAMBlock/BlockAffinity converters and their cross-checks,
node.json, next-fit allocation, exhaustion, crash-safe state under concurrent processes, and
`weft ipam check`'s findings."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from weft.desired.kinds import ipam as desired_ipam
from weft.desired.loader import build_cluster_state, convert_object
from weft.model.cluster import Block
from weft.model.errors import InvalidDesiredState
from weft.reconciler import ipam_cli
from weft.store import ipam
from weft.store.statedir import UnsafeState

CRD, V3 = "crd.projectcalico.org/v1", "projectcalico.org/v3"


def pool(name="pool4", cidr="198.18.0.0/16", api=CRD, **spec):
    return {"apiVersion": api, "kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr, **spec}}


def ipam_block(cidr, node, api=CRD, **spec):
    name = cidr.replace(".", "-").replace(":", "-").replace("/", "-")
    return {"apiVersion": api, "kind": "IPAMBlock", "metadata": {"name": name},
            "spec": {"cidr": cidr, "affinity": f"host:{node}" if node else None, **spec}}


def affinity(cidr, node, state="confirmed", api=CRD, **spec):
    name = f"{node}-" + cidr.replace(".", "-").replace(":", "-").replace("/", "-")
    return {"apiVersion": api, "kind": "BlockAffinity", "metadata": {"name": name},
            "spec": {"cidr": cidr, "node": node, "state": state, **spec}}


def load(*objects):
    return build_cluster_state(("m.yaml", o) for o in objects)


def errors(*objects) -> list[str]:
    with pytest.raises(InvalidDesiredState) as info:
        load(*objects)
    return [f"{e.obj}: {e.field}: {e.message}" for e in info.value.errors]


# ---- converters ---------------------------------------------------------------------------

@pytest.mark.parametrize("api", [CRD, V3])
def test_both_api_versions_convert_with_calicos_defaults(api):
    state = load(pool(api=api), pool("pool6", "2001:2::/48", api=api, natOutgoing=True, disabled=True,
                                     disableBGPExport=True, nodeSelector="rack == 'r1'"),
                 ipam_block("198.18.4.0/26", "n1", api=api), affinity("2001:2::/122", "n2", api=api))
    p4, p6 = sorted(state.ippools, key=lambda p: p.name)
    assert (p4.cidr, p4.block_size, p4.node_selector, p4.disabled) == ("198.18.0.0/16", 26, None, False)
    assert (p6.block_size, p6.disabled, p6.nat_outgoing, p6.disable_bgp_export) == (122, True, True, True)
    assert p6.node_selector.matches({"rack": "r1"}) and not p6.node_selector.matches({"rack": "r2"})
    assert sorted(state.blocks, key=lambda b: b.cidr) == [Block("198.18.4.0/26", "n1", "IPAMBlock 198-18-4-0-26"),
                                    Block("2001:2::/122", "n2", "BlockAffinity n2-2001-2---122")]


def test_calicos_own_fields_are_accepted_and_all_selects_every_node():
    state = load(pool(ipipMode="Never", vxlanMode="Never", allowedUses=["Workload"], nodeSelector="all()"),
                 ipam_block("198.18.4.0/26", "n1", strictAffinity=False, allocations=[None] * 64,
                            unallocated=list(range(64)), attributes=[]))
    assert state.ippools[0].node_selector is None and len(state.blocks) == 1


def test_blocks_that_give_no_node_anything_are_nobodys():
    state = load(pool(), ipam_block("198.18.4.0/26", None), ipam_block("198.18.5.0/26", "n1", deleted=True),
                 affinity("198.18.6.0/26", "n1", state="pending"), affinity("198.18.7.0/26", "n1", "pendingDeletion"),
                 affinity("198.18.8.0/26", "n1", deleted="true"),
                 {**ipam_block("198.18.9.0/26", None), "spec": {"cidr": "198.18.9.0/26", "affinity": "virtual:x"}})
    assert state.blocks == ()


def test_an_ipamblock_and_its_affinity_may_both_name_the_owner():
    state = load(pool(), ipam_block("198.18.4.0/26", "n1"), affinity("198.18.4.0/26", "n1"))
    assert {b.node for b in state.blocks} == {"n1"}


@pytest.mark.parametrize("objects, expected", [
    ([pool(cidr="198.18.0.300/16")], "IPPool pool4: spec.cidr: invalid CIDR '198.18.0.300/16'"),
    ([pool(cidr=None)], "IPPool pool4: spec.cidr: missing"),
    ([pool(blockSize=33)], "IPPool pool4: spec.blockSize: must be between 20 and 32 for an IPv4 pool, got 33"),
    ([pool(cidr="2001:2::/48", blockSize=64)], "IPPool pool4: spec.blockSize: must be between 116 and 128"),
    ([pool(cidr="198.18.4.0/28", blockSize=26)], "IPPool pool4: spec.blockSize: blocks of /26 do not fit in the "
                                                  "pool's /28: must be at least 28"),
    ([pool(blockSize="26")], "IPPool pool4: spec.blockSize: must be an integer, got '26'"),
    ([pool(disabled="yes")], "IPPool pool4: spec.disabled: must be a boolean"),
    ([pool(nodeSelector="rack = 'r1'")], "IPPool pool4: spec.nodeSelector: "),
    ([pool(), ipam_block("198.18.4.0/26", "n1", affinity="n1")], "IPAMBlock 198-18-4-0-26: spec.affinity: must be"),
    ([pool(), affinity("198.18.4.0/26", "n1", state="maybe")], "BlockAffinity n1-198-18-4-0-26: spec.state: must "
                                                                "be one of confirmed, pending, pendingDeletion"),
    ([pool(), {**affinity("198.18.4.0/26", "n1"), "spec": {"cidr": "198.18.4.0/26"}}],
     "BlockAffinity n1-198-18-4-0-26: spec.node: missing"),
    ([{"apiVersion": CRD, "kind": "IPPool", "metadata": {"name": "nospec"}}], "IPPool nospec: spec: missing"),
])
def test_bad_ipam_objects_are_named_with_their_field(objects, expected):
    found = errors(*objects)
    assert any(e.startswith(expected) for e in found), found


CROSS_CASES = [
    ([pool(), pool("other", "198.18.4.0/24")], "IPPool other: spec.cidr: 198.18.4.0/24 overlaps IPPool pool4"),
    ([pool(), ipam_block("10.9.0.0/26", "n1")], "IPAMBlock 10-9-0-0-26: spec.cidr: 10.9.0.0/26 is not inside any "
                                                 "IPPool"),
    ([pool(), ipam_block("198.18.4.0/24", "n1")], "IPAMBlock 198-18-4-0-24: spec.cidr: 198.18.4.0/24 is not a block "
                                                   "of IPPool pool4: its blocks are /26"),
    ([pool(), ipam_block("198.18.4.0/26", "n1"), affinity("198.18.4.0/26", "n2")],
     "BlockAffinity n2-198-18-4-0-26: spec.node: block 198.18.4.0/26 is given to node 'n2', but IPAMBlock "
     "198-18-4-0-26 gives it to node 'n1': a block has one owner"),
]


def cross_errors(*objects) -> list[str]:
    """desired.ipam.check_state over one load's converted objects (the loader runs it on every load)."""
    problems = []
    converted = [convert_object("m.yaml", o, problems) for o in objects]
    assert problems == []
    return [f"{e.obj}: {e.field}: {e.message}" for e in desired_ipam.check_state(converted)]


@pytest.mark.parametrize("objects, expected", CROSS_CASES)
def test_ipam_objects_that_contradict_each_other_are_named(objects, expected):
    found = cross_errors(*objects)
    assert [e for e in found if e.startswith(expected)], found


def test_consistent_ipam_objects_pass_the_cross_checks():
    assert cross_errors(pool(), pool("v6", "2001:2::/48"), ipam_block("198.18.4.0/26", "n1"),
                        affinity("198.18.4.0/26", "n1"), affinity("2001:2::/122", "n2")) == []


# ---- node.json ----------------------------------------------------------------------------

def pools_and_blocks(*objects):
    state = load(*objects)
    return state.ippools, state.blocks


def test_node_document_keeps_this_nodes_blocks_once_and_evaluates_selectors(tmp_path):
    pools, blocks = pools_and_blocks(
        pool(nodeSelector="rack == 'r1'"), pool("v6", "2001:2::/48"),
        ipam_block("198.18.5.0/26", "n1"), affinity("198.18.5.0/26", "n1"), ipam_block("198.18.4.0/26", "n1"),
        ipam_block("198.18.6.0/26", "n2"), affinity("2001:2::/122", "n1"))
    doc = ipam.node_ipam_document("n1", pools, blocks, ipam.source_of(from_dir=tmp_path), {"rack": "r2"})
    assert [b["cidr"] for b in doc["blocks"]] == ["198.18.4.0/26", "198.18.5.0/26", "2001:2::/122"]
    assert [b["pool"] for b in doc["blocks"]] == ["pool4", "pool4", "v6"]
    assert {p["name"]: p["selects_node"] for p in doc["pools"]} == {"pool4": False, "v6": True}
    assert ipam.families(doc) == [6]
    assert doc["source"] == {"manifests": str(tmp_path)}


def test_write_node_ipam_rewrites_only_on_change_and_keeps_claimed_blocks(tmp_path):
    pools, blocks = pools_and_blocks(pool(), ipam_block("198.18.4.0/26", "n1"))
    source = ipam.source_of(kubeconfig="/k")
    assert ipam.write_node_ipam(tmp_path, "n1", pools, blocks, source)
    assert not ipam.write_node_ipam(tmp_path, "n1", pools, blocks, source)
    ipam.Store(tmp_path)._add_block({"cidr": "198.18.9.0/26", "pool": "pool4", "origin": "IPAMBlock 198-18-9-0-26"})
    ipam.write_node_ipam(tmp_path, "n1", pools, blocks, source)   # a run whose read predates the claim
    assert [b["cidr"] for b in ipam.read_node_ipam(tmp_path)["blocks"]] == ["198.18.4.0/26", "198.18.9.0/26"]


def test_unreadable_state_is_reported_not_guessed(tmp_path):
    assert ipam.read_node_ipam(tmp_path) is None and ipam.read_allocations(tmp_path) == []
    (tmp_path / "ipam").mkdir()
    (tmp_path / "ipam" / "allocations.json").write_text("{half")
    with pytest.raises(ipam.Unavailable, match="allocations.json"):
        ipam.read_allocations(tmp_path)


RECORD = {"namespace": "ns", "pod": "p", "iface": "weft-p", "ips": ["198.18.4.7"], "container_id": "c1",
          "ifname": "eth0", "network": "net", "active": True, "created": 1.0}
CORRUPT = [
    ('{"format":1}', "\"allocations\""),
    ('{"format":2,"allocations":[]}', "format 1"),
    ('[]', "format 1"),
    ('{"format":1,"allocations":{}}', "\"allocations\""),
    (json.dumps({"format": 1, "allocations": [{k: v for k, v in RECORD.items() if k != "ips"}]}),
     "allocations[0].ips"),
    (json.dumps({"format": 1, "allocations": [{k: v for k, v in RECORD.items() if k != "pod"}]}),
     "allocations[0].pod"),
    (json.dumps({"format": 1, "allocations": [RECORD | {"ips": ["198.18.4.300"]}]}), "allocations[0].ips[0]"),
    (json.dumps({"format": 1, "allocations": [RECORD | {"iface": "a/../../b"}]}), "allocations[0].iface"),
    (json.dumps({"format": 1, "allocations": [RECORD | {"active": "yes"}]}), "allocations[0].active"),
    (json.dumps({"format": 1, "allocations": [RECORD], "cursor": {"4": "x"}}), "cursor.4"),
    ("[" * 100000, "not valid JSON"),
]


@pytest.mark.parametrize("text, named", CORRUPT, ids=[c[1] + f"-{i}" for i, c in enumerate(CORRUPT)])
def test_records_that_are_not_what_weft_writes_are_corrupt_never_empty(tmp_path, text, named):
    (tmp_path / "ipam").mkdir(mode=0o700)
    (tmp_path / "ipam" / "allocations.json").write_text(text)
    with pytest.raises(ipam.CorruptRecords) as info:
        ipam.read_allocations(tmp_path)
    assert "allocations.json" in str(info.value) and named in str(info.value)
    assert "weft ipam rebuild" in str(info.value)


def test_node_file_that_is_not_what_weft_writes_is_corrupt(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    path = tmp_path / "ipam" / "node.json"
    doc = json.loads(path.read_text())
    for bad, named in ((doc | {"pools": "all"}, "\"pools\""), (doc | {"blocks": [{"cidr": "198.18.4.0/99"}]},
                                                               "blocks[0].cidr"),
                       (doc | {"source": {"manifests": 3}}, "source.manifests"), ({"format": 1}, "node")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ipam.CorruptNodeFile, match=named.replace("[", r"\[")):
            ipam.read_node_ipam(tmp_path)
        with pytest.raises(ipam.Unavailable):
            add(store, "c1")


def kernel(*pods, unnamed=()):
    """recover() and held() of a kernel where weft wired `pods` ((iface, container id, ip) each)."""
    links = {iface: f"weft:{cid}:eth0" for iface, cid, _ in pods + unnamed}
    routes = [(ip, iface) for iface, _, ip in pods + unnamed]
    names = {iface: ("ns", iface.removeprefix("weft-")) for iface, _, _ in pods}
    return (lambda: ipam.records_from_kernel(links, routes, names, "net"),
            lambda: {ip for _, _, ip in pods + unnamed})


def test_missing_records_are_rebuilt_from_the_kernel_and_no_live_address_is_handed_out(tmp_path, capsys):
    node_with(tmp_path, "198.18.4.0/26")
    recover, held = kernel(("weft-a", "ca", "198.18.4.0"), ("weft-b", "cb", "198.18.4.1"))
    store = ipam.Store(tmp_path, held=held, recover=recover)
    new, created = store.allocate("net", "cc", "eth0", "ns", "c", "weft-c")
    assert created and new.ips == ("198.18.4.2",)
    assert [(a.pod, a.ips) for a in ipam.read_allocations(tmp_path)] == [
        ("a", ("198.18.4.0",)), ("b", ("198.18.4.1",)), ("c", ("198.18.4.2",))]
    assert "was missing: rebuilt 2 records" in capsys.readouterr().err
    assert store.allocate("net", "ca", "eth0", "ns", "a", "weft-a") == (ipam.read_allocations(tmp_path)[0], False), \
        "the runtime's ADD again of a rebuilt attachment gets its address back"


def test_corrupt_records_are_kept_aside_and_rebuilt_with_one_log_line(tmp_path, capsys):
    node_with(tmp_path, "198.18.4.0/26")
    (tmp_path / "ipam" / "allocations.json").write_text('{"format":1}')
    recover, held = kernel(("weft-a", "ca", "198.18.4.0"))
    store = ipam.Store(tmp_path, held=held, recover=recover)
    assert [a.pod for a in store.allocations()] == ["a"]
    aside = list((tmp_path / "ipam").glob("allocations.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"format":1}'
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "kept it as allocations.json.corrupt-" in err and "1 records" in err


def test_an_address_a_live_interface_holds_is_never_allocated_even_unrecorded(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    store.held = lambda: {f"198.18.4.{i}" for i in range(64)} - {"198.18.4.1", "198.18.4.3"}
    assert [add(store, f"c{i}")[0].ips for i in range(2)] == [("198.18.4.1",), ("198.18.4.3",)]
    with pytest.raises(ipam.Exhausted):
        add(store, "c3")


def test_records_of_pods_nothing_names_are_kept_apart_until_an_add_names_them(tmp_path):
    node_with(tmp_path, "198.18.4.0/26")
    recover, held = kernel(("weft-a", "ca", "198.18.4.0"), unnamed=(("weftx", "cx", "198.18.4.1"),))
    store = ipam.Store(tmp_path, held=held, recover=recover)
    assert [(a.pod, a.iface) for a in store.allocations()] == [("a", "weft-a"), ("", "weftx")]
    assert [a.pod for a in ipam.read_allocations(tmp_path)] == ["a"], "the reconcile run sees named pods only"
    again, created = store.allocate("net", "cx", "eth0", "ns", "x", "weftx")
    assert (again.ips, created) == (("198.18.4.1",), False)
    assert [a.pod for a in ipam.read_allocations(tmp_path)] == ["a", "x"]
    store.release("net", "cx", "eth0")
    assert [a.pod for a in store.allocations()] == ["a"]


def test_records_from_kernel_need_weft_alias_and_a_route():
    links = {"weft-a": "weft:c-a:eth0", "weft-b": "someone-else", "weft-c": "weft:c-c:eth0", "weft-d": None}
    routes = [("198.18.4.0", "weft-a"), ("2001:db8::5", "weft-a"), ("198.18.4.9", "weft-b"),
              ("198.18.9.0/26", "weft-c"), ("198.18.4.7", "weft-d")]
    records, unknown = ipam.records_from_kernel(links, routes, {"weft-a": ("ns", "a")}, "net", now=5.0)
    assert records == [ipam.Allocation("ns", "a", "weft-a", ("198.18.4.0", "2001:db8::5"), "c-a", "eth0", "net",
                                       True, 5.0)]
    assert unknown == ["weft-b", "weft-c", "weft-d"]


# ---- the state dir: nothing read there is trusted ---------------------------------------------

def test_ipam_files_are_never_read_or_written_through_a_link(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "ipam" / "allocations.json.tmp").symlink_to(victim)       # the old fixed temporary name
    add(store, "c1")
    assert victim.read_text() == "precious"
    (tmp_path / "ipam" / "allocations.json").unlink()
    (tmp_path / "ipam" / "allocations.json").symlink_to(victim)
    with pytest.raises(UnsafeState, match="allocations.json is a symbolic link"):
        ipam.read_allocations(tmp_path)
    with pytest.raises(UnsafeState):
        add(store, "c2")
    assert victim.read_text() == "precious"
    (tmp_path / "ipam" / "lock").unlink()
    (tmp_path / "ipam" / "lock").symlink_to(tmp_path / "created-by-weft")
    with pytest.raises(UnsafeState, match="lock is a symbolic link"):
        add(store, "c3")
    assert not (tmp_path / "created-by-weft").exists()


def test_ipam_files_of_another_user_or_writable_by_others_are_refused(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    node_file = tmp_path / "ipam" / "node.json"
    os.chown(node_file, 65534, 65534)
    with pytest.raises(UnsafeState, match="node.json belongs to uid 65534"):
        ipam.read_node_ipam(tmp_path)
    os.chown(node_file, 0, 0)
    node_file.chmod(0o666)
    with pytest.raises(UnsafeState, match="writable by group or others"):
        add(store, "c1")
    node_file.chmod(0o600)
    (tmp_path / "ipam").chmod(0o777)
    with pytest.raises(UnsafeState, match="ipam is writable by group or others"):
        add(store, "c1")
    (tmp_path / "ipam").chmod(0o700)
    tmp_path.chmod(0o757)
    with pytest.raises(UnsafeState, match="state dir .* is writable by group or others"):
        ipam.Store(tmp_path)
    tmp_path.chmod(0o700)
    assert add(store, "c1")[0].ips == ("198.18.4.0",)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ipam").iterdir() if p.is_file()}
    assert modes == {"node.json": 0o600, "allocations.json": 0o600, "lock": 0o600}


# ---- allocation ---------------------------------------------------------------------------

def node_with(tmp_path, *blocks, node="n1", extra=()):
    pools, model_blocks = pools_and_blocks(pool(), *(ipam_block(b, node) for b in blocks), *extra)
    ipam.write_node_ipam(tmp_path, node, pools, model_blocks, ipam.source_of(from_dir=tmp_path))
    return ipam.Store(tmp_path)


def add(store, cid, pod=None, ifname="eth0"):
    pod = pod or cid
    return store.allocate("net", cid, ifname, "ns", pod, f"weft-{pod}")


def test_same_attachment_same_address_and_next_fit_after_release(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    a, created = add(store, "c1")
    assert created and a.ips == ("198.18.4.0",)
    again, created = add(store, "c1")
    assert not created and again.ips == a.ips
    b, _ = add(store, "c2")
    store.release("net", "c1", "eth0")
    c, _ = add(store, "c3")
    assert (b.ips, c.ips) == (("198.18.4.1",), ("198.18.4.2",)), "a released address is reused last"
    assert store.release("net", "c1", "eth0") is None, "releasing twice is fine"


def test_exhausted_pool_is_named_and_a_second_block_is_used_first(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26", "198.18.4.64/26")
    ips = {add(store, f"c{i}")[0].ips[0] for i in range(128)}
    assert len(ips) == 128
    with pytest.raises(ipam.Exhausted, match=r"IPPool pool4 \(198.18.0.0/16\) is exhausted on node 'n1': its blocks "
                                             r"198.18.4.0/26, 198.18.4.64/26 have no free address \(128 of 128"):
        add(store, "c-too-many")


def test_node_without_block_or_pool_says_what_to_declare(tmp_path):
    store = node_with(tmp_path)
    with pytest.raises(ipam.Exhausted, match="has no block of it; declare one for the node"):
        add(store, "c1")
    pools, _ = pools_and_blocks(pool(nodeSelector="rack == 'r9'"))
    ipam.write_node_ipam(tmp_path, "n1", pools, (), ipam.source_of(from_dir=tmp_path))
    with pytest.raises(ipam.Exhausted, match="no enabled IPPool selects node 'n1'"):
        add(store, "c1")


def test_dual_stack_pod_gets_one_address_per_family(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26",
                      extra=[pool("v6", "2001:2::/48"), affinity("2001:2::/122", "n1")])
    a, _ = add(store, "c1")
    assert a.ips == ("198.18.4.0", "2001:2::")


def test_disabled_pool_keeps_its_addresses_but_gives_no_new_ones(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    add(store, "c1")
    pools, blocks = pools_and_blocks(pool(disabled=True), ipam_block("198.18.4.0/26", "n1"))
    ipam.write_node_ipam(tmp_path, "n1", pools, blocks, ipam.source_of(from_dir=tmp_path))
    assert ipam.read_allocations(tmp_path)[0].ips == ("198.18.4.0",)
    with pytest.raises(ipam.Exhausted):
        add(store, "c2")


def test_claim_is_asked_for_a_block_only_when_the_node_is_full(tmp_path):
    store = node_with(tmp_path)
    asked = []

    def claim(doc, family):
        asked.append(family)
        return {"cidr": "198.18.7.0/26", "pool": "pool4", "origin": "IPAMBlock 198-18-7-0-26"}

    a, _ = store.allocate("net", "c1", "eth0", "ns", "p1", "weft-p1", claim=claim)
    b, _ = store.allocate("net", "c2", "eth0", "ns", "p2", "weft-p2", claim=claim)
    assert asked == [4] and (a.ips, b.ips) == (("198.18.7.0",), ("198.18.7.1",))
    assert ipam.read_node_ipam(tmp_path)["blocks"][0]["claimed"] is True


def test_a_new_sandbox_takes_the_pods_interface_over(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    old, _ = add(store, "old", pod="p")
    new, _ = add(store, "new", pod="p")
    assert store.iface_owner("weft-p").container_id == "new"
    assert [a.active for a in ipam.read_allocations(tmp_path)] == [False, True]
    assert old.ips != new.ips


def _allocate_many(args):
    state_dir, worker = args
    store = ipam.Store(state_dir)
    out = []
    for i in range(20):
        a, _ = store.allocate("net", f"w{worker}-{i}", "eth0", "ns", f"w{worker}-{i}", f"if{worker}-{i}")
        out.extend(a.ips)
        if i % 3 == 0:
            store.release("net", f"w{worker}-{i}", "eth0")
    return out


def test_concurrent_processes_never_hand_out_an_address_twice(tmp_path):
    node_with(tmp_path, "198.18.4.0/26", "198.18.4.64/26", "198.18.4.128/26")
    with multiprocessing.get_context("fork").Pool(6) as workers:
        results = workers.map(_allocate_many, [(str(tmp_path), w) for w in range(6)])
    held = [ip for a in ipam.read_allocations(tmp_path) for ip in a.ips]
    assert len(held) == len(set(held)) == 6 * 13
    assert sum(len(r) for r in results) == 120
    json.loads((tmp_path / "ipam" / "allocations.json").read_text())


def test_state_write_is_atomic_a_crash_leaves_the_old_file(tmp_path, monkeypatch):
    store = node_with(tmp_path, "198.18.4.0/26")
    add(store, "c1")
    before = (tmp_path / "ipam" / "allocations.json").read_bytes()

    def crash(*args):
        raise KeyboardInterrupt   # the process dies between writing the temporary file and the rename
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        add(store, "c2")
    assert (tmp_path / "ipam" / "allocations.json").read_bytes() == before
    monkeypatch.undo()
    assert add(store, "c2")[0].ips == ("198.18.4.1",)


# ---- weft ipam check (its findings, from given records and a given kernel view) ------------

def test_check_names_every_kind_of_problem(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    add(store, "c1", pod="p1")
    add(store, "c2", pod="p2")
    doc = ipam.read_node_ipam(tmp_path)
    allocations = ipam.read_allocations(tmp_path)
    doubled = allocations + [allocations[0]._replace(container_id="c3", pod="p3", iface="weft-p3"),
                             allocations[0]._replace(container_id="c4", pod="p4", iface="weft-p4", ips=("10.1.2.3",)),
                             allocations[0]._replace(container_id="c5", pod="p5", iface="weft-p5",
                                                     ips=("198.18.9.9",))]
    kernel = {"links": {"weft-p1": "weft:c1:eth0", "weft-p3": None, "weft-p4": None, "weft-p5": None,
                        "weftstray": "weft:gone:eth0"},
              "routes": [("198.18.4.0", "weft-p1"), ("198.18.4.77", "weftstray")]}
    kinds = {(p["kind"], p["detail"].split(" ")[0]) for p in ipam_cli.check(doc, doubled, kernel)}
    assert kinds == {("double allocation", "198.18.4.0"), ("outside pools", "10.1.2.3"),
                     ("outside blocks", "198.18.9.9"), ("leaked address", "198.18.4.1"),
                     ("leaked interface", "weftstray"), ("leaked route", "198.18.4.77")}


def test_check_is_clean_when_records_and_kernel_agree(tmp_path):
    store = node_with(tmp_path, "198.18.4.0/26")
    a, _ = add(store, "c1", pod="p1")
    kernel = {"links": {"weft-p1": "weft:c1:eth0"}, "routes": [("198.18.4.0", "weft-p1")]}
    assert ipam_cli.check(ipam.read_node_ipam(tmp_path), ipam.read_allocations(tmp_path), kernel) == []
    shown = ipam_cli.format_show(ipam_cli.show(ipam.read_node_ipam(tmp_path), ipam.read_allocations(tmp_path)))
    assert "198.18.4.0/26" in shown and "1/64" in shown and "ns/p1" in shown
