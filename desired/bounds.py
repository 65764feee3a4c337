"""How much of what it reads weft will take: the documented limits on manifests and API answers.

Everything weft reads is hostile until checked. Before a document or an API answer reaches the
converters it must fit these bounds, so no input can exhaust memory or the interpreter's stack:

  MAX_FILE_BYTES      one manifest file (64 MiB; a 10,000-pod `kubectl get -o yaml` is ~30 MiB)
  MAX_RESPONSE_BYTES  one API answer (a list page, a watch's whole stream): 64 MiB
  MAX_DEPTH           nesting of mappings and lists in one document or object: 100 (a Pod with
                      its managedFields is ~15 deep)
  MAX_VALUES          values in one file, a value reached through a YAML alias counted each
                      time it is reached: the file's size in bytes, and at least 1,000,000.
                      Without aliases a file cannot reach it (every value takes a byte of its
                      own); an alias "bomb" (each level a list of aliases to the one before,
                      a billion values in a kilobyte) stops at it at once.
  INT_RANGE           integers are 64-bit, signed or not, as in Kubernetes' own types (YAML
                      allows any length, and Python prints at most 4300 digits of one)

The check is a walk of each loaded document that counts the values below each mapping or list
once per object (so an alias bomb costs what its text does, not what it expands to) and refuses
the document at the first limit it passes.

Files weft is handed by path (manifests; a saved plan, reconciler.plan, with bounds of its own)
are read by `read_bounded`, and JSON by `check_depth`: one way to refuse a file too large or
too deep, whoever reads it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
MAX_FILE_BYTES = 64 * MiB
MAX_RESPONSE_BYTES = 64 * MiB
MAX_DEPTH = 100
MAX_VALUES = 1_000_000
INT_RANGE = (-(1 << 63), (1 << 64) - 1)

_CONTAINERS = (dict, list, tuple, set, frozenset)


class BoundExceeded(ValueError):
    """A document or answer beyond one of the limits; the message says which."""


class ValueBudget:
    """Counts the values of the documents of one file (or one answer) against a limit."""

    def __init__(self, limit: int = MAX_VALUES, max_depth: int = MAX_DEPTH):
        self.limit, self.max_depth, self.used = limit, max_depth, 0

    def check(self, document: Any) -> None:
        """Raise BoundExceeded if `document` nests deeper than the limit or takes the file past
        its value budget; otherwise count its values."""
        measured: dict[int, tuple[int, int]] = {}   # id of a container -> (values, height), expanded
        if not isinstance(document, _CONTAINERS):
            self.used += 1
            return
        size, _height = self._measure(document, 1, measured)
        self.used += size
        if self.used > self.limit:
            raise BoundExceeded(self._too_many())

    def _measure(self, value: Any, depth: int, measured: dict[int, tuple[int, int]]) -> tuple[int, int]:
        """(values, levels) of `value` as if its aliases were expanded, `value` being `depth`
        levels down. A container is measured once, however often aliases reach it."""
        known = measured.get(id(value))
        if known is None:
            if depth > self.max_depth:
                raise BoundExceeded(self._too_deep())
            size, height = 1, 1
            children = value.values() if isinstance(value, dict) else value
            for item in children:
                if isinstance(item, _CONTAINERS):
                    item_size, item_height = self._measure(item, depth + 1, measured)
                    size += item_size
                    height = max(height, item_height + 1)
                    if self.used + size > self.limit:
                        raise BoundExceeded(self._too_many())
                else:
                    if type(item) is int and not INT_RANGE[0] <= item <= INT_RANGE[1]:
                        raise BoundExceeded(self._too_big())
                    size += 1
            if isinstance(value, dict):
                size += len(value)                  # the keys: scalars (YAML's complex keys are refused)
            known = measured[id(value)] = (size, height)
        if depth - 1 + known[1] > self.max_depth:   # an alias of a deep value, used deep down
            raise BoundExceeded(self._too_deep())
        return known

    def _too_big(self) -> str:
        return "an integer beyond 64 bits (Kubernetes' integers are 64-bit; write larger numbers as strings)"

    def _too_deep(self) -> str:
        return f"nested deeper than {self.max_depth} levels (or a YAML alias of itself)"

    def _too_many(self) -> str:
        return (f"more than {self.limit:,} values (YAML aliases count each time they are used): "
                f"an alias bomb, or more than weft reads from one file")


def read_bounded(path: str | os.PathLike[str], limit: int, what: str, error: Callable[[str], Exception]) -> bytes:
    """The bytes of the file at `path` (a `what`: "manifest file", "saved plan"). More than `limit`
    of them is an `error`, found without reading more than that (the file may be a /proc file, or
    growing); so is a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from None
    if len(data) > limit:
        most = f"{limit >> 20} MiB" if limit >= MiB else f"{limit:,} bytes"
        raise error(f"{path}: larger than {most}, the most weft reads from one {what}")
    return data


def check_depth(value: Any, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise BoundExceeded naming `what` if `value` nests deeper than `max_depth` (an API answer:
    JSON has no aliases, so its size is bounded by its bytes and only its depth is checked)."""
    if (type(value) is dict or type(value) is list) and not _within(value, max_depth - 1):
        raise BoundExceeded(f"{what}: nested deeper than {max_depth} levels")


def _within(value: Any, levels: int) -> bool:
    """Whether the mappings and lists below `value` nest at most `levels` deep (recursive: the
    recursion is as deep as the limit, and this is 3x faster than an explicit stack)."""
    for item in (value.values() if type(value) is dict else value):
        kind = type(item)
        if (kind is dict or kind is list) and (levels == 0 or not _within(item, levels - 1)):
            return False
    return True
