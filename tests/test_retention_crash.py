"""Retention after a crash: a writer killed before its first background checkpoint.

Recovery's own checkpoint ran before the retention and file-blob hooks were registered, so
the stores of short-lived writers that keep being killed trimmed nothing, ever (a probe:
15 kills of a writer with ``retain_transactions=1000``: 280,759 transactions kept,
data.mdb 430 MiB and growing).  The open after such a crash now checkpoints once with the
hooks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import walstore

CHILD = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import walstore
s = walstore.open(sys.argv[1], durability="none", retain_transactions=100,
                  checkpoint_bytes=1 << 40)  # (no background checkpoint: killed first)
for n in range(int(sys.argv[3])):
    with s.transaction() as tx:
        tx.put(f"k{n % 50}", n)
s.sync()
os.kill(os.getpid(), signal.SIGKILL)
'''


def _kill_a_writer(path, commits: int) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(walstore.__file__)))
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), root, str(commits)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr


def test_the_open_after_a_crash_trims_what_retention_allows(tmp_path):
    path = tmp_path / "s"
    for _ in range(3):
        _kill_a_writer(path, 1500)
        with walstore.open(path, retain_transactions=100) as store:
            kept = len(store.log())
            assert kept <= 100 + 5, kept  # (was every commit of every killed writer)
            assert store.get("k49") is not None
    with walstore.open(path, readonly=True) as store:
        assert len(store.log()) <= 105
        assert store.get(f"k{1499 % 50}") == 1499


def test_an_open_after_a_crash_without_retention_keeps_everything(tmp_path):
    path = tmp_path / "s"
    _kill_a_writer(path, 300)
    with walstore.open(path) as store:
        assert len(store.log()) == 300


def test_a_failing_trim_after_recovery_is_recorded_not_a_failed_open(tmp_path, monkeypatch):
    """The trim stands in for a background checkpoint: its error is recorded (as that
    one's was), never a failed open (a review: a damaged settled row or ENOSPC there
    refused the open)."""
    from walstore.agent import retention

    path = tmp_path / "s"
    _kill_a_writer(path, 300)

    def broken(self):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(retention.Retention, "trim", broken)
    with walstore.open(path, retain_transactions=100) as store:
        assert store.get("k49") is not None
        assert any("injected" in e for e in store._engine.background_errors)
