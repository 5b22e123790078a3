"""Audit 51 (probe2): two-phase commit, the coordinator and the ``transaction`` data manager.

Each test is named after the promise it checks; its comment says what went wrong before.
"""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import warnings

import pytest

transaction = pytest.importorskip("transaction")

import walstore  # noqa: E402
from walstore.integrations.transaction import join  # noqa: E402
from zope_support import REPO, Sqlite, child_env as _env  # noqa: E402

WALSTORE = [sys.executable, "-m", "walstore"]
SCRIPTS = REPO / "tests" / "twophase_scripts"


class FinishFails(Exception):
    pass


class ForeignFailingFinish(Sqlite):
    """A foreign resource (sqlite3) sorting before walstore whose ``tpc_finish`` fails
    before it commits: nobody committed, and the package aborts every participant."""

    def __init__(self, path) -> None:
        super().__init__(path, sort_key="a-foreign")

    def tpc_finish(self, txn) -> None:
        raise FinishFails("the foreign resource lost its disk before committing")


@pytest.fixture(autouse=True)
def clean_manager():
    transaction.manager.abort()
    yield
    transaction.manager.abort()


def test_zope_abort_whose_compensation_fails_is_said_rolled_back_not_in_doubt(tmp_path):
    # Before: every participant voted, the first finish (a foreign one) failed, so walstore
    # rolled back in tpc_abort: its ROLLBACK_PREPARED was logged (decision "abort", the
    # gid no longer prepared) and only the refund failed (CompensationFailed, the action
    # kept 'failed', pending).  The RuntimeWarning said the transaction "is left
    # prepared, in doubt" and told the operator to run `walstore rollback-prepared PATH
    # GID`, which then failed "no prepared transaction" (exit 2); what was really owed,
    # the failed refund, was named nowhere.
    path = str(tmp_path / "ws")

    def refund_down(action):
        raise RuntimeError("refund API down")

    s = walstore.open(path, durability="full", compensators={"refund": refund_down})
    foreign = ForeignFailingFinish(tmp_path / "other.sqlite")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("order/1", "paid")
        with tx.action("charge", compensate="refund") as act:
            act.result = {"charge": 1}
        foreign.put("order/1", "paid")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(FinishFails):
                transaction.commit()
        gid = tx.gid
        assert gid is not None
        # what really happened: rolled back, the decision durable, the refund owed
        assert tx.state == "rolled back"
        assert s.prepared() == [] and s.decision(gid) == "abort"
        assert s.get("order/1") is None
        assert [(a.id, a.state) for a in s.pending_compensations()] == [(act.id, "failed")]
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert said, "nothing told the operator that a compensation is owed"
        assert not any("in doubt" in m or "left prepared" in m for m in said), said
        assert not any("rollback-prepared" in m for m in said), said
        assert any(act.id in m and "actions" in m for m in said), said
    finally:
        transaction.abort()
        foreign.conn.close()
        s.close()
    # the command the warning named before refuses: the gid is decided
    out = subprocess.run(WALSTORE + ["rollback-prepared", path, gid], capture_output=True,
                         text=True, timeout=60, env=_env())
    assert out.returncode == 2 and "no prepared transaction" in out.stderr


def test_zope_stores_left_mixed_by_a_crash_can_be_decided_like_the_one_that_decided(tmp_path):
    # Before: every walstore store of one ``transaction`` transaction prepared under its
    # own random gid (zope-<uuid4> each).  A kill -9 between the two finishes left store
    # A committed and store B prepared, in doubt, under a gid store A had never heard of:
    # nothing told the operator (or a script) that B's transaction belonged with A's
    # committed one, so "decide it with commit-prepared / rollback-prepared" was a guess,
    # and a wrong one broke the atomicity the data manager promises.  Now they share one
    # gid per ``transaction`` transaction: A.decision(gid) answers for B.
    child = SCRIPTS / "zope_two_stores_child.py"
    pa, pb = tmp_path / "a", tmp_path / "b"
    proc = subprocess.run([sys.executable, str(child), str(pa), str(pb)], capture_output=True,
                          text=True, timeout=60, env=_env())
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    said = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line[:2] in
                ("A ", "B "))
    assert said["A"].startswith("committed ") and said["B"].startswith("active ")
    with walstore.open(str(pa)) as a, walstore.open(str(pb)) as b:
        assert a.prepared() == [] and a.get("order/1") == "paid"
        [gid] = b.prepared()
        assert b.get("stock/1") is None
        # the one that decided says how: commit, so B commits too (not a guess)
        assert a.decision(gid) == "commit", (gid, said)
        b.commit_prepared(gid)
        assert b.get("stock/1") == 0 and b.decision(gid) == "commit"


def test_zope_two_stores_share_one_gid_and_a_retry_takes_a_new_one(tmp_path):
    # (the companion of the test above: one gid per ``transaction`` transaction, a new one
    # for the next; both stores record the same decision under it)
    a = walstore.open(str(tmp_path / "a"), durability="none")
    b = walstore.open(str(tmp_path / "b"), durability="none")
    try:
        gids = []
        for n in range(2):
            transaction.begin()
            ta, tb = join(a), join(b)
            ta.put("n", n)
            tb.put("n", n)
            transaction.commit()
            assert ta.gid == tb.gid and ta.gid.startswith("zope-")
            assert a.decision(ta.gid) == b.decision(tb.gid) == "commit"
            gids.append(ta.gid)
        assert gids[0] != gids[1]
    finally:
        a.close()
        b.close()


def test_zope_a_read_only_stores_reads_never_veto_the_commit(tmp_path):
    # Before: a store opened read-only (an agent reading its configuration beside the
    # writer) joined to a ``transaction`` transaction only to read: its vote prepared,
    # prepare raised ReadOnlyError, and the package aborted every participant — no
    # transaction that read walstore through a read-only handle could ever commit, while
    # the same reads in ``with ro.transaction():`` commit (nothing to write).
    path = str(tmp_path / "ws")
    with walstore.open(path) as w:
        with w.transaction() as t:
            t.put("config/limit", 40)
    ro = walstore.open(path, readonly=True)
    other = sqlite3.connect(str(tmp_path / "other.sqlite"), isolation_level=None)
    other.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")

    class Foreign(Sqlite):  # (sorting before walstore: it finishes first)
        def __init__(self) -> None:
            super().__init__(tmp_path / "other.sqlite", sort_key="a-foreign")

    try:
        transaction.begin()
        tx = join(ro)
        limit = tx.get("config/limit")
        Foreign().put("charge", str(limit))
        transaction.commit()
        assert tx.state == "committed" and tx.gid is None and ro.prepared() == []
        assert dict(other.execute("SELECT k, v FROM kv")) == {"charge": "40"}
        # a write through it is still refused at the put, as ever
        transaction.begin()
        with pytest.raises(walstore.ReadOnlyError):
            join(ro).put("config/limit", 41)
        transaction.abort()
    finally:
        transaction.abort()
        other.close()
        ro.close()


class SqliteParticipant(Sqlite):
    """A foreign resource that commits (sorting first: it finishes before walstore)."""

    def __init__(self, path) -> None:
        super().__init__(path, sort_key="a-foreign")


@pytest.mark.parametrize("decided", ["rollback", "commit"])
def test_zope_a_walstore_transaction_decided_outside_the_manager_votes_as_it_ended(
        tmp_path, decided):
    # Before: a walstore transaction the caller prepared itself (``tx.prepare(gid)``, then
    # ``store.rollback_prepared(gid)`` / ``commit_prepared(gid)`` outside the manager) still
    # read "active", so the vote said yes for it.  Rolled back: the other resource then
    # committed and walstore's finish raised UnknownGid — a mixed outcome, the one the
    # "ended outside the manager votes no" rule exists to prevent.  Committed: every
    # resource committed, yet ``transaction.commit()`` raised UnknownGid from the finish
    # (the package logged "Resources may be in an inconsistent state").
    s = walstore.open(str(tmp_path / "ws"), durability="none")
    other = SqliteParticipant(tmp_path / "other.sqlite")
    try:
        transaction.begin()
        tx = join(s)
        tx.put("order/1", "paid")
        other.put("order/1", "paid")
        tx.prepare("mine")
        getattr(s, f"{decided}_prepared")("mine")
        if decided == "rollback":
            with pytest.raises(walstore.WalstoreError, match="rolled back"):
                transaction.commit()
            transaction.abort()
            assert other.rows() == {} and s.get("order/1") is None
            assert tx.state == "rolled back"
        else:
            transaction.commit()
            assert other.rows() == {"order/1": "paid"} and s.get("order/1") == "paid"
            assert tx.state == "committed"
        assert s.prepared() == []
    finally:
        transaction.abort()
        other.conn.close()
        s.close()


def test_zope_a_read_only_stores_finish_is_not_a_commit_of_the_others(tmp_path):
    # (the companion of the read-only vote above: the read-only store sorts first and
    # "finishes" having written nothing; the foreign resource after it fails its finish
    # before committing.  Nobody committed anything, so the writable walstore store rolls
    # back with the foreign one — counted as a finish, the read-only store's made it
    # commit "once more" beside the foreign rollback: mixed.)
    with walstore.open(str(tmp_path / "a-ro")) as w:
        with w.transaction() as t:
            t.put("config/limit", 40)
    ro = walstore.open(str(tmp_path / "a-ro"), readonly=True)
    rw = walstore.open(str(tmp_path / "c-rw"), durability="none")
    foreign = ForeignFailingFinish(tmp_path / "other.sqlite")
    foreign.sortKey = lambda: f"walstore:{ro.path}~"
    assert f"walstore:{ro.path}" < foreign.sortKey() < f"walstore:{rw.path}"
    try:
        transaction.begin()
        limit = join(ro).get("config/limit")
        tx = join(rw)
        tx.put("order/1", limit)
        foreign.put("order/1", str(limit))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(FinishFails):
                transaction.commit()
        assert tx.state == "rolled back" and rw.get("order/1") is None
        assert rw.prepared() == []
    finally:
        transaction.abort()
        foreign.conn.close()
        rw.close()
        ro.close()
