"""Audit 66: a follower (`walstore restore URL DEST --follow`, a real process) whose DEST
runs out of room (a real full disk: DEST on a small tmpfs), the replica on moto's real S3
server or a file:// directory.  One behaviour whatever it was writing — a WAL segment of
DEST's log, or a blob (a reversible file's content) into DEST's blob store: it stops,
exit 1, one line naming DEST's file, the bytes free there and those needed, [ENOSPC];
DEST stays a sound replica (`walstore verify` passes, no ``.part`` or temp file left),
and once room is freed a restarted follower catches up with nothing lost.  Each test is
skipped where a tmpfs cannot be mounted."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import walstore
from store_support import cli_env, get_readonly
from test_audit65_fulldisk_files import (_check_one_line_no_space, _commit, _consistent,
                                         _Follow, _run_cli, _state_or_refusal,
                                         _stop_and_compare)
from test_replication_support import Replica, make_s3_replica, s3_endpoint  # noqa: F401
from tools.fullsweep import fill_to


@pytest.fixture(params=["s3", "file"])
def rig(request, tmp_path, mount_tmpfs):
    """A source shipping to a replica (moto's S3 server, or file://), DEST on a tmpfs."""
    if request.param == "s3":
        replica = make_s3_replica(request.getfixturevalue("s3_endpoint"))
    else:
        replica = Replica("file", f"file://{tmp_path}/replica",
                          {"interval": 0.05, "max_backoff": 0.5})
    r = _Follow(tmp_path, mount_tmpfs, replica)
    yield r
    r.close()


def _stopped_line(rig: _Follow, p, out, seconds: float = 25) -> str:
    """The follower's one error line once it has exited 1 (it must, within ``seconds``)."""
    try:
        code = p.wait(seconds)
    except subprocess.TimeoutExpired:
        out.seek(0)
        pytest.fail(f"the follower kept running on a full DEST: {out.read()[-1500:]}")
    out.seek(0)
    text = out.read()
    assert code == 1 and "Traceback" not in text, (code, text[-1500:])
    err = [ln for ln in text.splitlines() if ln.startswith("walstore:")]
    assert len(err) == 1, text[-1500:]
    return err[0]


def _no_leftovers(rig: _Follow) -> None:
    """Nothing but DEST (and the filler) on its disk, nothing half made inside DEST, the
    follower's temp directory empty."""
    assert set(os.listdir(rig.mnt)) <= {"fill", "dest"}, os.listdir(rig.mnt)
    assert not os.listdir(rig.tmpdir), os.listdir(rig.tmpdir)
    stray = [os.path.join(d, n) for d, _ds, ns in os.walk(rig.dest) for n in ns
             if n.endswith(".part") or n.startswith(".") or ".tmp" in n]
    assert not stray, stray
    wal = os.listdir(os.path.join(rig.dest, "wal"))
    assert all(len(n) == 24 and n.endswith(".wal") for n in wal), wal


def _verify_dir(dest: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", "verify", dest, "--json"],
                          capture_output=True, text=True, env=cli_env(), timeout=60)


def _verify(rig: _Follow) -> subprocess.CompletedProcess:
    return _verify_dir(rig.dest)


def _restarted(rig: _Follow):
    """A new follower, once it has begun to follow (DEST, whose log already holds what the
    last one copied, may read as caught up before this one has even started: a Ctrl-C
    then lands in Python's start-up)."""
    p, out = rig.follower()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and p.poll() is None:
        out.seek(0)
        if "following " in out.read():
            time.sleep(0.5)  # (its first rounds: it applies what the last one copied)
            return p, out
        time.sleep(0.05)
    out.seek(0)
    pytest.fail(f"the restarted follower did not start: {out.read()[-1500:]}")


def _fill_and_commit(rig: _Follow, first: int, end: int, files: int) -> None:
    fill_to(rig.mnt, 300_000)
    rig.commits(first, end, files=files)


def _followed_until_full(rig: _Follow, end: int, files: int, *args: str):
    """50 commits (files of ``files`` bytes every fifth, when not 0) followed by a
    follower process (``args``), then DEST's disk filled and commits up to ``end`` made:
    the line the follower stopped with, and its output file."""
    rig.commits(0, 50, files=files)
    p, out = rig.follower(*args)
    assert rig.wait_for(49, p, 20)[-1:] == [49], "the follower never caught up"
    rig.applied()
    _fill_and_commit(rig, 50, end, files)
    return _stopped_line(rig, p, out), out


def _freed_it_catches_up(rig: _Follow, last: int, seconds: float) -> None:
    """DEST's disk freed, the follower run again catches up to commit ``last`` and
    holds what the source holds, leaving nothing behind."""
    os.unlink(os.path.join(rig.mnt, "fill"))
    p, _out = _restarted(rig)
    assert rig.wait_for(last, p, seconds)[-1:] == [last], \
        "the restarted follower did not catch up"
    _stop_and_compare(rig, p)
    _no_leftovers(rig)


def test_a_follower_out_of_room_for_a_blob_stops_naming_the_file_as_for_a_segment(rig):
    """DEST's disk fills while the follower downloads the content of reversible files
    (40 KB each, every fifth commit): it stops, exit 1, with one line naming the blob's
    file in DEST, the bytes free and needed and [ENOSPC] — as it does when a WAL segment
    of DEST cannot be made.  Seen before the fix: it retried that blob for ever, "at LSN
    N: GET s3://b/a1/blobs/<sha>: OSError (retrying in 0.05 s)" (from moto; from a
    file:// replica "downloading blobs/<sha> of the replica ... failed: No space left on
    device"), naming the replica's object, never DEST's disk, while a full disk under a
    WAL segment stopped it: a supervisor could not tell what to expect."""
    line, _out = _followed_until_full(rig, 400, 40_000)
    blobs = os.path.join(rig.dest, "files", "blobs") + os.sep
    assert "[ENOSPC]" in line and blobs in line, line
    assert "bytes free there" in line and "40000 needed" in line, line
    assert _consistent(_state_or_refusal(rig.dest))
    _no_leftovers(rig)
    r = _verify(rig)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]
    _freed_it_catches_up(rig, 399, 40)
    r = _verify(rig)  # (every blob DEST's history names is there, each checked)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]


def test_a_follower_out_of_room_for_a_segment_says_what_it_needs_and_what_is_free(rig):
    """DEST's disk fills under the follower's log (commits of ~6 KB, no files): exit 1,
    one line naming DEST's segment file, [ENOSPC], the bytes free there and the size of
    the file it could not make; under --json the error document says the same (type
    StoreIOError).  Seen before the fix: "walstore: [Errno 28] No space left on device:
    '<DEST>/wal/<lsn>.wal'", neither the room left nor the room needed (every other verb
    says "No space left on device [ENOSPC]: FILE")."""
    line, out = _followed_until_full(rig, 480, 0, "--json")
    wal = os.path.join(rig.dest, "wal") + os.sep
    assert "[ENOSPC]" in line and wal in line and "bytes free there" in line, line
    assert " needed)" in line, line
    out.seek(0)
    lines = out.read().splitlines()  # (the document, indented, among the stderr lines)
    doc = json.loads("".join(lines[lines.index("{"):lines.index("}") + 1]))
    assert doc["error"]["type"] == "StoreIOError" and doc["error"]["exit"] == 1, doc
    assert "[ENOSPC]" in doc["error"]["message"], doc
    _no_leftovers(rig)
    r = _verify(rig)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]
    _freed_it_catches_up(rig, 479, 30)


def test_a_library_follower_out_of_room_raises_a_store_io_error_naming_the_blob(
        tmp_path, mount_tmpfs, s3_endpoint):
    """``walstore.replication.follow`` (a program embedding a follower) on a full DEST:
    a ``StoreIOError`` with errno ENOSPC whose ``filename`` is the blob's file in DEST,
    never a ``ReplicationError`` retried for ever.  Seen before the fix: a transient
    "GET s3://...: OSError" reported to ``on_round`` round after round, the follower
    never returning."""
    import threading
    from walstore.replication import follow
    replica = make_s3_replica(s3_endpoint)
    rig = _Follow(tmp_path, mount_tmpfs, replica)
    try:
        rig.commits(0, 10, files=40_000)
        first = threading.Event()  # (the first run: DEST restored, one round, stopped)
        follow(rig.url, rig.dest, replica.opts(), stop=first, interval=0.05,
               on_round=lambda info: first.set())
        fill_to(rig.mnt, 100_000)
        rig.commits(10, 40, files=40_000)
        rounds: list = []
        stop = threading.Event()
        timer = threading.Timer(20, stop.set)  # (a follower that retries: ended, fails)
        timer.start()
        try:
            with pytest.raises(walstore.StoreIOError) as e:
                follow(rig.url, rig.dest, replica.opts(), stop=stop, interval=0.05,
                       on_round=rounds.append)
        finally:
            timer.cancel()
        assert e.value.errno == errno.ENOSPC, e.value
        assert e.value.filename.startswith(os.path.join(rig.dest, "files", "blobs")), e.value
        assert not [r for r in rounds if r.get("error")], rounds[:3]
    finally:
        rig.close()


def test_a_follower_out_of_room_for_lmdb_stops_naming_the_data_file_and_the_room(
        tmp_path, mount_tmpfs):
    """DEST's disk fills under the follower's apply (the log it copied in one round fits,
    LMDB's growth when it applies that round does not): exit 1, one line naming DEST's
    data.mdb, the errno (LMDB reports a short write as EIO) and the bytes free, saying
    nothing was lost; `walstore verify` passes and a restart with room catches up. Seen
    before the fix: "walstore: writing LMDB failed: mdb_txn_commit: Input/output error" —
    the engine's internal error, no errno, no file, an I/O error where the disk was only
    full (the store itself says it as below since audit 65)."""
    rig = _Follow(tmp_path, mount_tmpfs)
    try:
        rig.commits(0, 20)
        p, out = rig.follower()
        assert rig.wait_for(19, p, 20)[-1:] == [19], "the follower never caught up"
        _stop_and_compare(rig, p)
        for i in range(20, 120):  # (2 MB the follower copies in one round, then applies)
            _commit(rig.src, i, 20_000)
        rig.src.sync_replica(timeout=60)
        fill_to(rig.mnt, 3_000_000)  # (room for the log, not for LMDB's growth after it)
        p, out = rig.follower("--apply-every", "0")
        line = _stopped_line(rig, p, out)
        data = os.path.join(rig.dest, "db", "data.mdb")
        assert line.endswith(f"]: {data}") and "bytes free" in line, line
        assert "[EIO]" in line or "[ENOSPC]" in line, line
        assert "nothing was lost" in line, line
        _no_leftovers(rig)
        r = _verify(rig)
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]
        os.unlink(os.path.join(rig.mnt, "fill"))
        p, out = _restarted(rig)
        assert rig.wait_for(119, p, 30)[-1:] == [119], "the restart did not catch up"
        _stop_and_compare(rig, p)
    finally:
        rig.close()


# A follower killed (SIGKILL) with a blob downloaded, synced, not yet named: the fault
# point "restore.blob" of the follower's rounds (DEST exists), not of its first restore.
KILLED_AT_BLOB = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
url, dest = sys.argv[1:3]

class KillAtBlob(fileio.OSBackend):
    def fault_point(self, name):
        if name == "restore.blob" and os.path.isdir(os.path.join(dest, "db")):
            os.kill(os.getpid(), signal.SIGKILL)
fileio.set_backend(KillAtBlob())
main(["restore", url, dest, "--follow", "--interval", "0.05"])
"""


def _partial_files(dest: str) -> list[str]:
    """Files in DEST's blob store that are not blobs (a download never named)."""
    root = os.path.join(dest, "files", "blobs")
    return [os.path.join(d, n) for d, _ds, ns in os.walk(root) for n in ns
            if not (len(n) == 62 and len(os.path.basename(d)) == 2)]


def _cli_follower(url: str, dest: str) -> subprocess.Popen:
    """`walstore restore URL DEST --follow` as a process (its stderr a pipe)."""
    return subprocess.Popen([sys.executable, "-m", "walstore", "restore", url, dest,
                             "--follow", "--interval", "0.05"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())


def _follower_to_be_killed(script: str, url: str, dest: str) -> subprocess.Popen:
    """A follower process running ``script`` (it kills itself at a step), started once
    DEST's store is there (its restore done): returned then."""
    p = subprocess.Popen([sys.executable, "-c", script, url, dest],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
    deadline = time.monotonic() + 20
    while not os.path.isdir(os.path.join(dest, "db")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return p


def _was_killed(p: subprocess.Popen) -> None:
    assert p.wait(20) == -9, p.stderr.read()[-1500:]
    p.stderr.close()


def test_a_blob_half_fetched_by_a_killed_follower_leaves_nothing_once_dest_is_promoted(
        tmp_path):
    """A follower killed (kill -9) while a blob of file content is downloaded into DEST
    but not yet named, then DEST promoted (``walstore.open(DEST)``: the source is lost,
    the very case a follower is for): nothing of that download stays in DEST, and
    `walstore verify` passes.  Seen before the fix: the download's ``<sha>.part`` stayed
    in DEST's blob directory for good (the store's open sweeps its blob store's ``tmp/``,
    never a fan-out directory): a blob's size of garbage per kill."""
    url = f"file://{tmp_path}/replica"
    ws = tmp_path / "ws"
    ws.mkdir()
    dest = str(tmp_path / "dest")
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options={"interval": 0.05}) as src:
        with src.transaction() as tx:
            tx.put("n", 0)
        src.sync_replica(timeout=30)
        p = _follower_to_be_killed(KILLED_AT_BLOB, url, dest)
        with src.transaction() as tx:
            tx.put("n", 1)
            tx.files(str(ws)).write("f.bin", os.urandom(300_000))
        src.sync_replica(timeout=30)
        _was_killed(p)
    assert _partial_files(dest), "the follower was not killed with a blob half fetched"
    with walstore.open(dest) as d:  # (promoted)
        assert d.get("n") == 0  # (the records naming the blob were never copied)
    assert not _partial_files(dest), _partial_files(dest)
    r = _verify_dir(dest)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]


def test_a_restore_from_s3_out_of_room_for_a_blob_names_the_file_not_the_server(
        tmp_path, mount_tmpfs, s3_endpoint):
    """`walstore restore s3://... DEST` with DEST's disk filling under the content of
    reversible files: exit 1, one line naming the file on DEST's disk and [ENOSPC]; nothing
    left beside DEST or in TMPDIR; with room, a retry restores every commit.  Seen before
    the fix: "walstore: GET s3://b/a1/blobs/<sha>: OSError" (after five attempts with
    backoff), as if moto's server had failed the request: the disk was never named."""
    rig = _Follow(tmp_path, mount_tmpfs, make_s3_replica(s3_endpoint))
    try:
        rig.commits(0, 50, files=40_000)
        fill_to(rig.mnt, 200_000)
        r = _run_cli(["restore", rig.url, rig.dest, *rig.args], rig.tmpdir)
        _check_one_line_no_space(r, "restore from s3")
        assert "[ENOSPC]" in r.stderr and "files/blobs/" in r.stderr, r.stderr
        assert rig.mnt in r.stderr and "GET s3://" not in r.stderr, r.stderr
        assert os.listdir(rig.mnt) == ["fill"] and not os.listdir(rig.tmpdir)
        os.unlink(os.path.join(rig.mnt, "fill"))
        r = _run_cli(["restore", rig.url, rig.dest, *rig.args], rig.tmpdir)
        assert r.returncode == 0, r.stderr[-1500:]
        with walstore.open(rig.dest) as d:
            assert list(d.scan()) == list(rig.src.scan())
    finally:
        rig.close()


def test_a_follower_whose_replica_shows_no_segment_end_yet_makes_no_16_mib_file(tmp_path):
    """A follower started while the replica shows no end of a source segment yet (a young
    source, 256 KiB segments): the file it makes once the restored log's last one is full is
    sized as the doubling from 64 KiB goes on, not 16 MiB. Seen before the fix: ``follow``
    resumes the log its own restore wrote, and the resumed log's next file was 16 MiB at
    once — 64 times the source's segment (probe 57's waste, back after every follower's
    start); on a DEST with 600 KB free the follower stopped, "No space left on device
    (598016 bytes free there, 16777216 needed)", though a 256 KiB file would have fitted."""
    url = f"file://{tmp_path}/replica"
    dest = str(tmp_path / "dest")
    biggest = 0
    with walstore.open(str(tmp_path / "src"), segment_size=256 * 1024, replicate_to=url,
                       replicate_options={"interval": 0.05}) as src:
        for i in range(20):  # (~120 KB: the source's first segment has not ended)
            _commit(src, i)
        src.sync_replica(timeout=30)
        p = _cli_follower(url, dest)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and p.poll() is None:
                if os.path.isdir(os.path.join(dest, "db")):
                    break
                time.sleep(0.05)
            for i in range(20, 36):  # (~100 KB more: still in the source's first segment,
                _commit(src, i)       # past the restored log's last file)
            src.sync_replica(timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and p.poll() is None:
                wal = os.path.join(dest, "wal")
                biggest = max([biggest] + [os.path.getsize(os.path.join(wal, n))
                                           for n in os.listdir(wal)])
                if get_readonly(dest, "n") == 35:
                    break
                time.sleep(0.05)
            assert get_readonly(dest, "n") == 35, "the follower did not catch up"
        finally:
            p.send_signal(signal.SIGINT)
            p.wait(20)
            p.stderr.close()
    assert biggest <= 2 * 256 * 1024, f"a {biggest}-byte segment file in DEST"


# A follower killed (SIGKILL) with a new segment file of DEST's log made (zero-filled,
# synced) and not yet renamed into place: its ``<lsn>.wal.tmp``.
KILLED_AT_SEGMENT = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
url, dest = sys.argv[1:3]

class KillAtSegment(fileio.OSBackend):
    def rename(self, src, dst):
        if src.endswith(".wal.tmp") and os.path.isdir(os.path.join(dest, "db")):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().rename(src, dst)
fileio.set_backend(KillAtSegment())
main(["restore", url, dest, "--follow", "--interval", "0.05"])
"""


def test_a_segment_half_made_by_a_killed_follower_is_gone_once_it_runs_again(tmp_path):
    """A follower killed (kill -9) between making a new segment file of DEST's log and
    renaming it into place, then run again: it catches up and no ``.wal.tmp`` stays in
    DEST's log directory (a restart is how a supervisor brings a follower back).  Probed
    at audit 66 and found right: the restart makes the file at the same LSN again (the
    same temp name, truncated) and renames it into place; a promotion's open removes any
    ``.wal.tmp`` too.  (Its blob counterpart above was wrong.)"""
    url = f"file://{tmp_path}/replica"
    dest = str(tmp_path / "dest")
    with walstore.open(str(tmp_path / "src"), segment_size=256 * 1024, replicate_to=url,
                       replicate_options={"interval": 0.05}) as src:
        for i in range(20):
            _commit(src, i)
        src.sync_replica(timeout=30)
        p = _follower_to_be_killed(KILLED_AT_SEGMENT, url, dest)
        for i in range(20, 80):  # (past the restored log's last file: a new one is made)
            _commit(src, i)
        src.sync_replica(timeout=30)
        _was_killed(p)
        wal = os.path.join(dest, "wal")
        assert [n for n in os.listdir(wal) if n.endswith(".tmp")], os.listdir(wal)
        p = _cli_follower(url, dest)
        try:
            deadline = time.monotonic() + 20
            while get_readonly(dest, "n") != 79 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert get_readonly(dest, "n") == 79, "the restarted follower did not catch up"
            assert not [n for n in os.listdir(wal) if n.endswith(".tmp")], os.listdir(wal)
        finally:
            p.send_signal(signal.SIGINT)
            assert p.wait(20) == 0, p.stderr.read()[-1500:]
            p.stderr.close()
    r = _verify_dir(dest)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-500:]
