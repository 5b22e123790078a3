"""The writer's publication mark, shared with read-only processes: ``<store>/VISIBLE``.

A read-only process follows the WAL itself (:mod:`walstore.engine.follower`), and the WAL
holds more than the writer shows: a record is whole in the page cache as soon as it is
written, while under durability="full" the writer publishes it only after its fsync
returns, and never after an fsync error.  A reader that showed every whole record showed
commits the writer hid (its fsync failed: ``CommitOutcomeUnknown``; or it was still
running), and a power loss then erased a commit another process had acted on.  So the
writer shares its MemTable's ``published`` watermark here, and readers publish nothing
past it.

The file: 40 bytes, five 64-bit words in the machine's byte order (only live processes
of this machine read it), mapped shared by the writer and by each reader::

    0  MAGIC           b"WSVISIB1"
    1  generation      random, new at every writer open (64 bits)
    2  mark            the writer's published LSN
    3  check           mark ^ generation ^ 0xFFFF_FFFF_FFFF_FFFF
    4  purges          purges this writer generation applied to LMDB so far

``purges`` lets a reader's streamed scan, holding rows read from LMDB before a purge, see
cheaply (one load a row) that one was applied since and check it before yielding more
(``engine.snapshot``); a 32-byte file (a writer before it) has none: such a scan meets
the purge at its next chunk.

Each word is stored and loaded whole (an aligned 8-byte store or load is one instruction),
the writer storing the mark before its check.  A reader that finds the check disagreeing
(a store between the two, or a new generation half written) reads again; a pair that
agrees is a mark this writer published.  It is never fsynced: it speaks only to live
processes (after a power loss a reader starts afresh, and the next writer resets it).

Lifecycle (the writer, :class:`SharedMark`): created or taken over right after the open's
recovery positioned the log, before anything is appended (a crashed writer's mark may lie
past the end of a log a power loss cut, so it is reset first, with a new generation); then
set on every publication (``MemTable.publish``, one call: two word stores); set to the
log's end at a clean close.  A killed writer leaves its last mark: what it never published
stays hidden until the next writer's recovery decides it.  The generation tells readers
that a new writer began: the records past their own mark that they read before may be a
tail that recovery cut and the new writer overwrote, so they read them again.

No file (a store whose writers predate it, a copy, a backup): readers show every whole
record, as before.  A file that is not 40 (or, from an older writer, 32) bytes starting
with MAGIC counts as none.
"""
from __future__ import annotations

import mmap
import os
import time

NAME = "VISIBLE"
MAGIC = b"WSVISIB1"
SIZE = 40
OLD_SIZE = 32  # (a writer before the ``purges`` word)
MASK = (1 << 64) - 1
_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
READ_TRIES = 200  # a torn read is retried this often (yielding between tries)


def path_in(root: str) -> str:
    return os.path.join(root, NAME)


def _words(data) -> tuple[int, int, int, int]:
    w = memoryview(data)[:OLD_SIZE].cast("Q")
    try:
        return w[0], w[1], w[2], w[3]
    finally:
        w.release()


class SharedMark:
    """The writer's side: owns ``VISIBLE`` while the store is open for writing."""

    def __init__(self, root: str, mark: int) -> None:
        self.path = path_in(root)
        self.generation = int.from_bytes(os.urandom(8), "little") or 1
        self._key = self.generation ^ MASK
        fd = self._open()
        try:
            self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._w = memoryview(self._mm).cast("Q")
        # the new generation first, then its mark and check: a reader meanwhile finds a
        # check that agrees with neither the old generation nor the new one, and retries
        w = self._w
        w[1] = self.generation
        w[4] = 0
        w[2] = mark
        w[3] = mark ^ self._key

    def _open(self) -> int:
        """The existing file when it is well formed (readers that mapped it see the reset
        at once), else a new one put in place whole (a reader never maps a short file)."""
        try:
            fd = os.open(self.path, os.O_RDWR | _FLAGS)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                ok = (os.fstat(fd).st_size == SIZE
                      and os.pread(fd, len(MAGIC), 0) == MAGIC)
            except OSError:
                ok = False
            if ok:
                return fd
            os.close(fd)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _FLAGS, 0o600)
        try:
            os.fchmod(fd, 0o600)
            data = bytearray(SIZE)
            data[:len(MAGIC)] = MAGIC
            w = memoryview(data).cast("Q")
            w[1], w[2], w[3], w[4] = self.generation, 0, self._key, 0  # (mark: set below)
            w.release()
            os.pwrite(fd, bytes(data), 0)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return fd

    def note_purges(self, count: int) -> None:
        """Share how many purges this writer has applied to LMDB (after each one)."""
        self._w[4] = count

    def set(self, mark: int) -> None:
        """Share ``mark`` (the caller serializes calls; marks only grow)."""
        w = self._w
        w[2] = mark  # the mark first: a reader between the two stores retries
        w[3] = mark ^ self._key

    def close(self) -> None:
        if self._mm is not None:
            self._w.release()
            self._mm.close()
            self._mm = None


class MarkReader:
    """A reader's side: ``read()`` -> (generation, mark), or None (no usable file)."""

    def __init__(self, root: str) -> None:
        self.path = path_in(root)
        self._mm: mmap.mmap | None = None
        self._ident: tuple[int, int] | None = None
        self._purges: memoryview | None = None  # the mapped words, when 40 bytes

    def _map(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | _FLAGS)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if st.st_size not in (SIZE, OLD_SIZE):
                return False
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return False
        finally:
            os.close(fd)
        if mm[:len(MAGIC)] != MAGIC:
            mm.close()
            return False
        self.close()
        self._mm, self._ident = mm, (st.st_dev, st.st_ino)
        self._purges = memoryview(mm).cast("Q") if st.st_size == SIZE else None
        return True

    def purge_epoch(self) -> tuple[int, int] | None:
        """(generation, purges) as the writer shares them, or None (no file mapped, or
        one without the word): it changes whenever the writer applied a purge."""
        w = self._purges
        return None if w is None else (w[1], w[4])

    def replaced(self) -> bool:
        """Is the file now another one than the one mapped (or gone, or new)?"""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return self._mm is not None
        return (st.st_dev, st.st_ino) != self._ident

    def read(self, recheck: bool = False) -> tuple[int, int | None] | None:
        """(generation, mark) of the writer; mark None when no consistent pair could be
        read (a writer killed between its two stores: nothing past what the reader
        showed already is shown until the next writer resets the file).  ``recheck``:
        look whether the file was replaced first (a stat)."""
        if self._mm is None or (recheck and self.replaced()):
            if not self._map():
                self.close()
                return None
        mm = self._mm
        gen = -1
        for i in range(READ_TRIES):
            _m, gen, mark, check = _words(mm)
            if mark ^ gen ^ MASK == check:
                return gen, mark
            if i > 8:
                time.sleep(0)
        return gen, None

    def close(self) -> None:
        if self._mm is not None:
            if self._purges is not None:
                self._purges.release()
                self._purges = None
            self._mm.close()
            self._mm = None
            self._ident = None
