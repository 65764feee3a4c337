"""Which of Calico's API groups serves each kind: API discovery, so each kind is read once.

Calico serves its kinds from crd.projectcalico.org/v1 (its CRDs), projectcalico.org/v3 (its API
server, a view of the same objects; or the CRDs themselves in Calico's newer CRD mode), or both.
Tests taking `kube_source` also run against the cluster $KUBECONFIG names.
"""
from __future__ import annotations

import pytest

from tests.kubeapi import KINDS, FakeKubeAPI
from weft.desired.api import (
    CALICO_API_GROUPS,
    CALICO_API_VERSION,
    CALICO_KINDS,
    RESOURCES,
    choose_resources,
    connect,
    discover_resources,
    list_kind,
    served_plurals,
)
from weft.model.errors import SourceError

V3 = "projectcalico.org/v3"
BUILTIN = [r for r in RESOURCES if r.api_version not in CALICO_API_GROUPS]


def calico_read(resources) -> dict[str, str]:
    """kind -> the group it is read from."""
    return {r.kind: r.api_version for r in resources if r.api_version in CALICO_API_GROUPS}


def test_every_kind_read_once_from_the_crds_when_both_groups_serve_it(tmp_path):
    with FakeKubeAPI(crds=True) as fake:
        chosen = discover_resources(connect(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    assert [r for r in chosen if r in BUILTIN] == BUILTIN
    assert calico_read(chosen) == {kind: CALICO_API_VERSION for kind, _p, _n in CALICO_KINDS}
    assert len(chosen) == len(BUILTIN) + len(CALICO_KINDS)


def test_calicos_v3_crd_mode_is_read_from_v3(tmp_path):
    """Calico's newer CRD mode: projectcalico.org/v3 CRDs and no crd.projectcalico.org at all."""
    with FakeKubeAPI() as fake:
        for (api_version, kind), (plural, namespaced) in KINDS.items():
            if api_version == V3:
                fake._serve(api_version, kind, plural, namespaced)
        fake.put({"apiVersion": V3, "kind": "IPPool", "metadata": {"name": "pool"},
                  "spec": {"cidr": "198.18.0.0/16"}})
        api = connect(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        chosen = discover_resources(api)
        assert calico_read(chosen) == {kind: V3 for kind, _p, _n in CALICO_KINDS}
        pools = next(r for r in chosen if r.kind == "IPPool")
        assert [o["metadata"]["name"] for o in list_kind(api, pools)[0]] == ["pool"]
        assert not any(path.startswith(f"/apis/{CALICO_API_VERSION}/") for _m, path in fake.requests)


def test_a_cluster_without_calico_reads_only_kubernetes_kinds(tmp_path):
    with FakeKubeAPI() as fake:
        api = connect(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        assert served_plurals(api, CALICO_API_VERSION) == frozenset()
        assert discover_resources(api) == tuple(BUILTIN)


def test_a_group_serving_some_kinds_mixes_with_the_other():
    served = {CALICO_API_VERSION: frozenset({"ippools", "ipamblocks"}),
              V3: frozenset({"ippools", "tiers", "globalnetworkpolicies"})}
    read = calico_read(choose_resources(served))
    assert read == {"IPPool": CALICO_API_VERSION, "IPAMBlock": CALICO_API_VERSION, "Tier": V3,
                    "GlobalNetworkPolicy": V3}


def test_a_discovery_answer_that_is_not_an_api_resource_list_is_refused(tmp_path):
    with FakeKubeAPI(crds=True) as fake:
        api = connect(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        fake.fail(f"GET /apis/{V3}", 500, "InternalError", "etcd is gone")
        with pytest.raises(SourceError, match=f"discovering what {V3} serves .* HTTP 500"):
            discover_resources(api)


def test_discovery_agrees_with_what_the_server_lists(kube_source):
    """Every resource discovery chooses can be listed (no 404), on a fake or a real server."""
    chosen = discover_resources(kube_source.api)
    assert [r for r in chosen if r in BUILTIN] == BUILTIN
    for resource in chosen:
        if resource.api_version in CALICO_API_GROUPS:
            items, version = list_kind(kube_source.api, resource)
            assert version, f"{resource.kind} from {resource.api_version}: discovered but not listable"


def test_a_kind_that_moves_to_the_other_group_is_read_from_there_and_its_old_copies_go(tmp_path):
    """A cluster migrating to Calico's v3 CRDs: the pools cached from crd.projectcalico.org/v1
    are gone once that group no longer serves them, and the v3 ones are read."""
    from weft.desired import sources

    def pools(state_dir) -> list[str]:
        reading = sources.read(state_dir, None, kubeconfig)
        sources.commit(state_dir, reading)
        return sorted(p.name for p in reading.state().ippools)

    state_dir = tmp_path / "state"
    with FakeKubeAPI(crds=["IPPool"]) as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        for api_version in list(fake._types):
            if api_version[0] == V3:
                del fake._types[api_version]            # only crd.projectcalico.org/v1 at first
        fake.put({"apiVersion": CALICO_API_VERSION, "kind": "IPPool", "metadata": {"name": "old-pool"},
                  "spec": {"cidr": "198.18.0.0/20"}})
        assert pools(state_dir) == ["old-pool"]
        del fake._types[(CALICO_API_VERSION, "ippools")]
        fake._serve(V3, "IPPool", "ippools", False)
        fake.put({"apiVersion": V3, "kind": "IPPool", "metadata": {"name": "new-pool"},
                  "spec": {"cidr": "198.18.16.0/20"}})
        assert pools(state_dir) == ["new-pool"]
        fake.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "moved"}})
        assert pools(state_dir) == ["new-pool"], "a later incremental run keeps it so"
