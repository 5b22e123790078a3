"""The commit pipeline: the ONE way a transaction becomes committed.

Every commit — an agent's transaction, a revert or rewind, the decision to commit a
prepared transaction, a purge — is a ``CommitRequest`` and goes through ``commit``, in
three phases separated by an explicit point of no return:

1. **Before the commit record exists** (``prepare``, under the journal lock for the last
   part): the store must be writable; backpressure waits for the applier; the read set
   is validated (``ConflictChecker``: serializable OCC), prepared transactions' holds and
   claims on actions are checked; the records are appended.  Any error here —
   ConflictError, a full disk, a store turned read-only — means *nothing was committed*:
   the caller rolls back and compensates.
2. **The commit record's durability** (``make_durable``): under durability="full" the
   record's write (a commit that takes no hold and arrives while the group commit's
   leader fsyncs is buffered: the leader writes it with the others' just before its next
   fsync) and the fsync.  If that write fails, nothing of the record was logged and its
   event is gone from the MemTable: WalWriteError, exactly as a write error in phase 1
   (nothing committed, the caller compensates).  If the fsync fails, the record may or
   may not be on disk: ``CommitOutcomeUnknown`` (a ReadOnlyError), the store is
   read-only, and *nothing is compensated* (so too for any other error once the record
   is appended: a MemoryError in the wait) — the next open decides (the record durable:
   committed; not: a loser whose compensations run then).
3. **After the point of no return**: committed.  Waking the applier, bookkeeping, and any
   error of a background thread can never turn this commit into a reported failure; they
   are contained (``fault_point("commit.after_durable")`` lets tests prove it).

Invariants: validation and append happen under one lock, so no commit can slip between
a transaction's validation and its record; an event reaches LMDB only through the
applier after publication; nothing after phase 2 raises to the committer.

The ``CommitGate`` lets one thread hold every other thread's commits and prepares out
for a while (an undo that would otherwise be overtaken by continuous writers forever):
it is checked under the journal lock, right before validation, at the cost of one
attribute test per commit.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from .. import fileio
from ..errors import (CommitOutcomeUnknown, ConflictError, UnknownGid, WalstoreError,
                      type_and_message)
from ..log.records import Event
from ..log.writer import LogFailed, WalWriteError
from ..signals import deferred
from .conflicts import ConflictChecker, Prepared, PreparedSet, ReadSet
from .journal import CommitAppended, Journal
from . import tables

if TYPE_CHECKING:
    from .engine import Engine

T = TypeVar("T")


@dataclass
class CommitRequest:
    """Everything a commit needs, assembled by whoever commits (a Transaction, the agent
    layer's revert/rewind, commit_prepared)."""

    txid: int
    writes: list                          # [(stored key, packed value or None)]
    meta: Any = None
    reads: ReadSet | None = None          # None: blind, or validated at prepare
    body: dict = field(default_factory=dict)  # COMMIT payload fields beyond tx/ts/meta/w
    gid: str | None = None                # committing this prepared transaction
    committed: bool = False               # past the point of no return (set by ``commit``)
    lsn: int | None = None                # its COMMIT record's LSN, once appended
    # the agent layer's validation of what the engine does not see (the workspace paths
    # the transaction read: walstore.agent.files): run under the journal lock right after
    # the read set's, ConflictError when it fails (nothing committed)
    check: Callable[[], None] | None = None

    @property
    def claims(self) -> list[str]:
        """Ids of committed actions this commit undoes (a revert/rewind compensates them):
        two commits may not claim the same action."""
        return list(self.body.get("compensate", ()))


class CommitGate:
    """Holds other threads' commits and prepares out while one thread works.

    ``hold()`` waits for the gate, closes it, and returns once no other thread can append
    a commit or a PREPARE record until it exits (the check runs under the journal lock,
    right before validation); the holder's own commits pass.  A committer that finds the
    gate closed waits on it without holding the journal lock.  Lifetime: held only for
    the span of one undo's plan and commit (milliseconds to what the undo touches), never
    across user code.
    """

    def __init__(self, lock: "threading.RLock") -> None:
        self._lock = lock  # the journal lock (entered as itself: walstore.signals)
        self._cond = threading.Condition(lock)
        self.holder: int | None = None          # the holding thread's ident
        self.waits = 0                          # commits that waited at the gate

    def wait_open(self) -> None:
        """Caller holds the journal lock: return when the gate is open or ours."""
        me = threading.get_ident()
        while self.holder is not None and self.holder != me:
            self.waits += 1
            self._cond.wait()

    @contextmanager
    def hold(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            nested = self.holder == me  # already ours: the outer hold opens it
            while not nested and self.holder is not None:
                self._cond.wait()
            self.holder = me
        if nested:  # (never yield with the journal lock held: the applier needs it)
            yield
            return
        try:
            yield
        finally:
            with self._lock:
                self.holder = None
                self._cond.notify_all()


class CommitPipeline:
    def __init__(self, engine: "Engine", journal: Journal, checker: ConflictChecker,
                 prepared: PreparedSet) -> None:
        self.engine = engine
        self.journal = journal
        self.checker = checker
        self.prepared = prepared
        self.gate = CommitGate(journal.lock)
        # gid -> txid: prepared transactions whose decision (COMMIT or ROLLBACK_PREPARED)
        # was logged but whose fsync failed; in doubt again until the next open decides
        self.in_doubt: dict[str, int] = {}

    def held_out_on_conflict(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` (which begins and commits its own transaction) beside other
        writers; if it loses to one of them (ConflictError), once more with every other
        thread's commits and prepares held out (``CommitGate``) and what they appended
        before made visible, where it cannot lose: work that plans from a snapshot and
        must finish under writers that never pause (an undo, a purge).  Never pass user
        code that waits for other threads' commits (it would wait for the gate)."""
        try:
            return attempt()
        except ConflictError:
            with self.gate.hold():
                self.journal.sync_all()  # commits appended before the gate: visible
                return attempt()

    # ---- commits ------------------------------------------------------------------------
    def commit(self, req: CommitRequest) -> Event:
        """Commit ``req``; returns its COMMIT event (``.lsn``).  See the module docstring
        for which errors mean what."""
        checked = self._before_the_record(req)
        # From the record's append to the point of no return no asynchronous signal may
        # cut in (walstore.signals): a KeyboardInterrupt there left the committer unsure
        # whether a record that became durable was its own, and it compensated a
        # transaction that committed.  One delivered meanwhile is raised after
        # ``req.committed`` is set, which tells the committer the truth.
        with deferred():
            try:
                event, undecided = self._append(req, checked)
            except CommitAppended as e:  # (the record is in the log: see below)
                self._outcome_unknown(e.__cause__, req.txid, None, req.gid)
            interrupt = None
            try:
                req.lsn = event.lsn
                ticket, event.ticket = event.ticket, None  # (kept here for a second wait)
                # (durability="full"; else written is done — but a prepared transaction's
                # COMMIT is a 2PC decision, which must be durable before anyone acts on it
                # under "normal" too: an atomic group's coordinator commits the others next)
                journal = self.journal
                make_durable = None  # (bound at the first pass: under "normal" a plain
                # commit makes none)
                while journal.waits_for_durability or (
                        req.gid is not None and journal.durability != "none"):
                    if make_durable is None:
                        make_durable = (journal.make_durable if req.gid is None
                                        else journal.force_durable)
                    try:
                        self.durable_or_unknown(make_durable, event, req.txid, None,
                                                "whether it committed", ticket, undecided)
                        break
                    except Exception:
                        raise  # (nothing committed, or CommitOutcomeUnknown; else below)
                    except BaseException as e:  # an interrupt the signal mask could not
                        interrupt = e  # hold off (another thread took it): the record is
                        # appended, so its fate is decided by the wait, which goes on;
                        # then it is raised
            except (CommitOutcomeUnknown, WalWriteError):
                raise  # (WalWriteError: its buffered record was voided, nothing logged)
            except Exception as e:
                # any other error once the record is appended (a MemoryError in the wait,
                # an error of the fsync call that is not an OSError): the record may be in
                # the log, so "nothing committed" would be a lie — the caller rolled back,
                # logged an ABORT after the COMMIT and compensated a commit the next open
                # found standing (audit 56).  Its outcome is unknown: the store stops
                # writing and the next open decides
                self._outcome_unknown(e, req.txid, undecided)
            req.committed = True
            if interrupt is not None:
                raise interrupt
        try:  # phase 3, after the point of no return (see the module docstring)
            if fileio.faults_installed:  # (a test's backend: it may raise here)
                fileio.fault_point("commit.after_durable")
            self.engine.wake_applier()
        except Exception as e:  # committed: contained, surfaced by the store's status
            self.engine.note_background_error(e)
        return event

    def durable_or_unknown(self, make_durable, event: Event, txid: int | None,
                           what: str | None, unknown: str, ticket=None,
                           undecided: Prepared | None = None) -> None:
        """Wait for ``event``'s record to be durable; when the fsync fails, the outcome of
        that decision is unknown until recovery: the store stops writing and
        CommitOutcomeUnknown is raised (no compensation may run on it).  ``ticket``: the
        buffered record's, when the caller took it off the event already.  ``undecided``:
        the prepared transaction ``event`` decides (its COMMIT or ROLLBACK_PREPARED,
        taken out of the prepared set when it was appended): if the fsync fails it is put
        back, in doubt (``prepared()`` lists it, ``decision()`` says "prepared") and
        noted in ``in_doubt``, until the next open decides.  ``what``: the record, for
        the message (None: the commit record of ``txid``, formatted only on failure)."""
        # the event may wait long in the MemTable: it keeps no ticket for the GC to scan
        if ticket is None:
            ticket, event.ticket = event.ticket, None
        try:
            make_durable(event.end, ticket)
        except LogFailed as e:
            self.engine.fail(e)
            self._in_doubt_again(undecided)
            why = getattr(self.engine.wal, "failed", None)  # (the OSError the log stopped on)
            why = f" ({why.strerror or why})" if isinstance(why, OSError) else ""
            if what is None:
                what = f"transaction {txid}'s commit record"
            raise CommitOutcomeUnknown(
                f"the log failed{why} while {what} was being made durable (its own fsync, "
                f"or another that stopped the log): {unknown} is unknown until the store is "
                f"reopened (recovery decides); the store is now read-only and no compensation "
                f"ran",
                txid) from e

    def _in_doubt_again(self, undecided: Prepared | None) -> None:
        """A prepared transaction whose decision's outcome is unknown: back in the prepared
        set, in doubt (see ``durable_or_unknown``)."""
        if undecided is not None:
            with self.journal.lock:  # (the store is read-only now: its holds are moot)
                self.in_doubt[undecided.gid] = undecided.txid
                if undecided.gid not in self.prepared:
                    self.prepared.add(undecided)

    def _outcome_unknown(self, error: Exception, txid: int,
                         undecided: Prepared | None, gid: str | None = None) -> None:
        """An error that is not the log's own came out after a commit record was appended
        (``commit``): the store stops writing, CommitOutcomeUnknown (chaining ``error``).
        ``gid``: the prepared transaction the record decides, still in the prepared set."""
        self.engine.fail(error)
        self._in_doubt_again(undecided)
        if gid is not None and undecided is None:
            with self.journal.lock:
                self.in_doubt[gid] = txid
        raise CommitOutcomeUnknown(
            f"transaction {txid}'s commit record was appended, then waiting for it to be "
            f"durable failed ({type_and_message(error)}): whether it committed is "
            f"unknown until the store is reopened (recovery decides); the store is now "
            f"read-only and no compensation ran", txid) from error

    def _before_the_record(self, req: CommitRequest):
        """Phase 1's part outside the journal lock: writable, room, reads against LMDB."""
        eng = self.engine
        if eng.closed or eng.readonly or eng.failure is not None or eng.wal.failed is not None:
            eng.check_writable()  # (raises the reason; its test written out: every commit)
        mt = eng.memtable  # (``wait_for_room``'s test written out: every commit asks)
        if len(mt.events) >= mt.limit or mt.memory >= mt.max_memory:
            eng.wait_for_room()
        if req.reads:
            return self.checker.check_applied(req.txid, req.reads)
        return None

    def _append(self, req: CommitRequest, checked) -> tuple[Event, Prepared | None]:
        """Phase 1's end, under the journal lock: validate, then append the records.
        Returns the COMMIT event and, when it decides a prepared transaction, that one
        (out of the prepared set from here: no second decision can be logged; in doubt
        again if the record's fsync fails, see ``durable_or_unknown``)."""
        appended: list = []  # (the COMMIT event, once its record is in the log)
        try:
            with self.journal.lock:
                return self._append_locked(req, checked, appended)
        except Exception as e:
            if not appended or isinstance(e, CommitAppended):
                raise
            raise CommitAppended(e) from e  # (the record is in the log)

    def _append_locked(self, req: CommitRequest, checked, appended: list
                       ) -> tuple[Event, Prepared | None]:
        eng = self.engine
        # (the journal lock held: ``_append``)
        if self.gate.holder is not None:
            self.gate.wait_open()
        if eng.closed or eng.readonly or eng.failure is not None or eng.wal.failed is not None:
            eng.check_writable()  # (raises the reason; its test written out: every commit)
        if req.reads:
            self.checker.check_recent(req.txid, req.reads, checked, eng.applied_lsn)
        if req.check is not None:
            req.check()
        if req.gid is not None and req.gid not in self.prepared:
            raise UnknownGid(f"no prepared transaction with gid {req.gid!r} (it was "
                             f"just decided by another caller); nothing was committed",
                             req.gid)  # (checked before, outside this lock: a racing
            # commit_prepared logged a second COMMIT, a racing rollback_prepared's
            # decision was overturned)
        if self.prepared.by_gid:  # (something is prepared: its holds apply)
            self.prepared.check(req.txid, req.writes, req.reads, mine=req.gid)
            if self.prepared.works and ("rewound_to" in req.body
                                        or "purge_range" in req.body):
                # (a rewind or purge: the scopes the prepared work for, see check_undo)
                what = "rewind" if "rewound_to" in req.body else "purge"
                self.prepared.check_undo(req.body.get, f"the {what} (transaction {req.txid})")
        if "compensate" in req.body:  # (an undo's commit: it claims actions)
            self._check_claims(req)
        body = dict(req.body, ts=eng.clock(), meta=req.meta)
        event = self.journal.append_commit(req.txid, req.writes, body,
                                           buffered=req.gid is None)
        appended.append(event)
        return event, (None if req.gid is None else self.prepared.remove(req.gid))

    def _check_claims(self, req: CommitRequest) -> None:
        claims = req.claims
        taken = []
        for aid in claims:
            if aid in self.journal.memtable.claimed:
                taken.append(aid)
                continue
            row = self.engine.views.action_row(aid, include_unpublished=True)
            if row is not None and row.get("state") != tables.COMMITTED:
                taken.append(aid)
        if taken:
            raise ConflictError(f"transaction {req.txid} would compensate action(s) {taken}, "
                                f"which another transaction already undid; nothing was "
                                f"written", [])

    # ---- two-phase commit, phase one ----------------------------------------------------
    def prepare(self, p: Prepared, reads: ReadSet | None,
                check: Callable[[], None] | None = None) -> Event:
        """Validate and log a PREPARE (durable before return); its holds start now.
        ``check``: as CommitRequest.check."""
        eng = self.engine
        eng.check_writable()
        eng.wait_for_room()  # (a PREPARE holds its writes in the MemTable as a commit's
        # do: prepares alone grew it past both bounds, never waking the applier)
        checked = self.checker.check_applied(p.txid, reads) if reads else None
        with self.journal.lock:
            if self.gate.holder is not None:
                self.gate.wait_open()
            eng.check_writable()
            if p.gid in self.prepared or eng.views.decision(p.gid) is not None:
                raise WalstoreError(f"gid {p.gid!r} is already used in this store")
            if reads:
                self.checker.check_recent(p.txid, reads, checked, eng.applied_lsn)
            if check is not None:
                check()
            self.prepared.check(p.txid, p.writes, reads)
            with deferred():  # (the record and the hold together: an interrupt between
                # them left a PREPARE logged whose keys nothing held; Transaction.prepare
                # takes one that lands after them for "prepared")
                event = self.journal.append_prepare(p.txid, p.writes, p.body())
                self.prepared.add(p)
        try:
            eng.wake_applier()
        except Exception as e:  # (contained: the PREPARE is logged)
            eng.note_background_error(e)
        self.durable_or_unknown(self.journal.force_durable, event, p.txid,
                                f"the PREPARE of {p.gid!r}", "whether it is prepared")
        return event
