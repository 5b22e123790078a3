"""Where replication reads a store from, and how it writes a restored one: the ONE place
(with :mod:`.logformat`) that imports walstore internals.

Owns the :class:`Source` protocol the shipper consumes (store id, path, durable frontier,
segment files, a consistent LMDB snapshot, the "retain WAL from LSN" pin) and two
implementations: :class:`DirectorySource` reads a store directory from outside the writer
process (read-only; durable frontier found by scanning the last segment and fdatasyncing
it, never ahead of what a crash would keep), and :class:`InProcessSource` adapts an open
``walstore.Store`` of this branch (the lead re-implements it on the new facade).  It also
owns the LMDB-side helpers of restore: reading ``applied``, the state digest, dropping
restore points past a cut, and REDO of a follower's log into its LMDB.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from typing import Callable, Protocol, runtime_checkable

import lmdb

from .. import fileio
from ..layout import Layout
from ..segments import create_segment, list_segments
from . import logformat

_U64 = struct.Struct(">Q")
FILE_MODE, DIR_MODE = fileio.FILE_MODE, fileio.DIR_MODE
make_dir = fileio.make_dir
fsync_dir = fileio.fsync_dir
write_file_atomic = fileio.write_file_atomic
__all__ = ["Source", "DirectorySource", "InProcessSource", "read_applied", "state_digest",
           "prepare_restored_db", "redo_into_lmdb", "read_identity", "new_segment_file",
           "create_empty_db"]


@runtime_checkable
class Source(Protocol):
    """What the shipper needs from a store."""

    store_id: bytes
    path: str
    identity: dict      # the STORE document (format, version, store_id, maybe origin)
    lineage: str        # store id hex for an original store; origin.lineage for a restore

    def durable_lsn(self) -> int: ...
    def segments(self) -> list[tuple[int, str]]: ...
    def snapshot(self, dest_dir: str) -> int: ...
    def retain_from(self, lsn: int | None) -> None: ...
    def close(self) -> None: ...


def read_identity(path: str) -> tuple[bytes, dict]:
    """(store id, STORE document) of the store at ``path``; NotAStore when it is not one."""
    layout = Layout(path)
    store_id = layout.read_identity()
    with open(layout.identity, "rb") as f:
        doc = json.loads(f.read(1 << 16))
    return store_id, doc


def lineage_of(store_id: bytes, identity: dict) -> str:
    origin = identity.get("origin")
    if isinstance(origin, dict) and isinstance(origin.get("lineage"), str):
        return origin["lineage"]
    return store_id.hex()


class DirectorySource:
    """A store directory read from outside its writer (never writes a byte of it).

    The durable frontier: every segment but the last is durable (the writer fsyncs a
    segment before creating the next); in the last one, the end of the valid records,
    made durable by an fdatasync of our own (``fsync=True``), else the largest
    ``synced_lsn`` seen in its records.
    """

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.layout = Layout(path)
        self.path = self.layout.root
        self.store_id, self.identity = read_identity(path)
        self.lineage = lineage_of(self.store_id, self.identity)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._tail: tuple[int, str] | None = None
        self._tail_off = logformat.HEADER_SIZE
        self._tail_lsn = 0
        self._synced_seen = 0
        self._durable = 0
        self.pin: int | None = None

    def segments(self) -> list[tuple[int, str]]:
        return list_segments(self.layout.wal)

    def durable_lsn(self) -> int:
        with self._lock:
            segs = self.segments()
            if not segs:
                return self._durable
            start, path = segs[-1]
            if self._tail != (start, path):
                self._tail, self._tail_off, self._tail_lsn = (start, path), logformat.HEADER_SIZE, start
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return self._durable
            try:
                size = os.fstat(fd).st_size
                if size <= self._tail_off:
                    return max(self._durable, start)
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                    store_id, hstart, _pre = logformat.read_segment_header(mm[:logformat.HEADER_SIZE])
                    if store_id != self.store_id or hstart != start:
                        return self._durable
                    salt = logformat.salt(self.store_id, start)
                    moved = False
                    for rec in logformat.iter_records(mm, self._tail_off, self._tail_lsn, salt,
                                                      len(mm)):
                        self._tail_off += rec.size
                        self._tail_lsn = rec.end
                        self._synced_seen = max(self._synced_seen, rec.synced)
                        moved = True
                if moved and self.fsync:
                    try:
                        os.fdatasync(fd)
                        self._durable = max(self._durable, self._tail_lsn)
                    except OSError:
                        self.fsync = False
                self._durable = max(self._durable, start, min(self._synced_seen, self._tail_lsn))
                if self.fsync:
                    self._durable = max(self._durable, self._tail_lsn)
                return self._durable
            except ValueError:
                return self._durable
            finally:
                os.close(fd)

    def snapshot(self, dest_dir: str) -> int:
        """A consistent compact copy of LMDB into ``dest_dir``; returns its applied LSN."""
        from ..kv import LmdbState
        state = LmdbState(self.layout.db, readonly=True)  # shares the env in-process
        try:
            with state.gate:
                state.env.copy(dest_dir, compact=True)
        finally:
            state.close()
        for name in os.listdir(dest_dir):
            os.chmod(os.path.join(dest_dir, name), FILE_MODE)
        return read_applied(dest_dir)

    def retain_from(self, lsn: int | None) -> None:
        """Ask the writer to keep WAL segments from ``lsn`` on (None: no pin).  From outside
        the writer process there is no way to pin: recorded only (see InProcessSource)."""
        self.pin = lsn

    def close(self) -> None:
        pass


class InProcessSource(DirectorySource):
    """An open Store of this branch: exact durable frontier, and a real trim pin."""

    def __init__(self, store) -> None:
        super().__init__(store.path, fsync=False)
        self._store = store
        wal = store.wal
        trim = wal.trim_below

        def trim_below(lsn: int, _trim=trim):
            pin = self.pin
            return _trim(lsn if pin is None else min(lsn, pin))
        wal.trim_below = trim_below

    def durable_lsn(self) -> int:
        return self._store.wal.synced_lsn

    def written_lsn(self) -> int:
        return self._store.wal.written_lsn


# ---- LMDB helpers ---------------------------------------------------------------------
def _open_env(db_dir: str, write: bool = False) -> lmdb.Environment:
    return lmdb.open(db_dir, readonly=not write, lock=write, max_dbs=16, subdir=True,
                     create=False)


def read_applied(db_dir: str) -> int:
    env = _open_env(db_dir)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            raw = txn.get(b"applied")
        return _U64.unpack(raw)[0] if raw else 0
    finally:
        env.close()


def state_digest(db_dir: str) -> dict:
    """sha256 over the sorted (key, value) rows of the data DB, with applied, the count,
    and the restore points (name -> {lsn, ts}) the copy holds."""
    env = _open_env(db_dir)
    h = hashlib.sha256()
    n = 0
    try:
        meta = env.open_db(b"meta", create=False)
        data = env.open_db(b"data", create=False)
        points_db = env.open_db(b"points", create=False)
        points = {}
        with env.begin() as txn:
            raw = txn.get(b"applied", db=meta)
            for k, v in txn.cursor(db=data):
                h.update(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v)
                n += 1
            for k, v in txn.cursor(db=points_db):
                try:
                    points[k.decode("utf-8")] = logformat.msgpack.unpackb(v, raw=False)
                except Exception:
                    continue
        return {"applied": _U64.unpack(raw)[0] if raw else 0, "sha256": h.hexdigest(),
                "keys": n, "points": points}
    finally:
        env.close()


def prepare_restored_db(db_dir: str, cut: int, known: dict[str, dict | None]) -> None:
    """A downloaded snapshot becomes a restored store's LMDB.

    Restore points: ``restore_point`` writes its row at once, not with the applied LSN, so
    a snapshot may hold rows newer than its LSN, or lack one dropped after it.  The rows
    become: every point ``known`` (from the manifest) as alive at the cut ({lsn, ts}) or
    not (None), and of the others those named before the cut.  The store is marked as
    needing recovery (its WAL is REDOne on open)."""
    env = _open_env(db_dir, write=True)
    try:
        points = env.open_db(b"points", create=False)
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True) as txn:
            drop = []
            for k, v in txn.cursor(db=points):
                try:
                    name = k.decode("utf-8")
                    row = logformat.msgpack.unpackb(v, raw=False)
                    if name not in known and int(row["lsn"]) >= cut:
                        drop.append(k)
                except Exception:
                    continue
            for k in drop:
                txn.delete(k, db=points)
            for name, row in known.items():
                if row is None:
                    txn.delete(name.encode("utf-8"), db=points)
                else:
                    txn.put(name.encode("utf-8"), logformat.msgpack.packb(
                        {"lsn": row["lsn"], "ts": row["ts"]}, use_bin_type=True), db=points)
            txn.put(b"open", _U64.pack(1), db=meta)
        env.sync(True)
    finally:
        env.close()
    for name in os.listdir(db_dir):
        os.chmod(os.path.join(db_dir, name), FILE_MODE)


def create_empty_db(db_dir: str) -> None:
    """The LMDB of an empty store (every named database), for a restore from LSN 0."""
    from ..kv import LmdbState
    state = LmdbState(db_dir)
    try:
        state.sync()
    finally:
        state.close()
    prepare_restored_db(db_dir, 0, {})


def new_segment_file(wal_dir: str, store_id: bytes, start: int, size: int) -> str:
    """A preallocated, durable, empty segment (the engine's own create_segment)."""
    return create_segment(wal_dir, store_id, start, size)


class _Indexer:
    """The agent layer's per-commit LMDB rows (actions, two-phase decisions), for REDO in a
    follower that never opens the store as a writer."""

    def __init__(self, state) -> None:
        from ..actions import ActionsMixin
        from ..twophase import TwoPhaseMixin
        shim = type("_IndexShim", (ActionsMixin, TwoPhaseMixin), {})
        self.obj = shim.__new__(shim)
        self.obj.state = state

    def __call__(self, txn, entry) -> None:
        self.obj._index_entry(txn, entry)


def redo_into_lmdb(root: str) -> int:
    """Apply the committed transactions of a follower's log to its LMDB (REDO only: no
    ABORT is written, no compensation runs); returns the LSN the log must be kept from
    (the applied LSN, or the first record of a transaction still in flight)."""
    from .. import history
    from ..actions import ActionRecovery
    from ..kv import LmdbState
    from ..recovery import Recovery
    layout = Layout(root)
    store_id = layout.read_identity()
    state = LmdbState(layout.db)
    try:
        undo = ActionRecovery()
        rec = Recovery(layout.root, store_id, state, "strict",
                       handlers={t: f for t, f in undo.handlers().items()
                                 if t == logformat.RESTORE_POINT})
        rec.on_apply = _Indexer(state)
        rec.run()
        for name, point in undo.points.items():
            if point is None:
                history.drop_point(state, name)
            else:
                history.put_point(state, name, point["lsn"], point["ts"])
        state.sync()
        applied = state.applied_lsn()
        return min([applied] + list(rec.analysis.open_txids.values()))
    finally:
        state.close()
