"""Calico's selector expression language, parsed into a small AST.

Calico policies select endpoints with expressions such as
`role == 'db' && (env in {'prod', 'staging'} || !has(canary))`. It is weft's one selector
model: Kubernetes label selectors (matchLabels + matchExpressions, a conjunction of In / NotIn /
Exists / DoesNotExist) are converted to this AST when they are loaded (desired.kinds.kubernetes),
so policies, pools and peers are all evaluated, and their ipsets named, alike.

The syntax follows Calico's tokenizer and parser:

* match operators: `all()`, `global()`, `has(k)`, `k == 'v'`, `k != 'v'`, `k in {'a', 'b'}`,
  `k not in {...}`, `k contains 's'`, `k starts with 's'`, `k ends with 's'`;
* `!` (binds to one operation; `!!x` is `x`), then `&&`, then `||`; parentheses group;
* labels are `[A-Za-z0-9_./-]{1,512}`; strings are in single or double quotes, with no escapes
  (so a value holding both quote characters cannot be written);
* whitespace is spaces and tabs only; keywords need a word boundary after them, and
  `not in` / `starts with` / `ends with` may be written without the space, as Calico allows;
* `in {}` is valid (matches nothing) and a trailing comma in a set is accepted, as in Calico;
* `""` selects everything, like `all()`.

Absent labels: `!=` and `not in` match endpoints without the label; `==`, `in`, `contains`,
`starts with` and `ends with` do not.

`global()` matches every label set, as Calico's evaluator does: its meaning, "non-namespaced
resources", belongs to the namespaceSelector that contains it, which the policy converter
must handle (weft's endpoints are all pods, so there it selects none of them).

Every AST node is a frozen, hashable dataclass with `matches(labels)`, `select(index)` (set
algebra over a `LabelIndex`, such as desired.index.EndpointIndex), `normalize()` and `canonical()`. `parse_selector`
returns the normal form, so equivalent spellings (whitespace, quotes, operand order, nesting,
`in {'v'}` vs `== 'v'`, double negation, `!(k == 'v')` vs `k != 'v'`) give equal ASTs and one
canonical text, hence one ipset. Normalisation is syntactic: it does not decide arbitrary
boolean equivalence. The canonical text of a Kubernetes selector is the one weft has always
written for it ("app == 'web' && tier in {'a', 'b'} && !has(canary)": requirements in order of
key, then operator), so converted selectors keep their ipset names.
"""
from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn, Protocol

from weft.model import codec


class LabelIndex(Protocol):
    """What `Expr.select` needs of an index of labelled things (desired.index.EndpointIndex is
    one): positions of the things, by label, as sets. `select` evaluates a sub-expression (an
    index may cache it); `Expr.select` is how an index evaluates one without caching."""
    universe: frozenset[int]

    def with_label(self, key: str, value: str) -> frozenset[int] | set[int]: ...

    def with_key(self, key: str) -> frozenset[int] | set[int]: ...

    def label_values(self, key: str) -> Mapping[str, set[int]]: ...

    def select(self, expr: Expr) -> frozenset[int]: ...


MAX_LABEL_LENGTH = 512
MAX_NESTING = 64                     # parentheses; Calico has no limit, no real selector comes close
_LABEL = re.compile(r"[A-Za-z0-9_./-]+")
_BOUNDARY = r"(?![A-Za-z0-9_./-])"
_OPERATOR = re.compile(
    r"==|!=|(?:contains|starts[ \t]*with|ends[ \t]*with|not[ \t]*in|in)" + _BOUNDARY)
_WS = " \t"


class SelectorError(ValueError):
    """A selector that cannot be parsed (or a node that cannot be written as Calico text)."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80


def _shown(value: object) -> str:
    """`value` as a message shows it: cut to a readable length (a selector may be megabytes)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int of more digits than Python will print
        return f"<a {type(value).__name__} too large to show>"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _LABEL.fullmatch(key) or len(key) > MAX_LABEL_LENGTH:
        raise SelectorError(f"invalid label key {_shown(key)}: "
                            f"must be 1-{MAX_LABEL_LENGTH} characters of A-Za-z0-9_./-")


def _check_value(value: str) -> None:
    if not isinstance(value, str):
        raise SelectorError(f"label value {_shown(value)} is not a string")
    if "'" in value and '"' in value:
        raise SelectorError(f"value {_shown(value)} has both quote characters and cannot be written in a selector")


def _quote(value: str) -> str:
    """Single quotes, as weft has always written selectors, unless the value holds one."""
    return f'"{value}"' if "'" in value else f"'{value}'"


class Expr:
    """Base of the AST nodes: a boolean function of an endpoint's labels."""
    __slots__ = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        raise NotImplementedError

    def select(self, index: LabelIndex) -> frozenset[int]:
        """Positions in `index.endpoints` this expression matches, by set algebra on the index."""
        raise NotImplementedError

    def normalize(self) -> Expr:
        """An equal-meaning node in normal form; equivalent spellings normalise to equal nodes."""
        return self

    def canonical(self) -> str:
        """The normal form's text: the identity of what the expression selects (e.g. for ipset names)."""
        return self.normalize()._text()

    def __str__(self) -> str:
        return self.canonical()

    def _text(self) -> str:
        raise NotImplementedError

    def _sort_key(self) -> tuple:
        """Order of operands in && and ||: the atoms a Kubernetes selector is made of come first,
        by (key, operator, values) as weft ordered Kubernetes requirements (so a converted
        selector keeps its canonical text, hence its ipset name); then everything else by text."""
        return (1, self._text())


# --- match operators ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class All(Expr):
    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def select(self, index: LabelIndex) -> frozenset[int]:
        return index.universe

    def _text(self) -> str:
        return "all()"


@dataclass(frozen=True, slots=True)
class Global(Expr):
    """`global()`: every label set matches; see the module docstring for where it means more."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def select(self, index: LabelIndex) -> frozenset[int]:
        return index.universe

    def _text(self) -> str:
        return "global()"


@dataclass(frozen=True, slots=True)
class Has(Expr):
    key: str

    def __post_init__(self):
        _check_key(self.key)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def select(self, index: LabelIndex) -> frozenset[int]:
        return frozenset(index.with_key(self.key))

    def _text(self) -> str:
        return f"has({self.key})"

    def _sort_key(self) -> tuple:
        return (0, self.key, "Exists", ())


@dataclass(frozen=True, slots=True)
class Eq(Expr):
    key: str
    value: str

    def __post_init__(self):
        _check_key(self.key)
        _check_value(self.value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) == self.value

    def select(self, index: LabelIndex) -> frozenset[int]:
        return frozenset(index.with_label(self.key, self.value))

    def _text(self) -> str:
        return f"{self.key} == {_quote(self.value)}"

    def _sort_key(self) -> tuple:
        return (0, self.key, "In", (self.value,))


@dataclass(frozen=True, slots=True)
class Ne(Expr):
    """`k != 'v'`: also matches endpoints without label k (Calico's semantics)."""
    key: str
    value: str

    def __post_init__(self):
        _check_key(self.key)
        _check_value(self.value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) != self.value

    def select(self, index: LabelIndex) -> frozenset[int]:
        return index.universe - index.with_label(self.key, self.value)

    def _text(self) -> str:
        return f"{self.key} != {_quote(self.value)}"

    def _sort_key(self) -> tuple:
        return (0, self.key, "NotIn", (self.value,))


def _value_tuple(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise SelectorError(f"values must be a collection of strings, not the string {_shown(values)}")
    values = tuple(sorted(set(values)))
    for v in values:
        _check_value(v)
    return values


@dataclass(frozen=True, slots=True)
class In(Expr):
    """`k in {...}`; values are stored sorted and deduplicated, so set order never matters."""
    key: str
    values: tuple[str, ...]

    def __post_init__(self):
        _check_key(self.key)
        object.__setattr__(self, "values", _value_tuple(self.values))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) in self.values

    def select(self, index: LabelIndex) -> frozenset[int]:
        return frozenset().union(*(index.with_label(self.key, v) for v in self.values))

    def normalize(self) -> Expr:
        return Eq(self.key, self.values[0]) if len(self.values) == 1 else self

    def _text(self) -> str:
        return f"{self.key} in {{{', '.join(_quote(v) for v in self.values)}}}"

    def _sort_key(self) -> tuple:
        return (0, self.key, "In", self.values)


@dataclass(frozen=True, slots=True)
class NotIn(Expr):
    """`k not in {...}`: also matches endpoints without label k (Calico's semantics)."""
    key: str
    values: tuple[str, ...]

    def __post_init__(self):
        _check_key(self.key)
        object.__setattr__(self, "values", _value_tuple(self.values))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) not in self.values

    def select(self, index: LabelIndex) -> frozenset[int]:
        return index.universe - In(self.key, self.values).select(index)

    def normalize(self) -> Expr:
        return Ne(self.key, self.values[0]) if len(self.values) == 1 else self

    def _text(self) -> str:
        return f"{self.key} not in {{{', '.join(_quote(v) for v in self.values)}}}"

    def _sort_key(self) -> tuple:
        return (0, self.key, "NotIn", self.values)


@dataclass(frozen=True, slots=True)
class _StringMatch(Expr):
    """A test on the value of label k; false when k is absent. Selected by scanning the
    distinct values of k in the index, not the endpoints."""
    key: str
    value: str

    def __post_init__(self):
        _check_key(self.key)
        _check_value(self.value)

    def _test(self, actual: str) -> bool:
        raise NotImplementedError

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        return actual is not None and self._test(actual)

    def select(self, index: LabelIndex) -> frozenset[int]:
        values = index.label_values(self.key)
        return frozenset().union(*(eps for v, eps in values.items() if self._test(v)))


@dataclass(frozen=True, slots=True)
class Contains(_StringMatch):
    def _test(self, actual: str) -> bool:
        return self.value in actual

    def _text(self) -> str:
        return f"{self.key} contains {_quote(self.value)}"


@dataclass(frozen=True, slots=True)
class StartsWith(_StringMatch):
    def _test(self, actual: str) -> bool:
        return actual.startswith(self.value)

    def _text(self) -> str:
        return f"{self.key} starts with {_quote(self.value)}"


@dataclass(frozen=True, slots=True)
class EndsWith(_StringMatch):
    def _test(self, actual: str) -> bool:
        return actual.endswith(self.value)

    def _text(self) -> str:
        return f"{self.key} ends with {_quote(self.value)}"


# --- boolean operators ----------------------------------------------------------------------



@dataclass(frozen=True, slots=True)
class Not(Expr):
    operand: Expr

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def select(self, index: LabelIndex) -> frozenset[int]:
        return index.universe - index.select(self.operand)

    def normalize(self) -> Expr:
        inner = self.operand.normalize()
        if isinstance(inner, Not):
            return inner.operand
        # An absent label: !(k == v) holds, as k != v does; so each of these has its complement.
        if isinstance(inner, Eq):
            return Ne(inner.key, inner.value)
        if isinstance(inner, Ne):
            return Eq(inner.key, inner.value)
        if isinstance(inner, In):
            return NotIn(inner.key, inner.values)
        if isinstance(inner, NotIn):
            return In(inner.key, inner.values)
        return Not(inner)

    def _text(self) -> str:
        inner = self.operand._text()
        return f"!({inner})" if isinstance(self.operand, And | Or) else f"!{inner}"

    def _sort_key(self) -> tuple:
        if isinstance(self.operand, Has):
            return (0, self.operand.key, "DoesNotExist", ())
        return (1, self._text())


NOTHING = Not(All())
"""`!all()`: the normal form of an expression that can match no labels at all (e.g. `||` of nothing)."""


def _sorted_unique(operands: Iterable[Expr]) -> tuple[Expr, ...]:
    return tuple(sorted(set(operands), key=lambda e: e._sort_key()))


@dataclass(frozen=True, slots=True)
class And(Expr):
    operands: tuple[Expr, ...]

    def __post_init__(self):
        object.__setattr__(self, "operands", tuple(self.operands))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(op.matches(labels) for op in self.operands)

    def select(self, index: LabelIndex) -> frozenset[int]:
        result = index.universe
        for op in self.operands:
            result = result & index.select(op)
            if not result:
                break
        return result

    def normalize(self) -> Expr:
        flat: list[Expr] = []
        for op in self.operands:
            op = op.normalize()
            if op == NOTHING:
                return NOTHING
            if isinstance(op, And):
                flat.extend(op.operands)
            elif not isinstance(op, All):
                flat.append(op)
        ops = _sorted_unique(flat)
        return All() if not ops else ops[0] if len(ops) == 1 else And(ops)

    def _text(self) -> str:
        return " && ".join(f"({op._text()})" if isinstance(op, Or) else op._text() for op in self.operands)


@dataclass(frozen=True, slots=True)
class Or(Expr):
    operands: tuple[Expr, ...]

    def __post_init__(self):
        object.__setattr__(self, "operands", tuple(self.operands))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return any(op.matches(labels) for op in self.operands)

    def select(self, index: LabelIndex) -> frozenset[int]:
        return frozenset().union(*(index.select(op) for op in self.operands))

    def normalize(self) -> Expr:
        flat: list[Expr] = []
        for op in self.operands:
            op = op.normalize()
            if isinstance(op, All):
                return All()
            if isinstance(op, Or):
                flat.extend(op.operands)
            elif op != NOTHING:
                flat.append(op)
        ops = _sorted_unique(flat)
        return NOTHING if not ops else ops[0] if len(ops) == 1 else Or(ops)

    def _text(self) -> str:
        return " || ".join(op._text() for op in self.operands)


# --- parser ---------------------------------------------------------------------------------

_BINARY: dict[str, Callable[[str, str], Expr]] = {
    "==": Eq, "!=": Ne, "contains": Contains, "startswith": StartsWith, "endswith": EndsWith}


class _Parser:
    """Recursive descent straight over the text: or := and ('||' and)*; and := unary ('&&' unary)*;
    unary := '!'* primary; primary := '(' or ')' | has(k) | all() | global() | k op operand."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0                      # open parentheses: bounded, the descent is recursive

    def fail(self, message: str, pos: int | None = None) -> NoReturn:
        pos = self.pos if pos is None else pos
        found = repr(self.text[pos:pos + 12]) if pos < len(self.text) else "end of selector"
        raise SelectorError(f"{message} at column {pos + 1} (found {found}) in selector {_shown(self.text)}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def take(self, literal: str) -> bool:
        self.skip()
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        if not self.take(literal):
            self.fail(f"expected {literal!r}")

    def parse(self) -> Expr:
        self.skip()
        if self.pos == len(self.text):
            return All()
        expr = self.parse_or()
        self.skip()
        if self.text.startswith(")", self.pos):
            self.fail("unmatched ')'")
        if self.text.startswith(("&", "|"), self.pos):
            self.fail("expected '&&' or '||'")
        if self.pos != len(self.text):
            self.fail("unexpected text after a complete expression")
        return expr

    def parse_or(self) -> Expr:
        operands = [self.parse_and()]
        while self.take("||"):
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self) -> Expr:
        operands = [self.parse_unary()]
        while self.take("&&"):
            operands.append(self.parse_unary())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_unary(self) -> Expr:
        """Leading '!'s collapse to their parity, as in Calico (and a long run of them builds
        no deep tree)."""
        negated = False
        self.skip()
        while self.text.startswith("!", self.pos) and not self.text.startswith("!=", self.pos):
            negated = not negated
            self.pos += 1
            self.skip()
        expr = self.parse_primary()
        return Not(expr) if negated else expr

    def parse_primary(self) -> Expr:
        self.skip()
        if self.take("("):
            if self.depth == MAX_NESTING:
                self.fail(f"parentheses nested deeper than {MAX_NESTING}", self.pos - 1)
            self.depth += 1
            expr = self.parse_or()
            self.expect(")")
            self.depth -= 1
            return expr
        for name, constant in (("all(", All()), ("global(", Global())):
            if self.text.startswith(name, self.pos):
                self.pos += len(name)
                self.expect(")")
                return constant
        if self.text.startswith("has(", self.pos):
            self.pos += len("has(")
            self.skip()
            key = self.label()
            self.expect(")")
            return Has(key)
        if not _LABEL.match(self.text, self.pos):
            self.fail("expected a label, has(), all(), global(), '!' or '('")
        key = self.label()
        self.skip()
        op = _OPERATOR.match(self.text, self.pos)
        if op is None:
            self.fail("expected an operator (==, !=, in, not in, contains, starts/ends with) "
                      f"after label {_shown(key)}")
        self.pos = op.end()
        word = op.group().replace(" ", "").replace("\t", "")
        if word in ("in", "notin"):
            values = self.string_set()
            return In(key, values) if word == "in" else NotIn(key, values)
        return _BINARY[word](key, self.string())

    def label(self) -> str:
        match = _LABEL.match(self.text, self.pos)
        if match is None:
            self.fail("expected a label")
        if len(match.group()) > MAX_LABEL_LENGTH:
            self.fail(f"label longer than {MAX_LABEL_LENGTH} characters")
        self.pos = match.end()
        return match.group()

    def string(self) -> str:
        self.skip()
        quote = self.text[self.pos:self.pos + 1]
        if quote not in ("'", '"'):
            self.fail("expected a quoted string")
        end = self.text.find(quote, self.pos + 1)
        if end < 0:
            self.fail("unterminated string")
        value = self.text[self.pos + 1:end]
        self.pos = end + 1
        return value

    def string_set(self) -> tuple[str, ...]:
        """`{ 'a', "b" }`; empty, and a trailing comma, are accepted as Calico does."""
        self.expect("{")
        values = []
        while True:
            self.skip()
            if self.text[self.pos:self.pos + 1] not in ("'", '"'):
                break
            values.append(self.string())
            if not self.take(","):
                break
        self.expect("}")
        return tuple(values)


def parse_selector(text: str) -> Expr:
    """Parse Calico selector text into its normal-form AST; "" and "all()" select everything.

    Raises SelectorError naming what was expected and the (1-based) column.
    """
    if not isinstance(text, str):
        raise SelectorError(f"a selector must be a string, not {type(text).__name__}")
    return _Parser(text).parse().normalize()


codec.register_module(globals())   # these types may be kept in the desired-state cache
