"""Audit stop 53, the engine core and recovery: what the earlier stops left uncovered.

Recovery modes on deliberately damaged logs (a real store, its writer killed with
``os._exit`` so LMDB is behind the log, then one file damaged the way a disk or an
operator damages it), run as a user runs them: ``walstore recover --mode ...`` and
``walstore.open(path, recovery_mode=...)``.  Each mode either recovers, saying what it
gave up, or refuses with a walstore error; never an unexpected error from inside.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

import walstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
N = 400  # commits, of ~540 bytes of log each: 3+ segments of 64 KiB


def _killed_store(path: str) -> None:
    """A store whose writer committed N keys (a checkpoint after 300) and died without
    closing: LMDB holds the first ~300, the log all of them, over several segments."""
    script = f"""
import os, walstore
s = walstore.open({path!r}, segment_size=1 << 16, apply_interval=3600)
for i in range({N}):
    with s.transaction() as tx:
        tx.put('k%d' % i, 'v' * 500)
    if i == 300:
        s.checkpoint()
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], env=ENV, check=True, timeout=120)


def _segments(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "wal", "0*.wal")))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], env=ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["point-in-time", "skip-corrupt"])
def test_a_first_segment_truncated_to_nothing_is_given_up_by_the_salvage_modes(tmp_path, mode):
    """Seen: ``walstore recover --mode point-in-time`` (and skip-corrupt) on a store whose
    first segment was truncated to 0 bytes failed with "ValueError: cannot mmap an empty
    file (an unexpected error)": counting what the dropped segment held mapped the empty
    file.  Now the segment is dropped (quarantined) and the recovery says so."""
    path = str(tmp_path / "s")
    _killed_store(path)
    first = _segments(path)[0]
    with open(first, "r+b") as f:
        f.truncate(0)
    strict = _cli("recover", path)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    r = _cli("recover", path, "--mode", mode, "--json")
    assert "unexpected error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, r.stderr  # (damage was found: exit 1, and it recovered)
    doc = json.loads(r.stdout)
    kinds = {p["kind"]: p["action"] for p in doc["problems"]}
    assert kinds.get("dropped-segment") == "dropped", doc["problems"]
    assert not os.path.exists(first)  # (moved to quarantine, not deleted)
    assert any(os.path.basename(first) in q
               for q in os.listdir(os.path.join(path, "quarantine")))
    assert _cli("verify", path).returncode == 0
    with walstore.open(path) as s:  # (a normal open now: nothing left to recover)
        assert s.get("k0") == "v" * 500  # (LMDB's part is kept)


def test_a_first_segment_truncated_to_nothing_through_the_api(tmp_path):
    """The same through ``walstore.open(..., recovery_mode=...)``: a walstore outcome,
    never a ValueError from inside the reader."""
    path = str(tmp_path / "s")
    _killed_store(path)
    with open(_segments(path)[0], "r+b") as f:
        f.truncate(0)
    with pytest.raises(walstore.CorruptionError):
        walstore.open(path)
    with walstore.open(path, recovery_mode="point-in-time") as s:
        assert any(p.kind == "dropped-segment" for p in s.last_recovery.problems)
        assert s.get("k0") == "v" * 500


@pytest.mark.parametrize("mode", ["point-in-time", "skip-corrupt"])
def test_a_stray_segment_named_past_any_lsn_is_dropped_not_a_struct_error(tmp_path, mode):
    """Seen: a file ``wal/99999999999999999999.wal`` (a segment's name, an LSN no 64-bit
    log reaches) holding garbage: strict recovery refused it (a gap), but point-in-time
    and skip-corrupt failed with "undecodable data (error: argument out of range)", a
    struct.error from reading it behind its bad header as this store's segment at that
    position.  It cannot be one: it is dropped (quarantined) unread, and said so."""
    path = str(tmp_path / "s")
    _killed_store(path)
    stray = os.path.join(path, "wal", "99999999999999999999.wal")
    with open(stray, "wb") as f:
        f.write(os.urandom(100))
    assert _cli("recover", path).returncode == 1
    r = _cli("recover", path, "--mode", mode, "--json")
    assert "Traceback" not in r.stderr and "out of range" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert ("dropped-segment", "dropped") in {(p["kind"], p["action"]) for p in doc["problems"]}
    assert not os.path.exists(stray)
    assert _cli("verify", path).returncode == 0
    with walstore.open(path) as s:
        assert s.get("k%d" % (N - 1)) == "v" * 500  # (the log before it is all kept)


KILLED_REBUILD = r'''
import os, signal, sys
from walstore import fileio
from walstore.ops.rebuild import rebuild_state

class KilledAtTheSecondRename(fileio.OSBackend):
    """kill -9 of this process right before the fresh LMDB is renamed into db/ (the
    damaged one was moved to quarantine/ just before)."""
    def rename(self, src, dst):
        if os.path.basename(dst) == "db":
            os.kill(os.getpid(), signal.SIGKILL)
        super().rename(src, dst)

fileio.set_backend(KilledAtTheSecondRename())
rebuild_state(sys.argv[1])
'''


def test_recover_rebuild_state_killed_between_its_renames_is_run_again(tmp_path):
    """Seen: ``walstore recover --rebuild-state`` killed after it moved the damaged db/
    to quarantine/ and before the fresh one took its place left a store with no db/;
    running the command again failed at once with "the store's LMDB state is missing:
    no db/ directory" (the identity check refused the missing directory, before the
    rebuild could make it), so the one command that rebuilds it could not.  Now the re-run
    rebuilds: LMDB missing is what it is for."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:  # (a young store: its log is whole from LSN 0)
        for i in range(50):
            with s.transaction() as tx:
                tx.put("k%d" % i, i)
    with open(os.path.join(path, "db", "data.mdb"), "r+b") as f:
        f.write(bytes(8192))  # (both meta pages destroyed)
    r = subprocess.run([sys.executable, "-c", KILLED_REBUILD, path], env=ENV, timeout=120)
    assert r.returncode == -9
    assert not os.path.exists(os.path.join(path, "db"))  # (the state the kill left)
    r = _cli("recover", path, "--rebuild-state")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rebuilt" in r.stdout
    with walstore.open(path) as s:
        assert [s.get("k%d" % i) for i in range(50)] == list(range(50))
    assert _cli("verify", path).returncode == 0


def test_recover_without_a_db_directory_names_the_rebuild(tmp_path):
    """The same store state, plain ``walstore recover``: it says LMDB's state is lost and
    that ``--rebuild-state`` can rebuild it (it said only "no db/ directory")."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    os.rename(os.path.join(path, "db"), os.path.join(str(tmp_path), "db.elsewhere"))
    r = _cli("recover", path)
    assert r.returncode == 1
    assert "--rebuild-state" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _same_shape(path: str, value: str) -> None:
    """A store made by the same script as every other one here: the same LSNs, the same
    txids, only the values differ (agents of one fleet, each with its own store)."""
    with walstore.open(path) as s:
        for i in range(100):
            with s.transaction() as tx:
                tx.put("k%d" % i, value)


@pytest.mark.parametrize("readonly", [False, True])
def test_a_db_copied_from_another_store_is_refused_not_shown(tmp_path, readonly):
    """Seen: two stores made by one script, store B's ``db/data.mdb`` copied over store
    A's: ``walstore.open(A)`` (strict recovery) opened without a word and showed B's
    values — every key read "b" — over A's log (the anchor check compares LSN and txid,
    which were the same).  Now every writable open stamps LMDB with its store's id
    (``meta`` ``owner``), and an open, read-only too, refuses another store's; ``verify``
    says so once (it listed every key as disagreeing, and only while the log held it)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _same_shape(a, "a")
    _same_shape(b, "b")
    with open(os.path.join(b, "db", "data.mdb"), "rb") as src, \
            open(os.path.join(a, "db", "data.mdb"), "wb") as dst:
        dst.write(src.read())
    with pytest.raises(walstore.CorruptionError) as e:
        walstore.open(a, readonly=readonly)
    assert "foreign-state" in str(e.value)
    assert e.value.file == os.path.join(os.path.realpath(a), "db", "data.mdb")
    v = _cli("verify", a)
    assert v.returncode == 1 and "foreign-state" in v.stdout
    assert v.stdout.count("error:") == 1, v.stdout
    r = _cli("recover", a)
    assert r.returncode == 1 and "foreign-state" in r.stderr
    with walstore.open(b) as s:  # (B itself is fine)
        assert s.get("k0") == "b"
    assert _cli("verify", b).returncode == 0


def test_its_own_db_back_from_a_backup_still_opens(tmp_path):
    """The owner stamp is the store's, so a backup's db/ (the same store) is no stranger."""
    a, bk = str(tmp_path / "a"), str(tmp_path / "bk")
    _same_shape(a, "a")
    assert _cli("backup", a, bk).returncode == 0
    with walstore.open(bk) as s:
        assert s.get("k99") == "a"
    assert _cli("verify", bk).returncode == 0


GAP_STORE = r'''
import os, sys, time, walstore
path, phase = sys.argv[1], sys.argv[2]
if phase == "1":  # LMDB brought up to the log's end by the applier: no checkpoint trims
    s = walstore.open(path, segment_size=1 << 16, apply_interval=0.01)
    for i in range(500):
        with s.transaction() as tx:
            tx.put("k%d" % i, "v" * 500)
        if i == 100:
            s.checkpoint()
    deadline = time.monotonic() + 60
    while s.stats()["applied_lsn"] < s.stats()["published_lsn"]:
        assert time.monotonic() < deadline, "the applier never caught up"
        time.sleep(0.01)
else:  # more log that LMDB never gets (an applier that waits an hour for a pause)
    s = walstore.open(path, segment_size=1 << 16, apply_interval=3600)
    for i in range(500, 700):
        with s.transaction() as tx:
            tx.put("k%d" % i, "v" * 500)
os._exit(0)
'''


def test_skip_corrupt_goes_past_a_missing_segment_that_held_lmdbs_last_commit(tmp_path):
    """Seen: a middle segment missing — the one holding the last commit LMDB applied —
    with segments after it: ``walstore recover --mode skip-corrupt`` (whose job is to skip
    such a hole) refused with "foreign-log: the WAL is not the log LMDB applied ... a
    segment from another copy of this store ... no --mode applies a log LMDB did not come
    from".  The check that the log holds LMDB's last applied commit where LMDB says is
    dropped when damage comes before that position, but a gap was judged by where the
    next segment starts, past the commit, not where the hole begins.  A killed skip-corrupt
    recovery of a truncated segment (re-run after its cut was zero-filled) met the same."""
    path = str(tmp_path / "s")
    for phase in "12":
        subprocess.run([sys.executable, "-c", GAP_STORE, path, phase], env=ENV, check=True,
                       timeout=180)
    with walstore.open(path, readonly=True) as s:
        applied = s.stats()["applied_lsn"]
    segs = [(int(os.path.basename(p)[:20]), p) for p in _segments(path)]
    holding = [p for (start, p), nxt in zip(segs, segs[1:]) if start <= applied < nxt[0]]
    assert holding, (applied, segs)  # (LMDB's last commit is in a segment before the last)
    os.remove(holding[0])
    assert _cli("recover", path).returncode == 1  # (strict: a gap, refused)
    r = _cli("recover", path, "--mode", "skip-corrupt", "--json")
    assert "foreign-log" not in r.stdout + r.stderr, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "skip-corrupt" and "gap" in {p["kind"] for p in doc["problems"]}
    assert _cli("verify", path).returncode == 0
    with walstore.open(path) as s:
        assert s.get("k699") == "v" * 500  # (what lies past the hole is salvaged)


def test_verify_reports_a_segment_whose_name_leads_nowhere(tmp_path):
    """Seen: a segment replaced by a symlink to a file that is not there (segments moved to
    another disk, not mounted): strict recovery and a read-only open refused the store,
    but ``walstore verify`` said "ok", exit 0 — it took the unopenable segment for one a
    live writer's checkpoint trimmed while it read.  A trimmed segment's name is gone; one
    still there is damage: exit 1."""
    path = str(tmp_path / "s")
    _killed_store(path)
    last = _segments(path)[-1]
    os.remove(last)
    os.symlink(str(tmp_path / "elsewhere" / os.path.basename(last)), last)
    with pytest.raises(walstore.CorruptionError):
        walstore.open(path, readonly=True)
    r = _cli("verify", path)
    assert r.returncode == 1, r.stdout
    assert os.path.basename(last) in r.stdout and "cannot be opened" in r.stdout


def test_a_segment_header_claiming_a_petabyte_is_damage_not_a_size_to_restore(tmp_path):
    """Seen: a last segment whose header (its CRC recomputed) says it was made 4 PiB long:
    ``walstore recover --mode tolerate-tail`` took the file for a truncated segment and
    extended it back to that size — EFBIG on ext4 ("opening the store failed: File too
    large"), no recovery possible; a petabyte sparse segment where the file system allows
    it, which the writer then never rotated out of.  A size past any segment's is a bad
    header: the segment is given up (dropped to quarantine) like any other."""
    from walstore.log.format import decode_segment_header, encode_segment_header
    path = str(tmp_path / "s")
    _killed_store(path)
    last = _segments(path)[-1]
    with open(last, "r+b") as f:
        h = decode_segment_header(f.read(64))
        f.seek(0)
        f.write(encode_segment_header(h.store_id, h.start_lsn, h.created_ns, 1 << 52))
    assert _cli("recover", path).returncode == 1  # (strict: refused)
    assert _cli("verify", path).returncode == 1
    r = _cli("recover", path, "--mode", "tolerate-tail", "--json")
    assert "File too large" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert ("dropped-segment", "dropped") in {(p["kind"], p["action"]) for p in doc["problems"]}
    assert os.path.getsize(last) < 1 << 30 if os.path.exists(last) else True
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("after", 1)
    assert _cli("verify", path).returncode == 0


@pytest.mark.parametrize("mode", ["tolerate-tail", "point-in-time", "skip-corrupt"])
def test_the_salvage_modes_give_up_a_segment_whose_name_leads_nowhere(tmp_path, mode):
    """Seen: the last segment a symlink to a file that is not there.  tolerate-tail and
    point-in-time "accepted" it (bad-segment) but dropped nothing — the name stayed, and
    the store they said was recovered refused every open after; skip-corrupt failed with
    "opening the store failed: No such file or directory" (copying the log aside).  The
    name is moved to quarantine/ as a dropped segment, and the store opens."""
    path = str(tmp_path / "s")
    _killed_store(path)
    last = _segments(path)[-1]
    os.remove(last)
    os.symlink(str(tmp_path / "elsewhere" / os.path.basename(last)), last)
    r = _cli("recover", path, "--mode", mode, "--json")
    assert "Traceback" not in r.stderr and "failed" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert ("dropped-segment", "dropped") in {(p["kind"], p["action"]) for p in doc["problems"]}
    assert not os.path.lexists(last)
    assert _cli("verify", path).returncode == 0
    with walstore.open(path) as s:
        assert s.get("k0") == "v" * 500
