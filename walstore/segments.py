"""WAL segment files: naming, creation (preallocated, durably), appending, and reading.

A segment is one file ``wal/<start LSN, 20 digits>.wal``: a 64-byte header followed by
records (see :mod:`walstore.framing`).  Files are preallocated with real zero bytes to
``segment_size`` so that an append overwrites already-allocated blocks and ``fdatasync``
needs no metadata flush; the unused rest of a segment is zeros.

Invariants:
- a segment file becomes visible under its final name only after its header and zero
  fill are fsynced and the directory is fsynced (``create_segment``);
- the reader never trusts a length from disk beyond MAX_PAYLOAD or the file's size;
- the reader stops at the first record that does not validate and classifies what lies
  behind it (``ScanEnd``): a clean end (zeros), a torn tail, or a corrupt middle (a valid
  record with ``synced_lsn`` beyond the bad spot follows).
"""
from __future__ import annotations

import mmap
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from . import fileio
from .framing import (RECORD_HEADER_SIZE, RECORD_MAGIC, SEGMENT_HEADER_SIZE, check_record,
                      decode_segment_header, encode_record, encode_segment_header,
                      segment_salt)

RESYNC_BUDGET = 4  # checksum work behind a bad record, in multiples of the file size
SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
_ZERO_CHUNK = bytes(1 << 20)


def segment_name(start_lsn: int) -> str:
    return f"{start_lsn:020d}.wal"


def list_segments(wal_dir: str) -> list[tuple[int, str]]:
    """(start LSN, path) of every segment file, in LSN order.  Other files are ignored."""
    out = []
    for name in os.listdir(wal_dir):
        m = SEGMENT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(wal_dir, name)))
    out.sort()
    return out


class FsyncFailed(OSError):
    """An fsync failed: the caller must stop writing (never retry an fsync)."""


def _fsync_or_fail(fn, target) -> None:
    try:
        fn(target)
    except OSError as e:
        raise FsyncFailed(e.errno, f"fsync failed: {e.strerror or e}") from e


def create_segment(wal_dir: str, store_id: bytes, start_lsn: int, size: int) -> str:
    """Create a preallocated segment durably and return its path.

    Written under a temporary name, zero-filled, fsynced, renamed, then the directory is
    fsynced: a crash leaves either no segment or a whole one (plus maybe a ``.tmp``).
    """
    path = os.path.join(wal_dir, segment_name(start_lsn))
    tmp = path + ".tmp"
    fd = fileio.open_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        header = encode_segment_header(store_id, start_lsn, time.time_ns())
        fileio.pwrite_all(fd, header, 0)
        pos = SEGMENT_HEADER_SIZE
        while pos < size:
            chunk = _ZERO_CHUNK[: min(len(_ZERO_CHUNK), size - pos)]
            fileio.pwrite_all(fd, chunk, pos)
            pos += len(chunk)
        _fsync_or_fail(fileio.fsync, fd)
    except BaseException:
        os.close(fd)
        _remove_quietly(tmp)
        raise
    os.close(fd)
    try:
        fileio.rename(tmp, path)
    except OSError:
        _remove_quietly(tmp)
        raise
    _fsync_or_fail(fileio.fsync_dir, wal_dir)
    return path


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class SegmentWriter:
    """Appends framed records to one open segment at increasing offsets."""

    def __init__(self, path: str, store_id: bytes, start_lsn: int, offset: int) -> None:
        self.path = path
        self.start_lsn = start_lsn
        self.salt = segment_salt(store_id, start_lsn)
        self.fd = fileio.open_file(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.offset = offset  # file offset of the next record

    @property
    def end_lsn(self) -> int:
        return self.start_lsn + self.offset - SEGMENT_HEADER_SIZE

    def room(self) -> int:
        return self.size - self.offset

    def frame(self, rtype: int, payload: bytes, synced_lsn: int, lsn: int) -> bytes:
        return encode_record(self.salt, rtype, lsn, synced_lsn, payload)

    def write_at_end(self, data: bytes) -> None:
        """Write framed bytes at the current end; on error nothing is counted as written."""
        fileio.pwrite_all(self.fd, data, self.offset)
        self.offset += len(data)

    def scrub(self, length: int) -> None:
        """Zero ``length`` bytes at the end after a failed write (best effort)."""
        try:
            fileio.pwrite_all(self.fd, bytes(min(length, self.room())), self.offset)
        except OSError:
            pass

    def sync(self) -> None:
        fileio.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Record(NamedTuple):
    lsn: int
    type: int
    payload: bytes
    synced_lsn: int
    end_lsn: int
    offset: int  # file offset of the header


@dataclass
class ScanEnd:
    """How a segment scan ended.

    kind: ``"clean"`` (valid records, then zeros or the file end), ``"torn"`` (a bad record
    with nothing valid and durable behind it: an ordinary crash outcome), ``"corrupt"``
    (a bad record followed by a valid one written after it was durable), ``"garbage"``
    (non-zero bytes after the last record of a segment that is not the last).
    """

    kind: str
    offset: int          # file offset where valid data ends
    lsn: int             # LSN at that offset
    reason: str = ""
    damaged_end: int = 0  # file offset of the end of non-zero bytes after ``offset``
    next_valid: Record | None = None

    @property
    def damaged_bytes(self) -> int:
        return max(0, self.damaged_end - self.offset)


def judge_end(end: ScanEnd, last: bool, applied: int, next_start: int | None
              ) -> tuple[str, str]:
    """What the end of one segment's valid records means for the log as a whole.

    Returns (verdict, reason): ``"clean"``; ``"stale"`` (bytes behind the end of a sealed
    segment whose successor begins exactly there: a failed write, nothing missing);
    ``"torn"`` (a torn tail: last segment, not yet applied to LMDB); or ``"corrupt"``
    (anything else: those bytes had been durable).  Recovery and verify both judge by it.
    """
    if end.kind == "clean":
        return "clean", ""
    if next_start == end.lsn:
        return "stale", end.reason + " (behind the end of a sealed segment)"
    if end.kind == "torn" and last and end.lsn >= applied:
        return "torn", end.reason
    reason = end.reason
    if end.kind == "torn" and end.lsn < applied:
        reason += f" (LMDB already applied up to LSN {applied}, so these bytes were durable)"
    elif end.kind == "torn":
        reason += " (a later segment exists, so these bytes were durable)"
    elif end.next_valid is not None:
        reason += (f"; a valid record at LSN {end.next_valid.lsn} follows, written after "
                   f"this one was durable")
    return "corrupt", reason


class SegmentReader:
    """Reads one segment through mmap; allocations are bounded by the file's size.

    ``header_error`` is set (and no records are yielded) when the header does not
    validate or belongs to another store or position.
    """

    def __init__(self, path: str, store_id: bytes | None, start_lsn: int) -> None:
        self.path = path
        self.start_lsn = start_lsn
        self.header_error: str | None = None
        self.end: ScanEnd | None = None
        self.file_size = os.path.getsize(path)
        self.store_id = store_id
        with open(path, "rb") as f:
            head = f.read(SEGMENT_HEADER_SIZE)
        try:
            h = decode_segment_header(head)
        except ValueError as e:
            self.header_error = str(e)
            return
        if store_id is not None and h.store_id != store_id:
            self.header_error = "segment belongs to another store (store id differs)"
        elif h.start_lsn != start_lsn:
            self.header_error = (f"segment header says start LSN {h.start_lsn} but the file "
                                 f"is named for {start_lsn}")
        self.store_id = h.store_id
        self.salt = segment_salt(h.store_id, h.start_lsn)

    def lsn_at(self, offset: int) -> int:
        return self.start_lsn + offset - SEGMENT_HEADER_SIZE

    def offset_of(self, lsn: int) -> int:
        return lsn - self.start_lsn + SEGMENT_HEADER_SIZE

    def records(self, from_offset: int = SEGMENT_HEADER_SIZE) -> Iterator[Record]:
        """Yield valid records from ``from_offset``; set ``self.end`` when done."""
        if self.header_error is not None:
            raise ValueError(self.header_error)
        size = self.file_size
        if size <= SEGMENT_HEADER_SIZE:
            self.end = ScanEnd("clean", size, self.lsn_at(size))
            return
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size = min(size, len(mm))
            off = from_offset
            while True:
                lsn = self.lsn_at(off)
                h, reason = check_record(mm, off, self.salt, lsn, size)
                if reason is not None:
                    self.end = self._classify(mm, off, size, reason, h)
                    return
                end = off + RECORD_HEADER_SIZE + h.length
                yield Record(lsn, h.type, bytes(mm[off + RECORD_HEADER_SIZE:end]), h.synced_lsn,
                             self.lsn_at(end), off)
                off = end

    def _classify(self, mm, off: int, size: int, reason: str, header) -> ScanEnd:
        lsn = self.lsn_at(off)
        damaged_end = last_nonzero_end(mm, off, size)
        if damaged_end == off:
            return ScanEnd("clean", off, lsn)
        nxt, exhausted = self.find_valid_after(mm, off + 1, size)
        if exhausted:
            return ScanEnd("corrupt", off, lsn, reason + "; the bytes behind it could not be "
                           "searched for valid records within the scan budget", damaged_end)
        if nxt is not None and nxt.synced_lsn > lsn:
            return ScanEnd("corrupt", off, lsn, reason, damaged_end, nxt)
        return ScanEnd("torn", off, lsn, reason, damaged_end, nxt)

    def find_valid_after(self, mm, start: int, size: int) -> tuple[Record | None, bool]:
        """(first valid record at or after file offset ``start`` or None, budget exhausted).

        Candidates are found by the magic and must carry the LSN of their position before
        any checksum work; the checksum work is bounded (RESYNC_BUDGET x the file size) so a
        crafted file full of plausible headers cannot make this quadratic.
        """
        budget = RESYNC_BUDGET * max(size, 1 << 20)
        pos = start + 10
        while True:
            pos = mm.find(RECORD_MAGIC, pos, size)
            if pos < 0:
                return None, False
            off = pos - 10
            if off >= start:
                h, reason = check_record(mm, off, self.salt, self.lsn_at(off), size)
                if h is not None and h.lsn == self.lsn_at(off) and h.length <= size:
                    budget -= RECORD_HEADER_SIZE + h.length
                if reason is None:
                    end = off + RECORD_HEADER_SIZE + h.length
                    return Record(h.lsn, h.type, bytes(mm[off + RECORD_HEADER_SIZE:end]),
                                  h.synced_lsn, self.lsn_at(end), off), False
                if budget < 0:
                    return None, True
            pos += 1

    def resume_after(self, end: ScanEnd) -> Iterator[Record]:
        """Skip-corrupt reading: continue at the next valid record after a bad spot."""
        if end.next_valid is None:
            return iter(())
        return self.records(end.next_valid.offset)


def last_nonzero_end(mm, start: int, size: int) -> int:
    """Offset just past the last non-zero byte in ``mm[start:size]`` (``start`` if none)."""
    pos = size
    step = 1 << 16
    while pos > start:
        lo = max(start, pos - step)
        chunk = mm[lo:pos]
        stripped = chunk.rstrip(b"\x00")
        if stripped:
            return lo + len(stripped)
        pos = lo
    return start
