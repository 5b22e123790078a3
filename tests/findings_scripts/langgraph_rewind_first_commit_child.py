"""Child of tests/test_langgraph_rewind_first_commit.py: a store whose very first commit is
work after the thread's first checkpoint (``durability="async"``: the first booking waits
for the input's pending write — the store's first commit, at LSN 0, nothing logged before
it — and that checkpoint's own save is held until the booking committed), then ``saver.rewind`` to that
checkpoint, with this process killed (SIGKILL) at the next undo that begins after the
store's rewind returned (the old code reverted the first commit in a second transaction).

argv: store path, world file (one line per booking or cancel, fsynced), marker file.
Exit 0: the rewind returned; 3: the scenario did not play (the first commit was not
work after the checkpoint)."""
from __future__ import annotations

import operator
import os
import signal
import sys
import threading
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph

import walstore
from walstore import fileio
from walstore.integrations.langgraph import WalstoreSaver


class Plan(TypedDict):
    plan: list
    booked: Annotated[list, operator.add]


def note(world: str, line: str) -> None:
    fd = os.open(world, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(path: str, world: str):
    return walstore.open(path, compensators={
        "cancel": lambda a: note(world, "cancel " + a.args["city"])})


def graph_of(store, saver, world: str, booked: threading.Event,
             written: threading.Event | None = None):
    def book(s: Plan) -> dict:
        if written is not None:
            written.wait(30)  # (after the input's pending write committed)
        city = s["plan"][0]
        with store.transaction() as tx:
            with tx.action("book", args={"city": city}, compensate="cancel") as act:
                note(world, "book " + city)
                act.result = {"ok": True}
        booked.set()
        return {"plan": s["plan"][1:], "booked": [city]}
    b = StateGraph(Plan)
    b.add_node("book", book)
    b.add_conditional_edges(START, lambda s: "book" if s["plan"] else END)
    b.add_conditional_edges("book", lambda s: "book" if s["plan"] else END)
    return b.compile(checkpointer=saver)


class KillAtNextUndo(fileio.OSBackend):
    armed = False

    def fault_point(self, name: str) -> None:
        if self.armed and name == "undo.resolved":
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    path, world, marker = sys.argv[1:4]
    store = open_store(path, world)
    # (no fresh-start mark: since stop 79 a run on an empty thread first commits one,
    # and the store's first commit would be that mark, not the step's work)
    saver = WalstoreSaver(store, undo_on_resume=False)
    booked, written = threading.Event(), threading.Event()
    put = WalstoreSaver.put

    put_writes = WalstoreSaver.put_writes

    def held(self, config, checkpoint, metadata, new_versions):
        if metadata.get("step") == -1:  # (the input checkpoint's save, in the background)
            booked.wait(30)
        return put(self, config, checkpoint, metadata, new_versions)

    def held_writes(self, config, writes, task_id, task_path=""):
        try:
            return put_writes(self, config, writes, task_id, task_path)
        finally:
            written.set()  # (the input's pending write: the store's first commit)
    WalstoreSaver.put = held
    WalstoreSaver.put_writes = held_writes
    graph = graph_of(store, saver, world, booked, written)
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke({"plan": ["Paris", "Rome"], "booked": []}, config, durability="async")
    WalstoreSaver.put = put
    WalstoreSaver.put_writes = put_writes
    target = next(h for h in graph.get_state_history(config)
                  if h.metadata.get("step") == -1)
    if saver._rewind_plan(target.config)[2] is None:
        return 3  # (the store's first commit is not work after the target: not played)
    backend = KillAtNextUndo()
    fileio.set_backend(backend)
    rewind = store.rewind

    def rewind_then_arm(*a, **kw):
        out = rewind(*a, **kw)
        backend.armed = True
        return out
    store.rewind = rewind_then_arm
    saver.rewind(target.config)
    note(marker, "returned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
