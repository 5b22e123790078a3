"""A follower over time: it rides out an unreachable replica (a paused proxy in front of a
real S3 server: it retried nothing and died on the first failed request, probe
repro6), is told plainly when retention moved past its position (it was told of a "hole
in the replica's WAL" in a sound replica, repro5), and a restore or a follower round
fetches only the blobs the copy's history names, never LISTing (both LISTed blobs/ and
downloaded every blob ever shipped, every round, repro3).  Real stores, a file://
replica or moto behind a TCP proxy."""
from __future__ import annotations

import os
import threading
import time

import pytest

from test_replication_support import Proxy, make_s3_replica, s3_endpoint  # noqa: F401

import walstore
from walstore.ops.backup import referenced_blobs
from walstore.replication import follow, replicas, restore
from walstore.replication.options import ReplicateOptions
from walstore.replication.targets import open_target
from store_support import get_readonly as _get


def _wait(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_a_follower_retries_through_an_outage(s3_endpoint, tmp_path):  # noqa: F811
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    rep = make_s3_replica(s3_endpoint)
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url, replicate_options=rep.options)
    dest = str(tmp_path / "dest")
    stop = threading.Event()
    rounds: list[dict] = []
    died: list[BaseException] = []
    opts = rep.opts(endpoint_url=proxy.url, connect_timeout=0.3, read_timeout=0.3,
                    max_attempts=1, max_backoff=0.3)

    def run():
        try:
            follow(rep.url, dest, opts, stop=stop, interval=0.05, apply_every=0.1,
                   on_round=rounds.append)
        except BaseException as e:  # (the defect: the first failed request ended it)
            died.append(e)

    t = threading.Thread(target=run)
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
        t.start()
        assert _wait(lambda: _get(dest, "a") == 1)
        proxy.pause()
        assert _wait(lambda: sum(1 for r in rounds if r.get("error")) >= 3 or bool(died))
        assert not died, died
        assert t.is_alive()
        err = next(r for r in rounds if r.get("error"))
        assert "manifest" in err["error"] and err["retry_in"] <= 0.3, err
        with s.transaction() as tx:
            tx.put("b", 2)
        s.sync_replica(timeout=30)
        proxy.resume()
        assert _wait(lambda: _get(dest, "b") == 2), rounds[-3:]
        assert not died and t.is_alive()
    finally:
        stop.set()
        proxy.resume()
        t.join(30) if t.ident else None
        s.close()


def test_a_follower_behind_retention_is_told_to_restore_anew(tmp_path):
    url = f"file://{tmp_path}/replica"
    opts = {"interval": 0.05, "snapshot_interval": 0, "retention_seconds": 0,
            "delete_grace": 0}
    src, dest = str(tmp_path / "s"), str(tmp_path / "dest")

    def commit_and_ship(n: int, tag: str) -> None:
        with walstore.open(src, replicate_to=url, replicate_options=opts) as s:
            for i in range(n):
                with s.transaction() as tx:
                    tx.put(f"{tag}{i}", os.urandom(100))
            s.sync_replica(timeout=30)

    commit_and_ship(20, "a")
    restore(url, dest, None, opts, follow=True)
    for r in range(4):  # retention (no time, 2 snapshots kept) moves past DEST's position
        commit_and_ship(20, f"r{r}")
    assert replicas(url, verify=True)["verify"]["ok"]
    with pytest.raises(walstore.ReplicationError) as e:
        follow(url, dest, opts, stop=threading.Event(), interval=0.05)
    msg = str(e.value)
    assert "hole" not in msg, msg
    assert "older than what the replica" in msg and "restore anew" in msg, msg


def _blob_files(root: str) -> set[str]:
    out = set()
    for d, _s, files in os.walk(os.path.join(root, "files", "blobs")):
        out.update(os.path.basename(d) + f for f in files if not f.endswith(".part"))
    return out


def test_restore_and_follower_fetch_only_referenced_blobs(tmp_path):
    url = f"file://{tmp_path}/replica"
    ropts = {"interval": 0.05, "snapshot_interval": 0}
    src, wsroot = str(tmp_path / "s"), str(tmp_path / "ws")
    os.makedirs(wsroot)
    s = walstore.open(src, replicate_to=url, replicate_options=ropts, retain_transactions=3)
    stop = threading.Event()
    t = None
    try:
        ws = s.workspace(wsroot)
        for i in range(20):  # one file rewritten 20 times: the replica keeps every version
            with s.transaction() as tx:
                tx.files(ws).write("f.bin", os.urandom(3000))
            s.sync_replica(timeout=30)  # (each version's blob shipped before retention's gc)
        s.checkpoint()  # (retention trims the history: the newest version or so is kept)
        with s.transaction() as tx:
            tx.put("after", 1)
        s.checkpoint()
        s.sync_replica(timeout=30)
        applied = s.stats()["applied_lsn"]
        # a snapshot of the trimmed state: what a restore starts from
        assert _wait(lambda: max(x["lsn"] for x in replicas(url)["snapshots"]) >= applied)
        shipped = {n for n in os.listdir(tmp_path / "replica" / "blobs")}
        tgt = open_target(url, ReplicateOptions.from_any(ropts))
        dest = str(tmp_path / "dest")
        rep = restore(url, dest, None, ropts, target=tgt)
        assert tgt.requests["LIST"] == 0, tgt.requests
        got = _blob_files(dest)
        refs = referenced_blobs(dest)
        assert refs <= got and got == refs, (len(got), len(refs))
        assert len(got) < len(shipped)
        assert rep["blobs_fetched"] == len(got) and rep["blobs_missing"] == []
        # a follower: no LIST in any round; the blobs new records name arrive with them
        ftgt = open_target(url, ReplicateOptions.from_any(ropts))
        fdest = str(tmp_path / "fdest")
        rounds: list[dict] = []
        t = threading.Thread(target=follow, args=(url, fdest, ropts),
                             kwargs={"stop": stop, "interval": 0.05, "apply_every": 0.1,
                                     "on_round": rounds.append, "target": ftgt})
        t.start()
        assert _wait(lambda: len(rounds) >= 3)
        lists = ftgt.requests["LIST"]
        before = _blob_files(fdest)
        content = os.urandom(4000)
        with s.transaction() as tx:
            tx.files(ws).write("g.bin", content)
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.sync_replica(timeout=30)
        assert _wait(lambda: _get(fdest, "k4") == 4)
        n = len(rounds)
        assert _wait(lambda: len(rounds) >= n + 3)
        assert ftgt.requests["LIST"] == lists == 0, ftgt.requests
        new = _blob_files(fdest) - before
        import hashlib
        assert hashlib.sha256(content).hexdigest() in new, new
    finally:
        stop.set()
        if t is not None:
            t.join(30)
        s.close()
