"""Claiming an address block for a node through the Kubernetes API, with optimistic concurrency.

A claim creates the block's IPAMBlock, named after its CIDR ("198-18-4-0-26") with
`spec.affinity: host:<node>`. Creating an object that exists fails with 409 AlreadyExists, so of
two nodes racing for one block exactly one wins; the loser moves on to the next free block. The
winner then records a confirmed BlockAffinity ("<node>-198-18-4-0-26"), as Calico does. A block
already created for this node (a claim whose node.json entry a reconcile run replaced, or a
crash after the create) is taken back as it is.

weft keeps per-address allocations on the node (cni/ipam.py), not in the IPAMBlock: the block's
`allocations`/`unallocated` fields are written once, empty, because Calico's CRD requires them.

The IPAM kinds are read and written in Calico's CRD group (crd.projectcalico.org/v1) where the
API server serves them there, else in projectcalico.org/v3 (Calico's newer CRD mode): the first
list of a claim finds out (a 404 means "not served here").

Only the claim path imports the Kubernetes client (0.5 s): a node claims a block once per 64 pods.
"""
from __future__ import annotations

import ipaddress

from weft.desired.api import CALICO_API_GROUPS, CALICO_API_VERSION
from weft.desired.kinds.ipam import AFFINITY_HOST_PREFIX, block_name
from weft.store.ipam import ClaimForbidden, ClaimUnavailable, Exhausted

BLOCKS_PATH = f"/apis/{CALICO_API_VERSION}/ipamblocks"
AFFINITIES_PATH = f"/apis/{CALICO_API_VERSION}/blockaffinities"


def ipam_block_object(cidr: str, node: str, api_version: str = CALICO_API_VERSION) -> dict:
    size = ipaddress.ip_network(cidr).num_addresses
    return {"apiVersion": api_version, "kind": "IPAMBlock", "metadata": {"name": block_name(cidr)},
            "spec": {"cidr": cidr, "affinity": AFFINITY_HOST_PREFIX + node, "strictAffinity": False,
                     "allocations": [None] * size, "unallocated": list(range(size)), "attributes": [],
                     "deleted": False}}


def block_affinity_object(cidr: str, node: str, api_version: str = CALICO_API_VERSION) -> dict:
    return {"apiVersion": api_version, "kind": "BlockAffinity",
            "metadata": {"name": f"{node}-{block_name(cidr)}"},
            "spec": {"node": node, "cidr": cidr, "state": "confirmed", "deleted": "false"}}


def claim_block(node: str, pools: list[dict], kubeconfig: str | None = None, context: str | None = None,
                *, skip: set[str] | frozenset[str] = frozenset(), timeout: float = 10.0) -> dict:
    """Claim the first free block of `pools` (node.json pool entries, in order) for `node`.

    Returns the block as node.json lists it ({"cidr", "pool", "origin"}). `skip`: CIDRs not to
    take back even if they are already this node's (they are known, and full). Raises Exhausted
    naming the pools when every block of them belongs to some node, ClaimUnavailable when the API
    server cannot be used.
    """
    from weft.desired.api import ApiError, connect
    from weft.model.errors import SourceError

    try:
        with connect(kubeconfig, context) as api:
            version, existing = _list_blocks(api, node, timeout)
            owners = {(b.get("spec") or {}).get("cidr"): (b.get("spec") or {}).get("affinity") for b in existing}
            for pool in pools:
                for net in ipaddress.ip_network(pool["cidr"]).subnets(new_prefix=pool["block_size"]):
                    cidr = str(net)
                    if cidr in skip or (cidr in owners and owners[cidr] != AFFINITY_HOST_PREFIX + node):
                        continue
                    if cidr not in owners and not _create_block(api, version, cidr, node, timeout):
                        continue
                    _confirm_affinity(api, version, cidr, node, timeout)
                    return {"cidr": cidr, "pool": pool["name"], "origin": f"IPAMBlock {block_name(cidr)}"}
    except ApiError as exc:
        raise ClaimUnavailable(f"claiming a block for node {node!r}: the API server answered "
                               f"HTTP {exc.status} {exc.reason}") from None
    except SourceError as exc:
        raise ClaimUnavailable(f"claiming a block for node {node!r}: {exc}") from None
    names = ", ".join(f"{p['name']} ({p['cidr']})" for p in pools) or "none"
    raise Exhausted(f"IPPool {names} is exhausted: every block is claimed by a node, none is free for {node!r}")


def _list_blocks(api, node: str, timeout: float) -> tuple[str, list]:
    """The API version serving IPAMBlock (Calico's CRDs, else projectcalico.org/v3) and its blocks."""
    from weft.desired.api import ApiError
    for version in CALICO_API_GROUPS:
        try:
            listed = _request(api, node, "list", "GET", f"/apis/{version}/ipamblocks", timeout)
            return version, listed.get("items") or []
        except ApiError as exc:
            if exc.status != 404 or version == CALICO_API_GROUPS[-1]:
                raise
    raise AssertionError("unreachable")


def _request(api, node: str, verb: str, method: str, path: str, timeout: float, body: dict | None = None) -> dict:
    """One request of a claim; a refusal (403) is ClaimForbidden naming the permission it needed
    (permanent: retrying cannot help), every other failure the caller's to judge."""
    from weft.desired.api import ApiError
    try:
        return api.request(method, path, body=body, timeout=timeout)
    except ApiError as exc:
        if exc.status != 403:
            raise
        resource = f"{path.split('/')[4]}.{path.split('/')[2]}"
        raise ClaimForbidden(f"claiming a block for node {node!r}: the API server refused `{verb}` on {resource} "
                             "(HTTP 403 Forbidden); the node's identity needs it (playbooks/kubernetes/rbac.yaml)"
                             ) from None


def _create_block(api, version: str, cidr: str, node: str, timeout: float) -> bool:
    """Create the block's IPAMBlock; True if it is (now or already) this node's."""
    from weft.desired.api import ApiError
    blocks = f"/apis/{version}/ipamblocks"
    try:
        _request(api, node, "create", "POST", blocks, timeout, ipam_block_object(cidr, node, version))
        return True
    except ApiError as exc:
        if exc.status != 409:
            raise
    # Someone created it first: it is ours only if that someone was this node.
    current = _request(api, node, "get", "GET", f"{blocks}/{block_name(cidr)}", timeout)
    return (current.get("spec") or {}).get("affinity") == AFFINITY_HOST_PREFIX + node


def _confirm_affinity(api, version: str, cidr: str, node: str, timeout: float) -> None:
    from weft.desired.api import ApiError
    try:
        _request(api, node, "create", "POST", f"/apis/{version}/blockaffinities", timeout,
                 block_affinity_object(cidr, node, version))
    except ApiError as exc:
        if exc.status != 409:            # already recorded (by us: the name holds the node)
            raise
