"""A child process for tests/test_langgraph_crash.py: a LangGraph run with
durability="async" that the test kills (SIGKILL) inside a node whose step never gets a
checkpoint, after that node committed its work and after the background save of the
checkpoint its step builds on landed (so that save's commit is after the node's work).

    python langgraph_async_crash_child.py STORE WORLD MARKER

The graph is ``remember`` -> ``second``.  ``remember`` puts memory item ("mem", "t1") /
"fact".  The save of the checkpoint after it (step 0) waits until ``second`` has put
memory item "second" (WalstoreStore: a dict meta) and booked "Rome" (an action with
compensator "cancel" in a walstore transaction whose meta is the string "booking"; the
booking is appended to WORLD).  ``second`` then waits for that save to land, writes MARKER
and sleeps until killed.
"""
from __future__ import annotations

import operator
import sys
import threading
import time
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore

import walstore
from walstore.integrations.langgraph import WalstoreSaver, WalstoreStore


class State(TypedDict):
    log: Annotated[list, operator.add]


def build(store: "walstore.Store", world_path: str | None = None,
          marker: str | None = None):
    """The graph (the parent builds it without WORLD/MARKER: nodes that only write)."""
    saver = WalstoreSaver(store)
    memory = WalstoreStore(store)
    node_done = threading.Event()

    def remember(state: State, *, store: BaseStore) -> dict:
        store.put(("mem", "t1"), "fact", {"v": 1})
        return {"log": ["remembered"]}

    def second(state: State, config, *, store: BaseStore) -> dict:
        store.put(("mem", "t1"), "second", {"v": 2})
        with saver.store.transaction(meta="booking") as tx:
            with tx.action("book", args={"city": "Rome"}, compensate="cancel") as act:
                if world_path is not None:
                    with open(world_path, "a") as f:
                        f.write("book Rome\n")
                act.result = {"ok": True}
        if marker is not None:
            node_done.set()  # (the held save of the step's checkpoint may land now)
            built_on = config["configurable"]["checkpoint_map"][""]
            deadline = time.monotonic() + 60
            while saver.get_tuple({"configurable": {
                    "thread_id": "t1", "checkpoint_ns": "",
                    "checkpoint_id": built_on}}) is None:
                if time.monotonic() > deadline:
                    sys.exit("the held save never landed")
                time.sleep(0.01)
            with open(marker, "w") as f:
                f.write("in second")
            time.sleep(120)  # (killed here)
        return {"log": ["second"]}

    if marker is not None:
        put = WalstoreSaver.put

        def held(self, config, checkpoint, metadata, new_versions):
            if metadata.get("step") == 0:  # (the checkpoint ``second`` builds on)
                node_done.wait(60)
            return put(self, config, checkpoint, metadata, new_versions)
        WalstoreSaver.put = held  # type: ignore[method-assign]
    b = StateGraph(State)
    b.add_node("remember", remember)
    b.add_node("second", second)
    b.add_edge(START, "remember")
    b.add_edge("remember", "second")
    b.add_edge("second", END)
    return b.compile(checkpointer=saver, store=memory), saver, memory


if __name__ == "__main__":
    store_path, world, mark = sys.argv[1:4]
    st = walstore.open(store_path, compensators={"cancel": lambda a: None})
    graph, _saver, _memory = build(st, world, mark)
    graph.invoke({"log": []}, {"configurable": {"thread_id": "t1"}}, durability="async")
    sys.exit("the run finished: it should have been killed in ``second``")
