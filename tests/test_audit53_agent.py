"""Findings of stop 53 in the agent layer (contract, "Action rollback" and "External side
effects"), each named after the promise it broke.  Crash cases use real processes killed
with -9; disk faults come from tools/faults.py's FaultBackend (ENOSPC on the WAL, real
files); the CLI runs as a real process of this checkout."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import walstore

from store_support import cli_env

WALSTORE = [sys.executable, "-m", "walstore"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(WALSTORE + list(args), capture_output=True, text=True, timeout=120,
                          env=cli_env())


# ---- `walstore actions`: an action of a prepared (in-doubt) transaction --------------------

PREPARED_THEN_KILLED = textwrap.dedent(r"""
    import os, signal, sys, walstore
    s = walstore.open(sys.argv[1], durability="full")
    tx = s.transaction()
    tx.put("order/1", "paid")
    with tx.action("charge", compensate="refund") as act:
        act.result = {"charge": 1}
    tx.prepare("G53")
    print(act.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("killed", [False, True], ids=["writer-alive", "after-kill-9"])
def test_actions_says_an_in_doubt_actions_transaction_is_prepared_not_that_it_is_owed(
        tmp_path, killed):
    # Before: `walstore actions` listed the charge of a prepared transaction as STATE
    # "pending" with an empty LAST ERROR — the words it uses for a compensation owed and
    # not run — while `walstore actions --pending` (and `recover`) listed nothing owed: an
    # operator could not tell from the table that the transaction was in doubt, nor which
    # gid `commit-prepared` / `rollback-prepared` had to decide.  The row now says so (the
    # action's ``error``, as a crashed transaction's "did not commit before a crash").
    path = str(tmp_path / "s")
    if killed:
        proc = subprocess.run([sys.executable, "-c", PREPARED_THEN_KILLED, path],
                              capture_output=True, text=True, timeout=120, env=cli_env())
        assert proc.returncode == -9, proc.stderr
        action_id = proc.stdout.strip()
        owner = None
    else:
        owner = walstore.open(path)
        tx = owner.transaction()
        tx.put("order/1", "paid")
        with tx.action("charge", compensate="refund") as act:
            act.result = {"charge": 1}
        tx.prepare("G53")
        action_id = act.id
    try:
        out = _cli("actions", path)
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if line.startswith(action_id))
        assert "prepared" in row and "G53" in row, out.stdout
        doc = json.loads(_cli("actions", path, "--json").stdout)["actions"][0]
        assert doc["in_flight"] is True and "G53" in doc["error"], doc
        assert _cli("actions", path, "--pending").returncode == 0  # (still not owed)
        if owner is not None:  # (the Python API says the same, get_action too)
            [a] = owner.actions()
            assert a.in_flight and "G53" in a.error and not a.owed
            one = owner.get_action(action_id)
            assert one.in_flight and "G53" in one.error and not one.owed
        else:
            with walstore.open(path, readonly=True) as reader:
                one = reader.get_action(action_id)
                assert one.in_flight and "G53" in one.error and not one.owed
    finally:
        if owner is not None:
            owner.rollback_prepared("G53")
            owner.close()


# ---- a rollback whose compensation's outcome cannot be recorded still puts back every file -

def test_a_rollback_puts_back_older_files_when_a_compensations_record_fails(tmp_path):
    # Before: a transaction changed f1, ran a charge, changed f2, and rolled back; the
    # refund ran but its COMPENSATED record hit ENOSPC (the log goes on: the store stays
    # writable).  The record's error left AgentHooks.undo at once: f2 (newer) was back,
    # f1 (older than the charge) never tried — it kept the rolled-back transaction's
    # bytes beside a state that said it never happened, until the next open.  Now the
    # undo goes on past it (as it does past a compensation that fails) and raises it
    # once every path is back; the refund stays owed and runs again at the next open,
    # with the same idempotency key.
    import errno
    from tools.faults import FaultBackend, installed

    ws_dir = tmp_path / "ws"
    ws_dir.mkdir()
    path = str(tmp_path / "s")
    fb = FaultBackend()
    refunds = []

    def refund(action):
        refunds.append(action.key)
        fb.fail("pwrite", errno.ENOSPC, path="*.wal", times=4)  # (this refund's record,
        # twice, each with its scrub: audit 56 writes a record whose write failed once more)

    with installed(fb):
        s = walstore.open(path, compensators={"refund": refund})
        try:
            ws = s.workspace(str(ws_dir))
            with s.transaction() as tx:
                tx.files(ws).write("f1", "orig1")
                tx.files(ws).write("f2", "orig2")
                tx.put("k", 0)
            with pytest.raises(walstore.WalstoreError) as got:
                with s.transaction() as tx:
                    tx.put("k", 1)
                    tx.files(ws).write("f1", "new1")
                    with tx.action("charge", compensate="refund") as act:
                        act.result = {"charge": 1}
                    tx.files(ws).write("f2", "new2")
                    raise ValueError("the agent failed")
            assert isinstance(got.value, walstore.CompensationFailed), repr(got.value)
            assert got.value.action_ids == [act.id]
            assert (ws_dir / "f2").read_text() == "orig2"
            assert (ws_dir / "f1").read_text() == "orig1"  # (was "new1")
            assert s.get("k") == 0 and len(refunds) == 1
            assert [a.id for a in s.pending_compensations()] == [act.id]  # owed, listed
        finally:
            s.close()
    with walstore.open(path, compensators={"refund": refund}) as s:
        assert [a.state for a in s.actions()] == ["compensated"]
        assert refunds == [act.key, act.key]  # (run again: its outcome was never recorded)
        assert (ws_dir / "f1").read_text() == "orig1" and s.get("k") == 0


def test_resolve_of_an_in_doubt_action_says_why_and_names_the_gid(tmp_path):
    # Before: `walstore resolve` (and store.resolve) of the charge of a prepared
    # transaction said "action 1.1 is pending (its transaction is still open); only
    # pending or failed compensations can be resolved": refused for being what it says
    # may be resolved, and not a word of the gid in doubt.  An open transaction's action
    # (a live writer's) said the same.
    path = str(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-c", PREPARED_THEN_KILLED, path],
                          capture_output=True, text=True, timeout=120, env=cli_env())
    assert proc.returncode == -9, proc.stderr
    action_id = proc.stdout.strip()
    out = _cli("resolve", path, action_id)
    assert out.returncode == 1, out.stderr
    assert "G53" in out.stderr and "is pending" not in out.stderr, out.stderr
    with walstore.open(path) as s:
        with pytest.raises(walstore.WalstoreError, match="G53") as got:
            s.resolve(action_id)
        assert "is pending" not in str(got.value)
        tx = s.transaction()
        with tx.action("charge", compensate="refund") as act:
            pass
        with pytest.raises(walstore.WalstoreError, match="still open") as got:
            s.resolve(act.id)
        assert "is pending" not in str(got.value)
        tx.rollback()
        s.rollback_prepared("G53")
        assert s.get_action(action_id).state == "pending"  # (owed now: resolvable)
        assert s.resolve(action_id).state == "resolved"


# ---- rollback_to a savepoint: a compensation whose outcome was not recorded stays owed --

@pytest.mark.parametrize("outcome", ["compensated", "failed"])
def test_an_unrecorded_compensation_after_rollback_to_stays_owed_once_the_transaction_commits(
        tmp_path, outcome):
    # Before: rollback_to a savepoint taken before a charge ran its refund, whose outcome
    # record (COMPENSATED, or FAILED after 3 tries) hit ENOSPC; CompensationFailed said
    # "they stay owed and run again ... when the store is reopened".  But the action
    # object kept the unrecorded state in memory, so the transaction's COMMIT left it out
    # of the actions it makes owed (``crossed``): its row stayed in flight for good —
    # listed "pending", in no pending_compensations(), never run again at any open, and
    # refused by resolve.  For a refund that kept failing, the charge stood and nothing
    # said so.  An unrecorded outcome now leaves the action pending (owed), as the
    # message says.
    import errno
    from tools.faults import FaultBackend, installed

    path = str(tmp_path / "s")
    fb = FaultBackend()
    tries = []

    def refund(action):
        tries.append(action.key)
        if outcome == "compensated" or len(tries) == 3:
            fb.fail("pwrite", errno.ENOSPC, path="*.wal", times=4)  # (its outcome's record, twice, with scrubs)
        if outcome == "failed":
            raise RuntimeError("the refund API is down")

    with installed(fb):
        s = walstore.open(path, compensators={"refund": refund})
        try:
            tx = s.transaction()
            tx.put("k", 1)
            sp = tx.savepoint()
            with tx.action("charge", compensate="refund") as act:
                act.result = {"charge": 1}
            with pytest.raises(walstore.CompensationFailed, match="could not be recorded"):
                tx.rollback_to(sp)
            tx.commit()
            assert [a.id for a in s.pending_compensations()] == [act.id]
        finally:
            s.close()
    ran = []
    with walstore.open(path, compensators={"refund": lambda a: ran.append(a.key)}) as s:
        assert ran == [act.key]  # (run again, with the same idempotency key)
        assert s.get_action(act.id).state == "compensated" and s.get("k") == 1


# ---- a dry run beside a trimming checkpoint ----------------------------------------------

@pytest.mark.parametrize("verb", ["rewind", "revert"])
def test_a_dry_run_is_not_cut_short_by_a_trim_while_it_plans(tmp_path, verb):
    # Before: a dry run (rewind or revert) pinned no history, as the real undo does
    # (walstore.engine.pins): a checkpoint's retention trim in the same process while it
    # planned moved the horizon past the history it read, and the dry run raised
    # SnapshotTooOld — a ConflictError saying "this transaction's snapshot ... retry it",
    # of a dry run that has no transaction (seen: dry runs in a loop beside a writer
    # checkpointing with retain_transactions=5).  It now holds history as the undo does,
    # and returns the plan as of its snapshot.
    from tools.faults import FaultBackend, installed

    s = walstore.open(str(tmp_path / "s"), retain_transactions=2)
    try:
        for i in range(3):
            with s.transaction() as tx:
                tx.put("k", i)
        point = tx.id
        with s.transaction() as tx:
            tx.put("k", 99)
        target = tx.id

        def trim(_name):  # (a checkpoint in the middle of the plan, enough commits after
            for i in range(6):  # the point for the trim to pass it)
                with s.transaction() as t:
                    t.put("other", i)
            s.checkpoint()

        fb = FaultBackend()
        fb.at_point("undo.resolved", trim)
        with installed(fb):
            if verb == "rewind":
                plan = s.rewind(point, dry_run=True)
            else:
                plan = s.revert(target, dry_run=True)
        assert plan.txids == [target] and plan.keys == ["k"], plan
    finally:
        s.close()


def test_an_action_without_compensation_undone_by_rollback_to_is_settled_when_its_record_fails(
        tmp_path):
    # Before: rollback_to a savepoint taken before an action declaring no compensation
    # records it "resolved"; when that record hit ENOSPC, the transaction's COMMIT (which
    # names only crossed actions with a compensation) left its row in flight for good:
    # listed "pending" at every open, its row kept through every trim, and resolve
    # refused it saying its transaction "is still open" — committed long ago.  The
    # COMMIT now names it too, and settles it "resolved" (nothing is owed for it).
    import errno
    from tools.faults import FaultBackend, installed

    path = str(tmp_path / "s")
    fb = FaultBackend()
    with installed(fb):
        s = walstore.open(path)
        try:
            tx = s.transaction()
            tx.put("k", 1)
            sp = tx.savepoint()
            with tx.action("notify", compensate=None) as act:
                act.result = 1
            fb.fail("pwrite", errno.ENOSPC, path="*.wal", times=4)  # (its "resolved" record, twice, with scrubs)
            with pytest.raises(walstore.WalstoreError):
                tx.rollback_to(sp)
            tx.commit()
            [a] = s.actions()
            assert (a.state, a.in_flight) == ("resolved", False), a
            assert s.pending_compensations() == []
        finally:
            s.close()
    with walstore.open(path) as s:
        [a] = s.actions()
        assert (a.state, a.in_flight) == ("resolved", False), a
        assert s.get("k") == 1


CHARGE_BETWEEN_FILES_THEN_KILLED = textwrap.dedent(r"""
    import os, signal, sys, walstore
    s = walstore.open(sys.argv[1], durability="full")
    ws = s.workspace(sys.argv[2])
    with s.transaction() as tx:
        tx.files(ws).write("f1", "orig1")
        tx.files(ws).write("f2", "orig2")
        tx.put("k", 0)
    tx = s.transaction()
    tx.put("k", 1)
    tx.files(ws).write("f1", "new1")
    with tx.action("charge", compensate="refund") as act:
        act.result = {"charge": 1}
    tx.files(ws).write("f2", "new2")
    print(act.key, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_recovery_puts_back_older_files_when_a_compensations_record_fails(tmp_path):
    # Before: the open after a kill -9 undid the crashed transaction newest first; the
    # refund ran, its record hit ENOSPC, and the open raised at once: f2 was back, f1
    # (older than the charge) still held the crashed transaction's bytes until some
    # later open succeeded.  The open now puts back every path, then raises.
    import errno
    from tools.faults import FaultBackend, installed

    ws_dir = tmp_path / "ws"
    ws_dir.mkdir()
    path = str(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-c", CHARGE_BETWEEN_FILES_THEN_KILLED, path,
                           str(ws_dir)], capture_output=True, text=True, timeout=120,
                          env=cli_env())
    assert proc.returncode == -9, proc.stderr
    key = proc.stdout.strip()
    fb = FaultBackend()
    refunds = []

    def refund(action):
        refunds.append(action.key)
        fb.fail("pwrite", errno.ENOSPC, path="*.wal", times=4)  # (its outcome's record, twice, with scrubs)

    with installed(fb):
        with pytest.raises(walstore.CompensationFailed, match="could not be recorded"):
            walstore.open(path, compensators={"refund": refund})
    assert (ws_dir / "f2").read_text() == "orig2"
    assert (ws_dir / "f1").read_text() == "orig1"  # (was "new1")
    with walstore.open(path, compensators={"refund": refund}) as s:
        assert refunds == [key, key]  # (run again: its outcome was never recorded)
        assert [a.state for a in s.actions()] == ["compensated"] and s.get("k") == 0
        assert (ws_dir / "f1").read_text() == "orig1"
