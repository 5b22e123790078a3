"""Audit 60, retention and forgetting: purge, history retention, restore-point pins,
checkpoint and WAL trimming, file before-image trimming — under real processes killed with
SIGKILL-like exits (``os._exit`` at a chosen fsync of the ``walstore.fileio`` seam) and
real files, the erased marker grepped in every file of the store directory.

1. A recovery killed while copying a torn WAL tail into ``quarantine/`` leaves the copy's
   temp file (``*.bin.tmp``); the next recovery copies the same bytes again under another
   name.  A purge's scrub judged ``*.bin`` files only: the purged values stayed in the
   temp file for good, against "after the next checkpoint their bytes are in no file of
   the store directory".
2. A read-only process killed inside an LMDB read transaction (a reader of the store, a
   ``walstore backup`` killed mid-copy) left its reader slot holding its snapshot: LMDB
   reused no page freed after it, and the open writer's data file grew with every write
   (retention trimming included) until the writer reopened — 4.3 MB steady before,
   +5 MB per 3,000 commits of 1 KiB after such a kill, for as long as the writer ran.
   Every checkpoint now frees the slots of dead processes (CONTRACT 4.5: disk use stays
   bounded under steady load).
3. A key written and deleted just before a purge (both commits still unapplied, in the
   MemTable) had its history erased but was left out of the report's ``keys_erased``
   (``hkeys``, read from LMDB, did not list it yet): a purge reported 0 keys erased for a
   key it erased.  The keys the MemTable holds in the range count too.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402

from store_support import files_with  # noqa: E402

MARKER = b"AUDIT60-RETAIN-7f3a"


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=120)


# ---- 1. a quarantine temp file left by a killed recovery is scrubbed by a purge -----------

_WRITER = f"""
import os, sys, walstore
s = walstore.open(sys.argv[1], durability="full")
with s.transaction() as tx:
    tx.put("keep/x", 1); tx.put("conv/a", "{MARKER.decode()}-1")
with s.transaction() as tx:
    tx.put("conv/a", "{MARKER.decode()}-2" + "z" * 300)
os._exit(9)  # killed: no clean close
"""

# recovery of the torn tail, killed at the fsync of its quarantine copy's temp file
_KILLED_RECOVERY = """
import os, sys, walstore
from walstore.fileio import OSBackend
from tools.faults import installed

class Killer(OSBackend):
    def fsync(self, fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".bin.tmp"):
            os._exit(9)
        return super().fsync(fd)

with installed(Killer()):
    walstore.open(sys.argv[1])
print("recovered without being killed")
"""


def test_a_purge_scrubs_the_temp_copy_a_killed_recovery_left_in_quarantine(tmp_path):
    path = str(tmp_path / "s")
    assert _child(_WRITER, path).returncode == 9
    seg = [p for p in sorted(glob.glob(os.path.join(path, "wal", "*.wal")))][-1]
    with open(seg, "r+b") as f:  # tear the last record (a byte of its value, not the marker)
        data = bytearray(f.read())
        at = data.rfind(MARKER + b"-2") + len(MARKER) + 10
        data[at] ^= 0xFF
        f.seek(0)
        f.write(data)
    killed = _child(_KILLED_RECOVERY, path)
    assert killed.returncode == 9, killed.stdout + killed.stderr
    qdir = os.path.join(path, "quarantine")
    temps = [n for n in os.listdir(qdir) if n.endswith(".bin.tmp")]
    assert temps and files_with(qdir, MARKER + b"-2")
    # the next recovery names its copy by the second it runs in: a later second leaves the
    # killed one's temp file beside it (the same second would have reused its name)
    time.sleep(1.05 - time.time() % 1)
    with walstore.open(path) as s:
        assert [p.kind for p in s.last_recovery.problems] == ["torn-tail"]
        assert set(temps) <= set(os.listdir(qdir))
        assert s.get("conv/a") == f"{MARKER.decode()}-1"
        report = s.purge("conv/")
        assert set(temps) <= set(report["quarantine_removed_names"])
        assert s.get("keep/x") == 1 and s.get("conv/a") is None and s.history("conv/a") == []
    assert files_with(path, MARKER) == []


# ---- 2. a reader killed inside a read transaction pins no pages past the next checkpoint ----

_KILLED_READER = """
import os, signal, sys, walstore
r = walstore.open(sys.argv[1], readonly=True)
assert r.get("k0") is not None
with r._engine.state.read():  # killed inside an LMDB read transaction
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _active_reader(store, pid: int) -> bool:
    """Does LMDB's reader table hold a live snapshot (a txnid, not "-") for ``pid``?"""
    table = store._engine.state.env.readers().splitlines()[1:]
    return any(line.split()[0] == str(pid) and line.split()[-1] != "-" for line in table)


def test_a_reader_killed_inside_a_read_pins_no_pages_past_the_next_checkpoint(tmp_path):
    path = str(tmp_path / "s")
    value = "v" * 1000
    with walstore.open(path, durability="none", retain_transactions=20) as s:
        with s.transaction() as tx:
            for i in range(100):
                tx.put(f"k{i}", value)
        s.checkpoint()
        killed = _child(_KILLED_READER, path)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        pid = int(next(line.split()[0] for line in
                       s._engine.state.env.readers().splitlines()[1:]
                       if line.split()[-1] != "-"))
        assert _active_reader(s, pid)  # (the dead reader's slot, snapshot and all)
        sizes = []
        for rnd in range(6):
            for i in range(1500):
                with s.transaction() as tx:
                    tx.put(f"k{i % 100}", f"{value}{rnd}-{i}")
            s.checkpoint()
            assert not _active_reader(s, pid)
            sizes.append(os.path.getsize(os.path.join(path, "db", "data.mdb")))
    # each round writes ~1.5 MB of values that retention trims: with the dead reader's
    # snapshot pinned no freed page was reused, and the file grew ~5.8 MB every round
    # (4.8, 10.6, 16.3, 22.1, 27.9, 33.6 MB); reaped at the first checkpoint, it levels off
    # once the freelist has its working size (4.6, 5.8, 6.0, 6.0, 6.0, 6.0 MB here)
    assert sizes[-1] - sizes[2] < 1 << 20, sizes


# ---- 3. a purge's report counts the keys whose history only the MemTable held yet ---------

def test_a_purge_counts_a_key_written_and_deleted_just_before_it(tmp_path):
    # the applier held still (as between two of its batches): both commits of "conv/a"
    # are still in the MemTable when the purge runs
    with walstore.open(str(tmp_path / "s"), durability="none", apply_interval=3600.0,
                       apply_batch=10**9) as s:
        with s.transaction() as tx:
            tx.put("conv/a", MARKER.decode())
            tx.put("conv/b", 1)
        with s.transaction() as tx:
            tx.delete("conv/a")
        report = s.purge("conv/")
        assert s.history("conv/a") == []  # (erased all the same)
        assert (report["keys_deleted"], report["keys_erased"]) == (1, 2), report
