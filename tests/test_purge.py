"""store.purge(prefix) and `walstore purge`: erasure that is real (contract section 2).

Afterwards no API returns the keys (get, scan, at, history, log, revert, a read-only
process), and after the purge's checkpoint their bytes are in no file of the store
directory (a marker grep over every file).  Logged, not revertible; other keys untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli
from walstore.ops.verify import verify_store

from store_support import files_with

MARKER = b"PURGE-ME-7f3a9c"


def fill(store) -> dict:
    """Several versions of the doomed keys, spread over segments, and keys to keep."""
    txids = {}
    for i in range(40):
        with store.transaction() as tx:
            tx.put(f"conv/1/m{i % 5}", (MARKER + b"-%d" % i).decode())
            tx.put(f"conv/2/m{i % 3}", f"keep {i}")
        txids[i] = tx.id
    with store.transaction() as tx:
        tx.put("conv/1/title", MARKER.decode())
        tx.put("user/name", "ada")
    txids["mixed"] = tx.id
    return txids


@pytest.mark.parametrize("durability", ["full", "none"])
def test_purge_erases_keys_from_every_api_and_every_file(tmp_path, durability):
    path = str(tmp_path / "s")
    store = walstore.open(path, durability=durability, segment_size=16384)
    try:
        txids = fill(store)
        point = store.restore_point("before-purge")
        assert files_with(path, MARKER)  # the bytes really are on disk before
        out = store.purge("conv/1/")
        assert out["keys_erased"] == 6 and out["keys_deleted"] == 6
        assert store.get("conv/1/m0") is None and list(store.scan(prefix="conv/1/")) == []
        assert store.history("conv/1/m0") == [] and store.history("conv/1/title") == []
        view = store.at(point)
        assert view.get("conv/1/m0") is None and list(view.scan(prefix="conv/1/")) == []
        assert view.get("conv/2/m0") == "keep 39"  # the rest of the past is intact
        for info in store.log():
            assert not [k for k in info.keys if str(k).startswith("conv/1/")], info
        assert store.txn_info(txids["mixed"]).keys == ("user/name",)
        with pytest.raises(walstore.RevertConflict):
            store.revert(out["txid"])
        store.rewind("before-purge")  # a rewind across the purge cannot bring them back
        assert store.get("conv/1/m0") is None and store.get("conv/2/m0") == "keep 39"
        assert dict(store.scan(prefix="conv/2/")) == {"conv/2/m0": "keep 39",
                                                       "conv/2/m1": "keep 37",
                                                       "conv/2/m2": "keep 38"}
        assert files_with(path, MARKER) == []
    finally:
        store.close()
    assert files_with(path, MARKER) == []
    with walstore.open(path) as s:  # and it stays gone across a reopen (recovery)
        assert s.get("conv/1/m0") is None and s.get("user/name") == "ada"
    assert verify_store(path).ok


def test_purge_is_logged_by_prefix_not_data(tmp_path):
    with walstore.open(str(tmp_path / "s")) as s:
        fill(s)
        out = s.purge("conv/1/")
        info = s.log(limit=1)[0]
        assert info.txid == out["txid"] and info.keys == ()
        assert info.extra["purge"] == "conv/1/"


def test_a_write_racing_the_purge_into_its_prefix_makes_one_of_them_conflict(tmp_path):
    with walstore.open(str(tmp_path / "s")) as s:
        fill(s)
        tx = s.transaction()
        tx.get("conv/1/m0")  # its snapshot predates the purge
        tx.put("conv/1/m0", "late")
        s.purge("conv/1/")
        with pytest.raises(walstore.ConflictError):
            tx.commit()
        assert s.get("conv/1/m0") is None


def test_read_only_process_never_shows_purged_data_after_the_purge(tmp_path):
    path = str(tmp_path / "s")
    w = walstore.open(path)
    try:
        fill(w)
        reader = subprocess.Popen(
            [sys.executable, "-c", (
                "import sys, walstore\n"
                "r = walstore.open(sys.argv[1], readonly=True)\n"
                "print(r.get('conv/1/m0') is not None, flush=True)\n"
                "sys.stdin.readline()\n"
                "print(r.get('conv/1/m0'), r.get('conv/2/m0'), len(r.history('conv/1/m0')),"
                " flush=True)\n"), path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert reader.stdout.readline().strip() == "True"
        w.purge("conv/1/")
        out, _ = reader.communicate("go\n", timeout=60)
        assert out.split() == ["None", "keep", "39", "0"], out
    finally:
        w.close()


def test_cli_purge_needs_yes_and_reports(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        fill(s)
    r = CliRunner().invoke(cli, ["purge", path, "conv/1/"])
    assert r.exit_code == 2 and "--yes" in r.output
    with walstore.open(path) as s:
        assert s.get("conv/1/m0") is not None
    r = CliRunner().invoke(cli, ["purge", path, "conv/1/", "--yes", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["keys_erased"] == 6 and doc["segments_removed"] >= 1
    assert files_with(path, MARKER) == []


def test_purge_of_bytes_prefix_and_bad_prefixes(tmp_path):
    with walstore.open(str(tmp_path / "s")) as s:
        with s.transaction() as tx:
            tx.put(b"\x00thread-a/1", MARKER)
            tx.put(b"\x00thread-b/1", b"keep")
            tx.put("\x00thread-a/1", "a str key is not a bytes key")
        s.purge(b"\x00thread-a/")
        assert s.get(b"\x00thread-a/1") is None and s.get(b"\x00thread-b/1") == b"keep"
        assert s.get("\x00thread-a/1") == "a str key is not a bytes key"
        for bad in ("", b"", None, 5):
            with pytest.raises(TypeError):
                s.purge(bad)


def test_a_write_committed_while_the_purge_reads_makes_the_purge_run_again(tmp_path):
    """The purge loses the race (a writer commits into the prefix after the purge's
    snapshot, before its commit): it runs again and erases the late key too."""
    with walstore.open(str(tmp_path / "s")) as s:
        fill(s)
        eng = s._engine
        real_scan = eng.reader.scan
        raced = []

        def scan(lo, hi, reverse, at=None):
            if not raced:  # the first attempt only: a writer commits meanwhile
                raced.append(True)
                th = threading.Thread(target=lambda: s.run(lambda tx: tx.put("conv/1/late", 1)))
                th.start()
                th.join()
            return real_scan(lo, hi, reverse, at)

        eng.reader.scan = scan
        try:
            out = s.purge("conv/1/")
        finally:
            del eng.reader.scan
        assert raced and s.get("conv/1/late") is None
        assert list(s.keys(prefix="conv/1/")) == []
        assert out["keys_deleted"] >= 1


PURGE_THEN_DIE = r"""
import os, signal, sys
import walstore
from walstore.engine.engine import Engine
sys.path.insert(0, sys.argv[2])
from test_purge import fill
store = walstore.open(sys.argv[1], durability="full")
fill(store)
def die(self, needles):  # the purge committed and was applied; its erasure never runs
    print("PURGED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
Engine.erase_old_bytes = die
store.purge("conv/1/")
"""


@pytest.mark.parametrize("then", ["reopen", "reopen-readonly-then-checkpoint"])
def test_a_crash_between_the_purge_and_its_erasure_is_finished_later(tmp_path, then):
    """kill -9 right after the purge committed (and was applied) but before its
    compacting checkpoint: the erasure is owed durably (LMDB meta, with the purge's
    rows), so the next writable open finishes it — no file holds the marker afterwards.
    A read-only open cannot erase; the next writable open or checkpoint does.  (Before,
    the bytes stayed in the WAL and in LMDB's free pages for good.)"""
    path = str(tmp_path / "s")
    child = tmp_path / "child.py"
    child.write_text(PURGE_THEN_DIE)
    p = subprocess.run([sys.executable, str(child), path, os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9 and "PURGED" in p.stdout, p.stderr
    assert files_with(path, MARKER), "the crash left the old bytes (the case under test)"
    if then == "reopen-readonly-then-checkpoint":
        with walstore.open(path, readonly=True) as ro:  # shows nothing purged, erases nothing
            assert list(ro.scan(prefix="conv/1/")) == [] and ro.get("user/name") == "ada"
        assert files_with(path, MARKER)
    with walstore.open(path) as store:
        assert list(store.scan(prefix="conv/1/")) == []
        assert store.history("conv/1/m0") == []
        assert files_with(path, MARKER) == [], "erased at open"
        assert store.get("user/name") == "ada"
        with store.transaction() as tx:
            tx.put("after", 1)
        store.checkpoint()
    assert files_with(path, MARKER) == []
    assert verify_store(path).ok


@pytest.mark.parametrize("extra", [0, 1])
def test_a_reader_process_beside_a_purge_reads_the_compacted_file_whole(tmp_path, extra):
    """The purge's checkpoint swaps in a compacted data file.  A reader process that had
    the store open must then read the new file correctly: LMDB keeps the last
    transaction id in lock.mdb's shared memory, and with the old lock file kept alive by
    the reader it picked the new file's meta page by the OLD id — an empty, stale
    database (every applied key read as absent).  The swap now starts a fresh lock file."""
    path = str(tmp_path / "s")
    w = walstore.open(path)
    try:
        fill(w)
        with w.transaction() as tx:
            for i in range(200):
                tx.put(f"keep/{i:03d}", i)
        w.checkpoint()  # everything in LMDB: the reader's MemTable starts empty
        for i in range(extra):  # (one more LMDB transaction: the other meta page)
            w.restore_point(f"parity{i}")
            w.checkpoint()
        reader = subprocess.Popen(
            [sys.executable, "-c", (
                "import json, sys, walstore\n"
                "r = walstore.open(sys.argv[1], readonly=True)\n"
                "print(r.get('keep/007'), flush=True)\n"
                "for line in sys.stdin:\n"
                "    print(json.dumps([r.get('keep/007'), len(list(r.scan(prefix='keep/'))),"
                " r.get('user/name'), r.get('conv/1/m0'), len(r.history('conv/1/m0'))]),"
                " flush=True)\n"), path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert reader.stdout.readline().strip() == "7"
        w.purge("conv/1/")
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert json.loads(reader.stdout.readline()) == [7, 200, "ada", None, 0]
        with w.transaction() as tx:  # the writer goes on in the new file; so does the reader
            tx.put("keep/007", "seven")
        w.checkpoint()
        out, _ = reader.communicate("again\n", timeout=60)
        assert json.loads(out) == ["seven", 200, "ada", None, 0]
    finally:
        w.close()


KILLED_BEFORE_APPLY = r"""
import os, signal, sys
import walstore
from walstore.engine import apply as A
orig = A.Applier.apply
def apply(self, events, *a, **k):  # kill -9 once the purge's commit is durable, unapplied
    if any(e.type == A._T.COMMIT and isinstance(e.body, dict) and "purge" in e.body
           for e in events):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, events, *a, **k)
A.Applier.apply = apply
s = walstore.open(sys.argv[1])
s.purge("conv/1/")
"""


def test_a_read_only_open_after_a_purge_died_before_its_apply_shows_nothing_purged(tmp_path):
    """The purge's commit is durable, its apply never ran (kill -9): LMDB still holds the
    purged keys' history.  A read-only open (which cannot apply it) must show nothing of
    them anyway — get, history, at() of a point before the purge, scans of those views —
    and the CLI's read-only commands neither (history and at() returned the old values)."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        fill(s)
        s.restore_point("before")
        s.checkpoint()  # (the history rows are in LMDB)
    child = tmp_path / "child.py"
    child.write_text(KILLED_BEFORE_APPLY)
    p = subprocess.run([sys.executable, str(child), path], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -9, p.stderr
    with walstore.open(path, readonly=True) as r:
        assert r.get("conv/1/m0") is None and r.history("conv/1/m0") == []
        assert r.at("before").get("conv/1/m0") is None
        assert [k for k, _v in r.at("before").scan(prefix="conv/")] == [
            k for k, _v in r.at("before").scan(prefix="conv/2/")]
        assert r.get("user/name") == "ada" and r.at("before").get("conv/2/m0") is not None
    out = CliRunner().invoke(cli, ["history", path, "conv/1/m0", "--json"])
    assert MARKER.decode() not in out.output
    with walstore.open(path) as s:  # the writer's open applies it and erases the bytes
        assert s.history("conv/1/m0") == []
    assert files_with(path, MARKER) == []


def test_purged_key_names_written_in_the_same_apply_are_in_no_file(tmp_path):
    """Keys written and purged before the applier ran: their rows were put and erased in
    one LMDB transaction, and LMDB's compacting copy kept the bytes that page space still
    held (4,150 names of 4,000 purged keys in data.mdb, values gone: a probe).  The data
    file is now rebuilt row by row."""
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", apply_interval=60)
    for j in range(20):
        with s.transaction() as tx:
            for i in range(200):
                tx.put(f"{MARKER.decode()}/{j}/{i}", f"v{i}")
    with s.transaction() as tx:
        tx.put("keep", 1)
    assert s.purge(MARKER.decode() + "/")["keys_erased"] == 4000
    assert s.get("keep") == 1 and s.scan(prefix=MARKER.decode()) is not None
    s.close()
    s = walstore.open(path)
    assert s.get("keep") == 1 and list(s.scan(prefix=MARKER.decode())) == []
    s.close()
    # the prefix itself is what the purge logs; every purged key name is gone
    assert [files_with(path, MARKER + b"/%d/" % j) for j in range(20)] == [[]] * 20


CRASH_AFTER_WRITES = """
import os, sys
sys.path.insert(0, sys.argv[2])
import walstore
s = walstore.open(sys.argv[1])
with s.transaction() as tx:
    tx.put("keep", 1)
    tx.put("other/x", "kept torn")
if sys.argv[3] == "checkpoint":
    with s.transaction() as tx:
        tx.put("user/42/name", sys.argv[4])
    s.checkpoint()  # (in LMDB; the WAL still starts at LSN 0)
else:  # the last record, left to be torn
    with s.transaction() as tx:
        tx.put(sys.argv[3], sys.argv[4])
os._exit(0)
"""


def crashed_store(tmp_path, mode: str, value: str) -> str:
    path = str(tmp_path / "s")
    child = tmp_path / "child.py"
    child.write_text(CRASH_AFTER_WRITES)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, str(child), path, root, mode, value], check=True,
                   timeout=120)
    return path


@pytest.mark.parametrize("how", ["api", "cli"])
def test_purge_removes_the_damaged_lmdb_that_rebuild_state_moved_to_quarantine(tmp_path,
                                                                                 how):
    """`walstore recover --rebuild-state` moves a damaged LMDB to quarantine/db.damaged.*/;
    purge only scrubbed quarantine/*.bin, so that data.mdb kept the purged key and value
    for good (quarantine_removed: 0; probe51).  A damaged database cannot be read with
    certainty: every purge removes it and names it in its report."""
    path = crashed_store(tmp_path, "checkpoint", MARKER.decode())
    db = os.path.join(path, "db", "data.mdb")
    with open(db, "r+b") as f:  # damage LMDB's two meta pages
        f.write(b"\xde\xad" * 4096)
    r = CliRunner().invoke(cli, ["recover", path, "--rebuild-state"])
    assert r.exit_code == 0, r.output
    damaged = [n for n in os.listdir(os.path.join(path, "quarantine"))
               if n.startswith("db.damaged.")]
    assert len(damaged) == 1
    assert os.path.join("quarantine", damaged[0], "data.mdb") in files_with(path, MARKER)
    if how == "cli":  # (the text output names what went, as --json does)
        r = CliRunner().invoke(cli, ["purge", path, "user/42/", "--yes"])
        assert r.exit_code == 0, r.output
        assert f"removed from quarantine/ (copies that may hold erased bytes): {damaged[0]}" \
            in r.output
    with walstore.open(path) as s:
        if how == "api":
            assert s.get("user/42/name") == MARKER.decode()
            out = s.purge("user/42/")
            assert out["quarantine_removed"] == 1
            assert out["quarantine_removed_names"] == damaged
            s.checkpoint()
        assert s.get("user/42/name") is None and s.get("keep") == 1
    assert files_with(path, MARKER) == []
    assert verify_store(path).ok


def tear_last_record(path: str, key: bytes, at: int, flip: int) -> None:
    seg = sorted(n for n in os.listdir(os.path.join(path, "wal")) if n.endswith(".wal"))[-1]
    seg = os.path.join(path, "wal", seg)
    with open(seg, "rb") as f:
        data = bytearray(f.read())
    i = data.rfind(key)
    data[i + at] ^= flip
    with open(seg, "wb") as f:
        f.write(data)


def quarantined_bins(path: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(path, "quarantine")) if n.endswith(".bin"))


def test_a_quarantined_torn_write_whose_key_is_damaged_is_scrubbed(tmp_path):
    """A torn tail quarantined by recovery whose key bytes are damaged (no longer UTF-8,
    the prefix no longer there) kept a value written under the purged prefix: the scrub
    matched key names literally (probe51).  A write whose key cannot be attributed makes
    the quarantined file go."""
    path = crashed_store(tmp_path, "user/42/card", MARKER.decode())
    tear_last_record(path, b"user/42/card", 6, 0x80)
    with walstore.open(path) as s:
        assert [(p.kind, p.action) for p in s.last_recovery.problems] == [("torn-tail", "cut")]
        assert files_with(path, MARKER) and quarantined_bins(path)
        out = s.purge("user/42/")
        assert out["quarantine_removed"] == 1
    assert files_with(path, MARKER) == [] and quarantined_bins(path) == []


def test_a_quarantined_torn_write_outside_the_prefix_is_kept(tmp_path):
    """Evidence is kept when every write in it is attributed to a key outside the range
    (the value's bytes damaged, the key intact)."""
    path = crashed_store(tmp_path, "other/y", MARKER.decode())
    tear_last_record(path, MARKER, 3, 0x01)
    with walstore.open(path) as s:
        kept = quarantined_bins(path)
        assert len(kept) == 1
        with s.transaction() as tx:
            tx.put("user/42/a", 1)
        assert s.purge("user/42/")["quarantine_removed"] == 0
    assert quarantined_bins(path) == kept


def test_the_quarantine_scrub_reads_a_whole_large_file(tmp_path):
    """The scrub read only the first 256 MiB of each quarantined file: an erased key's
    bytes after that stayed.  It reads the whole file now, a chunk at a time.  (A sparse
    file: no disk space.)"""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("user/42/a", MARKER.decode())
        q = os.path.join(path, "quarantine")
        os.makedirs(q, mode=0o700, exist_ok=True)
        big = os.path.join(q, "00000000000000000000.wal@64.20260101T000000.bin")
        with open(big, "wb") as f:
            f.seek(300 << 20)
            f.write(b"\xc4\x0asuser/42/a" + MARKER)
        assert s.purge("user/42/")["quarantine_removed"] == 1
    assert not os.path.exists(big) and files_with(path, MARKER) == []


def test_purge_errors_name_each_key_once_and_the_store_by_its_absolute_path(tmp_path,
                                                                           monkeypatch):
    """A purge blocked by a prepared transaction named a key twice ('user/42/a',
    'user/42/a', ...); a purge on a closed store named it by the relative path it was
    opened with, where the read-only error names the absolute one (probe51)."""
    monkeypatch.chdir(tmp_path)
    s = walstore.open("b1")
    with s.transaction() as tx:
        tx.put("user/42/a", 1)
    p = s.transaction()
    p.put("user/42/p", 2)
    p.put("user/42/a", 3)
    p.prepare("g1")
    with pytest.raises(walstore.ConflictError) as e:
        s.purge("user/42/")
    assert str(e.value).count("'user/42/a'") == 1, e.value
    s.rollback_prepared("g1")
    s.close()
    with pytest.raises(walstore.StoreClosed) as e:
        s.purge("user/42/")
    assert str(tmp_path / "b1") in str(e.value), e.value


def test_purge_keeps_action_rows_and_transaction_meta_as_documented(tmp_path):
    """README ("What it keeps"): a purge erases keys, not the Saga action rows (args,
    results) nor the log's transaction meta of transactions that wrote under the prefix;
    a scoped rewind across it still runs their compensations with the kept args.  This
    pins the documented behaviour (probe51 repro2: it was undocumented)."""
    path = str(tmp_path / "s")
    ran = []
    with walstore.open(path) as s:
        s.compensator("unsend")(lambda a: ran.append(a.args))
        s.restore_point("start")
        with s.transaction(scope="user/42/", meta={"note": "n42"}) as tx:
            tx.put("user/42/mail", MARKER.decode())
            with tx.action("send", args={"to": "ref:user/42/mail"}, compensate="unsend") as a:
                a.result = {"id": 7}
        s.purge("user/42/")
        assert [(a.args, a.result) for a in s.actions()] == [({"to": "ref:user/42/mail"},
                                                              {"id": 7})]
        assert {"note": "n42"} in [i.meta for i in s.log()]
        assert {"purge": "user/42/"} in [i.meta for i in s.log()]
        s.rewind("start", scope="user/42/")
        assert ran == [{"to": "ref:user/42/mail"}]
    assert files_with(path, MARKER) == []
