"""A transaction dropped (garbage-collected) without commit or rollback after changing
files, while the store stays open: what it left is uncommitted, and the next change of
one of its paths by another transaction puts it back first, as its rollback would
(``Files._put_back_stale``).  Before, the new transaction took the dropped one's bytes
as its before-image: reverting it brought back content no transaction ever committed,
and the next open's undo of the dropped one found the new transaction's committed
version, reported a file conflict ("changed behind walstore's back") and quarantined a
file (probe-lifecycle).  Also: recovery does not undo a loser's step on a path a later
transaction committed (a store written before the fix).  Real files; real kill -9 of a
child at every seam call of the takeover.
"""
from __future__ import annotations

import gc
import os
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import walstore  # noqa: E402
from walstore.agent.files import Files  # noqa: E402
from files_support import assert_tree_equal, build, tree_state  # noqa: E402
from test_files_crash import kill_points, run_child, setup  # noqa: E402

CHILD = HERE / "agent_scripts" / "dropped_child.py"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a dropped transaction's ResourceWarning)
        yield


def _read(root, rel) -> str:
    with open(os.path.join(root, rel)) as f:
        return f.read()


def _drop_writer(s, ws, **files) -> None:
    """A transaction writes ``files`` (path -> content) and is dropped, never ended."""
    tx = s.transaction()
    f = tx.files(ws)
    for p, data in files.items():
        f.write(p, data)
    del f, tx
    gc.collect()


@pytest.fixture
def ws_store(tmp_path):
    root = tmp_path / "ws"
    build(root, {"a": "orig", "b": "orig-b", "d/c": "orig-c"})
    s = walstore.open(str(tmp_path / "s"), durability="none")
    yield s, s.workspace(str(root)), str(root), str(tmp_path / "s")
    if not s.closed:
        s.close()


def test_revert_after_a_dropped_writer_restores_committed_content(ws_store):
    s, ws, root, _ = ws_store
    _drop_writer(s, ws, a="LEAKED-UNCOMMITTED")
    with s.transaction() as tx2:
        tx2.files(ws).write("a", "tx2")
    assert _read(root, "a") == "tx2"
    s.revert(tx2.id)
    assert _read(root, "a") == "orig"   # not the dropped transaction's bytes
    assert s.file_conflicts() == []


def test_reopen_after_a_dropped_writer_reports_no_conflict(ws_store):
    s, ws, root, path = ws_store
    _drop_writer(s, ws, a="LEAKED-UNCOMMITTED", b="LEAKED-B")
    with s.transaction() as tx2:
        tx2.files(ws).write("a", "tx2")
    # the dropped one was put back wholly in the workspace, as its rollback would have
    assert _read(root, "b") == "orig-b"
    s.close()
    s = walstore.open(path)
    try:
        assert s.file_conflicts() == []
        assert not s.last_recovery.file_conflicts
        assert not [p for p in s.last_recovery.problems if p.kind == "file-conflict"]
        assert _read(root, "a") == "tx2" and _read(root, "b") == "orig-b"
        assert not os.path.exists(os.path.join(path, "quarantine", "files"))
    finally:
        s.close()


def test_a_dropped_writers_deletes_and_new_dirs_go_back_too(ws_store):
    s, ws, root, _ = ws_store
    before = tree_state(root)
    tx = s.transaction()
    f = tx.files(ws)
    f.delete("d/c")
    f.rmtree("d")
    f.mkdir("new/deep")
    f.write("a", "LEAKED")
    del f, tx
    gc.collect()
    with s.transaction() as tx2:
        tx2.files(ws).write("a", "tx2")
    s.revert(tx2.id)
    assert_tree_equal(tree_state(root), before, "after the revert of tx2")


def test_a_watch_after_a_dropped_writer_starts_from_committed_content(ws_store):
    s, ws, root, _ = ws_store
    _drop_writer(s, ws, a="LEAKED-UNCOMMITTED")
    with s.transaction() as tx2:
        with tx2.files(ws).watch():
            with open(os.path.join(root, "a"), "w") as fh:
                fh.write("watched")
    assert _read(root, "a") == "watched"
    s.revert(tx2.id)
    assert _read(root, "a") == "orig"


def test_a_forced_revert_after_a_dropped_writer_and_its_revert(ws_store):
    s, ws, root, _ = ws_store
    with s.transaction() as c:
        c.files(ws).write("a", "committed")
    _drop_writer(s, ws, a="LEAKED-UNCOMMITTED")
    r = s.revert(c.id, force=True)
    assert _read(root, "a") == "orig"
    s.revert(r.txid)
    assert _read(root, "a") == "committed"   # never the dropped one's bytes


def test_recovery_skips_a_losers_step_under_a_later_commit(ws_store, monkeypatch):
    """A store written before the fix: the dropped transaction's step is still owed while
    a later transaction committed the same path over it.  The next open must not undo the
    committed version, nor call it a stranger's."""
    s, ws, root, path = ws_store
    monkeypatch.setattr(Files, "_put_back_stale", lambda self, *a, **k: False,
                        raising=False)  # (the code before the fix)
    _drop_writer(s, ws, a="LEAKED-UNCOMMITTED", b="LEAKED-B")
    with s.transaction() as tx2:
        tx2.files(ws).write("a", "tx2")
    s.close()
    monkeypatch.undo()
    s = walstore.open(path)
    try:
        assert s.file_conflicts() == []
        assert _read(root, "a") == "tx2"
        assert _read(root, "b") == "orig-b"   # the loser's other path is still put back
    finally:
        s.close()


def test_kill_at_every_step_of_a_takeover_from_a_dropped_writer(tmp_path):
    """kill -9 before each seam call of the second transaction (the dropped one's undo,
    its records, the new write, the commit) and right after its last: the next open ends
    with the tree before both transactions, or with the second one committed on it, and
    reports no file conflict."""
    store, ws = setup(tmp_path / "count")
    pre = tree_state(ws)
    got = run_child({"store": store, "ws": ws}, child=CHILD)
    assert got["committed"], got
    calls = got["calls"]
    with walstore.open(store) as s:
        assert not s.last_recovery.file_conflicts, s.last_recovery.file_conflicts
        assert s.get("done") == "tx2"
    post = tree_state(ws)
    want = dict(pre)
    want[b"src/app.py"] = post[b"src/app.py"]
    assert_tree_equal(post, want, "the committed tree")
    outcomes = {"pre": 0, "post": 0}
    for n, after in [(n, False) for n in kill_points(calls)] + [(calls, True)]:
        base = tmp_path / f"n{n}{'a' if after else ''}"
        store, ws = setup(base)
        got = run_child({"store": store, "ws": ws, "stop": n, "after": after}, child=CHILD)
        assert got["stopped"], (n, got)
        with walstore.open(store) as s:
            assert not s.last_recovery.file_conflicts, (n, got["stopped"],
                                                        s.last_recovery.file_conflicts)
            done = s.get("done")
        tree = tree_state(ws)
        if done is None:
            assert_tree_equal(tree, pre, f"after kill -9 before call {n} ({got['stopped']})")
            outcomes["pre"] += 1
        else:
            assert_tree_equal(tree, post, f"after kill -9 before call {n} ({got['stopped']})")
            outcomes["post"] += 1
    assert outcomes["pre"] and outcomes["post"], outcomes


def test_a_closed_stores_file_reads_raise_store_closed(tmp_path):
    """``tx.files(ws).read/exists/listdir`` on a store closed under the transaction read
    the disk (a missing file: StoreFileNotFoundError) where every other read of a closed
    store raises StoreClosed (probe-lifecycle)."""
    import os
    import walstore
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a").write_text("on disk")
    s = walstore.open(str(tmp_path / "s"))
    ws = s.workspace(str(root))
    f = s.transaction().files(ws)
    s.close()
    for call in (lambda: f.read("a"), lambda: f.read("missing"), lambda: f.exists("a"),
                 lambda: f.listdir()):
        with pytest.raises(walstore.StoreClosed):
            call()
    assert os.path.exists(root / "a")


def test_a_file_written_into_a_dropped_writers_new_directory_is_no_conflict(ws_store):
    """A dropped transaction created directory n/ (writing n/a); a second one writes n/b
    and commits.  Only the exact paths' claims were looked at, so the dropped one was not
    put back first, and the next open's undo of it found n/ holding walstore's own
    committed n/b: a file conflict (probe-review2).  A parent directory's claimant counts
    now: the dropped one is put back first (n/ removed, n/a gone), then n/b is made."""
    s, ws, root, path = ws_store
    tx = s.transaction()
    tx.files(ws).write("n/a", "LEAKED")
    del tx
    gc.collect()
    with s.transaction() as tx2:
        tx2.files(ws).write("n/b", "committed-b")
    assert sorted(os.listdir(os.path.join(root, "n"))) == ["b"]
    s.close()
    s = walstore.open(path)
    try:
        assert s.file_conflicts() == []
        assert not [p for p in s.last_recovery.problems if p.kind == "file-conflict"]
        assert _read(root, "n/b") == "committed-b"
        assert not os.path.exists(os.path.join(root, "n", "a"))
    finally:
        s.close()


def test_a_file_written_into_a_live_transactions_new_directory_is_refused(ws_store):
    """The same with the first transaction still open: the second one is refused
    (ConflictError, nothing changed), as for a path the first one changed; it went ahead,
    and the first one's rollback warned of a change behind walstore's back."""
    s, ws, root, _ = ws_store
    tx1 = s.transaction()
    tx1.files(ws).write("n/a", "one")
    with pytest.raises(walstore.ConflictError):
        with s.transaction() as tx2:
            tx2.files(ws).write("n/b", "two")
    assert sorted(os.listdir(os.path.join(root, "n"))) == ["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx1.rollback()
    assert not os.path.exists(os.path.join(root, "n"))


def test_removing_a_directory_holding_a_live_transactions_change_is_refused(ws_store):
    """t1 (open) deleted d/c; t2 removed the now empty d and committed: only t2's paths
    and their parents were looked at, so nothing stopped it, and t1's rollback put d and
    d/c back behind t2's commit, no conflict said (probe-review3).  A directory holding
    a path a live transaction changed is that transaction's too: ConflictError."""
    s, ws, root, _ = ws_store
    t1 = s.transaction()
    t1.files(ws).delete("d/c")
    with pytest.raises(walstore.ConflictError):
        with s.transaction() as t2:
            t2.files(ws).rmtree("d")
    assert os.path.isdir(os.path.join(root, "d"))
    t1.rollback()
    assert _read(root, "d/c") == "orig-c" and s.file_conflicts() == []


def test_a_finished_claimants_file_does_not_hide_a_live_one_in_the_same_directory(ws_store):
    """The directory check kept one claimant per directory, the first seen: a committed
    transaction's file there hid a live one's change, and the directory could be removed
    under it (probe-review4).  Every claimant counts."""
    s, ws, root, _ = ws_store
    with s.transaction() as c:
        c.files(ws).write("d/c2", "c")
    t1 = s.transaction()
    t1.files(ws).delete("d/c")
    with pytest.raises(walstore.ConflictError):
        with s.transaction() as t2:
            t2.files(ws).rmtree("d")
    t1.rollback()
    assert _read(root, "d/c") == "orig-c" and _read(root, "d/c2") == "c"
