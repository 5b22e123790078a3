"""Audit stop 54, durability promises 6-9 of CONTRACT section 4 under injected faults.

Faults come from ``tools.faults.FaultBackend`` (the I/O seam every fault test uses): an
fsync of the WAL that fails with EIO outside a commit record (an action's intent, a
compensation's record), a commit record whose fsync fails (CommitOutcomeUnknown), and what
the store says and does after them: that it is read-only, and that reads go on.
"""
from __future__ import annotations

import errno
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402

SYNCS = ("fsync", "fdatasync")

from test_faults import faults  # noqa: E402,F401 (the fault backend, installed per test)


# ---- a failed fsync outside a commit record: the store says it is read-only -------------
def test_a_failed_intent_fsync_shows_the_store_read_only_at_once(tmp_path, faults):
    """An action's intent whose fsync fails stops the log (never retry fsync): the error
    says "the store is now read-only", every write is refused from then on — yet
    ``store.readonly`` said False and ``stats()["failure"]`` None until some later write
    happened to adopt the log's failure (only the engine's own failure was looked at)."""
    with walstore.open(str(tmp_path / "s"), compensators={"refund": lambda a: None}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        rule = faults.fail(SYNCS, errno.EIO, path="*.wal")
        tx = s.transaction()
        ran = []
        with pytest.raises(walstore.ReadOnlyError, match="read-only"):
            with tx.action("charge", args={}, compensate="refund"):
                ran.append(True)
        assert rule.fired == 1 and not ran  # (write-ahead: the body never ran)
        assert s.readonly, "the log stopped on a failed fsync, yet store.readonly is False"
        assert s.stats()["failure"] and "fsync" in s.stats()["failure"]
        with pytest.raises(walstore.ReadOnlyError):
            tx.rollback()
        assert s.get("a") == 1


def test_a_failed_compensation_record_fsync_shows_the_store_read_only(tmp_path, faults):
    """The same after a revert whose compensation record's fsync fails: CompensationFailed
    says the outcome could not be recorded and the store is read-only; store.readonly
    agrees."""
    path = str(tmp_path / "s")
    with walstore.open(path, compensators={"refund": lambda a: None}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
            with tx.action("charge", args={}, compensate="refund") as act:
                act.result = 1
        faults.fail(SYNCS, errno.EIO, path="*.wal", nth=2)  # (1: the revert's COMMIT)
        with pytest.raises(walstore.CompensationFailed):
            s.revert(tx.id)
        assert s.readonly
        with pytest.raises(walstore.ReadOnlyError):
            s.restore_point("later")


# ---- reads go on after CommitOutcomeUnknown ---------------------------------------------
def test_a_transaction_that_only_reads_commits_after_commit_outcome_unknown(tmp_path,
                                                                            faults):
    """After a commit whose fsync failed (CommitOutcomeUnknown: the store is read-only, the
    next open decides), a transaction begun afterwards that only reads a key the undecided
    commit wrote raised ConflictError "read ['a'] which another transaction wrote after it
    started" at its end, on every retry (store.run gave up after its retries): it was
    validated against the undecided record, which was appended before it began and which
    this process will never acknowledge.  It reads the acknowledged state and ends cleanly;
    a write is still refused as read-only."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        faults.fail(SYNCS, errno.EIO, path="*.wal")
        with pytest.raises(walstore.CommitOutcomeUnknown):
            with s.transaction() as tx:
                tx.put("a", 2)
                tx.put("b", 2)
        assert s.readonly and s.get("a") == 1 and s.get("b") is None
        with s.transaction() as tx:
            assert tx.get("a") == 1 and tx.get("b") is None
            assert list(tx.scan()) == [("a", 1)]
        assert s.run(lambda tx: (tx.get("a"), tx.get("b"))) == (1, None)
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.get("a")
                tx.put("c", 3)
    faults.clear()
    with walstore.open(path) as s:  # (the page cache kept the record: it committed)
        assert (s.get("a"), s.get("b")) in ((1, None), (2, 2))


# ---- an LMDB write that fails while opening or checkpointing: StoreIOError --------------
def test_an_lmdb_write_error_while_checkpointing_is_a_store_io_error(tmp_path, faults):
    """README, "Errors": a full disk or EIO while opening, checkpointing or closing is a
    StoreIOError (an OSError with errno and filename).  Closing said so; checkpoint()
    let the engine's internal StateWriteError out: no errno, no file, only
    "writing LMDB failed: mdb_txn_commit: Input/output error".  The store stops writing
    (an LMDB write in doubt) and the reopen recovers every commit."""
    path = str(tmp_path / "s")
    s = walstore.open(path, apply_interval=3600)
    try:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        faults.fail_lmdb("commit")
        with pytest.raises(walstore.StoreIOError) as info:
            s.checkpoint()
        e = info.value
        assert isinstance(e, OSError) and e.errno is not None
        assert e.filename == os.path.join(path, "db", "data.mdb")
        assert "checkpoint" in str(e) and "Input/output error" in str(e)
        assert s.readonly
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.put("later", 1)
    finally:
        s.close()
    faults.clear()
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") for i in range(20)] == list(range(20))


def test_an_lmdb_write_error_while_opening_is_a_store_io_error(tmp_path, faults):
    """The same for the open after a crash whose REDO cannot write LMDB: StateWriteError
    (no errno, no file) left walstore.open; now StoreIOError naming data.mdb, and once
    the fault is gone the open recovers every commit."""
    path = str(tmp_path / "s")
    s = walstore.open(path, apply_interval=3600)
    for i in range(20):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
    s._drop_like_a_crash()  # (LMDB holds none of them: REDO must write them all)
    faults.fail_lmdb("commit", times=None)
    with pytest.raises(walstore.StoreIOError) as info:
        walstore.open(path)
    e = info.value
    assert e.errno is not None and e.filename == os.path.join(path, "db", "data.mdb")
    assert "opening" in str(e)
    faults.clear()
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") for i in range(20)] == list(range(20))


# ---- LMDB map full when the map cannot grow as asked ------------------------------------
_NO_ROOM_TO_MAP = r'''
import json, os, resource, sys, walstore
path, head = sys.argv[1], int(sys.argv[2]) << 20
V = 256 << 10
s = walstore.open(path, map_size=4 << 20, apply_interval=0.001)
with s.transaction() as tx:
    tx.put("first", 1)
s.checkpoint()
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) << 10
resource.setrlimit(resource.RLIMIT_AS, (vm + head, vm + head))  # (an address-space limit)
acked, ended, short = [], "", 0
for i in range(400):
    try:
        with s.transaction() as tx:
            tx.put(f"k{i}", bytes([i % 256]) * V)
        acked.append(i)
    except MemoryError:  # (the limit met a Python allocation: not a commit; go on)
        short += 1
        if short > 50:
            break
    except walstore.WalstoreError as e:
        ended = f"{type(e).__name__}: {e}"
        break
bad = []
for i in acked:
    try:
        if s.get(f"k{i}") != bytes([i % 256]) * V:
            bad.append(f"k{i}: wrong value")
    except Exception as e:
        bad.append(f"k{i}: {type(e).__name__}: {e}")
        break
try:
    failure = s.stats()["failure"] or ""
except Exception as e:
    failure = ""
    bad.append(f"stats(): {type(e).__name__}: {e}")
try:
    s.close()
except walstore.WalstoreError:
    pass
print(json.dumps({"acked": acked, "ended": ended, "failure": failure, "bad": bad}))
'''


def test_a_map_that_cannot_grow_stops_writes_but_never_reads(tmp_path):
    """LMDB map full where the process may not map twice as much (an address-space limit,
    ``ulimit -v``): set_mapsize failed with ENOMEM after LMDB had unmapped the old map,
    py-lmdb's environment was dead, and every read of the store — get, stats, log — said
    CorruptionError "Attempt to operate on closed/deleted/dropped object" of a store that
    was not damaged.  Now the growth tries smaller steps (the commits go on while one
    fits), and when none fits the write fails (the store stops writing) with the old map
    still in place: reads go on, and the reopen recovers every acknowledged commit."""
    import json
    import subprocess
    for head in range(4, 24):  # (MiB beyond the process's size when the limit is set)
        path = str(tmp_path / f"s{head}")
        r = subprocess.run([sys.executable, "-c", _NO_ROOM_TO_MAP, path, str(head)],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        grew_not = "set_mapsize" in out["ended"] or "could not grow" in out["ended"]
        if grew_not:
            break  # (else the limit met a Python allocation first: another headroom)
    else:
        pytest.skip("no headroom made the map's growth the first thing to fail here")
    assert out["bad"] == [], out
    assert "could not grow" in out["failure"], out
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") == bytes([i % 256]) * (256 << 10) for i in out["acked"]] \
            == [True] * len(out["acked"])


# ---- a salvage recovery killed half-way, then run again ---------------------------------
_CHARGES = r'''
import json, os, sys, walstore
path, ledger = sys.argv[1], sys.argv[2]
def log(op, key):
    with open(ledger, "a") as f:
        f.write(json.dumps({"op": op, "key": key}) + "\n")
s = walstore.open(path, compensators={"refund": lambda a: log("refund", a.key)},
                  segment_size=16 * 1024, checkpoint_bytes=1 << 40, apply_interval=3600)
for i in range(90):
    with s.transaction() as tx:
        tx.put(f"k{i:03d}", "x" * 300)
        with tx.action("charge", args={"i": i}, compensate="refund") as act:
            log("charge", act.key)
            act.result = {"i": i}
    if i == 20:
        s.checkpoint()
os._exit(0)  # (a crash: LMDB holds the first 21, the log all of them)
'''

_RECOVER = r'''
import json, os, signal, sys, walstore
sys.path.insert(0, os.environ["WALSTORE_ROOT"])
from tools.faults import FaultBackend, installed
path, ledger, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
def log(op, key):
    with open(ledger, "a") as f:
        f.write(json.dumps({"op": op, "key": key}) + "\n")
fb = FaultBackend()
if kill:  # SIGKILL as the first dropped segment is moved to quarantine
    fb.fail("rename", path="*.wal", raises=lambda: os.kill(os.getpid(), signal.SIGKILL))
with installed(fb):
    s = walstore.open(path, compensators={"refund": lambda a: log("refund", a.key)},
                      recovery_mode="point-in-time")
    shown = {a.key or a.id: a.state for a in s.actions()}
    keys = sorted(k for k, _v in s.scan())
    s.close()
print(json.dumps({"actions": shown, "keys": keys}))
'''


def _charged_store(tmp: str, name: str) -> tuple[str, str]:
    path, ledger = os.path.join(tmp, name), os.path.join(tmp, name + ".ledger")
    import subprocess
    subprocess.run([sys.executable, "-c", _CHARGES, path, ledger], check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    segs = sorted(n for n in os.listdir(os.path.join(path, "wal")) if n.endswith(".wal"))
    assert len(segs) >= 4, segs
    with open(os.path.join(path, "wal", segs[1]), "r+b") as f:  # a bit rot in a middle
        f.seek(2000)                                            # segment, past the
        f.write(bytes(b ^ 0xFF for b in f.read(200)))           # checkpoint
    return path, ledger


def test_a_point_in_time_recovery_killed_at_its_cut_forgets_no_charge(tmp_path):
    """Point-in-time recovery gives up the log past a corrupt record; the actions whose
    intents lie there may have run, so it owes them (compensated now, or listed).  It
    zeroed the cut bytes and moved the later segments to quarantine while walking, and
    only then wrote those owed intents into LMDB: killed (SIGKILL) at the first segment's
    move, the recovery run again found a log that no longer showed them, and their
    charges stood with nothing owed — neither refunded nor listed (here ~20 of ~70).
    "Running it twice is harmless": now the log is cut only once REDO holds them."""
    import json
    import subprocess
    env = dict(os.environ, PYTHONPATH=ROOT, WALSTORE_ROOT=ROOT)

    def recover(path: str, ledger: str, kill: bool) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _RECOVER, path, ledger,
                               "kill" if kill else "run"], capture_output=True, text=True,
                              timeout=120, env=env)

    ref_path, ref_ledger = _charged_store(str(tmp_path), "ref")
    r = recover(ref_path, ref_ledger, False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])

    path, ledger = _charged_store(str(tmp_path), "s")
    killed = recover(path, ledger, True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    r = recover(path, ledger, False)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])

    with open(ledger) as f:
        recs = [json.loads(line) for line in f]
    charged = {x["key"] for x in recs if x["op"] == "charge"}
    refunded = {x["key"] for x in recs if x["op"] == "refund"}
    committed = {k for k, st in got["actions"].items() if st == "committed"}
    pending = {k for k, st in got["actions"].items() if st in ("pending", "failed")}
    forgotten = sorted(charged - committed - refunded - pending)
    assert forgotten == [], f"{len(forgotten)} charges neither refunded nor owed: {forgotten[:5]}"
    assert got["keys"] == ref["keys"]
    assert sorted(got["actions"].values()) == sorted(ref["actions"].values())


def test_an_lmdb_write_error_after_the_open_recovered_is_a_store_io_error(tmp_path, faults):
    """The open's own steps after the engine's recovery (settling what recovery owes — a
    refund and its record —, applying it) failing to write LMDB let StateWriteError out
    of walstore.open as well: seen at the last LMDB commit of an open after a
    point-in-time recovery (an EIO sweep over every I/O call of a recovery); it is a
    StoreIOError naming data.mdb, and the next open finishes the job."""
    import shutil
    path, twin = str(tmp_path / "s"), str(tmp_path / "twin")
    refunds: list[str] = []
    s = walstore.open(path, apply_interval=3600,
                      compensators={"refund": lambda a: refunds.append(a.id)})
    for i in range(20):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
    tx = s.transaction()  # in flight at the crash: the open refunds it
    tx.put("owed", 1)
    with tx.action("charge", args={}, compensate="refund") as act:
        act.result = 1
    s._drop_like_a_crash()
    shutil.copytree(path, twin)
    counter = FaultBackend()  # (the twin's open: how many LMDB commits an open makes)
    with installed(counter):
        walstore.open(twin, compensators={"refund": lambda a: None}).close()
    n = sum(1 for c in counter.calls if c.op == "lmdb_commit" and "twin" in (c.path or ""))
    faults.fail_lmdb("commit", nth=n - 1)  # (the open's last, before close's own)
    with pytest.raises(walstore.StoreIOError) as info:
        walstore.open(path, compensators={"refund": lambda a: refunds.append(a.id)})
    assert info.value.filename == os.path.join(path, "db", "data.mdb")
    faults.clear()
    with walstore.open(path, compensators={"refund": lambda a: refunds.append(a.id)}) as s:
        assert s.get("owed") is None and s.get("k19") == 19
        assert s.get_action(act.id).state == "compensated" and refunds


# ---- a full disk under a file change names the file it could not write -------------------
@pytest.fixture
def small_tmpfs(mount_tmpfs):
    """An 8 MiB tmpfs (a real full disk; skipped where mounting is not permitted)."""
    return mount_tmpfs("8m")


def _fill(mnt, leave: int) -> None:
    """Fill the file system at ``mnt`` but ``leave`` bytes (test_faults' filler, which
    its child programs run, run here in the test's own process)."""
    from test_faults import FILL_DISK
    helpers: dict = {}
    exec(FILL_DISK, helpers)  # (defines ``fill``; our own source, nothing from outside)
    helpers["fill"](str(mnt), leave)


def test_a_full_disk_storing_new_file_content_names_the_file(small_tmpfs):
    """A file change whose new content cannot be stored (a real full disk: the content
    store's temp file hits ENOSPC; the before-image was stored already) failed the
    transaction with StoreIOError "[Errno 28] No space left on device" and nothing more:
    the kernel's pwrite error names no file, and nothing said what was being written.
    It names the temp file and the content store; the workspace is untouched and the
    transaction's refund ran."""
    root = small_tmpfs / "ws"
    root.mkdir()
    (root / "a.txt").write_text("original")
    refunds: list[str] = []
    with walstore.open(str(small_tmpfs / "s"), segment_size=64 * 1024,
                       compensators={"refund": lambda a: refunds.append(a.id)}) as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:  # ("original" is in the content store: the change
            tx.files(ws).write("b.txt", "original")  # below stores only its new content)
        s.checkpoint()
        _fill(small_tmpfs, 200_000)
        with pytest.raises(walstore.StoreIOError) as info:
            with s.transaction() as tx:
                with tx.action("charge", args={}, compensate="refund") as act:
                    act.result = 1
                tx.files(ws).write("a.txt", os.urandom(600_000))
        e = info.value
        assert e.errno == errno.ENOSPC
        assert e.filename is not None and "blobs" in e.filename, (str(e), e.filename)
        assert "content store" in str(e)
        assert (root / "a.txt").read_text() == "original" and refunds == [act.id]
        os.unlink(small_tmpfs / "filler")
