"""Audit 55 of the OpenAI Agents session, the ``transaction`` package join, and the
examples as a user runs them.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_langgraph_example_run_again_in_its_kept_dir_tells_no_false_story(tmp_path):
    """``examples/langgraph_agent.py --dir DIR`` keeps DIR; run a second time there, it
    resumed the first run's thread and hotel ledger: it rewound to the FIRST run's
    checkpoint, printed "compensated bookings: ['Oslo', 'Rome', 'Paris', 'Lisbon', 'Oslo',
    'Rome']" (every compensated action of both runs as this rewind's), and after booking
    Lisbon anew printed "walstore actions: {'Lisbon': 'compensated', ...}".  A second run
    in the same DIR is now refused with one line, touching nothing."""
    pytest.importorskip("langgraph")
    work = tmp_path / "w"
    first = _example("langgraph_agent.py", "--dir", str(work))
    assert first.returncode == 0, first.stderr
    ledger = (work / "hotel.json").read_bytes()
    again = _example("langgraph_agent.py", "--dir", str(work))
    assert again.returncode == 1, again.stdout[-2000:]
    assert "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already holds a run" in again.stderr
    assert again.stdout == ""
    assert (work / "hotel.json").read_bytes() == ledger
    # a new directory still runs the whole story
    fresh = _example("langgraph_agent.py", "--dir", str(tmp_path / "new"), "--json")
    assert fresh.returncode == 0, fresh.stderr
    summary = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert summary["walstore"]["active"] == ["Paris", "Lisbon"]


def test_the_openai_example_run_again_on_its_store_tells_no_false_story(tmp_path):
    """``examples/openai_agent_retract.py STORE_DIR`` run a second time on the same store
    continued the first run's conversation against a new, empty simulated hotel: after
    the rewind it printed "session's bookings: [('oa/traveller-1/k/bookings/H-2', ...)]",
    a booking this run's hotel never made (and the third run's H-2 overwrote it).  A
    second run on the same STORE_DIR is now refused with one line."""
    pytest.importorskip("agents")
    path = str(tmp_path / "store")
    first = _example("openai_agent_retract.py", path)
    assert first.returncode == 0, first.stderr
    assert "session's bookings: []" in first.stdout
    again = _example("openai_agent_retract.py", path)
    assert again.returncode == 1, again.stdout[-2000:]
    assert "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already holds a store" in again.stderr
    assert again.stdout == ""


# ---- the transaction package: a walstore transaction the caller committed -----------------
class _SqliteWithSavepoints:
    """A foreign, savepoint-capable IDataManager over sqlite3 (SQLite SAVEPOINTs)."""

    def __init__(self, path) -> None:
        import sqlite3
        import transaction
        self.conn = sqlite3.connect(str(path), isolation_level=None)
        self.conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)")
        self.transaction_manager = transaction.manager
        self.n = 0

    def put(self, k: str, v: str) -> None:
        import transaction
        if not self.conn.in_transaction:
            transaction.get().join(self)
            self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))

    def rows(self) -> dict:
        return dict(self.conn.execute("SELECT k, v FROM kv"))

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
        self.conn.execute("COMMIT")

    def sortKey(self) -> str:
        return "z-sqlite"

    def savepoint(self):
        self.n += 1
        name = f"sp{self.n}"
        self.conn.execute(f"SAVEPOINT {name}")
        conn = self.conn

        class _Sp:
            def rollback(self) -> None:
                conn.execute(f"ROLLBACK TO {name}")
        return _Sp()


def test_a_savepoint_after_the_caller_committed_walstore_lets_the_others_commit(tmp_path):
    """A walstore transaction the caller committed itself (``tx.commit()`` in the body)
    votes yes, so the other participants commit beside its writes (GUIDE).  But a
    ``transaction.savepoint()`` taken after that commit (zope.sqlalchemy and ZODB code
    take them freely) raised TransactionClosed out of walstore's ``savepoint()``: the
    package marked the whole transaction failed, so ``transaction.commit()`` raised
    TransactionFailedError and the SQL participant was rolled back while walstore's
    writes stood: the two disagreed.  A committed transaction cannot change any more, so
    a savepoint of it is taken and rolled back as a no-op."""
    transaction = pytest.importorskip("transaction")
    import walstore
    from walstore.integrations.transaction import join
    store = walstore.open(str(tmp_path / "ws"))
    sql = _SqliteWithSavepoints(tmp_path / "other.sqlite")
    try:
        transaction.begin()
        tx = join(store)
        tx.put("order", "paid")
        sql.put("order", "paid")
        tx.commit()
        sp = transaction.savepoint()
        sql.put("draft", "x")
        sp.rollback()                     # the SQL draft goes; walstore's commit stays
        sql.put("note", "kept")
        transaction.commit()
        assert store.get("order") == "paid"
        assert sql.rows() == {"order": "paid", "note": "kept"}
        assert store.prepared() == []
    finally:
        transaction.abort()
        sql.conn.close()
        store.close()


@pytest.mark.parametrize("given", ["state-dir", None])
def test_join_given_a_path_or_none_is_a_type_error_naming_the_fix(tmp_path, given):
    """``join("state-dir")`` (a path, as SQLiteSession and zope.sqlalchemy take) raised
    AttributeError "'str' object has no attribute 'transaction'"; the other integrations
    refuse it with a TypeError saying to pass ``walstore.open(path)``."""
    transaction = pytest.importorskip("transaction")
    from walstore.integrations.transaction import join
    arg = str(tmp_path / given) if given else None
    try:
        with pytest.raises(TypeError, match="walstore.Store") as e:
            join(arg)
        if given:
            assert "walstore.open(path)" in str(e.value)
        assert not (tmp_path / "state-dir").exists()
    finally:
        transaction.abort()
