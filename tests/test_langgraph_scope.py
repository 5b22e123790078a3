"""One thread = one scope: every key of a LangGraph thread under one prefix, so walstore
can rewind, revert and purge exactly one conversation.

Tests that need the core's scoped rewind, ``purge`` or scope providers (arriving with the
engine redesign) are skipped on a walstore without them; the layout itself, the scope
provider and the thread-local erasure are tested now.
"""
from __future__ import annotations

import importlib.util
import inspect
import operator
import os
from pathlib import Path
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langchain_core.messages import HumanMessage  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import Command  # noqa: E402
from test_langgraph_branching import _values, observe_history, observe_state, trip_graph  # noqa: E402,E501

import walstore  # noqa: E402
from walstore.integrations.langgraph import (WalstoreSaver,  # noqa: E402
                                             WalstoreStore)
from walstore.integrations.langgraph.saver import current_thread_scope  # noqa: E402


def scope_providers() -> bool:
    """Whether this walstore has scoped rewind and calls scope providers."""
    try:
        found = importlib.util.find_spec("walstore.agent.scope") is not None
    except (ImportError, ValueError):
        found = False
    return found and "scope" in inspect.signature(walstore.Store.rewind).parameters


def thread(tid: str) -> dict:
    return {"configurable": {"thread_id": tid}}


@pytest.fixture
def saver(tmp_path):
    s = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


def run_two_trips(graph) -> None:
    """Thread "a" and thread "b" through interrupts, interleaved; "r" with a run id."""
    graph.invoke({"messages": [HumanMessage("visit Paris and Rome", id="h1")]}, thread("a"))
    graph.invoke({"messages": [HumanMessage("Oslo please", id="h2")]}, thread("b"))
    graph.invoke(Command(resume="window"), thread("a"))
    graph.invoke(Command(resume="aisle"), thread("b"))
    graph.invoke(Command(resume="yes"), thread("a"))
    graph.invoke({"messages": [HumanMessage("Lisbon", id="h3")]},
                 {"configurable": {"thread_id": "r", "run_id": "run-1"}})


# ---- the layout ---------------------------------------------------------------------------
def test_every_key_of_a_thread_lies_under_its_prefix_and_suffices(saver, tmp_path):
    graph = trip_graph().compile(checkpointer=saver)
    run_two_trips(graph)
    prefixes = {t: saver.thread_scope(t) for t in ("a", "b", "r")}
    keys = [k for k, _v in saver.store.scan()]
    assert keys and all(sum(k.startswith(p) for p in prefixes.values()) == 1 for k in keys)
    kinds = {k[len(prefixes["a"]):len(prefixes["a"]) + 1] for k in keys
             if k.startswith(prefixes["a"])}
    assert kinds == {b"b", b"c", b"w", b"s"}  # blobs, checkpoints, pending writes, and
    # (since stop 79) the fresh-start mark its first run set (_undo_on_fresh_start)
    assert any(k.startswith(prefixes["r"] + b"r") for k in keys)  # the run index
    subgraph = [k for k in keys if k.startswith(prefixes["a"] + b"c")
                and not k.startswith(saver.keys.at("a", "").checkpoints())]
    assert subgraph  # the subgraph's checkpoints live in the thread's range too

    # a thread's prefix is all it needs: copied alone into another store, it reads the same
    before = observe_history(graph, thread("a")), observe_state(graph, thread("a"))
    other = WalstoreSaver.from_path(str(tmp_path / "copy"), durability="none")
    with other.store.transaction() as tx:
        for k, v in saver.store.scan(prefix=prefixes["a"]):
            tx.put(k, v)
    copied = trip_graph().compile(checkpointer=other)
    assert (observe_history(copied, thread("a")), observe_state(copied, thread("a"))) == before
    assert list(other.list(thread("b"))) == []
    other.close()


def test_rewinding_the_keys_of_one_prefix_rewinds_exactly_that_thread(saver):
    """``saver.rewind`` (``store.rewind(to, scope=prefix, keep=...)``): thread "a"
    returns to the checkpoint where its subgraph interrupted; "b" does not move.  (Once
    done by hand, key by key, from ``rewind_point``: that cannot keep the late pending
    writes of the checkpoint's ancestors that LangGraph saved after a checkpoint of the
    subgraph, which the rewind keeps — 1 run in 15 failed.)  Rewinding to a checkpoint undoes the steps after it, the interrupted task
    included: the thread is as it was when the checkpoint was saved, and resuming asks
    again."""
    graph = trip_graph().compile(checkpointer=saver)
    graph.invoke({"messages": [HumanMessage("visit Paris and Rome", id="h1")]}, thread("a"))
    then = observe_history(graph, thread("a"))
    target = graph.get_state(thread("a")).config
    graph.invoke({"messages": [HumanMessage("Oslo please", id="h2")]}, thread("b"))
    first_resume = graph.invoke(Command(resume="window"), thread("a"))
    graph.invoke(Command(resume="aisle"), thread("b"))
    graph.invoke(Command(resume="yes"), thread("a"))
    b_before = observe_state(graph, thread("b")), observe_history(graph, thread("b"))

    saver.rewind(target)
    now = observe_history(graph, thread("a"))
    assert [h[:5] for h in now] == [h[:5] for h in then]  # the same checkpoints
    assert now[1:] == then[1:] and now[0][5] == [("assistant", (), "None")]  # no interrupt
    assert (observe_state(graph, thread("b")), observe_history(graph, thread("b"))) == b_before
    asked = graph.invoke(None, thread("a"))  # the subgraph runs again and asks again
    assert [i.value for i in asked["__interrupt__"]] == [{"ask": "seat preference?"}]
    assert _values(graph.invoke(Command(resume="window"), thread("a"))) == _values(first_resume)


def test_delete_thread_removes_that_thread_only(saver):
    graph = trip_graph().compile(checkpointer=saver)
    run_two_trips(graph)
    b_before = observe_state(graph, thread("b")), observe_history(graph, thread("b"))
    saver.delete_thread("a")
    assert list(saver.store.scan(prefix=saver.thread_scope("a"))) == []
    assert saver.get_tuple(thread("a")) is None and list(saver.list(thread("a"))) == []
    assert (observe_state(graph, thread("b")), observe_history(graph, thread("b"))) == b_before
    assert saver.get_tuple(thread("r")) is not None


# ---- the scope of a transaction begun inside a node ----------------------------------------
class Empty(TypedDict, total=False):
    n: int


def scope_recording_graph(seen: list):
    def record(state: Empty) -> dict:
        scope = current_thread_scope()
        seen.append(scope.hex() if scope is not None else None)
        return {"n": 1}

    inner = StateGraph(Empty)
    inner.add_node("inner", record)
    inner.add_edge(START, "inner")
    inner.add_edge("inner", END)
    b = StateGraph(Empty)
    b.add_node("outer", record)
    b.add_node("sub", inner.compile())
    b.add_edge(START, "outer")
    b.add_edge("outer", "sub")
    b.add_edge("sub", END)
    return b


def test_the_scope_provider_names_the_thread_of_the_running_node(saver):
    seen: list = []
    graph = scope_recording_graph(seen).compile(checkpointer=saver)
    for tid in ("alpha", "beta" * 40):  # a long thread id is hashed in the prefix
        seen.clear()
        graph.invoke({"n": 0}, thread(tid))
        assert seen == [saver.thread_scope(tid).hex()] * 2  # the node and the subgraph's
    assert current_thread_scope() is None  # outside a run
    seen.clear()
    scope_recording_graph(seen).compile(checkpointer=InMemorySaver()).invoke({"n": 0},
                                                                             thread("x"))
    assert seen == [None, None]  # not a walstore thread


# ---- with the core's scopes (engine redesign) -------------------------------------------
class Trip(TypedDict):
    plan: list
    booked: Annotated[list, operator.add]


def booking_graph(store, memory):
    """Books each city of the plan: an action with a compensation, an agent key, a memory,
    all in transactions begun inside the node (no scope given: the provider's)."""
    def book(state: Trip) -> dict:
        city = state["plan"][0]
        with store.transaction() as tx:
            with tx.action("book", args={"city": city}, compensate="cancel") as act:
                act.result = {"city": city}
            tx.put(f"bookings/{city}", "booked")
        memory.put(("trips",), city, {"booked": True})
        return {"plan": state["plan"][1:], "booked": [city]}

    b = StateGraph(Trip)
    b.add_node("book", book)
    b.add_conditional_edges(START, lambda s: "book" if s["plan"] else END)
    b.add_conditional_edges("book", lambda s: "book" if s["plan"] else END)
    return b


def test_rewind_undoes_one_thread_its_memories_keys_and_actions_only(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="none")
    cancelled: list = []
    store.compensator("cancel")(lambda action: cancelled.append(action.args["city"]))
    saver, memory = WalstoreSaver(store), WalstoreStore(store)
    graph = booking_graph(store, memory).compile(checkpointer=saver, store=memory)
    graph.invoke({"plan": ["Paris", "Rome", "Oslo"], "booked": []}, thread("a"),
                 durability="sync")
    graph.invoke({"plan": ["Lima", "Quito"], "booked": []}, thread("b"), durability="sync")
    target = next(s for s in graph.get_state_history(thread("a"))
                  if s.values.get("booked") == ["Paris"])
    b_before = observe_history(graph, thread("b"))
    a_before = list(saver.list(thread("a")))

    plan = saver.rewind(target.config, dry_run=True)
    assert plan.as_dict()  # names what would change; nothing has
    assert cancelled == [] and len(list(saver.list(thread("a")))) == len(a_before)

    # The rewind point is the commit that saved the checkpoint, moved past pending writes
    # of its ancestors that LangGraph saved later (its saves can land out of order): the
    # bookings committed after that point are the ones undone (and compensated).
    to = saver.rewind_point(target.config)
    lsn_of = {i.keys[0].split("/")[1]: i.lsn for i in store.log()
              if len(i.keys) == 1 and isinstance(i.keys[0], str)
              and i.keys[0].startswith("bookings/")}
    undone = [c for c in ("Oslo", "Rome") if lsn_of[c] > to]
    kept = [c for c in ("Paris", "Rome", "Oslo") if c not in undone]
    # (the point never moves past a booking of the thread, whatever order LangGraph's
    # background saves landed in: it once did under load, and fewer bookings were undone)
    assert undone == ["Oslo", "Rome"]
    info = saver.rewind(target.config)
    assert cancelled == undone  # thread a's later actions, newest first
    assert sorted(store.keys(prefix="bookings/")) == sorted(
        [f"bookings/{c}" for c in kept + ["Lima", "Quito"]])
    assert sorted(i.key for i in memory.search(("trips",))) == sorted(kept + ["Lima", "Quito"])
    assert observe_history(graph, thread("b")) == b_before  # the other thread: untouched
    states = {a.args["city"]: a.state for a in store.actions()}
    assert states == {**{c: "committed" for c in kept + ["Lima", "Quito"]},
                      **{c: "compensated" for c in undone}}
    if undone == ["Oslo", "Rome"]:  # the usual order: exactly back at the checkpoint
        assert graph.get_state(thread("a")).values == {"plan": ["Rome", "Oslo"],
                                                       "booked": ["Paris"]}
        assert [t.checkpoint["id"] for t in saver.list(thread("a"))] == [
            t.checkpoint["id"] for t in a_before if t.checkpoint["id"] <=
            target.config["configurable"]["checkpoint_id"]]

    # reverting the rewind brings the thread back, but not the cancelled bookings: refused
    # unless forced, which marks them needs-redo
    with pytest.raises(walstore.RevertConflict):
        store.revert(info.txid)
    store.revert(info.txid, force=True)
    assert graph.get_state(thread("a")).values["booked"] == ["Paris", "Rome", "Oslo"]
    assert {a.args["city"]: a.state for a in store.actions()}["Oslo"] == "needs-redo"
    store.close()


def test_delete_thread_erases_every_version_and_every_byte(tmp_path):
    marker = "marker-5b1e-erase-me"

    class Note(TypedDict):
        note: str

    b = StateGraph(Note)
    b.add_node("n", lambda s: {"note": s["note"] + "!"})
    b.add_edge(START, "n")
    b.add_edge("n", END)
    path = tmp_path / "store"
    saver = WalstoreSaver.from_path(str(path), durability="full")
    graph = b.compile(checkpointer=saver)
    graph.invoke({"note": marker}, thread("secret"))
    graph.invoke({"note": "kept"}, thread("other"))
    first = list(graph.get_state_history(thread("secret")))[-1]
    key = saver.keys.at("secret", "").checkpoint(first.config["configurable"]["checkpoint_id"])
    lsn = saver.checkpoint_lsn(first.config)

    def files_with_marker() -> list:
        return [f for f in Path(path).rglob("*") if f.is_file()
                and marker.encode() in f.read_bytes()]

    assert files_with_marker()  # the plaintext is in the files before
    saver.delete_thread("secret")
    assert saver.store.history(key) == []
    assert list(saver.store.at(lsn).scan(prefix=saver.thread_scope("secret"))) == []
    saver.store.checkpoint()
    assert files_with_marker() == []
    assert graph.get_state(thread("other")).values == {"note": "kept!"}
    saver.close()
    assert os.path.isdir(path)
