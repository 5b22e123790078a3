"""The lease of a replica (``walstore/replication/lease.py``) when a renewal's answer is
lost and the lease then expires before the next renewal: the writer's own document, with
an etag it never saw.

A lone writer must take its own expired document back (renewed with If-Match on the etag
it reads, before anything more is shipped) and ship on, nothing lost; a writer whose
expired lease another writer took in between must not, and stops shipping for good.
The lost answer is made on the wire (``tools/replsweep.py``'s ``FaultProxy`` between the
shipper and moto's real S3 server: the renewal lands, the connection is reset instead of
its answer); boto3 is never mocked.
"""
from __future__ import annotations

import os
import sys
import time

import msgpack
import pytest

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tools.replsweep import FaultProxy  # noqa: E402

import walstore  # noqa: E402
from walstore.replication import InProcessSource, Shipper  # noqa: E402
from walstore.replication.lease import LEASE_KEY, Lease, LeaseLost, holder_info  # noqa: E402
from walstore.replication.targets import TargetError  # noqa: E402

TTL = 0.6  # renewed every 0.2 s (lease_ttl / 3): rounds are run by hand here


def _proxy(endpoint: str, rep) -> FaultProxy:
    host, port = endpoint.rsplit(":", 1)
    return FaultProxy((host.split("//")[1], int(port)), rep.url.split("/", 3)[3] + "/")


def _lease_doc(rep) -> dict:
    return msgpack.unpackb(rep.read(LEASE_KEY), raw=False)


def _commit(s, key: str) -> None:
    with s.transaction() as tx:
        tx.put(key, key.upper())


def _lose_a_renewal_answer_then_expire(rep, proxy: FaultProxy, s, sh: Shipper) -> None:
    """A round whose lease renewal lands with its answer lost (the round fails: one
    attempt a request); then the lease document, written by that renewal, expires."""
    _commit(s, "a")
    sh.ship_once()
    time.sleep(TTL / 3 + 0.05)  # a renewal is due
    before = _lease_doc(rep)["renewed"]
    _commit(s, "b")
    proxy.plan[len(proxy.requests) + 1] = "drop"  # the round's first request: the renewal
    with pytest.raises(TargetError):
        sh.ship_once()
    assert [r.label for r in proxy.fired] == ["PUT lease if-match"]
    doc = _lease_doc(rep)
    assert doc["holder"]["id"] == sh.token and doc["renewed"] > before  # (it landed)
    while _lease_doc(rep)["expires"] >= time.time():  # no round meanwhile: a stall
        time.sleep(0.05)


def test_a_lost_renewal_answer_then_expiry_keeps_the_lease_and_ships(
        s3_endpoint, tmp_path):  # noqa: F811
    """It declared the lease lost to itself ("lease-lost", shipping stopped for good, its
    pin dropped): the expired document was refused as its own."""
    rep = make_s3_replica(s3_endpoint)
    proxy = _proxy(s3_endpoint, rep)
    s = walstore.open(str(tmp_path / "s"))
    sh = Shipper(InProcessSource(s), rep.url, rep.opts(endpoint_url=proxy.url, max_attempts=1,
                                                        lease_ttl=TTL, read_timeout=1.0))
    try:
        _lose_a_renewal_answer_then_expire(rep, proxy, s, sh)
        _commit(s, "c")
        n = len(proxy.requests)
        sh.ship_once()  # LeaseLost before
        after = [r.label for r in proxy.requests[n:]]
        # the renewal on the etag it knew fails, the lease is read (its own, expired) and
        # renewed with If-Match on the etag read before anything else is written
        assert after[:3] == ["PUT lease if-match", "GET lease", "PUT lease if-match"], after
        assert any(label.startswith("PUT wal") for label in after[3:]), after
        doc = _lease_doc(rep)
        assert doc["holder"]["id"] == sh.token
        assert sh.status().shipped_lsn >= s.stats()["wal_end_lsn"]
        _commit(s, "d")
        sh.start()  # the background rounds go on with it
        sh.sync(s.stats()["wal_end_lsn"], timeout=30)
        st = sh.status()
        assert st.state == "running" and st.last_error is None, st
        assert sh.source.pin is not None  # (still kept for the replica)
    finally:
        sh.stop()
        s.close()
        proxy.close()
    _restored_holds(rep, tmp_path, "abcd")


def test_an_expired_lease_another_writer_took_is_not_adopted(s3_endpoint, tmp_path):  # noqa: F811
    """The same, but another writer takes the expired lease before the next round: the
    first stops shipping ("lease-lost", naming the taker, its pin dropped) and writes
    nothing more into the replica."""
    rep = make_s3_replica(s3_endpoint)
    proxy = _proxy(s3_endpoint, rep)
    s = walstore.open(str(tmp_path / "s"))
    sh = Shipper(InProcessSource(s), rep.url, rep.opts(endpoint_url=proxy.url, max_attempts=1,
                                                        lease_ttl=TTL, read_timeout=1.0))
    t = rep.target()
    try:
        _lose_a_renewal_answer_then_expire(rep, proxy, s, sh)
        Lease(t, holder_info("b" * 32, str(tmp_path / "b"), b"\2" * 16, "lb"), 60).acquire()
        keys = rep.keys()
        _commit(s, "c")
        sh.start()
        deadline = time.monotonic() + 30
        while sh.status().state == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        st = sh.status()
        assert st.state == "lease-lost" and str(tmp_path / "b") in st.last_error, st
        assert sh.source.pin is None
        assert rep.keys() == keys
        assert _lease_doc(rep)["holder"]["id"] == "b" * 32
    finally:
        t.close()
        sh.stop()
        s.close()
        proxy.close()


def test_a_taker_that_writes_first_wins_the_expired_lease(s3_endpoint, tmp_path):  # noqa: F811
    """Two writers read the same expired document, the holder's own: whichever If-Match
    write lands first holds the lease.  Here the taker's does, between the holder's read
    and its renewal: the holder loses the lease (naming the taker), never adopts it."""
    rep = make_s3_replica(s3_endpoint)
    t = rep.target()
    taker = Lease(t, holder_info("b" * 32, str(tmp_path / "b"), b"\2" * 16, "lb"), 60)

    class TakenAfterRead:
        """The holder's target: the taker writes right after the holder's lease read."""

        def __init__(self, inner) -> None:
            self.inner, self.armed = inner, False

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def get(self, key: str, *a, **kw):
            got = self.inner.get(key, *a, **kw)
            if key == LEASE_KEY and self.armed:
                self.armed = False
                taker.acquire()  # (it reads the same expired document and writes first)
            return got

    tgt = TakenAfterRead(t)
    holder = Lease(tgt, holder_info("a" * 32, str(tmp_path / "a"), b"\1" * 16, "la"), TTL)
    try:
        holder.acquire()
        holder.etag = '"' + "0" * 32 + '"'  # (a renewal of it landed, its etag never seen)
        while _lease_doc(rep)["expires"] >= time.time():
            time.sleep(0.05)
        tgt.armed = True
        with pytest.raises(LeaseLost, match=str(tmp_path / "b")):
            holder.renew()
        assert _lease_doc(rep)["holder"]["id"] == "b" * 32
    finally:
        t.close()


def test_a_lease_read_cut_off_after_a_failed_renewal_fails_the_round_only(
        s3_endpoint, tmp_path):  # noqa: F811
    """A renewal's answer lost, the next renewal fails its If-Match (the etag never seen)
    and the read of the lease that follows is cut off (a reset: a server going down, a
    flaky link): that was taken for a deleted lease, "lost the lease to nobody", shipping
    stopped for good and its pin dropped.  It is a failed round: the next one reads the
    lease, its own, and ships on."""
    rep = make_s3_replica(s3_endpoint)
    proxy = _proxy(s3_endpoint, rep)
    s = walstore.open(str(tmp_path / "s"))
    sh = Shipper(InProcessSource(s), rep.url, rep.opts(endpoint_url=proxy.url, max_attempts=1,
                                                        lease_ttl=30, read_timeout=1.0))
    try:
        _commit(s, "a")
        sh.ship_once()
        sh.lease.renewed -= 11  # (a renewal is due: a third of the ttl has passed)
        _commit(s, "b")
        proxy.plan[len(proxy.requests) + 1] = "drop"  # the renewal lands, its answer lost
        with pytest.raises(TargetError):
            sh.ship_once()
        n = len(proxy.requests)
        proxy.plan[n + 2] = "reset"  # the lease read after the renewal's If-Match failed
        with pytest.raises(TargetError) as failed:
            sh.ship_once()
        assert failed.value.transient, failed.value
        assert [r.label for r in proxy.requests[n:]] == ["PUT lease if-match", "GET lease"]
        assert [r.label for r in proxy.fired] == ["PUT lease if-match", "GET lease"]
        _commit(s, "c")
        sh.ship_once()  # (its own lease, adopted: ships on)
        assert sh.status().shipped_lsn >= s.stats()["wal_end_lsn"]
        assert sh.source.pin is not None
        assert _lease_doc(rep)["holder"]["id"] == sh.token
    finally:
        sh.stop()
        s.close()
        proxy.close()
    _restored_holds(rep, tmp_path, "abc")


def test_a_released_lease_is_never_adopted_again(s3_endpoint, tmp_path):  # noqa: F811
    """A round still running when its shipper let the lease go (``release``: the
    document written expired, its own holder id) that then meets a failed If-Match asks
    whether the lease is still its own (``Shipper._still_holding``): the released
    document was renewed and held again, for a ttl more, by a stopped writer — another
    host's writer taking the replica over was refused meanwhile."""
    rep = make_s3_replica(s3_endpoint)
    t = rep.target()
    try:
        holder = Lease(t, holder_info("a" * 32, str(tmp_path / "a"), b"\1" * 16, "la"), 60)
        holder.acquire()
        holder.release()
        released = holder.read()
        assert released[0]["holder"]["id"] == "a" * 32 and released[0]["expires"] == 0
        assert holder.adopt_if_mine(released) is False
        assert holder.read() == released  # (nothing written)
        with pytest.raises(LeaseLost, match="released"):
            holder.renew()
        taker = Lease(t, holder_info("b" * 32, str(tmp_path / "b"), b"\2" * 16, "lb"), 60)
        taker.acquire()  # (another writer takes it over at once)
        assert _lease_doc(rep)["holder"]["id"] == "b" * 32
    finally:
        t.close()


def _restored_holds(rep, tmp_path, keys: str) -> None:
    """A restore of the replica holds every commit ``_commit`` made of ``keys``."""
    walstore.restore(rep.url, str(tmp_path / "copy"), replicate_options=rep.opts())
    with walstore.open(str(tmp_path / "copy")) as c:
        assert [c.get(k) for k in keys] == [k.upper() for k in keys]
