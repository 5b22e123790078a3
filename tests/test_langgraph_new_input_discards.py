"""New input sent to a thread whose last step a run of THIS process left unfinished (a
parallel branch failed, or called ``interrupt()``) while a sibling branch finished and
booked: LangGraph saved the finished branch's outcome (pending writes) on the head, and
a plain resume (``invoke(None)``, ``Command(resume=...)``) reads it back and never runs
the branch again -- but NEW input makes LangGraph discard the head's saved outcomes and
run the graph from the input, so the finished branch runs again and books again.
Before (stop 79 left it alone), its first booking stood with nothing recording it: two
live bookings in the world, one in the graph's state.  ``WalstoreSaver`` now reverts,
with its compensations, the work of the discarded outcomes once the run's input
checkpoint is saved on that head (``_undo_abandoned``), as it did after a kill
(``_undo_discarded``).  The world: an fsynced ledger file each booking and cancellation
is appended to.
"""
from __future__ import annotations

import logging
import operator
import sys
from pathlib import Path
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import Command, interrupt  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "findings_scripts"))
from langgraph_resume_kill_child import book, cancel_into, ledger  # noqa: E402,I001

CONFIG = {"configurable": {"thread_id": "t"}}
LOGGER = "walstore.integrations.langgraph.saver"


class State(TypedDict):
    log: Annotated[list, operator.add]


def live(path: str) -> list[str]:
    booked, cancelled = ledger(path)
    assert len(cancelled) == len(set(cancelled)), f"cancelled twice: {cancelled}"
    return sorted(b for b in booked if b not in cancelled)


def recorded(values: dict) -> list[str]:
    return sorted(v for v in values["log"] if "-" in v)


def fast_saved(saver: WalstoreSaver, config) -> None:
    """Wait until the step's ``fast`` branch finished and LangGraph saved its outcome on
    the checkpoint the step builds on: a branch still running when its sibling raises
    is cut off, its outcome never saved (LangGraph's executor shuts down first)."""
    import time
    if config["configurable"].get("__pregel_durability") == "exit":
        time.sleep(0.2)   # (nothing is saved before the run ends: give fast the time)
        return
    at = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                           "checkpoint_id": config["configurable"]["checkpoint_map"][""]}}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = saver.get_tuple(at)
        if got is not None and any(ch == "log" for _t, ch, _v in got.pending_writes):
            return
        time.sleep(0.005)
    raise AssertionError("fast's outcome was never saved")


def build(store, path: str, how: str, shape: str = "parallel", **saver_options):
    """``fast`` books and finishes; ``slow``, the first time it runs, fails (``how``
    "error") or asks (``interrupt()``, "interrupt") before it books, then books.
    ``shape`` "subgraph": ``fast`` is a subgraph (``f1`` books, then ``f2`` books), so
    its work is recorded by the subgraph's own checkpoints, not by an outcome of the
    outer task."""
    saver = WalstoreSaver(store, **saver_options)
    first = {"slow": True}

    def slow(state: State, config) -> dict:
        if first["slow"]:
            first["slow"] = False
            fast_saved(saver, config)
            if how == "error":
                raise RuntimeError("slow failed")
            interrupt("go on?")
        return {"log": [book(store, path, "slow")]}

    b = StateGraph(State)
    if shape == "subgraph":
        inner = StateGraph(State)
        inner.add_node("f1", lambda s: {"log": [book(store, path, "f1")]})
        inner.add_node("f2", lambda s: {"log": [book(store, path, "f2")]})
        inner.add_edge(START, "f1")
        inner.add_edge("f1", "f2")
        inner.add_edge("f2", END)
        b.add_node("fast", inner.compile())
    else:
        b.add_node("fast", lambda s: {"log": [book(store, path, "fast")]})
    b.add_node("slow", slow)
    b.add_edge(START, "fast")
    b.add_edge(START, "slow")
    b.add_edge("fast", END)
    b.add_edge("slow", END)
    return b.compile(checkpointer=saver), saver


def first_run(graph, how: str, durability: str) -> None:
    if how == "error":
        with pytest.raises(RuntimeError, match="slow failed"):
            graph.invoke({"log": ["go"]}, CONFIG, durability=durability)
    else:
        out = graph.invoke({"log": ["go"]}, CONFIG, durability=durability)
        assert "__interrupt__" in out


def checked(store_path: str) -> None:
    rep = verify_store(store_path)
    assert not (rep.errors or rep.pending_compensations or rep.in_doubt), rep


@pytest.mark.parametrize("durability", ["sync", "async"])
@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_new_input_after_an_unfinished_step_refunds_the_discarded_branch(
        tmp_path, caplog, how, durability):
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, how)
        first_run(graph, how, durability)
        assert [b.split("-")[0] for b in live(path)] == ["fast"]
        assert {t.name for t in graph.get_state(CONFIG).tasks if t.result} == {"fast"}
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            out = graph.invoke({"log": ["again"]}, CONFIG, durability=durability)
        got = recorded(out)
        assert sorted(b.split("-")[0] for b in got) == ["fast", "slow"], got
        # the state records one fast booking (the new run's) and the world holds it alone
        assert live(path) == got, (ledger(path), got)
        undo = saver.resume_undos[-1]
        assert undo.discarded and len(undo.undone) == 1 and not undo.left
        assert "new input" in caplog.text
    finally:
        store.close()
    checked(store_path)


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_plain_resume_keeps_the_finished_branch(tmp_path, how):
    # the control: invoke(None) / Command(resume=) reads fast's saved outcome back and
    # never runs it again -- its one booking stays, nothing is refunded
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, how)
        first_run(graph, how, "sync")
        out = graph.invoke(None if how == "error" else Command(resume="yes"), CONFIG)
        got = recorded(out)
        assert sorted(b.split("-")[0] for b in got) == ["fast", "slow"]
        assert live(path) == got
        assert ledger(path)[1] == []
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()
    checked(store_path)


def test_new_input_after_the_branch_was_resumed_refunds_nothing(tmp_path):
    # interrupted, resumed to the end (the resume read fast's outcome back), then new
    # input on the thread's new head: the head's step finished, nothing is discarded
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        first_run(graph, "interrupt", "sync")
        graph.invoke(Command(resume="yes"), CONFIG)
        out = graph.invoke({"log": ["again"]}, CONFIG)
        got = recorded(out)
        assert sorted(b.split("-")[0] for b in got) == ["fast", "fast", "slow", "slow"]
        assert live(path) == got and ledger(path)[1] == []
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()
    checked(store_path)


def test_a_fork_of_the_interrupted_checkpoint_after_its_resume_keeps_the_booking(
        tmp_path):
    # interrupted on checkpoint P (fast's outcome saved there), resumed: the resume's
    # step built on P read fast's outcome back and recorded its booking in the next
    # checkpoint.  New input sent to P itself (time travel) branches: the main line
    # still records the first booking, so it must stay (the branch books its own)
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        first_run(graph, "interrupt", "sync")
        p = graph.get_state(CONFIG).config
        main = graph.invoke(Command(resume="yes"), CONFIG)
        branch = graph.invoke({"log": ["fork"]}, p)
        assert ledger(path)[1] == []
        assert live(path) == sorted(recorded(main) + [
            b for b in recorded(branch) if b not in recorded(main)])
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()
    checked(store_path)


def test_a_subgraph_branch_recorded_by_its_own_checkpoints_is_refunded_too(tmp_path):
    # fast is a subgraph: its two bookings are recorded by the subgraph's checkpoints
    # (invoke(None) would resume it from there); new input runs a new subgraph task
    # from its start, so both first bookings are discarded and refunded
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "error", shape="subgraph")
        first_run(graph, "error", "sync")
        assert sorted(b.split("-")[0] for b in live(path)) == ["f1", "f2"]
        out = graph.invoke({"log": ["again"]}, CONFIG)
        got = recorded(out)
        assert sorted(b.split("-")[0] for b in got) == ["f1", "f2", "slow"]
        assert live(path) == got, (ledger(path), got)
    finally:
        store.close()
    checked(store_path)


def test_undo_on_resume_false_leaves_the_discarded_booking(tmp_path):
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "error", undo_on_resume=False)
        first_run(graph, "error", "sync")
        graph.invoke({"log": ["again"]}, CONFIG)
        assert [b.split("-")[0] for b in live(path)] == ["fast", "fast", "slow"]
        assert not saver.resume_undos
    finally:
        store.close()


class SlowInputSaver(WalstoreSaver):
    """Holds the save of an input checkpoint (LangGraph makes it in the background while
    the first step's tasks run), so the tasks re-run from new input read first."""

    def put(self, config, checkpoint, metadata, new_versions):
        if metadata.get("source") == "input":
            import time
            time.sleep(0.3)
        return super().put(config, checkpoint, metadata, new_versions)


def build_idempotent(store, path: str, saver: WalstoreSaver):
    """``fast`` books only when its key says it has not (the usual way to make a node
    safe to run again), in one walstore transaction; ``slow`` fails the first time."""
    first = {"slow": True}

    def fast(state: State) -> dict:
        with store.transaction() as tx:
            bid = tx.get("booked/fast")
            if bid is None:
                import uuid
                from langgraph_resume_kill_child import append
                bid = f"fast-{uuid.uuid4().hex[:8]}"
                with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                    append(path, f"book {bid}")
                    act.result = {"ok": True}
                tx.put("booked/fast", bid)
        return {"log": [bid]}

    def slow(state: State, config) -> dict:
        if first["slow"]:
            first["slow"] = False
            fast_saved(saver, config)
            raise RuntimeError("slow failed")
        return {"log": [book(store, path, "slow")]}

    b = StateGraph(State)
    b.add_node("fast", fast)
    b.add_node("slow", slow)
    b.add_edge(START, "fast")
    b.add_edge(START, "slow")
    b.add_edge("fast", END)
    b.add_edge("slow", END)
    return b.compile(checkpointer=saver)


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_a_rerun_that_reads_its_own_booking_key_sees_the_undo_first(tmp_path, durability):
    # the input checkpoint's save is held: "fast", run again from the new input, begins
    # its transaction before that save.  Undone only at the save, the first booking was
    # found by fast's key, kept as its answer, and then refunded: the state recorded a
    # cancelled booking.  The undo now comes first, at fast's transaction's begin
    # (_discard_early), so fast books anew; under "exit" (no input checkpoint saved at
    # all) too
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        saver = SlowInputSaver(store)
        graph = build_idempotent(store, path, saver)
        with pytest.raises(RuntimeError, match="slow failed"):
            graph.invoke({"log": ["go"]}, CONFIG, durability=durability)
        if durability == "exit":
            # (nothing saved by the failed run under "exit": nothing records fast's
            # outcome, and LangGraph runs the whole step again -- fast finds its key)
            out = graph.invoke({"log": ["again"]}, CONFIG, durability=durability)
            assert live(path) == recorded(out)
            return
        (first,) = live(path)
        out = graph.invoke({"log": ["again"]}, CONFIG, durability=durability)
        got = recorded(out)
        assert first not in got and live(path) == got, (ledger(path), got)
        assert store.get("booked/fast") in got
    finally:
        store.close()
    checked(store_path)


def test_a_plain_resume_takes_no_early_undo(tmp_path):
    # the run that loaded the head with work to discard resumes with None: its step
    # builds on the head itself, so its first node transaction undoes nothing
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph = build_idempotent(store, path, WalstoreSaver(store))
        with pytest.raises(RuntimeError, match="slow failed"):
            graph.invoke({"log": ["go"]}, CONFIG)
        (first,) = live(path)
        out = graph.invoke(None, CONFIG)
        assert first in recorded(out) and live(path) == recorded(out)
        assert ledger(path)[1] == []
    finally:
        store.close()
    checked(store_path)


def build_failing_after_booking(store, path: str, saver: WalstoreSaver,
                                before: str = "error"):
    """``fast`` books and finishes; ``slow`` books, then -- the first time -- raises
    (``before`` "error") or asks (``interrupt()``, "interrupt") after its booking."""
    first = {"slow": True}

    def slow(state: State, config) -> dict:
        bid = book(store, path, "slow")
        if first["slow"]:
            first["slow"] = False
            fast_saved(saver, config)
            if before == "error":
                raise RuntimeError("slow failed")
        if before == "interrupt":
            interrupt("go on?")
        return {"log": [bid]}

    b = StateGraph(State)
    b.add_node("fast", lambda s: {"log": [book(store, path, "fast")]})
    b.add_node("slow", slow)
    b.add_edge(START, "fast")
    b.add_edge(START, "slow")
    b.add_edge("fast", END)
    b.add_edge("slow", END)
    return b.compile(checkpointer=saver)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_resume_rerunning_a_task_that_failed_after_booking_refunds_it_first(
        tmp_path, durability):
    # slow booked, then raised: LangGraph saved its error (and fast's outcome); a plain
    # resume runs slow again from its start, which books again.  Before, the failed
    # attempt's booking stood beside the new one, the state recording one (the GUIDE's
    # "still by hand"); now the rerun's first transaction reverts it first
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        saver = WalstoreSaver(store)
        graph = build_failing_after_booking(store, path, saver)
        with pytest.raises(RuntimeError, match="slow failed"):
            graph.invoke({"log": ["go"]}, CONFIG, durability=durability)
        failed = [b for b in live(path) if b.startswith("slow")]
        out = graph.invoke(None, CONFIG, durability=durability)
        got = recorded(out)
        assert sorted(b.split("-")[0] for b in got) == ["fast", "slow"]
        assert failed[0] not in got and live(path) == got, (ledger(path), got)
        assert [u for u in saver.resume_undos if u.undone][-1].rerun
    finally:
        store.close()
    checked(store_path)


def test_a_resume_rerunning_an_interrupted_task_keeps_its_first_booking(tmp_path):
    # interrupt() is no failure: LangGraph's documented semantics (the node runs again
    # from its start on the answer, so book after interrupt()) are kept -- and a node
    # that books only when its key says it has not keeps the booking the human saw
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        saver = WalstoreSaver(store)
        graph = build_failing_after_booking(store, path, saver, before="interrupt")
        graph.invoke({"log": ["go"]}, CONFIG)
        graph.invoke(Command(resume="yes"), CONFIG)
        assert ledger(path)[1] == []
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_resume_whose_first_step_begins_no_transaction_discards_nothing(
        tmp_path, durability):
    # the resume re-runs only "slow", which makes no walstore transaction; the next
    # step's node ("after") makes the run's first one, on a checkpoint other than the
    # head -- the resume's own, not new input's: fast's booking, read back, stays
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    first = {"slow": True}

    def slow(state: State, config) -> dict:
        if first["slow"]:
            first["slow"] = False
            fast_saved(saver, config)
            raise RuntimeError("slow failed")
        return {"log": ["slow ran"]}
    try:
        saver = WalstoreSaver(store)
        b = StateGraph(State)
        b.add_node("fast", lambda s: {"log": [book(store, path, "fast")]})
        b.add_node("slow", slow)
        b.add_node("after", lambda s: {"log": [book(store, path, "after")]})
        b.add_edge(START, "fast")
        b.add_edge(START, "slow")
        b.add_edge(["fast", "slow"], "after")
        b.add_edge("after", END)
        graph = b.compile(checkpointer=saver)
        with pytest.raises(RuntimeError, match="slow failed"):
            graph.invoke({"log": ["go"]}, CONFIG, durability=durability)
        out = graph.invoke(None, CONFIG, durability=durability)
        got = recorded(out)
        assert sorted(x.split("-")[0] for x in got) == ["after", "fast"]
        assert live(path) == got and ledger(path)[1] == [], (ledger(path), got)
    finally:
        store.close()
    checked(store_path)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_new_input_after_a_task_failed_with_its_booking_made_refunds_it(
        tmp_path, durability):
    # slow booked, then raised: nothing records its booking; new input runs the graph
    # from the input (slow again) -- the failed run's booking is refunded as a plain
    # resume's re-run would refund it, fast's discarded one too
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        saver = WalstoreSaver(store)
        graph = build_failing_after_booking(store, path, saver)
        with pytest.raises(RuntimeError, match="slow failed"):
            graph.invoke({"log": ["go"]}, CONFIG, durability=durability)
        first = live(path)
        out = graph.invoke({"log": ["again"]}, CONFIG, durability=durability)
        got = recorded(out)
        assert not set(first) & set(got) and live(path) == got, (ledger(path), got)
    finally:
        store.close()
    checked(store_path)


def test_a_parallel_branch_waits_for_the_undo_another_branch_began(tmp_path):
    # the run from new input starts "other" and the idempotent "fast" side by side;
    # "other"'s transaction begins first and makes the undo, newest first: fast's note
    # (its compensator takes 0.3 s), then fast's booking with its key.  fast's
    # transaction, begun meanwhile, waits for the undo before it reads -- else it found
    # the booking's key still there, kept that booking, and the undo then refunded it
    import time
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={
        "cancel": cancel_into(path), "unnote": lambda action: time.sleep(0.3)})
    first = {"other": True, "fast": True}
    saver = WalstoreSaver(store)

    def fast(state: State) -> dict:
        again, first["fast"] = not first["fast"], False
        if again:
            time.sleep(0.05)   # (second run: after other's transaction began)
        with store.transaction() as tx:
            bid = tx.get("booked/fast")
            if bid is None:
                import uuid
                from langgraph_resume_kill_child import append
                bid = f"fast-{uuid.uuid4().hex[:8]}"
                with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                    append(path, f"book {bid}")
                    act.result = {"ok": True}
                tx.put("booked/fast", bid)
        if not again:
            with store.transaction() as tx:
                with tx.action("note", args={}, compensate="unnote"):
                    pass
        return {"log": [bid]}

    def other(state: State, config) -> dict:
        if first["other"]:
            first["other"] = False
            fast_saved(saver, config)
            raise RuntimeError("other failed")
        with store.transaction() as tx:
            tx.put("other", True)
        return {"log": ["other ran"]}
    try:
        b = StateGraph(State)
        b.add_node("fast", fast)
        b.add_node("other", other)
        b.add_edge(START, "fast")
        b.add_edge(START, "other")
        b.add_edge("fast", END)
        b.add_edge("other", END)
        graph = b.compile(checkpointer=saver)
        with pytest.raises(RuntimeError, match="other failed"):
            graph.invoke({"log": ["go"]}, CONFIG)
        (first_booking,) = live(path)
        out = graph.invoke({"log": ["again"]}, CONFIG)
        got = recorded(out)
        assert first_booking not in got and live(path) == got, (ledger(path), got)
        assert store.get("booked/fast") in got
    finally:
        store.close()
    checked(store_path)
