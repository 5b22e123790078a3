"""Damage the store holds evidence of is detected, never taken for a torn tail or read as a
silent prefix (contract section 4 promise 9; issue 11 items 2 and 3).

Evidence: a sealed segment names its successor (a missing newest segment), LMDB's applied
LSN (a log shorter than what LMDB holds), a segment header's recorded size (a truncated
file), the synced LSN in every record (damage in the middle).  Each case: `verify` exits 1,
strict recovery refuses and changes nothing, and read-only commands (get, scan) refuse
rather than show a prefix.  What cannot be detected is listed in docs/FORMAT.md.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli
from walstore.log.segment import list_segments

N = 300


def crashed_store(path: str, segment_size: int = 16384, applied: bool = False) -> None:
    """A writer child commits N transactions, then is killed (no checkpoint)."""
    code = (
        "import os, sys, walstore\n"
        f"s = walstore.open(sys.argv[1], segment_size={segment_size}, checkpoint_bytes=1<<40,"
        f" apply_interval={0.001 if applied else 3600}, apply_batch={1 if applied else 10**6})\n"
        f"for i in range({N}):\n"
        "    with s.transaction() as tx:\n"
        "        tx.put('k%04d' % i, 'v' * 200 + str(i))\n"
        + ("import time; time.sleep(0.5)\n" if applied else "")
        + "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, path], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def digests(root: str) -> dict:
    out = {}
    for d, _dirs, names in os.walk(root):
        for n in names:
            if n in ("LOCK", "lock.mdb"):  # the writer lock's pid, LMDB's reader table
                continue
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def assert_detected(path: str, what: str) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["verify", path])
    assert r.exit_code == 1, (what, r.output)
    before = digests(path)
    with pytest.raises(walstore.CorruptionError):
        walstore.open(path)  # strict recovery refuses ...
    assert digests(path) == before  # ... and changes nothing
    for args in (["get", path, "k0000"], ["scan", path]):  # no silent prefix
        r = runner.invoke(cli, args)
        assert r.exit_code == 1, (what, args, r.output)
        assert "corruption" in r.output or "Corruption" in r.output, r.output


def test_a_deleted_newest_segment_is_detected_by_the_seal_of_the_one_before(tmp_path):
    path = str(tmp_path / "s")
    crashed_store(path)
    segs = list_segments(os.path.join(path, "wal"))
    assert len(segs) >= 3
    os.unlink(segs[-1][1])
    assert_detected(path, "newest segment deleted")


def test_a_deleted_newest_segment_is_detected_by_lmdbs_applied_lsn(tmp_path):
    path = str(tmp_path / "s")
    crashed_store(path, applied=True)
    segs = list_segments(os.path.join(path, "wal"))
    os.unlink(segs[-1][1])
    os.unlink(segs[-2][1])  # (the seal evidence goes too: LMDB's applied LSN remains)
    assert_detected(path, "newest segments deleted")


def test_a_truncated_segment_is_damage_not_a_torn_tail(tmp_path):
    path = str(tmp_path / "s")
    crashed_store(path)
    start, seg = list_segments(os.path.join(path, "wal"))[-1]
    with open(seg, "r+b") as f:
        f.truncate(2000)
    assert_detected(path, "last segment truncated")


def test_a_flipped_byte_mid_wal_is_refused_and_never_read_as_a_prefix(tmp_path):
    path = str(tmp_path / "s")
    crashed_store(path)
    _start, seg = list_segments(os.path.join(path, "wal"))[1]
    with open(seg, "r+b") as f:
        f.seek(3000)
        b = f.read(1)
        f.seek(3000)
        f.write(bytes([b[0] ^ 0x40]))
    assert_detected(path, "a flipped byte in a middle segment")
    # a mode that gives up the damage says what it gave up, and then the store reads whole
    r = CliRunner().invoke(cli, ["recover", path, "--mode", "point-in-time", "--json"])
    assert r.exit_code == 1 and '"given_up_records"' in r.output
    assert CliRunner().invoke(cli, ["verify", path]).exit_code == 0


def test_a_crash_with_an_intact_log_still_reads_whole_from_a_read_only_process(tmp_path):
    """The contrast: no damage, just a crash: read-only readers see every commit."""
    path = str(tmp_path / "s")
    crashed_store(path)
    with walstore.open(path, readonly=True) as r:
        assert len(dict(r.scan())) == N
    assert CliRunner().invoke(cli, ["verify", path]).exit_code == 0


def test_verify_beside_a_live_writer_reports_no_damage(tmp_path):
    """A writer appending (and applying, and checkpointing, which trims the log's head)
    while verify reads: a record caught half copied in, then records written after it,
    reads like damage followed by valid records; a segment trimmed mid-walk leaves older
    values behind.  Verify walks again and keeps only what stays (found by a probe: 7 of 8
    runs reported corruption of a healthy store)."""
    import time
    from walstore.ops.verify import verify_store
    path = str(tmp_path / "s")
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, walstore\n"
         "s = walstore.open(sys.argv[1], segment_size=64 * 1024, checkpoint_bytes=256 * 1024)\n"
         "print('open', flush=True)\n"
         "i = 0\n"
         "while True:\n"
         "    with s.transaction() as tx:\n"
         "        tx.put(f'k{i % 500:04d}', 'x' * 300 + str(i))\n"
         "    i += 1\n", path],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "open"
        time.sleep(0.5)
        reports = [verify_store(path) for _ in range(6)]
    finally:
        child.kill()
        child.wait()
    assert all(r.ok for r in reports), [r.errors[:3] for r in reports if not r.ok]
    assert all(r.records > 0 for r in reports)
