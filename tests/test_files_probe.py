"""Reversible files: what an adversarial probe of stop 29 found, each named after the promise
it broke (the files walstore records and the files on disk agree, after a crash, a failed
operation, a rollback, a revert or a rewind)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

import walstore
from walstore.files.paths import is_temp_name


def _open(tmp_path, **kw):
    root = tmp_path / "ws"
    root.mkdir(exist_ok=True)
    s = walstore.open(str(tmp_path / "s"), **kw)
    return s, s.workspace(str(root)), root


def _run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_recovery_keeps_committed_and_users_files_named_like_walstores_temp_files(tmp_path):
    """Recovery removed every name starting ``.walstore-tmp-`` in a directory a crashed
    transaction touched: a file walstore itself committed under such a name, and the
    user's own file, were deleted."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write(".walstore-tmp-notes", "committed by walstore")
    s.close()
    (root / ".walstore-tmp-userfile").write_text("the user's own")
    r = _run_child("""
        import os, sys, walstore
        s = walstore.open(sys.argv[1]); ws = s.workspace(sys.argv[2])
        tx = s.transaction(); tx.files(ws).write("other.txt", "uncommitted")
        os.kill(os.getpid(), 9)
    """, str(tmp_path / "s"), str(root))
    assert r.returncode == -9, r.stderr
    s = walstore.open(str(tmp_path / "s"))
    assert (root / ".walstore-tmp-notes").read_text() == "committed by walstore"
    assert (root / ".walstore-tmp-userfile").read_text() == "the user's own"
    assert not (root / "other.txt").exists()
    s.close()


def test_only_the_exact_temp_form_is_walstores_and_it_is_refused_as_a_path(tmp_path):
    assert is_temp_name(b".walstore-tmp-1f3a-0123456789ab")
    for name in (b".walstore-tmp-notes", b".walstore-tmp-", b".walstore-tmp-1f3a-0123",
                 b".walstore-tmp-1f3a-0123456789abX", b"x.walstore-tmp-1-0123456789ab"):
        assert not is_temp_name(name), name
    s, ws, root = _open(tmp_path)
    tx = s.transaction()
    with pytest.raises(ValueError, match="temporary files"):
        tx.files(ws).write("d/.walstore-tmp-1f3a-0123456789ab", "x")
    tx.rollback()
    assert not (root / "d").exists()
    s.close()


def test_a_failed_rename_of_a_directory_onto_a_file_leaves_no_trace(tmp_path):
    """rename(dir, file) was planned, logged and then refused by the OS: its rollback
    found a conflict (recorded for good, `walstore recover` exiting 1); its commit
    recorded a history the tree never had, and a revert of it failed."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        f = tx.files(ws)
        f.write("d/z", "Z")
        f.write("e", "E")
    tx = s.transaction()
    with pytest.raises(NotADirectoryError):
        tx.files(ws).rename("d", "e")
    tx.rollback()
    assert s.file_conflicts() == []
    with s.transaction() as tx:
        with pytest.raises(NotADirectoryError):
            tx.files(ws).rename("d", "e")
        tx.files(ws).write("ok", "1")
        tx.put("k", 1)
    at = s.at(tx.id).files(ws)
    assert at.exists("d") and at.entry("e").is_file and at.read("d/z") == b"Z"
    s.revert(tx.id)
    assert not (root / "ok").exists() and (root / "e").read_text() == "E"
    assert (root / "d" / "z").read_text() == "Z" and s.file_conflicts() == []
    s.close()


@pytest.mark.parametrize("replacement", ["file", "symlink"])
def test_revert_and_rewind_put_back_a_directory_a_commit_replaced(tmp_path, replacement):
    """A commit replaced c/ (holding c/x) by a file or a symlink: revert and rewind raised
    NotADirectoryError / ValueError planning c/x (its parent checked against the tree as
    it is now), and changed nothing."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write("c/x", "X")
        tx.put("k", 1)
    s.restore_point("p")
    with s.transaction() as tx:
        f = tx.files(ws)
        f.rmtree("c")
        if replacement == "file":
            f.write("c", "now a file")
        else:
            f.symlink("c", "elsewhere")
        tx.put("k", 2)
    plan = s.rewind("p", dry_run=True)
    assert plan is not None
    s.revert(tx.id)
    assert (root / "c").is_dir() and not (root / "c").is_symlink()
    assert (root / "c" / "x").read_text() == "X" and s.get("k") == 1
    s.revert(s.log(limit=1)[0].txid)  # the revert of the revert: c is the replacement again
    assert (root / "c").is_symlink() if replacement == "symlink" else (root / "c").is_file()
    s.rewind("p")
    assert (root / "c" / "x").read_text() == "X" and s.get("k") == 1
    assert s.file_conflicts() == []
    s.close()


@pytest.mark.parametrize("how", ["rollback", "revert"])
def test_a_crash_between_the_two_steps_of_a_kind_change_is_finished_by_recovery(tmp_path, how):
    """An undo turning a file back into a directory removes the file, then makes the
    directory: a kill -9 between them left the path absent, and the recovery of an
    interrupted revert called it "changed behind walstore's back" (a conflict; the path
    absent for good)."""
    (tmp_path / "ws").mkdir()
    r = _run_child("""
        import os, sys, walstore
        import walstore.files.apply as A
        path, root, how = sys.argv[1:4]
        s = walstore.open(path); ws = s.workspace(root)
        with s.transaction() as tx:
            tx.files(ws).mkdir("b"); tx.put("k", "dir")
        tx = s.transaction(); f = tx.files(ws)
        f.delete("b"); f.write("b", "file"); tx.put("k", "file")
        def crash(*a, **k):
            os.kill(os.getpid(), 9)
        if how == "rollback":
            A._mkdir_atomic = crash; tx.rollback()
        else:
            tx.commit(); A._mkdir_atomic = crash; s.revert(tx.id)
    """, str(tmp_path / "s"), str(tmp_path / "ws"), how)
    assert r.returncode == -9, r.stderr
    s = walstore.open(str(tmp_path / "s"))
    b = tmp_path / "ws" / "b"
    kind = "dir" if b.is_dir() else "file" if b.exists() else "absent"
    assert kind == s.get("k") and s.file_conflicts() == []
    s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a chown needs root")
def test_a_rollback_keeps_the_setuid_and_setgid_bits(tmp_path):
    """The restore changed the mode, then the owner: the chown cleared S_ISUID/S_ISGID."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write("tool", "#!/bin/sh\n", mode=0o6755)
    tx = s.transaction()
    tx.files(ws).write("tool", "changed")
    tx.rollback()
    assert stat.S_IMODE(os.lstat(root / "tool").st_mode) == 0o6755
    with s.transaction() as tx:
        tx.files(ws).chmod("tool", 0o755)
    s.revert(tx.id)
    assert stat.S_IMODE(os.lstat(root / "tool").st_mode) == 0o6755
    s.close()


def test_a_path_under_a_later_symlink_was_absent_at_an_earlier_point(tmp_path):
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write("a", "A")
    s.restore_point("p1")
    with s.transaction() as tx:
        tx.files(ws).symlink("d", "elsewhere")
    view = s.at("p1").files(ws)
    assert not view.exists("d/x")
    with pytest.raises(FileNotFoundError):
        view.read("d/x")
    s.close()


def test_blobs_of_rolled_back_writes_are_collected_under_the_default_retention(tmp_path):
    """The blob gc ran only when retention moved its horizon, which the default (keep
    everything) never does: 20 rolled-back 1 MB writes kept 20 MB for good."""
    s, ws, root = _open(tmp_path, durability="none")
    with s.transaction() as tx:
        tx.files(ws).write("f", b"small")
    for _ in range(20):
        tx = s.transaction()
        tx.files(ws).write("f", os.urandom(1_000_000))
        tx.rollback()
    s.checkpoint()

    def blob_bytes():
        return sum(os.lstat(os.path.join(d, f)).st_size
                   for d, _s, fs in os.walk(tmp_path / "s" / "files") for f in fs)
    assert blob_bytes() < 1_000_000
    assert (root / "f").read_bytes() == b"small"
    assert s.at(s.log(limit=1)[0].txid).files(ws).read("f") == b"small"
    s.close()


def test_a_read_only_store_after_a_crash_never_reads_uncommitted_file_bytes(tmp_path):
    """at(commit).files(ws).read() on a read-only open after a crash read the tree as it
    is now: the crashed transaction's never-committed bytes."""
    (tmp_path / "ws").mkdir()
    r = _run_child("""
        import os, sys, walstore
        s = walstore.open(sys.argv[1]); ws = s.workspace(sys.argv[2])
        with s.transaction() as tx:
            tx.files(ws).write("a", "committed"); tx.put("k", "committed")
        tx = s.transaction(); tx.files(ws).write("a", "NEVER COMMITTED")
        os.kill(os.getpid(), 9)
    """, str(tmp_path / "s"), str(tmp_path / "ws"))
    assert r.returncode == -9, r.stderr
    ro = walstore.open(str(tmp_path / "s"), readonly=True)
    last = ro.log(limit=1)[0].txid
    assert ro.at(last).get("k") == "committed"
    with pytest.raises(walstore.ReadOnlyError, match="not applied"):
        ro.at(last).files(str(tmp_path / "ws")).read("a")
    ro.close()
    with walstore.open(str(tmp_path / "s")) as s:  # recovery: the tree is the commit's
        assert (tmp_path / "ws" / "a").read_text() == "committed"
    ro = walstore.open(str(tmp_path / "s"), readonly=True)
    assert ro.at(last).files(str(tmp_path / "ws")).read("a") == b"committed"
    ro.close()


def test_a_strangers_delete_of_a_path_a_commit_turned_from_directory_to_file_is_a_conflict(
        tmp_path):
    """The recovery-only rule (a path absent between the two steps of walstore's own
    kind-changing restore) applied to live reverts too: a stranger's delete was taken
    for it and silently overridden."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write("p/x", "X")
    with s.transaction() as tx:
        f = tx.files(ws)
        f.rmtree("p")
        f.write("p", "a file now")
    (root / "p").unlink()  # a stranger
    with pytest.raises(walstore.RevertConflict):
        s.revert(tx.id)
    assert not (root / "p").exists()
    s.close()


# ---- probe 41 ---------------------------------------------------------------------------

def _watch_then_crash(store: str, root: str) -> subprocess.CompletedProcess:
    """A child that re-registers ``root`` without its ``*.log`` pattern inside a watch
    (after a watched process wrote t.txt), then is killed inside the block."""
    return _run_child("""
        import os, subprocess, sys, walstore
        s = walstore.open(sys.argv[1]); ws = s.workspace(sys.argv[2], ignore=["*.log"])
        tx = s.transaction()
        with tx.files(ws).watch():
            subprocess.run(["sh", "-c", "echo t > t.txt"], cwd=sys.argv[2], check=True)
            s.workspace(sys.argv[2], ignore=[])
            os.kill(os.getpid(), 9)
    """, store, root)


@pytest.mark.parametrize("how", ["rollback", "crash"])
def test_a_watch_never_takes_a_file_it_ignored_at_its_start_for_its_own(tmp_path, how):
    """Re-registering a workspace with other ignore= patterns while a watch ran there: a
    file ignored when the watch began (and never touched) was "created" by the watch, and
    the rollback (or the recovery of a crash inside the block) deleted it."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "precious.log").write_text("walstore never owned this")
    if how == "rollback":
        s = walstore.open(str(tmp_path / "s"))
        ws = s.workspace(str(root), ignore=["*.log"])
        tx = s.transaction()
        with tx.files(ws).watch() as w:
            subprocess.run(["sh", "-c", "echo t > t.txt"], cwd=root, check=True)
            s.workspace(str(root), ignore=[])  # another part of the agent re-registers
        assert [(c.path, c.kind) for c in w.changes] == [(b"t.txt", "created")]
        tx.rollback()
    else:
        r = _watch_then_crash(str(tmp_path / "s"), str(root))
        assert r.returncode == -9, r.stderr
        s = walstore.open(str(tmp_path / "s"))
        assert [p.kind for p in s.last_recovery.problems] == ["watch-undone"]
    assert (root / "precious.log").read_text() == "walstore never owned this"
    assert not (root / "t.txt").exists() and s.file_conflicts() == []
    s.close()


def test_a_rename_that_would_move_the_store_is_refused(tmp_path):
    """rename() of a workspace directory holding the store moved the store itself (the
    rollback could not put it back: FileConflictError, the store left at the new name);
    only "is the store or inside it" was refused, not "holds it"."""
    root = tmp_path / "ws"
    (root / "inner").mkdir(parents=True)
    store = root / "inner" / "store"
    s = walstore.open(str(store))
    ws = s.workspace(str(root))
    with s.transaction() as tx:
        tx.files(ws).write("inner/a", "A")
    tx = s.transaction()
    with pytest.raises(ValueError, match="holds walstore's own directory 'inner/store'"):
        tx.files(ws).rename("inner", "inner2")
    tx.files(ws).rmtree("inner")  # (rmtree keeps the store, and what holds it)
    assert store.is_dir() and not (root / "inner" / "a").exists()
    tx.rollback()
    assert sorted(os.listdir(root)) == ["inner"] and not (root / "inner2").exists()
    assert (root / "inner" / "a").read_text() == "A" and s.file_conflicts() == []
    s.close()


def test_a_root_replaced_by_a_symlink_is_never_written_through(tmp_path):
    """A workspace root replaced by a symlink (mv ws ws_old; ln -s other ws) was followed:
    a live write landed in other/, and the recovery of a crashed transaction deleted and
    overwrote other/'s own files.  Now refused live; recovery leaves it owed (reported),
    and puts it back once the root is the directory again."""
    root, old, other = tmp_path / "ws", tmp_path / "ws_old", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    s = walstore.open(str(tmp_path / "s"))
    ws = s.workspace(str(root))
    with s.transaction() as tx:
        tx.files(ws).write("a", "A0")
    root.rename(old)
    root.symlink_to(other)
    tx = s.transaction()
    with pytest.raises(ValueError, match="no longer the directory registered"):
        tx.files(ws).write("live.txt", "L")
    with pytest.raises(ValueError, match="no longer the directory registered"):
        with tx.files(ws).watch():
            pass
    tx.rollback()
    assert os.listdir(other) == []
    s.close()
    root.unlink()
    old.rename(root)
    r = _run_child("""
        import os, sys, walstore
        s = walstore.open(sys.argv[1]); ws = s.workspace(sys.argv[2])
        tx = s.transaction(); f = tx.files(ws); f.write("a", "A1"); f.write("new", "N")
        os.kill(os.getpid(), 9)
    """, str(tmp_path / "s"), str(root))
    assert r.returncode == -9, r.stderr
    root.rename(old)
    root.symlink_to(other)
    (other / "a").write_text("other's a")
    (other / "new").write_text("other's new")
    s = walstore.open(str(tmp_path / "s"))
    assert {p.kind for p in s.last_recovery.problems} == {"file-undo-failed"}
    assert (other / "a").read_text() == "other's a"
    assert (other / "new").read_text() == "other's new"
    s.close()
    root.unlink()
    old.rename(root)
    s = walstore.open(str(tmp_path / "s"))  # owed, not forgotten: put back now
    assert s.last_recovery.problems == []
    assert sorted(os.listdir(root)) == ["a"] and (root / "a").read_text() == "A0"
    s.close()


def test_a_watch_inside_a_watch_of_the_same_transaction_is_undone_once(tmp_path):
    """A watch() nested in the transaction's own watch() of the workspace logged its
    changes too: the rollback undid them twice (the inner watch's over the outer's),
    raising FileConflictError and bringing back a file created and deleted inside."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        tx.files(ws).write("a", "A0")
    tx = s.transaction()
    f = tx.files(ws)
    with f.watch() as outer:
        subprocess.run(["sh", "-c", "echo 1 > a; echo x > x"], cwd=root, check=True)
        with f.watch() as inner:
            subprocess.run(["sh", "-c", "echo 2 > a; rm x"], cwd=root, check=True)
    assert [(c.path, c.kind) for c in inner.changes] == [(b"a", "modified"),
                                                         (b"x", "deleted")]
    assert [(c.path, c.kind) for c in outer.changes] == [(b"a", "modified")]
    tx.rollback()
    assert sorted(os.listdir(root)) == ["a"] and (root / "a").read_text() == "A0"
    assert s.file_conflicts() == []
    s.close()


def test_a_forced_revert_removes_what_others_put_in_a_directory_it_removes(tmp_path):
    """revert(force=True) of a transaction that created d/ raised RevertConflict once
    another process had put a file in d/: force did nothing.  Now the file goes too, as a
    step of the revert (its revert brings it back), with a copy in quarantine/."""
    s, ws, root = _open(tmp_path)
    with s.transaction() as tx:
        f = tx.files(ws)
        f.mkdir("d")
        f.write("d/a", "A")
        f.write("keep", "K")
    (root / "d" / "sub").mkdir()
    (root / "d" / "sub" / "stranger").write_text("S")
    (root / "d" / "link").symlink_to("sub")
    with pytest.raises(walstore.RevertConflict):
        s.revert(tx.id)  # (unforced: named, nothing changed)
    assert (root / "d" / "sub" / "stranger").read_text() == "S" and (root / "keep").exists()
    s.revert(tx.id, force=True)
    assert os.listdir(root) == []
    q = tmp_path / "s" / "quarantine" / "files" / f"tx{s.log(limit=1)[0].txid}" / "d"
    assert (q / "sub" / "stranger").read_text() == "S" and os.readlink(q / "link") == "sub"
    s.revert(s.log(limit=1)[0].txid)
    assert (root / "d" / "sub" / "stranger").read_text() == "S"
    assert os.readlink(root / "d" / "link") == "sub" and (root / "d" / "a").read_text() == "A"
    assert s.file_conflicts() == []
    s.close()


def test_a_forced_revert_never_removes_a_directory_holding_the_store(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    s = walstore.open(str(tmp_path / "ws" / "d" / "store"))  # (d made by the store)
    ws = s.workspace(str(root))
    with s.transaction() as tx:
        tx.files(ws).write("e/a", "A")
    s.close()
    os.rename(root / "d", root / "e" / "d")  # the store now inside e/, which tx created
    s = walstore.open(str(root / "e" / "d" / "store"))
    ws = s.workspace(str(root))
    with pytest.raises(walstore.RevertConflict, match="holds walstore's own directory"):
        s.revert(tx.id, force=True)
    assert (root / "e" / "a").read_text() == "A" and (root / "e" / "d" / "store").is_dir()
    s.close()


@pytest.mark.parametrize("how", ["rollback", "revert", "crash"])
def test_a_watch_puts_back_the_mode_of_the_root_itself(tmp_path, how):
    """A watched ``chmod -R go-rwx .`` was undone on every path but the root: the walk
    recorded the root's children, never the root."""
    root = tmp_path / "ws"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    os.chmod(root, 0o755)
    os.chmod(root / "sub", 0o755)
    os.chmod(root / "sub" / "f", 0o644)
    if how == "crash":
        r = _run_child("""
            import os, subprocess, sys, walstore
            s = walstore.open(sys.argv[1]); ws = s.workspace(sys.argv[2])
            tx = s.transaction()
            with tx.files(ws).watch():
                subprocess.run(["chmod", "-R", "go-rwx", "."], cwd=sys.argv[2], check=True)
                os.kill(os.getpid(), 9)
        """, str(tmp_path / "s"), str(root))
        assert r.returncode == -9, r.stderr
        s = walstore.open(str(tmp_path / "s"))
    else:
        s = walstore.open(str(tmp_path / "s"))
        ws = s.workspace(str(root))
        tx = s.transaction()
        with tx.files(ws).watch() as w:
            subprocess.run(["chmod", "-R", "go-rwx", "."], cwd=root, check=True)
        assert (b"", "mode") in [(c.path, c.kind) for c in w.changes]
        if how == "rollback":
            tx.rollback()
        else:
            tx.commit()
            assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
            s.revert(tx.id)
    modes = {p: stat.S_IMODE(os.lstat(root / p).st_mode) for p in (".", "sub", "sub/f")}
    assert modes == {".": 0o755, "sub": 0o755, "sub/f": 0o644}
    assert s.file_conflicts() == []
    s.close()


def test_at_a_point_a_path_through_a_symlink_is_refused_as_the_live_read_refuses_it(
        tmp_path):
    """at(point).files(ws).read() of a path through a symlink leading outside the root
    said FileNotFoundError ("did not exist"); the live read, and the contract, say
    ValueError."""
    s, ws, root = _open(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "secret").write_text("SECRET")
    with s.transaction() as tx:
        tx.files(ws).write("a", "A0")
    (root / "ext").symlink_to(tmp_path / "out")
    p = s.restore_point("p")
    with s.transaction() as tx:
        with pytest.raises(ValueError, match="symlink"):
            tx.files(ws).read("ext/secret")
    with pytest.raises(ValueError, match="'ext' was a symlink"):
        s.at(p).files(ws).read("ext/secret")
    with s.transaction() as tx:  # a symlink committed by walstore: the same
        tx.files(ws).symlink("in", "sub")
        tx.files(ws).write("sub/x", "X")
    with pytest.raises(ValueError, match="'in' was a symlink"):
        s.at(tx.id).files(ws).read("in/x")
    s.close()


def test_walstore_files_names_the_root_as_dot(tmp_path):
    """A watched change of the root's own mode is listed by ``walstore files`` as ``.``
    (the row's PATH cell was empty)."""
    root = tmp_path / "ws"
    root.mkdir()
    os.chmod(root, 0o755)
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        s.restore_point("before")
        with s.transaction() as tx:
            with tx.files(ws).watch():
                os.chmod(root, 0o700)
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                              text=True, check=True).stdout
    out = cli("files", path)
    assert [".", "dir", "0o700"] in [line.split()[:3] for line in out.splitlines()], out
    out = cli("diff", path, "--from", "before")  # (absolute paths: the root's ends in /)
    assert ["mode", str(root) + "/", "dir", "0o755", "dir", "0o700"] in [
        line.split() for line in out.splitlines()], out
