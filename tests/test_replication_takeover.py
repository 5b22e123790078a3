"""A replica taken over by a new writer while the previous writer's manifest PUT is still
on its way (probe-repl2): the previous writer was killed -9, or closed while its round
hung on a slow server, and its request (If-Match on the etag the new writer also read)
lands after the new writer started.  The new writer fences the manifest (writes it back
under its lease, changing its etag) before it collects orphans, so the late PUT fails its
If-Match; a late write it meets anyway under a lease still its own is written over, never
taken for a second writer.  Real processes, moto's S3 server over HTTP (the late request
is sent with boto3 to the server, as the network would deliver it), real kill -9."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

from test_replication_support import make_s3_replica, rows, s3_endpoint  # noqa: F401

import walstore
from walstore.replication import open_target
from walstore.replication.manifest import decode
from walstore.replication.options import ReplicateOptions
from walstore.replication.shipper import wal_key
from walstore.replication.source import DirectorySource
from walstore.replication.targets import PreconditionFailed

WRITER = r"""
import sys, walstore
path, url = sys.argv[1], sys.argv[2]
s = walstore.open(path, replicate_to=url,
                  replicate_options={"interval": 0.05, "max_object_bytes": 2048})
for batch in range(2):
    for i in range(20):
        with s.transaction() as tx:
            tx.put(f"k{batch}-{i}", "v" * 500)
    s.sync_replica(timeout=30)
    print("synced", batch, flush=True)
    sys.stdin.readline()
"""
SMALL_OBJECTS = {"interval": 0.05, "max_object_bytes": 2048}


def _client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _file_target(url: str):
    return open_target(url, ReplicateOptions.from_any({}))


def _manifest_at(url: str) -> tuple[bytes, dict]:
    t = _file_target(url)
    try:
        data = t.get("manifest", 1 << 30)[0]
    finally:
        t.close()
    return data, decode(data, url)


def _block_the_next_wal_object(url: str, pos: int, end: int) -> str:
    """The restarted writer's first WAL object (one object from the manifest's position
    to the log's end: its default ``max_object_bytes``, the old writer's were smaller)
    cannot be uploaded: a directory stands at its key (with a file that is no object of
    a shipper's naming: no orphan collection takes it).  Its first round fails after
    its start — the orphans collected — and before any manifest write: the moment a
    late request of the old writer landed in the probe."""
    d = os.path.join(url[len("file://"):], wal_key(pos, end, 0))
    os.makedirs(d)
    with open(os.path.join(d, "blocker"), "w") as f:
        f.write("x")
    return d


def _late_put(url: str, body: bytes, if_match_body: bytes) -> bool:
    """The previous writer's manifest PUT, pending since it read ``if_match_body``,
    landing now: True when the replica took it."""
    t = _file_target(url)
    try:
        t.put("manifest", body, if_match=hashlib.sha256(if_match_body).hexdigest()[:32])
        return True
    except PreconditionFailed:
        return False
    finally:
        t.close()


def _roll_back(url: str, body: bytes) -> None:
    """The replica as it was when the pending PUT was sent: the manifest before it."""
    t = _file_target(url)
    try:
        t.put("manifest", body)
    finally:
        t.close()


def _restored_keys(url: str, dest: str, options: dict | None = None) -> list:
    walstore.restore(url, dest, replicate_options=options)
    with walstore.open(dest) as r:
        return sorted(k for k, _v in rows(r))


def _take_over_and_land_the_late_put(path: str, url: str, before: bytes, pending: bytes,
                                     tmp_path) -> None:
    _roll_back(url, before)
    walstore.open(path).close()  # (the log's end settled: a plain reopen appends nothing)
    blocker = _block_the_next_wal_object(url, decode(before, url)["position"],
                                         DirectorySource(path).durable_lsn())
    s = walstore.open(path, replicate_to=url, replicate_options={"interval": 0.05})
    try:
        assert os.path.basename(blocker) in (s.replication().last_error or ""), \
            s.replication()  # (its first round failed at the blocked object)
        landed = _late_put(url, pending, before)
        shutil.rmtree(blocker)
        with s.transaction() as tx:
            tx.put("after", 1)
        s.sync_replica(timeout=30)  # (old code: "lease-lost", the dead writer named)
        assert s.replication().state == "running", s.replication()
        assert not landed  # (fenced: the late If-Match failed)
    finally:
        s.close()
    keys = _restored_keys(url, str(tmp_path / "r"))  # (old code: "hole in the replica's WAL")
    assert len(keys) == 41 and "after" in keys


def test_a_killed_writers_late_manifest_put_after_a_restart(tmp_path):
    """Old code: the restarted writer deleted the WAL objects of the pending manifest as
    orphans, the late PUT landed (its If-Match still matched), the replica listed deleted
    objects (no restore of everything) and the restarted writer stopped for good,
    "lease-lost" to the dead process."""
    url, path = f"file://{tmp_path}/replica", str(tmp_path / "s")
    w = subprocess.Popen([sys.executable, "-c", WRITER, path, url],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().startswith("synced 0")
        before = _manifest_at(url)[0]
        w.stdin.write("\n")
        w.stdin.flush()
        assert w.stdout.readline().startswith("synced 1")
        pending = _manifest_at(url)[0]  # (the PUT on its way when the writer died)
    finally:
        w.kill()
        w.wait()
    _take_over_and_land_the_late_put(path, url, before, pending, tmp_path)


def test_a_late_manifest_put_after_close_and_reopen_in_one_process(tmp_path):
    """The same in one process: close() let go while a manifest PUT was pending, the
    store reopened with replicate_to at once; the old code stopped the new shipper for
    good, "written by another writer" naming its own pid."""
    url, path = f"file://{tmp_path}/replica", str(tmp_path / "s")
    s = walstore.open(path, replicate_to=url, replicate_options=SMALL_OBJECTS)
    for batch in range(2):
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{batch}-{i}", "v" * 500)
        s.sync_replica(timeout=30)
        if batch == 0:
            before = _manifest_at(url)[0]
    pending = _manifest_at(url)[0]
    s.close()
    _take_over_and_land_the_late_put(path, url, before, pending, tmp_path)


def test_a_stale_manifest_landing_under_a_held_lease_is_written_over(s3_endpoint,  # noqa: F811
                                                                       tmp_path):
    """A previous writer's manifest write that lands while this writer still holds the
    lease (here: put over the manifest with no condition, on the S3 server) is not a
    second writer: this writer's manifest is written over it and shipping goes on (it
    stopped for good as "lease-lost").  The restore holds everything."""
    rep = make_s3_replica(s3_endpoint)
    bucket, _, prefix = rep.url[len("s3://"):].partition("/")
    path = str(tmp_path / "s")
    s = walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts())
    with s.transaction() as tx:
        tx.put("a", 1)
    s.sync_replica(timeout=30)
    stale = rep.read("manifest")
    s.close()
    s = walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts())
    try:
        with s.transaction() as tx:
            tx.put("b", 2)
        s.sync_replica(timeout=30)
        _client(s3_endpoint).put_object(Bucket=bucket, Key=prefix + "/manifest", Body=stale)
        with s.transaction() as tx:
            tx.put("c", 3)
        s.sync_replica(timeout=30)
        assert s.replication().state == "running", s.replication()
    finally:
        s.close()
    assert _restored_keys(rep.url, str(tmp_path / "r"), rep.options) == ["a", "b", "c"]
