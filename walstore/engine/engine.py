"""The Engine: one open store's machinery, below the agent layer.

It owns, for the life of an open store: the directory and its writer lock (Layout,
ProcessLock); the LMDB environment (LmdbState) and its only writer (Applier); the WAL
(WriteAheadLog) behind the Journal; the MemTable of unapplied events; reads (StateReader)
and views (Views); the commit pipeline (CommitPipeline) with its conflict checker and
prepared set; the background threads (the applier, which also checkpoints and prepares
the next WAL segment; the flusher under durability="normal"); the publication mark it
shares with read-only processes (``SharedMark``, ``<store>/VISIBLE``); and recovery at
open.

Lifecycle: ``Engine(...)`` opens (creating, locking, recovering: analysis and REDO in
:mod:`walstore.engine.recovery`, then UNDO here: every loser ends with an ABORT record, as
a rollback would, which turns its actions' rows to ``pending``); ``close()`` applies
everything, checkpoints and marks the shutdown clean; ``drop_like_a_crash()`` lets go as
a killed process would (tests and tools).

Failure model: an error that leaves the log's tail in doubt (an fsync failure) or LMDB
unwritable (the applier failed) puts the engine in ``failure``: every later write is
refused with ReadOnlyError *before* it logs anything; reads go on from LMDB and the
MemTable; reopening recovers.  Errors after a commit's point of no return are contained
(``note_background_error``), never reported as the commit's failure.
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import threading
import time
from typing import Any, Callable

import lmdb

from .. import fileio
from ..errors import (CorruptionError, NeedsRecovery, NotAStore, ReadOnlyError, StoreClosed,
                      StoreIOError, WalstoreError, command_word, type_and_message)
from ..log.format import SEGMENT_HEADER_SIZE, RecordType
from ..log.reader import LogEvent, LogReader
from ..log.records import Event, error_text_of
from ..log.segment import create_segment_fitting, list_segments
from ..log.writer import FIRST_SEGMENT_SIZE, LogFailed, WriteAheadLog
from ..options import Options
from ..signals import Flag, deferred, start_thread
from .apply import Applier
from .conflicts import ConflictChecker, PreparedSet
from .journal import Journal
from .layout import Layout, ProcessLock, writer_alive
from .lmdb_check import check_lmdb_paths
from .lmdb_state import (LmdbState, StateWriteError, from_u64, low_room_note,
                         state_io_error)
from .memtable import MemTable, PlainBatch
from .pins import HistoryPins
from .pipeline import CommitPipeline
from .recovery import LogPosition, Recovery, RecoveryReport, check_owner, owner_of
from .snapshot import StateReader
from .views import Views
from .visible import MarkReader, SharedMark

DURABILITIES = ("full", "normal", "none")
# records that begin new work: they wait for room in the MemTable (Engine.log_event).
# (Not a workspace's or a watch's: they are logged under the file lock, which the
# applier's checkpoint takes for its blob gc — a wait for the applier there could wait
# for ever.)
ROOM_FIRST = frozenset({RecordType.ACTION_INTENT, RecordType.RESTORE_POINT})
DROP_CHUNK = 64  # applied events leave the MemTable this many per hold of the commit lock
APPLY_BATCH_BYTES = 1 << 20  # the applier thread's LMDB commits cover about this much log
APPLY_BATCH_EVENTS = 2000    # ... and at most this many events
APPLY_WAKE_BYTES = 32 << 20  # unapplied log bytes that make the applier work under load
DRAIN_BATCH, DRAIN_BATCH_BYTES = 20_000, 16 << 20  # a drain's or checkpoint's LMDB commits:
# few syncs, yet bounded memory (one LMDB transaction keeps every page it dirties in RAM)
RECOVER_MODES = ("auto", "manual")
TXID_BLOCK = 1 << 16  # transaction ids reserved durably at a time (see Engine.next_txid)
# A read-only engine's transaction ids (see Engine.next_txid): 2**63 + pid * 2**40 + n,
# where no writer's id ever reaches (u64, counted from 1) and no other live process's are
READONLY_TXID_BASE = 1 << 63
READONLY_TXID_PID_SHIFT = 40  # n < 2**40 per process; a pid < 2**22 (Linux's PID_MAX_LIMIT)
REPLICA_PIN = b"replica_pin"  # meta: the replica's position + 1 (0: none; keep_replica_pin)
ERASURE_RETRY_S = 60.0  # a background checkpoint's owed erasure that failed waits this long
# a background checkpoint that failed without stopping the store (a directory it could
# not list or a segment it could not remove: EMFILE, EACCES; the log could not rotate for
# its record) is tried again no sooner than this
CHECKPOINT_RETRY_S = 1.0
ERASURE_ROOM_MARGIN = 64 << 20  # free space beyond the data file's size it needs to try
MAX_MAP_SIZE = 1 << 46  # 64 TiB: more than a 47-bit user address space can map beside the rest


def _copy_of(path: str, copy: str, chunk: int = 1 << 16) -> bool:
    """Is ``copy`` a copy of segment ``path`` as it was before a recovery appended to it?
    The same size, the same bytes up to some point and only zeros past it in ``copy``
    (the records a killed salvage appended after its copy — checkpoints, ABORTs, the
    SEAL — overwrite zeros; any other difference is other evidence)."""
    try:
        if os.path.getsize(path) != os.path.getsize(copy):
            return False
        with open(path, "rb") as a, open(copy, "rb") as b:
            appended = False
            while True:
                x, y = a.read(chunk), b.read(chunk)
                if not y:
                    return not x
                if appended or x != y:
                    if not appended:
                        n = next(i for i in range(len(y)) if i >= len(x) or x[i] != y[i])
                        y = y[n:]
                        appended = True
                    if y.count(0) != len(y):
                        return False
    except OSError:
        return False


class Engine:
    """See the module docstring.  Thread-safe."""

    def __init__(self, path: str, *, durability: str = "full", create: bool = True,
                 readonly: bool = False, recover: str = "auto", map_size: int | None = None,
                 options: Options | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 keep_replica_pin: int | None = None, spare_later: bool = False) -> None:
        """``keep_replica_pin``: the store is opened to replicate (``replicate_to=``): keep
        the WAL from the replica's last recorded position (meta ``replica_pin``) through
        recovery's checkpoint and until the shipper pins for itself, as long as it holds
        back at most this many bytes — a writer killed while replication lagged must not
        trim, at its next open, what the replica still needs.  ``spare_later``: the WAL
        spare's thread waits for ``start_spare()`` (the store's open, once what recovery
        owes the outside world is done)."""
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if recover not in RECOVER_MODES:
            raise ValueError(f"recover must be 'auto' or 'manual', not {recover!r}")
        if map_size is not None and (not isinstance(map_size, int) or isinstance(map_size, bool)
                                     or not 1 << 16 <= map_size <= MAX_MAP_SIZE):
            raise ValueError(f"map_size={map_size!r} is out of range: an integer from 65,536 "
                             f"bytes to 64 TiB (LMDB's map grows by itself when full; the "
                             f"default of 64 GiB of address space suffices)")
        self.layout = Layout(path)
        self.path = self.layout.root
        self.durability = durability
        self.readonly = readonly
        self.options = options or Options()
        self.closed = True
        self._released = False  # the lock and files let go (see close)
        self._opened_by = os.getpid()
        self._forked_from: int | None = None  # in a forked child: the parent's pid
        self._clean_close: bool | None = None  # close() began: was a clean shutdown owed?
        self.failure: BaseException | None = None
        self.failure_room = ""  # a failed LMDB write: its data file and the room then left
        self.background_errors: list[str] = []
        self.last_recovery: RecoveryReport | None = None
        self.checkpoint_hooks: list[Callable[[], dict]] = []
        self.retention_pins: list[Callable[[], int | None]] = []
        # run before the log is made durable by ``sync_all`` (a store's ``sync()``, each
        # checkpoint): what the log's records describe outside it (the workspaces' files
        # under durability="none", never fsynced as they change) made durable first
        self.before_log_sync: list[Callable[[], None]] = []
        self.history_pins = HistoryPins()  # undos in flight (see walstore.engine.pins)
        # where each shipper's replica stands, whatever its lag (the retention pins let go
        # past ``max_pin_bytes``): the blob gc keeps what the local WAL from there names,
        # for the records still on disk are shipped, and their content must go with them
        self.replica_positions: list[Callable[[], int | None]] = []
        self._replica_pin_bound = keep_replica_pin
        self._spare_later = spare_later
        if keep_replica_pin is not None:
            self.retention_pins.append(self._stored_replica_pin)
            self.replica_positions.append(self.stored_replica_position)
        self._proc_lock: ProcessLock | None = None
        self.state: LmdbState | None = None
        self.wal: WriteAheadLog | None = None
        self.follower = None
        self.shared_mark: SharedMark | None = None  # the writer's VISIBLE (see _position_log)
        self._threads: list[threading.Thread] = []
        self._stop = Flag()
        self._wake_lock = threading.RLock()  # (entered as itself: walstore.signals)
        self._wake = threading.Condition(self._wake_lock)
        self._woken = False
        self._room_lock = threading.RLock()
        self._room = threading.Condition(self._room_lock)
        self._apply_lock = threading.Lock()
        self._checkpoint_lock = threading.RLock()
        # held by a purge from before its commit to the end of its erasure, and by every
        # erasure: the applier's checkpoint finishes an owed erasure only when no one else
        # is erasing (it had compacted LMDB a second time, under the purge's feet)
        self.erasure_lock = threading.RLock()
        self.before_erase: Callable[[], None] | None = None  # the store's: ship first
        self._erasure_retry_at = 0.0  # (monotonic) a failed background erasure's next try
        self._checkpoint_retry_at = 0.0  # (monotonic) see CHECKPOINT_RETRY_S
        self._txid_lock = threading.Lock()
        self._txid_horizon = 0
        self.applied_lsn = 0
        try:
            if not self.layout.exists() and (readonly or not create):
                self.layout.read_identity()  # raises NotAStore with the reason
            if not readonly:
                self._lock_and_create()
            self.store_id = self.layout.read_identity()
            self.origin = self.layout.read_origin()
            # (whose keys the log's actions were given: at a copy's first open, its source's)
            self._source_key_namespace = self.layout.key_namespace(self.store_id)
            if self.origin is not None and not readonly:  # a copy's first writable open:
                self.layout.new_key_namespace()             # its own idempotency keys
            self.key_namespace = self.layout.key_namespace(self.store_id)
            # transactions below this txid were made in the store this one was copied
            # from (0: none; a copy's first writable open notes it, see _undo_losers)
            self.inherited_below = self.layout.inherited_below()
            self.state = LmdbState(self.layout.db, map_size, readonly=readonly)
            self.applier = Applier(self.state)
            self.closed = False  # the open sequence below uses the engine (a failure closes)
            if readonly:
                self._open_readonly(recover, progress)
            else:
                self._open_writer(recover, progress)
        except BaseException as e:
            self._release()
            if isinstance(e, OSError) and not isinstance(e, WalstoreError):
                raise self.open_failed(e) from e
            if isinstance(e, StateWriteError):  # (REDO, or the open's own LMDB writes)
                raise self.state_io_error(e, f"opening the store at {self.path}",
                                           "nothing was lost: every commit is in the log; "
                                           "open it again once the cause is gone") from e
            if isinstance(e, LogFailed):
                raise self.open_log_failed(e) from e
            raise
        if not readonly:
            try:
                self._start_threads()
            except BaseException as e:  # (RuntimeError "can't start new thread")
                self.drop_like_a_crash()  # the threads started so far stop, the lock goes
                if isinstance(e, RuntimeError):
                    raise thread_start_error(e, f"opening the store at {self.path}") from e
                raise

    # ---- opening ------------------------------------------------------------------------
    def state_io_error(self, e: StateWriteError, doing: str, after: str) -> StoreIOError:
        """README, "Errors": an LMDB write or sync that fails while opening (REDO),
        checkpointing or closing is a StoreIOError with an errno and the data file's name;
        opening and checkpointing let the engine's internal StateWriteError out (no
        errno, no file: the command line said only "mdb_txn_commit: Input/output
        error").  A full disk reaches LMDB as a short write, which it reports as EIO:
        the file system's free space is named when it is nearly none."""
        return state_io_error(e, doing, after, self.data_file())

    def data_file(self) -> str:
        state = getattr(self, "state", None)
        return getattr(state, "data_file", None) or self.layout.db

    low_room_note = staticmethod(low_room_note)  # (lmdb_state's: its table creation too)

    def open_failed(self, e: OSError) -> WalstoreError:
        """The walstore error for an OS error while opening: NotAStore when the path cannot
        be a store directory (a missing parent, a parent or STORE of the wrong type) while
        its directory and identity were made or read, else StoreIOError (a full disk, a
        read-only file system, EIO, no permission) naming the file.  Returned, not raised
        (the caller raises it ``from e``): a new error each call, for this open only —
        the Engine's own open and the Store's settling after it (walstore/store.py)."""
        if (self.state is None and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
                and not self._is_store_entry(e.filename)):
            where = f" ({e.filename})" if e.filename else ""
            return NotAStore(f"cannot open or create a store at {self.path}: "
                             f"{e.strerror or e}{where}")
        return StoreIOError(e.errno, f"opening the store at {self.path} failed: "
                                     f"{e.strerror or e}", e.filename)

    def open_log_failed(self, e: LogFailed) -> StoreIOError:
        """The error of an open whose own records (the losers' ABORTs, what its settle
        recorded: compensations run, files put back) met a failed fsync of the log: a
        StoreIOError with its errno, as a close's.  It was the log's LogFailed, "the store
        is now read-only ... (reopen the store)", said of an open that returned no store
        (a ReadOnlyError: read as a store opened read-only) — audit 67."""
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
        return StoreIOError(
            (cause.errno if cause is not None else None) or errno.EIO,
            f"opening the store at {self.path} failed: an fsync of its log failed "
            f"({cause.strerror or cause if cause is not None else e}) while recovery "
            f"recorded what it settled; nothing committed was lost: open it "
            f"again once the cause is gone, and what was not recorded is settled again then "
            f"(a compensation with the same idempotency key)",
            cause.filename if cause is not None else None)

    def _is_store_entry(self, filename) -> bool:
        """Is ``filename`` an entry of this store's directory while its ``STORE`` is there
        (a store, damaged: ``LOCK`` made a directory)?  Not NotAStore then (exit 2, "not
        a store", its cause said twice, while `verify` read the store): an I/O error
        naming the entry, exit 1 (probe-audit59)."""
        if not filename or not self.layout.exists():
            return False
        try:
            return (os.path.dirname(os.path.abspath(os.fsdecode(filename)))
                    == os.path.abspath(self.layout.root))
        except (TypeError, ValueError):
            return False

    def _lock_and_create(self) -> None:
        """Take the writer lock, creating the store first if needed (under the lock, so
        two processes opening a new path at once cannot both create it)."""
        if not self.layout.exists():
            self.layout.check_creatable()  # NotAStore before leaving any file behind
            fileio.make_dir(self.layout.root)
        self._proc_lock = ProcessLock(self.layout)
        if not self.layout.exists():
            self.layout.create()

    def needs_recovery(self) -> bool:
        """True when the last writer did not close the store cleanly."""
        return self.state.meta_int(b"open") == 1

    def _open_writer(self, recover: str, progress) -> None:
        if recover == "manual" and self.needs_recovery():
            raise NeedsRecovery(f"store {self.path} was not shut down cleanly; run "
                                f"`walstore recover {command_word(self.path)}` (or open with recover='auto')")
        checked = 0
        if self.needs_recovery():
            # before anything reads LMDB's tables: the free list, the small tables whole,
            # each big tree's first and last paths (REDO checks its keys' paths per batch);
            # the ``owed`` index whole, then the paths of the action rows it names (what
            # the open's settle reads and compensations rewrite) — every action row only
            # when the index is not exact (an older store: the open reads them all once)
            checked = check_lmdb_paths(self.state.data_file, {}, whole=(b"owed",))
            owed = self._owed_ids()
            checked += (check_lmdb_paths(self.state.data_file, {}, whole=(b"actions",))
                        if owed is None else
                        check_lmdb_paths(self.state.data_file, {b"actions": owed}))
        mode = self.options.recovery_mode
        # refuse before changing anything: judge the whole log first, in every mode (a
        # record a newer walstore wrote is refused, NotAStore, wherever it lies: a salvage
        # mode's REDO had changed LMDB before meeting it)
        Recovery(self.path, self.store_id, self.state, mode, None, dry_run=True).run()
        # the log is this walstore's to write from here on: a store of an older format
        # version is marked with this one's before anything is written, so an older
        # walstore refuses it instead of misreading what this one writes; first the rows
        # the open reads are read, so damage in them refuses the open with STORE as it was
        # (a review: a damaged action row refused the open after STORE said version 2)
        if self.layout.needs_upgrade():
            self._check_rows_the_open_reads()
            self.layout.upgrade_identity()
        # after an unclean shutdown REDO first reads and checks, in Python, the LMDB pages
        # each batch will touch (lmdb_check.check_lmdb_paths: the paths to its keys, the
        # small tables whole): REDO writing into a damaged page died of SIGBUS/SIGABRT
        # inside LMDB (a probe: 40 bytes of 0xFF in one page, `walstore recover` killed by
        # signal 7); a CorruptionError names data.mdb instead.  The whole-file walk it
        # replaces cost seconds per million keys (CONTRACT 4.4: recovery's cost is the WAL)
        rec = Recovery(self.path, self.store_id, self.state, mode, progress,
                       check_lmdb=self.needs_recovery(), action_key=self._action_key_of)
        rec.report.lmdb_pages_checked += checked
        rec.report.unclean = self.needs_recovery()
        position = rec.run()
        self.last_recovery = report = rec.report
        if self._owed_ids() is None:  # a store written without the ``owed`` index: built
            self.applier.build_owed_index()  # once (every action row read), then kept
        self._position_log(position)
        self.applied_lsn = self.state.applied_lsn()
        # one row decoded at a time, its values dropped (a dict of every row held every
        # in-doubt transaction's whole write set at once: Prepared.keys_only)
        # (a PREPARE written before walstore noted the scopes it works for: its actions'
        # from their rows, see Views.prepared_holds)
        for p in self.views.prepared_holds():
            self.prepared.add(p)
        report.in_doubt = sorted(self.prepared.by_gid)
        top = max([rec.max_txid, self.state.meta_int(b"next_txid", 1) - 1,
                   self.state.meta_int(b"txid_reserved", 1) - 1]
                  + [p.txid for p in self.prepared.by_gid.values()])
        self._txids = itertools.count(top + 1)
        self._first_txid = top + 1  # (a copy's first open notes it: _undo_losers)
        self._txid_horizon = top + 1 + TXID_BLOCK  # (made durable with the open flag)
        # every transaction REDO left in flight is a loser too: one that logged only file
        # steps (no intent) in the tail is in the ``inflight`` table once REDO applied it
        report.losers = sorted((set(report.losers) | self._inflight_txids())
                               - self.prepared.txids())
        self._undo_losers(report.losers)
        if report.salvaged:
            self._keep_salvaged_log()
        if report.redone or report.problems or report.losers:
            self._checkpoint()
        if report.salvaged:
            self._seal_salvaged_log()
        self.applier.set_meta(b"open", 1, txid_reserved=self._txid_horizon,
                              owner=owner_of(self.store_id))  # (recovery.check_owner)
        self.state.sync()

    def _position_log(self, pos: LogPosition) -> None:
        if pos.create_new:  # (a smaller one on a nearly full disk: recovery goes on)
            create_segment_fitting(self.layout.wal, self.store_id, pos.segment_start,
                                   min(self.options.segment_size, FIRST_SEGMENT_SIZE), 0)
        self.wal = WriteAheadLog(self.layout.wal, self.store_id, pos.segment_start, pos.offset,
                                 self.options.segment_size)
        self.memtable = MemTable(published=self.wal.written_lsn,
                                 limit=self.options.max_unapplied, lock=self.wal.lock,
                                 max_memory=self.options.max_unapplied_bytes)
        # read-only processes publish nothing past this writer's mark (<store>/VISIBLE):
        # reset to the recovered log's end before anything is appended (a crashed writer's
        # mark may lie past a log a power loss cut), then moved by every publication
        self.shared_mark = SharedMark(self.layout.root, self.memtable.published)
        self.memtable.share = self.shared_mark.set
        self.applier.on_purge = self.shared_mark.note_purge
        self.journal = Journal(self.wal, self.memtable, self.durability)
        self.reader = StateReader(self.state, self.memtable)
        applier = self.applier
        self.reader.purge_epoch = lambda: applier.purges_applied
        self.views = Views(self.state, self.memtable)
        self.prepared = PreparedSet()
        self.pipeline = CommitPipeline(self, self.journal,
                                       ConflictChecker(self.state, self.memtable), self.prepared)

    def _check_rows_the_open_reads(self) -> None:
        """Decode every row of the small tables a writable open reads (actions, prepared
        transactions, restore points, workspaces, file steps, the u64 rows of ``inflight``,
        ``aended`` and ``meta``): CorruptionError naming the first damaged one.  Run once,
        before a store of an older format version is marked with this one's."""
        from . import tables
        st, file = self.state, self.state.data_file
        for table in ("actions", "twophase", "points", "workspaces", "fsteps"):
            lo, hi = tables.PACKED_ROWS.get(table, (b"", None))
            if getattr(st, table, None) is None:  # (a table an older store lacks)
                continue
            for k, raw in st.scan(lo, hi, db=table):
                tables.unpack_row(raw, table, k, file)
        for table in ("inflight", "aended"):
            if getattr(st, table, None) is None:
                continue
            for k, raw in st.scan(b"", None, db=table):
                from_u64(k, 0, table, None, st)
                if table in tables.U64_VALUES:
                    from_u64(raw, 0, table, k, st)
        for k, raw in st.scan(b"", None, db="meta"):
            if k not in tables.PACKED_META:
                from_u64(raw, 0, "meta", k, st)

    def _owed_ids(self) -> list[bytes] | None:
        """The keys the ``owed`` table names (action ids), or None when it is not exact
        (``apply.owed_index_current``)."""
        from .apply import owed_index_current
        from . import tables
        st = self.state
        with st.read() as txn:
            if not owed_index_current(txn, st):
                return None
            return [bytes(k) for k in txn.cursor(db=st.owed).iternext(values=False)
                    if k != tables.OWED_STAMP]

    def _inflight_txids(self) -> set[int]:
        st = self.state
        return {from_u64(k, 0, "inflight", None, st) for k, _v in st.scan(b"", None,
                                                                        db="inflight")}

    def _undo_losers(self, losers: list[int]) -> None:
        """UNDO: a loser ends as a rollback ends, with an ABORT record (its actions' rows
        become ``pending``: compensated right after open, or listed).  In a copy of another
        store (backup, restore) they are ``held``: listed, never run automatically; and
        the first txid this open gives (``_first_txid``) is noted in ``STORE`` with the
        origin's clearing (``inherited_below``): a transaction still prepared (in doubt)
        is the source's, and ``rollback_prepared`` holds its debts too (TwoPhase), after
        any reopen or crash."""
        copied = self.origin is not None and not self.origin.get("compensate")
        if losers and not self.readonly:  # (the pages their ABORTs write: their action
            from .tables import action_prefix, txid_key  # rows, found by their prefix)
            self.last_recovery.lmdb_pages_checked += check_lmdb_paths(
                self.state.data_file, {b"txns": [txid_key(t) for t in losers],
                                       b"inflight": [txid_key(t) for t in losers],
                                       b"actions": [action_prefix(t) for t in losers]})
        for txid in losers:
            body = {"tx": txid, "recovered": True}
            if copied:
                body["copied"] = True
            self.journal.append(RecordType.ABORT, body, txid)
        if copied:
            self._hold_copied_debts()
        if losers or copied:
            self.journal.sync_all()
            self.drain()
        if self.origin is not None:
            self.layout.clear_origin(self._first_txid if copied else None,
                                     self._source_key_namespace)
            self.inherited_below = self.layout.inherited_below()

    def inherited(self, txid: int) -> bool:
        """Whether transaction ``txid`` was made in the store this one is a copy of
        (backup, restore) and its debts are held here (``inherited_below``)."""
        return txid < self.inherited_below

    def _hold_copied_debts(self) -> None:
        """A copy never runs compensations owed in its source: every owed action is held."""
        for row in self.views.owed_rows().values():
            if row.get("state") in ("pending", "failed") and not row.get("held"):
                self.journal.append(RecordType.COMPENSATED, dict(
                    id=row["id"], state=row["state"], held=True,
                    error=(error_text_of(row.get("error")) or "") + " (owed in the source "
                          "store when it "
                          "was copied: never run automatically here)"), row.get("tx", -1))

    def _keep_salvaged_log(self, below: int | None = None) -> None:
        """A log skip-corrupt salvaged is evidence (nothing is deleted by recovery): copy
        its segments (those starting below ``below``; None: all) into quarantine/,
        durably, before any checkpoint trims them.  A crash in between leaves both."""
        fileio.make_dir(self.layout.quarantine)
        stamp = getattr(self, "_salvage_stamp", None) or int(time.time())
        self._salvage_stamp = stamp
        for seg_start, path in list_segments(self.layout.wal):
            if below is not None and seg_start >= below:
                continue
            dest = os.path.join(self.layout.quarantine,
                                f"{os.path.basename(path)}.salvaged.{stamp}.bin")
            if os.path.exists(dest) or self._salvaged_before(path):
                continue
            fileio.copy_file_atomic(path, dest)  # (0600; a failure leaves no temp file)
        fileio.fsync_dir(self.layout.quarantine)

    def _salvaged_before(self, path: str) -> bool:
        """Is segment ``path`` already kept in quarantine/, byte for byte, by an earlier
        run of this salvage (a recovery killed, or failed on a full disk, between the
        copy and the seal)?  Each run took a new stamp and copied the whole log again: a
        recovery retried after ENOSPC needed a log's worth more room at every try.  A
        partial copy such a run left (``*.salvaged.*.bin.tmp``: its segment is still
        here, so it is evidence of nothing) is removed (probe-audit59)."""
        base = os.path.basename(path) + ".salvaged."
        found = False
        try:
            names = os.listdir(self.layout.quarantine)
        except OSError:
            return False
        for name in names:
            if not name.startswith(base):
                continue
            other = os.path.join(self.layout.quarantine, name)
            if name.endswith(".bin.tmp"):
                try:
                    os.unlink(other)
                except OSError:
                    pass
            elif (not found and name.endswith(".bin") and os.path.isfile(other)
                  and not os.path.islink(other)
                  and _copy_of(path, other)):
                found = True
        return found

    def _seal_salvaged_log(self) -> None:
        """After skip-corrupt left holes: start a clean log, move the damaged one aside.
        Everything valid in it is in LMDB now (REDO + checkpoint)."""
        start = self.wal.rotate()
        self._keep_salvaged_log(start)  # (before the checkpoint's trim deletes it)
        self._checkpoint()
        for seg_start, path in list_segments(self.layout.wal):
            if seg_start < start:  # (what the checkpoint's trim left: copied already)
                os.unlink(path)
        fileio.fsync_dir(self.layout.wal)
        self.applier.set_meta(b"wal_start", start)
        self.state.sync()

    def _action_key_of(self, txid: int, aid: str) -> str:
        """The idempotency key action ``aid`` of ``txid`` was given (``ws-<namespace>-<id>``,
        walstore.agent.actions), for recovery's rows of actions whose intent record was
        lost (they were listed with key "": the one clue for settling one by hand gone).
        "" when unknown: a transaction a copy inherited from a copy made before the
        source's namespace was kept (``Layout.inherited_key_namespace``)."""
        if self.origin is not None:  # (a copy's first open: every txid is its source's)
            ns = self._source_key_namespace
        elif txid < self.inherited_below:
            ns = self.layout.inherited_key_namespace(txid)
            if ns is None:
                return ""
        else:
            ns = self.key_namespace
        return f"ws-{ns}-{aid}"

    def _open_readonly(self, recover: str = "auto", progress=None) -> None:
        """A read-only open.  A crashed store (no writer alive, not closed cleanly) is
        shown as its committed state, its log judged first as strict recovery would judge
        it; with ``recover="manual"`` it raises NeedsRecovery instead, as a writable open
        does (the operator asked to be told: it opened silently)."""
        from .follower import Follower
        marks = MarkReader(self.layout.root)
        first = marks.read()  # (before asking whether a writer lives: see below)
        if not writer_alive(self.layout):
            if self.needs_recovery() and recover == "manual":
                raise NeedsRecovery(f"store {self.path} was not shut down cleanly; run "
                                    f"`walstore recover {command_word(self.path)}` (or open with "
                                    f"recover='auto': a read-only open then shows its "
                                    f"committed state)")
            if self.needs_recovery():
                # A crashed store: judge its log as strict recovery would, so a damaged log
                # is refused here instead of being shown as a silent prefix.
                # (``progress``: this walk is as long as a recovery's; it was silent)
                Recovery(self.path, self.store_id, self.state, "strict", progress,
                         dry_run=True).run()
            else:
                self._check_log_reaches_applied()
            # The dead writer's mark (walstore.engine.follower, ``Follower._bound``): in
            # this boot it still bounds what is shown (records past it may never have
            # reached the disk: a commit whose fsync failed, one killed before its fsync);
            # torn, its stored mark word is taken; from an earlier boot it bounds nothing —
            # every record the judge accepted is on disk, while the mark, never fsynced,
            # is what the power loss left (older than the acknowledged commits, or torn:
            # they were hidden, probe-disk42).  A writer that opens later makes a new
            # generation, whose marks are followed.
            dead = ((first[0], marks.made_in_an_earlier_boot()) if first is not None
                    else None)
        else:
            dead = None
        # read-only transactions never log their id (nor reserve any): theirs are apart
        # from every writer's (see next_txid)
        self._txids = readonly_txids(os.getpid())
        self._txid_horizon = 1 << 64
        self.memtable = MemTable(published=self.state.applied_lsn(), limit=1 << 62)
        self.reader = StateReader(self.state, self.memtable)
        self.reader.follow = self.follow_state
        self.views = Views(self.state, self.memtable)
        self.prepared = PreparedSet()
        self.follower = Follower(self.layout.wal, self.store_id, self.state, self.memtable,
                                 marks, dead, first)
        self.reader.purge_epoch = marks.purge_epoch
        self._followed_epoch: int | None = None  # the writer's purge count last followed
        self.refresh()

    def _check_log_reaches_applied(self) -> None:
        """A cleanly closed store: CorruptionError when its log begins past LMDB's applied
        LSN (an older ``data.mdb`` put back after checkpoints trimmed the log: a gap the
        writable open and verify refuse, which a read-only open showed as the old state,
        exit 0: probe-disk42).  The one reader's first step: a segment header, or none."""
        check_owner(self.state, self.store_id)
        log = LogReader(self.layout.wal, self.store_id, self.state.applied_lsn(),
                        self.state.meta_int(b"wal_start"))
        first = next(iter(log.walk()), None)
        if isinstance(first, LogEvent) and first.kind == "gap":
            raise CorruptionError(f"gap: {first.reason}", file=first.path, lsn=first.lsn)
        # ... and ends at or past it: LMDB applied past every byte of the log (a damaged
        # ``applied`` row, a truncated last segment) read as the LMDB state, exit 0 — or,
        # for an ``applied`` past 2**63, as a raw OverflowError from the follower's pread
        # (probe-audit60).  One stat: the segment's size bounds where its records end.
        segs = log.segments
        applied = self.state.applied_lsn()
        if segs:
            start, path = segs[-1]
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                # (its size, 0, said "the WAL ends by LSN 0 but LMDB is applied up to 62":
                # the segment was never read)
                kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else (
                    "a directory" if stat.S_ISDIR(st.st_mode) else "no regular file")
                raise CorruptionError(f"the WAL segment {os.path.basename(path)} is not a "
                                      f"regular file: its name leads to {kind} (what the log "
                                      f"held there cannot be read)", file=path, lsn=start)
            bound = None if st is None else start + max(0, st.st_size - SEGMENT_HEADER_SIZE)
            if bound is not None and applied > bound:
                raise CorruptionError(
                    f"the WAL ends by LSN {bound} but LMDB is applied up to {applied}: "
                    f"acknowledged log records are missing (or LMDB's applied LSN is "
                    f"damaged)", file=path, lsn=bound)

    def writer_alive(self) -> bool:
        """Is a writer (this process, or another one) holding the store?"""
        return not self.readonly or writer_alive(self.layout)

    def refresh(self) -> None:
        """Read-only engines: take in what the writer logged since the last read (and the
        writer's compacted LMDB file, after a purge)."""
        if self.follower is not None:
            epoch = self.follower.marks.purge_epoch()  # (before: a purge meanwhile is
            if self.state.replaced():                   # followed next time)
                self.state.reopen()
            self.follower.catch_up()
            self._followed_epoch = epoch

    def follow_state(self) -> None:
        """Read-only engines, before a read at a snapshot taken earlier (a transaction's
        later reads, an ``at`` view's): follow the LMDB file the writer swapped in and
        forget the MemTable events the writer applied since, without reading the log (the
        snapshot does not move; a stat or two and one LMDB read, where ``refresh`` lists
        the WAL).  Those reads then go to LMDB, whose purge records and history answer
        them as in the writer: a purge applied after the snapshot raises SnapshotTooOld in
        a transaction, a view reads the purged keys as absent.  (Only the first read of a
        transaction followed the writer: one begun before a purge kept returning the
        erased value from its MemTable, or from the data file the purge's compaction
        had swapped out.)  Only when the writer's purge count (``<store>/PURGES``) moved
        since it last followed: otherwise what the MemTable holds at the snapshot is
        exact, and this is one load (a writer without the file: every time)."""
        if self.follower is not None:
            epoch = self.follower.marks.purge_epoch()
            if epoch is not None and epoch == self._followed_epoch:
                return
            if self.state.replaced():
                self.state.reopen()
            self.follower.forget_applied()
            self._followed_epoch = epoch

    # ---- threads ------------------------------------------------------------------------
    def _start_threads(self) -> None:
        if not self._spare_later:
            self.wal.start_spare_thread()
        self._spawn(self._applier_loop, "walstore-applier")
        if self.durability == "normal":
            self._spawn(self._flusher_loop, "walstore-flusher")

    def start_spare(self) -> None:
        """Start the WAL spare's thread held back by ``spare_later``.  The store's open
        starts it after the file undos recovery owed: started with the other threads, it
        zero-filled the next segment (up to 16 MiB) from the room a file to put back
        needed, and the undo failed for room (``file-undo-failed``) at every `walstore
        recover`, where with less room free (no spare made) it succeeded (audit 66)."""
        if self._spare_later and not self.readonly and self.wal is not None:
            self._spare_later = False
            try:
                self.wal.start_spare_thread()
            except RuntimeError as e:  # ("can't start new thread": as the others')
                raise thread_start_error(e, f"opening the store at {self.path}") from e

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        start_thread(t)
        self._threads.append(t)

    def wake_applier(self) -> None:
        """After a commit: wake the applier only when the backlog is big enough (events,
        log bytes or estimated memory) or a checkpoint is due; otherwise it waits for
        commits to pause (see ``_applier_loop``)."""
        mt = self.memtable  # (``_backlog_full`` written out: every commit asks)
        if not self._woken and (len(mt.events) >= self.options.apply_batch
                                or mt.log_bytes >= APPLY_WAKE_BYTES
                                or mt.memory >= mt.max_memory >> 1
                                # a checkpoint due wakes it too: it was seen only when the
                                # applier woke on its own, every ``apply_interval`` (up to a
                                # day), so the WAL grew far past ``checkpoint_bytes``
                                or self.wal.bytes_since_checkpoint
                                >= self.options.checkpoint_bytes):
            self._woken = True  # one wake-up per batch, not one per commit
            with self._wake_lock:
                self._wake.notify()

    def _applier_loop(self) -> None:
        """Apply published events; checkpoint; keep a spare segment ready.

        Deferred apply: LMDB is written when commits pause (no commit published for a
        whole ``apply_interval``), or at once when the backlog reaches ``apply_batch``
        events, APPLY_WAKE_BYTES of log or half of ``max_unapplied_bytes`` of
        estimated memory (small writes cost far more memory than log: ~200 B per put for
        ~14 B of log, so 32 MiB of log was ~600 MiB of heap), or when a drain, checkpoint
        or close asks.  An LMDB commit syncs its pages, and that flush delays the WAL
        fsyncs of the commits running beside it: deferring it to a pause keeps it off the
        commit tail of bursts, while the backlog's bounds (``wait_for_room``) bound memory,
        the WAL, the MemTable and REDO after a crash.
        """
        seen = -1  # the published mark at the last look: unchanged means commits paused
        while not self._stop.is_set():
            with self._wake_lock:
                if not self._woken:
                    self._wake.wait(self.options.apply_interval)
            woken, self._woken = self._woken, False
            if self._stop.is_set():
                return
            published = self.memtable.published
            paused, seen = published == seen, published
            if not (woken or paused or self._backlog_full() or self._checkpoint_due()):
                continue  # commits are still coming: wait for a pause
            try:
                while True:  # the checkpoint is due between batches too: under a load that
                    applied = self.apply_published()  # never pauses this loop never ends
                    if (self._checkpoint_due()
                            and time.monotonic() >= self._checkpoint_retry_at):
                        try:
                            self._checkpoint(background=True)
                        except (WalstoreError, OSError) as e:
                            self._checkpoint_failed(e)
                        else:
                            self._finish_owed_erasure()
                    if not applied or self.applied_lsn >= published or self._stop.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - the store turns read-only, reads go on
                self.fail(e)
                return

    def _checkpoint_failed(self, e: BaseException) -> None:
        """The applier's checkpoint failed.  One that stopped the store (an LMDB write or
        sync, an fsync of the log: ``stopped_by``) is raised on, and the applier ends as
        before.  Any other (the WAL directory could not be listed or a segment removed,
        EMFILE or EACCES; its CHECKPOINT record not written because the log could not
        rotate) leaves every commit where it was and the log going on, as the same failure
        of ``checkpoint()`` does: it is recorded in ``stats()``'s ``background_errors`` and
        tried again after CHECKPOINT_RETRY_S.  (It used to stop the store: one moment at
        the process's descriptor limit during a background trim turned an open store
        read-only until reopened, while the foreground checkpoint's same error did not.)"""
        if self.stopped_by is not None or isinstance(e, (StateWriteError, LogFailed)):
            raise e
        self._checkpoint_retry_at = time.monotonic() + CHECKPOINT_RETRY_S
        self.background_errors.append(f"checkpoint: {type_and_message(e)}")
        del self.background_errors[:-10]

    def _finish_owed_erasure(self) -> None:
        """The applier's checkpoint finishes an erasure a purge left owed (CONTRACT: "after
        the next checkpoint their bytes are in no file"), as ``checkpoint()`` and the next
        writable open do: before, only those did, so a store that stayed open after a purge
        raised ErasureOwed kept the erased bytes for as long as it ran.  Not while a purge
        or another caller is erasing (``erasure_lock``), not sooner than ERASURE_RETRY_S
        after a failed try, and only with room on the disk for the rewrite's copy (the
        data file's size and ERASURE_ROOM_MARGIN): a try on a full disk filled it again,
        failing the commits running beside it.  A failure is recorded in ``stats()``'s
        ``background_errors`` and stays owed; one that stopped the store (LMDB's swap or
        sync) stopped it as the foreground's would."""
        if time.monotonic() < self._erasure_retry_at or not self.writable:
            return
        if not self.erasure_lock.acquire(blocking=False):
            return
        try:
            if not self.erase_owed():
                return
            # (a copy a killed process left half-made is no one's: it goes first, so the
            # room it holds counts as room)
            shutil.rmtree(self.state.path + ".compact", ignore_errors=True)
            need = os.path.getsize(self.state.data_file) + ERASURE_ROOM_MARGIN
            room = fileio.free_bytes(self.path)
            if room is not None and room < need:
                raise StoreIOError(errno.ENOSPC, f"a purge's erasure is owed, and rewriting "
                                                 f"LMDB needs {need} bytes free ({room} are)",
                                   self.path)
            self.erase_old_bytes([], after_rotate=self.before_erase)
        except (WalstoreError, OSError) as e:
            self._erasure_retry_at = time.monotonic() + ERASURE_RETRY_S
            self.background_errors.append(f"erasure owed: {type_and_message(e)}")
            del self.background_errors[:-10]
        finally:
            self.erasure_lock.release()

    def _backlog_full(self) -> bool:
        """Enough is unapplied that the applier works even while commits go on."""
        mt = self.memtable
        return (len(mt.events) >= self.options.apply_batch or mt.log_bytes >= APPLY_WAKE_BYTES
                or mt.memory >= mt.max_memory >> 1)

    def _checkpoint_due(self) -> bool:
        return self.wal.bytes_since_checkpoint >= self.options.checkpoint_bytes

    def _flusher_loop(self) -> None:
        """durability="normal": fdatasync what was written, starting a sync every half
        ``sync_interval`` (measured from the previous start, not its end), so a commit
        is on stable storage within ``sync_interval`` of its acknowledgement while one
        fdatasync takes at most half of it; with fdatasyncs of F > interval/2 seconds a
        commit acknowledged just after one started waits for it and the next: up to 2F
        (measured: F = 1 s, interval 0.2 s, 2.0 s; README, "Durability").  A C call
        holding the GIL delays this thread as long.  A sync with nothing written since
        the last one costs nothing (``sync_to`` returns at once)."""
        period = self.options.sync_interval / 2
        next_start = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_start - time.monotonic())):
            next_start = max(next_start + period, time.monotonic())
            try:
                self.wal.sync()
            except BaseException as e:  # noqa: BLE001
                self.fail(e)
                return

    def wait_for_room(self) -> None:
        """Backpressure before a commit logs anything: wait while too much is unapplied
        (``max_unapplied`` events or ``max_unapplied_bytes`` of estimated memory).  Only
        committers wait here, holding no lock the applier needs; a commit past its point
        of no return never does.  (Events alone let a backlog of 1 MiB values, or of
        commits of 300 small puts, grow to gigabytes of memory and of WAL behind an
        applier that fell behind.)"""
        mt = self.memtable
        while len(mt.events) >= mt.limit or mt.memory >= mt.max_memory:  # (``over_limit``)
            self.check_writable()
            self._woken = True
            with self._wake_lock:
                self._wake.notify()
            with self._room_lock:
                self._room.wait(0.05)

    # ---- applying -----------------------------------------------------------------------
    def apply_published(self, limit: int | None = None, max_bytes: int = APPLY_BATCH_BYTES
                        ) -> int:
        """Move published events into LMDB (one batch of at most ``limit`` events, default
        ``apply_batch`` up to APPLY_BATCH_EVENTS, and about ``max_bytes`` of log); returns
        how many."""
        with self._apply_lock:
            batch = self.memtable.published_events(
                limit or min(self.options.apply_batch, APPLY_BATCH_EVENTS), max_bytes)
            if not batch:
                return 0
            end = batch[-1].end
            self.wal.sync_to(end)  # WAL before data: LMDB never gets ahead of the durable log
            try:
                self.applier.apply(batch, end)
            except StateWriteError as e:
                self.fail(e)  # never write (or sync) LMDB again until reopened
                raise
            # ``applied_lsn`` moves before any event leaves the MemTable: a validator
            # (ConflictChecker.check_recent, under the journal lock) that no longer finds a
            # commit there must see that LMDB has it, and re-read LMDB.  In the other order a
            # commit dropped but not yet counted as applied was missed by both, and two
            # transfers reading the same account both committed (a lost update).
            with self.journal.lock:
                self.applied_lsn = end
            plain = self.applier.plain  # (plain commits alone: dropped the cheaper way)
            for i in range(0, len(batch), DROP_CHUNK):  # a little at a time: committers
                chunk = batch[i:i + DROP_CHUNK]        # wait for the lock only briefly
                with self.journal.lock:
                    self.memtable.drop_applied(PlainBatch(chunk) if plain else chunk)
            with self._room_lock:
                self._room.notify_all()
            return len(batch)

    def drain(self) -> None:
        """Apply every published event now (a reader of LMDB's indexes wants them all)."""
        if self.readonly:
            self.refresh()
            return
        self.check_open()
        if self.failure is not None:
            return  # the applier failed: what is unapplied stays in the MemTable
        try:
            self._apply_up_to(self.memtable.published)
        except StateWriteError as e:  # (README "Errors": rewind, revert, history... let the
            # internal error out, "mdb_txn_commit: Input/output error", no errno, no file,
            # on a disk that was only full: tools/fullsweep.py)
            raise self.state_io_error(e, f"applying the log to LMDB in {self.path}",
                                      "the store is now read-only; every commit is in the "
                                      "log: reopen it to recover") from e

    def _apply_up_to(self, lsn: int, background: bool = False) -> None:
        """Apply published events until every one ending at or below ``lsn`` is in LMDB.
        Bounded by ``lsn``: a drain or checkpoint under a load that never pauses must not
        chase the events committed after it began.  A drain someone waits for takes big
        batches (few LMDB syncs); the applier's own checkpoint takes its usual ones: an
        LMDB commit's sync delays the WAL fsyncs of the commits running beside it for as
        long as it lasts (a 16 MiB batch: 300-600 ms here).  60,000 durable 2 KiB commits
        in a row, 5 alternating runs: p99.9 2.2-3.2 ms against 3.0-4.4 ms, the slowest
        commit 10-15 ms against 16-20 ms (PROFILE.md, tenth round)."""
        limit, max_bytes = ((None, APPLY_BATCH_BYTES) if background
                            else (DRAIN_BATCH, DRAIN_BATCH_BYTES))
        while self.applied_lsn < lsn and self.apply_published(limit, max_bytes):
            pass

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoint(self, after_rotate: Callable[[], None] | None = None,
                   finish_erasure: bool = True) -> dict:
        """Apply all, sync LMDB, log a checkpoint, drop WAL segments no longer needed.
        With a purge's erasure owed (``finish_erasure``) it finishes it, ``after_rotate``
        as ``erase_old_bytes`` takes it: the store's replication ships up to the log's end
        first — called without it, the erasure's trim (pins overridden) dropped segments
        the replica had not received, a hole no point-in-time restore crossed."""
        self.check_open()
        if self.readonly:
            raise ReadOnlyError("a read-only store cannot checkpoint")
        self.check_writable()
        try:
            out = self._checkpoint()
            if finish_erasure and self.erase_owed():  # a purge's erasure a crash (or a
                out = self.erase_old_bytes([], after_rotate=after_rotate)  # failure) cut short
        except StateWriteError as e:  # (the store stopped writing: _checkpoint)
            raise self.state_io_error(e, f"the checkpoint of {self.path}", "the store is "
                                       "now read-only; every commit is in the log: reopen "
                                       "it to recover") from e
        return out

    def _checkpoint(self, ignore_pins: bool = False, background: bool = False) -> dict:
        """``background``: the applier's automatic checkpoint (see ``_apply_up_to``)."""
        try:
            return self._checkpoint_steps(ignore_pins, background)
        except StateWriteError as e:
            self.fail(e)  # LMDB could not be written or synced: stop until reopened
            raise
        except OSError as e:  # (no OS error leaves the API raw: the directories' errors)
            if isinstance(e, WalstoreError):
                raise
            raise StoreIOError(e.errno, f"the checkpoint of {self.path} failed: "
                                        f"{e.strerror or e}", e.filename) from e

    def sync_all(self) -> None:
        """Make every record so far durable, and first what they describe outside the
        log (``before_log_sync``): never a durable record of a file change whose bytes a
        power loss can still take."""
        for hook in self.before_log_sync:
            hook()
        self.journal.sync_all()

    def _checkpoint_steps(self, ignore_pins: bool, background: bool) -> dict:
        with self._checkpoint_lock:
            self.sync_all()
            self._apply_up_to(self.memtable.published, background)
            self._applied_up_to_the_end()
            self.state.sync()  # (a failure stops the store: never retried, nothing trimmed)
            # a reader process killed inside a read kept its snapshot's pages from reuse
            # until the next open: the data file grew with every write meanwhile
            self.state.reap_stale_readers()
            applied = self.applied_lsn
            pins = [] if ignore_pins else [p for p in (pin() for pin in self.retention_pins)
                                           if p is not None]
            keep = min([applied] + pins)
            self.journal.append_plain(RecordType.CHECKPOINT, {"applied": applied, "keep": keep,
                                                              "ts": time.time()})
            self.wal.bytes_since_checkpoint = 0
            self.wal.sync()
            removed = self.wal.trim_below(keep)
            out = {"applied_lsn": applied, "keep_lsn": keep, "segments_removed": len(removed),
                   "wal_bytes": self.wal.disk_bytes()}
            for hook in self.checkpoint_hooks:
                out.update(hook())
            return out

    def _applied_up_to_the_end(self) -> None:
        """Every record below the oldest unapplied event's first record (the log's end when
        none is left) is either in LMDB or carries nothing to redo (a SEAL, a CHECKPOINT):
        ``applied`` moves there, so the segments behind it can go.  (It moved only when no
        event at all was unapplied: one commit of another thread in its fsync kept it at
        the last applied event, so a purge's erasure rotated the log and then kept the old
        segment, erased values and all, and recorded the erasure done.)  Under the journal
        lock the MemTable holds every record's event not yet applied, published or not."""
        with self._apply_lock:
            with self.journal.lock:
                events = self.memtable.events
                mark = events[0].start if events else self.wal.written_lsn
                if mark <= self.applied_lsn:
                    return
            self.applier.set_meta(b"applied", mark)
            with self.journal.lock:
                self.applied_lsn = max(self.applied_lsn, mark)

    def erase_old_bytes(self, needles: list[bytes],
                        after_rotate: Callable[[], None] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
        """After a purge: no file of the store may keep the erased bytes.  The WAL moves to
        a new segment and every older one goes (replication pins are overridden: erasure
        wins), LMDB is rewritten without its free pages, and the quarantined copies that
        may hold erased keys (``needles``, the purged ranges; walstore.engine.scrub) are
        removed, named in ``quarantine_removed_names``.  ``after_rotate``: called once the
        old segments are sealed, before they go (a replica ships up to the new segment:
        the old segment's SEAL unshipped was a hole in it).  ``progress``: the LMDB
        rewrite's (``LmdbState.compact``)."""
        self.check_writable()
        with self.erasure_lock, self._checkpoint_lock:
            self.wal.rotate()
            if after_rotate is not None:
                after_rotate()
            out = self._checkpoint(ignore_pins=True)
            owed = self.erase_owed()  # (the ranges of every purge applied so far)
            needles = list(needles) + [bytes(lo) for lo, _hi in owed if lo]
            with self._apply_lock:
                try:
                    before, after = self.state.compact(progress)
                except StateWriteError as e:  # (the swap failed half-way: stop writing)
                    self.fail(e)
                    raise
            gone = self._scrub_quarantine(needles, [(bytes(lo), None if hi is None
                                                     else bytes(hi)) for lo, hi in owed])
            out.update({"lmdb_bytes_before": before, "lmdb_bytes_after": after,
                        "quarantine_removed": len(gone), "quarantine_removed_names": gone})
            if owed:
                try:
                    self.applier.erased(owed)
                    self.state.sync()
                except StateWriteError as e:  # (an LMDB write or sync in doubt: stop, as
                    self.fail(e)              # _checkpoint does; it left the store
                    raise                     # writable, and LMDB synced again after it)
            return out

    # ---- the replica's pin (see ``keep_replica_pin``) ---------------------------------
    def _stored_replica_pin(self) -> int | None:
        raw = self.state.meta_int(REPLICA_PIN, 0) if self.state is not None else 0
        if not raw or self.wal is None:
            return None
        pin = raw - 1
        bound = self._replica_pin_bound or 0
        return pin if self.wal.synced_lsn - pin <= bound else None  # (past the bound: trim)

    def stored_replica_position(self) -> int | None:
        """The replica's position recorded by the last shipper (the store's meta
        ``replica_pin``), unbounded (see ``replica_positions``); None when none is, or
        LMDB is not open.  Read afresh at each call; a reader of the store, never a
        writer (``record_replica_pin`` writes it)."""
        raw = self.state.meta_int(REPLICA_PIN, 0) if self.state is not None else 0
        return raw - 1 if raw else None

    def record_replica_pin(self, lsn: int | None) -> None:
        """The shipper's pin (the replica's position; None: none), kept for the next open
        (written only when it changes).  From now on the shipper's own pin rules: the one
        recorded at open is let go."""
        if self._stored_replica_pin in self.retention_pins:
            self.retention_pins.remove(self._stored_replica_pin)
        if self.stored_replica_position in self.replica_positions:
            self.replica_positions.remove(self.stored_replica_position)
        value = 0 if lsn is None else lsn + 1
        if (self.readonly or self.failure is not None
                or self.state.meta_int(REPLICA_PIN, 0) == value):
            return
        try:
            self.applier.set_meta(REPLICA_PIN, value)
        except StateWriteError as e:  # (LMDB commits fdatasync, sync=True: a failed one
            # stops the store as any LMDB write's does; the shipper swallows the error,
            # and the store went on writing and syncing LMDB after it)
            self.note_background_error(e)
            raise

    def erase_owed(self) -> list:
        """Purge ranges ([lo, hi]) whose old bytes are not erased yet: a purge applied but
        its compacting checkpoint not done (a crash between them).  ``open`` and
        ``checkpoint`` finish them."""
        from .apply import ERASE_OWED
        from .tables import unpack_row
        raw = self.state.get(ERASE_OWED, "meta")
        return unpack_row(raw, "meta", ERASE_OWED, self.state.data_file) if raw else []

    def _scrub_quarantine(self, needles: list[bytes], ranges: list) -> list[str]:
        """Remove the quarantined copies that may hold erased keys (walstore.engine.scrub
        decides); returns their names."""
        from .scrub import scrub_quarantine
        try:
            return scrub_quarantine(self.layout.quarantine, needles, ranges)
        except OSError as e:  # (left raw from checkpoint() and open(): never an OSError
            if isinstance(e, WalstoreError):  # outside the family)
                raise
            raise StoreIOError(e.errno if e.errno is not None else errno.EIO,
                               f"removing the quarantined copies that may hold erased keys "
                               f"failed: {e.strerror or e}; the erasure stays owed: the next "
                               f"checkpoint or writable open tries again", e.filename) from e

    # ---- writing ------------------------------------------------------------------------
    def next_txid(self) -> int:
        """A transaction id never handed out before in this store, across reopens and
        crashes: ids below ``txid_reserved`` (durable in LMDB's meta) may have been, so an
        open starts above it (a clean close writes the next id there, so ids go on where
        they stopped; after a crash they jump by up to TXID_BLOCK).

        A read-only engine's transactions never commit, so their ids are never logged, yet
        each must differ from every id a writer hands out (before or after: the writer goes
        on beside it) and from every other live transaction's: they are
        ``READONLY_TXID_BASE + pid * 2**40 + n`` (n counted from 1 by all the read-only
        engines of the process together), above 2**63, where a writer's ids (counted from
        1) never reach, and apart per live process."""
        n = next(self._txids)
        if n >= self._txid_horizon:
            self._reserve_txids(n)
        return n

    def _reserve_txids(self, n: int) -> None:
        """Every TXID_BLOCK ids: move the durable reservation past ``n`` first."""
        with self._txid_lock:
            # (a stopped store writes LMDB no more: its transactions only read, so their
            # ids are never logged and need no reservation)
            if n >= self._txid_horizon and self.failure is None:
                horizon = n + TXID_BLOCK
                try:
                    self.applier.set_meta(b"txid_reserved", horizon)
                    self.state.sync()
                except StateWriteError as e:  # (an LMDB write or sync in doubt: it left
                    self.fail(e)  # the store writable, and the next transaction() wrote
                    # and synced LMDB again; and the internal error, no errno, no file)
                    raise self.state_io_error(e, "reserving transaction ids",
                                              "the store is now read-only; every commit "
                                              "is in the log: reopen it to recover") from e
                self._txid_horizon = horizon

    def log_event(self, rtype: int, body: dict, txid: int = -1, durable: bool = False,
                  appended: Callable[[Event], None] | None = None) -> Event:
        """Append a non-commit event (an intent, a result, a compensation outcome, a restore
        point, an abort); ``durable``: wait until it is on disk (per the durability) before
        returning, because an external effect follows it.  ``appended(event)`` runs right
        after the append, with signals held off across both (walstore.signals), before the
        wait: whoever must know of the record (a transaction, of its action's intent) does
        so even when an interrupt lands in the wait.

        A record that begins new work (``ROOM_FIRST``: an intent, a restore point) waits
        for room in the MemTable first, as a commit does (a PREPARE too), and
        every record nudges the applier after: only commits did, so a loop of actions
        rolled back (or of prepares) grew the backlog past ``max_unapplied`` and
        ``max_unapplied_bytes`` without bound while ``apply_interval`` had not passed
        (probe-audit56).  Records that undo (an abort, a compensation's outcome, files
        put back) never wait: a rollback must not stand behind the applier."""
        self.check_writable()
        if rtype in ROOM_FIRST:
            self.wait_for_room()
        if appended is None:
            event = self.journal.append(rtype, body, txid)
        else:
            with deferred():
                event = self.journal.append(rtype, body, txid)
                appended(event)
        try:
            self.wake_applier()
        except Exception as e:  # (logged: the caller's record stands)
            self.note_background_error(e)
        if durable:
            self.journal.force_durable(event.end)
        return event

    def clock(self) -> float:
        return time.time()

    # ---- health -------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            if self._forked_from is not None:
                raise StoreClosed(f"store {self.path} was opened by process "
                                  f"{self._forked_from}, which forked this one: open it "
                                  f"again here (a store is used by the process that opened it)")
            raise StoreClosed(f"store {self.path} is closed")

    @property
    def forked_from(self) -> int | None:
        """In a forked child's copy of a store its parent opened (``forked_away``): the
        parent's pid; None otherwise."""
        return self._forked_from

    def check_not_forked(self) -> None:
        """StoreClosed naming the parent when this is a forked child's copy of a store its
        parent opened (``forked_away``); nothing otherwise (the store may be closed)."""
        if self._forked_from is not None:
            self.check_open()

    def forked_away(self) -> None:
        """In a forked child: this engine is the parent's; close it here without any I/O
        (no checkpoint, no lock release: the flock and the files are the parent's)."""
        if not self.closed:
            self._forked_from = self._opened_by
        self.closed = True
        self._released = True
        if self._proc_lock is not None:  # (the parent keeps its flock: see forget_in_child)
            self._proc_lock.forget_in_child()
            self._proc_lock = None

    def check_writable(self) -> None:
        if not (self.closed or self.readonly or self.failure is not None
                or self.wal.failed is not None):
            return  # (every commit comes here twice: the common answer in one test)
        self.check_open()
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open read-only")
        if self.failure is not None:
            raise ReadOnlyError(f"store {self.path} turned read-only after an error "
                                f"({described(self.failure)}{self.failure_room}); reopen "
                                f"it to recover") from self.failure
        if self.wal.failed is not None:
            self.fail(self.wal.failed)
            self.check_writable()

    @property
    def writable(self) -> bool:
        return (not self.closed and not self.readonly and self.failure is None
                and self.wal is not None and self.wal.failed is None)

    @property
    def stopped_by(self) -> BaseException | None:
        """Why this store takes no more writes until it is reopened, or None: a failed
        LMDB write, or a failed fsync of the log.  The log's own failure counts at once:
        one outside a commit (an intent, a compensation's record, the flusher's fsync)
        reached ``failure`` only at the next write's check, and until then
        ``store.readonly`` said False and ``stats()`` no failure of a store that refused
        every write."""
        if self.failure is None and self.wal is not None and self.wal.failed is not None:
            return self.wal.failed
        return self.failure

    def fail(self, error: BaseException) -> None:
        """Stop writing for good (until reopened): the log's tail or LMDB is in doubt."""
        if self.failure is None:
            if isinstance(error, StateWriteError):  # (the room is noted now: the refusals
                # said only "Input/output error" on a full disk, and may come after a
                # cleanup freed it — tools/fullsweep.py)
                data_file = self.data_file()
                self.failure_room = f" on {data_file}{self.low_room_note(data_file)}"
            self.failure = error
        with self._room_lock:
            self._room.notify_all()

    def note_background_error(self, error: BaseException) -> None:
        """An error after a commit's point of no return: never the commit's failure.  An
        LMDB write error stops writing; anything else is recorded for ``stats()``."""
        self.background_errors.append(f"{type_and_message(error)}")
        del self.background_errors[:-10]
        if isinstance(error, (StateWriteError, OSError)):
            self.fail(error)

    # ---- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Apply everything, checkpoint, mark the shutdown clean, release the lock."""
        if self._released:
            return
        if self._clean_close is None:
            self._clean_close = self.writable  # (healthy: the clean shutdown is owed)
        # An interrupt (KeyboardInterrupt) may cut this short anywhere: ``closed`` is set
        # at once, yet until the lock is released a second close() finishes the job (it
        # used to find ``closed`` and return, keeping the store locked in this process).
        self._stop_threads()
        try:
            if self._clean_close:
                self._checkpoint()
                # the next id, so the next open goes on with no gap
                self.applier.set_meta(b"open", 0, txid_reserved=next(self._txids))
                self.state.sync()
                if self.shared_mark is not None:  # everything logged is decided: all shown
                    # (up to what the checkpoint synced: a record another thread appended
                    # since — one that passed its writable check before this close began —
                    # is shown once its own fsync returns, never when it failed; the log's
                    # written end showed it to readers then, audit 71.  Published, not
                    # stored: under the publication lock, never down — a value computed
                    # before such a record's own publication, stored after it, moved the
                    # shared mark back and hid that acknowledged record for good)
                    self.journal.publish(self.wal.synced_lsn)
            elif not self.readonly and self.wal is not None and self.wal.failed is None:
                # stopped by an error not the log's (LMDB, a background error): the log
                # is sound, and the flusher is stopped above.  Without this fsync the
                # commits "normal" acknowledged since its last sync stayed in the page
                # cache for as long as the process went on, past sync_interval
                self.wal.sync()
        except LogFailed as e:
            # (the clean close's checkpoint syncs the log too: its failure raised a bare
            # LogFailed, no errno, where the GUIDE and the branch above say StoreIOError)
            cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
            raise StoreIOError(
                (cause.errno if cause is not None else None) or errno.EIO,
                f"closing {self.path}: the final fsync of the log failed ({e}); "
                f"commits not yet synced may be lost to a power loss (the next "
                f"open recovers what the disk kept)", self.layout.wal) from e
        except StateWriteError as e:
            # docs/GUIDE.md, errors: what fails while closing is a StoreIOError (errno, file);
            # the log was synced first, so the next open REDOes what LMDB missed
            raise self.state_io_error(e, f"closing {self.path}", "every commit is in the "
                                       "log; the next open recovers") from e
        finally:
            self._release(sync_log=True)

    def drop_like_a_crash(self) -> None:
        """Let go as a killed process would: no apply, no checkpoint, no clean flag."""
        self._stop_threads()
        self._release()

    def _stop_threads(self) -> None:
        self.closed = True
        self._stop.set()
        with self._wake_lock:
            self._wake.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def _release(self, sync_log: bool = False) -> None:
        """``sync_log``: close()'s, the log made durable before it closes (a close whose
        checkpoint was cut short, by an LMDB error or an interrupt, never made its last
        sync: a commit in flight then had its fsync fail on the closed descriptor)."""
        # one section no interrupt cuts (walstore.signals): cut in the WAL's close, it left
        # the store locked by this process, and a second close() found nothing to do
        with deferred():
            self.closed = True
            if self.follower is not None:
                self.follower.close()
            if self.wal is not None:
                self.wal.close(sync=sync_log)
            if self.shared_mark is not None:
                self.shared_mark.close()  # (its last mark stays for read-only processes)
            if self.state is not None:
                self.state.close()
            if self._proc_lock is not None:
                self._proc_lock.release()
                self._proc_lock = None
            self._released = True  # (a later close() has nothing left to do)

    # ---- status -------------------------------------------------------------------------
    def count_keys(self) -> int:
        """How many keys the state holds now (as of the published LSN).

        The writer: LMDB's entry count, corrected by the MemTable's unapplied versions,
        with the applier held off meanwhile (so no event moves from one to the other):
        O(keys in the MemTable), not O(keys).  A read-only store, whose LMDB another
        process applies under it, counts by a snapshot scan."""
        self.check_open()
        if self.readonly:
            return sum(1 for _ in self.reader.scan(b"", None, False, purges=False))
        mt, st = self.memtable, self.state
        with self._apply_lock:
            with mt.lock:  # (committers add keys under it)
                at = mt.published
                keys = list(mt.versions)

            def count(txn) -> int:
                n = txn.stat(st.data)["entries"]
                for k in keys:
                    found, v = mt.visible(k, at)
                    if found:
                        n += (v is not None) - (txn.get(k, db=st.data) is not None)
                return n
            return st.run_read(count)

    def stats(self) -> dict[str, Any]:
        self.check_open()
        try:
            segs = list_segments(self.layout.wal)
        except OSError as e:  # (the directory gone or unreadable under the store)
            raise StoreIOError(e.errno, f"cannot list the WAL segments of {self.path}: "
                                        f"{e.strerror or e}", e.filename) from e
        wal_bytes = 0
        for _s, p in segs:
            try:
                wal_bytes += os.path.getsize(p)
            except FileNotFoundError:
                pass
        out = {
            "path": self.path, "store_id": self.store_id.hex(), "durability": self.durability,
            "readonly": self.readonly, "applied_lsn": self.state.applied_lsn(),
            "published_lsn": self.memtable.published,
            "wal_end_lsn": self.wal.written_lsn if self.wal else self.memtable.published,
            "wal_synced_lsn": self.wal.synced_lsn if self.wal else None,
            "wal_segments": len(segs), "wal_bytes": wal_bytes,
            "wal_fsyncs": self.wal.fsyncs if self.wal else 0,
            "wal_rotations": self.wal.rotations if self.wal else 0,
            "wal_inline_preallocations": self.wal.inline_preallocations if self.wal else 0,
            "wal_small_segments": self.wal.small_segments if self.wal else 0,
            "wal_buffered_commits": self.wal.buffered_records if self.wal else 0,
            "wal_voided_commits": self.wal.voided_records if self.wal else 0,
            "unapplied_events": len(self.memtable), "lmdb_map_size": self.state.map_size(),
            "commits_held_by_undo": self.pipeline.gate.waits if self.wal else 0,
            "failure": None if self.stopped_by is None else described(self.stopped_by) + (
                self.failure_room if self.stopped_by is self.failure else ""),
            "background_errors": list(self.background_errors) + (  # (and the spare's)
                [f"WAL spare: {self.wal.spare_error}"]
                if self.wal is not None and self.wal.spare_error else []),
        }
        return out


def described(e: BaseException) -> str:
    """An error that stopped the store, as its messages and ``stats()`` name it: a walstore
    or OS error by its own message (they name the cause), any other with its type too (a
    MemoryError in the applier said "turned read-only after an error ()" and
    ``stats()['failure']`` was '')."""
    if isinstance(e, (WalstoreError, OSError, lmdb.Error)):
        return str(e) or type(e).__name__
    return type_and_message(e)


def thread_start_error(e: RuntimeError, doing: str,
                       after: str = "the store was let go as a crash would be (the next "
                                    "open recovers): open it again once threads can "
                                    "start") -> StoreIOError:
    """The walstore error for a background thread that could not start (``Thread.start``'s
    RuntimeError "can't start new thread": a process or thread limit, RLIMIT_NPROC or a
    cgroup's pids.max, or no memory for its stack).  The open used to let the bare
    RuntimeError out with the spare thread running and the store still locked by this
    process: every later open here raised StoreLocked naming this very process."""
    return StoreIOError(errno.EAGAIN, f"{doing} failed: cannot start a background thread "
                                      f"({e}): the process is at a thread or process limit "
                                      f"(RLIMIT_NPROC, a cgroup's pids.max) or out of "
                                      f"memory; {after}")


def check_not_inside(src: str, dest: str) -> None:
    """Refuse a destination that is the source or inside it (backups, restores)."""
    s = os.path.realpath(src)
    d = os.path.realpath(dest)
    if d == s or d.startswith(s + os.sep):
        raise NotAStore(f"{dest} lies inside the store {src}; choose a destination outside it")


# one count for every read-only engine of the process (two read-only handles of one store
# in one process are two engines: their transactions' ids must differ too)
_READONLY_COUNT = itertools.count(1)


def readonly_txids(pid: int):
    """A read-only engine's transaction ids in process ``pid`` (see Engine.next_txid)."""
    base = READONLY_TXID_BASE + ((pid % (1 << 22)) << READONLY_TXID_PID_SHIFT)
    return map(base.__add__, _READONLY_COUNT)
