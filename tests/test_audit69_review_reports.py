"""Audit 69, review of the reports fixes (``errors.type_and_message``, the action row's
``raised``, ``Saga.owed_now``, the ``map_size`` meta row, ``ops.backup.named_at_dest``).
"""
from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import walstore
from tests.test_audit69_reports import _in_thread
from tests.test_audit70_reports import backup_owing_an_erasure
from tools.faults import FaultBackend, installed
from walstore.cli import main


# ---- retry_compensations beside a rollback: a compensation that failed is owed -----------
def test_retry_compensations_lists_a_rollbacks_failed_compensation_as_owed(tmp_path):
    """A rollback undoes two charges: the newer one's refund fails for good (``failed``),
    then it runs the older one's (held on an Event).  Another thread's
    ``retry_compensations()`` meanwhile returned [] — the failed refund, still reserved by
    the rollback until its end, was taken for "being decided" — while
    ``pending_compensations()`` listed it, and nothing will run it again: the rollback
    has settled it.  Only the refund running now is left out."""
    started, go = threading.Event(), threading.Event()

    def refund_slow(action):
        started.set()
        assert go.wait(10)

    def refund_broken(action):
        raise RuntimeError("down")
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"slow": refund_slow, "broken": refund_broken})
    try:
        def rolled_back():
            with s.transaction() as tx:
                with tx.action("first", compensate="slow"):
                    pass
                with tx.action("second", compensate="broken"):
                    pass
                tx.rollback()
        a, out = _in_thread(rolled_back)
        assert started.wait(10)
        try:
            owed = s.retry_compensations()
            pending = s.pending_compensations()
        finally:
            go.set()
            a.join(10)
        assert isinstance(out.get("error"), walstore.CompensationFailed), out
        assert {x.id: x.state for x in pending}["1.2"] == "failed"
        assert [(x.id, x.state) for x in owed] == [("1.2", "failed")]
        assert [(x.id, x.state) for x in s.retry_compensations()] == [("1.2", "failed")]
    finally:
        go.set()
        s.close()


# ---- an empty message left out of the one place the helper missed --------------------------
def test_a_revert_stopped_by_a_bare_memoryerror_says_the_type_alone(tmp_path):
    """A revert committed, then walstore's own error (a bare ``MemoryError()``, as at a
    memory limit, raised here by a profile hook at the first compensation's record)
    stopped its compensations.  CompensationFailed said "but MemoryError () stopped its
    compensations" — the one "Type (message)" the stop-69 helper (``type_and_message``)
    did not reach; now "but an error (MemoryError) stopped ..."."""
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"refund": lambda act: None})
    try:
        with s.transaction() as tx:
            for n in range(2):
                with tx.action("charge", args={"n": n}, compensate="refund"):
                    pass
            tx.put("paid", 1)
        fired = []

        def hook(frame, event, arg):
            if event == "call" and not fired and frame.f_code.co_name == "_record_compensated":
                fired.append(1)
                sys.setprofile(None)
                raise MemoryError()
        sys.setprofile(hook)
        try:
            with pytest.raises(walstore.CompensationFailed) as got:
                s.revert(tx.id)
        finally:
            sys.setprofile(None)
        text = str(got.value)
        assert fired and "stopped its compensations" in text, text
        assert "but an error (MemoryError) stopped" in text and "MemoryError ()" not in text, text
    finally:
        s.close()


# ---- a failed backup: the staged copy's own errors are the backup's -----------------------
def test_a_backup_that_failed_finishing_a_purges_erasure_says_the_backup_failed(tmp_path):
    """The source owes a purge's erasure (its writer killed -9 between the purge's commit
    and its compacting checkpoint); the backup finishes it in its staged copy, and the
    swap of that copy's rewritten data.mdb fails (ENOSPC).  The error named the staged
    path, so it held the word "backup" ("DEST.incomplete-backup-..."): taken for one of the
    backup's own messages, it came out as the staged store's — "... the erasure stays owed:
    the next checkpoint or writable open tries again", of a copy already removed, with no
    word that nothing was left at DEST (and through the API none that a backup failed:
    ``named_at_dest``).  Now "writing the backup's LMDB copy without the bytes a purge
    erased failed (...); the partial copy was removed" (audit 70: it said "writing the
    backup failed (swapping in ... failed: ...)" after "backup failed: ")."""
    r, dest = backup_owing_an_erasure(tmp_path, "rename",
                                      "*incomplete-backup-*/db.compact/data.mdb")
    line = r.stderr.strip()
    assert r.exit_code == 1, (r.exit_code, line)
    assert "incomplete-backup" not in line, line
    assert "writing the backup's LMDB copy without the bytes a purge erased failed (" in line, \
        line
    assert "the partial copy was removed" in line, line
    assert not os.path.exists(dest)


def test_retry_compensations_beside_one_that_ended_and_was_trimmed_raises_nothing(tmp_path):
    """Thread A runs the refund; thread B's ``retry_compensations()`` lists it owed while it
    runs, then A's refund ends and a checkpoint trims its row (retention 1) before B looks
    at it again (made certain by a profile hook at B's second look at what runs).  B
    raised UnknownAction ("no action '1.1'") out of a call that names no action
    (``owed_now`` read the row again with ``shown_action``); an action whose row is gone
    is settled: not owed."""
    started, go = threading.Event(), threading.Event()
    s = walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=1)
    try:
        with pytest.raises(ValueError):
            with s.transaction() as tx:
                with tx.action("charge", compensate="refund"):
                    raise ValueError("declined")

        def refund(action):
            started.set()
            assert go.wait(10)
        with pytest.warns(RuntimeWarning):
            s.compensator("refund")(refund)
        a, out = _in_thread(s.retry_compensations)
        assert started.wait(10)
        looks = []

        def hook(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_busy":
                looks.append(1)
                if len(looks) == 2:
                    sys.setprofile(None)
                    go.set()
                    a.join(10)
                    for i in range(3):
                        with s.transaction() as tx:
                            tx.put(f"k{i}", i)
                    s.checkpoint()
        sys.setprofile(hook)
        try:
            owed = s.retry_compensations()
        finally:
            sys.setprofile(None)
            go.set()
            a.join(10)
        assert len(looks) == 2 and out == {"value": []}, (looks, out)
        assert owed == [] and s.actions() == []
    finally:
        go.set()
        s.close()


def test_the_guide_says_what_retry_compensations_returns_beside_a_rollback():
    """The GUIDE said another thread's ``retry_compensations()`` beside a rollback left its
    compensations to it "(listed still owed)"; since audit 69's ``owed_now`` they are not
    listed while the rollback is still to run them (the tests above): it says so."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "GUIDE.md").read_text()
    text = " ".join(guide.split())
    assert "(listed still owed)" not in text
    assert ("not in the list of still owed it returns, while that thread is still to run "
            "them; one it settled as `failed`, or has no compensator for, is listed") in text


def test_the_cli_doc_says_where_stats_reads_the_map_size():
    """docs/CLI.md said `walstore stats`'s ``lmdb_map_size`` is "the map size recorded in
    db/data.mdb (the last writer's)": that record is the largest map any writer ever
    had (LMDB persists only increases), and since audit 69 stats reads the writer's note
    (the meta row ``map_size``, test_stats_of_a_store_says_its_writers_map_size)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    text = " ".join(doc.split())
    assert "recorded in `db/data.mdb` (the last writer's)" not in text
    assert "the map size the writer noted in LMDB (the `meta` row `map_size`" in text


def test_a_failed_backup_under_debug_still_shows_where_the_copy_failed(tmp_path):
    """`walstore --debug backup` on a full disk: the traceback ended at ``backup``'s
    ``raise named from None`` (``named_at_dest`` made a new error and dropped the OS
    error's frames with its message), so --debug, which is there to show where, showed
    nowhere.  The frames are kept (not the chained message): down to the copy of the WAL
    segment."""

    src, dest = str(tmp_path / "s"), str(tmp_path / "dest")
    with walstore.open(src, durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    fb = FaultBackend()
    fb.fail("pwrite", error=errno.ENOSPC, path="*incomplete-backup-*", times=None)
    with installed(fb):
        r = CliRunner().invoke(main, ["--debug", "backup", src, dest])
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    assert "in _attempt" in r.stderr, r.stderr
    assert "incomplete-backup" not in r.stderr, r.stderr
    assert r.stderr.count("No space left on device") == 2, r.stderr  # (the error, the line)
