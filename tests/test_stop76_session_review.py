"""Review of stop 76's session cut-offs (h4): undos racing a session's writes.

A session write (and a tool's transaction in the session's scope) checks, as it runs,
that no rewind, erase or purge of the session by another caller is under way or
committed since its caller last read or wrote it.  The write's undo fence refuses its
commit after a rewind of the session's scope (or around it) or a purge, but not after a
rewind scoped INSIDE the session's scope (``store.rewind(point, scope=session.scope +
"k/")``, its tool state), which compensates the session's bookings: a write whose check
passed before such a rewind began and that committed after it stood (the turn saved
"booked" beside the refunded booking, or its tool booked after it for good).  Each
checked transaction gets a commit-time check (``Transaction.commit_check``, run under
the journal lock as it appends) that refuses it when such an undo was marked under way
since its check; the retried session write is then refused as cut off, and a tool's
transaction is rolled back, its booking compensated.  (Written for ``store.revert``,
whose reach the session cut off turns for until the lead's decision that a revert cuts
off no turn: tests/test_revert_watchers.py.)  The undo watchers are interrupt-safe, and a
revert retried after an ``on_revert`` watcher refused it tells the others once.

Orderings are forced with events and the store's fault points, on real stores and real
threads.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import weakref

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
import walstore.integrations.openai_agents as oa  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import (WAIT_S, spy_rewind_waits, assistant, book, held_cancel, store,  # noqa: E402,F401
                             user)


def states(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


def rewind_inside(store, session, point) -> object:
    """``store.rewind`` of the session's tool state (a scope inside its scope) to
    ``point``: it compensates the session's bookings made since."""
    return store.rewind(point, scope=session.scope + "k/")


def pause_after_check(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The next session write that passed its check (``_guarded``) signals the first
    event from inside its transaction function and holds there until the second."""
    checked, go_on = threading.Event(), threading.Event()
    orig = oa.WalstoreSession._pinned_branch
    once = [True]

    def pinned(self, tx):
        if once[0]:
            once[0] = False
            checked.set()
            go_on.wait(WAIT_S)
        return orig(self, tx)
    monkeypatch.setattr(oa.WalstoreSession, "_pinned_branch", pinned)
    return checked, go_on


def test_a_rewind_scoped_inside_the_session_cuts_off_its_turn_in_flight(store):
    """``store.rewind(point, scope=session.scope + "k/")`` (the session's tool state)
    compensates the session's bookings (declared around that scope).  Before: only a
    rewind scoped to the session's scope or around it cut off the turn; this one let it
    save "booked" after the refund."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        point = store.log(limit=1)[0].lsn
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()
        assert await asyncio.to_thread(store.rewind, point, scope=s.scope + "k/")
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await s.add_items([assistant("oslo is booked")])
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]


@pytest.mark.parametrize("undo", ["ended", "compensating"])
def test_a_session_write_checked_before_a_rewind_inside_it_is_refused_at_commit(
        store, monkeypatch, undo):
    """The turn's save passed its check; then a rewind of the session's tool state
    began, committed and refunded the turn's booking (or is still refunding); then the
    save commits.  Without the commit-time check it stands ("booked oslo" after the
    refund: that rewind's commit does not meet the write's undo fence).  The check
    refuses it, and its retry is refused as cut off (or waits for the refund to end,
    then is refused)."""
    world: list[str] = []
    if undo == "ended":
        store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    else:
        compensating, release = held_cancel(store, world)
        waiting = spy_rewind_waits(monkeypatch)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("book oslo")])
        point = store.log(limit=1)[0].lsn
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()                               # the turn begins
        checked, go_on = pause_after_check(monkeypatch)
        save = asyncio.create_task(s.add_items([assistant("booked oslo")]))
        try:
            assert await asyncio.to_thread(checked.wait, WAIT_S)
            if undo == "ended":
                assert await asyncio.to_thread(rewind_inside, store, s, point)
            else:
                t = threading.Thread(target=rewind_inside, args=(store, s, point))
                t.start()
                assert await asyncio.to_thread(compensating.wait, WAIT_S)
                go_on.set()    # (the save commits while the refund runs: it waits)
                assert await asyncio.to_thread(waiting.wait, WAIT_S)
                assert not save.done()
                release.set()
                await asyncio.to_thread(t.join, WAIT_S)
        finally:
            go_on.set()
            if undo != "ended":
                release.set()
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await save
        assert await s.get_items() == [user("book oslo")]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]


def test_a_tools_booking_let_through_before_a_rewind_inside_is_rolled_back_at_commit(
        store):
    """A tool of the turn declares its booking in the session's scope (the guard lets it
    through: nothing under way) and books; a rewind of the session's tool state, which
    refunds the turn's earlier booking, runs whole; then the tool's transaction commits.
    Without the commit-time check the new booking stands after the rewind, never
    compensated.  Its commit is refused and it rolls back: its compensation runs (the
    booking cancelled)."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    entered, go_on = threading.Event(), threading.Event()

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("book oslo and rome")])
        point = store.log(limit=1)[0].lsn
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()                               # the turn goes on
        tool = asyncio.create_task(asyncio.to_thread(
            book, store, s, "rome", world, entered=entered, go_on=go_on))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            assert await asyncio.to_thread(rewind_inside, store, s, point)
        finally:
            go_on.set()
        with pytest.raises(walstore.ConflictError, match="refused at commit"):
            await tool
    asyncio.run(go())
    assert world == ["book oslo", "book rome", "cancel oslo", "cancel rome"]
    assert states(store) == [("oslo", "compensated"), ("rome", "compensated")]
    assert store.get(WalstoreSession("u", store).key("bookings/rome")) is None


def test_a_tools_booking_outlasting_a_rewind_that_changed_nothing_commits(store):
    """As above, but the rewind inside the session's scope marks the session and then
    changes nothing (its point names nothing: UnknownPoint) while the tool's transaction
    is open.  Its commit-time check refused the booking all the same (rolled back, its
    refund run) though nothing was undone — the guide says an undo that changes nothing
    cuts off nobody (h6's note, stop 76).  It commits now."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    entered, go_on = threading.Event(), threading.Event()

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("book rome")])
        await s.get_items()
        tool = asyncio.create_task(asyncio.to_thread(
            book, store, s, "rome", world, entered=entered, go_on=go_on))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            with pytest.raises(walstore.UnknownPoint):
                await asyncio.to_thread(rewind_inside, store, s, "no-such-point")
        finally:
            go_on.set()
        await tool
        await s.add_items([assistant("rome booked")])   # (the turn writes on)
    asyncio.run(go())
    assert world == ["book rome"]
    assert states(store) == [("rome", "committed")]
    assert store.get(WalstoreSession("u", store).key("bookings/rome")) == "confirmed"


def test_a_tools_transaction_that_reads_a_workspace_keeps_the_sessions_commit_check(
        store, tmp_path):
    """The tool's transaction reads a workspace file after its booking was let through:
    the file layer's own commit check (set at the first read) replaced the transaction's
    ``commit_check`` instead of adding to it, so the session's went, and the booking
    stood after the undo (a rewind of the session's tool state, here).  Both are kept
    now (``add_commit_check``)."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    root = tmp_path / "ws"
    root.mkdir()
    (root / "plan.txt").write_text("rome")
    ws = store.workspace(str(root))
    entered, go_on = threading.Event(), threading.Event()

    def tool(s):
        with store.transaction() as tx:
            with tx.action("book", args={"what": "rome"}, compensate="cancel",
                           scope=s.scope) as act:
                world.append("book rome")
                act.result = "rome"
            assert tx.files(ws).read("plan.txt") == b"rome"
            entered.set()
            go_on.wait(WAIT_S)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("book oslo and rome")])
        point = store.log(limit=1)[0].lsn
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()
        booking = asyncio.create_task(asyncio.to_thread(tool, s))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            assert await asyncio.to_thread(rewind_inside, store, s, point)
        finally:
            go_on.set()
        with pytest.raises(walstore.ConflictError, match="a rewind of session scope"):
            await booking
    asyncio.run(go())
    assert world == ["book oslo", "book rome", "cancel oslo", "cancel rome"]


@pytest.mark.parametrize("how,said,noun", [
    ("session.rewind", "was rewound", "a rewind"),
    ("store.rewind", "was rewound", "a rewind"),
    ("session.erase", "was erased", "an erase"),
    ("store.purge", "was purged", "a purge"),
])
def test_the_refusals_name_the_undo_that_cut_the_turn_off(store, how, said, noun):
    """Before: the turn's save was told the session "was rewound ... (the turns after the
    point were retracted ...)", and its tool "a rewind or erase", whatever cut it off: a
    purge too.  Now each names it."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        other = WalstoreSession("u", store)   # (another caller's object, its own task)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()                               # the turn begins
        if how == "session.rewind":
            await asyncio.create_task(other.rewind("p"))
        elif how == "session.erase":
            await asyncio.create_task(other.erase())
        elif how == "store.rewind":
            point = (await s.restore_points())["p"]
            await asyncio.to_thread(store.rewind, point, scope=s.scope)
        else:
            await asyncio.to_thread(store.purge, s.scope)
        with pytest.raises(walstore.ConflictError) as e:
            await s.add_items([assistant("oslo is booked")])
        message = str(e.value)
        assert f"{said} by another caller" in message and "\n" not in message
        for other_said in {"was rewound", "was erased", "was purged"} - {said}:
            assert other_said not in message
        with pytest.raises(walstore.ConflictError) as e:
            await asyncio.to_thread(book, store, s, "rome", world)
        assert f"{noun} of session scope" in str(e.value)
        assert "refused, nothing ran" in str(e.value)
    asyncio.run(go())
    assert "book rome" not in world


def _interrupted(k: int, files: set, fn, *args):
    """``fn(*args)`` in this (the main) thread with a KeyboardInterrupt at the k-th point
    where a signal handler could run ("call", "c_return": see test_interrupt_points)
    inside a function of ``files``, none while walstore holds signals off
    (``walstore.signals.deferred``); where it landed, or None when ``fn`` ran through."""
    from walstore import signals
    at = {"n": 0, "where": None}

    def hook(frame, event, arg):
        if (at["where"] or signals._DEFERRED.depth or event not in ("call", "c_return")
                or frame.f_code.co_filename not in files):
            return
        if at["n"] == k:
            at["where"] = f"{event} {frame.f_code.co_name}:{frame.f_lineno}"
            raise KeyboardInterrupt(at["where"])
        at["n"] += 1
    sys.setprofile(hook)
    try:
        fn(*args)
    except KeyboardInterrupt:
        if at["where"] is None:
            raise
    finally:
        sys.setprofile(None)
    return at["where"]


def test_an_interrupt_anywhere_in_the_undo_watching_leaves_the_session_sound(store):
    """Ctrl-C in a sync program's ``store.rewind`` of the session's scope past a booking,
    at every point of the undo watchers' code (walstore.agent.scope, the session's
    watcher and its end, the session's lock's): the session is never left marked under
    way (its every write waited 120 s then was refused, every tool refused, for good),
    its lock never held, the thread never left exempt (``_REWINDING``: its writes to the
    session never cut off again), and it is counted as cut off exactly when the undo
    committed.  Before: an interrupt at the start of ``WatchedUndo.__exit__`` or before
    its ends ran, in ``_cut_off_sessions`` between its marks and its end, in the end
    between two of its steps, or right after the lock's Condition took it, left it so."""
    from walstore.agent import scope
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    s = WalstoreSession("u", store)
    asyncio.run(s.add_items([user("hi")]))
    state = s._lock
    files = {oa.__file__, scope.__file__, threading.__file__}
    landed = []
    for k in range(10_000):
        point = store.log(limit=1)[0].lsn
        book(store, s, f"b{k}", world)
        epoch = state.epoch
        where = _interrupted(k, files, store.rewind, point, s.scope)
        committed = dict(states(store))[f"b{k}"] != "committed"
        assert state.underway == [], where
        assert state.done._lock.acquire(False), where
        state.done._lock.release()
        assert oa._REWINDING.get() == (), where
        assert scope.undo_kind() is None, where
        assert state.epoch == epoch + committed, where
        if where is None:
            break
        landed.append(where)
    assert len(landed) > 10   # (the sweep walked the watchers' code)


_MARKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> counts


def _marking_undo(store, scope):
    return None


def _marking_revert(store, reach):
    """An ``on_revert`` watcher counting [told, ended, ended as committed]."""
    counts = _MARKED.get(store)
    if counts is None:
        return None
    counts[0] += 1

    def end(committed):
        counts[1] += 1
        counts[2] += bool(committed)
    return end


def test_an_interrupt_anywhere_in_a_reverts_watching_ends_each_watcher_told(store):
    """The ``on_revert`` contract: Ctrl-C in a sync program's ``store.revert`` at every
    point of walstore.agent.scope's code: a watcher told of the revert has its end run
    once, with ``committed`` True exactly when the revert committed (an integration's
    marks, taken in the watcher and taken out in its end, are never left for good).
    Before (stop 76 h4): an interrupt at the start of ``WatchedUndo.__exit__`` or
    before its ends ran skipped them."""
    from walstore.agent import scope
    from walstore.agent.scope import register_undo_watcher
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")
    register_undo_watcher(_marking_undo, on_revert=_marking_revert)   # (once a process)
    counts = _MARKED[store] = [0, 0, 0]
    store.compensator("cancel")(lambda a: None)
    files = {scope.__file__}
    landed = []
    for k in range(10_000):
        with store.transaction() as tx:
            with tx.action("book", args={"what": f"b{k}"}, compensate="cancel",
                           scope="agents/a/") as act:
                act.result = k
        told, commits = counts[0], counts[2]
        where = _interrupted(k, files, store.revert, tx.id)
        committed = dict(states(store))[f"b{k}"] != "committed"
        assert counts[0] == counts[1], where
        assert counts[0] - told <= 1, where
        assert counts[2] == commits + (committed and counts[0] > told), where
        assert scope.undo_kind() is None, where
        if where is None:
            assert counts[0] == told + 1 and committed
            break
        landed.append(where)
    assert len(landed) > 10   # (the sweep walked the watchers' code)


# ---- the watcher contract (walstore.agent.scope) -----------------------------------------
_TOLD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> [calls]
_REFUSE_ONCE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> [n]


def _told_undo(store, scope):
    return None


def _told_revert(store, reach):
    calls = _TOLD.get(store)
    if calls is None:
        return None
    calls.append(("told", reach.keys))
    return lambda committed: calls.append(("end", committed))


def _refusing_undo(store, scope):
    return None


def _refusing_revert(store, reach):
    left = _REFUSE_ONCE.get(store)
    if left:
        left.pop()
        raise walstore.ConflictError("held by a prepared transaction: try again")
    return None


def test_a_revert_retried_after_a_watcher_refused_it_tells_the_others_once(store):
    """A watcher refuses a revert with ConflictError (which the revert retries, every
    other commit held out) after another watcher was told and kept its end.  Before:
    the retry told that one again — the same keys twice — and ran its end twice."""
    from walstore.agent.scope import register_undo_watcher
    register_undo_watcher(_told_undo, on_revert=_told_revert)      # (once a process:
    register_undo_watcher(_refusing_undo, on_revert=_refusing_revert)   # per store)
    calls = _TOLD[store] = []
    _REFUSE_ONCE[store] = [1]
    with store.transaction() as tx:
        tx.put("z/k", 1)
    assert store.revert(tx.id) is not None
    assert calls == [("told", ("z/k",)), ("end", True)]
    assert store.get("z/k") is None
