"""The "normal" mode's bound on what a power loss may lose, and errors while closing.

README, "Durability": under ``durability="normal"`` a flusher thread starts an fdatasync
every half ``sync_interval``, so a commit is on stable storage within ``sync_interval`` of
its acknowledgement while one fdatasync takes at most half of it.  It used to wait a whole
interval after each sync *returned*: the bound was the interval plus one or two fsyncs'
time (a probe measured 0.26-0.33 s of commits exposed under a documented 0.2 s).
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402
from walstore.log import segment  # noqa: E402


def test_normal_mode_starts_its_syncs_on_a_cadence_not_after_each_slow_one(tmp_path, monkeypatch):
    """A slow disk (each fdatasync takes 0.15 s, interval 0.4 s): syncs start every ~0.2 s
    from the previous start, not 0.4 s after the previous one ended (0.55 s apart)."""
    starts: list[float] = []
    real_sync = segment.SegmentWriter.sync

    def slow_sync(self):
        starts.append(time.monotonic())
        time.sleep(0.15)
        real_sync(self)

    monkeypatch.setattr(segment.SegmentWriter, "sync", slow_sync)
    store = walstore.open(tmp_path / "s", durability="normal", sync_interval=0.4)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            store.transaction().put(f"k{i % 50}", i)  # (an open transaction: dropped)
            with store.transaction() as tx:
                tx.put(f"k{i % 50}", i)
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(2.5)
    finally:
        stop.set()
        t.join()
    flusher = [b - a for a, b in zip(starts, starts[1:])]
    store.close()
    assert len(flusher) >= 3, starts
    # (a commit acknowledged just after a sync started is covered by the next one:
    # exposed at most one gap plus one sync, 0.2 + 0.15 < 0.4; before, 0.55 + 0.15)
    assert statistics.median(flusher) < 0.33, flusher


def test_an_idle_store_syncs_its_last_commit_within_the_interval(tmp_path):
    store = walstore.open(tmp_path / "s", durability="normal", sync_interval=0.3)
    try:
        with store.transaction() as tx:
            tx.put("k", 1)
        acked = tx.lsn
        wal = store._engine.wal
        t0 = time.monotonic()
        while wal.synced_lsn < acked and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        assert wal.synced_lsn >= acked
        assert time.monotonic() - t0 < 0.3 + 0.25  # (slack for a loaded machine)
    finally:
        store.close()


def test_an_lmdb_io_error_while_closing_is_a_store_io_error_and_loses_nothing(tmp_path):
    """README, "Errors": errors while opening, checkpointing or closing are StoreIOError
    (an OSError with errno); it was the engine's internal StateWriteError, no errno."""
    path = tmp_path / "s"
    store = walstore.open(path, durability="normal", sync_interval=60, apply_interval=3600)
    fb = FaultBackend()
    with installed(fb):
        for i in range(30):
            with store.transaction() as tx:
                tx.put(f"k{i}", i)
        fb.fail_lmdb("commit", times=None)
        with pytest.raises(walstore.StoreIOError) as info:
            store.close()
    assert info.value.errno is not None and "closing" in str(info.value)
    assert isinstance(info.value, walstore.WalstoreError)
    with walstore.open(path) as again:  # released, and every commit recovered
        assert [again.get(f"k{i}") for i in range(30)] == list(range(30))
