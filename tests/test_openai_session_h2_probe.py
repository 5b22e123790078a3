"""WalstoreSession: a turn in flight while another caller changes the session under it
(probe h2, stop 75).

1. Branches: the current branch is stored in the session (every object shares it), so a
   ``switch_to_branch`` or ``create_branch_from_turn`` by another caller (another request,
   with its own session object) moved the rest of a turn in flight to that branch: the
   turn's question stayed on its branch unanswered, and the other branch began with an
   answer ("Booked Oslo.") to a question it never held.  Over AdvancedSQLiteSession a
   turn's session object keeps its own branch.  A ``delete_branch`` of the turn's branch
   put the rest of the turn on main (or on a new branch of the same name).  Now a write
   lands on the branch its caller (task or thread) last read or wrote, and is refused when
   that branch was deleted since (ConflictError, nothing written).
2. Undo not made through the session: ``store.rewind(point, scope=session.scope)``, an
   unscoped ``store.rewind``, ``store.purge(session.scope)`` were not counted by the
   session's cut-off, so a turn in flight saved "booked" items after the rewind had
   cancelled its booking (and booked again), or wrote into a purged (erased) session.
   Now the session watches every rewind and purge of the store reaching its scope
   (``walstore.agent.scope.register_undo_watcher``) as it watches its own.
3. Sync callers: the cut-off follows an asyncio task (contextvars).  A sync caller
   keeping one context for its turn (``asyncio.Runner.run(coro, context=ctx)``, its
   tools through ``ctx.run``) is cut off; ``asyncio.run`` per call gives each call a
   fresh context, never cut off (the documented limit).

Orderings are forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
import walstore.integrations.openai_agents as oa  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, spy_rewind_waits, booking_tool, held_model, example, assistant, book, store, user  # noqa: E402,F401


def shown(items):
    """(role or type, text) of each item, for a readable comparison."""
    out = []
    for i in items:
        kind = i.get("role") or i.get("type")
        if isinstance(i.get("content"), str):
            out.append((kind, i["content"]))
        elif i.get("type") == "function_call":
            out.append((kind, i["name"]))
        elif i.get("type") == "function_call_output":
            out.append((kind, i["output"]))
        else:
            out.append((kind, i["content"][0]["text"]))
    return out


def states(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


# ---- 1. branches changed by another caller while a turn runs ---------------------------
@pytest.mark.parametrize("op", ["switch", "create_branch"])
def test_a_runner_turn_keeps_its_items_on_its_branch_when_another_caller_moves_the_head(
        store, op):
    """The SDK's Runner on branch A; while its model thinks, another request switches
    the session to main (or branches it).  Before: the tool call, its output and the
    answer landed on that other branch, the question stayed on A unanswered."""
    from agents import Agent, RunConfig, Runner
    ex = example()
    world: list[str] = []
    thinking, moved = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)

    HeldModel = held_model(ex, thinking, moved)

    book_hotel = booking_tool(store, s, world)

    async def other_request():
        other = WalstoreSession("u", store)   # (its own object, as a second request's)
        if op == "switch":
            await other.switch_to_branch("main")
        else:
            assert await other.create_branch_from_turn(1, "B") == "B"

    async def go():
        await s.add_items([user("hi"), assistant("hello")])
        await s.create_branch_from_turn(1, "A")
        await s.add_items([user("hi A"), assistant("hello A")])
        model = HeldModel([[ex.call("book_hotel", {"city": "Oslo"}, 2)],
                           [ex.say("Booked Oslo.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=model)
        run = asyncio.create_task(Runner.run(agent, "book oslo", session=s,
                                             run_config=RunConfig(tracing_disabled=True)))
        assert await asyncio.to_thread(thinking.wait, WAIT_S)
        await asyncio.create_task(other_request())
        moved.set()
        result = await run
        assert result.final_output == "Booked Oslo."
        reader = WalstoreSession("u", store)
        assert shown(await reader.get_items(branch="A")) == [
            ("user", "hi A"), ("assistant", "hello A"), ("user", "book oslo"),
            ("function_call", "book_hotel"), ("function_call_output", "booked Oslo"),
            ("assistant", "Booked Oslo.")]
        assert await reader.get_items(branch="main") == [user("hi"), assistant("hello")]
        if op == "create_branch":
            assert await reader.get_items(branch="B") == []
        # the other request's choice of branch stands
        assert await reader.current_branch() == ("main" if op == "switch" else "B")
        # the turn's own task read the session again: it follows the head now
        await s.get_items()
        await s.add_items([user("next")])
        assert (await reader.get_items())[-1] == user("next")
    asyncio.run(go())
    assert world == ["book Oslo"]


@pytest.mark.parametrize("recreate", [False, True])
def test_a_turn_whose_branch_another_caller_deleted_saves_nothing(store, recreate):
    """Before: the rest of the turn landed on main (where the head went), or on the new
    branch A made in its place, neither of which asked the question."""
    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi"), assistant("hello")])
        await s.create_branch_from_turn(1, "A")
        await s.get_items()                      # the turn begins on A
        await s.add_items([user("book oslo")])

        async def other_request():
            other = WalstoreSession("u", store)
            await other.delete_branch("A", force=True)
            if recreate:
                await other.create_branch_from_turn(1, "A")
        await asyncio.create_task(other_request())
        with pytest.raises(walstore.ConflictError, match="branch 'A' .* was deleted"):
            await s.add_items([assistant("booked oslo")])
        with pytest.raises(walstore.ConflictError, match="was deleted"):
            await s.pop_item()
        reader = WalstoreSession("u", store)
        assert await reader.get_items(branch="main") == [user("hi"), assistant("hello")]
        if recreate:
            assert await reader.get_items(branch="A") == []
        await s.get_items()   # read again: writes on, on the current branch
        await s.add_items([user("again")])
        assert (await reader.get_items())[-1] == user("again")
    asyncio.run(go())


def test_a_context_that_switched_or_never_read_writes_on_the_current_branch(store):
    """What stays: a caller's own switch moves its next write; a caller (a thread of its
    own) that never read the session writes where the head is."""
    def fresh_add(item):   # (a thread: a context that never touched the session)
        t = threading.Thread(target=asyncio.run,
                             args=(WalstoreSession("u", store).add_items([item]),))
        t.start()
        t.join(WAIT_S)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.create_branch_from_turn(1, "A")
        await s.switch_to_branch("main")
        await s.add_items([assistant("on main")])
        await s.switch_to_branch("A")
        await s.add_items([assistant("on A")])
        await asyncio.create_task(WalstoreSession("u", store).switch_to_branch("main"))
        await asyncio.to_thread(fresh_add, assistant("fresh"))
        await s.add_items([assistant("A again")])     # (this task is on A)
        assert await s.get_items(branch="main") == [user("hi"), assistant("on main"),
                                                    assistant("fresh")]
        assert await s.get_items(branch="A") == [assistant("on A"), assistant("A again")]
    asyncio.run(go())


# ---- 2. undo of the session's scope not made through the session ------------------------
@pytest.mark.parametrize("how", ["scoped", "unscoped", "namespace"])
def test_a_turn_in_flight_across_a_direct_store_rewind_saves_and_books_nothing(store, how):
    """Before: after ``store.rewind`` had cancelled the turn's booking, the turn saved
    'booked oslo' (the conversation said booked, the world said cancelled) and its next
    booking committed for good."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        lsn = await s.restore_point("p")
        await s.get_items()                      # the turn begins
        await s.add_items([user("book oslo")])
        await asyncio.to_thread(book, store, s, "oslo", world)

        def undo():   # (another thread, not through the session)
            if how == "scoped":
                return store.rewind(s.scope + "p", scope=s.scope)
            return store.rewind(lsn, scope=None if how == "unscoped" else "oa/")
        assert await asyncio.to_thread(undo) is not None
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await s.add_items([assistant("booked oslo")])
        with pytest.raises(walstore.ConflictError, match="refused, nothing ran"):
            await asyncio.to_thread(book, store, s, "rome", world)
        assert await s.get_items() == [user("hi")]
        await s.add_items([user("again")])       # read again: the next turn writes
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]
    assert states(store) == [("oslo", "compensated")]


@pytest.mark.parametrize("prefix", ["scope", "oa/"])
def test_a_turn_in_flight_across_a_direct_purge_writes_nothing_into_the_erased_session(
        store, prefix):
    """Before: the turn's 'booked oslo' was written into the session just purged (a
    user's right to be forgotten, and a conversation back under its scope)."""
    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("my secret")])
        await s.get_items()
        await asyncio.to_thread(store.purge, s.scope if prefix == "scope" else prefix)
        with pytest.raises(walstore.ConflictError, match="was purged by another caller"):
            await s.add_items([assistant("noted your secret")])
        assert list(store.scan(prefix=s.scope)) == []
    asyncio.run(go())


def test_a_runner_turn_across_a_direct_store_rewind_fails_instead_of_saving_booked(store):
    """The SDK's Runner: its tool books, then another thread rewinds the session's scope
    with ``store.rewind`` while the model writes its answer.  Before: the run returned
    'Booked Rome.' and saved the call, its output and the answer after the rewind had
    cancelled the booking."""
    from agents import Agent, RunConfig, Runner
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    booked, rewound = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)

    def hold(city: str) -> None:
        booked.set()
        assert rewound.wait(WAIT_S)
    book_hotel = booking_tool(store, s, world, hold)

    def rewinder():
        assert booked.wait(WAIT_S)
        try:
            assert store.rewind(s.scope + "p", scope=s.scope) is not None
        finally:
            rewound.set()

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        model = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Rome"}, 2)],
                                  [ex.say("Booked Rome.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=model)
        t = threading.Thread(target=rewinder)
        t.start()
        try:
            with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
                await Runner.run(agent, "book rome", session=s,
                                 run_config=RunConfig(tracing_disabled=True))
        finally:
            rewound.set()
            t.join(WAIT_S)
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert world == ["book Rome", "cancel Rome"]
    assert states(store) == [("Rome", "compensated")]


def test_a_write_while_a_direct_rewind_compensates_waits_for_it_then_is_refused(
        store, monkeypatch):
    """While ``store.rewind`` runs its compensations, the turn's save waits (then is
    refused); the rewind's compensator writes to the session from the rewinding thread
    without waiting, and the rewinding thread writes on afterwards."""
    waiting = spy_rewind_waits(monkeypatch)
    world: list[str] = []
    compensating, release = threading.Event(), threading.Event()

    @store.compensator("cancel")
    def cancel(action):
        world.append(f"cancel {action.args['what']}")
        asyncio.run(WalstoreSession("u", store).add_items([assistant("oslo cancelled")]))
        compensating.set()
        assert release.wait(WAIT_S)

    def rewinder():
        # the rewinding thread's context read the session before: not cut off by the
        # rewind it ran itself
        ctx = contextvars.copy_context()
        with asyncio.Runner() as runner:
            runner.run(WalstoreSession("u", store).get_items(), context=ctx)
            ctx.run(store.rewind, s.scope + "p", scope=s.scope)
            runner.run(WalstoreSession("u", store).add_items([assistant("rewound")]),
                       context=ctx)

    s = WalstoreSession("u", store)

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([user("book oslo")])
        await asyncio.to_thread(book, store, s, "oslo", world)
        t = threading.Thread(target=rewinder)
        t.start()
        try:
            assert await asyncio.to_thread(compensating.wait, WAIT_S)
            save = asyncio.create_task(s.add_items([assistant("booked oslo")]))
            assert await asyncio.to_thread(waiting.wait, WAIT_S)
            assert not save.done()
            release.set()
            with pytest.raises(walstore.ConflictError, match="was rewound"):
                await save
        finally:
            release.set()
            await asyncio.to_thread(t.join, WAIT_S)
        assert await s.get_items() == [user("hi"), assistant("oslo cancelled"),
                                       assistant("rewound")]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]


def test_a_direct_rewind_of_another_scope_or_one_that_undoes_nothing_cuts_off_nobody(
        store):
    """A rewind of another session's scope, or one with nothing to undo, leaves a turn
    in flight alone."""
    async def go():
        s = WalstoreSession("u", store)
        v = WalstoreSession("v", store)
        await v.add_items([user("v")])
        await v.restore_point("p")
        await v.add_items([user("v2")])
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await asyncio.to_thread(store.rewind, v.scope + "p", scope=v.scope)
        assert await asyncio.to_thread(store.rewind, s.scope + "p", scope=s.scope) is None
        await s.add_items([assistant("hello")])
        assert await s.get_items() == [user("hi"), assistant("hello")]
        assert await v.get_items() == [user("v")]
    asyncio.run(go())


# ---- 3. sync callers ------------------------------------------------------------------
def test_a_sync_caller_keeping_one_context_for_its_turn_is_cut_off(store):
    """The cut-off follows a context (contextvars): a sync caller running its turn's
    session calls in one context (``asyncio.Runner.run(coro, context=ctx)``) and its
    tools in it too (``ctx.run``) is cut off by another thread's rewind, as a task is.
    (Each ``asyncio.run`` call starts from a fresh copy of the thread's context: such a
    caller is never cut off, see the guide.)"""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    s = WalstoreSession("u", store)
    ctx = contextvars.copy_context()
    with asyncio.Runner() as runner:
        def call(coro):
            return runner.run(coro, context=ctx)
        call(s.add_items([user("hi")]))
        call(s.restore_point("p"))
        call(s.get_items())
        call(s.add_items([user("book oslo")]))
        ctx.run(book, store, s, "oslo", world)
        other = threading.Thread(
            target=lambda: asyncio.run(WalstoreSession("u", store).rewind("p")))
        other.start()
        other.join(WAIT_S)
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            call(s.add_items([assistant("booked oslo")]))
        with pytest.raises(walstore.ConflictError, match="refused, nothing ran"):
            ctx.run(book, store, s, "rome", world)
        assert call(s.get_items()) == [user("hi")]
    assert world == ["book oslo", "cancel oslo"]
