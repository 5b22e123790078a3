"""Transactions, reads, keys and values, store lifecycle (CONTRACT.md section 2)."""
from __future__ import annotations

import datetime
import decimal
import math
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walstore


def _open(path, **kw):
    kw.setdefault("durability", "none")
    return walstore.open(str(path), **kw)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(path):
    s = _open(path)
    yield s
    s.close()


def same(a, b) -> bool:
    """Equal and of the same types all the way down (True != 1, 1.0 != 1, b"x" != "x")."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            same(ka, kb) and same(a[ka], b[kb])
            for ka, kb in zip(sorted(a, key=repr), sorted(b, key=repr)))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# ---- read your writes --------------------------------------------------------------------

def test_reads_see_own_writes_and_deletes(store):
    with store.transaction() as tx:
        tx.put("keep", 1)
        tx.put("gone", 2)
        tx.put("change", 3)
    with store.transaction() as tx:
        tx.put("change", 30)
        tx.delete("gone")
        tx.put("new", 4)
        assert tx.get("change") == 30 and tx["change"] == 30 and "change" in tx
        assert tx.get("gone") is None and tx.get("gone", "dflt") == "dflt"
        assert "gone" not in tx
        with pytest.raises(KeyError):
            tx["gone"]
        assert tx.get("new") == 4 and "new" in tx and tx["new"] == 4
        assert tx.get("keep") == 1 and "keep" in tx
        assert "never" not in tx and tx.get("never", 5) == 5
        # outside the transaction nothing of it is visible yet
        assert store.get("change") == 3 and "gone" in store and "new" not in store
        tx["item"] = "set via []"
        del tx["keep"]
        assert tx.get("item") == "set via []" and "keep" not in tx
    assert dict(store.scan()) == {"change": 30, "new": 4, "item": "set via []"}


def test_delete_then_put_again_and_put_then_delete(store):
    with store.transaction() as tx:
        tx.put("a", 1)
    with store.transaction() as tx:
        tx.delete("a")
        tx.put("a", 2)
        tx.put("b", 1)
        tx.delete("b")
        tx.delete("never-existed")
        assert tx.get("a") == 2 and "b" not in tx
    assert dict(store.scan()) == {"a": 2}


def test_scan_merges_own_writes_with_committed_state(store):
    with store.transaction() as tx:
        for i in range(1, 6):
            tx.put(f"p/{i}", i)
        tx.put("q/1", "other prefix")
        tx.put("o", "before the prefix")
    with store.transaction() as tx:
        tx.put("p/3", 33)   # overwrite
        tx.delete("p/2")   # delete a committed key
        tx.put("p/6", 6)    # new key after the committed ones
        tx.put("p/0", 0)    # new key before them
        tx.put("p/7", 7)
        tx.delete("p/7")   # own write deleted again
        tx.delete("p/9")   # delete of an absent key
        expected = [("p/0", 0), ("p/1", 1), ("p/3", 33), ("p/4", 4), ("p/5", 5), ("p/6", 6)]
        assert list(tx.scan(prefix="p/")) == expected
        assert list(tx.scan(prefix="p/", reverse=True)) == expected[::-1]
        assert list(tx.scan(start="p/1", end="p/5")) == expected[1:4]
        assert list(tx.scan(start="p/1", end="p/5", reverse=True)) == expected[1:4][::-1]
        assert list(tx.scan(prefix="p/", start="p/4")) == expected[3:]
        assert list(tx.scan(prefix="p/", end="p/2")) == expected[:2]
        everything = list(tx.scan())
        assert everything == [("o", "before the prefix")] + expected + [("q/1", "other prefix")]
        assert list(tx.scan(prefix="zzz")) == []
        # committed state untouched until commit
        assert [k for k, _ in store.scan(prefix="p/")] == [f"p/{i}" for i in range(1, 6)]
    assert list(store.scan(prefix="p/")) == expected


@pytest.mark.parametrize("applied", [False, True], ids=["overlay", "lmdb"])
def test_large_scans_in_key_order(path, applied):
    """More keys than one LMDB scan chunk, committed state merged with a transaction's writes."""
    s = _open(path)
    try:
        model = {}
        with s.transaction() as tx:
            for i in range(0, 1500, 2):
                tx.put(f"k/{i:05d}", i)
                model[f"k/{i:05d}"] = i
            tx.put(b"bytes-key", 1)
            tx.put("j", "before")
            tx.put("l", "after")
        if applied:
            s.checkpoint()
        assert list(s.scan(prefix="k/")) == sorted(model.items())
        assert list(s.scan(prefix="k/", reverse=True)) == sorted(model.items(), reverse=True)
        with s.transaction() as tx:
            for i in range(1, 1500, 7):  # odd: new keys, between committed ones
                tx.put(f"k/{i:05d}", -i)
                model[f"k/{i:05d}"] = -i
            for i in range(0, 1500, 10):
                tx.delete(f"k/{i:05d}")
                model.pop(f"k/{i:05d}", None)
            srt = sorted(model.items())
            assert list(tx.scan(prefix="k/")) == srt
            assert list(tx.scan(prefix="k/", reverse=True)) == srt[::-1]
            lo, hi = "k/00300", "k/01200"
            sub = [(k, v) for k, v in srt if lo <= k < hi]
            assert list(tx.scan(start=lo, end=hi)) == sub
            assert list(tx.scan(start=lo, end=hi, reverse=True)) == sub[::-1]
        assert list(s.scan(prefix="k/")) == srt
        s.checkpoint()
        assert list(s.scan(prefix="k/", reverse=True)) == srt[::-1]
    finally:
        s.close()


def test_scan_orders_unicode_keys_by_code_point(store):
    keys = ["b", "a", "é", "\U0001F600", "z", "ab", "a\x00", "\uffff", "Z"]
    with store.transaction() as tx:
        for k in keys:
            tx.put(k, k)
    assert [k for k, _ in store.scan()] == sorted(keys)
    assert [k for k, _ in store.scan(reverse=True)] == sorted(keys, reverse=True)
    bkeys = [b"\xff", b"\x00", b"a", b"\x7f\xff", b"\x80"]
    with store.transaction() as tx:
        for k in bkeys:
            tx.put(k, 0)
    assert [k for k, _ in store.scan(prefix=b"")] == sorted(bkeys)
    assert [k for k, _ in store.scan(prefix=b"\x7f")] == [b"\x7f\xff"]
    assert [k for k, _ in store.scan(prefix=b"\xff")] == [b"\xff"]


# ---- transaction lifecycle ---------------------------------------------------------------

def test_context_manager_commits_on_exit(store):
    with store.transaction() as tx:
        tx.put("a", 1)
        assert "a" not in store
    assert store["a"] == 1
    assert tx.state == "committed"
    assert isinstance(tx.lsn, int)


def test_context_manager_rolls_back_on_exception(store):
    with store.transaction() as tx:
        tx.put("a", 1)
    with pytest.raises(RuntimeError, match="agent crashed"):
        with store.transaction() as tx:
            tx.put("a", 2)
            tx.put("b", 2)
            tx.delete("a")
            raise RuntimeError("agent crashed")
    assert tx.state == "rolled back" and tx.lsn is None
    assert dict(store.scan()) == {"a": 1}
    with pytest.raises(walstore.TransactionClosed):
        tx.put("c", 3)


def test_explicit_commit_and_rollback(store):
    tx = store.transaction()
    tx.put("a", 1)
    lsn = tx.commit()
    assert lsn == tx.lsn and isinstance(lsn, int)
    assert store["a"] == 1
    tx = store.transaction()
    tx.put("a", 2)
    tx.put("b", 2)
    tx.rollback()
    assert dict(store.scan()) == {"a": 1}
    assert len(store.log()) == 1


@pytest.mark.parametrize("ending", ["commit", "rollback", "conflict"])
def test_finished_transaction_refuses_everything(store, ending):
    tx = store.transaction()
    tx.get("k")
    tx.put("k", 1)
    if ending == "commit":
        tx.commit()
    elif ending == "rollback":
        tx.rollback()
    else:
        with store.transaction() as other:
            other.put("k", 0)
        with pytest.raises(walstore.ConflictError):
            tx.commit()
    calls = [
        lambda: tx.get("k"), lambda: tx.put("k", 2), lambda: tx.delete("k"),
        lambda: tx["k"], lambda: "k" in tx, lambda: list(tx.scan()),
        lambda: tx.savepoint("s"), lambda: tx.commit(), lambda: tx.rollback(),
    ]
    for call in calls:
        with pytest.raises(walstore.TransactionClosed) as info:
            call()
        assert isinstance(info.value, walstore.StoreClosed)
        assert isinstance(info.value, walstore.WalstoreError)
        assert str(tx.id) in str(info.value)
    assert store.get("k") == (1 if ending == "commit" else 0 if ending == "conflict" else None)


def test_error_hierarchy():
    assert issubclass(walstore.TransactionClosed, walstore.StoreClosed)
    for name in ("ConflictError", "RevertConflict", "CompensationFailed", "NeedsRecovery",
                 "CorruptionError", "StoreLocked", "ReadOnlyError", "StoreClosed", "NotAStore",
                 "CommitOutcomeUnknown", "UnknownPoint", "HistoryTrimmed", "ReplicationError",
                 "FileConflictError"):
        assert issubclass(getattr(walstore, name), walstore.WalstoreError), name


def test_transaction_ids_unique_and_lsns_increasing(path):
    s = _open(path)
    ids, lsns = [], []
    for i in range(30):
        tx = s.transaction()
        ids.append(tx.id)
        if i % 3 == 2:
            tx.rollback()
            continue
        tx.put(f"k{i % 4}", i)
        tx.commit()
        lsns.append(tx.lsn)
    ro = s.transaction()
    ids.append(ro.id)
    ro.get("k0")
    ro.commit()
    assert len(set(ids)) == len(ids)
    assert all(isinstance(x, int) for x in lsns)
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
    log = s.log()
    assert [i.lsn for i in log] == lsns[::-1]  # newest first, lsn = commit record position
    assert [i.txid for i in log] == [t for t in ids[:-1] if ids.index(t) % 3 != 2][::-1]
    s.close()
    s = _open(path)  # ids and LSNs keep growing across a reopen
    try:
        tx = s.transaction()
        assert tx.id > max(i.txid for i in log)
        tx.put("after", 1)
        tx.commit()
        assert tx.lsn > max(lsns)
        assert s.log()[0].txid == tx.id and s.log()[0].lsn == tx.lsn
    finally:
        s.close()


def test_meta_is_recorded(path):
    meta = {"agent": "planner", "step": 7, "tags": ["a", "b"], "blob": b"\x00"}
    s = _open(path)
    with s.transaction(meta=meta) as tx:
        tx.put("inventory/apples", 3)
        tx.delete("inventory/pears")
    info = s.log()[0]
    assert info.txid == tx.id and info.lsn == tx.lsn
    assert info.meta == meta
    assert set(info.keys) == {"inventory/apples", "inventory/pears"}
    with s.transaction() as tx2:
        tx2.put("x", 1)
    assert s.log()[0].meta is None and s.log()[1].meta == meta
    with pytest.raises(TypeError):
        s.transaction(meta={"bad": {1, 2}})
    s.close()
    s = _open(path)
    try:
        assert s.log()[1].meta == meta and s.log(limit=1)[0].txid == tx2.id
    finally:
        s.close()


def test_read_only_transaction_commit_writes_nothing(store):
    with store.transaction() as tx:
        tx.put("a", 1)
    n = len(store.log())
    with store.transaction() as tx:
        assert tx.get("a") == 1
        list(tx.scan())
    assert len(store.log()) == n


# ---- keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, exc, words", [
    (1, TypeError, "str or bytes"),
    (1.5, TypeError, "str or bytes"),
    (None, TypeError, "str or bytes"),
    (("a",), TypeError, "str or bytes"),
    (["a"], TypeError, "str or bytes"),
    ("", ValueError, "empty"),
    (b"", ValueError, "empty"),
    ("x" * 511, ValueError, "511 bytes"),
    ("é" * 256, ValueError, "512 bytes"),   # 256 characters, 512 bytes of UTF-8
    (b"x" * 600, ValueError, "600 bytes"),
    ("\ud800", ValueError, "UTF-8"),
])
def test_bad_keys_fail_at_put(store, key, exc, words):
    tx = store.transaction()
    tx.put("good", 1)
    with pytest.raises(exc, match=words):
        tx.put(key, 1)
    with pytest.raises(exc):
        tx.delete(key)
    with pytest.raises(exc):
        tx.get(key)
    with pytest.raises(exc):
        store.get(key)
    tx.commit()  # the good write still commits
    assert dict(store.scan()) == {"good": 1}


def _longest_accepted_key_bytes(store) -> int:
    tx = store.transaction()
    try:
        for n in range(510, 0, -1):
            try:
                tx.put("x" * n, 0)
                return n
            except ValueError:
                continue
    finally:
        tx.rollback()
    raise AssertionError("no key length accepted")


def test_longest_accepted_keys_round_trip(path):
    """Every key put accepts must commit, reach LMDB and read back after a reopen.

    (Keys of 501..510 bytes were once accepted at put and then broke the history index:
    LMDB BadValsizeError in the applier, and a store that could not be reopened.)
    """
    s = _open(path)
    n = _longest_accepted_key_bytes(s)
    assert n >= 500
    keys = ["x" * n, b"\xff" * n, "é" * (n // 2) + "y" * (n % 2),
            "\U0001F600" * (n // 4) + "z" * (n % 4)]
    assert all(len(k if isinstance(k, bytes) else k.encode()) == n for k in keys)
    with s.transaction() as tx:
        for i, k in enumerate(keys):
            tx.put(k, i)
    with s.transaction() as tx:
        tx.put(keys[0], "twice")  # a second version in the history of the same key
    s.checkpoint()
    s.close()  # applies them to LMDB
    s = _open(path)
    try:
        assert s[keys[0]] == "twice"
        for i, k in enumerate(keys[1:], 1):
            assert s[k] == i
        assert sorted(map(repr, (k for k, _ in s.scan()))) == sorted(map(repr, keys))
        with s.transaction() as tx:  # and the store still takes writes
            tx.put(keys[0], "again")
            tx.delete(keys[1])
        s.checkpoint()
        assert s[keys[0]] == "again" and keys[1] not in s
        with pytest.raises(ValueError, match=f"{n + 1} bytes"):
            s.transaction().put("x" * (n + 1), 0)
    finally:
        s.close()


def test_str_and_bytes_keys_are_distinct_and_keep_their_type(path):
    s = _open(path)
    with s.transaction() as tx:
        tx.put("a", "str")
        tx.put(b"a", "bytes")
        tx.put(bytearray(b"ba"), "bytearray key is stored as bytes")
        assert tx.get("a") == "str" and tx.get(b"a") == "bytes"
    with s.transaction() as tx:
        tx.delete(b"a")
    assert s.get("a") == "str" and b"a" not in s
    with s.transaction() as tx:
        tx.put(b"a", "bytes again")
    s.close()
    s = _open(path)
    try:
        items = list(s.scan())
        assert sorted(items, key=repr) == sorted(
            [("a", "str"), (b"a", "bytes again"), (b"ba", "bytearray key is stored as bytes")],
            key=repr)
        assert {type(k) for k, _ in items} == {str, bytes}
        assert [k for k, _ in s.scan(prefix="a")] == ["a"]
        assert [k for k, _ in s.scan(prefix=b"a")] == [b"a"]
        assert all(isinstance(k, bytes) for k, _ in s.scan(prefix=b""))
        keys = set(s.log()[0].keys) | set(s.log()[2].keys)
        assert keys == {"a", b"a", b"ba"}
    finally:
        s.close()


def test_every_key_form_reads_the_same_value_from_overlay_and_lmdb(path):
    """Store.get encodes plain bytes and ASCII text itself (the hot read path); every other
    key form goes through encode_key.  All forms of one key must find the same value,
    whether it is still in the in-memory overlay or already in LMDB."""
    class Text(str):
        pass
    s = _open(path)
    with s.transaction() as tx:
        tx.put("plain", 1)
        tx.put("naïve", 2)
        tx.put(b"raw", 3)
        tx.put("x" * 500, 4)
    forms = [("plain", 1), (Text("plain"), 1), ("naïve", 2), (Text("naïve"), 2),
             (b"raw", 3), (bytearray(b"raw"), 3), (memoryview(b"raw"), 3), ("x" * 500, 4),
             (b"x" * 500, None), ("raw", None), (b"plain", None)]
    try:
        for stage in ("overlay", "lmdb"):
            for key, want in forms:
                assert s.get(key) == want, (stage, key)
                assert (key in s) == (want is not None), (stage, key)
            s.close()
            s = _open(path)  # closed: everything applied; reopened: reads come from LMDB
    finally:
        s.close()


# ---- values ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, exc", [
    ({1, 2}, TypeError),
    (object(), TypeError),
    (2 ** 64, ValueError),
    (-(2 ** 63) - 1, ValueError),
    (datetime.datetime(2024, 1, 1), TypeError),
    (datetime.date(2024, 1, 1), TypeError),
    (decimal.Decimal("1.5"), TypeError),
    ("\ud800", ValueError),
    ([1, [2, {"deep": {3}}]], TypeError),
    ({"x": object()}, TypeError),
])
def test_bad_values_fail_at_put_and_good_writes_still_commit(store, value, exc):
    with store.transaction() as tx:
        tx.put("victim", "old")
    with store.transaction() as tx:
        tx.put("good", 1)
        with pytest.raises(exc) as info:
            tx.put("victim", value)
        assert "victim" in str(info.value)  # names the key
        assert tx.get("victim") == "old"  # the failed put wrote nothing
        tx.put("good2", 2)
    assert dict(store.scan()) == {"victim": "old", "good": 1, "good2": 2}


def test_value_that_cannot_be_read_back_fails_at_put(store):
    """A dict with a tuple key packs (as a msgpack array) but could never be unpacked (an
    unhashable list as a map key): it must be refused at put, not poison the key."""
    for bad in ({(1, 2): "tuple key"}, [{"ok": {(1,): 1}}], {frozenset(): 1}):
        with store.transaction() as tx:
            tx.put("k", "before")
            with pytest.raises((TypeError, ValueError)):
                tx.put("k", bad)
            assert tx.get("k") == "before"
        assert store.get("k") == "before" and list(store.scan()) == [("k", "before")]


VALUES = [
    None, True, False, 0, 1, -1, 2 ** 64 - 1, -(2 ** 63), 2 ** 63, 0.0, -0.0, 1.5, -2.25e300,
    float("inf"), float("-inf"), 5e-324, "", "text", "é\U0001F600\x00", b"", b"\x00\xff" * 100,
    [], {}, [1, "two", b"three", None, [4.0, [5, {"six": 6}]]],
    {"nested": {"list": [1, 2, {"k": b"v"}], "n": None, "t": True}, "": 0},
    {1: "int key", b"b": "bytes key", "s": "str key"},
    "x" * 100_000, list(range(1000)),
]


def test_all_msgpack_types_round_trip_exactly(path):
    s = _open(path)
    with s.transaction() as tx:
        for i, v in enumerate(VALUES):
            tx.put(f"v{i:03d}", v)
            assert same(tx.get(f"v{i:03d}"), v), v
    for i, v in enumerate(VALUES):
        assert same(s.get(f"v{i:03d}"), v), v  # from the overlay
    s.close()
    s = _open(path)
    try:
        for i, v in enumerate(VALUES):
            assert same(s[f"v{i:03d}"], v), v  # from LMDB
        assert same([v for _, v in s.scan(prefix="v")], VALUES)
        with s.transaction() as tx:
            tx.put("nan", float("nan"))
        assert math.isnan(s.get("nan"))
    finally:
        s.close()


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5) | st.integers(-9, 9) | st.binary(max_size=3),
                      children, max_size=5),
    max_leaves=20)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    s = _open(tmp_path_factory.mktemp("vals") / "store")
    yield s
    s.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=msgpack_values)
def test_random_values_round_trip(module_store, value):
    with module_store.transaction() as tx:
        tx.put("v", value)
        assert same(tx.get("v"), value)
    assert same(module_store.get("v"), value)


# ---- the store ---------------------------------------------------------------------------

def test_store_get_default_and_keyerror(store):
    assert store.get("absent") is None
    assert store.get("absent", 7) == 7
    assert "absent" not in store
    with pytest.raises(KeyError):
        store["absent"]
    with store.transaction() as tx:
        tx.put("none", None)
        tx.put("zero", 0)
    # a stored None is a value, not an absence
    assert "none" in store and store["none"] is None and store.get("none", 7) is None
    assert store.get("zero", 7) == 0
    with pytest.raises(TypeError):
        store.get(42)
    with pytest.raises(TypeError):
        42 in store


def test_closed_store_raises_store_closed(path):
    s = _open(path)
    with s.transaction() as tx:
        tx.put("a", 1)
    open_tx = s.transaction()
    s.close()
    assert s.closed
    s.close()  # twice is fine
    for call in (lambda: s.get("a"), lambda: s["a"], lambda: "a" in s, lambda: list(s.scan()),
                 lambda: s.transaction(), lambda: s.log(), lambda: open_tx.put("b", 1),
                 lambda: open_tx.get("a"), lambda: s.run(lambda tx: None)):
        with pytest.raises(walstore.StoreClosed):
            call()
    with walstore.open(str(path), durability="none") as s2:
        assert s2["a"] == 1 and "b" not in s2
    assert s2.closed
    with pytest.raises(walstore.StoreClosed):
        s2.get("a")


def test_scan_in_progress_when_the_store_closes_raises_store_closed(path):
    s = _open(path)
    with s.transaction() as tx:
        for i in range(10):
            tx.put(f"k{i}", i)
    s.checkpoint()
    it = s.scan()
    assert next(it) == ("k0", 0)
    s.close()
    with pytest.raises(walstore.StoreClosed):
        list(it)


def test_readonly_store_refuses_writes(path):
    with _open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
            tx.put("b", 2)
    r = walstore.open(str(path), readonly=True)
    try:
        assert r["a"] == 1 and dict(r.scan()) == {"a": 1, "b": 2}
        tx = r.transaction()
        assert tx.get("a") == 1
        with pytest.raises(walstore.ReadOnlyError):
            tx.put("c", 3)
        with pytest.raises(walstore.ReadOnlyError):
            tx.delete("a")
        tx.commit()  # a read-only transaction commits fine
        with pytest.raises(walstore.ReadOnlyError):
            with r.transaction() as tx2:
                tx2.put("c", 3)
        with pytest.raises(walstore.ReadOnlyError):
            r.run(lambda t: t.put("c", 3))
        with pytest.raises(walstore.ReadOnlyError):
            r.checkpoint()
        assert issubclass(walstore.ReadOnlyError, walstore.WalstoreError)
    finally:
        r.close()
    with _open(path) as s:
        assert dict(s.scan()) == {"a": 1, "b": 2}


def test_readonly_open_of_missing_store_is_not_a_store(tmp_path):
    with pytest.raises(walstore.NotAStore):
        walstore.open(str(tmp_path / "missing"), readonly=True)
    assert not os.path.exists(tmp_path / "missing")


@pytest.mark.parametrize("durability", ["full", "normal", "none"])
def test_persistence_across_close_and_reopen(path, durability):
    s = walstore.open(str(path), durability=durability)
    assert os.path.isdir(path)
    with s.transaction() as tx:
        for i in range(50):
            tx.put(f"k{i:02d}", {"i": i})
        tx.put(b"raw", b"bytes")
    with s.transaction() as tx:
        tx.delete("k00")
        tx.put("k01", "changed")
    s.close()
    s = walstore.open(str(path), durability=durability)
    try:
        assert "k00" not in s and s["k01"] == "changed" and s[b"raw"] == b"bytes"
        assert len(list(s.scan(prefix="k"))) == 49
        assert s["k49"] == {"i": 49}
        assert len(s.log()) == 2
        with s.transaction() as tx:
            tx.put("k00", "back")
    finally:
        s.close()
    s = walstore.open(str(path), durability="full")
    try:
        assert s["k00"] == "back" and len(list(s.scan(prefix="k"))) == 50
    finally:
        s.close()


def test_invalid_durability_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="durability"):
        walstore.open(str(tmp_path / "s"), durability="fast")


@pytest.mark.parametrize("n", [15, 16, 17, 80, 81, 336, 337, 1400])
def test_scans_across_chunk_edges_match_a_model_both_ways(tmp_path, n):
    """A scan reads LMDB in growing chunks (16 rows, then 64, then 256): every count of
    rows around those edges, with some keys changed or deleted since the last apply (in
    the MemTable) and some new, scans like a sorted dict, forward and reverse, from a
    transaction and from the store; the first row of a reverse scan is the last key."""
    s = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=3600)
    try:
        model = {}
        with s.transaction() as tx:
            for i in range(n):
                tx.put(f"k{i:05d}", i)
                model[f"k{i:05d}"] = i
        s.checkpoint()  # all of it in LMDB
        rng = random.Random(n)
        with s.transaction() as tx:  # and changes on top, in the MemTable
            for i in rng.sample(range(n), n // 5):
                tx.delete(f"k{i:05d}")
                del model[f"k{i:05d}"]
            for i in rng.sample(range(n), n // 7):
                if f"k{i:05d}" in model:
                    tx.put(f"k{i:05d}", -i)
                    model[f"k{i:05d}"] = -i
            for i in range(0, n, 9):
                tx.put(f"k{i:05d}+", i)
                model[f"k{i:05d}+"] = i
        want = sorted(model.items())
        with s.transaction() as tx:
            assert list(tx.scan(prefix="k")) == want
            assert list(tx.scan(prefix="k", reverse=True)) == want[::-1]
            assert next(iter(tx.scan(prefix="k", reverse=True))) == want[-1]
            mid = want[len(want) // 2][0]
            assert list(tx.scan(start=mid, end="k~")) == [kv for kv in want if kv[0] >= mid]
        assert list(s.scan(prefix="k")) == want
        assert list(s.scan(prefix="k", reverse=True)) == want[::-1]
    finally:
        s.close()


def test_transaction_ids_are_never_handed_out_twice_across_reopens_and_crashes(tmp_path):
    """``tx.id`` is unique: ids of transactions that logged nothing (rolled back, read
    only) are not handed out again after a clean reopen (which goes on where it stopped)
    nor after a crash (which starts past the durable reservation)."""
    path = str(tmp_path / "s")
    seen: list[int] = []

    def some(store, n=4):
        store.run(lambda tx: tx.put("a", len(seen)))
        seen.append(store.log(limit=1)[0].txid)
        for _ in range(n):
            tx = store.transaction()
            tx.put("x", 1)
            seen.append(tx.id)
            tx.rollback()
        tx = store.transaction()
        tx.get("a")
        tx.commit()
        seen.append(tx.id)

    s = walstore.open(path, durability="none")
    some(s)
    s.close()
    s = walstore.open(path, durability="none")
    some(s)
    assert seen == list(range(seen[0], seen[0] + len(seen)))  # a clean reopen: no gap
    s._engine.drop_like_a_crash()
    s = walstore.open(path, durability="none")
    some(s)
    s._engine.drop_like_a_crash()
    s = walstore.open(path, durability="none")
    some(s)
    s.close()
    assert len(seen) == len(set(seen)), sorted(seen)


def test_transaction_ids_past_the_reservation_extend_it_durably(tmp_path, monkeypatch):
    from walstore.engine import engine as engine_mod
    monkeypatch.setattr(engine_mod, "TXID_BLOCK", 8)
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none")
    ids = [s.transaction().id for _ in range(30)]  # crosses the reservation three times
    assert s._engine.state.meta_int(b"txid_reserved") > max(ids)
    s._engine.drop_like_a_crash()
    with walstore.open(path, durability="none") as again:
        assert again.transaction().id > max(ids)
