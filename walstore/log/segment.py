"""WAL segment files: naming, durable preallocated creation, the spare, and appending.

A segment is one file ``wal/<start LSN, 20 digits>.wal``: a 64-byte header followed by
records (see :mod:`walstore.log.format`).  Files are preallocated with real zero bytes so
that an append overwrites already-allocated blocks and ``fdatasync`` needs no metadata
flush; the unused rest of a segment is zeros.  The header records the preallocated size,
so a segment cut short later (truncation) is told from a torn tail.

Invariants:
- a segment becomes visible under its final name only after its header and zero fill are
  durable, and the directory is fsynced after the rename (``create_segment``,
  ``Spare.activate``): a crash leaves no segment or a whole one;
- the *spare* (``wal/spare.tmp``) is a zero-filled, fsynced file prepared by a background
  thread, so rotation on the commit path costs a header write and three syncs, never a
  preallocation (a spare left by a crash is just removed at the next open); it is
  filled a piece at a time, each written back before the next, so the commits beside it
  never wait behind megabytes of its zeros;
- a ``SegmentWriter`` writes only at its end offset; a failed write does not move it.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import time

from .. import fileio
from ..fileio import free_bytes, remove_quietly
from .format import (SEGMENT_HEADER_SIZE, SEGMENT_MAGIC, decode_segment_header, encode_record,
                     encode_segment_header, segment_salt)

SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
NAME_CHECK_S = 0.05  # a synced segment's name is checked at most this often (``sync``)
SPARE_NAME = "spare.tmp"
_ZERO_CHUNK = bytes(1 << 20)
SPARE_PIECE = 256 * 1024  # the spare is zero-filled and written back this much at a time
# the spare is a speed-up: it is made only while the disk keeps this much free beside it
# (at least one more segment's size).  Filled regardless, it took a nearly full disk's
# last megabytes from under LMDB: a recovery with 3 MB free failed its close with ENOSPC
# on db/data.mdb while the spare thread zero-filled a 4 MiB spare beside it
SPARE_MIN_HEADROOM = 8 * 1024 * 1024


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


def stray_entries(wal_dir: str, store_id: bytes | None) -> list[tuple[str, str, bool]]:
    """(path, why, blocking) of each entry of ``wal/`` that is not a segment by its name:
    ``list_segments`` ignores them, so a segment an operator renamed (``X.wal.bak``) was
    silently left out of the log (a "missing" segment lying beside it, never named), and a
    directory where a leftover temp file belongs (``spare.tmp``) failed every open with a
    bare EISDIR from the cleanup while ``verify`` said ok.  ``blocking``: recovery cannot
    go on (it unlinks leftover temp files, and cannot a directory).  A file that holds
    this store's segment header under another name is named as such."""
    out = []
    for name in sorted(os.listdir(wal_dir)):
        if SEGMENT_NAME.match(name):
            continue
        path = os.path.join(wal_dir, name)
        temp = name == SPARE_NAME or name.endswith(".tmp")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if temp:
            if stat.S_ISDIR(st.st_mode):  # (any other kind of name unlinks: a symlink's
                # own name, never its target; only a directory is in the cleanup's way)
                out.append((path, f"{name} is a directory, where walstore keeps only temp "
                                  f"files it made and removes (the WAL's spare or a segment "
                                  f"being created): move it out of wal/", True))
            continue
        head = b""
        if stat.S_ISREG(st.st_mode):
            try:
                with open(path, "rb") as f:
                    head = f.read(SEGMENT_HEADER_SIZE)  # (bounded: a header's size)
            except OSError:
                head = b""
        why = f"{name} is not a WAL segment name (NNNNNNNNNNNNNNNNNNNN.wal): it is ignored"
        if head.startswith(SEGMENT_MAGIC):
            try:
                h = decode_segment_header(head)
            except ValueError:
                h = None
            if h is not None and (store_id is None or h.store_id == store_id):
                why += (f"; it holds this store's segment starting at LSN {h.start_lsn} "
                        f"(renamed? its name is {segment_name(h.start_lsn)}): the log "
                        f"does not read it")
            else:
                why += "; it holds a WAL segment header (of another store, or damaged)"
        out.append((path, why, False))
    return out


class FsyncFailed(OSError):
    """An fsync failed: the caller must stop writing (never retry an fsync)."""


def fsync_or_fail(fn, target) -> None:
    try:
        fn(target)
    except OSError as e:
        raise FsyncFailed(e.errno, f"fsync failed: {e.strerror or e}") from e


def _zero_fill(fd: int, start: int, size: int, piece: int = len(_ZERO_CHUNK)) -> None:
    """Write zeros over [start, size).  With ``piece`` smaller than the default, each
    piece is written back to the device (``fileio.write_back``) before the next is
    written: the background spare never has more than a piece in flight, so a commit's
    fdatasync meanwhile does not queue behind megabytes of zeros (10,000 2 KiB commits
    into a new store: the two beside a 16 MiB spare's fill took 8-16 ms; 1-2 ms now).
    Where the platform cannot, the rest is written plainly."""
    pos = start
    trickle = piece < len(_ZERO_CHUNK)
    while pos < size:
        n = min(piece, size - pos)
        fileio.pwrite_all(fd, _ZERO_CHUNK[:n], pos)
        if trickle:
            try:
                trickle = fileio.write_back(fd, pos, n)
            except OSError as e:  # (an I/O error writing the device: as an fsync's)
                raise FsyncFailed(e.errno, f"writing back a WAL spare failed: "
                                           f"{e.strerror or e}") from e
            if not trickle:
                piece = len(_ZERO_CHUNK)
        pos += n


def create_segment(wal_dir: str, store_id: bytes, start_lsn: int, size: int) -> str:
    """Create a preallocated segment durably (tmp, fill, fsync, rename, dir fsync)."""
    path = os.path.join(wal_dir, segment_name(start_lsn))
    tmp = path + ".tmp"
    fd = fileio.open_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        fileio.pwrite_all(fd, encode_segment_header(store_id, start_lsn, time.time_ns(), size), 0)
        _zero_fill(fd, SEGMENT_HEADER_SIZE, size)
        fsync_or_fail(fileio.fsync, fd)
    except BaseException:
        os.close(fd)
        remove_quietly(tmp)
        raise
    os.close(fd)
    try:
        fileio.rename(tmp, path)
    except OSError:
        remove_quietly(tmp)
        raise
    fsync_or_fail(fileio.fsync_dir, wal_dir)
    return path


# the least a segment made on a nearly full disk holds (beside the record in hand)
SMALL_SEGMENT = 64 * 1024
# a segment made at its full size leaves at least this free beside it, else a small one is
# made (LMDB's writes meanwhile need the room; the engine calls less than 1 MiB full)
SEGMENT_MIN_HEADROOM = 1024 * 1024


def create_segment_fitting(wal_dir: str, store_id: bytes, start_lsn: int, size: int,
                           least: int) -> tuple[str, int]:
    """``create_segment`` of ``size`` bytes, or, when that does not fit on the disk
    (ENOSPC while it is filled; nothing of it kept), of ``least`` bytes (at least
    SMALL_SEGMENT): the log goes on in a small segment, and the segments after it grow
    again (fourfold per rotation, as a new store's do).  Before, a store whose next
    segment did not fit refused every commit from then on, each needing a few KiB, while
    the disk still had megabytes free.
    The full size is tried only while the disk would keep SEGMENT_MIN_HEADROOM free
    beside it: filled until ENOSPC, then removed, it left the disk with 0 bytes free for
    that moment, and an LMDB commit of the applier landing in it would fail (as the spare's
    fill did before SPARE_MIN_HEADROOM).
    Returns (path, size made).  A failed fsync (FsyncFailed) is never retried."""
    least = max(least, SMALL_SEGMENT)
    if least < size:
        free = free_bytes(wal_dir)
        if free is not None and free - size < SEGMENT_MIN_HEADROOM:
            return create_segment(wal_dir, store_id, start_lsn, least), least
    try:
        return create_segment(wal_dir, store_id, start_lsn, size), size
    except FsyncFailed:
        raise
    except OSError as e:
        if e.errno != errno.ENOSPC or least >= size:
            raise
    return create_segment(wal_dir, store_id, start_lsn, least), least


class NoRoomForSpare(OSError):
    """The disk is too full to spend on a spare (nothing was written)."""


class Spare:
    """A zero-filled, fsynced file waiting to become the next segment.

    ``prepare`` runs off the commit path (a background thread); ``activate`` turns it into
    the segment starting at a given LSN (header, fdatasync, rename, directory fsync).
    """

    def __init__(self, wal_dir: str) -> None:
        self.path = os.path.join(wal_dir, SPARE_NAME)
        self.wal_dir = wal_dir
        self.size = 0  # 0: no spare ready

    def prepare(self, size: int) -> None:
        """Zero-fill and fsync a ``size``-byte spare; NoRoomForSpare (an OSError,
        ENOSPC) and no file when the disk would keep less than a segment's size (and
        SPARE_MIN_HEADROOM) free beside it: the commits' own writes need that room more."""
        self.size = 0  # (the old spare goes first, whatever happens next)
        remove_quietly(self.path)
        free = free_bytes(self.wal_dir)
        if free is not None and free - size < max(size, SPARE_MIN_HEADROOM):
            raise NoRoomForSpare(errno.ENOSPC, f"no spare made: {free} bytes free, a "
                                 f"{size}-byte spare would leave less than "
                                 f"{max(size, SPARE_MIN_HEADROOM)}", self.path)
        fd = fileio.open_file(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            _zero_fill(fd, 0, size, SPARE_PIECE)
            fsync_or_fail(fileio.fsync, fd)
        except FsyncFailed:
            os.close(fd)
            raise  # the caller stops the log first, then discards the file (no write to it
            # between: the close releases the GIL, and a commit whose fsync lands in that
            # gap is durable and rightly acknowledged — tools/faultsweep.py counts so)
        except BaseException:
            os.close(fd)
            remove_quietly(self.path)
            raise
        os.close(fd)
        self.size = size

    def activate(self, store_id: bytes, start_lsn: int) -> str:
        """Make the spare the segment at ``start_lsn``; FsyncFailed when a sync fails."""
        size, self.size = self.size, 0
        fd = fileio.open_file(self.path, os.O_RDWR)
        try:
            fileio.pwrite_all(fd, encode_segment_header(store_id, start_lsn, time.time_ns(), size),
                              0)
            fsync_or_fail(fileio.fdatasync, fd)
        finally:
            os.close(fd)
        path = os.path.join(self.wal_dir, segment_name(start_lsn))
        fileio.rename(self.path, path)
        fsync_or_fail(fileio.fsync_dir, self.wal_dir)
        return path

    def discard(self) -> None:
        self.size = 0
        remove_quietly(self.path)


class SegmentWriter:
    """Appends framed records to one open segment at increasing offsets."""

    def __init__(self, path: str, store_id: bytes, start_lsn: int, offset: int) -> None:
        self.path = path
        self.start_lsn = start_lsn
        self.salt = segment_salt(store_id, start_lsn)
        self.fd = fileio.open_file(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.offset = offset  # file offset of the next record
        self._name_checked = float("-inf")  # (``sync``: when it last saw the file named)

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
        """fdatasync the segment; an OSError when it failed, or when the file has no name
        left (its ``wal/`` deleted under the open store: every commit synced into it would
        be acknowledged and then lost, as no open could find it).  That second check runs
        at most every NAME_CHECK_S: an fstat beside the commit's pwrite and fdatasync cost
        ~30 us on ext4 here (a fifth of a durable commit), so a commit synced within that
        interval of the deletion may still be acknowledged."""
        fileio.fdatasync(self.fd)
        now = time.monotonic()
        if now - self._name_checked >= NAME_CHECK_S:
            self._name_checked = now
            if os.fstat(self.fd).st_nlink == 0:
                raise FileNotFoundError(errno.ENOENT, "the WAL segment was deleted while "
                                        "the store was open", self.path)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1  # (forgotten first: an interrupt after the close must
            os.close(fd)               # not leave a number a later close would close again)
