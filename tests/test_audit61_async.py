"""Audit 61: asyncio users — cancellation and timeouts of walstore's async surfaces
(WalstoreSaver's and WalstoreStore's async methods, WalstoreSession, the sync Store from
worker threads).

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import asyncio
import contextvars
import gc
import operator
import sys
import threading
from typing import Annotated, TypedDict

import pytest

import walstore
from walstore import fileio


class _HeldFsync(fileio.OSBackend):
    """Once armed, the next fsync/fdatasync of a caller's thread waits for ``release`` (a
    commit held at its commit point's fsync, as on a slow disk); ``entered`` says it got
    there.  Not one of walstore's own background threads ("walstore-spare" fsyncs the
    WAL's next segment as it prepares it: under load that fsync came after the arming
    and took the hold, the call was not held, and the test failed, 5 of 23)."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.holder: threading.Thread | None = None

    def _hold(self) -> None:
        if self.armed and not threading.current_thread().name.startswith("walstore-"):
            self.armed = False
            self.holder = threading.current_thread()
            self.entered.set()
            self.release.wait(30)

    def fsync(self, fd: int) -> None:
        self._hold()
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._hold()
        super().fdatasync(fd)


async def _cancel_everything_else() -> None:
    """A server's graceful shutdown: cancel every other task and wait for them."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in others:
        t.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class _Steps(TypedDict):
    log: Annotated[list, operator.add]


# LangGraph hands an async node its run config (the context variable walstore's scope
# provider reads) only from Python 3.11 (asyncio tasks take a context there); on 3.10 an
# async node's transactions belong to its thread through langchain_core's
# set_config_context (GUIDE; test_on_python_3_10_an_async_nodes_booking_... below)
needs_context_in_async_nodes = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="LangGraph gives async nodes their run config "
    "through a context variable only from Python 3.11 (GUIDE: set_config_context on 3.10)")


def _session_add(store):
    from walstore.integrations.openai_agents import WalstoreSession
    session = WalstoreSession("u1", store)
    return lambda: session.add_items([{"role": "user", "content": "hi"}])


def _memory_put(store):
    from walstore.integrations.langgraph import WalstoreStore
    memory = WalstoreStore(store)
    return lambda: memory.aput(("users", "u1"), "prefs", {"tea": "green"})


@pytest.mark.parametrize("make", [_session_add, _memory_put], ids=["session", "memory"])
def test_a_mutation_cancelled_by_a_cancel_all_shutdown_has_finished_when_the_caller_hears(
        tmp_path, make):
    """finish_despite_cancel awaited its worker as an inner Task (``ensure_future(
    to_thread(...))``): a shutdown that cancels every task (``all_tasks()``, as servers
    do and as ``asyncio.run``'s end does) cancelled that inner Task too, so the wait
    ended at once and the caller's ``gather`` returned while the worker thread was still
    committing: 10 of 10 cancelled ``add_items`` held at a slow fsync landed after it.
    The worker's outcome is now a plain Future, in no task list."""
    backend = _HeldFsync()
    old = fileio.set_backend(backend)
    try:
        with walstore.open(str(tmp_path / "s"), durability="full") as store:
            call = make(store)
            commits_before = len(store.log())

            async def main() -> int:
                # (a store an earlier test dropped, closed by its __del__ when the
                # collector runs on this loop's thread, would take the held fsync there:
                # the loop stood still until the hold timed out, 30 s, seen in CI)
                gc.collect()
                backend.armed = True
                task = asyncio.create_task(call())
                assert await asyncio.to_thread(backend.entered.wait, 30)
                assert backend.holder is not threading.current_thread()
                asyncio.get_running_loop().call_later(0.05, backend.release.set)
                await _cancel_everything_else()
                assert task.cancelled()
                return len(store.log())   # what the caller sees once told CancelledError

            seen = asyncio.run(main())
            assert seen == commits_before + 1   # (before: commits_before, landing later)
            assert len(store.log()) == seen
    finally:
        backend.release.set()
        fileio.set_backend(old)


@needs_context_in_async_nodes
@pytest.mark.parametrize("how", ["to_thread", "run_in_executor_with_context"])
def test_a_node_booking_from_a_worker_thread_that_carries_the_context_is_rewound(tmp_path, how):
    """Documented (GUIDE, LangGraph): the scope provider reads LangGraph's run config, a
    context variable.  A node booking through a bare ``loop.run_in_executor(None, fn)``
    (no context copied) was outside its thread: ``saver.rewind`` to the checkpoint before
    the step left the booking and ran no refund (probe: charge kept, graph back before the
    step, so the step would book again).  The two recipes the GUIDE gives are rewound and
    compensated."""
    async def pay(config, book):
        if how == "to_thread":
            await asyncio.to_thread(book)
        else:
            await asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, book)

    _book_in_a_node_then_rewind(tmp_path, pay)


def _book_in_a_node_then_rewind(tmp_path, pay_body) -> None:
    """A graph plan -> pay whose async ``pay`` node books (a charge with a refund, a key)
    through ``await pay_body(state_and_config, book)``; rewound to the checkpoint before
    ``pay``: the booking must be undone and refunded once."""
    from langgraph.graph import END, START, StateGraph
    from walstore.integrations.langgraph import WalstoreSaver

    ledger: list[str] = []

    async def run() -> None:
        with walstore.open(str(tmp_path / "s"), durability="none",
                           compensators={"refund": lambda a: ledger.append("refund")}
                           ) as store:
            saver = WalstoreSaver(store)

            def book() -> None:
                with store.transaction() as tx:
                    with tx.action("charge", compensate="refund") as act:
                        ledger.append("charge")
                        act.result = {"id": 1}
                    tx.put("bookings/1", {"room": 12})

            async def plan(state):
                return {"log": ["plan"]}

            async def pay(state, config):
                await pay_body(config, book)
                return {"log": ["pay"]}

            g = StateGraph(_Steps)
            g.add_node("plan", plan)
            g.add_node("pay", pay)
            g.add_edge(START, "plan")
            g.add_edge("plan", "pay")
            g.add_edge("pay", END)
            graph = g.compile(checkpointer=saver)
            cfg = {"configurable": {"thread_id": "t"}}
            await graph.ainvoke({"log": []}, cfg)
            before_pay = [h async for h in graph.aget_state_history(cfg)
                          if h.next == ("pay",)][0]
            await saver.arewind(before_pay.config)
            assert ledger == ["charge", "refund"]
            assert store.get("bookings/1") is None
            assert (await graph.aget_state(cfg)).values == {"log": ["plan"]}
    asyncio.run(run())


def test_async_with_saver_closes_off_the_loop_so_a_body_awaiting_the_loop_commits(tmp_path):
    """``async with WalstoreSaver.from_path(...)`` closed the store ON the event loop:
    close() waits (up to 5 s) for an action body another thread runs, and a body whose
    side effect goes through the loop (an async payments client called with
    ``run_coroutine_threadsafe``) could not finish meanwhile: 5 s with the loop held,
    then 'their results cannot be logged', the charge made and the next open refunding
    it with result=None (probe: run 5.5 s, action 'compensated').  The exit now closes
    in a worker thread: the body finishes and its result is logged.  What comes after the
    body (the put, the commit) races the close, which leaves another live thread's
    transaction as a crash leaves it (``AgentHooks.roll_back_open``): it commits, or it
    is cut off (StoreClosed) and the next open refunds the charge once, WITH its logged
    result — never with result=None.  (Asserted as "committed" only, it failed once in a
    CI run under load: the close won the race, stop 67.)"""
    import warnings
    from walstore.integrations.langgraph import WalstoreSaver

    ledger: list[str] = []
    path = str(tmp_path / "s")
    entered = threading.Event()
    outcome: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def charge() -> dict:        # an async payments client
            await asyncio.sleep(0.2)
            ledger.append("charge")
            return {"id": 1}

        async with WalstoreSaver.from_path(path, durability="none",
                                           compensators={"refund": lambda a: None}) as saver:
            store = saver.store

            def book() -> None:
                try:
                    with store.transaction() as tx:
                        with tx.action("charge", compensate="refund") as act:
                            entered.set()
                            act.result = asyncio.run_coroutine_threadsafe(charge(),
                                                                          loop).result()
                        tx.put("paid", True)
                except walstore.StoreClosed:
                    outcome.append("cut off by the close")
                    return
                outcome.append("committed")

            task = asyncio.ensure_future(asyncio.to_thread(book))
            await asyncio.to_thread(entered.wait, 30)
        await task

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        asyncio.run(main())
    assert ledger == ["charge"] and len(outcome) == 1, outcome
    refunds: list = []
    with walstore.open(path, compensators={"refund": refunds.append}) as store:
        if outcome == ["committed"]:
            assert store.get("paid") is True
            assert [(a.name, a.state) for a in store.actions()] == [("charge", "committed")]
        else:  # (its result logged before the close: the refund knows what it undoes)
            assert store.get("paid") is None
            assert [(a.name, a.state) for a in store.actions()] == [("charge", "compensated")]
    if outcome == ["committed"]:
        assert refunds == []
    else:
        assert [a.result for a in refunds] == [{"id": 1}], refunds


def test_a_mutation_cancelled_while_queued_for_a_worker_never_runs(tmp_path):
    """A cancelled call still queued for a worker thread (the default executor full: a
    few threads, many sessions, a slow disk) waited its turn and then committed: 60
    sessions' add_items cancelled 10 ms in, fsyncs of 50 ms, all 60 committed and the
    cancellation was heard after 1 s.  One no worker had begun is now dropped: the
    caller hears CancelledError at once and nothing is written; one already running
    is still waited for."""
    from concurrent.futures import ThreadPoolExecutor
    from walstore.integrations.openai_agents import WalstoreSession

    backend = _HeldFsync()
    old = fileio.set_backend(backend)
    try:
        with walstore.open(str(tmp_path / "s"), durability="full") as store:
            first, second = WalstoreSession("a", store), WalstoreSession("b", store)

            async def main() -> None:
                loop = asyncio.get_running_loop()
                pool = ThreadPoolExecutor(1)   # one worker: the second call queues
                loop.set_default_executor(pool)
                backend.armed = True
                running = asyncio.create_task(first.add_items([{"content": "one"}]))
                while not backend.entered.is_set():
                    await asyncio.sleep(0.001)
                queued = asyncio.create_task(second.add_items([{"content": "two"}]))
                for _ in range(3):
                    await asyncio.sleep(0)
                running.cancel()
                queued.cancel()
                for _ in range(20):   # (no timing: a few turns of the loop)
                    await asyncio.sleep(0)
                assert queued.done() and queued.cancelled()   # heard at once (before:
                assert not running.done()                    # it waited for the worker)
                backend.release.set()
                await asyncio.gather(running, return_exceptions=True)
                assert running.cancelled()

            asyncio.run(main())
            assert [t.meta["openai_session"] for t in store.log()] == ["a"]
            assert store.get("oa/b/i/main/00000000000000000001") is None
    finally:
        backend.release.set()
        fileio.set_backend(old)


def test_a_cancel_storm_on_session_writes_leaves_each_write_whole_and_once(tmp_path):
    """Guard (no defect found here after the fixes above): 300 session writes, each
    cancelled after a random 0-4 ms.  Every write the caller was told succeeded is
    there; a cancelled one is there whole (both items of its turn, or its restore point)
    or not at all, never half and never twice; the store closes and verifies."""
    import random
    from walstore.integrations.openai_agents import WalstoreSession

    rng = random.Random(61)
    path = str(tmp_path / "s")
    told: dict[int, tuple[str, str]] = {}

    async def main(store) -> list:
        session = WalstoreSession("u1", store)
        loop = asyncio.get_running_loop()
        for i in range(300):
            op = rng.choice(["add", "add", "point"])
            if op == "add":
                task = asyncio.create_task(session.add_items(
                    [{"role": "user", "content": f"q{i}"},
                     {"role": "assistant", "content": f"a{i}"}]))
            else:
                task = asyncio.create_task(session.restore_point(f"p{i}"))
            loop.call_later(rng.random() * 0.004, task.cancel)
            try:
                await task
                told[i] = (op, "ok")
            except asyncio.CancelledError:
                told[i] = (op, "cancelled")
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        return [(x["role"], x["content"]) for x in await session.get_items()]

    with walstore.open(path, durability="none") as store:
        items = asyncio.run(main(store))
        points = set(store.restore_points())
    contents = [c for _r, c in items]
    assert len(contents) == len(set(contents))            # never twice
    for n in range(0, len(items), 2):                      # never half, in order
        assert items[n][0] == "user" and items[n + 1] == ("assistant", "a" + items[n][1][1:])
    for i, (op, outcome) in told.items():
        present = (f"q{i}" in contents) if op == "add" else (f"oa/u1/p{i}" in points)
        if outcome == "ok":
            assert present, (i, op)
    assert any(o == "cancelled" for _op, o in told.values())
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "walstore", "verify", path],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_context_in_async_nodes
def test_a_node_cancelled_by_its_failing_sibling_books_once_after_rewind_to_the_head(tmp_path):
    """Documented (GUIDE, LangGraph): when a task of a step fails, LangGraph cancels its
    siblings, and a sibling's booking already in a worker thread commits (its charge
    stands) while its task's writes are never saved; resuming re-runs it and it books
    again (probe: two charges, both 'committed').  The recipe the GUIDE gives —
    ``saver.rewind`` to the head (the checkpoint the failed step builds on) before
    resuming — compensates the cut-off booking: one booking stands, one refund."""
    from langgraph.graph import END, START, StateGraph
    from walstore.integrations.langgraph import WalstoreSaver

    ledger: list[tuple[str, int]] = []
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    fail = [True]

    async def run() -> None:
        with walstore.open(str(tmp_path / "s"), durability="none",
                           compensators={"refund": lambda a: ledger.append(
                               ("refund", a.args["n"]))}) as store:
            saver = WalstoreSaver(store)
            count = [0]

            def book() -> None:
                count[0] += 1
                n = count[0]
                with store.transaction() as tx:
                    with tx.action("charge", args={"n": n}, compensate="refund") as act:
                        entered.set()
                        release.wait(30)
                        ledger.append(("charge", n))
                        act.result = {"n": n}
                    tx.put(f"bookings/{n}", True)
                finished.set()

            async def check(state):
                await asyncio.to_thread(entered.wait, 30)
                if fail[0]:
                    raise RuntimeError("the other tool failed")
                return {"log": ["check"]}

            async def pay(state):
                await asyncio.to_thread(book)
                return {"log": ["pay"]}

            g = StateGraph(_Steps)
            g.add_node("check", check)
            g.add_node("pay", pay)
            g.add_edge(START, "check")
            g.add_edge(START, "pay")
            g.add_edge(["check", "pay"], END)
            graph = g.compile(checkpointer=saver)
            cfg = {"configurable": {"thread_id": "t"}}
            with pytest.raises(RuntimeError):
                await graph.ainvoke({"log": []}, cfg)
            release.set()
            await asyncio.to_thread(finished.wait, 30)
            assert ledger == [("charge", 1)]        # the cut-off booking stands
            head = await graph.aget_state(cfg)
            await saver.arewind(head.config)        # the recipe
            assert ledger == [("charge", 1), ("refund", 1)]
            fail[0] = False
            assert await graph.ainvoke(None, cfg) == {"log": ["check", "pay"]}
            assert ledger == [("charge", 1), ("refund", 1), ("charge", 2)]
            assert [k for k, _v in store.scan(prefix="bookings/")] == ["bookings/2"]
    asyncio.run(run())


@pytest.mark.parametrize("where", ["in_the_node", "in_a_worker_thread"])
def test_on_python_3_10_an_async_nodes_booking_belongs_to_its_thread_through_set_config_context(
        tmp_path, where):
    """On Python 3.10 LangGraph gives an async node no run config in its context (it
    cannot: asyncio tasks take a context only from 3.11), so a booking an async node
    made belonged to no thread — ``saver.rewind`` kept it and refunded nothing (probe on
    3.10.13: charge kept, booking kept).  The GUIDE's recipe for 3.10, which works on
    every version: the node takes ``config`` and runs its walstore work in the context
    ``langchain_core.runnables.config.set_config_context(config)`` gives."""
    from langchain_core.runnables.config import set_config_context

    async def pay(config, book):
        with set_config_context(config) as ctx:
            if where == "in_the_node":
                ctx.run(book)
            else:
                await asyncio.get_running_loop().run_in_executor(None, ctx.run, book)

    _book_in_a_node_then_rewind(tmp_path, pay)
