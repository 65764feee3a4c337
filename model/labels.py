"""The labels Calico gives the things its selectors select, and selectors scoped over them.

Calico evaluates every selector against one label set per selectable thing, made of the
thing's own labels plus labels Calico adds (libcalico-go's Kubernetes conversion):

- a workload endpoint (pod): its namespace's labels as `pcns.<key>` (and `pcns.projectcalico.org/name`:
  the namespace's name), its service account's labels as `pcsa.<key>` (and
  `pcsa.projectcalico.org/name`), then the pod's own labels, then `projectcalico.org/namespace`,
  `projectcalico.org/orchestrator: k8s` and `projectcalico.org/serviceaccount`;
- a namespaced NetworkSet: its namespace's `pcns.*` labels, its own labels, `projectcalico.org/namespace`;
- a GlobalNetworkSet: its own labels; a host endpoint: its profiles' labels, then its own.

Later sources win over earlier ones. So scopes that Calico's resources spell as separate
selectors become ordinary selectors over these labels, which is how Calico itself evaluates
them: a rule's `namespaceSelector` is its text with every key prefixed `pcns.` (`all()` meaning
"any namespaced thing", `global()` "any thing without a namespace"), a `serviceAccounts` match
keys prefixed `pcsa.` and names matched on `projectcalico.org/serviceaccount`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from weft.model.selector import (
    All,
    And,
    Contains,
    EndsWith,
    Eq,
    Expr,
    Global,
    Has,
    In,
    Ne,
    Not,
    NotIn,
    Or,
    StartsWith,
)

NAMESPACE = "projectcalico.org/namespace"
ORCHESTRATOR = "projectcalico.org/orchestrator"
SERVICE_ACCOUNT = "projectcalico.org/serviceaccount"
NAME = "projectcalico.org/name"
NAMESPACE_PREFIX = "pcns."
SERVICE_ACCOUNT_PREFIX = "pcsa."
KUBERNETES = "k8s"
NAMESPACE_PROFILE_PREFIX = "kns."
SERVICE_ACCOUNT_PROFILE_PREFIX = "ksa."
DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"

NAMESPACED = Has(NAMESPACE)
NOT_NAMESPACED = Not(Has(NAMESPACE))


def prefixed(expr: Expr, prefix: str, all_means: Expr | None = None, global_means: Expr | None = None) -> Expr:
    """`expr` with every label key prefixed (Calico's PrefixVisitor); `all()` and `global()`
    replaced where given (they have no key). Raises SelectorError if a prefixed key is too long."""
    def walk(e: Expr) -> Expr:
        if isinstance(e, All):
            return all_means if all_means is not None else e
        if isinstance(e, Global):
            return global_means if global_means is not None else e
        if isinstance(e, Has):
            return Has(prefix + e.key)
        if isinstance(e, Eq | Ne | Contains | StartsWith | EndsWith):
            return type(e)(prefix + e.key, e.value)
        if isinstance(e, In | NotIn):
            return type(e)(prefix + e.key, e.values)
        if isinstance(e, Not):
            return Not(walk(e.operand))
        if isinstance(e, And | Or):
            return type(e)(tuple(walk(op) for op in e.operands))
        raise TypeError(f"unknown selector node {type(e).__name__}")
    return walk(expr).normalize()


def namespace_scope(namespace_selector: Expr) -> Expr:
    """A namespaceSelector (of a rule or a GlobalNetworkPolicy) as a selector over the labels
    of the things it scopes: `pcns.`-prefixed, all() = namespaced, global() = not namespaced."""
    return prefixed(namespace_selector, NAMESPACE_PREFIX, NAMESPACED, NOT_NAMESPACED)


def service_account_scope(names: Iterable[str], selector: Expr | None, all_means: Expr | None = None) -> Expr:
    """A serviceAccounts match (names and selector, ANDed) over endpoint labels."""
    parts: list[Expr] = []
    if selector is not None:
        parts.append(prefixed(selector, SERVICE_ACCOUNT_PREFIX, all_means))
    names = tuple(names)
    if names:
        parts.append(In(SERVICE_ACCOUNT, names))
    return And(tuple(parts)).normalize()


def namespace_profile_labels(name: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a namespace gives the things in it (its kns.<name> profile's labels)."""
    return {**{NAMESPACE_PREFIX + k: v for k, v in labels.items()}, NAMESPACE_PREFIX + NAME: name}


def service_account_profile_labels(name: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a service account gives its pods (its ksa.<namespace>.<name> profile's labels)."""
    return {**{SERVICE_ACCOUNT_PREFIX + k: v for k, v in labels.items()}, SERVICE_ACCOUNT_PREFIX + NAME: name}


def workload_labels(namespace: str, pod_labels: Mapping[str, str], service_account: str | None,
                    namespace_labels: Mapping[str, str], service_account_labels: Mapping[str, str]) -> dict[str, str]:
    """Everything a pod's selectors see, in Calico's order of precedence."""
    labels = namespace_profile_labels(namespace, namespace_labels)
    if service_account:
        labels.update(service_account_profile_labels(service_account, service_account_labels))
    labels.update(pod_labels)
    labels[NAMESPACE] = namespace
    labels[ORCHESTRATOR] = KUBERNETES
    if service_account:
        labels[SERVICE_ACCOUNT] = service_account
    return labels


def network_set_labels(namespace: str | None, own: Mapping[str, str],
                       namespace_labels: Mapping[str, str]) -> dict[str, str]:
    """A NetworkSet's labels (with its namespace's) or a GlobalNetworkSet's (its own only)."""
    if namespace is None:
        return dict(own)
    return {**namespace_profile_labels(namespace, namespace_labels), **own, NAMESPACE: namespace}
