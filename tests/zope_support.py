"""What the tests of the ``transaction`` data manager share: a foreign resource over stdlib
sqlite3 (``Sqlite``, a real second participant), and the environment a child process
needs to import this checkout's walstore."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import transaction

REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict:
    """A child imports this checkout's walstore, wherever it runs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                      if env.get("PYTHONPATH") else []))
    return env


class Sqlite:
    """A foreign IDataManager over one sqlite3 connection (table kv); ``on_vote`` runs
    inside its tpc_vote (what another thread does in the window between the votes and
    the finishes).  ``sort_key`` orders it against walstore's ("walstore-..."): before
    it or after it."""

    def __init__(self, path, sort_key: str = "z-sqlite") -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None)
        self.conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)")
        self.transaction_manager = transaction.manager
        self._sort_key = sort_key
        self.on_vote = None

    def put(self, k: str, v: str) -> None:
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
        if self.on_vote is not None:
            self.on_vote()

    def tpc_finish(self, txn) -> None:
        self.conn.execute("COMMIT")

    def sortKey(self) -> str:
        return self._sort_key
