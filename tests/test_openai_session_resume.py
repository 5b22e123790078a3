"""WalstoreSession: a run resumed from a RunState (the SDK's human in the loop) after the
session was rewound, erased, cleared or popped since the run paused (stop 77, h1).

A tool with ``needs_approval=True`` makes ``Runner.run`` stop with ``result.interruptions``;
the program keeps ``state = result.to_state()`` (perhaps as JSON), a human approves or
rejects, and ``Runner.run(agent, state, session=session)`` resumes: a new SDK run, often
in another task or ``asyncio.run``, that runs the approved tools before it touches the
session.  Before: it was taken for a new turn.  After a rewind to before the paused turn
the approved tool booked with nothing in the conversation recording it, and the run
saved its output (a function_call_output whose function_call the rewind had removed: the
next real model call fails on it) and its answer into the rewound session; with output
guardrails and a tool_use_behavior that stops at tools, the SDK holds the paused
response back until the resume, and it was saved after the rewind had cancelled its
booking ("booked rome" beside "cancel rome"), even from the task that was cut off (the
resumed run's read of the session cleared the cut-off).  Resuming one RunState twice
booked twice and saved the output twice.

Now the resume is refused (``ConflictError``, nothing saved) and the work its tools did in
the session's scope before it is reverted (its booking compensated); a resume with
nothing undone saves the turn once, in order.  The real SDK Runner, a scripted model, an
outside ledger (``world``).
"""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import book, booking_tool, example, store, texts, user  # noqa: E402,F401

EX = example()


def _texts(items):
    return texts(items, kinds=True)


def _actions(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


PAUSED = ["user: hi", "user: book rome", 'function_call: {"city": "rome"}',
          'function_call: {"city": "rome"}', "function_call_output: booked rome"]


class Trip:
    """An agent with ``book_hotel`` (books at once) and ``pay`` (needs approval), both
    booking in the session's scope, against one store and ``world``; ``held``: output
    guardrails and ``stop_on_first_tool``, so the SDK holds the paused response back
    from the session until the resume."""

    def __init__(self, store, held: bool = False) -> None:
        from agents import (Agent, GuardrailFunctionOutput, RunConfig, function_tool,
                            output_guardrail)
        self.store, self.world = store, []
        store.compensator("cancel")(lambda a: self.world.append(f"cancel {a.args['what']}"))
        self.session = WalstoreSession("u", store)
        world = self.world

        @function_tool(needs_approval=True)
        def pay(city: str) -> str:
            """Pay for the hotel.

            Args:
                city: where.
            """
            book(store, self.session, f"pay {city}", world)
            return f"paid {city}"

        self.model = EX.ScriptedModel([
            [EX.call("book_hotel", {"city": "rome"}, 1), EX.call("pay", {"city": "rome"}, 2)],
            [EX.say("done rome", 3)], [EX.say("next", 4)], [EX.say("again", 5)]])
        kw = {}
        if held:
            @output_guardrail
            async def fine(ctx, agent, output):
                return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)
            kw = {"output_guardrails": [fine], "tool_use_behavior": "stop_on_first_tool"}
        self.agent = Agent(name="trip", instructions="Book trips.", model=self.model,
                           tools=[booking_tool(store, self.session, world), pay], **kw)
        self.config = RunConfig(tracing_disabled=True)

    async def pause(self):
        """Turn 1 'hi' (saved directly), restore point 'p', then 'book rome': book_hotel
        books, pay waits for approval.  The RunState of the pause."""
        from agents import Runner
        await self.session.add_items([user("hi")])
        await self.session.restore_point("p")
        result = await Runner.run(self.agent, "book rome", session=self.session,
                                  run_config=self.config)
        assert [i.name for i in result.interruptions] == ["pay"]
        assert self.world == ["book rome"]
        return result.to_state()

    async def resume(self, state, *, serialized: bool = False, approve: bool = True,
                     session=None):
        from agents import RunState, Runner
        if serialized:
            state = await RunState.from_json(self.agent, state.to_json())
        for item in state.get_interruptions():
            (state.approve if approve else state.reject)(item)
        return await Runner.run(self.agent, state, session=session or self.session,
                                run_config=self.config)

    async def items(self):
        return _texts(await WalstoreSession("u", self.store).get_items())


def _undo(trip: Trip, how: str) -> None:
    """Another caller (a fresh asyncio.run, as another request or process would) undoes."""
    async def go():
        other = WalstoreSession("u", trip.store)
        if how == "rewind":
            await other.rewind("p")
        elif how == "erase":
            await other.erase()
        elif how == "clear":
            await other.clear_session()
        elif how == "pop":
            await other.pop_items(3)        # the paused calls and book_hotel's output
        elif how == "branch":
            await other.create_branch_from_turn(2, "retry")   # from before 'book rome'
    asyncio.run(go())


@pytest.mark.parametrize("serialized", [False, True], ids=["state", "json"])
@pytest.mark.parametrize("approve", [True, False], ids=["approved", "rejected"])
def test_a_resume_after_a_rewind_in_another_context_is_refused_and_books_nothing_left(
        store, serialized, approve):
    """The pause in one asyncio.run, a rewind to before the turn in another, the resume in
    a third.  Before: the approved pay booked after the rewind (action 'committed'), and
    the run saved ['hi', <output paid rome>, 'done rome'] — an output whose call the
    rewind had removed.  Now refused, nothing saved, pay's booking compensated."""
    trip = Trip(store)
    box = {}

    async def paused():
        box["state"] = await trip.pause()
    asyncio.run(paused())
    _undo(trip, "rewind")
    assert trip.world == ["book rome", "cancel rome"]

    async def resumed():
        with pytest.raises(walstore.ConflictError) as err:
            await trip.resume(box["state"], serialized=serialized, approve=approve,
                              session=WalstoreSession("u", store))
        assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
        assert await trip.items() == ["user: hi"]
        # a new run from the session as it is works, in the same task
        from agents import Runner
        r = await Runner.run(trip.agent, "hello again", session=trip.session,
                             run_config=trip.config)
        assert r.final_output == "done rome"
        assert await trip.items() == ["user: hi", "user: hello again", "message: done rome"]
    asyncio.run(resumed())
    paid = ["book pay rome", "cancel pay rome"] if approve else []
    assert trip.world == ["book rome", "cancel rome"] + paid
    assert _actions(store) == sorted([("rome", "compensated")]
                                     + ([("pay rome", "compensated")] if approve else []))
    assert store.get(trip.session.key("bookings/pay rome")) is None


@pytest.mark.parametrize("held", [False, True], ids=["saved", "held"])
def test_a_resume_in_the_paused_task_after_another_callers_rewind_saves_nothing(
        store, held):
    """The task that paused resumes after another task rewound.  Its pay is refused up
    front (its task is cut off).  Before: the resumed run's read of the session cleared
    the cut-off, and it saved into the rewound session — the tool's error output with no
    call before it, or (held) the whole paused response, 'booked rome' beside the
    rewind's 'cancel rome'."""
    trip = Trip(store, held=held)

    async def go():
        state = await trip.pause()
        await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        with pytest.raises(walstore.ConflictError, match="was rewound after the run this "
                                                         "RunState resumes paused"):
            await trip.resume(state)
        assert await trip.items() == ["user: hi"]
    asyncio.run(go())
    assert trip.world == ["book rome", "cancel rome"]
    assert _actions(store) == [("rome", "compensated")]


@pytest.mark.parametrize("held", [False, True], ids=["saved", "held"])
def test_a_resume_after_its_own_tasks_rewind_is_refused_and_its_booking_compensated(
        store, held):
    """The task rewinds the session itself, then resumes the RunState taken before.
    Before: pay booked and the run saved into the rewound session (held: 'booked rome'
    whose booking the rewind had cancelled)."""
    trip = Trip(store, held=held)

    async def go():
        state = await trip.pause()
        await trip.session.rewind("p")
        with pytest.raises(walstore.ConflictError, match="compensated"):
            await trip.resume(state)
        assert await trip.items() == ["user: hi"]
        # tried again: refused again, its pay refused before it ran (the refused run left
        # the RunState's stamp as the pause left it; the SDK itself refuses to resume a
        # held RunState whose save failed)
        from agents.exceptions import UserError
        with pytest.raises((walstore.ConflictError, UserError),
                           match="was rewound after the run|cannot be resumed"):
            await trip.resume(state)
        assert await trip.items() == ["user: hi"]
    asyncio.run(go())
    assert trip.world == ["book rome", "cancel rome", "book pay rome", "cancel pay rome"]
    assert _actions(store) == [("pay rome", "compensated"), ("rome", "compensated")]


@pytest.mark.parametrize("how", ["erase", "clear", "pop", "branch"])
def test_a_serialized_resume_after_an_erase_clear_pop_or_branch_is_refused(store, how):
    """The RunState as JSON, resumed in a fresh asyncio.run after another caller erased,
    cleared or popped the session, or branched it from before the turn.  Before: the
    output 'paid rome' was saved with no call before it (on the new branch too), and
    pay's booking stood."""
    trip = Trip(store)
    box = {}

    async def paused():
        box["json"] = (await trip.pause()).to_json()
    asyncio.run(paused())
    _undo(trip, how)
    before = asyncio.run(trip.items())

    async def resumed():
        from agents import RunState
        state = await RunState.from_json(trip.agent, box["json"])
        with pytest.raises(walstore.ConflictError, match="nothing was written"):
            await trip.resume(state, session=WalstoreSession("u", store))
        assert await trip.items() == before
    asyncio.run(resumed())
    assert trip.world[-2:] == ["book pay rome", "cancel pay rome"]
    assert ("pay rome", "compensated") in _actions(store)
    assert ("pay rome", "committed") not in _actions(store)


@pytest.mark.parametrize("held", [False, True], ids=["saved", "held"])
def test_resuming_one_runstate_twice_books_and_saves_once(store, held):
    """The same JSON resumed twice, each in its own asyncio.run.  Before: pay booked twice
    (two 'committed' actions) and its output was saved twice (held: the whole paused
    response twice)."""
    trip = Trip(store, held=held)
    box = {}

    async def paused():
        box["json"] = (await trip.pause()).to_json()
    asyncio.run(paused())

    async def resumed(twice: bool):
        from agents import RunState
        state = await RunState.from_json(trip.agent, box["json"])
        if not twice:
            await trip.resume(state, session=WalstoreSession("u", store))
            return
        with pytest.raises(walstore.ConflictError, match="already"):
            await trip.resume(state, session=WalstoreSession("u", store))
    asyncio.run(resumed(False))
    once = asyncio.run(trip.items())
    asyncio.run(resumed(True))
    assert asyncio.run(trip.items()) == once
    assert once.count("function_call_output: paid rome") == 1
    assert trip.world == ["book rome", "book pay rome", "book pay rome", "cancel pay rome"]
    assert _actions(store) == [("pay rome", "committed"), ("pay rome", "compensated"),
                               ("rome", "committed")]


@pytest.mark.parametrize("where", ["task", "fresh", "json"])
@pytest.mark.parametrize("held", [False, True], ids=["saved", "held"])
def test_a_resume_with_nothing_undone_saves_the_turn_once_in_order(store, where, held):
    """The happy path: resumed in the task that paused, in a fresh asyncio.run, or from
    JSON there — the turn saved once, in order, nothing refused or compensated, and the
    next turn runs on."""
    trip = Trip(store, held=held)
    box = {}

    async def paused():
        box["state"] = await trip.pause()
        if where == "task":
            box["result"] = await trip.resume(box["state"])
    asyncio.run(paused())

    async def resumed():
        if where != "task":
            box["result"] = await trip.resume(box["state"], serialized=where == "json",
                                              session=WalstoreSession("u", store))
        from agents import Runner
        r = await Runner.run(trip.agent, "thanks", session=WalstoreSession("u", store),
                             run_config=trip.config)
        box["next"] = r.final_output
    asyncio.run(resumed())
    turn = ["user: hi", "user: book rome", 'function_call: {"city": "rome"}',
            'function_call: {"city": "rome"}', "function_call_output: booked rome",
            "function_call_output: paid rome"]
    if held:
        assert box["result"].final_output == "booked rome"
        after = ["user: thanks", "message: done rome"]
    else:
        assert box["result"].final_output == "done rome"
        turn.append("message: done rome")
        after = ["user: thanks", "message: next"]
    assert asyncio.run(trip.items()) == turn + after
    assert trip.world == ["book rome", "book pay rome"]
    assert _actions(store) == [("pay rome", "committed"), ("rome", "committed")]


def test_a_run_without_the_session_booking_in_its_scope_is_left_alone(store):
    """A run not given the session (the caller keeps the history itself) whose tool books
    in the session's scope, then the caller saves the turn: nothing refused, nothing
    compensated (the run's booking is noted only until its first write to the session)."""
    from agents import Agent, RunConfig, Runner
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    s = WalstoreSession("u", store)
    model = EX.ScriptedModel([[EX.call("book_hotel", {"city": "oslo"}, 1)],
                              [EX.say("booked oslo", 2)]])
    agent = Agent(name="a", instructions="x", model=model,
                  tools=[booking_tool(store, s, world)])

    async def go():
        history = await s.get_items()
        result = await Runner.run(agent, history + [user("book oslo")],
                                  run_config=RunConfig(tracing_disabled=True))
        await s.add_items(result.to_input_list())
        assert (await s.get_items())[-1]["content"][0]["text"] == "booked oslo"
    asyncio.run(go())
    assert world == ["book oslo"]
    assert _actions(store) == [("oslo", "committed")]


# ---- stop 77 h3: what h1's checks refused or missed ------------------------------------------
@pytest.mark.parametrize("compacting", [False, True], ids=["session", "compacting"])
@pytest.mark.parametrize("how", ["callback", "input"])
def test_a_new_runs_first_save_holding_tool_items_is_saved(store, how, compacting):
    """A new run (no RunState) whose first save holds tool items: a session_input_callback
    that trims the history's tool outputs (the SDK saves the trimmed copy as new, as over
    SQLiteSession), or an input carrying a call and its output under a fixed call_id each
    turn.  Before: ConflictError ("holds an output for tool call 'call_1' already" /
    "holds tool call 'ctx' already", blaming a RunState): the check ran on every run's
    first save.  Now only a resumed run's first save is checked.  Through
    OpenAIResponsesCompactionSession, which hands its underlying session no wrapper,
    a first save holding a user message (a new run's input) is not checked either."""
    from agents import Agent, RunConfig, Runner
    from agents.memory import OpenAIResponsesCompactionSession
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    ws = s = WalstoreSession("u", store)
    if compacting:
        s = OpenAIResponsesCompactionSession("u", ws, client=object(),
                                             should_trigger_compaction=lambda _ctx: False)

    async def go():
        if how == "callback":
            model = EX.ScriptedModel([[EX.call("book_hotel", {"city": "oslo"}, 1)],
                                      [EX.say("booked", 2)], [EX.say("fine", 3)]])
            agent = Agent(name="a", instructions="x", model=model,
                          tools=[booking_tool(store, ws, world)])
            await Runner.run(agent, "book oslo", session=s,
                             run_config=RunConfig(tracing_disabled=True))

            def trim(history, new):
                return [dict(h, output=str(h["output"])[:3])
                        if h.get("type") == "function_call_output" else h
                        for h in history] + new
            config = RunConfig(tracing_disabled=True, session_input_callback=trim)
            assert (await Runner.run(agent, "thanks", session=s,
                                     run_config=config)).final_output == "fine"
            assert _texts(await s.get_items())[-3:] == [
                "function_call_output: boo", "user: thanks", "message: fine"]
            return
        agent = Agent(name="a", instructions="x",
                      model=EX.ScriptedModel([[EX.say("a", 1)], [EX.say("b", 2)]]))
        for answer in ("a", "b"):
            given = [{"type": "function_call", "call_id": "ctx", "name": "profile",
                      "arguments": "{}"},
                     {"type": "function_call_output", "call_id": "ctx", "output": "p"},
                     user("q")]
            r = await Runner.run(agent, given, session=s,
                                 run_config=RunConfig(tracing_disabled=True))
            assert r.final_output == answer
        assert len(await s.get_items()) == 8
    asyncio.run(go())
    assert world == (["book oslo"] if how == "callback" else [])


def test_a_held_resume_whose_call_ids_an_earlier_turn_used_saves_and_keeps_its_booking(
        store):
    """A model whose call ids repeat across responses (a scripted one, some compatible
    servers): an earlier turn's call was 'call_2'; the held paused response has
    'call_2' too.  Before: the resume was refused ("holds tool call 'call_2' already")
    and the approved pay's booking reverted, its action compensated.  Now a call counts
    as saved already only when the branch holds that very item."""
    from agents import Runner
    trip = Trip(store, held=True)
    trip.model.script[:0] = [[EX.call("book_hotel", {"city": "paris"}, 2)]]

    async def go():
        await trip.session.add_items([user("hi")])
        await Runner.run(trip.agent, "book paris", session=trip.session,
                         run_config=trip.config)
        result = await Runner.run(trip.agent, "book rome", session=trip.session,
                                  run_config=trip.config)
        state = await _from_json(trip, result.to_state().to_json())
        r = await trip.resume(state, session=WalstoreSession("u", store))
        assert r.final_output == "booked rome"
    asyncio.run(go())
    assert asyncio.run(trip.items())[-2:] == ["function_call_output: booked rome",
                                              "function_call_output: paid rome"]
    assert trip.world == ["book paris", "book rome", "book pay rome"]
    assert _actions(store) == [("paris", "committed"), ("pay rome", "committed"),
                               ("rome", "committed")]


async def _from_json(trip, text):
    from agents import RunState
    return await RunState.from_json(trip.agent, text)


class _FreshSession:
    """What the tools book against: a new WalstoreSession for each scope and key (a
    server that keeps no session object between requests)."""

    def __init__(self, store) -> None:
        self.store = store

    @property
    def scope(self) -> str:
        return WalstoreSession("u", self.store).scope

    def key(self, name: str) -> str:
        return WalstoreSession("u", self.store).key(name)


def test_a_held_resume_in_process_after_a_rewind_is_refused_with_no_session_object_kept(
        store):
    """In process, a RunState kept, but no WalstoreSession object of the conversation
    alive between the pause, the rewind and the resume (each request makes its own).
    Before: the session's rewind count went with its last object, the stamp pointed at
    nothing, and the held response was saved after the rewind ('booked rome' beside
    'cancel rome'), pay's booking standing.  Now the stamp keeps the count alive."""
    import gc
    from agents import Runner
    trip = Trip(store, held=True)
    trip.session = _FreshSession(store)
    trip.agent.tools[0] = booking_tool(store, _FreshSession(store), trip.world)

    async def paused():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        result = await Runner.run(trip.agent, "book rome", session=s,
                                  run_config=trip.config)
        return result.to_state()
    state = asyncio.run(paused())
    gc.collect()
    asyncio.run(WalstoreSession("u", store).rewind("p"))
    gc.collect()

    async def resumed():
        with pytest.raises(walstore.ConflictError, match="was rewound after the run"):
            await trip.resume(state, session=WalstoreSession("u", store))
    asyncio.run(resumed())
    assert asyncio.run(trip.items()) == ["user: hi"]
    assert trip.world == ["book rome", "cancel rome", "book pay rome", "cancel pay rome"]
    assert _actions(store) == [("pay rome", "compensated"), ("rome", "compensated")]


# ---- stop 77 h5: found by the randomised race (/tmp, h5's report) ----------------------------
@pytest.mark.parametrize("serialized", [False, True], ids=["state", "json"])
def test_a_resume_whose_tools_work_a_rewind_took_back_says_so_not_that_its_revert_failed(
        store, monkeypatch, serialized):
    """The approved pay books, then another caller rewinds the session to before the
    turn (its compensations cancel pay's booking with the turn's), then the resumed run
    saves: refused.  Before: the error said "reverting it failed for transaction N
    (RevertConflict: ... undone already ...)", which the GUIDE reads as a booking
    standing, to undo by hand (cancelled twice then); the rewind had cancelled it, once."""
    import sys
    import threading
    trip = Trip(store)
    real_book = book

    def book_then_rewind(store_, session, what, world):
        real_book(store_, session, what, world)
        if what == "pay rome":   # (another request rewinds while the tool returns)
            t = threading.Thread(target=_undo, args=(trip, "rewind"))
            t.start()
            t.join()
    monkeypatch.setattr(sys.modules[__name__], "book", book_then_rewind)
    box = {}

    async def paused():
        box["state"] = await trip.pause()
    asyncio.run(paused())

    async def resumed():
        with pytest.raises(walstore.ConflictError) as err:
            await trip.resume(box["state"], serialized=serialized,
                              session=WalstoreSession("u", store))
        return str(err.value)
    said = asyncio.run(resumed())
    assert "failed" not in said and "undone already" in said and "\n" not in said
    assert trip.world == ["book rome", "book pay rome", "cancel pay rome", "cancel rome"]
    assert _actions(store) == [("pay rome", "compensated"), ("rome", "compensated")]
    assert asyncio.run(trip.items()) == ["user: hi"]


@pytest.mark.parametrize("held", [False, True], ids=["saved", "held"])
def test_a_runstate_resumed_again_after_its_answer_was_popped_is_refused(store, held):
    """The JSON resumed once (pay approved, its booking saved), the turn's newest items
    popped (a "regenerate answer"; a pop compensates nothing), then the same JSON
    resumed again (a retried approval request).  Before: the pay call stood unanswered
    again (held: the whole held response was gone), so the second resume passed the
    items check: pay booked twice, both bookings standing.  Now the resumed run's save
    notes the calls it answered, and a resume answering one again is refused, its
    booking reverted."""
    trip = Trip(store, held=held)
    box = {}

    async def paused():
        box["json"] = (await trip.pause()).to_json()
    asyncio.run(paused())

    async def resumed(again: bool):
        state = await _from_json(trip, box["json"])
        s = WalstoreSession("u", store)
        if not again:
            await trip.resume(state, session=s)
            # the resume's items: pay's output and the answer (held: the held response,
            # the two calls and their outputs)
            await s.pop_items(4 if held else 2)
            return
        with pytest.raises(walstore.ConflictError, match="already"):
            await trip.resume(state, session=s)
    asyncio.run(resumed(False))
    popped = asyncio.run(trip.items())
    asyncio.run(resumed(True))
    assert asyncio.run(trip.items()) == popped
    assert trip.world == ["book rome", "book pay rome", "book pay rome", "cancel pay rome"]
    assert _actions(store) == [("pay rome", "committed"), ("pay rome", "compensated"),
                               ("rome", "committed")]


def test_the_installed_sdk_tells_a_new_runs_wrapper_from_a_resumed_ones():
    """``_decided`` reads the SDK's private ``RunContextWrapper._approvals`` (openai-agents
    0.24) to tell a run resumed from a RunState from a new run; an SDK without it makes
    every run's first save checked, and a new run whose input or session_input_callback
    gives tool items the branch holds is then refused (stop 77 h3).  Fails when an SDK
    upgrade renames it, before users meet those refusals."""
    from agents import RunContextWrapper

    from walstore.integrations import openai_agents as oa
    fresh = RunContextWrapper(context=None)
    assert isinstance(getattr(fresh, "_approvals", None), dict)
    assert oa._decided(fresh) is False
