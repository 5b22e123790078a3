"""Audit 68, a review of the fixes of tests/test_audit68_saga_scans.py: a prepared
transaction decided through the store (``Transaction._check_undecided``), the scan's walk
of the commits since its snapshot checking purges against what is left of it
(``snapshot._changed_since``), a compensator raising StopIteration (``Saga._run``), and
close()'s count of the rollbacks other threads run (``Files.undoing_elsewhere``).

Coverage (each test asserts behaviour that could fail): a prepared transaction's reads
and its owner's commit()/rollback() beside ``store.commit_prepared`` /
``rollback_prepared`` in other threads (no deadlock, no compensation run twice, its LSN
the commit's); scans forward and reverse, by prefix and by start/end, across a purge of
the last key yielded, the next one, one overlapping the boundary, and outside the range,
over rows in LMDB and in memory, in the writer and in a read-only process; compensators
that are generators, async, return None or raise StopIteration; close() beside two
threads rolling back and one thread with a nested rollback.

Findings (each test named below fails on the code before its fix):

- A read of a prepared transaction (tx.get, tx.scan) from one thread while its owner's
  ``tx.rollback()`` ran its compensations in another waited on the transaction's end lock
  until every compensation was done (or for ever, a compensator hanging); before audit 68's
  fix it returned at once
  (``test_a_read_of_a_prepared_transaction_never_waits_for_its_rollbacks_compensations``);
  and a compensator of that rollback reading the transaction got its write set, rows the
  rollback discards (a plain transaction's raises TransactionClosed there)
  (``test_a_compensator_reading_its_own_rolled_back_transaction_is_refused``).
- A compensator raising a StopIteration subclass, or StopIteration with a message, was
  recorded as "StopIteration: raised by compensator ... (a next() on an exhausted
  iterator?)": the type and message it raised were lost
  (``test_a_compensator_raising_stopiteration_is_recorded_with_its_own_type_and_message``).
- After ``store.commit_prepared``/``rollback_prepared``, the transaction's
  ``savepoint()``/``rollback_to()`` said it "is prepared ... until it is committed or
  rolled back" and ``prepare()`` that it "is already prepared" (a ValueError), its state
  still "active" (audit 68 fixed put and action only)
  (``test_a_prepared_transaction_decided_by_the_store_says_how_it_ended``).
- The owner's ``tx.commit()``/``rollback()`` while another caller's
  ``store.commit_prepared`` waited for its fsync raised UnknownGid ("being made
  durable") and left the transaction "active" with no LSN, though it committed
  (``test_an_owners_commit_beside_a_commit_prepared_being_made_durable_ends_committed``).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings

import pytest

import walstore
from walstore import fileio

from store_support import cli_env
from test_audit56_saga import _OnFsync
from test_audit68_saga_scans import _charge_rolled_back_failing


def _prepared(s, gid="g1", action=True):
    """A transaction that wrote k=v (and ran an action compensated by "refund"), prepared
    as ``gid``."""
    tx = s.transaction()
    tx.put("k", "v")
    if action:
        with tx.action("charge", compensate="refund") as act:
            act.result = 1
    tx.prepare(gid)
    return tx


def _slow_refund(runs: list, started: threading.Event, hold):
    """A compensator: notes the action's id in ``runs``, sets ``started``, then runs
    ``hold()`` (how long the rollback running it is held)."""
    def refund(action):
        runs.append(action.id)
        started.set()
        hold()

    return refund


# ---- findings ------------------------------------------------------------------------------
@pytest.mark.parametrize("read", ["get", "scan"])
def test_a_read_of_a_prepared_transaction_never_waits_for_its_rollbacks_compensations(
        tmp_path, read):
    """The owner's ``tx.rollback()`` of a prepared transaction runs its compensations
    holding the transaction's end lock.  A ``tx.get``/``tx.scan`` from another thread
    meanwhile (a watchdog, a progress report) waited on that lock for as long as the
    compensations ran — for ever, one hanging — where before the audit-68 fix it returned
    at once (and a plain transaction's read raises at once).  Now it raises
    TransactionClosed at once: the decision (rollback) is durable."""
    gate, started = threading.Event(), threading.Event()
    runs: list = []
    refund = _slow_refund(runs, started, lambda: gate.wait(10))  # (until the read is done)
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        tx = _prepared(s)
        t = threading.Thread(target=tx.rollback)
        t.start()
        try:
            assert started.wait(10)
            t0 = time.monotonic()
            with pytest.raises(walstore.TransactionClosed, match="rolled back"):
                if read == "get":
                    tx.get("k")
                else:
                    next(tx.scan())
            took = time.monotonic() - t0
        finally:
            gate.set()
            t.join(20)
        assert took < 2, f"the read waited {took:.1f} s for the compensation"
        assert tx.state == "rolled back" and len(runs) == 1
        assert s.get("k") is None and s.pending_compensations() == []


@pytest.mark.parametrize("prepare", [False, True])
def test_a_compensator_reading_its_own_rolled_back_transaction_is_refused(tmp_path, prepare):
    """A compensator that reads the transaction being rolled back (its owner's
    ``rollback()`` running it in the same thread): TransactionClosed, prepared or not —
    never the write set the rollback discards."""
    seen: list = []
    box: list = []

    def refund(action):
        try:
            seen.append(box[0].get("k"))
        except walstore.TransactionClosed as e:
            seen.append(str(e))

    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        if prepare:
            tx = _prepared(s)
        else:
            tx = s.transaction()
            tx.put("k", "v")
            with tx.action("charge", compensate="refund") as act:
                act.result = 1
        box.append(tx)
        tx.rollback()
        assert len(seen) == 1 and "rolled back" in seen[0], seen
        assert tx.state == "rolled back" and s.get("k") is None



@pytest.mark.parametrize("decide", ["commit_prepared", "rollback_prepared"])
@pytest.mark.parametrize("op", ["savepoint", "rollback_to", "prepare"])
def test_a_prepared_transaction_decided_by_the_store_says_how_it_ended(tmp_path, decide, op):
    """After ``store.commit_prepared``/``rollback_prepared``, the transaction's first
    ``savepoint()``/``rollback_to()`` said it "is prepared as 'g1': its write set and
    actions are fixed until it is committed or rolled back" and ``prepare('g2')`` "is
    already prepared as 'g1'" (a ValueError) — of one committed or rolled back, its
    state still "active" (audit 68 fixed this for put and action only).  They say how it
    ended (TransactionClosed), and its state does."""
    ended = "committed" if decide == "commit_prepared" else "rolled back"
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        tx.put("k", 1)
        tx.savepoint("x")
        tx.put("k", 2)
        tx.prepare("g1")
        getattr(s, decide)("g1")
        call = {"savepoint": tx.savepoint, "rollback_to": lambda: tx.rollback_to("x"),
                "prepare": lambda: tx.prepare("g2")}[op]
        with pytest.raises(walstore.TransactionClosed, match=f"already {ended}"):
            call()
        assert tx.state == ended
        assert s.get("k") == (2 if ended == "committed" else None)
        assert s.decision("g2") is None

# ---- prepared transactions decided through the store: races ------------------------------
@pytest.mark.parametrize("decider", ["store", "owner"])
def test_reads_beside_a_commit_prepared_see_the_write_set_or_closed_and_its_lsn(tmp_path,
                                                                               decider):
    """Two threads read a prepared transaction (get, scan) while a third commits it
    (``store.commit_prepared`` or the owner's ``tx.commit()``), and the owner then calls
    commit() too: no deadlock; every read gives its write set or TransactionClosed; the
    transaction ends committed, with the commit's LSN (also once the row is in LMDB)."""
    with walstore.open(str(tmp_path / "s"), durability="full") as s:
        for round_ in range(20):
            gid = f"g{round_}"
            tx = _prepared(s, gid, action=False)
            stop = threading.Event()
            bad: list = []

            def read():
                while not stop.is_set():
                    try:
                        got = [tx.get("k"), [kv for kv in tx.scan(prefix="k")]]
                    except walstore.TransactionClosed as e:
                        if "committed" not in str(e):
                            bad.append(str(e))
                        return
                    if got != ["v", [("k", "v")]]:
                        bad.append(got)

            readers = [threading.Thread(target=read) for _ in range(2)]
            for t in readers:
                t.start()
            time.sleep(0.002)
            lsn = s.commit_prepared(gid) if decider == "store" else tx.commit()
            for t in readers:
                t.join(10)
            stop.set()
            assert not any(t.is_alive() for t in readers) and bad == []
            if decider == "store":
                with pytest.raises(walstore.WalstoreError, match="committed"):
                    tx.commit()
            assert tx.state == "committed" and tx.lsn == lsn, (tx.lsn, lsn)
        s.checkpoint()
        tx = _prepared(s, "last", action=False)
        lsn = s.commit_prepared("last")
        s.checkpoint()  # (its txns row in LMDB: the LSN read from there)
        with pytest.raises(walstore.TransactionClosed, match="committed"):
            tx.get("k")
        assert tx.lsn == lsn


def test_an_owners_rollback_beside_a_stores_rollback_prepared_compensates_once(tmp_path):
    """``store.rollback_prepared`` in one thread (its compensation slow) while the owner
    calls ``tx.rollback()`` and reads: the compensation runs once, the owner is told the
    transaction is rolled back (by the other call), nothing is left owed."""
    runs: list = []
    started = threading.Event()
    refund = _slow_refund(runs, started, lambda: time.sleep(0.3))
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        tx = _prepared(s)
        t = threading.Thread(target=s.rollback_prepared, args=("g1",))
        t.start()
        assert started.wait(10)
        with pytest.raises(walstore.TransactionClosed, match="rolled back"):
            tx.get("k")
        with pytest.raises(walstore.WalstoreError, match="rolled back"):
            tx.rollback()
        with pytest.raises(walstore.WalstoreError, match="rolled back"):
            tx.commit()
        t.join(10)
        assert len(runs) == 1 and tx.state == "rolled back"
        assert s.pending_compensations() == [] and s.get("k") is None
        assert s.decision("g1") == "abort"


# ---- compensators ------------------------------------------------------------------------
class _Exhausted(StopIteration):
    """A StopIteration subclass a compensator's library raises."""


@pytest.mark.parametrize("exc", [_Exhausted("the refund API said: batch exhausted"),
                                 StopIteration("quota exhausted")], ids=["subclass", "msg"])
def test_a_compensator_raising_stopiteration_is_recorded_with_its_own_type_and_message(
        tmp_path, exc):
    """A compensator raising a StopIteration subclass, or StopIteration with a message:
    the action's error (and CompensationFailed) said "StopIteration: raised by compensator
    'refund' (a next() on an exhausted iterator?)" — the type and message it raised were
    lost (the C call noting the return took it for its iteration's end).  They are kept
    now, as for any other exception."""
    calls: list = []

    def refund(action):
        calls.append(action.id)
        raise exc

    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        act, failed = _charge_rolled_back_failing(s)
        want = f"{type(exc).__name__}: {exc}"
        got = s.get_action(act.id)
        assert (got.state, got.attempts, len(calls)) == ("failed", 3, 3)
        assert got.error.startswith(want), got.error
        assert want in str(failed)
        s.retry_compensations()  # (still failing: once more, recorded the same)
        assert len(calls) == 6 and s.get_action(act.id).error.startswith(want)


@pytest.mark.parametrize("how", ["none", "empty", "generator", "coroutine", "asyncgen"])
def test_compensators_returning_nothing_or_an_undriven_body(tmp_path, how):
    """A compensator returning None or an empty list ran: compensated once.  One whose
    call returns a generator, coroutine or async generator (a callable object: a plain
    async/generator function is refused at open) ran nothing: failed, no warning of a
    coroutine never awaited."""
    class Body:
        def __call__(self, action):
            if how == "none":
                return None
            if how == "empty":
                return []
            if how == "generator":
                return (x for x in ())

            async def co():
                return 1

            async def ag():
                yield 1
            return co() if how == "coroutine" else ag()

    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": Body()}) as s:
        tx = s.transaction()
        with tx.action("charge", compensate="refund") as act:
            act.result = 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if how in ("none", "empty"):
                tx.rollback()
                assert s.get_action(act.id).state == "compensated"
            else:
                with pytest.raises(walstore.CompensationFailed, match="instead of running"):
                    tx.rollback()
                assert s.get_action(act.id).state == "failed"



# ---- close() beside rollbacks in other threads ---------------------------------------------
@pytest.mark.parametrize("shape", ["two threads", "nested"])
def test_close_counts_the_rollbacks_other_threads_run(tmp_path, monkeypatch, shape):
    """close() beside hung compensations: two threads each rolling back one transaction
    are 2 rollbacks; one thread whose compensator rolls back a second transaction (whose
    compensator hangs) is 1 (the nested one is part of it) — each compensation running is
    named, and each runs once more at the next open."""
    import walstore.store as store_module
    monkeypatch.setattr(store_module, "CLOSE_WAIT_S", 0.3)
    path = str(tmp_path / "s")
    gate = threading.Event()
    started = threading.Semaphore(0)
    runs: list = []
    box: dict = {}

    def hang(action):
        runs.append(action.id)
        started.release()
        gate.wait(20)

    def outer(action):  # (nested: rolls back a transaction of its own)
        runs.append(action.id)
        tx = box["s"].transaction()
        with tx.action("inner", compensate="hang") as a:
            a.result = 1
        tx.rollback()

    s = box["s"] = walstore.open(path, durability="none",
                                 compensators={"hang": hang, "outer": outer})
    txs = []
    for _ in range(2 if shape == "two threads" else 1):
        tx = s.transaction()
        with tx.action("charge", compensate="hang" if shape == "two threads" else "outer") \
                as act:
            act.result = 1
        txs.append(tx)
    errors: list = []

    def roll_back(tx):
        try:
            tx.rollback()
        except walstore.WalstoreError as e:
            errors.append(e)

    threads = [threading.Thread(target=roll_back, args=(tx,)) for tx in txs]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert started.acquire(timeout=10)
        with pytest.warns(RuntimeWarning) as seen:
            s.close()
        (msg,) = [str(w.message) for w in seen]
        want = 2 if shape == "two threads" else 1
        assert f"{want} rollback(s)" in msg, msg
        assert "compensation(s) ['1.1', '2.1']" in msg, msg
    finally:
        gate.set()
        for t in threads:
            t.join(20)
    assert len(errors) == len(threads)
    before = len(runs)
    with walstore.open(path, compensators={"hang": lambda a: runs.append(a.id),
                                           "outer": lambda a: runs.append(a.id)}) as s2:
        assert len(runs) - before >= 2
        assert s2.pending_compensations() == []


# ---- scans across a purge: only what is left of the range counts ----------------------------
_KEYS = [f"{c}/{i:03d}" for c in "ab" for i in range(100)]
# (direction, bounds, the purge, what the scan must do) after 16 rows (the first chunk)
# were yielded: a/000..a/015 forward, a/099..a/084 reverse, a/010..a/025 from start=a/010
_CASES = [
    (False, "prefix", "a/014", "go"),      # passed
    (False, "prefix", "a/015", "either"),  # the last yielded (its prefix covers a/015...:
    #                                         what LMDB held there is gone — may stop)
    (False, "prefix", "a/016", "stop"),    # the next
    (False, "prefix", "a/01", "stop"),     # across the boundary
    (False, "prefix", "b/", "go"),         # outside
    (True, "prefix", "a/085", "go"),
    (True, "prefix", "a/084", "go"),
    (True, "prefix", "a/083", "stop"),
    (True, "prefix", "a/08", "stop"),
    (True, "prefix", "b/", "go"),
    (False, "bounds", "a/00", "go"),       # below start
    (False, "bounds", "a/024", "go"),
    (False, "bounds", "a/02", "stop"),
    (False, "bounds", "b/", "go"),         # past end
]


@pytest.mark.parametrize("in_lmdb", [True, False], ids=["lmdb", "memtable"])
@pytest.mark.parametrize("kind", ["store", "tx"])
def test_a_scan_across_a_purge_stops_only_for_keys_not_yet_passed(tmp_path, kind, in_lmdb):
    """A streaming scan (store.scan, tx.scan) that yielded its first chunk when a purge
    committed: one of keys it passed or outside its range lets it go on, giving exactly
    the snapshot's rows; one of a key not yet passed stops it (SnapshotTooOld) — it never
    yields a purged key, nor a state without one."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        for reverse, bounds, purge, want in _CASES:
            with s.transaction() as tx:
                tx.update({k: k for k in _KEYS})
            if in_lmdb:
                s.checkpoint()
            kw = ({"prefix": "a/"} if bounds == "prefix" else
                  {"start": "a/010", "end": "a/050"})
            snap = sorted((k for k in _KEYS if k.startswith("a/") and (
                bounds == "prefix" or "a/010" <= k < "a/050")), reverse=reverse)
            tx = s.transaction()
            rows = (tx if kind == "tx" else s).scan(reverse=reverse, **kw)
            head = [next(rows) for _ in range(16)]
            assert [k for k, _v in head] == snap[:16]
            s.purge(purge)
            case = (reverse, bounds, purge)
            try:
                rest = list(rows)
            except walstore.ConflictError as e:
                assert want != "go", (case, e)
                assert isinstance(e, walstore.SnapshotTooOld), case
            else:
                assert want != "stop", (case, rest[:3])
                assert head + rest == [(k, k) for k in snap], case
            tx.rollback()
            assert not any(k.startswith(purge) for k, _v in s.scan())


_SCANNER = """
import json, sys, walstore
r = walstore.open(sys.argv[1], readonly=True)
rows = r.scan(prefix="a/", reverse=sys.argv[2] == "1")
print(json.dumps([next(rows)[0] for _ in range(16)]), flush=True)
sys.stdin.readline()
try:
    print(json.dumps({"rest": [k for k, _v in rows]}), flush=True)
except walstore.WalstoreError as e:
    print(json.dumps({"err": type(e).__name__}), flush=True)
"""


@pytest.mark.parametrize("reverse", [False, True])
def test_a_readers_scan_beside_a_writers_purge_stops_only_for_keys_not_yet_passed(
        tmp_path, reverse):
    """A read-only process's scan (rows in LMDB) across the live writer's purge: of keys
    it passed, it goes on and gives the snapshot's rows; of keys ahead, SnapshotTooOld."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="full") as w:
        for passed, want in ((True, "rest"), (False, "err")):
            with w.transaction() as tx:
                tx.update({k: 1 for k in _KEYS})
            w.checkpoint()
            rd = subprocess.Popen([sys.executable, "-c", _SCANNER, path,
                                   "1" if reverse else "0"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=cli_env())
            try:
                head = json.loads(rd.stdout.readline())
                w.purge(head[5] if passed else ("a/05"))
                rd.stdin.write("\n")
                rd.stdin.flush()
                out = json.loads(rd.stdout.readline())
            finally:
                rd.stdin.close()
                rd.wait(30)
            snap = sorted((k for k in _KEYS if k.startswith("a/")), reverse=reverse)
            assert list(out) == [want], out
            if passed:
                assert head + out["rest"] == snap
            else:
                assert out["err"] == "SnapshotTooOld"


class _SlowFsync(_OnFsync):
    """While armed, the main thread's next WAL fsync starts ``then`` in another thread
    and lets it run 0.3 s before the fsync goes on (not joined, as _OnFsync's is: ``then``
    may wait for this very fsync)."""

    thread: threading.Thread | None = None

    def _maybe(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        then, self.then = self.then, None
        if then is not None:
            self.thread = threading.Thread(target=then)
            self.thread.start()
            time.sleep(0.3)


def _owner_in_the_fsync(backend: _SlowFsync, call) -> list:
    """Arm ``backend`` to run ``call`` (the owner's ``tx.commit`` or ``tx.rollback``) in
    another thread during the next WAL fsync; the list returned gets what it returned or
    the WalstoreError it raised."""
    out: list = []

    def own():
        try:
            out.append(call())
        except walstore.WalstoreError as e:
            out.append(e)

    backend.then = own
    return out


@pytest.mark.parametrize("owner", ["commit", "rollback"])
def test_an_owners_commit_beside_a_commit_prepared_being_made_durable_ends_committed(
        tmp_path, owner):
    """The owner's ``tx.commit()`` while another caller's ``store.commit_prepared(gid)``
    waits for its COMMIT's fsync: it raised UnknownGid ("another caller's decision of it
    is being made durable") and left the transaction "active", no LSN, though it
    committed (the Zope data manager's tpc_finish re-raises an UnknownGid that leaves it
    not committed: the package then aborts the resources after it beside walstore's
    commit).  Its commit() or rollback() waits for that decision now and ends the
    transaction committed, with the commit's LSN (UnknownGid saying another caller
    decided it)."""
    backend = _SlowFsync()
    old = fileio.set_backend(backend)
    try:
        with walstore.open(str(tmp_path / "s"), durability="full") as s:
            tx = _prepared(s, action=False)
            out = _owner_in_the_fsync(backend, getattr(tx, owner))
            lsn = s.commit_prepared("g1")
            backend.thread.join(10)
            (got,) = out
            assert isinstance(got, walstore.UnknownGid) and "committed" in str(got), got
            assert tx.state == "committed" and tx.lsn == lsn
    finally:
        fileio.set_backend(old)
