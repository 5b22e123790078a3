"""A read-only store in its own process, summing the accounts of tests/test_opacity.py while
writer threads of the test process move money between them.

    python opacity_reader.py STORE ACCOUNTS TOTAL MIN_TXS DONEFILE STOPFILE

Runs read-only transactions in rotation (see ``READS``) until it has run MIN_TXS of them
(then it creates DONEFILE, so the writers may stop) and STOPFILE exists, at most 90 s.
Every total is taken *inside* the transaction, before it ends (and counts even when its
commit then conflicts).  Prints ``DONE <json>``:
transactions run, violations (and the first few), how many of each kind, how many read-only
commits conflicted (allowed: what they read changed since their snapshot).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))  # the repository under test, before any installed copy

import walstore  # noqa: E402

READS = ("get", "scan", "reverse-scan", "mixed", "store-scan")


def account(i: int) -> str:
    return f"acct/{i:03d}"


def read_once(store, kind: str, accounts: int, rng: random.Random, seen: list) -> None:
    """One read of every account; appends (total, inconsistency or None) to ``seen`` while
    the transaction is still open (its commit may then conflict: what it saw counts)."""
    if kind == "store-scan":
        seen.append((sum(v for _k, v in store.scan(prefix="acct/")), None))
        return
    with store.transaction() as tx:
        problem = None
        if kind == "get":
            order = list(range(accounts))
            rng.shuffle(order)
            total = 0
            for n, i in enumerate(order):
                total += tx.get(account(i))
                if n == accounts // 2:
                    time.sleep(0.0002)  # let writers commit in the middle of the sum
        elif kind in ("scan", "reverse-scan"):
            total = sum(v for _k, v in tx.scan(prefix="acct/", reverse=kind != "scan"))
        else:  # mixed: half by get, then everything by scan; both from one snapshot
            got = {account(i): tx.get(account(i)) for i in range(0, accounts, 2)}
            time.sleep(0.0002)
            scanned = dict(tx.scan(prefix="acct/"))
            total = sum(scanned.values())
            if any(scanned[k] != v for k, v in got.items()):
                problem = f"get and scan disagree: {got} vs {scanned}"
        seen.append((total, problem))


def main() -> None:
    path, accounts, expected, min_txs, donefile, stopfile = sys.argv[1:7]
    accounts, expected, min_txs = int(accounts), int(expected), int(min_txs)
    store = walstore.open(path, readonly=True)
    rng = random.Random(os.getpid())
    print("READY", flush=True)
    deadline = time.monotonic() + 90
    txs = conflicts = 0
    bad: list[dict] = []
    kinds = {k: 0 for k in READS}
    while time.monotonic() < deadline:
        kind = READS[txs % len(READS)]
        seen: list = []
        try:
            read_once(store, kind, accounts, rng, seen)
        except walstore.ConflictError:
            conflicts += 1
        txs += 1
        kinds[kind] += 1
        for total, problem in seen:
            if total != expected or problem:
                bad.append({"kind": kind, "total": total, "problem": problem})
        if txs == min_txs:
            open(donefile, "w").close()
        if txs >= min_txs and os.path.exists(stopfile):
            break
    print("DONE " + json.dumps({"txs": txs, "bad": len(bad), "examples": bad[:5],
                                "kinds": kinds, "conflicts": conflicts}), flush=True)
    store.close()


if __name__ == "__main__":
    main()
