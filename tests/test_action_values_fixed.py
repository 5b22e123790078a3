"""An action's args are fixed when ``tx.action()`` is entered and its result when the body
ends — what the intent and result records hold is what the row, the COMMIT and an
in-process compensation see, whatever the caller does to its objects afterwards
(probe-api42: they were kept by reference)."""
from __future__ import annotations

import walstore


def _charged(s, amount: int, charge_id: str):
    """A transaction with one action, then the caller's args and result changed."""
    args, res = {"amount": amount}, {"charge_id": charge_id}
    tx = s.transaction()
    with tx.action("charge", args=args, compensate="refund") as act:
        act.result = res
    args["amount"], res["charge_id"] = amount * 100, "changed"
    return tx


def test_args_and_result_changed_after_the_call_change_nothing_recorded(tmp_path):
    path = str(tmp_path / "s")
    seen = []
    with walstore.open(path) as s:
        s.compensator("refund")(lambda a: seen.append((a.args, a.result)))
        _charged(s, 40, "ch_1").commit()
        assert [(a.args, a.result) for a in s.actions()] == [
            ({"amount": 40}, {"charge_id": "ch_1"})]
        # rolled back: the compensator gets what the intent logged, as after a crash
        _charged(s, 10, "ch_2").rollback()
        assert seen == [({"amount": 10}, {"charge_id": "ch_2"})]
    with walstore.open(path) as s:
        got = sorted((a.args["amount"], a.result["charge_id"], a.state) for a in s.actions())
        assert got == [(10, "ch_2", "compensated"), (40, "ch_1", "committed")]


def test_args_and_result_made_unstorable_after_the_call_break_nothing(tmp_path):
    """Changed into something msgpack cannot pack after they passed the call's check: the
    commit went through to a raw msgpack TypeError at commit, then the applier failed on
    the same row and the store turned read-only."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        s.compensator("c")(lambda a: None)
        args, res = {"amount": 40}, {"charge_id": "ch_1"}
        tx = s.transaction()
        tx.put("k", 1)
        with tx.action("charge", args=args, compensate="c") as act:
            act.result = res
        args["bad"] = {1, 2}
        res["bad"] = object()
        tx.commit()
        for i in range(5):
            with s.transaction() as t2:
                t2.put(f"after{i}", i)
        s.checkpoint()  # (the applier wrote the action's row)
        with s.transaction() as t3:
            t3.put("still", "writable")
    with walstore.open(path) as s:
        assert s.get("k") == 1 and s.get("still") == "writable"
        [a] = s.actions()
        assert (a.args, a.result, a.state) == ({"amount": 40}, {"charge_id": "ch_1"},
                                               "committed")
