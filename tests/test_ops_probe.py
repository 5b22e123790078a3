"""Operator verbs: what a probe of stop 29 found, each named after the promise it broke
(CONTRACT section 4, promise 9: damage is reported, never a silent prefix)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import walstore
from walstore.ops.backup import backup


def _store_with_a_corrupt_record_then_valid_ones(path: str) -> None:
    """100 commits of n; one byte of an early record flipped (valid records follow it:
    damage, not a torn tail).  No checkpoint may run meanwhile (on a loaded machine one
    rotated the log, and the flipped byte fell past the new segment's last record: a torn
    tail, not damage)."""
    s = walstore.open(path, apply_interval=3600, checkpoint_bytes=1 << 30)
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


def test_the_lmdb_walk_is_pinned_to_a_read_transactions_snapshot(tmp_path):
    """verify read LMDB's pages with no reader slot held, so a live writer recycled pages
    under the walk: 1 run in 20-40 beside a writer reported damage that was not there.
    Now the walk holds a read transaction and reads exactly that snapshot's meta page."""
    from walstore.engine.lmdb_check import SnapshotMissed, walk_lmdb_data_file
    from walstore.engine.lmdb_state import LmdbState
    path = str(tmp_path / "s")
    s = walstore.open(path)
    for i in range(200):
        with s.transaction() as tx:
            tx.put(f"k{i}", "x" * 500)
    s.checkpoint()
    data = os.path.join(path, "db", "data.mdb")
    ro = LmdbState(os.path.join(path, "db"), readonly=True)
    try:
        with ro.read() as txn:
            pinned = txn.id()
            assert walk_lmdb_data_file(data, snapshot=pinned) > 2
            for round_ in range(3):  # LMDB commits T+1, T+2, ...: T's meta page rewritten
                for i in range(50):
                    with s.transaction() as tx:
                        tx.put(f"k{i}", str(round_) * 500)
                s.checkpoint()
            with pytest.raises(SnapshotMissed):
                walk_lmdb_data_file(data, snapshot=pinned)
    finally:
        ro.close()
        s.close()


def test_verify_beside_a_writer_recycling_pages_finds_no_damage(tmp_path):
    from walstore.ops.verify import verify_store
    path = str(tmp_path / "s")
    writer = subprocess.Popen([sys.executable, "-c", """
import sys, walstore
s = walstore.open(sys.argv[1], options=walstore.Options(segment_size=64 * 1024,
                                                          checkpoint_bytes=128 * 1024))
i = 0
while True:
    i += 1
    with s.transaction() as tx:
        tx.put(f"c{i:08d}", {"i": i, "pad": "x" * 1000}); tx.put("head", i)
        tx.put(f"d{i % 500:08d}", i)
""", path], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        import time
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(path, "db", "data.mdb")) \
                or os.path.getsize(os.path.join(path, "db", "data.mdb")) < (4 << 20):
            assert time.time() < deadline and writer.poll() is None
            time.sleep(0.1)
        for _ in range(12):
            rep = verify_store(path)
            assert not [e for e in rep.errors if e.startswith("LMDB")], rep.errors
    finally:
        writer.kill()
        writer.wait()


def test_recovery_over_a_damaged_lmdb_page_is_an_error_never_a_signal(tmp_path):
    """REDO after a crash wrote into a damaged LMDB page and LMDB died of SIGBUS: `walstore
    recover` killed by signal 7, nothing printed (contract 4.9: never a crash)."""
    import shutil
    src = str(tmp_path / "src")
    s = walstore.open(src, options=walstore.Options(segment_size=64 * 1024,
                                                    checkpoint_bytes=10 ** 9))
    for j in range(400):
        with s.transaction() as tx:
            tx.put(f"k{j % 50:03d}", {"j": j, "v": "e" * (j % 30), "b": bytes([j % 256]) * 10})
            if j % 7 == 0:
                tx.delete(f"k{(j + 3) % 50:03d}")
        if j == 200:
            s.checkpoint()
    s._drop_like_a_crash()  # the next open REDOes into LMDB
    pages = os.path.getsize(os.path.join(src, "db", "data.mdb")) // 4096
    refused = 0
    # every page with WALSTORE_SLOW=1; else every third (a `recover` process each)
    stride = 1 if os.environ.get("WALSTORE_SLOW") == "1" else 3
    for p in range(2, pages, stride):
        d = str(tmp_path / f"p{p}")
        shutil.copytree(src, d)
        with open(os.path.join(d, "db", "data.mdb"), "r+b") as f:
            f.seek(p * 4096 + 100)
            f.write(b"\xff" * 40)
        r = _cli("recover", d, "--json")
        assert r.returncode >= 0, f"page {p}: recover killed by signal {-r.returncode}"
        if r.returncode == 1 and "data.mdb" in r.stderr:
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            refused += 1
        shutil.rmtree(d)
    assert refused > 0, (refused, pages)


def test_a_restore_removes_what_killed_restores_left_behind(tmp_path):
    """A restore killed mid-way left its full-size staging directory beside DEST (and its
    fetch directory in /tmp) for good; a successful re-run left them too."""
    import tempfile
    url = f"file://{tmp_path / 'rep'}"
    with walstore.open(str(tmp_path / "src"), replicate_to=url) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    dest = tmp_path / "restored"
    leftovers = [tmp_path / f".restored.restoring-{dead}-abc",
                 pathlib.Path(tempfile.gettempdir()) / f"walstore-restore-{dead}-xyz"]
    alive = tmp_path / f".restored.restoring-{os.getpid()}-live"
    for d in leftovers + [alive]:
        d.mkdir()
        (d / "data").write_bytes(b"x" * 1000)
    walstore.restore(url, str(dest))
    assert [d for d in leftovers if d.exists()] == []
    assert alive.exists()  # (a restore still running in a live process: not ours to take)
    with walstore.open(str(dest)) as r:
        assert r.get("k") == 1


def test_a_cli_put_whose_close_fails_after_the_commit_is_not_reported_failed(tmp_path):
    """`walstore put` on a full disk: the commit landed (the WAL segment is preallocated)
    and the close's apply to LMDB failed; the command said "put failed", exit 1 (the
    contract: an error after the commit point never turns a commit into a failure)."""
    import errno

    from click.testing import CliRunner

    from tools.faults import FaultBackend, installed
    from walstore.cli import main
    path = str(tmp_path / "s")
    walstore.open(path).close()
    fb = FaultBackend()
    # the open writes LMDB once (its open flag); the put's commit waits in the log; the
    # close's apply to LMDB is the next LMDB commit: a full disk from there on
    fb.fail_lmdb("commit", error=errno.ENOSPC, nth=2, times=None)
    with installed(fb):
        r = CliRunner().invoke(main, ["put", path, "k", "1"])
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout.startswith("committed txid")
    assert "closing the store failed" in r.stderr and "stands" in r.stderr
    with walstore.open(path) as s:
        assert s.get("k") == 1


def test_verify_memory_does_not_grow_with_the_values_in_the_log(tmp_path):
    """verify kept every key's last logged value in a dict: its memory grew with the log
    (1.3 GB on a 190 MB log).  It keeps a 16-byte digest per key now."""
    import tracemalloc
    from walstore.ops.verify import verify_store
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40)
    value = "y" * 16000
    for i in range(3000):  # ~48 MB of values in the retained log, all applied
        with s.transaction() as tx:
            tx.put(f"big{i:05d}", value)
    s._engine.drain()
    s._drop_like_a_crash()
    tracemalloc.start()
    try:
        rep = verify_store(path)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rep.ok and rep.keys_checked == 3000, rep
    assert peak < 16 << 20, f"verify peaked at {peak >> 20} MB"


class _FullDisk(walstore.fileio.OSBackend):
    """A destination file system that is full: every write into files under ``root``
    fails with ENOSPC (the source's own writes go through)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: set[int] = set()

    def open(self, path, flags, mode):
        fd = super().open(path, flags, mode)
        if os.path.abspath(path).startswith(self.root):
            self.fds.add(fd)
        return fd

    def pwrite(self, fd, data, offset):
        if fd in self.fds:
            raise OSError(28, os.strerror(28))
        return super().pwrite(fd, data, offset)


@pytest.mark.parametrize("given", ["new", "empty-dir"])
def test_a_backup_to_a_full_disk_names_the_destination_and_leaves_nothing(tmp_path, given):
    """A full destination disk: the error named the source's db directory, and the
    half-made copy stayed, so a retry after freeing space was refused as not empty."""
    from walstore.cli import main
    from click.testing import CliRunner
    src, dest = str(tmp_path / "src"), str(tmp_path / "copy")
    with walstore.open(src) as s:
        for i in range(50):
            with s.transaction() as tx:
                tx.put(f"k{i}", "x" * 1000)
    if given == "empty-dir":
        os.mkdir(dest)
    previous = walstore.fileio.set_backend(_FullDisk(dest))
    try:
        r = CliRunner().invoke(main, ["backup", src, dest])
    finally:
        walstore.fileio.set_backend(previous)
    assert r.exit_code == 1, r.output
    assert dest in r.output and os.path.join(src, "db") not in r.output, r.output
    assert "No space left" in r.output
    if given == "new":
        assert not os.path.exists(dest)
    else:
        assert os.listdir(dest) == []
    assert CliRunner().invoke(main, ["backup", src, dest]).exit_code == 0  # the retry
    with walstore.open(dest) as copy:
        assert copy.get("k49") == "x" * 1000
