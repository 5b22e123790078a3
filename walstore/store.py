"""The Store: the facade users hold.  Lifecycle, and every public method as a delegation.

Behind it: the Engine (walstore.engine: log, LMDB, commit pipeline, recovery) and the
agent layer (walstore.agent: actions and compensations, reversible files, history, undo,
retention, 2PC).  The Store owns no state of its own beyond wiring them together at open:
after the engine has recovered, the agent layer runs the compensations and file undo
recovery found owed (and lists the rest, and file conflicts, in ``last_recovery``).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import os
import sys
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .codec import DECODE_ERRORS, MAX_KEY_BYTES, Key, decode_key, encode_key, unpack_common, unpack_value
from .errors import (ConflictError, CorruptionError, ReplicationError, StoreClosed,
                     StoreIOError, WalstoreError, os_errors_as_store_errors)
from .options import Options, check_flag
from .engine.engine import Engine
from .engine.lmdb_state import StateWriteError
from .log.writer import LogFailed
from .engine.tables import row_damaged
from .engine.transaction import ACTIVE, Transaction, scan_bounds
from .agent.actions import Action, Saga, check_compensators, never_runs
from .agent.files import Files, FilesRecoveryReport
from .files import Workspace
from .agent.history import HistoricalView, History, Version
from .agent.hooks import AgentHooks
from .agent.purge import Purge
from .agent.retention import Retention
from .agent.scope import NO_SCOPE, WatchedUndo, check_scope, guard_scope, provided_scope
from .agent.scope import GUARDS as _scope_guards  # (changed in place only)
from .agent.scope import UNDO_WATCHERS as _undo_watchers  # (changed in place only)
from .agent.scope import REVERT_WATCHERS as _revert_watchers  # (changed in place only)
from .agent.scope import PROVIDERS as _scope_providers  # (changed in place only)
from .agent.twophase import TwoPhase
from .agent.txlog import LSN, TxnInfo
from .agent.undo import Undo, UndoPlan

if TYPE_CHECKING:  # (names for annotations only: replication is imported when used)
    from .engine.conflicts import Prepared
    from .replication.shipper import ReplicationStatus

_MISSING = object()


# Stores not closed by the program are closed at interpreter exit by an ``atexit`` hook:
# it runs before the interpreter stops its daemon threads (the applier among them).  A
# close left to ``__del__`` during finalization could wait forever for a lock the applier
# held when it was stopped (a script that exited right after its commits hung: 5 of 5).
_OPEN_STORES: "weakref.WeakSet[Store]" = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()
RUN_MAX_BACKOFF_S = 1.0  # run()'s wait between retries stops doubling here
CLOSE_WAIT_S = 30.0  # close() lets other threads' work under way finish this long
# close() lets an action's body another thread is running leave its ``with`` block this
# long first (its result logged; see Store._wait_for_action_bodies)
ACTION_BODY_WAIT_S = 5.0
PURGE_SHIP_WAIT_S = 10.0  # a purge waits this long for its replica to catch up before erasing


class _Finishing:
    """The calls that commit and then go on working (revert and rewind compensate, purge
    erases): ``close()`` waits for them, so their commit is never followed by StoreClosed
    (a probe: a revert racing close() committed, then raised StoreClosed from its
    compensation phase, and its caller believed nothing happened).  Once close() began,
    such a call is refused before it does anything."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._depth: dict[int, int] = {}  # thread ident -> calls under way
        self.closing = False

    def enter(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self.closing and me not in self._depth:
                raise StoreClosed(f"store {self._path} is closing")
            self._depth[me] = self._depth.get(me, 0) + 1

    def leave(self) -> None:
        me = threading.get_ident()
        with self._lock:
            n = self._depth.pop(me, 1) - 1
            if n:
                self._depth[me] = n

    def refuse_new(self) -> None:
        """From now on such a call raises StoreClosed before it does anything."""
        with self._lock:
            self.closing = True

    def elsewhere(self) -> int:
        """How many other threads' calls are under way."""
        me = threading.get_ident()
        with self._lock:
            return sum(1 for t in self._depth if t != me)


_PROCESS = [os.getpid()]  # this process's pid, kept current in a forked child


def _forked() -> None:
    """In a forked child: the parent's open stores are the parent's.  The child's copies
    are closed without touching a file (their writer lock is the parent's flock, their
    log the parent's to append to: a child that committed through one wrote over the
    parent's next records, and handed out its txids and idempotency keys again)."""
    global _OPEN_LOCK
    _PROCESS[0] = os.getpid()
    # a lock another parent thread held at the fork (opening a store) stays held for ever
    # in the child: its own walstore.open() and its exit (the atexit hook) waited on it
    _OPEN_LOCK = threading.Lock()
    for store in list(_OPEN_STORES):  # (one thread in the child: no lock needed)
        store._engine.forked_away()


os.register_at_fork(after_in_child=_forked)


@atexit.register
def _close_open_stores() -> None:
    with _OPEN_LOCK:
        stores = list(_OPEN_STORES)
    for store in stores:
        if store._pid != _PROCESS[0]:
            continue  # a forked child's copy: the store belongs to the parent process
        try:
            store.close()
        except Exception:  # noqa: BLE001 - exiting: each store is let go as best it can be
            pass


class Store:
    """An open walstore.  Create with :func:`walstore.open`.  Thread-safe.

    Close it (``close()`` or ``with``): a store still open at interpreter exit is closed
    then (``atexit``), like ``close()``; one dropped without close lets go in ``__del__``.
    """

    def __init__(self, path: str, *, durability: str = "full", create: bool = True,
                 readonly: bool = False, recover: str = "auto",
                 compensators: dict[str, Callable] | None = None,
                 map_size: int | None = None, options: Options | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 replicate_to: str | None = None, replicate_options: Any = None) -> None:
        if options is not None and not isinstance(options, Options):  # (before any file
            raise TypeError(f"options= takes a walstore.Options, not "         # is touched)
                            f"{type(options).__name__} (tuning keywords go to walstore."
                            f"open(path, segment_size=...) directly); nothing was opened")
        if options is not None:  # a private copy, validated again (``replace`` runs
            options = dataclasses.replace(options)  # __post_init__): a field set on the
            # caller's object after it was made went past every range (sync_interval=nan:
            # the flusher spun), and a later change reached the running store
        compensators = check_compensators(compensators)  # (before recovery runs them)
        if replicate_to is not None and readonly:
            raise ValueError("replicate_to= ships a writer's log: open without readonly=True")
        self._shipper = None
        keep_pin = None
        if replicate_to is not None:  # (the options only: no client library imported)
            from .replication.options import ReplicateOptions
            keep_pin = ReplicateOptions.from_any(replicate_options).max_pin_bytes
        if replicate_to is not None:  # (a bad URL or option refused before the store is
            from .replication.options import ReplicateOptions  # touched: it was marked
            from .replication.targets import check_url          # crashed, or created)
            check_url(replicate_to)
            opts = ReplicateOptions.from_any(replicate_options)
            opts.check_lease()  # (a lease_ttl the rounds cannot keep renewed)
            if replicate_to.partition(":")[0].lower() == "s3":  # (checked only when the S3
                from .replication.targets import check_endpoint  # client was built: the
                check_endpoint(opts.endpoint_url)                 # store was created)
                from .replication.targets import check_s3_client  # (boto3 missing: the
                check_s3_client()               # store was created, then the open failed)
        elif replicate_options is not None:  # (checked all the same: an unknown option,
            from .replication.options import ReplicateOptions  # a wrong type, opened
            ReplicateOptions.from_any(replicate_options)        # without a word)
        self._engine = engine = Engine(path, durability=durability, create=create,
                                       readonly=readonly, recover=recover, map_size=map_size,
                                       options=options, progress=progress,
                                       keep_replica_pin=keep_pin, spare_later=True)
        try:
            self._saga = Saga(engine, compensators)
            self._files = Files(engine)
            self._history = History(engine, self._files)
            self._twophase = TwoPhase(engine, self._saga)
            self._hooks = AgentHooks(self._saga, self._twophase, self._files)
            self._twophase.undo_files = self._hooks.undo_ended
            self._twophase.effects_of = self._files.effects_of
            self._twophase.file_lsns_of = self._files.step_lsns_of
            self._files.undoing = self._twophase.undoing
            self._undo = Undo(engine, self._saga, self._history,
                              lambda meta: self.transaction(meta=meta), self._files)
            self._purge = Purge(engine, self.run)
            if not readonly:
                engine.checkpoint_hooks.append(Retention(engine).trim)
                engine.checkpoint_hooks.append(self._files.gc)
                self._settle_recovery()
                self._trim_after_recovery()
                engine.start_spare()  # (not from the room the file undos above needed)
            if not readonly:
                engine.drain()  # (REDOne purges applied, so their owed erasure shows)
            if replicate_to is not None:
                from .replication import start_in_process  # the [s3] extra, only when asked
                self._shipper = start_in_process(self, replicate_to, replicate_options)
                self._purge.before_erase = self._ship_before_erasure
                engine.before_erase = self._ship_before_erasure  # (its background erasure)
            if not readonly and engine.erase_owed():  # a purge's erasure a crash cut
                # short: finish it, shipping up to it first as the purge itself does (done
                # before the shipper started, it trimmed the log the replica had not
                # received yet: a hole no restore or follower crosses — probe-follow45)
                engine.erase_old_bytes([], after_rotate=self._purge.before_erase)
        except BaseException as e:
            if getattr(self, "_files", None) is not None:
                self._files.close_monitors()
            if self._shipper is not None:  # (started before the owed erasure failed)
                with contextlib.suppress(Exception):
                    self._shipper.stop()
            engine.drop_like_a_crash()
            if isinstance(e, StateWriteError):  # (the open's settle, drain or erasure:
                # README's Errors, a StoreIOError naming data.mdb, as the engine's own)
                raise engine.state_io_error(e, f"opening the store at {engine.path}",
                                            "nothing was lost: every commit is in the "
                                            "log; open it again once the cause is gone") from e
            if isinstance(e, OSError) and not isinstance(e, WalstoreError):
                # (an OS error of the open's settling, after the engine's: listing the
                # before-image store's temp directory at the descriptor limit, EMFILE,
                # escaped raw from walstore.open)
                raise engine.open_failed(e) from e
            if isinstance(e, LogFailed):  # (the settle's records: see open_log_failed)
                raise engine.open_log_failed(e) from e
            raise
        self._pid = _PROCESS[0]
        self._closing: threading.Thread | None = None  # the thread inside close()
        self._close_lock = threading.Lock()  # one close() at a time (the others wait, then
        self._finishing = _Finishing(engine.path)  # find nothing left to do)
        with _OPEN_LOCK:
            _OPEN_STORES.add(self)

    def _trim_after_recovery(self) -> None:
        """Recovery's checkpoint ran before the retention and blob hooks were registered:
        a writer killed before its first background checkpoint (64 MiB of log by default)
        never trimmed, and stores of short-lived writers grew without bound (a probe: 15
        kills, ``retain_transactions=1000``, 280,759 transactions kept, data.mdb 430 MiB).
        After a recovery that redid something, one checkpoint with the hooks."""
        eng = self._engine
        report = eng.last_recovery
        opts = eng.options
        if report is None or not report.redone:
            return
        if opts.retain_transactions is None and opts.retain_seconds is None:
            return
        try:  # (an owed erasure is left to the end of open, after the shipper started)
            eng.checkpoint(finish_erasure=False)
        except (WalstoreError, OSError) as e:  # (as the background checkpoint it stands
            # in for: recorded, the store read-only if LMDB failed; never a failed open)
            eng.note_background_error(e)

    def _settle_recovery(self) -> None:
        """Undo what recovery left owed, newest first: the compensations (those with a
        compensator, not held) and the file changes of transactions that did not commit
        (held instead in a copy of another store)."""
        eng = self._engine
        origin = eng.origin
        copied = origin is not None and not origin.get("compensate")
        done, still, conflicts, failures = self._hooks.settle(copied)
        report = eng.last_recovery
        if report is not None:
            report = eng.last_recovery = FilesRecoveryReport.of(report)
            report.compensated = done
            report.pending_compensations = [a.id for a in still]
            report.add_files(conflicts, failures, self._files.watch_saved)
        self._files.watch_saved = []

    # ---- lifecycle ----------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._engine.path

    @property
    def store_id(self) -> bytes:
        return self._engine.store_id

    @property
    def durability(self) -> str:
        return self._engine.durability

    @property
    def readonly(self) -> bool:
        """True when the store takes no writes: opened with ``readonly=True``, or turned
        read-only by a failed fsync or LMDB write (``CommitOutcomeUnknown`` and the like)
        until it is reopened.  (It said False after such a failure while every write
        raised ReadOnlyError: probe-contract.)"""
        eng = self._engine
        return eng.readonly or eng.stopped_by is not None  # (the log's failed fsync too)

    @property
    def options(self) -> Options:
        """A copy of the options the store runs with: changing it changes nothing.  (It
        was the running store's own object, read live and never validated again:
        ``store.options.apply_batch = 0`` left every commit unapplied until committers
        waited for ever at ``max_unapplied``; ``apply_interval = "x"`` killed the applier
        thread with a traceback and nothing reported it.)"""
        return dataclasses.replace(self._engine.options)

    @property
    def closed(self) -> bool:
        return self._engine.closed

    @property
    def last_recovery(self):
        return self._engine.last_recovery

    @property
    def compensators(self) -> dict[str, Callable]:
        return self._saga.compensators

    # ---- what walstore's own layers are built on (not in CONTRACT) ------------------------
    @property
    def engine(self) -> Engine:
        """The Engine under this store (its WAL, LMDB state, pipeline and views): what
        walstore's own layers that work below the Store's methods — ops (``verify``),
        replication (``InProcessSource``) — use, through the Engine's public methods and
        attributes.  One per Store, for its whole life; after ``close()`` it is closed too
        (``engine.closed``; ``engine.check_open()`` raises StoreClosed).  Not part of the
        product contract: an application keeps to the Store's methods."""
        return self._engine

    @property
    def reversible_files(self) -> Files:
        """This store's reversible files (``agent.files.Files``: its workspaces, blob
        store, claims, gc): what ``ops.backup`` asks which blobs a copy refers to.  One
        per Store, for its whole life, built on ``engine``; not part of the product
        contract (an application uses ``workspace()`` and ``tx.files(ws)``)."""
        return self._files

    @property
    def txn_history(self) -> History:
        """This store's history (``agent.history.History``: the log, key and file
        versions, restore points, purges LMDB does not hold yet): what the CLI's
        ``walstore log`` streams (``iter_log``: ``log()`` returns a list, held whole) and
        ``walstore files`` / ``diff`` read (``file_history``, ``check_file_history``,
        ``unapplied_purges``).  One per Store, for its whole life, built on ``engine``;
        its methods do not check that the store is open (``engine.check_open()`` first).
        Not part of the product contract (an application uses ``log()``, ``history()``
        and ``at()``)."""
        return self._history

    def close(self) -> None:
        """Roll back open transactions whose effects are out in the world (compensate
        their actions, put back their files; a prepared one is left for its coordinator),
        apply everything, checkpoint, mark the shutdown clean, release the lock (and a
        replication lease: the shipper ships what it can first, within a few seconds)."""
        if self._pid != _PROCESS[0]:
            return  # a forked child's copy of its parent's store: nothing of it is ours
        if getattr(self, "_closing", None) is threading.current_thread():
            # (from inside this close: a compensator of a transaction it rolls back, an
            # action, a signal handler — it waited on its own lock for ever)
            raise StoreClosed(f"store {self.path} is being closed by this thread: close() "
                              f"was called from inside it (a compensator, say); the "
                              f"compensation it runs cannot be recorded now and runs again "
                              f"at the next open")
        with self._close_lock:
            self._closing = threading.current_thread()
            try:
                if self._engine.writable and not self._engine.closed:
                    self._wait_for_action_bodies()
                    for txid, error in self._hooks.roll_back_open(CLOSE_WAIT_S):
                        warnings.warn(f"closing {self.path}: the rollback of open "  # (recorded)
                                      f"transaction {txid} did not finish: {error}",
                                      RuntimeWarning, stacklevel=2)
                    self._wait_for_work_elsewhere()
                self._stop_replication(release=True)
                try:
                    self._engine.close()
                finally:
                    self._files.close_monitors()
            finally:
                self._closing = None

    def _wait_for_action_bodies(self) -> None:
        """Before anything is rolled back or closed: the ``with tx.action(...)`` bodies
        other threads are running are let leave their block (a few seconds), so
        their results are logged.  (The log was closed under them: the result could not
        be logged, and the next open compensated the charge with ``result=None`` after a
        clean close — audit 60.)  From here on an action another thread enters is refused
        (StoreClosed, its body never runs); one already past that check is waited for too.
        A body still running after ACTION_BODY_WAIT_S (an agent's long call) is left as a
        crash leaves it, to the next open, said in a RuntimeWarning."""
        self._saga.refuse_intents()  # (new ones from other threads: StoreClosed)
        self._files.refuse_new()  # (and file operations, watch() blocks: the same)
        deadline = time.monotonic() + ACTION_BODY_WAIT_S
        while True:
            entering = self._saga.entering_elsewhere()
            bodies = self._hooks.action_bodies_elsewhere()
            leaving = self._saga.leaving_elsewhere()
            files = self._files.busy_elsewhere()
            if not (bodies or entering or leaving or files) or \
                    time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if bodies or entering or leaving:
            what = (f"the bodies of action(s) {bodies}" if bodies else
                    f"{entering} action(s) being entered" if entering else
                    f"{leaving} action(s) logging their results")
            warnings.warn(f"closing {self.path}: after {ACTION_BODY_WAIT_S:g} s, {what} "
                          f"are still running in other threads; their "
                          f"results cannot be logged now, so the next open compensates "
                          f"them with result=None (same idempotency keys)",
                          RuntimeWarning, stacklevel=3)
        if files:
            warnings.warn(f"closing {self.path}: after {ACTION_BODY_WAIT_S:g} s, {files} "
                          f"file operation(s) or watch() block(s) are still running in "
                          f"other threads; what they change cannot be logged now, so the "
                          f"next open puts it back as after a crash (the versions found "
                          f"kept under quarantine/)", RuntimeWarning, stacklevel=3)

    def _wait_for_work_elsewhere(self) -> None:
        """Before the log closes: other threads' revert/rewind/purge calls and the
        compensations they run are let finish (up to CLOSE_WAIT_S in all), so a call that
        committed never ends in StoreClosed and a compensation that ran is recorded once;
        new such calls are refused.  What is still running then is left to the next open,
        said in a RuntimeWarning."""
        self._finishing.refuse_new()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while True:
            calls, compensations = self._finishing.elsewhere(), self._saga.running_elsewhere()
            undos = self._files.undoing_elsewhere()  # (rollbacks putting files back)
            if not (calls or compensations or undos) or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if calls or compensations or undos:
            warnings.warn(f"closing {self.path}: after {CLOSE_WAIT_S:g} s, {calls} "
                          f"revert/rewind/purge call(s), {undos} rollback(s) and "
                          f"compensation(s) {compensations} "
                          f"are still running in other threads; their outcome cannot be "
                          f"recorded, so the next open finishes them (compensations run "
                          f"again, same idempotency keys)", RuntimeWarning, stacklevel=3)

    def _drop_like_a_crash(self) -> None:
        """Let go as a killed process would (tests and tools)."""
        shipper = self._shipper
        self._stop_replication(release=False)
        if shipper is not None:  # (its process is gone: a reopen here takes the lease it
            from .replication.lease import LIVE_IDS  # left over, as a new process would)
            LIVE_IDS.discard(shipper.holder["id"])
        self._files.close_monitors()
        self._engine.drop_like_a_crash()

    def _stop_replication(self, release: bool) -> None:
        shipper, self._shipper = self._shipper, None
        if shipper is not None:
            shipper.stop(release)

    # ---- replication --------------------------------------------------------------------
    def replication(self) -> "ReplicationStatus":
        """Replication status: ``shipped_lsn``, ``lag_seconds``, ``lag_bytes``,
        ``last_error`` (see walstore.replication; only with ``open(replicate_to=...)``)."""
        self._engine.check_open()
        if self._shipper is None:
            raise ReplicationError(f"store {self.path} was not opened with replicate_to=")
        return self._shipper.status()

    def sync_replica(self, timeout: float = 30.0) -> int:
        """Wait until every commit so far is shipped (an RPO-0 point); returns the shipped
        LSN.  ReplicationError naming the cause when it cannot within ``timeout`` seconds
        (a positive number; ``None``: no limit)."""
        if timeout is None:
            timeout = float("inf")
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds (or None: no "
                             f"limit), not {timeout!r}")
        try:  # (an int no float holds, 10**400: it escaped as a bare OverflowError)
            timeout = float(timeout)
        except OverflowError:
            timeout = float("inf")
        self._engine.check_open()
        if self._shipper is None:
            raise ReplicationError(f"store {self.path} was not opened with replicate_to=")
        return self._shipper.sync(self._shipper.source.sync(), timeout)

    def _ship_before_erasure(self) -> None:
        """A purge's erasure drops every older WAL segment, overriding the replica's pin:
        ship up to the purge first (up to PURGE_SHIP_WAIT_S), so the replica keeps a
        contiguous log and its followers go on.  Replication down or far behind: the
        erasure goes on anyway (it wins) and the replica records a hole."""
        shipper = self._shipper
        if shipper is None or shipper.state != "running":
            return
        try:
            shipper.sync(shipper.source.sync(), PURGE_SHIP_WAIT_S, vouch=False)
        except ReplicationError:
            pass

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a store dropped without close() still lets go of its lock
        if sys.is_finalizing() or getattr(self, "_pid", None) != _PROCESS[0]:
            return  # (the atexit hook closed it, or could not: the OS lets go of the lock;
            #          or a forked child's copy of the parent's store)
        try:
            if not self._engine.closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<walstore.Store {self.path!r}{' closed' if self.closed else ''}>"

    def needs_recovery(self) -> bool:
        return self._engine.needs_recovery()

    def refresh(self) -> None:
        """Read-only stores: take in what the writer logged since the last read."""
        self._engine.check_open()
        self._engine.refresh()

    def checkpoint(self) -> dict:
        """Apply all, sync LMDB, log a checkpoint, drop WAL segments no longer needed."""
        return self._engine.checkpoint(after_rotate=self._purge.before_erase)

    def sync(self) -> None:
        """Make every commit so far durable (with durability 'normal' or 'none'),
        the workspaces' file changes too: under "none" they are not fsynced as they are
        made, and ``sync()`` (as each checkpoint) syncs the file systems holding the
        workspaces this process used before the log (Linux ``syncfs``)."""
        self._engine.check_writable()
        try:
            self._engine.sync_all()
        except OSError as e:
            if isinstance(e, WalstoreError):
                raise
            raise StoreIOError(e.errno, f"sync of {self.path} failed: {e.strerror or e}",
                               e.filename) from e

    def stats(self) -> dict:
        self._engine.refresh()
        out = self._engine.stats()
        out["keys"] = self._count_keys()
        return out

    def _count_keys(self) -> int:
        return self._engine.count_keys()

    # ---- reads --------------------------------------------------------------------------
    def _read(self, key: Key) -> bytes | None:
        """The newest committed value of ``key`` (packed), the read path kept flat: it is
        the hottest path of an agent's store."""
        eng = self._engine
        if eng.closed:
            eng.check_open()
        if eng.follower is not None:
            eng.refresh()
        if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES:
            k = b"b" + key  # (``encode_key``'s first case: codec._BYTES, the tag)
        else:
            k = encode_key(key)
        versions = eng.memtable.versions
        if versions and k in versions:  # (an empty overlay: no hash of ``k``)
            return eng.reader.latest(k)
        return eng.state.get_value(k)

    def get(self, key: Key, default: Any = None) -> Any:
        """The latest committed value of ``key`` (``default`` when absent).

        The hottest call of an agent's store, kept flat (a Python call costs about as much
        as the read's own LMDB work here): ``_read`` and ``encode_key``'s common case
        written out; the read itself is ``LmdbState.get_value`` (the read gate's fast
        path: writing it out here too saved 80 instructions of ~15.3k, not worth a third
        copy of the gate's protocol)."""
        eng = self._engine
        if eng.closed:
            eng.check_open()
        if eng.follower is not None:
            eng.refresh()
        if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES:
            k = b"b" + key  # (``encode_key``'s first case: codec._BYTES, the tag)
        else:
            k = encode_key(key)
        versions = eng.memtable.versions
        if versions and k in versions:  # (an empty overlay: no hash of ``k``)
            v = eng.reader.latest(k)
        else:
            v = eng.state.get_value(k)  # (the read gate's fast path)
        if v is None:
            return default
        try:  # (``unpack_value``'s first try written out: a call less per read)
            return unpack_common(v)
        except DECODE_ERRORS:
            pass
        try:
            return unpack_value(v)
        except CorruptionError as e:  # (damage inside the value: name the row)
            raise row_damaged("data", k, e, eng.state.data_file) from e

    def __getitem__(self, key: Key) -> Any:
        v = self._read(key)
        if v is None:
            raise KeyError(key)
        try:
            return unpack_value(v)
        except CorruptionError as e:
            raise row_damaged("data", encode_key(key), e, self._engine.state.data_file) from e

    def __iter__(self) -> Iterator[Any]:
        """Not iterable: ``for k in x`` fell back to ``x[0]``, ``x[1]`` ... (Python's old
        protocol, as ``__getitem__`` is defined) and raised a KeyError or "key must be str
        or bytes, not int: 0"; iterate ``scan()`` instead (probe-audit51)."""
        raise TypeError(f"a Store is not iterable; iterate its scan() (key, value pairs "
                        f"in key order), e.g. for key, value in x.scan(prefix=...)")

    def __contains__(self, key: Key) -> bool:
        return self._read(key) is not None

    def scan(self, prefix: Key | None = None, start: Key | None = None, end: Key | None = None,
             reverse: bool = False) -> Iterator[tuple[Key, Any]]:
        """(key, value) of committed state in key order, one consistent snapshot;
        ``start`` inclusive, ``end`` exclusive.  Bad bounds raise here, at the call (a
        generator raised them at the first ``next``, far from the mistake)."""
        eng = self._engine
        eng.check_open()
        return self._scan(eng, *scan_bounds(prefix, start, end, reverse), reverse)

    def _scan(self, eng: Engine, lo: bytes, hi: bytes | None, reverse: bool
              ) -> Iterator[tuple[Key, Any]]:
        eng.check_open()  # (again: it may have closed between the call and the first read)
        eng.refresh()
        for k, v in eng.reader.scan(lo, hi, reverse):
            eng.check_open()
            try:
                item = decode_key(k), unpack_value(v)
            except CorruptionError as e:
                raise row_damaged("data", k, e, eng.state.data_file) from e
            yield item

    def keys(self, prefix: Key | None = None) -> Iterator[Key]:
        return (k for k, _v in self.scan(prefix=prefix))

    # ---- transactions -------------------------------------------------------------------
    def transaction(self, meta: Any = None, scope: Any = None) -> Transaction:
        """Begin a transaction (use ``with``: commit on exit, rollback on exception).
        ``scope``: the key prefix it belongs to (default: a registered scope provider's;
        ``walstore.agent.scope.NO_SCOPE``: none, whatever a provider names).  A provider
        may fence the transactions it names the scope of (``register_scope_provider``):
        LangGraph's refuses one of a run whose thread was rewound or deleted.  One begun
        with an explicit scope is shown to the registered scope guards
        (``register_scope_guard``): OpenAI sessions refuse the work of a turn a rewind of
        the session cut off."""
        eng = self._engine
        if eng.closed:  # (``check_open``'s test written out: every transaction begins here)
            eng.check_open()
        on_begin = None
        if scope is NO_SCOPE:
            scope = None
        elif scope is not None:
            scope = check_scope(scope)
            if _scope_guards:  # (a scope's owner may refuse or fence work declared in it)
                on_begin = self._guard_begin
        elif _scope_providers:  # (none registered: no scope, ``provided_scope``'s answer)
            scope, on_begin = provided_scope()
        tx = Transaction(eng, self._hooks, eng.next_txid(), meta, scope)
        tx.keepalive = self  # (the store stays open while the transaction is)
        if on_begin is not None:
            try:  # (the provider's check: see register_scope_provider)
                on_begin(self, tx)
            except BaseException:
                tx.rollback()  # (it only read: nothing to undo)
                raise
        return tx

    @staticmethod
    def _guard_begin(store: "Store", tx: Transaction) -> None:
        guard_scope(store, tx, tx.scope)

    def run(self, fn: Callable[[Transaction], Any], retries: int = 5, meta: Any = None,
            backoff: float = 0.005, scope: Any = None) -> Any:
        """Call ``fn(tx)`` in a transaction and commit; retry on ConflictError (at most
        ``retries`` times, after ``backoff`` seconds doubling each time up to 1 s, or
        ``backoff`` when larger, with jitter).  A
        transaction ``fn`` prepared is committed too (calling ``run`` decides it: a
        ``with`` block alone leaves a prepared one in doubt)."""
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise TypeError(f"retries must be an int, not {retries!r:.80}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")
        if (not isinstance(backoff, (int, float)) or isinstance(backoff, bool)
                or not 0 <= backoff < float("inf")):
            raise ValueError(f"backoff must be a number of seconds, 0 or more, not "
                             f"{backoff!r:.80}")
        if never_runs(fn):  # (``async def``, a generator function: its body did not run
            # in the transaction, which committed empty — probe-audit51)
            raise TypeError(f"run(fn): fn {fn!r:.80} is an async or generator function: "
                            f"calling it runs none of its body in the transaction; pass a "
                            f"plain function (nothing was begun)")
        attempt = 0
        while True:
            tx = self.transaction(meta, scope)
            try:
                with tx:
                    result = fn(tx)
                    if inspect.iscoroutine(result) or inspect.isasyncgen(result):
                        result.close()  # (never run: refused, the transaction rolled back)
                        raise TypeError(f"run(fn): fn returned a {type(result).__name__}, "
                                        f"whose body does not run in the transaction; "
                                        f"pass a plain function (nothing was committed)")
                    if tx.gid is not None and tx.state == ACTIVE:  # (prepared by ``fn``
                        tx.commit()  # and not decided by it: run's commit decides it)
                return result
            except ConflictError:
                attempt += 1
                if attempt > retries:
                    raise
                # doubling up to RUN_MAX_BACKOFF_S (or ``backoff`` when larger): it doubled
                # for ever (a 30th retry slept ~31 days) and a float ``backoff`` met
                # 2**1024 at the 1,025th retry: OverflowError (probe-audit51)
                delay = min(backoff * 2.0 ** min(attempt - 1, 64),
                            max(backoff, RUN_MAX_BACKOFF_S))
                time.sleep(delay * (0.5 + _jitter()))

    # ---- reversible files ---------------------------------------------------------------
    def workspace(self, root: Any, ignore: Any = None, scope: Any = None) -> Workspace:
        """Register the directory tree ``root`` for reversible files (durable) and return
        its Workspace; the same root again returns the same object.  ``ignore``:
        gitignore-style patterns ``watch()`` does not track; ``scope``: the key prefix a
        scoped ``rewind``/``revert`` counts it in.  See ``tx.files(ws)``."""
        self._engine.check_open()
        with os_errors_as_store_errors():  # (registering writes: a disk error is ours)
            return self._files.workspace(root, ignore, scope)

    def workspaces(self) -> list[Workspace]:
        """Every registered workspace."""
        self._engine.check_open()
        self._engine.refresh()
        return [self._files.registered(r, gone_ok=True) for r in sorted(self._files.rows())]

    def file_conflicts(self) -> list[dict]:
        """Every recorded file conflict: a path walstore could not put back because it had
        changed behind its back (the other version stayed; ``saved_as``: where walstore's
        was kept), oldest first."""
        self._engine.check_open()
        return self._files.conflicts()

    # ---- actions and compensations ------------------------------------------------------
    def compensator(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn(action)`` as the compensator called ``name``.  Not on a
        closed store (StoreClosed, as its every other call: a compensator registered there
        never runs — it was accepted without a word, probe-audit48)."""
        self._engine.check_open()
        return self._saga.compensator(name)

    def actions(self, pending: bool = False) -> list[Action]:
        """Every recorded action (``pending=True``: only those owing compensation)."""
        check_flag("pending", pending)  # (by its truth, "no" listed the owed ones only)
        self._engine.check_open()
        return self._saga.actions(pending)

    def iter_actions(self, pending: bool = False) -> Iterator[Action]:
        """``actions(pending)``, newest first, read as they are consumed (memory grows by
        a small sort key per action, not by the action); not one snapshot: an action
        trimmed meanwhile may be left out."""
        check_flag("pending", pending)
        self._engine.check_open()
        return self._saga.iter_actions(pending)

    def pending_compensations(self) -> list[Action]:
        """Actions whose compensation is owed: ``pending`` or ``failed`` — including one
        another thread of this process is running right now (its row still says
        ``pending`` until its outcome is recorded): a caller waiting until nothing is
        owed must not go on while a refund is still under way.  ``retry_compensations``
        leaves such a one to the thread running it, and ``resolve`` refuses it while it
        runs.  (Audit 70 left running ones out for a while; a poller then saw ``[]``
        with a refund in flight.)"""
        return self.actions(pending=True)

    def get_action(self, action_id: str) -> Action:
        """One action, as ``actions()`` shows it (an in-doubt one names its gid)."""
        self._engine.check_open()
        return self._saga.shown_action(action_id)

    def resolve(self, action_id: str, note: str | None = None) -> Action:
        """Mark a pending or failed compensation as handled by hand."""
        self._engine.check_writable()
        return self._saga.resolve(action_id, note)

    def retry_compensations(self, include_held: bool = False) -> list[Action]:
        """Run every owed compensation that has a compensator now; returns those still
        owed.  ``include_held``: also those a copy inherited from its source."""
        check_flag("include_held", include_held)  # (by its truth, "no" ran the held ones)
        self._engine.check_writable()
        return self._saga.run_owed(include_held)[1]

    # ---- the past -----------------------------------------------------------------------
    def log(self, limit: int | None = None, since: Any = None,
            oldest_first: bool = False) -> list[TxnInfo]:
        """Committed transactions, newest first; ``oldest_first``: the ``limit`` oldest
        after ``since``, oldest first (see walstore.agent.history)."""
        self._engine.check_open()
        return self._history.log(limit, since, oldest_first)

    def txn_info(self, txid: int) -> TxnInfo:
        self._engine.check_open()
        return self._history.txn_info(txid)

    def history(self, key: Key, limit: int | None = None) -> list[Version]:
        """Every retained version of ``key``, newest first; ``limit``: the newest
        ``limit`` only (what is older is not read).  ``iter_history`` streams them."""
        self._engine.check_open()
        return self._history.versions(key, limit)

    def iter_history(self, key: Key, limit: int | None = None) -> Iterator[Version]:
        """The versions of ``key``, newest first, read as they are consumed (bounded
        memory on a key with any number of versions); not one snapshot: versions trimmed
        or purged meanwhile may be left out."""
        self._engine.check_open()
        return self._history.iter_versions(key, limit)

    def at(self, point: Any) -> HistoricalView:
        """A read-only view of the state as of ``point`` (txid, LSN or restore point)."""
        self._engine.check_open()
        view = self._history.at(point)
        view.keepalive = self  # (as a transaction: the store stays open while it is used)
        return view

    def restore_point(self, name: str) -> LSN:
        """Name the current state; returns its LSN.  It pins history until dropped."""
        self._engine.check_writable()
        return self._history.restore_point(name)

    def restore_points(self) -> dict[str, LSN]:
        self._engine.check_open()
        return self._history.restore_points()

    def drop_restore_point(self, name: str) -> None:
        self._engine.check_writable()
        self._history.drop_restore_point(name)

    # ---- undo ---------------------------------------------------------------------------
    def revert(self, txid: int, cascade: bool = False, scope: Any = None,
               dry_run: bool = False, force: bool = False, meta: Any = None
               ) -> TxnInfo | UndoPlan | None:
        """Undo one committed transaction as a new transaction (and compensate its
        actions); None when nothing is left to undo.  See walstore.agent.undo for scope,
        dry_run, force, and how an undo finishes under concurrent writers.  Once planned,
        before it commits, the registered undo watchers are told what it reaches: the
        scopes and keys of what it undoes, cascade included
        (``walstore.agent.scope.register_undo_watcher``, ``on_revert``; no integration of
        walstore registers one: a revert edits no session's conversation)."""
        self._engine.check_open()
        self._finishing.enter()
        try:
            for flag, value in (("cascade", cascade), ("dry_run", dry_run), ("force", force)):
                check_flag(flag, value)
            if dry_run or not _revert_watchers:
                return self._undo.revert(txid, cascade, scope, dry_run, force, meta)
            watched = WatchedUndo(self, scope, revert=True)
            try:
                with watched:
                    result = self._undo.revert(txid, cascade, scope, dry_run, force, meta,
                                               watched.reach)
                    watched.committed = result is not None
                    return result
            finally:
                watched.left()   # (an interrupt at the start of its exit: WatchedUndo)
        finally:
            self._finishing.leave()

    def rewind(self, to: Any, scope: Any = None, dry_run: bool = False, force: bool = False,
               meta: Any = None, keep: Iterable[int] | None = None,
               include: Iterable[int] | None = None) -> TxnInfo | UndoPlan | None:
        """Undo every transaction committed after ``to``, as one new transaction.
        ``keep``: txids of transactions after ``to`` left as they are (their keys, files
        and actions); one that wrote a key an undone transaction wrote before it raises
        RevertConflict, nothing changed.  ``include``: txids of transactions at or before
        ``to`` undone too, in the same transaction (the commits between them and ``to``
        are kept, as ``keep`` keeps).  A txid in either that never committed raises
        UnknownPoint, nothing changed.  An exception out of its compensations (an
        interrupt too) carries ``undo_committed``, its TxnInfo: it committed.  The
        registered undo watchers are told of it
        (``walstore.agent.scope.register_undo_watcher``: OpenAI sessions cut off their
        turns in flight that it reaches)."""
        self._engine.check_open()
        self._finishing.enter()
        try:
            check_flag("dry_run", dry_run)
            check_flag("force", force)
            if dry_run or not _undo_watchers:
                return self._undo.rewind(to, scope, dry_run, force, meta, keep, include)
            watched = WatchedUndo(self, scope)
            try:
                with watched:
                    result = self._undo.rewind(to, scope, dry_run, force, meta, keep,
                                               include)
                    watched.committed = result is not None
                    return result
            finally:
                watched.left()   # (an interrupt at the start of its exit: WatchedUndo)
        finally:
            self._finishing.leave()

    def purge(self, prefix: Key, *, progress: Callable[[int, int], None] | None = None
              ) -> dict:
        """Erase every key under ``prefix`` and every past version of it, from every API
        and, by the checkpoint it runs, from every file of the store directory.  Logged (the
        prefix, not the data); cannot be reverted.  See walstore.agent.purge.
        ``progress(done, total)``: called after each batch of the LMDB rewrite (bytes of
        the data file, by its rows copied); None: nothing is counted.  Raises
        ``ErasureOwed`` (the purge committed; its erasure failed and is owed) when a step
        after the commit fails.  The registered undo watchers are told of it, as of a
        rewind."""
        self._finishing.enter()
        try:
            if progress is not None and not callable(progress):
                raise TypeError(f"progress= is a callable (done, total) or None, not "
                                f"{progress!r}")
            if not _undo_watchers:
                return self._purge.purge(prefix, progress)
            watched = WatchedUndo(self, prefix, purge=True)
            try:
                with watched:
                    done = self._purge.purge(prefix, progress)
                    watched.committed = True
                    return done
            finally:
                watched.left()   # (an interrupt at the start of its exit: WatchedUndo)
        finally:
            self._finishing.leave()

    # ---- two-phase commit ---------------------------------------------------------------
    def prepared(self) -> list[str]:
        """The gids of prepared (in-doubt) transactions."""
        return self._twophase.prepared()

    def prepared_details(self, gid: str) -> "Prepared":
        """The prepared transaction ``gid`` (txid, writes, meta, actions, ts).  ``writes``
        is ``[(key, value)]`` as the transaction put them (``None``: a delete) and
        ``read_keys`` the keys it read, both as the user gave them (they came back in
        their stored form: tagged bytes and packed values); ``read_ranges`` keeps the
        stored form of the scanned ranges' bounds (a bound may be no key)."""
        p = self._twophase.details(gid)
        return dataclasses.replace(
            p, writes=[(decode_key(k), None if v is None else unpack_value(v))
                       for k, v in p.writes],
            read_keys=[decode_key(k) for k in p.read_keys])

    def prepared_summaries(self) -> list[dict[str, Any]]:
        """Every prepared (in-doubt) transaction in one pass, sorted by gid, as a dict:
        ``gid``, ``txid``, ``keys`` (its number of writes), ``ts`` (prepare time),
        ``meta``, ``files_read`` and ``dirs_listed`` (workspace paths it read, directories
        it listed): what ``walstore prepared`` lists, no write set read.  A new list each
        call, a snapshot of the moment (a read-only store reads the log's tail first);
        ``prepared_details(gid)`` reads one whole.  Not part of the product contract."""
        return self._twophase.summaries()

    def commit_prepared(self, gid: str) -> LSN:
        """Commit a prepared transaction; returns its commit LSN."""
        return LSN(self._twophase.commit_prepared(gid))

    def rollback_prepared(self, gid: str) -> None:
        """Roll back a prepared transaction (compensating its actions)."""
        self._twophase.rollback_prepared(gid)

    def decision(self, gid: str) -> str | None:
        """What this store decided for ``gid``: "commit", "abort", "prepared" (in doubt;
        also while another caller's decision of it waits for its fsync under
        durability="full" — under "normal" a COMMIT reads "commit" once written: see
        ``settled_decision``) or None (nothing was prepared or decided under it here)."""
        return self._twophase.decision(gid)

    def settled_decision(self, gid: str, timeout: float | None = 60.0) -> str | None:
        """``decision(gid)`` once no decision of it is being made durable: while another
        caller's COMMIT or ROLLBACK_PREPARED of ``gid`` waits for its fsync, this waits
        for it (up to ``timeout`` seconds) instead of answering "prepared" (or, under
        durability="normal", a decision whose fsync may still fail).  Returns "commit",
        "abort", "prepared" (in doubt, no decision under way), None (nothing under
        ``gid`` here) or "unknown": that fsync failed (in doubt until the next open), the
        store closed meanwhile, or ``timeout`` ran out.  What a coordinator asks before
        telling its participants (``walstore.resolve_atomic`` does).  ``timeout``: a number
        of seconds, 0 or more (``None``: no limit)."""
        if timeout is None:
            timeout = float("inf")
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout >= 0:  # (None, "5": a TypeError about float + str)
            raise ValueError(f"timeout must be a number of seconds, 0 or more (or None: no "
                             f"limit), not {timeout!r}")
        try:  # (an int no float holds, 10**400: a bare OverflowError)
            timeout = float(timeout)
        except OverflowError:
            timeout = float("inf")
        return self._twophase.settled_decision(gid, timeout)


def _jitter() -> float:
    return int.from_bytes(os.urandom(2), "little") / 65535
