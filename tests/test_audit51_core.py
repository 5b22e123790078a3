"""probe-audit51 (core transaction API): defects found by a user-adversary pass over
transactions, savepoints, scans and actions, each test named after the promise it kept
breaking (each failed on the code before its fix).

1. One transaction used from two threads (an agent's tool thread writing while its
   planner thread scans): ``tx.scan`` raised RuntimeError ("dictionary changed size
   during iteration") and, worse, the scan's index of the transaction's own writes lost
   keys for good: long after the threads were done, a single-threaded ``tx.scan`` left
   out thousands of keys the transaction had written (and that its commit would write).
   A ``tx.get`` racing a ``rollback_to`` in another thread raised KeyError.
2. ``store.run(fn, retries=...)``: the backoff doubled without bound (retries=30 meant a
   last sleep of ~31 days), and with ``backoff=0.0`` the 1,025th retry raised
   OverflowError ("int too large to convert to float") instead of retrying.
3. ``store.run(async_fn)`` (or a generator function) committed an empty transaction and
   returned the coroutine: nothing of ``fn`` ran in the transaction, and awaiting it later
   raised TransactionClosed, with no error at the call.
4. One transaction's savepoints used from two threads: ``release`` in one thread and
   ``savepoint`` in the other left a savepoint whose ``rollback_to`` undid nothing (the
   release emptied the undo log under it), and ``rollback_to``/``release`` raised
   IndexError when the other thread released savepoints during their lookup.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest

import walstore
from walstore.codec import decode_key


def _race(duration, *loops):
    """Run each ``loop(stop)`` in its own thread for ``duration`` s; the exceptions
    that are not walstore's, as (type name, text)."""
    stop = threading.Event()
    foreign: list = []

    def run(loop):
        while not stop.is_set():
            try:
                loop()
            except walstore.WalstoreError:
                pass
            except Exception as e:  # noqa: BLE001 (what the test looks for)
                foreign.append((type(e).__name__, str(e)))
    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch often: the races show in a second)
    try:
        for t in threads:
            t.start()
        time.sleep(duration)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    return foreign


def _own_keys(tx, prefix: bytes) -> list:
    return sorted(decode_key(k) for k, v in tx.writes.items()
                  if v is not None and k.startswith(prefix))


def test_a_transaction_reads_its_own_writes_after_another_thread_wrote_while_it_scanned(store):
    # before: RuntimeError from tx.scan, then a scan that missed up to ~3,000 own writes
    with store.transaction() as t:
        for i in range(50):
            t.put(f"w/c{i:03}", i)
    tx = store.transaction()
    for i in range(300):  # (past the small write set a scan passes over whole)
        tx.put(f"w/{i:07}", i)
    n = [1000]

    def writer():
        if n[0] > 120_000:  # (enough: the test stays short)
            time.sleep(0.01)
            return
        for _ in range(50):
            n[0] += 1
            tx.put(f"w/{n[0]:07}", n[0])

    def scanner():
        list(tx.scan(prefix="w/"))
    foreign = _race(1.5, writer, scanner)
    assert foreign == []
    got = [k for k, _ in tx.scan(prefix="w/")]
    assert got == sorted(set(_own_keys(tx, b"sw/")) | {f"w/c{i:03}" for i in range(50)})
    assert [k for k, _ in tx.scan(prefix="w/", reverse=True)] == got[::-1]
    tx.commit()
    assert [k for k, _ in store.scan(prefix="w/")] == got


def test_a_transaction_read_racing_a_rollback_to_in_another_thread_is_never_a_foreign_error(store):
    # before: KeyError from tx.get (the key left the write set between a test and a
    # lookup) and RuntimeError from tx.scan of a small write set
    tx = store.transaction()
    tx.put("base", 0)

    def roller():
        sp = tx.savepoint()
        for i in range(40):
            tx.put(f"r/{i:03}", i)
        tx.rollback_to(sp)
        tx.release(sp)

    def reader():
        for i in range(40):
            tx.get(f"r/{i:03}")
        list(tx.scan(prefix="r/"))
    foreign = _race(1.5, roller, reader)
    assert foreign == []
    assert list(tx.scan(prefix="r/")) == []
    tx.put("r/x", 1)
    assert list(tx.scan(prefix="r/")) == [("r/x", 1)]
    tx.rollback()


def _always_conflicting(store, tries):
    def fn(tx):
        tries.append(1)
        tx.get("hot")
        with store.transaction() as other:
            other.put("hot", len(tries))
        tx.put("hot", -1)
    return fn


def test_store_run_retries_with_a_bounded_backoff(store, monkeypatch):
    # before: the sleeps doubled for ever (0.005 s * 2**39 before the 40th retry)
    slept = []
    real_sleep = time.sleep
    main = threading.current_thread()

    def sleep(s):  # (the main thread's sleeps are recorded, not slept)
        if threading.current_thread() is main:
            slept.append(s)
        else:
            real_sleep(s)
    monkeypatch.setattr(time, "sleep", sleep)
    tries: list = []
    with pytest.raises(walstore.ConflictError):
        store.run(_always_conflicting(store, tries), retries=40)
    assert len(tries) == 41 and len(slept) == 40
    assert max(slept) <= 1.5  # (at most 1 s, times the jitter's at most 1.5)
    assert slept[0] <= 0.0075
    slept.clear()
    tries.clear()
    with pytest.raises(walstore.ConflictError):  # (a backoff asked for above 1 s is kept)
        store.run(_always_conflicting(store, tries), retries=3, backoff=4.0)
    assert len(slept) == 3 and all(2.0 <= s <= 6.0 for s in slept)


def test_store_run_with_a_zero_backoff_retries_as_often_as_asked(store):
    # before: OverflowError at the 1,025th retry (0.0 * 2**1024)
    tries: list = []
    with pytest.raises(walstore.ConflictError):
        store.run(_always_conflicting(store, tries), retries=1100, backoff=0.0)
    assert len(tries) == 1101


def test_store_run_calls_fn_in_the_transaction_or_refuses_it(store):
    # before: an async fn's body never ran in the transaction, which committed empty
    async def put_async(tx):
        tx.put("a", 1)

    def put_gen(tx):
        tx.put("g", 1)
        yield

    before = len(store.log())
    for fn in (put_async, put_gen, lambda tx: put_async(tx)):
        with pytest.raises(TypeError, match="run"):
            store.run(fn)
    assert store.get("a") is None and store.get("g") is None
    assert len(store.log()) == before  # (nothing committed)
    assert store.run(lambda tx: tx.put("b", 2) or "done") == "done"
    assert store.get("b") == 2


def test_rollback_to_undoes_what_came_after_its_savepoint_while_another_thread_uses_savepoints(
        store):
    # before: ~6 rollback_to()s in 3 s left the write made after their savepoint in
    # place, and IndexError came out of rollback_to/release
    tx = store.transaction()
    not_undone = []

    def mine():
        sp = tx.savepoint("a")
        tx.put("ka", 1)
        try:
            tx.rollback_to(sp)
        except ValueError:  # (the other thread released it: a savepoint taken before)
            tx.delete("ka")
            return
        if tx.get("ka") is not None:
            not_undone.append(1)
            tx.delete("ka")
        tx.release(sp)

    def other():
        for i in range(5):
            tx.put(f"b{i}", i)
        b = tx.savepoint("b")
        tx.put("kb", 1)
        tx.release(b)

    def other_by_name():  # (no rollback_to here: one would undo "mine"'s writes too)
        tx.savepoint("c")
        tx.put("kc", 1)
        tx.release("c")
    foreign = _race(2.0, mine, other, other_by_name)
    assert [f for f in foreign if f[0] != "ValueError"] == []
    assert not_undone == []
    sp = tx.savepoint()
    tx.put("ka", 2)
    tx.rollback_to(sp)
    assert tx.get("ka") is None
    tx.rollback()
