"""tools/fullsweep.py: a real writer process running out of a real (tmpfs) disk finds no
problem, and really runs out of it — in the WAL and in LMDB — at the levels it is given.
Skipped where a tmpfs cannot be mounted (the tool then exits 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tools import fullsweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def _sweep(tmp_path, levels, seed, modes=("stop", "free")):
    try:
        return fullsweep.sweep(levels, seed, str(tmp_path), modes)
    except fullsweep.CannotRun as e:
        pytest.skip(str(e))


def test_the_full_disk_sweep_finds_no_problem_and_really_fills_the_disk(tmp_path):
    """Two levels (~150 KiB free; ~1.7 MiB free), both modes (stop; free the disk
    and go on), a close and a kill -9: zero problems, every run hit the full disk (in
    LMDB, or in the WAL: since stop 65 a segment that does not fit is made smaller, so
    LMDB is where a full disk is mostly met first), the first error a walstore error
    with an errno (or the refusal of a store whose background LMDB write failed just
    before), and a writer that freed the disk either went on committing without a
    reopen or was refused cleanly (ReadOnlyError) until reopened."""
    s = _sweep(tmp_path, [150_000, 1_800_000], seed=2)
    runs = s["runs_detail"]
    assert s["problems"] == 0, fullsweep.report(s)
    assert s["runs"] == 4 and s["filled"] == 4, fullsweep.report(s)  # a sweep that never
    # fills the disk proves nothing
    assert s["first_error_sites"] and set(s["first_error_sites"]) <= {"wal", "lmdb"}, \
        s["first_error_sites"]
    assert s["acks"] > 100
    for r in runs:  # (the error the writer saw first: a walstore error with an errno)
        assert (r["first"]["errno"] in ("ENOSPC", "EIO")
                or r["first"]["type"] == "ReadOnlyError"), r["first"]
    for r in runs:
        if r["mode"] == "free":
            after = r["after"]
            assert after["acked"] > 0 or set(after.get("types", ())) <= {"ReadOnlyError"}, after
    ends = {r["end"] for r in runs}
    assert ends == {"close", "kill"}


def test_the_command_line_prints_one_json_document_and_progress_on_stderr(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fullsweep.py"),
                        "--levels", "1", "--max-free", "0", "--modes", "stop", "--seed", "3",
                        "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if r.returncode == 2 and "tmpfs" in r.stderr:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["runs"] == 1 and doc["problems"] == 0 and doc["filled"] == 1
    assert "free" in r.stderr and "first error at" in r.stderr
    assert "Traceback" not in r.stderr
