"""The group commit's wake-ups (stop 63): paths added to WriteAheadLog._sync_to / _lead.

- A waiter waits outside the mutex; woken and covered, it returns without taking the
  mutex again (read-your-writes holds: the leader published before it advanced
  ``synced_lsn`` and woke it).
- A leader fsyncing again for others wakes the waiters its last round covered right
  before that fsync (after writing the buffer), always before it returns, also when the
  next round fails.
- A waiter whose timed wait ran out after a leader took its entry, but before that
  leader released it, waits for that release (never queues its lock twice).
- The leader writes its batch outside the WAL's (the journal's) lock: committers append
  behind it meanwhile; a plain append waits for that write and lands after it; when the
  write fails, the records it did not wholly write and those buffered behind them are
  voided (WalWriteError, nothing committed, not visible, not after a reopen), the whole
  ones stay, and the store goes on.
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
from walstore.log.writer import WalWriteError
from walstore.ops.verify import verify_store

from store_support import commit_recording_outcome as _commit
from tools.faults import FaultBackend, installed


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
        wal._syncing, wal._leader = True, -1
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
        wal._syncing = False
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


class HeldWrites(FaultBackend):
    """The next WAL fdatasync, then the next WAL pwrite (each once armed) wait for their
    ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_armed = self.write_armed = False
        self.sync_entered, self.sync_release = threading.Event(), threading.Event()
        self.write_entered, self.write_release = threading.Event(), threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.sync_armed and (self.path_of(fd) or "").endswith(".wal"):
            self.sync_armed = False
            self.sync_entered.set()
            self.sync_release.wait(20)
        super().fdatasync(fd)

    def pwrite(self, fd: int, data, offset: int) -> int:
        if self.write_armed and (self.path_of(fd) or "").endswith(".wal"):
            self.write_armed = False
            self.write_entered.set()
            self.write_release.wait(20)
        return super().pwrite(fd, data, offset)


def _start(s, key, value, outcome) -> threading.Thread:
    t = threading.Thread(target=_commit, args=(s, key, value, outcome), daemon=True)
    t.start()
    return t


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _batch_in_flight(s, fb: HeldWrites, outcome: dict):
    """A leader whose fsync is held, two commits buffered behind it; then its next
    round's write of those two is held.  Returns the threads."""
    wal = s._engine.wal
    fb.sync_armed = True
    threads = [_start(s, "lead", "L", outcome)]
    assert fb.sync_entered.wait(20)
    for i, key in enumerate(("j1", "j2")):
        threads.append(_start(s, key, key.upper(), outcome))
        _wait_for(lambda: len(wal._buffer) == i + 1, "a commit did not reach the buffer")
    fb.write_armed = True
    fb.sync_release.set()  # round 1 ends; round 2 writes j1 and j2 ...
    assert fb.write_entered.wait(20)  # ... outside the lock, held here
    assert wal._writing is not None and not wal._buffer
    return threads


def test_a_failed_batch_write_voids_the_records_buffered_behind_it(tmp_path):
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            with s.transaction() as tx:
                tx.put("seed", 0)
            wal = s._engine.wal
            outcome: dict = {}
            threads = _batch_in_flight(s, fb, outcome)
            first = len(wal._writing.buffer[0][0])
            end_before = wal.writer.offset
            # a commit arriving now is not held up by the write: it is buffered behind it
            threads.append(_start(s, "j3", "J3", outcome))
            _wait_for(lambda: len(wal._buffer) == 1, "an append waited for the leader's write")
            rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal", partial=first + 10)
            fb.write_release.set()
            for t in threads:
                t.join(30)
                assert not t.is_alive()
            assert rule.fired == 1
            assert outcome["lead"] == "ok" and outcome["j1"] == "ok", outcome
            for k in ("j2", "j3"):  # not wholly written, and behind it: nothing committed
                e = outcome[k]
                assert isinstance(e, WalWriteError) and e.errno == errno.ENOSPC, repr(e)
                assert "nothing of it was logged" in str(e)
                assert k not in s
            assert s.stats()["wal_voided_commits"] == 2
            assert wal._writing is None and not wal._buffer
            assert wal.writer.offset < end_before and wal.written_lsn == wal.writer.end_lsn
            for k in ("j2", "j3"):  # the store goes on, the same keys commit at reused LSNs
                with s.transaction() as tx:
                    assert tx.get(k) is None
                    tx.put(k, "again")
        finally:
            s.close()
    with walstore.open(path) as s:
        assert (s.get("lead"), s.get("j1"), s.get("j2"), s.get("j3")) == ("L", "J1", "again",
                                                                          "again")
    rep = verify_store(path)
    assert rep.ok, rep.errors


def test_a_plain_append_waits_for_the_batch_in_flight_and_lands_after_it(tmp_path):
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            wal = s._engine.wal
            outcome: dict = {}
            threads = _batch_in_flight(s, fb, outcome)
            batch = wal._writing
            tx = s.transaction()
            tx.put("p", 1)
            prep = threading.Thread(target=tx.prepare, args=("g1",), daemon=True)
            prep.start()  # a PREPARE: written at once, so after the batch in flight
            time.sleep(0.2)
            assert prep.is_alive() and wal._writing is batch  # it waits for the write
            fb.write_release.set()
            prep.join(20)
            for t in threads:
                t.join(20)
            assert not prep.is_alive() and all(v == "ok" for v in outcome.values()), outcome
            assert len(outcome) == 3
            assert s.decision("g1") == "prepared"
            s.commit_prepared("g1")
        finally:
            s.close()
    with walstore.open(path) as s:
        assert (s.get("lead"), s.get("j1"), s.get("j2"), s.get("p")) == ("L", "J1", "J2", 1)
    rep = verify_store(path)
    assert rep.ok, rep.errors


def test_a_commit_after_a_crowded_round_goes_through_the_buffer_then_alone_at_once(tmp_path):
    """After a round with waiters (other threads committing) a commit that finds no leader
    is buffered all the same, and its own lead writes it (outside the lock); a round
    without waiters ends that, and a lone commit is written at once again."""
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="full")
    wal = s._engine.wal
    with s.transaction() as tx:
        tx.put("alone", 0)
    assert wal.buffered_records == 0 and not wal._crowded
    wal._crowded = True  # (as a round with waiters leaves it)
    with s.transaction() as tx:
        tx.put("after-crowd", 1)
    assert wal.buffered_records == 1  # buffered, written by its own lead
    assert s.get("after-crowd") == 1 and wal.synced_lsn == wal.written_lsn
    assert not wal._crowded and not wal._buffer and wal._writing is None
    with s.transaction() as tx:
        tx.put("alone-again", 2)
    assert wal.buffered_records == 1  # written at once
    acked, errors = _commit_from_threads(s, 8, 40)  # crowded rounds: both paths mixed
    assert errors == [] and len(acked) == 320
    s.close()
    with walstore.open(path) as s:
        assert (s.get("alone"), s.get("after-crowd"), s.get("alone-again")) == (0, 1, 2)
        assert all(s.get(k) is not None for k in acked)
