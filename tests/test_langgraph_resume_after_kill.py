"""A LangGraph run killed (SIGKILL) mid-node after its booking committed: a plain resume
after the restart (``graph.invoke(None, config)``, ``ainvoke``) first undoes the killed
step's bookings that nothing records, so the step runs whole once and books once
(``WalstoreSaver._undo_on_resume``).  Real processes, real files, and an outside ledger
(a file the booking and the compensation append to, fsynced) as the world.

Before, the resume ran the killed node again and it booked again: two live bookings in
the world, one in the graph's state (docs/GUIDE.md told users to rewind the thread to its
head by hand first).  The child is tests/findings_scripts/langgraph_resume_kill_child.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402

SCRIPTS = Path(__file__).parent / "findings_scripts"
sys.path.insert(0, str(SCRIPTS))
from langgraph_resume_kill_child import build, cancel_into, ledger  # noqa: E402

CONFIG = {"configurable": {"thread_id": "t"}}
LOGGER = "walstore.integrations.langgraph.saver"


def killed(tmp_path: Path, kind: str, durability: str, mode: str = "run",
           marker: str = "marker") -> tuple[str, str]:
    """Run the child in ``mode`` (see its doc) until it wrote ``marker``, then SIGKILL
    it; (store path, ledger path)."""
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    mark = tmp_path / marker
    args = [sys.executable, str(SCRIPTS / "langgraph_resume_kill_child.py"), kind,
            store_path, path, str(mark), durability, mode]
    child = subprocess.Popen(args, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert child.poll() is None, f"the child exited with {child.returncode}"
            assert time.monotonic() < deadline, "the child never reached its marker"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return store_path, path


def live(path: str) -> list[str]:
    """The bookings standing in the world; each cancellation once at most."""
    booked, cancelled = ledger(path)
    assert len(cancelled) == len(set(cancelled)), f"cancelled twice: {cancelled}"
    return [b for b in booked if b not in cancelled]


def bookings(values: dict) -> list[str]:
    return [v for v in values["log"] if "-" in v]


@pytest.mark.parametrize("durability, call", [("sync", "invoke"), ("async", "invoke"),
                                              ("async", "ainvoke"), ("sync", "ainvoke")])
def test_a_resume_after_a_kill_undoes_the_killed_booking_first(tmp_path, caplog,
                                                                durability, call):
    store_path, path = killed(tmp_path, "single", durability)
    (first,), cancelled = ledger(path)
    assert cancelled == []
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "single")
        head = graph.get_state(CONFIG)
        assert head.next == ("book",) and head.values == {"log": ["planned"]}
        booking = list(store.actions())[0]
        if durability == "async":   # (the head's background save landed after it)
            assert store.txn_info(booking.txid).lsn < saver.checkpoint_lsn(head.config)

        with caplog.at_level(logging.WARNING, logger=LOGGER):
            if call == "invoke":
                out = graph.invoke(None, CONFIG, durability=durability)
            else:
                out = asyncio.run(graph.ainvoke(None, CONFIG, durability=durability))
        # the killed booking cancelled once, one booking live, the state says the same
        (second,) = live(path)
        assert ledger(path) == ([first, second], [first])
        assert out == {"log": ["planned", second]}
        assert graph.get_state(CONFIG).values == {"log": ["planned", second]}
        assert store.get_action(booking.id).state == "compensated"
        # visible: a record on the saver, a WARNING naming the thread and the txid
        (undo,) = saver.resume_undos
        assert (undo.thread_id, undo.checkpoint_id, undo.undone, undo.kept, undo.left) == (
            "t", head.config["configurable"]["checkpoint_id"], (booking.txid,), (), ())
        (record,) = [r for r in caplog.records if r.name == LOGGER]
        assert record.levelno == logging.WARNING
        assert "'t'" in record.getMessage() and str(booking.txid) in record.getMessage()

        graph.invoke(None, CONFIG)   # (nothing left to run; nothing undone again)
        assert live(path) == [second] and len(saver.resume_undos) == 1
    finally:
        store.close()


def test_a_parallel_branch_that_finished_is_kept_and_the_killed_one_undone(tmp_path):
    store_path, path = killed(tmp_path, "parallel", "sync")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "parallel")
        (fast,) = [b for b in ledger(path)[0] if b.startswith("fast")]
        (slow,) = [b for b in ledger(path)[0] if b.startswith("slow")]
        txid = {a.args["id"]: a.txid for a in store.actions()}
        assert graph.get_state(CONFIG).next == ("slow",)   # (fast's writes are saved)

        graph.invoke(None, CONFIG)
        # LangGraph runs slow alone again: fast's booking stands, slow's first is cancelled
        (again,) = [b for b in live(path) if b.startswith("slow")]
        assert ledger(path)[1] == [slow] and sorted(live(path)) == sorted([fast, again])
        assert sorted(bookings(graph.get_state(CONFIG).values)) == sorted([fast, again])
        (undo,) = saver.resume_undos
        assert (undo.undone, undo.kept, undo.left) == ((txid[slow],), (txid[fast],), ())
    finally:
        store.close()


def test_an_interrupted_task_is_kept_and_langgraph_runs_it_again(tmp_path):
    # (an interrupt is no crash: its task's outcome, the INTERRUPT write, is saved after
    # what it did, which stands as it does when the same process resumes it; LangGraph
    # runs the node again from its start, so a booking made before interrupt() is made
    # again -- book after interrupt(), as LangGraph's docs advise for side effects)
    from langgraph.types import Command
    store_path, path = killed(tmp_path, "interrupt", "sync")
    (first,), _ = ledger(path)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        assert graph.get_state(CONFIG).interrupts
        graph.invoke(Command(resume="yes"), CONFIG)
        booked, cancelled = ledger(path)
        assert cancelled == [] and booked[0] == first and len(booked) == 2
        assert graph.get_state(CONFIG).values == {"log": [booked[1], "yes"]}
        (undo,) = saver.resume_undos
        txid = {a.args["id"]: a.txid for a in store.actions()}
        assert (undo.undone, undo.kept, undo.left) == ((), (txid[first],), ())
    finally:
        store.close()


def test_an_interrupted_task_killed_after_its_answer_keeps_only_what_came_before(
        tmp_path):
    # (the run that answered the interrupt ran ``ask`` again, booked, and was killed:
    # that booking came after the task's saved outcome (its interrupt), so it is undone;
    # the booking made before the interrupt stays, as above)
    store_path, path = killed(tmp_path, "interrupt", "sync")
    (first,), _ = ledger(path)
    killed(tmp_path, "interrupt", "sync", "answer", marker="answered")
    (_, second), _ = ledger(path)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        txid = {a.args["id"]: a.txid for a in store.actions()}
        graph.invoke(None, CONFIG)   # (LangGraph finds the answer saved and runs ``ask``)
        booked, cancelled = ledger(path)
        assert booked[:2] == [first, second] and cancelled == [second]
        assert live(path) == [first, booked[2]]
        assert graph.get_state(CONFIG).values == {"log": [booked[2], "yes"]}
        (undo,) = saver.resume_undos
        assert (undo.undone, undo.kept) == ((txid[second],), (txid[first],))
    finally:
        store.close()


def test_a_subgraph_task_is_undone_whole_and_runs_again_whole(tmp_path):
    # (judged at the outermost graph: the ``sub`` task saved no outcome, so both of its
    # bookings go, with the subgraph's own saves, and LangGraph runs it again from s1)
    store_path, path = killed(tmp_path, "subgraph", "sync")
    (s1, s2), _ = ledger(path)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "subgraph")
        graph.invoke(None, CONFIG)
        booked, cancelled = ledger(path)
        assert sorted(cancelled) == sorted([s1, s2]) and len(live(path)) == 2
        assert bookings(graph.get_state(CONFIG).values) == live(path)
        assert len(saver.resume_undos) == 1 and not saver.resume_undos[0].left
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["single", "parallel"])
def test_node_transactions_stamped_by_an_older_walstore(tmp_path, caplog, kind):
    # (no task named in their meta: alone in its step the killed booking is undone;
    # beside a task whose outcome is saved, whose is which cannot be told -- both are
    # left, named in the warning and in ``left``, for a rewind by hand)
    store_path, path = killed(tmp_path, kind, "sync", "legacy")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, kind)
        txids = sorted(a.txid for a in store.actions())
        assert "langgraph_task" not in store.txn_info(txids[0]).meta
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            graph.invoke(None, CONFIG)
        (undo,) = saver.resume_undos
        if kind == "single":
            assert undo.undone == tuple(txids) and not undo.left
            assert len(ledger(path)[1]) == 1 and len(live(path)) == 1
        else:
            assert undo.undone == () and sorted(int(x.split()[0]) for x in undo.left) \
                == txids
            assert ledger(path)[1] == [] and len(live(path)) == 3
            assert "NOT undone" in caplog.records[-1].getMessage()
    finally:
        store.close()


def test_get_state_and_a_read_only_open_write_nothing_and_the_resume_undoes(tmp_path):
    store_path, path = killed(tmp_path, "single", "sync")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:   # (the writer's open recovers the store; closed, read-only opens may follow)
        end = store.log(limit=1)[0].lsn
        graph, saver = build(store, path, "single")
        assert graph.get_state(CONFIG).next == ("book",)
        list(graph.get_state_history(CONFIG))
        assert store.log(limit=1)[0].lsn == end and live(path) == ledger(path)[0]
        assert not saver.resume_undos
    finally:
        store.close()
    reader = walstore.open(store_path, readonly=True)
    try:
        graph, saver = build(reader, path, "single")
        with pytest.raises(walstore.errors.ReadOnlyError):
            graph.invoke(None, CONFIG)   # (refused by a write of the run, not its load)
        assert reader.log(limit=1)[0].lsn == end and not saver.resume_undos
        assert ledger(path)[1] == []
    finally:
        reader.close()
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "single")
        graph.invoke(None, CONFIG)
        assert len(live(path)) == 1 and len(ledger(path)[1]) == 1
        assert bookings(graph.get_state(CONFIG).values) == live(path)
    finally:
        store.close()


def test_two_runs_resuming_at_once_undo_the_killed_booking_once(tmp_path):
    store_path, path = killed(tmp_path, "single", "sync")
    (first,), _ = ledger(path)
    cancel = cancel_into(path)

    def slow_cancel(action) -> None:   # (the other run arrives while this one undoes)
        time.sleep(0.3)
        cancel(action)
    store = walstore.open(store_path, compensators={"cancel": slow_cancel})
    try:
        graph, saver = build(store, path, "single")
        start, errors = threading.Barrier(2), []

        def resume() -> None:
            start.wait()
            try:
                graph.invoke(None, CONFIG)
            except walstore.ConflictError as e:   # (StaleCheckpointError: lost the race,
                errors.append(e)                    # its own booking undone)
        runs = [threading.Thread(target=resume) for _ in range(2)]
        for r in runs:
            r.start()
        for r in runs:
            r.join(60)
        booked, cancelled = ledger(path)
        assert cancelled.count(first) == 1
        assert len(live(path)) == 1 and len(errors) <= 1
        assert bookings(graph.get_state(CONFIG).values) == live(path)
        txid = {a.args["id"]: a.txid for a in store.actions()}
        assert [u.undone for u in saver.resume_undos] == [(txid[first],)]
    finally:
        store.close()


def test_a_kill_during_the_resume_undo_still_ends_with_one_booking(tmp_path):
    store_path, path = killed(tmp_path, "single", "sync")
    (first,), _ = ledger(path)
    # the second process resumes; its undo's compensation is killed before it cancels
    killed(tmp_path, "single", "sync", "undo", marker="cancelling")
    assert ledger(path) == ([first], [])
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:   # (recovery runs the compensation the kill cut short; the resume undoes no more)
        assert ledger(path) == ([first], [first])
        graph, saver = build(store, path, "single")
        graph.invoke(None, CONFIG)
        (second,) = live(path)
        assert ledger(path) == ([first, second], [first])
        assert graph.get_state(CONFIG).values == {"log": ["planned", second]}
        assert not saver.resume_undos   # (undone already, by the killed resume)
    finally:
        store.close()


def test_undo_on_resume_false_leaves_the_killed_booking_as_before(tmp_path):
    store_path, path = killed(tmp_path, "single", "sync")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        with pytest.raises(TypeError, match="undo_on_resume"):
            build(store, path, "single", undo_on_resume="no")
        graph, saver = build(store, path, "single", undo_on_resume=False)
        graph.invoke(None, CONFIG)
        assert len(live(path)) == 2 and not saver.resume_undos   # (two bookings: the
        # step ran again beside the killed one's, which the state does not mention)
    finally:
        store.close()
