"""A child process for the OpenAI session restart tests: an SDK turn SIGKILLed mid-tool.

    python openai_turn_child.py STORE LEDGER CALLS MODE MARKER

The SDK's real ``Runner`` drives an agent offline (the example's ScriptedModel) on a
``WalstoreSession("u", store)`` (durability "full").  Its tools book in the ``ws_ledger``
file (a charge per idempotency key, fsynced) inside a walstore transaction whose action
``book`` (compensator ``refund``) is declared in the session's scope.  Modes:

``turn``   a finished first turn ("hi"), then "book a hotel in Oslo": ``book_hotel``
           commits its booking, writes MARKER and blocks (the test kills it there);
``two``    the same turn, the model calling ``book_hotel`` then, in its next response,
           ``book_car``: ``book_car`` commits, writes MARKER and blocks;
``both``   as ``two``, the model calling both tools in one response;
``retry``  the request again ("book a hotel in Oslo", the model calling ``book_hotel``);
           prints ``ITEMS <json>`` (the session's items) when the run ended;
``hold``   as ``retry``, but the first refund (the restart's undo compensating the killed
           turn's booking) refunds, writes MARKER and blocks.

Stdout: ``READY`` once the store is open.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import walstore  # noqa: E402
import ws_ledger  # noqa: E402
from agents import Agent, RunConfig, Runner, function_tool  # noqa: E402

from session_support import example  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402

REQUEST = "book a hotel in Oslo"


def wait_forever() -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)
    sys.exit(5)  # nobody killed us: the test is broken


def mark(marker: str, text: str) -> None:
    """Write MARKER whole, then name it (the test kills this process once the name
    exists: written in place, a loaded CI run's test read it empty, killed mid-write)."""
    with open(marker + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(marker + ".tmp", marker)


def book(store, session, ledger: str, calls: str, what: str) -> str:
    """A booking in the outside ledger, declared in the session's scope."""
    with store.transaction(meta={"tool": f"book {what}"}) as tx:
        with tx.action("book", args={"ledger": ledger, "calls": calls, "amount": 1,
                                     "what": what},
                       compensate="refund", scope=session.scope) as act:
            act.result = ws_ledger.charge(ledger, act.key, 1)
        tx.put(session.key(f"bookings/{what}"), act.key)
    return act.key


def tools(store, session, ledger: str, calls: str, block: str | None = None,
          marker: str | None = None, block_after_both: bool = False) -> list:
    """The SDK tools ``book_hotel(city)`` and ``book_car(city)`` (``book``); the one named
    ``block`` ("hotel", "car") writes MARKER once its booking committed (with
    ``block_after_both``, once the hotel's did too) and blocks."""
    def tool(what: str):
        def run(city: str) -> str:
            key = book(store, session, ledger, calls, f"{what} {city}")
            if what == block:
                # (one response calling both tools: the SDK runs them concurrently; the
                # marker once both bookings committed)
                deadline = time.monotonic() + 30
                while (store.get(session.key("bookings/hotel Oslo")) is None
                       and block_after_both and time.monotonic() < deadline):
                    time.sleep(0.01)
                mark(marker, key)   # (the booking committed; the turn's items unsaved)
                wait_forever()
            return f"booked {what} in {city}"
        run.__name__ = f"book_{what}"
        run.__doc__ = f"Book a {what}.\n\nArgs:\n    city: where.\n"
        return function_tool(run)
    return [tool("hotel"), tool("car")]


async def main() -> None:
    store_path, ledger, calls, mode, marker = sys.argv[1:6]
    ex = example()
    held = {"done": False}

    def refund(action) -> None:
        ws_ledger.note_call(calls, action)
        ws_ledger.refund(ledger, action.key)
        if mode == "hold" and not held["done"]:
            held["done"] = True
            mark(marker, action.key)
            wait_forever()

    store = walstore.open(store_path, durability="full", compensators={"refund": refund})
    print("READY", flush=True)
    session = WalstoreSession("u", store)
    block = {"turn": "hotel", "two": "car", "both": "car"}.get(mode)
    agent_tools = tools(store, session, ledger, calls, block, marker, mode == "both")
    config = RunConfig(tracing_disabled=True)
    if block is not None:
        model = ex.ScriptedModel([[ex.say("hello", 1)]])
        agent = Agent(name="travel", tools=agent_tools, model=model)
        await Runner.run(agent, "hi", session=session, run_config=config)
        if mode == "both":   # (one response calling both tools)
            model.then([ex.call("book_hotel", {"city": "Oslo"}, 2),
                        ex.call("book_car", {"city": "Oslo"}, 3)])
        else:
            model.then([ex.call("book_hotel", {"city": "Oslo"}, 2)])
            if mode == "two":
                model.then([ex.call("book_car", {"city": "Oslo"}, 3)])
        await Runner.run(agent, REQUEST, session=session, run_config=config)
        sys.exit(6)  # the tool blocks: never here
    model = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Oslo"}, 12)],
                              [ex.say("booked a hotel in Oslo", 13)]])
    agent = Agent(name="travel", tools=agent_tools, model=model)
    await Runner.run(agent, REQUEST, session=session, run_config=config)
    print("ITEMS " + json.dumps(await session.get_items()), flush=True)
    store.close()


if __name__ == "__main__":
    asyncio.run(main())
