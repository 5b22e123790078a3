"""A transaction's scan reads its own writes in order without a pass over its whole write
set (a scan beside 100,000 writes cost ~7 ms, 1,000 of them 7 s: now what it reads).
The write set's key order is kept from the dict's insertion order (engine.transaction's
``_WriteOrder``); these tests hold scans against a plain model through puts, rewrites,
deletes, bulk updates, rollbacks to savepoints and both directions, and count the keys a
scan touches rather than time it."""
from __future__ import annotations

import random

import pytest

import walstore


@pytest.mark.parametrize("seed", range(6))
def test_scans_inside_a_transaction_match_a_model(tmp_path, seed):
    rng = random.Random(seed)
    keys = [f"k/{i:05}" for i in range(3000)]
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            base = {k: i for i, k in enumerate(rng.sample(keys, 800))}
            tx.update(base)
        model = dict(base)
        tx = s.transaction()
        marks = []
        for step in range(1500):
            r = rng.random()
            if r < 0.45:
                k = rng.choice(keys)
                tx.put(k, step)
                model[k] = step
            elif r < 0.6:
                k = rng.choice(keys)
                tx.delete(k)
                model.pop(k, None)
            elif r < 0.65:
                batch = {k: -step for k in rng.sample(keys, 40)}
                tx.update(batch)
                model.update(batch)
            elif r < 0.7:
                marks.append((tx.savepoint(), dict(model)))
            elif r < 0.74 and marks:
                sp, saved = marks.pop(rng.randrange(len(marks)))
                tx.rollback_to(sp)
                model = saved
                marks = [m for m in marks if m[0].active]
            else:
                a, b = sorted(rng.sample(range(3000), 2))
                lo, hi = f"k/{a:05}", f"k/{b:05}"
                reverse = rng.random() < 0.3
                want = sorted(((k, v) for k, v in model.items() if lo <= k < hi),
                              reverse=reverse)
                assert list(tx.scan(start=lo, end=hi, reverse=reverse)) == want, step
        assert list(tx.scan(prefix="k/")) == sorted(model.items())
        tx.commit()
        assert list(s.scan(prefix="k/")) == sorted(model.items())


def test_a_scan_beside_a_large_write_set_touches_only_its_range(tmp_path):
    """Counted: after the first scan orders the write set, later scans take a range of
    that order (the keys they return), never a pass over the 20,000 written."""
    passes = []

    class CountingDict(dict):  # (a pass over the write set goes through items())
        def items(self):
            passes.append(len(self))
            return super().items()

    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        for i in range(20000):
            tx.put(f"w/{i:06}", i)
        tx._writes = CountingDict(tx._writes)  # (same keys, same insertion order)
        assert list(tx.scan(prefix="w/00001")) == [(f"w/{i:06}", i) for i in range(10, 20)]
        for j in range(100):
            tx.put(f"w/new{j:03}", j)  # (keys put since the last scan join the order)
            tx.delete(f"w/{j:06}")
            assert list(tx.scan(prefix=f"w/new{j:03}")) == [(f"w/new{j:03}", j)]
            assert list(tx.scan(prefix=f"w/{j:06}")) == []
        assert passes == []
        sp = tx.savepoint()
        tx.put("w/late", 1)
        tx.rollback_to(sp)  # (a key left the write set: the order is made again)
        assert list(tx.scan(prefix="w/late")) == [] and passes == []
        tx.rollback()
