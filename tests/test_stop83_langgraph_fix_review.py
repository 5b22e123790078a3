"""Review h5 of stop 83: a fix of h3's two findings (tests/test_stop83_langgraph_review.py:
``_undo_inherited_calls``, and the earlier open's inner work kept in ``_undo_rerun``),
attacked.  Ledger (fsynced) vs the state the graph's checkpoints record.  The fix was
taken back (its findings A and C below are its regressions, B shows it incomplete): h3's
findings stay open, strict xfails there; A and C are kept here as guards any next fix
must pass (they hold on the code without the fix), B as a strict xfail (it failed
before the fix too).

Finding A (the fix's ``_undo_inherited_calls``, a regression: holds on the code before
it): run 1 -- the subgraph's ``s0`` books, ``s1`` fails (not retried).  Run 2, a plain
resume -- the subgraph resumes past ``s0`` from its own checkpoint, ``s1`` raises the
error its RetryPolicy retries: the retry's load of ``<task ns>|1`` reverts run 1's
``s0`` booking (the namespace is "abandoned") -- but the retry fails as well (an error
not retried), so nothing records the retry's work and the namespace is NOT abandoned:
run 3, a plain resume, loads ``<task ns>`` again, resumes past ``s0``, and the final
state records run 1's ``s0`` booking, CANCELLED.

Finding B (the fix of finding 2 is incomplete): a subgraph whose inner step runs ``s0``
and ``x`` in parallel; ``s0`` books and returns (its writes saved as pending writes on
the inner checkpoint), ``x`` then raises: no inner checkpoint is saved after that step.
A resume in a later open (a store closed and reopened; a later process the same) reverts
``s0``'s booking -- the fix keeps the earlier open's inner work only when the deepest
namespace holds a checkpoint NEWER than the stamped one -- yet LangGraph takes ``s0``'s
saved writes and does not run it again: the state records a cancelled booking.  (In one
store object it holds: ``_step_recorded`` reads the inner task's writes.)

Finding C (the fix's keep rule, a regression: holds on the code before it): run 1 --
``s0`` books, ``s1`` raises the retried error, the retry (``<task ns>|1``) books ``s0``
again and fails; after a close and reopen, a resume keeps the retry namespace's booking
(that namespace has a checkpoint after it), but no new run loads a retry's namespace
(the subgraph's counter starts again): live, recorded nowhere.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from langgraph.graph import END, START, StateGraph

import walstore
from walstore.integrations.langgraph import WalstoreSaver


sys.path.insert(0, str(Path(__file__).parent))
from test_stop83_langgraph_review import Boom, S, World as _World, _graph  # noqa: E402,I001


class World(_World):
    """h3's world (a store, an fsynced ledger, ``book``) with the whole check."""

    def check(self, graph, cfg) -> None:
        assert not graph.get_state(cfg).next
        led = self.ledger()
        rec = set(graph.get_state(cfg).values.get("log", []))
        booked = {x[1] for x in led if x[0] == "book"}
        cancelled = {x[1] for x in led if x[0] == "cancel"}
        assert len(cancelled) == len([x for x in led if x[0] == "cancel"]), (
            "cancelled twice", led)
        assert rec <= booked, (led, rec)
        assert not (rec & cancelled), ("recorded but cancelled", led, rec)
        assert not ((booked - cancelled) - rec), ("live, recorded nowhere", led, rec)



def test_a_retry_that_fails_too_keeps_the_first_runs_recorded_inner_booking(tmp_path):
    w = World(tmp_path)
    phase = [1]
    calls = [0]

    def s1(state):
        if phase[0] == 1:
            raise ValueError("run 1 ends")
        if phase[0] == 2:
            calls[0] += 1
            if calls[0] == 1:
                raise Boom("retried whole: the subgraph runs again in <task ns>|1")
            raise ValueError("the retry fails too, not retried: run 2 ends")
        return {"log": [w.book("s1")]}

    graph = _graph(w, s1)
    cfg = {"configurable": {"thread_id": "t"}}
    try:
        with pytest.raises(ValueError):
            graph.invoke({"log": []}, cfg, durability="sync")
        phase[0] = 2
        with pytest.raises(ValueError):
            graph.invoke(None, cfg, durability="sync")
        phase[0] = 3
        graph.invoke(None, cfg, durability="sync")
        w.check(graph, cfg)   # (fails: run 1's s0 booking recorded, cancelled)
    finally:
        w.store.close()


REASON_B = ("h5 stop 83: a resume in a later open reverts an earlier open's inner booking "
            "whose task's writes the inner checkpoint saved (a parallel inner sibling "
            "failed: no newer inner checkpoint), which LangGraph reads back and does not "
            "run again: the state records a cancelled booking")


def _parallel_graph(w: World, phase: list):
    done = threading.Event()

    def s0(state):
        bid = w.book("s0")
        done.set()
        return {"log": [bid]}

    def x(state):
        if phase[0] == 1:
            done.wait(5)
            time.sleep(0.3)   # (s0's writes saved first)
            raise ValueError("x fails: the run ends")
        return {"log": []}

    inner = StateGraph(S)
    inner.add_node("s0", s0)
    inner.add_node("x", x)
    inner.add_edge(START, "s0")
    inner.add_edge(START, "x")
    inner.add_edge("s0", END)
    inner.add_edge("x", END)
    g = StateGraph(S)
    g.add_node("b2", inner.compile())
    g.add_edge(START, "b2")
    g.add_edge("b2", END)
    return g.compile(checkpointer=WalstoreSaver(w.store))


@pytest.mark.parametrize("reopen", [
    pytest.param(True, marks=pytest.mark.xfail(strict=True, reason=REASON_B)),
    False])
def test_an_inner_task_whose_writes_are_saved_keeps_its_booking_on_resume(
        tmp_path, reopen):
    phase = [1]
    cfg = {"configurable": {"thread_id": "t"}}
    w = World(tmp_path)
    graph = _parallel_graph(w, phase)
    try:
        with pytest.raises(ValueError):
            graph.invoke({"log": []}, cfg, durability="sync")
        assert [x[0] for x in w.ledger()] == ["book"]
        phase[0] = 2
        if reopen:
            w.store.close()
            w = World(tmp_path)
            graph = _parallel_graph(w, phase)
        graph.invoke(None, cfg, durability="sync")
        w.check(graph, cfg)   # (reopen fails: s0's booking recorded, cancelled)
    finally:
        w.store.close()



def _retry_graph(w: World, phase: list, calls: list):
    def s1(state):
        if phase[0] == 1:
            calls[0] += 1
            if calls[0] == 1:
                raise Boom("retried whole: the subgraph runs again in <task ns>|1")
            raise ValueError("the retry fails, not retried: the run ends")
        return {"log": [w.book("s1")]}

    return _graph(w, s1)


@pytest.mark.parametrize("reopen", [
    True, False])
def test_a_retry_namespaces_booking_is_refunded_by_a_resume_in_a_later_open(
        tmp_path, reopen):
    phase, calls = [1], [0]
    cfg = {"configurable": {"thread_id": "t"}}
    w = World(tmp_path)
    graph = _retry_graph(w, phase, calls)
    try:
        with pytest.raises(ValueError):
            graph.invoke({"log": []}, cfg, durability="sync")
        phase[0] = 2
        if reopen:
            w.store.close()
            w = World(tmp_path)
            graph = _retry_graph(w, phase, calls)
        graph.invoke(None, cfg, durability="sync")
        w.check(graph, cfg)   # (reopen fails: the retry's s0 booking, live)
    finally:
        w.store.close()


_CHILD_B = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
import pathlib
from test_stop83_langgraph_fix_review import World, _parallel_graph
w = World(pathlib.Path(sys.argv[1]))
graph = _parallel_graph(w, [1])
try:
    graph.invoke({"log": []}, {"configurable": {"thread_id": "t"}}, durability="sync")
except ValueError:
    pass
print("ready", flush=True)
sys.stdin.read()   # (killed -9 here)
"""


@pytest.mark.xfail(strict=True, reason=REASON_B)
def test_an_inner_task_whose_writes_are_saved_keeps_its_booking_after_a_kill(tmp_path):
    """Finding B with the first run in a real process killed -9."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(walstore.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_B, str(tmp_path), os.path.dirname(__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    w = World(tmp_path)
    assert [x[0] for x in w.ledger()] == ["book"]
    graph = _parallel_graph(w, [2])
    cfg = {"configurable": {"thread_id": "t"}}
    try:
        graph.invoke(None, cfg, durability="sync")
        w.check(graph, cfg)   # (fails: s0's booking recorded, cancelled)
    finally:
        w.store.close()
