"""Review of the first-use undo after a restart (stop 78 h3): what it must keep.

The first use of a WalstoreSession in a new open of its store reverts the work an
earlier open did in the session's scope after the session's last write (a turn killed in
a tool).  These check the runs that END without an assistant message, whose items are
then the session's newest (``tool_use_behavior="stop_on_first_tool"`` or
``StopAtTools``, ``MaxTurnsExceeded``, a pause for approval, a compaction), a run paused
with its step held back from the session (output guardrails with a stopping
``tool_use_behavior``: the SDK saves that step only at the resume), and the cascade.
The SDK's real Runner, a scripted model, real restarts (the store closed and opened
again: a new store object, an earlier open).
"""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore import ConflictError  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import (Killed, book, booking_tool, cut_short_turn, example,  # noqa: E402
                             texts, user)
from test_openai_session_resume import Trip  # noqa: E402

EX = example()


def _config():
    from agents import RunConfig
    return RunConfig(tracing_disabled=True)


class Opens:
    """One store's path, opened again and again (each a restart from walstore's view),
    compensator ``cancel`` noting ``cancel <what>`` in ``world``."""

    def __init__(self, tmp_path) -> None:
        self.path = str(tmp_path / "store")
        self.world: list[str] = []

    def open(self) -> walstore.Store:
        store = walstore.open(self.path)
        store.compensator("cancel")(lambda a: self.world.append(f"cancel {a.args['what']}"))
        return store


def _app_work(store, session, world) -> None:
    """The application's work in the session's scope between turns: a booking it makes
    itself (declared in the scope) and a note under ``session.key``."""
    book(store, session, "app", world)
    with store.transaction() as tx:
        tx.put(session.key("note"), "kept")


def _end_a_run(how: str, store, session, world) -> None:
    """A run that ends without an assistant message as the session's newest item."""
    from agents import Agent, Runner, StopAtTools
    from agents.exceptions import MaxTurnsExceeded
    kw: dict = {}
    script = [[EX.call("book_hotel", {"city": "oslo"}, 1)]]
    if how == "stop_on_first_tool":
        kw["tool_use_behavior"] = "stop_on_first_tool"
    elif how == "stop_at_tools":
        kw["tool_use_behavior"] = StopAtTools(stop_at_tool_names=["book_hotel"])
    elif how == "compacted":
        script.append([EX.say("booked oslo", 2)])
    agent = Agent(name="t", tools=[booking_tool(store, session, world)],
                  model=EX.ScriptedModel(script), **kw)

    async def go():
        if how == "max_turns":
            with pytest.raises(MaxTurnsExceeded):
                await Runner.run(agent, "book oslo", session=session, max_turns=1,
                                 run_config=_config())
            return
        await Runner.run(agent, "book oslo", session=session, run_config=_config())
        if how == "compacted":
            await _compact(session)
    asyncio.run(go())


async def _compact(session) -> None:
    """The SDK's OpenAIResponsesCompactionSession compacts the history (a fake
    ``responses.compact``: no network): the user messages kept, then a compaction item."""
    import types
    from agents.memory.openai_responses_compaction_session import (
        OpenAIResponsesCompactionSession)

    class Responses:
        async def compact(self, **kw):
            return types.SimpleNamespace(
                output=[user("book oslo"), {"type": "compaction", "encrypted_content": "x"}],
                usage=None)
    comp = OpenAIResponsesCompactionSession(
        "u", session, client=types.SimpleNamespace(responses=Responses()), model="gpt-4.1")
    await comp.run_compaction({"force": True})


@pytest.mark.parametrize("how", ["stop_on_first_tool", "stop_at_tools", "max_turns",
                                 "compacted"])
def test_the_apps_work_after_a_run_that_ended_without_an_answer_is_kept(tmp_path, how):
    """Before: the run's newest item was a tool output (or a compaction item), not an
    assistant message, so the app's work after the run was taken for a killed turn's:
    at the restart its booking was cancelled and its note deleted."""
    o = Opens(tmp_path)
    store = o.open()
    s = WalstoreSession("u", store)
    _end_a_run(how, store, s, o.world)
    before = asyncio.run(s.get_items())
    assert _tail_kind(before) != "assistant"
    _app_work(store, s, o.world)
    store.close()
    store = o.open()
    try:
        s = WalstoreSession("u", store)
        assert asyncio.run(s.get_items()) == before
        assert s.restart_undo is None
        assert store.get(s.key("note")) == "kept"
        assert store.get(s.key("bookings/app")) == "confirmed"
    finally:
        store.close()
    assert not [w for w in o.world if w.startswith("cancel")], o.world


def _tail_kind(items):
    last = items[-1]
    return last.get("role") if last.get("type", "message") == "message" else last["type"]


@pytest.mark.parametrize("first", ["poll", "resume"])
def test_a_pause_for_approval_across_a_restart_keeps_the_apps_saved_runstate(tmp_path,
                                                                               first):
    """The main human-in-the-loop pattern: the step books (book_hotel) and pauses for
    ``pay``; the app keeps the RunState's JSON under ``session.key``; the store is closed;
    after the restart the app shows the conversation (``poll``) or resumes at once.
    Before: the first use reverted the app's write of the RunState (the session's newest
    item was the call awaiting approval): the approval found nothing to resume."""
    from agents import RunState
    o = Opens(tmp_path)
    store = o.open()
    trip = Trip(store)
    state = asyncio.run(trip.pause())
    with store.transaction() as tx:
        tx.put(trip.session.key("pending"), state.to_json())
    store.close()
    store = o.open()
    try:
        trip = Trip(store)
        if first == "poll":
            asyncio.run(trip.session.get_items())
        saved = store.get(trip.session.key("pending"))
        assert saved is not None, "the app's saved RunState was reverted"

        async def resume():
            return await trip.resume(await RunState.from_json(trip.agent, saved))
        assert asyncio.run(resume()).final_output == "done rome"
        items = texts(asyncio.run(trip.session.get_items()), kinds=True)
        assert items[-3:] == ["function_call_output: booked rome",
                              "function_call_output: paid rome", "message: done rome"]
        assert trip.world == ["book pay rome"]        # nothing cancelled
        assert trip.session.restart_undo is None
    finally:
        store.close()


@pytest.mark.parametrize("first", ["poll", "resume"])
def test_a_held_back_pause_whose_booking_the_restart_undid_is_not_saved_as_booked(
        tmp_path, first):
    """Output guardrails with ``stop_on_first_tool``: the SDK holds the paused step
    (book_hotel's call and output) back from the session until the resume, so after a
    restart its booking is work no item records, and the first use cancels it.  Before:
    the resume then saved "booked rome" beside the cancelled booking (and the paid
    one).  Now that resume is refused, its approved tool's work reverted: nothing booked,
    nothing recorded, the turn to run anew."""
    o = Opens(tmp_path)
    store = o.open()
    trip = Trip(store, held=True)
    js = asyncio.run(trip.pause()).to_json()
    store.close()
    store = o.open()
    try:
        trip = Trip(store, held=True)
        if first == "poll":
            asyncio.run(trip.session.get_items())

        async def resume():
            from agents import RunState
            return await trip.resume(await RunState.from_json(trip.agent, js))
        with pytest.raises(ConflictError, match="restart"):
            asyncio.run(resume())
        items = texts(asyncio.run(trip.session.get_items()), kinds=True)
        assert items == ["user: hi", "user: book rome"]
        cancelled = sorted(w for w in trip.world if w.startswith("cancel"))
        assert cancelled == ["cancel pay rome", "cancel rome"], trip.world
    finally:
        store.close()


def test_a_resume_killed_in_its_approved_tool_is_undone_and_the_retry_pays_once(tmp_path):
    """Open 1 pauses (the step saved); open 2 resumes, ``pay`` books and the process
    ends in it (nothing saved); open 3 resumes the same JSON.  Before: its approved
    ``pay`` ran before the session's first use and rewrote the key of the killed
    resume's payment, whose revert was then refused: two payments standing, one
    recorded.  Now the first work in the session's scope is a first use: the killed
    resume's payment is refunded before the retry pays once."""
    from agents import RunState
    o = Opens(tmp_path)
    store = o.open()
    trip = Trip(store)
    js = asyncio.run(trip.pause()).to_json()
    store.close()

    store = o.open()
    try:
        trip = Trip(store)
        paid = []

        async def killed_resume():
            state = await RunState.from_json(trip.agent, js)
            for item in state.get_interruptions():
                state.approve(item)
            # (pay books, then the process ends in it)
            tool = next(t for t in trip.agent.tools if t.name == "pay")
            orig = tool.on_invoke_tool

            async def dying(ctx, args):
                paid.append(await orig(ctx, args))
                raise Killed()
            tool.on_invoke_tool = dying
            from agents import Runner
            await Runner.run(trip.agent, state, session=trip.session,
                             run_config=trip.config)
        with pytest.raises(Killed):
            asyncio.run(killed_resume())
        assert paid == ["paid rome"] and trip.world == ["book pay rome"]
    finally:
        store.close()

    store = o.open()
    try:
        trip = Trip(store)

        async def resume():
            return await trip.resume(await RunState.from_json(trip.agent, js))
        assert asyncio.run(resume()).final_output == "done rome"
        items = texts(asyncio.run(trip.session.get_items()), kinds=True)
        assert items.count("function_call_output: paid rome") == 1
        # (the killed resume's payment refunded before this one's: at its first work
        # in the session's scope, the session's first use in this open)
        assert trip.world == ["cancel pay rome", "book pay rome"]
        assert len(trip.session.restart_undo.reverted) == 1
    finally:
        store.close()


def test_a_cascade_never_takes_back_work_outside_the_cut_short_turn(tmp_path):
    """A killed turn's two tools: "hotel" writes ``cart``, "car" writes ``cart`` and
    ``car``; in this open, before the session's first use, the app books "app" writing
    ``car`` (its action declared in no scope: it wrote only in the session's, so an
    undo of the scope compensates it).  The car's revert is refused (the app's later write); the hotel's is refused
    only for the car's (in the batch), so it ran with ``cascade``.  Before: the cascade
    walked on from the car to the app's booking and cancelled it (this open's work, which
    the first use never undoes)."""
    o = Opens(tmp_path)
    store = o.open()
    s = WalstoreSession("u", store)
    asyncio.run(s.add_items([user("hi")]))

    def two_tools():
        for what, keys in (("hotel", ("cart",)), ("car", ("cart", "car"))):
            with store.transaction() as tx:
                with tx.action("book", args={"what": what}, compensate="cancel",
                               scope=s.scope):
                    o.world.append(f"book {what}")
                for k in keys:
                    tx.put(s.key(k), what)
    cut_short_turn(s, two_tools)
    store.close()
    store = o.open()
    try:
        s = WalstoreSession("u", store)
        with store.transaction() as tx:   # (declared in no scope: the guard never sees
            with tx.action("book", args={"what": "app"}, compensate="cancel"):   # it)
                o.world.append("book app")
            tx.put(s.key("car"), "app")
        asyncio.run(s.get_items())
        assert "cancel app" not in o.world, o.world
        assert store.get(s.key("car")) == "app"
        assert len(s.restart_undo.failed) == 2   # (reported: the app rewrote a key of them)
    finally:
        store.close()


def test_a_turn_cut_short_in_its_tool_is_still_undone(tmp_path):
    """The case the first use is for, in process (the tool's step never saved, the store
    closed): its booking is cancelled at the next open, the app's work before the turn
    kept.  (Passes before the review's changes too.)"""
    o = Opens(tmp_path)
    store = o.open()
    s = WalstoreSession("u", store)
    asyncio.run(s.add_items([user("hi")]))
    _app_work(store, s, o.world)
    cut_short_turn(s, lambda: book(store, s, "rome", o.world))
    store.close()
    store = o.open()
    try:
        s = WalstoreSession("u", store)
        assert texts(asyncio.run(s.get_items())) == ["hi", "book it"]
        assert len(s.restart_undo.reverted) == 1
        assert store.get(s.key("note")) == "kept"
    finally:
        store.close()
    assert o.world == ["book app", "book rome", "cancel rome"]
