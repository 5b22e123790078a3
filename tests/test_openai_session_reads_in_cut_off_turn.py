"""WalstoreSession: a read made inside a turn that a rewind cut off (stop 76, h1).

Left alone at stop 75: a context (asyncio task or thread) that read or wrote the session
before a rewind by another caller is cut off (its session writes and its work declared in
the session's scope refused), and reading the session again cleared that, so that the
next ``Runner.run`` in the same task works.  Reads made INSIDE the cut-off turn cleared
it too: a tool that looked at the history (``session.get_items()``) booked after the
rewind, its booking standing for good while the turn's items were refused (no
conversation held it, no rewind would compensate it); and the SDK's own mid-run read
(the Runner saving the finished tools of a turn whose other tool raised reads the
session's tail first) let the turn's items land after the rewind.

Now a read clears the cut-off only once the SDK run that last read or wrote the session
in that context has ended (a new run, or a caller outside any run): a read inside that
run (its tools, the Runner's own reads, a run nested in it) leaves it cut off.  The real
SDK Runner, a scripted model, orderings forced with events.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
import walstore.integrations.openai_agents as oa  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, booking_tool, held_model, assistant, book, example, store, texts, user  # noqa: E402,F401


def states(store):
    return sorted((a.name, a.args["what"], a.state) for a in store.actions())


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
def test_a_tool_that_reads_the_session_in_a_cut_off_turn_books_nothing(store, streamed):
    """The model 'thinks' (held on an event) while another task rewinds the session;
    then its tool reads the history (``get_items``) and books.  Before: the tool's read
    cleared the cut-off of its task, 'book Oslo' ran and its action committed after the
    rewind; the run's save was refused, so no conversation held a booking no rewind
    would ever compensate.  Now the booking is refused, nothing run; the next
    ``Runner.run`` in the same task reads the session and books."""
    from agents import Agent, RunConfig, Runner, function_tool
    from openai.types.responses import Response, ResponseCompletedEvent
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    thinking, rewound = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)
    seen_by_tool: list[list] = []
    tool_errors: list[str] = []

    class HeldModel(held_model(ex, thinking, rewound)):
        async def stream_response(self, *args, **kwargs):
            output = (await self.get_response(*args, **kwargs)).output
            yield ResponseCompletedEvent(type="response.completed", sequence_number=0,
                                         response=Response(
                                             id="r", created_at=0, model="scripted",
                                             object="response", output=output, tools=[],
                                             parallel_tool_calls=True, tool_choice="auto"))

    @function_tool(failure_error_function=lambda _ctx, e: tool_errors.append(str(e))
                   or f"error: {e}")
    async def book_hotel(city: str) -> str:
        """Book a hotel unless the conversation already booked one.

        Args:
            city: where.
        """
        seen_by_tool.append(texts(await s.get_items()))
        await asyncio.to_thread(book, store, s, city, world)
        return f"booked {city}"

    async def run(agent, text):
        config = RunConfig(tracing_disabled=True)
        if not streamed:
            return (await Runner.run(agent, text, session=s, run_config=config)).final_output
        result = Runner.run_streamed(agent, text, session=s, run_config=config)
        async for _event in result.stream_events():
            pass
        return result.final_output

    async def requests():   # (one task: a turn, then the user's next request)
        model = HeldModel([[ex.call("book_hotel", {"city": "Oslo"}, 2)],
                           [ex.say("Could not book.", 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel], model=model)
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await run(agent, "book oslo")
        assert await s.get_items() == [user("hi")]   # (inside no run: reads on)
        # the next run of this task: a new turn, it reads the session and books
        agent.model = HeldModel([[ex.call("book_hotel", {"city": "Rome"}, 4)],
                                 [ex.say("Booked Rome.", 5)]])
        return await run(agent, "book rome")

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        user_task = asyncio.create_task(requests())
        assert await asyncio.to_thread(thinking.wait, WAIT_S)
        assert await WalstoreSession("u", store).rewind("p") is not None
        rewound.set()
        assert await user_task == "Booked Rome."
    asyncio.run(go())
    assert world == ["book Rome"]
    assert states(store) == [("book", "Rome", "committed")]
    assert seen_by_tool == [["hi"], ["hi", "book rome"]]   # (the tool read, after the rewind)
    assert len(tool_errors) == 1 and "refused, nothing ran" in tool_errors[0]
    assert texts(asyncio.run(s.get_items())) == [
        "hi", "book rome", '{"city": "Rome"}', "booked Rome", "Booked Rome."]


def test_the_runners_own_read_in_a_cut_off_turn_does_not_let_it_save(store):
    """Two tools in one model response: ``book_hotel`` books, then (the booking made)
    another task rewinds the session, compensating it, and the other tool raises
    (``failure_error_function=None``).  The Runner then saves the finished tool's call
    and output, reading the session's tail first.  Before: that read cleared the
    cut-off and 'booked Oslo' was saved after the rewind that cancelled the booking
    (the conversation said booked, the world cancelled).  Now the save is refused."""
    from agents import Agent, RunConfig, Runner, function_tool
    ex = example()
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    booked, rewind_now, rewound = threading.Event(), threading.Event(), threading.Event()
    s = WalstoreSession("u", store)
    reads: list[str] = []

    class Counted(WalstoreSession):
        async def get_items(self, *args, **kwargs):
            reads.append("read")
            return await super().get_items(*args, **kwargs)
    turn_session = Counted("u", store)

    book_hotel = booking_tool(store, turn_session, world, lambda city: booked.set())

    @function_tool(failure_error_function=None)
    async def check_visa(city: str) -> str:
        """Check the visa rules.

        Args:
            city: where.
        """
        assert await asyncio.to_thread(booked.wait, WAIT_S)
        rewind_now.set()
        assert await asyncio.to_thread(rewound.wait, WAIT_S)
        raise RuntimeError("visa service down")

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        model = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Oslo"}, 2),
                                   ex.call("check_visa", {"city": "Oslo"}, 3)]])
        agent = Agent(name="a", instructions="be brief", tools=[book_hotel, check_visa],
                      model=model)
        turn = asyncio.create_task(Runner.run(agent, "book oslo", session=turn_session,
                                              run_config=RunConfig(tracing_disabled=True)))
        assert await asyncio.to_thread(rewind_now.wait, WAIT_S)
        assert await WalstoreSession("u", store).rewind("p") is not None
        rewound.set()
        with pytest.raises(Exception, match="visa service down"):
            await turn
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert reads == ["read", "read"]   # (the run's first read, and the SDK's before its save)
    assert world == ["book Oslo", "cancel Oslo"]
    assert states(store) == [("book", "Oslo", "compensated")]
    # (the installed SDK marks its runs: without that mark, this read would clear it)
    assert oa._sdk_run_var() is not None


def test_a_run_nested_in_a_tool_of_a_cut_off_turn_saves_nothing(store):
    """An agent used as a tool of the turn (``as_tool(session=s)``) runs on the same
    session after another task rewound it.  Before: the nested run's first read cleared
    the cut-off of the tool's task and its items ('noted') were saved into the rewound
    session.  Now the nested run is part of the cut-off turn: its save is refused; a
    run of the same task after the turn saves."""
    from agents import Agent, RunConfig, Runner
    ex = example()
    thinking, rewound = threading.Event(), threading.Event()
    s = WalstoreSession("u", store)
    config = RunConfig(tracing_disabled=True)

    HeldModel = held_model(ex, thinking, rewound)

    inner = Agent(name="noter", instructions="note it", model=ex.ScriptedModel(
        [[ex.say("noted", 10)]]))
    tool_errors: list[str] = []
    helper = inner.as_tool("noter", "notes things", session=s, run_config=config,
                           failure_error_function=lambda _ctx, e: tool_errors.append(str(e))
                           or f"error: {e}")

    async def go():
        await s.add_items([user("hi")])
        await s.restore_point("p")
        agent = Agent(name="a", instructions="be brief", tools=[helper], model=HeldModel(
            [[ex.call("noter", {"input": "note oslo"}, 2)], [ex.say("Could not.", 3)]]))
        turn = asyncio.create_task(Runner.run(agent, "note oslo", session=s,
                                              run_config=config))
        assert await asyncio.to_thread(thinking.wait, WAIT_S)
        assert await WalstoreSession("u", store).rewind("p") is not None
        rewound.set()
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await turn
        assert await s.get_items() == [user("hi")]
        inner.model = ex.ScriptedModel([[ex.say("noted", 11)]])
        assert (await Runner.run(inner, "note rome", session=s,
                                 run_config=config)).final_output == "noted"
    asyncio.run(go())
    assert texts(asyncio.run(s.get_items())) == ["hi", "note rome", "noted"]
    assert len(tool_errors) == 1 and "was rewound by another caller" in tool_errors[0]
