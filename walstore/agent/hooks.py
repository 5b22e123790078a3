"""What the agent layer does for each transaction: the ``TransactionHooks`` the engine's
Transaction calls at the points that involve the outside world (actions, their
compensation, file changes and their undo, two-phase commit).  One object per store,
joining the Saga, reversible files and 2PC.

A transaction's *effects* (``tx.effects``: actions and file changes, in the order they
were logged) are undone together, newest first: a compensation runs, or a file effect's
paths are put back, in exactly the reverse of the order they happened (``undo``).
"""
from __future__ import annotations

import errno
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from ..errors import (CompensationFailed, StoreClosed, TransactionClosed, WalstoreError,
                      type_and_message)
from ..log.writer import LogFailed
from ..signals import deferred
from .actions import Action, ActionScope, Saga, UndoProgress, _body_running
from .files import (FileConflictError, Files, TxFiles, UndoBatch, abs_display,
                    is_file_effect, no_room_to_undo)
from .scope import GUARDS, guard_scope
from .twophase import TwoPhase

if TYPE_CHECKING:
    from ..engine.transaction import Transaction


def newest_effect_first(effect: Any) -> tuple:
    """Undo order: by the LSN of the effect's (last) record, newest first."""
    if isinstance(effect, Action):
        txid, _, seq = effect.id.partition(".")
        return (-effect.lsn, -int(txid), -int(seq or 0))
    return (-effect.lsn, -effect.txid, 0)


def _no_space(err: BaseException | None) -> bool:
    """A put-back that failed for room (ENOSPC; EDQUOT: a quota, room all the same)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _raise_unrecorded(unrecorded: list[CompensationFailed]) -> None:
    """Raise the CompensationFailed of compensations whose outcome could not be recorded
    (still owed), once the rest of an undo was done: one error naming them all."""
    first = unrecorded[0]
    if len(unrecorded) > 1:  # (the first's words)
        ids = [i for e in unrecorded for i in e.action_ids]
        raise CompensationFailed(f"{first} (also: {ids[len(first.action_ids):]})",
                                 ids) from first.__cause__
    raise first


def _restored_unknown(txid: int, n: int) -> LogFailed:
    """The record of file effects put back (FILE_RESTORED) met a failed fsync: the plain
    LogFailed ("the unsynced commits are unknown") said nothing of the undo, which is done
    (audit 67)."""
    return LogFailed(f"transaction {txid}'s {n} file change(s) were put back, but the fsync "
                     f"of the record saying so failed: the store is now read-only; the next "
                     f"open finds them back (a path found as the undo left it is left so, "
                     f"even when that record was lost)")


class AgentHooks:
    def __init__(self, saga: Saga, twophase: TwoPhase, files: Files) -> None:
        self.saga = saga
        self.twophase = twophase
        self.files = files
        # open transactions whose effects are out in the world (actions run, files
        # changed), by txid: closing the store rolls them back (``roll_back_open``).  Weak:
        # a transaction the program dropped is not kept alive (its memory is bounded); the
        # next writable open's recovery undoes what it left, as after a crash
        self._with_effects: "weakref.WeakValueDictionary[int, Transaction]" = \
            weakref.WeakValueDictionary()
        self._with_effects_lock = threading.Lock()

    def effects_began(self, tx: "Transaction") -> None:
        with self._with_effects_lock:
            self._with_effects[tx.id] = tx

    def effects_ended(self, tx: "Transaction") -> None:
        with self._with_effects_lock:
            self._with_effects.pop(tx.id, None)
        if tx.state == "committed":
            self.files.committed(tx.id)

    def action_bodies_elsewhere(self) -> list[str]:
        """The ids of the actions whose ``with tx.action(...)`` body other threads are
        running now (close() waits for them: the body's result must be logged before the
        log closes, else the compensation owed for it is told ``result=None``)."""
        me = threading.get_ident()
        with self._with_effects_lock:
            open_txs = list(self._with_effects.values())
        running = []
        for tx in open_txs:
            for a in list(tx.effects):
                body = a._body if isinstance(a, Action) else None
                if body is not None and body[0] != me and _body_running(body):
                    running.append(a.id)
        return running

    def roll_back_open(self, wait: float = 30.0) -> list[tuple[int, BaseException]]:
        """Roll back, newest first, every open transaction whose effects are out in the
        world and whose effects this thread began, or a thread that has ended (the store is
        closing under it: as SQLite rolls back an open transaction at close).  Before, its changed files stayed changed and its actions uncompensated
        until the next writable open's recovery, while the store said neither happened.
        A prepared transaction (2PC) is left for its coordinator.  A ``commit()`` (or
        ``rollback()``) of one that another thread is running is waited for, up to ``wait``
        seconds in all (``Transaction.end_at_close``: the end is decided once; rolled back
        under a commit in flight, the commit landed anyway after its refund); a commit that
        comes after the rollback here raises TransactionClosed.  Returns (txid, error) for
        each rollback that raised or could not be made (the rest still ran)."""
        deadline = time.monotonic() + wait
        with self._with_effects_lock:
            open_txs = sorted(list(self._with_effects.values()), key=lambda t: t.id,
                              reverse=True)
        me = threading.current_thread()
        errors = []
        for tx in open_txs:
            if tx.state != "active" or tx.gid is not None:
                continue
            began = tx.thread() if tx.thread is not None else None
            if began is not None and began is not me and began.is_alive():
                # another thread that is still running began it: it may be inside the
                # transaction right now (an action's body, a commit past its point of no
                # return), and rolling it back under that thread compensated a charge
                # whose commit then landed.  Left as a crash leaves it: the next
                # writable open's recovery undoes it, if it did not commit
                continue
            try:
                if not tx.end_at_close(deadline - time.monotonic()):
                    why = (f"this thread is inside its commit() or rollback() (close() "
                           f"was called from there: a signal handler, a compensator)"
                           if tx.ending_in_this_thread() else
                           f"a commit() or rollback() of it in another thread was still "
                           f"running after {wait:g} s")
                    errors.append((tx.id, WalstoreError(
                        f"{why}: its outcome is that call's (if the store closes first, the "
                        f"next open's recovery undoes it)")))
            except TransactionClosed:
                continue  # (it committed: an interrupt had cut its commit() short)
            except Exception as e:  # (said by the caller; the others still roll back)
                errors.append((tx.id, e))
        return errors

    def start_action(self, tx: "Transaction", name: str, args: Any, compensate: str | None,
                     scope: Any) -> ActionScope:
        if scope is not None and GUARDS and tx.keepalive is not None:
            guard_scope(tx.keepalive, tx, scope)  # (before anything is logged or counted)
        return ActionScope(self.saga, tx, self.saga.new_action(tx, name, args, compensate,
                                                                scope))

    def files_of(self, tx: "Transaction", ws: Any) -> TxFiles:
        tx_files = self.files.tx_files(tx, ws)
        scope = tx_files.workspace.scope
        if scope is not None and GUARDS and tx.keepalive is not None:
            # (a workspace registered with a scope: its file changes are that scope's
            # work, undone by a rewind of it, as an action declared there is)
            guard_scope(tx.keepalive, tx, scope)
        return tx_files

    def commit_body(self, tx: "Transaction") -> dict:
        if not tx.effects and tx.scope is None and not tx.commit_body:
            return {}  # the common commit: no action, no file, no scope
        body = self.saga.commit_fields(tx)
        body.update(self.files.commit_fields(tx))
        return body

    def note_crossed(self, tx: "Transaction", effects: list) -> None:
        # (one declaring no compensation too: its "resolved" record may fail, and then
        # the commit settles it — left out, its row stayed in flight for good)
        crossed = [a for a in effects if isinstance(a, Action)]
        if crossed:  # (the COMMIT's ``crossed``: see undo_actions and Saga.commit_fields)
            tx.commit_body.setdefault("crossed", []).extend(crossed)

    def undo_actions(self, tx: "Transaction", actions: list, cause: BaseException | None) -> None:
        """A rollback to a savepoint crossed these effects: undo them now (a file effect
        that cannot be put back stays in the transaction: its rollback tries again, a
        commit keeps it).  An action that declares no compensation is settled as
        ``resolved`` (a whole rollback's ABORT does that; a commit after a rollback_to
        names only the actions it keeps, and this one stayed in flight for good).  The
        commit names the crossed actions too (``crossed``): one whose compensation did not
        finish (an interrupt in the compensator, or before it was reached) is owed from
        the commit on (``pending_compensations()``; the next open runs it), where it
        stayed in flight for good; a rollback's ABORT makes every one still in flight owed."""
        try:
            self.undo(tx.id, actions, cause, keep=tx.effects)
        finally:
            self.saga.settle_uncompensated(
                [a for a in actions if isinstance(a, Action) and a.compensate is None])

    def end_without_commit(self, tx: "Transaction", cause: BaseException | None,
                           ended: Callable[[], None]) -> None:
        # (counted from before the ABORT to the undo's end: a close() in another thread
        # waits for it — it closed the log between the two, and the rollback put no file
        # back and returned as if it had: audit 60)
        with self.files.undoing_here():
            self.saga.end_without_commit(tx, cause, ended, undo=lambda effects, progress:
                                         self.undo(tx.id, effects, cause, progress=progress))

    def undo_ended(self, txid: int, effects: list, progress: UndoProgress) -> None:
        """A transaction already ended by its decision (``rollback_prepared``): its owed
        actions and the file effects it left (``Files.effects_of``: the ``fsteps``
        table).  ``progress`` as for ``undo``: the caller calls again after an interrupt
        that came before the undo could catch it."""
        self.undo(txid, effects, None, progress=progress)

    def undo(self, txid: int, effects: list, cause: BaseException | None,
             keep: list | None = None, progress: UndoProgress | None = None) -> None:
        """Undo ``effects`` newest first: compensate each action, put back each file
        effect's paths; record the file outcomes (FILE_CONFLICT, FILE_RESTORED).  Raises
        CompensationFailed, then FileConflictError, after everything was tried.  A file
        effect that cannot be put back (an I/O error) is appended to ``keep`` (the live
        transaction's effects) when given, else stays owed for the next open.

        An interrupt (Ctrl-C, a raising timer) does not stop the files going back: they are
        walstore's own work, and a file left as the rolled-back transaction made it
        disagrees with the state until the next open.  Each put-back is one section no
        interrupt cuts, with its outcome noted in ``progress``; an interrupt between them,
        or in a compensator (user code), is raised once every file is back, and the
        actions not reached stay owed (``pending_compensations()``; the next open runs
        them).  A caller that passes ``progress`` may call again after an interrupt that
        came before this could catch it (see Saga.end_without_commit).  The compensations
        are reserved for this thread meanwhile (``Saga.reserved``)."""
        with self.saga.reserved(effects), self.files.undoing_here():
            self._undo(txid, effects, cause, keep, progress)

    def _undo(self, txid: int, effects: list, cause: BaseException | None,
              keep: list | None, progress: UndoProgress | None) -> None:
        progress = progress if progress is not None else UndoProgress()
        if not any(is_file_effect(e) for e in effects):
            if progress.interrupt is None:
                self.saga.compensate([a for a in effects if isinstance(a, Action)],
                                     cause=cause)
            progress.finished = True
            if progress.interrupt is not None:
                raise progress.interrupt
            return
        failed_actions: list[Action] = []
        unrecorded: list[CompensationFailed] = []
        failed: list = []
        skipped = 0  # file effects left owed: the log closed (or failed) before this undo
        done, conflicts = progress.done, progress.conflicts  # (kept across a call again)
        writable = self.files.engine.writable
        batch = UndoBatch(effects)
        todo = sorted(effects, key=newest_effect_first)
        handled = progress.handled
        try:
            while True:
                try:
                    for eff in todo:
                        if id(eff) in handled:
                            continue
                        if isinstance(eff, Action):
                            if progress.interrupt is None:
                                handled.add(id(eff))
                                try:
                                    failed_actions += self.saga.compensate(
                                        [eff], cause=cause, raise_on_failure=False)
                                except CompensationFailed as e:
                                    # its outcome could not be recorded (still owed, run
                                    # again at the next open): the older effects are
                                    # undone all the same, then it is raised (raised at
                                    # once, the files older than the action kept the
                                    # rolled-back transaction's bytes)
                                    unrecorded.append(e)
                            continue
                        if not writable:
                            skipped += 1
                            continue  # owed in the log: the next open puts them back
                        with deferred():
                            handled.add(id(eff))
                            got, err = batch.put_back(
                                eff, lambda: self.files.undo_one(txid, eff, batch))
                            if err is not None:
                                failed.append((eff, err))
                                continue
                            conflicts += [(eff.lsn, c) for c in got]
                            done.append(eff)
                    break
                except Exception:
                    raise
                except BaseException as e:  # an interrupt: the files go back first
                    progress.interrupt = progress.interrupt or e
        finally:
            if len(done) > progress.recorded:
                with deferred():  # (their outcomes: unrecorded, the next open would undo
                    d, c = progress.recorded, progress.conflicts_recorded  # them again)
                    try:
                        self.files.record(txid, done[d:], conflicts[c:])
                    except BaseException as err:
                        if keep is not None:  # (a rollback_to: the transaction keeps them,
                            for eff in done[d:]:  # its rollback records them; FileEffect
                                eff.put_back = True  # .put_back)
                                keep.append(eff)
                            # and those not put back, as below (raised past it, they were
                            # in neither the transaction nor a record: review44)
                            keep.extend(e for e, _x in failed)
                        if isinstance(err, LogFailed):
                            raise _restored_unknown(txid, len(done) - d) from err
                        raise
                    progress.recorded, progress.conflicts_recorded = len(done), len(conflicts)
        progress.finished = True
        if progress.interrupt is not None:
            raise progress.interrupt
        if skipped and self.files.engine.closed:
            # (the store closed between the decision and this undo — another thread's
            # close(), once it stopped waiting: the rollback returned as if every file
            # were back while none was)
            raise StoreClosed(f"transaction {txid} rolled back, but store "
                              f"{self.files.engine.path} was closed before its files were "
                              f"put back: the undo of {skipped} file change(s) runs when "
                              f"the store is reopened")
        if keep is None and len(done) == sum(1 for e in effects if is_file_effect(e)):
            self.files.undone(txid)  # (every file effect put back and recorded, over
            # every call: ``failed`` is this call's only — progress.handled skips them)
        if unrecorded:
            _raise_unrecorded(unrecorded)
        if failed_actions:
            ids = [a.id for a in failed_actions]
            raise CompensationFailed(
                f"compensation failed for action(s) {ids}: {failed_actions[0].error}; they "
                f"are kept as 'failed' (store.pending_compensations())", ids) from cause
        if conflicts or failed:
            docs = [self.files.conflict_doc(self._root(done, lsn), c) for lsn, c in conflicts]
            bad = [(abs_display(e.ws.root_b, e.steps[0].path) if getattr(e, "steps", None)
                    else e.ws.root, f"{type(x).__name__}: {no_room_to_undo(e, x)}" if _no_space(x)
                    else type_and_message(x)) for e, x in failed]
            parts = []
            if docs:
                parts.append("changed behind walstore's back (their version stays, "
                             "walstore's is kept aside): " + ", ".join(
                                 f"{d['path']}" + (f" -> {d['saved_as']}" if d['saved_as']
                                                   else "") for d in docs))
            if bad:
                if keep is not None:
                    keep.extend(e for e, _x in failed)
                where = ("kept in the transaction: its rollback tries again" if keep
                         is not None else "owed: put back at the next open, or before "
                         "the next read or change of it in this store")
                parts.append(f"could not be restored ({where}): "
                             + ", ".join(f"{p} ({why})" for p, why in bad))
            raise FileConflictError(f"transaction {txid} was undone, but some paths "
                                    f"were not put back: " + "; ".join(parts),
                                    docs, bad) from cause

    def settle(self, copied: bool = False) -> tuple[list[str], list[Action], list[dict],
                                                    list]:
        """At open (after REDO and the losers' ABORTs, before open returns): undo what is
        owed, newest first across transactions — the compensations of owed actions that
        have a compensator (not held) and the file effects a crash left — recording each
        outcome.  Returns (compensated ids, actions still owed, file conflicts, file
        effects that could not be undone: (txid, LSN, workspace, error))."""
        saga, files = self.saga, self.files
        effects, failures = files.owed_effects(copied)
        if not effects:
            done_ids, still = saga.run_owed()
            return done_ids, still, [], failures
        owed = [a for a in saga.actions(pending=True)
                if a.compensate in saga.compensators and not a.held]
        # first the temp names an interrupted change left (a directory to remove may
        # hold one): nothing of walstore's is running at open
        files.remove_temps_of(effects)
        done: dict[int, list] = {}
        conflicts: dict[int, list] = {}
        found: list[dict] = []
        failed_actions: list[Action] = []
        unrecorded: list[CompensationFailed] = []
        batch = UndoBatch(effects)
        freed: int | None = None  # (the store's own room given back: once, when needed)
        try:
            for eff in sorted(owed + effects, key=newest_effect_first):
                if isinstance(eff, Action):
                    try:
                        failed_actions += saga.compensate([eff], raise_on_failure=False)
                    except CompensationFailed as e:  # (its outcome unrecorded: the older
                        unrecorded.append(e)  # paths go back all the same, as in undo)
                    continue
                got, err = batch.put_back(
                    eff, lambda: files.undo_one(eff.txid, eff, batch, recovering=True))
                if _no_space(err):
                    # the store's own room first (blobs nothing refers to: a rolled-back
                    # write's, kept until a gc — the close of this recovery ran it, so
                    # a second `walstore recover` put back what the first said it could
                    # not), then the same undo again: the order stays newest first
                    if freed is None:
                        try:
                            freed = files.free_room()
                        except OSError:  # (a help, not a step of the open: the undo
                            freed = 0    # stays owed, as before the retry — the gc's
                            # EIO made the whole open fail, a StoreIOError)
                        if freed:
                            batch.resume(eff)
                            got, err = batch.put_back(eff, lambda: files.undo_one(
                                eff.txid, eff, batch, recovering=True))
                    if _no_space(err):
                        err = no_room_to_undo(eff, err, freed)
                if err is not None:
                    failures.append((eff.txid, eff.lsn, eff.ws.root_b, err))
                    continue
                done.setdefault(eff.txid, []).append(eff)
                for c in got:
                    conflicts.setdefault(eff.txid, []).append((eff.lsn, c))
                    found.append(dict(files.conflict_doc(eff.ws.root_b, c), tx=eff.txid))
        finally:
            for txid in sorted(done):
                files.record(txid, done[txid], conflicts.get(txid, []))
        if unrecorded:
            _raise_unrecorded(unrecorded)
        compensated = [a.id for a in owed if a not in failed_actions
                       and a.state == "compensated"]
        return compensated, saga.actions(pending=True), found, failures

    @staticmethod
    def _root(done: list, lsn: int) -> bytes:
        for e in done:
            if lsn in e.lsns:
                return e.ws.root_b
        return b""

    def prepare(self, tx: "Transaction", gid: str) -> None:
        fields = self.files.commit_fields(tx)
        held = self.files.hold_reads(tx)  # (its file reads: held until the decision)
        try:
            self.twophase.prepare(tx, gid, {**fields, **held})
        except BaseException:
            if held:
                self.files.release_holds(tx.id)
            raise

    def commit_prepared(self, gid: str) -> int:
        return self.twophase.commit_prepared(gid)

    def rollback_prepared(self, gid: str) -> None:
        self.twophase.rollback_prepared(gid)
