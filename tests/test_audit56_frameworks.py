"""Audit 56 of the framework integrations as their users drive them: LangGraph's
``WalstoreSaver``/``WalstoreStore`` in real graphs, the OpenAI Agents ``WalstoreSession``,
the ``transaction`` package join, and the examples.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.

Findings:

1. ``WalstoreStore.start_ttl_sweeper`` ended its thread at the first sweep that raised
   (a ConflictError after its retries, e.g. an expired item held by an in-doubt prepared
   transaction; a full disk): expired items were never swept again, with no word (the
   error sat in a Future nobody reads), where SqliteStore's sweeper logs the failed
   iteration and sweeps again at the next interval.  Cancelling the returned Future did
   not stop it either.  Now a failed sweep is reported (RuntimeWarning naming the error)
   and the next interval sweeps again; a closed store, ``stop_ttl_sweeper()`` or the
   Future's ``cancel()`` end the thread.
   (``test_the_ttl_sweeper_sweeps_again_after_a_sweep_that_failed``,
   ``test_cancelling_the_sweepers_future_stops_it_as_sqlite_stores_does``,
   ``test_closing_the_store_ends_the_sweeper_quietly``,
   ``test_a_sweeper_stopped_and_started_at_once_sweeps``)
2. A graph node with an ``error_handler`` (LangGraph's ``add_node(..., error_handler=)``)
   failed the whole run with StateTypeError under ``WalstoreSaver`` (durability "sync" and
   "async"): LangGraph saves the failed task's exception as an ``__error__`` pending write
   before it runs the handler, and the saver refused the exception as a state value that
   would not come back as its type.  Without a handler the same refusal dropped the
   failed task's error write, so ``get_state().tasks[i].error`` was None where SqliteSaver
   shows it.  The ``__error__`` write is now stored as LangGraph's encoding stores it (the
   exception's repr, which SqliteSaver gives back); state values are still refused.
   (``test_a_node_error_handler_runs_under_the_saver_as_under_sqlite_saver``,
   ``test_a_failed_tasks_error_is_kept_as_sqlite_saver_keeps_it``)
"""
from __future__ import annotations

import operator
import time
import warnings
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph")

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreStore  # noqa: E402

# (``store``: conftest's, a durability="none" store in the test's directory)


def _wait(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_the_ttl_sweeper_sweeps_again_after_a_sweep_that_failed(store):
    """An expired memory item held by a prepared (in-doubt) transaction cannot be swept
    (the sweep's commit conflicts with the hold until its 64 retries run out).  The
    sweeper thread died of that ConflictError: once the transaction was resolved, the
    expired item stayed on disk for good.  Now the sweeper warns and sweeps again."""
    memory = WalstoreStore(store, ttl={"default_ttl": 0.0005})  # 30 ms
    memory.put(("users", "u1"), "old", {"v": 1})
    (raw,) = [k for k, _v in store.scan(prefix=b"lg\x01")]
    holder = store.transaction()
    holder.put(raw, {"held": True})
    holder.prepare("hold-the-item")
    time.sleep(0.05)  # (expired now)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        done = memory.start_ttl_sweeper(sweep_interval_minutes=0.002)  # every 0.12 s
        try:
            assert _wait(lambda: any("sweep" in str(w.message) for w in seen), 30), \
                "the failed sweep was not reported"
            assert not done.done(), f"the sweeper stopped: {done.exception()!r}"
            store.rollback_prepared("hold-the-item")
            assert _wait(lambda: store.get(raw) is None), "the expired item was never swept"
            assert memory.get(("users", "u1"), "old") is None
            assert not done.done()
        finally:
            assert memory.stop_ttl_sweeper(timeout=10)
    assert done.done() and done.exception() is None
    msg = next(str(w.message) for w in seen if "sweep" in str(w.message))
    assert "ConflictError" in msg or "conflict" in msg.lower(), msg


def test_cancelling_the_sweepers_future_stops_it_as_sqlite_stores_does(store):
    """SqliteStore's ``start_ttl_sweeper()`` returns a Future whose ``cancel()`` stops
    the sweeper thread; ours kept sweeping after it (and a second start, while one runs,
    gave a Future already done, which cannot be cancelled)."""
    memory = WalstoreStore(store, ttl={"default_ttl": 10})
    done = memory.start_ttl_sweeper(sweep_interval_minutes=0.001)
    again = memory.start_ttl_sweeper(sweep_interval_minutes=0.001)
    thread = memory._sweeper
    assert thread is not None and thread.is_alive()
    assert again.cancel(), "the second start's Future cannot stop the sweeper"
    assert _wait(lambda: not thread.is_alive(), 10), "cancel() did not stop the sweeper"
    assert done.done()
    # a new start after that sweeps again, and its own Future stops it
    done2 = memory.start_ttl_sweeper(sweep_interval_minutes=0.001)
    t2 = memory._sweeper
    assert t2 is not thread and t2.is_alive()
    assert done2.cancel()
    assert _wait(lambda: not t2.is_alive(), 10)


def test_closing_the_store_ends_the_sweeper_quietly(tmp_path):
    """(A guard for the retry above: a closed store is not a failed sweep to retry for
    ever; the sweeper ends, its Future done without error.)"""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    memory = WalstoreStore(s, ttl={"default_ttl": 10})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        done = memory.start_ttl_sweeper(sweep_interval_minutes=0.001)
        thread = memory._sweeper
        s.close()
        assert _wait(lambda: not thread.is_alive(), 10)
    assert done.done() and done.exception() is None
    assert not [w for w in seen if "sweep" in str(w.message)]


class _Log(TypedDict):
    log: Annotated[list, operator.add]


def _error_handler_graph(checkpointer):
    from langgraph.graph import END, START, StateGraph
    S = _Log

    def bad(s):
        raise ValueError("boom")

    def handler(s):
        return {"log": ["handled"]}

    g = StateGraph(S)
    g.add_node("bad", bad, error_handler=handler)
    g.add_edge(START, "bad")
    g.add_edge("bad", END)
    return g.compile(checkpointer=checkpointer)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_node_error_handler_runs_under_the_saver_as_under_sqlite_saver(store, tmp_path,
                                                                        durability):
    """LangGraph saves a failed task's error as a pending write (``__error__``, the
    exception object) before it runs the node's ``error_handler``.  The saver refused
    the exception as a state value that would not come back as its type
    (StateTypeError): the run failed with that error instead of running the handler
    (SqliteSaver: ``{'log': ['handled']}``), and without a handler the failed task's
    error write was dropped (``get_state().tasks[i].error`` None where SqliteSaver
    gives it).  It is now stored as LangGraph's own encoding stores it (its repr, as
    SqliteSaver gives it back)."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from walstore.integrations.langgraph import WalstoreSaver
    conn = sqlite3.connect(str(tmp_path / "ref.db"), check_same_thread=False)
    try:
        c = {"configurable": {"thread_id": "t"}}
        ref = _error_handler_graph(SqliteSaver(conn)).invoke({"log": []}, c,
                                                             durability=durability)
        ours = _error_handler_graph(WalstoreSaver(store)).invoke({"log": []}, c,
                                                                 durability=durability)
        assert ours == ref == {"log": ["handled"]}
    finally:
        conn.close()


def test_a_failed_tasks_error_is_kept_as_sqlite_saver_keeps_it(store, tmp_path):
    """Without a handler: the failed task's error shows in ``get_state().tasks``, and the
    pending write reads back as SqliteSaver's does (the exception's repr)."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph
    from walstore.integrations.langgraph import WalstoreSaver
    S = _Log

    def ok(s):
        return {"log": ["ok"]}

    def bad(s):
        raise ValueError("boom")

    def build(cp):
        g = StateGraph(S)
        g.add_node("ok", ok)
        g.add_node("bad", bad)
        g.add_edge(START, "ok")
        g.add_edge(START, "bad")
        g.add_edge("ok", END)
        g.add_edge("bad", END)
        return g.compile(checkpointer=cp)

    def errors(cp):
        g, c = build(cp), {"configurable": {"thread_id": "t"}}
        with pytest.raises(ValueError, match="boom"):
            g.invoke({"log": []}, c, durability="sync")
        st = g.get_state(c)
        return (sorted((t.name, t.error is not None) for t in st.tasks),
                sorted((ch, v) for _t, ch, v in cp.get_tuple(c).pending_writes
                       if ch == "__error__"))
    conn = sqlite3.connect(str(tmp_path / "ref.db"), check_same_thread=False)
    try:
        ref = errors(SqliteSaver(conn))
    finally:
        conn.close()
    ours = errors(WalstoreSaver(store))
    assert ours == ref
    assert ref[1] == [("__error__", "ValueError('boom')")]


def test_a_sweeper_stopped_and_started_at_once_sweeps(store):
    """(A guard for the Future above: ``cancel()`` then an immediate start gives a
    running sweeper, and one only.)"""
    memory = WalstoreStore(store, ttl={"default_ttl": 0.0005})
    for _ in range(20):
        assert memory.start_ttl_sweeper(sweep_interval_minutes=0.001).cancel()
    done = memory.start_ttl_sweeper(sweep_interval_minutes=0.001)
    memory.put(("n",), "k", {"v": 1})
    assert _wait(lambda: memory.get(("n",), "k", refresh_ttl=False) is None), "not swept"
    assert not done.done()
    assert memory.stop_ttl_sweeper(timeout=10) and done.done()
    import threading
    assert _wait(lambda: not [t for t in threading.enumerate()
                              if t.name == "walstore-ttl-sweeper" and t.is_alive()], 10)
