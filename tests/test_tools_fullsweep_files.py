"""tools/fullsweep.py --workload files: file transactions in a workspace on the same real
(tmpfs) disk as their store run out of it; the workspace, the actions, the ledger and
verify agree after recovery, and the disk really ran out under different file calls.
Skipped where a tmpfs cannot be mounted (the tool then exits 2)."""
from __future__ import annotations

import os

import pytest

from tools import fullsweep


def _sweep(tmp_path, levels, seed, modes=("stop", "free")):
    try:
        return fullsweep.sweep(levels, seed, str(tmp_path), modes, workload="files")
    except fullsweep.CannotRun as e:
        pytest.skip(str(e))


def test_the_files_full_disk_sweep_finds_no_problem_and_fills_the_disk_at_file_calls(tmp_path):
    """Three levels (~60 KiB, ~1 MiB, ~2 MiB free), both modes, closes and kills: zero
    problems; every run hit the full disk; its errors include a write into the
    workspace and a before-image into the blob store; a writer that freed the disk went
    on committing file transactions without a reopen; a killed writer's in-flight file
    transaction had changed files (recovery had to put them back)."""
    s = _sweep(tmp_path, [57_344, 1_093_632, 2_129_920], seed=9)
    runs = s["runs_detail"]
    assert s["problems"] == 0, fullsweep.report(s)
    assert s["runs"] == 6 and s["filled"] == 6, fullsweep.report(s)  # (never filled: proves
    # nothing)
    # (any error, not the first alone: which call meets the full disk first moves with
    # the machine's load — the spare's and the applier's timing — and a loaded CI box's
    # first errors were LMDB's and the WAL's in every run; under load the six runs once
    # met it at no workspace write at all (stop 76's CI-like run: blobs and LMDB only),
    # so a few more "stop" runs at other levels are made until one does, each checked)
    sites = set(s["error_sites"])
    more_levels = [3_145_728, 1_572_864, 786_432]
    while "workspace" not in sites and more_levels:
        level = more_levels.pop()
        work = tmp_path / f"more-{level}"
        work.mkdir()
        more = _sweep(work, [level], seed=9, modes=("stop",))
        assert more["problems"] == 0, fullsweep.report(more)
        sites |= set(more["error_sites"])
    assert {"workspace", "blobs"} <= sites, (s["error_sites"], s["first_error_sites"], sites)
    assert s["acks"] > 30
    for r in runs:
        assert r["workload"] == "files" and r["first"]["errno"] in ("ENOSPC", "EIO", None), r
    freed = [r for r in runs if r["mode"] == "free"]
    assert all(r["after"]["acked"] > 0 for r in freed), [r["after"] for r in runs]
    assert any(r["in_flight"] == "changed files" for r in runs if r["end"] == "kill"), \
        [(r["mode"], r["end"], r["in_flight"]) for r in runs]


def test_the_files_checks_see_a_workspace_that_is_not_the_visible_commits_tree(
        tmp_path, monkeypatch):
    """The sweep's tree check is not vacuous: a file of the workspace changed after the
    writer's run (behind walstore's back) is reported."""
    real = fullsweep.check_store

    def tampered(spec, recs, res):
        ws = os.path.join(os.path.dirname(spec["store"]), "ws")
        with open(os.path.join(ws, "k0", "keep.txt"), "a") as f:
            f.write("changed behind walstore's back\n")
        real(spec, recs, res)
    monkeypatch.setattr(fullsweep, "check_store", tampered)
    s = _sweep(tmp_path, [1_500_000], seed=4, modes=("free",))
    assert s["problems"] >= 1
    assert "k0/keep.txt" in fullsweep.report(s), fullsweep.report(s)
