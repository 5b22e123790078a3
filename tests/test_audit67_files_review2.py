"""Audit 67, second review of the reversible files' interrupted records being settled where
the exception comes out (d952ead, abfc0a9, a80d5c9: a file operation whose FILE_STEPS
wait was interrupted is recorded FILE_RESTORED and taken out of the transaction).

Findings (each fixed, its test below):

- ``Files._run_ended_out``: the settle logged FILE_RESTORED and only then took the effect
  out of the transaction; a second Ctrl-C landing in that record's append (held off by
  ``walstore.signals`` to the append's end) left the effect the transaction's, recorded as
  never made: its rollback undid it again — a.txt, deleted by hand after the interrupted
  (never made) delete, was put back (a80d5c9's twin for a watch's begin);
- the same settle whose FILE_RESTORED record could not be written (EIO or ENOSPC in the
  WAL write, the store still writable): the effect stayed, unflagged, and a caller that
  caught the interrupt and committed committed a delete never made — ``at(commit)`` said
  a.txt did not exist while it stood there, unchanged (d952ead's finding, one fault on).
"""
from __future__ import annotations

import errno
import os
import signal

import pytest

import walstore
from tests.test_audit67_durable_events import OPTS, ctrl_c, workspace_with  # noqa: F401
from tests.test_audit67_files_review import assert_watch_never_run_puts_back_no_later_commit
from tools.faults import FaultBackend, installed


class CtrlCAfterWalSyncThen(FaultBackend):
    """A real SIGINT right after the WAL's next fdatasync (``armed``), and then ``then``
    (this backend) — a second SIGINT armed, or a fault installed for what follows."""

    armed = 0
    then = None
    again = 0  # another SIGINT during the WAL's ``again``-th record write after the first

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        if self.armed and (self.path_of(fd) or "").endswith(".wal"):
            self.armed = 0
            if self.then is not None:
                self.then(self)
            os.kill(os.getpid(), signal.SIGINT)

    def pwrite(self, fd: int, data, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        if self.again and (self.path_of(fd) or "").endswith(".wal"):
            self.again -= 1
            if not self.again:
                os.kill(os.getpid(), signal.SIGINT)
        return n


def test_file_change_settled_after_its_interrupt_is_never_undone_again(tmp_path, ctrl_c):
    """``f.delete("a.txt")`` interrupted in its FILE_STEPS wait (never made), and a second
    Ctrl-C lands in the append of the FILE_RESTORED record settling it.  The caller catches
    both; a.txt is then deleted by hand (outside walstore); the transaction rolls back.
    Before the fix the effect stayed the transaction's after its FILE_RESTORED: the
    rollback undid the delete never made, and a.txt was there again."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSyncThen()
    fb.then = lambda b: setattr(b, "again", 1)
    caught = []
    with installed(fb), pytest.raises(ValueError, match="gives up"):
        with s.transaction() as tx:
            fb.armed = 1
            try:
                try:
                    tx.files(ws).delete("a.txt")
                except KeyboardInterrupt:
                    caught.append(1)
                    raise  # (the second lands in the handler's settle, or here)
            except KeyboardInterrupt:
                caught.append(2)
            (root / "a.txt").unlink()  # by hand
            raise ValueError("the agent gives up")
    assert caught == [1, 2] and not (root / "a.txt").exists()
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert not (root / "a.txt").exists()
        assert s.last_recovery is None or not s.last_recovery.file_conflicts


def assert_nothing_committed_and_a_txt_old(s, root):
    """The commit was refused: a.txt holds "old", k is unset and the log is empty; the same
    after a clean close and reopen.  Returns the reopen's ``last_recovery``."""
    assert (root / "a.txt").read_text() == "old\n"
    assert s.get("k") is None and s.log(limit=1) == []
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "old\n" and s.get("k") is None
        return s.last_recovery


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_file_change_whose_settle_failed_is_not_committed_as_made(tmp_path, ctrl_c, err):
    """``f.delete("a.txt")`` interrupted in its FILE_STEPS wait (never made), and the WAL
    write of the FILE_RESTORED settling it fails (the store stays writable).  The caller
    catches the interrupt and commits.  Before the fix the commit went through with the
    delete in it: ``at(commit).files(ws).read("a.txt")`` raised FileNotFoundError, a.txt
    standing there unchanged.  Now the commit refuses, and the transaction rolls back."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSyncThen()
    fb.then = lambda b: b.fail("pwrite", err, path="*.wal")
    with installed(fb), pytest.raises(walstore.WalstoreError, match="not recorded as made"):
        with s.transaction() as tx:
            fb.armed = 1
            with pytest.raises(KeyboardInterrupt):
                tx.files(ws).delete("a.txt")
            tx.put("k", 1)
    report = assert_nothing_committed_and_a_txt_old(s, root)
    assert report is None or not report.file_conflicts


def test_watch_whose_interrupted_begin_could_not_be_ended_never_puts_back_a_later_commit(
        tmp_path, ctrl_c):
    """A Ctrl-C while ``f.watch()`` waits for its WATCH_BEGIN's fsync (the block never
    runs), and the WAL write of the WATCH_END settling it fails (EIO; the store stays
    writable).  The caller catches the interrupt; another transaction commits a write of
    a.txt; the first rolls back.  Before the fix the open watch stayed the transaction's
    as one whose block ran: its rollback put the tree back as the block began — the
    COMMITTED a.txt was "old" again (abfc0a9's finding, one fault on)."""
    fb = CtrlCAfterWalSyncThen()
    fb.then = lambda b: b.fail("pwrite", errno.EIO, path="*.wal")
    assert_watch_never_run_puts_back_no_later_commit(tmp_path, fb)


class UnlinkFails(FaultBackend):
    """The unlink of a path ending ``name`` fails (EIO), and so does the WAL's next record
    write (the FILE_RESTORED saying the operation was put back)."""

    name = "a.txt"

    def unlink(self, path: str) -> None:
        if path.endswith(self.name):
            self.fail("pwrite", errno.EIO, path="*.wal")
            raise OSError(errno.EIO, "injected", path)
        super().unlink(path)


def test_file_change_that_failed_and_could_not_say_so_is_not_committed_as_made(tmp_path):
    """``f.delete("a.txt")`` fails in its unlink (EIO: StoreIOError, nothing changed) and
    the FILE_RESTORED record saying it was put back cannot be written (EIO; the store stays
    writable).  The caller catches the error and commits.  Before the fix the commit went
    through with the delete in it: ``at(commit)`` said a.txt did not exist, while it stood
    there unchanged.  Now the commit refuses, and the transaction rolls back."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    with installed(UnlinkFails()), pytest.raises(walstore.WalstoreError,
                                                 match="not recorded as made"):
        with s.transaction() as tx:
            with pytest.raises(walstore.StoreIOError):
                tx.files(ws).delete("a.txt")
            tx.put("k", 1)
    assert_nothing_committed_and_a_txt_old(s, root)


def test_rollback_to_past_a_watch_that_never_ran_and_could_not_be_ended_works(tmp_path,
                                                                             ctrl_c):
    """As above (the WATCH_BEGIN's wait interrupted, the settling WATCH_END unwritten), the
    caller catches the interrupt and rolls back to a savepoint taken before the watch,
    then goes on and commits.  Before the fix ``rollback_to`` refused: "a watch() block is
    still running; leave it ..." — no block ever ran — and the commit then said a watch()
    was open; the transaction's work was lost.  Now the never-run watch is recorded put
    back, and the commit names what it holds, on disk and in ``at``."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSyncThen()
    fb.then = lambda b: b.fail("pwrite", errno.EIO, path="*.wal")
    with installed(fb):
        with s.transaction() as tx:
            f = tx.files(ws)
            f.write("b.txt", "b\n")
            sp = tx.savepoint()
            fb.armed = 1
            with pytest.raises(KeyboardInterrupt):
                with f.watch():
                    pass
            tx.rollback_to(sp)
            f.write("c.txt", "c\n")
    view = s.at(s.log(limit=1)[0].lsn).files(ws)
    assert [view.read(p) for p in ("a.txt", "b.txt", "c.txt")] == [b"old\n", b"b\n", b"c\n"]
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert sorted(os.listdir(root)) == ["a.txt", "b.txt", "c.txt"]
        assert s.last_recovery is None or not s.last_recovery.watch_saved


class CtrlCAtRenameOnto(FaultBackend):
    """A real SIGINT right after each of the next ``armed`` renames onto a path ending
    ``name`` (a write's temp file put in place, then its undo's)."""

    armed = 0
    name = "a.txt"

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        if self.armed and dst.endswith(self.name):
            self.armed -= 1
            os.kill(os.getpid(), signal.SIGINT)


def test_file_change_interrupted_in_its_undo_is_not_committed_as_made(tmp_path, ctrl_c):
    """``f.write("a.txt", "new")``: a Ctrl-C right after its rename into place, and a
    second right after the undo's rename putting "old" back (before the FILE_RESTORED
    record).  The caller catches both and commits.  Before the fix the effect stayed the
    transaction's as made: the commit said a.txt was "new" (``at(commit)``), the disk held
    "old".  Now the commit refuses, and the transaction rolls back."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAtRenameOnto()
    with installed(fb), pytest.raises(walstore.WalstoreError, match="not recorded as made"):
        with s.transaction() as tx:
            fb.armed = 2
            try:
                try:
                    tx.files(ws).write("a.txt", "new\n")
                except KeyboardInterrupt:
                    raise  # (the second lands in the handler's undo, or here)
            except KeyboardInterrupt:
                pass
            assert fb.armed == 0
            tx.put("k", 1)
    assert (root / "a.txt").read_text() == "old\n" and s.get("k") is None
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "old\n" and s.get("k") is None
        assert s.last_recovery is None or not s.last_recovery.file_conflicts
