"""Audit 53 of the integrations: WalstoreSaver, WalstoreStore and WalstoreSession against
LangGraph's InMemorySaver/SqliteSaver/InMemoryStore and the SDK's SQLiteSession on the same
calls.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import re
from typing import Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


# ---- WalstoreSaver: state types ----------------------------------------------------------
class _PatternState(TypedDict):
    pattern: Any
    n: int


def _one_node_graph(checkpointer, state_type, node, name: str = "step"):
    """START -> ``node`` (called ``name``) -> END over ``state_type``, compiled with
    ``checkpointer``."""
    builder = StateGraph(state_type)
    builder.add_node(name, node)
    builder.add_edge(START, name)
    builder.add_edge(name, END)
    return builder.compile(checkpointer=checkpointer)


def _pattern_graph(checkpointer):
    def step(state):
        return {"n": state["n"] + 1}
    builder = StateGraph(_PatternState)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_edge("step", END)
    return builder.compile(checkpointer=checkpointer)


def test_a_compiled_regex_in_the_state_comes_back_as_one(store):
    """A ``re.Pattern`` in the graph state was accepted at ``put`` (LangGraph encodes it
    as a call of ``re.compile``, which is in its safe set, so the write-time check let it
    through) and then refused at every read ("a stored value names re.compile, which is
    not a class in module 're'"): the thread's head could no longer be loaded, the next
    ``invoke`` of the thread failed.  InMemorySaver and SqliteSaver give the pattern
    back.  The safe set's one entry that is a function is now called as LangGraph does."""
    config = {"configurable": {"thread_id": "t"}}
    pattern = re.compile(r"ab+c", re.IGNORECASE)
    for saver in (InMemorySaver(), WalstoreSaver(store)):
        graph = _pattern_graph(saver)
        graph.invoke({"pattern": pattern, "n": 0}, config)
        state = graph.get_state(config).values
        assert type(state["pattern"]) is re.Pattern
        assert (state["pattern"].pattern, state["pattern"].flags) == (pattern.pattern,
                                                                      pattern.flags)
        again = graph.invoke({"n": 10}, config)   # a new turn loads the thread's head
        assert again["n"] == 11 and again["pattern"] == pattern


def _round_trip(saver, value, thread_id="t"):
    from langgraph.checkpoint.base import empty_checkpoint
    checkpoint = empty_checkpoint()
    version = saver.get_next_version(None)
    checkpoint["channel_values"] = {"x": value}
    checkpoint["channel_versions"] = {"x": version}
    config = saver.put({"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
                       checkpoint, {}, {"x": version})
    return saver.get_tuple(config).checkpoint["channel_values"]["x"]


def test_a_datetime_in_a_named_time_zone_comes_back_in_that_zone(store):
    """A datetime whose tzinfo is a ``zoneinfo.ZoneInfo`` came back with a fixed-offset
    ``datetime.timezone`` (LangGraph's encoding writes a datetime as its ISO text): the
    same instant, but no longer in the zone, so ``tzinfo.key`` raised AttributeError and
    date arithmetic across a daylight-saving change gave the wrong wall-clock time (seen:
    2026-01-15 09:00 Europe/Oslo + 180 days came back at 09:00+01:00, where the zone
    says 10:00+02:00) — a value changed silently where the contract says it comes back
    as itself.  A datetime in a zone that is not a fixed offset is now stored by its
    fields and its ZoneInfo (as LangGraph stores a ``time``), and comes back in it."""
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo
    saver = WalstoreSaver(store)
    oslo = ZoneInfo("Europe/Oslo")
    when = datetime(2026, 1, 15, 9, 0, tzinfo=oslo)
    ambiguous = datetime(2026, 10, 25, 2, 30, tzinfo=oslo, fold=1)   # the second 02:30
    for i, value in enumerate([when, ambiguous, {"at": [when]}]):
        got = _round_trip(saver, value, f"t{i}")
        assert got == value
    got = _round_trip(saver, when, "a")
    assert type(got.tzinfo) is ZoneInfo and got.tzinfo.key == "Europe/Oslo"
    assert (got + timedelta(days=180)).utcoffset() == timedelta(hours=2)
    late = _round_trip(saver, ambiguous, "b")
    assert late.fold == 1 and late.utcoffset() == timedelta(hours=1)
    # a fixed offset and a naive datetime are stored as before (LangGraph's ISO text)
    for value in (datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5))),
                  datetime(2026, 1, 1, 12, 30)):
        got = _round_trip(saver, value, "c")
        assert got == value and got.tzinfo == value.tzinfo
    # so is one in another library's tzinfo (dateutil's, pytz's): its offset, as before
    # (LangGraph cannot store such a tzinfo by name; refusing it broke what worked)
    other = datetime(2026, 1, 1, 12, tzinfo=_OtherTz())
    got = _round_trip(saver, other, "d")
    assert got == other and got.utcoffset() == timedelta(hours=1)


class _OtherTz(__import__("datetime").tzinfo):
    def utcoffset(self, dt):
        return __import__("datetime").timedelta(hours=1)

    def dst(self, dt):
        return __import__("datetime").timedelta(0)

    def tzname(self, dt):
        return "OTHER"


class _Login(__import__("pydantic").BaseModel):
    password: __import__("pydantic").SecretStr
    tries: int = 0


def test_a_model_holding_a_refused_class_names_that_class_and_the_recipe(store):
    """A pydantic model with a field of a class the saver does not rebuild unlisted (a
    ``SecretStr``: library code) was refused at ``put`` as "rebuilding it raised
    ValueError: ext_hook failed", naming only the model and advising plain data: the
    class at fault and the ``allowed_types`` recipe (which makes it work) were lost
    inside msgpack's hook, where the contract says the refusal names the type and the
    recipe.  The refusal now carries the inner one's words."""
    from pydantic import SecretStr
    from walstore.integrations.langgraph.serde import StateTypeError
    with pytest.raises(StateTypeError) as refused:
        _round_trip(WalstoreSaver(store), _Login(password="pw"))
    message = str(refused.value)
    assert "_Login" in message and "SecretStr" in message and "allowed_types" in message
    assert "ext_hook" not in message
    listed = WalstoreSaver(store, allowed_types=[SecretStr])
    got = _round_trip(listed, _Login(password="pw", tries=2), "listed")
    assert type(got) is _Login and got.password.get_secret_value() == "pw" and got.tries == 2


# ---- WalstoreSaver: a delete_thread that failed --------------------------------------------
class _Count(TypedDict):
    n: int


def test_a_delete_thread_that_failed_does_not_cut_off_the_threads_runs(tmp_path):
    """``delete_thread`` marked the thread as removed (its runs in flight cut off, the
    pending writes of checkpoints not saved yet taken for removed) before its purge, and
    left the marks when the purge failed without committing.  Seen with the WAL's disk
    full (FaultBackend, ENOSPC): the purge raised, the thread was all there, and the run
    working in it meanwhile was refused at its next checkpoint — "was rewound or
    deleted while this run worked: its step ... was undone" — though nothing was
    deleted or undone (what its step did stood, its checkpoint was lost).  The marks
    now go back as they were when the purge did not commit, as ``rewind`` does."""
    import errno
    import os
    import sys
    import threading
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools.faults import FaultBackend, installed

    store = walstore.open(str(tmp_path / "s"))
    saver = WalstoreSaver(store)
    inside, go = threading.Event(), threading.Event()

    def step(state):
        if state["n"] == 1:
            inside.set()
            go.wait(60)
        return {"n": state["n"] + 1}
    graph = _one_node_graph(saver, _Count, step)
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke({"n": 0}, config, durability="sync")
    outcome: list = []

    def run():
        try:
            outcome.append(graph.invoke({"n": 1}, config, durability="sync"))
        except Exception as e:  # noqa: BLE001 - what the run saw
            outcome.append(e)
    th = threading.Thread(target=run)
    th.start()
    try:
        assert inside.wait(60)
        # the run's checkpoint of its input is saved by LangGraph's background executor,
        # which may still be writing when the node starts: armed before it landed, the
        # process-wide ENOSPC below failed that write, not only the purge (seen once in a
        # full run under load) -- wait until it is saved
        for _ in range(600):
            if graph.get_state(config).next == ("step",):
                break
            threading.Event().wait(0.05)
        fb = FaultBackend()
        with installed(fb):
            rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal", times=None)
            with pytest.raises(walstore.WalstoreError) as failed:
                saver.delete_thread("t")
        assert rule.fired >= 1 and not isinstance(failed.value, walstore.ErasureOwed)
    finally:
        go.set()
        th.join(60)
    assert outcome == [{"n": 2}], outcome
    assert graph.get_state(config).values == {"n": 2}
    # a delete that commits still cuts off a run that loaded the thread before it
    inside.clear()
    go.clear()
    outcome.clear()
    th = threading.Thread(target=run)
    th.start()
    try:
        assert inside.wait(60)
        saver.delete_thread("t")
    finally:
        go.set()
        th.join(60)
    assert [type(e).__name__ for e in outcome] == ["StaleCheckpointError"]
    assert graph.get_state(config).values == {}
    store.close()


# ---- WalstoreStore: a value walstore cannot store -------------------------------------------
def test_a_memory_item_walstore_cannot_store_is_refused_naming_the_item(store):
    """An item over walstore's 16 MiB value limit (or holding an int beyond 64 bits, or a
    set) was refused naming the store's internal key (``value for key
    b'lg\\x01\\x02a\\x00\\x01big' is 17825825 bytes packed``), not the item the caller put:
    in a batch of many puts, which one was too big could not be told.  InMemoryStore
    takes all three.  The error now names the item ``namespace/key``; nothing of the
    batch is written, as before."""
    from langgraph.store.base import PutOp
    from walstore.integrations.langgraph import WalstoreStore
    memory = WalstoreStore(store)
    cases = [(ValueError, {"v": "x" * (17 << 20)}, "16777216"),
             (ValueError, {"v": 2 ** 70}, "out of range"),
             (TypeError, {"v": {1, 2}}, "set")]
    for error, value, why in cases:
        with pytest.raises(error) as refused:
            memory.batch([PutOp(("a",), "small", {"v": 1}), PutOp(("a", "b"), "big", value)])
        message = str(refused.value)
        assert "('a', 'b')/'big'" in message and why in message, message
        assert "lg\\x01" not in message, message
        assert memory.get(("a",), "small") is None   # (nothing of the batch)


# ---- WalstoreSaver: lookups by id and namespace, as the reference savers answer them ------
def test_a_checkpoint_id_of_another_type_matches_nothing_and_list_honours_the_namespace(store):
    """``get_tuple`` with an int ``checkpoint_id`` raised AttributeError ('int' object has
    no attribute 'encode'; SqliteSaver and InMemorySaver return None), and ``list`` of a
    config naming a namespace but no thread gave every namespace's checkpoints."""
    import uuid

    from langgraph.checkpoint.base import empty_checkpoint
    saver = WalstoreSaver(store)
    ids = {}
    for t in ("t1", "t2"):
        for ns in ("", "sub"):
            c = empty_checkpoint()
            c["id"] = str(uuid.uuid4())
            ids[(t, ns)] = c["id"]
            saver.put({"configurable": {"thread_id": t, "checkpoint_ns": ns}}, c,
                      {"source": "input", "step": 1}, {})
    conf = {"configurable": {"thread_id": "t1", "checkpoint_ns": "", "checkpoint_id": 5}}
    assert saver.get_tuple(conf) is None
    assert InMemorySaver().get_tuple(conf) is None  # (the reference's answer)
    assert list(saver.list(conf)) == []
    list(saver.list({"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}, before=conf))
    got = sorted((c.config["configurable"]["thread_id"],
                  c.config["configurable"]["checkpoint_ns"])
                 for c in saver.list({"configurable": {"checkpoint_ns": "sub"}}))
    assert got == [("t1", "sub"), ("t2", "sub")]
    assert len(list(saver.list(None))) == 4
    one = saver.get_tuple({"configurable": {"thread_id": "t2", "checkpoint_ns": "sub",
                                            "checkpoint_id": ids[("t2", "sub")]}})
    assert one is not None and one.checkpoint["id"] == ids[("t2", "sub")]


def test_rewind_from_a_node_of_its_own_run_is_refused_plainly(store):
    """The same for ``saver.rewind`` of the node's own thread (h3, stop 74): a
    StaleCheckpointError saying to reload the thread and retry (the rewind, a transaction
    of the node, is fenced against the undo it makes); now a ValueError, nothing rewound.
    Another thread's rewind from a node works."""
    saver = WalstoreSaver(store)

    class S(TypedDict):
        n: int
        victim: str

    def rewind(state):
        victim = {"configurable": {"thread_id": state["victim"]}}
        first = list(saver.list(victim))[-1].config
        saver.rewind(first)
        return {"n": state["n"] + 1}

    graph = _one_node_graph(saver, S, rewind, "rewind")
    plain = _one_node_graph(saver, S, lambda state: {"n": state["n"] + 1})
    other = {"configurable": {"thread_id": "other"}}
    plain.invoke({"n": 0, "victim": ""}, other)
    before = len(list(saver.list(other)))
    t1 = {"configurable": {"thread_id": "t1"}}
    plain.invoke({"n": 0, "victim": ""}, t1)
    kept = len(list(saver.list(t1)))
    with pytest.raises(ValueError, match="own run") as err:
        graph.invoke({"n": 0, "victim": "t1"}, t1)
    assert not isinstance(err.value, walstore.WalstoreError)
    assert len(list(saver.list(t1))) >= kept  # (nothing of the thread undone)
    out = graph.invoke({"n": 5, "victim": "other"}, {"configurable": {"thread_id": "t2"}})
    assert out["n"] == 6 and len(list(saver.list(other))) == 1 < before  # (rewound)


def test_delete_thread_from_a_node_of_its_own_run_is_refused_plainly(store):
    """A node deleting its own thread failed with a StaleCheckpointError that said the
    run's checkpoint was gone and to reload the thread and retry (the purge, a transaction
    of the node, is fenced against the deletion it makes); now a ValueError saying what
    happened and what to do, nothing deleted.  Another thread's delete from a node works."""
    saver = WalstoreSaver(store)

    class S(TypedDict):
        n: int
        victim: str

    def forget(state):
        saver.delete_thread(state["victim"])
        return {"n": state["n"] + 1}

    graph = _one_node_graph(saver, S, forget, "forget")
    other = {"configurable": {"thread_id": "other"}}
    graph.invoke({"n": 0, "victim": "nobody"}, other)
    assert saver.get_tuple(other) is not None
    with pytest.raises(ValueError, match="own run") as err:
        graph.invoke({"n": 0, "victim": "t1"}, {"configurable": {"thread_id": "t1"}})
    assert not isinstance(err.value, walstore.WalstoreError)
    assert saver.get_tuple({"configurable": {"thread_id": "t1"}}) is not None  # not deleted
    out = graph.invoke({"n": 5, "victim": "other"}, {"configurable": {"thread_id": "t2"}})
    assert out["n"] == 6 and saver.get_tuple(other) is None  # (another thread's: deleted)
