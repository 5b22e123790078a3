"""Rotation never zero-fills on the commit path: the spare thread prepares the next
segment at the size the *new* segment's successor will need.  (It used to be asked for
before the new segment was in place, so in a young store, whose segments grow from
1 MiB, every spare came out one size short and every rotation preallocated inline: a
5-18 ms commit each time.)"""
from __future__ import annotations

import os
import time

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
    assert len(backs) >= (1 << 20) // SPARE_PIECE  # (the first spare trickles while the
    assert all(b.size <= SPARE_PIECE for b in backs)  # first segment has room)
    # each piece of zeros is written back before the next is written; once the segment
    # in use ran short of room (urgent), the rest of that spare went down plainly, in
    # big writes: never a written-back piece after a plain one in the same spare
    ops = sorted([(c.seq, c.op, c.offset, c.size) for c in backs + writes])
    pieces = [i for i, (_, op, _, size) in enumerate(ops) if op == "pwrite" and size > 64]
    assert pieces  # (64 bytes: the header written when the spare becomes a segment)
    plain_from = None
    for i in pieces:
        _, _, offset, size = ops[i]
        if offset == 0:
            plain_from = None  # (a new spare starts)
        backed = i + 1 < len(ops) and ops[i + 1][1:] == ("write_back",) + ops[i][2:]
        if backed:
            assert plain_from is None, ops[plain_from:i + 2]
            assert size <= SPARE_PIECE
        elif plain_from is None:
            plain_from = i
    syncs = fb.calls_to("fsync", path="*spare.tmp")
    assert syncs and syncs[-1].seq > backs[-1].seq  # made durable after its last piece
    spare = tmp_path / "s" / "wal" / "spare.tmp"
    if spare.exists():  # the spare made after the last rotation: all zeros, its full size
        data = spare.read_bytes()
        assert len(data) in (4 << 20, 16 << 20) and data.count(0) == len(data)


def test_a_spare_needed_soon_is_written_at_full_speed_from_then_on(tmp_path):
    """The trickle (a small piece written back at a time) keeps the spare off the commits'
    fdatasyncs but is slow; once ``urgent()`` says the segment in use is running out of
    room, the rest is written plainly (a rotation waits for the spare)."""
    from tools.faults import FaultBackend, installed
    from walstore.log.segment import SPARE_PIECE, Spare
    fb = FaultBackend()
    looks = []

    def urgent() -> bool:
        looks.append(1)
        return len(looks) > 5  # five pieces trickle, then the segment runs short

    size = 4 << 20
    with installed(fb):
        Spare(str(tmp_path)).prepare(size, urgent)
    backs = fb.calls_to("write_back", path="*spare.tmp")
    writes = fb.calls_to("pwrite", path="*spare.tmp")
    assert len(backs) == 5 and all(b.size == SPARE_PIECE for b in backs)
    plain = writes[5:]
    assert plain and all(w.size > SPARE_PIECE for w in plain[:-1])
    assert len(plain) <= size // (1 << 20) + 1  # (1 MiB writes)
    assert fb.calls_to("fsync", path="*spare.tmp")
    data = (tmp_path / "spare.tmp").read_bytes()
    assert len(data) == size and data.count(0) == size


def test_an_idle_store_trickles_its_whole_spare(tmp_path):
    """With the segment in use far from full, every piece of the spare is written back
    before the next (nothing urgent)."""
    from tools.faults import FaultBackend, installed
    from walstore.log.segment import SPARE_PIECE
    fb = FaultBackend()
    with installed(fb):
        with walstore.open(str(tmp_path / "s"), durability="full") as st:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not fb.calls_to("fsync", path="*spare.tmp"):
                time.sleep(0.02)
    backs = fb.calls_to("write_back", path="*spare.tmp")
    writes = [w for w in fb.calls_to("pwrite", path="*spare.tmp") if w.size > 64]
    assert backs and len(backs) == len(writes) == (4 << 20) // SPARE_PIECE
    assert all(w.size == SPARE_PIECE for w in writes)


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
