"""Focused reproductions of what tools/langgraph_kill_soak.py and the stress runs of the
resume-after-kill tests (stop 78, h6) found about a LangGraph run killed (SIGKILL) mid-run
and resumed in a new process (``WalstoreSaver._undo_on_resume``), or cut off by a rewind.
Real child processes (the tool's own child mode), real files, the outside ledger fsynced.

- A run killed before its thread had any checkpoint (a new thread's first run under
  durability="exit") left its bookings: no head to judge from.  Since stop 79 the next run
  on the empty thread undoes them (``WalstoreSaver._undo_on_fresh_start``, from the
  thread's fresh-start mark); tests/test_langgraph_resume_after_kill_fresh.py has more.
- LangGraph commits a functional-API ``@task``'s writes in its caller's thread when the
  task finished before its future was registered (about 3 runs in 100 under load): the
  saver's own save of the task's result then ran in the ``@entrypoint``'s node context,
  was stamped and noted as the entrypoint task's node work, and a rewind's cut-off undo
  reverted it -- the saved result gone, the task's booking refunded, the task run again
  (tests/test_langgraph_resume_after_kill_review.py failed 1 run in 90 under a CPU hog).
"""
from __future__ import annotations

import collections
import concurrent.futures
import sys
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402
from tools import langgraph_kill_soak as soak  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_langgraph_resume_after_kill_review as review  # noqa: E402


def spec(**over) -> dict:
    base = {"kind": "linear", "call": "invoke", "durability": "exit", "length": 3,
            "long_branch": False, "sub_as_node": True, "together": False, "inline": True,
            "pause": 0.0, "undo_pause": 0.0, "warm": False, "rnd": 1}
    return {**base, **over}


def killed_in(tmp_path: Path, sp: dict, node: str) -> tuple[str, str]:
    """The soak's run child, SIGKILLed in ``node`` once its booking committed."""
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    c = soak.Child("run", {**sp, "hold": node}, store_path, path)
    got = soak.kill_at(c, ("held",), path)
    assert got["killed"], (got, c.err.decode()[-2000:])
    return store_path, path


def live_by_node(path: str) -> collections.Counter:
    ledger = soak.read_ledger(path)
    cancelled = {w[4] for w in ledger if w[0] == "cancel"}
    return collections.Counter(w[2] for w in ledger if w[0] == "book" and w[4] not in cancelled)


def test_a_kill_before_the_threads_first_checkpoint_is_undone_by_the_next_run(tmp_path):
    # durability="exit" saves nothing of a new thread before the run ends: killed in n1,
    # the thread has no checkpoint, the next run starts from its input and books n0 and
    # n1 again -- after undoing the killed run's two bookings (before stop 79 they stood)
    store_path, path = killed_in(tmp_path, spec(), "n1")
    store = walstore.open(store_path, compensators=soak.compensators(path))
    try:
        graph, saver = soak.build(store, path, spec())
        assert list(saver.list(soak.CONFIG)) == []
        assert soak.next_input(graph, 1)[0] == "input"
        soak.resume(graph, spec(), 1)
        ran = graph.get_state(soak.CONFIG).values["ran"]
        assert sorted(b.split(".")[0] for b in ran) == ["n0", "n1", "n2"]
        assert live_by_node(path) == {"n0": 1, "n1": 1, "n2": 1}   # (was: n0, n1 twice)
        (undo,) = saver.resume_undos
        assert undo.checkpoint_id is None and len(undo.undone) == 2 and undo.left == ()
    finally:
        store.close()


def test_a_revert_by_hand_of_a_kill_before_the_first_checkpoint_is_not_undone_again(
        tmp_path):
    # (the recipe docs/GUIDE.md gave before stop 79 for the case above: the killed run's
    # node transactions in the thread's scope, from before the restart, reverted by hand;
    # the run then finds them undone already, and books once)
    store_path, path = killed_in(tmp_path, spec(), "n1")
    store = walstore.open(store_path, compensators=soak.compensators(path))
    try:
        graph, saver = soak.build(store, path, spec())
        scope = saver.thread_scope("t")
        left = [i for i in store.log() if isinstance(i.scope, bytes)
                and i.scope.startswith(scope) and isinstance(i.meta, dict)
                and "langgraph_step" in i.meta]
        assert list(saver.list(soak.CONFIG)) == [] and len(left) == 2   # (n0's, n1's)
        for info in left:
            store.revert(info.txid)
        soak.resume(graph, spec(), 1)
        assert live_by_node(path) == {"n0": 1, "n1": 1, "n2": 1}
        assert sorted(graph.get_state(soak.CONFIG).values["ran"]) == sorted(
            w[4] for w in soak.read_ledger(path) if w[0] == "book" and w[4] not in {
                x[4] for x in soak.read_ledger(path) if x[0] == "cancel"})
    finally:
        store.close()


@pytest.fixture
def first_done_before_registered(monkeypatch):
    """LangGraph's other interleaving, forced: the ``@task`` ``first`` finishes before its
    future is registered, so the done callback (its writes' commit, ``put_writes``) runs
    at once in the caller's thread, in the ``@entrypoint``'s node context."""
    from langgraph.pregel import _runner
    setitem = _runner.FuturesDict.__setitem__

    def late(self, key, value):
        if value is not None and getattr(value, "name", None) == "first":
            concurrent.futures.wait([key])
        return setitem(self, key, value)
    monkeypatch.setattr(_runner.FuturesDict, "__setitem__", late)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_task_result_saved_in_its_callers_context_is_no_node_work(
        tmp_path, first_done_before_registered, durability):
    path = str(tmp_path / "ledger")
    store = walstore.open(str(tmp_path / "s"), compensators={"cancel": review.cancel_into(path)})
    try:
        trip, _saver = review.build(store, path, "functional")
        trip.invoke({}, review.CONFIG, durability=durability)
        saves = [i.meta for i in store.log() if isinstance(i.meta, dict)
                 and i.meta.get("langgraph") == "put_writes"]
        assert len(saves) >= 2   # (first's result, second's)
        # (before: the one of ``first``'s result named the entrypoint's step and task,
        # as a booking the entrypoint made would)
        assert [m for m in saves if "langgraph_step" in m] == []
    finally:
        store.close()


def test_a_rewind_cut_off_keeps_a_task_result_saved_in_its_callers_context(
        tmp_path, first_done_before_registered):
    # (the review's test, in LangGraph's other interleaving: before, the cut-off run's
    # undo reverted the save of ``first``'s result as node work, then ``first``'s booking)
    review.test_a_rewind_cutting_off_a_functional_run_keeps_a_task_whose_result_was_saved(
        tmp_path)
