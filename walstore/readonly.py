"""Read-only opens: LMDB plus the committed WAL tail that LMDB does not hold yet.

A read-only process never writes a byte.  It opens LMDB read-only and *follows* the WAL:
``WalFollower`` remembers where it stopped (segment and offset) and, before every read,
checks whether a new record has appeared there (one header check when nothing is new),
moving to the next segment when the writer rotated.  Commits found past LMDB's
``applied`` LSN go into the reader's overlay.  So a read sees every commit whose record
was written (and, under durability="full", acknowledged) before the read began.

A partly written record simply ends the scan until it is whole; a segment trimmed by a
checkpoint while we read is skipped (its commits are in LMDB by then).
"""
from __future__ import annotations

import mmap
import threading

from . import records
from .framing import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, RecordType, check_record
from .kv import LmdbState
from .layout import Layout
from .segments import SegmentReader, list_segments


class WalFollower:
    """Incrementally reads committed transactions appended to the WAL."""

    def __init__(self, layout: Layout, store_id: bytes, state: LmdbState) -> None:
        self.layout = layout
        self.store_id = store_id
        self.state = state
        self.lock = threading.Lock()
        self.overlay: dict[bytes, tuple[int, bytes | None]] = {}
        self.published = state.applied_lsn()
        self._assembler = records.CommitAssembler()
        self._seg: tuple[int, str] | None = None
        self._reader: SegmentReader | None = None
        self._mm: mmap.mmap | None = None
        self._file = None
        self._offset = SEGMENT_HEADER_SIZE
        self.catch_up()

    def catch_up(self) -> None:
        """Read everything new; cheap when nothing is."""
        with self.lock:
            if len(self.overlay) > 10_000:
                self._prune()
            while True:
                if self._mm is None and not self._open_next():
                    return
                if self._read_available():
                    continue  # moved on to the next segment
                return

    def _open_next(self) -> bool:
        segs = list_segments(self.layout.wal)
        current = self._seg[0] if self._seg else None
        for start, path in segs:
            if current is not None and start <= current:
                continue
            if current is None and len(segs) > 1 and start < self.published:
                nxt = [s for s, _ in segs if s > start]
                if nxt and nxt[0] <= self.published:
                    continue  # wholly applied: LMDB has it
            try:
                reader = SegmentReader(path, self.store_id, start)
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            if reader.header_error or reader.file_size <= SEGMENT_HEADER_SIZE:
                f.close()
                return False
            self._close_segment()
            self._seg, self._reader, self._file = (start, path), reader, f
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._offset = SEGMENT_HEADER_SIZE
            return True
        return False

    def _read_available(self) -> bool:
        """Read records at the current position; True when the segment is finished."""
        mm, reader = self._mm, self._reader
        while True:
            lsn = reader.lsn_at(self._offset)
            h, reason = check_record(mm, self._offset, reader.salt, lsn, len(mm))
            if reason is not None:
                return self._newer_segment_starts_at(lsn)
            end = self._offset + RECORD_HEADER_SIZE + h.length
            payload = bytes(mm[self._offset + RECORD_HEADER_SIZE:end])
            self._offset = end
            self._apply(h.type, lsn, reader.lsn_at(end), payload)

    def _newer_segment_starts_at(self, lsn: int) -> bool:
        """Move on when the writer rotated at ``lsn`` — or, when a checkpoint trimmed the
        segments we had not read yet, to the first remaining one LMDB's applied reaches."""
        later = [s for s, _p in list_segments(self.layout.wal)
                 if self._seg is None or s > self._seg[0]]
        if later and (later[0] == lsn or later[0] <= self.state.applied_lsn()):
            self._close_segment(keep_position=True)
            return True
        return False

    def _apply(self, rtype: int, lsn: int, end: int, payload: bytes) -> None:
        if rtype not in (RecordType.WRITES, RecordType.COMMIT, RecordType.ABORT,
                         RecordType.ROLLBACK_PREPARED):
            return
        try:
            writes = self._assembler.feed(rtype, records.decode(payload))
        except ValueError:
            return  # a damaged record is the writer's recovery's business, not a reader's
        if writes is not None:  # reads ignore entries below the snapshot's applied LSN
            for k, v, _b in writes:
                self.overlay[k] = (lsn, v)
            self.published = max(self.published, end)

    def _prune(self) -> None:
        """Drop overlay entries LMDB already holds (keeps a long-lived reader bounded)."""
        applied = self.state.applied_lsn()
        for k in [k for k, (lsn, _v) in self.overlay.items() if lsn < applied]:
            del self.overlay[k]

    def _close_segment(self, keep_position: bool = False) -> None:
        if self._mm is not None:
            self._mm.close()
            self._file.close()
        self._mm = self._file = self._reader = None
        if not keep_position:
            self._offset = SEGMENT_HEADER_SIZE

    def close(self) -> None:
        with self.lock:
            self._close_segment()
