"""A backup killed mid-way never leaves a DEST that opens as a store (CONTRACT section 3:
``backup PATH DEST  # consistent online copy``; section 4 promise 9: what a store lacks is
refused or reported, never shown as whole).

The backup wrote DEST's STORE file once the WAL was copied, and only then copied the file
content (``files/blobs``): killed in between, it left a DEST that ``walstore.open``
accepted — reads, commits, everything — while the content of its file versions was
missing (only ``verify`` said so; probe-follow45).  Now the copy is made in a staging
directory beside DEST and renamed into place once complete (inside an empty DEST that is
a mount point or whose parent cannot be written, and moved up with STORE last: a mount
point cannot be renamed over): a killed backup leaves no store at DEST, and the next
backup to it removes the staging directory it left.

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
    left = [n for n in os.listdir(tmp_path) if n.startswith("bk.incomplete-backup-")]
    with pytest.raises(walstore.NotAStore):
        walstore.open(dest, readonly=True)
    assert len(left) == 1  # (what the killed backup made: clearly not the backup)

    from walstore.ops.backup import backup
    summary = backup(src, dest)  # the retry: DEST as it was, the leftover swept
    assert summary["dest"] == dest
    assert [n for n in os.listdir(tmp_path) if "incomplete-backup" in n] == []
    assert [n for n in os.listdir(dest) if "incomplete-backup" in n] == []
    from walstore.ops.verify import verify_store
    assert verify_store(dest).ok
    with walstore.open(dest) as copy:
        assert copy.get("k2") == 2
        assert copy.at("end").files(ws).read("f1.txt") == b"version 1\n" * 100



def _mounted_tmpfs(path: str) -> bool:
    """Mount a tmpfs on ``path`` (root with the right to mount only)."""
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "none",
                               path], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.parametrize("case", ["mount-point", "read-only-parent"])
def test_a_backup_into_an_empty_directory_it_cannot_rename_over_is_made_inside_it(
        tmp_path, case):
    """An empty directory given as DEST — a mounted volume's root, or a directory the user
    owns in a parent they may not write — is staged inside, not beside it: a rename over a
    mount point fails (EBUSY; a staging directory beside it lies on the other file
    system: EXDEV), and beside it in a read-only parent nothing can be made at all."""
    src, parent = str(tmp_path / "src"), tmp_path / "parent"
    parent.mkdir()
    dest = str(parent / "bk")
    os.mkdir(dest)
    with walstore.open(src) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.restore_point("end")
    mounted = False
    if case == "mount-point":
        mounted = _mounted_tmpfs(dest)
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (not root, or no right to mount)")
    elif os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    else:
        os.chmod(parent, 0o500)
    try:
        from walstore.ops.backup import backup
        summary = backup(src, dest)
        assert summary["dest"] == dest
        names = os.listdir(dest)
        assert "STORE" in names and not [n for n in names if "incomplete-backup" in n]
        with walstore.open(dest) as copy:
            assert copy.get("k") == 1 and "end" in copy.restore_points()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", dest], capture_output=True, timeout=30)
        os.chmod(parent, 0o700)
