"""A transaction's whole write set is bounded at the put call (CONTRACT, section 2: "A bad
key or value raises TypeError/ValueError at the put call ... never later at commit"; and
section 4, promise 1).

Recovery buffers one transaction's WRITES chunks up to a bound (damaged logs must not
exhaust memory: promise 8).  A commit bigger than that bound was accepted and acknowledged,
and then the store could not be opened after a crash (CorruptionError "transaction 1
exceeds 536870912 bytes of writes"): an acknowledged commit was lost with the whole
store.  Now the put that would pass the bound raises ValueError and the transaction
stays usable; a write set just under it is recovered after a crash."""
from __future__ import annotations

import pytest

import walstore
from walstore.codec import MAX_TXN_WRITE_BYTES, MAX_VALUE_BYTES
from walstore.engine.recovery import MAX_OPEN_TXN_BYTES

BIG = b"x" * (MAX_VALUE_BYTES - 1024)  # a value within the per-value limit
# (held off LMDB until the crash, so the reopen's recovery REDOes the big commit)
NO_APPLY = dict(apply_interval=86400, apply_batch=10 ** 9, max_unapplied=10 ** 9,
                max_unapplied_bytes=1 << 50)


def test_the_write_set_bound_fits_what_recovery_takes_back():
    assert MAX_TXN_WRITE_BYTES + 1024 * 1024 <= MAX_OPEN_TXN_BYTES


def test_a_put_past_the_transaction_bound_is_refused_at_the_call(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        n = 0
        with pytest.raises(ValueError, match="transaction"):
            while n < 64:  # (33 of them pass the bound: the loop never ends on its own)
                tx.put(f"k{n}", BIG)
                n += 1
        assert 20 < n < 40
        assert tx.get(f"k{n}") is None  # the refused put wrote nothing
        assert tx.get(f"k{n - 1}") == BIG  # the earlier ones are kept
        with pytest.raises(ValueError, match="transaction"):
            tx.update({f"u{i}": BIG for i in range(3)})
        assert tx.get("u0") is None  # nothing of a refused update
        tx.delete("k0")  # (taking a value out makes room again)
        tx.put(f"k{n}", BIG)
        tx.rollback()


def test_rewriting_one_key_and_savepoints_count_only_what_stays(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        for _ in range(40):  # one key rewritten: its last value is all the commit holds
            tx.put("same", BIG)
        for i in range(15):
            tx.put(f"a{i}", BIG)
        sp = tx.savepoint()
        for i in range(10):
            tx.put(f"b{i}", BIG)
        tx.rollback_to(sp)  # gives back what it undid (36 values without it: refused)
        for i in range(10):
            tx.put(f"c{i}", BIG)
        tx.rollback()


def test_a_write_set_just_under_the_bound_is_recovered_after_a_crash(tmp_path):
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", **NO_APPLY)
    tx = s.transaction()
    n = 0
    try:
        while True:
            tx.put(f"k{n:03}", BIG)
            n += 1
    except ValueError:
        pass
    tx.commit()
    s._drop_like_a_crash()  # (as kill -9: LMDB never got it, recovery must REDO it)
    with walstore.open(path, durability="none") as s:
        assert s.last_recovery.redone == 1
        assert s.get(f"k{n - 1:03}") == BIG
        assert sum(1 for _ in s.keys()) == n
