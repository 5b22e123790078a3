"""Reversible files through the store (issue 12, phase 2): ``store.workspace``,
``tx.files(ws)``, ``watch()``, and their undo by rollback, ``rollback_to``, a conflict at
commit, ``revert`` (and a revert of the revert), ``rewind`` (also scoped), ``at``, 2PC and
retention; file conflicts; the CLI (``walstore files``, ``walstore diff``, ``walstore
recover``); hostile inputs.

Every check of a tree goes through ``tests/files_support.py`` (its own ``lstat`` /
``readlink`` / sha256 walk: type, mode, content, symlink target, empty directories), never
through walstore's code.  Crash tests with real kill -9 are in test_files_crash.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import walstore  # noqa: E402
from walstore import FileConflictError  # noqa: E402
from walstore.files import Workspace  # noqa: E402
from files_support import (Dir, File, Immutable, Link, TreeSnapshot, age,  # noqa: E402
                           assert_tree_equal, build, tree_state)
from tools.faults import FaultBackend, installed  # noqa: E402

SPEC = {
    "README.md": "hello\n",
    "src/app.py": File("print('v1')\n", 0o644),
    "src/run.sh": File("#!/bin/sh\necho run\n", 0o755),
    "conf/app.toml": "debug = false\n",
    "conf/old.toml": "x = 1\n",
    "link": Link("src/app.py"),
    "empty": Dir(0o750),
    "docs/a/b.txt": "deep\n",
}


@pytest.fixture
def tree(tmp_path) -> str:
    root = tmp_path / "ws"
    build(root, SPEC)
    age(root)
    return str(root)


@pytest.fixture
def spath(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def store(spath):
    s = walstore.open(spath, durability="none")
    yield s
    if not s.closed:
        s.close()


def P(tree: str, rel: str) -> str:
    return os.path.join(tree, rel)


def read(tree: str, rel: str) -> bytes:
    with open(P(tree, rel), "rb") as f:
        return f.read()


def every_op(f) -> None:
    """One of each operation, on files, directories and symlinks."""
    f.write("src/app.py", "print('v2')\n")                 # modify (mode kept)
    f.write("src/new/deep/mod.py", b"\x00\x01binary", mode=0o600)  # parents created
    f.write("src/run.sh", "#!/bin/sh\necho v2\n", mode=0o700)  # content and mode
    f.delete("conf/old.toml")
    f.delete("link")                                        # a symlink
    f.rename("README.md", "docs/README.md")
    f.rename("docs/a", "docs/moved")                        # a directory
    f.mkdir("build/out", mode=0o711)
    f.rmtree("empty")
    f.symlink("current", "src/app.py")
    f.chmod("conf", 0o700)


# ---- workspaces -------------------------------------------------------------------------
def test_workspace_registration_is_durable_and_the_same_object(store, spath, tree, tmp_path):
    ws = store.workspace(tree, ignore=["*.log", "build/"], scope="agents/a/")
    assert isinstance(ws, Workspace) and ws.root == os.path.realpath(tree)
    assert store.workspace(tree) is ws
    assert store.workspace(tree + "/") is ws
    assert store.workspace(os.path.join(tree, "src", "..")) is ws
    with store.transaction() as tx:
        assert tx.files(tree).workspace is ws
    store.close()
    with walstore.open(spath, durability="none") as s2:
        [again] = s2.workspaces()
        assert again.root == ws.root and again.scope == "agents/a/"
        assert again.ignore.ignored(b"x.log", False) and not again.ignore.ignored(b"x", False)
        assert s2.workspace(tree) is again


def test_workspace_refusals(store, tree, spath, tmp_path):
    store.workspace(tree)
    with pytest.raises(ValueError, match="overlaps"):
        store.workspace(os.path.join(tree, "src"))
    with pytest.raises(ValueError, match="overlaps"):
        store.workspace(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        store.workspace(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="inside the store"):
        os.makedirs(os.path.join(spath, "sub"), exist_ok=True)
        store.workspace(os.path.join(spath, "sub"))
    with pytest.raises(TypeError):
        store.workspace(tree, scope=7)


def test_a_store_inside_its_workspace_is_never_tracked(tmp_path):
    root = tmp_path / "repo"
    build(root, {"a.txt": "a\n"})
    with walstore.open(str(root / ".agent-store"), durability="none") as s:
        ws = s.workspace(str(root))
        with pytest.raises(ValueError, match="walstore's own"):
            with s.transaction() as tx:
                tx.files(ws).write(".agent-store/evil", "x")
        with s.transaction() as tx:
            with tx.files(ws).watch() as w:
                (root / "a.txt").write_text("b\n")
        assert [c.path for c in w.changes] == [b"a.txt"]


# ---- rollback, commit -------------------------------------------------------------------
def test_rollback_restores_every_path_byte_exact(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    tx = store.transaction()
    every_op(tx.files(ws))
    assert not before.same()
    tx.rollback()
    before.assert_same(what="after rollback")


def test_an_exception_rolls_back_files_and_keys_together(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with pytest.raises(RuntimeError, match="tests failed"):
        with store.transaction() as tx:
            tx.put("agent/step", 1)
            every_op(tx.files(ws))
            raise RuntimeError("tests failed")
    before.assert_same(what="after the exception")
    assert store.get("agent/step") is None


def test_commit_keeps_the_tree_and_reads_see_own_writes(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as tx:
        f = tx.files(ws)
        every_op(f)
        assert f.read("src/app.py") == b"print('v2')\n"
        assert f.read("current") == b"print('v2')\n"     # a symlink inside: followed
        assert f.read("docs/moved/b.txt") == b"deep\n"
        assert not f.exists("conf/old.toml") and f.exists("build/out")
        inside = tree_state(tree)
    assert_tree_equal(tree, inside, "committed tree")
    st = tree_state(tree)
    assert st[b"src/run.sh"][:2] == ("file", 0o700)
    assert st[b"src/new/deep/mod.py"][:2] == ("file", 0o600)
    assert st[b"build/out"] == ("dir", 0o711) and st[b"conf"] == ("dir", 0o700)
    assert st[b"current"] == ("symlink", b"src/app.py")
    assert b"empty" not in st and b"link" not in st and b"README.md" not in st
    info = store.log(limit=1)[0]
    assert info.txid == tx.id and info.extra.get("files")


def test_a_files_only_transaction_commits(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as tx:
        tx.files(ws).write("only.txt", "x")
    assert tx.lsn is not None and store.log(limit=1)[0].txid == tx.id


def test_rollback_to_a_savepoint_undoes_only_what_came_after(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as tx:
        f = tx.files(ws)
        f.write("src/app.py", "A\n")
        at_sp = tree_state(tree)
        sp = tx.savepoint("try")
        f.write("src/app.py", "B\n")
        f.delete("README.md")
        f.rename("conf", "conf2")
        with f.watch():
            subprocess.run(["sh", "-c", "echo built > out.bin; rm src/run.sh"], cwd=tree,
                           check=True)
        tx.rollback_to(sp)
        assert_tree_equal(tree, at_sp, "after rollback_to")
        f.write("late.txt", "late\n")  # the savepoint stays usable
        with tx.savepoint("inner"):
            f.write("late.txt", "later\n")
        expected = tree_state(tree)
    assert_tree_equal(tree, expected, "committed")
    assert read(tree, "src/app.py") == b"A\n" and read(tree, "late.txt") == b"later\n"
    assert os.path.exists(P(tree, "src/run.sh"))


@contextlib.contextmanager
def rolled_back(s: walstore.Store, tree: str):
    """``(tx, files, before)``: a transaction on ``tree`` that an exception rolls back
    when the block ends (``before``: the tree as it was)."""
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    with pytest.raises(RuntimeError):
        with s.transaction() as tx:
            yield tx, tx.files(ws), before
            raise RuntimeError("abort")


def test_undo_interleaves_files_and_compensations_newest_first(spath, tree):
    seen = []

    def undeploy(action):
        seen.append((action.name, read(tree, "conf/app.toml")))

    with walstore.open(spath, durability="none", compensators={"undeploy": undeploy}) as s:
        with rolled_back(s, tree) as (tx, f, before):
            f.write("conf/app.toml", "debug = true\n")     # 1
            with tx.action("deploy", compensate="undeploy"):  # 2
                pass
            f.write("conf/app.toml", "debug = 2\n")         # 3
        # 3 undone first (the compensation sees the config as the deploy saw it), then the
        # deploy compensated, then 1
        assert seen == [("deploy", b"debug = true\n")]
        before.assert_same()
        assert s.actions()[0].state == "compensated"


@pytest.mark.parametrize("later", ["delete", "rename", "rollback_to"])
def test_a_compensation_sees_a_file_created_before_it_and_removed_after_it(spath, tree,
                                                                            later):
    """A file created, an action logged, then the file deleted (or moved away): the
    rollback undoes the delete BEFORE the compensation runs, which finds the file as the
    action saw it.  (The delete's undo was skipped as "already done" — the path was at the
    create's before-image, absence — so the compensation found no file; the tree ended
    right, the promised order did not hold: probe-files2.)"""
    seen = []

    def undeploy(action):
        p = P(tree, "build.out")
        seen.append(read(tree, "build.out") if os.path.lexists(p) else None)

    with walstore.open(spath, durability="none", compensators={"undeploy": undeploy}) as s:
        with rolled_back(s, tree) as (tx, f, before):
            if later == "rollback_to":
                sp = tx.savepoint()
            f.write("build.out", "artifact v1\n")
            with tx.action("deploy", compensate="undeploy"):
                pass
            if later == "rename":
                f.rename("build.out", "old/build.out")
            else:
                f.delete("build.out")
            if later == "rollback_to":
                tx.rollback_to(sp)
                assert seen == [b"artifact v1\n"]
                before.assert_same()
        assert seen == [b"artifact v1\n"]
        before.assert_same()
        assert s.actions()[0].state == "compensated"


def test_a_conflict_at_commit_rolls_files_back(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as t0:
        t0.put("plan", 1)
    before = TreeSnapshot(tree)
    tx = store.transaction()
    tx.get("plan")
    tx.files(ws).write("src/app.py", "conflicting\n")
    with store.transaction() as other:
        other.put("plan", 2)
    with pytest.raises(walstore.ConflictError):
        tx.commit()
    before.assert_same(what="after the conflict")


def test_store_run_retries_with_files_undone_between_attempts(store, tree):
    ws = store.workspace(tree)
    attempts = []

    def step(tx):
        f = tx.files(ws)
        attempts.append(f.read("src/app.py"))
        f.write("src/app.py", f.read("src/app.py") + b"# edit\n")
        n = tx.get("n", 0)
        if len(attempts) == 1:
            with store.transaction() as other:
                other.put("n", 10)
        tx.put("n", n + 1)

    store.run(step)
    assert attempts == [b"print('v1')\n"] * 2
    assert read(tree, "src/app.py") == b"print('v1')\n# edit\n" and store["n"] == 11


# ---- conflicts: a stranger changed a path ------------------------------------------------
def test_rollback_keeps_a_strangers_version_and_quarantines_walstores(store, spath, tree):
    ws = store.workspace(tree)
    tx = store.transaction()
    f = tx.files(ws)
    f.write("src/app.py", "walstore's edit\n")
    f.write("README.md", "also walstore\n")
    with open(P(tree, "src/app.py"), "w") as fh:       # behind walstore's back
        fh.write("the user's edit\n")
    with pytest.raises(FileConflictError) as ei:
        tx.rollback()
    err = ei.value
    assert err.paths == [P(os.path.realpath(tree), "src/app.py")]
    assert read(tree, "src/app.py") == b"the user's edit\n"   # the stranger's stays
    assert read(tree, "README.md") == b"hello\n"             # the rest was undone
    saved = err.conflicts[0]["saved_as"]
    assert saved.startswith(os.path.join(spath, "quarantine", "files"))
    with open(saved, "rb") as fh:
        assert fh.read() == b"print('v1')\n"                  # the before-image, kept
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    [c] = store.file_conflicts()
    assert c["path"] == err.paths[0] and c["tx"] == tx.id


def test_a_failed_operation_changes_nothing_and_the_transaction_goes_on(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with store.transaction() as tx:
        f = tx.files(ws)
        with Immutable(P(tree, "conf")):
            with pytest.raises(PermissionError, match="conf"):
                f.write("conf/app.toml", "nope\n")
            with pytest.raises(PermissionError):
                f.write("conf/sub/new.txt", "nope\n")
        before.assert_same(what="after the refused writes")
        with pytest.raises(FileNotFoundError):
            f.delete("no/such/file")
        with pytest.raises(IsADirectoryError):
            f.write("src", "a directory")
        with pytest.raises(OSError):
            f.delete("docs")                          # not empty
        with pytest.raises(FileExistsError):
            f.mkdir("src")
        f.mkdir("src", exist_ok=True)
        f.write("ok.txt", "fine\n")
        assert tx.effects and len(tx.effects) == 1
    assert read(tree, "ok.txt") == b"fine\n"
    store._engine.drain()
    assert [p for p in store._history.file_history.changes_of(tx.id)] == [
        (os.fsencode(os.path.realpath(tree)), b"ok.txt")]


# ---- watch() ----------------------------------------------------------------------------
MAKE = textwrap.dedent("""
    set -e
    echo 'print("built")' > src/app.py
    mkdir -p build/obj && echo obj > build/obj/a.o
    rm conf/old.toml
    mv docs/a docs/renamed
    chmod 600 src/run.sh
    ln -sfn conf/app.toml link
    rm -r empty && echo now-a-file > empty
    echo log > debug.log
""")


def test_watch_captures_a_subprocess_and_rollback_puts_it_back(store, tree):
    ws = store.workspace(tree, ignore=["*.log"])
    before = TreeSnapshot(tree)
    tx = store.transaction()
    with tx.files(ws).watch() as w:
        subprocess.run(["sh", "-c", MAKE], cwd=tree, check=True)
    kinds = {os.fsdecode(c.path): c.kind for c in w.changes}
    assert kinds["src/app.py"] == "modified" and kinds["build/obj/a.o"] == "created"
    assert kinds["conf/old.toml"] == "deleted" and kinds["docs/renamed/b.txt"] == "created"
    assert kinds["docs/a/b.txt"] == "deleted" and kinds["src/run.sh"] == "mode"
    assert kinds["link"] == "symlink" and kinds["empty"] == "type"
    assert "debug.log" not in kinds                       # ignored
    tx.rollback()
    expected = dict(before.state)
    expected[b"debug.log"] = tree_state(tree)[b"debug.log"]  # ignored: not walstore's
    assert_tree_equal(tree, expected, "after rolling back the watch")


def test_watch_commit_keeps_changes_and_records_versions(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as tx:
        with tx.files(ws).watch():
            subprocess.run(["sh", "-c", MAKE], cwd=tree, check=True)
        after = tree_state(tree)
    assert_tree_equal(tree, after)
    assert store.at(tx.id).files(ws).read("src/app.py") == b'print("built")\n'
    assert store.at(tx.id - 1 if False else walstore.LSN(0)).files(ws).read(
        "src/app.py") == b"print('v1')\n"


def test_a_second_watch_reads_only_what_changed(store, tree):
    ws = store.workspace(tree)
    for i in range(2):
        with store.transaction() as tx:
            with tx.files(ws).watch():
                with open(P(tree, "README.md"), "a") as fh:
                    fh.write(f"round {i}\n")
    m = store._files._manifests[ws.root_b]
    assert m.stats.hashed_files <= 2, m.stats   # README (and nothing else of the tree)


def test_rollback_to_cannot_cross_a_running_watch(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as tx:
        sp = tx.savepoint()
        with tx.files(ws).watch():
            with pytest.raises(walstore.WalstoreError, match="watch"):
                tx.rollback_to(sp)
        tx.rollback_to(sp)                           # after the block: fine


def test_a_rollback_inside_the_watch_block_puts_the_tree_back(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            with tx.files(ws).watch():
                subprocess.run(["sh", "-c", MAKE], cwd=tree, check=True)
                tx.rollback()
                raise RuntimeError("stop")
    before.assert_same()


# ---- paths: hostile inputs ---------------------------------------------------------------
def test_paths_leaving_the_root_are_refused_and_nothing_outside_changes(store, tree, tmp_path):
    outside = tmp_path / "outside"
    build(outside, {"secret.txt": "keep\n", "d/x": "x\n"})
    os.symlink(str(outside), P(tree, "escape"))          # a symlink leading outside
    os.symlink("src", P(tree, "inner"))                  # a symlink leading inside
    guard = TreeSnapshot(str(outside))
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with store.transaction() as tx:
        f = tx.files(ws)
        for bad in (str(outside / "secret.txt"), "../outside/secret.txt",
                    "src/../../outside/x", "escape/secret.txt", "escape/new.txt",
                    "inner/app.py", b"a\0b"):
            for op in (lambda p: f.write(p, "x"), f.delete, lambda p: f.mkdir(p),
                       lambda p: f.rename("README.md", p), f.rmtree, f.read):
                with pytest.raises(ValueError):
                    op(bad)
        with pytest.raises(ValueError, match="outside"):
            f.read("escape")
        f.delete("escape")                                # the link itself: fine
    guard.assert_same(what="outside the workspace")
    assert not os.path.lexists(P(tree, "escape"))
    del before.state[b"escape"]
    before.assert_same()


def test_names_with_newlines_and_non_utf8_bytes(store, tree):
    ws = store.workspace(tree)
    odd = [b"new\nline.txt", b"caf\xe9.txt", b"dir\xff/x\ny"]
    before = TreeSnapshot(tree)
    tx = store.transaction()
    for n in odd:
        tx.files(ws).write(n, b"odd " + n)
    tx.rollback()
    before.assert_same()
    with store.transaction() as tx:
        for n in odd:
            tx.files(ws).write(n, b"odd " + n)
    at = store.at(tx.id).files(ws)
    for n in odd:
        assert at.read(n) == b"odd " + n
    store.revert(tx.id)
    before.assert_same(what="after the revert")


def test_a_symlink_swapped_in_during_a_watch_is_not_followed(store, tree, tmp_path):
    outside = tmp_path / "outside"
    build(outside, {"victim.txt": "keep\n"})
    guard = TreeSnapshot(str(outside))
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    tx = store.transaction()
    with tx.files(ws).watch():
        shutil.rmtree(P(tree, "docs"))
        os.symlink(str(outside), P(tree, "docs"))        # a directory became a symlink
        os.rename(P(tree, "src/app.py"), P(tree, "src/app.tmp"))
        os.mkdir(P(tree, "src/app.py"))                  # a file became a directory
    tx.rollback()
    guard.assert_same(what="outside")
    before.assert_same()


# ---- revert, rewind, at ------------------------------------------------------------------
def test_revert_and_a_revert_of_the_revert(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with store.transaction() as tx:
        every_op(tx.files(ws))
        tx.put("k", "v")
    after = tree_state(tree)
    plan = store.revert(tx.id, dry_run=True)
    assert P(ws.root, "src/app.py") in plan.files and "k" in plan.keys
    assert_tree_equal(tree, after, "after a dry run")
    info = store.revert(tx.id)
    before.assert_same(what="after the revert")
    assert store.get("k") is None
    store.revert(info.txid)                               # the revert of the revert
    assert_tree_equal(tree, after, "after reverting the revert")
    assert store.get("k") == "v"


def test_revert_refuses_a_path_changed_behind_its_back_unless_forced(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with store.transaction() as tx:
        tx.files(ws).write("src/app.py", "agent\n")
        tx.files(ws).write("other.txt", "agent\n")
    with open(P(tree, "src/app.py"), "w") as fh:
        fh.write("human\n")
    changed = tree_state(tree)
    with pytest.raises(walstore.RevertConflict) as ei:
        store.revert(tx.id)
    assert ei.value.paths == [P(ws.root, "src/app.py")]
    assert_tree_equal(tree, changed, "after the refused revert")
    info = store.revert(tx.id, force=True)
    before.assert_same(what="after the forced revert")
    store.revert(info.txid)                               # brings the human's version back
    assert read(tree, "src/app.py") == b"human\n" and read(tree, "other.txt") == b"agent\n"


def test_revert_with_later_writers_of_a_path_needs_cascade(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    with store.transaction() as t1:
        t1.files(ws).write("src/app.py", "one\n")
    with store.transaction() as t2:
        t2.files(ws).write("src/app.py", "two\n")
    with pytest.raises(walstore.RevertConflict) as ei:
        store.revert(t1.id)
    assert ei.value.txids == [t2.id]
    store.revert(t1.id, cascade=True)
    before.assert_same()


def test_revert_of_a_revert_that_compensated_needs_force(spath, tree):
    calls = []
    with walstore.open(spath, durability="none",
                       compensators={"undeploy": lambda a: calls.append(a.id)}) as s:
        ws = s.workspace(tree)
        with s.transaction() as tx:
            tx.files(ws).write("conf/app.toml", "deployed\n")
            with tx.action("deploy", compensate="undeploy"):
                pass
        info = s.revert(tx.id)
        assert calls and read(tree, "conf/app.toml") == b"debug = false\n"
        with pytest.raises(walstore.RevertConflict):
            s.revert(info.txid)
        assert read(tree, "conf/app.toml") == b"debug = false\n"
        s.revert(info.txid, force=True)
        assert read(tree, "conf/app.toml") == b"deployed\n"
        assert s.actions()[0].state == "needs-redo"


def test_rewind_to_a_restore_point(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as tx:
        tx.files(ws).write("README.md", "kept\n")
    kept = TreeSnapshot(tree)
    store.restore_point("good")
    for i in range(3):
        with store.transaction() as tx:
            f = tx.files(ws)
            f.write(f"gen/{i}.txt", str(i))
            f.write("README.md", f"round {i}\n")
            if i == 1:
                f.rmtree("docs")
    plan = store.rewind("good", dry_run=True)
    assert P(ws.root, "docs/a/b.txt") in plan.files and len(plan.txids) == 3
    store.rewind("good")
    kept.assert_same(what="after the rewind")
    assert store.rewind("good") is None                   # nothing left to undo


@pytest.fixture
def two_scopes(store, tmp_path):
    """Two workspaces, one per agent's scope, and a restore point "start"."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build(a, {"x.txt": "a0\n"})
    build(b, {"x.txt": "b0\n"})
    wa = store.workspace(a, scope="agents/a/")
    wb = store.workspace(b, scope="agents/b/")
    store.restore_point("start")
    return a, b, wa, wb


def test_scoped_rewind_restores_only_the_scopes_workspace(store, two_scopes):
    a, b, wa, wb = two_scopes
    a0, b0 = TreeSnapshot(a), TreeSnapshot(b)
    for i in range(2):
        with store.transaction(scope="agents/a/") as tx:
            tx.put("agents/a/n", i)
            tx.files(wa).write("x.txt", f"a{i + 1}\n")
        with store.transaction() as tx:
            tx.put("agents/b/n", i)
            tx.files(wb).write("x.txt", f"b{i + 1}\n")
    b_now = TreeSnapshot(b)
    plan = store.rewind("start", scope="agents/a/", dry_run=True)
    assert plan.files == [P(wa.root, "x.txt")]
    store.rewind("start", scope="agents/a/")
    a0.assert_same(what="scope a")
    b_now.assert_same(what="scope b, untouched")
    assert store.get("agents/a/n") is None and store.get("agents/b/n") == 1
    store.rewind("start", scope="agents/b/")
    b0.assert_same(what="scope b after its own rewind")


def test_a_transaction_in_two_scopes_workspaces_is_partly_undone(store, two_scopes):
    a, b, wa, wb = two_scopes
    a0 = TreeSnapshot(a)
    with store.transaction() as tx:
        tx.files(wa).write("x.txt", "a1\n")
        tx.files(wb).write("x.txt", "b1\n")
    store.rewind("start", scope="agents/a/")
    a0.assert_same()
    assert read(b, "x.txt") == b"b1\n"


def test_at_reads_files_as_they_were(store, tree):
    ws = store.workspace(tree)
    with store.transaction() as t1:
        t1.files(ws).write("src/app.py", "one\n")
    with store.transaction() as t2:
        t2.files(ws).write("src/app.py", "two\n")
        t2.files(ws).write("born.txt", "new\n")
        t2.files(ws).delete("README.md")
    with store.transaction() as t3:
        t3.files(ws).delete("born.txt")
    assert store.at(t1.id).files(ws).read("src/app.py") == b"one\n"
    assert store.at(t2.id).files(ws).read("src/app.py") == b"two\n"
    assert store.at(walstore.LSN(0)).files(ws).read("src/app.py") == b"print('v1')\n"
    assert store.at(t1.id).files(tree).read("README.md") == b"hello\n"
    with pytest.raises(FileNotFoundError):
        store.at(t1.id).files(ws).read("born.txt")        # not yet
    assert store.at(t2.id).files(ws).read("born.txt") == b"new\n"
    with pytest.raises(FileNotFoundError):
        store.at(t3.id).files(ws).read("born.txt")        # gone again
    with pytest.raises(FileNotFoundError):
        store.at(t2.id).files(ws).read("README.md")
    assert store.at(t1.id).files(ws).read("conf/app.toml") == b"debug = false\n"  # untouched
    with pytest.raises(IsADirectoryError):
        store.at(t1.id).files(ws).read("src")
    with pytest.raises(ValueError):
        store.at(t1.id).files(ws).read("../x")
    assert store.at(t1.id).files(ws).entry("link").target == b"src/app.py"
    assert b"".join(store.at(t1.id).files(ws).stream("src/app.py")) == b"one\n"
    with pytest.raises(FileNotFoundError):
        list(store.at(t1.id).files(ws).stream("born.txt"))


# ---- two-phase commit, retention, durability -------------------------------------------
def test_prepared_files_stay_in_doubt_through_a_crash(spath, tree):
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    for gid in ("g-commit", "g-abort"):
        tx = s.transaction()
        tx.files(ws).write(f"{gid}.txt", gid)
        tx.prepare(gid)
    prepared = tree_state(tree)
    s._drop_like_a_crash()
    s = walstore.open(spath, durability="none")
    assert_tree_equal(tree, prepared, "in doubt after the crash")
    s.commit_prepared("g-commit")
    s.rollback_prepared("g-abort")
    expected = dict(before.state)
    expected[b"g-commit.txt"] = prepared[b"g-commit.txt"]
    assert_tree_equal(tree, expected)
    assert s.at(s.log(limit=1)[0].txid).files(ws).read("g-commit.txt") == b"g-commit"
    s.close()


def test_retention_trims_old_file_content_and_restore_points_pin_theirs(tmp_path, tree):
    s = walstore.open(str(tmp_path / "st"), durability="none", retain_transactions=2)
    ws = s.workspace(tree)
    big = [os.urandom(4096) for _ in range(6)]
    txids = []
    for i, data in enumerate(big):
        with s.transaction() as tx:
            tx.files(ws).write("blob.bin", data)
        txids.append(tx.id)
        if i == 2:
            s.restore_point("pin")
    blobs = s._files.blobs
    s.checkpoint()
    import hashlib
    have = set(blobs)
    assert hashlib.sha256(big[2]).hexdigest() in have       # pinned by the restore point
    assert hashlib.sha256(big[5]).hexdigest() in have       # current
    assert hashlib.sha256(big[0]).hexdigest() not in have   # trimmed with its history
    assert s.at("pin").files(ws).read("blob.bin") == big[2]
    with pytest.raises(walstore.HistoryTrimmed):
        s.at(txids[0])
    s.drop_restore_point("pin")
    s.checkpoint()
    assert hashlib.sha256(big[2]).hexdigest() not in set(blobs)
    assert s.at(txids[-1]).files(ws).read("blob.bin") == big[5]
    s.close()


def test_commit_fsyncs_what_a_watched_process_changed_before_its_record(tmp_path, tree):
    s = walstore.open(str(tmp_path / "st"), durability="full")
    ws = s.workspace(tree)
    fb = FaultBackend()
    with installed(fb):
        with s.transaction() as tx:
            with tx.files(ws).watch():
                subprocess.run(["sh", "-c", "echo new > fresh.txt; echo x >> src/app.py"],
                               cwd=tree, check=True)
            mark = fb.now()
    s.close()
    calls = [c for c in fb.calls if c.seq > mark]
    wal_writes = [c.seq for c in calls if c.op == "pwrite" and c.path.endswith(".wal")]
    synced = {c.path for c in calls if c.op == "fsync" and c.path}
    dirs = {c.path for c in calls if c.op == "fsync_dir"}
    real = os.path.realpath(tree)
    assert {P(real, "fresh.txt"), P(real, "src/app.py")} <= synced
    assert {real, P(real, "src")} <= dirs
    first_sync = min(c.seq for c in calls if c.op in ("fsync", "fsync_dir")
                     and (c.path or "").startswith(real))
    assert wal_writes and min(wal_writes) > first_sync   # the COMMIT comes after them


def test_rollback_when_the_store_cannot_record_leaves_files_owed_for_the_next_open(spath,
                                                                                  tree):
    s = walstore.open(spath, durability="full")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    tx = s.transaction()
    tx.files(ws).write("src/app.py", "changed\n")
    fb = FaultBackend()
    fb.fail("fdatasync", path="*.wal", times=None)
    fb.fail("fsync", path="*.wal", times=None)
    with installed(fb):
        with pytest.raises(walstore.ReadOnlyError, match="file change"):
            tx.rollback()
    assert read(tree, "src/app.py") == b"changed\n"      # decision not durable: no undo yet
    s._drop_like_a_crash()
    with walstore.open(spath, durability="full") as s:
        before.assert_same(what="after the reopen")


# (the blob store's first open is the snapshot's clock tick, which it does without)
@pytest.mark.parametrize("op,err,nth", [("fsync", "EIO", 1), ("fsync_dir", "EIO", 1),
                                        ("pwrite", "ENOSPC", 1), ("rename", "EIO", 1),
                                        ("open", "ENOSPC", 2)])
def test_a_disk_error_while_a_watch_begins_is_a_store_io_error(spath, tree, op, err, nth):
    """The first snapshot of a watch stores every file's content in the blob store: a
    disk error there is a StoreIOError (the OSError chained), the block never runs, the
    tree is as it was (it was a bare OSError: probe-files2).  After a failed fsync of the
    blob store, file content is refused until a reopen (keys still commit); the next open
    watches again."""
    import errno as errno_mod
    s = walstore.open(spath, durability="full")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    fb = FaultBackend()
    rule = fb.fail(op, getattr(errno_mod, err), path=os.path.join(spath, "files", "blobs", "*"),
                   nth=nth)
    ran = []
    with installed(fb):
        with pytest.raises(walstore.StoreIOError) as ei:
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    ran.append(1)
    assert rule.fired == 1 and not ran
    assert isinstance(ei.value.__cause__, OSError)
    assert ei.value.errno == getattr(errno_mod, err)
    before.assert_same()
    if op.startswith("fsync"):
        with s.transaction() as tx:
            tx.put("k", 1)
        with pytest.raises(walstore.StoreIOError, match="earlier fsync"):
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    ran.append(2)
        assert not ran
        s._drop_like_a_crash()
        s = walstore.open(spath, durability="full")
        ws = s.workspace(tree)
    with s.transaction() as tx:  # (writable: a later watch works)
        with tx.files(ws).watch():
            subprocess.run(["sh", "-c", "echo w > w.txt"], cwd=tree, check=True)
    assert read(tree, "w.txt") == b"w\n"
    s.close()


def test_a_failed_fsync_of_watched_files_at_commit_is_a_store_io_error(spath, tree):
    """The commit fsyncs what watched processes changed before its record: a failed
    fsync there is a StoreIOError (the OSError chained; it was a bare OSError:
    probe-files2), the transaction rolls back and the tree is as it was."""
    s = walstore.open(spath, durability="full")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    fb = FaultBackend()
    with pytest.raises(walstore.StoreIOError) as ei:
        with s.transaction() as tx:
            tx.put("k", 1)
            with tx.files(ws).watch():
                subprocess.run(["sh", "-c", "echo new > fresh.txt"], cwd=tree, check=True)
            fb.fail("fsync", path=os.path.join(os.path.realpath(tree), "*"))
            fb.fail("fsync", path=os.path.join(tree, "*"))
            with installed(fb):
                tx.commit()
    assert isinstance(ei.value.__cause__, OSError) and ei.value.errno == 5
    before.assert_same()
    assert s.get("k") is None
    s.close()


def test_a_failed_fsync_of_the_blob_store_stops_file_content_not_the_rollback(spath, tree):
    """CONTRACT 4.6: never an fsync retried — a before-image's blob (or its directory)
    too: after a failed fsync of the blob store, no file content is stored again until
    the store is reopened (the operation fails with StoreIOError, and so does every later
    file operation, before it changes anything; no fsync of the blob store follows).
    The log is another file: the transaction's rollback puts its files back and runs its
    compensations at once (the whole store turned read-only, and the rollback left the
    changed file and the owed refund to the next open: probe-review39)."""
    s = walstore.open(spath, durability="full")
    refunds = []
    s.compensator("refund")(lambda action: refunds.append(action.args["n"]))
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    tx = s.transaction()
    with tx.action("charge", args={"n": 1}, compensate="refund") as act:
        act.result = "charged"
    f = tx.files(ws)
    f.write("new.txt", "first change\n")
    fb = FaultBackend()
    blobs = os.path.join(spath, "files", "blobs")
    rule = fb.fail("fsync", path=os.path.join(blobs, "*"))
    with installed(fb):
        with pytest.raises(walstore.StoreIOError):
            f.write("src/app.py", "second change\n")   # its before-image's fsync fails
        assert rule.fired == 1
        mark = fb.now()
        tx.rollback()
        before.assert_same(what="after the rollback")   # at once, not at the next open
        assert refunds == [1]
        assert not s.readonly
        with s.transaction() as t2:                      # the log goes on
            t2.put("k", 1)
        with pytest.raises(walstore.StoreIOError, match="earlier fsync"):
            with s.transaction() as t2:
                t2.files(ws).write("README.md", "other\n")
        before.assert_same(what="after a refused write")
        assert not [c for c in fb.calls if c.seq > mark and c.op in ("fsync", "fsync_dir")
                    and (c.path or "").startswith(blobs)]
    s.close()
    with walstore.open(spath, durability="full") as s:
        before.assert_same(what="after the reopen")
        assert s.get("k") == 1
        assert s.pending_compensations() == []
        with s.transaction() as tx:
            tx.files(ws).write("README.md", "after\n")
        assert read(tree, "README.md") == b"after\n"
    assert refunds == [1]


def test_an_interrupted_rollback_is_finished_at_the_next_open(spath, tree, monkeypatch):
    from walstore.agent import files as agent_files
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    tx = s.transaction()
    tx.files(ws).write("a.txt", "a")
    tx.files(ws).write("src/app.py", "b")
    real = agent_files.Files.undo_one

    def flaky(self, txid, eff, batch=None):
        if eff.steps[-1].path == b"src/app.py":
            raise PermissionError(13, "injected", "src/app.py")
        return real(self, txid, eff, batch)
    monkeypatch.setattr(agent_files.Files, "undo_one", flaky)
    with pytest.raises(FileConflictError) as ei:
        tx.rollback()
    assert ei.value.failed and read(tree, "src/app.py") == b"b"
    monkeypatch.setattr(agent_files.Files, "undo_one", real)
    s.close()
    with walstore.open(spath, durability="none") as s:
        before.assert_same(what="after the next open")
        assert not s._files.owed_rows()


def test_a_copy_of_the_store_never_touches_the_workspace(spath, tree, tmp_path):
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    tx = s.transaction()
    tx.files(ws).write("src/app.py", "in flight\n")
    live = TreeSnapshot(tree)
    from walstore.ops.backup import backup
    backup(spath, str(tmp_path / "copy"))
    with walstore.open(str(tmp_path / "copy"), durability="none") as c:
        live.assert_same(what="after opening the copy")
    with walstore.open(str(tmp_path / "copy"), durability="none") as c:
        live.assert_same(what="after opening the copy again")
        assert c._files.owed_rows() == []
    tx.rollback()
    s.close()


# ---- recovery conflicts and the CLI ------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, env=env)


def test_recover_lists_a_file_conflict_and_exits_1(spath, tree):
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    tx = s.transaction()
    tx.files(ws).write("src/app.py", "agent\n")
    tx.files(ws).write("README.md", "agent\n")
    s._drop_like_a_crash()
    with open(P(tree, "src/app.py"), "w") as fh:
        fh.write("human\n")
    out = _cli("recover", spath, "--json")
    assert out.returncode == 1, out
    doc = json.loads(out.stdout)
    [c] = doc["file_conflicts"]
    assert c["path"] == P(os.path.realpath(tree), "src/app.py")
    assert any(p["kind"] == "file-conflict" for p in doc["problems"])
    assert read(tree, "src/app.py") == b"human\n" and read(tree, "README.md") == b"hello\n"
    with open(c["saved_as"], "rb") as fh:
        assert fh.read() == b"print('v1')\n"
    again = _cli("recover", spath)
    assert again.returncode == 0, again                  # recorded once, not again


def test_cli_files_and_diff(spath, tree):
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    with s.transaction() as t1:
        t1.files(ws).write("src/app.py", "one\n")
        t1.put("k", 1)
    s.restore_point("p1")
    with s.transaction() as t2:
        t2.files(ws).write("src/app.py", "two\n")
        t2.files(ws).delete("README.md")
        t2.put("k", 2)
        t2.put("new", True)
    s.close()
    out = _cli("files", spath, "--json")
    assert out.returncode == 0, out
    doc = json.loads(out.stdout)
    [w] = doc["workspaces"]
    files = {f["path"]: f for f in w["files"]}
    assert files["src/app.py"]["entry"]["size"] == 4 and len(files["src/app.py"]["versions"]) == 2
    assert files["README.md"]["entry"]["kind"] == "absent"
    at = json.loads(_cli("files", spath, "--at", "p1", "--json").stdout)
    assert {f["path"]: f for f in at["workspaces"][0]["files"]}["README.md"]["entry"][
        "kind"] == "file"
    human = _cli("files", spath, "--workspace", tree)
    assert human.returncode == 0 and "src/app.py" in human.stdout
    d = json.loads(_cli("diff", spath, "--from", "p1", "--json").stdout)
    assert {k["key"] for k in d["keys"]} == {"k", "new"}
    assert {f["path"] for f in d["files"]} == {P(ws.root, "src/app.py"), P(ws.root, "README.md")}
    d0 = json.loads(_cli("diff", spath, "--from", f"tx:{t1.id}", "--to", "p1",
                         "--json").stdout)
    assert d0["keys"] == [] and d0["files"] == []
    text = _cli("diff", spath, "--from", "lsn:0")
    assert text.returncode == 0 and "src/app.py" in text.stdout
    bad = _cli("diff", spath, "--from", "nope")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    bad = _cli("files", spath, "--workspace", "/nonexistent/dir")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_coding_agent_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "coding_agent_files.py"),
                          str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "config.toml = 'precision = 2\\n', staging = 'calc v1\\n', coder/attempt = None, " \
           "test-results.xml exists: False" in out.stdout
    assert "staging = 'calc v2 (attempt 2)\\n'" in out.stdout
    assert read(str(tmp_path / "repo"), "calc.py") == REPO_CALC_V1
    assert not os.path.exists(tmp_path / "repo" / "calc_old.py")


REPO_CALC_V1 = b"def mean(xs):\n    return sum(xs) / len(xs)\n"


# ---- more edges: big operations, threads, registration updates, the store's own modes ----
def test_an_operation_logged_in_several_records_undoes_and_recovers(spath, tree,
                                                                    monkeypatch):
    from walstore.agent import files as agent_files
    monkeypatch.setattr(agent_files, "STEP_CHUNK", 3)
    build(tree, {f"docs/many/f{i:02d}.txt": f"{i}\n" for i in range(10)})
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    tx = s.transaction()
    tx.files(ws).rmtree("docs")
    assert len(tx.effects[0].lsns) >= 4              # one operation, several records
    tx.rollback()
    before.assert_same(what="after rolling back a chunked rmtree")
    tx = s.transaction()
    tx.files(ws).rmtree("docs")
    s._drop_like_a_crash()
    with walstore.open(spath, durability="none") as s2:
        before.assert_same(what="after recovering a chunked rmtree")
        assert not s2._files.owed_rows()


def test_a_watch_owns_its_workspace_while_it_runs(store, tree):
    import threading
    ws = store.workspace(tree)
    order = []
    started = threading.Event()

    def other_agent():
        started.wait()
        with store.transaction() as tx:
            tx.files(ws).write("other.txt", "x")      # waits for the watch to end
            order.append("other wrote")

    t = threading.Thread(target=other_agent)
    t.start()
    with store.transaction() as tx:
        with tx.files(ws).watch() as w:
            started.set()
            t.join(0.3)
            order.append("watch ended")
            with open(P(tree, "mine.txt"), "w") as fh:
                fh.write("mine\n")
    t.join(10)
    assert order == ["watch ended", "other wrote"]
    assert [c.path for c in w.changes] == [b"mine.txt"]   # not the other agent's file


def test_registering_again_with_other_patterns_updates_the_same_object(store, tree):
    ws = store.workspace(tree, ignore=["*.log"])
    assert store.workspace(tree, ignore=["*.tmp"]) is ws
    assert ws.ignore.ignored(b"a.tmp", False) and not ws.ignore.ignored(b"a.log", False)
    assert store.workspace(tree, scope="agents/x/") is ws and ws.scope == "agents/x/"
    assert ws.ignore.ignored(b"a.tmp", False)               # kept when not given


def test_the_stores_own_file_content_is_0600_and_its_directories_0700(store, spath, tree):
    ws = store.workspace(tree)
    tx = store.transaction()
    f = tx.files(ws)
    f.write("src/app.py", "x")
    with f.watch():
        with open(P(tree, "conf/app.toml"), "w") as fh:
            fh.write("y")
    with open(P(tree, "src/app.py"), "w") as fh:
        fh.write("stranger")
    with pytest.raises(FileConflictError):
        tx.rollback()
    seen = 0
    for top in ("files", "quarantine"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(spath, top)):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
            for n in filenames:
                assert stat.S_IMODE(os.lstat(os.path.join(dirpath, n)).st_mode) == 0o600
                seen += 1
    assert seen >= 4


def test_an_undo_run_again_after_a_crash_finds_no_conflict(spath, tree, monkeypatch):
    """A path changed twice and moved: its undo went all the way back, then the process
    died before recording it; the next open undoes it again, and walstore's own
    intermediate states are not taken for a stranger's."""
    from walstore.agent import files as agent_files
    s = walstore.open(spath, durability="none")
    ws = s.workspace(tree)
    before = TreeSnapshot(tree)
    tx = s.transaction()
    f = tx.files(ws)
    f.write("src/app.py", "v2\n")
    f.write("src/app.py", "v3\n")
    f.rename("src/app.py", "src/main.py")

    def die(self, *a, **k):
        raise RuntimeError("killed before the outcome was recorded")
    monkeypatch.setattr(agent_files.Files, "record", die)
    with pytest.raises(RuntimeError, match="killed"):
        tx.rollback()
    before.assert_same(what="after the unrecorded undo")
    monkeypatch.undo()
    s._drop_like_a_crash()
    with walstore.open(spath, durability="none") as s2:
        assert s2.last_recovery.file_conflicts == []
        before.assert_same(what="after the undo ran again")
        assert not s2._files.owed_rows() and not s2.file_conflicts()


def test_a_rollback_to_that_cannot_restore_keeps_the_change_in_the_transaction(store, tree):
    ws = store.workspace(tree)
    before = TreeSnapshot(tree)
    tx = store.transaction()
    sp = tx.savepoint()
    tx.files(ws).write("conf/new.toml", "x\n")
    with Immutable(P(tree, "conf")):
        with pytest.raises(FileConflictError, match="its rollback tries again") as ei:
            tx.rollback_to(sp)
    assert ei.value.failed and len(tx.effects) == 1
    tx.rollback()                                     # tries again, and can now
    before.assert_same()


def test_a_path_too_long_for_the_file_history_is_refused_before_anything_changes(
        store, tree, spath):
    """A 516-byte path (legal on Linux) was committed, then LMDB refused its file-history
    key (root + path past 511 bytes): every checkpoint, open and `walstore recover` failed
    with MDB_BAD_VALSIZE after it — an acknowledged commit that bricked the store
    (probe-review).  It is refused before the commit now, written or found by a watch."""
    ws = store.workspace(tree)
    room = 499 - len(os.fsencode(tree))
    k = (room - 1) // 41  # (directories of 40 bytes and a '/' each, then the file name)
    longest = "".join(["d" * 40 + "/"] * k) + "f" * (room - 41 * k)
    assert len(os.fsencode(longest)) == room
    too_long = longest + "x"
    with pytest.raises(ValueError, match="too long for walstore's file history"):
        with store.transaction() as tx:
            tx.files(ws).write(too_long, b"x")
    assert not os.path.exists(P(tree, too_long))
    with store.transaction() as tx:  # (the longest that fits: committed and readable)
        tx.files(ws).write(longest, b"fits")
    tx2 = store.transaction()
    with pytest.raises(ValueError, match="too long for walstore's file history"):
        with tx2.files(ws).watch():
            os.makedirs(os.path.dirname(P(tree, too_long)), exist_ok=True)
            with open(P(tree, too_long), "wb") as f:
                f.write(b"made by a tool")
    # the tool's file could not be recorded: the watch's end put the block back at once
    # (it used to stay, and the rollback called it a stranger's: FileConflictError)
    assert not os.path.exists(P(tree, too_long))
    tx2.rollback()
    assert not os.path.exists(P(tree, too_long))
    store.checkpoint()
    store.close()
    with walstore.open(spath, durability="none") as again:
        assert again.at(tx.id).files(ws).read(longest) == b"fits"
