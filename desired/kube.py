"""Read the desired state from the Kubernetes API server as plain manifest-shaped dicts.

The official client does auth, TLS and kubeconfig handling; its typed models are skipped
(deserialising 10k pods into V1Pod costs ~2 s against ~0.3 s for json.loads), so every list
is fetched raw and parsed with json. Lists are paginated (`limit` + `continue`) so one huge
response never has to be built by the API server, and a list whose continue token expires
mid-way is restarted, since a half-old, half-new list would mix two snapshots.

`kubernetes` is imported inside the functions: it costs ~0.5 s and the CNI plugin, which
must answer the kubelet quickly, never needs it.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from desired.errors import SourceError

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
    with make_api_client(kubeconfig, context) as api:
        def one(resource: Resource) -> list[dict]:
            return list_kind(api, resource, page_size, timeout=timeout)[0]

        if concurrent:
            with ThreadPoolExecutor(LIST_WORKERS, thread_name_prefix="weft-list") as pool:
                per_kind = list(pool.map(one, RESOURCES))
        else:
            per_kind = [one(r) for r in RESOURCES]
    return [obj for objs in per_kind for obj in objs]


def list_kind(api_client, resource: Resource, page_size: int = 500, *,
              timeout: float = 30.0) -> tuple[list[dict], str]:
    """All objects of one resource (all namespaces) and the list's resourceVersion.

    The resourceVersion is where a watch can start without missing a change. A CRD that is not
    installed yields ([], "").
    """
    from kubernetes.client.exceptions import ApiException

    path = resource.path()
    for _ in range(EXPIRED_RELIST_ATTEMPTS):
        items: list[dict] = []
        token = None
        try:
            while True:
                query = [("limit", page_size)] + ([("continue", token)] if token else [])
                page = request(api_client, "GET", path, query=query, timeout=timeout)
                head = {"apiVersion": resource.api_version, "kind": resource.kind}
                items.extend(head | item for item in page.get("items") or ())
                meta = page.get("metadata") or {}
                token = meta.get("continue")
                if not token:
                    return items, meta.get("resourceVersion", "")
        except ApiException as e:
            if e.status == 404 and resource.crd:
                return [], ""
            if e.status == 410 and token:
                continue  # the snapshot behind the continue token is gone: list again
            raise _source_error(api_client, f"listing {resource.kind} ({path})", e) from None
    raise SourceError(
        f"listing {resource.kind} ({path}) from {api_client.configuration.host}: the continue token "
        f"expired {EXPIRED_RELIST_ATTEMPTS} times in a row (HTTP 410 Expired); the list changes faster "
        f"than it can be paged: retry, or raise the page size")


def request(api_client, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
            body: dict | None = None, timeout: float = 30.0) -> dict:
    """One JSON request through the client's auth and TLS, without its typed models.

    Raises the client's ApiException for a non-2xx answer (callers decide what 404/409/410
    mean) and SourceError when the server cannot be reached.
    """
    import urllib3
    from kubernetes.client.exceptions import ApiException

    params = api_client.param_serialize(
        method=method, resource_path=path, query_params=query or [],
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body, auth_settings=["BearerToken"])
    try:
        response = api_client.call_api(*params, _request_timeout=(timeout, timeout))
        data = response.read()
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise SourceError(f"{method} {path}: no answer from the API server at "
                          f"{api_client.configuration.host}: {reason}") from None
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=response)
    return json.loads(data)


def make_api_client(kubeconfig: str | None = None, context: str | None = None):
    """An ApiClient configured the way kubectl finds its config.

    Order: the explicit path, then $KUBECONFIG (a colon-separated list, merged), then
    ~/.kube/config, then the pod's service account. Refreshed credentials are not written back:
    a reconcile run only reads.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    home_config = os.path.expanduser("~/.kube/config")
    env = os.environ.get("KUBECONFIG")
    if kubeconfig:
        source = f"kubeconfig {kubeconfig}"
    elif env:
        kubeconfig, source = env, f"KUBECONFIG={env}"
    elif os.path.exists(home_config):
        kubeconfig, source = home_config, f"kubeconfig {home_config}"
    try:
        if kubeconfig:
            if os.pathsep not in kubeconfig and not os.path.exists(kubeconfig):
                raise ConfigException(f"{kubeconfig}: no such file")
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=cfg, persist_config=False)
        else:
            source = "in-cluster service account"
            config.load_incluster_config(client_configuration=cfg)
    except (ConfigException, OSError, ValueError) as e:
        if kubeconfig:
            raise SourceError(f"cannot use {source}: {e}") from None
        raise SourceError(
            "no Kubernetes API configuration found: tried --kubeconfig (not given), $KUBECONFIG "
            f"(not set), {home_config} (not found) and the in-cluster service account ({e})") from None
    return client.ApiClient(configuration=cfg)


def _source_error(api_client, what: str, e) -> SourceError:
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
    text = f"{what} from {api_client.configuration.host}: HTTP {e.status} {reason}"
    if e.status == 0:  # the client's way of reporting a TLS failure
        text = f"{what} from {api_client.configuration.host}: {e.reason}"
    return SourceError(text + (f": {message}" if message else "") + hint)


class WatchExpired(Exception):
    """The events after a resourceVersion are no longer kept (410): the kind must be listed anew."""


def current_resource_version(api_client, *, timeout: float = 30.0) -> str:
    """The cluster's resourceVersion now: the cheapest list there is (one namespace)."""
    from kubernetes.client.exceptions import ApiException
    try:
        page = request(api_client, "GET", "/api/v1/namespaces", query=[("limit", 1)], timeout=timeout)
    except ApiException as e:
        raise _source_error(api_client, "reading the resourceVersion (/api/v1/namespaces)", e) from None
    return (page.get("metadata") or {}).get("resourceVersion", "")


def watch_since(api_client, resource: Resource, resource_version: str, *, quiet: float = 0.1,
                timeout: float = 30.0) -> tuple[list[tuple[str, dict]], str]:
    """The (type, object) events of `resource` after `resource_version`, and where they end.

    The server sends what it has at once; reading stops after `quiet` seconds without data.
    A change still in flight then is not lost: the returned resourceVersion is that of the last
    event received, so the next run's watch starts right after it.
    """
    import urllib3
    from kubernetes.client.exceptions import ApiException

    query = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
             ("timeoutSeconds", max(1, int(timeout)))]
    params = api_client.param_serialize(method="GET", resource_path=resource.path(), query_params=query,
                                        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
    head = {"apiVersion": resource.api_version, "kind": resource.kind}
    events: list[tuple[str, dict]] = []
    last = resource_version
    try:
        # The client hands back the urllib3 response unread: stream it.
        response = api_client.call_api(*params, _request_timeout=(timeout, quiet)).response
    except urllib3.exceptions.HTTPError as e:
        raise SourceError(f"watching {resource.kind}: no answer from the API server at "
                          f"{api_client.configuration.host}: {getattr(e, 'reason', None) or e}") from None
    try:
        if response.status == 410:
            raise WatchExpired(resource.kind)
        if response.status == 404 and resource.crd:
            return [], resource_version
        if not 200 <= response.status <= 299:
            raise _source_error(api_client, f"watching {resource.kind}", ApiException(http_resp=response))
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
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError, TimeoutError):
            pass                                           # quiet: caught up for this run
    finally:
        response.release_conn()
    return events, last
