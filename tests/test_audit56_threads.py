"""Audit 56, threads: concurrency and isolation — many threads committing, reading
snapshots, holding transactions, preparing; the applier falling behind.

Findings (each test named below fails on the code before its fix):

- The MemTable's bounds (``max_unapplied`` events, ``max_unapplied_bytes`` of estimated
  memory) held only commits back, and only a commit woke the applier under load: a loop
  of actions rolled back, or of two-phase prepares, appended intents, ABORTs and
  PREPAREs (each holding its writes) past both bounds without limit while
  ``apply_interval`` had not passed — 2,000 rolled-back actions left 8,000 events
  (bound: 100) and 8 MiB (bound: 1 MiB) unapplied.  A record that begins new work (an
  intent, a PREPARE, a restore point, a workspace, a watch) now waits for room as a
  commit does, and every record nudges the applier; records that undo never wait
  (``test_actions_rolled_back_and_prepares_stay_within_the_memtables_bounds``).
"""
from __future__ import annotations

import threading
import time

import pytest

import walstore

BOUND_EVENTS = 100
BOUND_BYTES = 1 << 20


def _lagging(path, **kw):
    """A store whose applier works only when woken (a pause never comes in time)."""
    return walstore.open(str(path), durability="none", apply_interval=3600,
                         max_unapplied=BOUND_EVENTS, max_unapplied_bytes=BOUND_BYTES, **kw)


def test_actions_rolled_back_and_prepares_stay_within_the_memtables_bounds(tmp_path):
    s = _lagging(tmp_path / "s", compensators={"undo": lambda a: None})
    try:
        most = 0
        for i in range(600):  # an agent retrying an action that keeps failing
            tx = s.transaction()
            with tx.action("charge", args={"i": i}, compensate="undo"):
                pass
            tx.rollback()
            most = max(most, s.stats()["unapplied_events"])
        # (a few committers may pass the check at once: slack of a handful)
        assert most <= BOUND_EVENTS + 8, most
        eng = s._engine
        peak = 0
        for i in range(60):  # 60 prepares of 50 KB each: 3 MB against a 1 MiB bound
            tx = s.transaction()
            tx.put(f"k{i}", b"x" * 50_000)
            tx.prepare(f"g{i}")
            peak = max(peak, eng.memtable.memory)
        assert peak <= BOUND_BYTES + 2 * 60_000, peak
        assert len(s.prepared()) == 60
        for i in range(60):
            s.commit_prepared(f"g{i}")
        assert s.get("k59") == b"x" * 50_000
    finally:
        s.close()
