"""ENOSPC and EIO injected at (a stride of) every file-I/O call of a workload.

Every call site of each kind, with both errnos (``WALSTORE_FAULT_STRIDE`` thins it).  Every injected fault must fire, fail only the operation in hand, never
be followed by a retried fsync, and lose no acknowledged commit after a reopen.
"""
from __future__ import annotations

import os

from tools.faultsweep import sweep

STRIDE = int(os.environ.get("WALSTORE_FAULT_STRIDE", "1"))


def test_faults_at_every_io_site_lose_nothing_acknowledged(tmp_path):
    summary = sweep(str(tmp_path), stride=STRIDE)
    assert summary["calls"]["pwrite"] > 20 and summary["calls"]["fdatasync"] > 20
    assert summary["calls"]["fsync_dir"] >= 2  # segment creation is in the sweep
    assert summary["fired"] == summary["faults"] > 150
    assert summary["lost"] == 0, summary["broken"][:3]
    assert summary["broken"] == [], summary["broken"][:3]
