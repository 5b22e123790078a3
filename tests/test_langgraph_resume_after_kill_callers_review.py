"""A review of stop 79's "a ``@task``'s work is recorded by its caller's saved result
too" (tests/test_langgraph_resume_after_kill_callers.py): the orders of saves LangGraph
can leave after a kill, in the shapes the lead's test does not run -- a ``@task`` calling
a ``@task`` (the middle one's result saved alone, or the entrypoint's alone), a
``@task`` called from a ``StateGraph`` node (the node's writes saved alone), async
``ainvoke``, ``durability="async"`` and ``"exit"``, and a caller interrupted or failing
after the call with the task's result lost (the resume calls the task again: its first
booking must be refunded); node transactions stamped by stop 78's walstore (no
callers named: read from their step's stamp); and, in one process, a store.rewind's
cut-off run after the caller's interrupt was saved (refunded too).

Each case is a real process that runs the graph once and kills itself (SIGKILL) in the
save it drops, once the saves it keeps landed (``racing``, below: the child mode of this
file, ``python THIS_FILE CASE STORE LEDGER DURABILITY CALL [78]``); this process then resumes
the thread, and the fsynced outside ledger (tests/findings_scripts/
langgraph_resume_kill_child.py's) must agree with the state.
"""
from __future__ import annotations

import asyncio
import operator
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Callable, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402
from walstore.integrations.langgraph.saver import _stamped_callers  # noqa: E402

SCRIPTS = Path(__file__).parent / "findings_scripts"
sys.path.insert(0, str(SCRIPTS))
from langgraph_resume_kill_child import book, cancel_into, ledger  # noqa: E402

CONFIG = {"configurable": {"thread_id": "t"}}


class State(TypedDict):
    log: Annotated[list, operator.add]


def _returns(prefix: str) -> Callable[[list], bool]:
    """Writes of a ``@task`` whose result starts with ``prefix``."""
    return lambda writes: any(c == "__return__" and isinstance(v, str) and
                              v.startswith(prefix) for c, v in writes)


def _channel(name: str) -> Callable[[list], bool]:
    return lambda writes: any(c == name for c, _v in writes)


def _logs(prefix: str) -> Callable[[list], bool]:
    """Writes of a ``StateGraph`` node logging an entry starting with ``prefix``."""
    return lambda writes: any(c == "log" and isinstance(v, list) and any(
        isinstance(x, str) and x.startswith(prefix) for x in v) for c, v in writes)


def _either(*tests: Callable[[list], bool]) -> Callable[[list], bool]:
    return lambda writes: any(t(writes) for t in tests)


# case -> (the graph, the writes saved, the writes dropped (the process dies in their
# save once the saved ones landed), the step of the checkpoint that ends the booking's
# step, whose save is dropped too, or None: the run ends at an interrupt or error)
CASES = {
    # entrypoint -> a (@task) -> b (@task, books): a's result saved alone
    "nested-middle": ("nested", _returns("a:"),
                      _either(_returns("b-"), _channel("__end__")), 0),
    # the same, the entrypoint's result saved alone
    "nested-entry": ("nested", _channel("__end__"),
                     _either(_returns("a:"), _returns("b-")), 0),
    # a StateGraph node calling a @task (books): the node's writes saved alone
    "node": ("node", _logs("t-"), _returns("t-"), 1),
    # an entrypoint calling a @task (books), then interrupt(): its interrupt saved alone
    "interrupt": ("interrupt", _channel("__interrupt__"), _returns("t-"), None),
    # an entrypoint calling a @task (books), then failing: its error saved alone
    "fail": ("fail", _channel("__error__"), _returns("t-"), None),
}


def build(store: "walstore.Store", path: str, kind: str, call: str, flag: str = ""):
    """(graph, saver) of ``kind``, sync or (``call`` "ainvoke") async functions."""
    from langgraph.func import entrypoint, task
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import interrupt

    from walstore.integrations.langgraph import WalstoreSaver
    saver = WalstoreSaver(store)
    aio = call == "ainvoke"
    if kind == "nested":
        if aio:
            @task
            async def b(n: int) -> str:
                return book(store, path, "b")

            @task
            async def a(n: int) -> str:
                return "a:" + await b(n)

            @entrypoint(checkpointer=saver)
            async def trip(state: dict) -> dict:
                return {"log": [await a(1)]}
        else:
            @task
            def b(n: int) -> str:
                return book(store, path, "b")

            @task
            def a(n: int) -> str:
                return "a:" + b(n).result()

            @entrypoint(checkpointer=saver)
            def trip(state: dict) -> dict:
                return {"log": [a(1).result()]}
        return trip, saver
    if kind == "node":
        if aio:
            @task
            async def t(n: int) -> str:
                return book(store, path, "t")

            async def node(state: State) -> dict:
                return {"log": [await t(1)]}
        else:
            @task
            def t(n: int) -> str:
                return book(store, path, "t")

            def node(state: State) -> dict:
                return {"log": [t(1).result()]}
        g = StateGraph(State)
        g.add_node("node", node)
        g.add_edge(START, "node")
        g.add_edge("node", END)
        return g.compile(checkpointer=saver), saver
    if kind in ("interrupt", "fail"):
        def after(bid: str) -> dict:
            if kind == "fail":
                if os.path.exists(flag):
                    raise RuntimeError("the caller fails after its call")
                return {"log": [bid]}
            return {"log": [bid, interrupt("keep the booking?")]}
        if aio:
            @task
            async def t(n: int) -> str:
                return book(store, path, "t")

            @entrypoint(checkpointer=saver)
            async def trip(state: dict) -> dict:
                return after(await t(1))
        else:
            @task
            def t(n: int) -> str:
                return book(store, path, "t")

            @entrypoint(checkpointer=saver)
            def trip(state: dict) -> dict:
                return after(t(1).result())
        return trip, saver
    if kind == "beside":   # (interrupt, with a @task ``u`` that books nothing beside ``t``)
        @task
        def t(n: int) -> str:
            return book(store, path, "t")

        @task
        def u(n: int) -> str:
            return "u"

        @entrypoint(checkpointer=saver)
        def trip(state: dict) -> dict:
            booked, other = t(1), u(2)
            return {"log": [booked.result(), other.result(), interrupt("keep it?")]}
        return trip, saver
    raise ValueError(kind)


def child(case: str, store_path: str, path: str, durability: str, call: str,
          stamp: str = "") -> None:
    """Run ``case`` once on a new thread and die (SIGKILL) in the save of a write it
    drops, once the writes it keeps and the checkpoint the booking's step builds on
    (``durability="async"``: saved in the background) were saved.  ``stamp`` "78":
    node transactions stamped as stop 78's walstore did (their task, no callers)."""
    if stamp == "78":
        from walstore.integrations.langgraph import saver as module
        stamped = module._stamp_step
        module._stamp_step = lambda tx, checkpoint_map, chain=(): stamped(
            tx, checkpoint_map, chain[-1:])
    kind, keep, drop, ends = CASES[case]
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    graph, saver = build(store, path, kind, call, flag=path + ".fail")
    put_writes, put = saver.put_writes, saver.put
    kept, checkpointed = threading.Event(), threading.Event()

    def die() -> None:
        kept.wait(60)
        checkpointed.wait(60)
        os.kill(os.getpid(), signal.SIGKILL)

    def racing(conf, writes, task_id, task_path=""):
        if drop(writes):
            die()
        put_writes(conf, writes, task_id, task_path)
        if keep(writes):
            kept.set()

    def held(conf, checkpoint, metadata, new_versions):
        if ends is not None and metadata.get("step", -1) >= ends:
            die()   # (the booking step's own checkpoint: never saved)
        out = put(conf, checkpoint, metadata, new_versions)
        if metadata.get("step", -1) >= (0 if kind == "node" else -1):
            checkpointed.set()   # (the checkpoint the booking's step builds on)
        return out
    saver.put_writes, saver.put = racing, held
    if kind == "fail":
        open(path + ".fail", "w").close()
    try:
        if call == "ainvoke":
            asyncio.run(graph.ainvoke({"log": []}, CONFIG, durability=durability))
        else:
            graph.invoke({"log": []}, CONFIG, durability=durability)
    except RuntimeError:
        pass
    die()   # (every save was submitted: the dropped one kills)


def race(tmp_path: Path, case: str, durability: str = "sync", call: str = "invoke",
         stamp: str = "") -> tuple[str, str]:
    """Run ``child`` in a process until it killed itself; (store path, ledger path)."""
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    done = subprocess.run(
        [sys.executable, __file__, case, store_path, path, durability, call, stamp],
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True,
        timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    return store_path, path


def live(path: str) -> list[str]:
    booked, cancelled = ledger(path)
    assert len(cancelled) == len(set(cancelled)), f"cancelled twice: {cancelled}"
    return [b for b in booked if b not in cancelled]


def resume(graph, what, call: str):
    if call == "ainvoke":
        return asyncio.run(graph.ainvoke(what, CONFIG))
    return graph.invoke(what, CONFIG)


@pytest.mark.parametrize("case, durability, call", [
    ("nested-middle", "sync", "invoke"), ("nested-entry", "sync", "invoke"),
    ("nested-middle", "async", "ainvoke"), ("node", "sync", "invoke"),
    ("node", "async", "ainvoke")])
def test_a_caller_saved_alone_keeps_the_booking_of_the_task_it_called(
        tmp_path, case, durability, call):
    # (the resume takes the saved caller as done: it never calls the booking task again,
    # and the state holds the booking -- it must stand, once)
    store_path, path = race(tmp_path, case, durability, call)
    (bid,), cancelled = ledger(path)
    assert cancelled == []
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, CASES[case][0], call)
        (txid,) = [a.txid for a in store.actions()]
        out = resume(graph, None, call)
        assert ledger(path) == ([bid], [])   # (nothing booked again, nothing refunded)
        expected = "a:" + bid if case.startswith("nested") else bid
        assert out == {"log": [expected]}
        assert live(path) == [bid]
        (undo,) = saver.resume_undos
        assert undo.undone == () and undo.kept == (txid,)
        # (its callers, named; a stamp without them reads the same from its step's)
        meta = store.txn_info(txid).meta
        assert len(meta["langgraph_callers"]) == (2 if case.startswith("nested") else 1)
        assert _stamped_callers(meta["langgraph_step"]) == meta["langgraph_callers"]
    finally:
        store.close()


@pytest.mark.parametrize("case", ["nested-entry", "node"])
def test_a_caller_saved_alone_keeps_the_booking_stamped_by_stop_78(tmp_path, case):
    # (stop 78's walstore named the task, not its callers: they are in the step's stamp,
    # the namespaces of the run config's checkpoint map that map to the outermost
    # graph's checkpoint -- a store killed by it keeps the booking when resumed by this)
    store_path, path = race(tmp_path, case, stamp="78")
    (bid,), cancelled = ledger(path)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, CASES[case][0], "invoke")
        (txid,) = [a.txid for a in store.actions()]
        assert "langgraph_callers" not in store.txn_info(txid).meta
        out = resume(graph, None, "invoke")
        assert ledger(path) == ([bid], [])
        assert out == {"log": ["a:" + bid if case == "nested-entry" else bid]}
        (undo,) = saver.resume_undos
        assert undo.undone == () and undo.kept == (txid,)
    finally:
        store.close()


@pytest.mark.parametrize("case, durability, call", [
    ("interrupt", "sync", "invoke"), ("interrupt", "exit", "invoke"),
    ("interrupt", "sync", "ainvoke"), ("fail", "sync", "invoke"),
    ("fail", "exit", "invoke")])
def test_a_caller_interrupted_or_failed_alone_refunds_the_task_it_calls_again(
        tmp_path, case, durability, call):
    # (the caller's outcome saved, not a regular one: the resume runs it again, and it
    # calls the task again, whose result was lost -- the task books again, so its first
    # booking is refunded before)
    from langgraph.types import Command
    store_path, path = race(tmp_path, case, durability, call)
    (first,), cancelled = ledger(path)
    assert cancelled == []
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, case, call, flag=path + ".fail")
        (txid,) = [a.txid for a in store.actions()]
        if case == "fail":
            os.remove(path + ".fail")
        out = resume(graph, Command(resume="yes") if case == "interrupt" else None, call)
        booked, cancelled = ledger(path)
        assert booked[0] == first and cancelled == [first] and len(booked) == 2
        again = booked[1]
        assert out == {"log": [again, "yes"] if case == "interrupt" else [again]}
        assert live(path) == [again]
        (undo,) = saver.resume_undos
        assert undo.undone == (txid,) and undo.kept == ()
    finally:
        store.close()


if __name__ == "__main__":
    child(*sys.argv[1:7])


def test_a_rewind_after_the_callers_interrupt_was_saved_refunds_the_task_it_calls_again(
        tmp_path):
    # (one process: ``t`` books, the entrypoint's interrupt is saved, a restore point;
    # ``u``'s result is saved after it, and ``t``'s is held until a store.rewind to the
    # point took ``u``'s back and cut the run off: ``t``'s save is refused.  The
    # entrypoint's interrupt records no call's work -- the resume runs it again and it
    # calls ``t`` again -- so the refusal refunds ``t``'s booking, and one stands)
    from langgraph.types import Command
    path = str(tmp_path / "ledger")
    store = walstore.open(str(tmp_path / "s"), compensators={"cancel": cancel_into(path)})
    try:
        trip, saver = build(store, path, "beside", "invoke")
        put_writes = saver.put_writes
        asked, point, u_saved, rewound = (threading.Event() for _ in range(4))

        def racing(conf, writes, task_id, task_path=""):
            if _returns("u")(writes):
                assert point.wait(60)
            if _returns("t-")(writes):
                assert rewound.wait(60)
            try:
                put_writes(conf, writes, task_id, task_path)
            finally:
                if _returns("u")(writes):
                    u_saved.set()
                if _channel("__interrupt__")(writes):
                    asked.set()
        saver.put_writes = racing
        from test_langgraph_resume_after_kill_review import run_cut_off
        runner, errors = run_cut_off(trip)
        try:
            assert asked.wait(60)
            store.restore_point("asked")
            point.set()
            assert u_saved.wait(60)
            store.rewind("asked", scope=saver.thread_scope("t"))
        finally:
            point.set()
            rewound.set()
            runner.join(60)
        assert len(errors) == 1, errors
        saver.put_writes = put_writes
        (first,), cancelled = ledger(path)
        assert cancelled == [first]   # (refunded by the refused save)
        out = trip.invoke(Command(resume="yes"), CONFIG)
        booked, cancelled = ledger(path)
        assert booked[0] == first and len(booked) == 2 and cancelled == [first]
        assert out == {"log": [booked[1], "u", "yes"]} and live(path) == [booked[1]]
    finally:
        store.close()
