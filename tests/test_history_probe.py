"""History under purge, retention and savepoints, as three probes found it (a concurrent
serializability checker, a model-based differential test and a crash-at-every-step sweep,
2026-12-01): reads of a snapshot older than a purge, history read while retention trims
it, a view whose point is trimmed, an action without a compensator undone by a savepoint,
and a revert of a directory a later transaction wrote into."""
from __future__ import annotations

import os

import pytest

import walstore


def _store(path, **kw) -> walstore.Store:
    return walstore.open(str(path), durability="none", **kw)


# ---- a purge after a snapshot -------------------------------------------------------------
def test_a_transaction_older_than_a_purge_never_reads_a_state_that_did_not_exist(tmp_path):
    s = _store(tmp_path / "s")
    with s.transaction() as tx:
        tx.update({"conv/1/count": 2, "conv/1/m1": "hi", "conv/1/m2": "there"})
    reader = s.transaction()
    assert reader.get("conv/1/count") == 2  # its snapshot: both messages exist
    s.purge("conv/1/")
    s.checkpoint()  # the purge is in LMDB: the history it erased is gone
    for read in (lambda: list(reader.scan(prefix="conv/1/m")), lambda: reader.get("conv/1/m1"),
                 lambda: "conv/1/m2" in reader):
        with pytest.raises(walstore.ConflictError, match="purge"):
            read()
    reader.rollback()
    with s.transaction() as fresh:  # a transaction begun after the purge reads it as done
        assert fresh.get("conv/1/count") is None and list(fresh.scan(prefix="conv/")) == []
    s.close()


def test_a_scan_outside_a_transaction_that_a_purge_overtakes_is_never_partial(tmp_path):
    s = _store(tmp_path / "s")
    with s.transaction() as tx:
        tx.update({f"conv/1/{i:04d}": i for i in range(1000)})
        tx.put("conv/2/x", 1)
    it = s.scan(prefix="conv/")
    first = [next(it)]
    s.purge("conv/1/")
    s.checkpoint()
    try:
        rows = first + list(it)
    except walstore.ConflictError:
        rows = None  # refused: the honest answer
    assert rows is None or len(rows) == 1001, len(rows)
    assert list(s.scan(prefix="conv/")) == [("conv/2/x", 1)]
    s.close()


# ---- retention --------------------------------------------------------------------------
def test_history_read_while_retention_trims_it_is_exact_or_refused(tmp_path):
    s = _store(tmp_path / "s", retain_transactions=3)
    with s.transaction() as tx:
        tx.put("k", 0)
    s.restore_point("p")
    for j in range(1, 20):
        with s.transaction() as tx:
            tx.put("k", j)
    view = s.at("p")
    assert view.get("k") == 0
    seen = []
    applier = s._engine.applier
    trim = applier.trim_history

    def read_between_batches(commits, horizon):
        trim(commits, horizon)  # rows of these commits deleted: read at this moment
        try:
            seen.append(view.get("k"))
        except walstore.HistoryTrimmed:
            seen.append("trimmed")
    applier.trim_history = read_between_batches
    s.drop_restore_point("p")
    s.checkpoint()
    applier.trim_history = trim
    assert seen and set(seen) <= {0, "trimmed"}, seen
    s.close()


def test_a_view_whose_point_is_trimmed_meanwhile_says_history_trimmed(tmp_path):
    s = _store(tmp_path / "s", retain_transactions=3)
    with s.transaction() as tx:
        tx.put("k", 0)
    view = s.at(tx.lsn)
    assert view.get("k") == 0
    for j in range(1, 10):
        with s.transaction() as t2:
            t2.put("k", j)
    s.checkpoint()
    with pytest.raises(walstore.HistoryTrimmed):
        view.get("k")
    with pytest.raises(walstore.HistoryTrimmed):
        s.at(tx.lsn)
    s.close()


# ---- savepoints ------------------------------------------------------------------------
def test_an_action_without_a_compensator_undone_by_a_savepoint_is_resolved(tmp_path):
    s = walstore.open(str(tmp_path / "s"))
    tx = s.transaction()
    tx.put("a", 1)
    sp = tx.savepoint("sp")
    with tx.action("log-line", compensate=None) as act:
        act.result = "x"
    tx.rollback_to(sp)
    tx.put("c", 1)
    tx.commit()
    a = s.get_action(act.id)
    assert (a.state, a.in_flight) == ("resolved", False)
    s.close()
    with walstore.open(str(tmp_path / "s")) as s:
        a = s.get_action(act.id)
        assert (a.state, a.in_flight) == ("resolved", False)
        assert s.pending_compensations() == []


# ---- reversible files --------------------------------------------------------------------
def test_reverting_the_creation_of_a_directory_a_later_transaction_wrote_into(tmp_path):
    s = _store(tmp_path / "s")
    root = tmp_path / "ws"
    root.mkdir()
    ws = s.workspace(str(root))
    with s.transaction() as t1:
        t1.files(ws).write("d/z.txt", "z")  # creates d/
    with s.transaction() as t2:
        t2.files(ws).write("d/w.txt", "w")
    for dry_run in (True, False):
        with pytest.raises(walstore.RevertConflict) as info:
            s.revert(t1.id, dry_run=dry_run)
        assert info.value.txids == [t2.id]
    assert sorted(os.listdir(root / "d")) == ["w.txt", "z.txt"]  # nothing changed
    plan = s.revert(t1.id, cascade=True, dry_run=True)
    assert plan.txids == [t2.id, t1.id]
    s.revert(t1.id, cascade=True)
    assert os.listdir(root) == []
    s.close()


def test_a_purge_elsewhere_does_not_fail_an_old_snapshots_reads(tmp_path):
    """Only reads of what a purge erased refuse (the soak's readers, summing accounts
    beside a purge of another prefix, failed when any purge refused every old read)."""
    s = _store(tmp_path / "s")
    with s.transaction() as tx:
        tx.update({"acct/a": 50, "acct/b": 50, "conv/1/m": "hi"})
    reader = s.transaction()
    assert reader.get("acct/a") == 50
    with s.transaction() as tx:
        tx.update({"acct/a": 0, "acct/b": 100})
    s.purge("conv/")
    s.checkpoint()
    assert reader.get("acct/b") == 50  # its snapshot, from history
    assert dict(reader.scan(prefix="acct/")) == {"acct/a": 50, "acct/b": 50}
    with pytest.raises(walstore.ConflictError):
        reader.get("conv/1/m")
    reader.rollback()
    s.close()
