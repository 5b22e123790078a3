"""The network fault sweep of S3 replication (``tools/replsweep.py``): a CI stride of it, and
a deterministic regression test for each defect it found.

Faults are injected on the wire only (``FaultProxy`` between the store and moto's real S3
server); boto3 is never mocked.  Each regression test fails on the code it was written
against and is marked ``xfail(strict=True)`` until the defect is fixed (then it passes, the
strict xfail fails, and the mark comes off).
"""
from __future__ import annotations

import os
import sys
import time

import pytest

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tools.replsweep import KINDS, FaultProxy, S3Server, sweep  # noqa: E402

import walstore  # noqa: E402
from walstore.replication import InProcessSource, Shipper, open_target  # noqa: E402
from walstore.replication.options import ReplicateOptions  # noqa: E402
from walstore.replication.targets import TargetError  # noqa: E402

# one request in 30 from the 2nd, CI_KINDS in turn: 3 faulted runs of the 86 the workload
# makes (#2 GET manifest drop, #32 PUT wal late, #62 PUT manifest truncate), one per kind;
# WALSTORE_SLOW=1: one in 9 (about 10 runs); ``python tools/replsweep.py`` runs them all
CI_STRIDE = 9 if os.environ.get("WALSTORE_SLOW") == "1" else 30


class _Server:
    """The session's moto server, in the shape ``replsweep`` takes."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def _proxy(endpoint: str, rep, **kw) -> FaultProxy:
    host, port = endpoint.rsplit(":", 1)
    return FaultProxy((host.split("//")[1], int(port)), rep.url.split("/", 3)[3] + "/", **kw)


# the kinds of the CI stride: those where a request lands and its answer is lost or late
# (what found the lease and snapshot defects); the full sweep takes all of KINDS
CI_KINDS = ("drop", "late", "truncate")


def test_a_stride_of_the_network_fault_sweep_breaks_nothing(s3_endpoint, tmp_path):  # noqa: F811
    """A fixed sample of the sweep (``CI_STRIDE``): each of ``CI_KINDS`` once in CI, a
    denser stride with WALSTORE_SLOW=1, every request and kind in ``tools/replsweep.py``."""
    s = sweep(_Server(s3_endpoint), str(tmp_path), stride=CI_STRIDE, start=2, rotate=True,
              kinds=CI_KINDS)
    assert s["requests"] >= 60, s["sequence"]  # the workload makes what it should
    for label in ("PUT wal if-none-match", "PUT snapshot if-none-match", "PUT blob if-none-match",
                  "PUT manifest if-match", "PUT lease if-match", "DELETE wal", "LIST"):
        assert s["by_label"][label] > 0, (label, s["by_label"])
    assert set(s["by_kind"]) == set(CI_KINDS) and set(CI_KINDS) <= set(KINDS)
    # a faulted run makes about as many requests as the healthy one, not always as many
    # (background shipping batches by timing): a fault numbered near the healthy run's last
    # request may find its run ended (CI saw #83 of 84 unfired); one earlier never may
    tail = s["requests"] - max(5, s["requests"] // 10)
    early = [u for u in s["unfired"] if int(u.split()[0].lstrip("#")) <= tail]
    assert early == [] and s["fired"] >= s["runs"] - 1, (s["requests"], s["unfired"])
    assert s["broken"] == [], "\n".join(f"{b['hit']}: {b['errors']}" for b in s["broken"])


def test_max_attempts_1_makes_one_attempt_a_request(s3_endpoint):  # noqa: F811
    rep = make_s3_replica(s3_endpoint)
    proxy = _proxy(s3_endpoint, rep)
    proxy.plan[1] = "503"  # the first attempt only; a retry would go through
    t = open_target(rep.url, ReplicateOptions.from_any(rep.opts(endpoint_url=proxy.url,
                                                                 max_attempts=1)))
    try:
        with pytest.raises(TargetError, match="SlowDown"):
            t.put("wal/x", b"body", if_none_match=True)
        assert len(proxy.requests) == 1, [r.label for r in proxy.requests]
    finally:
        t.close()
        proxy.close()


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(s3_endpoint, tmp_path):  # noqa: F811
    rep = make_s3_replica(s3_endpoint)
    proxy = _proxy(s3_endpoint, rep, repeat=0)  # botocore's retry of it goes through
    s = walstore.open(str(tmp_path / "s"))
    sh = Shipper(InProcessSource(s), rep.url, rep.opts(endpoint_url=proxy.url, max_attempts=1,
                                                        lease_ttl=0.6, read_timeout=1.0))
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        sh.ship_once()
        time.sleep(0.25)  # a renewal is due (every lease_ttl / 3)
        with s.transaction() as tx:
            tx.put("b", 2)
        proxy.plan[len(proxy.requests) + 1] = "drop"  # the renewal lands, its answer is lost
        for _ in range(3):  # a round may fail (transient); the lease is still ours
            try:
                sh.ship_once()
                break
            except TargetError:
                continue
        assert proxy.fired and proxy.fired[0].label == "PUT lease if-match", proxy.fired
        assert sh.status().shipped_lsn >= s.stats()["wal_end_lsn"]
    finally:
        sh.stop()
        s.close()
        proxy.close()


def test_a_snapshot_upload_whose_answer_was_lost_counts_as_shipped(s3_endpoint, tmp_path):  # noqa: F811
    # (replsweep: snapshots went up with a plain If-None-Match PUT; the client's retry of
    # one that landed with its answer lost met 412 — reported as a failed snapshot, the
    # object left in the bucket, listed by no manifest)
    def first_round(plan_snapshot: bool):
        rep = make_s3_replica(s3_endpoint)
        proxy = _proxy(s3_endpoint, rep)
        name = "planned" if plan_snapshot else "counted"
        s = walstore.open(str(tmp_path / name))
        with s.transaction() as tx:
            tx.put("a", 1)
        sh = Shipper(InProcessSource(s), rep.url, rep.opts(endpoint_url=proxy.url,
                                                            max_attempts=2, read_timeout=1.0))
        if plan_snapshot:
            proxy.plan[at] = "drop"  # it lands; the retry meets 412
        try:
            sh.ship_once()
            return rep, proxy, sh.status(), sh.manifest
        finally:
            sh.stop()
            s.close()
            proxy.close()
    _rep, proxy, _st, _m = first_round(False)
    at = next(r.n for r in proxy.requests if r.label.startswith("PUT snapshot"))
    rep, proxy, status, manifest = first_round(True)
    assert [r.label for r in proxy.fired] == ["PUT snapshot if-none-match"]
    assert status.last_error is None, status.last_error
    listed = {s["k"] for s in manifest.snapshots if s["k"]}
    stored = {k for k, _n in rep.target().list("snapshots/")}
    assert listed and stored == listed
