"""A transaction's scanned ranges are tested against the keys written since its snapshot
by one bisect a key (engine.conflicts.RangeSet), not a pass over every range: 10,000
scanned ranges beside 10,000 commits since made a 7 s commit, under the commit lock every
other writer waits on (now ~0.01 s).  The same for a prepared transaction's scanned
ranges, which every commit is tested against.  Counted, not timed; and the conflicts
found are the same as a plain pass finds."""
from __future__ import annotations

import random

import pytest

import walstore
from walstore.engine import conflicts
from walstore.engine.conflicts import RangeSet


def test_a_range_set_holds_what_its_ranges_hold():
    rng = random.Random(7)
    alphabet = [bytes([c]) for c in b"abcdef"]

    def word():
        return b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
    for _ in range(400):
        ranges = []
        for _ in range(rng.randint(0, 8)):
            lo, hi = sorted((word(), word()))
            ranges.append((lo, None if rng.random() < 0.1 else hi))
        rs = RangeSet(ranges)
        for _ in range(40):
            k = word()
            assert (k in rs) == conflicts._in_ranges(k, ranges), (ranges, k)
        assert bool(rs) == any(hi is None or lo < hi for lo, hi in ranges)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = conflicts._in_ranges

    def counting(key, ranges):
        calls.append(len(ranges))
        return real(key, ranges)
    monkeypatch.setattr(conflicts, "_in_ranges", counting)
    return calls


def _scanner(s, n):
    with s.transaction() as t:
        t.update({f"base/{i:05}": i for i in range(n)})
    tx = s.transaction()
    for i in range(n):
        list(tx.scan(prefix=f"base/{i:05}"))
    return tx


@pytest.mark.parametrize("applied", [False, True], ids=["memtable", "lmdb"])
def test_many_scanned_ranges_cost_a_bisect_per_key_written_since(tmp_path, counted,
                                                                    applied):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = _scanner(s, 2000)
        for i in range(300):
            with s.transaction() as t:
                t.put(f"other/{i}", i)
        if applied:
            s.checkpoint()  # (the commits since the snapshot are read from LMDB)
        tx.put("mine", 1)
        tx.commit()
        assert counted == []  # (was one pass over the 2,000 ranges a key written since)
        tx = _scanner(s, 2000)  # a write in one of the ranges still conflicts
        with s.transaction() as t:
            t.put("base/01234", "moved")
        if applied:
            s.checkpoint()
        tx.put("mine", 2)
        with pytest.raises(walstore.ConflictError, match="base/01234"):
            tx.commit()
        assert s.get("mine") == 1


def test_commits_beside_a_prepared_transaction_with_many_ranges(tmp_path, counted):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = _scanner(s, 2000)
        tx.put("mine", 1)
        tx.prepare("g1")
        for i in range(300):
            with s.transaction() as t:
                t.put(f"other/{i}", i)
        with pytest.raises(walstore.ConflictError, match="prepared"):
            with s.transaction() as t:
                t.put("base/00777", "into a held range")
        assert counted == []
        s.commit_prepared("g1")
        with s.transaction() as t:
            t.put("base/00777", "free now")
