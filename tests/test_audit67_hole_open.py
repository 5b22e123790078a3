"""Audit 67: a hole's snapshot and the transactions open around it (found right).

After a hole the shipper empties the manifest's ``open`` (transactions in flight at the
position) and takes a fresh LMDB snapshot as the replica's base past the hole.  The
question: can a restore from that base replay a large commit (its writes in several
WRITES chunks ahead of its COMMIT) without its early chunks — or refuse a sound replica?

It cannot, and the test below forces both edges of it:

* A commit's WRITES chunks and its COMMIT are appended together, under the journal lock,
  when it commits (``Journal.append_commit``): a transaction begun before the snapshot and
  committed after it logs nothing before the snapshot — its every chunk lies past it.
* LMDB's applied LSN, the snapshot's LSN, is always an event boundary (the applier applies
  a commit whole; ``_applied_up_to_the_end`` moves it to the oldest unapplied event's
  *first chunk*): no commit's chunks straddle the snapshot.
* The writer's trim keeps every segment at or past ``min(applied, pins)``, so a commit
  whose early chunks it dropped (the hole's first kept segment begins mid-commit) was
  applied before the trim, and so before the snapshot, taken later: the restored copy's
  recovery reads its later chunks and COMMIT below LMDB's applied LSN and drops them, as
  the writer's own recovery does after the same trim.

So nothing open at the hole's snapshot has a record before it that a replay needs; the
empty ``open`` is exact.  Seen: every restore of the replica — everything, each commit
from the hole's snapshot on, and LSN cuts inside the late commit's chunks and just before
its COMMIT — holds the source's committed state there, each commit whole or absent.
"""
from __future__ import annotations

import threading

import pytest

import walstore
from walstore.engine import journal
from walstore.log.format import LSN

from test_audit67_replica_hole import _commit, _replica_behind_a_trim
from test_replication_support import rows


def _big(s, tag: str, n: int = 200) -> None:
    """One commit of ``n`` 500-byte writes (~100 KB: many WRITES chunks, and more than a
    64 KiB segment, so it spans a rotation)."""
    with s.transaction() as tx:
        for j in range(n):
            tx.put(f"{tag}/{j:04d}", "y" * 500)


def _restored(url: str, path: str, **kw) -> list:
    walstore.restore(url, path, **kw)
    with walstore.open(path) as r:
        return rows(r)


def test_every_commit_whole_or_absent_in_restores_from_a_holes_snapshot(tmp_path,
                                                                        monkeypatch):
    """A commit straddling the hole's end (its early chunks trimmed), and one begun before
    the hole's snapshot and committed after it: every restore is whole, never partial."""
    monkeypatch.setattr(journal, "CHUNK_BYTES", 512)
    states: dict = {}  # name -> (txid, rows after it)
    go, ready = threading.Event(), threading.Event()
    s = None

    def late_commit() -> None:  # begun (its writes buffered) before the snapshot
        with s.transaction() as tx:
            for j in range(150):
                tx.put(f"late/{j:04d}", "z" * 500)
            ready.set()
            assert go.wait(30)

    def straddle_then_trim() -> None:
        _big(s, "straddle")
        states["straddle"] = (s.log(limit=1)[0], rows(s))
        s._engine.checkpoint()  # (keeps only the segment holding its COMMIT)
        late.start()
        assert ready.wait(30)

    late = threading.Thread(target=late_commit)
    s, shipper, url = _replica_behind_a_trim(tmp_path, straddle_then_trim)
    real_snapshot = shipper.source.snapshot
    taken = []

    def snapshot_then_commit(dest: str) -> int:
        lsn = real_snapshot(dest)
        taken.append(lsn)
        if len(taken) == 1:  # the hole's: the late transaction commits after it
            go.set()
            late.join(30)
            states["late"] = (s.log(limit=1)[0], rows(s))
            _commit(s, 90000, 3)
        return lsn
    shipper.source.snapshot = snapshot_then_commit
    try:
        shipper.ship_once()
        m = shipper.manifest
        assert m.doc["holes"], "the interleaving did not trim the replica's WAL"
        first = m.doc["holes"][-1]["b"]
        snap = taken[0]
        assert any(x["lsn"] == snap for x in m.snapshots)
        straddle, late_tx = states["straddle"][0], states["late"][0]
        before_straddle = [t for t in s.log(limit=400) if t.txid < straddle.txid][0]
        # the edges forced: the straddling commit's chunks begin before the hole's end,
        # its COMMIT after it; the late commit logged wholly after the hole's snapshot
        assert before_straddle.end_lsn < first < straddle.lsn < snap, \
            (before_straddle.end_lsn, first, straddle.lsn, snap)
        assert late_tx.lsn - snap > 60_000  # (its ~75 KB of chunks: all after it)
        shipper.ship_once()  # the rest: the late commit and those after it
        assert shipper.manifest.position >= s._engine.wal.synced_lsn
        final = rows(s)
        # nothing committed between the straddling commit and the late one: the state at
        # the hole's snapshot, and at every cut before the late COMMIT
        assert [t.txid for t in s.log(limit=50) if t.txid < late_tx.txid][0] == \
            straddle.txid
        expect_before_late = states["straddle"][1]
    finally:
        go.set()
        shipper.stop()
    try:
        assert _restored(url, str(tmp_path / "all")) == final
        assert _restored(url, str(tmp_path / "late"), to=late_tx.txid) == states["late"][1]
        # (a cut before the hole's snapshot has no base: refused, naming the hole)
        with pytest.raises(walstore.ReplicationError, match="hole in the replica's WAL"):
            walstore.restore(url, str(tmp_path / "pre"), to=straddle.txid)
        # cuts inside the late commit's chunks, and just before its COMMIT: absent whole
        for k, cut in enumerate((snap + 20_000, late_tx.lsn - 1000, late_tx.lsn - 1)):
            got = _restored(url, str(tmp_path / f"cut{k}"), to=LSN(cut))
            assert got == expect_before_late, cut
        # the straddling commit, applied in the hole's snapshot, is whole there
        assert all(v == "y" * 500 for k, v in states["straddle"][1] if k.startswith("straddle"))
        snap_state = _restored(url, str(tmp_path / "snap"), to=LSN(snap))
        assert sum(1 for k, _v in snap_state if k.startswith("straddle/")) == 200
    finally:
        s.close()


def test_every_commit_whole_or_absent_a_holes_snapshot_taken_amid_chunked_commits(
        tmp_path, monkeypatch):
    """The hole's snapshot taken while another thread commits chunked transactions
    (and checkpoints) without pause: its LSN is wherever LMDB's applied LSN stood, and
    every restore from it — to each commit after it, and to a cut just before each
    one's COMMIT (its chunks all in) — holds the source's state at that commit, whole."""
    monkeypatch.setattr(journal, "CHUNK_BYTES", 512)
    stop = threading.Event()

    def busy() -> None:
        i = 0
        while not stop.is_set():
            _big(s, f"busy{i:03d}", 25)  # (~13 KB: ~25 chunks)
            i += 1
            if i % 4 == 0:
                s._engine.checkpoint()
    worker = threading.Thread(target=busy)
    s, shipper, url = _replica_behind_a_trim(tmp_path, worker.start)
    real_snapshot = shipper.source.snapshot
    taken = []

    def snapshot_amid_commits(dest: str) -> int:
        lsn = real_snapshot(dest)
        taken.append(lsn)
        if len(taken) == 1:
            stop.set()
            worker.join(30)
        return lsn
    shipper.source.snapshot = snapshot_amid_commits
    try:
        shipper.ship_once()
        assert shipper.manifest.doc["holes"]
        shipper.ship_once()
        snap = taken[0]
        log = list(reversed(s.log(limit=1000)))  # (oldest first)
        after = [t for t in log if t.lsn > snap]
        assert len(after) >= 2, (snap, len(after))  # (commits logged past the snapshot)
        picks = after[:3] + after[-1:]
        by_tx = [t.txid for t in log]
        expect = {t.txid: rows(s.at(t.txid)) for t in picks}
        prev = {t.txid: rows(s.at(by_tx[by_tx.index(t.txid) - 1])) for t in picks}
    finally:
        stop.set()
        worker.join(30)
        shipper.stop()
    try:
        for k, t in enumerate(picks):
            assert _restored(url, str(tmp_path / f"t{k}"), to=t.txid) == expect[t.txid]
            if t.lsn - 1 >= snap:
                got = _restored(url, str(tmp_path / f"c{k}"), to=LSN(t.lsn - 1))
                assert got == prev[t.txid], (t.txid, t.lsn)
    finally:
        s.close()
