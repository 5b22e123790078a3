"""Upgrading, again (audit 68): stores and replicas written by the walstores of stops 61,
63, 65 and 66 (695dea9, d6973a2, 9ac0ee8, 12942e8), opened by this one.

Probed with those trees' code: stores using every feature (savepoints, actions with
compensators, some owed, a 2PC transaction prepared in doubt, restore points, revert,
rewind, purge, a files workspace with watch(), retention, replication to file:// with
snapshots), closed cleanly or killed -9 mid-work (an action in flight, a watch running,
a prepared transaction, inside a revert's / rewind's / rollback_prepared's compensation,
inside a purge), and a replica left behind a hole.  Opened, recovered, verified, reverted,
rewound, read at every point (files too), backed up, re-shipped, followed and restored
to every point by this walstore: every answer the same as for the same stores written by
this walstore, but the one below, tested here on the shape written directly.
"""
from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.replication import replicas

from test_audit67_replica_hole import _replica_behind_a_trim
from test_replication_support import rows


def test_no_acknowledged_commit_lost_a_replica_left_at_its_holes_snapshot_restores(
        tmp_path):
    """A round that met a hole (the writer trimmed WAL the replica lacked) took a fresh
    snapshot past the hole and, in walstores before 3d8247c (stop 67), stopped at the
    frontier it had read before: the replica's WAL ends below its newest snapshot.  (This
    walstore's round leaves the same shape when the writer dies between the snapshot's
    manifest write and the WAL shipped after it.)  With the source store gone, every
    restore of the replica's latest state was refused — "hole in the replica's WAL: LSN
    a..b is missing ...; no restore can cross it", exit 1 — though its newest snapshot
    holds every commit up to its LSN; only a restore to before the hole worked.  Now a
    restore of everything restores that snapshot (its LSN the cut), and `replicas` no
    longer says no restore reaches the replica's end."""
    flying = []

    def in_flight_across_the_snapshot():  # (an action logged, its transaction open)
        tx = s.transaction()
        tx.put("flying", 1)
        with tx.action("charge", compensate="refund") as act:
            act.result = "c1"
        s._engine.checkpoint()
        flying.append(tx)

    s, shipper, url = _replica_behind_a_trim(tmp_path, in_flight_across_the_snapshot)
    shipper._reach_hole_base = lambda durable: durable  # (the round before 3d8247c)
    try:
        summary = shipper.ship_once()
        assert shipper.manifest.doc["holes"], "the interleaving did not trim the WAL"
        assert summary["position"] < summary["snapshot"], summary
        expected = rows(s)
    finally:
        shipper.stop()
    flying[0].rollback()
    s.close()
    shutil.rmtree(tmp_path / "s")  # (the source is lost: why one restores)
    info = replicas(url)
    assert info["end_unrestorable"] is None, info["end_unrestorable"]
    assert info["snapshots"][-1]["restorable"], info["snapshots"]
    r = CliRunner().invoke(cli_main, ["restore", url, str(tmp_path / "r"), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 1, r.output  # (exit 1: the in-flight action's refund to decide)
    report = json.loads(r.stdout)
    assert [a["name"] for a in report["pending_compensations"]] == ["charge"], report
    assert report["cut_lsn"] == report["snapshot_lsn"] == summary["snapshot"], report
    assert report["in_flight_txids"] == [flying[0].id], report
    refunds = []
    with walstore.open(str(tmp_path / "r"), compensators={"refund": refunds.append}) as d:
        assert rows(d) == expected
        assert d.get("flying") is None and refunds == []  # (held: the source's to decide)
        assert [a.name for a in d.pending_compensations()] == ["charge"]
        with d.transaction() as tx:  # (a writable store, its log going on from the cut)
            tx.put("after", 1)
    with walstore.open(str(tmp_path / "r")) as d:
        assert d.get("after") == 1
    r = CliRunner().invoke(cli_main, ["verify", str(tmp_path / "r")])
    assert "no damage found" in r.output, r.output
