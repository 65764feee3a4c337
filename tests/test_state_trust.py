"""The state dir is hostile input: what weft reads there can make it read everything again, never
run code, follow a link, or write outside the state dir (issue #9, "The state dir")."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from tests.nodens import NODE, write_manifests
from weft.model import codec
from weft.model.cluster import Endpoint, Namespace
from weft.model.selector import Eq
from weft.store import cache as cachemod
from weft.store.statedir import StateDir, UnsafeState


class _Boom:
    """Unpickling this runs a command: what a planted pickle does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plan(state, manifests) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weft.reconciler.cli", "plan", "--from", str(manifests),
                           "--node", NODE, "--state-dir", str(state)], capture_output=True, text=True)


def test_a_planted_pickle_in_the_state_dir_is_never_unpickled(tmp_path):
    state, manifests, marker = tmp_path / "state", tmp_path / "m", tmp_path / "pwned"
    write_manifests(manifests, [])
    state.mkdir(mode=0o700)
    for name in ("desired.cache", cachemod.CACHE_FILE):
        (state / name).write_bytes(pickle.dumps(_Boom(str(marker))))
        os.chmod(state / name, 0o600)
    done = _plan(state, manifests)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert not (state / "desired.cache").exists()          # the old pickle is removed, never read
    assert (state / cachemod.CACHE_FILE).read_bytes()[:1] == b"{"


def test_the_codec_builds_only_registered_model_types():
    value = (Endpoint("a", "p", "n1", "weftabc", ("198.18.0.1",), {"app": "x"}), Namespace("a", {"k": "v"}))
    assert codec.decode(json.loads(json.dumps(codec.encode(value)))) == value
    plain = {"pods": {"x/a": {"egress": [["weft-po-a"], []]}}, "closed": {"x": (True, False)}, "n": [1, None]}
    for again in (codec.decode(json.loads(json.dumps(codec.encode(plain)))), codec.loads(codec.dumps(plain))):
        assert again == plain and type(again["pods"]["x/a"]["egress"]) is list and type(again["closed"]["x"]) is tuple
        assert type(again["pods"]["x/a"]["egress"][0]) is list and type(again["n"]) is list
    nested = ([1, (2, [3])], {"k": [(4,)]}, Namespace("a", {"k": "v"}))
    assert codec.loads(codec.dumps(nested)) == nested and type(codec.loads(codec.dumps(nested))[0][1][1]) is list
    assert type(codec.loads(codec.dumps([1]))) is list and type(codec.loads(codec.dumps((1,)))) is tuple
    for hostile in ({codec.DATACLASS: "Popen", "v": [["id"]]}, {codec.DATACLASS: "_Boom", "v": ["x"]},
                    {codec.ENUM: "Signals", "v": 9}, {codec.FROZENSET: "x"},
                    {codec.DATACLASS: "Endpoint", "v": "not a list"}, {codec.DATACLASS: "Endpoint", "v": [1]},
                    {codec.MAPPING: [[{"a": 1}, 2]]}, {codec.LIST: "x"}, {codec.FROZENSET: [{codec.LIST: [1]}]},
                    {codec.MAPPING: [[{codec.LIST: [1]}, 2]]}):
        with pytest.raises(codec.CodecError):
            codec.decode(hostile)
        with pytest.raises(codec.CodecError):
            codec.loads(json.dumps(hostile))
    # A class with checks of its own (a selector's __post_init__) is built through them.
    with pytest.raises(codec.CodecError):
        codec.loads(json.dumps({codec.DATACLASS: "Eq", "v": ["not a key!", "x"]}))
    assert codec.loads(codec.dumps(Eq("app", "x"))) == Eq("app", "x")
    # A dict that merely looks like an object of another format is data, never an object.
    assert codec.loads('{"@": "Popen", "v": [["id"]]}') == {"@": "Popen", "v": (("id",),)}


def test_a_cache_naming_an_unknown_type_is_a_miss(tmp_path):
    store = StateDir(tmp_path / "state")
    header = {"format": cachemod.CACHE_FORMAT, "code": cachemod.code_token(), "generation": "g", "source": "dir:/x",
              "token": "t",
              "cursors": {}, "groups": [["g", "d", []]], "rendered": []}
    store.replace(cachemod.CACHE_FILE, json.dumps(header) + "\n" + json.dumps({codec.DATACLASS: "Popen", "v": [["id"]]})
                  + "\n")
    cache = cachemod.load(store)
    assert cache is not None                                # the groups are decoded only when needed...
    with pytest.raises(codec.CodecError):
        cache.groups()                                      # ...and then refused, never built


def test_a_symlinked_cache_is_neither_read_nor_written_through(tmp_path):
    state, manifests = tmp_path / "state", tmp_path / "m"
    write_manifests(manifests, [])
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, state / cachemod.CACHE_FILE)
    done = _plan(state, manifests)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    assert not (state / cachemod.CACHE_FILE).is_symlink()  # replaced by a file of weft's own


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_state_dir_others_can_write_is_refused(tmp_path, mode):
    state, manifests = tmp_path / "state", tmp_path / "m"
    write_manifests(manifests, [])
    state.mkdir()
    os.chmod(state, mode)
    done = _plan(state, manifests)
    assert done.returncode == 1
    assert "writable by group or others" in done.stderr and str(state) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (state / cachemod.CACHE_FILE).exists()


def test_a_state_dir_of_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 1234, 1234)
    with pytest.raises(UnsafeState, match="belongs to uid 1234"):
        StateDir(state)


def test_a_state_file_of_another_user_or_writable_by_others_is_refused(tmp_path):
    store = StateDir(tmp_path / "state")
    store.replace("x.json", "{}")
    os.chown(store.file("x.json"), 1234, 1234)
    with pytest.raises(UnsafeState, match="belongs to uid 1234"):
        store.read_json("x.json")
    os.chown(store.file("x.json"), 0, 0)
    os.chmod(store.file("x.json"), 0o666)
    with pytest.raises(UnsafeState, match="writable by group or others"):
        store.read_json("x.json")


def test_replace_writes_0600_and_never_through_a_link(tmp_path):
    store = StateDir(tmp_path / "state")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, store.file("bird.conf"))
    store.replace("bird.conf", "router id 198.18.0.1;\n")
    assert victim.read_text() == "precious\n"
    assert oct(os.lstat(store.file("bird.conf")).st_mode & 0o777) == "0o600"
    assert [n for n in os.listdir(store.path) if n.endswith(".tmp")] == []


def test_reads_are_bounded(tmp_path):
    store = StateDir(tmp_path / "state")
    store.replace("big", b"x" * 2048)
    with pytest.raises(UnsafeState, match="more than the 1024"):
        store.read_bytes("big", limit=1024)
