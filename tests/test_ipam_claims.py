"""Block claims through a real HTTP server speaking the Kubernetes API (tests/kubeapi.py's FakeKubeAPI,
or the cluster $KUBECONFIG names): of nodes racing for one block exactly one wins, the objects a
claim writes read back as that node's block, and a claim made before is taken back, not repeated.

Every pool here is a fresh /26..../25 of 198.19.0.0/16 chosen at random, so runs against a real
cluster do not meet each other; the objects a test creates are deleted after it.
"""
from __future__ import annotations

import ipaddress
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from weft.cni.claims import AFFINITIES_PATH, BLOCKS_PATH, block_affinity_object, claim_block, ipam_block_object
from weft.desired.kinds.ipam import block_name
from weft.desired.loader import build_cluster_state
from weft.store import ipam


def fresh_pool(prefix: int = 26, name: str = "claims") -> dict:
    """A pool of one (/26) or two (/25) blocks nobody else uses."""
    base = ipaddress.ip_network("198.19.0.0/16")
    net = random.choice(list(base.subnets(new_prefix=prefix)))
    return {"name": f"{name}-{block_name(str(net))}", "cidr": str(net), "block_size": 26}


@pytest.fixture
def cluster(kube_source):
    """The test's API, and removal of every IPAM object the test's claims made (a real cluster keeps them)."""
    made: list[str] = []
    yield kube_source, made
    for cidr in made:
        for path in (f"{BLOCKS_PATH}/{block_name(cidr)}",
                     *(f"{AFFINITIES_PATH}/{node}-{block_name(cidr)}" for node in ("n1", "n2", "n3", "n4"))):
            try:
                kube_source.api.request("DELETE", path)
            except Exception:  # noqa: BLE001 - absent is fine
                pass


def claim(source, node, pools, made, **kw):
    block = claim_block(node, pools, source.kubeconfig, **kw)
    made.append(block["cidr"])
    return block


def test_nodes_racing_for_one_block_exactly_one_wins(cluster):
    source, made = cluster
    contested = 0
    if source.fake:     # the fake answers the four lists together, so every node sees the block free
        lists = threading.Barrier(4, timeout=10)

        def together(method: str, path: str) -> None:
            if method == "GET" and urlsplit(path).path == BLOCKS_PATH:
                try:
                    lists.wait()
                except threading.BrokenBarrierError:
                    lists.reset()
        source.fake.on_request = together
    for _round in range(4):
        pool = fresh_pool()
        made.append(str(ipaddress.ip_network(pool["cidr"])))
        barrier = threading.Barrier(4)

        def race(node: str, pool=pool, barrier=barrier):
            barrier.wait()
            try:
                return claim_block(node, [pool], source.kubeconfig)["cidr"]
            except ipam.Exhausted as exc:
                return exc

        with ThreadPoolExecutor(4) as workers:
            results = dict(zip(("n1", "n2", "n3", "n4"), workers.map(race, ("n1", "n2", "n3", "n4")), strict=True))
        winners = [n for n, r in results.items() if isinstance(r, str)]
        assert len(winners) == 1, results
        assert all(f"IPPool {pool['name']} ({pool['cidr']}) is exhausted" in str(r)
                   for n, r in results.items() if n not in winners)
        stored = source.api.request("GET", f"{BLOCKS_PATH}/{block_name(pool['cidr'])}")
        assert stored["spec"]["affinity"] == f"host:{winners[0]}"
        if source.fake:
            contested += source.fake.requests.count(("POST", BLOCKS_PATH)) > 1
            source.fake.requests.clear()
    if source.fake:
        source.fake.on_request = None
        assert contested == 4, "a round without two nodes creating the block at once: the race was not run"


def test_two_nodes_get_two_blocks_of_a_pool(cluster):
    source, made = cluster
    pool = fresh_pool(25)
    with ThreadPoolExecutor(2) as workers:
        got = list(workers.map(lambda n: claim(source, n, [pool], made)["cidr"], ("n1", "n2")))
    assert sorted(got) == [str(s) for s in ipaddress.ip_network(pool["cidr"]).subnets(new_prefix=26)]


def test_claimed_objects_read_back_as_the_nodes_block(cluster):
    source, made = cluster
    pool = fresh_pool()
    block = claim(source, "n1", [pool], made)
    assert block == {"cidr": pool["cidr"], "pool": pool["name"], "origin": f"IPAMBlock {block_name(pool['cidr'])}"}
    objects = [source.api.request("GET", f"{BLOCKS_PATH}/{block_name(pool['cidr'])}"),
               source.api.request("GET", f"{AFFINITIES_PATH}/n1-{block_name(pool['cidr'])}"),
               {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": pool["name"]},
                "spec": {"cidr": pool["cidr"], "blockSize": 26}}]
    state = build_cluster_state(("api", o) for o in objects)
    assert {(b.cidr, b.node) for b in state.blocks} == {(pool["cidr"], "n1")}


def test_a_block_already_this_nodes_is_taken_back_unless_known(cluster):
    source, made = cluster
    pool = fresh_pool(25)
    first, second = (str(s) for s in ipaddress.ip_network(pool["cidr"]).subnets(new_prefix=26))
    source.create(ipam_block_object(first, "n1"))
    source.create(block_affinity_object(first, "n1"))
    made.append(first)
    assert claim(source, "n1", [pool], made)["cidr"] == first        # e.g. node.json was rewritten since
    assert claim(source, "n1", [pool], made, skip={first})["cidr"] == second
    with pytest.raises(ipam.Exhausted):
        claim(source, "n2", [pool], made)


def test_an_unreachable_api_server_is_worth_retrying(tmp_path):
    config = tmp_path / "kubeconfig"
    config.write_text('{"apiVersion": "v1", "kind": "Config", "current-context": "x", '
                      '"clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}], '
                      '"users": [{"name": "x", "user": {"token": "t"}}], '
                      '"contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}')
    with pytest.raises(ipam.ClaimUnavailable, match="claiming a block for node 'n1'"):
        claim_block("n1", [fresh_pool()], str(config), timeout=2)


def test_claims_use_projectcalico_v3_where_only_calicos_newer_crd_mode_serves_ipam(tmp_path):
    """A cluster with Calico's projectcalico.org/v3 CRDs only: crd.projectcalico.org/v1 answers
    404, and the claim reads and writes the IPAM kinds in v3 (before, every claim failed there)."""
    from tests.kubeapi import FakeKubeAPI
    v3 = "projectcalico.org/v3"
    pool = fresh_pool(prefix=25)
    first, second = (str(n) for n in ipaddress.ip_network(pool["cidr"]).subnets(new_prefix=26))
    taken = {**ipam_block_object(first, "other", v3), "metadata": {"name": block_name(first)}}
    affinity = block_affinity_object(first, "other", v3)
    from weft.desired.api import connect
    with FakeKubeAPI([taken, affinity], crds=False) as fake:
        config = str(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        block = claim_block("n1", [pool], config)
        assert block["cidr"] == second, "the other node's v3 block was seen and skipped"
        with connect(config) as api:
            stored = api.request("GET", f"/apis/{v3}/ipamblocks/{block_name(second)}")
            assert stored["apiVersion"] == v3 and stored["spec"]["affinity"] == "host:n1"
            confirmed = api.request("GET", f"/apis/{v3}/blockaffinities/n1-{block_name(second)}")
            assert confirmed["spec"]["state"] == "confirmed"


def test_the_plugin_reads_pools_and_blocks_from_projectcalico_v3_when_only_it_serves_them(tmp_path):
    """The CNI plugin's own read of its node's IPAM (cni/nodesource.py) on a v3-CRD-only cluster:
    before, crd.projectcalico.org/v1 answered 404 and the node had no pools at all."""
    from tests.kubeapi import FakeKubeAPI
    from weft.cni.nodesource import read_node_ipam
    v3 = "projectcalico.org/v3"
    objects = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"zone": "a"}}},
               {"apiVersion": v3, "kind": "IPPool", "metadata": {"name": "pool"},
                "spec": {"cidr": "198.19.0.0/24", "blockSize": 26}},
               ipam_block_object("198.19.0.0/26", "n1", v3), block_affinity_object("198.19.0.0/26", "n1", v3)]
    with FakeKubeAPI(objects, crds=False) as fake:
        seen = read_node_ipam({"kubeconfig": str(fake.write_kubeconfig(tmp_path / "kubeconfig"))}, "n1")
    assert [p.cidr for p in seen.pools] == ["198.19.0.0/24"]
    assert [b.cidr for b in seen.blocks] == ["198.19.0.0/26"] and seen.labels == {"zone": "a"}
