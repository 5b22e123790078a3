"""A backup killed mid-way never leaves a DEST that opens as a store (CONTRACT section 3:
``backup PATH DEST  # consistent online copy``; section 4 promise 9: what a store lacks is
refused or reported, never shown as whole).

The backup wrote DEST's STORE file once the WAL was copied, and only then copied the file
content (``files/blobs``): killed in between, it left a DEST that ``walstore.open``
accepted — reads, commits, everything — while the content of its file versions was
missing (only ``verify`` said so; probe-follow45).  Now the copy is made in a staging
directory beside DEST and renamed into place once complete: a killed backup leaves no
DEST, and the next backup to it removes the staging directory it left.

Real processes: the backup runs in a child killed with SIGKILL as it copies the first
blob."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import walstore

from store_support import cli_env

KILLED_IN_THE_BLOBS = r"""
import os, signal, sys
import walstore.ops.backup as b
def killed(*_a, **_k):  # the LMDB copy, the WAL and its STORE done; no blob copied yet
    os.kill(os.getpid(), signal.SIGKILL)
b._copy_blob = killed
b.backup(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("given", ["new", "empty-dir"])
def test_a_backup_killed_copying_file_content_leaves_no_store_at_dest(tmp_path, given):
    src, ws, dest = str(tmp_path / "src"), str(tmp_path / "ws"), str(tmp_path / "bk")
    os.mkdir(ws)
    with walstore.open(src) as s:
        w = s.workspace(ws)
        for i in range(3):
            with s.transaction() as tx:
                tx.files(w).write(f"f{i}.txt", f"version {i}\n" * 100)
                tx.put(f"k{i}", i)
        s.restore_point("end")
    if given == "empty-dir":
        os.mkdir(dest)
    p = subprocess.run([sys.executable, "-c", KILLED_IN_THE_BLOBS, src, dest],
                       env=cli_env(), timeout=120)
    assert p.returncode == -9
    if given == "new":
        assert not os.path.exists(dest)
    else:
        assert os.listdir(dest) == []
    with pytest.raises(walstore.NotAStore):
        walstore.open(dest, readonly=True)
    left = [n for n in os.listdir(tmp_path) if n.startswith("bk.incomplete-backup-")]
    assert len(left) == 1  # (what the killed backup made: clearly not the backup)

    from walstore.ops.backup import backup
    summary = backup(src, dest)  # the retry: DEST as it was, the leftover swept
    assert summary["dest"] == dest
    assert [n for n in os.listdir(tmp_path) if "incomplete-backup" in n] == []
    from walstore.ops.verify import verify_store
    assert verify_store(dest).ok
    with walstore.open(dest) as copy:
        assert copy.get("k2") == 2
        assert copy.at("end").files(ws).read("f1.txt") == b"version 1\n" * 100
