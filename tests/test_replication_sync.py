"""sync_replica against a failing replica, and the replication commands' options (probe53):
a waiting sync must not defeat the shipper's backoff; ``walstore replicate`` takes every
option the contract names as a flag (``--region``, ``--snapshot-interval``,
``--retention``); ``walstore replicas --verify`` shows its progress on stderr, never in
``--json``.  Real files (``file://``), a real moto S3 server over HTTP, real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

import walstore


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def puts(store) -> int:
    return store.replication().requests.get("PUT", 0)


def test_a_waiting_sync_does_not_defeat_the_backoff(tmp_path):
    """The replica made to fail every PUT (its directory replaced by a file): a 2 s
    ``sync_replica`` raised correctly, but the shipper made thousands of PUT attempts in
    those 2 s (each failure woke the sync, which woke the shipper out of its backoff).
    A sync asks for one prompt attempt; retries keep their backoff, also under a caller
    that syncs again and again.  Repaired, the next sync ships promptly.  (1 s of each
    here: the bug made ~1,500 PUTs a second, the bound is 50.)"""
    rep = str(tmp_path / "replica")
    os.makedirs(rep)
    s = walstore.open(str(tmp_path / "s"), replicate_to="file://" + rep,
                      replicate_options={"interval": 0.2, "max_backoff": 30.0})
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=60)
        os.rename(rep, rep + ".aside")
        with open(rep, "w") as f:
            f.write("in the way")  # every PUT now fails
        with s.transaction() as tx:
            tx.put("b", 2)
        before = puts(s)
        with pytest.raises(walstore.ReplicationError, match="short of LSN"):
            s.sync_replica(timeout=1)
        assert s.replication().last_error is not None
        assert s.replication().state == "running"
        assert puts(s) - before < 50, puts(s) - before  # (was 3,000 and more)
        before = puts(s)
        t_end = time.monotonic() + 1
        while time.monotonic() < t_end:  # a caller syncing in a loop
            with pytest.raises(walstore.ReplicationError):
                s.sync_replica(timeout=0.05)
        assert puts(s) - before < 50, puts(s) - before
        os.remove(rep)
        os.rename(rep + ".aside", rep)  # repaired
        assert s.sync_replica(timeout=60) >= s.stats()["wal_end_lsn"] - 200
        assert s.replication().last_error is None  # (it still named the repaired failure)
    finally:
        s.close()
    walstore.restore("file://" + rep, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert r.get("b") == 2


def _commit(path: str, key: str) -> None:
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put(key, key * 100)


def _snapshots(url: str) -> int:
    out = cli("replicas", url, "--json")
    assert out.returncode == 0, out.stderr
    return len(json.loads(out.stdout)["snapshots"])


def test_replicate_takes_snapshot_interval_and_retention(tmp_path):
    """``walstore replicate`` had only --once, --interval and --endpoint-url although the
    contract names snapshot interval and retention as CLI flags: a snapshot interval of 0
    takes a snapshot in a --once run (the default, an hour, takes none), and a retention
    of 0 trims the replica to the snapshots it always keeps (``retain_snapshots``, 2)."""
    path, url = str(tmp_path / "src"), f"file://{tmp_path}/replica"
    _commit(path, "a")
    first = cli("replicate", path, url, "--once", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["snapshot"] is not None  # a new replica's first
    _commit(path, "b")
    out = cli("replicate", path, url, "--once", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["snapshot"] is None  # (an hour has not passed)
    for key in ("c", "d"):
        _commit(path, key)
        out = cli("replicate", path, url, "--once", "--json", "--snapshot-interval", "0")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["snapshot"] is not None
    many = _snapshots(url)
    assert many >= 3
    _commit(path, "e")
    out = cli("replicate", path, url, "--once", "--json", "--retention", "0")
    assert out.returncode == 0, out.stderr
    assert _snapshots(url) == 2 < many
    walstore.restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert r.get("e") == "e" * 100


@pytest.mark.parametrize("flag,value,cmds", [
    ("--snapshot-interval", "-1", ("replicate",)),
    ("--snapshot-interval", "nan", ("replicate",)),
    ("--retention", "-5", ("replicate",)),
    ("--region", "not a region", ("replicate", "restore", "replicas")),
    ("--region", "", ("replicate", "restore", "replicas")),
])
def test_a_replication_flag_no_option_takes_is_a_usage_error(tmp_path, flag, value, cmds):
    """One line on stderr naming the flag, exit 2, nothing started."""
    path, url = str(tmp_path / "src"), f"file://{tmp_path}/replica"
    _commit(path, "a")
    argv = {"replicate": ["replicate", path, url, "--once"],
            "restore": ["restore", url, str(tmp_path / "dest")],
            "replicas": ["replicas", url]}
    for cmd in cmds:
        out = cli(*argv[cmd], flag, value)
        assert out.returncode == 2, (cmd, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], (cmd, out.stderr)
        assert "Traceback" not in out.stderr
    assert not os.path.exists(str(tmp_path / "replica"))
    assert not os.path.exists(str(tmp_path / "dest"))


def test_region_reaches_the_s3_client(s3_endpoint, tmp_path):  # noqa: F811
    """--region on replicate, replicas and restore, against a real S3 server: a valid
    region works (the client is set up with it)."""
    rep = make_s3_replica(s3_endpoint)
    path = str(tmp_path / "src")
    _commit(path, "a")
    where = ["--endpoint-url", s3_endpoint, "--region", "us-east-1"]
    out = cli("replicate", path, rep.url, "--once", "--json", *where)
    assert out.returncode == 0, out.stderr
    out = cli("replicas", rep.url, "--json", *where)
    assert out.returncode == 0, out.stderr
    out = cli("restore", rep.url, str(tmp_path / "r"), "--json", *where)
    assert out.returncode == 0, out.stderr
    with walstore.open(str(tmp_path / "r")) as r:
        assert r.get("a") == "a" * 100


def test_replicas_verify_shows_progress_on_stderr_only(tmp_path):
    """A long ``replicas --verify`` said nothing until the end; it shows the bytes
    checked on stderr now (text mode), and --json stays one JSON document on stdout."""
    path, url = str(tmp_path / "src"), f"file://{tmp_path}/replica"
    with walstore.open(path) as s:
        for i in range(36):  # 36 MiB: above the size from which progress is shown
            with s.transaction() as tx:
                tx.put(f"k{i}", os.urandom(1 << 20))
    out = cli("replicate", path, url, "--once")
    assert out.returncode == 0, out.stderr
    text = cli("replicas", url, "--verify")
    assert text.returncode == 0, text.stderr
    assert "verify:" in text.stderr and "(100%)" in text.stderr, text.stderr
    assert "verify:" not in text.stdout
    js = cli("replicas", url, "--verify", "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["verify"]["ok"] is True
    assert "verify:" not in js.stderr


def test_a_sync_against_a_server_that_never_answers_names_the_request(s3_endpoint,  # noqa: F811
                                                                        tmp_path,
                                                                        monkeypatch):
    """A server that takes the connection and never answers (a proxy that stopped
    forwarding): the sync's error names the request waiting and how long, and so does
    ``replication().last_error`` once it has waited ``STALL_REPORTED`` seconds (it said
    only "shipping is still in progress", and last_error was None: probe-repl2).
    (STALL_REPORTED is 2 s here, 10 s in the code: twice the sync's timeout of 1 s, so
    the sync still fails before the status reports the stall.)"""
    from test_replication_support import behind_proxy
    from walstore.replication import shipper
    monkeypatch.setattr(shipper, "STALL_REPORTED", 2.0)
    stall_reported = shipper.STALL_REPORTED
    proxy, rep, s = behind_proxy(s3_endpoint, str(tmp_path / "s"))
    try:
        proxy.pause()
        with s.transaction() as tx:
            tx.put("b", 2)
        with pytest.raises(walstore.ReplicationError) as e:
            s.sync_replica(timeout=1)
        assert "waiting on the server: a PUT of " + rep.url + "/wal/" in str(e.value), e.value
        assert "has had no answer yet" in str(e.value)
        deadline = time.monotonic() + stall_reported + 30
        while "no answer" not in (s.replication().last_error or ""):
            assert time.monotonic() < deadline, s.replication()
            time.sleep(0.2)
        assert "a PUT of " in s.replication().last_error
        proxy.resume()
        s.sync_replica(timeout=60)
    finally:
        s.close()
        proxy.close()
