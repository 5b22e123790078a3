"""A restore into an empty mounted volume's root (CONTRACT "Replication": ``restore``
rebuilds a store at DEST; "Errors": no foreign exception type escapes the public API).

``walstore.restore`` built its copy beside DEST and renamed it over DEST: over a mount
point the rename fails (EBUSY), and a raw ``OSError`` escaped after the whole download.
Now an empty DEST that is a mount point (or whose parent cannot be written) is staged
inside and moved up, STORE last, under a lock of DEST (``fileio.move_up``); a restore
killed before the move leaves a staging directory inside DEST that the next restore
sweeps.  (The backup's same case: tests/test_backup_killed.py.)  Needs the right to
mount a tmpfs (root): skipped elsewhere."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import walstore

from store_support import cli_env


def _tmpfs(path, size: str):
    """A tmpfs of ``size`` mounted on the new directory ``path`` for the test's length
    (root with the right to mount only: skipped elsewhere)."""
    path.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(path)],
                            capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        pytest.skip("cannot mount a tmpfs here (not root, or no right to mount)")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def mount_point(tmp_path):
    yield from _tmpfs(tmp_path / "vol", "64m")


def _replica(tmp_path) -> str:
    url = f"file://{tmp_path}/replica"
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options={"interval": 0.05}) as s:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.restore_point("end")
        s.sync_replica(timeout=30)
    return url


KILLED_AT_INSTALL = r"""
import os, signal, sys
from walstore import fileio
class Killed(fileio.OSBackend):
    def fault_point(self, name):
        if name == "restore.install":
            os.kill(os.getpid(), signal.SIGKILL)
fileio.set_backend(Killed())
import walstore
walstore.restore(sys.argv[1], sys.argv[2])
"""


def test_a_restore_into_an_empty_mount_point_is_made_inside_it(tmp_path, mount_point):
    url = _replica(tmp_path)
    p = subprocess.run([sys.executable, "-c", KILLED_AT_INSTALL, url, mount_point],
                       env=cli_env(), timeout=120)
    assert p.returncode == -signal.SIGKILL
    left = os.listdir(mount_point)
    assert len(left) == 1 and ".restoring-" in left[0]  # (staged inside; nothing moved)
    with pytest.raises(walstore.NotAStore):
        walstore.open(mount_point, readonly=True)

    summary = walstore.restore(url, mount_point)  # (the killed one's staging swept)
    assert summary["dest"] == mount_point
    names = os.listdir(mount_point)
    assert "STORE" in names and not [n for n in names if ".restoring-" in n]
    with walstore.open(mount_point) as copy:
        assert [copy.get(f"k{i}") for i in range(5)] == list(range(5))
        assert "end" in copy.restore_points()
    with pytest.raises(walstore.ReplicationError, match="not empty"):
        walstore.restore(url, mount_point)  # (a store there now: refused, untouched)


@pytest.fixture
def small_volume(tmp_path):
    yield from _tmpfs(tmp_path / "small", "600k")


def test_a_restore_or_backup_onto_a_full_disk_raises_a_store_error_and_leaves_nothing(
        tmp_path, small_volume):
    """A restore filling its disk let a raw ``OSError`` (ENOSPC) out of
    ``walstore.restore``; now a ``StoreIOError`` (also an OSError), the cause chained, and
    no staging directory left behind.  A backup already said so."""
    url = f"file://{tmp_path}/replica"
    src = str(tmp_path / "src")
    with walstore.open(src, replicate_to=url, replicate_options={"interval": 0.05}) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"k{i}", os.urandom(4000))
        s.sync_replica(timeout=30)
    with pytest.raises(walstore.StoreIOError) as got:
        walstore.restore(url, os.path.join(small_volume, "dest"))
    assert got.value.errno == 28 and isinstance(got.value.__cause__, OSError)
    assert os.listdir(small_volume) == []
    from walstore.ops.backup import backup
    with pytest.raises(walstore.StoreIOError):
        backup(src, os.path.join(small_volume, "bk"))
    assert os.listdir(small_volume) == []
