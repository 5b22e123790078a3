"""A writer killed between a purge's commit and its erasure leaves the erasure owed; the
next writable open finishes it (contract: purge; README "purge").  With ``replicate_to``,
that open must ship the log up to the purge before the erasure trims it, as the purge
itself does (``Store._ship_before_erasure``): the replica keeps a contiguous log
(Replication: "the shipper ... resumes from its position"; ``restore --follow`` keeps a
copy current).

It did the erasure before the shipper started, so every commit not shipped when the
writer died went from the log unshipped: the replica recorded a hole, no restore to a
point inside it and no follower positioned before it could go on (probe-follow45: four
holes in 13 kills of a busy writer that purged now and then).

Real processes: the writer is killed with SIGKILL at the erasure (its commit durable)."""
from __future__ import annotations

import subprocess
import sys

import walstore
from walstore.replication.restore import replicas

from store_support import cli_env, files_with

DIE_AT_THE_ERASURE = r"""
import os, signal, sys, walstore
src, url = sys.argv[1], sys.argv[2]
s = walstore.open(src, replicate_to=url,
                  replicate_options={"interval": 3600, "snapshot_interval": 0})
for i in range(5):
    with s.transaction() as tx:
        tx.put(f"first/{i}", i)
s.sync_replica(timeout=30)
for i in range(20):  # not shipped: the shipper's next round is an hour away
    with s.transaction() as tx:
        tx.put(f"user/{i}", "ERASE-ME-4512" + "x" * 100)
        tx.put(f"keep/{i}", i)
def killed(*_a, **_k):  # the purge committed and applied; its erasure not begun
    os.kill(os.getpid(), signal.SIGKILL)
s._engine.erase_old_bytes = killed
s.purge("user/")
"""


def test_an_owed_erasure_at_open_ships_first_and_leaves_no_hole(tmp_path):
    src, url = str(tmp_path / "s"), f"file://{tmp_path}/replica"
    p = subprocess.run([sys.executable, "-c", DIE_AT_THE_ERASURE, src, url],
                       env=cli_env(), timeout=120)
    assert p.returncode == -9
    s = walstore.open(src, replicate_to=url, replicate_options={"interval": 0.05})
    try:
        assert s.get("user/1") is None and s.get("keep/19") == 19
        with s.transaction() as tx:
            tx.put("after", 1)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    assert files_with(src, b"ERASE-ME-4512") == []  # (the erasure was done all the same)
    assert replicas(url)["holes"] == []
    # every commit is in the replica's log: a restore to one before the purge works (and
    # applies the purge the replica holds after the cut: the erased keys stay erased)
    cut = walstore.restore(url, str(tmp_path / "pitr"), to=walstore.LSN(_lsn_of_keep(src)))
    with walstore.open(str(tmp_path / "pitr"), readonly=True) as c:
        assert c.get("keep/19") == 19 and c.get("user/19") is None, cut
    assert cut["purges_applied"] == ["user/"]
    assert files_with(str(tmp_path / "pitr"), b"ERASE-ME-4512") == []


def _lsn_of_keep(src: str) -> int:
    """The LSN of the commit that wrote keep/19 (the last before the purge)."""
    with walstore.open(src, readonly=True) as s:
        for info in s.log():
            if "keep/19" in info.keys:
                return info.lsn
    raise AssertionError("keep/19's commit is not in the log")
