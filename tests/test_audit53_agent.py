"""Findings of stop 53 in the agent layer (contract, "Action rollback" and "External side
effects"), each named after the promise it broke.  Crash cases use real processes killed
with -9; the CLI runs as a real process of this checkout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import walstore

from store_support import cli_env

WALSTORE = [sys.executable, "-m", "walstore"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(WALSTORE + list(args), capture_output=True, text=True, timeout=120,
                          env=cli_env())


# ---- `walstore actions`: an action of a prepared (in-doubt) transaction --------------------

PREPARED_THEN_KILLED = textwrap.dedent(r"""
    import os, signal, sys, walstore
    s = walstore.open(sys.argv[1], durability="full")
    tx = s.transaction()
    tx.put("order/1", "paid")
    with tx.action("charge", compensate="refund") as act:
        act.result = {"charge": 1}
    tx.prepare("G53")
    print(act.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("killed", [False, True], ids=["writer-alive", "after-kill-9"])
def test_actions_says_an_in_doubt_actions_transaction_is_prepared_not_that_it_is_owed(
        tmp_path, killed):
    # Before: `walstore actions` listed the charge of a prepared transaction as STATE
    # "pending" with an empty LAST ERROR — the words it uses for a compensation owed and
    # not run — while `walstore actions --pending` (and `recover`) listed nothing owed: an
    # operator could not tell from the table that the transaction was in doubt, nor which
    # gid `commit-prepared` / `rollback-prepared` had to decide.  The row now says so (the
    # action's ``error``, as a crashed transaction's "did not commit before a crash").
    path = str(tmp_path / "s")
    if killed:
        proc = subprocess.run([sys.executable, "-c", PREPARED_THEN_KILLED, path],
                              capture_output=True, text=True, timeout=120, env=cli_env())
        assert proc.returncode == -9, proc.stderr
        action_id = proc.stdout.strip()
        owner = None
    else:
        owner = walstore.open(path)
        tx = owner.transaction()
        tx.put("order/1", "paid")
        with tx.action("charge", compensate="refund") as act:
            act.result = {"charge": 1}
        tx.prepare("G53")
        action_id = act.id
    try:
        out = _cli("actions", path)
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if line.startswith(action_id))
        assert "prepared" in row and "G53" in row, out.stdout
        doc = json.loads(_cli("actions", path, "--json").stdout)["actions"][0]
        assert doc["in_flight"] is True and "G53" in doc["error"], doc
        assert _cli("actions", path, "--pending").returncode == 0  # (still not owed)
        if owner is not None:  # (the Python API says the same)
            [a] = owner.actions()
            assert a.in_flight and "G53" in a.error and not a.owed
    finally:
        if owner is not None:
            owner.rollback_prepared("G53")
            owner.close()
