"""Views of one named thing read that thing's unapplied events, not every event the
MemTable holds (costs counted in events passed over, never timed):

- ``Views.decision(gid)`` (asked by every ``tx.prepare``, under the journal lock, to
  refuse a gid used before; by ``store.decision``, ``resolve_atomic``) passed over every
  unapplied event: a loop of 20,000 two-phase transactions (the ``transaction`` package's
  vote prepares each one) took 54 s, each prepare paying for all the backlog before it,
  where it takes ~3 s now (``MemTable.decided``: gid -> its decisions here);
- ``Views.point(name)`` (``drop_restore_point``, resolving a point) and ``points()`` did
  the same (``MemTable.points``: name -> its RESTORE_POINT events here).
"""
from __future__ import annotations

import pytest

import walstore
from walstore.engine.memtable import MemTable

# the applier waits (the backlog stays in the MemTable) unless a drain or checkpoint asks
IDLE = dict(durability="none", apply_batch=10 ** 6, apply_interval=86400.0,
            max_unapplied=10 ** 6)


@pytest.fixture
def passed(monkeypatch):
    """Events passed over by ``MemTable.events_of`` (each call passes over them all)."""
    n = [0]
    real = MemTable.events_of

    def counted(self, types, upto=None):
        n[0] += len(self.events)
        return real(self, types, upto)
    monkeypatch.setattr(MemTable, "events_of", counted)
    return n


def _backlog(store, n: int) -> None:
    for i in range(n):
        with store.transaction() as tx:
            tx.put(f"other/{i}", i)


def test_two_phase_commits_beside_a_backlog_do_not_pass_over_it(tmp_path, passed):
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        _backlog(s, 3000)
        passed[0] = 0
        held = []
        for i in range(200):
            tx = s.transaction()
            tx.put(f"z/{i}", i)
            tx.prepare(f"g{i}")
            if i % 2:
                s.commit_prepared(f"g{i}")
            else:
                held.append(f"g{i}")
        assert s.decision("g0") == "prepared" and s.decision("g1") == "commit"
        assert len(s._engine.memtable) >= 3000  # (the backlog was there to pass over)
        assert passed[0] < 10 * 3000, passed[0]  # (before: ~630,000)
        for gid in held:  # (a rollback drains first: its file effects are read from LMDB)
            s.rollback_prepared(gid)
        # the decisions read as before, unapplied and applied
        for i in range(200):
            assert s.decision(f"g{i}") == ("commit" if i % 2 else "abort")
        assert s.decision("never") is None
        with pytest.raises(walstore.WalstoreError, match="already used"):
            s.transaction().prepare("g7")
        s.checkpoint()  # (applied: from LMDB's rows now, the MemTable's index emptied)
        assert not s._engine.memtable.decided
        assert [s.decision(f"g{i}") for i in (0, 1)] == ["abort", "commit"]
        with pytest.raises(walstore.WalstoreError, match="already used"):
            s.transaction().prepare("g8")
        assert s.get("z/1") == 1 and s.get("z/0") is None
    finally:
        s.close()


def test_restore_point_lookups_beside_a_backlog_do_not_pass_over_it(tmp_path, passed):
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        for i in range(200):
            with s.transaction() as tx:
                tx.put("x", i)
            s.restore_point(f"turn-{i}")
        _backlog(s, 3000)
        passed[0] = 0
        for i in range(0, 200, 2):
            s.drop_restore_point(f"turn-{i}")
        s.restore_point("turn-0")  # (again, after its drop: the newest event decides)
        points = s.restore_points()
        assert len(s._engine.memtable) >= 3000
        assert passed[0] < 10 * 3000, passed[0]  # (before: ~350,000)
        assert sorted(points) == sorted(["turn-0"] + [f"turn-{i}" for i in range(1, 200, 2)])
        with pytest.raises(walstore.UnknownPoint):
            s.drop_restore_point("turn-2")
        s.checkpoint()
        assert not s._engine.memtable.points
        assert s.restore_points() == points
        assert s.at("turn-151").get("x") == 151
        assert s.at("turn-0").get("x") == 199
        with pytest.raises(walstore.UnknownPoint):
            s.at("turn-150")
    finally:
        s.close()


def test_the_indexes_leave_with_their_events_applied_or_voided():
    """``decided`` and ``points`` are entered and left with the events (the applier's
    ``drop_applied``, a failed write's ``void_from``), as ``by_action`` and ``ends``."""
    from walstore.log.format import RecordType as T
    from walstore.log.records import Event
    mt = MemTable()
    evs = [Event(10, 20, T.RESTORE_POINT, 0, {"name": "p", "ts": 0.0}),
           Event(20, 30, T.COMMIT, 1, {"tx": 1, "gid": "g"}, writes=()),
           Event(30, 40, T.ROLLBACK_PREPARED, 2, {"tx": 2, "gid": "h"}),
           Event(40, 50, T.RESTORE_POINT, 0, {"name": "p", "drop": True, "ts": 0.0}),
           Event(50, 60, T.COMMIT, 3, {"tx": 3, "gid": "g"}, writes=())]
    for e in evs:
        mt.add(e)
    assert [e.lsn for e in mt.points["p"]] == [10, 40]
    assert [e.lsn for e in mt.decided["g"]] == [20, 50] and [e.lsn for e in mt.decided["h"]] == [30]
    mt.void_from(40)
    assert [e.lsn for e in mt.points["p"]] == [10] and [e.lsn for e in mt.decided["g"]] == [20]
    mt.publish(40)
    mt.drop_applied(evs[:2])
    assert "p" not in mt.points and "g" not in mt.decided and "h" in mt.decided
    mt.drop_applied(evs[2:3])
    assert not mt.points and not mt.decided and not mt.events
