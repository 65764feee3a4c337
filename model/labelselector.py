"""Label selectors: a conjunction of requirements, printed in Calico's selector syntax.

Kubernetes label selectors (matchLabels + matchExpressions) are exactly a conjunction of
In / NotIn / Exists / DoesNotExist requirements; Calico's selector strings are a superset.
The canonical text identifies a selector: two selectors with the same text select the same
endpoints, so they share one ipset.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from weft.model import codec

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: str                   # one of OPERATORS
    values: tuple[str, ...] = ()    # sorted, for In / NotIn

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels

    def canonical(self) -> str:
        quoted = ", ".join(f"'{v}'" for v in self.values)
        if self.operator == "In":
            return f"{self.key} == '{self.values[0]}'" if len(self.values) == 1 else f"{self.key} in {{{quoted}}}"
        if self.operator == "NotIn":
            return f"{self.key} != '{self.values[0]}'" if len(self.values) == 1 else f"{self.key} not in {{{quoted}}}"
        if self.operator == "Exists":
            return f"has({self.key})"
        return f"!has({self.key})"


@dataclass(frozen=True)
class Selector:
    """All requirements must hold; no requirements selects everything (Calico's `all()`)."""
    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def of(cls, requirements) -> Selector:
        return cls(tuple(sorted(set(requirements))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def canonical(self) -> str:
        return " && ".join(r.canonical() for r in self.requirements) or "all()"

    def __str__(self) -> str:
        return self.canonical()


ALL = Selector()


codec.register_module(globals())   # these types may be kept in the desired-state cache
