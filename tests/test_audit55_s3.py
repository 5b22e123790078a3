"""Audit 55, replication to S3 (moto's server over HTTP, no mocks): lease fencing within
a round, secrets, network faults."""
from __future__ import annotations

import time

import msgpack
import pytest

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

import walstore
from walstore.replication import InProcessSource, Shipper
from walstore.replication.lease import Lease, LeaseLost, holder_info


def _lease_doc(replica) -> dict:
    return msgpack.unpackb(replica.read("lease"), raw=False)


def test_a_writer_stalled_mid_round_past_its_lease_writes_nothing_after_a_takeover(
        s3_endpoint, tmp_path):  # noqa: F811
    """Writer A stalls in the middle of a long round (a GC pause, a SIGSTOP, a link that
    hung) past its lease's ttl; a successor takes the expired lease.  A's round went on
    uploading WAL objects into the successor's replica: the lease was renewed only at the
    start of a round, so nothing told A it no longer held it until its next manifest
    save.  It must stop at its next write (LeaseLost) and write nothing more."""
    replica = make_s3_replica(s3_endpoint)
    a = walstore.open(str(tmp_path / "a"))
    sh = Shipper(InProcessSource(a), replica.url,
                 replica.opts(lease_ttl=0.6, max_object_bytes=1))  # (one record an object)
    taken = {}

    def stall_once(done, total):
        if taken:
            return
        # A stalls here until its lease has expired, and a successor takes it
        while _lease_doc(replica)["expires"] >= time.time():
            time.sleep(0.02)
        t = replica.target()
        try:
            b = Lease(t, holder_info("b" * 32, str(tmp_path / "b"), b"\2" * 16, "lb"), 60)
            b.acquire()
        finally:
            t.close()
        taken["keys"] = set(replica.keys())

    try:
        with a.transaction() as tx:
            tx.put("x", 0)
        sh.ship_once()
        for i in range(20):
            with a.transaction() as tx:
                tx.put("x", i + 1)
        with pytest.raises(LeaseLost):
            sh.ship_once(progress=stall_once)
        assert taken
        written_after = set(replica.keys()) - taken["keys"]
        assert written_after == set(), written_after
        assert _lease_doc(replica)["holder"]["id"] == "b" * 32
    finally:
        sh.stop()
        a.close()


def test_a_fenced_writers_late_object_at_the_next_key_does_not_stall_the_holder(
        s3_endpoint, tmp_path):  # noqa: F811
    """A PUT of a writer whose lease was taken over, hung in a partition, lands after the
    successor's start-up sweep of orphans: an object the successor's manifest does not
    list, at the key of the successor's next WAL object, with other bytes (its WAL went
    another way).  The holder stopped there for good: every round failed "exists with
    other content; is another writer using this URL?" while it held the lease, and the
    lag grew until a restart swept the orphan.  Under its own lease an unlisted object
    of its own naming is an orphan: written over."""
    import boto3
    from walstore.replication.shipper import wal_key
    replica = make_s3_replica(s3_endpoint)
    a = walstore.open(str(tmp_path / "a"))
    sh = Shipper(InProcessSource(a), replica.url, replica.opts())
    try:
        with a.transaction() as tx:
            tx.put("x", 1)
        sh.ship_once()
        pos = sh.shipped
        with a.transaction() as tx:
            tx.put("x", 2)
        end = InProcessSource(a).durable_lsn()
        bucket, _, prefix = replica.url[len("s3://"):].partition("/")
        boto3.client("s3", endpoint_url=s3_endpoint).put_object(
            Bucket=bucket, Key=f"{prefix}/{wal_key(pos, end, 0)}", Body=b"late stale bytes")
        sh.ship_once()
        assert sh.shipped == end
    finally:
        sh.stop()
        a.close()
    walstore.restore(replica.url, str(tmp_path / "copy"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "copy")) as c:
        assert c.get("x") == 2


@pytest.mark.parametrize("endpoint", ["http://AKIAX:{s}@bad host:9/", "AKIAX:{s}@bad host"])
def test_an_endpoint_from_the_aws_config_file_is_never_echoed_with_its_secret(
        tmp_path, endpoint):
    """The endpoint may come from the AWS config file (``endpoint_url``), which walstore
    does not check itself: boto3 refused a malformed one with ``ValueError: Invalid
    endpoint: <the URL>``, and that text went whole into the error of `walstore
    replicas` (and `open(replicate_to=)`), secret and all."""
    import os
    import subprocess
    import sys
    marker = "MARKERsecretZZ9"
    cfg = tmp_path / "config"
    cfg.write_text(f"[default]\nendpoint_url = {endpoint.format(s=marker)}\n"
                   f"region = us-east-1\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_ENDPOINT_URL")}
    env.update(AWS_CONFIG_FILE=str(cfg), AWS_ACCESS_KEY_ID="AKIAX",
               AWS_SECRET_ACCESS_KEY="otherSECRETmarker1", AWS_EC2_METADATA_DISABLED="true",
               PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "walstore", "replicas", "s3://bkt/p", "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Invalid endpoint" in out and "Traceback" not in out
    assert marker not in out and "otherSECRETmarker1" not in out


@pytest.mark.parametrize("expires", ["soon", float("nan"), None, [1], True])
def test_a_lease_document_with_a_damaged_expiry_is_taken_as_damaged(
        s3_endpoint, tmp_path, expires):  # noqa: F811
    """A lease document whose ``expires`` is not a finite number (a damaged or foreign
    document): a damaged lease is taken as expired, but only an undecodable one was.
    A string, None or a list made every round fail ``TypeError: '<' not supported``
    (state "starting" for good, nothing shipped); NaN was never expired: every writer
    was refused for good, "valid for 0 s more"."""
    replica = make_s3_replica(s3_endpoint)
    t = replica.target()
    try:
        t.put("lease", msgpack.packb({"holder": {"id": "z" * 32, "pid": 1, "host": "elsewhere",
                                                 "path": "/x"}, "expires": expires,
                                      "renewed": 0}, use_bin_type=True))
    finally:
        t.close()
    s = walstore.open(str(tmp_path / "s"), replicate_to=replica.url,
                      replicate_options=replica.opts())
    try:
        with s.transaction() as tx:
            tx.put("x", 1)
        s.sync_replica(20)
        assert s.replication().state == "running"
        assert _lease_doc(replica)["holder"]["id"] != "z" * 32
    finally:
        s.close()


def test_replicate_exits_when_a_refusal_is_found_after_its_start(s3_endpoint, tmp_path):  # noqa: F811,E501
    """`walstore replicate` started while the server did not answer (the start does not
    fail for that: the thread keeps trying); once it answers, another writer holds the
    replica and the shipper stops "refused".  The command stopped only on "lease-lost"
    and "failed": it ran on for good, shipping nothing, exit status never given."""
    import os
    import subprocess
    import sys
    from urllib.parse import urlsplit
    from test_replication_support import Proxy
    replica = make_s3_replica(s3_endpoint)
    t = replica.target()
    holder = Lease(t, holder_info("h" * 32, str(tmp_path / "other"), b"\3" * 16, "lo"), 600)
    holder.acquire()  # (a live writer of another store: this process)
    u = urlsplit(s3_endpoint)
    proxy = Proxy((u.hostname, u.port))
    proxy.cut_above(0)  # every request cut: the server does not answer
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(),
                                                       os.environ.get("PYTHONPATH", "")]))
    path = str(tmp_path / "s")
    walstore.open(path).close()
    p = subprocess.Popen([sys.executable, "-m", "walstore", "replicate", path, replica.url,
                          "--endpoint-url", proxy.url, "--interval", "0.05"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()  # (the start returned: its first round failed)
        assert "replicating" in first, first
        proxy.cut_above(None)
        try:
            _out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("`walstore replicate` still running after it was refused")
        assert p.returncode == 1, err
        assert "another writer" in err and "Traceback" not in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        proxy.close()
        holder.release()
        t.close()


def test_a_round_run_after_stop_never_writes_the_lease_unconditionally(s3_endpoint, tmp_path):  # noqa: F811,E501
    """A hand-run Shipper stopped (its lease released: written expired, its etag
    forgotten) and run once more: the round's renewal went out with If-Match None, an
    unconditional PUT, over the lease another writer had taken meanwhile."""
    replica = make_s3_replica(s3_endpoint)
    a = walstore.open(str(tmp_path / "a"))
    sh = Shipper(InProcessSource(a), replica.url, replica.opts())
    t = replica.target()
    try:
        with a.transaction() as tx:
            tx.put("x", 1)
        sh.ship_once()
        sh.stop()
        b = Lease(t, holder_info("b" * 32, str(tmp_path / "b"), b"\2" * 16, "lb"), 600)
        b.acquire()
        with a.transaction() as tx:
            tx.put("x", 2)
        with pytest.raises(walstore.ReplicationError):
            sh.ship_once()
        assert _lease_doc(replica)["holder"]["id"] == "b" * 32
        b.release()
    finally:
        t.close()
        a.close()
