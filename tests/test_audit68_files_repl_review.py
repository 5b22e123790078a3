"""Audit 68, review of the files-workspace and replication fixes (d4fdcb5, 6fac404,
25cceac, 21146c3, 0557e5c): each defect found reproduced here first (it failed on
e7c0af8), then fixed.

- one full snapshot a shipping round (0557e5c): a round whose hole's snapshot lay below
  its starting frontier, the writer trimming again before the round shipped up to that
  snapshot, stopped where the replica stood — below its only base: no restore reached
  the replica's end until the next round (hours away for a cron `replicate --once`);
- a watch() whose end's records failed, the caller going on, another transaction
  committing a.txt, then a crash (SIGKILL) before the rollback: the next open put every
  difference from the tree as the block began back — the COMMITTED a.txt "old" again;
  so did the transaction's own rollback when the end's snapshot failed before the block's
  changes were read (in process the commit was not in LMDB yet);
- a savepoint taken after such a watch's block (its end failed) could not be rolled back
  to: "the savepoint was taken inside a watch() block";
- the rollback of such a watch (from its end's snapshot) left a FIFO the block made, and
  the directory holding it, reported as a conflict;
- a watch() whose FILE_STEPS record failed left the block's paths unclaimed: another
  transaction overwrote one and committed, and the rollback called walstore's own
  commit "changed behind walstore's back";
- a commit after a watch() whose end failed was refused "while a watch() is open (inside
  its block, or its changes could not be read)": neither was so.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys

import pytest

import walstore
from tests.test_audit67_durable_events import OPTS, workspace_with
from tests.test_audit67_replica_hole import _commit
from tests.test_audit68_files_repl import _restored_rows
from test_replication_support import rows
from walstore.replication.shipper import Shipper
from walstore.replication.source import DirectorySource
from tools.faults import FaultBackend, installed


# ---- replication: a round ends restorable where a second snapshot makes it so ----------
def _round_overtaken(tmp_path, writer: str):
    """(writer store, shipper, url, snapshots taken): an external shipper (no pin) of a
    writer that trimmed the WAL the replica lacked and committed on (its LMDB applied
    below the durable frontier), and one round: it meets the hole and ships a snapshot —
    of LMDB as applied, below the frontier the round read — then the writer checkpoints
    again (``busy``: after more commits), trimming past that snapshot before the round
    shipped up to it."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path, segment_size=64 * 1024)
    n = _commit(s, 0, 20)
    shipper = Shipper(DirectorySource(path), url, {"interval": 30})
    shipper.ship_once()
    n = _commit(s, n, 300)
    assert s._engine.checkpoint()["segments_removed"] > 0  # (the hole)
    n = _commit(s, n, 300)  # (durable, not applied to LMDB yet)
    real = shipper._snapshot
    taken: list = []

    def snapshot_then_writer_trims(summary):
        real(summary)
        taken.append(summary["snapshot"])
        if len(taken) == 1:
            if writer == "busy":
                _commit(s, n, 100)
            assert s._engine.checkpoint()["segments_removed"] > 0
    shipper._snapshot = snapshot_then_writer_trims
    try:
        shipper.ship_once()
    except BaseException:
        shipper.stop()
        s.close()
        raise
    return s, shipper, url, taken


@pytest.mark.parametrize("writer", ["idle", "busy"])
def test_no_acknowledged_commit_lost_a_round_overtaken_by_a_second_trim_ends_restorable(
        tmp_path, writer):
    """The round of ``_round_overtaken``.  Before the fix (one snapshot a round) it
    stopped where the replica stood, its end below its only base: every restore failed
    ("hole in the replica's WAL ... no restore can cross it") until the next round.  Now
    it ships a second snapshot (two a round at most) and on to it: the replica restores
    to exactly the writer's rows."""
    s, shipper, url, taken = _round_overtaken(tmp_path, writer)
    try:
        assert shipper._saved_unbased is None, shipper._saved_unbased
        assert 1 < len(taken) <= 2, taken
        assert len(shipper.manifest.doc["holes"]) == 2
        expected = rows(s)
    finally:
        shipper.stop()
        s.close()
    assert _restored_rows(url, tmp_path) == expected


def test_restore_after_rounds_with_holes_to_any_point_gives_the_writers_rows(tmp_path):
    """After the round of ``_round_overtaken`` (two holes, two snapshots) and one more
    round of later commits: a restore to a commit's LSN either gives exactly the rows the
    writer had then, or (the commit lost in a hole, or needing a replay across one) is
    refused with ReplicationError — never a silent prefix or another state."""
    s, shipper, url, _taken = _round_overtaken(tmp_path, "busy")
    try:
        _commit(s, 10000, 50)
        shipper.ship_once()
        m = shipper.manifest
        lsns = sorted(e.lsn for e in s.log(limit=10 ** 6))
        edges = [x for h in m.doc["holes"] for x in (h["a"], h["b"])]
        edges += [x["lsn"] for x in m.snapshots] + [m.position]
        picks = {lsns[0], lsns[-1], *lsns[::97]}
        for x in edges:  # (the commits either side of each edge)
            i = next((j for j, v in enumerate(lsns) if v >= x), len(lsns))
            picks.update(lsns[max(0, i - 1):i + 1])
        expected = {lsn: list(s.at(lsn).scan()) for lsn in picks}
        holes = [(h["a"], h["b"]) for h in m.doc["holes"]]
        snaps = [x["lsn"] for x in m.snapshots]
    finally:
        shipper.stop()
        s.close()
    restored = 0
    for k, lsn in enumerate(sorted(picks)):
        dest = str(tmp_path / f"r{k}")
        try:
            walstore.restore(url, dest, walstore.LSN(lsn))
        except walstore.ReplicationError:
            # (refused only where no snapshot at or below it has the WAL up to it)
            assert not any(x <= lsn and not any(a <= lsn and b > x for a, b in holes)
                           for x in snaps), lsn
            continue
        with walstore.open(dest) as r:
            assert rows(r) == expected[lsn], lsn
        restored += 1
    assert restored >= 3, (restored, len(picks))


# ---- files: a watch whose end could not be recorded, then a crash ----------------------
@contextlib.contextmanager
def _watch_whose_wal_write_fails(tx, ws, nth: int):
    """``tx``'s ``watch()`` of ``ws`` around the block; at the block's end the ``nth`` WAL
    write from then on fails (EIO), and the watch's end raises "could not write"."""
    with installed(FaultBackend()) as fb, pytest.raises(walstore.WalstoreError,
                                                        match="could not write"):
        with tx.files(ws).watch():
            yield
            fb.fail("pwrite", errno.EIO, path="*.wal", nth=nth)


FAILED_END_THEN_KILLED = r"""
import errno, os, sys, walstore
from tools.faults import FaultBackend, installed
store, root, when = sys.argv[1:4]
s = walstore.open(store, durability="full", apply_interval=3600.0)
ws = s.workspace(root)
tx = s.transaction()
f = tx.files(ws)
with installed(FaultBackend()) as fb:
    try:
        with f.watch():
            with open(os.path.join(root, "new.txt"), "w") as out:
                out.write("made\n")
            fb.fail("pwrite", errno.EIO, path="*.wal", nth=2)  # (1: the steps)
    except walstore.WalstoreError:
        pass
with s.transaction() as other:  # (a path the block never changed)
    other.files(ws).write("a.txt", "new\n")
if when == "after-rollback":
    tx.rollback()
print("ready", flush=True)
import time; time.sleep(600)
"""


@pytest.mark.parametrize("when", ["before-rollback", "after-rollback"])
def test_no_committed_write_undone_by_the_recovery_of_a_watch_whose_end_failed(
        tmp_path, when):
    """A ``watch()`` block makes new.txt; its WATCH_END record's WAL write fails (EIO);
    the caller catches it; another transaction writes a.txt (a path the block never
    changed) and commits; the process is killed (SIGKILL) before or after the first
    transaction's rollback.  The next open must undo the block's new.txt only: the
    COMMITTED a.txt stays "new" on disk, as the store says."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("old\n")
    store = str(tmp_path / "s")
    walstore.open(store).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-c", FAILED_END_THEN_KILLED, store,
                             str(root), when], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
        proc.stdout.close()
    with walstore.open(store, durability="full") as s:
        ws = s.workspace(str(root))
        assert s.at(s.log(limit=1)[0].lsn).files(ws).read("a.txt") == b"new\n"
        assert (root / "a.txt").read_text() == "new\n"
        assert not (root / "new.txt").exists()


def test_no_committed_write_undone_by_a_rollback_of_a_watch_whose_end_snapshot_failed(
        tmp_path):
    """A ``watch()`` block makes new.txt; its end's snapshot fails before the block's
    changes are read (EIO storing new.txt's content), so only "the tree as the block
    began" is known; the caller catches it; another transaction writes a.txt and
    commits; the first rolls back.  Before the fix the rollback put every difference
    from that tree back: the COMMITTED a.txt was "old" on disk while the store said
    "new".  Now a path committed since the watch began is left as committed."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    tx = s.transaction()
    with installed(FaultBackend()) as fb, pytest.raises(walstore.StoreIOError):
        with tx.files(ws).watch():
            (root / "new.txt").write_text("made\n")
            fb.fail("pwrite", errno.EIO, path="*blobs*")
    with s.transaction() as other:
        other.files(ws).write("a.txt", "new\n")
    tx.rollback()
    assert (root / "a.txt").read_text() == "new\n"
    assert not (root / "new.txt").exists()
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "new\n"
        assert s.at(s.log(limit=1)[0].lsn).files(ws).read("a.txt") == b"new\n"


def test_rollback_to_a_savepoint_taken_after_a_watch_whose_end_failed_works(tmp_path):
    """The WATCH_END record's write fails (EIO) after the block's changes were read; the
    caller catches it, takes a savepoint, writes b.txt, and rolls back to that savepoint.
    Before the fix it was refused: "the savepoint was taken inside a watch() block" —
    the block had ended before the savepoint was taken.  Now b.txt is put back, the
    watch stays the transaction's to undo: rolled back to a savepoint before it, nothing
    of the block is left, and the transaction commits."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    tx = s.transaction()
    before = tx.savepoint()
    with _watch_whose_wal_write_fails(tx, ws, nth=2):  # (the WATCH_END record: 1 is the steps)
        inside = tx.savepoint()
        (root / "new.txt").write_text("made\n")
    after = tx.savepoint()
    tx.files(ws).write("b.txt", "b\n")
    tx.rollback_to(after)
    assert not (root / "b.txt").exists() and (root / "new.txt").exists()
    with pytest.raises(walstore.WalstoreError, match="inside a watch"):
        tx.rollback_to(inside)
    tx.rollback_to(before)
    assert sorted(p.name for p in root.iterdir()) == ["a.txt"]
    tx.files(ws).write("c.txt", "c\n")
    tx.commit()
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert sorted(p.name for p in root.iterdir()) == ["a.txt", "c.txt"]


def test_rollback_of_a_watch_whose_end_failed_removes_the_special_files_it_left(tmp_path):
    """The block makes d/ holding d/x and a FIFO d/p; the WATCH_END record's write fails
    (EIO) after the block's changes were read; the transaction rolls back.  Before the
    fix the rollback (from the end's snapshot) did not remove the FIFO as the undo of an
    ended watch does: d/ stayed, reported as a conflict "changed behind walstore's back"
    (FileConflictError).  Now d/ is gone, no conflict, as when the end was recorded."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    tx = s.transaction()
    with _watch_whose_wal_write_fails(tx, ws, nth=2):  # (the WATCH_END record: 1 is the steps)
        (root / "d").mkdir()
        (root / "d" / "x").write_text("x\n")
        os.mkfifo(root / "d" / "p")
    tx.rollback()
    assert sorted(p.name for p in root.iterdir()) == ["a.txt"]
    assert s.file_conflicts() == []
    s.close()


def test_rollback_to_past_a_failed_change_whose_undo_conflicted_lets_the_commit_go(
        tmp_path):
    """(A check of 6fac404; it passed.)  ``f.write("a.txt")`` fails and its undo finds
    another's bytes there: the commit refuses (WalstoreError naming the path); a
    ``rollback_to`` a savepoint before the write reports the conflict
    (FileConflictError) and clears it: the commit then goes through with the rest, the
    other's a.txt left as found."""
    from tests.test_audit68_files_repl import StrangerAtRenameOnto
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = StrangerAtRenameOnto()
    tx = s.transaction()
    sp = tx.savepoint()
    with installed(fb), pytest.raises(walstore.StoreIOError):
        fb.armed = 1
        tx.files(ws).write("a.txt", "new\n")
    tx.put("k", 1)
    with pytest.raises(walstore.WalstoreError, match="a.txt changed behind") as got:
        tx.commit()
    assert type(got.value) is walstore.WalstoreError and tx.state == "active"
    with pytest.raises(walstore.FileConflictError, match="a.txt"):
        tx.rollback_to(sp)
    tx.put("k2", 2)
    tx.commit()
    assert s.get("k") is None and s.get("k2") == 2
    assert (root / "a.txt").read_text() == "stranger\n"
    s.close()


def test_no_other_transaction_changes_a_path_a_watch_whose_steps_failed_changed(tmp_path):
    """The block rewrites a.txt; the FILE_STEPS record of its changes fails (EIO), so
    the end fails; the caller catches it.  Before the fix the block's paths were claimed
    only after their record was written: another transaction's write of a.txt went
    through and committed over the live transaction's change, and the first one's
    rollback then raised FileConflictError "changed behind walstore's back" naming a.txt
    (walstore's own commit), a copy in the quarantine.  Now the other write is refused
    (ConflictError) while the first is live, as when only the WATCH_END record failed,
    and the rollback puts a.txt back with no conflict."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    tx = s.transaction()
    with _watch_whose_wal_write_fails(tx, ws, nth=1):  # (the steps)
        (root / "a.txt").write_text("block\n")
    with pytest.raises(walstore.ConflictError, match="a.txt"):
        with s.transaction() as other:
            other.files(ws).write("a.txt", "v1\n")
    tx.rollback()
    assert (root / "a.txt").read_text() == "old\n"
    assert s.file_conflicts() == []
    with s.transaction() as other:  # (its claim ended with it)
        other.files(ws).write("a.txt", "v1\n")
    assert (root / "a.txt").read_text() == "v1\n"
    s.close()


def test_commit_after_a_watch_whose_end_failed_says_what_happened(tmp_path):
    """The WATCH_END record's write fails (EIO); the caller catches it and commits.
    Before the fix the refusal said "cannot commit while a watch() is open (inside its
    block, or its changes could not be read)" — the block had ended and its changes had
    been read.  Now it says the end could not be recorded, why, and that the transaction
    is rolled back (as any commit refused here)."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    tx = s.transaction()
    with _watch_whose_wal_write_fails(tx, ws, nth=2):  # (the WATCH_END record: 1 is the steps)
        (root / "new.txt").write_text("made\n")
    with pytest.raises(walstore.WalstoreError) as got:
        tx.commit()
    said = str(got.value)
    assert "is open" not in said and "could not be recorded" in said, said
    assert "Input/output error" in said and "is rolled back" in said, said
    assert tx.state == "rolled back"
    assert sorted(p.name for p in root.iterdir()) == ["a.txt"]
    s.close()
