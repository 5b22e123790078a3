"""A ``store.rewind`` to a point after a running step's booking leaves no booking unrecorded.

Stop 76 made an undo made on the store itself cut off a LangGraph thread's runs in flight
(test_langgraph_store_undo_cuts_off_runs.py).  Left then (probe h2, stop 77): a
``store.rewind`` to a point LATER than some of a run's step commits — another caller's
``store.rewind(point, scope=saver.thread_scope(t))``, an unscoped one, one around
threads, one to a restore point — leaves those bookings (they are after the point) while
the run is cut off and its checkpoint of the step is refused: the booking stood in the
world with no checkpoint of the thread saying so, and resuming the thread booked again.
Now the refused run reverts, with their compensations, what its nodes committed that no
checkpoint or pending write of the thread records (``WalstoreSaver._undo_cut_off_step``),
once; a booking the thread records (a saved checkpoint of the step, the task's pending
writes) is kept, and one the rewind undid itself is not compensated again.  A
``store.purge`` compensates nothing (as ``delete_thread``): what ran before it stands.
Orderings are forced with events, on real stores and real threads, with LangGraph's own
StateGraph.
"""
from __future__ import annotations

import asyncio
import operator
import threading
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import interrupt  # noqa: E402

from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

from test_langgraph_findings import (Plan, booking_store, hold_save, plan_graph,  # noqa: E402
                                     standing)
from test_langgraph_store_undo_cuts_off_runs import Held, book_noted, booking_of  # noqa: E402

WAIT_S = 30


def _note_in(store, scope, key: str = "side/note") -> None:
    """Another caller's work in ``scope`` (a thread's): something for a rewind to undo."""
    with store.transaction(scope=scope) as tx:
        tx.put(key, 1)


def _wait_for(what, timeout: float = WAIT_S) -> None:
    done = threading.Event()
    for _ in range(int(timeout * 100)):
        if what():
            return
        done.wait(0.01)
    raise AssertionError("timed out")


@pytest.mark.parametrize("how,durability", [
    ("scoped", "sync"), ("unscoped", "sync"), ("around-threads", "sync"),
    ("restore-point", "sync"), ("scoped", "async"), ("scoped", "exit")])
def test_a_store_rewind_to_after_a_running_steps_booking_undoes_it_once(
        tmp_path, how, durability):
    """The probe: the run of thread "a" is in Rome's step, Rome booked; another caller
    takes a point (after the booking), writes in the thread's scope, and rewinds to the
    point.  The run is cut off, its Rome checkpoint refused.  Before: Rome stood,
    booked, no checkpoint saying so; a resume booked it again."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    if durability == "exit":   # (no step checkpoint: Paris is a run of its own)
        held.graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="exit")
        th = held.start("a", {"plan": ["Rome", "Oslo"]}, durability)
    else:
        th = held.start("a", {"plan": ["Paris", "Rome", "Oslo"], "booked": []},
                        durability)
    _wait_for(lambda: held.state("a").values.get("booked") == ["Paris"])
    scope = saver.thread_scope("a")
    if how == "restore-point":
        point = "after-rome"
        store.restore_point(point)
    else:
        point = store.log(limit=1)[0].lsn
    _note_in(store, scope)
    assert store.rewind(point, scope={"unscoped": None, "around-threads": b"lg"}.get(
        how, scope)) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    if durability == "sync":   # (else a node transaction of Oslo's step may be refused first)
        assert "reverted" in str(held.errors[0]), held.errors[0]
    assert held.state("a").values["booked"] == standing(world) == ["Paris"], world
    assert world.count(("cancel", "Rome")) == 1, world
    assert store.get("booking/Rome") is None   # (the booking's own key put back too)
    # the thread goes on from where it was (an "exit" run saved no input: sent again):
    # Rome booked again, once standing
    held.graph.invoke({"plan": ["Rome", "Oslo"]} if durability == "exit" else None,
                      config, durability="sync")
    assert sorted(held.state("a").values["booked"]) == standing(world) == [
        "Oslo", "Paris", "Rome"], world
    assert [w for w in world if w[0] == "cancel"] == [("cancel", "Rome")], world
    store.close()


def test_a_rewind_to_before_the_booking_still_refunds_it_once(tmp_path):
    """The rewind's own point before Rome's booking (Paris's checkpoint): the rewind
    refunds Rome; the refused run finds it undone and compensates nothing again."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    th = held.start("a", {"plan": ["Paris", "Rome", "Oslo"], "booked": []})
    point = saver.rewind_point(held.state("a").config)
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    assert standing(world) == ["Paris"]
    assert held.finish(th) == ["StaleCheckpointError"]
    assert world.count(("cancel", "Rome")) == 1, world
    assert held.state("a").values["booked"] == standing(world) == ["Paris"]
    store.close()


def test_a_booking_of_a_saved_step_the_rewind_took_back_is_undone(tmp_path):
    """The run saved Rome's checkpoint and is in Oslo's step (Oslo booked) when another
    caller rewinds the thread to just after Rome's booking: Rome's pending writes, its
    checkpoint and Oslo's booking are undone by the rewind, Rome's booking is left (it
    is before the point).  Before: it stood, the thread's head Paris's checkpoint."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver, city="Oslo")
    th = held.start("a", {"plan": ["Paris", "Rome", "Oslo", "Nice"], "booked": []})
    point = store.txn_info(booking_of(store, "Rome")).lsn
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    assert held.state("a").values["booked"] == standing(world) == ["Paris"], world
    assert world.count(("cancel", "Rome")) == world.count(("cancel", "Oslo")) == 1, world
    assert "Nice" not in standing(world)
    store.close()


class Two(TypedDict):
    booked: Annotated[list, operator.add]


def _booking_node(store, world: list, city: str, booked: threading.Event | None = None,
                  wait: threading.Event | None = None):
    """A node of a ``Two`` graph booking ``city`` (``book_noted``), then setting ``booked``
    and waiting for ``wait``, when given."""
    def node(s: Two) -> dict:
        book_noted(store, world, city)
        if booked is not None:
            booked.set()
        if wait is not None:
            assert wait.wait(WAIT_S)
        return {"booked": [city]}
    return node


def _two_branches(store, world, saver, hold_a: threading.Event | None):
    """Two nodes in one superstep: "a" books Lima (waiting for ``hold_a`` first when
    given, once booked), "b" books Quito and waits for ``release`` once booked."""
    a_booked, b_booked, release = (threading.Event() for _ in range(3))

    g = StateGraph(Two)
    g.add_node("a", _booking_node(store, world, "Lima", a_booked, hold_a))
    g.add_node("b", _booking_node(store, world, "Quito", b_booked, release))
    g.add_edge(START, "a")
    g.add_edge(START, "b")
    g.add_edge("a", END)
    g.add_edge("b", END)
    return g.compile(checkpointer=saver), a_booked, b_booked, release


def _writes_saved(saver, city: str) -> bool:
    """Are the pending writes of ``city``'s task saved on thread "a"'s head?  (Not "a
    put_writes commit after the booking": the run's input's writes, saved in the
    background, may land after the booking too, and were taken for the task's.)"""
    head = saver.get_tuple({"configurable": {"thread_id": "a"}})
    return head is not None and any(ch == "booked" and v == [city]
                                    for _task, ch, v in head.pending_writes or ())


@pytest.mark.parametrize("writes", ["before-the-point", "after-the-point"])
def test_parallel_branches_keep_the_booking_their_pending_writes_record(tmp_path, writes):
    """Branch "a" booked Lima and its pending writes were saved (before the rewind's
    point, or after it: undone by the rewind); branch "b" booked Quito and is still in
    its node when the thread is rewound to a point after both bookings.  Lima is kept
    when its writes stand (LangGraph takes its task as done: a resume runs "b" alone),
    else refunded; Quito is refunded.  Before: Quito stood (and Lima with its writes
    undone), and the resume booked them again."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    hold_a = threading.Event() if writes == "after-the-point" else None
    graph, a_booked, b_booked, release = _two_branches(store, world, saver, hold_a)
    config = {"configurable": {"thread_id": "a"}}
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"booked": []}, config, durability="sync")
        except Exception as e:  # noqa: BLE001
            errors.append(type(e).__name__)
    th = threading.Thread(target=run)
    th.start()
    assert a_booked.wait(WAIT_S) and b_booked.wait(WAIT_S)
    if hold_a is None:
        _wait_for(lambda: _writes_saved(saver, "Lima"))
    point = store.log(limit=1)[0].lsn
    if hold_a is not None:
        hold_a.set()
        _wait_for(lambda: _writes_saved(saver, "Lima"))
    else:
        _note_in(store, saver.thread_scope("a"))
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    release.set()
    th.join(WAIT_S * 2)
    assert errors == ["StaleCheckpointError"]
    kept = ["Lima"] if hold_a is None else []
    assert standing(world) == kept, world
    assert world.count(("cancel", "Quito")) == 1
    assert world.count(("cancel", "Lima")) == (0 if kept else 1), world
    graph.invoke(None, config, durability="sync")   # (resume: what is not done runs)
    assert sorted(graph.get_state(config).values["booked"]) == standing(world) == [
        "Lima", "Quito"], world
    assert world.count(("book", "Lima")) == (1 if kept else 2), world
    store.close()


def test_writes_saved_before_their_checkpoint_the_rewind_took_back_record_nothing(
        tmp_path, monkeypatch):
    """durability="async": the save of the checkpoint after Rome's step waits, while Rome's
    task saves its pending writes on it (they commit first) and Oslo's step books; the
    thread is rewound to a point between Rome's writes and that checkpoint's save.  Rome's
    writes stand on a checkpoint no longer there: no resume loads them, the thread's head
    is Paris's checkpoint, and a resume books Rome again — so Rome is refunded (h4, stop
    77: its writes were taken as recording it, it stood, and Rome was booked twice)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    saved = threading.Event()
    hold_save(monkeypatch, 1, saved)
    held = Held(store, world, saver, city="Oslo")
    th = held.start("a", {"plan": ["Paris", "Rome", "Oslo"], "booked": []}, "async")
    rome = store.txn_info(booking_of(store, "Rome")).lsn
    _wait_for(lambda: any((i.meta or {}).get("langgraph") == "put_writes" and i.lsn > rome
                          for i in store.log(limit=4)))
    # (Paris's checkpoint is saved in the background too: it may land after Rome's writes,
    # and the point must lie after it, or the rewind takes Paris back as well)
    _wait_for(lambda: held.state("a").values.get("booked") == ["Paris"])
    point = store.log(limit=1)[0].lsn
    saved.set()   # (Rome's checkpoint saved after the point)
    # (among the newest commits, not the newest alone: under load another commit of the
    # run can land after the put before a poll sees it -- CI timed out so, stop 81)
    _wait_for(lambda: any((i.meta or {}).get("langgraph") == "put" and i.lsn > point
                          for i in store.log(limit=8)))
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    monkeypatch.undo()
    assert held.state("a").values["booked"] == standing(world) == ["Paris"], world
    assert world.count(("cancel", "Rome")) == world.count(("cancel", "Oslo")) == 1, world
    held.graph.invoke(None, {"configurable": {"thread_id": "a"}}, durability="sync")
    assert standing(world) == ["Oslo", "Paris", "Rome"], world   # (each once)
    store.close()


def test_the_saved_steps_node_transactions_are_capped_in_number(tmp_path, monkeypatch):
    """The node transactions of saved steps kept for a cut-off run's undo are capped in
    number, not only in steps (h4, stop 77: a node making 20,000 transactions a step kept
    4 MiB a step, up to 4,096 steps); dropping the oldest never reverts a kept step's
    booking, and the running step's is still undone."""
    from walstore.integrations.langgraph import saver as saver_module
    monkeypatch.setattr(saver_module, "_SAVED_TXNS_MAX", 30, raising=False)
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    booked, release = threading.Event(), threading.Event()

    def book(s: Plan) -> dict:
        here = s["plan"][0]
        book_noted(store, world, here)
        for i in range(9):
            _note_in(store, saver.thread_scope("a"), f"{here}/{i}")
        if here == "C6":
            booked.set()
            assert release.wait(WAIT_S)
        return {"plan": s["plan"][1:], "booked": [here]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"plan": [f"C{i}" for i in range(8)], "booked": []}, config,
                         durability="sync")
        except Exception as e:  # noqa: BLE001
            errors.append(type(e).__name__)
    th = threading.Thread(target=run)
    th.start()
    assert booked.wait(WAIT_S)
    kept = saver_module._saved_steps(store)
    assert sum(len(txns) for _cid, txns in kept.values()) <= 30, len(kept)
    point = store.log(limit=1)[0].lsn
    _note_in(store, saver.thread_scope("a"))
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    release.set()
    th.join(WAIT_S * 2)
    assert errors == ["StaleCheckpointError"]
    assert standing(world) == [f"C{i}" for i in range(6)], world
    assert [w for w in world if w[0] == "cancel"] == [("cancel", "C6")], world
    store.close()


def test_an_async_run_cut_off_by_a_store_rewind_to_after_its_booking(tmp_path):
    """``ainvoke`` with an async node: its booking (in ``asyncio.to_thread``) made, the
    node waiting, when the thread is rewound to a point after it."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    booked, release = threading.Event(), threading.Event()

    async def book(s: Plan) -> dict:
        here = s["plan"][0]
        await asyncio.to_thread(book_noted, store, world, here)
        if here == "Rome":
            booked.set()
            assert await asyncio.to_thread(release.wait, WAIT_S)
        return {"plan": s["plan"][1:], "booked": [here]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    errors: list = []

    def run() -> None:
        try:
            asyncio.run(graph.ainvoke({"plan": ["Paris", "Rome", "Oslo"], "booked": []},
                                      config, durability="sync"))
        except Exception as e:  # noqa: BLE001
            errors.append(type(e).__name__)
    th = threading.Thread(target=run)
    th.start()
    assert booked.wait(WAIT_S)
    point = store.log(limit=1)[0].lsn
    _note_in(store, saver.thread_scope("a"))
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    release.set()
    th.join(WAIT_S * 2)
    assert errors == ["StaleCheckpointError"]
    assert graph.get_state(config).values["booked"] == standing(world) == ["Paris"], world
    assert world.count(("cancel", "Rome")) == 1
    store.close()


def test_a_node_interrupting_after_the_rewind_has_its_booking_undone(tmp_path):
    """The node books Rome, waits, then asks (``interrupt()``): the thread was rewound
    to a point after the booking meanwhile, so the interrupt's save is refused; Rome,
    recorded nowhere, is refunded."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver, then=lambda: interrupt("Rome booked: keep it?"))
    th = held.start("a", {"plan": ["Paris", "Rome"], "booked": []})
    point = store.log(limit=1)[0].lsn
    _note_in(store, saver.thread_scope("a"))
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    state = held.state("a")
    assert state.values["booked"] == standing(world) == ["Paris"], world
    assert not any(t.interrupts for t in state.tasks)   # (the interrupt was not saved)
    assert world.count(("cancel", "Rome")) == 1
    store.close()


def test_a_store_purge_of_the_thread_compensates_nothing(tmp_path):
    """``store.purge`` of the thread while the run is in Rome's step: the thread is
    erased, nothing compensated (as ``delete_thread``: a purge undoes no work), and the
    run saves nothing into it."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    th = held.start("a", {"plan": ["Paris", "Rome", "Oslo"], "booked": []})
    store.purge(saver.thread_scope("a"))
    assert held.finish(th) == ["StaleCheckpointError"]
    assert "reverted" not in str(held.errors[0])
    assert standing(world) == ["Paris", "Rome"] and ("cancel", "Rome") not in world
    assert held.state("a").values == {}
    assert list(store.scan(prefix=saver.thread_scope("a"))) == []
    store.close()


@pytest.mark.parametrize("order", ["rewind-then-purge", "purge-then-rewind",
                                   "rewind-then-delete_thread"])
def test_a_thread_erased_as_well_as_rewound_compensates_nothing(tmp_path, order):
    """The run is in Oslo's step (Paris and Rome saved, Oslo booked) when the thread is
    both rewound (to a point after Oslo's booking, undoing another caller's note) and
    erased (``store.purge`` or ``delete_thread``), in either order: as the erasure alone,
    nothing is compensated.  Before (h4, stop 77): the run's refused save found none of
    its checkpoints (erased) and reverted every booking it made, Paris and Rome too."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver, city="Oslo")
    th = held.start("a", {"plan": ["Paris", "Rome", "Oslo", "Nice"], "booked": []})
    scope = saver.thread_scope("a")

    def rewind() -> None:
        point = store.log(limit=1)[0].lsn
        _note_in(store, scope)
        assert store.rewind(point, scope=scope) is not None

    def erase() -> None:
        if order.endswith("delete_thread"):
            saver.delete_thread("a")
        else:
            store.purge(scope)
    for step in ((rewind, erase) if order.startswith("rewind") else (erase, rewind)):
        step()
    assert held.finish(th) == ["StaleCheckpointError"]
    assert "reverted" not in str(held.errors[0])
    assert standing(world) == ["Oslo", "Paris", "Rome"], world
    assert not any(w[0] == "cancel" for w in world), world
    store.close()


def test_a_subgraphs_bookings_are_judged_by_its_parent_task(tmp_path):
    """A subgraph's first node booked Paris (its step saved in the subgraph's namespace),
    its second booked Rome and waits when the thread is rewound to a point after both.
    The parent's task never saved its writes, and resuming the thread runs it — the
    whole subgraph — again: both bookings are refunded (before: both stood, and the
    resume booked them a second time).  The saver's undo, made from the subgraph's
    save, is not taken for a node transaction of the cut-off run (it was refused so)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    booked, release = threading.Event(), threading.Event()

    sb = StateGraph(Two)
    sb.add_node("paris", _booking_node(store, world, "Paris"))
    sb.add_node("rome", _booking_node(store, world, "Rome", booked, release))
    sb.add_edge(START, "paris")
    sb.add_edge("paris", "rome")
    sb.add_edge("rome", END)
    g = StateGraph(Two)
    g.add_node("trip", sb.compile())
    g.add_edge(START, "trip")
    g.add_edge("trip", END)
    graph = g.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "a"}}
    errors: list = []

    def run() -> None:
        try:
            graph.invoke({"booked": []}, config, durability="sync")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    assert booked.wait(WAIT_S)
    point = store.log(limit=1)[0].lsn
    _note_in(store, saver.thread_scope("a"))
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    release.set()
    th.join(WAIT_S * 2)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert "NOT undone" not in str(errors[0]), errors[0]
    assert graph.get_state(config).values["booked"] == standing(world) == [], world
    graph.invoke(None, config, durability="sync")
    assert sorted(graph.get_state(config).values["booked"]) == standing(world) == [
        "Paris", "Rome"], world
    store.close()


def test_an_undo_made_in_a_node_is_never_reverted_with_the_runs_bookings(tmp_path):
    """A node of thread "a" books Lima, then rewinds the whole store to a point after
    that booking (undoing another caller's note).  Its own run is cut off at its next
    save: Lima is refunded once, and the rewind itself — a transaction begun in the node,
    noted as the run's — is not reverted (the note stays undone)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    made: list = []

    def node(s: Plan) -> dict:
        here = s["plan"][0]
        book_noted(store, world, here)
        if here == "Lima":
            point = store.log(limit=1)[0].lsn
            _note_in(store, saver.thread_scope("b"), "b/note")
            made.append(store.rewind(point) is not None)
        return {"plan": s["plan"][1:], "booked": [here]}
    graph = plan_graph(saver, node)
    config = {"configurable": {"thread_id": "a"}}
    with pytest.raises(Exception) as e:
        graph.invoke({"plan": ["Paris", "Lima", "Oslo"], "booked": []}, config,
                     durability="sync")
    assert made == [True]
    assert type(e.value).__name__ == "StaleCheckpointError"
    assert "NOT undone" not in str(e.value), e.value
    assert store.get("b/note") is None
    assert graph.get_state(config).values["booked"] == standing(world) == ["Paris"], world
    assert world.count(("cancel", "Lima")) == 1
    store.close()
