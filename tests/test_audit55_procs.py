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
