"""What the OpenAI Agents session tests share (stops 74-76): SDK-shaped items, a store
fixture, a tool's booking declared in the session's scope, and a scripted model held on
its first answer.  Imported by the test
files (``from session_support import ...``); pytest collects no test from it."""
from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path
from types import ModuleType

import pytest

import walstore

WAIT_S = 30   # (a safety net for a hang, never a timing assertion)
ROOT = Path(__file__).resolve().parent.parent


def example() -> ModuleType:
    """``examples/openai_agent_retract.py`` as a module: its ScriptedModel, ``call`` and
    ``say`` drive the SDK's real Runner offline."""
    spec = importlib.util.spec_from_file_location(
        "openai_agent_retract", ROOT / "examples" / "openai_agent_retract.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    return ex


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


def book(store, session, what: str, world: list, *,
         entered: threading.Event | None = None,
         go_on: threading.Event | None = None) -> None:
    """A tool's booking: an action declared in the session's scope, its effect in
    ``world``, the booking noted under ``session.key``; with events, it waits inside the
    action's body (the booking made) until ``go_on``."""
    with store.transaction() as tx:
        with tx.action("book", args={"what": what}, compensate="cancel",
                       scope=session.scope) as act:
            world.append(f"book {what}")
            act.result = what
            if entered is not None:
                entered.set()
                go_on.wait(WAIT_S)
        tx.put(session.key(f"bookings/{what}"), "confirmed")


def held_cancel(store, world: list, done: str | None = None
                ) -> tuple[threading.Event, threading.Event]:
    """Register compensator "cancel": it notes ``cancel <what>`` in ``world``, sets the
    first event and holds until the second is set (a rewind still compensating), then
    notes ``done`` when given.  Returns (compensating, release)."""
    compensating, release = threading.Event(), threading.Event()

    @store.compensator("cancel")
    def cancel(action):
        world.append(f"cancel {action.args['what']}")
        compensating.set()
        release.wait(WAIT_S)
        if done is not None:
            world.append(done)
    return compensating, release


def held_model(ex: ModuleType, thinking: threading.Event, go_on: threading.Event) -> type:
    """The example's ScriptedModel (``ex = example()``) whose first answer waits: it sets
    ``thinking`` and waits for ``go_on`` (a turn held while another caller undoes)."""
    class HeldModel(ex.ScriptedModel):
        async def get_response(self, *args, **kwargs):
            if not thinking.is_set():
                thinking.set()
                assert await asyncio.to_thread(go_on.wait, WAIT_S)
            return await super().get_response(*args, **kwargs)
    return HeldModel


def booking_tool(store, session, world: list, then=None):
    """The SDK tool ``book_hotel(city)``: ``book`` in ``session``'s scope, then
    ``then(city)`` if given (a test holding the turn there); returns "booked <city>"."""
    from agents import function_tool

    @function_tool
    def book_hotel(city: str) -> str:
        """Book a hotel.

        Args:
            city: where.
        """
        book(store, session, city, world)
        if then is not None:
            then(city)
        return f"booked {city}"
    return book_hotel


class Killed(BaseException):
    """The end of the process in a tool (SIGKILL), stood in for in process: out of
    ``Runner.run`` with nothing of the tool's step saved (``cut_short_turn``)."""


def cut_short_turn(session, work, request: str = "book it") -> None:
    """A turn of the SDK's real Runner on ``session`` whose tool ``work_tool`` runs
    ``work()`` and then ends as a killed process leaves it: the request saved, the step's
    call and output never (``Killed`` out of the run)."""
    from agents import Agent, RunConfig, Runner, function_tool
    ex = example()

    @function_tool
    def work_tool() -> str:
        """Do the work."""
        work()
        raise Killed()
    agent = Agent(name="cut", tools=[work_tool],
                  model=ex.ScriptedModel([[ex.call("work_tool", {}, 90)]]))
    with pytest.raises(Killed):
        asyncio.run(Runner.run(agent, request, session=session,
                               run_config=RunConfig(tracing_disabled=True)))


def spy_rewind_waits(monkeypatch) -> threading.Event:
    """An event set when a session write starts waiting on a rewind under way
    (``_WriterLock.await_rewinds`` with ``underway``)."""
    import walstore.integrations.openai_agents as oa
    waiting = threading.Event()
    orig = oa._WriterLock.await_rewinds

    def await_rewinds(self):
        if self.underway:
            waiting.set()
        return orig(self)
    monkeypatch.setattr(oa._WriterLock, "await_rewinds", await_rewinds)
    return waiting


def texts(items: list, kinds: bool = False) -> list:
    """What a conversation says, one string per item (tool calls' arguments and tool
    outputs too); ``kinds``: each prefixed with the item's type or role."""
    out = []
    for item in items:
        text = item.get("content") or item.get("arguments") or item.get("output")
        if isinstance(text, list):
            text = " ".join(c.get("text", "") for c in text if isinstance(c, dict))
        out.append(f"{item.get('type') or item.get('role')}: {text}" if kinds else text)
    return out
