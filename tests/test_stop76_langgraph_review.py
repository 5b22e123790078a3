"""Review of the LangGraph saver's cut-off of runs by undos made on the store (stop 76 h5).

Each test failed on the commit under review (``_watch_undo``/``_watch_revert``, c881fda5)
and passes with its fix, on real stores, real threads and LangGraph's own StateGraph,
orderings forced with events:
- a revert reaching one key in each of 20,000 threads took 477 s (8 minutes; 0.26 s
  with no saver): each thread's cut-off read the newest log entry (the revert's target,
  its 20,000 keys decoded each time), grew the undoing context's tuple by one and
  scanned every value cache; now one undo's cut-offs are marked together;
- two reverts of a thread's work under way at once, both refused (nothing changed): the
  one that failed last put back the other's mark, so the run in flight was cut off by
  no undo at all, and its booking reverted (the same for a ``saver.rewind`` and a
  revert of the thread both refused: the rewind's mark stayed);
- an unscoped ``store.rewind`` (or one around threads) made in a graph node was refused
  with a StaleCheckpointError saying the thread "was rewound or deleted" (its own
  transaction refused by the cut-off it had just marked): nothing was undone (before the
  commit it was undone, and the run cut off at its next save, as now);
- the marks of undos of scopes around threads were kept for 64 scopes: at the 65th the
  oldest was forgotten, and a run it had cut off saved the step it undid.
The automatic revert of a revert-cut-off run's unsaved steps is NOT safe: three strict
xfails below show it leaving a booking standing with no checkpoint, and refunding
bookings the thread's saved state (a checkpoint, a task's pending writes) says were made.
"""
from __future__ import annotations

import operator
import threading
import time
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.agent.scope import register_undo_watcher  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.keys import SaverKeys  # noqa: E402

from test_langgraph_findings import book_in, booking_store, plan_graph, standing  # noqa: E402
from test_langgraph_store_undo_cuts_off_runs import Held, book_noted, booking_of  # noqa: E402

WAIT_S = 30


def test_a_revert_reaching_20000_threads_costs_its_size_not_its_square(tmp_path):
    """One key in each of 20,000 threads, reverted with a saver on the store: each
    thread is marked cut off, at the cost of a few dict updates each (counted: the log
    is read twice for the whole revert, not twice per thread)."""
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    keys = SaverKeys(b"lg")
    with store.transaction() as tx:
        for i in range(20000):
            tx.put(keys.thread(f"t{i}") + b"x", 1)
    txid = store.log(limit=1)[0].txid
    reads = []
    log = store.log

    def counted(*a, **k):
        reads.append(1)
        return log(*a, **k)
    store.log = counted
    assert store.revert(txid) is not None
    del store.log
    assert len(reads) <= 4
    from walstore.integrations.langgraph import saver as saver_mod
    reverts = saver_mod._reverts(store)
    assert keys.thread("t0") in reverts and keys.thread("t19999") in reverts
    assert not saver_mod._REMOVING_HERE.get() and not saver_mod._UNDERWAY.get(store)
    assert saver.codec is not None
    store.close()


def _no_watch(store, scope):
    return None


def test_two_reverts_of_a_threads_work_both_refused_cut_off_nothing(tmp_path):
    """Run 2 of thread "a" is in Rome's step when two reverts of the thread's work (its
    Paris and Nice bookings, run 1's) are under way at once, and another undo watcher
    refuses both: the first refused, then the second.  Nothing was reverted, so the run
    goes on and saves every step (before: the second put back the first's mark, the run
    was refused "a store.revert undid work of the thread" and Rome refunded)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    held.graph.invoke({"plan": ["Paris", "Nice"], "booked": []}, config, durability="sync")
    th = held.start("a", ["Rome", "Oslo"])
    told = {c: threading.Event() for c in ("Paris", "Nice")}
    go = {c: threading.Event() for c in ("Paris", "Nice")}

    def refuse(store_, reach):
        city = "Paris" if "booking/Paris" in reach.keys else "Nice"
        told[city].set()
        go[city].wait(WAIT_S)
        raise PermissionError(f"not {city}")
    refused: list = []

    def revert(city: str) -> None:
        try:
            store.revert(booking_of(store, city))
        except PermissionError as e:
            refused.append(e)
    register_undo_watcher(_no_watch, on_revert=refuse)
    try:
        first = threading.Thread(target=revert, args=("Paris",))
        first.start()
        assert told["Paris"].wait(WAIT_S)
        second = threading.Thread(target=revert, args=("Nice",))
        second.start()
        assert told["Nice"].wait(WAIT_S)
        go["Paris"].set()
        first.join(WAIT_S)
        go["Nice"].set()
        second.join(WAIT_S)
    finally:
        register_undo_watcher(_no_watch)
    assert len(refused) == 2
    assert held.finish(th) == []
    assert held.state("a").values["booked"] == ["Paris", "Nice", "Rome", "Oslo"]
    assert standing(world) == ["Nice", "Oslo", "Paris", "Rome"]
    store.close()


_HOLDS: dict = {}   # kind ("rewind", "revert") -> hold(kind): the watchers below, when set


def _hold_rewinds(store, scope):
    hold = _HOLDS.get("rewind")
    return None if hold is None else hold("rewind")


def _hold_reverts(store, reach):
    hold = _HOLDS.get("revert")
    return None if hold is None else hold("revert")


def test_an_end_that_raises_for_one_thread_still_ends_the_others(tmp_path, monkeypatch):
    """A revert reaching threads "a" and "b" is refused after it planned; taking "b"'s
    marks out raises (an interrupt there): "a"'s marks are taken out all the same and no
    thread stays under way (its saves would wait 120 s), the error raised after."""
    from walstore.integrations.langgraph import saver as saver_mod
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    a, b = saver.thread_scope("a"), saver.thread_scope("b")
    with store.transaction() as tx:
        tx.put(a + b"x", 1)
        tx.put(b + b"x", 1)
    txid = store.log(limit=1)[0].txid
    end = saver_mod._CutOff.end

    def failing(self, renewed):
        if self.key == b:
            raise KeyboardInterrupt
        return end(self, renewed)
    monkeypatch.setattr(saver_mod._CutOff, "end", failing)
    _HOLDS["revert"] = lambda kind: (_ for _ in ()).throw(PermissionError("no"))
    register_undo_watcher(_hold_rewinds, on_revert=_hold_reverts)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.revert(txid)
    finally:
        _HOLDS.clear()
        register_undo_watcher(_hold_rewinds)
    assert saver_mod._mark_of(store, "reverts", a) is None
    assert not saver_mod._UNDERWAY.get(store)
    store.close()


def test_a_saver_rewind_and_a_revert_of_the_thread_both_refused_leave_no_mark(tmp_path):
    """``saver.rewind`` of thread "a" and a ``store.revert`` of its work under way at once
    (reverts take no turns with rewinds: their watcher must not wait), both refused, the
    rewind first: the thread has no mark left (before: the revert put back the rewind's,
    so a pending write of the run in flight for a checkpoint not saved yet was refused as
    of a rewound thread)."""
    from walstore.integrations.langgraph import saver as saver_mod
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    held.graph.invoke({"plan": ["Paris", "Nice"], "booked": []}, config, durability="sync")
    first = next(s for s in held.graph.get_state_history(config)
                 if s.values.get("booked") == ["Paris"])
    prefix = saver.thread_scope("a")
    told = {k: threading.Event() for k in ("rewind", "revert")}
    go = {k: threading.Event() for k in ("rewind", "revert")}

    def hold(kind):
        told[kind].set()
        go[kind].wait(WAIT_S)
        raise PermissionError(f"no {kind}")
    refused: list = []

    def attempt(fn) -> None:
        try:
            fn()
        except PermissionError as e:
            refused.append(e)
    _HOLDS.update(rewind=hold, revert=hold)
    register_undo_watcher(_hold_rewinds, on_revert=_hold_reverts)
    try:
        rewind = threading.Thread(target=attempt, args=(lambda: saver.rewind(first.config),))
        rewind.start()
        assert told["rewind"].wait(WAIT_S)
        revert = threading.Thread(target=attempt, args=(
            lambda: store.revert(booking_of(store, "Nice")),))
        revert.start()
        assert told["revert"].wait(WAIT_S)
        go["rewind"].set()
        rewind.join(WAIT_S)
        go["revert"].set()
        revert.join(WAIT_S)
    finally:
        _HOLDS.clear()
        register_undo_watcher(_hold_rewinds)   # (its on_revert dropped; it returns None)
    assert len(refused) == 2
    for kind in ("removals", "rewinds", "reverts"):
        assert saver_mod._mark_of(store, kind, prefix) is None, kind
    store.close()


@pytest.mark.parametrize("scope", [None, b"lg"])
def test_an_undo_around_threads_made_in_a_node_undoes_and_cuts_off_its_own_run(
        tmp_path, scope):
    """A node of thread "a" rewinds the whole store (or every thread: ``b"lg"``) to a
    point before thread "b"'s Rome booking and "a"'s own Oslo step: the rewind is made
    (Rome and Oslo refunded) and "a"'s run is refused at its next save, as before the
    commit under review.  With it, the rewind's own transaction was refused by the
    cut-off it had just marked (StaleCheckpointError "was rewound or deleted while this
    run worked"): nothing was undone and the run went on, booking Lima."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    outcome: list = []

    def node(s):
        here = s["plan"][0]
        if here == "rewind":
            try:
                outcome.append(store.rewind(point, scope=scope) is not None)
            except walstore.errors.WalstoreError as e:
                outcome.append(e)
        else:
            book_in(store, world, here)
        return {"plan": s["plan"][1:], "booked": [here]}
    graph = plan_graph(saver, node)
    b = {"configurable": {"thread_id": "b"}}
    graph.invoke({"plan": ["Paris"], "booked": []}, b)
    point = store.log(limit=1)[0].lsn
    graph.invoke({"plan": ["Rome"], "booked": []}, b)
    with pytest.raises(walstore.errors.ConflictError) as e:
        graph.invoke({"plan": ["Oslo", "rewind", "Lima"], "booked": []},
                     {"configurable": {"thread_id": "a"}}, durability="sync")
    assert outcome == [True]
    assert type(e.value).__name__ == "StaleCheckpointError"
    assert standing(world) == ["Paris"]
    assert graph.get_state(b).values["booked"] == ["Paris"]
    store.close()


def test_a_run_cut_off_by_an_undo_around_threads_stays_cut_off_after_64_others(tmp_path):
    """A ``store.rewind`` scoped around every thread (``b"lg"``) refunds Rome while the
    run of thread "a" is in Rome's step; then 64 other undos of scopes around threads
    (each a prefix of some thread ids) commit.  The run is still refused at its next
    save (before: such marks were kept for 64 scopes, the oldest forgotten at the 65th,
    and the run saved "booked Rome" beside the refund, booking Oslo)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    th = held.start("a", ["Paris", "Rome", "Oslo"])
    point = saver.rewind_point(held.state("a").config)
    assert store.rewind(point, scope=b"lg") is not None
    assert standing(world) == ["Paris"]
    root = SaverKeys(b"lg").root
    for i in range(64):   # (b"lg\x00" + the start of a 5-byte thread id: no whole thread)
        scope = root + b"\xa5z" + bytes([0x30 + i])
        before = store.log(limit=1)[0].lsn
        with store.transaction(scope=scope) as tx:
            tx.put(scope + b"k", i)
        assert store.rewind(before, scope=scope) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    assert held.state("a").values["booked"] == standing(world) == ["Paris"], world
    store.close()


# ---- the automatic revert of a revert-cut-off run's unsaved steps: NOT safe --------------
# (kept as strict xfails: each asserts what should hold and fails on the code as it is;
# see the report of stop 76 h5.  The run's unsaved work is taken from a registry of node
# transactions per step, reverted when one of its saves is refused; for a run cut off by
# another caller's store.revert that refusal races the run's own saves, its open node
# transactions and its pending writes already saved, none of which the lost-run path it
# reuses had to meet: there the refusal comes from the run's own put, and the head moves
# to the rival's line.)
UNSAFE = pytest.mark.xfail(strict=True, reason="automatic revert of a revert-cut-off run's "
                           "unsaved steps (c881fda5): see the stop 76 h5 report")


class Fork(TypedDict):
    booked: Annotated[list, operator.add]


def _fork_graph(saver: WalstoreSaver, fast, slow):
    b = StateGraph(Fork)
    b.add_node("fast", fast)
    b.add_node("slow", slow)
    b.add_edge(START, "fast")
    b.add_edge(START, "slow")
    b.add_edge("fast", END)
    b.add_edge("slow", END)
    return b.compile(checkpointer=saver)


def _book_in_tx(store, world: list, city: str, then=None) -> None:
    with store.transaction() as tx:
        with tx.action("book", args={"city": city}, compensate="cancel") as act:
            world.append(("book", city))
            act.result = {"ok": True}
        if then is not None:
            then()


def _run_in_thread(graph, inp, config, durability: str):
    errors: list = []

    def run() -> None:
        try:
            graph.invoke(inp, config, durability=durability)
        except Exception as e:  # noqa: BLE001  (the run cut off)
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    return th, errors


def _note_refusals(monkeypatch, refused: threading.Event) -> None:
    put_writes = WalstoreSaver.put_writes

    def noted(self, *a, **k):
        try:
            return put_writes(self, *a, **k)
        except walstore.errors.ConflictError:
            refused.set()
            raise
    monkeypatch.setattr(WalstoreSaver, "put_writes", noted)


@UNSAFE
def test_a_node_transaction_still_open_when_a_revert_cut_its_run_off_is_undone_too(
        tmp_path, monkeypatch):
    """Run 2 of thread "a" has two branches in one step: "slow" books Rome and waits
    inside its transaction, "fast" waits outside any.  A revert of run 1's Paris booking
    cuts the run off; "fast" returns, its pending writes are refused and the run's
    unsaved work reverted: "slow"'s transaction, not committed yet, is skipped ("never
    committed"), then commits, and Rome stands with no checkpoint (a retry books it
    again).  A lost run's node transactions conflict at commit (the saver deletes the
    key each read as it began); a revert-cut-off run's do not."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    ev = {k: threading.Event() for k in ("slow", "fast", "go_slow", "go_fast", "refused")}
    second = {"run": False}

    def fast(s):
        if second["run"]:
            ev["fast"].set()
            ev["go_fast"].wait(WAIT_S)
        return {"booked": []}

    def slow(s):
        if not second["run"]:
            book_in(store, world, "Paris")
            return {"booked": ["Paris"]}
        _book_in_tx(store, world, "Rome",
                    then=lambda: (ev["slow"].set(), ev["go_slow"].wait(WAIT_S)))
        return {"booked": ["Rome"]}
    graph = _fork_graph(saver, fast, slow)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"booked": []}, config, durability="sync")
    second["run"] = True
    _note_refusals(monkeypatch, ev["refused"])
    th, errors = _run_in_thread(graph, {"booked": []}, config, "sync")
    assert ev["slow"].wait(WAIT_S) and ev["fast"].wait(WAIT_S)
    assert store.revert(booking_of(store, "Paris")) is not None
    ev["go_fast"].set()
    assert ev["refused"].wait(WAIT_S)
    ev["go_slow"].set()
    th.join(WAIT_S)
    assert not th.is_alive() and errors
    assert standing(world) == [], world     # (Paris by the revert, Rome by the cut-off)
    store.close()


@UNSAFE
def test_a_task_whose_writes_were_saved_before_the_revert_keeps_its_booking(
        tmp_path, monkeypatch):
    """Two branches of one step: "fast" books Rome and returns (its pending writes saved
    at once), "slow" is still running when a revert of run 1's Paris booking cuts the
    run off.  "slow"'s writes are refused and the run's unsaved work reverted -- Rome's
    booking too, though its task's writes stand: the retry resumes from the same
    checkpoint with them, does not run "fast" again, and the thread says Rome is booked
    while the saver itself refunded it."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    ev = {k: threading.Event() for k in ("slow", "go_slow", "refused")}
    second = {"run": False}

    def fast(s):
        if second["run"]:
            _book_in_tx(store, world, "Rome")
            return {"booked": ["Rome"]}
        return {"booked": []}

    def slow(s):
        if not second["run"]:
            book_in(store, world, "Paris")
            return {"booked": ["Paris"]}
        if not ev["go_slow"].is_set():
            ev["slow"].set()
            ev["go_slow"].wait(WAIT_S)
        return {"booked": ["Lima"]}
    graph = _fork_graph(saver, fast, slow)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"booked": []}, config, durability="sync")
    second["run"] = True
    _note_refusals(monkeypatch, ev["refused"])
    th, errors = _run_in_thread(graph, {"booked": []}, config, "sync")
    assert ev["slow"].wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S   # ("fast"'s writes saved)
    while not any(t.name == "fast" and t.result is not None
                  for t in graph.get_state(config).tasks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.revert(booking_of(store, "Paris")) is not None
    ev["go_slow"].set()
    th.join(WAIT_S)
    assert not th.is_alive() and errors and ev["refused"].is_set()
    graph.invoke(None, config, durability="sync")     # (the retry)
    booked = graph.get_state(config).values["booked"]
    assert ("Rome" in booked) == ("Rome" in standing(world)), (booked, world)
    store.close()


@UNSAFE
def test_a_save_in_flight_when_a_revert_cut_its_run_off_is_refused_not_left_half_undone(
        tmp_path, monkeypatch):
    """durability="async": the save of Rome's step has read the marks (none yet) and is
    held in its transaction when a revert of the thread's work cuts the run off; Oslo's
    step is refused and the run's unsaved work reverted, Rome's booking among it.  Then
    the held save commits (a revert's commit meets no undo fence, and nothing the saver
    does fences it): the thread says "booked Rome", Rome refunded by the saver itself."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    ev = {k: threading.Event() for k in ("held", "go_put", "go_oslo")}
    rome_on: list = []

    def node(s):
        here = s["plan"][0]
        if here == "Oslo" and not ev["go_oslo"].is_set():
            ev["go_oslo"].wait(WAIT_S)
        if here == "Rome":
            from langgraph.config import get_config
            rome_on.append(get_config()["configurable"]["checkpoint_map"][""])
        book_noted(store, world, here)
        return {"plan": s["plan"][1:], "booked": [here]}
    graph = plan_graph(saver, node)
    cut_off_in = WalstoreSaver._cut_off_in

    def holding(self, tx, conf, thread_id, ns_name, ns, cid, what):
        cut_off_in(self, tx, conf, thread_id, ns_name, ns, cid, what)
        if what.startswith("a checkpoint") and rome_on and cid == rome_on[0] \
                and not ev["held"].is_set():   # (the save of Rome's step)
            ev["held"].set()
            ev["go_put"].wait(WAIT_S)
    monkeypatch.setattr(WalstoreSaver, "_cut_off_in", holding)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Nice"], "booked": []}, config, durability="sync")
    th, errors = _run_in_thread(graph, {"plan": ["Paris", "Rome", "Oslo"]}, config, "async")
    assert ev["held"].wait(WAIT_S)
    assert store.revert(booking_of(store, "Nice")) is not None
    ev["go_oslo"].set()
    deadline = time.monotonic() + WAIT_S   # (Oslo refused, the run's Rome reverted)
    while ("cancel", "Rome") not in world and time.monotonic() < deadline:
        time.sleep(0.01)
    ev["go_put"].set()
    th.join(WAIT_S)
    assert not th.is_alive() and errors
    booked = graph.get_state(config).values["booked"]
    assert ("Rome" in booked) == ("Rome" in standing(world)), (booked, world)
    store.close()
