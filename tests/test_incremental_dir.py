"""From a manifest directory, pod changes and namespace relabels are rendered from the last render
without assembling the whole desired state, and end exactly where a fresh read does.

A directory's cache groups are blocks of a file's documents, not one namespace's pods: for a
relabelled namespace, reconciler.run decodes the blocks whose text names it (issue #14: before,
any namespace change from a directory decoded every cached object and assembled the whole
state). Checked over random sequences of namespace relabels, pod changes and policy edits (which
render from the last render too), with the pods of one namespace spread over files and blocks,
each run compared with a fresh read of the same files; and on a fixed layout, that only the
blocks naming the namespace are decoded.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nodens import namespace, pod, policy, write_manifests
from tests.test_render import kernel_input
from tests.test_render_endpoint_changes import LABELS, NS_LABELS, objects
from tests.test_render_incremental import POLICIES, SPEC
from weft.desired import sources
from weft.reconciler import run
from weft.store import cache

NODE = "n1"
ANCHOR = ("b", "anchor")            # never removed: the pods' files are never empty
CHANGE = st.one_of(
    st.tuples(st.just("ns"), st.sampled_from("abc"), NS_LABELS),
    st.tuples(st.just("relabel"), st.integers(0, 9), LABELS),
    st.tuples(st.just("add"), st.sampled_from("abc"), st.tuples(LABELS, st.sampled_from([NODE, "n2"]))),
    st.tuples(st.just("remove"), st.integers(0, 9), st.none()),
    st.tuples(st.just("policy"), st.tuples(st.sampled_from("abc"), st.sampled_from(["p0", "p1", "p2", "p3"])),
              st.one_of(st.none(), SPEC)),                 # a policy added, changed or removed (None)
)


class Counted:
    """How often the whole state was assembled (desired.sources._assembled) and which cached
    blocks of documents were decoded (through store.cache's one decoding function)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.built: list[int] = []
        self.decoded: list[tuple] = []
        assembled, decoded = sources._assembled, cache._decoded
        mp.setattr(sources, "_assembled", lambda table: self.built.append(1) or assembled(table))

        def counted(text):
            value = decoded(text)
            if isinstance(value, tuple) and value and all(isinstance(d, sources.ManifestDocument) for d in value):
                self.decoded.append(value)
            return value
        mp.setattr(cache, "_decoded", counted)

    def clear(self) -> None:
        self.built.clear()
        self.decoded.clear()


def write(src: Path, pods: dict, namespaces: dict, policies: dict) -> None:
    """Namespaces, policies and namespace a's pods in one file; b's pods in another, c's in a third."""
    objs = objects(pods, namespaces, policies)
    kinds = {"Namespace": "base", "NetworkPolicy": "base"}
    files: dict[str, list] = {"base": [], "b": [], "c": []}
    for obj in objs:
        ns = obj["metadata"].get("namespace")
        files[kinds.get(obj["kind"]) or ("base" if ns == "a" else ns)].append(obj)
    for name, docs in files.items():
        if docs:
            write_manifests(src / name, docs)
        else:
            for old in (src / name).glob("*.yaml"):
                old.unlink()


def render(state: Path, src: Path):
    return run.desired_state(run.Options(node=NODE, state_dir=state, from_dir=str(src)))


def same(node, fresh) -> None:
    assert node.dataplane == fresh.dataplane
    assert kernel_input(node.dataplane) == kernel_input(fresh.dataplane)
    assert {k: v for k, v in node.snapshot.items() if k != "token"} == \
        {k: v for k, v in fresh.snapshot.items() if k != "token"}
    assert (node.bird_config, node.ipam, node.ignored) == (fresh.bird_config, fresh.ipam, fresh.ignored)


def change(pods: dict, namespaces: dict, step: tuple, number: int, policies: dict | None = None) -> None:
    what, target, arg = step
    keys = sorted(k for k in pods if k != ANCHOR)
    if what == "policy" and policies is not None:
        if arg is None:
            policies.pop(target, None)
        else:
            policies[target] = arg
    elif what == "ns":
        namespaces[target] = arg
    elif what == "add":
        labels, node = arg
        pods[(target, f"q{number}")] = (labels, node, number, None)       # an address of its own
    elif keys:
        key = keys[target % len(keys)]
        if what == "remove":
            del pods[key]
        else:
            pods[key] = (arg, *pods[key][1:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("abc"), LABELS, st.sampled_from([NODE, "n2", "n2"])), max_size=8),
       POLICIES, st.lists(CHANGE, min_size=1, max_size=5))
def test_dir_runs_render_pod_and_namespace_changes_without_the_whole_state(first, policies, steps):
    policies = dict(policies)
    pods = {(ns, f"p{i}"): (labels, node, i + 1, None) for i, (ns, labels, node) in enumerate(first)}
    pods[ANCHOR] = ({}, "n2", 100, None)
    namespaces = {"a": {"team": "a"}, "b": {"team": "b", "env": "prod"}, "c": {"env": "prod"}}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "BLOCK_END", "0")            # blocks of 16 documents on average
        counted = Counted(mp)
        root = Path(tmp)
        write(root / "src", pods, namespaces, policies)
        render(root / "state", root / "src")
        for number, step in enumerate(steps, start=101):
            change(pods, namespaces, step, number, policies)
            write(root / "src", pods, namespaces, policies)
            counted.clear()
            node = render(root / "state", root / "src")
            # Every address is one pod's and every namespace was there before: a namespace
            # relabelled never needs the whole state (a shared address or a new namespace would;
            # so may a pod added or relabelled on this node that needs a set the last render
            # did not have).
            if step[0] == "ns":
                assert counted.built == [], step
            same(node, render(root / f"fresh{number}", root / "src"))


def test_a_namespace_relabel_decodes_only_the_blocks_naming_it(tmp_path, monkeypatch):
    """#14: a namespace relabelled, its pods in a 600-pod file of another namespace's pods too:
    the blocks holding its pods are decoded, not the other namespace's, and the whole state is
    never assembled; with one of this node's pods in it too. Each run ends where a fresh one does
    (and the namespace selector's set did change)."""
    monkeypatch.setattr(sources, "BLOCK_END", "0")
    counted = Counted(monkeypatch)
    src = tmp_path / "src"
    spec = {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}],
                                            "ports": [{"port": 8080}]}]}
    teams = {"a": "a", "b": "b", "c": "c"}

    def layout() -> None:
        write_manifests(src / "base", [namespace(n, team=t) for n, t in teams.items()] +
                        [pod("a", "l1", "198.18.0.1", {}, NODE), policy("a", "p", spec)])
        write_manifests(src / "pods", [pod("b" if i < 300 else "c", f"r{i:03d}", f"198.18.{1 + i // 200}.{i % 200 + 1}",
                                           {"tier": "web"}, "n2" if i != 450 else NODE) for i in range(600)])
    layout()
    before = render(tmp_path / "state", src)
    blocks = [g for g in cache.load(tmp_path / "state").blobs if g[0].endswith("pods/state.yaml")]
    assert len(blocks) >= 8
    for round, relabelled in enumerate(["b", "c", "b"]):
        teams[relabelled] = "x" if teams[relabelled] != "x" else relabelled
        layout()
        counted.clear()
        node = render(tmp_path / "state", src)
        assert counted.built == [], relabelled
        # Only blocks holding its pods (or namespace a's, in the changed file) are decoded; one
        # block may hold b's last pods and c's first.
        holding = [{d.entries[0].namespace for d in block if d.entries and d.entries[0].kind == "Pod"}
                   for block in counted.decoded]
        assert all(not namespaces or namespaces & {"a", relabelled} for namespaces in holding), relabelled
        assert sum(bool(namespaces - {"a"}) for namespaces in holding) <= len(blocks) // 2 + 1, relabelled
        assert node.dataplane.ipsets != before.dataplane.ipsets
        same(node, render(tmp_path / f"fresh{round}", src))
        before = node
