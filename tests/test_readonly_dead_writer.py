"""A read-only open of a store whose writer is gone shows what the next writer's recovery
keeps, or refuses — never a silent prefix (CONTRACT, section 4, promises 1 and 9;
probe-disk42): a stale or torn VISIBLE mark (never fsynced: a power loss leaves either)
hid acknowledged commits, and an LMDB file older than the log (the log beginning past its
applied LSN) was shown as the store's state, exit 0."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest

import walstore

CHILD = r'''
import os, signal, sys, walstore
s = walstore.open(sys.argv[1], durability="full")
for i in range(5):
    with s.transaction() as tx:
        tx.put(f"early{i}", i)
s.checkpoint()  # LMDB applied up to here
for i in range(5):
    with s.transaction() as tx:
        tx.put(f"late{i}", i)  # acknowledged: fsynced, past LMDB
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("crashed") / "s")
    subprocess.run([sys.executable, "-c", CHILD, path], check=False)
    return path


def _copy(src, tmp_path, mutate_visible):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    vis = os.path.join(dst, "VISIBLE")
    raw = bytearray(open(vis, "rb").read())
    mutate_visible(raw)
    with open(vis, "wb") as f:
        f.write(bytes(raw))
    return dst


def _torn(raw):
    raw[24:32] = b"\x01" * 8  # the check word disagrees


def _stale(raw):
    magic, gen, _mark, _check = struct.unpack("=8sQQQ", bytes(raw))
    raw[:] = struct.pack("=8sQQQ", magic, gen, 100, 100 ^ gen ^ ((1 << 64) - 1))


@pytest.mark.parametrize("mutate", [_torn, lambda raw: None], ids=["torn-mark", "mark-as-left"])
def test_a_dead_writers_mark_hides_no_acknowledged_commit(crashed, tmp_path, mutate):
    """In the boot the writer died in: a mark left whole bounds what is shown (records past
    it may never reach the disk), a torn one is its stored mark word (the writer died
    between its two stores: a publication whose fsync had returned)."""
    path = _copy(crashed, tmp_path, mutate)
    with walstore.open(path, readonly=True, create=False) as s:
        assert [s.get(f"late{i}") for i in range(5)] == list(range(5))
        assert s.get("early4") == 4
    cli = subprocess.run([sys.executable, "-m", "walstore", "get", path, "late4"],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.strip() == "4"
    with walstore.open(path) as w:  # (what the writer's recovery keeps: the same)
        assert [w.get(f"late{i}") for i in range(5)] == list(range(5))


@pytest.mark.parametrize("mutate", [_stale, _torn], ids=["stale-mark", "torn-mark"])
def test_after_a_reboot_the_dead_writers_mark_bounds_nothing(crashed, tmp_path, mutate,
                                                             monkeypatch):
    """VISIBLE is never fsynced: after a power loss it holds whatever reached the disk —
    an older mark than the acknowledged commits (which are on disk), or a torn one.  A
    mark made before this boot bounds nothing: every record the judge accepted is on disk."""
    from walstore.engine import visible
    path = _copy(crashed, tmp_path, mutate)
    made = os.stat(os.path.join(path, "VISIBLE")).st_ctime
    monkeypatch.setattr(visible, "boot_time", lambda: made + 1)  # (booted since)
    with walstore.open(path, readonly=True, create=False) as s:
        assert [s.get(f"late{i}") for i in range(5)] == list(range(5))
    monkeypatch.setattr(visible, "boot_time", lambda: made - 1)  # (this boot: honoured)
    if mutate is _stale:
        with walstore.open(path, readonly=True, create=False) as s:
            assert s.get("late4") is None and s.get("early4") == 4


def test_a_reader_follows_a_writer_that_opens_after_it(crashed, tmp_path):
    """Opened with no writer alive, the reader shows the dead writer's log; a writer that
    opens later makes a new generation, and the reader then follows its marks."""
    path = _copy(crashed, tmp_path, _torn)
    r = walstore.open(path, readonly=True, create=False)
    try:
        assert r.get("late4") == 4
        with walstore.open(path) as w:
            with w.transaction() as tx:
                tx.put("after", 1)
            assert r.get("after") == 1 and r.get("late4") == 4
    finally:
        r.close()


def test_an_lmdb_file_older_than_the_log_is_refused_by_a_read_only_open(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, segment_size=8192) as s:
        with s.transaction() as tx:
            tx.put("k", 0)
    old = str(tmp_path / "old.mdb")
    shutil.copy(os.path.join(path, "db", "data.mdb"), old)  # a clean, older copy
    with walstore.open(path, segment_size=8192) as s:
        for i in range(1, 400):
            with s.transaction() as tx:
                tx.put("k", i)
                tx.put(f"new{i}", i)
        s.checkpoint()  # (the log before it is trimmed)
    shutil.copy(old, os.path.join(path, "db", "data.mdb"))
    with pytest.raises(walstore.CorruptionError, match="gap"):
        walstore.open(path, readonly=True, create=False)
    cli = subprocess.run([sys.executable, "-m", "walstore", "get", path, "k"],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and "gap" in cli.stderr


_W1 = r'''
import sys, time, walstore
s = walstore.open(sys.argv[1], durability="normal")
lsns = []
for n in range(1, 201):
    with s.transaction() as tx:
        tx.put("seq", n)
        tx.put("tok", f"1:{n}")
    lsns.append(tx.lsn)
print(lsns[149], flush=True)  # the LSN of commit 150
time.sleep(60)
'''
_W2 = r'''
import errno, os, sys, time, walstore
from walstore import fileio
from walstore.fileio import OSBackend
armed = [False]
class Slow(OSBackend):  # the WAL's fsync hangs, then fails
    def _wal(self, fd):
        return armed[0] and os.readlink(f"/proc/self/fd/{fd}").endswith(".wal")
    def fsync(self, fd):
        if self._wal(fd):
            time.sleep(2); raise OSError(errno.EIO, "injected")
        return super().fsync(fd)
    def fdatasync(self, fd):
        if self._wal(fd):
            time.sleep(2); raise OSError(errno.EIO, "injected")
        return super().fdatasync(fd)
s = walstore.open(sys.argv[1], durability="full")
fileio.set_backend(Slow()); armed[0] = True
print("committing", flush=True)
try:
    with s.transaction() as tx:
        tx.put("seq", 150)
        tx.put("tok", "2:150")
    print("acknowledged", flush=True)
except Exception as e:
    print("failed", type(e).__name__, flush=True)
time.sleep(60)
'''


def test_a_reader_follows_visible_made_anew_by_the_next_writer(tmp_path):
    """A reader kept the mapping of a VISIBLE deleted after it opened; the next writer
    made a new one, and the reader read the dead writer's mark — past the new log's end
    — and showed that writer's commit before its fsync returned, one that then failed
    (probe-readers42).  A reader whose read finds new records looks whether VISIBLE is
    still the file it mapped."""
    import time
    from walstore.log.format import SEGMENT_HEADER_SIZE
    from walstore.log.segment import list_segments
    store = str(tmp_path / "s")
    w1 = subprocess.Popen([sys.executable, "-c", _W1, store], stdout=subprocess.PIPE,
                          text=True)
    cut = int(w1.stdout.readline())
    w1.kill()
    w1.wait()
    # a power-loss image: from commit 150's record on, nothing was synced
    start, path = [(s, p) for s, p in list_segments(os.path.join(store, "wal")) if s <= cut][-1]
    off = cut - start + SEGMENT_HEADER_SIZE
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\0" * (os.path.getsize(path) - off))
    for s2, p2 in list_segments(os.path.join(store, "wal")):
        if s2 > start:
            os.unlink(p2)
    r = walstore.open(store, readonly=True)
    w2 = None
    try:
        assert r.get("seq") == 149
        os.unlink(os.path.join(store, "VISIBLE"))  # deleted while no writer runs
        w2 = subprocess.Popen([sys.executable, "-c", _W2, store], stdout=subprocess.PIPE,
                              text=True)
        assert w2.stdout.readline().split()[0] == "committing"
        shown = []
        end = time.monotonic() + 1.5  # (the writer's fsync is still running)
        while time.monotonic() < end:
            shown.append(r.get("tok"))
            time.sleep(0.01)
        assert w2.stdout.readline().split()[:2] == ["failed", "CommitOutcomeUnknown"]
        assert "2:150" not in shown and r.get("tok") != "2:150"
    finally:
        if w2 is not None:
            w2.kill()
            w2.wait()
        r.close()
