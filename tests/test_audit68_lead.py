"""Audit 68, the lead's own findings.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import pytest

transaction = pytest.importorskip("transaction")

import walstore  # noqa: E402
from walstore.integrations.transaction import join  # noqa: E402
from test_zope_transaction import SqliteDataManager  # noqa: E402


def test_atomic_with_other_resources_a_reader_finishing_the_decided_transaction(tmp_path):
    """A walstore transaction in a ``transaction`` (Zope) transaction, decided between the
    data manager's check and its commit by another caller (``store.commit_prepared``) and
    then finished as decided by a reader of it (a ``tx.get`` sees the store's decision,
    stop 68): ``tx.commit()`` said TransactionClosed "already committed", which
    ``tpc_finish`` re-raised (it let only UnknownGid through), so the package logged a
    storage error in the second phase and the participants after walstore were never
    finished — walstore committed, the other resource not: mixed."""
    transaction.manager.abort()
    store = walstore.open(str(tmp_path / "ws"))
    other = SqliteDataManager(tmp_path / "other.sqlite", sort_key="zzz-after-walstore")
    try:
        transaction.begin()
        tx = join(store)
        tx.put("agent/step", 1)
        other.put("step", "1")
        commit = tx.commit

        def decided_meanwhile(*args, **kwargs):
            store.commit_prepared(tx.gid)   # another caller decides it
            with pytest.raises(walstore.TransactionClosed):  # a reader: finished as decided
                tx.get("agent/step")
            return commit(*args, **kwargs)

        tx.commit = decided_meanwhile
        transaction.commit()
        assert tx.state == "committed"
        assert store.get("agent/step") == 1
        assert other.conn.execute("SELECT v FROM kv WHERE k='step'").fetchone() == ("1",)
    finally:
        transaction.manager.abort()
        other.conn.close()
        store.close()
