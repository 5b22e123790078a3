"""Audit 48 (replication, integrations, durability): regressions found by probing the
contract's "Replication: beyond one machine", "Integrations" and section 4 promises.

Each test failed before its fix (see the commit naming it)."""
from __future__ import annotations

import pytest

import walstore
from walstore.replication.options import ReplicateOptions

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401


def test_s3_bytes_body_over_multipart_threshold_ships(s3_endpoint, tmp_path):  # noqa: F811
    """A lease or manifest (sent as bytes) larger than ``multipart_threshold`` went the
    multipart way, which reads its body as a stream: ``bytes.read`` raised
    AttributeError, so every round failed ("multipart upload ...: AttributeError") and
    nothing ever shipped.  A replica whose manifest grew past the threshold (restore
    points accumulate in it) stopped shipping the same way."""
    rep = make_s3_replica(s3_endpoint)
    opts = rep.opts(interval=0.05, max_backoff=0.5, multipart_threshold=400)
    src = str(tmp_path / "src")
    with walstore.open(src, replicate_to=rep.url, replicate_options=opts) as s:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 300)
            s.restore_point(f"p{i}")
        s.sync_replica(timeout=30)
        status = s.replication()
        assert status.state == "running" and status.last_error is None, status
        want = list(s.scan())
    assert len(rep.read("manifest")) > 400  # (it did go the multipart way)
    dest = str(tmp_path / "dest")
    walstore.restore(rep.url, dest, to="p3", replicate_options=rep.opts())
    with walstore.open(dest) as r:
        assert list(r.scan()) == want[:4]
