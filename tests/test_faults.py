"""Disk-full and I/O-error handling, with the fault backend of ``tools/faults.py``.

In-process, real files: ``walstore.fileio`` routes the WAL's I/O through
``tools.faults.FaultBackend``, which fails chosen calls with ENOSPC / EIO and logs every
call.  Promises checked (contract section 4, items 6 and 7): a write error fails the
transaction in hand with a clear OSError and leaves every earlier commit intact, and the
store goes on once the fault is gone; after an fsync error the store is read-only and the
fsync is never retried; LMDB map full is absorbed by growing the map.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402
from walstore.log.reader import SegmentReader  # noqa: E402
from walstore.log.segment import list_segments  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402

SYNCS = ("fsync", "fdatasync")
BENIGN = ("torn-tail", "stale-bytes")  # what recovery may cut after a crash or failed write


@pytest.fixture
def faults():
    fb = FaultBackend()
    with installed(fb):
        yield fb
    assert fileio._backend is not fb


def put(store, key, value) -> int:
    with store.transaction() as tx:
        tx.put(key, value)
    return tx.lsn


def value_for(i: int, size: int = 200) -> dict:
    return {"i": i, "pad": (f"{i:08d}" * (size // 8 + 1))[:size]}


def reopen_and_check(path, expected: dict, absent=(), **kw) -> None:
    with walstore.open(str(path), **kw) as s:
        for k, v in expected.items():
            assert s.get(k) == v, f"{k}: expected {str(v)[:60]}, got {str(s.get(k))[:60]}"
        for k in absent:
            assert k not in s, f"{k} was never committed but is there"
        assert all(p.kind in BENIGN and p.action == "cut" for p in s.last_recovery.problems), \
            s.last_recovery.problems
    rep = verify_store(str(path))
    assert rep.ok, rep.errors


# ---- the fault backend itself ---------------------------------------------------------------
def test_fault_backend_fails_the_nth_matching_call_and_logs_everything(tmp_path):
    fb = FaultBackend(record=True)
    a, b = str(tmp_path / "a.wal"), str(tmp_path / "b.dat")
    rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal", nth=2, times=2)
    fda = fb.open(a, os.O_RDWR | os.O_CREAT, 0o600)
    fdb = fb.open(b, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert fb.pwrite(fda, b"one", 0) == 3
        assert fb.pwrite(fdb, b"other", 0) == 5          # another path: not counted
        for _ in range(2):
            with pytest.raises(OSError) as ei:
                fb.pwrite(fda, b"two", 3)
            assert ei.value.errno == errno.ENOSPC and ei.value.filename == a
        assert fb.pwrite(fda, b"three", 3) == 5          # times=2: spent
        assert rule.seen == 4 and rule.fired == 2
        fb.fdatasync(fda)
        partial = fb.fail("pwrite", errno.EIO, partial=2)
        with pytest.raises(OSError):
            fb.pwrite(fdb, b"XYZ", 0)
        assert partial.fired == 1
        fb.rename(b, b + ".new")
        fb.fail("fsync_dir", errno.EIO)
        with pytest.raises(OSError):
            fb.fsync_dir(str(tmp_path))
    finally:
        os.close(fda)
        os.close(fdb)
    with open(a, "rb") as f:
        assert f.read() == b"onethree"
    with open(b + ".new", "rb") as f:
        assert f.read() == b"XYher"                      # the partial write landed
    ops = [c.op for c in fb.calls]
    assert ops == ["open", "open", "pwrite", "pwrite", "pwrite", "pwrite", "pwrite", "fdatasync",
                   "pwrite", "rename", "fsync_dir"]
    assert [c.injected for c in fb.calls_to("pwrite", path="*.wal")] == [False, True, True, False]
    w = fb.writes("*.wal")
    assert [(e.offset, e.data) for e in w] == [(0, b"one"), (3, b"three")]
    sync = fb.syncs()
    assert sync[0].op == "fdatasync" and sync[0].done_seq > w[-1].seq > w[0].seq
    assert sync[-1].op == "fsync_dir" and sync[-1].done_seq is None  # failed
    fb.mark("ack", 7)
    assert fb.events[-1].label == "ack" and fb.events[-1].info == 7
    assert any(e.op == "rename" and e.dst == b + ".new" for e in fb.events)
    assert fb.calls_to("pwrite", path="b.dat*")[-1].path == b  # path as opened


def test_recording_shows_every_full_commit_fsynced_before_it_returns(tmp_path):
    """With ``record=True`` the event stream is enough to check the durability order: the
    bytes of each commit record were written, then a sync of that segment started after
    the write and finished before commit() returned (group commit: from any thread)."""
    fb = FaultBackend(record=True)
    path = tmp_path / "store"
    lock = threading.Lock()
    acks = []
    with installed(fb):
        with walstore.open(str(path), segment_size=8192) as s:
            def worker(t: int) -> None:
                for n in range(40):
                    lsn = put(s, f"t{t}/{n}", value_for(n, 300))
                    with lock:
                        acks.append(fb.mark("ack", lsn))
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert len(acks) == 120
    segments = {}  # final segment path -> start LSN
    for e in fb.events:
        if e.op == "rename" and e.dst.endswith(".wal"):
            segments[e.dst] = int(os.path.basename(e.dst)[:20])
    assert len(segments) >= 3, "the WAL did not rotate"
    writes = [e for e in fb.events if e.op == "pwrite" and e.path in segments]
    syncs = [e for e in fb.events if e.op in SYNCS and e.path in segments]
    for mark in acks:
        lsn = mark.info
        seg = max((p for p, st in segments.items() if st <= lsn), key=segments.get)
        off = lsn - segments[seg] + 64
        covering = [w for w in writes if w.path == seg and w.offset <= off < w.offset + len(w.data)
                    and w.seq < mark.seq]
        assert covering, f"no write of the commit record at LSN {lsn} before its ACK"
        w = covering[-1]
        assert any(y.path == seg and y.seq > w.seq and y.done_seq is not None
                   and y.done_seq < mark.seq for y in syncs), (
            f"commit at LSN {lsn} returned before a sync of {seg} covered its record")


# ---- write errors on the WAL ----------------------------------------------------------------
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("partial", [None, 40])
def test_wal_write_error_fails_only_the_commit_in_hand(tmp_path, faults, err, partial):
    path = tmp_path / "store"
    committed = {}
    s = walstore.open(str(path))
    try:
        for i in range(20):
            put(s, f"k{i}", value_for(i))
            committed[f"k{i}"] = value_for(i)
        rule = faults.fail("pwrite", err, path="*.wal", partial=partial)
        with pytest.raises(OSError) as ei:
            with s.transaction() as tx:
                tx.put("lost", value_for(-1, 500))
                tx.put("k0", "overwritten by the failed commit")
        e = ei.value
        assert e.errno == err
        assert isinstance(e, walstore.WalstoreError)
        assert "WAL" in str(e) and os.strerror(err) in str(e), str(e)
        assert rule.fired == 1
        assert tx.state != "active"
        # nothing of it is visible; earlier commits are
        assert "lost" not in s and s.get("k0") == value_for(0)
        assert all(s.get(k) == v for k, v in committed.items())
        # the fault is gone (times=1): the store goes on
        for i in range(20, 40):
            put(s, f"k{i}", value_for(i))
            committed[f"k{i}"] = value_for(i)
        assert s.get("k39") == value_for(39)
    finally:
        s.close()
    reopen_and_check(path, committed, absent=["lost"])


PARTIAL_THEN_ROTATE = r"""
import errno, os, signal, sys
sys.path.insert(0, sys.argv[2])
import walstore
from tools.faults import FaultBackend, installed

def put(s, k, v):
    with s.transaction() as tx:
        tx.put(k, v)

fb = FaultBackend()
with installed(fb):
    s = walstore.open(sys.argv[1], segment_size=65536)
    put(s, "a", "x" * 100)
    fb.fail("pwrite", errno.ENOSPC, path="*.wal", partial=15000)
    if sys.argv[3] == "persistent":  # the device keeps failing: cleaning up after it fails too
        fb.fail("pwrite", errno.ENOSPC, path="*.wal", nth=2, times=1)
    try:
        put(s, "big-lost", "y" * 20000)
        sys.exit("the injected ENOSPC did not reach the committer")
    except OSError:
        pass
    for attempt in range(3):        # overwrites only the start of the stale bytes
        try:
            put(s, "small", "z" * 100)
            break
        except OSError:
            pass
    put(s, "huge", "h" * 70000)     # bigger than a segment: the log rotates
    put(s, "after", "w" * 100)
    print("ACKED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _partial_then_rotate_then_crash(path: Path, fault: str) -> None:
    r = subprocess.run([sys.executable, "-c", PARTIAL_THEN_ROTATE, str(path), str(ROOT), fault],
                       capture_output=True, text=True, timeout=60)
    assert "ACKED" in r.stdout, r.stdout + r.stderr
    assert r.returncode == -signal.SIGKILL
    assert len(list_segments(str(path / "wal"))) >= 2


PARTIAL_ACKED = {"a": "x" * 100, "small": "z" * 100, "huge": "h" * 70000, "after": "w" * 100}


@pytest.mark.parametrize("fault", ["once", "persistent"])
def test_partial_wal_write_then_rotation_then_crash_reopens(tmp_path, fault):
    """A write error after part of a big record reached the file, one small commit, a
    rotation, a crash: the stale bytes behind the last record of the sealed segment were
    never part of the log, so the next open must not refuse (every commit was acked).
    "persistent": the next write fails too (so zeroing the stale bytes at once fails)."""
    path = tmp_path / "store"
    _partial_then_rotate_then_crash(path, fault)
    reopen_and_check(path, PARTIAL_ACKED, absent=["big-lost"])


def test_verify_after_a_partial_write_rotation_and_crash_finds_no_error(tmp_path):
    """What recovery cuts as harmless, ``walstore verify`` must not call an error."""
    path = tmp_path / "store"
    _partial_then_rotate_then_crash(path, "persistent")
    rep = verify_store(str(path))
    assert rep.ok, rep.errors


@pytest.mark.parametrize("op", ["open", "pwrite", "rename"])
def test_enospc_making_the_next_segment_fails_at_most_the_commit_in_hand(tmp_path, faults, op):
    """The next segment is made off the commit path (the spare): a full disk there costs no
    commit; at its activation (header, rename) it fails the commit in hand only; the log
    rotates on (inline, or with the next spare) once there is room again."""
    path = tmp_path / "store"
    committed = {}
    failed = []
    with walstore.open(str(path), segment_size=8192) as s:
        rule = faults.fail(op, errno.ENOSPC, path="spare.tmp")
        for i in range(400):
            try:
                put(s, f"k{i}", value_for(i))
                committed[f"k{i}"] = value_for(i)
            except OSError as e:
                failed.append((i, e))
            if rule.fired and i > 300:
                break
        assert rule.fired == 1
        assert len(failed) <= 1, failed
        for i, e in failed:
            assert e.errno == errno.ENOSPC and isinstance(e, walstore.WalstoreError)
            assert "segment" in str(e) and os.strerror(errno.ENOSPC) in str(e), str(e)
            assert f"k{i}" not in s
        assert len(committed) > 300
        assert all(s.get(k) == v for k, v in committed.items())
        assert s.stats()["wal_rotations"] >= 4  # the log rotated on after the failure
    reopen_and_check(path, committed, absent=[f"k{i}" for i, _e in failed])


# ---- fsync errors ---------------------------------------------------------------------------
def _assert_never_retried(faults: FaultBackend, failed_call) -> None:
    later = [c for c in faults.calls_to(SYNCS, after=failed_call.seq)
             if c.fd == failed_call.fd or c.path == failed_call.path]
    assert not later, f"the failed fsync was retried on {failed_call.path}: {later}"


def test_eio_on_wal_fdatasync_turns_the_store_read_only_and_is_never_retried(tmp_path, faults):
    path = tmp_path / "store"
    acked = {}
    s = walstore.open(str(path), apply_interval=0.05)
    try:
        for i in range(10):
            put(s, f"k{i}", value_for(i))
            acked[f"k{i}"] = value_for(i)
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        assert not s.readonly
        with pytest.raises(walstore.ReadOnlyError) as ei:
            put(s, "unknown", value_for(99))
        assert "fsync" in str(ei.value)
        assert rule.fired == 1
        assert s.readonly  # (it said False while every write raised: probe-contract)
        failed_call = rule.failed_calls[0]
        # read-only from now on, for every kind of write
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "later", 1)
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.delete("k1")
        with pytest.raises(walstore.ReadOnlyError):
            s.sync()
        with pytest.raises(walstore.ReadOnlyError):
            s.checkpoint()
        # reads still work and show exactly the acknowledged state
        assert all(s.get(k) == v for k, v in acked.items())
        assert "unknown" not in s and "later" not in s
        time.sleep(0.3)  # give the applier a few rounds: it must not fsync the WAL either
    finally:
        s.close()
    _assert_never_retried(faults, failed_call)
    faults.clear()
    with walstore.open(str(path)) as s:
        assert not s.readonly  # (a reopen decides, then takes writes again)
        assert s.get("unknown") in (None, value_for(99))  # all or nothing
        assert "later" not in s
    reopen_and_check(path, acked, absent=["later"])


def test_fsync_error_with_concurrent_committers_fails_everyone_waiting(tmp_path, faults):
    path = tmp_path / "store"
    acked: dict = {}
    errors: list = []
    lock = threading.Lock()
    stop = threading.Event()
    with walstore.open(str(path)) as s:
        def worker(t: int) -> None:
            n = 0
            while not stop.is_set():
                key = f"t{t}/{n}"
                try:
                    put(s, key, value_for(n))
                except walstore.ReadOnlyError as e:
                    with lock:
                        errors.append((key, e))
                    return
                with lock:
                    acked[key] = value_for(n)
                n += 1

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        warmup = time.monotonic() + 10
        while len(acked) < 100 and not errors and time.monotonic() < warmup:
            time.sleep(0.01)
        assert len(acked) >= 100 and not errors, errors
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        deadline = time.monotonic() + 10
        while len(errors) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join()
        assert rule.fired == 1
        assert len(errors) == 4, "every committer must see ReadOnlyError after the fsync error"
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "after", 1)
        failed_call = rule.failed_calls[0]
    _assert_never_retried(faults, failed_call)
    faults.clear()
    reopen_and_check(path, acked, absent=["after"])


def test_fsync_error_in_the_background_flusher_turns_normal_durability_read_only(tmp_path,
                                                                                  faults):
    path = tmp_path / "store"
    acked = {}
    s = walstore.open(str(path), durability="normal", sync_interval=0.02)
    try:
        for i in range(5):
            put(s, f"k{i}", value_for(i))
            acked[f"k{i}"] = value_for(i)
        s.sync()
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        put(s, "maybe", 1)  # written to the OS; the flusher's fsync fails
        deadline = time.monotonic() + 5
        while rule.fired == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rule.fired == 1
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "later", 2)
        time.sleep(0.1)  # the flusher must not try again
        failed_call = rule.failed_calls[0]
    finally:
        s.close()
    _assert_never_retried(faults, failed_call)
    faults.clear()
    reopen_and_check(path, acked, absent=["later"])


def test_eio_on_fsync_during_rotation_turns_the_store_read_only(tmp_path, faults):
    """durability="none" and an idle applier: the only WAL fsync is the one that seals the
    old segment when the log rotates."""
    path = tmp_path / "store"
    done = {}
    s = walstore.open(str(path), durability="none", segment_size=8192, apply_interval=60,
                      apply_batch=10**6, checkpoint_bytes=10**9)
    try:
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        with pytest.raises(walstore.ReadOnlyError):
            for i in range(200):
                put(s, f"k{i}", value_for(i, 500))
                done[f"k{i}"] = value_for(i, 500)
        assert rule.fired == 1 and 5 < len(done) < 200
        # the next segment is made before the old one is sealed: it may exist, but empty
        segs = list_segments(str(path / "wal"))
        assert len(segs) in (1, 2)
        if len(segs) == 2:
            assert list(SegmentReader(segs[1][1], None, segs[1][0]).records()) == []
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "later", 1)
        failed_call = rule.failed_calls[0]
    finally:
        s.close()
    _assert_never_retried(faults, failed_call)
    faults.clear()
    reopen_and_check(path, done, absent=["later"])  # a process "crash": page cache kept


def test_eio_on_the_directory_fsync_of_a_new_segment_turns_the_store_read_only(tmp_path,
                                                                              faults):
    """A failed directory fsync means the new segment's name may not be durable; retrying
    it is what the contract forbids (section 4.6: never retry fsync)."""
    path = tmp_path / "store"
    acked = {}
    s = walstore.open(str(path), segment_size=8192)
    wal_dir = str(path / "wal")
    try:
        rule = faults.fail("fsync_dir", errno.EIO, path=wal_dir)
        caught = None
        for i in range(200):
            try:
                put(s, f"k{i}", value_for(i, 500))
                acked[f"k{i}"] = value_for(i, 500)
            except (walstore.ReadOnlyError, OSError) as e:
                caught = e
                break
        assert rule.fired == 1 and caught is not None
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "later", 1)
        later = faults.calls_to("fsync_dir", path=wal_dir, after=rule.failed_calls[0].seq)
        assert not later, "the failed directory fsync was retried"
    finally:
        s.close()
    faults.clear()
    reopen_and_check(path, acked, absent=["later"])


# ---- LMDB map full --------------------------------------------------------------------------
def test_lmdb_map_full_grows_the_map_and_never_fails_a_commit(tmp_path):
    path = tmp_path / "store"
    expected = {}
    tiny = 64 * 1024
    with walstore.open(str(path), map_size=tiny, apply_batch=50) as s:
        for i in range(250):  # ~2.5 MB in small transactions
            v = os.urandom(10_000)
            put(s, f"small/{i}", v)
            expected[f"small/{i}"] = v
        with s.transaction() as tx:  # ~1.5 MB in one transaction
            for i in range(150):
                v = os.urandom(10_000)
                tx.put(f"big/{i}", v)
                expected[f"big/{i}"] = v
        s.checkpoint()  # everything into LMDB now
        assert s.stats()["lmdb_map_size"] >= 4 * 1024 * 1024
        assert all(s.get(k) == v for k, v in expected.items())
        # and overwrite / delete through the grown map
        for i in range(0, 250, 5):
            with s.transaction() as tx:
                tx.delete(f"small/{i}")
            del expected[f"small/{i}"]
    reopen_and_check(path, expected, absent=[f"small/{i}" for i in range(0, 250, 5)],
                     map_size=tiny)


# ---- creating a store -----------------------------------------------------------------------
@pytest.mark.parametrize("op,pattern", [("rename", "STORE.tmp"), ("pwrite", "STORE.tmp")])
def test_a_failed_store_creation_can_be_retried(tmp_path, faults, op, pattern):
    path = tmp_path / "store"
    faults.fail(op, errno.ENOSPC, path=pattern)
    with pytest.raises(OSError):
        walstore.open(str(path))
    faults.clear()
    with walstore.open(str(path)) as s:
        put(s, "a", 1)
    reopen_and_check(path, {"a": 1})


# ---- a full disk never kills the process through LMDB's lock file (real mounts) ---------
@pytest.fixture
def small_tmpfs(mount_tmpfs):
    """A 16 MiB tmpfs (a real full disk; skipped where mounting is not permitted)."""
    return mount_tmpfs("16m")


FILL_DISK = r'''
import os, sys
def fill(mnt, leave=0):
    fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    for chunk in (1 << 20, 65536, 4096, 512):
        try:
            while True:
                os.write(fd, b"\1" * chunk)
        except OSError:
            pass
    os.close(fd)
    if leave:
        filler = os.path.join(mnt, "filler")
        os.truncate(filler, os.path.getsize(filler) - leave)
'''


def _child(code: str, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", FILL_DISK + code, *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != -signal.SIGBUS, f"killed by SIGBUS: {r.stdout} {r.stderr[-800:]}"
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    return r


def test_full_disk_many_open_scans_never_kill_the_process(small_tmpfs):
    """Each unfinished scan kept an LMDB reader slot in lock.mdb, which LMDB writes only
    through a shared mmap; the file was sparse, so on a full disk the first scan to need a
    new slot page died of SIGBUS.  Now every slot is allocated when the store opens (and
    since audit 60 an unfinished scan holds no slot between its reads; threads reading at
    once still take slots)."""
    r = _child(r'''
import walstore
mnt = sys.argv[1]
s = walstore.open(os.path.join(mnt, "s"))
for i in range(300):
    with s.transaction() as tx:
        tx.put(f"k{i:04d}", "v")
s.checkpoint()  # rows in LMDB: an unfinished scan kept its read transaction
fill(mnt)
its = []
for n in range(300):
    it = s.scan()
    next(it)
    its.append(it)
assert s.get("k0007") == "v"
print("scans", len(its))
''', small_tmpfs)
    assert "scans 300" in r.stdout


def test_open_on_a_nearly_full_disk_fails_with_an_error_never_sigbus(small_tmpfs):
    """Opening a new store with a few KiB free: LMDB initialised its sparse lock file
    through a shared mmap inside lmdb.open and the process died of SIGBUS.  Now the lock
    file is allocated first, and a disk too full for it is a StoreIOError (ENOSPC); once
    there is room the store opens."""
    r = _child(r'''
import errno, walstore
mnt = sys.argv[1]
for leave in (0, 4096, 8192, 12288, 16384, 32768, 49152):
    fill(mnt, leave)
    try:
        walstore.open(os.path.join(mnt, f"s{leave}")).close()
        print("opened with", leave, flush=True)
    except walstore.StoreIOError as e:
        assert e.errno == errno.ENOSPC, repr(e)
        print("refused with", leave, flush=True)
    os.unlink(os.path.join(mnt, "filler"))
''', small_tmpfs)
    assert "refused with 0" in r.stdout


def test_lock_file_is_allocated_not_sparse(tmp_path):
    """Every page of lock.mdb has its block once the store is open (writer, and a reader
    beside it), so LMDB's writes through its mmap never need one."""
    with walstore.open(str(tmp_path / "s")) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        lock = tmp_path / "s" / "db" / "lock.mdb"
        st = os.stat(lock)
        assert st.st_size >= 64 * 1024 and st.st_blocks * 512 >= st.st_size
        with walstore.open(str(tmp_path / "s"), readonly=True) as r:
            assert r.get("k") == 1
            assert list(r.scan()) == [("k", 1)]
        s.checkpoint()
        assert s.get("k") == 1

# ---- a transaction with an action when the disk fills up ------------------------------------
@pytest.mark.parametrize("space", ["back-meanwhile", "still-full"])
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_an_abort_that_cannot_be_written_still_compensates_before_the_store_commits_on(
        tmp_path, faults, end, space):
    """The disk fills up under a transaction that charged: its COMMIT cannot be written
    (or, rolled back, nothing is to be written but the ABORT), and neither can the ABORT.
    It never reached its commit point, so its refund runs at once, once, its outcome
    recorded ("back-meanwhile": space came back while it ran); when even that cannot be
    recorded ("still-full") the store turns read-only and the next open decides, running
    it again with the same idempotency key.  (It said "read-only, the compensations run
    when the store is reopened" and went on taking commits, the charge neither refunded
    nor listed as owed.)"""
    path = tmp_path / "store"
    ledger = []

    def refund(act):
        ledger.append(("refund", act.key))
        if space == "back-meanwhile":
            faults.clear()

    s = walstore.open(str(path), compensators={"refund": refund})
    try:
        tx = s.transaction()
        tx.put("order", 1)
        with tx.action("charge", compensate="refund") as charge:
            ledger.append(("charge", charge.key))
        with tx.action("note") as note:  # declares no compensation: nothing is owed
            pass
        faults.fail("pwrite", errno.ENOSPC, path="*.wal", times=None)
        error = None
        try:
            tx.commit() if end == "commit" else tx.rollback()
        except walstore.WalstoreError as e:
            error = e
        faults.clear()
        assert tx.state == "rolled back"
        assert ledger == [("charge", charge.key), ("refund", charge.key)]  # at once
        if space == "back-meanwhile":
            if end == "commit":  # the commit's own error, nothing else
                assert isinstance(error, OSError) and error.errno == errno.ENOSPC, error
            else:
                assert error is None, error
            assert {a.id: a.state for a in s.actions()} == {charge.id: "compensated",
                                                             note.id: "resolved"}
            assert s.pending_compensations() == [] and s.retry_compensations() == []
            put(s, "later", 1)  # the store goes on
        else:
            assert isinstance(error, walstore.CompensationFailed), error
            with pytest.raises(walstore.ReadOnlyError):  # it says so, and is
                put(s, "later", 1)
    finally:
        s.close()
    with walstore.open(str(path), compensators={"refund": refund}) as s:
        assert s.get("order") is None
        assert ("later" in s) is (space == "back-meanwhile")
        assert {a.id: a.state for a in s.actions()} == {charge.id: "compensated",
                                                         note.id: "resolved"}
        assert s.pending_compensations() == []
    refunds = [x for x in ledger if x[0] == "refund"]
    assert refunds == [("refund", charge.key)] * (1 if space == "back-meanwhile" else 2)
    rep = verify_store(str(path))
    assert rep.ok, rep.errors


# ---- two-phase commit -----------------------------------------------------------------------
def test_an_fsync_error_on_prepare_leaves_the_transaction_in_doubt_never_rolled_back(
        tmp_path, faults):
    """The PREPARE's fsync fails: CommitOutcomeUnknown, and the transaction's outcome is
    unknown, as after a commit's failed fsync: a rollback is refused, nothing is
    compensated, and the next open decides (here the record survived: prepared, in
    doubt).  (It stayed "active"; its rollback said "rolled back" of a transaction the
    next open found prepared, and a coordinator's commit_prepared committed it.)"""
    path = tmp_path / "store"
    ledger = []
    comps = {"refund": lambda act: ledger.append("refund")}
    s = walstore.open(str(path), compensators=comps)
    try:
        tx = s.transaction()
        tx.put("order", 1)
        with tx.action("charge", compensate="refund"):
            ledger.append("charge")
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        with pytest.raises(walstore.CommitOutcomeUnknown):
            tx.prepare("g1")
        assert rule.fired == 1
        assert tx.state == "outcome unknown" and tx.gid == "g1"
        with pytest.raises(walstore.TransactionClosed, match="unknown"):
            tx.rollback()
        with pytest.raises(walstore.TransactionClosed):
            tx.commit()
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "later", 1)
        assert ledger == ["charge"]
    finally:
        s.close()
    faults.clear()
    with walstore.open(str(path), compensators=comps) as s:
        assert s.prepared() == ["g1"] and s.get("order") is None
        assert ledger == ["charge"]
        s.rollback_prepared("g1")
        assert ledger == ["charge", "refund"] and s.get("order") is None


def _prepared_charge(path):
    """A store at ``path`` whose transaction put ``paid`` and charged (a refund owed on
    rollback), prepared as ``g1``: (ledger, compensators, store, transaction)."""
    ledger: list = []
    comps = {"refund": lambda act: ledger.append("refund")}
    s = walstore.open(str(path), compensators=comps)
    tx = s.transaction()
    tx.put("paid", 1)
    with tx.action("charge", compensate="refund"):
        ledger.append("charge")
    tx.prepare("g1")
    return ledger, comps, s, tx


@pytest.mark.parametrize("via", ["tx", "store"])
def test_an_fsync_error_on_a_prepared_transactions_commit_leaves_it_in_doubt(
        tmp_path, faults, via):
    """The COMMIT deciding a prepared transaction fails its fsync (``tx.commit()`` or
    ``store.commit_prepared``): the outcome is unknown, as a plain commit's — the
    transaction reads "outcome unknown" and its rollback says so; ``decision()`` reports
    no commit (it said "commit" of a record that may not survive, and a coordinator acts
    on it), ``prepared()`` still lists it; nothing is compensated, and the next open
    decides (here the record survived: committed).  (Found by probe-engine: tx.state stayed
    "active", prepared() was [], and tx.rollback() raised "no prepared transaction".)"""
    path = tmp_path / "store"
    ledger, comps, s, tx = _prepared_charge(path)
    try:
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        with pytest.raises(walstore.CommitOutcomeUnknown):
            tx.commit() if via == "tx" else s.commit_prepared("g1")
        assert rule.fired == 1
        assert s.decision("g1") == "prepared" and s.prepared() == ["g1"]
        assert s.get("paid") is None  # (not published: not visible either)
        if via == "tx":
            assert tx.state == "outcome unknown"
        with pytest.raises(walstore.TransactionClosed, match="outcome is unknown"):
            tx.rollback()
        assert tx.state == "outcome unknown"
        with pytest.raises(walstore.TransactionClosed):
            tx.commit()
        with pytest.raises(walstore.ReadOnlyError):
            s.rollback_prepared("g1")
        with pytest.raises(walstore.ReadOnlyError):
            s.commit_prepared("g1")
        assert ledger == ["charge"]
    finally:
        s.close()
    faults.clear()
    with walstore.open(str(path), compensators=comps) as s:
        assert s.prepared() == [] and s.decision("g1") == "commit" and s.get("paid") == 1
        assert ledger == ["charge"]


def test_an_fsync_error_on_a_prepared_transactions_rollback_leaves_it_in_doubt(
        tmp_path, faults):
    """The ROLLBACK_PREPARED of ``tx.rollback()`` fails its fsync: the transaction reads
    "outcome unknown" (it read "rolled back"), ``decision()`` reports no abort, nothing
    is compensated then, and the next open decides (the record survived: rolled back,
    compensated then)."""
    path = tmp_path / "store"
    ledger, comps, s, tx = _prepared_charge(path)
    try:
        faults.fail(SYNCS, errno.EIO, path="*.wal")
        with pytest.raises(walstore.CommitOutcomeUnknown):
            tx.rollback()
        assert tx.state == "outcome unknown"
        assert s.decision("g1") == "prepared" and s.prepared() == ["g1"]  # (in doubt)
        with pytest.raises(walstore.TransactionClosed, match="outcome is unknown"):
            tx.rollback()
        assert ledger == ["charge"]
    finally:
        s.close()
    faults.clear()
    with walstore.open(str(path), compensators=comps) as s:
        assert s.prepared() == [] and s.decision("g1") == "abort" and s.get("paid") is None
        assert ledger == ["charge", "refund"]


# ---- checkpoints, stats and close: the WAL directory ----------------------------------------
def _several_segments(s) -> None:
    for i in range(60):
        put(s, f"k{i}", value_for(i, 500))
    s._engine.wal._await_spare()  # (the spare thread's own directory fsync is done)
    assert len(list_segments(str(s.path) + "/wal")) >= 3


def test_a_wal_directory_gone_under_the_store_is_a_walstore_error_and_close_unlocks(tmp_path):
    """No OS error leaves the API raw: the wal/ directory removed under an open store made
    stats(), checkpoint() and close() raise FileNotFoundError."""
    path = tmp_path / "store"
    s = walstore.open(str(path))
    put(s, "a", 1)
    s._engine.wal._await_spare(timeout=30)  # (the spare thread's file, made meanwhile in
    # wal/, failed the rmtree once: "Directory not empty", audit 67)
    shutil.rmtree(path / "wal")
    with pytest.raises(walstore.StoreIOError) as ei:
        s.stats()
    assert ei.value.errno == errno.ENOENT and "wal" in str(ei.value), ei.value
    # the checkpoint's sync finds the segment has no name left: the log stops (read-only),
    # as after any failed fsync (no later commit is acknowledged into the deleted file)
    from walstore.log.segment import NAME_CHECK_S
    time.sleep(NAME_CHECK_S * 2)  # (the name is checked at most that often)
    with pytest.raises(walstore.ReadOnlyError, match="deleted while the store was open"):
        s.checkpoint()
    s.close()  # (the log stopped: nothing more to write; the lock is let go)
    assert s.closed
    with pytest.raises(walstore.CorruptionError, match="wal"):  # not StoreLocked
        walstore.open(str(path))


def test_a_wal_segment_that_cannot_be_removed_fails_the_checkpoint_with_a_walstore_error(
        tmp_path, faults):
    """checkpoint()'s trim could not unlink an old segment (an unwritable directory,
    EROFS): StoreIOError naming it, not a raw PermissionError; the store goes on, and the
    next checkpoint trims."""
    path = tmp_path / "store"
    with walstore.open(str(path), segment_size=8192) as s:
        _several_segments(s)
        rule = faults.fail("unlink", errno.EACCES, path="*.wal", times=None)
        with pytest.raises(walstore.StoreIOError) as ei:
            s.checkpoint()
        assert rule.fired >= 1
        assert ei.value.errno == errno.EACCES and ".wal" in str(ei.value), ei.value
        faults.clear()
        put(s, "after", 1)
        assert s.checkpoint()["segments_removed"] >= 2
        _several_segments(s)
        faults.fail("unlink", errno.EACCES, path="*.wal", times=None)
        with pytest.raises(walstore.StoreIOError):  # close() too, and it unlocks
            s.close()
        assert s.closed
    faults.clear()
    reopen_and_check(path, {"after": 1, "k59": value_for(59, 500)})


def test_eio_on_the_directory_fsync_of_a_checkpoints_trim_turns_the_store_read_only(
        tmp_path, faults):
    """The WAL directory's fsync after the trim removed old segments fails: as any failed
    fsync of the log, the store turns read-only (a ReadOnlyError, never a raw OSError) and
    the fsync is never retried.  (It escaped raw, and the next commit succeeded.)"""
    path = tmp_path / "store"
    s = walstore.open(str(path), segment_size=8192)
    wal_dir = str(path / "wal")
    try:
        _several_segments(s)
        acked = {f"k{i}": value_for(i, 500) for i in range(60)}
        rule = faults.fail("fsync_dir", errno.EIO, path=wal_dir)
        with pytest.raises(walstore.ReadOnlyError):
            s.checkpoint()
        assert rule.fired == 1
        with pytest.raises(walstore.ReadOnlyError):
            put(s, "later", 1)
        later = faults.calls_to("fsync_dir", path=wal_dir, after=rule.failed_calls[0].seq)
        assert not later, "the failed directory fsync was retried"
    finally:
        s.close()
    faults.clear()
    reopen_and_check(path, acked, absent=["later"])


def test_no_commit_is_acknowledged_after_wal_was_deleted_under_the_open_store(tmp_path):
    """Another process removes ``wal/`` (an operator's cleanup script) while the store is
    open: every later commit was acknowledged, synced into a file no open could ever find.
    The first one synced NAME_CHECK_S (50 ms) after it now raises CommitOutcomeUnknown
    naming the cause, and the store turns read-only; the next open says the log is
    missing."""
    path = str(tmp_path / "s")
    st = walstore.open(path)
    try:
        with st.transaction() as tx:
            tx.put("before", 1)
        subprocess.run(["rm", "-rf", os.path.join(path, "wal")], check=True)
        from walstore.log.segment import NAME_CHECK_S
        time.sleep(NAME_CHECK_S * 2)  # (the name is checked at most that often: a cost)
        with pytest.raises(walstore.CommitOutcomeUnknown, match="deleted while the store"):
            with st.transaction() as tx:
                tx.put("after", 2)
        with pytest.raises(walstore.WalstoreError):
            with st.transaction() as tx:
                tx.put("later", 3)
    finally:
        try:
            st.close()
        except walstore.WalstoreError:
            pass
    with pytest.raises(walstore.CorruptionError, match="log is missing"):
        walstore.open(path)


def test_a_failed_compensation_record_names_the_compensations_it_left_unrun(tmp_path,
                                                                           faults):
    """A rollback of three actions; the fsync of the first compensation's record fails:
    the store turns read-only and the other two are not run (owed to the next open), but
    CompensationFailed named only the first (probe 54)."""
    ran = []

    def refund(action):
        ran.append(action.id)
        if len(ran) == 1:
            faults.fail(("fsync", "fdatasync"), errno.EIO, path="*.wal", times=1)
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refund})
    try:
        tx = s.transaction()
        tx.put("x", 1)
        for _ in range(3):
            with tx.action("charge", compensate="refund"):
                pass
        with pytest.raises(walstore.CompensationFailed) as ei:
            tx.rollback()
        owed = sorted(a.id for a in s.pending_compensations())
        assert ran == [owed[-1]] and len(owed) == 3
        assert sorted(ei.value.action_ids) == owed, (ei.value.action_ids, owed)
        assert all(repr(i) in str(ei.value) for i in owed), str(ei.value)
    finally:
        s.close()
    faults.clear()
    with walstore.open(str(tmp_path / "s"), compensators={"refund": refund}) as s:
        # the other two ran; the first again only if its record did not survive
        assert s.pending_compensations() == [] and set(ran) == set(owed)
        assert len(ran) in (3, 4) and {a.state for a in s.actions()} == {"compensated"}
