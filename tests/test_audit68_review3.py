"""Review 3 of audit 68: LmdbState's open cleanup (h7's 309cbcf) beside other handles of
the same store in the same process.

A handle's open that fails (or is interrupted) after it registered the environment lets
it go; the check "no handle holds it" and the close must be one step under the registry
lock, or another thread's handle, opened in between, has its environment closed under it.
"""
from __future__ import annotations

import linecache
import os
import subprocess
import sys
import threading

import walstore
from walstore.engine.lmdb_state import LmdbState


def _interrupted_under(hook, call) -> None:
    """Run ``call`` with ``hook`` as the profile function (the hook raises the Ctrl-C at
    its point), the KeyboardInterrupt caught: the test checks in ``at`` that it was raised."""
    sys.setprofile(hook)
    try:
        try:
            call()
        except KeyboardInterrupt:
            pass
    finally:
        sys.setprofile(None)


def _store_with_a_key(tmp_path) -> str:
    path = str(tmp_path / "s")
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.put("a", b"1")
    s.close()
    return os.path.join(path, "db")


def test_open_failing_after_registration_never_closes_another_threads_new_handle(tmp_path):
    """Thread A's first open of a store is interrupted (Ctrl-C) between registering the
    environment and counting its handle; its cleanup asked "does any handle hold it?"
    outside the registry lock, then closed it.  Thread B, opening the same store right
    between the two (it found the environment registered and counted itself), was left
    with a closed environment and no registry entry: every read of its handle failed
    ('the store's LMDB state ... is closed' / an lmdb.Error), while nothing closed it."""
    db = _store_with_a_key(tmp_path)
    real = os.path.realpath(db)
    got: dict = {}

    def open_b() -> None:
        got["b"] = LmdbState(db, readonly=True)

    b_thread = threading.Thread(target=open_b)
    at = {"raised": False, "started": False}

    def hook(frame, event, arg):  # (the interrupt: a profile hook, as test_interrupt_points)
        co = frame.f_code
        if (event == "call" and co.co_name == "__enter__" and not at["raised"]
                and frame.f_back is not None and frame.f_back.f_code.co_name == "__init__"
                and isinstance(frame.f_back.f_locals.get("self"), LmdbState)
                and LmdbState._registry.get(real) is not None):
            at["raised"] = True  # (the deferred section's entry, after the registration)
            raise KeyboardInterrupt("between the registration and the handle's count")

    def lines(frame, event, arg):  # (B's open, in its thread, as A's cleanup closes)
        if (event == "line" and at["raised"] and not at["started"]
                and "_registry.pop(self.path" in linecache.getline(
                    frame.f_code.co_filename, frame.f_lineno)):
            at["started"] = True
            b_thread.start()
            b_thread.join(0.5)  # (B waits for the registry lock once fixed)
        return lines

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"),
                                                              LmdbState):
            return lines
        return None

    sys.setprofile(hook)
    sys.settrace(tracer)
    try:
        try:
            LmdbState(db, readonly=True)
        except KeyboardInterrupt:
            pass
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    b_thread.join(10)
    assert at["raised"] and at["started"], at
    b = got["b"]
    try:
        assert b.applied_lsn() > 0  # (B reads through its environment: the commit applied)
        assert LmdbState._registry.get(real) is b._shared
    finally:
        b.close()
    assert real not in LmdbState._registry


def test_reads_of_a_read_only_handle_go_on_after_a_writer_open_interrupted_in_the_gate(
        tmp_path):
    """A store open read-only in a process, then opened for writing in the same process
    (its environment reopened read-write under the read gate, ``_make_writable``), and
    that open interrupted (Ctrl-C) right after the gate was closed to readers
    (``ReadGate.exclusive``: the interrupt between ``paused = True`` and the ``try``
    whose ``finally`` opens it again).  Before the fix the gate stayed closed: every read
    of the read-only handle, and of any later handle of the store in the process, waited
    for ever (found by a Ctrl-C sweep of a second handle's open, point 87 of 'ro then w')."""
    db = _store_with_a_key(tmp_path)
    path = os.path.dirname(db)
    reader = walstore.open(path, readonly=True)
    at = {"where": None}

    def hook(frame, event, arg):
        if (event == "c_return" and at["where"] is None
                and frame.f_code.co_name == "exclusive" and frame.f_locals["self"].paused
                and "with self._cond_lock" in linecache.getline(frame.f_code.co_filename,
                                                                 frame.f_lineno)):
            at["where"] = frame.f_lineno
            raise KeyboardInterrupt("the gate just closed to readers")

    _interrupted_under(hook, lambda: walstore.open(path).close())
    assert at["where"] is not None
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(v=reader.get("a")), daemon=True)
    t.start()
    t.join(5)
    try:
        assert not t.is_alive(), "the read-only handle's read waits for ever (gate closed)"
        assert got["v"] == b"1"
    finally:
        if not t.is_alive():
            reader.close()


def _ctrl_c_at_the_close_in_swap(caller: str, at: dict):
    """A profile hook: a Ctrl-C arriving right after the environment's close in the swap
    ``caller`` (``_make_writable``, ``reopen``) runs under the read gate; inside a deferred
    section (walstore.signals) its KeyboardInterrupt comes at the section's end, as a
    real signal's would."""
    import walstore.signals as S

    def swap_of(frame) -> bool:
        f = frame.f_back
        while f is not None:
            if f.f_code.co_name == caller:
                return True
            f = f.f_back
        return False

    def hook(frame, event, arg):
        if at.get("raised") or event not in ("call", "c_return"):
            return
        if (at["where"] is None and event == "c_return" and frame.f_code.co_name == "swap"
                and getattr(arg, "__name__", "") == "close" and swap_of(frame)):
            at["where"] = frame.f_lineno
        if at["where"] is not None and not S._DEFERRED.depth:
            at["raised"] = True
            raise KeyboardInterrupt(f"right after the close at line {at['where']}")
    return hook


def test_reads_of_a_read_only_handle_go_on_after_a_writer_open_interrupted_mid_swap(
        tmp_path):
    """The same writer open beside a read-only handle (``_make_writable``), interrupted
    between closing the read-only environment and opening the read-write one.  Before
    the fix the process kept the closed environment registered: every read of the
    read-only handle a CorruptionError 'LMDB read failed: Attempt to operate on
    closed/deleted/dropped object' (no damage anywhere), and every later writable open
    of the store in the process a raw lmdb.Error (point 94 of the 'ro then w' sweep)."""
    db = _store_with_a_key(tmp_path)
    path = os.path.dirname(db)
    reader = walstore.open(path, readonly=True)
    at = {"where": None}

    hook = _ctrl_c_at_the_close_in_swap("_make_writable", at)

    _interrupted_under(hook, lambda: walstore.open(path).close())
    try:
        assert at.get("raised"), at
        assert reader.get("a") == b"1"
        w = walstore.open(path)  # (a writable open of the store goes on as well)
        with w.transaction() as tx:
            tx.put("b", b"2")
        w.close()
        assert reader.get("b") == b"2"
    finally:
        reader.close()


PURGE_IN_ANOTHER_PROCESS = """
import sys, walstore
s = walstore.open(sys.argv[1])
with s.transaction() as tx:
    tx.put("gone/1", b"x")
s.purge("gone/")
with s.transaction() as tx:
    tx.put("b", b"2")
s.close()
"""


def test_reads_of_a_read_only_handle_go_on_after_its_reopen_is_interrupted_mid_swap(
        tmp_path):
    """A read-only handle whose writer (another process) compacted the data file (a
    purge) reopens the environment on its next read (``LmdbState.reopen``); that read
    interrupted (Ctrl-C) between closing the old environment and opening the new one
    left the closed one registered: every later read a CorruptionError or an error of
    a closed environment, though the store is sound."""
    db = _store_with_a_key(tmp_path)
    path = os.path.dirname(db)
    reader = walstore.open(path, readonly=True)
    assert reader.get("a") == b"1"
    subprocess.run([sys.executable, "-c", PURGE_IN_ANOTHER_PROCESS, path], check=True,
                   timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    at = {"where": None}

    hook = _ctrl_c_at_the_close_in_swap("reopen", at)

    _interrupted_under(hook, lambda: reader.get("a"))
    try:
        assert at.get("raised"), at
        assert reader.get("a") == b"1"
        assert reader.get("b") == b"2"
    finally:
        reader.close()
