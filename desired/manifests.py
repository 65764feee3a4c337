"""The offline source: a directory of Kubernetes YAML manifests (multi-document files).

Files are read and parsed within the bounds of desired.bounds: a file larger than
MAX_FILE_BYTES, a document nested deeper than MAX_DEPTH, or YAML aliases expanding a file past
its value budget is a clear error naming the file (and the document), never a memory blow-up.

A file is also cut into pieces, one document each (`manifest_pieces`), so that when one object
of a 10,000-object file changes only its document is parsed again. A line that begins with
`---` followed by a space, a tab, a line break or the end of the file starts a document, wherever
it is: YAML forbids such a line inside any scalar or collection (libyaml's scanner makes it a
document start even there, and the parser then fails, the same way whether the file is read whole
or in pieces), so the pieces parse to exactly the documents of the whole file. A file with
directives (a line beginning with `%`), or not in UTF-8, is one piece.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import yaml

from weft.desired.bounds import MAX_FILE_BYTES, MAX_VALUES, BoundExceeded, ValueBudget, read_bounded
from weft.model.errors import InvalidDesiredState, SourceError, ValidationError

# libyaml's loader is ~8x faster than the pure-Python one; same results for manifests.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SUFFIXES = (".yaml", ".yml", ".json")
_PROBLEM_LENGTH = 200


def manifest_files(directory: str | Path) -> list[Path]:
    """Every *.yaml / *.yml / *.json file below `directory`, in a stable order."""
    root = Path(directory)
    if not root.is_dir():
        raise SourceError(f"--from {directory}: not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())


def read_manifest(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A manifest file's bytes; SourceError past `limit` of them (desired.bounds.read_bounded)."""
    return read_bounded(path, limit, "manifest file", SourceError)


def parse_manifest_file(path: str | Path, data: bytes, errors: list[ValidationError]) -> list[tuple[str, object]]:
    """The documents of one file with the file's path; a syntax error is recorded with its line,
    a document beyond the bounds (desired.bounds) with its position in the file."""
    if len(data) > MAX_FILE_BYTES:
        errors.append(_too_large(path))
        return []
    loaded = _load(path, data, ValueBudget(max(MAX_VALUES, len(data))), errors)
    return [] if loaded is None else [(str(path), doc) for doc, _values in loaded if doc is not None]


class Piece(NamedTuple):
    """A piece of a manifest file: at most one document (`documents` of them: 0 or 1, or all of
    the file's when it is one piece), the values of the file's budget they took, and the loaded
    documents (None: a piece the caller knows by its digest, not parsed again)."""
    digest: str
    documents: int
    values: int
    loaded: list | None


# Reparse a file whole (one pass of the parser, a little faster than piece by piece) when more
# than this share of its pieces is new.
WHOLE_FILE_SHARE = 0.1
# A document start: `---` at the beginning of a line (as `^` in re.M: of the text, where the
# first piece begins anyway, or after a "\n"). Matched as "\n---": a pattern beginning with a
# newline is searched many times faster than one beginning with `^` (10,000 documents: 9 ms, not 36).
_LINE_DOCUMENT_START = re.compile(rb"\n---(?=[ \t\r\n]|\Z)")


def split_documents(data: bytes) -> list[tuple[int, bytes]]:
    """`data` cut before every document start (see the module docstring): (index of its first
    line, text) pairs that join to `data`; one piece when the file cannot be cut safely."""
    cuts = _cuts(data)
    pieces, line = [], 0
    for start, end in zip(cuts, cuts[1:], strict=False):
        pieces.append((line, data[start:end]))
        line += data.count(b"\n", start, end)
    return pieces


def _cuts(data: bytes) -> list[int]:
    """Where `split_documents` cuts `data`: the offset of each piece, then the end."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data or data[:1] == b"%" or b"\n%" in data:
        return [0, len(data)]
    return [0, *(m.start() + 1 for m in _LINE_DOCUMENT_START.finditer(data)), len(data)]


def manifest_pieces(path: str | Path, data: bytes, errors: list[ValidationError],
                    known: Mapping[str, tuple[int, int]] | None = None) -> list[Piece] | None:
    """The pieces of one file, in order; None when it has errors (recorded as parse_manifest_file
    records them). `known`: digest -> (documents, values) of pieces read before, which are not
    parsed again (their Piece has `loaded` None); their values still count against the budget.
    Only the pieces parsed are copied out of `data`, and their first lines counted (for errors)."""
    if len(data) > MAX_FILE_BYTES:
        errors.append(_too_large(path))
        return None
    known = known or {}
    budget = ValueBudget(max(MAX_VALUES, len(data)))
    cuts = _cuts(data)
    spans = list(zip(cuts, cuts[1:], strict=False))
    view = memoryview(data)
    digests = [hashlib.sha256(view[start:end]).hexdigest() for start, end in spans]
    new = sum(d not in known for d in digests)
    if new > WHOLE_FILE_SHARE * len(spans):
        return _whole(path, data, spans, digests, budget, errors)
    out, number, line, counted = [], 0, 0, 0
    for (start, end), digest in zip(spans, digests, strict=True):
        if digest in known:
            documents, values = known[digest]
            budget.used += values
            if budget.used > budget.limit:
                errors.append(ValidationError(str(path), f"document {number + documents}", "", budget._too_many()))
                return None
            out.append(Piece(digest, documents, values, None))
        else:
            line, counted = line + data.count(b"\n", counted, start), start
            before = budget.used
            loaded = _load(path, data[start:end], budget, errors, line, number)
            if loaded is None:
                return None
            documents = len(loaded)
            out.append(Piece(digest, documents, budget.used - before, [doc for doc, _v in loaded]))
        number += documents
    return out


def _whole(path: str | Path, data: bytes, spans: list[tuple[int, int]], digests: list[str],
           budget: ValueBudget, errors: list[ValidationError]) -> list[Piece] | None:
    """Every piece, from one parse of the whole file. When that parse succeeds, every piece that
    begins with `---` holds exactly one of its documents and the first piece the rest (none or
    one): anything else (a bare document after `...`) fails the parse."""
    loaded = _load(path, data, budget, errors)
    if loaded is None:
        return None
    starts = [data.startswith(b"---", start, end) for start, end in spans]
    first = len(loaded) - sum(starts)
    if first not in (0, 1) or (starts[0] and first):
        return [Piece(hashlib.sha256(data).hexdigest(), len(loaded), budget.used, [d for d, _v in loaded])]
    out, at = [], 0
    for begins, digest in zip(starts, digests, strict=True):
        count = 1 if begins else first
        mine = loaded[at:at + count]
        at += count
        out.append(Piece(digest, count, sum(v for _d, v in mine), [d for d, _v in mine]))
    return out


def _load(path: str | Path, text: bytes, budget: ValueBudget, errors: list[ValidationError], line: int = 0,
          number: int = 0) -> list[tuple[object, int]] | None:
    """The documents of `text` (which begins at line index `line` of the file, after `number`
    documents) with the values each took of `budget`; None when it has errors (recorded)."""
    documents: list[tuple[object, int]] = []
    try:
        for number, doc in enumerate(yaml.load_all(text, Loader=_Loader), start=number + 1):  # noqa: B007, B020
            before = budget.used
            budget.check(doc)
            documents.append((doc, budget.used - before))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1 + line}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        problem = problem if len(problem) <= _PROBLEM_LENGTH else problem[:_PROBLEM_LENGTH] + "..."  # quotes input
        errors.append(ValidationError(where, "document", "", f"malformed YAML: {problem}"))
        return None
    except BoundExceeded as exc:
        errors.append(ValidationError(str(path), f"document {number}", "", str(exc)))
        return None
    except (RecursionError, MemoryError):
        errors.append(ValidationError(str(path), f"document {number + 1}", "",
                                      "cannot be loaded: too large or too deeply nested"))
        return None
    except Exception as exc:  # noqa: BLE001 - the YAML library on hostile text: see below
        # A value YAML allows and Python cannot hold (a date like 2024-13-01, an integer of more
        # than 4300 digits), or an explicit tag the library's constructor fails on
        # (`!!timestamp x` is an AttributeError inside PyYAML): the input's fault, not weft's.
        problem = str(exc).split("\n")[0][:_PROBLEM_LENGTH] if isinstance(exc, ValueError) else \
            f"{type(exc).__name__} in the YAML library ({str(exc)[:120]})"
        errors.append(ValidationError(str(path), f"document {number + 1}", "", f"cannot be loaded: {problem}"))
        return None
    return documents


def _too_large(path: str | Path) -> ValidationError:
    return ValidationError(str(path), "file", "", f"larger than {MAX_FILE_BYTES >> 20} MiB, "
                                                  "the most weft reads from one manifest file")


def load_manifest_dir(directory: str | Path) -> list[tuple[str, object]]:
    """Every document of every manifest file below `directory`, with its file."""
    objects: list[tuple[str, object]] = []
    errors: list[ValidationError] = []
    for path in manifest_files(directory):
        objects.extend(parse_manifest_file(path, read_manifest(path), errors))
    if errors:
        raise InvalidDesiredState(errors)
    return objects
