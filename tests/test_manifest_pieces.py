"""Manifest files cut into documents (desired.manifests.split_documents / manifest_pieces): the
pieces parse to exactly what the whole file parses to, and text that fails whole fails in pieces.

Random files are built from fragments chosen to sit on the edges of YAML's document syntax:
markers with and without content, `...` ends, comments, block scalars and quoted and flow
values spanning lines, lines that only look like markers, directives, empty documents.
"""
from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.desired import manifests

FRAGMENTS = [
    "---\n", "--- \n", "---\t\n", "---\r\n", "--- # c\n", "--- !!map\n", "--- a\n", "--- |\n", "--- >-\n",
    "...\n", "... # end\n", "----\n", "---x\n", " ---\n", "#---\n", "# comment\n", "\n", "   \n",
    "a: 1\n", "b:\n  - x\n  - y\n", "c: |\n  text\n  ---\n  more\n", "d: >\n  ---\n", "e: '---\n", "f: \"x\n",
    "g: [1,\n", "]\n", "h: {k: v,\n", "}\n", "  indented: 2\n", "- item\n", "? key\n", ": value\n",
    "i: &anchor v\n", "j: *anchor\n", "k: 'multi\n  line'\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n",
    "plain\n", "--- 'str'\n", "l: ---\n", "m: '\n---\n'\n", "\t\n", "n: !!str 2\n",
]
TEXTS = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


def whole(data: bytes):
    try:
        return list(yaml.load_all(data, Loader=manifests._Loader))
    except Exception:  # noqa: BLE001 - any failure of the library counts as "fails"
        return None


def in_pieces(data: bytes):
    docs = []
    for _line, text in manifests.split_documents(data):
        loaded = whole(text)
        if loaded is None:
            return None
        docs += loaded
    return docs


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS)
def test_pieces_parse_to_the_whole_files_documents(text):
    data = text.encode()
    pieces = manifests.split_documents(data)
    assert b"".join(t for _l, t in pieces) == data
    starts = [sum(len(t) for _l, t in pieces[:i]) for i in range(len(pieces))]
    assert [line for line, _t in pieces] == [data[:at].count(b"\n") for at in starts]
    expected = whole(data)
    got = in_pieces(data)
    if expected is None:
        assert got is None
    else:
        assert got == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS, st.data())
def test_manifest_pieces_with_known_pieces_give_the_same_documents(text, data):
    raw = text.encode()
    errors: list = []
    fresh = manifests.manifest_pieces("f.yaml", raw, errors)
    expected = whole(raw)
    if expected is None:
        assert fresh is None and errors
        return
    assert fresh is not None and [d for p in fresh for d in p.loaded] == expected
    # Pieces known from before are not parsed again; the rest give what they gave before.
    keep = data.draw(st.lists(st.sampled_from(range(len(fresh))), unique=True)) if fresh else []
    known = {fresh[i].digest: (fresh[i].documents, fresh[i].values) for i in keep}
    again = manifests.manifest_pieces("f.yaml", raw, [], known)
    assert again is not None and [p.digest for p in again] == [p.digest for p in fresh]
    for old, new in zip(fresh, again, strict=True):
        assert (new.documents, new.values) == (old.documents, old.values)
        if sum(p.digest not in known for p in fresh) <= manifests.WHOLE_FILE_SHARE * len(fresh):
            assert (new.loaded is None) == (new.digest in known)      # else: the file parsed whole
        if new.loaded is not None:
            assert new.loaded == old.loaded


def test_a_file_with_directives_is_one_piece():
    data = b"%YAML 1.1\n---\na: 1\n---\nb: 2\n"
    assert manifests.split_documents(data) == [(0, data)]


def test_line_numbers_of_pieces():
    data = b"a: 1\n---\nb: 2\nc: 3\n--- \nd: 4\n"
    assert manifests.split_documents(data) == [(0, b"a: 1\n"), (1, b"---\nb: 2\nc: 3\n"), (4, b"--- \nd: 4\n")]
