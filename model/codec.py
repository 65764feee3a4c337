"""Model values <-> JSON-able data, for what weft keeps between runs (the desired-state cache).

Data, not code: decoding only ever builds the types registered here (the model's frozen
dataclasses and enums), through their own constructors, so a cache file can at worst be wrong,
never run anything. Anything else in the input is an error.

The shapes: a dataclass is {"@": "Name", "v": [field values in order]}; an enum member
{"e": "Name", "v": value}; a tuple a JSON list; a list {"l": [...]}; a dict with string
keys {"d": {...}}, any other mapping {"m": [[key, value], ...]}; a frozenset {"s": [...]}.
Strings, numbers, booleans and None are themselves. Sets of strings and tuples of strings
(ipset members, chain rules) cost one C-level conversion each, so large kernel states decode at
about json.loads speed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

_TYPES: dict[str, type] = {}
_FIELDS_OK: set[type] = set()         # the registered dataclasses


class CodecError(ValueError):
    """Data that does not decode into registered model values."""


def register(*classes: type) -> None:
    """Allow `classes` (dataclasses or enums) in encoded data, under their class names."""
    for cls in classes:
        if not (dataclasses.is_dataclass(cls) or issubclass(cls, Enum)):
            raise TypeError(f"{cls!r} is neither a dataclass nor an enum")
        known = _TYPES.setdefault(cls.__name__, cls)
        if known is not cls:
            raise TypeError(f"two codec types named {cls.__name__}: {known!r} and {cls!r}")
        if dataclasses.is_dataclass(cls):
            _FIELDS_OK.add(cls)


def register_module(namespace: Mapping[str, Any]) -> None:
    """Register every dataclass and enum a module defines (pass its globals())."""
    module = namespace.get("__name__")
    register(*(v for v in namespace.values() if isinstance(v, type) and v.__module__ == module
               and (dataclasses.is_dataclass(v) or issubclass(v, Enum))))


_FIELDS: dict[type, tuple[str, ...]] = {}
_PLAIN = frozenset((str, int, float, bool, type(None)))


def _fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        if _TYPES.get(cls.__name__) is not cls:
            raise CodecError(f"{cls.__qualname__} is not a registered model type")
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is tuple:
        return [v if type(v) is str else encode(v) for v in value]
    if kind is list:
        return {"l": [v if type(v) is str else encode(v) for v in value]}
    if kind is frozenset:
        return {"s": [v if type(v) is str else encode(v) for v in value]}
    if kind is dict:
        for k in value:
            if type(k) is not str:
                return {"m": [[encode(k), encode(v)] for k, v in value.items()]}
        return {"d": {k: v if type(v) is str else encode(v) for k, v in value.items()}}
    if isinstance(value, Enum):
        return {"e": kind.__name__, "v": value.value}
    if dataclasses.is_dataclass(value):
        return {"@": kind.__name__, "v": [encode(getattr(value, name)) for name in _fields(kind)]}
    if isinstance(value, Mapping):
        return encode(dict(value))
    raise CodecError(f"cannot encode a {kind.__name__}")


def decode(data: Any) -> Any:
    kind = type(data)
    if kind in _PLAIN:
        return data
    if kind is list:
        return tuple([v if type(v) in _PLAIN else decode(v) for v in data])
    if kind is not dict:
        raise CodecError(f"unexpected {kind.__name__} in encoded data")
    if "@" in data:
        cls = _TYPES.get(data["@"])
        values = data.get("v")
        if cls not in _FIELDS_OK or type(values) is not list:
            raise CodecError(f"unknown model type {data['@']!r}")
        try:
            return cls(*[v if type(v) in _PLAIN else decode(v) for v in values])
        except TypeError as exc:
            raise CodecError(f"{data['@']}: {exc}") from None
    if "d" in data:
        mapping = data["d"]
        if type(mapping) is not dict:
            raise CodecError("a 'd' entry must hold an object")
        return {k: v if type(v) in _PLAIN else decode(v) for k, v in mapping.items()}
    if "s" in data:
        return frozenset([v if type(v) is str else decode(v) for v in _items(data["s"])])
    if "l" in data:
        return [v if type(v) in _PLAIN else decode(v) for v in _items(data["l"])]
    if "e" in data:
        cls = _TYPES.get(data["e"])
        if cls is None or not issubclass(cls, Enum):
            raise CodecError(f"unknown enum {data['e']!r}")
        try:
            return cls(data.get("v"))
        except ValueError as exc:
            raise CodecError(str(exc)) from None
    if "m" in data:
        pairs = _items(data["m"])
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise CodecError("an 'm' entry must hold [key, value] pairs")
        return {decode(k): decode(v) for k, v in pairs}
    raise CodecError(f"unexpected object with keys {sorted(data)[:4]}")


def _items(value: Any) -> list:
    if not isinstance(value, list):
        raise CodecError("expected a list")
    return value


def decode_all(items: Iterable[Any]) -> list:
    return [decode(item) for item in items]
