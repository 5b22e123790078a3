"""Copies of a damaged store: ``walstore backup`` and ``walstore replicate`` refuse a log
``walstore verify`` calls damaged, naming the damage (CONTRACT section 4, promise 9: a
truncated WAL segment is detected wherever the store holds evidence of it, never a silent
prefix), and a blob of file content missing from a store no gc can touch is named as
damage, not as a race to retry.  Real files, real CLI processes, a SIGKILLed writer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from store_support import CLI, cli_env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          timeout=300, env=cli_env())


def _segments(store: str) -> list[str]:
    wal = os.path.join(store, "wal")
    return [os.path.join(wal, f) for f in sorted(os.listdir(wal)) if f.endswith(".wal")]


def _killed_writer_store(store: str) -> None:
    """A durability="full" writer commits 2,000 transactions, then is SIGKILLed (LMDB
    not applied past what the applier got to: the log holds the commits)."""
    code = (f"import os, signal, walstore\n"
            f"s = walstore.open({store!r}, checkpoint_bytes=1 << 40)\n"
            f"for i in range(2000):\n"
            f"    with s.transaction() as tx:\n"
            f"        tx.put(f'k/{{i:06d}}', 'v' * 100)\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=300)
    assert r.returncode == -signal.SIGKILL


def _closed_store_of_three_segments(store: str) -> None:
    """300 commits of 10 KB into 1 MiB segments, cleanly closed: LMDB is applied up to
    the log's end, which lies past 300,000 bytes into the last segment."""
    code = (f"import walstore\n"
            f"s = walstore.open({store!r}, segment_size=1 << 20, checkpoint_bytes=1 << 40)\n"
            f"for i in range(300):\n"
            f"    with s.transaction() as tx:\n"
            f"        tx.put(f'k{{i}}', 'v' * 10000)\n"
            f"s.close()\n")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=300, check=True)


def _refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_replicate_refuses_a_killed_writers_truncated_only_segment(tmp_path):
    """The only segment cut to 171,700 bytes: verify and backup refused it, but
    `replicate --once` shipped the records before the cut, exited 0, and the replica
    passed `replicas --verify` (records stopping at the file's end left nothing behind
    them for the damage check to find)."""
    store = str(tmp_path / "st")
    _killed_writer_store(store)
    (seg,) = _segments(store)
    os.truncate(seg, 171700)
    assert _cli("verify", store).returncode == 1
    _refused(_cli("backup", store, str(tmp_path / "bk")), "truncated")
    assert not os.path.exists(tmp_path / "bk")
    _refused(_cli("replicate", store, f"file://{tmp_path / 'rep'}", "--once"),
             "truncated", os.path.basename(seg))
    assert _cli("replicas", f"file://{tmp_path / 'rep'}", "--verify").returncode != 0


def test_backup_and_replicate_refuse_a_truncated_last_segment_below_applied(tmp_path):
    """A cleanly closed store, its last segment cut to 300,000 bytes (below LMDB's applied
    LSN): verify said the acknowledged records were missing, yet backup exited 0 with a
    copy that failed verify and refused a put, and replicate shipped the WAL up to the cut
    beside a snapshot past it, exit 0."""
    store = str(tmp_path / "st")
    _closed_store_of_three_segments(store)
    segs = _segments(store)  # (the close's checkpoint may have trimmed the older ones)
    os.truncate(segs[-1], 300000)
    assert _cli("verify", store).returncode == 1
    _refused(_cli("backup", store, str(tmp_path / "bk")), "truncated",
             os.path.basename(segs[-1]))
    assert not os.path.exists(tmp_path / "bk")
    _refused(_cli("replicate", store, f"file://{tmp_path / 'rep'}", "--once"), "truncated")


def test_backup_and_replicate_refuse_a_log_ending_below_applied(tmp_path):
    """The same store with the last segment's tail zeroed from offset 300,000 (its size
    kept: no truncation to see): the valid log ends below LMDB's applied LSN, which
    verify reports; backup and replicate now say it too, instead of a copy or a replica
    whose log stops there."""
    store = str(tmp_path / "st")
    _closed_store_of_three_segments(store)
    last = _segments(store)[-1]
    size = os.path.getsize(last)
    with open(last, "r+b") as f:
        f.seek(300000)
        f.write(bytes(size - 300000))
    v = _cli("verify", store)
    assert v.returncode == 1 and "acknowledged log records are missing" in v.stdout
    _refused(_cli("backup", store, str(tmp_path / "bk")),
             "acknowledged log records are missing")
    assert not os.path.exists(tmp_path / "bk")
    _refused(_cli("replicate", store, f"file://{tmp_path / 'rep'}", "--once"),
             "acknowledged log records are missing")


def test_backup_names_a_missing_blob_as_damage_not_a_gc_race(tmp_path):
    """No writer running, one blob of file content gone: backup said it "kept racing with
    the file content's garbage collection ... try again", which no retry can help."""
    store, ws = str(tmp_path / "st"), str(tmp_path / "ws")
    os.mkdir(ws)
    code = (f"import walstore\n"
            f"with walstore.open({store!r}) as s:\n"
            f"    w = s.workspace({ws!r})\n"
            f"    with s.transaction() as tx: tx.files(w).write('a.txt', 'one')\n"
            f"    with s.transaction() as tx: tx.files(w).write('a.txt', 'two')\n")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=300, check=True)
    blobs_dir = os.path.join(store, "files", "blobs")
    blobs = sorted(os.path.join(d, f) for d, _ds, fs in os.walk(blobs_dir) for f in fs
                   if os.path.basename(d) != "tmp")
    gone = blobs[0]
    os.remove(gone)
    digest = os.path.basename(os.path.dirname(gone)) + os.path.basename(gone)
    r = _cli("backup", store, str(tmp_path / "bk"))
    _refused(r, "missing", digest)
    assert "racing" not in r.stderr and "try again" not in r.stderr
    assert not os.path.exists(tmp_path / "bk")


def test_replicate_ships_up_to_a_torn_tail_verify_calls_torn(tmp_path):
    """Under durability "none" (or "normal") a power loss can leave a later, unsynced
    record whole behind an earlier torn one: verify and recovery call that a torn tail
    (nothing after it had been synced), but replicate took the valid record behind for
    proof of damage and refused the store ("damaged ... a valid record follows"), so the
    one log was judged two ways.  Replicate now judges it as the one reader does: it
    ships up to the torn spot, as recovery will keep it.  (With a record synced after the
    spot behind it, both still refuse: the tests above.)"""
    import struct
    store = str(tmp_path / "s")
    code = (f"import os, signal, walstore\n"
            f"s = walstore.open({store!r}, durability='none')\n"
            f"for i in range(10):\n"
            f"    with s.transaction() as tx:\n"
            f"        tx.put(f'k{{i}}', 'v' * 50)\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=300)
    seg = _segments(store)[-1]
    data = bytearray(open(seg, "rb").read())
    off, records = 64, []  # (segment header; each record: crc, length, type, ... payload)
    while True:
        _crc, length, kind = struct.unpack("<IIB", data[off:off + 9])
        if kind == 0:
            break
        records.append((off, length))
        off += 28 + length
    assert len(records) == 10
    spot, length = records[5]
    data[spot + 28 + length // 2] ^= 0xFF  # (the sixth commit's payload: its CRC fails)
    with open(seg, "r+b") as f:
        f.write(data)
    v = _cli("verify", store)
    assert v.returncode == 0 and "torn tail" in v.stdout + v.stderr, (v.stdout, v.stderr)
    rep = f"file://{tmp_path}/rep"
    r = _cli("replicate", store, rep, "--once")
    assert r.returncode == 0, (r.stdout, r.stderr)
    dest = str(tmp_path / "restored")
    assert _cli("restore", rep, dest).returncode == 0
    got = _cli("scan", dest, "--json")
    assert got.returncode == 0
    import json
    assert [row["key"] for row in json.loads(got.stdout)["items"]] == [f"k{i}" for i in range(5)]
