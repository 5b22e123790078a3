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

Found by probe h1 (stop 74), each failing every run on the code before the fix: a run
refused for a rewind still under way heard "its step was undone" while the rewind was
compensating the step's booking; a run refused while a rewind or delete ran that then
failed without committing lost its checkpoint, its booking standing; a run that loaded
the thread while a rewind of it ran saved as done the step the rewind undid.  Now the
thread's saves and node transactions wait while a rewind or delete of it runs.
"""
from __future__ import annotations

import operator
import random
import threading
import time
from typing import Annotated, TypedDict

import pytest

import walstore

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


def _spy_removal_waits(monkeypatch, seen: threading.Event) -> None:
    """``seen`` set when a save or node transaction begins waiting for a rewind or delete
    of its thread (``_await_removal``: nothing else waits on ``_UNDERWAY_DONE`` in the
    tests using it, one removal at a time)."""
    from walstore.integrations.langgraph import saver as saver_mod

    class Spy(threading.Condition):
        def wait(self, timeout=None):
            seen.set()
            return super().wait(timeout)
    monkeypatch.setattr(saver_mod, "_UNDERWAY_DONE", Spy(threading.Lock()))


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


@pytest.mark.parametrize("rewind_begins", ["before_the_save", "as_the_save_looks"])
def test_a_run_refused_by_a_rewind_hears_it_once_the_rewinds_compensations_ran(
        tmp_path, monkeypatch, rewind_begins):
    # (probe h1, stop 74: a run whose checkpoint was refused because a rewind of its
    # thread was under way heard "its step ... was undone" while the rewind was still
    # compensating that step's booking -- the caller saw the booking standing.  The
    # run's save now waits for the rewind's end, compensations included: when it began
    # before the save, and when it began just as the save looked at the marks.)
    world: list = []
    heard: list = []
    booked, comp_started, run_done = threading.Event(), threading.Event(), threading.Event()
    looking, looked = threading.Event(), threading.Event()
    _spy_removal_waits(monkeypatch, run_done)   # (the run waits for the rewind: done)

    def cancel(action) -> None:  # (a slow refund)
        comp_started.set()
        looked.set()
        # (until the run's caller heard -- before the fix -- or its save waits for the
        # rewind: it waited a fixed second, and a slow run heard after it all the same)
        assert run_done.wait(30)
        world.append(("cancel", action.args["city"]))
    store = walstore.open(str(tmp_path / "s"), durability="none",
                          compensators={"cancel": cancel})

    class Held(WalstoreSaver):
        def _refuse_cut_off(self, conf, thread_id, ns_name, ns, cid, what, **kw):
            if (rewind_begins == "as_the_save_looks" and what == "a checkpoint built on"
                    and not looking.is_set() and standing(world) == ["Rome"]):
                looking.set()
                assert looked.wait(30)   # (the rewind began meanwhile)
            super()._refuse_cut_off(conf, thread_id, ns_name, ns, cid, what, **kw)
    saver = Held(store)

    def book(s: Plan) -> dict:
        book_in(store, world, s["plan"][0])
        booked.set()
        if rewind_begins == "before_the_save":
            assert comp_started.wait(30)  # (the rewind undoes this step's booking now)
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": [], "booked": []}, config, durability="sync")
    head = graph.get_state(config).config

    def run() -> None:
        try:
            graph.invoke({"plan": ["Rome"]}, config, durability="sync")
        except Exception as e:  # noqa: BLE001  (the run cut off)
            heard.append((type(e).__name__, standing(world)))
        run_done.set()
    th = threading.Thread(target=run)
    th.start()
    assert (looking if rewind_begins == "as_the_save_looks" else booked).wait(30)
    assert saver.rewind(head) is not None
    th.join(60)
    assert heard == [("StaleCheckpointError", [])]   # (before: [... ["Rome"]])
    assert graph.get_state(config).values["booked"] == standing(world) == []
    store.close()


@pytest.mark.parametrize("how", ["rewind", "delete_thread"])
def test_a_run_saving_while_a_removal_ran_that_then_failed_is_saved(tmp_path, monkeypatch,
                                                                    how):
    # (probe h1, stop 74: a rewind or delete_thread marks the thread's runs cut off
    # before its commit and puts the marks back when it fails without committing (a
    # full disk); a run whose checkpoint came in between was refused for good: its
    # step's booking stood, its checkpoint was never saved, and a resume booked again.
    # The save now waits for the removal's end, and saves when it failed.)
    import errno
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools.faults import FaultBackend, installed

    store, world = booking_store(tmp_path)
    waits_or_ended = threading.Event()   # (the run's save waits for the removal, or the
    _spy_removal_waits(monkeypatch, waits_or_ended)   # run ended: refused, before the fix)

    class Seen(WalstoreSaver):
        put_called = threading.Event()

        def put(self, config, checkpoint, metadata, new_versions):
            if metadata.get("step") == 1:
                self.put_called.set()
            return super().put(config, checkpoint, metadata, new_versions)
    saver = Seen(store)
    booked, go = threading.Event(), threading.Event()

    def book(s: Plan) -> dict:
        book_in(store, world, s["plan"][0])
        booked.set()
        assert go.wait(30)
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": [], "booked": []}, config, durability="sync")
    head = graph.get_state(config).config
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"plan": ["Rome"]}, config, durability="sync")
        except Exception as e:  # noqa: BLE001  (before the fix: refused)
            errors.append(e)
        waits_or_ended.set()
    th = threading.Thread(target=run)
    th.start()
    assert booked.wait(30)
    name = "rewind" if how == "rewind" else "purge"
    real, fb = getattr(store, name), FaultBackend()

    def failing(*args, **kwargs):  # (the run's checkpoint comes while this runs)
        go.set()
        assert saver.put_called.wait(30)
        # (before the fix: refused at once.  It waited th.join(1), and a run slower to
        # come to its wait was not caught refusing)
        assert waits_or_ended.wait(30)
        with installed(fb):
            fb.fail("pwrite", errno.ENOSPC, path="*.wal", times=None)
            return real(*args, **kwargs)
    store.__dict__[name] = failing
    with pytest.raises(walstore.WalstoreError):
        saver.rewind(head) if how == "rewind" else saver.delete_thread("a")
    del store.__dict__[name]
    th.join(60)
    assert errors == []   # (before: StaleCheckpointError, the booking standing unsaved)
    assert graph.get_state(config).values["booked"] == standing(world) == ["Rome"]
    store.close()

def test_a_run_that_loads_its_thread_while_a_rewind_of_it_runs_never_saves_what_it_undid(
        tmp_path, monkeypatch):
    # (probe h1, stop 74: a run that loaded the thread after a rewind of it had begun is
    # not cut off by the rewind's first marks; its node booked and committed before the
    # rewind's commit, which undid the booking (compensated), and the run's checkpoint,
    # saved while the rewind was still compensating -- before it marked the thread's
    # runs cut off again -- said the step was done: state "booked", world cancelled.
    # The run's saves and node transactions now wait while a rewind or delete of their
    # thread runs in another Python thread.)
    world: list = []
    node_started, booked, comp_started, run_done = (threading.Event() for _ in range(4))
    _spy_removal_waits(monkeypatch, booked)   # (the node's transaction waits: no booking)

    def cancel(action) -> None:
        comp_started.set()
        run_done.wait(2)   # (before the fix the run saved its checkpoint meanwhile)
        world.append(("cancel", action.args["city"]))
    store = walstore.open(str(tmp_path / "s"), durability="none",
                          compensators={"cancel": cancel})
    saver = WalstoreSaver(store)

    def book(s: Plan) -> dict:
        if interrupt("book?") != "yes":
            return {}
        node_started.set()
        book_in(store, world, s["plan"][0])
        booked.set()
        comp_started.wait(2)   # (before the fix the rewind compensated the booking now)
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    b = StateGraph(Plan)
    b.add_node("book", book)
    b.add_edge(START, "book")
    b.add_edge("book", END)
    graph = b.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Rome"], "booked": []}, config, durability="sync")
    head = graph.get_state(config)
    assert head.next == ("book",)
    real, began = store.rewind, threading.Event()

    def held(*args, **kwargs):   # (the rewind has marked the thread; it commits once
        began.set()              # the run's node booked, or waits for the rewind: it
        assert node_started.wait(30)   # waited a fixed second for the booking)
        assert booked.wait(30)
        return real(*args, **kwargs)
    store.__dict__["rewind"] = held
    rewinding = threading.Thread(target=saver.rewind, args=(head.config,))
    rewinding.start()
    assert began.wait(30)
    th, errors = _start_run(graph, Command(resume="yes"), config)
    th.join(60)
    run_done.set()
    rewinding.join(60)
    del store.__dict__["rewind"]
    state = graph.get_state(config)
    assert state.values.get("booked") == standing(world), (errors, world)  # (before:
    store.close()                                         # ["Rome"] and [])


def test_an_async_nodes_transaction_never_blocks_the_event_loop_while_a_rewind_runs(
        tmp_path, monkeypatch):
    # (probe h3, stop 74: an async node's walstore transaction, begun on the event loop
    # while a rewind of its thread ran in a worker thread (``arewind``), waited for the
    # rewind's end on the loop: every task of the loop stood still for the whole rewind,
    # compensations included, and a compensator that needs the loop (an async app's HTTP
    # client, reached with run_coroutine_threadsafe) waited _REMOVAL_WAIT_S twice: 240 s.
    # On the loop's thread it is now refused at once; the run's saves, in worker threads,
    # still wait, so the run's caller hears once the rewind's compensations ran.)
    import asyncio

    from walstore.integrations.langgraph import saver as saver_mod
    monkeypatch.setattr(saver_mod, "_REMOVAL_WAIT_S", 60.0)
    world: list = []
    comp_started, caller_heard, node_begins = (threading.Event() for _ in range(3))
    loop_reached: list = []
    heard_early: list = []
    loops: list = []
    in_node: list = []

    def cancel(action) -> None:   # (a refund through the app's async client)
        comp_started.set()
        assert node_begins.wait(30)   # (the loop runs nothing else until it began)
        fut = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "reached"), loops[0])
        try:
            loop_reached.append(fut.result(30))
        except Exception as e:  # noqa: BLE001  (before the fix: TimeoutError)
            loop_reached.append(type(e).__name__)
        heard_early.append(caller_heard.is_set())
        world.append(("cancel", action.args["city"]))
    store = walstore.open(str(tmp_path / "s"), durability="none",
                          compensators={"cancel": cancel})
    saver = WalstoreSaver(store)

    async def book(s: Plan) -> dict:
        city = s["plan"][0]
        if city == "Rome":   # (begins once the rewind compensates Paris's booking)
            in_node[0].set()
            assert await asyncio.to_thread(comp_started.wait, 30)
            node_begins.set()
        book_in(store, world, city)   # (on the loop's thread)
        return {"plan": s["plan"][1:], "booked": [city]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}

    async def main() -> list:
        loops.append(asyncio.get_running_loop())
        in_node.append(asyncio.Event())
        await graph.ainvoke({"plan": [], "booked": []}, config, durability="sync")
        before = (await graph.aget_state(config)).config
        await graph.ainvoke({"plan": ["Paris"]}, config, durability="sync")
        run = asyncio.ensure_future(graph.ainvoke({"plan": ["Rome"]}, config,
                                                  durability="sync"))
        await in_node[0].wait()   # (the run's step saved, its node running)
        assert await saver.arewind(before) is not None
        try:
            await run
            return []
        except Exception as e:  # noqa: BLE001  (the run cut off)
            caller_heard.set()
            return [type(e).__name__]
    errors = asyncio.run(main())
    assert loop_reached == ["reached"]   # (before: ["TimeoutError"])
    assert heard_early == [False]
    assert errors == ["StaleCheckpointError"]
    assert graph.get_state(config).values["booked"] == standing(world) == []
    store.close()


def test_a_save_refused_after_the_removal_wait_ran_out_does_not_wait_it_again(
        tmp_path, monkeypatch):
    # (probe h3, stop 74: a save of a run cut off by a rewind still running after
    # _REMOVAL_WAIT_S -- a compensator of it waiting for the run -- waited the cap out,
    # was refused, and waited the whole cap again before the refusal reached its caller:
    # 240 s, where the cap says 120.  Each save's waits now share one deadline.)
    from walstore.integrations.langgraph import saver as saver_mod
    cap = 0.3
    monkeypatch.setattr(saver_mod, "_REMOVAL_WAIT_S", cap)
    fresh: list = []   # (the waits that began a whole cap: one per save)

    class Spy(threading.Condition):
        def wait(self, timeout=None):
            if timeout is not None and timeout > cap * 0.9:
                fresh.append(threading.get_ident())
            return super().wait(timeout)
    monkeypatch.setattr(saver_mod, "_UNDERWAY_DONE", Spy(threading.Lock()))
    world: list = []
    run_done = threading.Event()

    def cancel(action) -> None:   # (waits for the run it undoes: past the cap)
        run_done.wait(30)
        world.append(("cancel", action.args["city"]))
    store = walstore.open(str(tmp_path / "s"), durability="none",
                          compensators={"cancel": cancel})
    saver = WalstoreSaver(store)
    booked, go = threading.Event(), threading.Event()
    graph = plan_graph(saver, _book_then_wait_in_rome(store, world, booked, go))
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="sync")
    before = next(h for h in graph.get_state_history(config) if h.values["booked"] == [])
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"plan": ["Rome"]}, config, durability="sync")
        except Exception as e:  # noqa: BLE001  (the run cut off)
            errors.append(e)
        run_done.set()
    th = threading.Thread(target=run)
    th.start()
    assert booked.wait(30)
    real = store.rewind

    def rewinding(*args, **kwargs):   # (the run's saves come while the rewind runs)
        go.set()
        return real(*args, **kwargs)
    store.__dict__["rewind"] = rewinding
    assert saver.rewind(before.config) is not None
    del store.__dict__["rewind"]
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert fresh and all(fresh.count(t) == 1 for t in fresh), fresh  # (before: twice)
    assert graph.get_state(config).values["booked"] == standing(world) == []
    store.close()


def _book_then_wait_in_rome(store, world: list, booked: threading.Event,
                            go: threading.Event):
    """A node booking its plan's first city; in Rome it then says so (``booked``) and
    waits for ``go`` before its step ends."""
    def book(s: Plan) -> dict:
        book_in(store, world, s["plan"][0])
        if s["plan"][0] == "Rome":
            booked.set()
            assert go.wait(30)
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    return book


def test_two_rewinds_of_a_thread_at_once_that_both_fail_leave_its_run_saving(
        tmp_path, monkeypatch):
    # (probe h3, stop 74: each rewind marks the thread's runs cut off as it begins and,
    # failing without committing (a full disk), puts back the marks it found.  Two at
    # once: the second found the first's mark and, failing last, put it back -- the
    # thread stayed marked with nothing removed, and the run in flight was refused,
    # told its step was undone, its booking standing with no checkpoint: state
    # ["Paris"], world ["Paris", "Rome"].  Two removals of one thread now take turns.)
    from walstore.integrations.langgraph import saver as saver_mod
    store, world = booking_store(tmp_path)
    r1_in, r2_ready, r1_failed = (threading.Event() for _ in range(3))

    class Spy(threading.Condition):   # (R2 waits for R1's end: the fix)
        def wait(self, timeout=None):
            if threading.current_thread().name == "R2":
                r2_ready.set()
            return super().wait(timeout)
    monkeypatch.setattr(saver_mod, "_UNDERWAY_DONE", Spy(threading.Lock()))

    saver = WalstoreSaver(store)
    booked, go = threading.Event(), threading.Event()
    graph = plan_graph(saver, _book_then_wait_in_rome(store, world, booked, go))
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="sync")
    head = graph.get_state(config).config
    th, errors = _start_run(graph, {"plan": ["Rome"]}, config)
    assert booked.wait(30)

    def failing(*args, **kwargs):   # (each rewind fails without committing)
        if threading.current_thread().name == "R1":   # (the thread marked by R1)
            r1_in.set()
            assert r2_ready.wait(30)
        else:   # (R2 marked the thread: the code before)
            r2_ready.set()
            assert r1_failed.wait(30)
        raise walstore.WalstoreError("no space left on device")
    store.__dict__["rewind"] = failing
    outcome: dict = {}

    def rewind() -> None:
        try:
            saver.rewind(head)
        except walstore.WalstoreError as e:
            outcome[threading.current_thread().name] = str(e)
    r1 = threading.Thread(target=rewind, name="R1")
    r2 = threading.Thread(target=rewind, name="R2")
    r1.start()
    assert r1_in.wait(30)
    r2.start()
    r1.join(60)
    r1_failed.set()
    r2.join(60)
    del store.__dict__["rewind"]
    assert outcome == {"R1": "no space left on device", "R2": "no space left on device"}
    go.set()
    th.join(60)
    assert errors == []   # (before: StaleCheckpointError, "its step ... was undone")
    assert graph.get_state(config).values["booked"] == standing(world) == ["Paris", "Rome"]
    store.close()


def test_a_compensator_running_a_graph_on_the_thread_its_rewind_undoes_never_waits(
        tmp_path, monkeypatch):
    # (probe h3, stop 74: a save waits while a rewind of its thread runs in another
    # Python thread, except in the rewinding thread itself -- but a compensator of the
    # rewind that runs the graph on the thread it undoes (sync invoke, in the rewinding
    # thread) has its saves made in LangGraph's own threads: each waited the whole
    # _REMOVAL_WAIT_S for the very rewind it works for, three of them, 360 s.  Code
    # carrying the rewind's context (LangGraph copies it into its threads) never waits.)
    from walstore.integrations.langgraph import saver as saver_mod
    monkeypatch.setattr(saver_mod, "_REMOVAL_WAIT_S", 0.2)
    waits: list = []

    class Spy(threading.Condition):
        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(timeout)
    monkeypatch.setattr(saver_mod, "_UNDERWAY_DONE", Spy(threading.Lock()))
    world: list = []
    graphs: list = []
    config = {"configurable": {"thread_id": "a"}}

    def cancel(action) -> None:   # (the refund, then a new plan for the thread)
        world.append(("cancel", action.args["city"]))
        graphs[0].invoke({"plan": ["Nice"]}, config, durability="sync")
    store = walstore.open(str(tmp_path / "s"), durability="none",
                          compensators={"cancel": cancel})
    saver = WalstoreSaver(store)

    def book(s: Plan) -> dict:
        book_in(store, world, s["plan"][0])
        return {"plan": s["plan"][1:], "booked": [s["plan"][0]]}
    graphs.append(plan_graph(saver, book))
    graph = graphs[0]
    graph.invoke({"plan": [], "booked": []}, config, durability="sync")
    before = graph.get_state(config).config
    graph.invoke({"plan": ["Paris"]}, config, durability="sync")
    assert saver.rewind(before) is not None
    assert waits == []   # (before: the cap waited out by the run's background saves)
    assert graph.get_state(config).values["booked"] == standing(world) == ["Nice"]
    store.close()


@pytest.mark.parametrize("how", ["rewind", "delete"])
def test_a_node_transaction_naming_its_threads_scope_itself_is_fenced_too(tmp_path, how):
    """``store.transaction(scope=saver.thread_scope(tid))`` in a node skipped the scope
    provider, so its fence too (stop 75): the cut-off run's next node booked Oslo after
    the rewind or delete of its thread, and the booking stood with the run refused.  A
    node's transaction in a scope outside its thread is the app's: not fenced."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    rome_booked, done = threading.Event(), threading.Event()
    fences: list = []

    def book(s: Plan) -> dict:
        city = s["plan"][0]
        with store.transaction(scope=saver.thread_scope("a")) as tx:
            with tx.action("book", args={"city": city}, compensate="cancel") as act:
                world.append(("book", city))
                act.result = {"ok": True}
        with store.transaction(scope="app/") as tx:
            fences.append(tx.undo_fence)
            tx.put(f"app/{city}", "seen")
        if city == "Rome":
            rome_booked.set()
            done.wait(30)
        return {"plan": s["plan"][1:], "booked": [city]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="exit")
    c1 = graph.get_state(config)
    th, errors = _start_run(graph, {"plan": ["Rome", "Oslo"]}, config, durability="exit")
    assert rome_booked.wait(30)
    if how == "rewind":
        assert saver.rewind(c1.config) is not None
    else:
        saver.delete_thread("a")
    done.set()
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert "Oslo" not in standing(world), world
    assert fences == [None, None]
    if how == "rewind":
        assert graph.get_state(config).values["booked"] == standing(world) == ["Paris"]
    else:   # (a purge compensates nothing: what ran before the delete stands)
        assert standing(world) == ["Paris", "Rome"]
    store.close()


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_run_whose_subgraph_loses_a_race_has_the_subgraphs_booking_undone(
        tmp_path, durability):
    # (probe h7, stop 77: a subgraph's save refused for a lost race undoes the run's
    # booking from its parent node's context, where the revert could be fenced as a node
    # transaction of the refused run: two resumes of a thread interrupted inside a
    # subgraph both book, and the subgraph's saves race.  Passes on the code before
    # f9a7d556 too -- the parent's run is not cut off there, so its fence let the
    # revert through -- kept to cover the path.)
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    both_booked = threading.Barrier(2, timeout=30)

    def book(s: Plan) -> dict:
        who = interrupt("book for whom?")
        book_in(store, world, who)
        both_booked.wait()   # (both booked before either subgraph saves)
        return {"booked": [who]}
    sub = StateGraph(Plan)
    sub.add_node("book", book)
    sub.add_edge(START, "book")
    sub.add_edge("book", END)
    b = StateGraph(Plan)
    b.add_node("sub", sub.compile())
    b.add_edge(START, "sub")
    b.add_edge("sub", END)
    graph = b.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": [], "booked": []}, config, durability="sync")
    assert graph.get_state(config).next == ("sub",)
    outcome: dict = {}

    def run(who: str) -> None:
        try:
            graph.invoke(Command(resume=who), {"configurable": {"thread_id": "a"}},
                         durability=durability)
            outcome[who] = "ok"
        except Exception as e:  # noqa: BLE001  (the run that lost)
            outcome[who] = e
    ths = [threading.Thread(target=run, args=(w,)) for w in "AB"]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    [winner] = [w for w, r in outcome.items() if r == "ok"]
    [error] = [r for r in outcome.values() if r != "ok"]
    assert type(error).__name__ == "StaleCheckpointError", error
    assert "(namespace 'sub:" in str(error) and "were reverted" in str(error), error
    assert "NOT undone" not in str(error), error
    loser = "B" if winner == "A" else "A"
    assert world.count(("cancel", loser)) == 1 and ("cancel", winner) not in world, world
    assert graph.get_state(config).values["booked"] == standing(world) == [winner]
    store.close()
