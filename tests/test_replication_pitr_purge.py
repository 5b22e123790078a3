"""A restore never brings back what a purge erased (stop 50).

``store.purge(prefix)`` is a user's right to be forgotten: afterwards no API returns the
keys, ``at`` of an earlier point included.  A restore from a replica to a point *before*
the purge (a restore point, a txid, an LSN, a time) rebuilt the log up to that point —
and with it the erased keys, for good, in a new store: `walstore restore URL DEST --to
before-the-purge` undid the erasure.  Now the shipper marks each WAL object with the
purges it holds (manifest ``pg``), and a restore applies every purge the replica holds
after its cut (the restored log ends with it; ``purges_applied`` in the report).  An
object shipped before the marks were kept is read instead.  And a restore whose own log
holds a purge finishes its erasure before DEST exists (its first segment kept the erased
bytes until DEST's first writable open).

Real S3 protocol (moto's server) and ``file://`` replicas, real files."""
from __future__ import annotations

import datetime as dt
import os
import time

import msgpack
import pytest

import walstore
from walstore.replication.manifest import MANIFEST_KEY

from store_support import files_with
from test_replication_support import Replica, make_s3_replica, s3_endpoint  # noqa: F401

SECRET = "alice@example.com-ERASE-ME-7731"


@pytest.fixture(params=["s3", "file"])
def rep(request, tmp_path):
    if request.param == "s3":
        return make_s3_replica(request.getfixturevalue("s3_endpoint"))
    return Replica("file", f"file://{tmp_path}/replica", {})


def _source(path: str, rep) -> dict:
    """A store that wrote a user's keys, named a point, then purged them; shipped."""
    s = walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts())
    with s.transaction() as t:
        t.put("user/1/email", SECRET)
        t.put("user/1/name", "Alice")
        t.put("other", 1)
    first = t.id
    s.restore_point("before")
    when = dt.datetime.now(dt.timezone.utc)
    with s.transaction() as t:
        t.put("other", 2)
    second = t.id
    s.purge("user/1/")
    with s.transaction() as t:
        t.put("other", 3)
    s.sync_replica(timeout=30)
    s.close()
    return {"first": first, "second": second, "when": when}


@pytest.mark.parametrize("which", ["name", "txid", "time"])
def test_a_restore_to_before_a_purge_keeps_the_keys_erased(tmp_path, rep, which):
    src = _source(str(tmp_path / "s"), rep)
    to = {"name": "before", "txid": src["second"], "time": src["when"]}[which]
    want_other = 2 if which == "txid" else 1
    dest = str(tmp_path / "d")
    report = walstore.restore(rep.url, dest, to=to, replicate_options=rep.opts())
    assert report["purges_applied"] == ["user/1/"]
    assert files_with(dest, SECRET.encode()) == []  # not a byte of it in DEST, before any open
    with walstore.open(dest, readonly=True) as c:
        assert c.get("other") == want_other
        assert c.get("user/1/email") is None and list(c.scan(prefix="user/")) == []
        assert [h for h in c.history("user/1/email")] == []
        assert c.at(src["first"]).get("user/1/email") is None
        assert c.log(limit=1)[0].meta == {"purge": "user/1/"}  # (the restored log ends so)
    assert files_with(dest, SECRET.encode()) == []


def test_a_restore_of_everything_leaves_no_erased_byte_in_dest(tmp_path, rep):
    _source(str(tmp_path / "s"), rep)
    dest = str(tmp_path / "d")
    report = walstore.restore(rep.url, dest, replicate_options=rep.opts())
    assert report["purges_applied"] == []  # (replayed from its own log, not applied)
    assert files_with(dest, SECRET.encode()) == []  # (its first segment held it until opened)
    with walstore.open(dest, readonly=True) as c:
        assert c.get("other") == 3 and c.get("user/1/email") is None


def test_objects_shipped_without_marks_are_read(tmp_path):
    """A replica shipped by an older walstore has no ``pg`` marks: the objects after the
    cut are downloaded and read for purges."""
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    src = _source(str(tmp_path / "s"), rep)
    path = os.path.join(str(tmp_path / "replica"), MANIFEST_KEY)
    doc = msgpack.unpackb(open(path, "rb").read(), raw=False, strict_map_key=False)
    assert any(e.get("pg") for e in doc["wal"])  # (marked by this walstore's shipper)
    for e in doc["wal"]:
        e.pop("pg", None)
    with open(path, "wb") as f:
        f.write(msgpack.packb(doc, use_bin_type=True))
    dest = str(tmp_path / "d")
    report = walstore.restore(rep.url, dest, to=src["second"])
    assert report["purges_applied"] == ["user/1/"]
    assert files_with(dest, SECRET.encode()) == []
    with walstore.open(dest, readonly=True) as c:
        assert c.get("user/1/email") is None and c.get("other") == 2


def test_compacted_objects_keep_their_marks(tmp_path):
    """Objects merged by compaction carry the marks of what they merged."""
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    opts = {"interval": 0.02, "compact_fanout": 2}
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url, replicate_options=opts)
    for i in range(6):
        with s.transaction() as t:
            t.put(f"user/{i}/x", SECRET)
        s.sync_replica(timeout=30)
    s.restore_point("p")
    s.purge("user/")
    for i in range(8):
        with s.transaction() as t:
            t.put(f"k{i}", i)
        s.sync_replica(timeout=30)
    s.close()
    doc = msgpack.unpackb(open(os.path.join(str(tmp_path / "replica"), MANIFEST_KEY),
                               "rb").read(), raw=False, strict_map_key=False)
    assert any(e["lv"] > 0 for e in doc["wal"]), doc["wal"]  # (compaction ran)
    assert all("pg" in e for e in doc["wal"])
    assert sum(len(e["pg"]) for e in doc["wal"]) == 1
    dest = str(tmp_path / "d")
    report = walstore.restore(rep.url, dest, to="p")
    assert report["purges_applied"] == ["user/"]
    assert files_with(dest, SECRET.encode()) == []


def test_the_cli_restore_to_before_a_purge_says_it_applied_it(tmp_path):
    import json
    import subprocess
    import sys
    from store_support import CLI, cli_env
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    _source(str(tmp_path / "s"), rep)
    dest = str(tmp_path / "d")
    r = subprocess.run([sys.executable, "-c", CLI, "restore", rep.url, dest, "--to",
                        "before", "--json"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["purges_applied"] == ["user/1/"]
    assert files_with(dest, SECRET.encode()) == []


def test_compensate_with_a_purge_after_the_cut_compensates_once(tmp_path):
    """``--compensate`` (the machine that ran the actions): the restore's own first open
    (for the purge) leaves the in-flight action pending, and the next open with the
    compensators runs it — once; the purge's keys stay erased."""
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url)
    with s.transaction() as t:
        t.put("user/1/email", SECRET)
    tx = s.transaction()
    with tx.action("charge", args={"amount": 5}, compensate="refund") as act:
        act.result = {"charge_id": "c-1"}
    tx.put("order", "paid")
    s.restore_point("p")  # (the charge's transaction still open here)
    tx.commit()
    s.purge("user/")
    s.sync_replica(timeout=30)
    s.close()
    dest = str(tmp_path / "d")
    from walstore.replication import restore as restore_with  # (the CLI's --compensate)
    report = restore_with(rep.url, dest, "p", compensate=True)
    assert report["purges_applied"] == ["user/"] and report["in_flight_txids"] == [tx.id]
    refunds = []
    with walstore.open(dest, compensators={"refund": lambda a: refunds.append(a.key)}) as c:
        assert c.get("order") is None and c.get("user/1/email") is None
        assert c.get_action(act.id).state == "compensated"
    with walstore.open(dest, compensators={"refund": lambda a: refunds.append(a.key)}):
        pass
    assert refunds == [act.key]
    assert files_with(dest, SECRET.encode()) == []


def test_without_compensate_the_in_flight_action_stays_held(tmp_path):
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url)
    with s.transaction() as t:
        t.put("user/1/email", SECRET)
    tx = s.transaction()
    with tx.action("charge", compensate="refund") as act:
        act.result = {"charge_id": "c-1"}
    s.restore_point("p")
    tx.commit()
    s.purge("user/")
    s.sync_replica(timeout=30)
    s.close()
    dest = str(tmp_path / "d")
    walstore.restore(rep.url, dest, to="p")
    refunds = []
    with walstore.open(dest, compensators={"refund": lambda a: refunds.append(a.key)}) as c:
        (owed,) = c.pending_compensations()
        assert owed.id == act.id and owed.held
    assert refunds == []  # (a copy runs none of its source's compensations)


def test_a_bytes_prefix_purge_is_applied_too(tmp_path):
    """(``delete_thread`` of the LangGraph saver purges a bytes prefix)"""
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url)
    with s.transaction() as t:
        t.put(b"thr\x00/1", SECRET)
        t.put("kept", 1)
    s.restore_point("p")
    s.purge(b"thr\x00/")
    s.sync_replica(timeout=30)
    s.close()
    dest = str(tmp_path / "d")
    report = walstore.restore(rep.url, dest, to="p")
    assert report["purges_applied"] == [{"hex": b"thr\x00/".hex()}]
    assert files_with(dest, SECRET.encode()) == []
    with walstore.open(dest, readonly=True) as c:
        assert c.get(b"thr\x00/1") is None and c.get("kept") == 1


def test_replicas_verify_checks_the_marks(tmp_path):
    """A WAL object whose ``pg`` marks lack its purge (damage, or tampering: a restore to
    a point before it would bring the keys back) fails ``replicas --verify``."""
    from walstore.replication.restore import replicas
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    _source(str(tmp_path / "s"), rep)
    assert replicas(rep.url, verify=True)["verify"]["ok"]
    path = os.path.join(str(tmp_path / "replica"), MANIFEST_KEY)
    doc = msgpack.unpackb(open(path, "rb").read(), raw=False, strict_map_key=False)
    for e in doc["wal"]:
        e["pg"] = []
    with open(path, "wb") as f:
        f.write(msgpack.packb(doc, use_bin_type=True))
    got = replicas(rep.url, verify=True)["verify"]
    assert not got["ok"]
    (check,) = [c for c in got["checks"] if c["check"] == "every WAL object"]
    assert "marks []" in check["error"] and "user/1/" in check["error"]


@pytest.mark.parametrize("to", [None, "before"])
def test_a_snapshot_holding_the_keys_leaves_no_byte_in_dest(tmp_path, to):
    """The snapshot a restore starts from was taken before the purge (its LMDB file holds
    the keys): the restored store's LMDB is compacted by the erasure all the same."""
    rep = Replica("file", f"file://{tmp_path}/replica", {})
    opts = {"interval": 0.02, "snapshot_interval": 0}
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url, replicate_options=opts)
    with s.transaction() as t:
        t.put("user/1/email", SECRET)
        for i in range(50):
            t.put(f"k{i}", "v" * 200)
    s.checkpoint()
    s.sync_replica(timeout=30)
    deadline = time.monotonic() + 30
    while not any(sn["lsn"] > 0 for sn in _manifest(tmp_path)["snapshots"]):
        assert time.monotonic() < deadline, "no snapshot shipped"
        with s.transaction() as t:
            t.put("tick", 1)
        s.checkpoint()
        s.sync_replica(timeout=30)
    s.restore_point("before")
    s.purge("user/")
    s.sync_replica(timeout=30)
    s.close()
    dest = str(tmp_path / "d")
    walstore.restore(rep.url, dest, to=to)
    assert files_with(dest, SECRET.encode()) == []
    with walstore.open(dest, readonly=True) as c:
        assert c.get("user/1/email") is None and c.get("k3") == "v" * 200


def _manifest(tmp_path) -> dict:
    path = os.path.join(str(tmp_path / "replica"), MANIFEST_KEY)
    return msgpack.unpackb(open(path, "rb").read(), raw=False, strict_map_key=False)
