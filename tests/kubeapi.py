"""A real HTTP server speaking the Kubernetes API's wire contract, for tests and benchmarks.

No Kubernetes API server can be installed here, and mocking the client would test nothing of
the wire. FakeKubeAPI is a small in-memory API server on 127.0.0.1 that the official client
talks to over real HTTP: lists with `limit`/`continue` served from a consistent snapshot, one
global resourceVersion, watches, single-object GET/POST/PUT/DELETE with optimistic concurrency,
and errors as `Status` objects. Where it differs from a real server it says so below; tests
that pass against it also run against a real cluster (set KUBECONFIG; see `kube_source`).

Decisions (documented differences from a real API server):
- Built-in kinds (core v1, networking.k8s.io/v1, discovery.k8s.io/v1) are always served. A CRD
  kind is served if an object of it was given or put(), with `crds=True` (every Calico kind in
  KINDS, in both of Calico's groups) or `crds=[kind, ...]` (those, in both groups), and by
  default (`crds=None`) the kinds weft needs (desired.api.NEEDED_KINDS) that no given object
  installs, from crd.projectcalico.org/v1 (so a run that reads the cluster does not fail for
  want of them); `crds=False`: none but those of the given objects. A CRD not served answers 404 on its paths, as an
  uninstalled CRD does.
- List items of built-in kinds lack kind/apiVersion; CRD items carry them (unstructured objects
  do on a real server too).
- A watch from a resourceVersion older than the retained history answers HTTP 200 and one ERROR
  event holding a 410 `Expired` Status, as the real (watch-cache) server does; a continue token
  from before `expire_continue_tokens()` or `compact()` answers HTTP 410 `Expired`.
- Status is stored as given on create (no kubelet resets it); deleting a Namespace removes its
  objects at once (no Terminating phase); `fieldSelector` accepts any dotted path with `=`,
  `==`, `!=`; `labelSelector` is refused with 400 rather than silently ignored.
- put() does not deep-copy: don't mutate an object after putting it (serialised bytes are
  taken at put time; the dict itself is kept for field selectors).
- `bytes_sent` counts every byte the server wrote (status lines, headers, bodies, watch chunks),
  what a client reads from it, and `connections` the connections it accepted; `watch_lag()`
  holds back events from watches, as a real server's watch cache delivers a committed write a
  moment after lists and resourceVersions show it.
- With `tls`, HTTP/2 is offered by ALPN as kube-apiserver does ("h2", then "http/1.1"; `http2=False`:
  HTTP/1.1 only), and served with desired.h2link's Link: each stream is one request, routed as an
  HTTP/1.1 request is; a stream the client resets ends its watch.
"""
from __future__ import annotations

import base64
import bisect
import contextlib
import json
import os
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from weft.desired.api import CALICO_API_GROUPS, CALICO_API_VERSION, NEEDED_KINDS, RESOURCES

BUILTIN_API_VERSIONS = ("v1", "networking.k8s.io/v1", "discovery.k8s.io/v1")

# (apiVersion, kind) -> (plural, namespaced): what the fake can serve without guessing.
KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    (r.api_version, r.kind): (r.plural, r.namespaced) for r in RESOURCES
} | {
    ("v1", "Service"): ("services", True),
    ("v1", "Endpoints"): ("endpoints", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("discovery.k8s.io/v1", "EndpointSlice"): ("endpointslices", True),
    **{(CALICO_API_VERSION, kind): (kind.lower() + ("s" if not kind.endswith("y") else ""), False)
       for kind in ("IPAMBlock", "IPAMHandle", "IPAMConfig", "FelixConfiguration", "ClusterInformation",
                    "KubeControllersConfiguration", "Tier")},
    (CALICO_API_VERSION, "BlockAffinity"): ("blockaffinities", False),
}

DEFAULT_TOKEN = "weft-test-token"
DEFAULT_WATCH_SECONDS = 60
_EXPIRED_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. You can start a "
    "new list without the continue parameter, or use the continue token in this response to retrieve "
    "the remainder of the results. Continuing with the provided token results in an inconsistent list "
    "- objects that were created, modified, or deleted between the time the first chunk was returned "
    "and now may show up in the list.")


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def status(code: int, reason: str, message: str, details: dict | None = None, **meta) -> dict:
    """A `Status` object, the body of every error answer."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": meta, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


class _Fail(Exception):
    """Answer the request with this Status instead."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None, **meta):
        super().__init__(message)
        self.code, self.status = code, status(code, reason, message, details, **meta)


class _Entry(NamedTuple):
    obj: dict      # the stored object, with apiVersion and kind
    item: bytes    # as a list item (built-in kinds drop apiVersion/kind)
    full: bytes    # as a single GET or watch event returns it


@dataclass(eq=False)
class _Type:
    api_version: str
    kind: str
    plural: str
    namespaced: bool
    objects: dict[tuple[str, str], _Entry] = field(default_factory=dict)  # (namespace or "", name)
    _keys: list | None = None

    @property
    def builtin(self) -> bool:
        return self.api_version in BUILTIN_API_VERSIONS

    def keys(self) -> list[tuple[str, str]]:
        """Sorted keys, the order a real server lists in; cached until the key set changes."""
        if self._keys is None:
            self._keys = sorted(self.objects)
        return self._keys

    def entry(self, obj: dict) -> _Entry:
        full = _dumps(obj)  # obj starts with apiVersion, kind: slice them off for list items
        prefix = len(_dumps({"apiVersion": self.api_version, "kind": self.kind})) - 1
        return _Entry(obj, b"{" + full[prefix + 1:] if self.builtin else full, full)


class _Event(NamedTuple):
    rv: int
    type: _Type
    key: tuple[str, str]
    kind: str                 # ADDED | MODIFIED | DELETED
    new: _Entry               # for DELETED: the object as it was deleted
    old: _Entry | None


@dataclass(frozen=True)
class TLSFiles:
    """A test CA, a certificate for 127.0.0.1 it signed, and a client certificate it signed."""
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path, ca_name: str = "weft-test-ca") -> TLSFiles:
        """Made with the openssl command (EC P-256, valid for a day)."""
        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

        def key_and_csr(name: str, subject: str) -> None:
            run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)

        directory.mkdir(parents=True, exist_ok=True)
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", f"/CN={ca_name}")
        for name, subject, ext in (("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\n"),
                                   ("client", "/CN=weft-test-user", "extendedKeyUsage=clientAuth\n")):
            key_and_csr(name, subject)
            (directory / f"{name}.ext").write_text(ext)
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")
        return cls(*(directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))


class FakeKubeAPI:
    """An in-memory Kubernetes API server on 127.0.0.1 (see the module docstring).

    `max_page` caps every list page whatever `limit` the client asks (to force pagination);
    `token` is the bearer token requests must carry (None: no auth); `history` is how many
    events are retained for watches and continued lists. `tls`: serve https with these files,
    requiring a client certificate signed by their CA.
    """

    def __init__(self, objects: Iterable[dict] = (), *, max_page: int | None = None,
                 crds: bool | Iterable[str] | None = None, token: str | None = DEFAULT_TOKEN,
                 history: int = 10_000, tls: TLSFiles | None = None, http2: bool = True,
                 http2_streams: int = 250):
        self.max_page, self.token, self.history, self.tls, self.http2 = max_page, token, history, tls, http2
        self.http2_streams = http2_streams      # streams a client may open at once (kube-apiserver: 250)
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0    # everything written to clients (see the module docstring)
        self.connections = 0   # connections accepted
        self._bytes_lock = threading.Lock()
        self._held: int | None = None   # watch_lag(): events after this resourceVersion wait
        self.on_request: Callable[[str, str], None] | None = None  # called before serving each request
        self.url = ""
        self._cond = threading.Condition()
        self._rv = 0
        self._floor = 0        # history holds every event after this resourceVersion
        self._epoch = 0        # bumped by expire_continue_tokens()
        self._events: list[_Event] = []
        self._types: dict[tuple[str, str], _Type] = {}   # (apiVersion, plural) -> type
        self._faults: list[list] = []
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        for (api_version, kind), (plural, namespaced) in KINDS.items():
            wanted = crds is True or (crds not in (None, False) and kind in crds)
            if api_version in BUILTIN_API_VERSIONS or wanted:
                self._serve(api_version, kind, plural, namespaced)
        for obj in objects:
            self.put(obj)
        if crds is None:            # weft's CRDs applied: every kind weft needs is served
            for kind in NEEDED_KINDS:
                if not any(t.kind == kind and t.api_version in CALICO_API_GROUPS for t in self._types.values()):
                    plural, namespaced = KINDS[(CALICO_API_VERSION, kind)]
                    self._serve(CALICO_API_VERSION, kind, plural, namespaced)

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FakeKubeAPI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.request_queue_size = 64
        scheme = "http"
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
            context.load_verify_locations(self.tls.ca)
            context.verify_mode = ssl.CERT_REQUIRED
            context.set_alpn_protocols(["h2", "http/1.1"] if self.http2 else ["http/1.1"])
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                      do_handshake_on_connect=False)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-kube-api", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()   # ends open watches
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def write_kubeconfig(self, path, *, token: str | None = None) -> str:
        """A kubeconfig for this server (a token user; with tls, the CA and the client certificate
        inline, as kubeadm writes them); `token` overrides the right one."""
        cluster: dict = {"server": self.url}
        user: dict = {"token": token or self.token or "none"}
        if self.tls:
            def inline(p: Path) -> str:
                return base64.b64encode(p.read_bytes()).decode()
            cluster["certificate-authority-data"] = inline(self.tls.ca)
            user |= {"client-certificate-data": inline(self.tls.client_cert),
                     "client-key-data": inline(self.tls.client_key)}
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        with open(path, "w") as f:
            json.dump(config, f)   # JSON is YAML
        return str(path)

    # --- the test's side door --------------------------------------------------------------

    def put(self, obj: dict) -> dict:
        """Create or replace `obj` (a manifest), installing its CRD if needed; returns it as stored."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        with self._cond:
            t = self._type_of(api_version, kind)
            if t is None:
                plural, namespaced = KINDS.get((api_version, kind)) or (
                    _guess_plural(kind), bool(obj["metadata"].get("namespace")))
                t = self._serve(api_version, kind, plural, namespaced)
            ns = obj["metadata"].get("namespace", "default") if t.namespaced else ""
            return self._write(t, (ns, obj["metadata"]["name"]), obj).obj

    def delete(self, kind: str, namespace: str | None, name: str, *, api_version: str | None = None) -> None:
        """Delete one object; `api_version` is needed only for a kind name used twice (NetworkPolicy)."""
        with self._cond:
            matches = [t for t in self._types.values()
                       if t.kind == kind and (api_version is None or t.api_version == api_version)]
            if len(matches) != 1:
                raise KeyError(f"kind {kind} ({api_version or 'any apiVersion'}) matches {len(matches)} types")
            self._remove(matches[0], (namespace or "", name))

    def expire_continue_tokens(self) -> None:
        """Every continue token issued so far answers 410 Expired from now on."""
        with self._cond:
            self._epoch += 1

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: older watches and continue tokens get 410."""
        with self._cond:
            self._events.clear()
            self._floor = self._rv

    @contextlib.contextmanager
    def watch_lag(self) -> Iterator[None]:
        """Writes made inside the block are committed at once (lists and the resourceVersion
        show them) but reach watches only when the block ends: a write still on its way through
        a real server's watch cache."""
        with self._cond:
            self._held = self._rv
        try:
            yield
        finally:
            with self._cond:
                self._held = None
                self._cond.notify_all()

    def _count(self, size: int, *, connection: bool = False) -> None:
        with self._bytes_lock:
            self.bytes_sent += size
            self.connections += connection

    def fail(self, match: str, code: int, reason: str, message: str = "", times: int | None = None) -> None:
        """Answer requests whose "METHOD path?query" contains `match` with a Status error."""
        self._faults.append([match, code, reason, message or f"injected {reason}", times])

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    # --- the store -------------------------------------------------------------------------

    def _serve(self, api_version, kind, plural, namespaced) -> _Type:
        t = self._types[(api_version, plural)] = _Type(api_version, kind, plural, namespaced)
        return t

    def _type_of(self, api_version: str, kind: str) -> _Type | None:
        return next((t for t in self._types.values() if (t.api_version, t.kind) == (api_version, kind)), None)

    def _write(self, t: _Type, key, obj: dict, *, old: _Entry | None = None) -> _Entry:
        """Store a new version of `obj` under `key` (caller holds the lock) and record the event."""
        old = old or t.objects.get(key)
        self._rv += 1
        meta = dict(obj.get("metadata") or {})
        if t.namespaced:
            meta["namespace"] = key[0]
        else:
            meta.pop("namespace", None)
        if t.kind == "Namespace":  # the API server labels every namespace with its name
            meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": key[1]}
        before = old.obj["metadata"] if old else {}
        meta["uid"] = before.get("uid") or meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = (before.get("creationTimestamp") or meta.get("creationTimestamp")
                                     or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["resourceVersion"] = str(self._rv)
        stored = {"apiVersion": t.api_version, "kind": t.kind, "metadata": meta,
                  **{k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}}
        entry = t.entry(stored)
        if old is None:
            t._keys = None
        t.objects[key] = entry
        self._record(_Event(self._rv, t, key, "MODIFIED" if old else "ADDED", entry, old))
        return entry

    def _remove(self, t: _Type, key) -> _Entry:
        old = t.objects.get(key)
        if old is None:
            raise _Fail(404, "NotFound", f'{t.plural} "{key[1]}" not found', {"name": key[1], "kind": t.plural})
        if t.kind == "Namespace":
            for other in list(self._types.values()):
                for k in [k for k in other.objects if other.namespaced and k[0] == key[1]]:
                    self._remove(other, k)
        self._rv += 1
        gone = t.entry({**old.obj, "metadata": {**old.obj["metadata"], "resourceVersion": str(self._rv)}})
        del t.objects[key]
        t._keys = None
        self._record(_Event(self._rv, t, key, "DELETED", gone, old))
        return gone

    def _record(self, event: _Event) -> None:
        self._events.append(event)
        if len(self._events) > 2 * self.history:
            self._floor = self._events[-self.history - 1].rv
            del self._events[:-self.history]
        self._cond.notify_all()

    def _since(self, rv: int) -> list[_Event]:
        return self._events[bisect.bisect_right(self._events, rv, key=lambda e: e.rv):]

    def _deliverable(self, rv: int) -> list[_Event]:
        """The events after `rv` that watches may see now (see watch_lag)."""
        events = self._since(rv)
        if self._held is not None:
            events = [e for e in events if e.rv <= self._held]
        return events

    def _snapshot(self, t: _Type, rv: int) -> tuple[dict, list]:
        """The objects of `t` as they were at resourceVersion `rv` (caller holds the lock)."""
        if rv < self._floor:
            raise _Fail(410, "Expired", _EXPIRED_CONTINUE)
        undo = [e for e in self._since(rv) if e.type is t]
        if not undo:
            return t.objects, t.keys()
        state = dict(t.objects)
        for e in reversed(undo):
            if e.kind == "ADDED":
                del state[e.key]
            else:
                state[e.key] = e.old
        return state, sorted(state)

    # --- requests --------------------------------------------------------------------------

    def _list(self, t: _Type, ns: str | None, query: dict) -> bytes:
        limit = _int(query, "limit") or None
        if self.max_page:
            limit = min(limit or self.max_page, self.max_page)
        match = _field_selector(query.get("fieldSelector", ""))
        with self._cond:
            start = None
            if query.get("continue"):
                epoch, rv, start = _decode_token(query["continue"])
                if epoch != self._epoch:
                    raise _Fail(410, "Expired", _EXPIRED_CONTINUE,
                                **{"continue": _token(self._epoch, self._rv, start)})
            else:
                rv = self._rv
            objects, keys = self._snapshot(t, rv)
            lo, hi = (bisect.bisect_left(keys, (ns,)), bisect.bisect_left(keys, (ns + "\0",))) \
                if ns is not None else (0, len(keys))
            if start:
                lo = max(lo, bisect.bisect_right(keys, start))
            selected = keys[lo:hi] if match is None else [k for k in keys[lo:hi] if match(objects[k].obj)]
            page, rest = (selected[:limit], selected[limit:]) if limit else (selected, ())
            meta = {"resourceVersion": str(rv)}
            if rest:
                meta["continue"] = _token(self._epoch, rv, page[-1])
                if match is None:
                    meta["remainingItemCount"] = len(rest)
            items = b",".join(objects[k].item for k in page)
        return b'{"kind":"%sList","apiVersion":"%s","metadata":%s,"items":[%s]}' % (
            t.kind.encode(), t.api_version.encode(), _dumps(meta), items)

    def _watch(self, send: Callable[[bytes], None], t: _Type, ns: str | None, query: dict) -> None:
        """Stream newline-delimited watch events until timeoutSeconds, a closed client or shutdown."""
        deadline = time.monotonic() + (_int(query, "timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        selector = _field_selector(query.get("fieldSelector", ""))

        def visible(entry: _Entry | None) -> bool:
            return entry is not None and (ns is None or entry.obj["metadata"].get("namespace") == ns) \
                and (selector is None or selector(entry.obj))

        def event(kind: str, entry: _Entry) -> bytes:
            return b'{"type":"%s","object":%s}\n' % (kind.encode(), entry.full)

        with self._cond:
            since = query.get("resourceVersion", "")
            if since in ("", "0"):   # start with the current state, as synthetic ADDED events
                last, out = self._rv, [event("ADDED", t.objects[k]) for k in t.keys() if visible(t.objects[k])]
            else:
                last, out = int(since), []
        while True:
            with self._cond:
                expired = last < self._floor   # the events after `last` are no longer known
                while not (out or expired or self._deliverable(last) or self._closing) \
                        and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                for e in [] if expired else self._deliverable(last):
                    if e.type is not t:
                        continue
                    was, now = visible(e.old), visible(e.new) and e.kind != "DELETED"
                    if now:
                        out.append(event("MODIFIED" if was else "ADDED", e.new))
                    elif was:
                        out.append(event("DELETED", e.new))
                if expired:
                    out.append(b'{"type":"ERROR","object":%s}\n' % _dumps(status(
                        410, "Expired", f"too old resource version: {last} ({self._floor})")))
                last = max(last, self._rv if self._held is None else self._held)
                done = expired or self._closing or time.monotonic() >= deadline
            if done and bookmarks and not expired:   # tells the client where to resume
                out.append(b'{"type":"BOOKMARK","object":%s}\n' % _dumps(
                    {"kind": t.kind, "apiVersion": t.api_version, "metadata": {"resourceVersion": str(last)}}))
            if out:
                send(b"".join(out))
                out = []
            if done:
                return

    def _create(self, t: _Type, ns: str | None, body: dict) -> _Entry:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = self._key_for(t, ns, None, body)
        with self._cond:
            if t.namespaced and ("v1", "namespaces") in self._types \
                    and ("", key[0]) not in self._types[("v1", "namespaces")].objects:
                raise _Fail(404, "NotFound", f'namespaces "{key[0]}" not found',
                            {"name": key[0], "kind": "namespaces"})
            if key in t.objects:
                raise _Fail(409, "AlreadyExists", f'{t.plural} "{key[1]}" already exists',
                            {"name": key[1], "kind": t.plural})
            return self._write(t, key, body)

    def _update(self, t: _Type, ns: str | None, name: str, body: dict, subresource: str | None) -> _Entry:
        key = self._key_for(t, ns, name, body)
        with self._cond:
            old = t.objects.get(key)
            if old is None:
                raise _Fail(404, "NotFound", f'{t.plural} "{name}" not found', {"name": name, "kind": t.plural})
            given = (body.get("metadata") or {}).get("resourceVersion")
            if not given and not t.builtin:
                raise _Fail(422, "Invalid", f'{t.kind} "{name}" is invalid: metadata.resourceVersion: '
                                            "Invalid value: 0x0: must be specified for an update",
                            {"name": name, "kind": t.kind})
            if given and given != old.obj["metadata"]["resourceVersion"]:
                raise _Fail(409, "Conflict", f'Operation cannot be fulfilled on {t.plural} "{name}": the object '
                                             "has been modified; please apply your changes to the latest "
                                             "version and try again", {"name": name, "kind": t.plural})
            if subresource == "status":   # only status changes through /status
                body = {**old.obj, "status": body.get("status")}
            return self._write(t, key, body, old=old)

    def _key_for(self, t: _Type, ns: str | None, name: str | None, body: dict) -> tuple[str, str]:
        """Check a request body against its URL, as the API server does, and give its store key."""
        if body.get("kind", t.kind) != t.kind or body.get("apiVersion", t.api_version) != t.api_version:
            raise _Fail(400, "BadRequest", f"the object provided is unrecognized (must be of type {t.kind})")
        meta = body.get("metadata") or {}
        if t.namespaced and not ns:
            raise _Fail(405, "MethodNotAllowed", f"{t.plural} are namespaced: use /namespaces/NAME/{t.plural}")
        if not meta.get("name"):
            raise _Fail(422, "Invalid", f"{t.kind}: metadata.name: Required value: name or generateName is required")
        if name is not None and meta["name"] != name:
            raise _Fail(400, "BadRequest", f"the name of the object ({meta['name']}) does not match the name "
                                           f"on the URL ({name})")
        if t.namespaced and meta.get("namespace", ns) != ns:
            raise _Fail(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                           "sent on the request")
        return (ns or "", meta["name"])


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to its FakeKubeAPI."""
    api: FakeKubeAPI
    protocol_version = "HTTP/1.1"   # keep-alive, and chunked transfer for watches
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.wfile = _CountingWriter(self.wfile, self.api._count)
        self.api._count(0, connection=True)

    def handle(self) -> None:
        sock = self.connection
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError):
                self.close_connection = True
                return
            if sock.selected_alpn_protocol() == "h2":
                _serve_h2(self.api, sock)
                return
        super().handle()

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_PATCH(self):
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        api = self.api
        api.requests.append((method, self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if api.on_request:
                api.on_request(method, self.path)
            for fault in api._faults:
                if fault[0] in f"{method} {self.path}" and fault[4] != 0:
                    fault[4] = fault[4] - 1 if fault[4] is not None else None
                    raise _Fail(fault[1], fault[2], fault[3])
            if api.token is not None and self.headers.get("Authorization") != f"Bearer {api.token}":
                raise _Fail(401, "Unauthorized", "Unauthorized")
            url = urlsplit(self.path)
            query = dict(parse_qsl(url.query))
            discovery = self._discovery(url.path) if method == "GET" else None
            if discovery is not None:
                return self._send(200, discovery)
            t, ns, name, sub = self._route(url.path)
            if "labelSelector" in query:
                raise _Fail(400, "BadRequest", "labelSelector is not implemented by FakeKubeAPI")
            try:
                obj = json.loads(body) if body else {}
            except ValueError as e:
                raise _Fail(400, "BadRequest", f"the request body is not JSON: {e}") from None
            if method == "GET" and name is None:
                if query.get("watch") in ("true", "1"):
                    return self._stream(t, ns, query)
                return self._send(200, api._list(t, ns, query))
            if method == "POST" and name is None:
                return self._send(201, api._create(t, ns, obj).full)
            if name is None or (sub and (method, sub) != ("PUT", "status")):
                raise _Fail(405, "MethodNotAllowed", f"{method} is not supported on this path by FakeKubeAPI")
            if method == "GET":
                with api._cond:
                    entry = t.objects.get((ns or "", name))
                if entry is None:
                    raise _Fail(404, "NotFound", f'{t.plural} "{name}" not found', {"name": name, "kind": t.plural})
                return self._send(200, entry.full)
            if method == "PUT":
                return self._send(200, api._update(t, ns, name, obj, sub).full)
            if method == "DELETE":
                with api._cond:
                    gone = api._remove(t, (ns or "", name))
                return self._send(200, gone.full)
            raise _Fail(405, "MethodNotAllowed", f"{method} is not supported by FakeKubeAPI")
        except _Fail as e:
            self._send(e.code, _dumps(e.status))
        except Exception as e:   # a bug in the fake: answer as the real server would, and show it
            import traceback
            traceback.print_exc()
            self._send(500, _dumps(status(500, "InternalError", f"FakeKubeAPI: {e!r}")))

    def _discovery(self, path: str) -> bytes | None:
        """API discovery of one group version (GET /apis/GROUP/VERSION): an APIResourceList of
        what the fake serves there; 404 where it serves nothing, as a group not installed."""
        parts = [p for p in path.split("/") if p]
        if len(parts) != 3 or parts[0] != "apis":
            return None
        api_version = f"{parts[1]}/{parts[2]}"
        served = [t for (v, _plural), t in sorted(self.api._types.items()) if v == api_version]
        if not served:
            raise _Fail(404, "NotFound", "the server could not find the requested resource")
        return _dumps({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version,
                       "resources": [{"name": t.plural, "singularName": "", "namespaced": t.namespaced,
                                      "kind": t.kind, "verbs": ["get", "list", "watch", "create", "update",
                                                                "delete"]} for t in served]})

    def _route(self, path: str) -> tuple[_Type, str | None, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            api_version, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            api_version, rest = "", []
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        t = self.api._types.get((api_version, rest[0])) if 1 <= len(rest) <= 3 else None
        if t is None or (ns is not None and not t.namespaced):
            raise _Fail(404, "NotFound", "the server could not find the requested resource")
        return t, ns, (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, t: _Type, ns: str | None, query: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            self.api._watch(send, t, ns, query)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:             # the client left (a watch ended at its quiet gap; over TLS: SSLEOFError)
            self.close_connection = True


def _serve_h2(api: FakeKubeAPI, sock: ssl.SSLSocket) -> None:
    """One HTTP/2 connection: each request (a stream) is served on a thread of its own."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    from weft.desired.h2link import Link
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: api.http2_streams})
    requests: dict[int, _H2Request] = {}

    def on_event(event) -> None:
        sid = getattr(event, "stream_id", None)
        if isinstance(event, h2.events.RequestReceived):
            requests[sid] = _H2Request(api, link, cond, sid, dict(event.headers))
        elif isinstance(event, h2.events.DataReceived) and sid in requests:
            requests[sid].rfile.write(event.data)
            conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, h2.events.StreamReset) and sid in requests:
            requests.pop(sid).reset = True
        elif isinstance(event, h2.events.StreamEnded) and sid in requests:     # the request is whole
            request = requests[sid]
            request.rfile.seek(0)
            threading.Thread(target=request.run, name="fake-kube-api-h2", daemon=True).start()
        cond.notify_all()           # a window grew, a stream was reset: writers look again

    link = Link(sock, conn, on_event, count=api._count)
    cond = threading.Condition(link.lock)
    link.write()
    link.run()
    with cond:
        for request in requests.values():
            request.reset = True
        cond.notify_all()


class _H2Headers(dict):
    def get(self, key, default=None):
        return super().get(key.lower(), default)


class _H2Request(_Handler):
    """One HTTP/2 stream served by _Handler's routing (not through BaseHTTPRequestHandler)."""

    def __init__(self, api: FakeKubeAPI, link, cond: threading.Condition, stream_id: int, headers: dict):
        import io
        self.api, self.link, self.cond, self.stream_id = api, link, cond, stream_id
        self.path, self.command = headers.get(":path", "/"), headers.get(":method", "GET")
        self.headers = _H2Headers({k.lower(): v for k, v in headers.items() if not k.startswith(":")})
        self.rfile = io.BytesIO()
        self.reset = False
        self._head: list[tuple[str, str]] = []

    def run(self) -> None:
        try:
            {"GET": self.do_GET, "POST": self.do_POST, "PUT": self.do_PUT, "DELETE": self.do_DELETE,
             "PATCH": self.do_PATCH}.get(self.command, lambda: self._send(405, b"{}"))()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self._head = [(":status", str(code))]

    def send_header(self, keyword: str, value) -> None:
        if keyword.lower() not in ("transfer-encoding", "connection"):
            self._head.append((keyword.lower(), str(value)))

    def end_headers(self) -> None:
        import h2.exceptions
        try:
            self.link.write(lambda conn: conn.send_headers(self.stream_id, self._head))
        except (OSError, h2.exceptions.H2Error):
            raise BrokenPipeError("the stream or its connection is closed") from None

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._data(body, end=True)

    def _stream(self, t: _Type, ns: str | None, query: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.api._watch(self._data, t, ns, query)
            self._data(b"", end=True)
        except OSError:
            pass                    # the client reset the stream (its watch went quiet) or left

    def _data(self, data: bytes, end: bool = False) -> None:
        """`data` on the stream as its flow-control window allows; BrokenPipeError once reset."""
        import h2.exceptions
        with self.cond:
            while True:
                if self.reset or self.link.closed:
                    raise BrokenPipeError("the client reset the stream")
                conn = self.link.conn
                try:
                    room = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
                    if data and room <= 0:
                        self.cond.wait(0.5)
                        continue
                    piece, data = data[:room], data[room:]
                    last = end and not data
                    self.link.write(lambda c, piece=piece, last=last: c.send_data(self.stream_id, piece,
                                                                                  end_stream=last))
                except (OSError, h2.exceptions.H2Error):
                    raise BrokenPipeError("the stream is closed") from None
                if not data:
                    return


class _CountingWriter:
    """A handler's output stream that counts what it writes (FakeKubeAPI.bytes_sent)."""

    def __init__(self, stream, count: Callable[[int], None]):
        self._stream, self._count = stream, count

    def write(self, data) -> int:
        written = self._stream.write(data)
        self._count(len(data))
        return written

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _int(query: dict, name: str) -> int:
    try:
        return int(query.get(name) or 0)
    except ValueError:
        raise _Fail(400, "BadRequest", f"{name}: not an integer: {query[name]!r}") from None


def _token(epoch: int, rv: int, start: tuple[str, str]) -> str:
    raw = {"v": "meta.k8s.io/v1", "rv": rv, "start": list(start), "epoch": epoch}
    return base64.urlsafe_b64encode(_dumps(raw)).decode()


def _decode_token(token: str) -> tuple[int, int, tuple[str, str]]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token))
        return int(raw["epoch"]), int(raw["rv"]), tuple(raw["start"])
    except (ValueError, KeyError, TypeError):
        raise _Fail(400, "BadRequest", f"continue key is not valid: {token!r}") from None


def _field_selector(text: str) -> Callable[[dict], bool] | None:
    """`a.b=x,c!=y` as a predicate over objects; None for an empty selector."""
    terms = []
    for term in filter(None, text.split(",")):
        path, op, value = term.partition("!=") if "!=" in term else term.replace("==", "=").partition("=")
        if not op:
            raise _Fail(400, "BadRequest", f"invalid field selector term {term!r}")
        terms.append((path.split("."), op == "!=", value))

    def get(obj, path):
        for part in path:
            obj = obj.get(part) if isinstance(obj, dict) else None
        return "" if obj is None else str(obj)

    return (lambda obj: all((get(obj, p) == v) != neg for p, neg, v in terms)) if terms else None


def _guess_plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + ("es" if lower.endswith("s") else "s")


# --- the `kube_source` fixture's backend: one test API, fake or real -------------------------

class KubeSource:
    """A cluster for one test: a kubeconfig, a fresh namespace, and create() for objects.

    Objects go through the API over HTTP in both modes, so a test sees the same wire either way.
    `fake` is the FakeKubeAPI, or None against a real cluster (see require_fake()).
    """

    def __init__(self, kubeconfig: str, fake: FakeKubeAPI | None):
        from weft.desired.api import connect
        self.kubeconfig, self.fake = kubeconfig, fake
        self.api = connect(kubeconfig)
        self.namespace = f"weft-test-{uuid.uuid4().hex[:8]}"
        self._cluster_scoped: list[str] = []
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}})

    @property
    def real(self) -> bool:
        return self.fake is None

    def require_fake(self) -> FakeKubeAPI:
        import pytest
        if self.fake is None:
            pytest.skip("needs FakeKubeAPI (fault injection or request counting)")
        return self.fake

    def path(self, obj: dict, name: str | None = None) -> str:
        """The collection path of `obj` (or of the object `name` in it)."""
        plural, namespaced = KINDS.get((obj["apiVersion"], obj["kind"])) or (_guess_plural(obj["kind"]), True)
        base = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        if namespaced:
            base += f"/namespaces/{obj['metadata'].get('namespace', self.namespace)}"
        return f"{base}/{plural}" + (f"/{name}" if name else "")

    def create(self, obj: dict) -> dict:
        """POST `obj` (namespaced kinds default to this test's namespace); returns it as stored.

        A given `status` is written through the status subresource afterwards, since a real
        server drops status on create. A CRD the cluster lacks skips the test.
        """
        import pytest

        from weft.desired.api import ApiError

        if KINDS.get((obj["apiVersion"], obj["kind"]), ("", True))[1]:
            obj = {**obj, "metadata": {"namespace": self.namespace, **obj["metadata"]}}
        try:
            stored = self.api.request("POST", self.path(obj), body=obj)
        except ApiError as e:
            if e.status == 404 and obj["apiVersion"] not in BUILTIN_API_VERSIONS:
                pytest.skip(f"{obj['kind']} ({obj['apiVersion']}) is not installed on this cluster")
            raise
        name = stored["metadata"]["name"]
        if "namespace" not in stored["metadata"]:
            self._cluster_scoped.append(self.path(obj, name))
        if obj.get("status") and stored.get("status") != obj["status"]:
            stored = self.api.request("PUT", self.path(obj, name) + "/status",
                             body={**stored, "status": obj["status"]})
        return stored

    def official_client(self):
        """The official client's typed API client, for tests of the wire contract itself."""
        from kubernetes import client

        from weft.desired.api import configuration
        return client.ApiClient(configuration=configuration(self.kubeconfig))

    def close(self) -> None:
        if self.real:   # a fake dies with its objects
            for path in reversed(self._cluster_scoped):
                with contextlib.suppress(Exception):
                    self.api.request("DELETE", path)
        self.api.close()


@contextlib.contextmanager
def kube_source(tmp_path, **fake: Any) -> Iterator[KubeSource]:
    """FakeKubeAPI (made with `fake`'s arguments) normally; the real cluster that $KUBECONFIG
    names when it is set."""
    if os.environ.get("KUBECONFIG"):
        source = KubeSource(os.environ["KUBECONFIG"], None)
        try:
            yield source
        finally:
            source.close()
        return
    with FakeKubeAPI(**{"crds": True, **fake}) as api:
        source = KubeSource(api.write_kubeconfig(tmp_path / "kubeconfig"), api)
        try:
            yield source
        finally:
            source.close()
