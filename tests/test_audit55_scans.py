"""Audit 55, scans and iteration: store.scan, tx.scan and at(point).scan against a model.

Findings (each test named below fails on the code before its fix): see the tests.
"""
from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import walstore

# a small alphabet of keys, both types, with the awkward bytes (0x00, 0xff) and non-ASCII
_STR_KEYS = ["a", "a/", "a/1", "a/2", "ab", "b", "é", "éa", "\uffff", "\U0010ffff"]
_BYTES_KEYS = [b"\x00", b"a", b"a/1", b"\xff", b"\xfe\xff", b"\xff\xfe", b"\xff\xff",
               b"\xff\xff\x00", b"\xff\xff\xff"]
_KEYS = _STR_KEYS + _BYTES_KEYS
_BOUNDS_STR = ["", "a", "a/", "a/1", "b", "é", "\uffff", "\U0010ffff"]
_BOUNDS_BYTES = [b"", b"\x00", b"a", b"\xff", b"\xff\xff", b"\xff\xff\xff", b"\xfe"]

keys = st.sampled_from(_KEYS)
ops = st.lists(st.tuples(st.sampled_from(["put", "del"]), keys, st.integers(0, 9)),
               max_size=12)


@st.composite
def bounds(draw):
    space = draw(st.sampled_from([None, str, bytes]))
    if space is None:
        return {}
    pool = _BOUNDS_STR if space is str else _BOUNDS_BYTES
    out = {}
    for name in ("prefix", "start", "end"):
        if draw(st.booleans()):
            out[name] = draw(st.sampled_from(pool))
    return out


def _order(k):
    """The documented order: every bytes key before every str key; each by its bytes."""
    return (1, k.encode("utf-8")) if isinstance(k, str) else (0, k)


def model_scan(state: dict, b: dict, reverse: bool) -> list:
    out = []
    for k in sorted(state, key=_order):
        if b:
            space = str if isinstance(next(iter(b.values())), str) else bytes
            if not isinstance(k, space):
                continue
            if "prefix" in b and not k.startswith(b["prefix"]):
                continue
            kb, enc = _order(k)[1], (lambda x: x.encode() if isinstance(x, str) else x)
            if "start" in b and kb < enc(b["start"]):
                continue
            if "end" in b and kb >= enc(b["end"]):
                continue
        out.append((k, state[k]))
    return out[::-1] if reverse else out


def _apply(target, model, batch):
    for op, k, v in batch:
        if op == "put":
            target.put(k, v)
            model[k] = v
        else:
            target.delete(k)
            model.pop(k, None)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(commits=st.lists(ops, max_size=4), mine=ops, b=bounds(), reverse=st.booleans(),
       ckpt=st.lists(st.booleans(), min_size=4, max_size=4))
def test_scans_match_a_dict_model(commits, mine, b, reverse, ckpt):
    with tempfile.TemporaryDirectory() as d:
        s = walstore.open(os.path.join(d, "s"), durability="none")
        try:
            model, points = {}, []
            for i, batch in enumerate(commits):
                with s.transaction() as tx:
                    _apply(tx, model, batch)
                points.append((s.restore_point(f"p{i}"), dict(model)))
                if ckpt[i]:  # (history and state in LMDB, or left in the MemTable)
                    s.checkpoint()
            assert list(s.scan(**b, reverse=reverse)) == model_scan(model, b, reverse)
            for p, then in points:
                assert list(s.at(p).scan(**b, reverse=reverse)) == \
                    model_scan(then, b, reverse)
            tx = s.transaction()
            try:
                mine_model = dict(model)
                _apply(tx, mine_model, mine)
                assert list(tx.scan(**b, reverse=reverse)) == \
                    model_scan(mine_model, b, reverse)
            finally:
                tx.rollback()
        finally:
            s.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(base=ops, before=ops, after=ops, later=st.lists(ops, max_size=3), b=bounds(),
       reverse=st.booleans(), pad=st.booleans(), ckpt=st.booleans())
def test_a_transactions_scan_matches_its_model_through_savepoints_and_later_commits(
        base, before, after, later, b, reverse, pad, ckpt):
    """tx.scan overlays its writes (a small write set, or one past 256 keys, kept in
    order) on its snapshot, taken at its first read, while other commits (applied to LMDB
    by a checkpoint, or left in the MemTable) land after it; a rollback_to puts back the
    write set the savepoint saw."""
    with tempfile.TemporaryDirectory() as d:
        s = walstore.open(os.path.join(d, "s"), durability="none")
        try:
            model = {}
            with s.transaction() as tx:
                _apply(tx, model, base)
                if pad:  # (fillers inside the alphabet's ranges: "a/…" and b"\xff…")
                    for i in range(300):
                        tx.put(f"a/0{i:03}", i)
                        model[f"a/0{i:03}"] = i
            tx = s.transaction()
            try:
                mine = dict(model)
                tx.get("a")  # the snapshot: here
                other = dict(model)
                for batch in later:
                    with s.transaction() as t2:
                        _apply(t2, other, batch)
                if ckpt:
                    s.checkpoint()
                assert list(s.scan(**b, reverse=reverse)) == model_scan(other, b, reverse)
                _apply(tx, mine, before)
                sp = tx.savepoint("sp")
                at_sp = dict(mine)
                _apply(tx, mine, after)
                assert list(tx.scan(**b, reverse=reverse)) == model_scan(mine, b, reverse)
                tx.rollback_to(sp)
                assert list(tx.scan(**b, reverse=reverse)) == model_scan(at_sp, b, reverse)
            finally:
                tx.rollback()
        finally:
            s.close()


def _half_read_scan(store):
    """A transaction that wrote a key, and its scan iterator after the first row."""
    with store.transaction() as tx:
        for i in range(5):
            tx.put(f"k{i}", i)
    tx = store.transaction()
    tx.put("k2", "never committed")
    tx.put("k9", "never committed")
    it = tx.scan(prefix="k")
    assert next(it) == ("k0", 0)
    return tx, it


def test_a_scan_iterator_stops_when_its_transaction_ends(store):
    """A tx.scan iterator went on yielding after its transaction was rolled back (its
    write set as if it were there: "k2" and "k9" that were never committed, and never
    will be), committed, or rolled back by the store's close — the state checked at the
    first row only, where ``tx.get`` raises at once.  It raises TransactionClosed at the
    next row now, as ``tx.get`` does."""
    tx, it = _half_read_scan(store)
    tx.rollback()
    with pytest.raises(walstore.TransactionClosed):
        next(it)
    tx, it = _half_read_scan(store)
    tx.commit()
    with pytest.raises(walstore.TransactionClosed):
        next(it)
    assert store["k9"] == "never committed"  # (committed now: the scan's view was stale)


def test_a_scan_iterator_stops_when_the_store_closes_its_transaction(path):
    s = walstore.open(path, durability="none")
    tx, it = _half_read_scan(s)
    s.close()  # (rolls the open transaction back)
    with pytest.raises((walstore.TransactionClosed, walstore.StoreClosed)):
        next(it)


def test_bounds_given_together_narrow_each_other_in_both_directions(store):
    """What the GUIDE says of bounds: prefix, start and end intersect; start at or past
    end is empty; reverse yields the same keys last first (end exclusive, start
    inclusive); a bound's type picks its keys' type; b"\\xff\\xff" has no prefix end."""
    with store.transaction() as tx:
        for k in ["a", "a/1", "a/2", "a/3", "b", b"a/1", b"\xff", b"\xff\xff", b"\xff\xff\x00"]:
            tx.put(k, 1)
    keys = lambda **kw: [k for k, _v in store.scan(**kw)]  # noqa: E731
    assert keys(prefix="a/", start="a/2") == ["a/2", "a/3"]
    assert keys(prefix="a/", end="a/2", reverse=True) == ["a/1"]
    assert keys(prefix="a/", start="b") == [] and keys(start="b", end="a") == []
    assert keys(start="a", end="b", reverse=True) == ["a/3", "a/2", "a/1", "a"]
    assert keys(prefix=b"\xff\xff", reverse=True) == [b"\xff\xff\x00", b"\xff\xff"]
    assert keys(prefix="a/") == ["a/1", "a/2", "a/3"]  # (not the bytes b"a/1")


def test_a_scan_iterator_shows_the_writes_as_of_its_first_row(store):
    """What the GUIDE says: a tx.scan iterator shows the transaction's writes as they
    were at its first row; the next scan shows those made meanwhile (rollback_to too)."""
    with store.transaction() as tx:
        for k in ["k1", "k3", "k5"]:
            tx.put(k, 0)
    tx = store.transaction()
    sp = tx.savepoint()
    tx.put("k4", 4)
    it = tx.scan(prefix="k")
    assert next(it) == ("k1", 0)
    tx.put("k2", 2)
    tx.delete("k5")
    assert list(it) == [("k3", 0), ("k4", 4), ("k5", 0)]
    assert [k for k, _v in tx.scan(prefix="k")] == ["k1", "k2", "k3", "k4"]
    it = tx.scan(prefix="k")
    assert next(it) == ("k1", 0)
    tx.rollback_to(sp)
    assert [k for k, _v in it] == ["k2", "k3", "k4"]
    assert [k for k, _v in tx.scan(prefix="k")] == ["k1", "k3", "k5"]
    tx.rollback()
