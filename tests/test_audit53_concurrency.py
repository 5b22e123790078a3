"""Audit 53, concurrency: threads and processes, and interrupts landing while other
threads run (``signals.deferred()`` standing in for the Python handlers)."""
from __future__ import annotations

import os
import signal
import threading
import time

from walstore import signals


def _with_another_thread(fn):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(10,), daemon=True)
    t.start()
    try:
        time.sleep(0.01)
        return fn()
    finally:
        stop.set()
        t.join(5)


def test_every_signal_a_section_held_reaches_its_handler_when_the_first_raises():
    """A Ctrl-C and a SIGUSR1 (the program's handler) both land inside one section while
    another thread runs: the stand-in takes both, and the section's end raised them again
    one by one — the Ctrl-C's KeyboardInterrupt stopped that loop, and the SIGUSR1 had
    already been taken off the list: its handler never ran (a program's SIGTERM handler
    would have missed its shutdown the same way)."""
    ran = []
    mine = lambda signum, frame: ran.append(signum)  # noqa: E731
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_usr = signal.signal(signal.SIGUSR1, mine)

    def once():
        seen = []
        try:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGUSR1)
                for _ in range(200_000):  # (bytecodes: the stand-in runs among them)
                    pass
                time.sleep(0.05)
                seen.append("section ended")
        except KeyboardInterrupt:
            seen.append("interrupt")
        for _ in range(20):  # (a handler still pending runs at a bytecode here)
            if ran:
                break
            time.sleep(0.01)
        return seen

    try:
        for _ in range(3):
            ran.clear()
            assert _with_another_thread(once) == ["section ended", "interrupt"]
            assert ran == [signal.SIGUSR1]
            assert signal.getsignal(signal.SIGUSR1) is mine
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGUSR1, old_usr)


def _sending_once(when, send: int):
    """A stand-in for the ``signal`` module inside walstore.signals: its ``signal()``, the
    first time ``when(sig, handler)`` holds right after a swap, sends ``send`` to this
    process and lets the handler run there (the landing placed, not timed)."""
    armed = [True]

    class Signal:
        def __getattr__(self, name):
            return getattr(signal, name)

        def signal(self, sig, handler):
            old = signal.signal(sig, handler)
            if armed[0] and when(sig, handler):
                armed[0] = False
                os.kill(os.getpid(), send)
                for _ in range(200_000):  # (a handler runs among these bytecodes)
                    pass
                time.sleep(0.05)
            return old

    return Signal()


def test_a_ctrl_c_landing_as_the_handlers_come_back_leaves_none_replaced(monkeypatch):
    """A Ctrl-C landing at a section's end just after the first handler came back (the
    program's SIGINT handler, with another thread running: SIGINT's back, SIGUSR1's not
    yet) raised there and left the stand-in in place of the program's SIGUSR1 handler for
    good: its signals were noted, never delivered.  The landing is placed by a wrapper
    around ``signal.signal`` as the section's end calls it."""
    got = []
    mine = lambda signum, frame: got.append(signum)  # noqa: E731
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_usr = signal.signal(signal.SIGUSR1, mine)
    landing = []

    monkeypatch.setattr(signals, "signal", _sending_once(  # (the first handler given back)
        lambda sig, handler: landing and handler is not signals._stand_in, signal.SIGINT))

    def once():
        seen = []
        try:
            with signals.deferred():
                landing.append(1)
            seen.append("section ended")
        except KeyboardInterrupt:
            seen.append("interrupt")
        return seen

    try:
        assert _with_another_thread(once) == ["interrupt"]
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(50):
            if got:
                break
            time.sleep(0.01)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGUSR1, old_usr)


class _Shutdown(Exception):
    pass


def test_a_handler_raising_as_a_section_puts_its_stand_in_in_place_leaves_none_replaced(
        monkeypatch):
    """A section's start with another thread running swaps the handlers one by one; a
    program's SIGTERM handler raising between two swaps (SIGINT's done, SIGTERM's not
    yet) unwound the section without the list of what it had swapped, so the stand-in
    stayed in place of the SIGINT handler for good: every later Ctrl-C was noted, never
    delivered.  The SIGTERM is placed by a wrapper around ``signal.signal``."""
    def shutdown(signum, frame):
        raise _Shutdown

    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, shutdown)
    landing = [1]

    monkeypatch.setattr(signals, "signal", _sending_once(
        lambda sig, handler: landing and handler is signals._stand_in
        and sig == signal.SIGINT, signal.SIGTERM))

    def once():
        seen = []
        try:
            with signals.deferred():
                seen.append("section ran")
        except _Shutdown:
            seen.append("shutdown")
        return seen

    try:
        assert _with_another_thread(once) == ["shutdown"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is shutdown
        assert signals._DEFERRED.depth == 0 and not signals._DEFERRED.saved
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_a_ctrl_c_as_a_section_counts_the_other_threads_leaves_no_signal_blocked(monkeypatch):
    """With another thread running, the section's start blocks the signals, then counts
    the threads (``_other_threads``), then puts its stand-in in place.  A Ctrl-C taken by
    the other thread while the count ran raised in the main thread there, outside the
    start's unwinding: the signals stayed blocked in the main thread and the section
    counted open (every later section a no-op).  Placed by a wrapper around the count."""
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    real = signals._other_threads
    landing = [1]

    def counting():
        if landing:
            landing.clear()
            os.kill(os.getpid(), signal.SIGINT)  # (the main thread blocks it: the other's)
            for _ in range(200_000):  # (the handler runs among these bytecodes)
                pass
            time.sleep(0.05)
        return real()

    monkeypatch.setattr(signals, "_other_threads", counting)
    # (the section calls the count only when its cached answer is stale: stale from here)
    monkeypatch.setattr(signals, "_TASKS", [-1.0, False, -1, -1])

    def once():
        seen = []
        try:
            with signals.deferred():
                seen.append("section ran")
        except KeyboardInterrupt:
            seen.append("interrupt")
        return seen, signal.pthread_sigmask(signal.SIG_BLOCK, []), signals._DEFERRED.depth

    try:
        seen, blocked, depth = _with_another_thread(once)
        assert seen == ["interrupt"]
        assert (blocked, depth) == (set(), 0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signals._DEFERRED.depth = 0
        signals._DEFERRED.old = None
        signal.signal(signal.SIGINT, old_int)


_PURGING_WRITER = r"""
import sys, walstore
s = walstore.open(sys.argv[1])
for i in range(20):
    with s.transaction() as tx:
        tx.put(f"blob/{i}", b"x" * 2000)
        tx.put(f"keep/{i}", i)
s.checkpoint()  # (applied to LMDB: verify compares the keys)
print("ready", flush=True)
sys.stdin.readline()
s.purge("blob/")
print("purged", flush=True)
sys.stdin.readline()
s.close()
"""


def test_verify_against_a_live_writer_that_purges_reports_no_damage(tmp_path, monkeypatch):
    """``walstore verify`` while the writer runs a purge: verify walks the log up to
    LMDB's applied LSN, then reads LMDB's value of each key as of that LSN, through the
    history rows; the purge applied in between erased those rows, and verify reported
    "LMDB disagrees with the WAL for key 'blob/..'" for every purged key, exit 1, of a
    healthy store (seen running the CLI verbs against a live writer that purges).  The
    purge is placed between the walk and the comparison by a wrapper around the walk."""
    import subprocess
    import sys

    from walstore.ops import verify as verify_mod

    path = str(tmp_path / "s")
    env = dict(os.environ)
    w = subprocess.Popen([sys.executable, "-c", _PURGING_WRITER, path], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().strip() == "ready"
        real = verify_mod._check_wal

        def walk_then_purge(*a, **kw):
            out = real(*a, **kw)
            if w.poll() is None and not getattr(walk_then_purge, "done", 0):
                walk_then_purge.done = 1
                w.stdin.write("purge\n")
                w.stdin.flush()
                assert w.stdout.readline().strip() == "purged"
            return out

        monkeypatch.setattr(verify_mod, "_check_wal", walk_then_purge)
        rep = verify_mod.verify_store(path)
        assert getattr(walk_then_purge, "done", 0)
        assert not [e for e in rep.errors if "disagrees" in e], rep.errors[:3]
        assert rep.errors == []
    finally:
        try:
            w.stdin.write("\n")
            w.stdin.close()
        except OSError:
            pass
        assert w.wait(30) == 0
    rep = verify_mod.verify_store(path)
    assert rep.errors == []


_CTRL_C_CHILD = r"""
import faulthandler, json, os, random, signal, sys, threading, time, walstore
faulthandler.dump_traceback_later(60, exit=True)  # (a hang says where, on stderr)
path = sys.argv[1]; outside = path + ".outside"
def note(line):
    fd = os.open(outside, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (line + "\n").encode()); os.close(fd)
signal.signal(signal.SIGINT, signal.default_int_handler)
s = walstore.open(path, compensators={"refund": lambda a: note("UNDO " + a.key)})
stop = threading.Event()
errs = []
def worker(w):
    try:
        while not stop.is_set():
            def fn(tx):
                tx.put("counter", tx.get("counter", 0) + 1)
                tx.put(f"w{w}", tx.get(f"w{w}", 0) + 1)
            s.run(fn, retries=1000)
    except BaseException as e:
        errs.append(repr(e))
def sender():
    rng = random.Random(2)
    while not stop.is_set():
        time.sleep(rng.uniform(0.0005, 0.004))
        os.kill(os.getpid(), signal.SIGINT)  # (process-directed: any thread may take it)
threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
threads.append(threading.Thread(target=sender))
for t in threads:
    t.start()
states = {}
interrupted = 0
for i in range(600):
    tx = None
    try:
        try:
            tx = s.transaction()
            tx.put(f"k{i}", i)
            tx.put("counter", tx.get("counter", 0) + 1)
            with tx.action("charge", args={"i": i}, compensate="refund") as a:
                note("DO " + a.key)
            tx.commit()
        except walstore.ConflictError:
            pass
    except KeyboardInterrupt:
        interrupted += 1
    if tx is not None:
        states[i] = tx.state
signal.signal(signal.SIGINT, signal.SIG_IGN)
stop.set()
for t in threads:
    t.join(30)
assert not any(t.is_alive() for t in threads)
s.close()
print(json.dumps({"interrupted": interrupted, "states": states, "errs": errs}))
"""


def test_ctrl_c_during_main_thread_commits_while_workers_commit(tmp_path):
    """Process-directed SIGINTs (Python's own handler) every 0.5-4 ms while the main
    thread commits transactions with an action and two worker threads commit conflicting
    increments through ``store.run``: nothing hangs, the workers never see an interrupt,
    each transaction's state is what the store holds, a compensation runs once in the
    run (one cut short inside the compensator, after its effect, runs again at the next
    open: README), and the counter counts exactly the commits that stand."""
    import json
    import subprocess
    import sys

    path = str(tmp_path / "s")
    r = subprocess.run([sys.executable, "-c", _CTRL_C_CHILD, path], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["interrupted"] > 0 and out["errs"] == []
    outside = tmp_path / "s.outside"
    run_lines = outside.read_text().split()
    run_undone = [run_lines[i + 1] for i in range(0, len(run_lines), 2)
                  if run_lines[i] == "UNDO"]
    assert len(run_undone) == len(set(run_undone))

    def note(line):
        with open(outside, "a") as f:
            f.write(line + "\n")

    import walstore
    with walstore.open(path, readonly=True) as ro:
        owed_before = {a.key for a in ro.pending_compensations()}
    with walstore.open(path, compensators={"refund": lambda a: note("UNDO " + a.key)}) as s:
        assert s.pending_compensations() == []
        lines = outside.read_text().split()
        again = [lines[i + 1] for i in range(len(run_lines), len(lines), 2)]
        assert set(again) <= owed_before
        acts = {a.key: a for a in s.actions()}
        for i, state in out["states"].items():
            committed = s.get(f"k{i}") == int(i)
            assert (state == "committed") == committed, (i, state)
        for key, a in acts.items():
            committed = s.get(f"k{a.args['i']}") == a.args["i"]
            assert (a.state == "committed") == committed, (key, a.state)
            assert (key in run_undone or key in again) == (a.state == "compensated"), key
        mains = sum(1 for i in out["states"] if s.get(f"k{i}") == int(i))
        assert s.get("counter", 0) == mains + s.get("w0", 0) + s.get("w1", 0)


def test_a_read_only_open_racing_the_writers_creation_is_not_told_of_damage(tmp_path):
    """A store is created STORE file first, then its LMDB file, then its log.  A
    read-only open in between (a reader polling for the store a writer is creating;
    seen 5-30 times per creation with a reader looping beside a real writer process)
    raised CorruptionError "the LMDB data file is missing" of a store nothing damaged.
    Now NotAStore says the store holds no state yet; the same state on disk (what a
    creation killed there leaves, made here by the creation's first step) opens
    writable, and then read-only, as before."""
    import pytest

    import walstore
    from walstore.engine.layout import Layout

    path = str(tmp_path / "s")
    Layout(path).create()  # (the writer's first step: STORE, empty wal/ and db/)
    with pytest.raises(walstore.NotAStore, match="no state yet"):
        walstore.open(path, readonly=True)
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        with walstore.open(path, readonly=True) as r:
            assert r.get("a") == 1
