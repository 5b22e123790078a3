"""Audit 68: defects the stop-67 closing note listed and left alone (files workspace,
replication), each reproduced here first (it failed on dd88a26), then fixed.

- a ``watch()`` block whose WATCH_END record could not be written (the store still
  writable): a ``rollback_to`` past it said "a watch() block is still running" — no
  block was running — and the transaction's rollback put the workspace back to the tree
  as the block began, a write another transaction had COMMITTED since included;
- a file operation that failed, whose undo found a path changed behind its back (a
  conflict), stayed the transaction's as made: a caller that caught the error committed
  a change the disk does not hold;
- a lease's renewal was timed on the wall clock: after the holder's clock stepped back by
  D it was not due for D more (the lease expired under a live holder for other hosts);
- the shipper's retention throttle was timed on the deleting clock, which follows a step
  back: after a step back of D no retention ran for D more;
- one shipping round of an external shipper (it cannot pin the WAL) beside a writer
  trimming faster than it ships met a hole, took a full LMDB snapshot for it, met another
  hole while shipping on to that snapshot, and took another: one full copy per hole.
"""
from __future__ import annotations

import errno
import time

import pytest

import walstore
from tests.test_audit67_clock import Stepped, _commit, _step_everywhere
from tests.test_audit67_durable_events import OPTS, workspace_with
from tests.test_audit67_replica_hole import _commit as _commit_many
from tests.test_audit67_replica_hole import _replica_behind_a_trim
from test_replication_support import rows
from walstore.replication import lease as lease_mod
from walstore.replication import manifest as manifest_mod
from walstore.replication import shipper as shipper_mod
from walstore.replication.targets import open_target
from tools.faults import FaultBackend, installed


def _restored_rows(url: str, tmp_path) -> list:
    """The rows of a restore of everything from the replica at ``url`` into tmp_path/r."""
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        return rows(r)


# ---- files: a watch whose end could not be recorded ------------------------------------
def _watch_whose_end_fails(s, root, ws, fb):
    """A transaction whose ``f.watch()`` block makes new.txt and whose WATCH_END record's
    WAL write fails (EIO: WalWriteError, the store still writable); returns (tx, the
    savepoint taken before the watch)."""
    tx = s.transaction()
    f = tx.files(ws)
    f.write("b.txt", "b\n")
    sp = tx.savepoint()
    with pytest.raises(walstore.WalstoreError, match="could not write"):
        with f.watch():
            (root / "new.txt").write_text("made\n")
            fb.fail("pwrite", errno.EIO, path="*.wal", nth=2)  # (1: the steps)
    return tx, sp


def test_rollback_to_past_a_watch_whose_end_was_not_recorded_works(tmp_path):
    """The caller catches the failed end and rolls back to a savepoint taken before the
    watch, then commits.  Before the fix ``rollback_to`` refused: "a watch() block is
    still running; leave it ..." — the block had ended.  Now the block's changes are put
    back and the commit holds what came before the watch, on disk and in ``at``."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    with installed(FaultBackend()) as fb:
        tx, sp = _watch_whose_end_fails(s, root, ws, fb)
    tx.rollback_to(sp)
    assert not (root / "new.txt").exists()
    tx.files(ws).write("c.txt", "c\n")
    tx.commit()
    view = s.at(s.log(limit=1)[0].lsn).files(ws)
    assert [view.read(p) for p in ("a.txt", "b.txt", "c.txt")] == [b"old\n", b"b\n", b"c\n"]
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert sorted(p.name for p in root.iterdir()) == ["a.txt", "b.txt", "c.txt"]
        assert s.last_recovery is None or not s.last_recovery.file_conflicts


def test_no_committed_write_undone_by_a_rollback_of_a_watch_whose_end_failed(tmp_path):
    """The caller catches the failed end; another transaction writes a.txt (not a path the
    block changed) and commits; the first rolls back.  Before the fix the rollback put the
    workspace back to the tree as the block began — the COMMITTED a.txt was "old" on disk
    again while the store said "new".  Now only the block's own changes are put back."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    with installed(FaultBackend()) as fb:
        tx, _sp = _watch_whose_end_fails(s, root, ws, fb)
    with s.transaction() as other:
        other.files(ws).write("a.txt", "new\n")
    tx.rollback()
    assert (root / "a.txt").read_text() == "new\n"
    assert not (root / "new.txt").exists() and not (root / "b.txt").exists()
    assert s.at(s.log(limit=1)[0].lsn).files(ws).read("a.txt") == b"new\n"
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "new\n"
        assert not (root / "new.txt").exists()


class StrangerAtRenameOnto(FaultBackend):
    """The rename onto a path ending ``name`` (a write put in place) is done, then another
    process writes the path, then the rename "fails" (EIO): the operation's undo finds
    the stranger's bytes there."""

    name = "a.txt"
    armed = 0

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        if self.armed and dst.endswith(self.name):
            self.armed = 0
            with open(dst, "w") as out:
                out.write("stranger\n")
            raise OSError(errno.EIO, "injected", dst)


def test_failed_file_change_whose_undo_conflicted_is_not_committed_as_made(tmp_path):
    """``f.write("a.txt", "new")`` fails (EIO after its rename) and another process wrote
    a.txt meanwhile: the operation's undo cannot put "old" back (a conflict).  The caller
    catches the StoreIOError and commits.  Before the fix the commit went through with the
    write in it: ``at(commit)`` said a.txt was "new", the disk held "stranger".  Now the
    commit refuses, naming the path, and the transaction rolls back."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = StrangerAtRenameOnto()
    with installed(fb), pytest.raises(walstore.WalstoreError, match="a.txt") as got:
        with s.transaction() as tx:
            fb.armed = 1
            with pytest.raises(walstore.StoreIOError):
                tx.files(ws).write("a.txt", "new\n")
            tx.put("k", 1)
    assert "could not be put back" in str(got.value)
    assert s.get("k") is None and s.log(limit=1) == []
    assert (root / "a.txt").read_text() == "stranger\n"  # (another's: left, a conflict)
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert s.get("k") is None
        assert (root / "a.txt").read_text() == "stranger\n"


# ---- replication: clocks ----------------------------------------------------------------
def test_lease_renewal_is_due_on_time_after_the_clock_steps_back(tmp_path, monkeypatch):
    """A lease (ttl 1.5 s) taken, then the holder's wall clock steps back an hour.  Before
    the fix its renewal was timed on the wall clock: not due for an hour more, while the
    lease expired for every other host after 1.5 s.  Now it is due a third of the ttl
    after the last renewal, on the elapsed clock; the expiry it writes is still the wall
    clock's (what other hosts compare)."""
    target = open_target("file://" + str(tmp_path / "rep"))
    lease = lease_mod.Lease(target, lease_mod.holder_info("t68", str(tmp_path / "src"),
                                                          b"\x01" * 16, "l"), ttl=1.5)
    lease.acquire()
    try:
        assert not lease.renew_due()
        monkeypatch.setattr(lease_mod, "time", Stepped(-3600.0))
        time.sleep(0.6)  # (due after ttl / 3: 0.5 s)
        assert lease.renew_due()
        lease.renew()
        assert not lease.renew_due()
        expires = lease.read()[0]["expires"]
        assert abs(expires - (time.time() - 3600.0 + 1.5)) < 5
    finally:
        lease.release()


def test_replica_retention_runs_on_schedule_after_the_clock_steps_back(tmp_path,
                                                                       monkeypatch):
    """Retention every 0.2 s (``RETENTION_EVERY``), a round every 0.05 s; the wall clock
    steps back an hour.  Before the fix the throttle compared the deleting clock (which
    follows a step back) with the time of the last retention: none ran for an hour more.
    Now it is timed on the elapsed clock.  (What a retention may drop after the step is
    still judged on the deleting clock: it keeps more, never less.)"""
    monkeypatch.setattr(shipper_mod, "RETENTION_EVERY", 0.2)
    ran = []
    real = manifest_mod.Manifest.retention
    monkeypatch.setattr(manifest_mod.Manifest, "retention",
                        lambda self, *a: ran.append(a) or real(self, *a))
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 0.05})
    try:
        _commit(s, "a", 1)
        s.sync_replica(timeout=10)
        assert ran  # (the first round's)
        _step_everywhere(monkeypatch, -3600.0)
        del ran[:]
        deadline = time.monotonic() + 1.0
        while not ran and time.monotonic() < deadline:
            _commit(s, "b", 1)
            s.sync_replica(timeout=10)
            time.sleep(0.05)
        assert ran
    finally:
        s.close()


@pytest.mark.parametrize("trim", ["after", "before"])
def test_one_shipping_round_beside_a_fast_writer_ships_one_snapshot(tmp_path, trim):
    """An external shipper's round meets a hole (the writer trimmed the WAL the replica
    lacked) and ships a snapshot for it; the writer trims again (``after`` the snapshot:
    past it; ``before`` it: below it, the snapshot a base past the second hole too).
    Before the fix the round recorded the second hole and shipped a second full LMDB
    snapshot (one per hole, without bound).  Now a second hole below it is recorded with
    no snapshot; one past it, the replica's end below the first snapshot, ships a second
    (two a round at most: a round ending there was unrestorable until the next).  The replica then restores to the writer's state."""
    s, shipper, url = _replica_behind_a_trim(tmp_path)
    real = shipper._snapshot
    taken = []

    def writer_trims():
        _commit_many(s, 10000, 300)
        assert s._engine.checkpoint()["segments_removed"] > 0

    def snapshot_and_writer_trims(summary):
        if trim == "before" and not taken:
            writer_trims()
        real(summary)
        taken.append(summary["snapshot"])
        if trim == "after" and len(taken) == 1:
            writer_trims()
    shipper._snapshot = snapshot_and_writer_trims
    try:
        shipper.ship_once()
        # (``after``: the second hole lies past the first snapshot, the replica's end below
        # it — a second snapshot, two a round at most: test_audit68_files_repl_review)
        assert len(taken) == {"after": 2, "before": 1}[trim], taken
        assert len(shipper.manifest.doc["holes"]) == 2
        assert shipper._saved_unbased is None, shipper._saved_unbased
        for _ in range(2):  # (the writer idle now)
            shipper.ship_once()
        assert len(taken) == {"after": 2, "before": 1}[trim], taken
        assert shipper.status().last_error is None, shipper.status().last_error
        expected = rows(s)
    finally:
        shipper.stop()
        s.close()
    assert _restored_rows(url, tmp_path) == expected
