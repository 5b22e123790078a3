"""Audit 66: the WAL writer's group commit against close() and against the log's failure
(walstore/log/writer.py, walstore/engine/pipeline.py), driven into chosen interleavings
(threads stopped at chosen lines, fsyncs held) and failures (the fault seam).

Found (each test's docstring says what was seen before the fix):
- a close() cut short after its first sync of the log (its checkpoint's LMDB sync failing,
  say) closed the WAL's descriptor under a commit whose record came after that sync and
  whose fsync was in flight, or about to start: the fsync failed on the closed
  descriptor (EBADF) and the commit was told CommitOutcomeUnknown ("the log failed (Bad
  file descriptor)") for a record the next open then found; with the descriptor's
  number taken by a file opened meanwhile, the fsync went to that file and the commit
  returned with its record never synced;
- a group commit leader's next round wrote the buffered records after the log had
  failed meanwhile (the spare's fsync): bytes written by a log said to take no more
  writes (its fsync was refused after, so nothing was acknowledged).

Looked at and found right: a clean close() under 6-10 threads committing durably, fsyncs
slowed at random (0-4 ms; 90 closes): every commit returned or was refused with
StoreClosed before its record — a commit record cannot follow the close's CHECKPOINT
(both are appended under the journal lock, the closed check made under it), so the
close's last sync waits for every leader's round that matters, and no round chains past
it.  Left as it is: under durability="normal" a commit that passed ``append``'s
failed-log check just before the flusher's fsync failed writes its record after the
failure and returns (its record written, as "normal" promises; the commits acknowledged
just before share its fate: unsynced, the store read-only); the failure is set under the
fsync lock, not the log's, which an append holds.
"""
from __future__ import annotations

import errno
import os
import threading

import pytest

import walstore
from walstore.engine.engine import Engine
from walstore.engine.pipeline import CommitPipeline
from walstore.log.writer import WriteAheadLog

from test_audit58_races import _line_of
from test_audit64_groupcommit import Stop
from test_perf63_groupcommit import HeldWrites, _start, _wait_for
from store_support import commit_recording_outcome, current_frame_of
from tools.faults import installed


class Stops(Stop):
    """Stops the thread it starts (``Stop.start``) at each (code, line) of ``points`` in
    turn, once each: ``arrived[i]`` is set there, and it waits for ``release[i]``."""

    def __init__(self, *points) -> None:
        self.points = list(points)
        self.codes = {code for code, _line in points}
        self.next = 0
        self.arrived = [threading.Event() for _ in points]
        self.release = [threading.Event() for _ in points]

    def _local(self, frame, event, arg):
        i = self.next
        if (event == "line" and i < len(self.points)
                and (frame.f_code, frame.f_lineno) == self.points[i]):
            self.next = i + 1
            self.arrived[i].set()
            self.release[i].wait(20)
        return self._local

    def _trace(self, frame, event, arg):
        return self._local if frame.f_code in self.codes else None


PAST_THE_CLOSED_CHECK = (CommitPipeline._append_locked.__code__,
                         _line_of(CommitPipeline._append_locked, "body = dict(req.body"))
LEADER_BEFORE_ITS_FSYNC = (WriteAheadLog._lead.__code__,
                           _line_of(WriteAheadLog._lead, "with self._sync_lock:"))
WAL_CLOSE = WriteAheadLog.close.__code__
# where close() lets the descriptor go (after the fix: waits for the fsync in flight first)
AT_THE_DESCRIPTORS_CLOSE = _line_of(WriteAheadLog.close, "with self._sync_lock:",
                                    "self.writer.close()")
APPLIED_UP_TO_THE_END = Engine._applied_up_to_the_end.__code__


def _inside(thread: threading.Thread, code, line: int | None = None) -> bool:
    """Whether ``thread`` is running ``code`` now (anywhere in its stack; at ``line``)."""
    frame = current_frame_of(thread.ident)  # (the collector held off: gh-106883)
    while frame is not None:
        if frame.f_code is code:
            return line is None or frame.f_lineno == line
        frame = frame.f_back
    return False


class HeldSyncsSeen(HeldWrites):
    """HeldWrites noting the file each WAL fdatasync really reached (``reached``: read
    through its descriptor right before the call, after any hold): a descriptor closed
    meanwhile syncs nothing, or, its number taken by a file opened since, that file."""

    def __init__(self) -> None:
        super().__init__()
        self.reached: list[str | None] = []

    def _sync(self, op: str, fd, path, real) -> None:
        if op == "fdatasync" and (path or "").endswith(".wal"):
            try:
                self.reached.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                self.reached.append(None)  # (closed)
        super()._sync(op, fd, path, real)


@pytest.mark.parametrize("where", ["in-its-fsync", "about-to-fsync"])
def test_a_commit_in_flight_when_close_fails_is_never_told_unknown(tmp_path, where):
    """A commit ("v") passes the closed check; close() begins in another thread (its
    first sync of the log comes before v's record), v's record is appended, and v leads
    its fsync — held there (``in-its-fsync``), or stopped right before it
    (``about-to-fsync``); close()'s checkpoint then fails (LMDB's sync: EIO), so close()
    never makes its last sync, and lets the store go.  Before the fix, the WAL was
    closed under v: its fsync failed on the closed descriptor (or the name check's
    fstat right after it), and v was told CommitOutcomeUnknown ("the log failed (Bad
    file descriptor)") — for a record the next open found and redid.  Now close() waits
    for the fsync in flight and makes what was written durable before it lets the
    descriptor go: v is committed, and told so."""
    path = str(tmp_path / "s")
    fb = HeldSyncsSeen()
    with installed(fb):
        s = walstore.open(path, durability="full")
        wal, outcome, closing = s._engine.wal, {}, {}
        commit_recording_outcome(s, "a", "A", outcome)
        s._engine.drain()  # (the applier idle: it never waits for v's journal lock)
        points = [PAST_THE_CLOSED_CHECK]
        if where == "about-to-fsync":
            points.append(LEADER_BEFORE_ITS_FSYNC)
        stops = Stops(*points)
        v = stops.start(lambda: commit_recording_outcome(s, "v", "V", outcome))
        assert stops.arrived[0].wait(20)  # v holds the journal lock, past the closed check
        rule = fb.fail_lmdb(("commit", "sync"))  # (close()'s checkpoint: its next LMDB call)

        def close():
            try:
                s.close()
                closing["error"] = None
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                closing["error"] = e
        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        # close()'s first sync of the log is made; its checkpoint waits for the journal
        # lock v holds
        _wait_for(lambda: _inside(closer, APPLIED_UP_TO_THE_END), "close() did not begin")
        if where == "in-its-fsync":
            fb.sync_armed = True
        stops.release[0].set()  # v appends (after close()'s first sync) and leads
        if where == "in-its-fsync":
            assert fb.sync_entered.wait(20)
        else:
            assert stops.arrived[1].wait(20)
        # close()'s checkpoint fails; it lets the log go (before the fix) or waits for
        # v's fsync in flight (held) in the WAL's close
        _wait_for(lambda: wal.writer.fd < 0 or not closer.is_alive()
                  or _inside(closer, WAL_CLOSE, AT_THE_DESCRIPTORS_CLOSE),
                  "close() did not reach the log's descriptor")
        fb.sync_release.set()
        for stop in stops.release:
            stop.set()
        for t in (v, closer):
            t.join(20)
            assert not t.is_alive()
        assert rule.fired == 1
        assert isinstance(closing["error"], walstore.StoreIOError), closing
        assert outcome == {"a": "ok", "v": "ok"}, outcome
        wal_syncs = fb.calls_to("fdatasync", path="*.wal")
        assert all(c.error is None for c in wal_syncs), wal_syncs
        assert all(p is not None and p.endswith(".wal") for p in fb.reached), fb.reached
    with walstore.open(path) as s:
        assert dict(s.scan()) == {"a": "A", "v": "V"}


LEADERS_NEXT_ROUND = (WriteAheadLog._lead.__code__,
                      _line_of(WriteAheadLog._lead, "rounds += 1"))


def test_nothing_is_written_after_the_log_failed_by_a_leaders_next_round(tmp_path):
    """A leader's first round (its fsync held) covers its own commit; two commits
    buffered behind it wait for its next round.  Between the rounds (the leader stopped
    there) the spare thread's fsync fails (EIO), which stops the log: nothing is to be
    written or synced again.  Before the fix the next round wrote the two buffered
    records all the same (seen: a WAL pwrite after the failure), then found the log
    failed and refused its fsync (both commits told CommitOutcomeUnknown, so nothing was
    acknowledged wrongly — but the log took writes after it had stopped, and the next
    open redid them).  Now the round writes nothing: the two are still told
    CommitOutcomeUnknown, and the next open finds neither (the losers' outcome)."""
    from test_audit65_writer import _spare_ready
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            wal, outcome = s._engine.wal, {}
            commit_recording_outcome(s, "first", 1, outcome)
            _spare_ready(wal)
            fb.sync_armed = True
            stops = Stops(LEADERS_NEXT_ROUND)
            lead = stops.start(lambda: commit_recording_outcome(s, "a", "A", outcome))
            assert fb.sync_entered.wait(20)
            behind = [_start(s, k, k.upper(), outcome) for k in ("b", "c")]
            _wait_for(lambda: len(wal._buffer) == 2 and len(wal._waiters) == 2,
                      "b and c did not wait behind the leader")
            fb.sync_release.set()
            assert stops.arrived[0].wait(20)  # round 1 done (a covered); b, c wait
            rule = fb.fail("fsync", errno.EIO, path="spare.tmp")
            with wal._spare_lock:
                wal.spare.discard()
            wal._want_spare()  # the spare thread makes one: its fsync fails
            _wait_for(lambda: wal.failed is not None, "the spare's fsync did not fail")
            failed_at = rule.failed_calls[0].seq
            stops.release[0].set()
            for t in [lead] + behind:
                t.join(20)
                assert not t.is_alive()
            assert outcome["first"] == "ok", outcome
            for k in ("a", "b", "c"):  # (a: its round synced it, the chained one failed)
                assert isinstance(outcome[k], walstore.CommitOutcomeUnknown), outcome
            written = fb.calls_to(("pwrite", "fdatasync", "fsync"), path="*.wal",
                                  after=failed_at)
            assert written == [], written
        finally:
            s._drop_like_a_crash()
    with walstore.open(path) as s:
        assert dict(s.scan()) == {"first": 1, "a": "A"}
