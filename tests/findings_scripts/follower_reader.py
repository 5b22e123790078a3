"""A read-only store in its own process, following a writer that commits pairs and
checkpoints (trimming WAL segments) as often as it can (tests/test_commit_point_findings.py).

    python follower_reader.py STORE STOPFILE

The writer's commit i sets ``f/a`` = ``f/b`` = i and adds a fresh key ``f/log/<i>`` = i, so
in any whole state a == b == the largest ``f/log/`` number.  Each round reads:

- ``store.scan(prefix="f/")`` (one consistent snapshot outside a transaction);
- a read-only transaction: ``tx.get("f/a")``, ``tx.scan(prefix="f/log/")``, ``tx.get("f/b")``
  (one snapshot for the three);

and stops at the first violation, printing ``BAD <json>``.  It runs until STOPFILE exists
(one more round after that, so it reads the final state too), at most 90 s, and prints
``DONE <json>``: rounds, violations, distinct values seen, the last value seen.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))  # the repository under test, before any installed copy

import walstore  # noqa: E402


def whole(a, b, logs) -> bool:
    return a == b == max(logs, default=None)


def main() -> None:
    path, stopfile = sys.argv[1], sys.argv[2]
    store = walstore.open(path, readonly=True)
    print("READY", flush=True)
    deadline = time.monotonic() + 90
    rounds = bad = 0
    seen = set()
    last = None
    final = False
    while time.monotonic() < deadline:
        final = os.path.exists(stopfile)
        rounds += 1
        d = dict(store.scan(prefix="f/"))
        logs = [v for k, v in d.items() if k.startswith("f/log/")]
        views = [("scan", d.get("f/a"), d.get("f/b"), logs)]
        with store.transaction() as tx:
            a = tx.get("f/a")
            logs = [v for _k, v in tx.scan(prefix="f/log/")]
            b = tx.get("f/b")
        views.append(("tx", a, b, logs))
        for how, a, b, logs in views:
            if a is None and b is None and not logs:
                continue  # before the writer's first commit
            if not whole(a, b, logs):
                bad += 1
                print("BAD " + json.dumps({"how": how, "a": a, "b": b,
                                            "max_log": max(logs, default=None),
                                            "logs": len(logs)}), flush=True)
            seen.add(a)
            last = a
        if bad or final:
            break
    print("DONE " + json.dumps({"rounds": rounds, "bad": bad, "distinct": len(seen),
                                "last": last, "final": final}), flush=True)
    store.close()


if __name__ == "__main__":
    main()
