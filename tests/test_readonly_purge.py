"""A read-only store beside a live writer process that purges (agent_scripts/purge_writer.py).

``purge(prefix)`` promises that afterwards no API returns the erased keys, and a
transaction whose snapshot is older than a purge applied meanwhile raises
``SnapshotTooOld`` when it reads what the purge erased.  In a read-only process only the
first read of a transaction followed the writer: its later reads, and every read of an
``at`` view, went on reading the reader's MemTable of the writer's unapplied commits (or
the data file the purge's compaction had swapped out), and returned the erased values
the writer itself no longer returns.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import walstore
from walstore.codec import encode_key
from walstore.engine.snapshot import SnapshotTooOld

from line_process import LineProcess

SCRIPTS = Path(__file__).parent / "agent_scripts"
SECRET = "SECRET-SSN-51c2"


class Writer(LineProcess):
    def __init__(self, path: str, **options) -> None:
        super().__init__(SCRIPTS / "purge_writer.py", path, json.dumps(options),
                         quit_timeout=60)

    def put(self, key: str, value) -> int:
        return self("put", key, json.dumps(value))["lsn"]


def _store(tmp_path, where: str):
    """A writer process holding user/alice (in the reader's MemTable, ``unapplied``: the
    writer applies nothing on its own; or in LMDB, ``applied``) and a read-only store."""
    path = str(tmp_path / "s")
    w = Writer(path, apply_interval=3600) if where == "unapplied" else Writer(path)
    w.put("other", 1)
    w.put("user/alice", SECRET)
    w.put("user/bob", SECRET)
    w.put("junk/x", 1)
    if where == "applied":
        w("checkpoint")
    ro = walstore.open(path, readonly=True)
    in_memtable = bool(ro._engine.memtable.versions.get(encode_key("user/alice")))
    assert in_memtable == (where == "unapplied")
    return w, ro


def _purge(w: Writer, where: str) -> None:
    if where == "applied":
        # the first purge's compaction swaps the data file the reader has open for one the
        # second purge is applied to: the reader's old file never learns of it
        w("purge", "junk/")
    w("purge", "user/")


@pytest.mark.parametrize("where", ["unapplied", "applied"])
@pytest.mark.parametrize("read", ["get", "contains", "scan"])
def test_a_read_only_transaction_older_than_a_purge_never_reads_what_it_erased(
        tmp_path, where, read):
    w, ro = _store(tmp_path, where)
    try:
        tx = ro.transaction()
        assert tx.get("other") == 1  # the snapshot: user/alice committed before it
        _purge(w, where)
        with pytest.raises(SnapshotTooOld) as e:  # as in the writer process
            if read == "get":
                tx.get("user/alice")
            elif read == "contains":
                "user/alice" in tx  # noqa: B015
            else:
                list(tx.scan(prefix="user/"))
        assert e.value.purge is not None
        assert tx.get("other") == 1  # outside the purged range: still its one snapshot
        tx.rollback()
        assert ro.get("user/alice") is None
        with ro.transaction() as tx2:  # a new snapshot reads the purge's outcome
            assert tx2.get("user/alice") is None and tx2.get("other") == 1
    finally:
        ro.close()
        w.close()


def test_a_read_only_transaction_keeps_its_snapshot_while_the_writer_goes_on(tmp_path):
    """Its later reads follow the writer's LMDB, never its newer commits."""
    w, ro = _store(tmp_path, "applied")
    try:
        tx = ro.transaction()
        assert tx.get("other") == 1
        w.put("other", 2)
        w.put("new", 1)
        w("checkpoint")
        assert tx.get("other") == 1 and tx.get("new") is None
        assert [k for k, _v in tx.scan()] == ["junk/x", "other", "user/alice", "user/bob"]
        assert ro.get("other") == 2
        tx.rollback()
    finally:
        ro.close()
        w.close()


@pytest.mark.parametrize("where", ["unapplied", "applied"])
def test_an_at_view_made_before_a_purge_reads_the_purged_keys_as_absent(tmp_path, where):
    w, ro = _store(tmp_path, where)
    try:
        lsn = w.put("zz", 1)
        view = ro.at(walstore.LSN(lsn))
        assert view.get("user/alice") == SECRET
        _purge(w, where)
        assert view.get("user/alice") is None  # as in the writer process
        assert "user/alice" not in view
        with pytest.raises(KeyError):
            view["user/alice"]  # noqa: B018
        kept = ["other", "zz"] if where == "applied" else ["junk/x", "other", "zz"]
        assert [k for k, _v in view.scan()] == kept
        assert view.get("other") == 1
    finally:
        ro.close()
        w.close()


def test_a_read_only_transaction_scan_streaming_across_a_purge_raises(tmp_path):
    """A scan a read-only transaction holds, its first chunk read before the purge: the
    next chunk follows the writer too (SnapshotTooOld, never the erased rows)."""
    path = str(tmp_path / "s")
    w = Writer(path, apply_interval=3600)
    try:
        w.put("a", 1)
        for i in range(40):
            w.put(f"user/{i:02d}", f"{SECRET}-{i}")
        ro = walstore.open(path, readonly=True)
        try:
            tx = ro.transaction()
            it = tx.scan()
            assert next(it) == ("a", 1)
            w("purge", "user/")
            with pytest.raises(SnapshotTooOld):
                rows = list(it)
                assert not any(SECRET in str(v) for _k, v in rows), rows
            tx.rollback()
        finally:
            ro.close()
    finally:
        w.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_reader_reopening_between_the_swaps_two_renames_follows_the_new_lock_file(tmp_path):
    """The purge's compaction renames the new data file in, then a new lock file.  A reader
    that reopened between the two had the new data file under the OLD lock file (deleted,
    never written again: its LMDB transaction id stale) and, the data file unchanged since,
    never reopened again: it read LMDB through the stale id for good."""
    path = str(tmp_path / "s")
    w = Writer(path)
    try:
        for i in range(50):
            w.put(f"acct/{i:02d}", i)
        w.put("user/alice", SECRET)
        w("checkpoint")
        ro = walstore.open(path, readonly=True)
        try:
            assert ro.get("acct/07") == 7
            w("pause_swap", "60")  # (until the cue is removed below)
            w.proc.stdin.write("purge user/\n")  # answered once the purge returned
            w.proc.stdin.flush()
            cue = Path(path + ".midswap")
            deadline = time.monotonic() + 60
            while not cue.exists():
                assert time.monotonic() < deadline, "the writer never reached its swap"
                time.sleep(0.01)
            assert ro.get("acct/07") == 7  # reopens: the new data file, the old lock file
            cue.unlink()  # (the writer renames its lock file in now)
            assert "lsn" in json.loads(w.proc.stdout.readline())
            for i in range(50, 60):
                w.put(f"acct/{i:02d}", i)
            applied = w("checkpoint")["applied"]
            assert ro.get("acct/55") == 55 and ro.get("user/alice") is None
            assert ro._engine.state.applied_lsn() == applied  # LMDB read as the writer wrote it
            locks = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(path) and target.endswith(("lock.mdb", "(deleted)")):
                    locks.append(target)
            assert locks and not any("(deleted)" in t for t in locks), locks
        finally:
            ro.close()
    finally:
        w.close()


@pytest.mark.parametrize("where", ["writer", "read-only"])
def test_a_streamed_scan_never_yields_a_row_a_purge_erased_after_it_returned(tmp_path,
                                                                              where):
    """A ``store.scan`` holding rows it read from LMDB (a chunk: up to 256) before a purge
    yielded the rest of that chunk after ``purge()`` returned: up to 255 erased rows, in
    the writer's process too (probe-retention).  Each row is checked against the purges
    applied since (the writer's count; a read-only process reads the writer's from
    VISIBLE): SnapshotTooOld at the first row after the purge.  A scan of keys the purge
    did not touch goes on."""
    path = str(tmp_path / "s")
    w = Writer(path) if where == "read-only" else None
    s = walstore.open(path, durability="none") if w is None else None
    try:
        for i in range(120):
            if w is not None:
                w.put(f"user/{i:03d}", f"{SECRET}-{i}")
                w.put(f"keep/{i:03d}", i)
            else:
                with s.transaction() as tx:
                    tx.put(f"user/{i:03d}", f"{SECRET}-{i}")
                    tx.put(f"keep/{i:03d}", i)
        if w is not None:
            w("checkpoint")
            s = walstore.open(path, readonly=True)
        else:
            s.checkpoint()
        it, other = s.scan(prefix="user/"), s.scan(prefix="keep/")
        for _ in range(20):  # into the second chunk (16 rows, then 64)
            next(it)
            next(other)
        if w is not None:
            w("purge", "user/")
        else:
            s.purge("user/")
        leaked = []
        with pytest.raises(SnapshotTooOld):
            for _k, v in it:
                leaked.append(v)
        assert leaked == []
        assert [k for k, _v in other] == [f"keep/{i:03d}" for i in range(20, 120)]
    finally:
        if s is not None:
            s.close()
        if w is not None:
            w.close()


@pytest.mark.parametrize("how", ["deleted", "malformed"])
def test_a_new_writer_with_a_new_purges_file_is_followed(tmp_path, how):
    """The reader mapped PURGES once (beside VISIBLE); a new writer that found it missing
    or malformed made a new one while taking VISIBLE over as it was, so the reader read
    the old counter for good and a transaction of it returned what the new writer's purge
    erased (probe-review2).  A new writer generation makes the reader look at PURGES
    again."""
    path = str(tmp_path / "s")
    w = Writer(path, apply_interval=3600)
    w.put("other", 1)
    w.put("user/alice", SECRET)
    ro = walstore.open(path, readonly=True)
    w2 = None
    try:
        tx = ro.transaction()
        assert tx.get("other") == 1 and tx.get("user/alice") == SECRET
        w.close()
        purges = os.path.join(path, "PURGES")
        if how == "deleted":
            os.unlink(purges)
        else:
            with open(purges + ".x", "wb") as f:
                f.write(b"garbage")
            os.rename(purges + ".x", purges)
        w2 = Writer(path, apply_interval=3600)
        w2.put("junk", 1)
        w2("purge", "user/")
        with pytest.raises(SnapshotTooOld):
            tx.get("user/alice")
        tx.rollback()
    finally:
        ro.close()
        if w2 is not None:
            w2.close()
