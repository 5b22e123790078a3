"""Stop 65's own findings in the transaction's savepoints (each test failed before its fix)."""
from __future__ import annotations

import pytest

import walstore


def test_a_prepared_transaction_takes_no_savepoint_it_could_never_roll_back_to(store):
    """Before: ``savepoint()`` on a prepared transaction returned an active savepoint —
    one that ``rollback_to`` then refused (the write set is fixed until the decision)."""
    tx = store.transaction()
    tx.put("a", 1)
    before = tx.savepoint("before")
    tx.prepare("g1")
    with pytest.raises(walstore.TransactionClosed, match="prepared as 'g1'.*no savepoint"):
        tx.savepoint("after")
    with pytest.raises(walstore.TransactionClosed, match="prepared as 'g1'"):
        tx.rollback_to(before)
    store.commit_prepared("g1")
    assert store.get("a") == 1
    with pytest.raises(walstore.TransactionClosed, match="committed"):
        tx.savepoint("later")
