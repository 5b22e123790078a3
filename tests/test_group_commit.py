"""Group commit (walstore.log.writer.WriteAheadLog.sync_to) under real threads.

- Read-your-writes: a commit that returns is visible to its own thread at once, also
  when a rotation by another thread made its record durable (the rotation's fsync used
  to advance ``synced_lsn`` without publishing: the committer returned and read the old
  value).
- Many committers: every acknowledged commit is visible right after it returns, fsyncs
  are shared, and the leader hands over without stranding anyone.
- An fsync error while others wait: every waiter ends (none hangs), each either
  acknowledged before the failure or told CommitOutcomeUnknown; after reopening, every
  acknowledged commit is there.
"""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import walstore
from walstore import fileio
from walstore.log import writer
from walstore.errors import CommitOutcomeUnknown, ReadOnlyError


def test_commit_made_durable_by_another_threads_rotation_is_visible_on_return(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="full")
    pipe = s._engine.pipeline
    real = pipe.durable_or_unknown
    appended, go = threading.Event(), threading.Event()

    def held(make_durable, event, txid, what, unknown, *ticket):  # A: appended, not synced
        if threading.current_thread().name == "A":
            appended.set()
            go.wait(10)
        return real(make_durable, event, txid, what, unknown, *ticket)

    pipe.durable_or_unknown = held

    class SlowAfterRotation(fileio.OSBackend):
        """Main thread's fsync after its rotation: let A run inside that window."""

        def fdatasync(self, fd):
            os.fdatasync(fd)
            if threading.current_thread().name == "MainThread" and s._engine.wal.rotations:
                go.set()
                time.sleep(0.2)

    seen = {}

    def a():
        with s.transaction() as tx:
            tx.put("k", "new")
        seen["get"] = s.get("k")
        seen["tx"] = s.transaction().get("k")

    t = threading.Thread(target=a, name="A")
    t.start()
    assert appended.wait(10)
    old = fileio.set_backend(SlowAfterRotation())
    try:
        with s.transaction() as tx:  # bigger than the first 1 MiB segment: rotates
            tx.put("big", os.urandom(1100 * 1024))
    finally:
        fileio.set_backend(old)
    t.join(20)
    assert s.stats()["wal_rotations"] == 1
    assert seen == {"get": "new", "tx": "new"}
    s.close()


@pytest.mark.parametrize("chain", [0, 2])
def test_many_committers_see_their_commits_and_share_fsyncs(tmp_path, monkeypatch, chain):
    """With chain=0 a leader never fsyncs again for waiters: each of them depends on
    being handed the lead."""
    monkeypatch.setattr(writer, "CHAIN_FSYNCS", chain)
    s = walstore.open(str(tmp_path / "s"), durability="full")
    T, N = 8, 150
    errors = []
    f0 = s.stats()["wal_fsyncs"]

    def work(t):
        try:
            for i in range(N):
                with s.transaction() as tx:
                    tx.put(f"{t}/{i}", i)
                assert s.get(f"{t}/{i}") == i  # read-your-writes, at once
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(T)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a committer is stranded"
    assert not errors, errors[:3]
    fsyncs = s.stats()["wal_fsyncs"] - f0
    assert fsyncs < T * N  # shared: fewer fsyncs than commits
    s.close()
    s = walstore.open(str(tmp_path / "s"))
    assert all(s.get(f"{t}/{i}") == i for t in range(T) for i in range(N))
    s.close()


def test_fsync_error_while_others_wait_strands_no_one_and_loses_nothing(tmp_path):
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="full")
    calls = {"n": 0}

    class FailingFsync(fileio.OSBackend):
        def fdatasync(self, fd):
            calls["n"] += 1
            time.sleep(0.002)  # long enough for waiters to gather behind the leader
            if calls["n"] == 40:
                raise OSError(errno.EIO, "injected EIO")
            os.fdatasync(fd)

    acked: list[str] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def work(t):
        for i in range(200):
            key = f"{t}/{i}"
            try:
                with s.transaction() as tx:
                    tx.put(key, i)
            except CommitOutcomeUnknown:
                with lock:
                    outcomes.append("unknown")
                return
            except ReadOnlyError:
                with lock:
                    outcomes.append("readonly")
                return
            with lock:
                acked.append(key)

    old = fileio.set_backend(FailingFsync())
    try:
        threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        fileio.set_backend(old)
    assert not any(t.is_alive() for t in threads), "a committer hangs after the fsync error"
    assert len(outcomes) == 6 and "unknown" in outcomes
    s._drop_like_a_crash()
    s = walstore.open(path)
    missing = [k for k in acked if s.get(k) is None]
    assert missing == []
    s.close()
