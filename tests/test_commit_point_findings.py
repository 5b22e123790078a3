"""Issue 10 ("one commit point"): a regression test for each of its twelve findings.

Each test is named after the promise the finding broke and reproduces the finding the way
the issue describes it, against real files: faults go through walstore.fileio's seam
(tools/faults.py: WAL writes and syncs, LMDB commits, the named place between the commit
point and the return), and where a crash matters a real child process
(tests/findings_scripts/commit_point_child.py) is killed with SIGKILL before the store is
reopened.  A read-only follower runs in its own process.

After every fault, the state and the action log must agree (``assert_agree``): a charge
whose ``paid/<key>`` is visible belongs to a ``committed`` action and was never refunded;
a charge that is not visible was compensated exactly once, counted in an idempotency-keyed
payment ledger (tests/agent_scripts/ws_ledger.py) and a log of compensator calls.

Bugs these tests found were fixed in the core; each keeps its test here.  No test
asserts on timing: costs are measured as work done (Python lines run
for a commit, bytes written on the commit path, WAL segments kept, rows in memory).
"""
from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

import walstore
from walstore.engine.lmdb_state import from_u64
from walstore.log.segment import SPARE_NAME, list_segments
from tools.faults import FaultBackend, installed

TESTS = Path(__file__).resolve().parent
LEDGER_SCRIPTS = TESTS / "agent_scripts"
SCRIPTS = TESTS / "findings_scripts"
if str(LEDGER_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(LEDGER_SCRIPTS))

import ws_ledger  # noqa: E402
import ws_ledger_handlers  # noqa: E402
from test_actions_crash import Child as ActionChild  # noqa: E402

COMPS = dict(ws_ledger_handlers.COMPENSATORS)  # "refund": the ledger refund, noted in calls


# ---- the outside world: a payment ledger, and what the store says about it ------------------
class World:
    """A store path, its payment ledger and the log of compensator calls."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = str(tmp / "store")
        self.ledger = str(tmp / "ledger.jsonl")
        self.calls = str(tmp / "calls.jsonl")

    def args(self, amount: int) -> dict:
        return {"ledger": self.ledger, "calls": self.calls, "amount": amount}

    def charge(self, tx, amount: int, write: bool = True) -> walstore.Action:
        """An action that charges ``amount`` (compensated by a refund) and, with ``write``,
        the state that records it: ``paid/<idempotency key>``."""
        with tx.action("charge", args=self.args(amount), compensate="refund") as act:
            act.result = ws_ledger.charge(self.ledger, act.key, amount)
        if write:
            tx.put(f"paid/{act.key}", amount)
        return act

    def refunds(self, key: str) -> int:
        return ws_ledger.count(self.ledger, "refund", key)

    def charges(self, key: str) -> int:
        return ws_ledger.count(self.ledger, "charge", key)

    def calls_for(self, key: str) -> list[dict]:
        return [c for c in ws_ledger.records(self.calls) if c["key"] == key]


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


def assert_agree(store: walstore.Store, w: World, once: bool = True) -> dict:
    """State and the action log agree with the outside world (see the module docstring).

    ``once``: each compensated action's compensator ran exactly once (False after a crash
    inside a compensator: it may run again, with the same idempotency key, which the
    ledger honours).  Returns {state: [ids]}.
    """
    committed = {i.txid for i in store.log()}
    actions = store.actions()
    by_state: dict[str, list[str]] = {}
    for a in actions:
        by_state.setdefault(a.state, []).append(a.id)
        visible = store.get(f"paid/{a.key}")
        charged, refunds = w.charges(a.key), w.refunds(a.key)
        calls = w.calls_for(a.key)
        where = f"action {a.id} ({a.state}), visible={visible!r}, charged={charged}, " \
                f"refunds={refunds}, compensator calls={len(calls)}"
        assert charged <= 1, where
        if visible is not None:
            assert a.state == "committed", where
            assert a.txid in committed, where
            assert refunds == 0 and calls == [], where
        else:
            assert a.state == "compensated", where
            assert refunds == charged, where
            assert (len(calls) == 1) if once else (len(calls) >= 1), where
    known = {a.key for a in actions}
    for rec in ws_ledger.records(w.ledger):
        assert rec["key"] in known, f"the ledger holds {rec} which no action of the store owns"
    return by_state


def wait_until(cond, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def state_of(store: walstore.Store) -> dict:
    """Everything a user can see of a store (to prove that something changed nothing)."""
    return {"data": list(store.scan()),
            "log": [(i.txid, int(i.lsn), i.keys) for i in store.log()],
            "points": {n: int(p) for n, p in store.restore_points().items()},
            "actions": [(a.id, a.state) for a in store.actions()]}


# ---- child processes ------------------------------------------------------------------------
class Child(ActionChild):
    """A script of tests/findings_scripts in a subprocess: test_actions_crash's Child
    (stdout lines read with deadlines, SIGKILL, stderr kept), for any script."""

    def __init__(self, tmp: Path, script: Path, *args: str) -> None:
        # not super().__init__(), which starts action_child.py: the same fields, any script
        self.stderr_path = tmp / f"{script.stem}.{time.monotonic_ns()}.err"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(script), *args],
                                     stdout=subprocess.PIPE, stderr=self._err)
        self._buf = b""

    def doc(self, word: str, timeout: float = 30) -> dict | None:
        """The next stdout line, which must be ``WORD [json]``; returns the JSON."""
        rest = self.line(word, words=1, timeout=timeout)
        return json.loads(rest[0]) if rest else None


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m walstore ARGS`` in a child process (the real command line, of the tree
    under test; ``--handlers ws_ledger_handlers`` importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS.parent), str(LEDGER_SCRIPTS)] + ([env["PYTHONPATH"]]
                                                    if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, env=env, timeout=120)


# ---- 1 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["applier-lmdb-commit-error", "applier-lmdb-sync-error",
                                   "oserror-at-point", "runtime-error-at-point"])
def test_applier_failure_never_turns_a_commit_into_a_reported_failure(w, fault):
    """Finding 1: after the commit point an LMDB (applier) failure, or any error, never
    makes ``commit()`` fail: no compensation runs, the write is visible, survives reopen,
    and its action stays ``committed``.  A commit that meets the failure *before* its point
    of no return is refused before anything is logged, and an action begun earlier is
    compensated exactly once, by the next open."""
    fb = FaultBackend()
    with installed(fb):
        store = walstore.open(w.path, compensators=COMPS, apply_interval=0.01,
                              checkpoint_bytes=64 * 1024)
        with store.transaction() as tx:  # earlier state, applied before any fault
            early = w.charge(tx, 5)
        store.checkpoint()
        begun = store.transaction(meta={"step": "begun before the failure"})
        begun_act = w.charge(begun, 3)

        tx = store.transaction(meta={"step": "pay"})
        act = w.charge(tx, 40)
        if fault.startswith("applier-"):
            # the background applier's LMDB commit (or the sync of the checkpoint it runs
            # after this big commit) fails while this commit is between its point of no
            # return and its return: it waits there until the store has noticed
            tx.put("bulk", "x" * 70_000)
            fb.fail_lmdb("commit" if "commit" in fault else "sync", times=None)
            fb.at_point("commit.after_durable",
                        lambda _name: wait_until(lambda: store.stats()["failure"],
                                                 "the applier's failure"))
        elif fault == "oserror-at-point":
            fb.at_point("commit.after_durable", OSError(errno.EIO, "injected EIO"))
        else:
            fb.at_point("commit.after_durable", RuntimeError("injected"))
        lsn = tx.commit()  # must not raise

        assert lsn is not None and tx.state == "committed" and tx.lsn == lsn
        assert store.get(f"paid/{act.key}") == 40
        assert store.get_action(act.id).state == "committed"
        assert w.refunds(act.key) == 0 and w.calls_for(act.key) == []
        assert store.log(limit=1)[0].txid == tx.id
        failed = fault != "runtime-error-at-point"
        assert bool(store.stats()["failure"]) == failed
        if not fault.startswith("applier-"):
            assert store.stats()["background_errors"], "the contained error is not surfaced"
        injected = [c.op for c in fb.calls_to(("lmdb_commit", "lmdb_sync")) if c.injected]
        if fault.startswith("applier-"):  # the fault hit where it was meant to
            assert injected[:1] == ["lmdb_commit" if "commit" in fault else "lmdb_sync"]
        else:
            assert injected == []
        if failed:
            # the order: a failure in the background, *then* a commit with an
            # action: refused before its intent is logged, so nothing is charged
            later = store.transaction()
            with pytest.raises(walstore.ReadOnlyError):
                later.action("charge", args=w.args(9), compensate="refund")
            later.rollback()
            # a transaction whose action ran before the failure cannot commit any more;
            # its compensation is owed in the log (nothing can be recorded now)
            with pytest.raises(walstore.ReadOnlyError):
                begun.commit()
            assert w.refunds(begun_act.key) == 0
        else:
            begun.rollback()
        store.close()

    with walstore.open(w.path, compensators=COMPS) as store:
        assert store.get(f"paid/{act.key}") == 40
        assert store.get(f"paid/{early.key}") == 5
        assert store.get_action(act.id).state == "committed"
        assert store.get_action(begun_act.id).state == "compensated"
        assert store.pending_compensations() == []
        assert_agree(store, w)
        assert len(ws_ledger.records(w.ledger)) == 4  # 3 charges, 1 refund (the begun one)


# ---- 2 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("power_loss", [False, True], ids=["record-kept", "record-lost"])
def test_fsync_error_on_a_commit_record_compensates_nothing_until_recovery_decides(w, power_loss):
    """Finding 2: the commit record's fsync fails (EIO) -> ``CommitOutcomeUnknown``, the
    store turns read-only and NO compensation runs.  The process is then killed.  The next
    open decides: the record survived (kill -9 keeps the page cache) -> committed, never
    refunded; the record was lost (a power loss drops its unsynced bytes, zeroed here) ->
    a loser, compensated exactly once by that open."""
    marker = w.tmp / "marker"
    child = Child(w.tmp, SCRIPTS / "commit_point_child.py", "fsync-unknown", w.path, w.ledger,
                  w.calls, str(marker))
    try:
        info = child.doc("UNKNOWN")
        seen = child.doc("CHECKED")
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL, child.stderr()
    assert info["error"] == "CommitOutcomeUnknown", info
    assert info["tx_state"] == "outcome unknown", info
    assert info["writes"] == 1, info  # the commit record, all the commit wrote
    # nothing was compensated while the outcome was unknown, and the store took no writes
    assert seen["refunds"] == 0 and seen["calls"] == 0, seen
    assert seen["pending"] == [], seen
    assert seen["takes_writes"] is False, seen
    key = info["key"]
    assert w.charges(key) == 1 and w.refunds(key) == 0

    if power_loss:  # the commit record's bytes never reached the disk
        fd = os.open(info["path"], os.O_RDWR)
        try:
            os.pwrite(fd, bytes(info["size"]), info["offset"])
            os.fsync(fd)
        finally:
            os.close(fd)

    with walstore.open(w.path, compensators=COMPS) as store:
        rep = store.last_recovery
        action = store.get_action(info["id"])
        if power_loss:
            assert rep.losers == [info["txid"]], rep
            assert store.get(f"paid/{key}") is None
            assert action.state == "compensated"
            assert w.refunds(key) == 1 and len(w.calls_for(key)) == 1
        else:
            assert rep.losers == [], rep
            assert store.get(f"paid/{key}") == 40
            assert action.state == "committed"
            assert info["txid"] in [i.txid for i in store.log()]
            assert w.refunds(key) == 0 and w.calls_for(key) == []
        assert store.pending_compensations() == []
        assert_agree(store, w)
    ledger = ws_ledger.records(w.ledger)
    with walstore.open(w.path, compensators=COMPS) as store:  # deciding again changes nothing
        assert_agree(store, w)
    assert ws_ledger.records(w.ledger) == ledger


# ---- 3 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["newer-before", "older-before", "older-after"])
def test_crash_inside_rollback_prepared_compensator_leaves_it_pending_not_forgotten(w, where):
    """Finding 3: ``rollback_prepared`` of a prepared transaction with two charging
    actions (compensated newest first); the process is SIGKILLed inside a compensator:
    the newer one's before its refund (right after the decision), or the older one's
    before or after its refund.  The decision is durable (not in doubt any more, writes
    discarded); what was compensated and recorded stays so; what was not is listed as
    owed (open without the compensator), then compensated by the next open with it:
    each charge refunded exactly once."""
    marker = w.tmp / "marker"
    child = Child(w.tmp, SCRIPTS / "commit_point_child.py", f"rollback-prepared-{where}",
                  w.path, w.ledger, w.calls, str(marker))
    try:
        p = child.doc("PREPARED")
        child.wait_file(marker)
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL, child.stderr()
    (a1, key1), (a2, key2) = p["a1"], p["a2"]
    refunded = {"newer-before": (0, 0), "older-before": (0, 1), "older-after": (1, 1)}[where]
    assert (w.refunds(key1), w.refunds(key2)) == refunded
    owed = [a2, a1] if where == "newer-before" else [a1]

    with walstore.open(w.path) as store:  # no compensator registered: listed, not lost
        assert store.prepared() == [] and store.decision("g") == "abort"
        assert [a.id for a in store.pending_compensations()] == owed
        if where != "newer-before":
            assert store.get_action(a2).state == "compensated"
        assert store.get(f"paid/{key1}") is None and store.get(f"paid/{key2}") is None
    assert (w.refunds(key1), w.refunds(key2)) == refunded  # listing ran nothing

    with walstore.open(w.path, compensators=COMPS) as store:
        assert store.get_action(a1).state == "compensated"
        assert store.get_action(a2).state == "compensated"
        assert store.pending_compensations() == []
        assert_agree(store, w, once=False)
    assert w.refunds(key1) == 1 and w.refunds(key2) == 1
    if where != "newer-before":
        assert len(w.calls_for(key2)) == 1  # the recorded compensation never ran again


# ---- 4 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("decide", ["in-process", "after-crash"])
def test_prepared_transaction_refuses_new_actions(w, decide):
    """Finding 4: after ``tx.prepare()``, ``tx.action()`` (and any write) is refused before
    an intent is logged, so the prepared record holds every action of the transaction and
    ``rollback_prepared`` (here or after a crash) compensates all of them, once."""
    store = walstore.open(w.path, compensators=COMPS)
    tx = store.transaction()
    first = w.charge(tx, 40)
    tx.prepare("g")
    with pytest.raises(walstore.TransactionClosed):
        tx.action("charge", args=w.args(60), compensate="refund")
    with pytest.raises(walstore.TransactionClosed):
        tx.put("paid/late", 60)
    assert [a.id for a in store.actions()] == [first.id]
    assert store.prepared_details("g").actions == [first.id]
    assert len(ws_ledger.records(w.ledger)) == 1
    if decide == "after-crash":
        store._drop_like_a_crash()
        store = walstore.open(w.path, compensators=COMPS)
        assert store.prepared() == ["g"]
    store.rollback_prepared("g")
    assert store.get_action(first.id).state == "compensated"
    assert_agree(store, w)
    store.close()
    with walstore.open(w.path, compensators=COMPS) as store:
        assert_agree(store, w)
    assert len(ws_ledger.records(w.ledger)) == 2


# ---- 5 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("undoers,writes", [
    (("revert", "revert"), False),
    (("revert", "revert"), True),
    (("revert", "rewind"), False),
    (("revert", "rewind"), True),
    (("rewind", "rewind"), False),
    (("rewind", "rewind"), True),
], ids=["revert-revert-action-only", "revert-revert", "revert-rewind-action-only",
        "revert-rewind", "rewind-rewind-action-only", "rewind-rewind"])
def test_concurrent_reverts_compensate_an_action_exactly_once(w, monkeypatch, undoers, writes):
    """Finding 5: two undoers (revert / rewind) of a committed transaction that ran an
    action (only that, or that and a write) race.  First both plan to compensate it and
    reach the commit pipeline together (held at a barrier until both are there): exactly
    one commits and compensates; the other conflicts (it claims an action already
    claimed, or read what the winner changed), plans again after the winner and finds
    nothing left to undo (or, a revert of keys the winner changed, RevertConflict).  Then four undoers race freely.  Each time
    the refund runs once and one commit claims the action."""
    store = walstore.open(w.path, compensators=COMPS)
    pipeline = store._engine.pipeline
    real_commit = pipeline.commit
    gate = {"barrier": None}

    def commit(req):  # test instrumentation: hold undoers until both have planned
        barrier = gate["barrier"]
        if barrier is not None and req.claims:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return real_commit(req)

    monkeypatch.setattr(pipeline, "commit", commit)

    def undo(kind: str, txid: int, point: str, outcomes: list, infos: list) -> None:
        try:
            infos.append(store.revert(txid) if kind == "revert" else store.rewind(point))
            outcomes.append("ok")
        except (walstore.ConflictError, walstore.RevertConflict) as e:
            outcomes.append(type(e).__name__)

    for i, free in enumerate([False, True]):
        store.restore_point(f"before-{i}")
        with store.transaction() as tx:
            act = w.charge(tx, 10 + i, write=writes)
        store.checkpoint()  # as any later undo finds it: applied to LMDB
        gate["barrier"] = None if free else threading.Barrier(2, timeout=5)
        outcomes: list[str] = []
        infos: list = []
        threads = [threading.Thread(target=undo,
                                    args=(k, tx.id, f"before-{i}", outcomes, infos))
                   for k in (undoers * 2 if free else undoers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        if not free:
            # the loser conflicted, planned again with other commits held out, and answered
            # as an undo run after the winner would: nothing left to undo (None), or a
            # revert whose keys the winner has changed since (RevertConflict)
            assert len([i for i in infos if i is not None]) == 1, outcomes
            assert "ConflictError" not in outcomes, outcomes
            if writes and undoers == ("revert", "revert"):
                assert sorted(outcomes) == ["RevertConflict", "ok"], outcomes
        assert store.get_action(act.id).state == "compensated", outcomes
        assert w.refunds(act.key) == 1 and len(w.calls_for(act.key)) == 1
        claims = [a for info in infos if info is not None
                  for a in info.extra.get("compensate", ())]
        assert claims.count(act.id) == 1, claims  # one undoer claimed it, in its COMMIT
    assert_agree(store, w)
    store.close()


def test_rewind_undoes_a_transaction_that_only_ran_an_action(w):
    """Found while testing finding 5: a committed transaction whose only effect is an
    action (no key written) stays in ``store.log()`` once applied, and so does the revert
    that compensates it (it writes no key either); ``rewind`` to a point before such a
    transaction compensates its action, once."""
    with walstore.open(w.path, compensators=COMPS) as store:
        with store.transaction() as tx:
            reverted = w.charge(tx, 5, write=False)
        undo = store.revert(tx.id)
        store.checkpoint()
        assert [i.txid for i in store.log()] == [undo.txid, tx.id]
        store.restore_point("before")
        with store.transaction() as tx:
            act = w.charge(tx, 10, write=False)
        store.checkpoint()
        assert [i.txid for i in store.log(limit=1)] == [tx.id]
        info = store.rewind("before")
        assert info is not None and info.extra.get("compensate") == [act.id]
        assert store.get_action(act.id).state == "compensated"
        assert w.refunds(act.key) == 1 and w.refunds(reverted.key) == 1


# ---- 6 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_open", ["open", "recover-cli"])
def test_opening_a_backup_never_runs_compensations_of_the_source(w, first_open):
    """Finding 6: ``walstore backup`` (a real child process) copies a store while two of
    its transactions are in flight with charges.  The source then commits one and rolls
    back the other (refunding it).  Opening the copy — by ``walstore.open`` with the
    compensator registered, or by ``walstore recover --handlers`` — runs neither
    compensation: both are listed as owed and held; the ledger shows only the source's
    one refund."""
    dest = str(w.tmp / "copy")
    source = walstore.open(w.path, compensators=COMPS)
    with source.transaction() as tx:
        settled = w.charge(tx, 5)
    stays = source.transaction(meta={"step": "committed after the copy"})
    stays_act = w.charge(stays, 40)
    undone = source.transaction(meta={"step": "rolled back after the copy"})
    undone_act = w.charge(undone, 2)

    out = cli("backup", w.path, dest)
    assert out.returncode == 0, out.stderr
    stays.commit()
    undone.rollback()
    assert source.get(f"paid/{stays_act.key}") == 40
    assert_agree(source, w)
    source.close()
    ledger = ws_ledger.records(w.ledger)
    assert [r["op"] for r in ledger] == ["charge", "charge", "charge", "refund"]

    if first_open == "recover-cli":
        out = cli("recover", dest, "--handlers", "ws_ledger_handlers")
        assert out.returncode == 1, out.stdout + out.stderr  # owed compensations listed
        assert stays_act.id in out.stdout and undone_act.id in out.stdout, out.stdout
    for _ in range(2):  # the first open of the copy, and a later one
        with walstore.open(dest, compensators=COMPS) as copy:
            owed = {a.id: a for a in copy.pending_compensations()}
            assert set(owed) == {stays_act.id, undone_act.id}
            assert all(a.held for a in owed.values())
            assert [a.id for a in copy.retry_compensations()] == \
                [a.id for a in copy.pending_compensations()]  # held: not run by a retry
            assert copy.get_action(settled.id).state == "committed"
            assert copy.get(f"paid/{settled.key}") == 5
            assert copy.get(f"paid/{stays_act.key}") is None  # in flight at the copy
    assert ws_ledger.records(w.ledger) == ledger  # the copy ran nothing
    assert len(ws_ledger.records(w.calls)) == 1   # only the source's own rollback


# ---- 7 ---------------------------------------------------------------------------------------
def _five_transactions(w: World) -> None:
    with walstore.open(w.path, compensators=COMPS) as store:
        for i in range(5):
            with store.transaction(meta={"step": i}) as tx:
                tx.put(f"k/{i}", i)
                if i == 2:
                    w.charge(tx, 20)
        never = store.transaction()  # txid 6 exists but never commits
        never.put("k/never", 6)
        never.rollback()
        assert never.id == 6 and [i.txid for i in store.log()] == [5, 4, 3, 2, 1]


def test_unknown_txid_or_lsn_raises_unknown_point_and_changes_nothing(w):
    """Finding 7: ``rewind(6)`` where txid 6 never committed, a txid or LSN past the end,
    negative numbers, an unknown name: each raises ``UnknownPoint`` (a KeyError) naming the
    point, from ``rewind`` (also dry-run and scoped), ``at`` and ``revert``, and changes
    nothing — not the state, the log, the actions, nor one byte of the WAL.  The command
    line too: ``walstore rewind PATH --to tx:40`` on a store with 5 transactions is a usage
    error (exit 2, one line naming the point) and the store is unchanged."""
    _five_transactions(w)
    store = walstore.open(w.path, compensators=COMPS)
    before = state_of(store)
    wal_end = store.stats()["wal_end_lsn"]
    points = [6, 40, walstore.LSN(wal_end + 1), walstore.LSN(10 ** 9), walstore.LSN(-1),
              -1, 0, "nope"]
    calls = {"rewind": lambda p: store.rewind(p),
             "rewind-dry-run": lambda p: store.rewind(p, dry_run=True),
             "rewind-scoped": lambda p: store.rewind(p, scope="k/"),
             "at": lambda p: store.at(p).get("k/0"),
             "revert": lambda p: store.revert(p)}
    for p in points:
        for name, call in calls.items():
            if name == "revert" and (not isinstance(p, int) or isinstance(p, walstore.LSN)
                                     or p < 0):
                continue  # revert takes a txid; negative txids: see the test below
            with pytest.raises(walstore.UnknownPoint) as err:
                call(p)
            assert isinstance(err.value, KeyError)
            assert str(int(p) if isinstance(p, int) else p) in str(err.value), (name, p)
    assert state_of(store) == before
    assert store.stats()["wal_end_lsn"] == wal_end  # not even an ABORT record
    assert w.refunds(store.actions()[0].key) == 0
    store.close()

    with walstore.open(w.path) as store:
        before = state_of(store)
    for to in ("tx:40", "tx:6", "40", "lsn:99999999", "nope"):
        for extra in ((), ("--dry-run",), ("--json",)):
            out = cli("rewind", w.path, "--to", to, *extra)
            assert out.returncode == 2, (to, extra, out.stdout, out.stderr)
            assert "Traceback" not in out.stderr, (to, out)
            if "--json" in extra:  # a failing --json command's one document
                assert json.loads(out.stdout)["error"]["type"] == "UnknownPoint"
            else:
                assert out.stdout == "", (to, out)
            assert len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert to.split(":")[-1] in out.stderr, out.stderr
    with walstore.open(w.path) as store:
        assert state_of(store) == before
        assert [i.txid for i in store.log()] == [5, 4, 3, 2, 1]
    assert [r["op"] for r in ws_ledger.records(w.ledger)] == ["charge"]


def test_out_of_range_txids_raise_unknown_point_not_a_foreign_error(w):
    """Finding 7's promise at the edges of the txid space: a negative txid or one past
    2**64 names nothing, so it raises ``UnknownPoint``, never ``struct.error`` or
    ``TypeError``, and changes nothing; the CLI says so as a usage error."""
    _five_transactions(w)
    with walstore.open(w.path, compensators=COMPS) as store:
        before = state_of(store)
        wal_end = store.stats()["wal_end_lsn"]
        for call in (lambda: store.revert(-1), lambda: store.txn_info(-1),
                     lambda: store.at(2 ** 64), lambda: store.rewind(2 ** 64),
                     lambda: store.revert(2 ** 64), lambda: store.txn_info(2 ** 64)):
            with pytest.raises(walstore.UnknownPoint):
                call()
        assert state_of(store) == before and store.stats()["wal_end_lsn"] == wal_end
    out = cli("rewind", w.path, "--to", f"tx:{2 ** 64}")
    assert out.returncode == 2, out.stderr


@pytest.mark.parametrize("point", [1.0, 2.5, True, None, [1], b"p1", float("nan")])
def test_a_point_of_a_type_that_names_nothing_is_unknown_point_and_type_error(w, point):
    """A float, bool, None, list or bytes names no point: ``UnknownPoint`` (the contract's
    "anything that names nothing") that is also a ``TypeError`` (the wrong type), from
    rewind, at, revert and dry runs alike, and nothing changes."""
    _five_transactions(w)
    with walstore.open(w.path, compensators=COMPS) as store:
        store.restore_point("p1")
        before = state_of(store)
        wal_end = store.stats()["wal_end_lsn"]
        for call in (lambda: store.rewind(point), lambda: store.at(point),
                     lambda: store.rewind(point, dry_run=True), lambda: store.revert(point)):
            with pytest.raises(walstore.UnknownPoint) as err:
                call()
            assert isinstance(err.value, TypeError)
        assert state_of(store) == before and store.stats()["wal_end_lsn"] == wal_end


# ---- 8 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("other_commit", ["unapplied", "applied"])
def test_transaction_reads_come_from_one_snapshot(w, other_commit):
    """Finding 8: a=50, b=50; T reads a; another transaction commits a=0, b=100 (and
    creates c) — still in the MemTable, or applied to LMDB by a checkpoint; T then reads b,
    ``in``, scans (both directions): all from T's snapshot, a total of 100, never 150.  An
    action T runs acts on 100; T's commit conflicts and the action is compensated once.
    A read-only transaction likewise; a transaction whose first read comes after the other
    commit sees it whole."""
    store = walstore.open(w.path, compensators=COMPS)
    with store.transaction() as tx:
        tx.update({"acct/a": 50, "acct/b": 50})
    t = store.transaction(meta={"step": "reads"})
    ro = store.transaction()
    late = store.transaction()  # begun now, first read after the other commit
    assert t.get("acct/a") == 50 and ro.get("acct/a") == 50
    with store.transaction() as other:
        other.update({"acct/a": 0, "acct/b": 100, "acct/c": 7})
    if other_commit == "applied":
        store.checkpoint()
    for reader in (t, ro):
        assert reader.get("acct/b") == 50
        assert "acct/c" not in reader and reader.get("acct/c") is None
        assert dict(reader.scan(prefix="acct/")) == {"acct/a": 50, "acct/b": 50}
        assert [k for k, _v in reader.scan(prefix="acct/", reverse=True)] == \
            ["acct/b", "acct/a"]
    assert dict(late.scan(prefix="acct/")) == {"acct/a": 0, "acct/b": 100, "acct/c": 7}
    late.commit()

    total = t.get("acct/a") + t.get("acct/b")
    assert total == 100
    act = w.charge(t, total)  # an action run on what T saw
    assert act.args["amount"] == 100
    with pytest.raises(walstore.ConflictError):
        t.commit()
    with pytest.raises(walstore.ConflictError):
        ro.commit()
    assert store.get_action(act.id).state == "compensated"
    assert sum(v for _k, v in store.scan(prefix="acct/") if _k != "acct/c") == 100
    assert_agree(store, w)
    store.close()


# ---- 9 ---------------------------------------------------------------------------------------
def _lines_run(fn) -> int:
    """Python lines executed by ``fn()`` in this thread: the work it does, as a count."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def _probe_commit_work(store: walstore.Store, n: int) -> int:
    """The work of one small read-scan-write commit (its commit() call only)."""
    tx = store.transaction()
    tx.get("probe/x")
    list(tx.scan(prefix="probe/"))
    tx.put("probe/x", n)
    return _lines_run(tx.commit)


def _inflight_txids(store: walstore.Store) -> set[int]:
    """LMDB's table of transactions with logged intents that have not ended."""
    st = store._engine.state
    with st.read() as txn:
        return {from_u64(k) for k, _v in txn.cursor(db=st.inflight)}


def test_one_open_transaction_costs_other_commits_nothing(w):
    """Finding 9: one transaction held open (it read, and ran an action), one leaked
    (garbage-collected without commit or rollback) and one committed through
    ``commit_prepared``; then 70,000 distinct keys are written.  Other commits do the same
    work as with nothing open (Python lines run per commit, measured before and after);
    nothing stays in memory for them; WAL trimming goes past their intents and the
    PREPARE; ``commit_prepared`` leaves nothing in flight; the open one still commits;
    after a crash only the leaked one is a loser, compensated exactly once."""
    store = walstore.open(w.path, durability="none", compensators=COMPS,
                          segment_size=64 * 1024, apply_interval=86400)
    with store.transaction() as tx:
        tx.update({"acct/a": 1, "probe/x": 0})
    store.checkpoint()
    baseline = [_probe_commit_work(store, n) for n in range(3)]
    store.checkpoint()
    baseline.append(_probe_commit_work(store, 3))

    held = store.transaction(meta={"step": "thinking"})
    held.get("acct/a")
    held_act = w.charge(held, 10)

    def leak() -> tuple[walstore.Action, weakref.ref, int]:
        t = store.transaction(meta={"step": "leaked"})
        t.get("acct/a")
        return w.charge(t, 20), weakref.ref(t), t.id
    leaked_act, leaked_ref, leaked_txid = leak()
    gc.collect()
    assert leaked_ref() is None, "the leaked transaction is still referenced"

    prepared = store.transaction(meta={"step": "two-phase"})
    prepared_act = w.charge(prepared, 30)
    prepared.prepare("g")
    prepare_end = store.stats()["wal_end_lsn"]
    store.commit_prepared("g")
    assert store.prepared() == []

    for i in range(70):
        with store.transaction() as tx:
            tx.get("acct/a")
            tx.update({f"bulk/{i:02d}/{j:04d}": j for j in range(1000)})
    store.checkpoint()
    after = [_probe_commit_work(store, 10 + n) for n in range(3)]
    store.checkpoint()
    after.append(_probe_commit_work(store, 13))

    # the same work per commit as before anything was held open (not: growing with the
    # 70,000 keys written since the held transaction's snapshot)
    assert max(after) <= max(baseline) * 1.05 + 10, (baseline, after)
    store.checkpoint()
    mt = store._engine.memtable
    assert len(mt) == 0 and not mt.versions  # nothing kept for the open transactions
    segments = list_segments(os.path.join(w.path, "wal"))
    assert segments[0][0] > max(held_act.lsn, leaked_act.lsn, prepare_end), \
        (segments[0][0], held_act.lsn, leaked_act.lsn, prepare_end)
    assert store.stats()["wal_bytes"] <= 4 * 64 * 1024
    assert _inflight_txids(store) == {held.id, leaked_txid}  # not the committed 2PC one
    assert store.get_action(prepared_act.id).state == "committed"

    held.put("held/x", 1)
    held.commit()  # what it read was not changed: at worst it would conflict
    assert store.get_action(held_act.id).state == "committed"
    store._drop_like_a_crash()

    with walstore.open(w.path, compensators=COMPS) as store:
        assert store.last_recovery.losers == [leaked_txid]
        assert store.get_action(leaked_act.id).state == "compensated"
        assert store.get_action(prepared_act.id).state == "committed"
        assert_agree(store, w)
        assert _inflight_txids(store) == set()


# ---- 10 --------------------------------------------------------------------------------------
def _pair(store: walstore.Store, i: int) -> int:
    with store.transaction() as tx:
        tx.update({"f/a": i, "f/b": i, f"f/log/{i:06d}": i, "f/pad": "x" * 2500})
    return tx.lsn


def _assert_whole(view: dict, i: int | None = None) -> None:
    logs = [v for k, v in view.items() if k.startswith("f/log/")]
    assert view["f/a"] == view["f/b"] == max(logs), (view.get("f/a"), view.get("f/b"),
                                                     max(logs))
    if i is not None:
        assert view["f/a"] == i


def test_follower_never_shows_half_a_commit_when_segments_are_trimmed(w):
    """Finding 10: a read-only store follows a writer that commits pairs (plus a fresh key
    each) and checkpoints, trimming WAL segments.  First the exact window, in process:
    between the follower's look at LMDB and its read of the WAL, the writer commits and
    trims the segments the follower has not read.  Then a read-only store in another
    process reads (store.scan and read-only transactions) while the writer commits 300
    pairs and checkpoints every other commit.  Never half a commit; the follower keeps up
    and sees the last commit."""
    writer = walstore.open(w.path, durability="full", segment_size=8 * 1024,
                           apply_interval=86400)
    _pair(writer, 0)
    writer.checkpoint()
    follower = walstore.open(w.path, readonly=True)
    n = 0
    try:
        _assert_whole(dict(follower.scan(prefix="f/")), 0)
        log = follower._engine.follower.log
        real_poll = log.poll
        for window in (4, 6, 9):
            trimmed = {}

            def poll(applied, _window=window, _trimmed=trimmed):
                nonlocal n
                if not _trimmed:  # LMDB was looked at; the WAL not read yet
                    for _ in range(_window):
                        n += 1
                        _pair(writer, n)
                    _trimmed.update(writer.checkpoint())
                return real_poll(applied)
            n += 1
            unread = _pair(writer, n)  # logged, not applied: in a segment about to go
            log.poll = poll
            try:
                seen = dict(follower.scan(prefix="f/"))
            finally:
                log.poll = real_poll
            assert trimmed["segments_removed"] >= 1, trimmed
            first = list_segments(os.path.join(w.path, "wal"))[0][0]
            assert first > unread, (first, unread)  # its segment was trimmed, unread
            _assert_whole(seen)
            with follower.transaction() as tx:
                _assert_whole(dict(tx.scan(prefix="f/")))
            _assert_whole(dict(follower.scan(prefix="f/")), n)
    finally:
        follower.close()

    stop = w.tmp / "stop"
    child = Child(w.tmp, SCRIPTS / "follower_reader.py", w.path, str(stop))
    removed = 0
    try:
        assert child.doc("READY") is None
        for i in range(300):
            n += 1
            _pair(writer, n)
            if i % 2:
                removed += writer.checkpoint()["segments_removed"]
        stop.touch()
        done = child.doc("DONE", timeout=120)
    except BaseException:
        child.kill()
        raise
    child.proc.wait(timeout=30)
    child.kill()
    writer.close()
    assert done["bad"] == 0, (done, child.stderr())
    assert done["final"] and done["last"] == n, done  # it kept up, to the last commit
    assert done["distinct"] >= 5, done
    assert removed >= 50, removed


# ---- 11 --------------------------------------------------------------------------------------
def test_open_scan_never_blocks_map_growth(w):
    """Finding 11: with a tiny LMDB map (256 KiB), a ``store.scan`` and a transaction's
    scan are held open mid-way in one thread while another commits enough to grow the map
    many times over; the commits all go through while the scans stay open, and the scans,
    resumed afterwards, still show exactly the state as of their start."""
    store = walstore.open(w.path, durability="none", map_size=1 << 18)
    initial = {f"k/{i:04d}": i for i in range(600)}  # more than one scan chunk
    with store.transaction() as tx:
        tx.update(initial)
    store.checkpoint()
    map0 = store.stats()["lmdb_map_size"]
    holding = threading.Event()
    release = threading.Event()
    results = {}

    def reader():
        it = store.scan(prefix="k/")
        tx = store.transaction()
        txit = tx.scan(prefix="k/")
        firsts = [next(it), next(txit)]
        holding.set()
        release.wait(120)
        results["scan"] = [firsts[0]] + list(it)
        results["tx"] = [firsts[1]] + list(txit)
        tx.rollback()

    def writer():
        for r in range(40):
            with store.transaction() as tx:
                tx.update({k: -v for k, v in initial.items()})
                tx.update({f"big/{r:02d}/{j:02d}": "x" * 2000 for j in range(20)})
            store.checkpoint()  # apply now: the map must grow under the open scans
            results["commits"] = r + 1

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    assert holding.wait(30)
    wt = threading.Thread(target=writer, daemon=True)
    wt.start()
    wt.join(120)  # a hang guard: commits blocked by the open scans never end
    assert not wt.is_alive() and results.get("commits") == 40, results.get("commits")
    grown_while_open = store.stats()["lmdb_map_size"]
    assert th.is_alive() and not release.is_set()  # the scans are still open
    release.set()
    th.join(60)
    assert not th.is_alive()
    assert grown_while_open >= 8 * map0, (map0, grown_while_open)
    assert results["scan"] == sorted(initial.items())
    assert results["tx"] == sorted(initial.items())
    assert store.get("big/39/19") == "x" * 2000
    store.close()



def test_map_growth_under_busy_readers_finishes_and_reads_stay_right(w):
    """With a tiny map grown many times by a writer, four threads read without pause
    (transactions' snapshot reads of applied keys, half of them inside an open scan, so
    on both the read gate's fast path, ``LmdbState.run_read``, and its nested slow path):
    every read is right (the pair sums to 0) and never fails, and the writer finishes.
    Before, it hung: py-lmdb makes a write transaction's abort (here, after MapFullError)
    wait until no LMDB call is in flight in the process, which busy readers put off
    forever; the abort now runs with readers held out by the read gate."""
    store = walstore.open(w.path, durability="none", map_size=1 << 18)
    with store.transaction() as tx:
        tx.update({"a": 100, "b": -100})
        tx.update({f"k/{i:04d}": i for i in range(300)})
    store.checkpoint()
    stop = threading.Event()
    seen = {"reads": 0, "bad": [], "errors": [], "rounds": 0}

    def reader(nested: bool) -> None:
        try:
            while not stop.is_set():
                tx = store.transaction()
                it = tx.scan(prefix="k/") if nested else None
                if it is not None:
                    next(it)  # an open scan: the next reads nest inside the gate
                a, b = tx.get("a"), tx.get("b")
                if a + b != 0 or tx.get("k/0123") != 123:
                    seen["bad"].append((a, b))
                seen["reads"] += 1
                tx.rollback()  # (read-only: a commit would validate its reads)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            seen["errors"].append(repr(e))

    def writer() -> None:
        for r in range(20):
            with store.transaction() as tx:
                tx.put("a", r)
                tx.put("b", -r)
                tx.update({f"big/{r:02d}/{j:02d}": "x" * 2000 for j in range(20)})
            store.checkpoint()  # applied now: the map grows under the readers
            seen["rounds"] = r + 1

    threads = [threading.Thread(target=reader, args=(i % 2 == 1,), daemon=True)
               for i in range(4)]
    for t in threads:
        t.start()
    map0 = store.stats()["lmdb_map_size"]
    wt = threading.Thread(target=writer, daemon=True)
    wt.start()
    wt.join(120)  # a hang guard
    stop.set()
    for t in threads:
        t.join(30)
    assert not wt.is_alive() and seen["rounds"] == 20, seen["rounds"]
    assert not seen["errors"] and not seen["bad"], seen
    assert seen["reads"] > 20
    assert store.stats()["lmdb_map_size"] >= 4 * map0
    store.close()

# ---- 12 --------------------------------------------------------------------------------------
class _ThreadWrites(FaultBackend):
    """A FaultBackend that also notes, per thread, the bytes every pwrite wrote and where."""

    def __init__(self) -> None:
        super().__init__()
        self.by_thread: dict[int, list[tuple[str, int]]] = {}

    def pwrite(self, fd, data, offset):
        n = super().pwrite(fd, data, offset)
        self.by_thread.setdefault(threading.get_ident(), []).append(
            (os.path.basename(self.path_of(fd) or "?"), n))
        return n

    def take(self) -> list[tuple[str, int]]:
        return self.by_thread.pop(threading.get_ident(), [])


SEGMENT = 64 * 1024
VALUE = "x" * 40_000  # one commit fills most of a segment: every commit rotates


def _rotating_commits(w: World, wait_for_spare: bool, commits: int = 10) -> list:
    """Commit ``commits`` times, each rotating the WAL; per commit: (spare ready before
    it, the pwrites the committing thread did)."""
    fb = _ThreadWrites()
    spare = os.path.join(w.path, "wal", SPARE_NAME)
    out = []
    with installed(fb):
        store = walstore.open(w.path, durability="full", segment_size=SEGMENT,
                              apply_interval=0.01 if wait_for_spare else 0.5)
        try:
            with store.transaction() as tx:
                tx.put("warm", VALUE)
            for i in range(commits):
                if wait_for_spare:
                    wait_until(lambda: os.path.exists(spare)
                               and os.path.getsize(spare) >= SEGMENT, "the spare segment")
                ready = os.path.exists(spare)
                fb.take()
                segments = len(list_segments(os.path.join(w.path, "wal")))
                with store.transaction() as tx:
                    tx.put(f"k/{i}", VALUE)
                out.append((ready, fb.take(),
                            len(list_segments(os.path.join(w.path, "wal"))) - segments))
        finally:
            store.close()
    return out


def _rotation_overhead(writes: list) -> int:
    """Bytes a commit wrote beyond its own record (the header of the new segment, the
    SEAL of the old one: tens of bytes; a preallocation: the whole segment)."""
    return sum(n for _name, n in writes) - len(VALUE)


def test_segment_rotation_preallocates_off_the_commit_path(w):
    """Finding 12: the next segment is preallocated off the commit path.  With the spare
    ready before each rotation, the committing thread writes only its record, the new
    segment's header and the old one's SEAL (not 64 KiB of zeros), and the spare itself
    is filled by the background thread."""
    results = _rotating_commits(w, wait_for_spare=True)
    for ready, writes, new_segments in results:
        assert ready and new_segments == 1, (ready, new_segments)
        assert _rotation_overhead(writes) <= 256, writes
        assert not any(name.endswith(".tmp") and name != SPARE_NAME for name, _n in writes)


def test_back_to_back_rotations_never_preallocate_on_the_commit_path(w):
    """Finding 12 under a burst: every commit fills a segment, with default options, no
    pause between commits.  No commit may zero-fill a segment on its own path."""
    results = _rotating_commits(w, wait_for_spare=False)
    assert all(new == 1 for _ready, _writes, new in results)
    overheads = [_rotation_overhead(writes) for _ready, writes, _new in results]
    assert max(overheads) <= 256, overheads
