"""Rotation never zero-fills on the commit path: the spare thread prepares the next
segment at the size the *new* segment's successor will need.  (It used to be asked for
before the new segment was in place, so in a young store, whose segments grow from
1 MiB, every spare came out one size short and every rotation preallocated inline: a
5-18 ms commit each time.)"""
from __future__ import annotations

import os

import walstore


def test_a_young_stores_rotations_all_use_the_spare(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="full") as st:
        value = os.urandom(4096)
        for i in range(6000):  # ~25 MiB of log: segments of 1, 4, 16, 16 MiB
            with st.transaction() as tx:
                tx.put(f"k{i}", value)
        s = st.stats()
        assert s["wal_rotations"] >= 3, s
        assert s["wal_inline_preallocations"] == 0, s
        assert st.get("k5999") == value


# ---- the spare's zeros go to the device a piece at a time ------------------------------------
# (a 16 MiB spare written whole and fsynced at once kept every commit's fdatasync meanwhile
# behind 16 MiB of zeros: the commits beside it took 8-16 ms in a 10,000-commit burst whose
# median is 0.16 ms)

def _spare_writes(tmp_path, backend):
    from tools.faults import installed
    with installed(backend):
        with walstore.open(str(tmp_path / "s"), durability="full") as st:
            value = os.urandom(2048)
            for i in range(600):  # past the first 1 MiB segment: one rotation, a new spare
                with st.transaction() as tx:
                    tx.put(f"k{i}", value)
            st.checkpoint()
            return st.stats()


def test_the_spare_is_written_back_a_piece_at_a_time_and_ends_whole(tmp_path):
    from tools.faults import FaultBackend
    from walstore.log.segment import SPARE_PIECE
    fb = FaultBackend()
    stats = _spare_writes(tmp_path, fb)
    assert stats["wal_rotations"] >= 1 and stats["wal_inline_preallocations"] == 0, stats
    backs = fb.calls_to("write_back", path="*spare.tmp")
    writes = fb.calls_to("pwrite", path="*spare.tmp")
    assert len(backs) >= 2 * (4 << 20) // SPARE_PIECE  # two spares: 4 MiB, then 16 MiB
    assert all(b.size <= SPARE_PIECE for b in backs)
    # each piece of zeros is written back before the next is written
    ops = sorted([(c.seq, c.op, c.offset, c.size) for c in backs + writes])
    pieces = [i for i, (_, op, _, size) in enumerate(ops) if op == "pwrite" and size > 64]
    assert pieces  # (64 bytes: the header written when the spare becomes a segment)
    for i in pieces:
        assert i + 1 < len(ops) and ops[i + 1][1:] == ("write_back",) + ops[i][2:], ops[i:i + 2]
    syncs = fb.calls_to("fsync", path="*spare.tmp")
    assert syncs and syncs[-1].seq > backs[-1].seq  # made durable after its last piece
    spare = tmp_path / "s" / "wal" / "spare.tmp"
    if spare.exists():  # the spare made after the last rotation: all zeros, its full size
        data = spare.read_bytes()
        assert len(data) in (4 << 20, 16 << 20) and data.count(0) == len(data)


def test_where_write_back_is_not_available_the_spare_is_written_plainly(tmp_path):
    from tools.faults import FaultBackend

    class NoWriteBack(FaultBackend):
        def write_back(self, fd, offset, length):
            super().write_back(fd, offset, length)
            return False  # (as on a platform without sync_file_range)

    fb = NoWriteBack()
    stats = _spare_writes(tmp_path, fb)
    assert stats["wal_inline_preallocations"] == 0, stats
    # one attempt per spare, then plain 1 MiB writes
    assert len(fb.calls_to("write_back", path="*spare.tmp")) <= 3
    with walstore.open(str(tmp_path / "s")) as st:
        assert st.get("k599") is not None


def test_a_failed_write_back_of_the_spare_stops_the_log_and_keeps_what_was_acknowledged(
        tmp_path):
    import errno

    import pytest

    from tools.faults import FaultBackend, installed
    fb = FaultBackend()
    path = str(tmp_path / "s")
    acked = []
    with installed(fb):
        st = walstore.open(path, durability="full")
        value = os.urandom(2048)
        for i in range(100):  # acknowledged before any fault
            with st.transaction() as tx:
                tx.put(f"k{i}", value)
            acked.append(f"k{i}")
        st._engine.wal._await_spare(timeout=30)  # (the spare made at open is ready)
        fb.fail("write_back", error=errno.EIO, path="*spare.tmp", nth=3)  # the next spare's
        with pytest.raises(walstore.WalstoreError):
            for i in range(100, 5000):
                with st.transaction() as tx:
                    tx.put(f"k{i}", value)
                acked.append(f"k{i}")
        assert fb.rules[0].failed_calls, "the write-back was never failed"
        with pytest.raises(walstore.WalstoreError):  # read-only for good in this process
            with st.transaction() as tx:
                tx.put("late", 1)
        st.close()
    with walstore.open(path) as st:
        assert acked and all(st.get(k) == value for k in acked)
        assert st.get("late") is None
