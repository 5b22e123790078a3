"""Audit 66 review: the WAL's close (walstore/log/writer.py ``close``, engine ``_release``)
against what races it, and the follower's local-write handling
(walstore/replication/restore.py).  Each test's docstring says what was seen before its
fix."""
from __future__ import annotations

import os
import threading
import time

import pytest

import walstore
from walstore.engine.engine import Engine

from test_audit58_races import _line_of
from test_audit64_groupcommit import Stop
from test_audit65_writer import _spare_ready
from test_replication_support import Proxy, make_s3_replica, s3_endpoint  # noqa: F401


def _segments(path: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(path, "wal")) if n.endswith(".wal"))


def test_closed_store_never_makes_a_wal_segment_for_a_purge_close_left_running(
        tmp_path, monkeypatch):
    """A purge had committed and was about to erase the old bytes (its WAL rotation) when
    another thread closed the store; close() waited its CLOSE_WAIT_S for it (shortened
    here), warned, and let the store go.  Before the fix the purge then rotated the
    closed log: a new segment file was made (and the old one trimmed) in a store this
    process no longer held — another process may have opened it by then — and the
    purge ended in a foreign ValueError ('operation forbidden on released memoryview
    object', LMDB closed).  Now the closed log refuses the rotation (StoreClosed): the
    purge says its erasure is owed, the WAL directory is left as close() left it, and
    the next open finishes the erasure."""
    monkeypatch.setattr(walstore.store, "CLOSE_WAIT_S", 0.2)
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="full")
    with s.transaction() as tx:
        tx["keep"] = 1
        tx["gone/a"] = 2
    _spare_ready(s._engine.wal)
    stop = Stop(Engine.erase_old_bytes.__code__,
                _line_of(Engine.erase_old_bytes, "with self.erasure_lock, self._checkpoint_lock"))
    stop.armed.set()
    out = {}

    def purge():
        try:
            out["r"] = s.purge("gone/")
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out["e"] = e
    t = stop.start(purge)
    assert stop.arrived.wait(20)
    with pytest.warns(RuntimeWarning, match="purge call"):
        s.close()
    before = _segments(path)
    stop.release.set()
    t.join(20)
    assert not t.is_alive()
    assert _segments(path) == before
    assert isinstance(out.get("e"), walstore.ErasureOwed), out
    assert isinstance(out["e"].__cause__, walstore.StoreClosed), out["e"].__cause__
    with walstore.open(path) as s2:
        assert dict(s2.scan()) == {"keep": 1}


def _follow_in_thread(url: str, dest: str, options=None, on_round=None):
    """``follow(url, dest)`` in a thread: (thread, its stop event, the errors it raised)."""
    from walstore.replication.restore import follow
    stop, errors = threading.Event(), []

    def run():
        try:
            follow(url, dest, options or {"interval": 0.05}, stop=stop, apply_every=0.1,
                   on_round=on_round)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, stop, errors


def test_a_follower_started_beside_a_reader_of_dest_in_its_process_follows(tmp_path):
    """A program reads DEST (``walstore.open(dest, readonly=True)``) and starts
    ``follow()`` for it in a thread of the same process (a restarted follower, the reader
    kept open).  Before the fix the follower died at once with a raw ``lmdb.Error``
    ("The environment '.../dest/db' is already open in this process"): its start read
    DEST's applied LSN through an LMDB environment of its own, where every other open in
    walstore shares the process's (a writer opens beside read-only handles of the same
    process).  Now it follows, and the reader sees the new commits."""
    from test_audit65_fulldisk_files import _commit
    url = f"file://{tmp_path}/replica"
    dest = str(tmp_path / "dest")
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options={"interval": 0.05}) as src:
        _commit(src, 0)
        src.sync_replica(timeout=30)
        walstore.replication.restore(url, dest, follow=True)
        with walstore.open(dest, readonly=True) as reader:
            assert reader.get("n") == 0
            t, stop, errors = _follow_in_thread(url, dest)
            try:
                for i in range(1, 4):
                    _commit(src, i)
                src.sync_replica(timeout=30)
                deadline = time.monotonic() + 20
                while (reader.get("n") != 3 and t.is_alive()
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                assert errors == [], errors
                assert reader.get("n") == 3
            finally:
                stop.set()
                t.join(20)
    assert not t.is_alive() and errors == [], errors


def test_a_restore_whose_replica_cannot_be_read_names_the_replica_not_dest(tmp_path):
    """A plain restore from a file:// replica whose blob cannot be read (EIO from the
    replica's disk; here a real EIO: the object is a link to /proc/self/mem, whose read
    at offset 0 fails so).  Before the fix the error named DEST's file — "[Errno 5]
    Input/output error: '<DEST staging>/files/blobs/cf/b9ef…'" — as if DEST's disk had
    failed: the replica's read error was taken for a local write's (``_BlobFetcher._one``
    names every OSError after DEST's file).  Now it names the replica's object."""
    url = f"file://{tmp_path}/replica"
    ws = tmp_path / "ws"
    ws.mkdir()
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options={"interval": 0.05}) as s:
        for _ in range(2):  # (the second's before-image: a blob the restore fetches)
            with s.transaction() as tx:
                tx.files(str(ws)).write("f.bin", os.urandom(50_000))
        s.sync_replica(timeout=30)
    blobs = [os.path.join(d, n) for d, _ds, ns in os.walk(tmp_path / "replica" / "blobs")
             for n in ns]
    assert blobs
    for b in blobs:
        os.unlink(b)
        os.symlink("/proc/self/mem", b)
    dest = str(tmp_path / "dest")
    with pytest.raises(walstore.WalstoreError) as got:
        walstore.restore(url, dest)
    said = str(got.value)
    assert "Input/output error" in said and "replica" in said, said
    assert "blobs/" in said and str(tmp_path / "dest") not in said and ".dest." not in said, said
    assert not os.path.exists(dest)


def test_a_blob_whose_download_the_server_cut_short_is_fetched_again(tmp_path, s3_endpoint):
    """The follower's download of a blob (2 MB of a reversible file) from moto's real
    server is cut short twice mid-body (the reply broken off after 1 MB, its first half
    already written into DEST's temp file).  Probed at the audit 66 review and found
    right: the replica's error is told from a local write's (``_Sink.error`` is set only
    when writing the local file failed), so the download is retried (``_retry``: a
    transient TargetError) rather than stopping the follower as DEST's full disk does,
    and DEST then holds the blob whole (its digest checked)."""
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    rep = make_s3_replica(s3_endpoint)
    ws = tmp_path / "ws"
    ws.mkdir()
    dest = str(tmp_path / "dest")
    rounds: list = []
    try:
        with walstore.open(str(tmp_path / "src"), replicate_to=rep.url,
                           replicate_options=rep.options) as src:
            _commit_files(src, ws, 0)
            src.sync_replica(timeout=30)
            walstore.replication.restore(rep.url, dest, None, rep.options, follow=True)
            proxy.cut_replies(1 << 20, 2)
            t, stop, errors = _follow_in_thread(
                rep.url, dest, rep.opts(endpoint_url=proxy.url, max_attempts=1),
                rounds.append)
            try:
                _commit_files(src, ws, 1)
                src.sync_replica(timeout=30)
                want = _blobs(str(tmp_path / "src"))
                deadline = time.monotonic() + 30
                while (not want <= _blobs(dest) and t.is_alive()
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                assert errors == [], errors
                assert proxy.replies_cut == 2
                assert want <= _blobs(dest), (want, _blobs(dest))
                assert not any(r.get("error") for r in rounds), rounds  # (retried inside)
            finally:
                stop.set()
                t.join(20)
            assert not t.is_alive() and errors == [], errors
    finally:
        proxy.close()


def _commit_files(s, ws, i: int) -> None:
    with s.transaction() as tx:
        tx.put("n", i)
        tx.files(str(ws)).write("f.bin", os.urandom(2 << 20))


def _blobs(root: str) -> set[str]:
    d = os.path.join(root, "files", "blobs")
    return {sub + n for sub in os.listdir(d) if len(sub) == 2
            for n in os.listdir(os.path.join(d, sub))}
