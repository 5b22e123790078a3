#!/usr/bin/env python3
"""A LangGraph travel agent whose bookings can be undone: rewind runs compensations.

The agent books a hotel in each city of its plan.  The hotel system is "external": a
JSON file (``hotel.json``) standing in for a booking API that honours idempotency keys.
The graph's checkpoints live in walstore (``WalstoreSaver``), and the booking tool acts
through a walstore action with a compensation::

    with store.transaction() as tx:
        with tx.action("book_hotel", args=..., compensate="cancel_hotel") as act:
            act.result = hotel.book(city, nights, idempotency_key=act.key)

What happens:

1. The agent books Paris, Rome and Oslo.  The Rome request "times out" after the hotel
   took it; the tool retries with the same idempotency key and the hotel returns the same
   booking instead of a second one.
2. The user changes their mind after Paris.  ``saver.rewind(checkpoint)`` rewinds the
   trip's thread to the checkpoint saved right after Paris: the later checkpoints, the
   agent's later state and memories (written by the booking node: they belong to the
   thread) are undone, and the compensations of the undone bookings run, newest first
   (Oslo, then Rome are cancelled at the hotel).  Other threads would be untouched.
3. The plan is changed to Lisbon and the graph resumes from that checkpoint: it books
   Lisbon.  Paris was not booked again.
4. For contrast, the same story with LangGraph's own time travel and an in-memory saver:
   resuming from the old checkpoint leaves Rome and Oslo booked (nothing undoes them).

Runs offline: the "model" is a scripted planner node.  Needs ``pip install langgraph``.

    python examples/langgraph_agent.py [--dir DIR]

``--dir`` keeps the store and the hotel ledger for a look afterwards (``walstore log
DIR/store``); it must be new or empty: a second run there is refused.
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Callable, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver, WalstoreStore  # noqa: E402


class HotelSystem:
    """The external system: bookings in a JSON file, keyed by idempotency key."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lost_responses: set[str] = set()  # cities whose first response gets "lost"
        if not os.path.exists(path):
            self._save({"bookings": {}, "requests": 0})

    def _load(self) -> dict:
        with open(self.path) as f:
            return json.load(f)

    def _save(self, doc: dict) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def book(self, city: str, nights: int, idempotency_key: str) -> dict:
        doc = self._load()
        doc["requests"] += 1
        booking = doc["bookings"].get(idempotency_key)
        if booking is None:  # a key seen before gets the same booking back
            booking = {"booking_id": f"H-{len(doc['bookings']) + 1:03d}", "city": city,
                       "nights": nights, "status": "booked"}
            doc["bookings"][idempotency_key] = booking
        self._save(doc)
        if city in self.lost_responses:
            self.lost_responses.discard(city)
            raise TimeoutError(f"no response from the hotel for {city}")
        return dict(booking)

    def cancel(self, idempotency_key: str) -> dict | None:
        """Cancel the booking made under ``idempotency_key`` (idempotent; None if none)."""
        doc = self._load()
        booking = doc["bookings"].get(idempotency_key)
        if booking is not None and booking["status"] != "cancelled":
            booking["status"] = "cancelled"
            self._save(doc)
        return booking

    def bookings(self) -> list[dict]:
        return sorted(self._load()["bookings"].values(), key=lambda b: b["booking_id"])


def show(hotel: HotelSystem, indent: str = "   ") -> None:
    for b in hotel.bookings():
        print(f"{indent}{b['booking_id']}  {b['city']:<7} {b['status']}")


class Trip(TypedDict):
    plan: list[str]                           # cities still to book
    booked: Annotated[list, operator.add]     # what the agent believes it booked
    log: Annotated[list, operator.add]


def build_graph(book_tool: Callable[[str], dict]) -> StateGraph:
    def planner(state: Trip) -> dict:  # the scripted "model": book the next city
        nxt = state["plan"][0] if state["plan"] else None
        return {"log": [f"plan: book {nxt}" if nxt else "plan: done"]}

    def book(state: Trip) -> dict:  # the tool node
        city = state["plan"][0]
        booking = book_tool(city)
        return {"plan": state["plan"][1:], "booked": [f"{city}:{booking['booking_id']}"],
                "log": [f"booked {city} ({booking['booking_id']})"]}

    g = StateGraph(Trip)
    g.add_node("planner", planner)
    g.add_node("book", book)
    g.add_edge(START, "planner")
    g.add_conditional_edges("planner", lambda s: "book" if s["plan"] else END)
    g.add_edge("book", "planner")
    return g


def walstore_story(workdir: str) -> dict:
    print("== LangGraph + walstore: rewinding undoes the bookings ==")
    hotel = HotelSystem(os.path.join(workdir, "hotel.json"))
    hotel.lost_responses.add("Rome")
    store = walstore.open(os.path.join(workdir, "store"), durability="full")

    @store.compensator("cancel_hotel")
    def cancel_hotel(action: walstore.Action) -> None:
        # the idempotency key finds the booking even if the result never came back
        cancelled = hotel.cancel(action.key)
        if cancelled is not None:
            print(f"   compensation: cancelled {cancelled['booking_id']} "
                  f"({cancelled['city']})")

    def book_tool(city: str) -> dict:
        with store.transaction(meta={"tool": "book_hotel", "city": city}) as tx:
            with tx.action("book_hotel", args={"city": city, "nights": 2},
                           compensate="cancel_hotel") as act:
                for attempt in (1, 2, 3):
                    try:
                        act.result = hotel.book(city, 2, idempotency_key=act.key)
                        break
                    except TimeoutError as e:
                        print(f"   {e}; retrying with the same idempotency key")
            tx.put(f"trip/bookings/{city}", act.result)  # the agent's own world state
        print(f"   booked {city}: {act.result['booking_id']}  (key {act.key})")
        # long-term memory, in the same store (LangGraph's BaseStore)
        memory.put(("travellers", "ana"), city, {"booked": act.result["booking_id"]})
        return act.result

    saver = WalstoreSaver(store)
    memory = WalstoreStore(store)
    graph = build_graph(book_tool).compile(checkpointer=saver, store=memory)
    cfg = {"configurable": {"thread_id": "trip-1"}}

    print("1. The agent books its plan: Paris, Rome, Oslo")
    graph.invoke({"plan": ["Paris", "Rome", "Oslo"], "booked": [], "log": []}, cfg,
                 durability="sync")  # sync: each checkpoint is saved before the next step
    show(hotel)

    print("2. The user changes their mind after Paris: rewind to that checkpoint")
    history = list(graph.get_state_history(cfg))
    after_paris = min((s for s in history if len(s.values.get("booked", [])) == 1),
                      key=lambda s: s.metadata["step"])
    print(f"   checkpoint {after_paris.config['configurable']['checkpoint_id']} "
          f"(step {after_paris.metadata['step']}, booked {after_paris.values['booked']})")
    plan = saver.rewind(after_paris.config, dry_run=True)
    would_run = ", ".join(f"{a.compensate} {a.result['booking_id']} ({a.args['city']})"
                          for a in plan.compensations)
    print(f"   dry run, nothing changed yet: {len(plan.txids)} transaction(s) and "
          f"{len(plan.keys)} key(s) would be undone; compensations that "
          f"would run, newest first: {would_run}")
    info = saver.rewind(after_paris.config)
    compensated = [a.args["city"] for a in store.actions() if a.state == "compensated"]
    print(f"   rewind: transaction {info.txid}; compensated bookings: {compensated}")
    show(hotel)
    remembered = sorted(i.key for i in memory.search(("travellers", "ana")))
    print(f"   memories left: {remembered}")
    state = graph.get_state(cfg)
    print(f"   the thread is back at step {state.metadata['step']}: booked "
          f"{state.values['booked']}, plan {state.values['plan']}; agent state keys: "
          f"{sorted(k for k in store.keys(prefix='trip/'))}")

    print("3. New plan: Lisbon instead; resume from the rewound checkpoint")
    graph.update_state(cfg, {"plan": ["Lisbon"]})
    final = graph.invoke(None, cfg, durability="sync")
    show(hotel)
    print(f"   agent state: booked {final['booked']}")
    actions = {a.args["city"]: a.state for a in store.actions()}
    print(f"   walstore actions: {actions}")
    active = [b["city"] for b in hotel.bookings() if b["status"] == "booked"]
    print(f"   active bookings: {active}")
    memories = sorted(i.key for i in memory.search(("travellers", "ana")))
    print(f"   memories: {memories}")
    summary = {"active": active, "bookings": hotel.bookings(), "actions": actions,
               "booked_in_state": final["booked"], "rewind_txid": info.txid,
               "memories_after_rewind": remembered, "memories": memories}
    store.close()
    return summary


def plain_langgraph_story(workdir: str) -> dict:
    print("== For contrast: LangGraph time travel with an in-memory saver ==")
    hotel = HotelSystem(os.path.join(workdir, "hotel-plain.json"))

    def book_tool(city: str) -> dict:
        booking = hotel.book(city, 2, idempotency_key=str(uuid.uuid4()))
        print(f"   booked {city}: {booking['booking_id']}")
        return booking

    graph = build_graph(book_tool).compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "trip-1"}}
    graph.invoke({"plan": ["Paris", "Rome", "Oslo"], "booked": [], "log": []}, cfg)
    history = list(graph.get_state_history(cfg))
    after_paris = min((s for s in history if len(s.values.get("booked", [])) == 1),
                      key=lambda s: s.metadata["step"])
    forked = graph.update_state(after_paris.config, {"plan": ["Lisbon"]})
    graph.invoke(None, forked)
    show(hotel)
    active = [b["city"] for b in hotel.bookings() if b["status"] == "booked"]
    print(f"   active bookings: {active}  <- Rome and Oslo were never cancelled")
    return {"active": active}


def main() -> None:
    ap = argparse.ArgumentParser(description="LangGraph agent with undoable side effects")
    ap.add_argument("--dir", help="working directory (kept; new or empty); default: a temporary one")
    ap.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = ap.parse_args()
    workdir = args.dir or tempfile.mkdtemp(prefix="walstore-langgraph-")
    # A second run in a kept --dir resumed the first run's thread and hotel ledger: it
    # rewound to the first run's checkpoint and printed every compensated action of both
    # runs as this rewind's, and the last run's Lisbon booking as "compensated".  The
    # story is told once per directory.
    if os.path.lexists(workdir) and not os.path.isdir(workdir):  # (a traceback: FileExistsError)
        sys.exit(f"error: --dir {workdir} exists and is not a directory; pass a new or "
                 f"empty --dir")
    left = [n for n in ("store", "hotel.json", "hotel-plain.json")
            if os.path.exists(os.path.join(workdir, n))]
    if left:
        sys.exit(f"error: {workdir} already holds a run of this example ({', '.join(left)}); "
                 f"pass a new or empty --dir")
    os.makedirs(workdir, exist_ok=True)
    try:
        ours = walstore_story(workdir)
        print()
        plain = plain_langgraph_story(workdir)
        if args.json:
            print(json.dumps({"walstore": ours, "plain": plain}, sort_keys=True))
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
