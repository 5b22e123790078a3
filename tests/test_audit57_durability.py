"""Audit 57, durability="none" and the workspaces' files.

Findings (each test named below fails on the code before its fix):

- Under durability="none" a workspace's file changes are not fsynced as they are made
  (that is the mode's point), and ``store.sync()`` — documented "make every commit so far
  durable" — fsynced the log alone: after it returned, a power loss could keep the
  durable COMMIT of a file change and lose the file's bytes (the store then names a tree
  the disk does not hold; tools/powerloss.py's files workload under "none" showed such
  images).  ``sync()`` and every checkpoint now sync the file systems of the workspaces
  this process used (and the store's own: blobs, quarantine; Linux ``syncfs``, one call
  per file system) before the log's fsync
  (``test_sync_under_none_makes_the_workspace_durable_before_the_log``,
  ``test_a_checkpoint_under_none_syncs_the_workspace_before_the_log``); a failed one is a
  StoreIOError and the log is not synced after it
  (``test_a_failed_workspace_sync_is_a_store_io_error_and_the_log_waits``).  Under
  "normal" and "full" each change is fsynced as it is made and nothing more runs
  (``test_no_file_system_sync_where_files_are_fsynced_as_they_change``).  Power-loss
  images taken right after each ``sync()`` returned hold the committed tree
  (``test_power_loss_images_right_after_sync_hold_the_committed_tree``; tools/powerloss.py
  models ``syncfs`` now, and without it 17 images in 22 were broken:
  ``test_the_harness_catches_a_sync_that_leaves_the_workspace_unsynced``).
- The log's readers (recovery, verify, followers) bounded the WRITES chunks they buffer
  per transaction only: each crash between a large transaction's chunks and its COMMIT
  leaves one set, and a log kept across many crashes held them all (up to 512 MiB each).
  They are bounded all together now, the leftovers dropped (a writer appends chunks and
  COMMIT at once) and a COMMIT of a dropped set later refused as a damaged log
  (``test_chunk_sets_crashes_left_are_bounded_all_together_in_every_reader``,
  ``test_a_commit_whose_dropped_chunks_were_left_behind_is_a_damaged_log``,
  ``test_recovery_keeps_no_more_of_a_crashs_leftover_chunks_than_the_bound``).
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402


def _store_with_a_file_change(tmp_path, durability):
    root = tmp_path / "ws"
    root.mkdir()
    s = walstore.open(str(tmp_path / "s"), durability=durability)
    ws = s.workspace(str(root))
    with s.transaction() as tx:
        tx.files(ws).write("a.txt", b"one")
        tx.put("k", 1)
    return s, str(root)


def _ops_after(backend, n):
    return [(e.op, e.path) for e in backend.events[n:]]


def _first(ops, pred):
    return next((i for i, op in enumerate(ops) if pred(op)), None)


def _syncs(ops, root):
    """(index of the workspace's syncfs, index of the first WAL fsync) in ``ops``."""
    return (_first(ops, lambda o: o == ("syncfs", os.path.realpath(root))),
            _first(ops, lambda o: o[0] in ("fsync", "fdatasync") and o[1].endswith(".wal")))


def test_sync_under_none_makes_the_workspace_durable_before_the_log(tmp_path):
    b = FaultBackend(record=True)
    with installed(b):
        s, root = _store_with_a_file_change(tmp_path, "none")
        try:
            n = len(b.events)
            s.sync()
            ops = _ops_after(b, n)
            ws_sync, log_sync = _syncs(ops, root)
            assert ws_sync is not None, ops
            assert log_sync is not None and ws_sync < log_sync, ops
        finally:
            s.close()


def test_a_checkpoint_under_none_syncs_the_workspace_before_the_log(tmp_path):
    b = FaultBackend(record=True)
    with installed(b):
        s, root = _store_with_a_file_change(tmp_path, "none")
        try:
            with s.transaction() as tx:
                tx.files(s.workspace(root)).write("b.txt", b"two")
            n = len(b.events)
            s.checkpoint()
            ops = _ops_after(b, n)
            ws_sync, log_sync = _syncs(ops, root)
            assert ws_sync is not None and (log_sync is None or ws_sync < log_sync), ops
        finally:
            s.close()


def test_a_failed_workspace_sync_is_a_store_io_error_and_the_log_waits(tmp_path):
    b = FaultBackend(record=True)
    with installed(b):
        s, root = _store_with_a_file_change(tmp_path, "none")
        try:
            b.fail("syncfs", errno.EIO)
            n = len(b.events)
            with pytest.raises(walstore.StoreIOError) as e:
                s.sync()
            assert e.value.errno == errno.EIO
            assert "\n" not in str(e.value) and str(tmp_path / "s") in str(e.value)
            ops = _ops_after(b, n)
            assert not [o for o in ops if o[0] in ("fsync", "fdatasync")
                        and o[1].endswith(".wal")], ops
            s.sync()  # (the file system answers again: both durable)
            assert s.get("k") == 1
        finally:
            s.close()


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_no_file_system_sync_where_files_are_fsynced_as_they_change(tmp_path, durability):
    b = FaultBackend(record=True)
    with installed(b):
        s, root = _store_with_a_file_change(tmp_path, durability)
        try:
            n = len(b.events)
            s.sync()
            s.checkpoint()
            assert not [o for o in _ops_after(b, n) if o[0] == "syncfs"]
            # (the change itself was fsynced as it was made)
            assert [e for e in b.events[:n] if e.op == "fsync"
                    and os.path.dirname(e.path) == os.path.realpath(root)]
        finally:
            s.close()


# ---- the log's readers: chunks a crash left, all of them together bounded ---------------
def test_chunk_sets_crashes_left_are_bounded_all_together_in_every_reader(tmp_path):
    """A writer appends a large transaction's WRITES chunks and its COMMIT at once; a
    crash between them leaves the chunks with no COMMIT, and the readers of the log
    (recovery, verify, followers: one CommitAssembler) kept each such set — up to
    MAX_OPEN_TXN_BYTES each, with no bound on them all.  A log kept across many crashes
    held them all in memory.  Now the sets of other transactions are dropped when a new
    chunk would pass the bound, and a commit made after them still reads whole."""
    from walstore.codec import pack
    from walstore.log import records
    from walstore.log.format import RecordType
    from walstore.log.reader import LogReader, Record
    path = str(tmp_path / "s")
    mib = 1024 * 1024
    s = walstore.open(path, durability="none")
    try:
        eng = s._engine
        with s.transaction() as tx:
            tx.put("seed", 1)
        key = b"s"  # (a stored str key's tag, walstore.codec)
        for n in range(5):  # what five crashes between chunks and COMMIT leave
            txid = eng.next_txid()
            with eng.journal.lock:
                eng.wal.append(RecordType.WRITES, pack(
                    {"tx": txid, "w": [[key + b"o%d" % n, b"x" * mib]]}))
        with s.transaction() as tx:  # a commit after them, chunked (4.5 MiB)
            for i in range(3):
                tx.put(f"big{i}", b"y" * (3 * mib // 2))
        big = tx.id
    finally:
        s.close()
    bound = 4 * mib + 64 * 1024
    assembler = records.CommitAssembler(max_bytes=bound)
    most, got = 0, None
    wal_dir = os.path.join(path, "wal")
    store_id = walstore.open(path, readonly=True)
    try:
        sid = store_id._engine.store_id
    finally:
        store_id.close()
    for item in LogReader(wal_dir, sid, 0).walk():
        if not isinstance(item, Record):
            continue
        ev = assembler.feed(item.type, item.lsn, item.end_lsn, records.decode(item.payload),
                            len(item.payload))
        most = max(most, sum(assembler.sizes.values()))
        if ev is not None and ev.txid == big:
            got = ev
    assert most <= bound, most
    assert got is not None and len([w for w in got.writes if w[1] is not None]) == 3
    with walstore.open(path) as s:  # recovery reads it too
        assert s.get("big2") == b"y" * (3 * mib // 2) and s.get("seed") == 1


def test_a_commit_whose_dropped_chunks_were_left_behind_is_a_damaged_log():
    from walstore.log import records
    from walstore.log.format import RecordType
    a = records.CommitAssembler(max_bytes=100)
    a.feed(RecordType.WRITES, 10, 70, {"tx": 1, "w": [[b"sone", b"v" * 40]]}, 60)
    a.feed(RecordType.WRITES, 70, 130, {"tx": 2, "w": [[b"stwo", b"v" * 40]]}, 60)
    assert sum(a.sizes.values()) <= 100
    with pytest.raises(ValueError, match="damaged log"):
        a.feed(RecordType.COMMIT, 130, 150, {"tx": 1, "w": []}, 20)
    ev = a.feed(RecordType.COMMIT, 150, 170, {"tx": 2, "w": []}, 20)
    assert ev.writes == [(b"stwo", b"v" * 40)] and ev.start == 70


def test_recovery_keeps_no_more_of_a_crashs_leftover_chunks_than_the_bound(
        tmp_path, monkeypatch):
    """Recovery keeps the raw write lists of chunks before LMDB's applied LSN aside (a
    commit REDO applies may begin with them); those of a crash's leftover sets stayed
    there to the end of the walk, all of them.  Dropped with the assembler's: 16 1 MiB
    leftovers under a 2 MiB bound, recovery's memory stays near the bound."""
    import tracemalloc

    from walstore.codec import pack
    from walstore.log import records
    from walstore.log.format import RecordType
    path = str(tmp_path / "s")
    mib = 1024 * 1024
    with walstore.open(path, durability="none") as s:
        eng = s._engine
        for n in range(16):
            txid = eng.next_txid()
            with eng.journal.lock:
                eng.wal.append(RecordType.WRITES, pack(
                    {"tx": txid, "w": [[b"so%d" % n, b"x" * mib]]}))
        with s.transaction() as tx:
            tx.put("after", 1)
    monkeypatch.setattr(records, "MAX_OPEN_TXN_BYTES", 2 * mib + 64 * 1024)
    tracemalloc.start()
    try:
        with walstore.open(path) as s:
            assert s.get("after") == 1 and s.get("o3") is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 7 * mib, peak


# ---- power-loss images at the points store.sync() returned (durability "none") ---------
def test_power_loss_images_right_after_sync_hold_the_committed_tree(tmp_path):
    """tools/powerloss.py's files workload under durability="none", ``store.sync()`` after
    each commit, images (only synced bytes, plus a prefix, a torn subset or all of the
    rest) taken right after each sync returned: the workspace is the tree the recovered
    store names, every acknowledged commit there."""
    from tools.powerloss import VARIANTS, run_files
    summary = run_files(24, seed=17, txns=25, workdir=str(tmp_path), durability="none",
                        after_syncs=True)
    assert summary["images"] > 12 and all(summary["by_variant"][v] > 0 for v in VARIANTS)
    assert summary["acks_checked"] > summary["images"]
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]


def test_the_harness_catches_a_sync_that_leaves_the_workspace_unsynced(tmp_path):
    """The control: the same recording with the workspace's file-system syncs taken out
    (what ``sync()`` did before) gives images whose workspace the log does not name."""
    from tools.powerloss import run_files
    summary = run_files(24, seed=17, txns=25, workdir=str(tmp_path), durability="none",
                        after_syncs=True, lie_about_syncfs=True)
    assert summary["broken_images"] > 0
