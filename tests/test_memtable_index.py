"""The MemTable's key order (walstore.engine.keyindex): range reads of unapplied commits
find exactly the keys a full scan would, stay bounded, and never miss a key under a
concurrent writer; a store's scans over many unapplied keys give the same answers."""
from __future__ import annotations

import random
import threading
import time

import walstore
from walstore.engine import keyindex
from walstore.engine.keyindex import KeyIndex
from walstore.engine.memtable import MemTable
from walstore.log.format import RecordType
from walstore.log.records import Event


def _commit(lsn: int, writes: list[tuple[bytes, bytes | None]]) -> Event:
    return Event(type=RecordType.COMMIT, lsn=lsn, end=lsn + 10, txid=lsn, body={},
                 writes=writes)


def _brute(versions: dict, lo: bytes, hi: bytes | None, at: int) -> dict:
    out = {}
    for k, vs in versions.items():
        if k >= lo and (hi is None or k < hi):
            for lsn, v in reversed(vs):
                if lsn < at:
                    out[k] = v
                    break
    return out


def _key(rng: random.Random) -> bytes:
    return bytes(rng.randrange(4) for _ in range(rng.randrange(1, 6)))


def test_key_index_orders_like_a_sorted_set(monkeypatch):
    monkeypatch.setattr(keyindex, "CHUNK", 4)  # many chunks and splits at small sizes
    rng = random.Random(1)
    for _round in range(30):
        idx, model = KeyIndex(_key(rng) for _ in range(rng.randrange(20))), None
        model = set(idx.range(b"", None))
        for _ in range(300):
            k = _key(rng)
            idx.add(k)
            model.add(k)
            assert len(idx) == len(model)
            lo, hi = _key(rng), rng.choice([None, _key(rng)])
            assert idx.range(lo, hi) == sorted(x for x in model
                                               if x >= lo and (hi is None or x < hi))


def _items_in_range(mt, lo, hi, at):
    """What a scan as of ``at`` takes from the MemTable: its keys in range, in order,
    with their newest version below ``at``."""
    keys = mt.keys_in_range(lo, hi)
    assert keys == sorted(keys)
    out = {}
    for k in keys:
        found, v = mt.visible(k, at)
        if found:
            out[k] = v
    return out


def test_memtable_range_reads_match_a_full_scan(monkeypatch):
    monkeypatch.setattr(keyindex, "CHUNK", 4)
    rng = random.Random(2)
    mt = MemTable()
    lsn = 1
    for _step in range(3000):
        roll = rng.random()
        if roll < 0.5:
            writes = [(_key(rng), rng.choice([None, b"v%d" % lsn])) for _ in range(3)]
            mt.add(_commit(lsn, writes))
            lsn += 10
            mt.publish(lsn)
        elif roll < 0.7 and len(mt):
            mt.drop_applied(list(mt.events)[:rng.randrange(1, len(mt) + 1)])
        else:
            lo, hi = _key(rng), rng.choice([None, _key(rng)])
            at = rng.randrange(1, lsn + 1)
            assert _items_in_range(mt, lo, hi, at) == _brute(mt.versions, lo, hi, at)


def test_memtable_key_index_stays_bounded_by_the_live_keys():
    mt = MemTable()
    for i in range(40_000):  # distinct keys, applied soon after: few live at any time
        mt.add(_commit(10 * i + 1, [(b"k%08d" % i, b"v")]))
        mt.publish(10 * i + 11)
        if i % 100 == 99:
            mt.drop_applied(list(mt.events))
        if i % 1000 == 0:
            mt.keys_in_range(b"k", None)
    live = len(mt.versions)
    assert live <= 100
    assert len(mt._noted) - mt._folded <= 2 * live + keyindex.SLACK + 100
    assert mt._index is None or len(mt._index) <= 2 * live + keyindex.SLACK + 100
    # no reads at all: the noted keys are still bounded
    quiet = MemTable()
    for i in range(40_000):
        quiet.add(_commit(10 * i + 1, [(b"q%08d" % i, b"v")]))
        if i % 100 == 99:
            quiet.drop_applied(list(quiet.events))
    assert len(quiet._noted) <= 2 * 100 + keyindex.SLACK + 100


def test_concurrent_range_reads_never_miss_a_published_key():
    """A writer adds and drops while readers scan: every key published before a read
    began (and not yet dropped) is found."""
    mt = MemTable()
    stop = threading.Event()
    errors: list[str] = []

    def writer():
        lsn = 1
        rng = random.Random(3)
        while not stop.is_set():
            mt.add(_commit(lsn, [(b"w%06d" % rng.randrange(10**6), b"x")]))
            lsn += 10
            mt.publish(lsn)
            if len(mt) > 500:
                mt.drop_applied(list(mt.events)[:400])

    def reader():
        while not stop.is_set():
            at = mt.published
            got = set(mt.keys_in_range(b"w", None))
            # a version still here after the read was here throughout it (drops only
            # remove; what enters later has an LSN at or above ``at``)
            missing = [k for k, vs in list(mt.versions.items())
                       if k not in got and any(lsn < at for lsn, _ in vs)]
            if missing:
                errors.append(f"missed {missing[:3]}")
                return

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader)
                                                    for _ in range(2)]
    for t in threads:
        t.start()
    threading.Event().wait(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors


def test_store_scans_over_many_unapplied_keys(tmp_path):
    """Scans, prefix scans and reverse scans of a store whose recent commits are still
    unapplied agree with a model, before and after the applier catches up."""
    rng = random.Random(4)
    model: dict[str, bytes] = {}
    with walstore.open(str(tmp_path / "s"), durability="normal", apply_batch=10**6) as st:
        for i in range(300):
            with st.transaction() as tx:
                for _ in range(5):
                    k = f"t{rng.randrange(20)}/k{rng.randrange(400):04d}"
                    if rng.random() < 0.2 and k in model:
                        tx.delete(k)
                        del model[k]
                    else:
                        v = b"%d" % i
                        tx.put(k, v)
                        model[k] = v
            if i % 50 == 0:
                prefix = f"t{rng.randrange(20)}/"
                assert dict(st.scan(prefix=prefix)) == {
                    k: v for k, v in model.items() if k.startswith(prefix)}
        assert dict(st.scan()) == model
        assert [k for k, _ in st.scan(reverse=True)] == sorted(model, reverse=True)
        st.checkpoint()
        assert dict(st.scan()) == model


def test_stats_key_count_is_lmdb_count_corrected_by_the_memtable(tmp_path):
    """``stats()["keys"]`` counts without a scan (LMDB's entry count corrected by the
    unapplied versions): it equals a full scan's count after random puts, deletes and
    re-puts of keys both applied and not, at random apply points, and from a read-only
    store (which scans)."""
    rng = random.Random(11)
    store = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=3600,
                          apply_batch=10**6)
    names = [f"k/{i:03d}" for i in range(300)]
    for round_ in range(40):
        with store.transaction() as tx:
            for _ in range(rng.randrange(1, 30)):
                k = rng.choice(names)
                if rng.random() < 0.35:
                    tx.delete(k)
                else:
                    tx.put(k, round_)
        if rng.random() < 0.3:
            store._engine.apply_published(limit=rng.randrange(1, 5))  # a partial apply
        if rng.random() < 0.1:
            store.checkpoint()
        assert store.stats()["keys"] == sum(1 for _ in store.keys()), round_
    store.sync()
    ro = walstore.open(str(tmp_path / "s"), readonly=True)
    try:
        assert ro.stats()["keys"] == store.stats()["keys"] == sum(1 for _ in store.keys())
    finally:
        ro.close()
        store.close()


def test_stats_key_count_racing_the_applier_never_goes_back(tmp_path):
    """A thread counting keys while another commits new keys and the applier moves them
    into LMDB: every count is one the store had (never down, never past the end)."""
    store = walstore.open(str(tmp_path / "s"), durability="none", apply_batch=50,
                          apply_interval=0.001)
    counts, stop = [], threading.Event()

    def counter():
        while not stop.is_set():
            counts.append(store.stats()["keys"])

    t = threading.Thread(target=counter, daemon=True)
    t.start()
    for i in range(3000):
        with store.transaction() as tx:
            tx.put(f"n/{i:05d}", i)
        if i % 50 == 0:
            time.sleep(0.001)  # (let the counter and the applier run)
    stop.set()
    t.join(30)
    assert len(counts) > 5
    assert counts == sorted(counts) and counts[-1] <= 3000, counts[-20:]
    assert store.stats()["keys"] == 3000
    store.close()


def test_a_hot_keys_versions_grow_in_place_not_copied(tmp_path):
    """Each unapplied version of a key used to rebuild its whole tuple: quadratic in a hot
    key's backlog (a read-only follower catching up on 20,000 of them took over 20 s to
    open).  From its second version a key's chain is one list, appended to."""
    import walstore
    s = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=3600,
                      apply_batch=10**6)
    try:
        mt = s._engine.memtable
        s.run(lambda tx: tx.put("hot", 0))
        assert type(mt.versions[b"shot"]) is tuple  # one version: a tuple (untracked by GC)
        s.run(lambda tx: tx.put("hot", 1))
        chain = mt.versions[b"shot"]
        for i in range(2, 3000):
            s.run(lambda tx: tx.put("hot", i))
            assert mt.versions[b"shot"] is chain  # the same list, grown in place
        assert [v for _l, v in chain][-2:] == [walstore.codec.pack_value(2998),
                                               walstore.codec.pack_value(2999)]
        with walstore.open(str(tmp_path / "s"), readonly=True) as ro:  # a follower's catch-up
            assert ro.get("hot") == 2999
        assert s.get("hot") == 2999
        s._engine.drain()
        assert b"shot" not in mt.versions and s.get("hot") == 2999
    finally:
        s.close()


def test_a_large_backlog_of_new_keys_is_folded_by_one_rebuild(monkeypatch):
    """300,000 keys committed before the first scan were folded into the key order one
    ``add`` at a time (0.7 s before the scan's first row): a backlog larger than a
    quarter of the order is folded by rebuilding it from the live keys, a small one key
    by key.  Either way the order holds exactly the live keys."""
    added = []
    real_add = KeyIndex.add
    monkeypatch.setattr(KeyIndex, "add", lambda self, k: (added.append(k), real_add(self, k)))
    mt = MemTable()
    for i in range(20_000):
        mt.add(_commit(10 * i + 1, [(b"k%08d" % (20_000 - i), b"v")]))
    mt.publish(10 * 20_000 + 1)
    assert mt.keys_in_range(b"k", None) == sorted(mt.versions)
    assert added == []  # (one rebuild: no key added one by one)
    for i in range(10):  # a few more: folded key by key into the order that is there
        mt.add(_commit(10 * (20_000 + i) + 1, [(b"k%08d" % (30_000 + i), b"v")]))
    mt.publish(10 * 20_010 + 1)
    assert mt.keys_in_range(b"k", None) == sorted(mt.versions)
    assert len(added) == 10


def test_scan_order_merge_matches_a_sorted_union():
    """``_in_order`` (a chunk's LMDB keys merged with the MemTable's, lazily) gives the
    union in scan order, each key once, flagged when the MemTable has it."""
    from walstore.engine.snapshot import _in_order
    rng = random.Random(5)
    for _ in range(500):
        rows = {_key(rng) for _ in range(rng.randrange(12))}
        mine = {_key(rng) for _ in range(rng.randrange(12))}
        for reverse in (False, True):
            got = list(_in_order(sorted(rows, reverse=reverse),
                                 sorted(mine, reverse=reverse), reverse))
            assert [k for k, _ in got] == sorted(rows | mine, reverse=reverse)
            assert all(flag == (k in mine) for k, flag in got)


def test_a_scans_first_row_does_not_sort_the_memtables_keys(tmp_path, monkeypatch):
    """A reverse scan stopping at its first row over 60,000 unapplied keys, some already
    in LMDB: it sorted the union of the MemTable's keys in range with each LMDB chunk
    (0.1 s at 300,000 keys); it merges the two orders lazily, sorting only the chunk's
    own keys.  The rows stay right: first rows both ways, and a full scan, as a model."""
    from walstore.engine import snapshot
    sorted_sizes: list[int] = []

    def counting_sorted(items, **kw):
        out = sorted(items, **kw)
        sorted_sizes.append(len(out))
        return out

    with walstore.open(str(tmp_path / "s"), durability="none", apply_batch=10**6,
                       apply_interval=3600) as st:
        with st.transaction() as tx:
            tx.update((f"p/{j:08d}", j) for j in range(0, 20_000))
        st.checkpoint()  # (these in LMDB)
        with st.transaction() as tx:
            tx.update((f"p/{j:08d}", -j) for j in range(10_000, 70_000))
        assert len(st._engine.memtable.versions) == 60_000  # (not applied yet)
        monkeypatch.setattr(snapshot, "sorted", counting_sorted, raising=False)
        assert next(iter(st.scan(prefix="p/", reverse=True))) == ("p/00069999", -69999)
        assert next(iter(st.scan(prefix="p/"))) == ("p/00000000", 0)
        assert max(sorted_sizes, default=0) <= snapshot.FIRST_CHUNK + 64
        monkeypatch.undo()
        rows = list(st.scan(prefix="p/", reverse=True))
        assert rows == [(f"p/{j:08d}", j if j < 10_000 else -j)
                        for j in range(69_999, -1, -1)]
