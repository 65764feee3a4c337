"""What one run leaves for the next, so the next reads and renders only what changed.

Two files in the state dir, each replaced atomically (store.statedir):
  `desired-cache.json`    the source's cursors (API watch positions, manifest file digests), the
                          converted objects grouped (by kind and namespace, or by file) and the
                          last render per node;
  `desired-cursors.json`  newer cursors for that same file, when they are all that changed: the
                          usual run on a live cluster (its resourceVersion moved, nothing weft
                          reads changed) writes this small file, not the large one. It names the
                          generation of the cache file it belongs to and is ignored with any other.
The cache file is always written first and carries the cursors current then, so the cursors in
use never run ahead of the objects they describe (a crash between the two writes only makes the
next run read some changes again).

Everything in them is data (JSON through model.codec, which builds only the model's own types):
a planted or damaged file can make a run read everything again, never run anything.

Each group, and each render, is one line of the cache file, kept as text until it is needed: a
run decodes only the groups it must look at, and one that changed one namespace's pods encodes
that group again and copies the other lines as they were. The cache is valid only for the same
source and the same weft code (every file of the installed `weft` package counts); anything
unreadable is a cache miss (a full read).

Layout: line 1 is the header {"format", "code", "generation", "source", "token", "cursors",
"groups": [[group key, digest, kinds, noted], ...], "rendered": [[node, key, basis, inputs], ...]};
then one line per group, then one line per render, then one line per noted group (its note: a
small summary of the group, read without decoding it, e.g. a manifest block's document digests),
in the header's order. A render's `inputs` is a
digest of every group it was rendered from: when it is the loaded groups' own, the groups a run
changes are exactly what changed since that render, and their text as loaded is kept (for
`changes_since_load`) so the next render can be made from the last one (reconciler.run).
"""
from __future__ import annotations

import gc
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from weft.model import codec
from weft.store.statedir import CorruptState, StateDir, UnsafeState

CACHE_FORMAT = 7
CACHE_FILE = "desired-cache.json"
CURSORS_FILE = "desired-cursors.json"
OLD_CACHE_FILES = ("desired.cache",)      # pickles of weft <= 0.1.0: never read, removed
MAX_CACHE = 1 << 30
MAX_CURSORS = 1 << 20


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused: making tens of thousands of objects (decoding,
    converting, rendering) otherwise triggers collections that inspect every object made so
    far, again and again, while none of them is garbage yet. Garbage in cycles made meanwhile
    is collected once it is enabled again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@lru_cache(maxsize=1)
def code_token() -> str:
    """Changes whenever any of weft's installed code or templates does (an upgrade, an edit):
    every file of the `weft` package counts, since a render depends on all of them."""
    root = Path(__file__).resolve().parent.parent          # the `weft` package directory
    parts = [str(CACHE_FORMAT)]
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".j2", ".c", ".h") and "__pycache__" not in path.parts:
            st = path.stat()
            parts.append(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _encoded(value: Any) -> str:
    with gc_paused():
        return codec.dumps(value)


def _decoded(text: str | bytes | memoryview) -> Any:
    with gc_paused():
        return codec.loads(bytes(text) if isinstance(text, memoryview) else text)


def decoded(text: str | bytes | memoryview) -> Any:
    """A group's text (as `take` gives it), decoded now (the model types must be registered)."""
    return _decoded(text)


def _bytes(text: str | bytes | memoryview) -> bytes | memoryview:
    return text.encode() if isinstance(text, str) else text


def _entries(value: Any) -> Iterable:
    return value.values() if isinstance(value, dict) else value


def inputs_digest(digests: Mapping) -> str:
    """One digest of every group (key and content digest): what a render was made from."""
    parts = sorted(f"{g!r}={d}" for g, d in digests.items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class DesiredCache:
    source: str                                  # "api:<server>" or "dir:<absolute path>"
    token: str                                   # changes whenever the desired objects change
    cursors: dict = field(default_factory=dict)  # per-source positions (resourceVersions, digests)
    blobs: dict = field(default_factory=dict)    # group (a kind's namespace, a file) -> its encoded objects (bytes)
    digests: dict = field(default_factory=dict)  # group -> sha256 of its encoded objects
    kinds: dict = field(default_factory=dict)    # group -> the model kinds of its objects ("Pod", ...)
    rendered: dict = field(default_factory=dict)  # node -> (key, encoded render: bytes)
    bases: dict = field(default_factory=dict)    # node -> what its rendered sets' members came from
    code: str = ""
    generation: str = ""                         # names what the cache file holds (see the docstring)
    inputs: dict = field(default_factory=dict)   # node -> `inputs_digest` of the groups its render came from
    saved: tuple | None = None                   # (token, cursors) as loaded or saved; None: not on disk
    changed: bool = True                         # groups or renders changed since loaded or saved
    loaded: dict | None = None                   # group -> digest as loaded (None: not loaded from a file)
    replaced: dict = field(default_factory=dict)  # group -> its text as loaded, once this run changed or dropped it
    notes: dict = field(default_factory=dict)    # group -> its encoded note (update_groups' `note_of`), if any

    def groups(self) -> dict:
        """The converted objects, by group (decoded now; the model types must be registered)."""
        return {group: _decoded(text) for group, text in self.blobs.items()}

    def group(self, group: Any) -> Any:
        """One group's objects (decoded now), or None when there is no such group."""
        text = self.blobs.get(group)
        return None if text is None else _decoded(text)

    def set_groups(self, groups: dict, changed=None,
                   entries_of: Callable[[Any], Iterable] = _entries) -> None:
        """Keep `groups`, all the groups there are; only those in `changed` (all when None) are
        encoded again: one changed policy does not re-encode ten thousand pods."""
        self.update_groups({g: groups[g] for g in (groups if changed is None else changed) if g in groups},
                           entries_of)
        for gone in [g for g in self.blobs if g not in groups]:
            self._drop(gone)

    def update_groups(self, changed: Mapping[Any, Any], entries_of: Callable[[Any], Iterable] = _entries,
                      note_of: Callable[[Any], Any] | None = None) -> None:
        """Encode the groups in `changed` again (a value of None, or empty, removes its group);
        the others stay as they are. `entries_of` gives a group's objects (for their kinds);
        `note_of`, what to keep as its note (see `note`)."""
        for group, value in changed.items():
            entries = () if value is None else list(entries_of(value))
            if not entries:
                self._drop(group)
                continue
            self._keep_loaded(group)
            self.blobs[group] = text = _encoded(value).encode()
            self.digests[group] = hashlib.sha256(text).hexdigest()
            self.kinds[group] = frozenset(getattr(e, "kind", "") for e in entries) - {""}
            if note_of is not None:
                self.notes[group] = _encoded(note_of(value)).encode()
            else:
                self.notes.pop(group, None)
        self.changed = True

    def note(self, group: Any) -> Any:
        """What was kept as `group`'s note (decoded now: a small value, read without decoding the
        group), or None when it has none or it does not decode."""
        text = self.notes.get(group)
        if text is None:
            return None
        try:
            return _decoded(text)
        except (codec.CodecError, ValueError, TypeError, RecursionError):
            return None

    def take(self, group: Any) -> tuple | None:
        """Remove `group` and give what is kept of it, still encoded (for `put` under another key)."""
        if group not in self.blobs:
            return None
        self._keep_loaded(group)
        kept = (self.blobs.pop(group), self.digests.pop(group), self.kinds.pop(group, frozenset()),
                self.notes.pop(group, None))
        self.changed = True
        return kept

    def put(self, group: Any, kept: tuple) -> None:
        """Keep what `take` gave under the key `group`, as it was (nothing encoded again)."""
        self._keep_loaded(group)
        self.blobs[group], self.digests[group], self.kinds[group], note = kept
        if note is not None:
            self.notes[group] = note
        self.changed = True

    def _keep_loaded(self, group: Any) -> None:
        """Before `group` changes: its text as loaded is kept (`changes_since_load`)."""
        if self.loaded is not None and group in self.loaded and group not in self.replaced and group in self.blobs:
            self.replaced[group] = self.blobs[group]

    def _drop(self, group: Any) -> None:
        self._keep_loaded(group)
        for table in (self.blobs, self.digests, self.kinds, self.notes):
            table.pop(group, None)
        self.changed = True

    def basis(self, kinds) -> str:
        """A digest that changes whenever any object of `kinds` does (the groups holding them),
        read without decoding a thing."""
        kinds = frozenset(kinds)
        parts = sorted(f"{g!r}={self.digests.get(g, '?')}" for g in self.blobs if self.kinds.get(g, kinds) & kinds)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def rendered_for(self, node: str, key: str, decode: Callable[[Any], Any] = lambda v: v):
        """What was rendered for `node` from exactly these inputs (`key`), or None. `decode`
        turns the stored data (what keep_render was given, as data) back into its value."""
        have, text = self.rendered.get(node, (None, None))
        return self._render(text, decode) if have == key else None

    def keep_render(self, node: str, key: str, value: Any, basis: str) -> None:
        """Keep `value` (model values, or a JSON-able form of them) as the render of `node`,
        made from the groups as they are now."""
        self.rendered[node] = (key, _encoded(value).encode())
        self.bases[node] = basis
        self.inputs[node] = inputs_digest(self.digests)
        self.changed = True

    def previous_render(self, node: str, decode: Callable[[Any], Any] = lambda v: v):
        """The render of `node` the loaded file holds, if it was made from exactly the groups
        that file holds (so `changes_since_load` is what changed since), else None."""
        _key, text = self.rendered.get(node, (None, None))
        if self.loaded is None or not self.inputs.get(node) or self.inputs[node] != inputs_digest(self.loaded):
            return None
        return self._render(text, decode)

    def changes_since_load(self) -> tuple[dict, dict] | None:
        """(group -> its objects as loaded, group -> its objects now) for every group that
        changed, came or went since the file was loaded (decoded now; a group missing on one
        side is missing from that dict), or None when that is not known or does not decode."""
        if self.loaded is None:
            return None
        changed = {g for g, d in self.loaded.items() if self.digests.get(g) != d} | \
            {g for g in self.digests if g not in self.loaded}
        try:
            before, now = {}, {}
            for group in changed:
                if group in self.loaded:
                    text = self.replaced.get(group)
                    if text is None or hashlib.sha256(_bytes(text)).hexdigest() != self.loaded[group]:
                        return None
                    before[group] = _decoded(text)
                if group in self.blobs:
                    now[group] = _decoded(self.blobs[group])
        except (codec.CodecError, ValueError, TypeError, RecursionError):
            return None
        return before, now

    def last_render(self, node: str, basis: str, decode: Callable[[Any], Any] = lambda v: v):
        """The last value rendered for `node` if its `basis` was this one (whatever its key), else None."""
        _key, text = self.rendered.get(node, (None, None))
        return self._render(text, decode) if basis and self.bases.get(node) == basis else None

    @staticmethod
    def _render(text: bytes | memoryview | None, decode: Callable[[Any], Any]):
        if text is None:
            return None
        try:
            return decode(_decoded(text))
        except (codec.CodecError, ValueError, TypeError, RecursionError):
            return None                          # not what this weft writes: render anew


def load(state_dir: StateDir | Path | str, source: str | None = None) -> DesiredCache | None:
    """The cache of `source` (of any source when None: the caller checks), or None. Only the
    header is parsed; each group and render stays bytes of the file until it is asked for."""
    store = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    try:
        data = store.read_bytes(CACHE_FILE, MAX_CACHE)
    except (UnsafeState, CorruptState, OSError):
        return None                              # a file weft does not trust is a miss; save replaces it
    if not data:
        return None
    try:
        end = data.index(b"\n")
        header = json.loads(data[:end])
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT or header.get("code") != code_token():
            return None
        if source is not None and header.get("source") != source:
            return None
        groups, rendered = header["groups"], header["rendered"]
        noted = sum(bool(entry[3]) for entry in groups if len(entry) > 3)
        lines, view = [], memoryview(data)     # slices of the file: nothing copied until used
        for _ in range(len(groups) + len(rendered) + noted):
            start, end = end + 1, data.index(b"\n", end + 1)
            lines.append(view[start:end])
        cache = DesiredCache(str(header["source"]), str(header["token"]), dict(header["cursors"]),
                             code=header["code"], generation=str(header["generation"]))
        notes = iter(lines[len(groups) + len(rendered):])
        for (key, digest, kinds, *noted_flag), text in zip(groups, lines, strict=False):
            group = codec.decode(key)
            cache.blobs[group], cache.digests[group], cache.kinds[group] = text, str(digest), frozenset(kinds)
            if noted_flag and noted_flag[0]:
                cache.notes[group] = next(notes)
        for (node, key, basis, *inputs), text in zip(rendered, lines[len(groups):], strict=False):
            cache.rendered[str(node)] = (str(key), text)
            cache.bases[str(node)] = str(basis)
            cache.inputs[str(node)] = str(inputs[0]) if inputs else ""
    except (ValueError, KeyError, IndexError, StopIteration, TypeError, codec.CodecError, RecursionError,
            UnicodeDecodeError):
        return None
    newer = _newer_cursors(store, cache)
    if newer is not None:
        cache.cursors = newer
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cache.cursors.items()):
        return None
    cache.saved, cache.changed = (cache.token, dict(cache.cursors)), False
    cache.loaded = dict(cache.digests)
    return cache


def _newer_cursors(store: StateDir, cache: DesiredCache) -> dict | None:
    """The cursors file's cursors, if it belongs to this very cache file."""
    try:
        kept = store.read_json(CURSORS_FILE, MAX_CURSORS)
    except (UnsafeState, CorruptState, OSError):
        return None
    if not isinstance(kept, dict) or kept.get("generation") != cache.generation or not cache.generation \
            or kept.get("source") != cache.source or not isinstance(kept.get("cursors"), dict):
        return None
    return dict(kept["cursors"])


def save(state_dir: StateDir | Path | str, cache: DesiredCache) -> None:
    """Keep `cache` for the next run: only its cursors when nothing else changed (the small
    file), else the whole cache file; nothing when nothing changed."""
    store = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    code = code_token()
    if not cache.changed and cache.saved is not None and cache.saved[0] == cache.token and cache.code == code:
        if cache.saved[1] != cache.cursors:
            store.replace(CURSORS_FILE, json.dumps({"generation": cache.generation, "source": cache.source,
                                                    "cursors": cache.cursors}, separators=(",", ":")))
            cache.saved = (cache.token, dict(cache.cursors))
        return
    cache.code, cache.generation = code, uuid.uuid4().hex
    order = list(cache.blobs)
    nodes = list(cache.rendered)
    header = {"format": CACHE_FORMAT, "code": cache.code, "generation": cache.generation, "source": cache.source,
              "token": cache.token, "cursors": cache.cursors,
              "groups": [[codec.encode(g), cache.digests[g], sorted(cache.kinds.get(g, ())), int(g in cache.notes)]
                         for g in order],
              "rendered": [[n, cache.rendered[n][0], cache.bases.get(n, ""), cache.inputs.get(n, "")] for n in nodes]}
    lines: list[bytes | memoryview] = [json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()]
    lines += [_bytes(cache.blobs[g]) for g in order]
    lines += [_bytes(cache.rendered[n][1]) for n in nodes]
    lines += [_bytes(cache.notes[g]) for g in order if g in cache.notes]
    lines.append(b"")
    store.replace(CACHE_FILE, b"\n".join(lines))
    store.remove(CURSORS_FILE)
    cache.saved, cache.changed = (cache.token, dict(cache.cursors)), False
    for old in OLD_CACHE_FILES:
        store.remove(old)
