"""Adversarial audit of reversible files (audit 55).

- A setgid directory (``chmod g+s``: its new entries take its group) that a non-member
  of its group owns, as a project directory made inside a shared setgid tree has: its
  undo (a rollback of an ``rmtree``) made it anew with a ``chmod`` to the recorded mode,
  and the kernel drops S_ISGID from a ``chmod`` by a process outside the file's group
  without CAP_FSETID; the directory came back without its setgid bit (mode restore not
  byte-exact).  Now the directory is made with its permission bits (``mkdir(2)`` keeps the
  setgid bit a setgid parent passes on) and ``chmod``-ed only when they differ.
- A parent directory swapped for a symlink to outside the root by another process right
  after walstore's checks: ``tx.files(ws).read/exists/listdir``, ``at(p).files(ws)``'s
  ``read/stream/entry`` of a live path, ``plan.capture`` and ``remove_stray_temps`` went
  by absolute path and read, listed, hashed or stored a file outside the root, or removed
  a temp name there.  They now go through the parent pinned from the root (as the
  writes have since stop 51).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import walstore

from files_support import build, tree_state
from test_audit50_files import env  # noqa: F401  (the fixture)


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


NO_FSETID = """
import os, sys, walstore
os.umask(0o022)
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2])
with store.transaction() as tx:
    tx.files(ws).rmtree("shared/proj")
    tx.rollback()
store.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop CAP_FSETID")
def test_rollback_keeps_the_setgid_bit_of_a_directory_of_a_group_it_is_not_in(tmp_path):
    root = str(tmp_path / "ws")
    build(root, {"shared/proj/f": "x\n"})
    os.chown(os.path.join(root, "shared"), -1, 4242)  # a group the child is not in
    os.chmod(os.path.join(root, "shared"), 0o2775)
    os.chown(os.path.join(root, "shared/proj"), -1, 4242)
    os.chmod(os.path.join(root, "shared/proj"), 0o2755)
    before = tree_state(root)
    assert before[b"shared/proj"] == ("dir", 0o2755)
    # (root without CAP_FSETID and outside group 4242: as a user outside it)
    subprocess.run(["setpriv", "--bounding-set=-fsetid", sys.executable, "-c", NO_FSETID,
                    str(tmp_path / "store"), root], check=True, env=_child_env(),
                   cwd=str(tmp_path), timeout=120)
    assert tree_state(root) == before
    assert os.lstat(os.path.join(root, "shared/proj")).st_gid == 4242


def _swap_sub_for_symlink(tmp_path, root: str, outside: str) -> None:
    """What another process can do right after walstore's checks: move ``sub`` aside and
    put a symlink to a directory outside the root in its place."""
    os.rename(os.path.join(root, "sub"), str(tmp_path / "sub-aside"))
    os.symlink(outside, os.path.join(root, "sub"))


def test_read_never_returns_a_file_outside_when_a_parent_is_swapped_for_a_symlink(
        tmp_path, monkeypatch):
    """``tx.files(ws).read("sub/f")`` checked the path (no symlink on the way) and then
    opened it by its absolute path, following a parent swapped for a symlink to outside
    the root in between: it returned the outside file's content.  Now the file is
    opened in its parent pinned from the root (O_NOFOLLOW at each step), as the writes
    are: the swap is refused (a ValueError), nothing outside is read."""
    from walstore.agent.files import TxFiles
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {"sub/f": "inside\n"})
    build(outside, {"f": "SECRET outside the root\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(root)
        real_final = TxFiles._final

        def final_then_swap(self, path):
            got = real_final(self, path)
            _swap_sub_for_symlink(tmp_path, root, outside)
            return got
        monkeypatch.setattr(TxFiles, "_final", final_then_swap)
        with store.transaction() as tx:
            try:
                data = tx.files(ws).read("sub/f")
            except ValueError:
                data = None  # refused: fine
            monkeypatch.undo()
            tx.rollback()
        assert data != b"SECRET outside the root\n"
    finally:
        store.close()


def test_listdir_never_lists_a_directory_outside_when_a_parent_is_swapped(tmp_path,
                                                                          monkeypatch):
    """The same race for ``listdir("sub/dd")``: it listed the outside directory's names.
    Now refused (no such directory inside the root: NotADirectoryError)."""
    from walstore.agent.files import TxFiles
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {"sub/dd/mine": "inside\n"})
    build(outside, {"dd/their-secret-name": "x\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(root)
        real_final = TxFiles._final

        def final_then_swap(self, path):
            got = real_final(self, path)
            _swap_sub_for_symlink(tmp_path, root, outside)
            return got
        monkeypatch.setattr(TxFiles, "_final", final_then_swap)
        with store.transaction() as tx:
            try:
                names = tx.files(ws).listdir("sub/dd")
            except (ValueError, NotADirectoryError):
                names = None  # refused (no such directory inside the root): fine
            monkeypatch.undo()
            tx.rollback()
        assert names != ["their-secret-name"]
    finally:
        store.close()


@pytest.mark.parametrize("how", ["read", "stream"])
def test_a_past_read_of_a_live_file_never_follows_a_parent_swapped_for_a_symlink(
        tmp_path, monkeypatch, how):
    """``store.at(point).files(ws).read/stream(p)`` of a path walstore never changed
    reads the file as it is now: by its absolute path after the checks, so a parent
    swapped for a symlink to outside the root in between gave the outside file's
    content.  Now opened in its pinned parent: refused (a ValueError)."""
    from walstore.agent.filehistory import HistoricalFiles
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {"sub/f": "inside\n"})
    build(outside, {"f": "SECRET outside the root\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(root)
        with store.transaction() as tx:
            tx.put("k", 1)
        view = store.at(store.restore_point("p"))
        real = HistoricalFiles._located

        def located_then_swap(self, path):
            got = real(self, path)
            _swap_sub_for_symlink(tmp_path, root, outside)
            return got
        monkeypatch.setattr(HistoricalFiles, "_located", located_then_swap)
        files = view.files(ws)
        try:
            data = files.read("sub/f") if how == "read" else b"".join(files.stream("sub/f"))
        except ValueError:
            data = None  # refused: fine
        assert data != b"SECRET outside the root\n"
    finally:
        store.close()


def test_capture_never_stores_a_file_outside_when_a_parent_is_swapped(tmp_path):
    """``plan.capture`` (the before-image every operation keeps first) checked the path
    and then opened it by its absolute path: a parent swapped for a symlink to outside
    the root in between stored the outside file's content in the store as the path's
    before-image.  Now opened in its pinned parent: refused (a ValueError)."""
    import hashlib
    from walstore.files import plan
    from walstore.files.blobs import BlobStore
    from walstore.files.paths import Workspace
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {"sub/f": "inside\n"})
    build(outside, {"f": "SECRET outside the root\n"})
    ws = Workspace(root)
    blobs = BlobStore(str(tmp_path / "blobs"))
    real_resolve = ws.resolve

    def resolve_then_swap(path, allow_root=False):
        got = real_resolve(path, allow_root=allow_root)
        _swap_sub_for_symlink(tmp_path, root, outside)
        return got
    ws.resolve = resolve_then_swap
    try:
        got = plan.capture(ws, "sub/f", blobs)
    except ValueError:
        got = None  # refused: fine
    secret = hashlib.sha256(b"SECRET outside the root\n").hexdigest()
    assert got is None or got.sha256 != secret
    assert not blobs.has(secret)


def test_exists_never_looks_outside_when_a_parent_is_swapped(tmp_path, monkeypatch):
    """``tx.files(ws).exists("sub/f")`` looked the path up by its absolute form after its
    checks: a parent swapped for a symlink to outside the root in between answered for
    the outside file.  Now looked up in the pinned parent: refused (a ValueError)."""
    from walstore.files.paths import Workspace
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {"sub/other": "inside\n"})
    build(outside, {"f": "outside\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(root)
        real = Workspace.resolve
        calls = []

        def resolve_then_swap(self, path, allow_root=False):
            got = real(self, path, allow_root=allow_root)
            calls.append(path)
            if path == "sub/f" and calls.count(path) == 2:  # (exists' own look)
                _swap_sub_for_symlink(tmp_path, root, outside)
            return got
        monkeypatch.setattr(Workspace, "resolve", resolve_then_swap)
        with store.transaction() as tx:
            try:
                found = tx.files(ws).exists("sub/f")
            except ValueError:
                found = None  # refused: fine
            monkeypatch.undo()
            tx.rollback()
        assert found is not True
    finally:
        store.close()


def test_a_past_entry_of_a_live_path_never_describes_a_file_outside(tmp_path, monkeypatch):
    """``store.at(point).files(ws).entry(p)`` of a path walstore never changed describes
    it as it is now (its content hashed): looked up by its absolute path after the check
    of its parents, a parent swapped for a symlink to outside the root in between gave
    the outside file's size and sha256.  Now looked up in the pinned parent: the path is
    absent there (as under any symlink), or refused."""
    import hashlib
    from walstore.files.paths import Workspace
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {"sub/f": "inside\n"})
    build(outside, {"f": "SECRET outside the root\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(root)
        with store.transaction() as tx:
            tx.put("k", 1)
        view = store.at(store.restore_point("p")).files(ws)
        real = Workspace.check_parents

        def check_then_swap(self, rel, *a, **kw):
            got = real(self, rel, *a, **kw)
            if rel == b"sub/f" and not os.path.islink(os.path.join(root, "sub")):
                _swap_sub_for_symlink(tmp_path, root, outside)
            return got
        monkeypatch.setattr(Workspace, "check_parents", check_then_swap)
        try:
            got = view.entry("sub/f")
        except ValueError:
            got = None  # refused: fine
        secret = hashlib.sha256(b"SECRET outside the root\n").hexdigest()
        assert got is None or got.sha256 != secret
    finally:
        store.close()


def test_commit_after_a_listed_directorys_parent_became_a_file_is_a_conflict(env):
    """A directory listed by a transaction whose parent another process then replaced by
    a file: the commit's check of the listing finds the directory gone (ConflictError),
    not a ValueError from the pinned walk."""
    store, root = env
    ws = store.workspace(root)
    os.mkdir(os.path.join(root, "d", "e"))
    tx = store.transaction()
    assert tx.files(ws).listdir("d/e") == []
    os.rename(os.path.join(root, "d"), os.path.join(root, "..", "d-aside"))
    with open(os.path.join(root, "d"), "w") as f:
        f.write("a file now\n")
    tx.put("k", 1)
    with pytest.raises(walstore.ConflictError):
        tx.commit()


def test_stray_temp_cleanup_never_removes_outside_when_a_parent_is_swapped(tmp_path):
    """``remove_stray_temps`` (run by recovery) checked a directory's parents and then
    listed and unlinked its temp names by absolute path: a directory swapped for a
    symlink to outside the root in between made it delete a walstore temp name there (a
    file another store is writing, say).  Now each removal goes through the pinned
    parent: refused, the outside name stays."""
    from walstore.files.apply import remove_stray_temps
    from walstore.files.paths import Workspace
    name = ".walstore-tmp-1234-0123456789ab"
    root = str(tmp_path / "ws")
    outside = str(tmp_path / "outside")
    build(root, {f"sub/{name}": "stray\n"})
    build(outside, {name: "another store's temp, in use\n"})
    ws = Workspace(root)
    real = ws.check_parents

    def check_then_swap(rel, *a, **kw):
        got = real(rel, *a, **kw)
        if rel == b"sub/x" and not os.path.islink(os.path.join(root, "sub")):
            _swap_sub_for_symlink(tmp_path, root, outside)
        return got
    ws.check_parents = check_then_swap
    try:
        remove_stray_temps(ws, ["sub"], durable=False)
    except ValueError:
        pass  # refused: fine
    assert os.path.exists(os.path.join(outside, name))
