"""History retention at its edges (probe findings): a key's history after several trims,
an undo whose reverted transaction was trimmed, and a never-committed txid once history
was trimmed."""
from __future__ import annotations

import pytest

import walstore


def test_history_after_many_trims_shows_what_each_version_wrote(tmp_path):
    """Each trim keeps a key's newest version below its horizon; the next trim must drop
    that survivor, or ``history`` lists it with the next version's before-image as its
    value (txid 1 shown with 'v3')."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3) as s:
        wrote = {}
        for i in range(12):
            with s.transaction() as tx:
                tx.put("k", f"v{i}")
            wrote[tx.id] = f"v{i}"
            if i % 3 == 2:
                s.checkpoint()  # a trim per three commits
        s.checkpoint()
        hist = s.history("k")
        assert hist, "the retained versions are listed"
        for version in hist:
            assert version.value == wrote[version.txid], (version, wrote)
        txids = [v.txid for v in hist]
        assert txids == sorted(txids, reverse=True) and len(txids) <= 4


def test_a_forced_revert_of_an_undo_whose_target_was_trimmed_marks_needs_redo(tmp_path):
    """T ran an action; R = revert(T) compensated it; retention trims T but keeps R.
    revert(R) still refuses (RevertConflict), and ``force=True`` brings x back and marks
    the action ``needs-redo`` — the action's row must outlive T's trim while R is
    retained (it was deleted with T: the action vanished from ``store.actions()``)."""
    undone = []
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=2,
                       compensators={"undo": lambda a: undone.append(a.id)}) as s:
        with s.transaction() as tx:
            tx.put("x", 1)
            with tx.action("charge", compensate="undo"):
                pass
        t = tx.id
        aid = s.actions()[0].id
        with s.transaction() as tx:
            tx.put("y", 1)
        r = s.revert(t).txid
        with s.transaction() as tx:
            tx.put("z", 1)
        s.checkpoint()
        assert t not in [i.txid for i in s.log()]  # trimmed
        assert {a.id: a.state for a in s.actions()} == {aid: "compensated"}
        with pytest.raises(walstore.RevertConflict):
            s.revert(r)
        s.revert(r, force=True)
        assert s.get("x") == 1 and undone == [aid]
        assert {a.id: a.state for a in s.actions()} == {aid: "needs-redo"}
        # once R itself is trimmed, nothing can revert it: the settled row may go
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"w{i}", i)
        s.checkpoint()
        assert r not in [i.txid for i in s.log()]


def test_a_never_committed_txid_after_a_trim_is_an_unknown_point(tmp_path):
    """Above every trimmed txid an unknown txid never committed: UnknownPoint (not
    HistoryTrimmed).  Among the trimmed ids walstore cannot tell a trimmed one from one
    that never committed: the error is both (HistoryTrimmed and UnknownPoint)."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3) as s:
        def commits(n: int) -> None:
            for i in range(n):
                with s.transaction() as tx:
                    tx.put("k", i)

        def rolled_back():
            tx = s.transaction()
            tx.put("k", "never")
            tx.rollback()
            return tx
        commits(3)
        early = rolled_back()
        commits(8)
        late = rolled_back()
        commits(1)
        s.checkpoint()
        kept = [i.txid for i in s.log()]
        assert 1 not in kept and late.id < max(kept)
        for call in (lambda p: s.revert(p), lambda p: s.at(p), lambda p: s.rewind(p)):
            with pytest.raises(walstore.UnknownPoint) as e:
                call(late.id)
            assert not isinstance(e.value, walstore.HistoryTrimmed)
            with pytest.raises(walstore.UnknownPoint) as e:
                call(early.id)
            assert isinstance(e.value, walstore.HistoryTrimmed)
            with pytest.raises(walstore.HistoryTrimmed):
                call(1)


def test_log_since_a_trimmed_txid_raises_history_trimmed(tmp_path):
    """``log(since=txid)`` of a trimmed transaction raises HistoryTrimmed, as ``at`` and
    ``since=LSN`` of the same commit do: it returned the retained transactions after it,
    silently missing the trimmed ones in between."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=5) as s:
        lsns = {}
        for i in range(20):
            with s.transaction() as tx:
                tx.put("k", i)
            lsns[tx.id] = tx.lsn
        s.checkpoint()
        kept = [i.txid for i in s.log()]
        assert len(kept) == 5 and 3 not in kept
        for since in (3, walstore.LSN(int(lsns[3]))):
            with pytest.raises(walstore.HistoryTrimmed):
                s.log(since=since)
        assert [i.txid for i in s.log(since=kept[-1])] == kept[:-1]
        assert [i.txid for i in s.log(since=walstore.LSN(int(lsns[kept[-1]])))] == kept[:-1]
