"""Audit 64, the LangGraph saver's serializer after stop 63's fast paths (9204ec6,
1af81d5, b1a54f6): ``_surely_plain`` looks for the msgpack bin markers as ints, the
extension-record test is eight memchrs, a model class whose verdict is known skips
``_checked``.  Values whose encoding holds the marker bytes by coincidence, bytes of
every kind, nested models, a model class whose field changes type between instances (a
cached verdict must not let a later instance through unchecked), dataclasses, enums,
datetimes, tuples, sets: each comes back as LangGraph's own JsonPlusSerializer gives it
(or, where walstore keeps more — a tuple — as it was), or is refused at the write."""
from __future__ import annotations

import dataclasses
import datetime
import enum
import struct
import uuid
from typing import Annotated, Any, Optional

import pytest

pytest.importorskip("langgraph")

import pydantic  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer  # noqa: E402

from walstore.integrations.langgraph import StateTypeError  # noqa: E402
from walstore.integrations.langgraph import serde as S  # noqa: E402


# (module level: the policy rebuilds application classes by name)
class Colour(enum.Enum):
    RED = "\u0100red"          # a value whose UTF-8 holds 0xC4
    BLUE = 0xC7C8             # a value whose uint16 holds two ext markers


@dataclasses.dataclass
class Reading:
    at: datetime.datetime
    raw: bytes
    tags: list


class Leaf(pydantic.BaseModel):
    text: str = ""
    blob: bytes = b""


class Branch(pydantic.BaseModel):
    leaf: Leaf
    leaves: list[Leaf] = []
    note: Optional[str] = None


class Shifty(pydantic.BaseModel):
    """Its one field takes anything: its class's verdict is made by its first instance."""
    value: Any = None


class ShiftyPlain(pydantic.BaseModel):
    value: Any = None


# strings, ints and floats whose msgpack encoding holds a bin (0xC4-0xC6) or ext
# (0xC7-0xC9, 0xD4-0xD8) marker byte by coincidence
_MARKER_BYTES = [0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8]
_COINCIDENCES = [
    *[chr(((m & 0x1F) << 6) | 0x05) for m in _MARKER_BYTES],   # two-byte UTF-8 lead m
    *[m for m in _MARKER_BYTES], *[m * 257 for m in _MARKER_BYTES],  # uint8 / uint16
    *[m - 256 for m in _MARKER_BYTES], -0x3839, 0xC4C5C6C7, 0xD4D5D6D7D8C4C5C6,
    struct.unpack(">d", bytes([0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8]))[0],
    struct.unpack(">d", bytes([0x40, 0xC4, 0xC5, 0xC6, 0, 0, 0, 0]))[0],
    "x" * 0xC4, "y" * 0xC7, list(range(0xC5)), {f"k{i}": i for i in range(0xD4)},
]


def _both(value: Any) -> tuple[Any, Any]:
    """``value`` through walstore's serializer and through LangGraph's own."""
    ours = S.StateSerializer()
    got = ours.loads_typed(ours.dumps_typed(value))
    lg = JsonPlusSerializer()
    theirs = lg.loads_typed(lg.dumps_typed(value))
    return got, theirs


def _typed(x: Any) -> Any:
    """``x``'s value with every type inside named; a set's members in a fixed order
    (a set's repr follows string hashes, which change from run to run)."""
    if isinstance(x, (set, frozenset)):
        return type(x).__name__, sorted((_typed(m) for m in x), key=repr)
    if isinstance(x, (list, tuple)):
        return type(x).__name__, [_typed(m) for m in x]
    if isinstance(x, dict):
        return type(x).__name__, [(_typed(k), _typed(v)) for k, v in x.items()]
    return type(x).__name__, repr(x)


def _same(a: Any, b: Any) -> None:
    assert a == b, (a, b)
    assert _typed(a) == _typed(b), (a, b)  # (the same types inside too)


@pytest.mark.parametrize("value", _COINCIDENCES, ids=range(len(_COINCIDENCES)))
def test_values_holding_marker_bytes_by_coincidence_come_back_as_langgraphs(value):
    for v in (value, {"v": value}, [value, b"bin"], {"m": [HumanMessage(str(value))]}):
        got, theirs = _both(v)
        _same(got, theirs)
        _same(got, v)


@pytest.mark.parametrize("value", [
    b"", b"\xc4\xc5\xc6\xc7\xd4\xd8", bytes(range(256)), b"x" * 70_000,
    bytearray(b"\xc7\x01\x05abc"), bytearray(),
    {"raw": b"\xd4\x05\x00", "more": [b"\xc8\x00\x01\x05x", b"\xc6"]},
])
def test_bytes_and_bytearray_come_back_as_langgraphs(value):
    got, theirs = _both(value)
    _same(got, theirs)
    _same(got, value)


@pytest.mark.parametrize("value", [
    {"more": [bytearray(b"\xc6")]}, [bytearray()], Shifty(value=bytearray(b"\xc7\x01")),
    [HumanMessage("x", additional_kwargs={"b": bytearray(b"\xd4\x01\x02")})],
])
def test_a_bytearray_inside_a_value_is_refused_not_turned_into_bytes(value):
    """(LangGraph writes it as bytes: a bytearray only comes back as a whole value)"""
    ours = S.StateSerializer()
    ours.dumps_typed(Shifty(value=1))  # (the class's verdict known: the fast path)
    for _ in range(2):
        with pytest.raises(StateTypeError, match="bytearray"):
            ours.dumps_typed(value)


def test_messages_with_marker_bytes_and_bytes_in_their_fields_come_back():
    msgs = [
        HumanMessage("\u0100\u0140\u0180\u01c0\u0200\u0240\u0500\u0540\u0580\u05c0\u0600",
                     id="h"),
        AIMessage("a" * 0xC7, id="a", additional_kwargs={"blob": b"\xc7\x01\x05x",
                                                         "n": 0xC8C9}),
        ToolMessage("r", tool_call_id="c", id="t", artifact=b"\xd8\x05" + b"\0" * 16),
        AIMessage("b", id="b", response_metadata={"f": 1.5, "g": -60}),
    ]
    ours = S.StateSerializer()
    for _ in range(3):  # (the first makes the class verdicts; then the fast path)
        got, theirs = _both(msgs)
        _same(got, theirs)
        _same(got, msgs)
        assert ours.dumps_typed(msgs) == JsonPlusSerializer().dumps_typed(msgs)


def test_nested_models_dataclasses_enums_datetimes_come_back_as_langgraphs():
    at = datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    values = [
        Branch(leaf=Leaf(text="\u0100", blob=b"\xc7"), leaves=[Leaf(), Leaf(text="x")]),
        Reading(at=at, raw=b"\xd4\x00\x00", tags=["\u0200", 0xC9]),
        Colour.RED, Colour.BLUE, [Colour.BLUE, Colour.RED],
        at, at.date(), at.time(), datetime.timedelta(days=0xC4, microseconds=0xD8),
        uuid.UUID(bytes=bytes([0xC4, 0xC7, 0xD4, 0xD8] * 4)),
        {"nested": {"model": Branch(leaf=Leaf()), "dc": Reading(at, b"", [])}},
    ]
    for _ in range(2):
        for v in values:
            got, theirs = _both(v)
            _same(got, theirs)
            _same(got, v)


@pytest.mark.parametrize("value", [
    (1, "\u0100", b"\xc7"), {"t": (0xC4, (0xD8,))}, [(b"x",), ()],
    {1, 0xC7, 0xD4D5}, frozenset({"\u0180", "b"}),
])
def test_tuples_and_sets_come_back_as_they_were(value):
    """LangGraph's encoding writes a tuple as a list; walstore keeps the tuple (a set
    both keep as a set)."""
    got, theirs = _both(value)
    _same(got, value)
    if isinstance(value, (set, frozenset)):
        _same(got, theirs)


def test_a_cached_verdict_never_lets_a_later_non_plain_instance_through():
    """The class's verdict (nothing to check) is made by a plain first instance; a later
    instance of the same class holding a nested model, a dataclass, a tuple, bytes, a
    set, a datetime is checked all the same: each comes back equal or is refused."""
    ours = S.StateSerializer()
    first = Shifty(value={"k": [1, "two"]})
    assert ours.loads_typed(ours.dumps_typed(first)) == first
    assert S._kw_verdicts.get(Shifty) == S._NOTHING_TO_CHECK
    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    later = [Leaf(text="x"), Reading(at, b"r", []), (1, 2), b"\xc4bytes", {1, 2}, at,
             Colour.RED, {"deep": [Leaf()]}, [b"\xc7\x01\x05x"], 0xC7C8, "\u01c0",
             bytearray(b"\xc4")]
    outcomes = {}
    for v in later:
        for _ in range(2):  # (the second meets the verdict made by the first)
            inst = Shifty(value=v)
            try:
                data = ours.dumps_typed(inst)
            except StateTypeError:
                outcomes[repr(v)] = "refused"
                continue
            back = ours.loads_typed(data)
            assert type(back) is Shifty
            assert back == inst and repr(back) == repr(inst), (v, back)
            outcomes[repr(v)] = "equal"
    # a nested model or dataclass under ``Any`` comes back as a dict: refused
    assert outcomes[repr(Leaf(text="x"))] == "refused"
    assert outcomes[repr(Reading(at, b"r", []))] == "refused"
    assert outcomes[repr(b"\xc4bytes")] == "equal"
    assert outcomes[repr(0xC7C8)] == "equal"


def test_a_plain_class_verdict_is_the_same_whatever_the_first_instance_was():
    """Two classes alike, the first instances different (a plain one first, a non-plain
    one first): every later instance gets the same answer in both."""
    ours = S.StateSerializer()
    ours.dumps_typed(Shifty(value=1))
    with pytest.raises(StateTypeError):
        ours.dumps_typed(ShiftyPlain(value=Leaf()))
    for v in [{"a": 1}, Leaf(), b"\xd4\x01\x02", (1,), "\u0600", [Leaf()]]:
        answers = []
        for cls in (Shifty, ShiftyPlain):
            try:
                back = ours.loads_typed(ours.dumps_typed(cls(value=v)))
                answers.append(("equal", repr(back.value)))
            except StateTypeError:
                answers.append(("refused", None))
        assert answers[0] == answers[1], (v, answers)


class Serialized(pydantic.BaseModel):
    """A field serializer: its dump is not its values (5 is dumped as "5")."""
    value: Any = None

    @pydantic.field_serializer("value")
    def _as_text(self, v: Any) -> str:
        return str(v)


class DumpedAs(pydantic.BaseModel):
    """A model serializer rewriting a field."""
    n: Any = 0

    @pydantic.model_serializer
    def _dump(self) -> dict:
        return {"n": [self.n]}


class FaithfulSerializer(pydantic.BaseModel):
    """A serializer whose dump validates back to the same value: accepted."""
    at: datetime.datetime

    @pydantic.field_serializer("at")
    def _iso(self, v: datetime.datetime) -> str:
        return v.isoformat()


def test_a_model_whose_serializer_changes_its_values_is_refused_not_changed():
    """A model of plain data is taken for its own dump and never rebuilt; one with a
    field or model serializer is not its own dump: ``Serialized(value=5)`` came back
    ``Serialized(value='5')``, ``DumpedAs(n=1)`` as ``DumpedAs(n=[1])``, silently (as
    LangGraph's JsonPlusSerializer gives them).  Now refused at the write, every time (the
    class's verdict cached or not); a serializer whose dump validates back to the same
    value is accepted."""
    ours = S.StateSerializer()
    for _ in range(3):
        for bad in (Serialized(value=5), DumpedAs(n=1), [HumanMessage("x"), DumpedAs(n=2)]):
            with pytest.raises(StateTypeError, match="serializer"):
                ours.dumps_typed(bad)
        same = Serialized(value="text")  # (its dump is itself: accepted)
        assert ours.loads_typed(ours.dumps_typed(same)) == same
        ok = FaithfulSerializer(at=datetime.datetime(2026, 1, 1,
                                                     tzinfo=datetime.timezone.utc))
        back = ours.loads_typed(ours.dumps_typed(ok))
        assert back == ok and type(back.at) is datetime.datetime


class AnnotatedSerializer(pydantic.BaseModel):
    """A serializer given in the field's annotation (``PlainSerializer``)."""
    n: Annotated[Any, pydantic.PlainSerializer(lambda v: f"n={v}")] = 0


def test_a_model_whose_annotated_serializer_changes_its_values_is_refused():
    """As above, the serializer in an ``Annotated`` field: came back
    ``AnnotatedSerializer(n='n=3')`` for ``n=3``."""
    ours = S.StateSerializer()
    for _ in range(2):
        with pytest.raises(StateTypeError, match="serializer"):
            ours.dumps_typed(AnnotatedSerializer(n=3))


class NestedSerializer(pydantic.BaseModel):
    """A serializer inside a field's type, in no field's own metadata."""
    xs: list[Annotated[Any, pydantic.PlainSerializer(lambda v: f"x={v}")]] = []


class NestedSerializerInside(pydantic.BaseModel):
    """A model holding one whose nested type serializes."""
    inner: NestedSerializer = NestedSerializer()


class BackTheSame(pydantic.BaseModel):
    """A nested serializer whose dump validates back to the same values."""
    xs: list[Annotated[int, pydantic.PlainSerializer(str, return_type=str)]] = []


def test_a_model_whose_nested_annotated_serializer_changes_its_values_is_refused():
    """``list[Annotated[Any, PlainSerializer(...)]]``: came back ``xs=['x=1', 'x=2']`` for
    ``xs=[1, 2]`` (the field's own metadata holds no serializer; its core schema does),
    directly and inside another model.  One whose dump validates back to the same values
    (an int written as "1" into an int field) is accepted, as before."""
    ours = S.StateSerializer()
    for value in (NestedSerializer(xs=[1, 2]), NestedSerializerInside(
            inner=NestedSerializer(xs=[3]))):
        for _ in range(2):
            with pytest.raises(StateTypeError, match="serializer|would not come back|changed"):
                ours.dumps_typed(value)
    assert S._schema_serializes(NestedSerializer)
    back = ours.loads_typed(ours.dumps_typed(BackTheSame(xs=[1, 2])))
    assert back == BackTheSame(xs=[1, 2])

