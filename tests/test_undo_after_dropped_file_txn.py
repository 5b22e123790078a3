"""An undo never takes a dropped transaction's uncommitted file bytes for its target.

probe-undorace (stop 43): T wrote f = "T"; a transaction D wrote f = "before" (T's
before-image) and was dropped (garbage-collected without commit or rollback).  A
``rewind`` to before T, or ``revert(T)``, compared the disk with its target, found it
"done", dropped the path and returned None; the next open undid D, and f was "T" again:
T's change stood though the undo said it was undone.  Now the plan first puts back what a
dropped transaction left on the path (as any change of it does), then compares.
"""
from __future__ import annotations

import gc

import pytest

import walstore


def _t_then_dropped(store, ws, dropped_bytes: str) -> int:
    """f.txt "before", restore point P, T writes "T" (its txid returned), then a
    transaction D writes ``dropped_bytes`` and is dropped (garbage-collected, never
    ended)."""
    with store.transaction(scope="b/") as tx:
        tx.files(ws).write("f.txt", "before\n")
    store.restore_point("P")
    with store.transaction(scope="b/") as tx:
        tx.files(ws).write("f.txt", "T\n")
    d = store.transaction(scope="b/")
    d.files(ws).write("f.txt", dropped_bytes)  # uncommitted, then dropped
    del d
    gc.collect()
    return tx.id


@pytest.mark.parametrize("verb", ["rewind", "revert", "dry-run"])
def test_an_undo_after_a_dropped_transaction_wrote_its_target_still_undoes(tmp_path, verb):
    root = tmp_path / "ws"
    root.mkdir()
    store = walstore.open(tmp_path / "s", durability="none")
    try:
        ws = store.workspace(str(root), scope="b/")
        t = _t_then_dropped(store, ws, "before\n")
        if verb == "dry-run":
            plan = store.rewind("P", scope="b/", dry_run=True)
            assert plan.txids == [t] and len(plan.files) == 1
            assert (root / "f.txt").read_text() == "before\n"  # (nothing changed)
            return
        info = store.rewind("P", scope="b/") if verb == "rewind" else store.revert(t)
        assert info is not None and info.extra["reverts"] == [t]
        assert (root / "f.txt").read_text() == "before\n"
        store.close()
        store = walstore.open(tmp_path / "s", durability="none")
        assert (root / "f.txt").read_text() == "before\n"
        assert store.at(store.log(limit=1)[0].txid).files(str(root)).read(
            "f.txt") == b"before\n"
    finally:
        store.close()


def test_a_dry_run_plans_a_path_a_dropped_transaction_left_as_the_undo_does(tmp_path):
    """(review43) Dropped bytes that match neither image: the dry run raised
    RevertConflict where the undo itself (which puts them back first) succeeds."""
    root = tmp_path / "ws"
    root.mkdir()
    store = walstore.open(tmp_path / "s", durability="none")
    try:
        ws = store.workspace(str(root), scope="b/")
        _t_then_dropped(store, ws, "dropped\n")
        plan = store.rewind("P", scope="b/", dry_run=True)
        assert len(plan.files) == 1 and (root / "f.txt").read_text() == "dropped\n"
        assert store.rewind("P", scope="b/") is not None
        assert (root / "f.txt").read_text() == "before\n"
    finally:
        store.close()
