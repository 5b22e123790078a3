"""Review of stop 76's session cut-offs (h4): reverts racing a session's writes.

A session write (and a tool's transaction in the session's scope) checks, as it runs,
that no rewind, erase or revert of the session by another caller is under way or
committed since its caller last read or wrote it.  A revert's commit does not meet the
write's undo fence (that counts rewinds and purges, and a revert by its semantics does
not undo later work), so a write whose check passed before a ``store.revert`` of the
session's work planned and that committed after the revert committed stood: the turn
saved "booked" beside the refunded booking, or its tool booked after it for good.  Now
each checked transaction gets a commit-time check (``Transaction.commit_check``, run
under the journal lock as it appends) that refuses it when such an undo was marked
under way since its check; the retried session write is then refused as cut off, and a
tool's transaction is rolled back, its booking compensated.

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
from session_support import (WAIT_S, assistant, book, held_cancel, store,  # noqa: E402,F401
                             user)
from tools.faults import FaultBackend, installed  # noqa: E402


def booking_txid(store, what: str) -> int:
    return next(a.txid for a in store.actions() if a.args["what"] == what)


def states(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


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


@pytest.mark.parametrize("revert", ["ended", "compensating"])
def test_a_session_write_checked_before_a_revert_planned_is_refused_at_commit(
        store, monkeypatch, revert):
    """The turn's save passed its check; then a revert of the turn's booking planned,
    committed and refunded it (or is still refunding); then the save commits.  Before:
    it stood ("booked oslo" after the refund: the revert's commit does not meet the
    write's undo fence).  Now the commit-time check refuses it, and its retry is
    refused as cut off (or waits for the refund to end, then is refused)."""
    world: list[str] = []
    if revert == "ended":
        store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    else:
        compensating, release = held_cancel(store, world)
        waiting = threading.Event()
        orig = oa._WriterLock.await_rewinds

        def await_rewinds(self):
            if self.underway:
                waiting.set()
            return orig(self)
        monkeypatch.setattr(oa._WriterLock, "await_rewinds", await_rewinds)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("book oslo")])
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()                               # the turn begins
        checked, go_on = pause_after_check(monkeypatch)
        save = asyncio.create_task(s.add_items([assistant("booked oslo")]))
        target = booking_txid(store, "oslo")
        try:
            assert await asyncio.to_thread(checked.wait, WAIT_S)
            if revert == "ended":
                assert await asyncio.to_thread(store.revert, target)
            else:
                t = threading.Thread(target=store.revert, args=(target,))
                t.start()
                assert await asyncio.to_thread(compensating.wait, WAIT_S)
                go_on.set()    # (the save commits while the refund runs: it waits)
                assert await asyncio.to_thread(waiting.wait, WAIT_S)
                assert not save.done()
                release.set()
                await asyncio.to_thread(t.join, WAIT_S)
        finally:
            go_on.set()
            if revert != "ended":
                release.set()
        with pytest.raises(walstore.ConflictError, match="was reverted by another caller"):
            await save
        assert await s.get_items() == [user("book oslo")]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]


def test_a_revert_replanning_under_the_gate_refuses_a_write_checked_meanwhile(
        store, monkeypatch):
    """The revert's first plan reaches no session (a shared key); a tool's booking in
    the session's scope lands on that key as it commits (conflict), so it plans again,
    every other commit held out, and its cascade now reaches the session.  The turn's
    save passes its check while the revert replans (the session not yet marked) and
    waits at the gate.  Before: it committed after the revert and stood."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    s = WalstoreSession("u", store)
    with store.transaction() as tx:
        tx.put("inventory/oslo", 5)
    base = tx.id
    started: list[asyncio.Task] = []
    checked: list[threading.Event] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    def racing(_name):   # (undo.planned, first plan: a tool books on the shared key)
        def tool():
            with store.transaction() as tx:
                tx.put("inventory/oslo", 4)
                with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                               scope=s.scope) as act:
                    world.append("book oslo")
                    act.result = "oslo"
        t = threading.Thread(target=tool)
        t.start()
        t.join(WAIT_S)

    def save_now(_name):   # (undo.resolved, second plan: the gate is held)
        loop = loop_box[0]
        loop.call_soon_threadsafe(
            lambda: started.append(loop.create_task(
                s.add_items([assistant("oslo is booked")]))))
        assert checked[0].wait(WAIT_S)

    fb = FaultBackend()
    planned = fb.at_point("undo.planned", racing)
    resolved = fb.at_point("undo.resolved", save_now, nth=2)

    async def go():
        loop_box.append(asyncio.get_running_loop())
        await s.add_items([user("book oslo")])
        await s.get_items()                               # the turn begins
        checked.extend(pause_after_check(monkeypatch))
        checked[1].set()   # (only told: the gate holds the save, not the event)
        with installed(fb):
            assert await asyncio.to_thread(store.revert, base, cascade=True)
        assert planned.seen == 2 and resolved.seen == 2   # (planned twice)
        while not started:
            await asyncio.sleep(0)
        with pytest.raises(walstore.ConflictError, match="was reverted by another caller"):
            await started[0]
        assert await s.get_items() == [user("book oslo")]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]
    assert store.get("inventory/oslo") is None


def test_a_tools_booking_let_through_before_a_revert_is_rolled_back_at_commit(store):
    """A tool of the turn declares its booking in the session's scope (the guard lets it
    through: nothing under way) and books; a revert of the turn's earlier booking runs
    whole; then the tool's transaction commits.  Before: the new booking stood after the
    revert, never compensated.  Now its commit is refused and it rolls back: its
    compensation runs (the booking cancelled)."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    entered, go_on = threading.Event(), threading.Event()

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("book oslo and rome")])
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()                               # the turn goes on
        tool = asyncio.create_task(asyncio.to_thread(
            book, store, s, "rome", world, entered=entered, go_on=go_on))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            assert await asyncio.to_thread(store.revert, booking_txid(store, "oslo"))
        finally:
            go_on.set()
        with pytest.raises(walstore.ConflictError, match="refused at commit"):
            await tool
    asyncio.run(go())
    assert world == ["book oslo", "book rome", "cancel oslo", "cancel rome"]
    assert states(store) == [("oslo", "compensated"), ("rome", "compensated")]
    assert store.get(WalstoreSession("u", store).key("bookings/rome")) is None


def test_a_tools_transaction_that_reads_a_workspace_keeps_the_sessions_commit_check(
        store, tmp_path):
    """The tool's transaction reads a workspace file after its booking was let through:
    the file layer's own commit check (set at the first read) replaced the transaction's
    ``commit_check`` instead of adding to it, so the session's went, and the booking
    stood after the revert.  Both are kept now (``add_commit_check``)."""
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
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()
        booking = asyncio.create_task(asyncio.to_thread(tool, s))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            assert await asyncio.to_thread(store.revert, booking_txid(store, "oslo"))
        finally:
            go_on.set()
        with pytest.raises(walstore.ConflictError, match="a revert of session scope"):
            await booking
    asyncio.run(go())
    assert world == ["book oslo", "book rome", "cancel oslo", "cancel rome"]


@pytest.mark.parametrize("how,said,noun", [
    ("session.rewind", "was rewound", "a rewind"),
    ("store.rewind", "was rewound", "a rewind"),
    ("session.erase", "was erased", "an erase"),
    ("store.purge", "was purged", "a purge"),
    ("store.revert", "was reverted", "a revert"),
])
def test_the_refusals_name_the_undo_that_cut_the_turn_off(store, how, said, noun):
    """Before: the turn's save was told the session "was rewound ... (the turns after the
    point were retracted ...)", and its tool "a rewind or erase", whatever cut it off: a
    revert of one booking, a purge.  Now each names it."""
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
        elif how == "store.purge":
            await asyncio.to_thread(store.purge, s.scope)
        else:
            await asyncio.to_thread(store.revert, booking_txid(store, "oslo"))
        with pytest.raises(walstore.ConflictError) as e:
            await s.add_items([assistant("oslo is booked")])
        message = str(e.value)
        assert f"{said} by another caller" in message and "\n" not in message
        for other_said in {"was rewound", "was erased", "was purged", "was reverted"} - {said}:
            assert other_said not in message
        with pytest.raises(walstore.ConflictError) as e:
            await asyncio.to_thread(book, store, s, "rome", world)
        assert f"{noun} of session scope" in str(e.value)
        assert "refused, nothing ran" in str(e.value)
    asyncio.run(go())
    assert "book rome" not in world


class _CountingLocks(weakref.WeakValueDictionary):
    """A store's sessions (``oa._locks[store]``), counting the walks over all of them."""
    walks = 0

    def items(self):
        self.walks += 1
        return super().items()


def test_a_revert_reaching_many_scopes_walks_the_sessions_once(store):
    """A revert whose work was declared in many scopes outside every session (a tool's
    bookings for other agents, LangGraph threads) walked every live session once per
    such scope: 2,000 scopes with 20,000 sessions held the reverting thread (its
    transaction open, perhaps every other commit held out) 16 s.  Now once in all,
    sorted (a scope around sessions, ``oa/``, still reaches each of them)."""
    store.compensator("cancel")(lambda a: None)
    sessions = [WalstoreSession(f"u{i}", store) for i in range(30)]
    per_store = oa._locks[store]
    counting = _CountingLocks()
    counting.update(per_store)
    oa._locks[store] = counting
    with store.transaction() as tx:
        for i in range(40):
            with tx.action("book", args={"what": f"t{i}"}, compensate="cancel",
                           scope=f"agents/a{i}/"):
                pass
        with tx.action("book", args={"what": "u7"}, compensate="cancel",
                       scope=sessions[7].scope):
            pass
    booked = tx.id
    with store.transaction(scope="oa/") as tx:   # (work for every session)
        tx.put("oa/config", 1)
    every = tx.id
    epochs = [s._lock.epoch for s in sessions]
    counting.walks = 0
    assert store.revert(booked) is not None
    assert counting.walks <= 1
    assert [s._lock.epoch - e for s, e in zip(sessions, epochs)] == [
        int(i == 7) for i in range(30)]
    assert store.revert(every) is not None
    assert [s._lock.epoch - e for s, e in zip(sessions, epochs)] == [
        1 + int(i == 7) for i in range(30)]


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


@pytest.mark.parametrize("undo", ["revert", "rewind"])
def test_an_interrupt_anywhere_in_the_undo_watching_leaves_the_session_sound(store, undo):
    """Ctrl-C in a sync program's ``store.revert`` of a session's booking (or
    ``store.rewind`` of the session's scope past it), at every point of the undo
    watchers' code (walstore.agent.scope, the session's watchers and their ends, the
    session's lock's): the session is never left marked under way (its every write
    waited 120 s then was refused, every tool refused, for good), its lock never held,
    the thread never left exempt (``_REWINDING``: its writes to the session never cut
    off again), and it is counted as cut off exactly when the undo committed.  Before:
    an interrupt at the start of ``WatchedUndo.__exit__`` or before its ends ran, in
    ``_cut_off_sessions`` between its marks and its end, in the end between two of its
    steps, or right after the lock's Condition took it, left it so."""
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
        if undo == "revert":
            where = _interrupted(k, files, store.revert, booking_txid(store, f"b{k}"))
        else:
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
