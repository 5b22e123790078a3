"""Audit 51 (probe2): two-phase commit, the coordinator and the ``transaction`` data manager.

Each test is named after the promise it checks; its comment says what went wrong before.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import warnings

import pytest

transaction = pytest.importorskip("transaction")

import walstore  # noqa: E402
from walstore.integrations.transaction import join  # noqa: E402

WALSTORE = [sys.executable, "-m", "walstore"]


class FinishFails(Exception):
    pass


class ForeignFailingFinish:
    """A foreign resource (sqlite3) sorting before walstore whose ``tpc_finish`` fails
    before it commits: nobody committed, and the package aborts every participant."""

    def __init__(self, path) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None)
        self.conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)")
        self.transaction_manager = transaction.manager

    def put(self, k: str, v: str) -> None:
        transaction.get().join(self)
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))

    def abort(self, txn) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    tpc_abort = abort

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass

    def tpc_vote(self, txn) -> None:
        pass

    def tpc_finish(self, txn) -> None:
        raise FinishFails("the foreign resource lost its disk before committing")

    def sortKey(self) -> str:
        return "a-foreign"


@pytest.fixture(autouse=True)
def clean_manager():
    transaction.manager.abort()
    yield
    transaction.manager.abort()


def test_zope_abort_whose_compensation_fails_is_said_rolled_back_not_in_doubt(tmp_path):
    # Before: every participant voted, the first finish (a foreign one) failed, so walstore
    # rolled back in tpc_abort: its ROLLBACK_PREPARED was logged (decision "abort", the
    # gid no longer prepared) and only the refund failed (CompensationFailed, the action
    # kept 'failed', pending).  The RuntimeWarning said the transaction "is left
    # prepared, in doubt" and told the operator to run `walstore rollback-prepared PATH
    # GID`, which then failed "no prepared transaction" (exit 2); what was really owed,
    # the failed refund, was named nowhere.
    path = str(tmp_path / "ws")

    def refund_down(action):
        raise RuntimeError("refund API down")

    s = walstore.open(path, durability="full", compensators={"refund": refund_down})
    foreign = ForeignFailingFinish(tmp_path / "other.sqlite")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("order/1", "paid")
        with tx.action("charge", compensate="refund") as act:
            act.result = {"charge": 1}
        foreign.put("order/1", "paid")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(FinishFails):
                transaction.commit()
        gid = tx.gid
        assert gid is not None
        # what really happened: rolled back, the decision durable, the refund owed
        assert tx.state == "rolled back"
        assert s.prepared() == [] and s.decision(gid) == "abort"
        assert s.get("order/1") is None
        assert [(a.id, a.state) for a in s.pending_compensations()] == [(act.id, "failed")]
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert said, "nothing told the operator that a compensation is owed"
        assert not any("in doubt" in m or "left prepared" in m for m in said), said
        assert not any("rollback-prepared" in m for m in said), said
        assert any(act.id in m and "actions" in m for m in said), said
    finally:
        transaction.abort()
        foreign.conn.close()
        s.close()
    # the command the warning named before refuses: the gid is decided
    out = subprocess.run(WALSTORE + ["rollback-prepared", path, gid], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no prepared transaction" in out.stderr
