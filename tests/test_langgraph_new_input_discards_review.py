"""Review of stop 80's ``_undo_abandoned`` (new input sent to a head whose step a run of
THIS process left unfinished refunds the finished branches' bookings LangGraph
discards), each case a real LangGraph graph on a real walstore store with an fsynced
ledger file as the world; the check: every booking the final graph state(s) record is
live exactly once, nothing else is live, nothing is cancelled twice, ``verify_store``
clean.

Found (helper h1, stop 80):

- ``copy_thread`` of the thread after the unfinished step, then new input on the
  source: the fix refunded the finished branch's booking while the copy still held the
  head with the branch's saved outcome, so the copy's resume returned a cancelled
  booking as done (before the fix both stood, each recorded by one line; and new input
  on both left the first booking standing, recorded by neither).  Fixed: threads
  related by ``copy_thread`` (``_kin``) judge the step together -- nothing is reverted
  while one of them still records the head's outcomes (``_kin_records``), and the one
  whose new input drops the last record reverts it, in the scope of the thread whose
  run committed it.
- ``durability="exit"`` saves no input checkpoint, so new input refunds nothing: the
  first booking stands beside the new one (documented in docs/GUIDE.md, as for a kill;
  a plain resume first keeps one booking).
- ``graph.update_state`` on the unfinished head (with ``as_node``, or without: LangGraph
  infers ``__start__`` and runs both branches again) drops the finished branch's saved
  outcome as new input does, and refunded nothing: the first booking stood recorded
  nowhere (or beside the branch's new one).  Fixed: the update's checkpoint (source
  "update") is judged as an input checkpoint, unless it applied the outcomes
  (``update_state(config, None, as_node=END)``: ``_update_applies``, by LangGraph's
  ``versions_seen``), which keeps them.  An update whose values record the booking by
  hand is not told apart (documented: apply the outcomes with ``as_node=END`` first).
- a ``__copy__`` fork of the unfinished head (``update_state(config, None,
  as_node="__copy__")``) saves a sibling without the head's saved outcomes; its resume
  ran the finished branch again and the first booking stood (the put of source "fork"
  names the head's parent, not the head).  Fixed: ``_forked_from`` finds the copied
  checkpoint (a sibling with the same channel and seen versions) and judges it as new
  input on it.

Also tried, and consistent (no test here): ainvoke/astream with sync and async
durability under an ``interrupt()``, the functional API (an ``@entrypoint``'s or a
sibling ``@task``'s error or interrupt after a booking ``@task``), ``create_react_agent``
v2 with one booking and one failing/interrupting tool, nested subgraphs with parallel
branches inside, ``Command(update=)`` / ``Command(goto=)`` resumes, new input naming the
head's ``checkpoint_id``, new input twice, failing twice then new input, a resume still
running in another Python thread when the new input lands (it loses the race, its work
undone), a ``saver.rewind`` or ``store.revert`` that already undid the booking, two
threads, ``bulk_update_state``.  Left, documented as by hand: with ``ainvoke`` a failing
branch cancels a sync sibling whose booking still commits in its worker thread (and
``durability="exit"`` with an error may save no outcome of a sibling that finished
late): no outcome is saved, and a plain resume books again too; ``fencing=False``
refunds nothing (no run token is kept).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END  # noqa: E402
from langgraph.types import Command  # noqa: E402

import walstore  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "findings_scripts"))
from langgraph_resume_kill_child import cancel_into, ledger  # noqa: E402,I001
from test_langgraph_new_input_discards import (  # noqa: E402
    CONFIG, build, checked, first_run, live, recorded)

COPY = {"configurable": {"thread_id": "t2"}}


def resume_input(how: str):
    return None if how == "error" else Command(resume="yes")


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_copy_of_the_thread_keeps_the_booking_its_resume_returns(tmp_path, how):
    # the copy holds the unfinished head with fast's saved outcome: its resume returns
    # fast's first booking as done, so new input on the source must not refund it
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, how)
        first_run(graph, how, "sync")
        saver.copy_thread("t", "t2")
        source = graph.invoke({"log": ["again"]}, CONFIG)
        copy = graph.invoke(resume_input(how), COPY)
        got = sorted(recorded(source) + recorded(copy))
        assert sorted(b.split("-")[0] for b in got) == ["fast", "fast", "slow", "slow"]
        assert ledger(path)[1] == [], ledger(path)
        assert live(path) == got, (ledger(path), got)
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()
    checked(store_path)


def test_a_copy_given_new_input_first_lets_the_source_refund(tmp_path):
    # the copy discards the saved outcome itself (new input on it), so it records the
    # first booking no more: the source's new input then refunds it, once
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        first_run(graph, "interrupt", "sync")
        first = live(path)
        saver.copy_thread("t", "t2")
        copy = graph.invoke({"log": ["copy"]}, COPY)
        if "__interrupt__" in copy:
            copy = graph.invoke(Command(resume="yes"), COPY)
        source = graph.invoke({"log": ["again"]}, CONFIG)
        got = sorted(recorded(source) + recorded(copy))
        assert ledger(path)[1] == first, ledger(path)
        assert live(path) == got, (ledger(path), got)
    finally:
        store.close()
    checked(store_path)
    checked(store_path)


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_the_source_given_new_input_first_lets_the_copy_refund(tmp_path, how):
    # the source's new input leaves the booking (the copy records it); the copy's new
    # input then drops the last record of it: refunded once, from the source's scope
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, how)
        first_run(graph, how, "sync")
        first = live(path)
        saver.copy_thread("t", "t2")
        source = graph.invoke({"log": ["again"]}, CONFIG)
        assert ledger(path)[1] == []
        copy = graph.invoke({"log": ["copy"]}, COPY)
        got = sorted(recorded(source) + recorded(copy))
        assert ledger(path)[1] == first, ledger(path)
        assert live(path) == got, (ledger(path), got)
        assert saver.resume_undos[-1].discarded
    finally:
        store.close()
    checked(store_path)


def test_durability_exit_saves_no_input_and_the_discarded_booking_stands(tmp_path):
    # documented: "exit" saves no input checkpoint, so nothing marks the discard; the
    # first booking stands beside the run's new one (the state records one)
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        first_run(graph, "interrupt", "exit")
        out = graph.invoke({"log": ["again"]}, CONFIG, durability="exit")
        assert [b.split("-")[0] for b in recorded(out)].count("fast") == 1
        assert [b.split("-")[0] for b in live(path)].count("fast") == 2
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()


def test_durability_exit_a_plain_resume_first_keeps_one_booking(tmp_path):
    # the documented way round: resume (it reads fast's outcome back), then new input
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "interrupt")
        first_run(graph, "interrupt", "exit")
        graph.invoke(Command(resume="yes"), CONFIG, durability="exit")
        out = graph.invoke({"log": ["again"]}, CONFIG, durability="exit")
        assert live(path) == recorded(out) and ledger(path)[1] == []
    finally:
        store.close()
    checked(store_path)


@pytest.mark.parametrize("how", ["error", "interrupt"])
@pytest.mark.parametrize("as_node", ["slow", None], ids=["as_node_given", "as_node_inferred"])
def test_update_state_on_the_unfinished_head_refunds_what_it_discards(tmp_path, as_node,
                                                                       how):
    # update_state drops fast's saved outcome (as_node given: fast never runs again;
    # inferred: LangGraph takes it for __start__'s and runs fast again): the first
    # booking is recorded nowhere, and must be refunded
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, how)
        first_run(graph, how, "sync")
        first = live(path)
        graph.update_state(CONFIG, {"log": ["upd"]}, as_node=as_node)
        graph.invoke(None, CONFIG)
        got = recorded(graph.get_state(CONFIG).values)
        assert live(path) == got, (ledger(path), got)
        assert ledger(path)[1] == first
        assert saver.resume_undos[-1].discarded
    finally:
        store.close()
    checked(store_path)


def test_update_state_as_end_applies_the_outcomes_and_keeps_the_booking(tmp_path):
    # update_state(config, None, as_node=END) applies the saved outcomes (fast's
    # booking is in the new checkpoint): nothing is refunded, then or on new input
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "error")
        first_run(graph, "error", "sync")
        graph.update_state(CONFIG, None, as_node=END)
        kept = recorded(graph.get_state(CONFIG).values)
        assert [b.split("-")[0] for b in kept] == ["fast"]
        out = graph.invoke({"log": ["again"]}, CONFIG)
        assert ledger(path)[1] == []
        assert live(path) == sorted(set(kept + recorded(out))), ledger(path)
        assert not [u for u in saver.resume_undos if u.undone]
    finally:
        store.close()
    checked(store_path)


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_copy_fork_of_the_unfinished_head_refunds_what_it_drops(tmp_path, how):
    # the fork is a copy of the head beside it, without its saved outcomes: its resume
    # runs fast again, so fast's first booking is refunded as the fork is saved
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, how)
        first_run(graph, how, "sync")
        first = live(path)
        graph.update_state(CONFIG, None, as_node="__copy__")
        assert ledger(path)[1] == first
        out = graph.invoke(None, CONFIG)
        if "__interrupt__" in out:
            out = graph.invoke(Command(resume="yes"), CONFIG)
        got = recorded(out)
        assert sorted(b.split("-")[0] for b in got) == ["fast", "slow"]
        assert live(path) == got, (ledger(path), got)
    finally:
        store.close()
    checked(store_path)
