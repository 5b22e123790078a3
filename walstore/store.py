"""The Store: opening, reads, the commit pipeline, the LMDB applier and checkpoints.

Write path (``_commit``), with the invariant each step keeps:

1. under ``_lock``: validate the transaction (optimistic concurrency: nothing it read or
   scanned was written by a transaction that committed after it started), append the
   commit record(s) to the WAL, queue the commit as pending.  Appends are in LSN order;
   the WAL record is written before anything else can see the commit.  (Before-images
   are not taken here: the history index in LMDB holds every version, see agent.py.)
2. ``durability="full"``: ``wal.sync_to(end)``; concurrent committers share one fsync
   (group commit).  "normal"/"none": no fsync here ("normal": a flusher thread fsyncs
   every ``sync_interval`` seconds).
3. publish, in LSN order, every commit whose record is durable (or, for normal/none,
   written): its writes enter the *overlay* (committed, not yet in LMDB) and become
   visible to every read.  ``_published_lsn`` is the watermark transactions start from.
4. the applier thread moves published commits into LMDB in batches (one LMDB commit, one
   fdatasync, per batch; the ``applied`` LSN in the same LMDB transaction), after making
   sure the WAL is durable up to the batch (WAL before data), then drops them from the
   overlay.  Reads see overlay first, then LMDB, so every committed write is visible at
   once and stays visible while it moves.
5. checkpoints (every ``checkpoint_bytes`` of WAL, on close, or on demand): apply all,
   force LMDB's meta page to disk, log a CHECKPOINT record, remove segments wholly below
   what LMDB holds and what open transactions need.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from typing import Any, Callable, Iterator

from . import records
from .codec import (Key, check_meta, decode_key, encode_key, encode_prefix, pack, prefix_end,
                    unpack_value)
from .actions import ActionsMixin
from .agent import AgentMixin
from .twophase import PrepareRecovery, TwoPhaseMixin
from .errors import (CompensationFailed, ConflictError, NeedsRecovery, ReadOnlyError,
                     ReplicationError, StoreClosed, WalstoreError)
from .framing import RecordType
from .kv import LmdbState, MapResizeBlocked, ReadSnapshot, txid_key
from .layout import Layout, ProcessLock
from . import history
from .actions import ActionRecovery
from .recovery import LogPosition, Recovery, RecoveryReport
from .records import CommitEntry
from . import fileio
from .segments import create_segment, list_segments
from .txlog import LSN, TxnInfo, info_from_row
from .txn import Transaction
from .wal import DEFAULT_SEGMENT_SIZE, FIRST_SEGMENT_SIZE, WriteAheadLog

DURABILITIES = ("full", "normal", "none")
RECOVER_MODES = ("auto", "manual")
CHUNK_BYTES = 4 * 1024 * 1024  # a commit's writes are split into WAL records of about this


class Options:
    """Tuning knobs beyond the contract's open() arguments; defaults suit most agents."""

    def __init__(self, segment_size: int = DEFAULT_SEGMENT_SIZE, sync_interval: float = 0.2,
                 checkpoint_bytes: int = 64 * 1024 * 1024, apply_batch: int = 2000,
                 apply_interval: float = 0.5, max_unapplied: int = 50_000,
                 recovery_mode: str = "strict", retain_transactions: int | None = None,
                 retain_seconds: float | None = None) -> None:
        if sync_interval <= 0 or apply_interval <= 0:
            raise ValueError("sync_interval and apply_interval must be positive")
        self.segment_size = segment_size
        self.sync_interval = sync_interval
        self.checkpoint_bytes = checkpoint_bytes
        self.apply_batch = apply_batch
        self.apply_interval = apply_interval
        self.max_unapplied = max_unapplied
        self.recovery_mode = recovery_mode
        if retain_transactions is not None and retain_transactions < 1:
            raise ValueError("retain_transactions must be at least 1 (or None: keep all)")
        if retain_seconds is not None and retain_seconds <= 0:
            raise ValueError("retain_seconds must be positive (or None: keep all)")
        self.retain_transactions = retain_transactions
        self.retain_seconds = retain_seconds


class Store(ActionsMixin, AgentMixin, TwoPhaseMixin):
    """An open walstore.  Create with :func:`walstore.open`.

    The core (this module) owns reads, commits and checkpoints; the agent layer's methods
    come from :class:`walstore.actions.ActionsMixin` (intents, compensations) and
    :class:`walstore.agent.AgentMixin` (log, history, revert, rewind, restore points).
    """

    def __init__(self, path: str, *, durability: str = "full", create: bool = True,
                 readonly: bool = False, recover: str = "auto", compensators: dict | None = None,
                 map_size: int | None = None, options: Options | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 replicate_to: str | None = None, replicate_options: Any = None) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if recover not in RECOVER_MODES:
            raise ValueError(f"recover must be 'auto' or 'manual', not {recover!r}")
        self.layout = Layout(path)
        self.path = self.layout.root
        self.durability = durability
        self.readonly = readonly
        self.options = options or Options()
        self.compensators: dict[str, Callable] = dict(compensators or {})
        self._closed = True
        self._lock = threading.RLock()
        self._follower = None  # read-only stores follow the writer's WAL
        self._proc_lock: ProcessLock | None = None
        self.state: LmdbState | None = None
        self.wal: WriteAheadLog | None = None
        self.last_recovery: RecoveryReport | None = None
        if not self.layout.exists() and (readonly or not create):
            self.layout.read_identity()  # raises NotAStore with the reason
        self._init_memory()
        try:
            if not readonly:
                self._create_under_lock()
            self.store_id = self.layout.read_identity()
            if readonly:
                self._open_readonly(map_size)
            else:
                self._open_writer(map_size, recover, progress)
        except BaseException:
            self._abandon()
            raise
        self._closed = False
        if not readonly:
            self._start_threads()
        self._shipper = None  # [replication wiring] begin (lead re-implements on the facade)
        if replicate_to is not None:
            if readonly:
                raise ValueError("replicate_to= needs a writer store, not readonly=True")
            from .replication import start_in_process
            try:
                self._shipper = start_in_process(self, replicate_to, replicate_options)
            except BaseException:
                self.close()
                raise

    def replication(self):
        """The replication status: shipped_lsn, lag_seconds, lag_bytes, last_error."""
        self._check_open()
        if self._shipper is None:
            raise ReplicationError(f"store {self.path} was not opened with replicate_to=")
        return self._shipper.status()

    def sync_replica(self, timeout: float = 30.0) -> int:
        """Wait until every commit so far is shipped; ReplicationError naming the cause."""
        self._check_open()
        if self._shipper is None:
            raise ReplicationError(f"store {self.path} was not opened with replicate_to=")
        self.wal.sync()
        return self._shipper.sync(self.wal.synced_lsn, timeout)

    def _stop_replication(self, release: bool = True) -> None:
        if getattr(self, "_shipper", None) is not None:
            self._shipper.stop(release)
            self._shipper = None  # [replication wiring] end

    # ---- opening and closing -----------------------------------------------------------
    def _init_memory(self) -> None:
        self._overlay: dict[bytes, tuple[int, bytes | None]] = {}
        self._pending: collections.deque[CommitEntry] = collections.deque()
        self._apply_queue: collections.deque[CommitEntry] = collections.deque()
        self._last_write: dict[bytes, int] = {}
        self._recent: collections.deque[tuple[int, tuple]] = collections.deque()
        self._active: dict[int, Transaction] = {}
        self._published_lsn = 0
        self._applied_lsn = 0
        self._apply_cond = threading.Condition(threading.Lock())
        self._apply_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._background_error: BaseException | None = None
        self._applier_woken = False
        self._txids = itertools.count(1)
        self._init_twophase()

    def _create_under_lock(self) -> None:
        """Take the writer lock, creating the store first if needed (under the lock, so
        two processes opening a new path at once cannot both create it)."""
        if not self.layout.exists():
            self.layout.check_creatable()  # NotAStore before leaving any file behind
            fileio.make_dir(self.layout.root)
        self._proc_lock = ProcessLock(self.layout)
        if not self.layout.exists():
            self.layout.create()

    def _open_writer(self, map_size, recover, progress) -> None:
        self.state = LmdbState(self.layout.db, map_size)
        if recover == "manual" and self.needs_recovery():
            raise NeedsRecovery(f"store {self.path} was not shut down cleanly; run "
                                f"`walstore recover {self.path}` (or open with recover='auto')")
        self.recover(self.options.recovery_mode, progress)
        self.state.set_meta_int(b"open", 1)
        self.state.sync()

    def needs_recovery(self) -> bool:
        """True when the last writer did not close the store cleanly."""
        return self.state.get_meta_int(b"open") == 1

    def recover(self, mode: str = "strict", progress=None, handlers: dict | None = None
                ) -> RecoveryReport:
        """Run recovery (analysis, REDO, UNDO) and position the WAL; see walstore.recovery."""
        if mode == "strict":  # refuse before changing anything: judge the whole log first
            Recovery(self.layout.root, self.store_id, self.state, mode, None,
                     dry_run=True).run()
        undo, twophase = ActionRecovery(), PrepareRecovery()
        rec = Recovery(self.layout.root, self.store_id, self.state, mode, progress,
                       _chain_handlers(undo.handlers(), twophase.handlers(), handlers or {}))
        rec.on_apply = self._index_entry
        position = rec.run()
        self.last_recovery = rec.report
        self._position_wal(position, rec.report.end_lsn)
        applied = self.state.applied_lsn()
        self._published_lsn = self._applied_lsn = applied
        self._txids = itertools.count(max(self.state.get_meta_int(b"next_txid", 1),
                                          rec.analysis.max_txid + 1))
        rec.report.in_doubt = self._load_prepared(twophase)
        top = max([rec.analysis.max_txid] + [p.txid for p in self._prepared.values()])
        self._txids = itertools.count(max(self.state.get_meta_int(b"next_txid", 1), top + 1))
        in_doubt_txids = {p.txid for p in self._prepared.values()}
        rec.report.losers = [t for t in rec.report.losers if t not in in_doubt_txids]
        self._undo_losers(undo, rec.report)
        if rec.report.redone or rec.report.problems or rec.report.losers:
            self._checkpoint_locked()
        if rec.report.salvaged:
            self._seal_salvaged_log()
        return rec.report

    def _seal_salvaged_log(self) -> None:
        """After skip-corrupt left holes: start a clean log, move the damaged one aside.

        Everything valid in it is in LMDB now (REDO + checkpoint), so the log can begin
        afresh at a new segment; the old segments go to quarantine/, not away.
        """
        import shutil
        start = self.wal.rotate()
        self._checkpoint_locked()
        fileio.make_dir(self.layout.quarantine)
        for seg_start, path in list_segments(self.layout.wal):
            if seg_start < start:
                dest = os.path.join(self.layout.quarantine,
                                    f"{os.path.basename(path)}.salvaged.{int(time.time())}.bin")
                shutil.move(path, dest)
        fileio.fsync_dir(self.layout.quarantine)
        fileio.fsync_dir(self.layout.wal)
        self.state.set_meta_int(b"wal_start", start)
        self.state.sync()

    def _undo_losers(self, undo: "ActionRecovery", report: RecoveryReport) -> None:
        """UNDO: losers' writes were never applied; settle their actions, log their ABORT."""
        rows = undo.rows_to_write(report.losers)
        if rows:
            self._put_action_rows(rows)
        for name, point in undo.points.items():
            if point is None:
                history.drop_point(self.state, name)
            else:
                history.put_point(self.state, name, point["lsn"], point["ts"])
        if report.losers:
            with self._lock:
                for txid in report.losers:
                    self.wal.append(RecordType.ABORT, pack({"tx": txid, "recovered": True}))
            self.wal.sync()
        owed = [a for a in self._load_actions(pending=True)
                if a.state == "pending" and a.compensate in self.compensators]
        failed = self._compensate(owed, raise_on_failure=False)
        report.compensated = [a.id for a in owed if a not in failed]
        report.pending_compensations = [a.id for a in self._load_actions(pending=True)]

    def _position_wal(self, pos: LogPosition, end_lsn: int) -> None:
        if pos.create_new:
            create_segment(self.layout.wal, self.store_id, pos.segment_start,
                           min(self.options.segment_size, FIRST_SEGMENT_SIZE))
        self.wal = WriteAheadLog(self.layout.wal, self.store_id, pos.segment_start, pos.offset,
                                 self.options.segment_size)
        if self.durability == "full":
            self.wal.after_sync = self._publish_synced

    def _open_readonly(self, map_size) -> None:
        from .readonly import WalFollower
        self.state = LmdbState(self.layout.db, map_size, readonly=True)
        self._follower = WalFollower(self.layout, self.store_id, self.state)
        self._overlay = self._follower.overlay
        self._published_lsn = self._follower.published

    def refresh(self) -> None:
        """Read-only stores: pick up commits the writer logged since the last read."""
        if self._follower is not None:
            self._follower.catch_up()
            self._published_lsn = self._follower.published

    def _start_threads(self) -> None:
        self._spawn(self._applier_loop, "walstore-applier")
        if self.durability == "normal":
            self._spawn(self._flusher_loop, "walstore-flusher")

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Apply everything, checkpoint, mark the shutdown clean, release the lock."""
        if self._closed:
            return
        self._stop_replication()  # [replication wiring]
        self._stop_threads()
        try:
            if not self.readonly and self.wal.failed is None and self._background_error is None:
                self._checkpoint_locked()
                self.state.set_meta_int(b"open", 0)
                self.state.sync()
        finally:
            self._abandon()

    def _drop_like_a_crash(self) -> None:
        """Let go of the store as a killed process would: no final apply, no checkpoint,
        no clean-shutdown flag (what is written stays written).  For tests and tools."""
        self._stop_replication(release=False)  # [replication wiring]
        self._stop_threads()
        self._abandon()

    def _stop_threads(self) -> None:
        self._closed = True
        self._stop.set()
        with self._apply_cond:
            self._apply_cond.notify_all()
        for t in self._threads:
            t.join()

    def _abandon(self) -> None:
        """Release files without any further write (also used after a failed open)."""
        if self._follower is not None:
            self._follower.close()
        if self.wal is not None:
            self.wal.close()
        if self.state is not None:
            self.state.close()
        if self._proc_lock is not None:
            self._proc_lock.release()
            self._proc_lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a store dropped without close() still lets go of its lock
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed")

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open read-only")
        if self.wal.failed is not None:
            raise ReadOnlyError(f"store {self.path} turned read-only after an fsync error "
                                f"({self.wal.failed}); reopen it to recover")

    # ---- reads outside a transaction ---------------------------------------------------
    def _read_committed(self, k: bytes) -> bytes | None:
        if self._follower is not None:
            snap = self._reader_snapshot()
            try:
                return snap.get(k)
            finally:
                snap.close()
        e = self._overlay.get(k)
        if e is not None:
            return e[1]
        return self.state.get(k)

    def _reader_snapshot(self) -> ReadSnapshot:
        """Read-only stores: LMDB snapshot + the WAL commits past its applied LSN."""
        def catch_up():
            self.refresh()
            return dict(self._overlay)
        return ReadSnapshot(self.state, catch_up)

    def _tx_read(self, tx: Transaction, k: bytes) -> bytes | None:
        if tx.snapshot is not None:
            return tx.snapshot.get(k)
        return self._read_committed(k)

    def get(self, key: Key, default: Any = None) -> Any:
        """The latest committed value of ``key`` (``default`` when absent)."""
        self._check_open()
        v = self._read_committed(encode_key(key))
        return default if v is None else unpack_value(v)

    def __getitem__(self, key: Key) -> Any:
        self._check_open()
        v = self._read_committed(encode_key(key))
        if v is None:
            raise KeyError(key)
        return unpack_value(v)

    def __contains__(self, key: Key) -> bool:
        self._check_open()
        return self._read_committed(encode_key(key)) is not None

    def scan(self, prefix: Key | None = None, start: Key | None = None, end: Key | None = None,
             reverse: bool = False) -> Iterator[tuple[Key, Any]]:
        """(key, value) of committed state in key order; ``start`` inclusive, ``end`` not."""
        self._check_open()
        lo, hi = self._scan_bounds(prefix, start, end)
        for k, v in self._merged_scan(lo, hi, reverse, []):
            yield decode_key(k), unpack_value(v)

    def keys(self, prefix: Key | None = None) -> Iterator[Key]:
        for k, _v in self.scan(prefix=prefix):
            yield k

    @staticmethod
    def _scan_bounds(prefix, start, end) -> tuple[bytes, bytes | None]:
        lo, hi = b"", None
        if prefix is not None:
            lo = encode_prefix(prefix)
            hi = prefix_end(lo)
        if start is not None:
            lo = max(lo, encode_prefix(start))
        if end is not None:
            e = encode_prefix(end)
            hi = e if hi is None else min(hi, e)
        return lo, hi

    def _merged_scan(self, lo: bytes, hi: bytes | None, reverse: bool,
                     mine: list[tuple[bytes, bytes | None]], snapshot: ReadSnapshot | None = None
                     ) -> Iterator[tuple[bytes, bytes]]:
        """Committed LMDB rows overlaid by the overlay, then by ``mine`` (sorted).

        The overlay copy and the LMDB read transaction are taken together under the store
        lock, so the scan sees one consistent committed state: never part of a commit.
        """
        own_snap = None
        if snapshot is None and self._follower is not None:
            snapshot = own_snap = self._reader_snapshot()
        if snapshot is not None:
            over = sorted((k, e[1]) for k, e in snapshot.overlay.items()
                          if k >= lo and (hi is None or k < hi))
            base = snapshot.scan(lo, hi, reverse)
        else:
            with self._lock:
                over = sorted((k, e[1]) for k, e in self._overlay.items()
                              if k >= lo and (hi is None or k < hi))
                base = self.state.snapshot_scan(lo, hi, reverse)
        try:
            stream = _merge(self._while_open(base), over, reverse)
            if mine:
                stream = _merge(stream, mine, reverse)
            for k, v in stream:
                if v is not None:
                    yield k, v
        finally:
            base.close()
            if own_snap is not None:
                own_snap.close()

    def _while_open(self, rows: Iterator) -> Iterator:
        """Yield from ``rows`` but raise StoreClosed once the store is closed."""
        while True:
            if self._closed:
                raise StoreClosed(f"store {self.path} was closed during a scan")
            try:
                item = next(rows)
            except StopIteration:
                return
            yield item

    # ---- transactions ------------------------------------------------------------------
    def transaction(self, meta: Any = None) -> Transaction:
        """Begin a transaction (use ``with``: commit on exit, rollback on exception)."""
        self._check_open()
        check_meta(meta)
        tx = Transaction(self, next(self._txids), meta, self._published_lsn)
        if self._follower is not None:  # read-only store: the transaction reads one snapshot
            tx.snapshot = self._reader_snapshot()
        self._active[tx.id] = tx
        return tx

    def run(self, fn: Callable[[Transaction], Any], retries: int = 5, meta: Any = None,
            backoff: float = 0.005) -> Any:
        """Call ``fn(tx)`` in a transaction and commit; retry on ConflictError."""
        attempt = 0
        while True:
            tx = self.transaction(meta=meta)
            try:
                with tx:
                    result = fn(tx)
                return result
            except ConflictError:
                attempt += 1
                if attempt > retries:
                    raise
                time.sleep(backoff * (2 ** (attempt - 1)) * (0.5 + _jitter()))

    def _end_transaction(self, tx: Transaction, committed: bool, run_compensations: bool) -> None:
        self._active.pop(tx.id, None)
        if tx.snapshot is not None:
            tx.snapshot.close()
        failure = None
        if not committed and run_compensations and tx.actions:
            try:
                self._compensate(list(tx.actions))  # newest first; see walstore.actions
            except CompensationFailed as e:
                failure = e
        if not committed and tx.first_logged_lsn is not None and not self._closed:
            self._log_abort(tx)
        if failure is not None:
            raise failure

    def _log_abort(self, tx: Transaction) -> None:
        try:
            with self._lock:
                self.wal.append(RecordType.ABORT, pack({"tx": tx.id}))
        except WalstoreError:
            pass  # recovery treats a transaction with no end record as a loser: same outcome

    # ---- the commit pipeline -----------------------------------------------------------
    def _commit(self, tx: Transaction) -> int | None:
        if not tx.writes and not tx.actions and not tx.commit_extra:
            with self._lock:
                self._validate(tx)
            return None
        self._check_writable()
        with self._lock:
            self._check_open()
            self._validate(tx)
            entry = self._append_commit(tx)
            self._note_commit(entry)
            if self.durability != "full":
                self._publish(self.wal.written_lsn)
        if self.durability == "full":
            self.wal.sync_to(entry.end_lsn)  # the fsync leader publishes the whole batch
            if self._published_lsn < entry.end_lsn:
                self._publish_synced(self.wal.synced_lsn)
        if len(self._apply_queue) >= self.options.apply_batch:
            self._wake_applier(wait=len(self._apply_queue) >= self.options.max_unapplied)
        self._raise_background_error()
        return entry.lsn

    def _validate(self, tx: Transaction) -> None:
        if not tx.read_keys and not tx.read_ranges and not self._prepared:
            return  # blind writes: nothing read can be stale
        start = tx.start_lsn
        last = self._last_write
        stale = [k for k in tx.read_keys if last.get(k, -1) >= start]
        held = self._held_conflicts(tx)
        if held:
            names = [decode_key(k) for k, _g in held[:5]]
            gids = sorted({g for _k, g in held})
            raise ConflictError(f"transaction {tx.id} touches {names}, held by prepared "
                                f"(in-doubt) transaction(s) {gids}", names)
        if tx.read_ranges and not stale:
            for lsn, keys in reversed(self._recent):
                if lsn < start:
                    break
                for k in keys:
                    if any(k >= lo and (hi is None or k < hi) for lo, hi in tx.read_ranges):
                        stale.append(k)
                        break
        if stale:
            names = [decode_key(k) for k in stale[:5]]
            raise ConflictError(f"transaction {tx.id} read {names} which another transaction "
                                f"changed after it started; nothing was written", names)

    def _append_commit(self, tx: Transaction) -> CommitEntry:
        writes = [(k, v, None) for k, v in tx.writes.items()]
        extra = self._commit_extra(tx)
        chunks = _chunk_writes(writes)
        for chunk in chunks[:-1]:
            lsn, _ = self.wal.append(RecordType.WRITES, records.writes_payload(tx.id, chunk))
            tx.first_logged_lsn = tx.first_logged_lsn or lsn
        ts = time.time()  # one timestamp: the record's and the log row's
        lsn, end = self.wal.append(RecordType.COMMIT,
                                   records.commit_payload(tx.id, chunks[-1], tx.meta, extra, ts))
        return CommitEntry(tx.id, lsn, end, ts, tx.meta, writes, extra)

    def _unapplied_commits(self, published_only: bool = True) -> list[CommitEntry]:
        """Commits not yet in LMDB (their log rows, actions, ... are not there yet)."""
        with self._lock:
            pending = [e for e in self._pending
                       if not published_only or e.end_lsn <= self._published_lsn]
            return list(self._apply_queue) + pending

    def _note_commit(self, entry: CommitEntry) -> None:
        keys = tuple(k for k, _v, _b in entry.writes)
        last = self._last_write
        for k, _v, _b in entry.writes:
            last[k] = entry.lsn
        self._recent.append((entry.lsn, keys))
        self._pending.append(entry)
        self._prune_conflict_window()

    def _prune_conflict_window(self) -> None:
        if len(self._recent) < 1024 and len(self._last_write) < 65536:
            return
        horizon = min((t.start_lsn for t in list(self._active.values())),
                      default=self._published_lsn)
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        if len(self._last_write) >= 65536:
            self._last_write = {k: l for k, l in self._last_write.items() if l >= horizon}

    def _publish_synced(self, upto: int) -> None:
        with self._lock:
            self._publish(upto)

    def _publish(self, upto: int) -> None:
        """Make every pending commit ending at or below ``upto`` visible, in LSN order."""
        while self._pending and self._pending[0].end_lsn <= upto:
            e = self._pending.popleft()
            overlay = self._overlay
            for k, v, _b in e.writes:
                overlay[k] = (e.lsn, v)
            self._published_lsn = e.end_lsn
            self._apply_queue.append(e)

    # ---- applier, flusher, checkpoints -------------------------------------------------
    def _wake_applier(self, wait: bool = False) -> None:
        if wait:
            try:
                self._apply_pending()
            except MapResizeBlocked:
                pass  # the applier thread retries; the overlay keeps serving reads
        elif not self._applier_woken:  # one wake-up per batch, not one per commit
            self._applier_woken = True
            with self._apply_cond:
                self._apply_cond.notify()

    def _applier_loop(self) -> None:
        while not self._stop.is_set():
            with self._apply_cond:
                self._apply_cond.wait(self.options.apply_interval)
            self._applier_woken = False
            try:
                self._apply_pending()
                if self.wal.bytes_since_checkpoint >= self.options.checkpoint_bytes:
                    self.checkpoint()
            except MapResizeBlocked:
                continue  # open scans hold the map; try again on the next round
            except BaseException as e:  # surfaced to the next committer and to close()
                self._background_error = e
                return

    def _flusher_loop(self) -> None:
        while not self._stop.wait(self.options.sync_interval):
            try:
                self.wal.sync()
            except BaseException as e:
                self._background_error = e
                return

    def _raise_background_error(self) -> None:
        if self._background_error is not None:
            raise ReadOnlyError(f"the store's background writer failed: "
                                f"{self._background_error}") from self._background_error

    def _apply_pending(self) -> int:
        """Move published commits from the overlay into LMDB; returns how many."""
        with self._apply_lock:
            with self._lock:
                batch = list(self._apply_queue)
            if not batch:
                return 0
            end = batch[-1].end_lsn
            self.wal.sync_to(end)  # WAL before data: LMDB never gets ahead of the durable log
            self.state.apply(batch, end, next_txid=max(e.txid for e in batch) + 1,
                             on_entry=self._index_entry)
            with self._lock:
                for e in batch:
                    self._apply_queue.popleft()
                    for k, _v, _b in e.writes:
                        o = self._overlay.get(k)
                        if o is not None and o[0] == e.lsn:
                            del self._overlay[k]
                self._applied_lsn = end
            return len(batch)

    def checkpoint(self) -> dict:
        """Apply all, sync LMDB, log a checkpoint, drop WAL segments no longer needed."""
        self._check_open()
        if self.readonly:
            raise ReadOnlyError("a read-only store cannot checkpoint")
        self._check_writable()
        return self._checkpoint_locked()

    def _checkpoint_locked(self) -> dict:
        with self._checkpoint_lock:
            self._apply_pending()
            self.state.sync()
            applied = self.state.applied_lsn()
            keep = min([applied] + [t.first_logged_lsn for t in list(self._active.values())
                                    if t.first_logged_lsn is not None])
            with self._lock:
                self.wal.append(RecordType.CHECKPOINT,
                                pack({"applied": applied, "keep": keep, "ts": time.time()}))
                self.wal.bytes_since_checkpoint = 0
            self.wal.sync()
            removed = self.wal.trim_below(keep)
            trimmed = self._trim_history()
            return {"applied_lsn": applied, "keep_lsn": keep, "segments_removed": len(removed),
                    "wal_bytes": self.wal.disk_bytes(), "history_trimmed": trimmed}

    def sync(self) -> None:
        """Make every commit so far durable (useful with durability='normal' or 'none')."""
        self._check_open()
        self.wal.sync()

    # ---- introspection -----------------------------------------------------------------
    def log(self, limit: int | None = None, since: Any = None) -> list[TxnInfo]:
        """Committed transactions, newest first in commit order.

        ``since``: a txid, an LSN (``walstore.LSN``) or a restore point name: only the
        transactions committed after it.  Reads the LSN index backwards: the cost grows
        with what is returned, not with the length of the history.
        """
        self._check_open()
        boundary, min_txid = -1, None
        if isinstance(since, int) and not isinstance(since, (bool, LSN)):
            try:
                boundary = self.txn_info(since).lsn
            except KeyError:
                min_txid = since  # a txid that never committed: the txids after it
        elif since is not None:
            boundary = self._resolve_point(since)
        queued = self._unapplied_commits()
        out: list[TxnInfo] = []
        seen: set[int] = set()
        for e in sorted(queued, key=lambda e: e.lsn, reverse=True):
            if e.lsn > boundary and e.txid not in seen and (min_txid is None or e.txid > min_txid):
                seen.add(e.txid)
                out.append(info_from_row(e.txn_row()))
        for lsn, txid in history.txids_after(self.state, boundary):
            if limit is not None and len(out) >= limit:
                break
            if min_txid is not None and txid <= min_txid:
                continue
            raw = self.state.get(txid_key(txid), self.state.txns)
            if raw is not None and txid not in seen:
                seen.add(txid)
                out.append(info_from_row(raw))
        out.sort(key=lambda i: i.lsn, reverse=True)
        return out[:limit] if limit is not None else out

    def stats(self) -> dict:
        self._check_open()
        info = self.state.env.info()
        st = self.state.env.stat()
        return {
            "path": self.path,
            "store_id": self.store_id.hex(),
            "durability": self.durability,
            "readonly": self.readonly,
            "keys": self._count_keys(),
            "applied_lsn": self.state.applied_lsn(),
            "published_lsn": self._published_lsn,
            "wal_end_lsn": self.wal.written_lsn if self.wal else self._published_lsn,
            "wal_synced_lsn": self.wal.synced_lsn if self.wal else None,
            "wal_segments": len(list_segments(self.layout.wal)),
            "wal_bytes": sum(os.path.getsize(p) for _s, p in list_segments(self.layout.wal)
                             if os.path.exists(p)),
            "wal_fsyncs": self.wal.fsyncs if self.wal else 0,
            "overlay_keys": len(self._overlay),
            "lmdb_map_size": info["map_size"],
            "lmdb_pages": st["leaf_pages"] + st["branch_pages"] + st["overflow_pages"],
            "active_transactions": len(self._active),
        }

    def _count_keys(self) -> int:
        n = self.state.count()
        for k, (_lsn, v) in list(self._overlay.items()):
            in_lmdb = self.state.get(k) is not None
            n += (v is not None) - in_lmdb
        return n

    def __repr__(self) -> str:
        return f"<walstore.Store {self.path!r}{' closed' if self._closed else ''}>"


def _chain_handlers(*maps: dict) -> dict:
    """Merge record handlers; several for one record type all run, in order."""
    merged: dict = {}
    for m in maps:
        for rtype, fn in m.items():
            merged.setdefault(rtype, []).append(fn)

    def runner(fns):
        def run(rec, body):
            for fn in fns:
                fn(rec, body)
        return run
    return {rtype: runner(fns) for rtype, fns in merged.items()}


def _merge(base: Iterator, updates: list, reverse: bool) -> Iterator:
    """Merge two key-sorted streams of (key, value); ``updates`` win on equal keys."""
    if reverse:
        updates = updates[::-1]
    ui = 0
    n = len(updates)
    for k, v in base:
        while ui < n and (updates[ui][0] > k if reverse else updates[ui][0] < k):
            yield updates[ui]
            ui += 1
        if ui < n and updates[ui][0] == k:
            yield updates[ui]
            ui += 1
        else:
            yield k, v
    while ui < n:
        yield updates[ui]
        ui += 1


def _chunk_writes(writes: list) -> list[list]:
    """Split a write set into chunks of about CHUNK_BYTES (the last becomes the COMMIT).

    A chunk stays far below MAX_PAYLOAD: a single value is at most 16 MiB
    (codec.MAX_VALUE_BYTES) and a chunk closes once it passes CHUNK_BYTES.
    """
    total = sum(len(k) + (len(v) if v is not None else 0) + 16 for k, v, _b in writes)
    if total <= CHUNK_BYTES:
        return [[[k, v] for k, v, _b in writes]]
    chunks, cur, size = [], [], 0
    for k, v, _b in writes:
        n = len(k) + (len(v) if v is not None else 0) + 16
        if cur and size + n > CHUNK_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append([k, v])
        size += n
    chunks.append(cur)
    return chunks


def _jitter() -> float:
    return int.from_bytes(os.urandom(2), "little") / 65535
