"""Reversible files never reach outside the workspace, even when another process swaps a
directory for a symlink while an operation runs (probe-fsescape).

Each test builds an ``outside`` directory next to the workspace whose files look like the
workspace's own (same names, sizes, modes), so an operation that went through a swapped
symlink would find them "still as captured" and remove them.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import walstore
from walstore import fileio
from walstore.files import apply
from walstore.files.paths import Workspace

from files_support import Dir, Link, TreeSnapshot, build, tree_state


def _twins(tmp_path: Path) -> tuple[Path, Path]:
    """A workspace with t/a.txt and t/sub/f0..f2, and an outside directory holding
    f0..f2 with the same content and mode."""
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    build(str(outside), {f"f{i}": f"canary{i}\n" for i in range(3)})
    build(str(root), {"t/a.txt": "aaa\n", **{f"t/sub/f{i}": f"canary{i}\n" for i in range(3)}})
    return root, outside


class _SwapAfterUnlink(fileio.OSBackend):
    """A fileio backend that, right after the unlink of a path ending in ``trigger``,
    does what another process could do at that moment: moves ``sub`` away and puts a
    symlink to ``outside`` in its place.  It sees both forms of the unlink (by path, and
    relative to a directory descriptor), so the same test runs against either code."""

    def __init__(self, trigger: bytes, sub: Path, away: Path, outside: Path) -> None:
        super().__init__()
        self.trigger, self.sub, self.away, self.outside = trigger, sub, away, outside
        self.swapped = False

    def _after(self, name: bytes) -> None:
        if name.endswith(self.trigger) and not self.swapped:
            os.rename(self.sub, self.away)
            os.symlink(self.outside, self.sub)
            self.swapped = True

    def unlink(self, path):
        os.unlink(path)
        self._after(os.fsencode(path))

    def unlinkat(self, dir_fd, name):
        os.unlink(name, dir_fd=dir_fd)
        self._after(os.fsencode(name))


def test_rmtree_never_removes_through_a_directory_swapped_for_a_symlink_midway(tmp_path):
    root, outside = _twins(tmp_path)
    before_out = TreeSnapshot(str(outside))
    before_ws = tree_state(str(root))
    backend = _SwapAfterUnlink(b"a.txt", root / "t/sub", tmp_path / "moved-away", outside)
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(str(root))
        old = fileio.set_backend(backend)
        err = None
        try:
            with store.transaction() as tx:
                tx.files(ws).rmtree("t")
        except walstore.FileConflictError as e:
            err = e
        finally:
            fileio.set_backend(old)
        assert backend.swapped
        before_out.assert_same(what="outside the workspace after the rmtree")
        assert err is not None, "rmtree did not notice the swap"
        # the error says what happened: rmtree stopped at the swapped directory...
        cause = err.__context__
        assert isinstance(cause, apply.WorkspaceChanged) and isinstance(cause, ValueError)
        assert "'t/sub'" in str(cause) and "symlink" in str(cause)
        # ...and what it had removed is back; the stranger's symlink stays (a conflict)
        assert (root / "t/a.txt").read_bytes() == b"aaa\n"
        assert os.readlink(root / "t/sub") == str(outside)
        assert str(root / "t/sub") in str(err)
        # nothing of the moved directory was touched either
        assert tree_state(str(tmp_path / "moved-away")) == {
            k[len(b"t/sub/"):]: v for k, v in before_ws.items() if k.startswith(b"t/sub/")}
    finally:
        store.close()


def test_rmtree_racing_a_real_swap_never_removes_outside_files(tmp_path):
    """No hook: a thread swaps t/sub for a symlink to the outside directory as soon as
    rmtree has removed t's first file (1,000 of them come before t/sub)."""
    for attempt in range(3):
        base = tmp_path / str(attempt)
        root, outside = base / "ws", base / "outside"
        build(str(outside), {f"f{i}": f"canary{i}\n" for i in range(3)})
        build(str(root), {**{"t/a%05d" % i: "x" for i in range(1000)},
                          **{f"t/sub/f{i}": f"canary{i}\n" for i in range(3)}})
        before_out = TreeSnapshot(str(outside))
        store = walstore.open(str(base / "store"), durability="none")
        first, sub = root / "t/a00000", root / "t/sub"
        go = threading.Event()
        midway = []

        def racer():
            go.wait()
            while os.path.lexists(first):
                pass
            os.rename(sub, base / "moved")
            os.symlink(outside, sub)
            midway.append(os.path.lexists(root / "t/a00999"))
        th = threading.Thread(target=racer)
        th.start()
        err = None
        try:
            ws = store.workspace(str(root))
            with store.transaction() as tx:
                f = tx.files(ws)
                go.set()
                f.rmtree("t")
        except walstore.WalstoreError as e:
            err = e
        finally:
            go.set()
            th.join()
            store.close()
        before_out.assert_same(what=f"outside the workspace (attempt {attempt})")
        if midway == [True]:  # the swap came while rmtree was still in t
            assert isinstance(err, walstore.FileConflictError), err
            assert isinstance(err.__context__, apply.WorkspaceChanged)
            assert len(os.listdir(root / "t")) == 1001  # put back, and the symlink
            return
    pytest.skip("the racing thread never swapped while rmtree was in t")


def test_rmtree_without_expected_removes_a_swapped_in_symlink_not_its_target(tmp_path):
    root, outside = _twins(tmp_path)
    before_out = TreeSnapshot(str(outside))
    ws = Workspace(str(root))
    backend = _SwapAfterUnlink(b"a.txt", root / "t/sub", tmp_path / "moved-away", outside)
    old = fileio.set_backend(backend)
    try:
        removed, kept = apply.rmtree(ws, "t")
    finally:
        fileio.set_backend(old)
    assert backend.swapped and kept == []
    assert set(removed) == {b"t/a.txt", b"t/sub", b"t"}  # the symlink itself
    before_out.assert_same(what="outside the workspace")
    assert not (root / "t").exists()


def test_rmtree_still_goes_through_a_path_backend(tmp_path):
    """A seam backend with only the path forms (the crash and power-loss tools) sees
    rmtree's unlinks and rmdirs by their absolute paths, as before."""
    root = tmp_path / "ws"
    build(str(root), {"t/a": "a", "t/d/b": "b"})
    ws = Workspace(str(root))
    seen = []

    class Paths(fileio.OSBackend):
        def unlink(self, path):
            seen.append(("unlink", os.fsencode(path)))
            os.unlink(path)

        def rmdir(self, path):
            seen.append(("rmdir", os.fsencode(path)))
            os.rmdir(path)

    old = fileio.set_backend(Paths())
    try:
        apply.rmtree(ws, "t")
    finally:
        fileio.set_backend(old)
    r = os.fsencode(str(root))
    assert seen == [("unlink", r + b"/t/a"), ("unlink", r + b"/t/d/b"), ("rmdir", r + b"/t/d"),
                    ("rmdir", r + b"/t")]
    assert tree_state(str(root)) == {}


# ---- a watched process making a path over the history's length limit ----------------------

_DEEP = "/".join(["d" * 100] * 5)  # 504 bytes: over the 499-byte limit with any root


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


@pytest.mark.parametrize("then", ["rollback", "commit"])
def test_a_watch_whose_process_made_a_path_too_long_puts_the_block_back(tmp_path, then):
    """The end of the watch raised "... nothing was changed" (the process had changed
    things), the watch stayed open, and its rollback could not reach the long paths:
    they stayed, reported as a stranger's change (FileConflictError)."""
    root = tmp_path / "ws"
    build(str(root), {"a.txt": "orig\n"})
    before = tree_state(str(root))
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(str(root))
        tx = store.transaction()
        tx.put("k", "v")
        with pytest.raises(ValueError) as ei:
            with tx.files(ws).watch():
                subprocess.run(["bash", "-c", f"echo changed > a.txt; mkdir -p "
                                f"{os.path.dirname(_DEEP)}; echo x > {_DEEP}"],
                               cwd=root, check=True)
        msg = str(ei.value)
        assert not isinstance(ei.value, walstore.FileConflictError)
        assert "too long" in msg and "put back" in msg and "nothing was changed" not in msg
        # the block's changes are gone at once, the transaction goes on without them
        assert tree_state(str(root)) == before
        if then == "rollback":
            tx.rollback()
        else:
            tx.commit()
            assert store.get("k") == "v"
        assert tree_state(str(root)) == before
        assert store.file_conflicts() == []
    finally:
        store.close()
    store = walstore.open(str(tmp_path / "store"))  # nothing owed at the next open
    try:
        assert tree_state(str(root)) == before and store.file_conflicts() == []
        assert [p.kind for p in store.last_recovery.problems] == []
    finally:
        store.close()


def test_a_crash_inside_a_watch_that_made_a_path_too_long_is_put_back(tmp_path):
    """Recovery's undo of a crashed watch went through the length check too: the long
    paths stayed (each a conflict)."""
    root = tmp_path / "ws"
    build(str(root), {"a.txt": "orig\n"})
    before = tree_state(str(root))
    r = _child("""
        import os, subprocess, sys, walstore
        s = walstore.open(sys.argv[1]); ws = s.workspace(sys.argv[2])
        tx = s.transaction()
        with tx.files(ws).watch():
            subprocess.run(["bash", "-c", "echo changed > a.txt; mkdir -p %s; echo x > %s"
                            % (os.path.dirname(sys.argv[3]), sys.argv[3])],
                           cwd=sys.argv[2], check=True)
            os.kill(os.getpid(), 9)
    """, str(tmp_path / "store"), str(root), _DEEP)
    assert r.returncode == -9, r.stderr
    store = walstore.open(str(tmp_path / "store"))
    try:
        assert tree_state(str(root)) == before
        assert store.file_conflicts() == []
        kinds = {p.kind for p in store.last_recovery.problems}
        assert kinds <= {"watch-undone"}, store.last_recovery.problems
    finally:
        store.close()


# ---- reads and small verbs through a symlink or a hard link --------------------------------

def _store_ws(tmp_path):
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    build(str(outside), {"f0": "canary\n", "sub/x": "x"})
    root.mkdir()
    s = walstore.open(str(tmp_path / "store"))
    return s, s.workspace(str(root)), root, outside


def test_listdir_of_a_symlink_leading_outside_raises_value_error_like_read(tmp_path):
    s, ws, root, outside = _store_ws(tmp_path)
    os.symlink(outside, root / "out")
    build(str(root), {"d/a": "a", "in": Link("d")})
    try:
        with s.transaction() as tx:
            f = tx.files(ws)
            for call in (lambda: f.read("out"), lambda: f.listdir("out")):
                with pytest.raises(ValueError, match="leading outside"):
                    call()
            assert f.listdir("in") == ["a"]  # (inside the root: followed, as read does)
            assert f.listdir() == ["d", "in", "out"]
            with pytest.raises(NotADirectoryError):
                f.listdir("d/a")
    finally:
        s.close()


def test_mkdir_exist_ok_on_a_symlink_leading_outside_raises_value_error(tmp_path):
    s, ws, root, outside = _store_ws(tmp_path)
    os.symlink(outside, root / "out")
    build(str(root), {"d": Dir(), "in": Link("d")})
    try:
        with s.transaction() as tx:
            f = tx.files(ws)
            with pytest.raises(ValueError, match="leading outside") as ei:
                f.mkdir("out", exist_ok=True)
            assert not isinstance(ei.value, FileExistsError)
            f.mkdir("in", exist_ok=True)  # a directory inside the root: it exists
            with pytest.raises(FileExistsError):
                f.mkdir("out")
    finally:
        s.close()


def test_chmod_of_a_hard_link_to_an_outside_file_leaves_the_outside_file_alone(tmp_path):
    s, ws, root, outside = _store_ws(tmp_path)
    os.chmod(outside / "f0", 0o600)
    os.link(outside / "f0", root / "hl")
    try:
        with s.transaction() as tx:
            tx.files(ws).chmod("hl", 0o640)
        assert stat.S_IMODE(os.stat(outside / "f0").st_mode) == 0o600
        st = os.lstat(root / "hl")
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_nlink == 1  # a copy now
        assert (root / "hl").read_bytes() == b"canary\n"
        # a mode-only restore of a file hard-linked since (a revert) copies it too
        os.unlink(outside / "f0")
        os.link(root / "hl", outside / "f0")
        s.revert(s.log(limit=1)[0].txid)
        assert stat.S_IMODE(os.stat(root / "hl").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(outside / "f0").st_mode) == 0o640
        assert (outside / "f0").read_bytes() == b"canary\n"
        # and a rolled-back chmod of a hard link puts the workspace's mode back only
        os.unlink(root / "hl")
        os.link(outside / "f0", root / "hl")
        tx = s.transaction()
        tx.files(ws).chmod("hl", 0o604)
        assert stat.S_IMODE(os.stat(outside / "f0").st_mode) == 0o640
        tx.rollback()
        assert stat.S_IMODE(os.stat(root / "hl").st_mode) == 0o640
        assert stat.S_IMODE(os.stat(outside / "f0").st_mode) == 0o640
        assert s.file_conflicts() == []
    finally:
        s.close()


# ---- a watched block replacing a directory by a special file -------------------------------

def test_a_watched_block_replacing_a_directory_by_a_fifo_is_rolled_back(tmp_path):
    """``rm -rf d; mkfifo d`` inside watch(): manifests skip the FIFO, so the steps say d
    became absent; the rollback found the FIFO, called it a stranger's change and put
    back neither d nor its files."""
    root = tmp_path / "ws"
    build(str(root), {"d/f0": "precious\n", "e/f1": "too\n"})
    before = tree_state(str(root))
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(str(root))
        with pytest.raises(walstore.FileConflictError) as ei:
            with store.transaction() as tx:
                with tx.files(ws).watch():
                    subprocess.run(["bash", "-c", "rm -rf d e; mkfifo d e"], cwd=root,
                                   check=True)
                # a FIFO made after the block, in place of the block's own, is a
                # stranger's: it stays
                os.unlink(root / "e")
                os.mkfifo(root / "e")
                raise RuntimeError("tests failed")
        assert (root / "d/f0").read_text() == "precious\n"
        assert stat.S_ISFIFO(os.lstat(root / "e").st_mode)
        msg = str(ei.value)
        assert str(root / "e") in msg and str(root / "d") not in msg.replace(
            str(root / "d") + "/", "")  # (d is put back: no conflict of d itself)
        assert f"{root / 'd'}," not in msg and not msg.rstrip().endswith(str(root / "d"))
        assert {k: v for k, v in tree_state(str(root)).items() if not k.startswith(b"e")} \
            == {k: v for k, v in before.items() if not k.startswith(b"e")}
    finally:
        store.close()
