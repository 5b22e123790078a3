"""Review of the LangGraph saver's cut-off of runs by undos made on the store (stop 76 h5).

Each test failed on the commit under review (``_watch_undo``, c881fda5, or the marking
of one undo's threads together, 4a7f71e6) and passes with its fix, on real stores, real
threads and LangGraph's own StateGraph, orderings forced with events:
- two rewinds of a thread under way at once (the second's turn ran out: it waited
  ``_REMOVAL_WAIT_S``), both refused (nothing changed): the one that failed last put
  back the other's mark, so the run in flight was cut off by no undo at all (the same
  for a ``saver.rewind`` and a ``store.rewind`` of the thread both refused: the first's
  mark stayed);
- an undo reaching two threads (savers whose roots nest) whose end raised for one of
  them left the other's marks (its runs cut off by an undo that changed nothing);
- an unscoped ``store.rewind`` (or one around threads) made in a graph node was refused
  with a StaleCheckpointError saying the thread "was rewound or deleted" (its own
  transaction refused by the cut-off it had just marked): nothing was undone (before the
  commit it was undone, and the run cut off at its next save, as now);
- the marks of undos of scopes around threads were kept for 64 scopes: at the 65th the
  oldest was forgotten, and a run it had cut off saved the step it undid.
The review also found the saver's reaction to ``store.revert`` (c881fda5: a revert of a
thread's work cut off its runs, and the refused run's unsaved steps' node transactions
were reverted) NOT safe: a parallel branch's transaction still open at the refusal
committed after it (its booking standing with no checkpoint, a retry booking again); a
task whose pending writes were saved before the revert kept its state "booked" while
refunded; a save in flight committed after the saver refunded its step.  Without the
automatic revert, a cut-off run's committed booking stood with no checkpoint instead.
And a revert of a node transaction leaves the thread's checkpoints (separate
transactions) saying what the node returned, whatever the saver does.  So the saver
does not react to ``store.revert`` at all (test_langgraph_store_undo_cuts_off_runs.py);
to undo a thread's steps, rewind the thread.
"""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402
from walstore.agent.scope import register_undo_watcher  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.keys import SaverKeys  # noqa: E402

from test_langgraph_findings import book_in, booking_store, plan_graph, standing  # noqa: E402
from test_langgraph_store_undo_cuts_off_runs import Held  # noqa: E402

WAIT_S = 30

_HOLDS: list = []   # what the next rewinds do in the watcher below, in turn (then nothing)
_HOLDS_LOCK = threading.Lock()


def _hold_rewinds(store, scope):
    """An undo watcher registered after the saver's (told after it): each rewind or
    purge calls the next of ``_HOLDS``, which waits and refuses it."""
    with _HOLDS_LOCK:
        hold = _HOLDS.pop(0) if _HOLDS else None
    return None if hold is None else hold()


def _overlapping_refused_rewinds(monkeypatch, first, second) -> list:
    """``first()`` and ``second()`` (each a rewind of thread "a") under way at once, the
    second's turn run out at once (``_REMOVAL_WAIT_S`` 0: as after waiting 120 s for a
    rewind whose compensations run long); each held in ``_hold_rewinds`` and refused
    there, the first first.  Returns the refusals."""
    from walstore.integrations.langgraph import saver as saver_mod
    monkeypatch.setattr(saver_mod, "_REMOVAL_WAIT_S", 0.0)
    told = [threading.Event(), threading.Event()]
    go = [threading.Event(), threading.Event()]

    def held(i: int):
        def hold():
            told[i].set()
            go[i].wait(WAIT_S)
            raise PermissionError(f"no rewind {i}")
        return hold
    refused: list = []

    def attempt(fn) -> None:
        try:
            fn()
        except PermissionError as e:
            refused.append(e)
    register_undo_watcher(_hold_rewinds)
    _HOLDS[:] = [held(0), held(1)]
    try:
        one = threading.Thread(target=attempt, args=(first,))
        one.start()
        assert told[0].wait(WAIT_S)
        two = threading.Thread(target=attempt, args=(second,))
        two.start()
        assert told[1].wait(WAIT_S)
        go[0].set()
        one.join(WAIT_S)
        go[1].set()
        two.join(WAIT_S)
    finally:
        go[0].set()
        go[1].set()
        _HOLDS.clear()
    return refused


def test_two_rewinds_of_a_thread_both_refused_cut_off_nothing(tmp_path, monkeypatch):
    """Run 2 of thread "a" is in Rome's step when two ``store.rewind``s of the thread are
    under way at once, and another undo watcher refuses both: the first refused, then
    the second.  Nothing was rewound, so the run goes on and saves every step (before:
    the second put back the first's mark, and the run was refused "the thread was
    rewound or deleted", its step unsaved, Rome booked with no checkpoint)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    held.graph.invoke({"plan": ["Paris", "Nice"], "booked": []}, config, durability="sync")
    th = held.start("a", ["Rome", "Oslo"])
    point = saver.rewind_point(held.state("a").config)
    prefix = saver.thread_scope("a")
    refused = _overlapping_refused_rewinds(
        monkeypatch, lambda: store.rewind(point, scope=prefix),
        lambda: store.rewind(point, scope=prefix))
    assert len(refused) == 2
    assert held.finish(th) == []
    assert held.state("a").values["booked"] == ["Paris", "Nice", "Rome", "Oslo"]
    assert standing(world) == ["Nice", "Oslo", "Paris", "Rome"]
    store.close()


def test_a_saver_rewind_and_a_store_rewind_of_the_thread_both_refused_leave_no_mark(
        tmp_path, monkeypatch):
    """``saver.rewind`` of thread "a" and a ``store.rewind`` of it under way at once (the
    second's turn run out), both refused, the saver's first: the thread has no mark left
    (before: the store.rewind put back the saver's, so a run of the thread loaded before
    it would be refused as of a rewound thread)."""
    from walstore.integrations.langgraph import saver as saver_mod
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    held.graph.invoke({"plan": ["Paris", "Nice"], "booked": []}, config, durability="sync")
    first = next(s for s in held.graph.get_state_history(config)
                 if s.values.get("booked") == ["Paris"])
    prefix = saver.thread_scope("a")
    point = saver.rewind_point(first.config)
    refused = _overlapping_refused_rewinds(
        monkeypatch, lambda: saver.rewind(first.config),
        lambda: store.rewind(point, scope=prefix))
    assert len(refused) == 2
    for kind in ("removals", "rewinds"):
        assert saver_mod._mark_of(store, kind, prefix) is None, kind
    store.close()


def test_an_end_that_raises_for_one_thread_still_ends_the_others(tmp_path, monkeypatch):
    """A ``store.rewind`` scoped to thread "x" of a saver whose root lies inside thread
    "a" of another saver reaches both threads; it fails before its commit (an unknown
    point), and taking "x"'s marks out raises (an interrupt there): "a"'s marks are
    taken out all the same and no thread stays under way (its saves would wait 120 s),
    the error raised after."""
    from walstore.integrations.langgraph import saver as saver_mod
    store = walstore.open(str(tmp_path / "s"), durability="none")
    outer = WalstoreSaver(store)
    a = outer.thread_scope("a")
    inner = WalstoreSaver(store, key_prefix=a + b"inner")
    x = inner.thread_scope("x")
    end = saver_mod._CutOff.end
    ended: list = []

    def failing(self, renewed):
        ended.append(self.key)
        if self.key == x:
            raise KeyboardInterrupt
        return end(self, renewed)
    monkeypatch.setattr(saver_mod._CutOff, "end", failing)
    with pytest.raises(KeyboardInterrupt):
        store.rewind(10 ** 9, scope=x)
    for kind in ("removals", "rewinds"):
        assert saver_mod._mark_of(store, kind, a) is None, kind
    assert sorted(ended) == sorted([a, x])
    assert not saver_mod._UNDERWAY.get(store)
    store.close()


@pytest.mark.parametrize("scope", [None, b"lg"])
def test_an_undo_around_threads_made_in_a_node_undoes_and_cuts_off_its_own_run(
        tmp_path, scope):
    """A node of thread "a" rewinds the whole store (or every thread: ``b"lg"``) to a
    point before thread "b"'s Rome booking and "a"'s own Oslo step: the rewind is made
    (Rome and Oslo refunded) and "a"'s run is refused at its next save, as before the
    commit under review.  With it, the rewind's own transaction was refused by the
    cut-off it had just marked (StaleCheckpointError "was rewound or deleted while this
    run worked"): nothing was undone and the run went on, booking Lima."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    outcome: list = []

    def node(s):
        here = s["plan"][0]
        if here == "rewind":
            try:
                outcome.append(store.rewind(point, scope=scope) is not None)
            except walstore.errors.WalstoreError as e:
                outcome.append(e)
        else:
            book_in(store, world, here)
        return {"plan": s["plan"][1:], "booked": [here]}
    graph = plan_graph(saver, node)
    b = {"configurable": {"thread_id": "b"}}
    graph.invoke({"plan": ["Paris"], "booked": []}, b)
    point = store.log(limit=1)[0].lsn
    graph.invoke({"plan": ["Rome"], "booked": []}, b)
    with pytest.raises(walstore.errors.ConflictError) as e:
        graph.invoke({"plan": ["Oslo", "rewind", "Lima"], "booked": []},
                     {"configurable": {"thread_id": "a"}}, durability="sync")
    assert outcome == [True]
    assert type(e.value).__name__ == "StaleCheckpointError"
    assert standing(world) == ["Paris"]
    assert graph.get_state(b).values["booked"] == ["Paris"]
    store.close()


def test_a_run_cut_off_by_an_undo_around_threads_stays_cut_off_after_64_others(tmp_path):
    """A ``store.rewind`` scoped around every thread (``b"lg"``) refunds Rome while the
    run of thread "a" is in Rome's step; then 64 other undos of scopes around threads
    (each a prefix of some thread ids) commit.  The run is still refused at its next
    save (before: such marks were kept for 64 scopes, the oldest forgotten at the 65th,
    and the run saved "booked Rome" beside the refund, booking Oslo)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    th = held.start("a", ["Paris", "Rome", "Oslo"])
    point = saver.rewind_point(held.state("a").config)
    assert store.rewind(point, scope=b"lg") is not None
    assert standing(world) == ["Paris"]
    root = SaverKeys(b"lg").root
    for i in range(64):   # (b"lg\x00" + the start of a 5-byte thread id: no whole thread)
        scope = root + b"\xa5z" + bytes([0x30 + i])
        before = store.log(limit=1)[0].lsn
        with store.transaction(scope=scope) as tx:
            tx.put(scope + b"k", i)
        assert store.rewind(before, scope=scope) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    assert held.state("a").values["booked"] == standing(world) == ["Paris"], world
    store.close()
