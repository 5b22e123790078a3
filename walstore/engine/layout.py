"""The store directory: its files, its identity, and the writer's process lock.

A store is a directory (mode 0700)::

    STORE          identity: JSON {"format": "walstore", "version": 2, "store_id": hex,
                   and for a copy not yet opened, "origin": {"kind": "backup"|"restore", ...};
                   from a copy's first writable open, "keys" (its idempotency key token)
                   and "inherited_below": the first txid the copy could give, so every
                   transaction below it was made in the source (``inherited_below``)}
                   ("version": the store format version, see docs/FORMAT.md: versions 1
                   and 2 are read; a writable open marks a version 1 store 2 before it
                   writes anything; a larger one was made by a newer walstore: NotAStore)
    LOCK           the writer's lock file (flock), holding the writer's pid
    VISIBLE        the writer's publication mark, for read-only processes (never fsynced;
                   see walstore.engine.visible)
    PURGES         the writer's purge counter, for read-only processes (the same)
    wal/           WAL segments (see walstore.log.segment)
    db/            the LMDB environment (see walstore.engine.lmdb_state)
    quarantine/    bytes recovery cut off or dropped, each with a JSON note (never deleted)

Invariants: ``STORE`` is written atomically and durably before anything else exists, so a
directory with a valid ``STORE`` file is a store; one process at a time holds ``LOCK``
exclusively (the kernel releases it when the process dies, so a lock left by a killed
writer is taken over safely; the pid inside names the holder for ``StoreLocked``).
A forked child closes its copies of every flock'd descriptor of the process (the writer
locks, and those held for a while: ``held_flock``) at once, without unlocking: a flock
belongs to the open file description, so a copy in a child kept it held while it lived.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
import uuid
import weakref
from typing import Any

from .. import fileio
from ..errors import CorruptionError, NotAStore, StoreLocked
from ..signals import deferred

FORMAT_NAME = "walstore"
FORMAT_VERSION = 2  # what this walstore writes (docs/FORMAT.md says what bumps it)
READ_VERSIONS = (1, 2)  # what it reads: 1 = the same format before the version policy
PROBE_WAIT_S = 1.0  # how long a writer's open waits out read-only processes' lock probes
MAX_IDENTITY_BYTES = 65536  # STORE is read whole, up to this; written never larger


def store_path(path: Any) -> str:
    """A store's path as text (a str or an ``os.PathLike``; bytes decoded as the file
    system's names are), checked before anything is made there: ValueError when it is
    empty, holds a NUL, or is not valid UTF-8 (LMDB takes its path as UTF-8 text: such a
    path failed in ``lmdb.open`` with a raw codec error after the store's directory and
    files were made, and every later open failed the same way)."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(f"a store path must be a str or an os.PathLike, not "
                        f"{type(path).__name__}") from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not p:
        raise ValueError("a store path must not be empty (\".\" names the current "
                         "directory)")
    if "\0" in p:
        raise ValueError(f"a store path must not contain a NUL character: {p!r}")
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the store path {p!r} is not valid UTF-8: LMDB takes its path as "
                         f"UTF-8 text, so a store must live at a path that is") from None
    return p


class Layout:
    def __init__(self, root: Any) -> None:
        self.root = os.path.abspath(store_path(root))
        self.identity = os.path.join(self.root, "STORE")
        self.lock = os.path.join(self.root, "LOCK")
        self.wal = os.path.join(self.root, "wal")
        self.db = os.path.join(self.root, "db")
        self.quarantine = os.path.join(self.root, "quarantine")

    def exists(self) -> bool:
        return os.path.isfile(self.identity)

    def check_creatable(self) -> None:
        """NotAStore unless a store may be created here (missing, empty, or the skeleton
        of an interrupted creation).  A store that appeared meanwhile is fine too."""
        if self.exists():
            return
        outer = enclosing_store(self.root)
        if outer is not None:  # (the CLI's init, backup, restore and demo refused it; the
            # API made it: a store among another's files, which that store's backup,
            # restore and purge do not know)
            raise NotAStore(f"cannot create a store at {self.root}: it lies inside the "
                            f"store {outer}; choose a path outside it")
        if os.path.exists(self.root):
            if not os.path.isdir(self.root):
                raise NotAStore(f"{self.root} exists and is not a directory")
            if os.listdir(self.root) and not self._interrupted_creation():
                if self.holds_store_data():
                    raise NotAStore(self._identity_lost())
                raise NotAStore(f"{self.root} is not empty and holds no walstore store "
                                f"(no STORE file)")

    def create(self) -> bytes:
        """Make a new, empty store here; returns its id.  The directory must be empty.
        Call it holding the writer lock (see Engine._lock_and_create)."""
        if self.exists():
            raise NotAStore(f"{self.root} already holds a store; refusing to create another")
        self.check_creatable()
        fileio.make_dir(self.root)
        store_id = uuid.uuid4().bytes
        fileio.make_dir(self.wal)
        fileio.make_dir(self.db)
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "store_id": store_id.hex()}
        fileio.write_file_atomic(self.identity, identity_bytes(doc))
        parent = os.path.dirname(self.root)
        if parent:
            fileio.fsync_dir(parent)
        return store_id

    def _interrupted_creation(self) -> bool:
        """Only the skeleton a cut-short ``create`` leaves (empty wal/ and db/, STORE.tmp)?"""
        names = set(os.listdir(self.root))
        if not names <= {"wal", "db", "STORE.tmp", "LOCK"}:
            return False
        for d in ("wal", "db"):
            path = os.path.join(self.root, d)
            if d in names and (not os.path.isdir(path) or os.listdir(path)):
                return False
        return True

    def holds_store_data(self) -> bool:
        """A log segment in wal/ or LMDB's data file in db/: what only a store (not the
        skeleton of an interrupted creation) holds."""
        try:
            if any(n.endswith(".wal") for n in os.listdir(self.wal)):
                return True
        except OSError:
            pass
        return os.path.isfile(os.path.join(self.db, "data.mdb"))

    def _identity_lost(self) -> str:
        return (f"{self.root} holds a store's log or LMDB state but its STORE file is "
                f"missing: the store is damaged (put STORE back from a backup of this store)")

    def read_identity(self, lmdb_lost_ok: bool = False) -> bytes:
        """The store id; NotAStore when the directory is not a store of a known version.
        ``lmdb_lost_ok``: no db/ directory is no error (the LMDB rebuild, which makes it:
        a rebuild killed between its two renames leaves none, and refused to run again)."""
        if not os.path.isdir(self.root):
            raise NotAStore(f"{self.root} does not exist or is not a directory")
        try:
            if not stat.S_ISREG(os.stat(self.identity).st_mode):
                # (a FIFO there blocked every open, verify and recover forever in open())
                raise NotAStore(f"{self.identity} is not a regular file: it is damaged or "
                                f"not a walstore identity file")
            with open(self.identity, "rb") as f:
                raw = f.read(MAX_IDENTITY_BYTES + 1)
        except FileNotFoundError:
            if self.holds_store_data():  # (damage, not a path that names no store)
                raise NotAStore(self._identity_lost()) from None
            raise NotAStore(f"{self.root} is not a walstore store (no STORE file)") from None
        try:
            if len(raw) > MAX_IDENTITY_BYTES:
                raise ValueError(f"larger than {MAX_IDENTITY_BYTES} bytes")
            doc = json.loads(raw)
            if doc.get("format") != FORMAT_NAME:
                raise ValueError("not a walstore identity file")
            version = doc.get("version")
            if type(version) is not int:  # ("2", 1e400: damage, read as a version mismatch)
                raise ValueError(f"its version is not an integer: {version!r:.40}")
            check_version(version, self.root)
            store_id = bytes.fromhex(doc["store_id"])
            if len(store_id) != 16:
                raise ValueError("bad store id")
        except NotAStore:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise NotAStore(f"{self.root}/STORE is damaged or not a walstore file: {e}") from None
        for d, what in ((self.wal, "log"), (self.db, "LMDB state")):
            if d == self.db and lmdb_lost_ok and not os.path.lexists(d):
                continue
            if not os.path.isdir(d):  # (STORE is written after both: this is damage)
                raise CorruptionError(f"the store's {what} is missing: no "
                                      f"{os.path.basename(d)}/ directory", file=d)
        return store_id


    def _doc(self) -> dict:
        """STORE's document (``read_identity`` checked it when the store was opened)."""
        with open(self.identity, "rb") as f:
            doc = json.loads(f.read(MAX_IDENTITY_BYTES))
        if not isinstance(doc, dict):
            raise NotAStore(f"{self.root}/STORE is damaged or not a walstore file")
        return doc

    def read_origin(self) -> dict | None:
        """Where a copy came from, until its first open has held the debts it inherited."""
        origin = self._doc().get("origin")
        return origin if isinstance(origin, dict) and not origin.get("settled") else None

    def inherited_below(self) -> int:
        """The txid below which every transaction was made in the store this one was
        copied from (0: not a copy, or one opened with ``compensate``).  A copy's first
        writable open notes it (``clear_origin``), before it gives any txid of its own: a
        transaction it finds prepared (in doubt) then is its source's, and rolling it back
        here later holds its compensations instead of running them (CONTRACT 4.10)."""
        below = self._doc().get("inherited_below")
        return below if type(below) is int and below > 0 else 0

    def key_namespace(self, store_id: bytes) -> str:
        """What this store's action idempotency keys begin with (``ws-<it>-<action id>``):
        the store id's first 12 hex digits, or, in a copy (backup, restore), a token of its
        own — a copy keeps the store id AND the txid counter, so a new action there would
        otherwise get the key of a different action of its source (a payment API would
        take the copy's new charge for the source's old one)."""
        own = self._doc().get("keys")
        return own if isinstance(own, str) and own else store_id.hex()[:12]

    def new_key_namespace(self) -> None:
        """Give this copy its own key namespace (see ``key_namespace``), durably."""
        doc = self._doc()
        doc["keys"] = "c" + uuid.uuid4().hex[:11]
        fileio.write_file_atomic(self.identity, identity_bytes(doc))

    def needs_upgrade(self) -> bool:
        """Whether ``STORE`` names an older format version than this walstore writes."""
        return self._doc().get("version") != FORMAT_VERSION

    def upgrade_identity(self) -> bool:
        """Mark a store of an older format version (``read_identity`` accepted it) with
        this walstore's, durably (temp file, fsync, rename, dir fsync); True if it did.
        Only a writer calls it, before it writes anything: from then on an older walstore
        refuses the store instead of misreading what this one writes."""
        doc = self._doc()
        if doc.get("version") == FORMAT_VERSION:
            return False
        check_version(doc.get("version"), self.root)  # (never downgrades a newer one)
        doc["version"] = FORMAT_VERSION
        fileio.write_file_atomic(self.identity, identity_bytes(doc))
        return True

    # what a copy's identity carries over from its source's (``write_identity``): the key
    # namespace its source's actions were given and what the source inherited itself
    CARRIED = ("keys", "inherited_below", "inherited_keys")

    def write_identity(self, store_id: bytes, origin: dict | None = None,
                       source: "Layout | None" = None) -> None:
        """Write ``STORE`` durably (a copy's identity: same store id, maybe an origin, and
        from ``source``'s identity what ``CARRIED`` names: a backup of a copy made its
        identity anew, and its first open took the store id's namespace for the keys of
        its source's own actions)."""
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "store_id": store_id.hex()}
        if source is not None:
            doc.update((k, v) for k, v in source._doc().items() if k in self.CARRIED)
        if origin is not None:
            doc["origin"] = origin
        fileio.write_file_atomic(self.identity, identity_bytes(doc))

    def clear_origin(self, inherited_below: int | None = None,
                     source_keys: str | None = None) -> None:
        """The first open of a copy settled what it inherited; a restored store keeps its
        lineage (it replicates as a new lineage, never into its source's replica).
        ``inherited_below`` (the first txid the copy gives; None: a copy that compensates
        what it inherited) is noted in the same atomic write (``inherited_below``; the
        larger of it and one the identity carries already: a copy of a copy), with
        ``source_keys``, the key namespace the source gave the actions of those
        transactions (``inherited_key_namespace``)."""
        doc = self._doc()
        origin = doc.pop("origin", None)
        if origin is None:
            return
        if isinstance(origin, dict) and origin.get("lineage"):
            doc["origin"] = dict(origin, settled=True)
        if inherited_below is not None:
            old = doc.get("inherited_below")
            doc["inherited_below"] = max(inherited_below, old if type(old) is int else 0)
            if source_keys:  # (txids below it were given keys of the source's namespace;
                # at most 64 generations of copies kept: a later one's are then unknown,
                # never taken for another's)
                known = [p for p in doc.get("inherited_keys") or ()
                         if isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                         and isinstance(p[1], str)]
                if len(known) < 64:
                    doc["inherited_keys"] = known + [[inherited_below, source_keys]]
        fileio.write_file_atomic(self.identity, identity_bytes(doc))

    def inherited_key_namespace(self, txid: int) -> str | None:
        """The key namespace (``key_namespace``) transaction ``txid`` of a source store
        gave its actions, when ``txid`` lies below a copy's ``inherited_below``: each
        copy's first open notes its source's (``clear_origin``), a copy of a copy keeping
        those its source noted.  None when not known (a copy made before they were kept)."""
        for below, ns in sorted((p for p in self._doc().get("inherited_keys") or ()
                                 if isinstance(p, list) and len(p) == 2
                                 and type(p[0]) is int and isinstance(p[1], str)),
                                key=lambda p: p[0]):
            if txid < below:
                return ns
        return None


def enclosing_store(path: str) -> str | None:
    """The store whose directory ``path`` lies inside (below it, at any depth, symlinks
    resolved), or None.  A store made there would live among another store's files: its
    WAL directory, its LMDB directory, or beside them, where a backup, restore or purge of
    the outer store does not know it (``walstore init STORE/wal/x`` was accepted)."""
    here = os.path.realpath(os.path.abspath(path))
    parent = os.path.dirname(here)
    while parent != here:
        here, parent = parent, os.path.dirname(parent)
        layout = Layout(here)  # (a STORE file with a store's log or state beside it: a
        if layout.exists() and (os.path.isdir(layout.wal)  # file named STORE alone, in a
                                or os.path.isdir(layout.db)):  # home directory, is none)
            return here
    return None


def check_version(version, root: str) -> None:
    """NotAStore unless ``version`` (STORE's "version") is one this walstore reads."""
    if type(version) is int and version in READ_VERSIONS:
        return
    if type(version) is int and version > FORMAT_VERSION:
        raise NotAStore(f"{root} has store format version {version}: it was written by a "
                        f"newer walstore (this walstore reads versions "
                        f"{READ_VERSIONS[0]} to {READ_VERSIONS[-1]}); upgrade walstore to "
                        f"open it")
    raise NotAStore(f"{root} has store format version {version!r}; this walstore reads "
                    f"versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}")


def identity_bytes(doc: dict) -> bytes:
    """STORE's bytes for ``doc``, never over MAX_IDENTITY_BYTES: an origin names a path or
    URL, which may be long (4,096 bytes of accented letters are 12,288 JSON characters),
    so a long one keeps its two ends (it is there for people to read)."""
    raw = json.dumps(doc).encode()
    origin = doc.get("origin")
    if len(raw) > MAX_IDENTITY_BYTES // 2 and isinstance(origin, dict):
        doc = dict(doc, origin={k: (v[:500] + "..." + v[-500:] if isinstance(v, str)
                                    and len(v) > 1100 else v) for k, v in origin.items()})
        raw = json.dumps(doc).encode()
    return raw


# every ProcessLock of this process with its descriptor open: a forked child closes its
# copies at once (see _forked), those of stores still being opened by another thread too
_LOCKS: "weakref.WeakSet[ProcessLock]" = weakref.WeakSet()


class ProcessLock:
    """The exclusive writer lock of one store, held for the life of this object."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.lock
        self.fd = fileio.open_file(self.path, os.O_RDWR | os.O_CREAT)
        _LOCKS.add(self)
        self._refused_by: int | None = None  # the live writer ``_take`` was refused by
        try:
            self._take()
        except OSError as e:
            # (only shared holders, probes, at the end of the wait: no writer to name; a
            # live writer that refused it at once is named even if it closed the store
            # since — judged again here, nothing held the lock exclusive, and a refusal
            # said a lock-free read-only open held it, with no reader anywhere)
            writer = self._refused_by is not None or self._exclusive_holder()
            pid = self._refused_by or (self._holder() if writer else None)
            fd, self.fd = self.fd, -1
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and not writer:
                # (held shared past the wait: a read-only open reading LMDB without its
                # lock file holds writers out while it reads, lmdb_state._hold_out_writers;
                # it said "locked by another process", with no writer anywhere)
                raise StoreLocked(f"store {layout.root} is being read by a read-only open "
                                  f"that may not use its LMDB lock file (db/lock.mdb: a "
                                  f"user who may not write it): no writer may run while "
                                  f"it reads; open it for writing once that reader has "
                                  f"closed the store", None) from None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"process {pid}" if pid else "another process"
                if pid == os.getpid():
                    who += " (this process: the store is already open here)"
                raise StoreLocked(f"store {layout.root} is locked by {who}", pid) from None
            raise
        try:  # (a full disk here must not leave the lock held with no owner named)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            fd, self.fd = self.fd, -1
            os.close(fd)  # closing drops the flock
            raise

    def _take(self) -> None:
        """flock(LOCK_EX) without waiting for a writer; a read-only process's probe
        (``writer_alive``: a shared lock held for an instant) is waited out, up to
        PROBE_WAIT_S, while no live process is named as the holder (a refusal then said
        "locked by another process" with no writer anywhere)."""
        deadline = None
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                pid = self._holder()
                if pid is not None and _alive(pid) and self._exclusive_holder():
                    self._refused_by = pid
                    raise  # a writer: refused at once
                # (a live pid in LOCK while only a probe holds the lock is a killed
                # writer's pid reused by another process: no writer, wait it out too)
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + PROBE_WAIT_S
                if now >= deadline:
                    raise
                time.sleep(0.002)

    def _exclusive_holder(self) -> bool:
        """Does some process hold the lock exclusive (a writer), not only shared (read-only
        processes' probes)?  A shared lock we can take says no; it is let go at once
        (in one deferred section: a Ctrl-C between would leave it on, refusing writers)."""
        with deferred():
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def _holder(self) -> int | None:
        try:
            with open(self.path, "rb") as f:
                return int(f.read(32).strip() or 0) or None
        except (OSError, ValueError):
            return None

    def forget_in_child(self) -> None:
        """In a forked child: close this process's copy of the parent's lock descriptor,
        without unlocking or truncating.  A flock belongs to the open file description, so
        the parent keeps its lock; but a copy left open in a child that outlives a killed
        parent held the lock on (every later writer refused, naming the dead pid)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            fd, self.fd = self.fd, -1  # (forgotten first: an interrupt after the close must
            os.close(fd)  # not leave it to be closed again)  (closing drops the flock)


# descriptors holding a flock for a while (the blob gc's lock, a backup's hold of it, a
# lock probe): see ``held_flock``
_HELD_FLOCKS: set[int] = set()


def held_flock(fd: int) -> None:
    """``fd`` holds (or is about to hold) a flock until ``let_go_flock(fd)``, called before
    it is closed: a forked child closes its copy at once."""
    _HELD_FLOCKS.add(fd)


def let_go_flock(fd: int) -> None:
    _HELD_FLOCKS.discard(fd)


def unlock_and_close(fd: int) -> None:
    """Let go of the flock ``fd`` held (``held_flock``) and close it, unlocking first: a
    child forked meanwhile keeps a copy of the descriptor until its fork handler closes
    it, and closed only, the lock lived on in that copy until then (a child forked during
    a blob gc, slow to reach its handler on a loaded machine, held ``files/gc.lock`` past
    the gc's end: a CI-like run, stop 73)."""
    let_go_flock(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    os.close(fd)


def _forked() -> None:
    """In a forked child: close its copies of the parent's flock'd descriptors, without
    unlocking.  The writer locks: the ones of stores another parent thread was still
    opening included (the store's own fork handler sees only stores whose open returned:
    a child forked during a 0.3 s recovery kept the lock's descriptor, and while it lived,
    after the parent was killed, every writer was refused naming the dead parent).  The
    ones held for a while: a child forked during a blob gc held ``files/gc.lock``
    exclusive while it lived (every ``walstore backup`` waited for it, every later gc of
    the parent was skipped)."""
    for lock in list(_LOCKS):  # (one thread in the child)
        lock.forget_in_child()
    _LOCKS.clear()
    for fd in list(_HELD_FLOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FLOCKS.clear()


os.register_at_fork(after_in_child=_forked)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # (EPERM: another user's live process)
    return True


def writer_alive(layout: Layout) -> bool:
    """True when some process holds the store's writer lock right now."""
    try:  # (O_NONBLOCK: a FIFO in its place blocked verify and read-only opens forever)
        fd = os.open(layout.lock, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    held_flock(fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False  # no writer can hold a lock there: its flock fails (EINVAL)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        let_go_flock(fd)
        os.close(fd)  # also drops the shared lock if we got it
    return False
