"""A restore to a time the replica cannot vouch for (probe-repl2): a commit acknowledged
while the server failed is not in the replica; a restore to a time after it restored a
silent prefix (exit 0, the commit missing) while the same commit by txid was refused.
The manifest now records ``complete_to`` (every commit stamped up to it is in the
replica); a time after it is refused, naming it.  An idle shipper renews it (one
manifest PUT per ``complete_every`` seconds); a manifest an older walstore wrote, without
it, restores to a time as before.  moto's S3 server over HTTP behind a pausable proxy,
``file://`` replicas, the CLI in a subprocess."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

import msgpack
import pytest

from test_replication_support import (behind_proxy, one_shipped_commit, rows,  # noqa: F401
                                      s3_endpoint)
from store_support import CLI, cli_env

import walstore
from walstore.replication import open_target
from walstore.replication.options import ReplicateOptions


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _manifest_doc(url: str) -> dict:
    t = open_target(url, ReplicateOptions.from_any({}))
    try:
        return msgpack.unpackb(t.get("manifest", 1 << 30)[0], raw=False,
                               strict_map_key=False)
    finally:
        t.close()


def test_a_time_after_an_unshipped_commit_is_refused(s3_endpoint, tmp_path):  # noqa: F811
    proxy, rep, s = behind_proxy(s3_endpoint, str(tmp_path / "s"))
    try:
        proxy.pause()  # (the server stops answering: b is acknowledged, not shipped)
        with s.transaction() as tx:
            tx.put("b", 2)
        time.sleep(0.01)
        when = _now()
        with pytest.raises(walstore.UnknownRestorePoint,
                           match="after the time the replica is known complete up to"):
            walstore.restore(rep.url, str(tmp_path / "r1"), to=when,
                             replicate_options=rep.options)
        res = subprocess.run([sys.executable, "-c", CLI, "restore", rep.url, str(tmp_path / "r2"), "--to",
                              when.isoformat(), *rep.cli_args()],
                             capture_output=True, text=True, env=cli_env(), timeout=120)
        assert res.returncode != 0 and "known complete up to" in res.stderr, res
        assert "Traceback" not in res.stderr
        proxy.resume()
        s.sync_replica(timeout=60)
        walstore.restore(rep.url, str(tmp_path / "r3"), to=when,
                         replicate_options=rep.options)
        with walstore.open(str(tmp_path / "r3")) as r:
            assert rows(r) == [("a", 1), ("b", 2)]
    finally:
        s.close()
        proxy.close()


def test_an_idle_shipper_renews_complete_to(tmp_path):
    """Nothing new to ship: ``complete_to`` still moves on, so a restore to a time after
    the last commit works once the shipper has written it (``complete_every=0``: every
    idle round)."""
    url = f"file://{tmp_path}/rep"
    s = one_shipped_commit(str(tmp_path / "s"), url, {"interval": 0.05, "complete_every": 0})
    try:
        time.sleep(0.05)
        when = _now()
        deadline = time.monotonic() + 30
        while (_manifest_doc(url).get("complete_to") or 0) < when.timestamp():
            assert time.monotonic() < deadline, _manifest_doc(url).get("complete_to")
            time.sleep(0.05)
    finally:
        s.close()
    walstore.restore(url, str(tmp_path / "r"), to=when)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("a", 1)]


def test_an_idle_shipper_writes_the_manifest_once_per_complete_every(tmp_path):
    """The renewal costs one manifest write per ``complete_every`` seconds (60 by
    default), not one per round: idle rounds write nothing in between."""
    url = f"file://{tmp_path}/rep"
    s = one_shipped_commit(str(tmp_path / "s"), url, {"interval": 0.02, "complete_every": 3600})
    try:
        puts = s.replication().requests.get("PUT", 0)
        time.sleep(0.5)  # (some 25 idle rounds)
        assert s.replication().requests.get("PUT", 0) == puts
    finally:
        s.close()


def test_sync_replica_makes_the_replica_vouch_for_the_time_it_was_called(tmp_path):
    """``sync_replica()`` is an RPO-0 point: a restore to the time it was called restores
    every commit before it.  With nothing new to ship (an idle store, all shipped) it
    returned at once and the manifest's ``complete_to`` stayed where the last shipping
    round left it (renewed once per ``complete_every``): that restore was refused."""
    url = f"file://{tmp_path}/rep"
    s = one_shipped_commit(str(tmp_path / "s"), url, {"interval": 3600, "complete_every": 3600,
                                                                 "lease_ttl": 3 * 3600})
    try:
        time.sleep(0.05)
        when = _now()
        s.sync_replica(timeout=30)
        assert _manifest_doc(url)["complete_to"] >= when.timestamp() - 1e-6
        walstore.restore(url, str(tmp_path / "r"), to=when)
        with walstore.open(str(tmp_path / "r")) as r:
            assert rows(r) == [("a", 1)]
        with s.transaction() as tx:  # (a commit after it: not in a restore to that time)
            tx.put("b", 2)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    walstore.restore(url, str(tmp_path / "r2"), to=when)
    with walstore.open(str(tmp_path / "r2")) as r:
        assert rows(r) == [("a", 1)]


def test_a_manifest_without_complete_to_restores_to_a_time_as_before(tmp_path):
    """A replica an older walstore wrote has no ``complete_to``: a time restore is not
    checked against it (as before)."""
    url = f"file://{tmp_path}/rep"
    one_shipped_commit(str(tmp_path / "s"), url, {"interval": 0.05}).close()
    doc = _manifest_doc(url)
    assert isinstance(doc.pop("complete_to"), float)
    t = open_target(url, ReplicateOptions.from_any({}))
    try:
        t.put("manifest", msgpack.packb(doc, use_bin_type=True))
    finally:
        t.close()
    later = _now() + dt.timedelta(hours=1)
    walstore.restore(url, str(tmp_path / "r"), to=later)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("a", 1)]


def test_the_time_complete_to_shows_is_accepted(tmp_path):
    """The refusal names ``complete_to`` as a datetime (rounded to the microsecond, as
    ``walstore replicas`` shows it) and says to restore at or before it; the check
    truncated it, so about half the time the very time it named was refused
    (probe-review39)."""
    import math
    url = f"file://{tmp_path}/rep"
    one_shipped_commit(str(tmp_path / "s"), url, {"interval": 0.05}).close()
    doc = _manifest_doc(url)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    shown_micros = lambda t: (dt.datetime.fromtimestamp(t, dt.timezone.utc)  # noqa: E731
                              - epoch) // dt.timedelta(microseconds=1)
    base = math.floor(doc["complete_to"] * 1e6) / 1e6
    # (a time whose datetime rounds up past its truncation: floats near 1.8e9 s hold
    # steps of ~0.24 us, so look for one rather than trust one offset)
    c = next(t for t in (base + k * 1e-7 for k in range(5, 10))
             if shown_micros(t) != int(t * 1e6))
    doc["complete_to"] = c
    t = open_target(url, ReplicateOptions.from_any({}))
    try:
        t.put("manifest", msgpack.packb(doc, use_bin_type=True))
    finally:
        t.close()
    shown = dt.datetime.fromtimestamp(c, dt.timezone.utc)
    walstore.restore(url, str(tmp_path / "r"), to=shown)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("a", 1)]
    with pytest.raises(walstore.UnknownRestorePoint):
        walstore.restore(url, str(tmp_path / "r2"), to=shown + dt.timedelta(microseconds=1))


_STALLING_WRITER = r"""
import os, sys, threading, time, walstore
path, flag = sys.argv[1], sys.argv[2]
def slowed(real):
    def call(fd):
        if os.path.exists(flag):
            try:
                where = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                where = ""
            if "/wal" in where:
                time.sleep(3.0)  # (a WAL fsync stalls: later commits wait in the buffer)
        return real(fd)
    return call
os.fsync, os.fdatasync = slowed(os.fsync), slowed(os.fdatasync)
s = walstore.open(path)
for i in range(3):
    with s.transaction() as tx:
        tx.put(f"pre{i}", i)
print("ready", flush=True)
sys.stdin.readline()
open(flag, "w").close()
ids = {}
def commit(name):
    with s.transaction() as tx:
        tx.put(name, 1)
    ids[name] = tx.id
leader = threading.Thread(target=commit, args=("leader",))
leader.start()
time.sleep(0.3)
victim = threading.Thread(target=commit, args=("victim",))  # stamped, then buffered
victim.start()
leader.join(); victim.join()
os.unlink(flag)
print("victim", s.txn_info(ids["victim"]).timestamp, flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
"""


def test_a_shipper_outside_the_writer_never_vouches_for_a_commit_it_has_not_seen(tmp_path):
    """``walstore replicate`` (a shipper in another process than the writer) took every
    commit stamped a second ago to be in the writer's files: a commit waiting in the
    group commit's buffer while an fsync stalled longer was not, and ``complete_to``
    vouched for it — a restore to that time silently lacked it (probe-review39).  With a
    live writer it vouches up to the newest commit in the files now; with none, up to
    now."""
    from walstore.replication.shipper import Shipper
    from walstore.replication.source import DirectorySource
    path, url, flag = str(tmp_path / "s"), f"file://{tmp_path}/rep", str(tmp_path / "stall")
    w = subprocess.Popen([sys.executable, "-c", _STALLING_WRITER, path, flag],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    shipper = None
    try:
        assert w.stdout.readline().startswith("ready")
        shipper = Shipper(DirectorySource(path), url,
                          ReplicateOptions.from_any({"interval": 0.05, "complete_every": 0}))
        shipper.start()
        time.sleep(0.5)
        w.stdin.write("go\n")
        w.stdin.flush()
        time.sleep(2.2)  # (inside the 3 s stall: the victim was stamped 0.3 s into it)
        during = _manifest_doc(url).get("complete_to")
        victim_stamp = float(w.stdout.readline().split()[1])
        assert during is not None
        assert during < victim_stamp, (
            f"complete_to {during} vouched for a commit stamped {victim_stamp} that was "
            f"not in the writer's files")
        w.stdin.write("\n")
        w.stdin.flush()
        assert w.stdout.readline().startswith("closed")
        closed_at = time.time()
        deadline = time.monotonic() + 30  # (no writer now: up to the present)
        while (_manifest_doc(url).get("complete_to") or 0) < closed_at:
            assert time.monotonic() < deadline, _manifest_doc(url).get("complete_to")
            time.sleep(0.05)
    finally:
        if shipper is not None:
            shipper.stop()
        w.kill()
        w.wait()
    walstore.restore(url, str(tmp_path / "r"),
                     to=dt.datetime.fromtimestamp(closed_at, dt.timezone.utc))
    with walstore.open(str(tmp_path / "r")) as r:
        assert {k for k, _v in r.scan()} == {"pre0", "pre1", "pre2", "leader", "victim"}


def test_replicas_says_how_far_the_replica_is_complete(tmp_path):
    url = f"file://{tmp_path}/rep"
    one_shipped_commit(str(tmp_path / "s"), url, {"interval": 0.05}).close()
    doc = json.loads(subprocess.run([sys.executable, "-c", CLI, "replicas", url, "--json"],
                                    capture_output=True, text=True, env=cli_env(),
                                    timeout=120).stdout)
    assert doc["complete_to"] == _manifest_doc(url)["complete_to"]
    human = subprocess.run([sys.executable, "-c", CLI, "replicas", url], capture_output=True,
                           text=True, env=cli_env(), timeout=120).stdout
    assert "complete  every commit up to " in human
