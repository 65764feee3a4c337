"""Read the desired state from the Kubernetes API server as plain manifest-shaped dicts.

The official client finds the configuration and resolves credentials (kubeconfig, exec
plugins, the service account); requests then go over urllib3, as the client sends them, but
skipping its typed models (deserialising 10k pods into V1Pod costs ~2 s against ~0.3 s for
json.loads): every list is fetched raw and parsed with json. Lists are paginated (`limit` + `continue`) so one huge
response never has to be built by the API server, and a list whose continue token expires
mid-way is restarted, since a half-old, half-new list would mix two snapshots.

`kubernetes` is imported only to resolve a configuration: it costs ~0.25 s of CPU, and a
reconcile run that finds nothing to do, or the CNI plugin, should not pay it (see connect).

Every wait is bounded, and nothing is retried behind the caller's back (urllib3 retries three
times by default: a stopped API server cost 4 x 30 s):
  CONNECT_TIMEOUT  5 s   to establish a connection (TCP and TLS);
  READ_TIMEOUT    10 s   the longest the server may stay silent while answering (a server that
                         accepts connections and never answers fails a request in 10 s);
  ANSWER_TIMEOUT  30 s   for a whole answer to arrive (a trickle is a dead server too);
  a watch reads until the server has been quiet for its `quiet` gap (0.1 s), READ_TIMEOUT at most.
Over TLS, a run's watches and small GETs are streams of one HTTP/2 connection where the server
offers h2 (desired.h2link, with the same bounds and checks); everything else is HTTP/1.1.
Answers are hostile until checked: at most desired.bounds.MAX_RESPONSE_BYTES, JSON nested at
most MAX_DEPTH deep, no content encoding weft did not ask for, and lists and watch events of the
shape the callers rely on (objects with a metadata mapping naming them); anything else is a
SourceError naming the request.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weft.desired.bounds import MAX_DEPTH, MAX_RESPONSE_BYTES, BoundExceeded, check_depth
from weft.model.errors import SourceError

CALICO_API_VERSION = "crd.projectcalico.org/v1"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Resource:
    """One listable resource type of the API server."""
    api_version: str   # "v1" or "group/version"
    kind: str
    plural: str
    namespaced: bool
    crd: bool = False  # may legitimately be absent from a cluster (404 on list)

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name is not None else base


CALICO_API_GROUPS = (CALICO_API_VERSION, "projectcalico.org/v3")
# Calico's kinds weft reads: (kind, plural, namespaced).
CALICO_KINDS = (
    ("GlobalNetworkPolicy", "globalnetworkpolicies", False),
    ("NetworkPolicy", "networkpolicies", True),
    ("Tier", "tiers", False),
    ("GlobalNetworkSet", "globalnetworksets", False),
    ("NetworkSet", "networksets", True),
    ("HostEndpoint", "hostendpoints", False),
    ("FelixConfiguration", "felixconfigurations", False),
    ("IPPool", "ippools", False),
    ("IPAMBlock", "ipamblocks", False),
    ("BlockAffinity", "blockaffinities", False),
    ("BGPConfiguration", "bgpconfigurations", False),
    ("BGPPeer", "bgppeers", False),
)


def _calico(kind: str, plural: str, namespaced: bool, api_version: str = CALICO_API_VERSION) -> Resource:
    return Resource(api_version, kind, plural, namespaced, crd=True)


# Everything weft reads. Two kinds are called NetworkPolicy: tell them apart by apiVersion.
# Calico's kinds are read from both of Calico's API groups: crd.projectcalico.org/v1 (its CRDs,
# where Calico stores them) and projectcalico.org/v3 (Calico's API server, or Calico's newer
# CRDs). A group that does not serve a kind answers 404: nothing of that kind there. Where both
# serve one object, desired.loader keeps one (the v3 form).
RESOURCES: tuple[Resource, ...] = (
    Resource("v1", "Namespace", "namespaces", False),
    Resource("v1", "Node", "nodes", False),
    Resource("v1", "Pod", "pods", True),
    Resource("v1", "ServiceAccount", "serviceaccounts", True),
    Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", True),
    Resource("v1", "Service", "services", True),
    Resource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", True),
    *(_calico(kind, plural, namespaced, group)
      for group in CALICO_API_GROUPS for kind, plural, namespaced in CALICO_KINDS),
)

# Calico's API server authorizes a list of tiered policies (projectcalico.org networkpolicies,
# globalnetworkpolicies) through pseudo-resources too: "get" of the tier, and the list or watch
# on tier.<plural> (Calico's "RBAC for tiered policies"). What the node's role must also grant.
TIERED_POLICY_GRANTS = (
    ("projectcalico.org", "tiers", "get"),
    *(("projectcalico.org", f"tier.{plural}", verb)
      for plural in ("networkpolicies", "globalnetworkpolicies") for verb in ("list", "watch")),
)

EXPIRED_RELIST_ATTEMPTS = 3
LIST_WORKERS = 4


def load_objects(kubeconfig: str | None = None, context: str | None = None, page_size: int = 500,
                 *, concurrent: bool = True, timeout: float = READ_TIMEOUT) -> list[dict]:
    """Every object of RESOURCES in the cluster, shaped like a YAML manifest.

    Calico CRDs that are not installed are skipped; any other failure raises SourceError.
    `timeout` bounds each request's silences (see the module docstring), so a dead API server
    fails the run instead of hanging it. Objects come in RESOURCES order, each kind in the
    server's order.
    """
    with connect(kubeconfig, context) as api:
        def one(resource: Resource) -> list[dict]:
            return list_kind(api, resource, page_size, timeout=timeout)[0]

        if concurrent:
            with ThreadPoolExecutor(LIST_WORKERS, thread_name_prefix="weft-list") as pool:
                per_kind = list(pool.map(one, RESOURCES))
        else:
            per_kind = [one(r) for r in RESOURCES]
    return [obj for objs in per_kind for obj in objs]


class NotServed(Exception):
    """A CRD kind answered 404 where discovery said it is served (a list or watch with
    `absent_ok=False`): the discovery is stale (a CRD removed, or moved to Calico's other group)."""

    def __init__(self, resource: Resource):
        super().__init__(f"{resource.kind} ({resource.path()}) is not served")
        self.resource = resource


def list_kind(api: Connection, resource: Resource, page_size: int = 500, *,
              timeout: float = READ_TIMEOUT, absent_ok: bool = True) -> tuple[list[dict], str]:
    """All objects of one resource (all namespaces) and the list's resourceVersion.

    The resourceVersion is where a watch can start without missing a change. A CRD that is not
    installed yields ([], ""), or raises NotServed when not `absent_ok`.
    """
    path = resource.path()
    for _ in range(EXPIRED_RELIST_ATTEMPTS):
        items: list[dict] = []
        token = None
        try:
            while True:
                query = [("limit", page_size)] + ([("continue", token)] if token else [])
                page = api.request("GET", path, query=query, timeout=timeout)
                head = {"apiVersion": resource.api_version, "kind": resource.kind}
                listed = page.get("items") or []
                meta = page.get("metadata") or {}
                problem = _list_problem(listed, meta)
                if problem:
                    raise SourceError(f"listing {resource.kind} ({path}) from {api.host}: the answer's {problem}")
                items.extend(head | item for item in listed)
                token = meta.get("continue")
                if not token:
                    return items, meta.get("resourceVersion", "")
        except ApiError as e:
            if e.status == 404 and resource.crd:
                if not absent_ok:
                    raise NotServed(resource) from None
                return [], ""
            if e.status == 410 and token:
                continue  # the snapshot behind the continue token is gone: list again
            raise _source_error(api, f"listing {resource.kind} ({path})", e,
                                need=("list", resource.plural, resource.api_version)) from None
    raise SourceError(
        f"listing {resource.kind} ({path}) from {api.host}: the continue token "
        f"expired {EXPIRED_RELIST_ATTEMPTS} times in a row (HTTP 410 Expired); the list changes faster "
        f"than it can be paged: retry, or raise the page size")


def object_problem(obj: Any, where: str) -> str | None:
    """Why `obj` (an item of a list, the object of a watch event) is not an object weft can key:
    a mapping whose metadata is a mapping naming it with strings. The converters check the rest."""
    if not isinstance(obj, dict):
        return f"{where} must be a mapping"
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return f"{where}.metadata must be a mapping"
    for field in ("name", "namespace", "resourceVersion"):
        if meta.get(field) is not None and not isinstance(meta[field], str):
            return f"{where}.metadata.{field} must be a string"
    return None


def _list_problem(items: Any, meta: Any) -> str | None:
    if not isinstance(items, list):
        return "items must be a list"
    if not isinstance(meta, dict):
        return "metadata must be a mapping"
    for field in ("continue", "resourceVersion"):
        if meta.get(field) is not None and not isinstance(meta[field], str):
            return f"metadata.{field} must be a string"
    return next((p for i, item in enumerate(items) if (p := object_problem(item, f"items[{i}]"))), None)


class ApiError(Exception):
    """A non-2xx answer of the API server; `body` is what it sent (a Status, usually)."""

    def __init__(self, status: int, reason: str, body: bytes = b""):
        super().__init__(status, reason, body)
        self.status, self.reason, self.body = status, reason, body

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.reason}"


@dataclass(frozen=True)
class Profile:
    """The API server and how to reach it, as the official client resolved it from a kubeconfig
    or the service account: what every request of weft's needs, and nothing of the client."""
    host: str
    authorization: str | None = None        # the Authorization header, e.g. "Bearer ..."
    verify: bool = True
    ca_pem: str | None = None               # None: the system's trust store
    cert_pem: str | None = None             # client certificate and key (TLS client auth)
    key_pem: str | None = None
    assert_hostname: str | bool | None = None
    server_hostname: str | None = None      # SNI / the name the certificate must carry
    proxy: str | None = None
    proxy_headers: dict | None = None


class Connection:
    """Requests to the API server over urllib3, as the official client sends them, without its
    import (~0.25 s of CPU: most of a run that finds nothing to do) nor its typed models.

    `renew`: resolves the profile anew through the official client. A connection made from a
    kept profile (see connect) calls it once when the server refuses the credentials or the
    TLS handshake fails, since tokens expire and certificates rotate, then retries."""

    def __init__(self, profile: Profile, renew: Callable[[], Profile] | None = None):
        self._renew, self._lock = renew, threading.Lock()
        self._files: list[int] = []             # kept open until close(): pools made earlier use them
        self._cert_files: tuple[str, str] | None = None
        self._h2: Any = _UNTRIED                # the watches' HTTP/2 session (desired.h2link), made at the first
        self._use(profile)

    def _use(self, profile: Profile) -> None:
        import ssl

        import urllib3
        self.profile, self.host = profile, profile.host
        self._pool: urllib3.PoolManager
        # As many kept connections as requests run at once (a watch per kind), so none that could
        # serve another request is closed (with TLS, each new one is a handshake).
        args: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED if profile.verify else ssl.CERT_NONE,
                                "maxsize": len(RESOURCES)}
        self._cert_files = None
        if profile.cert_pem and profile.key_pem:
            files = [_memory_file(profile.cert_pem), _memory_file(profile.key_pem)]
            self._files += files
            self._cert_files = (f"/proc/self/fd/{files[0]}", f"/proc/self/fd/{files[1]}")
        if profile.assert_hostname is not None:
            args["assert_hostname"] = profile.assert_hostname
        if profile.server_hostname:
            args["server_hostname"] = profile.server_hostname
        self._tls = args["ssl_context"] = _resuming_context(args["cert_reqs"])
        # The trust roots and the client certificate are loaded once, here: given to urllib3 (as
        # ca_cert_data, cert_file), it loads them into the shared context at every new connection,
        # racing the handshakes other threads make with it (lists run on several threads at once:
        # OpenSSL crashed the interpreter). Without a CA of its own, the system's trust store.
        if profile.ca_pem:
            self._tls.load_verify_locations(cadata=profile.ca_pem)
        else:
            self._tls.load_default_certs()
        if self._cert_files:
            self._tls.load_cert_chain(*self._cert_files)
        if profile.proxy:
            if profile.proxy.startswith("socks"):
                from urllib3.contrib.socks import SOCKSProxyManager
                self._pool = SOCKSProxyManager(profile.proxy, headers=profile.proxy_headers, **args)
            else:
                self._pool = urllib3.ProxyManager(profile.proxy, proxy_headers=profile.proxy_headers, **args)
        else:
            self._pool = urllib3.PoolManager(**args)
        self._headers = {"Accept": "application/json", "User-Agent": "weft"}
        if profile.authorization:
            self._headers["Authorization"] = profile.authorization

    def request(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
                body: dict | None = None, timeout: float = READ_TIMEOUT, http2: bool = False) -> dict:
        """One JSON request; its answer is a JSON object (a mapping). Raises ApiError for a
        non-2xx answer (callers decide what 404, 409 or 410 mean) and SourceError when the
        server cannot be reached, is silent for `timeout` seconds, takes longer than
        ANSWER_TIMEOUT to answer, or answers beyond the bounds (see the module docstring).
        `http2`: a small GET (the version probe, discovery) that goes as a stream of the HTTP/2
        session the run's watches share, where there is one (one connection for a quiet run);
        lists stay on HTTP/1.1's pool (pages of megabytes parse faster there than as frames)."""
        if http2 and method == "GET" and body is None and (session := self.watch_session()) is not None:
            answer = self._get_h2(session, path, query, timeout)
            if answer is not None:
                return answer
        response = self.open(method, path, query=query, body=body,
                             timeout=(min(CONNECT_TIMEOUT, timeout), timeout))
        self._tls.remember(response)
        try:
            data = self._read_answer(method, path, response)
        finally:
            response.release_conn()
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, response.reason or "", data[:_CHUNK])
        return self._decode(method, path, data)

    def _get_h2(self, session, path: str, query: list[tuple[str, Any]] | None, timeout: float) -> dict | None:
        """request() as a stream of `session`; None when it must go over HTTP/1.1 instead (the
        connection failed before an answer, or the credentials were refused: that path renews them)."""
        import queue
        from http import HTTPStatus
        from urllib.parse import urlencode

        from h2.exceptions import TooManyStreamsError
        try:
            stream = session.open(path + ("?" + urlencode(query) if query else ""))
        except TooManyStreamsError:
            return None
        except Exception:  # noqa: BLE001 - the session is unusable (closed, protocol error): HTTP/1.1
            self.drop_watch_session()
            return None
        try:
            if not stream.ready.wait(timeout):
                raise SourceError(f"GET {path}: no answer from the API server at {self.host} within {timeout:.0f} s")
            status = int(stream.headers.get(":status", "0") or 0)
            if (stream.failed is not None and not stream.headers) or status == 401:
                self.drop_watch_session()
                return None
            self._check_head("GET", path, stream.headers.get("content-encoding", "identity"),
                             stream.headers.get("content-length", ""))
            deadline = time.monotonic() + ANSWER_TIMEOUT
            chunks, size = [], 0
            while True:
                try:
                    chunk = stream.take(timeout)
                except queue.Empty:
                    raise SourceError(f"GET {path}: no answer from the API server at {self.host}: "
                                      f"silent for {timeout:.0f} s") from None
                if chunk is None:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise self._too_large("GET", path)
                if time.monotonic() > deadline:
                    raise SourceError(f"GET {path}: the API server at {self.host} took more than "
                                      f"{ANSWER_TIMEOUT:.0f} s to answer")
            if stream.failed is not None:
                raise SourceError(f"GET {path}: no answer from the API server at {self.host}: {stream.failed}")
        finally:
            session.cancel(stream)
        data = b"".join(chunks)
        if not 200 <= status <= 299:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
            raise ApiError(status, reason, data[:_CHUNK])
        return self._decode("GET", path, data)

    def _read_answer(self, method: str, path: str, response) -> bytes:
        """The whole body, within MAX_RESPONSE_BYTES and ANSWER_TIMEOUT."""
        self._check_head(method, path, response.headers.get("Content-Encoding", "identity"),
                         response.headers.get("Content-Length", ""))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        chunks, size = [], 0
        try:
            for chunk in response.stream(_CHUNK, decode_content=False):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise self._too_large(method, path)
                if time.monotonic() > deadline:
                    raise SourceError(f"{method} {path}: the API server at {self.host} took more than "
                                      f"{ANSWER_TIMEOUT:.0f} s to answer")
        except _http_errors() as e:
            raise self._unreachable(method, path, e) from None
        return b"".join(chunks)

    def _check_head(self, method: str, path: str, encoding: str, declared: str) -> None:
        """An answer's body is read only unencoded and within MAX_RESPONSE_BYTES as declared."""
        if encoding.lower() != "identity":
            raise SourceError(f"{method} {path}: the API server at {self.host} answered with Content-Encoding "
                              f"{encoding[:40]!r}, which weft does not ask for")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise self._too_large(method, path)

    def _too_large(self, method: str, path: str) -> SourceError:
        return SourceError(f"{method} {path}: the API server at {self.host} answered with more than "
                           f"{MAX_RESPONSE_BYTES >> 20} MiB, the most weft reads in one answer")

    def _decode(self, method: str, path: str, data: bytes) -> dict:
        """The JSON object of an answer, nested at most MAX_DEPTH deep."""
        try:
            value = json.loads(data)
            check_depth(value, "the answer")
        except (ValueError, RecursionError, MemoryError, BoundExceeded) as e:
            problem = f"nested deeper than {MAX_DEPTH} levels" if isinstance(e, RecursionError | BoundExceeded) \
                else "too large" if isinstance(e, MemoryError) else f"not JSON ({str(e)[:80]})"
            raise SourceError(f"{method} {path}: the answer of the API server at {self.host} is {problem}") from None
        if not isinstance(value, dict):
            raise SourceError(f"{method} {path}: the answer of the API server at {self.host} is not a JSON object")
        return value

    def open(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
             body: dict | None = None, timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT)):
        """The response, unread (any status), for streaming; the caller releases it. One attempt
        (urllib3's retries are off), bounded by `timeout` (connect, read)."""
        from urllib.parse import urlencode

        import urllib3
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            profile, url = self.profile, self.host + path + ("?" + urlencode(query) if query else "")
            headers = self._headers | ({"Content-Type": "application/json"} if data is not None else {})
            try:
                response = self._pool.request(method, url, body=data, headers=headers, preload_content=False,
                                              retries=False, redirect=False,
                                              timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
            except _http_errors() as e:
                # A failed handshake: an SSLError (wrapped in MaxRetryError were retries on).
                tls = isinstance(e, urllib3.exceptions.SSLError) or isinstance(
                    getattr(e, "reason", None), urllib3.exceptions.SSLError)
                if tls and attempt == 1 and self._renewed(profile):
                    continue
                raise self._unreachable(method, path, e) from None
            if response.status == 401 and attempt == 1 and self._renewed(profile):
                response.drain_conn()
                response.release_conn()
                continue
            return response
        raise AssertionError("unreachable")

    def _renewed(self, used: Profile) -> bool:
        """Resolve the profile anew (once per connection); True if there is a new one to try."""
        with self._lock:
            if self.profile is not used:
                return True                     # another thread renewed it meanwhile
            if self._renew is None:
                return False
            renew, self._renew = self._renew, None
            self._use(renew())
            return True

    def _unreachable(self, method: str, path: str, e: BaseException) -> SourceError:
        reason = getattr(e, "reason", None) or e
        return SourceError(f"{method} {path}: no answer from the API server at {self.host}: {str(reason)[:200]}")

    def watch_session(self) -> Any:
        """The HTTP/2 session all of this connection's watches share (desired.h2link), made at
        the first watch; None where HTTP/2 is not used (then each watch is an HTTP/1.1 request)."""
        with self._lock:
            if self._h2 is _UNTRIED:
                from weft.desired import h2link
                self._h2 = h2link.connect(self.profile, self._cert_files, self._headers,
                                          CONNECT_TIMEOUT)
            return self._h2

    def drop_watch_session(self) -> None:
        """Watch over HTTP/1.1 from now on (the session's credentials were refused: urllib3's
        path renews them)."""
        with self._lock:
            session, self._h2 = self._h2, None
        if session not in (None, _UNTRIED):
            session.close()

    def close(self) -> None:
        self.drop_watch_session()
        self._pool.clear()
        for fd in self._files:
            os.close(fd)
        self._files = []

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_UNTRIED = object()


def _resuming_context(cert_reqs: int):
    """urllib3's TLS context, as it makes it, that also resumes TLS sessions (see _Resuming)."""
    import ssl

    from urllib3.util.ssl_ import create_urllib3_context

    class _Resuming(ssl.SSLContext):
        """A run's requests go to one API server on up to a connection per kind (a watch holds
        its connection to the end); each new one resumes the TLS session of the first request
        (a session ticket), so it skips the certificate exchange and its checks, the bulk of a
        handshake's bytes and CPU. The first connection is verified in full as always; a server
        that declines resumption gets a full handshake."""
        session = None

        def wrap_socket(self, sock, *args, **kwargs):
            if self.session is not None:
                kwargs.setdefault("session", self.session)
            return super().wrap_socket(sock, *args, **kwargs)

        def remember(self, response) -> None:
            """Keep the session of `response`'s connection, once it holds a ticket."""
            if self.session is None:
                session = getattr(getattr(response.connection, "sock", None), "session", None)
                if session is not None and session.has_ticket:
                    self.session = session

    context = create_urllib3_context(cert_reqs=cert_reqs)
    context.__class__ = _Resuming               # same object layout: a Python subclass, no slots
    context.options &= ~ssl.OP_NO_TICKET        # urllib3 turns tickets off
    return context


def _http_errors() -> tuple[type[BaseException], ...]:
    import urllib3
    return (urllib3.exceptions.HTTPError, OSError)


def _memory_file(pem: str) -> int:
    """A file in memory holding `pem` (ssl loads client certificates from paths only)."""
    fd = os.memfd_create("weft-tls", os.MFD_CLOEXEC)
    os.write(fd, pem.encode())
    return fd


PROFILE_MAX_AGE = 600.0     # seconds a kept profile is used before it is resolved anew


def connect(kubeconfig: str | None = None, context: str | None = None, *,
            keep: Path | None = None) -> Connection:
    """A connection to the API server that the kubeconfig (found the way kubectl finds it, see
    configuration) or the pod's service account names.

    `keep`: a file (written mode 0600: it holds credentials) where the resolved profile is kept
    for later runs. It is used, without loading the official client at all, while the config
    files it came from are unchanged and for PROFILE_MAX_AGE at most; refused credentials or a
    failed TLS handshake resolve it anew.
    """
    if keep is None:
        return Connection(resolve(kubeconfig, context))
    key = _profile_key(kubeconfig, context)

    def renew() -> Profile:
        profile = resolve(kubeconfig, context)
        _keep_profile(keep, key, profile)
        return profile

    kept = _kept_profile(keep, key)
    return Connection(kept, renew) if kept else Connection(renew(), None)


def resolve(kubeconfig: str | None = None, context: str | None = None) -> Profile:
    """The profile the official client resolves (credentials refreshed, e.g. by an exec plugin)."""
    cfg = configuration(kubeconfig, context)
    proxy = cfg.proxy
    if proxy:
        from kubernetes.client.rest import should_bypass_proxies
        if should_bypass_proxies(cfg.host, cfg.no_proxy or ""):
            proxy = None
    auth = cfg.auth_settings().get("BearerToken")
    return Profile(
        host=cfg.host.rstrip("/"),
        authorization=auth["value"] if auth else None,
        verify=bool(cfg.verify_ssl),
        ca_pem=cfg.ca_cert_data or _read_text(cfg.ssl_ca_cert),
        cert_pem=_read_text(cfg.cert_file),
        key_pem=_read_text(cfg.key_file),
        assert_hostname=cfg.assert_hostname,
        server_hostname=cfg.tls_server_name or None,
        proxy=proxy or None,
        proxy_headers=dict(cfg.proxy_headers) if proxy and cfg.proxy_headers else None)


def _read_text(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as f:
        return f.read()


def _config_files(kubeconfig: str | None) -> tuple[str, list[str]]:
    """Where the configuration comes from (described for messages) and the files it is read
    from, in kubectl's order: the explicit path, $KUBECONFIG (a colon-separated list, merged),
    ~/.kube/config, else the pod's service account."""
    home_config = os.path.expanduser("~/.kube/config")
    env = os.environ.get("KUBECONFIG")
    if kubeconfig:
        return f"kubeconfig {kubeconfig}", kubeconfig.split(os.pathsep)
    if env:
        return f"KUBECONFIG={env}", env.split(os.pathsep)
    if os.path.exists(home_config):
        return f"kubeconfig {home_config}", [home_config]
    return "in-cluster service account", []


IN_CLUSTER_FILES = ("/var/run/secrets/kubernetes.io/serviceaccount/token",
                    "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")


def _profile_key(kubeconfig: str | None, context: str | None) -> list:
    """What a kept profile was resolved from: the files' identities and the environment."""
    _source, files = _config_files(kubeconfig)
    stats = []
    for path in files or IN_CLUSTER_FILES:
        try:
            st = os.stat(path)
            stats.append([path, st.st_ino, st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([path, None])
    env = [os.environ.get(v) for v in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")]
    return [kubeconfig, context, stats, env if not files else None]


_PROFILE_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,), "authorization": (str, type(None)), "verify": (bool,), "ca_pem": (str, type(None)),
    "cert_pem": (str, type(None)), "key_pem": (str, type(None)), "assert_hostname": (str, bool, type(None)),
    "server_hostname": (str, type(None)), "proxy": (str, type(None)), "proxy_headers": (dict, type(None))}
_PROFILE_LIMIT = 1 << 20


def _kept_profile(keep: Path, key: list) -> Profile | None:
    """The profile kept in the state dir for the same configuration, if fresh. It is read through
    store.statedir (no links followed, owner and mode checked: a file that fails that is an
    UnsafeState error); one that is stale, not JSON or not of a profile's shape is resolved anew."""
    from weft.store.statedir import CorruptState, StateDir
    if not keep.parent.is_dir():
        return None
    try:
        kept = StateDir(keep.parent, create=False).read_json(keep.name, limit=_PROFILE_LIMIT)
    except CorruptState:
        return None
    if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("at"), int | float):
        return None
    fields = kept.get("profile")
    if not 0 <= time.time() - kept["at"] < PROFILE_MAX_AGE or not isinstance(fields, dict) \
            or set(fields) != set(_PROFILE_TYPES) \
            or not all(isinstance(fields[k], types) for k, types in _PROFILE_TYPES.items()):
        return None
    return Profile(**fields)


def _keep_profile(keep: Path, key: list, profile: Profile) -> None:
    """Keep `profile` (mode 0600: it holds credentials), replaced atomically through
    store.statedir, which never writes through a link."""
    import dataclasses

    from weft.store.statedir import StateDir
    text = json.dumps({"key": key, "at": time.time(), "profile": dataclasses.asdict(profile)})
    with contextlib.suppress(OSError):          # a read-only (or no) state dir: no profile is kept
        if keep.parent.is_dir():
            StateDir(keep.parent, create=False).replace(keep.name, text, 0o600)


def configuration(kubeconfig: str | None = None, context: str | None = None):
    """The official client's Configuration, found the way kubectl finds it (see _config_files).
    Refreshed credentials are not written back: a reconcile run only reads."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    source, files = _config_files(kubeconfig)
    try:
        if files:
            if len(files) == 1 and not os.path.exists(files[0]):
                raise ConfigException(f"{files[0]}: no such file")
            config.load_kube_config(config_file=os.pathsep.join(files), context=context,
                                    client_configuration=cfg, persist_config=False)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except (ConfigException, OSError, ValueError) as e:
        if files:
            raise SourceError(f"cannot use {source}: {e}") from None
        raise SourceError(
            "no Kubernetes API configuration found: tried --kubeconfig (not given), $KUBECONFIG "
            f"(not set), {os.path.expanduser('~/.kube/config')} (not found) and the in-cluster "
            f"service account ({e})") from None
    return cfg


def _source_error(api: Connection, what: str, e: ApiError,
                  need: tuple[str, str, str] | None = None) -> SourceError:
    """A SourceError that says which request failed and what the server said; for a refusal
    (403), `need` = (verb, resource, apiVersion) names the permission the request needed."""
    message = ""
    try:
        status = json.loads(e.body)
        message = str(status.get("message", ""))[:300]
        reason = str(status.get("reason") or e.reason)[:80]
    except (TypeError, ValueError, AttributeError, RecursionError):
        reason = e.reason[:80]
    hint = " (check the kubeconfig's credentials)" if e.status == 401 else ""
    if e.status == 403 and need is not None:
        verb, plural, api_version = need
        group = api_version.rpartition("/")[0]
        hint = f" (the user needs `{verb}` on {plural}{'.' + group if group else ''})"
    text = f"{what} from {api.host}: HTTP {e.status} {reason}"
    return SourceError(text + (f": {message}" if message else "") + hint)


class WatchExpired(Exception):
    """The events after a resourceVersion are no longer kept (410): the kind must be listed anew."""


def current_resource_version(api: Connection, *, timeout: float = READ_TIMEOUT) -> str:
    """The cluster's resourceVersion now: the cheapest list there is (one namespace)."""
    try:
        page = api.request("GET", "/api/v1/namespaces", query=[("limit", 1)], timeout=timeout, http2=True)
    except ApiError as e:
        raise _source_error(api, "reading the resourceVersion (/api/v1/namespaces)", e,
                            need=("list", "namespaces", "v1")) from None
    meta = page.get("metadata") or {}
    version = meta.get("resourceVersion", "") if isinstance(meta, dict) else None
    if not isinstance(version, str):
        raise SourceError(f"reading the resourceVersion (/api/v1/namespaces) from {api.host}: "
                          "the answer's metadata.resourceVersion must be a string")
    return version


def watch_since(api: Connection, resource: Resource, resource_version: str, *, quiet: float = 0.1,
                timeout: float = READ_TIMEOUT, absent_ok: bool = True) -> tuple[list[tuple[str, dict]], str]:
    """The (type, object) events of `resource` after `resource_version`, and where they end.

    The server sends what it has at once; reading stops after `quiet` seconds without data
    (after its answer began: a server slow to answer has `timeout`), after `timeout` seconds in
    all, or after MAX_RESPONSE_BYTES. A change still in flight then is not lost: the returned
    resourceVersion is that of the last event received, so the next run's watch starts right
    after it. An event that is not JSON, or not of a watch event's shape, is a SourceError. A
    CRD that is not installed has no events, or raises NotServed when not `absent_ok`.

    The watch is a stream of the connection's HTTP/2 session where there is one (all of a run's
    watches share one connection: desired.h2link), else an HTTP/1.1 request of its own.
    """
    query = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
             ("timeoutSeconds", max(1, int(timeout)))]
    watch = _Watch(api, resource, resource_version, absent_ok)
    session = api.watch_session()
    if session is not None:
        answer = _watch_h2(session, watch, query, quiet, timeout)
        if answer is not None:
            return answer
    response = api.open("GET", resource.path(), query=query, timeout=(min(CONNECT_TIMEOUT, timeout), timeout))
    try:
        sock = _socket_of(response)
        if sock is not None:                          # else (no socket found) the deadline ends the watch
            sock.settimeout(quiet)                    # urllib3 sets it anew for the next request
        if not watch.answered(response.status, response.reason or "", lambda: _first_bytes(response),
                              response.headers.get("Content-Encoding", "identity")):
            return [], resource_version
        return watch.read(_h1_chunks(response, time.monotonic() + timeout))
    finally:
        response.close()            # the watch is still open: its connection cannot serve another request
        response.release_conn()


def _first_bytes(response) -> bytes:
    try:
        return response.read(_CHUNK, decode_content=False)
    except _http_errors():
        return b""


def _h1_chunks(response, deadline: float) -> Iterator[bytes]:
    """An HTTP/1.1 watch's data as it comes, until a quiet gap (the socket's timeout), the
    answer's end or the deadline."""
    try:
        for chunk in response.stream(_CHUNK, decode_content=False):   # each chunk as it comes
            yield chunk
            if time.monotonic() > deadline:
                return                                  # enough for this run: the rest is read next run
    except _http_errors():
        return                                          # quiet: caught up for this run


def _watch_h2(session, watch: _Watch, query: list, quiet: float, timeout: float) -> tuple[list, str] | None:
    """The watch as a stream of `session`; None when it must be made over HTTP/1.1 instead (the
    connection failed before an answer, or the credentials were refused: urllib3's path renews them)."""
    from http import HTTPStatus
    from urllib.parse import urlencode

    from h2.exceptions import TooManyStreamsError
    try:
        stream = session.open(watch.resource.path() + "?" + urlencode(query))
    except TooManyStreamsError:
        return None                     # the server's limit of streams at once: this one over HTTP/1.1
    except Exception:  # noqa: BLE001 - the session is unusable (closed, protocol error): HTTP/1.1
        watch.api.drop_watch_session()
        return None
    try:
        if not stream.ready.wait(timeout):
            raise SourceError(f"GET {watch.resource.path()}: no answer from the API server at {watch.api.host} "
                              f"within {timeout:.0f} s")
        if stream.failed is not None and not stream.headers:
            watch.api.drop_watch_session()
            return None
        status = int(stream.headers.get(":status", "0") or 0)
        if status == 401:
            watch.api.drop_watch_session()
            return None
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        if not watch.answered(status, reason, lambda: stream.body(_CHUNK, quiet),
                              stream.headers.get("content-encoding", "identity")):
            return [], watch.since
        return watch.read(stream.data(quiet, time.monotonic() + timeout))
    finally:
        session.cancel(stream)


class _Watch:
    """One kind's watch: its answer's status judged, its events read and checked (either protocol)."""

    def __init__(self, api: Connection, resource: Resource, since: str, absent_ok: bool):
        self.api, self.resource, self.since, self.absent_ok = api, resource, since, absent_ok
        self.what = f"watching {resource.kind} ({resource.path()}) from {api.host}"

    def answered(self, status: int, reason: str, body: Callable[[], bytes], encoding: str) -> bool:
        """Whether the answer is a watch to read; False for a CRD not installed (no events)."""
        resource = self.resource
        if status == 410:
            raise WatchExpired(resource.kind)
        if status == 404 and resource.crd:
            if not self.absent_ok:
                raise NotServed(resource)
            return False
        if not 200 <= status <= 299:
            raise _source_error(self.api, f"watching {resource.kind}", ApiError(status, reason, body()),
                                need=("watch", resource.plural, resource.api_version))
        if encoding.lower() != "identity":
            raise SourceError(f"{self.what}: answered with a Content-Encoding weft does not ask for")
        return True

    def read(self, chunks: Iterator[bytes]) -> tuple[list[tuple[str, dict]], str]:
        """The events of `chunks` (newline-delimited JSON), and the resourceVersion they end at."""
        head = {"apiVersion": self.resource.api_version, "kind": self.resource.kind}
        events: list[tuple[str, dict]] = []
        last, size, buffer = self.since, 0, b""
        for chunk in chunks:
            size += len(chunk)
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    kind, obj = _watch_event(line, self.what)
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired(self.resource.kind)
                        raise SourceError(f"{self.what}: {str(obj.get('message', obj))[:300]}")
                    last = obj["metadata"].get("resourceVersion") or last
                    if kind != "BOOKMARK":
                        events.append((kind, head | obj))
            if len(buffer) > MAX_RESPONSE_BYTES:
                raise SourceError(f"{self.what}: an event of more than {MAX_RESPONSE_BYTES >> 20} MiB")
            if size > MAX_RESPONSE_BYTES:
                break                                  # enough for this run: the rest is read next run
        return events, last


def _socket_of(response) -> Any:
    """The socket a streaming answer is read from: the connection's, or, when the server said
    "Connection: close" (http.client then hands the socket to the response), the response's."""
    sock = getattr(response.connection, "sock", None)
    if sock is None:
        fp = getattr(getattr(response, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


WATCH_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")


def _watch_event(line: bytes, what: str) -> tuple[str, dict]:
    """(type, object) of one line of a watch, checked: a known type, and an object weft can key
    (an ERROR's object is a Status: a mapping)."""
    try:
        event = json.loads(line)
        check_depth(event, "an event")
    except (ValueError, RecursionError, MemoryError, BoundExceeded):
        raise SourceError(f"{what}: an event that is not JSON, or nested deeper than {MAX_DEPTH} levels") from None
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str) or kind not in WATCH_EVENT_TYPES:
        raise SourceError(f"{what}: an event whose type is not one of {', '.join(WATCH_EVENT_TYPES)}")
    obj = event.get("object")
    problem = ("object must be a mapping" if not isinstance(obj, dict) else None) if kind == "ERROR" \
        else object_problem(obj, "object")
    if problem:
        raise SourceError(f"{what}: a {kind} event's {problem}")
    return kind, obj


# ---- which of Calico's groups serves each kind ------------------------------------------------

# Calico's kinds are served by crd.projectcalico.org/v1 (its CRDs, where Calico keeps them), by
# projectcalico.org/v3 (Calico's API server, a view of those same CRDs; or, in Calico's newer
# CRD mode, the CRDs themselves), or by both. weft reads each kind once, from the CRDs where they
# exist, else from v3.
DISCOVERY_MAX_PLURALS = 500


def served_plurals(api: Connection, api_version: str, *, timeout: float = READ_TIMEOUT) -> frozenset[str]:
    """The resources (plurals, no subresources) `api_version` serves: API discovery
    (GET /apis/GROUP/VERSION); nothing when the group is not served (404)."""
    path = f"/apis/{api_version}"
    try:
        doc = api.request("GET", path, timeout=timeout, http2=True)
    except ApiError as e:
        if e.status == 404:
            return frozenset()
        raise _source_error(api, f"discovering what {api_version} serves ({path})", e) from None
    resources = doc.get("resources")
    if not isinstance(resources, list) or len(resources) > DISCOVERY_MAX_PLURALS:
        raise SourceError(f"discovering what {api_version} serves ({path}) from {api.host}: "
                          "the answer is not an APIResourceList")
    return frozenset(r["name"] for r in resources
                     if isinstance(r, dict) and isinstance(r.get("name"), str) and "/" not in r["name"])


def choose_resources(served: dict[str, frozenset[str]]) -> tuple[Resource, ...]:
    """RESOURCES with each Calico kind read from one group: the first of CALICO_API_GROUPS that
    serves it (`served`: api_version -> plurals). A kind neither serves is not read."""
    chosen: list[Resource] = []
    taken: set[str] = set()
    for r in RESOURCES:
        if r.api_version not in CALICO_API_GROUPS:
            chosen.append(r)
        elif r.kind not in taken and r.plural in served.get(r.api_version, frozenset()):
            chosen.append(r)
            taken.add(r.kind)
    return tuple(chosen)


# Calico's kinds weft cannot do without: a cluster serving one of them in neither group is an
# error (weft would silently enforce less than asked). Tier and FelixConfiguration are newer
# kinds an older Calico lacks: without them weft uses the default tier and Felix's defaults, and
# says so. IPAMBlock and BlockAffinity are read where served (weft claims blocks itself).
NEEDED_KINDS = ("IPPool", "GlobalNetworkPolicy", "NetworkPolicy", "GlobalNetworkSet", "NetworkSet",
                "HostEndpoint", "BGPConfiguration", "BGPPeer")
OPTIONAL_KINDS = ("Tier", "FelixConfiguration")
CRDS_FIX = "apply weft's CRDs (kubectl apply -f playbooks/kubernetes/crds.yaml) or install Calico"


def unserved(chosen: tuple[Resource, ...], kinds: tuple[str, ...]) -> list[str]:
    """Which of Calico's `kinds` no resource of `chosen` reads."""
    read = {r.kind for r in chosen if r.api_version in CALICO_API_GROUPS}
    return [kind for kind in kinds if kind not in read]


def check_needed(host: str, chosen: tuple[Resource, ...]) -> None:
    """SourceError (one line) when a kind weft needs is served by neither of Calico's groups."""
    missing = unserved(chosen, NEEDED_KINDS)
    if missing:
        raise SourceError(f"the API server at {host} serves {', '.join(missing)} in neither "
                          f"{' nor '.join(CALICO_API_GROUPS)}; weft needs {'them' if len(missing) > 1 else 'it'}: "
                          f"{CRDS_FIX}")


def optional_warning(host: str, chosen: tuple[Resource, ...]) -> str | None:
    """A one-line warning (without "weft: warning:", which the logger adds) when a newer kind
    (OPTIONAL_KINDS) is served by neither group."""
    missing = unserved(chosen, OPTIONAL_KINDS)
    if not missing:
        return None
    return (f"the API server at {host} serves no {', '.join(missing)}: weft reads none "
            f"(policies are in the default tier, Felix's settings are the defaults); to read them, {CRDS_FIX}")


def discover_served(api: Connection, *, timeout: float = READ_TIMEOUT) -> dict[str, frozenset[str]]:
    """API discovery of Calico's groups: api_version -> the plurals it serves."""
    return {group: served_plurals(api, group, timeout=timeout) for group in CALICO_API_GROUPS}


def discover_resources(api: Connection, *, timeout: float = READ_TIMEOUT) -> tuple[Resource, ...]:
    """What this cluster serves of RESOURCES, each Calico kind from one group (choose_resources);
    SourceError when a kind weft needs is served by neither group (check_needed)."""
    chosen = choose_resources(discover_served(api, timeout=timeout))
    check_needed(api.host, chosen)
    return chosen
