"""Audit 65: a real full disk (a small tmpfs) under LMDB's writes, as tools/fullsweep.py
found them.  Each test is skipped where a tmpfs cannot be mounted."""
from __future__ import annotations

import errno
import os
import time

import pytest

import walstore
from tools.fullsweep import fill_to

# the applier runs only when asked (a drain, a checkpoint, a close): LMDB is written when
# the test says so; one preallocated 1 MiB segment holds every commit (no rotation)
OPTS = dict(segment_size=1 << 20, checkpoint_bytes=1 << 40, apply_interval=3600.0)


def _store_with_unapplied_commits(mnt, **opts):
    """A store on the tmpfs filled to its last 24 KiB, then a restore point and ~600 KiB
    of commits in its log (its preallocated segment), not yet in LMDB."""
    path = os.path.join(mnt, "s")
    s = walstore.open(path, **{**OPTS, **opts})
    with s.transaction() as tx:
        tx.put("before", 1)
    fill_to(str(mnt), 24 * 1024)  # (LMDB's page flush: a short write, reported as EIO)
    s.restore_point("rp")
    for i in range(12):
        with s.transaction() as tx:
            tx.put(f"k{i}", "v" * 50_000)
    return s


def test_an_lmdb_write_error_never_leaves_rewind_as_an_internal_error_without_errno(
        mount_tmpfs):
    """README "Errors": a failed LMDB write is a StoreIOError with an errno and the data
    file's name, and on a full disk it says so.  Seen before the fix (tools/fullsweep.py,
    a full tmpfs): ``rewind`` (its drain of the log into LMDB) let the engine's internal
    StateWriteError out, "writing LMDB failed: mdb_txn_commit: Input/output error": no
    errno, no file, and an I/O error where the disk was only full."""
    mnt = mount_tmpfs("8m")
    s = _store_with_unapplied_commits(mnt)
    try:
        with pytest.raises(walstore.WalstoreError) as e:
            s.rewind("rp")
        err = e.value
        assert isinstance(err, walstore.StoreIOError), f"{type(err).__name__}: {err}"
        assert err.errno in (errno.EIO, errno.ENOSPC)
        assert err.filename and os.path.basename(err.filename) == "data.mdb"
        assert "bytes free" in str(err) and "\n" not in str(err)
        assert s.readonly  # (LMDB is in doubt: written no more until reopened)
    finally:
        s.close()
    os.unlink(os.path.join(mnt, "fill"))
    with walstore.open(os.path.join(mnt, "s")) as s:  # nothing lost; nothing rewound
        assert s.get("k11") == "v" * 50_000 and s.get("before") == 1


def test_commits_refused_after_lmdb_ran_out_of_space_say_the_disk_is_full(mount_tmpfs):
    """A store stopped by its applier's failed LMDB write refuses every later write with
    a ReadOnlyError naming the cause.  Seen before the fix (tools/fullsweep.py): on a full
    tmpfs the refusal said only "turned read-only after an error (writing LMDB failed:
    mdb_txn_commit: Input/output error)": an operator reading it looks for a failing
    device; the disk was full (the room left is now named, as the checkpoint's and the
    open's errors name it)."""
    mnt = mount_tmpfs("8m")
    s = _store_with_unapplied_commits(mnt, apply_interval=0.05)  # (applied in a pause)
    try:
        deadline = time.monotonic() + 10
        while not s.readonly and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.readonly, "the applier's LMDB write did not fail on the full disk"
        os.unlink(os.path.join(mnt, "fill"))  # (room again: the refusal still says why)
        with pytest.raises(walstore.ReadOnlyError) as e:
            with s.transaction() as tx:
                tx.put("after", 1)
        msg = str(e.value)
        assert "bytes free" in msg and "data.mdb" in msg and "\n" not in msg, msg
        assert "bytes free" in s.stats()["failure"]
    finally:
        s.close()
    with walstore.open(os.path.join(mnt, "s")) as s:
        assert s.get("k11") == "v" * 50_000 and s.get("after") is None
