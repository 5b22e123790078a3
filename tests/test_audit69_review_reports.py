"""Audit 69, review of the reports fixes (``errors.type_and_message``, the action row's
``raised``, ``Saga.owed_now``, the ``map_size`` meta row, ``ops.backup.named_at_dest``).
"""
from __future__ import annotations

import threading

import pytest

import walstore
from tests.test_audit69_reports import _in_thread


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
    import sys
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
