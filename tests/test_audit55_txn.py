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
  A scan of an old snapshot walked those commits in one read transaction too (to correct
  the rows it reads); it walks them as the commit does now
  (``test_a_map_resize_does_not_wait_for_a_held_snapshots_whole_scan``).
- A scan of an old snapshot read the value as of its snapshot of every key in its range
  changed since, and held them all from its first chunk on: the first row of a scan over
  12,000 rewritten 1 KiB values took ~13 MiB (a streamed scan holds a chunk: 256 rows or
  8 MiB).  Only the changed keys are kept now, their values read chunk by chunk, at most
  a chunk's worth each (keys deleted since are in no LMDB row to bound a chunk)
  (``test_the_first_row_of_an_old_snapshots_scan_holds_a_chunk_not_every_change``).
"""
from __future__ import annotations

import threading
import time
import tracemalloc

import pytest

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


def _resize_asked_for_as_the_walk_begins(store, monkeypatch, n: int) -> tuple[list, list]:
    """From the first ``txns`` row this thread reads on: a map resize (``gate.exclusive``)
    asked for in another thread; at row ``n - 100`` whether it ran (waited for) goes into
    the first list returned; the second counts the rows."""
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
    return waited, seen


def test_a_map_resize_does_not_wait_for_a_held_transactions_whole_validation(
        store, monkeypatch):
    n = 6_000  # (more than the rows a walk reads per LMDB read: 4,096)
    held = _held_with_commits_since(store, n)
    waited, seen = _resize_asked_for_as_the_walk_begins(store, monkeypatch, n)
    held.commit()
    assert seen[0] >= n - 100
    assert waited == [True], "the map resize waited for the whole validation"
    assert store.get("out") == 1


def test_a_map_resize_does_not_wait_for_a_held_snapshots_whole_scan(store, monkeypatch):
    n = 6_000
    with store.transaction() as t:
        t.put("p/a", 1)
    reader = store.transaction()
    reader.get("nothing")  # (its snapshot: before the commits below)
    for i in range(n):
        with store.transaction() as t:
            t.put(f"o/{i}", i)
    store.checkpoint()
    waited, seen = _resize_asked_for_as_the_walk_begins(store, monkeypatch, n)
    assert list(reader.scan(prefix="p/")) == [("p/a", 1)]
    assert list(reader.scan(prefix="o/")) == []
    assert seen[0] >= n - 100
    assert waited == [True], "the map resize waited for the scan's whole walk"
    reader.rollback()


def test_a_held_snapshot_past_many_walks_reads_its_state_and_meets_a_late_phantom(store):
    """The walks above go on across read transactions: a scan of an old snapshot still
    shows its state when the commits since changed its range past the first walk's rows,
    and a commit still conflicts with a phantom the last of them inserted."""
    with store.transaction() as t:
        t.update({f"p/{i:02d}": 0 for i in range(50)})
    reader = store.transaction()
    held = store.transaction()
    want = [(f"p/{i:02d}", 0) for i in range(50)]
    assert list(reader.scan(prefix="p/")) == want
    assert list(held.scan(prefix="q/")) == []
    held.put("out", 1)
    for i in range(9_000):
        with store.transaction() as t:
            t.put(f"p/{i % 50:02d}" if i > 4_500 else f"o/{i}", i)
    with store.transaction() as t:
        t.put("q/late", 1)  # (the last commit: past two walks' rows)
    store.checkpoint()
    assert list(reader.scan(prefix="p/")) == want
    assert list(reader.scan(prefix="p/", reverse=True)) == want[::-1]
    assert reader.get("p/07") == 0
    with pytest.raises(walstore.ConflictError, match="q/late"):
        held.commit()
    with pytest.raises(walstore.ConflictError):
        reader.commit()
    assert store.get("out") is None


def test_a_validation_over_many_walks_merges_the_scanned_ranges_once(store, monkeypatch):
    """The walk's pieces share one merge of the transaction's scanned ranges (made again
    per piece, a transaction that scanned 100,000 ranges sorted them per 4,096 commits)."""
    held = store.transaction()
    for i in range(200):
        assert list(held.scan(prefix=f"r/{i}/")) == []
    held.put("out", 1)
    for i in range(9_000):
        with store.transaction() as t:
            t.put(f"o/{i}", i)
    store.checkpoint()
    made = [0]

    class Counted(conflicts.RangeSet):
        def __init__(self, ranges) -> None:
            made[0] += 1
            super().__init__(ranges)
    monkeypatch.setattr(conflicts, "RangeSet", Counted)
    held.commit()
    assert made[0] == 1
    assert store.get("out") == 1


def _old_snapshot_of_rewritten_values(store, n: int, deleted: bool = False):
    """A transaction whose snapshot holds ``n`` 1 KiB values under ``p/``, which commits
    since rewrote (or deleted) and a checkpoint applied."""
    with store.transaction() as t:
        t.update({f"p/{i:06d}": "a" * 1000 for i in range(n)})
    reader = store.transaction()
    reader.get("nothing")
    for j in range(0, n, 1000):
        with store.transaction() as t:
            for i in range(j, min(j + 1000, n)):
                if deleted:
                    t.delete(f"p/{i:06d}")
                else:
                    t.put(f"p/{i:06d}", "b" * 1000)
    store.checkpoint()
    return reader


@pytest.mark.parametrize("deleted", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_first_row_of_an_old_snapshots_scan_holds_a_chunk_not_every_change(
        store, deleted, reverse):
    reader = _old_snapshot_of_rewritten_values(store, 12_000, deleted)
    it = reader.scan(prefix="p/", reverse=reverse)
    first = []
    peak = _peak_of(lambda: first.append(next(it)))
    assert first == [("p/011999" if reverse else "p/000000", "a" * 1000)]
    assert peak < 2 * MIB, f"the first row of the scan took {peak:,} bytes"
    rest = list(it)  # (and the whole scan is still its snapshot's state)
    assert len(rest) == 11_999 and all(v == "a" * 1000 for _k, v in rest)
    keys = [k for k, _v in rest]
    assert keys == sorted(keys, reverse=reverse)
    assert list(reader.scan(start="p/005000", end="p/005003")) == [
        (f"p/{i:06d}", "a" * 1000) for i in range(5_000, 5_003)]
    reader.rollback()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_old_snapshots_scan_agrees_with_its_state_whatever_changed_since(store, seed):
    """Chunks cut short by the changed keys (deletes, rewrites and inserts since the
    snapshot, denser or sparser than the rows left) still make up exactly its state."""
    import random
    rnd = random.Random(seed)
    then = {f"p/{i:05d}": i for i in range(3_000)}
    with store.transaction() as t:
        t.update(then)
    reader = store.transaction()
    reader.get("nothing")
    for _ in range(6):
        with store.transaction() as t:
            for _ in range(700):
                k = f"p/{rnd.randrange(6_000):05d}"
                if rnd.random() < 0.6:
                    t.delete(k)
                else:
                    t.put(k, "new")
    store.checkpoint()
    want = sorted(then.items())
    assert list(reader.scan(prefix="p/")) == want
    assert list(reader.scan(prefix="p/", reverse=True)) == want[::-1]
    assert list(reader.scan(start="p/01000", end="p/02000", reverse=True)) == \
        [kv for kv in want if "p/01000" <= kv[0] < "p/02000"][::-1]
    reader.rollback()
