"""Reading the desired state incrementally, from the API server or a manifest directory.

At thousands of nodes, every node re-listing every pod each run would flatten the API server
(the reason Calico has Typha). So a run reads what changed since the last one:
  - API server: one tiny list says whether anything at all changed; if so, a watch per kind
    from its last position returns the changes (a 410 means that kind is listed again);
  - manifest directory: only files whose content changed are parsed again.
Only changed objects are converted again; the model is re-assembled from the cached rest.
"""
from __future__ import annotations

import gc
import hashlib
import os
import pickle
import signal
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from weft.model.errors import InvalidDesiredState, SourceError, ValidationError
from weft.store import cache as cachemod

if TYPE_CHECKING:
    from weft.model.cluster import ClusterState

_WORKERS = 4
API_PROFILE = "api-connection.json"     # desired.kube.connect keeps the resolved connection there


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
          context: str | None = None, *, overlap: bool = True) -> _Started:
    """Begin a read; `finish()` gives the Reading. With `overlap`, reading the API server begins
    at once in a forked child process, so the caller's own work (starting the kernel dumps)
    overlaps it; only a single-threaded command (`weft plan/apply/drift`) may ask for that."""
    if from_dir:
        return _Started(lambda: _read_dir(state_dir, Path(from_dir).resolve()))
    cache = cachemod.load(state_dir)
    keep = Path(state_dir) / API_PROFILE
    asker = _ApiChild(kubeconfig, context, cache, keep) if overlap else _InProcess(kubeconfig, context, cache, keep)
    asker = asker.__enter__()
    return _Started(lambda: _read_api(asker, cache, kubeconfig, context, keep), asker)


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


def _groups(cache: cachemod.DesiredCache) -> dict:
    """The cache's converted objects (the loader registers their type with the codec)."""
    import weft.desired.loader  # noqa: F401
    return cache.groups()


def _assembled(table: dict) -> Callable[[], ClusterState]:
    def build() -> ClusterState:
        from weft.desired.loader import Converted, assemble
        converted = [v for v in table.values() if isinstance(v, Converted)]
        ignored = [v for v in table.values() if isinstance(v, str)]
        return assemble(converted, ignored)
    return build


# ---- manifest directory --------------------------------------------------------------------

def _read_dir(state_dir: Path, root: Path) -> Reading:
    from weft.desired.loader import convert_object, flatten_lists
    from weft.desired.manifests import manifest_files, parse_manifest_file, read_manifest
    source = f"dir:{root}"
    cache = cachemod.load(state_dir, source) or cachemod.DesiredCache(source, token="")
    files = manifest_files(root)
    contents = {str(p): read_manifest(p) for p in files}       # bounded: desired.bounds
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in contents.items()}
    if digests == cache.cursors and cache.token:
        return Reading(cache.token, cache, lambda: _dir_state(_groups(cache)), dirty=False)
    per_file = _groups(cache) if cache.cursors else {}
    per_file = {path: entries for path, entries in per_file.items() if digests.get(path) == cache.cursors.get(path)}
    changed = set(digests) - set(per_file)
    errors: list[ValidationError] = []
    for path in digests:
        if path in per_file:
            continue
        documents = parse_manifest_file(path, contents[path], errors)
        entries = [convert_object(where, raw, errors) for where, raw in flatten_lists(documents)]
        per_file[path] = [e for e in entries if e is not None]
    if errors:
        raise InvalidDesiredState(errors)
    state = _dir_state(per_file)                       # validates across files before caching
    cache.cursors, cache.token = digests, uuid.uuid4().hex
    cache.set_groups(per_file, changed)
    return Reading(cache.token, cache, lambda: state, state)


def _dir_state(per_file: dict) -> ClusterState:
    table: dict[tuple, object] = {}             # a Converted entry, or an ignored kind's name
    errors = []
    for path in sorted(per_file):
        for entry in per_file[path]:
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
              context: str | None, keep: Path) -> Reading:
    """A forked child asks the API server what changed, on the other core, while this process
    goes on with its own work (starting and parsing the kernel's dumps; once the cluster's
    version moved, decoding the cached objects); the child hands back only answers."""
    what, source, *rest = child.receive()
    if what == "full":
        from weft.desired import api as kube
        with kube.connect(kubeconfig, context, keep=keep) as api:
            now = kube.current_resource_version(api)
            return _full_list(api, cachemod.DesiredCache(source, token=""), now)
    (now,) = rest
    if what == "same":
        return Reading(cache.token, cache, _assembled_from(cache), dirty=False)
    # The cluster moved: decode the cached objects while the child waits out its watches'
    # quiet gap (not before: a run with nothing to do needs none of them).
    groups = _groups(cache)
    (results,) = child.receive()
    return _watch_changes(cache, now, results, groups)


def _ask_api(send: Callable[[tuple], None], kubeconfig: str | None, context: str | None,
             cache: cachemod.DesiredCache | None, keep: Path) -> None:
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
        if now and now == cache.cursors.get("*"):
            send(("same", source, now))
            return
        send(("moved", source, now))
        send((_watch_all(api, cache.cursors),))


class _ApiChild:
    """A forked process running `_ask_api`; its messages are pickles on a pipe between this
    process and its own child (never read from disk or from anyone else). It only reads
    the API server and exits (os._exit: nothing of the parent's is flushed or cleaned twice);
    leaving the block reaps it, killing it first if its answers were not all read."""

    def __init__(self, kubeconfig: str | None, context: str | None, cache: cachemod.DesiredCache | None,
                 keep: Path):
        self.args = (kubeconfig, context, cache, keep)
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
                 keep: Path):
        self.args = (kubeconfig, context, cache, keep)
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


def _assembled_from(cache: cachemod.DesiredCache) -> Callable[[], ClusterState]:
    return lambda: _assembled(_flat(_groups(cache)))()


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


def _full_list(api, cache: cachemod.DesiredCache, before: str) -> Reading:
    from weft.desired import api as kube
    from weft.desired.loader import convert_object
    resources = kube.discover_resources(api)
    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="weft-list") as pool:
        listed = list(pool.map(lambda r: kube.list_kind(api, r), resources))
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
    cache.cursors = {r.plural + "." + r.api_version: rv for r, (_i, rv) in zip(resources, listed, strict=True)}
    # Every list began after `before`: while the cluster's version is still `before`, nothing
    # changed (versions are opaque: compared for equality only).
    cache.cursors["*"] = before
    cache.token = uuid.uuid4().hex
    cache.set_groups(_grouped(table))
    return Reading(cache.token, cache, lambda: state, state)


def _watch_all(api, cursors: dict) -> list:
    """Each kind's events since its cursor; a kind without one, or whose events are no longer
    kept (410), is listed again. Every watch ends with a quiet gap: they run all at once. The
    kinds are those the cluster serves (API discovery: each Calico kind from one group)."""
    from weft.desired import api as kube
    resources = kube.discover_resources(api)

    def one(resource):
        cursor = cursors.get(resource.plural + "." + resource.api_version, "")
        try:
            if not cursor:
                raise kube.WatchExpired(resource.kind)
            return resource, "events", kube.watch_since(api, resource, cursor)
        except kube.WatchExpired:
            return resource, "list", kube.list_kind(api, resource)

    with ThreadPoolExecutor(len(resources), thread_name_prefix="weft-watch") as pool:
        return list(pool.map(one, resources))


def _watch_changes(cache: cachemod.DesiredCache, now: str, results: list, groups: dict) -> Reading:
    from weft.desired.loader import convert_object
    for resource, _how, (_items, cursor) in results:
        cache.cursors[resource.plural + "." + resource.api_version] = cursor
    # A kind listed again (its watch expired, or it has no position: a CRD that is not installed)
    # is a change only where the list differs from what is cached; an empty list of a kind of
    # which nothing is cached changes nothing, and no cached objects need to be read for it.
    from weft.desired.api import CALICO_API_GROUPS
    cached_kinds = {group[:2] for group in cache.blobs}
    read = {(r.api_version, r.kind) for r, _how, _answer in results}
    # A kind now read from the other of Calico's groups (or no longer served): what is cached of
    # it under the group it is no longer read from is gone.
    unread = {kind for kind in cached_kinds if kind[0] in CALICO_API_GROUPS and kind not in read}
    if not unread and not any(items if how == "events" else items or (r.api_version, r.kind) in cached_kinds
                              for r, how, (items, _c) in results):
        cache.cursors["*"] = now            # nothing we read changed: caught up to `now`
        return Reading(cache.token, cache, lambda: _assembled(_flat(groups))())
    table = _flat(groups)
    errors: list[ValidationError] = []
    touched = set()
    for key in [k for k in table if k[:2] in unread]:
        del table[key]
        touched.add(key[:3])
    for resource, how, (items, _cursor) in results:
        if how == "list":
            # The list is the whole kind: what is cached and not listed is gone.
            group = (resource.api_version, resource.kind)
            listed = {_key(obj) for obj in items}
            changes = [("DELETED", {"apiVersion": k[0], "kind": k[1], "metadata": {"namespace": k[2], "name": k[3]}})
                       for k in table if k[:2] == group and k not in listed]
            changes += [("ADDED", obj) for obj in items]
        else:
            changes = items
        # Only each object's last event counts: an invalid version fixed since is not an error.
        latest = {_key(obj): (kind, obj) for kind, obj in changes}
        for key, (kind, obj) in latest.items():
            if kind == "DELETED":
                if table.pop(key, None) is not None:
                    touched.add(key[:3])
                continue
            entry = convert_object("api", obj, errors)
            if entry is not None and table.get(key) != entry:
                table[key] = entry
                touched.add(key[:3])
    if errors:
        raise InvalidDesiredState(errors)
    state = _assembled(table)()
    cache.cursors["*"] = ""                 # positions are per kind now; check them next run
    if touched:
        cache.token = uuid.uuid4().hex
        cache.set_groups(_grouped(table), touched)
    return Reading(cache.token, cache, lambda: state, state)
