"""Audit 65: the WAL rotation as changed at stop 65 (switch before the SEAL, small
segments on a nearly full disk, the rotation waking the waiters its fsync covered)."""
from __future__ import annotations

import errno
import os
import time

import walstore
from tools.faults import FaultBackend, installed
from test_spare_headroom import fill_to, free_of

KiB, MiB = 1024, 1024 * 1024


class _LowWater(FaultBackend):
    """Notes the least free space on the store's disk seen after each write of a WAL
    segment being made (``*.wal.tmp``), and whether one of them met a full disk."""

    def __init__(self, mnt) -> None:
        super().__init__()
        self.mnt = str(mnt)
        self.least: int | None = None
        self.enospc = 0

    def pwrite(self, fd, data, offset):
        tmp = (self.path_of(fd) or "").endswith(".wal.tmp")
        try:
            return super().pwrite(fd, data, offset)
        except OSError as e:
            if tmp and e.errno == errno.ENOSPC:
                self.enospc += 1
            raise
        finally:
            if tmp:
                free = free_of(self.mnt)
                self.least = free if self.least is None else min(self.least, free)


def test_a_rotation_on_a_nearly_full_disk_never_takes_its_last_bytes(mount_tmpfs):
    """A nearly full disk (3 MiB free, too little for a spare) and a rotation whose next
    segment (4 MiB) does not fit: the log goes on in a small segment (stop 65).  Before,
    the full-size segment was zero-filled first until the disk said ENOSPC, and only then
    removed: seen, the disk's free space hit 0 during the rotation (one ENOSPC), a moment
    in which an LMDB commit of the applier or a checkpoint fails on a full disk (and the
    store turns read-only) — what Spare.prepare's headroom keeps the spare from doing."""
    mnt = mount_tmpfs("24m")
    path = str(mnt / "s")
    walstore.open(path).close()
    assert not os.path.exists(os.path.join(path, "wal", "spare.tmp"))  # (an open that
    # writes nothing makes none: made, it took the room while the disk had it)
    fill_to(mnt, 3 * MiB)
    fb = _LowWater(mnt)
    acked = {}
    with installed(fb):
        with walstore.open(path) as s:
            wal = s._engine.wal
            n = 0
            while wal.rotations == 0:
                with s.transaction() as tx:
                    tx.put(f"k{n}", "v" * 20000)
                acked[f"k{n}"] = "v" * 20000
                n += 1
            st = s.stats()
            assert st["wal_small_segments"] == 1 and st["failure"] is None, (
                {k: v for k, v in st.items() if k.startswith("wal") or k == "failure"})
    assert fb.least is not None and fb.least >= 1 * MiB, (fb.least, fb.enospc)
    assert fb.enospc == 0
    with walstore.open(path) as s:
        assert all(s.get(k) == v for k, v in acked.items())


def test_small_segments_replicate_restore_back_up_and_follow_like_any(tmp_path, monkeypatch):
    """Every rotation makes a small segment (the disk looks nearly full: no spare, a
    64 KiB segment, or one just big enough for a record larger than that), and a
    read-only process follows the live writer meanwhile: the replica restores to exactly
    what was acknowledged, ``verify`` passes, a backup of the live store holds the same,
    and the follower saw every commit (probe of stop 65's small segments)."""
    from walstore.log import segment as segment_mod
    from walstore.log.segment import list_segments
    from walstore.ops.backup import backup
    from walstore.ops.verify import verify_store
    monkeypatch.setattr(segment_mod, "free_bytes", lambda p: 512 * KiB)
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/replica"
    acked = {}
    s = walstore.open(path, segment_size=1 * MiB, replicate_to=url,
                      replicate_options={"interval": 0.05, "max_backoff": 0.5})
    try:
        ro = walstore.open(path, readonly=True)
        try:
            sizes = (100, 3000, 30000, 90 * KiB, 150 * KiB)
            for i in range(60):
                with s.transaction() as tx:
                    tx.put(f"k{i}", "v" * sizes[i % len(sizes)])
                acked[f"k{i}"] = "v" * sizes[i % len(sizes)]
            st = s.stats()
            assert st["wal_small_segments"] >= 5 and st["failure"] is None, st
            made = sorted({os.path.getsize(p) for _s, p in list_segments(
                os.path.join(path, "wal"))})
            assert made[0] == 64 * KiB and any(m > 150 * KiB for m in made), made
            deadline = time.monotonic() + 10
            while ro.get("k59") is None:  # (the follower catches up by itself)
                assert time.monotonic() < deadline, "the follower is stuck"
                time.sleep(0.05)
            assert all(ro.get(k) == v for k, v in acked.items())
        finally:
            ro.close()
        s.sync_replica(timeout=30)
        backup(path, str(tmp_path / "b"))
    finally:
        s.close()
    rep = verify_store(path)
    assert rep.ok, rep.errors
    walstore.restore(url, str(tmp_path / "r"))
    for where in ("r", "b"):
        with walstore.open(str(tmp_path / where)) as c:
            assert all(c.get(k) == v for k, v in acked.items()), where
