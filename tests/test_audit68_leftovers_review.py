"""Review of audit 68's fixes (tests/test_audit68_leftovers.py): what their changes still
got wrong, each found by a test here that failed before its fix.

1. walstore/engine/lmdb_state.py: a lock-free read-only open (a store whose LMDB lock file
   this user may not write) that failed after LMDB opened (its tables damaged) kept the
   store's writer lock held shared for the life of the process: every writer refused.
2. walstore/engine/layout.py: a writer refused because such a reader holds the writer
   lock shared was told "locked by another process", naming no reader and no way out.
3. walstore/cli/agent.py: `walstore revert` / `rewind` of an action whose compensator is
   not registered printed, besides its own table of what is owed, Python's raw
   RuntimeWarning: a source file and line, and the Python API's advice
   (``store.retry_compensations()``), not the command line's.
4. walstore/ops/backup.py ``what_dest_holds``: a backup or restore into a directory
   holding a store a writer has open (a live store, no copy cut off) advised "remove it
   and run the backup again".
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import walstore
from store_support import cli_env, without_root_privilege
from test_audit68_leftovers import _modes, shared_dir  # noqa: F401  (a fixture)


def _as_non_writer(code: str, *args: str) -> subprocess.Popen:
    """``code`` run by ``python -c`` as root without the capabilities that override mode
    bits (store_support.without_root_privilege), output piped."""
    if os.getuid() != 0:
        pytest.skip("needs a writer who may write what the reader may not (run as root)")
    return subprocess.Popen(
        without_root_privilege() + [sys.executable, "-c", code, *args], env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def _readable_store(shared_dir: str) -> str:
    """A store with one key, its files 0444 and directories 0555: a reader held to the
    mode bits reads it but may not write LMDB's lock file (a lock-free read-only open)."""
    path = os.path.join(shared_dir, "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", "VALUE-A")
    _modes(path, 0o444, 0o555)
    return path


# a read-only open held to the mode bits: its outcome, then it stays alive a while (the process lives)
OPEN_THEN_LIVE = (
    "import sys, time, walstore\n"
    "try:\n"
    "    s = walstore.open(sys.argv[1], readonly=True)\n"
    "    print('OPENED', s.get('a'), flush=True)\n"
    "    if sys.argv[2] == 'close':\n"
    "        s.close()\n"
    "        print('CLOSED', flush=True)\n"
    "except walstore.WalstoreError as e:\n"
    "    print('REFUSED', type(e).__name__, flush=True)\n"
    "time.sleep(float(sys.argv[3]))\n")


def test_writer_lock_is_let_go_by_a_lock_free_open_that_failed(shared_dir):
    """Before: a read-only open as a user who may not write ``db/lock.mdb`` whose LMDB
    tables do not open (CorruptionError, "not a walstore state") kept the writer lock
    held shared: while that process lived (a verifier, a dashboard), every writer's open
    was refused "locked by another process"."""
    import lmdb
    path = _readable_store(shared_dir)
    env = lmdb.open(os.path.join(path, "db"), max_dbs=32, subdir=True)
    try:  # (one named table made a plain row: its open is MDB_INCOMPATIBLE)
        with env.begin(write=True) as t:
            t.drop(env.open_db(b"fconflicts", txn=t), delete=True)
        with env.begin(write=True) as t:
            t.put(b"fconflicts", b"x")
    finally:
        env.close()
    _modes(path, 0o444, 0o555)
    reader = _as_non_writer(OPEN_THEN_LIVE, path, "keep", "5")
    try:
        assert reader.stdout.readline().split() == ["REFUSED", "CorruptionError"]
        with pytest.raises(walstore.CorruptionError):  # (the writer's own refusal: the
            walstore.open(path)                         # damage, not a lock)
    finally:
        reader.kill()
        reader.wait(timeout=30)
        _modes(path, 0o600, 0o700)


def test_writer_refused_by_a_lock_free_reader_is_told_who_holds_it(shared_dir):
    """Before: "store ... is locked by another process", though no writer runs: the lock
    is held shared by a read-only open reading without LMDB's lock file.  Now the
    refusal says so and when the writer may open it."""
    path = _readable_store(shared_dir)
    reader = _as_non_writer(OPEN_THEN_LIVE, path, "keep", "5")
    try:
        assert reader.stdout.readline().split() == ["OPENED", "VALUE-A"]
        with pytest.raises(walstore.StoreLocked) as e:
            walstore.open(path)
        said = str(e.value)
        assert "read-only" in said and "db/lock.mdb" in said and "closed" in said, said
        assert e.value.pid is None  # (no writer to name)
    finally:
        reader.kill()
        reader.wait(timeout=30)
        _modes(path, 0o600, 0o700)


@pytest.mark.parametrize("verb", ["revert", "rewind"])
def test_undo_on_the_command_line_says_what_is_owed_in_its_own_words(tmp_path, verb):
    """Before: stderr held "<walstore>/cli/agent.py:52: RuntimeWarning: the undo committed
    ... store.retry_compensations() runs them ..." and the source line under it, on top of
    the command's own table (--handlers, `walstore resolve`).  Now only the table."""
    from test_audit48_cli import run_cli
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("base", 0)
        s.restore_point("p")
        with s.transaction() as tx:
            tx.put("order", 1)
            with tx.action("charge", args={"n": 1}, compensate="refund-unregistered"):
                pass
    args = [path, str(tx.id)] if verb == "revert" else [path, "--to", "p"]
    r = run_cli(verb, *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert "pending compensations" in out and "refund-unregistered" in out, out
    assert "RuntimeWarning" not in out and "store.retry_compensations()" not in out, out
    with walstore.open(path, readonly=True) as s:  # (the undo committed all the same)
        assert s.get("order") is None and [a.state for a in s.actions()] == ["pending"]


@pytest.mark.parametrize("verb", ["backup", "restore"])
def test_a_dest_holding_a_live_store_is_never_advised_removed(tmp_path, verb):
    """Before: `walstore backup SRC DEST` with DEST a store a writer has open said "it
    holds a walstore store, which opens (perhaps the complete copy of a backup cut off
    ...): check it ... or remove it and run the backup again" — advice to delete a live
    store.  Now it says a writer has it open and to choose another destination."""
    from test_audit48_cli import run_cli
    src = str(tmp_path / "src")
    with walstore.open(src) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    if verb == "restore":
        r = run_cli("replicate", src, (tmp_path / "rep").as_uri(), "--once")
        assert r.returncode == 0, r.stderr
        src = (tmp_path / "rep").as_uri()
    dest = str(tmp_path / "live")
    with walstore.open(dest) as live:  # (a writer holds DEST while the copy is asked for)
        with live.transaction() as tx:
            tx.put("mine", 1)
        r = run_cli(verb, src, dest)
        assert r.returncode == 2, (r.returncode, r.stderr)
        line = r.stderr.strip()
        assert "remove it" not in line and "a writer has it open" in line, line
        assert live.get("mine") == 1
