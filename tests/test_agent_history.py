"""Action rollback for agents (contract section 2, "Action rollback"): log, history, revert
(with cascade), restore points, rewind, time-travel reads, retention — and their CLI.

Also the cost promise (no timing): rewinding 10 transactions on a store with 2000 of
history touches those 10, never the whole log.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import walstore
from walstore import LSN
from walstore.cli import main as cli_main


@pytest.fixture
def quiet_store(path):
    """A store whose applier thread never wakes by itself (commits stay in the overlay
    until something applies them), so interleavings with it are deterministic."""
    s = walstore.open(path, durability="none", apply_interval=3600)
    yield s
    s.close()


def commit(store, meta=None, **writes):
    """One transaction writing ``writes`` (None deletes); returns the finished Transaction."""
    with store.transaction(meta=meta) as tx:
        for k, v in writes.items():
            if v is None:
                tx.delete(k)
            else:
                tx.put(k, v)
    return tx


def state(store) -> dict:
    return dict(store.scan())


class Recorder:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.keys: list[str] = []

    def __call__(self, action) -> None:
        self.ids.append(action.id)
        self.keys.append(action.key)


def charged(store, tx_meta, n, rec_name="refund", **writes):
    """A committed transaction with ``n`` compensable actions; returns (tx, [action ids])."""
    ids = []
    with store.transaction(meta=tx_meta) as tx:
        for i in range(n):
            with tx.action("charge", args={"i": i}, compensate=rec_name) as act:
                act.result = {"charge": i}
            ids.append(act.id)
        for k, v in writes.items():
            tx.put(k, v)
    return tx, ids


# ---- log and history -------------------------------------------------------------------------
def test_log_is_newest_first_with_txid_lsn_timestamp_meta_keys(store):
    t0 = time.time()
    t1 = commit(store, {"step": 1}, a=1, b=2)
    t2 = commit(store, {"step": 2}, a=3)
    store.checkpoint()  # t1, t2 in LMDB; t3, t4 still queued: the log shows both kinds
    t3 = commit(store, None, c=None)
    t4 = commit(store, {"step": 4}, **{"d": [1, 2]})
    empty = store.transaction()
    empty.commit()  # wrote nothing: not a logged transaction
    log = store.log()
    assert [i.txid for i in log] == [t4.id, t3.id, t2.id, t1.id]
    assert [i.lsn for i in log] == [t4.lsn, t3.lsn, t2.lsn, t1.lsn]
    assert log[0].lsn > log[1].lsn > log[2].lsn > log[3].lsn
    assert [i.meta for i in log] == [{"step": 4}, None, {"step": 2}, {"step": 1}]
    assert [sorted(i.keys) for i in log] == [["d"], ["c"], ["a"], ["a", "b"]]
    assert all(t0 - 1 <= i.timestamp <= time.time() + 1 for i in log)
    assert log[0].timestamp >= log[-1].timestamp
    assert all(i.actions == () for i in log)
    assert [i.txid for i in store.log(limit=2)] == [t4.id, t3.id]
    assert [i.txid for i in store.log(since=t2.id)] == [t4.id, t3.id]
    assert [i.txid for i in store.log(limit=1, since=t1.id)] == [t4.id]
    assert store.log(since=t4.id) == []
    assert store.txn_info(t2.id).keys == ("a",)
    with pytest.raises(KeyError):
        store.txn_info(999)


def test_log_survives_reopen_and_cli_log_json(path):
    with walstore.open(path, durability="none") as store:
        ids = [commit(store, {"n": i}, k=i).id for i in range(3)]
    with walstore.open(path, durability="none") as store:
        assert [i.txid for i in store.log()] == ids[::-1]
    r = CliRunner().invoke(cli_main, ["log", path, "--json", "--limit", "2"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["transactions"]
    assert [x["txid"] for x in rows] == ids[:0:-1]
    assert rows[0]["meta"] == {"n": 2} and rows[0]["keys"] == ["k"]


def test_log_limit_is_by_commit_order_not_txid(store):
    older_txid = store.transaction()
    newer_txid = store.transaction()
    newer_txid.put("y", 1)
    newer_txid.commit()  # commits first
    older_txid.put("x", 1)
    older_txid.commit()  # commits last: the newest commit has the smaller txid
    store.checkpoint()  # both in LMDB
    assert [i.txid for i in store.log()] == [older_txid.id, newer_txid.id]
    assert [i.txid for i in store.log(limit=1)] == [older_txid.id]


def test_log_since_a_txid_that_never_committed_is_an_unknown_point(store):
    """``since`` is a point like every other (CONTRACT: a txid that never committed, a
    negative number, names nothing: UnknownPoint); it was read as "the larger txids"."""
    t1 = commit(store, None, a=1)
    rolled = store.transaction()
    rolled.put("b", 1)
    rolled.rollback()
    t3 = commit(store, None, c=1)
    assert [i.txid for i in store.log(since=t1.id)] == [t3.id]
    for bad in (rolled.id, 0, -1, 10**30, t3.id + 1):
        with pytest.raises(walstore.UnknownPoint):
            store.log(since=bad)


def test_history_of_a_key_is_newest_first(store):
    t1 = commit(store, None, k="v1", other=0)
    t2 = commit(store, None, k="v2")
    commit(store, None, other=1)
    t4 = commit(store, None, k=None)
    t5 = commit(store, None, k={"v": 5})
    h = store.history("k")
    assert [(v.txid, v.value, v.deleted) for v in h] == [
        (t5.id, {"v": 5}, False), (t4.id, None, True), (t2.id, "v2", False),
        (t1.id, "v1", False)]
    assert [v.lsn for v in h] == [t5.lsn, t4.lsn, t2.lsn, t1.lsn]
    assert all(isinstance(v.lsn, LSN) for v in h)
    assert store.history("never") == []
    commit(store, None, **{"b": b"\x00"})
    assert store.history(b"\x00b") == []  # bytes and str keys are different keys


def test_cli_history(path):
    with walstore.open(path, durability="none") as store:
        t1 = commit(store, None, k=1)
        t2 = commit(store, None, k=None)
    r = CliRunner().invoke(cli_main, ["history", path, "k", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(v["txid"], v["value"], v["deleted"]) for v in doc["versions"]] == [
        (t2.id, None, True), (t1.id, 1, False)]
    r = CliRunner().invoke(cli_main, ["history", path, "k"])
    assert r.exit_code == 0 and str(t1.id) in r.output and "(deleted)" in r.output


# ---- revert ----------------------------------------------------------------------------------
def test_revert_applies_before_images_as_a_new_transaction(store):
    commit(store, None, a=1, b=1)
    t2 = commit(store, {"agent": "x"}, a=2, c=3, b=None)  # modify, create, delete
    t3 = commit(store, None, z=9)
    before_log = [i.txid for i in store.log()]
    info = store.revert(t2.id)
    assert state(store) == {"a": 1, "b": 1, "z": 9}  # as if t2 never happened
    assert info.txid not in before_log and info.extra["reverts"] == [t2.id]
    assert info.meta == {"revert": t2.id}
    assert sorted(info.keys) == ["a", "b", "c"]
    assert [i.txid for i in store.log()] == [info.txid] + before_log  # history kept
    assert [v.value for v in store.history("a")] == [1, 2, 1]
    assert store.revert(t3.id).extra["reverts"] == [t3.id]
    assert state(store) == {"a": 1, "b": 1}


def test_revert_compensates_the_transactions_actions_newest_first(store):
    rec = Recorder()
    store.compensator("refund")(rec)
    t1, ids = charged(store, None, 3, order=1)
    commit(store, None, other=1)
    store.revert(t1.id)
    assert rec.ids == ids[::-1]
    assert all(store.get_action(i).state == "compensated" for i in ids)
    assert store.get("order") is None and store.get("other") == 1
    assert store.pending_compensations() == []


def test_revert_without_compensator_leaves_actions_pending(path):
    with walstore.open(path, durability="none") as store:
        t1, ids = charged(store, None, 2, order=1)
        store.revert(t1.id)
        assert store.get("order") is None
        assert sorted(a.id for a in store.pending_compensations()) == sorted(ids)
    rec = Recorder()
    with walstore.open(path, durability="none", compensators={"refund": rec}) as store:
        assert rec.ids == ids[::-1]
        assert store.pending_compensations() == []


def test_revert_with_failing_compensation_still_reverts_and_raises(store):
    @store.compensator("refund")
    def refund(action):
        raise RuntimeError("gateway down")

    t1, (aid,) = charged(store, None, 1, order=1)
    with pytest.raises(walstore.CompensationFailed):
        store.revert(t1.id)
    assert store.get("order") is None  # the data part committed
    assert store.log()[0].extra["reverts"] == [t1.id]
    (p,) = store.pending_compensations()
    assert p.id == aid and p.state == "failed"


def test_revert_conflict_names_later_transactions_and_changes_nothing(store):
    t1 = commit(store, None, a=1, b=1, c=1)
    t2 = commit(store, None, a=2)
    commit(store, None, unrelated=1)
    t4 = commit(store, None, b=4)
    t5 = commit(store, None, a=5)
    snapshot, log = state(store), [i.txid for i in store.log()]
    with pytest.raises(walstore.RevertConflict) as ei:
        store.revert(t1.id)
    assert isinstance(ei.value, walstore.WalstoreError)
    assert sorted(ei.value.txids) == sorted([t2.id, t4.id, t5.id])
    assert all(str(t) in str(ei.value) for t in ei.value.txids)
    assert state(store) == snapshot and [i.txid for i in store.log()] == log
    # a transaction with no later writer reverts alone
    assert store.revert(t5.id).extra["reverts"] == [t5.id]
    assert store.get("a") == 2


def test_revert_cascade_reverts_dependents_newest_first(store):
    rec = Recorder()
    store.compensator("refund")(rec)
    commit(store, None, base=0)
    t1, ids1 = charged(store, None, 1, a=1)
    t2, ids2 = charged(store, None, 1, a=2, b=2)
    t3 = commit(store, None, unrelated=3)
    t4, ids4 = charged(store, None, 1, b=4)  # depends on t2 through b: also reverted
    info = store.revert(t1.id, cascade=True)
    assert info.extra["reverts"] == [t4.id, t2.id, t1.id]
    assert state(store) == {"base": 0, "unrelated": 3}
    assert rec.ids == ids4 + ids2 + ids1
    assert t3.id not in info.extra["reverts"]


def test_revert_racing_a_concurrent_write_conflicts_instead_of_clobbering(quiet_store,
                                                                         monkeypatch):
    store = quiet_store
    commit(store, None, a=0)
    t1 = commit(store, None, a=1)
    orig = store.transaction
    raced = []

    def racing(meta=None):
        if not raced:  # another thread writes the same key right now
            raced.append(None)
            with orig() as other:
                other.put("a", 2)
            raced[0] = other.id
        return orig(meta=meta)

    monkeypatch.setattr(store, "transaction", racing)
    with pytest.raises((walstore.RevertConflict, walstore.ConflictError)):
        store.revert(t1.id)
    monkeypatch.undo()
    assert raced[0] is not None and store.get("a") == 2


def test_a_revert_can_itself_be_reverted(store):
    commit(store, None, a=1)
    t2 = commit(store, None, a=2, b=2)
    r1 = store.revert(t2.id)
    assert state(store) == {"a": 1}
    r2 = store.revert(r1.txid)
    assert r2.extra["reverts"] == [r1.txid]
    assert state(store) == {"a": 2, "b": 2}
    with pytest.raises(walstore.RevertConflict) as ei:
        store.revert(t2.id)  # the reverts touched its keys later
    assert sorted(ei.value.txids) == sorted([r1.txid, r2.txid])


def test_a_txid_out_of_range_names_the_range_the_log_can_hold(store):
    """A txid no commit can have is refused naming the range: 1 to 2**63 - 1 (the log
    refuses a larger one as corruption, FORMAT.md); the message said 2**64 - 1."""
    commit(store, None, a=1)
    for bad in (0, 2**63, 2**64):
        with pytest.raises(walstore.UnknownPoint, match=f"from 1 to {2**63 - 1},"):
            store.at(bad)
        with pytest.raises(walstore.UnknownPoint, match=f"from 1 to {2**63 - 1},"):
            store.revert(bad)
    assert state(store) == {"a": 1}


def test_revert_unknown_txid(store):
    commit(store, None, a=1)
    with pytest.raises(KeyError):
        store.revert(4242)
    assert state(store) == {"a": 1}


# ---- restore points, rewind, at --------------------------------------------------------------
def test_restore_point_returns_an_lsn_and_is_listed(store):
    commit(store, None, a=1)
    p1 = store.restore_point("one")
    commit(store, None, a=2)
    p2 = store.restore_point("two")
    assert isinstance(p1, LSN) and isinstance(p2, LSN) and p2 > p1 > 0
    assert store.log()[0].lsn < p2
    assert store.restore_points() == {"one": p1, "two": p2}
    with pytest.raises(ValueError):
        store.restore_point("1234")  # would read as a txid
    with pytest.raises(TypeError):
        store.restore_point("")
    # an empty name, prefix or scope is a bad value of the right type: a ValueError too,
    # as tx.put("", ...)'s (it was only a TypeError: probe-contract)
    for call in (lambda: store.restore_point(""), lambda: store.purge(""),
                 lambda: store.purge(b""), lambda: store.rewind("two", scope="")):
        with pytest.raises(ValueError, match="non-empty"):
            call()
    with pytest.raises(TypeError) as e:
        store.restore_point(5)
    assert not isinstance(e.value, ValueError)  # (a wrong type stays a TypeError alone)
    store.drop_restore_point("one")
    assert store.restore_points() == {"two": p2}
    with pytest.raises(KeyError):
        store.drop_restore_point("one")
    with pytest.raises(KeyError):
        store.rewind("one")
    with pytest.raises(KeyError):
        store.at("one")


def test_restore_points_survive_reopen(path):
    with walstore.open(path, durability="none") as store:
        commit(store, None, a=1)
        p = store.restore_point("kept")
        commit(store, None, a=2)
    with walstore.open(path, durability="none") as store:
        assert store.restore_points() == {"kept": p}
        assert store.at("kept").get("a") == 1


def test_dropped_restore_point_stays_dropped_after_reopen(path):
    with walstore.open(path, durability="none") as store:
        commit(store, None, a=1)
        store.restore_point("gone")
        commit(store, None, a=2)
        store.drop_restore_point("gone")
        assert store.restore_points() == {}
    with walstore.open(path, durability="none") as store:
        assert store.restore_points() == {}


def test_rewind_to_a_name_undoes_everything_after_as_one_transaction(store):
    rec = Recorder()
    store.compensator("refund")(rec)
    commit(store, None, a=1, b=1)
    before_actions, _ = charged(store, None, 1, keep="me")
    point = store.restore_point("before-plan")
    t1, ids1 = charged(store, {"step": 1}, 2, a=2)
    t2 = commit(store, None, b=None, c=3)
    t3, ids3 = charged(store, {"step": 3}, 1, a=4, d=4)
    log_before = [i.txid for i in store.log()]
    info = store.rewind("before-plan")
    assert state(store) == {"a": 1, "b": 1, "keep": "me"}
    assert info.extra["reverts"] == [t3.id, t2.id, t1.id]
    assert info.meta == {"rewind": "before-plan"}
    assert info.extra["rewound_to"] == point
    # one new transaction; history kept
    assert [i.txid for i in store.log()] == [info.txid] + log_before
    assert len(store.history("a")) == 4
    # compensations newest first: t3's action, then t1's two (newest first)
    assert rec.ids == ids3 + ids1[::-1]
    assert all(store.get_action(i).state == "compensated" for i in ids1 + ids3)
    # reverting the rewind would bring back "charged" state while the charges stay
    # refunded: refused, naming the actions, unless forced (then they read needs-redo)
    with pytest.raises(walstore.RevertConflict) as ei:
        store.revert(info.txid)
    assert sorted(ei.value.actions) == sorted(ids1 + ids3)
    assert state(store) == {"a": 1, "b": 1, "keep": "me"}
    redo = store.revert(info.txid, force=True)
    assert state(store) == {"a": 4, "c": 3, "d": 4, "keep": "me"}
    assert rec.ids == ids3 + ids1[::-1]
    assert all(store.get_action(i).state == "needs-redo" for i in ids1 + ids3)
    # rewinding again does not compensate anything twice; it lists what it changes
    # something of: the redo (the newest writer of every key) and the transactions of
    # the actions whose needs-redo marks it clears (t2 and the first rewind: their writes
    # are overwritten already)
    again = store.rewind("before-plan")
    assert again.extra["reverts"] == [redo.txid, t3.id, t1.id]
    assert state(store) == {"a": 1, "b": 1, "keep": "me"}
    assert rec.ids == ids3 + ids1[::-1]


def test_rewind_to_an_lsn_and_to_a_txid(store):
    t1 = commit(store, None, a=1)
    t2 = commit(store, None, a=2, b=2)
    t3 = commit(store, None, a=3)
    info = store.rewind(t2.id)  # a txid: as of just after it
    assert info.extra["reverts"] == [t3.id]
    assert state(store) == {"a": 2, "b": 2}
    info = store.rewind(LSN(t1.lsn))  # an LSN: commits at or before it stay
    assert set(info.extra["reverts"]) >= {t2.id}
    assert t1.id not in info.extra["reverts"]
    assert state(store) == {"a": 1}
    assert store.rewind(store.log()[0].txid) is None  # nothing after: nothing done
    n = len(store.log())
    p = store.restore_point("now")
    assert store.rewind("now") is None and len(store.log()) == n
    assert store.rewind(p) is None


def test_rewind_compensates_interleaved_transactions_newest_first(store):
    rec = Recorder()
    store.compensator("refund")(rec)
    store.restore_point("p")
    ta = store.transaction()  # smaller txid ...
    tb = store.transaction()
    with tb.action("first", compensate="refund") as first:
        pass
    tb.put("b", 1)
    tb.commit()
    with ta.action("second", compensate="refund") as second:  # ... but acts and commits last
        pass
    ta.put("a", 1)
    ta.commit()
    store.rewind("p")
    assert rec.ids == [second.id, first.id]


def test_rewind_racing_a_concurrent_commit_rewinds_it_or_conflicts(quiet_store, monkeypatch):
    store = quiet_store
    commit(store, None, a=0)
    store.restore_point("p")
    commit(store, None, a=1)
    views = store._engine.views
    orig = views.commits_after
    raced = []

    def racing(lsn):
        if not raced:  # another thread commits right now (after the point, before rewind)
            raced.append(None)
            raced[0] = commit(store, None, b=1).id
        return orig(lsn)

    monkeypatch.setattr(views, "commits_after", racing)
    try:
        info = store.rewind("p")
    except walstore.ConflictError:
        return  # refusing is fine: the caller retries
    monkeypatch.undo()
    assert raced[0] is not None and raced[0] in info.extra["reverts"]
    assert state(store) == dict(store.at("p").scan()) == {"a": 0}


def test_at_reads_the_past(store):
    t1 = commit(store, None, **{"inv/a": 1, "inv/b": 1, "x": 0})
    store.restore_point("p1")
    t2 = commit(store, None, **{"inv/a": 2, "inv/c": 3})
    t3 = commit(store, None, **{"inv/b": None, "inv/a": 9})
    with pytest.raises(walstore.UnknownPoint):  # a str is a restore point name, never a txid
        store.at(str(t1.id))
    for point in ("p1", t1.id, LSN(t1.lsn)):
        v = store.at(point)
        assert v.get("inv/a") == 1 and v.get("inv/c") is None and v.get("inv/c", "-") == "-"
        assert list(v.scan(prefix="inv/")) == [("inv/a", 1), ("inv/b", 1)]
        assert "inv/b" in v and "inv/c" not in v and v["x"] == 0
        with pytest.raises(KeyError):
            v["inv/c"]
    v2 = store.at(t2.id)
    assert dict(v2.scan()) == {"inv/a": 2, "inv/b": 1, "inv/c": 3, "x": 0}
    assert list(v2.scan(prefix="inv/", reverse=True)) == [("inv/c", 3), ("inv/b", 1),
                                                           ("inv/a", 2)]
    assert list(v2.scan(start="inv/b", end="inv/c")) == [("inv/b", 1)]
    assert dict(store.at(t3.id).scan()) == state(store)
    commit(store, None, **{"inv/a": 100})  # a view is fixed in time
    assert v2.get("inv/a") == 2
    with pytest.raises(KeyError):
        store.at("no-such-point")
    with pytest.raises(TypeError):
        store.at(1.5)


# ---- retention -------------------------------------------------------------------------------
def test_retention_trims_old_history_and_restore_points_pin_it(path):
    with walstore.open(path, durability="none", retain_transactions=5) as store:
        old = [commit(store, None, k=i) for i in range(10)]
        p = store.restore_point("keep")
        later = [commit(store, None, **{f"m{i % 3}": i}) for i in range(10)]
        store.checkpoint()
        # the point pins everything after it, even beyond 5 transactions
        assert [i.txid for i in store.log()] == [t.id for t in reversed(later)]
        assert store.at("keep").get("k") == 9
        assert [v.value for v in store.history("k")] == [9]  # older versions trimmed
        with pytest.raises(walstore.HistoryTrimmed):
            store.at(old[3].id)
        with pytest.raises(walstore.HistoryTrimmed):
            store.revert(old[0].id)
        # drop the point: history beyond the 5 newest transactions goes
        store.drop_restore_point("keep")
        store.checkpoint()
        assert [i.txid for i in store.log()] == [t.id for t in reversed(later[-5:])]
        with pytest.raises(walstore.HistoryTrimmed) as ei:
            store.at(p)
        assert "horizon" in str(ei.value)
        with pytest.raises(walstore.HistoryTrimmed):
            store.rewind(p)
        with pytest.raises(walstore.HistoryTrimmed):
            store.rewind(later[0].id)
        with pytest.raises(walstore.HistoryTrimmed):
            store.revert(later[0].id)
        # what is retained still works, and the current state is whole
        assert store.at(later[-5].id).get("m0") == 3
        assert state(store) == {"k": 9, "m0": 9, "m1": 7, "m2": 8}
        info = store.rewind(later[-3].id)
        assert info.extra["reverts"] == [later[-1].id, later[-2].id]
        assert state(store) == {"k": 9, "m0": 6, "m1": 7, "m2": 5}
    with walstore.open(path, durability="none", retain_transactions=5) as store:
        with pytest.raises(walstore.HistoryTrimmed):
            store.at(LSN(old[-1].lsn))
        assert store.get("k") == 9


def test_retention_by_age(path):
    with walstore.open(path, durability="none", retain_seconds=0.3) as store:
        old = [commit(store, None, a=i) for i in range(4)]
        time.sleep(0.4)
        young = [commit(store, None, a=10 + i) for i in range(2)]
        store.checkpoint()
        assert [i.txid for i in store.log()] == [t.id for t in reversed(young)]
        with pytest.raises(walstore.HistoryTrimmed):
            store.at(old[1].id)
        assert store.at(young[0].id).get("a") == 10


def test_default_retention_keeps_everything(path):
    with walstore.open(path, durability="none") as store:
        ts = [commit(store, None, a=i) for i in range(30)]
        store.checkpoint()
        assert len(store.log()) == 30
        assert store.at(ts[0].id).get("a") == 0
        assert len(store.history("a")) == 30


# ---- the command line -----------------------------------------------------------------------
def test_cli_revert_cascade_and_rewind(path):
    with walstore.open(path, durability="none") as store:
        t1 = commit(store, None, a=1)
        t2 = commit(store, None, a=2)
        commit(store, None, b=3)
        p = store.restore_point("mark")
        t4 = commit(store, None, c=4)
        t5 = commit(store, None, d=5)
    runner = CliRunner()
    r = runner.invoke(cli_main, ["rewind", path, "--to", "mark", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reverted"] == [t5.id, t4.id]
    with walstore.open(path, durability="none") as store:
        assert state(store) == {"a": 2, "b": 3}
        rewind_txid = store.log()[0].txid
    r = runner.invoke(cli_main, ["revert", path, str(rewind_txid)])  # undo the rewind
    assert r.exit_code == 0, r.output
    assert str(rewind_txid) in r.output
    with walstore.open(path, durability="none") as store:
        assert state(store) == {"a": 2, "b": 3, "c": 4, "d": 5}
    r = runner.invoke(cli_main, ["revert", path, str(t1.id)])
    assert r.exit_code == 1 and str(t2.id) in r.output
    r = runner.invoke(cli_main, ["revert", path, str(t1.id), "--cascade", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reverted"] == [t2.id, t1.id]
    r = runner.invoke(cli_main, ["revert", path, "999999"])
    assert r.exit_code == 2
    with walstore.open(path, durability="none") as store:
        assert state(store) == {"b": 3, "c": 4, "d": 5}
        newest = store.log()[0].txid
    r = runner.invoke(cli_main, ["rewind", path, "--to", f"lsn:{int(p)}"])
    assert r.exit_code == 0, r.output
    assert "undoing" in r.output
    with walstore.open(path, durability="none") as store:
        assert state(store) == {"a": 2, "b": 3}
        assert newest in store.log()[0].extra["reverts"]
        newest = store.log()[0].txid
    r = runner.invoke(cli_main, ["rewind", path, "--to", str(newest), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["reverted"] == []  # nothing after it
    r = runner.invoke(cli_main, ["rewind", path, "--to", "no-such-point"])
    assert r.exit_code == 2
    r = runner.invoke(cli_main, ["rewind", path])
    assert r.exit_code == 2  # --to is required


def test_cli_revert_and_rewind_run_handlers(path, tmp_path, monkeypatch):
    mod = tmp_path / "ws_hist_handlers.py"
    mod.write_text(
        "import json\n"
        "def refund(action):\n"
        "    with open(action.args['log'], 'a') as f:\n"
        "        f.write(json.dumps([action.id, action.key]) + '\\n')\n"
        "COMPENSATORS = {'refund': refund}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "refunds.jsonl"
    with walstore.open(path, durability="none") as store:
        with store.transaction() as tx:
            with tx.action("charge", args={"log": str(log)}, compensate="refund") as a1:
                pass
            tx.put("x", 1)
        store.restore_point("p")
        with store.transaction() as tx:
            with tx.action("charge", args={"log": str(log)}, compensate="refund") as a2:
                pass
            tx.put("y", 1)
    runner = CliRunner()
    r = runner.invoke(cli_main, ["rewind", path, "--to", "p", "--handlers", "ws_hist_handlers"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_main, ["revert", path, str(a1.txid), "--handlers",
                                 "ws_hist_handlers"])
    assert r.exit_code == 0, r.output
    assert [json.loads(x) for x in log.read_text().splitlines()] == [[a2.id, a2.key],
                                                                      [a1.id, a1.key]]
    r = runner.invoke(cli_main, ["actions", path, "--pending"])
    assert r.exit_code == 0


def test_cli_in_a_real_process_reports_revert_conflict(path):
    with walstore.open(path, durability="none") as store:
        t1 = commit(store, None, a=1)
        t2 = commit(store, None, a=2)
    p = subprocess.run([sys.executable, "-m", "walstore", "revert", path, str(t1.id)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert str(t2.id) in p.stderr


# ---- cost: proportional to what is undone, not to the store's age ---------------------------
class ScanCounter:
    """Counts the LMDB rows walked by the engine's ``state.scan`` (every index walk goes
    there)."""

    def __init__(self, store, monkeypatch) -> None:
        self.rows = 0
        state = store._engine.state
        orig = state.scan

        def counting(*a, **kw):
            for row in orig(*a, **kw):
                self.rows += 1
                yield row
        monkeypatch.setattr(state, "scan", counting)


def big_store(path, n=2000):
    store = walstore.open(path, durability="none")
    for i in range(n):
        with store.transaction() as tx:
            tx.put(f"k{i % 50}", i)
    return store


def test_rewind_of_10_transactions_on_2000_touches_only_those(path, monkeypatch):
    store = big_store(path)
    try:
        rec = Recorder()
        store.compensator("refund")(rec)
        store.restore_point("ten-back")
        ten, owed = [], []
        for i in range(10):
            tx, ids = charged(store, {"i": i}, 1, **{f"r{i}": i, f"k{i}": -i})
            ten.append(tx.id)
            owed += ids
        store.checkpoint()
        n_before = len(store.log())
        counter = ScanCounter(store, monkeypatch)
        monkeypatch.setattr(store, "log", lambda *a, **k: pytest.fail("rewind read the log"))
        info = store.rewind("ten-back")
        assert info.extra["reverts"] == ten[::-1]
        assert counter.rows < 100, counter.rows  # not ~2000 commits or ~4000 versions
        assert rec.ids == owed[::-1]
        monkeypatch.undo()
        assert len(store.log()) == n_before + 1  # exactly one new transaction
        assert [store.get(f"r{i}") for i in range(10)] == [None] * 10
        assert [store.get(f"k{i}") for i in range(10)] == [1950 + i for i in range(10)]
    finally:
        store.close()


def test_revert_of_one_transaction_on_a_long_history_touches_only_its_keys(path, monkeypatch):
    store = big_store(path)
    try:
        t = commit(store, None, fresh=1)
        commit(store, None, later=2)
        store.checkpoint()
        counter = ScanCounter(store, monkeypatch)
        info = store.revert(t.id)
        assert info.extra["reverts"] == [t.id]
        assert counter.rows < 50, counter.rows
    finally:
        store.close()


def test_at_scan_of_a_small_prefix_does_not_walk_all_history(path, monkeypatch):
    store = big_store(path)
    try:
        for i in range(3):
            commit(store, None, **{f"p/{i}": i})
        store.restore_point("p")
        store.checkpoint()
        counter = ScanCounter(store, monkeypatch)
        assert list(store.at("p").scan(prefix="p/")) == [("p/0", 0), ("p/1", 1), ("p/2", 2)]
        assert counter.rows < 100, counter.rows
    finally:
        store.close()
