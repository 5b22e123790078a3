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
failure there is the refusal that aborts everyone); ``tpc_finish`` commits the prepared
transaction (it cannot conflict any more: its keys are held since the vote);
``abort``/``tpc_abort`` roll back (a prepared one through rollback_prepared).
``savepoint()`` returns an object whose ``rollback()`` is ``tx.rollback_to`` — the
ISavepointDataManager contract.
"""
from __future__ import annotations

import uuid
from typing import Any

import transaction as _transaction

from ..engine.transaction import ACTIVE, Transaction


class WalstoreDataManager:
    """One walstore transaction taking part in one ``transaction`` transaction."""

    def __init__(self, store, transaction_manager=None, meta: Any = None) -> None:
        self.store = store
        self.transaction_manager = transaction_manager or _transaction.manager
        self.tx: Transaction = store.transaction(meta=meta)
        self._joined_to = self.transaction_manager.get()
        self._joined_to.join(self)

    # IDataManager
    def abort(self, txn) -> None:
        self._end()

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass  # writes are buffered in self.tx until the vote

    def tpc_vote(self, txn) -> None:
        if self.tx.state == ACTIVE and self.tx.gid is None:
            self.tx.prepare(f"zope-{uuid.uuid4().hex}")

    def tpc_finish(self, txn) -> None:
        if self.tx.state == ACTIVE:
            self.tx.commit()
        _forget(self)

    def tpc_abort(self, txn) -> None:
        self._end()

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
