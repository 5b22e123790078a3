"""Audit 66, an adversarial review of the reversible-files changes of this stop: a read
(read, exists, listdir) puts back what an ended transaction left owed first, committed
transactions are marked settled as they end (``Files.committed``), ``at(point).files``
reads an owed path's before-image, and the open's file undos run before the WAL spare is
made (a forced blob gc on a full disk).  Real files, real threads; faults from the
project's seam (tools.faults)."""
from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import walstore
from store_support import cli_env
from test_faults import faults  # noqa: F401 (the fault backend, installed per test)
from tools.fullsweep import fill_to

SYNCS = ("fsync", "fdatasync")


def _read_disk(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _workspace(tmp_path) -> str:
    """A new workspace directory (0700) under ``tmp_path``."""
    ws = str(tmp_path / "ws")
    os.mkdir(ws, 0o700)
    return ws


def test_a_read_after_commit_outcome_unknown_never_puts_back_its_files(tmp_path, faults):
    """A file transaction whose COMMIT's fsync fails (CommitOutcomeUnknown: the store is
    read-only, the next open decides) must keep its files as they are: the page cache
    kept the record, so the next open finds it committed.  A later transaction's read
    of the path must not take it for one that ended owing its undo."""
    ws = _workspace(tmp_path)
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


class _CountedItems(dict):
    """The claim table, its ``items()`` walks counted (a walk of every claim of the store)."""

    walks = 0

    def items(self):
        self.walks += 1
        return super().items()


def test_a_listing_of_the_workspace_root_costs_no_scan_of_every_claim(tmp_path):
    """Reads put back what ended transactions left owed (audit 66): a listing of the
    workspace root looked for them among every path claim of the store — one pass over
    the whole claim table per transaction's first listing.  With one open transaction
    holding 12,000 paths, a listing of the root took 0.5-4 ms where a listing of a
    sibling directory took 0.06 ms (the root's 0.11 ms before the change).  Counted, not
    timed: a listing walks the claim table no more (a listing writes no claim, so no
    prune walks it either)."""
    ws = str(tmp_path / "ws")
    os.makedirs(os.path.join(ws, "other"), 0o700)
    os.makedirs(os.path.join(ws, "bulk"), 0o700)
    for j in range(6_000):
        open(os.path.join(ws, "bulk", f"f{j}"), "wb").close()
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        big = s.transaction()
        big.files(ws).rename("bulk", "moved")  # (its paths, both names: claimed)
        assert len(s._files._claims) > 12_000
        s._files._claims = claims = _CountedItems(s._files._claims)
        for rel in ("other", ""):
            tx = s.transaction()
            tx.files(ws).listdir(rel)
            tx.rollback()
        assert claims.walks == 0, claims.walks
        big.commit()


def test_a_read_after_a_clean_rollback_costs_what_one_after_a_commit_does(tmp_path):
    """Reads put back what ended transactions left owed, and look first (``_owed_now``:
    the unapplied events and the ``fsteps`` rows) unless the owner is known to owe nothing
    (``_settled``).  Committed transactions were settled as they ended, rolled-back ones
    whose undo put every file back were not: after 400 transactions each overwrote one of
    400 committed files and rolled back, a transaction reading the 400 files took ~270-300
    µs a read where a second one took ~35-40 (before audit 66's reads: 33-42 both).
    Counted, not timed: the first reads look at no transaction's owed undo."""
    ws = _workspace(tmp_path)
    names = [f"f{i}.txt" for i in range(400)]
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            for n in names:
                tx.files(ws).write(n, b"committed")
        for n in names:
            tx = s.transaction()
            tx.files(ws).write(n, b"rolled back")
            tx.rollback()
        files, looks = s._files, []
        owed_now = files._owed_now
        files._owed_now = lambda txids=None: looks.append(txids) or owed_now(txids)
        tx = s.transaction()
        assert [tx.files(ws).read(n) for n in names] == [b"committed"] * len(names)
        tx.rollback()
        assert looks == [], len(looks)
        assert all(_read_disk(os.path.join(ws, n)) == b"committed" for n in names)


# a writer with a file history: v1 then v2 of hist.bin and v1 of gone.bin (deleted by
# v2's transaction) committed, a rolled-back JUNK write (its blob garbage), then an
# overwrite of big.bin in flight when it kills itself (kill -9)
HISTORY_WRITER = """
import os, signal, sys
import walstore
store, ws = sys.argv[1], sys.argv[2]
s = walstore.open(store, segment_size=1 << 20)
with s.transaction() as tx:
    tx.files(ws).write("big.bin", os.urandom(300_000))
    tx.files(ws).write("hist.bin", b"v1" * 50_000)
    tx.files(ws).write("gone.bin", b"g1" * 50_000)
with s.transaction() as tx:
    tx.files(ws).write("hist.bin", b"v2" * 50_000)
    tx.files(ws).delete("gone.bin")
print(s.log(limit=2)[1].txid, s.log(limit=1)[0].txid, flush=True)
tx = s.transaction()
tx.files(ws).write("junk.bin", os.urandom(600_000))
tx.rollback()
tx = s.transaction()
tx.files(ws).write("big.bin", os.urandom(300_000))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _history_writer_killed(mnt: str) -> tuple[str, str, tuple[int, int]]:
    """HISTORY_WRITER run on ``mnt`` (killed with its overwrite in flight; the spare it
    kept dropped), then the disk filled to 350 KB free: (store, workspace, the two
    committed txids)."""
    store, ws = os.path.join(mnt, "s"), os.path.join(mnt, "ws")
    os.mkdir(ws, 0o700)
    r = subprocess.run([sys.executable, "-c", HISTORY_WRITER, store, ws], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]
    first, second = (int(t) for t in r.stdout.split())
    spare = os.path.join(store, "wal", "spare.tmp")
    if os.path.exists(spare):
        os.unlink(spare)
    fill_to(mnt, 350_000)
    return store, ws, (first, second)


def test_the_room_recovery_frees_for_a_file_undo_keeps_every_retained_version(
        mount_tmpfs):
    """At open, a file undo that ran out of room is retried after a forced blob gc
    (``Files.free_room``): only blobs nothing refers to may go.  The versions the history
    keeps (a file overwritten, a file deleted) must still read as of their points, and a
    revert must still put them back, after a recovery that freed room."""
    mnt = str(mount_tmpfs("16m"))
    store, ws, (first, second) = _history_writer_killed(mnt)
    with walstore.open(store) as s:
        assert not [p for p in s.last_recovery.problems if p.kind == "file-undo-failed"]
        os.unlink(os.path.join(mnt, "fill"))
        v1 = s.at(first).files(ws)
        assert v1.read("hist.bin") == b"v1" * 50_000
        assert v1.read("gone.bin") == b"g1" * 50_000
        assert s.at(second).files(ws).read("hist.bin") == b"v2" * 50_000
        s.revert(second)
        assert _read_disk(os.path.join(ws, "hist.bin")) == b"v1" * 50_000
        assert _read_disk(os.path.join(ws, "gone.bin")) == b"g1" * 50_000


def test_a_read_only_store_beside_the_writer_never_reads_a_file_no_commit_made_as_of_a_point(
        tmp_path):
    """``store.at(point).files(ws)`` reads a path with no committed version that a
    transaction changed and has not put back (open, dropped, or rolled back on a full
    disk) as its before-image (ae53bc5: the writer's own view).  A read-only store open
    beside the writer knows none of the writer's transactions (no claims), though their
    ``fsteps`` rows are applied: seen before the fix, ``ro.at(point).files(ws).read``
    of a file a dropped (or still open) transaction created returned its bytes, where
    the writer's view of the same point raised FileNotFoundError."""
    ws = _workspace(tmp_path)
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.files(ws).write("a", b"committed")
        last = s.log(limit=1)[0].txid
        dropped = s.transaction()
        dropped.files(ws).write("new", b"NEVER COMMITTED")
        del dropped
        gc.collect()
        live = s.transaction()
        live.files(ws).write("live", b"NOT COMMITTED YET")
        s.checkpoint()  # (their FILE_STEPS applied: readable from a read-only store)
        with pytest.raises(FileNotFoundError):
            s.at(last).files(ws).read("new")
        with walstore.open(path, readonly=True) as ro:
            view = ro.at(last).files(ws)
            assert view.read("a") == b"committed"
            for name in ("new", "live"):
                with pytest.raises(FileNotFoundError):
                    view.read(name)
                assert not view.exists(name)
        live.rollback()


def test_close_waits_for_a_read_putting_back_what_a_dropped_transaction_left(tmp_path,
                                                                            faults):
    """A read of a path a dropped transaction left owed puts it back first (audit 66):
    it changes the workspace and then logs the outcome (FILE_RESTORED), as a change
    does.  close() waits for the file operations of other threads (what they do must be
    logged before the log closes and the store's lock goes: audit 60), but not for such
    a read.  Seen before the fix: with the put-back's rename into the workspace held
    0.5 s, the log was closed (and the lock let go: another process's recovery could
    undo the same file meanwhile) while the read was still putting the file back."""
    ws = _workspace(tmp_path)
    s = walstore.open(str(tmp_path / "s"))
    with s.transaction() as tx:
        tx.files(ws).write("a.txt", b"committed")
    dropped = s.transaction()
    dropped.files(ws).write("a.txt", b"NEVER COMMITTED")
    del dropped
    gc.collect()
    inside, seen, outcome = threading.Event(), [], []

    def slow_put_back():  # (the put-back's rename into the workspace: held, then EIO)
        inside.set()
        time.sleep(0.5)
        seen.append(s._engine.closed)
        return OSError(errno.EIO, "Input/output error")
    faults.fail("rename", path=os.path.join(ws, "*"), raises=slow_put_back)

    def reader():
        try:
            with s.transaction() as t:
                outcome.append(t.files(ws).read("a.txt"))
        except Exception as e:  # noqa: BLE001 (what the read met, asserted below)
            outcome.append(e)
    th = threading.Thread(target=reader)
    th.start()
    assert inside.wait(10)
    s.close()
    th.join(10)
    assert seen == [False], "the log closed under a read putting a file back"
    assert isinstance(outcome[0], walstore.ConflictError), outcome  # (the EIO: owed)
    faults.clear()
    with walstore.open(str(tmp_path / "s")) as s:
        assert _read_disk(os.path.join(ws, "a.txt")) == b"committed"


def test_an_open_whose_room_making_gc_fails_still_opens_and_says_the_undo_is_owed(
        mount_tmpfs, faults):
    """At open, a file undo that ran out of room is retried after a forced blob gc
    (``Files.free_room``).  That gc is a help, not a step the open needs: when it cannot
    run (here its lock file cannot be opened: EIO), the open goes on as before the
    retry existed — the undo stays owed (``file-undo-failed``) and the store opens."""
    mnt = str(mount_tmpfs("16m"))
    store, ws, _points = _history_writer_killed(mnt)
    faults.fail("open", errno.EIO, path="*gc.lock", times=None)
    s = walstore.open(store)
    faults.clear()  # (the close's own blob gc: a checkpoint's, its EIO a StoreIOError)
    kinds = [p.kind for p in s.last_recovery.problems]
    s.close()
    assert "file-undo-failed" in kinds, kinds
    os.unlink(os.path.join(mnt, "fill"))
    with walstore.open(store) as s:
        assert not s.last_recovery.problems, s.last_recovery.problems
