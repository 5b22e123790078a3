"""Audit 68: a restore of everything restores the newest consistent state the replica holds,
also when an ordinary end-of-round snapshot lies past the WAL its round shipped (LMDB ran
ahead of the frontier the round read) and the writer died before its next round — no hole,
so the WAL still reaches its own end from an older snapshot (Manifest.base_past_end)."""
from __future__ import annotations

import json
import os
import threading

from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.replication import follow, replicas

from store_support import kill_at_saved_snapshot, shipping_on_after_the_kill
from test_replication_support import rows

KILLED_AFTER_THE_ROUNDS_SNAPSHOT = r"""
import sys, time
import walstore
from walstore.replication import DirectorySource, Shipper
path, url = sys.argv[1], sys.argv[2]
s = walstore.open(path)
for i in range(60):
    with s.transaction() as tx:
        tx.put(f"a{i:04d}", "a" * 50)
shipper = Shipper(DirectorySource(path), url, {"interval": 30, "snapshot_interval": 0})
shipper.ship_once()  # (a first snapshot and the WAL)
for i in range(5):
    with s.transaction() as tx:
        tx.put(f"b{i:04d}", "b" * 50)
ship_wal, snapshot = shipper._ship_wal, shipper._snapshot

def writer_goes_on(durable, summary):  # (commits while the round ships its WAL to D)
    ship_wal(durable, summary)
    for i in range(10):
        with s.transaction() as tx:
            tx.put(f"c{i:04d}", "c" * 50)
    tx = s.transaction()  # (an action in flight at the snapshot: logged, not committed)
    tx.put("flying", 1)
    with tx.action("charge", compensate="refund") as act:
        act.result = "c1"
    s._engine.checkpoint()

def killed_here(summary):  # (the snapshot at A > D in the saved manifest)
    snapshot(summary)
    print("SNAPSHOT SAVED", flush=True)
    time.sleep(60)

shipper._ship_wal, shipper._snapshot = writer_goes_on, killed_here
shipper.ship_once()
"""


def _killed_after_the_rounds_snapshot(tmp_path) -> str:
    url = f"file://{tmp_path}/rep"
    kill_at_saved_snapshot(KILLED_AFTER_THE_ROUNDS_SNAPSHOT, str(tmp_path / "s"), url)
    return url


def test_no_acknowledged_commit_lost_a_writer_killed_after_its_rounds_snapshot(tmp_path):
    """A round ships the WAL to D; the writer goes on (10 commits, an action in flight) and
    the round's snapshot is of LMDB at A > D; the writer is killed -9 right after the
    manifest listing it was saved.  The WAL reaches D from the first snapshot (no hole),
    and a restore of everything restored the state at D (65 rows): the 10 commits the
    replica's snapshot holds were lost with the machine.  Now it restores the snapshot
    (cut at A), `replicas` says so, the in-flight action is pending (never run), the copy
    is writable and whole, and `--verify` is OK."""
    url = _killed_after_the_rounds_snapshot(tmp_path)
    info = replicas(url)
    newest = info["snapshots"][-1]
    assert info["position"] < newest["lsn"], info
    assert newest["restorable"] and info["end_unrestorable"] is None, info
    assert info["restore_everything"]["lsn"] == newest["lsn"], info
    assert info["restore_everything"]["past_wal_end"], info
    r = CliRunner().invoke(cli_main, ["replicas", url])
    assert f"a restore of everything restores the snapshot at LSN {newest['lsn']}" \
        in r.output, r.output
    assert "not restorable one by one" in r.output, r.output
    r = CliRunner().invoke(cli_main, ["restore", url, str(tmp_path / "r"), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 1, r.output  # (exit 1: the in-flight action's refund to decide)
    report = json.loads(r.stdout)
    assert report["cut_lsn"] == report["snapshot_lsn"] == newest["lsn"], report
    assert [a["name"] for a in report["pending_compensations"]] == ["charge"], report
    refunds = []
    with walstore.open(str(tmp_path / "r"), compensators={"refund": refunds.append}) as d:
        keys = [k for k, _v in rows(d)]
        assert len([k for k in keys if k[0] in "abc"]) == 75, keys
        assert d.get("flying") is None and refunds == []
        assert [a.name for a in d.pending_compensations()] == ["charge"]
        with d.transaction() as tx:
            tx.put("after", 1)
    r = CliRunner().invoke(cli_main, ["verify", str(tmp_path / "r")])
    assert "no damage found" in r.output, r.output
    checks = {c["check"]: c for c in replicas(url, verify=True)["verify"]["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["restore everything"]["cut_lsn"] == newest["lsn"], checks


def test_no_acknowledged_commit_lost_the_writer_back_ships_on_and_a_follower_starts_at_the_wal(
        tmp_path):
    """The same replica: a follower starts from the WAL's end (as before: it appends the
    WAL after its copy's end, and none reaches the snapshot yet) and the writer's store,
    reopened, takes the replica over and ships on; then the follower, and a restore of
    everything, hold every commit; a restore to a txid the WAL holds is unchanged."""
    url = _killed_after_the_rounds_snapshot(tmp_path)
    info = replicas(url)
    follower = str(tmp_path / "f")
    stop = threading.Event()
    follow(url, follower, {"interval": 0.05}, stop=stop, interval=0.05,
           on_round=lambda _info: stop.set())
    with walstore.open(follower, readonly=True) as f:
        assert len(rows(f)) == 65  # (a0..a59, b0..b4: the WAL's end)
    with shipping_on_after_the_kill(str(tmp_path / "s"), url) as s:
        expected = rows(s)
        tx_at_d = [e.txid for e in s.log() if e.lsn < info["position"]]
    assert replicas(url)["restore_everything"]["past_wal_end"] is False
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expected
    stop = threading.Event()
    follow(url, follower, {"interval": 0.05}, stop=stop, interval=0.05,
           on_round=lambda _info: stop.set())
    with walstore.open(follower, readonly=True) as f:
        assert rows(f) == expected
    walstore.restore(url, str(tmp_path / "t"), to=max(tx_at_d))
    with walstore.open(str(tmp_path / "t")) as t:
        assert len(rows(t)) == 65


def test_no_acknowledged_commit_lost_a_damaged_snapshot_past_the_wal_is_not_used(tmp_path):
    """A snapshot past the WAL's end whose object fails its sha256 is not restored: a
    restore of everything falls back to the WAL's end (as before), naming it skipped."""
    url = _killed_after_the_rounds_snapshot(tmp_path)
    newest = replicas(url)["snapshots"][-1]
    objs = [p for p in (tmp_path / "rep").rglob("*") if p.is_file()
            and p.name in {os.path.basename(s["k"]) for s in _snapshots(url)
                           if s["lsn"] == newest["lsn"]}]
    assert len(objs) == 1, objs
    data = bytearray(objs[0].read_bytes())
    data[-1] ^= 0xFF
    objs[0].write_bytes(bytes(data))
    report = walstore.restore(url, str(tmp_path / "r"))
    assert report["cut_lsn"] == replicas(url)["position"], report
    assert [k["lsn"] for k in report["snapshots_skipped"]] == [newest["lsn"]], report
    with walstore.open(str(tmp_path / "r")) as r:
        assert len(rows(r)) == 65


def _snapshots(url: str) -> list:
    from walstore.replication.restore import load_manifest
    from walstore.replication.options import ReplicateOptions
    from walstore.replication.targets import open_target
    tgt = open_target(url, ReplicateOptions())
    try:
        return load_manifest(tgt, ReplicateOptions()).snapshots
    finally:
        tgt.close()


def test_restore_of_everything_unchanged_from_a_fully_shipped_replica(tmp_path):
    """A replica shipped to its end (every snapshot at or below its position): a restore
    of everything gives the source's rows, log and restore points, as before."""
    url = f"file://{tmp_path}/rep"
    with walstore.open(str(tmp_path / "s"), replicate_to=url,
                       replicate_options={"interval": 0.05, "snapshot_interval": 0}) as s:
        for i in range(30):
            with s.transaction() as tx:
                tx.put(f"k{i:04d}", i)
            if i == 10:
                s.restore_point("ten")
        s.sync_replica(30)
        expected = (rows(s), [e.txid for e in s.log()], s.restore_points())
    info = replicas(url)
    assert info["restore_everything"] == {"lsn": info["position"], "past_wal_end": False,
                                          "txid": info["last_commit"]["tx"]}, info
    report = walstore.restore(url, str(tmp_path / "r"))
    assert report["cut_lsn"] == info["position"], report
    with walstore.open(str(tmp_path / "r")) as r:
        assert (rows(r), [e.txid for e in r.log()], r.restore_points()) == expected
    assert replicas(url, verify=True)["verify"]["ok"]
