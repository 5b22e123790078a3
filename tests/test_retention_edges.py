"""History retention at its edges (probe findings): a key's history after several trims,
an undo whose reverted transaction was trimmed, and a never-committed txid once history
was trimmed."""
from __future__ import annotations

import os

import pytest

import walstore


def test_history_after_many_trims_shows_what_each_version_wrote(tmp_path):
    """Each trim keeps a key's newest version below its horizon; the next trim must drop
    that survivor, or ``history`` lists it with the next version's before-image as its
    value (txid 1 shown with 'v3')."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3) as s:
        wrote = {}
        for i in range(12):
            with s.transaction() as tx:
                tx.put("k", f"v{i}")
            wrote[tx.id] = f"v{i}"
            if i % 3 == 2:
                s.checkpoint()  # a trim per three commits
        s.checkpoint()
        hist = s.history("k")
        assert hist, "the retained versions are listed"
        for version in hist:
            assert version.value == wrote[version.txid], (version, wrote)
        txids = [v.txid for v in hist]
        assert txids == sorted(txids, reverse=True) and len(txids) <= 4


def test_a_forced_revert_of_an_undo_whose_target_was_trimmed_marks_needs_redo(tmp_path):
    """T ran an action; R = revert(T) compensated it; retention trims T but keeps R.
    revert(R) still refuses (RevertConflict), and ``force=True`` brings x back and marks
    the action ``needs-redo`` — the action's row must outlive T's trim while R is
    retained (it was deleted with T: the action vanished from ``store.actions()``)."""
    undone = []
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=2,
                       compensators={"undo": lambda a: undone.append(a.id)}) as s:
        with s.transaction() as tx:
            tx.put("x", 1)
            with tx.action("charge", compensate="undo"):
                pass
        t = tx.id
        aid = s.actions()[0].id
        with s.transaction() as tx:
            tx.put("y", 1)
        r = s.revert(t).txid
        with s.transaction() as tx:
            tx.put("z", 1)
        s.checkpoint()
        assert t not in [i.txid for i in s.log()]  # trimmed
        assert {a.id: a.state for a in s.actions()} == {aid: "compensated"}
        with pytest.raises(walstore.RevertConflict):
            s.revert(r)
        s.revert(r, force=True)
        assert s.get("x") == 1 and undone == [aid]
        assert {a.id: a.state for a in s.actions()} == {aid: "needs-redo"}
        # once R itself is trimmed, nothing can revert it: the settled row may go
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"w{i}", i)
        s.checkpoint()
        assert r not in [i.txid for i in s.log()]


def test_a_never_committed_txid_after_a_trim_is_an_unknown_point(tmp_path):
    """Above every trimmed txid an unknown txid never committed: UnknownPoint (not
    HistoryTrimmed).  Among the trimmed ids walstore cannot tell a trimmed one from one
    that never committed: the error is both (HistoryTrimmed and UnknownPoint)."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3) as s:
        def commits(n: int) -> None:
            for i in range(n):
                with s.transaction() as tx:
                    tx.put("k", i)

        def rolled_back():
            tx = s.transaction()
            tx.put("k", "never")
            tx.rollback()
            return tx
        commits(3)
        early = rolled_back()
        commits(8)
        late = rolled_back()
        commits(1)
        s.checkpoint()
        kept = [i.txid for i in s.log()]
        assert 1 not in kept and late.id < max(kept)
        for call in (lambda p: s.revert(p), lambda p: s.at(p), lambda p: s.rewind(p)):
            with pytest.raises(walstore.UnknownPoint) as e:
                call(late.id)
            assert not isinstance(e.value, walstore.HistoryTrimmed)
            with pytest.raises(walstore.UnknownPoint) as e:
                call(early.id)
            assert isinstance(e.value, walstore.HistoryTrimmed)
            with pytest.raises(walstore.HistoryTrimmed):
                call(1)


def test_log_since_a_trimmed_txid_raises_history_trimmed(tmp_path):
    """``log(since=txid)`` of a trimmed transaction raises HistoryTrimmed, as ``at`` and
    ``since=LSN`` of the same commit do: it returned the retained transactions after it,
    silently missing the trimmed ones in between."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=5) as s:
        lsns = {}
        for i in range(20):
            with s.transaction() as tx:
                tx.put("k", i)
            lsns[tx.id] = tx.lsn
        s.checkpoint()
        kept = [i.txid for i in s.log()]
        assert len(kept) == 5 and 3 not in kept
        for since in (3, walstore.LSN(int(lsns[3]))):
            with pytest.raises(walstore.HistoryTrimmed):
                s.log(since=since)
        assert [i.txid for i in s.log(since=kept[-1])] == kept[:-1]
        assert [i.txid for i in s.log(since=walstore.LSN(int(lsns[kept[-1]])))] == kept[:-1]


# ---- bounded disk for short-lived keys and files ------------------------------------------
def _lmdb_rows(path: str, *names: str) -> dict[str, int]:
    """Row counts of LMDB tables of a closed store."""
    import lmdb
    env = lmdb.open(os.path.join(path, "db"), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as t:
            return {n: t.stat(env.open_db(n.encode(), txn=t, create=False))["entries"]
                    for n in names}
    finally:
        env.close()


def test_retention_bounds_the_history_of_keys_created_then_deleted(tmp_path):
    """Scratch keys written then deleted leave no row once their deletion is below the
    horizon: each kept its deletion in ``hist`` and its name in ``hkeys`` for good (40,000
    of each for 0 live keys, ~3.3 MB per 10,000 keys), and ``history`` showed a deletion
    from a long-trimmed transaction."""
    path = str(tmp_path / "s")
    counts = []
    for rnd in range(2):
        with walstore.open(path, durability="none", retain_transactions=20) as s:
            for i in range(rnd * 500, rnd * 500 + 500):
                with s.transaction() as tx:
                    tx.put(f"tmp/{i:05d}", "v" * 50)
                with s.transaction() as tx:
                    tx.delete(f"tmp/{i:05d}")
            with s.transaction() as tx:
                tx.put("live", rnd)
            s.checkpoint()
            assert s.history("tmp/00000") == []
            assert [v.value for v in s.history("live")][0] == rnd
        counts.append(_lmdb_rows(path, "hist", "hkeys"))
    for c in counts:  # the retained window's rows, not every key ever written
        assert c["hist"] <= 25 and c["hkeys"] <= 15, counts


def test_retention_bounds_the_file_versions_of_paths_written_then_deleted(tmp_path):
    """A workspace path written then deleted keeps no ``fversions`` row once its deletion
    is below the horizon (one row per path ever written stayed), and views of retained
    points still read it as absent, files still there as they were."""
    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    with walstore.open(path, durability="none", retain_transactions=10) as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            tx.files(ws).write("keep.txt", "kept")
        for i in range(100):
            with s.transaction() as tx:
                tx.files(ws).write(f"tmp{i:03d}.txt", "x" * 10)
            with s.transaction() as tx:
                tx.files(ws).delete(f"tmp{i:03d}.txt")
        s.checkpoint()
        oldest = s.log()[-1].txid
        for point in (oldest, s.log()[0].txid):
            view = s.at(point).files(ws)
            assert not view.exists("tmp000.txt") and not view.exists("tmp099.txt")
            assert view.read("keep.txt") == b"kept"
        assert s.at(s.log()[1].txid).files(ws).read("tmp099.txt") == b"x" * 10
    rows = _lmdb_rows(path, "fversions", "fchanges")
    assert rows["fversions"] <= 12 and rows["fchanges"] <= 10, rows


def test_views_history_and_undo_agree_with_a_model_before_and_after_a_trim(tmp_path):
    """A random workload of creates, updates, deletes and re-creates: for every point still
    retained after a trim, ``at(point)`` (get and scan) reads what the model says, before
    and after the trim; ``history`` lists the same retained versions, each with the value
    its transaction wrote; a transaction begun before the trim reads its snapshot; and a
    rewind to the oldest retained point brings back its state exactly."""
    import random
    rnd = random.Random(7)
    keys = [f"k{i:02d}" for i in range(30)]
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=15) as s:
        state: dict[str, int] = {}
        states: dict[int, dict] = {}  # txid -> the state it left
        wrote: dict[tuple[int, str], object] = {}
        for n in range(60):
            mine = {}
            with s.transaction() as tx:
                for k in rnd.sample(keys, rnd.randint(1, 3)):
                    if k in state and rnd.random() < 0.5:
                        tx.delete(k)
                        state.pop(k)
                        mine[k] = None
                    else:
                        tx.put(k, n)
                        state[k] = mine[k] = n
            states[tx.id] = dict(state)
            wrote.update({(tx.id, k): v for k, v in mine.items()})
        reader = s.transaction()  # its snapshot: the state now (kept by the trim below)

        def check(points) -> dict:
            hist = {}
            for p in points:
                view = s.at(p)
                assert dict(view.scan()) == states[p], p
                assert {k: view.get(k) for k in keys} == {k: states[p].get(k) for k in keys}
            for k in keys:
                hist[k] = [(v.txid, v.value, v.deleted) for v in s.history(k)]
                for txid, value, deleted in hist[k]:
                    assert (value, deleted) == (wrote[(txid, k)], wrote[(txid, k)] is None)
            return hist

        before = check(list(states))
        s.checkpoint()
        retained = [i.txid for i in s.log()]
        assert len(retained) == 15
        after = check(retained)
        oldest = min(retained)
        for k in keys:
            kept = [v for v in before[k] if v[0] >= oldest]
            assert after[k][:len(kept)] == kept, k
            below = before[k][len(kept):len(kept) + 1]  # the newest below the horizon:
            if below and below[0][2] and not kept:  # a deletion nothing retained follows
                assert after[k] == [], (k, after[k])  # (absent at every retained point)
            else:  # ... else it stays, the state the oldest retained point starts from
                assert after[k] == kept + below, (k, after[k])
        assert any(before[k] and not after[k] for k in keys)  # (such keys were met)
        assert {k: reader.get(k) for k in keys} == {k: state.get(k) for k in keys}
        assert dict(reader.scan()) == state
        reader.rollback()
        s.rewind(oldest)
        assert dict(s.scan()) == states[oldest]


def _commits(s, n, key="pad"):
    for i in range(n):
        with s.transaction() as tx:
            tx.put(key, i)


def test_retention_trims_the_settled_actions_of_rolled_back_transactions(tmp_path):
    """A transaction that rolled back (or a prepared one rolled back) leaves its actions
    compensated, with no commit row that would lead retention to them: they stayed for
    good (one row per rolled-back action, however small ``retain_transactions``)."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3,
                       compensators={"refund": lambda a: None}) as s:
        for i in range(20):
            with pytest.raises(RuntimeError):
                with s.transaction() as tx:
                    with tx.action("charge", args={"i": i}, compensate="refund"):
                        pass
                    with tx.action("note", args={"i": i}):  # none declared: resolved
                        pass
                    raise RuntimeError("abort")
        for i in range(10):
            tx = s.transaction()
            with tx.action("charge", args={"i": i}, compensate="refund"):
                pass
            tx.put("q", i)
            tx.prepare(f"g{i}")
            s.rollback_prepared(f"g{i}")
        assert {a.state for a in s.actions()} == {"compensated", "resolved"}
        _commits(s, 5)
        s.checkpoint()
        assert s.actions() == []
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3) as s:
        assert s.actions() == []  # (and nothing came back from the log)


def test_retention_trims_actions_a_savepoint_rollback_took_from_a_trimmed_commit(tmp_path):
    """An action a rollback to a savepoint compensated is not in its commit's
    ``actions``: trimming the commit left its row for good."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=3,
                       compensators={"refund": lambda a: None}) as s:
        for i in range(20):
            with s.transaction() as tx:
                with pytest.raises(ValueError):
                    with tx.savepoint("sp"):
                        with tx.action("charge", args={"i": i}, compensate="refund"):
                            pass
                        raise ValueError
                with tx.action("keep", args={"i": i}, compensate="refund"):
                    pass
                tx.put("k", i)
        retained = {t.txid for t in s.log()}
        assert len(s.actions()) == 40
        s.checkpoint()
        retained = {t.txid for t in s.log()}
        left = s.actions()
        assert left and {a.txid for a in left} <= retained, left
        assert len(left) <= 2 * len(retained)


def test_retention_keeps_an_owed_action_of_a_rolled_back_txn_until_settled(tmp_path):
    """Trimming never removes an action still owed (its compensation failed): the row
    stays through every trim, and goes at the first trim after it is settled."""
    fail = [True]

    def refund(a):
        if fail[0]:
            raise OSError("payment service down")

    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=2,
                       compensators={"refund": refund}) as s:
        with pytest.raises(walstore.CompensationFailed):
            with s.transaction() as tx:
                with tx.action("charge", compensate="refund"):
                    pass
                raise RuntimeError("abort")
        with s.transaction() as tx:  # a committed one, whose undo will fail too
            with tx.action("charge", compensate="refund"):
                pass
            tx.put("x", 1)
        with pytest.raises(walstore.CompensationFailed):
            s.revert(tx.id)
        owed = {a.id for a in s.actions() if a.owed}
        assert len(owed) == 2, s.actions()
        for _ in range(3):
            _commits(s, 4)
            s.checkpoint()
            assert {a.id for a in s.actions()} == owed  # still owed: kept
        fail[0] = False
        s.retry_compensations()
        assert {a.state for a in s.actions()} == {"compensated"}
        _commits(s, 4)
        s.checkpoint()
        assert s.actions() == []


def test_a_thread_that_committed_a_big_value_does_not_keep_its_memory(tmp_path):
    """Each thread's cached msgpack Packer kept its buffer grown to the biggest value it
    ever packed (about twice that) for the thread's life: a pool of idle workers that
    each once committed a 16 MiB value held 32 MiB apiece."""
    import gc
    import threading
    import tracemalloc

    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:  # (the store's own first-use allocations)
            tx.put("warm", 1)
        committed, finish = threading.Event(), threading.Event()

        def worker():
            v = os.urandom(8 << 20)
            with s.transaction() as tx:
                tx.put("big", v)
            del v, tx
            committed.set()
            finish.wait(60)  # idle, alive: a pool's worker

        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            t = threading.Thread(target=worker)
            t.start()
            try:
                assert committed.wait(60)
                s.checkpoint()
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - base
            finally:
                finish.set()
                t.join()
        finally:
            tracemalloc.stop()
        assert held < 4 << 20, f"{held >> 20} MiB still held by an idle thread"
        assert len(s.get("big")) == 8 << 20


def test_retention_trims_the_actions_of_a_transaction_a_crash_left_open(tmp_path):
    """A process killed with an action in flight: recovery ends its transaction (ABORT)
    and compensates the action; that row, like a rollback's, goes with the history."""
    import signal
    import subprocess
    import sys

    path = str(tmp_path / "s")
    child = (
        "import os, signal, walstore\n"
        f"s = walstore.open({path!r}, durability='normal')\n"
        "tx = s.transaction()\n"
        "with tx.action('charge', compensate='refund'):\n"
        "    pass\n"
        "tx.put('x', 1)\n"
        "s.sync()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", child], env=env, timeout=120)
    assert p.returncode == -signal.SIGKILL
    with walstore.open(path, durability="none", retain_transactions=2,
                       compensators={"refund": lambda a: None}) as s:
        assert [a.state for a in s.actions()] == ["compensated"]
        _commits(s, 4)
        s.checkpoint()
        assert s.actions() == []


def test_retention_bounds_the_rows_of_rollbacks_between_commits(tmp_path):
    """Rollbacks did not count toward ``retain_transactions``: the settled rows of any
    number of them after the Nth newest commit were kept (5000 rollbacks, 5000
    ``compensated`` rows and ``aended`` entries kept through a checkpoint).  Now they
    count for their own rows: the newest N transactions, committed or not, keep theirs,
    while the history (commits, a restore point) keeps what it kept, and an owed action
    is kept however old."""
    fail = [False]

    def refund(a):
        if fail[0]:
            raise OSError("payment service down")

    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    with walstore.open(path, durability="none", retain_transactions=10,
                       compensators={"refund": refund}) as s:
        ws = s.workspace(str(root))
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
                if i == 19:
                    with tx.action("charge", args={"i": i}, compensate="refund"):
                        pass
            if i == 5:
                s.restore_point("rp")
        fail[0] = True  # an owed one among the rollbacks: kept however old
        with pytest.raises(walstore.CompensationFailed):
            with s.transaction() as tx:
                with tx.action("charge", args={"owed": 1}, compensate="refund"):
                    pass
                raise RuntimeError("abort")
        fail[0] = False
        owed = [a.id for a in s.actions() if a.owed]
        assert len(owed) == 1
        for i in range(300):
            with pytest.raises(RuntimeError):
                with s.transaction() as tx:
                    if i % 2:
                        tx.files(ws).write(f"f{i}.txt", "x")
                    else:
                        with tx.action("charge", args={"i": i}, compensate="refund"):
                            pass
                    raise RuntimeError("abort")
        s.checkpoint()
        rows = s.actions()
        by_state = sorted(a.state for a in rows)
        # the newest 10 transactions are rollbacks, 5 of them with an action; the owed
        # one; the newest commit's action (its history is retained: commits count as
        # before, the restore point pins them)
        assert by_state == ["committed"] + ["compensated"] * 5 + ["failed"], by_state
        assert {a.args.get("i") for a in rows if a.state == "compensated"} == {
            290, 292, 294, 296, 298}
        assert {a.id for a in rows if a.owed} == set(owed)
        assert len(s.log()) == 14  # k6 .. k19: the restore point pins them
        s.rewind("rp")
        assert s.get("k6") is None and s.get("k19") is None and s.get("k5") == 5
    rows = _lmdb_rows(path, "actions", "aended")
    assert rows["actions"] <= 1 + 5 + 1 and rows["aended"] <= 10 + 1, rows


def test_a_store_scan_trimmed_under_it_says_so_in_a_scans_words(tmp_path):
    """Retention trims the history a streamed ``store.scan`` needs while its caller holds
    it: SnapshotTooOld (a ConflictError: the rows it yielded and the rest would not be one
    state), worded for a scan — it spoke of "this transaction's snapshot" where there was
    none (probe-engine).  A transaction's own snapshot keeps its wording."""
    s = walstore.open(str(tmp_path / "s"), retain_transactions=1)
    with s.transaction() as tx:
        for i in range(100):
            tx.put(f"s/{i:03d}", i)
    it = s.scan(prefix="s/")
    got = [next(it) for _ in range(5)]
    held = s.transaction()
    assert held.get("s/050") == 50  # (its snapshot: the same as the scan's)
    for i in range(100):
        with s.transaction() as tx:
            tx.put(f"s/{i:03d}", -1)
    s.checkpoint()
    with pytest.raises(walstore.SnapshotTooOld) as ei:
        got += list(it)
    msg = str(ei.value)
    assert "store.scan's snapshot" in msg and "retry the scan" in msg, msg
    assert "this transaction" not in msg, msg
    assert isinstance(ei.value, walstore.ConflictError) and ei.value.horizon is not None
    assert all(v >= 0 for _k, v in got)
    with pytest.raises(walstore.SnapshotTooOld, match="this transaction's snapshot"):
        list(held.scan(prefix="s/"))
    held.rollback()
    assert [v for _k, v in s.scan(prefix="s/")] == [-1] * 100  # (a new scan: retried)
    s.close()
