"""The write-ahead log as a whole: appends, rotation, group-commit fsync, trimming.

Owns the directory ``<store>/wal`` once recovery has positioned it (see
:mod:`walstore.recovery`).  The log is one LSN space cut into segments; an LSN is a byte
position in that space (segment headers excluded).

Invariants:
- records are appended in LSN order by one thread at a time (``append`` takes the lock);
- ``synced_lsn`` only grows, and every byte below it has been fdatasynced;
- a segment is fsynced in full before the next one is created (so only the last segment
  can hold a torn tail);
- after an fsync error the log is *failed*: nothing is written or synced again, every
  later append raises ReadOnlyError (a retried fsync can lie: FACTS.md);
- a write error (ENOSPC, EIO) fails only the append in hand: the end position is not
  advanced, so the next record overwrites the partial bytes;
- segments are removed only when wholly below the trim point the caller computes, and
  never the segment being written.
"""
from __future__ import annotations

import os
import threading

from . import fileio
from .errors import ReadOnlyError, WalstoreError
from .framing import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from .segments import (FsyncFailed, SegmentWriter, create_segment, list_segments,
                       segment_name)

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
FIRST_SEGMENT_SIZE = 1024 * 1024  # a new store's first segment; later ones double


class WalWriteError(WalstoreError, OSError):
    """Writing a record failed (disk full, I/O error); nothing of it counts as logged."""


class WriteAheadLog:
    def __init__(self, wal_dir: str, store_id: bytes, segment_start: int, offset: int,
                 segment_size: int = DEFAULT_SEGMENT_SIZE, synced_lsn: int | None = None) -> None:
        self.dir = wal_dir
        self.store_id = store_id
        self.segment_size = max(segment_size, SEGMENT_HEADER_SIZE + 4096)
        self.lock = threading.RLock()      # appends and rotation
        self._sync_lock = threading.Lock()  # one fsync (or rotation) at a time
        self._sync_cond = threading.Condition(threading.Lock())  # group-commit waiters
        self._syncing = False
        self.after_sync = None  # called by the fsync leader with the new synced LSN
        self.writer = SegmentWriter(os.path.join(wal_dir, segment_name(segment_start)), store_id,
                                    segment_start, offset)
        self.written_lsn = self.writer.end_lsn
        self.synced_lsn = self.written_lsn if synced_lsn is None else synced_lsn
        self.failed: BaseException | None = None
        self.bytes_since_checkpoint = 0
        self.fsyncs = 0

    # ---- appending ---------------------------------------------------------------------
    def append(self, rtype: int, payload: bytes) -> tuple[int, int]:
        """Append one record; returns (lsn, end_lsn).  Not yet durable: see ``sync_to``."""
        with self.lock:
            self._check_usable()
            need = RECORD_HEADER_SIZE + len(payload)
            if need > self.writer.room():
                self._rotate(need)
            lsn = self.writer.end_lsn
            data = self.writer.frame(rtype, payload, self.synced_lsn, lsn)
            try:
                self.writer.write_at_end(data)
            except OSError as e:
                self.writer.scrub(len(data))  # best effort: no stale half record behind the end
                raise WalWriteError(e.errno, f"could not write the WAL record: {e.strerror or e}"
                                    ) from e
            self.written_lsn = self.writer.end_lsn
            self.bytes_since_checkpoint += len(data)
            return lsn, self.written_lsn

    def _rotate(self, need: int) -> None:
        old = self.writer
        start = old.end_lsn
        # Segments grow: twice the last one, up to segment_size, so a small store keeps
        # small files while a busy one rotates rarely.
        size = max(min(self.segment_size, 2 * old.size), SEGMENT_HEADER_SIZE + need)
        with self._sync_lock:  # held throughout, so sync_to never sees a closing writer
            self._fsync(old)
            self.synced_lsn = max(self.synced_lsn, start)
            try:
                path = create_segment(self.dir, self.store_id, start, size)
            except FsyncFailed as e:
                self.failed = e.__cause__ or e
                raise ReadOnlyError(f"fsync failed while creating a WAL segment ({e}); the "
                                    f"store is now read-only (reopen it to recover)") from e
            except OSError as e:
                raise WalWriteError(e.errno, f"could not create a new WAL segment: "
                                             f"{e.strerror or e}") from e
            self.writer = SegmentWriter(path, self.store_id, start, SEGMENT_HEADER_SIZE)
            old.close()

    def rotate(self) -> int:
        """Start a new segment now (sealing the current one); returns its start LSN."""
        with self.lock:
            self._check_usable()
            self._rotate(0)
            return self.writer.start_lsn

    # ---- durability --------------------------------------------------------------------
    def sync_to(self, lsn: int) -> None:
        """Return once every byte below ``lsn`` is durable; concurrent callers share fsyncs.

        Group commit: one caller at a time is the leader and fsyncs everything written so
        far; the others wait on a condition and, when it is done, either find their bytes
        covered or one of them leads the next fsync at once.
        """
        if self.synced_lsn >= lsn:
            return
        with self._sync_cond:
            while True:
                if self.synced_lsn >= lsn:
                    return
                self._check_usable()
                if not self._syncing:
                    self._syncing = True
                    break
                self._sync_cond.wait()
        done = None
        try:
            # Rotation needs _sync_lock, so the writer cannot change under us; appends go
            # on while we fsync (that is what lets later committers share the next fsync).
            with self._sync_lock:
                target = self.written_lsn
                self._fsync(self.writer)
                done = target
        finally:
            with self._sync_cond:
                if done is not None:
                    self.synced_lsn = max(self.synced_lsn, done)
                self._syncing = False
            if done is not None and self.after_sync is not None:
                self.after_sync(self.synced_lsn)  # e.g. publish the batch once, for everyone
            with self._sync_cond:
                self._sync_cond.notify_all()

    def sync(self) -> None:
        self.sync_to(self.written_lsn)

    def _fsync(self, writer: SegmentWriter) -> None:
        try:
            writer.sync()
            self.fsyncs += 1
        except OSError as e:
            self.failed = e
            raise ReadOnlyError(f"fsync of the WAL failed ({e.strerror or e}); the store is now "
                                f"read-only, the unsynced commits are unknown until recovery "
                                f"(reopen the store)") from e

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise ReadOnlyError(f"the store turned read-only after an fsync error: {self.failed}")

    # ---- trimming ----------------------------------------------------------------------
    def trim_below(self, lsn: int) -> list[str]:
        """Remove segments whose every record lies below ``lsn``; returns removed paths."""
        with self.lock:
            segs = list_segments(self.dir)
            removed = []
            for (start, path), (next_start, _) in zip(segs, segs[1:]):
                if next_start <= lsn and start != self.writer.start_lsn:
                    fileio.unlink(path)
                    removed.append(path)
            if removed:
                fileio.fsync_dir(self.dir)
            return removed

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(p) for _, p in list_segments(self.dir))

    def close(self) -> None:
        with self.lock:
            self.writer.close()

