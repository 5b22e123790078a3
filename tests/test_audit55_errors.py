"""Audit stop 55, the error surface under injected I/O faults (CONTRACT section 4, promise 6:
"After an fsync error the store turns read-only (never retry fsync)").

Faults come from ``tools.faults.FaultBackend`` (``test_faults``' ``faults`` fixture): one
failing call at a time, in the calls a public verb makes, and what the store says and does
afterwards; each store is reopened without faults and checked.
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import walstore  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

from test_faults import faults  # noqa: E402,F401 (the fault backend, installed per test)

LMDB_WRITES = ("lmdb_commit", "lmdb_sync")


def _store_to_purge(path: str) -> None:
    with walstore.open(path) as s:
        for i in range(10):
            with s.transaction() as tx:
                tx.put(f"gone/{i}", {"secret": f"s{i}" * 20})
                tx.put(f"kept/{i}", i)


def _purge_calls(tmp_path, faults, op: str) -> int:
    """How many LMDB calls of ``op`` a purge makes (counted on a twin store)."""
    path = str(tmp_path / "twin")
    _store_to_purge(path)
    with walstore.open(path, apply_interval=3600) as s:
        mark = faults.now()
        s.purge("gone/")
        return len(faults.calls_to(op, after=mark))


@pytest.mark.parametrize("op", ["lmdb_sync", "lmdb_commit"])
def test_a_failed_lmdb_write_at_the_end_of_a_purges_erasure_stops_the_store(tmp_path,
                                                                             faults, op):
    """A purge's erasure records itself done (``applier.erased``: an LMDB commit) and
    syncs LMDB as its very last steps.  Either failing raised ErasureOwed saying
    "store.checkpoint() or the next writable open finishes it" — and the store stayed
    writable: the next commit was acknowledged, and LMDB was written and synced again in
    that process after a failed sync (an fsync error must never be retried: the pages it
    failed to write may be gone from the page cache, marked clean).  Now the failure stops
    the store as every other LMDB write failure does: read-only until reopened, no LMDB
    call after the failed one, and the reopen finishes the erasure."""
    last = _purge_calls(tmp_path, faults, op)
    assert last >= 1
    path = str(tmp_path / "s")
    _store_to_purge(path)
    s = walstore.open(path, apply_interval=3600)
    try:
        rule = faults.fail(op, nth=last)
        with pytest.raises(walstore.ErasureOwed) as info:
            s.purge("gone/")
        assert rule.fired == 1
        failed = rule.failed_calls[0]
        assert info.value.__cause__ is not None
        assert info.value.report["erasure_owed"] is True
        assert "read-only" in str(info.value), str(info.value)
        assert s.readonly
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.put("later", 1)
        assert s.get("gone/1") is None and s.get("kept/3") == 3  # reads go on
        s.close()
        assert faults.calls_to(LMDB_WRITES, after=failed.seq) == [], \
            "LMDB was written or synced again after its write failed"
    finally:
        s.close()
    faults.clear()
    with walstore.open(path) as s:
        assert [s.get(f"kept/{i}") for i in range(10)] == list(range(10))
        assert list(s.scan(prefix="gone/")) == []
        assert s.get("later") is None
        assert s._engine.erase_owed() == []
    rep = verify_store(path)
    assert rep.ok, rep.errors
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"s1s1s1s1" not in f.read(), f"erased bytes still in {name}"


@pytest.mark.parametrize("op", ["lmdb_sync", "lmdb_commit"])
def test_a_failed_lmdb_write_reserving_transaction_ids_stops_the_store(tmp_path, faults, op):
    """Every 65,536 transaction ids, ``store.transaction()`` moves the durable reservation
    of ids on (an LMDB write and sync).  When that failed, the internal StateWriteError
    (no errno, no file) left ``transaction()``, the store stayed writable, and the very
    next ``transaction()`` wrote and synced LMDB again in the same process: a failed sync
    retried.  Now it stops the store as any failed LMDB write does (StoreIOError naming
    data.mdb, read-only until reopened, no LMDB call after the failed one); reads go on,
    and the reopen keeps every commit and hands out ids never used before."""
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", apply_interval=3600)
    try:
        with s.transaction() as tx:
            tx.put("before", 1)
        first = tx.id
        s.checkpoint()  # (nothing left for the applier to write: the reservation is next)
        rule = faults.fail(op)
        n = 0
        with pytest.raises(walstore.WalstoreError) as info:
            for n in range(1 << 17):  # (the reservation is due within 65,536)
                s.transaction().rollback()
        assert rule.fired == 1, f"no reservation failed in {n} transactions"
        e = info.value
        assert isinstance(e, walstore.StoreIOError) and e.errno is not None, repr(e)
        assert e.filename == os.path.join(path, "db", "data.mdb")
        assert e.__cause__ is not None
        assert s.readonly
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.put("later", 1)
        assert s.get("before") == 1
        tx = s.transaction()  # (a transaction that only reads still runs)
        assert tx.get("before") == 1
        tx.rollback()
        s.close()
        assert faults.calls_to(LMDB_WRITES, after=rule.failed_calls[0].seq) == [], \
            "LMDB was written or synced again after its write failed"
    finally:
        s.close()
    faults.clear()
    with walstore.open(path) as s:
        assert s.get("before") == 1 and s.get("later") is None
        with s.transaction() as tx:
            tx.put("after", 2)
        assert tx.id > first
        assert [t.txid for t in s.log()].count(first) == 1


@pytest.mark.parametrize("failing", ["commit", "sync"])
def test_after_a_failed_lmdb_write_no_other_thread_writes_or_syncs_lmdb(tmp_path, faults,
                                                                         failing):
    """Between an LMDB write or sync failing in one thread (the shipper's pin, the
    applier) and the engine stopping the store, another thread's LMDB write could still
    commit — LMDB is opened sync=True, so that commit fdatasyncs after a failed one (h2,
    stop 74: a window the test above raced).  The handle itself now refuses every later
    write and sync once one failed, under its write lock: the write below stands for that
    other thread, before ``Engine.fail``."""
    from walstore.engine.lmdb_state import StateWriteError
    s = walstore.open(str(tmp_path / "s"), apply_interval=3600)
    try:
        state = s._engine.state
        rule = faults.fail_lmdb(failing)
        with pytest.raises(StateWriteError):
            if failing == "commit":
                state.write(lambda txn: txn.put(b"probe", b"1", db=state.meta))
            else:
                state.sync()
        failed = rule.failed_calls[0]
        for again in (lambda: state.write(lambda txn: txn.put(b"probe", b"2",
                                                              db=state.meta)),
                      state.sync):
            with pytest.raises(StateWriteError, match="earlier LMDB write or sync"):
                again()
        assert faults.calls_to(LMDB_WRITES, after=failed.seq) == [], \
            "LMDB was written or synced again after a failed write or sync"
    finally:
        faults.clear()
        s._engine.fail(RuntimeError("the test's failed LMDB write"))
        s.close()


def test_a_failed_lmdb_write_of_the_replicas_pin_stops_the_store(tmp_path, faults):
    """A shipping round ends by recording the replica's position in LMDB (the trim pin the
    next open keeps).  That write failing was swallowed ("replication never fails the
    store"): the store stayed writable and wrote LMDB again in the same process — LMDB is
    opened sync=True, so each of those commits fdatasyncs after a failed one (never retry
    fsync).  Now the failure stops the store as any failed LMDB write does (read-only,
    ``stats()`` names it); replication still never fails a commit, and the reopen keeps
    every commit."""
    import time
    path = str(tmp_path / "s")
    s = walstore.open(path, replicate_to="file://" + str(tmp_path / "replica"),
                      apply_interval=3600)
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        s.checkpoint()  # (nothing left for the applier: the pin's write is the next one)
        rule = faults.fail_lmdb("commit")
        with s.transaction() as tx:
            tx.put("b", 2)
        s.sync_replica(timeout=30)
        # (the round writes the pin as it ends, in the shipper's thread, which then stops
        # the store: waiting for the fault alone and reading ``readonly`` at once raced that
        # thread, between the failed write and ``Engine.fail`` -- a CI-like run, stop 74)
        deadline = time.monotonic() + 30
        while not (rule.fired and s.readonly) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rule.fired == 1
        failed = rule.failed_calls[0]
        assert s.readonly, "the store stayed writable after a failed LMDB write"
        assert any("Input/output error" in e for e in s.stats()["background_errors"])
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.put("later", 1)
        assert s.get("b") == 2
        s.close()
        assert faults.calls_to(LMDB_WRITES, after=failed.seq) == [], \
            "LMDB was written again after its write failed"
    finally:
        s.close()
    faults.clear()
    with walstore.open(path) as s:
        assert (s.get("a"), s.get("b"), s.get("later")) == (1, 2, None)


def test_after_a_purges_swap_failed_half_way_no_other_thread_writes_lmdb(tmp_path, faults):
    """A purge's compaction renames the rewritten data file in, then a fresh lock file;
    the second rename failing leaves the new data file beside a lock file in doubt, a
    StateWriteError ("reopen the store").  The handle refused nothing after it, though:
    between that raise (the write lock let go) and ``Engine.fail``, another thread's
    write (the shipper's pin, a reservation of transaction ids) committed, and so
    fdatasynced, through the environment reopened beside the old lock file (probe h5,
    stop 74).  The write below stands for that other thread, as in the test above."""
    from walstore.engine.lmdb_state import StateWriteError
    path = str(tmp_path / "s")
    _store_to_purge(path)
    s = walstore.open(path, apply_interval=3600)
    try:
        state = s._engine.state
        rule = faults.fail("rename", path="*/db/lock.mdb")
        with pytest.raises(StateWriteError, match="renamed in"):
            state.compact()
        assert rule.fired == 1
        mark = faults.now()
        for again in (lambda: state.write(lambda txn: txn.put(b"probe", b"1",
                                                              db=state.meta)),
                      state.sync, state.compact):
            with pytest.raises(StateWriteError, match="earlier LMDB write or sync"):
                again()
        assert faults.calls_to(LMDB_WRITES, after=mark) == [], \
            "LMDB was written or synced after the swap failed half-way"
    finally:
        faults.clear()
        s._engine.fail(RuntimeError("the test's failed swap"))
        s.close()
    with walstore.open(path) as s:
        assert [s.get(f"kept/{i}") for i in range(10)] == list(range(10))
    assert verify_store(path).ok


def test_lmdbs_refusal_after_a_failed_write_names_a_nearly_full_disk(mount_tmpfs):
    """An LMDB write failed (LMDB reports a full disk as an I/O error), perhaps the
    applier's in the background, and every later write is refused: the refusal now
    carries the room left when the disk is nearly full.  A CI run's full-disk sweep
    (tests/test_tools_fullsweep.py) met such a refusal as a writer's first error, with
    nothing in it naming the full disk."""
    import lmdb

    from test_spare_headroom import fill_to
    from walstore.engine.lmdb_state import StateWriteError
    mnt = mount_tmpfs("16m")
    with walstore.open(str(mnt / "s"), durability="none") as s:
        state = s._engine.state
        state.write_failed = lmdb.DiskError("mdb_txn_commit: Input/output error")
        try:
            fill_to(mnt, 256 * 1024)
            try:
                state._refuse_after_failure()
            except StateWriteError as e:
                text = str(e)
            else:
                raise AssertionError("not refused")
            assert "Input/output error" in text and "bytes free" in text, text
            os.unlink(str(mnt / "fill"))
            try:
                state._refuse_after_failure()
            except StateWriteError as e:  # (room again: no note)
                assert "bytes free" not in str(e), str(e)
        finally:
            state.write_failed = None
