"""Audit 55, replication, restore and follow: regression tests (each failed on the code
before its fix).

Real stores and their real shippers in this process, ``file://`` replicas made
unreachable by turning their directory into a file (as in test_audit54_repl), followers
run by ``walstore.replication.follow`` in a thread (its ``on_round`` reports awaited).
"""
from __future__ import annotations

import threading

import pytest

import walstore
import walstore.store
import walstore.replication

from store_support import files_with
from test_audit54_repl import _down, _up

SECRET = "SSN-123-ERASE-ME-5501"


class _Follower:
    """``walstore.replication.follow`` in a thread; ``at(lsn)`` awaits a round that ended
    at or past ``lsn``; ``error`` is what ended it."""

    def __init__(self, url: str, dest: str) -> None:
        self.stop = threading.Event()
        self.ended = threading.Event()
        self.cond = threading.Condition()
        self.position = -1
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, dest))
        self.thread.start()

    def _on_round(self, info: dict) -> None:
        with self.cond:
            if "error" not in info:
                self.position = info["position"] or 0
            self.cond.notify_all()

    def _run(self, url: str, dest: str) -> None:
        try:
            walstore.replication.follow(url, dest, stop=self.stop, interval=0.02,
                                        apply_every=0, on_round=self._on_round)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        finally:
            self.ended.set()
            with self.cond:
                self.cond.notify_all()

    def at(self, lsn: int, timeout: float = 30) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.position >= lsn or self.ended.is_set(),
                                      timeout) and self.position >= lsn

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def test_a_follower_stopped_by_a_hole_erases_what_a_purge_in_it_erased(
        tmp_path, monkeypatch):
    """A follower meets a hole (the replica was unreachable while the source purged, and
    the purge's erasure trimmed the log it had not shipped): it cannot cross it and
    stops.  DEST — a read-only copy readers keep reading — went on returning the keys the
    source purged in the hole, though the hole's ``pg`` names that purge.  A follower now
    applies every purge the replica knows of past DEST's position before it stops."""
    monkeypatch.setattr(walstore.store, "PURGE_SHIP_WAIT_S", 0.5)  # (the wait, not the logic)
    path, rep, dest = str(tmp_path / "src"), str(tmp_path / "rep"), str(tmp_path / "dest")
    url = "file://" + rep
    with walstore.open(path, replicate_to=url,
                       replicate_options={"interval": 0.05, "max_backoff": 0.2}) as s:
        with s.transaction() as tx:
            tx.put("secret/a", SECRET)
            tx.put("pub", 1)
        s.sync_replica(timeout=10)
        f = _Follower(url, dest)
        ro = None
        try:
            assert f.at(s._shipper.shipped), f.error
            ro = walstore.open(dest, readonly=True)  # (a reader of DEST open throughout)
            assert ro.get("secret/a") == SECRET  # (the follower holds it)
            _down(rep)
            try:
                s.purge("secret/")
                with s.transaction() as tx:
                    tx.put("pub", 2)
            finally:
                _up(rep)
            s.sync_replica(timeout=20)
            assert f.ended.wait(30)
            assert ro.get("secret/a") is None and ro.get("pub") == 1
        finally:
            f.close()
            if ro is not None:
                ro.close()
    assert isinstance(f.error, walstore.ReplicationError), f.error
    assert "hole in the replica's WAL" in str(f.error) and "applied to DEST" in str(f.error)
    with walstore.open(dest, readonly=True) as c:
        assert c.get("secret/a") is None  # (was SECRET)
        assert list(c.scan(prefix="secret/")) == []
        assert c.get("pub") == 1
    assert files_with(dest, SECRET.encode()) == []


def test_a_restore_refused_for_a_hole_with_unknown_purges_names_why(tmp_path, monkeypatch):
    """More purges in one hole than the source's record keeps (its newest
    ``KEEP_RECENT_PURGES``, 64; 3 here to keep it short): the hole's ``pg`` is nil and a
    restore to a point before it is refused — a bounded, documented answer, but the
    refusal said only that the purges were "not known", not why (the record's bound)."""
    import walstore.engine.apply as apply
    monkeypatch.setattr(walstore.store, "PURGE_SHIP_WAIT_S", 0.05)  # (the wait, not the logic)
    monkeypatch.setattr(apply, "KEEP_RECENT_PURGES", 3)
    path, rep = str(tmp_path / "src"), str(tmp_path / "rep")
    url = "file://" + rep
    with walstore.open(path, replicate_to=url,
                       replicate_options={"interval": 0.05, "max_backoff": 0.2}) as s:
        with s.transaction() as tx:
            for i in range(5):
                tx.put(f"u{i}/x", SECRET)
        s.restore_point("before")
        s.sync_replica(timeout=10)
        _down(rep)
        try:
            for i in range(5):
                s.purge(f"u{i}/")
            with s.transaction() as tx:
                tx.put("pub", 2)
        finally:
            _up(rep)
        s.sync_replica(timeout=20)
    with pytest.raises(walstore.ReplicationError) as e:
        walstore.restore(url, str(tmp_path / "r"), to="before")
    assert "not known" in str(e.value) and "newest 64 purges only" in str(e.value)
    assert not (tmp_path / "r").exists()


def test_a_follower_behind_retention_erases_the_purges_the_replica_still_lists(tmp_path):
    """A follower stopped longer than the replica retains history is told to restore
    anew; DEST, still read, returned keys the source purged since (the purge's record is
    in a WAL object the replica still lists, past the history retention removed).  It now
    applies that purge before it stops, and says that purges in the removed history are
    not known."""
    from walstore.replication import follow, restore
    url = f"file://{tmp_path}/replica"
    opts = {"interval": 0.05, "snapshot_interval": 0, "retention_seconds": 0,
            "delete_grace": 0}
    src, dest = str(tmp_path / "s"), str(tmp_path / "dest")

    def commit_and_ship(n: int, tag: str, purge: str | None = None) -> None:
        with walstore.open(src, replicate_to=url, replicate_options=opts) as s:
            for i in range(n):
                with s.transaction() as tx:
                    tx.put(f"{tag}{i}", i)
            if purge:
                s.purge(purge)
            s.sync_replica(timeout=30)

    with walstore.open(src, replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("secret/a", SECRET)
        s.sync_replica(timeout=30)
    restore(url, dest, None, opts, follow=True)
    for r in range(3):  # retention (no time, 2 snapshots kept) moves past DEST's position
        commit_and_ship(20, f"r{r}")
    commit_and_ship(5, "last", purge="secret/")
    with pytest.raises(walstore.ReplicationError) as e:
        follow(url, dest, opts, stop=threading.Event(), interval=0.05)
    msg = str(e.value)
    assert "older than what the replica" in msg and "restore anew" in msg, msg
    assert "'secret/'" in msg and "applied to DEST" in msg, msg
    assert "may hold keys the source purged in that history" in msg, msg
    with walstore.open(dest, readonly=True) as c:
        assert c.get("secret/a") is None  # (was SECRET)
    assert files_with(dest, SECRET.encode()) == []


def test_a_follower_stopped_by_a_missing_object_erases_the_purges_past_it(tmp_path):
    """A WAL object the manifest lists is gone from the replica (a bucket lifecycle rule
    deleting old objects, damage): a follower meeting it stops for good, as documented.
    DEST went on returning keys the source purged in a later WAL object the replica still
    holds (its ``pg`` names the purge).  It now applies those purges before it stops."""
    import os
    from walstore.replication import follow, restore
    from walstore.replication.manifest import MANIFEST_KEY, Manifest, decode
    from walstore.replication.targets import FileTarget
    rep = tmp_path / "rep"
    url = f"file://{rep}"
    opts = {"interval": 0.05, "snapshot_interval": 3600}
    src, dest = str(tmp_path / "s"), str(tmp_path / "dest")
    with walstore.open(src, replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("secret/a", SECRET)
        s.sync_replica(timeout=30)
        restore(url, dest, None, opts, follow=True)
        at = s._shipper.shipped
        with s.transaction() as tx:
            tx.put("pub", 1)
        s.sync_replica(timeout=30)  # (an object of its own: the one deleted below)
        s.purge("secret/")
        with s.transaction() as tx:
            tx.put("pub", 2)
        s.sync_replica(timeout=30)
    t = FileTarget(str(rep))
    m = Manifest(decode(t.get(MANIFEST_KEY, 1 << 20)[0], url))
    [gone] = [e for e in m.wal if e["a"] == at]
    assert not gone.get("pg") and any(e.get("pg") for e in m.wal if e["a"] > at), m.wal
    os.unlink(os.path.join(rep, gone["k"]))
    with pytest.raises(walstore.ReplicationError) as e:
        follow(url, dest, opts, stop=threading.Event(), interval=0.05)
    msg = str(e.value)
    assert "'secret/'" in msg and "applied to DEST" in msg, msg
    with walstore.open(dest, readonly=True) as c:
        assert c.get("secret/a") is None  # (was SECRET)
    assert files_with(dest, SECRET.encode()) == []


def test_a_reader_in_the_followers_process_does_not_break_its_purge_apply(tmp_path):
    """A follower run from Python (``follow`` in a thread) beside a reader of DEST in the
    same process: the two share one LMDB environment.  The follower's apply of a purge
    compacts DEST's LMDB and swaps the file in, every handle of the process following;
    the reader, which had seen the file replaced mid-swap, then reopened the environment
    again — closing it under the follower's next write: the follower died with
    ``StateWriteError: ... closed/deleted/dropped object`` and DEST kept the purged
    rows.  A reopen finding the process already on the current file now only follows."""
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    url = f"file://{tmp_path}/rep"
    with walstore.open(src, replicate_to=url, replicate_options={"interval": 0.02}) as s:
        with s.transaction() as tx:
            tx.put("pub", 0)
        s.sync_replica(timeout=10)
        f = _Follower(url, dest)
        reading = threading.Event()
        done = threading.Event()
        read_errors: list[BaseException] = []

        def read() -> None:
            try:
                with walstore.open(dest, readonly=True) as ro:
                    while not done.is_set():
                        ro.get("pub")
                        reading.set()
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                read_errors.append(e)
                reading.set()
        reader = threading.Thread(target=read)
        try:
            assert f.at(s._shipper.shipped), f.error
            reader.start()
            assert reading.wait(30)
            for i in range(25):
                with s.transaction() as tx:
                    tx.put(f"user/{i}/x", SECRET + str(i))
                    tx.put("pub", i)
                s.purge(f"user/{i}/")
                s.sync_replica(timeout=10)
                assert f.at(s._shipper.shipped), f.error
        finally:
            done.set()
            reader.join(30)
            f.close()
    assert f.error is None and not read_errors, (f.error, read_errors)
    with walstore.open(dest, readonly=True) as c:
        assert c.get("pub") == 24 and list(c.scan(prefix="user/")) == []
    assert files_with(dest, SECRET.encode()) == []


def test_a_follower_at_a_hole_with_unknown_purges_says_dest_may_hold_them(
        tmp_path, monkeypatch):
    """A hole whose purges the source could not tell (``pg`` nil: more than its record
    keeps; 3 here): the follower cannot apply them, and says that DEST may still hold
    keys the source purged (it said only "hole in the replica's WAL").  (The local WAL
    is trimmed in pieces: a hole may cover fewer purges than the record keeps, which the
    follower applies and says so — another case; the scenario is run again then, up to
    three times: once in many CI runs it was that case.)"""
    import walstore.engine.apply as apply
    monkeypatch.setattr(walstore.store, "PURGE_SHIP_WAIT_S", 0.05)  # (the wait, not the logic)
    monkeypatch.setattr(apply, "KEEP_RECENT_PURGES", 3)
    seen = []
    for attempt in range(3):
        msg = _hole_after_purges(tmp_path / f"try{attempt}")
        seen.append(msg)
        assert "hole in the replica's WAL" in msg, msg
        if "DEST may still hold keys" in msg:
            return
        # (the other case: the hole's purges were known, applied to DEST, and said so)
        assert "were applied to DEST" in msg, msg
    raise AssertionError(f"no hole of unknown purges in 3 runs: {seen}")


def _hole_after_purges(where) -> str:
    """Five purges made while the replica is down: the follower's error at the hole."""
    path, rep, dest = str(where / "src"), str(where / "rep"), str(where / "dest")
    url = "file://" + rep
    with walstore.open(path, replicate_to=url,
                       replicate_options={"interval": 0.05, "max_backoff": 0.2}) as s:
        with s.transaction() as tx:
            for i in range(5):
                tx.put(f"u{i}/x", SECRET)
        s.sync_replica(timeout=10)
        f = _Follower(url, dest)
        try:
            assert f.at(s._shipper.shipped), f.error
            _down(rep)
            try:
                for i in range(5):
                    s.purge(f"u{i}/")
            finally:
                _up(rep)
            s.sync_replica(timeout=20)
            assert f.ended.wait(30)
        finally:
            f.close()
    assert isinstance(f.error, walstore.ReplicationError), f.error
    return str(f.error)


def test_a_reader_in_the_writers_process_does_not_break_its_purge(tmp_path):
    """The same race in a writer store: a read-only store of it open in the writer's own
    process (one LMDB environment) reopened it after the purge's compaction had swapped
    the file in, closing it under the writer's next LMDB write: ``purge`` raised
    ``ErasureOwed`` (StateWriteError "closed/deleted/dropped object")."""
    path = str(tmp_path / "s")
    errors: list[BaseException] = []
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("pub", 0)
        done = threading.Event()
        reading = threading.Event()

        def read() -> None:
            try:
                with walstore.open(path, readonly=True) as ro:
                    while not done.is_set():
                        ro.get("user/1/x")
                        reading.set()
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                errors.append(e)
                reading.set()
        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert reading.wait(30)
            for i in range(40):
                with s.transaction() as tx:
                    tx.put(f"user/{i}/x", SECRET + str(i))
                    tx.put("pub", i)
                s.purge(f"user/{i}/")
        finally:
            done.set()
            reader.join(30)
        assert s.get("pub") == 39 and list(s.scan(prefix="user/")) == []
    assert not errors, errors
    assert files_with(path, SECRET.encode()) == []
