"""The demo's "external system": a payments ledger in a JSON-lines file.

It honours idempotency keys like a real payment API: charging or refunding with a key it
has already seen does nothing.  ``COMPENSATORS`` lets ``walstore recover --handlers
walstore.demo_payments`` refund charges whose transaction never committed.
"""
from __future__ import annotations

import json
import os


def _entries(ledger: str) -> list[dict]:
    if not os.path.exists(ledger):
        return []
    with open(ledger) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(ledger: str, entry: dict) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def charge(ledger: str, amount: int, idempotency_key: str) -> dict:
    for e in _entries(ledger):
        if e["op"] == "charge" and e["key"] == idempotency_key:
            return {"charge_id": e["key"], "amount": e["amount"]}
    _append(ledger, {"op": "charge", "key": idempotency_key, "amount": amount})
    return {"charge_id": idempotency_key, "amount": amount}


def refund(ledger: str, idempotency_key: str) -> bool:
    entries = _entries(ledger)
    charged = [e for e in entries if e["op"] == "charge" and e["key"] == idempotency_key]
    if not charged or any(e["op"] == "refund" and e["key"] == idempotency_key for e in entries):
        return False
    _append(ledger, {"op": "refund", "key": idempotency_key, "amount": charged[0]["amount"]})
    return True


def balance(ledger: str) -> int:
    return sum(e["amount"] if e["op"] == "charge" else -e["amount"] for e in _entries(ledger))


def refund_compensator(action) -> None:
    """walstore compensator: undo a charge (its ledger path travels in the action's args)."""
    refund(action.args["ledger"], action.key)


def release_compensator(action) -> None:
    """walstore compensator for a stock reservation: nothing external to undo here; the
    reservation itself lives in walstore and is rolled back with the transaction."""


COMPENSATORS = {"refund": refund_compensator, "release": release_compensator}
