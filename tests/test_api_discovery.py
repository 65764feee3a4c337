"""Which of Calico's API groups serves each kind: API discovery, so each kind is read once.

Calico serves its kinds from crd.projectcalico.org/v1 (its CRDs), projectcalico.org/v3 (its API
server, a view of the same objects; or the CRDs themselves in Calico's newer CRD mode), or both.
Tests taking `kube_source` also run against the cluster $KUBECONFIG names. The discovery is
kept in the state dir (desired.discovery): tests count the discovery GETs a run makes.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.kubeapi import KINDS, FakeKubeAPI
from weft.desired.api import (
    CALICO_API_GROUPS,
    CALICO_API_VERSION,
    CALICO_KINDS,
    NEEDED_KINDS,
    RESOURCES,
    choose_resources,
    connect,
    discover_resources,
    list_kind,
    served_plurals,
)
from weft.desired.discovery import DISCOVERY_FILE, DISCOVERY_MAX_AGE, Discovery
from weft.model.errors import SourceError
from weft.store.statedir import StateDir

V3 = "projectcalico.org/v3"
BUILTIN = [r for r in RESOURCES if r.api_version not in CALICO_API_GROUPS]


MISSING = ("the API server at {url} serves IPPool, GlobalNetworkPolicy, NetworkPolicy, GlobalNetworkSet, "
           "NetworkSet, HostEndpoint, BGPConfiguration, BGPPeer in neither crd.projectcalico.org/v1 nor "
           "projectcalico.org/v3; weft needs them: apply weft's CRDs (kubectl apply -f "
           "playbooks/kubernetes/crds.yaml) or install Calico")


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
    with FakeKubeAPI(crds=False) as fake:
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


def test_a_cluster_without_calicos_kinds_is_an_error_naming_them_and_the_fix(tmp_path):
    with FakeKubeAPI(crds=False) as fake:
        api = connect(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        assert served_plurals(api, CALICO_API_VERSION) == frozenset()
        with pytest.raises(SourceError) as error:
            discover_resources(api)
    assert str(error.value) == MISSING.format(url=fake.url)


def test_one_needed_kind_missing_is_an_error_naming_it(tmp_path):
    with FakeKubeAPI(crds=True) as fake:
        del fake._types[(CALICO_API_VERSION, "hostendpoints")]
        del fake._types[(V3, "hostendpoints")]
        api = connect(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        with pytest.raises(SourceError, match=r"serves HostEndpoint in neither .*; weft needs it: apply weft's CRDs"):
            discover_resources(api)


def test_newer_kinds_missing_are_a_warning_once_per_discovery(tmp_path, capsys):
    """An older Calico has no Tier or FelixConfiguration: one line says so, and the run goes on."""
    with FakeKubeAPI() as fake:                   # the kinds weft needs, not the newer ones
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        state = run(tmp_path / "state", kubeconfig)
        touch(fake, "later")
        run(tmp_path / "state", kubeconfig)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "weft: warning" in line]
    assert warnings == [f"weft: warning: the API server at {fake.url} serves no Tier, FelixConfiguration: weft "
                        "reads none (policies are in the default tier, Felix's settings are the defaults); to read "
                        "them, apply weft's CRDs (kubectl apply -f playbooks/kubernetes/crds.yaml) or install Calico"]
    assert list(state.tiers) == ["default"]


def test_the_fake_serves_every_kind_weft_needs_by_default(tmp_path):
    with FakeKubeAPI() as fake:
        chosen = discover_resources(connect(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    assert set(calico_read(chosen)) >= set(NEEDED_KINDS)


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
    with FakeKubeAPI(crds=True) as fake:
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


# ---- the discovery kept in the state dir ---------------------------------------------------

def discovery_gets(fake) -> list[str]:
    """The API discovery requests the fake answered (GET /apis/GROUP/VERSION)."""
    return [path for method, path in fake.requests
            if method == "GET" and path.startswith("/apis/") and path.count("/") == 3 and "?" not in path]


def run(state_dir, kubeconfig):
    from weft.desired import sources
    reading = sources.read(state_dir, None, kubeconfig)
    state = reading.state()
    sources.commit(state_dir, reading)
    return state


def touch(fake, name: str) -> None:
    """Move the cluster's resourceVersion, so the next run watches (and needs the discovery)."""
    fake.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


@pytest.fixture
def cluster(tmp_path):
    with FakeKubeAPI(crds=True) as fake:
        fake.kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        fake.state_dir = tmp_path / "state"
        run(fake.state_dir, fake.kubeconfig)
        yield fake


def test_a_later_run_reuses_the_kept_discovery(cluster):
    assert sorted(discovery_gets(cluster)) == sorted(f"/apis/{g}" for g in CALICO_API_GROUPS), "the first run discovers"
    found = kept(cluster.state_dir)
    assert found["server"] == cluster.url
    assert found["served"][CALICO_API_VERSION] == sorted(p for _k, p, _n in CALICO_KINDS)
    assert os.stat(cluster.state_dir / DISCOVERY_FILE).st_mode & 0o777 == 0o600
    for n in range(2):
        cluster.requests.clear()
        touch(cluster, f"moved-{n}")
        run(cluster.state_dir, cluster.kubeconfig)
        assert any("watch=true" in path for _m, path in cluster.requests), "the run watched"
        assert discovery_gets(cluster) == []


def test_a_crd_moved_between_groups_is_found_after_its_404(cluster):
    """The kept discovery says crd.projectcalico.org/v1 serves IPPool; it moved to v3: the watch's
    404 makes the run discover anew (once) and read the pools from v3."""
    cluster.put({"apiVersion": CALICO_API_VERSION, "kind": "IPPool", "metadata": {"name": "old-pool"},
                 "spec": {"cidr": "198.18.0.0/20"}})
    assert [p.name for p in run(cluster.state_dir, cluster.kubeconfig).ippools] == ["old-pool"]
    del cluster._types[(CALICO_API_VERSION, "ippools")]
    cluster.put({"apiVersion": V3, "kind": "IPPool", "metadata": {"name": "new-pool"},
                 "spec": {"cidr": "198.18.16.0/20"}})
    cluster.requests.clear()
    assert [p.name for p in run(cluster.state_dir, cluster.kubeconfig).ippools] == ["new-pool"]
    assert len(discovery_gets(cluster)) == len(CALICO_API_GROUPS), "discovered anew, once"
    assert f"/apis/{V3}/ippools" in {path.partition("?")[0] for _m, path in cluster.requests}
    cluster.requests.clear()
    touch(cluster, "later")
    assert [p.name for p in run(cluster.state_dir, cluster.kubeconfig).ippools] == ["new-pool"]
    assert discovery_gets(cluster) == [], "the new discovery is kept"


def test_a_first_full_list_also_rediscovers_after_a_404(cluster):
    """A run without a usable cache lists everything from the kept discovery: a 404 there too."""
    del cluster._types[(CALICO_API_VERSION, "ippools")]
    cluster.put({"apiVersion": V3, "kind": "IPPool", "metadata": {"name": "new-pool"},
                 "spec": {"cidr": "198.18.16.0/20"}})
    for name in os.listdir(cluster.state_dir):
        if name.startswith("desired-"):
            os.unlink(cluster.state_dir / name)
    cluster.requests.clear()
    assert [p.name for p in run(cluster.state_dir, cluster.kubeconfig).ippools] == ["new-pool"]
    assert len(discovery_gets(cluster)) == len(CALICO_API_GROUPS)


def kept(state_dir) -> dict:
    return json.loads((state_dir / DISCOVERY_FILE).read_text())


def rewrite(state_dir, data) -> None:
    StateDir(state_dir).replace(DISCOVERY_FILE, data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize("tamper", ["group-writable", "symlink", "not-json", "unknown-plural", "missing-group",
                                    "at-is-text", "huge"])
def test_a_tampered_discovery_file_is_refused_and_rediscovered(cluster, tamper, tmp_path, capsys):
    path = cluster.state_dir / DISCOVERY_FILE
    good = kept(cluster.state_dir)
    # What each tampering would make weft read if it trusted the file: not one Calico kind.
    bare = good | {"served": {g: [] for g in CALICO_API_GROUPS}}
    if tamper == "group-writable":
        rewrite(cluster.state_dir, bare)
        os.chmod(path, 0o620)
    elif tamper == "symlink":
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text(json.dumps(bare))
        path.unlink()
        path.symlink_to(elsewhere)
    elif tamper == "not-json":
        rewrite(cluster.state_dir, "{" + json.dumps(bare))
    elif tamper == "unknown-plural":
        rewrite(cluster.state_dir, good | {"served": {g: ["secrets"] for g in CALICO_API_GROUPS}})
    elif tamper == "missing-group":
        rewrite(cluster.state_dir, good | {"served": {CALICO_API_VERSION: []}})
    elif tamper == "at-is-text":
        rewrite(cluster.state_dir, good | {"at": "now"})
    elif tamper == "huge":
        rewrite(cluster.state_dir, bare | {"pad": " " * (100 << 10)})
    capsys.readouterr()
    cluster.requests.clear()
    touch(cluster, "after")
    state = run(cluster.state_dir, cluster.kubeconfig)
    assert len(discovery_gets(cluster)) == len(CALICO_API_GROUPS), "rediscovered"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("weft: warning:")]
    assert len(warnings) == 1 and DISCOVERY_FILE in warnings[0] and "discovering" in warnings[0], warnings
    assert state.tiers, "Calico's kinds are read"
    assert not path.is_symlink() and os.stat(path).st_mode & 0o777 == 0o600
    assert kept(cluster.state_dir)["served"] == good["served"], "replaced by the server's answer"
    if tamper == "symlink":
        assert json.loads(elsewhere.read_text()) == bare, "nothing written through the link"


def test_a_discovery_older_than_its_age_or_of_another_server_is_made_anew(cluster):
    for change in ({"at": time.time() - DISCOVERY_MAX_AGE - 1}, {"at": time.time() + 3600},
                   {"server": "https://198.18.0.1:6443"}):
        rewrite(cluster.state_dir, kept(cluster.state_dir) | change)
        cluster.requests.clear()
        touch(cluster, f"n{len(cluster._events)}")
        run(cluster.state_dir, cluster.kubeconfig)
        assert len(discovery_gets(cluster)) == len(CALICO_API_GROUPS), change
        assert kept(cluster.state_dir)["server"] == cluster.url


def test_the_kept_discovery_is_what_the_server_answers(kube_source, tmp_path):
    """On a fake or a real server: a fresh discovery is kept, and the next one is read from the
    file and equal to it."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    first = Discovery(kube_source.api, state_dir)
    assert first.resources() == discover_resources(kube_source.api) and not first.cached
    second = Discovery(kube_source.api, state_dir)
    assert second.resources() == first.resources() and second.cached


def test_weft_apply_without_calicos_kinds_fails_in_one_line_and_changes_nothing(tmp_path):
    """The real command on a node namespace: exit 1, the error as one line, the node's kernel
    state as it was and nothing kept of the discovery."""
    from tests.cninode import entered
    from tests.nodens import describe, kernel_state, namespace, node_netns, pod, run_weft, usable
    if usable() is not None:
        pytest.skip(usable())
    with node_netns() as ns:
        fake = FakeKubeAPI([namespace("x"), pod("x", "a", "198.18.5.1")], crds=False)
        with entered(ns):
            fake.__enter__()                      # listening inside the node's namespace
        try:
            before = kernel_state(ns)
            state_dir = tmp_path / "state"
            proc = run_weft(ns, "apply", "--kubeconfig", fake.write_kubeconfig(tmp_path / "kubeconfig"),
                            state_dir=state_dir)
            assert proc.returncode == 1, describe(proc)
            assert proc.stderr.splitlines() == ["weft: error: " + MISSING.format(url=fake.url)], describe(proc)
            assert kernel_state(ns) == before
            assert not (state_dir / DISCOVERY_FILE).exists()
        finally:
            fake.__exit__(None, None, None)
