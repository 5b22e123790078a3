"""An undo's compensations run exactly once even when a checkpoint trims history while
it runs (probe-undo42: a trim between the undo's retention check and the apply of its
claiming COMMIT deleted the claimed action rows; the revert committed, its key reverted,
and the refund never ran nor stayed owed)."""
from __future__ import annotations

import threading
import time

import walstore
from walstore.agent import undo as undo_module
from walstore.errors import HistoryTrimmed, RevertConflict, UnknownPoint


def _charged_store(path, refunds):
    s = walstore.open(path, compensators={"refund": lambda a: refunds.append(a.key)},
                      retain_transactions=2)
    with s.transaction() as tx:
        tx.put("paid", True)
        with tx.action("charge", compensate="refund") as act:
            pass
    charged = tx.id, act.key
    for i in range(6):  # (enough later transactions for retention to want it gone)
        with s.transaction() as t2:
            t2.put(f"other{i}", i)
    return s, charged


def test_a_trim_between_the_undo_check_and_its_commit_keeps_what_the_undo_claims(
        tmp_path, monkeypatch):
    """The trim forced into the window: the checkpoint runs right after the undo checked
    that what it read is retained."""
    refunds = []
    s, (txid, key) = _charged_store(str(tmp_path / "s"), refunds)
    checked = undo_module.Undo._check_retained

    def check_then_trim(self, plan):
        checked(self, plan)
        s.checkpoint()  # (retention would trim the reverted transaction's rows here)
    monkeypatch.setattr(undo_module.Undo, "_check_retained", check_then_trim)
    info = s.revert(txid)
    monkeypatch.undo()
    assert info is not None and s.get("paid") is None
    assert refunds == [key]  # the refund ran, once
    [row] = [a for a in s.actions() if a.key == key] or [None]
    assert row is None or row.state == "compensated"
    assert s.pending_compensations() == []
    s.checkpoint()  # (after the undo, retention trims as it likes)
    s.close()
    with walstore.open(str(tmp_path / "s"),
                       compensators={"refund": lambda a: refunds.append(a.key)}) as s2:
        assert s2.get("paid") is None and refunds == [key]


def test_reverts_beside_a_thread_that_commits_and_checkpoints_compensate_once(tmp_path):
    """The race as it happens: a writer commits charges and checkpoints every third
    commit (retain_transactions=4) while reverts of recent transactions run."""
    refunds, lock = [], threading.Lock()
    s = walstore.open(str(tmp_path / "s"), retain_transactions=4, compensators={
        "refund": lambda a: (lock.acquire(), refunds.append(a.key), lock.release())})
    done, txs, reverted = threading.Event(), [], []

    def writer():
        i = 0
        while not done.is_set():
            i += 1
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
                with tx.action("charge", compensate="refund") as act:
                    pass
            with lock:
                txs.append((tx.id, act.key))
            if i % 3 == 0:
                s.checkpoint()
    t = threading.Thread(target=writer)
    t.start()
    try:
        end = time.monotonic() + 8  # (until enough reverts went through; a loaded
        while time.monotonic() < end and len(reverted) < 20:  # machine trims most first)
            with lock:
                cands = txs[-7:-1]  # (the oldest of them near the horizon)
            if not cands:
                time.sleep(0.005)
                continue
            txid, key = cands[len(reverted) % len(cands)]
            try:
                if s.revert(txid) is not None:
                    reverted.append(key)
            except (RevertConflict, HistoryTrimmed, UnknownPoint):
                continue
    finally:
        done.set()
        t.join()
    with lock:
        lost = [k for k in reverted if refunds.count(k) != 1]
    s.close()
    assert reverted, "no revert succeeded: the test exercised nothing"
    assert lost == []


def test_an_interrupt_while_the_undo_gives_its_pin_back_leaves_no_pin(tmp_path,
                                                                     monkeypatch):
    """A real SIGINT while the undo waits for the pins' lock, which a checkpoint's trim
    holds: the pin was left behind and retention never trimmed again (review42)."""
    import os
    import signal
    from walstore.agent import retention as ret
    in_lock, go_on = threading.Event(), threading.Event()
    move = ret.Retention._move_horizon

    def slow_move(self, st):  # (a long scan under retain_seconds, say)
        if threading.current_thread().name == "ckpt":
            in_lock.set()
            go_on.wait(5)
        return move(self, st)
    monkeypatch.setattr(ret.Retention, "_move_horizon", slow_move)

    def refund(a):  # runs inside the pin; a checkpoint takes the pins' lock meanwhile
        threading.Thread(target=s.checkpoint, name="ckpt").start()
        in_lock.wait(5)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        threading.Timer(0.8, go_on.set).start()
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refund},
                      retain_transactions=2)
    try:
        with s.transaction() as tx:
            tx.put("paid", True)
            with tx.action("charge", compensate="refund"):
                pass
        for i in range(3):
            with s.transaction() as t2:
                t2.put(f"o{i}", i)
        try:
            s.revert(tx.id)
            time.sleep(1.2)  # (the interrupt lands after the revert, if not in it)
        except KeyboardInterrupt:
            pass
        time.sleep(1.0)
        monkeypatch.setattr(ret.Retention, "_move_horizon", move)
        assert s._engine.history_pins.lowest() is None
        for i in range(20):
            with s.transaction() as t3:
                t3.put(f"n{i}", i)
        s.checkpoint()
        assert len(list(s.log())) <= 3  # retention trims again
    finally:
        s.close()
