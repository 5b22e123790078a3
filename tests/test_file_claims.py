"""A path changed by a transaction that has not ended (open, or prepared and in doubt) is
that transaction's: file changes happen in place at once, so a second transaction that
changed it too would overwrite what the first may still undo (its rollback would find a
stranger's version and quarantine it, and a prepared one's ``rollback_prepared`` could not
put the path back).  The second one gets ConflictError before anything changes."""
from __future__ import annotations

import gc
import os

import pytest

import walstore


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("orig")
    (root / "b.txt").write_text("bee")
    store = walstore.open(str(tmp_path / "s"), durability="full")
    ws = store.workspace(str(root))
    yield store, ws, root, tmp_path
    if not store.closed:
        store.close()


def text(root, rel: str) -> str:
    return (root / rel).read_text()


def test_an_open_transactions_path_is_refused_to_another_until_it_ends(setup):
    store, ws, root, _ = setup
    t1 = store.transaction()
    t1.files(ws).write("a.txt", "t1")
    t2 = store.transaction()
    with pytest.raises(walstore.ConflictError, match="a.txt") as e:
        t2.files(ws).write("a.txt", "t2")
    assert "a.txt" in e.value.keys[0] and text(root, "a.txt") == "t1"  # nothing changed
    for op in (lambda f: f.delete("a.txt"), lambda f: f.rename("a.txt", "c.txt"),
               lambda f: f.rename("b.txt", "a.txt"), lambda f: f.chmod("a.txt", 0o600)):
        with pytest.raises(walstore.ConflictError):
            op(t2.files(ws))
    t2.files(ws).write("b.txt", "t2")  # another path: no conflict
    t2.commit()
    t1.rollback()  # puts its own change back, with no stranger's version to keep aside
    assert text(root, "a.txt") == "orig" and text(root, "b.txt") == "t2"
    assert not (setup[3] / "s" / "quarantine" / "files").exists()
    with store.transaction() as t3:  # ended: the claim is stale
        t3.files(ws).write("a.txt", "t3")
    assert text(root, "a.txt") == "t3"


def test_a_committed_or_dropped_transaction_holds_nothing(setup):
    store, ws, root, _ = setup
    with store.transaction() as t1:
        t1.files(ws).write("a.txt", "one")
    with store.transaction() as t2:
        t2.files(ws).write("a.txt", "two")
    t3 = store.transaction()
    t3.files(ws).write("b.txt", "dropped")
    del t3
    gc.collect()
    with store.transaction() as t4:
        t4.files(ws).write("b.txt", "four")
    assert text(root, "a.txt") == "two" and text(root, "b.txt") == "four"


def test_a_prepared_transactions_paths_are_held_until_decided_across_a_crash(setup):
    store, ws, root, tmp = setup
    tx = store.transaction()
    tx.files(ws).write("a.txt", "prepared")
    tx.prepare("g1")
    other = store.transaction()
    with pytest.raises(walstore.ConflictError):
        other.files(ws).write("a.txt", "other")
    other.rollback()
    store._engine.drop_like_a_crash()  # in doubt across a crash: still held
    store = walstore.open(str(tmp / "s"), durability="full")
    try:
        assert store.prepared() == ["g1"]
        ws = store.workspace(str(root))
        t = store.transaction()
        with pytest.raises(walstore.ConflictError, match="prepared"):
            t.files(ws).write("a.txt", "other")
        t.rollback()
        assert text(root, "a.txt") == "prepared"
        store.rollback_prepared("g1")
        assert text(root, "a.txt") == "orig"
        with store.transaction() as t:
            t.files(ws).write("a.txt", "after")
        assert text(root, "a.txt") == "after"
    finally:
        store.close()


def test_claims_stay_bounded(tmp_path, monkeypatch):
    """(With the slack made 256, as it is 4,096: the same bound at a sixteenth of the file
    transactions; 6,000 of them took a minute of CI.)"""
    import walstore.agent.files as files_mod
    slack = 256
    monkeypatch.setattr(files_mod, "CLAIMS_SLACK", slack)
    root = tmp_path / "ws"
    root.mkdir()
    n = slack * 3 // 2
    with walstore.open(str(tmp_path / "s"), durability="none") as store:
        ws = store.workspace(str(root))
        files = store._files
        peak = 0
        for i in range(n):  # distinct paths, each claimed by a transaction that ended
            with store.transaction() as t:
                t.files(ws).write(f"f{i}.txt", str(i))
            peak = max(peak, len(files._claims))
        assert peak > slack // 2  # (claims did pile up before a prune)
        assert peak <= slack + 1 and len(files._claimants) <= slack + 1
        assert (root / f"f{n - 1}.txt").read_text() == str(n - 1)
