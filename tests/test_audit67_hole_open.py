"""Audit 67: a hole's snapshot and the transactions open around it (commits: found right;
the restore report's transactions in flight: fixed).

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

So no commit open at the hole's snapshot has a record before it that a replay needs.
Seen: every restore of the replica — everything, each commit from the hole's snapshot on,
and LSN cuts inside the late commit's chunks and just before its COMMIT — holds the
source's committed state there, each commit whole or absent.

What the empty ``open`` did lose: the transactions in flight across the hole that are not
commits being logged (an action's intent, a reversible file change), whose opening records
the writer's trim dropped (LMDB holds them; the trim keeps none for them).  The restore's
report, built from the replayed records only, said none was in flight and no file effect
owed (`walstore restore` exit 0, the workspace out of step with the restored state): the
last test here.
"""
from __future__ import annotations

import os
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
    without pause: its LSN is wherever LMDB's applied LSN stood, and every restore from
    it — to each commit after it, and to a cut just before each one's COMMIT (its chunks
    all in) — holds the source's state at that commit, whole.  (No checkpoint of its
    own: one trimming again while the round ships would make a second hole past the
    snapshot, and the commits before it rightly unrestorable.)"""
    monkeypatch.setattr(journal, "CHUNK_BYTES", 512)
    stop = threading.Event()
    done = [0]
    going = threading.Condition()

    def busy() -> None:
        while not stop.is_set():
            _big(s, f"busy{done[0]:03d}", 25)  # (~13 KB: ~25 chunks)
            with going:
                done[0] += 1
                going.notify_all()

    def wait_for(n: int) -> None:
        with going:
            assert going.wait_for(lambda: done[0] >= n, 30)
    worker = threading.Thread(target=busy)
    s, shipper, url = _replica_behind_a_trim(tmp_path, worker.start)
    real_snapshot = shipper.source.snapshot
    taken = []

    def snapshot_amid_commits(dest: str) -> int:
        if not taken:
            wait_for(2)
        lsn = real_snapshot(dest)
        taken.append(lsn)
        if len(taken) == 1:
            wait_for(done[0] + 3)
            stop.set()
            worker.join(30)
        return lsn
    shipper.source.snapshot = snapshot_amid_commits
    try:
        shipper.ship_once()
        assert len(shipper.manifest.doc["holes"]) == 1
        shipper.ship_once()
        snap = taken[0]
        log = list(reversed(s.log(limit=1000)))  # (oldest first)
        after = [t for t in log if t.lsn > snap]
        assert len(after) >= 3, (snap, len(after))  # (commits logged past the snapshot)
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


def test_restore_never_silent_of_file_effects_in_flight_across_a_hole(tmp_path):
    """A file change of a transaction still in flight, logged before the trim that made
    the hole: the restored copy holds it owed (its LMDB says so), and the workspace keeps
    the change.  Before the fix the restore's report said ``in_flight_txids`` [] and
    ``owed_file_effects`` [] (from the records replayed after the hole's snapshot only):
    `walstore restore` exited 0, the files on disk silently out of step with the state.
    Now both come from the snapshot's LMDB too."""
    root = str(tmp_path / "ws")
    os.makedirs(root)
    s, shipper, url = _replica_behind_a_trim(tmp_path)
    ws = s.workspace(root)
    with s.transaction() as tx:
        tx.files(ws).write("a.txt", "v1\n")
    ready, go, held = threading.Event(), threading.Event(), []

    def in_flight() -> None:
        tx = s.transaction()
        tx.__enter__()
        tx.files(ws).write("a.txt", "v2-in-flight\n")
        held.append(tx.id)
        ready.set()
        go.wait(30)
    t = threading.Thread(target=in_flight)
    t.start()
    try:
        assert ready.wait(30)
        shipper.ship_once()  # (its hook commits, checkpoints: the change's segment goes)
        hole = shipper.manifest.doc["holes"][-1]
        assert shipper.manifest.open == {} or held[0] not in shipper.manifest.open
    finally:
        shipper.stop()
        go.set()
        t.join(30)
    report = walstore.restore(url, str(tmp_path / "r"))
    assert report["start_lsn"] >= hole["b"]  # (the change's record is not replayed)
    assert report["in_flight_txids"] == held
    owed = report["owed_file_effects"]
    assert [(e["txid"], e["paths"], e["held"]) for e in owed] == \
        [(held[0], [os.path.join(os.path.realpath(root), "a.txt")], True)], owed
    with open(os.path.join(root, "a.txt")) as f:
        assert f.read() == "v2-in-flight\n"
    with walstore.open(str(tmp_path / "r")) as r:
        assert held[0] not in [i.txid for i in r.log()]
    s.close()
