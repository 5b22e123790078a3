"""A tiny "external payment system" for the action tests: a JSON-lines ledger file.

Each line is ``{"op": "charge"|"refund", "key": <idempotency key>, "amount": n, "pid": ..}``.
It honours idempotency keys the way a real payment API does: a charge with a key that was
already charged is a no-op (returns the first charge), and a refund with a key that was
already refunded (or never charged) changes nothing.  Every effect is fsynced, under an
exclusive ``flock``, so it is visible to other processes and survives SIGKILL.
"""
from __future__ import annotations

import fcntl
import json
import os


def records(path: str) -> list[dict]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _append(path: str, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Locked:
    def __init__(self, path: str) -> None:
        self.path = path + ".lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def charge(path: str, key: str, amount: int) -> dict:
    """Charge ``amount`` once per idempotency ``key``; returns the charge receipt."""
    with _Locked(path):
        for r in records(path):
            if r["op"] == "charge" and r["key"] == key:
                return {"charge_id": r["key"], "amount": r["amount"]}
        _append(path, {"op": "charge", "key": key, "amount": amount, "pid": os.getpid()})
        return {"charge_id": key, "amount": amount}


def refund(path: str, key: str) -> bool:
    """Refund the charge made with ``key`` once; True when money moved now."""
    with _Locked(path):
        recs = records(path)
        charged = [r for r in recs if r["op"] == "charge" and r["key"] == key]
        refunded = [r for r in recs if r["op"] == "refund" and r["key"] == key]
        if not charged or refunded:
            return False
        _append(path, {"op": "refund", "key": key, "amount": charged[0]["amount"],
                       "pid": os.getpid()})
        return True


def balance(path: str, key: str | None = None) -> int:
    total = 0
    for r in records(path):
        if key is None or r["key"] == key:
            total += r["amount"] if r["op"] == "charge" else -r["amount"]
    return total


def count(path: str, op: str, key: str) -> int:
    return sum(1 for r in records(path) if r["op"] == op and r["key"] == key)


def note_call(calls_path: str | None, action, **extra) -> None:
    """Append one line describing a compensator invocation (for exactly-once checks)."""
    if not calls_path:
        return
    rec = {"id": action.id, "key": action.key, "txid": action.txid, "name": action.name,
           "result": action.result, "pid": os.getpid(), **extra}
    with _Locked(calls_path):
        _append(calls_path, rec)
