"""Read the desired state from the Kubernetes API server as plain manifest-shaped dicts.

The official client finds the configuration and resolves credentials (kubeconfig, exec
plugins, the service account); requests then go over urllib3, as the client sends them, but
skipping its typed models (deserialising 10k pods into V1Pod costs ~2 s against ~0.3 s for
json.loads): every list is fetched raw and parsed with json. Lists are paginated (`limit` + `continue`) so one huge
response never has to be built by the API server, and a list whose continue token expires
mid-way is restarted, since a half-old, half-new list would mix two snapshots.

`kubernetes` is imported only to resolve a configuration: it costs ~0.25 s of CPU, and a
reconcile run that finds nothing to do, or the CNI plugin, should not pay it (see connect).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weft.model.errors import SourceError

CALICO_API_VERSION = "crd.projectcalico.org/v1"


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


def _calico(kind: str, plural: str, namespaced: bool) -> Resource:
    return Resource(CALICO_API_VERSION, kind, plural, namespaced, crd=True)


# Everything weft reads. Two kinds are called NetworkPolicy: tell them apart by apiVersion.
RESOURCES: tuple[Resource, ...] = (
    Resource("v1", "Namespace", "namespaces", False),
    Resource("v1", "Node", "nodes", False),
    Resource("v1", "Pod", "pods", True),
    Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", True),
    _calico("GlobalNetworkPolicy", "globalnetworkpolicies", False),
    _calico("NetworkPolicy", "networkpolicies", True),
    _calico("GlobalNetworkSet", "globalnetworksets", False),
    _calico("NetworkSet", "networksets", True),
    _calico("IPPool", "ippools", False),
    _calico("IPAMBlock", "ipamblocks", False),
    _calico("BlockAffinity", "blockaffinities", False),
    _calico("BGPConfiguration", "bgpconfigurations", False),
    _calico("BGPPeer", "bgppeers", False),
    _calico("HostEndpoint", "hostendpoints", False),
)

EXPIRED_RELIST_ATTEMPTS = 3
LIST_WORKERS = 4


def load_objects(kubeconfig: str | None = None, context: str | None = None, page_size: int = 500,
                 *, concurrent: bool = True, timeout: float = 30.0) -> list[dict]:
    """Every object of RESOURCES in the cluster, shaped like a YAML manifest.

    Calico CRDs that are not installed are skipped; any other failure raises SourceError.
    `timeout` bounds each request (connect and each read), so a dead API server fails the run
    instead of hanging it. Objects come in RESOURCES order, each kind in the server's order.
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


def list_kind(api: Connection, resource: Resource, page_size: int = 500, *,
              timeout: float = 30.0) -> tuple[list[dict], str]:
    """All objects of one resource (all namespaces) and the list's resourceVersion.

    The resourceVersion is where a watch can start without missing a change. A CRD that is not
    installed yields ([], "").
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
                items.extend(head | item for item in page.get("items") or ())
                meta = page.get("metadata") or {}
                token = meta.get("continue")
                if not token:
                    return items, meta.get("resourceVersion", "")
        except ApiError as e:
            if e.status == 404 and resource.crd:
                return [], ""
            if e.status == 410 and token:
                continue  # the snapshot behind the continue token is gone: list again
            raise _source_error(api, f"listing {resource.kind} ({path})", e) from None
    raise SourceError(
        f"listing {resource.kind} ({path}) from {api.host}: the continue token "
        f"expired {EXPIRED_RELIST_ATTEMPTS} times in a row (HTTP 410 Expired); the list changes faster "
        f"than it can be paged: retry, or raise the page size")


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
        self._use(profile)

    def _use(self, profile: Profile) -> None:
        import ssl

        import urllib3
        self.profile, self.host = profile, profile.host
        args: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED if profile.verify else ssl.CERT_NONE,
                                "ca_cert_data": profile.ca_pem}
        if profile.cert_pem and profile.key_pem:
            files = [_memory_file(profile.cert_pem), _memory_file(profile.key_pem)]
            self._files += files
            args["cert_file"], args["key_file"] = (f"/proc/self/fd/{fd}" for fd in files)
        if profile.assert_hostname is not None:
            args["assert_hostname"] = profile.assert_hostname
        if profile.server_hostname:
            args["server_hostname"] = profile.server_hostname
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
                body: dict | None = None, timeout: float = 30.0) -> dict:
        """One JSON request. Raises ApiError for a non-2xx answer (callers decide what 404, 409
        or 410 mean) and SourceError when the server cannot be reached."""
        response = self.open(method, path, query=query, body=body, timeout=(timeout, timeout))
        try:
            data = response.read()
        except _http_errors() as e:
            raise self._unreachable(method, path, e) from None
        finally:
            response.release_conn()
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, response.reason or "", data)
        return json.loads(data)

    def open(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
             body: dict | None = None, timeout: tuple[float, float] = (30.0, 30.0)):
        """The response, unread (any status), for streaming; the caller releases it."""
        from urllib.parse import urlencode

        import urllib3
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            profile, url = self.profile, self.host + path + ("?" + urlencode(query) if query else "")
            headers = self._headers | ({"Content-Type": "application/json"} if data is not None else {})
            try:
                response = self._pool.request(method, url, body=data, headers=headers, preload_content=False,
                                              timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
            except _http_errors() as e:
                # A failed handshake comes wrapped, after urllib3's retries, as MaxRetryError.
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

    def _unreachable(self, method: str, path: str, e: Exception) -> SourceError:
        reason = getattr(e, "reason", None) or e
        return SourceError(f"{method} {path}: no answer from the API server at {self.host}: {reason}")

    def close(self) -> None:
        self._pool.clear()
        for fd in self._files:
            os.close(fd)
        self._files = []

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def _kept_profile(keep: Path, key: list) -> Profile | None:
    """The kept profile if it was resolved from these files less than PROFILE_MAX_AGE ago. The
    file is read through the state dir's checks (root's, no link) and every field is checked."""
    import dataclasses
    import time

    from weft.model.errors import WeftError
    from weft.store.statedir import StateDir
    try:
        kept = StateDir(keep.parent).read_json(keep.name, limit=1 << 20)
        if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("at"), float | int):
            return None
        if not 0 <= time.time() - kept["at"] < PROFILE_MAX_AGE:
            return None
        fields = kept["profile"]
        if not isinstance(fields, dict) or set(fields) != {f.name for f in dataclasses.fields(Profile)}:
            return None
        texts = [v for k, v in fields.items() if k not in ("verify", "assert_hostname", "proxy_headers")]
        if not all(v is None or isinstance(v, str) for v in texts) or not isinstance(fields["verify"], bool):
            return None
        headers = fields["proxy_headers"]
        if headers is not None and not (isinstance(headers, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            return None
        if fields["assert_hostname"] is not None and not isinstance(fields["assert_hostname"], str | bool):
            return None
        return Profile(**fields)
    except (OSError, WeftError, KeyError, TypeError):
        return None                             # none kept, or not trusted: resolve anew


def _keep_profile(keep: Path, key: list, profile: Profile) -> None:
    """Keep the profile for later runs (mode 0600: it holds credentials)."""
    import dataclasses
    import time

    from weft.model.errors import WeftError
    from weft.store.statedir import StateDir
    text = json.dumps({"key": key, "at": time.time(), "profile": dataclasses.asdict(profile)})
    with contextlib.suppress(OSError, WeftError):     # a read-only state dir: no profile is kept
        StateDir(keep.parent).replace(keep.name, text)


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


def _source_error(api: Connection, what: str, e: ApiError) -> SourceError:
    """A SourceError that says which request failed and what the server said."""
    message = ""
    try:
        status = json.loads(e.body)
        message = status.get("message", "")
        reason = status.get("reason") or e.reason
    except (TypeError, ValueError, AttributeError):
        reason = e.reason
    hint = {401: " (check the kubeconfig's credentials)",
            403: " (the user needs list permission on this resource)"}.get(e.status, "")
    text = f"{what} from {api.host}: HTTP {e.status} {reason}"
    return SourceError(text + (f": {message}" if message else "") + hint)


class WatchExpired(Exception):
    """The events after a resourceVersion are no longer kept (410): the kind must be listed anew."""


def current_resource_version(api: Connection, *, timeout: float = 30.0) -> str:
    """The cluster's resourceVersion now: the cheapest list there is (one namespace)."""
    try:
        page = api.request("GET", "/api/v1/namespaces", query=[("limit", 1)], timeout=timeout)
    except ApiError as e:
        raise _source_error(api, "reading the resourceVersion (/api/v1/namespaces)", e) from None
    return (page.get("metadata") or {}).get("resourceVersion", "")


def watch_since(api: Connection, resource: Resource, resource_version: str, *, quiet: float = 0.1,
                timeout: float = 30.0) -> tuple[list[tuple[str, dict]], str]:
    """The (type, object) events of `resource` after `resource_version`, and where they end.

    The server sends what it has at once; reading stops after `quiet` seconds without data
    (after its answer began: a server slow to answer has `timeout`). A change still in flight
    then is not lost: the returned resourceVersion is that of the last event received, so the
    next run's watch starts right after it.
    """
    query = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
             ("timeoutSeconds", max(1, int(timeout)))]
    head = {"apiVersion": resource.api_version, "kind": resource.kind}
    events: list[tuple[str, dict]] = []
    last = resource_version
    response = api.open("GET", resource.path(), query=query, timeout=(timeout, timeout))
    try:
        response.connection.sock.settimeout(quiet)     # urllib3 sets it anew for the next request
        if response.status == 410:
            raise WatchExpired(resource.kind)
        if response.status == 404 and resource.crd:
            return [], resource_version
        if not 200 <= response.status <= 299:
            error = ApiError(response.status, response.reason or "", response.read())
            raise _source_error(api, f"watching {resource.kind}", error)
        buffer = b""
        try:
            for chunk in response.stream(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired(resource.kind)
                        raise SourceError(f"watching {resource.kind}: {obj.get('message', obj)}")
                    last = (obj.get("metadata") or {}).get("resourceVersion") or last
                    if kind != "BOOKMARK":
                        events.append((kind, head | obj))
        except _http_errors():
            pass                                           # quiet: caught up for this run
    finally:
        response.close()            # the watch is still open: its connection cannot serve another request
        response.release_conn()
    return events, last
