"""WalstoreSession: a tool's work for a turn that a rewind of its session cut off (stop 75).

Left alone at stop 74: a turn whose session another caller rewound went on running its
tools, and a tool's booking declared in the session's scope (``tx.action(...,
scope=session.scope)``, as the guide says) committed after the rewind.  The turn's items
were refused, but the booking stood for good: made after the rewind that retracted the
turn, it was never compensated (a hotel booked for a conversation that says nothing of
it).  A transaction begun in the session's scope (``scope=session.scope``) did the same.

Now the session registers a scope guard (``walstore.agent.scope.register_scope_guard``):
work declared in a session's scope is fenced against undo of the session, and refused
(``ConflictError``, the action's body never run) from a context that read or wrote the
session before a rewind of it by another caller that committed since or is still under
way.  Orderings are forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.agent.scope import GUARDS  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
import walstore.integrations.openai_agents as oa  # noqa: E402
from session_support import WAIT_S, held_model, example, held_cancel, assistant, book, store, user  # noqa: E402,F401


def states(store):
    return sorted((a.name, a.args["what"], a.state) for a in store.actions())


def test_the_guard_is_registered_by_the_integration_only():
    assert oa.SCOPE_GUARD_REGISTERED
    assert oa._guard_session_scope in GUARDS


def test_a_tools_booking_after_a_rewind_of_its_session_is_refused_and_never_runs(store):
    """Before: the booking committed after the rewind ('book oslo' in the world, its
    action 'committed'), while the turn's items were refused: a booking no conversation
    holds and no rewind will ever compensate."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()                        # the turn begins: history read
        await s.add_items([user("book oslo")])
        # another caller rewinds the session while the turn's model thinks
        await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        with pytest.raises(walstore.ConflictError, match="refused, nothing ran"):
            await asyncio.to_thread(book, store, s, "oslo", world)
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await s.add_items([assistant("booked oslo")])
        assert await s.get_items() == [user("hi")]
        # read again: the next turn books
        await asyncio.to_thread(book, store, s, "rome", world)
    asyncio.run(go())
    assert world == ["book rome"]
    assert states(store) == [("book", "rome", "committed")]
    assert store.get(f"{WalstoreSession('u', store).scope}k/bookings/oslo") is None


def test_a_booking_made_before_a_rewind_that_commits_after_it_is_compensated(store):
    """The tool's action ran (the booking made) before the rewind and its transaction
    commits after it.  Before: it committed (nothing it read had changed), the booking
    standing beside a session rewound past the turn.  Now the commit conflicts (the
    fence), the booking is compensated exactly once, and the retry is refused."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    entered, go_on = threading.Event(), threading.Event()

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([user("book oslo")])
        tool = asyncio.ensure_future(asyncio.to_thread(
            lambda: store.run(lambda tx: _book_in(tx, s, "oslo", world, entered, go_on))))
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        info = await WalstoreSession("u", store).rewind("p")
        assert info is not None
        go_on.set()
        with pytest.raises(walstore.ConflictError):
            await tool
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]
    assert states(store) == [("book", "oslo", "compensated")]


def _book_in(tx, session, what, world, entered, go_on):
    with tx.action("book", args={"what": what}, compensate="cancel",
                   scope=session.scope) as act:
        if not entered.is_set():   # (store.run's retries come back here: refused)
            world.append(f"book {what}")
            act.result = what
            entered.set()
            go_on.wait(WAIT_S)


def test_a_booking_while_a_rewind_of_its_session_is_under_way_is_refused(store):
    """The rewind committed and is still compensating when the tool books: refused at
    once (it cannot wait in a transaction that may be on the event loop), nothing ran."""
    world: list[str] = []
    compensating, release = held_cancel(store, world)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await asyncio.to_thread(book, store, s, "rome", world)
        await s.get_items()
        rewinder = asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        assert await asyncio.to_thread(compensating.wait, WAIT_S)
        with pytest.raises(walstore.ConflictError, match="is under way"):
            await asyncio.to_thread(book, store, s, "oslo", world)
        release.set()
        await rewinder
        with pytest.raises(walstore.ConflictError, match="committed after"):
            await asyncio.to_thread(book, store, s, "oslo", world)
    asyncio.run(go())
    assert world == ["book rome", "cancel rome"]
    assert states(store) == [("book", "rome", "compensated")]


def test_a_transaction_begun_in_the_sessions_scope_is_refused_after_a_rewind(store):
    """``store.run(fn, scope=session.scope)``: the tool's state written for a retracted
    turn.  Before: 'k/note' stood after the rewind."""
    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([user("note x")])
        assert await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        with pytest.raises(walstore.ConflictError, match="refused, nothing ran"):
            await asyncio.to_thread(store.run, lambda tx: tx.put(s.key("note"), "x"),
                                    scope=s.scope)
        assert store.get(s.key("note")) is None
        await s.get_items()
        await asyncio.to_thread(store.run, lambda tx: tx.put(s.key("note"), "y"),
                                scope=s.scope)
        assert store.get(s.key("note")) == "y"
    asyncio.run(go())


def test_callers_that_never_read_the_session_and_the_rewinds_compensators_pass(store):
    """A context that never touched the session (a worker of another part of the app)
    has no turn to cut off, and a compensator of the rewind writes for it: both book."""
    world: list[str] = []

    @store.compensator("cancel")
    def cancel(action):
        world.append(f"cancel {action.args['what']}")
        if action.args["what"] == "rome":   # (the compensator books a replacement)
            book(store, WalstoreSession("u", store), "rome-later", world)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await asyncio.to_thread(book, store, s, "rome", world)
        await s.get_items()
        await s.rewind("p")   # (its own rewind: this caller goes on)
        await asyncio.to_thread(book, store, s, "oslo", world)
    asyncio.run(go())
    other = threading.Thread(target=book, args=(store, WalstoreSession("u", store), "bergen",
                                                 world))
    other.start()
    other.join(WAIT_S)
    assert world == ["book rome", "cancel rome", "book rome-later", "book oslo",
                     "book bergen"]
    assert sorted((a.args["what"], a.state) for a in store.actions()) == [
        ("bergen", "committed"), ("oslo", "committed"), ("rome", "compensated"),
        ("rome-later", "committed")]


def test_other_scopes_and_other_stores_are_not_touched(store, tmp_path):
    """Work in another session's scope, another namespace, or the same scope of another
    store is neither fenced nor refused by this session's rewind."""
    other_store = walstore.open(str(tmp_path / "other"), durability="none")
    try:
        async def go():
            s = WalstoreSession("u", store)
            await s.add_items([user("hi")])
            await s.restore_point("p")
            await s.get_items()
            await s.add_items([user("book oslo")])
            assert await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
            v = WalstoreSession("v", store)   # (never read by this caller: fenced only)
            for st, scope, fence in ((store, v.scope, v.scope), (store, "app/", None),
                                     (store, "oa/", None), (other_store, s.scope, None)):
                tx = st.transaction(scope=scope)
                assert tx.undo_fence == fence
                tx.put(f"{scope}x", 1)
                tx.commit()
            # a scope inside the session's (its tool state) is the session's
            with pytest.raises(walstore.ConflictError):
                await asyncio.to_thread(store.run, lambda tx: tx.put(s.key("n"), 1),
                                        scope=s.scope + "k/")
        asyncio.run(go())
    finally:
        other_store.close()


def test_a_runner_turn_whose_session_is_rewound_before_its_tool_books_books_nothing(store):
    """The SDK's Runner end to end: the model 'thinks' (a scripted model held on an
    event) while another task rewinds the session; then it calls the booking tool.
    Before: the tool booked Oslo and its action committed; the run was refused at its
    save, so the conversation held nothing of a booking that stood for good."""
    from agents import Agent, RunConfig, Runner, function_tool
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    thinking, rewound = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)

    HeldModel = held_model(ex, thinking, rewound)

    tool_errors: list[str] = []

    @function_tool(failure_error_function=lambda _ctx, e: tool_errors.append(str(e))
                   or f"error: {e}")
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
        return f"booked {city}"

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        model = HeldModel([[ex.call("book_hotel", {"city": "Oslo"}, 2)],
                           [ex.say("Could not book.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=model)
        run = asyncio.create_task(Runner.run(agent, "book oslo", session=s,
                                             run_config=RunConfig(tracing_disabled=True)))
        assert await asyncio.to_thread(thinking.wait, WAIT_S)
        assert await WalstoreSession("u", store).rewind("p") is not None
        rewound.set()
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await run
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert world == []
    assert states(store) == []
    assert len(tool_errors) == 1 and "refused, nothing ran" in tool_errors[0]


def test_a_tools_file_edit_in_the_sessions_workspace_after_a_rewind_is_refused(store,
                                                                               tmp_path):
    """A workspace registered in the session's scope (its files rewound with the
    conversation): a cut-off turn's tool editing a file there.  Before: the edit
    committed after the rewind and stayed (the plan said 'rome', the turn was retracted)."""
    root = tmp_path / "ws"
    root.mkdir()

    async def go():
        s = WalstoreSession("u", store)
        ws = store.workspace(root, scope=s.scope)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([user("plan rome")])
        assert await asyncio.create_task(WalstoreSession("u", store).rewind("p"))

        def edit():
            with store.transaction() as tx:
                tx.files(ws).write("plan.txt", "rome")
        with pytest.raises(walstore.ConflictError, match="refused, nothing ran"):
            await asyncio.to_thread(edit)
        assert not (root / "plan.txt").exists()
        await s.get_items()   # read again: the next turn edits
        await asyncio.to_thread(edit)
        assert (root / "plan.txt").read_text() == "rome"
    asyncio.run(go())


def test_a_turns_save_that_outwaits_a_slow_rewind_is_refused_not_written(store,
                                                                         monkeypatch):
    """A rewind whose compensation runs longer than the write's wait (120 s; shortened
    here).  Before: the turn's save went through when the wait ran out, the rewind
    committed and still compensating: 'booked rome' saved after the booking's
    cancellation had begun (the conversation said booked, the world cancelled)."""
    monkeypatch.setattr(oa, "_REWIND_WAIT_S", 0.2)
    world: list[str] = []
    compensating, release = held_cancel(store, world)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([user("book rome")])
        await asyncio.to_thread(book, store, s, "rome", world)
        rewinder = asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        assert await asyncio.to_thread(compensating.wait, WAIT_S)
        with pytest.raises(walstore.ConflictError, match="has run for over"):
            await s.add_items([assistant("booked rome")])
        release.set()
        await rewinder
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert world == ["book rome", "cancel rome"]
    assert states(store) == [("book", "rome", "compensated")]


def test_a_session_rewind_held_off_by_a_prepared_booking_says_so_at_once(store):
    """A rewind refused because a prepared (in-doubt) transaction works for the session's
    scope: no retry clears that until it is decided.  Before: the session's rewind
    retried it 8 times (~1.3 s of backoff) before raising; now once, the error naming the
    gid (``held_by``)."""
    calls: list[int] = []
    rewind = store.rewind

    def counted(*args, **kwargs):
        calls.append(1)
        return rewind(*args, **kwargs)
    store.rewind = counted

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()

        def tool():
            tx = store.transaction()
            with tx.action("book", args={"what": "oslo"}, scope=s.scope) as act:
                act.result = "oslo"
            tx.prepare("g-oslo")
        await asyncio.to_thread(tool)
        with pytest.raises(walstore.ConflictError, match="decide it first") as e:
            await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        assert e.value.held_by == "g-oslo"
        assert len(calls) == 1
        store.rollback_prepared("g-oslo")
    asyncio.run(go())
