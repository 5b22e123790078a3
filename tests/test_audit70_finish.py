"""Audit 70: ``Transaction.finish_if_decided()`` beside the prepared transaction's own
end in another thread.

``finish_if_decided`` (the Zope data manager asks it before it reads the state) finished
a prepared transaction whose gid it found decided, taking no end lock and not looking at
``_ending``: while another thread's ``rollback()`` of it was under way — its
ROLLBACK_PREPARED durable, its compensations and file put-backs still running — it set
the state to "rolled back" with the workspace file still holding the prepared content
and the compensation not yet run; while another thread's ``commit()`` was between its
decision and its own finish, the transaction was finished twice.  Each test below fails
on the code before the fix; two real threads, a real store, the pause made by a
compensator held on an Event or by a trace hook at a chosen line (as
tests/test_audit58_twophase.py does).
"""
from __future__ import annotations

import inspect
import sys
import threading

import walstore
from walstore.engine.transaction import Transaction


def test_a_rollback_under_way_reads_rolled_back_only_once_its_undo_is_done(tmp_path):
    """Before the fix: while the rollback's compensator ran (the file not yet put back),
    another thread's ``finish_if_decided()`` returned "rolled back", ``tx.state`` read
    "rolled back" and the file still held "prepared"."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "f").write_text("before")
    entered, release = threading.Event(), threading.Event()

    def refund(action):
        entered.set()
        assert release.wait(20)

    with walstore.open(str(tmp_path / "s"), compensators={"refund": refund}) as s:
        ws = s.workspace(str(root))
        tx = s.transaction()
        tx.files(ws).write("f", "prepared")
        with tx.action("charge", args=1, compensate="refund"):
            pass  # (the newest effect: compensated before the file goes back)
        tx.prepare("G")
        errors: list = []

        def roll_back():
            try:
                tx.rollback()
            except BaseException as e:  # (kept for the assertion below)
                errors.append(e)
        t = threading.Thread(target=roll_back, name="rolling-back")
        t.start()
        try:
            assert entered.wait(20)
            seen = (tx.finish_if_decided(), tx.state, (root / "f").read_text())
        finally:
            release.set()
            t.join(20)
        assert not t.is_alive() and errors == []
        assert seen == ("active", "active", "prepared")
        assert (tx.state, (root / "f").read_text()) == ("rolled back", "before")
        assert tx.finish_if_decided() == "rolled back"
        assert s.pending_compensations() == [] and s.prepared() == []


def test_a_commit_under_way_is_finished_once_by_its_own_call(tmp_path):
    """Before the fix: a trace hook pausing ``commit()`` between its decision
    (``commit_prepared`` returned) and its ``_finish(COMMITTED)`` let another thread's
    ``finish_if_decided()`` finish the transaction — then the commit finished it again:
    two ``_finish`` calls (its ``effects_ended`` hook told twice)."""
    lines, first = inspect.getsourcelines(Transaction._commit)
    decided = next(i for i, text in enumerate(lines)
                   if "self._hooks.commit_prepared(self.gid)" in text)
    pause = first + next(i for i in range(decided, len(lines))
                         if "self._finish(COMMITTED)" in lines[i])
    with walstore.open(str(tmp_path / "s")) as s:
        tx = s.transaction()
        tx.put("k", 1)
        tx.prepare("G")
        finishes: list = []
        other: list = []

        def count(frame, event, arg):  # (each thread's own: ``_finish`` calls on ``tx``)
            if (event == "call" and frame.f_code is Transaction._finish.__code__
                    and frame.f_locals.get("self") is tx):
                finishes.append(threading.current_thread().name)
            return None

        def ask():
            sys.settrace(count)
            try:
                other.append(tx.finish_if_decided())
            finally:
                sys.settrace(None)

        def at_the_pause(frame, event, arg):
            if event == "line" and frame.f_lineno == pause and not other:
                th = threading.Thread(target=ask, name="asking")
                th.start()
                th.join(20)
            return at_the_pause

        def tracer(frame, event, arg):
            if frame.f_code is Transaction._commit.__code__:
                return at_the_pause
            return count(frame, event, arg)

        sys.settrace(tracer)
        try:
            lsn = tx.commit()
        finally:
            sys.settrace(None)
        assert other == ["active"]  # (the commit under way finishes it, not this call)
        assert finishes == ["MainThread"]
        assert tx.state == "committed" and tx.lsn == lsn
        assert tx.finish_if_decided() == "committed"
        assert s.get("k") == 1
