"""Audit 66: `walstore recover` of a store whose killed writer left a file transaction in
flight, on a nearly full real disk (a small tmpfs holding the store and its workspace, as
tools/fullsweep.py --workload files has them).  Recovery puts the files back (file undo);
room that is recovery's own — blobs nothing refers to any more, the WAL spare — must not
stand between that undo and the disk.  Each test is skipped where a tmpfs cannot be
mounted."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

import walstore
from store_support import cli_env
from tools.fullsweep import _free, fill_to

# the writer: a seed transaction writes ws/big.bin (SIZE bytes); optionally a transaction
# writing JUNK bytes rolls back (its blob stays until the next blob gc); then a
# transaction overwrites big.bin and the writer kills itself (kill -9) with it in flight
WRITER = """
import hashlib, os, signal, sys
import walstore
store, ws, size, junk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = walstore.open(store, segment_size=1 << 20)
seed = os.urandom(size)
with s.transaction() as tx:
    tx.files(ws).write("big.bin", seed)
    tx.put("seeded", hashlib.sha256(seed).hexdigest())
if junk:
    tx = s.transaction()
    tx.files(ws).write("junk.bin", os.urandom(junk))
    tx.rollback()
tx = s.transaction()
tx.files(ws).write("big.bin", os.urandom(size))
tx.put("lost", 1)
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(mnt, size: int, junk: int = 0) -> tuple[str, str]:
    """A store and a workspace on ``mnt``, left by a writer killed with a transaction
    overwriting ``big.bin`` in flight (the spare it kept dropped: made while the disk had
    room, a writer on a full disk has none).  Returns (store, workspace)."""
    store, ws = os.path.join(mnt, "s"), os.path.join(mnt, "ws")
    os.mkdir(ws, 0o700)
    r = subprocess.run([sys.executable, "-c", WRITER, store, ws, str(size), str(junk)],
                       env=cli_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]
    spare = os.path.join(store, "wal", "spare.tmp")
    if os.path.exists(spare):
        os.unlink(spare)
    return store, ws


def _recover(store: str) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run([sys.executable, "-m", "walstore", "recover", "--json", store],
                       env=cli_env(), capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    return r, json.loads(r.stdout)


def _undo_failures(doc: dict) -> list:
    return [p for p in doc["problems"] if p["kind"] == "file-undo-failed"]


def _assert_put_back(store: str, ws: str) -> None:
    with walstore.open(store) as s:
        with open(os.path.join(ws, "big.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == s.get("seeded")
        assert s.get("lost") is None
        assert not s.last_recovery.problems, s.last_recovery.problems


def test_recover_frees_its_own_blob_garbage_before_a_file_undo_fails_for_room(mount_tmpfs):
    """A file undo that does not fit is tried again after recovery freed its own room:
    the blobs nothing refers to (here a rolled-back 600 KB write's, left for the next blob
    gc).  Seen before the fix: with ~350 KB free the first `walstore recover` reported
    ``file-undo-failed`` ("cannot write 'big.bin' ...: No space left on device"; exit 1),
    its close then ran the blob gc (600 KB freed), and a second `recover` put the file
    back: the room was there all along, recovery's own."""
    mnt = str(mount_tmpfs("16m"))
    store, ws = _killed_writer(mnt, 300_000, junk=600_000)
    fill_to(mnt, 350_000)
    r, doc = _recover(store)
    assert r.returncode == 0 and not _undo_failures(doc), (r.returncode, doc["problems"])
    os.unlink(os.path.join(mnt, "fill"))
    _assert_put_back(store, ws)


def test_recover_makes_no_wal_spare_from_the_room_a_file_undo_needs(mount_tmpfs):
    """The open's WAL spare (a speed-up) is made only after the owed file undos ran.  Seen
    before the fix: a 10 MB file to put back, 13 MB free: the spare thread, started before
    the undo, took 4 MiB (it keeps 8 MiB free beside it), and the undo failed for room
    (``file-undo-failed``, at every `recover`), while with 11 MB free (no spare made) the
    same recovery succeeded: more room, and recovery failed."""
    mnt = str(mount_tmpfs("64m"))
    store, ws = _killed_writer(mnt, 10_000_000)
    fill_to(mnt, 13_000_000)
    r, doc = _recover(store)
    assert r.returncode == 0 and not _undo_failures(doc), (r.returncode, doc["problems"])
    os.unlink(os.path.join(mnt, "fill"))
    _assert_put_back(store, ws)


def test_a_file_undo_that_cannot_fit_names_the_file_the_bytes_and_that_it_is_owed(
        mount_tmpfs):
    """When even recovery's own room is not enough, `walstore recover` says which file
    could not be put back, how many bytes it needs and how many are free, and that the
    undo stays owed to the next open or recover — and that next one (room made) does put
    it back.  Seen before the fix: "could not be put back (OSError: [Errno 28] cannot
    write 'big.bin' in workspace ...: No space left on device ...); they stay owed": no
    sizes, nothing said of what to do; and the human line ended "at <workspace> offset 0
    (LSN 649), 0 bytes owed"."""
    mnt = str(mount_tmpfs("16m"))
    store, ws = _killed_writer(mnt, 300_000, junk=100_000)
    fill_to(mnt, 150_000)
    r, doc = _recover(store)
    fails = _undo_failures(doc)
    assert r.returncode == 1 and len(fails) == 1 and fails[0]["action"] == "owed", doc
    why = fails[0]["reason"]
    assert os.path.join(ws, "big.bin") in why and "No space left on device" in why, why
    assert "needs 300000 bytes" in why, why
    free = int(why.split(" bytes free")[0].rsplit(" ", 1)[1])
    assert 0 <= free < 300_000 and abs(free - _free(mnt)) <= 64 * 1024, (free, why)
    assert "owed" in why and "next open" in why and "walstore recover" in why, why
    assert "\n" not in why
    r = subprocess.run([sys.executable, "-m", "walstore", "recover", store], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("file-undo-failed")]
    assert r.returncode == 1 and len(line) == 1 and "needs 300000 bytes" in line[0], r.stdout
    assert "0 bytes owed" not in line[0], line  # (as if nothing were owed)
    os.unlink(os.path.join(mnt, "fill"))  # (room made: the next recover puts it back)
    r, doc = _recover(store)
    assert r.returncode == 0 and not _undo_failures(doc), doc["problems"]
    _assert_put_back(store, ws)


def test_a_file_a_failed_rollback_left_owed_is_never_read_as_the_current_content(
        mount_tmpfs):
    """A rollback whose file undo fails on the full disk raises FileConflictError ("owed:
    put back at the next open", and now the bytes it needs and those free), and the
    workspace keeps the rolled-back bytes.  A later transaction's ``files().read`` of
    that path must not take them for the current content: it puts the path back first
    (room made) or raises, telling.  Seen before the
    fix: the read returned the rolled-back bytes and the transaction that read them
    committed (a decision resting on content no transaction committed — the next open
    put the old version back under it), ``listdir`` listed the file it created, and
    ``store.at(a point before it).files(ws).read`` of that file returned its bytes; with
    the room back, every read went on returning them until the store was reopened
    (nothing retried the owed undo)."""
    mnt = str(mount_tmpfs("16m"))
    ws = os.path.join(mnt, "ws")
    os.mkdir(ws, 0o700)
    seed, new = os.urandom(300_000), os.urandom(300_000)
    s = walstore.open(os.path.join(mnt, "s"), segment_size=1 << 20)
    try:
        with s.transaction() as tx:
            tx.files(ws).write("big.bin", seed)
        seeded = s.log(limit=1)[0].txid
        tx = s.transaction()
        tx.files(ws).write("made.txt", "made by the transaction rolled back\n")
        tx.files(ws).write("big.bin", new)
        tx.put("decided", "new")
        # (the open's 1 MiB WAL spare first: made by its thread while the disk was filled,
        # it took the room fill_to had measured, whose fallocate failed ENOSPC -- stop 74)
        s._engine.wal._await_spare(timeout=30)
        fill_to(mnt, 100_000)
        try:
            tx.rollback()
        except walstore.FileConflictError as e:
            msg = str(e)
            assert "owed: put back at the next open, or before the next read" in msg, msg
            assert f"putting back {os.path.join(ws, 'big.bin')} needs 300000 bytes" in msg
            assert "bytes free" in msg and "\n" not in msg, msg
        else:
            pytest.fail("the rollback's file undo did not run out of room")
        with open(os.path.join(ws, "big.bin"), "rb") as f:
            assert f.read() == new  # (the disk is full: the undo is owed)
        view = s.at(seeded).files(ws)  # (a committed point: made.txt did not exist)
        assert view.read("big.bin") == seed
        with pytest.raises(FileNotFoundError):
            view.read("made.txt")
        with pytest.raises(walstore.ConflictError) as e:  # (no room to put it back)
            with s.transaction() as t3:
                got = t3.files(ws).read("big.bin")
                t3.put("decided", hashlib.sha256(got).hexdigest())
        msg = str(e.value)
        assert os.path.join(ws, "big.bin") in msg and "stays owed" in msg, msg
        assert "No space left on device" in msg and "\n" not in msg, msg
        assert s.get("decided") is None
        with pytest.raises(walstore.ConflictError, match="stays owed"):
            with s.transaction() as t3:  # (its made.txt: not taken for a current name)
                t3.files(ws).listdir()
        os.unlink(os.path.join(mnt, "fill"))  # (room again: the next read puts it back)
        with s.transaction() as t4:
            assert t4.files(ws).read("big.bin") == seed
            assert t4.files(ws).listdir() == ["big.bin"]
        with open(os.path.join(ws, "big.bin"), "rb") as f:
            assert f.read() == seed
    finally:
        s.close()
    with walstore.open(os.path.join(mnt, "s")) as s:
        assert not s.last_recovery.problems and s.file_conflicts() == []
        with open(os.path.join(ws, "big.bin"), "rb") as f:
            assert f.read() == seed
