"""Bounded disk and memory for reversible files (probe-bounds).

- A loop of rolled-back file writes: the blobs of their images are collected inline once
  enough were written since the last collection (the checkpoint's own collection is
  skipped whenever a file operation holds the lock, which such a loop nearly always
  does: files/ grew by 1 MiB a rollback, 601 MiB after 600).
- Reading a file whole holds its content once, not twice (chunks then their join: a
  256 MiB read peaked at 512 MiB).
"""
from __future__ import annotations

import os
import tracemalloc

import walstore


def _du(path) -> int:
    return sum(os.lstat(os.path.join(r, f)).st_blocks * 512
               for r, _d, fs in os.walk(path) for f in fs)


def test_rolled_back_writes_do_not_grow_the_content_store_without_bound(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    store = walstore.open(tmp_path / "s", durability="none")
    try:
        ws = store.workspace(root)
        with store.transaction() as tx:
            tx.files(ws).write("f.bin", os.urandom(1 << 20))
        peak = 0
        for i in range(60):
            tx = store.transaction()
            tx.files(ws).write("f.bin", os.urandom(1 << 20))
            tx.rollback()
            if i % 10 == 9:
                store._engine.drain()  # (the applier catching up: the steps are in LMDB)
                peak = max(peak, _du(tmp_path / "s" / "files"))
        # (60 MiB written; collected once 8 MiB were written since the last collection)
        assert peak < 30 << 20, peak >> 20
        with store.transaction() as tx:
            assert len(tx.files(ws).read("f.bin")) == 1 << 20
    finally:
        store.close()


def test_reading_a_large_file_holds_it_once(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    size = 48 << 20
    store = walstore.open(tmp_path / "s", durability="none")
    try:
        ws = store.workspace(root)
        with store.transaction() as tx:
            tx.files(ws).write("big.bin", os.urandom(size))
        point = store.restore_point("p")
        with store.transaction() as tx:
            tx.files(ws).write("big.bin", b"small")
        tracemalloc.start()
        try:
            tx = store.transaction()
            with open(root / "big.bin", "wb") as f:  # (big again, behind the transaction)
                f.write(os.urandom(size))
            tracemalloc.reset_peak()
            data = tx.files(ws).read("big.bin")
            assert len(data) == size
            del data
            _now, peak_tx = tracemalloc.get_traced_memory()
            tx.rollback()
            tracemalloc.reset_peak()
            data = store.at(point).files(ws).read("big.bin")
            assert len(data) == size
            del data
            _now, peak_at = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak_tx < size * 1.3, peak_tx >> 20
        assert peak_at < size * 1.3, peak_at >> 20
    finally:
        store.close()
