"""Where replication reads a store from, and how it writes a restored one: the ONE place
(with :mod:`.logformat`) that imports walstore internals.

Owns the :class:`Source` protocol the shipper consumes (store id, path, durable frontier,
segment files, a consistent LMDB snapshot, the "retain WAL from LSN" pin) and two
implementations: :class:`DirectorySource` reads a store directory from outside the writer
process (read-only; durable frontier found by scanning the last segment and fdatasyncing
it, never ahead of what a crash would keep), and :class:`InProcessSource` adapts an open
``walstore.Store`` of this branch (the lead re-implements it on the new facade).  It also
owns the LMDB-side helpers of restore: checking a downloaded snapshot before LMDB maps it,
reading ``applied``, the state digest, the blobs a snapshot's file tables name, dropping
restore points past a cut, and REDO of a follower's log into its LMDB (with a purge's
erasure, as the writer does it, when the REDO applied one).
"""
from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import struct
import threading
import time
from typing import Callable, Protocol, runtime_checkable

import lmdb

from ..codec import DECODE_ERRORS
from ..errors import WalstoreError
from .. import fileio
from ..engine.layout import Layout, writer_alive
from ..log.reader import FOLLOW_WINDOW, FileBytes
from ..log.segment import create_segment, list_segments
from . import logformat

# free space a snapshot's copy of LMDB leaves beside it, beyond the data file's size: the
# copy goes to the temporary directory, on many machines the store's own file system, and
# a copy made on a nearly full disk took the room the store's commits needed
SNAPSHOT_ROOM_MARGIN = 64 << 20


_U64 = struct.Struct(">Q")
FILE_MODE, DIR_MODE = fileio.FILE_MODE, fileio.DIR_MODE
make_dir = fileio.make_dir
fsync_dir = fileio.fsync_dir
write_file_atomic = fileio.write_file_atomic
__all__ = ["Source", "DirectorySource", "InProcessSource", "read_applied", "state_digest",
           "check_snapshot_file", "prepare_restored_db", "snapshot_blob_refs", "redo_into_lmdb",
           "read_identity", "new_segment_file", "create_empty_db"]


@runtime_checkable
class Source(Protocol):
    """What the shipper needs from a store."""

    store_id: bytes
    path: str
    identity: dict      # the STORE document (format, version, store_id, maybe origin)
    lineage: str        # store id hex for an original store; origin.lineage for a restore

    def durable_lsn(self) -> int: ...
    def complete_mark(self) -> tuple[float, int] | None: ...
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
    ``synced_lsn`` seen in its records.  What ends those records is judged as ``walstore
    verify`` judges it: a last segment shorter than it was made, or with a bad header,
    a bad record with a valid one behind it, or an end below the LSN LMDB was applied up
    to when shipping began are damage (CorruptionError), never a frontier to ship up to.
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
        # commit stamps seen in the last segment: the newest at or below the durable
        # frontier, and (end, stamp) of those past it (see complete_mark)
        self._durable_stamp: float | None = None
        self._stamps_ahead: collections.deque[tuple[int, float]] = collections.deque()
        self._durable = 0
        self._applied_floor: int | None = None  # LMDB's applied LSN, read once (below)
        self.pin: int | None = None
        self.pin_limit: int | None = None  # the pin lets go past this much WAL behind it

    def segments(self) -> list[tuple[int, str]]:
        return list_segments(self.layout.wal)

    def durable_lsn(self) -> int:
        with self._lock:
            if self._applied_floor is None:  # (before the listing and the scan: a writer
                self._applied_floor = self._lmdb_applied()  # logs a record, then applies it)
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
                self._refuse_if_cut_short(path, start)
                if size <= self._tail_off:
                    return max(self._durable, start)
                # (read with pread, a window at a time, never mapped: a segment cut under
                # a mapping — a new writer's recovery cutting a torn tail while this reads
                # it from outside — killed the process with SIGBUS; CONTRACT 4.9)
                mm = FileBytes(fd, size, FOLLOW_WINDOW)
                store_id, hstart, _pre = logformat.read_segment_header(
                    os.pread(fd, logformat.HEADER_SIZE, 0))
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
                    if rec.type == logformat.COMMIT:
                        ts = logformat.summarize(rec.type,
                                                 logformat.payload(mm, rec)).get("ts")
                        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                            self._stamps_ahead.append((rec.end, float(ts)))
                if mm[self._tail_off:self._tail_off + 1] not in (b"", b"\0"):
                    self._refuse_if_corrupt(path, start)
                self._refuse_if_short_of_applied(path)
                if moved and self.fsync:
                    try:
                        os.fdatasync(fd)
                        self._durable = max(self._durable, self._tail_lsn)
                    except OSError:
                        self.fsync = False
                self._durable = max(self._durable, start, min(self._synced_seen, self._tail_lsn))
                if self.fsync:
                    self._durable = max(self._durable, self._tail_lsn)
                self._note_durable_stamps()
                return self._durable
            except ValueError:
                return self._durable
            finally:
                os.close(fd)

    def _note_durable_stamps(self) -> None:
        """Fold the stamps of commits now below the durable frontier (caller holds the
        lock)."""
        ahead, d = self._stamps_ahead, self._durable
        while ahead and ahead[0][0] <= d:
            self._durable_stamp = ahead.popleft()[1]

    def complete_mark(self) -> tuple[float, int] | None:
        """(time, LSN): every commit stamped at or before the time lies below the LSN
        (what a time restore may trust once the replica reaches the LSN), read from outside
        the writer.  With no writer running, now against what the files hold (a writer
        that closed since wrote out every commit it had stamped).  With a live writer, the
        stamp of the newest commit below the durable frontier: the writer stamps and
        appends each commit under one lock, so a commit not in its files yet (one waiting
        in its group commit's buffer while an fsync is slow) was stamped later.  (A fixed
        slack — "stamped a second ago, so it is in the file" — was wrong whenever an fsync
        took longer: a restore to a time complete_to vouched for lacked a commit stamped
        before it, probe-review39.)  None when no commit was seen yet."""
        t = time.time()
        alive = writer_alive(self.layout)
        end = self.durable_lsn()
        if not alive:
            return t, end
        with self._lock:
            stamp = self._durable_stamp
        if stamp is None:
            return None
        return stamp, end

    def _lmdb_applied(self) -> int:
        """LMDB's applied LSN now (0 when it cannot be read: the snapshot says why)."""
        from ..engine.lmdb_state import LmdbState
        try:
            state = LmdbState(self.layout.db, readonly=True)
        except Exception:  # noqa: BLE001 - no LMDB yet, or damaged: not this check's
            return 0
        try:
            return state.applied_lsn()
        except Exception:  # noqa: BLE001 - a damaged row: verify and the snapshot name it
            return 0
        finally:
            state.close()

    def purges_between(self, a: int, b: int) -> list[list] | None:
        """The purges committed at LSNs in [a, b), oldest first: ``[[LSN, prefix], ...]``
        (the prefix as ``purge`` took it, str or bytes), read from LMDB's record of the
        newest purges (``apply.RECENT_PURGES``).  None when it cannot tell: that record
        dropped older purges that may lie in the range, or LMDB cannot be read.  The
        shipper asks when the local WAL of [a, b) was trimmed before it was shipped (a
        hole): a purge in there never reaches the replica as a record, and a restore to
        a point before the hole must still apply it (see ``restore._purges_after``)."""
        from ..codec import decode_key
        from ..engine.apply import KEEP_RECENT_PURGES, RECENT_PURGES
        from ..engine.lmdb_state import LmdbState
        from ..engine.tables import unpack_row
        try:
            state = LmdbState(self.layout.db, readonly=True)  # (shares the env in-process)
        except Exception:  # noqa: BLE001 - cannot read LMDB: cannot tell
            return None
        try:
            raw = state.get(RECENT_PURGES, "meta")
            recent = unpack_row(raw, "meta", RECENT_PURGES, state.data_file) if raw else []
            if len(recent) >= KEEP_RECENT_PURGES and recent[0][0] >= a:
                return None  # (older purges dropped from the record may lie in [a, b))
            return [[lsn, decode_key(bytes(lo))] for lsn, lo, _hi in recent if a <= lsn < b]
        except Exception:  # noqa: BLE001 - a damaged row: verify names it; cannot tell
            return None
        finally:
            state.close()

    def _refuse_if_short_of_applied(self, path: str) -> None:
        """The last segment's valid records end below the LSN LMDB was applied up to when
        shipping began (read before the scan, and a writer logs a record before it applies
        it): acknowledged records are gone from the log (its tail zeroed or cut), as
        ``walstore verify`` says it; CorruptionError, never a replica whose log ends
        there beside a snapshot past it."""
        floor = self._applied_floor or 0
        if self._tail_lsn < floor:
            from ..errors import CorruptionError
            raise CorruptionError(
                f"the WAL of {self.path} is damaged: it ends at LSN {self._tail_lsn} but "
                f"LMDB is applied up to {floor}: acknowledged log records are missing; "
                f"nothing is shipped (run `walstore verify` and `walstore recover`)", path)

    def _refuse_if_cut_short(self, path: str, start: int) -> None:
        """The last segment is shorter than its header says it was made, or its header is
        damaged: CorruptionError.  No writer's segment ever is (each gets its name only
        once its header is durable and its size preallocated), so this is damage, never a
        live tail; the records would otherwise stop at the cut, with nothing behind it
        for ``_refuse_if_corrupt`` to find, and the replica end there (a prefix that
        verifies clean while lacking every commit behind the cut).  Read with the one
        WAL reader, as ``walstore verify`` reads it."""
        from ..errors import CorruptionError
        from ..log.reader import SegmentReader
        try:
            reader = SegmentReader(path, self.store_id, start)
        except FileNotFoundError:
            return  # (trimmed meanwhile: the caller's read finds it gone)
        why = reader.header_error or reader.truncation()
        if why is not None:
            raise CorruptionError(
                f"the WAL of {self.path} is damaged: {why}; "
                f"nothing is shipped past it (run `walstore verify` and `walstore recover`)",
                path)

    def _refuse_if_corrupt(self, path: str, start: int) -> None:
        """The records stopped short of non-zero bytes: a record being written right now
        (a live writer's tail), or damage.  Damage — a valid record behind the invalid
        one, so the invalid one had been durable — raises CorruptionError: the replica
        would otherwise end there, and a restore from it verify as a whole store while
        lacking every commit behind the damage (read with the one WAL reader)."""
        from ..errors import CorruptionError
        from ..log.reader import damage_that_stays
        rec = damage_that_stays(path, self.store_id, start, self._tail_off)
        if rec is not None:
            raise CorruptionError(
                f"the WAL of {self.path} is damaged at LSN {self._tail_lsn} "
                f"({os.path.basename(path)}, offset {self._tail_off}): a valid record at "
                f"LSN {rec.lsn} follows; nothing past the damage is shipped (run `walstore "
                f"verify` and `walstore recover`)")

    def snapshot(self, dest_dir: str) -> int:
        """A consistent compact copy of LMDB into ``dest_dir``; returns its applied LSN.
        StoreIOError (ENOSPC), nothing copied, when ``dest_dir``'s file system has less
        free than the data file's size and SNAPSHOT_ROOM_MARGIN (the shipper reports it
        and tries again later; the WAL ships on)."""
        from ..engine.lmdb_state import LmdbState
        from ..errors import StoreIOError
        size = os.path.getsize(os.path.join(self.layout.db, "data.mdb"))
        room = fileio.free_bytes(dest_dir)
        if room is not None and room < size + SNAPSHOT_ROOM_MARGIN:
            raise StoreIOError(errno.ENOSPC, f"no room for a snapshot: a copy of LMDB "
                               f"({size} bytes) needs {size + SNAPSHOT_ROOM_MARGIN} bytes "
                               f"free in {dest_dir} ({room} are); the WAL ships on",
                               dest_dir)
        state = LmdbState(self.layout.db, readonly=True)  # shares the env in-process
        try:
            # no map resize while LMDB copies itself
            state.gate.call(lambda: state.env.copy(dest_dir, compact=True))
        finally:
            state.close()
        for name in os.listdir(dest_dir):
            os.chmod(os.path.join(dest_dir, name), FILE_MODE)
        return read_applied(dest_dir)

    def commit_lsn(self, txid: int) -> int | None | bool:
        """The LSN the local history records for transaction ``txid``'s commit, None when it
        records none, False when it cannot tell (no history at hand, or trimmed)."""
        return False

    def retain_from(self, lsn: int | None) -> None:
        """Ask the writer to keep WAL segments from ``lsn`` on (None: no pin).  From outside
        the writer process there is no way to pin: recorded only (see InProcessSource)."""
        self.pin = lsn

    def bounded_pin(self) -> int | None:
        """The pin as a checkpoint sees it: None once the log is more than ``pin_limit``
        bytes past it, whatever the shipper does meanwhile (its rounds
        failing, hung on a server, or stopped): a long outage cannot fill the disk."""
        pin, limit = self.pin, self.pin_limit
        if pin is None or limit is None:
            return pin
        try:
            frontier = self._frontier()
        except Exception:  # noqa: BLE001 - cannot tell: keep the pin
            return pin
        return pin if frontier - pin <= limit else None

    def _frontier(self) -> int:
        return self._durable

    def close(self) -> None:
        pass


class InProcessSource(DirectorySource):
    """An open writer Store: the engine's exact durable frontier, and a real trim pin (a
    checkpoint keeps every segment at or above it)."""

    holds_store_lock = True  # (it ships inside the writer that holds the store's lock)

    def __init__(self, store) -> None:
        super().__init__(store.path, fsync=False)
        self._engine = store.engine
        self._pin = self.bounded_pin
        self._engine.retention_pins.append(self._pin)
        self._position = lambda: self.pin  # (unbounded: the blob gc's, see Engine)
        self._engine.replica_positions.append(self._position)

    def retain_from(self, lsn: int | None) -> None:
        """The trim pin, also recorded in the store for its next open (a writer killed
        while replication lagged keeps what the replica needs: Engine keep_replica_pin)."""
        self.pin = lsn
        try:
            self._engine.record_replica_pin(lsn)
        except Exception:  # noqa: BLE001 - a pin not recorded costs a hole at worst,
            pass           # never a commit: replication never fails the store

    def durable_lsn(self) -> int:
        return self._engine.wal.synced_lsn

    def recorded_position(self) -> int | None:
        """The replica's position the last shipper recorded in the store (its meta
        ``replica_pin``), None when none is."""
        return self._engine.stored_replica_position()

    def complete_mark(self) -> tuple[float, int] | None:
        """Exact in the writer's process: the time is read, then the journal lock is
        passed through once (acquired and released at once, nothing done under it: a
        commit stamps its time and appends its record under it), then the written end
        (buffered records included).  None when the lock stays busy for a second (a gate
        held: the next round tries again)."""
        t = time.time()
        lock = self._engine.journal.lock
        if not lock.acquire(timeout=1.0):
            return None
        lock.release()
        return t, self._engine.wal.written_lsn

    def _frontier(self) -> int:
        return self._engine.wal.written_lsn  # (the WAL on disk, synced or not)

    def commit_lsn(self, txid: int) -> int | None | bool:
        eng = self._engine
        try:
            eng.drain()
            row = eng.views.txn_row(int(txid))
            if row is not None:
                return int(row["lsn"])
            if eng.state.meta_int(b"horizon") and txid <= eng.state.meta_int(
                    b"trimmed_txid_max", 1 << 63):
                return False  # retention may have trimmed it
            return None
        except Exception:  # noqa: BLE001 - cannot tell: the caller checks what it can
            return False

    def written_lsn(self) -> int:
        return self._engine.wal.written_lsn

    def snapshot(self, dest_dir: str) -> int:
        """As ``DirectorySource.snapshot``, every published event applied first: the
        writer defers applying to LMDB until commits pause, so under steady commits its
        applied LSN stayed where the last snapshot was and every attempt was dropped as
        "LMDB has not moved" (``snapshot_interval=0`` shipped no snapshot at all, and
        every restore replayed the whole WAL).  What is applied here is what the applier
        would apply at the next pause."""
        try:
            self._engine.drain()
        except Exception:  # noqa: BLE001 - a snapshot of what LMDB holds; the engine
            pass           # reports its own failure, replication never fails the store
        return super().snapshot(dest_dir)

    def sync(self) -> int:
        """Make every commit so far durable; returns the durable frontier."""
        self._engine.journal.sync_all()
        return self._engine.wal.synced_lsn

    def close(self) -> None:
        if self._pin in self._engine.retention_pins:
            self._engine.retention_pins.remove(self._pin)
        if self._position in self._engine.replica_positions:
            self._engine.replica_positions.remove(self._position)


# ---- LMDB helpers ---------------------------------------------------------------------
def check_snapshot_file(path: str) -> None:
    """A downloaded LMDB snapshot (untrusted bytes: a replica's object) checked before
    LMDB maps it: the engine's file check and its walk of every page the newest snapshot
    reaches, with ``pread``.  A damaged one is a CorruptionError (a tampered replica whose
    snapshot was cut to its meta pages, its size and sha256 in the manifest updated to
    match, killed ``walstore restore`` with SIGBUS; a damaged inner page is an assertion in
    LMDB, SIGABRT, when the state digest reads every row)."""
    from ..engine.lmdb_check import walk_lmdb_data_file
    walk_lmdb_data_file(path)


def _open_env(db_dir: str, write: bool = False) -> lmdb.Environment:
    from ..engine.lmdb_check import check_lmdb_files
    from ..engine.lmdb_state import open_env
    check_lmdb_files(db_dir)  # (never a SIGBUS: a file LMDB cannot map is named instead)
    return open_env(db_dir, readonly=not write, lock=write, max_dbs=16, subdir=True,
                    create=False)


def _applied(raw: bytes | None, db_dir: str) -> int:
    """A snapshot's ``meta/applied`` (0: none); a row of the wrong length is a
    CorruptionError naming it and the file, as the engine's u64 rows are."""
    try:
        return _U64.unpack(raw)[0] if raw else 0
    except struct.error as e:
        from ..engine.tables import u64_damaged
        raise u64_damaged("meta", b"applied", raw, False,
                          os.path.join(db_dir, "data.mdb")) from e


def read_applied(db_dir: str) -> int:
    env = _open_env(db_dir)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            raw = txn.get(b"applied")
        return _applied(raw, db_dir)
    finally:
        env.close()


def last_commit(db_dir: str) -> tuple[int, int] | None:
    """(LSN, txid) of the newest commit a snapshot's LMDB applied (its newest ``bylsn``
    row), or None (none, or an older walstore's snapshot without the table)."""
    env = _open_env(db_dir)
    try:
        try:
            db = env.open_db(b"bylsn", create=False)
        except lmdb.NotFoundError:
            return None
        with env.begin(db=db) as txn:
            cur = txn.cursor()
            if not cur.last() or len(cur.key()) != 8 or len(cur.value()) != 8:
                return None
            return _U64.unpack(cur.key())[0], _U64.unpack(cur.value())[0]
    finally:
        env.close()


def read_in_flight(db_dir: str) -> tuple[set, set, dict]:
    """(txids, prepared txids, file effects) a snapshot's LMDB holds in flight: its
    ``inflight`` rows, the prepared ones of ``twophase``, and the ``fsteps`` rows, as
    txid -> {LSN: {ws, op, paths}} (the paths a FILE_STEPS changed; none for a watch's
    begin).  A table an older walstore's snapshot lacks, or a row that does not parse,
    is left out (the restored store's recovery judges its rows)."""
    from ..engine import tables
    opened: set = set()
    prepared: set = set()
    files: dict = {}
    env = _open_env(db_dir)
    try:
        dbs = {}
        for name in (b"inflight", b"twophase", b"fsteps"):
            try:
                dbs[name] = env.open_db(name, create=False)
            except lmdb.NotFoundError:
                continue
        with env.begin() as txn:
            if b"inflight" in dbs:
                for k in txn.cursor(db=dbs[b"inflight"]).iternext(values=False):
                    if len(k) == 8:
                        opened.add(_U64.unpack(k)[0])
            if b"twophase" in dbs:
                for k, v in txn.cursor(db=dbs[b"twophase"]):
                    if not k.startswith(b"p:"):
                        continue
                    try:
                        row = logformat.msgpack.unpackb(v, raw=False, strict_map_key=False)
                    except DECODE_ERRORS:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("tx"), int):
                        prepared.add(row["tx"])
            if b"fsteps" in dbs:
                for k, v in txn.cursor(db=dbs[b"fsteps"]):
                    try:
                        tx, lsn = tables.split_fsteps_key(k)
                        row = logformat.msgpack.unpackb(v, raw=False, strict_map_key=False)
                    except (WalstoreError,) + DECODE_ERRORS:
                        continue
                    if not isinstance(row, dict):
                        continue
                    steps = row.get("steps")
                    paths = [s[0] for s in steps if isinstance(s, (list, tuple)) and s] \
                        if isinstance(steps, (list, tuple)) else []
                    files.setdefault(tx, {})[lsn] = {"ws": row.get("ws"), "op": row.get("op"),
                                                     "paths": paths}
    finally:
        env.close()
    return opened | prepared, prepared, files


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
                except DECODE_ERRORS:  # (a name not UTF-8 is a ValueError too)
                    continue
        return {"applied": _applied(raw, db_dir), "sha256": h.hexdigest(),
                "keys": n, "points": points}
    finally:
        env.close()


def snapshot_blob_refs(db_dir: str) -> dict[str, int | None]:
    """The blobs an LMDB snapshot's file tables name, as the blob gc of a store holding it
    keeps them (``Files.referenced``): every ``fsteps`` row's images and watch manifest,
    the before- and after-images of the versions at or above the retention horizon (below
    it only the newest after-image of each path), a conflict's before-image and each
    workspace's newest manifest.  Digest -> size in bytes (None: a watch manifest, whose
    size no row records).  A snapshot of a store that never kept files names none."""
    from ..engine import tables
    out: dict[str, int | None] = {}

    def image(row) -> None:
        if isinstance(row, (list, tuple)) and len(row) > 3 and row[0] == "f" \
                and isinstance(row[3], str):
            out[row[3]] = row[2] if isinstance(row[2], int) else None

    def manifest(d) -> None:
        if isinstance(d, str):
            out.setdefault(d, None)

    def rows(txn, dbs, name: bytes):
        if dbs.get(name) is None:
            return
        for k, v in txn.cursor(db=dbs[name]):
            try:
                yield bytes(k), logformat.msgpack.unpackb(v, raw=False, strict_map_key=False)
            except DECODE_ERRORS:  # a damaged row: verify of the copy names it
                continue

    env = _open_env(db_dir)
    try:
        dbs = {}
        for name in (b"meta", b"fsteps", b"fversions", b"fconflicts", b"workspaces"):
            try:
                dbs[name] = env.open_db(name, create=False)
            except lmdb.Error:  # (a table an older store did not have yet)
                dbs[name] = None
        with env.begin() as txn:
            raw = txn.get(b"horizon", db=dbs[b"meta"]) if dbs[b"meta"] is not None else None
            horizon = _U64.unpack(raw)[0] if raw and len(raw) == 8 else 0
            for _k, row in rows(txn, dbs, b"fsteps"):
                if isinstance(row, dict):
                    for step in row.get("steps") or ():
                        if isinstance(step, (list, tuple)) and len(step) == 3:
                            image(step[1])
                            image(step[2])
                    manifest(row.get("manifest"))
            below: dict[bytes, object] = {}
            for k, row in rows(txn, dbs, b"fversions"):
                if not isinstance(row, (list, tuple)) or len(row) != 3:
                    continue
                try:
                    lsn = tables.split_fversion_key(k)[2]
                except Exception:  # noqa: BLE001 - a damaged key
                    continue
                if lsn >= horizon:
                    image(row[1])
                    image(row[2])
                else:
                    below[k[:-8]] = row[2]
            for after in below.values():
                image(after)
            for _k, row in rows(txn, dbs, b"fconflicts"):
                if isinstance(row, dict) and isinstance(row.get("conflict"), dict):
                    image(row["conflict"].get("before"))
            for _k, row in rows(txn, dbs, b"workspaces"):
                if isinstance(row, dict):
                    manifest(row.get("manifest"))
    finally:
        env.close()
    return out


def prepare_restored_db(db_dir: str, cut: int, known: dict[str, dict | None]) -> None:
    """A downloaded snapshot becomes a restored store's LMDB as it is: the engine applies
    every event (restore points included) together with the applied LSN, so the snapshot is
    exactly the state at its LSN and the restored WAL's REDO brings it to the cut at the
    first open.  (Kept as the one place to adjust a restored LMDB; nothing to do now.)"""
    for name in os.listdir(db_dir):
        os.chmod(os.path.join(db_dir, name), FILE_MODE)


def create_empty_db(db_dir: str) -> None:
    """The LMDB of an empty store (every named database), for a restore from LSN 0."""
    from ..engine.lmdb_state import LmdbState
    state = LmdbState(db_dir)
    try:
        state.sync()
    finally:
        state.close()
    prepare_restored_db(db_dir, 0, {})


def new_segment_file(wal_dir: str, store_id: bytes, start: int, size: int) -> str:
    """A preallocated, durable, empty segment (the engine's own create_segment)."""
    return create_segment(wal_dir, store_id, start, size)


def redo_into_lmdb(root: str, drop_log_below: Callable[[int], None] | None = None) -> int:
    """Apply a follower's log to its LMDB (REDO only: no ABORT is written, no compensation
    runs: walstore's own recovery pass, which applies every event — commits, actions,
    restore points, two-phase records — exactly as the writer's applier did); returns the
    LSN the log must be kept from (LMDB's applied LSN: intents are applied too).

    When the records past the last event REDO applied carry nothing to redo (a SEAL, a
    CHECKPOINT: what a source's purge checkpoint and its rotations log), ``applied`` moves
    to the log's end, as the writer's checkpoint moves it (``_applied_up_to_the_end``): a
    sealed file is then wholly applied and can go.  (It stayed at the SEAL's start, so the
    file the SEAL ends was never wholly below it: a follower whose source went idle after
    a purge kept the purged bytes in that file for good.)  A transaction's WRITES chunks
    there (its COMMIT not yet copied) keep ``applied`` where it is.

    When a purge's erasure is owed (LMDB's ``erase_owed``: a purge the REDO applied, or
    one whose erasure a stopped follower did not finish), it is done here as the writer's
    purge checkpoint does it (``Engine.erase_old_bytes``, in its order): the log's old
    bytes first (``drop_log_below(applied)``: the caller owns the log files), then LMDB
    rewritten without its free pages (``LmdbState.compact``: readers of the copy in other
    processes see the file replaced and reopen it), the quarantined copies that may hold
    erased keys removed, and the erasure marked done.  Without ``drop_log_below`` nothing
    is erased (the copy's own first open does it)."""
    from ..engine.lmdb_state import LmdbState, StateWriteError, state_io_error
    layout = Layout(root)
    store_id = layout.read_identity()
    state = LmdbState(layout.db)
    try:
        return _redo(layout, store_id, state, drop_log_below)
    except StateWriteError as e:
        # (a full DEST: "writing LMDB failed: mdb_txn_commit: Input/output error", the
        # engine's internal error, no errno, no file, an I/O error where the disk was
        # only full; said as the store says it, as a segment's or a blob's is: audit 66)
        raise state_io_error(e, f"applying the followed log to LMDB in {root}",
                             "nothing was lost: the records copied are in DEST's log, "
                             "and the follower's next run applies them", state.data_file
                             ) from e
    finally:
        state.close()


def _redo(layout: Layout, store_id: bytes, state, drop_log_below) -> int:
    """``redo_into_lmdb``'s work, ``state`` open."""
    from ..engine.apply import Applier
    from ..engine.recovery import Recovery
    from ..engine.scrub import scrub_quarantine
    layout.upgrade_identity()  # (this walstore writes its LMDB: see Layout)
    Recovery(layout.root, store_id, state, "strict").run()
    state.sync()
    applied = state.applied_lsn()
    end = _inert_tail_end(layout.wal, store_id, applied)
    if end is not None:  # (the writer's ``_applied_up_to_the_end``)
        Applier(state).set_meta(b"applied", end)
        state.sync()
        applied = end
    owed = _erase_owed(state)
    if owed and drop_log_below is not None:
        drop_log_below(applied)
        state.compact()
        ranges = [(bytes(lo), None if hi is None else bytes(hi)) for lo, hi in owed]
        scrub_quarantine(layout.quarantine, [lo for lo, _hi in ranges if lo], ranges)
        Applier(state).erased(owed)
        state.sync()
    return applied


_INERT = frozenset({logformat.SEAL, logformat.CHECKPOINT})


def _inert_tail_end(wal_dir: str, store_id: bytes, applied: int) -> int | None:
    """The log's end when it lies past ``applied`` and every record from ``applied`` on
    carries nothing to redo (SEAL, CHECKPOINT); else None.  Each segment file's records
    are framed under that file's salt (a follower's log: ``RestoredLog``)."""
    segs = list_segments(wal_dir)
    end = applied
    for (start, path), nxt in zip(segs, [s for s, _p in segs[1:]] + [None]):
        if nxt is not None and nxt <= applied:
            continue
        lsn = max(start, applied)  # (a file's LSNs run on from its header: read from here)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= logformat.HEADER_SIZE:
                continue
            mm = FileBytes(f.fileno(), size)  # (pread: never a SIGBUS)
            for rec in logformat.iter_records(mm, logformat.HEADER_SIZE + lsn - start,
                                              lsn, logformat.salt(store_id, start), size):
                if rec.type not in _INERT:
                    return None
                end = rec.end
    return end if end > applied else None


def _erase_owed(state) -> list:
    """The purge ranges ([lo, hi]) whose old bytes are not erased yet (``Engine.erase_owed``
    without an engine)."""
    from ..engine.apply import ERASE_OWED
    from ..engine.tables import unpack_row
    raw = state.get(ERASE_OWED, "meta")
    return unpack_row(raw, "meta", ERASE_OWED, state.data_file) if raw else []
