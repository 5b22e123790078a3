"""Findings of a probe of two-phase commit (walstore.atomic, resolve_atomic, read-only
handles), each checked against real stores, real files and (for the disk faults) the
fault-injecting file backend of tools/faults.py.

* a failure of the coordinator's decision COMMIT itself (a full disk) left every
  participant prepared in the live process, holding its keys, its charges not refunded;
* resolve_atomic read the coordinator's decision once, then acted: a group committing
  meanwhile ended mixed (the coordinator committed, the participant rolled back);
* ``store.decision(gid)`` on a read-only handle said None for a gid in doubt;
* ``commit_prepared`` on a read-only handle raised AttributeError;
* ``resolve_atomic()`` with no store raised a bare IndexError;
* a CompensationFailed out of ``with walstore.atomic(...)`` did not chain the exception
  that made the group roll back (a plain transaction's does);
* ``tx.commit()`` on a prepared transaction another caller had decided raised UnknownGid
  and left the transaction "active" (left alone at stop 35).
"""
from __future__ import annotations

import errno
import threading

import pytest

import walstore
from tools.faults import FaultBackend, installed


def _pair(tmp_path, compensators=None):
    a = walstore.open(str(tmp_path / "a"), durability="full", compensators=compensators)
    b = walstore.open(str(tmp_path / "b"), durability="full", compensators=compensators)
    return a, b


def test_a_failed_decision_commit_rolls_every_participant_back(tmp_path):
    ledger: list = []
    comps = {"refund": lambda act: ledger.append(("refund", act.key))}
    a, b = _pair(tmp_path, comps)
    try:
        fb = FaultBackend()
        # a's WAL writes: the action's intent and result, the PREPARE, the COMMIT (the
        # decision): the 4th fails (a full disk)
        rule = fb.fail("pwrite", errno.ENOSPC, path=f"{a.path}/wal/0*", nth=4)
        with installed(fb):
            with pytest.raises(walstore.WalWriteError):
                with walstore.atomic(a, b) as (ta, tb):
                    ta.put("a/x", "new")
                    tb.put("b/x", "new")
                    with ta.action("charge", compensate="refund") as act:
                        ledger.append(("charge", act.key))
                        act.result = 1
        assert rule.fired == 1
        # nothing committed: every participant rolled back (compensated), nothing held
        assert ta.state == tb.state == "rolled back"
        assert a.prepared() == [] and b.prepared() == []
        assert [op for op, _ in ledger] == ["charge", "refund"]
        assert a.get("a/x") is None and b.get("b/x") is None
        with a.transaction() as t:  # (held by the prepared group before: ConflictError)
            t.put("a/x", "other")
        with b.transaction() as t:
            t.put("b/x", "other")
        assert walstore.resolve_atomic(a, b) == {}
        a.close()
        b.close()
        a, b = _pair(tmp_path, comps)  # and so it stays
        assert a.get("a/x") == "other" and b.get("b/x") == "other"
        assert a.prepared() == [] and b.prepared() == []
        assert [op for op, _ in ledger] == ["charge", "refund"]
    finally:
        a.close()
        b.close()


def test_resolve_atomic_beside_a_group_committing_meanwhile_never_ends_mixed(tmp_path):
    # the worker's atomic prepares both; resolve_atomic reads the coordinator's decision
    # ("prepared"); the worker's coordinator commits; only then does resolve_atomic act.
    # (The wraps of the stores' own methods only order the two threads.)
    a, b = _pair(tmp_path)
    prepared_both, go, a_committed, resolve_done = (threading.Event() for _ in range(4))
    result: dict = {}

    def worker():
        try:
            with walstore.atomic(a, b) as (ta, tb):
                ta.put("a/x", "new")
                tb.put("b/x", "new")
                real_prepare, real_commit = tb.prepare, tb.commit

                def prepare(gid):
                    real_prepare(gid)
                    prepared_both.set()
                    go.wait(30)

                def commit():
                    a_committed.set()
                    resolve_done.wait(30)
                    return real_commit()
                tb.prepare, tb.commit = prepare, commit
            result["atomic"] = "returned"
        except Exception as e:  # (named in the assertion below)
            result["atomic"] = e

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert prepared_both.wait(30)
        real_decision = a.decision
        calls = []

        def decision(gid):
            d = real_decision(gid)
            if not calls:  # the first read, in doubt; the coordinator commits meanwhile
                calls.append(d)
                go.set()
                assert a_committed.wait(30)
            return d
        a.decision = decision
        try:
            out = walstore.resolve_atomic(a, b)
        finally:
            resolve_done.set()
            t.join(60)
            del a.decision
        assert calls == ["prepared"]
        (gid,) = out
        assert out == {gid: "committed"}
        assert result["atomic"] == "returned"
        assert a.decision(gid) == b.decision(gid) == "commit"
        assert a.get("a/x") == "new" and b.get("b/x") == "new"
        assert a.prepared() == [] and b.prepared() == []
        assert walstore.resolve_atomic(a, b) == {}
    finally:
        go.set()
        resolve_done.set()
        t.join(60)
        a.close()
        b.close()


def test_resolve_atomic_rolls_the_coordinator_back_first_and_the_live_group_follows(
        tmp_path):
    # the other order: resolve_atomic decides the coordinator (rolls it back) while the
    # worker's group sits between its prepares and its decision; the worker's commit
    # then finds the coordinator decided "abort" and rolls its participants back
    refunds: list = []
    a, b = _pair(tmp_path, {"refund": refunds.append})
    prepared_both, go = threading.Event(), threading.Event()
    result: dict = {}

    def worker():
        try:
            with walstore.atomic(a, b) as (ta, tb):
                ta.put("a/x", "new")
                tb.put("b/x", "new")
                with tb.action("charge", compensate="refund") as act:
                    act.result = 1
                real_prepare = tb.prepare

                def prepare(gid):
                    real_prepare(gid)
                    prepared_both.set()
                    go.wait(30)
                tb.prepare = prepare
            result["atomic"] = "returned"
        except Exception as e:
            result["atomic"] = e

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert prepared_both.wait(30)
        out = walstore.resolve_atomic(a, b)
        go.set()
        t.join(60)
        (gid,) = out
        assert out == {gid: "rolled back"}
        assert isinstance(result["atomic"], walstore.WalstoreError)  # (not committed)
        assert a.decision(gid) == b.decision(gid) == "abort"
        assert a.get("a/x") is None and b.get("b/x") is None
        assert a.prepared() == [] and b.prepared() == [] and len(refunds) == 1
    finally:
        go.set()
        t.join(60)
        a.close()
        b.close()


def _writer_with_prepared(path: str):
    """A writer at ``path`` holding transaction ``g`` prepared (it put ``k``)."""
    w = walstore.open(path)
    t = w.transaction()
    t.put("k", 1)
    t.prepare("g")
    return w


def test_decision_on_a_read_only_handle_says_prepared_for_a_gid_in_doubt(tmp_path):
    path = str(tmp_path / "s")
    w = _writer_with_prepared(path)
    with walstore.open(path, readonly=True) as ro:  # beside the writer
        assert ro.prepared() == ["g"]
        assert w.decision("g") == ro.decision("g") == "prepared"
    w.close()
    with walstore.open(path, readonly=True) as ro:  # alone
        assert ro.decision("g") == "prepared"
    w = walstore.open(path)
    w.rollback_prepared("g")
    with walstore.open(path, readonly=True) as ro:
        assert ro.decision("g") == "abort" and ro.decision("other") is None
    w.close()


def test_commit_prepared_on_a_read_only_handle_is_a_read_only_error(tmp_path):
    path = str(tmp_path / "s")
    w = _writer_with_prepared(path)
    try:
        with walstore.open(path, readonly=True) as ro:
            with pytest.raises(walstore.ReadOnlyError, match="read-only"):
                ro.commit_prepared("g")
            with pytest.raises(walstore.ReadOnlyError, match="read-only"):
                ro.rollback_prepared("g")
        assert w.prepared() == ["g"] and w.get("k") is None
    finally:
        w.close()


def test_resolve_atomic_with_no_store_is_a_type_error():
    with pytest.raises(TypeError, match="at least one store"):
        walstore.resolve_atomic()


def test_compensation_failed_out_of_an_atomic_group_chains_the_bodys_error(tmp_path):
    def down(act):
        raise RuntimeError("payments down")
    a, b = _pair(tmp_path, {"r": down})
    try:
        with pytest.raises(walstore.CompensationFailed) as info:
            with walstore.atomic(a, b) as (ta, tb):
                ta.put("x", 1)
                tb.put("x", 1)
                with ta.action("charge", compensate="r") as act:
                    act.result = 1
                raise ValueError("agent gave up")
        assert isinstance(info.value.__cause__, ValueError)
        assert "agent gave up" in str(info.value)
        assert ta.state == tb.state == "rolled back"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("decided", ["commit", "rollback"])
def test_commit_of_a_prepared_transaction_another_caller_decided_says_how_it_ended(
        tmp_path, decided):
    """``store.commit_prepared`` / ``rollback_prepared`` (as ``resolve_atomic`` does)
    decides a transaction whose owner still holds it; the owner's ``commit()`` then
    raises UnknownGid saying how it ended, and the transaction reads so (it read
    "active", and a later ``rollback()`` raised UnknownGid again)."""
    refunds = []
    s = walstore.open(str(tmp_path / "s"), durability="full",
                      compensators={"refund": lambda a: refunds.append(a.id)})
    try:
        tx = s.transaction()
        tx.put("order/1", "charged")
        with tx.action("charge", compensate="refund"):
            pass
        tx.prepare("g1")
        getattr(s, f"{decided}_prepared")("g1")
        with pytest.raises(walstore.UnknownGid) as e:
            tx.commit()
        ended = "committed" if decided == "commit" else "rolled back"
        assert tx.state == ended and ended in str(e.value)
        assert (s.get("order/1") == "charged") == (decided == "commit")
        assert refunds == ([] if decided == "commit" else [s.actions()[0].id])
        if decided == "commit":
            assert tx.lsn is not None and tx.lsn == s.log()[0].lsn
        with pytest.raises(walstore.TransactionClosed):
            tx.rollback()
    finally:
        s.close()


def test_an_interrupt_after_the_prepare_was_logged_leaves_the_transaction_prepared(tmp_path):
    """An interrupt (Ctrl-C) landing after ``tx.prepare``'s PREPARE record was logged, in
    the wait for its fsync: the transaction IS prepared.  It was left looking unprepared
    (no gid), so its rollback wrote a plain ABORT while the gid stayed prepared in the
    store, holding its keys, until a resolve_atomic or a reopen (noticed by the fixer of
    probe-atomic's findings).  Now its gid is set and its rollback decides the gid."""
    s = walstore.open(str(tmp_path / "s"), durability="full")
    try:
        tx = s.transaction()
        tx.put("k", 1)
        journal = s._engine.journal
        real = journal.force_durable

        def interrupted(*a, **kw):
            real(*a, **kw)
            raise KeyboardInterrupt
        journal.force_durable = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                tx.prepare("g1")
        finally:
            del journal.force_durable
        assert tx.gid == "g1" and s.prepared() == ["g1"]
        tx.rollback()
        assert s.prepared() == [] and s.decision("g1") == "abort"
        with s.transaction() as t2:  # (its key is free)
            t2.put("k", 2)
        assert s.get("k") == 2
    finally:
        s.close()
