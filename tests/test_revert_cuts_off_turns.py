"""``store.revert`` reaching a session cuts off its turns in flight (stop 76, h2).

``store.rewind`` and ``store.purge`` told the undo watchers (the OpenAI session counts an
undo reaching its scope however it was called: stop 75), ``store.revert`` did not: a
revert of a turn's booking (its refund compensator run) while another turn of the
session was in flight let that turn save "your hotel is booked" and book again after
the refund, so the conversation and the world disagreed.  Now a revert, once planned,
tells the watchers what it reaches (``register_undo_watcher(..., on_revert=)``,
``UndoReach``: the scopes and keys of what it undoes, cascade included), and the
session cuts off the turns of each session it reaches, as a rewind of it does.  A revert
of another session's work, one refused before its commit and a dry run cut off nothing;
one whose compensation failed after its commit does.

Orderings are forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import threading
import weakref

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
import walstore.integrations.openai_agents as oa  # noqa: E402
from walstore.agent.scope import register_undo_watcher  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, assistant, book, example, store, user  # noqa: E402,F401

CUT_OFF = "was reverted by another caller"


def booking_txid(store, what: str) -> int:
    """The txid of the transaction that booked ``what``."""
    return next(a.txid for a in store.actions() if a.args["what"] == what)


def put(store, key, value) -> int:
    """One key written in a transaction of its own; its txid."""
    with store.transaction() as tx:
        tx.put(key, value)
    return tx.id


def newest_txid(store) -> int:
    return store.log(limit=1)[0].txid


def states(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


def test_a_runner_turn_in_flight_across_a_revert_of_the_sessions_booking_saves_nothing(
        store):
    """The SDK's Runner: turn 1 books Rome; turn 2's model is answering when another
    thread reverts turn 1's booking (refunded).  Before: turn 2 returned "Your Rome
    hotel is booked." and saved it after the refund."""
    from agents import Agent, RunConfig, Runner, function_tool
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    thinking, reverted = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)

    @function_tool
    def book_hotel(city: str) -> str:
        """Book a hotel.

        Args:
            city: where.
        """
        book(store, s, city, world)
        return f"booked {city}"

    class HeldModel(ex.ScriptedModel):
        async def get_response(self, *args, **kwargs):
            thinking.set()
            assert await asyncio.to_thread(reverted.wait, WAIT_S)
            return await super().get_response(*args, **kwargs)

    def reverter():
        assert thinking.wait(WAIT_S)
        try:
            assert store.revert(booking_txid(store, "Rome")) is not None
        finally:
            reverted.set()

    async def go():
        first = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Rome"}, 2)],
                                  [ex.say("Booked Rome.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=first)
        cfg = RunConfig(tracing_disabled=True)
        assert (await Runner.run(agent, "book rome", session=s, run_config=cfg)
                ).final_output == "Booked Rome."
        held = HeldModel([[ex.say("Your Rome hotel is booked.", 4)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=held)
        t = threading.Thread(target=reverter)
        t.start()
        try:
            with pytest.raises(walstore.ConflictError, match=CUT_OFF):
                await Runner.run(agent, "is my hotel ok?", session=s, run_config=cfg)
        finally:
            reverted.set()
            await asyncio.to_thread(t.join, WAIT_S)
        items = await s.get_items()
        assert "Your Rome hotel is booked." not in str(items)
    asyncio.run(go())
    assert world == ["book Rome", "cancel Rome"]
    assert states(store) == [("Rome", "compensated")]


@pytest.mark.parametrize("how", ["unscoped", "scoped", "session-items", "cascade",
                                 "tagged"])
def test_a_revert_reaching_the_session_cuts_off_its_turn_in_flight(store, how):
    """What the revert undoes reaches the session through: its booking's action scope
    (unscoped, or ``scope=session.scope``); the session's own items (an untagged
    transaction: its keys alone); a cascade from a shared key to the session's booking;
    a transaction tagged with the session's scope.  Before: the turn's save and its
    scoped tool work after the revert went through."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        if how == "session-items":
            await s.add_items([assistant("booked oslo")])
            target, kw = newest_txid(store), {}
        elif how == "cascade":
            target, kw = put(store, "inventory/oslo", 5), {"cascade": True}
            with store.transaction() as tx:   # (a tool: takes a room, books it)
                tx.put("inventory/oslo", 4)
                with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                               scope=s.scope) as act:
                    world.append("book oslo")
                    act.result = "oslo"
        elif how == "tagged":
            with store.transaction(scope=s.scope) as tx:
                tx.put(s.key("notes"), "vip")
            target, kw = newest_txid(store), {}
        else:
            await asyncio.to_thread(book, store, s, "oslo", world)
            target = booking_txid(store, "oslo")
            kw = {"scope": s.scope} if how == "scoped" else {}
        await s.get_items()                      # the turn begins
        await s.add_items([user("is it booked?")])
        assert await asyncio.to_thread(store.revert, target, **kw) is not None
        with pytest.raises(walstore.ConflictError, match=CUT_OFF):
            await s.add_items([assistant("yes, oslo is booked")])
        with pytest.raises(walstore.ConflictError, match="refused, nothing ran"):
            await asyncio.to_thread(book, store, s, "rome", world)
        await s.get_items()                      # read again: the next turn writes
        await s.add_items([user("again")])
    asyncio.run(go())
    assert "book rome" not in world


def test_only_a_revert_that_commits_into_the_session_cuts_off_its_turn(store):
    """A revert of another session's booking, of a key outside every session, a dry
    run, and a revert refused before its commit (RevertConflict) leave the turn in
    flight alone; the revert of its own booking then cuts it off."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        v = WalstoreSession("v", store)
        await v.add_items([user("v")])
        await asyncio.to_thread(book, store, v, "paris", world)
        unrelated = put(store, "config/x", 1)
        await s.add_items([user("hi")])
        await asyncio.to_thread(book, store, s, "oslo", world)
        mine = booking_txid(store, "oslo")
        put(store, s.key("bookings/oslo"), "moved")   # (a later writer: revert refused)
        await s.get_items()                          # the turn begins
        await asyncio.to_thread(store.revert, booking_txid(store, "paris"))
        await asyncio.to_thread(store.revert, unrelated)
        plan = await asyncio.to_thread(store.revert, mine, cascade=True, dry_run=True)
        assert mine in plan.txids
        with pytest.raises(walstore.RevertConflict):
            await asyncio.to_thread(store.revert, mine)
        await s.add_items([assistant("still here")])   # (not cut off by any of them)
        assert await asyncio.to_thread(store.revert, mine, cascade=True) is not None
        with pytest.raises(walstore.ConflictError, match=CUT_OFF):
            await s.add_items([assistant("oslo is booked")])
        assert await v.get_items() == [user("v")]
    asyncio.run(go())
    assert world == ["book paris", "book oslo", "cancel paris", "cancel oslo"]


def test_a_revert_whose_compensation_failed_after_its_commit_cuts_off_the_turn(store):
    """The revert committed (its compensation failed after: CompensationFailed,
    ``committed``): the refund is owed, the booking undone; the turn is cut off."""
    world: list[str] = []

    @store.compensator("cancel")
    def cancel(action):
        raise RuntimeError("payment provider down")

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await asyncio.to_thread(book, store, s, "oslo", world)
        await s.get_items()
        with pytest.raises(walstore.CompensationFailed) as e:
            await asyncio.to_thread(store.revert, booking_txid(store, "oslo"))
        assert e.value.committed
        with pytest.raises(walstore.ConflictError, match=CUT_OFF):
            await s.add_items([assistant("oslo is booked")])
    asyncio.run(go())


def test_a_write_while_a_revert_compensates_waits_for_it_then_is_refused(
        store, monkeypatch):
    """While the revert runs its compensation, the turn's save waits (then is refused);
    the revert's compensator writes to the session from the reverting thread without
    waiting."""
    waiting = threading.Event()
    orig = oa._WriterLock.await_rewinds

    def await_rewinds(self):
        if self.underway:
            waiting.set()
        return orig(self)
    monkeypatch.setattr(oa._WriterLock, "await_rewinds", await_rewinds)
    world: list[str] = []
    compensating, release = threading.Event(), threading.Event()

    @store.compensator("cancel")
    def cancel(action):   # (notes the cancellation in the session, then holds)
        asyncio.run(WalstoreSession("u", store).add_items([assistant("oslo cancelled")]))
        world.append(f"cancel {action.args['what']}")
        compensating.set()
        release.wait(WAIT_S)

    s = WalstoreSession("u", store)

    async def go():
        await s.add_items([user("hi")])
        with store.transaction() as tx:
            with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                           scope=s.scope) as act:
                world.append("book oslo")
                act.result = "oslo"
        target = newest_txid(store)
        await s.get_items()
        t = threading.Thread(target=store.revert, args=(target,))
        t.start()
        try:
            assert await asyncio.to_thread(compensating.wait, WAIT_S)
            save = asyncio.create_task(s.add_items([assistant("booked oslo")]))
            assert await asyncio.to_thread(waiting.wait, WAIT_S)
            assert not save.done()
            release.set()
            with pytest.raises(walstore.ConflictError, match=CUT_OFF):
                await save
        finally:
            release.set()
            await asyncio.to_thread(t.join, WAIT_S)
        assert await s.get_items() == [user("hi"), assistant("oslo cancelled")]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]


# ---- the watcher contract (walstore.agent.scope) -----------------------------------------
_TOLD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> calls


def _record_undo(store, scope):
    calls = _TOLD.get(store)
    if calls is not None:
        calls.append(("undo", scope))


def _record_revert(store, reach):
    calls = _TOLD.get(store)
    if calls is None:
        return None
    calls.append(("revert", reach.scope, reach.scopes, reach.keys))
    if getattr(store, "_refuse_reverts", False):
        raise PermissionError("refused by the watcher")
    return lambda committed: calls.append(("end", committed))



def test_on_revert_is_told_the_scopes_and_keys_a_revert_reaches_once_planned(store):
    """``register_undo_watcher(fn, on_revert=)``: ``on_revert`` hears of each revert
    that changes something (its scopes: tags, actions' scopes, clamped to ``scope=``;
    its keys, cascade included; a second plan tells only what it adds), never of a dry
    run, one refused before planning, or one undoing nothing; ``fn`` never hears of a
    revert.  What it raises refuses the revert, nothing changed.  Before: no
    ``on_revert`` (TypeError), and no revert told anyone."""
    register_undo_watcher(_record_undo, on_revert=_record_revert)   # (once a process)
    calls = _TOLD[store] = []
    store.compensator("cancel")(lambda a: None)
    with store.transaction(scope="a/") as tx:
        tx.put("a/s/k", 1)
        tx.put("a/t/k", 1)
    tagged = tx.id
    with store.transaction() as tx:
        tx.put("c/y", 1)
        with tx.action("book", args={"what": "x"}, compensate="cancel", scope="b/") as act:
            act.result = "x"
    booked = tx.id
    other = put(store, "z/1", 1)
    assert store.revert(tagged, scope="a/s/") is not None
    assert store.revert(booked) is not None
    store.revert(other, dry_run=True)
    with pytest.raises(walstore.RevertConflict):   # (undone already: nothing to undo)
        store.revert(booked)
    assert calls == [("revert", "a/s/", ("a/s/",), ("a/s/k",)), ("end", True),
                     ("revert", None, ("b/",), ("c/y",)), ("end", True)]

    # a revert conflicting with a commit that landed while it planned plans again, under
    # the gate, and its cascade reaches further: only the addition is told
    from tools.faults import FaultBackend, installed
    calls.clear()
    base = put(store, "m/x", 1)

    def racing(_name):
        t = threading.Thread(target=lambda: store.run(lambda tx: tx.put("m/x", 2),
                                                      scope="n/"))
        t.start()
        t.join(WAIT_S)
    fb = FaultBackend()
    rule = fb.at_point("undo.planned", racing)
    with installed(fb):
        assert store.revert(base, cascade=True) is not None
    assert rule.seen == 2   # (planned twice)
    assert calls == [("revert", None, (), ("m/x",)), ("revert", None, ("n/",), ()),
                     ("end", True), ("end", True)]
    assert store.get("m/x") is None

    # refused by the watcher (it gave no end) after the session's watcher was told: the
    # revert changed nothing, and the session's turn in flight is not cut off
    calls.clear()

    async def turn():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        last = newest_txid(store)
        await s.get_items()
        store._refuse_reverts = True
        with pytest.raises(PermissionError, match="refused by the watcher"):
            await asyncio.to_thread(store.revert, last)
        store._refuse_reverts = False
        await s.add_items([assistant("hello")])
        assert await s.get_items() == [user("hi"), assistant("hello")]
        return s.scope
    scope = asyncio.run(turn())
    assert calls == [("revert", None, (), (scope + "i/main/" + "0" * 19 + "1",))]
    # rewinds and purges still go to ``fn`` alone
    calls.clear()
    store.rewind(store.log(limit=1)[0].lsn, scope="q/")
    assert calls == [("undo", "q/")]


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
