"""A run cut off by an operation on its thread is refused wholly, in every durability mode.

Found by probe-lgrace (stop 43), each reproduced on the code before the fix:
- a rewind to the very checkpoint a running step builds on (the thread's head) undid the
  step and compensated its booking, and then the run's next checkpoint brought the step
  back as done: the state said "booked", the world had it cancelled (sync runs racing a
  rewind to the head, free-running: 9-14 of 40; a ``Command(resume=)`` run the same);
- ``durability="exit"`` saves no step checkpoint, so nothing fenced such a run: after a
  rewind or ``delete_thread`` its next step booked, and the booking stood;
- a run that lost a race to a rival kept the bookings of the steps it ran ahead
  (``"async"``) or of all its steps (``"exit"``): only those noted under its last two
  checkpoints were reverted;
- ``delete_thread`` racing an ``"async"`` run left the run's later pending writes under
  the erased thread's prefix.
Now (walstore/integrations/langgraph/saver.py ``_refuse_cut_off``): a run that loaded the
thread before a rewind or delete of it (in this process), or that lost a race, is refused
at its next checkpoint, pending writes and node transaction; a node transaction of it
still open conflicts at commit (``Transaction.undo_fence``; the lost run's key); what
it committed is undone (by the rewind, or reverted with its compensations).
"""
from __future__ import annotations

import operator
import random
import threading
import time
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import Command, interrupt  # noqa: E402

from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

from test_langgraph_findings import (Plan, book_in, booking_store,  # noqa: E402
                                     plan_graph, standing)


def _held_saver(store, hold):
    """A saver whose ``put`` of a checkpoint ``hold(metadata)`` picks waits for release."""
    class Held(WalstoreSaver):
        reached, release = threading.Event(), threading.Event()

        def put(self, config, checkpoint, metadata, new_versions):
            if hold(metadata):
                self.reached.set()
                self.release.wait(30)
            return super().put(config, checkpoint, metadata, new_versions)
    return Held(store)


def _start_run(graph, inp, config, durability: str = "sync"):
    """``graph.invoke(inp, config)`` in a thread: (the thread, the errors it raised)."""
    errors: list = []

    def run() -> None:
        try:
            graph.invoke(inp, config, durability=durability)
        except Exception as e:  # noqa: BLE001  (the run cut off)
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    return th, errors


def test_a_rewind_to_the_checkpoint_a_running_step_builds_on_refuses_the_run(tmp_path):
    store, world = booking_store(tmp_path)
    saver = _held_saver(store, lambda md: md.get("step") == 1)

    def book(s: Plan) -> dict:
        book_in(store, world, s["plan"][0])
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    th, errors = _start_run(graph, {"plan": ["Paris", "Rome", "Oslo"], "booked": []}, config)
    assert saver.reached.wait(30)  # (Paris booked, its write saved, its checkpoint held)
    head = graph.get_state(config)  # (the step's checkpoint is not saved: the head is
    assert standing(world) == ["Paris"]  # the one the running step builds on)
    assert saver.rewind(head.config) is not None  # (undoes Paris's booking and write)
    saver.release.set()
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert graph.get_state(config).values["booked"] == standing(world) == [], world
    graph.invoke(None, config, durability="sync")
    assert sorted(graph.get_state(config).values["booked"]) == standing(world) == [
        "Oslo", "Paris", "Rome"]
    store.close()


def test_a_resume_racing_a_rewind_to_the_interrupted_head_is_refused(tmp_path):
    class S(TypedDict):
        booked: Annotated[list, operator.add]
    store, world = booking_store(tmp_path)
    hold = {"on": False}
    saver = _held_saver(store, lambda md: hold["on"] and md.get("source") == "loop")

    def approve_and_book(s: S) -> dict:
        if interrupt("book Rome?") == "yes":
            book_in(store, world, "Rome")
            return {"booked": ["Rome"]}
        return {}
    b = StateGraph(S)
    b.add_node("book", approve_and_book)
    b.add_edge(START, "book")
    b.add_edge("book", END)
    graph = b.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"booked": []}, config, durability="sync")
    head = graph.get_state(config)
    hold["on"] = True
    errors: list = []

    def run() -> None:
        try:
            graph.invoke(Command(resume="yes"), config, durability="sync")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    assert saver.reached.wait(30)
    assert saver.rewind(head.config) is not None
    saver.release.set()
    th.join(60)
    hold["on"] = False
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert graph.get_state(config).values.get("booked", []) == standing(world) == []
    store.close()


def _graph_held_at_rome(tmp_path):
    """(store, world, saver, graph, config, rome_booked, done): a plan graph whose step
    that books Rome waits for ``done`` once Rome is booked (``rome_booked`` set)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    rome_booked, done = threading.Event(), threading.Event()

    def book(s: Plan) -> dict:
        city = s["plan"][0]
        book_in(store, world, city)
        if city == "Rome":
            rome_booked.set()
            done.wait(30)
        return {"plan": s["plan"][1:], "booked": [city]}
    return (store, world, saver, plan_graph(saver, book),
            {"configurable": {"thread_id": "a"}}, rome_booked, done)


@pytest.mark.parametrize("how", ["rewind-head", "rewind-older", "delete"])
def test_an_exit_mode_run_is_cut_off_by_a_rewind_or_delete_of_its_thread(tmp_path, how):
    store, world, saver, graph, config, rome_booked, done = _graph_held_at_rome(tmp_path)
    graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="exit")
    c1 = graph.get_state(config)
    graph.invoke({"plan": ["Nice"]}, config, durability="exit")
    c2 = graph.get_state(config)
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"plan": ["Rome", "Oslo"]}, config, durability="exit")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    assert rome_booked.wait(30)
    if how == "rewind-head":
        saver.rewind(c2.config)
    elif how == "rewind-older":
        saver.rewind(c1.config)
    else:
        saver.delete_thread("a")
    done.set()
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert "Oslo" not in standing(world), world  # (its node was refused)
    booked = graph.get_state(config).values.get("booked", [])
    if how == "delete":
        assert booked == [] and standing(world) == ["Nice", "Paris", "Rome"]  # (purge
        # compensates nothing: what ran before the delete stands, as documented)
    else:
        assert sorted(booked) == standing(world) == sorted(
            (c2 if how == "rewind-head" else c1).values["booked"])
    store.close()


@pytest.mark.parametrize("durability", ["exit", "async"])
def test_the_run_that_loses_a_race_has_every_booking_of_its_steps_undone(
        tmp_path, durability):
    for it in range(4):
        store, world = booking_store(tmp_path / str(it))
        saver = WalstoreSaver(store)
        rng = random.Random(it)

        def book(s: Plan) -> dict:
            city = s["plan"][0]
            time.sleep(rng.random() * 0.01)
            book_in(store, world, city)
            time.sleep(rng.random() * 0.005)
            return {"plan": s["plan"][1:], "booked": [city]}
        graph = plan_graph(saver, book)
        config = {"configurable": {"thread_id": "a"}}
        graph.invoke({"plan": ["P0"], "booked": []}, config, durability="sync")
        outcome: dict = {}

        def run(who: str) -> None:
            try:
                graph.invoke({"plan": [f"{who}1", f"{who}2", f"{who}3"]},
                             {"configurable": {"thread_id": "a"}}, durability=durability)
                outcome[who] = "ok"
            except Exception as e:  # noqa: BLE001
                outcome[who] = type(e).__name__
        ths = [threading.Thread(target=run, args=(w,)) for w in "AB"]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        for _ in range(6):  # (a loser may have left the thread mid-plan: resume to the end)
            if not graph.get_state(config).next:
                break
            graph.invoke(None, config, durability="sync")
        final = sorted(set(graph.get_state(config).values["booked"]))
        assert standing(world) == final, (outcome, world)
        store.close()
        store, world2 = booking_store(tmp_path / str(it))  # (reopen: nothing owed runs)
        assert sorted(set(plan_graph(WalstoreSaver(store), book).get_state(
            config).values["booked"])) == final
        store.close()


def test_delete_thread_racing_an_async_run_leaves_nothing_under_the_thread(tmp_path):
    store, world, saver, graph, config, rome, done = _graph_held_at_rome(tmp_path)
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"plan": ["Paris", "Rome", "Oslo", "Nice"], "booked": []}, config,
                         durability="async")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    assert rome.wait(30)
    saver.delete_thread("a")
    done.set()
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert list(store.keys(prefix=saver.thread_scope("a"))) == []
    assert "Oslo" not in standing(world) and "Nice" not in standing(world)
    store.close()


@pytest.mark.parametrize("save", ["put", "put_writes"])
def test_a_rewind_landing_between_a_saves_mark_check_and_its_transaction_is_seen(
        tmp_path, save):
    # (review43: put and put_writes looked at the marks before their transaction's
    # snapshot; a rewind to the head landing in between was missed and the save
    # committed: the state said "booked", the world had it cancelled.  The marks are now
    # looked at again inside the save's transaction, after its snapshot, and the save is
    # fenced against undo of the thread.)
    store, world = booking_store(tmp_path)
    what = "a checkpoint built on" if save == "put" else "pending writes for"

    class Held(WalstoreSaver):
        reached, release = threading.Event(), threading.Event()

        def _refuse_cut_off(self, conf, thread_id, ns_name, ns, cid, what_, **kw):
            super()._refuse_cut_off(conf, thread_id, ns_name, ns, cid, what_, **kw)
            if what_ == what and not self.reached.is_set() and standing(world) == ["Paris"]:
                self.reached.set()
                self.release.wait(30)
    saver = Held(store)

    def book(s: Plan) -> dict:
        book_in(store, world, s["plan"][0])
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    th, errors = _start_run(graph, {"plan": ["Paris", "Rome", "Oslo"], "booked": []}, config)
    assert saver.reached.wait(30)
    target = next(h for h in graph.get_state_history(config)
                  if h.metadata.get("step") == (0 if save == "put" else -1) or
                  h.values.get("booked") == [])
    assert saver.rewind(target.config) is not None  # (Paris's booking compensated)
    saver.release.set()
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert sorted(graph.get_state(config).values["booked"]) == standing(world), world
    graph.invoke(None, config, durability="sync")
    assert sorted(graph.get_state(config).values["booked"]) == standing(world) == [
        "Oslo", "Paris", "Rome"]
    store.close()
