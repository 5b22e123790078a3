"""Audit 55, durability modes and power loss (durability "full" / "normal" / "none").

Real files and real processes: power-loss images built by tools/powerloss.py from a
recorded workload (every write, fsync, rename and directory fsync), and writers killed
with SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.powerloss import VARIANTS, run  # noqa: E402


@pytest.mark.parametrize("durability", ["normal", "none"])
def test_power_loss_never_tears_a_transaction_under_normal_or_none(tmp_path, durability):
    """CONTRACT: "normal" may lose at most the sync interval, never tear a transaction;
    "none" has no fsync, yet a recovered store shows no partial transaction.  Every
    commit an fsync of its segment covered before the crash (the flusher's, a
    rotation's) survives; the transfers' invariant holds in every image."""
    summary = run(40, seed=13, commits=80, workdir=str(tmp_path), durability=durability)
    assert summary["images"] == 40
    assert all(summary["by_variant"][v] > 0 for v in VARIANTS)
    if durability == "normal":
        assert summary["acks_checked"] > 0  # the flusher's syncs covered commits
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]


CHILD = textwrap.dedent("""
    import sys, walstore
    path, durability = sys.argv[1], sys.argv[2]
    s = walstore.open(path, durability=durability, segment_size=64 * 1024,
                      checkpoint_bytes=256 * 1024, sync_interval=0.01)
    i = 0
    while True:
        i += 1
        with s.transaction() as tx:
            a, b = tx.get("a"), tx.get("b")
            tx.put("a", a - 1)
            tx.put("b", b + 1)
            tx.put(f"t/{durability}/{i}", "x" * (i % 7 * 300))
        print(i, flush=True)
""")


def _kill_writer_after(path: str, durability: str, acks: int) -> int:
    """Run a real writer until it acknowledged ``acks`` commits, then SIGKILL it;
    returns the last acknowledged commit's number."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, path, durability],
                         stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    last = 0
    try:
        for line in p.stdout:
            last = int(line)
            if last >= acks:
                break
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    assert last >= acks, "the writer died before committing"
    return last


def test_kill9_under_each_durability_in_turn_keeps_every_promise(tmp_path):
    """Section 4 across durability switches of one store (full -> normal -> none ->
    full): after each kill -9 every acknowledged commit (written to the OS before
    commit() returned, in every mode) is there, no transaction is torn (a + b == 0), and
    the store verifies."""
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 0)
            tx.put("b", 0)
    acked = {}
    for durability in ("full", "normal", "none", "full"):
        acked.setdefault(durability, []).append(_kill_writer_after(path, durability, 300))
        with walstore.open(path, durability=durability) as s:
            state = dict(s.scan())
            assert state["a"] + state["b"] == 0
            for mode, lasts in acked.items():
                for n in lasts:
                    assert f"t/{mode}/{n}" in state, (mode, n)
    from walstore.ops.verify import verify_store
    report = verify_store(path)
    assert not report.errors, report.errors


def _dir_synced_before(fb, directory: str, seq: int) -> bool:
    directory = os.path.realpath(directory)
    return any(e.op == "fsync_dir" and e.done_seq is not None and e.done_seq < seq
               and os.path.realpath(e.path) == directory for e in fb.events)


def test_the_new_lmdb_data_file_is_durably_named_before_the_first_acknowledged_commit(
        tmp_path):
    """A new store's LMDB files are created by LMDB itself (open(O_CREAT) in db/), never
    followed by an fsync of db/: a power loss after the first acknowledged full commits
    could leave db/ without data.mdb beside a durable WAL segment, a store open refuses
    ("log but no LMDB data file") — and after a checkpoint trimmed the WAL, the commits
    in LMDB gone with the name.  The crash model of tools/powerloss.py: a create is
    durable once an fsync of its directory returned after it."""
    from tools.faults import FaultBackend, installed
    path = str(tmp_path / "store")
    fb = FaultBackend(record=True)
    with installed(fb):
        s = walstore.open(path, durability="full")
        try:
            with s.transaction() as tx:
                tx.put("k", 1)
            ack = fb.mark("ack")
        finally:
            s.close()
    assert os.path.exists(os.path.join(path, "db", "data.mdb"))
    assert _dir_synced_before(fb, os.path.join(path, "db"), ack.seq)


def test_a_failed_fsync_of_the_new_lmdb_directory_fails_the_open_and_a_retry_works(tmp_path):
    """The new fsync of db/ (above): its failure is a StoreIOError naming db/ (never a raw
    OSError), nothing acknowledged; a later open completes the creation, and makes the
    name durable although the file exists by then."""
    from tools.faults import FaultBackend, installed
    path = tmp_path / "store"
    fb = FaultBackend()
    with installed(fb):
        fb.fail("fsync_dir", 5, path=str(path / "db"))
        with pytest.raises(walstore.StoreIOError) as info:
            walstore.open(str(path))
        assert info.value.errno == 5 and "db" in str(info.value)
        fb.clear()
    fb = FaultBackend(record=True)
    with installed(fb):
        with walstore.open(str(path)) as s:
            with s.transaction() as tx:
                tx.put("a", 1)
            ack = fb.mark("ack")
    # the retry found data.mdb made by the failed open: its name is made durable too
    assert _dir_synced_before(fb, str(path / "db"), ack.seq)
    with walstore.open(str(path)) as s:
        assert s.get("a") == 1


def test_power_loss_under_normal_leaves_the_workspace_a_committed_tree(tmp_path):
    """Reversible files under "normal": the files are fsynced before the commit record,
    whose fsync comes later (the flusher's); whatever a power loss keeps of the log, the
    recovered workspace is exactly the tree of the transaction the store names."""
    from tools.powerloss import run_files
    summary = run_files(24, seed=17, txns=25, workdir=str(tmp_path), durability="normal")
    assert summary["images"] == 24
    assert summary["acks_checked"] > 0  # the flusher's syncs covered commits
    assert summary["lost_commits"] == 0, summary["examples"]
    assert summary["broken_images"] == 0, summary["examples"]


def _wal_synced_after(fb, seq: int) -> bool:
    return any(e.op in ("fsync", "fdatasync") and e.seq > seq and e.done_seq is not None
               and e.path.endswith(".wal") for e in fb.events)


def test_close_of_a_stopped_normal_store_fsyncs_the_healthy_log(tmp_path):
    """durability="normal": an acknowledged commit is fsynced within sync_interval.  A
    store stopped by an error that is not the log's (here an OSError after a commit's
    point of no return: a background error, the store read-only) was closed without any
    fsync of its log — close() checkpoints only a healthy store, and the flusher is
    stopped first — so the commits of the last interval stayed in the page cache for as
    long as the process went on (a power loss then lost them, past the bound).  Now
    close() fsyncs a log that has not failed."""
    from tools.faults import FaultBackend, installed
    path = str(tmp_path / "store")
    fb = FaultBackend(record=True)
    with installed(fb):
        s = walstore.open(path, durability="normal", sync_interval=60,
                          apply_interval=86400, apply_batch=10**9)
        with s.transaction() as tx:
            tx.put("a", 1)
        fb.fail_point("commit.after_durable", raises=OSError(5, "injected EIO"))
        with s.transaction() as tx:
            tx.put("b", 2)  # acknowledged: the error is past its point of no return
        ack = fb.mark("ack")
        assert s.stats()["background_errors"]
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.put("c", 3)
        s.close()
    assert _wal_synced_after(fb, ack.seq)
    with walstore.open(path) as s:
        assert s.get("a") == 1 and s.get("b") == 2


BIG_CHILD = textwrap.dedent("""
    import sys, walstore
    path = sys.argv[1]
    s = walstore.open(path, durability="none", segment_size=8 * 1024 * 1024)
    i = 0
    while True:
        i += 1
        with s.transaction() as tx:  # ~4.5 MiB: WRITES records before its COMMIT
            for k in range(3):
                tx.put(f"big/{k}", bytes([i % 256]) * (1536 * 1024) + str(i).encode())
            tx.put("n", i)
        print(i, flush=True)
""")


def test_kill9_under_none_never_shows_part_of_a_multi_record_transaction(tmp_path):
    """durability="none" and a kill -9 while a transaction spanning several WAL records
    (and segments) is being written: after reopen, every big/* value and "n" come from
    one and the same transaction, the last acknowledged one or the one after it."""
    path = str(tmp_path / "store")
    p = subprocess.Popen([sys.executable, "-c", BIG_CHILD, path], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    last = 0
    try:
        for line in p.stdout:
            last = int(line)
            if last >= 6:
                break
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    assert last >= 6
    with walstore.open(path) as s:
        n = s.get("n")
        assert n in (last, last + 1)
        for k in range(3):
            v = s.get(f"big/{k}")
            assert v.endswith(str(n).encode()) and v[0] == n % 256, (k, n)
