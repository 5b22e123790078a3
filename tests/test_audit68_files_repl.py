"""Audit 68: defects the stop-67 closing note listed and left alone (files workspace,
replication), each reproduced here first (it failed on dd88a26), then fixed.

- a ``rollback_to`` past a ``watch()`` block whose WATCH_END record could not be written
  said "a watch() block is still running" — no block was running;
"""
from __future__ import annotations

import errno

import pytest

import walstore
from tests.test_audit67_durable_events import OPTS, workspace_with
from tools.faults import FaultBackend, installed


# ---- files: a watch whose end could not be recorded ------------------------------------
def test_rollback_to_past_a_watch_whose_end_was_not_recorded_says_what_happened(tmp_path):
    """The WAL write of a watch()'s WATCH_END record fails (EIO: WalWriteError, the store
    still writable); the caller catches it and rolls back to a savepoint taken before the
    watch.  Before the fix ``rollback_to`` refused with "a watch() block is still running;
    leave it ..." — the block had ended.  The whole rollback still puts the tree back."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = FaultBackend()
    with installed(fb):
        tx = s.transaction()
        f = tx.files(ws)
        sp = tx.savepoint()
        with pytest.raises(walstore.WalstoreError, match="could not write"):
            with f.watch():
                (root / "new.txt").write_text("made\n")
                fb.fail("pwrite", errno.EIO, path="*.wal", nth=2)  # (1: the steps)
    with pytest.raises(walstore.WalstoreError) as got:
        tx.rollback_to(sp)
    assert "still running" not in str(got.value)
    assert "could not be recorded" in str(got.value)
    assert "roll the transaction back" in str(got.value)
    tx.rollback()
    assert not (root / "new.txt").exists()
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert sorted(p.name for p in root.iterdir()) == ["a.txt"]
