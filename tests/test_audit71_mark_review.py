"""Audit 71 review of the shared mark's fixes (tests/test_audit71_mark.py): a reader
follows a rotation the writer withdrew however its read falls around the withdrawal, and
a clean close leaves every read-only process opened before it showing every commit the
writer acknowledged (under each durability), the mark never moved back by a commit
racing the close."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import walstore
from walstore.log import reader as log_reader
from store_support import restore_point_racing_close, writer_and_reader
from test_audit71_mark import writer_and_reader_at_a_segment_end
from tools.faults import FaultBackend, installed

KiB = 1024


def test_a_reader_follows_a_withdrawn_rotation_it_saw_named_but_found_gone(
        tmp_path, monkeypatch):
    """The reader lists the new segment (its read of the old one ended short of it by a
    SEAL: it moves there), and the writer removes it before the reader opens it (the
    rotation withdrawn: EMFILE).  Seen before the fix: the reader, left at the removed
    segment's start with no file, opened the old segment at that LSN — inside the records
    the writer went on appending there — and raised CorruptionError ("bad record magic;
    the writer published the log past it") on a sound log, at every read."""
    path = str(tmp_path / "s")
    with writer_and_reader_at_a_segment_end(path) as (fb, w, r):
        before = {p for _s, p in log_reader.list_segments(w._engine.wal.dir)}
        named, listed = threading.Event(), threading.Event()

        def emfile():  # the new segment is named: wait for the reader's listing
            named.set()
            assert listed.wait(5)
            return OSError(errno.EMFILE, "Too many open files")

        real = log_reader.list_segments
        seen = []

        def listing(wal_dir):  # the reader's: the second listing naming the new
            out = real(wal_dir)  # segment (the open after the move) returns only
            new = [p for _s, p in out if p not in before]  # once it was removed
            if new:
                seen.append(new[0])
                if len(seen) == 2:
                    listed.set()
                    deadline = time.monotonic() + 5
                    while os.path.exists(new[0]) and time.monotonic() < deadline:
                        time.sleep(0.001)
            return out

        fb.fail("open", path="*[0-9].wal", raises=emfile)
        told = []

        def big():
            try:
                with w.transaction() as tx:
                    tx.put("big", "b" * (16 * KiB))  # needs the next segment
                told.append("made")
            except walstore.WalstoreError as e:
                told.append(type(e).__name__)

        t = threading.Thread(target=big)
        t.start()
        assert named.wait(5)
        monkeypatch.setattr(log_reader, "list_segments", listing)
        assert r.get("first") == 1
        monkeypatch.setattr(log_reader, "list_segments", real)
        t.join(5)
        assert len(seen) >= 2 and told == ["WalWriteError"], (seen, told)
        for j in range(5):  # small: in the old segment, where its SEAL was due
            with w.transaction() as tx:
                tx.put(f"after{j}", j)
        assert [r.get(f"after{j}") for j in range(5)] == list(range(5))
        with w.transaction() as tx:
            tx.put("big", "b" * (16 * KiB))  # the rotation made this time
        with w.transaction() as tx:
            tx.put("last", 1)
        assert r.get("last") == 1 and r.get("big") == "b" * (16 * KiB)


def test_a_reader_polling_beside_withdrawn_rotations_shows_every_commit(tmp_path):
    """Rotations withdrawn twice in a row (the same segment named, removed, named again,
    removed), others made, checkpoints trimming, while a reader thread reads without
    pause.  Seen before the fix: CorruptionError ("bad record magic; the writer published
    the log past it") in most runs (3 of 4 at bd076cf) — the reader moved to a new
    segment between the writer naming and removing it."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    errors, stop = [], threading.Event()
    with installed(fb), walstore.open(path, durability="full",
                                      segment_size=64 * KiB) as w:
        with w.transaction() as tx:
            tx.put("k0", 0)
        r = walstore.open(path, readonly=True)
        try:
            def read():
                while not stop.is_set():
                    try:
                        r.get("k0")
                    except walstore.WalstoreError as e:
                        errors.append(e)
                        return

            t = threading.Thread(target=read)
            t.start()
            made, refused = [], 0
            try:
                for i in range(1, 3000):
                    if i % 7 == 0:
                        fb.fail("open", path="*[0-9].wal", times=2,
                                raises=OSError(errno.EMFILE, "Too many open files"))
                    try:
                        with w.transaction() as tx:
                            tx.put(f"k{i}", "v" * (500 if i % 5 else 9000))
                        made.append(i)
                    except walstore.WalWriteError:
                        refused += 1
                    if i % 200 == 0:
                        w.checkpoint()
            finally:
                stop.set()
                t.join(10)
            assert not errors, errors[0]
            assert refused and w._engine.wal.rotations > 10
            assert [i for i in made if r.get(f"k{i}") is None] == []
        finally:
            r.close()


@pytest.mark.parametrize("durability", ["none", "normal", "full"])
def test_a_reader_opened_before_a_clean_close_shows_every_commit(tmp_path, durability):
    """The close shares the log's synced end (not its written end) as its mark: under
    "none" and "normal" nothing is fsynced per commit, yet every commit made before a
    clean close is shown by a reader opened before it (the close's checkpoint syncs the
    whole log, its CHECKPOINT record too, and the commits were published as written)."""
    path = str(tmp_path / "s")
    w = walstore.open(path, durability=durability, segment_size=256 * KiB)
    with w.transaction() as tx:
        tx.put("k0", 0)
    r = walstore.open(path, readonly=True)
    try:
        assert r.get("k0") == 0
        for i in range(1, 200):
            with w.transaction() as tx:
                tx.put(f"k{i}", "v" * (i * 10))
        w.close()
        assert all(r.get(f"k{i}") == "v" * (i * 10) for i in range(1, 200))
        assert r.get("k0") == 0
        with walstore.open(path, readonly=True) as fresh:
            assert fresh.get("k199") == "v" * 1990
    finally:
        r.close()
        w.close()


@pytest.mark.parametrize("durability", ["none", "full"])
def test_a_commit_acknowledged_beside_a_clean_close_is_shown_by_readers(tmp_path,
                                                                       durability):
    """A restore point made by another thread, past its writable check before close()
    began, is appended and acknowledged while the close shares its final mark.  Seen
    before the fix: the close stored the mark it had computed before that point was
    published (the synced end, or the written end before audit 71's change: the same
    race), over the point's own publication — the shared mark moved back, and a reader
    opened before the close never listed the acknowledged restore point (nor showed
    anything past the old mark)."""
    path = str(tmp_path / "s")
    w, r = writer_and_reader(path, durability)
    eng = w._engine
    try:
        t, go, told = restore_point_racing_close(w)
        closing, armed, fired = threading.current_thread(), [], []

        def at_final_sync(_path):  # the close's last LMDB sync, right before its mark
            if not armed and eng.closed and eng.wal.bytes_since_checkpoint == 0:
                armed.append(1)

        def racing_commit_runs():  # the close's mark computed, not yet stored: the
            if armed and not fired and threading.current_thread() is closing:  # racing
                fired.append(1)  # commit runs to its acknowledgement in between
                go.set()
                t.join(5)

        mark, journal = eng.shared_mark, eng.journal
        real_set, real_publish = mark.set, journal.publish
        # (the racing commit publishes through MemTable.share and the WAL's after_sync,
        # bound before: unhooked; the close's own store goes through either)
        mark.set = lambda v: (racing_commit_runs(), real_set(v))
        journal.publish = lambda v: (racing_commit_runs(), real_publish(v))
        fb = FaultBackend()
        rule = fb.fail_lmdb("sync", times=None)
        rule.effect = at_final_sync
        with installed(fb):
            w.close()
        go.set()
        t.join(5)
        assert fired and told == ["made"], (fired, told)
        assert list(r.restore_points()) == ["p"]
        assert r.get("k") == 1
    finally:
        r.close()
        w.close()
