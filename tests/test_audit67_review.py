"""Review of audit 67's clock and integration changes (helper h5): walstore.clock's
deleting_now, restore to a time's stamps-going-back refusal, the shipper's lag.

* A laptop's (a guest's) suspend: ``time.monotonic`` does not count it on Linux, the wall
  clock does — deleting_now read the resume as a forward jump and held retention an hour
  behind (history kept the suspend's length past ``retain_seconds``).  CLOCK_BOOTTIME now.
* A child forked while a thread of the parent was inside deleting_now inherited its lock
  held: the child's first retention hung for good.
* deleting_now stayed anchored to its reading at import: a process begun while the clock
  ran a day ahead followed the same jump again at once once the clock was set right; and
  the correction of a step back was followed at once, so a commit made during the step
  (stamped an hour early) was trimmed a moment old.  The anchor now follows a step back.
* The shipper's lag_seconds, counted on ``time.monotonic``, left out a suspend the
  unshipped commit waited through (two hours of sleep: a lag of a second).
* CommitOutcomeUnknown of a restore point whose fsync failed named transaction -1.

Found right: retention by age with a correct clock; deleting_now under many threads and a
flipping clock; restore to a time of a busy log with no clock step (never refused, exact).

Real stores, real files, ``file://`` replicas; a clock step is simulated process-wide as
test_audit67_clock does it (``time.time`` replaced), a suspend likewise with the boot
clock moved as far.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time

import pytest

import walstore
from walstore import clock

from store_support import run_beside
from test_audit67_clock import _REAL_TIME, _commit, _shipping_store, _step_everywhere


def _suspend(monkeypatch, seconds: float) -> None:
    """The machine slept ``seconds``: the wall clock and the boot clock (CLOCK_BOOTTIME)
    moved on that far, ``time.monotonic`` did not (Linux)."""
    _step_everywhere(monkeypatch, seconds)
    real = time.clock_gettime

    def gettime(clk):
        return real(clk) + (seconds if clk == time.CLOCK_BOOTTIME else 0.0)
    monkeypatch.setattr(time, "clock_gettime", gettime)


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="no CLOCK_BOOTTIME here")
def test_retention_by_age_trims_after_a_suspend_as_a_correct_clock_says(
        tmp_path, monkeypatch):
    """``retain_seconds`` an hour; the machine slept two hours (the wall clock right, not
    jumped): deleting_now said two hours earlier than the clock for the next hour (the
    monotonic clock does not count a suspend), and a checkpoint kept the commits made two
    hours before — history held past retain_seconds.  A suspend is no jump."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_seconds=3600) as s:
        old = [_commit(s, "k", i) for i in range(3)]
        _suspend(monkeypatch, 7200.0)
        assert abs(clock.deleting_now() - time.time()) < 5
        _commit(s, "k", 3)
        s.checkpoint()
        with pytest.raises(walstore.HistoryTrimmed):
            s.at(old[0].txid)


def test_retention_by_age_still_trims_with_a_correct_clock(tmp_path):
    """(Found right.)  With the clock right, a commit older than ``retain_seconds`` is
    trimmed at the next checkpoint: the deleting clock is no brake on a correct clock."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_seconds=0.5) as s:
        old = _commit(s, "k", 0)
        time.sleep(1.0)
        _commit(s, "k", 1)
        s.checkpoint()
        with pytest.raises(walstore.HistoryTrimmed):
            s.at(old.txid)
        assert abs(clock.deleting_now() - time.time()) < 1


def test_a_child_forked_while_a_thread_reads_the_deleting_clock_does_not_hang():
    """A thread of the parent inside deleting_now (its lock held) as another forks (a
    shipper's retention round while the application starts a worker): the child's copy of
    the lock stayed held, and its first retention — a checkpoint with retain_seconds, a
    shipper's round — hung for good."""
    clock._lock.acquire()  # (the other thread, inside deleting_now)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                clock.deleting_now()
            finally:
                os._exit(0)
    finally:
        clock._lock.release()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in deleting_now")


def test_history_made_while_the_clock_ran_behind_is_kept_after_it_is_set_right(
        tmp_path, monkeypatch):
    """``retain_seconds`` 1; a commit a second old; the clock stepped back an hour (a bad
    NTP source), a commit was made and a checkpoint ran, then the clock was set right and
    a checkpoint ran again: the commit made during the step, a moment old, was trimmed at
    once (stamped an hour early, it looked an hour old: ``at`` raised HistoryTrimmed).
    The deleting clock now counts from the step back it saw: the forward correction is
    followed once it has held an hour, as any forward jump."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_seconds=1) as s:
        _commit(s, "k", 0)
        time.sleep(1.1)
        behind = _step_everywhere(monkeypatch, -3600.0)
        during = _commit(s, "k", 1)
        s.checkpoint()
        behind[0] = 0.0
        _commit(s, "k", 2)
        s.checkpoint()
        assert s.at(during.txid).get("k") == 1


def test_a_process_begun_while_the_clock_ran_ahead_follows_no_second_jump_at_once(
        tmp_path, monkeypatch):
    """The process began (walstore imported) while the clock ran a day ahead; it was set
    right, then jumped a day ahead again for a moment, and a checkpoint ran: the whole
    ``retain_seconds`` history was trimmed — the deleting clock stayed anchored to the
    reading at import, so the same jump counted as no jump."""
    ahead = _step_everywhere(monkeypatch, 86400.0)
    monkeypatch.setattr(clock, "_anchor", (time.time(), clock.elapsed()))  # (the import)
    with walstore.open(str(tmp_path / "s"), durability="none", retain_seconds=3600) as s:
        ahead[0] = 0.0
        first = _commit(s, "k", 0)
        s.checkpoint()
        ahead[0] = 86400.0
        _commit(s, "k", 1)
        s.checkpoint()
        ahead[0] = 0.0
        assert s.at(first.txid).get("k") == 0


def test_a_restore_to_a_time_of_a_busy_normal_log_is_never_refused_and_exact(
        tmp_path, monkeypatch):
    """(Found right.)  The stamps-going-back refusal on a log no clock step touched:
    three threads committing (every fifth commit a large one, its writes in WRITES chunks
    ahead of its COMMIT), a fourth making restore points (stamped outside the journal
    lock, so a point's stamp can be earlier than a commit logged before it).  A restore to
    the time of a spread of commits — their own stamps as datetimes, and a microsecond
    before the next commit's — is never refused and holds exactly the source's state at
    the last commit stamped at or before that time."""
    from walstore.engine import journal
    monkeypatch.setattr(journal, "CHUNK_BYTES", 512)
    url = f"file://{tmp_path}/rep"
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    stop = threading.Event()
    try:
        def writer(n: int) -> None:
            for i in range(15):
                with s.transaction() as tx:
                    tx.put(f"t{n}", i)
                    if i % 5 == 4:
                        for j in range(6):
                            tx.put(f"big{n}/{j}", "x" * 300)

        def points() -> None:
            k = 0
            while not stop.is_set():
                s.restore_point(f"p{k}")
                k += 1
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        run_beside(threads, threading.Thread(target=points), stop)
        log = list(reversed(s.log()))  # (oldest first)
        s.sync_replica(timeout=30)
        states = {t.txid: dict(s.at(t.txid).scan()) for t in log}
    finally:
        s.close()
    assert [t.timestamp for t in log] == sorted(t.timestamp for t in log)
    from walstore.replication.restore import _micros as micros  # (exact, as the cut)
    picks = log[::6] + [log[-1]]
    for k, c in enumerate(picks):
        own = dt.datetime.fromtimestamp(c.timestamp, dt.timezone.utc)
        for m, when in enumerate((own, own + dt.timedelta(microseconds=1))):
            last = [t for t in log if micros(dt.datetime.fromtimestamp(
                t.timestamp, dt.timezone.utc)) <= micros(when)][-1]
            d = str(tmp_path / f"d{k}-{m}")
            walstore.restore(url, d, to=when)
            with walstore.open(d) as r:
                assert dict(r.scan()) == states[last.txid], (c.txid, when)
                assert r.log(limit=1)[0].txid == last.txid


@pytest.mark.parametrize("what", ["restore_point", "drop_restore_point"])
def test_an_unknown_restore_point_outcome_names_no_transaction(tmp_path, what):
    """A restore point (or its drop) whose record's fsync failed raises
    CommitOutcomeUnknown, whose ``txid`` "names the transaction": it said -1, a txid no
    transaction has (a handler looking it up in ``store.log`` after the reopen looked for
    transaction -1).  A restore point is no transaction: None."""
    import errno
    from tools.faults import FaultBackend, installed
    path = str(tmp_path / "s")
    s = walstore.open(path)
    _commit(s, "k", 0)
    s.restore_point("p1")
    fb = FaultBackend()
    fb.fail("fdatasync", errno.EIO, path="*.wal")
    with installed(fb), pytest.raises(walstore.CommitOutcomeUnknown,
                                      match="restore point") as raised:
        s.restore_point("p2") if what == "restore_point" else s.drop_restore_point("p1")
    assert raised.value.txid is None
    s._drop_like_a_crash()


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="no CLOCK_BOOTTIME here")
def test_lag_seconds_counts_a_suspend_the_unshipped_commit_waited_through(
        tmp_path, monkeypatch):
    """A commit waited to be shipped, its lag read once; the machine slept two hours (the
    wall clock right): lag_seconds still said a second — counted on ``time.monotonic``,
    which does not count a suspend on Linux — for a commit unreplicated for two hours (an
    alert on the lag stayed quiet).  The lag is counted on the elapsed-time clock."""
    with _shipping_store(tmp_path) as s:
        _commit(s, "a", 1)
        time.sleep(0.2)
        before = s.replication()
        assert before.lag_bytes > 0 and before.lag_seconds < 5, before
        _suspend(monkeypatch, 7200.0)
        st = s.replication()
        assert 7200 <= st.lag_seconds <= 7200 + before.lag_seconds + 5, st


def test_the_deleting_clock_never_follows_a_passing_jump_under_many_threads(monkeypatch):
    """(Found right.)  Four threads read deleting_now while the clock flips between right,
    a day ahead and an hour behind: no reading is ever ahead of the real clock (a
    jump held for less than TRUST_AFTER is never followed), and none fails."""
    box = _step_everywhere(monkeypatch, 0.0)
    worst, errors, calls, stop = [0.0], [], [0], threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                got = clock.deleting_now() - _REAL_TIME()
                worst[0] = max(worst[0], got)
                calls[0] += 1
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(e)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        for offset in (86400.0, 0.0, -3600.0, 0.0):
            box[0] = offset
            time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and calls[0] > 1000
    assert worst[0] <= clock._SLACK + 0.1
