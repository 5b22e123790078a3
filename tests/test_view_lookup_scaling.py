"""Views of one named thing read that thing's unapplied events, not every event the
MemTable holds (costs counted in events passed over, never timed):

- ``Views.decision(gid)`` (asked by every ``tx.prepare``, under the journal lock, to
  refuse a gid used before; by ``store.decision``, ``resolve_atomic``) passed over every
  unapplied event: a loop of 20,000 two-phase transactions (the ``transaction`` package's
  vote prepares each one) took 54 s, each prepare paying for all the backlog before it,
  where it takes ~3 s now (``MemTable.decided``: gid -> its decisions here);
- ``Views.point(name)`` (``drop_restore_point``, resolving a point) and ``points()`` did
  the same (``MemTable.points``: name -> its RESTORE_POINT events here);
- every commit beside prepared (in-doubt) transactions rebuilt each one's written-key set
  and compared its reads with it: one in-doubt bulk load of 40,000 keys made each other
  commit cost 30 ms (``PreparedSet`` indexes what they hold now);
- a cascade's plan mapped every unapplied event to its txid once per key with unapplied
  versions (``History.unapplied_versions``): K keys beside writers of them, K times the
  backlog (``MemTable.txids_at`` bisects per version now).
"""
from __future__ import annotations

import pytest

import walstore
from walstore.codec import encode_key
from walstore.engine.memtable import MemTable

# the applier waits (the backlog stays in the MemTable) unless a drain or checkpoint asks
IDLE = dict(durability="none", apply_batch=10 ** 6, apply_interval=86400.0,
            max_unapplied=10 ** 6)


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


# ---- the holds of prepared transactions (walstore.engine.conflicts.PreparedSet) --------
@pytest.fixture
def built(monkeypatch):
    """Elements of prepared transactions' written-key sets built (``Prepared.written``)."""
    from walstore.engine.conflicts import Prepared
    n = [0]
    real = Prepared.written

    def counted(self):
        n[0] += len(self.writes)
        return real.fget(self)
    monkeypatch.setattr(Prepared, "written", property(counted))
    return n


def test_commits_beside_prepared_transactions_cost_what_they_touch(tmp_path, built):
    """Every commit checked its keys against each prepared transaction, rebuilding its
    written-key set: an in-doubt bulk load of 40,000 keys made each other commit take
    30 ms (2,000 single puts: a minute), 400 small prepared ones 1 ms.  Counted in the
    set elements built; the holds still hold."""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        big = s.transaction()
        big.update({f"bulk/{i:05}": i for i in range(5000)})
        list(big.scan(prefix="fenced/"))  # (a range it read: no one may write into it)
        big.get("read/k")
        big.prepare("bulk")
        for i in range(100):
            tx = s.transaction()
            tx.put(f"small/{i}", i)
            tx.prepare(f"small-{i}")
        built[0] = 0
        for i in range(300):
            with s.transaction() as tx:
                tx.get(f"x/{i}")
                tx.put(f"x/{i}", i)
        assert built[0] == 0, built[0]  # (before: 300 x 5,100 = 1.5 million)
        # what they hold is still held: a write of a key one wrote or read, a read of a
        # key one wrote, a scan across one's write, a write into a range one scanned
        for body in (lambda tx: tx.put("bulk/00007", 0), lambda tx: tx.put("read/k", 0),
                     lambda tx: tx.put("small/3", 0),
                     lambda tx: (tx.get("bulk/04999"), tx.put("y", 1)),
                     lambda tx: (list(tx.scan(prefix="small/")), tx.put("y", 1)),
                     lambda tx: (list(tx.scan(start="bulk/00100", end="bulk/00101")),
                                 tx.put("y", 1)),
                     lambda tx: tx.put("fenced/a", 1)):
            tx = s.transaction()
            body(tx)
            with pytest.raises(walstore.ConflictError, match="held by prepared"):
                tx.commit()
        with s.transaction() as tx:  # (beside them, between them: free)
            list(tx.scan(start="bulk/99999", end="bulk/999999"))
            tx.put("fence", 1)
            tx.put("small", 1)
        s.commit_prepared("small-3")  # (its own holds do not stop it)
        s.rollback_prepared("bulk")
        for i in range(100):
            if i != 3:
                s.commit_prepared(f"small-{i}")
        with s.transaction() as tx:  # (decided: nothing held any more)
            tx.put("bulk/00007", 1)
            tx.put("fenced/a", 1)
            tx.put("small/3", 1)
        eng = s._engine
        assert not eng.prepared and not eng.prepared._written and not len(eng.prepared._order)
        assert not eng.prepared._held and not eng.prepared._ranged and not eng.prepared.txids()
    finally:
        s.close()


def test_key_index_discard_keeps_a_sorted_set():
    import random
    from walstore.engine.keyindex import KeyIndex
    rng = random.Random(45)
    index, model = KeyIndex(), set()
    for _ in range(20000):
        k = rng.randrange(3000).to_bytes(2, "big")
        if rng.random() < 0.5:
            index.add(k)
            model.add(k)
        else:
            index.discard(k)
            model.discard(k)
    assert len(index) == len(model)
    assert index.range(b"", None) == sorted(model)
    lo, hi = (700).to_bytes(2, "big"), (1500).to_bytes(2, "big")
    assert index.range(lo, hi) == sorted(k for k in model if lo <= k < hi)
    for k in sorted(model):
        index.discard(k)
    assert len(index) == 0 and index.range(b"", None) == []


# ---- who wrote a key's unapplied versions (History.unapplied_versions) -----------------
class _CountingDeque(__import__("collections").deque):
    """The MemTable's event deque, counting the events its iterations pass over."""

    passed = 0

    def __iter__(self):
        for e in super().__iter__():
            _CountingDeque.passed += 1
            yield e


def test_a_cascade_beside_writers_of_its_keys_does_not_map_the_backlog_per_key(tmp_path):
    """A cascading revert looked up the writers of each key's unapplied versions in a map
    of every event in the MemTable, built per key: beside a writer of the same keys whose
    commits were not applied yet, K keys cost K times the backlog (2,000 keys beside
    20,000 commits: 7 s, 2 s now).  Counted in events iterated; the cascade still undoes
    what it met, and the plan still reads the writers of those versions."""
    import threading
    from tools.faults import FaultBackend, installed
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        keys = [f"a/{j}" for j in range(200)]
        with s.transaction() as tx:
            for k in keys:
                tx.put(k, 0)
        first = tx.id
        for k in keys:
            with s.transaction() as tx:
                tx.put(k, 1)
        mt = s._engine.memtable
        mt.events = _CountingDeque(mt.events)

        def writers(_name):  # 2,000 commits to the same keys after the undo's snapshot
            def write():
                for i in range(2000):
                    with s.transaction() as tx:
                        tx.put(keys[i % len(keys)], 2)
            t = threading.Thread(target=write)
            t.start()
            t.join(60)
        fb = FaultBackend()
        rule = fb.at_point("undo.resolved", writers, times=1)
        _CountingDeque.passed = 0
        with installed(fb):
            info = s.revert(first, cascade=True)  # (conflicts, then plans held out)
        assert rule.seen >= 1
        # (before: each of the 200 keys mapped the 2,000+ events: 400,000 and more)
        assert _CountingDeque.passed < 20 * 2000, _CountingDeque.passed
        assert len(info.extra["reverts"]) == 1 + 200 + 2000
        assert all(s.get(k) is None for k in keys)
        # a key's unapplied versions still name their writers (newest first)
        with s.transaction() as tx:
            tx.put("hot", 1)
        t1 = tx.id
        with s.transaction() as tx:
            tx.put("hot", 2)
        assert [(v.txid, v.value) for v in s._history.unapplied_versions(encode_key("hot"))] == [
            (tx.id, 2), (t1, 1)]
        assert [v.txid for v in s._history.unapplied_versions(encode_key("hot"), tx.lsn)] == [t1]
    finally:
        s.close()
