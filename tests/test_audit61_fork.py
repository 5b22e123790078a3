"""Adversarial audit 61: fork safety and child processes.  A store open in a process that
forks (os.fork, multiprocessing's "fork", pre-fork servers) or runs programs (fork + exec:
os.system, subprocess) must never be corrupted, unlocked or compensated by the child.
Real processes throughout."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import walstore

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/fd"),
                                reason="needs fork and /proc")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ---- descriptors a program started by fork + exec inherits ----------------------------

LIST_FDS = ("import os, sys\n"
            "print('LISTED')\n"
            "for fd in os.listdir('/proc/self/fd'):\n"
            "    try: print(os.readlink('/proc/self/fd/' + fd))\n"
            "    except OSError: pass\n")

EXEC_CHILDREN = r'''
import os, subprocess, sys, walstore
path, readonly = sys.argv[1], sys.argv[2] == "ro"
lister = sys.argv[3]
store = walstore.open(path, readonly=readonly)
if not readonly:
    with store.transaction() as tx:
        tx.put("x/1", 1); tx.put("y", 2)
    store.purge("x/")            # a compaction: the environment is opened again
    store.checkpoint()
seen = subprocess.run([sys.executable, "-c", lister], close_fds=False,
                      capture_output=True, text=True).stdout
os.system(f"{sys.executable} -c \"$LISTER\" >> {path}.system")
store.close()
print(seen + open(path + ".system").read())
'''


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_programs_the_process_runs_inherit_no_descriptor_of_the_store(tmp_path, mode):
    """LMDB opens data.mdb without O_CLOEXEC: a program started by ``os.system`` or
    ``subprocess(close_fds=False)`` got a read-write descriptor of the whole state (before:
    /proc/<child>/fd listed <store>/db/data.mdb, for a writer, after a compaction, and for
    a read-only store).  Now no descriptor of anything under the store directory."""
    path = str(tmp_path / "s")
    if mode == "ro":
        walstore.open(path).close()
    env = dict(ENV, LISTER=LIST_FDS)
    proc = subprocess.run([sys.executable, "-c", EXEC_CHILDREN, path, mode, LIST_FDS],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    inherited = [line for line in proc.stdout.splitlines() if line.startswith(path + "/")]
    assert inherited == []
    assert proc.stdout.count("LISTED") == 2  # (both programs ran and listed)
