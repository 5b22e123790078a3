"""Review of audit 68's restore of a replica whose WAL ends below its newest snapshot
(Manifest.base_past_end, 6d2072c): a snapshot past the replica's position holds what the
replica's WAL does not — a writer taking the replica over must have that history, the
snapshot must carry its files' content, a follower is told why it cannot start there —
and a writer killed -9 at that point leaves a replica that restores every commit."""
from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.replication import DirectorySource, Shipper, replicas
from walstore.replication.lease import Refused

from store_support import kill_at_saved_snapshot, shipping_on_after_the_kill
from test_replication_support import rows


def _commit(s, tag: str, n: int) -> None:
    for i in range(n):
        with s.transaction() as tx:
            tx.put(f"{tag}{i:04d}", tag * 50)


def test_no_spliced_history_a_snapshot_past_the_position_of_a_store_rolled_back(tmp_path):
    """A round ships the WAL to D; the writer goes on, and a snapshot is taken at LSN A > D
    (LMDB ran ahead of the shipped WAL: a round's snapshot after its WAL part, or a hole's);
    the writer dies before the WAL after D is shipped.  The store directory is then put
    back to an older copy (a disk snapshot taken between D and A) and goes on with other
    commits: its replica's last commit at D is its own, so replication took the replica
    over again.  The replica kept the snapshot at A — of the history the store
    no longer has — and a restore of everything based itself on it once the WAL passed
    A: the old history's commits up to A and the new one's after A spliced into one
    state that neither history ever had (keys the rolled-back store never committed).
    Now the snapshot records its newest commit, and a writer whose log has another there is refused, as one whose log does
    not hold the replica's last commit is: the replica stays the old history's."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    _commit(s, "a", 20)
    shipper = Shipper(DirectorySource(path), url, {"interval": 30})
    shipper.ship_once()  # (the WAL to D)
    _commit(s, "b", 5)
    s.close()
    shutil.copytree(path, tmp_path / "disk-copy")  # (the older copy, between D and A)
    s = walstore.open(path)
    _commit(s, "old", 30)
    s._engine.checkpoint()
    shipper._snapshot({"snapshot": None, "objects": 0, "bytes": 0})  # (LMDB at A, the WAL past D not shipped)
    m = shipper.manifest
    assert max(x["lsn"] for x in m.snapshots) > m.position
    shipper.stop()
    s.close()
    shutil.rmtree(path)
    shutil.copytree(tmp_path / "disk-copy", path)  # (the store put back)
    s = walstore.open(path)
    _commit(s, "new", 60)  # (past A, another history)
    shipper = Shipper(DirectorySource(path), url, {"interval": 30})
    try:
        with pytest.raises(Refused, match="does not hold this store's history: its "
                                          "snapshot at LSN"):
            shipper.ship_once()
    finally:
        shipper.stop()
    s.close()
    # (the replica as it was: the old history, up to its snapshot at A — a restore of
    # everything restores the newest state the replica holds, test_audit68_restore_newest)
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert [k for k, _v in rows(r)] == sorted(
            [f"a{i:04d}" for i in range(20)] + [f"b{i:04d}" for i in range(5)]
            + [f"old{i:04d}" for i in range(30)])


KILLED_AT_THE_HOLES_SNAPSHOT = r"""
import os, pathlib, sys, time
sys.path.insert(0, sys.argv[2])
from test_audit67_replica_hole import _replica_behind_a_trim
s, shipper, url = _replica_behind_a_trim(pathlib.Path(sys.argv[1]))

def killed_here(durable):  # (the hole's snapshot is in the saved manifest, its WAL not)
    print("SNAPSHOT SAVED", flush=True)
    time.sleep(60)

shipper._reach_hole_base = killed_here
shipper.ship_once()
"""


def test_no_acknowledged_commit_lost_a_writer_killed_between_the_holes_snapshot_and_its_wal(
        tmp_path):
    """A real writer killed -9 right after the manifest listing a hole's snapshot was
    saved, before the WAL up to it was shipped (the shape 6d2072c restores as it is): the
    replica restores every commit the snapshot holds, `replicas` and `--verify`'s
    restore say so, and the writer's store, reopened, takes the replica over again (its
    log holds the snapshot's newest commit: not refused as another history) and ships on
    to the same state."""
    kill_at_saved_snapshot(KILLED_AT_THE_HOLES_SNAPSHOT, str(tmp_path),
                           os.path.dirname(__file__))
    url = f"file://{tmp_path}/rep"
    info = replicas(url)
    assert info["position"] < info["snapshots"][-1]["lsn"], info
    assert info["end_unrestorable"] is None and info["snapshots"][-1]["restorable"], info
    with walstore.open(str(tmp_path / "s")) as s:  # (recovered: every commit it made)
        expected = rows(s)
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expected
    checks = {c["check"]: c for c in replicas(url, verify=True)["verify"]["checks"]}
    assert checks["restore everything"]["ok"], checks
    with shipping_on_after_the_kill(str(tmp_path / "s"), url) as s:
        expected = rows(s)
    assert replicas(url)["position"] >= info["snapshots"][-1]["lsn"]
    walstore.restore(url, str(tmp_path / "r2"))
    with walstore.open(str(tmp_path / "r2")) as r:
        assert rows(r) == expected


def test_replicas_never_say_contradictory_things_a_follower_of_a_replica_ending_below_its_snapshot(
        tmp_path):
    """A replica whose WAL ends below its newest snapshot (a hole's snapshot the round
    never shipped the WAL to): since 6d2072c `walstore replicas` says its end restorable
    and a restore of everything restores the snapshot, and docs/REPLICATION.md said a
    follower waits for the WAL to reach it.  `restore --follow` failed at once, "hole in
    the replica's WAL: LSN a..b is missing (...); no restore can cross it", exit 1 — a
    restore without --follow of the same replica works.  Now its refusal says why a
    follower cannot start there and that a restore without --follow restores it."""
    from test_audit67_replica_hole import _replica_behind_a_trim
    s, shipper, url = _replica_behind_a_trim(tmp_path)
    shipper._reach_hole_base = lambda durable: durable  # (the round before 3d8247c)
    try:
        summary = shipper.ship_once()
    finally:
        shipper.stop()
    s.close()
    assert summary["position"] < summary["snapshot"], summary
    r = CliRunner().invoke(cli_main, ["restore", url, str(tmp_path / "f"), "--follow"])
    assert r.exit_code == 1, r.output
    assert "no restore can cross" not in r.output, r.output
    assert f"below its newest snapshot (LSN {summary['snapshot']})" in r.output, r.output
    assert "without --follow" in r.output, r.output
    assert not (tmp_path / "f").exists() or not os.listdir(tmp_path / "f")
    walstore.restore(url, str(tmp_path / "r"))  # (as it says)


def test_no_acknowledged_commit_lost_a_snapshot_past_the_shipped_wal_has_its_files_content(
        tmp_path):
    """A snapshot is of LMDB when it is taken, past the WAL the round shipped (a hole's,
    or one due at the round's end), and the round's blobs were uploaded when it began:
    a file committed meanwhile was in the snapshot with its content not in the replica.
    With the writer gone before its next round, a restore of everything (6d2072c: that
    snapshot as it is) reported the blobs missing and the copy could not read the
    committed file at its commit ("missing from the content store").  Now a snapshot
    uploads the blobs first."""
    from test_audit67_replica_hole import _replica_behind_a_trim
    (tmp_path / "ws").mkdir()

    def file_committed_during_the_round():
        ws = s.workspace(str(tmp_path / "ws"))
        with s.transaction() as tx:
            tx.files(ws).write("done.txt", "committed\n")
        s._engine.checkpoint()

    s, shipper, url = _replica_behind_a_trim(tmp_path, file_committed_during_the_round)
    shipper._reach_hole_base = lambda durable: durable  # (the writer dies here)
    try:
        summary = shipper.ship_once()
    finally:
        shipper.stop()
    txid = s.log(limit=1)[0].txid
    s.close()
    assert summary["position"] < summary["snapshot"], summary
    report = walstore.restore(url, str(tmp_path / "r"))
    assert report["blobs_missing"] == [], report
    with walstore.open(str(tmp_path / "r")) as r:
        ws = r.workspaces()[0]
        assert r.at(txid).files(ws).read("done.txt") == b"committed\n"
