"""WalstoreStore: LangGraph's BaseStore in walstore, differentially against InMemoryStore.

No conformance suite exists for stores, so random operation sequences (seeded) run
against both WalstoreStore and LangGraph's InMemoryStore, and every observation (items,
search results, namespace listings, raised errors) must be identical after every step.
InMemoryStore is made comparable in two documented ways only: its iteration order (dict
insertion order) becomes key order, and namespaces it keeps after their last item was
deleted (a defaultdict) are dropped, as the database-backed stores do.
"""
from __future__ import annotations

import asyncio
import enum
import random
import time
from typing import Any, NamedTuple

import pytest

pytest.importorskip("langgraph.store.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.store.base import (GetOp, Item, ListNamespacesOp, MatchCondition,  # noqa: E402
                                  PutOp, SearchOp)
from langgraph.store.memory import InMemoryStore  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver, WalstoreStore  # noqa: E402
from walstore.integrations.langgraph import store as store_module  # noqa: E402


class Reference(InMemoryStore):
    """InMemoryStore with key-ordered iteration and no empty namespaces."""

    def _canonical(self) -> None:
        data = {ns: dict(sorted(items.items()))
                for ns, items in sorted(self._data.items()) if items}
        self._data.clear()
        self._data.update(data)

    def _filter_items(self, op):
        self._canonical()
        return super()._filter_items(op)

    def _handle_list_namespaces(self, op):
        self._canonical()
        return super()._handle_list_namespaces(op)


NAMESPACES = [("a",), ("a", "b"), ("a", "b", "c"), ("b",), ("b", "x"), ("users", "1", "prefs"),
              ("users", "2"), ("é",), ("a", "bb"), ("ab",)]
PREFIXES = [(), ("a",), ("a", "b"), ("users",), ("b",), ("nope",), ("é",)]
KEYS = ["k1", "k2", "k3", "ключ", "z", "k1 "]
PATTERNS = [("a",), ("a", "*"), ("*", "b"), ("users", "*", "prefs"), ("b",), ("*",),
            ("c",), ("prefs",), ("*", "2")]
FILTERS = [None, {"tag": "x"}, {"n": {"$gt": 2}}, {"n": {"$lte": 3}, "tag": "y"},
           {"nested": {"d": 1}}, {"list": [1, 2]}, {"n": {"$ne": 1}}, {"missing": None},
           {"n": {"$eq": 4}}, {"n": {"$gte": 1, "$lt": 4}}, {"tup": (1, 2)},
           {"tup": {"$eq": (1, 2)}}, {"tup": {"$eq": [1, 2]}}, {"list": {"$eq": (1, 2)}},
           {"tup": {"$eq": (1, (2, 3))}}]
# values holding tuples (nested, in lists, in dicts, empty): InMemoryStore gives them back
# as tuples, and ``$eq`` tells a tuple from a list
TUPLES = [(1, 2), [1, 2], (1, (2, 3)), (1, [2, 3]), [(1, 2), [3]], {"t": (1,), "l": [1]},
          (), ((),), ({"d": (4,)},)]


def random_value(rng: random.Random) -> dict:
    v: dict[str, Any] = {}
    if rng.random() < 0.85:
        v["n"] = rng.randrange(6)
    if rng.random() < 0.7:
        v["tag"] = rng.choice(["x", "y"])
    if rng.random() < 0.3:
        v["nested"] = {"d": rng.randrange(3)}
    if rng.random() < 0.3:
        v["list"] = rng.choice([[1, 2], [2, 1], [1], (1, 2)])
    if rng.random() < 0.3:
        v["tup"] = rng.choice(TUPLES)
    return v


def random_op(rng: random.Random):
    kind = rng.choices(["put", "delete", "get", "search", "list"], [5, 1, 2, 3, 2])[0]
    if kind == "put":
        return PutOp(rng.choice(NAMESPACES), rng.choice(KEYS), random_value(rng))
    if kind == "delete":
        return PutOp(rng.choice(NAMESPACES), rng.choice(KEYS), None)
    if kind == "get":
        return GetOp(rng.choice(NAMESPACES), rng.choice(KEYS))
    if kind == "search":
        return SearchOp(rng.choice(PREFIXES), rng.choice(FILTERS), rng.randrange(5),
                        rng.randrange(4), rng.choice([None, "hotels in rome"]))
    conditions = []
    if rng.random() < 0.5:
        conditions.append(MatchCondition("prefix", rng.choice(PATTERNS)))
    if rng.random() < 0.3:
        conditions.append(MatchCondition("suffix", rng.choice(PATTERNS)))
    return ListNamespacesOp(tuple(conditions), rng.choice([None, 1, 2, 3]),
                            rng.randrange(1, 6), rng.randrange(3))


def seen(result: Any) -> Any:
    """What a caller observes of a result (timestamps aside: checked separately)."""
    if isinstance(result, Item):
        return (result.namespace, result.key, result.value, getattr(result, "score", None))
    if isinstance(result, list):
        return [seen(r) for r in result]
    return result


def outcome(fn) -> Any:
    try:
        return seen(fn())
    except Exception as e:  # the same error type on both sides is the same observation
        return ("raised", type(e).__name__)


@pytest.fixture
def memory(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="none")
    yield WalstoreStore(store)
    store.close()


@pytest.mark.parametrize("seed", range(24))
def test_random_operations_observe_the_same_as_in_memory_store(memory, seed):
    rng = random.Random(seed)
    ref = Reference()
    for step in range(70):
        how = rng.random()
        if how < 0.6:  # one op through the public methods
            op = random_op(rng)
            calls = {"ours": memory, "ref": ref}
            got = {name: outcome(lambda s=s: call_method(s, op)) for name, s in calls.items()}
        else:  # a batch of a few ops, sync or async
            ops = [random_op(rng) for _ in range(rng.randrange(1, 5))]
            if how < 0.8:
                got = {"ours": outcome(lambda: memory.batch(ops)),
                       "ref": outcome(lambda: ref.batch(ops))}
            else:
                got = {"ours": outcome(lambda: asyncio.run(memory.abatch(ops))),
                       "ref": outcome(lambda: asyncio.run(ref.abatch(ops)))}
        assert got["ours"] == got["ref"], (seed, step)
        # and the whole contents agree after every step
        everything = SearchOp((), None, 1000, 0)
        assert seen(memory.batch([everything])[0]) == seen(ref.batch([everything])[0])


def call_method(store, op) -> Any:
    """The public BaseStore method an op stands for."""
    if isinstance(op, PutOp):
        if op.value is None:
            return store.delete(op.namespace, op.key)
        return store.put(op.namespace, op.key, op.value)
    if isinstance(op, GetOp):
        return store.get(op.namespace, op.key)
    if isinstance(op, SearchOp):
        return store.search(op.namespace_prefix, filter=op.filter, limit=op.limit,
                            offset=op.offset, query=op.query)
    prefix = next((c.path for c in op.match_conditions if c.match_type == "prefix"), None)
    suffix = next((c.path for c in op.match_conditions if c.match_type == "suffix"), None)
    return store.list_namespaces(prefix=prefix, suffix=suffix, max_depth=op.max_depth,
                                 limit=op.limit, offset=op.offset)


def test_invalid_namespaces_are_refused_like_the_base_store(memory):
    for bad in [(), ("langgraph", "x"), ("a.b",), ("",)]:
        assert outcome(lambda: memory.put(bad, "k", {"v": 1})) == \
            outcome(lambda: InMemoryStore().put(bad, "k", {"v": 1}))
    with pytest.raises(ValueError):  # a label with a period, even inside a raw batch
        memory.batch([PutOp(("a.b",), "k", {"v": 1})])
    with pytest.raises(TypeError):  # not msgpack data: refused at put, nothing stored
        memory.put(("a",), "k", {"when": object()})
    assert memory.search(()) == []


class Profile(dict):
    pass


class Name(str):
    pass


class Level(enum.IntEnum):
    LOW = 1


class Spot(NamedTuple):
    lat: float
    lon: float


@pytest.mark.parametrize("value, where, kind, base", [
    ({"p": Profile(a=1)}, "value['p']", "Profile", "dict"),
    ({"n": Name("bob")}, "value['n']", "Name", "str"),
    ({"b": bytearray(b"xy")}, "value['b']", "bytearray", "bytes"),
    ({"x": [1, {"y": (2, Level.LOW)}]}, "value['x'][1]['y'][1]", "Level", "int"),
    ({"s": Spot(1.0, 2.0)}, "value['s']", "Spot", "tuple"),
    ({Name("k"): 1}, "a key of value", "Name", "str"),
    (Profile(a=1), "value is", "Profile", "dict")])
def test_a_value_that_would_come_back_as_another_type_is_refused_at_put(memory, value,
                                                                         where, kind, base):
    # (probe-lgstore: {"p": Profile(a=1)} came back holding a plain dict, a str subclass
    # as str, a bytearray as bytes, silently; InMemoryStore gives them back as put)
    memory.put(("users", "u1"), "k", {"v": 1})
    with pytest.raises(TypeError) as e:
        memory.put(("users", "u1"), "k", value)
    message = str(e.value)
    assert where in message and kind in message
    assert f"plain {base}" in message and "nothing was written" in message
    with pytest.raises(TypeError):
        asyncio.run(memory.aput(("users", "u1"), "k", value))
    assert memory.get(("users", "u1"), "k").value == {"v": 1}  # nothing was written
    plain = {"x": [1, {"y": (2, 1)}], "b": b"xy", 3: None, "t": (1.0, 2.0)}
    memory.put(("users", "u1"), "k", plain)
    got = memory.get(("users", "u1"), "k").value
    assert got == plain and repr(got) == repr(plain)


def test_items_keep_created_at_and_move_updated_at(memory):
    memory.put(("a",), "k", {"v": 1})
    first = memory.get(("a",), "k")
    assert first.created_at == first.updated_at
    time.sleep(0.002)
    memory.put(("a",), "k", {"v": 2})
    second = memory.get(("a",), "k")
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    assert second.value == {"v": 2}


def test_long_labels_and_keys_are_stored_and_listed(memory):
    ns, key = ("x" * 300, "y"), "k" * 400
    memory.put(ns, key, {"v": 1})
    assert memory.get(ns, key).value == {"v": 1}
    assert [(i.namespace, i.key) for i in memory.search(("x" * 300,))] == [(ns, key)]
    assert memory.list_namespaces(prefix=("x" * 300,)) == [ns]
    with pytest.raises(ValueError, match="too long"):
        memory.put(tuple(f"label{i}" * 14 for i in range(6)), "k", {"v": 1})


def test_memory_survives_reopen(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="full")
    WalstoreStore(store).put(("users", "ana"), "prefs", {"seat": "window"})
    store.close()
    store = walstore.open(str(tmp_path / "store"), durability="full")
    assert WalstoreStore(store).get(("users", "ana"), "prefs").value == {"seat": "window"}
    store.close()


def test_tuples_come_back_as_tuples_across_reopen_and_refresh(tmp_path):
    """Tuples (nested, in lists and dicts) came back as lists (msgpack has no tuple), where
    InMemoryStore gives them back as they were put.  They come back as tuples now, after a
    reopen and after a TTL refresh rewrote the record; an item in the older record format
    (no tuple marks: every item written before) reads as it always did."""
    value = {"t": (1, 2), "n": [(3, (4, 5)), [6]], "d": {"e": (), "f": [7]}, "x": 8}
    store = walstore.open(str(tmp_path / "store"), durability="full")
    mem = WalstoreStore(store)
    mem.put(("users", "ana"), "prefs", value, ttl=60)
    assert mem.get(("users", "ana"), "prefs", refresh_ttl=True).value == value
    key = mem.keys.item(("users", "old"), "prefs")
    with store.transaction() as tx:  # (an item as an older walstore wrote it)
        tx.put(key, {"v": {"t": [1, 2]}, "c": 1_700_000_000_000_000,
                     "u": 1_700_000_000_000_000})
    store.close()
    store = walstore.open(str(tmp_path / "store"), durability="full")
    mem = WalstoreStore(store)
    got = mem.get(("users", "ana"), "prefs").value
    assert got == value and type(got["n"][0][1]) is tuple
    assert [i.value for i in mem.search(("users",))] == [value, {"t": [1, 2]}]
    assert [i.key for i in mem.search(("users",), filter={"t": {"$eq": (1, 2)}})] == ["prefs"]
    assert [i.namespace for i in mem.search(("users",), filter={"t": [1, 2]})] == \
        [("users", "ana"), ("users", "old")]
    store.close()


def _nest(depth: int, leaf: Any, kinds: str = "l") -> Any:
    """``leaf`` inside ``depth`` containers, kinds cycling through ``kinds`` (l: a list,
    t: a tuple, d: a dict, s: a tuple holding a tuple sibling too), outermost last."""
    for i in range(depth):
        kind = kinds[i % len(kinds)]
        leaf = ([leaf] if kind == "l" else (leaf,) if kind == "t" else {"k": leaf, "x": 1}
                if kind == "d" else ((i,), leaf))
    return leaf


def _same(a: Any, b: Any) -> bool:
    """``a == b`` with tuples told from lists, at any depth (``==`` recurses)."""
    pairs = [(a, b)]
    while pairs:
        x, y = pairs.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            pairs.extend((x[k], y[k]) for k in x)
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                return False
            pairs.extend(zip(x, y))
        elif x != y:
            return False
    return True


def _deepest_storable(mem: WalstoreStore) -> int:
    """The deepest ``{"t": <lists>}`` the codec stores (msgpack: about 1,000 levels)."""
    for depth in range(1100, 0, -1):
        try:
            mem.put(("probe",), "deepest", {"t": _nest(depth, 1)})
            return depth
        except ValueError as e:
            assert "nests too deeply" in str(e)
    raise AssertionError("nothing stored")


def test_deep_values_with_and_without_tuples_are_stored_as_in_memory(tmp_path):
    """Found by a review probe: the tuple marking walk recursed, so a value 600 lists deep
    (no tuple anywhere) raised a raw RecursionError at put, where walstore stored it before
    and InMemoryStore stores it; and the marks nested 3 msgpack levels per level of the
    value, so a tuple 400 deep was refused as nesting too deeply.  Marks are now a flat
    list of paths (two msgpack levels), walked with an explicit stack: whatever depth is
    stored as plain lists is stored with tuples too, one deeper is refused by the codec's
    one-line message, and the marks grow with the value, not with its depth squared."""
    store = walstore.open(str(tmp_path / "store"), durability="full")
    mem, ref = WalstoreStore(store), InMemoryStore()
    top = _deepest_storable(mem)
    assert top > 1000
    values = {"list600": {"t": _nest(600, [1])}, "tuple400": {"t": _nest(400, (1,))},
              "top_lists": {"t": _nest(top, 1)}, "top_tuples": {"t": _nest(top, 1, "t")},
              "top_mixed": {"t": _nest(top, 1, "ltdts")},
              "siblings": {"t": _nest(top // 2, 1, "s"), "u": [(1,), [(2, ())]]}}
    for name, value in values.items():
        ref.put(("ns",), name, value)
        mem.put(("ns",), name, value)
        assert _same(mem.get(("ns",), name).value, ref.get(("ns",), name).value)
        assert _same(mem.get(("ns",), name).value, value)
    assert not _same(mem.get(("ns",), "top_tuples").value, values["top_lists"])
    with store.transaction() as tx:  # a tuple at every level: marks linear in the value
        marks = tx.get(mem.keys.item(("ns",), "siblings"))["tp"]
    assert all(type(s) is int for m in marks for s in m)  # (flat: two msgpack levels)
    # (2 tuples a level, each mark [keep, slot]; full paths would be ~top**2 / 4 slots)
    assert len(marks) == 2 * (top // 2) + 3 and sum(len(m) for m in marks) < 2 * len(marks) + 9
    for value in ({"t": _nest(top + 1, 1)}, {"t": _nest(top + 1, 1, "t")},
                  {"t": _nest(top + 1, 1, "ltdts")}):
        with pytest.raises(ValueError, match="nests too deeply") as err:
            mem.put(("ns",), "too_deep", value)
        assert "\n" not in str(err.value)
    loop: list = [1]
    loop.append(loop)
    twice: list = []
    twice += [twice, twice, (1,)]  # (2**depth paths: refused without walking them all)
    for value in ({"t": loop}, {"t": (loop,)}, {"t": twice}):
        with pytest.raises(ValueError, match="nests too deeply"):
            mem.put(("ns",), "loop", value)
    assert mem.get(("ns",), "too_deep") is None and mem.get(("ns",), "loop") is None
    key = mem.keys.item(("ns",), "odd")
    for marks in ([2, [["t", [1, []]]]], [[5, 0]], [[0, 9]], [[0, "t"]], "x", [[0, 0, 0, 0]]):
        with store.transaction() as tx:  # (marks that do not fit: the value as stored)
            tx.put(key, {"v": {"t": [[1]]}, "c": 1, "u": 1, "tp": marks})
        assert _same(mem.get(("ns",), "odd").value, {"t": [[1]]})
    store.close()


# ---- TTL --------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.us = 1_700_000_000_000_000

    def __call__(self) -> int:
        return self.us

    def advance(self, seconds: float) -> None:
        self.us += int(seconds * 1_000_000)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(store_module, "_now_us", c)
    return c


def test_ttl_expires_items_and_reads_refresh_it(memory, clock):
    memory.put(("a",), "k", {"v": 1}, ttl=1)            # one minute
    memory.put(("a",), "forever", {"v": 2})
    clock.advance(30)
    assert memory.sweep_ttl() == 0
    assert memory.get(("a",), "k").value == {"v": 1}    # refresh_on_read: by default
    clock.advance(50)                                   # 80 s after the put, 50 after the read
    assert memory.sweep_ttl() == 0
    memory.get(("a",), "k", refresh_ttl=False)          # a read that does not refresh
    clock.advance(11)
    assert memory.sweep_ttl() == 1
    assert memory.get(("a",), "k") is None
    assert [i.key for i in memory.search(("a",))] == ["forever"]
    memory.put(("a",), "k2", {"v": 3}, ttl=1)
    clock.advance(40)
    memory.search(("a",))                               # a search refreshes what it returns
    clock.advance(40)
    assert memory.sweep_ttl() == 0
    clock.advance(21)
    assert memory.sweep_ttl() == 1


def test_ttl_config_default_ttl_and_omit_expired(tmp_path, clock):
    store = walstore.open(str(tmp_path / "store"), durability="none")
    memory = WalstoreStore(store, ttl={"default_ttl": 2, "refresh_on_read": False,
                                       "omit_expired": True})
    memory.put(("a",), "k", {"v": 1})                   # default_ttl applies
    memory.put(("b",), "k", {"v": 1}, ttl=None)         # explicitly no expiry
    clock.advance(60)
    memory.get(("a",), "k")                             # refresh_on_read=False: no refresh
    clock.advance(61)
    assert memory.get(("a",), "k") is None              # expired: omitted before a sweep
    assert memory.search(()) != [] and [i.namespace for i in memory.search(())] == [("b",)]
    assert memory.list_namespaces() == [("b",)]
    assert memory.sweep_ttl() == 1
    assert memory.get(("b",), "k").value == {"v": 1}
    store.close()


@pytest.mark.parametrize("ttl", [float("inf"), float("-inf"), float("nan"), 1e12, -1, "5"])
def test_a_ttl_with_no_expiry_to_store_is_refused_naming_it(memory, ttl):
    """ttl=inf raised a bare OverflowError, 1e12 minutes the codec's "Integer value out of
    range" about the record, NaN "cannot convert float NaN to integer" (none named the
    TTL); a negative one was stored as an item born expired, or failed packing its expiry
    entry.  Refused naming the ttl, before anything is written."""
    memory.put(("a",), "k", {"v": 1})
    error = TypeError if isinstance(ttl, str) else ValueError
    with pytest.raises(error, match=r"^ttl must be .*; nothing was written$"):
        memory.put(("a",), "k", {"v": 2}, ttl=ttl)
    with pytest.raises(error, match="ttl"):
        memory.batch([PutOp(("a",), "k2", {"v": 2}), PutOp(("a",), "k", {"v": 3}, ttl=ttl)])
    assert [(i.key, i.value) for i in memory.search(("a",))] == [("k", {"v": 1})]
    assert list(memory.store.scan(prefix=memory.keys.expiry)) == []
    if not isinstance(ttl, str):
        with pytest.raises(ValueError, match="default_ttl"):
            WalstoreStore(memory.store, ttl={"default_ttl": ttl})
    memory.put(("a",), "k", {"v": 4}, ttl=0)               # the edges are taken
    memory.put(("a",), "k", {"v": 5}, ttl=store_module.MAX_TTL_MINUTES)
    assert memory.get(("a",), "k").value == {"v": 5}


def test_the_sweeper_thread_deletes_expired_items(memory, clock):
    memory.put(("a",), "k", {"v": 1}, ttl=1)
    clock.advance(61)
    memory.start_ttl_sweeper(sweep_interval_minutes=0.0005)  # every 30 ms
    deadline = time.monotonic() + 10
    while memory.get(("a",), "k", refresh_ttl=False) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert memory.stop_ttl_sweeper(timeout=5)


# ---- in a graph -------------------------------------------------------------------------
class Turn(TypedDict):
    text: str


def test_a_graph_remembers_across_threads_in_the_same_store(tmp_path):
    from langgraph.config import get_store
    store = walstore.open(str(tmp_path / "store"), durability="none")

    def remember(state: Turn) -> dict:
        memories = get_store()
        seen_before = [i.value["text"] for i in memories.search(("ana",))]
        memories.put(("ana",), f"turn-{len(seen_before)}", {"text": state["text"]})
        return {"text": " | ".join(seen_before + [state["text"]])}

    b = StateGraph(Turn)
    b.add_node("remember", remember)
    b.add_edge(START, "remember")
    b.add_edge("remember", END)
    graph = b.compile(checkpointer=WalstoreSaver(store), store=WalstoreStore(store))
    graph.invoke({"text": "likes window seats"}, {"configurable": {"thread_id": "t1"}})
    out = graph.invoke({"text": "books Rome"}, {"configurable": {"thread_id": "t2"}})
    assert out["text"] == "likes window seats | books Rome"
    store.close()
