"""Audit 52: restore and the shipper's options.  Real stores, real files, moto's real S3
server over HTTP (or file://), the real CLI; no mocks."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from test_replication_support import make_s3_replica, replica, s3_endpoint  # noqa: F401

import walstore
from walstore.cli import main as cli_main


def run_cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def _shipped(path: str, rep, n: int = 3, **extra) -> None:
    with walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts(**extra)) as s:
        for i in range(n):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.sync_replica(timeout=60)


# ---- 1. a DEST inside the source store's directory, or inside a file:// replica ---------

def test_restore_into_the_store_directory_is_refused_before_anything(replica, tmp_path):
    """Before: accepted; the copy (its own STORE, wal/, db/) landed inside the source
    store's directory, where the store's purge and sweeps own every file."""
    src = str(tmp_path / "src")
    _shipped(src, replica)
    before = sorted(os.listdir(src))
    for dest in (os.path.join(src, "copy"), os.path.join(src, "wal", "copy"),
                 os.path.join(src, "deeper", "copy")):
        with pytest.raises(walstore.ReplicationError, match="inside the store at"):
            walstore.restore(replica.url, dest, replicate_options=replica.opts())
        assert not os.path.exists(dest)
    assert sorted(os.listdir(src)) == before  # nothing made, not even a parent or scratch
    r = run_cli("restore", replica.url, os.path.join(src, "copy"), *replica.cli_args())
    assert r.exit_code == 1, r.output
    assert "inside the store at" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    # beside it is fine
    walstore.restore(replica.url, str(tmp_path / "beside"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "beside")) as c:
        assert c.get("k2") == 2


def test_restore_into_the_file_replica_directory_is_refused(tmp_path):
    rep_dir = tmp_path / "replica"
    url = f"file://{rep_dir}"
    opts = {"interval": 0.05, "max_backoff": 0.5}
    with walstore.open(str(tmp_path / "src"), replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=60)
    before = sorted(p for p, _d, _f in os.walk(rep_dir))
    for dest in (rep_dir / "copy", rep_dir / "snapshots" / "copy"):
        with pytest.raises(walstore.ReplicationError, match="inside the replica's directory"):
            walstore.restore(url, str(dest), replicate_options=opts)
    assert sorted(p for p, _d, _f in os.walk(rep_dir)) == before
    r = run_cli("restore", url, rep_dir / "copy")
    assert r.exit_code == 1 and "inside the replica's directory" in r.output, r.output
