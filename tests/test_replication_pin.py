"""Replication's trim pin and snapshots over time: ``max_pin_bytes`` bounds the local WAL
while the server is hung, a shipper stopped for good lets go of its pin, a snapshot that
keeps failing is reported and does not hold up the WAL, and restore points retention
dropped stay dropped.  Real stores, moto's S3 server behind a paused TCP proxy, file://
replicas."""
from __future__ import annotations

import os
import shutil
import time

from test_replication_support import Proxy, make_s3_replica, s3_endpoint  # noqa: F401

import walstore
from walstore.replication import shipper as shipper_mod
from walstore.replication import open_target
from walstore.replication.manifest import Manifest
from walstore.replication.options import ReplicateOptions
from walstore.replication.restore import replicas

MIB = 1 << 20
SMALL = {"segment_size": MIB, "checkpoint_bytes": MIB}


def wal_bytes(path: str) -> int:
    d = os.path.join(path, "wal")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def write_mib(s, mib: int, tag: str = "k") -> None:
    for i in range(mib * 256):
        with s.transaction() as tx:
            tx.put(f"{tag}{i % 100}", os.urandom(4000))


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_max_pin_bytes_bounds_the_wal_while_the_server_hangs(s3_endpoint, tmp_path):  # noqa
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    rep = make_s3_replica(s3_endpoint)
    opts = rep.opts(endpoint_url=proxy.url, connect_timeout=0.5, read_timeout=0.5,
                    max_attempts=1, max_backoff=0.3, max_pin_bytes=MIB)
    path = str(tmp_path / "s")
    s = walstore.open(path, replicate_to=rep.url, replicate_options=opts, **SMALL)
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        proxy.pause()  # every request hangs: rounds fail (or hang) from here on
        write_mib(s, 6)
        s.checkpoint()
        assert s.replication().lag_bytes > 5 * MIB
        # the pin let go past max_pin_bytes: the WAL is the bound plus a segment or two
        assert wal_bytes(path) <= 4 * MIB, wal_bytes(path)
        proxy.resume()
    finally:
        s.close()
        proxy.close()


def test_a_shipper_stopped_for_good_lets_go_of_its_pin(tmp_path):
    path, rep = str(tmp_path / "s"), str(tmp_path / "replica")
    s = walstore.open(path, replicate_to="file://" + rep, **SMALL,
                      replicate_options={"interval": 0.05, "max_pin_bytes": 64 * MIB})
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        os.remove(os.path.join(rep, "manifest"))  # the replica wiped under the writer
        with s.transaction() as tx:
            tx.put("b", 1)
        wait_for(lambda: s.replication().state == "lease-lost")
        write_mib(s, 6)
        s.checkpoint()
        s.checkpoint()
        # nothing ships any more: the WAL is trimmed as without replication (the pin, well
        # within max_pin_bytes, stayed until close)
        assert wal_bytes(path) <= 3 * MIB, wal_bytes(path)
    finally:
        s.close()


def test_a_failing_snapshot_is_reported_and_holds_up_nothing(tmp_path):
    path, rep = str(tmp_path / "s"), str(tmp_path / "replica")
    s = walstore.open(path, replicate_to="file://" + rep, **SMALL,
                      replicate_options={"interval": 0.05, "max_backoff": 0.2,
                                         "max_pin_bytes": 64 * MIB, "snapshot_interval": 0,
                                         "compact_fanout": 2})
    snaps = os.path.join(rep, "snapshots")
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        shutil.rmtree(snaps, ignore_errors=True)
        with open(snaps, "wb"):  # no snapshot can be written from now on (a file there)
            pass
        for n in range(6):
            write_mib(s, 1, f"k{n}-")
            s.sync_replica(timeout=30)  # the WAL ships
        st = s.replication()
        assert st.state == "running"
        assert st.last_error and "a snapshot failed" in st.last_error, st
        s.checkpoint()
        s.checkpoint()
        # the rounds went on past the snapshot: pinned at the shipped position, compacted
        assert wal_bytes(path) <= 3 * MIB, wal_bytes(path)
        target = open_target("file://" + rep, ReplicateOptions())
        try:
            assert any(e["lv"] > 0 for e in Manifest.load(target, 1 << 30).wal)
        finally:
            target.close()
        os.remove(snaps)  # the cause goes away: a snapshot succeeds, the report clears
        with s.transaction() as tx:
            tx.put("b", 2)
        s.sync_replica(timeout=30)
        wait_for(lambda: s.replication().last_error is None, timeout=30)
        assert s.replication().snapshots >= 2
    finally:
        s.close()


def test_restore_points_dropped_by_retention_do_not_come_back(tmp_path, monkeypatch):
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/replica"
    s = walstore.open(path, replicate_to=url, replicate_options={
        "interval": 0.05, "snapshot_interval": 0, "retention_seconds": 0,
        "retain_snapshots": 1, "delete_grace": 0})

    def work(tag: str) -> None:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"k{i}", os.urandom(100))
            s.restore_point(f"{tag}{i}")
        s.checkpoint()
        s.sync_replica(timeout=30)
        with s.transaction() as tx:  # one more round: its snapshot holds the points
            tx.put("tick", tag)
        s.sync_replica(timeout=30)

    try:
        monkeypatch.setattr(shipper_mod, "RETENTION_EVERY", 0.0)
        work("a")
        work("b")  # retention (every round here) drops a* with the old snapshots
        wait_for(lambda: "a0" not in {p["name"] for p in replicas(url)["restore_points"]})
        monkeypatch.setattr(shipper_mod, "RETENTION_EVERY", 1e9)  # no retention from here
        work("c")  # new snapshots: their LMDB still names a0..a4
    finally:
        s.close()
    rep = replicas(url)
    oldest = min(p["lsn"] for p in rep["snapshots"] if p["restorable"])
    below = [p["name"] for p in rep["restore_points"] if p["lsn"] < oldest]
    assert below == []
    assert {"c0", "c4"} <= {p["name"] for p in rep["restore_points"]}


def test_a_replica_lagging_past_max_pin_bytes_still_gets_the_content_its_records_name(
        s3_endpoint, tmp_path):  # noqa: F811
    # (probe-repl44: past max_pin_bytes the shipper let go of its pin, and with it the blob
    # gc's keeping of what the unshipped WAL names; the records were still on disk (in the
    # current segment: no hole), so they were shipped later, naming content the gc had
    # removed — 37 blobs missing from the replica, 40 of 40 point restores without their
    # files, no error anywhere)
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    rep = make_s3_replica(s3_endpoint)
    opts = rep.opts(endpoint_url=proxy.url, connect_timeout=0.5, read_timeout=0.5,
                    max_attempts=1, max_backoff=0.2, max_pin_bytes=20_000)
    os.makedirs(tmp_path / "ws")
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url, replicate_options=opts,
                      retain_transactions=1)
    contents = {}
    try:
        ws = s.workspace(str(tmp_path / "ws"))
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "v0")
        s.sync_replica(timeout=30)
        proxy.pause()  # the server unreachable: the lag grows past the bound
        for i in range(1, 21):
            with s.transaction() as tx:
                tx.files(ws).write("a.txt", f"version {i}\n" * 200)
                tx.put("pad", "x" * 1000)
            contents[tx.id] = f"version {i}\n".encode() * 200
            if i % 5 == 0:
                s.checkpoint()  # retention trims the versions, the gc runs
        assert s.replication().lag_bytes > 20_000
        proxy.resume()
        s.sync_replica(timeout=60)
    finally:
        s.close()
        proxy.close()
    ro = {"endpoint_url": s3_endpoint}
    report = walstore.restore(rep.url, str(tmp_path / "copy"), replicate_options=ro)
    assert report["blobs_missing"] == []
    copy = walstore.open(str(tmp_path / "copy"))
    try:
        for txid in list(contents)[::4]:
            assert copy.at(txid).files(str(tmp_path / "ws")).read("a.txt") == contents[txid]
    finally:
        copy.close()


def test_retention_deletes_nothing_the_saved_manifest_still_lists(tmp_path, monkeypatch):
    # (replsweep: with delete_grace 0, retention deleted the objects it dropped before the
    # manifest dropping them was saved; that save failing left the replica's manifest
    # naming deleted objects — a restore read it and failed — until a later round)
    import sys
    from walstore.replication.targets import TargetError
    url = f"file://{tmp_path / 'rep'}"
    opts = ReplicateOptions.from_any({"interval": 0.05, "snapshot_interval": 0.0,
                                      "retention_seconds": 0.0, "retain_snapshots": 1,
                                      "delete_grace": 0.0})
    real_save = shipper_mod.Shipper._save
    armed = {"on": False, "fired": 0}

    def save(self):
        if armed["on"] and sys._getframe(1).f_code.co_name == "_retain":
            armed["on"] = False
            armed["fired"] += 1
            raise TargetError("PUT manifest: injected failure", True)
        return real_save(self)
    monkeypatch.setattr(shipper_mod.Shipper, "_save", save)
    monkeypatch.setattr(shipper_mod, "RETENTION_EVERY", 0.0)
    s = walstore.open(str(tmp_path / "s"))
    from walstore.replication import InProcessSource
    sh = shipper_mod.Shipper(InProcessSource(s), url, opts)
    try:
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
            armed["on"] = i == 2
            try:
                sh.ship_once()
            except TargetError:
                pass
        assert armed["fired"] == 1
        target = open_target(url, opts)
        saved = Manifest.load(target, opts.max_manifest_bytes)
        stored = {k for k, _n in target.list("")}
        named = {sn["k"] for sn in saved.snapshots if sn["k"]} | {e["k"] for e in saved.wal}
        assert named <= stored, named - stored
    finally:
        sh.stop()
        s.close()
    walstore.restore(url, str(tmp_path / "copy"))
    with walstore.open(str(tmp_path / "copy")) as c:
        assert [c.get(f"k{i}") for i in range(3)] == [0, 1, 2]
