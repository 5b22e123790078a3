"""Audit 55, many processes on one store: read-only readers and CLI verbs beside a live
writer, the writer lock, kill -9 and fork.  Real processes throughout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import walstore

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(walstore.__file__)))]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- a writer that forked a helper, then was killed -------------------------------------

FORKING_WRITER = r'''
import os, sys, time, walstore
s = walstore.open(sys.argv[1])
with s.transaction() as tx:
    tx.put("a", 1)
child = os.fork()
if child == 0:          # a long-lived helper (a worker pool's process, a daemon): it never
    sys.stdin.read()    # touches the store, and lives on after its parent is killed
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(600)
'''


def test_a_killed_writers_lock_is_taken_over_though_a_child_it_forked_lives_on(tmp_path):
    """A writer that forked a helper process (os.fork, multiprocessing's default 'fork' on
    Linux) and was then killed -9: the helper's inherited copy of the LOCK descriptor kept
    the flock held, so every later writer was refused, StoreLocked naming the dead pid,
    for as long as the helper lived (the contract: a lock left by a killed process is taken
    over).  A forked child's copy of the lock descriptor is closed at the fork now; the
    parent keeps its lock (closing a duplicate does not release a flock)."""
    path = str(tmp_path / "s")
    w = subprocess.Popen([sys.executable, "-c", FORKING_WRITER, path], env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    helper = None
    try:
        writer_pid, helper = map(int, w.stdout.readline().split())
        # the parent still holds its lock after the fork
        with pytest.raises(walstore.StoreLocked) as e:
            walstore.open(path)
        assert e.value.pid == writer_pid
        w.kill()
        w.wait()
        assert os.path.exists(f"/proc/{helper}")  # the helper lives on
        s = walstore.open(path)  # taken over, recovered
        try:
            assert s.get("a") == 1
            with s.transaction() as tx:
                tx.put("b", 2)
        finally:
            s.close()
    finally:
        w.kill()
        w.wait()
        if helper is not None:
            _kill(helper)


# ---- a shared probe of the lock while LOCK names some live process -----------------------

def test_a_probe_of_the_lock_is_not_taken_for_the_live_process_lock_names(tmp_path):
    """LOCK still names the pid of a writer killed -9; that pid now belongs to another
    live process (pids are reused: in a container the next run's processes get the same
    small pids), and a read-only process's probe (``writer_alive``: a shared flock held for
    an instant) is on the lock as a writer opens.  The open was refused at once,
    StoreLocked naming that live process, which holds no lock at all.  A shared holder is
    no writer: the open waits it out, as for a dead pid, and a refusal names nobody."""
    import fcntl
    path = str(tmp_path / "s")
    walstore.open(path).close()
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    probe = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
    try:
        os.pwrite(probe, f"{other.pid}\n".encode(), 0)  # (as a killed writer left it)
        fcntl.flock(probe, fcntl.LOCK_SH)  # a probe that, here, stays on the lock
        with pytest.raises(walstore.StoreLocked) as e:
            walstore.open(path)
        assert e.value.pid is None, e.value  # not "locked by process <other.pid>"
        assert str(other.pid) not in str(e.value)
        fcntl.flock(probe, fcntl.LOCK_UN)  # the probe ends: the open succeeds
        s = walstore.open(path)
        s.close()
    finally:
        os.close(probe)
        other.kill()
        other.wait()


# ---- something else in place of LOCK ----------------------------------------------------

def test_a_fifo_in_place_of_lock_does_not_hang_read_only_commands(tmp_path):
    """A FIFO in place of LOCK hung every read-only CLI verb (get, verify, actions) and
    read-only open for good: the probe for a live writer opened it O_RDONLY, which blocks
    on a FIFO until someone opens it for writing.  (A writable open already failed at once,
    one line.)  The probe takes a LOCK that is not a regular file for no writer: no writer
    can hold one there."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    lock = os.path.join(path, "LOCK")
    os.unlink(lock)
    os.mkfifo(lock, 0o600)
    for verb in (["get", path, "a"], ["verify", path], ["actions", path]):
        r = subprocess.run([sys.executable, "-m", "walstore", *verb], env=ENV,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (verb, r.stderr[-500:])
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "walstore", "put", path, "b", "2"], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
