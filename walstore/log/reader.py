"""The one WAL reader: every walker of the log (recovery, verify, read-only followers,
inspection, backup, rebuild) reads through this module.  Two record loops live elsewhere,
on purpose, both on the same record check (:func:`walstore.log.format.check_record`):
replication's ``logformat.iter_records`` tails a live segment from a remembered offset
and stops at the first record that does not check without judging it (a writer's tail;
judging reads the rest of the file, and may search it, on every poll), asking
:func:`damage_that_stays` here when non-zero bytes lie behind it; and a purge's
``walstore.engine.scrub`` reads the frames of ``quarantine/*.bin`` files without
checksums (bytes cut from the log as damaged or stale: it must see the keys in them all
the same).

Two levels, as LevelDB's ``log_reader``:

- ``SegmentReader`` reads one segment file with ``pread``, a window at a time (never
  mapped: see ``FileBytes``), and stops at the first record
  that does not validate; ``ScanEnd`` says what lies behind it: a clean end (zeros), a
  torn tail, a corrupt middle (a valid record written *after* the bad spot was durable
  follows it: its ``synced_lsn`` lies beyond the spot), or a truncated file (shorter than
  the size its header recorded).
- ``LogReader`` walks the chain of segments in LSN order and tells the caller, through
  ``LogEvent`` items between the records, everything that is not a plain record: a gap
  in the chain, a segment whose header is bad or foreign, how each segment ends and what
  that means for the log as a whole (``judge_end``), and a chain that ends at a sealed
  segment whose successor is missing.  What to do about each (cut, refuse, report,
  skip) is the caller's decision; the reader never changes a byte.
- ``LogFollower`` keeps its place and returns what was appended since the last call
  (read-only stores following a live writer).

A whole record (its CRC checks) of a type or with flags this code does not know, and a
segment header of a newer format version, raise NotAStore wherever they are met (the
record check raises it): a newer walstore wrote them, so no walker may take them for
damage or a torn tail (a cut would destroy what the newer version wrote).

Invariants: no length read from disk is trusted beyond MAX_PAYLOAD or the bytes really
in the file; the resynchronisation search behind a bad record is bounded
(RESYNC_BUDGET x the file size); files are only read.
"""
from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from .format import (MAX_PAYLOAD, MAX_SEGMENT_SIZE, RECORD_HEADER_SIZE, RECORD_MAGIC,
                     SEAL_RECORD_SIZE,
                     SEGMENT_HEADER_SIZE, RecordType, check_record, decode_segment_header,
                     parse_record_header, segment_salt)
from .segment import list_segments, segment_name


RESYNC_BUDGET = 4  # checksum work behind a bad record, in multiples of the file size
WINDOW = 1 << 20  # a segment is read this much at a time (FileBytes)
FOLLOW_WINDOW = 4 << 10  # ... by a read-only store's follower at each poll (a small read: the
# common poll finds nothing new), and by replication reading a live tail


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
    (a bad record followed by a valid one written after it was durable), ``"truncated"``
    (the file is shorter than its header says it was made).
    """

    kind: str
    offset: int          # file offset where valid data ends
    lsn: int             # LSN at that offset
    reason: str = ""
    damaged_end: int = 0  # file offset of the end of non-zero bytes after ``offset``
    next_valid: Record | None = None
    sealed: bool = False  # the last valid record is a SEAL: nothing after it is the log

    @property
    def damaged_bytes(self) -> int:
        return max(0, self.damaged_end - self.offset)


def judge_end(end: ScanEnd, last: bool, applied: int, next_start: int | None
              ) -> tuple[str, str]:
    """What the end of one segment's valid records means for the log as a whole.

    Returns (verdict, reason): ``"clean"``; ``"stale"`` (bytes behind the end of a sealed
    segment: a failed write, nothing missing; or a torn SEAL in the slot right before its
    successor); ``"torn"`` (a torn tail: last segment, not
    yet applied to LMDB); or ``"corrupt"`` (anything else: those bytes had been durable).
    """
    if end.kind == "truncated":
        return "corrupt", end.reason
    if end.kind == "clean":
        return "clean", ""
    if end.sealed or next_start == end.lsn:
        return "stale", end.reason + " (behind the end of a sealed segment)"
    if (end.kind == "torn" and next_start == end.lsn + SEAL_RECORD_SIZE
            and end.damaged_end - end.offset <= SEAL_RECORD_SIZE):
        # the SEAL's own slot: a rotation writes it after the successor is durable, so a
        # power loss can tear it (sectors of one write land apart) like it can omit it
        return "stale", end.reason + (" (a torn SEAL record: the rotation was cut short "
                                      "after its successor was durable; nothing is missing)")
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
    """Reads one segment (``FileBytes``); allocations are bounded by the file's size.

    ``header_error`` is set (and no records are yielded) when the header does not
    validate or belongs to another store or position, unless ``read_past_bad_header``
    was asked for (what a segment dropped whole held, best effort).
    """

    def __init__(self, path: str, store_id: bytes | None, start_lsn: int) -> None:
        self.path = path
        self.start_lsn = start_lsn
        self.header_error: str | None = None
        self.past_bad_header = False
        self.end: ScanEnd | None = None
        self.file_size = os.path.getsize(path)
        self.store_id = store_id
        self._given_store_id = store_id
        self.made_size = 0
        self.not_a_file = False
        mode = os.stat(path).st_mode  # (FileNotFoundError as before: a dangling name)
        if not stat.S_ISREG(mode):
            # a directory or a FIFO under a segment's name: opening a FIFO blocked verify
            # and every recovery that read it forever; a directory raised EISDIR out of
            # both (a bare OSError).  Never opened: a bad segment, as a damaged header is
            kind = ("a directory" if stat.S_ISDIR(mode) else
                    "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")
            self.file_size = 0
            self.not_a_file = True
            self.header_error = f"the segment's name leads to {kind}, not a file"
            return
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
        elif h.size > MAX_SEGMENT_SIZE:  # (a tolerate-tail cut then extended the file to
            # it: EFBIG, or a petabyte sparse segment the writer never rotated out of)
            self.header_error = (f"segment header says the file was made {h.size} bytes "
                                 f"long, past any segment's ({MAX_SEGMENT_SIZE})")
        self.store_id = h.store_id
        self.made_size = h.size
        self.salt = segment_salt(h.store_id, h.start_lsn)

    def read_past_bad_header(self) -> bool:
        """Best effort behind a header that failed its check, to name what dropping the
        segment gives up: read it as the segment of the store given that its file name
        says it is (the records' salt is that store id and the name's start LSN).  A record
        validates only under the salt it was written with, so this store's own records at
        this position read as they are behind a damaged header (a flipped bit in the
        magic, a bad header CRC), while another store's, or a segment copied under another
        name, read as none.  No size recorded in the header is trusted (no truncation
        check).  ``header_error`` stays set; ``records()`` then reads and ``end`` says how
        the records end (clean, torn, corrupt), as for any segment.  Returns False, and
        nothing changes, when the header is valid or no store id was given, or when the
        name is no LSN a log reaches (past 64 bits: no record there has a salt; reading
        it raised struct.error out of a salvage recovery dropping a stray file)."""
        if (self.header_error is None or self._given_store_id is None or self.not_a_file
                or not 0 <= self.start_lsn < 1 << 64):
            return False
        self.store_id = self._given_store_id
        self.salt = segment_salt(self.store_id, self.start_lsn)
        self.made_size = 0
        self.past_bad_header = True
        return True

    def lsn_at(self, offset: int) -> int:
        return self.start_lsn + offset - SEGMENT_HEADER_SIZE

    def offset_of(self, lsn: int) -> int:
        return lsn - self.start_lsn + SEGMENT_HEADER_SIZE

    def records(self, from_offset: int = SEGMENT_HEADER_SIZE) -> Iterator[Record]:
        """Yield valid records from ``from_offset``; set ``self.end`` when done."""
        if self.header_error is not None and not self.past_bad_header:
            raise ValueError(self.header_error)
        size = self.file_size
        if size <= SEGMENT_HEADER_SIZE:
            self.end = self._truncated(size) or ScanEnd("clean", size, self.lsn_at(size))
            return
        with mapped(self.path) as mm:
            size = min(size, len(mm))
            off = from_offset
            sealed = False
            while True:
                lsn = self.lsn_at(off)
                h, reason, buf, i = check_at(mm, off, self.salt, lsn, size, self.path)
                if reason is not None:
                    self.end = self._classify(mm, off, size, reason, sealed)
                    return
                end = off + RECORD_HEADER_SIZE + h.length
                sealed = h.type == RecordType.SEAL
                yield Record(lsn, h.type, bytes(buf[i + RECORD_HEADER_SIZE:i + RECORD_HEADER_SIZE
                                                     + h.length]),
                             h.synced_lsn, self.lsn_at(end), off)
                off = end

    def truncation(self) -> str | None:
        """Why the file is damaged when it is shorter than the size its header recorded
        (a segment gets its name only once preallocated to that size, so no writer's
        segment, a live one's tail included, is ever shorter: it was truncated); None
        when it is not, or when its header recorded no size."""
        end = self._truncated(self.file_size)
        return None if end is None else end.reason

    def _truncated(self, size: int) -> ScanEnd | None:
        if self.made_size and size < self.made_size:
            return ScanEnd("truncated", size, self.lsn_at(max(size, SEGMENT_HEADER_SIZE)),
                           f"the segment file is {size} bytes long but was made "
                           f"{self.made_size} bytes long: it was truncated")
        return None

    def _classify(self, mm, off: int, size: int, reason: str, sealed: bool) -> ScanEnd:
        lsn = self.lsn_at(off)
        truncated = self._truncated(self.file_size)
        if truncated is not None:
            truncated.offset, truncated.lsn = off, lsn
            return truncated
        damaged_end = last_nonzero_end(mm, off, size)
        if damaged_end == off:
            return ScanEnd("clean", off, lsn, sealed=sealed)
        if sealed:
            return ScanEnd("torn", off, lsn, reason, damaged_end, sealed=True)
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
                h, reason, buf, i = check_at(mm, off, self.salt, self.lsn_at(off), size,
                                              self.path)
                if h is not None and h.lsn == self.lsn_at(off) and h.length <= size:
                    budget -= RECORD_HEADER_SIZE + h.length
                if reason is None:
                    end = off + RECORD_HEADER_SIZE + h.length
                    return Record(h.lsn, h.type,
                                  bytes(buf[i + RECORD_HEADER_SIZE:i + RECORD_HEADER_SIZE
                                            + h.length]),
                                  h.synced_lsn, self.lsn_at(end), off), False
                if budget < 0:
                    return None, True
            pos += 1

    def valid_records_after(self, offset: int) -> Iterator[Record]:
        """Every valid record found behind ``offset`` (what a cut there gives up)."""
        with mapped(self.path) as mm:
            pos = offset + 1
            while True:
                rec, _exhausted = self.find_valid_after(mm, pos, len(mm))
                if rec is None:
                    return
                yield rec
                pos = rec.offset + 1

    def nonzero_end(self, offset: int) -> int:
        """File offset just past the last non-zero byte at or after ``offset``."""
        with mapped(self.path) as mm:
            return last_nonzero_end(mm, offset, len(mm))


@contextlib.contextmanager
def mapped(path: str) -> Iterator["FileBytes"]:
    """The bytes of ``path`` as a ``FileBytes`` (read a window at a time, never mapped),
    its descriptor closed at the end.  An empty file (a segment truncated to nothing)
    reads as no bytes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        yield FileBytes(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class FileBytes:
    """A segment's bytes read with ``pread``, a window of at most ``max(WINDOW, the
    request)`` bytes at a time: what the readers slice and search as they did a read-only
    mmap.  A mapping kills the process with SIGBUS when the file is truncated under it or
    a page cannot be read from the device (CONTRACT 4.9: never a SIGBUS): `walstore
    verify` of a 56 MB log whose segments were truncated while it walked them died of it
    (exit 135; audit 59).  Read so, a truncation meanwhile is a short read (the record
    there reads as truncated) and an unreadable page an OSError (EIO) the caller reports.
    Memory: one window (a record longer than WINDOW: that record), never the file — a
    whole segment read into memory broke the walkers' memory bounds (16 MiB of heap a
    segment)."""

    __slots__ = ("fd", "size", "window", "_base", "_buf")

    def __init__(self, fd: int, size: int, window: int = WINDOW) -> None:
        self.fd, self.size, self.window = fd, size, window
        self._base, self._buf = 0, b""

    def __len__(self) -> int:
        return self.size

    def span(self, off: int, n: int) -> tuple[bytes, int]:
        """``(buf, i)`` with ``buf[i:i + n]`` the file's bytes ``[off, off + n)`` — fewer
        where the file ends (at the size it had when opened, or sooner if it shrank).  A
        small request reads the WINDOW around it from a half-window boundary, so the
        headers and searches that follow it are served from the same read."""
        if self._base <= off and off + n <= self._base + len(self._buf):
            return self._buf, off - self._base
        if off >= self.size:  # (nothing there: an offset past 2**63, from a damaged
            return b"", 0     # applied LSN, was an OverflowError from pread)
        window = self.window
        half = window >> 1
        base = off - off % half if n <= half else off
        want = max(0, min(max(n + off - base, window), self.size - base))
        self._base, self._buf = base, _pread_full(self.fd, want, base)
        return self._buf, off - base

    def __getitem__(self, item: slice) -> bytes:
        start, stop, _step = item.indices(self.size)
        if stop <= start:
            return b""
        buf, i = self.span(start, stop - start)
        return buf[i:i + stop - start]

    def find(self, sub: bytes, start: int, end: int) -> int:
        """``bytes.find`` over the file's ``[start, end)``, a window at a time (windows
        overlap by ``len(sub) - 1`` bytes, so a match across a boundary is found)."""
        end = min(end, self.size)
        keep = len(sub) - 1
        pos = start
        while end - pos >= len(sub):
            n = min(self.window >> 1, end - pos)
            buf, i = self.span(pos, n)
            got = min(n, len(buf) - i)
            k = buf.find(sub, i, i + got)
            if k >= 0:
                return pos + (k - i)
            if got < n or pos + n >= end:
                return -1  # (the file ended: shorter than it was)
            pos += max(1, n - keep)
        return -1


def _pread_full(fd: int, n: int, off: int) -> bytes:
    """Up to ``n`` bytes at ``off`` (fewer only at the file's end)."""
    data = os.pread(fd, n, off)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, off + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def check_at(src: FileBytes, off: int, salt: int, lsn: int, size: int, where: str):
    """``check_record`` of the record at file offset ``off`` of ``src`` (bytes up to
    ``size``), judged and named as it was over a map: the header read first, and the
    whole record only when the check will read its payload (magic, length bound, within
    ``size``, the LSN of its position): a resync over a crafted file of magics reads no
    more than a header per candidate.  Returns ``(header, reason, buf, i)``: the record's
    bytes are ``buf[i:]``."""
    rest = size - off
    buf, i = src.span(off, min(RECORD_HEADER_SIZE, max(rest, 0)))
    have = len(buf) - i
    if have >= RECORD_HEADER_SIZE:
        h = parse_record_header(buf, i)
        if (h.magic == RECORD_MAGIC and h.length <= MAX_PAYLOAD and h.lsn == lsn
                and RECORD_HEADER_SIZE + h.length <= rest):
            buf, i = src.span(off, RECORD_HEADER_SIZE + h.length)
            have = len(buf) - i  # (short only if the file shrank meanwhile)
            limit = i + min(rest, have)
        else:  # (the check stops before the payload: the file's own limit names it)
            limit = i + rest
    else:
        limit = i + max(0, min(rest, have))
    h, reason = check_record(buf, i, salt, lsn, limit, where, base=off - i)
    return h, reason, buf, i


_ZERO_CHUNK = bytes(1 << 16)


def last_nonzero_end(mm, start: int, size: int) -> int:
    """Offset just past the last non-zero byte in ``mm[start:size]`` (``start`` if none).

    Every open of a store asks this of its last segment's preallocated tail (a MiB or
    more of zeros): an all-zero chunk is told by one comparison with zeros (a memcmp,
    ~20x faster than ``rstrip``, which went byte by byte: ~2 ms a MiB), and only the
    chunk holding the last non-zero byte is stripped."""
    pos = size
    step = len(_ZERO_CHUNK)
    while pos > start:
        lo = max(start, pos - step)
        chunk = mm[lo:pos]
        if chunk != _ZERO_CHUNK[:len(chunk)]:  # (its length: a file that shrank since it
            # was opened reads short, and a short chunk of zeros is zeros -- compared with
            # ``pos - lo`` zeros it was taken for data past the file's end, h2 stop 83)
            return lo + len(chunk.rstrip(b"\x00"))
        pos = lo
    return start


# ---- the chain of segments ------------------------------------------------------------

@dataclass
class LogEvent:
    """Something about the log that is not a record, met while walking it.

    kind:
    ``"gap"``          the segment at ``lsn`` does not start where the log so far ends
                       (``expected``), or the log begins past what LMDB holds;
    ``"bad-segment"``  its header is damaged, foreign or misnamed (``reason``);
    ``"end"``          a segment's records ended: ``verdict`` (clean, stale, torn,
                       corrupt) and ``scan`` (the ScanEnd) say how;
    ``"missing-next"`` the last segment ends with a SEAL, so its successor had been made,
                       but it is gone.
    ``"vanished"``     the file disappeared while being read (a live writer trimmed it).
    """

    kind: str
    path: str
    lsn: int
    reason: str = ""
    expected: int | None = None
    verdict: str = ""
    scan: ScanEnd | None = None
    reader: SegmentReader | None = None
    last: bool = False


class LogReader:
    """Walks every segment of a store's WAL in LSN order (see the module docstring).

    ``applied``: LMDB's applied LSN (a log that begins past it has lost records; a torn
    tail below it is corruption); ``wal_start``: where a log sealed by salvage begins.
    ``resume_after_corruption``: continue at the next valid record behind a corrupt spot
    (skip-corrupt salvage) instead of ending that segment there.
    """

    def __init__(self, wal_dir: str, store_id: bytes | None, applied: int = 0,
                 wal_start: int = 0, resume_after_corruption: bool = False) -> None:
        self.wal_dir = wal_dir
        self.store_id = store_id
        self.applied = applied
        self.wal_start = wal_start
        self.resume = resume_after_corruption
        self.segments = list_segments(wal_dir)
        self.end_lsn: int | None = None  # where the valid log ends (after a walk)
        self.end_offset: int | None = None
        self.end_segment: int | None = None  # start LSN of the segment holding the end
        self.bytes_done = 0

    @property
    def total_bytes(self) -> int:
        return sum(_size(p) for _, p in self.segments)

    def walk(self, from_lsn: int = 0) -> Iterator[Record | LogEvent]:
        """Records (with LSN >= ``from_lsn``) and LogEvents, in log order.

        Segments wholly below ``from_lsn`` are skipped (their continuity is not checked).
        """
        segs = self.segments
        expected: int | None = None
        sealed_before = False
        bad_before: str | None = None  # the segment before, when its header failed
        if not segs and self.applied > self.wal_start:  # (a live log always keeps one)
            yield LogEvent("gap", self.wal_dir, self.applied,
                           f"no WAL segment exists, but LMDB is applied up to LSN "
                           f"{self.applied}: the log's segments are missing (what was not yet "
                           f"applied to LMDB is lost with them)", expected=self.wal_start,
                           last=True)
            return
        for i, (start, path) in enumerate(segs):
            last = i == len(segs) - 1
            next_start = segs[i + 1][0] if not last else None
            if next_start is not None and next_start <= from_lsn:
                continue
            if expected is None and bad_before is not None:
                # (not "the WAL begins here": it said so of the segment behind another
                # store's, the log whole from LSN 0; where the bad one ends is unknown)
                if start > max(self.applied, self.wal_start, from_lsn):
                    yield LogEvent("gap", path, start, f"segment starts at LSN {start} behind "
                                   f"{os.path.basename(bad_before)}, whose header failed its "
                                   f"check: whether records between them are missing is "
                                   f"unknown",
                                   expected=max(self.applied, self.wal_start), last=last)
            elif expected is None and start > max(self.applied, self.wal_start, from_lsn):
                yield LogEvent("gap", path, start, f"the WAL begins at LSN {start} but LMDB is "
                               f"applied only up to {self.applied}: log records are missing",
                               expected=max(self.applied, self.wal_start), last=last)
            elif expected is not None and start != expected and not (
                    start == expected + SEAL_RECORD_SIZE and not sealed_before):
                yield LogEvent("gap", path, start, f"segment starts at LSN {start} but the "
                               f"previous one ends at {expected}: a segment is missing or "
                               f"damaged", expected=expected, last=last)
            try:
                reader = SegmentReader(path, self.store_id, start)
            except FileNotFoundError:
                yield LogEvent("vanished", path, start, "trimmed while being read", last=last)
                expected = None
                continue
            bad_before = None
            if reader.header_error is not None:
                yield LogEvent("bad-segment", path, start, reader.header_error, reader=reader,
                               last=last)
                expected = None
                bad_before = path
                continue
            offset = SEGMENT_HEADER_SIZE
            try:
                while True:
                    for rec in reader.records(offset):
                        if rec.lsn >= from_lsn and rec.type != RecordType.SEAL:
                            yield rec  # a SEAL is structure: ScanEnd.sealed reports it
                    end = reader.end
                    verdict, reason = judge_end(end, last, self.applied, next_start)
                    yield LogEvent("end", path, end.lsn, reason, verdict=verdict, scan=end,
                                   reader=reader, last=last)
                    if verdict == "corrupt" and self.resume and end.next_valid is not None:
                        offset = end.next_valid.offset
                        continue
                    break
            except FileNotFoundError:
                yield LogEvent("vanished", path, start, "trimmed while being read", last=last)
                expected = None
                continue
            expected = end.lsn
            sealed_before = end.sealed
            self.end_lsn, self.end_offset, self.end_segment = end.lsn, end.offset, start
            self.bytes_done += reader.file_size
            if last and end.sealed and not os.path.exists(
                    os.path.join(self.wal_dir, segment_name(end.lsn))):  # (made since listed)
                yield LogEvent("missing-next", path, end.lsn,
                               f"the segment is sealed: the log goes on at LSN {end.lsn}, but "
                               f"no segment starts there (the newest segment is missing)",
                               last=True)

    def short_of_applied(self) -> str | None:
        """After a walk: why the log is damaged when its valid end lies below LMDB's
        ``applied`` LSN (acknowledged records LMDB holds are gone from the log: a cut or
        truncated tail, not a torn one); None when it reaches it, or when there is no
        segment (the walk's "gap" event says that)."""
        end = self.end_lsn or 0
        if not self.segments or end >= self.applied:
            return None
        return (f"the WAL ends at LSN {end} but LMDB is applied up to "
                f"{self.applied}: acknowledged log records are missing")

    def records(self, from_lsn: int = 0) -> Iterator[Record]:
        """Only the records, SEALs left out (for callers that judge nothing: tools)."""
        for item in self.walk(from_lsn):
            if isinstance(item, Record):
                yield item


def damage_that_stays(path: str, store_id: bytes | None, start_lsn: int, offset: int,
                      looks: int = 3) -> Record | None:
    """A live segment's records stop at ``offset`` short of non-zero bytes: a record a
    writer was copying in while it was read, or damage.  Looked at again ``looks`` times
    (20, 40, 60 ms apart): None once a valid record starts at ``offset``, none follows
    it, none that follows was written after the bad spot was synced (a torn tail: a
    power loss under durability "normal" or "none" leaves later unsynced writes whole
    and an earlier one torn; ``SegmentReader._classify``'s rule, so replication judges
    as verify and recovery do — it refused what they call a torn tail), or the file went
    away; else the valid record behind the bad one, which proves the bad one had been
    durable.  (Without looking again, backup and replication beside a writer committing
    flat out took its half-copied record for damage: 6 backups in 10 of a healthy store
    refused.)"""
    behind = None
    for look in range(looks):
        try:
            reader = SegmentReader(path, store_id, start_lsn)
            if reader.header_error is not None \
                    or next(iter(reader.records(offset)), None) is not None:
                return None
            behind = next(iter(reader.valid_records_after(offset)), None)
        except (FileNotFoundError, ValueError):
            return None  # (trimmed or rewritten meanwhile)
        if behind is None or behind.synced_lsn <= reader.lsn_at(offset):
            return None
        if look + 1 < looks:
            time.sleep(0.02 * (look + 1))
    return behind


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class WalProgress:
    """``progress(bytes done, total)`` of a walk of the log, called at each segment's end
    and every ``PROGRESS_STEP`` bytes inside a segment (recovery, verify: counted per
    segment, a 16 MiB segment of a 56 MB log jumped the count from 9% to 39% with no line
    between, and a 1 GiB one said nothing for its whole walk: docs/CLI.md promises a line
    each time another 5% is done: probe-audit59).  The caller tests ``offset >= next_at``
    first: one comparison per record, and nothing at all without a ``progress``."""

    STEP = 1 << 20

    def __init__(self, log: "LogReader", progress, total: int) -> None:
        self.log, self.progress, self.total = log, progress, total
        self.next_at = self.STEP

    def inside(self, offset: int) -> None:
        self.next_at = offset + self.STEP
        self.progress(min(self.log.bytes_done + offset, self.total), self.total)

    def ended(self, file_size: int) -> None:
        self.next_at = self.STEP  # (the next segment's records start again at its header)
        self.progress(min(self.log.bytes_done + file_size, self.total), self.total)


class LogFollower:
    """Returns the records appended since the last call, following rotations.

    It keeps the segment it is in open and reads it with ``pread`` (``FileBytes``, a
    ``FOLLOW_WINDOW`` at a time, read afresh at each poll: the writer fills the segment
    meanwhile).  It mapped the segment before, and a segment truncated under it (a new
    writer's recovery cutting a torn tail, a hand at the file) killed the read-only
    process with SIGBUS (CONTRACT 4.9: never; a short read here reads as a record not
    yet whole).  A record not yet whole ends the read until it is.  When the segments it
    has not read yet were trimmed by a checkpoint (their commits are in LMDB by then), it
    moves to the first remaining segment that ``applied()`` reaches and reports the skip
    through ``skipped_to``.
    """

    def __init__(self, wal_dir: str, store_id: bytes, from_lsn: int) -> None:
        self.wal_dir = wal_dir
        self.store_id = store_id
        self.position = from_lsn  # LSN of the next record to read
        self.skipped_to: int | None = None
        self._seg: int | None = None
        self._reader: SegmentReader | None = None
        self._fd: int | None = None
        self._offset = SEGMENT_HEADER_SIZE
        # where the last poll stopped at bytes that are no record (zeros: the writer's end;
        # a record being copied in; or damage), or at a segment whose header fails its
        # check: the caller tells them apart by the writer's shared mark (``Follower``).
        # (kind — "corrupt-record", "bad-segment" or "gap" —, reason, segment path, file
        # offset, LSN); None when the poll found no segment to read
        self.blocked: tuple[str, str, str, int, int] | None = None
        self._sealed = False  # the last record read is its segment's SEAL
        # (the LSN where a segment ended unsealed, the start of the successor read from
        # since): while nothing is read there, the successor may be a rotation the writer
        # withdrew (see ``_withdrawn``)
        self._jumped: tuple[int, int] | None = None

    def poll(self, applied: int) -> Iterator[Record]:
        """Yield every whole, valid record past the current position."""
        self.blocked = None
        while True:
            if self._fd is None and not self._open(applied):
                return
            moved = yield from self._read()
            if not moved:
                return

    def _open(self, applied: int) -> bool:
        segs = list_segments(self.wal_dir)
        if self._jumped is not None and self.position == self._jumped[1] \
                and all(s != self.position for s, _p in segs):
            # the successor moved to is gone before it was opened: withdrawn (see
            # ``_withdrawn``; trimmed, the segments after it are reached from either).
            # Read at its start, the old segment was read inside the records the writer
            # went on appending there: CorruptionError on a sound log (audit 71 review)
            self.position, self._jumped = self._jumped[0], None
        for i, (start, path) in enumerate(segs):
            nxt = segs[i + 1][0] if i + 1 < len(segs) else None
            if nxt is not None and nxt <= self.position:
                continue  # wholly behind us
            if start > self.position:
                if start > applied:
                    # a hole we cannot explain: wait for the writer (its mark says whether
                    # the records in the hole had been published: then they are missing)
                    self.blocked = ("gap", f"segment starts at LSN {start} but the log read "
                                    f"reaches only LSN {self.position}: the segment holding "
                                    f"it is missing", path, 0, self.position)
                    return False
                self.skipped_to = start  # trimmed: LMDB holds what we did not read
                self.position = start
            try:
                reader = SegmentReader(path, self.store_id, start)
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                if self._jumped is not None and start == self._jumped[1]:
                    self.position, self._jumped = self._jumped[0], None  # (removed
                    return self._open(applied)  # since listed: as above, once)
                continue
            if reader.header_error or reader.file_size <= SEGMENT_HEADER_SIZE:
                os.close(fd)
                if reader.header_error:
                    self.blocked = ("bad-segment", reader.header_error, path, 0,
                                    max(start, self.position))
                return False
            self.close()
            self._seg, self._reader, self._fd = start, reader, fd
            self._sealed = False
            self._offset = reader.offset_of(self.position)
            return True
        return False

    def _read(self):
        """Records at the current position; returns True when the segment is finished."""
        reader = self._reader
        # (the size the segment had when opened: preallocated, the writer fills it in
        # place; a file shorter now reads short, as a record not yet whole)
        src = FileBytes(self._fd, reader.file_size, FOLLOW_WINDOW)
        while True:
            lsn = reader.lsn_at(self._offset)
            h, reason, buf, i = check_at(src, self._offset, reader.salt, lsn,
                                          reader.file_size, reader.path)
            if reason is not None:
                if self._jumped is not None and self._withdrawn(lsn):
                    return True
                moved = self._next_starts_at(lsn)
                if not moved:
                    self.blocked = (
                        ("gap", f"the segment is sealed: the log goes on at LSN {lsn}, but "
                                f"no segment starts there", reader.path, self._offset, lsn)
                        if self._sealed else
                        ("corrupt-record", reason, reader.path, self._offset, lsn))
                return moved
            end = self._offset + RECORD_HEADER_SIZE + h.length
            rec = Record(lsn, h.type, bytes(buf[i + RECORD_HEADER_SIZE:i + RECORD_HEADER_SIZE
                                                 + h.length]),
                         h.synced_lsn, reader.lsn_at(end), self._offset)
            self._offset = end
            self.position = rec.end_lsn
            self._sealed = rec.type == RecordType.SEAL
            if not self._sealed:
                yield rec

    def _next_starts_at(self, lsn: int) -> bool:
        later = [s for s, _p in list_segments(self.wal_dir) if s > self._seg]
        if later and later[0] in (lsn, lsn + SEAL_RECORD_SIZE):
            self.close()  # (sealed, or a rotation cut short before its SEAL: a crash
            self.position = later[0]  # image; the log goes on where the SEAL would end)
            self._jumped = None if later[0] == lsn else (lsn, later[0])
            return True
        if later and not os.path.exists(self._reader.path):
            self.close()  # our segment was trimmed under us
            return True
        return False

    def _withdrawn(self, lsn: int) -> bool:
        """At ``lsn``, no record: is this segment, reached from its predecessor's unsealed
        end and read nothing from, one the writer withdrew (made and named, then it could
        not open it: ``WriteAheadLog._withdraw`` removed it, and the writer goes on in the
        old segment where its SEAL was due)?  Then the read goes back there.  (It sat in
        the removed file, past every record appended after: it showed none of them, and
        raised CorruptionError once the writer's mark passed its position — audit 71.)
        One fstat, only while nothing was read past such a jump."""
        back, to = self._jumped
        if lsn != to or self._seg != to:  # (a record read here: the rotation was made)
            self._jumped = None
            return False
        try:
            if os.fstat(self._fd).st_nlink:
                return False
        except OSError:
            return False
        self.close()
        self.position, self._jumped = back, None
        return True

    def restart(self, lsn: int) -> None:
        """Read again from ``lsn`` (a new writer generation: ``Follower._restart``)."""
        self.close()
        self.position, self._jumped = lsn, None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._reader = None
