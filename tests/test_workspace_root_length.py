"""A workspace root is the ``workspaces`` table's LMDB key (and part of every file-history
key): one longer than LMDB's 511-byte key limit was registered (its WORKSPACE record
durable, the call returned), then the apply failed with MDB_BAD_VALSIZE, and so did every
later open of the store.  It is refused at the call now, before anything is logged."""
from __future__ import annotations

import os

import pytest

import walstore
from walstore.files.paths import MAX_ROOT_AND_PATH_BYTES


def _deep_dir(base: str, length: int) -> str:
    root = base
    while len(os.fsencode(root)) < length:
        root = os.path.join(root, "d" * min(60, max(1, length - len(root) - 1)))
    os.makedirs(root)
    return root


def test_a_root_past_the_key_limit_is_refused_and_the_store_still_opens(tmp_path):
    root = _deep_dir(str(tmp_path / "w"), 600)
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with pytest.raises(ValueError, match="workspace root"):
            s.workspace(root)
        with s.transaction() as tx:
            tx.put("k", 1)
    with walstore.open(path) as s:  # (failed: MDB_BAD_VALSIZE on every open)
        assert s.get("k") == 1


def test_a_root_with_room_for_a_path_is_registered(tmp_path):
    base = str(tmp_path / "w")
    root = _deep_dir(base, MAX_ROOT_AND_PATH_BYTES - 40)
    assert len(os.fsencode(os.path.realpath(root))) + 1 <= MAX_ROOT_AND_PATH_BYTES
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        ws = s.workspace(root)
        assert ws.root_b == os.fsencode(os.path.realpath(root))
    with walstore.open(path) as s:
        assert s.workspace(root).root_b == os.fsencode(os.path.realpath(root))
