"""Audit 66, an adversarial review of the reversible-files changes of this stop: a read
(read, exists, listdir) puts back what an ended transaction left owed first, committed
transactions are marked settled as they end (``Files.committed``), ``at(point).files``
reads an owed path's before-image, and the open's file undos run before the WAL spare is
made (a forced blob gc on a full disk).  Real files, real threads; faults from the
project's seam (tools.faults)."""
from __future__ import annotations

import errno
import os
import time

import pytest

import walstore
from test_faults import faults  # noqa: F401 (the fault backend, installed per test)

SYNCS = ("fsync", "fdatasync")


def _read_disk(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_read_after_commit_outcome_unknown_never_puts_back_its_files(tmp_path, faults):
    """A file transaction whose COMMIT's fsync fails (CommitOutcomeUnknown: the store is
    read-only, the next open decides) must keep its files as they are: the page cache
    kept the record, so the next open finds it committed.  A later transaction's read
    of the path must not take it for one that ended owing its undo."""
    ws = str(tmp_path / "ws")
    os.mkdir(ws, 0o700)
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", b"v1")
        with pytest.raises(walstore.CommitOutcomeUnknown):
            with s.transaction() as tx:
                tx.files(ws).write("a.txt", b"v2")
                faults.fail(SYNCS, errno.EIO, path="*.wal")  # (the COMMIT's)
        assert _read_disk(os.path.join(ws, "a.txt")) == b"v2"
        with s.transaction() as t3:
            try:
                got = t3.files(ws).read("a.txt")
            except walstore.WalstoreError:
                got = None
            listed = t3.files(ws).listdir()
        assert _read_disk(os.path.join(ws, "a.txt")) == b"v2", (got, listed)
    faults.clear()
    with walstore.open(path) as s:  # (the page cache kept the record: it committed)
        assert s.log(limit=1)[0].txid
        assert _read_disk(os.path.join(ws, "a.txt")) == b"v2"


def _listdir_ms(s, ws: str, rel: str = "") -> float:
    """The fastest of 15 first listings of ``rel`` by a transaction each (ms)."""
    best = None
    for _ in range(15):
        tx = s.transaction()
        t0 = time.perf_counter()
        tx.files(ws).listdir(rel) if rel else tx.files(ws).listdir()
        dt = (time.perf_counter() - t0) * 1e3
        tx.rollback()
        best = dt if best is None else min(best, dt)
    return best


def test_a_listing_of_the_workspace_root_costs_no_scan_of_every_claim(tmp_path):
    """Reads put back what ended transactions left owed (audit 66): a listing of the
    workspace root looked for them among every path claim of the store — one pass over
    the whole claim table per transaction's first listing.  With one open transaction
    holding 12,000 paths, a listing of the root took 0.5-4 ms where a listing of a
    sibling directory took 0.06 ms (the root's 0.11 ms before the change)."""
    ws = str(tmp_path / "ws")
    os.makedirs(os.path.join(ws, "other"), 0o700)
    os.makedirs(os.path.join(ws, "bulk"), 0o700)
    for j in range(6_000):
        open(os.path.join(ws, "bulk", f"f{j}"), "wb").close()
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        big = s.transaction()
        big.files(ws).rename("bulk", "moved")  # (its paths, both names: claimed)
        assert len(s._files._claims) > 12_000
        other = _listdir_ms(s, ws, "other")
        root = _listdir_ms(s, ws)
        big.commit()
    assert root < 3 * other + 0.2, (root, other)
