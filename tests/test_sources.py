"""Incremental reads of the desired state (desired.sources): what the next run reads is only
what changed, and what it ends up with is exactly what a full read gives.

API server: a real HTTP server speaking the wire contract (tests/kubeapi.py); requests are
counted to prove a run with nothing to do costs one tiny request. Manifest directory: files
on disk; parsing is counted to prove unchanged files are not parsed again.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from tests.kubeapi import FakeKubeAPI
from tests.nodens import namespace, pod, policy, write_manifests
from weft.desired import manifests, sources
from weft.desired.loader import build_cluster_state
from weft.model.errors import InvalidDesiredState, SourceError

OBJECTS = [namespace("x", team="a"), namespace("y"),
           pod("x", "a", "198.18.5.1", {"app": "web"}), pod("y", "b", "198.18.5.2", {"app": "db"}),
           policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})]


def committed_read(state_dir, **source):
    reading = sources.read(state_dir, source.get("from_dir"), source.get("kubeconfig"))
    state = reading.state()
    if reading.dirty:
        sources.commit(state_dir, reading)
    return reading, state


def keys(state):
    return sorted(e.key for e in state.endpoints), sorted(p.key for p in state.policies)


# --- API server ------------------------------------------------------------------------------

@pytest.fixture
def api(tmp_path):
    with FakeKubeAPI(copy.deepcopy(OBJECTS)) as server:
        server.kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        yield server


def test_api_run_with_nothing_to_do_costs_one_small_request(api, tmp_path):
    first, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert keys(state) == (["x/a", "y/b"], ["x/knp.default.deny"])
    api.requests.clear()
    second, again = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert second.token == first.token and not second.dirty
    assert len(api.requests) == 1 and "limit=1" in api.requests[0][1]
    assert keys(again) == keys(state)


def test_api_changes_arrive_through_watches_and_match_a_full_read(api, tmp_path):
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(pod("y", "c", "198.18.5.3", {"app": "web"}))
    api.delete("Pod", "x", "a")
    api.requests.clear()
    reading, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert any("watch=true" in path for _m, path in api.requests)
    assert not any("watch" not in path and "/pods" in path for _m, path in api.requests), "pods were re-listed"
    assert keys(state) == (["y/b", "y/c"], ["x/knp.default.deny"])
    _, fresh = committed_read(tmp_path / "fresh", kubeconfig=api.kubeconfig)
    assert state.endpoints == fresh.endpoints and state.policies == fresh.policies


def test_api_change_repickles_only_its_namespace_of_its_kind(api, tmp_path):
    """One pod changed re-pickles that namespace's pods: not every pod of the cluster."""
    from weft.store import cache
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    before = dict(cache.load(tmp_path / "s").digests)
    api.put(pod("y", "c", "198.18.5.3", {"app": "web"}))
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    after = cache.load(tmp_path / "s").digests
    assert {g for g in after if after[g] != before.get(g)} == {("v1", "Pod", "y")}
    assert after.keys() == before.keys()


def test_api_run_after_a_change_with_nothing_new_keeps_the_token(api, tmp_path):
    """Kinds listed again (Calico CRDs that are not installed have no watch position) are a
    change only where the list differs: an unchanged desired state is not rendered again."""
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(pod("y", "c", "198.18.5.3", {"app": "web"}))
    changed, _ = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    again, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert again.token == changed.token
    assert "y/c" in keys(state)[0]


def test_api_watch_too_old_lists_that_kind_again(api, tmp_path):
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(pod("x", "late", "198.18.5.4"))
    api.compact()                                        # events before now are gone: 410 for watches
    _, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert "x/late" in keys(state)[0]


def test_api_invalid_change_is_refused_and_read_again_until_fixed(api, tmp_path):
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    bad = pod("x", "bad", "198.18.300.1")
    api.put(bad)
    for _ in range(2):                                   # not committed: the next run sees it again
        with pytest.raises(InvalidDesiredState, match="Pod x/bad: status.podIP"):
            committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(pod("x", "bad", "198.18.5.9"))
    _, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert "x/bad" in keys(state)[0]


def _children() -> list[int]:
    """This process's child processes (zombies included)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def test_api_read_errors_come_from_the_reading_child_and_it_is_reaped(tmp_path):
    """The API is read in a forked child: its failure is this read's error, and no child is left."""
    before = set(_children())
    config = tmp_path / "kubeconfig"
    with FakeKubeAPI() as dead:
        dead.write_kubeconfig(config)
    with pytest.raises(SourceError, match="no answer from the API server"):
        sources.read(tmp_path / "s", None, str(config))
    assert set(_children()) <= before


def test_api_read_abandoned_before_its_answer_leaves_no_child(api, tmp_path):
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(pod("y", "c", "198.18.5.3"))
    before = set(_children())
    with sources.start(tmp_path / "s", None, api.kubeconfig) as started:
        assert started.child is not None
    assert set(_children()) <= before


# --- manifest directory ----------------------------------------------------------------------

def test_dir_reparses_only_changed_files_and_matches_a_full_read(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_manifests(src / "one", OBJECTS[:3])
    write_manifests(src / "two", OBJECTS[3:])
    first, _ = committed_read(tmp_path / "s", from_dir=str(src))
    parsed = []
    real = manifests.parse_manifest_file
    monkeypatch.setattr(manifests, "parse_manifest_file", lambda p, *a: parsed.append(p) or real(p, *a))
    second, _ = committed_read(tmp_path / "s", from_dir=str(src))
    assert parsed == [] and second.token == first.token and not second.dirty
    write_manifests(src / "two", [OBJECTS[3], pod("y", "new", "198.18.5.5")])
    third, state = committed_read(tmp_path / "s", from_dir=str(src))
    assert parsed == [str(src / "two" / "state.yaml")] and third.token != first.token
    full = build_cluster_state(manifests.load_manifest_dir(src))
    assert state.endpoints == full.endpoints and state.policies == full.policies


def test_dir_object_defined_in_two_files_is_an_error(tmp_path):
    src = tmp_path / "src"
    write_manifests(src / "one", OBJECTS)
    committed_read(tmp_path / "s", from_dir=str(src))
    write_manifests(src / "two", [OBJECTS[2]])
    with pytest.raises(InvalidDesiredState, match="defined more than once"):
        committed_read(tmp_path / "s", from_dir=str(src))
