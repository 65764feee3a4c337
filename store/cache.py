"""What one run leaves for the next, so the next reads and renders only what changed.

One file in the state dir, replaced atomically: the source's cursors (API watch positions or
manifest file digests), the converted objects (a pickled blob, unpickled only when something
changed), and the last rendered dataplane per node. It is valid only for the same source and
the same weft code; anything unreadable is simply a cache miss (a full read).
"""
from __future__ import annotations

import gc
import hashlib
import os
import pickle
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

CACHE_FORMAT = 3
CACHE_FILE = "desired.cache"


@contextmanager
def gc_paused():
    """The cyclic garbage collector paused: making tens of thousands of objects (unpickling,
    converting, rendering) otherwise triggers collections that inspect every object made so
    far, again and again (unpickling took 2-3x the time), while none of them is garbage yet.
    Garbage in cycles made meanwhile is collected once it is enabled again."""
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


@dataclass
class DesiredCache:
    source: str                                  # "api:<server>" or "dir:<absolute path>"
    token: str                                   # changes whenever the desired objects change
    cursors: dict = field(default_factory=dict)  # per-source positions (resourceVersions, digests)
    blobs: dict = field(default_factory=dict)     # group (a kind, a file) -> pickle of its objects
    digests: dict = field(default_factory=dict)   # group -> sha256 of its blob
    kinds: dict = field(default_factory=dict)     # group -> the model kinds of its objects ("Pod", ...)
    rendered: dict = field(default_factory=dict)  # node -> (token, rendered value)
    bases: dict = field(default_factory=dict)     # node -> what its rendered sets' members came from
    code: str = ""

    def groups(self) -> dict:
        """The converted objects, by group."""
        with gc_paused():
            return {group: pickle.loads(blob) for group, blob in self.blobs.items()}

    def set_groups(self, groups: dict, changed=None) -> None:
        """Keep `groups`; only those in `changed` (all when None) are pickled again: one changed
        policy does not re-pickle ten thousand pods."""
        for group in groups if changed is None else changed:
            if group in groups:
                value = groups[group]
                self.blobs[group] = blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                self.digests[group] = hashlib.sha256(blob).hexdigest()
                entries = value.values() if isinstance(value, dict) else value
                self.kinds[group] = frozenset(getattr(e, "kind", "") for e in entries) - {""}
        self.blobs = {g: b for g, b in self.blobs.items() if g in groups}
        self.digests = {g: d for g, d in self.digests.items() if g in groups}
        self.kinds = {g: k for g, k in self.kinds.items() if g in groups}

    def basis(self, kinds) -> str:
        """A digest that changes whenever any object of `kinds` does (the groups holding them),
        read without unpickling a thing."""
        kinds = frozenset(kinds)
        parts = sorted(f"{g!r}={self.digests.get(g, '?')}" for g in self.blobs if self.kinds.get(g, kinds) & kinds)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def rendered_for(self, node: str, key: str):
        """What was rendered for `node` from exactly these inputs (`key`), or None."""
        have, value = self.rendered.get(node, (None, None))
        return value if have == key else None

    def keep_render(self, node: str, key: str, value, basis: str) -> None:
        self.rendered[node] = (key, value)
        self.bases[node] = basis

    def last_render(self, node: str, basis: str):
        """The last value rendered for `node` if its `basis` was this one (whatever its key), else None."""
        _key, value = self.rendered.get(node, (None, None))
        return value if basis and self.bases.get(node) == basis else None


def load(state_dir: Path, source: str | None = None) -> DesiredCache | None:
    """The cache of `source` (of any source when None: the caller checks), or None."""
    try:
        with open(state_dir / CACHE_FILE, "rb") as f, gc_paused():
            cache = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError):
        return None
    if not isinstance(cache, DesiredCache) or cache.code != code_token():
        return None
    if source is not None and cache.source != source:
        return None
    return cache


def save(state_dir: Path, cache: DesiredCache) -> None:
    cache.code = code_token()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".desired.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(cache, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, state_dir / CACHE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
