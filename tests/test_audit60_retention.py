"""Audit 60, retention and forgetting: purge, history retention, restore-point pins,
checkpoint and WAL trimming, file before-image trimming — under real processes killed with
SIGKILL-like exits (``os._exit`` at a chosen fsync of the ``walstore.fileio`` seam) and
real files, the erased marker grepped in every file of the store directory.

1. A recovery killed while copying a torn WAL tail into ``quarantine/`` leaves the copy's
   temp file (``*.bin.tmp``); the next recovery copies the same bytes again under another
   name.  A purge's scrub judged ``*.bin`` files only: the purged values stayed in the
   temp file for good, against "after the next checkpoint their bytes are in no file of
   the store directory".
"""
from __future__ import annotations

import glob
import os
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
