"""An erasure a purge left owed is finished by the applier's own checkpoints too.

CONTRACT ("purge"): after the next checkpoint the purged keys' bytes are in no file of the
store directory.  Before, only ``store.checkpoint()`` and the next writable open finished
an erasure a failed step left owed: a store that stayed open after its purge raised
``ErasureOwed`` kept the erased bytes in its WAL segments and LMDB file for as long as it
ran, through any number of background checkpoints.  Now the applier's checkpoint finishes
it — not on a disk without room for LMDB's rewrite (a try there filled the disk the
commits beside it write to), and not while a purge is erasing (it compacted a second time).
"""
from __future__ import annotations

import errno
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402

from store_support import files_with  # noqa: E402

MARKER = b"BGERASE-7f3e"


def purge_leaving_erasure_owed(s) -> None:
    for i in range(20):
        with s.transaction() as tx:
            tx.put(f"conv/{i % 3}", f"{MARKER.decode()}-{i}")
            tx.put(f"keep/{i}", i)
    fb = FaultBackend()
    with installed(fb):  # a full disk as the erasure rotates to a fresh WAL segment
        rule = fb.fail("open", errno.ENOSPC, path="*.wal")
        with pytest.raises(walstore.ErasureOwed):
            s.purge("conv/")
    assert rule.fired == 1 and s._engine.erase_owed()


def commit_until(s, done, seconds=60.0) -> None:
    """Commit (each commit makes a background checkpoint due) until ``done()``."""
    deadline = time.monotonic() + seconds
    i = 0
    while not done():
        assert time.monotonic() < deadline, "no background checkpoint finished the erasure"
        with s.transaction() as tx:
            tx.put(f"load/{i % 50}", "x" * 2000)
        i += 1
        time.sleep(0.005)


def test_a_background_checkpoint_finishes_an_erasure_a_purge_left_owed(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, checkpoint_bytes=64 << 10, apply_interval=0.05) as s:
        purge_leaving_erasure_owed(s)
        assert files_with(path, MARKER)  # (the erased bytes are still in the store's files)
        commit_until(s, lambda: not s._engine.erase_owed())
        assert files_with(path, MARKER) == []
        assert s.get("conv/1") is None and s.get("keep/19") == 19
        assert not [e for e in s.stats()["background_errors"] if "erasure" in e]
        with s.transaction() as tx:  # the store goes on
            tx.put("after", 1)
    with walstore.open(path) as s:
        assert s.get("after") == 1 and s.get("keep/0") == 0


def test_without_room_for_the_rewrite_the_background_waits_and_says_so(tmp_path, monkeypatch):
    from walstore import fileio
    path = str(tmp_path / "s")
    with walstore.open(path, checkpoint_bytes=64 << 10, apply_interval=0.05) as s:
        purge_leaving_erasure_owed(s)
        monkeypatch.setattr(fileio, "free_bytes", lambda p: 1 << 20)  # a near-full disk
        commit_until(s, lambda: any("erasure owed" in e
                                    for e in s.stats()["background_errors"]))
        said = [e for e in s.stats()["background_errors"] if "erasure owed" in e]
        assert "bytes free" in said[0] and len(said) == 1  # (not retried at every checkpoint)
        assert s._engine.erase_owed() and files_with(path, MARKER)  # untouched: still owed
        assert s._engine.writable  # the store goes on
        with s.transaction() as tx:
            tx.put("after", 1)
        monkeypatch.undo()
        s.checkpoint()  # the explicit checkpoint still finishes it, at once
        assert s._engine.erase_owed() == [] and files_with(path, MARKER) == []


def test_a_purge_is_not_erased_twice_by_the_applier_running_beside_it(tmp_path, monkeypatch):
    # the purge holds ``erasure_lock`` from before its commit: an applier checkpoint that
    # runs between the purge's apply (which makes the erasure owed) and its own erasure
    # leaves it alone — before, it rewrote LMDB, and the purge rewrote it again
    import threading
    from walstore.engine.engine import Engine
    from walstore.engine.lmdb_state import LmdbState
    path = str(tmp_path / "s")
    calls = []
    real_compact, real_drain = LmdbState.compact, Engine.drain

    def counted(self, *a, **kw):
        calls.append(1)
        return real_compact(self, *a, **kw)

    def drain_then_background(self):
        real_drain(self)
        if self.erase_owed():  # (the purge's drain: its erasure is owed now)
            t = threading.Thread(target=self._finish_owed_erasure)
            t.start()
            t.join(5)

    with walstore.open(path) as s:
        for i in range(30):
            with s.transaction() as tx:
                tx.put(f"conv/{i % 3}", f"{MARKER.decode()}-{i}")
        monkeypatch.setattr(LmdbState, "compact", counted)
        monkeypatch.setattr(Engine, "drain", drain_then_background)
        s.purge("conv/")
        assert len(calls) == 1 and s._engine.erase_owed() == []
    assert files_with(path, MARKER) == []


def test_a_purge_beside_a_busy_writer_leaves_no_erased_bytes_in_the_old_segment(tmp_path):
    # Before: the erasure's checkpoint moved LMDB's ``applied`` mark to the log's end only
    # when no event at all was unapplied; a commit of another thread landing after the
    # rotation kept the mark at the last event of the old segment, so the segment holding
    # the erased values stayed (and the erasure was recorded done).  The mark now moves to
    # the oldest unapplied event's first record.
    import threading
    path = str(tmp_path / "s")
    stop = threading.Event()
    with walstore.open(path) as s:  # (a commit in its fsync is queued, not yet published)
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"conv/{i % 3}", f"{MARKER.decode()}-{i}")

        def writer():
            i = 0
            while not stop.is_set():
                with s.transaction() as tx:
                    tx.put(f"busy/{i % 20}", i)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(5):
                time.sleep(0.02)
                s.purge("conv/")
                assert files_with(path, MARKER) == [], "erased bytes left in the store's files"
                with s.transaction() as tx:
                    tx.put("conv/again", MARKER.decode())
        finally:
            stop.set()
            t.join()
