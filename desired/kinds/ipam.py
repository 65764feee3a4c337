"""Converters for Calico's IPAM kinds: IPPool, IPAMBlock, BlockAffinity (both apiVersions).

Each converter takes a Checker and the raw object and returns a model value (desired.model.IPPool /
Block) or None when the object claims nothing (a pending affinity, a block without a host), recording
problems on the checker. The fields are Calico's; fields weft does not use (ipipMode, vxlanMode,
allowedUses, the per-address `allocations` of a block, ...) are accepted and ignored, so Calico's own
manifests load unchanged.

`check_state` holds the checks that need several objects at once (overlapping pools, a block outside
every pool, one block owned by two nodes): the loader calls it on every load.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from weft.desired.validation import Checker, cidr_of, name_of
from weft.model.cluster import Block, IPPool
from weft.model.errors import ValidationError
from weft.model.selector import All, Expr, SelectorError, parse_selector

# Calico's defaults and limits for spec.blockSize, per address family.
DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}
AFFINITY_HOST_PREFIX = "host:"
AFFINITY_STATES = ("confirmed", "pending", "pendingDeletion")


def block_name(cidr: str) -> str:
    """Calico's object name for a block: "198.18.4.0/26" -> "198-18-4-0-26" (also IPv6: ':' -> '-')."""
    return cidr.replace(".", "-").replace(":", "-").replace("/", "-")


# IPPool's fields: those weft uses, and Calico's others (accepted; any further field is a warning).
POOL_FIELDS = {"cidr", "blockSize", "nodeSelector", "disabled", "disableBGPExport", "natOutgoing"}
POOL_FIELDS_UNUSED = {"vxlanMode", "ipipMode", "allowedUses", "assignmentMode", "ipip", "nat-outgoing"}


def ippool(check: Checker, raw: dict) -> IPPool | None:
    name = name_of(check, raw)
    spec = _spec(check, raw)
    if spec is None:
        return None
    check.known_fields(spec, "spec", POOL_FIELDS, ignored=POOL_FIELDS_UNUSED)
    cidr = _block_cidr(check, spec)
    if cidr is None:
        return None
    network = ipaddress.ip_network(cidr)
    block_size = check.typed(spec.get("blockSize"), "spec.blockSize", int, "an integer",
                             DEFAULT_BLOCK_SIZE[network.version])
    low, high = BLOCK_SIZE_RANGE[network.version]
    if not low <= block_size <= high:
        check.fail("spec.blockSize", f"must be between {low} and {high} for an IPv{network.version} pool, "
                                     f"got {block_size}")
    elif block_size < network.prefixlen:
        check.fail("spec.blockSize", f"blocks of /{block_size} do not fit in the pool's /{network.prefixlen}: "
                                     f"must be at least {network.prefixlen}")
    return IPPool(
        name=name, cidr=cidr, block_size=block_size,
        node_selector=_node_selector(check, spec.get("nodeSelector")),
        disabled=_flag(check, spec, "disabled"),
        disable_bgp_export=_flag(check, spec, "disableBGPExport"),
        nat_outgoing=_flag(check, spec, "natOutgoing"),
    )


def ipam_block(check: Checker, raw: dict) -> Block | None:
    """An IPAMBlock whose `affinity` is "host:<node>" is that node's; without one it is nobody's."""
    name_of(check, raw)
    spec = _spec(check, raw)
    if spec is None:
        return None
    cidr = _block_cidr(check, spec)
    affinity = check.typed(spec.get("affinity"), "spec.affinity", str, "a string", None)
    if _deleted(check, spec) or not affinity or cidr is None:
        return None
    kind, _, node = affinity.partition(":")
    if not node:
        check.fail("spec.affinity", f'must be "host:<node name>", got {affinity!r}')
        return None
    if kind + ":" != AFFINITY_HOST_PREFIX:
        return None                                     # e.g. Calico's "virtual:" affinities: not a node's
    return Block(cidr, node, f"{raw.get('kind')} {raw['metadata'].get('name')}")


def block_affinity(check: Checker, raw: dict) -> Block | None:
    """A confirmed BlockAffinity gives its node the block; pending or being deleted gives nothing."""
    name_of(check, raw)
    spec = _spec(check, raw)
    if spec is None:
        return None
    cidr = _block_cidr(check, spec)
    node = check.typed(spec.get("node"), "spec.node", str, "a string", None)
    if not node:
        check.fail("spec.node", "missing")
    state = spec.get("state", "confirmed")
    if state not in AFFINITY_STATES:
        check.fail("spec.state", f"must be one of {', '.join(AFFINITY_STATES)}, got {state!r}")
    if _deleted(check, spec) or not node or cidr is None or state != "confirmed":
        return None
    return Block(cidr, node, f"{raw.get('kind')} {raw['metadata'].get('name')}")


def check_state(items: Iterable) -> list[ValidationError]:
    """Checks across the IPAM objects of one load (desired.loader.Converted items; others are skipped):
    pools must not overlap, every block must be one of a pool's blocks (inside it, of its blockSize),
    and no block may belong to two nodes."""
    pools = [c for c in items if c.kind == "IPPool" and c.value is not None]
    blocks = [c for c in items if c.kind in ("IPAMBlock", "BlockAffinity") and c.value is not None]
    errors: list[ValidationError] = []
    nets = [(ipaddress.ip_network(c.value.cidr), c) for c in pools]
    for i, (net, c) in enumerate(nets):
        for other_net, other in nets[:i]:
            if net.version == other_net.version and net.overlaps(other_net):
                errors.append(ValidationError(c.where, c.label, "spec.cidr",
                                              f"{net} overlaps {other.label} ({other_net}): pools must not overlap"))
    owners: dict[str, Any] = {}              # cidr -> the first desired.loader.Converted claiming it
    for c in blocks:
        net = ipaddress.ip_network(c.value.cidr)
        pool = next((p for pool_net, p in nets if _inside(net, pool_net)), None)
        if pool is None:
            errors.append(ValidationError(c.where, c.label, "spec.cidr", f"{net} is not inside any IPPool"))
        elif net.prefixlen != pool.value.block_size:
            errors.append(ValidationError(c.where, c.label, "spec.cidr",
                                          f"{net} is not a block of {pool.label}: its blocks are "
                                          f"/{pool.value.block_size}"))
        first = owners.setdefault(c.value.cidr, c)
        if first.value.node != c.value.node:
            field = "spec.affinity" if c.kind == "IPAMBlock" else "spec.node"
            errors.append(ValidationError(c.where, c.label, field,
                                          f"block {net} is given to node {c.value.node!r}, but {first.label} "
                                          f"gives it to node {first.value.node!r}: a block has one owner"))
    return errors


def _inside(net: ipaddress.IPv4Network | ipaddress.IPv6Network,
            other: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return net.version == other.version and net.subnet_of(other)  # type: ignore[arg-type]  # same version


def _spec(check: Checker, raw: dict) -> dict | None:
    if raw.get("spec") is None:
        check.fail("spec", "missing")
        return None
    return check.typed(raw.get("spec"), "spec", dict, "a mapping", None)


def _block_cidr(check: Checker, spec: dict) -> str | None:
    if spec.get("cidr") is None:
        check.fail("spec.cidr", "missing")
        return None
    return cidr_of(check, spec["cidr"], "spec.cidr")


def _deleted(check: Checker, spec: dict) -> bool:
    """Calico's CRD form keeps BlockAffinity `deleted` as the string "true"/"false"; v3 as a bool."""
    value = spec.get("deleted", False)
    if value in ("true", "false"):
        return value == "true"
    return bool(check.typed(value, "spec.deleted", bool, "a boolean", False))


def _flag(check: Checker, spec: dict, key: str) -> bool:
    return check.typed(spec.get(key), f"spec.{key}", bool, "a boolean", False)


def _node_selector(check: Checker, text: Any) -> Expr | None:
    """The pool's nodeSelector as a Calico selector AST; None (all nodes) when absent or all()."""
    if text is None or text == "":
        return None
    try:
        expr = parse_selector(text)
    except SelectorError as exc:
        check.fail("spec.nodeSelector", str(exc))
        return None
    return None if isinstance(expr, All) else expr
