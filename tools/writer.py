"""A real writer process for crash tests: commits transactions and ACKs each one on stdout.

    python tools/writer.py STORE [--threads N] [--durability full] [--seconds S]
                                 [--mode transfer|fill] [--segment-size B]
                                 [--checkpoint-bytes B] [--map-size B] [--seed N]

After ``commit()`` returns it prints one line and flushes::

    ACK <txid> {"lsn": <commit LSN>, "writes": {<key>: <value or null>, ...}}

so a test that kills the process (SIGKILL) at any moment knows which commits were
acknowledged and exactly what they wrote.  Order ACK lines by ``lsn``, not by line order:
threads print in whatever order they get the output lock.

Modes:

``transfer`` (default)
    Ten accounts ``acct/0`` .. ``acct/9`` hold ``{"bal": n, "tx": txid}``; the first run
    creates them with a total of ``TOTAL`` (ACKed like any commit).  Every transaction moves
    an amount between two accounts and writes ``t/<txid>`` = ``{"from", "to", "amt",
    "keys"}``, so the total stays constant and every account value names a transaction
    whose ``t/`` record must exist.  Mixed in: a savepoint, garbage writes (``junk/...`` and
    ``GARBAGE`` over the accounts), ``rollback_to`` the savepoint; nested savepoints that
    are released; and whole transactions rolled back.  None of the garbage may ever be seen.
``fill``
    Puts fresh keys ``k<n>`` (n from a per-thread counter, unique across threads and runs
    thanks to the pid) with a value naming the key.

Other lines: ``READY <pid>`` once the store is open; ``LOCKED <pid of holder>`` (exit 3)
when another process holds the store.  Exit 0 after ``--seconds`` (the store is closed
cleanly).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(HERE))

import walstore  # noqa: E402

ACCOUNTS = [f"acct/{i}" for i in range(10)]
TOTAL = 10_000
GARBAGE = "GARBAGE"

_out_lock = threading.Lock()


def emit(line: str) -> None:
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def ack(txid: int, lsn: int, writes: dict) -> None:
    emit(f"ACK {txid} {json.dumps({'lsn': lsn, 'writes': writes}, sort_keys=True)}")


def ensure_accounts(store) -> None:
    while True:
        tx = store.transaction(meta={"writer": "init"})
        try:
            if tx.get(ACCOUNTS[0]) is not None:
                tx.rollback()
                return
            writes = {}
            for i, k in enumerate(ACCOUNTS):
                v = {"bal": TOTAL // len(ACCOUNTS), "tx": tx.id}
                tx.put(k, v)
                writes[k] = v
            rec = {"from": None, "to": None, "amt": 0, "keys": list(ACCOUNTS)}
            tx.put(f"t/{tx.id}", rec)
            writes[f"t/{tx.id}"] = rec
            lsn = tx.commit()
        except walstore.ConflictError:
            continue
        ack(tx.id, lsn, writes)
        return


def transfer_once(store, rng: random.Random, thread_no: int) -> None:
    tx = store.transaction(meta={"writer": "transfer", "thread": thread_no})
    a, b = rng.sample(ACCOUNTS, 2)
    va, vb = tx.get(a), tx.get(b)
    amt = rng.randint(1, 50)
    choice = rng.random()
    # garbage behind a savepoint, rolled back
    sp = tx.savepoint("garbage")
    tx.put(f"junk/{tx.id}/a", GARBAGE)
    tx.put(a, GARBAGE)
    inner = tx.savepoint("inner")
    tx.put(b, {"bal": -1, "tx": -1})
    tx.put(f"junk/{tx.id}/b", {"x": GARBAGE})
    if choice < 0.5:
        tx.rollback_to(inner)       # inner first, then the outer one
    tx.rollback_to(sp)
    if rng.random() < 0.5:
        tx.release(sp)
    if choice > 0.95:               # a transaction that gives up entirely
        tx.put(f"junk/{tx.id}/c", GARBAGE)
        tx.rollback()
        return
    # the real work, partly under a released savepoint (kept)
    writes = {}
    na = {"bal": va["bal"] - amt, "tx": tx.id}
    nb = {"bal": vb["bal"] + amt, "tx": tx.id}
    tx.put(a, na)
    keep = tx.savepoint("keep")
    tx.put(b, nb)
    tx.release(keep)
    rec = {"from": a, "to": b, "amt": amt, "keys": [a, b]}
    tx.put(f"t/{tx.id}", rec)
    writes.update({a: na, b: nb, f"t/{tx.id}": rec})
    lsn = tx.commit()               # ConflictError: nothing written, caller retries
    ack(tx.id, lsn, writes)


def fill_once(store, counter, thread_no: int) -> None:
    n = next(counter)
    key = f"k{os.getpid()}-{thread_no}-{n}"
    with store.transaction(meta={"writer": "fill"}) as tx:
        value = {"key": key, "n": n, "pad": "x" * (n % 200)}
        tx.put(key, value)
    ack(tx.id, tx.lsn, {key: value})


def worker(store, args, thread_no: int, deadline: float, errors: list) -> None:
    rng = random.Random((args.seed or os.getpid()) * 1000 + thread_no)
    counter = iter(range(10**12))
    try:
        while time.monotonic() < deadline:
            try:
                if args.mode == "fill":
                    fill_once(store, counter, thread_no)
                else:
                    transfer_once(store, rng, thread_no)
            except walstore.ConflictError:
                time.sleep(rng.random() * 0.002)
    except BaseException as e:  # surface it: a crash test must not hide writer errors
        errors.append(e)
        emit(f"ERROR {type(e).__name__}: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--durability", default="full", choices=("full", "normal", "none"))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--mode", default="transfer", choices=("transfer", "fill"))
    p.add_argument("--segment-size", type=int, default=None)
    p.add_argument("--checkpoint-bytes", type=int, default=None)
    p.add_argument("--map-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    tuning = {}
    if args.segment_size:
        tuning["segment_size"] = args.segment_size
    if args.checkpoint_bytes:
        tuning["checkpoint_bytes"] = args.checkpoint_bytes
    try:
        store = walstore.open(args.store, durability=args.durability, map_size=args.map_size,
                              **tuning)
    except walstore.StoreLocked as e:
        emit(f"LOCKED {e.pid}")
        return 3
    emit(f"READY {os.getpid()}")
    try:
        if args.mode == "transfer":
            ensure_accounts(store)
        deadline = time.monotonic() + args.seconds
        errors: list = []
        threads = [threading.Thread(target=worker, args=(store, args, i, deadline, errors),
                                    daemon=True) for i in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        store.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
