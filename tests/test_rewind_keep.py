"""``store.rewind(to, keep=txids)``: the transactions named are left as they are (keys,
actions), the rest after the point undone; a kept transaction's key that an undone one
wrote before it is refused, nothing changed."""
from __future__ import annotations

import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    s.refunds = []  # type: ignore[attr-defined]
    s.compensator("refund")(lambda a: s.refunds.append(a.args["n"]))
    yield s
    s.close()


def _commit(store, n, **kv):
    with store.transaction() as tx:
        for k, v in kv.items():
            tx.put(k, v)
        if n is not None:
            with tx.action("charge", args={"n": n}, compensate="refund") as act:
                act.result = {"ok": True}
    return tx.id


def test_kept_transactions_stay_and_the_rest_is_undone(store):
    _commit(store, None, a=0)
    point = store.log(limit=1)[0].lsn
    t1 = _commit(store, 1, b=1)
    t2 = _commit(store, 2, c=2)       # kept: its key and its action stand
    t3 = _commit(store, 3, a=3)
    plan = store.rewind(point, keep=[t2], dry_run=True).as_dict()
    assert sorted(plan["txids"]) == sorted([t1, t3]) and store.refunds == []
    info = store.rewind(point, keep=[t2])
    assert store.refunds == [3, 1]
    assert store.get("a") == 0 and store.get("b") is None and store.get("c") == 2
    states = {a.txid: a.state for a in store.actions()}
    assert states == {t1: "compensated", t2: "committed", t3: "compensated"}
    assert t2 not in info.extra.get("reverts", [])


def test_a_kept_key_an_undone_transaction_wrote_first_is_refused(store):
    _commit(store, None, a=0)
    point = store.log(limit=1)[0].lsn
    _commit(store, 1, a=1)
    t2 = _commit(store, None, a=2)     # kept, but a=1 before it would be put back under it
    with pytest.raises(walstore.RevertConflict) as ei:
        store.rewind(point, keep=[t2])
    assert t2 in ei.value.txids
    assert store.get("a") == 2 and store.refunds == []


def test_a_kept_writer_before_the_undone_one_keeps_its_value(store):
    _commit(store, None, a=0)
    point = store.log(limit=1)[0].lsn
    _commit(store, None, a=1)  # kept
    t1 = store.log(limit=1)[0].txid
    _commit(store, 2, a=2)
    store.rewind(point, keep={t1})
    assert store.get("a") == 1 and store.refunds == [2]


@pytest.mark.parametrize("bad", ["1", 5, [True], [walstore.LSN(3)], [1.5]])
def test_keep_takes_txids_only(store, bad):
    _commit(store, None, a=0)
    with pytest.raises(TypeError):
        store.rewind(walstore.LSN(0), keep=bad)
    assert store.get("a") == 0
