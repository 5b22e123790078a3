"""Adversarial audit of reversible files (audit 54): corners the stop-53 audit did not reach.

- A watched process renaming a whole directory (``mv src dst``) that holds paths the
  workspace ignores (``ignore=``: a ``.env``, a ``.venv/``, a ``__pycache__/``): the
  watch records ``src`` and its tracked files gone and ``dst`` made, never the ignored
  paths.  Its undo (a rollback inside or after the block, the recovery after a kill -9,
  a revert of the commit) removes ``dst`` and makes ``src`` anew — and since stop 51 a
  directory to remove that holds only ignored names is emptied first (``git clean -X``),
  on the ground that they "can only be newer than the directory".  They were not: they
  were ``src``'s, older than the transaction, and were deleted for good (a secret, a
  virtualenv), the tree after the undo differing from the one before it.  Now an undo
  keeps a directory whose ignored paths are older than the undone change (a conflict,
  nothing deleted; the stranger's-version rule), and still removes the ones made since.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import walstore
from walstore.files.apply import CTIME_SLACK_NS

IGNORE = [".env", "__pycache__/"]


def _aged(*paths) -> None:
    """Wait until the clock has moved past these paths' ctimes by more than the undo's
    slack (a file made a moment before a watch began reads as made by it)."""
    newest = max(os.lstat(p).st_ctime_ns for p in paths)
    while time.time_ns() < newest + 2 * CTIME_SLACK_NS:
        time.sleep(0.005)


@pytest.fixture
def tree(tmp_path):
    """A workspace with ``src/app.py`` (tracked) and ``src/.env``,
    ``src/__pycache__/app.pyc`` (ignored), all older than anything the test does."""
    root = tmp_path / "ws"
    (root / "src" / "__pycache__").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / "src" / ".env").write_text("SECRET=42\n")
    (root / "src" / "__pycache__" / "app.pyc").write_bytes(b"\x00pyc")
    _aged(root / "src" / ".env", root / "src" / "__pycache__" / "app.pyc",
          root / "src" / "__pycache__")
    return root


def _ignored_survive(root) -> None:
    """The ignored files that were ``src``'s are somewhere in the tree, unchanged."""
    found = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            if n in (".env", "app.pyc"):
                with open(os.path.join(dirpath, n), "rb") as f:
                    found[n] = f.read()
    assert found == {".env": b"SECRET=42\n", "app.pyc": b"\x00pyc"}


def _mv(root) -> None:
    subprocess.run(["mv", "src", "dst"], cwd=root, check=True)


@pytest.mark.parametrize("where", ["after-the-block", "inside-the-block"])
def test_rollback_of_a_watched_directory_rename_keeps_its_ignored_files(tmp_path, tree,
                                                                        where):
    store = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        ws = store.workspace(str(tree), ignore=IGNORE)
        tx = store.transaction()
        if where == "after-the-block":
            with tx.files(ws).watch():
                _mv(tree)
            undo = tx.rollback
        else:
            def undo() -> None:
                with tx.files(ws).watch():
                    _mv(tree)
                    tx.rollback()
        with pytest.raises(walstore.FileConflictError) as e:
            undo()
        assert (tree / "src" / "app.py").read_text() == "print('hi')\n"
        _ignored_survive(tree)
        assert [os.path.basename(p) for p in e.value.paths] == ["dst"]
    finally:
        store.close()


def test_rollback_still_removes_ignored_files_made_after_the_rename(tmp_path, tree):
    """The bound is the undone change's time: what the block made itself still goes."""
    (tree / "src" / ".env").unlink()
    (tree / "src" / "__pycache__" / "app.pyc").unlink()
    (tree / "src" / "__pycache__").rmdir()
    store = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        ws = store.workspace(str(tree), ignore=IGNORE)
        tx = store.transaction()
        with tx.files(ws).watch():
            _mv(tree)
            (tree / "dst" / "__pycache__").mkdir()
            (tree / "dst" / "__pycache__" / "app.pyc").write_bytes(b"new")
        tx.rollback()
        assert sorted(os.listdir(tree)) == ["src"]
        assert sorted(os.listdir(tree / "src")) == ["app.py"]
    finally:
        store.close()


def test_revert_of_a_committed_directory_rename_keeps_its_ignored_files(tmp_path, tree):
    store = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        ws = store.workspace(str(tree), ignore=IGNORE)
        with store.transaction() as tx:
            with tx.files(ws).watch():
                _mv(tree)
        with pytest.raises(walstore.RevertConflict) as e:
            store.revert(tx.id)
        assert [os.path.basename(p) for p in e.value.paths] == ["dst"]
        assert sorted(os.listdir(tree)) == ["dst"]  # nothing changed
        _ignored_survive(tree)
        store.revert(tx.id, force=True)  # forced: they are kept aside, and the rest back
        assert sorted(os.listdir(tree)) == ["src"]
        assert sorted(os.listdir(tree / "src")) == ["app.py"]
        _ignored_survive(os.path.join(str(tmp_path / "s"), "quarantine"))
    finally:
        store.close()


def test_revert_still_removes_ignored_files_made_inside_the_undone_transaction(tmp_path):
    """The bound of a revert is when the undone transaction's change of the directory
    began (kept with its commit), not the commit: a test run between the write and the
    commit made ``__pycache__`` after the directory, and it goes with it."""
    root = tmp_path / "ws"
    root.mkdir()
    store = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        ws = store.workspace(str(root), ignore=IGNORE)
        with store.transaction() as tx:
            tx.files(ws).write("pkg/mod.py", "x = 1\n")
            subprocess.run([sys.executable, "-m", "py_compile", "pkg/mod.py"], cwd=root,
                           check=True)
            _aged(root / "pkg" / "__pycache__")  # (older than the commit by far)
        store.revert(tx.id)
        assert os.listdir(root) == []
    finally:
        store.close()


CHILD = """
import os, subprocess, sys, walstore
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2], ignore=%r)
tx = store.transaction()
with tx.files(ws).watch():
    subprocess.run(["mv", "src", "dst"], cwd=sys.argv[2], check=True)
    print("ready", flush=True)
    sys.stdin.read()
""" % (IGNORE,)


def test_recovery_of_a_watch_killed_after_a_rename_keeps_its_ignored_files(tmp_path, tree):
    path = str(tmp_path / "s")
    walstore.open(path).close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, str(tree)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                 p for p in sys.path if p)), cwd=str(tmp_path))
    try:
        assert child.stdout.readline().strip() == b"ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    out = subprocess.run([sys.executable, "-m", "walstore", "recover", path, "--json"],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in sys.path if p)), cwd=str(tmp_path))
    assert out.returncode == 1, out.stderr  # the conflict is reported
    assert b"dst" in out.stdout
    assert (tree / "src" / "app.py").read_text() == "print('hi')\n"
    _ignored_survive(tree)


# ---- a tracked file replaced by a directory a directory-only pattern ignores -------------
@pytest.mark.parametrize("undo", ["rollback", "revert"])
def test_undo_of_a_file_replaced_by_an_ignored_directory_puts_the_file_back(tmp_path, undo):
    """``cache`` is a tracked file; ``cache/`` (directory-only) is ignored.  A watched
    ``rm cache; mkdir cache`` is the step "cache: file -> absent" (manifests leave ignored
    paths out); its undo called the block's own directory a stranger's change: a
    FileConflictError (RevertConflict) and the file never put back."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "cache").write_text("precious\n")
    store = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        ws = store.workspace(str(root), ignore=["cache/"])
        tx = store.transaction()
        with tx.files(ws).watch() as w:
            subprocess.run(["sh", "-c", "rm cache && mkdir cache && echo 1 > cache/x"],
                           cwd=root, check=True)
        assert [(c.path, c.after.kind) for c in w.changes] == [(b"cache", "absent")]
        if undo == "rollback":
            tx.rollback()
        else:
            tx.commit()
            store.revert(tx.id)
        assert sorted(os.listdir(root)) == ["cache"]
        assert (root / "cache").read_text() == "precious\n"
        assert store.file_conflicts() == []
    finally:
        store.close()


def test_recover_names_an_earlier_conflict_without_a_copy_in_words(tmp_path, tree):
    """``walstore recover`` lists the file conflicts recorded before it ran; one with no
    copy kept (a directory walstore made holds others' files: its version is absence)
    printed its ``saved_as`` as the Python ``None``."""
    path = str(tmp_path / "s")
    store = walstore.open(path, durability="none")
    try:
        ws = store.workspace(str(tree), ignore=IGNORE)
        tx = store.transaction()
        with tx.files(ws).watch():
            _mv(tree)
        with pytest.raises(walstore.FileConflictError):
            tx.rollback()
    finally:
        store.close()
    out = subprocess.run([sys.executable, "-m", "walstore", "recover", path],
                         capture_output=True, text=True, cwd=str(tmp_path),
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in sys.path if p)))
    assert out.returncode == 0, out.stderr  # (recorded earlier: not this run's problem)
    line = [ln for ln in out.stdout.splitlines() if "dst" in ln]
    assert len(line) == 1 and "None" not in line[0], out.stdout
    assert "walstore's version: absent; no copy" in line[0], out.stdout
