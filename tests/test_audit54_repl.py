"""Audit 54, replication and restore under faults: regression tests (each failed on the
code before its fix).

Holes (the local WAL trimmed before it was shipped): a purge lost in one, a sync that
returned with no snapshot past one (or none at all), a restore to a time inside one.
A ``file://`` replica made unwritable by turning its directory into a file (as root a
chmod stops nothing).  A replica whose live writer merges and deletes objects while a
restore, a follower or a verify reads them (a real file target whose download lets the
writer go on first: what a read longer than ``delete_grace`` meets).  The sources are
real stores in this process, their shippers the real ones.
"""
from __future__ import annotations

import os

import pytest

import walstore
import walstore.store
import walstore.replication
from walstore.replication import replicas
from walstore.replication.targets import FileTarget


def _down(rep: str) -> None:
    """The replica's directory goes away, a file in its place: every write fails."""
    os.rename(rep, rep + ".away")
    with open(rep, "w"):
        pass


def _up(rep: str) -> None:
    os.unlink(rep)
    os.rename(rep + ".away", rep)


def test_a_purge_lost_in_a_hole_is_applied_by_a_restore_to_a_point_before_it(
        tmp_path, monkeypatch):
    """A purge made while the replica is unreachable waits for its shipper, then erases
    the local log past its own commit: the purge's record never reaches the replica (a
    hole).  A restore to a restore point made before the purge brought the erased key
    back (the replica's older WAL objects hold it, and no ``pg`` mark named the purge),
    though the source's ``at(point)`` shows it gone.  The hole now lists the purges of
    the range it lost, and the restore applies them."""
    monkeypatch.setattr(walstore.store, "PURGE_SHIP_WAIT_S", 0.5)  # (the wait, not the logic)
    path, rep = str(tmp_path / "src"), str(tmp_path / "rep")
    url = "file://" + rep
    opts = {"interval": 0.05, "max_backoff": 0.2}
    with walstore.open(path, replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("secret/a", "SSN-123")
            tx.put("pub", 1)
        s.restore_point("before")
        s.sync_replica(timeout=10)
        _down(rep)
        try:
            with s.transaction() as tx:
                tx.put("pub", 2)
            report = s.purge("secret/")
            with s.transaction() as tx:
                tx.put("pub", 3)
        finally:
            _up(rep)
        s.sync_replica(timeout=20)
        assert s.at("before").get("secret/a") is None and s.at("before").get("pub") == 1
    holes = replicas(url)["holes"]
    assert len(holes) == 1 and holes[0]["from"] <= report["lsn"] < holes[0]["to"], holes
    r = walstore.restore(url, str(tmp_path / "r"), to="before")
    assert r["purges_applied"] == ["secret/"]
    with walstore.open(str(tmp_path / "r")) as c:
        assert c.get("secret/a") is None  # (was "SSN-123")
        assert c.get("pub") == 1
        assert c.at("before").get("secret/a") is None


def test_sync_replica_waits_for_a_snapshot_past_a_hole(tmp_path, monkeypatch):
    """A hole's snapshot failed (the server down when the hole was found, or refusing
    ``snapshots/``) while the WAL after the hole shipped on: ``sync_replica`` returned —
    an RPO-0 point — though no restore of the replica's end could cross the hole (the
    source lost then, every commit after the hole was gone).  It now waits for a
    snapshot past the hole, and names the snapshot's failure when it times out."""
    monkeypatch.setattr(walstore.store, "PURGE_SHIP_WAIT_S", 0.5)  # (the wait, not the logic)
    path, rep = str(tmp_path / "src"), str(tmp_path / "rep")
    url = "file://" + rep
    with walstore.open(path, replicate_to=url,
                       replicate_options={"interval": 0.05, "max_backoff": 0.2}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=10)
        _down(rep)
        try:
            s.purge("zzz/")  # (its erasure trims the log the replica lacks: a hole)
            with s.transaction() as tx:
                tx.put("a", 2)
        finally:
            _up(rep)
        snaps = os.path.join(rep, "snapshots")
        os.makedirs(snaps, exist_ok=True)
        _down(snaps)  # (the replica takes WAL objects, refuses snapshots)
        try:
            with pytest.raises(walstore.ReplicationError, match="no restore can reach it"):
                s.sync_replica(timeout=1.5)
            with pytest.raises(walstore.ReplicationError, match="no restore can cross it"):
                walstore.restore(url, str(tmp_path / "lost"))  # (what it had vouched for)
        finally:
            _up(snaps)
        s.sync_replica(timeout=10)
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as c:
        assert c.get("a") == 2


def test_sync_replica_waits_for_the_first_snapshot_of_a_trimmed_store(tmp_path):
    """A store whose log was trimmed before replication began has no replica without a
    snapshot: with ``snapshots/`` refused, the WAL shipped and ``sync_replica`` returned
    (``replication().last_error`` None) though no restore could reach anything ("no
    snapshot at or before LSN ... from which its WAL reaches").  It now times out naming
    why, and returns once the snapshot is in."""
    path, rep = str(tmp_path / "src"), str(tmp_path / "rep")
    url = "file://" + rep
    kw = {"segment_size": 64 * 1024}
    with walstore.open(path, **kw) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 400)
        s.checkpoint()
    os.makedirs(os.path.join(rep, "snapshots"))
    _down(os.path.join(rep, "snapshots"))
    with walstore.open(path, replicate_to=url,
                       replicate_options={"interval": 0.05, "max_backoff": 0.2}, **kw) as s:
        with s.transaction() as tx:
            tx.put("last", 1)
        try:
            with pytest.raises(walstore.ReplicationError, match="no restore can reach it"):
                s.sync_replica(timeout=1.5)
        finally:
            _up(os.path.join(rep, "snapshots"))
        s.sync_replica(timeout=10)
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as c:
        assert c.get("last") == 1 and c.get("k299") == "v" * 400


def test_a_restore_to_a_time_whose_commits_a_hole_lost_is_refused(tmp_path):
    """The store written while not replicating (its pin ignored), its log trimmed: the
    replica records a hole.  A restore to a time inside the hole — the source's state
    then had commits the hole lost — cut before the hole, because the first record after
    it was stamped later: a silent prefix (exit 0, ``a`` = 0 where the source had 39).
    It is now refused naming the hole, as a restore needing a replay across one is."""
    import datetime as dt
    import time
    path, rep = str(tmp_path / "src"), str(tmp_path / "rep")
    url = "file://" + rep
    kw = {"segment_size": 64 * 1024}
    opts = {"interval": 0.05, "max_backoff": 0.2}
    with walstore.open(path, replicate_to=url, replicate_options=opts, **kw) as s:
        with s.transaction() as tx:
            tx.put("a", 0)
        s.sync_replica(timeout=10)
    with walstore.open(path, **kw) as s:  # (no replicate_to: the trim pin is not kept)
        for i in range(1, 40):
            with s.transaction() as tx:
                tx.put("a", i)
                tx.put(f"pad{i}", "x" * 300)
        when = dt.datetime.now(dt.timezone.utc)
        time.sleep(0.01)  # (the next stamp is later than ``when``, at the microsecond)
        with s.transaction() as tx:  # too large for the segment: it opens the next one
            tx.put("big", "y" * 60000)
        s.checkpoint()  # (every segment before it trimmed)
        lost_txid = next(t.txid for t in s.log() if t.timestamp <= when.timestamp())
        assert s.at(lost_txid).get("a") == 39
    with walstore.open(path, replicate_to=url, replicate_options=opts, **kw) as s:
        s.sync_replica(timeout=10)
    [hole] = replicas(url)["holes"]
    with pytest.raises(walstore.ReplicationError, match=f"LSN {hole['from']}..{hole['to']}"):
        walstore.restore(url, str(tmp_path / "r"), to=when)
    assert not os.path.exists(tmp_path / "r")
    # a txid the hole lost: refused naming the hole (it read as a txid that never committed)
    with pytest.raises(walstore.UnknownPoint, match=f"lost LSN {hole['from']}..{hole['to']}"):
        walstore.restore(url, str(tmp_path / "r"), to=lost_txid)


class _WriterGoesOn(FileTarget):
    """The replica as a restore or follower reads it (the real file target): the first
    time it is armed and downloads a WAL object, the replica's writer goes on first —
    commits, compaction merging that object, retention deleting it (``delete_grace`` 0:
    what a restore or follower round longer than the grace meets) — until the object is
    gone."""

    def __init__(self, root: str, store) -> None:
        super().__init__(root)
        self.store = store
        self.armed = False
        self.dropped: list[str] = []

    def download(self, key, f, max_bytes):
        if self.armed and key.startswith("wal/"):
            self.armed = False
            for i in range(40):
                if key not in {k for k, _n in self.list("wal/")}:
                    break
                with self.store.transaction() as tx:
                    tx.put(f"more{i}", i)
                self.store._shipper.ship_once()
            self.dropped.append(key)
        return super().download(key, f, max_bytes)


def _compacting_writer(tmp_path, monkeypatch):
    import walstore.replication.shipper as shipper
    monkeypatch.setattr(shipper, "RETENTION_EVERY", 0.0)  # (retention's cadence: each round)
    rep = str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to="file://" + rep,
                      replicate_options={"interval": 3600, "lease_ttl": 3 * 3600,
                                         "compact_fanout": 2, "delete_grace": 0})
    for i in range(3):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
        s._shipper.ship_once()
    return s, rep


def test_a_restore_outlasting_delete_grace_begins_again_from_the_manifest_now(
        tmp_path, monkeypatch):
    """A restore reads the manifest, then downloads what it lists; the replica's writer
    meanwhile merged and deleted an object it listed (a restore longer than
    ``delete_grace`` of a live replica): it failed with "hole in the replica's WAL ...
    listed in the manifest but missing" though the replica had no hole.  It now begins
    again from the manifest as it is now."""
    s, rep = _compacting_writer(tmp_path, monkeypatch)
    try:
        t = _WriterGoesOn(rep, s)
        t.armed = True
        r = walstore.replication.restore("file://" + rep, str(tmp_path / "r"), target=t)
        assert t.dropped and r["cut_lsn"] > 0
        with walstore.open(str(tmp_path / "r")) as c:
            assert c.get("k2") == 2
            assert c.get("more0") == 0  # (the manifest it began again from has it)
    finally:
        s.close()


def test_a_follower_round_outlasting_delete_grace_goes_on(tmp_path, monkeypatch):
    """As above, for a follower's round: it stopped for good (not a transient error).  It
    now retries, reads the manifest now and goes on from DEST's position."""
    import threading
    s, rep = _compacting_writer(tmp_path, monkeypatch)
    stop = threading.Event()
    rounds: list[dict] = []
    failed: list[BaseException] = []
    t = _WriterGoesOn(rep, s)

    def on_round(info: dict) -> None:
        rounds.append(info)
        if len(rounds) == 1:  # (the restore is done: its next round meets the writer)
            with s.transaction() as tx:
                tx.put("next", 1)
            s._shipper.ship_once()
            t.armed = True
        elif t.dropped and info.get("position") == s._shipper.shipped:
            stop.set()

    def run() -> None:
        try:
            walstore.replication.follow("file://" + rep, str(tmp_path / "f"), stop=stop,
                                        interval=0.01, apply_every=0, on_round=on_round,
                                        target=t)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            failed.append(e)
            stop.set()

    th = threading.Thread(target=run)
    th.start()
    try:
        assert stop.wait(30)
    finally:
        stop.set()
        th.join(30)
        s.close()
    assert not failed, failed
    assert t.dropped and any("error" in r for r in rounds)
    with walstore.open(str(tmp_path / "f"), readonly=True) as c:
        assert c.get("next") == 1 and c.get("more0") == 0


def test_verify_outlasting_delete_grace_does_not_report_dropped_objects_as_holes(
        tmp_path, monkeypatch):
    """`replicas --verify` of a replica being written: an object its manifest listed,
    merged and deleted by the writer while verify ran (a verify longer than
    ``delete_grace``), was a failure ("hole in the replica's WAL ... listed in the
    manifest but missing"), exit 1, on a sound replica.  It is now listed as dropped
    since the manifest was read."""
    s, rep = _compacting_writer(tmp_path, monkeypatch)
    try:
        t = _WriterGoesOn(rep, s)
        t.armed = True
        report = replicas("file://" + rep, verify=True, target=t)
    finally:
        s.close()
    v = report["verify"]
    assert t.dropped, "the writer dropped nothing: the test proves nothing"
    assert v["ok"], [c for c in v["checks"] if not c["ok"]]
    [objects] = [c for c in v["checks"] if c["check"] == "every WAL object"]
    assert t.dropped[0] in objects["dropped_since_read"]


def test_a_follower_goes_on_after_its_file_replica_was_unreadable_for_a_while(tmp_path):
    """A ``file://`` replica unreadable for a moment (its mount gone: here its directory
    turned into a file, ENOTDIR) stopped the follower for good with a StoreIOError, where
    an S3 server unreachable is retried.  It is now a transient error: reported in the
    round, retried, and the follower goes on."""
    import threading
    rep = str(tmp_path / "rep")
    url = "file://" + rep
    stop = threading.Event()
    rounds: list[dict] = []
    failed: list[BaseException] = []
    first = threading.Event()
    erred = threading.Event()

    def on_round(info: dict) -> None:
        rounds.append(info)
        first.set()
        if "error" in info:
            erred.set()
        elif erred.is_set() and info.get("position") == target[0]:
            stop.set()

    def run() -> None:
        try:
            walstore.replication.follow(url, str(tmp_path / "f"), stop=stop, interval=0.01,
                                        apply_every=0, on_round=on_round)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            failed.append(e)
            stop.set()

    target = [-1]
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=10)
        th = threading.Thread(target=run)
        th.start()
        try:
            assert first.wait(10)
            _down(rep)
            try:
                assert erred.wait(10) or failed, "no round met the unreadable replica"
            finally:
                _up(rep)
            with s.transaction() as tx:
                tx.put("a", 2)
            s.sync_replica(timeout=10)
            target[0] = s.replication().shipped_lsn
            assert stop.wait(20)
        finally:
            stop.set()
            th.join(20)
    assert not failed, failed
    assert any("Not a directory" in r.get("error", "") for r in rounds)
    with walstore.open(str(tmp_path / "f"), readonly=True) as c:
        assert c.get("a") == 2
