"""Audit 55 of the integrations: WalstoreSaver, WalstoreStore, WalstoreSession, the
``transaction`` package join, and the examples.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import os
import threading
from collections import deque

import pytest

pytest.importorskip("langgraph")

from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

# (``store``: conftest's, a durability="none" store in the test's directory)


def _line(saver: WalstoreSaver, thread: str, n: int) -> list[str]:
    """n checkpoints in a line, each writing channel ``x`` (its own blob); their ids."""
    head, ids = None, []
    for i in range(n):
        c = empty_checkpoint()
        c["channel_values"] = {"x": f"v{i}"}
        c["channel_versions"] = {"x": i + 1}
        conf = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        if head is not None:
            conf["configurable"]["checkpoint_id"] = head
        head = saver.put(conf, c, {"step": i}, {"x": i + 1})["configurable"]["checkpoint_id"]
        ids.append(head)
    return ids


def _in_another_thread(fn) -> None:
    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # (re-raised in the test's thread)
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


_CONFIGS = [{"configurable": {"thread_id": "t", "checkpoint_ns": ""}},
            {"configurable": {"thread_id": "t"}},
            None]


@pytest.mark.parametrize("config", _CONFIGS)
def test_list_reads_one_snapshot_beside_a_concurrent_writer(store, config):
    """``list`` read its rows in short scans, each of the latest state, and each
    checkpoint's channel values and writes from the latest state again: a writer thread
    that pruned the thread while a caller was between two listed checkpoints left the
    rest of the listing cut short (64 of 100 listed), and one that wrote pending writes
    to a checkpoint not yet listed showed them in a listing begun before.  The whole
    listing is now read from the snapshot taken at its first row."""
    saver = WalstoreSaver(store, fencing=False)
    ids = _line(saver, "t", 100)
    rows = saver.list(config)
    first = next(rows)
    assert first.checkpoint["id"] == ids[-1]

    def write():
        old = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": ids[0]}}
        saver.put_writes(old, [("x", "late")], "task-1")
        saver.prune(["t"])
    _in_another_thread(write)
    got = [first] + list(rows)
    assert [t.checkpoint["id"] for t in got] == ids[::-1]
    assert [t.checkpoint["channel_values"] for t in got] == \
        [{"x": f"v{i}"} for i in range(99, -1, -1)]
    assert all(t.pending_writes == [] for t in got)
    assert [t.checkpoint["id"] for t in saver.list(config)] == [ids[-1]]


@pytest.mark.parametrize("config", _CONFIGS)
def test_list_beside_a_concurrent_delete_thread_never_shows_a_cut_listing(store, config):
    """A ``delete_thread`` (a purge) in another thread while a listing was under way: the
    rest of the listing was cut short and the checkpoints it still gave had lost their
    channel values (``{}``), with no error.  Now the listing's snapshot, overtaken by the
    purge, raises SnapshotTooOld (a ConflictError: list again), as a streamed
    ``store.scan`` does; never erased rows, never a partial state."""
    saver = WalstoreSaver(store, fencing=False)
    ids = _line(saver, "t", 100)
    rows = saver.list(config)
    assert next(rows).checkpoint["id"] == ids[-1]
    _in_another_thread(lambda: saver.delete_thread("t"))
    with pytest.raises(walstore.SnapshotTooOld):
        list(rows)
    assert list(saver.list(config)) == []


def test_a_deque_keeps_its_maxlen_through_the_saver(store):
    """A ``collections.deque(maxlen=3)`` in graph state came back as a deque without a
    maxlen (LangGraph's encoding keeps only the items; SqliteSaver's too): the same type,
    but a bounded buffer of the last N messages grew without bound from the next append
    after a resume.  Its maxlen is now stored beside its items (as a constructor call,
    which LangGraph's decoder reads as well); a deque without maxlen is stored as before."""
    saver = WalstoreSaver(store, fencing=False)
    c = empty_checkpoint()
    c["channel_values"] = {"q": deque([1, 2, 3], maxlen=3),
                           "nested": {"a": [deque(["x"], maxlen=2)], "b": deque([1])}}
    c["channel_versions"] = {"q": 1, "nested": 1}
    cfg = saver.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, c, {},
                    {"q": 1, "nested": 1})
    got = saver.get_tuple(cfg).checkpoint["channel_values"]
    q = got["q"]
    assert type(q) is deque and q.maxlen == 3 and list(q) == [1, 2, 3]
    q.append(4)
    assert list(q) == [2, 3, 4]
    assert got["nested"]["a"][0].maxlen == 2 and list(got["nested"]["a"][0]) == ["x"]
    assert got["nested"]["b"].maxlen is None and list(got["nested"]["b"]) == [1]
    # (LangGraph's own decoder reads the stored form alike)
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
    from walstore.integrations.langgraph.serde import StateSerializer
    back = JsonPlusSerializer().loads_typed(StateSerializer().dumps_typed(deque([1], maxlen=5)))
    assert back.maxlen == 5 and list(back) == [1]


def test_alist_reads_one_snapshot_as_list_does(store):
    """``alist`` streams ``list``: a prune committed by another thread between two of its
    batches is not in the listing (it was: the rest of the thread cut short)."""
    import asyncio
    saver = WalstoreSaver(store, fencing=False)
    ids = _line(saver, "t", 100)

    async def listing():
        got = []
        async for t in saver.alist({"configurable": {"thread_id": "t"}}):
            got.append(t)
            if len(got) == 1:
                await asyncio.to_thread(saver.prune, ["t"])
        return got
    got = asyncio.run(listing())
    assert [t.checkpoint["id"] for t in got] == ids[::-1]
    assert got[-1].checkpoint["channel_values"] == {"x": "v0"}


def test_a_listing_of_every_thread_holds_ids_not_records(store):
    """``list(None)`` without a limit sorted every checkpoint record of the store in
    memory before yielding the first (each record holds the checkpoint and its
    metadata): 300 checkpoints with 20 KB of metadata each peaked at 3.8 MB for a
    caller reading one.  It now sorts (id, thread, namespace) and reads each record from
    the listing's snapshot as it yields it."""
    import tracemalloc
    saver = WalstoreSaver(store, fencing=False)
    for t in range(30):
        head = None
        for i in range(10):
            c = empty_checkpoint()
            conf = {"configurable": {"thread_id": f"t{t}", "checkpoint_ns": ""}}
            if head is not None:
                conf["configurable"]["checkpoint_id"] = head
            head = saver.put(conf, c, {"note": f"{t}-{i}-" + os.urandom(10_000).hex()}, {})[
                "configurable"]["checkpoint_id"]
    tracemalloc.start()
    try:
        rows = saver.list(None)
        first = next(rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.metadata["note"].startswith("29-9-")
    assert peak < 1_000_000, peak  # (before: 3.8 MB)
    rest = list(rows)
    assert len(rest) == 299
    ids = [first.checkpoint["id"]] + [r.checkpoint["id"] for r in rest]
    assert ids == sorted(ids, reverse=True)
    assert [r.metadata["note"][:5] for r in rest[:2]] == ["29-8-", "29-7-"]


def test_session_get_items_beside_a_concurrent_erase_reads_a_fresh_snapshot(store):
    """``WalstoreSession.get_items`` reads the current branch, then its items, in one
    snapshot; an ``erase()`` (a purge) committed by another thread between the two reads
    made the call raise SnapshotTooOld to the SDK's runner, where SQLiteSession's one
    SELECT reads either state.  A read whose snapshot a purge overtook is now read again
    from a fresh one (as WalstoreSaver's reads are): the erased session, empty."""
    import asyncio
    from walstore.integrations.openai_agents import WalstoreSession

    armed, erased = [], []

    class Racing(WalstoreSession):
        def _current_branch(self, tx):
            branch = super()._current_branch(tx)  # (the snapshot is taken here)
            if armed and not erased:
                erased.append(True)
                other = WalstoreSession("s", store)
                _in_another_thread(lambda: asyncio.run(other.erase()))
            return branch

    async def run():
        session = Racing("s", store)
        await session.add_items([{"role": "user", "content": "hi"}])
        armed.append(True)
        return await session.get_items()
    assert asyncio.run(run()) == []
    assert erased == [True]


def test_a_listing_overtaken_before_its_first_row_is_read_again(store):
    """``list(None)`` reads every thread's checkpoint ids before it yields the first:
    a ``delete_thread`` committed by another thread meanwhile made that listing raise
    SnapshotTooOld though it had given the caller nothing yet.  Like ``get_tuple`` and
    ``copy_thread``, it is now read again from a fresh snapshot (the thread gone);
    once a row was yielded the error stands (the rows would not be one state)."""
    armed = []

    class Racing(WalstoreSaver):
        def _checkpoints_of(self, thread_prefix, src=None):
            yield from super()._checkpoints_of(thread_prefix, src)
            if not armed:
                armed.append(True)
                _in_another_thread(lambda: self.delete_thread("b"))

    saver = Racing(store, fencing=False)
    a, b = _line(saver, "a", 3), _line(saver, "b", 3)
    got = [t.checkpoint["id"] for t in saver.list(None)]
    assert armed == [True]
    assert got == a[::-1]
