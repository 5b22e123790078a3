"""The action layer's cost grows with the work asked, not with its square nor the store's
age: a compensation reads its action's row folding only the unapplied events that
concern that action (``MemTable.by_action``, ``Views.action_row``), so N compensations (a
rollback of a transaction with N actions, a rewind over N transactions with one each)
fold O(N) events, not O(N^2) (each folded every intent, result, COMPENSATED record and
the undo's COMMIT claiming all N).  The narrow fold gives the very row the full fold
gives.  (Costs are counted, never timed.)"""
from __future__ import annotations

import random

import pytest

import walstore
from walstore.engine import tables

IDLE = dict(durability="none", apply_interval=3600.0)  # the applier waits: all unapplied


@pytest.fixture
def folds(monkeypatch):
    calls = [0]
    orig = tables.action_changes

    def counted(*a, **k):
        calls[0] += 1
        return orig(*a, **k)
    monkeypatch.setattr(tables, "action_changes", counted)
    return calls


def _rollback_folds(path, n, folds):
    s = walstore.open(path, compensators={"noop": lambda a: None}, **IDLE)
    try:
        tx = s.transaction()
        for i in range(n):
            with tx.action("eff", args={}, compensate="noop") as a:
                a.result = i
        folds[0] = 0
        tx.rollback()
        assert [a.state for a in s.actions()] == ["compensated"] * n
        return folds[0]
    finally:
        s.close()


def test_a_rollback_of_n_actions_folds_o_n_events(tmp_path, folds):
    small = _rollback_folds(str(tmp_path / "a"), 50, folds)
    big = _rollback_folds(str(tmp_path / "b"), 400, folds)
    # linear: 8x the actions, 8x the folds (each action: its intent, result, the ABORT,
    # the COMPENSATED records before it); the full fold per action made it ~64x
    assert big <= 10 * small, (small, big)
    assert big <= 8 * 400, big


def _rewind_folds(path, n, folds):
    s = walstore.open(path, compensators={"noop": lambda a: None}, **IDLE)
    try:
        s.restore_point("P")
        for i in range(n):
            with s.transaction() as tx:
                tx.put(f"y{i}", i)
                with tx.action("eff", args={}, compensate="noop") as a:
                    a.result = i
        folds[0] = 0
        r = s.rewind("P")
        assert len(r.extra["compensate"]) == n and not s.pending_compensations()
        return folds[0]
    finally:
        s.close()


def test_a_rewind_compensating_n_actions_folds_o_n_events(tmp_path, folds):
    small = _rewind_folds(str(tmp_path / "a"), 50, folds)
    big = _rewind_folds(str(tmp_path / "b"), 400, folds)
    assert big <= 10 * small, (small, big)
    assert big <= 12 * 400, big


def _full_fold(views, aid, include_unpublished=False):
    """What action_row gave before: every unapplied action event folded."""
    from walstore.engine.views import _ACTION_TYPES, _action
    events = views._events(_ACTION_TYPES, include_unpublished)
    with views.state.read() as txn:
        changed = views._fold_actions(events, txn)
        return changed[aid] if aid in changed else _action(txn, views.state.actions, aid,
                                                           views.state.data_file)


def _same_rows(s):
    eng = s._engine
    rows = eng.views.action_rows()
    for aid in list(rows) + ["999999.1", "x", "1.999"]:
        for unpublished in (False, True):
            assert eng.views.action_row(aid, unpublished) == _full_fold(
                eng.views, aid, unpublished), aid
    return rows


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_the_narrow_fold_gives_the_full_folds_rows(tmp_path, seed):
    """Commits, rollbacks, savepoints, failed and missing compensators, resolves, reverts
    and reverts of reverts (redo / unredo marks), with the applier run at random moments:
    every action's row read alone is the row the full fold gives."""
    rng = random.Random(seed)
    flaky = {"n": 0}

    def sometimes(a):
        flaky["n"] += 1
        if flaky["n"] % 3 == 0:
            raise RuntimeError("down")

    s = walstore.open(str(tmp_path / "s"), compensators={
        "noop": lambda a: None, "flaky": sometimes}, **IDLE)
    try:
        committed = []
        for round_ in range(40):
            op = rng.randrange(7)
            if op <= 2:  # a commit with actions (some with a savepoint rolled back)
                tx = s.transaction()
                tx.put(f"k{round_}", round_)
                sp = tx.savepoint() if rng.random() < 0.3 else None
                for j in range(rng.randrange(1, 4)):
                    comp = rng.choice(["noop", "flaky", "missing", None])
                    with tx.action(f"e{j}", args={"j": j}, compensate=comp) as a:
                        a.result = j
                if sp is not None and rng.random() < 0.5:
                    try:
                        tx.rollback_to(sp)
                    except walstore.CompensationFailed:
                        pass
                    with tx.action("after", args={}, compensate="noop") as a:
                        a.result = "x"
                tx.commit()
                committed.append(tx.id)
            elif op == 3:  # a rollback
                tx = s.transaction()
                for j in range(rng.randrange(1, 4)):
                    with tx.action(f"r{j}", args={}, compensate=rng.choice(
                            ["noop", "flaky", None])) as a:
                        a.result = j
                try:
                    tx.rollback()
                except walstore.CompensationFailed:
                    pass
            elif op == 4 and committed:  # a revert (then maybe one of it: redo marks)
                try:
                    info = s.revert(rng.choice(committed))
                except (walstore.CompensationFailed, walstore.WalstoreError):
                    info = None
                if info is not None and rng.random() < 0.5:
                    try:
                        s.revert(info.txid)
                    except (walstore.CompensationFailed, walstore.WalstoreError):
                        pass
            elif op == 5:  # resolve or retry what is owed
                owed = s.pending_compensations()
                if owed and rng.random() < 0.5:
                    s.resolve(owed[0].id, "by hand")
                else:
                    s.retry_compensations()
            else:
                s._engine.drain()
            _same_rows(s)
        s._engine.drain()
        assert _same_rows(s)
        mt = s._engine.memtable
        assert not mt.events and not mt.by_action and not mt.ends  # (bounded: all left)
    finally:
        s.close()


def test_resolving_a_restore_point_name_reads_its_row_alone(tmp_path, monkeypatch):
    """``at(name)``, ``rewind(name)``, ``drop_restore_point(name)`` read the named point's
    row, not every point kept (each decoded them all)."""
    decoded = [0]
    orig = tables.unpack_row

    def counted(raw, table, *a, **k):
        if table == "points":
            decoded[0] += 1
        return orig(raw, table, *a, **k)
    monkeypatch.setattr(tables, "unpack_row", counted)
    s = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        for i in range(300):
            with s.transaction() as tx:
                tx.put("x", i)
            s.restore_point(f"turn-{i}")
        s.checkpoint()
        decoded[0] = 0
        assert s.at("turn-150").get("x") == 150
        assert decoded[0] <= 2, decoded[0]
        with pytest.raises(walstore.UnknownPoint):
            s.at("turn-none")
        s.drop_restore_point("turn-7")  # (unapplied: the drop is folded in)
        with pytest.raises(walstore.UnknownPoint):
            s.at("turn-7")
        s.restore_point("turn-7")
        assert s.at("turn-7").get("x") == 299
        assert decoded[0] <= 8, decoded[0]
        points = s.restore_points()
        assert len(points) == 300 and points["turn-7"] > points["turn-299"]
    finally:
        s.close()
