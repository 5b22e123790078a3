"""The transaction's fixed cost, cut at stop 63, keeps its promises.

- The attributes a commit reads are slots set in ``__init__`` (no class attribute read
  through the instance): a transaction's end puts the exact-count trigger, the key order
  and the inner blockers back to where a new one begins, and a transaction dropped
  without an end is still freed at once (a weak reference dies with it: no cycle).
- ``commit()`` holds the end lock itself (``_deciding`` written out): it is refused
  after an end, from inside its own end, and a racing ``rollback()`` waits for it.
- A put's writable test and its bytes-key encoding are written out: the same errors as
  ``encode_key`` and ``Engine.check_writable``, the same stored keys.
"""
from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

import walstore
from walstore.codec import MAX_KEY_BYTES, MAX_TXN_WRITE_BYTES, encode_key
from walstore.engine import transaction as txmod


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    yield s
    if not s.closed:
        s.close()


def test_the_hot_attributes_are_slots_and_begin_as_before(store):
    tx = store.transaction()
    for name in ("_seal", "lsn", "gid", "_snapshot", "_request", "_ending", "_write_order",
                 "_undo_lock", "undo_fence", "file_reads", "commit_check"):
        assert getattr(tx, name) is None, name
        assert name not in tx.__dict__, name  # (a slot, not the instance's dict)
    assert tx._logged is False and tx.guard_files is False
    assert tx._write_trigger == MAX_TXN_WRITE_BYTES
    assert tx._inner_blockers == () and tx._savepoints == () and tx._undo == ()
    assert tx.guard_ranges == () and tx.guard_scopes == ()
    assert tx._serial == 0 and tx._order_gen == 0
    assert {"_serial", "_order_gen"} <= set(txmod.Transaction.__slots__)
    tx.rollback()


def test_a_dropped_transaction_is_freed_at_once(store):
    tx = store.transaction()
    tx.put("a", 1)
    sp = tx.savepoint("s")
    tx.put("b", 2)
    ref = weakref.ref(tx)
    gc.disable()
    try:
        del tx
        assert ref() is None  # (no cycle through the slots: freed without the collector)
    finally:
        gc.enable()
    assert sp._tx is None
    assert store.get("a") is None and store.get("b") is None


def test_the_end_puts_the_counting_trigger_order_and_blockers_back(store):
    tx = store.transaction()
    tx._write_trigger = -1  # (as ``_count_exactly`` leaves it)
    tx.put("a", 1)
    tx.update({f"k{i:04d}": i for i in range(300)})  # (past _SMALL_WRITE_SET)
    assert [k for k, _ in tx.scan(prefix="k")][:2] == ["k0000", "k0001"]
    assert tx._write_order is not None
    tx.note_inner_blocker(object())
    assert type(tx._inner_blockers) is list
    tx.commit()
    assert tx._write_trigger == MAX_TXN_WRITE_BYTES
    assert tx._write_order is None and tx._inner_blockers == ()
    assert store.get("k0299") == 299 and store.get("a") == 1


def test_a_rollback_to_drops_the_key_order(store):
    tx = store.transaction()
    tx.update({f"k{i:04d}": i for i in range(300)})
    sp = tx.savepoint()
    tx.put("k9999", 1)
    assert len(list(tx.scan(prefix="k"))) == 301
    assert tx._write_order is not None
    tx.rollback_to(sp)
    assert tx._write_order is None
    assert len(list(tx.scan(prefix="k"))) == 300
    tx.commit()


def test_a_commit_check_and_file_reads_go_at_the_end(store):
    calls = []
    tx = store.transaction()
    tx.file_reads = {"p": None}
    tx.commit_check = lambda: calls.append(1)
    tx.get("x")  # (read only: validated, the check runs)
    tx.commit()
    assert calls == [1]
    assert tx.file_reads is None and tx.commit_check is None
    tx2 = store.transaction()
    # (nothing read, nothing written: the check runs all the same)
    tx2.file_reads, tx2.commit_check = {}, lambda: calls.append(2)
    assert tx2.commit() is None
    assert calls == [1, 2]


def test_commit_is_decided_once(store):
    tx = store.transaction()
    tx.put("a", 1)
    lsn = tx.commit()
    assert lsn is not None and tx.lsn == lsn and tx.state == "committed"
    with pytest.raises(walstore.TransactionClosed, match="already committed"):
        tx.commit()
    with pytest.raises(walstore.TransactionClosed, match="already committed"):
        tx.rollback()
    assert tx._seal is not None and tx._seal.writes is None  # (holds none of its writes)
    assert tx._ending is None


def test_commit_from_inside_its_own_commit_is_refused(store):
    tx = store.transaction()
    tx.put("a", 1)
    seen = []

    def check():
        with pytest.raises(walstore.TransactionClosed, match="being committed by this thread"):
            tx.commit()
        seen.append(1)

    tx.file_reads, tx.commit_check = {}, check  # (set together, as agent.files does)
    tx.commit()
    assert seen == [1] and store.get("a") == 1


def test_a_rollback_racing_a_commit_waits_for_it(store):
    for _ in range(20):
        tx = store.transaction()
        tx.put("a", 1)
        go = threading.Barrier(2)
        out = []

        def other():
            go.wait()
            try:
                tx.rollback()
                out.append("rolled back")
            except walstore.TransactionClosed as e:
                out.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        go.wait()
        try:
            tx.commit()
            committed = True
        except walstore.TransactionClosed:
            committed = False
        t.join(10)
        assert committed != (out == ["rolled back"])
        assert tx.state == ("committed" if committed else "rolled back")


def test_an_empty_transaction_commits_nothing(store):
    with store.transaction() as tx:
        pass
    assert tx.state == "committed" and tx.lsn is None


@pytest.mark.parametrize("key", [b"k", b"x" * MAX_KEY_BYTES, "s", "\u00e9", bytearray(b"ba"),
                                 memoryview(b"mv")])
def test_a_puts_key_is_stored_as_encode_key_stores_it(store, key):
    with store.transaction() as tx:
        tx.put(key, 1)
        assert list(tx.writes) == [encode_key(key)]
    assert store.get(bytes(key) if not isinstance(key, str) else key) == 1


@pytest.mark.parametrize("key", [b"", b"x" * (MAX_KEY_BYTES + 1), "", 3, None])
def test_a_bad_key_is_refused_as_before(store, key):
    tx = store.transaction()
    with pytest.raises((TypeError, ValueError)) as e:
        tx.put(key, 1)
    with pytest.raises(type(e.value)) as e2:
        encode_key(key)
    assert str(e.value) == str(e2.value)
    assert not tx.writes
    tx.rollback()


def _same_refusal(tx):
    """A put is refused with what ``check_writable`` says (the reason, raised)."""
    with pytest.raises(walstore.WalstoreError) as slow:
        tx.check_writable()
    with pytest.raises(type(slow.value)) as fast:
        tx.put(b"a", 1)
    assert str(fast.value) == str(slow.value)
    assert not tx.writes


def test_a_put_on_an_unwritable_store_says_why(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    tx = s.transaction()
    s._engine.wal.failed = OSError("the log failed")  # (as a failed write leaves it)
    _same_refusal(tx)
    s._engine.wal.failed = None
    tx2 = s.transaction()
    s.close()
    _same_refusal(tx2)


def test_a_put_on_a_read_only_store_is_refused(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    s.close()
    r = walstore.open(str(tmp_path / "s"), readonly=True)
    try:
        tx = r.transaction()
        with pytest.raises(walstore.ReadOnlyError):
            tx.put(b"a", 1)
        tx.rollback()
    finally:
        r.close()


def test_a_put_after_the_end_or_when_prepared_is_refused(store):
    tx = store.transaction()
    tx.put("a", 1)
    tx.prepare("g1")
    with pytest.raises(walstore.TransactionClosed, match="prepared"):
        tx.put(b"b", 1)
    tx.commit()
    with pytest.raises(walstore.TransactionClosed, match="already committed"):
        tx.put(b"c", 1)
    assert txmod.Transaction.put is not None


# ---- the savepoint path ---------------------------------------------------------------

@pytest.mark.parametrize("by_name", [False, True])
def test_a_rollback_to_from_inside_the_commit_names_the_savepoint_as_before(store, by_name):
    tx = store.transaction()
    tx.put("a", 1)
    sp = tx.savepoint("x")
    tx.put("b", 2)
    said = []

    def check():
        with pytest.raises(walstore.TransactionClosed) as e:
            tx.rollback_to("x" if by_name else sp)
        said.append(str(e.value))

    tx.file_reads, tx.commit_check = {}, check  # (set together, as agent.files does)
    tx.commit()
    want = "'x'" if by_name else "<Savepoint 'x' #1 active>"
    assert said == [f"transaction {tx.id} is being committed by this thread (this call came "
                    f"from inside that one: a compensator or a signal handler); it was not "
                    f"rolled back to {want} here"]
    assert store.get("b") == 2  # (the commit went on, the rollback_to was refused)


def test_a_rollback_to_waiting_for_a_commit_names_the_savepoint_as_it_was(store):
    tx = store.transaction()
    tx.put("a", 1)
    sp = tx.savepoint("x")
    inside, go = threading.Event(), threading.Event()

    def check():
        inside.set()
        go.wait(10)

    tx.file_reads, tx.commit_check = {}, check  # (set together, as agent.files does)
    t = threading.Thread(target=tx.commit)
    t.start()
    assert inside.wait(10)
    out = []

    def other():
        try:
            tx.rollback_to(sp)
        except walstore.TransactionClosed as e:
            out.append(str(e))

    r = threading.Thread(target=other)
    r.start()
    time.sleep(0.05)  # (the rollback_to waits on the end lock the commit holds)
    go.set()
    t.join(10)
    r.join(10)
    assert out and out[0].endswith("it was not rolled back to <Savepoint 'x' #1 active> "
                                   "here"), out
    assert not sp.active


def test_rollback_to_the_newest_and_an_older_savepoint(store):
    tx = store.transaction()
    tx.put("a", 0)
    outer = tx.savepoint("outer")
    tx.put("a", 1)
    inner = tx.savepoint("inner")
    tx.put("a", 2)
    tx.put("b", 2)
    tx.rollback_to(inner)  # (the newest: _find's first look)
    assert tx.get("a") == 1 and tx.get("b") is None and inner.active
    tx.put("a", 3)
    tx.rollback_to("outer")  # (by name, past the newest)
    assert tx.get("a") == 0 and outer.active and not inner.active
    with pytest.raises(ValueError, match="no longer active"):
        tx.rollback_to(inner)
    other = store.transaction()
    osp = other.savepoint("outer")
    with pytest.raises(ValueError, match="belongs to transaction"):
        tx.rollback_to(osp)
    with pytest.raises(TypeError, match="expected a Savepoint or its name"):
        tx.rollback_to(3)
    other.rollback()
    tx.commit()
    assert store.get("a") == 0 and store.get("b") is None


def test_savepoint_and_rollback_to_after_the_end_are_refused(store):
    tx = store.transaction()
    sp = tx.savepoint()
    tx.rollback()
    with pytest.raises(walstore.TransactionClosed, match="already rolled back"):
        tx.savepoint()
    with pytest.raises(walstore.TransactionClosed, match="already rolled back"):
        tx.rollback_to(sp)
    tx2 = store.transaction()
    store.close()
    with pytest.raises(walstore.StoreClosed):
        tx2.savepoint()


def test_the_hooks_are_asked_for_a_body_only_when_they_can_give_one(store):
    hooks = store._hooks
    asked = []
    real = hooks.commit_body

    def spy(tx):
        asked.append(tx.id)
        return real(tx)

    plain = store.transaction()
    assert real(plain) == {}  # (what the skipped call answers)
    plain.rollback()
    hooks.commit_body = spy
    try:
        with store.transaction() as tx:
            tx.put("a", 1)
        assert asked == []
        with store.transaction(scope="agent/1") as scoped:
            scoped.put("agent/1/x", 1)
        assert asked == [scoped.id]
        with store.transaction() as tx:
            tx.commit_body["note"] = 1  # (a field of its own)
            tx.put("b", 1)
        assert asked == [scoped.id, tx.id]
    finally:
        del hooks.commit_body
    assert store.get("a") == 1 and store.get("agent/1/x") == 1 and store.get("b") == 1


def test_the_commits_seal_is_the_one_seal_writes_takes(store):
    """_commit takes the write set with _Seal's steps written out: the same fields."""
    tx = store.transaction()
    tx.put("a", 1)
    source, size = tx._writes, tx._write_bytes
    seen = {}

    def check():  # (inside the commit, the seal taken)
        seal = tx._seal
        seen.update(writes=list(seal.writes), source=seal.source, size=seal.size,
                    racers=list(seal.racers), changed=seal.changed, lookup=seal.lookup,
                    type=type(seal))

    tx.file_reads, tx.commit_check = {}, check
    tx.commit()
    assert seen == {"writes": list(source.items()), "source": id(source), "size": size,
                    "racers": [], "changed": False, "lookup": None, "type": txmod._Seal}
    assert tx._seal.writes is None  # (dropped at the end: no racer)
    other = store.transaction()
    other.put("b", 2)
    taken = other.seal_writes()  # (prepare's way: _Seal.__init__)
    assert taken == list(other.writes.items()) and other._seal.source == id(other.writes)
    other._seal = None
    other.rollback()
