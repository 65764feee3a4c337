"""model.codec writes many strings in one step: a tuple or frozenset of plain strings (a set's
members, a chain's rules) is one string joined by line breaks (issue #14: encoding them one by
one took 1.0 s of a 150,000-pod run). Every value still comes back as it was, with its types;
a string holding a line break, a str subclass (a StrEnum member) or a short collection is
written item by item; and joined text read back is only ever strings: no other type is built."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.desired.loader import Converted
from weft.model import codec
from weft.model.cluster import Action, Endpoint
from weft.model.kernel import Chain, IpSet

TEXT = st.text(st.sampled_from("ab\n,:. é"), max_size=4)
STRINGS = st.one_of(st.lists(TEXT, max_size=40).map(tuple), st.frozensets(TEXT, max_size=40),
                    st.lists(st.sampled_from(["198.18.0.1", "2001:db8::1", ""]), max_size=40).map(tuple))
VALUES = st.recursive(
    st.one_of(STRINGS, TEXT, st.integers(), st.none(), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=20).map(tuple), st.lists(inner, max_size=5),
                            st.dictionaries(TEXT, inner, max_size=4),
                            st.builds(lambda m: IpSet("s", "hash:ip", m), st.frozensets(TEXT, max_size=40)),
                            st.builds(lambda r: Chain("filter", "c", r), st.lists(TEXT, max_size=40).map(tuple))),
    max_leaves=30)


def same(a, b) -> bool:
    """Equal, and of the same types all the way down (a tuple is no list, a member no plain str)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@given(VALUES)
def test_values_come_back_as_they_were(value):
    text = codec.dumps(value)
    assert same(codec.loads(text), value)
    assert same(codec.decode(json.loads(text)), value)
    assert "\n" not in text                     # a cache line stays one line


def test_many_plain_strings_are_one_string():
    members = frozenset(f"198.18.{i // 250}.{i % 250}" for i in range(1000))
    rules = tuple(f"-A c -s 198.18.0.{i} -j ACCEPT" for i in range(20))
    data = json.loads(codec.dumps((IpSet("s", "hash:ip", members), Chain("filter", "c", rules))))
    ipset, chain = data
    assert ipset["v"][2] == {codec.JOINED_SET: "\n".join(members)}
    assert chain["v"][2] == {codec.JOINED: "\n".join(rules)}
    assert codec.loads(codec.dumps(members)) == members
    # Short ones, a string with a line break among them, a dataclass's own fields: item by item.
    assert json.loads(codec.dumps(rules[:3])) == list(rules[:3])
    broken = rules[:-1] + ("a\nb",)
    assert json.loads(codec.dumps(broken)) == list(broken) and codec.loads(codec.dumps(broken)) == broken
    endpoint = Endpoint("ns", "pod", "n1", "eth0", ("198.18.0.1",))
    assert json.loads(codec.dumps(endpoint))["v"][:2] == ["ns", "pod"]
    # What desired.sources and reconciler.run search a cached group's text for: a converted
    # object's namespace and name, as codec.dumps writes a lone string, whatever it holds besides.
    converted = Converted("Pod", "ns-1", "pod-1", "f.yaml", "Pod ns-1/pod-1", endpoint, "v1",
                          tuple(f"spec.x{i}" for i in range(20)))
    text = codec.dumps((converted,) * 20).encode()
    assert codec.dumps("ns-1").encode() in text and codec.dumps("pod-1").encode() in text


def test_string_subclasses_are_not_joined():
    """A StrEnum member is a str to "\\n".join, not to the codec: it stays an enum."""
    actions = tuple(Action) * 10
    assert len(actions) >= codec.JOIN_AT
    back = codec.loads(codec.dumps(actions))
    assert back == actions and all(type(a) is Action for a in back)
    assert codec.loads(codec.dumps(frozenset(actions))) == frozenset(actions)


@pytest.mark.parametrize("hostile", [{codec.JOINED: 5}, {codec.JOINED_SET: ["a"]}, {codec.JOINED: None},
                                     {codec.JOINED: "a", "v": 1}, {codec.JOINED: "a", codec.JOINED_SET: "b"}])
def test_joined_text_that_is_not_a_string_is_refused(hostile):
    with pytest.raises(codec.CodecError):
        codec.loads(json.dumps(hostile))
    with pytest.raises(codec.CodecError):
        codec.decode(hostile)


def test_joined_text_builds_only_strings():
    planted = json.dumps({codec.DATACLASS: "Popen", "v": [["id"]]})
    assert codec.loads(json.dumps({codec.JOINED: planted + "\nx"})) == (planted, "x")
    assert codec.loads(json.dumps({codec.JOINED_SET: ""})) == frozenset({""})
    # A plain mapping with such a key is written as a mapping, and read back as it was.
    assert codec.loads(codec.dumps({codec.JOINED: "x"})) == {codec.JOINED: "x"}
