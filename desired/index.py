"""Selection: which workload endpoints, host endpoints and network sets a selector picks.

Calico evaluates selectors over one label set per selectable thing: its own labels plus the
labels Calico adds (model.labels: `projectcalico.org/namespace`, `.../orchestrator`,
`.../serviceaccount`, `pcns.*` from the namespace, `pcsa.*` from the service account). With
10,000 pods and hundreds of selectors, matching every selector against every pod's labels costs
seconds; set algebra over an inverted index costs milliseconds. So workload endpoints are
indexed by their own labels, and the labels Calico adds are answered from the few namespaces
and service accounts (a pod's own label of the same key is shadowed or wins as in Calico):
nothing per pod is copied. Host endpoints and network sets are few; they get a plain index of
their full label sets. Results equal `Expr.matches` on each thing's full labels (`labels_of`,
`host_labels`, `set_labels`), which the tests check.

The public API a renderer calls: `select(expr)` / `match(entity)` (workload positions, as
before), `selected(expr)` (a Selection of all three kinds), `side(entity)` and
`side_not(entity)` (what a rule side's selector and notSelector pick), `named_port_members`,
`policy_endpoints(policy)` and `policy_host_endpoints(policy)`.
"""
from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from weft.model import labels as calico_labels
from weft.model.cluster import ClusterState, Endpoint, EntityMatch, HostEndpoint, NetworkSet, Policy
from weft.model.selector import All, Expr

_NONE: frozenset[int] = frozenset()


class LabelSets:
    """An inverted index of label mappings (positions in `labels`): a model.selector.LabelIndex."""

    def __init__(self, labels: Sequence[Mapping[str, str]]):
        self.labels = labels
        self.universe: frozenset[int] = frozenset(range(len(labels)))
        by_label: dict[tuple[str, str], set[int]] = defaultdict(set)
        by_key: dict[str, set[int]] = defaultdict(set)
        for i, mapping in enumerate(labels):
            for key, value in mapping.items():
                by_label[(key, value)].add(i)
                by_key[key].add(i)
        self._by_label, self._by_key = by_label, by_key
        self.select = lru_cache(maxsize=None)(self._select)

    def _select(self, expr: Expr) -> frozenset[int]:
        normal = expr.normalize()
        return normal.select(self) if normal == expr else self.select(normal)

    def with_label(self, key: str, value: str) -> set[int]:
        return self._by_label.get((key, value), set())

    def with_key(self, key: str) -> set[int]:
        return self._by_key.get(key, set())

    @cached_property
    def _values_by_key(self) -> dict[str, dict[str, set[int]]]:
        values: dict[str, dict[str, set[int]]] = defaultdict(dict)
        for (key, value), positions in self._by_label.items():
            values[key][value] = positions
        return dict(values)

    def label_values(self, key: str) -> dict[str, set[int]]:
        return self._values_by_key.get(key, {})


@dataclass(frozen=True)
class Selection:
    """What a selector picks: workload endpoints (positions in EndpointIndex.endpoints), host
    endpoints and network sets. Their addresses are what a rule matches: workloads' IPs, host
    endpoints' expected IPs (Calico uses no other address of a host endpoint), network sets' nets."""
    endpoints: frozenset[int]
    host_endpoints: tuple[HostEndpoint, ...]
    network_sets: tuple[NetworkSet, ...]

    def nets(self, index: EndpointIndex, version: int | None = None) -> tuple[str, ...]:
        """Every address as a CIDR ("198.18.0.5/32", network sets' nets as they are), sorted,
        of one IP version if given."""
        found = {f"{ip}/{32 if ':' not in ip else 128}" for i in self.endpoints for ip in index.endpoints[i].ips}
        found |= {f"{ip}/{32 if ':' not in ip else 128}" for h in self.host_endpoints for ip in h.expected_ips}
        found |= {net for s in self.network_sets for net in s.nets}
        if version is not None:
            found = {n for n in found if (":" in n) == (version == 6)}
        return tuple(sorted(found, key=lambda n: (ipaddress.ip_network(n).version, ipaddress.ip_network(n))))

    def contains(self, index: EndpointIndex, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return (any(str(ip) in index.endpoints[i].ips for i in self.endpoints)
                or any(str(ip) in h.expected_ips for h in self.host_endpoints)
                or any(ip in ipaddress.ip_network(n) for s in self.network_sets for n in s.nets
                       if ipaddress.ip_network(n).version == ip.version))


class EndpointIndex:
    """Everything a ClusterState's selectors select over, by label.

    Workload endpoints: its model.selector.LabelIndex API (`universe`, `with_label`, `with_key`,
    `label_values`, `select`) works on positions in `endpoints`, with Calico's labels included.
    """

    def __init__(self, state: ClusterState):
        self.state = state
        self.endpoints: tuple[Endpoint, ...] = state.endpoints
        self.universe: frozenset[int] = frozenset(range(len(self.endpoints)))
        by_label: dict[tuple[str, str], set[int]] = defaultdict(set)
        by_key: dict[str, set[int]] = defaultdict(set)
        by_ns: dict[str, set[int]] = defaultdict(set)
        by_sa: dict[tuple[str, str], set[int]] = defaultdict(set)
        for i, ep in enumerate(self.endpoints):
            by_ns[ep.namespace].add(i)
            if ep.service_account:
                by_sa[(ep.namespace, ep.service_account)].add(i)
            for key, value in ep.labels.items():
                by_label[(key, value)].add(i)
                by_key[key].add(i)
        self._by_label, self._by_key, self._by_ns, self._by_sa = by_label, by_key, by_ns, by_sa
        self.select = lru_cache(maxsize=None)(self._select)
        self.match = lru_cache(maxsize=None)(self._match)
        self.side = lru_cache(maxsize=None)(self._side)
        self.side_not = lru_cache(maxsize=None)(self._side_not)
        self.selected = lru_cache(maxsize=None)(self._selected)

    # --- the labels Calico adds, per namespace and service account ----------------------------

    @cached_property
    def _namespace_labels(self) -> dict[str, dict[str, str]]:
        """namespace -> the `pcns.*` labels it gives what is in it (any namespace endpoints are in)."""
        names = set(self.state.namespaces) | set(self._by_ns) | {s.namespace for s in self.state.network_sets
                                                                  if s.namespace}
        return {n: calico_labels.namespace_profile_labels(n, self.state.namespaces[n].labels
                                                          if n in self.state.namespaces else {}) for n in names}

    @cached_property
    def _service_account_labels(self) -> dict[tuple[str, str], dict[str, str]]:
        """(namespace, name) -> the `pcsa.*` labels of a service account pods run as. A pod can
        only run as an existing one, so one missing from the desired state has no labels of its own."""
        known = {(a.namespace, a.name): a.labels for a in self.state.service_accounts}
        return {key: calico_labels.service_account_profile_labels(key[1], known.get(key, {})) for key in self._by_sa}

    def labels_of(self, position: int) -> dict[str, str]:
        """The full label set Calico gives workload endpoint `position`."""
        ep = self.endpoints[position]
        ns = self.state.namespaces.get(ep.namespace)
        sa = next((a for a in self.state.service_accounts
                   if a.namespace == ep.namespace and a.name == ep.service_account), None)
        return calico_labels.workload_labels(ep.namespace, ep.labels, ep.service_account,
                                             ns.labels if ns else {}, sa.labels if sa else {})

    def _profile_groups(self, key: str) -> list[tuple[Mapping[str, str], set[int]]]:
        """For a `pcns.`/`pcsa.` key: (profile labels, the endpoints that have them)."""
        if key.startswith(calico_labels.NAMESPACE_PREFIX):
            return [(self._namespace_labels[n], eps) for n, eps in self._by_ns.items()]
        if key.startswith(calico_labels.SERVICE_ACCOUNT_PREFIX):
            return [(self._service_account_labels[k], eps) for k, eps in self._by_sa.items()]
        return []

    def with_label(self, key: str, value: str) -> set[int] | frozenset[int]:
        if key == calico_labels.NAMESPACE:
            return self._by_ns.get(value, set())
        if key == calico_labels.ORCHESTRATOR:
            return self.universe if value == calico_labels.KUBERNETES else _NONE
        if key == calico_labels.SERVICE_ACCOUNT:          # set where the pod has one, else the pod's own
            return set().union(*(eps for (_ns, sa), eps in self._by_sa.items() if sa == value)) | \
                (self._by_label.get((key, value), set()) - self._with_account)
        own = self._by_label.get((key, value), set())
        groups = self._profile_groups(key)
        if not groups:
            return own
        inherited = set().union(*(eps for labels, eps in groups if labels.get(key) == value))
        return (inherited - self._by_key.get(key, set())) | own        # the pod's own label wins

    def with_key(self, key: str) -> set[int] | frozenset[int]:
        if key in (calico_labels.NAMESPACE, calico_labels.ORCHESTRATOR):
            return self.universe
        if key == calico_labels.SERVICE_ACCOUNT:
            return self._with_account | self._by_key.get(key, set())
        own = self._by_key.get(key, set())
        groups = self._profile_groups(key)
        return own | set().union(*(eps for labels, eps in groups if key in labels)) if groups else own

    def label_values(self, key: str) -> dict[str, set[int]]:
        """value -> endpoints for one label key: what `contains` / `starts with` / `ends with`
        scan, so their cost is the number of distinct values, not of endpoints."""
        if key == calico_labels.NAMESPACE:
            return dict(self._by_ns)
        if key == calico_labels.ORCHESTRATOR:
            return {calico_labels.KUBERNETES: set(self.universe)} if self.endpoints else {}
        values: dict[str, set[int]] = defaultdict(set)
        if key == calico_labels.SERVICE_ACCOUNT:
            for (_ns, sa), eps in self._by_sa.items():
                values[sa] |= eps
            for value, eps in self._own_values.get(key, {}).items():
                values[value] |= eps - self._with_account
            return {v: eps for v, eps in values.items() if eps}
        own = self._own_values.get(key, {})
        for value, eps in own.items():
            values[value] |= eps
        shadowed = self._by_key.get(key, set())
        for labels, eps in self._profile_groups(key):
            if key in labels:
                values[labels[key]] |= eps - shadowed
        return {v: eps for v, eps in values.items() if eps}

    @cached_property
    def _with_account(self) -> set[int]:
        return set().union(*self._by_sa.values())

    @cached_property
    def _own_values(self) -> dict[str, dict[str, set[int]]]:
        values: dict[str, dict[str, set[int]]] = defaultdict(dict)
        for (key, value), positions in self._by_label.items():
            values[key][value] = positions
        return dict(values)

    def in_namespaces(self, namespaces: Iterable[str]) -> frozenset[int]:
        return frozenset().union(*(self._by_ns.get(n, ()) for n in namespaces))

    def _select(self, expr: Expr) -> frozenset[int]:
        """Workload endpoints matching a selector expression; equivalent spellings share one
        cache entry because the normal form is what gets evaluated."""
        normal = expr.normalize()
        return normal.select(self) if normal == expr else self.select(normal)

    # --- host endpoints and network sets ------------------------------------------------------

    def host_labels(self, host: HostEndpoint) -> dict[str, str]:
        """A host endpoint's labels: its profiles' (Calico's kns./ksa. profiles carry the
        namespace's or service account's labels; projectcalico-default-allow none), then its own."""
        merged: dict[str, str] = {}
        accounts = {(a.namespace, a.name): a for a in self.state.service_accounts}
        for profile in host.profiles:
            if profile.startswith(calico_labels.NAMESPACE_PROFILE_PREFIX):
                ns = profile[len(calico_labels.NAMESPACE_PROFILE_PREFIX):]
                if ns in self.state.namespaces:
                    merged.update(calico_labels.namespace_profile_labels(ns, self.state.namespaces[ns].labels))
            elif profile.startswith(calico_labels.SERVICE_ACCOUNT_PROFILE_PREFIX):
                ns, _, name = profile[len(calico_labels.SERVICE_ACCOUNT_PROFILE_PREFIX):].partition(".")
                if (ns, name) in accounts:
                    merged.update(calico_labels.service_account_profile_labels(name, accounts[(ns, name)].labels))
        merged.update(host.labels)
        return merged

    def set_labels(self, network_set: NetworkSet) -> dict[str, str]:
        ns = network_set.namespace
        ns_labels = self.state.namespaces[ns].labels if ns is not None and ns in self.state.namespaces else {}
        return calico_labels.network_set_labels(ns, network_set.labels, ns_labels)

    @cached_property
    def _hosts(self) -> LabelSets:
        return LabelSets([self.host_labels(h) for h in self.state.host_endpoints])

    @cached_property
    def _sets(self) -> LabelSets:
        return LabelSets([self.set_labels(s) for s in self.state.network_sets])

    # --- what a selector, a rule side, a policy selects ---------------------------------------

    def _selected(self, expr: Expr) -> Selection:
        hosts, sets = self.state.host_endpoints, self.state.network_sets
        return Selection(self.select(expr),
                         tuple(hosts[i] for i in sorted(self._hosts.select(expr))) if hosts else (),
                         tuple(sets[i] for i in sorted(self._sets.select(expr))) if sets else ())

    def _match(self, entity: EntityMatch) -> frozenset[int]:
        """Workload endpoints satisfying the endpoint constraint of `entity` (all when it has none)."""
        selector = entity.endpoint_selector()
        return self.universe if selector is None else self.select(selector)

    def _side(self, entity: EntityMatch) -> Selection | None:
        """What a rule side's positive endpoint constraint selects; None when it has none (the
        side matches any address)."""
        selector = entity.endpoint_selector()
        return None if selector is None else self.selected(selector)

    def _side_not(self, entity: EntityMatch) -> Selection | None:
        """What a rule side's notSelector selects (not confined to a namespace, as in Calico)."""
        return None if entity.not_selector is None else self.selected(entity.not_selector)

    def named_port_members(self, entity: EntityMatch, port_name: str,
                           protocol: str | None) -> frozenset[tuple[str, str, int]]:
        """(address, protocol, port) of the workload and host endpoints a rule side's positive
        selector picks (all, without one, as Felix resolves named ports) that have a port of
        that name (and protocol, when the rule has one)."""
        selection = self.side(entity) or self.selected(All())
        members = set()
        for i in selection.endpoints:
            ep = self.endpoints[i]
            members |= {(ip, p.protocol, p.port) for p in ep.ports for ip in ep.ips
                        if p.name == port_name and protocol in (None, p.protocol)}
        for h in selection.host_endpoints:
            members |= {(ip, p.protocol, p.port) for p in h.ports for ip in h.expected_ips
                        if p.name == port_name and protocol in (None, p.protocol)}
        return frozenset(members)

    def policy_endpoints(self, policy: Policy) -> frozenset[int]:
        """The workload endpoints `policy` applies to."""
        return self.select(policy.endpoint_selector())

    def policy_host_endpoints(self, policy: Policy) -> tuple[HostEndpoint, ...]:
        """The host endpoints `policy` applies to (only global policies select any)."""
        if policy.namespace is not None or not self.state.host_endpoints:
            return ()
        return self.selected(policy.endpoint_selector()).host_endpoints
