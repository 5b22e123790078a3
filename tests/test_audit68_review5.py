"""Review 5 of audit 68: purges recorded only by a snapshot past the replica's WAL's end
(``pg``, 4e36d4c) in every restore that lands before that snapshot, and the read gate of
walstore/engine/lmdb_state.py (ce5e999..f055727)."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

import walstore
from walstore.engine.lmdb_state import LmdbState
from walstore.replication import DirectorySource, Shipper
from walstore.replication import restore as replica_restore

from test_audit68_restore_newest_review import (_damage, _secrets_and_kept, _shipped_to_d,
                                                 _snapshot_past_the_wal)
from test_replication_support import rows


def test_purged_keys_stay_gone_a_restore_of_everything_falling_back_to_the_wal_end(
        tmp_path):
    """A purge committed after the WAL's end and before the one snapshot past it, that
    snapshot's object damaged: a restore of everything falls back to the WAL's end and
    brought the 20 erased keys back — the snapshot's ``pg`` (the replica's only record of
    the purge) was read for a restore with a target only."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    _secrets_and_kept(s)
    with _shipped_to_d(s, path, url) as shipper:
        s.purge("user/")
        _snapshot_past_the_wal(s, shipper)
        snap = max(shipper.manifest.snapshots, key=lambda x: x["lsn"])
        assert snap["lsn"] > shipper.manifest.position and snap["pg"], snap
    _damage(tmp_path, snap)
    report = replica_restore(url, str(tmp_path / "r"))
    assert [k["lsn"] for k in report["snapshots_skipped"]] == [snap["lsn"]], report
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("kept", 1)]


def test_purged_keys_stay_gone_a_restore_falling_back_to_an_older_snapshot_past_the_wal(
        tmp_path):
    """Two snapshots past the WAL's end, a purge between them, the newest damaged: the
    restore of everything falls back to the older one (e03f7d0) and brought back the keys
    the purge erased (its only record the newest snapshot's ``pg``)."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.put("kept", 1)
    with _shipped_to_d(s, path, url) as shipper:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"user/{i:04d}", f"secret {i}")
        _snapshot_past_the_wal(s, shipper)
        s.purge("user/")
        with s.transaction() as tx:
            tx.put("user/new", 1)
        _snapshot_past_the_wal(s, shipper)
        snaps = sorted(shipper.manifest.snapshots, key=lambda x: x["lsn"])
    _damage(tmp_path, snaps[-1])
    report = replica_restore(url, str(tmp_path / "r"))
    assert report["cut_lsn"] == snaps[-2]["lsn"], report
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("kept", 1)]


def test_purged_keys_stay_gone_purges_before_between_and_after_a_snapshot_past_the_wal(
        tmp_path):
    """(Passes: coverage of 4e36d4c.)  A purge in the WAL shipped (before D), one between
    D and a snapshot past the WAL's end with keys re-created under its prefix, then the
    writer back, shipping past the snapshot a third purge: a restore to a txid before all
    three has none of the erased keys and none of the re-created ones (they do not exist
    there), each purge applied once; the restore of everything keeps the re-created keys."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    for tag in ("a", "b", "c"):
        with s.transaction() as tx:
            for i in range(3):
                tx.put(f"{tag}/{i}", f"old {tag}{i}")
    with s.transaction() as tx:
        tx.put("kept", 1)
    before = next(iter(s.log())).txid
    shipper = Shipper(DirectorySource(path), url, {"interval": 30})
    try:
        shipper.ship_once()
        s.purge("a/")
        shipper.ship_once()  # (the WAL to D, the first purge in it)
        s.purge("b/")
        with s.transaction() as tx:
            tx.put("b/new", "re-created")
        _snapshot_past_the_wal(s, shipper)
        snap = max(shipper.manifest.snapshots, key=lambda x: x["lsn"])
        assert [p for _l, p in snap["pg"]] in (["b/"], [b"b/"]), snap
        report = replica_restore(url, str(tmp_path / "t1"), to=before)
        assert sorted(report["purges_applied"]) == ["a/", "b/"], report
        s.purge("c/")
        shipper.ship_once()  # (the writer back: the WAL past the snapshot)
        assert shipper.manifest.position > snap["lsn"]
    finally:
        shipper.stop()
        s.close()
    with walstore.open(str(tmp_path / "t1")) as t:
        assert rows(t) == [("c/0", "old c0"), ("c/1", "old c1"), ("c/2", "old c2"),
                           ("kept", 1)]
    report = replica_restore(url, str(tmp_path / "t2"), to=before)
    assert report["purges_applied"] == ["a/", "b/", "c/"], report
    with walstore.open(str(tmp_path / "t2")) as t:
        assert rows(t) == [("kept", 1)]
    replica_restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("b/new", "re-created"), ("kept", 1)]


def test_a_manifest_without_snapshot_purges_restores_as_before(tmp_path):
    """(Passes: coverage.)  A replica whose snapshot past the WAL's end was written by a
    walstore before ``pg`` (no key): a restore to a txid the WAL holds is not refused, and
    a restore of everything falling back to the WAL's end (the snapshot damaged) gives the
    WAL's end, as before — nothing the manifest does not record is invented."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.put("user/1", "secret")
    before = next(iter(s.log())).txid
    with _shipped_to_d(s, path, url) as shipper:
        s.purge("user/")
        _snapshot_past_the_wal(s, shipper)
        snap = max(shipper.manifest.snapshots, key=lambda x: x["lsn"])
        del snap["pg"]  # (as an older walstore wrote it)
        shipper._save()
    report = replica_restore(url, str(tmp_path / "t"), to=before)
    assert report["purges_applied"] == [], report
    _damage(tmp_path, snap)
    replica_restore(url, str(tmp_path / "r"))
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == [("user/1", "secret")]


def _lmdb_dir(tmp_path) -> str:
    walstore.open(str(tmp_path / "s")).close()
    return os.path.join(str(tmp_path / "s"), "db")


def test_reads_go_on_a_reader_waiting_on_the_gate_is_released_when_the_section_ends(
        tmp_path):
    """(Passes: coverage of ce5e999.)  A reader arriving during an exclusive section (a
    swap, a resize) waits for its end and no longer (the 50 ms recheck is a fallback: the
    section's notify wakes it), 10 times in a row."""
    h = LmdbState(_lmdb_dir(tmp_path), readonly=True)
    try:
        waits: list[float] = []

        def reader() -> None:
            time.sleep(0.03)
            t = time.monotonic()
            h.map_size()
            waits.append(time.monotonic() - t)
        for _ in range(10):
            th = threading.Thread(target=reader)
            th.start()
            h.gate.exclusive(lambda: time.sleep(0.15))
            th.join(5)
        assert len(waits) == 10 and max(waits) < 0.3, waits
    finally:
        h.close()


def test_reads_go_on_beside_opens_closes_reopens_and_make_writable_from_threads(tmp_path):
    """(Passes: coverage of d139a52, edf973d, f055727.)  Six threads opening the store
    read-only or writable (the process's read-only environment swapped for a writable one
    whenever a writer opens what only readers hold), reopening and closing, for 3 s, beside
    a reader of a read-only handle that stays open and a reader that opens its own: no
    deadlock (registry lock against the gate), no read of a closed environment."""
    db = _lmdb_dir(tmp_path)
    errors: list[str] = []
    counts = {"opens": 0, "reads": 0}
    stop = time.monotonic() + 3.0

    def worker(k: int) -> None:
        rnd = random.Random(k)
        while time.monotonic() < stop:
            try:
                h = LmdbState(db, readonly=rnd.random() < 0.6)
                try:
                    for _ in range(rnd.randint(0, 10)):
                        h.map_size()
                    if h.readonly and rnd.random() < 0.3:
                        h.reopen()
                        h.map_size()
                finally:
                    h.close()
                counts["opens"] += 1
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(e))

    def keeper() -> None:
        while time.monotonic() < stop:
            h = LmdbState(db, readonly=True)
            try:
                for _ in range(200):
                    h.map_size()
                    counts["reads"] += 1
            except Exception as e:  # noqa: BLE001
                errors.append("keeper: " + repr(e))
            finally:
                h.close()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(6)]
    threads.append(threading.Thread(target=keeper, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread still waits"
    assert not errors, errors[:5]
    assert counts["opens"] > 100 and counts["reads"] > 1000, counts


def test_a_refused_fallback_says_the_snapshot_past_the_wal_could_not_be_restored(tmp_path):
    """The one snapshot past the WAL's end damaged and the purges between the two not
    known (``pg`` nil): the restore of everything, falling back to the WAL's end, is
    refused (it could bring erased keys back), and the refusal said "a restore of
    everything restores the snapshot" — the very restore that could not."""
    path, url = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.put("user/1", "secret")
    with _shipped_to_d(s, path, url) as shipper:
        s.purge("user/")
        _snapshot_past_the_wal(s, shipper)
        snap = max(shipper.manifest.snapshots, key=lambda x: x["lsn"])
        snap["pg"] = None  # (the source could not tell: more purges than it records)
        shipper._save()
    _damage(tmp_path, snap)
    with pytest.raises(walstore.ReplicationError) as e:
        replica_restore(url, str(tmp_path / "r"))
    assert "could not be restored" in str(e.value), str(e.value)
    assert "a restore of everything restores the snapshot" not in str(e.value)
    assert not os.path.exists(tmp_path / "r")
