"""close() while other threads are still at work: closers take turns, and a call that has
committed finishes before the log closes (found by a probe of close() under concurrent use;
each test fails on the code before).

- four threads calling close() at once: three of them got WalWriteError / StateWriteError
  / a raw OSError EBADF (each ran the checkpoint while another closed the files under it);
- a revert, rewind or purge racing close(): committed, then raised StoreClosed from its
  compensation or erasure phase (its caller believed nothing happened);
- a compensation running in another thread when close() came: its outcome could not be
  recorded, so the next open ran the compensator a second time.
"""
from __future__ import annotations

import threading
import time

import pytest

import walstore


def test_threads_closing_at_once_all_return_quietly(tmp_path):
    for run in range(5):
        path = str(tmp_path / f"s{run}")
        s = walstore.open(path, durability="none")
        for i in range(200):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        barrier, results = threading.Barrier(4), []

        def close():
            barrier.wait()
            try:
                s.close()
                results.append("ok")
            except Exception as e:  # noqa: BLE001 - what the test looks for
                results.append(f"{type(e).__name__}: {e}")
        threads = [threading.Thread(target=close) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == ["ok"] * 4
        s = walstore.open(path)
        assert s.get("k199") == 199
        s.close()


@pytest.mark.parametrize("how", ["rollback", "revert"])
def test_close_lets_a_running_compensation_finish_and_record_it(tmp_path, how):
    path = str(tmp_path / "s")
    ran, started = [], threading.Event()

    def refund(action):
        started.set()
        time.sleep(0.3)
        ran.append(action.id)
    s = walstore.open(path, compensators={"refund": refund})
    if how == "revert":
        with s.transaction() as tx:
            tx.put("x", 1)
            with tx.action("charge", compensate="refund") as act:
                act.result = 1
    out = {}

    def worker():
        try:
            if how == "revert":
                out["r"] = s.revert(tx.id)
            else:
                with s.transaction() as t2:
                    t2.put("x", 1)
                    with t2.action("charge", compensate="refund") as act:
                        act.result = 1
                    raise RuntimeError("the agent failed")
        except BaseException as e:  # noqa: BLE001
            out["r"] = e
    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(10)
    s.close()
    t.join(30)
    if how == "revert":
        assert isinstance(out["r"], walstore.TxnInfo), out["r"]  # (committed: no error)
    else:
        assert isinstance(out["r"], RuntimeError), out["r"]
    s = walstore.open(path, compensators={"refund": refund})
    assert len(ran) == 1, ran  # once: recorded before the log closed, not run again
    assert [a.state for a in s.actions()] == ["compensated"]
    assert s.get("x") is None
    s.close()


@pytest.mark.parametrize("call", ["rewind", "purge"])
def test_a_rewind_or_purge_racing_close_returns_once_it_committed(tmp_path, monkeypatch, call):
    """close() comes while the call works after its commit (a compensator runs; the purge
    drains before its erasure)."""
    path = str(tmp_path / "s")
    busy = threading.Event()

    def refund(action):
        busy.set()
        time.sleep(0.3)
    s = walstore.open(path, durability="none", compensators={"refund": refund})
    s.restore_point("start")
    for i in range(50):
        with s.transaction() as tx:
            tx.put(f"p/{i:04d}", i)
    with s.transaction() as tx:
        with tx.action("charge", compensate="refund"):
            pass
    if call == "purge":
        eng = s._engine
        real_drain = eng.drain

        def slow_drain():  # (the purge committed: its erasure is next)
            busy.set()
            time.sleep(0.3)
            real_drain()
        monkeypatch.setattr(eng, "drain", slow_drain)
    out = {}

    def work():
        try:
            out["r"] = s.rewind("start") if call == "rewind" else s.purge("p/")
        except BaseException as e:  # noqa: BLE001
            out["r"] = e
    t = threading.Thread(target=work)
    t.start()
    assert busy.wait(10)
    s.close()
    t.join(30)
    assert not isinstance(out["r"], BaseException), out["r"]
    monkeypatch.undo()
    s = walstore.open(path, compensators={"refund": lambda a: None})
    assert s.get("p/0049") is None and s.pending_compensations() == []
    s.close()


def test_a_transaction_or_view_keeps_its_store_open_while_it_is_used(tmp_path):
    """A store the program dropped was closed by its __del__ under a transaction or an
    at() view still in use (their next call raised StoreClosed; an open action would have
    been compensated): they keep it open now, as a sqlite3 cursor keeps its connection,
    and a finished transaction lets it go."""
    import gc
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)

    def begin():
        return walstore.open(path).transaction()  # (a helper that opens and begins)
    tx = begin()
    gc.collect()
    tx.put("b", 2)
    tx.commit()
    del tx
    gc.collect()  # (finished: the store is let go, and closed)
    view = walstore.open(path).at(1)
    gc.collect()
    assert view.get("a") == 1 and view.get("b") is None
    del view
    gc.collect()
    s = walstore.open(path)
    assert s.get("b") == 2
    s.close()


def test_a_closed_stores_iterators_and_views_stop_though_a_read_only_handle_stays(tmp_path):
    """With a read-only handle of the same store open in the process (one shared LMDB
    environment), the closed writer's scan iterators, at() views and refresh() went on
    reading instead of raising StoreClosed."""
    path = str(tmp_path / "s")
    w = walstore.open(path, durability="none")
    with w.transaction() as tx:
        for i in range(3000):
            tx.put(f"k/{i:05d}", i)
    w.checkpoint()
    r = walstore.open(path, readonly=True)
    it1 = w.transaction().scan(prefix="k/")
    next(it1)
    view = w.at(1)
    it2 = view.scan(prefix="k/")
    next(it2)
    w.close()
    for use in (lambda: sum(1 for _ in it1), lambda: sum(1 for _ in it2),
                lambda: view.get("k/00005"), lambda: list(view.scan(prefix="k/")),
                w.refresh, lambda: w.get("k/00001")):
        with pytest.raises(walstore.StoreClosed):
            use()
    assert r.get("k/02999") == 2999  # (the other handle reads on)
    r.close()
