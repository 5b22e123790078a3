"""Audit 51, durability modes, group commit, checkpoints, backup, stats, options.

Findings (each test below failed before its fix):

1. ``walstore.Options`` validates its fields in ``__post_init__`` only, and ``open`` used
   the caller's object as is: an Options changed after it was made (a mutable dataclass:
   ``o = walstore.Options(); o.sync_interval = float("nan")``) went past every documented
   range.  ``sync_interval=nan`` (or ``-1``) opened a "normal" store whose flusher spun
   without sleeping (a core busy, no bound on anything), ``segment_size=10`` opened a store
   that made a new WAL segment for every commit; and a change to the object after open
   reached the running store.  ``open`` now takes a validated private copy.
2. ``checkpoint_bytes`` ("WAL bytes between automatic checkpoints") was looked at only when
   the applier woke by itself, every ``apply_interval`` (in range up to 86,400 s), or at a
   backlog of 32 MiB of log / ``apply_batch`` events: with ``apply_interval=86400`` and
   ``checkpoint_bytes=64 KiB`` the WAL grew linearly past 3 MiB in 3,000 small commits
   (to 32 MiB before anything checkpointed).  A commit that makes a checkpoint due now
   wakes the applier.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402


@pytest.mark.parametrize("name, value", [
    ("sync_interval", float("nan")),
    ("sync_interval", -1),
    ("segment_size", 10),
    ("checkpoint_bytes", 0),
    ("apply_interval", float("nan")),
    ("max_unapplied", 0),
    ("retain_transactions", 0),
])
def test_options_out_of_range_are_refused_at_open_even_when_set_after_construction(
        tmp_path, name, value):
    """Options docstring: a value outside its range raises ValueError naming the option,
    before any file is touched.  Before: a field set on an Options after it was made was
    never checked; the store opened with it (and nothing was refused)."""
    opts = walstore.Options()
    setattr(opts, name, value)
    path = str(tmp_path / "store")
    with pytest.raises(ValueError, match=name):
        walstore.open(path, durability="normal", options=opts)
    assert not os.path.exists(path)


def test_options_changed_after_open_do_not_reach_the_running_store(tmp_path):
    """Before: the store kept the caller's Options object, so a later (unvalidated) change
    to it changed the open store's tuning under it."""
    opts = walstore.Options(sync_interval=0.5)
    s = walstore.open(str(tmp_path / "store"), durability="normal", options=opts)
    try:
        opts.sync_interval = -1
        opts.apply_batch = 0
        assert s.options.sync_interval == 0.5
        assert s.options.apply_batch == walstore.Options().apply_batch
        with s.transaction() as t:
            t.put("k", 1)
    finally:
        s.close()


def test_checkpoint_bytes_bounds_the_wal_whatever_the_apply_interval(tmp_path):
    """Promise 5 and Options.checkpoint_bytes.  Before: with apply_interval=86400 the
    WAL reached ~6.4 MiB here (64 KiB checkpoint_bytes), growing with every commit."""
    s = walstore.open(str(tmp_path / "store"), durability="none", apply_interval=86400,
                      checkpoint_bytes=64 * 1024, segment_size=64 * 1024)
    try:
        peak = 0
        for i in range(6000):
            with s.transaction() as t:
                t.put(f"k{i % 100}", os.urandom(1000))
            if i % 250 == 0:
                peak = max(peak, s.stats()["wal_bytes"])
        assert peak < 3 * 1024 * 1024, peak
    finally:
        s.close()
