"""A LangGraph run killed (SIGKILL) before its thread had any checkpoint -- a new
thread's first run under ``durability="exit"``, which saves nothing before the run ends
-- left its bookings standing with nothing recording them, and the next run, starting
the thread over from its input, booked again (a documented limit until stop 79).  The
first run of each open that finds the thread empty now sets the thread's fresh-start mark
(where in the log that run began), and reverts first what an earlier open's run on the
empty thread committed after its mark (``WalstoreSaver._undo_on_fresh_start``).  What
removes a thread's checkpoints without compensating (``delete_thread``,
``delete_for_runs``) removes the mark too, and ``copy_thread`` neither copies it nor
takes it for something stored.  Real children of tools/langgraph_kill_soak.py, SIGKILLed;
the outside ledger fsynced.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402
from tools import langgraph_kill_soak as soak  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_langgraph_resume_after_kill_soak import killed_in, live_by_node, spec  # noqa: E402


def recorded_is_live(graph, path: str) -> None:
    ledger = soak.read_ledger(path)
    cancelled = {w[4] for w in ledger if w[0] == "cancel"}
    assert len(cancelled) == len([w for w in ledger if w[0] == "cancel"])   # (once each)
    live = sorted(w[4] for w in ledger if w[0] == "book" and w[4] not in cancelled)
    assert sorted(graph.get_state(soak.CONFIG).values["ran"]) == live


def test_a_resume_killed_again_before_the_first_checkpoint_is_undone_too(tmp_path):
    # (killed in n1; the next process undoes n0 and n1, books them again and is killed
    # in n1 too, still with no checkpoint; the third undoes the second's and books once)
    store_path, path = killed_in(tmp_path, spec(), "n1")
    os.remove(path + ".held")
    again = soak.Child("resume", {**spec(), "hold": "n1"}, store_path, path)
    got = soak.kill_at(again, ("held",), path)
    assert got["killed"], (got, again.err.decode()[-2000:])
    assert b"had no checkpoint" in again.err   # (its undo was told, WARNING)
    assert [w[0] for w in soak.read_ledger(path)] == ["book"] * 2 + ["cancel"] * 2 + \
        ["book"] * 2
    store = walstore.open(store_path, compensators=soak.compensators(path))
    try:
        graph, saver = soak.build(store, path, spec())
        soak.resume(graph, spec(), 1)
        assert live_by_node(path) == {"n0": 1, "n1": 1, "n2": 1}
        recorded_is_live(graph, path)
        (undo,) = saver.resume_undos
        assert undo.checkpoint_id is None and len(undo.undone) == 2
    finally:
        store.close()


@pytest.mark.parametrize("erase", ["delete_thread", "delete_for_runs"])
def test_a_thread_erased_then_run_again_after_a_restart_compensates_nothing(
        tmp_path, erase):
    # (a finished run, the thread erased -- which compensates nothing -- then, in a new
    # open, a run on the empty thread: it must not take the erased run's bookings for a
    # killed run's.  Before delete_for_runs removed the mark, it refunded all three)
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    sp = spec()
    run_id = str(uuid.uuid4())
    with walstore.open(store_path, compensators=soak.compensators(path)) as store:
        graph, saver = soak.build(store, path, sp)
        graph.invoke({"rnd": 1, "ran": []}, {**soak.CONFIG, "metadata": {"run_id": run_id}},
                     durability="exit")
        if erase == "delete_thread":
            saver.delete_thread("t")
        else:
            saver.delete_for_runs([run_id])
        assert list(saver.list(soak.CONFIG)) == []
    with walstore.open(store_path, compensators=soak.compensators(path)) as store:
        graph, saver = soak.build(store, path, sp)
        soak.resume(graph, sp, 1)
        assert [w[0] for w in soak.read_ledger(path)] == ["book"] * 6
        assert list(saver.resume_undos) == []


def test_copy_thread_leaves_the_fresh_start_mark_behind(tmp_path):
    # (the source's mark is its runs', not the copy's; a thread holding only its mark --
    # a run on it began and saved nothing -- is an empty target, as it was before)
    store_path, path = killed_in(tmp_path, spec(), "n1")   # ("t": its mark, no checkpoint)
    with walstore.open(store_path, compensators=soak.compensators(path)) as store:
        graph, saver = soak.build(store, path, spec())
        src = {"configurable": {"thread_id": "src"}}
        graph.invoke({"rnd": 1, "ran": []}, src, durability="exit")
        mark = saver.keys.fresh_start
        assert store.get(mark(saver.thread_scope("src"))) is not None
        assert store.get(mark(saver.thread_scope("t"))) is not None
        saver.copy_thread("src", "copy")
        assert store.get(mark(saver.thread_scope("copy"))) is None
        saver.copy_thread("src", "t")
        assert graph.get_state(soak.CONFIG).values == graph.get_state(src).values
