"""A child process for tests/test_langgraph_resume_after_kill.py: a LangGraph run whose
node books in a walstore transaction (an action with compensator "cancel"; the booking
and the cancellation are appended, fsynced, to LEDGER: the outside world), killed
(SIGKILL) by the test once MARKER exists.

    python langgraph_resume_kill_child.py GRAPH STORE LEDGER MARKER DURABILITY [MODE]

GRAPH (``build``): "single" (``plan`` -> ``book``), "parallel" (``fast`` and ``slow``
side by side), "interrupt" (``ask``: books, then ``interrupt()``), "subgraph" (``sub``,
a subgraph: ``s1`` -> ``s2``, each books) or "functional" (LangGraph's functional API:
an ``@entrypoint`` calling the ``@task`` ``first`` then ``second``, each books).  MODE "run" (the default) starts thread "t"
and holds in ``book`` / ``slow`` / ``s2`` / ``second`` after its booking committed (and,
"parallel", after ``fast``'s pending writes were saved; "functional", after ``first``'s
result was saved; "async", after the background save of the
checkpoint the step builds on landed, which ``put`` holds until the booking committed,
so that save comes after the booking in the log), writes MARKER and sleeps; "interrupt"
writes MARKER once the run returned at its interrupt.  "legacy" is "run" with node
transactions stamped as walstore did before ``TASK_META`` (their step, no task).
"racing" ("functional" only) resumes the thread and dies (SIGKILL, itself) in the save of
``second``'s result once the entrypoint's result, which LangGraph saves in parallel, was
saved, and before the step's checkpoint: the entrypoint's outcome saved, its task's not.
"answer" resumes the interrupted thread with ``Command(resume="yes")`` and holds in
``ask`` after its second booking, once ``interrupt()`` returned.  "undo" resumes the
thread (``graph.invoke(None, config)``) with a "cancel" compensator that writes MARKER
and sleeps before it appends: the test kills it in the middle of the undo a resume makes
first.
"""
from __future__ import annotations

import operator
import os
import signal
import sys
import threading
import time
import uuid
from typing import Annotated, Callable, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

import walstore
from walstore.integrations.langgraph import WalstoreSaver


class State(TypedDict):
    log: Annotated[list, operator.add]


def append(path: str, line: str) -> None:
    """One line at the end of ``path``, on disk before this returns."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def ledger(path: str) -> tuple[list[str], list[str]]:
    """(the booking ids booked, those cancelled), in the order written."""
    booked, cancelled = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                what, _, bid = line.strip().partition(" ")
                (booked if what == "book" else cancelled).append(bid)
    return booked, cancelled


def cancel_into(path: str) -> Callable:
    """The "cancel" compensator: the booking's cancellation in the ledger."""
    return lambda action: append(path, f"cancel {action.args['id']}")


def book(store: "walstore.Store", path: str, name: str) -> str:
    """Book ``name`` in a walstore transaction begun in the node (no scope: it belongs to
    the node's thread) and in the ledger; returns the booking's id."""
    bid = f"{name}-{uuid.uuid4().hex[:8]}"
    with store.transaction(meta="booking") as tx:
        with tx.action("book", args={"id": bid}, compensate="cancel") as act:
            append(path, f"book {bid}")
            act.result = {"ok": True}
    return bid


def build(store: "walstore.Store", path: str, kind: str,
          hold: Callable[[dict, str], None] | None = None, **saver_options):
    """(graph, saver) of ``kind``; ``hold(config, node)`` runs after the node's booking
    (the child's: wait, mark, sleep until killed)."""
    saver = WalstoreSaver(store, **saver_options)
    b = StateGraph(State)
    if kind == "single":
        def plan(state: State) -> dict:
            return {"log": ["planned"]}

        def book_node(state: State, config) -> dict:
            bid = book(store, path, "book")
            if hold is not None:
                hold(config, "book")
            return {"log": [bid]}
        b.add_node("plan", plan)
        b.add_node("book", book_node)
        b.add_edge(START, "plan")
        b.add_edge("plan", "book")
        b.add_edge("book", END)
    elif kind == "parallel":
        def fast(state: State) -> dict:
            return {"log": [book(store, path, "fast")]}

        def slow(state: State, config) -> dict:
            bid = book(store, path, "slow")
            if hold is not None:
                hold(config, "slow")
            return {"log": [bid]}
        b.add_node("fast", fast)
        b.add_node("slow", slow)
        b.add_edge(START, "fast")
        b.add_edge(START, "slow")
        b.add_edge("fast", END)
        b.add_edge("slow", END)
    elif kind == "interrupt":
        def ask(state: State, config) -> dict:
            bid = book(store, path, "ask")
            answer = interrupt("confirm the booking?")
            if hold is not None:
                hold(config, "ask")
            return {"log": [bid, answer]}
        b.add_node("ask", ask)
        b.add_edge(START, "ask")
        b.add_edge("ask", END)
    elif kind == "subgraph":
        def s1(state: State) -> dict:
            return {"log": [book(store, path, "s1")]}

        def s2(state: State, config) -> dict:
            bid = book(store, path, "s2")
            if hold is not None:
                hold(config, "s2")
            return {"log": [bid]}
        inner = StateGraph(State)
        inner.add_node("s1", s1)
        inner.add_node("s2", s2)
        inner.add_edge(START, "s1")
        inner.add_edge("s1", "s2")
        inner.add_edge("s2", END)
        b.add_node("sub", inner.compile())
        b.add_edge(START, "sub")
        b.add_edge("sub", END)
    elif kind == "functional":
        from langgraph.func import entrypoint, task

        @task
        def first(n: int) -> str:
            return book(store, path, "first")

        @task
        def second(n: int) -> str:
            bid = book(store, path, "second")
            if hold is not None:
                from langgraph.config import get_config
                hold(get_config(), "second")
            return bid

        @entrypoint(checkpointer=saver)
        def trip(state: dict) -> dict:
            # (a task's result, once saved, is not run again: the resume reads it back)
            return {"log": [first(1).result(), second(2).result()]}
        return trip, saver
    else:
        raise ValueError(kind)
    return b.compile(checkpointer=saver), saver


def _wait(what: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if time.monotonic() > deadline:
            sys.exit(f"never saw {what}")
        time.sleep(0.01)


def main(kind: str, store_path: str, path: str, marker: str, durability: str,
         mode: str = "run") -> None:
    config = {"configurable": {"thread_id": "t"}}
    if mode == "answer":
        from langgraph.types import Command
        store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})

        def answered(conf: dict, node: str) -> None:
            append(marker, f"in {node}")
            time.sleep(120)   # (killed here)
        graph, _saver = build(store, path, kind, answered)
        graph.invoke(Command(resume="yes"), config, durability=durability)
        sys.exit("the resume finished: it should have been killed in ``ask``")
    if mode == "legacy":   # (as walstore stamped node transactions before TASK_META)
        from walstore.integrations.langgraph import saver as module
        stamp = module._stamp_step
        module._stamp_step = lambda tx, checkpoint_map, task=None: stamp(tx, checkpoint_map)
    if mode == "racing":   # (the entrypoint's result saved, ``second``'s never)
        store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
        graph, saver = build(store, path, kind)
        put_writes, entry_saved = saver.put_writes, threading.Event()

        def racing(conf, writes, task_id, task_path=""):
            if any(isinstance(v, str) and v.startswith("second-") for _c, v in writes):
                entry_saved.wait(60)
                os.kill(os.getpid(), signal.SIGKILL)
            put_writes(conf, writes, task_id, task_path)
            if any(c == "__end__" for c, _v in writes):
                entry_saved.set()

        def no_checkpoint(*args, **kwargs):
            entry_saved.wait(60)
            os.kill(os.getpid(), signal.SIGKILL)
        saver.put_writes, saver.put = racing, no_checkpoint
        graph.invoke(None, config, durability=durability)
        sys.exit("the resume finished: it should have killed itself")
    if mode == "undo":   # (a resume whose undo is killed midway)
        def stuck(action) -> None:   # (killed here, before it cancels anything)
            append(marker, f"cancelling {action.args['id']}")
            time.sleep(120)
        store = walstore.open(store_path, compensators={"cancel": stuck})
        graph, _saver = build(store, path, kind)
        graph.invoke(None, config, durability=durability)
        sys.exit("the resume finished: it should have been killed in its undo")

    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    booked = threading.Event()

    def hold(conf: dict, node: str) -> None:
        booked.set()
        built_on = conf["configurable"]["checkpoint_map"][""]
        at = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                               "checkpoint_id": built_on}}
        _wait("the checkpoint the step builds on", lambda: saver.get_tuple(at) is not None)
        if kind == "parallel":   # (fast finished: its writes on that checkpoint saved)
            _wait("fast's pending writes", lambda: any(
                ch == "log" for _t, ch, _v in saver.get_tuple(at).pending_writes))
        if kind == "functional":   # (first's result saved: a resume does not run it)
            _wait("first's result", lambda: any(
                ch == "__return__" for _t, ch, _v in saver.get_tuple(at).pending_writes))
        append(marker, f"in {node}")
        time.sleep(120)   # (killed here)

    if durability == "async":
        put = WalstoreSaver.put

        def held(self, conf, checkpoint, metadata, new_versions):
            if metadata.get("step") == 0 and kind == "single":
                booked.wait(60)   # (the checkpoint ``book`` builds on: after the booking)
            return put(self, conf, checkpoint, metadata, new_versions)
        WalstoreSaver.put = held  # type: ignore[method-assign]
    graph, saver = build(store, path, kind, hold)
    graph.invoke({"log": []}, config, durability=durability)
    if kind == "interrupt":
        append(marker, "interrupted")
        time.sleep(120)   # (killed here)
    sys.exit("the run finished: it should have been killed in a node")


if __name__ == "__main__":
    main(*sys.argv[1:7])
