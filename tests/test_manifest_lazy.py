"""A manifest directory is read lazily, like the API server (desired.sources._read_dir): a run
decodes only the cached objects it needs, and ends exactly where a fresh read does.

  - nothing changed: no cached object is decoded (the last render is used as it is);
  - one document changed: only its block is decoded (the file's other blocks are known by their
    notes); a pod change on another node is rendered from the last render, without the whole state;
  - an object defined in two files is refused, also when the whole state is not assembled.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.nodens import namespace, pod, policy, write_manifests
from tests.test_render import kernel_input
from weft.desired import sources
from weft.model.errors import InvalidDesiredState
from weft.reconciler import run
from weft.store import cache

NODE = "n1"
SPEC = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                                       "ports": [{"port": 8080}]}]}


def remote(i: int, tier: str = "web") -> dict:
    return pod("b", f"r{i:03d}", f"198.18.{1 + i // 200}.{i % 200 + 1}", {"tier": tier}, "n2")


def layout(src: Path, remotes: list[dict]) -> None:
    """Two files: namespaces, this node's pod and the policy in one; other nodes' pods in the other."""
    write_manifests(src / "base", [namespace("a"), namespace("b"), pod("a", "l1", "198.18.0.1", {}, NODE),
                                   policy("a", "p", SPEC)])
    write_manifests(src / "pods", remotes)


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """The cached groups (a file's blocks of documents) each run decodes, through store.cache's
    one decoding function (which decodes the last render too: not counted)."""
    seen: list[int] = []
    real = cache._decoded

    def counted(text):
        value = real(text)
        if isinstance(value, tuple) and all(isinstance(d, sources.ManifestDocument) for d in value):
            seen.append(1)
        return value
    monkeypatch.setattr(cache, "_decoded", counted)
    return seen


@pytest.fixture
def assembled(monkeypatch) -> list[int]:
    built: list[int] = []
    real = sources._assembled
    monkeypatch.setattr(sources, "_assembled", lambda table: built.append(1) or real(table))
    return built


def render(state: Path, src: Path):
    return run.desired_state(run.Options(node=NODE, state_dir=state, from_dir=str(src)))


def same_as_fresh(node, tmp_path: Path, src: Path, name: str) -> None:
    fresh = render(tmp_path / name, src)
    assert node.dataplane == fresh.dataplane
    assert kernel_input(node.dataplane) == kernel_input(fresh.dataplane)
    assert {k: v for k, v in node.snapshot.items() if k != "token"} == \
        {k: v for k, v in fresh.snapshot.items() if k != "token"}


def test_a_run_with_nothing_changed_decodes_no_object(tmp_path, decoded, assembled):
    src = tmp_path / "src"
    layout(src, [remote(i) for i in range(40)])
    first = render(tmp_path / "state", src)
    decoded.clear()
    assembled.clear()
    again = render(tmp_path / "state", src)
    assert decoded == [] and assembled == []
    assert again.dataplane == first.dataplane


def test_a_changed_document_decodes_only_its_block_and_a_remote_change_no_whole_state(tmp_path, decoded,
                                                                                     assembled, monkeypatch):
    """#14: one pod changed in a large file: the block holding it is decoded (its other
    documents are encoded again with it) and, to find what changed, its text as loaded and as
    now; the file's other blocks are known by their notes (digests, counts) alone."""
    monkeypatch.setattr(sources, "BLOCK_END", "0")        # blocks of 16 documents on average
    src = tmp_path / "src"
    pods = [remote(i) for i in range(600)]
    layout(src, pods)
    render(tmp_path / "state", src)
    of_pods = [g for g in cache.load(tmp_path / "state").blobs if g[0].endswith("pods/state.yaml")]
    assert len(of_pods) >= 8
    for round, change in enumerate([lambda: pods.__setitem__(7, remote(7, "db")),     # relabelled
                                    lambda: pods.append(remote(600)),                   # added
                                    lambda: pods.pop(300)]):                            # removed
        change()
        layout(src, pods)
        decoded.clear()
        assembled.clear()
        node = render(tmp_path / "state", src)
        assert assembled == [], round                 # the whole state was never assembled
        # One block, or two when the change moved a cut: as cached (for its other documents,
        # then to diff it) and as encoded now (to diff it).
        assert 1 <= len(decoded) <= 6, round
        same_as_fresh(node, tmp_path, src, f"fresh{round}")


def test_a_policy_change_renders_without_the_whole_state_and_matches_a_fresh_read(tmp_path, assembled):
    """A policy edit is rendered from the last render (renderers.incremental): the pods' file is
    not decoded, the whole state not assembled."""
    src = tmp_path / "src"
    layout(src, [remote(i) for i in range(20)])
    render(tmp_path / "state", src)
    write_manifests(src / "base", [namespace("a"), namespace("b"), pod("a", "l1", "198.18.0.1", {}, NODE),
                                   policy("a", "p", {**SPEC, "podSelector": {"matchLabels": {"x": "y"}}})])
    assembled.clear()
    node = render(tmp_path / "state", src)
    assert assembled == []
    same_as_fresh(node, tmp_path, src, "fresh")


@pytest.mark.parametrize("where", ["pods", "base", "repeated"])
def test_an_object_defined_in_two_files_is_refused_without_the_whole_state(tmp_path, where):
    """A pod added to one file that another file defines already: refused (as a full read
    refuses it), though a remote pod added is otherwise rendered without the whole state."""
    src = tmp_path / "src"
    pods = [remote(i) for i in range(30)]
    layout(src, pods)
    render(tmp_path / "state", src)
    if where == "pods":
        write_manifests(src / "pods", pods + [pod("a", "l1", "198.18.0.9", {}, "n2")])
    elif where == "repeated":                           # a document's very text, twice in its file
        write_manifests(src / "pods", pods + [remote(5)])
    else:
        write_manifests(src / "base", [namespace("a"), namespace("b"), pod("a", "l1", "198.18.0.1", {}, NODE),
                                       policy("a", "p", SPEC), remote(5)])
    with pytest.raises(InvalidDesiredState, match="defined more than once"):
        render(tmp_path / "state", src)
    with pytest.raises(InvalidDesiredState, match="defined more than once"):
        render(tmp_path / "fresh", src)


def test_a_name_found_in_another_file_for_another_object_is_not_an_error(tmp_path):
    """The text search only narrows where to look: the same name of another kind or namespace
    in another file is no duplicate."""
    src = tmp_path / "src"
    pods = [remote(i) for i in range(30)]
    layout(src, pods)
    render(tmp_path / "state", src)
    pods.append(pod("a", "r005", "198.18.1.99", {"tier": "web"}, "n2"))    # r005 exists in namespace b
    write_manifests(src / "pods", pods)
    node = render(tmp_path / "state", src)
    same_as_fresh(node, tmp_path, src, "fresh")


def test_a_damaged_cache_group_of_an_unchanged_file_is_read_again(tmp_path):
    """The unchanged files' groups decode only when the state is asked for: one that does not
    decode then is read from its file again, and the cache is mended."""
    src = tmp_path / "src"
    layout(src, [remote(i) for i in range(20)])
    sources.commit(tmp_path / "state", sources.read(tmp_path / "state", str(src)))
    path = tmp_path / "state" / cache.CACHE_FILE
    lines = path.read_bytes().split(b"\n")
    header = cache.load(tmp_path / "state")
    base = next(i for i, g in enumerate(header.blobs) if g[0].endswith("base/state.yaml"))
    lines[1 + base] = b'{"\\u0000":"NoSuchType","v":[]}'
    path.write_bytes(b"\n".join(lines))
    write_manifests(src / "pods", [remote(i) for i in range(21)])
    reading = sources.read(tmp_path / "state", str(src))
    state = reading.state()
    assert sorted(e.key for e in state.endpoints) == sorted(["a/l1"] + [f"b/r{i:03d}" for i in range(21)])
    sources.commit(tmp_path / "state", reading)
    assert cache.load(tmp_path / "state").group(next(g for g in reading.cache.blobs
                                                     if g[0].endswith("base/state.yaml")))
