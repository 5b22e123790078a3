"""Fault sweep: one fault at a time at every I/O call and fault point of an agent workload.

This tool owns the proof that state and the outside world agree under I/O faults
(contract section 2, "the commit point" and "Action rollback"; section 4, promise 6;
issue 10, "Proof").  A fixed workload (``Workload``) runs against a real store and a
payments-like ledger in a file (``tests/agent_scripts/ws_ledger.py``: charges and
refunds keyed by the action's idempotency key):

- plain commits that rotate 16 KiB segments, a checkpoint;
- actions with a ``refund`` compensation: a committed one, a transaction with two that
  rolls back (an exception), one rolled back to a savepoint inside a transaction that
  commits, a committed one then ``revert``-ed, two committed after a restore point then
  ``rewind``-ed, a prepared transaction rolled back (``rollback_prepared``) and one
  committed (``commit_prepared``), a transaction left in flight;
- a crash (the store dropped as a killed process would), a reopen whose recovery
  compensates the transaction left in flight, more commits, the spare segment prepared
  (the applier thread's job, done in line so call counts repeat) and a rotation that
  activates it, a close.

It runs once under ``tools.faults.FaultBackend`` to count its calls of each kind: every
file call (pwrite, fsync, fdatasync, fsync_dir, open, rename, unlink), every LMDB commit
and sync, and every hit of every named fault point (``fileio.fault_point``; new points
are found by the counting run).  Then, for every call number n and every kind of fault
(ENOSPC and EIO for file calls; ``lmdb.Error`` "Input/output error" for LMDB calls; a
RuntimeError and an OSError at fault points), it runs again with the n-th call failing,
reopens the store with the compensator registered (recovery), and checks:

- every commit that returned is visible (else it is *lost*); every commit that raised
  before the commit point is not; one that raised CommitOutcomeUnknown is all or nothing;
  a prepared transaction whose decision did not return may stay in doubt;
- the state is exactly what the visible commits (and undos) make it;
- what is visible is ``committed`` in ``store.actions()``; every action of a transaction
  that is not visible, or that an undo claimed, or that a rollback to a savepoint crossed,
  is ``compensated`` — the ledger shows exactly one refund for its charge — or listed by
  ``pending_compensations()``; nothing is left in flight but in-doubt prepared ones; no
  charge exists without its action recorded (write-ahead for side effects);
- no exception other than a walstore error (or the one injected at a fault point)
  escaped the API;
- after an fsync failure (WAL fsync / fdatasync / directory fsync, LMDB commit or sync)
  nothing is acknowledged until the store is reopened, the failed fsync is never retried
  (WAL: on that descriptor; LMDB: no LMDB write or sync at all in that process);
- ``verify`` passes, and the reopened store takes a new commit.

    python tools/faultsweep.py              # every fault, prints the totals
    python tools/faultsweep.py --stride 3   # every third call of each kind
"""
from __future__ import annotations

import argparse
import concurrent.futures
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "agent_scripts"))

import walstore  # noqa: E402
import ws_ledger  # noqa: E402
from tools.faults import LMDB_OPS, OPS, POINT_OP, SYNC_OPS, FaultBackend, installed  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

OPTS = dict(durability="full", segment_size=16 * 1024, checkpoint_bytes=1 << 40,
            apply_interval=3600.0)  # the applier never runs by itself: call counts repeat
# after one of these fails: read-only, never retried (a failed write-back of the spare's
# zeros is an I/O error of the disk the log is on: the log stops as for a failed fsync)
FSYNC_SITES = SYNC_OPS + ("write_back",) + LMDB_OPS


class InjectedFault(RuntimeError):
    """What the sweep raises at a fault point (and an OSError subclass, below)."""


class InjectedOSError(OSError):
    pass


class Abandon(Exception):
    """The workload's own exception: the agent gives up, the transaction rolls back."""


# ---- fault kinds -----------------------------------------------------------------------------
def kinds_for(site: str) -> list[tuple[str, dict]]:
    """(name, FaultBackend.fail keywords) for each fault injected at a site."""
    if site in OPS:
        return [("ENOSPC", {"error": errno.ENOSPC}), ("EIO", {"error": errno.EIO})]
    if site in LMDB_OPS:
        return [("lmdb.Error", {"error": errno.EIO})]
    name = site.split(":", 1)[1]
    return [("RuntimeError", {"raises": lambda: InjectedFault(f"injected at {name}")}),
            ("OSError", {"raises": lambda: InjectedOSError(errno.EIO, f"injected at {name}")})]


def arm(fb: FaultBackend, site: str, nth: int, kw: dict):
    if site.startswith("point:"):
        return fb.fail_point(site.split(":", 1)[1], kw["raises"], nth=nth)
    return fb.fail(site, nth=nth, **kw)


# ---- the workload ----------------------------------------------------------------------------
@dataclass
class Op:
    """One step of the workload that may commit (or must not), and how it ended."""

    label: str
    kind: str                  # commit | undo | rollback | prepared | loser
    writes: dict = field(default_factory=dict)  # key -> value it leaves when visible
    undoes: tuple = ()         # labels of the commits whose writes an undo reverses
    decide: str | None = None  # prepared: "commit" | "rollback"
    gid: str | None = None
    txid: int | None = None
    outcome: str = "not run"   # returned | unknown (CommitOutcomeUnknown) | failed | not run
    commits: bool = True       # returned None (a rewind with nothing to undo): no commit
    error: str | None = None
    foreign: bool = False      # the escaping exception was not a walstore error
    at: int = 0                # backend sequence number when it ended
    begun: int | None = None   # backend sequence number when it began
    phase: int = 0


class Workload:
    """The steps above, recording each commit-like step's outcome (``ops``)."""

    N_A, N_B = 24, 12  # plain commits before and after the crash
    backend: type[FaultBackend] = FaultBackend  # the backend its runs are counted under

    def __init__(self, path: str, ledger: str, clock: Callable[[], int] = lambda: 0) -> None:
        self.path = path
        self.ledger = ledger
        self.clock = clock
        self.ops: list[Op] = []
        self.by_label: dict[str, Op] = {}
        self.phase_starts: list[int] = []  # sequence number at each open
        self.comp_calls: Counter = Counter()
        self.open_failed = 0
        self._in_flight = None  # the loser's transaction, referenced until the crash

    def refund(self, action) -> None:
        self.comp_calls[action.id] += 1
        ws_ledger.refund(action.args["ledger"], action.key)

    def compensators(self) -> dict:
        return {"refund": self.refund}

    def check_failed_sync(self, fb: FaultBackend, rule, site: str, out: dict) -> None:
        """What must follow the failed sync ``rule`` fired at (``check_fsync_failure``)."""
        check_fsync_failure(self, fb, rule, site, out)

    def check_reopened(self, store, out: dict) -> None:
        """More checks on the reopened store (``check``), before it takes a new commit:
        a subclass's (e.g. tools/faultsweep_files.py: the workspace's tree)."""

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> None:
        store = self._open()
        if store is None:
            return
        try:
            self.phase_one(store)
        finally:
            _spare_made(store)
            store._drop_like_a_crash()  # the transaction left in flight is now a loser
        store = self._open()
        if store is None:
            return
        try:
            self.phase_two(store)
        finally:
            _spare_made(store)
            try:
                store.close()
            except Exception:  # noqa: BLE001 - a fault in close: reopened and checked later
                store._drop_like_a_crash()

    def _open(self):
        self.phase_starts.append(self.clock())
        try:
            return walstore.open(self.path, compensators=self.compensators(), **OPTS)
        except Exception:  # noqa: BLE001 - the fault hit the open (or its recovery)
            self.open_failed += 1
            return None

    def phase_one(self, s) -> None:
        for i in range(self.N_A):
            self.put(s, f"a{i}", "x" * (i * 37 % 900))
        self.pay(s, "pay1", 10)
        self.rollback(s, "rb", (3, 4))
        self.savepoint(s, "sp")
        self.step(lambda: s.checkpoint())
        self.pay(s, "pay2", 20)
        self.revert(s, "rev", "pay2")
        self.step(lambda: s.restore_point("rp"))
        self.pay(s, "pay3", 30)
        self.pay(s, "pay4", 40)
        self.rewind(s, "rew", "rp", ("pay3", "pay4"))
        self.prepared(s, "prb", 50, "rollback")
        self.prepared(s, "pc", 60, "commit")
        self.loser(s, "lost", 70)

    def phase_two(self, s) -> None:
        self.put(s, "b-first", 0)
        self.prepare_spare(s)
        for i in range(self.N_B):
            self.put(s, f"b{i}", "y" * 1500)
        self.pay(s, "pay5", 80)

    # ---- steps ------------------------------------------------------------------------------
    @staticmethod
    def prepare_spare(s) -> None:
        """The applier thread's other job, done in line (it never runs by itself here, so
        that call counts repeat), with its reaction to an error (Engine._applier_loop: the
        store stops writing): the next rotation activates the spare."""
        eng = s._engine
        try:
            eng.wal.prepare_spare()
        except BaseException as e:  # noqa: BLE001 - as the applier thread does
            eng.fail(e)

    def step(self, fn) -> None:
        """A step that commits nothing of the model's (checkpoint, restore point)."""
        try:
            fn()
        except walstore.WalstoreError:
            pass

    def _attempt(self, op: Op, fn) -> Any:
        op.phase = len(self.phase_starts)
        op.begun = self.clock()
        self.ops.append(op)
        self.by_label[op.label] = op
        result = None
        try:
            result = fn()
        except walstore.CommitOutcomeUnknown as e:
            op.outcome, op.error = "unknown", f"{type(e).__name__}: {e}"
        except Abandon:
            op.outcome = "returned"  # the rollback went through and re-raised our exception
        except walstore.CompensationFailed as e:
            # an undo's documented outcome when its committed claims could not be settled
            # (contract: escalated, kept pending): it committed
            op.outcome = "returned" if op.kind == "undo" else "failed"
            op.error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - classified, then checked
            op.outcome, op.error = "failed", f"{type(e).__name__}: {e}"
            op.foreign = not isinstance(e, (walstore.WalstoreError, InjectedFault,
                                            InjectedOSError))
        else:
            op.outcome = "returned"
        op.at = self.clock()
        return result

    def _charge(self, tx, amount: int, compensate: str = "refund"):
        with tx.action("charge", args={"ledger": self.ledger, "amount": amount},
                       compensate=compensate) as act:
            act.result = ws_ledger.charge(self.ledger, act.key, amount)
        return act

    def put(self, s, key: str, value) -> None:
        op = Op(key, "commit", {key: value})

        def run():
            with s.transaction(meta={"op": key}) as tx:
                op.txid = tx.id
                tx.put(key, value)
        self._attempt(op, run)

    def pay(self, s, label: str, amount: int) -> None:
        """A committed transaction whose action charged the ledger."""
        op = Op(label, "commit", {f"pay/{label}": amount})

        def run():
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, amount)
                tx.put(f"pay/{label}", amount)
        self._attempt(op, run)

    def rollback(self, s, label: str, amounts) -> None:
        """Two charges, then the agent gives up: ABORT, both refunded (newest first)."""
        op = Op(label, "rollback")

        def run():
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                for amount in amounts:
                    self._charge(tx, amount)
                tx.put(f"{label}/x", 1)
                raise Abandon()
        self._attempt(op, run)

    def savepoint(self, s, label: str) -> None:
        """A charge, a savepoint, a charge and a write, rollback_to (refunds the second),
        a write, commit: the first action is committed, the second compensated."""
        op = Op(label, "commit", {f"{label}/a": 1, f"{label}/c": 3})

        def run():
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, 5)
                tx.put(f"{label}/a", 1)
                sp = tx.savepoint("plan-b")
                self._charge(tx, 6)
                tx.put(f"{label}/b", 2)
                tx.rollback_to(sp)
                tx.put(f"{label}/c", 3)
        self._attempt(op, run)

    def revert(self, s, label: str, target: str) -> None:
        op = Op(label, "undo", undoes=(target,))
        txid = self.by_label[target].txid

        def run():
            info = s.revert(txid, meta={"op": label})
            op.txid = info.txid if info is not None else None
        self._attempt(op, run)

    def rewind(self, s, label: str, point: str, after: tuple) -> None:
        op = Op(label, "undo", undoes=after)

        def run():
            info = s.rewind(point, meta={"op": label})
            op.commits = info is not None
            op.txid = info.txid if info is not None else None
        self._attempt(op, run)

    def prepared(self, s, label: str, amount: int, decide: str) -> None:
        """A charge, a write, prepare; then commit_prepared or rollback_prepared.  A failed
        prepare rolls the transaction back."""
        op = Op(label, "prepared", {f"prep/{label}": amount}, decide=decide, gid=f"g-{label}")

        def run():
            tx = s.transaction(meta={"op": label})
            op.txid = tx.id
            try:
                self._charge(tx, amount)
                tx.put(f"prep/{label}", amount)
                tx.prepare(op.gid)
            except BaseException:
                if tx.state == "active" and tx.gid is None:
                    try:
                        tx.rollback()
                    except walstore.WalstoreError:
                        pass
                raise
            if decide == "commit":
                s.commit_prepared(op.gid)
            else:
                s.rollback_prepared(op.gid)
        self._attempt(op, run)

    def loser(self, s, label: str, amount: int) -> None:
        """A charge and a write, never committed: the crash makes it a loser."""
        op = Op(label, "loser")

        def run():
            tx = s.transaction(meta={"op": label})
            op.txid = tx.id
            self._charge(tx, amount)
            tx.put(f"{label}/x", 1)
            self._in_flight = tx  # kept referenced until the crash
        self._attempt(op, run)


# ---- one fault ---------------------------------------------------------------------------------
def run_dir(root: str, label: str) -> str:
    """One run's directory: a name of fixed length, so every run's paths — which the
    workload's records carry (the ledger's path is an action argument) — have the same
    length, its records the same sizes and its segments rotate at the same records: the
    counting run's calls are the faulted runs' calls."""
    return os.path.join(root, hashlib.sha256(label.encode()).hexdigest()[:16])


def _spare_made(store) -> None:
    """Wait for the spare segment the last rotation asked for (its thread's ``open``): made
    or not by the end of a run as the machine's load had it, a faulted run fell short of
    the counting run's calls and the fault at that call never fired (CI, under load:
    'open #15 ENOSPC' unfired)."""
    wal = getattr(getattr(store, "_engine", None), "wal", None)
    if wal is not None:
        try:
            wal._await_spare(timeout=10.0)
        except Exception:  # noqa: BLE001 - a store a fault stopped: nothing to wait for
            pass


def count_calls(root: str, make: type[Workload] = Workload,
                files: dict | None = None) -> dict[str, int]:
    """Calls of each kind the fault-free workload makes (fault points as ``point:<name>``).
    ``files``, when given, gets for each file call kind the file each call was on, as a
    class ("store/wal/#.wal": its path in the run's directory, digits as "#")."""
    fb = make.backend()
    path = run_dir(root, "count")
    w = make(os.path.join(path, "store"), os.path.join(path, "ledger.jsonl"), fb.now)
    os.makedirs(path)
    with installed(fb):
        w.run()
    res = check(w, fb, None)
    if res["lost"] or res["errors"]:
        raise AssertionError(f"the fault-free workload itself fails its checks: {res}")
    shutil.rmtree(path, ignore_errors=True)
    counts = {op: len(fb.calls_to(op)) for op in OPS + LMDB_OPS}
    if files is not None:
        for op in OPS:
            files[op] = [re.sub(r"\d+", "#", os.path.relpath(c.path, path)) if c.path
                         else "" for c in fb.calls_to(op)]
    for name, n in sorted(fb.point_hits().items()):
        counts[f"point:{name}"] = n
    return counts


def one_fault(root: str, site: str, nth: int, kind: str, kw: dict | None = None,
              make: type[Workload] = Workload) -> dict:
    """One run of ``make``'s workload with the ``nth`` call of ``site`` failing as ``kind``
    (``kw``: its ``kinds_for`` keywords, looked up when None), then ``check``."""
    kw = dict(kinds_for(site))[kind] if kw is None else kw
    path = run_dir(root, f"f-{site}-{nth}-{kind}")
    os.makedirs(path)
    fb = make.backend()
    rule = arm(fb, site, nth, kw)
    w = make(os.path.join(path, "store"), os.path.join(path, "ledger.jsonl"), fb.now)
    with installed(fb):
        w.run()
    res = check(w, fb, rule if rule.fired else None, site)
    res["fired"] = rule.fired
    shutil.rmtree(path, ignore_errors=True)
    return res


def acknowledged(op: Op) -> bool:
    """A commit reported done: it must be visible after any fault."""
    return (op.outcome == "returned" and op.commits
            and (op.kind in ("commit", "undo") or op.kind == "prepared" and op.decide == "commit"))


def _phase_end(w: Workload, seq: int) -> int:
    """The sequence number at which the process that made call ``seq`` let the store go
    (the next open: every call of that open has a greater number), or infinity."""
    for start in w.phase_starts:
        if start >= seq:
            return start
    return 1 << 62


def check_fsync_failure(w: Workload, fb: FaultBackend, rule, site: str, out: dict) -> None:
    """Nothing acknowledged after a failed fsync in that process; the fsync never retried."""
    failed = rule.failed_calls[0]
    end = _phase_end(w, failed.seq)
    start = failed.seq
    if failed.path and os.path.basename(failed.path) == "spare.tmp":
        # The spare (the next segment made ahead, no record in it) is fsynced by a
        # background thread: the log stops when that thread has handled the failure
        # (``WriteAheadLog.prepare_spare`` sets ``failed``), not when the call returned.
        # Meanwhile (a few bytecodes, an os.close; on a loaded machine the thread waits
        # for the GIL while the main thread commits: up to 4 commits seen) a commit whose
        # own fdatasync succeeded is acknowledged by a log that had not failed, and is
        # durable.  The log must refuse every commit that starts after it stopped.
        start = _next_commit_start(w, _spare_log_stopped(fb, failed, end))
    late = [op.label for op in w.ops if op.outcome == "returned" and op.kind != "rollback"
            and op.commits and start < op.at < end]
    if late:
        what = "a failed LMDB " + site[5:] if site in LMDB_OPS else f"a failed {site}"
        where = os.path.basename(failed.path) if failed.path else "?"
        out["errors"].append(f"commits acknowledged after {what} of {where} (the store did "
                             f"not turn read-only): {late[:4]}")
    if site in LMDB_OPS:
        again = [c for c in fb.calls_to(LMDB_OPS, after=failed.seq) if c.seq < end]
        if again:
            ops = sorted({c.op for c in again})
            out["errors"].append(f"LMDB written or synced again after a failed LMDB "
                                 f"{site[5:]} in the same process ({len(again)}x {ops})")
    elif failed.fd is not None:  # the same descriptor of the same file (numbers are reused)
        again = [c for c in fb.calls_to(SYNC_OPS, fd=failed.fd, after=failed.seq)
                 if c.seq < end and c.path == failed.path]
        if again:
            out["errors"].append(f"fsync retried on the failed descriptor ({len(again)}x)")


def _spare_log_stopped(fb: FaultBackend, failed, end: int) -> int:
    """When the log stopped after the spare's failed ``failed`` call: the spare thread's
    discard of the spare (its unlink, which ``prepare_spare`` makes only after setting
    the log's ``failed``).  Without one before the process let go (``end``): the failed
    call itself (the strict reading)."""
    for c in fb.calls_to("unlink", after=failed.seq):
        if c.seq <= end and c.path == failed.path:  # (end: the last call of that process)
            return c.seq
    return failed.seq


def _next_commit_start(w: Workload, seq: int) -> int:
    """The moment of the first operation that began after ``seq`` (acknowledgements of
    operations already under way at ``seq`` are not counted against a background fault)."""
    starts = [op.begun for op in w.ops if getattr(op, "begun", None) is not None
              and op.begun > seq]
    return min(starts) if starts else seq


def check(w: Workload, fb: FaultBackend, rule, site: str = "") -> dict:
    """Reopen (recovery, compensators registered) and check every promise; see the module
    docstring.  Returns {"lost": [labels], "errors": [...], "acks": n, ...}."""
    out: dict = {"lost": [], "errors": [], "acks": 0, "pending": 0, "in_doubt": 0,
                 "open_failed": w.open_failed, "reruns": 0}
    if rule is not None and site in FSYNC_SITES:
        w.check_failed_sync(fb, rule, site, out)
    for op in w.ops:
        if op.foreign:
            out["errors"].append(f"{op.label}: a foreign exception escaped the API: {op.error}")
    if not os.path.exists(os.path.join(w.path, "STORE")):
        if any(op.outcome == "returned" for op in w.ops):
            out["errors"].append("the store vanished after acknowledging commits")
        return out  # the fault hit store creation: nothing was acknowledged
    try:
        store = walstore.open(w.path, compensators=w.compensators())
    except walstore.WalstoreError as e:
        out["errors"].append(f"reopen failed: {type(e).__name__}: {e}")
        out["lost"] = [op.label for op in w.ops if acknowledged(op)]
        return out
    try:
        _check_open_store(w, store, out)
        w.check_reopened(store, out)
        try:
            with store.transaction() as tx:  # the store carries on after reopening
                tx.put("after-fault", 1)
        except walstore.WalstoreError as e:
            out["errors"].append(f"a commit after reopening failed: {e}")
    finally:
        store.close()
    # compensators run again because their COMPENSATED record was lost (the idempotency
    # key keeps the ledger right): allowed, counted
    out["reruns"] = sum(n - 1 for n in w.comp_calls.values() if n > 1)
    rep = verify_store(w.path)
    if not rep.ok:
        out["errors"] += [f"verify: {e}" for e in rep.errors]
    return out


def _check_open_store(w: Workload, s, out: dict) -> None:
    errors = out["errors"]
    log = s.log()
    info_of = {}
    for info in log:
        label = info.meta.get("op") if isinstance(info.meta, dict) else None
        if label is not None:
            info_of[label] = info
    in_doubt = {gid: s.prepared_details(gid).txid for gid in s.prepared()}
    doubt_txids = set(in_doubt.values())
    out["in_doubt"] = len(in_doubt)

    # 1. each commit-like step against its outcome
    for op in w.ops:
        visible = op.label in info_of
        if op.kind in ("rollback", "loser"):
            if visible:
                errors.append(f"{op.label}: rolled back, yet committed")
            continue
        if op.kind == "prepared" and op.gid in in_doubt:
            if op.outcome == "returned":
                errors.append(f"{op.label}: {op.decide}_prepared returned, yet {op.gid!r} "
                              f"is still in doubt")
            continue
        if op.kind == "prepared" and op.decide == "rollback":
            if visible:
                errors.append(f"{op.label}: rolled back (prepared), yet committed")
            continue
        if acknowledged(op):
            out["acks"] += 1
            if not visible:
                out["lost"].append(op.label)
        elif op.outcome == "failed" and visible:
            errors.append(f"{op.label}: reported a failure ({op.error}) but committed: an "
                          f"error after the commit point became the commit's failure")
        elif op.outcome in ("not run", "returned") and visible:
            errors.append(f"{op.label}: never ran (or had nothing to commit), yet committed")

    # 2. the state is what the visible commits and undos make it (every key is written
    #    by one step only, so an undone key is absent)
    expected: dict = {}
    for op in w.ops:
        if op.label in info_of and op.kind in ("commit", "prepared"):
            expected.update(op.writes)
    for op in w.ops:
        if op.label in info_of and op.kind == "undo":
            for target in op.undoes:
                for k in w.by_label[target].writes if target in w.by_label else ():
                    expected.pop(k, None)
    state = {k: v for k, v in s.scan() if k != "after-fault"}
    if state != expected:
        extra = sorted(set(state) - set(expected))[:4]
        missing = sorted(set(expected) - set(state))[:4]
        wrong = sorted(k for k in set(state) & set(expected) if state[k] != expected[k])[:4]
        errors.append(f"state differs from the visible commits: extra {extra}, missing "
                      f"{missing}, wrong {wrong}")

    # 3. actions: visible ones committed, every other one compensated (or listed pending)
    live, claimed = set(), set()
    for info in log:
        live.update(a["id"] for a in info.actions)
        claimed.update(info.extra.get("compensate", ()))
    pending_ids = {a.id for a in s.pending_compensations()}
    records = ws_ledger.records(w.ledger)
    charges = Counter(r["key"] for r in records if r["op"] == "charge")
    refunds = Counter(r["key"] for r in records if r["op"] == "refund")
    keys = set()
    for a in s.actions():
        keys.add(a.key)
        if a.in_flight:
            if a.txid not in doubt_txids:
                errors.append(f"action {a.id}: left in flight (its transaction never ended "
                              f"and is not prepared)")
            elif refunds[a.key]:
                errors.append(f"action {a.id}: in doubt, yet refunded")
            continue
        stands = a.id in live and a.id not in claimed
        if stands:
            if a.state != "committed":
                errors.append(f"action {a.id}: its transaction's commit stands, yet it is "
                              f"{a.state}")
            if charges[a.key] != 1 or refunds[a.key]:
                errors.append(f"action {a.id}: committed, but the ledger shows "
                              f"{charges[a.key]} charge(s) and {refunds[a.key]} refund(s)")
            continue
        if a.state == "compensated":
            if refunds[a.key] != charges[a.key]:
                errors.append(f"action {a.id}: compensated, but the ledger shows "
                              f"{charges[a.key]} charge(s) and {refunds[a.key]} refund(s)")
        elif a.state in ("pending", "failed") and a.id in pending_ids:
            out["pending"] += 1
        else:
            errors.append(f"action {a.id}: its transaction is not visible (or was undone), "
                          f"yet it is {a.state}" + (" and not listed pending"
                                                     if a.state in ("pending", "failed") else ""))
    for key in set(charges) | set(refunds):
        if key not in keys:
            errors.append(f"ledger key {key}: an effect with no action recorded (the body "
                          f"ran without a durable intent?)")
        if charges[key] > 1 or refunds[key] > 1:
            errors.append(f"ledger key {key}: {charges[key]} charges, {refunds[key]} refunds")


# ---- the sweep ---------------------------------------------------------------------------------
def family(site: str) -> str:
    return "file" if site in OPS else "lmdb" if site in LMDB_OPS else "point"


def _one_fault_task(args: tuple) -> dict:
    return one_fault(*args)


def sweep(root: str, stride: int | dict = 1, sites=None, progress=None,
          make: type[Workload] = Workload, jobs: int = 1, every_file: bool = False) -> dict:
    """Every fault kind at every ``stride``-th call of each site (all sites, or those named
    in ``sites``: "pwrite", "lmdb_sync", "point:commit.after_durable", "point:*" ...);
    ``stride`` may be a dict by family ("file", "lmdb", "point"; missing: 1).  ``make``:
    the workload (its class); ``jobs``: runs at once (processes).  ``every_file``: a
    file call kind's last call too, and its first call on each kind of file (a segment,
    the spare, the store's directory ...; see ``count_calls``), whatever the stride.
    Returns the totals and every broken case."""
    strides = stride if isinstance(stride, dict) else {}
    default = 1 if isinstance(stride, dict) else stride
    files: dict = {}
    counts = count_calls(root, make, files if every_file else None)

    def nths(site: str) -> list[int]:
        chosen = set(range(1, counts[site] + 1, strides.get(family(site), default)))
        if every_file and site in files and counts[site]:
            chosen.add(counts[site])
            chosen.update(files[site].index(c) + 1 for c in set(files[site]))
        return sorted(chosen)

    chosen = [s for s in counts if sites is None or any(
        s == p or (p.endswith("*") and s.startswith(p[:-1])) for p in sites)]
    summary = {"calls": counts, "faults": 0, "fired": 0, "acks": 0, "lost": 0, "pending": 0,
               "in_doubt": 0, "reruns": 0, "by_kind": Counter(), "broken": [], "unfired": [],
               "seconds": 0.0}
    t0 = time.monotonic()
    tasks = [(root, site, nth, kind, None, make) for site in chosen
             for nth in nths(site)
             for kind, _kw in kinds_for(site)]
    pool = concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else None
    try:
        results = pool.map(_one_fault_task, tasks) if pool else map(_one_fault_task, tasks)
        per_site, done_sites = Counter(t[1] for t in tasks), Counter()
        for (_root, site, nth, kind, _kw, _make), res in zip(tasks, results):
            summary["faults"] += 1
            summary["by_kind"][f"{site} {kind}"] += 1
            summary["fired"] += bool(res["fired"])
            if not res["fired"]:  # (the run made fewer such calls than the count)
                summary["unfired"].append(f"{site} #{nth} {kind}")
            summary["acks"] += res["acks"]
            summary["lost"] += len(res["lost"])
            summary["pending"] += res["pending"]
            summary["in_doubt"] += res["in_doubt"]
            summary["reruns"] += res["reruns"]
            if res["lost"] or res["errors"]:
                summary["broken"].append({"site": site, "nth": nth, "kind": kind, **res})
            done_sites[site] += 1
            if progress and done_sites[site] == per_site[site]:
                step = strides.get(family(site), default)
                progress(f"  {site}: {counts[site]} calls, every {step}. swept "
                         f"({len(summary['broken'])} broken so far)")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    summary["seconds"] = time.monotonic() - t0
    return summary


def report(s: dict) -> str:
    kinds = Counter()
    for k, n in s["by_kind"].items():
        site, kind = k.rsplit(" ", 1)
        family = ("file " + kind if site in OPS else "LMDB " + site[5:] if site in LMDB_OPS
                  else "fault point " + kind)
        kinds[family] += n
    lines = [f"faults injected: {s['faults']} ("
             + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"), fired: "
             f"{s['fired']}; acknowledged commits checked: {s['acks']}, lost: {s['lost']}; "
             f"broken: {len(s['broken'])}; left pending: {s['pending']}, in doubt: "
             f"{s['in_doubt']}, compensations re-run after a lost record: {s['reruns']}; "
             f"{s['seconds']:.0f} s",
             "calls per run: " + ", ".join(f"{k} {v}" for k, v in s["calls"].items())]
    if s["unfired"]:  # (a call the run made fewer times than the counting run did)
        lines.append(f"unfired ({len(s['unfired'])}): " + ", ".join(s["unfired"][:20]))
    for b in s["broken"]:
        lines.append(f"  BROKEN {b['site']} #{b['nth']} {b['kind']}: lost {b['lost']} "
                     f"{b['errors'][:3]}")
    return "\n".join(lines)


def main(make: type[Workload] = Workload, doc: str | None = None) -> None:
    ap = argparse.ArgumentParser(description=(doc or __doc__).split("\n\n")[0])
    ap.add_argument("--stride", type=int, default=1, help="every Nth call of each kind")
    ap.add_argument("--sites", nargs="*", help="only these sites (e.g. lmdb_sync 'point:*')")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="walstore-faultsweep-")
    try:
        s = sweep(root, stride=args.stride, sites=args.sites, progress=print, make=make,
                  jobs=args.jobs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(s))
    sys.exit(1 if s["broken"] else 0)


if __name__ == "__main__":
    main()
