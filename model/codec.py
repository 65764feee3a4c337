"""Model values <-> JSON text, for what weft keeps between runs (the desired-state cache).

Data, not code: decoding only ever builds the types registered here (the model's dataclasses
and enums), so a cache file can at worst be wrong, never run anything. Anything else in the
input is an error (CodecError).

The shapes: strings, numbers, booleans and None are themselves; a tuple is a JSON list; a dict
with string keys is a JSON object. The rest are objects marked by one of these keys, which begin
with a NUL character (a dict with such a key is written as a mapping):
  a dataclass   {"\u0000": "Name", "v": [field values in order]}
  an enum       {"\u0000e": "Name", "v": value}
  a list        {"\u0000l": [...]}   (rare: lists are kept lists, e.g. the CNI snapshot's)
  a frozenset   {"\u0000s": [...]}
  any other mapping  {"\u0000m": [[key, value], ...]}
A tuple or frozenset of JOIN_AT or more items, all strings and none holding a line break (a
set's members, a chain's rules), is one string of them joined by line breaks, written and read
in one step rather than item by item:
  such a tuple      {"\u0000j": "item\nitem\n..."}
  such a frozenset  {"\u0000J": "item\nitem\n..."}
A dataclass's fields and a mapping's values are never joined: a string there is always written
as itself (desired.sources and reconciler.run search encoded text for a name so written).
`loads` decodes in one pass of the C JSON parser: it hands every object, inner ones first, to
`_node`, which leaves a plain dict as it is and builds the value a marked one stands for. A JSON
list is a tuple; a marked list comes out of `_node` as a `_Kept` (a list its container keeps a
list rather than taking it for a tuple), made a plain list where it is placed.

Speed (this matters: a run over 150,000 pods decodes them whenever anything changed): a
dataclass whose __init__ is the one dataclasses generated, without `__post_init__` or slots, is
built without calling that __init__ (which, the classes being frozen, sets each field through
object.__setattr__): its fields are set at once, the same values in the same places. Any other
class is built through its constructor, so its checks run.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from operator import attrgetter
from typing import Any

_TYPES: dict[str, type] = {}
_BUILD: dict[str, tuple[type, tuple[str, ...], bool]] = {}   # name -> (class, field names, direct)
DATACLASS, ENUM, LIST, FROZENSET, MAPPING = "\x00", "\x00e", "\x00l", "\x00s", "\x00m"
JOINED, JOINED_SET = "\x00j", "\x00J"
_MARKERS = frozenset((DATACLASS, ENUM, LIST, FROZENSET, MAPPING, JOINED, JOINED_SET))
JOIN_AT = 16            # fewer strings are written one by one (joining gains nothing there)


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
            fields = tuple(f.name for f in dataclasses.fields(cls))
            _BUILD[cls.__name__] = (cls, fields, _direct(cls))
            _GETTERS[cls] = _getter(fields)


def _direct(cls: type) -> bool:
    """Whether `cls` may be built by setting its fields: instances have a __dict__, there is no
    __post_init__, and its __init__ is the one dataclasses generated (which only sets them)."""
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    return (code is not None and code.co_filename == "<string>" and code.co_name == "__init__"
            and not hasattr(cls, "__post_init__")
            and not any("__slots__" in c.__dict__ for c in cls.__mro__[:-1]))


def register_module(namespace: Mapping[str, Any]) -> None:
    """Register every dataclass and enum a module defines (pass its globals())."""
    module = namespace.get("__name__")
    register(*(v for v in namespace.values() if isinstance(v, type) and v.__module__ == module
               and (dataclasses.is_dataclass(v) or issubclass(v, Enum))))


_GETTERS: dict[type, Callable[[Any], tuple]] = {}     # class -> its field values, in order, as a tuple
_PLAIN = frozenset((str, int, float, bool, type(None)))
_STRINGS = frozenset((str,))


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple]:
    """A dataclass's field values as a tuple, in one C call (operator.attrgetter gives a bare
    value for one name: made a tuple)."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda value: (one(value),)
    return lambda value: ()


# ---- encoding -------------------------------------------------------------------------------

def encode(value: Any) -> Any:
    """`value` as JSON-able data (see the module docstring for the shapes).

    Items that are all strings (a set's members, a chain's rules, most of a pod's fields) are
    taken in one step: whether they are is asked of the items' types at C speed (stopping at
    the first other one), and they are copied as they are, not looked at one by one (1.0 s of
    a 150,000-pod render's encoding). The output is the same either way."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is tuple:
        if _STRINGS.issuperset(map(type, value)):
            return _joined(value, JOINED) if len(value) >= JOIN_AT else list(value)
        return [v if type(v) is str else encode(v) for v in value]
    fields = _GETTERS.get(kind)
    if fields is not None:
        values = fields(value)
        return {DATACLASS: kind.__name__, "v": list(values) if _STRINGS.issuperset(map(type, values))
                else [v if type(v) is str else encode(v) for v in values]}
    if kind is dict:
        if _STRINGS.issuperset(map(type, value)) and _MARKERS.isdisjoint(value):
            if _STRINGS.issuperset(map(type, value.values())):
                return dict(value)
            return {k: v if type(v) is str else encode(v) for k, v in value.items()}
        return {MAPPING: [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is frozenset:
        if _STRINGS.issuperset(map(type, value)):
            return _joined(value, JOINED_SET) if len(value) >= JOIN_AT else {FROZENSET: list(value)}
        return {FROZENSET: [v if type(v) is str else encode(v) for v in value]}
    if kind is list:
        return {LIST: list(value) if _STRINGS.issuperset(map(type, value))
                else [v if type(v) is str else encode(v) for v in value]}
    if isinstance(value, Enum):
        return {ENUM: kind.__name__, "v": value.value}
    if dataclasses.is_dataclass(value):
        raise CodecError(f"{kind.__qualname__} is not a registered model type")
    if isinstance(value, Mapping):
        return encode(dict(value))
    raise CodecError(f"cannot encode a {kind.__name__}")


def _joined(items: tuple | frozenset, marker: str) -> Any:
    """Strings (at least JOIN_AT) as one string joined by line breaks, unless one holds a line
    break (then the joined text has more than one fewer than the items): as a list then."""
    text = "\n".join(items)
    if text.count("\n") != len(items) - 1:
        return list(items) if marker == JOINED else {FROZENSET: list(items)}
    return {marker: text}


def dumps(value: Any) -> str:
    """`value` as compact JSON text."""
    return json.dumps(encode(value), separators=(",", ":"), ensure_ascii=False)


# ---- decoding -------------------------------------------------------------------------------

class _Kept(list):
    """A decoded list while it is being placed: its container makes it a plain list again."""


_UNPLACED = frozenset((list, _Kept))
_new = object.__new__


def _placed(v: Any) -> Any:
    """A decoded value as it is placed in its container: a JSON list (not yet converted) as the
    tuple it encodes, a decoded list as a plain list, anything else as it is."""
    kind = type(v)
    return _tuple(v) if kind is list else list(v) if kind is _Kept else v


def _tuple(items: list | tuple) -> tuple:
    """A JSON list as the tuple it encodes (its lists too; its objects are decoded already)."""
    if _UNPLACED.isdisjoint(map(type, items)):
        return tuple(items)
    return tuple([_tuple(v) if type(v) is list else list(v) if type(v) is _Kept else v for v in items])


def _node(obj: dict) -> Any:
    """One JSON object of encoded data -> its value (inner objects are values already)."""
    if DATACLASS in obj:
        name, values = obj[DATACLASS], obj.get("v")
        built = _BUILD.get(name) if type(name) is str else None
        if built is None and type(name) is str and _register_model():
            built = _BUILD.get(name)
        if built is None or type(values) is not list or len(obj) != 2:
            raise CodecError(f"unknown model type {str(name)[:80]!r}")
        cls, names, direct = built
        if not _UNPLACED.isdisjoint(map(type, values)):     # (inline _placed: this runs per object)
            values = [_tuple(v) if type(v) is list else list(v) if type(v) is _Kept else v for v in values]
        if direct:
            if len(values) != len(names):
                raise CodecError(f"{name}: {len(values)} values for {len(names)} fields")
            value: object = _new(cls)
            value.__dict__.update(zip(names, values, strict=False))   # lengths checked above
            return value
        try:
            return cls(*values)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"{name}: {str(exc)[:200]}") from None
    if _MARKERS.isdisjoint(obj):                    # a plain dict
        if not _UNPLACED.isdisjoint(map(type, obj.values())):
            for k, v in obj.items():
                obj[k] = _placed(v)
        return obj
    if len(obj) == 1 and LIST in obj:
        items = obj[LIST]
        if type(items) is not list:
            raise CodecError("a list must hold a list")
        return _Kept(map(_placed, items))
    if len(obj) == 1 and FROZENSET in obj:
        items = obj[FROZENSET]
        if type(items) is not list:
            raise CodecError("a frozenset must hold a list")
        try:
            return frozenset(_tuple(items) if not _UNPLACED.isdisjoint(map(type, items)) else items)
        except TypeError:
            raise CodecError("a frozenset holds an unhashable value") from None
    if len(obj) == 1 and (JOINED in obj or JOINED_SET in obj):
        text = obj.get(JOINED, obj.get(JOINED_SET))
        if type(text) is not str:
            raise CodecError("joined strings must be a string")
        items = text.split("\n")
        return tuple(items) if JOINED in obj else frozenset(items)
    if len(obj) == 2 and ENUM in obj:
        enum = _TYPES.get(obj[ENUM]) if type(obj[ENUM]) is str else None
        if enum is None or not issubclass(enum, Enum):
            raise CodecError(f"unknown enum {str(obj[ENUM])[:80]!r}")
        try:
            return enum(obj.get("v"))
        except (ValueError, TypeError) as exc:
            raise CodecError(str(exc)[:200]) from None
    if len(obj) == 1 and MAPPING in obj:
        pairs = obj[MAPPING]
        if type(pairs) is not list or not all(type(p) is list and len(p) == 2 for p in pairs):
            raise CodecError("a mapping must hold [key, value] pairs")
        try:
            return {_placed(k): _placed(v) for k, v in pairs}
        except TypeError:
            raise CodecError("a mapping has an unhashable key") from None
    raise CodecError(f"unexpected object with keys {sorted(map(repr, obj))[:4]}")


# The modules whose types may be in encoded data. A module registers its types when imported, and
# a process may decode before importing some of them (a no-op run decodes its cached render
# first: a Calico policy's set meanings hold model.selector's types, and that render was never
# reused but made anew on every run, ~5 s at 2,000 Calico policies).
_MODEL_MODULES = ("weft.model.cluster", "weft.model.selector", "weft.model.kernel", "weft.model.services")
_registered_all = False


def _register_model() -> bool:
    """Import every model module (once): False when that was done already."""
    global _registered_all
    if _registered_all:
        return False
    _registered_all = True
    import importlib
    for module in _MODEL_MODULES:
        importlib.import_module(module)
    return True


def loads(text: str | bytes) -> Any:
    """The value `dumps` made of it. Raises CodecError (or ValueError for text that is not JSON,
    RecursionError for nesting deeper than the interpreter takes)."""
    return _placed(json.loads(text, object_hook=_node))


def decode(data: Any) -> Any:
    """The value of already-parsed data (`encode`'s output, e.g. read back with json.loads)."""
    return _placed(_inner(data))


def _inner(data: Any) -> Any:
    """`data` as json.loads with `_node` as object hook gives it: objects decoded, lists kept."""
    kind = type(data)
    if kind is dict:
        return _node({k: _inner(v) for k, v in data.items()})
    if kind is list:
        return [_inner(v) for v in data]
    if kind in _PLAIN:
        return data
    raise CodecError(f"unexpected {kind.__name__} in encoded data")


def decode_all(items: Iterable[Any]) -> list:
    return [decode(item) for item in items]
