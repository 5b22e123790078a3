"""Audit 67, review of the reversible files' records joining the transaction as they are
appended (``log_event(appended=...)``, ``log_steps(known=...)``: d3999bb, 07a781d, 2bae2ce).

Findings (each fixed, its test below):

- ``Files._end_watch``: the watch's changes are logged (FILE_STEPS, not durable) before the
  WATCH_END whose ``appended`` swaps them into the transaction; a Ctrl-C landing between
  the two (here: a real SIGINT during the WAL write of the steps' record, held off by
  ``walstore.signals`` to the end of the append) left the open watch the transaction's
  effect and the steps in none — the window 2bae2ce closed for the WATCH_END's wait, one
  record earlier: the rollback put the tree back and recorded the begin only, the steps
  stayed owed, and the next open undid them again over what it found (new.txt, made again
  by hand as the block had made it, deleted).  A failed WAL write of the WATCH_END record
  (EIO: a WalWriteError, the store still writable) did the same;
- ``Files.log_steps``: an operation whose steps take several records (an rmtree of more
  than 4,000 paths) joined the transaction at its LAST record: a Ctrl-C after the first
  left it owed, the next open put back its before-images over what it found (a file
  deleted by hand since came back).
- ``Files._run_ended_out`` (since 07a781d): a file operation whose FILE_STEPS wait was
  interrupted (a Ctrl-C, or a timeout's signal handler raising) is never made, but its
  effect stayed the transaction's: a caller that caught the exception and went on to
  commit committed a change never made — ``at(commit).files(ws).read("a.txt")`` raised
  FileNotFoundError for a file there, unchanged, all along;
- ``Files._watch`` (since d3999bb): a watch() whose WATCH_BEGIN wait was interrupted never
  runs its block, but the open watch stayed the transaction's: a caller that caught the
  interrupt and went on had it put back, at the rollback, every difference from the tree
  as the block began — a write another transaction had COMMITTED since included.
"""
from __future__ import annotations

import errno
import os
import signal

import pytest

import walstore
from tests.test_audit67_durable_events import OPTS, ctrl_c, workspace_with  # noqa: F401
from tests.test_audit67_durable_events import CtrlCAfterWalSync, assert_watch_undone_once
from tools.faults import FaultBackend, installed


class CtrlCInWalWrite(FaultBackend):
    """A real SIGINT sent during the WAL's ``armed``-th record write from now (a pwrite of
    a ``.wal`` file): walstore holds it off to the end of the append's section."""

    armed = 0

    def pwrite(self, fd: int, data, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        if self.armed and (self.path_of(fd) or "").endswith(".wal"):
            self.armed -= 1
            if not self.armed:
                os.kill(os.getpid(), signal.SIGINT)
        return n


@pytest.mark.parametrize("durability", ["full", "normal", "none"])
def test_watch_interrupted_between_its_steps_and_its_end_is_undone_once(tmp_path, ctrl_c,
                                                                        durability):
    """A Ctrl-C right after the watch's FILE_STEPS record is appended, before its WATCH_END:
    the transaction rolls back and puts the tree back.  Before the fix the steps' record
    was in no effect of the transaction (the open watch's LSNs are its begin's): the
    rollback recorded the begin only, the steps stayed owed, and the next open — after a
    clean close — undid them over what it found: new.txt, made again by hand as the block
    had made it, was deleted (under every durability: the interrupt is no fsync's)."""
    opts = dict(OPTS, durability=durability)
    s = walstore.open(str(tmp_path / "s"), **opts)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCInWalWrite()
    with installed(fb), pytest.raises(KeyboardInterrupt):
        with s.transaction() as tx:
            f = tx.files(ws)
            with f.watch():
                (root / "a.txt").write_text("watched\n")
                (root / "new.txt").write_text("made\n")
                fb.armed = 1  # (the block's end: its FILE_STEPS record, then WATCH_END)
    assert_watch_undone_once(s, root, opts)


def test_big_file_change_interrupted_between_its_records_is_not_done_by_the_next_open(
        tmp_path, ctrl_c, monkeypatch):
    """An rmtree whose steps take several FILE_STEPS records (STEP_CHUNK steps each: 4,000;
    1 here), a Ctrl-C landing after the first is appended.  The rmtree is never made
    (write-ahead) and the transaction rolls back.  Before the fix the transaction learnt
    of the effect at its LAST record only: the first was owed in the log, never settled,
    and the next open — after a clean close — put back its before-image over what it
    found: d/x.txt, deleted by hand since, outside any transaction, was there again."""
    import walstore.agent.files as agent_files
    monkeypatch.setattr(agent_files, "STEP_CHUNK", 1)
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    (root / "d").mkdir()
    for name in ("x.txt", "y.txt"):
        (root / "d" / name).write_text(name)
    fb = CtrlCInWalWrite()
    with installed(fb), pytest.raises(KeyboardInterrupt):
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.armed = 1
            f.rmtree("d")
    assert sorted(os.listdir(root / "d")) == ["x.txt", "y.txt"]  # (never removed)
    for name in ("x.txt", "y.txt"):  # by hand, outside walstore
        (root / "d" / name).unlink()
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert os.listdir(root / "d") == []
        report = s.last_recovery
        assert report is None or not report.file_conflicts, report.file_conflicts


def test_watch_whose_end_record_write_failed_is_undone_once(tmp_path):
    """The WAL write of a watch()'s WATCH_END record fails (EIO: WalWriteError, nothing of
    the record logged, the store still writable): the transaction rolls back and puts the
    tree back.  Before the fix the rollback recorded the begin only, the block's steps
    (written just before) stayed owed, and the next open — after a clean close — deleted
    new.txt, made again by hand as the block had made it."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = FaultBackend()
    with installed(fb), pytest.raises(walstore.WalstoreError, match="could not write"):
        with s.transaction() as tx:
            f = tx.files(ws)
            with f.watch():
                (root / "new.txt").write_text("made\n")
                fb.fail("pwrite", errno.EIO, path="*.wal", nth=2)  # (1: the steps)
    assert not (root / "new.txt").exists()
    (root / "new.txt").write_text("made\n")  # by hand, outside walstore
    with s.transaction() as tx:  # (still writable)
        tx.put("k", 1)
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "new.txt").read_text() == "made\n"
        assert s.get("k") == 1


def test_file_change_interrupted_in_its_wait_and_caught_is_not_committed_as_made(tmp_path,
                                                                                ctrl_c):
    """``f.delete("a.txt")`` interrupted while its FILE_STEPS record waits for the disk (a
    real SIGINT; as a timeout's signal handler raising), the caller catches it and commits
    the transaction.  The delete was never made (write-ahead).  Before the fix the effect
    joined the transaction at the record's append and stayed: the commit recorded a.txt
    deleted — ``at(commit)`` said it did not exist, while it stood there unchanged."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSync()
    with installed(fb):
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.armed = 1
            with pytest.raises(KeyboardInterrupt):
                f.delete("a.txt")
            tx.put("k", 1)
    assert (root / "a.txt").read_text() == "old\n"  # (never deleted)
    head = s.log(limit=1)[0]
    assert s.at(head.lsn).files(ws).read("a.txt") == b"old\n"
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "old\n" and s.get("k") == 1


def test_watch_interrupted_in_its_begin_and_caught_never_puts_back_a_later_commit(tmp_path,
                                                                                 ctrl_c):
    """A Ctrl-C while ``f.watch()`` waits for its WATCH_BEGIN record's fsync, caught in the
    transaction, which goes on; another transaction then commits a write of a.txt; the
    first rolls back.  The block never ran.  Before the fix the open watch stayed the
    first transaction's effect, and its rollback put the workspace back to the tree as the
    block began: the committed a.txt was "old" again on the disk (and after the reopen)."""
    assert_watch_never_run_puts_back_no_later_commit(tmp_path, CtrlCAfterWalSync())


def assert_watch_never_run_puts_back_no_later_commit(tmp_path, fb: FaultBackend) -> None:
    """``f.watch()`` under ``fb`` armed once (its WATCH_BEGIN's wait interrupted: the block
    never runs), the interrupt caught in the transaction, which goes on; another
    transaction commits a write of a.txt; the first rolls back.  The committed a.txt
    stays, on the disk and after a reopen, and no watch is saved by the reopen."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    ran = []
    with installed(fb), pytest.raises(ValueError, match="gives up"):
        with s.transaction() as tx:
            fb.armed = 1
            with pytest.raises(KeyboardInterrupt):
                with tx.files(ws).watch():
                    ran.append(True)
            with s.transaction() as other:
                other.files(ws).write("a.txt", "committed\n")
            raise ValueError("the agent gives up")
    assert ran == [] and (root / "a.txt").read_text() == "committed\n"
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "committed\n"
        assert s.last_recovery is None or not s.last_recovery.watch_saved


def test_workspace_registration_of_unknown_outcome_names_no_transaction(tmp_path):
    """``store.workspace(root)`` whose WORKSPACE record's fsync fails: CommitOutcomeUnknown
    (0998ac6).  Its ``txid`` named transaction -1, one no transaction has (as the restore
    points' did before adcebaa): a registration is no transaction, so None."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root = tmp_path / "ws"
    root.mkdir()
    fb = FaultBackend()
    try:
        with installed(fb), pytest.raises(walstore.CommitOutcomeUnknown) as raised:
            fb.fail("fdatasync", errno.EIO, path="*.wal")
            s.workspace(str(root))
        assert raised.value.txid is None, raised.value.txid
        assert str(root) in str(raised.value)
    finally:
        s._drop_like_a_crash()
