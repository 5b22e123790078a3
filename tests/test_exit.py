"""A program that exits without closing its store: it exits (never hangs), and the store
was closed as ``close()`` closes it (every commit applied, the shutdown marked clean).

Real processes: the child commits in a burst (the applier busy as it exits) and returns
from its main module with the store still open, referenced by a global or dropped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import walstore

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, walstore
    path, how = sys.argv[1], sys.argv[2]
    s = walstore.open(path, durability="none", apply_interval=0.001, apply_batch=100)
    for i in range(20000):
        with s.transaction() as tx:
            tx.put(b"k%05d" % i, i)
    print("committed", flush=True)
    if how == "dropped":
        del s
    elif how == "thread":  # a daemon thread still committing as the program ends
        import threading
        def more():
            i = 0
            while True:
                try:
                    with s.transaction() as tx:
                        tx.put(b"late%d" % (i % 10), i)
                except walstore.WalstoreError:
                    return
                i += 1
        threading.Thread(target=more, daemon=True).start()
""")


@pytest.mark.parametrize("how", ["global", "dropped", "thread"])
def test_a_program_that_never_closes_its_store_exits_and_closes_it(tmp_path, how):
    path = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _round in range(2):  # (the hang it guards against came 5 times out of 5)
        proc = subprocess.run([sys.executable, "-c", CHILD, path, how], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "committed" in proc.stdout
        with walstore.open(path, recover="manual") as s:  # NeedsRecovery if not clean
            assert s.get(b"k19999") == 19999 and s.get(b"k00000") == 0
            assert s.stats()["keys"] >= 20000


FORK = textwrap.dedent("""
    import os, sys, walstore
    s = walstore.open(sys.argv[1], durability="full")
    with s.transaction() as tx:
        tx.put("before", 1)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # the child ends normally: its exit hooks must leave the store alone
    _, status = os.waitpid(pid, 0)
    with s.transaction() as tx:  # the parent's store still works, still its own
        tx.put("after", os.waitstatus_to_exitcode(status))
    print("parent done", flush=True)
    os._exit(0)  # and then the parent crashes: the next open must know it
""")


def test_a_forked_child_that_exits_leaves_the_parents_store_alone(tmp_path):
    path = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", FORK, path], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "parent done" in proc.stdout, proc.stderr[-2000:]
    with pytest.raises(walstore.NeedsRecovery):  # the child did not mark it closed
        walstore.open(path, recover="manual")
    with walstore.open(path) as s:
        assert s.get("before") == 1 and s.get("after") == 0
