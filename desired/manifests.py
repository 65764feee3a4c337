"""The offline source: a directory of Kubernetes YAML manifests (multi-document files).

Files are read and parsed within the bounds of desired.bounds: a file larger than
MAX_FILE_BYTES, a document nested deeper than MAX_DEPTH, or YAML aliases expanding a file past
its value budget is a clear error naming the file (and the document), never a memory blow-up.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from weft.desired.bounds import MAX_FILE_BYTES, MAX_VALUES, BoundExceeded, ValueBudget
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
    """A manifest file's bytes; more than `limit` of them is an error, found without reading
    more than that (the file may be a /proc file, or growing)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > limit:
        raise SourceError(f"{path}: larger than {limit >> 20} MiB, the most weft reads from one manifest file")
    return data


def parse_manifest_file(path: str | Path, data: bytes, errors: list[ValidationError]) -> list[tuple[str, object]]:
    """The documents of one file with the file's path; a syntax error is recorded with its line,
    a document beyond the bounds (desired.bounds) with its position in the file."""
    if len(data) > MAX_FILE_BYTES:
        errors.append(ValidationError(str(path), "file", "", f"larger than {MAX_FILE_BYTES >> 20} MiB, "
                                                             "the most weft reads from one manifest file"))
        return []
    budget = ValueBudget(max(MAX_VALUES, len(data)))
    documents: list[tuple[str, object]] = []
    number = 0
    try:
        for number, doc in enumerate(yaml.load_all(data, Loader=_Loader), start=1):  # noqa: B007
            budget.check(doc)
            if doc is not None:
                documents.append((str(path), doc))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        problem = problem if len(problem) <= _PROBLEM_LENGTH else problem[:_PROBLEM_LENGTH] + "..."  # quotes input
        errors.append(ValidationError(where, "document", "", f"malformed YAML: {problem}"))
        return []
    except BoundExceeded as exc:
        errors.append(ValidationError(str(path), f"document {number}", "", str(exc)))
        return []
    except (RecursionError, MemoryError):
        errors.append(ValidationError(str(path), f"document {number + 1}", "",
                                      "cannot be loaded: too large or too deeply nested"))
        return []
    except Exception as exc:  # noqa: BLE001 - the YAML library on hostile text: see below
        # A value YAML allows and Python cannot hold (a date like 2024-13-01, an integer of more
        # than 4300 digits), or an explicit tag the library's constructor fails on
        # (`!!timestamp x` is an AttributeError inside PyYAML): the input's fault, not weft's.
        problem = str(exc).split("\n")[0][:_PROBLEM_LENGTH] if isinstance(exc, ValueError) else \
            f"{type(exc).__name__} in the YAML library ({str(exc)[:120]})"
        errors.append(ValidationError(str(path), f"document {number + 1}", "", f"cannot be loaded: {problem}"))
        return []
    return documents


def load_manifest_dir(directory: str | Path) -> list[tuple[str, object]]:
    """Every document of every manifest file below `directory`, with its file."""
    objects: list[tuple[str, object]] = []
    errors: list[ValidationError] = []
    for path in manifest_files(directory):
        objects.extend(parse_manifest_file(path, read_manifest(path), errors))
    if errors:
        raise InvalidDesiredState(errors)
    return objects
