"""Audit 64: the group commit as stop 63 rewrote it (walstore/log/writer.py).
"""
from __future__ import annotations

import errno
import sys
import threading
import time

import walstore
from walstore.log import writer
from walstore.log.writer import WalWriteError, WriteAheadLog

from test_audit58_races import _line_of
from test_perf63_groupcommit import HeldWrites, _batch_in_flight, _start, _wait_for
from store_support import commit_recording_outcome
from tools.faults import installed

class Stop:
    """Stops the thread it starts once at (code, line) after ``armed`` is set, until
    ``release`` is."""

    def __init__(self, code, line: int) -> None:
        self.code, self.line = code, line
        self.armed, self.arrived, self.release = (threading.Event(), threading.Event(),
                                                  threading.Event())

    def _local(self, frame, event, arg):
        if (event == "line" and frame.f_lineno == self.line and self.armed.is_set()
                and not self.arrived.is_set()):
            self.arrived.set()
            self.release.wait(20)
        return self._local

    def _trace(self, frame, event, arg):
        return self._local if frame.f_code is self.code else None

    def start(self, fn) -> threading.Thread:
        def body():
            sys.settrace(self._trace)
            try:
                fn()
            finally:
                sys.settrace(None)
        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t


SYNC_TO = WriteAheadLog._sync_to.__code__
AT_POSITIONS = _line_of(WriteAheadLog._sync_to, "if done:",  # (past both reads)
                        "if self.synced_lsn >= lsn or lsn > self.written_lsn:")


def test_acknowledged_commits_are_committed_a_waiter_racing_the_void_of_its_record(
        tmp_path, monkeypatch):
    """A waiter going through the mutex round (here: its timed wait for a slow round ran
    out) read its ticket (not voided yet), then the end of the log: the leader's failed
    batch write voided its record in between and moved the end back before it, and the
    waiter took "beyond the end" for "what it waited for was voided" — ``commit()``
    returned for a record that was never written (seen: outcome "ok", key absent)."""
    monkeypatch.setattr(writer, "LOST_LEAD_S", 0.05)
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            wal = s._engine.wal
            outcome: dict = {}
            fb.sync_armed = True
            lead = _start(s, "lead", "L", outcome)
            assert fb.sync_entered.wait(20)
            stop = Stop(SYNC_TO, AT_POSITIONS)
            j1 = stop.start(lambda: commit_recording_outcome(s, "j1", "J1", outcome))
            _wait_for(lambda: len(wal._buffer) == 1 and len(wal._waiters) == 1,
                      "j1 did not wait behind the leader")
            fb.write_armed = True
            fb.sync_release.set()  # round 2 writes j1 outside the lock: held there
            assert fb.write_entered.wait(20)
            stop.armed.set()  # j1's next mutex round (its timed wait runs out) stops ...
            assert stop.arrived.wait(20)  # ... past its ticket's test
            rule = fb.fail("pwrite", errno.EIO, path="*.wal")
            fb.write_release.set()  # the write fails: j1's record voided, the end back
            _wait_for(lambda: wal.voided_records == 1, "j1's record was not voided")
            stop.release.set()
            j1.join(20)
            lead.join(20)
            assert rule.fired == 1
            assert outcome["lead"] == "ok"
            assert isinstance(outcome["j1"], WalWriteError), outcome
            assert s.get("j1") is None
        finally:
            s.close()
    with walstore.open(path) as s:
        assert s.get("lead") == "L" and s.get("j1") is None
