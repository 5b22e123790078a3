"""Audit 52, purge: what a purge reports when a step after its commit fails, and the
purge's own steps under real faults and real processes.

1. A purge that committed but whose apply or erasure failed raises ``ErasureOwed``
   (it raised the step's own error, read as a failed purge); the CLI says so too.
2. A failed swap of the rewritten LMDB file leaves the store readable (its environment
   was left closed: every read raised CorruptionError).
3. The owed erasure's quarantine scrub failing in ``checkpoint()``/``open()`` is a
   StoreIOError (a raw OSError left).
4. ``restore --compensate`` across a purge after the cut undoes files and compensations
   at DEST's first open, newest first (the files were put back inside ``restore``).
5. An owed erasure finished by ``checkpoint()`` or by an open's trimming checkpoint ships
   first (it trimmed unshipped commits: a hole in the replica).

Faults are real: ``tools.faults.FaultBackend`` (the ``walstore.fileio`` seam) fails the
LMDB commit that applies the purge, LMDB's sync at its checkpoint, a rename or a directory
fsync of the LMDB swap, the WAL's new segment, the quarantine scrub's unlink — on real
files; writers are killed with SIGKILL in real processes; replicas are file:// ones.
Afterwards the marker is grepped in every file of the store directory.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402

from store_support import files_with  # noqa: E402

MARKER = b"AUDIT52-PURGE-c41d"


def fill(s) -> None:
    for i in range(30):
        with s.transaction() as tx:
            tx.put(f"conv/{i % 4}", f"{MARKER.decode()}-{i}")
            tx.put(f"keep/{i}", i)


# ---- 1. a purge that committed but whose apply or erasure failed says so ---------------------

FAULTS = {
    # the LMDB commit that applies the purge (a disk error in LMDB)
    "apply": (lambda fb: fb.fail_lmdb("commit"), True),
    # LMDB's sync at the purge's checkpoint
    "lmdb-sync": (lambda fb: fb.fail_lmdb("sync"), True),
    # the WAL's fresh segment the purge's erasure rotates to (a full disk)
    "new-segment": (lambda fb: fb.fail("open", errno.ENOSPC, path="*.wal"), False),
    # the compacted data file renamed in over the old one
    "swap-data": (lambda fb: fb.fail("rename", errno.EIO, path="*/db.compact/data.mdb"), False),
    # the fresh lock file renamed in after the data file
    "swap-lock": (lambda fb: fb.fail("rename", errno.EIO, path="*/db.compact/lock.mdb"), True),
    # the directory's fsync after both renames
    "swap-fsync": (lambda fb: fb.fail("fsync_dir", errno.EIO, path="*/s/db"), True),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_purge_that_committed_but_whose_erasure_failed_raises_erasure_owed(tmp_path, fault):
    # Before: the purge raised the step's own error (StateWriteError, WalWriteError, a raw
    # OSError from the LMDB swap), which read as a purge that failed although it had
    # committed: nothing said its keys were gone for good and the erasure owed.
    path = str(tmp_path / "s")
    arm, turns_read_only = FAULTS[fault]
    s = walstore.open(path)
    try:
        fill(s)
        # (applied to LMDB in a transaction of their own first: the marker is then in
        # data.mdb's old pages for certain; applied with the purge in one LMDB
        # transaction, whether its bytes reach the file at all is the page layout's
        # affair — the column-at-a-time apply of stop 63 left none there)
        s.checkpoint()
        fb = FaultBackend()
        with installed(fb):
            rule = arm(fb)
            with pytest.raises(walstore.ErasureOwed) as err:
                s.purge("conv/")
        assert rule.fired == 1
        e = err.value
        assert isinstance(e, walstore.StoreIOError) and isinstance(e, OSError)
        assert e.report["erasure_owed"] is True and e.txid == e.report["txid"]
        assert e.report["keys_deleted"] == 4 and e.lsn is not None
        assert "committed" in str(e) and e.__cause__ is not None
        assert ("reopen" in str(e)) == turns_read_only
        # the purge stands in this process: no API returns the keys
        assert s.get("conv/1") is None and s.history("conv/1") == []
        assert s.get("keep/3") == 3  # (reads go on: the swap's failure left LMDB readable)
        assert s.log(limit=1)[0].txid == e.txid
        if not turns_read_only:  # the store goes on, and its next checkpoint erases
            with s.transaction() as tx:
                tx.put("after", 1)
            assert files_with(path, MARKER)
            s.checkpoint()
            assert files_with(path, MARKER) == []
    finally:
        try:
            s.close()
        except walstore.WalstoreError:
            pass  # (a store that turned read-only may say so at close)
    with walstore.open(path) as s:  # the open finishes the owed erasure
        assert s.get("conv/1") is None and s.get("keep/29") == 29
        assert s._engine.erase_owed() == []
        assert [t.txid for t in s.log(limit=3)].count(e.txid) == 1  # (committed once)
    assert files_with(path, MARKER) == []


def test_a_purge_whose_quarantine_scrub_fails_raises_erasure_owed_and_the_open_finishes(
        tmp_path):
    from test_purge import crashed_store, quarantined_bins, tear_last_record
    path = crashed_store(tmp_path, "user/42/card", MARKER.decode())
    tear_last_record(path, b"user/42/card", 6, 0x80)
    with walstore.open(path) as s:
        assert quarantined_bins(path)
        fb = FaultBackend()
        with installed(fb):
            rule = fb.fail("unlink", errno.EIO, path="*/quarantine/*")
            with pytest.raises(walstore.ErasureOwed) as err:
                s.purge("user/42/")
        assert rule.fired == 1 and "store.checkpoint() or the next writable open" in str(err.value)
        assert files_with(path, MARKER)  # (the quarantined copy is still there)
    with walstore.open(path) as s:
        assert s._engine.erase_owed() == []
    assert files_with(path, MARKER) == [] and quarantined_bins(path) == []


def test_the_cli_says_a_purge_committed_when_its_erasure_failed(tmp_path):
    """`walstore purge` run in a process whose WAL cannot make its next segment: exit 1, and the message
    (and --json's type) says the purge committed and the erasure is owed."""
    import json
    import subprocess
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        fill(s)
    code = (
        "import sys, errno; sys.path.insert(0, sys.argv[1])\n"
        "from tools.faults import FaultBackend, installed\n"
        "from walstore.cli import main\n"
        "fb = FaultBackend(); fb.fail('open', errno.ENOSPC, path='*/wal/*[1-9]*.wal')\n"
        "with installed(fb):\n"
        "    main(['purge', sys.argv[2], 'conv/', '--yes', '--json'])\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), path], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["error"]["type"] == "ErasureOwed", doc
    assert "committed" in r.stdout and "owed" in r.stdout
    with walstore.open(path) as s:
        assert s.get("conv/1") is None
    assert files_with(path, MARKER) == []


# ---- 2. a failed swap of the rewritten LMDB file left the process unable to read -------------

@pytest.mark.parametrize("which", ["data.mdb", "lock.mdb"])
def test_a_failed_swap_of_the_rewritten_lmdb_file_leaves_the_store_readable(tmp_path, which):
    # Before: the swap closed this process's LMDB environment, then a rename failed and
    # the raw OSError left (not a WalstoreError); the environment stayed closed, so every
    # later read raised CorruptionError ("the LMDB environment is not a walstore state")
    # and close() an LMDB error ("Attempt to operate on closed/deleted/dropped object").
    # Now it is reopened on the data file in place: a failed data rename leaves the old
    # file and the store goes on (the erasure owed); a failed lock rename after the new
    # data file went in stops writing (as a crash between the renames), reads go on.
    path = str(tmp_path / "s")
    s = walstore.open(path)
    try:
        fill(s)
        fb = FaultBackend()
        with installed(fb):
            fb.fail("rename", errno.EIO, path=f"*/db.compact/{which}")
            with pytest.raises(walstore.ErasureOwed) as err:
                s.purge("conv/")
        assert isinstance(err.value.__cause__, walstore.WalstoreError)
        assert not os.path.exists(os.path.join(path, "db.compact"))
        assert [k for k, _v in s.scan(prefix="keep/")] == sorted(f"keep/{i}" for i in range(30))
        assert s.get("conv/2") is None and s.history("keep/5")[0].value == 5
        if which == "data.mdb":
            with s.transaction() as tx:
                tx.put("after", 1)
            assert s.get("after") == 1
        else:
            with pytest.raises(walstore.ReadOnlyError):
                with s.transaction() as tx:
                    tx.put("after", 1)
    finally:
        try:
            s.close()
        except walstore.WalstoreError:
            pass
    with walstore.open(path) as s:
        assert s.get("keep/7") == 7 and s.get("conv/2") is None
        assert s._engine.erase_owed() == []
    assert files_with(path, MARKER) == []


# ---- 3. the owed erasure's quarantine scrub failing in checkpoint() / open() -----------------

def test_a_failing_quarantine_scrub_of_an_owed_erasure_is_a_walstore_error_everywhere(tmp_path):
    # Before: checkpoint() and open() finishing an owed erasure let the scrub's raw OSError
    # out (README: no raw OSError leaves the API); now a StoreIOError (errno and file
    # kept) that says the erasure stays owed — and the store still opens once it can.
    from test_purge import crashed_store, quarantined_bins, tear_last_record
    path = crashed_store(tmp_path, "user/42/card", MARKER.decode())
    tear_last_record(path, b"user/42/card", 6, 0x80)
    fb = FaultBackend()
    s = walstore.open(path)
    try:
        with installed(fb):
            fb.fail("unlink", errno.EIO, path="*/quarantine/*", times=None)
            with pytest.raises(walstore.ErasureOwed):
                s.purge("user/42/")
            with pytest.raises(walstore.StoreIOError) as err:
                s.checkpoint()
            assert err.value.errno == errno.EIO and "owed" in str(err.value)
            assert "quarantine" in str(err.value.filename)
            s.close()
            with pytest.raises(walstore.StoreIOError) as err:
                walstore.open(path)
            assert err.value.errno == errno.EIO and "owed" in str(err.value)
    finally:
        s.close()
    assert files_with(path, MARKER)  # (still owed: the copy could not be removed)
    with walstore.open(path) as s:
        assert s._engine.erase_owed() == []
    assert files_with(path, MARKER) == [] and quarantined_bins(path) == []


# ---- 4. restore --compensate with a purge after the cut -------------------------------------

def _in_flight_at_the_cut_then_purged(tmp_path, seen):
    """A replica (file://) whose log has, at the cut (tx3), a transaction in flight (tx2)
    that wrote f.txt (v1) and then ran a compensable action; tx2 commits after the cut,
    then a purge."""
    from walstore.replication.restore import restore  # noqa: F401  (the [s3]-free path)
    root = tmp_path / "ws"
    root.mkdir()
    (root / "f.txt").write_text("orig")
    url = "file://" + str(tmp_path / "replica")

    def refund(act):
        seen.append((root / "f.txt").read_text())
    s = walstore.open(str(tmp_path / "s"), replicate_to=url, compensators={"refund": refund})
    try:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            tx.put("conv/1", MARKER.decode())
        tx2 = s.transaction()
        tx2.files(ws).write("f.txt", "v1")
        with tx2.action("charge", compensate="refund") as act:  # (newer than the write)
            act.result = {"charge": 1}
        tx3 = s.transaction()
        tx3.put("other", 1)
        tx3.commit()
        tx2.put("x", 1)
        tx2.commit()
        s.purge("conv/")
        s.sync_replica()
    finally:
        s.close()
    assert (root / "f.txt").read_text() == "v1" and seen == []
    return url, root, tx3.id, refund


def test_restore_compensate_across_a_purge_undoes_newest_first_at_the_first_open(tmp_path):
    # Before: with a purge after the cut, restore() applied it in the staged copy through
    # an ordinary first open, which (a --compensate copy) put the in-flight transaction's
    # files back right there — inside restore(), before DEST existed — while its
    # compensations waited for DEST's open with the handlers: the refund, newer than the
    # file write, ran after the write was undone (it saw "orig", not "v1"). Without the
    # purge the same restore undoes both at the first open, newest first.
    from walstore.replication.restore import restore
    seen: list = []
    url, root, cut, refund = _in_flight_at_the_cut_then_purged(tmp_path, seen)
    dest = str(tmp_path / "dest")
    rep = restore(url, dest, to=cut, compensate=True)
    assert rep["purges_applied"] == ["conv/"] and len(rep["in_flight_txids"]) == 1
    assert (root / "f.txt").read_text() == "v1"  # restore() itself changes no workspace
    with walstore.open(dest, compensators={"refund": refund}) as d:
        assert seen == ["v1"]  # newest first: the compensation before the file's undo
        assert (root / "f.txt").read_text() == "orig"
        assert [(a.name, a.state) for a in d.actions()] == [("charge", "compensated")]
        assert d.get("conv/1") is None and d.get("other") == 1 and d.get("x") is None
    assert files_with(dest, MARKER) == []


def test_restore_without_compensate_across_a_purge_still_holds_the_debts(tmp_path):
    from walstore.replication.restore import restore
    seen: list = []
    url, root, cut, refund = _in_flight_at_the_cut_then_purged(tmp_path, seen)
    dest = str(tmp_path / "dest")
    rep = restore(url, dest, to=cut)
    assert [e["held"] for e in rep["owed_file_effects"]] == [True]
    with walstore.open(dest, compensators={"refund": refund}) as d:
        assert seen == [] and (root / "f.txt").read_text() == "v1"  # held: never undone
        assert [(a.name, a.state, a.held) for a in d.actions()] == [("charge", "pending", True)]
        assert d.get("conv/1") is None


# ---- 5. an owed erasure finished by a checkpoint ships first (no hole in the replica) --------

def test_a_checkpoint_finishing_an_owed_erasure_ships_first_and_leaves_no_hole(tmp_path):
    # Before: store.checkpoint() finished an owed erasure (a purge that raised
    # ErasureOwed) with no shipping first: its trim (pins overridden) dropped the commits
    # made since, unshipped; the replica recorded a hole and a restore to any of them
    # failed (UnknownRestorePoint / "hole in the replica's WAL"), as the open did before
    # probe-follow45.
    from walstore.replication.restore import replicas, restore
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/replica"
    s = walstore.open(path, replicate_to=url, replicate_options={"interval": 3600})
    try:
        fill(s)
        s.sync_replica(timeout=30)
        fb = FaultBackend()
        with installed(fb):
            fb.fail("rename", errno.EIO, path="*/db.compact/data.mdb")
            with pytest.raises(walstore.ErasureOwed):
                s.purge("conv/")
        txids = []
        for i in range(10):  # not shipped: the next round is an hour away
            with s.transaction() as tx:
                tx.put(f"after/{i}", i)
            txids.append(tx.id)
        assert s._engine.erase_owed()
        s.checkpoint()
        assert s._engine.erase_owed() == [] and files_with(path, MARKER) == []
        s.sync_replica(timeout=30)
    finally:
        s.close()
    assert replicas(url)["holes"] == []
    rep = restore(url, str(tmp_path / "pitr"), to=txids[4])
    with walstore.open(str(tmp_path / "pitr"), readonly=True) as c:
        assert c.get("after/4") == 4 and c.get("after/5") is None and c.get("conv/1") is None
    assert rep["cut_lsn"] > 0


def test_an_open_with_retention_finishing_an_owed_erasure_ships_first(tmp_path):
    # Before: a writable open after a crash with retention set ran its trimming
    # checkpoint (Store._trim_after_recovery) before the shipper started, and that
    # checkpoint finished the owed erasure: the probe-follow45 hole again, for every
    # store with retain_transactions / retain_seconds.
    import subprocess
    from test_replication_purge_crash import DIE_AT_THE_ERASURE, _lsn_of_keep
    from walstore.replication.restore import replicas
    from store_support import cli_env
    src, url = str(tmp_path / "s"), f"file://{tmp_path}/replica"
    # killed before the purge is applied (its commit durable): the open REDOes it, so
    # its trimming checkpoint runs, with the erasure owed
    die = DIE_AT_THE_ERASURE.replace("s._engine.erase_old_bytes = killed",
                                     "s._engine.drain = killed")
    assert die != DIE_AT_THE_ERASURE
    p = subprocess.run([sys.executable, "-c", die, src, url], env=cli_env(), timeout=120)
    assert p.returncode == -9
    s = walstore.open(src, replicate_to=url, replicate_options={"interval": 0.05},
                      retain_transactions=1000)
    assert s.last_recovery.redone
    try:
        assert s.get("user/1") is None and s.get("keep/19") == 19
        s.sync_replica(timeout=30)
    finally:
        s.close()
    assert files_with(src, b"ERASE-ME-4512") == []
    assert replicas(url)["holes"] == []
    walstore.restore(url, str(tmp_path / "pitr"), to=walstore.LSN(_lsn_of_keep(src)))
    with walstore.open(str(tmp_path / "pitr"), readonly=True) as c:
        assert c.get("keep/19") == 19 and c.get("user/19") is None


# ---- documented (README, purge), checked: a prepared transaction's key under the prefix ------

@pytest.mark.parametrize("decide", ["commit_prepared", "rollback_prepared"])
def test_a_purge_over_a_prepared_transactions_key_is_refused_until_it_is_decided(tmp_path,
                                                                                   decide):
    # (passes before: the behaviour was right but undocumented; README now says it)
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("conv/a", MARKER.decode() + "-old")
        tx = s.transaction()
        tx.put("conv/x", MARKER.decode() + "-prepared")
        tx.prepare("g1")
        with pytest.raises(walstore.ConflictError) as err:
            s.purge("conv/")
        assert err.value.keys == ["conv/x"] and s.get("conv/a") is not None  # nothing purged
        getattr(s, decide)("g1")
        s.purge("conv/")
        assert s.get("conv/x") is None and s.get("conv/a") is None
    assert files_with(path, MARKER) == []
