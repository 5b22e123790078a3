"""walstore as a data manager of the ``transaction`` package (Zope, ZODB, zope.sqlalchemy).

``walstore.integrations.transaction.join(store)`` returns the walstore transaction bound
to the current ``transaction`` transaction (one per store), so agent state commits
atomically with every other joined resource::

    import transaction
    from walstore.integrations.transaction import join
    tx = join(store)
    tx.put("agent/step", 8)
    transaction.commit()       # two-phase: our vote prepares (durably), finish commits

IDataManager mapping: ``tpc_vote`` prepares the walstore transaction (a ConflictError or any
failure there is the refusal that aborts everyone; so is a walstore transaction that ended
outside the manager, e.g. rolled back by ``store.close()``: voting yes for it committed the
others without walstore's part; one the caller committed itself, ``tx.commit()``, votes
yes: its writes stand, and a "no" aborted the others beside them; one of a store opened
read-only, which can hold no writes, prepares nothing: its reads commit and it votes yes;
every walstore store of one transaction prepares under one gid; one that holds nothing —
no write, no action, no file change — commits at its vote, its reads validated there, and
logs nothing: no fsync, no decision row); ``tpc_finish`` commits
the prepared transaction (it cannot conflict any more: its keys are held since the
vote; one another caller committed meanwhile, ``store.commit_prepared(gid)``, is
finished); ``abort``/``tpc_abort`` roll back (a prepared one through rollback_prepared) —
except once every participant voted yes and one of them *finished* (committed): the
``transaction`` package calls ``tpc_abort`` on all after a failure in some participant's
``tpc_finish`` (ours, e.g. a full disk, or another's), when those that finished before it
(in ``sortKey`` order) committed already.
Then the prepared transaction is committed once more, and when that fails too it is left
prepared, in doubt (``store.prepared()``, ``walstore recover`` lists it; ``walstore
commit-prepared PATH GID`` ends it): never rolled back and compensated beside a participant
that committed.  When nobody finished (the failing finish was the first: ours, another
walstore store's, or another resource's), the package aborts every participant: walstore
rolls back too (left prepared, with a warning naming ``walstore rollback-prepared``, if
even that cannot be written).  Who finished is read off the resources in the package's
order: every walstore data manager of the transaction notes its own finish (begun, done,
failed), and the failing finish is the one the package's commit loop stopped at.  When that
cannot be told (the outcome of the failing walstore finish is unknown: its COMMIT's fsync
failed; or the failing resource cannot be named), walstore is left prepared, in doubt,
with a warning naming both commands.
A transaction the caller prepared and decided outside the manager (``store.commit_prepared``
/ ``rollback_prepared``) ends as decided: the package's abort leaves it so, and ``join``
then gives a fresh walstore transaction when it committed.  ``join`` refuses
(TransactionClosed) while the store's walstore transaction in the current transaction was
rolled back outside the manager (``tx.rollback()``, ``store.close()``): it stays joined
and votes no, so the transaction can only be aborted; after ``transaction.abort()`` (or
the rollback of a savepoint taken before the join, which unjoins it) a join is fresh.
``savepoint()`` returns an object whose ``rollback()`` is ``tx.rollback_to`` — the
ISavepointDataManager contract (one taken after the caller committed the walstore
transaction rolls back nothing: it cannot change any more).  ``should_retry`` says a walstore ``ConflictError`` is
transient, so ``transaction.manager.run(fn)`` and ``for attempt in
transaction.manager.attempts()`` run it again (a conflicting vote commits nothing: the
package aborts every participant), as they do for ZODB's ConflictError.
"""
from __future__ import annotations

import sys
import uuid
import warnings
from typing import Any

try:
    import transaction as _transaction
except ImportError as e:  # (a bare "No module named 'transaction'", naming no extra)
    raise ImportError("walstore.integrations.transaction needs the transaction package: "
                      "pip install 'walstore[transaction]'") from e

from ..engine.transaction import ACTIVE, COMMITTED, ROLLED_BACK, UNKNOWN, Transaction
from ._checks import check_store as _check_store
from ..errors import (CommitOutcomeUnknown, ConflictError, TransactionClosed, UnknownGid,
                      WalstoreError)


class WalstoreDataManager:
    """One walstore transaction taking part in one ``transaction`` transaction."""

    def __init__(self, store, transaction_manager=None, meta: Any = None) -> None:
        self.store = store
        self.transaction_manager = transaction_manager or _transaction.manager
        self.tx: Transaction = store.transaction(meta=meta)
        self._finishing = False  # tpc_finish began: every participant voted yes
        self._finished = False   # tpc_finish committed
        self._finish_error: BaseException | None = None  # why our tpc_finish failed
        self._wrote_nothing = False  # a read-only store's: its vote committed its reads
        self._told_unknown = False  # the warning of _warn_if_unknown was given
        self._joined_to = self.transaction_manager.get()
        self._joined_to.join(self)

    # IDataManager
    def abort(self, txn) -> None:
        self._see_outside_decision()
        if self.tx.state == ACTIVE and self.tx.gid is not None and self._decided(txn):
            return  # (after a failed commit: tpc_abort left it in doubt, see above)
        self._end()

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass  # writes are buffered in self.tx until the vote

    def tpc_vote(self, txn) -> None:
        # (prepared by the caller and decided outside the manager meanwhile: a rolled-back
        # one read "active" and voted yes beside the others' commit)
        self._see_outside_decision()
        if self.tx.state == COMMITTED:  # (committed by the caller, tx.commit(): its writes
            return                      # stand, and a "no" aborted the others beside them)
        if self.tx.state != ACTIVE:  # (ended outside the manager: a yes would commit the
            raise WalstoreError(     # others without walstore's part)
                f"walstore transaction {self.tx.id} of store {self.store.path} is already "
                f"{self.tx.state} (it ended outside the transaction manager, e.g. the "
                f"store was closed under it): it cannot vote to commit; nothing of it is "
                f"committed")
        if self.tx.gid is None:
            if self._holds_nothing():
                # nothing written, no action, no file change: its commit writes no record
                # (``tx.commit()`` of an empty transaction validates its reads and logs
                # nothing), so it commits now and votes yes at no fsync; preparing it
                # logged a PREPARE and its finish a COMMIT, two fsyncs for nothing.  Its
                # reads are validated here, against every commit and every prepared
                # transaction's hold, as a prepare would (a conflict is the "no")
                self.tx.commit()
                self._wrote_nothing = True  # (not a finish deciding the others: _anyone_finished)
                return
            if self.store.readonly and not self.tx.writes and not self.tx.effects:
                # (a read-only store's transaction holds nothing it could prepare: its
                # commit writes nothing, as in ``with ro.transaction()``, and votes yes;
                # preparing it raised ReadOnlyError, which aborted every participant)
                self.tx.commit()
                self._wrote_nothing = True  # (its finish commits nothing: not a finish
                return                      # that decides the others, _anyone_finished)
            self.tx.prepare(_shared_gid(txn))

    def _holds_nothing(self) -> bool:
        """Its commit would log nothing: no write, no effect, no scope, no commit body."""
        tx = self.tx
        return (not tx.writes and not tx.effects and tx.scope is None and not tx.commit_body
                and not self.store.readonly)

    def tpc_finish(self, txn) -> None:
        self._finishing = True
        try:
            self._see_outside_decision()
            if self.tx.state == ACTIVE:
                try:
                    self.tx.commit()
                except (UnknownGid, TransactionClosed):
                    # decided by another caller between the vote and here (another
                    # thread's ``store.commit_prepared(gid)``, a ``resolve_atomic``):
                    # committed, the finish is done (raising it made the package abort
                    # the participants after us beside walstore's commit: mixed).  A
                    # reader of the transaction finishing it as decided between the check
                    # above and the commit makes the commit say TransactionClosed
                    # ("already committed"): the same (audit 68)
                    if self.tx.state != COMMITTED:
                        raise
            elif self.tx.state != COMMITTED:
                raise WalstoreError(f"walstore transaction {self.tx.id} of store "
                                    f"{self.store.path} is {self.tx.state} after its vote: "
                                    f"it was not committed")
        except BaseException as e:
            self._finish_error = e
            raise
        self._finished = True
        _forget(self)

    def tpc_abort(self, txn) -> None:
        self._see_outside_decision()
        if not (self.tx.state == ACTIVE and self.tx.gid is not None and self._decided(txn)):
            self._end()
            return
        gid = self.tx.gid
        finished = self._anyone_finished(txn)
        if finished is None:
            _forget(self)
            warnings.warn(f"walstore transaction {self.tx.id} of store {self.store.path} "
                          f"is left prepared, in doubt, as {gid!r}: every participant "
                          f"voted to commit and a finish failed, but whether any "
                          f"participant committed cannot be told; find out, then end it "
                          f"with `walstore commit-prepared {self.store.path} {gid}` or "
                          f"`walstore rollback-prepared {self.store.path} {gid}`",
                          RuntimeWarning, stacklevel=2)
            return
        if not finished:
            # nobody committed (the failing finish was the first), and the package now
            # aborts every participant (a commit "once more" here committed walstore
            # beside the rollback of all the others)
            try:
                self._end()
            except Exception as e:
                _forget(self)
                if self.tx.state == ROLLED_BACK:  # (its ROLLBACK_PREPARED is durable: not
                    # in doubt; what failed is the undo — a compensation kept owed)
                    warnings.warn(f"walstore transaction {self.tx.id} of store "
                                  f"{self.store.path} ({gid!r}) was rolled back (no "
                                  f"participant committed), but undoing its effects "
                                  f"failed: {e}; what is still owed is listed by "
                                  f"`walstore actions {self.store.path} --pending` "
                                  f"(store.pending_compensations())",
                                  RuntimeWarning, stacklevel=2)
                    return
                warnings.warn(f"walstore transaction {self.tx.id} of store {self.store.path} "
                              f"is left prepared, in doubt, as {gid!r}: no participant "
                              f"committed (the first finish failed) and its rollback "
                              f"failed too ({e}); end it with `walstore rollback-prepared "
                              f"{self.store.path} {gid}` once the cause is fixed",
                              RuntimeWarning, stacklevel=2)
            return
        try:  # a participant committed: the decision is commit, once more (a full disk
            self.tx.commit()  # may have cleared)
        except Exception as e:
            warnings.warn(f"walstore transaction {self.tx.id} of store {self.store.path} "
                          f"is left prepared, in doubt, as {gid!r}: every participant "
                          f"voted to commit, one committed, and its commit failed ({e}); "
                          f"end it with `walstore commit-prepared {self.store.path} {gid}` "
                          f"once the cause is fixed", RuntimeWarning, stacklevel=2)
        _forget(self)

    def _see_outside_decision(self) -> None:
        """A transaction the caller prepared and someone decided outside the manager
        (``store.commit_prepared`` / ``rollback_prepared``, ``resolve_atomic``) reads
        "active" until asked: its state is made to say the decision.  (An abort then
        rolled it back: ``rollback_prepared`` raised UnknownGid out of
        ``transaction.abort()`` and the manager stayed registered; ``join`` handed the
        stale, decided transaction out again.)"""
        if self.tx.state == ACTIVE and self.tx.gid is not None:
            self.tx.finish_if_decided()

    def _decided(self, txn) -> bool:
        """Every participant voted yes (our tpc_finish began, or the transaction's record
        of votes covers all its resources): a finish failed, or is under way."""
        if self._finishing:
            return True
        voted, resources = getattr(txn, "_voted", None), getattr(txn, "_resources", None)
        return (isinstance(voted, dict) and isinstance(resources, list) and bool(resources)
                and all(id(rm) in voted for rm in resources))

    def _anyone_finished(self, txn) -> bool | None:
        """After a failed finish (every participant voted): did any participant's
        tpc_finish commit?  True, False, or None when that cannot be told.

        The package finishes its resources one by one in ``sortKey`` order and stops at the
        first failure: those before the failing one committed, none after it.  A walstore
        data manager that finished says so (``_finished``); the failing one is the walstore
        manager whose finish began and failed, else a foreign resource sorting before every
        walstore one (the one the package's loop stopped at, or the only candidate)."""
        resources = getattr(txn, "_resources", None)
        if not isinstance(resources, list) or not resources:
            return None
        # (a read-only store's data manager wrote nothing: its finish, before or after the
        # failing one, committed nothing, so it is left out of the order)
        resources = [rm for rm in resources if not getattr(rm, "_wrote_nothing", False)]
        ours = [rm for rm in resources if isinstance(rm, WalstoreDataManager)]
        if any(rm._finishing and (rm._finished or rm.tx.state == COMMITTED) for rm in ours):
            return True  # (a commit once more in tpc_abort is not a finish: not counted)
        try:
            order = sorted(resources, key=lambda rm: rm.sortKey())  # (the package's order)
        except Exception:
            return None
        failing = [rm for rm in ours if rm._finishing]
        if failing:
            rm = failing[0]
            if isinstance(rm._finish_error, CommitOutcomeUnknown):
                return None  # (its COMMIT may be durable: it may have committed)
            try:
                if rm.store.decision(rm.tx.gid) == "commit":
                    return True  # (committed, then interrupted)
            except WalstoreError:
                pass
            return _index(order, rm) > 0
        first_ours = min(_index(order, rm) for rm in ours)
        before = order[:first_ours]  # (foreign: the failing one is among them)
        stopped_at = _finish_loop_resource(txn)
        if stopped_at is not None and any(rm is stopped_at for rm in before):
            return _index(order, stopped_at) > 0
        if len(before) == 1:
            return False
        return None

    def sortKey(self) -> str:
        return f"walstore:{self.store.path}"

    def should_retry(self, error: BaseException) -> bool:
        """The package's retry hook (``transaction.manager.run``, ``attempts()``): a
        walstore ``ConflictError`` (an optimistic conflict, found at the vote or by the
        caller's own ``store.run``) wrote nothing and is retried, as ZODB's ConflictError
        (a ``TransientError``) and zope.sqlalchemy's serialization failures are."""
        return isinstance(error, ConflictError)

    # ISavepointDataManager
    def savepoint(self) -> "_Savepoint | _CommittedSavepoint":
        self._see_outside_decision()
        if self.tx.state == COMMITTED:
            # committed by the caller (``tx.commit()``), it votes yes beside the others;
            # refusing the savepoint (TransactionClosed) failed the whole transaction,
            # so the others were aborted beside walstore's commit.  It cannot change any
            # more: rolling back to a point taken now changes nothing of it.
            return _CommittedSavepoint()
        return _Savepoint(self.tx, self.tx.savepoint("zope"))

    def _end(self) -> None:
        try:
            if self.tx.state == ACTIVE:
                self.tx.rollback()
            else:
                self._warn_if_unknown()
        finally:
            _forget(self)

    def _warn_if_unknown(self) -> None:
        """The package aborts a transaction whose PREPARE (our vote) or COMMIT (our finish)
        met a failed fsync: CommitOutcomeUnknown, the store read-only, nothing can be
        rolled back here — and the next open finds it prepared, in doubt, its keys held
        (every later write of them a ConflictError), with nothing said but "recovery
        decides" (a prepared transaction, recovery leaves to its coordinator).  Say so
        once, naming the gid and the command that ends it."""
        if self.tx.state != UNKNOWN or self.tx.gid is None or self._told_unknown:
            return
        self._told_unknown = True
        path, gid = self.store.path, self.tx.gid
        if not self._finishing:  # (our vote failed: the package aborts everyone)
            end = (f"the transaction was aborted, so once the store is reopened, if "
                   f"store.prepared() lists it, end it with `walstore rollback-prepared "
                   f"{path} {gid}`")
        else:  # (every participant voted yes; whether our COMMIT is durable is unknown)
            end = (f"once the store is reopened, if store.prepared() lists it, find out "
                   f"whether the other participants committed, then end it with `walstore "
                   f"commit-prepared {path} {gid}` or `walstore rollback-prepared {path} "
                   f"{gid}`")
        warnings.warn(f"walstore transaction {self.tx.id} of store {path} may be left "
                      f"prepared, in doubt, as {gid!r}: the fsync of its "
                      f"{'COMMIT' if self._finishing else 'PREPARE'} failed (its outcome is "
                      f"unknown until the store is reopened, and a reopen leaves a "
                      f"prepared transaction in doubt, its keys held); {end}",
                      RuntimeWarning, stacklevel=3)


class _Savepoint:
    def __init__(self, tx: Transaction, sp) -> None:
        self.tx = tx
        self.sp = sp

    def rollback(self) -> None:
        self.tx.rollback_to(self.sp)


class _CommittedSavepoint:
    def rollback(self) -> None:
        pass  # (taken after the walstore transaction committed: nothing to undo)


_GID = object()  # (the key of the gid in each transaction's data: ``Transaction.data``)


def _shared_gid(txn) -> str:
    """One gid per ``transaction`` transaction, shared by every walstore store taking
    part: after a crash between their finishes, a store left in doubt is decided as the
    one that decided (``store.decision(gid)`` there).  (Each prepared under its own random
    gid: nothing tied the in-doubt one to the other's commit.)  A transaction object
    without ``data``/``set_data`` gets a gid of its own."""
    try:
        return txn.data(_GID)
    except KeyError:
        pass
    except AttributeError:
        return f"zope-{uuid.uuid4().hex}"
    gid = f"zope-{uuid.uuid4().hex}"
    txn.set_data(_GID, gid)
    return gid


def _index(order: list, rm: Any) -> int:
    return next(i for i, x in enumerate(order) if x is rm)


def _finish_loop_resource(txn) -> Any:
    """The resource whose ``tpc_finish`` raised: ``rm`` of the package's commit loop
    (``Transaction._commitResources``), whose ``except`` is handling that error while it
    calls ``tpc_abort`` on every participant; None when it is not found so."""
    tb = sys.exc_info()[2]
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_commitResources" and frame.f_locals.get("self") is txn:
            return frame.f_locals.get("rm")
        tb = tb.tb_next
    return None


_managers: dict[tuple[int, int], WalstoreDataManager] = {}


def _forget(dm: WalstoreDataManager) -> None:
    _managers.pop((id(dm._joined_to), id(dm.store)), None)


def join(store, transaction_manager=None, meta: Any = None) -> Transaction:
    """The walstore transaction of ``store`` inside the current ``transaction`` transaction."""
    # (a path raised "'str' object has no attribute 'transaction'"; the other
    # integrations say to pass walstore.open(path))
    _check_store(store, "join")
    tm = transaction_manager or _transaction.manager
    key = (id(tm.get()), id(store))
    dm = _managers.get(key)
    if dm is not None:
        dm._see_outside_decision()
        if dm.tx.state not in (ACTIVE, COMMITTED):
            # rolled back (or its outcome unknown) outside the manager while it stays
            # joined: its vote says no, so a fresh walstore transaction joined beside it
            # could never commit; and one that could have committed the rest of the
            # transaction without the writes rolled back here (another part of the code
            # wrote them, and its other resources' writes beside them stand)
            raise TransactionClosed(
                f"walstore transaction {dm.tx.id} of store {store.path} in the current "
                f"transaction is already {dm.tx.state} (it ended outside the transaction "
                f"manager): this transaction cannot commit (walstore's vote is no); abort "
                f"it (transaction.abort()) and begin again")
    if dm is None or dm.tx.state != ACTIVE:
        dm = WalstoreDataManager(store, tm, meta)
        _managers[key] = dm
    return dm.tx
