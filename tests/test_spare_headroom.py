"""The WAL's spare (the next segment, zero-filled ahead of time by a background thread)
is a speed-up: it is never made from a nearly full disk's last space.  Filled
regardless, it took the megabytes LMDB's next write needed: `walstore recover` on a disk
with 3 MB free failed its close with ENOSPC on db/data.mdb in about one run of twenty
(tests/test_audit59_recovery.py, CI of stop 64), while a 4 MiB spare was being filled."""
from __future__ import annotations

import os
import time

import pytest

import walstore
from walstore.log.segment import SPARE_MIN_HEADROOM, NoRoomForSpare, Spare

MiB = 1024 * 1024


def fill_to(mnt, keep: int) -> None:
    """Leave about ``keep`` bytes free on the tmpfs at ``mnt``."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(mnt, "fill"), "wb") as f:
        f.write(b"\0" * max(0, free - keep))


def free_of(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_spare_that_would_leave_less_than_the_headroom_is_not_made(mount_tmpfs):
    mnt = mount_tmpfs("32m")
    fill_to(mnt, 4 * MiB + SPARE_MIN_HEADROOM - MiB)  # a 4 MiB spare leaves 7 MiB
    spare = Spare(str(mnt))
    before = free_of(mnt)
    with pytest.raises(NoRoomForSpare) as e:
        spare.prepare(4 * MiB)
    assert isinstance(e.value, OSError) and "no spare made" in str(e.value)
    assert not os.path.exists(spare.path) and spare.size == 0
    assert free_of(mnt) >= before - 4096  # nothing was written


def test_a_spare_with_room_to_spare_is_made(mount_tmpfs):
    mnt = mount_tmpfs("32m")
    fill_to(mnt, 4 * MiB + SPARE_MIN_HEADROOM + MiB)
    spare = Spare(str(mnt))
    spare.prepare(4 * MiB)
    assert spare.size == 4 * MiB and os.path.getsize(spare.path) == 4 * MiB


def test_a_store_on_a_nearly_full_disk_keeps_its_room_for_commits(mount_tmpfs):
    """The store opens, its spare thread gives up, and the commits and the close use
    the room (before: the thread held 3 MB of it, then let it go, while they ran)."""
    mnt = mount_tmpfs("16m")
    path = os.path.join(mnt, "s")
    walstore.open(path).close()
    fill_to(mnt, 3 * MiB)
    s = walstore.open(path)
    try:
        wal = s._engine.wal
        deadline = time.monotonic() + 10
        while wal._spare_wanted and time.monotonic() < deadline:  # (its one attempt)
            time.sleep(0.01)
        assert not wal._spare_wanted and wal.spare.size == 0 and wal.spare_error is None
        assert not os.path.exists(os.path.join(path, "wal", "spare.tmp"))
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 20000)
    finally:
        s.close()
    with walstore.open(path) as s:
        assert s.get("k19") == "v" * 20000


def test_a_replica_snapshot_is_not_copied_into_a_nearly_full_disk(mount_tmpfs, tmp_path,
                                                                   monkeypatch):
    """The shipper copies LMDB into the temporary directory for each snapshot — on many
    machines the store's own disk.  It now needs the data file's size and 64 MiB free
    there, or it skips the snapshot (said in ``replication().last_error``; the WAL ships
    on and a restore has what was shipped); before, the copy went ahead and took the room
    the store's commits needed."""
    import tempfile
    mnt = mount_tmpfs("32m")
    monkeypatch.setattr(tempfile, "tempdir", str(mnt))  # (the shipper's scratch: there)
    path, rep = str(tmp_path / "s"), str(tmp_path / "replica")
    s = walstore.open(path, replicate_to="file://" + rep,
                      replicate_options={"interval": 0.05, "max_backoff": 0.2,
                                         "snapshot_interval": 0})
    try:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 1000)
        s.checkpoint()  # (LMDB moved: a snapshot is due)
        s.sync_replica(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "no room for a snapshot" not in (
                s.replication().last_error or ""):
            time.sleep(0.05)
        st = s.replication()
        assert "no room for a snapshot" in (st.last_error or ""), st
        assert "the WAL ships on" in st.last_error and st.snapshots == 1, st  # (the empty base)
        assert not [n for n in os.listdir(mnt) for _ in os.listdir(os.path.join(mnt, n))
                    if os.path.isdir(os.path.join(mnt, n))]  # no copy left behind
    finally:
        s.close()
    dest = str(tmp_path / "restored")
    walstore.restore("file://" + rep, dest)
    with walstore.open(dest) as r:
        assert r.get("k19") == "v" * 1000
