"""Audit 55 of the integrations: WalstoreSaver, WalstoreStore, WalstoreSession, the
``transaction`` package join, and the examples.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import threading

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
