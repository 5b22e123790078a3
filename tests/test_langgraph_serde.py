"""The saver's type policy: the graph's own types come back as themselves (as with
SqliteSaver), what would not is refused loudly at put, and a stored value can never make
the saver run code it names."""
from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import http
import operator
import os
import sqlite3
import subprocess
import sys
import uuid
from typing import Annotated, NamedTuple, TypedDict

import ormsgpack
import pydantic
import pytest

pytest.importorskip("langgraph.checkpoint.base")
sqlite_saver = pytest.importorskip("langgraph.checkpoint.sqlite")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import StateTypeError, WalstoreSaver  # noqa: E402


@dataclasses.dataclass
class Leg:
    city: str
    nights: int
    starts: datetime.date


class Status(enum.Enum):
    DRAFT = "draft"
    BOOKED = "booked"


class Traveller(BaseModel):
    name: str
    born: datetime.date


class Spot(NamedTuple):
    lat: float
    lon: float


class Trip(TypedDict):
    legs: Annotated[list[Leg], operator.add]
    status: Status
    traveller: Traveller
    at: datetime.datetime
    spot: Spot


def a_function_not_a_class(arg):  # pragma: no cover - must never be called
    raise AssertionError("a stored value made the saver call a function")


def trip_builder() -> StateGraph:
    def book(state: Trip) -> dict:
        assert isinstance(state["status"], Status)        # the node sees real types
        assert isinstance(state["traveller"], Traveller)
        assert all(isinstance(leg, Leg) for leg in state["legs"])
        last = state["legs"][-1]
        return {"legs": [Leg(last.city + "!", last.nights + 1,
                             last.starts + datetime.timedelta(days=last.nights))],
                "status": Status.BOOKED,
                "at": state["at"] + datetime.timedelta(hours=1)}

    b = StateGraph(Trip)
    b.add_node("book", book)
    b.add_edge(START, "book")
    b.add_edge("book", END)
    return b


START_STATE = {
    "legs": [Leg("Paris", 2, datetime.date(2026, 5, 1))],
    "status": Status.DRAFT,
    "traveller": Traveller(name="Ana", born=datetime.date(1990, 2, 3)),
    "at": datetime.datetime(2026, 4, 1, 9, 30, tzinfo=datetime.timezone.utc),
    "spot": Spot(48.85, 2.35),
}


def two_turns(make_saver) -> dict:
    """Run a turn, then read the thread back through a fresh saver (the next turn)."""
    config = {"configurable": {"thread_id": "t"}}
    trip_builder().compile(checkpointer=make_saver()).invoke(START_STATE, config)
    graph = trip_builder().compile(checkpointer=make_saver())
    graph.invoke({"legs": []}, config)  # a second turn: nodes get the stored types
    return graph.get_state(config).values


def test_the_graphs_own_types_round_trip_as_with_sqlite_saver(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="none")
    ours = two_turns(lambda: WalstoreSaver(store))
    conn = sqlite3.connect(str(tmp_path / "db.sqlite"), check_same_thread=False)
    theirs = two_turns(lambda: sqlite_saver.SqliteSaver(conn))
    assert ours == theirs
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}
    assert [type(x) for x in ours["legs"]] == [Leg, Leg, Leg]
    assert ours["status"] is Status.BOOKED and isinstance(ours["spot"], Spot)
    assert ours["at"] == START_STATE["at"] + datetime.timedelta(hours=2)
    store.close()


def test_a_class_that_would_not_come_back_is_refused_at_put(tmp_path):
    @dataclasses.dataclass
    class Local:  # defined in a function: cannot be found again by name
        x: int

    class Holder(TypedDict):
        item: object

    b = StateGraph(Holder)
    b.add_node("n", lambda s: {"item": s["item"]})
    b.add_edge(START, "n")
    b.add_edge("n", END)
    config = {"configurable": {"thread_id": "t"}}
    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    with pytest.raises(StateTypeError) as e:
        b.compile(checkpointer=saver).invoke({"item": Local(1)}, config, durability="sync")
    assert "Local" in str(e.value) and "allowed_types" in str(e.value)
    assert list(saver.list(config)) == []  # nothing of it was stored
    # what SqliteSaver does instead: the next turn silently gets a dict
    conn = sqlite3.connect(str(tmp_path / "db.sqlite"), check_same_thread=False)
    graph = b.compile(checkpointer=sqlite_saver.SqliteSaver(conn))
    graph.invoke({"item": Local(1)}, config)
    assert graph.get_state(config).values["item"] == {"x": 1}

    # library types are not rebuilt unless listed; listed, they are
    with pytest.raises(StateTypeError, match="HTTPStatus"):
        b.compile(checkpointer=saver).invoke({"item": http.HTTPStatus.OK}, config)
    listed = WalstoreSaver(saver.store, allowed_types=[http.HTTPStatus])
    graph = b.compile(checkpointer=listed)
    graph.invoke({"item": http.HTTPStatus.OK}, config)
    assert graph.get_state(config).values["item"] is http.HTTPStatus.OK
    saver.close()


def test_pending_writes_and_appended_list_items_are_checked_too(tmp_path):
    @dataclasses.dataclass
    class Local:
        x: int

    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    from langgraph.checkpoint.base import empty_checkpoint
    c = empty_checkpoint()
    c["channel_values"] = {"legs": [Leg("Rome", 1, datetime.date(2026, 1, 1))]}
    c["channel_versions"] = {"legs": saver.get_next_version(None)}
    stored = saver.put(config, c, {"source": "input", "step": -1}, c["channel_versions"])
    with pytest.raises(StateTypeError, match="Local"):
        saver.put_writes(stored, [("legs", [Local(1)])], "task-1")
    assert saver.get_tuple(stored).pending_writes == []
    # a grown list is stored as a delta: the appended items are checked
    c2 = empty_checkpoint()
    c2["channel_values"] = {"legs": c["channel_values"]["legs"] + [Local(2)]}
    c2["channel_versions"] = {"legs": saver.get_next_version(c["channel_versions"]["legs"])}
    with pytest.raises(StateTypeError, match="Local"):
        saver.put(stored, c2, {"source": "loop", "step": 0}, c2["channel_versions"])
    assert len(list(saver.list(config))) == 1
    saver.close()


def test_app_types_off_needs_a_list_and_langgraphs_strict_allowlist_feeds_it(tmp_path,
                                                                           monkeypatch):
    from langgraph._internal import _serde
    store = walstore.open(str(tmp_path / "store"), durability="none")
    strict = WalstoreSaver(store, app_types=False)
    config = {"configurable": {"thread_id": "t"}}
    with pytest.raises(StateTypeError, match="allowed_types"):
        trip_builder().compile(checkpointer=strict).invoke(START_STATE, config)
    listed = WalstoreSaver(store, app_types=False,
                           allowed_types=[Leg, Status, Traveller, Spot])
    trip_builder().compile(checkpointer=listed).invoke(START_STATE, config)
    assert trip_builder().compile(checkpointer=listed).get_state(config).values[
        "status"] is Status.BOOKED
    # LANGGRAPH_STRICT_MSGPACK=true: compile() passes the schema types (with_allowlist)
    monkeypatch.setattr(_serde, "STRICT_MSGPACK_ENABLED", True)
    graph = trip_builder().compile(checkpointer=WalstoreSaver(store, app_types=False))
    config2 = {"configurable": {"thread_id": "t2"}}
    without_spot = {k: v for k, v in START_STATE.items() if k != "spot"}
    graph.invoke(without_spot, config2)
    assert isinstance(graph.get_state(config2).values["traveller"], Traveller)
    assert graph.get_state(config2).values["legs"][-1].city == "Paris!"
    # LangGraph's schema allowlist leaves NamedTuples out: refused, not a silent list
    with pytest.raises(StateTypeError, match="Spot"):
        graph.invoke(START_STATE, {"configurable": {"thread_id": "t3"}})
    store.close()


def test_a_stored_value_can_only_name_data_classes(tmp_path):
    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    from langgraph.checkpoint.base import empty_checkpoint
    c = empty_checkpoint()
    c["channel_values"] = {"v": 1}
    c["channel_versions"] = {"v": 1}
    stored = saver.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, c,
                       {"source": "input", "step": -1}, {"v": 1})
    key = saver.keys.at("t", "").blob("v", 1)
    module = __name__
    crafted = {
        "function": ormsgpack.Ext(0, ormsgpack.packb([module, "a_function_not_a_class", 1])),
        "method": ormsgpack.Ext(3, ormsgpack.packb([module, "Leg", "x", "mro"])),
        "import": ormsgpack.Ext(2, ormsgpack.packb(["antigravity", "Fly", {}])),
        "library": ormsgpack.Ext(0, ormsgpack.packb(["subprocess", "Popen", "true"])),
    }
    for name, ext in crafted.items():
        with saver.store.transaction() as tx:
            tx.put(key, ["msgpack", ormsgpack.packb(ext)])
        with pytest.raises(StateTypeError):
            saver.get_tuple(stored)
    assert "antigravity" not in __import__("sys").modules  # never imported
    # an application data class named in a stored value is rebuilt through its constructor
    with saver.store.transaction() as tx:
        tx.put(key, ["msgpack", ormsgpack.packb(ormsgpack.Ext(0, ormsgpack.packb(
            [module, "Status", "booked"])))])
    assert saver.get_tuple(stored).checkpoint["channel_values"]["v"] is Status.BOOKED
    saver.close()


# ---- probe 43: values whose class is rebuilt, but not as they were ----------------------
@dataclasses.dataclass(frozen=True)
class Point:
    coords: tuple


class Shape(enum.Enum):
    SMALL = (1, 2)
    LARGE = (3, 4)


class Pair(NamedTuple):
    key: tuple
    value: int


class Tagged(BaseModel):
    tags: tuple
    extra: object = None


@dataclasses.dataclass
class Task:
    title: str
    status: str = dataclasses.field(default="new", init=False)


@dataclasses.dataclass
class Budget:
    total: int
    remaining: int = 0

    def __post_init__(self):
        self.remaining = self.remaining or self.total  # (only fills the default in)


@dataclasses.dataclass
class Reset:
    total: int
    remaining: int = 0

    def __post_init__(self):
        self.remaining = self.total  # overwrites what was stored


class Session(BaseModel):
    user: str
    _token: str = pydantic.PrivateAttr(default="")


class Account(BaseModel):
    user: str
    api_key: str = pydantic.Field(exclude=True)


class Anything(TypedDict):
    v: object


def put_and_read(saver, value, thread: str = "t"):
    b = StateGraph(Anything)
    b.add_node("n", lambda s: {"v": s["v"]})
    b.add_edge(START, "n")
    b.add_edge("n", END)
    graph = b.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": thread}}
    graph.invoke({"v": value}, config)
    return graph.get_state(config).values["v"]


@pytest.mark.parametrize("value", [
    (1, 2), {"k": (1, [2, (3,)])}, [(1, 2), (3, 4)], Point((1, 2)), Shape.SMALL,
    Pair((1, "a"), 2), Tagged(tags=("a", "b"), extra=(1, 2)), {(1, 2): "tuple key"},
    frozenset({(1, 2)}), (), ((),)])
def test_tuples_come_back_as_tuples_at_every_depth(tmp_path, value):
    # (probe 43: LangGraph's encoding writes a tuple as a list: a frozen dataclass came
    # back unhashable, and an Enum of tuple values made the thread unreadable)
    store = walstore.open(str(tmp_path / "s"), durability="none")
    got = put_and_read(WalstoreSaver(store), value)
    assert got == value and type(got) is type(value)
    assert repr(got) == repr(value)  # (the same types inside too)
    if isinstance(value, Point):
        assert hash(got) == hash(value)
    got = put_and_read(WalstoreSaver(store), value)  # read by a fresh saver, again
    assert repr(got) == repr(value)
    store.close()


@pytest.mark.parametrize("value, what", [
    (Task("write report"), "init=False"),
    (Reset(100, 40), "__post_init__"),
    (Session(user="u"), None), (Account(user="u", api_key="K-1"), "exclude=True"),
    (Budget(100, 40), None), (Budget(100), None)])
def test_a_value_rebuilt_changed_or_not_at_all_is_refused_at_put(tmp_path, value, what):
    # (probe 43: a field(init=False) was accepted and the thread could not be read
    # again; __post_init__ overwrote a stored field, a private attribute and an
    # exclude=True field came back changed or missing, all silently)
    if isinstance(value, Session) and what is None:
        value._token = "abc"
        what = "private"
    if isinstance(value, Reset):
        value.remaining = 40  # spent since; __post_init__ would reset it
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    if what is None:  # (a __post_init__ that leaves stored values alone is fine)
        assert put_and_read(saver, value) == value
        store.close()
        return
    with pytest.raises(StateTypeError) as e:
        put_and_read(saver, value)
    assert type(value).__qualname__ in str(e.value) and "would not come back" in str(e.value)
    assert list(saver.list({"configurable": {"thread_id": "t"}})) == []
    assert put_and_read(saver, {"plain": 1}, "t2") == {"plain": 1}  # the saver goes on
    store.close()


@pytest.mark.parametrize("key", [
    Status.DRAFT, Shape.SMALL, datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 2, 3),
    uuid.UUID(int=7), (1, Status.DRAFT)])
def test_a_dict_key_that_would_come_back_as_a_string_is_refused_at_put(tmp_path, key):
    # (probe-integ: {Color.RED: 1}, {date(2024, 1, 2): 1}, {UUID(...): 1} came back keyed
    # by 'red', '2024-01-02' and the UUID's text, silently: LangGraph's encoding writes
    # such a key as its string)
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    with pytest.raises(StateTypeError) as e:
        put_and_read(saver, {"k": {key: 1}})
    assert "dict key" in str(e.value) or "subclass" in str(e.value)
    assert list(saver.list({"configurable": {"thread_id": "t"}})) == []
    for fine in ({1: "a", 2.5: "b", True: "c", None: "d", b"x": "e"}, {(1, "a"): 2}):
        assert put_and_read(saver, fine, "t2") == fine  # keys that come back as they are
    store.close()


def test_a_str_with_a_lone_surrogate_is_refused_at_put(tmp_path):
    # (probe-integ: "hello \ud83d" came back as "hello ?", silently)
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    for value in ("hello \ud83d", {"nested": ["ok", "cut \udc00"]}, {"key \ud83d": 1}):
        with pytest.raises(StateTypeError, match="lone surrogate"):
            put_and_read(saver, value)
    assert list(saver.list({"configurable": {"thread_id": "t"}})) == []
    assert put_and_read(saver, "hello \U0001F600", "t2") == "hello \U0001F600"
    store.close()


# ---- what the encoding flattens, found inside objects too (probe-lgstore) ----------------
class Profile(dict):
    pass


class Name(str):
    pass


@dataclasses.dataclass
class Box:
    a: object


class AnyBox(BaseModel):
    a: object = None


class Nested(BaseModel):  # a field that names its class gets it back
    traveller: Traveller
    legs: list[Leg] = []
    by_status: dict[Status, int] = {}


class Cell(NamedTuple):
    a: object


@pytest.mark.parametrize("value, refused", [
    (Box(Profile(a=1)), "Profile"), (Box(ValueError("boom")), "ValueError"),
    (Box({Status.DRAFT: 1}), "Status"), (Box(Name("bob")), "Name"),
    (Box([bytearray(b"xy")]), "bytearray"),
    (AnyBox(a=Profile(a=1)), "AnyBox.a"), (AnyBox(a={"k": [ValueError("x")]}), "AnyBox.a"),
    (AnyBox(a={Status.DRAFT: 1}), "AnyBox.a"), (AnyBox(a=Traveller(
        name="Ana", born=datetime.date(1990, 2, 3))), "AnyBox.a"),
    (AnyBox(a=Leg("Rome", 1, datetime.date(2026, 1, 1))), "AnyBox.a"),
    (collections.deque([Profile(a=1)]), "Profile"), (Cell(Profile(a=1)), "Profile"),
    (Box(collections.deque([ValueError("x")])), "ValueError"),
    ({"k": [Box(Cell(frozenset({Name("x")})))]}, "Name"),
])
def test_a_value_flattened_inside_an_object_is_refused_at_put(tmp_path, value, refused):
    # (probe-lgstore: only the top of a channel value and plain dicts/lists/tuples/sets
    # were walked: Box(Profile(a=1)) came back as Box(a={'a': 1}), Box(ValueError('boom'))
    # as Box(a="ValueError('boom')"), Box({Color.RED: 1}) as Box(a={1: 1}), a Profile in a
    # pydantic model, a deque or a NamedTuple as a dict, all silently)
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    with pytest.raises(StateTypeError) as e:
        put_and_read(saver, value)
    assert refused in str(e.value) and "come back" in str(e.value)
    assert list(saver.list({"configurable": {"thread_id": "t"}})) == []
    store.close()


@pytest.mark.parametrize("value", [
    Box({"k": [1, (2, 3)], 4: {5: b"x"}}), Box(collections.deque([Leg(
        "Rome", 1, datetime.date(2026, 1, 1))])), Cell({"a": [Status.DRAFT]}),
    AnyBox(a={"k": [1, 2.5, None, "s", b"b"]}), AnyBox(a=(1, Status.BOOKED)),
    Nested(traveller=Traveller(name="Ana", born=datetime.date(1990, 2, 3)),
           legs=[Leg("Rome", 1, datetime.date(2026, 1, 1))], by_status={Status.DRAFT: 2}),
])
def test_what_comes_back_the_same_inside_an_object_is_accepted(tmp_path, value):
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    got = put_and_read(saver, value)
    assert got == value and repr(got) == repr(value) and type(got) is type(value)
    # a bytearray that is a whole value is stored as one (LangGraph's "bytearray" type)
    whole = saver.serde.loads_typed(saver.serde.dumps_typed(bytearray(b"xy")))
    assert type(whole) is bytearray and whole == b"xy"
    store.close()


_MODULE_CHILD = r'''
import sys
from typing import TypedDict
import walstore
from walstore.integrations.langgraph import WalstoreSaver
from langgraph.graph import END, START, StateGraph

class S(TypedDict):
    v: object

mode, path = sys.argv[1], sys.argv[2]
allowed = [("apptypes_lg", "Point")] if mode == "listed" else []
if mode == "write":
    import apptypes_lg
b = StateGraph(S)
b.add_node("n", lambda s: {})
b.add_edge(START, "n")
b.add_edge("n", END)
graph = b.compile(checkpointer=WalstoreSaver(walstore.open(path), allowed_types=allowed))
config = {"configurable": {"thread_id": "t"}}
if mode == "write":
    graph.invoke({"v": apptypes_lg.Point(1, 2)}, config)
else:
    assert "apptypes_lg" not in sys.modules
    try:
        v = graph.get_state(config).values["v"]
        print("read", type(v).__module__, type(v).__name__, v.x, v.y)
    except TypeError as e:
        print("refused", e)
'''


def test_a_class_whose_module_is_not_imported_is_read_once_it_is_listed(tmp_path):
    # (probe-lgstore: a fresh process that has not imported the state's module cannot
    # read the thread; SqliteSaver imports any module a stored value names.  walstore
    # imports only the modules of classes listed in allowed_types as (module, name).)
    (tmp_path / "apptypes_lg.py").write_text(
        "import dataclasses\n\n@dataclasses.dataclass\nclass Point:\n    x: int\n    y: int\n")
    child = tmp_path / "child.py"
    child.write_text(_MODULE_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.path.dirname(os.path.dirname(walstore.__file__))])}

    def run(mode: str) -> str:
        done = subprocess.run([sys.executable, str(child), mode, str(tmp_path / "s")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("write") == ""
    refused = run("plain")
    assert refused.startswith("refused") and "'apptypes_lg' is not imported" in refused
    assert "allowed_types=[('apptypes_lg', 'Point')]" in refused
    assert run("listed") == "read apptypes_lg Point 1 2"
