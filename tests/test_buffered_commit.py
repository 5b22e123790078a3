"""Buffered group commit (walstore.log.writer: ``append_buffered``, ``_flush``).

Under durability="full" a commit record that arrives while the group commit's leader is
fsyncing waits in memory, and the leader writes everyone's in one write before its next
fsync.  What must hold:

- it batches: with many committers, fewer WAL writes than commits, each commit visible
  when it returns;
- a write error on a batch fails exactly the commits whose records it did not wholly
  write (WalWriteError with the disk's errno: nothing committed), never one it wrote;
  none of the failed ones is visible, now or after reopening; their LSNs go to the next
  records; the store goes on, and the same keys commit again without a false conflict;
- a failed commit's actions are compensated once, and the action log says so after a
  reopen (state and side effects agree).
"""
from __future__ import annotations

import errno
import threading
import time

import walstore
from walstore.codec import encode_key
from walstore.log.writer import WalWriteError
from walstore.ops.verify import verify_store

from store_support import commit_recording_outcome as _commit
from tools.faults import FaultBackend, installed


class HeldFsync(FaultBackend):
    """The next WAL fdatasync (once ``armed``) waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.armed and (self.path_of(fd) or "").endswith(".wal"):
            self.armed = False
            self.entered.set()
            self.release.wait(20)
        super().fdatasync(fd)


def _committer(s, key, value, outcome):
    """A joiner for ``_buffer_behind_a_held_leader``: a thread committing key = value."""
    def start() -> threading.Thread:
        t = threading.Thread(target=_commit, args=(s, key, value, outcome))
        t.start()
        return t
    return start


def _buffer_behind_a_held_leader(s, fb: HeldFsync, outcome: dict, joiners: list):
    """Start a leader whose fsync is held, then make each of ``joiners`` (a callable that
    makes one more commit arrive, returning its thread or None) act once the previous
    commit is in the buffer.  Returns (the leader's thread, the joiners' threads)."""
    wal = s._engine.wal
    fb.armed = True
    lead = threading.Thread(target=_commit, args=(s, "lead", "L", outcome))
    lead.start()
    assert fb.entered.wait(20)
    started = []
    for i, join in enumerate(joiners):
        t = join()
        if t is not None:
            started.append(t)
        deadline = time.monotonic() + 20
        while len(wal._buffer) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert len(wal._buffer) == len(joiners)
    return lead, started


def test_many_committers_share_writes_and_see_their_commits(tmp_path):
    fb = FaultBackend()
    with installed(fb):
        s = walstore.open(str(tmp_path / "s"), durability="full")
        try:
            before = len(fb.calls_to("pwrite", path="*.wal"))
            bad = []

            def worker(t):
                for i in range(60):
                    with s.transaction() as tx:
                        tx.put(f"w{t}/{i}", i)
                    if s.get(f"w{t}/{i}") != i:
                        bad.append((t, i))

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            writes = len(fb.calls_to("pwrite", path="*.wal")) - before
            assert not bad
            assert s.stats()["wal_buffered_commits"] > 0
            assert writes < 480, f"{writes} WAL writes for 480 commits: nothing was batched"
        finally:
            s.close()
    with walstore.open(str(tmp_path / "s")) as s:
        assert all(s.get(f"w{t}/{i}") == i for t in range(8) for i in range(60))


def test_a_failed_batch_write_fails_only_the_commits_it_did_not_write(tmp_path):
    path = str(tmp_path / "s")
    fb = HeldFsync()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            for i in range(5):
                with s.transaction() as tx:
                    tx.put(f"seed{i}", i)
            wal = s._engine.wal
            outcome: dict = {}
            lead, others = _buffer_behind_a_held_leader(
                s, fb, outcome, [_committer(s, f"t{i}", f"v{i}", outcome) for i in range(4)])
            first = len(wal._buffer[0][0])
            end_before = wal.written_lsn
            # the batch's write puts down the first record and 10 bytes of the second
            rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal", partial=first + 10)
            fb.release.set()
            for t in [lead] + others:
                t.join(30)
                assert not t.is_alive()
            assert rule.fired == 1
            assert outcome["lead"] == "ok"
            oks = [k for k in outcome if k != "lead" and outcome[k] == "ok"]
            failed = {k: e for k, e in outcome.items() if e != "ok"}
            assert len(oks) == 1 and len(failed) == 3, outcome
            for k, e in failed.items():
                assert isinstance(e, WalWriteError) and e.errno == errno.ENOSPC, repr(e)
                assert "nothing of it was logged" in str(e)
            assert s.stats()["wal_voided_commits"] == 3
            assert wal.written_lsn < end_before
            # nothing of the failed ones is visible or left in memory
            assert s.get(oks[0]) == "v" + oks[0][1:]
            for k in failed:
                assert k not in s
                assert s._engine.memtable.last_write(encode_key(k)) == -1
            # the store goes on: the same keys commit (no false conflict), at reused LSNs
            for k in failed:
                with s.transaction() as tx:
                    assert tx.get(k) is None
                    tx.put(k, "again")
            assert all(s.get(k) == "again" for k in failed)
        finally:
            s.close()
    with walstore.open(path) as s:
        assert s.get("lead") == "L" and s.get(oks[0]) == "v" + oks[0][1:]
        assert all(s.get(k) == "again" for k in failed)
        assert all(s.get(f"seed{i}") == i for i in range(5))
    rep = verify_store(path)
    assert rep.ok, rep.errors


def test_a_voided_commit_in_a_batch_compensates_its_action_once(tmp_path):
    """The last of three buffered commits carries an action; the batch's write puts down
    only the first: the action's commit is voided and its compensation runs once."""
    path = str(tmp_path / "s")
    calls = []
    fb = HeldFsync()
    with installed(fb):
        s = walstore.open(path, durability="full", compensators={"refund": calls.append})
        try:
            wal = s._engine.wal
            outcome: dict = {}
            acted, go = threading.Event(), threading.Event()

            def with_action():
                try:
                    with s.transaction() as tx:
                        tx.put("order", "paid")
                        with tx.action("charge", args={"n": 1}, compensate="refund") as a:
                            a.result = "ch_1"
                        acted.set()  # intent and result are durable; commit when told
                        go.wait(20)
                    outcome["order"] = "ok"
                except BaseException as e:  # noqa: BLE001
                    outcome["order"] = e

            actor = threading.Thread(target=with_action)
            actor.start()
            assert acted.wait(20)
            lead, threads = _buffer_behind_a_held_leader(s, fb, outcome, [
                _committer(s, "p0", 0, outcome), _committer(s, "p1", 1, outcome),
                go.set])  # the action's commit is the third in the buffer
            assert wal._buffer[2][1].lsn > wal._buffer[1][1].lsn
            fb.fail("pwrite", errno.EIO, path="*.wal", partial=len(wal._buffer[0][0]) + 5)
            fb.release.set()
            for t in [actor, lead] + threads:
                t.join(30)
                assert not t.is_alive()
            assert outcome["lead"] == "ok"
            assert isinstance(outcome["order"], WalWriteError), outcome
            assert [k for k in ("p0", "p1") if outcome[k] == "ok"] != []
            assert len(calls) == 1
            assert "order" not in s
            [a] = s.actions()
            assert a.state == "compensated"
        finally:
            s.close()
    with walstore.open(path, compensators={"refund": calls.append}) as s:
        assert len(calls) == 1 and "order" not in s
        [a] = s.actions()
        assert a.state == "compensated"
    assert verify_store(path).ok


def test_a_rotation_makes_the_old_segments_records_durable_before_the_new_segment(tmp_path):
    """A rotation that writes a batch into the old segment must sync it before the new
    segment becomes durable: otherwise a power loss in between leaves the old segment
    short of a durable successor by more than its SEAL — a gap recovery refuses (found by
    tools/powerloss.py --threads 8: 3 seeds of 6 left unopenable images)."""
    import os
    import uuid

    from walstore.log.segment import create_segment
    from walstore.log.writer import WriteAheadLog
    from walstore.log.format import SEGMENT_HEADER_SIZE, RecordType

    wal_dir = str(tmp_path / "wal")
    os.makedirs(wal_dir)
    store_id = uuid.uuid4().bytes
    first = create_segment(wal_dir, store_id, 0, 64 * 1024)
    fb = FaultBackend(record=True)
    with installed(fb):
        wal = WriteAheadLog(wal_dir, store_id, 0, SEGMENT_HEADER_SIZE, segment_size=64 * 1024)
        wal._syncing = True  # as while a group commit leader fsyncs: commits are buffered
        tickets = [wal.append_grouped(RecordType.COMMIT, b"\x80" * 300)[2] for _ in range(3)]
        assert all(t is not None for t in tickets) and len(wal._buffer) == 3
        wal.rotate()  # writes the batch, then moves to a new segment
        wal._syncing = False
        wal.close()
    events = fb.events
    made = next(e for e in events if e.op == "rename" and e.dst.endswith(".wal"))
    dir_sync = next(e for e in events if e.op == "fsync_dir" and e.seq > made.seq)
    batch = [e for e in events if e.op == "pwrite" and e.path == first and e.seq < made.seq
             and e.offset >= SEGMENT_HEADER_SIZE]
    assert batch, "the batch was not written before the rotation"
    last = max(e.seq for e in batch)
    assert any(e.op in ("fsync", "fdatasync") and e.path == first and e.seq > last
               and e.done_seq is not None and e.done_seq < dir_sync.seq for e in events), (
        "the old segment's records were not synced before the new segment was durable")


def test_waiting_for_durability_while_holding_the_wal_lock_is_refused(tmp_path):
    """The leader takes the WAL's lock to write the buffer: a caller that would wait for
    it while holding that lock would deadlock, so it is refused at once (RuntimeError)."""
    fb = HeldFsync()
    with installed(fb):
        s = walstore.open(str(tmp_path / "s"), durability="full")
        try:
            wal = s._engine.wal
            outcome: dict = {}
            lead, others = _buffer_behind_a_held_leader(
                s, fb, outcome, [_committer(s, "t0", 0, outcome)])
            ticket = wal._buffer[0][1]
            with wal.lock:
                try:
                    wal.sync_to(ticket.end)
                    raise AssertionError("sync_to waited holding the WAL's lock")
                except RuntimeError as e:
                    assert "deadlock" in str(e)
            fb.release.set()
            for t in [lead] + others:
                t.join(30)
                assert not t.is_alive()
            assert outcome == {"lead": "ok", "t0": "ok"}
        finally:
            s.close()
