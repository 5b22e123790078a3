"""The writer's publication mark, shared with read-only processes: ``<store>/VISIBLE``.

A read-only process follows the WAL itself (:mod:`walstore.engine.follower`), and the WAL
holds more than the writer shows: a record is whole in the page cache as soon as it is
written, while under durability="full" the writer publishes it only after its fsync
returns, and never after an fsync error.  A reader that showed every whole record showed
commits the writer hid (its fsync failed: ``CommitOutcomeUnknown``; or it was still
running), and a power loss then erased a commit another process had acted on.  So the
writer shares its MemTable's ``published`` watermark here, and readers publish nothing
past it.

The file: 32 bytes, four 64-bit words in the machine's byte order (only live processes
of this machine read it), mapped shared by the writer and by each reader::

    0  MAGIC           b"WSVISIB1"
    1  generation      random, new at every writer open (64 bits)
    2  mark            the writer's published LSN
    3  check           mark ^ generation ^ 0xFFFF_FFFF_FFFF_FFFF

Each word is stored and loaded whole (an aligned 8-byte store or load is one instruction),
the writer storing the mark before its check.  A reader that finds the check disagreeing
(a store between the two, or a new generation half written) reads again; a pair that
agrees is a mark this writer published.  It is never fsynced: it speaks only to live
processes (after a power loss a reader starts afresh, and the next writer resets it).

Lifecycle (the writer, :class:`SharedMark`): created or taken over right after the open's
recovery positioned the log, before anything is appended (a crashed writer's mark may lie
past the end of a log a power loss cut, so it is reset first, with a new generation); then
set on every publication (``MemTable.publish``, one call: two word stores); at a clean
close, published up to the log's end as its checkpoint synced it (never past a synced
record: one appended meanwhile is shown once its own fsync returns; never down).  A killed
writer leaves its last mark: what it never published stays hidden until the next writer's
recovery decides it — in the boot it ran in.  A reader opened with no writer alive judges
the log first (a strict dry-run recovery); a torn pair then counts as its stored mark word
(the writer died between its two stores), and a file made before this boot
(``made_in_an_earlier_boot``) bounds nothing: every record in the log is on disk, the mark
is what a power loss left (``Follower``: its dead generation).  The generation tells
readers that a new writer began: the records past their own mark that they read before may
be a tail that recovery cut and the new writer overwrote, so they read them again.

No file (a store whose writers predate it, a copy, a backup): readers show every whole
record, as before.  A file that is not 32 bytes starting with MAGIC counts as none.

Beside it, ``<store>/PURGES`` (16 bytes: ``b"WSPURGE1"``, then a 64-bit word): the
writer's purge counter, random at every writer open and moved by one each time a purge
is applied to LMDB.  A reader's streamed scan (``engine.snapshot``) and its later reads
at an earlier snapshot (``Engine.follow_state``) compare it, one load, before each row or
read: changed, they follow the writer's LMDB and check what the purge erased first, so
rows read before a purge are never returned after it.  A separate file, so VISIBLE stays
as readers of earlier versions read it; without it (an older writer) readers follow the
writer before every such read instead.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import time

NAME = "VISIBLE"
MAGIC = b"WSVISIB1"
SIZE = 32
MASK = (1 << 64) - 1
_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
READ_TRIES = 200  # a torn read is retried this often (yielding between tries)


PURGES_NAME = "PURGES"
PURGES_MAGIC = b"WSPURGE1"
PURGES_SIZE = 16


def path_in(root: str) -> str:
    return os.path.join(root, NAME)


def _clear_way(path: str) -> None:
    """Make room at ``path`` for a file walstore makes anew: what is there and is not a
    regular file — a symlink, a FIFO, a socket — is unlinked (the link itself, never its
    target), an empty directory removed; a directory holding something is refused with
    one line saying what to do (these files are derived, never fsynced: safe to delete)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(path)
        except OSError as e:
            raise IsADirectoryError(
                errno.EISDIR, "a directory stands where walstore keeps a file shared with "
                "read-only processes (never fsynced, made anew at every writable open): "
                "move it away", path) from None
        return
    os.unlink(path)


def _take_or_make(path: str, size: int, magic: bytes, words: tuple[int, ...]) -> int:
    """An fd of the file at ``path`` opened read-write: the existing one when it is
    well formed (``size`` bytes starting with ``magic``: readers that mapped it see what
    is stored next at once), else a new one holding ``magic`` and ``words`` put in place
    whole (a reader never maps a short file).  Something else in its place (a directory,
    a symlink, a FIFO) is replaced as a malformed file is (it refused every writable open
    with EISDIR or ELOOP, or blocked it); a stale ``.tmp`` beside it is removed."""
    tmp = path + ".tmp"
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | _FLAGS)
    except (FileNotFoundError, IsADirectoryError):
        fd = -1
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        fd = -1  # (a symlink: O_NOFOLLOW; a socket)
    if fd >= 0:
        try:
            st = os.fstat(fd)
            ok = (stat.S_ISREG(st.st_mode) and st.st_size == size
                  and os.pread(fd, len(magic), 0) == magic)
        except OSError:
            ok = False
        if ok:
            _clear_way(tmp)
            if os.path.lexists(tmp) and stat.S_ISREG(os.lstat(tmp).st_mode):
                os.unlink(tmp)  # (a stale one: never read)
            return fd
        os.close(fd)
    _clear_way(path)
    _clear_way(tmp)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _FLAGS, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = bytearray(size)
        data[:len(magic)] = magic
        w = memoryview(data).cast("Q")
        for i, word in enumerate(words, 1):
            w[i] = word
        w.release()
        os.pwrite(fd, bytes(data), 0)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd


def _map_shared(path: str, size: int, magic: bytes, writable: bool = False
                ) -> tuple[mmap.mmap, tuple[int, int]] | None:
    """``path`` mapped shared (with its (dev, ino)) when it is ``size`` bytes starting with
    ``magic``; else None."""
    try:  # (non-blocking: a FIFO in its place blocked the open for ever)
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | _FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if mm[:len(magic)] != magic:
        mm.close()
        return None
    return mm, (st.st_dev, st.st_ino)


def _words(data) -> tuple[int, int, int, int]:
    w = memoryview(data).cast("Q")
    try:
        return w[0], w[1], w[2], w[3]
    finally:
        w.release()


class SharedMark:
    """The writer's side: owns ``VISIBLE`` (and ``PURGES``) while the store is open for
    writing."""

    def __init__(self, root: str, mark: int) -> None:
        self.path = path_in(root)
        self.generation = int.from_bytes(os.urandom(8), "little") or 1
        self._key = self.generation ^ MASK
        # (mark 0 until set below: a new file's words)
        fd = _take_or_make(self.path, SIZE, MAGIC, (self.generation, 0, self._key))
        try:
            self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._w = memoryview(self._mm).cast("Q")
        # the new generation first, then its mark and check: a reader meanwhile finds a
        # check that agrees with neither the old generation nor the new one, and retries
        w = self._w
        w[1] = self.generation
        w[2] = mark
        w[3] = mark ^ self._key
        # the purge counter: random at each open (a reader never takes a new writer's
        # count for the one it saw), one more at each purge applied
        start = int.from_bytes(os.urandom(8), "little")
        fd = _take_or_make(os.path.join(root, PURGES_NAME), PURGES_SIZE, PURGES_MAGIC,
                           (start,))
        try:
            self._pmm = mmap.mmap(fd, PURGES_SIZE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._pw = memoryview(self._pmm).cast("Q")
        self._pw[1] = start

    def note_purge(self) -> None:
        """A purge was applied to LMDB (the applier, after its LMDB commit)."""
        self._pw[1] = (self._pw[1] + 1) & MASK

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
            self._pw.release()
            self._pmm.close()


def boot_time() -> float | None:
    """When this machine booted (``btime`` of /proc/stat, seconds since the epoch), or None
    where it cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class MarkReader:
    """A reader's side: ``read()`` -> (generation, mark), or None (no usable file);
    ``purge_epoch()`` -> (generation, the writer's purge counter), or None (no
    ``PURGES``)."""

    def __init__(self, root: str) -> None:
        self.path = path_in(root)
        self._purges_path = os.path.join(root, PURGES_NAME)
        self._mm: mmap.mmap | None = None
        self._vw: memoryview | None = None  # VISIBLE's words (mapped with ``_mm``)
        self._ident: tuple[int, int] | None = None
        self._pmm: mmap.mmap | None = None
        self._pw: memoryview | None = None
        self._pident: tuple[int, int] | None = None
        self._pgen: int | None = None  # the generation PURGES was (re)mapped at
        self._tried = False

    def _map(self) -> bool:
        got = _map_shared(self.path, SIZE, MAGIC)
        if got is None:
            return False
        self.close()
        self._mm, self._ident = got
        self._vw = memoryview(self._mm).cast("Q")
        self._map_purges()
        return True

    def _map_purges(self) -> None:
        """Map ``PURGES`` afresh when it is another file than the one mapped (a new
        writer makes it anew when it was missing or malformed, while it may take VISIBLE
        over as it is: mapped once, a reader kept reading the old counter, which never
        moved, and missed every later purge: probe-review2)."""
        self._pgen = self._vw[1] if self._vw is not None else None
        try:
            st = os.stat(self._purges_path, follow_symlinks=False)
            ident = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        if ident is not None and ident == self._pident:
            return
        self._close_purges()
        got = _map_shared(self._purges_path, PURGES_SIZE, PURGES_MAGIC)
        if got is not None:
            self._pmm, self._pident = got
            self._pw = memoryview(self._pmm).cast("Q")

    def purge_epoch(self) -> tuple[int, int] | None:
        """(generation, purge counter) as the writer shares them: it changes whenever the
        writer applied a purge, or a new writer began (then ``PURGES`` is looked at again:
        it may be a new file); None when none is mapped (an older writer's store: callers
        follow every time)."""
        vw = self._vw
        if vw is None:
            if self._tried:
                return None
            self._tried = True  # (mapped once here when no read() mapped it yet)
            if not self._map():
                return None
            vw = self._vw
        gen = vw[1]
        if gen != self._pgen:
            self._map_purges()
        w = self._pw
        return None if w is None else (gen, w[1])

    def made_in_an_earlier_boot(self) -> bool:
        """Was the file last changed before this machine booted (its ctime: the writer's
        open made it, each publication's first store after a write-back touches it)?  Then
        every record of the log is on disk, and the mark — never fsynced — is whatever a
        power loss left (older than the acknowledged commits, or torn).  False when either
        time cannot be read (the mark is honoured, as before)."""
        booted = boot_time()
        if booted is None:
            return False
        try:
            return os.stat(self.path, follow_symlinks=False).st_ctime < booted
        except OSError:
            return False

    def stored_mark(self) -> int | None:
        """The mark word as stored, whatever its check word says (a writer that died
        between its two stores left the mark of a publication whose fsync had returned)."""
        if self._mm is None:
            return None
        return _words(self._mm)[2]

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

    def _close_purges(self) -> None:
        if self._pw is not None:
            self._pw.release()
            self._pmm.close()
        self._pw = self._pmm = self._pident = None

    def close(self) -> None:
        self._close_purges()
        if self._mm is not None:
            if self._vw is not None:
                self._vw.release()
                self._vw = None
            self._mm.close()
            self._mm = None
            self._ident = None
