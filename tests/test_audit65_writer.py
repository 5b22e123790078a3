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
  were acknowledged with no fsync at all;
- a rotation cut short after the old segment's SEAL was written, before the switch to
  the new segment (a MemoryError out of the SEAL's fsync; Ctrl-C in a purge's rotation,
  which ran outside any signal section): the old segment went on taking the appends
  behind its SEAL, the next commit was acknowledged there, and the next open refused the
  store (a gap);
- a rotation waiting for the spare being made (``_await_spare``) went on after the
  spare's fsync failed meanwhile and stopped the log: it made the segment inline, wrote
  the SEAL, fsynced the old segment and switched, and the commit's record was written
  after the failure (the commit told CommitOutcomeUnknown, not refused).

Driven and found right (tests below): a rotation failing at each of its steps, with the
spare and preallocating inline (open, header write, fdatasync, rename, directory fsync,
the new segment's open and its withdrawal, the SEAL's write, the old segment's fsync);
a spare refused for room (the rotation preallocates inline); the "normal" flusher's
failed fsync.
"""
from __future__ import annotations

import contextlib
import errno
import sys
import threading
import time

import pytest

import walstore
from walstore import signals
from walstore.log import writer
from walstore.log.segment import SegmentWriter
from walstore.log.writer import WalWriteError, WriteAheadLog
from walstore.ops.verify import verify_store

from test_audit58_races import _line_of
from test_audit64_groupcommit import Stop
from test_perf63_groupcommit import HeldWrites, _start, _wait_for
from store_support import commit_recording_outcome
from tools.faults import FaultBackend, installed

@contextlib.contextmanager
def _held_store(path: str, crash: bool = False):
    """A durable store whose WAL writes and fsyncs a test can hold (HeldWrites): yields
    (store, backend, its WAL, an outcome dict for commit_recording_outcome); closed after,
    or dropped as a killed process would drop it (``crash``)."""
    fb = HeldWrites()
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            yield s, fb, s._engine.wal, {}
        finally:
            s._drop_like_a_crash() if crash else s.close()


def _reopened_holds_exactly(path: str, acked: dict) -> None:
    """Reopened (recovered), the store holds exactly the acknowledged commits, and
    ``verify`` finds nothing wrong."""
    with walstore.open(path) as s:
        assert dict(s.scan()) == acked
    rep = verify_store(path)
    assert rep.ok, rep.errors


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
    with _held_store(path, crash=True) as (s, fb, wal, outcome):
        stop = Stop(LEAD, AT_LEAD_ENTRY)
        stop.armed.set()
        a = stop.start(lambda: commit_recording_outcome(s, "a", "A", outcome))
        assert stop.arrived.wait(20)  # "a" written, its lead taken, not entered
        fb.write_armed = True
        others = [_start(s, k, k.upper(), outcome) for k in ("b", "c")]
        # a waiter takes the lead as lost; its write of "b" and "c" is held
        assert fb.write_entered.wait(20), "no waiter took over the lead"
        stop.release.set()  # the stalled thread goes on
        time.sleep(0.3)
        rule = fb.fail("pwrite", errno.EIO, path="*.wal")
        fb.write_release.set()
        for t in [a] + others:
            t.join(20)
            assert not t.is_alive(), outcome
        assert wal.synced_lsn <= wal.written_lsn, (wal.synced_lsn, wal.written_lsn,
                                                   outcome)
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
    with walstore.open(path) as s:
        for k in acked + ["d"]:
            assert s.get(k) == k.upper(), (k, outcome)
    rep = verify_store(path)
    assert rep.ok, rep.errors


# ---- a rotation failing at each of its steps -----------------------------------------------
def _fill_until_room_below(s, room: int) -> list:
    """Commit 1 KiB values until the active segment has less than ``room`` bytes left;
    returns their keys."""
    wal, keys = s._engine.wal, []
    while wal.writer.room() >= room:
        keys.append(f"f{len(keys)}")
        with s.transaction() as tx:
            tx.put(keys[-1], "v" * 1024)
    return keys


def _spare_ready(wal) -> None:
    wal.request_spare()  # (made once half a segment is written, else)
    _wait_for(lambda: not wal._spare_wanted and wal.spare.size >= wal.next_segment_size(),
              "no spare was made")


@contextlib.contextmanager
def _small_segments_store(path: str, fb: FaultBackend):
    """A durable store of 64 KiB segments under the fault backend ``fb``: yields (store,
    its WAL); dropped after as a killed process would drop it."""
    with installed(fb):
        s = walstore.open(path, durability="full", segment_size=64 * 1024)
        try:
            yield s, s._engine.wal
        finally:
            s._drop_like_a_crash()


def _near_a_rotation(s) -> dict:
    """Fills the active segment until a 6,000-byte value no longer fits and waits for the
    spare: the next such commit rotates.  Returns the acknowledged commits."""
    acked = dict.fromkeys(_fill_until_room_below(s, 6000), "v" * 1024)
    _spare_ready(s._engine.wal)
    return acked


# (op, path pattern, errno, partial, whether a spare is ready, what the commit gets)
ROTATION_FAULTS = {
    "spare-open": ("open", "spare.tmp", errno.EMFILE, None, True, WalWriteError),
    "spare-header": ("pwrite", "spare.tmp", errno.EIO, None, True, WalWriteError),
    "spare-datasync": ("fdatasync", "spare.tmp", errno.EIO, None, True, "failed"),
    "spare-rename": ("rename", "spare.tmp", errno.EIO, None, True, WalWriteError),
    "spare-dir-sync": ("fsync_dir", "*wal", errno.EIO, None, True, "failed"),
    "new-open": ("open", "*.wal", errno.EMFILE, None, True, WalWriteError),
    "seal-write": ("pwrite", "*.wal", errno.EIO, 10, True, None),
    "old-sync": ("fdatasync", "*.wal", errno.EIO, None, True, "failed"),
    "inline-open": ("open", "*.wal.tmp", errno.EMFILE, None, False, WalWriteError),
    "inline-fill": ("pwrite", "*.wal.tmp", errno.ENOSPC, 100, False, WalWriteError),
    "inline-sync": ("fsync", "*.wal.tmp", errno.EIO, None, False, "failed"),
    "inline-rename": ("rename", "*.wal.tmp", errno.EIO, None, False, WalWriteError),
    "inline-dir-sync": ("fsync_dir", "*wal", errno.EIO, None, False, "failed"),
    "inline-new-open": ("open", "*.wal", errno.EMFILE, None, False, WalWriteError),
    # (the new segment's open fails, then the directory fsync of its withdrawal)
    "new-open-withdraw-sync": ("open", "*.wal", errno.EMFILE, None, True, "failed"),
}


@pytest.mark.parametrize("case", sorted(ROTATION_FAULTS))
def test_a_rotation_failing_at_any_step_loses_no_commit_and_leaves_an_openable_log(
        tmp_path, case):
    """A commit that needs a new segment, its rotation failing at one step (with the
    spare, or preallocating inline): the commit is told the truth (WalWriteError:
    nothing of it logged, the store goes on; LogFailed after a failed sync: read-only;
    a failed SEAL write: none, the rotation goes on unsealed), in one line; every commit
    that returned is there after a crash and a reopen, which accepts the log."""
    op, pattern, err, partial, spare, expected = ROTATION_FAULTS[case]
    path = str(tmp_path / "s")
    fb = FaultBackend()
    big = "b" * 6000
    with _small_segments_store(path, fb) as (s, wal):
        acked = _near_a_rotation(s)
        if not spare:
            with wal._spare_lock:
                wal.spare.discard()
        before = wal.rotations
        rule = fb.fail(op, err, path=pattern, partial=partial)
        if case == "new-open-withdraw-sync":
            fb.fail("fsync_dir", errno.EIO, path="*wal", nth=2)  # (the spare's first)
        try:
            with s.transaction() as tx:
                tx.put("big", big)
            outcome = None
            acked["big"] = big
        except Exception as e:  # noqa: BLE001 - sorted out below
            outcome = e
        assert rule.fired == 1, fb.calls[-20:]
        if expected is None:
            assert outcome is None and wal.rotations == before + 1, repr(outcome)
        elif expected == "failed":
            assert isinstance(outcome, walstore.ReadOnlyError), repr(outcome)
            assert wal.failed is not None and "big" not in s
            with pytest.raises(walstore.ReadOnlyError):
                with s.transaction() as tx:
                    tx.put("later", 1)
        else:
            assert isinstance(outcome, expected), repr(outcome)
            assert "\n" not in str(outcome) and wal.failed is None, str(outcome)
            assert wal.rotations == before and "big" not in s
            for k, v in (("after", 1), ("big2", big)):  # (the rotation, tried again)
                with s.transaction() as tx:
                    tx.put(k, v)
                acked[k] = v
            assert wal.rotations == before + 1
        if outcome is not None:
            assert "\n" not in str(outcome), str(outcome)
    _reopened_holds_exactly(path, acked)
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("reopened", 1)


# ---- an interrupt inside a rotation outside any commit (a purge's, in the main thread) -----
SYNC = SegmentWriter.sync.__code__
ROTATE = WriteAheadLog._rotate.__code__


def _interrupt_after_the_seals_sync(frame, event, arg):
    """A profile hook: KeyboardInterrupt at the first point a signal handler could run
    (a C call's return, outside a ``deferred()`` section) inside the rotation's fsync of
    the old segment after its SEAL (``writer``, the new segment's, is bound by then)."""
    if event != "c_return" or frame.f_code is not SYNC or signals._DEFERRED.depth:
        return
    rot = frame.f_back.f_back if frame.f_back is not None else None
    if rot is not None and rot.f_code is ROTATE and "writer" in rot.f_locals:
        sys.setprofile(None)
        raise KeyboardInterrupt("Ctrl-C during the purge's rotation")


@pytest.mark.parametrize("how", ["ctrl-c-in-a-purge", "memoryerror-in-a-commit"])
def test_acknowledged_commits_survive_an_interrupted_rotation(tmp_path, how):
    """A rotation cut short once the old segment's SEAL was written, before the new
    segment took the appends: Ctrl-C (KeyboardInterrupt, run by the main thread's
    handler right after a C call returns) inside a purge's rotation (``store.purge``
    rotates outside any commit's signal section), or a MemoryError out of the SEAL's
    fsync in a commit's rotation.  The program goes on committing: before the fix, the
    next commit was appended to the old segment behind its SEAL and acknowledged, and
    the next open refused the store (CorruptionError: "gap: segment starts at LSN 258
    but the previous one ends at 320")."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    with _small_segments_store(path, fb) as (s, wal):
        acked = dict.fromkeys(("p/1", "a"), 1)
        for k in acked:
            with s.transaction() as tx:
                tx.put(k, 1)
        if how == "ctrl-c-in-a-purge":
            sys.setprofile(_interrupt_after_the_seals_sync)
            try:
                s.purge("p/")  # (none now: no handler runs inside the rotation)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            del acked["p/1"]
        else:
            acked.update(_near_a_rotation(s))
            rule = fb.fail("fdatasync", path="*.wal", raises=MemoryError)
            with pytest.raises(MemoryError):
                with s.transaction() as tx:
                    tx.put("big", "b" * 6000)
            assert rule.fired == 1
        with s.transaction() as tx:
            tx.put("b", 2)
        acked["b"] = 2
        assert s.get("b") == 2
    _reopened_holds_exactly(path, acked)


# ---- the spare's fsync failing while a rotation waits for the spare ------------------------
class HeldSpareSync(FaultBackend):
    """The next fsync of the spare (once armed) waits for ``release``, then fails (EIO)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered, self.release = threading.Event(), threading.Event()
        self.failed_at = None

    def fsync(self, fd: int) -> None:
        if self.armed and (self.path_of(fd) or "").endswith("spare.tmp"):
            self.armed = False
            self.entered.set()
            self.release.wait(20)
            self.failed_at = self.now()
            raise OSError(errno.EIO, "injected EIO (the spare's fsync)")
        super().fsync(fd)


def test_nothing_is_written_after_the_log_failed_a_rotation_waiting_for_the_spare(tmp_path):
    """A rotation right after another waits for the spare being made (``_await_spare``,
    holding the log's locks); the spare's fsync fails meanwhile, which stops the log
    (never retry an fsync).  Before the fix the rotation went on all the same: it made
    the segment inline, wrote the SEAL, fsynced the old segment again and switched,
    and the commit's record was written after the failure (seen: a WAL open, pwrites,
    fsyncs and a rename after it; the commit told CommitOutcomeUnknown).  Now the
    rotation stops there: the commit is refused, nothing of it logged."""
    path = str(tmp_path / "s")
    fb = HeldSpareSync()
    with _small_segments_store(path, fb) as (s, wal):
        acked = _near_a_rotation(s)
        fb.armed = True
        with s.transaction() as tx:  # rotates: the next spare is made, its fsync held
            tx.put("big1", "b" * 6000)
        acked["big1"] = "b" * 6000
        assert fb.entered.wait(20)
        for i in range(100):  # (the new segment fills)
            if wal.writer.room() < 6000:
                break
            with s.transaction() as tx:
                tx.put(f"g{i}", "v" * 1024)
            acked[f"g{i}"] = "v" * 1024
        outcome: dict = {}
        t = _start(s, "big2", "b" * 6000, outcome)  # rotates: waits for the spare
        time.sleep(0.2)
        assert t.is_alive() and wal._spare_wanted
        fb.release.set()
        t.join(20)
        assert not t.is_alive()
        assert wal.failed is not None
        assert isinstance(outcome["big2"], walstore.ReadOnlyError), outcome
        assert not isinstance(outcome["big2"], walstore.CommitOutcomeUnknown), outcome
        after = [c for c in fb.calls_to(("open", "pwrite", "fsync", "fdatasync",
                                         "fsync_dir", "rename"), after=fb.failed_at)
                 if c.path and "/wal" in c.path and not c.path.endswith("spare.tmp")]
        assert after == [], after
    _reopened_holds_exactly(path, acked)


# ---- no room for a spare: the rotation preallocates inline, and says so ------------------
def test_a_store_refused_a_spare_for_room_still_rotates_inline(mount_tmpfs):
    """A nearly full disk: the spare thread makes no spare (NoRoomForSpare: it would
    leave less than a segment's size free).  The log still rotates (the segment is
    preallocated inline, counted in ``wal_inline_preallocations``), every commit stands
    after a reopen, and nothing is reported as an error."""
    from test_spare_headroom import fill_to
    mnt = mount_tmpfs("24m")
    path = str(mnt / "s")
    walstore.open(path).close()
    fill_to(mnt, 6 * 1024 * 1024)  # (with the last spare removed, a 4 MiB one would
    # leave 6 MiB: refused)
    s = walstore.open(path)
    try:
        wal = s._engine.wal
        _wait_for(lambda: not wal._spare_wanted, "the spare thread did not try")
        assert wal.spare.size == 0 and wal.spare_error is None
        n = 0
        while wal.rotations == 0:
            with s.transaction() as tx:
                tx.put(f"k{n}", "v" * 20000)
            n += 1
        st = s.stats()
        assert st["wal_rotations"] == 1 and st["wal_inline_preallocations"] == 1, st
        assert st["failure"] is None and st["background_errors"] == [], st
    finally:
        s.close()
    with walstore.open(path) as s:
        assert all(s.get(f"k{i}") == "v" * 20000 for i in range(n))


# ---- durability="normal": the flusher's fsync failing ---------------------------------------
def test_the_flushers_failed_fsync_stops_the_store_and_is_never_retried(tmp_path):
    """durability="normal": the background flusher's fdatasync fails (EIO).  The store
    stops writing at once (``stats()["failure"]``, the next commit refused with a
    walstore error in one line), no WAL fsync follows the failed one (not even at
    close), and every commit acknowledged before stands after a reopen (the writes were
    in the page cache: a kill -9 keeps them)."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    with installed(fb):
        s = walstore.open(path, durability="normal", sync_interval=0.02)
        try:
            for i in range(20):
                with s.transaction() as tx:
                    tx.put(f"k{i}", i)
            wal = s._engine.wal
            # (everything synced first: else the flusher's failing fsync could be the one
            # for "k19", before "last" commits — which then was refused; seen in CI)
            _wait_for(lambda: wal.synced_lsn >= wal.written_lsn, "the flusher caught up")
            rule = fb.fail("fdatasync", errno.EIO, path="*.wal")
            with s.transaction() as tx:
                tx.put("last", 1)
            _wait_for(lambda: wal.failed is not None, "the flusher did not sync")
            failed_at = rule.failed_calls[0].seq
            assert s.stats()["failure"] is not None
            with pytest.raises(walstore.ReadOnlyError) as e:
                with s.transaction() as tx:
                    tx.put("refused", 1)
            assert "\n" not in str(e.value)
        finally:
            s.close()
        syncs = [c for c in fb.calls_to(("fdatasync", "fsync"), path="*.wal")
                 if c.seq > failed_at]
        assert syncs == [], syncs
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") for i in range(20)] == list(range(20))
        assert s.get("last") == 1 and s.get("refused") is None


def test_a_spare_that_failed_for_an_io_error_is_said_in_stats(tmp_path):
    """The spare thread passed every OSError over in silence: an EIO making the spare
    left the rotations preallocating inline with nothing said anywhere.  It is now in
    ``stats()["background_errors"]`` ("WAL spare: ..."); a disk too full for a spare is
    not an error and is not said (tests/test_spare_headroom.py)."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    with installed(fb):
        with walstore.open(path, segment_size=64 * 1024) as s:
            wal = s._engine.wal
            wal.request_spare()
            _wait_for(lambda: wal.spare.size > 0 and not wal._spare_wanted, "a spare ready")
            # (the 1st write to spare.tmp from now is the ready spare's header, at its
            # activation; the 2nd fills the next spare: the thread's)
            rule = fb.fail("pwrite", errno.EIO, path="spare.tmp", nth=2)
            for i in range(200):
                with s.transaction() as tx:
                    tx.put(f"k{i}", "v" * 2000)
                if rule.fired:
                    break
            wal = s._engine.wal
            _wait_for(lambda: not wal._spare_wanted, "the spare thread's attempt")
            assert rule.fired == 1
            errors = s.stats()["background_errors"]
            assert any(e.startswith("WAL spare: OSError") and "Input/output error" in e
                       for e in errors), errors
            for i in range(200, 260):  # (the log goes on)
                with s.transaction() as tx:
                    tx.put(f"k{i}", "v" * 2000)
    with walstore.open(path) as s:
        assert s.get("k259") == "v" * 2000


def test_a_spare_removed_behind_the_stores_back_costs_no_commit(tmp_path):
    """``wal/spare.tmp`` deleted by hand (a clean-up of "*.tmp" files): the next rotation
    failed its commit with WalWriteError (ENOENT) — the commit after it went on.  Now the
    rotation makes its segment inline, as with no spare, and every commit stands."""
    import os
    path = str(tmp_path / "s")
    with walstore.open(path, segment_size=64 * 1024) as s:
        wal = s._engine.wal
        wal.request_spare()
        _wait_for(lambda: wal.spare.size > 0 and not wal._spare_wanted, "a spare ready")
        os.unlink(os.path.join(path, "wal", "spare.tmp"))
        start, inline = wal.rotations, wal.inline_preallocations
        i = 0
        while wal.rotations < start + 1:
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 2000)
            i += 1
            assert i < 500
        assert wal.inline_preallocations == inline + 1
    with walstore.open(path) as s:
        assert all(s.get(f"k{j}") == "v" * 2000 for j in range(i))


SYNC_TO = WriteAheadLog._sync_to.__code__
AT_WOKEN = _line_of(WriteAheadLog._sync_to, "if woken:")


def test_a_rotation_that_makes_waiters_durable_wakes_them(tmp_path, monkeypatch):
    """A leader handed the lead on (its chain of fsyncs at its limit) to the first
    waiter; a rotation then made that waiter's and the next one's records durable; the
    first returned (covered) without leading, and nothing woke the second: it sat until
    its timed wait ran out (LOST_LEAD_S, 1 s; here 10 s), its record durable all along.
    A rotation now wakes the waiters it covered (h2's note, audit 65)."""
    monkeypatch.setattr(writer, "CHAIN_FSYNCS", 0)
    monkeypatch.setattr(writer, "LOST_LEAD_S", 10.0)
    path = str(tmp_path / "s")
    with _held_store(path) as (s, fb, wal, outcome):
        fb.sync_armed = True
        a = _start(s, "a", "A", outcome)  # the leader: its fsync held
        assert fb.sync_entered.wait(20)
        stop = Stop(SYNC_TO, AT_WOKEN)
        b = stop.start(lambda: commit_recording_outcome(s, "b", "B", outcome))
        _wait_for(lambda: len(wal._waiters) == 1, "b waiting")
        c = _start(s, "c", "C", outcome)
        _wait_for(lambda: len(wal._waiters) == 2, "c waiting behind b")
        stop.armed.set()
        fb.sync_release.set()  # a's round covers a alone, hands the lead to b
        assert stop.arrived.wait(20)  # b woken to lead, not yet looking
        a.join(20)
        wal.rotate()  # writes b's and c's records, fsyncs them: durable
        t0 = time.monotonic()
        c.join(5)
        took = time.monotonic() - t0
        stop.release.set()
        b.join(20)
        assert outcome == {"a": "ok", "b": "ok", "c": "ok"}, outcome
        assert took < 2.0, f"c returned {took:.1f} s after its record was durable"
    with walstore.open(path) as s:
        assert [s.get(k) for k in "abc"] == ["A", "B", "C"]
