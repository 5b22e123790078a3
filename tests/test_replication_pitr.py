"""Point-in-time restore and a follower's purge, after a probe of both (probe-pitr).

* A follower whose source goes idle right after a purge erased nothing of it from its log:
  the SEAL and CHECKPOINT the source's purge checkpoint logs after the purge carry nothing
  to redo, so the follower's applied LSN stayed at the SEAL's start, the file the SEAL
  ended was never wholly applied, and it kept the purged bytes until a later commit came.
* A restore to a commit's own time (``TxnInfo.timestamp`` as a datetime, microseconds)
  left that commit out whenever its float stamp had digits past the microsecond.
* A restore to a restore point trusted the manifest's LSN for it: a damaged one restored
  another state, or a copy lacking the point; ``replicas --verify`` did not see it either.
* A manifest whose position was lowered to an earlier record boundary restored a silent
  prefix of the replica.
* A restore to a time between a restore point made on a fresh store and its first commit
  was refused.
* ``walstore replicas URL`` listed a dropped restore point like a live one.
* ``snapshot_interval=0`` shipped no snapshot under commits that never pause (the writer
  defers applying to LMDB: its applied LSN never moved past the last snapshot's).

Real processes where it matters (the follower and the CLI in subprocesses), real files,
``file://`` replicas."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import msgpack
import pytest

import walstore

from test_replication_follow_rounds import _wait  # (the same polling wait)
from store_support import CLI, cli_env as _env, files_with as _files_with, get_readonly as _get

MARK = b"PURGED-WHILE-THE-SOURCE-IDLES-5521"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True,
                          text=True, timeout=300, env=_env())


def _rewrite_manifest(rep: str, change) -> None:
    path = os.path.join(rep, "manifest")
    with open(path, "rb") as f:
        doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    change(doc)
    with open(path, "wb") as f:
        f.write(msgpack.packb(doc, use_bin_type=True))


# ---- 1. the follower's purge with the source idle after it -----------------------------
def test_a_purge_the_source_goes_idle_after_leaves_no_byte_in_the_follower(tmp_path):
    """The purge is the last thing the source logs (then its purge checkpoint's SEAL and
    CHECKPOINT): the follower's files hold none of the purged bytes soon after it shows
    the purge, with no later commit to move it on; DEST stopped there verifies clean."""
    src_dir, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    url = f"file://{tmp_path}/replica"
    s = walstore.open(src_dir, replicate_to=url, segment_size=64 * 1024,
                      replicate_options={"interval": 0.05, "snapshot_interval": 0})
    follower = None
    try:
        with s.transaction() as tx:
            tx.put("init", 0)
        s.sync_replica(timeout=30)
        follower = subprocess.Popen(
            [sys.executable, "-c", CLI, "restore", url, dest, "--follow",
             "--interval", "0.05", "--apply-every", "0.3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        assert _wait(lambda: _get(dest, "init") == 0, 60), "the follower never caught up"
        with s.transaction() as tx:
            tx.put("user/1/secret", MARK.decode())
        s.sync_replica(timeout=30)
        assert _wait(lambda: _get(dest, "user/1/secret") == MARK.decode(), 30)
        assert _files_with(dest, MARK)
        s.purge("user/1/")
        s.sync_replica(timeout=30)  # (and nothing after it: the source is idle)
        assert _wait(lambda: _get(dest, "init") == 0 and _get(dest, "user/1/secret") is None,
                     30)
        assert _wait(lambda: not _files_with(dest, MARK), 15), _files_with(dest, MARK)
        assert not _files_with(src_dir, MARK)
        assert follower.poll() is None, follower.stderr.read().decode()
    finally:
        if follower is not None:
            follower.send_signal(signal.SIGINT)
            try:
                follower.wait(20)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        s.close()
    v = _cli("verify", dest)
    assert v.returncode == 0, v.stdout + v.stderr
    with walstore.open(dest, readonly=True) as d:
        assert d.get("init") == 0 and d.get("user/1/secret") is None


# ---- 2. a commit's own time ----------------------------------------------------------
def test_a_restore_to_a_commits_own_time_includes_that_commit(tmp_path):
    """Every commit restored to its own ``TxnInfo.timestamp`` as a datetime is in the
    copy (API), and on the command line the ISO time of one whose stamp has digits past
    the microsecond (the case that was left out) too."""
    url = f"file://{tmp_path}/rep"
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        for i in range(30):
            with s.transaction() as tx:
                tx.put("a", i)
        log = list(s.log())
        s.sync_replica(timeout=30)
    finally:
        s.close()
    past_micro = []
    for k, t in enumerate(log):
        when = dt.datetime.fromtimestamp(t.timestamp, dt.timezone.utc)
        if when.timestamp() < t.timestamp:
            past_micro.append((t, when))
        d = str(tmp_path / f"d{k}")
        walstore.restore(url, d, to=when)
        with walstore.open(d) as r:
            assert t.txid in [x.txid for x in r.log()], (t.txid, t.timestamp, when)
        shutil.rmtree(d)
    if not past_micro:
        pytest.skip("no commit stamp had digits past the microsecond")  # (30 of them: rare)
    t, when = past_micro[0]
    res = _cli("restore", url, str(tmp_path / "cli"), "--to", when.isoformat(), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    with walstore.open(str(tmp_path / "cli")) as r:
        assert max(x.txid for x in r.log()) == t.txid


# ---- 3. the manifest's LSN of a restore point ---------------------------------------
def _replica_with_points(tmp_path) -> tuple[str, str]:
    rep = str(tmp_path / "rep")
    url = "file://" + rep
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        for i in range(30):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
            if i in (10, 20):
                s.restore_point(f"p{i}")
        s.sync_replica(timeout=30)
    finally:
        s.close()
    return rep, url


@pytest.mark.parametrize("damage", ["flip1", "minus1", "other-point"])
def test_a_restore_point_lsn_the_wal_does_not_hold_there_is_refused(tmp_path, damage):
    """The manifest's LSN for ``p20`` damaged (a bit flipped, one off, another point's):
    the restore to ``p20`` is refused naming the damage, nothing at DEST; ``replicas
    --verify`` fails its ``restore points`` check.  The undamaged replica restores ``p20``
    with the point in the copy."""
    rep, url = _replica_with_points(tmp_path)
    good = str(tmp_path / "good")
    walstore.restore(url, good, to="p20")
    with walstore.open(good) as r:
        assert sorted(r.restore_points()) == ["p10", "p20"] and r.get("k20") == 20
    assert _cli("replicas", url, "--verify", "--json").returncode == 0

    def change(doc):
        p = doc["points"]["p20"]
        p["lsn"] = {"flip1": p["lsn"] ^ 1, "minus1": p["lsn"] - 1,
                    "other-point": doc["points"]["p10"]["lsn"]}[damage]
    _rewrite_manifest(rep, change)
    dest = str(tmp_path / "bad")
    with pytest.raises(walstore.ReplicationError, match="restore point 'p20'.*damaged"):
        walstore.restore(url, dest, to="p20")
    assert not os.path.exists(dest) or not os.listdir(dest)
    res = _cli("replicas", url, "--verify", "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    checks = {c["check"]: c for c in json.loads(res.stdout)["verify"]["checks"]}
    assert not checks["restore points"]["ok"] and "'p20'" in checks["restore points"]["error"]
    # the other point, undamaged, still restores
    walstore.restore(url, str(tmp_path / "p10"), to="p10")
    with walstore.open(str(tmp_path / "p10")) as r:
        assert r.get("k10") == 10 and r.get("k11") is None


# ---- 4. a lowered position -----------------------------------------------------------
def test_a_manifest_position_below_its_listed_wal_is_refused(tmp_path):
    """Position lowered to the last WAL object's start (an earlier record boundary): the
    restore of everything is refused (it restored a silent prefix), as --verify fails."""
    rep = str(tmp_path / "rep")
    url = "file://" + rep
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        for i in range(30):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
            if i % 10 == 9:
                s.sync_replica(timeout=30)
    finally:
        s.close()

    def lower(doc):
        assert len(doc["wal"]) >= 2
        doc["position"] = doc["wal"][-1]["a"]
    _rewrite_manifest(rep, lower)
    with pytest.raises(walstore.ReplicationError, match="listed past its position"):
        walstore.restore(url, str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d") or not os.listdir(tmp_path / "d")
    res = _cli("restore", url, str(tmp_path / "d2"))
    assert res.returncode == 1 and "damaged" in res.stdout + res.stderr
    assert _cli("replicas", url, "--verify", "--json").returncode == 1


# ---- 5. a time before the first commit, after a restore point -----------------------
def test_a_time_between_a_fresh_stores_restore_point_and_its_first_commit(tmp_path):
    """The point was logged at or before the time: it is in the copy (as with to=its
    name), and nothing the first commit wrote; a time before the point is refused."""
    url = f"file://{tmp_path}/rep"
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
        s.restore_point("zero")
        time.sleep(0.05)
        t = dt.datetime.now(dt.timezone.utc)
        time.sleep(0.05)
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    walstore.restore(url, str(tmp_path / "d"), to=t)
    with walstore.open(str(tmp_path / "d")) as r:
        assert list(r.scan()) == [] and list(r.restore_points()) == ["zero"]
    with pytest.raises(walstore.UnknownRestorePoint, match="before the first commit"):
        walstore.restore(url, str(tmp_path / "d2"), to=before)


def test_a_time_before_every_record_names_nothing_as_other_unknown_points_do(tmp_path):
    """A time before the replica's first record names no state it has: like a txid past
    its end or an unknown name, ``UnknownRestorePoint`` (a ``walstore.UnknownPoint``, a
    ``KeyError``), nothing restored, and exit 2 on the CLI (it was a plain
    ``ReplicationError``, exit 1: probe-docs)."""
    url = f"file://{tmp_path}/rep"
    with walstore.open(str(tmp_path / "src"), replicate_to=url) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
    early = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    for to in (999, "nope", early):
        with pytest.raises(walstore.UnknownPoint) as caught:
            walstore.restore(url, str(tmp_path / "d"), to=to)
        assert isinstance(caught.value, (walstore.UnknownRestorePoint, KeyError))
        assert not os.path.exists(tmp_path / "d")
    res = subprocess.run([sys.executable, "-m", "walstore", "restore", url,
                          str(tmp_path / "cli"), "--to", "2000-01-01T00:00:00Z"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "before the first commit" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "cli")


# ---- 6. a dropped restore point ------------------------------------------------------
def test_replicas_shows_a_dropped_point_and_a_restore_to_it_restores_its_position(tmp_path):
    """``walstore replicas URL`` says a dropped point is dropped (and where); a restore to
    its name restores the replica's history at the point (the copy holds it, as the
    source did then), the report saying it was dropped later."""
    url = f"file://{tmp_path}/rep"
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.restore_point("gone")
        s.drop_restore_point("gone")
        with s.transaction() as tx:
            tx.put("a", 2)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    res = _cli("replicas", url)
    assert res.returncode == 0, res.stdout + res.stderr
    line = [ln for ln in res.stdout.splitlines() if "gone" in ln]
    assert line and "dropped at LSN" in line[0], res.stdout
    js = json.loads(_cli("replicas", url, "--json").stdout)
    p = [p for p in js["restore_points"] if p["name"] == "gone"][0]
    assert p["dropped"] is True and isinstance(p["dropped_lsn"], int)
    assert p["dropped_lsn"] > p["lsn"]
    r = walstore.restore(url, str(tmp_path / "d"), to="gone")
    assert "dropped later" in r["target"]
    with walstore.open(str(tmp_path / "d")) as c:
        assert c.get("a") == 1 and "gone" in c.restore_points()


# ---- 7. snapshot_interval=0 under steady commits --------------------------------------
def test_snapshot_interval_0_snapshots_under_steady_commits(tmp_path):
    """``snapshot_interval=0`` (a snapshot every round that shipped something): under
    commits that never pause (the writer defers applying to LMDB until they do) the
    replica still gets snapshots past the empty base; it got none, every attempt dropped
    as "LMDB has not moved", and a restore replayed the whole WAL."""
    rep = str(tmp_path / "rep")
    url = "file://" + rep
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05, "snapshot_interval": 0})
    try:
        t0, i = time.monotonic(), 0
        while time.monotonic() - t0 < 1.5:  # (~30 rounds: the bug made a snapshot in none)
            i += 1
            with s.transaction() as tx:
                tx.put(f"k{i % 7}", i)
            time.sleep(0.01)
        s.sync_replica(timeout=30)
        with open(os.path.join(rep, "manifest"), "rb") as f:
            doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    finally:
        s.close()
    real = [x for x in doc["snapshots"] if x["k"] is not None]
    assert real, doc["snapshots"]
    r = walstore.restore(url, str(tmp_path / "d"))
    assert r["snapshot_lsn"] > 0
    with walstore.open(str(tmp_path / "d")) as c:
        assert c.get(f"k{i % 7}") == i


def test_a_restore_to_a_time_leaves_out_what_began_after_it(tmp_path):
    # (probe-repl44: from the last commit at or before the time, the cut kept every record
    # with no stamp up to the first stamped later one; a transaction begun after the time
    # that touched a file (FILE_STEPS, unstamped then) or wrote a large write set (WRITES
    # chunks, appended with their COMMIT) was restored as in flight at the time — its file
    # change owed, put back by --compensate — though nothing was in flight in the source)
    url = f"file://{tmp_path}/rep"
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        ws = s.workspace(str(tmp_path / "ws"))
        with s.transaction() as tx:
            tx.put("a", 1)
            tx.files(ws).write("a.txt", "one")
        first = tx.id
        cuts = []
        for kind in ("file", "chunks"):
            time.sleep(0.02)
            cuts.append(dt.datetime.now(dt.timezone.utc))  # nothing in flight now
            time.sleep(0.02)
            tx = s.transaction()
            if kind == "file":
                tx.files(ws).write("b.txt", "two")  # logged after the time
            else:
                for i in range(3):
                    tx.put(f"big{i}", os.urandom(3 << 20))  # WRITES chunks before its COMMIT
            time.sleep(0.02)
            tx.put("b", kind)
            tx.commit()
        s.sync_replica(timeout=60)
    finally:
        s.close()
    for k, when in enumerate(cuts):
        d = str(tmp_path / f"copy{k}")
        report = walstore.restore(url, d, to=when)
        assert report["in_flight_txids"] == [] and report["owed_file_effects"] == [], report
        with walstore.open(d) as r:
            assert r.get("b") == (None if k == 0 else "file")
            assert max(x.txid for x in r.log()) == (first if k == 0 else first + 1)
