"""Who owns a replica URL (probe 50): a store refused at a URL leaves the lease to its
holder; a shipper collects only objects of its own naming, and a replica in another's
object space is refused; a lease deleted under a running S3 shipper (or its bucket) stops
it as "lease-lost", as on file://; bad bucket names and endpoints are usage errors naming
the cause.  Real moto S3 server over HTTP (or file://), the real CLI, no mocks."""
from __future__ import annotations

import os
import time

import boto3
import msgpack
import pytest
from click.testing import CliRunner

from test_replication_support import make_s3_replica, replica, s3_endpoint  # noqa: F401

import walstore
from walstore.cli import main as cli_main
from walstore.replication.lease import Lease, holder_info

WAL_ORPHAN = "wal/00000000000000999999-00000000000001000000-L0"


def run_cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def _wait_lease_expired(replica) -> None:
    while msgpack.unpackb(replica.read("lease"), raw=False)["expires"] >= time.time():
        time.sleep(0.05)


def _wait_state(s, states: tuple, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = s.replication()
        if r.state in states:
            return r
        with s.transaction() as tx:
            tx.put("tick", time.time())
        time.sleep(0.05)
    return s.replication()


def test_a_store_refused_at_a_replica_url_leaves_the_lease_to_its_holder(replica, tmp_path):
    """Writer A stalls past its lease's ttl (no round: a long interval); store B, another
    store, is refused at A's URL.  B used to take the expired lease on its way to the
    refusal, and A then stopped for good ("lease-lost" to B): nobody shipped any more.
    (A's rounds are run by hand: a lease_ttl shorter than 3 intervals is refused since
    audit 52, so no background shipper stalls that long between rounds.)"""
    from walstore.replication import InProcessSource, Shipper
    a = walstore.open(str(tmp_path / "a"))
    sh = Shipper(InProcessSource(a), replica.url, replica.opts(lease_ttl=0.5))
    try:
        with a.transaction() as tx:
            tx.put("x", 1)
        sh.ship_once()
        _wait_lease_expired(replica)
        with pytest.raises(walstore.ReplicationError, match="holds the replica of store"):
            walstore.open(str(tmp_path / "b"), replicate_to=replica.url,
                          replicate_options=replica.opts())
        with a.transaction() as tx:
            tx.put("x", 2)
        sh.ship_once()  # (the round renews the lease it still holds)
        assert sh.state not in ("lease-lost", "refused", "failed"), sh.last_error
    finally:
        sh.stop()
        a.close()
    walstore.restore(replica.url, str(tmp_path / "copy"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "copy")) as c:
        assert c.get("x") == 2


def test_a_lease_taken_over_and_given_back_renews_for_its_holder(replica, tmp_path):
    """A writer refused after it took an expired lease (the replica changed between its
    check and its take) writes back the document it replaced: the same bytes, the same
    etag, and the holder's If-Match renewal goes through."""
    t = replica.target()
    try:
        holder = Lease(t, holder_info("a" * 32, str(tmp_path / "a"), b"\1" * 16, "la"), 0.2)
        holder.acquire()
        _wait_lease_expired(replica)
        taker = Lease(t, holder_info("b" * 32, str(tmp_path / "b"), b"\2" * 16, "lb"), 60)
        taker.acquire()
        taker.release(give_back=True)
        holder.renew()  # LeaseLost before: the taker's write changed the etag
        assert msgpack.unpackb(replica.read("lease"), raw=False)["holder"]["id"] == "a" * 32
        holder.release()
    finally:
        t.close()


def test_the_orphan_sweep_collects_only_objects_of_its_own_naming(replica, tmp_path):
    """Reopening collects WAL objects the manifest never listed, and nothing else: another
    replica's objects under its ``wal/`` (and any other name there) used to be deleted."""
    path = str(tmp_path / "a")
    with walstore.open(path, replicate_to=replica.url, replicate_options=replica.opts()) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
    foreign = ["wal/b2/manifest", "wal/b2/wal/00000000000000000000-00000000000000000062-L0",
               "wal/notes.txt", "snapshots/b2/snapshots/00000000000000000000-0123abcd.mdb"]
    t = replica.target()
    try:
        for k in foreign + [WAL_ORPHAN]:
            t.put(k, b"not ours")
    finally:
        t.close()
    # interrupted uploads: ours (aborted when the writer starts) and another replica's
    if replica.kind == "file":
        root = replica.url[len("file://"):]
        for d in ("wal", "wal/b2/wal"):
            with open(f"{root}/{d}/.tmp-cut", "wb"):
                pass
    else:
        c = boto3.client("s3", endpoint_url=replica.options["endpoint_url"],
                         region_name="us-east-1")
        bucket, prefix = replica.url[len("s3://"):].split("/", 1)
        for k in ("wal/cut", "wal/b2/wal/cut"):
            c.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{k}")
    with walstore.open(path, replicate_to=replica.url, replicate_options=replica.opts()) as s:
        s.sync_replica(timeout=30)
    keys = replica.keys()
    assert WAL_ORPHAN not in keys  # (an upload whose manifest write failed: collected)
    assert [k for k in foreign if k not in keys] == []
    if replica.kind == "file":
        assert [os.path.exists(f"{root}/{d}/.tmp-cut") for d in ("wal", "wal/b2/wal")] \
            == [False, True]
    else:
        ups = c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["Key"] for u in ups] == [f"{prefix}/wal/b2/wal/cut"]


def test_a_replica_in_another_replicas_object_space_is_refused(replica, tmp_path):
    """A replica at a URL under another's ``wal/`` was swept away by it: such a URL is
    refused, and so is a new replica holding another one under its ``wal/``.  A replica
    beside another's objects (``.../r`` and ``.../r/v2``) is fine."""
    outer = replica.url
    a = walstore.open(str(tmp_path / "a"), replicate_to=outer, replicate_options=replica.opts())
    try:
        with a.transaction() as tx:
            tx.put("a", 1)
        a.sync_replica(timeout=30)
        with pytest.raises(walstore.ReplicationError, match="lies in the wal/ of the replica"):
            walstore.open(str(tmp_path / "b"), replicate_to=outer + "/wal/b2",
                          replicate_options=replica.opts())
        with walstore.open(str(tmp_path / "v2"), replicate_to=outer + "/v2",
                           replicate_options=replica.opts()) as v2:
            with v2.transaction() as tx:
                tx.put("v2", 1)
            v2.sync_replica(timeout=30)
    finally:
        a.close()
    around = outer.rsplit("/", 1)[0] + "/around"  # (a fresh URL; one replica under its wal/)
    inner = around + "/wal/x"
    with walstore.open(str(tmp_path / "i"), replicate_to=inner,
                       replicate_options=replica.opts()) as i:
        with i.transaction() as tx:
            tx.put("i", 1)
        i.sync_replica(timeout=30)
    with pytest.raises(walstore.ReplicationError, match="holds another replica among its"):
        walstore.open(str(tmp_path / "o"), replicate_to=around, replicate_options=replica.opts())
    walstore.restore(inner, str(tmp_path / "ri"), replicate_options=replica.opts())
    walstore.restore(outer + "/v2", str(tmp_path / "rv2"), replicate_options=replica.opts())


def test_a_deleted_lease_stops_the_shipper_as_lease_lost(replica, tmp_path):
    """S3 answers an If-Match write on a missing key 404 NoSuchKey: the renewal was
    retried forever as a server error, state "running", nothing shipped."""
    s = walstore.open(str(tmp_path / "s"), replicate_to=replica.url,
                      replicate_options=replica.opts(lease_ttl=0.6))
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        replica.delete("lease")
        r = _wait_state(s, ("lease-lost", "refused", "failed"))
        assert r.state == "lease-lost", r
        assert "to nobody (the lease was deleted)" in r.last_error
    finally:
        s.close()


def test_a_deleted_bucket_stops_the_shipper_as_lease_lost(s3_endpoint, tmp_path):  # noqa: F811
    rep = make_s3_replica(s3_endpoint)
    bucket = rep.url.split("/")[2]
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url,
                      replicate_options=rep.opts(lease_ttl=0.6))
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        c = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        for k in rep.keys():
            c.delete_object(Bucket=bucket, Key="agents/a1/" + k)
        c.delete_bucket(Bucket=bucket)
        r = _wait_state(s, ("lease-lost", "refused", "failed"))
        assert r.state == "lease-lost", r
        # (a renewal may land after the lease object went and before the bucket did: the
        # bucket is emptied first; either is what the shipper saw)
        assert ("NoSuchBucket" in r.last_error
                or "to nobody (the lease was deleted)" in r.last_error), r.last_error
    finally:
        s.close()


@pytest.mark.parametrize("args, words", [
    (["s3://Bad_Bucket!/x"], ["'Bad_Bucket!' is not a valid bucket name", "'!'"]),
    (["s3://ab/x"], ["'ab' is not a valid bucket name", "2 characters"]),
    (["s3://bucket/x", "--endpoint-url", "notaurl"], ["endpoint URL 'notaurl'", "http://"]),
    (["s3://bucket/x", "--endpoint-url", "ftp://127.0.0.1:1"],
     ["endpoint URL ftp://127.0.0.1:1", "http://"]),
    (["s3://bucket/x", "--endpoint-url", "http://127.0.0.1:99999"], ["invalid port"]),
])
def test_bad_buckets_and_endpoints_are_usage_errors_naming_the_cause(args, words, tmp_path):
    with walstore.open(str(tmp_path / "s")):
        pass
    for cmd in (["replicas", *args], ["restore", args[0], tmp_path / "d", *args[1:]],
                ["replicate", tmp_path / "s", args[0], "--once", *args[1:]]):
        res = run_cli(*cmd)
        assert res.exit_code == 2, (cmd, res.output)
        assert all(w in res.output for w in words), (cmd, res.output)
        assert "unexpected" not in res.output and "Traceback" not in res.output


def test_a_bucket_that_does_not_exist_is_named(s3_endpoint, tmp_path):  # noqa: F811
    res = run_cli("replicas", "s3://no-such-bucket-p50/x", "--endpoint-url", s3_endpoint)
    assert res.exit_code == 1
    assert "NoSuchBucket" in res.output and "no-such-bucket-p50 does not exist" in res.output


def test_a_dead_writer_that_opened_the_store_through_a_symlink_is_taken_over(tmp_path):
    """The lease named the store by the path its writer opened it with: a writer killed
    -9 that had opened it through a symlink blocked the next writer of the same store
    (opening it by its real path, on the same host) for the whole lease, 600 s (probe 57).
    Paths are compared resolved now: taken over at once."""
    import subprocess
    import sys
    real, link, url = str(tmp_path / "real"), str(tmp_path / "link"), f"file://{tmp_path}/rep"
    walstore.open(real).close()
    os.symlink(real, link)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, walstore\n"
        "s = walstore.open(sys.argv[1], replicate_to=sys.argv[2],\n"
        "                  replicate_options={'interval': 0.05})\n"
        "with s.transaction() as tx:\n    tx.put('a', 1)\n"
        "s.sync_replica(timeout=30)\nprint('ok', flush=True)\ntime.sleep(120)\n"),
        link, url], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ok"
    finally:
        writer.kill()
        writer.wait()
    with walstore.open(real, replicate_to=url, replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("a", 2)
        s.sync_replica(timeout=30)
        assert s.replication().state == "running"
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert r.get("a") == 2
