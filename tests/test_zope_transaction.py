"""walstore as a data manager of the ``transaction`` package (walstore.integrations.transaction).

The second participant is real: a small IDataManager over a stdlib sqlite3 database
(written here), so "commits atomically with other resources" is checked against what
both databases hold afterwards, including a failure in either participant's vote.
"""
from __future__ import annotations

import sqlite3

import pytest

transaction = pytest.importorskip("transaction")

import walstore  # noqa: E402
from walstore.integrations.transaction import join  # noqa: E402


class VoteRefused(Exception):
    pass


class SqliteDataManager:
    """IDataManager + ISavepointDataManager for one sqlite3 connection (table kv)."""

    def __init__(self, path, sort_key: str = "sqlite", manager=None) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)")
        self.transaction_manager = manager or transaction.manager
        self._sort_key = sort_key
        self.joined = False
        self.refuse_vote: Exception | None = None
        self.calls: list[str] = []
        self._sp = 0

    # used by the application
    def put(self, k: str, v: str) -> None:
        if not self.joined:
            self.transaction_manager.get().join(self)
            self.conn.execute("BEGIN IMMEDIATE")
            self.joined = True
        self.conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))

    def rows(self) -> dict:
        other = sqlite3.connect(self.conn.execute("PRAGMA database_list").fetchone()[2])
        try:
            return dict(other.execute("SELECT k, v FROM kv"))
        finally:
            other.close()

    def _rollback(self) -> None:
        if self.joined:
            self.conn.execute("ROLLBACK")
            self.joined = False

    # IDataManager
    def abort(self, txn) -> None:
        self.calls.append("abort")
        self._rollback()

    def tpc_begin(self, txn) -> None:
        self.calls.append("tpc_begin")

    def commit(self, txn) -> None:
        self.calls.append("commit")

    def tpc_vote(self, txn) -> None:
        self.calls.append("tpc_vote")
        if self.refuse_vote is not None:
            raise self.refuse_vote

    def tpc_finish(self, txn) -> None:
        self.calls.append("tpc_finish")
        self.conn.execute("COMMIT")
        self.joined = False

    def tpc_abort(self, txn) -> None:
        self.calls.append("tpc_abort")
        self._rollback()

    def sortKey(self) -> str:
        return self._sort_key

    # ISavepointDataManager
    def savepoint(self):
        self._sp += 1
        name = f"sp{self._sp}"
        self.conn.execute(f"SAVEPOINT {name}")
        conn = self.conn

        class _SP:
            def rollback(self_inner) -> None:
                conn.execute(f"ROLLBACK TO {name}")
        return _SP()


@pytest.fixture(autouse=True)
def clean_manager():
    transaction.manager.abort()
    yield
    transaction.manager.abort()


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "ws"), durability="full")
    with s.transaction() as tx:
        tx.put("agent/step", 0)
    yield s
    s.close()


@pytest.fixture
def sql(tmp_path):
    dm = SqliteDataManager(tmp_path / "other.sqlite")
    yield dm
    dm.conn.close()


def test_commit_with_manager_commits_walstore_writes(store):
    with transaction.manager:
        tx = join(store)
        tx.put("agent/step", 1)
        tx.put("agent/plan", ["a", "b"])
        assert join(store) is tx  # one walstore transaction per store and zope transaction
        assert store.get("agent/step") == 0  # not before the zope commit
    assert store.get("agent/step") == 1 and store.get("agent/plan") == ["a", "b"]
    assert tx.state == "committed" and tx.gid is not None
    assert store.prepared() == [] and store.decision(tx.gid) == "commit"
    # a new zope transaction gets a new walstore transaction
    transaction.begin()
    tx2 = join(store)
    assert tx2 is not tx and tx2.state == "active"
    tx2.put("agent/step", 2)
    transaction.commit()
    assert store.get("agent/step") == 2


def test_abort_discards_walstore_writes(store):
    transaction.begin()
    tx = join(store)
    tx.put("agent/step", 99)
    transaction.abort()
    assert store.get("agent/step") == 0 and tx.state == "rolled back"
    assert store.prepared() == []
    with pytest.raises(ZeroDivisionError):
        with transaction.manager:
            join(store).put("agent/step", 98)
            1 / 0
    assert store.get("agent/step") == 0
    # an aborted zope transaction leaves nothing held
    with store.transaction() as t:
        t.put("agent/step", t.get("agent/step") + 1)


def test_savepoint_rollback_undoes_walstore_writes_after_it(store):
    transaction.begin()
    tx = join(store)
    tx.put("a", 1)
    sp = transaction.savepoint()
    tx.put("a", 2)
    tx.put("b", 2)
    assert tx.get("a") == 2
    sp.rollback()
    assert tx.get("a") == 1 and tx.get("b") is None
    tx.put("c", 3)
    sp.rollback()  # a savepoint can be rolled back to again
    assert tx.get("c") is None
    tx.put("d", 4)
    transaction.savepoint()
    tx.put("e", 5)
    transaction.savepoint()  # taken and never rolled back: the writes stay
    transaction.commit()
    assert {k: store.get(k) for k in "abcde"} == {"a": 1, "b": None, "c": None, "d": 4, "e": 5}


def test_savepoint_taken_before_walstore_joined(store, sql):
    transaction.begin()
    sql.put("s", "1")
    sp = transaction.savepoint()
    join(store).put("late", 1)  # joins after the savepoint
    sql.put("s2", "2")
    sp.rollback()  # rolls walstore back entirely (it joined later), sqlite to the savepoint
    assert store.get("late") is None
    tx = join(store)  # a fresh walstore transaction in the same zope transaction
    assert tx.state == "active" and tx.get("late") is None
    tx.put("after", 2)
    transaction.commit()
    assert store.get("late") is None and store.get("after") == 2
    assert sql.rows() == {"s": "1"}
    assert store.prepared() == []


def test_commits_atomically_with_sqlite(store, sql):
    with transaction.manager:
        join(store).put("agent/step", 1)
        sql.put("order", "placed")
    assert store.get("agent/step") == 1 and sql.rows() == {"order": "placed"}
    assert sql.calls == ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]
    assert store.prepared() == []


def test_savepoint_with_two_participants(store, sql):
    transaction.begin()
    join(store).put("w", 1)
    sql.put("q", "1")
    sp = transaction.savepoint()
    join(store).put("w", 2)
    sql.put("q", "2")
    sp.rollback()
    transaction.commit()
    assert store.get("w") == 1 and sql.rows() == {"q": "1"}


@pytest.mark.parametrize("sql_votes", ["before walstore", "after walstore"])
def test_other_participant_vote_fails_walstore_has_nothing(store, tmp_path, sql_votes):
    sort_key = "a-sqlite" if sql_votes == "before walstore" else "zz-sqlite"
    sql = SqliteDataManager(tmp_path / "o.sqlite", sort_key=sort_key)
    try:
        sql.refuse_vote = VoteRefused("sqlite says no")
        transaction.begin()
        tx = join(store)
        tx.put("agent/step", 1)
        tx.put("agent/new", "x")
        sql.put("order", "placed")
        with pytest.raises(VoteRefused):
            transaction.commit()
        transaction.abort()
        assert store.get("agent/step") == 0 and store.get("agent/new") is None
        assert store.prepared() == [], "a prepared gid was left behind"
        assert sql.rows() == {}
        assert tx.state == "rolled back"
        if sql_votes == "after walstore":
            assert tx.gid is not None and store.decision(tx.gid) == "abort"
        assert "tpc_abort" in sql.calls and "tpc_finish" not in sql.calls
        # the keys are free: the next transaction commits them
        with transaction.manager:
            join(store).put("agent/step", 5)
        assert store.get("agent/step") == 5
    finally:
        sql.conn.close()


@pytest.mark.parametrize("sql_votes", ["before walstore", "after walstore"])
def test_walstore_vote_conflict_sqlite_has_nothing(store, tmp_path, sql_votes):
    sort_key = "a-sqlite" if sql_votes == "before walstore" else "zz-sqlite"
    sql = SqliteDataManager(tmp_path / "o.sqlite", sort_key=sort_key)
    try:
        transaction.begin()
        tx = join(store)
        step = tx.get("agent/step")
        tx.put("agent/step", step + 1)
        sql.put("order", "placed")
        with store.transaction() as other:  # another agent changes what we read
            other.put("agent/step", 41)
        with pytest.raises(walstore.ConflictError):
            transaction.commit()
        transaction.abort()
        assert sql.rows() == {}
        assert store.get("agent/step") == 41
        assert store.prepared() == []
        assert "tpc_finish" not in sql.calls and "tpc_abort" in sql.calls
    finally:
        sql.conn.close()


def test_walstore_vote_conflict_with_a_prepared_holder(store, sql):
    """A zope transaction that touches a key held by an in-doubt walstore transaction."""
    holder = store.transaction()
    holder.put("agent/step", 7)
    holder.prepare("held-by-someone")
    transaction.begin()
    join(store).put("agent/step", 8)
    sql.put("order", "placed")
    with pytest.raises(walstore.ConflictError):
        transaction.commit()
    transaction.abort()
    assert sql.rows() == {} and store.prepared() == ["held-by-someone"]
    holder.commit()
    assert store.get("agent/step") == 7


def test_data_manager_interface_is_complete(store):
    transaction.begin()
    join(store)
    (dm,) = [r for r in transaction.get()._resources]
    for name in ("abort", "tpc_begin", "commit", "tpc_vote", "tpc_finish", "tpc_abort",
                 "sortKey", "savepoint"):
        assert callable(getattr(dm, name)), name
    assert isinstance(dm.sortKey(), str)
    assert dm.transaction_manager is transaction.manager
    transaction.abort()


# ---- probe 32: the decision is commit once every participant voted yes ----------------------
@pytest.mark.parametrize("fault", ["once", "lasting"])
def test_a_failed_finish_after_every_vote_never_rolls_walstore_back(tmp_path, fault):
    # (the transaction package calls tpc_abort on everyone after a failure in some
    # participant's tpc_finish; walstore rolled its prepared transaction back and ran its
    # compensations while the other participant had committed)
    import errno

    from tools.faults import FaultBackend, installed
    refunds: list = []
    s = walstore.open(str(tmp_path / "ws"), durability="full",
                      compensators={"refund": refunds.append})
    sql = SqliteDataManager(tmp_path / "o.sqlite", sort_key="a-sqlite")  # finishes first
    fb = FaultBackend()
    finish = sql.tpc_finish

    def finish_then_fail_walstore(txn):
        finish(txn)  # sqlite committed: from here walstore's commit must not be undone
        # (segments only: the spare thread's zero-fill of wal/spare.tmp took a "once" fault)
        fb.fail("pwrite", errno.ENOSPC, path=f"{s.path}/wal/*.wal",
                times=1 if fault == "once" else None)
    sql.tpc_finish = finish_then_fail_walstore
    try:
        transaction.begin()
        tx = join(s)
        tx.put("transfer", "credited")
        with tx.action("charge", args="c1", compensate="refund"):
            pass
        sql.put("transfer", "debited")
        with installed(fb):
            if fault == "once":
                with pytest.raises(OSError):
                    transaction.commit()  # (the package re-raises the finish's error)
            else:
                with pytest.warns(RuntimeWarning, match="in doubt"), \
                        pytest.raises(OSError):
                    transaction.commit()
        transaction.abort()
        assert sql.rows() == {"transfer": "debited"}
        assert refunds == []  # never compensated beside a committed participant
        if fault == "once":  # committed once more in tpc_abort
            assert s.get("transfer") == "credited" and s.prepared() == []
        else:  # left prepared, in doubt, for the operator
            assert s.get("transfer") is None and s.prepared() == [tx.gid]
            s.commit_prepared(tx.gid)
            assert s.get("transfer") == "credited" and s.prepared() == []
        assert [a.state for a in s.actions()] == ["committed"]
        s.close()
        s = walstore.open(str(tmp_path / "ws"), compensators={"refund": refunds.append})
        assert s.get("transfer") == "credited" and refunds == []
    finally:
        sql.conn.close()
        s.close()


def test_a_walstore_transaction_ended_outside_the_manager_votes_no(tmp_path, sql):
    # (store.close() rolled back the joined transaction, compensating its action; the vote
    # said yes, and the other participant committed without walstore's part)
    refunds: list = []
    s = walstore.open(str(tmp_path / "ws"), compensators={"refund": refunds.append})
    transaction.begin()
    tx = join(s)
    tx.put("order", "paid")
    with tx.action("charge", args=40, compensate="refund"):
        pass
    sql.put("order", "paid")
    s.close()  # rolls back this thread's open transaction (and refunds)
    assert tx.state == "rolled back" and len(refunds) == 1
    with pytest.raises(walstore.WalstoreError, match="cannot vote to commit"):
        transaction.commit()
    transaction.abort()
    assert sql.rows() == {}  # the other participant aborted with it
    with walstore.open(str(tmp_path / "ws")) as s:
        assert s.get("order") is None


def test_a_walstore_transaction_committed_by_the_caller_lets_the_others_commit(store, sql):
    """tx.commit() in the body: walstore's writes stand, so its vote is yes and the other
    participant commits beside them (it voted no, saying "nothing of it is committed",
    and the other aborted while walstore's writes stood)."""
    tx = join(store)
    tx.put("order", "paid")
    sql.put("order", "paid")
    tx.commit()
    transaction.commit()
    assert store.get("order") == "paid"
    assert sql.rows() == {"order": "paid"}
    assert store.prepared() == []


@pytest.mark.parametrize("fault", ["once", "lasting"])
def test_a_failed_finish_of_walstore_finishing_first_rolls_everyone_back(tmp_path, fault):
    """The mirror of the test above (probe 54): walstore sorts first, so it finishes first,
    and its COMMIT hits a full disk.  Nobody committed; the package aborts every
    participant.  walstore committed "once more" in tpc_abort beside the other's rollback
    (credited here, nothing debited there); now it rolls back too and refunds."""
    import errno

    from tools.faults import FaultBackend, installed
    refunds: list = []
    s = walstore.open(str(tmp_path / "ws"), durability="full",
                      compensators={"refund": refunds.append})
    sql = SqliteDataManager(tmp_path / "o.sqlite", sort_key="zzz-sqlite")  # finishes last
    fb = FaultBackend()
    vote = sql.tpc_vote

    def vote_then_fill_the_disk(txn):
        vote(txn)  # (segments only: the spare thread's fill of wal/spare.tmp took the fault)
        fb.fail("pwrite", errno.ENOSPC, path=f"{s.path}/wal/*.wal",
                times=1 if fault == "once" else None)
    sql.tpc_vote = vote_then_fill_the_disk
    try:
        transaction.begin()
        tx = join(s)
        tx.put("transfer", "credited")
        with tx.action("charge", args="c1", compensate="refund"):
            pass
        sql.put("transfer", "debited")
        with installed(fb):
            if fault == "once":
                with pytest.raises(OSError):
                    transaction.commit()
            else:
                with pytest.warns(RuntimeWarning, match="rollback-prepared"), \
                        pytest.raises(OSError):
                    transaction.commit()
        transaction.abort()
        assert sql.rows() == {}  # the package rolled the other participant back
        assert s.get("transfer") is None
        if fault == "once":
            assert s.prepared() == [] and len(refunds) == 1
            assert [a.state for a in s.actions()] == ["compensated"]
        else:  # nothing could be written: left prepared, for rollback-prepared
            assert s.prepared() == [tx.gid] and refunds == []
            s.rollback_prepared(tx.gid)
            assert len(refunds) == 1 and s.prepared() == []
        s.close()
        s = walstore.open(str(tmp_path / "ws"), compensators={"refund": refunds.append})
        assert s.get("transfer") is None and len(refunds) == 1
    finally:
        sql.conn.close()
        s.close()


# ---- probe-2pc: walstore commits in tpc_abort only when a participant really finished -------
@pytest.mark.parametrize("failing", ["first", "second"])
def test_two_walstore_stores_end_alike_when_one_finish_fails(tmp_path, failing):
    """Two walstore stores in one transaction: the finish of one of them hits a full disk.
    When it is the first (``sortKey`` order) nobody committed: both roll back (the second
    committed "once more" beside the first's rollback and refund: it looked only at the
    votes).  When it is the second, the first committed: the second commits once more."""
    import errno

    from tools.faults import FaultBackend, installed
    refunds: list = []
    comps = {"refund": refunds.append}
    a = walstore.open(str(tmp_path / "a"), compensators=comps)  # sorts (finishes) first
    b = walstore.open(str(tmp_path / "b"), compensators=comps)
    victim = a if failing == "first" else b
    try:
        tm = transaction.TransactionManager()
        tm.begin()
        ta, tb = join(a, tm), join(b, tm)
        ta.put("x", "new")
        tb.put("x", "new")
        for t in (ta, tb):
            with t.action("charge", compensate="refund") as act:
                act.result = 1
        fb = FaultBackend()
        # the victim's WAL writes from here: its PREPARE (the vote), its COMMIT (the finish)
        rule = fb.fail("pwrite", errno.ENOSPC, path=f"{victim.path}/wal/0*", nth=2)
        with installed(fb), pytest.raises(walstore.WalWriteError):
            tm.commit()
        assert rule.fired == 1
        if failing == "first":
            assert a.get("x") is None and b.get("x") is None and len(refunds) == 2
            assert ta.state == tb.state == "rolled back"
        else:
            assert a.get("x") == "new" and b.get("x") == "new" and refunds == []
            assert ta.state == tb.state == "committed"
        assert a.prepared() == [] and b.prepared() == []
    finally:
        a.close()
        b.close()


class FinishFails(Exception):
    pass


@pytest.mark.parametrize("layout", ["one-foreign-first", "second-of-two-foreign"])
def test_a_foreign_finish_failing_commits_walstore_only_if_one_finished(tmp_path, layout):
    """A non-walstore resource sorting before walstore fails its own finish.  When it is
    the first to finish, nobody committed: walstore rolls back (it committed "once more",
    every participant having voted).  When another resource finished before it, that one
    committed: walstore commits too."""
    refunds: list = []
    s = walstore.open(str(tmp_path / "ws"), compensators={"refund": refunds.append})
    first = SqliteDataManager(tmp_path / "first.sqlite", sort_key="a-first")
    second = (SqliteDataManager(tmp_path / "second.sqlite", sort_key="b-second")
              if layout == "second-of-two-foreign" else None)
    failing = second or first

    def finish_fails(txn):
        failing.calls.append("tpc_finish")
        raise FinishFails("disk gone")
    failing.tpc_finish = finish_fails
    try:
        transaction.begin()
        tx = join(s)
        tx.put("x", "new")
        with tx.action("charge", compensate="refund") as act:
            act.result = 1
        first.put("x", "new")
        if second is not None:
            second.put("x", "new")
        with pytest.raises(FinishFails):
            transaction.commit()
        transaction.abort()
        assert s.prepared() == []
        if second is None:  # nobody finished
            assert first.rows() == {}
            assert s.get("x") is None and len(refunds) == 1 and tx.state == "rolled back"
        else:  # the first one committed before the second failed
            assert first.rows() == {"x": "new"} and second.rows() == {}
            assert s.get("x") == "new" and refunds == [] and tx.state == "committed"
    finally:
        first.conn.close()
        if second is not None:
            second.conn.close()
        s.close()


@pytest.mark.parametrize("how", ["run", "attempts"])
def test_a_walstore_conflict_at_the_vote_is_retried_by_the_manager(store, sql, how):
    """transaction.manager.run / attempts() retry a walstore ConflictError (nothing of the
    conflicting transaction committed), as they retry ZODB's ConflictError; before,
    should_retry was missing and the first conflict escaped the retry loop."""
    seen = []

    def work():
        tx = join(store)
        step = tx.get("agent/step")
        seen.append(step)
        if len(seen) == 1:  # another writer commits under the first attempt
            store.run(lambda t: t.put("agent/step", t.get("agent/step") + 100))
        tx.put("agent/step", step + 1)
        sql.put("step", str(step + 1))

    if how == "run":
        transaction.manager.run(work, tries=3)
    else:
        for attempt in transaction.manager.attempts(3):
            with attempt:
                work()
    assert seen == [0, 100]
    assert store.get("agent/step") == 101
    assert sql.rows() == {"step": "101"}
    assert store.prepared() == []
