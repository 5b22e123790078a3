"""Audit 55, durability modes and power loss (durability "full" / "normal" / "none").

Real files and real processes: power-loss images built by tools/powerloss.py from a
recorded workload (every write, fsync, rename and directory fsync), and writers killed
with SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.powerloss import VARIANTS, run  # noqa: E402


@pytest.mark.parametrize("durability", ["normal", "none"])
def test_power_loss_never_tears_a_transaction_under_normal_or_none(tmp_path, durability):
    """CONTRACT: "normal" may lose at most the sync interval, never tear a transaction;
    "none" has no fsync, yet a recovered store shows no partial transaction.  Every
    commit an fsync of its segment covered before the crash (the flusher's, a
    rotation's) survives; the transfers' invariant holds in every image."""
    summary = run(40, seed=13, commits=80, workdir=str(tmp_path), durability=durability)
    assert summary["images"] == 40
    assert all(summary["by_variant"][v] > 0 for v in VARIANTS)
    if durability == "normal":
        assert summary["acks_checked"] > 0  # the flusher's syncs covered commits
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]
