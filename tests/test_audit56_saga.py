"""Audit 56, saga: compensations across rollbacks, undos, two-phase decisions and crashes.

Findings (each test named below fails on the code before its fix):

- Two callers resolving one owed action at once: the second was refused with "action
  X's compensation is running now; it cannot be resolved by hand meanwhile" — no
  compensation ran, nor would; the first caller's resolve was under way.  It says so
  now: being resolved by another caller, nothing changed by this one
  (``test_a_second_resolve_of_one_action_says_another_resolve_holds_it``).
- The README's own form, ``@store.compensator("refund")`` after ``walstore.open``, said
  its refund runs "on rollback, and after a crash": after a kill -9 the reopened store's
  recovery had no compensator yet, left the refund pending, and registering it afterwards
  ran nothing and said nothing — the charge stood for good unless someone thought of
  ``retry_compensations()``.  Registering a compensator with compensations owed to it now
  warns (RuntimeWarning naming them and ``store.retry_compensations()``); they are not
  run implicitly (one name at a time would break newest first across names); README and
  GUIDE say where a crash's compensations run
  (``test_a_compensator_registered_after_a_crash_says_what_it_is_owed``; not of those a
  rollback under way in another thread runs in its turn:
  ``test_registering_beside_a_running_rollback_does_not_warn_of_its_compensations``).
- A rollback whose store was closed under it (a compensator, or another thread, calling
  ``store.close()``) raised CompensationFailed saying the older compensations "did not
  run (the store turned read-only)": it had not (no disk error, nothing read-only); it
  says the store was closed now, and they run at the next open, once each
  (``test_compensations_cut_short_by_close_say_the_store_was_closed``).
- (stop 57) ``rollback_prepared`` reserved its actions' compensations only once its
  undo began: its decision makes them owed, and another thread's
  ``retry_compensations()`` in between ran them itself — out of order with the file
  changes, and ``rollback_prepared`` returned before any refund was made.  They are
  reserved with the decision, in its deferred section (stop 56's first fix reserved them
  before it, an interruptible step more, and was reverted)
  (``test_rollback_prepared_runs_its_own_compensations_beside_another_threads_retry``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings

import pytest

import walstore
from walstore import fileio


class _OnFsync(fileio.OSBackend):
    """While armed, the main thread's first fsync (the WAL's, of the call under test)
    first runs ``then`` to its end (in another thread, joined).  (Any thread's, before:
    the store's own background threads — the spare segment's fill, begun at open —
    could take it first under load, running ``then`` before the call under test: 1 CI
    run in many.)"""

    def __init__(self) -> None:
        self.then = None

    def _maybe(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        then, self.then = self.then, None
        if then is not None:
            t = threading.Thread(target=then, name="other")
            t.start()
            t.join(20)

    def fsync(self, fd: int) -> None:
        self._maybe()
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._maybe()
        super().fdatasync(fd)


def test_a_second_resolve_of_one_action_says_another_resolve_holds_it(tmp_path):
    backend = _OnFsync()
    old = fileio.set_backend(backend)
    try:
        with walstore.open(str(tmp_path / "s"), durability="full") as s:
            tx = s.transaction()
            with tx.action("charge", compensate="refund") as act:
                act.result = {"charge_id": "c1"}
            tx.rollback()  # (no compensator registered: owed)
            (owed,) = s.pending_compensations()
            errors: list = []

            def second():
                try:
                    s.resolve(owed.id, note="refunded by hand (2)")
                except walstore.WalstoreError as e:
                    errors.append(str(e))
            backend.then = second  # (inside the first resolve's durable record)
            done = s.resolve(owed.id, note="refunded by hand (1)")
            assert done.state == "resolved"
            assert len(errors) == 1, errors
            assert "being resolved by another caller" in errors[0], errors[0]
            assert "compensation is running" not in errors[0]
            got = s.get_action(owed.id)
            assert (got.state, got.error) == ("resolved", "refunded by hand (1)")
    finally:
        fileio.set_backend(old)


_CRASHING_AGENT = """
import os, signal, sys
import walstore
store = walstore.open(sys.argv[1])

@store.compensator("refund")
def refund(action):
    with open(sys.argv[2], "a") as f:
        f.write("refund " + action.key + "\\n")

tx = store.transaction()
with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
    with open(sys.argv[2], "a") as f:
        f.write("charge " + act.key + "\\n")
    act.result = {"charge_id": act.key}
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_compensator_registered_after_a_crash_says_what_it_is_owed(tmp_path):
    path, world = str(tmp_path / "s"), str(tmp_path / "world.log")
    p = subprocess.run([sys.executable, "-c", _CRASHING_AGENT, path, world],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    (charge,) = open(world).read().splitlines()
    key = charge.split()[1]
    ran: list = []
    store = walstore.open(path)  # the README's form: the compensator comes after open
    try:
        with pytest.warns(RuntimeWarning, match=r"owed to it already \(1\.1\).*"
                                                 r"retry_compensations"):
            @store.compensator("refund")
            def refund(action):
                ran.append(action.key)
                with open(world, "a") as f:
                    f.write(f"refund {action.key}\n")
        assert ran == []  # (warned, not run behind the caller's back)
        assert [a.id for a in store.pending_compensations()] == ["1.1"]
        assert store.retry_compensations() == []
        assert ran == [key]
        assert open(world).read().splitlines() == [f"charge {key}", f"refund {key}"]
        assert store.get_action("1.1").state == "compensated"
        # nothing owed: registering again (another name, or the same) says nothing
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            store.compensator("refund")(refund)
            store.compensator("unbook")(lambda action: None)
    finally:
        store.close()


def test_compensations_cut_short_by_close_say_the_store_was_closed(tmp_path):
    path = str(tmp_path / "s")
    ran: list = []
    opened: list = []

    def refund(action):
        ran.append(action.id)
        if action.args == 2:
            opened[-1].close()  # (the agent shutting down from inside the newest-but-one)

    s = walstore.open(path, compensators={"refund": refund})
    opened.append(s)
    tx = s.transaction()
    for n in (1, 2, 3):
        with tx.action("charge", args=n, compensate="refund"):
            pass
    with pytest.raises(walstore.CompensationFailed) as e:
        tx.rollback()
    msg = str(e.value)
    assert "did not run (the store was closed)" in msg, msg
    assert "read-only" not in msg, msg
    assert ran == [f"{tx.id}.3", f"{tx.id}.2"]
    # the next open runs what is owed: .2 again (its record was cut off), .1 once
    with walstore.open(path, compensators={"refund": lambda a: ran.append(a.id)}) as s2:
        assert ran == [f"{tx.id}.3", f"{tx.id}.2", f"{tx.id}.2", f"{tx.id}.1"]
        assert [a.state for a in s2.actions()] == ["compensated"] * 3


def test_registering_beside_a_running_rollback_does_not_warn_of_its_compensations(tmp_path):
    started, release = threading.Event(), threading.Event()
    ran: list = []

    def refund(action):
        ran.append(action.id)
        if action.args == 2:
            started.set()
            release.wait(20)

    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        tx = s.transaction()
        for n in (1, 2):
            with tx.action("charge", args=n, compensate="refund"):
                pass
        t = threading.Thread(target=tx.rollback, name="rolling-back")
        t.start()
        try:
            assert started.wait(20)
            assert [a.id for a in s.pending_compensations()] == [f"{tx.id}.2", f"{tx.id}.1"]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # (both are the rollback's to run)
                s.compensator("refund")(refund)
        finally:
            release.set()
            t.join(20)
        assert ran == [f"{tx.id}.2", f"{tx.id}.1"]
        assert s.pending_compensations() == []


# ---- stop 57: rollback_prepared reserves its compensations with its decision ----------
class _RetryAfterDecision(fileio.OSBackend):
    """While armed, ``rollback_prepared``'s decision, durable, first lets another thread
    call ``store.retry_compensations()`` to its end: the window between the decision and
    the undo, made wide."""

    def __init__(self) -> None:
        self.store = None
        self.armed = False
        self.retried: list = []

    def fault_point(self, name: str) -> None:
        if self.armed and name == "rollback_prepared.decided":
            self.armed = False
            t = threading.Thread(target=lambda: self.retried.append(
                [a.id for a in self.store.retry_compensations()]), name="other")
            t.start()
            t.join(20)


def test_rollback_prepared_runs_its_own_compensations_beside_another_threads_retry(tmp_path):
    root = str(tmp_path / "ws")
    os.mkdir(root)
    seen: list = []

    def refund(action):
        path = os.path.join(root, "f")
        content = open(path).read() if os.path.exists(path) else None
        seen.append((action.id, threading.current_thread().name, content))

    backend = _RetryAfterDecision()
    old = fileio.set_backend(backend)
    try:
        with walstore.open(str(tmp_path / "s"), durability="full",
                           compensators={"refund": refund}) as s:
            backend.store = s
            ws = s.workspace(root)
            tx = s.transaction()
            f = tx.files(ws)
            for n in (1, 2, 3):
                f.write("f", f"v{n}")
                tx.put(f"k{n}", n)
                with tx.action("charge", args=n, compensate="refund"):
                    pass
            tx.prepare("g1")
            backend.armed = True
            s.rollback_prepared("g1")
            assert backend.retried, "the decision was never reached"
            # newest first, each between the file changes, all on the deciding thread,
            # all done when rollback_prepared returned
            assert seen == [(f"{tx.id}.3", "MainThread", "v3"),
                            (f"{tx.id}.2", "MainThread", "v2"),
                            (f"{tx.id}.1", "MainThread", "v1")]
            assert [a.state for a in s.actions()] == ["compensated"] * 3
            assert not os.path.exists(os.path.join(root, "f"))
            assert s.retry_compensations() == [] and s.prepared() == []
    finally:
        fileio.set_backend(old)
