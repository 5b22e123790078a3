"""A node run again by LangGraph's ``RetryPolicy`` after an attempt that raised: LangGraph
drops the failed attempt's writes and runs the node from its start, so what that attempt
committed through walstore (a booking in an action with a compensator) was recorded
nowhere -- and the retry booked again: two live bookings in the world, one in the graph's
state (stop 80, found by the lead trying the retry policy on the resume-after-kill
graphs).  Now the first walstore transaction of a later attempt of the same task (the
same run and step: ``execution_info.node_attempt`` of the run's Runtime) first reverts,
with their compensations, the transactions the earlier attempts committed
(``WalstoreSaver._undo_superseded``), before it reads: a node that books only when its key
says it has not books anew, never keeps a booking that is then refunded.  The world: an
fsynced ledger file.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import RetryPolicy  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "findings_scripts"))
from langgraph_resume_kill_child import append, book, cancel_into, ledger  # noqa: E402,I001

sys.path.insert(0, str(Path(__file__).parent))
from test_langgraph_new_input_discards import State, checked, live, recorded  # noqa: E402,I001

CONFIG = {"configurable": {"thread_id": "t"}}
LOGGER = "walstore.integrations.langgraph.saver"
RETRY = RetryPolicy(max_attempts=4, initial_interval=0.01, jitter=False,
                    retry_on=ConnectionError)



def one_node_graph(store, node, retry=RETRY):
    saver = WalstoreSaver(store)
    b = StateGraph(State)
    b.add_node("flaky", node, retry_policy=retry)
    b.add_edge(START, "flaky")
    b.add_edge("flaky", END)
    return b.compile(checkpointer=saver), saver


@pytest.mark.parametrize("fails", [1, 2])
def test_a_retried_attempt_that_booked_is_refunded(tmp_path, caplog, fails):
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}

    def flaky(state: State) -> dict:
        bid = book(store, path, "flaky")
        tries["n"] += 1
        if tries["n"] <= fails:
            raise ConnectionError("the answer was lost after the booking")
        return {"log": [bid]}
    try:
        graph, saver = one_node_graph(store, flaky)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            out = graph.invoke({"log": []}, CONFIG)
        assert tries["n"] == fails + 1
        assert len(ledger(path)[0]) == fails + 1
        assert live(path) == recorded(out), (ledger(path), out)   # (was: all of them)
        undos = [u for u in saver.resume_undos if u.superseded]
        assert sum(len(u.undone) for u in undos) == fails
        assert "attempt" in caplog.text
    finally:
        store.close()
    checked(store_path)


def test_an_idempotent_node_books_anew_and_keeps_no_refunded_booking(tmp_path):
    # the node books only when its key says it has not: the retry, after the undo of
    # the first attempt, finds no key and books again -- one live booking, recorded
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}

    def flaky(state: State) -> dict:
        with store.transaction() as tx:
            bid = tx.get("booked")
            if bid is None:
                bid = f"flaky-{uuid.uuid4().hex[:8]}"
                with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                    append(path, f"book {bid}")
                    act.result = {"ok": True}
                tx.put("booked", bid)
        tries["n"] += 1
        if tries["n"] == 1:
            raise ConnectionError("lost")
        return {"log": [bid]}
    try:
        graph, _saver = one_node_graph(store, flaky)
        out = graph.invoke({"log": []}, CONFIG)
        assert live(path) == recorded(out) and len(live(path)) == 1
        assert store.get("booked") == recorded(out)[0]
    finally:
        store.close()
    checked(store_path)


def test_walstore_work_in_a_worker_thread_of_an_async_node_is_undone_too(tmp_path):
    # an async node running its walstore work in asyncio.to_thread (the GUIDE's advice):
    # the transaction begins off the event loop, with the run's context, so the undo
    # runs there before the retry's booking
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}

    async def flaky(state: State) -> dict:
        bid = await asyncio.to_thread(book, store, path, "flaky")
        tries["n"] += 1
        if tries["n"] == 1:
            raise ConnectionError("lost")
        return {"log": [bid]}
    try:
        graph, _saver = one_node_graph(store, flaky)
        out = asyncio.run(graph.ainvoke({"log": []}, CONFIG))
        assert len(ledger(path)[0]) == 2
        assert live(path) == recorded(out)
    finally:
        store.close()
    checked(store_path)


def test_a_sibling_task_is_not_touched_and_an_attempt_that_never_committed_is_skipped(
        tmp_path):
    # two parallel tasks: "steady" books once; "flaky" raises INSIDE its transaction
    # first (rolled back: its action compensated by the rollback, nothing to undo), then
    # books and raises after the commit, then succeeds -- only that second attempt's
    # booking is refunded by the retry, steady's stays
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}

    def flaky(state: State) -> dict:
        tries["n"] += 1
        if tries["n"] == 1:
            with store.transaction() as tx:
                with tx.action("book", args={"id": "flaky-rolled"}, compensate="cancel"):
                    append(path, "book flaky-rolled")
                raise ConnectionError("inside the transaction")
        bid = book(store, path, "flaky")
        if tries["n"] == 2:
            raise ConnectionError("after the commit")
        return {"log": [bid]}
    saver = WalstoreSaver(store)
    b = StateGraph(State)
    b.add_node("flaky", flaky, retry_policy=RETRY)
    b.add_node("steady", lambda s: {"log": [book(store, path, "steady")]})
    b.add_edge(START, "flaky")
    b.add_edge(START, "steady")
    b.add_edge("flaky", END)
    b.add_edge("steady", END)
    try:
        out = b.compile(checkpointer=saver).invoke({"log": []}, CONFIG)
        assert sorted(x.split("-")[0] for x in recorded(out)) == ["flaky", "steady"]
        assert live(path) == recorded(out), (ledger(path), out)
        booked, cancelled = ledger(path)
        assert cancelled.count("flaky-rolled") == 1 and len(cancelled) == 2
    finally:
        store.close()
    checked(store_path)


def test_no_retry_policy_and_undo_on_resume_false_leave_everything(tmp_path):
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}

    def flaky(state: State) -> dict:
        bid = book(store, path, "flaky")
        tries["n"] += 1
        if tries["n"] == 1:
            raise ConnectionError("lost")
        return {"log": [bid]}
    try:
        saver = WalstoreSaver(store, undo_on_resume=False)
        b = StateGraph(State)
        b.add_node("flaky", flaky, retry_policy=RETRY)
        b.add_edge(START, "flaky")
        b.add_edge("flaky", END)
        b.compile(checkpointer=saver).invoke({"log": []}, CONFIG)
        assert len(live(path)) == 2 and not saver.resume_undos
    finally:
        store.close()


def test_the_attempt_map_is_bounded_by_tasks_and_transactions():
    from walstore.integrations.langgraph import saver as module
    m = module._AttemptTxns()
    for i in range(module._SAVED_TXNS_MAX + 5000):   # (one task making many)
        m.note(("p", "big", ()), i, 1)
    m.note(("p", "next", ()), -1, 1)
    assert m.txns <= module._SAVED_TXNS_MAX and list(m) == [("p", "next", ())]
    for i in range(module._STEP_TXNS_MAX + 10):      # (many tasks making one each)
        m.note(("p", f"t{i}", ()), i, 1)
    assert len(m) == module._STEP_TXNS_MAX and m.txns == len(m)
    key = ("p", f"t{module._STEP_TXNS_MAX + 9}", ())
    m.note(key, 10**9, 2)
    assert m.take(key, 2) == [module._STEP_TXNS_MAX + 9] and m.take(key, 3) == [10**9]
    assert m.txns == len(m) - 1
