"""Adversarial audit of reversible files (audit 53): what the stop-50 audit did not cover.

- ``store.at(point).files(ws).stream(p)`` of a path walstore never changed (read as it is
  now), or one only a transaction that has not ended changed (its before-image), read
  the whole file into memory (it fell back to ``read``): a GiB file cost a GiB, where
  the contract streams large files.  And a before-image missing from the content store
  escaped ``stream`` as a bare FileNotFoundError where ``read`` says CorruptionError.
"""
from __future__ import annotations

import glob
import os
import tracemalloc

import pytest

import walstore

from files_support import build

BIG = 64 << 20  # a sparse file: its holes cost no disk, but read whole it costs 64 MiB


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "ws"
    build(str(root), {"a.txt": "aaa\n", "d/x": "x\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        yield store, str(root)
    finally:
        store.close()


def _peak_of_stream(view, path: str) -> tuple[int, int]:
    """(bytes streamed, peak traced memory while streaming them)."""
    tracemalloc.start()
    try:
        n = 0
        for chunk in view.stream(path):
            n += len(chunk)
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stream_of_a_file_walstore_never_changed_is_not_read_whole(env):
    store, root = env
    with open(os.path.join(root, "big"), "wb") as f:
        f.truncate(BIG)
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a.txt", "b\n")
    n, peak = _peak_of_stream(store.at(tx.id).files(ws), "big")
    assert n == BIG
    assert peak < 16 << 20, f"streaming held {peak >> 20} MiB"


def test_stream_of_a_file_an_open_transaction_changed_is_not_read_whole(env):
    store, root = env
    with open(os.path.join(root, "big"), "wb") as f:
        f.truncate(BIG)
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a.txt", "b\n")
    point = tx.id
    open_tx = store.transaction()
    try:
        open_tx.files(ws).write("big", "small now\n")  # uncommitted: the point reads
        view = store.at(point).files(ws)              # its before-image
        assert view.entry("big").size == BIG
        n, peak = _peak_of_stream(view, "big")
        assert n == BIG
        assert peak < 16 << 20, f"streaming held {peak >> 20} MiB"
    finally:
        open_tx.rollback()


def test_stream_of_content_missing_from_the_store_is_a_corruption_error(env, tmp_path):
    store, root = env
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a.txt", "walstore's own\n")
    for blob in glob.glob(str(tmp_path / "store" / "files" / "blobs" / "??" / "*")):
        os.unlink(blob)
    view = store.at(tx.id).files(ws)
    with pytest.raises(walstore.CorruptionError):
        view.read("a.txt")
    with pytest.raises(walstore.CorruptionError) as info:
        list(view.stream("a.txt"))
    assert "a.txt" in str(info.value)
