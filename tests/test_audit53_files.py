"""Adversarial audit of reversible files (audit 53): what the stop-50 audit did not cover.

- ``store.at(point).files(ws).stream(p)`` of a path walstore never changed (read as it is
  now), or one only a transaction that has not ended changed (its before-image), read
  the whole file into memory (it fell back to ``read``): a GiB file cost a GiB, where
  the contract streams large files.  And a before-image missing from the content store
  escaped ``stream`` as a bare FileNotFoundError where ``read`` says CorruptionError.
- A conflict keeps walstore's version at ``quarantine/files/tx<N>/<path>``; when an earlier
  conflict of the same rollback had kept a FILE at a directory on that way (``a`` kept,
  then ``a/b``), the copy could not be made (FileExistsError): the undo failed, and stayed
  owed at every open after, failing the same way each time.
- A path a rollback (or the recovery after kill -9) cannot even reach — another process
  replaced a directory on its way by a file or a symlink — is a conflict as it should be,
  but walstore's version was kept nowhere (``saved_as`` None): the committed content the
  transaction had overwritten was lost to the user, where the contract keeps it under
  ``quarantine/``.
- ``tx.files(ws).listdir()`` left out a symlink to a directory matched by a directory-only
  pattern (``build/``): it asked the directory entry "is a directory?" following the
  link, where git (and walstore's own manifests, which track that symlink) say a symlink
  is no directory.
- The directories of ``quarantine/files/tx<N>/...`` a conflict's copy creates were never
  fsynced into their parents (the copy's own directory only): after the durable
  FILE_CONFLICT record naming ``saved_as``, a power loss could drop ``tx<N>/`` and the
  copy with it.  Every other directory walstore makes for itself has its parent fsynced
  (``fileio.make_dir``; the blob store's fan-out).
- ``revert``/``rewind`` of a transaction whose path holds a FIFO (or socket, device) now —
  another process put it there, or the watched process itself — raised
  UnsupportedFileType, forced or not: not a RevertConflict naming the path, and with
  ``force=True`` (which puts the before-image back over whatever is there) the
  transaction could not be reverted at all.  Likewise a kill -9 inside a ``watch()`` whose
  process had replaced a file by a FIFO: recovery, which puts every path the watched
  processes changed back, left the FIFO and called the path a conflict.  And a forced
  revert of a transaction that created a directory another process has put a FIFO in
  since (the directory must go; what others put in it goes too, kept aside) raised
  UnsupportedFileType capturing that subtree.
- A watched process that made a directory and a FIFO or a unix socket in it (a test
  server's socket): the rollback could not remove the directory ("changed behind
  walstore's back", a FileConflictError about the watched process's own file), and it
  stayed with the socket in it.  The watch remembered only special files left AT a path
  it changed, not inside a directory it created.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tracemalloc

import pytest

import walstore

from files_support import build

BIG = 64 << 20  # a sparse file: its holes cost no disk, but read whole it costs 64 MiB


from test_audit50_files import env  # noqa: E402,F401 (a store and a small tree beside it)


def _peak_of_stream(view, path: str) -> tuple[int, int]:
    """(bytes streamed, peak traced memory while streaming them)."""
    tracemalloc.start()
    try:
        n = 0
        for chunk in view.stream(path):
            n += len(chunk)
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _big_file_and_a_commit(store, root: str):
    """A sparse BIG file in the tree, the tree registered and one commit changing a.txt;
    (workspace, that commit's transaction)."""
    with open(os.path.join(root, "big"), "wb") as f:
        f.truncate(BIG)
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a.txt", "b\n")
    return ws, tx


def test_stream_of_a_file_walstore_never_changed_is_not_read_whole(env):
    store, root = env
    ws, tx = _big_file_and_a_commit(store, root)
    n, peak = _peak_of_stream(store.at(tx.id).files(ws), "big")
    assert n == BIG
    assert peak < 16 << 20, f"streaming held {peak >> 20} MiB"


def test_stream_of_a_file_an_open_transaction_changed_is_not_read_whole(env):
    store, root = env
    ws, tx = _big_file_and_a_commit(store, root)
    point = tx.id
    open_tx = store.transaction()
    try:
        open_tx.files(ws).write("big", "small now\n")  # uncommitted: the point reads
        view = store.at(point).files(ws)              # its before-image
        assert view.entry("big").size == BIG
        n, peak = _peak_of_stream(view, "big")
        assert n == BIG
        assert peak < 16 << 20, f"streaming held {peak >> 20} MiB"
    finally:
        open_tx.rollback()


def test_stream_of_content_missing_from_the_store_is_a_corruption_error(env, tmp_path):
    store, root = env
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a.txt", "walstore's own\n")
    for blob in glob.glob(str(tmp_path / "store" / "files" / "blobs" / "??" / "*")):
        os.unlink(blob)
    view = store.at(tx.id).files(ws)
    with pytest.raises(walstore.CorruptionError):
        view.read("a.txt")
    with pytest.raises(walstore.CorruptionError) as info:
        list(view.stream("a.txt"))
    assert "a.txt" in str(info.value)


def test_a_conflict_under_a_path_kept_as_a_file_is_kept_too(env, tmp_path):
    """The rollback meets ``a`` (once walstore's file) as a stranger's directory first and
    keeps walstore's file at ``tx<N>/a``; then ``a/b`` changed by the stranger too: its
    copy needs a directory ``tx<N>/a``."""
    store, root = env
    os.makedirs(os.path.join(root, "a"))
    with open(os.path.join(root, "a", "b"), "w") as f:
        f.write("old")
    ws = store.workspace(root)
    tx = store.transaction()
    f = tx.files(ws)
    f.write("a/b", "new")
    f.rmtree("a")
    f.write("a", "A")
    f.write("a", "A2")
    os.unlink(os.path.join(root, "a"))  # another process: a directory (of another mode)
    os.mkdir(os.path.join(root, "a"), 0o700)
    with open(os.path.join(root, "a", "b"), "w") as out:
        out.write("S")
    with pytest.raises(walstore.FileConflictError) as info:
        tx.rollback()
    assert "could not be restored" not in str(info.value), str(info.value)
    kept = {}
    for c in store.file_conflicts():
        if c["saved_as"] and os.path.isfile(c["saved_as"]):
            with open(c["saved_as"], "rb") as saved:
                kept.setdefault(c["path"][len(root) + 1:], set()).add(saved.read())
    # (audit 58: one conflict per path, keeping the version the rollback would have put
    # back — ``a`` was a directory holding ``b`` = "old" — not the transaction's own
    # uncommitted "A" and "new" as well)
    assert kept == {"a/b": {b"old"}}, kept
    assert sorted(c["path"][len(root) + 1:] for c in store.file_conflicts()) == ["a", "a/b"]
    # the stranger's versions stay; nothing is owed to the next open
    with open(os.path.join(root, "a", "b"), "rb") as now:
        assert now.read() == b"S"
    store.close()
    again = walstore.open(str(tmp_path / "store"))
    try:
        report = again.last_recovery
        assert report is None or not [p for p in report.problems
                                      if p.kind == "file-undo-failed"], report.problems
    finally:
        again.close()


def _replace_dir_by(root: str, how: str) -> None:
    """Another process: directory ``a`` becomes a file, or a symlink leading outside."""
    shutil.rmtree(os.path.join(root, "a"))
    if how == "file":
        with open(os.path.join(root, "a"), "w") as out:
            out.write("theirs")
    else:
        os.symlink("/tmp", os.path.join(root, "a"))


def _kept_copies(conflicts: list, root: str) -> dict:
    out = {}
    for c in conflicts:
        saved = c["saved_as"]
        rel = c["path"][len(root) + 1:]
        if saved is not None and os.path.isfile(saved) and not os.path.islink(saved):
            with open(saved, "rb") as f:
                out.setdefault(rel, set()).add(f.read())
        else:
            out.setdefault(rel, set()).add(saved)
    return out


@pytest.mark.parametrize("how", ["file", "symlink"])
def test_rollback_keeps_walstores_version_of_a_path_it_cannot_reach(env, how):
    store, root = env
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a/b", "committed\n")
    tx = store.transaction()
    tx.files(ws).write("a/b", "uncommitted\n")
    _replace_dir_by(root, how)
    with pytest.raises(walstore.FileConflictError):
        tx.rollback()
    assert _kept_copies(store.file_conflicts(), root) == {"a/b": {b"committed\n"}}
    assert os.path.islink(os.path.join(root, "a")) == (how == "symlink")  # theirs stays


def _child_env() -> dict:
    """The child imports the walstore this process runs (``-c`` puts the working
    directory first on its path: each child runs in its test's own directory)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _killed_when_ready(script: str, path: str, root: str, cwd) -> None:
    """Run ``script`` (a child writer of the store at ``path``, workspace ``root``) in its
    test's directory and kill -9 it once it prints "ready"."""
    child = subprocess.Popen([sys.executable, "-c", script, path, root],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=_child_env(), cwd=str(cwd))
    try:
        assert child.stdout.readline().strip() == b"ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


CHILD = """
import sys, walstore
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2])
tx = store.transaction()
tx.files(ws).write("a/b", "uncommitted\\n")
print("ready", flush=True)
sys.stdin.read()
"""


def test_recovery_keeps_walstores_version_of_a_path_it_cannot_reach(env, tmp_path):
    store, root = env
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("a/b", "committed\n")
    store.close()
    path = str(tmp_path / "store")
    _killed_when_ready(CHILD, path, root, tmp_path)
    _replace_dir_by(root, "file")
    again = walstore.open(path)
    try:
        kinds = [p.kind for p in again.last_recovery.problems]
        assert "file-conflict" in kinds and "file-undo-failed" not in kinds, kinds
        assert _kept_copies(again.file_conflicts(), root) == {"a/b": {b"committed\n"}}
    finally:
        again.close()


def test_listdir_keeps_a_symlink_a_directory_only_pattern_does_not_match(env):
    store, root = env
    os.mkdir(os.path.join(root, "real"))
    os.symlink("real", os.path.join(root, "build"))
    os.mkdir(os.path.join(root, "out"))
    ws = store.workspace(root, ignore=["build/", "out/"])
    with store.transaction() as tx:
        f = tx.files(ws)
        assert f.listdir() == ["a.txt", "build", "d", "real"]  # (git: the same)
        with f.watch() as w:  # and the watch tracks it
            os.unlink(os.path.join(root, "build"))
            os.symlink("d", os.path.join(root, "build"))
    assert [c.path for c in w.changes] == [b"build"]


def test_the_quarantine_directories_a_conflict_makes_are_durable(env, tmp_path):
    from tools.faults import installed
    from tools.powerloss import TreeRecorder
    store, root = env
    ws = store.workspace(root)
    tx = store.transaction()
    tx.files(ws).write("d/x", "walstore's\n")
    with open(os.path.join(root, "d", "x"), "w") as out:
        out.write("theirs\n")  # another process
    rec = TreeRecorder(record=True)
    with installed(rec), pytest.raises(walstore.FileConflictError):
        tx.rollback()
    quarantine = os.path.realpath(str(tmp_path / "store" / "quarantine"))
    made = [e for e in rec.events if e.op == "mkdir"
            and (e.path == quarantine or e.path.startswith(quarantine + "/"))]
    assert made, [(e.op, e.path) for e in rec.events]
    for m in made:
        parent = os.path.dirname(m.path)
        assert [e for e in rec.events if e.op == "fsync_dir" and e.path == parent
                and e.seq > m.seq and e.done_seq is not None], \
            f"{m.path} made, its directory {parent} never fsynced after"
    saved = store.file_conflicts()[0]["saved_as"]
    assert saved.startswith(quarantine + "/")


@pytest.mark.parametrize("who", ["the watched process", "another process later"])
@pytest.mark.parametrize("how", ["revert", "rewind"])
def test_a_fifo_where_a_reverted_transaction_left_a_path(env, who, how):
    store, root = env
    ws = store.workspace(root)
    p = os.path.join(root, "a.txt")
    with store.transaction() as before:
        before.put("k", 0)
    with store.transaction() as tx:
        if who == "the watched process":
            with tx.files(ws).watch():
                os.unlink(p)
                os.mkfifo(p)
        else:
            tx.files(ws).write("a.txt", "walstore's\n")
    if who != "the watched process":
        os.unlink(p)
        os.mkfifo(p)

    def undo(**kw):
        return store.revert(tx.id, **kw) if how == "revert" else store.rewind(before.id, **kw)
    with pytest.raises(walstore.RevertConflict) as info:
        undo()
    assert info.value.paths == [p]
    assert stat.S_ISFIFO(os.lstat(p).st_mode)  # nothing changed
    undo(force=True)
    with open(p, "rb") as f:
        assert f.read() == b"aaa\n"


WATCH_CHILD = """
import os, sys, walstore
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2])
tx = store.transaction()
with tx.files(ws).watch():
    p = os.path.join(sys.argv[2], "a.txt")
    os.unlink(p)
    os.mkfifo(p)
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_recovery_of_a_crashed_watch_puts_a_file_back_over_the_fifo_it_left(env, tmp_path):
    store, root = env
    store.workspace(root)
    store.close()
    path = str(tmp_path / "store")
    _killed_when_ready(WATCH_CHILD, path, root, tmp_path)
    again = walstore.open(path)
    try:
        kinds = [p.kind for p in again.last_recovery.problems]
        assert "file-conflict" not in kinds, again.last_recovery.problems
        with open(os.path.join(root, "a.txt"), "rb") as f:
            assert f.read() == b"aaa\n"
    finally:
        again.close()


def test_a_forced_revert_removes_a_created_directory_holding_a_fifo(env):
    store, root = env
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("made/f", "walstore's\n")
    os.mkfifo(os.path.join(root, "made", "fifo"))  # other processes
    with open(os.path.join(root, "made", "theirs"), "w") as out:
        out.write("theirs\n")
    with pytest.raises(walstore.RevertConflict) as info:
        store.revert(tx.id)
    assert info.value.paths == [os.path.join(root, "made")]
    store.revert(tx.id, force=True)
    assert not os.path.lexists(os.path.join(root, "made"))


def test_rollback_of_a_watch_removes_a_directory_it_made_with_a_socket_in_it(env):
    store, root = env
    ws = store.workspace(root)
    from files_support import tree_state
    pre = tree_state(root)
    tx = store.transaction()
    with tx.files(ws).watch() as w:  # the block: a test run making a server's socket
        os.makedirs(os.path.join(root, "run", "deep"))
        with open(os.path.join(root, "run", "log"), "w") as out:
            out.write("started\n")
        os.mkfifo(os.path.join(root, "run", "deep", "fifo"))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(root, "run", "server.sock"))
        sock.close()
    assert sorted(c.path for c in w.changes) == [b"run", b"run/deep", b"run/log"]
    tx.rollback()  # no FileConflictError
    assert tree_state(root) == pre


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files of another owner")
@pytest.mark.parametrize("mode", [None, 0o4755])
def test_a_write_as_root_keeps_the_files_owner(env, mode):
    store, root = env
    p = os.path.join(root, "tool")
    with open(p, "w") as out:
        out.write("#!/bin/sh\n")
    os.chown(p, 4321, 4321)
    os.chmod(p, 0o4750)  # setuid to its owner, 4321
    ws = store.workspace(root)
    with store.transaction() as tx:
        tx.files(ws).write("tool", "#!/bin/sh\necho changed\n", mode=mode)
    st = os.lstat(p)
    assert (st.st_uid, st.st_gid) == (4321, 4321)
    assert not (st.st_uid == 0 and st.st_mode & stat.S_ISUID)
    assert stat.S_IMODE(st.st_mode) == (mode if mode is not None else 0o4750)


def test_new_files_follow_the_umask_set_after_the_first_one(env):
    store, root = env
    ws = store.workspace(root)
    old = os.umask(0o022)
    try:
        with store.transaction() as tx:
            tx.files(ws).write("public.txt", "hello\n")
        os.umask(0o077)  # from now on: private
        with store.transaction() as tx:
            tx.files(ws).write("secret/key.txt", "hunter2\n")
            tx.files(ws).mkdir("private")
    finally:
        os.umask(old)
    mode = lambda rel: stat.S_IMODE(os.lstat(os.path.join(root, rel)).st_mode)  # noqa: E731
    assert mode("public.txt") == 0o644
    assert (mode("secret"), mode("secret/key.txt"), mode("private")) == (0o700, 0o600, 0o700)


CONFLICT_CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from agent_scripts.files_child import Stopper
import walstore
from walstore import fileio
spec = json.loads(sys.argv[1])
stopper = Stopper(spec["stop"])
fileio.set_backend(stopper)
store = walstore.open(spec["store"], apply_interval=3600)
ws = store.workspace(spec["ws"])
root = spec["ws"]
tx = store.transaction()
f = tx.files(ws)
f.write("a/b", "new")
f.rmtree("a")
f.write("a", "A")
f.write("a", "A2")
f.write("d/x", "mine")
f.write("e/y", "mine")
os.unlink(os.path.join(root, "a"))          # other processes, meanwhile
os.mkdir(os.path.join(root, "a"), 0o700)
open(os.path.join(root, "a", "b"), "w").write("S")
open(os.path.join(root, "d", "x"), "w").write("theirs")
os.rename(os.path.join(root, "e"), os.path.join(root, "e.moved"))
open(os.path.join(root, "e"), "w").write("a file now")
stopper.armed = True
try:
    tx.rollback()
except walstore.FileConflictError:
    pass
print("CALLS", stopper.n, flush=True)
os._exit(0)
"""


def _conflict_run(base, stop: int) -> tuple[str, str, str | None, int | None]:
    root = base / "ws"
    build(str(root), {"a/b": "old", "d/x": "x\n", "e/y": "y\n", "keep": "k\n"})
    store = str(base / "store")
    walstore.open(store).close()
    tests = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen([sys.executable, "-c", CONFLICT_CHILD,
                              json.dumps({"store": store, "ws": str(root), "stop": stop}),
                              tests], stdout=subprocess.PIPE, env=_child_env(), cwd=str(base))
    try:
        line = child.stdout.readline().decode()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    calls = int(line.split()[1]) if line.startswith("CALLS") else None
    return store, str(root), line, calls


def _check_after(store: str, root: str, what: str) -> None:
    """Reopened: the other processes' versions stay, the rest is back, and every
    conflict's copy of walstore's version is where it says, with that content."""
    import hashlib
    s = walstore.open(store)
    try:
        problems = s.last_recovery.problems if s.last_recovery else []
        assert not [p for p in problems if p.kind == "file-undo-failed"], (what, problems)
        conflicts = s.file_conflicts()
    finally:
        s.close()
    from files_support import tree_state
    tree = tree_state(root)
    assert tree[b"a"][:2] == ("dir", 0o700) and tree[b"d/x"][2] == len(b"theirs"), what
    assert tree[b"e"][0] == "file" and tree[b"e.moved/y"][2] == len(b"mine"), what
    assert tree[b"keep"][2] == len(b"k\n"), what
    paths = {c["path"][len(root) + 1:] for c in conflicts}
    assert {"a", "a/b", "d/x", "e/y"} <= paths, (what, paths)
    for c in conflicts:
        if c["saved_as"] is None or not c["before"].startswith("file"):
            continue
        with open(c["saved_as"], "rb") as saved:
            got = hashlib.sha256(saved.read()).hexdigest()
        assert c["before"].split("sha256:")[1] == got[:12], (what, c)


def test_kill_at_every_step_of_a_rollback_that_keeps_conflicts_aside(tmp_path):
    """A rollback meeting other processes' versions (one kept at a path a later copy's
    directory needs, one path unreachable under a file): killed before any I/O call of
    it, the next open finishes, keeps their versions and walstore's copies, and owes
    nothing."""
    store, root, line, calls = _conflict_run(tmp_path / "count", 0)
    assert calls and calls > 10, line
    _check_after(store, root, "undisturbed")
    for n in range(1, calls + 1, 1 if calls <= 60 else 2):
        store, root, line, _ = _conflict_run(tmp_path / f"k{n}", n)
        assert line.startswith("STOP"), (n, line)
        _check_after(store, root, f"killed before call {n} ({line.strip()})")
