"""Raw objects (manifest-shaped dicts, from any source) -> one validated ClusterState.

Two steps, so a source that learns of a few changed objects can redo only those:
  convert_object: one object alone -> its model value (or its problems);
  assemble: the cross-object checks (namespaces exist) and the immutable ClusterState.
A load with any problem raises InvalidDesiredState listing them all; nothing is applied.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from weft.desired.kinds import bgp, ipam, kubernetes, services
from weft.desired.validation import Checker, namespace_of, namespace_problem, object_label, shown
from weft.model import codec
from weft.model.cluster import ClusterState, Namespace
from weft.model.errors import InvalidDesiredState, ValidationError


@dataclass(frozen=True)
class Kind:
    name: str                                    # the model's name for it: "Pod", "IPPool", ...
    namespaced: bool
    convert: Callable[[Checker, dict], object]   # -> a model value, or None when it models nothing
    field: str                                   # the ClusterState field its values go to


# (apiVersion, kind) -> how to convert it. Objects of any other (apiVersion, kind) are listed
# as ignored, not rejected.
KINDS: dict[tuple[str, str], Kind] = {
    ("v1", "Namespace"): Kind("Namespace", False, kubernetes.namespace, "namespaces"),
    ("v1", "Node"): Kind("Node", False, kubernetes.node, "nodes"),
    ("v1", "Pod"): Kind("Pod", True, kubernetes.endpoint, "endpoints"),
    ("networking.k8s.io/v1", "NetworkPolicy"): Kind("NetworkPolicy", True, kubernetes.network_policy, "policies"),
}
# Calico's kinds come in two apiVersions: the CRDs' storage form and the v3 API's (same fields).
CALICO_API_VERSIONS = ("crd.projectcalico.org/v1", "projectcalico.org/v3")
for _api in CALICO_API_VERSIONS:
    KINDS[(_api, "IPPool")] = Kind("IPPool", False, ipam.ippool, "ippools")
    KINDS[(_api, "IPAMBlock")] = Kind("IPAMBlock", False, ipam.ipam_block, "blocks")
    KINDS[(_api, "BlockAffinity")] = Kind("BlockAffinity", False, ipam.block_affinity, "blocks")
    KINDS[(_api, "BGPConfiguration")] = Kind("BGPConfiguration", False, bgp.bgp_configuration, "bgp_configurations")
    KINDS[(_api, "BGPPeer")] = Kind("BGPPeer", False, bgp.bgp_peer, "bgp_peers")
KINDS[("v1", "Secret")] = Kind("Secret", True, bgp.secret, "secrets")
KINDS[("v1", "Service")] = Kind("Service", True, services.service, "services")
KINDS[("discovery.k8s.io/v1", "EndpointSlice")] = Kind("EndpointSlice", True, services.endpoint_slice,
                                                       "endpoint_slices")
# The kinds whose objects become endpoints or namespaces: what selectors are evaluated over.
ENDPOINT_KINDS = frozenset(k.name for k in KINDS.values() if k.field in ("endpoints", "namespaces"))


@dataclass(frozen=True)
class Converted:
    """One valid object: where it came from, its identity, and its model value."""
    kind: str
    namespace: str | None
    name: str
    where: str
    label: str
    value: object | None


codec.register(Converted)       # kept in the desired-state cache


def flatten_lists(objects: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """`kind: List` documents (as `kubectl get -o yaml` writes them) stand for their items."""
    for where, raw in objects:
        if isinstance(raw, dict) and isinstance(raw.get("kind"), str) and raw["kind"].endswith("List") \
                and isinstance(raw.get("items"), list):
            yield from ((where, item) for item in raw["items"])
        else:
            yield where, raw


def convert_object(where: str, raw: object, errors: list[ValidationError]) -> Converted | str | None:
    """A Converted for a valid object, "apiVersion/kind" for one weft ignores, None if invalid."""
    if not isinstance(raw, dict):
        errors.append(ValidationError(where, "document", "", f"must be a mapping, got {type(raw).__name__}"))
        return None
    api_version, kind_name = raw.get("apiVersion", "?"), raw.get("kind")
    if not isinstance(kind_name, str) or not kind_name or not isinstance(api_version, str):
        name = raw["metadata"].get("name") if isinstance(raw.get("metadata"), dict) else None
        field, value = ("kind", kind_name) if not isinstance(kind_name, str) or not kind_name else \
            ("apiVersion", api_version)
        problem = "missing" if value is None or value == "" else f"must be a string, got {shown(value)}"
        errors.append(ValidationError(where, f"object {shown(name)}", field, problem))
        return None
    kind = KINDS.get((api_version, kind_name))
    if kind is None:                                    # listed as ignored: keep the listing readable
        listed = f"{api_version}/{kind_name}"
        return listed if len(listed) <= 120 and listed.isprintable() else shown(listed)
    check = Checker(where, raw, errors, kind.namespaced)
    if not isinstance(raw.get("metadata"), dict):
        check.fail("metadata", "missing" if raw.get("metadata") is None else
                   f"must be a mapping, got {shown(raw.get('metadata'))}")
        return None
    if kind.namespaced and (ns_problem := namespace_problem(raw["metadata"].get("namespace"))):
        check.fail("metadata.namespace", ns_problem)
        return None
    before = len(errors)
    value = kind.convert(check, raw)
    if len(errors) != before:
        return None
    return Converted(kind.name, namespace_of(raw) if kind.namespaced else None, raw["metadata"]["name"],
                     where, object_label(raw, kind.namespaced), value)


def assemble(converted: Iterable[Converted], ignored: Iterable[str] = ()) -> ClusterState:
    """The cross-object checks, then the state. `converted` must not name an object twice."""
    items = list(converted)
    fields: dict[str, list[Any]] = {k.field: [] for k in KINDS.values()}
    field_of = {k.name: k.field for k in KINDS.values()}
    for c in items:
        if c.value is not None:
            fields[field_of[c.kind]].append(c.value)
    namespaces = {n: Namespace(n, {kubernetes.NAMESPACE_NAME_LABEL: n}) for n in kubernetes.BUILTIN_NAMESPACES}
    namespaces.update((n.name, n) for n in fields.pop("namespaces"))
    errors = [ValidationError(c.where, c.label, "metadata.namespace", f"namespace {c.namespace!r} does not exist")
              for c in items if c.namespace is not None and c.namespace not in namespaces]
    errors += ipam.check_state(items)          # pools do not overlap, blocks inside pools, one owner each
    if errors:
        raise InvalidDesiredState(errors)
    # A block is often recorded twice (its IPAMBlock and its BlockAffinity): one claim each.
    fields["blocks"] = list({(b.cidr, b.node): b for b in fields["blocks"]}.values())
    return ClusterState(
        namespaces=namespaces,
        nodes={n.name: n for n in fields.pop("nodes")},
        endpoints=tuple(sorted(fields.pop("endpoints"), key=lambda e: (e.namespace, e.pod))),
        policies=tuple(sorted(fields.pop("policies"), key=lambda p: p.key)),
        ignored_kinds=tuple(sorted(set(ignored))),
        **{name: tuple(values) for name, values in fields.items()},  # type: ignore[arg-type]
    )


def build_cluster_state(objects: Iterable[tuple[str, object]]) -> ClusterState:
    """Validate and convert (where, object) pairs; raise InvalidDesiredState listing every problem."""
    errors: list[ValidationError] = []
    converted: dict[tuple, Converted] = {}
    ignored: list[str] = []
    for where, raw in flatten_lists(objects):
        result = convert_object(where, raw, errors)
        if isinstance(result, str):
            ignored.append(result)
        elif result is not None:
            key = (result.kind, result.namespace, result.name)
            if key in converted:
                errors.append(ValidationError(where, result.label, "metadata.name", "defined more than once"))
            converted[key] = result
    if errors:
        raise InvalidDesiredState(errors)
    return assemble(converted.values(), ignored)
