"""Audit 51 of the replication API (probe6): findings, each a test failing before its fix.

* ``walstore.replication.follow`` checked ``stop`` and ``on_round`` only after restoring
  the whole replica into DEST (bare AttributeError / "'int' object is not callable").
* ``sync_replica(timeout=10**400)`` escaped as a bare OverflowError; ``replicate_options``
  in seconds given as such an int were accepted and failed every round (lease_ttl).
* ``replicate_options`` were ignored (never checked) when ``replicate_to`` was None.
* A replica URL holding a NUL passed the URL check: ``open`` created the store, then
  failed with a bare "embedded null byte".
* A bad S3 endpoint was checked only after ``open`` had created the store, and
  "http://[::1" escaped as urllib's bare ValueError.
* A restore to a point made before replication began was refused as "dropped by the
  replica's retention" (retention had dropped nothing).

Real stores, real files, ``file://`` replicas; no mocks.
"""
from __future__ import annotations

import os

import pytest

import walstore


@pytest.mark.parametrize("kw", [{"stop": True}, {"stop": "soon"}, {"on_round": 5}])
def test_follow_api_checks_stop_and_on_round_before_anything_is_restored(tmp_path, kw):
    # before: the whole replica was restored into DEST, then the first round failed with a
    # bare "'bool' object has no attribute 'is_set'" / "'int' object is not callable",
    # leaving a restored DEST behind for a call that could never run
    from walstore.replication import follow
    rep = f"file://{tmp_path}/rep"
    with walstore.open(str(tmp_path / "src"), replicate_to=rep,
                       replicate_options={"interval": 0.05}) as s:
        s.sync_replica(timeout=30)
    dest = str(tmp_path / "dest")
    with pytest.raises(TypeError, match=next(iter(kw))):
        follow(rep, dest, interval=0.05, **kw)
    assert not os.path.exists(dest)


def test_sync_replica_takes_any_positive_timeout(tmp_path):
    # before: a timeout too large for a float (10**400, a positive number as documented)
    # escaped as a bare OverflowError ("int too large to convert to float")
    rep = "file://" + str(tmp_path / "rep")
    with walstore.open(str(tmp_path / "src"), replicate_to=rep,
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        assert s.sync_replica(timeout=10 ** 400) == s.replication().durable_lsn


@pytest.mark.parametrize("name", ["lease_ttl", "delete_grace", "retention_seconds"])
def test_a_replicate_option_no_float_holds_is_refused_at_open(tmp_path, name):
    # before: accepted; lease_ttl=10**400 made every shipping round fail with
    # "OverflowError: int too large to convert to float" (nothing ever shipped), and
    # delete_grace / retention_seconds did the same once retention had work to do
    rep = "file://" + str(tmp_path / "rep")
    with pytest.raises(ValueError, match=name):
        walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={name: 10 ** 400})
    assert not os.path.exists(tmp_path / "src")


@pytest.mark.parametrize("options", [{"bogus": 1}, {"interval": "1"}, 5])
def test_replicate_options_are_checked_even_without_replicate_to(tmp_path, options):
    # before: with replicate_to=None (e.g. a URL read from an unset environment variable)
    # replicate_options were never looked at: an unknown option, a wrong type, a
    # non-mapping all opened the store without a word
    with pytest.raises((TypeError, ValueError), match="replicate_options"):
        walstore.open(str(tmp_path / "s"), replicate_to=None, replicate_options=options)
    assert not os.path.exists(tmp_path / "s")
    with walstore.open(str(tmp_path / "s"), replicate_options={"interval": 2}) as s:
        s.run(lambda tx: tx.put("a", 1))  # (valid options without a URL: a store that does not replicate)


def test_a_replica_url_with_a_nul_is_refused_before_the_store_is_touched(tmp_path):
    # before: check_url let it through, so open() created the store and then failed with
    # a bare "ValueError: embedded null byte" naming nothing; restore likewise
    url = f"file://{tmp_path}/rep\0"
    with pytest.raises(walstore.ReplicationError, match="NUL"):
        walstore.open(str(tmp_path / "s"), replicate_to=url)
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(walstore.ReplicationError, match="NUL"):
        walstore.restore(url, str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize("endpoint", ["http://[::1", "ftp://127.0.0.1:9000"])
def test_a_bad_endpoint_is_a_replication_error_before_the_store_is_touched(tmp_path, endpoint):
    # before: the endpoint was checked only when the S3 client was built, after open()
    # had created the store (left behind by the refused call); "http://[::1" escaped
    # check_endpoint as urllib's bare "ValueError: Invalid IPv6 URL" (restore too)
    pytest.importorskip("boto3")
    opts = {"endpoint_url": endpoint}
    with pytest.raises(walstore.ReplicationError, match="endpoint URL"):
        walstore.open(str(tmp_path / "s"), replicate_to="s3://bucket/p",
                      replicate_options=opts)
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(walstore.ReplicationError, match="endpoint URL"):
        walstore.restore("s3://bucket/p", str(tmp_path / "d"), replicate_options=opts)


def test_a_point_made_before_replication_began_is_not_blamed_on_retention(tmp_path):
    # before: "no restore point named 'early' ...: a point from before it was dropped by
    # the replica's retention" for a point the replica never had (the store was made to
    # replicate after it; retention had dropped nothing): the message named a wrong cause
    src = str(tmp_path / "src")
    with walstore.open(src) as s:
        s.run(lambda tx: tx.put("a", 1))
        s.restore_point("early")
        for i in range(200):  # (segments rotate; the checkpoint trims the early ones)
            s.run(lambda tx: tx.put(f"k{i % 20}", os.urandom(20000)))
        s.checkpoint()
    rep = "file://" + str(tmp_path / "rep")
    with walstore.open(src, replicate_to=rep) as s:
        s.sync_replica(timeout=10)
    with pytest.raises(walstore.UnknownPoint) as e:
        walstore.restore(rep, str(tmp_path / "d"), to="early")
    assert "replication" in str(e.value) and "began" in str(e.value), str(e.value)
