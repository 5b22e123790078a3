"""Power-loss images: every acknowledged full-durability commit survives any of them.

tools/powerloss.py records a real workload's WAL I/O (and, for reversible files, the
workspace's and the blob store's I/O too: writes, renames, directories, symlinks, modes)
and builds crash images that keep only synced bytes plus a prefix, a torn and reordered
subset of sectors, or none of the unsynced ones, and a prefix of unsynced directory
operations.  With files, the recovered workspace must be exactly the tree committed by
the transaction the recovered store names.  The long run is the tool; CI runs a short
one.  Control runs with directory fsyncs (or the workspace's file fsyncs) removed from
the recording (a broken engine) must fail, or the harness would prove nothing.
"""
from __future__ import annotations

import os

from tools.powerloss import VARIANTS, run

IMAGES = int(os.environ.get("WALSTORE_POWERLOSS_IMAGES", "48"))


def test_no_acknowledged_commit_is_lost_in_any_power_loss_image(tmp_path):
    summary = run(IMAGES, seed=7, commits=80, workdir=str(tmp_path))
    assert summary["images"] == IMAGES
    assert all(summary["by_variant"][v] > 0 for v in VARIANTS)
    assert summary["acks_checked"] > IMAGES  # images were taken with acks behind them
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]


def test_no_acknowledged_commit_is_lost_when_threads_share_the_group_commits_writes(tmp_path):
    """Eight committing threads: the group commit writes several records at once, and a
    rotation writes a batch into the old segment just before the new one is made (which
    left a gap before a durable successor, an unopenable store, until the rotation
    synced the old segment first)."""
    summary = run(IMAGES * 2, seed=4, commits=800, threads=8, workdir=str(tmp_path))
    assert summary["shared_writes"] > 0  # batches were written, so images tear them
    assert summary["acks_checked"] > IMAGES
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]


def test_the_harness_catches_a_missing_directory_fsync(tmp_path):
    summary = run(32, seed=3, commits=60, lie_about_dir_fsync=True, workdir=str(tmp_path))
    assert summary["lost_commits"] > 0


def test_the_workspace_is_the_committed_tree_in_every_power_loss_image(tmp_path):
    from tools.powerloss import run_files
    summary = run_files(IMAGES, seed=11, txns=30, workdir=str(tmp_path))
    assert summary["images"] == IMAGES and summary["commits"] > 10
    assert all(summary["by_variant"][v] > 0 for v in VARIANTS)
    assert summary["acks_checked"] > IMAGES
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]


def test_the_harness_catches_workspace_files_that_are_never_fsynced(tmp_path):
    from tools.powerloss import run_files
    summary = run_files(32, seed=5, txns=25, workdir=str(tmp_path),
                        lie_about_file_fsync=True)
    assert summary["broken_images"] > 0
