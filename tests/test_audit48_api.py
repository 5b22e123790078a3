"""Audit 48 of the Python API (CONTRACT section 2): regressions found by probing the
promises with edge values and wrong inputs, one test each (each failed before its fix)."""
from __future__ import annotations

import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    yield s
    s.close()


# ---- Transactions, savepoints: the with form ----------------------------------------------
def test_a_savepoint_block_whose_compensation_fails_chains_the_cause_and_ends(store):
    """``with tx.savepoint(...)``: an exception inside rolls back to it; when a compensation
    of an action taken inside then fails, CompensationFailed chains the exception that made
    the block roll back and names it (as a ``with`` transaction's does), and the block's
    savepoint is gone with the block: a later ``rollback_to`` of its name outside the
    block must not undo the transaction's later writes (it did, silently)."""
    @store.compensator("refund")
    def refund(action):
        raise RuntimeError("payments API down")

    tx = store.transaction()
    tx.put("k", 0)
    with pytest.raises(walstore.CompensationFailed) as err:
        with tx.savepoint("plan-a"):
            tx.put("k", 1)
            with tx.action("charge", compensate="refund") as act:
                act.result = {"charge": 1}
            raise KeyError("out of stock")
    assert isinstance(err.value.__cause__, KeyError)
    assert "out of stock" in str(err.value)
    assert tx.get("k") == 0  # rolled back to the savepoint
    assert [a.state for a in store.pending_compensations()] == ["failed"]
    tx.put("k", 5)
    with pytest.raises(ValueError):
        tx.rollback_to("plan-a")  # (the block's savepoint ended with the block)
    assert tx.get("k") == 5
    tx.commit()
    assert store["k"] == 5


def test_a_savepoint_block_still_re_raises_and_releases_without_actions(store):
    with store.transaction() as tx:
        tx.put("k", 0)
        with pytest.raises(KeyError):
            with tx.savepoint("s"):
                tx.put("k", 1)
                raise KeyError("x")
        assert tx.get("k") == 0
        with pytest.raises(ValueError):
            tx.rollback_to("s")
    assert store["k"] == 0

