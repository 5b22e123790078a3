"""Audit 56, replication to S3 and restore from it (moto's server over HTTP, no mocks;
real processes for the CLI).

Findings (each test named below fails on the code before its fix):

- A replica URL holding a ``#`` (or a ``?`` with nothing after it) was cut there by the
  URL parser and taken without a word: ``file:///r/rep#1`` shipped to ``/r/rep``,
  ``s3://b/agents/a1#x`` to ``b/agents/a1`` (another location than the one named; two
  URLs differing after the ``#`` named one replica), and ``walstore restore`` read from
  the cut location.  It is refused now, naming the character, before the store or the
  replica is touched
  (``test_a_replica_url_with_a_fragment_is_refused_not_cut_short``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

import walstore
from store_support import CLI, cli_env


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)


def test_a_replica_url_with_a_fragment_is_refused_not_cut_short(s3_endpoint, tmp_path):  # noqa: F811,E501
    replica = make_s3_replica(s3_endpoint)
    rep = tmp_path / "rep"
    for url, opts in ((f"file://{rep}#1", {"interval": 0.05}),
                      (f"file://{rep}?", {"interval": 0.05}),
                      (replica.url + "#x", replica.opts())):
        path = str(tmp_path / "src")
        with pytest.raises(walstore.ReplicationError, match="#|[?]"):
            walstore.open(path, replicate_to=url, replicate_options=opts)
        assert not os.path.exists(path)
        assert not rep.exists()
        assert replica.keys() == []
    # a restore from such a URL does not read the cut location's replica
    with walstore.open(str(tmp_path / "s2"), replicate_to=f"file://{rep}",
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica(timeout=30)
    r = cli("restore", f"file://{rep}#old", tmp_path / "dest")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "#" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "dest").exists()
