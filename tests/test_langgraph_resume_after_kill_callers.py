"""A functional-API ``@task``'s work is recorded by its caller's saved result too (stop
79): LangGraph saves a finished ``@task``'s result and its caller's (the
``@entrypoint``'s return) in parallel, in background threads, so a process killed
between them -- or a rewind to a point between them -- can leave the caller's result
saved and the task's not.  A resume then takes the caller as done: it returns the
caller's saved result, which holds the task's booking, and never calls the task again.

Before, the judgement (``WalstoreSaver._step_recorded``) looked at the task's own
saved outcome only: a resume after the kill (``_undo_on_resume``) and a rewind's
cut-off run (``_undo_cut_off_step``) refunded the booking the state then recorded
("recorded-but-cancelled": found by tools/langgraph_kill_soak.py, seed 4 round 16, in
stop 78's final CI run).  Node transactions now name the tasks that called theirs
(``langgraph_callers`` beside ``langgraph_task`` in their meta), and a caller's regular
outcome saved after the work keeps it.  Real processes killed (SIGKILL) and the fsynced
outside ledger of tests/test_langgraph_resume_after_kill.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402

SCRIPTS = Path(__file__).parent / "findings_scripts"
sys.path.insert(0, str(SCRIPTS))
from langgraph_resume_kill_child import build, cancel_into, ledger  # noqa: E402
from test_langgraph_resume_after_kill import CONFIG, killed, live  # noqa: E402
from test_langgraph_resume_after_kill_review import run_cut_off  # noqa: E402


def test_a_resume_killed_between_the_entrypoints_save_and_its_tasks_keeps_the_task(
        tmp_path):
    # (1: killed in ``second`` after its booking; 2: a resume undoes that booking, books
    # ``second`` again, and dies once the entrypoint's result -- holding the new
    # booking -- was saved, before ``second``'s own result and the step's checkpoint;
    # 3: this resume returns the entrypoint's saved result and must keep its booking)
    store_path, path = killed(tmp_path, "functional", "sync")
    first, second = ledger(path)[0]
    racing = subprocess.run(
        [sys.executable, str(SCRIPTS / "langgraph_resume_kill_child.py"), "functional",
         store_path, path, str(tmp_path / "unused"), "sync", "racing"],
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True,
        timeout=120)
    assert racing.returncode == -9, racing.stderr.decode()[-2000:]
    booked, cancelled = ledger(path)
    assert cancelled == [second] and booked[:2] == [first, second]
    (again,) = booked[2:]
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        trip, saver = build(store, path, "functional")
        txid = {a.args["id"]: a.txid for a in store.actions()}
        out = trip.invoke(None, CONFIG)
        assert out == {"log": [first, again]}
        assert ledger(path) == (booked, [second])   # (nothing booked or cancelled)
        assert sorted(live(path)) == sorted(out["log"])
        (undo,) = saver.resume_undos
        assert undo.undone == () and set(undo.kept) == {txid[first], txid[again]}
        meta = store.txn_info(txid[again]).meta   # (its caller, the entrypoint's task)
        assert len(meta["langgraph_callers"]) == 1 and meta["langgraph_task"] not in \
            meta["langgraph_callers"]
    finally:
        store.close()


def test_a_rewind_between_the_entrypoints_save_and_its_tasks_keeps_the_task(tmp_path):
    # (one process: ``second`` books, the entrypoint's result is saved, then a restore
    # point; ``second``'s own result is saved after it, so a store.rewind to the point
    # takes it back and cuts the run off -- the entrypoint's saved result still records
    # the booking, and a resume returns it)
    path = str(tmp_path / "ledger")
    store = walstore.open(str(tmp_path / "s"), compensators={"cancel": cancel_into(path)})
    try:
        trip, saver = build(store, path, "functional")
        put_writes, put = saver.put_writes, saver.put
        entry_saved, point_taken = threading.Event(), threading.Event()
        second_saved, rewound = threading.Event(), threading.Event()

        def racing(conf, writes, task_id, task_path=""):
            mine = any(isinstance(v, str) and v.startswith("second-") for _c, v in writes)
            if mine:
                assert entry_saved.wait(60) and point_taken.wait(60)
            try:
                put_writes(conf, writes, task_id, task_path)
            finally:
                if mine:
                    second_saved.set()
            if any(c == "__end__" for c, _v in writes):
                entry_saved.set()

        def held(conf, checkpoint, metadata, new_versions):
            if metadata.get("step", -1) >= 0:   # (the step's checkpoint: after the rewind)
                assert rewound.wait(60)
            return put(conf, checkpoint, metadata, new_versions)
        saver.put_writes, saver.put = racing, held
        runner, errors = run_cut_off(trip)
        try:
            assert entry_saved.wait(60)
            store.restore_point("entry-saved")
            point_taken.set()
            assert second_saved.wait(60)
            store.rewind("entry-saved", scope=saver.thread_scope("t"))
        finally:
            point_taken.set()
            rewound.set()
            runner.join(60)
        assert len(errors) == 1, errors
        saver.put_writes, saver.put = put_writes, put
        (first, second), cancelled = ledger(path)
        assert cancelled == []
        out = trip.invoke(None, CONFIG)
        assert out == {"log": [first, second]}
        assert ledger(path) == ([first, second], [])
        assert sorted(live(path)) == sorted(out["log"])
    finally:
        store.close()
