"""Audit 65: an adversarial second look at the WAL writer (walstore/log/writer.py,
walstore/log/segment.py) after audit 64's fixes of its group commit: the leader, its
waiters, a rotation, the spare thread, the flusher, close() and a checkpoint's trim,
driven into chosen interleavings (threads stopped at chosen lines) and failures (the
fault seam, tools/faults.py).

Found (each test's docstring says what was seen before the fix):
- a leader stalled for longer than LOST_LEAD_S between taking the lead and entering it
  (a GC pause, the GIL held by a long C call in another thread) was taken for a lost
  lead: a waiter led in its place, and when the stalled thread went on, both led at
  once — one's round fsynced and published the other's batch before it was written,
  and acknowledged a commit whose record that write then failed to write (lost after a
  reopen); ``synced_lsn`` stayed past the log's end, so the next commits written there
  were acknowledged with no fsync at all.
"""
from __future__ import annotations

import errno
import threading
import time

import walstore
from walstore.log import writer
from walstore.log.writer import WalWriteError, WriteAheadLog
from walstore.ops.verify import verify_store

from test_audit58_races import _line_of
from test_audit64_groupcommit import Stop
from test_perf63_groupcommit import HeldWrites, _start, _wait_for
from store_support import commit_recording_outcome
from tools.faults import installed

LEAD = WriteAheadLog._lead.__code__
AT_LEAD_ENTRY = _line_of(WriteAheadLog._lead, "rounds = 0")


def test_acknowledged_commits_are_durable_when_a_stalled_leader_goes_on(tmp_path,
                                                                       monkeypatch):
    """A thread took the lead and stalled before entering it (stopped here at
    ``_lead``'s first line, longer than LOST_LEAD_S).  A waiter took the lead as lost and
    wrote the buffer (its write held here, the place reserved); the stalled thread then
    went on and led too: its round fsynced up to the end, reserved bytes included,
    published them and woke the other buffered commit — acknowledged before its record
    was written.  That write failed: the acknowledged commit was voided (seen: "c"
    returned, its record never written; "b" CommitOutcomeUnknown, the void of a
    published event failing MemTable.void_from's assertion; ``synced_lsn`` 189 past the
    log's end, 63: every later commit written below it would return unsynced)."""
    monkeypatch.setattr(writer, "LOST_LEAD_S", 0.05)
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            wal = s._engine.wal
            outcome: dict = {}
            stop = Stop(LEAD, AT_LEAD_ENTRY)
            stop.armed.set()
            a = stop.start(lambda: commit_recording_outcome(s, "a", "A", outcome))
            assert stop.arrived.wait(20)  # "a" written, its lead taken, not entered
            fb.write_armed = True
            others = [_start(s, k, k.upper(), outcome) for k in ("b", "c")]
            _wait_for(lambda: fb.write_entered.is_set() or len(outcome) == 2,
                      "no waiter took over the lead")
            stop.release.set()  # the stalled thread goes on
            time.sleep(0.3)
            if fb.write_entered.is_set():  # (the batch of "b" and "c" held in its write)
                rule = fb.fail("pwrite", errno.EIO, path="*.wal")
                fb.write_release.set()
            for t in [a] + others:
                t.join(20)
                assert not t.is_alive(), outcome
            assert wal.synced_lsn <= wal.written_lsn, (wal.synced_lsn, wal.written_lsn, outcome)
            acked = sorted(k for k, v in outcome.items() if v == "ok")
            for k, v in outcome.items():
                assert v == "ok" or isinstance(v, WalWriteError), outcome
            assert "a" in acked
            # the next commit is made durable by an fsync of its own before it returns
            before = fb.now()
            with s.transaction() as tx:
                tx.put("d", "D")
            assert fb.calls_to("fdatasync", path="*.wal", after=before), "no fsync"
            assert rule.fired == 1
        finally:
            s._drop_like_a_crash()
    with walstore.open(path) as s:
        for k in acked + ["d"]:
            assert s.get(k) == k.upper(), (k, outcome)
    rep = verify_store(path)
    assert rep.ok, rep.errors
