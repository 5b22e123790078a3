"""Stop 83, h4: a review, from the callers' side, of the open-path changes of 46853a93 and
3c70a6f9 (a read-only open of LMDB without its tables is NotAStore; a writable open of a
store with no log segment and a data file shorter than LMDB's two meta pages removes that
file for LMDB to make again; a failed tables commit beside a read-only handle puts the
read-only environment back; the tables' commit through the fault seam).  Real processes
and real files; a creation cut short is made with the fault seam (``fail_lmdb("tables")``),
and, for the meta pages, by cutting its data file to the one page a full disk leaves
(its page 0 is byte for byte the one a 4 MiB tmpfs left: checked by hand, h4 stop 83).

Findings (each fixed at stop 83, its test failing on the code before; the removal now
asks ``lmdb_check.unborn_data_file``: a regular file under two pages whose page 0 is
zeros or LMDB's fresh meta page):
* a writable open (so also ``walstore recover``) of a store that HELD commits, whose log
  segments are gone and whose data file was cut to under two pages (damage twice over),
  removes the data file as "a creation cut short" and opens an empty store: ``recover``
  says "recovered cleanly", exit 0, the damaged file is gone (not quarantined), ``verify``
  then says ok.  Before 46853a93 every open refused it (CorruptionError "too short").
  The removal is decided on the size alone (lmdb_state.py:167) and the absence of a
  ``.wal`` file (lmdb_state.py:586); LMDB's page 0 tells the two apart: a creation cut
  short has a fresh meta page (txnid 0, no main root), a store that committed has not.
* a read-only open (and every read-only CLI verb, ``backup``) of a creation cut short
  before LMDB's second meta page (the case the writable open now redoes) is still a
  CorruptionError "the file is too short ... truncated", exit 1, "`walstore recover`
  shows the options", where the same creation cut short one page later (no tables) is
  NotAStore "holds no state yet", exit 2 (GUIDE: such a store "is made again by the next
  writable open, where every open refused it as damaged").
* a store whose log holds commits (segments in wal/) and whose LMDB data file has no
  tables (the state lost: data.mdb replaced by a fresh LMDB file) is also "holds no state
  yet: its creation is under way or was cut short ...; a writable open completes it" to
  every read-only open: ``verify`` exit 2 (a usage error) where a missing data file is
  damage, exit 1; and once the log was trimmed the advice is false: ``recover`` refuses
  "gap: the WAL begins at LSN N but LMDB is applied only up to 0".  The tables test
  (lmdb_state.py:687-697, ``_open_tables``) does not know whether the log has segments
  (``used``, lmdb_state.py:586); a creation makes its tables before its first segment.
* a directory in data.mdb's place (no log segment): the writable open (and ``recover``)
  tries to remove it as "the data file a cut-short creation left (4096 bytes)" and says
  "cannot remove ...: Is a directory" [EISDIR], where the read-only open (and every open
  before 46853a93) names the damage: "the LMDB data file is not a regular file (a
  directory)".  ``_restart_cut_short_creation`` (lmdb_state.py:163-167) takes any file
  type's ``st_size`` (a directory's is 4096 on ext4; through a symlink, ``os.stat``
  follows it and ``unlink`` removes the link).
"""
from __future__ import annotations

import json
import os
import shutil
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
from walstore.ops.verify import verify_store  # noqa: E402

PAGE = 4096
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
READ_VERBS = (("verify",), ("stats",), ("scan",), ("log",), ("history", "k"),
              ("actions",), ("files",), ("diff", "--from", "tx:1"), ("backup", "@DEST"))


def _cut_short_at_the_tables(path: str) -> None:
    """A new store whose first open failed at the commit creating LMDB's tables: STORE,
    empty wal/, data.mdb of its two meta pages and nothing else."""
    fb = FaultBackend()
    with installed(fb):
        fb.fail_lmdb("tables")
        with pytest.raises(walstore.StoreIOError, match="cannot create the LMDB tables"):
            walstore.open(path, durability="none")
    assert os.listdir(os.path.join(path, "wal")) == []
    assert os.path.getsize(os.path.join(path, "db", "data.mdb")) == 2 * PAGE


def _cut_short_at_the_meta_pages(path: str) -> None:
    """A creation a full disk cut short while LMDB wrote its meta pages: page 0 only."""
    _cut_short_at_the_tables(path)
    os.truncate(os.path.join(path, "db", "data.mdb"), PAGE)


def _cli_all(path: str, tmp: Path, extra=("--json",)) -> list[tuple]:
    """Every read-only verb at once (real processes, in parallel: the file's budget)."""
    procs = []
    for i, verb in enumerate(READ_VERBS):
        args = [a if a != "@DEST" else str(tmp / f"dest{i}") for a in verb]
        cmd = [sys.executable, "-m", "walstore", args[0], path, *args[1:], *extra]
        procs.append((verb[0], subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True)))
    out = []
    for verb, p in procs:
        so, se = p.communicate(timeout=60)
        out.append((verb, p.returncode, so, se))
    return out


def _store_with_commits(path: str) -> None:
    with walstore.open(path, durability="full") as s:
        for i in range(10):
            s.run(lambda tx, i=i: tx.put(f"k{i}", i))
        s.checkpoint()


# ---- findings ----------------------------------------------------------------------------

def test_a_damaged_data_file_that_held_commits_is_never_taken_for_a_creation_cut_short(
        tmp_path):
    path = str(tmp_path / "s")
    _store_with_commits(path)
    for name in os.listdir(os.path.join(path, "wal")):
        os.unlink(os.path.join(path, "wal", name))  # the log lost ...
    data = os.path.join(path, "db", "data.mdb")
    os.truncate(data, PAGE)                        # ... and the data file cut
    r = subprocess.run([sys.executable, "-m", "walstore", "recover", path, "--json"],
                       env=ENV, capture_output=True, text=True, timeout=60)
    seen = [("recover", r.returncode, r.stderr.strip()[-200:])]
    try:
        with walstore.open(path, durability="none") as s:
            seen.append(("a writable open", "opened", len(list(s.scan()))))
    except walstore.CorruptionError as e:
        seen.append(("a writable open", "CorruptionError", str(e)[:60]))
    # the damage said, and its evidence kept: no empty store in its place
    assert r.returncode == 1, seen
    assert seen[1][1] == "CorruptionError", seen
    assert os.path.getsize(data) == PAGE, seen


def test_a_creation_cut_short_at_the_meta_pages_is_no_state_yet_to_a_reader(tmp_path):
    path = str(tmp_path / "s")
    _cut_short_at_the_meta_pages(path)
    try:
        walstore.open(path, readonly=True).close()
        api = "opened"
    except walstore.WalstoreError as e:
        api = type(e).__name__
    r = subprocess.run([sys.executable, "-m", "walstore", "verify", path, "--json"],
                       env=ENV, capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout)
    assert (api, r.returncode) == ("NotAStore", 2), (api, r.returncode, r.stderr)
    assert doc["error"]["type"] == "NotAStore" and "no state yet" in doc["error"]["message"]
    # (and the writable open, as GUIDE says, makes it again)
    with walstore.open(path, durability="none") as s:
        s.run(lambda tx: tx.put("a", 1))
    assert verify_store(path).ok


def test_lmdb_without_tables_beside_a_log_of_commits_is_damage_not_a_creation(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none", segment_size=64 * 1024) as s:
        for i in range(300):
            s.run(lambda tx, i=i: tx.put(f"k{i}", "x" * 500))
        s.checkpoint()
    segs = [n for n in os.listdir(os.path.join(path, "wal")) if n.endswith(".wal")]
    assert segs and min(int(n[:20]) for n in segs) > 0, segs  # (the log was trimmed)
    db = os.path.join(path, "db")
    os.unlink(os.path.join(db, "data.mdb"))
    os.unlink(os.path.join(db, "lock.mdb"))
    lmdb.open(db, max_dbs=40).close()  # a fresh LMDB file: its meta pages, no table
    r = subprocess.run([sys.executable, "-m", "walstore", "verify", path, "--json"],
                       env=ENV, capture_output=True, text=True, timeout=60)
    said = (r.returncode, r.stderr.strip())
    assert "Traceback" not in r.stderr
    rr = subprocess.run([sys.executable, "-m", "walstore", "recover", path], env=ENV,
                        capture_output=True, text=True, timeout=60)
    assert rr.returncode == 1 and "gap" in rr.stdout + rr.stderr, rr  # (no writable
    # open completes it)
    assert said[0] == 1 and "creation is under way" not in said[1], said


def test_a_directory_in_the_data_files_place_is_named_as_such_by_a_writable_open(tmp_path):
    path = str(tmp_path / "s")
    _cut_short_at_the_tables(path)
    data = os.path.join(path, "db", "data.mdb")
    os.unlink(data)
    os.mkdir(data)
    if not 0 < os.stat(data).st_size < 2 * PAGE:
        pytest.skip("this file system gives a directory no size below two pages")
    with pytest.raises(walstore.CorruptionError, match="not a regular file"):
        walstore.open(path, readonly=True)
    try:
        walstore.open(path, durability="none").close()
        said = "opened"
    except walstore.WalstoreError as e:
        said = f"{type(e).__name__}: {e}"
    assert said.startswith("CorruptionError") and "not a regular file" in said, said
    assert os.path.isdir(data)


# ---- what held ---------------------------------------------------------------------------

def test_every_read_only_verb_of_a_creation_cut_short_at_the_tables_is_exit_2_one_line(
        tmp_path):
    path = str(tmp_path / "s")
    _cut_short_at_the_tables(path)
    for verb, code, so, se in _cli_all(path, tmp_path):
        assert code == 2, (verb, code, se)
        assert "Traceback" not in se and len(se.strip().splitlines()) == 1, (verb, se)
        assert "holds no state yet" in se and "LMDB has no tables" in se, (verb, se)
        doc = json.loads(so)
        assert doc["error"]["type"] == "NotAStore" and doc["error"]["exit"] == 2, (verb, doc)
    assert not any(p.name.startswith("dest") for p in tmp_path.iterdir())  # no backup made
    r = subprocess.run([sys.executable, "-m", "walstore", "get", path, "k"], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no state yet" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "walstore", "dump", path, "--json"], env=ENV,
                       capture_output=True, text=True, timeout=60)  # (the log alone: none)
    assert r.returncode == 0 and json.loads(r.stdout) == {"records": []}, r
    # recover completes it; every verb then opens it
    r = subprocess.run([sys.executable, "-m", "walstore", "recover", path, "--json"],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["clean"] is True, r
    with walstore.open(path, readonly=True) as s:
        assert list(s.scan()) == []
    assert verify_store(path).ok


def test_recover_redoes_a_creation_cut_short_at_the_meta_pages(tmp_path):
    path = str(tmp_path / "s")
    _cut_short_at_the_meta_pages(path)
    r = subprocess.run([sys.executable, "-m", "walstore", "recover", path], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "recovered cleanly" in r.stdout, r
    with walstore.open(path, durability="full") as s:
        s.run(lambda tx: tx.put("a", 1))
    with walstore.open(path, readonly=True) as s:
        assert s.get("a") == 1
    assert verify_store(path).ok


READER = r"""
import sys, time, json, walstore
path, n = sys.argv[1], int(sys.argv[2])
seen, bad, early = {}, [], None
t0 = time.time()
while time.time() - t0 < 20:
    try:
        h = walstore.open(path, readonly=True)
    except walstore.NotAStore:
        seen["NotAStore"] = seen.get("NotAStore", 0) + 1
        continue
    except Exception as e:
        bad.append(f"{type(e).__name__}: {e}")
        continue
    seen["opened"] = seen.get("opened", 0) + 1
    if early is None:
        early = h          # the first handle that opened: kept, it must follow the writer
    else:
        done = h.get("done")
        h.close()
        if done:
            break
vals = [early.get(f"k{i}") for i in range(n)] if early is not None else None
print(json.dumps({"seen": seen, "bad": bad, "early": vals}))
"""

WRITER = r"""
import sys, walstore
with walstore.open(sys.argv[1], durability="full") as w:
    for i in range(int(sys.argv[2])):
        w.run(lambda tx, i=i: tx.put(f"k{i}", i))
    w.run(lambda tx: tx.put("done", True))
"""


@pytest.mark.parametrize("reader_first", [True, False])
def test_a_reader_polling_a_store_being_created_sees_no_state_or_the_whole_store(
        tmp_path, reader_first):
    """A read-only open looping while another process creates the store and commits at
    once (durability "full"): NotAStore, or a handle that reads every later commit --
    never a CorruptionError, never an empty store for life."""
    n = 12
    for rnd in range(3):
        path = str(tmp_path / f"s{rnd}")
        start = [[sys.executable, "-c", READER, path, str(n)],
                 [sys.executable, "-c", WRITER, path, str(n)]]
        if not reader_first:
            start.reverse()
        procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in start]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        res = json.loads(outs[0 if reader_first else 1][0])
        assert res["bad"] == [], res
        assert res["seen"].get("opened"), res
        assert res["early"] == list(range(n)), res


WRITER2 = r"""
import sys, time, walstore
try:
    with walstore.open(sys.argv[1], durability="full") as w:
        w.run(lambda tx: tx.put(sys.argv[2], 1))
        time.sleep(0.3)
    print("ok")
except walstore.StoreLocked:
    print("StoreLocked")
"""


def test_two_writers_racing_to_create_a_store(tmp_path):
    for rnd in range(2):
        path = str(tmp_path / f"s{rnd}")
        procs = [subprocess.Popen([sys.executable, "-c", WRITER2, path, f"p{j}"], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for j in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        said = sorted(o[0].strip() for o in outs)
        assert all(not o[1].strip() for o in outs), outs
        assert said in (["StoreLocked", "ok"], ["ok", "ok"]), outs
        with walstore.open(path, readonly=True) as s:
            assert sum(s.get(f"p{j}") == 1 for j in range(2)) == said.count("ok")
        assert verify_store(path).ok


def test_a_complete_data_file_without_its_log_is_kept_and_said(tmp_path):
    """The removal never touches a data file of a store that committed: its log deleted
    by hand (the directory, or its segments), every open says what is missing and the
    data file stays as it was."""
    path = str(tmp_path / "s")
    _store_with_commits(path)
    data = os.path.join(path, "db", "data.mdb")
    size = os.path.getsize(data)
    for name in os.listdir(os.path.join(path, "wal")):
        os.unlink(os.path.join(path, "wal", name))
    for ro in (True, False):
        with pytest.raises(walstore.CorruptionError, match="no WAL segment exists"):
            walstore.open(path, readonly=ro, **({} if ro else {"durability": "none"}))
    shutil.rmtree(os.path.join(path, "wal"))
    for ro in (True, False):
        with pytest.raises(walstore.CorruptionError, match="no wal/ directory"):
            walstore.open(path, readonly=ro, **({} if ro else {"durability": "none"}))
    assert os.path.getsize(data) == size


def test_an_older_store_with_only_its_first_tables_opens_read_only(tmp_path):
    """The NotAStore is for a data file without ``data`` or ``meta``: every walstore since
    the first has made both.  A store holding only the tables of the first walstore's
    core (every later table dropped) reads, read-only, in this process and from a CLI."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(5):
            s.run(lambda tx, i=i: tx.put(f"k{i}", i))
    env = lmdb.open(os.path.join(path, "db"), max_dbs=40)
    try:
        with env.begin(write=True) as t:
            for name in (b"owed", b"aended", b"fconflicts", b"fchanges", b"fversions",
                         b"fsteps", b"workspaces", b"inflight", b"hkeys", b"twophase"):
                t.drop(env.open_db(name, txn=t), delete=True)
    finally:
        env.close()
    with walstore.open(path, readonly=True) as r:
        assert r.get("k3") == 3 and len(list(r.scan())) == 5
    r = subprocess.run([sys.executable, "-m", "walstore", "scan", path, "--json"], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(json.loads(r.stdout)["items"]) == 5, r


def test_repeated_refused_read_only_opens_leak_nothing_and_a_writer_completes(tmp_path):
    path = str(tmp_path / "s")
    _cut_short_at_the_tables(path)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))
    before = fds()
    for _ in range(300):
        with pytest.raises(walstore.NotAStore):
            walstore.open(path, readonly=True)
    assert fds() == before
    t0 = time.time()
    with walstore.open(path, durability="full") as w:  # the same process
        w.run(lambda tx: tx.put("a", 1))
        with walstore.open(path, readonly=True) as r:
            assert r.get("a") == 1
    assert time.time() - t0 < 10
    assert verify_store(path).ok
