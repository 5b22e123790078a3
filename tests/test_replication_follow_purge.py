"""A purge reaching a follower (``walstore restore URL DEST --follow``) erases there what it
erases in the writer's store: after the round that copied it, no file of DEST holds the
purged bytes.  The follower kept them (probe-retention): its LMDB held the purged rows
until the next apply (``--apply-every``, 30 s by default; readers hid them by laying the
log on top) and, after it, their bytes in free pages, and its log files the records that
wrote them, for as long as it ran.  Now the round that copies a purge applies at once and
erases as the writer's purge checkpoint does (the log files behind it, LMDB compacted),
and a reader of DEST open throughout goes on reading across the compaction.

Real processes: the writer (this one) ships to a file:// replica, the follower is the CLI
in a subprocess with ``--apply-every 3600`` (so only the purge makes it apply), a reader
of DEST is open in this process; DEST's raw files are searched for a marker value."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import walstore

from test_replication_follow_rounds import _wait  # (the same polling wait)
from store_support import CLI, cli_env as _env, files_with as _files_with

MARK = b"PURGED-ON-THE-FOLLOWER-7431"


@pytest.mark.parametrize("arrives", ["with-its-seal", "before-its-seal"])
def test_a_purge_leaves_no_byte_in_the_followers_directory(tmp_path, arrives):
    """``with-its-seal``: the purge's commit reaches the replica together with the SEAL of
    the writer's rotation (the store ships up to it before erasing), so the follower's file
    holding the purged records is already behind the log's end.  ``before-its-seal``: the
    replica receives the purge's commit alone first (the writer waits here until the
    follower has copied it): the follower's current file holds the purged records and the
    purge, and is ended at the log's end and removed."""
    src_dir, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    url = f"file://{tmp_path}/replica"
    s = walstore.open(src_dir, replicate_to=url,
                      replicate_options={"interval": 0.05, "snapshot_interval": 0})
    follower = ro = None
    try:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"user/9/m{i % 4}", MARK.decode() + str(i))
                tx.put(f"keep/{i}", i)
        s.sync_replica(timeout=30)
        follower = subprocess.Popen(
            [sys.executable, "-c", CLI, "restore", url, dest, "--follow",
             "--interval", "0.05", "--apply-every", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())

        def caught_up() -> bool:
            nonlocal ro
            if ro is None:
                try:
                    ro = walstore.open(dest, readonly=True)
                except walstore.WalstoreError:
                    return False
            return ro.get("keep/19") == 19
        assert _wait(caught_up, 60), "the follower never caught up"
        # its first round applied the restored copy: the marker is in DEST's LMDB now; and
        # what is written from now on is in DEST's log only (no apply for an hour)
        assert _wait(lambda: "db/data.mdb" in _files_with(dest, MARK))
        for i in range(20, 30):
            with s.transaction() as tx:
                tx.put(f"user/9/w{i % 3}", MARK.decode() + str(i))
                tx.put(f"keep/{i}", i)
        s.sync_replica(timeout=30)
        assert _wait(lambda: ro.get("keep/29") == 29)
        assert any(f.startswith("wal") for f in _files_with(dest, MARK))

        seen_before_seal: dict = {}
        if arrives == "before-its-seal":
            eng = s._engine
            erase = eng.erase_old_bytes

            def erase_after_the_follower_copied(needles, after_rotate=None):
                s.sync_replica(timeout=30)  # the purge's commit only: no rotation yet
                seen_before_seal["gone"] = _wait(lambda: ro.get("user/9/m1") is None)
                seen_before_seal["clean"] = _wait(lambda: not _files_with(dest, MARK))
                seen_before_seal["left"] = _files_with(dest, MARK)
                return erase(needles, after_rotate=after_rotate)
            eng.erase_old_bytes = erase_after_the_follower_copied
        s.purge("user/9/")
        if seen_before_seal:
            assert seen_before_seal["gone"]
            assert seen_before_seal["clean"], seen_before_seal["left"]
        with s.transaction() as tx:
            tx.put("after", 1)
        s.sync_replica(timeout=30)

        # the reader open since before the purge reads on, across the compaction
        assert _wait(lambda: ro.get("after") == 1)
        assert ro.get("user/9/m1") is None and ro.get("user/9/w1") is None
        assert ro.get("keep/19") == 19 and ro.get("keep/29") == 29
        # and nothing of the purged values is in any file of DEST, well before the 3600 s
        assert _wait(lambda: not _files_with(dest, MARK), 15), _files_with(dest, MARK)
        assert not _files_with(src_dir, MARK)
        with s.transaction() as tx:
            tx.put("later", 2)
        s.sync_replica(timeout=30)
        assert _wait(lambda: ro.get("later") == 2)
        assert sorted(k for k, _v in ro.scan("user/")) == []
        assert follower.poll() is None, follower.stderr.read().decode()
    finally:
        if ro is not None:
            ro.close()
        if follower is not None:
            follower.send_signal(signal.SIGINT)
            try:
                follower.wait(20)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        s.close()
    # DEST stopped there is a sound copy: verified clean, its log included
    v = subprocess.run([sys.executable, "-c", CLI, "verify", dest], capture_output=True,
                       text=True, env=_env())
    assert v.returncode == 0, v.stdout + v.stderr
    with walstore.open(dest, readonly=True) as d:
        assert d.get("later") == 2 and d.get("keep/0") == 0 and d.get("user/9/m1") is None
