"""What the CNI plugin itself reads of the desired state, in its own process and thread.

Two rare cases need it: a node where no reconcile run has written ipam/node.json yet (the
plugin reads this node's pools, blocks and labels and writes it), and IPAM records rebuilt from
the kernel after they were lost (the pods of this node name the interfaces the kernel shows).
Only those kinds are read: IPPools, IPAMBlocks, BlockAffinities, this node's Node object and
the Pods scheduled to it (a field selector, from the API server). Nothing is forked: the
plugin's resident helper runs calls in threads, and forking a threaded process is unsafe;
the reconcile run's incremental reader (desired.sources) is not used for that reason, and
because its cache belongs to the run. The caller makes it once per node (a lock in the state
dir): concurrent first ADDs on a fresh node wait for the one read.
"""
from __future__ import annotations

from collections import namedtuple

from weft.desired.api import CALICO_API_GROUPS, ApiError, connect
from weft.desired.loader import build_cluster_state, flatten_lists
from weft.desired.manifests import load_manifest_dir
from weft.model.errors import SourceError
from weft.model.names import host_iface_name

READ_TIMEOUT = 10.0                 # seconds per request to the API server
IPAM_KINDS = ("IPPool", "IPAMBlock", "BlockAffinity")
PAGE = 500

NodeIpam = namedtuple("NodeIpam", "pools blocks labels")


def read_node_ipam(source: dict, node: str, timeout: float = READ_TIMEOUT) -> NodeIpam:
    """This node's IPAM view of the desired state: every IPPool and block (the node's are picked
    by store.ipam.node_ipam_document) and the node's labels (for the pools' nodeSelectors)."""
    objects = _read(source, node, timeout, pods=False)
    wanted = [(where, obj) for where, obj in objects if _kind(obj) in IPAM_KINDS or _is_node(obj, node)]
    state = build_cluster_state(wanted)
    me = state.nodes.get(node)
    return NodeIpam(state.ippools, state.blocks, dict(me.labels) if me else {})


def read_local_pods(source: dict, node: str, timeout: float = READ_TIMEOUT) -> dict[str, tuple[str, str]]:
    """The pods scheduled to `node`, by the host interface weft names after them: interface ->
    (namespace, pod)."""
    pods = {}
    for _where, obj in _read(source, node, timeout, pods=True):
        if not isinstance(obj, dict) or _kind(obj) != "Pod" or obj.get("apiVersion") != "v1":
            continue
        meta, spec = obj.get("metadata"), obj.get("spec")
        if not isinstance(meta, dict) or not isinstance(spec, dict) or spec.get("nodeName") != node:
            continue
        namespace, name = meta.get("namespace"), meta.get("name")
        if isinstance(namespace, str) and isinstance(name, str) and namespace and name:
            pods[host_iface_name(namespace, name)] = (namespace, name)
    return pods


def _kind(obj) -> str | None:
    return obj.get("kind") if isinstance(obj, dict) else None


def _is_node(obj, node: str) -> bool:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return _kind(obj) == "Node" and obj.get("apiVersion") == "v1" and isinstance(meta, dict) \
        and meta.get("name") == node


def _read(source: dict, node: str, timeout: float, pods: bool) -> list[tuple[str, object]]:
    if "manifests" in source:
        return list(flatten_lists(load_manifest_dir(source["manifests"])))
    with connect(source.get("kubeconfig"), source.get("context")) as api:
        if pods:
            return [("api", obj) for obj in _list(api, "/api/v1/pods", "v1", "Pod", timeout,
                                                   [("fieldSelector", f"spec.nodeName={node}")])]
        kinds = (("IPPool", "ippools"), ("IPAMBlock", "ipamblocks"), ("BlockAffinity", "blockaffinities"))
        objects: list[tuple[str, object]] = [("api", obj) for kind, plural in kinds
                                             for obj in _calico_list(api, kind, plural, timeout)]
        # The node by a list with a field selector: the same permission as every other read (no `get`).
        objects += [("api", obj) for obj in _list(api, "/api/v1/nodes", "v1", "Node", timeout,
                                                  [("fieldSelector", f"metadata.name={node}")])]
        return objects


def _calico_list(api, kind: str, plural: str, timeout: float) -> list[dict]:
    """A Calico kind from the first of Calico's groups that serves it (crd.projectcalico.org/v1,
    else projectcalico.org/v3, Calico's newer CRD mode); none if neither does."""
    for version in CALICO_API_GROUPS:
        try:
            return _list(api, f"/apis/{version}/{plural}", version, kind, timeout, crd=True)
        except _NotServed:
            continue
    return []


class _NotServed(Exception):
    """A CRD group that does not serve the kind (404)."""


def _list(api, path: str, api_version: str, kind: str, timeout: float, query=(), crd: bool = False) -> list[dict]:
    items, token = [], None
    while True:
        try:
            page = api.request("GET", path, query=[*query, ("limit", PAGE)] + ([("continue", token)] if token else []),
                               timeout=timeout)
        except ApiError as exc:
            if exc.status == 404 and crd:
                raise _NotServed(path) from None     # the CRD is not served in this group
            raise SourceError(f"listing {kind} ({path}) from {api.host}: HTTP {exc.status} {exc.reason}") from None
        if not isinstance(page, dict) or not isinstance(page.get("items") or [], list):
            raise SourceError(f"listing {kind} ({path}) from {api.host}: not a list")
        items += [{"apiVersion": api_version, "kind": kind} | item for item in page.get("items") or ()
                  if isinstance(item, dict)]
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items
