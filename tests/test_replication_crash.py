"""Replication under failure: a writer killed with SIGKILL while shipping, a server behind
a paused TCP proxy, uploads cut mid-body, and a follower kept current while a writer
commits.  Real processes, real files, moto's S3 server over HTTP and a file:// replica."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_replication_support import (Proxy, follower_thread, make_s3_replica,  # noqa: F401
                                      replica, rows, s3_endpoint)

import walstore
from walstore.replication import logformat
from walstore.replication.manifest import Manifest

WRITER = r"""
import sys, walstore
url, path, endpoint = sys.argv[1], sys.argv[2], sys.argv[3]
opts = {"interval": 0.05, "max_backoff": 0.5}
if endpoint:
    opts["endpoint_url"] = endpoint
s = walstore.open(path, replicate_to=url, replicate_options=opts)
start = int(sys.argv[4])
i = start
while True:
    with s.transaction() as tx:
        tx.put(f"k{i:06d}", {"i": i, "pad": "p" * 200})
        tx.put("last", i)
    if i % 10 == 9:
        s.sync_replica(timeout=30)
        print(f"ACK {i}", flush=True)
    i += 1
"""


def _run_writer(url, path, endpoint, start, acks_wanted, min_seconds):
    p = subprocess.Popen([sys.executable, "-c", WRITER, url, path, endpoint or "", str(start)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = -1
    n = 0
    t0 = time.monotonic()
    try:
        for line in p.stdout:
            if line.startswith("ACK "):
                acked = int(line.split()[1])
                n += 1
            if n >= acks_wanted and time.monotonic() - t0 >= min_seconds:
                break
            assert time.monotonic() - t0 < 120, "writer too slow"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert acked >= 0, p.stderr.read()
    return acked


def _check_prefix(dest, acked):
    with walstore.open(dest) as r:
        last = r.get("last")
        assert last is not None and last >= acked
        keys = [k for k, _v in r.scan(prefix="k")]
        assert keys == [f"k{i:06d}" for i in range(last + 1)]  # a whole prefix, nothing torn
        return last


def test_kill9_writer_while_shipping_then_restore(replica, tmp_path):
    path = str(tmp_path / "src")
    endpoint = replica.options.get("endpoint_url")
    acked = _run_writer(replica.url, path, endpoint, 0, acks_wanted=8, min_seconds=1.5)
    dest = str(tmp_path / "restored")
    walstore.restore(replica.url, dest, replicate_options=replica.options)
    last = _check_prefix(dest, acked)
    # the writer comes back (same host, its old process dead: the lease passes at once),
    # recovers, and ships on from where the replica stood
    acked2 = _run_writer(replica.url, path, endpoint, last + 1 + 1000, acks_wanted=3,
                         min_seconds=0.5)
    dest2 = str(tmp_path / "restored2")
    walstore.restore(replica.url, dest2, replicate_options=replica.options)
    with walstore.open(dest2) as r:
        assert r.get("last") >= acked2
        assert r.get(f"k{acked:06d}") is not None
    with walstore.open(path) as src, walstore.open(dest2) as r:
        mine = dict(r.scan())
        theirs = dict(src.scan())
        assert mine.pop("last") <= theirs.pop("last")
        assert all(theirs[k] == v for k, v in mine.items())  # the replica is a prefix of it


def test_outage_behind_a_paused_proxy(s3_endpoint, tmp_path):
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    rep = make_s3_replica(s3_endpoint)
    opts = rep.opts(endpoint_url=proxy.url, connect_timeout=0.5, read_timeout=0.5,
                    max_attempts=1, max_backoff=0.3)
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url, replicate_options=opts)
    try:
        def commit(i):
            t = time.perf_counter()
            with s.transaction() as tx:
                tx.put(f"k{i:05d}", i)
            return time.perf_counter() - t

        lat_before = max(commit(i) for i in range(100))
        s.sync_replica(timeout=30)
        proxy.pause()
        lat_during, i, t0 = [], 100, time.monotonic()
        while time.monotonic() - t0 < 2.0:  # (commits that waited would take 2 s)
            lat_during.append(commit(i))
            i += 1
            time.sleep(0.002)
        st = s.replication()
        assert st.lag_bytes > 0 and st.lag_seconds > 1.0, st
        with pytest.raises(walstore.ReplicationError) as e:
            s.sync_replica(timeout=0.5)
        assert "bytes short" in str(e.value)
        proxy.resume()
        s.sync_replica(timeout=30)
        st = s.replication()
        assert st.lag_bytes == 0 and st.lag_seconds == 0.0
        # commits never waited for the replica: the worst one is far below the outage
        assert max(lat_during) < 1.0, (max(lat_during), lat_before)
        print(f"max commit latency: before {lat_before * 1e3:.1f} ms, during the outage "
              f"{max(lat_during) * 1e3:.1f} ms ({len(lat_during)} commits)")
        # uploads cut mid-body: the shipper retries, nothing partial ever becomes visible
        proxy.cut_above(64 * 1024)
        with s.transaction() as tx:
            for j in range(40):
                tx.put(f"bulk{j}", os.urandom(8 * 1024))
        deadline = time.monotonic() + 30
        while proxy.cuts == 0 and time.monotonic() < deadline:  # (the next round's upload)
            time.sleep(0.02)
        assert proxy.cuts > 0
        assert s.replication().lag_bytes > 0
        _all_objects_whole(rep)
        proxy.cut_above(None)
        s.sync_replica(timeout=30)
        _all_objects_whole(rep)
        expect = rows(s)
    finally:
        s.close()
        proxy.close()
    dest = str(tmp_path / "r")
    walstore.restore(rep.url, dest, replicate_options=rep.options)
    with walstore.open(dest) as r:
        assert rows(r) == expect


def _all_objects_whole(rep):
    """Every WAL object in the bucket decodes completely; every snapshot the manifest
    lists has its recorded sha256."""
    import hashlib
    import io
    t = rep.target()
    try:
        m = Manifest.load(t, 1 << 26)
        store_id = m.doc["store_id"]
        for key, _size in t.list("wal/"):
            f = io.BytesIO(t.get(key, 1 << 30)[0])
            head, _hs = logformat.read_object_header(f)
            list(logformat.iter_object_records(f, head, store_id, key))
        for snap in m.snapshots:
            if snap["k"]:
                assert hashlib.sha256(t.get(snap["k"], 1 << 30)[0]).hexdigest() == snap["sha"]
    finally:
        t.close()


FOLLOWER = r"""
import sys
from walstore.cli import main
main(sys.argv[1:])
"""


def test_follow_keeps_a_readonly_copy_current(replica, tmp_path):
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts())
    dest = str(tmp_path / "follower")
    with src.transaction() as tx:
        tx.put("a", 0)
        tx.put("b", 0)
    src.sync_replica(timeout=30)
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-c", FOLLOWER, "restore", replica.url, dest,
                          "--follow", "--interval", "0.05", "--apply-every", "0.3",
                          *replica.cli_args()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stop = threading.Event()
    seen, bad = [], []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(dest, "STORE")):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
            time.sleep(0.05)

        def reader():
            r = walstore.open(dest, readonly=True)
            try:
                while not stop.is_set():
                    tx = r.transaction()  # one snapshot for both reads
                    a, b = tx.get("a"), tx.get("b")
                    tx.rollback()
                    if a != b:
                        bad.append((a, b))
                    seen.append(a)
                    time.sleep(0.005)
            finally:
                r.close()

        t = threading.Thread(target=reader)
        t.start()
        for i in range(1, 61):
            with src.transaction() as tx:  # a and b always change together
                tx.put("a", i)
                tx.put("b", i)
            time.sleep(0.01)
        src.sync_replica(timeout=30)
        deadline = time.monotonic() + 30
        while (not seen or seen[-1] != 60) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join()
        assert not bad, bad[:5]
        assert seen[-1] == 60
        assert len(set(seen)) > 2  # it moved while we read
    finally:
        stop.set()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        src.close()
    assert p.returncode == 0, err
    from walstore.replication.source import read_applied
    assert read_applied(os.path.join(dest, "db")) > 0  # the follower applied to its LMDB
    with walstore.open(dest, readonly=True) as r:
        assert r.get("a") == 60


def test_follower_applies_actions_and_points_to_its_lmdb(replica, tmp_path):
    from walstore.replication.source import read_applied
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts(), compensators={"undo": lambda a: None})
    dest = str(tmp_path / "f")
    stop = threading.Event()
    rounds = []
    t = follower_thread(replica, dest, stop, rounds, apply_every=0.0)
    try:
        with src.transaction() as tx:
            tx.put("x", 1)
        src.sync_replica(timeout=30)
        t.start()
        with src.transaction() as tx:
            with tx.action("charge", args={"n": 1}, compensate="undo") as act:
                act.result = {"ok": True}
            tx.put("y", 2)
        src.restore_point("after-charge")
        end = src.sync_replica(timeout=30)
        deadline = time.monotonic() + 30
        while not any(r["position"] and r["position"] >= end for r in rounds):
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.05)
        time.sleep(0.3)  # one more round applies it
    finally:
        stop.set()
        t.join(30)
        src.close()
    assert read_applied(os.path.join(dest, "db")) >= end - 200
    with walstore.open(dest, readonly=True) as r:
        assert r.get("y") == 2
        assert [a.name for a in r.actions()] == ["charge"]
        assert "after-charge" in r.restore_points()
