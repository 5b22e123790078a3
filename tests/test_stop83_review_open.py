"""Stop 83, h2: an adversarial review of the store-open changes of a330d079 (LMDB's tables
opened in one write transaction; the refusal after a failed LMDB write naming a nearly
full disk) and dc2cbfb0 (``last_nonzero_end``: the zero tail found a 64 KiB chunk at a
time).  Real files, real full disks (a tmpfs), the fault backend for LMDB's commits.

Findings (each fixed at stop 83; its test failed before):
* the refusal's low-room note is repeated when the refusal goes out through
  ``state_io_error`` (a checkpoint, a drain): "...; its file system has N bytes free
  (...)); nothing is written until the store is reopened; its file system has N bytes
  free (...); the store is now read-only...";
* a store whose creation ran out of room while LMDB wrote its two meta pages is left with
  a 4096-byte data.mdb that every later open refuses as corrupt ("too short ... to hold
  both meta pages: truncated"), and ``walstore recover`` says to restore it from a backup,
  though it never held anything (no WAL segment);
* a read-only handle opened on a data file with no tables yet (such a creation cut short,
  or a writer's first open under way) reads them as empty for its life, and shares that
  with every later read-only open of the process: once a writer in another process has
  completed the creation and the log is trimmed, the reader reads an empty store and a new
  read-only open raises CorruptionError ("gap ... log records are missing") -- now such
  an open is refused, NotAStore "creation is under way or was cut short", as one that
  finds no data file is;
* a writable open of an older store (tables to create) with ``map_size`` below its data
  file's size, the file without free pages, fails CorruptionError "the LMDB environment
  is not a walstore state: mdb_dbi_open: MDB_MAP_FULL" (a default map opens it);
* a writable open, in a process holding a read-only handle, whose tables' commit fails (a
  full disk) leaves the process's shared environment closed: the reader's reads fail
  CorruptionError ("closed/deleted/dropped object"), a later writable open, with room
  again, a raw lmdb.Error;
* ``last_nonzero_end`` over a ``FileBytes`` whose file shrank after it was opened (a short
  read: the case FileBytes exists for) returns the start of its top chunk, past the file's
  end, where the rstrip it replaced returned the last non-zero byte's end.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lmdb  # noqa: E402

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402
from walstore.log.reader import last_nonzero_end, mapped  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

PAGE = 4096


def _free(mnt) -> int:
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def _fill(mnt, keep: int) -> str:
    fill = os.path.join(mnt, "fill")
    with open(fill, "wb") as f:
        f.write(b"\0" * max(0, _free(mnt) - keep))
    return fill


def _fail_one_lmdb_write(state) -> None:
    """An LMDB commit of the state handle fails (the fault seam): ``write_failed`` is set
    as by the applier's failed write in the background, before ``Engine.fail``."""
    from walstore.engine.lmdb_state import StateWriteError
    fb = FaultBackend()
    with installed(fb):
        fb.fail_lmdb("commit")
        with pytest.raises(StateWriteError):
            state.write(lambda txn: txn.put(b"probe", b"1", db=state.meta))


# ---- the refusal's note ------------------------------------------------------------------

def test_the_refusals_low_room_note_is_said_once_through_a_checkpoint(mount_tmpfs):
    mnt = mount_tmpfs("16m")
    s = walstore.open(str(mnt / "s"), durability="none", apply_interval=3600)
    try:
        _fail_one_lmdb_write(s._engine.state)
        fill = _fill(mnt, 256 * 1024)
        try:
            with s.transaction() as tx:
                tx.put("a", 1)
            with pytest.raises(walstore.StoreIOError) as e:
                s.checkpoint()
            text = str(e.value)
            assert "writing LMDB refused" in text and "bytes free" in text, text
            assert text.count("bytes free") == 1, text
        finally:
            os.unlink(fill)
    finally:
        s._engine.fail(RuntimeError("the test's failed LMDB write"))
        s.close()


def test_an_applier_write_failing_on_a_full_disk_names_it_to_a_rollback_after(mount_tmpfs):
    """The applier's LMDB write failing in the background on a nearly full disk (LMDB
    says EIO) stops the store; the rollback of a transaction whose action was entered
    before said "... rolled back, but the store cannot record any more (writing LMDB
    failed: mdb_txn_commit: Input/output error) ...", naming no full disk (the full-disk
    sweep, files workload, seed 8305010): the failed write's own error now carries the
    disk's room."""
    mnt = mount_tmpfs("16m")
    s = walstore.open(str(mnt / "s"), durability="none", apply_interval=0.05)
    s.compensator("refund")(lambda act: None)
    try:
        fill = _fill(mnt, 256 * 1024)
        try:
            fb = FaultBackend()
            with installed(fb):
                fb.fail_lmdb("commit")
                tx = s.transaction()
                with tx.action("charge", compensate="refund") as act:
                    act.result = {"id": 1}
                deadline = time.monotonic() + 20
                while s._engine.stopped_by is None:  # (the applier's write, in the
                    assert time.monotonic() < deadline  # background, fails)
                    time.sleep(0.02)
            with pytest.raises(walstore.ReadOnlyError) as e:
                tx.rollback()
            text = str(e.value)
            assert "cannot record any more" in text and "bytes free" in text, text
        finally:
            os.unlink(fill)
    finally:
        s.close()


def test_the_refusal_has_no_note_with_room_and_no_oserror_without_its_directory(tmp_path):
    import shutil

    from walstore.engine.lmdb_state import StateWriteError
    path = tmp_path / "s"
    s = walstore.open(str(path), durability="none", apply_interval=3600)
    try:
        state = s._engine.state
        _fail_one_lmdb_write(state)
        with pytest.raises(StateWriteError) as e:
            state.sync()
        assert "refused" in str(e.value) and "bytes free" not in str(e.value), str(e.value)
        with s.transaction() as tx:
            tx.put("a", 1)
        with pytest.raises(walstore.StoreIOError) as e2:  # (through state_io_error)
            s.checkpoint()
        assert "bytes free" not in str(e2.value), str(e2.value)
        moved = tmp_path / "gone"
        shutil.move(str(path), str(moved))  # the data file's directory is gone
        try:
            with pytest.raises(StateWriteError) as e3:  # not an OSError from statvfs
                state.sync()
            assert "bytes free" not in str(e3.value)
        finally:
            shutil.move(str(moved), str(path))
    finally:
        s._engine.fail(RuntimeError("the test's failed LMDB write"))
        s.close()


# ---- a failed open, then the next one ----------------------------------------------------

def test_a_creation_cut_short_by_a_full_disk_is_completed_by_the_next_open(mount_tmpfs):
    mnt = mount_tmpfs("4m")
    seen = []
    # every room from "the lock file cannot be made" to "the tables' commit fails": one
    # of them leaves LMDB's first meta page written and its second not
    for keep in range(68 * 1024, 100 * 1024 + 1, PAGE):
        path = str(mnt / f"s{keep}")
        fill = _fill(mnt, keep)
        try:
            try:
                walstore.open(path, durability="none").close()
            except walstore.WalstoreError as e:
                seen.append((keep, str(e)))
        finally:
            os.unlink(fill)
        data = os.path.join(path, "db", "data.mdb")
        size = os.path.getsize(data) if os.path.exists(data) else None
        try:
            with walstore.open(path, durability="none") as s:  # room again: it opens
                s.run(lambda tx: tx.put("x", 1))
        except walstore.WalstoreError as e:
            pytest.fail(f"room {keep}: the failed creation left data.mdb of {size} bytes "
                        f"and the next open refuses: {e}")
        assert verify_store(path).ok
    assert any("No space left on device" in t for _k, t in seen), seen


def _creation_cut_short_before_the_tables(mnt) -> str | None:
    """A new store whose creation ran out of room at the commit creating LMDB's tables:
    data.mdb made (its meta pages), no table, no WAL segment (None: no room tried gave
    that)."""
    for keep in range(76 * 1024, 100 * 1024 + 1, PAGE):
        path = str(mnt / f"c{keep}")
        fill = _fill(mnt, keep)
        try:
            walstore.open(path, durability="none").close()
        except walstore.WalstoreError as e:
            if "cannot create the LMDB tables" in str(e):
                return path
        finally:
            os.unlink(fill)
    return None


def test_a_reader_of_a_creation_cut_short_is_refused_until_a_writer_completes_it(
        mount_tmpfs):
    """A read-only open that finds LMDB without its tables (a creation cut short at the
    tables' commit, or a writer's first open under way) says so (NotAStore), as one that
    finds no data file does.  It opened as an empty store and kept "empty" for the
    handle's life and the process's: after a writer in another process completed the
    creation, it read an empty store, silently, and a new read-only open in the process
    met a false CorruptionError "gap"."""
    mnt = mount_tmpfs("48m")
    path = _creation_cut_short_before_the_tables(mnt)
    if path is None:
        pytest.skip("no room tried cut the creation short at the tables' commit")
    with pytest.raises(walstore.NotAStore, match="creation is under way or was cut short"):
        walstore.open(path, readonly=True)
    code = ("import walstore\n"
            "with walstore.open(%r, durability='none') as w:\n"
            "    for i in range(120):\n"
            "        w.run(lambda tx, i=i: tx.put('k%%d' %% i, 'v' * 40000))\n"
            "        if i %% 40 == 39: w.checkpoint()\n"
            "    w.checkpoint()\n" % path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    with walstore.open(path, readonly=True) as r:  # (completed: every write there)
        assert r.get("k1") == "v" * 40000
        assert len(list(r.scan())) == 120


def _older_store(path: str, compact: bool = False) -> None:
    """A store as an older walstore left it: no ``owed`` nor ``aended`` table
    (``compact``: its data file without free pages, so creating them grows the file)."""
    with walstore.open(path, durability="none") as s:
        for i in range(20):
            s.run(lambda tx, i=i: tx.put(f"k{i}", i))
        s.restore_point("rp")
    db = os.path.join(path, "db")
    env = lmdb.open(db, max_dbs=40)
    try:
        with env.begin(write=True) as t:
            for name in (b"owed", b"aended"):
                t.drop(env.open_db(name, txn=t), delete=True)
        if compact:
            os.mkdir(path + ".copy")
            env.copy(path + ".copy", compact=True)
    finally:
        env.close()
    if compact:
        os.replace(os.path.join(path + ".copy", "data.mdb"), os.path.join(db, "data.mdb"))
        os.rmdir(path + ".copy")


def _data_file_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").endswith("data.mdb")
        except OSError:
            pass
    return n


def _tables(path: str) -> list[bytes]:
    env = lmdb.open(os.path.join(path, "db"), max_dbs=40, readonly=True, lock=False)
    try:
        with env.begin() as t:
            return sorted(k for k, _v in t.cursor())
    finally:
        env.close()


def test_an_older_stores_tables_commit_failing_on_a_full_disk_leaves_it_openable(
        mount_tmpfs):
    """The one write transaction creating the missing tables fails (ENOSPC): a walstore
    error, no environment left open in the process, the store still opens read-only (its
    tables read as empty), and with room again a writable open creates them."""
    mnt = mount_tmpfs("16m")
    path = str(mnt / "s")
    _older_store(path, compact=True)
    seen = []
    fds = _data_file_fds()
    for keep in (0, PAGE, 2 * PAGE, 3 * PAGE):
        fill = _fill(mnt, keep)
        try:
            try:
                walstore.open(path, durability="none").close()
            except walstore.WalstoreError as e:
                seen.append(str(e))
            else:
                continue
            with walstore.open(path, readonly=True) as r:
                assert r.get("k5") == 5 and len(list(r.scan())) == 20
        finally:
            os.unlink(fill)
    assert any("cannot create the LMDB tables" in t and "bytes free" in t for t in seen), seen
    assert _data_file_fds() == fds, "a failed open left the data file open"
    with walstore.open(path, durability="none") as s:
        assert s.get("k5") == 5
        s.run(lambda tx: tx.put("new", 1))
    assert b"owed" in _tables(path) and b"aended" in _tables(path)
    assert verify_store(path).ok


def test_a_failed_tables_commit_of_a_writable_open_beside_a_reader_keeps_the_reader(
        mount_tmpfs):
    mnt = mount_tmpfs("16m")
    path = str(mnt / "s")
    _older_store(path, compact=True)
    r = walstore.open(path, readonly=True)
    try:
        assert r.get("k5") == 5
        failed = None
        for keep in (2 * PAGE, 3 * PAGE, 4 * PAGE, PAGE):
            fill = _fill(mnt, keep)
            try:
                walstore.open(path, durability="none").close()
            except walstore.WalstoreError as e:
                failed = str(e)
            finally:
                os.unlink(fill)
            if failed is not None and "cannot create the LMDB tables" in failed:
                break
            failed = None
        if failed is None:
            pytest.skip("no room tried failed the tables' commit")
        seen = []
        try:
            seen.append(("the reader", r.get("k5")))
        except walstore.WalstoreError as e:
            seen.append(("the reader", f"{type(e).__name__}: {e}"))
        try:
            with walstore.open(path, durability="none") as w:  # room again
                seen.append(("a writable open", w.get("k5")))
        except Exception as e:  # noqa: BLE001 (a raw lmdb.Error is the finding)
            seen.append(("a writable open", f"{type(e).__module__}.{type(e).__name__}: {e}"))
        assert seen == [("the reader", 5), ("a writable open", 5)], seen
    finally:
        r.close()


def test_the_tables_commit_through_the_fault_seam_fails_the_open_alone(tmp_path):
    """The commit creating the tables at a writable open goes through the fault seam
    (``lmdb_tables``; no fault could be put there before): failed, the open raises a
    walstore error (EIO, the data file named; no lmdb.Error), a reader of the same process
    reads on, the tables are not half made, and the next writable open makes them."""
    path = str(tmp_path / "s")
    _older_store(path)
    with walstore.open(path, readonly=True) as r:
        fb = FaultBackend()
        with installed(fb):
            fb.fail_lmdb("tables")
            with pytest.raises(walstore.StoreIOError, match="cannot create the LMDB tables"):
                walstore.open(path, durability="none")
        assert fb.calls_to("lmdb_tables"), "the tables' commit never reached the seam"
        assert r.get("k5") == 5 and len(list(r.scan())) == 20
    assert b"owed" not in _tables(path)  # (aborted whole)
    with walstore.open(path, durability="none") as w:
        w.run(lambda tx: tx.put("new", 1))
        assert w.get("k5") == 5
    assert b"owed" in _tables(path) and verify_store(path).ok
    new_store = str(tmp_path / "new")
    fb = FaultBackend()
    with installed(fb):  # (a new store's creation: its first open fails there, no store)
        fb.fail_lmdb("tables")
        with pytest.raises(walstore.StoreIOError):
            walstore.open(new_store, durability="none")
    with walstore.open(new_store, durability="none") as s:  # (the next one completes it)
        s.run(lambda tx: tx.put("a", 1))
    assert verify_store(new_store).ok


def test_an_older_store_opened_with_a_map_smaller_than_its_file_creates_its_tables(
        tmp_path):
    """``map_size`` below the data file's size (LMDB maps the file's size then), a data
    file without free pages (as a purge's compaction leaves it) and tables to create: the
    map is full at the tables' commit.  The contract: the map grows by itself when full."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(200):
            s.run(lambda tx, i=i: tx.put(f"k{i}", "x" * 1000))
    db = os.path.join(path, "db")
    env = lmdb.open(db, max_dbs=40)
    try:
        with env.begin(write=True) as t:
            for name in (b"owed", b"aended"):
                t.drop(env.open_db(name, txn=t), delete=True)
        os.mkdir(path + ".copy")
        env.copy(path + ".copy", compact=True)
    finally:
        env.close()
    os.replace(os.path.join(path + ".copy", "data.mdb"), os.path.join(db, "data.mdb"))
    assert os.path.getsize(os.path.join(db, "data.mdb")) > 1 << 16
    with walstore.open(path, map_size=1 << 16, durability="none") as s:
        assert s.get("k5") == "x" * 1000
    assert b"owed" in _tables(path)


def test_an_older_store_read_only_then_writable_then_read_only_in_another_process(
        tmp_path):
    path = str(tmp_path / "s")
    _older_store(path)
    r = walstore.open(path, readonly=True)  # (tables missing: read as empty)
    try:
        assert r._engine.state.owed is None and r.get("k3") == 3
        with walstore.open(path, durability="none") as w:  # the same process: made writable
            assert r._engine.state.owed is not None
            w.run(lambda tx: tx.put("new", 1))
            w.restore_point("rp2")
            assert r.get("new") == 1 and r.at("rp2").get("new") == 1
            code = ("import walstore; r = walstore.open(%r, readonly=True); "
                    "print(r.get('new'), r.get('k3'), len(list(r.scan()))); r.close()" % path)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                 text=True, timeout=60,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
            assert out.returncode == 0 and out.stdout.split() == ["1", "3", "21"], out
    finally:
        r.close()
    assert verify_store(path).ok


# ---- last_nonzero_end --------------------------------------------------------------------

def _rstrip_end(data: bytes, start: int, size: int) -> int:
    return start + len(data[start:size].rstrip(b"\x00"))


def test_the_zero_tail_at_64k_boundaries_agrees_with_rstrip():
    step = 1 << 16
    for n in (step, 2 * step, 3 * step + 5):
        for k in sorted({0, 1, step - 1, step, step + 1, 2 * step - 1, 2 * step, n - 1}):
            if k >= n:
                continue
            buf = bytearray(n)
            buf[k] = 1
            for start in sorted({0, 5, k, k + 1, step, n}):
                for size in sorted({n, n - 3, start, k + 1, step}):
                    if not start <= size <= n:
                        continue
                    for arg in (bytes(buf), buf):
                        assert last_nonzero_end(arg, start, size) == \
                            _rstrip_end(bytes(buf), start, size), (n, k, start, size)
    assert last_nonzero_end(bytes(3 * step), 0, 3 * step) == 0   # all zeros
    assert last_nonzero_end(bytes(3 * step), 7, 7) == 7           # start == size


def test_the_zero_tail_through_filebytes_agrees_with_rstrip(tmp_path):
    p = tmp_path / "seg"
    data = bytearray(5 * (1 << 16) + 123)
    for k in (10, (1 << 16) - 1, 3 * (1 << 16)):
        data[k] = 9
    p.write_bytes(bytes(data))
    with mapped(str(p)) as mm:
        for start in (0, 11, 1 << 16, 3 * (1 << 16) + 1, len(data)):
            assert last_nonzero_end(mm, start, len(mm)) == \
                _rstrip_end(bytes(data), start, len(data)), start


def test_the_zero_tail_of_a_file_that_shrank_while_read_is_its_last_non_zero_byte(tmp_path):
    p = tmp_path / "seg"
    p.write_bytes(b"\x07" * 1000 + bytes(199_000))
    with mapped(str(p)) as mm:
        os.truncate(str(p), 100_000)  # truncated under the reader: FileBytes reads short
        end = last_nonzero_end(mm, 0, len(mm))
    assert end == 1000, end
