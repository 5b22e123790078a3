"""Read-only process checking invariants while a writer commits (tests/test_readers.py).

usage: pair_reader.py STORE MODE SECONDS
MODE pair: ``pair/a`` and ``pair/b`` are always written together with the same counter;
every scan must see them equal.
MODE txpair: the same invariant, read by ``tx.get`` twice inside a read-only transaction;
only transactions whose commit succeeded count (a ConflictError at commit is correct).
MODE log: each commit i writes ``ctr`` = i and a fresh key ``log/<i>``; every scan must
see ``ctr`` equal to the largest ``log/`` number (else part of a commit is visible).
Prints ``BAD ...`` for a violation (and stops) and finally
``DONE <reads> <violations> <distinct counters seen>``.
"""
import sys
import time

import walstore


def main() -> None:
    path, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = walstore.open(path, readonly=True)
    print("READY", flush=True)
    deadline = time.monotonic() + seconds
    reads = bad = 0
    seen = set()
    while time.monotonic() < deadline:
        reads += 1
        if mode == "pair":
            d = dict(store.scan(prefix="pair/"))
            a, b = d.get("pair/a"), d.get("pair/b")
            ok = a == b
        elif mode == "txpair":
            try:
                with store.transaction() as tx:
                    a = tx.get("pair/a")
                    time.sleep(0.0005)  # a reader that thinks between two reads
                    b = tx.get("pair/b")
            except walstore.ConflictError:
                continue
            ok = a == b
        else:
            d = dict(store.scan())
            logs = [int(k.split("/", 1)[1]) for k in d if k.startswith("log/")]
            a, b = max(logs, default=0), d.get("ctr", 0)
            ok = a == b
        seen.add(b)
        if not ok:
            bad += 1
            print(f"BAD {mode} {a} {b}", flush=True)
            break
    print(f"DONE {reads} {bad} {len(seen)}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
