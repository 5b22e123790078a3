"""Audit 52 (probe4): two-phase commit, the ``transaction`` data manager and the 2PC verbs.

Each test is named after the promise it checks; its comment says what went wrong before.
Real stores, a real second resource (stdlib sqlite3), real processes where a crash is
involved; nothing of walstore is mocked.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

transaction = pytest.importorskip("transaction")

import walstore  # noqa: E402
from walstore.integrations.transaction import join  # noqa: E402
from zope_support import Sqlite, child_env as _env  # noqa: E402

WALSTORE = [sys.executable, "-m", "walstore"]


@pytest.fixture(autouse=True)
def clean_manager():
    transaction.manager.abort()
    yield
    transaction.manager.abort()


class SyncCounter:
    """Counts the fdatasync/fsync calls the calling thread makes while it is entered
    (os-level: walstore's WAL syncs of a commit go through them in the committing
    thread; a background thread's own work, the applier's, is not the commit's cost)."""

    def __init__(self) -> None:
        self.calls = 0      # (by the calling thread)
        self.all_calls = 0  # (by any thread)
        self.thread = threading.get_ident()

    def __enter__(self) -> "SyncCounter":
        self._fd, self._fs = os.fdatasync, os.fsync

        def fd(f):
            self.calls += threading.get_ident() == self.thread
            self.all_calls += 1
            return self._fd(f)

        def fs(f):
            self.calls += threading.get_ident() == self.thread
            self.all_calls += 1
            return self._fs(f)

        os.fdatasync, os.fsync = fd, fs
        return self

    def __exit__(self, *exc) -> None:
        os.fdatasync, os.fsync = self._fd, self._fs


@pytest.mark.parametrize("body", ["nothing", "reads"])
def test_zope_an_empty_walstore_participant_costs_no_fsync(tmp_path, body):
    # Before: a store joined to a ``transaction`` transaction with nothing written (an
    # agent step that only read its state, or wrote nothing this time) prepared at the
    # vote (a PREPARE, fsynced) and committed at the finish (a COMMIT, fsynced): two
    # fsyncs, two WAL records and a decision row kept for good, for nothing.  Now its
    # reads are validated at the vote and nothing is logged.
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    other = Sqlite(tmp_path / "other.sqlite")
    try:
        with s.transaction() as t:
            t.put("config/limit", 40)
        transaction.begin()
        tx = join(s)
        if body == "reads":
            assert tx.get("config/limit") == 40
        other.put("k", "v")
        with SyncCounter() as syncs:
            transaction.commit()
        assert syncs.calls == 0
        assert tx.state == "committed" and tx.gid is None
        assert s.prepared() == []
        assert other.rows() == {"k": "v"}
    finally:
        other.conn.close()
        s.close()


def test_zope_a_writing_walstore_participant_still_prepares_durably(tmp_path):
    # (the companion: a participant that wrote prepares (fsync) and commits (fsync) as
    # before — the empty case's shortcut weakens nothing)
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("agent/step", 8)
        with SyncCounter() as syncs:
            transaction.commit()
        assert syncs.all_calls >= 2  # (the PREPARE's and the COMMIT's)
        assert tx.gid is not None and s.decision(tx.gid) == "commit"
        assert s.get("agent/step") == 8
    finally:
        s.close()


def test_zope_an_empty_participant_whose_reads_were_overwritten_votes_no(tmp_path):
    # (the empty case's vote still validates what it read: a read overwritten by a
    # commit since is a conflict, and the other resource commits nothing)
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    other = Sqlite(tmp_path / "other.sqlite")
    try:
        with s.transaction() as t:
            t.put("config/limit", 40)
        transaction.begin()
        tx = join(s)
        assert tx.get("config/limit") == 40
        other.put("limit-seen", "40")
        with s.transaction() as t:
            t.put("config/limit", 10)
        with pytest.raises(walstore.ConflictError):
            transaction.commit()
        assert other.rows() == {}
    finally:
        transaction.abort()
        other.conn.close()
        s.close()


@pytest.mark.parametrize("decide", ["commit", "rollback"])
def test_zope_abort_after_an_outside_decision_ends_quietly(tmp_path, decide):
    # Before: a joined walstore transaction the caller prepared and then decided through
    # the store (store.commit_prepared / rollback_prepared) still read "active"; the
    # package's transaction.abort() rolled it back once more: rollback_prepared raised
    # UnknownGid ("no prepared transaction") out of transaction.abort(), the data
    # manager stayed registered, and join() handed the stale decided transaction out
    # again (its writes refused: "prepared, takes no more writes").
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("a", 1)
        tx.prepare("g-outside")
        if decide == "commit":
            s.commit_prepared("g-outside")
        else:
            s.rollback_prepared("g-outside")
        transaction.abort()  # (raised UnknownGid)
        want = "committed" if decide == "commit" else "rolled back"
        assert tx.state == want
        assert s.get("a") == (1 if decide == "commit" else None)
        assert s.decision("g-outside") == ("commit" if decide == "commit" else "abort")
        # the next transaction gets a fresh walstore transaction that commits
        transaction.begin()
        tx2 = join(s)
        assert tx2 is not tx and tx2.state == "active"
        tx2.put("b", 2)
        transaction.commit()
        assert s.get("b") == 2
    finally:
        s.close()


def test_zope_join_after_an_outside_commit_prepared_gives_a_fresh_transaction(tmp_path):
    # Before: after store.commit_prepared(gid) of the joined transaction, join() in the
    # same ``transaction`` transaction returned that (committed) transaction, still
    # "active", and every write through it raised TransactionClosed.
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("a", 1)
        tx.prepare("g-c")
        s.commit_prepared("g-c")
        tx2 = join(s)
        assert tx2 is not tx and tx.state == "committed"
        tx2.put("a2", 2)
        transaction.commit()
        assert (s.get("a"), s.get("a2")) == (1, 2)
    finally:
        s.close()


def test_zope_a_decision_made_between_vote_and_finish_is_a_finish_not_a_failure(tmp_path):
    # Before: the joined transaction's gid committed by another caller after the votes
    # (another thread's store.commit_prepared(gid), an operator's resolve loop) made
    # walstore's tpc_finish raise UnknownGid ("already decided by another caller: it is
    # committed"); the package then aborted the resources finishing after it: walstore
    # committed, sqlite rolled back — the mixed outcome 2PC exists to prevent.
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    other = Sqlite(tmp_path / "other.sqlite", sort_key="z-after-walstore")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("order/1", "paid")
        other.put("order/1", "paid")

        def decide_meanwhile():
            [gid] = s.prepared()
            s.commit_prepared(gid)

        other.on_vote = decide_meanwhile  # (the votes are over for walstore: it sorts first)
        transaction.commit()
        assert tx.state == "committed"
        assert s.get("order/1") == "paid"
        assert other.rows() == {"order/1": "paid"}
    finally:
        transaction.abort()
        other.conn.close()
        s.close()


def test_zope_join_after_the_walstore_transaction_was_rolled_back_refuses(tmp_path):
    # Before: tx = join(store); tx.put(...); tx.rollback() (the walstore transaction's own
    # rollback, e.g. by a helper that hit an error), then join(store) again in the same
    # ``transaction`` transaction handed out a fresh walstore transaction, silently: the
    # rolled-back one stayed joined and voted no, so the fresh one's writes (and every
    # other resource's) could never commit, and the failure came only at commit, as
    # "ended outside the transaction manager".  Now join says so at once, and nothing
    # of either commits.
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    other = Sqlite(tmp_path / "other.sqlite")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("c", 1)
        other.put("c", "1")
        tx.rollback()
        with pytest.raises(walstore.TransactionClosed, match="abort it"):
            join(s)
        with pytest.raises(walstore.WalstoreError):
            transaction.commit()
        transaction.abort()
        assert s.get("c") is None and other.rows() == {}
        # a new transaction joins afresh and commits
        transaction.begin()
        join(s).put("d", 1)
        transaction.commit()
        assert s.get("d") == 1
    finally:
        other.conn.close()
        s.close()


def test_zope_join_after_a_savepoint_rollback_unjoined_it_is_fresh(tmp_path):
    # (the companion, fine before and after: a savepoint taken before the join, rolled
    # back, aborts and unjoins the data manager (the package's AbortSavepoint); a join
    # after it is a fresh one that commits, and nothing of the first does)
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    try:
        transaction.begin()
        sp = transaction.savepoint()
        tx = join(s)
        tx.put("a", 1)
        sp.rollback()
        assert tx.state == "rolled back"
        tx2 = join(s)
        assert tx2 is not tx
        tx2.put("b", 2)
        transaction.commit()
        assert (s.get("a"), s.get("b")) == (None, 2)
    finally:
        s.close()


def _leave_in_doubt(path: str, n: int) -> None:
    """A store with ``n`` transactions prepared (gids g00000...), 3 writes each."""
    s = walstore.open(path, durability="none")
    try:
        for i in range(n):
            tx = s.transaction(meta={"i": i})
            for j in range(3):
                tx.put(f"k{i}/{j}", "v" * 100)
            tx.prepare(f"g{i:05d}")
    finally:
        s.close()


def test_prepared_listing_of_thousands_in_doubt_is_one_pass(tmp_path):
    # Before: `walstore prepared` asked store.prepared_details(gid) once per gid, and a
    # read-only store (the verb opens one) rebuilt every prepared row — each with its
    # whole write set — for each call: N in doubt cost N x N (2,000 took 34 s of CPU and
    # held every write set in memory each time).  Now one pass keeps a summary per gid.
    # Measured in the child's CPU seconds (not wall time: the machine may be loaded).
    import json
    import resource

    path = str(tmp_path / "ws")
    n = 1500
    _leave_in_doubt(path, n)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(WALSTORE + ["prepared", path, "--json"], capture_output=True,
                         text=True, timeout=600, env=_env())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert out.returncode == 1, out.stderr  # (in-doubt transactions need a decision)
    rows = json.loads(out.stdout)["prepared"]
    assert [r["gid"] for r in rows] == [f"g{i:05d}" for i in range(n)]
    assert all(r["keys"] == 3 and r["meta"] == {"i": i} for i, r in enumerate(rows))
    assert cpu < 8.0, f"walstore prepared took {cpu:.1f} s of CPU for {n} in doubt"
    # the human table lists them all too
    out = subprocess.run(WALSTORE + ["prepared", path], capture_output=True, text=True,
                         timeout=600, env=_env())
    assert out.returncode == 1 and out.stdout.count("\ng") == n  # (a header first)


def test_rollback_prepared_after_a_crash_does_not_blame_recovery_for_its_own_refund(tmp_path):
    # Before: `walstore rollback-prepared` on a store a kill -9 left with a transaction in
    # doubt (an action with a compensation, none registered on the command line) listed
    # the refund it left owed — and then also warned "... was not shut down cleanly and
    # was recovered as it opened: 1 compensation(s) owed": recovery had left nothing
    # owed (a prepared transaction's actions are not compensated by recovery); the
    # rollback had.  The warning now names only what recovery left owed.
    path = str(tmp_path / "ws")
    child = (
        "import os, signal, sys, walstore\n"
        "s = walstore.open(sys.argv[1], durability='full')\n"
        "tx = s.transaction()\n"
        "tx.put('order/1', 'paid')\n"
        "with tx.action('charge', compensate='refund') as act:\n"
        "    act.result = {'charge': 1}\n"
        "tx.prepare('G1')\n"
        "print(act.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", child, path], capture_output=True,
                          text=True, timeout=60, env=_env())
    assert proc.returncode == -9, proc.stderr
    action_id = proc.stdout.strip()
    out = subprocess.run(WALSTORE + ["rollback-prepared", path, "G1"], capture_output=True,
                         text=True, timeout=60, env=_env())
    assert out.returncode == 1  # (a refund is owed: the rollback says so)
    assert "rolled back" in out.stdout and action_id in out.stdout
    assert "recovered as it opened" not in out.stderr, out.stderr
    with walstore.open(path) as s:
        assert s.decision("G1") == "abort" and s.get("order/1") is None
        assert [a.id for a in s.pending_compensations()] == [action_id]


def test_a_put_after_a_crash_still_says_what_recovery_left_owed(tmp_path):
    # (the companion, as before: a crashed transaction's refund that recovery made owed is
    # said by the next writing verb, which exits 1)
    path = str(tmp_path / "ws")
    child = (
        "import os, signal, sys, walstore\n"
        "s = walstore.open(sys.argv[1], durability='full')\n"
        "tx = s.transaction()\n"
        "with tx.action('charge', compensate='refund') as act:\n"
        "    act.result = {'charge': 1}\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", child, path], capture_output=True,
                          text=True, timeout=60, env=_env())
    assert proc.returncode == -9, proc.stderr
    out = subprocess.run(WALSTORE + ["put", path, "k", "1"], capture_output=True,
                         text=True, timeout=60, env=_env())
    assert out.returncode == 1
    assert "recovered as it opened" in out.stderr and "1 compensation(s) owed" in out.stderr


def test_a_read_only_handle_answers_for_one_gid_without_reading_them_all(tmp_path):
    # Before: on a read-only handle (a coordinator or a monitor beside the writer),
    # store.decision(gid) and store.prepared_details(gid) rebuilt every prepared row,
    # write sets and all, to answer for one gid: 27 ms a call with 2,000 in doubt, so a
    # loop deciding or inspecting them was quadratic.  Now one row is read (the log's
    # last word on the gid, else LMDB's).  Measured in this process's CPU seconds.
    import time

    path = str(tmp_path / "ws")
    n = 1500
    _leave_in_doubt(path, n)
    with walstore.open(path, readonly=True) as ro:
        gids = ro.prepared()
        assert len(gids) == n
        t0 = time.process_time()
        for gid in gids[:300]:
            assert ro.decision(gid) == "prepared"
            assert len(ro.prepared_details(gid).writes) == 3
        cpu = time.process_time() - t0
        assert ro.decision("never-prepared") is None
        with pytest.raises(KeyError):
            ro.prepared_details("never-prepared")
    assert cpu < 3.0, f"300 point answers took {cpu:.1f} s of CPU with {n} in doubt"
    # beside a live writer that decides some (its log ahead of LMDB), the answers follow
    w = walstore.open(path)
    try:
        w.commit_prepared("g00000")
        w.rollback_prepared("g00001")
        with walstore.open(path, readonly=True) as ro:
            assert ro.decision("g00000") == "commit"
            assert ro.decision("g00001") == "abort"
            assert ro.decision("g00002") == "prepared"
            assert ro.prepared_details("g00002").txid == w.prepared_details("g00002").txid
            assert len(ro.prepared()) == n - 2
    finally:
        w.close()
