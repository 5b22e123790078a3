"""Every file operation walstore makes in a workspace goes through its parent directory
pinned (opened from the root, no symlink followed): a directory on the way that another
process swaps for a symlink to outside the root right after walstore's checks is refused,
never gone through.  Stop 50 pinned writes, deletes and renames; ``mkdir`` (and the
missing parents a write creates), ``symlink``, ``chmod``, and an undo's ``rmdir`` and
mode change still went by absolute path, so the swap made them create, change or remove
a directory, symlink or mode outside the root (probe-audit51).  Each test swaps at the
moment between the check and the act, then asserts nothing outside changed."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import walstore  # noqa: E402
from walstore.files import apply as fapply  # noqa: E402
from files_support import build  # noqa: E402


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    build(str(root), {"sub/f": "inside\n"})
    os.chmod(root / "sub" / "f", 0o644)
    outside.mkdir()
    (outside / "f").write_text("a stranger's file\n")
    os.chmod(outside / "f", 0o644)
    store = walstore.open(str(tmp_path / "store"), durability="none")
    ws = store.workspace(str(root))

    def swap() -> None:
        """What another process can do: move ``sub`` aside, a symlink to outside there."""
        if not (tmp_path / "sub-aside").exists():
            os.rename(root / "sub", tmp_path / "sub-aside")
            os.symlink(outside, root / "sub")

    def unswap() -> None:
        if (tmp_path / "sub-aside").exists():
            os.unlink(root / "sub")
            os.rename(tmp_path / "sub-aside", root / "sub")
    yield store, ws, root, outside, swap, unswap
    store.close()


def _outside_state(outside: Path) -> dict:
    return {p.name: (stat.S_IFMT(os.lstat(p).st_mode), stat.S_IMODE(os.lstat(p).st_mode))
            for p in outside.iterdir()}


def _swap_after_make_parents(monkeypatch, swap) -> None:
    real = fapply._make_parents

    def make_parents_then_swap(ws_, rel, durable):
        created = real(ws_, rel, durable)
        swap()
        return created
    monkeypatch.setattr(fapply, "_make_parents", make_parents_then_swap)


@pytest.mark.parametrize("op", ["mkdir", "symlink", "write-new-parent"])
def test_creations_never_land_outside_when_a_parent_is_swapped(env, monkeypatch, op):
    store, ws, root, outside, swap, unswap = env
    before = _outside_state(outside)
    if op != "write-new-parent":
        _swap_after_make_parents(monkeypatch, swap)
    tx = store.transaction()
    f = tx.files(ws)
    with pytest.raises(ValueError, match="no longer a directory"):
        if op == "mkdir":
            f.mkdir("sub/newdir")
        elif op == "symlink":
            f.symlink("sub/link", "/etc/passwd")
        else:  # the swap comes after sub/ was checked, before deep/ is made in it
            real_mkdir = fapply._mkdir_atomic

            def swap_then_mkdir(ws_, rel, *a, **kw):
                swap()
                return real_mkdir(ws_, rel, *a, **kw)
            monkeypatch.setattr(fapply, "_mkdir_atomic", swap_then_mkdir)
            # (the failed write's cleanup of the parents it made went by absolute path
            # too, and took back the one it had made outside: kept, to be seen)
            monkeypatch.setattr(fapply, "_undo_created", lambda *a, **kw: None)
            f.write("sub/deep/g", "x")
    monkeypatch.undo()
    assert _outside_state(outside) == before
    unswap()
    tx.rollback()
    assert _outside_state(outside) == before
    assert sorted(os.listdir(root / "sub")) == ["f"]


def test_chmod_never_changes_a_mode_outside_when_a_parent_is_swapped(env, monkeypatch):
    store, ws, root, outside, swap, unswap = env
    real_chmod = fapply._chmod_nofollow

    def swap_then_chmod(*a, **kw):  # (after every check, as the chmod is made)
        swap()
        return real_chmod(*a, **kw)
    monkeypatch.setattr(fapply, "_chmod_nofollow", swap_then_chmod)
    tx = store.transaction()
    try:  # (pinned before the swap: the chmod lands on the file moved aside, or fails)
        tx.files(ws).chmod("sub/f", 0o600)
    except (ValueError, OSError, walstore.WalstoreError):
        pass
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(outside / "f").st_mode) == 0o644
    unswap()
    tx.rollback()
    assert stat.S_IMODE(os.stat(root / "sub" / "f").st_mode) == 0o644


def test_an_undo_never_removes_a_directory_outside_when_a_parent_is_swapped(env,
                                                                           monkeypatch):
    store, ws, root, outside, swap, unswap = env
    (outside / "newdir").mkdir()  # an empty directory of the same name outside
    tx = store.transaction()
    tx.files(ws).mkdir("sub/newdir")
    real_rmdir = fapply._rmdir

    def swap_then_rmdir(path):  # (after every check of the undo, as it removes)
        swap()
        return real_rmdir(path)
    monkeypatch.setattr(fapply, "_rmdir", swap_then_rmdir)
    try:  # (pinned before the swap: the rmdir removes the directory moved aside)
        tx.rollback()
    except (ValueError, OSError, walstore.WalstoreError):
        pass
    monkeypatch.undo()
    assert (outside / "newdir").is_dir()


def test_an_undo_never_changes_a_mode_outside_when_a_parent_is_swapped(env, monkeypatch):
    store, ws, root, outside, swap, unswap = env
    os.chmod(outside / "f", 0o600)
    tx = store.transaction()
    tx.files(ws).chmod("sub/f", 0o600)  # its undo: back to 0o644
    real_chown = fapply._chown

    def swap_then_chown(*a, **kw):  # (after every check of the undo, as it changes)
        swap()
        return real_chown(*a, **kw)
    monkeypatch.setattr(fapply, "_chown", swap_then_chown)
    try:
        tx.rollback()
    except (ValueError, OSError, walstore.WalstoreError):
        pass
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(outside / "f").st_mode) == 0o600
