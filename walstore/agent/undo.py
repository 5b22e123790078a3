"""Undoing committed work: ``revert`` one transaction, ``rewind`` to a point.

Both work the same way: plan which committed transactions to undo, apply their keys'
values as of just before them inside a NEW transaction, commit it through the one
pipeline — its COMMIT *claims* the committed actions it undoes (``compensate``), so two
concurrent undoers of one action cannot both commit — and only then compensate those
actions, newest first (:mod:`walstore.agent.actions`).  History is kept: an undo is a
transaction like any other and can itself be reverted.

- The undo transaction reads every key it restores (and, for a rewind, the whole scope
  range) at its snapshot, so any commit racing with it makes it conflict rather than be
  silently overwritten.  A rewind also guards its scope whole (``guard_scopes``): a
  commit that writes no key there but belongs to the scope (tagged with it, or running
  an action declared in it; any commit, for an unscoped rewind) or may reach into it
  (file changes, moves of action states) conflicts too — a booking of actions alone that
  committed after the plan read the range stood, never compensated, beside a rewind that
  said the scope was as of the point.  A conflicting undo plans and commits once more with every
  other thread's commits held out (``CommitPipeline.held_out_on_conflict``): under writers
  that never pause it still finishes; the held commits wait for it, then validate as
  usual.  Compensations run after the gate opens.
- ``scope`` (a key prefix): only keys under it return to their values at the point; a
  transaction is undone wholly when it was tagged with the scope or wrote only inside
  it (an untagged undo: and moved only actions whose state lies inside it, see
  ``_wholly_in``; its written keys do not show what it reached); compensations run for
  actions of transactions undone wholly, and for actions declared in the scope — never
  for one declared in a scope apart from it (``_elsewhere``: that scope's undo takes
  it).  A later transaction with actions declared in no scope (or in one around it) that
  wrote both inside and outside the scope (not tagged with it) raises RevertConflict
  naming it.  An undo
  in the undone range that moved the state of an action lying inside the scope
  (``_state_in_scope``) is undone partly though it wrote nothing there (``_redo_marks``
  then sees its move: an unscoped rewind that refunded a charge of the scope, the charged
  key ending as it began, was passed over and a scoped rewind brought the charge back
  with no RevertConflict, no needs-redo mark).  An unscoped
  revert of transactions all tagged with one scope (a scoped rewind: the way to undo it)
  is tagged with that scope too, so the scope can be rewound past it later.
- ``rewind(keep=txids)`` leaves those transactions after the point as they are (an
  integration that knows some of its commits landed out of order: LangGraph's saves of
  the checkpoint a thread goes back to, done in the background after work of the steps
  that followed it).  A kept transaction's key that an undone one wrote before it is
  refused (RevertConflict), never put back under it.
- ``rewind(include=txids)`` undoes those transactions at or before the point too, in the
  same transaction (the store's very first commit has no position before it: LangGraph's
  background saves can make it work of a step after the checkpoint a thread goes back
  to).  The commits between the oldest of them and the point are kept, as ``keep=``
  keeps; the plan reads history from just before the oldest.
- Undoing an undo would bring back state whose external effects were compensated:
  RevertConflict naming those actions, unless ``force=True``, which marks them
  ``needs-redo`` (walstore cannot redo the outside world); undoing that one clears the
  marks again (``compensated``).  At any depth, an action ends as the state restored
  (that before the oldest undone undo naming it) says (``_redo_marks``).
- A rewind plans and writes only keys whose value changes (``_drop_unchanged``: a
  second rewind to one point finds nothing to do); a revert writes every key of what it
  undoes, one that ends as it began too.  Either way an undone transaction's ``txns``
  row learns who undid it (``undone_by``, noted by the applier): a later revert of it
  meets that undo as a later writer of all its keys (``_later_writers``), so a revert of
  W after a rewind that undid T and W cannot bring back T's refunded charge.
- A revert's ``reverts`` names what it undoes (the target and its cascade).  A rewind's
  names only the transactions after the point it changes something of (``_plan``'s
  ``_changed``): the newest writer of each key and path it restores (ending as it began
  or not: that is W above), those whose actions it claims, those whose needs-redo marks
  it moves.  One whose work an earlier undo took back already (a rewind to the point
  again) is left out: its keys were overwritten since, so a later revert of it meets
  those writers, and through them the rewind.  Listing every transaction after the
  point made the i-th rewind to one point list ~2i txids, the applier rewrite ~2i
  ``txns`` rows, and each later rewind decode all earlier lists (probe-undoperf).
- ``dry_run=True`` returns the ``UndoPlan`` and changes nothing.  It plans by the same
  code as the undo, from one read snapshot (``_PlanSnapshot``) instead of a transaction:
  no txid, no scope provider's fence, no write path, nothing logged, so it works on a
  read-only store beside a live writer (the CLI's ``rewind --dry-run`` opens read-only)
  and never conflicts with the owner's commits.  There it reads the writer's WAL tail
  too (LMDB may not hold it yet); the file history of a tail commit is not readable
  before the writer applies it: ReadOnlyError (try again).  A crashed store (no writer
  alive) is refused, NeedsRecovery: recovery may change what the undo would do.
- Files (:mod:`walstore.agent.files`): each path an undone transaction changed goes back
  to its before-image at the oldest undone version, in the undoing transaction (logged
  as its own FILE_STEPS, so the undo can itself be reverted).  A path that is no longer
  the newest undone after-image changed behind walstore's back: RevertConflict naming it
  (``paths``) unless ``force=True``, which puts the earlier version over it (the
  stranger's version is kept in the undoing transaction's steps).  A later transaction
  that changed one of the same paths is a later writer, as for keys.  In a scoped undo, a
  workspace counts as inside the scope when it was declared with ``scope=``.

Costs grow with what is undone (index lookups per transaction and key), never with the
age of the store — except that a rewind reads the ``txns`` row of every commit after its
point (no index finds a scope's commits or what an earlier rewind already undid): a
scoped one loads the actions and file changes only of the commits it takes something of
(or must refuse), so another scope's commit costs it one row (an undo's, also the rows
of the actions it moved: is one of them inside the scope?).  Its memory grows with what
it undoes: the rows are read as the plan goes (``_CommitsAfter``), the undone ones kept,
and read once more only when a key or path outside the scope goes back (who else wrote
it: ``_gather_kept_writers``).
"""
from __future__ import annotations

import contextlib
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import fileio
from ..codec import decode_key, encode_key
from ..errors import (CommitOutcomeUnknown, CompensationFailed, ConflictError,
                      HistoryTrimmed, NeedsRecovery, PointTypeError, ReadOnlyError,
                      RevertConflict, TransactionTooLarge, WalstoreError,
                      os_errors_as_store_errors, type_and_message)
from ..log.format import LSN
from ..log.writer import LogFailed
from ..log.records import jsonable_point
from ..engine import tables
from ..engine.conflicts import PreparedSet
from ..engine.snapshot import SnapshotTooOld
from ..files import Entry, RestoreStatus, restore_status
from ..files.entries import UnsupportedFileType
from ..files.apply import overrides_modes
from ..files.paths import parent_of
from .actions import Action, Saga, newest_first
from .files import FileUndo, abs_display
from .history import History
from .scope import ScopeRange, UndoReach, check_scope, reached_scope
from .txlog import TxnInfo, info_from_row

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from .files import Files
    from ..engine.transaction import Transaction


def check_keep(keep: Any, name: str = "keep") -> frozenset:
    """``rewind(keep=...)``: txids (ints) of transactions after the point to leave alone
    (``name="include"``: ``rewind(include=...)``, txids at or before it undone too)."""
    if keep is None:
        return frozenset()
    if isinstance(keep, (str, bytes, int)) or not hasattr(keep, "__iter__"):
        raise TypeError(f"{name} takes an iterable of txids (int), not {keep!r}")
    out = []
    for t in keep:
        if isinstance(t, bool) or not isinstance(t, int) or isinstance(t, LSN):
            raise TypeError(f"{name} takes txids (int), not {t!r}")
        out.append(int(t))
    return frozenset(out)


@dataclass
class UndoPlan:
    """What a revert or rewind would do (``dry_run=True``) or did."""

    txids: list = field(default_factory=list)          # undone, newest first
    keys: list = field(default_factory=list)           # user keys that change
    files: list = field(default_factory=list)          # workspace paths that change
    compensations: list = field(default_factory=list)  # Actions, newest first
    needs_redo: list = field(default_factory=list)     # action ids marked needs-redo
    unredo: list = field(default_factory=list)         # needs-redo marks undone (compensated)
    scope: Any = None
    boundary: int | None = None
    # of ``compensations``, the ids whose compensator this process has not registered: the
    # undo would leave them pending (a dry run listed them beside those that would run,
    # saying nothing of it)
    left_pending: list = field(default_factory=list)

    def empty(self) -> bool:
        """Nothing would change: no key, file, compensation or needs-redo mark."""
        return not (self.keys or self.compensations or self.needs_redo or self.files
                    or self.unredo)

    def as_dict(self) -> dict:
        return {"txids": list(self.txids), "keys": list(self.keys), "files": list(self.files),
                "compensations": [{"id": a.id, "name": a.name, "compensate": a.compensate,
                                   "txid": a.txid, "runs": a.id not in self.left_pending}
                                  for a in self.compensations],
                "left_pending": list(self.left_pending),
                "needs_redo": list(self.needs_redo), "unredo": list(self.unredo),
                "scope": self.scope,
                "boundary": self.boundary}


class Undo:
    def __init__(self, engine: "Engine", saga: Saga, history: History, begin,
                 files: "Files | None" = None) -> None:
        self.engine = engine
        self.saga = saga
        self.history = history
        self.begin = begin  # (meta) -> a new Transaction
        self.files = files
        self.fh = history.file_history

    # ---- public verbs ---------------------------------------------------------------------
    def revert(self, txid: int, cascade: bool = False, scope: Any = None,
               dry_run: bool = False, force: bool = False, meta: Any = None,
               reached: Any = None) -> TxnInfo | UndoPlan | None:
        """``reached(UndoReach)``, when given, is called once the revert planned, before
        it commits (again after each new plan): the undo watchers told what it reaches
        (``WatchedUndo.reach``); what it raises refuses the revert."""
        scope = check_scope(scope)
        if isinstance(txid, bool) or not isinstance(txid, int):
            raise PointTypeError(f"revert takes a txid (int), not {type(txid).__name__}", txid)
        if isinstance(txid, LSN):  # a log position, never taken for a txid
            raise PointTypeError(f"revert takes a txid (int), not a log position ({txid!r}); "
                                 f"the transaction committed there is in store.log() "
                                 f"(TxnInfo.txid)", txid)
        self.history.txn_info(txid)  # UnknownPoint before anything begins
        if dry_run:  # (a read: no write path, nothing to retry, see _PlanSnapshot)
            return self._dry(lambda: self._revert_once(txid, cascade, scope, True, force,
                                                       self._snapshot())[0])
        self.engine.check_writable()
        meta = meta if meta is not None else {"revert": int(txid)}
        reserved: list[str] = []  # (the claimed actions' compensations: see _commit)
        return self._run(lambda: self._revert_once(txid, cascade, scope, False, force,
                                                   self._begin_undo(meta), reserved,
                                                   reached),
                         reserved)

    def rewind(self, to: Any, scope: Any = None, dry_run: bool = False, force: bool = False,
               meta: Any = None, keep: Any = None, include: Any = None
               ) -> TxnInfo | UndoPlan | None:
        scope = check_scope(scope)
        kept = check_keep(keep)
        also = check_keep(include, "include")
        if kept & also:
            raise ValueError(f"transactions {sorted(kept & also)} are both kept and included")
        boundary = self.history.resolve(to)  # UnknownPoint/HistoryTrimmed before anything
        for txid in sorted(also | kept):  # (a kept txid that never committed: a typo
            self.history.txn_info(txid)  # kept nothing) UnknownPoint before anything
        if dry_run:  # (a read: no write path, nothing to retry, see _PlanSnapshot)
            return self._dry(lambda: self._rewind_once(to, scope, True, force,
                                                       self._snapshot(), kept, also)[0])
        self.engine.check_writable()
        # a scope a prepared transaction works for: refused before it plans (its commit's
        # check, and its empty plan's, still catch a prepare landing meanwhile).  Found
        # by the commit alone, it planned twice, the second time holding every writer out
        # (``held_out_on_conflict``), and an OpenAI session's rewind, which retries a
        # ConflictError 8 times, stalled every commit of the store 9 times over
        self._refuse_in_doubt(boundary, scope)
        meta = meta if meta is not None else {"rewind": jsonable_point(to)}
        reserved: list[str] = []  # (the claimed actions' compensations: see _commit)
        return self._run(lambda: self._rewind_once(to, scope, False, force,
                                                   self._begin_undo(meta), kept, also,
                                                   reserved), reserved)

    def _dry(self, plan) -> UndoPlan:
        """A dry run's ``plan()``, with history pinned as an undo pins it (``_run``): a
        checkpoint's trim in this process while it planned made it fail where the undo
        would not — HistoryTrimmed, or SnapshotTooOld, a ConflictError saying "this
        transaction's snapshot ... retry it" of a dry run that has no transaction.  (A
        read-only process cannot pin its writer's trims: there the trim is said as what
        it is, HistoryTrimmed, nothing changed.)"""
        eng = self.engine
        with eng.history_pins.hold(lambda: eng.state.meta_int(b"horizon")):
            try:
                with os_errors_as_store_errors():
                    made = plan()
            except SnapshotTooOld as e:
                raise HistoryTrimmed(f"the history this dry run read was trimmed while it "
                                     f"planned ({e}); nothing was changed") from e
        # the keys it would put back, held by a prepared (in-doubt) transaction: the real
        # call's commit raises ConflictError, so the dry run does (it returned a plan the
        # real call then refused — probe-audit54)
        restore = getattr(made, "_restore", None)
        rewind = isinstance(made, UndoPlan) and made.boundary is not None
        if restore or rewind:
            # (under the journal lock, as the prepared set is read everywhere: prepares
            # and decisions change it under that lock, and one landing in the check's walk
            # raised "dictionary changed size during iteration" out of the dry run —
            # audit 58)
            with (contextlib.nullcontext() if eng.readonly else eng.journal.lock):
                holds = _prepared_holds(eng)
                if restore:
                    holds.check(0, [(k, None) for k in restore], None,
                                who="this undo (a dry run: nothing was changed)")
                if rewind:  # (and a scope one works for: as the real call's commit,
                    # or its empty plan, is refused: PreparedSet.check_undo)
                    holds.check_undo({"rewound_to": made.boundary, "scope": made.scope}.get,
                                     "this rewind (a dry run)")
        if isinstance(made, UndoPlan):
            made.left_pending = [a.id for a in made.compensations
                                 if a.compensate not in self.saga.compensators]
        return made

    def _run(self, attempt, reserved: list[str]) -> TxnInfo | UndoPlan | None:
        """Plan and commit an undo; then compensate, newest first.

        First optimistically, beside other writers.  When a commit that landed while it
        planned makes it conflict (ConflictError, not RevertConflict: that one is about
        what the undo means and stays), it plans and commits once more with every other
        thread's commits held out (``CommitGate``), after what they had appended is
        published: nothing can overtake it, so an undo under continuous writers finishes
        instead of conflicting forever.  The gate opens before any compensation runs (a
        compensator is user code and may wait for other threads' commits).  The claimed
        actions' compensations stay reserved for this thread (``reserved``, taken by
        ``_commit``) until they ran, so another thread's ``retry_compensations`` cannot
        run the older ones first."""
        try:
            return self._run_reserved(attempt)
        finally:
            self.saga.release(reserved)

    def _run_reserved(self, attempt) -> TxnInfo | UndoPlan | None:
        eng = self.engine
        # history stays as it is until the compensations ran (walstore.engine.pins): a trim
        # between the plan's check and the claim's apply deleted the claimed action rows
        with eng.history_pins.hold(lambda: eng.state.meta_int(b"horizon")):
            # (an OS error reading or putting back a workspace path: a StoreIOError, the
            # undo's transaction rolled back — a bare OSError escaped: sweep-files)
            with os_errors_as_store_errors():
                try:
                    result, owed = eng.pipeline.held_out_on_conflict(attempt)
                except ReadOnlyError as e:
                    if isinstance(e, CommitOutcomeUnknown):
                        raise
                    # before the commit point: nothing of the undo was written.  It said
                    # only "turned read-only after a WAL error" (the log's own LogFailed
                    # when the flusher's fsync failed as the undo appended), and a caller
                    # could not tell whether the revert had happened
                    raise ReadOnlyError(f"the undo (revert or rewind) did not happen: "
                                        f"nothing was changed and no compensation ran "
                                        f"({e})") from e
            if owed:
                try:
                    self._compensate_committed(result, owed)
                except BaseException as e:
                    # (the undo committed all the same: an interrupt (Ctrl-C in a
                    # compensator), or an error left bare, said nothing of it, and the
                    # undo watchers took the rewind for one that changed nothing (OpenAI
                    # sessions let a turn in flight save "booked" after it had cancelled
                    # the booking: stop 75 h3)
                    if getattr(e, "undo_committed", None) is None:
                        try:
                            e.undo_committed = result  # type: ignore[attr-defined]
                        except AttributeError:  # (an exception type with __slots__:
                            pass  # its own error, never one about the attribute)
                    raise
        return result

    def _compensate_committed(self, result: Any, owed: list) -> None:
        """The compensations of the committed undo ``result`` (``_run_reserved``)."""
        try:
            self._decision_durable(result)
            self.saga.compensate(owed)
        except CompensationFailed as e:
            # the undo committed (it stands); say which transaction did it, or the
            # caller, given only the failure, could not find it (audit48); the
            # message says so too (it read as a plain compensation failure, and a
            # user could not tell whether the revert had happened at all)
            e.undo = result
            e.committed = True
            e.args = (f"{e.args[0] if e.args else e}; the undo itself COMMITTED "
                      f"(transaction {result.txid}: the state is reverted and "
                      f"stays so), only these compensations are still owed",
                      ) + tuple(e.args[1:])
            raise
        except Exception as e:
            if isinstance(e, WalstoreError):
                raise
            # not the compensators' errors (those are retried, then failed: the
            # CompensationFailed above), walstore's own while it ran them — a
            # MemoryError at a memory limit: the undo committed all the same, and
            # it escaped bare, as though the revert had failed.  What was not
            # compensated stays owed (pending: the next open runs it).  (With
            # none owed — the error after the last one was recorded — it goes on
            # as it is, as test_audit56_commitpoint expects.)
            failed = self._owed_after_commit(result, owed, e)
            if not failed.action_ids:
                raise
            raise failed from e
        self._warn_left_owed(result, owed)

    def _warn_left_owed(self, result: Any, owed: list) -> None:
        """A RuntimeWarning when the undo committed and left compensations owed because
        no compensator is registered for them: the state is undone, the outside world is
        not (yet), and the call returned as if all was done (the dry run's plan says so in
        ``left_pending``; the real call said nothing)."""
        left = [a for a in owed if isinstance(a, Action) and a.state == tables.PENDING
                and a.compensate not in self.saga.compensators]
        if not left:
            return
        import warnings
        names = sorted({a.compensate for a in left})
        ids = ", ".join(a.id for a in left[:10]) + (f", ... ({len(left)} in all)"
                                                    if len(left) > 10 else "")
        warnings.warn(
            f"the undo committed (transaction {getattr(result, 'txid', None)}) and left "
            f"{len(left)} compensation(s) owed ({ids}): no compensator is registered for "
            f"{', '.join(map(repr, names))}; the outside world is not undone until one is "
            f"registered and store.retry_compensations() runs them, or store.resolve(id) "
            f"marks each handled by hand (store.pending_compensations() lists them)",
            RuntimeWarning, stacklevel=_first_caller_outside_walstore())

    def _owed_after_commit(self, result: Any, owed: list[Action], e: Exception
                           ) -> CompensationFailed:
        """CompensationFailed for an error that stopped the committed undo's compensations
        (``_run_reserved``): the undo stands; names the actions still owed."""
        still = []
        for a in owed:
            try:
                row = self.engine.views.action_row(a.id)
            except Exception:  # noqa: BLE001 - (unreadable now: named as owed)
                row = None
            if row is None or Action.from_row(row).state in tables.OWED_STATES:
                still.append(a.id)
        failed = CompensationFailed(
            f"the undo itself COMMITTED (transaction {result.txid}: the state is reverted and "
            f"stays so), but an error ({type_and_message(e)}) stopped its compensations: "
            f"{still} are still owed (pending: the next open runs them, or "
            f"store.retry_compensations())", still)
        failed.undo = result
        failed.committed = True
        return failed

    def _decision_durable(self, result: Any) -> None:
        """The claiming COMMIT is on disk before any compensation runs (as an ABORT is):
        under durability="normal" ``commit()`` returns before its fsync, and a power loss
        in the window left the undone transaction standing in the recovered state beside a
        refund that ran (a probe: 2 images in 192).  A failed fsync: CommitOutcomeUnknown,
        nothing compensated (the next open decides)."""
        eng = self.engine
        try:
            eng.journal.force_durable(eng.wal.written_lsn)  # (at or past the COMMIT's end)
        except LogFailed as e:
            eng.fail(e)
            txid = getattr(result, "txid", None)
            raise CommitOutcomeUnknown(
                f"the fsync of the undo's commit (transaction {txid}) failed: whether it "
                f"committed is unknown until the store is reopened (recovery decides); the "
                f"store is now read-only and no compensation ran", txid) from e

    def _revert_once(self, txid: int, cascade: bool, scope: Any, dry_run: bool, force: bool,
                     tx: "Transaction | _PlanSnapshot", reserved: list[str] | None = None,
                     reached: Any = None) -> tuple[TxnInfo | UndoPlan | None, list]:
        with tx:
            target = self.history.txn_info(txid)
            fileio.fault_point("undo.resolved")
            undo = {target.txid: target}
            frontier = [target]
            # a cascade walks each key's history once, up to the undo's snapshot: a commit
            # after it that touches what the revert restores makes it conflict (and retry)
            # instead of growing the cascade for as long as other threads write
            walk = _LaterWalk(tx.snapshot)
            while frontier:
                later = self._later_writers(frontier.pop(), scope, walk)
                new = [i for i in later if i.txid not in undo]
                if new and not cascade:
                    ids = sorted({i.txid for i in later}, reverse=True)
                    undone = self._undone_already(target, later, walk)
                    if undone:
                        # (its only later writers are the undos of it: a revert run again
                        # — after a kill, a lost output — was told "later transactions
                        # [13] changed the same keys (use --cascade)", 13 being its own
                        # revert, and the cascade committed an undo of both: probe-audit67)
                        raise RevertConflict(f"transaction {target.txid} was undone already, "
                                             f"by transaction(s) {undone} (a revert or "
                                             f"rewind of it): nothing is left to revert", ids)
                    raise RevertConflict(f"transaction {target.txid} cannot be reverted alone: "
                                         f"later transactions {ids} changed the same keys or files "
                                         f"(use cascade=True to revert them too)", ids)
                for i in new:
                    undo[i.txid] = i
                    frontier.append(i)
            infos = sorted(undo.values(), key=lambda i: i.lsn, reverse=True)
            if dry_run:
                self.history.check_file_commits_readable(target.lsn, tx.snapshot)
            plan = self._plan(infos, scope, force, boundary=None,
                              snapshot=None if dry_run else tx.snapshot, dry_run=dry_run)
            if plan._files and not dry_run:  # type: ignore[attr-defined]
                # (a later commit changing files conflicts: a walstore write to a path it
                # restores, committed after the snapshot, was put back over unseen)
                tx.guard_files = True
            # (every key of the undone transactions is written, even one that ends as it
            # began: that write is what a later revert of one of them meets as a later
            # writer — dropped, `revert(W)` after a cascade had undone T and W found none
            # and brought T's refunded charge back: probe-review)
            self._check_retained(plan)
            if plan.empty():  # (it undoes nothing and returns None: a dry run says so, as
                plan.txids = []  # a rewind's does — it listed the target, e.g. one whose
                # keys were all purged or that only ran actions declaring no compensation)
            if dry_run or plan.empty():
                tx.rollback()  # (nothing to undo: e.g. its actions were compensated already)
                return (plan if dry_run else None), []
            extra: dict = {"reverts": plan.txids}
            # an unscoped revert of work that all belongs to one scope (a scoped rewind, a
            # thread's node transaction) belongs to that scope too: it restores only what
            # that work changed, so a later undo of the scope takes it wholly (untagged, its
            # writes outside the prefix made it a stranger's: RevertConflict)
            undone = set(plan.txids)  # (a list: membership in it was O(n) a test, and a
            # cascade of 46,000 transactions spent 30 s here — probe of stop 45)
            tags = {i.scope for i in infos if i.txid in undone}
            if reached is not None:  # (the on_revert undo watchers, told what it
                # reaches before it commits: register_undo_watcher)
                reached(self._reach(plan, tags, scope))
            if scope is None and len(tags) == 1 and None not in tags:
                extra["scope"] = tags.pop()
            fileio.fault_point("undo.planned")  # (tests: a commit racing the planned undo)
            return self._commit(tx, plan, extra, reserved)

    def _reach(self, plan: UndoPlan, tags: set, scope: Any) -> UndoReach:
        """What a revert's ``plan`` reaches (``UndoReach``): the scopes its undone
        transactions were begun in (``tags``), those of the actions it compensates or
        whose needs-redo marks it moves, those of the workspaces it puts files back in —
        each as far as ``scope`` lets it reach — and the keys it puts back.  Read from
        the plan alone (and the rows of its marked actions): the revert's size, not the
        store's age."""
        views = self.engine.views
        marked = (views.action_row(aid) for aid in (*plan.needs_redo, *plan.unredo))
        declared = [*tags, *(a.scope for a in plan.compensations),
                    *(Action.from_row(r).scope for r in marked if r is not None),
                    *(getattr(i.ws, "scope", None) for i in plan._files)]  # type: ignore
        scopes = dict.fromkeys(s for s in (reached_scope(d, scope) for d in declared)
                               if s is not None)
        return UndoReach(scope, scopes, plan.keys)

    def _rewind_once(self, to: Any, scope: Any, dry_run: bool, force: bool,
                     tx: "Transaction | _PlanSnapshot", kept: frozenset = frozenset(),
                     also: frozenset = frozenset(), reserved: list[str] | None = None
                     ) -> tuple[TxnInfo | UndoPlan | None, list]:
        rng = ScopeRange(scope) if scope is not None else None
        # any commit after tx's snapshot that touches the scope is a conflict (a prepared
        # transaction's keys only where the undo restores or reads them)
        tx.guard_ranges = [(rng.lo, rng.hi) if rng else (b"", None)]
        # and so is one that belongs to the scope writing no key there (actions alone: a
        # booking committed after the plan read the range stood, never compensated)
        tx.guard_scopes = [scope]
        with tx:
            boundary = self.history.resolve(to)
            fileio.fault_point("undo.resolved")  # (tests: history trimmed while it plans)
            # the commits after the point, read as the plan goes (and again, when it must
            # know who else wrote a key outside the scope it puts back): held whole, a
            # scoped rewind of one transaction held every commit after its point, ~1.3 KB
            # each (200,000 other agents' commits: 250 MB)
            infos: Any = _CommitsAfter(self.engine, boundary,
                                       tx.snapshot if dry_run else None)
            oldest = boundary
            if also:  # (include=: undone with the range; the commits between them and the
                # point are kept, so one of them that wrote what they wrote is refused)
                infos, kept, oldest = self._with_included(list(infos), also, boundary, kept)
            if dry_run:
                self.history.check_file_commits_readable(oldest, tx.snapshot)
            if kept:  # (keep=, include=: few, an integration's; their writers go first)
                infos = list(infos)
                plan = self._plan([i for i in infos if i.txid not in kept], scope, force,
                                  boundary, [i for i in infos if i.txid in kept],
                                  snapshot=None if dry_run else tx.snapshot,
                                  dry_run=dry_run)
            else:
                plan = self._plan(infos, scope, force, boundary,
                                  snapshot=None if dry_run else tx.snapshot,
                                  dry_run=dry_run)
            plan._oldest = oldest  # type: ignore[attr-defined]
            # (the transactions it changes something of, not every one after the point:
            # what an earlier undo took back already is not listed again: see _plan)
            plan.txids = [t for t in plan.txids if t in plan._changed]  # type: ignore
            self._drop_unchanged(tx, plan)
            self._check_retained(plan)
            if plan.empty():  # (its keys all end as they began: it undoes nothing, and
                plan.txids = []  # a dry run says so — it listed a rewind's own undo)
                if not dry_run:  # (nothing to commit, so no commit's check: a prepared
                    # transaction working for the scope would commit after this "the
                    # scope is as of the point" and stand; refused here instead)
                    self._refuse_in_doubt(boundary, scope)
            if dry_run or plan.empty():
                tx.rollback()  # (nothing would change: the state is already as of the point)
                return (plan if dry_run else None), []
            fileio.fault_point("undo.planned")  # (tests: a commit racing the planned undo)
            return self._commit(tx, plan, {"rewound_to": boundary, "reverts": plan.txids},
                                reserved)

    def _refuse_in_doubt(self, boundary: int, scope: Any) -> None:
        """ConflictError when a prepared (in-doubt) transaction works for a scope a rewind
        of ``scope`` to ``boundary`` reaches into (``PreparedSet.check_undo``, which the
        commit of a rewind that changes something asks, under the journal lock too)."""
        eng = self.engine
        if eng.prepared.works:
            with eng.journal.lock:
                eng.prepared.check_undo({"rewound_to": boundary, "scope": scope}.get,
                                        "this rewind")

    def _with_included(self, infos: list[TxnInfo], also: frozenset, boundary: int,
                       kept: frozenset) -> tuple[list[TxnInfo], frozenset, int]:
        """``rewind(include=)``: the commits after the point (``infos``, newest first)
        with the included ones at or before it, and every commit between the oldest of
        those and the point as kept (``_plan``'s ``kept``: one that wrote a key or path an
        included one wrote is refused, RevertConflict, never put back under it); and the
        kept txids with those, and the oldest LSN the plan reads history from (just
        before the oldest included: ``_check_retained`` holds it against the horizon)."""
        after = {i.txid for i in infos}
        extra = [self.history.txn_info(t) for t in sorted(also) if t not in after]
        if not extra:
            return infos, kept, boundary
        purges = [i.txid for i in extra if "purge" in i.extra]
        if purges:  # (as a revert naming one: a rewind's range passes over them)
            raise RevertConflict(f"transactions {purges} are purges: what they erased cannot "
                                 f"come back", purges)
        oldest = min(i.lsn for i in extra)
        between = [info for info in map(info_from_row, self.engine.views.commits_after(oldest))
                   if info.lsn <= boundary and info.txid not in also]
        merged = sorted([*infos, *extra, *between], key=lambda i: i.lsn, reverse=True)
        return merged, kept | {i.txid for i in between}, max(oldest - 1, 0)

    def _begin_undo(self, meta: Any) -> "Transaction":
        """The undoing transaction: its snapshot first, then every commit up to it applied
        (the history indexes the plan reads hold them all); anything committed later that
        touches what it restores makes it conflict."""
        tx = self.begin(meta)
        _ = tx.snapshot
        self.engine.drain()
        return tx

    def _snapshot(self) -> "_PlanSnapshot":
        """A dry run's read snapshot, taken as ``_begin_undo`` takes the undo's (on a
        read-only store ``drain`` takes in the writer's WAL tail).  A crashed store with no
        writer alive: NeedsRecovery (recovery may change what the undo would do)."""
        eng = self.engine
        eng.check_open()
        if eng.readonly and eng.needs_recovery() and not eng.writer_alive():
            raise NeedsRecovery(f"store {eng.path} was not shut down cleanly: recovery may "
                                f"change what an undo would do; run `walstore recover "
                                f"{eng.path}` first (nothing was changed)")
        snap = _PlanSnapshot(eng)
        eng.drain()
        return snap

    # ---- planning -----------------------------------------------------------------------
    def _undone_already(self, target: TxnInfo, later: list[TxnInfo], walk: "_LaterWalk"
                        ) -> list[int]:
        """The undos that took ``target`` back wholly (unscoped, or scoped around all of
        it), when its later writers are those undos and what they took back with it (a
        rewind, a cascade: a later W too); else [] (then it stands, or stands in part).
        (A scoped undo's alone made a revert of a transaction that wrote outside the
        scope say "undone already ... nothing is left to revert", its keys outside
        still standing; one that undid W with it was told "use cascade": audit67 review.)"""
        views = self.engine.views
        undos = views.undoers_of(target.txid, target.extra)
        whole = set()
        for txid in undos:
            u = walk.info(txid, self.history.txn_info)
            if u.scope is None or self._wholly_in(target, ScopeRange(u.scope)):
                whole.add(txid)
        if not whole or not all(i.txid in undos or views.undoers_of(i.txid, i.extra) & whole
                                for i in later):
            return []
        return sorted(whole)

    def _later_writers(self, info: TxnInfo, scope: Any, walk: "_LaterWalk") -> list[TxnInfo]:
        """Transactions after ``info``, up to ``walk``'s snapshot, that wrote one of its
        keys (in the scope).  A key's history already walked from an earlier LSN is not
        walked again (what it holds was returned then), so a cascade costs what it
        undoes, not its square."""
        rng = ScopeRange(scope) if scope is not None else None
        out: dict[int, TxnInfo] = {}
        st = self.engine.state
        whole = rng is None or self._wholly_in(info, rng)

        def note(txid: int) -> None:
            if txid != info.txid and txid not in out:
                got = walk.info(txid, self.history.txn_info)
                if got.lsn < walk.upto:  # (the snapshot is an end: a commit AT it is later)
                    out[txid] = got

        for key in info.keys:
            k = encode_key(key)
            if not whole and not rng.contains(k):
                continue  # (a key the scoped undo leaves alone)
            span = walk.span(k, info.lsn + 1)
            if span is None:
                continue
            # the MemTable's first (a read-only store: the writer's WAL tail, not in LMDB
            # yet; a writer drained its own), then LMDB's: each version seen at least once
            for v in self.history.unapplied_versions(k, span[1]):
                if span[0] <= v.lsn < span[1]:
                    note(v.txid)
            prefix = tables.hist_prefix(k)
            for raw, _row in st.scan(tables.hist_key(k, span[0]), tables.hist_key(k, span[1]),
                                     db="hist"):
                if tables.is_version_of(raw, prefix):
                    note(tables.unpack_row(_row, "hist", raw, st.data_file)[0])
        if self.fh is not None:  # and the later writers of its files (in the scope)
            for txid in self.fh.later_writers(info.txid, info.lsn, self._ws_filter(rng)):
                note(txid)
        # and the undos that undid it: later writers of all its keys, though they wrote
        # none of those that ended as they began (a rewind drops them: a revert of W after
        # a rewind that undid T and W found no later writer and brought T's refunded
        # charge back)
        if info.keys or self._paths(info):
            for txid in self.engine.views.undoers_of(info.txid, info.extra):
                # (a scoped undo: only an undo that reached into its range — another
                # scope's rewind undid none of what this one restores; and nothing left to
                # guard, its keys purged: none)
                if whole or rng is None or self._reached(walk.info(txid, self.history
                                                                   .txn_info), rng):
                    note(txid)
        return list(out.values())

    @staticmethod
    def _reached(undo: TxnInfo, rng: ScopeRange) -> bool:
        """Could ``undo`` (a revert or rewind) have undone something inside ``rng``: it was
        not scoped, or its scope and ``rng`` overlap."""
        scope = undo.scope
        return scope is None or rng.same(scope) or _around(scope, rng.scope)

    def _wholly_in(self, info: TxnInfo, rng: ScopeRange, paths: list | None = None,
                   inside: dict | None = None) -> bool:
        """Is ``info`` undone wholly by an undo scoped to ``rng``: tagged with the scope,
        or untagged with every key and path inside it — and, an undo, with every action
        it moved (``compensate``, ``redo``, ``unredo``) lying inside it too
        (``_state_in_scope``, noted in ``inside``).  A transaction that wrote nothing
        (it only ran actions) belongs to a scope only by its tag: otherwise "all its
        writes inside" would be true of every agent's action-only transactions, and a
        scoped undo would compensate other agents' actions.

        An undo's keys do not show all it reached: an unscoped rewind writes only the
        keys whose value changes, so one that refunded another scope's charge (its key
        ending as it began) may have written keys of this scope alone.  Taken wholly, a
        scoped undo of it moved that other scope's mark (a "b/" revert marked an "a/"
        action needs-redo, or refused naming it, and — tagged "b/" — a later "b/" rewind
        took that move wholly and cleared the mark while the charged key stayed:
        fix-seed128, the undo model checker's seed 128).  Taken partly, ``_redo_marks``
        moves only the marks inside the scope.  (A moved action whose transaction's
        history was trimmed: HistoryTrimmed, as ``_state_in_scope`` says.)"""
        if rng.same(info.scope):
            return True
        if info.scope is not None:
            return False  # another agent's (its in-scope keys still go back, see _plan)
        keys = [encode_key(k) for k in info.keys]
        if paths is None:
            paths = self._paths(info)
        if not keys and not paths:
            return False
        in_scope = self._ws_filter(rng)
        if not (all(rng.contains(k) for k in keys) and all(in_scope(p[0]) for p in paths)):
            return False
        if inside is None:
            inside = {}
        # (a commit that moved nothing: no row read)
        return all(self._inside(aid, rng, inside) for aid, _charged in _moves(info))

    def _paths(self, info: TxnInfo) -> list:
        """(workspace root, path) of every path ``info`` changed.  Only a commit whose
        row lists live file effects (``files``) has any (the applier writes ``fchanges``
        rows from those alone), so no other commit's file history is read."""
        if self.fh is None or not info.extra.get("files"):
            return []
        return self.fh.changes_of(info.txid)

    def _ws_filter(self, rng: ScopeRange | None):
        """Is a workspace (root) inside the scope?  (Declared with ``scope=``.)"""
        if rng is None:
            return lambda root: True
        return lambda root: rng.same(self.files.scope_of(root))

    def _plan(self, infos: list[TxnInfo], scope: Any, force: bool,
              boundary: int | None, kept: list[TxnInfo] = (),
              snapshot: int | None = None, dry_run: bool = False) -> UndoPlan:
        """Which keys go back, which actions are compensated, what conflicts.

        Each transaction is judged from its ``txns`` row first (scope tag, keys, whether
        it changed files, the scopes its actions were declared in); its file changes are
        read only when the row says it has some, and its actions' current rows only when
        the undo takes something of it (or must know whether it ran actions it cannot
        take partly): another scope's commits cost a scoped undo one row each (an undo's
        commit also the rows of the actions whose state it moved, ``_moves_in_scope``: one
        inside the scope makes it undone partly, its move taken by ``_redo_marks``).

        ``plan._changed``: the transactions the undo changes something of — the newest
        undone writer of each key and path it restores (whether or not the value ends as
        it began: a later revert of that writer meets the undo through ``undone_by``),
        those whose actions it compensates, and those whose needs-redo marks it moves
        (the action's own when it is undone, else the undone undo whose move decides the
        mark).  A rewind lists only these in ``reverts`` (``_rewind_once``).

        ``kept``: transactions after the point a rewind was told to leave as they are
        (``keep=``): passed over like another scope's, their keys and paths counted as
        kept writers, so an undone transaction's key one of them wrote later is refused
        (RevertConflict) rather than put back under it."""
        rng = ScopeRange(scope) if scope is not None else None
        plan = UndoPlan(scope=scope, boundary=boundary)
        restore: dict[bytes, int] = {}  # key -> LSN just before the oldest undone writer
        file_lsns: dict[tuple, list] = {}  # (workspace, path) -> commit LSNs, newest first
        newest: dict[tuple, int] = {}  # key or path -> txid of its newest undone writer
        in_scope = self._ws_filter(rng)
        mixed_with_actions = []
        undone_txids = set()
        partly: set[int] = set()  # undone only inside the scope (not wholly)
        kept_writers: dict[bytes, list[tuple[int, int]]] = {}  # key -> (lsn, txid) not undone
        kept_path_writers: dict[tuple, list[tuple[int, int]]] = {}  # the same for paths
        in_range_actions: set[str] = set()
        inside: dict[str, bool] = {}  # action id -> its state lies inside the scope
        # the undone ones alone are kept, newest first (every commit after a scoped
        # rewind's point was held, each TxnInfo, for a plan that took one of them)
        undone_infos: list[TxnInfo] = []
        for info in kept:
            for k in info.keys:
                kept_writers.setdefault(encode_key(k), []).append((info.lsn, info.txid))
            for p in self._paths(info):
                kept_path_writers.setdefault(p, []).append((info.lsn, info.txid))
        for info in infos:  # newest first
            if "purge" in info.extra:
                if boundary is None:  # a revert names it: refuse; a rewind passes over it
                    raise RevertConflict(f"transaction {info.txid} is a purge: what it erased "
                                         f"cannot come back", [info.txid])
                continue
            keys = [encode_key(k) for k in info.keys]
            paths = self._paths(info)
            paths_in = paths if rng is None else [p for p in paths if in_scope(p[0])]
            whole = rng is None or self._wholly_in(info, rng, paths, inside)
            mine = keys if whole else [k for k in keys if rng.contains(k)]
            # (its keys and paths outside the scope, when it is not undone wholly, are
            # another's work a wholly undone one must not be put back over: gathered
            # after this pass, for the keys and paths that need it — gathered here, a
            # scoped rewind held every such write of every commit after its point)
            mine_paths = paths if whole else paths_in
            if rng is not None:  # (actions of the undone range declared in the scope; an
                # action's scope is fixed when it is logged: the row's is its current one)
                declared_ids = [a["id"] for a in info.actions if rng.same(a.get("scope"))]
                in_range_actions.update(declared_ids)
                if (not whole and not mine and not mine_paths and not declared_ids
                        and not self._moves_in_scope(info, rng, inside)):
                    continue  # (another scope's: nothing of it is taken, nothing loaded)
            rows = [self._current_row(a) for a in info.actions]
            current = [Action.from_row(r) for r in rows]
            # (one whose ACTION_INTENT was lost to damage has no known compensator, but it
            # ran: undone, it is owed, listed pending — skipped as "declaring none", a
            # revert undid its transaction's writes and left the charge committed, unowed)
            committed = [a for a, r in zip(current, rows) if a.state == tables.COMMITTED
                         and not tables.declares_no_compensation(r)]
            if rng is not None:
                # an action declared in another scope is that scope's (another agent's
                # booking): a scoped undo neither compensates it, even of a transaction
                # it takes wholly, nor counts it as ownerless — a rewind of "a/" refunded
                # a charge declared in "b/", and a transaction that declared each of its
                # actions (one "a/", one "b/") and wrote both sides was refused as
                # running "actions that were not declared in it"
                # (a scope around this one, "a/" for "a/sub/", is not another: its
                # actions are taken as before — refused when the undo is partial)
                committed = [a for a in committed if not _elsewhere(a.scope, rng)]
            if whole:
                undone_txids.add(info.txid)
                plan.compensations += committed
            else:
                declared = [a for a in committed if rng.same(a.scope)]
                plan.compensations += declared
                if (mine or mine_paths) and len(declared) < len(committed):
                    mixed_with_actions.append(info.txid)
                if (not mine and not declared and not mine_paths
                        and not self._moves_in_scope(info, rng, inside)):
                    continue
                # (an undo that moved the state of an action inside the scope is undone
                # partly too, though it wrote nothing there — a rewind whose scoped key
                # ended as it began, so it did not write it: skipped, its compensation
                # move went unseen and a scoped rewind brought the refunded charge back,
                # no RevertConflict, no needs-redo mark: review-undo)
                undone_txids.add(info.txid)
                partly.add(info.txid)
            undone_infos.append(info)
            for k in mine:
                restore[k] = info.lsn  # newest first: ends at the oldest writer's LSN
                newest.setdefault((0, k), info.txid)
            for p in mine_paths:
                file_lsns.setdefault(p, []).append(info.lsn)
                newest.setdefault((1, p), info.txid)
        if rng is not None:
            self._gather_kept_writers(infos, rng, in_scope, restore, file_lsns,
                                      undone_txids, partly, kept_writers, kept_path_writers)
        if mixed_with_actions:
            raise RevertConflict(f"transactions {mixed_with_actions} wrote both inside and "
                                 f"outside scope {scope!r} and ran actions declared in no "
                                 f"scope (or in one around it); they cannot be undone "
                                 f"partly",
                                 mixed_with_actions)
        # a key outside the scope that an undone transaction wrote (it was the scope's
        # wholly) and a later transaction the undo keeps wrote after it: putting it back
        # would overwrite that other agent's work — refused, as a revert's later writer
        # (and the same for a path outside the scope's workspaces: even forced, an undo
        # never puts a path back over another transaction's committed change)
        oldest_path = {p: min(lsns) for p, lsns in file_lsns.items()}
        overwritten = sorted({t for k, lsn in restore.items()
                              for w_lsn, t in kept_writers.get(k, ()) if w_lsn > lsn}
                             | {t for p, lsn in oldest_path.items()
                                for w_lsn, t in kept_path_writers.get(p, ()) if w_lsn > lsn},
                             reverse=True)
        if overwritten:
            keys_hit = sorted({decode_key(k) for k, lsn in restore.items()
                               if any(w > lsn for w, _t in kept_writers.get(k, ()))}, key=repr)
            keys_hit += sorted(abs_display(p[0], p[1]) for p, lsn in oldest_path.items()
                               if any(w > lsn for w, _t in kept_path_writers.get(p, ())))
            where = ("kept" if scope is None else f"kept or outside scope {scope!r}"
                     if kept else f"outside scope {scope!r}")
            raise RevertConflict(f"later transactions {overwritten} ({where}) "
                                 f"changed {keys_hit}, which the undone transactions also "
                                 f"wrote; putting them back would overwrite that work "
                                 f"(nothing was changed)", overwritten)
        plan.txids = [i.txid for i in undone_infos]
        plan.compensations.sort(key=newest_first)
        movers: dict[str, int] = {}
        recharged: list[str] = []  # (needs-redo actions redone by hand: compensated)
        plan.needs_redo, plan.unredo = self._redo_marks(undone_infos, undone_txids, force,
                                                        in_range_actions, rng, partly,
                                                        movers, inside, recharged)
        changed = set(newest.values()) | {a.txid for a in plan.compensations}
        if recharged:
            have = {a.id for a in plan.compensations}
            plan.compensations += [Action.from_row(self.engine.views.action_row(aid))
                                   for aid in recharged if aid not in have]
            plan.compensations.sort(key=newest_first)
            changed.update(movers[aid] for aid in recharged)
        for aid in (*plan.needs_redo, *plan.unredo):
            own = int(aid.partition(".")[0])  # the action's transaction, when undone; else
            changed.add(own if own in undone_txids else movers[aid])  # the deciding undo
        if boundary is not None:
            # (and those it undoes wholly that no undo had taken back before — not undos
            # themselves: the rest, another undo's work, is left out as before.  One whose
            # keys later undone ones all overwrote was left out too, and a later revert of
            # it said "later transactions changed the same keys (use cascade)" though the
            # rewind had undone it: audit 68)
            views = self.engine.views
            changed.update(i.txid for i in undone_infos
                           if i.txid not in partly and "reverts" not in i.extra
                           and not views.undoers_of(i.txid, i.extra))
        plan._changed = changed  # type: ignore[attr-defined]
        plan.keys = sorted((decode_key(k) for k in restore), key=repr)
        plan._restore = restore  # type: ignore[attr-defined]
        plan._files = self._plan_files(file_lsns, force, snapshot,  # type: ignore[attr-defined]
                                       dry_run)
        plan._force = force  # type: ignore[attr-defined]
        # the oldest history the plan reads: the point, or just before the oldest undone
        plan._oldest = boundary if boundary is not None else min(  # type: ignore[attr-defined]
            (i.lsn for i in infos), default=None)
        plan.files = sorted(abs_display(i.ws.root_b, i.path) for i in plan._files
                            if not i.passage)
        return plan

    def _gather_kept_writers(self, infos: Any, rng: ScopeRange, in_scope: Any,
                             restore: dict, file_lsns: dict, undone: set, partly: set,
                             kept_writers: dict, kept_path_writers: dict) -> None:
        """The writers, not undone wholly, of the keys and paths outside the scope that
        the plan puts back (a transaction it undoes wholly, tagged with the scope, wrote
        them): a second pass over ``infos`` (iterable again), only when there are such
        keys or paths."""
        keys = {k for k in restore if not rng.contains(k)}
        paths = {p for p in file_lsns if not in_scope(p[0])}
        if not keys and not paths:
            return
        for info in infos:
            if "purge" in info.extra or (info.txid in undone and info.txid not in partly):
                continue  # (a purge wrote nothing back; a whole one is undone)
            for k in info.keys:
                k = encode_key(k)
                if k in keys:
                    kept_writers.setdefault(k, []).append((info.lsn, info.txid))
            if paths:
                for p in self._paths(info):
                    if p in paths:
                        kept_path_writers.setdefault(p, []).append((info.lsn, info.txid))

    def _plan_files(self, file_lsns: dict, force: bool, snapshot: int | None = None,
                    dry_run: bool = False) -> list:
        """Per path: back to its before-image at the oldest undone version; it must still
        be the after-image of the newest undone one (else it changed behind walstore's
        back: RevertConflict naming it, unless ``force``).  Paths already there drop out.
        A commit that changed files after the undo's ``snapshot`` may be what changed it
        (a later writer the plan did not see, not a stranger): ConflictError, and the undo
        plans again after it (``_run``).  What a dropped transaction left on a path is
        put back before the path is compared (``Files.put_back_dropped``; a dry run,
        changing nothing, compares what the put-back would leave there instead:
        ``Files.dropped_before``)."""
        if not file_lsns:
            return []
        items, conflicts = [], []
        passages: list = []  # (read-only directories already back: see below)
        stamps: dict[int, int | None] = {}

        def since(txid: int, root: bytes, path: bytes) -> int | None:
            """When ``txid``'s change of ``path`` began (ns), kept with its commit; else
            its commit time, no earlier than the change: an ignored path older than it
            predates the change (``FileUndo.since_ns``)."""
            began = self.fh.began(txid, root, path)
            if began is not None:
                return began
            if txid not in stamps:
                ts = self.history.txn_info(txid).timestamp
                stamps[txid] = int(ts * 1e9) if ts else None
            return stamps[txid]

        for (root, path), lsns in file_lsns.items():
            newest = self.fh.version(root, path, lsns[0])
            oldest = self.fh.version(root, path, lsns[-1])
            if newest is None or oldest is None:
                continue
            self.files.check_unclaimed(root, path)  # an open or prepared txn's: refused
            dropped = self.files.put_back_dropped(root, path, dry_run)
            ws = self.files.registered(root)
            current = None
            if dropped and dry_run:  # (the real undo puts the dropped bytes back first:
                # the path is judged as it will hold then — judged by the dropped bytes,
                # the plan listed what the real undo found done, or missed its conflict)
                current = self.files.dropped_before(root, path)
                if current is None:  # (a parent's change only: kept, as the undo will)
                    items.append(FileUndo(ws, path, oldest.before, newest.after,
                                          since(oldest.txid, root, path)))
                    continue
            try:
                status = restore_status(ws, path, oldest.before, newest.after,
                                        current=current)
            except UnsupportedFileType:
                # a FIFO, socket or device there now: no state walstore left (its
                # manifests skip them), so changed behind its back (it escaped as
                # UnsupportedFileType, forced or not)
                status = RestoreStatus("conflict", Entry.absent())
            # and again after the read: bytes another undo (or a transaction) wrote in
            # place after the first check are its own, claimed before they were written
            # (read as the path's state, a path taken for done stayed as it was when that
            # other one rolled back)
            self.files.check_unclaimed(root, path)
            if status.state == "done":
                if status.current.is_dir and status.current.mode & 0o300 != 0o300:
                    passages.append(FileUndo(ws, path, oldest.before, newest.after,
                                             since(oldest.txid, root, path), passage=True))
                continue
            if status.state == "conflict":
                conflicts.append(abs_display(root, path))
                if not force:
                    continue
            items.append(FileUndo(ws, path, oldest.before, newest.after,
                                  since(oldest.txid, root, path)))
        for item in _under_a_stranger(items):
            conflicts.append(abs_display(item.ws.root_b, item.path))
            if not force:
                items.remove(item)
        if not force:  # (forced, what others put there goes too: _strangers_under)
            for item in _holding_strangers(items):
                conflicts.append(abs_display(item.ws.root_b, item.path))
                items.remove(item)
        # A directory the undone transaction opened, changed things in and made read-only
        # again (``chmod u+w d; write d/g; chmod u-w d``) is back in its mode already, so
        # no step named it, and without CAP_DAC_OVERRIDE the undo could not remove d/g
        # (PermissionError, audit 58): kept as a passage, opened first, closed last.
        if items and passages and not overrides_modes():  # (root passes them by)
            under = {(i.ws.root_b, parent_of(i.path)) for i in items if i.path}
            for (r, p) in list(under):
                while p:
                    p = parent_of(p)
                    under.add((r, p))
            items += [d for d in passages if (d.ws.root_b, d.path) in under]
        if conflicts and not force:
            self._conflict_if_files_changed_since(snapshot)
            raise RevertConflict(f"file(s) changed behind walstore's back since the undone "
                                 f"transaction(s): {sorted(conflicts)}; use force=True to put "
                                 f"back their earlier version anyway",
                                 paths=sorted(conflicts))
        return items

    def _conflict_if_files_changed_since(self, snapshot: int | None) -> None:
        """ConflictError when a commit at or after ``snapshot`` changed files (the
        undo's own planning missed it: ``_later_writers`` reads up to the snapshot)."""
        if snapshot is None:
            return
        for row in self.engine.views.commits_after(snapshot - 1):
            if row.get("files"):
                raise ConflictError(f"transaction {row.get('tx')} changed files after this "
                                    f"undo began planning; nothing was changed", [])

    def _redo_marks(self, infos: list[TxnInfo], undone: set, force: bool,
                    in_range: set = frozenset(), rng: ScopeRange | None = None,
                    partly: set = frozenset(), movers: dict | None = None,
                    inside: dict | None = None, recharged: list | None = None
                    ) -> tuple[list[str], list[str]]:
        """The needs-redo marks an undo makes and clears: ``(needs_redo, unredo)``.

        Each undone undo moved the state of the actions it names: ``compensate`` and
        ``unredo`` took their charged state away (the world was, or stays, compensated),
        ``redo`` brought it back.  Undoing a run of them leaves each action's state as it
        was before the OLDEST undone one (the keys go back there too), whatever the
        chain's length — a revert of a revert of a revert..., a cascade, a rewind over
        part of the chain:

        - that was the charged state, and the action's own transaction stays (it is not
          undone too, nor declared in the scope of a scoped undo covering it): the state
          comes back while the world stays compensated — RevertConflict naming it unless
          ``force``, which marks it ``needs-redo``; an action already ``needs-redo``
          stays so (nothing new is brought back); one whose compensation is still owed
          is refused (a refund about to run cannot be told from one that never will);
        - else the state is the compensated one: an action marked ``needs-redo`` is
          ``compensated`` again (a mark left behind would tell an operator to redo what
          the state says is undone).

        A scoped undo takes an undo it undoes only ``partly`` (its keys inside the scope,
        or nothing but its moves of actions inside it: ``_moves_in_scope``) as a move of
        only the actions whose state lies inside the scope (``_state_in_scope``): the
        others' keys stay as they are, and so do their marks (moved, a scoped undo cleared
        a needs-redo mark while the charged keys outside the scope stayed, or refused, or
        marked needs-redo, an action it brought nothing of back: probe-undo)."""
        back: dict[str, bool] = {}  # action id -> its charged state before the oldest move
        if inside is None:  # action id -> its state lies inside the scope (_plan's, shared)
            inside = {}
        for info in infos:  # newest first: the oldest undone move is seen last and wins
            if info.txid not in undone:
                continue
            for aid, charged in _moves(info):
                if info.txid in partly and not self._inside(aid, rng, inside):
                    continue
                back[aid] = charged
                if movers is not None:  # (the undone undo whose move decides the mark)
                    movers[aid] = info.txid
        ids, owed, unredo = [], [], []
        recharge = [] if recharged is None else recharged
        for aid, charged in back.items():
            row = self.engine.views.action_row(aid) or {}
            state = row.get("state")
            if charged and int(aid.partition(".")[0]) not in undone and aid not in in_range:
                if state in tables.OWED_STATES:
                    owed.append(aid)
                elif state not in (tables.NEEDS_REDO, tables.COMMITTED):
                    ids.append(aid)  # (committed: a needs-redo one redone by hand —
                    # the charged state comes back to a charged world, nothing to do)
            elif state == tables.NEEDS_REDO:
                unredo.append(aid)
            elif state == tables.COMMITTED and row.get("compensate"):
                # a needs-redo action redone by hand (``Saga.resolve``): the world is
                # charged again, and this undo takes the charged state away — it owes
                # its compensation, as a revert of its own transaction would (left
                # alone, the state read uncharged beside a charge standing)
                recharge.append(aid)
        if owed:  # its compensation has not run: undoing the claim now could not tell a
            # refund about to run from one that never will; let it run (or resolve it)
            raise RevertConflict(f"the compensation of action(s) {owed} that this would "
                                 f"bring back is still owed (not run yet): let it run (a "
                                 f"compensator, `walstore recover --handlers`) or "
                                 f"`store.resolve` it first; nothing was changed",
                                 actions=owed)
        if ids and not force:
            raise RevertConflict(f"undoing this brings back the state of action(s) {ids}, "
                                 f"which were compensated and cannot be redone by walstore; "
                                 f"use force=True to undo anyway and mark them 'needs-redo'",
                                 actions=ids)
        return ids, unredo

    def _moves_in_scope(self, info: TxnInfo, rng: ScopeRange, inside: dict) -> bool:
        """Does ``info`` (an undo) move the state of an action whose state lies inside
        ``rng`` (``_state_in_scope``, noted in ``inside``)?  A scoped undo takes such an
        undo partly even when it wrote nothing in the scope, so ``_redo_marks`` sees the
        move.  A commit that moved nothing costs nothing here."""
        return any(self._inside(aid, rng, inside) for aid, _charged in _moves(info))

    def _inside(self, aid: str, rng: ScopeRange, inside: dict) -> bool:
        """``_state_in_scope`` of ``aid``, asked once per plan (``inside``: its answers)."""
        if aid not in inside:
            inside[aid] = self._state_in_scope(aid, rng)
        return inside[aid]

    def _state_in_scope(self, aid: str, rng: ScopeRange) -> bool:
        """Does the state of action ``aid`` lie inside ``rng``: declared in that scope, or
        (undeclared) its transaction tagged with it, or untagged with a key inside it (a
        transaction whose keys lie both sides counts as inside: the charged state comes
        back in part, so RevertConflict asks).  Its transaction's history trimmed: which
        keys hold its state is not known any more, so the undo refuses (HistoryTrimmed,
        nothing changed; an unscoped undo needs no answer) — taken as inside, it was
        refused as bringing the charge back, or forced marked needs-redo, with nothing of
        it brought back (probe-review)."""
        row = self.engine.views.action_row(aid) or {}
        if row.get("scope") is not None:
            return rng.same(row["scope"])
        txid = int(aid.partition(".")[0])
        try:
            info = self.history.txn_info(txid)
        except (KeyError, HistoryTrimmed, ValueError) as e:
            raise HistoryTrimmed(
                f"this scoped undo may move the needs-redo mark of action {aid}, but the "
                f"history of its transaction {txid} was trimmed (retention): whether its "
                f"state lies in scope {rng.scope!r} is not known; nothing was changed (an "
                f"unscoped undo does not need to know)") from e
        if info.scope is not None:
            return rng.same(info.scope)
        return any(rng.contains(encode_key(k)) for k in info.keys)

    def _drop_unchanged(self, tx: "Transaction", plan: UndoPlan) -> None:
        """Keep in the plan only the keys whose value would really change (a second
        rewind to one point finds nothing to do).  A key left out that ends as it began
        is still guarded: a later revert of one of the transactions the rewind undid
        meets the rewind as a later writer through ``undone_by`` (``_later_writers``).
        (Written instead, as for a while, another thread's transaction that read it
        conflicted, and reverting a scoped rewind cascaded into other agents' work:
        probe-langgraph.)"""
        restore = plan._restore  # type: ignore[attr-defined]
        reader = self.engine.reader
        for k, lsn in list(restore.items()):
            if reader.as_of(k, lsn) == reader.as_of(k, tx.snapshot):
                tx.read_keys.add(k)  # still read: a change to it meanwhile is a conflict
                del restore[k]
        plan.keys = sorted((decode_key(k) for k in restore), key=repr)

    def _check_retained(self, plan: UndoPlan) -> None:
        """HistoryTrimmed unless the history the plan read is still retained.  The plan
        reads live history rows (the commits after the point, before-images); a checkpoint
        in another thread may trim them meanwhile, and a row trimmed away is simply not
        found, so the plan would undo part of the range and restore values the store
        never had at the point.  Retention records its horizon before deleting any row,
        so a horizon still at or below the oldest LSN read means nothing read was
        trimmed; past it, the undo raises and changes nothing (its transaction rolls
        back, files included)."""
        oldest = getattr(plan, "_oldest", None)
        if oldest is None:
            return
        horizon = self.engine.state.meta_int(b"horizon")
        if horizon and horizon > oldest:  # (0: nothing trimmed)
            raise HistoryTrimmed(f"the history this undo read (from LSN {oldest}) was trimmed "
                                 f"while it planned (horizon LSN {horizon}); nothing was "
                                 f"changed")

    def _current_row(self, row: dict) -> dict:
        return self.engine.views.action_row(row["id"]) or row

    # ---- doing --------------------------------------------------------------------------
    def _commit(self, tx: "Transaction", plan: UndoPlan, extra: dict,
                reserved: list[str] | None = None) -> tuple[TxnInfo, list[Action]]:
        """Commit the undoing transaction; returns its TxnInfo and the actions it claimed,
        still owed their compensations (the caller runs them, outside the gate).  Their
        compensations are reserved for this thread (into ``reserved``) before the COMMIT
        makes them owed; an attempt that does not commit lets them go again."""
        restore = plan._restore  # type: ignore[attr-defined]
        reader = self.engine.reader
        try:
            tx.read_keys.update(restore)
            # (each key's value just before the oldest undoer)
            tx.write_stored((k, reader.as_of(k, lsn)) for k, lsn in restore.items())
        except TransactionTooLarge as e:
            raise TransactionTooLarge(
                f"this undo restores {len(restore):,} keys, more than one transaction may "
                f"write ({e}); nothing was undone: undo fewer transactions at a time") from e
        body = dict(extra)
        if plan.compensations:
            body["compensate"] = [a.id for a in plan.compensations]
        if plan.needs_redo:
            body["redo"] = list(plan.needs_redo)
        if plan.unredo:
            body["unredo"] = list(plan.unredo)
        if plan.scope is not None:
            body["scope"] = plan.scope
        tx.commit_body.update(body)
        if plan._files:  # type: ignore[attr-defined]
            self.files.apply_undo(tx, plan._files, plan._force)  # type: ignore[attr-defined]
        self._check_retained(plan)  # (the before-images just read came from history too)
        if reserved is not None:
            self.saga.reserve(plan.compensations, reserved)
        try:
            tx.commit()
        except BaseException:
            if reserved is not None:  # (not claimed: another undo may claim them now)
                self.saga.release(reserved)
                reserved.clear()
            raise
        if reserved is not None:  # (claimed by this COMMIT: this thread's to run, also
            # those a concurrent undo reserved before its commit, which then conflicted)
            self.saga.reserve(plan.compensations, reserved, take=True)
        owed = [Action.from_row(r) for r in
                (self.engine.views.action_row(a.id) for a in plan.compensations) if r is not None]
        if plan.unredo:  # (one redone by hand meanwhile: its ``unredo`` made it owed, see
            # tables.action_changes; this undo runs it too, newest first with the rest)
            rows = (self.engine.views.action_row(aid) for aid in plan.unredo)
            late = [Action.from_row(r) for r in rows
                    if r is not None and r.get("state") == tables.PENDING]
            if late:
                if reserved is not None:
                    self.saga.reserve(late, reserved, take=True)
                owed = sorted(owed + late, key=newest_first)
        return self.history.txn_info(tx.id), owed


class _CommitsAfter:
    """The commits after LSN ``boundary`` (below ``before``, when given: a dry run's
    snapshot), newest first, as ``TxnInfo``; each iteration reads them again (LMDB's
    rows, one chunk at a time), so a plan holds only what it keeps."""

    def __init__(self, engine: "Engine", boundary: int, before: int | None) -> None:
        self.engine = engine
        self.boundary = boundary
        self.before = before

    def __iter__(self):
        for row in self.engine.views.commits_after(self.boundary):
            info = info_from_row(row)
            if self.before is None or info.lsn < self.before:
                yield info


def _elsewhere(declared: Any, rng: ScopeRange) -> bool:
    """Was an action declared in a scope apart from ``rng``'s (neither inside the other:
    another agent's)?  None (declared in no scope) is not."""
    if declared is None or rng.same(declared):
        return False
    return not _around(declared, rng.scope)


def _around(stored: Any, scope: Any) -> bool:
    """Is ``scope`` inside the scope ``stored`` (read from the log or LMDB), as
    ``ScopeRange(stored).same(scope)`` says for a scope walstore takes now — without
    judging ``stored`` as an argument: walstore 0.1.0 let an action declare the scope ''
    (around every str scope) or one past the key limit, and each scoped rewind or revert
    over such an action of an upgraded store raised "a scope is a non-empty key prefix
    (str or bytes), not ''" (EmptyArgumentError), naming no argument the caller gave."""
    return type(stored) is type(scope) and scope.startswith(stored)


def _moves(info: TxnInfo) -> list[tuple[str, bool]]:
    """The action-state moves an undo's COMMIT records, as ``(action id, charged state
    before the move)``: ``compensate`` and ``unredo`` took the charged state away, ``redo``
    brought it back."""
    moves = [(aid, True) for aid in (*info.extra.get("compensate", ()),
                                      *info.extra.get("unredo", ()))]
    return moves + [(aid, False) for aid in info.extra.get("redo", ())]


class _PlanSnapshot:
    """What a dry run plans in, in place of the undoing transaction: one snapshot (the
    LSN it reads at) and the sets the planner notes.  No txid, no scope provider, nothing
    logged; ``rollback`` has nothing to undo."""

    def __init__(self, engine: "Engine") -> None:
        engine.refresh()  # (a read-only store: what the writer logged so far)
        self.snapshot = int(engine.memtable.published)
        self.read_keys: set[bytes] = set()
        self.guard_ranges: list = []
        self.guard_scopes: list = []
        self.guard_files = False

    def __enter__(self) -> "_PlanSnapshot":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def rollback(self) -> None:
        pass


class _LaterWalk:
    """What a cascading revert has walked so far: per key, the lowest LSN its history was
    read from (up to ``upto``, the undo's snapshot: the end of what it sees, so a commit
    whose record begins there is not in it — counted, a purge committed just after the
    snapshot read as a later writer, and the revert raised RevertConflict advising a
    cascade the purge refuses, where it conflicts and plans again after the purge now),
    and the TxnInfo of every transaction met (each read once)."""

    def __init__(self, upto: int) -> None:
        self.upto = upto
        self._from: dict[bytes, int] = {}
        self._infos: dict[int, TxnInfo] = {}

    def span(self, key: bytes, start: int) -> tuple[int, int] | None:
        """The LSN range [lo, hi) of ``key``'s history still to read from ``start``, or
        None when it was read from there already."""
        hi = self._from.get(key, self.upto)
        if start >= hi:
            return None
        self._from[key] = start
        return start, hi

    def info(self, txid: int, load) -> TxnInfo:
        got = self._infos.get(txid)
        if got is None:
            got = self._infos[txid] = load(txid)
        return got


def _under_a_stranger(items: list) -> list:
    """The paths of ``items`` to be put back as something (a file, a directory, a
    symlink) under a parent that is now a symlink or not a directory, one the undo does
    not put back as a directory itself: walstore never goes through either, so the undo
    committed (its keys, its compensations run) and then left the path as it was, a file
    conflict after the fact — a parent swapped behind walstore's back (``e/`` replaced
    by a symlink) read as "nothing here", the path's own state.  Refused before anything
    instead, as a path changed behind walstore's back is (RevertConflict naming it)."""
    dirs_back = {(i.ws.root_b, i.path) for i in items if i.target.is_dir}
    out = []
    for item in items:
        if not item.target.exists or b"/" not in item.path:
            continue
        cur = b""
        for comp in item.path.split(b"/")[:-1]:
            cur = cur + b"/" + comp if cur else comp
            if (item.ws.root_b, cur) in dirs_back:
                break  # (put back as a directory first: the undo runs newest first)
            try:
                st = os.lstat(item.ws.abspath(cur))
            except FileNotFoundError:
                break  # (missing parents are made, as a write makes them)
            except OSError:
                out.append(item)
                break
            if not stat.S_ISDIR(st.st_mode):  # (lstat: a symlink is no directory)
                out.append(item)
                break
    return out


def _holding_strangers(items: list) -> list:
    """The directories of ``items`` an unforced undo must remove (walstore made them; the
    target is no directory) that hold a name the put-back would not remove: one the undo
    does not remove itself and the workspace does not ignore, or an ignored one older
    than the change that made the directory (``files.apply._clear_ignored`` keeps it,
    e.g. the ``__pycache__`` a watched ``mv src dst`` carried along).  The put-back found
    the directory not empty and rolled the undo back at its end ("changed while
    transaction N was putting them back", of a file there long before), where its dry
    run had said all was well.  Refused in the plan instead, as changed behind
    walstore's back."""
    from ..files import apply as fapply
    gone = {(i.ws.root_b, i.path) for i in items if not i.target.exists}
    out = []
    for item in items:
        if item.target.is_dir or not item.expected.is_dir:
            continue
        ws = item.ws
        try:
            fd = fapply.open_dir(ws, item.path)  # (never through a symlink)
        except (OSError, ValueError):
            continue  # (not there as a directory: the path's own status says)
        try:
            if _strangers_in(ws, fd, item, gone, fapply):
                out.append(item)
        finally:
            os.close(fd)
    return out


def _strangers_in(ws: Any, fd: int, item: Any, gone: set, fapply: Any) -> bool:
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(fd))
    except OSError:
        return False
    for name in names:
        child = item.path + b"/" + name
        if (ws.root_b, child) in gone:
            continue
        try:
            cst = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError:
            return True
        if not ws.ignore or (ws.exclude and ws.excluded(child)) \
                or not ws.ignored(child, stat.S_ISDIR(cst.st_mode)):
            return True
        if item.since_ns is not None and fapply.older_inside(
                fd, name, cst, item.since_ns - fapply.CTIME_SLACK_NS):
            return True
    return False


def _prepared_holds(eng: "Engine") -> PreparedSet:
    """The holds of the transactions in doubt: a writer's prepared set; on a read-only
    store (whose in-memory set stays empty) one built from the prepared rows, keys only,
    one row at a time.  (A read-only dry run — ``walstore rewind --dry-run`` — checked
    the empty set: it returned a plan, exit 0, that the real rewind refused with
    ConflictError, the keys held by a transaction in doubt — audit 58.)"""
    if not eng.readonly:
        return eng.prepared
    held = PreparedSet()
    for p in eng.views.prepared_holds():  # (an older PREPARE's action scopes too)
        held.add(p)
    return held


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _first_caller_outside_walstore() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the function that calls this) of the
    nearest frame outside the walstore package: the user's line that called the undo.  A
    fixed count named walstore's own store.py once a helper frame was added (stop 75)."""
    frame = sys._getframe(2)   # (the warning's caller's caller: level 2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
