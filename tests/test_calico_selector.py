"""Calico selector expressions: parsing, semantics, canonical text, and index evaluation.

The index must agree with brute-force `matches` on every endpoint, and the canonical text
must name an expression's meaning: equivalent spellings share it, and it parses back to the
same AST. Both are checked on random expressions, label sets and spellings.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.desired.index import EndpointIndex
from weft.model.cluster import ClusterState, Endpoint, Namespace
from weft.model.labelselector import Requirement, Selector
from weft.model.selector import (
    NOTHING,
    All,
    And,
    Contains,
    EndsWith,
    Eq,
    Global,
    Has,
    In,
    Ne,
    Not,
    NotIn,
    Or,
    SelectorError,
    StartsWith,
    as_expr,
    parse_selector,
)

# --- parsing every construct ----------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("", All()),
    ("   ", All()),
    ("all()", All()),
    ("all( )", All()),
    ("global()", Global()),
    ("has(app)", Has("app")),
    ("has( app.kubernetes.io/name )", Has("app.kubernetes.io/name")),
    ("!has(app)", Not(Has("app"))),
    ("k == 'v'", Eq("k", "v")),
    ('k == "v"', Eq("k", "v")),
    ("k=='v'", Eq("k", "v")),
    ("k == ''", Eq("k", "")),
    ("k != 'v'", Ne("k", "v")),
    ("k in { 'a', 'b' }", In("k", ("a", "b"))),
    ("k in {'b',\"a\",'b'}", In("k", ("a", "b"))),
    ("k in {}", In("k", ())),
    ("k in {'a', 'b',}", In("k", ("a", "b"))),
    ("k in{'a','b'}", In("k", ("a", "b"))),
    ("k not in { 'a', 'b' }", NotIn("k", ("a", "b"))),
    ("k notin {'a', 'b'}", NotIn("k", ("a", "b"))),
    ("k not in {}", NotIn("k", ())),
    ("k contains 's'", Contains("k", "s")),
    ("k starts with 's'", StartsWith("k", "s")),
    ("k startswith 's'", StartsWith("k", "s")),
    ("k ends with 's'", EndsWith("k", "s")),
    ("k\tends \t with\t's'", EndsWith("k", "s")),
    ("a-b_c.d/e == 'x'", Eq("a-b_c.d/e", "x")),
    ("projectcalico.org/name == 'default'", Eq("projectcalico.org/name", "default")),
    ("k == \"it's\"", Eq("k", "it's")),
    ("k == 'say \"hi\"'", Eq("k", 'say "hi"')),
    ("has == 'x'", Eq("has", "x")),          # keywords are only keywords where they fit
    ("in in {'in'}", Eq("in", "in")),
    ("contains contains 'contains'", Contains("contains", "contains")),
    ("a == 'x' && b == 'y'", And((Eq("a", "x"), Eq("b", "y")))),
    ("a == 'x' || b == 'y'", Or((Eq("a", "x"), Eq("b", "y")))),
    ("((a == 'x'))", Eq("a", "x")),
])
def test_parses_each_construct(text, expected):
    assert parse_selector(text) == expected


@pytest.mark.parametrize("text, message, column", [
    ("(a == 'x'", "expected ')'", 10),
    ("((a == 'x') || has(b)", "expected ')'", 22),
    ("a == 'x')", "unmatched ')'", 9),
    ("a = 'x'", "expected an operator", 3),
    ("a === 'x'", "expected a quoted string", 5),
    ("a <> 'x'", "expected an operator", 3),
    ("a is 'x'", "expected an operator", 3),
    ("a inn {'x'}", "expected an operator", 3),
    ("a == 'x", "unterminated string", 6),
    ('a in {"x}', "unterminated string", 7),
    ("a == 'x' b == 'y'", "unexpected text", 10),
    ("a == 'x' & b == 'y'", "expected '&&' or '||'", 10),
    ("a == 'x' ||", "expected a label", 12),
    ("&& a == 'x'", "expected a label", 1),
    ("a == b", "expected a quoted string", 6),
    ("a in ('x')", "expected '{'", 6),
    ("a in {'x' 'y'}", "expected '}'", 11),
    ("a in {,}", "expected '}'", 7),
    ("has()", "expected a label", 5),
    ("has(a", "expected ')'", 6),
    ("has (a)", "expected an operator", 5),
    ("all(x)", "expected ')'", 5),
    ("!= 'x'", "expected a label", 1),
    ("!", "expected a label", 2),
    ("()", "expected a label", 2),
    ("a == 'x'\n", "unexpected text", 9),        # Calico's whitespace is spaces and tabs
    ("k" * 513 + " == 'x'", "longer than 512", 1),
])
def test_errors_say_what_and_where(text, message, column):
    with pytest.raises(SelectorError) as err:
        parse_selector(text)
    assert message in str(err.value)
    assert f"at column {column} " in str(err.value)


def test_selector_error_is_a_value_error():
    assert issubclass(SelectorError, ValueError)


@pytest.mark.parametrize("bad", [lambda: Has(""), lambda: Has("a b"), lambda: Eq("k", "'\""), lambda: In("k", "ab")])
def test_nodes_refuse_what_cannot_be_written(bad):
    with pytest.raises(SelectorError):
        bad()


# --- precedence and semantics ---------------------------------------------------------------

def test_precedence_not_over_and_over_or():
    assert parse_selector("!has(a) && has(b) || has(c)") == parse_selector("((!has(a)) && has(b)) || has(c)")
    assert parse_selector("has(c) || !has(a) && has(b)") == Or((Has("c"), And((Not(Has("a")), Has("b")))))
    assert parse_selector("!(has(a) && has(b))") == Not(And((Has("a"), Has("b"))))
    assert parse_selector("!a == 'x' && has(b)") == And((Ne("a", "x"), Has("b")))


def test_calico_documented_example():
    """The bracketing example from Calico's selector reference."""
    e = parse_selector("! has(my-label) || my-label starts with 'prod' && role in {'frontend','business'}")
    assert e.matches({})
    assert e.matches({"my-label": "prod-1", "role": "business"})
    assert not e.matches({"my-label": "prod-1", "role": "db"})
    assert not e.matches({"my-label": "dev", "role": "frontend"})


@pytest.mark.parametrize("text, absent, other, same", [
    ("k == 'v'", False, False, True),
    ("k != 'v'", True, True, False),
    ("has(k)", False, True, True),
    ("!has(k)", True, False, False),
    ("k in {'v', 'w'}", False, False, True),
    ("k not in {'v', 'w'}", True, True, False),
    ("k in {}", False, False, False),
    ("k not in {}", True, True, True),
    ("k contains 'v'", False, False, True),
    ("k starts with 'v'", False, False, True),
    ("k ends with 'v'", False, False, True),
    ("k contains ''", False, True, True),
    ("all()", True, True, True),
    ("global()", True, True, True),
    ("!all()", False, False, False),
])
def test_absent_label_semantics(text, absent, other, same):
    """Columns: labels without k; k with another value ('x'); k == 'v'."""
    e = parse_selector(text)
    assert (e.matches({"z": "v"}), e.matches({"k": "x"}), e.matches({"k": "v"})) == (absent, other, same)


def test_string_operators():
    assert parse_selector("k contains 'ell'").matches({"k": "hello"})
    assert parse_selector("k starts with 'he'").matches({"k": "hello"})
    assert not parse_selector("k starts with 'lo'").matches({"k": "hello"})
    assert parse_selector("k ends with 'lo'").matches({"k": "hello"})


# --- canonical form -------------------------------------------------------------------------

@pytest.mark.parametrize("spellings", [
    ["a == 'x' && b == 'y'", 'b=="y"&&a=="x"', "(b == 'y') && ((a == 'x'))", "a in {'x'} && b in {'y','y'}"],
    ["a == 'x' || b == 'y' || c == 'z'", "c == 'z' || (b == 'y' || a == 'x')", "(c == 'z' || b == 'y') || a == 'x'"],
    ["k in {'a', 'b'}", 'k in {"b", "a"}', "k in {'b','a','a',}", "!(k not in {'a','b'})"],
    ["k != 'v'", "!(k == 'v')", "!k == 'v'", "k not in {'v'}", "!!k != 'v'"],
    ["has(a)", "!!has(a)", "has( a )", "has(a) && all()", "has(a) && has(a)", "has(a) || !all()"],
    ["all()", "", "all() || has(a)", "!!all()", "!(!all())"],
    ["!all()", "!all() && has(a)", "!(all())"],
])
def test_equivalent_spellings_share_one_canonical_text(spellings):
    texts = {parse_selector(s).canonical() for s in spellings}
    assert len(texts) == 1, texts
    assert len({parse_selector(s) for s in spellings}) == 1


def test_canonical_text_is_readable_and_stable():
    e = parse_selector("(role == 'db' || role == \"cache\") && ! has(canary) && env in {'prod','dev'}")
    assert e.canonical() == "!has(canary) && env in {'dev', 'prod'} && (role == 'cache' || role == 'db')"
    assert str(e) == e.canonical()
    assert parse_selector(e.canonical()).canonical() == e.canonical()
    assert parse_selector("!(has(a) || has(b))").canonical() == "!(has(a) || has(b))"
    assert parse_selector("k == \"it's\"").canonical() == "k == \"it's\""


def test_nodes_are_hashable_keys():
    a, b = parse_selector("a == 'x' && has(b)"), parse_selector("has(b) && a == \"x\"")
    assert {a: 1}[b] == 1
    assert Or(()).canonical() == "!all()" and And(()).canonical() == "all()"
    assert NOTHING == parse_selector("!all()")


# --- Kubernetes Selector interop ------------------------------------------------------------

def test_as_expr_agrees_with_selector_canonical():
    sel = Selector.of([
        Requirement("app", "In", ("web",)), Requirement("app", "Exists"), Requirement("tier", "NotIn", ("a", "b")),
        Requirement("zone", "DoesNotExist"), Requirement("env", "In", ("dev", "prod")),
        Requirement("v", "NotIn", ("1",)),
    ])
    assert as_expr(sel).canonical() == sel.canonical()
    assert parse_selector(sel.canonical()) == as_expr(sel)
    assert as_expr(Selector()).canonical() == "all()" == Selector().canonical()


KEYS = ["a", "b", "app.kubernetes.io/name", "x-y_z"]
K8S_VALUES = ["", "x", "y", "xy", "a-b"]
VALUES = [*K8S_VALUES, "it's", 'say "hi"']

requirements = st.one_of(
    st.builds(Requirement, st.sampled_from(KEYS), st.sampled_from(["In", "NotIn"]),
              st.sets(st.sampled_from(K8S_VALUES), min_size=1, max_size=3).map(lambda v: tuple(sorted(v)))),
    st.builds(Requirement, st.sampled_from(KEYS), st.sampled_from(["Exists", "DoesNotExist"])),
)
labels = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.lists(requirements, max_size=5), st.lists(labels, min_size=1, max_size=5))
def test_as_expr_matches_selector(reqs, label_sets):
    sel = Selector.of(reqs)
    e = as_expr(sel)
    assert e.canonical() == sel.canonical()
    assert parse_selector(sel.canonical()) == e
    for ls in label_sets:
        assert e.matches(ls) == sel.matches(ls)


# --- random expressions ---------------------------------------------------------------------

keys, values = st.sampled_from(KEYS), st.sampled_from(VALUES)
value_sets = st.lists(values, max_size=3).map(tuple)
atoms = st.one_of(
    st.just(All()), st.just(Global()), st.builds(Has, keys),
    st.builds(Eq, keys, values), st.builds(Ne, keys, values),
    st.builds(In, keys, value_sets), st.builds(NotIn, keys, value_sets),
    st.builds(Contains, keys, values), st.builds(StartsWith, keys, values), st.builds(EndsWith, keys, values),
)
exprs = st.recursive(atoms, lambda inner: st.one_of(
    st.builds(Not, inner),
    st.builds(And, st.lists(inner, max_size=3).map(tuple)),
    st.builds(Or, st.lists(inner, max_size=3).map(tuple)),
), max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(exprs, st.lists(labels, min_size=1, max_size=6))
def test_canonical_round_trips_and_keeps_meaning(e, label_sets):
    normal = e.normalize()
    again = parse_selector(e.canonical())
    assert again == normal
    assert again.canonical() == e.canonical()
    assert normal.normalize() == normal
    for ls in label_sets:
        assert again.matches(ls) == e.matches(ls)


def _spell(e, draw) -> str:
    """Some valid way of writing `e`: random whitespace, quotes, operand order, parentheses and
    equivalent operators, to check that all of them reach one canonical text."""
    ws = lambda: draw(st.sampled_from(["", " ", "  ", "\t"]))  # noqa: E731
    sp = lambda: draw(st.sampled_from([" ", "  ", "\t"]))      # noqa: E731

    def q(v):
        choices = (["'"] if '"' in v else []) + (['"'] if "'" in v else [])
        quote = draw(st.sampled_from(choices or ["'", '"']))
        return f"{quote}{v}{quote}"

    def vset(vs):
        items = list(vs) + draw(st.lists(st.sampled_from(vs), max_size=1)) if vs else []
        items = draw(st.permutations(items))
        trailing = "," if items and draw(st.booleans()) else ""
        return "{" + ws() + f"{ws()},{ws()}".join(q(v) for v in items) + trailing + ws() + "}"

    if isinstance(e, All):
        return draw(st.sampled_from(["all()", "all( )", "!!all()"]))
    if isinstance(e, Global):
        return "global()"
    if isinstance(e, Has):
        return f"has({ws()}{e.key}{ws()})"
    if isinstance(e, Eq):
        return draw(st.sampled_from([f"{e.key}{ws()}=={ws()}{q(e.value)}", f"!{ws()}{e.key}{ws()}!={ws()}{q(e.value)}",
                                     f"{e.key}{sp()}in{ws()}{vset((e.value,))}"]))
    if isinstance(e, Ne):
        return draw(st.sampled_from([f"{e.key}{ws()}!={ws()}{q(e.value)}", f"!({e.key}=={q(e.value)})",
                                     f"{e.key}{sp()}not{sp()}in{ws()}{vset((e.value,))}"]))
    if isinstance(e, In):
        return draw(st.sampled_from([f"{e.key}{sp()}in{ws()}{vset(e.values)}",
                                     f"!{e.key}{sp()}not{ws()}in{ws()}{vset(e.values)}"]))
    if isinstance(e, NotIn):
        return draw(st.sampled_from([f"{e.key}{sp()}not{sp()}in{ws()}{vset(e.values)}",
                                     f"!{ws()}{e.key}{sp()}in{ws()}{vset(e.values)}"]))
    if isinstance(e, Contains):
        return f"{e.key}{sp()}contains{sp()}{q(e.value)}"
    if isinstance(e, StartsWith):
        return f"{e.key}{sp()}starts{sp()}with{ws()}{q(e.value)}"
    if isinstance(e, EndsWith):
        return f"{e.key}{sp()}ends{ws()}with{sp()}{q(e.value)}"
    if isinstance(e, Not):
        return f"!{ws()}({ws()}{_spell(e.operand, draw)}{ws()})"
    ops = draw(st.permutations(e.operands))
    if not ops:
        return "all()" if isinstance(e, And) else "!all()"
    joiner = f"{ws()}&&{ws()}" if isinstance(e, And) else f"{ws()}||{ws()}"
    return joiner.join(f"({ws()}{_spell(op, draw)}{ws()})" for op in ops)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs, st.data())
def test_every_spelling_reaches_the_same_canonical_text(e, data):
    text = _spell(e, data.draw)
    assert parse_selector(text).canonical() == e.canonical(), text


# --- index evaluation -----------------------------------------------------------------------

def _state(label_sets) -> ClusterState:
    eps = tuple(Endpoint("ns", f"p{i}", "node", f"cali{i}", (f"10.0.0.{i + 1}",), ls)
                for i, ls in enumerate(label_sets))
    return ClusterState(namespaces={"ns": Namespace("ns")}, endpoints=eps, policies=(), nodes={})


@settings(max_examples=200, deadline=None)
@given(st.lists(exprs, min_size=1, max_size=4), st.lists(labels, max_size=12))
def test_index_agrees_with_brute_force(es, label_sets):
    index = EndpointIndex(_state(label_sets))
    for e in es:
        expected = frozenset(i for i, ep in enumerate(index.endpoints) if e.matches(ep.labels))
        assert index.select_expr(e) == expected
        assert e.select(index) == expected
        assert index.select_expr(parse_selector(e.canonical())) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(requirements, max_size=4), st.lists(labels, max_size=12))
def test_index_select_expr_agrees_with_select_for_selectors(reqs, label_sets):
    index = EndpointIndex(_state(label_sets))
    sel = Selector.of(reqs)
    assert index.select_expr(as_expr(sel)) == index.select(sel) == index.select_expr(sel)


def test_index_caches_one_entry_per_meaning():
    index = EndpointIndex(_state([{"a": "x"}, {"a": "y", "b": "hello"}, {}]))
    assert index.select_expr(parse_selector("b starts with 'he'")) == {1}
    assert index.select_expr(parse_selector("a != 'x'")) == {1, 2}
    assert index.select_expr(Not(Eq("a", "x"))) == {1, 2}
    assert index.select_expr(And((Ne("a", "x"), Or((Has("b"), NOTHING))))) == {1}
    assert index.select_expr(parse_selector("zz ends with ''")) == frozenset()
    hits = index.select_expr.cache_info().hits
    index.select_expr(parse_selector("!(a == 'x')"))
    assert index.select_expr.cache_info().hits == hits + 1
