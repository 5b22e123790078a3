"""Audit 68: the defects stop 67's closing note left alone, each fixed, its test below.

1. walstore/integrations/openai_agents.py: ``WalstoreSession.erase()`` dropped the
   session's restore points before it purged; a purge that failed (a full disk at its
   commit) left the points gone and the items still there.
2. walstore/integrations/langgraph/saver.py: ``copy_thread``'s docstring said a copy cut
   short holds checkpoints "each complete"; the newest copied one lacks its pending writes.
3. walstore/integrations/langgraph/store.py: a TTL renewal on read that failed was
   swallowed without a word.
4. walstore/engine/lmdb_state.py: read-only verbs on a store this user may not write
   (files 0400, directories 0500) failed "cannot open the LMDB environment: Permission
   denied" (LMDB's lock file); now read without it while no writer can run.
5. walstore/ops/backup.py, walstore/replication/restore.py: a backup or restore killed
   once its complete copy was in place, run again, was refused "exists and is not empty"
   with no word that DEST holds a store.
6. walstore/ops/backup.py: a backup into a directory it may not write said "the partial
   copy was removed" when no copy had been made.
7. walstore/agent/undo.py: a rewind left out of its ``reverts`` a transaction whose keys
   later undone ones overwrote; a later revert of it advised "use cascade".
"""
from __future__ import annotations

import asyncio
import errno
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402


class FailingPurgeCommit(FaultBackend):
    """A disk that fills exactly at the purge's commit record: a WAL write carrying the
    purge's range fails with ENOSPC (every other write goes through)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    def pwrite(self, fd: int, data, offset: int) -> int:
        if b"purge_range" in bytes(data) and str(self.path_of(fd)).endswith(".wal"):
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path_of(fd))
        return super().pwrite(fd, data, offset)


# ---- 1. WalstoreSession.erase() -------------------------------------------------------------
def test_erase_that_fails_keeps_the_session_whole_and_a_retry_finishes(tmp_path):
    """Before: erase() dropped the restore points first; a purge failing at its commit
    (ENOSPC) left the session's items there and its restore points gone (a rewind to
    them impossible though nothing was erased)."""
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession
    path = str(tmp_path / "s")
    item = {"role": "user", "content": "ITEMMARKER"}

    async def go():
        store = walstore.open(path)
        s = WalstoreSession("u1", store)
        await s.add_items([item])
        await s.restore_point("before-POINTMARKER")
        fb = FailingPurgeCommit()
        with installed(fb):
            with pytest.raises(walstore.WalstoreError):
                await s.erase()
        assert fb.failed >= 1
        store.close()
        store = walstore.open(path)
        s = WalstoreSession("u1", store)
        assert await s.get_items() == [item]                   # nothing erased...
        assert list(await s.restore_points()) == ["before-POINTMARKER"]  # ...points kept
        await s.erase()                                        # a retry finishes
        assert await s.get_items() == [] and await s.restore_points() == {}
        store.close()
    asyncio.run(go())
    for marker in (b"ITEMMARKER", b"POINTMARKER"):
        hits = [f for f in Path(path).rglob("*") if f.is_file() and marker in f.read_bytes()]
        assert hits == [], (marker, hits)



def test_erase_whose_erasure_failed_after_its_commit_is_finished_by_a_retry(tmp_path):
    """The purge commits, then its apply fails (an LMDB commit error: the store turns
    read-only): ErasureOwed; the items are gone, the points could not be dropped.  After
    a reopen a retried erase() drops them and leaves no trace of either."""
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession
    path = str(tmp_path / "s")
    item = {"role": "user", "content": "ITEMMARKER"}

    async def go():
        store = walstore.open(path, apply_interval=3600.0)
        s = WalstoreSession("u1", store)
        await s.add_items([item])
        await s.restore_point("before-POINTMARKER")
        fb = FaultBackend()
        fb.fail_lmdb("commit", times=None)
        with installed(fb):
            with pytest.raises(walstore.ErasureOwed):
                await s.erase()
        store._drop_like_a_crash()
        store = walstore.open(path)
        s = WalstoreSession("u1", store)
        assert await s.get_items() == []
        await s.erase()
        assert await s.restore_points() == {}
        store.close()
    asyncio.run(go())
    for marker in (b"ITEMMARKER", b"POINTMARKER"):
        hits = [f for f in Path(path).rglob("*") if f.is_file() and marker in f.read_bytes()]
        assert hits == [], (marker, hits)

# ---- 2. WalstoreSaver.copy_thread cut short -------------------------------------------------
def test_copy_thread_cut_short_holds_what_its_docstring_says(tmp_path):
    """The docstring said a copy cut short "holds the source's oldest checkpoints, each
    complete", though the newest copied one comes without its pending writes (they go
    in the next checkpoint's transaction, as the source saved them).  Cut after two
    transactions: checkpoints 0 and 1 copied, 0 with its write, 1 without."""
    pytest.importorskip("langgraph")
    from test_audit59_langgraph import _thread_of_three
    from walstore.integrations.langgraph import WalstoreSaver
    doc = " ".join(WalstoreSaver.copy_thread.__doc__.split())
    assert "each complete" not in doc
    assert "newest of them without its pending writes" in doc
    with walstore.open(str(tmp_path / "s")) as store:
        saver, made = _thread_of_three(store)
        fb = FaultBackend()
        fb.fail_point("commit.after_durable", KeyboardInterrupt, nth=2)  # (a Ctrl-C)
        with installed(fb):
            with pytest.raises(KeyboardInterrupt):
                saver.copy_thread("t", "dst")
        copied = {c.config["configurable"]["checkpoint_id"]: c.pending_writes
                  for c in saver.list({"configurable": {"thread_id": "dst"}})}
        ids = [m["configurable"]["checkpoint_id"] for m in made]
        assert set(copied) == set(ids[:2])
        assert [w[1:] for w in copied[ids[0]]] == [("x", 0)]
        assert copied[ids[1]] == []


# ---- 3. WalstoreStore: a TTL renewal that failed ------------------------------------------
def test_a_failed_ttl_renewal_is_reported_and_the_read_keeps_its_answer(tmp_path):
    """A read's TTL renewal (``refresh_on_read``) meeting a full disk: the read returns
    the item (audit 67), but the renewal's failure was swallowed without a word, the item
    left to expire on its old schedule.  Now a RuntimeWarning names the item and the
    cause."""
    from test_audit67_integrations import _store_with_a_ttl_item
    s, st = _store_with_a_ttl_item(str(tmp_path / "s"), other_scope=False)
    fb = FaultBackend()
    rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal")
    try:
        with installed(fb):
            with pytest.warns(RuntimeWarning) as seen:
                item = st.get(("m",), "x")
        assert rule.fired == 1 and item is not None and item.value == {"v": 1}
        text = " ".join(str(w.message) for w in seen)
        assert "('m',)" in text and "'x'" in text and "WalWriteError" in text, text
        assert "No space left on device" in text, text
    finally:
        s._drop_like_a_crash()


# ---- 4. read-only verbs on a store this user may not write --------------------------------
def _as_reader(args: list[str]):
    """The CLI run as a process the store's mode bits deny writes: root without the
    capabilities that override them when the tests run as root (store_support), else
    this user (the store's modes deny it writes)."""
    import subprocess
    from store_support import cli_env, without_root_privilege
    return subprocess.run(without_root_privilege() + [sys.executable, "-m", "walstore", *args],
                          env=cli_env(), capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def shared_dir():
    """A directory any user may enter (a test's tmp_path is root's alone under root)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="walstore-ro-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _modes(root: str, files: int, dirs: int, owner: int | None = None) -> None:
    for d, _ds, names in os.walk(root):
        for n in names:
            if owner is not None:
                os.chown(os.path.join(d, n), owner, -1)
            os.chmod(os.path.join(d, n), files)
        if owner is not None:
            os.chown(d, owner, -1)
        os.chmod(d, dirs)


def test_read_only_verbs_read_a_store_its_user_may_not_write(shared_dir):
    """Before: ``walstore get/scan/log/stats/verify`` of a store whose files are 0400 and
    directories 0500 failed "cannot open the LMDB environment: Permission denied": a
    read-only open still took LMDB's lock file.  Now, with no writer able to run (the
    store's writer lock held shared meanwhile), LMDB is read without its lock table."""
    path = os.path.join(shared_dir, "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", "VALUE-A")
    _modes(path, 0o400, 0o500)  # (the owner's bits: read, never write)
    try:
        for verb, want in (("get", "VALUE-A"), ("scan", "VALUE-A"), ("log", "1"),
                           ("stats", "applied_lsn"), ("verify", "ok")):
            args = [verb, path] + (["a"] if verb == "get" else [])
            r = _as_reader(args)
            assert r.returncode == 0 and want in r.stdout, (verb, r.stdout, r.stderr)
    finally:
        _modes(path, 0o600, 0o700)


def test_read_only_open_beside_a_live_writer_it_cannot_hold_out_says_why(shared_dir):
    """The lock-free read is refused while a writer runs (its pages would be reused under
    a reader it cannot see): one line saying why and what to do, exit 1."""
    path = os.path.join(shared_dir, "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", "VALUE-A")
        s.checkpoint()
        _modes(path, 0o444, 0o555)  # (readable by the reader; the writer is root or owner)
        try:
            r = _as_reader(["get", path, "a"])
        finally:
            _modes(path, 0o600, 0o700)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "a writer has the store open" in lines[0], r.stderr
    assert "db/lock.mdb" in lines[0] and "Traceback" not in r.stderr


# ---- 5. a backup / restore killed once its copy is in place, run again --------------------
def _killed_once_in_place() -> str:
    """The CLI, SIGKILLed right after it synced the directory holding DEST (argv[3]): a
    backup's or a restore's complete copy just moved in place (audit 67's Ctrl-C script)."""
    from test_audit67_operator import INTERRUPTED_AT_LAST_SYNC
    assert INTERRUPTED_AT_LAST_SYNC.count("signal.SIGINT") == 1
    return INTERRUPTED_AT_LAST_SYNC.replace("signal.SIGINT", "signal.SIGKILL")


@pytest.mark.parametrize("verb", ["backup", "restore"])
def test_a_rerun_into_a_dest_a_killed_copy_filled_says_it_holds_a_store(tmp_path, verb):
    """A `walstore backup` / `restore` killed (SIGKILL) right after its complete copy was
    moved in place, run again: it was refused "exists and is not empty" and nothing more.
    It says DEST holds a walstore store, whether it opens, and what to do."""
    import subprocess
    from test_audit67_operator import _env, charged_store, cli
    path, _ledger, _acked = charged_store(tmp_path, 2)
    dest = str(tmp_path / "dest")
    src = path
    if verb == "restore":
        src = (tmp_path / "rep").as_uri()
        r = cli("replicate", path, src, "--once")
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", _killed_once_in_place(), verb, src, dest],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == -9, (r.returncode, r.stderr)
    again = cli(verb, src, dest)
    assert again.returncode == 2, (again.returncode, again.stderr)
    line = again.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "exists and is not empty: it holds a walstore store, which opens" in line, line
    assert (f"walstore verify {dest}" in line) or (f"walstore recover {dest}" in line), line
    assert "remove it" in line, line


# ---- 6. a backup into a directory it may not write ------------------------------------------
def test_a_backup_into_an_unwritable_directory_says_no_copy_was_made(shared_dir):
    """Before: "writing the backup's directory failed (Permission denied); the partial
    copy was removed", when no copy had been begun.  Now it says none was made."""
    path = os.path.join(shared_dir, "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    closed = os.path.join(shared_dir, "closed")
    os.mkdir(closed, 0o555)
    os.chmod(closed, 0o555)
    dest = os.path.join(closed, "bk")
    try:
        r = _as_reader(["backup", path, dest])
    finally:
        _modes(path, 0o600, 0o700)
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert "Permission denied" in line and "no copy was made" in line, line
    assert "partial copy" not in line and not os.path.exists(dest), line


# ---- 7. a rewind's reverts: a transaction whose keys later undone ones overwrote ----------
def test_a_revert_of_a_transaction_a_rewind_undid_says_it_was_undone_already(store):
    """T wrote k, W overwrote k, a rewind to before T undid both but named only W in its
    ``reverts``; a later ``revert(T)`` said "later transactions [...] changed the same keys
    (use cascade=True ...)" though the rewind had undone T.  Now T is in ``reverts`` and
    the revert says T was undone already; the rewind's state is the same."""
    def put(**kv):
        with store.transaction() as tx:
            for k, v in kv.items():
                tx.put(k, v)
        return tx.id
    put(base=0)
    store.restore_point("p")
    t = put(k=1, own=1)
    w = put(k=2, own=2)
    later = put(k=3)
    info = store.rewind("p")
    assert store.get("k") is None and store.get("own") is None and store.get("base") == 0
    assert set(info.extra["reverts"]) == {t, w, later}, info.extra
    with pytest.raises(walstore.RevertConflict, match=f"transaction {t} was undone already"):
        store.revert(t)
    again = store.rewind("p")  # (a rewind to the point again: nothing to undo, no list)
    assert again is None
    u = put(k=4)
    info2 = store.rewind("p")
    assert u in info2.extra["reverts"], info2.extra
    assert not {t, w, later} & set(info2.extra["reverts"]), info2.extra  # (not again)
    assert store.get("k") is None and store.get("base") == 0


def test_a_writer_cannot_start_under_a_lock_free_reader(shared_dir):
    """While a reader that may not write the LMDB lock file reads without it, no writer
    may start (it would reuse pages under that reader, whom it cannot see): the writer's
    open is refused (StoreLocked) until the reader has closed the store."""
    import subprocess
    import time
    from store_support import cli_env, without_root_privilege
    if os.getuid() != 0:
        pytest.skip("needs a writer who may write what the reader may not (run as root)")
    path = os.path.join(shared_dir, "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", "VALUE-A")
    _modes(path, 0o444, 0o555)
    reader = subprocess.Popen(
        without_root_privilege() + [sys.executable, "-c",
         "import sys, time, walstore\n"
         "with walstore.open(sys.argv[1], readonly=True) as s:\n"
         "    print(s.get('a'), flush=True); sys.stdin.readline()\n", path],
        env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd="/")  # (it reads until told to close: not a 3 s sleep waited out)
    try:
        assert reader.stdout.readline().strip() == "VALUE-A", reader.stderr.read()
        t0 = time.monotonic()
        with pytest.raises(walstore.StoreLocked):
            walstore.open(path)
        assert time.monotonic() - t0 < 2.5  # (refused while the reader still reads)
    finally:
        reader.stdin.close()  # (the reader closes the store now)
        reader.wait(timeout=30)
        _modes(path, 0o600, 0o700)
    with walstore.open(path) as s:  # (and once it has closed, the writer opens)
        assert s.get("a") == "VALUE-A"
