"""Which Python types the LangGraph integration stores and rebuilds: ``StateSerializer``.

This module owns the type policy of the saver's default serializer.  Values are encoded by
LangGraph's own ``JsonPlusSerializer`` (msgpack with extension records naming a class as
``module, name``); what this module decides is which named classes may be rebuilt when a
value is read back, and it checks at write time that every class in a value would be.

A class is rebuilt when it is

1. one of LangGraph's safe types (``SAFE_MSGPACK_TYPES``: datetimes, UUID, Decimal, sets,
   LangChain messages, ``Send``, ``Interrupt``, ``Command`` ...), or
2. listed in ``allowed_types`` (classes or ``(module, name)`` pairs), or added by
   LangGraph's ``with_allowlist`` (``compile()`` does that under
   ``LANGGRAPH_STRICT_MSGPACK=true`` with the graph's schema types), or
3. (``app_types=True``, the default) one of the application's own data classes: a
   dataclass, Enum, pydantic model or NamedTuple, defined at the top level of a module
   that the process has already imported and that is not installed library code (not
   the standard library, not site-packages).  That is what a graph's state is made of,
   and it comes back as the same type, as with SqliteSaver.

Values are encoded as LangGraph encodes them, except that tuples stay tuples at every
depth (:data:`EXT_TUPLE`; LangGraph writes a list), that a datetime in a ``ZoneInfo`` zone
is written as its fields and zone (LangGraph writes its ISO text, which gave the offset
back, not the zone), and that a value whose class would be rebuilt but not as it is — a
dataclass with a ``field(init=False)`` or a required ``InitVar`` (the read raised), one
whose ``__post_init__`` changes a stored field when it runs again, a pydantic model whose
private attributes or ``exclude=True`` fields are not what rebuilding gives — is refused
at write time (``_Packer``).  Those last two are
detected by rebuilding the value once at write time (only classes that have a
``__post_init__``, private attributes or excluded fields).

A dict key LangGraph's encoding would write as its string (anything but a str, number,
bool, None, bytes or a tuple of those: an Enum, a date, a UUID) is refused, and so is a
str holding a lone surrogate (LangGraph's encoding writes ``?`` in its place).

Anything else is refused loudly: at write time (``StateTypeError``, a ``TypeError``
naming the type and the ``allowed_types`` recipe), before anything is stored, so a value
is never silently turned into a dict on the next turn; and at read time (a stored value
naming a class the policy does not allow raises, it is not handed back as raw data).

Safety: nothing pickles, and a stored value can only ever name a data class of the
application or an allowlisted one.  Modules are never imported because a stored value
names them (only LangGraph's fixed safe modules are, and the module of a class listed in
``allowed_types`` as ``(module, name)``: the application named it); functions other
than LangGraph's safe ``re.compile`` (a stored ``re.Pattern``; ``os.system`` is refused),
methods other than its safe ``datetime.fromisoformat``, and library classes are
refused.  So a process reading a thread whose state holds the application's classes
must have imported their modules first (SqliteSaver imports any module a stored value
names), or list them: ``allowed_types=[("mytypes", "Point")]``.
"""
from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib
import os
import re
import site
import sys
import sysconfig
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any
from zoneinfo import ZoneInfo

import ormsgpack
from langgraph.checkpoint.serde import _msgpack as lg_msgpack
from langgraph.checkpoint.serde import jsonplus as lg_jsonplus
from langgraph.checkpoint.serde.jsonplus import (EXT_CONSTRUCTOR_KW_ARGS,
                                                 EXT_CONSTRUCTOR_POS_ARGS,
                                                 EXT_CONSTRUCTOR_SINGLE_ARG,
                                                 EXT_DELTA_SNAPSHOT, EXT_METHOD_SINGLE_ARG,
                                                 EXT_NUMPY_ARRAY, EXT_PYDANTIC_V1,
                                                 EXT_PYDANTIC_V2, JsonPlusSerializer)
from langgraph.checkpoint.serde.types import SendProtocol, _DeltaSnapshot
from langgraph.store.base import Item

from walstore.errors import type_and_message

__all__ = ["StateSerializer", "StateTypeError", "TypePolicy"]

_OPTIONS = ormsgpack.OPT_NON_STR_KEYS
# walstore's own extension: a tuple (LangGraph's encoding writes one as a list, so a
# tuple came back as a list: a frozen dataclass unhashable, an Enum of tuple values
# unreadable).  Its payload is the items as a msgpack array.
EXT_TUPLE = 87
# (LangGraph's options but one: a str with a lone surrogate is refused, not given '?')
_PACK_OPTIONS = ((lg_jsonplus._option & ~ormsgpack.OPT_REPLACE_SURROGATES)
                 | ormsgpack.OPT_PASSTHROUGH_TUPLE)
# msgpack ext headers (fixext 1..16, ext 8/16/32): data without these bytes has no class
_EXT_MARKER = re.compile(b"[\xc7-\xc9\xd4-\xd8]")


def _has_ext_marker(data: Any) -> bool:
    """Whether ``data`` holds a byte of :data:`_EXT_MARKER`.  For bytes, eight int
    membership tests (each a memchr): the regex's charset scan took ~25 instructions a
    byte, ~7,000 for a 300-byte record, 28 records an invoke (callgrind, round 33)."""
    if type(data) is bytes:
        return (0xC7 in data or 0xC8 in data or 0xC9 in data or 0xD4 in data
                or 0xD5 in data or 0xD6 in data or 0xD7 in data or 0xD8 in data)
    return _EXT_MARKER.search(data) is not None


class StateTypeError(TypeError):
    """A value names a class the saver would not give back as that class."""


def _leading_strings(payload: bytes) -> tuple[str, str, str] | None:
    """(module, name, "") from the head of an ext payload ``[module, name, ...]`` without
    decoding the rest; None when it does not start that way."""
    try:
        b0 = payload[0]
        if 0x90 <= b0 <= 0x9F:
            i = 1
        elif b0 == 0xDC:
            i = 3
        elif b0 == 0xDD:
            i = 5
        else:
            return None
        out = []
        for _ in range(2):
            b0 = payload[i]
            if 0xA0 <= b0 <= 0xBF:
                n, i = b0 & 0x1F, i + 1
            elif b0 == 0xD9:
                n, i = payload[i + 1], i + 2
            elif b0 == 0xDA:
                n, i = int.from_bytes(payload[i + 1:i + 3], "big"), i + 3
            else:
                return None
            out.append(payload[i:i + n].decode("utf-8"))
            i += n
        return out[0], out[1], ""
    except (IndexError, UnicodeDecodeError):
        return None


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - some embedded interpreters
        pass
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


_LIBRARY_ROOTS = _library_roots()


def is_application_module(module_name: str) -> bool:
    """Whether an already-imported module is the application's own code (not the
    standard library or an installed distribution)."""
    module = sys.modules.get(module_name)
    if module is None:
        return False
    if module_name == "__main__":
        return True
    path = getattr(module, "__file__", None)
    if not path:
        return False
    return not os.path.realpath(path).startswith(_LIBRARY_ROOTS)


def _is_data_class(cls: Any) -> bool:
    if not isinstance(cls, type):
        return False
    if issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls):
        return True
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # NamedTuple
        return True
    return any(base.__module__.startswith("pydantic") and base.__name__ == "BaseModel"
               for base in cls.__mro__)


def normalize_types(types: Iterable[Any]) -> frozenset[tuple[str, str]]:
    """``allowed_types`` entries (classes or (module, name) pairs) as (module, name)."""
    out = set()
    for t in types:
        if isinstance(t, type):
            out.add((t.__module__, t.__name__))
        elif isinstance(t, (tuple, list)) and len(t) >= 2:
            out.add((str(t[0]), str(t[1])))
        else:
            raise TypeError(f"allowed_types takes classes or (module, name) pairs, not {t!r}")
    return frozenset(out)


class TypePolicy:
    """Decides which classes named in stored values are rebuilt (see the module doc)."""

    def __init__(self, allowed: frozenset[tuple[str, str]] = frozenset(),
                 app_types: bool = True) -> None:
        self.allowed = allowed
        self.app_types = app_types
        self._permitted: set[tuple[str, str]] = set()  # positive verdicts only
        self._classes: dict[tuple[str, str], Any] = {}  # classes already found and permitted
        self._lock = threading.Lock()
        self._local = threading.local()  # the error an ext hook raised (ormsgpack hides it)

    # ---- the verdict ------------------------------------------------------------------
    def refusal(self, module: str, name: str) -> str | None:
        """None when ``module.name`` is rebuilt; otherwise why not."""
        key = (module, name)
        if key in self._permitted or key in lg_msgpack.SAFE_MSGPACK_TYPES or key in self.allowed:
            return None
        if not self.app_types:
            return "it is not one of LangGraph's safe types and not in allowed_types"
        mod = sys.modules.get(module)
        if mod is None:
            return (f"its module {module!r} is not imported (a stored value never imports "
                    f"one): import {module} before reading, or list the class as "
                    f"allowed_types=[({module!r}, {name!r})], whose modules are imported")
        cls = getattr(mod, name, None)
        if not _is_data_class(cls):
            return (f"{module}.{name} is not a module-level dataclass, Enum, pydantic model "
                    f"or NamedTuple (a class defined inside a function or another class "
                    f"cannot be found again by name)")
        if not is_application_module(module):
            return (f"it is library code (module {module!r} is installed or standard "
                    f"library); only the application's own data classes are rebuilt "
                    f"without being listed")
        with self._lock:
            self._permitted.add(key)
        return None

    def _method_refusal(self, module: str, name: str, method: str) -> str | None:
        if (module, name, method) in lg_msgpack.SAFE_MSGPACK_METHODS:
            return None
        if (module, name) in self.allowed and method == "fromisoformat":
            return None
        return f"method {module}.{name}.{method} is not one LangGraph deems safe"

    @staticmethod
    def _recipe(module: str, name: str) -> str:
        return (f"list it: WalstoreSaver(store, allowed_types=[{name}]) (or "
                f"allowed_types=[({module!r}, {name!r})]), or keep plain data "
                f"(dict, list, str, numbers) in the graph state")

    # ---- at write time ------------------------------------------------------------------
    def audit(self, data: bytes) -> None:
        """Raise StateTypeError unless every class named in ``data`` would be rebuilt."""
        if _has_ext_marker(data):
            self._unpack_top(data, self._audit_ext)

    def _unpack_top(self, data: bytes, hook: Any) -> Any:
        """Unpack with an ext hook, re-raising the hook's own error (ormsgpack replaces
        it with a bare ValueError)."""
        self._local.error = None
        try:
            return ormsgpack.unpackb(data, ext_hook=hook, option=_OPTIONS)
        except ValueError:
            error, self._local.error = getattr(self._local, "error", None), None
            if error is not None:
                raise error from None
            raise

    def _failed(self, error: BaseException) -> BaseException:
        if getattr(self._local, "error", None) is None:
            self._local.error = error
        return error

    def _audit_ext(self, code: int, payload: bytes) -> None:
        """Check one extension record without rebuilding it: its (module, name) header,
        and its payload only when that holds extension records itself."""
        if code == EXT_NUMPY_ARRAY:
            return None
        if code in (EXT_DELTA_SNAPSHOT, EXT_TUPLE):
            names = None
        else:
            names = _leading_strings(payload)
            if names is None or code == EXT_METHOD_SINGLE_ARG:
                tup = ormsgpack.unpackb(payload, option=_OPTIONS, ext_hook=self._audit_ext)
                names = (str(tup[0]), str(tup[1]),
                         str(tup[3]) if code == EXT_METHOD_SINGLE_ARG else "")
            module, name, method = names
            why = (self._method_refusal(module, name, method) if code == EXT_METHOD_SINGLE_ARG
                   else self.refusal(module, name))
            if why is not None:
                raise self._failed(StateTypeError(
                    f"WalstoreSaver refuses to store a {module}.{name}: it would not come "
                    f"back as that type ({why}); {self._recipe(module, name)}"))
        if _has_ext_marker(payload):  # nested classes (a dataclass inside a dataclass)
            ormsgpack.unpackb(payload, option=_OPTIONS, ext_hook=self._audit_ext)
        return None

    # ---- at read time -------------------------------------------------------------------
    def _class(self, module: str, name: str) -> Any:
        cls = self._classes.get((module, name))
        if cls is not None:  # (every message of a conversation names one of a few classes)
            return cls
        why = self.refusal(module, name)
        if why is not None:
            raise StateTypeError(
                f"a stored value names {module}.{name}, which this saver does not rebuild "
                f"({why}); if it is yours, {self._recipe(module, name)}")
        if (module, name) in lg_msgpack.SAFE_MSGPACK_TYPES:
            cls = getattr(importlib.import_module(module), name)  # LangGraph's fixed set
        elif module not in sys.modules and (module, name) in self.allowed:
            # listed by the application in allowed_types: its module is imported by name
            # (the only module a stored value can have imported, and only when listed)
            cls = getattr(importlib.import_module(module), name, None)
        else:
            cls = getattr(sys.modules[module], name, None)
        # (LangGraph's safe set names one function, ``re.compile``: a pattern is stored
        # as its call; anything else named must be a class)
        if not (isinstance(cls, type) or ((module, name) in lg_msgpack.SAFE_MSGPACK_TYPES
                                          and callable(cls))):
            raise StateTypeError(f"a stored value names {module}.{name}, which is not a "
                                 f"class in module {module!r}")
        self._classes[(module, name)] = cls
        return cls

    def load(self, data: bytes) -> Any:
        """Unpack a stored msgpack value, rebuilding what the policy allows."""
        return self._unpack_top(data, self.rebuild_ext)

    def rebuild_ext(self, code: int, payload: bytes) -> Any:
        """The msgpack ext hook: rebuild one extension record (LangGraph's encodings)."""
        try:
            return self._rebuild(code, payload)
        except StateTypeError as e:
            raise self._failed(e)
        except Exception as e:
            raise self._failed(StateTypeError(
                f"a stored value could not be rebuilt (msgpack extension {code}): "
                f"{type_and_message(e)}")) from e

    def _rebuild(self, code: int, payload: bytes) -> Any:
        if code == EXT_DELTA_SNAPSHOT:
            return _DeltaSnapshot(self._unpack(payload))
        if code == EXT_TUPLE:
            return tuple(self._unpack(payload))
        if code == EXT_NUMPY_ARRAY:
            return self._numpy(payload)
        tup = self._unpack(payload)
        module, name = str(tup[0]), str(tup[1])
        if code == EXT_METHOD_SINGLE_ARG:
            why = self._method_refusal(module, name, str(tup[3]))
            if why is not None:
                raise StateTypeError(f"a stored value calls {module}.{name}.{tup[3]}: {why}")
            return getattr(self._class(module, name), str(tup[3]))(tup[2])
        cls = self._class(module, name)
        if code == EXT_CONSTRUCTOR_SINGLE_ARG:
            return cls(tup[2])
        if code == EXT_CONSTRUCTOR_POS_ARGS:
            if (module, name) == ("langgraph.types", "Send"):
                args = tup[2]
                return cls(args[0], args[1]) if len(args) == 2 else \
                    cls(args[0], args[1], timeout=args[2])
            return cls(*tup[2])
        if code == EXT_CONSTRUCTOR_KW_ARGS:
            return cls(**tup[2])
        if code in (EXT_PYDANTIC_V1, EXT_PYDANTIC_V2):
            try:
                return cls(**tup[2])
            except Exception:  # as LangGraph: keep what validation would now reject
                unchecked = cls.model_construct if code == EXT_PYDANTIC_V2 else cls.construct
                return unchecked(**tup[2])
        raise StateTypeError(f"a stored value uses an unknown msgpack extension {code}")

    def _unpack(self, payload: bytes) -> Any:
        return ormsgpack.unpackb(payload, ext_hook=self.rebuild_ext, option=_OPTIONS)

    def _numpy(self, payload: bytes) -> Any:
        np = sys.modules.get("numpy")
        if np is None:
            raise StateTypeError("a stored value holds a numpy array but numpy is not "
                                 "imported in this process")
        dtype, shape, order, buf = self._unpack(payload)
        return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape, order=order)


# ---- values the encoding flattens without naming a class ---------------------------------
# LangGraph's msgpack encoding writes a subclass of dict, list, str or int as the plain
# base type, a bytearray (not the whole value) as bytes, a dict key that is not plain as
# its value or text, and an exception as its repr string: no class name is left in the
# bytes for ``audit`` to check, and the value came back as another type (a probe: a
# ``Profile(dict)`` read back as ``dict``, ``ValueError("boom")`` as
# ``"ValueError('boom')"``), at the top of a value or inside a dataclass alike.
_PLAIN = frozenset({str, int, float, bool, type(None), bytes})
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
_FLATTENED = (dict, list, str, int)
_verdicts: dict[type, str | None] = {}  # class -> why it is refused (None: fine)


def _verdict(cls: type) -> str | None:
    why = _verdicts.get(cls, "?")
    if why != "?":
        return why
    why = None
    if issubclass(cls, BaseException):
        why = "an exception, which LangGraph's encoding stores as its repr string"
    elif issubclass(cls, (bytearray, memoryview)):
        why = (f"a {cls.__name__}, which LangGraph's encoding stores as bytes (a "
               f"bytearray is given back only as a whole channel value)")
    elif issubclass(cls, _FLATTENED) and not issubclass(cls, (enum.Enum, tuple)):
        base = next(b for b in _FLATTENED if issubclass(cls, b))
        why = (f"a subclass of {base.__name__}, which LangGraph's encoding stores as a "
               f"plain {base.__name__}")
    if len(_verdicts) < 4096:
        _verdicts[cls] = why
    return why


def refuse_flattened(obj: Any) -> None:
    """StateTypeError for a value in the container ``obj`` (walked through dicts, lists,
    tuples and sets) that would come back as another type without a class name in the
    bytes.  The walk stops at other objects: the encoder (``_Packer``) reaches each of
    them and walks what it encodes of it (a dataclass's fields, a deque's items ...) with
    :func:`refuse_flattened_in`, so every value is walked once, at any depth.  About 0.1 µs
    per value (a message list of 200: ~20 µs, against ~750 µs to encode it)."""
    stack = [obj]
    seen: set[int] = set()  # containers walked (a cycle is the encoder's to refuse)
    verdicts, plain, containers = _verdicts, _PLAIN, _CONTAINERS
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for x in (v.values() if type(v) is dict else v):
            cls = type(x)
            if cls in plain:
                continue
            if cls in containers:
                stack.append(x)
                continue
            why = verdicts.get(cls, "?")
            if why == "?":
                why = _verdict(cls)
            if why is not None:
                _refuse(cls, why)
        if type(v) is dict:
            for k in v:
                if type(k) not in plain:
                    _refuse_key(k)
    return None


# ormsgpack without a ``default`` encodes plain data only: it raises at anything else
# (a subclass, a tuple, a set, an Enum, a date, a dataclass, a model, an exception, a key
# that is not a str), except a bytearray or memoryview, which it writes as bytes
_PLAIN_ONLY = (ormsgpack.OPT_PASSTHROUGH_SUBCLASS | ormsgpack.OPT_PASSTHROUGH_TUPLE
               | ormsgpack.OPT_PASSTHROUGH_DATACLASS | ormsgpack.OPT_PASSTHROUGH_DATETIME
               | ormsgpack.OPT_PASSTHROUGH_ENUM | ormsgpack.OPT_PASSTHROUGH_UUID
               | ormsgpack.OPT_PASSTHROUGH_BIG_INT)


def _surely_plain(value: Any) -> bool:
    """True when ormsgpack finds only plain data in ``value`` (str keys): a µs where a
    walk in Python takes ten; False does not mean it is not (an int key, a tuple, bytes)."""
    try:
        packed = ormsgpack.packb(value, option=_PLAIN_ONLY)
    except Exception:  # noqa: BLE001 - something that is not plain data (or an int key)
        return False
    # (the bytes markers bin 8/16/32 looked for as ints: ``b"\xc4" in packed`` first
    # tries the bytes as an int, and raising and clearing that TypeError cost ~2,000
    # instructions per test, three per message encoded; an int is a plain memchr)
    return not (0xC4 in packed or 0xC5 in packed or 0xC6 in packed)


def refuse_flattened_in(value: Any) -> None:
    """:func:`refuse_flattened` for any value: a container is walked, anything else is
    checked itself (a subclass of dict, list, str or int, an exception)."""
    cls = type(value)
    if cls in _PLAIN:
        return
    if cls in _CONTAINERS:
        if not _surely_plain(value):
            refuse_flattened(value)
        return
    why = _verdict(cls)
    if why is not None:
        _refuse(cls, why)


def _refuse_key(key: Any) -> None:
    """StateTypeError for a dict key that would come back as another type: the encoding
    writes a key that is not a str, int, float, bool, None, bytes or a tuple of those as
    its string (an Enum as its value, a date or UUID as its text), without a class name."""
    cls = type(key)
    if cls is tuple:
        for part in key:
            if type(part) not in _PLAIN:
                _refuse_key(part)
        return
    why = _verdict(cls)
    if why is None:
        why = ("used as a dict key, which LangGraph's encoding stores as a plain "
               "string or number (an Enum as its value, a date or UUID as its text)")
    _refuse(cls, why)


def _refuse(cls: type, why: str) -> None:
    raise StateTypeError(
        f"WalstoreSaver refuses to store a {cls.__module__}.{cls.__qualname__}: it is "
        f"{why}, so it would not come back as that type; store the plain type, or a "
        f"dataclass / pydantic model (rebuilt by name; see allowed_types)")


# ---- values that would come back changed although their class is rebuilt ------------------
_MISSING = object()
_kw_verdicts: dict[type, tuple] = {}  # class -> (why refused | None, what to compare | None)
_NOTHING_TO_CHECK = (None, None)  # (a verdict: not refused, nothing to compare)


def _pydantic_hidden(cls: type) -> list[str]:
    """Attributes of a pydantic model that its dump leaves out, so a rebuilt model has
    them at their defaults (or not at all): private attributes, ``exclude=True`` fields."""
    names = list(getattr(cls, "__private_attributes__", None) or ())
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__fields__", None) or {}
    for name, info in fields.items():
        exclude = getattr(info, "exclude", None)
        if exclude is None:  # (pydantic v1: field_info.exclude)
            exclude = getattr(getattr(info, "field_info", None), "exclude", None)
        if exclude is True:
            names.append(name)
    return names


def _pydantic_serialized(cls: type) -> list[str]:
    """A pydantic model's fields when it has a field or model serializer (or a
    PlainSerializer / WrapSerializer in a field's ``Annotated`` type): its dump is then not
    its values (a serializer writing 5 as "5"), so a rebuilt copy is compared field by
    field (a model of plain data is otherwise taken for its own dump, never rebuilt: such
    a value came back changed, silently — audit 64), and so is one whose core schema holds
    a function serializer anywhere: one nested in a field's type
    (``list[Annotated[int, PlainSerializer(...)]]``) is in no field's metadata."""
    fields = getattr(cls, "model_fields", None) or {}
    decorators = getattr(cls, "__pydantic_decorators__", None)
    if decorators is not None and (getattr(decorators, "field_serializers", None)
                                   or getattr(decorators, "model_serializers", None)):
        return list(fields)
    if any(type(m).__name__ in ("PlainSerializer", "WrapSerializer")  # (Annotated[...,
           for info in fields.values() for m in getattr(info, "metadata", ())):  # one])
        return list(fields)
    if _schema_serializes(cls):
        return list(fields)
    return []


_SCHEMA_NODES = 200_000  # (a core schema walked further than that: taken as serializing)


def _schema_serializes(cls: type) -> bool:
    """Does pydantic's core schema of ``cls`` (v2) hold a function serializer (plain or
    wrap: the user's code writing the dump) at any depth?  Once per class (its verdict is
    cached); no LangChain message has one.  A schema not built yet (a forward reference)
    or not a dict: False, as before this check."""
    try:
        schema = getattr(cls, "__pydantic_core_schema__", None)
    except Exception:  # noqa: BLE001 - pydantic's mock schema may fail to build here
        return False
    if not isinstance(schema, dict):
        return False
    stack: list = [schema]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > _SCHEMA_NODES:
            return True  # (compared on a rebuilt copy: only a cost)
        if isinstance(node, dict):
            ser = node.get("serialization")
            if isinstance(ser, dict) and ser.get("type") in ("function-plain",
                                                             "function-wrap"):
                return True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def _kw_verdict(cls: type) -> tuple:
    """(why ``cls`` cannot be rebuilt by calling it with its stored fields, or None;
    attributes to compare on a rebuilt copy when rebuilding may change them, or None)."""
    got = _kw_verdicts.get(cls)
    if got is not None:
        return got
    why, check = None, None
    if dataclasses.is_dataclass(cls):
        fields = getattr(cls, "__dataclass_fields__", {})
        not_init = [n for n, f in fields.items()
                    if f._field_type is dataclasses._FIELD and not f.init]
        required_initvars = [n for n, f in fields.items()
                             if f._field_type is dataclasses._FIELD_INITVAR
                             and f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING]
        if not_init:
            why = (f"field(s) {not_init} are field(init=False), and a stored dataclass is "
                   f"rebuilt by calling the class with every field")
        elif required_initvars:
            why = (f"its InitVar(s) {required_initvars} are not fields, so they are not "
                   f"stored, and the class cannot be called without them")
        elif hasattr(cls, "__post_init__"):
            check = [f.name for f in dataclasses.fields(cls)]
    elif _is_data_class(cls) and not issubclass(cls, (enum.Enum, tuple)):  # pydantic
        check = list(dict.fromkeys(_pydantic_hidden(cls) + _pydantic_serialized(cls))) \
            or None
    if len(_kw_verdicts) < 4096:
        _kw_verdicts[cls] = (why, check)
    return why, check


# ---- pydantic models: rebuilt by validating their dump ------------------------------------
# A model is stored as its ``model_dump()``, which turns nested models, dataclasses and
# subclasses of dict into plain dicts (an exception is kept, then written as its repr);
# reading validates the dump against the model's fields, which gives a nested model back
# when its field names its class and leaves a dict where the field says ``Any``.  Which
# one happens is the validator's to say, so a model holding anything but plain data is
# rebuilt once at write time and compared with the original, type for type, at every
# depth (``_shape_diff``).  A model of plain data (str, numbers, None, bytes, plain dicts
# and lists: a LangChain message) is its own dump and is not rebuilt.
_SHAPE_DEPTH = 256  # (deeper than that the comparison gives up: the value is accepted)


def _model_values(obj: Any) -> dict:
    """A pydantic model's field values (and its extra fields), as they are."""
    values = getattr(obj, "__dict__", None) or {}
    extra = getattr(obj, "__pydantic_extra__", None)
    return {**values, **extra} if extra else values


def _plain_data(values: dict) -> bool:
    """Whether ``values`` holds only str, numbers, None, bytes and plain dicts and lists
    of those, keyed by those: data a model dump and its validation leave as they are.
    ormsgpack answers in a µs for the common case (a LangChain message); a value it
    does not, is walked here."""
    if _surely_plain(values):
        return True
    stack = [values.values()]
    plain = _PLAIN  # (the same types as dict keys: a dump keeps those keys as they are)
    budget = 100_000  # (a huge model: compare it rather than walk it twice)
    while stack:
        for x in stack.pop():
            cls = type(x)
            if cls in plain:
                continue
            if cls is dict:
                for k in x:
                    if type(k) not in plain:
                        return False
                stack.append(x.values())
            elif cls is list:
                stack.append(x)
            else:
                return False
            budget -= 1
            if not budget:
                return False
    return True


def _type_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else \
        f"{cls.__module__}.{cls.__qualname__}"


def _shape_diff(a: Any, b: Any, path: str, depth: int = 0) -> str | None:
    """Where ``b`` (``a`` rebuilt) is not of ``a``'s types, at any depth; None when it
    is.  Values are compared only where a type cannot be seen otherwise (dict keys,
    set members)."""
    if a is b or depth > _SHAPE_DEPTH:
        return None
    cls = type(a)
    if cls is not type(b):
        return (f"{path} (a {_type_name(cls)}) would come back as a "
                f"{_type_name(type(b))}")
    if cls in _PLAIN:
        return None
    if isinstance(a, dict):
        if len(a) != len(b):
            return f"{path} would come back with other keys"
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            if type(ka) is not type(kb) or ka != kb:
                return f"the key {ka!r} of {path} would come back as {kb!r}"
            why = _shape_diff(va, vb, f"{path}[{ka!r}]", depth + 1)
            if why is not None:
                return why
        return None
    if isinstance(a, (list, tuple, deque)):
        if len(a) != len(b):
            return f"{path} would come back with {len(b)} items, not {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            why = _shape_diff(x, y, f"{path}[{i}]", depth + 1)
            if why is not None:
                return why
        return None
    if isinstance(a, (set, frozenset)):
        if a != b or {type(x) for x in a} != {type(x) for x in b}:
            return f"{path} would come back with other members"
        return None
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            why = _shape_diff(getattr(a, f.name, _MISSING), getattr(b, f.name, _MISSING),
                              f"{path}.{f.name}", depth + 1)
            if why is not None:
                return why
        return None
    if hasattr(a, "model_dump") or hasattr(a, "__fields__"):  # pydantic
        rebuilt = _model_values(b)
        for name, va in _model_values(a).items():
            why = _shape_diff(va, rebuilt.get(name, _MISSING), f"{path}.{name}", depth + 1)
            if why is not None:
                return why
    return None


class _Packer:
    """LangGraph's msgpack encoding (``jsonplus._msgpack_default``), with tuples kept
    (:data:`EXT_TUPLE`) at every depth, and a value refused (``StateTypeError``) when
    its class is rebuilt but the value would not be: a dataclass with a
    ``field(init=False)`` or a required ``InitVar`` (the read raised), one whose
    ``__post_init__`` changes a field when it runs again, a pydantic model whose private
    attributes or ``exclude=True`` fields would not come back as they are."""

    def __init__(self, policy: "TypePolicy") -> None:
        self.policy = policy
        self._local = threading.local()

    def pack(self, obj: Any) -> bytes:
        self._local.error = None
        try:
            return ormsgpack.packb(obj, default=self.default, option=_PACK_OPTIONS)
        except TypeError as e:
            error, self._local.error = getattr(self._local, "error", None), None
            if error is not None:  # (ormsgpack replaces the hook's error with its own)
                raise error from None
            if "Integer exceeds 64-bit range" in str(e):  # (it named neither type nor way)
                raise StateTypeError(
                    "WalstoreSaver refuses to store an int outside msgpack's range (-2**63 "
                    "to 2**64-1): store it as a str (str(n)) or a decimal.Decimal, which "
                    "come back as they are") from None
            if "surrogates" in str(e):
                raise StateTypeError(
                    "WalstoreSaver refuses to store a str holding a lone surrogate (not "
                    "valid Unicode text: say, text cut inside an emoji's UTF-16 pair): it "
                    "cannot be stored as text and would come back changed; repair it first "
                    "(s.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')) or "
                    "store it as bytes") from None
            raise

    def default(self, obj: Any) -> Any:
        try:
            return self._default(obj)
        except StateTypeError as e:
            if getattr(self._local, "error", None) is None:
                self._local.error = e
            raise

    def _payload(self, obj: Any, value: Any) -> bytes:
        cls = type(obj)
        return self.pack([cls.__module__, cls.__name__, value])

    def _ext(self, code: int, obj: Any, value: Any) -> ormsgpack.Ext:
        return ormsgpack.Ext(code, self._payload(obj, value))

    def _default(self, obj: Any) -> Any:
        # the order of LangGraph's own dispatch; what holds no application values is
        # encoded by LangGraph itself
        # What is encoded of an object is walked for values LangGraph's encoding would
        # flatten without a class name (refuse_flattened_in): the walk from the top
        # stops at objects, so each object's own contents are walked here.  A tuple's
        # were walked with its container's.
        if type(obj) is tuple:
            return ormsgpack.Ext(EXT_TUPLE, self.pack(list(obj)))
        if isinstance(obj, _DeltaSnapshot):
            refuse_flattened_in(obj.value)
            return ormsgpack.Ext(EXT_DELTA_SNAPSHOT, self.pack(obj.value))
        if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic v2
            cls = type(obj)
            payload = self.pack(
                [cls.__module__, cls.__name__, obj.model_dump(), "model_validate_json"])
            if _kw_verdicts.get(cls) == _NOTHING_TO_CHECK and \
                    _surely_plain(_model_values(obj)):
                # what _checked finds for a model of plain data (a LangChain message)
                # whose class is known to rebuild as it is, without its three frames:
                # every message of a messages list comes here at every put
                return ormsgpack.Ext(EXT_PYDANTIC_V2, payload)
            return self._checked(obj, EXT_PYDANTIC_V2, payload)
        if hasattr(obj, "get_secret_value") and callable(obj.get_secret_value):
            return lg_jsonplus._msgpack_default(obj)
        if hasattr(obj, "dict") and callable(obj.dict):  # pydantic v1
            return self._checked(obj, EXT_PYDANTIC_V1, self._payload(obj, obj.dict()))
        if hasattr(obj, "_asdict") and callable(obj._asdict):  # NamedTuple
            fields = obj._asdict()
            refuse_flattened_in(fields)
            return self._ext(EXT_CONSTRUCTOR_KW_ARGS, obj, fields)
        if isinstance(obj, deque) and obj.maxlen is not None:
            # LangGraph (SqliteSaver too) keeps only the items: a bounded deque came back
            # unbounded, and a resumed "last N messages" buffer grew without end.  Its
            # maxlen goes beside them, as the constructor call deque(items, maxlen) —
            # which LangGraph's decoder rebuilds as well (probe-audit55)
            items = list(obj)
            refuse_flattened_in(items)
            return self._ext(EXT_CONSTRUCTOR_POS_ARGS, obj, [items, obj.maxlen])
        if isinstance(obj, (set, frozenset, deque)):
            items = list(obj)
            refuse_flattened_in(items)
            return self._ext(EXT_CONSTRUCTOR_SINGLE_ARG, obj, items)
        if isinstance(obj, enum.Enum):
            refuse_flattened_in(obj.value)
            return self._ext(EXT_CONSTRUCTOR_SINGLE_ARG, obj, obj.value)
        if isinstance(obj, SendProtocol):
            args = [obj.node, obj.arg]
            if (timeout := getattr(obj, "timeout", None)) is not None:
                args.append(timeout)
            refuse_flattened_in(args)
            return self._ext(EXT_CONSTRUCTOR_POS_ARGS, obj, args)
        if dataclasses.is_dataclass(obj) and not _lg_special(obj):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            refuse_flattened_in(fields)
            return self._checked(obj, EXT_CONSTRUCTOR_KW_ARGS, self._payload(obj, fields))
        if isinstance(obj, Item):
            fields = {k: getattr(obj, k) for k in obj.__slots__}
            refuse_flattened_in(fields)
            return self._ext(EXT_CONSTRUCTOR_KW_ARGS, obj, fields)
        if isinstance(obj, datetime.datetime) and (
                type(obj.tzinfo) is ZoneInfo or (type(obj.tzinfo) is datetime.timezone
                                                 and len(obj.tzinfo.__getinitargs__()) > 1)):
            # (so is a datetime.timezone given a name: its ISO text kept the offset only,
            # and it came back unnamed, tzname() "UTC+01:00" where it was "CET")
            # LangGraph writes a datetime as its ISO text, which keeps the offset, not
            # the zone: a ZoneInfo came back as a fixed offset.  Its fields and ZoneInfo
            # instead, as LangGraph writes a ``time`` (another tzinfo, dateutil's or
            # pytz's, is written as before when its offset is fixed: LangGraph cannot
            # store those by name; one with daylight saving is refused, below)
            return self._ext(EXT_CONSTRUCTOR_KW_ARGS, obj, {
                "year": obj.year, "month": obj.month, "day": obj.day, "hour": obj.hour,
                "minute": obj.minute, "second": obj.second,
                "microsecond": obj.microsecond, "tzinfo": obj.tzinfo, "fold": obj.fold})
        if (isinstance(obj, datetime.datetime) and obj.tzinfo is not None
                and type(obj.tzinfo) is not datetime.timezone):
            _refuse_shifting_zone(obj)
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray):
            return self._ndarray(np, obj)
        try:
            return lg_jsonplus._msgpack_default(obj)
        except TypeError:
            # (ormsgpack said only "Type is not msgpack serializable: Weird": no recipe)
            cls = type(obj)
            raise StateTypeError(
                f"WalstoreSaver refuses to store a {cls.__module__}.{cls.__qualname__}: "
                f"LangGraph's encoding cannot store it (it stores plain data, and "
                f"dataclasses, Enums, pydantic models and NamedTuples rebuilt by name); "
                f"make it one of those at the top level of your own module, or list a "
                f"library's one: WalstoreSaver(store, allowed_types=[{cls.__qualname__}]) "
                f"(or allowed_types=[({cls.__module__!r}, {cls.__qualname__!r})]); or store "
                f"plain data (dict, list, str, numbers)") from None

    def _ndarray(self, np: Any, obj: Any) -> ormsgpack.Ext:
        """A numpy array as LangGraph encodes it (its dtype's ``str``, shape, order and
        raw bytes, rebuilt by ``frombuffer``), refused (``StateTypeError``) when that would
        not give it back: an array of Python objects (its bytes are pointers: the read
        raised, and every read of the thread after it, where SqliteSaver gives None), a
        structured dtype (its ``str`` is ``|V<n>``: it came back as raw void bytes, fields
        gone), a subclass (a masked array came back without its mask, a matrix as a plain
        array).  A datetime64/timedelta64 array, which has no buffer to view (LangGraph's
        encoding raised a bare "not msgpack serializable"), is written from its bytes."""
        cls, dtype = type(obj), obj.dtype
        why = None
        if cls is not np.ndarray:
            why = (f"a subclass of numpy.ndarray, stored as its data only: it would come back "
                   f"as a plain numpy.ndarray (a masked array loses its mask, a matrix its class)")
        elif dtype.hasobject:
            why = ("a numpy array of Python objects (dtype object): its memory holds "
                   "pointers, not the objects, and cannot be stored")
        elif np.dtype(dtype.str) != dtype:
            why = (f"a numpy array of dtype {dtype}, stored as {dtype.str!r}: it would come "
                   f"back as dtype {np.dtype(dtype.str)} (a structured dtype's fields lost)")
        if why is not None:
            raise StateTypeError(
                f"WalstoreSaver refuses to store a {cls.__module__}.{cls.__qualname__}: it is "
                f"{why}, so it would not come back as it is; store a plain array of numbers, "
                f"strings or bytes, or the data as a list (arr.tolist()) or a dataclass / "
                f"pydantic model (rebuilt by name; see allowed_types)")
        if dtype.kind not in "Mm":
            return lg_jsonplus._msgpack_default(obj)
        order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
        return ormsgpack.Ext(EXT_NUMPY_ARRAY, lg_jsonplus._msgpack_enc(
            (dtype.str, obj.shape, order, obj.tobytes(order="A"))))

    def _checked(self, obj: Any, code: int, payload: bytes) -> ormsgpack.Ext:
        """The extension record, once the class is known to rebuild this value as it
        is."""
        cls = type(obj)
        why, check = _kw_verdict(cls)
        # a pydantic model holding more than plain data: its dump flattened it, and
        # whether validation gives it back is the validator's to say
        model = code in (EXT_PYDANTIC_V2, EXT_PYDANTIC_V1)
        reshaped = model and not _plain_data(_model_values(obj))
        if why is None and (check or reshaped):
            if self.policy.refusal(cls.__module__, cls.__name__) is not None:
                return ormsgpack.Ext(code, payload)  # (not rebuilt: ``audit`` says why)
            self.policy._local.error = None
            try:
                rebuilt = self.policy._rebuild(code, payload)
            except Exception as e:  # noqa: BLE001 - the read would raise it too
                inner, self.policy._local.error = getattr(self.policy._local, "error",
                                                          None), None
                if isinstance(inner, StateTypeError):
                    # a class inside it is refused (msgpack's hook said only "ext_hook
                    # failed"): its words name that class and the allowed_types recipe
                    raise StateTypeError(
                        f"WalstoreSaver refuses to store a {cls.__module__}."
                        f"{cls.__qualname__}: a value inside it would not come back: "
                        f"{inner}") from None
                rebuilt, why = None, f"rebuilding it raised {type_and_message(e)}"
            if why is None and check:
                changed = [n for n in check if not self._same(getattr(obj, n, _MISSING),
                                                              getattr(rebuilt, n, _MISSING))]
                if changed:
                    how = ("__post_init__ runs again when it is rebuilt"
                           if dataclasses.is_dataclass(cls) else
                           "a model is rebuilt from its dump, which leaves out private "
                           "attributes and exclude=True fields, and is written by its "
                           "field and model serializers")
                    why = f"attribute(s) {changed} would come back changed ({how})"
            if why is None and reshaped:
                where = _shape_diff(obj, rebuilt, cls.__name__)
                if where is not None:
                    why = (f"{where} (a model is stored as its model_dump() and rebuilt "
                           f"by validating it: a nested model, dataclass or dict subclass "
                           f"comes back as a dict, an exception as its repr, where the "
                           f"field's annotation does not name its class: annotate the "
                           f"field with the class it holds)")
        if why is not None:
            raise StateTypeError(
                f"WalstoreSaver refuses to store a {cls.__module__}.{cls.__qualname__}: it "
                f"would not come back as it is: {why}; store plain data (dict, list, str, "
                f"numbers) or a class rebuilt from its fields as they are")
        return ormsgpack.Ext(code, payload)

    def _same(self, a: Any, b: Any) -> bool:
        if a is b:
            return True
        if a is _MISSING or b is _MISSING:
            return False
        try:
            return self.pack(a) == self.pack(b)
        except Exception:  # noqa: BLE001 - not encodable: the put refuses it anyway
            return False


def _refuse_shifting_zone(obj: datetime.datetime) -> None:
    """StateTypeError for a datetime whose tzinfo (not a ZoneInfo: those are written by
    name) has an offset that changes over the year — dateutil's ``gettz(name)`` or
    ``tzlocal()`` where daylight saving is kept.  LangGraph's encoding writes a datetime
    as its ISO text: it came back in a fixed-offset ``timezone``, its zone gone, and date
    arithmetic across a daylight-saving change was off by an hour (2026-01-15 09:00
    Europe/Oslo + 180 days: 09:00+01:00, not +02:00) — the silent change a ZoneInfo's
    datetime had before it was written by name.  A fixed zone (dateutil's ``tzutc()``,
    ``tzoffset``; pytz's, whose arithmetic keeps the offset) is written as before."""
    tz = obj.tzinfo
    try:
        winter = tz.utcoffset(obj.replace(month=1, day=1))
        summer = tz.utcoffset(obj.replace(month=7, day=1))
    except Exception:  # noqa: BLE001 - a tzinfo that cannot say: written as before
        return
    if winter == summer:
        return
    cls = type(tz)
    raise StateTypeError(
        f"WalstoreSaver refuses to store a datetime in a {cls.__module__}.{cls.__qualname__} "
        f"time zone ({obj.tzname()}): its offset changes over the year ({winter} and "
        f"{summer}), and LangGraph's encoding stores a datetime's offset only, so it would "
        f"come back in a fixed-offset datetime.timezone (the zone gone: date arithmetic "
        f"across a daylight-saving change off by an hour); use a zoneinfo.ZoneInfo zone "
        f"(ZoneInfo('Europe/Oslo') in place of dateutil's gettz('Europe/Oslo')), which "
        f"walstore stores by name, or store it in UTC (dt.astimezone(datetime.timezone.utc))")


def _lg_special(obj: Any) -> bool:
    """A dataclass LangGraph's dispatch encodes before reaching dataclasses (none today;
    kept in LangGraph's order should one be added)."""
    return False


class StateSerializer(JsonPlusSerializer):
    """LangGraph's JsonPlusSerializer encoding with walstore's type policy.

    ``dumps_typed`` refuses (``StateTypeError``) a value naming a class that would not be
    rebuilt; ``loads_typed`` rebuilds only what the policy allows and raises on the rest.
    ``encode`` + ``audit`` split the two so the blob codec can audit only the items
    appended to a list it stores as a delta.
    """

    def __init__(self, allowed_types: Iterable[Any] = (), *, app_types: bool = True) -> None:
        self.policy = TypePolicy(normalize_types(allowed_types), app_types)
        self._packer = _Packer(self.policy)
        super().__init__(allowed_msgpack_modules=None,
                         __unpack_ext_hook__=self.policy.rebuild_ext)

    def encode(self, obj: Any) -> tuple[str, bytes]:
        """``(type, bytes)`` of ``obj``; the class names in the bytes are checked by
        ``audit``, the values LangGraph's encoding would flatten without naming a class
        (``refuse_flattened``) here."""
        if obj is None or type(obj) in (bytes, bytearray):
            return super().dumps_typed(obj)
        refuse_flattened_in(obj)  # (what is in objects: as the packer reaches them)
        return "msgpack", self._packer.pack(obj)

    def audit(self, type_: str, data: bytes) -> None:
        if type_ == "msgpack":
            self.policy.audit(data)

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        type_, data = self.encode(obj)
        self.audit(type_, data)
        return type_, data

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        if data[0] == "msgpack":
            return self.policy.load(data[1])
        return super().loads_typed(data)

    def with_msgpack_allowlist(self, extra_allowlist: Iterable[Any]) -> "StateSerializer":
        """A copy that also rebuilds ``extra_allowlist`` (LangGraph's ``with_allowlist``)."""
        extra = normalize_types(extra_allowlist)
        if extra <= self.policy.allowed:
            return self
        return StateSerializer(self.policy.allowed | extra, app_types=self.policy.app_types)
