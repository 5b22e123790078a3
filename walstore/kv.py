"""The LMDB side of the store: committed state, applied in batches behind the WAL.

Owns the LMDB environment ``<store>/db`` and its named databases:

- ``data``: stored key -> packed value (the committed state up to ``applied``);
- ``txns``: txid (8-byte big endian) -> packed TxnInfo record (the transaction log index);
- ``meta``: small bookkeeping (``applied``: end LSN of the last applied commit; ``next_txid``;
  ``open``: 1 while a writer has the store open, the clean-shutdown flag).

Invariants:
- LMDB is opened with sync=True and metasync=False, never sync=False / map_async /
  writemap: a power loss may undo the last LMDB commits but never corrupts the B-tree;
- ``applied`` is written in the same LMDB transaction as the data it covers, so REDO of
  the WAL from ``applied`` is idempotent;
- a map-full error aborts the batch, grows the map (no transaction of this process is
  open then: readers pass through ``ResizeGate``) and retries it; the user never sees it;
- long reads are streamed in bounded chunks, each in its own short read transaction, so a
  slow consumer never pins old pages or blocks a map resize.
"""
from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from typing import Iterator

import lmdb

from .errors import ReadOnlyError, WalstoreError


class MapResizeBlocked(WalstoreError):
    """LMDB's map must grow but open scans in this process keep it from resizing."""

DEFAULT_MAP_SIZE = 64 * 1024 * 1024
_U64 = struct.Struct(">Q")
SCAN_CHUNK = 256


_DBS = {"data": b"data", "txns": b"txns", "meta": b"meta", "hist": b"hist", "bylsn": b"bylsn",
        "points": b"points", "actions": b"actions", "meta2": b"twophase", "hkeys": b"hkeys"}


def txid_key(txid: int) -> bytes:
    return _U64.pack(txid)


class ResizeGate:
    """Readers enter and leave freely; a map resize waits until no reader is inside."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._resizing = False

    def __enter__(self) -> "ResizeGate":
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0 and self._resizing:
                self._cond.notify_all()

    def exclusive(self, fn, timeout: float = 2.0) -> bool:
        """Run ``fn`` with no reader inside; False if readers did not leave in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._resizing = True
            try:
                while self._readers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                fn()
                return True
            finally:
                self._resizing = False
                self._cond.notify_all()


class LmdbState:
    """Committed key-value state in LMDB.  Thread-safe; one writer thread at a time."""

    _registry: dict[str, dict] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: str, map_size: int | None = None, readonly: bool = False) -> None:
        """Open (or share, within this process) the environment at ``path``.

        py-lmdb allows one open of an environment per process, so handles on the same
        path share one environment, its resize gate and its write lock (ref-counted).
        """
        self.path = os.path.realpath(path)
        self.readonly = readonly
        with LmdbState._registry_lock:
            shared = LmdbState._registry.get(self.path)
            if shared is None:
                shared = self._open_shared(path, map_size, readonly)
                LmdbState._registry[self.path] = shared
            elif shared["readonly"] and not readonly:
                raise WalstoreError(f"{path} is open read-only in this process; close those "
                                    f"handles before opening it for writing")
            shared["refs"] += 1
        self._shared = shared
        self.env = shared["env"]
        self.gate = shared["gate"]
        self._write_lock = shared["write_lock"]
        self.data = shared["data"]          # stored key -> packed value
        self.txns = shared["txns"]          # txid -> transaction-log row
        self.meta = shared["meta"]          # applied, next_txid, open, horizon, wal_start
        self.hist = shared["hist"]          # key versions (walstore.history)
        self.bylsn = shared["bylsn"]        # commit LSN -> txid
        self.hkeys = shared["hkeys"]        # keys that have history
        self.points = shared["points"]      # restore points
        self.actions = shared["actions"]    # action rows (walstore.actions)
        self.meta2 = shared["meta2"]        # prepared transactions, 2PC decisions
        if not readonly:
            self.env.reader_check()  # free slots left by killed processes

    @staticmethod
    def _open_shared(path: str, map_size: int | None, readonly: bool) -> dict:
        if not readonly:
            os.makedirs(path, mode=0o700, exist_ok=True)
        env = lmdb.open(path, map_size=map_size or DEFAULT_MAP_SIZE, max_dbs=16, subdir=True,
                        readonly=readonly, sync=True, metasync=False, map_async=False,
                        writemap=False, lock=True, max_readers=126, create=not readonly,
                        mode=0o600)
        shared = {"env": env, "readonly": readonly, "refs": 0, "gate": ResizeGate(),
                  "write_lock": threading.Lock()}
        try:
            for name, dbname in _DBS.items():
                shared[name] = env.open_db(dbname, create=not readonly)
        except lmdb.Error:
            env.close()
            raise
        return shared

    # ---- reads -------------------------------------------------------------------------
    def begin(self, db=None):
        """A read transaction; adopts a map grown by the writer process (MapResizedError)."""
        try:
            return self.env.begin(db=db)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(db=db)

    def get(self, key: bytes, db=None) -> bytes | None:
        with self.gate:
            with self.begin(db or self.data) as txn:
                return txn.get(key)

    def get_meta_int(self, name: bytes, default: int = 0) -> int:
        raw = self.get(name, self.meta)
        return default if raw is None else _U64.unpack(raw)[0]

    def applied_lsn(self) -> int:
        return self.get_meta_int(b"applied")

    def snapshot_scan(self, lo: bytes, hi: bytes | None, reverse: bool = False
                      ) -> "SnapshotScan":
        """Stream data rows from ONE read transaction, begun now (a consistent snapshot)."""
        return SnapshotScan(self, lo, hi, reverse)

    def scan(self, lo: bytes, hi: bytes | None, reverse: bool = False, db=None
             ) -> Iterator[tuple[bytes, bytes]]:
        """Stream (key, value) with lo <= key < hi (hi None: no upper bound), in order."""
        db = db or self.data
        cursor_key: bytes | None = None
        while True:
            chunk = self._scan_chunk(db, lo, hi, reverse, cursor_key)
            yield from chunk
            if len(chunk) < SCAN_CHUNK:
                return
            cursor_key = chunk[-1][0]

    def _scan_chunk(self, db, lo: bytes, hi: bytes | None, reverse: bool,
                    after: bytes | None) -> list[tuple[bytes, bytes]]:
        """Up to SCAN_CHUNK rows past ``after`` (the last key of the previous chunk), in
        one short read transaction."""
        if after is not None:
            if reverse:
                hi = after               # strictly below the last key seen
            else:
                lo = after + b"\x00"     # the smallest key above it
        with self.gate, self.begin(db) as txn:
            rows = SnapshotScan(self, lo, hi, reverse, txn=txn, db=db)
            return list(itertools.islice(rows, SCAN_CHUNK))

    def count(self) -> int:
        with self.gate, self.begin(self.data) as txn:
            return txn.stat(self.data)["entries"]

    # ---- writes ------------------------------------------------------------------------
    def write(self, fn) -> None:
        """Run ``fn(txn)`` in one write transaction, growing the map on MapFullError."""
        if self.readonly:
            raise ReadOnlyError("LMDB state is open read-only")
        with self._write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        fn(txn)
                    return
                except lmdb.MapFullError:
                    self._grow()

    def _grow(self) -> None:
        new_size = self.env.info()["map_size"] * 2
        if not self.gate.exclusive(lambda: self.env.set_mapsize(new_size)):
            raise MapResizeBlocked("LMDB's map is full and cannot grow while scans are open "
                                   "in this process; the commit is kept and applied later")

    def apply(self, entries: list, applied_end: int, next_txid: int | None = None,
              on_entry=None) -> None:
        """Apply committed transactions (CommitEntry) in order and advance ``applied``.

        Data, the txns row, the history rows with before-images (and whatever
        ``on_entry(txn, entry)`` adds, the agent layer's action rows) go into one LMDB
        transaction with ``applied``.
        """
        from .history import apply_commits

        def body(txn) -> None:
            apply_commits(txn, self, entries)
            txn.cursor(db=self.txns).putmulti([(txid_key(e.txid), e.txn_row())
                                               for e in entries])
            if on_entry is not None:
                for e in entries:
                    on_entry(txn, e)
            txn.put(b"applied", _U64.pack(applied_end), db=self.meta)
            if next_txid is not None:
                cur = txn.get(b"next_txid", db=self.meta)
                if cur is None or _U64.unpack(cur)[0] < next_txid:
                    txn.put(b"next_txid", _U64.pack(next_txid), db=self.meta)

        self.write(body)

    def set_meta_int(self, name: bytes, value: int) -> None:
        self.write(lambda txn: txn.put(name, _U64.pack(value), db=self.meta))

    def sync(self) -> None:
        """Force data and meta pages to stable storage (the checkpoint barrier)."""
        self.env.sync(True)

    def close(self) -> None:
        with LmdbState._registry_lock:
            if not self._shared:
                return
            self._shared["refs"] -= 1
            if self._shared["refs"] == 0:
                LmdbState._registry.pop(self.path, None)
                self._shared["env"].close()
            self._shared = {}


class SnapshotScan:
    """An iterator over one LMDB read transaction; releases it when done, closed or dropped.

    While it is open it holds a reader slot and the resize gate, so consume it promptly.
    """

    def __init__(self, state: LmdbState, lo: bytes, hi: bytes | None, reverse: bool,
                 txn=None, db=None) -> None:
        """``txn``: iterate inside an existing read transaction (not owned, not closed);
        ``db``: the named database (default: data)."""
        self._state = state
        self._owned = txn is None
        if self._owned:
            state.gate.__enter__()
            try:
                txn = state.begin(state.data)
            except BaseException:
                state.gate.__exit__()
                raise
        self._txn = txn
        self._cur = txn.cursor(db=db or state.data)
        self._lo, self._hi, self._reverse = lo, hi, reverse
        self._started = False
        self._open = True

    def meta_int(self, name: bytes) -> int:
        """A ``meta`` integer as of this scan's snapshot."""
        raw = self._txn.get(name, db=self._state.meta)
        return 0 if raw is None else _U64.unpack(raw)[0]

    def __iter__(self) -> "SnapshotScan":
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        if not self._open:
            raise StopIteration
        cur = self._cur
        if not self._started:
            self._started = True
            if self._reverse and self._hi is None:
                ok = cur.last()
            elif self._reverse:
                ok = cur.prev() if cur.set_range(self._hi) else cur.last()
            else:
                ok = cur.set_range(self._lo)
        else:
            ok = cur.prev() if self._reverse else cur.next()
        if ok:
            k = cur.key()
            if (k >= self._lo) if self._reverse else (self._hi is None or k < self._hi):
                return k, cur.value()
        self.close()
        raise StopIteration

    def close(self) -> None:
        if self._open:
            self._open = False
            if self._owned:
                try:
                    self._txn.abort()
                finally:
                    self._state.gate.__exit__()

    def __del__(self) -> None:
        self.close()


class ReadSnapshot:
    """A consistent read view held for a read-only store's transaction.

    One LMDB read transaction (with its ``applied`` LSN) plus the commits logged past it
    (``overlay``: key -> (commit LSN, packed value or None)), taken together.
    """

    def __init__(self, state: LmdbState, catch_up) -> None:
        self.state = state
        state.gate.__enter__()
        try:
            self.txn = state.begin(state.data)
        except BaseException:
            state.gate.__exit__()
            raise
        raw = self.txn.get(b"applied", db=state.meta)
        self.applied = 0 if raw is None else _U64.unpack(raw)[0]
        overlay = catch_up()  # read the WAL only after the snapshot: it reaches past applied
        self.overlay = {k: e for k, e in overlay.items() if e[0] >= self.applied}
        self.closed = False

    def get(self, key: bytes) -> bytes | None:
        e = self.overlay.get(key)
        return e[1] if e is not None else self.txn.get(key, db=self.state.data)

    def scan(self, lo: bytes, hi: bytes | None, reverse: bool) -> SnapshotScan:
        return SnapshotScan(self.state, lo, hi, reverse, txn=self.txn)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.txn.abort()
            finally:
                self.state.gate.__exit__()
