"""An OpenAI Agents SDK agent retracts a wrong answer and the booking its tool made.

    python examples/openai_agent_retract.py [STORE_DIR]

(``STORE_DIR`` is kept for a look afterwards, e.g. ``walstore log STORE_DIR``; it must
be new or empty: the hotel is simulated in memory, so a second run is refused.)

Runs offline: the agent is driven by ``ScriptedModel``, a ``agents.Model`` that replays
scripted responses (a tool call, then an answer) instead of calling an API; no network, no
API key.  Everything else is the real SDK: ``Runner.run`` with a ``WalstoreSession``, a
``@function_tool`` that books a hotel through a (simulated) external hotel API.

1. Turn 1: small talk.  The session takes the restore point "before-turn-2".
2. Turn 2: "Book me 2 nights in Oslo".  The model calls ``book_hotel`` with 3 nights and
   answers "booked 3 nights".  The tool registered the booking as a walstore action with
   the compensation ``cancel_booking``, declared in the session's scope.
3. The wrong answer is noticed: ``await session.rewind("before-turn-2")`` retracts the turn's
   items (the user message, the tool call, its output, the answer) and cancels the booking
   at the hotel; the session's own record of it is gone too.
4. Turn 2 again, answered right this time.

Needs walstore's scoped rewind (``store.rewind(..., scope=)``, ``tx.action(..., scope=)``).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import tempfile
from typing import Any, AsyncIterator

import walstore
from agents import Agent, ModelResponse, Runner, RunConfig, Usage, function_tool
from agents.models.interface import Model
from openai.types.responses import (ResponseFunctionToolCall, ResponseOutputMessage,
                                    ResponseOutputText)

from walstore.integrations.openai_agents import WalstoreSession


# ---- an offline model: scripted responses ---------------------------------------------------
def say(text: str, n: int) -> ResponseOutputMessage:
    return ResponseOutputMessage(id=f"msg_{n}", type="message", role="assistant",
                                 status="completed",
                                 content=[ResponseOutputText(type="output_text", text=text,
                                                             annotations=[])])


def call(tool: str, args: dict, n: int) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(id=f"fc_{n}", call_id=f"call_{n}", type="function_call",
                                    name=tool, arguments=json.dumps(args))


class ScriptedModel(Model):
    """Answers each model call with the next scripted output (a list of output items)."""

    def __init__(self, script: list[list[Any]] | None = None) -> None:
        self.script = list(script or [])
        self.inputs: list[Any] = []     # what the agent sent, call by call

    def then(self, *outputs: list[Any]) -> "ScriptedModel":
        self.script.extend(outputs)
        return self

    async def get_response(self, system_instructions, input, model_settings, tools,
                           output_schema, handoffs, tracing, *, previous_response_id=None,
                           conversation_id=None, prompt=None) -> ModelResponse:
        self.inputs.append(input)
        if not self.script:
            raise RuntimeError("ScriptedModel: the script has no more responses")
        return ModelResponse(output=self.script.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("ScriptedModel does not stream")


# ---- the outside world: a hotel API with bookings and cancellations -------------------------
class HotelAPI:
    def __init__(self) -> None:
        self.bookings: dict[str, dict] = {}

    def book(self, city: str, nights: int, idempotency_key: str) -> str:
        booking_id = f"H-{len(self.bookings) + 1}"
        self.bookings[booking_id] = {"city": city, "nights": nights, "status": "confirmed",
                                     "key": idempotency_key}
        return booking_id

    def cancel(self, booking_id: str) -> None:
        self.bookings[booking_id]["status"] = "cancelled"


def build(store: walstore.Store, session: WalstoreSession, hotel: HotelAPI,
          model: ScriptedModel) -> Agent:
    @store.compensator("cancel_booking")
    def cancel_booking(action: walstore.Action) -> None:
        hotel.cancel(action.result["booking_id"])

    @function_tool
    def book_hotel(city: str, nights: int) -> str:
        """Book a hotel room.

        Args:
            city: where.
            nights: how many nights.
        """
        with store.transaction(meta={"tool": "book_hotel"}) as tx:
            with tx.action("book_hotel", args={"city": city, "nights": nights},
                           compensate="cancel_booking", scope=session.scope) as act:
                booking_id = hotel.book(city, nights, idempotency_key=act.key)
                act.result = {"booking_id": booking_id}
            tx.put(session.key(f"bookings/{booking_id}"), {"city": city, "nights": nights})
        return f"booked {booking_id}: {nights} nights in {city}"

    return Agent(name="travel", instructions="You book hotels.", tools=[book_hotel],
                 model=model)


def show(title: str, items: list[dict]) -> None:
    print(f"  {title}: {len(items)} items")
    for item in items:
        kind = item.get("role") or item.get("type")
        text = item.get("content")
        if isinstance(text, list):
            text = " ".join(c.get("text", "") for c in text if isinstance(c, dict))
        text = text or item.get("arguments") or item.get("output")
        print(f"    {kind:<20} {text}")


async def main(path: str) -> dict[str, Any]:
    store = walstore.open(path)
    try:
        session = WalstoreSession("traveller-1", store)
        hotel = HotelAPI()
        model = ScriptedModel([
            [say("Happy to help with your trip. Where to?", 1)],
            [call("book_hotel", {"city": "Oslo", "nights": 3}, 2)],   # wrong: asked for 2
            [say("Done: 3 nights in Oslo (H-1).", 3)],
        ])
        agent = build(store, session, hotel, model)
        config = RunConfig(tracing_disabled=True)

        print("turn 1")
        r = await Runner.run(agent, "Hi, I'm planning a trip to Norway.", session=session,
                             run_config=config)
        print(f"  agent: {r.final_output}")
        await session.restore_point("before-turn-2")

        print("turn 2")
        r = await Runner.run(agent, "Book me 2 nights in Oslo.", session=session,
                             run_config=config)
        print(f"  agent: {r.final_output}   <- wrong: 3 nights")
        print(f"  hotel: {hotel.bookings}")
        show("session", await session.get_items())

        print("retract turn 2: session.rewind('before-turn-2')")
        info = await session.rewind("before-turn-2")
        print(f"  undone by transaction {info.txid}")
        after_rewind = await session.get_items()
        show("session", after_rewind)
        print(f"  hotel: {hotel.bookings}")
        print(f"  session's bookings: {list(store.scan(prefix=session.key('bookings/')))}")

        print("turn 2, again")
        model.then([call("book_hotel", {"city": "Oslo", "nights": 2}, 4)],
                   [say("Done: 2 nights in Oslo (H-2).", 5)])
        r = await Runner.run(agent, "Book me 2 nights in Oslo.", session=session,
                             run_config=config)
        print(f"  agent: {r.final_output}")
        print(f"  hotel: {hotel.bookings}")
        final = await session.get_items()
        show("session", final)
        return {"after_rewind": after_rewind, "final": final, "hotel": hotel.bookings,
                "booked": dict(store.scan(prefix=session.key("bookings/"))),
                "model_inputs": model.inputs}
    finally:
        store.close()


if __name__ == "__main__":
    if "scope" not in inspect.signature(walstore.Store.rewind).parameters:
        sys.exit("this example needs walstore's scoped rewind (store.rewind(..., scope=))")
    path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/store"
    # (a second run on a kept STORE_DIR continued the first run's conversation against a
    # new, empty simulated hotel: the session then listed a booking "H-2" of the first
    # run's hotel, which this run's hotel never made.  The story is told once per store.)
    if os.path.lexists(path) and not os.path.isdir(path):   # (a traceback: NotADirectoryError)
        sys.exit(f"error: {path} exists and is not a directory; pass a new STORE_DIR")
    if os.path.exists(path) and os.listdir(path):
        sys.exit(f"error: {path} already holds a store (a previous run?); pass a new "
                 f"STORE_DIR")
    asyncio.run(main(path))
