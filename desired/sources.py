"""Reading the desired state incrementally, from the API server or a manifest directory.

At thousands of nodes, every node re-listing every pod each run would flatten the API server
(the reason Calico has Typha). So a run reads what changed since the last one:
  - API server: one tiny list says whether anything at all changed; if so, a watch per kind
    from its last position returns the changes (a 410 means that kind is listed again);
  - manifest directory: only files whose content changed are read again, and of those only the
    documents whose text changed are parsed (desired.manifests cuts files into documents).
Only changed objects are converted again, and the cached ones are decoded only once something
changed; the model is re-assembled from the cached rest.

When is the cache current? Lists are consistent reads: after a full list the cache holds the
cluster as of the version read before it, and while the cluster's version is still that one,
nothing changed (one request). Watches are not: an event committed just before a run read the
cluster's version may not have reached the server's watch cache when that run's watches had
gone quiet. So a run that watched records the version it began at, and the cache counts as
current at a version only once a second run began at the same version and watched too (nothing
was written in between, and the first run's stragglers have long arrived). A live cluster's
version moves every few seconds (leases, events), so there every run watches: that costs one
request per kind with a quiet gap each, all streams of one HTTP/2 connection where the server
speaks it (desired.h2link), and writes only the small cursors file (store.cache).
"""
from __future__ import annotations

import gc
import hashlib
import os
import pickle
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from weft.model import codec
from weft.model.errors import InvalidDesiredState, SourceError, ValidationError
from weft.store import cache as cachemod

if TYPE_CHECKING:
    from weft.model.cluster import ClusterState

_WORKERS = 4
API_PROFILE = "api-connection.json"     # desired.kube.connect keeps the resolved connection there
Warn = Callable[[str], None]      # where a read's warnings go (see start)
CURRENT = "*"       # cursors: the cluster version at which the cache is known current ("" when not)
BEGUN = "~"         # cursors: the cluster version the last run that watched began at


@dataclass(frozen=True)
class ManifestDocument:
    """One piece of a manifest file as read last time (desired.manifests.Piece): its text's
    digest, how many documents and values of its file's budget it holds, and its objects
    converted (a Converted, or an ignored kind's name, each)."""
    digest: str
    documents: int
    values: int
    entries: tuple


codec.register(ManifestDocument)        # kept in the desired-state cache, a file's tuple of them


@dataclass
class Reading:
    """A read of the desired state: its token, and the state itself, built only if asked for."""
    token: str
    cache: cachemod.DesiredCache
    _build: Callable[[], ClusterState]
    _state: ClusterState | None = None
    dirty: bool = True                  # the cache must be saved for the next run

    def state(self) -> ClusterState:
        if self._state is None:
            self._state = self._build()
        return self._state


def read(state_dir: Path, from_dir: str | None, kubeconfig: str | None = None,
         context: str | None = None) -> Reading:
    """The desired state, read in this process (no child process: safe from any thread)."""
    with start(state_dir, from_dir, kubeconfig, context, overlap=False) as reading:
        return reading.finish()


def start(state_dir: Path, from_dir: str | None, kubeconfig: str | None = None,
          context: str | None = None, *, overlap: bool = True, warn: Warn | None = None) -> _Started:
    """Begin a read; `finish()` gives the Reading. With `overlap`, reading the API server begins
    at once in a forked child process, so the caller's own work (starting the kernel dumps)
    overlaps it; only a single-threaded command (`weft plan/apply/drift`) may ask for that.
    `warn`: where the read's warnings go (the run's event log; default: `weft: warning:` lines
    on stderr); the child calls it too, writing to the stderr it shares with this process."""
    if from_dir:
        return _Started(lambda: _read_dir(state_dir, Path(from_dir).resolve()))
    cache = cachemod.load(state_dir)
    keep = Path(state_dir) / API_PROFILE
    asker = _ApiChild(kubeconfig, context, cache, keep, warn) if overlap \
        else _InProcess(kubeconfig, context, cache, keep, warn)
    asker = asker.__enter__()
    return _Started(lambda: _read_api(asker, cache, kubeconfig, context, keep, warn), asker)


class _Started:
    def __init__(self, finish: Callable[[], Reading], child: _ApiChild | _InProcess | None = None):
        self._finish, self.child = finish, child

    def finish(self) -> Reading:
        try:
            return self._finish()
        finally:
            self.close()

    def close(self) -> None:
        """Reap the child (killed if its answers were not all read); idempotent."""
        if self.child is not None:
            child, self.child = self.child, None
            child.__exit__(None, None, None)

    def __enter__(self) -> _Started:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def commit(state_dir: Path, reading: Reading) -> None:
    """Keep this read for the next run (only once it was valid: an invalid object is read again)."""
    cachemod.save(state_dir, reading.cache)
    reading.dirty = False


def _decoded(cache: cachemod.DesiredCache, groups: Iterable | None = None) -> dict | None:
    """The cache's converted objects by group (all, or those of `groups` it has), decoded now;
    None when they do not decode to the values this weft keeps there: the cache is of no use."""
    import weft.desired.loader  # noqa: F401  (registers Converted with the codec)
    try:
        if groups is None:
            return cache.groups()
        return {g: cache.group(g) for g in groups if g in cache.blobs}
    except (codec.CodecError, ValueError, TypeError, RecursionError):
        return None


def _assembled(table: dict) -> Callable[[], ClusterState]:
    def build() -> ClusterState:
        from weft.desired.loader import Converted, assemble
        converted = [v for v in table.values() if isinstance(v, Converted)]
        ignored = [v for v in table.values() if isinstance(v, str)]
        return assemble(converted, ignored)
    return build


# ---- manifest directory --------------------------------------------------------------------

def _read_dir(state_dir: Path, root: Path) -> Reading:
    """The directory's state, read lazily like the API server's: only the changed files'
    changed documents are parsed; of the cache, only the notes of the changed files' blocks are
    read (each document's digest), and only the blocks that are encoded again are decoded (to
    take their unchanged documents). The other files' objects are decoded only if the state is
    asked for (a render made from the last one may not need it: reconciler.run)."""
    from weft.desired.manifests import manifest_files, read_manifest
    source = f"dir:{root}"
    cache = cachemod.load(state_dir, source) or cachemod.DesiredCache(source, token="")
    files = manifest_files(root)
    contents = {str(p): read_manifest(p) for p in files}       # bounded: desired.bounds
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in contents.items()}
    if digests == cache.cursors and cache.token:
        return Reading(cache.token, cache, lambda: _dir_state_of(cache, contents), dirty=False)
    changed = [path for path in digests if digests[path] != cache.cursors.get(path)]
    known = _known_documents(cache, changed) if cache.token else None
    if known is None:               # a cache of no use: everything is read again
        cache, changed, known = cachemod.DesiredCache(source, token=""), list(digests), {}
    errors: list[ValidationError] = []
    read = {path: _read_file(path, contents[path], known.get(path, {}), errors) for path in changed}
    if errors:
        raise InvalidDesiredState(errors)
    cache.cursors, cache.token = digests, uuid.uuid4().hex
    try:
        fresh = _keep_blocks(cache, read, [g for g in cache.blobs if g[0] not in digests])
        # Every object is needed anyway (nothing else is cached), or one may be defined in two
        # files: the whole state is assembled now, which says which (validated before caching).
        eager = all(g in fresh for g in cache.blobs) or _maybe_defined_twice(cache, known, read, fresh)
        state = _current_state(cache, fresh, digests) if eager else None
    except _Reread:
        cache = cachemod.DesiredCache(source, token=uuid.uuid4().hex, cursors=digests)
        state = _reread(cache, contents)
    if state is not None:
        return Reading(cache.token, cache, lambda: state, state)

    def build() -> ClusterState:
        """The whole state: the unchanged files' objects decoded now (or, when they do not
        decode, every file read again)."""
        try:
            return _current_state(cache, fresh, digests)
        except _Reread:
            return _reread(cache, contents)
    return Reading(cache.token, cache, build)


class _Reread(Exception):
    """A cached group that does not decode to what a directory read keeps: read every file again."""


class _Known(NamedTuple):
    """A document of a changed file whose text is the same as last time, as its block's note
    tells (desired.manifests.Piece's counts, and how many objects it holds): not parsed again,
    and decoded (from `block`, its block's id) only if a block encoded again holds it. (A tuple:
    a file of 100,000 documents makes 100,000 of them.)"""
    digest: str
    documents: int
    values: int
    objects: int
    block: str


def _block_note(documents: tuple) -> tuple:
    """A block's note (store.cache): each document's digest, counts and objects, in order."""
    return tuple((d.digest, d.documents, d.values, _objects(d)) for d in documents)


def _objects(document: ManifestDocument | _Known) -> int:
    if isinstance(document, _Known):
        return document.objects
    return sum(not isinstance(e, str) for e in document.entries)


def _known_documents(cache: cachemod.DesiredCache, changed: list[str]) -> dict[str, dict] | None:
    """The changed files' documents as cached: digest -> a _Known (from its block's note) or,
    for a block without a usable note, the decoded document; None when a block does not decode."""
    paths = set(changed)
    known: dict[str, dict] = {path: {} for path in changed}
    for group in [g for g in cache.blobs if isinstance(g, tuple) and g and g[0] in paths]:
        note = cache.note(group)
        if _note_ok(note) and len(group) == 3:
            block = str(group[2])
            known[group[0]].update({digest: _Known(digest, documents, values, objects, block)
                                    for digest, documents, values, objects in note})
            continue
        decoded = _decoded(cache, [group])
        if decoded is None or not _dir_groups_ok(decoded):
            return None
        known[group[0]].update((d.digest, d) for d in decoded[group])
    return known


def _note_ok(note: object) -> bool:
    """Whether a block's note is what `_block_note` makes: (digest, count, count, count) each."""
    if not isinstance(note, tuple) or not note or not all(type(n) is tuple and len(n) == 4 for n in note):
        return False
    digests, *counts = zip(*note, strict=True)
    return all(type(d) is str for d in digests) and \
        all(type(c) is int for column in counts for c in column) and min(min(column) for column in counts) >= 0


def _current_state(cache: cachemod.DesiredCache, fresh: dict, digests: dict) -> ClusterState:
    """The state of the cache's groups: those encoded this run as they are (`fresh`), the
    others decoded now (_Reread when one does not decode)."""
    rest = _decoded(cache, [g for g in cache.blobs if g not in fresh])
    if rest is None or not _dir_groups_ok(rest):
        raise _Reread
    return _dir_state(_per_file(digests, {}, rest | fresh))


def _reread(cache: cachemod.DesiredCache, contents: dict[str, bytes]) -> ClusterState:
    """Every file read again, from nothing, and kept in `cache` in place of its groups."""
    errors: list[ValidationError] = []
    read = {path: _read_file(path, data, {}, errors) for path, data in contents.items()}
    if errors:
        raise InvalidDesiredState(errors)
    for group in list(cache.blobs):
        cache.take(group)
    state = _dir_state(read)
    _keep_blocks(cache, read, [])
    return state


def _per_file(digests: dict, read: dict[str, tuple], groups: dict) -> dict[str, tuple]:
    """Each file's documents, in the directory's order: read now, or decoded from its groups."""
    kept = _by_file(groups)
    return {path: read[path] if path in read else kept.get(path, ()) for path in digests}


def _maybe_defined_twice(cache: cachemod.DesiredCache, known: dict[str, dict], read: dict[str, tuple],
                         fresh: dict) -> bool:
    """Whether an object may now be defined twice (False only when none is). The cache holds no
    object twice (a read with one fails before it is kept), so only the objects of documents
    new to their file can meet another, or a document now found twice in its file. Each other
    group's text is searched for a new object's name as encoded (a group without it cannot
    define it), and only a group holding it is decoded; the groups encoded this run (`fresh`,
    holding every new document) are at hand."""
    new: set[tuple] = set()
    for path, documents in read.items():
        seen: set[str] = set()
        for document in documents:
            if document.digest in known.get(path, {}):
                if document.digest in seen and _objects(document):
                    return True
                seen.add(document.digest)
            elif isinstance(document, ManifestDocument):
                new |= {(e.kind, e.namespace, e.name) for e in document.entries if not isinstance(e, str)}
    if len(new) > _MAX_SEARCHED:
        return True
    if not new:
        return False
    needles = [(kind, codec.dumps(name).encode()) for kind, _namespace, name in new]
    found: Counter[tuple] = Counter()
    for group, text in cache.blobs.items():
        if group in fresh:
            documents = fresh[group]
        else:
            kinds = cache.kinds.get(group)
            text = bytes(text)                      # a slice of the loaded file: searched as bytes
            if not any((kinds is None or kind in kinds) and needle in text for kind, needle in needles):
                continue
            decoded = _decoded(cache, [group])
            if decoded is None or not _dir_groups_ok(decoded):
                return True
            documents = decoded[group]
        found.update(key for e in _document_entries(documents) if not isinstance(e, str)
                     and (key := (e.kind, e.namespace, e.name)) in new)
    return any(count > 1 for count in found.values())


_MAX_SEARCHED = 32          # more new objects than this: the whole state is assembled at once


# A file's documents are kept in blocks, each encoded as one group of the cache, so a changed
# document re-encodes its block, not its file. Blocks are cut where the content says (after a
# document whose digest ends in BLOCK_END: one in 256 on average, and at most MAX_BLOCK), so a
# document added or removed moves no other cut and leaves the other blocks' encodings as they are.
BLOCK_END = "00"
MAX_BLOCK = 1024


def _blocks(documents: tuple) -> list[tuple]:
    blocks: list[tuple] = []
    current: list = []
    for document in documents:
        current.append(document)
        if document.digest.endswith(BLOCK_END) or len(current) >= MAX_BLOCK:
            blocks.append(tuple(current))
            current = []
    return blocks + [tuple(current)] if current else blocks


def _keep_blocks(cache: cachemod.DesiredCache, read: dict[str, tuple], gone: list) -> dict:
    """The cache's groups for the files read again ((path, n, block id) -> the block's documents):
    a block whose documents are the same as before keeps its encoded text; files gone go. Gives
    the groups encoded again, with their documents (a _Known one decoded from its old block;
    _Reread when that does not decode)."""
    for group in gone:
        cache.take(group)
    fresh: dict = {}
    for path, documents in read.items():
        old: dict[str, tuple] = {}
        for group in [g for g in cache.blobs if g[0] == path]:
            if (kept := cache.take(group)) is not None:     # always: the group is one of the cache's
                old[group[2]] = kept
        taken = dict(old)
        new = {}
        for n, block in enumerate(_blocks(documents)):
            block_id = hashlib.sha256("".join(d.digest for d in block).encode()).hexdigest()[:16]
            if block_id in old:
                cache.put((path, n, block_id), old.pop(block_id))
            else:
                new[(path, n, block_id)] = block
        if any(isinstance(d, _Known) for block in new.values() for d in block):
            decoded: dict[str, dict] = {}
            new = {group: tuple(_materialized(d, taken, decoded) for d in block) for group, block in new.items()}
        cache.update_groups(new, entries_of=_document_entries, note_of=_block_note)
        fresh.update(new)
    return fresh


def _materialized(document: ManifestDocument | _Known, taken: dict[str, tuple],
                  decoded: dict[str, dict]) -> ManifestDocument:
    """`document` itself, or the cached document a _Known one stands for (its old block decoded once)."""
    if isinstance(document, ManifestDocument):
        return document
    if document.block not in decoded:
        kept = taken.get(document.block)
        try:
            block = cachemod.decoded(kept[0]) if kept is not None else None
        except (codec.CodecError, ValueError, TypeError, RecursionError):
            block = None
        if not (isinstance(block, tuple) and all(isinstance(d, ManifestDocument) for d in block)):
            raise _Reread
        decoded[document.block] = {d.digest: d for d in block}
    found = decoded[document.block].get(document.digest)
    if found is None:
        raise _Reread
    return found


def _by_file(groups: dict) -> dict[str, tuple]:
    """Decoded groups (blocks) -> each file's documents, in order."""
    files: dict[str, list] = {}
    for group in sorted(groups, key=lambda g: (g[0], g[1])):
        files.setdefault(group[0], []).extend(groups[group])
    return {path: tuple(documents) for path, documents in files.items()}


def _dir_state_of(cache: cachemod.DesiredCache, contents: dict[str, bytes]) -> ClusterState:
    """The state of unchanged files: from the cache, or (when it does not decode) read again."""
    cached = _decoded(cache)
    if cached is None or not _dir_groups_ok(cached):
        errors: list[ValidationError] = []
        files = {path: _read_file(path, data, {}, errors) for path, data in contents.items()}
        if errors:
            raise InvalidDesiredState(errors)
    else:
        files = _by_file(cached)
    return _dir_state({path: files.get(path, ()) for path in contents})


def _read_file(path: str, data: bytes, known: dict, errors: list[ValidationError]) -> tuple:
    """A changed file's documents: those whose text is the same as last time are taken from
    `known` (digest -> a ManifestDocument parsed and converted then, or a _Known standing for
    one), only the others are parsed and converted."""
    from weft.desired.loader import convert_object, flatten_lists
    from weft.desired.manifests import manifest_pieces
    pieces = manifest_pieces(path, data, errors, {d: (doc.documents, doc.values) for d, doc in known.items()})
    if pieces is None:
        return ()
    documents = []
    for piece in pieces:
        if piece.loaded is None:
            documents.append(known[piece.digest])
            continue
        raw = ((path, doc) for doc in piece.loaded if doc is not None)
        entries = [convert_object(where, obj, errors) for where, obj in flatten_lists(raw)]
        documents.append(ManifestDocument(piece.digest, piece.documents, piece.values,
                                          tuple(e for e in entries if e is not None)))
    return tuple(documents)


def _document_entries(documents: tuple) -> Iterable:
    return (entry for document in documents for entry in document.entries)


def _dir_groups_ok(groups: dict) -> bool:
    """Whether decoded groups are what a directory read keeps: blocks of a file's documents."""
    return all(isinstance(g, tuple) and len(g) == 3 and isinstance(g[0], str) and isinstance(g[1], int)
               and isinstance(docs, tuple) and all(isinstance(d, ManifestDocument) for d in docs)
               for g, docs in groups.items())


def _dir_state(per_file: dict) -> ClusterState:
    table: dict[tuple, object] = {}             # a Converted entry, or an ignored kind's name
    errors = []
    for path in sorted(per_file):
        for entry in _document_entries(per_file[path]):
            if isinstance(entry, str):
                table[("ignored", len(table))] = entry
                continue
            key = (entry.kind, entry.namespace, entry.name)
            if key in table:
                errors.append(ValidationError(entry.where, entry.label, "metadata.name", "defined more than once"))
            table[key] = entry
    if errors:
        raise InvalidDesiredState(errors)
    return _assembled(table)()


# ---- API server -----------------------------------------------------------------------------

def _read_api(child: _ApiChild | _InProcess, cache: cachemod.DesiredCache | None, kubeconfig: str | None,
              context: str | None, keep: Path, warn: Warn | None = None) -> Reading:
    """A forked child asks the API server what changed, on the other core, while this process
    goes on with its own work (starting and parsing the kernel's dumps); the child hands back
    only answers. The cached objects are decoded only once the answers show a change."""
    what, source, *rest = child.receive()
    if what == "full":
        return _list_everything(cachemod.DesiredCache(source, token=""), kubeconfig, context, keep, warn)
    (now,) = rest
    assert cache is not None            # without a cache the child answers "full" (_ask_api)
    if what == "same":
        return Reading(cache.token, cache, _assembled_from(cache, kubeconfig, context, keep), dirty=False)
    (results,) = child.receive()
    return _watch_changes(cache, now, results, kubeconfig, context, keep)


def _list_everything(cache: cachemod.DesiredCache, kubeconfig: str | None, context: str | None,
                     keep: Path, warn: Warn | None = None) -> Reading:
    from weft.desired import api as kube
    with kube.connect(kubeconfig, context, keep=keep) as api:
        now = kube.current_resource_version(api)
        return _full_list(api, cache, now, keep.parent, warn)


def _ask_api(send: Callable[[tuple], None], kubeconfig: str | None, context: str | None,
             cache: cachemod.DesiredCache | None, keep: Path, warn: Warn | None = None) -> None:
    """The child's part: ("full", source) when the cache is of no use (a full list follows, in
    the parent), ("same", source, now) when nothing changed, else ("moved", source, now) and
    then (results,), the watches' (resource, "events"|"list", (items, cursor)) for every kind."""
    from weft.desired import api as kube
    with kube.connect(kubeconfig, context, keep=keep) as api:
        source = f"api:{api.host}"
        if cache is None or cache.source != source or not cache.token:
            send(("full", source))
            return
        now = kube.current_resource_version(api)
        if now and now == cache.cursors.get(CURRENT):
            send(("same", source, now))
            return
        send(("moved", source, now))
        send((_watch_all(api, cache.cursors, keep.parent, warn),))


class _ApiChild:
    """A forked process running `_ask_api`; its messages are pickles on a pipe between this
    process and its own child (never read from disk or from anyone else). It only reads
    the API server and exits (os._exit: nothing of the parent's is flushed or cleaned twice);
    leaving the block reaps it, killing it first if its answers were not all read."""

    def __init__(self, kubeconfig: str | None, context: str | None, cache: cachemod.DesiredCache | None,
                 keep: Path, warn: Warn | None = None):
        self.args = (kubeconfig, context, cache, keep, warn)
        self.done = False

    def __enter__(self) -> _ApiChild:
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                       # the child
            code = 0
            gc.disable()                        # it lives for one import and a few requests
            try:
                os.close(read_end)
                with os.fdopen(write_end, "wb") as out:
                    def send(message: tuple) -> None:
                        pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
                        out.flush()
                    try:
                        _ask_api(send, *self.args)
                    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
                        send(("error", _portable(exc)))
            except BaseException:  # noqa: BLE001 - the pipe is gone: the parent is gone or failing
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        self.input = os.fdopen(read_end, "rb")
        return self

    def receive(self) -> tuple:
        try:
            message = pickle.load(self.input)
        except EOFError:
            raise SourceError("reading the Kubernetes API: the reading process ended without an answer") from None
        self.done = message[0] in ("error", "full", "same") or len(message) == 1   # its last message
        if message[0] == "error":
            raise message[1]
        return message

    def __exit__(self, *exc) -> None:
        self.input.close()
        try:
            if not self.done:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass


class _InProcess:
    """`_ask_api` run here, at once; its messages are handed back in order, as _ApiChild's are."""

    def __init__(self, kubeconfig: str | None, context: str | None, cache: cachemod.DesiredCache | None,
                 keep: Path, warn: Warn | None = None):
        self.args = (kubeconfig, context, cache, keep, warn)
        self.messages: list[tuple] = []

    def __enter__(self) -> _InProcess:
        try:
            _ask_api(self.messages.append, *self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, as the child would
            self.messages.append(("error", exc))
        return self

    def receive(self) -> tuple:
        message = self.messages.pop(0)
        if message[0] == "error":
            raise message[1]
        return message

    def __exit__(self, *exc) -> None:
        self.messages.clear()


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a SourceError saying what it was."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return SourceError(f"reading the Kubernetes API: {type(exc).__name__}: {exc}")


def _assembled_from(cache: cachemod.DesiredCache, kubeconfig: str | None, context: str | None,
                    keep: Path) -> Callable[[], ClusterState]:
    """The state of the cached objects, built when asked for (a cache that does not decode is
    replaced by a full list)."""
    def build() -> ClusterState:
        groups = _decoded(cache)
        if groups is None or not _api_groups_ok(groups):
            return _list_everything(cache, kubeconfig, context, keep).state()
        return _assembled(_flat(groups))()
    return build


def _api_groups_ok(groups: dict) -> bool:
    """Whether decoded groups are what an API read keeps: per kind and namespace, its objects."""
    from weft.desired.loader import Converted
    return all(isinstance(group, dict) and all(isinstance(k, tuple) and len(k) == 4 and isinstance(v, Converted | str)
                                               for k, v in group.items())
               for group in groups.values())


def _flat(groups: dict) -> dict:
    return {key: entry for group in groups.values() for key, entry in group.items()}


def _grouped(table: dict) -> dict:
    """An API object table grouped by (apiVersion, kind, namespace): the cache's unit of
    (re)encoding, so a changed pod or policy re-encodes its namespace's objects, not the kind's."""
    groups: dict = {}
    for key, entry in table.items():
        groups.setdefault(key[:3], {})[key] = entry
    return groups


def _key(obj: dict) -> tuple:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion"), obj.get("kind"), meta.get("namespace"), meta.get("name"))


def _full_list(api, cache: cachemod.DesiredCache, before: str, state_dir: Path | None = None,
               warn: Warn | None = None) -> Reading:
    from weft.desired import api as kube
    from weft.desired.discovery import Discovery
    from weft.desired.loader import convert_object
    # The kinds the cluster serves (API discovery, kept in the state dir: desired.discovery).
    answers = Discovery(api, state_dir, warn).each(lambda r, absent_ok: kube.list_kind(api, r, absent_ok=absent_ok),
                                             _WORKERS)
    resources = [r for r, _answer in answers]
    listed = [answer for _r, answer in answers]
    errors: list[ValidationError] = []
    table = {}
    for items, _rv in listed:
        for obj in items:
            entry = convert_object("api", obj, errors)
            if entry is not None:
                table[_key(obj)] = entry
    if errors:
        raise InvalidDesiredState(errors)
    state = _assembled(table)()
    cache.cursors = {_cursor(r): rv for r, (_i, rv) in zip(resources, listed, strict=True)}
    # Every list began after `before` and lists are consistent reads: while the cluster's version
    # is still `before`, nothing changed (versions are opaque: compared for equality only).
    cache.cursors[CURRENT] = before
    cache.token = uuid.uuid4().hex
    cache.set_groups(_grouped(table))
    return Reading(cache.token, cache, lambda: state, state)


def _cursor(resource) -> str:
    return resource.plural + "." + resource.api_version


def _watch_all(api, cursors: dict, state_dir: Path | None = None, warn: Warn | None = None) -> list:
    """Each kind's events since its cursor; a kind without one, or whose events are no longer
    kept (410), is listed again. Every watch ends with a quiet gap: they run all at once. The
    kinds are those the cluster serves (API discovery, kept in the state dir: each Calico kind
    from one group; see desired.discovery)."""
    from weft.desired import api as kube
    from weft.desired.discovery import Discovery

    def one(resource, absent_ok: bool):
        cursor = cursors.get(_cursor(resource), "")
        try:
            if not cursor:
                raise kube.WatchExpired(resource.kind)
            return "events", kube.watch_since(api, resource, cursor, absent_ok=absent_ok)
        except kube.WatchExpired:
            return "list", kube.list_kind(api, resource, absent_ok=absent_ok)

    return [(resource, how, answer) for resource, (how, answer) in Discovery(api, state_dir, warn).each(one)]


def _watch_changes(cache: cachemod.DesiredCache, now: str, results: list, kubeconfig: str | None,
                   context: str | None, keep: Path) -> Reading:
    """The cache brought up to the watches' answers. Only the groups holding objects that an
    event names are decoded to compare; the rest only when the state changed."""
    from weft.desired.loader import convert_object
    for resource, _how, (_items, cursor) in results:
        cache.cursors[_cursor(resource)] = cursor
    # Current at `now` only when the previous run that watched began at `now` too (see the
    # module docstring); else this run's beginning is recorded for the next one to confirm.
    cache.cursors[CURRENT] = now if now and cache.cursors.get(BEGUN) == now else ""
    cache.cursors[BEGUN] = now
    # Only each object's last event counts: an invalid version fixed since is not an error.
    latest: dict[tuple, tuple[str, dict | None]] = {}
    # A kind now read from the other of Calico's groups (or no longer served): what is cached of
    # it under the group it is no longer read from is gone, as if listed empty.
    from weft.desired.api import CALICO_API_GROUPS
    read = {(r.api_version, r.kind) for r, _how, _answer in results}
    relisted = [kind for kind in {g[:2] for g in cache.blobs} if kind[0] in CALICO_API_GROUPS and kind not in read]
    for resource, how, (items, _position) in results:
        if how == "list":
            # The list is the whole kind: what is cached and not listed is gone.
            relisted.append((resource.api_version, resource.kind))
            latest.update((_key(obj), ("ADDED", obj)) for obj in items)
        else:
            latest.update((_key(obj), (kind, obj)) for kind, obj in items)
    looked_at = {key[:3] for key in latest} | {g for g in cache.blobs if g[:2] in relisted}
    if not looked_at:
        return Reading(cache.token, cache, _assembled_from(cache, kubeconfig, context, keep))
    groups = _decoded(cache, looked_at)
    if groups is None or not _api_groups_ok(groups):
        return _list_everything(cachemod.DesiredCache(cache.source, token=""), kubeconfig, context, keep)
    for group in looked_at:
        groups.setdefault(group, {})
    listed = set(latest)
    for group in [g for g in groups if g[:2] in relisted]:
        for key in groups[group]:
            if key not in listed:
                latest[key] = ("DELETED", None)
    errors: list[ValidationError] = []
    touched = {}
    for key, (kind, obj) in latest.items():
        group = groups[key[:3]]
        if kind == "DELETED":
            if group.pop(key, None) is not None:
                touched[key[:3]] = group
            continue
        entry = convert_object("api", obj, errors)
        if entry is not None and group.get(key) != entry:
            group[key] = entry
            touched[key[:3]] = group
    if errors:
        raise InvalidDesiredState(errors)
    if not touched:
        return Reading(cache.token, cache, _assembled_from(cache, kubeconfig, context, keep))
    unchanged = [g for g in cache.blobs if g not in groups]

    def build() -> ClusterState:
        """The whole state: every other group decoded too, only when asked for (a render made
        from the last one may not need it: reconciler.run)."""
        rest = _decoded(cache, unchanged)
        if rest is None or not _api_groups_ok(rest):
            return _list_everything(cachemod.DesiredCache(cache.source, token=""), kubeconfig, context, keep).state()
        return _assembled(_flat(rest | groups))()
    cache.token = uuid.uuid4().hex
    cache.update_groups(touched)
    return Reading(cache.token, cache, build)
