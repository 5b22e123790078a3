"""An undo that removes a directory the transaction created, which now also holds paths
the workspace ignores (``ignore=``): the ``__pycache__`` a test run leaves in a package an
agent just wrote, a build's ``*.log``.  Before, rollback, revert, rewind and recovery all
kept the directory and reported a file conflict ("a directory to remove holds files
walstore does not know"; a revert raised RevertConflict as if a stranger had changed it),
though the ignored paths are untracked by declaration and could only be newer than the
directory.  Now they go with it (``git clean -X``); a name in it that is NOT ignored is
still a conflict, and then nothing in it is removed.  Real files; a real kill -9.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import walstore

IGNORE = ["__pycache__/", "*.log"]


def _store(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "keep.txt").write_text("keep")
    s = walstore.open(str(tmp_path / "s"), durability="none")
    return s, s.workspace(str(root), ignore=IGNORE), root


def _artifacts(pkg: Path) -> None:
    """What a tool run leaves in ``pkg``: ignored files and an ignored directory."""
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00pyc")
    (pkg / "run.log").write_text("log")


def test_rollback_of_a_watch_removes_the_created_directory_with_its_ignored_files(tmp_path):
    s, ws, root = _store(tmp_path)
    with pytest.raises(RuntimeError):
        with s.transaction() as tx:
            with tx.files(ws).watch():
                (root / "pkg").mkdir()
                (root / "pkg" / "mod.py").write_text("x = 1\n")
                _artifacts(root / "pkg")
            raise RuntimeError("the agent gave up")
    assert sorted(os.listdir(root)) == ["keep.txt"]
    assert s.file_conflicts() == []
    s.close()


def test_rollback_of_written_files_removes_what_a_test_run_left_beside_them(tmp_path):
    s, ws, root = _store(tmp_path)
    tx = s.transaction()
    tx.files(ws).write("pkg/sub/mod.py", "x = 1\n")  # creates pkg and pkg/sub
    subprocess.run([sys.executable, "-m", "py_compile", "pkg/sub/mod.py"], cwd=root,
                   check=True)  # a tool run: writes pkg/sub/__pycache__
    assert (root / "pkg" / "sub" / "__pycache__").is_dir()
    (root / "pkg" / "build.log").write_text("log")
    tx.rollback()
    assert sorted(os.listdir(root)) == ["keep.txt"]
    assert s.file_conflicts() == []
    s.close()


def test_revert_and_rewind_remove_ignored_files_in_directories_they_remove(tmp_path):
    s, ws, root = _store(tmp_path)
    s.restore_point("before")
    with s.transaction() as tx:
        tx.files(ws).write("pkg/mod.py", "x = 1\n")
    _artifacts(root / "pkg")
    s.revert(tx.id)
    assert sorted(os.listdir(root)) == ["keep.txt"]
    with s.transaction() as tx2:
        tx2.files(ws).write("app/main.py", "y = 2\n")
    _artifacts(root / "app")
    s.rewind("before")
    assert sorted(os.listdir(root)) == ["keep.txt"]
    assert s.file_conflicts() == []
    s.close()


def test_a_name_that_is_not_ignored_is_still_a_conflict_and_nothing_in_it_goes(tmp_path):
    s, ws, root = _store(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write("pkg/mod.py", "x = 1\n")
    _artifacts(root / "pkg")
    (root / "pkg" / "notes.txt").write_text("a stranger's")  # not ignored
    with pytest.raises(walstore.RevertConflict):
        s.revert(tx.id)
    assert (root / "pkg" / "notes.txt").read_text() == "a stranger's"
    assert (root / "pkg" / "run.log").read_text() == "log"
    assert (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").exists()
    assert (root / "pkg" / "mod.py").read_text() == "x = 1\n"  # the revert changed nothing
    s.close()


def test_an_ignored_symlink_is_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("never touched")
    s, ws, root = _store(tmp_path)
    with pytest.raises(RuntimeError):
        with s.transaction() as tx:
            tx.files(ws).write("pkg/mod.py", "x = 1\n")
            os.symlink(str(outside), root / "pkg" / "cache.log")  # ignored, a symlink
            raise RuntimeError("undo")
    assert sorted(os.listdir(root)) == ["keep.txt"]
    assert (outside / "precious").read_text() == "never touched"
    s.close()


CHILD = textwrap.dedent("""
    import os, sys, time, walstore
    tmp = sys.argv[1]
    root = os.path.join(tmp, "ws")
    s = walstore.open(os.path.join(tmp, "s"), durability="full")
    ws = s.workspace(root, ignore=%r)
    tx = s.transaction()
    with tx.files(ws).watch():
        os.mkdir(os.path.join(root, "pkg"))
        with open(os.path.join(root, "pkg", "mod.py"), "w") as f:
            f.write("x = 1")
        os.mkdir(os.path.join(root, "pkg", "__pycache__"))
        with open(os.path.join(root, "pkg", "__pycache__", "m.pyc"), "wb") as f:
            f.write(b"pyc")
    tx.files(ws).write("pkg/more.py", "y = 2")
    with open(os.path.join(root, "pkg", "run.log"), "w") as f:
        f.write("log")
    print("READY", flush=True)
    time.sleep(60)
""" % (IGNORE,))


def test_recovery_after_kill_removes_the_created_directory_with_its_ignored_files(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "keep.txt").write_text("keep")
    walstore.open(str(tmp_path / "s")).close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (root / "pkg" / "run.log").exists()
    with walstore.open(str(tmp_path / "s")) as s:  # recovery runs at open
        assert sorted(os.listdir(root)) == ["keep.txt"]
        assert s.file_conflicts() == []
