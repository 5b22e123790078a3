"""Replication: restores to every kind of point, holes, leases, retention, compaction,
verify, the CLI, against a real S3 server (moto, over HTTP) and a file:// replica."""
from __future__ import annotations

import datetime as dt
import json
import os
import time

import click
import pytest
from click.testing import CliRunner

from test_replication_support import (SECRET_KEY, SECRET_KEY_ID, make_s3_replica,  # noqa: F401
                                      replica, rows, s3_endpoint)

import walstore
from walstore import LSN
from walstore.replication import DirectorySource, Shipper, replicas
from walstore.cli import main as walstore_cli
from walstore.cli.replication import parse_point
from walstore.replication.manifest import Manifest


def cli():
    return walstore_cli


def run_cli(*args, env=None):
    return CliRunner().invoke(cli(), [str(a) for a in args], env=env, catch_exceptions=False)


def build_history(s) -> dict:
    """Commits, deletes, restore points, a multi-chunk transaction; returns the points."""
    points: dict = {}
    for i in range(30):
        with s.transaction(meta={"step": i}) as tx:
            tx.put(f"k{i:03d}", {"i": i, "pad": "x" * 50})
            if i % 7 == 0 and i:
                tx.delete(f"k{i - 3:03d}")
        if i % 10 == 4:
            points[f"p{i}"] = s.restore_point(f"p{i}")
    with s.transaction() as tx:  # > 4 MiB: WRITES chunks before the COMMIT
        for j in range(3):
            tx.put(f"big{j}", "b" * 2_000_000)
    points["after-big"] = s.restore_point("after-big")
    for i in range(30, 40):
        with s.transaction() as tx:
            tx.put(f"k{i:03d}", i)
            tx.delete("big1") if i == 35 else None
    return points


def test_restore_to_every_point_equals_at(replica, tmp_path):
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts())
    try:
        points = build_history(src)
        src.sync_replica(timeout=30)
        assert src.replication().lag_bytes == 0
        for name, lsn in points.items():
            dest = str(tmp_path / f"r-{name}")
            report = walstore.restore(replica.url, dest, to=name,
                                      replicate_options=replica.options)
            r = walstore.open(dest)
            try:
                assert rows(r) == rows(src.at(name)), name
                assert set(r.restore_points()) == {n for n, l in points.items() if l <= lsn}
                assert report["cut_lsn"] > lsn
            finally:
                r.close()
        # a txid, an LSN, a time: each equals at() of the same point
        log = src.log()
        mid = log[len(log) // 2]
        for to, at in [(mid.txid, mid.txid), (LSN(mid.lsn), LSN(mid.lsn))]:
            dest = str(tmp_path / f"r-{type(to).__name__}")
            walstore.restore(replica.url, dest, to=to, replicate_options=replica.options)
            with walstore.open(dest) as r:
                assert rows(r) == rows(src.at(at))
                assert [i.txid for i in r.log()] == [i.txid for i in log if i.lsn <= mid.lsn]
        when = dt.datetime.fromtimestamp(mid.timestamp, dt.timezone.utc)
        dest = str(tmp_path / "r-time")
        walstore.restore(replica.url, dest, to=when, replicate_options=replica.options)
        with walstore.open(dest) as r:
            # (at a datetime's resolution: ``mid`` itself is in; a float comparison left it
            # out whenever its stamp had digits past the microsecond)
            last = max(i.lsn for i in log
                       if dt.datetime.fromtimestamp(i.timestamp, dt.timezone.utc) <= when)
            assert last >= mid.lsn
            assert rows(r) == rows(src.at(LSN(last)))
        dest = str(tmp_path / "r-all")
        walstore.restore(replica.url, dest, replicate_options=replica.options)
        with walstore.open(dest) as r:
            assert rows(r) == rows(src)
            assert r.get("big0") == "b" * 2_000_000
            for key in ("k010", "k007", "big1"):  # history survives: every version, same txids
                assert r.history(key) == src.history(key)
            ident = json.load(open(os.path.join(dest, "STORE")))
            assert ident["origin"]["kind"] == "restore" and ident["store_id"] == src.store_id.hex()
            assert ident["origin"]["from"] == replica.url
        for bad in ("no-such-point", 10_000, LSN(10**12)):
            with pytest.raises(walstore.ReplicationError):
                walstore.restore(replica.url, str(tmp_path / "bad"), to=bad,
                                 replicate_options=replica.options)
        assert not os.path.exists(tmp_path / "bad")
        with pytest.raises(ValueError):
            walstore.restore(replica.url, str(tmp_path / "bad"), to=dt.datetime.now(),
                             replicate_options=replica.options)
    finally:
        src.close()


def test_in_flight_transaction_at_cut_is_not_run(replica, tmp_path):
    ran = []
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts(), compensators={"undo": ran.append})
    try:
        with src.transaction() as tx:
            tx.put("a", 1)
        tx = src.transaction()
        with tx.action("charge", args={"amount": 5}, compensate="undo") as act:
            act.result = {"charge": "c1"}
        tx.put("b", 2)
        point = src.restore_point("mid-action")
        tx.commit()
        src.sync_replica(timeout=30)
        dest = str(tmp_path / "r")
        report = walstore.restore(replica.url, dest, to="mid-action",
                                  replicate_options=replica.options)
        assert report["in_flight_txids"] == [tx.id] and point < tx.lsn
        with walstore.open(dest) as r:  # no compensator registered: listed, not run
            assert r.get("a") == 1 and r.get("b") is None
            pending = r.pending_compensations()
            assert [a.name for a in pending] == ["charge"]
        assert ran == []
        res = run_cli("restore", replica.url, str(tmp_path / "r2"), "--to", "mid-action",
                      *replica.cli_args())
        assert res.exit_code == 1 and "pending compensation" in res.output
    finally:
        src.close()


def test_restore_to_a_time_keeps_what_was_logged_before_it(replica, tmp_path):
    """A time is a cut of the log, not of the commits: a restore point made and an action
    begun after the last commit before the time are in the copy (the action listed as
    owed, not run); nothing logged after the time is."""
    ran = []
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts(), compensators={"undo": ran.append})
    try:
        src.run(lambda tx: tx.put("a", 1))
        src.restore_point("before")
        tx = src.transaction()
        with tx.action("charge", args={"amount": 5}, compensate="undo") as act:
            act.result = {"charge": "c1"}
        time.sleep(0.05)
        when = dt.datetime.now(dt.timezone.utc)
        time.sleep(0.05)
        src.restore_point("after")
        tx.put("b", 2)
        tx.commit()
        src.run(lambda t: t.put("c", 3))
        src.sync_replica(timeout=30)
        report = walstore.restore(replica.url, str(tmp_path / "r"), to=when,
                                  replicate_options=replica.options)
        assert report["in_flight_txids"] == [tx.id]
        with walstore.open(str(tmp_path / "r")) as r:
            assert rows(r) == [("a", 1)]
            assert set(r.restore_points()) == {"before"}
            assert [(a.name, a.state) for a in r.pending_compensations()] == [
                ("charge", "pending")]
        assert ran == []
    finally:
        src.close()


def test_hole_in_wal_objects_is_named(replica, tmp_path):
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts(compact_fanout=1000))
    try:
        for i in range(6):
            with src.transaction() as tx:
                tx.put(f"k{i}", i)
            src.sync_replica(timeout=30)
        wal = replica.keys("wal/")
        assert len(wal) >= 4
        victim = wal[2]
        replica.delete(victim)
        with pytest.raises(walstore.ReplicationError) as e:
            walstore.restore(replica.url, str(tmp_path / "r"), replicate_options=replica.options)
        assert victim in str(e.value) and "hole" in str(e.value)
        assert not os.path.exists(tmp_path / "r")
        # a point before the hole still restores
        first_end = int(wal[0].split("-")[1])
        walstore.restore(replica.url, str(tmp_path / "r0"), to=LSN(first_end - 1),
                         replicate_options=replica.options)
        res = run_cli("replicas", replica.url, "--verify", *replica.cli_args())
        assert res.exit_code == 1 and "FAILED" in res.output
    finally:
        src.close()


def test_trimmed_wal_becomes_a_named_hole(replica, tmp_path):
    path = str(tmp_path / "src")
    s = walstore.open(path, segment_size=64 * 1024)
    try:
        with s.transaction() as tx:
            tx.put("start", 1)
        sh = Shipper(DirectorySource(path), replica.url, replica.opts())
        sh.ship_once()
        early = s.restore_point("early")
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 500)
            if i == 50:
                lost = s.restore_point("lost")
        s.checkpoint()  # trims the segments the shipper never read
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"late{i}", i)
        late = s.restore_point("late")
        sh.ship_once()
        sh.stop()
        m = Manifest.load(replica.target(), 1 << 26)
        hole = m.doc["holes"]
        assert len(hole) == 1 and hole[0]["a"] <= early and hole[0]["a"] <= lost < hole[0]["b"]
        with pytest.raises(walstore.ReplicationError) as e:
            walstore.restore(replica.url, str(tmp_path / "r1"), to="lost",
                             replicate_options=replica.options)
        assert "hole" in str(e.value) and "trimmed" in str(e.value)
        walstore.restore(replica.url, str(tmp_path / "r2"), to="late",
                         replicate_options=replica.options)
        with walstore.open(str(tmp_path / "r2")) as r:
            assert rows(r) == rows(s.at(late))
        assert late > lost
    finally:
        s.close()


def test_second_writer_refused_and_lineage_kept_apart(replica, tmp_path):
    a = walstore.open(str(tmp_path / "a"), replicate_to=replica.url,
                      replicate_options=replica.opts())
    try:
        with a.transaction() as tx:
            tx.put("x", 1)
        a.sync_replica(timeout=30)
        with pytest.raises(walstore.ReplicationError) as e:
            walstore.open(str(tmp_path / "b"), replicate_to=replica.url,
                          replicate_options=replica.opts())
        assert f"process {os.getpid()}" in str(e.value) and "another writer" in str(e.value)
        b = walstore.open(str(tmp_path / "b"))  # the store itself still opens fine
        b.close()
        res = run_cli("replicate", str(tmp_path / "b"), replica.url, "--once",
                      *replica.cli_args())
        assert res.exit_code == 1 and "another writer" in res.output
    finally:
        a.close()
    # a restored copy has a new lineage: refused at the old URL, fine at a new one
    dest = str(tmp_path / "restored")
    walstore.restore(replica.url, dest, replicate_options=replica.options)
    with pytest.raises(walstore.ReplicationError) as e:
        walstore.open(dest, replicate_to=replica.url, replicate_options=replica.opts())
    assert "lineage" in str(e.value)
    new_url = replica.url + "-restored" if replica.kind == "file" else replica.url + "/v2"
    r = walstore.open(dest, replicate_to=new_url, replicate_options=replica.opts())
    try:
        with r.transaction() as tx:
            tx.put("y", 2)
        r.sync_replica(timeout=30)
    finally:
        r.close()
    walstore.restore(new_url, str(tmp_path / "again"), replicate_options=replica.options)
    with walstore.open(str(tmp_path / "again")) as g:
        assert g.get("x") == 1 and g.get("y") == 2


def test_idle_store_sends_no_requests(replica, tmp_path):
    s = walstore.open(str(tmp_path / "s"), replicate_to=replica.url,
                      replicate_options=replica.opts(interval=0.02))
    try:
        with s.transaction() as tx:
            tx.put("x", 1)
        s.sync_replica(timeout=30)
        time.sleep(0.3)
        before = dict(s.replication().requests)
        time.sleep(1.5)  # ~75 rounds with nothing new
        assert s.replication().requests == before
        with s.transaction() as tx:
            tx.put("y", 1)
        s.sync_replica(timeout=30)
        assert sum(s.replication().requests.values()) > sum(before.values())
    finally:
        s.close()


def test_compaction_and_retention(replica, tmp_path):
    opts = replica.opts(compact_fanout=4, snapshot_interval=0.0, retain_snapshots=2,
                        retention_seconds=3600.0, delete_grace=0.0)
    import walstore.replication.shipper as shipper_mod
    old = shipper_mod.RETENTION_EVERY
    shipper_mod.RETENTION_EVERY = 0.0
    path = str(tmp_path / "s")
    s = walstore.open(path)
    sh = Shipper(DirectorySource(path), replica.url, opts)  # rounds driven by hand
    try:
        for i in range(40):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
            if i % 8 == 0:
                s.restore_point(f"p{i}")
            if i % 10 == 9:
                s.checkpoint()  # LMDB moves: snapshots differ
            sh.ship_once()
        m = Manifest.load(replica.target(), 1 << 26)
        assert any(e["lv"] > 0 for e in m.wal) and len(m.snapshots) > 2
        sh.opts.retention_seconds = 0.0
        sh.ship_once()  # a round with nothing new: retention and trash only
        m = Manifest.load(replica.target(), 1 << 26)
        assert len(m.snapshots) == 2
        assert len(m.wal) < 20
        listed = {e["k"] for e in m.wal} | {x["k"] for x in m.snapshots if x["k"]}
        stored = set(replica.keys("wal/")) | set(replica.keys("snapshots/"))
        assert stored == listed  # merged-away and expired objects were deleted
        dest = str(tmp_path / "r")
        walstore.restore(replica.url, dest, replicate_options=replica.options)
        with walstore.open(dest) as r:
            assert rows(r) == rows(s)
        with pytest.raises(walstore.ReplicationError) as e:
            walstore.restore(replica.url, str(tmp_path / "old"), to="p0",
                             replicate_options=replica.options)
        # (it said only "no restore point named 'p0'", as for a name never made)
        first = min(x["lsn"] for x in m.snapshots)
        assert f"history begins at LSN {first}" in str(e.value)
        assert "dropped by the replica's retention" in str(e.value)
    finally:
        shipper_mod.RETENTION_EVERY = old
        sh.stop()
        s.close()


def test_replicas_listing_and_verify(replica, tmp_path):
    opts = replica.opts(snapshot_interval=0.0)
    s = walstore.open(str(tmp_path / "s"), replicate_to=replica.url, replicate_options=opts)
    try:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
            if i in (5, 15):
                s.restore_point(f"p{i}")
                s.sync_replica(timeout=30)
        s.checkpoint()  # LMDB applied up to the end: the next snapshot is a new one
        s.sync_replica(timeout=30)
        s._shipper.ship_once()
    finally:
        s.close()
    rep = replicas(replica.url, verify=True, replicate_options=replica.options)
    assert rep["verify"]["ok"], rep["verify"]
    assert [p["name"] for p in rep["restore_points"]] == ["p5", "p15"]
    assert len(rep["snapshots"]) >= 2
    digest = [c for c in rep["verify"]["checks"] if c["check"] == "state digest"][0]
    assert digest["base_snapshot_lsn"] < digest["lsn"]
    res = run_cli("replicas", replica.url, "--json", *replica.cli_args())
    doc = json.loads(res.output)
    assert res.exit_code == 0 and doc["wal"]["end"] == rep["wal"]["end"]
    res = run_cli("replicas", replica.url, *replica.cli_args())
    assert "point     p15" in res.output
    # a damaged snapshot is caught
    snap = sorted(replica.keys("snapshots/"))[-1]
    t = replica.target()
    t.put(snap, b"not an lmdb file")
    t.close()
    assert not replicas(replica.url, verify=True, replicate_options=replica.options)["verify"]["ok"]


def test_cli_restore_and_replicate_once(replica, tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.restore_point("five")
        with s.transaction() as tx:
            tx.put("k9", 9)
        txid = s.log()[0].txid
    res = run_cli("replicate", path, replica.url, "--once", "--json", *replica.cli_args())
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["position"] > 0
    res = run_cli("restore", replica.url, str(tmp_path / "r1"), "--to", "five",
                  *replica.cli_args())
    assert res.exit_code == 0, res.output
    with walstore.open(str(tmp_path / "r1")) as r:
        assert r.get("k4") == 4 and r.get("k9") is None
    res = run_cli("restore", replica.url, str(tmp_path / "r2"), "--to", f"tx:{txid}", "--json",
                  *replica.cli_args())
    assert res.exit_code == 0 and json.loads(res.output)["target"] == f"transaction {txid}"
    with walstore.open(str(tmp_path / "r2")) as r:
        assert r.get("k9") == 9
    roots = [str(tmp_path / "r1")] + ([replica.url[len("file://"):]] if replica.kind == "file" else [])
    for root in roots:  # files 0600, directories 0700
        for d, dirs, files in os.walk(root):
            assert os.stat(d).st_mode & 0o777 == 0o700, d
            for f in files:
                assert os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o600, f
    res = run_cli("restore", replica.url, str(tmp_path / "r3"), "--to", "2001-01-01T00:00:00Z",
                  *replica.cli_args())
    assert res.exit_code == 2 and "before the first commit" in res.output  # names nothing
    res = run_cli("restore", replica.url, str(tmp_path / "r4"), "--to", "2001-01-01T00:00:00",
                  *replica.cli_args())
    assert res.exit_code == 2


def test_parse_point():
    assert parse_point("tx:12") == 12 and not isinstance(parse_point("12"), LSN)
    assert parse_point("12") == 12
    p = parse_point("lsn:40")  # (kept as spelled until the replica's point names are
    # read: a restore point walstore 0.1.0 named "lsn:40" makes it ambiguous — audit 61)
    from walstore.cli.output import plain_point
    assert p == 40 and isinstance(plain_point(p), LSN) and not isinstance(p, LSN)
    assert p.settle({}) == 40 and isinstance(p.settle({}), LSN)
    t = parse_point("2026-05-01T12:00:00Z")
    assert t.tzinfo is not None and t.hour == 12
    assert parse_point("before-deploy") == "before-deploy"
    with pytest.raises(click.BadParameter):
        parse_point("2026-05-01T12:00:00")


def test_credentials_never_in_urls_outputs_or_files(s3_endpoint, tmp_path):
    rep = make_s3_replica(s3_endpoint)
    env = {"AWS_ENDPOINT_URL": s3_endpoint}
    with pytest.raises(walstore.ReplicationError) as e:
        walstore.open(str(tmp_path / "x"), replicate_to=rep.url.replace(
            "s3://", f"s3://{SECRET_KEY_ID}:{SECRET_KEY.replace('/', '%2F')}@"))
    assert SECRET_KEY_ID not in str(e.value) and SECRET_KEY not in str(e.value)
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", "v")
        s.restore_point("p")
    outputs = []
    for args in (["replicate", path, rep.url, "--once"],
                 ["replicas", rep.url, "--json"], ["replicas", rep.url, "--verify"],
                 ["restore", rep.url, str(tmp_path / "r"), "--to", "p"],
                 ["restore", rep.url, str(tmp_path / "r2"), "--to", "missing"],
                 ["replicate", path, "s3://no-such-bucket-xyz/p", "--once"]):
        res = CliRunner().invoke(cli(), args, env=env, catch_exceptions=False)
        outputs.append(res.output)
    assert "restored" in outputs[3] and "missing" in outputs[4]
    with walstore.open(path, replicate_to=rep.url, replicate_options={"endpoint_url": s3_endpoint}) as s:
        s.sync_replica(timeout=30)
        outputs.append(repr(s.replication()))
    blobs = list(outputs)
    for root in (path, str(tmp_path / "r")):
        for d, _dirs, files in os.walk(root):
            for f in files:
                blobs.append(open(os.path.join(d, f), "rb").read().decode("latin-1"))
    for key in rep.keys(""):
        blobs.append(rep.read(key).decode("latin-1"))
    assert len(blobs) > 10
    for blob in blobs:
        assert SECRET_KEY_ID not in blob and SECRET_KEY not in blob
        assert "replsecret" not in blob


def test_uploads_cut_short_leave_nothing_visible(replica):
    """A body that fails mid-stream (the process dying, the disk erroring): no object,
    single PUT or multipart, and no multipart leftover once cleaned."""
    import io
    from walstore.replication.options import ReplicateOptions
    from walstore.replication.targets import PreconditionFailed

    class Failing(io.RawIOBase):
        def __init__(self, n, fail_at):
            self.n, self.pos, self.fail_at = n, 0, fail_at

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, off, whence=0):
            self.pos = {0: off, 1: self.pos + off, 2: self.n + off}[whence]
            return self.pos

        def tell(self):
            return self.pos

        def readinto(self, b):
            if self.pos >= self.fail_at:
                raise OSError("read error in the middle of the upload")
            k = min(len(b), self.n - self.pos, self.fail_at - self.pos)
            b[:k] = b"z" * k
            self.pos += k
            return k

    opts = ReplicateOptions.from_any({**replica.options, "multipart_threshold": 6 << 20,
                                      "part_size": 5 << 20})
    from walstore.replication import open_target
    t = open_target(replica.url, opts)
    try:
        for size in (1 << 20, 12 << 20):  # single PUT, then multipart
            with pytest.raises(Exception):
                t.put(f"wal/partial-{size}", io.BufferedReader(Failing(size, size - 4096)),
                      if_none_match=True)
            assert f"wal/partial-{size}" not in [k for k, _ in t.list("wal/")]
        t.cleanup_uploads()
        if replica.kind == "s3":
            assert not t.client.list_multipart_uploads(Bucket=t.bucket).get("Uploads")
        else:
            leftovers = [f for _d, _s, fs in os.walk(t.root) for f in fs if f.startswith(".tmp")]
            assert leftovers == []
        big = os.urandom(12 << 20)  # a multipart upload that completes, conditionally
        import io as _io
        t.put("snapshots/big", _io.BytesIO(big), if_none_match=True)
        assert t.get("snapshots/big", 13 << 20)[0] == big
        with pytest.raises(PreconditionFailed):
            t.put("snapshots/big", _io.BytesIO(big), if_none_match=True)
        t.put("wal/x", b"1", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            t.put("wal/x", b"2", if_none_match=True)
        _data, etag = t.get("wal/x", 10)
        with pytest.raises(PreconditionFailed):
            t.put("wal/x", b"3", if_match='"not-the-etag"')
        t.put("wal/x", b"4", if_match=etag)
        assert t.get("wal/x", 10)[0] == b"4"
    finally:
        t.close()


def test_log_format_tolerates_seal_and_preallocated_size(tmp_path):
    """The engine redesign's SEAL record (type 12) and a header recording its
    preallocated size: read, shipped and restored as a segment boundary."""
    import struct
    import uuid as _uuid
    from walstore.log.format import crc32c, encode_record
    from walstore.replication import logformat
    from walstore.replication.restore import RestoredLog
    sid = _uuid.uuid4().bytes
    head = bytearray(logformat.segment_header(sid, 0))
    head[48:56] = struct.pack("<Q", 1 << 20)  # preallocated size, under the header CRC
    head[60:64] = struct.pack("<I", crc32c(bytes(head[:60])))
    assert logformat.read_segment_header(bytes(head)) == (sid, 0, 1 << 20)
    salt = logformat.salt(sid, 0)
    body = walstore.codec.pack({"tx": 1, "ts": 1.5, "meta": None, "w": [[b"sk", b"\x01"]]})
    rec1 = encode_record(salt, 1, 0, 0, body)
    seal = encode_record(salt, logformat.SEAL, len(rec1), len(rec1), walstore.codec.pack({}))
    buf = bytes(head) + rec1 + seal
    recs = list(logformat.iter_records(buf, 64, 0, salt, len(buf)))
    assert [r.type for r in recs] == [1, logformat.SEAL]
    assert logformat.summarize(1, logformat.payload(buf, recs[0])) == {"tx": 1, "ts": 1.5}
    # a record re-framed under another segment's salt validates there, and only there
    other = logformat.salt(sid, 0 + 7)
    moved = logformat.reframe(rec1, other)
    assert logformat.check_record(moved, 0, other, 0, len(moved))[0] is not None
    assert logformat.check_record(moved, 0, salt, 0, len(moved))[0] is None
    # restored: a new segment file begins right after the SEAL
    wal = tmp_path / "wal"
    wal.mkdir()
    log = RestoredLog(str(wal), sid, prealloc=False)
    log.append(0, rec1, 0, 1)
    end = len(rec1) + len(seal)
    log.append(len(rec1), seal, 0, logformat.SEAL)
    log.finish()
    assert sorted(os.listdir(wal)) == [f"{0:020d}.wal", f"{end:020d}.wal"]
