"""Stop 83 review (h1) of the lazy WAL spare (dc2cbfb0, 01af0eb3): the spare segment
(``wal/spare.tmp``) is now made once the log's end passes half of the segment an open
found (``WriteAheadLog._spare_at``), at once when the open finds it past half, after each
rotation, or on ``request_spare()``; and an open's tail scan (``last_nonzero_end``) now
compares 64 KiB chunks with zeros instead of stripping them.

Found:
- ``last_nonzero_end`` given a source that reads short (a segment that shrank after its
  size was taken: ``FileBytes`` reads what is there) stopped at the first short all-zero
  chunk and returned that chunk's start as "the last non-zero byte"; ``rstrip`` before
  went on to the chunks below and found the real one.  Found by h2 as well and fixed in
  46853a93 while this review ran (its test: tests/test_stop83_review_open.py).
- ``WriteAheadLog.request_spare()`` (new in dc2cbfb0) called while the spare thread is
  filling a spare (after a rotation, or a second request) waits for the whole fill
  holding the WAL's ``lock``: the caller and every commit of the store stall until the
  fill ends (a 16 MiB zero-fill, written back 256 KiB at a time); its doc says "in the
  background".  Fixed at stop 83: it asks only when no fill is asked for or under way,
  outside ``lock``.

Driven and found right (tests below): the spare's fill failing mid-run (EIO / ENOSPC in
its writes: rotations make their segment inline and the log goes on, an EIO said in
``stats()``; EIO in its write-back or fsync: the commit in hand fails with a clear
error, the store turns read-only, every acknowledged commit survives a reopen), also
under a group commit of several threads crossing the half; kill -9 of a durable writer
while its spare is being filled (every acknowledged commit after reopen, ``walstore
verify`` clean, the half-filled spare never used); power-loss images of a recording
that holds the spare's first fill at the half (tools/powerloss.py without its request);
a read-only open beside a writer past the half (no spare made, the writer's left
alone); a reopen with a smaller ``segment_size`` (timed by the segment found, sized by the option); ``request_spare``
on a closed or failed log (nothing made, no I/O).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import walstore
from walstore.errors import ReadOnlyError
from walstore.log.writer import SEGMENT_HEADER_SIZE
from walstore.ops.verify import verify_store

from tools.faults import FaultBackend, installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def _wait(cond, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def _half(wal) -> int:
    w = wal.writer
    return w.start_lsn + (w.size - SEGMENT_HEADER_SIZE) // 2


def _spare(path: str) -> str:
    return os.path.join(path, "wal", "spare.tmp")


# ---- found ---------------------------------------------------------------------------------
class _HeldSpare(FaultBackend):
    """Holds every write to ``wal/spare.tmp`` until ``gate`` is set (a slow fill)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.held = threading.Event()

    def pwrite(self, fd: int, data, offset: int) -> int:
        if (self.path_of(fd) or "").endswith("spare.tmp") and not self.gate.is_set():
            self.held.set()
            self.gate.wait(30)
        return super().pwrite(fd, data, offset)


def test_request_spare_during_a_fill_stalls_no_commit(tmp_path):
    """The half passed, the spare thread's fill held (a slow disk): a commit goes through
    (the fill is in the background); then ``request_spare()`` from another thread, and
    the next commit waited for the fill's end (as did the caller)."""
    path = str(tmp_path / "s")
    fb = _HeldSpare()
    with installed(fb):
        s = walstore.open(path, durability="full", segment_size=1 << 20)
        try:
            wal = s._engine.wal
            _commit_until(s, lambda: wal.written_lsn >= _half(wal))
            assert fb.held.wait(10), "the spare's fill never started"
            with s.transaction() as tx:  # (the fill held: a commit is not)
                tx.put("during", 1)
            asker = threading.Thread(target=wal.request_spare, daemon=True)
            asker.start()
            time.sleep(0.05)
            done = threading.Event()

            def commit() -> None:
                with s.transaction() as tx:
                    tx.put("after", 1)
                done.set()

            committer = threading.Thread(target=commit, daemon=True)
            committer.start()
            stalled = not done.wait(1.5)
            asker.join(0.1)
            waited = asker.is_alive()
            fb.gate.set()  # (the fill goes on: both end, the commit is made)
            asker.join(10)
            committer.join(10)
            assert done.is_set()
            assert not stalled, "a commit waited for the spare's fill (request_spare)"
            assert not waited, "request_spare waited for the fill"
        finally:
            fb.gate.set()
            s.close()


# ---- held: the spare's fill failing mid-run --------------------------------------------------
def _commit_until(s, cond, start: int = 0, limit: int = 2000, size: int = 1000):
    """Commit k<i> = 'v'*size until ``cond()``; (acknowledged keys, the errors raised)."""
    acked, errors = [], []
    for i in range(start, start + limit):
        if cond():
            break
        try:
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * size)
            acked.append(f"k{i}")
        except walstore.WalstoreError as e:
            errors.append(e)
            if len(errors) >= 3:
                break
    return acked, errors


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_a_spare_whose_fill_fails_mid_run_leaves_the_rotations_inline(tmp_path, error):
    path = str(tmp_path / "s")
    fb = FaultBackend()
    with installed(fb):
        with walstore.open(path, durability="full", segment_size=64 * 1024) as s:
            wal = s._engine.wal
            assert not wal._spare_wanted and wal._spare_at == _half(wal)
            rule = fb.fail("pwrite", error, path="spare.tmp", times=None)
            acked, errors = _commit_until(s, lambda: wal.rotations >= 2)
            assert not errors and wal.rotations == 2
            assert rule.fired >= 2  # (asked for at the half, and after the first rotation)
            assert wal.inline_preallocations == 2 and wal.failed is None and not s.readonly
            said = [e for e in s.stats()["background_errors"] if e.startswith("WAL spare")]
            assert bool(said) == (error == errno.EIO), said
    assert not os.path.exists(_spare(path))  # (every failed fill removed its file)
    with walstore.open(path) as s:
        assert all(s.get(k) == "v" * 1000 for k in acked)
    rep = verify_store(path)
    assert rep.ok, rep.errors


@pytest.mark.parametrize("op", ["write_back", "fsync"])
def test_a_spare_whose_write_back_fails_mid_run_turns_the_store_read_only(tmp_path, op):
    """The spare is now filled beside the commits (once the half is passed), not at open:
    its failed write-back / fsync stops the log under them.  The commit in hand fails
    (CommitOutcomeUnknown or ReadOnlyError), every later one is refused, every
    acknowledged one is there after a reopen."""
    path = str(tmp_path / "s")
    fb = FaultBackend()
    with installed(fb):
        s = walstore.open(path, durability="full", segment_size=64 * 1024)
        try:
            wal = s._engine.wal
            rule = fb.fail(op, errno.EIO, path="spare.tmp")
            acked, errors = _commit_until(s, lambda: False, limit=400)
            assert rule.fired == 1 and wal.failed is not None and s.readonly
            assert errors and all(isinstance(e, ReadOnlyError) for e in errors), errors
            assert "read-only" in str(errors[-1])
            _wait(lambda: not wal._spare_wanted, "the spare thread's attempt")
            assert wal.rotations == 0 and not os.path.exists(_spare(path))  # (discarded)
            calls = len(fb.calls)
            wal.request_spare()  # (a failed log: asked, nothing is written)
            _wait(lambda: not wal._spare_wanted, "the spare thread's answer")
            assert not os.path.exists(_spare(path)) and wal.spare.size == 0
            assert not [c for c in fb.calls[calls:] if (c.path or "").endswith("spare.tmp")]
        finally:
            s.close()
    with walstore.open(path) as s:
        assert acked and all(s.get(k) == "v" * 1000 for k in acked)
    rep = verify_store(path)
    assert rep.ok, rep.errors


def test_group_commit_threads_crossing_the_half_while_the_spare_fails(tmp_path):
    path = str(tmp_path / "s")
    fb = FaultBackend()
    acked, errors, lock = [], [], threading.Lock()
    with installed(fb):
        s = walstore.open(path, durability="full", segment_size=256 * 1024)
        wal = s._engine.wal
        half = _half(wal)
        rule = fb.fail("write_back", errno.EIO, path="spare.tmp")

        def worker(t: int) -> None:
            for i in range(150):
                try:
                    with s.transaction() as tx:
                        tx.put(f"t{t}-{i}", "x" * 900)
                    with lock:
                        acked.append(f"t{t}-{i}")
                except ReadOnlyError as e:
                    with lock:
                        errors.append(e)
                    return

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert rule.fired == 1 and wal.failed is not None and s.readonly
            assert len(errors) == 4  # (each thread told, none hung)
            assert wal.written_lsn >= half
        finally:
            s.close()
    with walstore.open(path) as s:
        assert all(s.get(k) == "x" * 900 for k in acked)
    assert verify_store(path).ok


# ---- held: kill -9 while the spare is being filled -------------------------------------------
CHILD = r"""
import os, sys
import walstore
s = walstore.open(sys.argv[1], durability="full")
out = os.fdopen(1, "w", buffering=1)
i = int(sys.argv[2])
while True:
    with s.transaction() as tx:
        tx.put(f"k{i}", os.urandom(3000).hex())
    out.write(f"{i}\n")
    i += 1
"""


def test_kill9_while_the_spare_is_filled_keeps_every_acknowledged_commit(tmp_path):
    path = str(tmp_path / "s")
    spare = _spare(path)
    p = subprocess.Popen([sys.executable, "-c", CHILD, path, "0"], stdout=subprocess.PIPE,
                         env=ENV)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        out = b""
        deadline = time.monotonic() + 30
        while True:  # (the first segment, 1 MiB, half written: its 4 MiB spare being made)
            assert time.monotonic() < deadline and p.poll() is None, "no spare appeared"
            out += p.stdout.read() or b""
            try:
                size = os.stat(spare).st_size
            except FileNotFoundError:
                time.sleep(0.0005)
                continue
            if b"\n" in out:
                break
        os.kill(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    out += p.stdout.read() or b""
    acked = [int(x) for x in out.decode().split("\n")[:-1]]
    assert acked and size < 4 * 1024 * 1024 + 1
    with walstore.open(path) as s:
        wal = s._engine.wal
        assert all(s.get(f"k{i}") is not None for i in acked)
        _wait(lambda: not wal._spare_wanted, "the reopen's spare thread")
        if os.path.exists(spare):  # (made by this open, whole: never the killed one's)
            assert os.path.getsize(spare) == wal.spare.size > 0
        i = acked[-1] + 1
        while wal.rotations == 0:  # (the rotation takes this open's spare)
            with s.transaction() as tx:
                tx.put(f"k{i}", "y" * 3000)
            i += 1
    v = subprocess.run([sys.executable, "-m", "walstore", "verify", path, "--json"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr


# ---- held: power loss while the spare is made mid-run ------------------------------------
def test_power_loss_images_of_a_run_whose_spare_is_made_at_the_half(tmp_path, monkeypatch):
    """tools/powerloss.py asks for the spare before its recording (``_spare_settled``):
    its images never hold the lazy spare's first fill.  Without that request the
    recording starts with no spare (the open below the half) and holds its creation,
    fill, fsync and activation at the half; every image keeps every acknowledged commit."""
    import tools.powerloss as pl
    seen = {}

    def no_request(store, timeout: float = 60.0) -> None:
        wal = store._engine.wal
        seen["asked"], seen["size"] = wal._spare_wanted, wal.spare.size

    monkeypatch.setattr(pl, "_spare_settled", no_request)
    s = pl.run(60, seed=83, commits=60, workdir=str(tmp_path))
    assert seen == {"asked": False, "size": 0}
    assert s["acks_checked"] > 0 and s["lost_commits"] == 0 and s["broken_images"] == 0, s


# ---- held: read-only opens, a smaller segment_size at reopen, request_spare when closed ------
def test_a_readonly_open_beside_a_writer_past_the_half_makes_no_spare(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="full", segment_size=64 * 1024) as s:
        wal = s._engine.wal
        _commit_until(s, lambda: wal.written_lsn >= _half(wal) + 4096 or wal.rotations)
        assert wal.rotations == 0
    if os.path.exists(_spare(path)):  # (the spare the half asked for, if made before close)
        os.unlink(_spare(path))
    with walstore.open(path, readonly=True) as r:
        assert r.get("k0") == "v" * 1000
        time.sleep(0.05)
    assert not os.path.exists(_spare(path))
    with walstore.open(path, durability="full", segment_size=64 * 1024) as w:
        wal = w._engine.wal
        _wait(lambda: wal.spare.size > 0 and not wal._spare_wanted, "no spare at open")
        before = os.stat(_spare(path))
        with walstore.open(path, readonly=True) as r:
            assert r.get("k1") == "v" * 1000
        after = os.stat(_spare(path))
        assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
        assert wal.spare.size == after.st_size


def test_a_reopen_with_a_smaller_segment_size_is_timed_by_the_segment_found(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="full") as s:  # (a 1 MiB first segment)
        _commit_until(s, lambda: False, limit=200)
        assert s._engine.wal.writer.size == 1024 * 1024
    with walstore.open(path, durability="full", segment_size=64 * 1024) as s:
        wal = s._engine.wal
        assert wal._spare_at == _half(wal) and not wal._spare_wanted
        _commit_until(s, lambda: wal.written_lsn >= _half(wal), start=200, limit=1000)
        _wait(lambda: wal.spare.size > 0 and not wal._spare_wanted, "no spare at the half")
        assert wal.spare.size == 64 * 1024 == wal.next_segment_size()
        _commit_until(s, lambda: wal.rotations > 0, start=2000, limit=1000)
        assert wal.inline_preallocations == 0
    assert verify_store(path).ok


def test_request_spare_on_a_closed_log_makes_nothing(tmp_path):
    path = str(tmp_path / "s")
    s = walstore.open(path)
    wal = s._engine.wal
    s.close()
    wal.request_spare()
    time.sleep(0.05)
    assert not os.path.exists(_spare(path)) and wal.spare.size == 0
