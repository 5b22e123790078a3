"""Every directory walstore makes is durable in its parent before anything relies on it
(probe-docs).  A store's first reversible-file write made ``files/`` and ``files/blobs``
and fsynced only the innermost: a power loss that drops unsynced directory entries (the
README's power-loss model) took every before-image with them, and recovery left an
uncommitted change in the workspace.  Recovery's new ``quarantine/`` (holding the bytes
it cut from a torn tail) and a backup's new destination were the same.

Each test runs a real process that only observes ``os.mkdir`` and ``os.fsync`` (they call
through), kill -9s it where the files must already be safe, and checks that every
directory it made had its parent fsynced after it was made; the first test also builds
the power-loss image (unsynced new directories removed) and recovers from it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import walstore

OBSERVE = r"""
import json, os, sys
_log = []
_mkdir, _fsync = os.mkdir, os.fsync
def _logged_mkdir(p, *a, **k):
    r = _mkdir(p, *a, **k)
    _log.append(["mkdir", os.path.abspath(os.fsdecode(p))])
    return r
def _logged_fsync(fd):
    r = _fsync(fd)
    try:
        _log.append(["fsync", os.readlink(f"/proc/self/fd/{fd}")])
    except OSError:
        pass
    return r
os.mkdir, os.fsync = _logged_mkdir, _logged_fsync
def save_log(path):
    with open(path, "w") as f:
        json.dump(_log, f)
"""


def _unsynced(log: list, under: str) -> list[str]:
    """Directories made under ``under`` whose parent was not fsynced after."""
    out = []
    for i, (op, path) in enumerate(log):
        if op == "mkdir" and path.startswith(under):
            parent = os.path.dirname(path)
            if not any(o == "fsync" and q == parent for o, q in log[i + 1:]):
                out.append(path)
    return out


def _run_killed(code: str, *args: str) -> None:
    """Run ``code`` in a child; it prints READY when the state to check is in place,
    then is killed with SIGKILL (no close, no atexit)."""
    p = subprocess.Popen([sys.executable, "-c", OBSERVE + code, *args],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "READY" in line, f"child failed: {line!r}"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


def test_a_first_file_write_survives_losing_unsynced_directory_entries(tmp_path):
    base = os.path.realpath(tmp_path)
    store, ws = os.path.join(base, "store"), os.path.join(base, "ws")
    os.makedirs(ws)
    with open(os.path.join(ws, "a.txt"), "w") as f:
        f.write("committed\n")
    log_path = os.path.join(base, "log.json")
    _run_killed(r"""
import time, walstore
store, ws, log_path = sys.argv[1:4]
s = walstore.open(store, durability="full")
tx = s.transaction()
tx.files(s.workspace(ws)).write("a.txt", "UNCOMMITTED\n")
save_log(log_path)
print("READY", flush=True)
time.sleep(60)
""", store, ws, log_path)
    log = json.load(open(log_path))
    unsynced = _unsynced(log, store)
    # the power-loss image: what was never made durable in its parent is gone
    for path in sorted(unsynced, key=len):
        shutil.rmtree(path, ignore_errors=True)
    assert not unsynced, f"made, parent never fsynced: {unsynced}"
    with walstore.open(store) as s:
        assert not s.last_recovery.problems
    assert open(os.path.join(ws, "a.txt")).read() == "committed\n"


def test_recoverys_quarantine_directory_is_durable_before_the_log_is_cut(tmp_path):
    base = os.path.realpath(tmp_path)
    store = os.path.join(base, "s")
    subprocess.run([sys.executable, "-c",
                    "import os, sys, walstore\n"
                    "s = walstore.open(sys.argv[1])\n"
                    "for i in range(5):\n"
                    "    with s.transaction() as tx: tx.put('k%d' % i, 'TORNMARK%d' % i)\n"
                    "os.kill(os.getpid(), 9)\n", store])
    wal = os.path.join(store, "wal")
    seg = os.path.join(wal, sorted(f for f in os.listdir(wal) if f.endswith(".wal"))[0])
    data = bytearray(open(seg, "rb").read())
    off, starts = 64, []  # (segment header, then records: crc, length, type, ...)
    while True:
        _crc, length, kind = struct.unpack("<IIB", data[off:off + 9])
        if kind == 0:
            break
        starts.append(off)
        off += 28 + length
    cut_from = (starts[-1] + off) // 2
    piece = bytes(data[starts[-1]:cut_from])
    data[cut_from:off] = bytes(off - cut_from)
    with open(seg, "r+b") as f:
        f.write(data)
    log_path = os.path.join(base, "log.json")
    _run_killed(r"""
import walstore
s = walstore.open(sys.argv[1])
assert s.last_recovery.torn_bytes, "no torn tail was cut"
save_log(sys.argv[2])
print("READY", flush=True)
""", store, log_path)
    unsynced = _unsynced(json.load(open(log_path)), store)
    assert not unsynced, f"made, parent never fsynced: {unsynced}"
    kept = False
    for d, _dirs, files in os.walk(os.path.join(store, "quarantine")):
        kept = kept or any(piece in open(os.path.join(d, n), "rb").read() for n in files)
    assert kept, "the cut bytes are in no quarantine file"


def test_a_backup_is_durable_in_its_parent_directory(tmp_path):
    base = os.path.realpath(tmp_path)
    src, ws = os.path.join(base, "src"), os.path.join(base, "ws")
    os.makedirs(ws)
    with walstore.open(src) as s:
        with s.transaction() as tx:
            tx.put("k", "v")
            tx.files(s.workspace(ws)).write("a.txt", "content\n")
    dest = os.path.join(base, "backups", "b1")
    log_path = os.path.join(base, "log.json")
    _run_killed(r"""
from walstore.ops.backup import backup
backup(sys.argv[1], sys.argv[2])
save_log(sys.argv[3])
print("READY", flush=True)
""", src, dest, log_path)
    log = json.load(open(log_path))
    unsynced = _unsynced(log, os.path.join(base, "backups"))
    assert not unsynced, f"made, parent never fsynced: {unsynced}"
    # LMDB's copy writes its file and never fsyncs it: the backup does (in its staging
    # directory, renamed to DEST once complete; the parent fsynced after the rename)
    staged = [i for i, (op, p) in enumerate(log) if op == "fsync"
              and p.startswith(dest + ".incomplete-backup-") and p.endswith("/db/data.mdb")]
    assert staged, log
    assert any(op == "fsync" and p == os.path.dirname(dest) for op, p in log[staged[-1]:])
    assert os.path.isfile(os.path.join(dest, "db", "data.mdb"))
