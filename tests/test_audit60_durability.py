"""Audit 60, durability modes and what a power loss may take (CONTRACT section 2
"durability=", section 4.1-4.3 and 4.6).  Crash cases use real processes that end with
os._exit (no close, as kill -9); a power loss is simulated by putting back the files as
the disk held them at the last returned fsync (the WAL copied right after ``sync()``)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import walstore
from tools.faults import FaultBackend, installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_child(code: str, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, check=False,
                   timeout=120)


# ---- recovery's REDO made LMDB durable before the WAL tail it redid --------------------

CRASH_WITH_UNSYNCED_TAIL = r"""
    import os, shutil, sys
    import walstore
    store, durable_copy, mode = sys.argv[1:4]
    s = walstore.open(store, durability=mode, sync_interval=60)
    with s.transaction() as tx:
        tx.put("base", 1)
    s.sync()                                   # everything so far is on the disk
    shutil.copytree(os.path.join(store, "wal"), durable_copy)
    for i in range(5):                         # acknowledged, only in the page cache
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
    os._exit(9)
"""


@pytest.mark.parametrize("mode", ["normal", "none"])
def test_power_loss_during_recovery_never_leaves_lmdb_ahead_of_the_log(tmp_path, mode):
    """Before: the recovering open committed REDO to LMDB (synced) and only then
    fdatasynced the WAL tail it had redone; a power loss in between left LMDB ahead of
    the log, and every later strict open refused the store ("the WAL ends at LSN 65 but
    LMDB has applied events up to 380").  Now the segments REDO reads are fdatasynced
    before LMDB is written: a failed one stops the open with LMDB untouched."""
    store, durable = str(tmp_path / "s"), str(tmp_path / "wal.durable")
    _run_child(CRASH_WITH_UNSYNCED_TAIL, store, durable, mode)
    fb = FaultBackend()
    rule = fb.fail("fdatasync", errno.EIO, path="*.wal")
    with pytest.raises(walstore.WalstoreError):
        with installed(fb):
            walstore.open(store)
    assert rule.fired == 1
    ops = [c.op for c in fb.calls if c.op in ("lmdb_commit", "fdatasync")]
    assert ops.index("fdatasync") < (ops.index("lmdb_commit") if "lmdb_commit" in ops
                                     else len(ops)), ops
    # the power loss: LMDB as the open left it, the WAL as the disk held it
    shutil.rmtree(os.path.join(store, "wal"))
    shutil.copytree(durable, os.path.join(store, "wal"))
    with walstore.open(store) as s:
        assert s.get("base") == 1
    # and without the fault, the crashed store recovers every acknowledged commit
    store2, durable2 = str(tmp_path / "s2"), str(tmp_path / "wal2.durable")
    _run_child(CRASH_WITH_UNSYNCED_TAIL, store2, durable2, mode)
    with walstore.open(store2) as s:
        assert [s.get(f"k{i}") for i in range(5)] == list(range(5))


# ---- power-loss images: "normal" with 2PC, rotations with small segments ---------------

@pytest.mark.parametrize("durability", ["normal", "full"])
def test_power_loss_images_with_prepared_transfers_and_actions_keep_what_is_owed(durability):
    """tools/powerloss.py's transfer workload with every third transfer prepared and then
    commit_prepared, each of the others running an action (16 KiB segments: rotations):
    in every image each acknowledged commit owed (under "normal", the 2PC ones always:
    their records are forced) is there, each acknowledged PREPARE is committed or still
    in doubt, each action body that ran is committed or refunded, never both, and no
    transaction is torn."""
    from tools.powerloss import run
    s = run(24, seed=5, commits=45, durability=durability, twophase=True, actions=True)
    assert s["prepares"] > 5 and s["effects"] > 5 and s["acks_checked"] > 100
    assert (s["lost_commits"], s["broken_images"]) == (0, 0), s["examples"]


# ---- close: a failed final fsync of the log is a StoreIOError with its errno ------------

def test_a_failed_fsync_in_a_clean_close_is_a_store_io_error_and_the_commit_recovers(tmp_path):
    """Before: under "normal" a close whose checkpoint's fsync of the log failed raised a
    bare LogFailed (a ReadOnlyError, no errno: ``except OSError`` missed it), while the
    same failure in an unclean close was a StoreIOError (GUIDE, errors: "StoreIOError ...
    EIO ... while closing, with .errno").  Now both are; the lock is let go and the
    commit, still in the page cache, is recovered by the next open."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    with installed(fb):
        s = walstore.open(path, durability="normal", sync_interval=60)
        with s.transaction() as tx:
            tx.put("k", 1)
        rule = fb.fail("fdatasync", errno.EIO, path="*.wal")
        with pytest.raises(walstore.StoreIOError) as info:
            s.close()
    assert rule.fired == 1
    assert info.value.errno == errno.EIO and "may be lost to a power loss" in str(info.value)
    with walstore.open(path) as s:
        assert s.get("k") == 1


# ---- "none" and "normal": a process kill loses no acknowledged commit -----------------

KILLED_WRITER = r"""
    import os, sys, threading
    import walstore
    s = walstore.open(sys.argv[1], durability=sys.argv[2], segment_size=64 * 1024)
    acks = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    def writer(t):
        i = 0
        while True:
            key = f"t{t}/{i}"
            with s.transaction() as tx:
                tx.put(key, "x" * (i % 700))
            os.write(acks, (key + "\n").encode())  # (after commit() returned)
            i += 1
    for t in range(3):
        threading.Thread(target=writer, args=(t,), daemon=True).start()
    threading.Event().wait()
"""


@pytest.mark.parametrize("mode", ["none", "normal"])
def test_a_killed_process_loses_no_acknowledged_commit(tmp_path, mode):
    """kill -9 of three committing threads (64 KiB segments: rotations under way): every
    commit acknowledged before the kill is there after recovery, under "none" as well
    (its record reached the OS before commit() returned)."""
    import signal
    import time
    store, ack_file = str(tmp_path / "s"), str(tmp_path / "acks")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), store, mode,
                          ack_file], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(ack_file) and os.path.getsize(ack_file) > 6000:
                break
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with open(ack_file) as f:
        acked = [line for line in f.read().split("\n") if line]
    assert len(acked) > 500
    with walstore.open(store) as s:
        assert [k for k in acked if s.get(k) is None] == []
        assert s.last_recovery is not None and s.last_recovery.unclean
