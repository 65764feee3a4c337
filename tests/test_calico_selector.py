"""Calico selector expressions: parsing, semantics, canonical text, and index evaluation.

The index must agree with brute-force `matches` on every endpoint, and the canonical text
must name an expression's meaning: equivalent spellings share it, and it parses back to the
same AST. Both are checked on random expressions, label sets and spellings. Kubernetes label
selectors are converted to the same AST when loaded: they must mean what Kubernetes says and
keep the canonical text (hence the ipset names) weft has always given them. Calico's own parser
tests (libcalico-go/lib/selector/parser/parser_test.go) are replayed as a conformance table.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.desired.index import EndpointIndex
from weft.desired.loader import build_cluster_state
from weft.model.cluster import ClusterState, Endpoint, Namespace
from weft.model.errors import InvalidDesiredState
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


# --- Kubernetes label selectors, converted at load ------------------------------------------

KEYS = ["a", "b", "app.kubernetes.io/name", "x-y_z"]
K8S_VALUES = ["", "x", "y", "xy", "a-b"]
VALUES = [*K8S_VALUES, "it's", 'say "hi"']


def converted(selector: dict):
    """The podSelector of a NetworkPolicy, as the loader converts it."""
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "p", "namespace": "default"}, "spec": {"podSelector": selector}}
    (loaded,) = build_cluster_state([("test.yaml", policy)]).policies
    return loaded.selector


@pytest.mark.parametrize("selector, text", [
    # The canonical texts weft wrote for these before selectors were one model: ipset names
    # derive from them, so an upgrade must not rename (and rewrite) every set.
    ({}, "all()"),
    ({"matchLabels": {"app": "web"}}, "app == 'web'"),
    ({"matchLabels": {"tier": "db", "app": "web"}}, "app == 'web' && tier == 'db'"),
    ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "dev", "prod"]}]},
     "env in {'dev', 'prod'}"),
    ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["b"]}]}, "env != 'b'"),
    ({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"},
                           {"key": "app", "operator": "Exists"}]}, "has(app) && !has(canary)"),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [
        {"key": "app", "operator": "Exists"}, {"key": "tier", "operator": "NotIn", "values": ["a", "b"]},
        {"key": "zone", "operator": "DoesNotExist"}, {"key": "env", "operator": "In", "values": ["dev", "prod"]},
        {"key": "v", "operator": "NotIn", "values": ["1"]}]},
     "has(app) && app == 'web' && env in {'dev', 'prod'} && tier not in {'a', 'b'} && v != '1' && !has(zone)"),
])
def test_kubernetes_selectors_keep_their_canonical_text(selector, text):
    expr = converted(selector)
    assert expr.canonical() == text
    assert parse_selector(text) == expr


@pytest.mark.parametrize("selector, field", [
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["it's"]}]}, "matchExpressions[0].values[0]"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x", ["y"]]}]}, "matchExpressions[0].values[1]"),
    ({"matchExpressions": [{"key": "a", "operator": ["In"], "values": ["x"]}]}, "matchExpressions[0].operator"),
    ({"matchExpressions": [{"key": "a b", "operator": "Exists"}]}, "matchExpressions[0].key"),
    ({"matchLabels": {"a": 'say "hi"'}}, "matchLabels.a"),
])
def test_kubernetes_selector_values_are_label_values(selector, field):
    """As the API server checks them: a value Calico's text cannot hold never reaches the AST."""
    with pytest.raises(InvalidDesiredState) as refused:
        converted(selector)
    assert f"spec.podSelector.{field}" in str(refused.value)


def k8s_matches(selector: dict, labels: dict) -> bool:
    """Kubernetes' meaning of a label selector, written out plainly."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for req in selector.get("matchExpressions", []):
        key, op, values = req["key"], req["operator"], req.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


requirements = st.one_of(
    st.builds(lambda k, op, vs: {"key": k, "operator": op, "values": vs}, st.sampled_from(KEYS),
              st.sampled_from(["In", "NotIn"]), st.lists(st.sampled_from(K8S_VALUES), min_size=1, max_size=3)),
    st.builds(lambda k, op: {"key": k, "operator": op}, st.sampled_from(KEYS),
              st.sampled_from(["Exists", "DoesNotExist"])),
)
k8s_selectors = st.builds(lambda ml, me: {"matchLabels": ml, "matchExpressions": me},
                          st.dictionaries(st.sampled_from(KEYS), st.sampled_from(K8S_VALUES), max_size=2),
                          st.lists(requirements, max_size=4))
labels = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=4)


@settings(max_examples=150, deadline=None)
@given(k8s_selectors, st.lists(labels, min_size=1, max_size=5))
def test_converted_kubernetes_selectors_mean_what_kubernetes_says(selector, label_sets):
    e = converted(selector)
    assert parse_selector(e.canonical()) == e
    for ls in label_sets:
        assert e.matches(ls) == k8s_matches(selector, ls), (selector, ls, e.canonical())


# --- Calico's own parser tests --------------------------------------------------------------

# (selector, label sets it matches, label sets it does not): parser_test.go's selectorTests.
CALICO_CASES = [
    ('a == "b"', [{"a": "b"}, {"a": "b", "c": "d"}], [{}, {"a": "c"}, {"c": "d"}]),
    ('a == "b" && c == "d"', [{"a": "b", "c": "d"}],
     [{}, {"a": "b", "c": "e"}, {"a": "c", "c": "d"}, {"c": "d"}, {"a": "b"}]),
    ('a == "b" || c == "d"', [{"a": "b", "c": "d"}, {"a": "b"}, {"c": "d"}],
     [{}, {"a": "e", "c": "e"}, {"c": "e"}, {"a": "e"}]),
    ("""a in {"'", '"', "c"}""", [{"a": "c"}, {"a": '"'}, {"a": "'"}], [{}, {"a": "e"}]),
    ("""a not in {"'", '"', "c"}""", [{}, {"a": "e"}], [{"a": "c"}, {"a": '"'}, {"a": "'"}]),
    ("a == 'a'", [{"a": "a"}], [{"a": "b"}, {}]),
    ('a != "b"', [{"a": "a"}], []),
    ('a != "a"', [{}], [{"a": "a"}]),
    ('a contains "a"', [{"a": "a"}, {"a": "bab"}, {"a": "aaa", "b": "c"}], [{}, {"a": "b"}, {"b": "aaa"}]),
    ('a starts with "a"', [{"a": "a"}, {"a": "abb"}, {"a": "aaa", "b": "c"}],
     [{}, {"a": "b"}, {"a": "baa"}, {"b": "aaa"}]),
    ('a ends with "a"', [{"a": "a"}, {"a": "bba"}, {"a": "aaa", "b": "c"}],
     [{}, {"a": "b"}, {"a": "aab"}, {"b": "aaa"}]),
    ('a in {"a"}', [{"a": "a"}], [{"a": "b"}]),
    ('!a in {"a"}', [{"a": "b"}], []),
    ('a in {"a", "b"}', [{"a": "a"}, {"a": "b"}], [{"a": "c"}]),
    ('a not in {"d", "e"}', [{"a": "a"}], []),
    ('a not in {"a"}', [], [{"a": "a"}]),
    ("has(a)", [{"a": "b"}], []),
    ("!has(a)", [{"b": "b"}], [{"a": "b"}]),
    ("", [{}, {"a": "b"}], []),
    (" ", [{}], []),
    ("all()", [{}], []),
    (" all()", [{}, {"a": "b"}], []),
    ("global()", [{}], []),
    (" global()", [{}, {"a": "b"}], []),
    ("has(b)", [], [{"a": "b"}]),
    ("!!has(b)", [], [{"a": "b"}]),
    ("! has(a)", [], [{"a": "b"}]),
    ("!!! has(a)", [], [{"a": "b"}]),
    ("!!!has(a)", [], [{"a": "b"}]),
    ("!! ! has(a)", [], [{"a": "b"}]),
    ("! !!has(a)", [], [{"a": "b"}]),
    ("a == 'a1' && b == 'b1'", [{"a": "a1", "b": "b1"}], []),
    ("a == 'a1' && b != 'b1'", [], [{"a": "a1", "b": "b1"}]),
    ("a != 'a1' && b == 'b1'", [], [{"a": "a1", "b": "b1"}]),
    ("a != 'a1' && b != 'b1'", [], [{"a": "a1", "b": "b1"}]),
    ("a != 'a1' && !b == 'b1'", [], [{"a": "a1", "b": "b1"}]),
    ("!a == 'a1' && b == 'b1'", [], [{"a": "a1", "b": "b1"}]),
    ("has(a) && !has(b)", [{"a": "a"}], []),
    ("!has(b) && has(a)", [{"a": "a"}], []),
    ("!(!has(a) || has(b))", [{"a": "a"}], []),
    ("!(has(b) || !has(a))", [{"a": "a"}], []),
    ("a == 'a1' || b == 'b1'", [{"a": "a1", "b": "b1"}], []),
    ("a == 'a1' || b != 'b1'", [{"a": "a1", "b": "b1"}], []),
    ("a != 'a1' || b == 'b1'", [{"a": "a1", "b": "b1"}], []),
    ("a != 'a1' || b != 'b1'", [], [{"a": "a1", "b": "b1"}]),
    ("! a == 'a1' || ! b == 'b1'", [], [{"a": "a1", "b": "b1"}]),
]


@pytest.mark.parametrize("text, matching, other", CALICO_CASES, ids=[c[0] or "empty" for c in CALICO_CASES])
def test_calico_parser_cases(text, matching, other):
    e = parse_selector(text)
    again = parse_selector(e.canonical())
    index = EndpointIndex(_state(matching + other))
    assert index.select(e) == frozenset(range(len(matching)))
    for ls in matching:
        assert e.matches(ls) and again.matches(ls)
    for ls in other:
        assert not e.matches(ls) and not again.matches(ls)


# parser_test.go's badSelectors: every one is refused.
CALICO_BAD = ["b == b", "b contains b", "b starts with b", "b ends with b", "'b1' == b", "b", "a b", "!",
              'foo == "bar" &', 'foo == "bar" |', "foo != ||", 'foo in {"", ||', 'foo in ""', '"FOO', '"FOO\'',
              "'FOO", "(", '(a == "foo"', ")", "()", "%", 'a == "b" && %', 'a == "b" || %', "a ", "has(foo) &&"]


@pytest.mark.parametrize("text", CALICO_BAD)
def test_calico_bad_selectors_are_refused(text):
    with pytest.raises(SelectorError):
        parse_selector(text)


@pytest.mark.parametrize("text, canonical", [
    # parser_test.go's canonicalisationTests, in weft's canonical spelling (single quotes where
    # the value allows, operands of && and || in a fixed order).
    ("", "all()"), (" all() ", "all()"), (" (all() )", "all()"),
    ("! (has( b)||! has(a ))", "!(!has(a) || has(b))"),
    ('! (a == "b"&&! c != "d")', "!(a == 'b' && c == 'd')"),
    ('a == "\'"', 'a == "\'"'), ("a == '\"'", "a == '\"'"),
    ("a startswith '\"'", "a starts with '\"'"), ('a endswith "\'"', 'a ends with "\'"'),
    ("a!='\"'", "a != '\"'"),
    ('a in {"d", "a", "b"}', "a in {'a', 'b', 'd'}"),
    ('a in {"z", "z", "x", "y", "x", "a"}', "a in {'a', 'x', 'y', 'z'}"),
])
def test_calico_canonicalisation_cases(text, canonical):
    assert parse_selector(text).canonical() == canonical
    assert parse_selector(canonical).canonical() == canonical


def test_hostile_selectors_fail_cleanly():
    """Deep nesting is refused before Python's recursion limit; a long run of '!' is its parity;
    messages quote a cut selector, never all of it."""
    with pytest.raises(SelectorError, match="nested deeper than 64"):
        parse_selector("(" * 10_000 + "has(a)" + ")" * 10_000)
    assert parse_selector("(" * 64 + "has(a)" + ")" * 64) == Has("a")
    assert parse_selector("!" * 100_001 + "has(a)") == Not(Has("a"))
    with pytest.raises(SelectorError) as err:
        parse_selector("a == 'x' && " + "b" * 1_000_000)
    assert len(str(err.value)) < 400


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
        assert index.select(e) == expected
        assert e.select(index) == expected
        assert index.select(parse_selector(e.canonical())) == expected


def test_index_caches_one_entry_per_meaning():
    index = EndpointIndex(_state([{"a": "x"}, {"a": "y", "b": "hello"}, {}]))
    assert index.select(parse_selector("b starts with 'he'")) == {1}
    assert index.select(parse_selector("a != 'x'")) == {1, 2}
    assert index.select(Not(Eq("a", "x"))) == {1, 2}
    assert index.select(And((Ne("a", "x"), Or((Has("b"), NOTHING))))) == {1}
    assert index.select(parse_selector("zz ends with ''")) == frozenset()
    hits = index.select.cache_info().hits
    index.select(parse_selector("!(a == 'x')"))
    assert index.select.cache_info().hits == hits + 1
