"""Findings of stop 54 in the agent layer (contract, "Action rollback" and "External side
effects"), each named after the promise it broke.  Crash cases use real processes killed
with -9; concurrency cases real threads, synchronised by events."""
from __future__ import annotations

import os
import threading

import pytest

import walstore


# ---- compensations run newest first, even beside another thread's retry_compensations ----

def _blocking_refund(seen: list, root: str | None = None):
    """A compensator noting (action id, thread, the file ``root``/f then) that blocks in
    the newest action's (args 3) until ``release`` is set; ``started`` says it blocks."""
    started, release = threading.Event(), threading.Event()

    def refund(action):
        content = None
        if root is not None and os.path.exists(os.path.join(root, "f")):
            with open(os.path.join(root, "f")) as f:
                content = f.read()
        seen.append((action.id, threading.current_thread().name, content))
        if action.args == 3:
            started.set()
            release.wait(10)
    return refund, started, release


def _retry_beside(store, started: threading.Event, release: threading.Event, ran: list
                  ) -> threading.Thread:
    """A thread that calls store.retry_compensations() once the newest refund is under
    way, then lets it go on."""
    def other():
        try:
            assert started.wait(10)
            ran.append([a.id for a in store.retry_compensations()])
        finally:
            release.set()
    t = threading.Thread(target=other, name="other")
    t.start()
    return t


def test_a_rollbacks_compensations_are_not_run_early_by_another_threads_retry(tmp_path):
    # Before: the ABORT makes the rolled-back transaction's actions owed (pending), and
    # another thread's store.retry_compensations() ran the older ones at once, while the
    # rollback was still compensating the newest: out of order, and before the file
    # changes between them were put back (a refund saw the file as the rolled-back
    # transaction had left it); the rollback then passed over the one running elsewhere
    # and could return before its outcome was known.  Now the rollback's thread reserves
    # its actions' compensations: the other thread leaves them to it.
    root = str(tmp_path / "ws")
    os.mkdir(root)
    seen: list = []
    refund, started, release = _blocking_refund(seen, root)
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        ws = s.workspace(root)
        tx = s.transaction()
        f = tx.files(ws)
        for n in (1, 2, 3):
            f.write("f", f"v{n}")
            with tx.action("charge", args=n, compensate="refund"):
                pass
        ran: list = []
        t = _retry_beside(s, started, release, ran)
        tx.rollback()
        t.join(10)
        assert not t.is_alive()
        # newest first, each between the file changes, all on the rollback's thread
        assert seen == [(f"{tx.id}.3", "MainThread", "v3"), (f"{tx.id}.2", "MainThread", "v2"),
                        (f"{tx.id}.1", "MainThread", "v1")]
        assert [a.state for a in s.actions()] == ["compensated"] * 3
        assert not os.path.exists(os.path.join(root, "f"))


def test_an_undos_compensations_are_not_run_early_by_another_threads_retry(tmp_path):
    # The same for a revert: its COMMIT claims the actions (pending from then on), and the
    # other thread's retry ran the two older refunds while the revert ran the newest.
    seen: list = []
    refund, started, release = _blocking_refund(seen)
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
            for n in (1, 2, 3):
                with tx.action("charge", args=n, compensate="refund"):
                    pass
        ran: list = []
        t = _retry_beside(s, started, release, ran)
        undo = s.revert(tx.id)
        t.join(10)
        assert not t.is_alive()
        assert undo is not None and s.get("k") is None
        assert seen == [(f"{tx.id}.{n}", "MainThread", None) for n in (3, 2, 1)]
        assert [a.state for a in s.actions()] == ["compensated"] * 3
        # and a later retry (nothing reserved any more) finds nothing owed
        assert s.retry_compensations() == []


def test_a_dry_run_refuses_as_the_real_undo_does_when_a_prepared_transaction_holds_a_key(
        tmp_path):
    """A key the undo would put back is held by a prepared (in-doubt) transaction: the
    real revert and rewind raise ConflictError; their dry runs returned a plan as if they
    could run (probe-audit54).  Now the dry run raises the same, and changes nothing."""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        with s.transaction() as t1:
            t1.put("k", 1)
            t1.put("j", 1)
        s.restore_point("p")
        with s.transaction() as t2:
            t2.put("k", 5)
        held = s.transaction()
        held.put("k", 2)
        held.prepare("g")
        for call in (lambda **kw: s.revert(t2.id, **kw), lambda **kw: s.rewind("p", **kw)):
            with pytest.raises(walstore.ConflictError, match="held by prepared"):
                call()
            with pytest.raises(walstore.ConflictError, match="dry run.*held by prepared"):
                call(dry_run=True)
        assert s["k"] == 5 and s.prepared() == ["g"]
        s.rollback_prepared("g")
        plan = s.rewind("p", dry_run=True)  # (free again: the plan, and the real call)
        assert plan.txids == [t2.id]
        s.rewind("p")
        assert s["k"] == 1
    finally:
        s.close()
