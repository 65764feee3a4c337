"""What one run leaves for the next, so the next reads and renders only what changed.

One file in the state dir, `desired-cache.json`, replaced atomically (store.statedir): the
source's cursors (API watch positions or manifest file digests), the converted objects grouped
(by kind and namespace, or by file) and the last render per node. Everything in it is data
(JSON through model.codec, which builds only the model's own types): a planted or damaged file
can make a run read everything again, never run anything.

Each group, and each render, is one line of the file, kept as text until it is needed: a run
that changed one namespace's pods encodes that group again and copies the others' lines as they
were. The cache is valid only for the same source and the same weft code (every file of the
installed `weft` package counts); anything unreadable is a cache miss (a full read).

Layout: line 1 is the header {"format", "code", "source", "token", "cursors", "groups":
[[group key, digest, kinds], ...], "rendered": [[node, key, basis], ...]}; then one line per
group, then one line per render, in the header's order.
"""
from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from weft.model import codec
from weft.store.statedir import CorruptState, StateDir, UnsafeState

CACHE_FORMAT = 4
CACHE_FILE = "desired-cache.json"
OLD_CACHE_FILES = ("desired.cache",)      # pickles of weft <= 0.1.0: never read, removed
MAX_CACHE = 1 << 30


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
    return json.dumps(codec.encode(value), separators=(",", ":"), ensure_ascii=False)


def _decoded(text: str) -> Any:
    with gc_paused():
        return codec.decode(json.loads(text))


@dataclass
class DesiredCache:
    source: str                                  # "api:<server>" or "dir:<absolute path>"
    token: str                                   # changes whenever the desired objects change
    cursors: dict = field(default_factory=dict)  # per-source positions (resourceVersions, digests)
    blobs: dict = field(default_factory=dict)    # group (a kind's namespace, a file) -> its encoded objects
    digests: dict = field(default_factory=dict)  # group -> sha256 of its encoded objects
    kinds: dict = field(default_factory=dict)    # group -> the model kinds of its objects ("Pod", ...)
    rendered: dict = field(default_factory=dict)  # node -> (key, encoded render)
    bases: dict = field(default_factory=dict)    # node -> what its rendered sets' members came from
    code: str = ""

    def groups(self) -> dict:
        """The converted objects, by group (decoded now; the model types must be registered)."""
        return {group: _decoded(text) for group, text in self.blobs.items()}

    def set_groups(self, groups: dict, changed=None) -> None:
        """Keep `groups`; only those in `changed` (all when None) are encoded again: one changed
        policy does not re-encode ten thousand pods."""
        for group in groups if changed is None else changed:
            if group in groups:
                value = groups[group]
                self.blobs[group] = text = _encoded(value)
                self.digests[group] = hashlib.sha256(text.encode()).hexdigest()
                entries = value.values() if isinstance(value, dict) else value
                self.kinds[group] = frozenset(getattr(e, "kind", "") for e in entries) - {""}
        self.blobs = {g: b for g, b in self.blobs.items() if g in groups}
        self.digests = {g: d for g, d in self.digests.items() if g in groups}
        self.kinds = {g: k for g, k in self.kinds.items() if g in groups}

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
        """Keep `value` (model values, or a JSON-able form of them) as the render of `node`."""
        self.rendered[node] = (key, _encoded(value))
        self.bases[node] = basis

    def last_render(self, node: str, basis: str, decode: Callable[[Any], Any] = lambda v: v):
        """The last value rendered for `node` if its `basis` was this one (whatever its key), else None."""
        _key, text = self.rendered.get(node, (None, None))
        return self._render(text, decode) if basis and self.bases.get(node) == basis else None

    @staticmethod
    def _render(text: str | None, decode: Callable[[Any], Any]):
        if text is None:
            return None
        try:
            return decode(_decoded(text))
        except (codec.CodecError, ValueError, TypeError, RecursionError):
            return None                          # not what this weft writes: render anew


def load(state_dir: StateDir | Path | str, source: str | None = None) -> DesiredCache | None:
    """The cache of `source` (of any source when None: the caller checks), or None."""
    store = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    try:
        data = store.read_bytes(CACHE_FILE, MAX_CACHE)
    except (UnsafeState, CorruptState, OSError):
        return None                              # a file weft does not trust is a miss; save replaces it
    if not data:
        return None
    try:
        lines = data.decode().split("\n")
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT or header.get("code") != code_token():
            return None
        if source is not None and header.get("source") != source:
            return None
        groups, rendered = header["groups"], header["rendered"]
        body = lines[1:]
        if len(body) < len(groups) + len(rendered):
            return None
        cache = DesiredCache(str(header["source"]), str(header["token"]), dict(header["cursors"]),
                             code=header["code"])
        for (key, digest, kinds), text in zip(groups, body, strict=False):
            group = codec.decode(key)
            cache.blobs[group], cache.digests[group], cache.kinds[group] = text, str(digest), frozenset(kinds)
        for (node, key, basis), text in zip(rendered, body[len(groups):], strict=False):
            cache.rendered[str(node)] = (str(key), text)
            cache.bases[str(node)] = str(basis)
    except (ValueError, KeyError, TypeError, codec.CodecError, RecursionError, UnicodeDecodeError):
        return None
    if not all(isinstance(v, str) for v in cache.cursors.values()):
        return None
    return cache


def save(state_dir: StateDir | Path | str, cache: DesiredCache) -> None:
    store = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    cache.code = code_token()
    order = list(cache.blobs)
    nodes = list(cache.rendered)
    header = {"format": CACHE_FORMAT, "code": cache.code, "source": cache.source, "token": cache.token,
              "cursors": cache.cursors,
              "groups": [[codec.encode(g), cache.digests[g], sorted(cache.kinds.get(g, ()))] for g in order],
              "rendered": [[n, cache.rendered[n][0], cache.bases.get(n, "")] for n in nodes]}
    lines = [json.dumps(header, separators=(",", ":"), ensure_ascii=False)]
    lines += [cache.blobs[g] for g in order]
    lines += [cache.rendered[n][1] for n in nodes]
    store.replace(CACHE_FILE, "\n".join(lines) + "\n")
    for old in OLD_CACHE_FILES:
        store.remove(old)
