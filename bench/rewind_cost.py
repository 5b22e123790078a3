"""Rewind and revert cost against the store's age: issue 5's "cost grows with what is
undone, not with the store's age".

Builds one store with N committed transactions of history (default 1,000,000) and one
fresh store; on each, takes a restore point, commits 10 more transactions (each with a
compensated action), then times ``rewind`` to the point, ``revert`` of one transaction and
``at(point).get``.  Reports medians of several rounds and the ratio old/fresh (about 1.0
means the cost does not grow with age).  Writes bench/results/rewind_cost.md.

    python bench/rewind_cost.py [--history N] [--rounds R]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402

UNDONE = 10


def build(path: str, history: int) -> walstore.Store:
    store = walstore.open(path, durability="none", checkpoint_bytes=256 << 20,
                          segment_size=64 << 20)
    t0 = time.perf_counter()
    for i in range(history):
        with store.transaction() as tx:
            tx.put(f"k{i % 50_000:06d}", i)
        if i and i % 200_000 == 0:
            print(f"  {i:,} transactions ({time.perf_counter() - t0:.0f} s)", flush=True)
    store.compensators["noop"] = lambda action: None
    store.checkpoint()
    return store


def one_round(store: walstore.Store, r: int) -> dict[str, float]:
    name = f"p{r}"
    store.restore_point(name)
    txids = []
    for i in range(UNDONE):
        with store.transaction() as tx:
            tx.put(f"hot/{i}", r)
            with tx.action("effect", args={"i": i}, compensate="noop") as act:
                act.result = i
        txids.append(tx.id)
    out = {}
    t = time.perf_counter()
    store.at(name).get("hot/3")
    out["at"] = time.perf_counter() - t
    t = time.perf_counter()
    info = store.rewind(name)
    out["rewind"] = time.perf_counter() - t
    assert sorted(info.extra["reverts"]) == sorted(txids)
    with store.transaction() as tx:
        tx.put(f"solo/{r}", 1)
    t = time.perf_counter()
    store.revert(tx.id)
    out["revert"] = time.perf_counter() - t
    store.drop_restore_point(name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="walstore-rewind-")
    try:
        print(f"building a store with {args.history:,} transactions of history ...", flush=True)
        old = build(os.path.join(root, "old"), args.history)
        fresh = build(os.path.join(root, "fresh"), 0)
        times = {"old": {}, "fresh": {}}
        for r in range(args.rounds):  # interleaved: old, fresh, old, fresh ...
            for label, store in (("old", old), ("fresh", fresh)):
                for op, sec in one_round(store, r).items():
                    times[label].setdefault(op, []).append(sec)
        old.close()
        fresh.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for op in ("rewind", "revert", "at"):
        o, f = statistics.median(times["old"][op]), statistics.median(times["fresh"][op])
        rows.append(f"| {op} | {o * 1e3:.2f} ms | {f * 1e3:.2f} ms | {o / f:.2f}x |")
    table = "\n".join([
        f"# Rewind cost against the store's age\n",
        f"{args.history:,} transactions of history vs a fresh store; {UNDONE} transactions "
        f"undone per rewind (each with one compensated action); medians of {args.rounds} "
        f"interleaved rounds; `python bench/rewind_cost.py --history {args.history}`.\n",
        "| operation | old store | fresh store | old / fresh |", "|---|--:|--:|--:|", *rows, ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rewind_cost.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
