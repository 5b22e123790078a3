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
- Step two of validation (under the commit lock) sought the history of every key the
  transaction read in LMDB whenever the applier had moved since step one: 200,000 keys
  read held every commit of the process for ~1 s (20,000: 20,000 seeks under the lock).
  It walks the commits applied between the steps instead, testing what they wrote, and
  seeks per key only when those commits outnumber the keys read
  (``test_step_two_of_a_big_read_sets_validation_walks_the_new_commits_not_every_key``;
  ``test_a_read_key_written_between_the_steps_still_conflicts`` guards both ways).
  Step one sought them all in one LMDB read: a map resize waited for every seek; now
  4,096 keys per read (``test_a_map_resize_does_not_wait_for_the_seeks_of_a_big_read_set``).
  Step two's MemTable part looked up every key read as well (200,000: ~70 ms under the
  lock); it reads the commits since the snapshot still there when they wrote fewer keys
  (``test_step_two_looks_up_the_memtables_new_commits_not_every_key_read``).  And while
  anything was prepared, each key read was looked up in the prepared writes under the
  lock; the smaller side is walked now
  (``test_a_big_read_set_is_checked_against_a_prepared_transaction_by_its_few_keys``).
- A scan whose start was past its end (it reads nothing) conflicted with any purge
  across its bounds, and, read after such a purge, raised SnapshotTooOld
  (``test_an_empty_range_scanned_meets_no_purge``).

``test_interleaved_transactions_agree_with_a_serializable_occ_model`` holds up to four
interleaved transactions (reads, scans, savepoints, commits in any order, checkpoints
between) to a plain model of snapshot reads and serializable OCC.
"""
from __future__ import annotations

import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---- a model of interleaved transactions ---------------------------------------------
KEYS = ["a", "a/1", "a/2", "b", "c", b"a", b"a/1", b"\xff"]
BOUNDS = [(None, None, None), ("a", None, None), (None, "a/1", "b"), (None, "b", None),
          (b"a", None, None), (None, b"\x00", b"\xff"), (None, None, "a/2")]
T = st.integers(0, 3)  # four transactions open at once
OPS = st.one_of(
    st.tuples(st.just("get"), T, st.sampled_from(KEYS)),
    st.tuples(st.just("in"), T, st.sampled_from(KEYS)),
    st.tuples(st.just("scan"), T, st.sampled_from(BOUNDS), st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("put"), T, st.sampled_from(KEYS)),
    st.tuples(st.just("delete"), T, st.sampled_from(KEYS)),
    st.tuples(st.just("commit"), T),
    st.tuples(st.just("rollback"), T),
    st.tuples(st.just("savepoint"), T),
    st.tuples(st.just("rollback_to"), T),
    st.tuples(st.just("checkpoint"),),
)


def _order(k):
    return (0, k) if isinstance(k, bytes) else (1, k.encode())


def _inside(k, prefix, start, end) -> bool:
    kind = next((type(b) for b in (prefix, start, end) if b is not None), None)
    if kind is not None and type(k) is not kind:
        return False
    return ((prefix is None or k.startswith(prefix)) and (start is None or k >= start)
            and (end is None or k < end))


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    s = walstore.open(str(tmp_path_factory.mktemp("model55") / "s"), durability="none")
    yield s
    s.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=60))
def test_interleaved_transactions_agree_with_a_serializable_occ_model(model_store, ops):
    """Up to four transactions open at once, each reading (get, in, scans both ways, some
    stopped early), writing, with savepoints, committing or rolling back in any order,
    checkpoints between: each read is the transaction's snapshot (taken at its first read
    of the store) under its own writes, and a commit conflicts exactly when a commit since
    that snapshot wrote a key it read or into a range it scanned."""
    store = model_store
    committed = dict(store.scan()) | dict(store.scan(prefix=b""))
    commits: list[set] = []  # the keys each commit wrote, in order
    txs: dict = {}
    counter = [0]

    def tx(i):
        if i not in txs:
            txs[i] = dict(t=store.transaction(), own={}, snap=None, reads=set(), ranges=[],
                          sps=[])
        return txs[i]

    def view(m):
        v = dict(m["snap"][1] if m["snap"] else committed)
        for k, x in m["own"].items():
            if x is None:
                v.pop(k, None)
            else:
                v[k] = x
        return v

    def fix(m):
        if m["snap"] is None:
            m["snap"] = (len(commits), dict(committed))
    for op in ops:
        if op[0] == "checkpoint":
            store.checkpoint()
            continue
        kind, m = op[0], tx(op[1])
        t = m["t"]
        if kind in ("get", "in"):
            k = op[2]
            if k not in m["own"]:
                fix(m)
                m["reads"].add(k)
            want = view(m).get(k, "absent")
            if kind == "get":
                assert t.get(k, "absent") == want
            else:
                assert (k in t) == (want != "absent")
        elif kind == "scan":
            fix(m)
            m["ranges"].append(op[2])
            want = sorted(((k, x) for k, x in view(m).items() if _inside(k, *op[2])),
                          key=lambda kv: _order(kv[0]), reverse=op[3])
            it = t.scan(*op[2], reverse=op[3])
            if op[4] == 0:
                assert list(it) == want
            else:  # (stopped early: the whole range counts all the same)
                assert [x for _, x in zip(range(op[4]), it)] == want[:op[4]]
        elif kind == "put":
            counter[0] += 1
            m["own"][op[2]] = counter[0]
            t.put(op[2], counter[0])
        elif kind == "delete":
            m["own"][op[2]] = None
            t.delete(op[2])
        elif kind == "savepoint":
            m["sps"].append((t.savepoint(), dict(m["own"])))
        elif kind == "rollback_to" and m["sps"]:
            sp, own = m["sps"][0]
            t.rollback_to(sp)
            m["own"] = dict(own)
            del m["sps"][1:]
        elif kind == "rollback":
            t.rollback()
            del txs[op[1]]
        elif kind == "commit":
            del txs[op[1]]
            conflict = m["snap"] is not None and any(
                any(k in m["reads"] or any(_inside(k, *b) for b in m["ranges"]) for k in w)
                for w in commits[m["snap"][0]:])
            if conflict:
                with pytest.raises(walstore.ConflictError):
                    t.commit()
            else:
                t.commit()
                if m["own"]:
                    commits.append(set(m["own"]))
                    for k, x in m["own"].items():
                        if x is None:
                            committed.pop(k, None)
                        else:
                            committed[k] = x
    for m in txs.values():
        m["t"].rollback()
    assert dict(store.scan()) | dict(store.scan(prefix=b"")) == committed


def _between_the_steps(store, monkeypatch, between):
    """``between()`` runs after a commit's validation step one (no lock) and before step
    two (under the commit lock); returns a counter of the history seeks step two makes."""
    real_applied = conflicts.ConflictChecker.check_applied
    real_recent = conflicts.ConflictChecker.check_recent
    real_hist_key = tables.hist_key
    inside = [False]
    seeks = [0]

    def applied(self, txid, reads):
        out = real_applied(self, txid, reads)
        between()
        store._engine.drain()  # (applied to LMDB: step two meets it there)
        return out

    def recent(self, *a):
        inside[0] = True
        try:
            return real_recent(self, *a)
        finally:
            inside[0] = False

    def hist_key(*a):
        seeks[0] += inside[0]
        return real_hist_key(*a)
    monkeypatch.setattr(conflicts.ConflictChecker, "check_applied", applied)
    monkeypatch.setattr(conflicts.ConflictChecker, "check_recent", recent)
    monkeypatch.setattr(tables, "hist_key", hist_key)
    return seeks


def test_step_two_of_a_big_read_sets_validation_walks_the_new_commits_not_every_key(
        store, monkeypatch):
    """Under the commit lock, the LMDB part of validation looked up the history of every
    key the transaction read (20,000 seeks; 200,000 keys held every commit of the process
    for ~1 s) whenever a commit was applied between its two steps; it reads the commits
    applied meanwhile instead (a seek per key only when they outnumber the keys)."""
    with store.transaction() as t:
        t.update({f"k/{i}": i for i in range(20_000)})
    store.checkpoint()
    tx = store.transaction()
    for i in range(20_000):
        assert tx.get(f"k/{i}") == i
    tx.put("out", 1)

    def other():
        with store.transaction() as o:
            o.put("elsewhere", 1)
    seeks = _between_the_steps(store, monkeypatch, other)
    tx.commit()
    assert seeks[0] == 0, f"{seeks[0]:,} history seeks under the commit lock"
    assert store.get("out") == 1


@pytest.mark.parametrize("commits", [1, 50])
@pytest.mark.parametrize("scanned", [False, True])
def test_a_read_key_written_between_the_steps_still_conflicts(store, monkeypatch, commits,
                                                             scanned):
    """(Either way: the new commits walked, or, more of them than keys read, a seek per
    key; with a scanned range too, the walk.)"""
    with store.transaction() as t:
        t.update({f"k/{i}": i for i in range(20)})
    tx = store.transaction()
    for i in range(20):
        tx.get(f"k/{i}")
    if scanned:
        assert list(tx.scan(prefix="q/")) == []
    tx.put("out", 1)

    def others():
        for i in range(commits):
            with store.transaction() as o:
                o.put(f"elsewhere/{i}", 1)
        with store.transaction() as o:
            o.put("k/7", "changed")
        for i in range(commits):
            with store.transaction() as o:
                o.put(f"elsewhere/{i}", 2)
    _between_the_steps(store, monkeypatch, others)
    with pytest.raises(walstore.ConflictError, match="k/7"):
        tx.commit()
    assert store.get("out") is None


def test_a_map_resize_does_not_wait_for_the_seeks_of_a_big_read_set(store, monkeypatch):
    """Step one of validation sought every read key's history in one LMDB read: a map
    resize (and every reader and committer behind it) waited for all of them."""
    n = 6_000
    with store.transaction() as t:
        t.update({f"k/{i}": i for i in range(n)})
    tx = store.transaction()
    for i in range(n):
        tx.get(f"k/{i}")
    tx.put("out", 1)
    with store.transaction() as t:
        t.put("elsewhere", 1)  # (a commit since its snapshot: LMDB is read for it)
    store.checkpoint()
    gate = store._engine.state.gate
    me = threading.get_ident()
    seen = [0]
    resized = threading.Event()
    waited: list[bool] = []
    real = tables.hist_key

    def counted(*a):
        if threading.get_ident() == me:
            seen[0] += 1
            if seen[0] == 1:
                threading.Thread(target=gate.exclusive, args=(resized.set,),
                                 daemon=True).start()
                deadline = time.monotonic() + 20
                while not gate.paused and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert gate.paused
            elif seen[0] == n - 100:
                waited.append(resized.wait(20))
        return real(*a)
    monkeypatch.setattr(tables, "hist_key", counted)
    tx.commit()
    assert seen[0] >= n - 100
    assert waited == [True], "the map resize waited for every key's seek"
    assert store.get("out") == 1


def test_step_two_looks_up_the_memtables_new_commits_not_every_key_read(store, monkeypatch):
    """Under the commit lock, the MemTable part of validation looked up every key read
    (200,000 keys: ~70 ms of every other commit's wait); it reads the commits since the
    snapshot still there instead, when they wrote fewer keys than were read."""
    from walstore.engine.memtable import MemTable
    with store.transaction() as t:
        t.update({f"k/{i}": i for i in range(20_000)})
    tx = store.transaction()
    for i in range(20_000):
        tx.get(f"k/{i}")
    tx.put("out", 1)
    with store.transaction() as t:
        t.put("elsewhere", 1)
    looked = [0]
    real = MemTable.last_write

    def counted(self, key):
        looked[0] += 1
        return real(self, key)
    monkeypatch.setattr(MemTable, "last_write", counted)
    tx.commit()
    assert looked[0] < 100, f"{looked[0]:,} MemTable lookups under the commit lock"
    tx2 = store.transaction()
    assert tx2.get("k/5") == 5
    tx2.put("out2", 1)
    with store.transaction() as t:
        t.put("k/5", "changed")
    with pytest.raises(walstore.ConflictError, match="k/5"):
        tx2.commit()


def test_a_conflict_names_a_key_written_twice_since_once(store):
    tx = store.transaction()
    tx.get("a")
    tx.get("b")
    tx.put("out", 1)
    for v in (1, 2):
        with store.transaction() as t:
            t.put("a", v)
    with pytest.raises(walstore.ConflictError) as e:
        tx.commit()
    assert "['a']" in str(e.value)


def test_a_big_read_set_is_checked_against_a_prepared_transaction_by_its_few_keys(store):
    """While a transaction was prepared (in doubt), every commit looked each key it read
    up in the prepared writes, under the commit lock (20,000 lookups for one held key);
    the smaller side is walked now."""
    p = store.transaction()
    p.put("held", 1)
    p.prepare("g55")
    tx = store.transaction()
    for i in range(20_000):
        tx.get(f"k/{i}")
    tx.put("out", 1)
    looked = [0]

    class Counted(dict):
        def get(self, *a):
            looked[0] += 1
            return super().get(*a)
    prepared = store._engine.prepared
    prepared._written = Counted(prepared._written)
    tx.commit()
    assert looked[0] < 100, f"{looked[0]:,} lookups of read keys in the prepared writes"
    tx2 = store.transaction()
    for i in range(200):
        tx2.get(f"k/{i}")
    tx2.get("held")
    tx2.put("out2", 1)
    with pytest.raises(walstore.ConflictError, match="held"):
        tx2.commit()
    store.commit_prepared("g55")
    assert store.get("held") == 1 and store.get("out") == 1 and store.get("out2") is None


def test_an_empty_range_scanned_meets_no_purge(store):
    """A scan whose start is past its end reads nothing, so nothing conflicts with it; a
    purge across its bounds did (a purge tests ranges by overlap, and an inverted range
    "overlapped" every purge covering its ends)."""
    with store.transaction() as t:
        t.put("p/5", 1)
    tx = store.transaction()
    assert list(tx.scan(start="p/9", end="p/1")) == []
    assert list(tx.scan(prefix="p/", start="p/9", end="p/1", reverse=True)) == []
    tx.put("out", 1)
    store.purge("p/")
    tx.commit()
    assert store.get("out") == 1
    # nor, read after the purge, is it a SnapshotTooOld (it has nothing to read)
    with store.transaction() as t:
        t.put("p/5", 2)
    tx = store.transaction()
    assert tx.get("out") == 1
    store.purge("p/")
    assert list(tx.scan(start="p/9", end="p/1")) == []
    assert list(tx.scan(start="p/9", end="p/1", reverse=True)) == []
    tx.rollback()
