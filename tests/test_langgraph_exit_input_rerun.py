"""A subgraph task cut short by a failed sibling in a run under ``durability="exit"``,
run again by a plain resume (stop 81, h1; ``tools/langgraph_failure_soak.py --seed 3
--rounds 60 --only 49``).

What LangGraph saves (probed on langgraph 1.2.24, sync ``invoke``): a step whose task
raises while a sibling subgraph task is already running ends at once -- the runner
stops waiting for the others (``_should_stop_others``), the loop's exit saves its
checkpoint and the pending writes it has (the failed task's error), and only then its
executor waits for the running subgraph.  The subgraph finishes (a sync node cannot
be cancelled) and its outcome is committed to the loop in memory, never saved; and a
subgraph whose own run ended without an error or interrupt saves nothing at all under
``"exit"`` (``_suppress_interrupt``: a nested loop saves at exit only on an error or
interrupt).  So the saved head holds no outcome of the subgraph task and its namespace
no checkpoint; a plain resume (``invoke(None)``) runs the task again and the subgraph
from its start (or from its newest checkpoint, when an earlier run saved one), booking
again.  (When the failing task raises before the runner registered the subgraph's
future -- ``FuturesDict.__setitem__`` clears the stop event its failure had set -- the
runner does wait for the subgraph and its outcome is saved: which happens depends on
the order of the step's tasks and their timing; the soak's round hits the first.)

What the saver decided: ``_discard_early`` -> ``_undo_rerun`` found the inner nodes'
transactions (noted under the head by the run given the input, ``_step_txns``) but
``_inner_rerun`` refused them -- "never saved: nothing tells how the inner step ended"
-- so the first run's inner bookings stood beside the rerun's, the state recording
the rerun's.  Not the GUIDE's documented limitation for ``"exit"`` (new input on an
unfinished head refunds nothing of the HEAD's step's work: that work is the previous
step's, discarded by the input); here the work left is the exit run's own, in the step
it built on, which a plain resume re-ran: the GUIDE's "a subgraph's inner node ... that
a failed sibling cut short ... has its failed run's work reverted" case, on a fresh
thread's first run too.  Fixed (``_inner_rerun``): an inner step whose checkpoint was
never saved is re-run when its namespace holds no checkpoint at or after it (none at
all: from its start) -- its work is reverted before the rerun's first transaction
reads.  Each test here failed before the fix (the first bookings live, unrecorded).
"""
from __future__ import annotations

import operator
import os
import threading
import time
import uuid
from typing import Annotated, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph

import walstore
from walstore.integrations.langgraph import WalstoreSaver

CONFIG = {"configurable": {"thread_id": "t"}}


class S(TypedDict, total=False):
    log: Annotated[list, operator.add]
    turn: int


class World:
    """A store, an fsynced ledger (the outside world: ``book``/``cancel`` lines) and a
    graph START -> [sub (s0 -> s1), side] -> END whose nodes book; ``side`` raises while
    ``arm["side"]`` is set, once the subgraph's node named by ``arm["wait"]`` has
    started, and that node books only after the outer loop's exit save that followed
    -- as in the soak's round.  ``arm["s0"]``: s0 raises (before
    booking) that many times."""

    def __init__(self, tmp_path) -> None:
        self.path = str(tmp_path / "ledger")
        self.store = walstore.open(str(tmp_path / "s"), compensators={
            "cancel": lambda a: self.append(f"cancel {a.args['id']}")})
        self.saver = WalstoreSaver(self.store)
        self.arm = {"side": 0, "s0": 0, "wait": "s0"}
        self.started = {"s0": threading.Event(), "s1": threading.Event()}
        self.raised, self.raised_at = threading.Event(), 0
        self.graph = self._build()

    def append(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def book(self, name: str) -> str:
        bid = f"{name}-{uuid.uuid4().hex[:8]}"
        with self.store.transaction(meta="booking") as tx:
            with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                self.append(f"book {bid}")
                act.result = {"ok": True}
        return bid

    def _lsn(self) -> int:
        return int(self.store.stats()["applied_lsn"])

    def _exit_saved(self) -> None:
        """Wait (up to 10 s) until ``side`` raised and the store committed something
        since (the outer loop's exit save: under "exit" nothing else commits then),
        and a little more (the loop takes its pending writes as it saves)."""
        self.raised.wait(10)
        deadline = time.monotonic() + 10
        while self._lsn() <= self.raised_at and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)

    def _build(self):
        def inner_node(name: str):
            def run(state: S) -> dict:
                self.started[name].set()
                if name == "s0" and self.arm["s0"]:
                    self.arm["s0"] -= 1
                    raise RuntimeError("s0 failed")
                if self.arm["side"] and name == self.arm["wait"]:
                    self._exit_saved()
                return {"log": [self.book(name)]}
            return run

        def side(state: S) -> dict:
            if self.arm["side"]:
                # (the subgraph's task running, and registered with the runner: which
                # it is only once its submit returned -- raised sooner, the runner
                # waits for it and saves its outcome)
                self.started[self.arm["wait"]].wait(10)
                time.sleep(0.2)
                self.arm["side"] -= 1
                self.raised_at = self._lsn()
                self.raised.set()
                raise RuntimeError("side failed")
            return {"log": [self.book("side")]}
        inner = StateGraph(S)
        inner.add_node("s0", inner_node("s0"))
        inner.add_node("s1", inner_node("s1"))
        inner.add_edge(START, "s0")
        inner.add_edge("s0", "s1")
        inner.add_edge("s1", END)
        b = StateGraph(S)
        b.add_node("sub", inner.compile())
        b.add_node("side", side)
        b.add_edge(START, "sub")
        b.add_edge(START, "side")
        b.add_edge("sub", END)
        b.add_edge("side", END)
        return b.compile(checkpointer=self.saver)

    def fail_once(self, inp, durability: str, wait: str = "s0",
                  match: str = "side failed") -> None:
        """Run with ``side`` armed to fail once (after ``wait`` started): it raises."""
        self.raised.clear()
        for e in self.started.values():
            e.clear()
        self.arm["side"], self.arm["wait"] = 1, wait
        with pytest.raises(RuntimeError, match=match):
            self.graph.invoke(inp, CONFIG, durability=durability)

    def ledger(self) -> tuple[list[str], list[str]]:
        booked, cancelled = [], []
        if not os.path.exists(self.path):
            return booked, cancelled
        for line in open(self.path).read().splitlines():
            what, _, bid = line.partition(" ")
            (booked if what == "book" else cancelled).append(bid)
        return booked, cancelled

    def recorded(self) -> set[str]:
        return set(self.graph.get_state(CONFIG).values.get("log", []))

    def inner_checkpoints(self) -> list[str]:
        return [t.config["configurable"]["checkpoint_ns"] for t in self.saver.list(CONFIG)
                if t.config["configurable"]["checkpoint_ns"]]

    def sub_outcome_saved(self) -> bool:
        """Does the head hold a regular pending write of the ``sub`` task?"""
        st = self.graph.get_state(CONFIG)
        sub = [t.id for t in st.tasks if t.name == "sub"]
        tup = self.saver.get_tuple(CONFIG)
        return any(w[0] in sub and not w[1].startswith("__") for w in tup.pending_writes)


def _agrees(w: World, excused: set[str] = frozenset()) -> tuple[list, list, set]:
    """The ledger agrees with the final state: every recorded booking live once, nothing
    cancelled twice, nothing else live but ``excused``."""
    booked, cancelled = w.ledger()
    rec = w.recorded()
    live = {b for b in booked if b not in cancelled}
    assert len(set(cancelled)) == len(cancelled), (booked, cancelled)
    assert rec <= live, (booked, cancelled, rec)
    assert live - rec <= set(excused), (booked, cancelled, rec)
    return booked, cancelled, rec


def test_fresh_thread_exit_run_cut_short_subgraph_rerun_refunds_its_work(tmp_path):
    """A new thread's first run under "exit": ``side`` fails while the subgraph runs on;
    the head saved at exit holds no outcome of ``sub`` and no inner checkpoint exists;
    ``invoke(None)`` runs the subgraph again from its start: the first run's s0 and s1
    bookings are refunded (before the fix both stood, unrecorded)."""
    w = World(tmp_path)
    w.fail_once({"log": [], "turn": 0}, "exit")
    booked, _ = w.ledger()
    assert [b[:2] for b in booked] == ["s0", "s1"], booked
    assert not w.sub_outcome_saved() and w.inner_checkpoints() == []   # (LangGraph's)
    w.graph.invoke(None, CONFIG, durability="sync")
    booked, cancelled, rec = _agrees(w)
    assert sorted(cancelled) == sorted(booked[:2]), (booked, cancelled, rec)
    assert sorted(b[:2] for b in rec) == ["s0", "s1", "si"], rec
    assert any(u.rerun and len(u.undone) == 2 for u in w.saver.resume_undos)
    w.store.close()


@pytest.mark.parametrize("resume_durability", ["sync", "exit"])
def test_new_input_exit_run_cut_short_subgraph_rerun_refunds_its_work(
        tmp_path, resume_durability):
    """The soak's round (seed 3, round 49) reduced: a finished turn, then new input
    under "exit" whose step ends in ``side``'s error while the subgraph runs on, then a
    plain resume: the exit run's inner bookings are refunded, turn 0's stay recorded."""
    w = World(tmp_path)
    w.graph.invoke({"log": [], "turn": 0}, CONFIG, durability="sync")
    turn0 = set(w.ledger()[0])
    w.fail_once({"log": [], "turn": 1}, "exit")
    exit_run = [b for b in w.ledger()[0] if b not in turn0]
    assert sorted(b[:2] for b in exit_run) == ["s0", "s1"], exit_run
    assert not w.sub_outcome_saved()
    w.graph.invoke(None, CONFIG, durability=resume_durability)
    booked, cancelled, rec = _agrees(w)
    assert sorted(cancelled) == sorted(exit_run), (booked, cancelled, rec)
    assert turn0 <= rec
    w.store.close()


def test_exit_input_on_unfinished_head_refunds_the_exit_runs_own_rerun_work(tmp_path):
    """New input under "exit" on a head whose step is unfinished (``side`` failed,
    ``sub`` finished and its outcome saved): the head's step's work (turn 0's s0, s1)
    is what the GUIDE documents as left ("Under durability="exit", which saves no
    input checkpoint, ... nothing is refunded"); the exit run's own subgraph work,
    cut short by ``side`` failing again and re-run by the plain resume, is not that
    case, and is refunded."""
    w = World(tmp_path)
    w.fail_once({"log": [], "turn": 0}, "sync")
    assert w.sub_outcome_saved()   # (sync durability: saved as the subgraph finished)
    turn0 = set(w.ledger()[0])
    w.fail_once({"log": [], "turn": 1}, "exit")
    exit_run = [b for b in w.ledger()[0] if b not in turn0]
    assert sorted(b[:2] for b in exit_run) == ["s0", "s1"], exit_run
    w.graph.invoke(None, CONFIG, durability="sync")
    # (turn 0's work: left by the documented rule for "exit", or refunded were that
    # ever lifted -- never recorded)
    booked, cancelled, rec = _agrees(w, excused=turn0)
    assert set(exit_run) <= set(cancelled), (booked, cancelled, rec)
    assert not turn0 & rec
    w.store.close()


def test_exit_run_resumed_from_saved_inner_checkpoint_refunds_the_unsaved_step(tmp_path):
    """The subgraph resumes from a saved inner checkpoint: a sync run where s0 and
    ``side`` both fail saves the inner checkpoint X (s0's error); a plain resume under
    "exit" re-runs s0 on X (books) and s1 on X's child Y, never saved, while ``side``
    fails again; the next plain resume resumes the subgraph from X once more: s0's and
    s1's bookings of the exit run are both refunded (before the fix s1's -- its step's
    checkpoint Y never saved -- stood)."""
    w = World(tmp_path)
    w.arm["s0"] = 1
    w.fail_once({"log": [], "turn": 0}, "sync", wait="s0", match="failed")
    assert w.ledger()[0] == []
    assert len(w.inner_checkpoints()) >= 1
    w.fail_once(None, "exit", wait="s1")
    exit_run = w.ledger()[0]
    assert sorted(b[:2] for b in exit_run) == ["s0", "s1"], exit_run
    assert not w.sub_outcome_saved()
    w.graph.invoke(None, CONFIG, durability="sync")
    booked, cancelled, rec = _agrees(w)
    assert sorted(cancelled) == sorted(exit_run), (booked, cancelled, rec)
    w.store.close()
