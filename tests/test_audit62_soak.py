"""Audit 62: bounded memory and disk over long runs (soak).  A store kept open for a long
time with a fixed key space (and a fixed set of workspace paths) must plateau: each test
counts entries/rows/bytes/files at N and 4N operations and asserts the count at 4N stays
under a bound that does not grow with N (no timings)."""
from __future__ import annotations

import walstore
import walstore.agent.files as files_mod


def _claim_tables(store: walstore.Store) -> dict[str, int]:
    f = store._files
    return {"claims": len(f._claims), "claimants": len(f._claimants),
            "under": sum(len(v) for v in f._under.values()), "settled": len(f._settled)}


def test_file_claims_stay_bounded_on_a_fixed_set_of_paths(tmp_path, monkeypatch):
    """The path-claim tables of the file layer were pruned only when ``_claims`` (one
    entry per (root, path)) outgrew its slack: on a fixed set of paths it never did, and
    ``_claimants`` (one weakref per file transaction), ``_under``'s txid sets and
    ``_settled`` grew by an entry per file transaction for good (a soak: 1,766 claimants
    after ~1,800 file transactions on 20 paths, linear; a probe: 1,999 after 2,000).
    The slack is lowered so that N and 4N stay small; the rule is the same."""
    slack = 50
    monkeypatch.setattr(files_mod, "CLAIMS_SLACK", slack)
    (tmp_path / "ws").mkdir()
    n = 150
    seen = {}
    with walstore.open(str(tmp_path / "st"), durability="none") as s:
        ws = s.workspace(str(tmp_path / "ws"))
        i = 0
        for target in (n, 4 * n):
            while i < target:
                with s.transaction() as tx:
                    tx.files(ws).write(f"a/b/f{i % 3}.txt", str(i))
                i += 1
            seen[target] = _claim_tables(s)
        # (the files hold the last commit's bytes)
        assert (tmp_path / "ws" / "a" / "b" / f"f{(4 * n - 1) % 3}.txt").read_text() \
            == str(4 * n - 1)
    bound = 2 * slack + 10
    for name in ("claimants", "settled"):
        assert seen[4 * n][name] <= bound, (name, seen)
    assert seen[4 * n]["under"] <= 2 * bound, seen  # (two parent directories per path)
    assert seen[4 * n]["claims"] <= 10, seen


def test_watch_manifest_cache_keeps_only_what_retention_keeps(tmp_path):
    """``Files._manifest_refs`` (saved watch() manifest -> the blobs it names, for the
    gc) was bounded only by MANIFEST_REFS_KEPT blob names: a store kept open held an
    entry for every watch() since its open, retention or not (400 watches with
    ``retain_transactions=50``: 400 entries), and a manifest naming no blob (a tree of
    directories only) counted nothing toward the cap, so those grew without any bound.
    The gc now drops the entries of manifests nothing retained names."""
    root = tmp_path / "ws"
    root.mkdir()
    n = 40
    seen = {}
    with walstore.open(str(tmp_path / "st"), durability="none", retain_transactions=10,
                       checkpoint_bytes=64 * 1024, segment_size=64 * 1024) as s:
        ws = s.workspace(str(root))
        i = 0
        for target in (n, 4 * n):
            while i < target:
                with s.transaction() as tx:
                    with tx.files(ws).watch():
                        (root / f"d{i}" / "sub").mkdir(parents=True)
                        if i >= 3:
                            (root / f"d{i - 3}" / "sub").rmdir()
                            (root / f"d{i - 3}").rmdir()
                i += 1
                if i % 10 == 0:
                    s.checkpoint()
            seen[target] = len(s._files._manifest_refs)
        assert sorted(p.name for p in root.iterdir()) == [f"d{j}" for j in
                                                          range(4 * n - 3, 4 * n)]
    assert seen[4 * n] <= 12, seen  # (retention's 10, and a watch in flight)
    assert seen[4 * n] <= seen[n] + 2, seen


def test_transactions_dropped_after_a_savepoint_are_freed_without_the_cyclic_gc(tmp_path):
    """A savepoint held its transaction strongly and the transaction its savepoints: a
    transaction dropped (never committed or rolled back) after a savepoint was a cycle,
    alive until the cyclic gc ran — its undo log in memory, and its file claims held
    against every other transaction (ConflictError "... has not ended").  Counted with
    the cyclic gc off: 50 and 200 such transactions dropped, none alive (before: all)."""
    import gc
    import weakref
    (tmp_path / "ws").mkdir()
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with walstore.open(str(tmp_path / "st"), durability="none") as s:
            ws = s.workspace(str(tmp_path / "ws"))
            refs = []
            alive = {}
            for target in (50, 200):
                while len(refs) < target:
                    tx = s.transaction()
                    tx.put("k", len(refs))
                    tx.savepoint("a")
                    tx.files(ws).write("f.txt", f"dropped {len(refs)}")
                    refs.append(weakref.ref(tx))
                    del tx
                    # the next one writes the same path: the dropped one has ended
                    with s.transaction() as t2:
                        t2.files(ws).write("f.txt", f"kept {len(refs)}")
                alive[target] = sum(1 for r in refs if r() is not None)
            assert (tmp_path / "ws" / "f.txt").read_text() == "kept 200"
            assert s.get("k") is None
    finally:
        if was:
            gc.enable()
    assert alive == {50: 0, 200: 0}, alive
