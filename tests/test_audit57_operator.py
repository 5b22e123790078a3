"""Audit 57 of the operator's side (CONTRACT section 3, the command line, and the truths its
exit statuses and messages tell; docs/CLI.md): the leads earlier audits left alone,
confirmed as real CLI processes against real stores and replicas.

Findings (each test named below fails on the code before its fix):

- `walstore dump --from N` with N past the end of the log listed nothing and exited 0,
  exactly as an N at the end does (a poller's "nothing new"): a mistyped or foreign LSN
  read as "no records yet", while every other verb answers a point that names nothing
  with UnknownPoint, exit 2.  An N at the end still lists none, exit 0; one past it is
  UnknownPoint, exit 2, naming where the log ends (``--json``: the error document)
  (``test_dump_from_past_the_end_of_the_log_names_nothing``).
- `walstore history PATH KEY` of a key that was never written (a typo) printed an empty
  table, exit 0, as if the key had an (empty) history; `get` of it exits 1.  It prints its
  empty listing (the same JSON document) and exits 1 with a line on stderr now
  (``test_history_of_a_key_never_written_exits_1``).
- `walstore restore URL DEST --to NAME` read a restore point name that begins like a
  date ("2026-release", "2026-05-01") as a time: "looks like a time but is not ISO-8601"
  or "needs an offset", exit 2, so such a restore point (which `rewind --to` takes) could
  never be restored to.  Only a whole ISO-8601 time with an offset is a time now; the
  rest is a name, and a name the replica lacks that looks like a time is refused (exit 2)
  with a word on how a time is written
  (``test_restore_to_a_restore_point_named_like_a_date``).
- `walstore bench` exited 0 when a row of the run failed (its system raised, or could not
  be imported: "error: ..." in the row, a table or JSON as usual): a CI job running it
  passed with rows that never ran.  It exits 1 now, a line on stderr naming the first
  failed row; a "skipped: ..." row (an optional extra not installed) is no failure
  (``test_bench_exits_1_when_a_row_failed``; the run is cut to put-1t, one round, a tiny
  scale, and one peer made unimportable: the runner's own error path).
- `walstore verify` of a store whose db/data.mdb is garbage printed "segments 0, records
  0, commits 0, LMDB keys 0, applied LSN 0, WAL end LSN 0" above the right error: the log
  was never walked (its segments held every record), and LMDB's figures were never
  measured.  The WAL is walked on its own now (its checksums and chain: a warning says
  what is left unchecked), and each figure of a check that did not run is "-" (null in
  JSON), also the blobs' when damage stopped their check
  (``test_verify_of_a_garbage_lmdb_file_walks_the_wal_and_shows_no_false_zeros``).
- S3 replication: a WAL object of the replica that was damaged (or missing), its local
  segment trimmed, failed compaction in every round with a bare "ValueError: WAL object
  header checksum mismatch" (``last_error``), raised after the round had shipped the WAL:
  the round's retention, its pin of the local WAL and ``complete_to`` never moved on.
  Compaction leaves such an object out of every merge now (the rest are merged), the
  rounds succeed, and ``store.replication().last_error`` names the object and why
  (``test_a_damaged_replica_wal_object_does_not_fail_every_round``, moto's server).
- ``store.replication()`` before the shipper had ever read the replica's manifest (a store
  reopened while the server is down) said ``shipped_lsn`` 0 and ``lag_bytes`` the whole
  log (its lag_seconds the age of the log's first record), of a replica holding all but
  the newest commit.  Until the manifest is read (state "starting") ``shipped_lsn`` is
  the position the last shipper recorded in the store (a lower bound: an int, as a
  caller comparing it expects; the helper's first fix made it None, which a polling
  ``shipped_lsn >= lsn`` would raise TypeError on) and the lag counts from there
  (``test_replication_before_the_replica_was_reached_claims_no_position``).
- ``store.revert()`` / ``rewind()`` under durability="normal" when the log's fsync failed
  (the flusher's or the applier's, for another thread's commit) while the undo planned:
  its commit was refused before the commit point and it raised the store's bare
  "turned read-only after an error (...)" — or, in the window between the log's failure
  and the store's, the log's internal ``LogFailed`` — saying nothing of the undo: a
  caller could not tell whether the state was reverted and the compensations run.  It
  raises ReadOnlyError "the undo (revert or rewind) did not happen: nothing was changed
  and no compensation ran (...)" now, the cause chained; CommitOutcomeUnknown (the undo's
  own record appended) is unchanged
  (``test_a_revert_refused_by_a_failed_log_says_it_did_not_happen``).
- `walstore replicate --once` (the cron form) exited 0 saying "shipped ..." when its round
  shipped the WAL but left a problem the shipper reports only in its status: a snapshot
  that failed (``--json`` had a ``snapshot_error`` key, the human output nothing), local
  blobs too damaged to ship, a replica object compaction cannot read.  It exits 1 now, a
  line on stderr naming the problem, and ``--json`` has a ``problem`` key (null when none)
  (``test_replicate_once_exits_1_when_its_round_left_a_problem``).
- `walstore dump` of a store whose db/data.mdb cannot be read, its log trimmed by
  checkpoints (the first segment starting past LSN 0), listed a GAP first: "the WAL
  begins at LSN N but LMDB is applied only up to 0: log records are missing", exit 1 —
  no record was missing (the walk took "applied 0, log starting at 0" for LMDB's word).
  It walks the log from its first segment then, as verify now does: no false GAP, exit 0
  (``test_dump_of_a_trimmed_log_beside_an_unreadable_lmdb_claims_no_gap``).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import walstore

from store_support import CLI, cli_env

try:  # (the S3 tests need boto3 and moto; the others run without them)
    from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401
except pytest.skip.Exception:
    make_s3_replica = None

    @pytest.fixture
    def s3_endpoint():
        pytest.skip("boto3 and moto are not installed")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    """A store of two commits on key "a" (closed cleanly)."""
    path = str(tmp_path_factory.mktemp("a57") / "s")
    with walstore.open(path) as s:
        for i in range(2):
            with s.transaction() as tx:
                tx.put("a", i)
    return path


def test_dump_from_past_the_end_of_the_log_names_nothing(small_store):
    p = cli("dump", small_store, "--json")
    assert p.returncode == 0, p.stderr
    end = max(r["end_lsn"] for r in json.loads(p.stdout)["records"])
    p = cli("dump", small_store, "--from", end)  # (a poller at the end: nothing new)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    p = cli("dump", small_store, "--from", f"lsn:{end + 1}")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"past the end of the log (it ends at LSN {end})" in p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    p = cli("dump", small_store, "--from", end + 1000, "--json")
    assert p.returncode == 2
    assert json.loads(p.stdout)["error"]["type"] == "UnknownPoint"


def test_history_of_a_key_never_written_exits_1(small_store):
    p = cli("history", small_store, "nokey", "--json")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert json.loads(p.stdout) == {"key": "nokey", "versions": [], "more": False}
    assert "key 'nokey' has no version" in p.stderr and "Traceback" not in p.stderr
    p = cli("history", small_store, "nokey")
    assert p.returncode == 1 and "has no version" in p.stderr
    p = cli("history", small_store, "a")
    assert p.returncode == 0 and p.stderr == "" and len(p.stdout.splitlines()) == 3


def test_restore_to_a_restore_point_named_like_a_date(tmp_path):
    path, replica = str(tmp_path / "s"), tmp_path / "replica"
    url = replica.as_uri()
    with walstore.open(path, replicate_to=url) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.restore_point("2026-release")
        with s.transaction() as tx:
            tx.put("a", 2)
        s.restore_point("2026-05-01")
        with s.transaction() as tx:
            tx.put("a", 3)
        s.sync_replica(timeout=30)
    for name, value in (("2026-release", 1), ("2026-05-01", 2)):
        dest = str(tmp_path / name)
        p = cli("restore", url, dest, "--to", name)
        assert p.returncode == 0, (name, p.stderr)
        with walstore.open(dest, readonly=True) as r:
            assert r.get("a") == value
    p = cli("restore", url, str(tmp_path / "d3"), "--to", "2026-05-02")
    assert p.returncode == 2, p.stderr
    assert "no restore point named '2026-05-02'" in p.stderr
    assert "a time is ISO-8601 with an offset" in p.stderr
    assert not os.path.exists(tmp_path / "d3") or not os.listdir(tmp_path / "d3")


# `walstore bench` cut to its smallest run (put-1t, one round, a tiny scale) with the peer
# named by argv[1] unimportable ("-": none): the runner reports that row "error: ..."
BENCH = """
import dataclasses, sys
import walstore.benchmark as B
from walstore.benchmark.peers import SYSTEMS
real = B.run_benchmarks
broken = sys.argv.pop(1)
if broken != "-":
    SYSTEMS[broken] = dataclasses.replace(SYSTEMS[broken], module="no_such_module_a57")
B.run_benchmarks = lambda quick=False, progress=print, **_kw: real(
    quick=True, workloads=["put-1t"], repeats=1, progress=progress, scale=0.002)
from walstore.cli import main
main(sys.argv[1:])
"""


def test_bench_exits_1_when_a_row_failed(tmp_path):
    env = dict(cli_env(), TMPDIR=str(tmp_path))
    run = (lambda *a: subprocess.run([sys.executable, "-c", BENCH, *a], capture_output=True,
                                     text=True, env=env, timeout=120))
    p = run("sqlite-full", "bench", "--json")
    assert p.returncode == 1, p.stderr[-2000:]
    rows = {r["system"]: r for part in json.loads(p.stdout)["parts"] for r in part["rows"]}
    assert rows["sqlite-full"]["error"].startswith("error: cannot import")
    assert rows["walstore"]["error"] is None
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("walstore: bench: 1 row(s) failed") and "sqlite-full" in last
    p = run("-", "bench")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "failed" not in p.stderr and "walstore" in p.stdout


def test_verify_of_a_garbage_lmdb_file_walks_the_wal_and_shows_no_false_zeros(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
    data = os.path.join(path, "db", "data.mdb")
    size = os.path.getsize(data)
    with open(data, "wb") as f:
        f.write(os.urandom(size))
    p = cli("verify", path, "--json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert "LMDB meta pages are invalid" in " ".join(doc["errors"]), doc["errors"]
    assert doc["segments"] >= 1 and doc["commits"] == 3 and doc["records"] >= 3
    assert doc["wal_end_lsn"] > 0
    for unknown in ("lmdb_keys", "keys_checked", "applied_lsn", "blobs_checked",
                    "blob_bytes_hashed"):
        assert doc[unknown] is None, (unknown, doc)
    assert any("WAL was checked on its own" in w for w in doc["warnings"])
    p = cli("verify", path)
    assert p.returncode == 1
    shown = dict(line.rsplit(None, 1) for line in p.stdout.splitlines()[:9])
    assert shown["commits"] == "3" and shown["LMDB keys"] == "-", shown
    assert shown["applied LSN"] == "-" and shown["WAL end LSN"] != "0", shown


MIB = 1 << 20


def test_a_damaged_replica_wal_object_does_not_fail_every_round(s3_endpoint,  # noqa: F811
                                                                tmp_path):
    import boto3
    rep = make_s3_replica(s3_endpoint)
    path = str(tmp_path / "s")
    opts = rep.opts(interval=3600, lease_ttl=3 * 3600, compact_fanout=1000)
    small = {"segment_size": MIB, "checkpoint_bytes": MIB}
    s = walstore.open(path, replicate_to=rep.url, replicate_options=opts, **small)
    try:
        for i in range(3):  # three small objects of the first segment, then its rest
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
            s._shipper.ship_once()
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"big{i % 50}", os.urandom(4000))
        s._shipper.ship_once()
        s.checkpoint()
        s.checkpoint()
        first = s._shipper.manifest.wal[0]
    finally:
        s.close()
    assert not os.path.exists(os.path.join(path, "wal", "%020d.wal" % first["seg"]))
    bucket, prefix = rep.url[len("s3://"):].split("/", 1)
    c = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = f"{prefix}/{first['k']}"
    body = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) - 20] ^= 0xFF  # (inside its last record)
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    s = walstore.open(path, replicate_to=rep.url, **small,
                      replicate_options=dict(opts, compact_fanout=2))
    try:
        for _ in range(3):
            s._shipper.ship_once()  # (raised ValueError, every round)
        st = s.replication()
        assert st.state == "running" and st.shipped_lsn is not None, st
        assert st.last_error and first["k"] in st.last_error, st
        assert "cannot be read" in st.last_error and "damaged" in st.last_error
        wal = s._shipper.manifest.wal
        assert wal[0]["k"] == first["k"] and any(e["lv"] > 0 for e in wal), wal
    finally:
        s.close()


def test_replication_before_the_replica_was_reached_claims_no_position(s3_endpoint,  # noqa: F811
                                                                      tmp_path):
    import socket
    rep = make_s3_replica(s3_endpoint)
    path = str(tmp_path / "s")
    with walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts()) as s:
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        shipped = s.sync_replica(timeout=30)
        # (the replica's own objects: nothing more ships below; the reopen adds a little)
        s._shipper.stop()
        with s.transaction() as tx:
            tx.put("late", 1)
        end = s.stats()["wal_end_lsn"]
    sock = socket.socket()  # (a port nothing listens on: the server is down)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    down = rep.opts(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=0.5)
    with walstore.open(path, replicate_to=rep.url, replicate_options=down) as s:
        st = s.replication()
        assert st.state == "starting" and st.last_error, st
        # (was 0, and a lag of the whole log): the recorded position, a lower bound
        assert 0 < st.shipped_lsn <= shipped, (st, shipped)
        assert 0 < st.lag_bytes <= st.durable_lsn - shipped, (st, shipped)
        assert st.lag_seconds < 30 and st.durable_lsn >= end, st
    with walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts()) as s:
        s.sync_replica(timeout=30)
        st = s.replication()  # (reached: its position again)
        assert st.shipped_lsn >= shipped and st.lag_bytes == 0, st


class _LogFailsWhileTheUndoPlans(walstore.fileio.OSBackend):
    """Once armed: at the undo's "undo.resolved" point, every fsync fails from then on
    and another thread commits (durability "normal": its record is synced by the
    flusher or the applier, whose fsync fails and stops the log)."""

    def __init__(self) -> None:
        self.armed = self.failing = False
        self.store = None
        self.ran: list = []

    def fault_point(self, name: str) -> None:
        if name == "undo.resolved" and self.armed:
            self.armed, self.failing = False, True

            def other() -> None:
                with self.store.transaction() as tx:
                    tx.put("other", 1)
            t = threading.Thread(target=other)
            t.start()
            t.join(20)
            deadline = time.monotonic() + 10
            while self.store._engine.wal.failed is None and time.monotonic() < deadline:
                time.sleep(0.01)

    def fsync(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)


def test_a_revert_refused_by_a_failed_log_says_it_did_not_happen(tmp_path):
    path = str(tmp_path / "s")
    backend = _LogFailsWhileTheUndoPlans()
    old = walstore.fileio.set_backend(backend)
    try:
        s = walstore.open(path, durability="normal")
        backend.store = s
        s.compensator("refund")(lambda action: backend.ran.append(action.id))
        with s.transaction() as tx:
            tx.put("a", 1)
        with s.transaction() as tx:
            tx.put("a", 2)
            with tx.action("charge", compensate="refund") as act:
                act.result = {"id": "c1"}
        target = tx.id
        backend.armed = True
        with pytest.raises(walstore.ReadOnlyError) as info:
            s.revert(target)
        assert not isinstance(info.value, walstore.CommitOutcomeUnknown)
        assert type(info.value) is walstore.ReadOnlyError  # (never the log's LogFailed)
        msg = str(info.value)
        assert "did not happen: nothing was changed and no compensation ran" in msg, msg
        assert "Input/output error" in msg and backend.ran == []
        backend.failing = False
        try:
            s.close()
        except walstore.WalstoreError:
            pass
    finally:
        walstore.fileio.set_backend(old)
    with walstore.open(path) as s:  # (the revert is nowhere: not in the log, not undone)
        assert s.get("a") == 2
        assert all((i.meta or {}).get("revert") is None for i in s.log())
        (act,) = [a for a in s.actions() if a.name == "charge"]
        assert act.state == "committed"


def test_replicate_once_exits_1_when_its_round_left_a_problem(tmp_path):
    path, rep = str(tmp_path / "s"), tmp_path / "replica"
    url = rep.as_uri()
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    p = cli("replicate", path, url, "--once", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["problem"] is None
    snaps = rep / "snapshots"  # (from now on no snapshot can be written: a file there)
    for name in os.listdir(snaps):
        os.remove(snaps / name)
    os.rmdir(snaps)
    snaps.write_bytes(b"x")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("b", 2)
    p = cli("replicate", path, url, "--once", "--snapshot-interval", "0")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout.startswith("shipped 1 WAL object(s)")  # (the WAL shipped all the same)
    assert "a snapshot failed" in p.stderr and "Traceback" not in p.stderr
    p = cli("replicate", path, url, "--once", "--snapshot-interval", "0", "--json")
    assert p.returncode == 1
    assert "a snapshot failed" in json.loads(p.stdout)["problem"]
    snaps.unlink()  # (the cause gone: a snapshot is written, exit 0)
    p = cli("replicate", path, url, "--once", "--snapshot-interval", "0")
    assert p.returncode == 0 and "snapshot at LSN" in p.stdout, (p.stdout, p.stderr)


def test_dump_of_a_trimmed_log_beside_an_unreadable_lmdb_claims_no_gap(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="normal", segment_size=MIB,
                       checkpoint_bytes=MIB) as s:
        for i in range(300):  # (past one segment: the checkpoints trim the first)
            with s.transaction() as tx:
                tx.put(f"k{i % 20}", os.urandom(4000))
        s.checkpoint()
        s.checkpoint()
    first = min(int(n[:-4]) for n in os.listdir(os.path.join(path, "wal"))
                if n.endswith(".wal"))
    assert first > 0
    data = os.path.join(path, "db", "data.mdb")
    with open(data, "wb") as f:
        f.write(os.urandom(os.path.getsize(data)))
    p = cli("dump", path, "--json")
    assert p.returncode == 0, p.stderr
    records = json.loads(p.stdout)["records"]
    assert records and records[0]["lsn"] == first, records[:1]
    assert not [r for r in records if r["type"] == "GAP"]
    doc = json.loads(cli("verify", path, "--json").stdout)  # (the same walk: no gap)
    assert not [e for e in doc["errors"] if "log records are missing" in e], doc["errors"]
