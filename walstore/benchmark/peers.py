"""The systems measured: walstore (public API only), SQLite as its users run it, raw py-lmdb,
and the bare preallocated pwrite + fdatasync loop (the disk's physical limit for a durable
single-thread commit), also paced by walstore's own commit time (the same disk's limit for
a writer as busy between syncs as walstore is).

Each peer opens in a fresh directory and offers the same operations: ``write`` (one
transaction), ``bulk`` (one transaction through the system's own bulk call), ``get``
(outside a transaction), ``savepoint_write``, ``reopen`` and ``thread_writer`` (what one
worker thread of a multi-thread run calls).  A peer raises NotImplementedError for what it
cannot do; no workload asks it.
"""
from __future__ import annotations

import functools
import importlib
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import type_and_message
from .data import KEY_BYTES, make_value
from .spec import Context, Item

WRITE_OVERHEAD_FALLBACK = 62          # walstore's framing of one put, in bytes, when the
                                      # run cannot measure it (today: 182 B for 20 + 100)


class WalstorePeer:
    """walstore through its public API.  ``hold_open`` begins a transaction right after
    opening, reads a key with it and leaves it open until close: issue 10's "an agent
    thinking, or a transaction dropped without commit"."""

    def __init__(self, path: Path, durability: str, hold_open: bool = False) -> None:
        import walstore
        self._walstore, self._path, self._durability = walstore, path / "store", durability
        self.store = walstore.open(str(self._path), durability=durability)
        self.held: Any = None
        if hold_open:
            with self.store.transaction() as tx:
                tx.put(b"held/anchor", b"anchor")
            self.held = self.store.transaction()
            self.held.get(b"held/anchor")

    def write(self, items: Sequence[Item]) -> None:
        with self.store.transaction() as tx:
            for k, v in items:
                tx.put(k, v)

    def bulk(self, items: Sequence[Item]) -> str:
        with self.store.transaction() as tx:
            if hasattr(tx, "update"):
                tx.update(items)
                return "tx.update(items)"
            for k, v in items:
                tx.put(k, v)
        return "tx.put loop (no tx.update yet)"

    def get(self, key: bytes) -> bytes | None:
        return self.store.get(key)

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        with self.store.transaction() as tx:
            tx.put(*keep)
            sp = tx.savepoint("retry")
            tx.put(*discard)
            tx.rollback_to(sp)

    def thread_writer(self) -> Callable[[Sequence[Item]], None]:
        return self.write

    def reopen(self) -> None:
        self.store.close()
        self.store = self._walstore.open(str(self._path), durability=self._durability)

    def settle(self) -> None:
        """Apply everything logged so far to LMDB and checkpoint (untimed set-up work
        that must not land in a timed close)."""
        self.store.checkpoint()

    def close(self) -> None:
        if self.held is not None:
            self.held.rollback()
        self.store.close()


class SqlitePeer:
    """stdlib sqlite3, WAL mode, a WITHOUT ROWID table of BLOB keys (the fastest plain
    key-value table).  Writes are upserts (what ``put`` means).  By default one connection
    shared by every thread under a lock; ``per_thread`` gives each worker thread its own
    connection (SQLite's own locking, busy_timeout 60 s).  Single puts are autocommit."""

    UPSERT = ("INSERT INTO kv(k, v) VALUES(?, ?) "
              "ON CONFLICT(k) DO UPDATE SET v = excluded.v")

    def __init__(self, path: Path, synchronous: str, per_thread: bool = False) -> None:
        self._file, self._sync, self._per_thread = path / "kv.sqlite", synchronous, per_thread
        self._lock = threading.Lock()
        self._extra: list[sqlite3.Connection] = []
        self._db = self._connect()
        self._db.execute("CREATE TABLE IF NOT EXISTS kv(k BLOB PRIMARY KEY, v BLOB) "
                         "WITHOUT ROWID")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._file, isolation_level=None, check_same_thread=False,
                             timeout=60.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._sync}")
        return db

    def _write(self, db: sqlite3.Connection, items: Sequence[Item]) -> None:
        if len(items) == 1:
            db.execute(self.UPSERT, items[0])
            return
        db.execute("BEGIN IMMEDIATE")
        db.executemany(self.UPSERT, items)
        db.execute("COMMIT")

    def write(self, items: Sequence[Item]) -> None:
        with self._lock:
            self._write(self._db, items)

    def bulk(self, items: Sequence[Item]) -> str:
        self.write(items)
        return "executemany in one transaction"

    def get(self, key: bytes) -> bytes | None:     # autocommit read
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            db.execute(self.UPSERT, keep)
            db.execute("SAVEPOINT retry")
            db.execute(self.UPSERT, discard)
            db.execute("ROLLBACK TO retry")
            db.execute("COMMIT")

    def thread_writer(self) -> Callable[[Sequence[Item]], None]:
        if not self._per_thread:
            return self.write
        db = self._connect()
        with self._lock:
            self._extra.append(db)
        return functools.partial(self._write, db)

    def reopen(self) -> None:
        self._db.close()
        self._db = self._connect()

    def close(self) -> None:
        for db in self._extra:
            db.close()
        self._db.close()


class LmdbPeer:
    """Raw py-lmdb: a write transaction per ``write``, ``putmulti`` for bulk, a read
    transaction per ``get``; a savepoint is a nested write transaction that is aborted."""

    def __init__(self, path: Path, sync: bool) -> None:
        import lmdb
        self._lmdb, self._dir, self._sync = lmdb, str(path / "lmdb"), sync
        self._env = self._open()

    def _open(self) -> Any:
        return self._lmdb.open(self._dir, map_size=4 << 30, sync=self._sync, metasync=True)

    def write(self, items: Sequence[Item]) -> None:
        with self._env.begin(write=True) as txn:
            for k, v in items:
                txn.put(k, v)

    def bulk(self, items: Sequence[Item]) -> str:
        with self._env.begin(write=True) as txn:
            txn.cursor().putmulti(items)
        return "cursor.putmulti in one transaction"

    def get(self, key: bytes) -> bytes | None:
        with self._env.begin() as txn:
            return txn.get(key)

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(*keep)
            child = self._env.begin(write=True, parent=txn)
            child.put(*discard)
            child.abort()

    def thread_writer(self) -> Callable[[Sequence[Item]], None]:
        return self.write

    def reopen(self) -> None:
        self._env.close()
        self._env = self._open()

    def close(self) -> None:
        self._env.close()


class _PreallocatedLog:
    """A file of PREALLOCATED zeros, written and synced with its directory entry before
    the first record, so no record's write changes the file's size or metadata; each
    ``append`` is one ``pwrite`` and one ``fdatasync``.  Past the end it wraps to the
    start: still overwriting preallocated blocks."""

    PREALLOCATED = 16 * (1 << 20)

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)   # (files are 0600)
        zeros = bytes(1 << 20)
        for _ in range(self.PREALLOCATED // len(zeros)):
            os.write(self._fd, zeros)
        os.fsync(self._fd)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._offset = 0

    def append(self, record: bytes) -> None:
        if self._offset + len(record) > self.PREALLOCATED:
            self._offset = 0
        os.pwrite(self._fd, record, self._offset)
        os.fdatasync(self._fd)
        self._offset += len(record)

    def close(self) -> None:
        os.close(self._fd)


class BarePeer(_PreallocatedLog):
    """The physical limit: each write is one ``pwrite`` of a record the size walstore
    frames the same put into, then ``fdatasync``, into a preallocated file."""

    def __init__(self, path: Path, value_bytes: int) -> None:
        self.record_bytes = walstore_record_bytes(value_bytes)
        super().__init__(path / "bare.log")

    def write(self, items: Sequence[Item]) -> None:
        k, v = items[0]
        self.append((k + v).ljust(self.record_bytes, b"\0"))


class PacedBarePeer(BarePeer):
    """The bare loop, paced: before each record it spins (busy, as a committer's CPU is)
    for as long as walstore spends on one such commit without its fsync
    (``walstore_commit_cpu_s``).  On a disk whose fdatasync answers differently when the
    writer was busy between syncs (seen here, a virtual disk: with up to ~30 µs of CPU
    between syncs its p90 was ~55 µs, with 35-40 µs 300-800 µs; PROFILE.md, 31st round)
    the plain bare loop is a limit no writer that thinks between commits reaches; this
    row is the same disk's answer to a writer that thinks as long as walstore does.  It
    is beside the bare loop, never instead of it: the targets stay against ``bare``."""

    def __init__(self, path: Path, value_bytes: int) -> None:
        super().__init__(path, value_bytes)
        self.pace_s = walstore_commit_cpu_s(value_bytes)

    def write(self, items: Sequence[Item]) -> None:
        k, v = items[0]
        record = (k + v).ljust(self.record_bytes, b"\0")
        clock = time.perf_counter
        until = clock() + self.pace_s
        while clock() < until:
            pass
        self.append(record)


@functools.lru_cache(maxsize=None)
def walstore_commit_cpu_s(value_bytes: int, commits: int = 2_000) -> float:
    """Seconds walstore takes for one single-put commit of a KEY_BYTES key and a
    value_bytes value with durability="none" (its CPU and its pwrite, no fsync), the mean
    of ``commits`` after as many to warm up, in this run.  It leaves out what the fsync
    itself adds under "full" (the group commit's leader: about 7 µs here), so a row paced
    by it waits less between syncs than walstore does: it does not flatter walstore.
    0.0 when walstore cannot run."""
    try:
        import walstore
        with tempfile.TemporaryDirectory(prefix="walstore-bench-pace-") as tmp:
            store = walstore.open(os.path.join(tmp, "s"), durability="none")
            try:
                values = [make_value(i, value_bytes) for i in range(2 * commits)]
                keys = [b"k%019d" % i for i in range(2 * commits)]
                start = 0.0
                for i in range(2 * commits):
                    if i == commits:
                        start = time.perf_counter()
                    with store.transaction() as tx:
                        tx.put(keys[i], values[i])
                return (time.perf_counter() - start) / commits
            finally:
                store.close()
    except Exception:  # noqa: BLE001 - no pace: the row is the bare loop
        return 0.0


class PythonFloorPeer(_PreallocatedLog):
    """The least a transactional write-ahead log written in Python does per durable
    commit, and nothing more: a transaction object used as a context manager, its puts in
    a dict, at the end the write set msgpack-packed behind a header with a CRC-32C (the
    same C extension walstore uses), one ``pwrite`` and one ``fdatasync`` into a file
    preallocated like the bare loop's.  No reads, no conflict check, no savepoints, no
    index, nothing applied anywhere, no recovery: not a store, a floor — what any store
    with a Python transaction API pays on top of the bare loop here.  A ratio of walstore
    to the bare loop above this row's is out of any such store's reach."""

    class _Transaction:
        __slots__ = ("peer", "writes")

        def __init__(self, peer: "PythonFloorPeer") -> None:
            self.peer, self.writes = peer, {}

        def __enter__(self) -> "PythonFloorPeer._Transaction":
            return self

        def put(self, key: bytes, value: bytes) -> None:
            self.writes[key] = value

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.peer._commit(self.writes)

    def __init__(self, path: Path, value_bytes: int) -> None:
        import struct

        import msgpack

        from walstore.log.format import crc32c
        super().__init__(path / "floor.log")
        self._txid = 0
        self._pack = msgpack.Packer().pack
        self._head = struct.Struct("<IQ").pack  # length, txid (the CRC before them)
        self._crc = struct.Struct("<I").pack
        self._crc32c = crc32c

    def transaction(self) -> "PythonFloorPeer._Transaction":
        return self._Transaction(self)

    def write(self, items: Sequence[Item]) -> None:
        with self.transaction() as tx:
            for k, v in items:
                tx.put(k, v)

    def _commit(self, writes: dict) -> None:
        self._txid += 1
        payload = self._pack([self._txid, list(writes.items())])
        head = self._head(len(payload), self._txid)
        self.append(self._crc(self._crc32c(payload, self._crc32c(head))) + head + payload)


@functools.lru_cache(maxsize=None)
def walstore_record_bytes(value_bytes: int) -> int:
    """Bytes walstore's log takes for a commit of one put of a KEY_BYTES key and a
    value_bytes value, measured from consecutive commits' LSNs when LSNs are byte
    positions (as today); else the key, the value and today's framing overhead."""
    payload = KEY_BYTES + value_bytes
    try:
        import walstore
        with tempfile.TemporaryDirectory(prefix="walstore-bench-calibrate-") as tmp:
            store = walstore.open(os.path.join(tmp, "s"), durability="none")
            try:
                lsns = []
                for i in range(3):
                    with store.transaction() as tx:
                        tx.put(b"k%019d" % i, make_value(i, value_bytes))
                    lsns.append(int(tx.lsn))
            finally:
                store.close()
        step = lsns[2] - lsns[1]
        if step == lsns[1] - lsns[0] and payload <= step <= payload + 1024:
            return step
    except Exception:  # noqa: BLE001 - any failure: fall back to the known overhead
        pass
    return payload + WRITE_OVERHEAD_FALLBACK


@dataclass(frozen=True)
class System:
    name: str
    label: str
    module: str                       # what must import for the system to run
    open: Callable[[Context], Any] | None = None   # None: the workload opens it itself


def _sys(name: str, label: str, module: str, factory: Callable[..., Any] | None = None,
         **options: Any) -> System:
    opener = None if factory is None else (
        lambda ctx: factory(ctx.directory, **options))
    return System(name, label, module, opener)


SYSTEMS: dict[str, System] = {s.name: s for s in (
    _sys("walstore", 'walstore, durability="full"', "walstore", WalstorePeer,
         durability="full"),
    _sys("walstore-normal", 'walstore, durability="normal"', "walstore", WalstorePeer,
         durability="normal"),
    _sys("walstore-normal-held", 'walstore, durability="normal", one transaction held open',
         "walstore", WalstorePeer, durability="normal", hold_open=True),
    _sys("sqlite-full", "sqlite3 WAL, synchronous=FULL, one connection (shared under a "
         "lock by threads)", "sqlite3", SqlitePeer, synchronous="FULL"),
    _sys("sqlite-full-per-thread", "sqlite3 WAL, synchronous=FULL, a connection per thread",
         "sqlite3", SqlitePeer, synchronous="FULL", per_thread=True),
    _sys("sqlite-normal", "sqlite3 WAL, synchronous=NORMAL", "sqlite3", SqlitePeer,
         synchronous="NORMAL"),
    _sys("lmdb-sync", "py-lmdb sync=True (a read transaction per get)", "lmdb", LmdbPeer,
         sync=True),
    System("bare", "bare loop: pwrite + fdatasync of a walstore-sized record into a "
           "preallocated file", "os", lambda ctx: BarePeer(ctx.directory, ctx.value_bytes)),
    System("bare-paced", "bare loop, paced: the same, after spinning as long as walstore "
           "takes for such a commit without its fsync (durability=\"none\", measured in "
           "this run): the disk's answer to a writer that is busy that long between syncs",
           "os", lambda ctx: PacedBarePeer(ctx.directory, ctx.value_bytes)),
    System("python-floor", "the least a Python transactional WAL does per durable commit "
           "(a transaction object, its dict, msgpack, CRC-32C, pwrite + fdatasync into a "
           "preallocated file; not a store: the ceiling for any store with a Python API)",
           "msgpack", lambda ctx: PythonFloorPeer(ctx.directory, ctx.value_bytes)),
    _sys("walstore-saver", 'WalstoreSaver (walstore durability="full"), invoke',
         "walstore.integrations.langgraph"),
    _sys("sqlite-saver", "langgraph-checkpoint-sqlite SqliteSaver (WAL, synchronous=FULL), "
         "invoke", "langgraph.checkpoint.sqlite"),
    _sys("memory-saver", "langgraph InMemorySaver, invoke (no disk, nothing durable: the "
         "ceiling any saver can reach in one Python process)", "langgraph.checkpoint.memory"),
    _sys("walstore-saver-async", "WalstoreSaver, ainvoke", "walstore.integrations.langgraph"),
    _sys("memory-saver-async", "langgraph InMemorySaver, ainvoke (no disk, nothing durable: "
         "the ceiling any saver can reach in one Python process)", "langgraph.checkpoint.memory"),
    _sys("async-sqlite-saver", "langgraph-checkpoint-sqlite AsyncSqliteSaver (aiosqlite), "
         "ainvoke", "langgraph.checkpoint.sqlite.aio"),
)}


def unavailable(system: System) -> str | None:
    """Why the system cannot run here, or None."""
    try:
        module = importlib.import_module(system.module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run"
        return f"cannot import {system.module}: {type_and_message(exc)}"
    if system.module == "walstore" and not hasattr(module, "open"):
        return "walstore.open is missing"
    return None
