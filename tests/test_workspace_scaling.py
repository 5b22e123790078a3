"""Registering a workspace, or looking one up by its path, costs what that root needs, not
every workspace registered (counted, never timed).  ``store.workspace(root)`` read the row
of every registered workspace (``Views.workspace_rows``: LMDB's rows, and a pass over
every unapplied event for the registrations not applied yet) to find its own and to test
the others for overlap, so an agent registering a workspace per task paid for all the
earlier ones: 4,000 registrations took 17 s (now 0.7 s), and each lookup of a
registered path by ``store.workspace(path)`` or ``tx.files(path)`` ~6 ms beside 4,000.
Its row is read alone now (``Views.workspace_row``: its LMDB row and the unapplied events
naming it, ``MemTable.roots``) and overlap is the roots above it looked up and the roots
under it scanned (``Views.workspace_overlapping``; ``MemTable.under_roots`` says whether an
unapplied one lies under it)."""
from __future__ import annotations

import os

import pytest

import walstore
from walstore.engine import tables


@pytest.fixture
def rows_read(monkeypatch):
    """Rows of the ``workspaces`` table decoded from LMDB."""
    n = [0]
    real = tables.unpack_row

    def counted(raw, table, key, file=None):
        if table == "workspaces":
            n[0] += 1
        return real(raw, table, key, file)
    monkeypatch.setattr(tables, "unpack_row", counted)
    return n


def _register(tmp_path, name, n, passed, rows_read):
    base = tmp_path / name
    s = walstore.open(str(base / "s"), durability="none")
    try:
        roots = []
        for i in range(n):
            root = base / "ws" / f"w{i}"
            root.mkdir(parents=True)
            roots.append(str(root))
        half = n // 2
        for r in roots[:half]:
            s.workspace(r)
        s.checkpoint()  # (half of them in LMDB, half unapplied)
        for r in roots[half:]:
            with s.transaction() as tx:  # (a commit between: a backlog as in real use)
                tx.put("k", r)
            s.workspace(r)
        passed[0] = rows_read[0] = 0
        for r in roots:  # lookups, by path
            assert s.workspace(r).root == os.path.realpath(r)
            with s.transaction() as tx:
                tx.files(r)
        lookups = passed[0] + rows_read[0]
        assert len(s.workspaces()) == n
        return lookups
    finally:
        s.close()


def test_registering_and_looking_up_workspaces_reads_their_own_rows(tmp_path, passed,
                                                                    rows_read):
    passed[0] = rows_read[0] = 0
    small_lookups = _register(tmp_path, "a", 40, passed, rows_read)
    passed[0] = rows_read[0] = 0
    big_lookups = _register(tmp_path, "b", 320, passed, rows_read)
    # before: each registration and each lookup passed over every unapplied event and
    # decoded every applied workspace's row (320 lookups: ~320 x (160 rows + 320 events));
    # now at most its own row per lookup — per lookup, not a ratio of the two runs: a
    # row is decoded from LMDB once the background applier applied it, else found among
    # the unapplied events, so each run reads 0.5 to 1 row a lookup as the applier's
    # timing falls (a ratio bound of 10x failed under CI's load: 20 and 207)
    assert small_lookups <= 2 * 40, (small_lookups, big_lookups)
    assert big_lookups <= 2 * 320, (small_lookups, big_lookups)


def test_registering_n_workspaces_is_linear(tmp_path, passed, rows_read):
    base = tmp_path / "c"
    s = walstore.open(str(base / "s"), durability="none")
    try:
        costs = []
        for batch in range(4):
            passed[0] = rows_read[0] = 0
            for i in range(100):
                root = base / "ws" / f"b{batch}" / f"w{i}"
                root.mkdir(parents=True)
                s.workspace(str(root))
            costs.append(passed[0] + rows_read[0])
            if batch == 1:
                s.checkpoint()
        # before: the fourth hundred read the rows of the 300 before it each (~30,000)
        assert max(costs) <= 200, costs
    finally:
        s.close()


@pytest.mark.parametrize("applied", [False, True])
def test_overlapping_workspaces_are_still_refused(tmp_path, applied):
    """Above and below, registered in LMDB or still unapplied; a sibling whose name
    begins with the other's is no overlap, nor the same root again."""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        (tmp_path / "t" / "a" / "b" / "c").mkdir(parents=True)
        (tmp_path / "t" / "ab").mkdir()
        (tmp_path / "t" / "x" / "y").mkdir(parents=True)
        mid = s.workspace(str(tmp_path / "t" / "a" / "b"))
        s.workspace(str(tmp_path / "t" / "x" / "y"))
        if applied:
            s.checkpoint()
            assert not s._engine.memtable.roots  # (read from LMDB below)
        with pytest.raises(ValueError, match="overlaps the registered workspace .*a/b'"):
            s.workspace(str(tmp_path / "t" / "a" / "b" / "c"))  # under it
        with pytest.raises(ValueError, match="overlaps the registered workspace .*a/b'"):
            s.workspace(str(tmp_path / "t" / "a"))  # above it
        with pytest.raises(ValueError, match="overlaps the registered workspace .*(a/b|x/y)'"):
            s.workspace(str(tmp_path / "t"))  # above both
        assert s.workspace(str(tmp_path / "t" / "a" / "b")) is mid  # the same: no overlap
        s.workspace(str(tmp_path / "t" / "ab"))  # a sibling named alike: no overlap
        assert sorted(os.path.basename(w.root) for w in s.workspaces()) == ["ab", "b", "y"]
    finally:
        s.close()
