"""A nearly full disk: when the next WAL segment's preallocation does not fit, the log
makes a smaller one (room for the commit in hand, at least SMALL_SEGMENT bytes) instead
of failing the commit.  Before: with no spare ready (the disk too full for one), a store
whose next segment did not fit refused every commit from that rotation on ("could not
create a new WAL segment: No space left on device") though each needed a few KiB, and
`walstore recover` of such a store needed a whole new segment's room too
(tools/fullsweep.py, stop 65)."""
from __future__ import annotations

import errno

import walstore
from tools.faults import FaultBackend, installed
from walstore.log import segment as segment_mod

KiB = 1024


def test_a_segment_that_does_not_fit_is_made_smaller_and_the_commit_goes_on(tmp_path,
                                                                             monkeypatch):
    # (the disk looks roomy, and no spare is ever made: its fill runs out of space)
    monkeypatch.setattr(segment_mod, "free_bytes", lambda p: 1 << 40)
    path = str(tmp_path / "s")
    acked = {}
    fb = FaultBackend()
    fb.fail("pwrite", errno.ENOSPC, path="spare.tmp", times=None)
    with installed(fb):
        with walstore.open(path, segment_size=256 * KiB) as s:
            rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal.tmp")  # (the next segment's
            wal = s._engine.wal                                      # zero-fill: once)
            start = wal.rotations
            i, small = 0, None
            while wal.rotations < start + 3:
                with s.transaction() as tx:
                    tx.put(f"k{i}", "v" * 2000)
                acked[f"k{i}"] = "v" * 2000
                if rule.fired and small is None:  # (the segment the failed fill made)
                    small = wal.writer.size
                i += 1
                assert i < 5000
            assert small is not None and small < 256 * KiB, small
            assert rule.fired == 1
            st = s.stats()
            assert st["wal_small_segments"] == 1, st
    with walstore.open(path) as s:
        assert all(s.get(k) == v for k, v in acked.items())
