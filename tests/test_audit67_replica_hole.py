"""Audit 67: a shipping round that meets a hole (the live writer trimmed WAL segments the
replica had not received) beside a writer that goes on committing and checkpointing.

The interleaving a `walstore replicate --once` met once in a helper's run, forced here:
the round reads the durable frontier, then the writer commits, checkpoints (trimming the
segments the replica still lacked) and commits again before the round lists the
segments.  The round records the hole and takes its fresh snapshot — of LMDB now, past
the frontier the round had read — and then stopped at that old frontier: the replica's
only base past the hole lay beyond its end, no restore reached it (exit 1), while
`walstore replicas` said "complete  every commit up to T" of it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import walstore
from walstore import fileio
from walstore.replication import replicas
from walstore.replication.shipper import Shipper
from walstore.replication.source import DirectorySource

from store_support import CLI, cli_env
from test_replication_support import rows


def _commit(s, first: int, n: int) -> int:
    for i in range(first, first + n):
        with s.transaction() as tx:
            tx.put(f"k{i:05d}", "x" * 500)
    return first + n


def _replica_behind_a_trim(tmp_path, during_round=None):
    """(writer store, shipper, url): a replica shipped once, then a round whose frontier
    is read before the writer commits, checkpoints (trimming what the replica lacks) and
    commits again; ``during_round()`` runs in the round too, after the writer's steps."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path, segment_size=64 * 1024)
    n = _commit(s, 0, 20)
    shipper = Shipper(DirectorySource(path), url, {"interval": 30})
    shipper.ship_once()
    n = _commit(s, n, 200)
    real = shipper._ship_blobs  # (called once a round, right after the frontier is read)

    def writer_goes_on(summary):
        real(summary)
        if shipper._ship_blobs is writer_goes_on:
            shipper._ship_blobs = real
            m = _commit(s, n, 300)
            assert s._engine.checkpoint()["segments_removed"] > 0
            _commit(s, m, 50)
            s._engine.checkpoint()
            if during_round is not None:
                during_round()
    shipper._ship_blobs = writer_goes_on
    return s, shipper, url


def test_no_acknowledged_commit_lost_a_round_that_meets_a_hole_ships_to_its_snapshot(
        tmp_path):
    """Before the fix the round ended at the frontier it had read, below the snapshot it
    took for the hole: `replicate --once` exited 1 ("no restore can reach the replica's
    end yet: the replica's WAL ends at LSN 11330, before LSN 260114"), every restore of
    the replica failed ("restore everything" of `replicas --verify` too), until the
    next round.  Now the
    round ships on to its fresh snapshot: the replica restores to the writer's state."""
    s, shipper, url = _replica_behind_a_trim(tmp_path)
    try:
        summary = shipper.ship_once()
        status = shipper.status()
        m = shipper.manifest
        assert m.doc["holes"], "the interleaving did not trim the replica's WAL"
        assert summary["snapshot"] is not None
        assert summary["position"] >= summary["snapshot"], summary
        assert status.last_error is None, status.last_error
        expected = rows(s)
    finally:
        shipper.stop()
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expected
    # (`--verify` fails any replica with a hole, naming it: only that; its restore works)
    checks = {c["check"]: c for c in replicas(url, verify=True)["verify"]["checks"]}
    assert checks["restore everything"]["ok"], checks["restore everything"]
    assert all(c["ok"] or "hole in the replica's WAL" in str(c.get("error"))
               for c in checks.values()), checks
    s.close()


def test_replicas_never_says_complete_of_a_replica_no_restore_reaches(tmp_path,
                                                                        monkeypatch):
    """The hole's snapshot failing (no room for the LMDB copy: the fault seam's free
    space), the replica's end is unrestorable — and `walstore replicas` printed
    "complete  every commit up to T" of it all the same (its JSON: complete_to and no
    word of it).  Now the line says no restore reaches the replica's end, and why; the
    JSON carries it as ``end_unrestorable``."""
    s, shipper, url = _replica_behind_a_trim(
        tmp_path, lambda: monkeypatch.setattr(fileio, "free_bytes", lambda _p: 0))
    try:
        shipper.ship_once()
        assert shipper.manifest.doc["holes"]
        assert "no room for a snapshot" in (shipper.status().last_error or "")
    finally:
        shipper.stop()
        s.close()
    monkeypatch.undo()
    doc = json.loads(subprocess.run([sys.executable, "-c", CLI, "replicas", url, "--json"],
                                    capture_output=True, text=True, env=cli_env(),
                                    timeout=60).stdout)
    assert doc["complete_to"] is not None
    assert doc["end_unrestorable"] and "hole" in doc["end_unrestorable"]
    human = subprocess.run([sys.executable, "-c", CLI, "replicas", url],
                           capture_output=True, text=True, env=cli_env(), timeout=60).stdout
    line = next(x for x in human.splitlines() if x.startswith("complete"))
    assert "no restore reaches the replica's end" in line, human
    assert "hole in the replica's WAL" in line, human
