"""Audit 71: the writer's shared mark (``<store>/VISIBLE``) and a read-only process's log
read agree: a reader raises CorruptionError only where the log really stops short of what
the writer published (walstore/engine/follower.py, ``_short_of_mark``).

A rotation whose new segment was made and named, and then could not be opened (EMFILE,
ENFILE), removes it again (``WriteAheadLog._withdraw``) and the writer goes on in the old
segment, where that segment's SEAL would have been.  A reader that read in between had
already moved to the new segment's start (an unsealed segment followed by one starting
SEAL_RECORD_SIZE later is a rotation cut short: ``LogFollower._next_starts_at``): it then
sat in the removed file, past the records the writer appended in the old segment."""
from __future__ import annotations

from contextlib import contextmanager

import errno

import pytest

import walstore
from store_support import fill_to_the_segment_end, restore_point_racing_close, writer_and_reader
from tools.faults import FaultBackend, installed

KiB = 1024


@contextmanager
def writer_and_reader_at_a_segment_end(path: str):
    """A durability="full" writer (256 KiB segments) under a FaultBackend, one commit
    (``first`` = 1), a read-only store opened beside it that read it, then the writer's
    segment filled to its end (the next big commit rotates): yields (backend, writer,
    reader); the reader is closed, then the writer."""
    fb = FaultBackend()
    with installed(fb), walstore.open(path, durability="full",
                                      segment_size=256 * KiB) as w:
        with w.transaction() as tx:
            tx.put("first", 1)
        r = walstore.open(path, readonly=True)
        try:
            assert r.get("first") == 1
            fill_to_the_segment_end(w)
            yield fb, w, r
        finally:
            r.close()


def test_a_reader_follows_a_rotation_the_writer_withdrew(tmp_path):
    """Seen before the fix: the reader opened before the failed rotation raised
    CorruptionError ("zeros ...; the writer published the log past it") on every read
    from the writer's next commits on, while the log was sound (a fresh open read it
    all); before audit 71 it showed none of those commits, for good."""
    path = str(tmp_path / "s")
    with writer_and_reader_at_a_segment_end(path) as (fb, w, r):
        wal = w._engine.wal
        read_between = []

        def emfile():  # the new segment is named now: a reader reads, then it fails
            read_between.append(r.get("first"))
            return OSError(errno.EMFILE, "Too many open files")

        rotations = wal.rotations
        fb.fail("open", path="*[0-9].wal", raises=emfile)
        with pytest.raises(walstore.WalstoreError):
            with w.transaction() as tx:
                tx.put("big", "b" * (16 * KiB))  # needs the next segment
        assert read_between == [1] and wal.rotations == rotations
        for j in range(5):  # small: they fit in the old segment, where its SEAL was due
            with w.transaction() as tx:
                tx.put(f"after{j}", j)
        assert [r.get(f"after{j}") for j in range(5)] == list(range(5))
        with walstore.open(path, readonly=True) as fresh:
            assert fresh.get("after4") == 4
        # the next rotation (made this time) is followed too
        with w.transaction() as tx:
            tx.put("big", "b" * (16 * KiB))
        assert wal.rotations == rotations + 1
        with w.transaction() as tx:
            tx.put("last", 1)
        assert r.get("big") == "b" * (16 * KiB) and r.get("last") == 1


def test_a_record_whose_fsync_failed_is_shown_by_no_reader_after_a_close(tmp_path):
    """A restore point made by a thread that passed its writable check before another
    thread's close() began is appended after the close's checkpoint synced the log; its
    fsync fails (the caller is told CommitOutcomeUnknown: "whether it was made is
    unknown").  Seen before the fix: the close then shared ``max(written_lsn,
    published)`` as its mark — past that record — and a reader opened before the close
    listed the restore point as made, while the writer had hid it (visible.py: nothing
    whose fsync failed is shown before the next writer's recovery decides)."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    w, r = writer_and_reader(path, "full")
    eng = w._engine
    try:
        t, go, told = restore_point_racing_close(w)
        fired = []

        def at_final_sync(_path):  # the close's last LMDB sync, right before its mark
            if fired or not (eng.closed and eng.wal.bytes_since_checkpoint == 0):
                return
            fired.append(1)
            fb.fail("fdatasync", path="*[0-9].wal")  # the point's own fsync fails
            go.set()
            t.join(5)

        rule = fb.fail_lmdb("sync", times=None)
        rule.effect = at_final_sync
        with installed(fb):
            w.close()
        t.join(5)
        assert fired and told == ["CommitOutcomeUnknown"], (fired, told)
        assert r.restore_points() == {}
        assert r.get("k") == 1
    finally:
        r.close()
        w.close()
