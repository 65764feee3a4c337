"""Raw objects (manifest-shaped dicts, from any source) -> one validated ClusterState.

Two steps, so a source that learns of a few changed objects can redo only those:
  convert_object: one object alone -> its model value (or its problems);
  assemble: the cross-object checks (namespaces exist) and the immutable ClusterState.
A load with any problem raises InvalidDesiredState listing them all; nothing is applied.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from weft.desired.kinds import bgp, calico, calicopolicy, ipam, kubernetes
from weft.desired.validation import Checker, namespace_of, namespace_problem, object_label, shown
from weft.model import codec
from weft.model.cluster import DEFAULT_TIER, ClusterState, Namespace, Policy
from weft.model.errors import InvalidDesiredState, ValidationError


@dataclass(frozen=True)
class Kind:
    name: str                                    # the model's name for it: "Pod", "IPPool", ...
    namespaced: bool
    convert: Callable[[Checker, dict], object]   # -> a model value, or None when it models nothing
    field: str                                   # the ClusterState field its values go to ("": none)
    identity: Callable[[dict], str] | None = None  # its name, when not metadata.name as written
    calico: bool = False                         # a Calico kind: unknown fields are warnings, not errors


# (apiVersion, kind) -> how to convert it. Objects of any other (apiVersion, kind) are listed
# as ignored, not rejected.
KINDS: dict[tuple[str, str], Kind] = {
    ("v1", "Namespace"): Kind("Namespace", False, kubernetes.namespace, "namespaces"),
    ("v1", "Node"): Kind("Node", False, kubernetes.node, "nodes"),
    ("v1", "Pod"): Kind("Pod", True, kubernetes.endpoint, "endpoints"),
    ("v1", "ServiceAccount"): Kind("ServiceAccount", True, calico.service_account, "service_accounts"),
    ("networking.k8s.io/v1", "NetworkPolicy"): Kind("NetworkPolicy", True, kubernetes.network_policy, "policies"),
}
# Calico's kinds come in two apiVersions: the CRDs' storage form and the v3 API's (same fields).
CALICO_API_VERSIONS = ("crd.projectcalico.org/v1", "projectcalico.org/v3")
PREFERRED_CALICO_API = "projectcalico.org/v3"   # served by both groups: the API users write (see assemble)
for _api in CALICO_API_VERSIONS:
    KINDS[(_api, "IPPool")] = Kind("IPPool", False, ipam.ippool, "ippools", calico=True)
    KINDS[(_api, "IPAMBlock")] = Kind("IPAMBlock", False, ipam.ipam_block, "blocks", calico=True)
    KINDS[(_api, "BlockAffinity")] = Kind("BlockAffinity", False, ipam.block_affinity, "blocks", calico=True)
    KINDS[(_api, "BGPConfiguration")] = Kind("BGPConfiguration", False, bgp.bgp_configuration, "bgp_configurations",
                                             calico=True)
    KINDS[(_api, "BGPPeer")] = Kind("BGPPeer", False, bgp.bgp_peer, "bgp_peers", calico=True)
    KINDS[(_api, "GlobalNetworkPolicy")] = Kind("GlobalNetworkPolicy", False, calicopolicy.global_network_policy,
                                                "policies", calicopolicy.policy_name, calico=True)
    # Kubernetes has a NetworkPolicy kind too: the model names Calico's apart.
    KINDS[(_api, "NetworkPolicy")] = Kind("CalicoNetworkPolicy", True, calicopolicy.network_policy, "policies",
                                          calicopolicy.policy_name, calico=True)
    KINDS[(_api, "Tier")] = Kind("Tier", False, calicopolicy.tier, "tiers", calico=True)
    KINDS[(_api, "NetworkSet")] = Kind("NetworkSet", True, calico.network_set, "network_sets", calico=True)
    KINDS[(_api, "GlobalNetworkSet")] = Kind("GlobalNetworkSet", False, calico.global_network_set, "network_sets",
                                             calico=True)
    KINDS[(_api, "HostEndpoint")] = Kind("HostEndpoint", False, calico.host_endpoint, "host_endpoints", calico=True)
    KINDS[(_api, "FelixConfiguration")] = Kind("FelixConfiguration", False, calico.felix_configuration,
                                               "felix_configurations", calico=True)
    # Staged policies preview a change and enforce nothing, in Calico too: accepted, not modelled.
    KINDS[(_api, "StagedGlobalNetworkPolicy")] = Kind("StagedGlobalNetworkPolicy", False, calico.staged_policy, "",
                                                      calico=True)
    KINDS[(_api, "StagedNetworkPolicy")] = Kind("StagedNetworkPolicy", True, calico.staged_policy, "", calico=True)
    KINDS[(_api, "StagedKubernetesNetworkPolicy")] = Kind("StagedKubernetesNetworkPolicy", True,
                                                          calico.staged_policy, "", calico=True)
KINDS[("v1", "Secret")] = Kind("Secret", True, bgp.secret, "secrets")
# The kinds whose objects selectors are evaluated over (what set members are computed from).
SELECTED_FIELDS = ("endpoints", "namespaces", "service_accounts", "network_sets", "host_endpoints")
ENDPOINT_KINDS = frozenset(k.name for k in KINDS.values() if k.field in SELECTED_FIELDS)
POLICY_KINDS = frozenset(k.name for k in KINDS.values() if k.field == "policies")


@dataclass(frozen=True)
class Converted:
    """One valid object: where it came from, its identity, and its model value."""
    kind: str
    namespace: str | None
    name: str
    where: str
    label: str
    value: object | None
    api_version: str = ""
    warnings: tuple[str, ...] = ()              # paths of its fields weft does not use


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
    warnings: list[str] | None = [] if kind.calico else None
    check = Checker(where, raw, errors, kind.namespaced, warnings)
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
    name = kind.identity(raw) if kind.identity else raw["metadata"]["name"]
    return Converted(kind.name, namespace_of(raw) if kind.namespaced else None, name,
                     where, object_label(raw, kind.namespaced), value, api_version, tuple(warnings or ()))


def assemble(converted: Iterable[Converted], ignored: Iterable[str] = ()) -> ClusterState:
    """The cross-object checks, then the state. `converted` must not name an object twice,
    except a Calico object served by both of Calico's API groups (one is kept: see `_one_per_object`)."""
    items = _one_per_object(converted)
    fields: dict[str, list[Any]] = {k.field: [] for k in KINDS.values() if k.field}
    field_of = {k.name: k.field for k in KINDS.values()}
    for c in items:
        if c.value is not None:
            fields[field_of[c.kind]].append(c.value)
    namespaces = {n: Namespace(n, {kubernetes.NAMESPACE_NAME_LABEL: n}) for n in kubernetes.BUILTIN_NAMESPACES}
    namespaces.update((n.name, n) for n in fields.pop("namespaces"))
    tiers = {DEFAULT_TIER.name: DEFAULT_TIER} | {t.name: t for t in fields.pop("tiers")}
    errors = [ValidationError(c.where, c.label, "metadata.namespace", f"namespace {c.namespace!r} does not exist")
              for c in items if c.namespace is not None and c.namespace not in namespaces]
    errors += [ValidationError(c.where, c.label, "spec.tier", f"tier {c.value.tier!r} does not exist: create the "
                                                              f"Tier first")
               for c in items if c.kind in POLICY_KINDS and isinstance(c.value, Policy) and c.value.tier not in tiers]
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
        tiers=tiers,
        network_sets=tuple(sorted(fields.pop("network_sets"), key=lambda s: s.key)),
        host_endpoints=tuple(sorted(fields.pop("host_endpoints"), key=lambda h: h.name)),
        service_accounts=tuple(sorted(fields.pop("service_accounts"), key=lambda a: (a.namespace, a.name))),
        felix_configurations=tuple(sorted(fields.pop("felix_configurations"), key=lambda f: f.name)),
        ignored_kinds=tuple(sorted(set(ignored))),
        warnings=_warnings(items),
        **{name: tuple(values) for name, values in fields.items()},  # type: ignore[arg-type]
    )


def _one_per_object(converted: Iterable[Converted]) -> list[Converted]:
    """Where Calico's API server runs, each Calico object is served twice: as stored
    (crd.projectcalico.org/v1) and through Calico's API (projectcalico.org/v3). They are one
    object: the v3 form is kept (the form users write; the stored name of a default-tier policy
    may carry a "default." prefix, which the kinds' identity already drops)."""
    chosen: dict[tuple, Converted] = {}
    for c in converted:
        key = (c.kind, c.namespace, c.name)
        other = chosen.get(key)
        if other is None or (other.api_version != c.api_version and c.api_version == PREFERRED_CALICO_API):
            chosen[key] = c
    return list(chosen.values())


def _warnings(items: Iterable[Converted]) -> tuple[str, ...]:
    """Each unused field once per kind, whatever the object or list position."""
    found = {f"{c.label.split(' ', 1)[0]}: {_INDEX.sub('[]', w)}" for c in items for w in c.warnings}
    return tuple(sorted(found))


_INDEX = re.compile(r"\[\d+\]")


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
