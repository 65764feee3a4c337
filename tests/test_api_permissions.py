"""A refused permission (HTTP 403) is named as what it is: the verb and resource the request
needed, never "no such object", never "try again later" (issue #13, "A real cluster's API")."""
from __future__ import annotations

import pytest

from tests.kubeapi import FakeKubeAPI
from weft.desired import api as apimod
from weft.desired.api import connect
from weft.model.cluster import SecretKeyRef
from weft.model.errors import SourceError
from weft.store import ipam

POD = apimod.Resource("v1", "Pod", "pods", True)


def test_a_refused_list_names_list_and_a_refused_watch_names_watch(tmp_path):
    with FakeKubeAPI([]) as server, connect(server.write_kubeconfig(tmp_path / "kc")) as api:
        server.fail("GET /api/v1/pods?limit", 403, "Forbidden")
        with pytest.raises(SourceError, match=r"needs `list` on pods\)"):
            apimod.list_kind(api, POD)
        server.fail("GET /api/v1/pods?watch", 403, "Forbidden")
        with pytest.raises(SourceError, match=r"needs `watch` on pods\)"):
            apimod.watch_since(api, POD, "1")


def test_a_forbidden_secret_is_a_permission_error_not_a_missing_secret(tmp_path):
    from weft.desired.kinds.bgp import fetch_secrets
    with FakeKubeAPI([]) as server, connect(server.write_kubeconfig(tmp_path / "kc")) as api:
        server.fail("/secrets/bgp", 403, "Forbidden")
        with pytest.raises(SourceError, match=r"reading Secret bgp .*forbidden in namespace calico-system, "
                                              r"kube-system .*needs `get` on secrets"):
            fetch_secrets(api, [SecretKeyRef("bgp", "pw")])


def test_a_forbidden_secret_in_one_namespace_is_fine_when_the_next_has_it(tmp_path):
    import base64

    from weft.desired.kinds.bgp import fetch_secrets
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp", "namespace": "kube-system"},
              "data": {"pw": base64.b64encode(b"s3cret").decode()}}
    with FakeKubeAPI([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}, secret]) \
            as server, connect(server.write_kubeconfig(tmp_path / "kc")) as api:
        server.fail("calico-system/secrets/bgp", 403, "Forbidden")
        (found,) = fetch_secrets(api, [SecretKeyRef("bgp", "pw")])
        assert found.data == {"pw": "s3cret"}


@pytest.mark.parametrize(("match", "needed"), [
    ("GET /apis/crd.projectcalico.org/v1/ipamblocks", "`list` on ipamblocks.crd.projectcalico.org"),
    ("POST /apis/crd.projectcalico.org/v1/ipamblocks", "`create` on ipamblocks.crd.projectcalico.org"),
    ("POST /apis/crd.projectcalico.org/v1/blockaffinities", "`create` on blockaffinities.crd.projectcalico.org"),
])
def test_a_forbidden_block_claim_is_permanent_and_names_the_permission(tmp_path, match, needed):
    from weft.cni.claims import claim_block
    pool = {"name": "p", "cidr": "198.19.250.0/26", "block_size": 26}
    with FakeKubeAPI([], crds=True) as server:
        server.fail(match, 403, "Forbidden")
        with pytest.raises(ipam.ClaimForbidden) as refused:
            claim_block("n1", [pool], server.write_kubeconfig(tmp_path / "kc"))
    assert needed in str(refused.value) and not isinstance(refused.value, ipam.ClaimUnavailable)
