"""Review of stop 81's LangGraph changes (h2): a retried subgraph's inner work, the rerun
undo judged per inner level, the cut-short runs of a task stopped at ``interrupt()``.

Attacked with real graphs whose nodes book (a walstore action, its compensator appending
"cancel ID" to an fsynced ledger): a subgraph run twice by one node attempt that then
raises and is retried, RetryPolicy on both the subgraph node and an inner node, nested
retried subgraphs, Send() fan-out inside a retried subgraph (idempotent or not), plain
resumes of a failed or cut-short inner node, ToolNode parallel tools (as a node and in a
retried subgraph), each under durability sync/async/exit and invoke/stream/ainvoke --
all agreed but one:

Found: a retried subgraph whose inner node's walstore transaction was still open in a
worker thread when the retry's load of the subgraph reverted the earlier attempt's work
-- a ``ToolNode`` (``handle_tool_errors=False``) in a subgraph with a ``RetryPolicy``,
run by ``ainvoke``: one tool raises, ``asyncio.gather`` does not cancel the sibling
tool's thread, which books and commits after the retry began.  The inner transaction
was refused at its begin only (``_refuse_superseded``), not at its commit as a node's
own transaction is, so its booking stood beside the retry's, the state recording one
(about 2 runs in 5 under timing; made deterministic here with events).  Fixed in
``_note_step_txn``: the calling task's attempt is checked at the inner transaction's
commit too (``add_commit_check``), and the refused commit compensates the booking.

Found (two resumes of one thread at once): a retried subgraph stopped at an inner
``interrupt()``, answered by two resumes at once.  Each loads the subgraph anew; one
takes the undo of the retry's abandoned work (``_undo_abandoned_calls``), the other ran
on at once, and its idempotent inner node read the key of a booking the undo was about
to cancel -- it recorded that booking, REFUNDED while the state records it (6 runs in
6).  Fixed in ``_undo_superseded_calls``: the other run's first load waits for the undo
to end (``_ABANDONING``).

Found, pre-existing (not fixed; strict xfail): the loser of two resumes at once whose
refusal is in a subgraph's namespace (StaleCheckpointError in ``sub:..``) has that
namespace's work reverted (``_undo_lost_step``), but its outer sibling task's booking --
work of the same run, whose outer step is never saved -- stands, recorded nowhere.

Found (not fixed; strict xfail): two resumes at once of a subgraph stopped at an inner
``interrupt()``, where one run's answered inner node raises and its ``RetryPolicy`` runs
the subgraph again, into the interrupt again: that run returns (it saves only pending
writes, on a head the winner moved on from: never refused), and the retry's inner
bookings stand -- ``_undo_abandoned_calls`` waits for a later load of the subgraph, and
the winner finished the thread.

Found, a REGRESSION of stop 81's change 3 (``_note_task_save``), fixed: a resume in
flight was taken for a run cut short past the interrupt.  R0 resumes a
subgraph task stopped at ``interrupt()``; its sibling raises (its error saved, so R0
counts as a run whose step ended), while R0's answered inner node has booked and is
still running.  A concurrent resume R1's rerun undo reverts R0's booking; R0's subgraph
then saves the task's outcome on the head, and the next resume completes the step
from it: the state records the cancelled booking -- REFUNDED while recorded (before stop
81 that booking stood, correctly; only R1's raised booking stood beside it, as now).
Fixed in ``_undo_rerun``: the subgraph loads of a run whose work the stopped-task branch
reverts are marked lost (``_lost_runs``), as a race's loser's: its later saves there are
refused (the subgraph task fails) and what it commits there after is reverted, so
nothing records the refunded booking.  Not its outer load: a lost run's undo reverts all
its work in the namespace, a sibling's whose outcome it saved on the head too (tried
first: refunded ``side`` bookings the state recorded).  So a PLAIN node in that place
(answered, in flight, reverted) is not covered: its run's later outcome would record
the refunded booking -- noticed, not reproduced here.  Left
(strict xfail, as before stop 81): R1's own answered booking, its run raising after it.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
import operator
import uuid
from typing import Annotated, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, RetryPolicy, interrupt

import walstore
from walstore.integrations.langgraph import WalstoreSaver

from booking_ledger import read_ledger as _ledger

RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=False,
                    retry_on=RuntimeError)


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_a_retried_subgraphs_tool_still_booking_in_its_thread_is_refused_at_commit(
        tmp_path, durability):
    # attempt 1 of the subgraph: tools t0, t1, t2 in parallel; t1 raises at once; t2 has
    # begun its transaction and booked, and commits only once attempt 2 is under way
    # (after the retry's load reverted attempt 1's committed work)
    path = str(tmp_path / "ledger")
    lock = threading.Lock()

    def append(line: str) -> None:
        with lock, open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    store = walstore.open(str(tmp_path / "s"), compensators={
        "cancel": lambda a: append(f"cancel {a.args['id']}")})
    calls = {"t0": 0, "t1": 0, "t2": 0}
    retry_began, first_t2_done = threading.Event(), threading.Event()

    def book(name: str, hold: bool) -> str:
        bid = f"{name}-{uuid.uuid4().hex[:8]}"
        with store.transaction() as tx:
            with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                append(f"book {bid}")
                act.result = {"ok": True}
            if hold:
                assert retry_began.wait(10)
        return bid

    def mk(name: str):
        @tool(name)
        def t(x: int) -> str:
            """Book something."""
            with lock:
                calls[name] += 1
                n = calls[name]
            if n > 1:
                retry_began.set()
            if name == "t1" and n == 1:
                raise RuntimeError("t1 failed")
            if name == "t2" and n == 1:
                try:
                    return book(name, hold=True)
                finally:
                    first_t2_done.set()
            return book(name, hold=False)
        return t

    def agent(state: MessagesState) -> dict:
        if any(m.type == "tool" for m in state["messages"]):
            return {"messages": [AIMessage(content="done")]}
        return {"messages": [AIMessage(content="", tool_calls=[
            {"name": f"t{i}", "args": {"x": i}, "id": f"c{i}"} for i in range(3)])]}
    sub = StateGraph(MessagesState)
    sub.add_node("tools", ToolNode([mk(f"t{i}") for i in range(3)],
                                   handle_tool_errors=False))
    sub.add_edge(START, "tools")
    sub.add_edge("tools", END)
    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", sub.compile(), retry_policy=RETRY)
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", lambda s: "tools" if s["messages"][-1].tool_calls
                            else END, ["tools", END])
    g.add_edge("tools", "agent")
    graph = g.compile(checkpointer=WalstoreSaver(store))
    config = {"configurable": {"thread_id": "t"}}
    asyncio.run(graph.ainvoke({"messages": [HumanMessage("hi")]}, config,
                              durability=durability))
    assert first_t2_done.wait(10)
    rec = {m.content for m in graph.get_state(config).values["messages"]
           if m.type == "tool"}
    booked, cancelled = _ledger(path)
    store.close()
    live = {b for b in booked if b not in cancelled}
    assert sorted(b.split("-")[0] for b in rec) == ["t0", "t1", "t2"]
    assert len(cancelled) == len(set(cancelled)), cancelled
    # (attempt 1's t0 and t2 reverted -- t2's at its commit --, the retry's all stand)
    assert live == rec, (booked, cancelled, rec)


class _World:
    """A store whose action ``book`` appends to an fsynced ledger, "cancel" its
    compensator; ``fail``: node name -> how many runs of it raise after booking;
    ``idem``: a node books only when its key (written with the booking) says not yet."""

    def __init__(self, tmp_path, fail: dict, idem: bool = False) -> None:
        self.path = str(tmp_path / "ledger")
        self.lock = threading.Lock()
        self.store = walstore.open(str(tmp_path / "s"), compensators={
            "cancel": lambda a: self.append(f"cancel {a.args['id']}")})
        self.fail, self.idem = dict(fail), idem

    def append(self, line: str) -> None:
        with self.lock, open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def book(self, name: str) -> str:
        with self.store.transaction() as tx:
            if self.idem and tx.get(f"k/{name}"):
                return tx.get(f"k/{name}")
            bid = f"{name}-{uuid.uuid4().hex[:8]}"
            with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                self.append(f"book {bid}")
                act.result = {"ok": True}
            if self.idem:
                tx.put(f"k/{name}", bid)
        with self.lock:
            if self.fail.get(name, 0) > 0:
                self.fail[name] -= 1
                raise RuntimeError(f"{name} failed")
        return bid

    def booker(self, name: str):
        return lambda state: {"log": [self.book(name)]}

    def graph(self):
        def asker(state: _S) -> dict:
            interrupt("ok?")
            return {"log": [self.book("s1")]}
        inner = StateGraph(_S)
        inner.add_node("sa", self.booker("sa"))
        inner.add_node("s0", self.booker("s0"))
        inner.add_node("s1", asker)
        inner.add_edge(START, "sa")
        inner.add_edge("sa", "s0")
        inner.add_edge("s0", "s1")
        inner.add_edge("s1", END)
        b = StateGraph(_S)
        b.add_node("sub", inner.compile(), retry_policy=RETRY)
        b.add_node("side", self.booker("side"))
        b.add_edge(START, "sub")
        b.add_edge(START, "side")
        b.add_edge("sub", END)
        b.add_edge("side", END)
        return b.compile(checkpointer=WalstoreSaver(self.store))

    def resume_twice_at_once(self, graph, config, durability: str) -> list[str]:
        barrier, errors = threading.Barrier(2), []

        def resume() -> None:
            barrier.wait()
            try:
                graph.invoke(Command(resume="yes"), config, durability=durability)
            except Exception as e:   # (the loser of the race: StaleCheckpointError...)
                errors.append(type(e).__name__)
        threads = [threading.Thread(target=resume) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    def judge(self, rec: set) -> tuple[list, list]:
        booked, cancelled = _ledger(self.path)
        self.store.close()
        live = {b for b in booked if b not in cancelled}
        assert not rec - live, ("refunded while recorded", booked, cancelled, rec)
        assert live == rec, (booked, cancelled, rec)
        assert len(cancelled) == len(set(cancelled)), cancelled
        return booked, cancelled


# The three xfails below are races of two resumes started together (a barrier): under a
# loaded machine the race can resolve so that the defect does not show (one of them
# passed in a 3-worker run of the LangGraph tests at stop 82), so they are not strict;
# WALSTORE_SLOW=1 makes them strict again, to see at once when a fix lands.
_RACE_STRICT = os.environ.get("WALSTORE_SLOW") == "1"


def _stopped_then_resumed_twice_at_once(world: _World, durability: str) -> None:
    """Run ``world``'s graph to its subgraph's interrupt, resume it twice at once, then
    judge: the thread finished, its state recording one booking of each node, the
    ledger's live bookings exactly those."""
    graph = world.graph()
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke({"log": []}, config, durability=durability)
    assert graph.get_state(config).next == ("sub",)
    world.resume_twice_at_once(graph, config, durability)
    state = graph.get_state(config)
    assert not state.next
    rec = set(state.values["log"])
    assert sorted(b.split("-")[0] for b in rec) == ["s0", "s1", "sa", "side"]
    world.judge(rec)


class _S(TypedDict):
    log: Annotated[list, operator.add]


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_two_resumes_at_once_of_a_retried_subgraph_stopped_at_an_interrupt(tmp_path,
                                                                           durability):
    # run 1: the subgraph's s0 raises, the RetryPolicy runs it again (``sub:..|1``): sa
    # and s0 book again, s1 stops at interrupt().  Two resumes at once: each loads the
    # subgraph anew; one reverts the retry's abandoned work (_undo_abandoned_calls), the
    # other -- before, running on at once -- read sa's key before the undo removed it and
    # returned that booking, which the undo then cancelled: refunded while the state
    # recorded it (6 runs in 6).  Now the other waits for the undo to end.
    world = _World(tmp_path, fail={"s0": 1}, idem=True)
    _stopped_then_resumed_twice_at_once(world, durability)


@pytest.mark.xfail(strict=_RACE_STRICT, reason="the loser of two resumes at once, "
                   "refused in a subgraph's namespace, leaves its outer sibling task's "
                   "booking standing (pre-stop-81; _undo_lost_step reverts the refused "
                   "namespace's work only)")
@pytest.mark.parametrize("durability", ["sync", "async"])
def test_two_resumes_at_once_the_loser_in_a_subgraph_leaves_its_siblings_booking(
        tmp_path, durability):
    # run 1: the subgraph's s1 stops at interrupt(), the sibling ``side`` books and raises.
    # Two resumes at once: each runs side again (books) and answers s1 (books); one wins;
    # the loser's subgraph save is refused (StaleCheckpointError in ``sub:..``), its s1
    # booking reverted -- but its ``side`` booking, outer-level work of the same run whose
    # outer step is never saved, stands, recorded nowhere (3 runs in 3).  (A plain node
    # in place of the subgraph agrees: the refusal is then at the outer level.)
    world = _World(tmp_path, fail={"side": 1})

    def asker(state: _S) -> dict:
        interrupt("ok?")
        return {"log": [world.book("s1")]}
    inner = StateGraph(_S)
    inner.add_node("s1", asker)
    inner.add_edge(START, "s1")
    inner.add_edge("s1", END)
    b = StateGraph(_S)
    b.add_node("sub", inner.compile())
    b.add_node("side", world.booker("side"))
    b.add_edge(START, "sub")
    b.add_edge(START, "side")
    b.add_edge("sub", END)
    b.add_edge("side", END)
    graph = b.compile(checkpointer=WalstoreSaver(world.store))
    config = {"configurable": {"thread_id": "t"}}
    with pytest.raises(RuntimeError):
        graph.invoke({"log": []}, config, durability=durability)
    errors = world.resume_twice_at_once(graph, config, durability)
    assert errors == ["StaleCheckpointError"], errors
    state = graph.get_state(config)
    assert not state.next
    world.judge(set(state.values["log"]))


@pytest.mark.xfail(strict=_RACE_STRICT, reason="a resume that loses to a concurrent "
                   "one while its retried subgraph stops at an interrupt is never "
                   "refused (it saves only pending writes, on a head the winner moved "
                   "on from); the retry's inner bookings stand, and no later load of the "
                   "subgraph comes to revert them")
@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_two_resumes_at_once_one_retries_the_subgraph_into_the_interrupt_again(
        tmp_path, durability):
    # run 1: sa and s0 book, s1 stops at interrupt().  Two resumes at once: both answer
    # s1; one run's s1 books and raises (once), the RetryPolicy runs that run's subgraph
    # again (``sub:..|1``) -- sa and s0 book again, s1 stops at its interrupt again (no
    # answer for it in the new namespace) -- and the run returns.  The other run books
    # s1 and finishes the thread.  The first run's s1 booking is reverted (superseded
    # attempt), but its retry's sa and s0 bookings stand, recorded nowhere (6 runs in 6).
    world = _World(tmp_path, fail={"s1": 1})
    _stopped_then_resumed_twice_at_once(world, durability)


def _in_flight_rounds(tmp_path, durability: str, full: bool) -> None:
    # run 1: the subgraph's s1 stops at interrupt(), the sibling ``side`` books and raises.
    # R0 resumes: side raises again (its error saved: R0 counts as a run whose step
    # ended, _note_task_save), s1 is answered, books and is held.  R1 resumes meanwhile:
    # its rerun undo (_undo_rerun, stopped branch, stop 81) finds R0 committed work for
    # s1's task and saved no outcome of it -- "cut short past the interrupt" -- and
    # reverts R0's s1 booking; R1's s1 books and raises.  R0's s1 is released and its
    # subgraph saved the task's regular outcome on the head; the next resume completed
    # the step from it: the state recorded R0's s1 booking, cancelled (3 runs in 3; before
    # stop 81 it was not refunded).  Now R0's subgraph load is marked lost as R1 reverts
    # its work: its later saves there are refused, and the next resume books s1 anew.  Left
    # (``full``, strict xfail; also before stop 81): R1's s1 booking, made before it
    # raised, stands beside the rerun's.
    world = _World(tmp_path, fail={})
    release, r0_side_failed = threading.Event(), threading.Event()
    calls = {"s1": 0, "side": 0}

    def s1(state: _S) -> dict:
        interrupt("ok?")
        with world.lock:
            calls["s1"] += 1
            n = calls["s1"]
        bid = world.book("s1")
        if n == 1:      # (R0's answered run: held until R1 is done)
            assert release.wait(20)
        elif n == 2:    # (R1's: raises)
            raise RuntimeError("s1 failed")
        return {"log": [bid]}

    def side(state: _S) -> dict:
        with world.lock:
            calls["side"] += 1
            n = calls["side"]
        bid = world.book("side")
        if n <= 2:      # (run 1's and R0's raise)
            if n == 2:
                r0_side_failed.set()
            raise RuntimeError("side failed")
        return {"log": [bid]}
    inner = StateGraph(_S)
    inner.add_node("s1", s1)
    inner.add_edge(START, "s1")
    inner.add_edge("s1", END)
    b = StateGraph(_S)
    b.add_node("sub", inner.compile())
    b.add_node("side", side)
    b.add_edge(START, "sub")
    b.add_edge(START, "side")
    b.add_edge("sub", END)
    b.add_edge("side", END)
    graph = b.compile(checkpointer=WalstoreSaver(world.store))
    config = {"configurable": {"thread_id": "t"}}
    with pytest.raises(RuntimeError):
        graph.invoke({"log": []}, config, durability=durability)
    errors = []

    def resume() -> None:
        try:
            graph.invoke(Command(resume="yes"), config, durability=durability)
        except RuntimeError as e:
            errors.append(str(e))
    r0 = threading.Thread(target=resume)
    r0.start()
    assert r0_side_failed.wait(20)

    time.sleep(0.3)    # (R0's side error saved)
    resume()           # R1
    release.set()
    r0.join()
    assert sorted(errors) == ["s1 failed", "side failed"], errors
    graph.invoke(None, config, durability=durability)   # (completes the step)
    state = graph.get_state(config)
    assert not state.next
    rec = set(state.values["log"])
    assert sorted(b.split("-")[0] for b in rec) == ["s1", "side"]
    booked, cancelled = _ledger(world.path)
    live = {b for b in booked if b not in cancelled}
    assert not rec - live, ("refunded while recorded", booked, cancelled, rec)
    assert len(cancelled) == len(set(cancelled)), cancelled
    if not full:
        world.store.close()
        return
    world.judge(rec)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_resume_in_flight_is_not_taken_for_one_cut_short_past_the_interrupt(
        tmp_path, durability):
    _in_flight_rounds(tmp_path, durability, full=False)


@pytest.mark.xfail(strict=_RACE_STRICT, reason="pre-stop-81: R1's answered s1 "
                   "booking, its run raising after it, stands beside the rerun's (the "
                   "state records one)")
@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_resume_in_flight_and_the_raised_answered_booking_of_the_other(
        tmp_path, durability):
    # (the same rounds; every live booking must be recorded)
    _in_flight_rounds(tmp_path, durability, full=True)
