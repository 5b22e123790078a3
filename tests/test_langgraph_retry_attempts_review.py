"""Review (stop 80, h2) of the undo of a retried node's earlier attempts
(``WalstoreSaver._undo_superseded``, tests/test_langgraph_retry_attempts.py): real graphs on
a real walstore store, an fsynced ledger as the world; the check: every booking the final
state records is live exactly once, nothing else is live, nothing is cancelled twice, and
``verify_store`` is clean.

Found: an attempt LangGraph gave up on while its walstore work still ran in a worker
thread -- an async node awaiting ``asyncio.to_thread`` under ``asyncio.wait_for`` (or a
``TimeoutPolicy``), the timeout retried by the node's ``RetryPolicy`` -- kept its booking:
a transaction still open when the retry's first transaction began was skipped by the undo
as "never committed" and forgotten, then committed; one the dropped attempt began after
the retry's first was never looked at.  Two live bookings, the state recording one.  Now a
node transaction of an attempt older than the task's newest is refused at its begin and
at its commit (``_refuse_superseded``: ConflictError, its actions compensated).

Found too: only the retry's first transaction made (or waited for) the undo.  A ToolNode
retried, its tools running in parallel threads, each booking only when its key says it
has not: the tools begun while the first one's undo ran (a slow cancel API) read the
earlier attempt's keys, kept those bookings, and the undo then cancelled them -- the
state recording cancelled bookings.  Now every transaction of a later attempt waits for
the task's undo (``_TaskAttempts.undoing``).

And: ``_AttemptTxns``' bound kept the newest task whole, so one node making more
than ``_SAVED_TXNS_MAX`` transactions grew the map without end; now its oldest are
forgotten.  The bookkeeping costs about 4 us per node transaction (a commit is hundreds).

Not covered, now said in the GUIDE (xfail here): an ``@entrypoint`` retried whole calls its
``@task``s again as new tasks, and what the earlier calls committed stands (the callee's
config does not carry its caller's attempt).  Tried and found right (scripts, not kept):
a ToolNode whose tools book in parallel and one raises, a ``@task`` with its own retry
policy, sibling nodes each retried, ``ainvoke`` of sync nodes, several transactions per
attempt, a sibling's later write of the same key (the revert refused, named in ``left``),
``max_attempts`` exhausted then a rewind and a resume, a rewind after the retry, and a
SIGKILL inside the retry's compensator or after the retry's booking (durability "sync",
"async", "exit": after reopen and resume, every booking accounted for once; kept here for
the default durability).
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.types import RetryPolicy  # noqa: E402

from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

import walstore  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "findings_scripts"))
from test_langgraph_retry_attempts import (  # noqa: E402,I001
    CONFIG, RETRY, checked, live, one_node_graph, recorded)
from langgraph_resume_kill_child import append, cancel_into, ledger  # noqa: E402,I001

TIMEOUT_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=False,
                            retry_on=TimeoutError)


def slow_book(store, path: str, *, before: float = 0.0, inside: float = 0.0) -> str:
    time.sleep(before)
    bid = f"flaky-{uuid.uuid4().hex[:8]}"
    with store.transaction() as tx:
        with tx.action("book", args={"id": bid}, compensate="cancel") as act:
            append(path, f"book {bid}")
            act.result = {"ok": True}
        time.sleep(inside)
    return bid


@pytest.mark.parametrize("where", ["open at the retry", "begun after the retry's"])
def test_a_timed_out_attempt_still_running_in_a_worker_thread_keeps_no_booking(
        tmp_path, where):
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}
    zombie: list = []

    def first_attempt() -> str:
        try:
            if where == "open at the retry":
                return slow_book(store, path, inside=0.6)
            return slow_book(store, path, before=0.6)
        except BaseException as e:   # (nobody awaits it any more: kept for the check)
            zombie.append(e)
            raise

    async def flaky(state):
        tries["n"] += 1
        if tries["n"] == 1:
            await asyncio.wait_for(asyncio.to_thread(first_attempt), 0.2)
        bid = await asyncio.to_thread(slow_book, store, path)
        await asyncio.sleep(0.8)     # (the first attempt's thread ends meanwhile)
        return {"log": [bid]}
    try:
        graph, _saver = one_node_graph(store, flaky, TIMEOUT_RETRY)
        out = asyncio.run(graph.ainvoke({"log": []}, CONFIG))
        deadline = time.monotonic() + 5
        while not zombie and time.monotonic() < deadline:
            time.sleep(0.05)
        assert zombie and isinstance(zombie[0], walstore.errors.ConflictError), zombie
        assert live(path) == recorded(out), (ledger(path), out)   # (was: both live)
    finally:
        store.close()
    checked(store_path)


def test_one_task_making_many_transactions_keeps_a_bounded_attempt_map():
    # the bound kept the newest task whole: one node making more than _SAVED_TXNS_MAX
    # transactions grew its map without end (measured: 100,000 entries for 100,000)
    from walstore.integrations.langgraph import saver as module
    m = module._AttemptTxns()
    key = ("p", "big", ())
    for i in range(module._SAVED_TXNS_MAX + 1000):
        m.note(key, i, 1)
    assert len(m[key]) == m.txns == module._SAVED_TXNS_MAX
    assert m.take(key, 2)[-1] == 1000   # (the oldest 1000 forgotten, the newest kept)


@pytest.mark.xfail(strict=True, reason="not covered (GUIDE): a retried @entrypoint calls "
                   "its @tasks again as new tasks, and what the earlier calls committed "
                   "stands; the callee's config does not say its caller's attempt")
def test_an_entrypoint_retried_whole_leaves_its_earlier_tasks_bookings(tmp_path):
    from langgraph.func import entrypoint, task
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}

    @task
    def steady(x: int) -> str:
        from langgraph_resume_kill_child import book
        return book(store, path, "steady")

    saver = WalstoreSaver(store)

    @entrypoint(checkpointer=saver, retry_policy=RETRY)
    def main(x: int) -> dict:
        first = steady(x).result()
        tries["n"] += 1
        if tries["n"] == 1:
            raise ConnectionError("lost")
        return {"log": [first]}
    try:
        out = main.invoke(1, CONFIG)
        assert tries["n"] == 2 and len(ledger(path)[0]) == 2   # (steady called twice)
        assert live(path) == recorded(out), (ledger(path), out)
    finally:
        store.close()


def test_a_timeout_policy_retry_refuses_the_timed_out_attempts_transaction(tmp_path):
    # LangGraph's own TimeoutPolicy: the watchdog cancels the attempt's await, the
    # worker thread goes on inside its transaction; the retry books, and the timed-out
    # transaction is refused at its commit, its booking cancelled by the rollback
    from langgraph.errors import NodeTimeoutError
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import TimeoutPolicy

    from test_langgraph_retry_attempts import State
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    tries = {"n": 0}
    zombie: list = []

    def first_attempt() -> str:
        try:
            return slow_book(store, path, inside=0.6)
        except BaseException as e:
            zombie.append(e)
            raise

    async def flaky(state):
        tries["n"] += 1
        if tries["n"] == 1:
            return {"log": [await asyncio.to_thread(first_attempt)]}
        return {"log": [await asyncio.to_thread(slow_book, store, path)]}

    async def run(graph):
        out = await graph.ainvoke({"log": []}, CONFIG)
        deadline = time.monotonic() + 5
        while not zombie and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return out
    b = StateGraph(State)
    b.add_node("flaky", flaky, timeout=TimeoutPolicy(run_timeout=0.2),
               retry_policy=RetryPolicy(max_attempts=3, initial_interval=0.01,
                                        jitter=False, retry_on=NodeTimeoutError))
    b.add_edge(START, "flaky")
    b.add_edge("flaky", END)
    try:
        out = asyncio.run(run(b.compile(checkpointer=WalstoreSaver(store))))
        assert zombie and isinstance(zombie[0], walstore.errors.ConflictError), zombie
        assert live(path) == recorded(out), (ledger(path), out)
    finally:
        store.close()
    checked(store_path)


def test_parallel_tools_of_a_retried_tool_node_wait_for_the_undo_before_reading(tmp_path):
    # a ToolNode (retry policy on the node) whose tools book in parallel worker threads,
    # each only when its key says it has not; one raises after booking.  On the retry
    # the first tool's transaction undoes the earlier attempt's three bookings (a slow
    # cancel API): the other tools, begun meanwhile, read the earlier attempt's keys,
    # kept those bookings, and the undo then cancelled them -- the state recording two
    # cancelled bookings.  Now every transaction of the retry waits for the undo.
    import threading

    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langgraph.config import get_config
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")

    def cancel(action):
        time.sleep(0.3)
        append(path, f"cancel {action.args['id']}")
    store = walstore.open(store_path, compensators={"cancel": cancel})
    lock, tries = threading.Lock(), {"n": 0}
    together = threading.Barrier(3, timeout=10)

    def once(name: str, call: str) -> str:
        if get_config()["configurable"]["__pregel_runtime"].execution_info.node_attempt > 1:
            together.wait()   # (the retry's three tools begin at once)
        with store.transaction() as tx:
            bid = tx.get(f"booked:{call}")
            if bid is None:
                bid = f"{name}-{uuid.uuid4().hex[:8]}"
                with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                    append(path, f"book {bid}")
                    act.result = {"ok": True}
                tx.put(f"booked:{call}", bid)
        return bid

    @tool
    def book_a(call: str) -> str:
        """Book an A."""
        return once("a", call)

    @tool
    def book_b(call: str) -> str:
        """Book a B; the first answer is lost."""
        bid = once("b", call)
        with lock:
            tries["n"] += 1
            lost = tries["n"] == 1
        if lost:
            time.sleep(0.1)
            raise ConnectionError("the answer was lost after the booking")
        return bid
    b = StateGraph(MessagesState)
    b.add_node("tools", ToolNode([book_a, book_b]), retry_policy=RETRY)
    b.add_edge(START, "tools")
    b.add_edge("tools", END)
    calls = [{"name": n, "args": {"call": c}, "id": c}
             for n, c in (("book_a", "c1"), ("book_b", "c2"), ("book_a", "c3"))]
    try:
        out = b.compile(checkpointer=WalstoreSaver(store)).invoke(
            {"messages": [AIMessage(content="", tool_calls=calls)]}, CONFIG)
        got = sorted(m.content for m in out["messages"] if isinstance(m, ToolMessage))
        assert len(got) == 3
        assert live(path) == got, (ledger(path), got)   # (was: two recorded cancelled)
    finally:
        store.close()
    checked(store_path)


CHILD = r'''
import os, sys, time
sys.path.insert(0, TESTS); sys.path.insert(0, TESTS + "/findings_scripts")
from test_langgraph_retry_attempts import one_node_graph, CONFIG
from langgraph_resume_kill_child import append, book
import walstore
def cancel(action):
    if WHEN == "after the retry's booking":
        append(LEDGER, f"cancel {action.args['id']}")
        return
    open(MARKER, "w").close()      # (killed here, before the cancellation is made)
    time.sleep(60)
store = walstore.open(STORE, compensators={"cancel": cancel})
tries = {"n": 0}
def flaky(state):
    bid = book(store, LEDGER, "flaky")
    tries["n"] += 1
    if tries["n"] == 1:
        raise ConnectionError("lost")
    open(MARKER, "w").close()      # (killed here, the step not saved)
    time.sleep(60)
graph, saver = one_node_graph(store, flaky)
graph.invoke({"log": []}, CONFIG)
'''


@pytest.mark.parametrize("when", ["inside the retry's compensator",
                                  "after the retry's booking"])
def test_a_kill_during_a_retry_leaves_every_booking_accounted_once(tmp_path, when):
    # a real child process killed (SIGKILL) in the middle of the retry's undo (the
    # first attempt's cancellation owed), or after the retry booked: the next open's
    # recovery and the resume's undo leave exactly the booking the state records
    import os
    import signal
    import subprocess
    from test_langgraph_retry_attempts import one_node_graph
    from langgraph_resume_kill_child import book
    store_path, path, marker = (str(tmp_path / n) for n in ("s", "ledger", "marker"))
    code = (f"TESTS, STORE, LEDGER, MARKER, WHEN = {str(Path(__file__).parent)!r}, "
            f"{store_path!r}, {path!r}, {marker!r}, {when!r}\n" + CHILD)
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and child.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(marker), child.poll()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert len(ledger(path)[0]) == (1 if when.startswith("inside") else 2)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, _saver = one_node_graph(store, lambda s: {"log": [book(store, path, "again")]})
        out = graph.invoke(None, CONFIG)
        assert len(recorded(out)) == 1
        assert live(path) == recorded(out), (ledger(path), out)
    finally:
        store.close()
    checked(store_path)
