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


def test_log_oldest_first_pages_forward(store):
    for i in range(40):
        _commit(store, None, **{f"k{i % 7}": i})
    newest_first = store.log()
    everything = list(reversed(newest_first))
    assert store.log(oldest_first=True) == everything
    since = everything[4].lsn
    got, at = [], walstore.LSN(since)
    while True:
        page = store.log(limit=6, since=at, oldest_first=True)
        got += page
        if len(page) < 6:
            break
        at = walstore.LSN(page[-1].lsn)
    assert got == everything[5:]
    assert store.log(limit=3, since=walstore.LSN(since), oldest_first=True) == everything[5:8]
    with pytest.raises(TypeError):
        store.log(oldest_first="yes")


def test_a_langgraph_rewind_reads_the_log_only_until_another_run_began(tmp_path, monkeypatch):
    # (probe-lgorder: rewind_point read store.log(since=the checkpoint's save) whole: every
    # thread's commits since, 0.5 s and 24 MiB with 40,000 of them; now oldest first, a
    # page at a time, until a commit shows another run of the thread began)
    pytest.importorskip("langgraph.checkpoint.base")
    from walstore.integrations.langgraph import WalstoreSaver
    from test_langgraph_saver import cfg, checkpoint
    s = walstore.open(str(tmp_path / "lg"), durability="none")
    saver = WalstoreSaver(s)
    p = saver.put(cfg("t"), checkpoint(x=1), {"source": "input", "step": -1, "run_id": "r1"},
                  {"x": 1})
    t = saver.put(p, checkpoint(x=2), {"source": "loop", "step": 0, "run_id": "r1"},
                  {"x": 2})
    saver.put(t, checkpoint(x=3), {"source": "input", "step": 1, "run_id": "r2"}, {"x": 3})
    for i in range(3000):  # other threads' work since
        with s.transaction() as tx:
            tx.put(f"other/{i}", i)
    read = []
    log = walstore.Store.log

    def counting(self, *a, **k):
        out = log(self, *a, **k)
        read.append(len(out))
        return out
    monkeypatch.setattr(walstore.Store, "log", counting)
    assert saver.rewind_point(t) == saver.store.history(
        saver.keys.at("t", "").checkpoint(t["configurable"]["checkpoint_id"]))[-1].lsn
    assert sum(read) <= 256, read  # (a page, not 3,002 commits)
    monkeypatch.undo()
    s.close()
