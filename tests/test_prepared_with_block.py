"""A transaction prepared inside its ``with`` block is left in doubt when the block ends
(CONTRACT section 2, two-phase commit: "A prepared transaction holds its write set ...
until resolved").  The block's end committed it — a participant deciding on its own after
voting yes, before its coordinator, who might still abort the others — and an exception
after the prepare rolled it back, compensating.  Now only ``commit()`` / ``rollback()`` or
``store.commit_prepared`` / ``store.rollback_prepared`` decide it."""
from __future__ import annotations

import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "s"))
    s.refunds = []
    s.compensator("refund")(lambda a: s.refunds.append(a.id))
    yield s
    s.close()


def test_the_blocks_end_leaves_a_prepared_transaction_in_doubt(store):
    with store.transaction() as tx:
        tx.put("a", 1)
        with tx.action("charge", compensate="refund"):
            pass
        tx.prepare("g1")
    assert tx.state == "active" and store.prepared() == ["g1"]
    assert store.decision("g1") == "prepared" and store.get("a") is None
    store.commit_prepared("g1")  # the coordinator decides
    assert store.get("a") == 1 and store.refunds == []
    assert [a.state for a in store.actions()] == ["committed"]


def test_an_exception_after_the_prepare_leaves_it_in_doubt_too(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.put("a", 1)
            with tx.action("charge", compensate="refund"):
                pass
            tx.prepare("g1")
            raise RuntimeError("the coordinator's own step failed")
    assert store.prepared() == ["g1"] and store.refunds == []  # nothing compensated yet
    store.rollback_prepared("g1")  # decided abort: now it is compensated, once
    assert store.get("a") is None and len(store.refunds) == 1
    assert store.decision("g1") == "abort"


def test_it_stays_in_doubt_across_a_reopen_and_commit_still_decides_it(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
            tx.prepare("g1")
        with s.transaction() as tx2:  # an explicit decision still works inside a block
            tx2.put("b", 2)
            tx2.prepare("g2")
            tx2.commit()
    with walstore.open(path) as s:
        assert s.prepared() == ["g1"] and s.get("b") == 2 and s.get("a") is None
        s.commit_prepared("g1")
        assert s.get("a") == 1


def test_a_prepare_that_fails_is_not_left_in_doubt(store):
    """(the refusal of a prepare is not a vote: the block rolls back as ever)"""
    with store.transaction() as t1:
        t1.put("a", 0)
    t2 = store.transaction()
    t2.get("a")
    with store.transaction() as t3:
        t3.put("a", 5)
    with pytest.raises(walstore.ConflictError):
        with t2:
            t2.put("b", 1)
            t2.prepare("g1")
    assert t2.state == "rolled back" and store.prepared() == []


def test_store_run_commits_a_transaction_its_function_prepared(store):
    """``store.run(fn)`` is "call fn(tx) in a transaction and commit": calling it decides."""
    def move(tx):
        tx.put("a", 1)
        tx.prepare("g-run")
        return "done"
    assert store.run(move) == "done"
    assert store.prepared() == [] and store.decision("g-run") == "commit"
    assert store.get("a") == 1


def test_store_run_leaves_a_prepared_transaction_its_function_decided_alone(store):
    """``fn`` may prepare and then decide itself (``tx.commit()`` / ``tx.rollback()``, the
    coordinator's decision taken in the same process): ``run`` returns fn's result, as it
    did before 3241ed0 — its own ``tx.commit()`` of the decided transaction raised
    TransactionClosed ("already committed") after the commit had landed."""
    def prepare_and_commit(tx):
        tx.put("a", 1)
        tx.prepare("g-c")
        tx.commit()
        return "committed"

    def prepare_and_roll_back(tx):
        tx.put("b", 1)
        tx.prepare("g-r")
        tx.rollback()
        return "rolled back"
    assert store.run(prepare_and_commit) == "committed"
    assert store.run(prepare_and_roll_back) == "rolled back"
    assert store.get("a") == 1 and store.get("b") is None and store.prepared() == []
    assert store.decision("g-c") == "commit" and store.decision("g-r") == "abort"
