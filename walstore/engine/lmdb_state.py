"""The LMDB environment: the materialized state of the log, and how it is read.

Owns ``<store>/db`` and its named databases (tables):

- ``data``:     stored key -> packed value (committed state up to ``applied``);
- ``meta``:     bookkeeping, u64 big endian: ``applied`` (end LSN of the last applied log
                event), ``next_txid``, ``open`` (1 while a writer has the store open: the
                clean-shutdown flag), ``horizon`` (history retention), ``wal_start``,
                ``map_size`` (the writer's map: ``MAP_SIZE``) and its stamps
                ``map_size_at``, ``map_size_applied`` (``noted_map_size``);
- ``txns``:     txid -> the committed transaction's log row;
- ``bylsn``:    commit LSN -> txid;  ``hist``: key versions;  ``hkeys``: keys with history
                (see :mod:`walstore.engine.tables`);
- ``points``:   restore points;  ``actions``: action rows;  ``inflight``: txids with
                logged intents that have not ended;  ``twophase``: prepared transactions
                and 2PC decisions;  ``aended``: end LSN -> txid, transactions whose
                action rows retention has still to trim (``Applier.trim_ended_actions``);
                ``owed``: the ids of the action rows in flight, pending or failed (what
                an open's settle and ``pending_compensations()`` read instead of every
                action row: ``tables.OWED_INDEX_STATES``, ``Views.owed_rows``).

Invariants:
- opened sync=True, metasync=False, never sync=False / map_async / writemap: a power loss
  may undo the last LMDB commits but never corrupts the B-tree, and ``applied`` is in the
  same LMDB transaction as what it covers, so REDO from ``applied`` is idempotent;
- every write goes through ``write``, and only :mod:`walstore.engine.apply` calls it;
- every read is a short read transaction (a point read, or one chunk of a scan): nothing
  holds a reader slot or old pages while an agent thinks, and the map can always grow.
  py-lmdb frees an aborted read transaction's reader slot only when the object is freed,
  so no generator keeps one bound across a yield (a scan left unfinished held a slot);
  ``ReadGate`` keeps a resize out of the few microseconds a read spends inside LMDB
  (py-lmdb invalidates open transactions on a resize);
- every environment call that py-lmdb (3.x) coordinates process-wide goes through the
  gate too: a write transaction's abort and ``close`` wait until no LMDB call is in flight
  anywhere in the process (busy readers could put that off forever), so they run with
  readers held out (``ReadGate.exclusive``); ``sync`` and ``info`` fail with EINVAL if
  they start during a resize, so they enter the gate like a read; in a read-only process
  a reader that finds the map grown by the writer (MapResizedError) remaps through the
  gate as well, one at a time, so no other thread's read transaction is open meanwhile;
- a compaction (a purge's checkpoint) or a reopen swaps the environment and every table
  handle of the process: callers name tables (``get(key, "txns")``, ``scan(..., db=
  "hist")``) and the handle is looked up inside the gate, never carried across it; a
  swap whose rename or directory fsync fails reopens the environment on the data file
  then in place (the old one: a StoreIOError, the store goes on; the new one, beside a
  lock file in doubt: a StateWriteError, the store stops writing until reopened);
- the map is large from the start (LMDB maps are sparse: the file grows with the data,
  not with the map) and doubles when full, which the user never sees (smaller steps when
  the process may not map that much; none possible: a StateWriteError, the old map kept);
- an ``lmdb.Error`` never leaves this module raw: reads raise CorruptionError naming the
  file, writes a ``StateWriteError`` (the caller turns the store read-only, and this
  handle refuses every later write, sync and compaction itself, under the write lock,
  as after a compaction's swap that failed half-way: no other thread's commit
  fdatasyncs LMDB after a failed one); a u64 row
  whose key or value is not 8 bytes (``from_u64``, every caller naming the row) is a
  CorruptionError naming the table, the key and the file (``tables.u64_damaged``);
- py-lmdb releases the GIL around every call (each a microsecond or less); beside a busy
  Python thread a call then costs the wait to get the GIL back, so hot paths make as few
  calls as they can: one per row of a scan (``iternext``/``iterprev``), and a scan's
  first chunk is small (a caller after the newest row reads a few, not 256);
- ``applied_bound`` (in-process, raised by ``write`` before each commit) lets a snapshot
  read skip reading ``applied`` when nothing newer than its snapshot can be in LMDB; a
  handle of an environment this process does not write knows no bound;
- the data file is checked before it is mapped (:mod:`walstore.engine.lmdb_check`): a
  truncated, zeroed or foreign-format file is a CorruptionError, never a SIGBUS;
- every environment is opened through ``open_env``: no descriptor of it outlives an exec
  (LMDB leaves its data file's open without O_CLOEXEC).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import mmap
import os
import shutil
import stat
import struct
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from .. import fileio
from ..errors import (CorruptionError, NotAStore, ReadOnlyError, StoreClosed, StoreIOError,
                      WalstoreError)
from ..signals import deferred
from . import tables
from .lmdb_check import check_lmdb_files, unborn_data_file

T = TypeVar("T")

DEFAULT_MAP_SIZE = 64 << 30  # 64 GiB of address space; the file only grows with the data
MAX_DBS = 32  # (the named tables below, with room: an environment counts them at open)
MAX_TABLE_GROWTHS = 8  # doublings of a map too small for the tables an open creates
# LMDB reader slots (64 bytes each in lock.mdb): every open read transaction takes one,
# and an unfinished scan keeps its own, so this bounds the scans open at once
MAX_READERS = 1024
# lock.mdb's size for MAX_READERS (LMDB: a 192-byte header holding the first slot, then
# 64 bytes per further slot), allocated before LMDB maps it: see _preallocate_lock
LOCK_FILE_BYTES = 192 + (MAX_READERS - 1) * 64
# preallocating lock.mdb failed for a reason that is not ours to report: the file cannot be
# written by this process (a reader of a store it may not write) or the file system cannot
# preallocate; LMDB is left to open it as it would have
_PREALLOC_SKIP = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL, errno.EOPNOTSUPP,
                  errno.ENOSYS, errno.ENODEV, errno.ESPIPE, errno.EBADF}
_ERRNO_OF = {os.strerror(n): n for n in errno.errorcode}


def os_errno(e: "lmdb.Error") -> int | None:
    """The errno of an LMDB error that is an operating-system error, else None.  py-lmdb
    ends its message with the strerror text (and raises most as the base ``lmdb.Error``,
    but EACCES as ``ReadonlyError``, EIO as ``DiskError``...); LMDB's own errors end with
    LMDB's texts, none of which is an strerror."""
    return _ERRNO_OF.get(str(e).rsplit(": ", 1)[-1].strip())


LOW_ROOM_BYTES = 1 << 20  # an LMDB write failing with less free than this: a full disk


def low_room_note(data_file: str) -> str:
    """The note "; its file system has N bytes free (...)" when ``data_file``'s is
    nearly full (an LMDB write failing then: the disk is full, whatever LMDB says),
    else ""."""
    room = fileio.free_bytes(os.path.dirname(data_file))
    return (f"; its file system has {room} bytes free{_ROOM_SAID} reports as an I/O error)"
            if room is not None and room < LOW_ROOM_BYTES else "")


_ROOM_SAID = " (a full disk reaches LMDB as a short write, which it"  # (the note's words:
# an error that carries them already is not given the note again -- see state_io_error)


SCAN_CHUNK = 256
# a snapshot scan's chunk stops at this many bytes of values too: 256 rows of values up to
# 16 MiB each were read at once (a scan's first row over 4 MiB values held 16 of them)
SCAN_CHUNK_BYTES = 8 << 20
_U64 = struct.Struct(">Q")
DATA = object()  # "the data table" as a default argument

TABLES = {"data": b"data", "txns": b"txns", "meta": b"meta", "hist": b"hist",
          "bylsn": b"bylsn", "points": b"points", "actions": b"actions",
          "twophase": b"twophase", "hkeys": b"hkeys", "inflight": b"inflight",
          "workspaces": b"workspaces", "fsteps": b"fsteps", "fversions": b"fversions",
          "fchanges": b"fchanges", "fconflicts": b"fconflicts", "aended": b"aended",
          "owed": b"owed"}


class StateWriteError(WalstoreError):
    """Writing LMDB failed (I/O error, disk full, a damaged file): the log still holds
    everything; the store must stop writing and be reopened (recovery REDOes the log)."""


def _restart_cut_short_creation(data_file: str) -> None:
    """A writable open of a store with no log segment whose data file is a creation cut
    short while LMDB wrote its meta pages (``unborn_data_file``: shorter than two pages,
    page 0 zeros or LMDB's fresh meta page, no transaction ever committed): the file is
    removed, for LMDB to make it again.  Kept, every later open refused the store as
    damaged ("too short ... to hold both meta pages") and ``walstore recover`` said to
    restore a store that never held anything (h2 stop 83).  Any other short file is left
    for ``check_lmdb_files`` to refuse as damage."""
    if not unborn_data_file(data_file):
        return
    try:
        fileio.unlink(data_file)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreIOError(e.errno, f"cannot remove the data file a cut-short creation "
                                    f"left: {e.strerror or e}", data_file) from e


def state_io_error(e: StateWriteError, doing: str, after: str,
                   data_file: str) -> StoreIOError:
    """README, "Errors": ``e`` (an LMDB write or sync failing) as the StoreIOError a caller
    lets out: the cause's errno (EIO when it has none), ``data_file`` named, "``doing``
    failed: ...", the file system's free space when it is nearly none (a full disk
    reaches LMDB as a short write, which it reports as EIO), then ``after``."""
    cause = e.__cause__
    code = getattr(cause, "errno", None) or (
        os_errno(cause) if isinstance(cause, lmdb.Error) else None) or errno.EIO
    # (a refusal after a failed write carries the note already: ``_refuse_after_failure``;
    # said twice before, h2 stop 83)
    note = "" if _ROOM_SAID in str(e) else low_room_note(data_file)
    return StoreIOError(code, f"{doing} failed: {e}{note}; {after}", data_file)


def _file_id(path: str, lock_file: str | None = None) -> tuple:
    """The identity of the data file ``path`` and of the lock file beside it
    (``lock_file``, its path if known).  Both: a compaction renames the data file in, then
    the lock file, and a reader that reopened between the two renames had the new data
    file under the OLD lock file (never written again: LMDB's transaction id there is
    stale, so its meta page is chosen by a stale id); it must see the lock file replaced
    and reopen again."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    try:
        lk = os.stat(lock_file or os.path.join(os.path.dirname(path), "lock.mdb"))
    except FileNotFoundError:
        return (st.st_dev, st.st_ino)
    return (st.st_dev, st.st_ino, lk.st_dev, lk.st_ino)


# ``meta`` row: the map size the writer runs with, noted at its first LMDB write and at each
# growth (``walstore stats`` reads it: the size LMDB records in data.mdb's meta pages only
# ever grows — "persist any increases" — so it is the largest map any writer committed
# with, and said 64 GiB of a store whose writer runs with 8 MiB after one default open)
MAP_SIZE = b"map_size"
# ... and the ``txid_reserved`` row as it was when the note was made: every writable open
# of any walstore that reads this format writes ``txid_reserved`` (and this one notes its
# map again with it: ``put_map_note``), but one older than the note never notes its map
# — a note whose stamp is not ``txid_reserved`` now is another writer's, stale
# (``noted_map_size``; a stop-69 note, without a stamp, cannot be told from one)
MAP_SIZE_AT = b"map_size_at"
TXID_RESERVED = b"txid_reserved"
# ... and the ``applied`` row as it was then: a clean close writes ``txid_reserved`` as the
# next id, so an older walstore's open and clean close that handed out no id put back the
# very stamp this one's close left (its note, another map, said as the last writer's);
# its open and close apply log records, so once the store is closed (``open`` 0) the note
# is the last writer's only if ``applied`` is still as it was (probe-audit70 review)
MAP_SIZE_APPLIED = b"map_size_applied"


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(raw: bytes | None, default: int = 0, table: str = "meta",
             key: bytes | None = None, state: "LmdbState | None" = None) -> int:
    """The u64 ``raw`` read from row ``key`` of ``table`` (``key`` None: ``raw`` is that
    row's key), ``default`` when absent.  Bytes of another length than 8 (damage) are a
    CorruptionError naming the table, the key and ``state``'s data file, the struct error
    chained.  (Every reader names its row: the arguments are constants and locals, and the
    try costs nothing when nothing is raised.)"""
    if raw is None:
        return default
    try:
        return _U64.unpack(raw)[0]
    except struct.error as e:
        raise tables.u64_damaged(table, raw if key is None else key, raw, key is None,
                                 None if state is None else state.data_file) from e


class ReadGate:
    """Keeps a map resize out of the moment a reader is inside LMDB, without a lock on the
    read path: each reading thread flags itself (CPython makes these stores and loads
    sequentially consistent); a resize raises ``paused``, waits for the flags to clear,
    resizes, and lets readers in again."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._slots: list = []
        self._slots_lock = threading.Lock()
        self._cond_lock = threading.RLock()  # (entered as itself: walstore.signals)
        self._cond = threading.Condition(self._cond_lock)
        self._exclusive_lock = threading.Lock()
        self.paused = False

    def _slot(self):
        try:
            return self._local.slot
        except AttributeError:
            slot = self._local.slot = _Slot()
            with self._slots_lock:
                self._slots = [s for s in self._slots if s.thread.is_alive()] + [slot]
            return slot

    def slot(self) -> "_Slot":
        """This thread's slot (made on first use)."""
        try:
            return self._local.slot
        except AttributeError:
            return self._slot()

    def step_in(self, slot: "_Slot") -> None:
        """Count this thread in (``slot``: :meth:`slot`), waiting while a resize is under
        way.  Callers save ``slot.depth`` before and restore it in a ``finally`` with two
        plain stores (``slot.depth = depth; slot.inside = depth > 0``: no call, where
        CPython could deliver a signal): whatever an interrupt cuts short, in here or in
        the read, the slot is left exactly as it was found (a slot left counted in kept
        every exclusive section, a map resize or close, waiting forever)."""
        slot.depth += 1
        if slot.depth > 1:
            return
        slot.inside = True
        while self.paused:  # a resize is under way: step out until it is done
            slot.inside = False
            with self._cond_lock:
                while self.paused:  # (a timeout: a notify an interrupt cut short, at
                    self._cond.wait(0.05)  # notify_all's call, is not waited for ever)
            slot.inside = True

    def enter(self) -> "_Slot":
        """Step in and return the slot, for ``leave`` (a section no interrupt can cut
        between the two: tests; walstore's own readers restore the depth, see step_in)."""
        slot = self.slot()
        self.step_in(slot)
        return slot

    @staticmethod
    def leave(slot: "_Slot") -> None:
        slot.depth -= 1
        if slot.depth == 0:
            slot.inside = False

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` inside the gate (no map resize meanwhile)."""
        slot = self.slot()
        depth = slot.depth
        try:
            self.step_in(slot)
            return fn(*args)
        finally:
            slot.depth = depth
            slot.inside = depth > 0

    def exclusive(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` while no other reader is inside LMDB (readers wait a moment).

        One exclusive section at a time.  The caller may itself be a reader inside the
        gate (a read-only process's reader that found the map grown by the writer, and
        remaps): it steps out while it waits for another section, so two such readers
        never wait on each other, and its own slot never holds the section up.  (A
        caller with a read of its own still open further up its stack — a scan being
        iterated while the same thread remaps — would see that read invalidated; no
        walstore path does that.)"""
        me = getattr(self._local, "slot", None)
        stepped_out = me is not None and me.inside
        if stepped_out:
            me.inside = False
        try:
            with self._exclusive_lock:
                try:  # (paused inside it: an interrupt at the lock's exit, before a try
                    # begun after it, left the gate closed, every read waiting for ever)
                    with self._cond_lock:
                        self.paused = True
                    while any(s.inside and s is not me for s in list(self._slots)):
                        time.sleep(0.0002)
                    fn()
                finally:
                    with self._cond_lock:
                        self.paused = False
                        self._cond.notify_all()
        finally:
            if stepped_out:
                me.inside = True


class _Slot:
    __slots__ = ("inside", "depth", "thread")

    def __init__(self) -> None:
        self.inside = False
        self.depth = 0
        self.thread = threading.current_thread()


# a read-only open that may not use LMDB's lock file (it cannot be written by this user,
# or the file system is read-only): LMDB's readers need it (their table) unless no writer
# can run meanwhile, which holding the store's writer lock shared ensures (_hold_out_writers)
_NO_LOCK_FILE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _hold_out_writers(db_dir: str, err: "lmdb.Error") -> int:
    """For a read-only open whose LMDB lock file cannot be used (``err``: EACCES, EROFS):
    the store's writer lock (its LOCK file) taken shared and kept, its fd, so that LMDB
    can be read without a lock table (``lock=False``: nothing tells a writer of those
    readers, whose pages it would reuse under them) while no writer can start (a
    writer's open waits out a shared holder, then is refused as locked).  A live writer,
    or a writer lock this user cannot read, is a StoreIOError saying so: a store
    (SQLite's files alike) whose files this user may not write is read while nothing
    writes it."""
    from .layout import held_flock, let_go_flock
    root = os.path.dirname(db_dir)
    lock = os.path.join(root, "LOCK")
    why = os.strerror(os_errno(err) or errno.EACCES)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise StoreIOError(errno.EACCES, f"cannot open the store at {root} read-only: its "
                           f"LMDB lock file (db/lock.mdb) cannot be used ({why}), and its "
                           f"writer lock (LOCK) cannot be read ({e.strerror or e}) to make "
                           f"sure no writer runs meanwhile; open it as a user who may write "
                           f"db/lock.mdb, or read a copy", lock) from None
    held_flock(fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        let_go_flock(fd)
        os.close(fd)
        live = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        raise StoreIOError(errno.EACCES, f"cannot open the store at {root} read-only: its "
                           f"LMDB lock file (db/lock.mdb) cannot be used ({why}), which a "
                           f"reader needs while "
                           + ("a writer has the store open (it does now): read it as a user "
                              "who may write db/lock.mdb, or once the writer has closed it"
                              if live else f"a writer may run, and the writer lock (LOCK) "
                              f"cannot be held ({e.strerror or e})"), lock) from None
    return fd


def _let_go(held: tuple[int, int] | None) -> None:
    """Close the writer lock fd ``_hold_out_writers`` held ((fd, pid)): its shared lock
    goes.  Not in a forked child: its copy was closed at the fork (layout._forked), and the
    number may name another file by now."""
    if held is None or held[1] != os.getpid():
        return
    from .layout import unlock_and_close
    unlock_and_close(held[0])


def _preallocate_lock(db_dir: str) -> None:
    """Give ``db_dir/lock.mdb`` its blocks before LMDB maps it.  LMDB makes the lock file
    by ``ftruncate`` (sparse) and writes it only through a shared mmap: on a full disk the
    first touch of an unallocated page -- its header as the environment opens, a reader
    slot page when one more read transaction (an unfinished scan) takes a slot -- killed
    the process with SIGBUS.  Allocated here, those pages never need a block; a disk too
    full for them is a StoreIOError before LMDB is called, nothing mapped."""
    path = os.path.join(db_dir, "lock.mdb")
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # (not Linux/BSD: nothing to do it with)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
                     fileio.FILE_MODE)
    except OSError as e:
        if e.errno in _PREALLOC_SKIP:
            return
        raise StoreIOError(e.errno, f"cannot create the LMDB lock file: "
                                    f"{os.strerror(e.errno)}", path) from e
    try:
        # (its size as LMDB has it, when larger: LMDB sizes its reader table by the file)
        fallocate(fd, 0, max(LOCK_FILE_BYTES, os.fstat(fd).st_size))
    except OSError as e:
        if e.errno not in _PREALLOC_SKIP:
            raise StoreIOError(e.errno, f"cannot allocate the LMDB lock file "
                                        f"({LOCK_FILE_BYTES} bytes) before mapping it: "
                                        f"{os.strerror(e.errno)}", path) from e
    finally:
        os.close(fd)


def _can_map(size: int) -> bool:
    """Can this process map ``size`` bytes more of address space now?  An anonymous
    PROT_NONE mapping, made and dropped at once (no memory is touched): a map growth
    that an address-space limit refuses is known before LMDB unmaps the old map."""
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                      | getattr(mmap, "MAP_NORESERVE", 0), prot=0)  # (PROT_NONE)
    except (OSError, OverflowError, ValueError):
        return False
    m.close()
    return True


def _fallback_map_size(error: "lmdb.Error", data_file: str) -> int | None:
    """The map to open with when the default one (DEFAULT_MAP_SIZE of address space) was
    refused for want of address space (ENOMEM: a process under ``ulimit -v``, RLIMIT_AS;
    EINVAL: under valgrind, whose address space is smaller than the map), or None
    (another error: raised as it was; a smaller map refused too raises its own error).  Every store failed to open under such a
    limit below 64 GiB, even a read-only one of a few KiB.  Half of the largest map this
    process may make now (the rest left to Python, threads, and the growth steps), never
    less than the data file holds; the map grows from there as the data does (``_grow``
    takes smaller steps under the same limit)."""
    if os_errno(error) not in (errno.ENOMEM, errno.EINVAL):
        return None
    try:
        need = os.stat(data_file).st_size
    except OSError:
        need = 0
    need = max(need + (1 << 20), 1 << 20)
    size = DEFAULT_MAP_SIZE // 2
    while size >= need and not _can_map(size):
        size //= 2
    if size < need:
        return need if _can_map(need) else None
    return max(size // 2, need)


class LmdbState:
    """The open LMDB environment of one store (shared by handles in one process)."""

    _registry: dict[str, dict] = {}
    # Reentrant: the garbage collector may run inside a section holding it (any allocation
    # can trigger it) and finalize a store dropped without close(), whose close() takes it
    # again on the same thread (a plain Lock deadlocked there, found by the fuzz tests).
    # Each handle's close touches only its own registry entry.
    _registry_lock = threading.RLock()

    def __init__(self, path: str, map_size: int | None = None, readonly: bool = False) -> None:
        self.path = os.path.realpath(path)
        self.data_file = os.path.join(self.path, "data.mdb")
        self._lock_file = os.path.join(self.path, "lock.mdb")
        self.readonly = readonly
        self._shared: dict = {}
        # the first LMDB write or sync of this handle that failed: every later one is
        # refused (see ``write``)
        self.write_failed: BaseException | None = None
        shared = None
        try:
            with LmdbState._registry_lock:
                shared = LmdbState._registry.get(self.path)
                if shared is None:
                    shared = self._open_shared(path, map_size, readonly)
                    LmdbState._registry[self.path] = shared
                elif shared["readonly"] and not readonly:
                    self._make_writable(shared, map_size)
                with deferred():  # (one section until this handle holds it, see below)
                    shared["refs"] += 1
                    if not readonly:
                        shared["writers"] = shared.get("writers", 0) + 1
                    self._shared = shared
                    self.gate: ReadGate = shared["gate"]
                    self._write_lock: threading.Lock = shared["write_lock"]
                    shared["handles"].add(self)
                    self._adopt(shared)
            if not readonly:
                self.env.reader_check()  # free slots left by killed processes
                if shared.get("applied_bound") is None:
                    shared["applied_bound"] = self.applied_lsn()
        except BaseException:
            # (a failure, or an interrupt, after the environment opened and before this
            # handle reached its caller: it stayed registered with no handle to close it —
            # a lock-free read's writer lock held shared, every writer refused, while the
            # process lived).  Under the registry lock (released by the raise): another
            # thread's open that found the entry between the check and the close had its
            # environment closed under it
            with deferred(), LmdbState._registry_lock:
                if self._shared:
                    self.close()
                elif (shared is not None and not shared["refs"]
                      and LmdbState._registry.get(self.path) is shared):
                    LmdbState._registry.pop(self.path, None)
                    shared["env"].close()
                    _let_go(shared.get("held_out"))
            raise

    @property
    def applied_bound(self) -> int | None:
        """An upper bound of the ``applied`` LSN of any LMDB state a read transaction begun
        before this call can see, or None when unknown (read ``applied`` itself).

        Only this process writes a store it opened for writing (the store's LOCK), and
        ``write`` raises the bound before each commit, so a reader that finds the bound
        at or below its snapshot, *after* beginning its read transaction, knows LMDB holds
        nothing newer than the snapshot and skips reading ``applied`` (one py-lmdb call,
        and one wait for the GIL, fewer per read).  A read-only handle (another process
        writes) never knows: None."""
        return self._shared.get("applied_bound")

    def applied_past(self, txn: lmdb.Transaction, lsn: int) -> int | None:
        """The ``applied`` LSN ``txn`` sees if it is past ``lsn``, else None; without an
        LMDB call when :attr:`applied_bound` (read now, after ``txn`` began) rules it out."""
        bound = self._shared.get("applied_bound")
        if bound is not None and bound <= lsn:
            return None
        applied = from_u64(txn.get(b"applied", db=self.meta), 0, "meta", b"applied", self)
        return applied if applied > lsn else None

    def _adopt(self, shared: dict) -> None:
        """Take the environment and table handles (again, after a compaction swapped the
        file: every handle of this process follows)."""
        self.env: lmdb.Environment = shared["env"]
        self.file_id = shared["file_id"]
        for name in TABLES:
            setattr(self, name, shared[name])

    def _open_shared(self, path: str, map_size: int | None, readonly: bool) -> dict:
        if not readonly:
            fileio.make_dir(path)
        # Before LMDB maps the file: a damaged one is a CorruptionError, never a SIGBUS.  A
        # store whose log has segments must have its data file (else it was lost).  One
        # with neither is a creation under way (its STORE file is written first) or cut
        # short: a read-only open says so (NotAStore; it said "the LMDB data file is
        # missing", a CorruptionError, to a reader racing the writer's first open)
        wal = os.path.join(os.path.dirname(self.path), "wal")
        used = os.path.isdir(wal) and any(n.endswith(".wal") for n in os.listdir(wal))
        if not used and not readonly:
            _restart_cut_short_creation(self.data_file)
        if not used and readonly and unborn_data_file(self.data_file):
            raise NotAStore(f"{os.path.dirname(self.path)} holds no state yet: its creation "
                            f"is under way or was cut short (LMDB's meta pages cut short, "
                            f"no log); a writable open completes it")
        if check_lmdb_files(path, expect_existing=used) is None and readonly:
            raise NotAStore(f"{os.path.dirname(self.path)} holds no state yet: its creation "
                            f"is under way or was cut short (no LMDB data file, no log); "
                            f"a writable open completes it")
        _preallocate_lock(path)
        # (before LMDB opens the files, see reopen; files the open creates: after it)
        file_id = _file_id(self.data_file)
        opened: dict = {}  # the writer lock held shared by a lock-free read, the env
        try:
            return self._open_shared_env(path, map_size, readonly, file_id, opened, used)
        except BaseException:
            # (a failure or an interrupt anywhere from the hold to the return: the lock
            # was kept for the life of the process, every writer refused)
            with deferred():
                if "env" in opened:
                    opened["env"].close()  # (a second close does nothing)
                _let_go(opened.get("held"))
            raise

    def _open_shared_env(self, path: str, map_size: int | None, readonly: bool,
                         file_id: tuple, opened: dict, used: bool = False) -> dict:
        """``_open_shared``'s open: ``opened`` notes the writer lock held shared (a
        lock-free read, "held") and the environment ("env"), for the caller to let go
        if this fails.  ``used``: the log has segments (see ``_open_tables``)."""
        held = None
        try:
            try:
                env = self._first_env(path, map_size or DEFAULT_MAP_SIZE, readonly)
            except lmdb.Error as e:
                if readonly and os_errno(e) in _NO_LOCK_FILE:
                    with deferred():  # (an interrupt between the flock and the note)
                        held = opened["held"] = (_hold_out_writers(path, e), os.getpid())
                    try:
                        env = self._first_env(path, map_size or DEFAULT_MAP_SIZE, True,
                                              lock=False)
                    except lmdb.Error as e2:  # (under ``ulimit -v``, as below: it failed
                        # "Cannot allocate memory" where other opens retry)
                        size = None if map_size else _fallback_map_size(e2, self.data_file)
                        if size is None:
                            raise
                        env = self._first_env(path, size, True, lock=False)
                else:
                    size = None if map_size else _fallback_map_size(e, self.data_file)
                    if size is None:
                        raise
                    env = self._first_env(path, size, readonly)
            opened["env"] = env
        except lmdb.Error as e:
            if "already open in this process" in str(e):  # (py-lmdb's own registry)
                raise WalstoreError(
                    f"{self.path}: py-lmdb still counts it open for the process this one "
                    f"was forked from; a forked child cannot open a store its parent had "
                    f"open (use a process started fresh: multiprocessing's 'spawn')") from e
            code = os_errno(e)
            if code is not None:  # (no permission, a full disk, EIO: not damage)
                raise StoreIOError(code, f"cannot open the LMDB environment: "
                                         f"{os.strerror(code)}", path) from e
            raise CorruptionError(f"cannot open the LMDB environment: {e}",
                                  file=self.data_file) from e
        if not readonly:
            # LMDB creates data.mdb itself, and its fdatasyncs never make the name durable:
            # without this fsync of db/ a power loss after acknowledged commits (a durable
            # WAL segment beside it) could leave no data file, a store open refuses, or,
            # once a checkpoint trimmed the log, commits lost with the name.  At every
            # writable open, not only when the file is new: an open whose fsync failed
            # left the file made, and the retry found it there
            try:
                fileio.fsync_dir(path)
            except OSError as e:
                env.close()
                raise StoreIOError(e.errno, f"cannot make the new LMDB data file durable "
                                            f"(fsync of its directory): "
                                            f"{e.strerror or e}", path) from e
        shared = {"env": env, "readonly": readonly, "refs": 0, "gate": ReadGate(), "used": used,
                  "write_lock": threading.Lock(), "handles": weakref.WeakSet(),
                  "file_id": file_id if len(file_id) == 4 else _file_id(self.data_file),
                  "held_out": held, "map_note": not readonly}
        self._open_tables(shared)  # (it closes the environment when it fails; the caller
        return shared              # lets the writer lock go)

    @staticmethod
    def _first_env(path: str, map_size: int, readonly: bool, lock: bool = True
                   ) -> lmdb.Environment:
        return open_env(path, map_size=map_size, max_dbs=MAX_DBS, subdir=True,
                        readonly=readonly, sync=True, metasync=False, map_async=False,
                        writemap=False, lock=lock, max_readers=MAX_READERS,
                        create=not readonly, mode=0o600)

    @staticmethod
    def _open_tables(shared: dict) -> None:
        env, readonly = shared["env"], shared["readonly"]
        try:
            if readonly:
                for name, dbname in TABLES.items():
                    try:
                        shared[name] = env.open_db(dbname, create=False)
                    except lmdb.NotFoundError:  # an older store without this table: read
                        shared[name] = None     # as empty
                if shared["data"] is None or shared["meta"] is None:
                    # (every store has had these two since its first version: none means
                    # a creation under way or cut short before its tables' commit.  Read
                    # as empty, the handle kept them "empty" for its life and the
                    # process's: once a writer completed the creation, it read an empty
                    # store, and a later read-only open met a false "gap" -- h2 stop 83)
                    where, data = os.path.dirname(env.path()), env.path() + "/data.mdb"
                    env.close()
                    if shared.get("used"):  # (every version makes the tables before the
                        # log's first segment: a log of commits beside no tables is a lost
                        # state, not a creation -- it was "a writable open completes it",
                        # which then refused a gap, h4 stop 83)
                        raise CorruptionError("the LMDB data file holds no tables, but the "
                                              "log holds commits: the LMDB state is lost",
                                              file=data)
                    raise NotAStore(f"{where} holds no state yet: its creation is under "
                                    f"way or was cut short (LMDB has no tables); a "
                                    f"writable open completes it")
            else:
                LmdbState._create_tables(env, shared)
        except lmdb.Error as e:
            # (the path asked before the close: asked after it, a closed environment's
            # lmdb.Error escaped instead; and a full disk or EIO met by the commit that
            # creates the tables is no damage)
            data = os.path.join(env.path(), "data.mdb")
            env.close()
            code = os_errno(e)
            if code is not None:
                raise StoreIOError(code, f"cannot create the LMDB tables: "
                                         f"{os.strerror(code)}{low_room_note(data)}",
                                   data) from e
            raise CorruptionError(f"the LMDB environment is not a walstore state: {e}",
                                  file=data) from e

    @staticmethod
    def _create_tables(env: lmdb.Environment, shared: dict) -> None:
        """Open (create) every table in one write transaction: one commit, one sync (each
        ``open_db`` of its own committed and synced, 17 times for a new store).  A map too
        small for the tables an older store lacks (``map_size`` below its data file's
        size, the file without free pages: LMDB maps just the file) is grown, as a write
        that fills the map is (it was a CorruptionError "not a walstore state:
        MDB_MAP_FULL", h2 stop 83)."""
        for attempt in range(MAX_TABLE_GROWTHS + 1):
            try:
                with env.begin(write=True) as txn:
                    for name, dbname in TABLES.items():
                        shared[name] = env.open_db(dbname, txn=txn, create=True)
                    fileio.lmdb_io("tables", env.path())  # (the fault seam: see tools/faults)
                return
            except lmdb.MapFullError:
                if attempt == MAX_TABLE_GROWTHS:
                    raise
                env.set_mapsize(env.info()["map_size"] * 2)  # (no transaction open)

    def replaced(self) -> bool:
        """Has the data file (or its lock file) been swapped under us (a writer in another
        process compacted it)?  A read-only handle then reopens (``reopen``)."""
        return _file_id(self.data_file, self._lock_file) != self.file_id

    def _make_writable(self, shared: dict, map_size: int | None) -> None:
        """A writer opens what this process holds read-only: the environment is reopened
        read-write under the read gate, and every handle follows (as after a compaction);
        if that fails, the read-only one is back and the error is raised."""
        def swap() -> None:
            size = max(shared["env"].info()["map_size"], map_size or 0)
            shared["env"].close()
            try:
                env = self._new_env(False, size)
            except lmdb.Error as e:
                shared["env"] = self._new_env(True, size)
                self._open_tables(shared)
                for handle in list(shared["handles"]):
                    handle._adopt(shared)
                code = os_errno(e)
                if code is not None:
                    raise StoreIOError(code, f"cannot open the LMDB environment for "
                                             f"writing: {os.strerror(code)}", self.path) from e
                raise CorruptionError(f"cannot open the LMDB environment: {e}",
                                      file=self.data_file) from e
            shared["env"], shared["readonly"] = env, False
            shared["file_id"] = _file_id(self.data_file)
            shared["map_note"] = True
            try:
                self._open_tables(shared)  # (it closes the writable environment if it fails)
            except BaseException:
                # the read-only environment back, as when the writable one did not open:
                # left closed, the process's readers failed "closed/deleted/dropped
                # object" and a later writable open raised a raw lmdb.Error (h2 stop 83)
                shared["env"], shared["readonly"] = self._new_env(True, size), True
                shared["file_id"] = _file_id(self.data_file)
                shared["map_note"] = False
                self._open_tables(shared)
                for handle in list(shared["handles"]):
                    handle._adopt(shared)
                raise
            for handle in list(shared["handles"]):
                handle._adopt(shared)
        def swap_with_signals_held() -> None:
            # (as compact's: a Ctrl-C between the close and the reopen left the closed
            # environment registered, every read of the process's read-only handles
            # failing "closed/deleted/dropped object", every writable open a raw lmdb.Error)
            with deferred():
                swap()
        _preallocate_lock(self.path)  # (before the read-only environment is closed)
        shared["gate"].exclusive(swap_with_signals_held)

    def reopen(self) -> None:
        """Reopen the environment of this process on the current data file."""
        shared = self._shared
        _preallocate_lock(self.path)  # (the writer's new lock file, before ours is closed)
        with LmdbState._registry_lock:
            def swap() -> None:
                # a handle of this process swapped the file in (a follower's compaction,
                # ``compact``, beside a reader in its process), and every handle follows
                # it: nothing to reopen.  (Reopened all the same — the reader had seen the
                # file replaced mid-swap — the environment was closed under that writer's
                # next write, which is not behind the gate: the follower died with
                # "closed/deleted/dropped object" and DEST kept the purged rows.)
                if _file_id(self.data_file, self._lock_file) == shared["file_id"]:
                    self._adopt(shared)
                    return
                size = shared["env"].info()["map_size"]
                shared["env"].close()
                # (taken before LMDB opens the files: a swap after it is seen next time)
                file_id = _file_id(self.data_file)
                shared["env"] = self._new_env(shared["readonly"], size)
                shared["file_id"] = file_id
                self._open_tables(shared)
                for handle in list(shared["handles"]):
                    handle._adopt(shared)

            def swap_with_signals_held() -> None:
                # (as compact's: a Ctrl-C between the close and the reopen left the closed
                # environment registered, every later read a raw lmdb.Error)
                with deferred():
                    swap()
            self.gate.exclusive(swap_with_signals_held)

    def _new_env(self, readonly: bool, map_size: int) -> lmdb.Environment:
        check_lmdb_files(self.path, expect_existing=True)
        return open_env(self.path, map_size=map_size, max_dbs=MAX_DBS,
                        subdir=True, readonly=readonly, sync=True, metasync=False,
                        map_async=False, writemap=False, lock=True, max_readers=MAX_READERS,
                        create=False, mode=0o600)

    def compact(self, progress: Callable[[int, int], None] | None = None
                ) -> tuple[int, int]:
        """Rewrite the data file with its live rows only and swap it in, so the bytes of
        erased data are in no file any more.  Call with no write in progress.  Returns the
        file's size before and after.  ``progress(done, total)``: the rows copied so far
        (after each batch), shown as that share of the file's size before (``total``).

        Row by row (``_copy_rows``), not LMDB's compacting copy: that one copies each live
        page whole, and the unused part of a page keeps the bytes of rows deleted from it
        (a purge of keys written and erased in one apply left 4,150 of their names in the
        compacted file)."""
        if self.readonly:
            raise ReadOnlyError("LMDB state is open read-only")
        before = os.path.getsize(self.data_file)
        work = self.path + ".compact"
        with self._write_lock:
            self._refuse_after_failure()  # (a write: never after a failed one either)
            shown = None if progress is None else \
                (lambda rows, of: progress(before * rows // max(of, 1), before))
            fresh = os.path.join(work, "data.mdb")
            try:
                shutil.rmtree(work, ignore_errors=True)
                fileio.make_dir(work)
                self.gate.call(lambda: self._copy_rows(work, progress=shown))
                fd = fileio.open_file(fresh, os.O_RDONLY)
                try:
                    fileio.fsync(fd)
                finally:
                    os.close(fd)
                os.chmod(fresh, fileio.FILE_MODE)
                _preallocate_lock(work)  # the fresh lock file, allocated before the swap
            except (lmdb.Error, OSError) as e:
                # (the copy failed, a full disk most often: nothing was swapped, the data
                # file is as it was.  The half-made copy goes — left, it kept the disk
                # full — and the error is a walstore one: a raw lmdb.Error left purge()
                # and every open that retried the erasure)
                shutil.rmtree(work, ignore_errors=True)
                code = e.errno if isinstance(e, OSError) else os_errno(e)
                raise StoreIOError(code if code is not None else errno.EIO,
                                   f"rewriting the LMDB data file without its free pages (a "
                                   f"purge's erasure) failed: {e} (it needs room for a copy "
                                   f"of the live rows, up to {before} bytes); nothing was "
                                   f"swapped, and the erasure stays owed: the next checkpoint "
                                   f"or writable open tries again", work) from e
            except BaseException:
                # (an interrupt, or the caller's progress callback raising, mid-copy: the
                # half-made copy goes too — left, it held up to the data file's size until
                # the next erasure, whose room check counted it as used: audit 60)
                shutil.rmtree(work, ignore_errors=True)
                raise
            shared = self._shared

            def swap() -> None:
                size = shared["env"].info()["map_size"]
                shared["env"].close()
                try:
                    renamed_in = False
                    fileio.rename(fresh, self.data_file)
                    renamed_in = True
                    _swap_lock_file()
                except OSError as e:
                    # (a rename or the directory's fsync failed: this process's environment
                    # was closed already, and every read raised CorruptionError ("not a
                    # walstore state") and close() an LMDB error, while the OSError left
                    # raw.  Reopened on the data file now in place, so reads go on)
                    with contextlib.suppress(lmdb.Error, OSError, WalstoreError):
                        shared["env"] = self._new_env(False, size)
                        shared["file_id"] = _file_id(self.data_file)
                        self._open_tables(shared)
                        for handle in list(shared["handles"]):
                            handle._adopt(shared)
                    if not renamed_in:  # nothing swapped: the old file and lock file stand
                        raise StoreIOError(
                            e.errno if e.errno is not None else errno.EIO,
                            f"swapping in the LMDB data file rewritten without its free "
                            f"pages (a purge's erasure) failed: {e}; nothing was swapped, "
                            f"and the erasure stays owed: the next checkpoint or writable "
                            f"open tries again", e.filename) from e
                    # the new data file is in, beside a lock file in doubt: stop writing
                    # until reopened (as a crash between the two renames would leave it),
                    # this handle too (``write``: another thread's write committed, and
                    # fdatasynced, between this raise and Engine.fail — stop 74, h5)
                    self.write_failed = self.write_failed or e
                    raise StateWriteError(f"swapping in the LMDB data file rewritten "
                                          f"without its free pages failed after the data "
                                          f"file was renamed in: {e}; reopen the store") from e
                shared["env"] = self._new_env(False, size)
                shared["file_id"] = _file_id(self.data_file)
                self._open_tables(shared)
                for handle in list(shared["handles"]):
                    handle._adopt(shared)

            def _swap_lock_file() -> None:
                # and a fresh lock file: LMDB keeps the last transaction id in lock.mdb's
                # shared memory, and a reader process that has it open keeps it alive, so
                # the new file would be read through the OLD file's id (its meta page
                # chosen by that id's parity: a reader saw an empty, stale database after
                # a purge).  Readers still on the old file keep the unlinked lock file and
                # the old inode (never written again); a reader that sees the data file
                # replaced reopens both.  (Renamed in, allocated: see _preallocate_lock.)
                fileio.rename(os.path.join(work, "lock.mdb"), os.path.join(self.path, "lock.mdb"))
                fileio.fsync_dir(self.path)
            def swap_with_signals_held() -> None:
                # (once the readers are out): a Ctrl-C between the close and the reopen
                # left this process's environment closed, every later read failing
                with deferred():
                    swap()

            try:
                self.gate.exclusive(swap_with_signals_held)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        shutil.rmtree(work, ignore_errors=True)
        return before, os.path.getsize(self.data_file)

    def _copy_rows(self, work: str, chunk: int = 10_000, chunk_bytes: int = 16 << 20,
                   progress: Callable[[int, int], None] | None = None) -> None:
        """Every row of every table into a fresh environment at ``work``, in key order (a
        new file's pages hold nothing but what is put in them), in batches of at most
        ``chunk`` rows or ``chunk_bytes`` (a batch of 10,000 large rows held them all in
        memory at once).  Caller holds the write lock: the read transaction sees the final
        state.  ``progress(rows copied, rows in all)`` after each batch."""
        size = self.env.info()["map_size"]
        # (lock=False: this thread alone uses it, and no sparse lock file is mapped)
        dst = open_env(work, map_size=size, max_dbs=MAX_DBS, subdir=True, sync=False,
                       metasync=False, writemap=False, lock=False, create=True, mode=0o600)
        try:
            with self.env.begin() as src:
                tables = [(dbname, self._shared.get(name)) for name, dbname in TABLES.items()]
                rows_in_all = 0 if progress is None else sum(
                    src.stat(t)["entries"] for _n, t in tables if t is not None)
                copied = 0
                for dbname, table in tables:
                    if table is None:
                        continue  # (an older store without this table)
                    out = dst.open_db(dbname, create=True)
                    cur = src.cursor(db=table)
                    ok = cur.first()
                    while ok:
                        rows, batch = [], 0
                        while ok and len(rows) < chunk and batch < chunk_bytes:
                            row = cur.item()
                            rows.append(row)
                            batch += len(row[0]) + len(row[1])
                            ok = cur.next()
                        with dst.begin(write=True) as w:
                            w.cursor(db=out).putmulti(rows, append=True)
                        copied += len(rows)
                        if progress is not None:
                            progress(copied, max(rows_in_all, copied))
            dst.sync(True)
        finally:
            dst.close()

    # ---- reads: every one a short read transaction -------------------------------------
    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction (keep the block brief: it pins LMDB pages)."""
        slot = self.gate.slot()  # no resize can invalidate the transaction meanwhile
        depth = slot.depth
        try:
            self.gate.step_in(slot)
            txn = self._begin()
            try:
                yield txn
            except lmdb.Error as e:
                raise self._read_failed(e) from e
            finally:
                txn.abort()
        finally:
            slot.depth = depth  # (see ReadGate.step_in)
            slot.inside = depth > 0

    def _read_failed(self, e: lmdb.Error) -> Exception:
        """What a failed LMDB read raises: StoreClosed once this state is closed (py-lmdb
        then fails every handle: not damage), ValueError for a key LMDB cannot look up
        (empty, or over its 511-byte limit: the caller's input), else CorruptionError."""
        if not self._shared:
            return StoreClosed(f"the store's LMDB state ({self.path}) is closed")
        if isinstance(e, lmdb.BadValsizeError):
            return ValueError(f"LMDB cannot look up a key of that size: {e}")
        if isinstance(e, lmdb.ReadersFullError):  # (a limit, not damage)
            return StoreIOError(errno.EAGAIN, f"too many LMDB read transactions open at "
                                f"once (at most {MAX_READERS}, shared by every process "
                                f"using this store; those of killed processes were "
                                f"freed): read from fewer threads at once", self.data_file)
        code = os_errno(e)
        if code is not None:
            return StoreIOError(code, f"LMDB read failed: {os.strerror(code)}", self.data_file)
        return CorruptionError(f"LMDB read failed: {e}", file=self.data_file)

    def _begin(self) -> lmdb.Transaction:
        try:
            return self.env.begin()
        except lmdb.MapResizedError:  # another process grew the map: adopt its size, with
            # no other thread inside LMDB (a remap invalidates their open transactions)
            try:
                self.gate.exclusive(lambda: self.env.set_mapsize(0))
            except lmdb.Error as e:
                raise self._read_failed(e) from e
        except lmdb.ReadersFullError:
            # the slots of processes killed inside a read stay taken until someone asks
            # LMDB to free them (a writer's open did, once): a reader process killed with
            # its slots held made every read and commit of the live writer fail until it
            # was reopened (probe-audit60).  Freed now, then one more try
            try:
                self.env.reader_check()
            except lmdb.Error as e:
                raise self._read_failed(e) from e
        except lmdb.Error as e:
            raise self._read_failed(e) from e
        try:  # (the retry's error is a walstore one too: it left read() raw)
            return self.env.begin()
        except lmdb.Error as e:
            raise self._read_failed(e) from e

    def _table(self, db):
        """The handle of table ``db`` (DATA or a table name such as ``"meta"``; None when an
        older store lacks the table).  Names only, resolved inside the gate: a compaction
        swaps every handle, and one taken before it belongs to the closed environment
        (LMDB: "Database handle belongs to another environment", seen by the soak)."""
        if db is DATA:
            return self.data
        if db not in TABLES:
            raise TypeError(f"a table is named (one of {sorted(TABLES)}), not {db!r}")
        return getattr(self, db)

    def get(self, key: bytes, db=DATA) -> bytes | None:
        """One value in its own read transaction (the gate's fast path inlined: this is
        every point read of the store).  ``db``: a table name (see :meth:`_table`)."""
        gate = self.gate
        slot = gate.slot()
        depth = slot.depth
        try:
            gate.step_in(slot)
            try:
                txn = self.env.begin()
            except lmdb.Error:
                txn = self._begin()
            try:
                table = self.data if db is DATA else self._table(db)  # (the data table:
                return None if table is None else txn.get(key, None, table)  # no call)
            finally:
                txn.abort()
        except lmdb.Error as e:
            raise self._read_failed(e) from e
        finally:
            slot.depth = depth  # (see ReadGate.step_in)
            slot.inside = depth > 0

    def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(txn, *args)`` in a short read transaction: :meth:`read` with the gate's
        fast path written out and no generator (every read inside a transaction comes
        here; the slow path is ``read`` itself)."""
        try:
            slot = self.gate._local.slot
        except AttributeError:
            slot = None
        if slot is None or slot.depth or self.gate.paused:
            try:
                with self.read() as txn:
                    return fn(txn, *args)
            except BaseException as e:
                txn = None  # (see let_go)
                let_go(e)
                raise
        slot.depth = 1
        slot.inside = True
        try:
            if self.gate.paused:  # a resize began as we stepped in: take the slow path
                slot.depth = 0
                slot.inside = False
                with self.read() as txn:
                    return fn(txn, *args)
            try:
                txn = self.env.begin()
            except lmdb.Error:
                txn = self._begin()
            try:
                return fn(txn, *args)
            finally:
                txn.abort()
        except lmdb.Error as e:
            txn = None
            let_go(e)
            raise self._read_failed(e) from e
        except BaseException as e:  # (a SnapshotTooOld, a CorruptionError: see let_go)
            txn = None
            let_go(e)
            raise
        finally:
            if slot.depth == 1:
                slot.depth = 0
                slot.inside = False

    def get_value(self, key: bytes) -> bytes | None:
        """One value of the data table: :meth:`get` with the gate's fast path written out
        (``store.get``, ``store[key]`` and ``key in store`` come here; the slow path is the
        same code).  The same steps as :meth:`run_read`, kept apart on purpose:
        ``run_read(_get, key)`` costs a call more per read (1.47 against 1.24 µs a
        ``store.get``, measured).  A change to the gate's protocol changes both (and
        ``ReadGate.step_in``)."""
        gate = self.gate
        try:
            slot = gate._local.slot
        except AttributeError:
            return self.get(key)
        if slot.depth:
            return self.get(key)
        slot.depth = 1
        slot.inside = True
        try:
            if gate.paused:  # a resize is under way or began as we stepped in: step out,
                slot.depth = 0  # take the slow path (it waits)
                slot.inside = False
                return self.get(key)
            try:
                txn = self.env.begin()
            except lmdb.Error:
                txn = self._begin()
            try:
                return txn.get(key, None, self.data)  # (positional: py-lmdb parses
                # keywords slowly, 0.16 against 0.28 µs a get)
            finally:
                txn.abort()
        except lmdb.Error as e:
            raise self._read_failed(e) from e
        finally:  # (entered at depth 0: left at depth 0, whatever happened)
            slot.depth = 0
            slot.inside = False

    def meta_int(self, name: bytes, default: int = 0) -> int:
        return from_u64(self.get(name, "meta"), default, "meta", name, self)

    def put_map_note(self, txn: lmdb.Transaction) -> None:
        """In write transaction ``txn``: note the map size this writer runs with, stamped
        with ``txid_reserved`` as ``txn`` leaves it (``MAP_SIZE_AT``)."""
        txn.put(MAP_SIZE, u64(self.env.info()["map_size"]), db=self.meta)
        stamp = txn.get(TXID_RESERVED, db=self.meta)
        if stamp is not None:
            txn.put(MAP_SIZE_AT, stamp, db=self.meta)
            applied = txn.get(b"applied", db=self.meta)
            if applied is None:
                txn.delete(MAP_SIZE_APPLIED, db=self.meta)
            else:
                txn.put(MAP_SIZE_APPLIED, applied, db=self.meta)

    def noted_map_size(self) -> int | None:
        """The map size the writer noted (``MAP_SIZE``), None when there is no note it
        stamped, or its stamp is not ``txid_reserved`` now: a writer that does not note its
        map (an older walstore) opened the store since, and the note is not its map; or,
        the store closed, ``applied`` is not as it was then (``MAP_SIZE_APPLIED``).
        CorruptionError naming the row when one of them is damaged."""
        noted = self.meta_int(MAP_SIZE)
        at = self.get(MAP_SIZE_AT, "meta")
        if not noted or at is None:
            return None
        stamp = from_u64(at, 0, "meta", MAP_SIZE_AT, self)
        if stamp != self.meta_int(TXID_RESERVED):
            return None
        if self.meta_int(b"open") == 0 and (self.meta_int(MAP_SIZE_APPLIED, -1)
                                            != self.applied_lsn()):
            return None  # (closed since by a writer that does not note: MAP_SIZE_APPLIED)
        return noted

    def applied_lsn(self) -> int:
        return self.meta_int(b"applied")

    def scan(self, lo: bytes, hi: bytes | None, reverse: bool = False, db=DATA
             ) -> Iterator[tuple[bytes, bytes]]:
        """Stream (key, value) with lo <= key < hi in key order, a chunk per short read
        transaction (so not one snapshot: for indexes whose rows do not change under a
        reader; snapshot-consistent data scans are :mod:`walstore.engine.snapshot`'s).
        ``db``: a table name (resolved per chunk, so a compaction between chunks is
        harmless), see :meth:`_table`."""
        after: bytes | None = None
        while True:
            with self.read() as txn:  # (bounded by bytes too: a chunk of 256 big rows, the
                # prepared rows of in-doubt bulk loads, held them all at once — audit 58)
                chunk = read_chunk(txn, self._table(db), lo, hi, reverse, after, SCAN_CHUNK,
                                   SCAN_CHUNK_BYTES)
            txn = None  # (its reader slot is freed with it, not kept across the yields)
            yield from chunk
            if chunk_ended(chunk, SCAN_CHUNK, SCAN_CHUNK_BYTES):
                return
            after = chunk[-1][0]

    def count(self, db=DATA) -> int:
        with self.read() as txn:
            table = self._table(db)
            return 0 if table is None else txn.stat(table)["entries"]

    # ---- writes: only walstore.engine.apply calls these --------------------------------
    def write(self, fn: Callable[[lmdb.Transaction], None]) -> None:
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full.

        Once a write's commit or a ``sync`` of this handle failed, every later write is
        refused (StateWriteError) without touching LMDB, decided under the write lock: the
        engine stops the store after such a failure, but another thread's write (the
        applier beside a shipper whose write failed) could otherwise commit, and so
        fdatasync, in between — an fsync retried after a failed one, whose success says
        nothing of the pages the failed one lost (stop 74)."""
        if self.readonly:
            raise ReadOnlyError("LMDB state is open read-only")
        with self._write_lock:
            self._refuse_after_failure()
            while True:
                try:
                    txn = self.env.begin(write=True)
                except lmdb.Error as e:
                    raise StateWriteError(f"writing LMDB failed: {e}"
                                          f"{low_room_note(self.data_file)}") from e
                try:
                    fn(txn)
                    # (the map size, for a reader's ``walstore stats``, once per change)
                    noted = self._shared.get("map_note")
                    if noted:
                        self.put_map_note(txn)
                    applied = txn.get(b"applied", db=self.meta)
                    if applied is not None:  # (before the commit: see applied_bound)
                        bound = self._shared.get("applied_bound") or 0
                        self._shared["applied_bound"] = max(
                            bound, from_u64(applied, 0, "meta", b"applied", self))
                    fileio.lmdb_io("commit", self.path)
                    txn.commit()
                    if noted:
                        self._shared["map_note"] = False
                    return
                except lmdb.MapFullError:
                    self._abort_write(txn)
                    self._grow()
                except lmdb.Error as e:
                    self.write_failed = self.write_failed or e
                    self._abort_write(txn)
                    raise StateWriteError(f"writing LMDB failed: {e}"
                                          f"{low_room_note(self.data_file)}") from e
                except BaseException:
                    self._abort_write(txn)
                    raise

    def _refuse_after_failure(self) -> None:
        """StateWriteError when an earlier LMDB write, sync or file swap of this handle
        failed."""
        if self.write_failed is not None:
            # (with the disk's room when it is nearly full: LMDB reports a full disk as an
            # I/O error, and the write that failed may have been the applier's, in the
            # background, whose own error no caller saw -- a CI run's full-disk sweep met
            # this refusal as a writer's first error, naming no full disk; stop 82)
            raise StateWriteError(f"writing LMDB refused: an earlier LMDB write or sync of "
                                  f"{self.path} (or the swap of its rewritten data file) "
                                  f"failed ({self.write_failed}"
                                  f"{low_room_note(self.data_file)}); nothing is written "
                                  f"until the store is reopened") \
                from self.write_failed

    def _abort_write(self, txn: lmdb.Transaction) -> None:
        """Abort a write transaction while no reader of this process is inside LMDB.

        py-lmdb (3.x) makes a write transaction's abort wait until no LMDB call is in
        flight anywhere in the process; reading threads that never pause all at once can
        put that off forever (a map growth under four busy readers never finished).  The
        read gate holds readers out for the moment of the abort (a no-op for a
        transaction a failed commit already ended)."""
        def abort() -> None:
            try:
                txn.abort()
            except lmdb.Error:
                pass  # already ended by LMDB (a failed commit): nothing left to release
        self.gate.exclusive(abort)

    def _grow(self) -> None:
        """A bigger map (the caller holds the write lock, no write transaction open):
        double it, or, when the process may not map that much (an address-space limit,
        ``ulimit -v``: ENOMEM), a smaller step.  A failed remap leaves py-lmdb's
        environment unusable (LMDB unmapped the old map first): every later read raised
        CorruptionError "Attempt to operate on closed/deleted/dropped object" of a store
        that was not damaged.  So after each failure the environment is reopened at the
        size it had, and when no step fits the write fails as StateWriteError (the store
        stops writing, its reads go on)."""
        old = self.env.info()["map_size"]
        error: BaseException | None = None
        for step in (old, old // 2, old // 4, old // 8):
            size = old + max(step, 1 << 16)
            if not _can_map(size - old):  # (what the remap needs more: LMDB unmaps the
                # old map first; tried before, as a remap that fails costs a reopen)
                error = OSError(errno.ENOMEM, f"cannot map {size - old} bytes more")
                continue
            try:
                self.gate.exclusive(lambda: self.env.set_mapsize(size))
                self._shared["map_note"] = True
                return
            except lmdb.Error as e:
                error = e
                try:
                    self.gate.exclusive(lambda: self._remap_after_failed_resize(old))
                except (lmdb.Error, OSError, WalstoreError) as again:  # (no map at all now)
                    raise StateWriteError(f"writing LMDB failed: the map is full ({old} "
                                          f"bytes), growing it failed ({e}) and so did "
                                          f"mapping it again: {again}") from again
        code = (error.errno if isinstance(error, OSError) else os_errno(error)) or errno.ENOMEM
        raise StateWriteError(f"writing LMDB failed: the map is full ({old} bytes) and could "
                              f"not grow: {error} ({os.strerror(code)}: the process may not "
                              f"map more, e.g. an address-space limit)") from error

    def _remap_after_failed_resize(self, size: int) -> None:
        """Inside the gate: this process's environment opened again at ``size`` (its map
        before a failed resize), every handle following, as after a compaction."""
        shared = self._shared
        with contextlib.suppress(lmdb.Error):
            shared["env"].close()
        shared["env"] = self._new_env(False, size)
        shared["file_id"] = _file_id(self.data_file)
        self._open_tables(shared)
        for handle in list(shared["handles"]):
            handle._adopt(shared)

    def sync(self) -> None:
        """Force data and meta pages to stable storage (the checkpoint barrier)."""
        with self._write_lock:  # (no write commits beside it, nor after it failed)
            self._refuse_after_failure()
            try:  # py-lmdb fails (EINVAL) an env call that starts while the map is being
                # resized: none does, through the gate
                self.gate.call(self._sync)
            except lmdb.Error as e:
                self.write_failed = self.write_failed or e
                raise StateWriteError(f"syncing LMDB failed: {e}") from e

    def _sync(self) -> None:
        fileio.lmdb_io("sync", self.path)
        self.env.sync(True)

    def reap_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (a
        read-only opener or a ``walstore backup`` killed mid-read): such a slot keeps its
        snapshot's pages from reuse for as long as this environment is open, so under
        steady writes the data file grew without bound (the open's ``reader_check``
        freed them only at the writer's next open).  Returns how many were freed; a
        failure is no error of the caller's (0: tried again at the next checkpoint)."""
        try:
            return self.gate.call(lambda: self.env.reader_check())  # (env read inside)
        except lmdb.Error:
            return 0

    def map_size(self) -> int:
        # (not during a resize: see sync; the env is read inside, a swap may replace it)
        return self.gate.call(lambda: self.env.info())["map_size"]

    def close(self) -> None:
        with LmdbState._registry_lock:
            if not self._shared:
                return
            if not self.readonly:
                self._shared["writers"] -= 1
                if not self._shared["writers"]:  # another process may write it from now
                    self._shared["applied_bound"] = None
            self._shared["refs"] -= 1
            self._shared["handles"].discard(self)  # (a later compaction: not ours to follow)
            if self._shared["refs"] == 0:
                LmdbState._registry.pop(self.path, None)
                # (py-lmdb's close waits for LMDB calls in flight: readers held out)
                self.gate.exclusive(self._shared["env"].close)
                _let_go(self._shared.get("held_out"))  # (writers may start now)
            self._shared = {}
            # the environment may stay open for the process's other handles of the store (a
            # read-only one): this handle's readers (a closed store's scan iterators and
            # views) must not go on through it
            self.env = _ClosedEnvironment(self.path)  # type: ignore[assignment]


class _ClosedEnvironment:
    """A closed handle's ``env``: any use raises StoreClosed."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str):
        raise StoreClosed(f"the store's LMDB state ({self._path}) is closed")


def read_chunk(txn, db, lo: bytes, hi: bytes | None, reverse: bool, after: bytes | None,
               limit: int = SCAN_CHUNK, max_bytes: int | None = None
               ) -> list[tuple[bytes, bytes]]:
    """Up to ``limit`` rows of [lo, hi) strictly past ``after`` (the last key of the
    previous chunk), in order, read inside ``txn``; with ``max_bytes``, no row more once
    the values read hold that many bytes (``chunk_ended``: was the range's end met?)."""
    if db is None:
        return []
    if after is not None:
        if reverse:
            hi = after
        else:
            lo = after + b"\x00"
    # one py-lmdb call per row (iternext/iterprev step and return the item together):
    # every call releases the GIL, and getting it back beside a busy Python thread is
    # what a row costs then (see lmdb_state's module doc), so calls are what to save
    cur = txn.cursor(db=db)
    out: list[tuple[bytes, bytes]] = []
    room = max_bytes
    if reverse:
        if hi is None:
            ok = cur.last()
        else:
            ok = cur.prev() if cur.set_range(hi) else cur.last()
        if not ok:
            return out
        for k, v in cur.iterprev():
            if k < lo:
                break
            out.append((k, v))
            if len(out) >= limit:
                break
            if room is not None:
                room -= len(v)
                if room <= 0:
                    break
    else:
        if not cur.set_range(lo):
            return out
        for k, v in cur.iternext():
            if hi is not None and k >= hi:
                break
            out.append((k, v))
            if len(out) >= limit:
                break
            if room is not None:
                room -= len(v)
                if room <= 0:
                    break
    return out


def iter_rows(txn, db, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """The rows of [lo, hi) in key order, read one at a time inside ``txn`` (a walk over
    rows without bound, which ``read_chunk`` would hold all at once)."""
    if db is None:
        return
    cur = txn.cursor(db=db)
    if not cur.set_range(lo):
        return
    for k, v in cur.iternext():
        if hi is not None and k >= hi:
            return
        yield k, v


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_GENERATORS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def let_go(e: BaseException) -> None:
    """Clear the locals of the frames exception ``e`` has left (those below the frame that
    caught it, which is still running): py-lmdb frees a read transaction's reader slot
    only when the object is freed, and an exception a caller keeps (agents keep
    ConflictErrors in a list, a retry loop its last error) kept every frame it came
    through alive, with the transactions and cursors in them.  512 kept ConflictErrors
    held all 1,024 slots shared by every process of the store, and every read and commit
    of all of them failed (probe-audit60).  walstore's own frames are cleared (not a
    caller's function run inside, nor a generator's frame: clearing a suspended one would
    close it); the traceback itself (files, lines) stays.  (Which frames hold a handle is
    not asked: reading ``f_locals`` makes a dict of them that ``clear`` leaves.)"""
    tb = e.__traceback__
    tb = None if tb is None else tb.tb_next
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        if code.co_filename.startswith(_PACKAGE_DIR) and not code.co_flags & _GENERATORS:
            try:
                frame.clear()
            except RuntimeError:  # (still running: another thread's, a caller's)
                pass
        tb = tb.tb_next


def chunk_ended(chunk: list[tuple[bytes, bytes]], limit: int, max_bytes: int) -> bool:
    """Did ``read_chunk(..., limit, max_bytes)`` return ``chunk`` because the range ended
    (not because it read ``limit`` rows or ``max_bytes`` of values)?"""
    return len(chunk) < limit and sum(len(v) for _k, v in chunk) < max_bytes


def _inheritable_fds() -> set[int] | None:
    """This process's descriptors without FD_CLOEXEC (None: no /proc/self/fd to list)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    fds = set()
    for name in names:
        try:
            fd = int(name)
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                fds.add(fd)
        except (OSError, ValueError):
            pass  # (listdir's own descriptor, closed by now)
    return fds


def open_env(path: str, **options: Any) -> lmdb.Environment:
    """``lmdb.open(path, **options)``, its descriptors of the data file close-on-exec.
    LMDB (0.9.36) opens ``data.mdb`` for its reads and writes without O_CLOEXEC (its lock
    file and its O_DSYNC descriptor have it): every program an agent ran by fork and exec
    (``os.system``, ``subprocess`` with ``close_fds=False``, a C library's spawn) got a
    read-write descriptor of the whole state and kept the file's space pinned while it
    lived.  Marked here, once per open (not a hot path); where /proc is missing (not
    Linux) nothing is marked (documented)."""
    before = _inheritable_fds()
    env = lmdb.open(path, **options)
    if before is None:
        return env
    try:
        data = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return env
    for fd in (_inheritable_fds() or set()) - before:
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (data.st_dev, data.st_ino):
                fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError:
            pass  # (another thread closed a descriptor of its own meanwhile)
    return env


def _forget_parent_environments() -> None:
    """In a forked child: the parent's LMDB environments are not the child's to use (LMDB:
    an environment is used only by the process that opened it); a store the child opens
    gets its own.  The registry's lock may have been held by another parent thread."""
    LmdbState._registry = {}
    LmdbState._registry_lock = threading.RLock()


os.register_at_fork(after_in_child=_forget_parent_environments)
