"""Audit 56, commitpoint: faults at the commit point and between it and the return, in
commits that carry actions.

Every test keeps "the outside world" in a real file of its own (``World``: one line per
charge and per compensator call, appended and fsynced), beside a real store; faults come
from ``tools.faults.FaultBackend`` (the ``walstore.fileio`` seam).  After each fault the
state, ``store.actions()`` and the world file must agree, in the same process and after
a reopen: a visible commit's action stands and was never compensated; an invisible one
was compensated exactly once, and recorded so.

Findings (each test named below fails on the code before its fix):

- A compensation that ran, but whose COMPENSATED record could not be written (ENOSPC,
  EIO on the WAL's write: the log goes on after a write error, only a failed fsync stops
  it), was left ``pending``: ``pending_compensations()`` listed it as owed,
  ``retry_compensations()`` and the next open ran the compensator a second time (a
  second refund), and CompensationFailed said it had not been recorded.  The outcome is
  known, so it is written once more; only when that write fails too is it left owed
  (``test_a_compensation_whose_record_write_fails_once_runs_once_and_is_recorded``:
  a rollback_to, a rollback, a revert).
- When that record's fsync failed instead (the record written, the store read-only),
  CompensationFailed said the compensations "stay owed and run again when the store is
  reopened": usually the record is there, and the next open runs nothing (under
  durability="normal" the same process even listed the action ``compensated`` beside that
  message).  It now says whether they were recorded is unknown, and that the next open
  runs them again unless their record reached the disk
  (``test_a_compensation_whose_record_fsync_fails_is_not_said_to_run_again_for_sure``).
- An error that is not the log's own (a MemoryError, an fsync call raising something other
  than OSError) coming out of the wait for a written COMMIT record's fsync was taken for
  "nothing committed": the transaction rolled back, logged an ABORT after its COMMIT and
  ran its refund, and the next open found the COMMIT standing: the order paid, its charge
  refunded, its action "compensated".  The outcome is unknown now: CommitOutcomeUnknown
  (the error chained), the store read-only, nothing compensated; the next open decides
  (``test_an_error_after_the_commit_record_was_written_never_compensates_a_commit``).
  So too one step earlier, under every durability: an error entering the appended
  COMMIT's event in the MemTable (or anything else between the record's append and the
  end of the append under the journal lock) rolled back and refunded a commit the next
  open found standing; ``Journal.append_commit`` and the pipeline now tell an error after
  the append (``CommitAppended``) from one before it
  (``test_an_error_entering_an_appended_commit_in_memory_never_compensates_it``).
- A compensator returned, and an error that is not the log's (a MemoryError) came out
  before its COMPENSATED record was written: the action was left ``pending``, and
  ``retry_compensations()`` or the next open refunded a second time.  It is recorded now,
  as after a KeyboardInterrupt at that point, and the error goes on
  (``test_an_error_between_a_compensators_return_and_its_record_does_not_rerun_it``).
"""
from __future__ import annotations

import errno
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402


class World:
    """The outside world: a file of what the agent did to it (charges, compensations)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def note(self, *what) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(list(what)) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def lines(self) -> list:
        try:
            with open(self.path, encoding="utf-8") as f:
                return [tuple(json.loads(x)) for x in f if x.strip()]
        except FileNotFoundError:
            return []

    def refunds(self, key: str) -> int:
        return sum(1 for x in self.lines() if x == ("refund", key))


@pytest.fixture
def fb():
    backend = FaultBackend()
    with installed(backend):
        yield backend


def _charge(world: World, tx, amount: int = 10):
    with tx.action("charge", args={"amount": amount}, compensate="refund") as act:
        world.note("charge", act.key)
        act.result = {"charged": amount}
    return act


# ---- a compensation's record whose write fails -------------------------------------------------
@pytest.mark.parametrize("how", ["rollback_to", "rollback", "revert"])
def test_a_compensation_whose_record_write_fails_once_runs_once_and_is_recorded(
        tmp_path, fb, how):
    world = World(tmp_path / "world")
    fail_next = []

    def refund(act):
        world.note("refund", act.key)
        if fail_next:  # the next WAL write is this compensation's record
            fb.fail("pwrite", errno.EIO, path="*.wal")
    path = str(tmp_path / "s")
    s = walstore.open(path, compensators={"refund": refund})
    try:
        if how == "rollback_to":
            with s.transaction() as tx:
                tx.put("kept", 1)
                sp = tx.savepoint("plan-a")
                act = _charge(world, tx)
                tx.put("paid", 1)
                fail_next.append(1)
                tx.rollback_to(sp)
        elif how == "rollback":
            tx = s.transaction()
            tx.put("paid", 1)
            act = _charge(world, tx)
            fail_next.append(1)
            tx.rollback()
        else:
            with s.transaction() as tx:
                act = _charge(world, tx)
                tx.put("paid", 1)
            fail_next.append(1)
            s.revert(tx.id)
        assert world.refunds(act.key) == 1
        assert s.get("paid") is None
        assert {a.id: a.state for a in s.actions()} == {act.id: "compensated"}
        assert s.pending_compensations() == []
        assert s.retry_compensations() == []
        assert world.refunds(act.key) == 1
    finally:
        s.close()
    with walstore.open(path, compensators={"refund": refund}) as s:
        assert world.refunds(act.key) == 1, world.lines()
        assert {a.id: a.state for a in s.actions()} == {act.id: "compensated"}
        assert s.get("paid") is None
        assert (s.get("kept") == 1) is (how == "rollback_to")


# ---- a compensation's record whose fsync fails ------------------------------------------------
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_compensation_whose_record_fsync_fails_is_not_said_to_run_again_for_sure(
        tmp_path, fb, durability):
    """The compensator ran; its COMPENSATED record was written but its fsync failed: the
    store turns read-only and whether the record is on disk is unknown until the next open.
    The error said the compensation "stays owed and runs again when the store is reopened";
    here the record did reach the file, and the next open finds it compensated and runs
    nothing (the refund stands once)."""
    world = World(tmp_path / "world")

    def refund(act):
        world.note("refund", act.key)
        fb.fail(("fsync", "fdatasync"), errno.EIO, path="*.wal")  # this one's record
    path = str(tmp_path / "s")
    s = walstore.open(path, durability=durability, compensators={"refund": refund})
    try:
        with pytest.raises(walstore.CompensationFailed) as ei:
            with s.transaction() as tx:
                tx.put("kept", 1)
                sp = tx.savepoint("plan-a")
                act = _charge(world, tx)
                tx.rollback_to(sp)
        msg = str(ei.value)
        assert act.id in msg and "read-only" in msg, msg
        assert "unless" in msg and "stay owed and run again" not in msg, msg
        assert world.refunds(act.key) == 1
    finally:
        s.close()
    fb.clear()
    with walstore.open(path, durability=durability, compensators={"refund": refund}) as s:
        assert {a.id: a.state for a in s.actions()} == {act.id: "compensated"}
        assert s.pending_compensations() == []
        assert world.refunds(act.key) == 1, world.lines()
        assert "kept" not in s


# ---- an unexpected error while the commit record waits for its fsync ---------------------------
def test_an_error_after_the_commit_record_was_written_never_compensates_a_commit(tmp_path, fb):
    """The COMMIT record is written; while the commit waits for its fsync an error that is
    not the log's own (a MemoryError, here raised by the fsync call) comes out.  It was
    taken for "nothing committed": the transaction rolled back, an ABORT was logged after
    the COMMIT, and the refund ran — while the next open found the COMMIT and showed the
    order paid, its action "compensated" (state and world disagreed).  Now the outcome is
    unknown (CommitOutcomeUnknown, the store read-only, nothing compensated) and the next
    open decides."""
    world = World(tmp_path / "world")
    path = str(tmp_path / "s")
    comp = {"refund": lambda act: world.note("refund", act.key)}
    s = walstore.open(path, compensators=comp)
    try:
        tx = s.transaction()
        act = _charge(world, tx)
        tx.put("paid", 1)
        rule = fb.fail(("fsync", "fdatasync"), path="*.wal", raises=MemoryError)
        with pytest.raises(walstore.CommitOutcomeUnknown) as ei:
            tx.commit()
        assert rule.fired == 1
        assert isinstance(ei.value.__cause__, MemoryError)
        assert ei.value.txid == tx.id and tx.state != "rolled back"
        assert world.refunds(act.key) == 0  # nothing compensated: the next open decides
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as t2:
                t2.put("later", 1)
    finally:
        s.close()
    fb.clear()
    with walstore.open(path, compensators=comp) as s:
        paid = s.get("paid")
        state = s.get_action(act.id).state
        assert (paid, state) in ((1, "committed"), (None, "compensated")), (paid, state)
        assert world.refunds(act.key) == (0 if paid == 1 else 1), world.lines()
        assert s.pending_compensations() == []


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_an_error_entering_an_appended_commit_in_memory_never_compensates_it(
        tmp_path, durability):
    """As above, one step earlier: the COMMIT record was appended (written to the file)
    and entering its event in the MemTable raised (a MemoryError, raised here by a profile
    hook at the call of ``MemTable.add``).  The commit rolled back and refunded; the next
    open found it committed.  Now: CommitOutcomeUnknown, nothing compensated."""
    world = World(tmp_path / "world")
    path = str(tmp_path / "s")
    comp = {"refund": lambda act: world.note("refund", act.key)}
    s = walstore.open(path, durability=durability, compensators=comp)
    try:
        tx = s.transaction()
        act = _charge(world, tx)
        tx.put("paid", 1)
        fired = []

        def hook(frame, event, arg):
            if (event == "call" and not fired and frame.f_code.co_name == "add"
                    and frame.f_code.co_filename.endswith("memtable.py")
                    and frame.f_back.f_code.co_name == "append_commit"):
                fired.append(1)
                sys.setprofile(None)
                raise MemoryError("injected: entering the COMMIT's event")
        sys.setprofile(hook)
        try:
            with pytest.raises(walstore.CommitOutcomeUnknown) as ei:
                tx.commit()
        finally:
            sys.setprofile(None)
        assert fired and isinstance(ei.value.__cause__, MemoryError)
        assert world.refunds(act.key) == 0 and tx.state != "rolled back"
    finally:
        s.close()
    with walstore.open(path, durability=durability, compensators=comp) as s:
        assert s.get("paid") == 1  # the record was written: the next open finds it
        assert s.get_action(act.id).state == "committed"
        assert world.refunds(act.key) == 0, world.lines()
        assert s.pending_compensations() == []


# ---- an error between a compensator's return and its record -----------------------------------
@pytest.mark.parametrize("how", ["revert", "rollback"])
def test_an_error_between_a_compensators_return_and_its_record_does_not_rerun_it(
        tmp_path, how):
    """The refund returned; before its COMPENSATED record was written an error that is not
    the log's came out (a MemoryError, raised here by a profile hook at the call of
    ``Saga._record_compensated``).  The action was left ``pending``: listed owed, and
    ``retry_compensations()`` (or the next open) refunded a second time.  It is recorded
    now (as after a KeyboardInterrupt there) and the error goes on."""
    world = World(tmp_path / "world")
    path = str(tmp_path / "s")
    comp = {"refund": lambda act: world.note("refund", act.key)}
    s = walstore.open(path, compensators=comp)
    try:
        tx = s.transaction()
        act = _charge(world, tx)
        tx.put("paid", 1)
        if how == "revert":
            tx.commit()
        fired = []

        def hook(frame, event, arg):
            if (event == "call" and not fired
                    and frame.f_code.co_name == "_record_compensated"):
                fired.append(1)
                sys.setprofile(None)
                raise MemoryError("injected: before the compensation's record")
        sys.setprofile(hook)
        try:
            with pytest.raises(MemoryError):
                s.revert(tx.id) if how == "revert" else tx.rollback()
        finally:
            sys.setprofile(None)
        assert fired and world.refunds(act.key) == 1
        assert s.get_action(act.id).state == "compensated"
        assert s.pending_compensations() == []
        s.retry_compensations()
        assert world.refunds(act.key) == 1
    finally:
        s.close()
    with walstore.open(path, compensators=comp) as s:
        assert world.refunds(act.key) == 1, world.lines()
        assert s.get_action(act.id).state == "compensated"
        assert s.get("paid") is None
