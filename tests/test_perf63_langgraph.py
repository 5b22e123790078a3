"""Round 33 (stop 63), the LangGraph saver's serializer: the fast paths keep the verdicts
and bytes of the slow ones (behaviour only, never timings)."""
from __future__ import annotations

import ormsgpack
import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer  # noqa: E402

from walstore.integrations.langgraph import serde as S  # noqa: E402


def _old_surely_plain(value):
    try:
        packed = ormsgpack.packb(value, option=S._PLAIN_ONLY)
    except Exception:  # noqa: BLE001
        return False
    return not (b"\xc4" in packed or b"\xc5" in packed or b"\xc6" in packed)


@pytest.mark.parametrize("value", [
    {"a": 1, "b": "text", "c": [1, 2.5, None, True], "d": {"e": "f"}},
    {"a": b"raw bytes"},                       # bin 8: not surely plain
    {"a": b"x" * 300},                         # bin 16
    {"a": b"x" * 70_000},                      # bin 32
    {"a": "\u0104\u0105 \u0144"},             # UTF-8 holding 0xC4/0xC5 bytes: conservative
    {"a": "x" * 300, "b": list(range(300))},  # lengths whose headers hold 0xC5 or so
    {1: "int key"},                            # not str keys: refused by ormsgpack
    {"a": (1, 2)},                             # a tuple
    {"a": {1, 2}},                             # a set
    [HumanMessage("hi")],                      # an object
    [],
    "plain str",
    12345,
])
def test_surely_plain_same_verdict_as_the_bytes_test(value):
    assert S._surely_plain(value) is _old_surely_plain(value)


def _messages(n):
    out = []
    for i in range(n):
        out.append(HumanMessage(f"question {i} \u0104" * 3, id=f"h{i}"))
        out.append(AIMessage(f"calling {i}", id=f"a{i}", tool_calls=[
            {"name": "search", "args": {"q": f"q{i}"}, "id": f"c{i}"}]))
        out.append(ToolMessage("result " * 40, tool_call_id=f"c{i}", id=f"t{i}"))
        out.append(AIMessage("answer " * 30, id=f"b{i}"))
    return out


def test_messages_encode_as_langgraph_does_and_come_back():
    msgs = _messages(5)
    ser = S.StateSerializer()
    type_, data = ser.dumps_typed(msgs)
    assert (type_, data) == JsonPlusSerializer().dumps_typed(msgs)
    assert ser.loads_typed((type_, data)) == msgs


@pytest.mark.parametrize("data", [
    b"", b"plain text, no marker", bytes(range(256)),
    *[b"abc" + bytes([m]) + b"def" for m in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)],
    *[b"abc" + bytes([m]) for m in (0xC6, 0xCA, 0xD3, 0xD9)],  # the neighbours: no marker
    "\u0104 \u0107".encode(),
])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_ext_marker_test_is_the_regex(data, kind):
    assert S._has_ext_marker(kind(data)) is (S._EXT_MARKER.search(data) is not None)


def test_audit_still_refuses_a_class_it_would_not_rebuild():
    from walstore.integrations.langgraph.serde import StateTypeError
    data = ormsgpack.packb(ormsgpack.Ext(S.EXT_PYDANTIC_V2, ormsgpack.packb(
        ["os", "system", {}, "model_validate_json"])))
    with pytest.raises(StateTypeError):
        S.StateSerializer().audit("msgpack", data)
    S.StateSerializer().audit("msgpack", S.StateSerializer().encode(_messages(2))[1])


# module level, so the serializer's policy rebuilds them by name (application classes)
from typing import Any as _Any  # noqa: E402

import pydantic  # noqa: E402


class Inner(pydantic.BaseModel):
    x: int = 1


class Loose(pydantic.BaseModel):
    value: _Any = None


class Hidden(pydantic.BaseModel):
    a: int = 0
    _secret: int = pydantic.PrivateAttr(default=0)


def test_model_fast_path_keeps_the_checks():
    """A plain model skips _checked only once its class's verdict is known and its values
    are plain; a model holding a nested model under ``Any`` is refused every time (the
    second encode meets the cached verdict, and still goes through the check); a class
    with private attributes is compared on a rebuilt copy, every time."""
    from walstore.integrations.langgraph.serde import StateTypeError
    ser = S.StateSerializer()
    plain = Loose(value={"k": [1, "two", None]})
    for _ in range(3):  # first: the verdict is made; then the fast path
        assert ser.dumps_typed(plain) == ser.dumps_typed(Loose(value={"k": [1, "two", None]}))
        assert ser.loads_typed(ser.dumps_typed(plain)) == plain
    assert S._kw_verdicts.get(Loose) == S._NOTHING_TO_CHECK
    for _ in range(3):
        with pytest.raises(StateTypeError, match="would come back as a dict"):
            ser.dumps_typed(Loose(value=Inner()))
        with pytest.raises(StateTypeError, match="would come back as a dict"):
            ser.dumps_typed([HumanMessage("x"), Loose(value=Inner())])
    h = Hidden(a=1)
    assert ser.loads_typed(ser.dumps_typed(h)) == h
    h._secret = 5
    for _ in range(2):
        with pytest.raises(StateTypeError, match="_secret"):
            ser.dumps_typed(h)
