"""Operator verbs: what a probe of stop 29 found, each named after the promise it broke
(CONTRACT section 4, promise 9: damage is reported, never a silent prefix)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import walstore
from walstore.ops.backup import backup


def _store_with_a_corrupt_record_then_valid_ones(path: str) -> None:
    """100 commits of n; one byte of an early record flipped (valid records follow it:
    damage, not a torn tail)."""
    s = walstore.open(path)
    for j in range(1, 101):
        with s.transaction() as tx:
            tx.put("n", j)
    s._drop_like_a_crash()  # (LMDB not applied: the log holds the commits)
    seg = sorted(f for f in os.listdir(os.path.join(path, "wal")) if f.endswith(".wal"))[-1]
    with open(os.path.join(path, "wal", seg), "r+b") as f:
        f.seek(300)
        b = f.read(1)
        f.seek(300)
        f.write(bytes([b[0] ^ 0x5A]))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from walstore.cli import main; "
                           "sys.argv[0] = 'walstore'; main()", *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_backup_refuses_a_log_with_damage_instead_of_copying_a_silent_prefix(tmp_path):
    """The copy's log ended at the damage: it verified clean and opened with n = 3, the
    97 commits behind the damage gone, nothing said."""
    src, dest = str(tmp_path / "src"), str(tmp_path / "bk")
    _store_with_a_corrupt_record_then_valid_ones(src)
    with pytest.raises(walstore.CorruptionError, match="valid record at LSN"):
        backup(src, dest)
    assert not os.path.exists(dest)  # nothing left that looks like a copy
    r = _cli("backup", src, dest)
    assert r.returncode == 1 and "refused" in r.stderr and len(r.stderr.splitlines()) == 1


def test_backup_names_a_missing_oldest_segment_instead_of_blaming_a_race(tmp_path):
    src = str(tmp_path / "src")
    s = walstore.open(src, options=walstore.Options(segment_size=16 * 1024,
                                                    checkpoint_bytes=10 ** 9))
    for j in range(300):
        with s.transaction() as tx:
            tx.put(f"k{j % 40}", {"j": j, "x": "y" * 50})
    s._drop_like_a_crash()
    wal = os.path.join(src, "wal")
    os.remove(os.path.join(wal, sorted(f for f in os.listdir(wal) if f.endswith(".wal"))[0]))
    with pytest.raises(walstore.CorruptionError, match="the WAL begins at LSN"):
        backup(src, str(tmp_path / "bk"))


def test_replicate_refuses_to_ship_past_damage_and_says_so(tmp_path):
    """`replicate --once` shipped the prefix before the damage and exited 0; a restore
    then verified clean with n = 3."""
    src = str(tmp_path / "src")
    _store_with_a_corrupt_record_then_valid_ones(src)
    r = _cli("replicate", src, f"file://{tmp_path / 'rep'}", "--once")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "damaged" in r.stderr and "valid record at LSN" in r.stderr
