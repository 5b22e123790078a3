"""The agent-framework integrations: what a probe of stop 29 found, each named after the
promise it broke."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langgraph")

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver, WalstoreStore  # noqa: E402


def _slow_commits(monkeypatch, store, seconds=0.05):
    """Every commit of ``store`` takes ``seconds`` more (before its record): a cancel
    lands while the worker thread is inside it."""
    import time
    from walstore.engine import transaction as T
    real = T.Transaction.commit

    def slow(self, *a, **kw):
        time.sleep(seconds)
        return real(self, *a, **kw)
    monkeypatch.setattr(T.Transaction, "commit", slow)


def test_a_cancelled_memory_write_is_settled_when_the_caller_hears_of_it(tmp_path, monkeypatch):
    """A cancelled ``aput``/``abatch`` raised CancelledError at once while its worker
    thread went on and committed the write later: the caller was told "cancelled", the
    store said "written"."""
    st = walstore.open(str(tmp_path / "s"))
    memory = WalstoreStore(st)
    _slow_commits(monkeypatch, st)

    async def main():
        for i in range(3):
            task = asyncio.ensure_future(memory.aput(("n",), f"k{i}", {"v": i}))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            seen_at_cancel = memory.get(("n",), f"k{i}") is not None
            await asyncio.sleep(0.1)
            assert (memory.get(("n",), f"k{i}") is not None) == seen_at_cancel
    asyncio.run(main())
    st.close()


def test_a_cancelled_checkpoint_write_is_settled_when_the_caller_hears_of_it(tmp_path,
                                                                             monkeypatch):
    from langgraph.checkpoint.base import empty_checkpoint
    st = walstore.open(str(tmp_path / "s"))
    saver = WalstoreSaver(st)
    _slow_commits(monkeypatch, st)

    async def main():
        config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        for i in range(3):
            cp = empty_checkpoint()
            task = asyncio.ensure_future(saver.aput(config, cp, {"step": i}, {}))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_cancel = [c.checkpoint["id"] for c in saver.list(config)]
            await asyncio.sleep(0.1)
            assert [c.checkpoint["id"] for c in saver.list(config)] == at_cancel
    asyncio.run(main())
    st.close()


class _Profile(dict):
    pass


class _Tags(list):
    pass


class _UserId(str):
    pass


class _Cents(int):
    pass


@pytest.mark.parametrize("value", [_Profile(a=1), _Tags([1]), _UserId("u1"), _Cents(5),
                                   ValueError("boom"), {"nested": [{"deep": _Profile()}]}],
                         ids=["dict-sub", "list-sub", "str-sub", "int-sub", "exception",
                              "nested"])
def test_a_value_the_encoding_would_flatten_is_refused_at_put(tmp_path, value):
    """LangGraph's encoding writes a dict/list/str/int subclass as the plain type and an
    exception as its repr string, with no class name for the audit to see: the saver gave
    them back as another type, silently (the contract: refused loudly at put)."""
    from typing import Any, TypedDict

    from langgraph.graph import END, START, StateGraph

    from walstore.integrations.langgraph.serde import StateTypeError

    S = TypedDict("S", {"v": Any})  # (functional form: its annotation is an object)
    st = walstore.open(str(tmp_path / "s"), durability="none")
    g = StateGraph(S)
    g.add_node("n", lambda s: {})
    g.add_edge(START, "n")
    g.add_edge("n", END)
    graph = g.compile(checkpointer=WalstoreSaver(st))
    with pytest.raises(StateTypeError, match="would not come back as that type"):
        graph.invoke({"v": value}, {"configurable": {"thread_id": "t"}})
    st.close()


class Color(str, __import__("enum").Enum):
    RED = "red"


Point = __import__("collections").namedtuple("Point", "x y")


def test_plain_values_enums_and_named_tuples_still_round_trip(tmp_path):
    from walstore.integrations.langgraph.serde import StateSerializer

    serde = StateSerializer(allowed_types=[Color, Point])
    cyclic: list = [1]
    cyclic.append({"again": [2]})
    for value in ({"a": [1, 2.5, True, None, b"x", "s"]}, Color.RED, Point(1, 2),
                  frozenset({1}), cyclic):
        back = serde.loads_typed(serde.dumps_typed(value))
        assert back == value and type(back) is type(value), (value, back)


_TTLState = __import__("typing").TypedDict("_TTLState", {"n": int})


def _one_node_graph(node, saver, memory):
    """A graph of one node over ``_TTLState``, checkpointed by ``saver``, with ``memory``."""
    from langgraph.graph import END, START, StateGraph
    g = StateGraph(_TTLState)
    g.add_node("a", node)
    g.add_edge(START, "a")
    g.add_edge("a", END)
    return g.compile(checkpointer=saver, store=memory)


@pytest.mark.parametrize("upkeep", ["refresh", "sweep"])
def test_ttl_upkeep_does_not_block_the_rewind_of_the_items_writer(tmp_path, upkeep):
    """A memory read with refresh_on_read by thread A (or the TTL sweeper) rewrote thread
    B's item in a transaction of A's scope (or none): B's rewind then raised
    RevertConflict naming A's transaction, and B's memory stayed."""
    from langgraph.config import get_config, get_store

    st = walstore.open(str(tmp_path / "s"), durability="none")
    ttl = {"default_ttl": 60, "refresh_on_read": True}
    memory = WalstoreStore(st, ttl=ttl)
    saver = WalstoreSaver(st)

    def node(s):
        if get_config()["configurable"]["thread_id"] == "B":
            short = {"ttl": 0.0001} if upkeep == "sweep" and s["n"] == 1 else {}
            get_store().put(("notes",), f"b{s['n'] + 1}", {"text": "from B"}, **short)
        else:
            get_store().search(("notes",))  # A only reads (a TTL refresh: a write)
        return {"n": s["n"] + 1}
    graph = _one_node_graph(node, saver, memory)
    a, b = ({"configurable": {"thread_id": t}} for t in "AB")
    graph.invoke({"n": 0}, b, durability="sync")
    first_b = saver.get_tuple(b).config
    graph.invoke({}, b, durability="sync")  # B writes b2
    if upkeep == "sweep":
        import time
        time.sleep(0.05)
        assert memory.sweep_ttl() == 1  # b2 expired and swept
    graph.invoke({"n": 0}, a, durability="sync")
    saver.rewind(first_b)
    assert sorted(i.key for i in memory.search(("notes",), refresh_ttl=False)) == ["b1"]
    assert graph.get_state(b).values == {"n": 1}
    st.close()


def test_a_refresh_in_a_batch_that_puts_does_not_block_the_rewind_of_the_items_writer(tmp_path):
    """Thread B read thread A's item with refresh_ttl in a batch that also put B's own
    note: the refresh was made in the batch's transaction, of B's scope, and A's rewind
    raised RevertConflict naming it (a read alone refreshed in A's scope)."""
    import time

    from langgraph.config import get_config, get_store
    from langgraph.store.base import GetOp, PutOp

    st = walstore.open(str(tmp_path / "s"), durability="none")
    memory = WalstoreStore(st, ttl={"refresh_on_read": True})
    saver = WalstoreSaver(st)
    fact = memory.keys.item(("facts",), "a-fact")

    def node(s):
        if get_config()["configurable"]["thread_id"] == "A":
            if s["n"] == 1:  # A's second step writes the item
                get_store().put(("facts",), "a-fact", {"by": "A"}, ttl=60)
        else:
            get_store().batch([GetOp(("facts",), "a-fact", refresh_ttl=True),
                               PutOp(("notes",), "b-note", {"seen": True})])
        return {"n": s["n"] + 1}
    graph = _one_node_graph(node, saver, memory)
    a, b = ({"configurable": {"thread_id": t}} for t in "AB")
    graph.invoke({"n": 0}, a, durability="sync")
    first_a = saver.get_tuple(a).config
    graph.invoke({}, a, durability="sync")
    written = st.get(fact)["e"]
    time.sleep(0.01)
    graph.invoke({"n": 0}, b, durability="sync")
    assert st.get(fact)["e"] > written           # B's read still renewed A's item
    saver.rewind(first_a)
    assert memory.get(("facts",), "a-fact", refresh_ttl=False) is None
    assert memory.get(("notes",), "b-note").value == {"seen": True}
    st.close()


@pytest.mark.parametrize("upkeep", ["refresh", "sweep"])
def test_ttl_upkeep_of_an_app_wide_item_is_no_graph_threads_work(tmp_path, upkeep):
    """An item written outside any graph (its record names no writer scope), renewed by a
    node's read or swept by a node's sweep_ttl, was kept up in the scope provider's scope:
    the node's thread.  Its rewind then moved the item's expiry back (or brought the
    swept item back), and once the app updated the item it raised RevertConflict."""
    import time

    from langgraph.config import get_store

    st = walstore.open(str(tmp_path / "s"), durability="none")
    memory = WalstoreStore(st, ttl={"refresh_on_read": True})
    saver = WalstoreSaver(st)
    policy = memory.keys.item(("global",), "policy")

    def node(s):
        if s["n"] == 1:
            if upkeep == "refresh":
                get_store().get(("global",), "policy")
            else:
                get_store().sweep_ttl()
        return {"n": s["n"] + 1}
    graph = _one_node_graph(node, saver, memory)
    a = {"configurable": {"thread_id": "A"}}
    memory.put(("global",), "policy", {"v": 1}, ttl=60 if upkeep == "refresh" else 0.0001)
    graph.invoke({"n": 0}, a, durability="sync")
    first = saver.get_tuple(a).config
    written = st.get(policy)["e"]
    time.sleep(0.05)
    graph.invoke({}, a, durability="sync")              # the node reads / sweeps the policy
    if upkeep == "refresh":
        assert st.get(policy)["e"] > written           # renewed, in no thread's scope
    if upkeep == "sweep":
        assert st.get(policy) is None
        saver.rewind(first)
        assert st.get(policy) is None                  # A's rewind does not bring it back
    else:
        renewed = st.get(policy)
        saver.rewind(first)
        assert st.get(policy) == renewed               # A's rewind left its expiry alone
        graph.invoke({}, a, durability="sync")          # A reads (renews) it again
        memory.put(("global",), "policy", {"v": 2}, ttl=60)  # and the app updates it
        saver.rewind(first)                            # not refused
        assert memory.get(("global",), "policy", refresh_ttl=False).value == {"v": 2}
    st.close()
