"""Findings of stop 55 in the agent layer (contract, "Action rollback", "External side
effects" and "Two-phase commit"), each named after the promise it broke."""
from __future__ import annotations

import pytest

import walstore


def _charge(store, key="k", comp="refund", result="ch"):
    """Commit one transaction writing ``key`` with one action compensated by ``comp``."""
    with store.transaction() as tx:
        tx.put(key, 1)
        with tx.action("charge", args=1, compensate=comp) as act:
            act.result = result
    return tx.id, act.id


# ---- a revert whose compensation fails says that the revert itself committed ----------

def test_revert_with_failing_compensation_says_the_revert_committed(tmp_path):
    # Before: CompensationFailed read "compensation failed for action(s) [...]; kept as
    # 'failed'", the words a rolled-back transaction's failure uses: nothing told the
    # user the revert itself had committed (the state IS reverted), so state and world
    # could be taken to disagree either way.  Now the message says so, and
    # ``e.committed`` is True beside ``e.undo`` (the undoing transaction's TxnInfo).
    def refund(action):
        raise RuntimeError("refund api down")
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        txid, aid = _charge(s)
        with pytest.raises(walstore.CompensationFailed) as info:
            s.revert(txid)
        e = info.value
        assert e.committed is True
        assert e.undo is not None and e.undo.txid == s.log(limit=1)[0].txid
        assert f"COMMITTED (transaction {e.undo.txid}" in str(e)
        assert s.get("k") is None
        assert s.get_action(aid).state == "failed"
        # a rollback's failure is not an undo that committed
        tx = s.transaction()
        with tx.action("charge", args=2, compensate="refund"):
            pass
        with pytest.raises(walstore.CompensationFailed) as info:
            tx.rollback()
        assert info.value.committed is False and info.value.undo is None
        assert "COMMITTED" not in str(info.value)
