"""When the WAL's spare segment is made (``WriteAheadLog._spare_at``, stop 82): once the
log's end passes half the segment an open found, at once when the open finds it half
written, right after each rotation, or when asked (``request_spare``).  Before, every open
zero-filled and fsynced a spare (4 MiB in a young store) in the background and its close
waited for it: an open that wrote a few records (a CLI verb, a short-lived agent, most
tests) paid ~15 ms of disk for nothing.  And the tail scan every open makes of its last
segment (``last_nonzero_end``) is checked against the byte-by-byte answer it replaced."""
from __future__ import annotations

import os
import random
import time

import walstore
from walstore.log.reader import last_nonzero_end
from walstore.log.writer import SEGMENT_HEADER_SIZE


def _spare_file(path: str) -> str:
    return os.path.join(path, "wal", "spare.tmp")


def _wait(cond, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _half(wal) -> int:
    """The LSN half way through the segment in use."""
    w = wal.writer
    return w.start_lsn + (w.size - SEGMENT_HEADER_SIZE) // 2


def _commit_while(s, more, i: int = 0) -> int:
    """Commit 1 KB values to keys k<i>, k<i+1>, ... while ``more()``; the next i."""
    while more():
        with s.transaction() as tx:
            tx.put(f"k{i}", "v" * 1000)
        i += 1
    return i


def test_an_open_that_writes_little_makes_no_spare(tmp_path):
    path = str(tmp_path / "s")
    for _ in range(2):  # (a new store, then a reopen of it)
        with walstore.open(path, durability="full") as s:
            with s.transaction() as tx:
                tx.put("k", "v" * 100)
            wal = s._engine.wal
            time.sleep(0.05)  # (a spare thread asked for one would be at work by now)
            assert not wal._spare_wanted and wal.spare.size == 0
            assert not os.path.exists(_spare_file(path))
    with walstore.open(path) as s:
        assert s.get("k") == "v" * 100


def test_the_spare_is_made_once_half_the_segment_is_written_and_used_by_its_rotation(
        tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="full", segment_size=64 * 1024) as s:
        wal = s._engine.wal
        half = _half(wal)
        i = _commit_while(s, lambda: wal.written_lsn < half - 2048)  # (below the half:
        assert not wal._spare_wanted and wal.spare.size == 0         # none asked for)
        i = _commit_while(s, lambda: wal.written_lsn < half, i)
        _wait(lambda: wal.spare.size > 0 and not wal._spare_wanted, "no spare was made")
        assert os.path.getsize(_spare_file(path)) == wal.spare.size
        rotations = wal.rotations
        i = _commit_while(s, lambda: wal.rotations == rotations, i)
        assert wal.inline_preallocations == 0  # (the rotation took the spare)
        # and the next one is asked for at once, whatever the new segment holds
        _wait(lambda: wal.spare.size > 0 and not wal._spare_wanted, "no next spare")
    with walstore.open(path) as s:
        assert s.get(f"k{i - 1}") == "v" * 1000


def test_an_open_finding_its_segment_half_written_asks_for_the_spare_at_once(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="full", segment_size=64 * 1024) as s:
        wal = s._engine.wal
        half = _half(wal)
        _commit_while(s, lambda: wal.written_lsn < half + 4096 and wal.rotations == 0)
        assert wal.rotations == 0
    with walstore.open(path, durability="full", segment_size=64 * 1024) as s:
        wal = s._engine.wal
        assert wal.writer.end_lsn >= half  # (the same segment, past its half)
        _wait(lambda: wal.spare.size > 0 and not wal._spare_wanted, "no spare at open")


def test_request_spare_makes_one_now(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        wal = s._engine.wal
        assert wal.spare.size == 0
        wal.request_spare()
        _wait(lambda: wal.spare.size > 0 and not wal._spare_wanted, "no spare made")
        assert wal.spare.size >= wal.next_segment_size()


def test_the_zero_tail_scan_agrees_with_stripping_byte_by_byte():
    rnd = random.Random(82)
    for _ in range(2000):
        n = rnd.choice([0, 1, 7, 1 << 16, (1 << 16) + 1, (1 << 16) - 1, 200_003, 1 << 20])
        buf = bytearray(n)
        for _ in range(rnd.randint(0, 3)):
            if n:
                buf[rnd.randrange(n)] = rnd.randint(1, 255)
        start = rnd.randint(0, n)
        size = rnd.randint(start, n)
        data = bytes(buf)
        want = start + len(data[start:size].rstrip(b"\x00"))
        assert last_nonzero_end(data, start, size) == want, (n, start, size)

