"""The group commit's wake-ups (stop 63): paths added to WriteAheadLog._sync_to / _lead.

- A waiter waits outside the mutex; woken and covered, it returns without taking the
  mutex again (read-your-writes holds: the leader published before it advanced
  ``synced_lsn`` and woke it).
- A leader fsyncing again for others wakes the waiters its last round covered right
  before that fsync (after writing the buffer), always before it returns, also when the
  next round fails.
- A waiter whose timed wait ran out after a leader took its entry, but before that
  leader released it, waits for that release (never queues its lock twice).
"""
from __future__ import annotations

import errno
import os
import threading
import time

import walstore
from walstore import fileio
from walstore.errors import CommitOutcomeUnknown, ReadOnlyError
from walstore.log import writer


class SlowSync(fileio.OSBackend):
    """fsyncs long enough for waiters to gather behind the leader; counts them."""

    def __init__(self, fail_at: int = 0) -> None:
        self.n = 0
        self.fail_at = fail_at

    def fdatasync(self, fd):
        self.n += 1
        time.sleep(0.001)
        if self.n == self.fail_at:
            raise OSError(errno.EIO, "injected EIO")
        os.fdatasync(fd)


def _commit_from_threads(s, threads: int, count: int):
    acked, errors, lock = [], [], threading.Lock()

    def work(t):
        for i in range(count):
            key = f"{t}/{i}"
            try:
                with s.transaction() as tx:
                    tx.put(key, i)
            except (CommitOutcomeUnknown, ReadOnlyError) as e:
                with lock:
                    errors.append(e)
                return
            if s.get(key) != i:  # read-your-writes on return
                with lock:
                    errors.append(AssertionError(f"{key} not visible on return"))
                return
            with lock:
                acked.append(key)

    ts = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not [t for t in ts if t.is_alive()], "a committer is stranded"
    return acked, errors


def test_chained_rounds_wake_every_covered_waiter_and_publish_first(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CHAIN_FSYNCS", 6)  # long chains: many deferred wake-ups
    s = walstore.open(str(tmp_path / "s"), durability="full")
    backend = SlowSync()
    old = fileio.set_backend(backend)
    try:
        acked, errors = _commit_from_threads(s, 8, 60)
    finally:
        fileio.set_backend(old)
    assert errors == []
    wal = s._engine.wal
    assert len(acked) == 480 and backend.n < 480  # fsyncs shared
    assert not wal._syncing and not wal._waiters and wal.synced_lsn == wal.written_lsn
    s.close()
    with walstore.open(str(tmp_path / "s")) as s:
        assert all(s.get(k) is not None for k in acked)


def test_a_failing_chained_round_strands_nobody_and_loses_no_acknowledged_commit(tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(writer, "CHAIN_FSYNCS", 6)
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="full")
    old = fileio.set_backend(SlowSync(fail_at=25))
    try:
        acked, errors = _commit_from_threads(s, 8, 100)
    finally:
        fileio.set_backend(old)
    assert len(errors) == 8  # every thread ended on the failure ...
    assert any(isinstance(e, CommitOutcomeUnknown) for e in errors)
    assert all(isinstance(e, ReadOnlyError) for e in errors)  # ... and nothing else
    wal = s._engine.wal
    assert wal.failed is not None and not wal._waiters
    s._drop_like_a_crash()
    with walstore.open(path) as s:
        assert [k for k in acked if s.get(k) is None] == []


def test_a_waiter_timing_out_after_its_entry_was_taken_waits_for_the_release(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(writer, "LOST_LEAD_S", 0.05)
    s = walstore.open(str(tmp_path / "s"), durability="normal")
    with s.transaction() as tx:
        tx.put("a", 1)  # written, not synced
    wal = s._engine.wal
    target = wal.written_lsn
    assert wal.synced_lsn < target
    # a leader (this thread, pretending) in its round: leading, in the lead
    with wal._sync_mutex:
        wal._syncing, wal._in_lead, wal._leader = True, True, -1
    returned = []
    t = threading.Thread(target=lambda: returned.append(wal.sync_to(target)), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not wal._waiters and time.monotonic() < deadline:
        time.sleep(0.001)
    with wal._sync_mutex:  # the round takes the entry (as covered) ...
        (entry,) = wal._waiters
        wal._waiters = []
        wal.synced_lsn = target  # (what the fsync would have done: nothing new to write)
    time.sleep(0.3)  # ... the waiter's timed wait runs out meanwhile, several times over
    assert t.is_alive() and returned == [] and wal._waiters == []  # it waits, unqueued
    with wal._sync_mutex:
        wal._syncing = wal._in_lead = False
        wal._leader = None
    entry[1].release()  # ... and the round's wake-up comes (after its mutex)
    t.join(5)
    assert not t.is_alive() and returned == [None]
    assert wal._waiters == [] and entry[1].locked()  # consumed (taken back), not queued again
    with s.transaction() as tx:
        tx.put("b", 2)
    s.sync()
    assert s.get("b") == 2
    s.close()
