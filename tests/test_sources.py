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
from weft.desired import bounds, manifests, sources
from weft.desired.loader import build_cluster_state
from weft.model.errors import InvalidDesiredState, SourceError
from weft.store import cache

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


def lease(n: int) -> dict:
    """What moves a live cluster's resourceVersion all the time, and weft does not read."""
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "node-1", "namespace": "kube-node-lease"}, "spec": {"leaseDurationSeconds": n}}


def test_api_event_in_flight_when_the_watches_went_quiet_is_found_by_the_next_run(api, tmp_path):
    """#14.3: a run whose watches saw nothing must not call the cache current at the version it
    began at: an event committed before it may reach the watches only after their quiet gap."""
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(lease(1))
    with api.watch_lag():
        api.put(pod("x", "late", "198.18.5.7"))        # the version shows it; the watches not yet
        _, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
        assert "x/late" not in keys(state)[0]
    api.requests.clear()
    _, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)   # the version did not move
    assert "x/late" in keys(state)[0]
    assert any("watch=true" in path for _m, path in api.requests)
    # That run began where the one before did, and watched: now the cache is current there.
    api.requests.clear()
    again = sources.read(tmp_path / "s", None, api.kubeconfig)
    assert len(api.requests) == 1 and not again.dirty and "x/late" in keys(again.state())[0]


def test_api_run_that_finds_nothing_it_reads_writes_only_the_cursors(api, tmp_path):
    """The usual run on a live cluster: the version moved (leases), nothing weft reads changed.
    It decodes no cached object, and the large cache file is not written again."""
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    big = tmp_path / "s" / cache.CACHE_FILE
    before = big.stat()
    decoded = []
    real_groups, real_group = cache.DesiredCache.groups, cache.DesiredCache.group
    for n in range(3):
        api.put(lease(n))
        cache.DesiredCache.groups = lambda self: decoded.append(1) or real_groups(self)
        cache.DesiredCache.group = lambda self, g: decoded.append(g) or real_group(self, g)
        try:
            reading = sources.read(tmp_path / "s", None, api.kubeconfig)
        finally:
            cache.DesiredCache.groups, cache.DesiredCache.group = real_groups, real_group
        assert reading.dirty and not decoded
        sources.commit(tmp_path / "s", reading)
        assert (big.stat().st_ino, big.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert (tmp_path / "s" / cache.CURSORS_FILE).exists()
    # The next run starts its watches from the cursors the small file holds.
    api.put(pod("y", "c", "198.18.5.3"))
    api.requests.clear()
    _, state = committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    assert "y/c" in keys(state)[0]
    pods = [path for _m, path in api.requests if "/pods" in path]
    assert pods and all("watch=true" in path for path in pods)
    assert big.stat().st_ino != before.st_ino and not (tmp_path / "s" / cache.CURSORS_FILE).exists()


def test_api_cursors_of_another_cache_file_are_not_used(api, tmp_path):
    """A cursors file is used only with the cache file it was written for."""
    import json
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    api.put(lease(1))
    committed_read(tmp_path / "s", kubeconfig=api.kubeconfig)
    small = tmp_path / "s" / cache.CURSORS_FILE
    kept = json.loads(small.read_text())
    assert cache.load(tmp_path / "s").cursors == kept["cursors"]
    small.write_text(json.dumps(kept | {"generation": "another"}))
    assert cache.load(tmp_path / "s").cursors != kept["cursors"]


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

@pytest.fixture
def parses(monkeypatch) -> list[tuple[str, bytes]]:
    """Every parse of manifest text, as (file, text parsed)."""
    seen: list[tuple[str, bytes]] = []
    real = manifests._load
    monkeypatch.setattr(manifests, "_load",
                        lambda path, text, *a: seen.append((str(path), text)) or real(path, text, *a))
    return seen


def full_read(src):
    return build_cluster_state(manifests.load_manifest_dir(src))


def same_state(state, full) -> bool:
    return (state.endpoints, state.policies, state.namespaces) == (full.endpoints, full.policies, full.namespaces)


def test_dir_reparses_only_changed_files_and_matches_a_full_read(tmp_path, parses):
    src = tmp_path / "src"
    write_manifests(src / "one", OBJECTS[:3])
    write_manifests(src / "two", OBJECTS[3:])
    first, _ = committed_read(tmp_path / "s", from_dir=str(src))
    parses.clear()
    second, _ = committed_read(tmp_path / "s", from_dir=str(src))
    assert parses == [] and second.token == first.token and not second.dirty
    write_manifests(src / "two", [OBJECTS[3], pod("y", "new", "198.18.5.5")])
    third, state = committed_read(tmp_path / "s", from_dir=str(src))
    assert {path for path, _text in parses} == {str(src / "two" / "state.yaml")} and third.token != first.token
    assert same_state(state, full_read(src))


BIG = [namespace("x")] + [pod("x", f"p{i:04d}", f"198.18.{i // 200}.{i % 200 + 1}", {"app": f"a{i % 7}"})
                          for i in range(1000)]


def test_dir_one_changed_document_of_a_large_file_is_the_only_one_parsed(tmp_path, parses):
    """#14.2: one edited object in a 1,000-object file costs about one object's parse."""
    src = tmp_path / "src"
    write_manifests(src, BIG)
    committed_read(tmp_path / "s", from_dir=str(src))
    assert len(parses) == 1                              # a new file: parsed whole, in one pass
    objects = copy.deepcopy(BIG)
    for round, (at, labels) in enumerate([(500, {"app": "moved"}), (0, None), (1000, {"app": "last"})]):
        parses.clear()
        if labels is None:                              # the namespace: a label added
            objects[at]["metadata"]["labels"] = {"team": "t"}
        else:
            objects[at]["metadata"]["labels"] = labels
        write_manifests(src, objects)
        kept = set(cache.load(tmp_path / "s").digests.items())
        _, state = committed_read(tmp_path / "s", from_dir=str(src))
        assert len(parses) == 1 and parses[0][1].count(b"\nkind: ") == 1, round
        # Encoded again: the block of the changed document (two when its change moved a cut).
        now = cache.load(tmp_path / "s").digests
        assert 1 <= len(set(now.items()) - kept) <= 2 < len(now), round
        assert b"moved" in parses[0][1] or b"team" in parses[0][1] or b"last" in parses[0][1]
        assert same_state(state, full_read(src))


def test_dir_documents_moved_added_and_removed_match_a_full_read(tmp_path, parses):
    src = tmp_path / "src"
    write_manifests(src, BIG)
    committed_read(tmp_path / "s", from_dir=str(src))
    changed = BIG[:1] + BIG[400:] + BIG[1:300] + [pod("x", "added", "198.18.99.1")]    # moved, cut, added
    write_manifests(src, changed)
    parses.clear()
    _, state = committed_read(tmp_path / "s", from_dir=str(src))
    assert len(parses) == 1 and b"added" in parses[0][1] and parses[0][1].count(b"\nkind: ") == 1
    assert same_state(state, full_read(src))
    assert len(state.endpoints) == 1000 - 100 + 1


def test_dir_an_error_in_a_changed_document_names_its_line_in_the_file(tmp_path):
    src = tmp_path / "src"
    write_manifests(src, BIG)
    committed_read(tmp_path / "s", from_dir=str(src))
    text = (src / "state.yaml").read_text()
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.strip() == "name: p0700")
    lines[at] = "  name: [p0700"                         # an unclosed flow sequence
    (src / "state.yaml").write_text("\n".join(lines))
    with pytest.raises(InvalidDesiredState) as failure:
        committed_read(tmp_path / "s", from_dir=str(src))
    whole: list = []
    manifests.parse_manifest_file(src / "state.yaml", (src / "state.yaml").read_bytes(), whole)
    assert str(failure.value).count("malformed YAML") == 1
    assert whole[0].where == f"{src / 'state.yaml'}:{at + 2}"      # a whole-file parse: on the next line
    assert whole[0].where in str(failure.value)


def test_dir_value_budget_counts_the_documents_kept_from_last_time(tmp_path, monkeypatch):
    """The bounds apply to every file as a whole, also when most of it was read before."""
    src = tmp_path / "src"
    write_manifests(src, BIG)
    committed_read(tmp_path / "s", from_dir=str(src))
    objects = copy.deepcopy(BIG)
    objects[3]["metadata"]["labels"] = {"app": "changed"}
    write_manifests(src, objects)
    monkeypatch.setattr(manifests, "ValueBudget", lambda limit: bounds.ValueBudget(1000))
    with pytest.raises(InvalidDesiredState, match="more than 1,000 values"):
        committed_read(tmp_path / "s", from_dir=str(src))


def test_dir_object_defined_in_two_files_is_an_error(tmp_path):
    src = tmp_path / "src"
    write_manifests(src / "one", OBJECTS)
    committed_read(tmp_path / "s", from_dir=str(src))
    write_manifests(src / "two", [OBJECTS[2]])
    with pytest.raises(InvalidDesiredState, match="defined more than once"):
        committed_read(tmp_path / "s", from_dir=str(src))
