"""Undo watchers told of ``store.revert`` (``register_undo_watcher(fn, on_revert=)``,
``UndoReach``: stop 76), and what a revert does to an OpenAI session's turn in flight.

The core tells an ``on_revert`` watcher, once a revert planned and before it commits,
the scopes and keys it reaches, and runs the watcher's end once the revert ended: an
extension point.  No integration of walstore registers one: stop 76 had the OpenAI
session cut off a turn whose session a revert reached, and a turn whose tool had booked
was then refused at its save, the booking held by no item and booked again when the
turn was re-run.  A revert compensates the reverted transaction's actions and puts back
its keys; it edits no conversation, so a turn in flight across one saves as it would
(undo a conversation's turns with ``session.rewind``).

Orderings are forced with events, on real stores and real threads (the SDK's real
Runner where a turn runs).
"""
from __future__ import annotations

import asyncio
import threading
import weakref

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.agent.scope import register_undo_watcher  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, booking_tool, assistant, book, example, store, user  # noqa: E402,F401


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


@pytest.mark.parametrize("held", ["tool", "model"])
def test_a_revert_of_turn_1s_booking_while_turn_2_runs_cuts_off_nothing(store, held):
    """The SDK's Runner: turn 1 books Oslo; turn 2's tool books Rome, and another
    thread reverts turn 1's booking (refunded) while the tool holds after its booking or
    while the model writes its answer.  Turn 2 runs out: its booking and its items are
    saved once, Oslo refunded once.  Before (stop 76): turn 2's save was refused as cut
    off, Rome booked with no item holding it (and booked twice when the turn was run
    again, as the error advised)."""
    from agents import Agent, RunConfig, Runner
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    holding, reverted = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)

    def hold(city: str) -> None:
        if city == "Rome" and held == "tool":
            holding.set()
            assert reverted.wait(WAIT_S)
    book_hotel = booking_tool(store, s, world, hold)

    class Answering(ex.ScriptedModel):
        calls = 0

        async def get_response(self, *args, **kwargs):
            Answering.calls += 1
            if held == "model" and Answering.calls == 2:   # (after Rome's booking)
                holding.set()
                assert await asyncio.to_thread(reverted.wait, WAIT_S)
            return await super().get_response(*args, **kwargs)

    def reverter():
        try:
            assert holding.wait(WAIT_S)
            assert store.revert(booking_txid(store, "Oslo")) is not None
        finally:
            reverted.set()

    async def go():
        cfg = RunConfig(tracing_disabled=True)
        first = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Oslo"}, 2)],
                                  [ex.say("Booked Oslo.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=first)
        assert (await Runner.run(agent, "book oslo", session=s, run_config=cfg)
                ).final_output == "Booked Oslo."
        second = Answering([[ex.call("book_hotel", {"city": "Rome"}, 4)],
                            [ex.say("Booked Rome.", 5)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=second)
        t = threading.Thread(target=reverter)
        t.start()
        try:
            assert (await Runner.run(agent, "book rome", session=s, run_config=cfg)
                    ).final_output == "Booked Rome."
        finally:
            reverted.set()
            await asyncio.to_thread(t.join, WAIT_S)
        return await WalstoreSession("u", store).get_items()
    items = asyncio.run(go())
    said = [i.get("content") or i.get("output") for i in items]
    assert [x for x in said if isinstance(x, str)] == [
        "book oslo", "booked Oslo", "book rome", "booked Rome"]
    assert [i.get("name") for i in items if i.get("type") == "function_call"] == [
        "book_hotel", "book_hotel"]
    assert str(items).count("Booked Rome.") == 1
    assert world == ["book Oslo", "book Rome", "cancel Oslo"]
    assert states(store) == [("Oslo", "compensated"), ("Rome", "committed")]


@pytest.mark.parametrize("how", ["unscoped", "scoped", "session-items", "cascade",
                                 "tagged"])
def test_a_revert_reaching_the_session_cuts_off_no_turn(store, how):
    """Whatever of the session a revert undoes (its booking's action, unscoped or with
    ``scope=session.scope``; the session's own items; a cascade from a shared key to its
    booking; a transaction tagged with its scope), the turn in flight saves and its
    tools book.  Before (stop 76): each was refused as "reverted by another caller"."""
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
        await s.add_items([user("and rome?")])
        assert await asyncio.to_thread(store.revert, target, **kw) is not None
        await asyncio.to_thread(book, store, s, "rome", world)
        await s.add_items([assistant("rome is booked")])
        return await s.get_items()
    items = asyncio.run(go())
    assert items[-2:] == [user("and rome?"), assistant("rome is booked")]
    assert world.count("book rome") == 1 and "cancel rome" not in world


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

    # refused by the watcher (it gave no end): the revert changed nothing, and the
    # session's turn in flight writes on
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
