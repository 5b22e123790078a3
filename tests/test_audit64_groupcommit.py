"""Audit 64: the group commit as stop 63 rewrote it (walstore/log/writer.py).
"""
from __future__ import annotations

import errno
import sys
import threading
import time

import pytest

import walstore
from walstore.log import writer
from walstore.log.writer import WalWriteError, WriteAheadLog
from walstore.ops.verify import verify_store

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


class Charges:
    """Charged transactions held open before their commit (their intents durable, their
    bodies run), committed from their own threads on ``go``; refunds counted."""

    def __init__(self) -> None:
        self.refunds: dict = {}
        self.outcome: dict = {}

    def refund(self, action) -> None:
        k = action.args["k"]
        self.refunds[k] = self.refunds.get(k, 0) + 1

    def ready(self, s, key: str) -> threading.Event:
        tx = s.transaction()
        with tx.action("charge", args={"k": key}, compensate="refund") as act:
            act.result = {"charged": key}
        tx.put(key, key.upper())
        go = threading.Event()

        def commit():
            go.wait(20)
            try:
                tx.commit()
                self.outcome[key] = "ok"
            except BaseException as e:  # noqa: BLE001 - the test sorts them out
                self.outcome[key] = e
        threading.Thread(target=commit, daemon=True).start()
        return go


def test_a_voided_commit_is_compensated_once_and_logged_so(tmp_path):
    """A batch write failing past its first record, a commit buffered behind it: the two
    voided commits' compensations ran once each (at their rollback), the action log says
    "compensated" before and after a reopen, which runs none again; the whole record's
    commit and action stand."""
    path = str(tmp_path / "s")
    fb = HeldWrites()
    ch = Charges()
    with installed(fb):
        s = walstore.open(path, durability="full", compensators={"refund": ch.refund})
        try:
            wal = s._engine.wal
            gos = {k: ch.ready(s, k) for k in ("j1", "j2", "j3")}
            fb.sync_armed = True
            lead = _start(s, "lead", "L", ch.outcome)
            assert fb.sync_entered.wait(20)
            for i, key in enumerate(("j1", "j2")):
                gos[key].set()
                _wait_for(lambda: len(wal._buffer) == i + 1, "a commit was not buffered")
            fb.write_armed = True
            fb.sync_release.set()  # round 2 writes j1 and j2 outside the lock: held
            assert fb.write_entered.wait(20)
            first = len(wal._writing.buffer[0][0])
            gos["j3"].set()  # buffered behind the write in flight
            _wait_for(lambda: len(wal._buffer) == 1, "j3 was not buffered behind the write")
            rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal", partial=first + 10)
            fb.write_release.set()
            lead.join(20)
            _wait_for(lambda: len(ch.outcome) == 4, "a committer did not return")
            assert rule.fired == 1
            assert ch.outcome["lead"] == ch.outcome["j1"] == "ok", ch.outcome
            for k in ("j2", "j3"):
                assert isinstance(ch.outcome[k], WalWriteError), ch.outcome
                assert k not in s
            assert ch.refunds == {"j2": 1, "j3": 1}
            states = {a.args["k"]: a.state for a in s.actions()}
            assert states == {"j1": "committed", "j2": "compensated", "j3": "compensated"}
        finally:
            s.close()
    with walstore.open(path, compensators={"refund": ch.refund}) as s:
        assert (s.get("lead"), s.get("j1"), s.get("j2"), s.get("j3")) == ("L", "J1", None,
                                                                          None)
        states = {a.args["k"]: a.state for a in s.actions()}
        assert states == {"j1": "committed", "j2": "compensated", "j3": "compensated"}
        assert s.pending_compensations() == []
    assert ch.refunds == {"j2": 1, "j3": 1}
    rep = verify_store(path)
    assert rep.ok, rep.errors


@pytest.mark.parametrize("fails", [False, True], ids=["written", "failed"])
def test_a_rotation_waits_for_the_batch_in_flight(tmp_path, fails):
    """A commit whose record does not fit the segment arrives while the leader writes a
    batch outside the lock: it waits for that write (holding the lock), then rotates.
    Written: every commit stands, in both segments.  Failed: the batch's records are
    voided and the big commit, whose record was never appended, gets WalWriteError too
    (nothing committed: before the fix its message said only "could not write 2 buffered
    WAL record(s): Input/output error", not that nothing of it was logged); the store
    goes on and a reopen finds a sound log."""
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full", segment_size=64 * 1024)
        try:
            wal = s._engine.wal
            outcome: dict = {}
            threads = _batch_in_flight(s, fb, outcome)
            batch = wal._writing
            first_segment = wal.writer.start_lsn
            big = "x" * (wal.writer.room() + 100)  # (does not fit: a rotation)
            threads.append(_start(s, "big", big, outcome))
            time.sleep(0.2)
            assert threads[-1].is_alive() and wal._writing is batch  # waits for the write
            if fails:
                rule = fb.fail("pwrite", errno.EIO, path="*.wal")
            fb.write_release.set()
            for t in threads:
                t.join(20)
                assert not t.is_alive()
            assert outcome["lead"] == "ok"
            if fails:
                assert rule.fired == 1
                for k in ("j1", "j2", "big"):
                    assert isinstance(outcome[k], WalWriteError), outcome
                    assert "nothing of" in str(outcome[k]), str(outcome[k])
                    assert k not in s
                with s.transaction() as tx:
                    tx.put("after", 1)
            else:
                assert all(v == "ok" for v in outcome.values()), outcome
                assert wal.writer.start_lsn > first_segment and wal.rotations >= 1
        finally:
            s.close()
    with walstore.open(path) as s:
        if fails:
            assert (s.get("lead"), s.get("j1"), s.get("big"), s.get("after")) == ("L", None,
                                                                                 None, 1)
        else:
            assert (s.get("lead"), s.get("j1"), s.get("j2"), s.get("big")) == ("L", "J1",
                                                                               "J2", big)
    rep = verify_store(path)
    assert rep.ok, rep.errors


def test_no_commit_hangs_when_a_leaders_publication_raises(tmp_path):
    """The leader's publication of a round (``after_sync``) raised (a MemoryError) while
    waiters it had not covered were queued: before the fix the round ended as a chaining
    one (``_syncing`` and ``_in_lead`` kept, nobody woken) and the exception left the
    lead: no thread led again, the waiters looked for a lost lead every LOST_LEAD_S and
    found it "in the lead" — every commit of the process waited for ever."""
    path = str(tmp_path / "s")
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            wal = s._engine.wal
            publish = wal.after_sync
            armed = []

            def after_sync(done):
                if armed:
                    armed.pop()
                    raise MemoryError("injected")
                publish(done)
            wal.after_sync = after_sync
            outcome: dict = {}
            fb.sync_armed = True
            threads = [_start(s, "lead", "L", outcome)]
            assert fb.sync_entered.wait(20)
            for i, key in enumerate(("j1", "j2")):
                threads.append(_start(s, key, key.upper(), outcome))
                _wait_for(lambda: len(wal._waiters) == i + 1, "a commit did not wait")
            armed.append(True)
            fb.sync_release.set()
            for t in threads:
                t.join(10)
            assert not [t for t in threads if t.is_alive()], f"stranded: {outcome}"
            assert isinstance(outcome["lead"], walstore.CommitOutcomeUnknown), outcome
            assert outcome["j1"] == outcome["j2"] == "ok", outcome
            assert s.get("j1") == "J1" and s.get("j2") == "J2"  # published on return
            assert not wal._syncing and not wal._waiters
        finally:
            s._drop_like_a_crash()
    with walstore.open(path) as s:
        assert (s.get("lead"), s.get("j1"), s.get("j2")) == ("L", "J1", "J2")
