"""Review of audit 68's restore of everything from a replica whose newest snapshot lies
past its WAL's end (Manifest.base_past_end, f590127): what the copy holds is a state the
writer committed, at least what the WAL's end gives, and what `walstore replicas` says."""
from __future__ import annotations

import contextlib
import os

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.replication import DirectorySource, Shipper, replicas
from walstore.replication import restore as replica_restore

from test_replication_support import rows


def _commit(s, tag: str, n: int) -> None:
    for i in range(n):
        with s.transaction() as tx:
            tx.put(f"{tag}{i:04d}", tag * 50)


def _snapshot_past_the_wal(s, shipper: Shipper) -> None:
    """A round's snapshot of LMDB applied past the WAL the replica holds (its writer dies
    before the next round ships the WAL to it)."""
    s._engine.checkpoint()
    shipper._snapshot({"snapshot": None, "objects": 0, "bytes": 0})


def _secrets_and_kept(s) -> None:
    """20 keys under user/ (the purge's), then "kept" = 1, each in its own commit."""
    for i in range(20):
        with s.transaction() as tx:
            tx.put(f"user/{i:04d}", f"secret {i}")
    with s.transaction() as tx:
        tx.put("kept", 1)


@contextlib.contextmanager
def _shipped_to_d(s, path: str, url: str):
    """A shipper from the store ``s`` at ``path`` to ``url`` that has shipped the WAL to D
    (one round); when the block ends the shipper stops and ``s`` closes (the writer gone)."""
    shipper = Shipper(DirectorySource(path), url, {"interval": 30})
    try:
        shipper.ship_once()  # (the WAL to D)
        yield shipper
    finally:
        shipper.stop()
        s.close()


def _damage(tmp_path, snap: dict) -> None:
    p = os.path.join(tmp_path / "rep", snap["k"])
    with open(p, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def test_no_acknowledged_commit_lost_the_newest_of_two_snapshots_past_the_wal_damaged(
        tmp_path):
    """Two snapshots past the WAL's end (a round's, then another's; the writer gone before
    the WAL reached either), the newest damaged: a restore of everything fell back to the
    WAL's end (20 rows), skipping the older snapshot past it, sound, holding 5 more
    acknowledged commits.  Now it falls back to that snapshot."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    _commit(s, "a", 20)
    with _shipped_to_d(s, path, url) as shipper:
        _commit(s, "b", 5)
        _snapshot_past_the_wal(s, shipper)
        _commit(s, "c", 5)
        _snapshot_past_the_wal(s, shipper)
        snaps = sorted(shipper.manifest.snapshots, key=lambda x: x["lsn"])
        position = shipper.manifest.position
    assert snaps[-2]["lsn"] > position, (snaps, position)
    _damage(tmp_path, snaps[-1])
    report = replica_restore(url, str(tmp_path / "r"))
    assert [k["lsn"] for k in report["snapshots_skipped"]] == [snaps[-1]["lsn"]], report
    assert report["cut_lsn"] == snaps[-2]["lsn"], report
    with walstore.open(str(tmp_path / "r")) as r:
        assert [k for k, _v in rows(r)] == [f"a{i:04d}" for i in range(20)] + [
            f"b{i:04d}" for i in range(5)]
    assert replicas(url)["restore_everything"]["lsn"] == snaps[-1]["lsn"]


def test_purged_keys_stay_gone_a_purge_only_a_snapshot_past_the_wal_holds(tmp_path):
    """A purge committed after the WAL's end and before a snapshot past it (the writer
    gone before the next round ships the WAL with the purge): a restore of everything
    has the keys erased, but a restore to a txid the WAL holds, before the purge, brought
    the erased keys back — the replica's only record of the purge was the snapshot, and
    restore._purges_after read the WAL objects' and the holes' marks only.  Now the
    snapshot's manifest entry lists the purges between the replica's position and it."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    _secrets_and_kept(s)
    before = next(iter(s.log())).txid
    with _shipped_to_d(s, path, url) as shipper:
        with s.transaction() as tx:
            tx.put("other", 1)
        s.purge("user/")
        _snapshot_past_the_wal(s, shipper)
        assert max(x["lsn"] for x in shipper.manifest.snapshots) > shipper.manifest.position
    replica_restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("kept", 1), ("other", 1)]
    report = replica_restore(url, str(tmp_path / "t"), to=before)
    assert report["purges_applied"] == ["user/"], report
    with walstore.open(str(tmp_path / "t")) as t:
        assert rows(t) == [("kept", 1)]


def test_replicas_says_what_a_restore_gives_a_point_named_past_the_wal_end(tmp_path):
    """A restore point made after the WAL's end, before a snapshot past it: `replicas`
    listed it as any other point, and `restore --to` it failed "the replica's WAL ends at
    LSN D, before LSN P+1" (a txid there: "not among the commits the replica's WAL holds"),
    with no word that the restore of everything holds it.  Now the listing marks it, and
    both refusals say where it is and what restores it; the copy of everything has it."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    _commit(s, "a", 10)
    with _shipped_to_d(s, path, url) as shipper:
        _commit(s, "b", 3)
        s.restore_point("gap")
        gap_tx = next(iter(s.log())).txid
        _snapshot_past_the_wal(s, shipper)
    points = {p["name"]: p for p in replicas(url)["restore_points"]}
    assert points["gap"]["past_wal_end"] is True, points
    r = CliRunner().invoke(cli_main, ["replicas", url])
    assert "past the WAL's end: in a restore of everything only" in r.output, r.output
    for to in ("gap", gap_tx):
        with pytest.raises(walstore.UnknownRestorePoint,
                           match="a restore of everything restores that snapshot"):
            replica_restore(url, str(tmp_path / f"t{to}"), to=to)
        assert not os.path.exists(tmp_path / f"t{to}")
    replica_restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert "gap" in r.restore_points()


def test_history_coherent_in_a_copy_of_a_snapshot_past_the_wal(tmp_path):
    """(Passes: a check of f590127.)  The copy of a snapshot past the WAL's end holds the
    history up to it: a txid from the gap and one before it revert, a point from the gap
    rewinds, history(key) names both, and a transaction prepared in the gap is in doubt
    and commits with its writes."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    _commit(s, "a", 10)
    with _shipped_to_d(s, path, url) as shipper:
        with s.transaction() as tx:
            tx.put("k", "before")
        s.restore_point("gap")
        with s.transaction() as tx:
            tx.put("k", "gap")
            tx.put("b", 1)
        gap_tx = next(iter(s.log())).txid
        tx = s.transaction()
        tx.put("prep", 1)
        tx.prepare("g1")
        _snapshot_past_the_wal(s, shipper)
    replica_restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert [h.txid for h in r.history("k")][0] == gap_tx
        assert len(list(r.history("k"))) == 2
        assert r.prepared() == ["g1"] and r.get("prep") is None
        r.commit_prepared("g1")
        assert r.get("prep") == 1
        r.revert(gap_tx)
        assert (r.get("k"), r.get("b")) == ("before", None)
        r.rewind("gap")
        assert (r.get("k"), r.get("prep")) == ("before", None)
        r.revert(next(iter(r.log())).txid)  # (the rewind reverted: prep back)
        assert r.get("prep") == 1
