"""The wall clock misbehaving: stepped back (an NTP step, a VM restored from a snapshot),
jumped forward, or two processes disagreeing (audit 67).

A step is simulated by replacing the ``time`` module a walstore module reads with one whose
``time()``/``time_ns()`` are offset (``Stepped``): the machine's clock is never touched.
Real stores, real files, ``file://`` replicas.
"""
from __future__ import annotations

import datetime as dt
import time
import types

import walstore
from walstore.engine import engine as engine_mod
from walstore.replication import lease as lease_mod
from walstore.replication import shipper as shipper_mod


class Stepped(types.ModuleType):
    """The ``time`` module with the wall clock off by ``offset`` seconds (monotonic and
    everything else as they are)."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__("time")
        self.offset = offset

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.offset

    def time_ns(self) -> int:
        return time.time_ns() + int(self.offset * 1e9)


def _commit(s, key, value) -> walstore.TxnInfo:
    with s.transaction() as tx:
        tx.put(key, value)
    return s.log(limit=1)[0]


# ---- lag_seconds ----------------------------------------------------------------------
def test_lag_seconds_stays_the_age_of_the_unshipped_commit_across_a_clock_step(
        tmp_path, monkeypatch):
    """The clock stepped back an hour while a commit waited to be shipped: lag_seconds
    went to about -3600 s (counted as wall time now minus the commit's stamp); stepped
    forward an hour, +3600 s for a commit a second old.  The age is counted on the
    monotonic clock from the moment the lag was first seen."""
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 30})
    try:
        assert s.replication().lag_bytes == 0  # (the first round ran at open)
        _commit(s, "a", 1)
        time.sleep(0.5)
        before = s.replication()
        assert before.lag_bytes > 0 and 0.3 <= before.lag_seconds <= 5, before
        for offset in (-3600.0, 3600.0):
            monkeypatch.setattr(shipper_mod, "time", Stepped(offset))
            st = s.replication()
            assert st.lag_bytes > 0, st
            assert before.lag_seconds <= st.lag_seconds <= before.lag_seconds + 5, \
                (offset, st.lag_seconds)
        monkeypatch.setattr(shipper_mod, "time", time)
        s.sync_replica(timeout=10)
        assert s.replication().lag_seconds == 0.0
    finally:
        s.close()


# ---- restore to a time ----------------------------------------------------------------
def test_restore_to_a_time_holds_no_commit_stamped_after_it_when_the_clock_stepped_back(
        tmp_path, monkeypatch):
    """Commits a, b, c shipped in one WAL object, then the clock stepped back an hour and
    d, e shipped in the next.  A restore to a time between b and c restored a..e: the cut
    was sought in the last WAL object whose first commit is at or before the time (the
    second one, its stamps an hour early), so c, stamped after the time, was in the copy.
    The cut is a prefix of the log that ends before the first record stamped later."""
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 30})
    try:
        _commit(s, "a", 1)
        b = _commit(s, "b", 2)
        time.sleep(0.01)
        _commit(s, "c", 3)
        s.sync_replica(timeout=10)
        monkeypatch.setattr(engine_mod, "time", Stepped(-3600.0))
        _commit(s, "d", 4)
        _commit(s, "e", 5)
        s.sync_replica(timeout=10)
    finally:
        s.close()
    to = dt.datetime.fromtimestamp(b.timestamp, dt.timezone.utc) + dt.timedelta(
        microseconds=1)
    dest = str(tmp_path / "dest")
    walstore.restore(rep, dest, to=to)
    with walstore.open(dest) as r:
        assert dict(r.scan()) == {"a": 1, "b": 2}
