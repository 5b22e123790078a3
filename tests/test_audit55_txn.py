"""Audit 55, transactions and the engine core: a transaction held open while others commit.

Findings (each test named below fails on the code before its fix):

- The commit of a transaction that scanned a range, and a scan of an old snapshot, read
  the ``bylsn`` rows of every commit applied since its snapshot into one list before
  looking at them: a transaction held open while others committed 30,000 times took
  ~4 MiB at its commit (a million commits since: ~150 MiB), though a held transaction is
  promised to cost bounded memory.  They are walked a row at a time now
  (``test_a_held_transaction_commits_and_scans_in_bounded_memory``).
- That walk at commit ran in one LMDB read transaction, however many commits it passed:
  a map resize (LMDB's map full: the applier's growth) waits for every reader to leave
  LMDB, so it waited for the whole validation of a transaction held for hours, and every
  other reader and committer waited behind it.  The walk takes short read transactions
  of a bounded number of rows now, so a resize runs between two of them
  (``test_a_map_resize_does_not_wait_for_a_held_transactions_whole_validation``).
"""
from __future__ import annotations

import threading
import time
import tracemalloc

import walstore
from walstore.engine import conflicts, tables

MIB = 1 << 20


def _held_with_commits_since(store, n: int):
    """A transaction that scanned ``p/`` and wrote, then ``n`` commits by others outside
    ``p/``, all applied to LMDB (a checkpoint): its validation walks them there."""
    with store.transaction() as t:
        t.put("p/a", 1)
    held = store.transaction()
    assert list(held.scan(prefix="p/")) == [("p/a", 1)]
    held.put("out", 1)
    for i in range(n):
        with store.transaction() as t:
            t.put(f"o/{i}", i)
    store.checkpoint()
    return held


def _peak_of(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_held_transaction_commits_and_scans_in_bounded_memory(store):
    held = _held_with_commits_since(store, 20_000)
    reader = store.transaction()
    reader.get("nothing")  # (its snapshot: before the commits below)
    for i in range(20_000):
        with store.transaction() as t:
            t.put(f"q/{i}", i)
    store.checkpoint()
    peak = _peak_of(held.commit)  # (nothing it read changed: it commits)
    assert peak < MIB, f"the commit of a held transaction took {peak:,} bytes"
    assert store.get("out") == 1
    rows = []
    peak = _peak_of(lambda: rows.extend(reader.scan(prefix="p/")))
    assert rows == [("p/a", 1)]
    assert peak < MIB, f"a scan of a held snapshot took {peak:,} bytes"
    reader.rollback()


def test_a_map_resize_does_not_wait_for_a_held_transactions_whole_validation(
        store, monkeypatch):
    n = 6_000  # (more than the rows a walk reads per LMDB read: 4,096)
    held = _held_with_commits_since(store, n)
    gate = store._engine.state.gate
    me = threading.get_ident()
    seen = [0]
    resized = threading.Event()
    waited: list[bool] = []
    real = tables.unpack_row

    def counted(raw, table, *a, **kw):
        if table == "txns" and threading.get_ident() == me:
            seen[0] += 1
            if seen[0] == 1:  # a resize asked for as the walk begins ...
                threading.Thread(target=gate.exclusive, args=(resized.set,),
                                 daemon=True).start()
                deadline = time.monotonic() + 20  # (asked for before this chunk ends)
                while not gate.paused and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert gate.paused
            elif seen[0] == n - 100:  # ... has run well before it ends
                waited.append(resized.wait(20))
        return real(raw, table, *a, **kw)
    monkeypatch.setattr(tables, "unpack_row", counted)
    held.commit()
    assert seen[0] >= n - 100
    assert waited == [True], "the map resize waited for the whole validation"
    assert store.get("out") == 1
