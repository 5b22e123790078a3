"""The applier's column-at-a-time path for runs of plain commits (apply._plain_run) and
its pieces: it writes LMDB byte for byte as the event-by-event loop does."""
from __future__ import annotations

import random

import pytest

import walstore
from walstore.codec import pack
from walstore.engine import apply as apply_mod
from walstore.engine import tables
from walstore.engine.apply import Applier
from walstore.engine.lmdb_state import TABLES, LmdbState
from walstore.engine.memtable import PlainBatch


def _dump(state: LmdbState) -> dict:
    out = {}
    with state.env.begin() as txn:
        for name in TABLES:
            db = getattr(state, name)
            if db is None:
                continue
            out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
    return out


def _one_by_one(events, plain=False):
    return events  # (no list among them: every event through the loop)


def _apply_both(tmp_path, monkeypatch, seed, batches):
    """Apply ``seed`` then each of ``batches`` to two fresh LMDB states, one through the
    event-by-event loop, one as the applier does now; the two dumps."""
    dumps = []
    for name, slow in (("slow", True), ("fast", False)):
        state = LmdbState(str(tmp_path / name))
        try:
            applier = Applier(state)
            with monkeypatch.context() as m:
                m.setattr(apply_mod, "_segments", _one_by_one)
                if seed:
                    applier.apply(seed, seed[-1].end)
            with monkeypatch.context() as m:
                if slow:
                    m.setattr(apply_mod, "_segments", _one_by_one)
                for batch in batches:
                    applier.apply(batch, batch[-1].end)
            dumps.append(_dump(state))
        finally:
            state.close()
    return dumps


def _events(store):
    return list(store._engine.memtable.events)


def _open(path):
    return walstore.open(str(path), durability="none", apply_interval=86400,
                         apply_batch=10 ** 9, max_unapplied=10 ** 6)


def test_mixed_commits_write_what_the_loop_writes(tmp_path, monkeypatch):
    rng = random.Random(63)
    s = _open(tmp_path / "store")
    try:
        for i in range(40):  # seed: keys the batch then updates or deletes
            with s.transaction() as tx:
                tx.put(b"k/%03d" % i, b"seed%d" % i)
        seed = _events(s)
        for i in range(300):
            r = rng.random()
            with s.transaction() as tx:
                if r < 0.4:
                    tx.put(b"new/%05d" % i, b"v" * rng.randrange(0, 300))
                elif r < 0.55:
                    tx.put(b"k/%03d" % rng.randrange(60), b"upd%d" % i)  # seeded or new
                elif r < 0.62:
                    tx.delete(b"k/%03d" % rng.randrange(60))
                elif r < 0.7:
                    tx.put(b"hot", b"%d" % i)  # a key written again and again
                elif r < 0.8:
                    for j in range(rng.randrange(2, 80)):  # many writes, mixed lengths
                        tx.put(b"m/%d/" % i + b"x" * rng.randrange(1, 300), b"%d" % j)
                elif r < 0.85:
                    tx.put(b"z" * rng.randrange(200, 70000 // 256), b"w")  # long keys
                else:
                    tx.put(b"k/%03d" % rng.randrange(40), b"big" * 30000)  # big values
        with s.transaction() as tx:  # a bulk commit (its own path) amid the runs
            tx.update([(b"bulk/%04d" % i, b"b") for i in range(300)])
        with s.transaction() as tx:
            tx.put(b"after-bulk", b"1")
        events = _events(s)[len(seed):]
        assert any(type(e._body) is not dict for e in events)
        slow, fast = _apply_both(tmp_path, monkeypatch, seed,
                                 [events[:97], events[97:250], events[250:]])
        assert fast == slow
        assert len(fast["hist"]) > 300 and fast["txns"]
    finally:
        s.close()


def test_runs_between_other_events(tmp_path, monkeypatch):
    """Plain commits between commits that are not plain (an action, a restore point, a
    scope): the runs stop at them; the rows are the loop's, the inflight row goes."""
    s = walstore.open(str(tmp_path / "store"), durability="none", apply_interval=86400,
                      apply_batch=10 ** 9, compensators={"undo": lambda *a, **k: None})
    try:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(b"a%d" % i, b"1")
        s.restore_point("p1")
        with s.transaction(meta={"who": "me"}, scope="sc") as tx:
            tx.put(b"a0", b"2")
        with s.transaction() as tx:  # an action: its intent puts an inflight row
            with tx.action("step", args={"i": 1}, compensate="undo") as act:
                act.result = 1
            tx.put(b"acted", b"1")
        with pytest.raises(RuntimeError):
            with s.transaction() as tx:
                with tx.action("step", args={"i": 2}, compensate="undo") as act:
                    act.result = 2
                raise RuntimeError("roll back")
        for i in range(5):
            with s.transaction() as tx:
                tx.put(b"b%d" % i, b"1")
                tx.delete(b"a%d" % i)
        events = _events(s)
        slow, fast = _apply_both(tmp_path, monkeypatch, [], [events])
        assert fast == slow
    finally:
        s.close()


def test_store_reads_after_the_fast_apply(tmp_path):
    """Through the public API: the values, history and log of plain commits applied."""
    s = _open(tmp_path / "store")
    try:
        for i in range(50):
            with s.transaction() as tx:
                tx.put(b"key%d" % (i % 7), b"v%d" % i)
                if i % 5 == 0:
                    tx.delete(b"key%d" % ((i + 1) % 7))
        want = {b"key%d" % k: s.get(b"key%d" % k) for k in range(7)}
        s._engine.drain()
        assert not s._engine.memtable.events
        assert {k: s.get(k) for k in want} == want
        hist = list(s.history(b"key3"))
        assert len(hist) >= 7
        assert len(list(s.log())) >= 50
    finally:
        s.close()
    s = walstore.open(str(tmp_path / "store"), durability="none")
    try:
        assert {k: s.get(k) for k in want} == want
    finally:
        s.close()


@pytest.mark.parametrize("inside", [None, b"new/00050x", b"new/00099", b"new/00000",
                                    b"new/", b"new/00100"])
def test_new_keys_into_a_range_lmdb_holds_nothing_in_or_not(tmp_path, monkeypatch, inside):
    """A run of new keys: its range is looked at once (nothing there: no key looked up),
    a key stored inside it (or at its ends) makes each key looked up."""
    s = _open(tmp_path / "store")
    try:
        with s.transaction() as tx:
            tx.put(b"a", b"1")
            tx.put(b"zzz", b"1")
            if inside is not None:
                tx.put(inside, b"there")
        seed = _events(s)
        for i in range(100):
            with s.transaction() as tx:
                tx.put(b"new/%05d" % i, b"v%d" % i)
        events = _events(s)[len(seed):]
        slow, fast = _apply_both(tmp_path, monkeypatch, seed, [events])
        assert fast == slow
        stored = {b"a", b"zzz", inside} - {None} | {b"new/%05d" % i for i in range(100)}
        assert [k for k, _v in fast["hkeys"]] == sorted(b"b" + k for k in stored)
    finally:
        s.close()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1,
                               2 ** 32, 2 ** 63])
def test_a_packer_packs_as_codec_pack(n):
    packer = apply_mod._new_packer()
    assert packer.pack((n, None)) == pack([n, None])
    assert packer.pack((n, b"x" * 300)) == pack([n, b"x" * 300])
    row = {"lsn": n, "end": n + 1, "w": [[b"k", None]]}
    assert (b"\x83" + apply_mod._LSN_KEY + packer.pack((n, "end", n + 1, "w", ((b"k", None),)))[1:]
            == pack(row))


@pytest.mark.parametrize("cut", [None, 3, 650])
def test_a_run_whose_lsns_change_form(tmp_path, monkeypatch, cut):
    """Single-put commits from a new log's start past LSN 65,536: msgpack packs LSNs in
    1, 2, 3 then 5 bytes; the joined rows are cut where the form changes."""
    s = _open(tmp_path / "store")
    try:
        for i in range(800):
            with s.transaction() as tx:
                tx.put(b"key/%06d" % i, b"v" * 90)
        events = _events(s)
        assert events[0].lsn < 128 and events[-1].end > 1 << 16
        batches = [events] if cut is None else [events[:cut], events[cut:]]
        slow, fast = _apply_both(tmp_path, monkeypatch, [], batches)
        assert fast == slow
    finally:
        s.close()


def _memtable_with(events):
    from walstore.engine.memtable import MemTable
    mt = MemTable()
    for e in events:
        mt.add(e)
    mt.publish(events[-1].end)
    return mt


def _plain_events(n, rng):
    from walstore.log.format import RecordType
    from walstore.log.records import Event
    out, lsn = [], 100
    for txid in range(1, n + 1):
        writes = []
        for _ in range(rng.choice((1, 1, 1, 2, 5))):
            k = (b"hot" if rng.random() < 0.2 else b"k%d" % rng.randrange(3 * n))
            if k not in dict(writes):
                writes.append((k, None if rng.random() < 0.1 else b"\xa1v"))
        end = lsn + 50 + 10 * len(writes)
        out.append(Event(lsn, end, RecordType.COMMIT, txid,
                         pack({"tx": txid, "ts": 1.0, "meta": None}), tuple(writes)))
        lsn = end
    return out


def _state(mt):
    return (list(mt.events), {k: list(v) for k, v in mt.versions.items()},
            dict(mt.commits), mt.log_bytes, mt.memory, mt.drops,
            mt.visible(b"hot", 1 << 40))


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_the_plain_drop_leaves_what_the_general_drop_leaves(chunk):
    rng = random.Random(chunk)
    events = _plain_events(400, rng)
    general, plain = _memtable_with(events), _memtable_with(events)
    applied = 0
    while applied < 300:  # (the rest stays: chains cut, not dropped)
        batch = events[applied:applied + chunk]
        general.drop_applied(batch)
        plain.drop_applied(PlainBatch(batch))
        applied += len(batch)
        assert _state(plain) == _state(general)
    general.drop_applied(events[applied:])
    plain.drop_applied(PlainBatch(events[applied:]))  # (the last: all leave at once)
    assert _state(plain) == _state(general)
    assert not plain.events and not plain.versions and not plain.commits


def test_the_engine_drops_a_plain_batch_the_plain_way(tmp_path, monkeypatch):
    from walstore.engine.memtable import MemTable
    seen = []
    real = MemTable.drop_applied
    monkeypatch.setattr(MemTable, "drop_applied",
                        lambda self, batch: (seen.append(type(batch) is PlainBatch),
                                             real(self, batch)))
    s = _open(tmp_path / "store")
    try:
        for i in range(100):
            with s.transaction() as tx:
                tx.put(b"k%d" % (i % 10), b"v")
        s._engine.drain()
        assert seen and all(seen)
        seen.clear()
        s.restore_point("p")  # (not a commit: the batch is not plain)
        with s.transaction() as tx:
            tx.put(b"k", b"v")
        s._engine.drain()
        assert seen == [False]
        assert s.get(b"k3") == b"v" and not s._engine.memtable.events
    finally:
        s.close()


@pytest.mark.parametrize("order", ["rising", "shuffled", "falling", "repeats"])
@pytest.mark.parametrize("n", [10, 300])
def test_put_columns_puts_what_put_rows_puts(tmp_path, order, n):
    rng = random.Random(n)
    keys = [b"k%06d" % i for i in range(n)]
    if order == "shuffled":
        rng.shuffle(keys)
    elif order == "falling":
        keys.reverse()
    elif order == "repeats":
        keys = keys + keys[: n // 3]
    vals = [b"v%d" % i for i in range(len(keys))]
    dumps = []
    for name, columns in (("rows", False), ("cols", True)):
        state = LmdbState(str(tmp_path / name))
        try:
            def body(txn):
                txn.put(b"k000005", b"old", db=state.hkeys)  # (a row there already)
                for overwrite, db in ((True, state.data), (False, state.hkeys)):
                    if order == "repeats" and overwrite:
                        continue  # (put_rows: distinct keys unless overwrite=False)
                    if columns:
                        apply_mod._put_columns(txn, db, keys, vals, overwrite)
                    else:
                        apply_mod._put_rows(txn, db, list(zip(keys, vals)), overwrite)
            state.write(body)
            dumps.append(_dump(state))
        finally:
            state.close()
    assert dumps[0] == dumps[1]


@pytest.mark.parametrize("shape", ["new", "seeded", "then-more", "two-lengths"])
def test_one_sort_for_a_run_of_scattered_keys(tmp_path, monkeypatch, shape):
    """A run of 600 single-put commits of one-length keys scattered over the key order:
    one index sort serves its history rows, new-key marks and data rows; the same LMDB
    as the loop's, seeded keys in the range or not, more events after the run."""
    from walstore.benchmark.data import distinct_key
    s = _open(tmp_path / "store")
    try:
        with s.transaction() as tx:
            tx.put(b"zz", b"1")
            if shape == "seeded":
                for i in range(0, 600, 7):
                    tx.put(distinct_key(i), b"seed")
        seed = _events(s)
        for i in range(600):
            with s.transaction() as tx:
                key = distinct_key(i)
                tx.put(key + b"x" * (i % 2) if shape == "two-lengths" else key, b"v%d" % i)
        if shape == "then-more":
            s.restore_point("p")
            for i in range(0, 600, 5):  # values replaced, then keys added
                with s.transaction() as tx:
                    tx.put(distinct_key(i), b"again")
            with s.transaction() as tx:
                tx.put(b"added", b"1")
        events = _events(s)[len(seed):]
        slow, fast = _apply_both(tmp_path, monkeypatch, seed, [events])
        assert fast == slow
    finally:
        s.close()
