"""A transaction's end is decided once: a commit() in one thread and a rollback() (or the
store's close(), which rolls back open transactions) in another never both succeed.

Before: ``rollback()`` only refused a transaction past its commit's point of no return; a
rollback while another thread's ``commit()`` was in flight logged the ABORT and ran the
compensation (the refund), then the COMMIT landed and ``commit()`` returned: after reopen
the key was committed, the action read "compensated" and the world was refunded (a probe:
70 of 100 trials of a plain commit/rollback race; 58 of 80 of close() racing commits).
Now ``commit``/``rollback``/``prepare``/``rollback_to`` and close()'s rollback hold the
transaction's end lock while they decide: the second caller waits and gets
TransactionClosed naming how it ended.  Each test checks that state, action states and a
compensation ledger agree, in the process and after reopening.
"""
from __future__ import annotations

import random
import threading
import time
import warnings

import pytest

import walstore


class Ledger:
    """The outside world: charges made in actions, refunds made by the compensator."""

    def __init__(self):
        self.lock = threading.Lock()
        self.charges: list[str] = []
        self.refunds: list[str] = []

    def charge(self, key):
        with self.lock:
            self.charges.append(key)

    def compensators(self):
        def refund(action):
            with self.lock:
                self.refunds.append(action.key)
        return {"refund": refund}


def _charged_tx(s, ledger, n=0):
    tx = s.transaction()
    with tx.action("charge", args=n, compensate="refund") as act:
        ledger.charge(act.key)
    tx.put(f"bal/{act.key}", n)
    return tx, act.key


def _check_agree(path, ledger, acked=()):
    """Reopen: each charge is in state (action committed, never refunded) or refunded
    exactly once (action compensated, not in state); acknowledged commits stand."""
    s = walstore.open(path, compensators=ledger.compensators())
    try:
        assert s.pending_compensations() == []
        acts = {a.key: a for a in s.actions()}
        for key in ledger.charges:
            present = s.get(f"bal/{key}") is not None
            n = ledger.refunds.count(key)
            assert n <= 1, f"{key} refunded {n} times"
            if present:
                assert n == 0, f"{key}: committed in state, yet refunded"
                assert acts[key].state == "committed", (key, acts[key].state)
            else:
                assert n == 1, f"{key}: neither committed nor refunded"
                assert acts[key].state == "compensated", (key, acts[key].state)
        for key in acked:
            assert s.get(f"bal/{key}") is not None, f"acknowledged commit of {key} lost"
    finally:
        s.close()


def _park_pipeline(s, name):
    """Hold every call of the pipeline's ``name`` (commit, prepare) until ``release``."""
    pipeline = s._engine.pipeline
    orig = getattr(pipeline, name)
    inside, release = threading.Event(), threading.Event()

    def parked(*a, **kw):
        inside.set()
        assert release.wait(10)
        return orig(*a, **kw)
    setattr(pipeline, name, parked)
    return inside, release


def _run(fn, out, name):
    def body():
        try:
            fn()
            out[name] = "ok"
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            out[name] = e
    t = threading.Thread(target=body)
    t.start()
    return t


def test_rollback_during_a_commit_in_flight_waits_and_is_refused(tmp_path):
    ledger = Ledger()
    path = str(tmp_path / "s")
    s = walstore.open(path, compensators=ledger.compensators())
    tx, key = _charged_tx(s, ledger)
    inside, release = _park_pipeline(s, "commit")
    out = {}
    committer = _run(tx.commit, out, "commit")
    assert inside.wait(10)  # the commit request is in the pipeline, not yet committed
    roller = _run(tx.rollback, out, "rollback")
    roller.join(0.3)  # (before the fix: it logged the ABORT and refunded meanwhile)
    release.set()
    committer.join(10)
    roller.join(10)
    assert out["commit"] == "ok"
    assert isinstance(out["rollback"], walstore.TransactionClosed), out["rollback"]
    assert "committed" in str(out["rollback"])
    assert ledger.refunds == []
    assert tx.state == "committed" and s.get(f"bal/{key}") == 0
    assert [a.state for a in s.actions()] == ["committed"]
    s.close()
    _check_agree(path, ledger, acked=[key])


def test_close_during_a_commit_in_flight_waits_for_it(tmp_path):
    """The transaction was begun by a thread that has ended (close() rolls such back)
    and is committed by a worker while close() runs."""
    ledger = Ledger()
    path = str(tmp_path / "s")
    s = walstore.open(path, compensators=ledger.compensators())
    box = []
    t = threading.Thread(target=lambda: box.append(_charged_tx(s, ledger)))
    t.start()
    t.join()
    (tx, key), = box
    inside, release = _park_pipeline(s, "commit")
    out = {}
    committer = _run(tx.commit, out, "commit")
    assert inside.wait(10)
    orig_wait = s._wait_for_work_elsewhere

    def after_rollbacks():  # (close() has rolled back what it rolls back: let the commit go)
        release.set()
        committer.join(10)
        orig_wait()
    s._wait_for_work_elsewhere = after_rollbacks
    closer = _run(s.close, out, "close")
    closer.join(0.5)  # (the fixed close() waits for the commit in flight: let it go now)
    release.set()
    closer.join(10)
    committer.join(10)
    assert out["close"] == "ok", out["close"]
    assert out["commit"] == "ok", out["commit"]
    assert ledger.refunds == [], "close() refunded a charge whose commit() returned"
    _check_agree(path, ledger, acked=[key])


def test_a_commit_that_loses_to_close_raises_and_compensates_once(tmp_path):
    ledger = Ledger()
    path = str(tmp_path / "s")
    s = walstore.open(path, compensators=ledger.compensators())
    tx, key = _charged_tx(s, ledger)  # begun by the closing thread
    s.close()
    assert ledger.refunds == [key]
    with pytest.raises(walstore.StoreClosed, match=r"close\(\)"):
        tx.commit()
    with pytest.raises(walstore.TransactionClosed):
        tx.rollback()
    assert ledger.refunds == [key]
    _check_agree(path, ledger)
    assert ledger.refunds == [key]


def test_prepare_in_flight_is_not_rolled_back_under(tmp_path):
    """A rollback() from another thread while prepare() is logging the PREPARE waits for
    it, then rolls back the prepared transaction (ROLLBACK_PREPARED), compensating once."""
    ledger = Ledger()
    path = str(tmp_path / "s")
    s = walstore.open(path, compensators=ledger.compensators())
    tx, key = _charged_tx(s, ledger)
    inside, release = _park_pipeline(s, "prepare")
    out = {}
    preparer = _run(lambda: tx.prepare("g-1"), out, "prepare")
    assert inside.wait(10)
    roller = _run(tx.rollback, out, "rollback")
    roller.join(0.3)
    release.set()
    preparer.join(10)
    roller.join(10)
    assert out["prepare"] == "ok", out["prepare"]
    assert out["rollback"] == "ok", out["rollback"]
    assert tx.state == "rolled back"
    assert s.prepared() == []
    assert ledger.refunds == [key]
    s.close()
    _check_agree(path, ledger)


def test_commit_versus_rollback_race(tmp_path):
    """Real threads, no hooks: exactly one of commit() and rollback() succeeds."""
    rnd = random.Random(7)
    for i in range(60):
        ledger = Ledger()
        path = str(tmp_path / f"s{i}")
        s = walstore.open(path, compensators=ledger.compensators(), durability="none")
        tx, key = _charged_tx(s, ledger)
        out = {}
        go = threading.Barrier(2)
        delay = rnd.random() * 0.0005

        def commit():
            go.wait()
            tx.commit()

        def rollback():
            go.wait()
            time.sleep(delay)
            tx.rollback()
        ts = [_run(commit, out, "commit"), _run(rollback, out, "rollback")]
        for t in ts:
            t.join(10)
        oks = [k for k, v in out.items() if v == "ok"]
        assert len(oks) == 1, (i, out)
        other = out["rollback" if oks == ["commit"] else "commit"]
        assert isinstance(other, walstore.TransactionClosed), (i, out)
        assert (ledger.refunds == []) == (oks == ["commit"]), (i, out, ledger.refunds)
        s.close()
        _check_agree(path, ledger, acked=[key] if oks == ["commit"] else [])


def test_close_versus_commits_race(tmp_path):
    """Real threads and a real close(): transactions begun by an ended thread (or by the
    closing thread), committed by workers while close() rolls back open transactions."""
    rnd = random.Random(11)
    for i in range(24):
        ledger = Ledger()
        path = str(tmp_path / f"s{i}")
        s = walstore.open(path, compensators=ledger.compensators(), durability="none")
        txs = []

        def begin():
            for n in range(6):
                txs.append(_charged_tx(s, ledger, n))
        if i % 2:
            begin()
        else:
            t = threading.Thread(target=begin)
            t.start()
            t.join()
        go = threading.Barrier(len(txs) + 1)
        out = {}

        def commit(tx, key, pause):
            go.wait()
            time.sleep(pause)
            try:
                tx.commit()
                out[key] = "ok"
            except walstore.StoreClosed as e:  # (TransactionClosed too)
                out[key] = e
        ws = [threading.Thread(target=commit, args=(tx, key, rnd.random() * 0.002))
              for tx, key in txs]
        for w in ws:
            w.start()
        go.wait()
        time.sleep(rnd.random() * 0.002)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s.close()
        for w in ws:
            w.join(10)
        acked = [k for k, v in out.items() if v == "ok"]
        for k in acked:
            assert k not in ledger.refunds, f"trial {i}: commit of {k} returned, yet refunded"
        _check_agree(path, ledger, acked=acked)
