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
others without walstore's part); ``tpc_finish`` commits the prepared transaction (it cannot
conflict any more: its keys are held since the vote); ``abort``/``tpc_abort`` roll back (a
prepared one through rollback_prepared) — except once every participant voted yes and
one may have committed: the ``transaction`` package calls ``tpc_abort`` after a failure in
some participant's ``tpc_finish`` (ours, e.g. a full disk, or another's), when those
finished before it (in ``sortKey`` order) committed already.  Then the prepared
transaction is committed once more, and when that fails too it is left prepared, in doubt
(``store.prepared()``, ``walstore recover`` lists it; ``walstore commit-prepared PATH GID``
ends it): never rolled back and compensated beside a participant that committed.  When our
own ``tpc_finish`` failed and none finished before it, nobody committed and the package
aborts every other participant: walstore rolls back too (left prepared, with a warning
naming ``walstore rollback-prepared``, if even that cannot be written).
``savepoint()`` returns an object whose ``rollback()`` is ``tx.rollback_to`` — the
ISavepointDataManager contract.
"""
from __future__ import annotations

import uuid
import warnings
from typing import Any

import transaction as _transaction

from ..engine.transaction import ACTIVE, COMMITTED, Transaction
from ..errors import WalstoreError


class WalstoreDataManager:
    """One walstore transaction taking part in one ``transaction`` transaction."""

    def __init__(self, store, transaction_manager=None, meta: Any = None) -> None:
        self.store = store
        self.transaction_manager = transaction_manager or _transaction.manager
        self.tx: Transaction = store.transaction(meta=meta)
        self._finishing = False  # tpc_finish began: the decision is commit
        self._joined_to = self.transaction_manager.get()
        self._joined_to.join(self)

    # IDataManager
    def abort(self, txn) -> None:
        if self.tx.state == ACTIVE and self.tx.gid is not None and self._decided(txn):
            return  # (after a failed commit: tpc_abort left it in doubt, see above)
        self._end()

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass  # writes are buffered in self.tx until the vote

    def tpc_vote(self, txn) -> None:
        if self.tx.state != ACTIVE:  # (ended outside the manager: a yes would commit the
            raise WalstoreError(     # others without walstore's part)
                f"walstore transaction {self.tx.id} of store {self.store.path} is already "
                f"{self.tx.state} (it ended outside the transaction manager, e.g. the "
                f"store was closed under it): it cannot vote to commit; nothing of it is "
                f"committed")
        if self.tx.gid is None:
            self.tx.prepare(f"zope-{uuid.uuid4().hex}")

    def tpc_finish(self, txn) -> None:
        self._finishing = True
        if self.tx.state == ACTIVE:
            self.tx.commit()
        elif self.tx.state != COMMITTED:
            raise WalstoreError(f"walstore transaction {self.tx.id} of store "
                                f"{self.store.path} is {self.tx.state} after its vote: it "
                                f"was not committed")
        _forget(self)

    def tpc_abort(self, txn) -> None:
        if (self.tx.state == ACTIVE and self.tx.gid is not None and self._finishing
                and not self._finished_before_us(txn)):
            # our own tpc_finish failed, and it was the first: no participant committed,
            # and the package now aborts every one of them (a commit "once more" here
            # committed walstore beside the rollback of all the others)
            gid = self.tx.gid
            try:
                self._end()
            except Exception as e:
                _forget(self)
                warnings.warn(f"walstore transaction {self.tx.id} of store {self.store.path} "
                              f"is left prepared, in doubt, as {gid!r}: no participant "
                              f"committed (its own commit failed first) and its rollback "
                              f"failed too ({e}); end it with `walstore rollback-prepared "
                              f"{self.store.path} {gid}` once the cause is fixed",
                              RuntimeWarning, stacklevel=2)
            return
        if self.tx.state == ACTIVE and self.tx.gid is not None and self._decided(txn):
            gid = self.tx.gid
            try:  # the decision is commit: once more (a full disk may have cleared)
                self.tx.commit()
            except Exception as e:
                warnings.warn(f"walstore transaction {self.tx.id} of store {self.store.path} "
                              f"is left prepared, in doubt, as {gid!r}: every participant "
                              f"voted to commit, and its commit failed ({e}); end it with "
                              f"`walstore commit-prepared {self.store.path} {gid}` once the "
                              f"cause is fixed", RuntimeWarning, stacklevel=2)
            _forget(self)
            return
        self._end()

    def _decided(self, txn) -> bool:
        """Every participant voted yes (our tpc_finish began, or the transaction's record
        of votes covers all its resources): commit is the decision."""
        if self._finishing:
            return True
        voted, resources = getattr(txn, "_voted", None), getattr(txn, "_resources", None)
        return (isinstance(voted, dict) and isinstance(resources, list) and bool(resources)
                and all(id(rm) in voted for rm in resources))

    def _finished_before_us(self, txn) -> bool:
        """Did another participant's tpc_finish run (and commit) before ours?  The package
        finishes its resources in ``sortKey`` order: those sorting before us did."""
        resources = getattr(txn, "_resources", None)
        if not isinstance(resources, list):
            return True  # (unknown: commit stays the decision, as before)
        mine = self.sortKey()
        for rm in resources:
            if rm is self:
                continue
            key = getattr(rm, "sortKey", None)
            try:
                if key is None or key() < mine:
                    return True
            except Exception:
                return True
        return False

    def sortKey(self) -> str:
        return f"walstore:{self.store.path}"

    # ISavepointDataManager
    def savepoint(self) -> "_Savepoint":
        return _Savepoint(self.tx, self.tx.savepoint("zope"))

    def _end(self) -> None:
        if self.tx.state == ACTIVE:
            self.tx.rollback()
        _forget(self)


class _Savepoint:
    def __init__(self, tx: Transaction, sp) -> None:
        self.tx = tx
        self.sp = sp

    def rollback(self) -> None:
        self.tx.rollback_to(self.sp)


_managers: dict[tuple[int, int], WalstoreDataManager] = {}


def _forget(dm: WalstoreDataManager) -> None:
    _managers.pop((id(dm._joined_to), id(dm.store)), None)


def join(store, transaction_manager=None, meta: Any = None) -> Transaction:
    """The walstore transaction of ``store`` inside the current ``transaction`` transaction."""
    tm = transaction_manager or _transaction.manager
    key = (id(tm.get()), id(store))
    dm = _managers.get(key)
    if dm is None or dm.tx.state != ACTIVE:
        dm = WalstoreDataManager(store, tm, meta)
        _managers[key] = dm
    return dm.tx
