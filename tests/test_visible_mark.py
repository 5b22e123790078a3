"""A read-only process shows exactly what the writer shows (the writer's publication mark,
shared in ``<store>/VISIBLE``: walstore.engine.visible).

Found by probe-engine: a read-only process followed every whole record of the WAL, so it
showed a commit whose fsync failed (the writer raised CommitOutcomeUnknown and hid it) or
was still running (commit() had not returned), and a power loss then erased a commit
another process had acted on.  Real processes: a writer and read-only readers.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

import walstore
from walstore import fileio
from walstore.log.format import SEGMENT_HEADER_SIZE
from walstore.log.segment import list_segments
from tools.faults import FaultBackend, installed

from line_process import LineProcess
from visible_support import FsyncGate

HERE = Path(__file__).resolve().parent
READER = HERE / "twophase_scripts" / "reader.py"
WRITER = HERE / "findings_scripts" / "visible_writer.py"


class Procs:
    """Child processes of one test, all ended at its end."""

    def __init__(self) -> None:
        self.procs: list[LineProcess] = []

    def reader(self, path: str) -> LineProcess:
        p = LineProcess(READER, path, quit_timeout=30)
        self.procs.append(p)
        return p

    def writer(self, path: str, durability: str) -> LineProcess:
        p = LineProcess(WRITER, path, durability, quit_timeout=30)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                p.close()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


@pytest.fixture
def gate():
    g = FsyncGate()
    previous = fileio.set_backend(g)
    yield g
    g.release()
    fileio.set_backend(previous)


def kill(p: LineProcess) -> None:
    p.proc.kill()  # SIGKILL: no close, no clean flag, the mark left as it was
    p.proc.wait()


def zero_from(path: str, lsn: int) -> None:
    """Zero the log from ``lsn`` on (its segment's rest): those records were lost, as a
    power loss loses unsynced pages, or an fsync error its dirty ones."""
    start, seg = [(s, p) for s, p in list_segments(os.path.join(path, "wal")) if s <= lsn][-1]
    offset = lsn - start + SEGMENT_HEADER_SIZE
    fd = os.open(seg, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(os.fstat(fd).st_size - offset), offset)
    finally:
        os.close(fd)


def test_a_commit_whose_fsync_failed_is_shown_by_no_reader(tmp_path, procs):
    path = str(tmp_path / "s")
    st = walstore.open(path, durability="full")
    with st.transaction() as tx:
        tx.put("paid", False)
    r = procs.reader(path)
    assert r("get", "paid") is False
    fb = FaultBackend()
    with installed(fb):
        fb.fail("fdatasync", errno.EIO, path="*.wal")
        tx = st.transaction()
        tx.put("paid", True)
        with pytest.raises(walstore.CommitOutcomeUnknown):
            tx.commit()
        assert st.get("paid") is False
        assert r("get", "paid") is False  # (it showed True: whole in the page cache)
        assert r("begin") == "ok"
        assert r("txget", "paid") is False
        assert r("commit") == "committed"
    st.close()  # a failed store: no clean close, its mark stays where it was
    late = procs.reader(path)  # no live writer: the last mark bounds what it shows
    assert late("get", "paid") is False and r("get", "paid") is False
    st = walstore.open(path, durability="full")  # recovery decides the commit
    try:
        decided = st.get("paid")
        assert r("get", "paid") == decided and late("get", "paid") == decided
    finally:
        st.close()


def test_a_commit_whose_fsync_is_still_running_is_not_shown(tmp_path, procs, gate):
    path = str(tmp_path / "s")
    st = walstore.open(path, durability="full")
    try:
        with st.transaction() as tx:
            tx.put("paid", False)
        r = procs.reader(path)
        gate.hold()
        t = threading.Thread(target=st.run, args=(lambda tx: tx.put("paid", True),))
        t.start()
        gate.entered.wait()  # the record is written; its fsync has not returned
        assert st.get("paid") is False
        assert r("get", "paid") is False  # (it showed True)
        assert r("begin") == "ok"
        assert r("txget", "paid") is False
        assert r("commit") == "committed"
        gate.release()
        t.join()
        assert r("get", "paid") is True  # acknowledged before this read: seen
    finally:
        gate.release()
        st.close()


def test_a_crashed_writers_unacknowledged_commit_stays_hidden_until_recovery(tmp_path,
                                                                             procs):
    path = str(tmp_path / "s")
    w = procs.writer(path, "full")
    w("put", "paid", "false")
    before = procs.reader(path)
    assert before("get", "paid") is False
    assert w("held", "paid", "true") == "held"
    assert before("get", "paid") is False
    kill(w)  # killed in the fsync: the record is whole in the page cache, never acked
    assert before("get", "paid") is False
    after = procs.reader(path)  # opened with no writer: the last mark bounds it too
    assert after("get", "paid") is False
    assert after("scan") == {"paid": False}
    st = walstore.open(path, durability="full")  # recovery decides, then publishes
    try:
        decided = st.get("paid")
        assert before("get", "paid") == decided and after("get", "paid") == decided
    finally:
        st.close()


def test_a_reader_forgets_a_crashed_writers_tail_that_the_next_writer_replaced(tmp_path,
                                                                               procs):
    path = str(tmp_path / "s")
    w = procs.writer(path, "full")
    end = w("put", "paid", "false")
    r = procs.reader(path)
    assert r("get", "paid") is False
    assert w("held", "paid", "true", "2000") == "held"
    assert r("get", "paid") is False  # read, queued, not shown
    kill(w)
    zero_from(path, end)  # the unsynced record is lost; the next writer writes there
    st = walstore.open(path, durability="full")
    try:
        assert st.get("paid") is False
        with st.transaction() as tx:
            tx.put("paid", "refunded")
        # a new writer generation: the reader reads the log again from its own mark
        assert r("get", "paid") == "refunded"
        assert r("get", "pad") is None
        assert r("scan") == {"paid": "refunded"}
    finally:
        st.close()


def test_a_reopened_writer_resets_the_mark_before_it_appends(tmp_path, procs, gate):
    path = str(tmp_path / "s")
    w = procs.writer(path, "none")  # published at write: the mark is the log's end
    w("put", "a", "1")
    cut = w("checkpoint")  # (so the next open has nothing to redo: it appends nothing)
    w("put", "paid", "true", "4000")
    kill(w)
    zero_from(path, cut)  # a power loss took the unsynced tail: the mark lies past the log
    st = walstore.open(path, durability="full")
    try:
        assert st.get("paid") is None
        assert st.stats()["wal_end_lsn"] == cut  # the commit below goes where it was
        gate.hold()
        t = threading.Thread(target=st.run, args=(lambda tx: tx.put("paid", "pending"),))
        t.start()
        gate.entered.wait()  # a record below the crashed writer's mark, not yet durable
        r = procs.reader(path)
        assert st.get("paid") is None
        assert r("get", "paid") is None
        assert r("get", "a") == 1
        gate.release()
        t.join()
        assert r("get", "paid") == "pending"
    finally:
        gate.release()
        st.close()


def test_a_clean_close_shows_everything_and_old_stores_read_as_before(tmp_path, procs):
    path = str(tmp_path / "s")
    st = walstore.open(path, durability="full")
    for i in range(5):
        with st.transaction() as tx:
            tx.put(f"k{i}", i)
    st.close()
    assert stat.S_IMODE(os.stat(os.path.join(path, "VISIBLE")).st_mode) == 0o600
    assert procs.reader(path)("scan") == {f"k{i}": i for i in range(5)}
    os.unlink(os.path.join(path, "VISIBLE"))  # a store whose writers predate the file
    assert procs.reader(path)("scan") == {f"k{i}": i for i in range(5)}


def test_visible_stays_as_earlier_readers_read_it_and_the_purge_count_is_beside_it(tmp_path):
    """A fifth word made VISIBLE 40 bytes, which a reader of the previous release takes for
    no mark at all (it then shows every whole record, unpublished commits too:
    probe-review).  VISIBLE stays 32 bytes; the writer's purge counter is its own file,
    PURGES (0600), moved by one at each purge applied and random at each writer open."""
    from walstore.engine.visible import MarkReader
    path = str(tmp_path / "s")
    st = walstore.open(path, durability="none")
    try:
        assert os.path.getsize(os.path.join(path, "VISIBLE")) == 32
        purges = os.path.join(path, "PURGES")
        assert os.path.getsize(purges) == 16
        assert stat.S_IMODE(os.stat(purges).st_mode) == 0o600
        marks = MarkReader(path)
        first = marks.purge_epoch()
        assert first is not None
        with st.transaction() as tx:
            tx.put("user/1", 1)
        assert marks.purge_epoch() == first  # (a commit is no purge)
        st.purge("user/")
        assert marks.purge_epoch() == (first[0], (first[1] + 1) % (1 << 64))
        marks.close()
    finally:
        st.close()


@pytest.mark.parametrize("name", ["VISIBLE", "PURGES"])
def test_something_else_in_place_of_a_shared_file_neither_hangs_nor_blocks_writers(
        tmp_path, name):
    """A FIFO in place of VISIBLE or PURGES hung every read-only open in its open(); a
    directory or a symlink there refused every writable open (EISDIR, ELOOP) while verify
    said ok; a stale .tmp beside a well-formed file stayed for good (probe-ops).  A reader
    takes such a file for none; a writer replaces it (derived files, never fsynced)."""
    import subprocess
    import sys
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as st:
        with st.transaction() as tx:
            tx.put("a", 1)
    target = os.path.join(path, name)
    os.unlink(target)
    os.mkfifo(target, 0o600)
    code = ("import sys, walstore\n"
            "with walstore.open(sys.argv[1], readonly=True) as s:\n"
            "    print(s.get('a'))\n")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "1", r.stderr[-1000:]
    for make in (os.mkdir, lambda p: os.symlink(str(tmp_path / "elsewhere"), p),
                 lambda p: os.mkfifo(p, 0o600)):
        if os.path.lexists(target):
            os.rmdir(target) if os.path.isdir(target) and not os.path.islink(target) \
                else os.unlink(target)
        make(target)
        with walstore.open(path, durability="none") as st:
            with st.transaction() as tx:
                tx.put("a", 2)
        assert stat.S_ISREG(os.lstat(target).st_mode)
        assert not os.path.exists(tmp_path / "elsewhere")
    with open(target + ".tmp", "wb") as f:
        f.write(b"stale")
    with walstore.open(path, durability="none"):
        pass
    assert not os.path.lexists(target + ".tmp")


def test_a_store_io_error_is_one_line_without_errno_noise(tmp_path):
    """An OS error while opening (here a non-empty directory where PURGES goes) read
    "[Errno 21] opening the store at ... failed: ...: '...' (... [EISDIR]: ...)": the
    cause said twice, one of them in Python's form (probe-ops).  It is said once, in the
    README's form: "...failed: <what> [ERRNO]: <file>", exit 1."""
    import subprocess
    import sys
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none"):
        pass
    os.unlink(os.path.join(path, "PURGES"))
    os.makedirs(os.path.join(path, "PURGES", "x"))
    r = subprocess.run([sys.executable, "-m", "walstore", "put", path, "a", "1"],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "[Errno" not in lines[0] and lines[0].count("[EISDIR]") == 1, lines[0]
    assert lines[0].endswith(os.path.join(path, "PURGES")), lines[0]
