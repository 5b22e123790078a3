"""Adversarial audit of reversible files (audit 50): the edges earlier audits missed.

- A str path, symlink target, workspace root or ignore pattern that the file system
  cannot name (a lone surrogate such as ``"\\ud800"``, which ``os.fsencode``'s
  surrogate escapes do not cover) is a ValueError naming what was given, not a bare
  ``UnicodeEncodeError`` (the contract: bad input is ValueError/TypeError naming the
  problem, no foreign exception type escapes).
- ``tx.files(ws).read(p)`` of a FIFO (directly or through a symlink inside the root)
  or of a device node is refused with a ValueError (walstore tracks files, directories
  and symlinks), where it blocked forever in ``open()`` (a FIFO with no writer) or read
  without end (a character device like /dev/zero).
- A commit's fsync pass over watched files skips a FIFO or socket another process put in
  place of one since (its EINVAL/ENXIO failed the commit and rolled the transaction back).
- ``rename`` onto another hard link of the same file removes the source (rename(2) does
  nothing there: the source stayed while the store recorded it gone).
- A parent directory swapped for a symlink to outside the root by another process right
  after walstore's checks: a write landed outside, a delete removed a file outside, a
  rename moved a file in from outside or out of the root.  The parent is pinned now
  (walked from the root with O_NOFOLLOW, named through /proc/self/fd).
"""
from __future__ import annotations

import os
import stat
import threading

import pytest

import walstore
from walstore.files.entries import UnsupportedFileType

from files_support import build, tree_state


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "ws"
    build(str(root), {"a.txt": "aaa\n", "d/x": "x\n"})
    store = walstore.open(str(tmp_path / "store"))
    try:
        yield store, str(root)
    finally:
        store.close()


BAD = "bad\ud800name"  # a lone high surrogate: no file name can hold it


def _no_unicode_error(call):
    """``call()`` raises ValueError (not a UnicodeError) whose message names the input."""
    with pytest.raises(ValueError) as info:
        call()
    assert not isinstance(info.value, UnicodeError), repr(info.value)
    assert "\\ud800" in str(info.value) or "ud800" in str(info.value)


@pytest.mark.parametrize("op", ["write", "read", "exists", "delete", "mkdir", "rmtree",
                                "chmod", "listdir", "rename_src", "rename_dst", "symlink"])
def test_unencodable_path_is_a_valueerror(env, op):
    store, root = env
    ws = store.workspace(root)
    before = tree_state(root)
    with store.transaction() as tx:
        f = tx.files(ws)
        calls = {
            "write": lambda: f.write(BAD, "x"),
            "read": lambda: f.read(BAD),
            "exists": lambda: f.exists(BAD),
            "delete": lambda: f.delete(BAD),
            "mkdir": lambda: f.mkdir(BAD),
            "rmtree": lambda: f.rmtree(BAD),
            "chmod": lambda: f.chmod(BAD, 0o600),
            "listdir": lambda: f.listdir(BAD),
            "rename_src": lambda: f.rename(BAD, "b.txt"),
            "rename_dst": lambda: f.rename("a.txt", BAD),
            "symlink": lambda: f.symlink(BAD, "a.txt"),
        }
        _no_unicode_error(calls[op])
        tx.rollback()
    assert tree_state(root) == before


def test_unencodable_symlink_target_is_a_valueerror(env):
    store, root = env
    ws = store.workspace(root)
    before = tree_state(root)
    with store.transaction() as tx:
        _no_unicode_error(lambda: tx.files(ws).symlink("link", BAD))
    assert tree_state(root) == before


def test_unencodable_past_read_is_a_valueerror(env):
    store, root = env
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a.txt", "v2\n")
        txid = tx.id
    _no_unicode_error(lambda: store.at(txid).files(ws).read(BAD))


def test_unencodable_workspace_root_and_ignore_are_valueerrors(env, tmp_path):
    store, root = env
    _no_unicode_error(lambda: store.workspace(str(tmp_path / BAD)))
    _no_unicode_error(lambda: store.workspace(root, ignore=["*.log", BAD]))
    with store.transaction() as tx:
        _no_unicode_error(lambda: tx.files(str(tmp_path / BAD)))
        tx.rollback()
    # nothing was registered by the refusals, and the good registration still works
    assert store.workspace(root).root == os.path.realpath(root)


def _read_with_timeout(call, seconds=5.0):
    """(finished, result or exception) of ``call()`` in a daemon thread."""
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive()), out


@pytest.mark.parametrize("through_link", [False, True])
def test_read_of_a_fifo_is_refused_not_a_hang(env, through_link):
    store, root = env
    os.mkfifo(os.path.join(root, "fifo"))
    if through_link:
        os.symlink("fifo", os.path.join(root, "to_fifo"))
    ws = store.workspace(root)
    tx = store.transaction()
    f = tx.files(ws)
    finished, out = _read_with_timeout(lambda: f.read("to_fifo" if through_link else "fifo"))
    if not finished:  # unblock the reader so the test process can end
        fd = os.open(os.path.join(root, "fifo"), os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert finished, "tx.files(ws).read() of a FIFO blocked"
    assert isinstance(out.get("error"), UnsupportedFileType), out
    assert "fifo" in str(out["error"])
    tx.rollback()
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo")).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_read_of_a_device_is_refused_not_an_endless_read(env):
    store, root = env
    os.mknod(os.path.join(root, "zero"), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    ws = store.workspace(root)
    with store.transaction() as tx:
        finished, out = _read_with_timeout(lambda: tx.files(ws).read("zero"), 2.0)
        assert finished, "tx.files(ws).read() of /dev/zero's twin read without end"
        assert isinstance(out.get("error"), UnsupportedFileType), out
        tx.rollback()


def _swap_sub_for_symlink(tmp_path, root, outside) -> None:
    """What another process can do right after walstore's checks: move ``sub`` aside and
    put a symlink to a directory outside the root in its place (once)."""
    if not (tmp_path / "sub-aside").exists():
        os.rename(root / "sub", tmp_path / "sub-aside")
        os.symlink(outside, root / "sub")


def test_write_never_lands_outside_when_a_parent_is_swapped_for_a_symlink(tmp_path, monkeypatch):
    """A parent directory swapped for a symlink to outside the root by another process
    right after walstore's checks made the write's temp file (and then the file) land
    in the symlink's target, outside the root (the temp create and rename went by
    absolute path).  Now the parent is pinned — opened component by component from the
    root with O_NOFOLLOW and named through /proc/self/fd — so the swap is refused."""
    from walstore.files import apply as fapply
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    build(str(root), {"sub/f": "inside\n"})
    outside.mkdir()
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(str(root))
        real_make_parents = fapply._make_parents

        def make_parents_then_swap(ws_, rel, durable):
            created = real_make_parents(ws_, rel, durable)
            _swap_sub_for_symlink(tmp_path, root, outside)
            return created
        monkeypatch.setattr(fapply, "_make_parents", make_parents_then_swap)
        tx = store.transaction()
        try:
            tx.files(ws).write("sub/f", "written\n")
        except (ValueError, OSError):
            pass  # refusing is fine; writing outside is not
        monkeypatch.undo()
        landed = os.listdir(outside)
        try:
            tx.rollback()
        except walstore.FileConflictError:
            pass  # (the stranger's symlink stays: a conflict, as documented)
        assert landed == [], f"a write landed outside the workspace: {landed}"
    finally:
        store.close()


def test_non_path_inputs_are_typeerrors_naming_the_argument(env):
    store, root = env
    with pytest.raises(TypeError, match="workspace root"):
        store.workspace(5)
    with pytest.raises(TypeError, match="ignore="):
        store.workspace(root, ignore=5)
    ws = store.workspace(root)
    with store.transaction() as tx:
        with pytest.raises(TypeError, match="symlink target"):
            tx.files(ws).symlink("link", 5)
        tx.rollback()


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_commit_of_a_watch_does_not_fail_on_a_special_file_put_there_since(env, kind):
    """A file a watched process made, replaced by a FIFO or a socket after the block (by
    another process), before the commit: the commit's fsync pass over the watched files
    skips it, as it skips one removed since.  It raised (fsync EINVAL / open ENXIO) and
    the whole transaction, keys included, was rolled back over the stranger's file."""
    import socket
    import subprocess
    store, root = env
    ws = store.workspace(root)
    sock = None
    tx = store.transaction()
    tx.put("k", "v")
    with tx.files(ws).watch() as w:
        subprocess.run(["sh", "-c", "echo made > p"], cwd=root, check=True)
    assert [c.path for c in w.changes] == [b"p"]
    p = os.path.join(root, "p")
    os.unlink(p)
    try:
        if kind == "fifo":
            os.mkfifo(p)
        else:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(p)
        tx.commit()
        assert store.get("k") == "v"
        special = os.lstat(p).st_mode
        assert stat.S_ISFIFO(special) or stat.S_ISSOCK(special)  # the stranger's stays
    finally:
        if sock is not None:
            sock.close()


def test_rename_onto_another_hard_link_of_the_same_file(env, tmp_path):
    """``rename(a, b)`` where ``a`` and ``b`` are two names of one inode: rename(2) does
    nothing and succeeds, so ``a`` stayed on disk while walstore recorded it removed
    (``at(tx).exists("a")`` False, the disk True, from the commit on).  Now ``a`` is
    removed (the move's one effect), rollback and revert put it back, and a kill -9
    with the move in flight is undone at open."""
    import signal
    import subprocess
    import sys
    import textwrap
    store, root = env
    a, b = os.path.join(root, "a.txt"), os.path.join(root, "b.txt")
    os.link(a, b)
    before = tree_state(root)
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).rename("a.txt", "b.txt")
        tx.rollback()
    assert tree_state(root) == before
    with store.transaction() as tx:
        f = tx.files(ws)
        f.rename("a.txt", "b.txt")
        assert not f.exists("a.txt")
        txid = tx.id
    assert not os.path.lexists(a), "the disk kept a.txt that the store recorded removed"
    assert store.at(txid).files(ws).exists("a.txt") is False
    assert store.at(txid).files(ws).read("b.txt") == b"aaa\n"
    store.revert(txid)
    assert tree_state(root) == before
    store.close()
    # kill -9 of a real writer with the move done and its transaction open
    child = textwrap.dedent(f"""
        import sys, time, walstore
        st = walstore.open({str(tmp_path / "store")!r})
        tx = st.transaction()
        tx.files(st.workspace({root!r})).rename("a.txt", "b.txt")
        print("moved", flush=True)
        time.sleep(60)
    """)
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(walstore.__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, env=env_vars)
    try:
        assert p.stdout.readline() == b"moved\n"
        assert not os.path.lexists(a)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    reopened = walstore.open(str(tmp_path / "store"))
    try:
        assert tree_state(root) == before
        assert reopened.last_recovery.file_conflicts == []
    finally:
        reopened.close()


def test_delete_never_removes_outside_when_a_parent_is_swapped_for_a_symlink(tmp_path,
                                                                              monkeypatch):
    """(stop 50, after the audit) ``delete`` went by absolute path too: a parent swapped
    for a symlink to outside the root right after the checks made the unlink remove the
    file of the same name outside.  Now the parent is pinned as for a write."""
    from walstore.files import apply as fapply
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    build(str(root), {"sub/f": "inside\n"})
    outside.mkdir()
    (outside / "f").write_text("a stranger's file\n")
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(str(root))
        real_read_entry = fapply.read_entry

        def read_then_swap(*a, **kw):  # (right after delete's checks, before its unlink)
            got = real_read_entry(*a, **kw)
            _swap_sub_for_symlink(tmp_path, root, outside)
            return got
        monkeypatch.setattr(fapply, "read_entry", read_then_swap)
        tx = store.transaction()
        with pytest.raises(ValueError, match="no longer a directory"):
            tx.files(ws).delete("sub/f")
        monkeypatch.undo()
        assert (outside / "f").read_text() == "a stranger's file\n"
        try:
            tx.rollback()
        except walstore.FileConflictError:
            pass
        assert (outside / "f").read_text() == "a stranger's file\n"
    finally:
        store.close()


@pytest.mark.parametrize("which", ["src", "dst"])
def test_rename_never_moves_across_a_parent_swapped_for_a_symlink(tmp_path, monkeypatch,
                                                                  which):
    """(stop 50) ``rename`` went by absolute paths: a parent of the source swapped for a
    symlink right after the checks moved a file from outside into the root (removing it
    there), one of the destination moved the file out of the root.  Both parents are
    pinned now."""
    from walstore.files import apply as fapply
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    build(str(root), {"sub/f": "inside\n", "other/g": "g\n"})
    outside.mkdir()
    (outside / "f").write_text("a stranger's file\n")
    store = walstore.open(str(tmp_path / "store"))
    try:
        ws = store.workspace(str(root))
        real_make_parents = fapply._make_parents

        def make_parents_then_swap(ws_, rel, durable):
            created = real_make_parents(ws_, rel, durable)
            _swap_sub_for_symlink(tmp_path, root, outside)
            return created
        monkeypatch.setattr(fapply, "_make_parents", make_parents_then_swap)
        tx = store.transaction()
        src, dst = ("sub/f", "moved") if which == "src" else ("other/g", "sub/g")
        with pytest.raises(ValueError, match="no longer a directory"):
            tx.files(ws).rename(src, dst)
        monkeypatch.undo()
        assert sorted(os.listdir(outside)) == ["f"]
        assert (outside / "f").read_text() == "a stranger's file\n"
        try:
            tx.rollback()
        except walstore.FileConflictError:
            pass
        assert sorted(os.listdir(outside)) == ["f"]
    finally:
        store.close()
