"""Replication at its edges (probe findings): a manifest write that fails once, a replica
whose newest snapshot sits at its end, a writer killed while the link was down and
reopened, and a store closed during an outage and reopened by the same process.  Real
moto S3 server over HTTP (or file://), a real TCP proxy, real processes and kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_replication_support import (Proxy, follower_thread, make_s3_replica,  # noqa: F401
                                      replica, rows, s3_endpoint)

import walstore
from walstore.replication import InProcessSource, Shipper, open_target
from walstore.replication.manifest import Manifest
from walstore.replication.options import ReplicateOptions


class FailingManifestWrites:
    """Our own ObjectStore seam, wrapped: the next ``fail`` writes of the manifest raise
    (as a 503 would, after the boto client's retries)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fail = 0

    def put(self, key, body, **kw):
        if key == "manifest" and self.fail:
            self.fail -= 1
            raise OSError("503 Service Unavailable (injected)")
        return self.inner.put(key, body, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_manifest_write_that_failed_is_written_by_the_next_round(replica, tmp_path):
    """The round uploaded the WAL object, then its manifest write failed: the next round
    (nothing new to ship: the store is idle) must still write the manifest — it used to
    think there was nothing to do, and the replica stayed short forever while
    ``replication()`` showed no error and a lag of a few milliseconds."""
    s = walstore.open(str(tmp_path / "src"))
    opts = replica.opts()
    target = FailingManifestWrites(open_target(replica.url, ReplicateOptions.from_any(opts)))
    sh = Shipper(InProcessSource(s), replica.url, opts, target=target)
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        sh.ship_once()
        with s.transaction() as tx:
            tx.put("b", 2)
        target.fail = 1
        with pytest.raises(OSError):
            sh.ship_once()
        end = s.stats()["wal_end_lsn"]
        assert sh.status().lag_bytes > 0
        time.sleep(0.3)
        assert sh.status().lag_seconds >= 0.25  # the lag's clock runs while stuck
        sh.ship_once()  # idle store, healthy server: the manifest is written now
        assert sh.status().shipped_lsn >= end and sh.status().lag_bytes == 0
        assert Manifest.load(replica.target(), 1 << 26).position >= end
        walstore.restore(replica.url, str(tmp_path / "r"), replicate_options=replica.options)
        with walstore.open(str(tmp_path / "r")) as r:
            assert r.get("b") == 2
    finally:
        sh.stop()
        s.close()


def test_restore_when_the_newest_snapshot_is_at_the_replicas_end(replica, tmp_path):
    """An idle store's snapshot lands exactly where the shipped log ends: restoring
    everything needs no WAL object, and the restored store must still have a log (one
    starting at the snapshot) — it had none, and opened as a "gap" (refused)."""
    s = walstore.open(str(tmp_path / "src"))
    opts = replica.opts(snapshot_interval=0.0)
    sh = Shipper(InProcessSource(s), replica.url, opts)
    try:
        for i in range(50):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        sh.ship_once()
        deadline = time.monotonic() + 10  # the applier, idle: LMDB reaches the log's end
        while s.stats()["applied_lsn"] < s.stats()["wal_end_lsn"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sh.ship_once()  # the snapshot (interval 0) is taken at the end
        m = Manifest.load(replica.target(), 1 << 26)
        assert max(x["lsn"] for x in m.snapshots) == m.position
        expect = rows(s)
    finally:
        sh.stop()
        s.close()
    walstore.restore(replica.url, str(tmp_path / "r"), replicate_options=replica.options)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expect
        with r.transaction() as tx:  # and it is a working store
            tx.put("after", 1)
    out = subprocess.run([sys.executable, "-m", "walstore", "replicas", replica.url,
                          "--verify", *replica.cli_args()], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


KILLED_WRITER = r"""
import sys, walstore
path, url, endpoint = sys.argv[1], sys.argv[2], sys.argv[3]
opts = {"endpoint_url": endpoint, "interval": 0.05, "max_backoff": 0.3,
        "connect_timeout": 1, "read_timeout": 1, "max_attempts": 1}
s = walstore.open(path, replicate_to=url, replicate_options=opts, segment_size=256 * 1024,
                  checkpoint_bytes=512 * 1024, apply_interval=60, apply_batch=10 ** 6,
                  max_unapplied=10 ** 6)  # (LMDB behind: the reopen REDOes and checkpoints)
i = 0
while True:
    with s.transaction() as tx:
        tx.put(f"k{i:06d}", "v" * 1000)
    print(f"C {i}", flush=True)
    i += 1
"""


def test_a_writer_killed_while_the_link_was_down_leaves_no_hole(s3_endpoint, tmp_path):
    """The link dies (proxy paused) while the writer commits several segments, then the
    writer is killed with -9 and reopened with the server back: the replica resumes from
    its position with no hole (recovery's checkpoint used to trim the segments the
    replica still needed, before the shipper had pinned them: a hole, and acknowledged
    commits that could not be restored)."""
    rep = make_s3_replica(s3_endpoint)
    host, port = s3_endpoint.split("//")[1].split(":")
    proxy = Proxy((host, int(port)))
    path = str(tmp_path / "src")
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path, rep.url, proxy.url],
                         stdout=subprocess.PIPE, text=True)
    try:
        n = 0
        for line in p.stdout:
            n = int(line.split()[1])
            if n == 50:
                time.sleep(1.0)  # the first commits are shipped
                proxy.pause()
            if n >= 3000:  # ~3 MB of log: a dozen segments, checkpoints trimming
                break
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        proxy.close()
    opts = rep.opts(interval=0.05)
    with walstore.open(path, replicate_to=rep.url, replicate_options=opts) as s:
        s.sync_replica(timeout=60)
        expect = rows(s)
    m = Manifest.load(rep.target(), 1 << 26)
    assert m.doc["holes"] == []
    walstore.restore(rep.url, str(tmp_path / "r"), replicate_options=rep.options)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expect and len(expect) >= 3000


def test_the_same_process_reopens_its_store_after_closing_it_during_an_outage(
        s3_endpoint, tmp_path):
    """Closed while the server was unreachable, the lease could not be released; the same
    process reopening the store (its LOCK proves no other writer) takes its own lease
    back instead of being refused by it."""
    rep = make_s3_replica(s3_endpoint)
    host, port = s3_endpoint.split("//")[1].split(":")
    proxy = Proxy((host, int(port)))
    opts = rep.opts(endpoint_url=proxy.url, connect_timeout=1, read_timeout=1,
                    max_attempts=1)
    path = str(tmp_path / "src")
    try:
        s = walstore.open(path, replicate_to=rep.url, replicate_options=opts)
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        proxy.pause()
        with s.transaction() as tx:
            tx.put("b", 2)
        s.close()  # the lease stays taken (the release could not be sent)
        proxy.resume()
        with walstore.open(path, replicate_to=rep.url, replicate_options=opts) as s:
            s.sync_replica(timeout=30)
        # another store (another path) is still refused: the lease is this store's
        other = walstore.open(str(tmp_path / "other"))
        other.close()
        with pytest.raises(walstore.ReplicationError):
            walstore.open(str(tmp_path / "other"), replicate_to=rep.url,
                          replicate_options=opts).close()
    finally:
        proxy.close()
    walstore.restore(rep.url, str(tmp_path / "r"), replicate_options=rep.options)
    with walstore.open(str(tmp_path / "r")) as r:
        assert r.get("b") == 2


def test_a_followers_destination_is_locked_against_writers_and_other_followers(
        replica, tmp_path):
    """While ``restore --follow`` keeps DEST current it is DEST's one writer: opening DEST
    for writing, or a second follower, is refused (StoreLocked) — both were accepted and
    a follower's appends then lost a writer's commits (verify failed).  Readers work; once
    the follower stops, DEST opens as a writer."""
    import threading
    from walstore.replication import follow
    src = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                        replicate_options=replica.opts())
    dest = str(tmp_path / "dest")
    stop = threading.Event()
    rounds = []
    th = follower_thread(replica, dest, stop, rounds, apply_every=0.2)
    try:
        with src.transaction() as tx:
            tx.put("a", 1)
        src.sync_replica(timeout=30)
        th.start()
        deadline = time.monotonic() + 30
        while len(rounds) < 3:
            assert time.monotonic() < deadline and th.is_alive()
            time.sleep(0.05)
        with pytest.raises(walstore.StoreLocked):
            walstore.open(dest)
        with pytest.raises(walstore.StoreLocked):
            follow(replica.url, dest, replica.options, stop=threading.Event())
        with src.transaction() as tx:
            tx.put("b", 2)
        src.sync_replica(timeout=30)
        deadline = time.monotonic() + 30
        while True:
            with walstore.open(dest, readonly=True) as r:
                if r.get("b") == 2:
                    assert r.get("a") == 1
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        stop.set()
        th.join(30)
        src.close()
    with walstore.open(dest) as w:  # the follower stopped: DEST may become a writer
        assert w.get("b") == 2


@pytest.mark.parametrize("how", ["rolled-back", "copy-behind", "copy-diverged-ahead"])
def test_a_store_whose_history_is_not_the_replicas_is_refused(replica, tmp_path, how):
    """A store directory rolled back to an older copy (a disk snapshot), or a copy of it
    at another path, shares the store id and lineage but not the history after the copy:
    shipping it spliced two histories into one replica (A0..A14 then B15..).  Refused at
    open (ReplicationError), the replica untouched."""
    import shutil
    a = str(tmp_path / "a")
    copy = str(tmp_path / "copy")
    s = walstore.open(a, replicate_to=replica.url, replicate_options=replica.opts())
    for i in range(5):
        with s.transaction() as tx:
            tx.put("k", f"A{i}")
    s.sync_replica(timeout=30)
    s.close()
    shutil.copytree(a, copy)
    with walstore.open(a, replicate_to=replica.url, replicate_options=replica.opts()) as s:
        for i in range(5, 15):
            with s.transaction() as tx:
                tx.put("k", f"A{i}")
        s.sync_replica(timeout=30)
    before = Manifest.load(replica.target(), 1 << 26).doc
    if how == "rolled-back":
        shutil.rmtree(a)
        shutil.copytree(copy, a)
        path = a
    else:
        path = copy
        if how == "copy-diverged-ahead":
            with walstore.open(copy) as c:  # its own history, longer than the replica's
                for i in range(5, 60):
                    with c.transaction() as tx:
                        tx.put("k", f"B{i}")
    with pytest.raises(walstore.ReplicationError, match="does not hold this store's history"):
        walstore.open(path, replicate_to=replica.url, replicate_options=replica.opts())
    after = Manifest.load(replica.target(), 1 << 26).doc
    assert after["position"] == before["position"] and after["wal"] == before["wal"]
    walstore.restore(replica.url, str(tmp_path / "r"), replicate_options=replica.options)
    with walstore.open(str(tmp_path / "r")) as r:
        assert r.get("k") == "A14"


def test_restore_to_a_point_the_replica_does_not_hold_is_an_unknown_point(replica,
                                                                          tmp_path):
    """A txid, LSN or restore point name the replica does not hold: UnknownPoint (and a
    ReplicationError), nothing restored; the CLI exits 2 (usage), and its --json prints
    one error document, as `replicas --json` does when the replica cannot be read."""
    import json
    with walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                       replicate_options=replica.opts()) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.restore_point("p")
        s.sync_replica(timeout=30)
    for i, to in enumerate([999_999, walstore.LSN(10 ** 12), "nope"]):
        dest = tmp_path / f"r{i}"
        with pytest.raises(walstore.UnknownPoint) as e:
            walstore.restore(replica.url, str(dest), to=to, replicate_options=replica.options)
        assert isinstance(e.value, walstore.ReplicationError) and not dest.exists()
    out = subprocess.run([sys.executable, "-m", "walstore", "restore", replica.url,
                          str(tmp_path / "cli"), "--to", "nope", "--json",
                          *replica.cli_args()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)["error"]
    assert doc["exit"] == 2 and "nope" in doc["message"]
    bad = replica.url + "-missing"
    out = subprocess.run([sys.executable, "-m", "walstore", "replicas", bad, "--json",
                          *replica.cli_args()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["exit"] == 1


def test_sync_replica_timeout_is_checked(replica, tmp_path):
    """None waits without a limit; anything but a positive number is a ValueError naming
    it (it was a bare TypeError about operand types)."""
    with walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                       replicate_options=replica.opts()) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        assert s.sync_replica(None) >= s.stats()["wal_end_lsn"] - 200
        for bad in (0, -1, "5", True, float("nan")):
            with pytest.raises(ValueError, match="timeout"):
                s.sync_replica(bad)


def test_a_killed_shippers_scratch_directory_is_swept(replica, tmp_path):
    """A shipper killed mid-snapshot leaves its scratch directory (an LMDB copy, hundreds
    of MB) in the temp dir; the next shipper removes those of dead processes and keeps
    those of live ones."""
    import os
    import tempfile
    from walstore.replication.shipper import TEMP_PREFIX
    base = tempfile.gettempdir()
    dead = os.path.join(base, f"{TEMP_PREFIX}999999999-stale")
    live = os.path.join(base, f"{TEMP_PREFIX}{os.getpid()}-keepme")
    for d in (dead, live):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "data.mdb"), "wb") as f:
            f.write(b"x" * 4096)
    try:
        with walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                           replicate_options=replica.opts()) as s:
            s.sync_replica(timeout=30)
        assert not os.path.exists(dead) and os.path.exists(live)
    finally:
        import shutil
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


@pytest.mark.parametrize("bad", [1e300, float("inf"), float("nan"), 0, -1, 86400.5])
def test_an_interval_that_cannot_be_waited_is_refused_at_the_call(tmp_path, bad):
    """An interval of 1e300 or inf was accepted and killed the shipper thread with an
    OverflowError (while ``replication()`` said "running"); NaN shipped in a busy loop.
    A ValueError naming the option at the call, and a usage error (exit 2) on the command
    line."""
    path = str(tmp_path / "src")
    walstore.open(path).close()
    with pytest.raises(ValueError, match="interval"):
        walstore.open(path, replicate_to=f"file://{tmp_path}/rep",
                      replicate_options={"interval": bad})
    with pytest.raises(ValueError, match="max_backoff"):
        ReplicateOptions.from_any({"max_backoff": float("inf")})
    p = subprocess.run([sys.executable, "-m", "walstore.cli", "replicate", path,
                        f"file://{tmp_path}/rep", "--interval", repr(bad), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "interval" in p.stderr
    assert ReplicateOptions.from_any({"interval": 86400}).interval == 86400


def test_a_shipper_thread_that_dies_says_so(tmp_path):
    """An error that escapes the shipping rounds (here the wait between them overflowing,
    as an interval of 1e300 did before options refused it) ends the thread: the status
    says "failed" with the error, and ``sync`` raises it at once — the thread had died
    while the status said "running", no error, and sync blamed a slow round."""
    s = walstore.open(str(tmp_path / "src"))
    sh = Shipper(InProcessSource(s), f"file://{tmp_path}/rep", {"interval": 0.05})
    sh.opts.interval = 1e300  # (past the options' check: what the thread meets)
    try:
        sh.start()
        deadline = time.monotonic() + 10
        while sh.status().state != "failed" and time.monotonic() < deadline:
            time.sleep(0.02)
        st = sh.status()
        assert st.state == "failed", st
        assert "OverflowError" in (st.last_error or "")
        with s.transaction() as tx:
            tx.put("a", 1)
        t0 = time.monotonic()
        with pytest.raises(walstore.ReplicationError, match="OverflowError"):
            sh.sync(s.stats()["wal_end_lsn"], timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        sh.stop()
        s.close()


def test_a_restored_copy_reads_the_file_history_of_its_source(replica, tmp_path):
    # (probe 33: reversible files' content — before-images in the blob store — was never
    # shipped: every historical file read of a restored copy raised CorruptionError
    # "missing from the content store", and a rewind there could not put a file back)
    ws_dir = tmp_path / "ws"
    ws_dir.mkdir()
    s = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                      replicate_options=replica.opts())
    ws = s.workspace(str(ws_dir))
    with s.transaction() as tx:
        tx.files(ws).write("a.txt", "version one\n")
    s.restore_point("p1")
    with s.transaction() as tx:
        tx.files(ws).write("a.txt", "version two\n")
        tx.files(ws).write("big.bin", b"x" * 300_000)
    s.sync_replica(30)
    s.close()
    assert sum(k.startswith("blobs/") for k in replica.keys()) >= 2
    walstore.restore(replica.url, str(tmp_path / "copy"), replicate_options=replica.opts())
    r = walstore.open(str(tmp_path / "copy"))
    try:
        w = r.workspaces()[0]
        assert r.at("p1").files(w).read("a.txt") == b"version one\n"
        assert not r.at("p1").files(w).exists("big.bin")
        assert r.at(r.log()[0].txid).files(w).read("big.bin") == b"x" * 300_000
        blobs = tmp_path / "copy" / "files" / "blobs"
        assert all(oct(p.stat().st_mode & 0o777) == "0o600"
                   for p in blobs.rglob("*") if p.is_file())
    finally:
        r.close()


def test_a_purge_on_a_replicating_store_leaves_its_replica_contiguous(replica, tmp_path):
    # (probe 33: the purge's erasure trimmed the old segments — its own record and the
    # old segment's SEAL unshipped — past the replica's pin: a hole, and every follower
    # stopped for good at it)
    s = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                      replicate_options=replica.opts())
    with s.transaction() as tx:
        tx.put("user/1", "secret")
        tx.put("keep", 1)
    s.sync_replica(30)
    s.purge("user/")
    with s.transaction() as tx:
        tx.put("after", 1)
    s.sync_replica(30)
    s.close()
    m = Manifest.load(replica.target(), 1 << 24)
    assert m.doc["holes"] == []
    walstore.restore(replica.url, str(tmp_path / "copy"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "copy")) as r:
        assert r.get("after") == 1 and r.get("keep") == 1 and r.get("user/1") is None


def test_a_replica_url_naming_the_cwd_or_the_store_itself_is_refused(tmp_path, monkeypatch):
    # (probe 33: `file://` and `file:rel` meant the current directory; a replica inside
    # the store directory kept a purge's bytes in the store directory)
    monkeypatch.chdir(tmp_path)
    for url in ("file://", "file:rel", "file:///"):
        with pytest.raises(walstore.ReplicationError, match="file:///absolute/dir"):
            open_target(url)
    store = tmp_path / "s"
    for inside in (f"file://{store}/rep", f"file://{store}", f"file://{tmp_path}"):
        with pytest.raises(walstore.ReplicationError, match="one inside the other"):
            walstore.open(str(store), replicate_to=inside)
    with walstore.open(str(store)) as s:  # refused before anything was held
        with s.transaction() as tx:
            tx.put("a", 1)
    assert sorted(os.listdir(tmp_path)) == ["s"]
