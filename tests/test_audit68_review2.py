"""Second review of audit 68's fixes, and the small leftovers the reviews noticed: each
found by a test here that failed before its fix.

1. walstore/engine/layout.py ``ProcessLock``: a writer refused at once by a live writer,
   which closed the store right then, was told the store "is being read by a read-only
   open that may not use its LMDB lock file" (no such reader anywhere): the holder was
   judged again after the refusal, and by then nothing held the lock exclusive.
2. walstore/agent/files.py ``_abandon_watch`` (a watched process made a path too long for
   the file history, or changed one another live transaction holds): the put-back left
   the special files (FIFO, socket) the block made, so a directory holding one stayed,
   reported "changed again since the block ended".
3. walstore/agent/actions.py: the "store cannot record any more" message said the reopen
   puts back every change made in a watch()'s workspace since the block began "by anyone";
   it leaves a path a transaction committed since.
4. walstore/engine/lmdb_state.py: the lock-free read-only open (a store whose LMDB lock
   file this user may not write) did not retry with a smaller map under an address-space
   limit (``ulimit -v``), as every other open does.
5. walstore/ops/backup.py ``what_dest_holds``: a DEST holding a store that does not open
   (a newer walstore's, damaged) was advised "remove it and run the backup again", with
   no word that it may be a store someone keeps.
6. walstore/engine/engine.py: a store whose WAL segment is a FIFO was said to have "the WAL
   ends by LSN 0 but LMDB is applied up to 62" (acknowledged records missing).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

import walstore
from store_support import cli_env
from tests.test_audit67_durable_events import OPTS, workspace_with
from test_audit68_leftovers import _modes, shared_dir  # noqa: F401  (a fixture)
from test_audit68_leftovers_review import _as_non_writer, _readable_store
from tools.faults import FaultBackend, installed


# ---- 1. ProcessLock: a writer that closes right after refusing another -------------------
WRITER_UNTIL_TOLD = (
    "import sys, walstore\n"
    "s = walstore.open(sys.argv[1])\n"
    "print('READY', flush=True)\n"
    "sys.stdin.readline()\n"
    "s.close()\n")


def test_writer_refused_by_a_writer_closing_then_is_not_told_of_a_reader(tmp_path, monkeypatch):
    """A second writer's open is refused at once (a live writer holds the lock), and the
    first writer closes the store right after.  Before the fix the refusal judged the
    holder again, found no exclusive one, and said the store "is being read by a read-only
    open that may not use its LMDB lock file" — there is no reader; now it names the
    writer that refused it."""
    from walstore.engine import layout
    path = str(tmp_path / "s")
    walstore.open(path).close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER_UNTIL_TOLD, path], env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "READY"
        take = layout.ProcessLock._take

        def take_then_the_writer_closes(self):
            try:
                take(self)
            except OSError:
                writer.stdin.write("close\n")
                writer.stdin.flush()
                writer.wait(timeout=30)  # (its lock is gone before the refusal is judged)
                raise

        monkeypatch.setattr(layout.ProcessLock, "_take", take_then_the_writer_closes)
        with pytest.raises(walstore.StoreLocked) as e:
            walstore.open(path)
        said = str(e.value)
        assert "read-only" not in said and f"process {writer.pid}" in said, said
        assert e.value.pid == writer.pid
    finally:
        writer.kill()
        writer.wait(timeout=30)


# ---- 2. _abandon_watch: the special files the block left ---------------------------------
def test_watch_put_back_for_an_overlong_path_removes_the_special_files_it_left(tmp_path):
    """The block makes d/ holding d/x and a FIFO d/p, and a path too long for the file
    history: none of its changes becomes the transaction's, they are put back at once.
    Before the fix the FIFO stayed, so d/ could not be removed: the error said "1 path(s)
    changed again since the block ended were left as they are: d" (no one changed it), d/
    stayed, and the rollback found it changed behind walstore's back.  Now d/ goes too."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    tx = s.transaction()
    with pytest.raises(ValueError, match="too long") as e:
        with tx.files(ws).watch():
            (root / "d").mkdir()
            (root / "d" / "x").write_text("x\n")
            os.mkfifo(root / "d" / "p")
            deep = root / ("L" * 200) / ("M" * 200)
            deep.mkdir(parents=True)
            (deep / ("N" * 120)).write_text("long\n")
    assert "changed again" not in str(e.value), str(e.value)
    tx.rollback()
    assert sorted(p.name for p in root.iterdir()) == ["a.txt"]
    assert s.file_conflicts() == []
    s.close()


# ---- 3. the "cannot record any more" message of a watch ----------------------------------
def test_store_that_cannot_record_says_a_watch_reopen_keeps_paths_committed_since(tmp_path):
    """A watch()'s WATCH_BEGIN fsync fails: the store cannot record any more.  Before the
    fix the rollback said every change made in the workspace since the block began, "by
    anyone", is put back by the reopen — which leaves a path a transaction committed
    since (``_undo_open_watch``'s ``began``).  Now it says so."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = FaultBackend()
    with installed(fb), pytest.raises(walstore.ReadOnlyError) as raised:
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.fail("fdatasync", errno.EIO, path="*.wal")
            with f.watch():
                pass
    said = str(raised.value)
    assert "put back" in said and "committed since" in said, said
    s.close()


# ---- 4. the lock-free read-only open under an address-space limit ------------------------
UNDER_ULIMIT_V = (
    "import resource, sys\n"
    "lim = 3 << 30\n"
    "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
    "import walstore\n"
    "try:\n"
    "    with walstore.open(sys.argv[1], readonly=True) as s:\n"
    "        print('READ', s.get('a'), flush=True)\n"
    "except walstore.WalstoreError as e:\n"
    "    print('REFUSED', type(e).__name__, e, flush=True)\n")


def test_lock_free_read_only_open_retries_with_a_smaller_map_under_ulimit_v(shared_dir):
    """Before: a read-only open as a user who may not write ``db/lock.mdb`` (LMDB read
    without its lock file) under ``ulimit -v`` failed "cannot open the LMDB environment:
    Cannot allocate memory", where every other open retries with a smaller map."""
    path = _readable_store(shared_dir)
    try:
        reader = _as_non_writer(UNDER_ULIMIT_V, path)
        out, err = reader.communicate(timeout=60)
        assert out.split()[:2] == ["READ", "VALUE-A"], (out, err)
    finally:
        _modes(path, 0o600, 0o700)


# ---- 5. a DEST holding a store that does not open ----------------------------------------
def _source_of(verb: str, tmp_path, run_cli) -> str:
    """What `walstore VERB SRC DEST` copies: a store of one key (backup), or its replica's
    URL (restore)."""
    src = str(tmp_path / "src")
    with walstore.open(src) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    if verb == "backup":
        return src
    r = run_cli("replicate", src, (tmp_path / "rep").as_uri(), "--once")
    assert r.returncode == 0, r.stderr
    return (tmp_path / "rep").as_uri()


@pytest.mark.parametrize("verb", ["backup", "restore"])
def test_a_dest_holding_a_store_that_does_not_open_is_not_advised_removed_bare(tmp_path, verb):
    """DEST holds a store a newer walstore wrote (STORE's version 99).  Before the fix:
    "... that does not open (...); remove it and run the backup again" — advice to delete
    what may be someone's only copy.  Now removing it is advised only if it is no store
    one keeps, and keeping it (another destination) first."""
    from test_audit48_cli import run_cli
    src = _source_of(verb, tmp_path, run_cli)
    dest = str(tmp_path / "newer")
    walstore.open(dest).close()
    ident = os.path.join(dest, "STORE")
    with open(ident) as f:
        doc = json.load(f)
    with open(ident, "w") as f:
        json.dump(dict(doc, version=99), f)
    r = run_cli(verb, src, dest)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert "newer walstore" in line and "another destination" in line, line
    assert "remove it" in line and "no store you keep" in line, line
    assert line.index("no store you keep") < line.index("remove it"), line


# ---- 6. a WAL segment that is a FIFO -------------------------------------------------------
def test_a_wal_segment_that_is_a_fifo_is_named_not_called_missing_records(tmp_path):
    """Before: "the WAL ends by LSN 0 but LMDB is applied up to 62: acknowledged log
    records are missing" — the segment, a FIFO, was never read (its size, 0, taken for
    where the log ends); `walstore backup` into it said the same.  Now it says the
    segment is not a regular file, naming it."""
    from test_audit48_cli import run_cli
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    seg = os.path.join(path, "wal", sorted(n for n in os.listdir(os.path.join(path, "wal"))
                                           if n.endswith(".wal"))[0])
    os.unlink(seg)
    os.mkfifo(seg, 0o600)
    with pytest.raises(walstore.CorruptionError) as e:
        walstore.open(path, readonly=True)
    said = str(e.value)
    assert "not a regular file" in said and os.path.basename(seg) in said, said
    assert "applied up to" not in said, said
    src = str(tmp_path / "src")
    walstore.open(src).close()
    r = run_cli("backup", src, path)
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
    assert "applied up to" not in r.stderr, r.stderr


KILLED_WRITER = (
    "import os, sys, walstore\n"
    "s = walstore.open(sys.argv[1])\n"
    "with s.transaction() as tx:\n"
    "    tx.put('mine', 1)\n"
    "os.kill(os.getpid(), 9)\n")


def test_a_dest_holding_a_crashed_writers_store_is_not_called_a_cut_off_copy(tmp_path):
    """DEST is a store whose writer was killed (kill -9): it owes its recovery.  Before
    the fix the note said why a store owes one as "a backup cut off once its copy was in
    place leaves one" — of someone's own store — and advised removing it.  Now a writer
    that crashed is named first, removal only if it is no store one keeps."""
    from test_audit48_cli import run_cli
    src = str(tmp_path / "src")
    walstore.open(src).close()
    dest = str(tmp_path / "crashed")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, dest], env=cli_env(),
                            timeout=60)
    assert killed.returncode == -9
    r = run_cli("backup", src, dest)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert "owes its recovery" in line and "a writer that crashed" in line, line
    assert line.index("no store you keep") < line.index("remove it"), line
    with walstore.open(dest) as s:  # (kept, recovered: the commit stands)
        assert s.get("mine") == 1



# ---- 7. the lock-free read-only open interrupted anywhere ----------------------------------
# (a profile hook raises KeyboardInterrupt at the k-th point a signal handler could run,
# as tests/test_interrupt_points.py, from the writer lock's hold until LmdbState's
# __init__ returns; after each, is the writer lock still held by this process?)
INTERRUPTED_LOCK_FREE_OPENS = """
import sys, os, fcntl, signal, threading
import walstore
from walstore.engine.lmdb_state import LmdbState, _let_go
from walstore.engine import layout
import walstore.signals as S
path = sys.argv[1]
MAIN = threading.get_ident()
at = {"k": -1, "n": 0, "where": None, "armed": False}

def hook(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "_hold_out_writers" and at["k"] >= 0:
        at["armed"] = True  # (its call: inside a deferred section once fixed)
    if at["k"] < 0 or at["where"] or threading.get_ident() != MAIN or S._DEFERRED.depth:
        return
    co = frame.f_code
    if not at["armed"]:
        return
    if event == "return" and co.co_name == "__init__" and isinstance(
            frame.f_locals.get("self"), LmdbState):
        at["armed"] = False
        at["k"] = -1
        return
    if event not in ("call", "c_return") or signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return
    if at["n"] == at["k"]:
        at["where"] = f"{event} {co.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {co.co_name}"
        raise KeyboardInterrupt(at["where"])
    at["n"] += 1

def open_close():
    s = walstore.open(path, readonly=True)
    s.get("a")
    s.close()

k = 0
leaks = 0
while True:
    at.update(k=k, n=0, where=None, armed=False)
    sys.setprofile(hook)
    try:
        open_close()
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
        at["k"] = -1
    where = at["where"]
    fd = os.open(os.path.join(path, "LOCK"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        held = False
    except OSError:
        held = True
    os.close(fd)
    reg = bool(LmdbState._registry)
    if held or reg:
        leaks += 1
        print("LEAK", k, where, "lock-held" if held else "", "registry" if reg else "", flush=True)
        for sh in list(LmdbState._registry.values()):
            try: sh["env"].close()
            except Exception: pass
            _let_go(sh.get("held_out"))
        LmdbState._registry.clear()
        for f in list(layout._HELD_FLOCKS):
            try: os.close(f)
            except OSError: pass
        layout._HELD_FLOCKS.clear()
    if where is None:
        break
    k += 1
print("POINTS", k, "LEAKS", leaks, flush=True)
"""


def test_writer_lock_is_let_go_by_a_lock_free_open_interrupted_anywhere(shared_dir):
    """An interrupt (Ctrl-C) at any point of a lock-free read-only open from the moment it
    holds the writer lock shared until the open returns.  Before the fix 31 of 167 points
    kept the lock held (and at some the environment registered, no handle to close it)
    for the life of the process — in a notebook or a service that survives a Ctrl-C,
    every writer refused: between the flock and its note, while the environment's entry
    was built, between the registration and the handle's."""
    path = _readable_store(shared_dir)
    try:
        reader = _as_non_writer(INTERRUPTED_LOCK_FREE_OPENS, path)
        out, err = reader.communicate(timeout=120)
        last = out.strip().splitlines()[-1:] or [""]
        leaks = [line for line in out.splitlines() if line.startswith("LEAK")]
        assert last[0].startswith("POINTS") and not leaks, (leaks[:5], last, err[-2000:])
        assert int(last[0].split()[1]) > 50, last  # (the sweep reached past the open)
    finally:
        _modes(path, 0o600, 0o700)
