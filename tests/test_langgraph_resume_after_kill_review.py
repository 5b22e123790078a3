"""A review of the resume-after-kill undo (``WalstoreSaver._undo_on_resume``, stop 78):
flows where it undid work the graph's state records, left work nothing records, or must
undo nothing.  Real processes killed (SIGKILL) with the child of
tests/test_langgraph_resume_after_kill.py (tests/findings_scripts/
langgraph_resume_kill_child.py), a store closed and opened again for a clean restart, and
the same fsynced outside ledger as the world.

- LangGraph's functional API: a ``@task`` called from an ``@entrypoint`` runs in the
  entrypoint's loop under its own task id (its namespace nests in the caller's), and its
  saved result is read back, not run again, on a resume.  Its node transactions named
  the entrypoint's task, whose outcome a kill left unsaved, so the resume refunded the
  booking of a task whose result the run then returned (and, the same mistake in a
  rewind's cut-off run, stop 77's ``_undo_cut_off_step``).
- After a rewind of the thread in the process (the guide's cure for a step cut off in a
  process that stays up), every ``@task`` transaction of a run resuming from a checkpoint
  made before it was refused: the fence looked for the loop's checkpoint under the
  caller's namespace, which has none.
- Kept as guards (they passed before): a run sent to an older checkpoint after a kill
  (time travel) undoes the killed step too, LangGraph loading the thread's head to tell
  whether the checkpoint given was superseded; clean restarts (finished or paused at an
  interrupt, every durability) undo nothing.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402

SCRIPTS = Path(__file__).parent / "findings_scripts"
sys.path.insert(0, str(SCRIPTS))
from langgraph_resume_kill_child import build, cancel_into, ledger  # noqa: E402
from test_langgraph_resume_after_kill import CONFIG, bookings, killed, live  # noqa: E402


def test_a_functional_task_whose_result_was_saved_keeps_its_booking(tmp_path):
    # (``first`` returned and its result was saved; the kill came in ``second``.  The
    # resume reads ``first``'s result back and runs ``second`` again: ``first``'s booking
    # is the state's, ``second``'s first one is nobody's.  Before: both were refunded,
    # the run returning the refunded booking as made)
    store_path, path = killed(tmp_path, "functional", "sync")
    (first, second), _ = ledger(path)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        trip, saver = build(store, path, "functional")
        txid = {a.args["id"]: a.txid for a in store.actions()}
        out = trip.invoke(None, CONFIG)
        booked, cancelled = ledger(path)
        assert cancelled == [second]
        (again,) = booked[2:]
        assert out == {"log": [first, again]} and sorted(live(path)) == sorted(out["log"])
        (undo,) = saver.resume_undos
        assert (undo.undone, undo.kept, undo.left) == ((txid[second],), (txid[first],), ())
    finally:
        store.close()


def test_a_rewind_cutting_off_a_functional_run_keeps_a_task_whose_result_was_saved(
        tmp_path):
    # (in one process: a store.rewind to a point after ``first``'s result was saved and
    # before ``second`` booked cuts the run off; its refused save reverts what the thread
    # records nowhere -- ``first``'s result is recorded, and the resume reads it back)
    path = str(tmp_path / "ledger")
    store = walstore.open(str(tmp_path / "s"), compensators={"cancel": cancel_into(path)})
    try:
        marked, go, rewound = threading.Event(), threading.Event(), threading.Event()
        point: list = []

        def hold(conf: dict, node: str) -> None:   # (after ``second`` booked)
            marked.set()
            rewound.wait(60)
        trip, saver = build(store, path, "functional", hold)
        import langgraph_resume_kill_child as child
        book = child.book

        def booking(st, p, name):   # (``second`` books only once the point is taken)
            if name == "second":
                at = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                                       "checkpoint_id": _built_on()}}
                while not any(ch == "__return__"
                              for _t, ch, _v in saver.get_tuple(at).pending_writes):
                    threading.Event().wait(0.01)
                point.append(store.restore_point("before-second"))
                go.set()
            return book(st, p, name)
        child.book = booking
        try:
            runner, errors = run_cut_off(trip)
            assert marked.wait(60)
            store.rewind("before-second", scope=saver.thread_scope("t"))
            rewound.set()
            runner.join(60)
        finally:
            child.book = book
        assert len(errors) == 1
        (first, second), cancelled = ledger(path)
        assert cancelled == [second]   # (the rewind's own undo)
        out = trip.invoke(None, CONFIG)
        booked, cancelled = ledger(path)
        assert cancelled == [second] and out["log"][0] == first
        assert sorted(live(path)) == sorted(out["log"])
    finally:
        store.close()


def run_cut_off(trip) -> tuple[threading.Thread, list]:
    """(a thread running ``trip`` on a new thread "t" of the graph, the ``ConflictError``
    it ended with: a run cut off by a rewind is refused its next save)"""
    errors: list = []

    def run() -> None:
        try:
            trip.invoke({}, CONFIG)
        except walstore.ConflictError as e:   # (StaleCheckpointError: cut off)
            errors.append(e)
    runner = threading.Thread(target=run)
    runner.start()
    return runner, errors


def _built_on() -> str:
    """The checkpoint the running node's step builds on."""
    from langgraph.config import get_config
    return get_config()["configurable"]["checkpoint_map"][""]


def test_a_run_from_an_older_checkpoint_after_a_kill_undoes_the_killed_booking(tmp_path):
    # (time travel: the run replays from the checkpoint before ``plan``; the killed
    # ``book`` step is recorded on no branch, and the fork's head makes it unreachable
    # for any later resume -- before, its booking stood beside the fork's)
    store_path, path = killed(tmp_path, "single", "sync")
    (killed_booking,), _ = ledger(path)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "single")
        older = [s for s in graph.get_state_history(CONFIG) if s.next == ("plan",)][0]
        graph.invoke(None, older.config)
        assert ledger(path)[1] == [killed_booking]
        (fork,) = live(path)
        assert bookings(graph.get_state(CONFIG).values) == [fork]
        (undo,) = saver.resume_undos
        assert undo.undone and undo.checkpoint_id != older.config["configurable"][
            "checkpoint_id"]   # (the head the kill left, judged whatever the run loads)
    finally:
        store.close()


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
@pytest.mark.parametrize("kind", ["single", "interrupt", "subgraph", "functional"])
def test_a_clean_restart_undoes_nothing(tmp_path, kind, durability):
    # (finished, or paused at ``interrupt()``, the store closed and opened again -- an
    # earlier open from walstore's view: new input, Command(resume=...), stream and
    # astream undo nothing; "exit" saves only at the end, after every node transaction,
    # "async" saves behind the steps)
    from langgraph.types import Command
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    first_input = {} if kind == "functional" else {"log": []}

    def again(call):
        store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
        try:
            graph, saver = build(store, path, kind)
            call(graph)
            assert not [u for u in saver.resume_undos if u.undone or u.left]
        finally:
            store.close()
    again(lambda g: g.invoke(first_input, CONFIG, durability=durability))
    if kind == "interrupt":
        again(lambda g: g.invoke(Command(resume="yes"), CONFIG, durability=durability))
    again(lambda g: list(g.stream(first_input, CONFIG, durability=durability)))
    again(lambda g: asyncio.run(g.ainvoke(first_input, CONFIG, durability=durability)))
    assert ledger(path)[1] == []


def test_a_functional_run_resumed_after_a_rewind_of_its_thread_runs_its_tasks(tmp_path):
    # (the manual rewind the guide prescribes before resuming a step cut off in a process
    # that stays up: afterwards every ``@task`` transaction of the resumed run was refused,
    # "namespace 'trip:...' no longer has checkpoint", the fence looking for the loop's
    # checkpoint under the caller's namespace, which never has one)
    from langgraph.func import entrypoint, task
    store = walstore.open(str(tmp_path / "s"))
    try:
        from walstore.integrations.langgraph import WalstoreSaver
        saver, fails = WalstoreSaver(store), [True]

        def note(key: bytes) -> None:
            with store.transaction() as tx:   # (a node transaction of the @task)
                tx.put(key, b"1")

        @task
        def first(n: int) -> int:
            note(b"first")
            return 1

        @task
        def second(n: int) -> int:
            note(b"second")
            if fails[0]:
                fails[0] = False
                raise ValueError("cut off")
            return 2

        @entrypoint(checkpointer=saver)
        def trip(state: dict) -> int:
            return first(1).result() + second(2).result()
        with pytest.raises(ValueError):
            trip.invoke({}, CONFIG)
        saver.rewind(trip.get_state(CONFIG).config)
        assert trip.invoke(None, CONFIG) == 3
    finally:
        store.close()


def test_a_copys_resume_leaves_its_sources_killed_booking_to_the_source(tmp_path):
    # (a backup taken of a store whose run was killed mid-step.  A copy never runs its
    # source's compensations on its own (CONTRACT 4.10): before, the copy's resume
    # refunded the source's booking, and the source's own resume refunded it again --
    # two refunds of one booking.  Now the copy names it in ``left``; the source undoes
    # it once)
    from walstore.ops.backup import backup
    store_path, path = killed(tmp_path, "single", "sync")
    (first,), _ = ledger(path)
    copy = str(tmp_path / "copy")
    backup(store_path, copy)
    store = walstore.open(copy, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "single")
        txid = list(store.actions())[0].txid
        graph.invoke(None, CONFIG)
        assert ledger(path)[1] == []   # (the copy refunded nothing)
        (undo,) = saver.resume_undos
        assert undo.undone == () and len(undo.left) == 1
        assert undo.left[0].startswith(f"{txid} (made in the store this one is a copy")
    finally:
        store.close()
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "single")
        graph.invoke(None, CONFIG)
        assert ledger(path)[1] == [first]   # (refunded once, by the source)
        assert first not in live(path)
    finally:
        store.close()
