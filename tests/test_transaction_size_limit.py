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

import signal
import subprocess
import sys

import pytest

import walstore
from walstore.codec import MAX_TXN_WRITE_BYTES, MAX_VALUE_BYTES
from walstore.log.records import MAX_OPEN_TXN_BYTES

BIG = b"x" * (MAX_VALUE_BYTES - 1024)  # a value within the per-value limit


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


CHILD = """
import sys, time, walstore
from walstore.codec import MAX_VALUE_BYTES
BIG = b"x" * (MAX_VALUE_BYTES - 1024)
s = walstore.open(sys.argv[1], apply_interval=86400, apply_batch=10 ** 9,
                  max_unapplied=10 ** 9, max_unapplied_bytes=1 << 50)
tx = s.transaction()
n = 0
try:
    while True:
        tx.put(f"k{n:03}", BIG)
        n += 1
except walstore.TransactionTooLarge:
    pass
tx.commit()  # (durability "full": acknowledged = fsynced)
print(n, flush=True)
time.sleep(600)
"""


def test_a_write_set_just_under_the_bound_is_recovered_after_a_kill(tmp_path):
    """A real writer commits the biggest write set it may (held off LMDB: the reopen's
    recovery REDOes all of it) and is killed with SIGKILL once the commit is acknowledged;
    the store opens with every write (before the fix: CorruptionError, the store lost)."""
    path = str(tmp_path / "s")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), child.stderr.read() if child.poll() is not None else line
        n = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with walstore.open(path, durability="none") as s:
        assert s.last_recovery.redone == 1
        assert s.get(f"k{n - 1:03}") == BIG
        assert sum(1 for _ in s.keys()) == n


# ---- the same bound, lowered in-process so the paths that build a write set for the user
# (purge, revert, rewind) are driven past it with a few hundred small keys ----------------
SMALL = 64 * 1024


@pytest.fixture
def small_bound(monkeypatch):
    from walstore.engine import transaction as t
    monkeypatch.setattr(t, "MAX_TXN_WRITE_BYTES", SMALL)
    monkeypatch.setattr(t.Transaction, "_write_trigger", SMALL)
    return SMALL


def _fill(s, prefix, n, size=400):
    with s.transaction() as tx:
        with tx.action("charge", args={"p": prefix}, compensate="refund"):
            pass
        for i in range(n):
            tx.put(f"{prefix}{i:04}", "v" * size)
        return tx.id


def test_the_refusal_is_a_value_error_of_walstore(small_bound, tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        with pytest.raises(walstore.TransactionTooLarge) as e:
            for i in range(1000):
                tx.put(f"k{i}", "v" * 400)
        assert isinstance(e.value, ValueError) and isinstance(e.value, walstore.WalstoreError)
        assert "nothing of this write was made" in str(e.value)
        assert sum(1 for _ in tx.scan()) == i  # every put before the refused one
        tx.commit()
        assert sum(1 for _ in s.keys()) == i


def test_the_upper_bound_turns_exact_only_when_it_must(small_bound, tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        for _ in range(1000):  # 400 KB put, one 400-byte value held: the bound passes
            tx.put("same", "v" * 400)  # the limit, the exact count keeps going
        tx.delete("same")
        for i in range(100):
            tx.put(f"k{i}", "v" * 400)
        sp = tx.savepoint()
        with pytest.raises(walstore.TransactionTooLarge):
            for i in range(100, 1000):
                tx.put(f"k{i}", "v" * 400)
        tx.rollback_to(sp)  # the exact count gives back what the rollback took out
        for i in range(100, 140):
            tx.put(f"k{i}", "v" * 400)
        tx.commit()
        assert s.get("same") is None and s.get("k139") == "v" * 400


def test_a_purge_too_big_for_one_transaction_changes_nothing(small_bound, tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        for part in range(4):
            _fill(s, f"p/{part}/", 900, size=10)  # a delete counts its key + 16 bytes:
        before = dict(s.scan())                   # 900 deletes fit, 3,600 do not
        with pytest.raises(walstore.TransactionTooLarge, match=r"purge\('p/'\).*narrower"):
            s.purge("p/")
        assert dict(s.scan()) == before
        assert s.purge("p/0/")["keys_deleted"] == 900  # a narrower one goes through


def test_an_undo_too_big_for_one_transaction_undoes_nothing(small_bound, tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        refunds = []
        s.compensator("refund")(lambda a: refunds.append(a.id))
        for j in range(4):
            _fill(s, f"u{j}/", 120, size=400)  # 4 x 50 KB, each fits alone
        point = s.restore_point("start")
        txids = [_fill(s, f"u{j}/", 120, size=1) for j in range(4)]  # (small rewrites:
        before = dict(s.scan())                     # undone, each restores 50 KB)
        with pytest.raises(walstore.TransactionTooLarge, match="nothing was undone"):
            s.rewind(point)
        assert dict(s.scan()) == before and refunds == []  # no state and no side effect
        assert [a.state for a in s.actions()] == ["committed"] * 8
        s.revert(txids[-1])  # one at a time fits: its compensation runs with it
        assert len(refunds) == 1 and s.get("u3/0000") == "v" * 400


def test_every_reader_of_the_log_bounds_a_transaction_s_chunks(tmp_path, monkeypatch):
    """Recovery bounded the WRITES chunks it buffers for one transaction (a damaged log,
    chunks whose COMMIT never comes, must not exhaust memory: promise 8); ``verify`` read
    them without a bound.  Every reader now takes the bound of log.records; lowered here,
    a 12 MiB write set (three chunks) passes it."""
    from walstore.log import records
    from walstore.ops.verify import verify_store
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        with s.transaction() as tx:
            for i in range(12):
                tx.put(f"k{i}", b"x" * (1024 * 1024))
    assert verify_store(path).ok
    monkeypatch.setattr(records, "MAX_OPEN_TXN_BYTES", 2 * 1024 * 1024)
    rep = verify_store(path)
    assert not rep.ok and any("exceeds 2097152 bytes of writes" in e for e in rep.errors), \
        rep.errors


def test_a_prepare_whose_read_set_cannot_be_logged_is_refused_and_the_tx_goes_on(
        tmp_path, monkeypatch):
    """A prepared transaction's PREPARE record carries the keys it read; past the record
    limit the prepare raised a bare ValueError about a payload.  Now TransactionTooLarge
    says why, nothing is logged or held, and the transaction can still commit (the record
    limit lowered here: 1.2 million keys read pass the real one)."""
    from walstore.engine import journal
    monkeypatch.setattr(journal, "MAX_PAYLOAD", 256 * 1024)
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.update({f"key-{i:08}": i for i in range(20000)})
        tx = s.transaction()
        total = sum(tx.get(f"key-{i:08}") for i in range(20000))
        tx.put("total", total)
        with pytest.raises(walstore.TransactionTooLarge, match="20,000 keys"):
            tx.prepare("g1")
        assert s.prepared() == [] and s.decision("g1") is None
        tx.put("after", 1)  # still open, not prepared
        tx.commit()
        assert s.get("total") == total and s.get("after") == 1
