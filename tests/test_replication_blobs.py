"""Reversible files' content (blobs) in a replica: a lost answer to a blob upload, the local
blob gc racing the shipper, and what restore / replicas --verify / a follower say when a
replica lacks content its history names (probe-repl).  Real S3 server (moto over HTTP) and
file:// replicas, real stores, the real CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from test_replication_support import make_s3_replica, replica, s3_endpoint  # noqa: F401

import walstore
from walstore.replication import follow, replicas

WALSTORE = [sys.executable, "-m", "walstore.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(WALSTORE + list(args), capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_blob_upload_whose_answer_was_lost_does_not_stop_replication(replica, tmp_path):
    # (probe-repl: the object existed — an earlier upload landed unanswered — and the
    # check compared it with the already-read file body: 0 bytes, "larger than the 0 byte
    # bound" in every round, while replication() said "running" and nothing shipped again)
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                      replicate_options=replica.opts())
    try:
        ws = s.workspace(str(tmp_path / "ws"))
        with s.transaction() as tx:
            tx.files(ws).write("first.txt", "first\n")
        s.sync_replica(30)  # (the shipper has listed blobs/: it does not know of the next)
        content = b"hello from the agent\n" * 100
        t = replica.target()
        try:
            t.put("blobs/" + hashlib.sha256(content).hexdigest(), content)
        finally:
            t.close()
        with s.transaction() as tx:
            tx.files(ws).write("f.txt", content)
        s.sync_replica(30)
        with s.transaction() as tx:
            tx.put("later", 1)
        s.sync_replica(30)
        assert s.replication().last_error is None
    finally:
        s.close()
    walstore.restore(replica.url, str(tmp_path / "copy"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "copy")) as r:
        assert r.get("later") == 1
        assert r.at(r.log()[-2].txid).files(r.workspaces()[0]).read("f.txt") == content


def test_a_round_failing_for_good_says_so(tmp_path):
    # a blob that exists in the replica with other content: every round fails the same
    # way; replication() says it is not transient and that nothing ships past it
    (tmp_path / "ws").mkdir()
    url = f"file://{tmp_path}/replica"
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05, "max_backoff": 0.2})
    try:
        ws = s.workspace(str(tmp_path / "ws"))
        with s.transaction() as tx:
            tx.files(ws).write("first.txt", "first\n")
        s.sync_replica(30)  # (the shipper has listed blobs/: it does not know of the next)
        content = b"the real content\n"
        from walstore.replication import open_target
        t = open_target(url)
        try:
            t.put("blobs/" + hashlib.sha256(content).hexdigest(), b"something else")
        finally:
            t.close()
        with s.transaction() as tx:
            tx.files(ws).write("f.txt", content)
        deadline = time.monotonic() + 60  # (a round failed on it: waited for, then a
        while "not a transient" not in (s.replication().last_error or ""):  # short sync,
            assert time.monotonic() < deadline, s.replication()  # which every round
            time.sleep(0.02)  # failing is waited out: 0.5 s, not 5)
        with pytest.raises(walstore.ReplicationError, match="not a transient error"):
            s.sync_replica(0.5)
        st = s.replication()
        assert "exists with other content" in st.last_error
        assert "nothing ships past LSN" in st.last_error and st.lag_bytes > 0
    finally:
        s.close()


def _history_with_gc(s, ws, n: int) -> list[int]:
    """``n`` versions of one file, each followed by a checkpoint: retention trims the
    version before (``retain_transactions=1``) and the blob gc runs — all before the
    shipper's next round (its interval is an hour)."""
    txids = []
    for i in range(n):
        with s.transaction() as tx:
            tx.files(ws).write("f.txt", f"version {i}\n")
        txids.append(tx.id)
        s.checkpoint()
    return txids


def test_the_blob_gc_keeps_what_the_replica_has_not_received(replica, tmp_path):
    # (probe-repl, the root cause: retention plus the blob gc removed a version's content
    # before the shipper's next round uploaded it, and the replica's history named blobs
    # it never got: 24 of 30 point-in-time restores lacked content, their file history
    # unreadable, `walstore verify` of the copy failing)
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "src"), replicate_to=replica.url, retain_transactions=1,
                      replicate_options=replica.opts(interval=3600, lease_ttl=3 * 3600))
    try:
        s.sync_replica(30)  # the first round is done; the next one waits an hour
        ws = s.workspace(str(tmp_path / "ws"))
        txids = _history_with_gc(s, ws, 6)
        blobs = os.path.join(str(tmp_path / "src"), "files", "blobs")
        kept = sum(len(fs) for _d, _ds, fs in os.walk(blobs))
        assert kept >= 6  # (the gc ran, and kept the content the replica lacks)
        s.sync_replica(30)
        s.checkpoint()  # shipped now: the pin moved past them, the gc may take them
    finally:
        s.close()
    for i, txid in enumerate(txids):
        dest = str(tmp_path / f"copy{i}")
        rep = walstore.restore(replica.url, dest, to=txid, replicate_options=replica.opts())
        assert rep["blobs_missing"] == []
        with walstore.open(dest) as r:
            assert r.at(txid).files(r.workspaces()[0]).read("f.txt") == f"version {i}\n".encode()
    assert cli("verify", str(tmp_path / "copy2")).returncode == 0


def _replica_lacking_a_blob(tmp_path, keep_open: bool = False):
    """A file:// replica whose history names a blob it lacks (deleted from it, as one the
    gc had removed before it was shipped): (url, txid of that version, its digest[, the
    source store and workspace, still open])."""
    (tmp_path / "ws").mkdir()
    url = f"file://{tmp_path}/replica"
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        ws = s.workspace(str(tmp_path / "ws"))
        txids = []
        for i in range(3):
            with s.transaction() as tx:
                tx.files(ws).write("f.txt", f"version {i}\n")
            txids.append(tx.id)
        s.sync_replica(30)
    finally:
        if not keep_open:
            s.close()
    digest = hashlib.sha256(b"version 1\n").hexdigest()
    os.unlink(os.path.join(str(tmp_path), "replica", "blobs", digest))
    return (url, txids[1], digest) + ((s, ws) if keep_open else ())


def test_restore_and_verify_name_content_the_replica_lacks(tmp_path):
    # (probe-repl: `restore --to` printed success and exited 0 with blobs_missing; `replicas
    # --verify` never looked at blobs/ and said all ok)
    url, txid, digest = _replica_lacking_a_blob(tmp_path)
    r = cli("restore", url, str(tmp_path / "copy"), "--to", f"tx:{txid}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert digest in r.stderr and "lacks the content of 1 file version" in r.stderr
    r = cli("restore", url, str(tmp_path / "copy-j"), "--to", f"tx:{txid}", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["blobs_missing"] == [digest]
    v = cli("replicas", url, "--verify")
    assert v.returncode == 1, v.stdout
    assert "every blob named: FAILED" in v.stdout and digest in v.stdout
    v = cli("replicas", url, "--verify", "--json")
    check = [c for c in json.loads(v.stdout)["verify"]["checks"]
             if c["check"] == "every blob named"][0]
    assert not check["ok"] and [f["object"] for f in check["failures"]] == ["blobs/" + digest]


def test_replicas_verify_passes_a_replica_holding_every_blob(replica, tmp_path):
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                      replicate_options=replica.opts(snapshot_interval=0))
    try:
        ws = s.workspace(str(tmp_path / "ws"))
        for i in range(3):
            with s.transaction() as tx:
                tx.files(ws).write("f.txt", f"version {i}\n")
                with tx.files(ws).watch():
                    (tmp_path / "ws" / f"w{i}").write_text("watched\n")
            s.sync_replica(30)
    finally:
        s.close()
    r = replicas(replica.url, verify=True, replicate_options=replica.opts())
    check = [c for c in r["verify"]["checks"] if c["check"] == "every blob named"][0]
    assert r["verify"]["ok"] and check["ok"] and check["blobs"] >= 4, r["verify"]


def test_a_follower_says_when_copied_records_name_missing_content(tmp_path):
    # (probe-repl: a follower's round copying records whose content the replica lacked
    # reported nothing)
    url, _txid, digest, s, ws = _replica_lacking_a_blob(tmp_path, keep_open=True)
    rounds: list[dict] = []
    stop = threading.Event()
    go_on = threading.Event()

    def on_round(info: dict) -> None:
        rounds.append(dict(info))
        if len(rounds) == 1:
            go_on.wait(60)  # (the follower waits here while the source moves on)
        elif any(r.get("appended") for r in rounds[1:]):
            stop.set()

    t = threading.Thread(target=follow, args=(url, str(tmp_path / "dest"),
                                              {"interval": 0.05}),
                         kwargs={"stop": stop, "on_round": on_round})
    t.start()
    try:
        while not rounds:
            t.join(0.05)
            assert t.is_alive()
        with s.transaction() as tx:
            tx.files(ws).write("g.txt", "lost on the way\n")
        s.sync_replica(30)
        lost = hashlib.sha256(b"lost on the way\n").hexdigest()
        os.unlink(os.path.join(str(tmp_path), "replica", "blobs", lost))
    finally:
        go_on.set()
        t.join(60)
        stop.set()
        s.close()
    assert rounds[0].get("blobs_missing") == [digest]  # (what its restore could not fetch)
    later = [r for r in rounds[1:] if r.get("appended")]
    assert later and later[0].get("blobs_missing") == [lost]
    assert not any(r.get("blobs_missing") for r in rounds[1:] if r is not later[0])


def test_the_pinned_wal_is_read_once_not_at_every_gc(tmp_path):
    """The blob gc kept a lagging replica's blobs by walking the whole pinned WAL at every
    gc, under the file operations' lock: 2.5 s per 440 MB, file commits stalled 1.3-2.4 s
    each behind it while the replica was down (probe-review).  Each gc now reads only the
    records appended since the last one, and forgets what only records below the pin
    named."""
    from walstore.agent.files import PinnedLogRefs
    from walstore.log.reader import LogReader
    path = str(tmp_path / "s")
    root = tmp_path / "ws"
    root.mkdir()
    s = walstore.open(path, durability="none")
    try:
        ws = s.workspace(str(root))
        for i in range(3):
            with s.transaction() as tx:
                tx.files(ws).write(f"f{i}", os.urandom(100))
        eng = s._engine
        reads = []

        class Counting(LogReader):
            def records(self, from_lsn=0):
                reads.append(from_lsn)
                return super().records(from_lsn)

        import walstore.log.reader as reader_mod
        real = reader_mod.LogReader
        reader_mod.LogReader = Counting
        try:
            pinned = PinnedLogRefs()
            refs, _m = pinned.update(eng.layout.wal, eng.store_id, 0)
            assert len(refs) == 3  # (each write's after-image)
            end = pinned.walked_to
            refs2, _m = pinned.update(eng.layout.wal, eng.store_id, 0)
            assert refs2 == refs and reads == [0, end]  # (the second from where it ended)
            with s.transaction() as tx:
                tx.files(ws).write("f9", os.urandom(100))
            refs3, _m = pinned.update(eng.layout.wal, eng.store_id, 0)
            assert len(refs3) == 4 and reads[-1] == end
            refs4, _m = pinned.update(eng.layout.wal, eng.store_id, pinned.walked_to)
            assert refs4 == set()  # (the pin passed every record naming them)
        finally:
            reader_mod.LogReader = real
    finally:
        s.close()


def test_a_local_blob_damaged_on_disk_is_never_uploaded_under_its_name(tmp_path):
    # (probe-repl44: the shipper uploaded a blob whose bytes no longer matched its sha256
    # name — bit rot on the source's disk — as the replica's immutable blobs/<sha256>,
    # reporting nothing: every restore whose history named it failed, keys and all, and
    # the good bytes could never be shipped over it)
    (tmp_path / "ws").mkdir()
    url = f"file://{tmp_path / 'replica'}"
    content = b"agent edit\n" * 50
    digest = hashlib.sha256(content).hexdigest()
    s = walstore.open(str(tmp_path / "src"))
    ws = s.workspace(str(tmp_path / "ws"))
    with s.transaction() as tx:
        tx.put("k", 1)
        tx.files(ws).write("a.txt", content)
    s.close()
    blob = tmp_path / "src" / "files" / "blobs" / digest[:2] / digest[2:]
    data = bytearray(blob.read_bytes())
    data[3] ^= 0x20  # (same size)
    os.chmod(blob, 0o600)
    blob.write_bytes(bytes(data))
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        s.sync_replica(timeout=30)
        status = s.replication()
        assert status.state == "running"
        assert "damaged" in (status.last_error or "") and digest[:12] in status.last_error
    finally:
        s.close()
    assert not (tmp_path / "replica" / "blobs" / digest).exists()
    report = walstore.restore(url, str(tmp_path / "copy"))  # (keys restore; content missing)
    assert report["blobs_missing"] == [digest]
    copy = walstore.open(str(tmp_path / "copy"))
    try:
        assert copy.get("k") == 1
    finally:
        copy.close()


def store_with_files(tmp_path, n: int) -> dict[int, bytes]:
    """A closed store at ``tmp_path/src`` whose ``n`` transactions each wrote one file
    ``f<i>.txt`` of workspace ``tmp_path/ws``; txid -> the content it wrote."""
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "src"))
    ws = s.workspace(str(tmp_path / "ws"))
    contents = {}
    for i in range(n):
        with s.transaction() as tx:
            tx.files(ws).write(f"f{i}.txt", f"content {i}\n" * 20)
        contents[tx.id] = f"content {i}\n".encode() * 20
    s.close()
    return contents


@pytest.mark.parametrize("uploads", [1, 8])
def test_blobs_upload_several_at_once_and_a_failed_one_is_shipped_next_round(
        tmp_path, monkeypatch, uploads):
    # (probe-repl44: one PUT at a time, the WAL waiting behind them: at ~200 file commits/s
    # the replica stood still for seconds; with a 30 ms round trip per PUT, 400 blobs took
    # 14.7 s to catch up one at a time and 0.8 s eight at once — a /tmp measurement)
    from walstore.replication import targets
    put = targets.FileTarget.put
    lock = threading.Lock()
    now = {"n": 0, "max": 0, "blob_puts": 0}

    def slow_put(self, key, body, **kw):
        if not key.startswith("blobs/"):
            return put(self, key, body, **kw)
        with lock:
            now["n"] += 1
            now["max"] = max(now["max"], now["n"])
            now["blob_puts"] += 1
            fail = now["blob_puts"] == 3  # (one upload fails once: the round fails)
        try:
            threading.Event().wait(0.02)
            if fail:
                raise targets.TargetError(f"PUT {key}: injected failure", True)
            return put(self, key, body, **kw)
        finally:
            with lock:
                now["n"] -= 1
    monkeypatch.setattr(targets.FileTarget, "put", slow_put)
    url = f"file://{tmp_path / 'replica'}"
    contents = store_with_files(tmp_path, 24)
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05, "max_backoff": 0.1,
                                         "blob_uploads": uploads})
    try:
        s.sync_replica(timeout=60)
    finally:
        s.close()
    assert now["max"] == 1 if uploads == 1 else now["max"] > 1
    assert now["blob_puts"] >= 25  # (24 blobs, the failed one again)
    report = walstore.restore(url, str(tmp_path / "copy"))
    assert report["blobs_missing"] == []
    copy = walstore.open(str(tmp_path / "copy"))
    try:
        for txid, data in list(contents.items())[::5]:
            path = f"f{list(contents).index(txid)}.txt"
            assert copy.at(txid).files(str(tmp_path / "ws")).read(path) == data
    finally:
        copy.close()


def test_blob_uploads_is_checked():
    from walstore.replication.options import ReplicateOptions
    for bad in (0, 65, -1):
        with pytest.raises(ValueError, match="blob_uploads"):
            ReplicateOptions.from_any({"blob_uploads": bad})
    with pytest.raises(TypeError, match="blob_uploads"):
        ReplicateOptions.from_any({"blob_uploads": 2.5})


@pytest.mark.parametrize("uploads", [1, 4])
def test_a_round_whose_blob_upload_fails_stops_there(tmp_path, monkeypatch, uploads):
    # (review44: every pending blob was still tried after the first failed, each with the
    # client's retries and timeouts: 40 PUTs and 8 s before the round said so, where the
    # code before parallel uploads made 1 and said so in 0.3 s)
    from walstore.replication import targets
    put = targets.FileTarget.put
    lock = threading.Lock()
    made = {"blob_puts": 0}

    def failing_put(self, key, body, **kw):
        if key.startswith("blobs/"):
            with lock:
                made["blob_puts"] += 1
            threading.Event().wait(0.05)
            raise targets.TargetError(f"PUT {key}: connection refused (injected)", True)
        return put(self, key, body, **kw)
    store_with_files(tmp_path, 40)
    monkeypatch.setattr(targets.FileTarget, "put", failing_put)
    s = walstore.open(str(tmp_path / "src"), replicate_to=f"file://{tmp_path / 'replica'}",
                      replicate_options={"interval": 0.05, "max_backoff": 60,
                                         "blob_uploads": uploads})
    try:
        for _ in range(600):
            if s.replication().last_error is not None:
                break
            threading.Event().wait(0.01)
        with lock:
            first_round = made["blob_puts"]
        assert s.replication().last_error is not None
    finally:
        s.close()
    assert first_round <= uploads, first_round


def test_a_hung_blob_upload_is_reported_while_others_finish(tmp_path, monkeypatch):
    # (review44: the one slot naming the request in progress was overwritten and cleared
    # by the other uploads: a PUT the server never answered went unreported)
    from walstore.replication import targets
    put = targets.FileTarget.put
    release, hung, lock = threading.Event(), threading.Event(), threading.Lock()
    first: list = []

    def put_hanging_one(self, key, body, **kw):
        if key.startswith("blobs/"):
            with lock:
                me = not first
                if me:
                    first.append(key)
            if me:
                hung.set()
                release.wait(60)
        return put(self, key, body, **kw)
    # (the twelve files written by one transaction after the shipper's first round: the
    # next round uploads their blobs, 8 at once.  Written before the open, the hung upload
    # was in the first round, and open() waited out the 5 s it gives that round)
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "src"), replicate_to=f"file://{tmp_path / 'replica'}",
                      replicate_options={"interval": 0.05, "blob_uploads": 8})
    try:
        s.sync_replica(30)
        monkeypatch.setattr(targets.FileTarget, "put", put_hanging_one)
        ws = s.workspace(str(tmp_path / "ws"))
        with s.transaction() as tx:
            for i in range(12):
                tx.files(ws).write(f"f{i}.txt", f"content {i}\n" * 20)
        assert hung.wait(30)
        waited = None
        for _ in range(200):  # (the other eleven end meanwhile)
            waited = s._shipper.target.waiting()
            if len(list((tmp_path / "replica" / "blobs").glob("*"))) >= 11:
                break
            threading.Event().wait(0.02)
        waited = s._shipper.target.waiting()
        assert waited is not None and first[0] in waited, waited
    finally:
        release.set()
        s.close()
