"""The offline source: a directory of Kubernetes YAML manifests (multi-document files)."""
from __future__ import annotations

from pathlib import Path

import yaml

from desired.errors import InvalidDesiredState, SourceError, ValidationError

# libyaml's loader is ~8x faster than the pure-Python one; same results for manifests.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_manifest_dir(directory: str | Path) -> list[tuple[str, dict]]:
    """Every document of every *.yaml / *.yml / *.json file below `directory`, with its file.

    Files are read in sorted order so that a load is deterministic; a syntax error names the
    file and line, and stops the load.
    """
    root = Path(directory)
    if not root.is_dir():
        raise SourceError(f"--from {directory}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    objects: list[tuple[str, dict]] = []
    errors: list[ValidationError] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            documents = list(yaml.load_all(text, Loader=_Loader))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            errors.append(ValidationError(where, "document", "", f"malformed YAML: {problem}"))
            continue
        objects.extend((str(path), doc) for doc in documents if doc is not None)
    if errors:
        raise InvalidDesiredState(errors)
    return objects
