"""WalstoreSession: a turn in flight while another caller rewinds the session (probe h4,
stop 74).

A rewind by one asyncio task undid a turn's booking and compensated it while the turn,
running in another task, went on: its "booked" items were added after the rewind (during
its compensations even), so the conversation said booked and the world said cancelled.
Now the session's writes wait while a rewind of it runs (compensations included), and a
caller that read or wrote the session before a rewind that committed is refused
(ConflictError, nothing written); one that waited on a rewind that failed without
committing writes.  Orderings are forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import errno
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402

from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, held_cancel, spy_rewind_waits, example, assistant, book, store, user  # noqa: E402,F401


def test_a_turn_in_flight_across_a_rewind_is_refused_once_the_compensations_ran(
        store, monkeypatch):
    """Before: the turn's add_items returned while the rewind still compensated its
    booking, and its items stood after the rewind — items [hi, hello, 'booked rome'],
    world [book rome, cancel rome]."""
    world: list[str] = []
    compensating, release = held_cancel(store, world, done="cancelled")

    waiting = spy_rewind_waits(monkeypatch)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi"), assistant("hello")])
        await s.restore_point("p")
        # the turn (as the SDK's Runner runs it): history read, input saved, a tool books
        history = await s.get_items()
        await s.add_items([user("book rome")])
        await asyncio.to_thread(book, store, s, "rome", world)

        rewinder = asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        assert await asyncio.to_thread(compensating.wait, WAIT_S)
        # the turn ends while the rewind compensates: it saves its output
        told: list[list[str]] = []

        async def turn_saves():
            try:
                await s.add_items([assistant("booked rome")])
            finally:
                told.append(list(world))   # what the world was when the turn heard back
        save = asyncio.ensure_future(turn_saves())
        await asyncio.to_thread(waiting.wait, WAIT_S)
        assert not save.done(), "the turn's items were saved while the rewind compensated"
        release.set()
        await rewinder
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await save
        assert told == [["book rome", "cancel rome", "cancelled"]]   # heard after the undo
        assert history == [user("hi"), assistant("hello")]
        assert await s.get_items() == [user("hi"), assistant("hello")]
        # having read the session again, the caller writes
        await s.add_items([user("book oslo")])
        assert await s.get_items() == [user("hi"), assistant("hello"), user("book oslo")]
    asyncio.run(go())
    assert store.get(f"{WalstoreSession('u', store).scope}k/bookings/rome") is None
    assert [(a.name, a.state) for a in store.actions()] == [("book", "compensated")]
    assert world == ["book rome", "cancel rome", "cancelled"]


def test_a_pop_of_a_turn_in_flight_after_a_rewind_is_refused(store):
    """Before: the turn's pop_item (the SDK pops its own items to retry a turn) removed
    an item from before the rewind's point: 'hello', the turn's own items being gone."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi"), assistant("hello")])
        await s.restore_point("p")
        await s.add_items([user("book rome")])
        await asyncio.to_thread(book, store, s, "rome", world)
        await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        with pytest.raises(walstore.ConflictError, match="nothing was written"):
            await s.pop_item()
        assert await s.get_items() == [user("hi"), assistant("hello")]
    asyncio.run(go())
    assert world == ["book rome", "cancel rome"]


def test_a_turn_waiting_on_a_rewind_that_failed_on_a_full_disk_saves(tmp_path, monkeypatch):
    """A rewind that fails without committing (ENOSPC on the WAL) retracted nothing: the
    turn that waited for it saves its items, booking and conversation agreeing."""
    store = walstore.open(str(tmp_path / "store"), durability="full")
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    planned, release = threading.Event(), threading.Event()
    fb = FaultBackend()

    def pause_then_fill_the_disk(_name):
        planned.set()
        release.wait(WAIT_S)
        fb.fail("pwrite", errno.ENOSPC, path="*.wal")   # the rewind's commit fails

    fb.at_point("undo.planned", pause_then_fill_the_disk)
    waiting = spy_rewind_waits(monkeypatch)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([user("book rome")])
        await asyncio.to_thread(book, store, s, "rome", world)
        with installed(fb):
            rewinder = asyncio.create_task(WalstoreSession("u", store).rewind("p"))
            assert await asyncio.to_thread(planned.wait, WAIT_S)
            save = asyncio.ensure_future(s.add_items([assistant("booked rome")]))
            await asyncio.to_thread(waiting.wait, WAIT_S)
            assert not save.done()
            release.set()
            with pytest.raises(walstore.WalstoreError, match="No space left"):
                await rewinder
            await save
        assert await s.get_items() == [user("hi"), user("book rome"), assistant("booked rome")]
    try:
        asyncio.run(go())
        assert [(a.name, a.state) for a in store.actions()] == [("book", "committed")]
        assert world == ["book rome"]
    finally:
        store.close()


def test_the_rewinding_caller_and_fresh_callers_write_on(store):
    """The caller that rewound writes after it (its own rewind), and so does a caller
    that had not touched the session before it; a compensator writing to the session
    (in the rewind's context) is neither held nor refused."""
    world: list[str] = []

    @store.compensator("cancel")
    def cancel(action):
        world.append(f"cancel {action.args['what']}")
        asyncio.run(WalstoreSession("u", store).add_items([assistant("rome cancelled")]))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.add_items([user("book rome")])
        await asyncio.to_thread(book, store, s, "rome", world)
        await s.rewind("p")
        await s.add_items([user("again")])

        async def fresh():
            await WalstoreSession("u", store).add_items([assistant("fresh")])
        await asyncio.get_running_loop().run_in_executor(None, asyncio.run, fresh())
        assert await s.get_items() == [user("hi"), assistant("rome cancelled"),
                                       user("again"), assistant("fresh")]
    asyncio.run(go())
    assert world == ["book rome", "cancel rome"]


def test_a_runner_whose_tool_booked_before_a_rewind_fails_instead_of_saving_booked(store):
    """The SDK's Runner: its tool books, another task rewinds the session meanwhile.
    Before: the run returned 'Booked Rome.' and saved the call, its output 'booked Rome'
    and the answer after the rewind had cancelled the booking."""
    from agents import Agent, RunConfig, Runner, function_tool
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    booked, rewound = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)

    @function_tool
    def book_hotel(city: str) -> str:
        """Book a hotel.

        Args:
            city: where.
        """
        with store.transaction() as tx:
            with tx.action("book", args={"what": city}, compensate="cancel",
                           scope=s.scope) as act:
                world.append(f"book {city}")
                act.result = city
        booked.set()
        rewound.wait(WAIT_S)
        return f"booked {city}"

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        model = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Rome"}, 2)],
                                  [ex.say("Booked Rome.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=model)
        run = asyncio.create_task(Runner.run(agent, "book rome", session=s,
                                             run_config=RunConfig(tracing_disabled=True)))
        assert await asyncio.to_thread(booked.wait, WAIT_S)
        assert await WalstoreSession("u", store).rewind("p") is not None
        rewound.set()
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await run
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert world == ["book Rome", "cancel Rome"]
    assert [(a.name, a.state) for a in store.actions()] == [("book", "compensated")]


def test_a_compensator_writing_from_a_thread_of_its_own_does_not_wait_for_its_rewind(
        store, monkeypatch):
    """A compensator that notes the cancellation from a pool thread (which carries no
    context of the rewind) waited for the very rewind that waited for it: the whole
    ``_REWIND_WAIT_S`` (120 s) on the first version of the fix.  A context that never
    touched the session has no turn to cut off: it neither waits nor is refused."""
    waiting = spy_rewind_waits(monkeypatch)
    pool = ThreadPoolExecutor(1)

    @store.compensator("cancel")
    def cancel(action):
        note = assistant(f"{action.args['what']} cancelled")
        pool.submit(asyncio.run, WalstoreSession("u", store).add_items([note])
                    ).result(WAIT_S)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.add_items([user("book rome")])
        await asyncio.to_thread(book, store, s, "rome", [])
        await s.rewind("p")
        assert not waiting.is_set()
        assert await s.get_items() == [user("hi"), assistant("rome cancelled")]
    try:
        asyncio.run(go())
    finally:
        pool.shutdown()
