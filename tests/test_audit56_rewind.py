"""Audit 56, rewind: restore points, rewind, revert, history/at() views, retention, purge,
backup/copy/restore and their interplay with workspaces and actions.

Findings (each test named below fails on the code before its fix):

- ``store.log()``, ``store.txn_info()`` and ``walstore log --json`` listed each action of a
  transaction as it was at its commit (``state: committed``) for ever: after a rewind (or
  revert) had run the action's compensation — ``store.actions()`` said ``compensated`` —
  the log still said the charge stood, so a script reading the log believed the outside
  world held an effect walstore had undone.  The actions listed are read as they stand
  now (state, error, attempts, result)
  (``test_the_log_says_an_action_a_rewind_compensated_is_compensated``).
"""
from __future__ import annotations

import json
import subprocess
import sys

import walstore

from store_support import CLI, cli_env


def _charged_store(path):
    s = walstore.open(path, durability="none")
    refunds = []
    s.compensator("refund")(lambda a: refunds.append(a.args["n"]))
    with s.transaction() as tx:
        tx.put("balance", 100)
    s.restore_point("start")
    with s.transaction() as tx:
        tx.put("balance", 60)
        with tx.action("charge", args={"n": 40}, compensate="refund") as act:
            act.result = {"charge_id": "ch_1"}
    return s, refunds


def test_the_log_says_an_action_a_rewind_compensated_is_compensated(tmp_path):
    path = str(tmp_path / "s")
    s, refunds = _charged_store(path)
    charged = s.log(limit=1)[0]
    assert [a["state"] for a in charged.actions] == ["committed"]
    s.rewind("start")
    assert refunds == [40] and s.get("balance") == 100
    assert [a.state for a in s.actions()] == ["compensated"]
    info = s.txn_info(charged.txid)
    assert [a["state"] for a in info.actions] == ["compensated"]
    assert info.actions[0]["result"] == {"charge_id": "ch_1"}
    logged = {i.txid: i for i in s.log()}
    assert [a["state"] for a in logged[charged.txid].actions] == ["compensated"]
    s.close()
    p = subprocess.run([sys.executable, "-c", CLI, "log", path, "--json"],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == 0, p.stderr
    rows = {t["txid"]: t for t in json.loads(p.stdout)["transactions"]}
    assert [a["state"] for a in rows[charged.txid]["actions"]] == ["compensated"]
