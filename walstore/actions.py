"""External side effects (the Saga pattern): intents, results, compensations.

An agent wraps a side effect in ``tx.action(name, args=..., compensate="refund")``.
Entering it makes an ACTION_INTENT record durable *before* the body runs (write-ahead for
side effects); leaving it logs the result.  When the transaction rolls back (exception,
``rollback()``, or ``rollback_to`` a savepoint taken before the action), the compensations
of its actions run at once, newest first; after a crash, recovery runs those of every
transaction that did not commit.  ``store.revert`` / ``rewind`` compensate the actions of
committed transactions they undo.

Each compensation outcome is a COMPENSATED record (fsynced) and a row in LMDB's
``actions`` database: ``pending`` (owed; no compensator registered yet, or not run yet),
``failed`` (kept failing after ``COMPENSATION_RETRIES`` tries with backoff: escalated,
kept, ``CompensationFailed`` raised), ``compensated``, or ``resolved`` (handled by hand,
``store.resolve``).  Actions of committed transactions that nothing undid are
``committed``.  Nothing is forgotten: a failed or pending action stays listed by
``pending_compensations()`` until it is compensated or resolved.

The idempotency key ``act.key`` is derived from the store id, txid and the action's
position in its transaction: stable across retries, crashes and recovery, so an external
system that honours it performs each effect (and each compensation) exactly once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .codec import pack, unpack
from .errors import CompensationFailed, WalstoreError
from .framing import RecordType

if TYPE_CHECKING:
    from .txn import Transaction

COMPENSATION_RETRIES = 3
COMPENSATION_BACKOFF = 0.02
PENDING, FAILED, COMPENSATED, RESOLVED, COMMITTED = (
    "pending", "failed", "compensated", "resolved", "committed")
OPEN_STATES = (PENDING, FAILED)


@dataclass
class Action:
    """One external side effect, as compensators and ``pending_compensations()`` see it."""

    id: str
    txid: int
    name: str
    args: Any = None
    result: Any = None
    key: str = ""
    compensate: str | None = None
    state: str = PENDING
    error: str | None = None
    attempts: int = 0
    ts: float = field(default_factory=time.time)
    lsn: int = 0  # LSN of its intent record: the order in which actions happened

    def row(self) -> dict:
        return {"id": self.id, "tx": self.txid, "name": self.name, "args": self.args,
                "result": self.result, "key": self.key, "compensate": self.compensate,
                "state": self.state, "error": self.error, "attempts": self.attempts,
                "ts": self.ts, "lsn": self.lsn}

    @classmethod
    def from_row(cls, row: dict) -> "Action":
        return cls(row["id"], row["tx"], row["name"], row.get("args"), row.get("result"),
                   row.get("key", ""), row.get("compensate"), row.get("state", PENDING),
                   row.get("error"), row.get("attempts", 0), row.get("ts", 0.0),
                   row.get("lsn", 0))

    def as_dict(self) -> dict:
        return self.row()


class ActionScope:
    """``with tx.action(...) as act:`` — logs the intent on entry, the result on exit."""

    def __init__(self, tx: "Transaction", action: Action) -> None:
        self._tx = tx
        self.action = action

    def __enter__(self) -> Action:
        self._tx._store._log_intent(self._tx, self.action)
        return self.action

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.action.error = f"{exc_type.__name__}: {exc}"
        self._tx._store._log_result(self._tx, self.action)
        return False


def check_packable(what: str, value: Any) -> None:
    try:
        pack(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{what} cannot be stored: {e}") from None


class ActionsMixin:
    """The Store's side of intents and compensations (mixed into walstore.Store)."""

    compensators: dict[str, Callable]

    def compensator(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn(action)`` as the compensator called ``name``."""
        if not isinstance(name, str) or not name:
            raise TypeError("a compensator name must be a non-empty str")

        def register(fn: Callable) -> Callable:
            self.compensators[name] = fn
            return fn
        return register

    def _new_action(self, tx: "Transaction", name: str, args: Any, compensate: str | None
                    ) -> Action:
        if not isinstance(name, str) or not name:
            raise TypeError("an action name must be a non-empty str")
        if compensate is not None and not isinstance(compensate, str):
            raise TypeError("compensate must be the name of a compensator (a str) or None")
        check_packable(f"args of action {name!r}", args)
        seq = len(tx.actions_ever) + 1
        aid = f"{tx.id}.{seq}"
        return Action(aid, tx.id, name, args, None, f"ws-{self.store_id.hex()[:12]}-{aid}",
                      compensate)

    # ---- logging -----------------------------------------------------------------------
    def _log_intent(self, tx: "Transaction", action: Action) -> None:
        tx._check_active()
        self._check_writable()
        body = {"tx": tx.id, "id": action.id, "name": action.name, "args": action.args,
                "key": action.key, "compensate": action.compensate, "ts": action.ts}
        with self._lock:
            lsn, end = self.wal.append(RecordType.ACTION_INTENT, pack(body))
            action.lsn = lsn
            if tx.first_logged_lsn is None:
                tx.first_logged_lsn = lsn
        if self.durability != "none":
            self.wal.sync_to(end)  # the intent is durable before the effect happens
        tx.actions.append(action)
        tx.actions_ever.append(action)

    def _log_result(self, tx: "Transaction", action: Action) -> None:
        """Log the body's outcome.  A result msgpack cannot store is dropped (the action
        stays compensatable, its error says why) and TypeError is raised."""
        bad = None
        try:
            check_packable(f"result of action {action.name!r}", action.result)
        except TypeError as e:
            bad = e
            action.result = None
            action.error = f"{e}; the result was not recorded"
        body = {"tx": tx.id, "id": action.id, "result": action.result, "error": action.error}
        with self._lock:
            self.wal.append(RecordType.ACTION_RESULT, pack(body))
        if bad is not None:
            raise bad

    def _record_state(self, action: Action) -> None:
        """Durably record an action's compensation state (WAL record, then LMDB row)."""
        with self._lock:
            _lsn, end = self.wal.append(RecordType.COMPENSATED, pack(action.row()))
        if self.durability != "none":
            self.wal.sync_to(end)
        self._put_action_rows([action])

    def _put_action_rows(self, actions: list[Action]) -> None:
        def body(txn) -> None:
            for a in actions:
                txn.put(a.id.encode(), pack(a.row()), db=self.state.actions)
        self.state.write(body)

    # ---- compensation ------------------------------------------------------------------
    def _compensate(self, actions: list[Action], raise_on_failure: bool = True) -> list[Action]:
        """Run compensations newest first; returns the actions that failed."""
        failed = []
        for action in sorted(actions, key=_newest_first):
            if action.compensate is None or action.state in (COMPENSATED, RESOLVED):
                continue
            fn = self.compensators.get(action.compensate)
            if fn is None:
                action.state = PENDING
                action.error = f"no compensator registered for {action.compensate!r}"
                self._record_state(action)
                continue
            if not self._run_compensator(fn, action):
                failed.append(action)
        if failed and raise_on_failure:
            ids = [a.id for a in failed]
            raise CompensationFailed(f"compensation failed for action(s) {ids} after "
                                     f"{COMPENSATION_RETRIES} tries: {failed[0].error}; they "
                                     f"are kept as 'failed' (store.pending_compensations())",
                                     ids)
        return failed

    def _run_compensator(self, fn: Callable, action: Action) -> bool:
        action.state = PENDING
        for attempt in range(1, COMPENSATION_RETRIES + 1):
            action.attempts += 1
            try:
                fn(action)
            except Exception as e:  # a compensator's failure is data, escalated below
                action.error = f"{type(e).__name__}: {e}"
                if attempt < COMPENSATION_RETRIES:
                    time.sleep(COMPENSATION_BACKOFF * (2 ** (attempt - 1)))
                continue
            action.state, action.error = COMPENSATED, None
            self._record_state(action)
            return True
        action.state = FAILED
        self._record_state(action)
        return False

    # ---- hooks into the core -----------------------------------------------------------
    def _after_partial_rollback(self, tx: "Transaction", action_mark: int) -> None:
        crossed = tx.actions[action_mark:]
        del tx.actions[action_mark:]
        if crossed:
            self._compensate(crossed)

    def _commit_extra(self, tx: "Transaction") -> dict:
        if not tx.actions and not tx.commit_extra:
            return {}
        extra = dict(tx.commit_extra or {})
        if tx.actions:
            for a in tx.actions:
                a.state = COMMITTED
            extra["actions"] = [a.row() for a in tx.actions]
        return extra

    def _index_entry(self, txn, entry) -> None:
        self._index_prepared(txn, entry)
        db = self.state.actions
        for row in entry.extra.get("actions", ()):
            txn.put(row["id"].encode(), pack(row), db=db)
        for aid in entry.extra.get("compensate", ()):
            raw = txn.get(aid.encode(), db=db)
            if raw is not None:
                row = unpack(raw)
                if row.get("state") == COMMITTED:
                    row["state"] = PENDING
                    txn.put(aid.encode(), pack(row), db=db)

    # ---- queries -----------------------------------------------------------------------
    def actions(self, pending: bool = False) -> list[Action]:
        """Every recorded action (``pending=True``: only those still owing compensation)."""
        self._check_open()
        return self._load_actions(pending)

    def _load_actions(self, pending: bool) -> list[Action]:
        rows = {k.decode(): unpack(raw)
                for k, raw in self.state.scan(b"", None, db=self.state.actions)}
        for row in self._queued_action_rows():
            rows.setdefault(row["id"], row)
        if self.readonly:
            rows.update(self._wal_action_rows(rows))
        out = [Action.from_row(r) for r in rows.values()]
        if pending:
            out = [a for a in out if a.state in OPEN_STATES]
        return sorted(out, key=_newest_first)

    def pending_compensations(self) -> list[Action]:
        """Actions whose compensation is owed: ``pending`` or ``failed``."""
        self._check_open()
        return self._load_actions(True)

    def get_action(self, action_id: str) -> Action:
        raw = self.state.get(str(action_id).encode(), self.state.actions)
        if raw is not None:
            return Action.from_row(unpack(raw))
        for row in self._queued_action_rows():
            if row["id"] == str(action_id):
                return Action.from_row(row)
        raise KeyError(f"no action with id {action_id!r}")

    def _wal_action_rows(self, known: dict) -> dict:
        """Read-only stores: what the WAL says of actions LMDB does not know yet.

        A dry (read-only) recovery pass over the log: committed actions not yet applied,
        logged compensation states, and — when no writer holds the store (it crashed) —
        the intents of transactions that never committed, which are owed compensations.
        """
        from .layout import writer_alive
        from .recovery import Recovery
        undo = ActionRecovery()
        rec = Recovery(self.layout.root, self.store_id, self.state, "skip-corrupt", None,
                       undo.handlers(), dry_run=True)
        rec.run()
        out = {aid: row for aid, row in undo.committed.items() if aid not in known}
        out.update(undo.final)
        if not writer_alive(self.layout):
            for a in undo.rows_to_write(rec.report.losers):
                out.setdefault(a.id, a.row())
        return out

    def _queued_action_rows(self) -> list[dict]:
        """Actions of commits not yet applied to LMDB (their rows are not there yet)."""
        queued = self._unapplied_commits(published_only=False)
        return [row for e in queued for row in e.extra.get("actions", ())]

    def resolve(self, action_id: str, note: str | None = None) -> Action:
        """Mark a pending or failed compensation as handled by hand."""
        self._check_open()
        self._check_writable()
        action = self.get_action(action_id)
        if action.state not in OPEN_STATES:
            raise WalstoreError(f"action {action_id} is {action.state}; only pending or failed "
                                f"compensations can be resolved")
        action.state, action.error = RESOLVED, note
        self._record_state(action)
        return action

    def retry_compensations(self) -> list[Action]:
        """Run every owed compensation that has a compensator now; returns those still open."""
        self._check_open()
        owed = [a for a in self.pending_compensations() if a.compensate in self.compensators]
        self._compensate(owed, raise_on_failure=False)
        return self.pending_compensations()


def _newest_first(a: Action):
    """Newest first by when the intent was logged (its LSN), then by id."""
    txid, _, seq = a.id.partition(".")
    return (-a.lsn, -int(txid), -int(seq or 0))


class ActionRecovery:
    """Recovery's view of actions: intents of losers, and compensation states in the WAL.

    Fed record by record by walstore.recovery; afterwards ``rows_to_write(losers)`` gives
    the LMDB rows that make the ``actions`` database agree with the log: every loser's
    uncompensated action becomes ``pending`` (to compensate now, or list), and the last
    logged state of every action wins over an older row.
    """

    def __init__(self) -> None:
        self.open: dict[int, dict[str, Action]] = {}
        self.final: dict[str, dict] = {}
        self.committed: dict[str, dict] = {}
        self.points: dict[str, dict | None] = {}

    def handlers(self) -> dict:
        return {RecordType.ACTION_INTENT: self._intent, RecordType.ACTION_RESULT: self._result,
                RecordType.COMPENSATED: self._compensated, RecordType.COMMIT: self._ended,
                RecordType.ABORT: self._ended, RecordType.ROLLBACK_PREPARED: self._ended,
                RecordType.RESTORE_POINT: self._point}

    def _intent(self, rec, body: dict) -> None:
        a = Action(str(body["id"]), int(body["tx"]), str(body.get("name", "?")), body.get("args"),
                   None, str(body.get("key", "")), body.get("compensate"),
                   ts=body.get("ts", 0.0), lsn=rec.lsn)
        self.open.setdefault(a.txid, {})[a.id] = a

    def _result(self, rec, body: dict) -> None:
        a = self.open.get(body.get("tx"), {}).get(body.get("id"))
        if a is not None:
            a.result = body.get("result")
            a.error = body.get("error")

    def _compensated(self, rec, body: dict) -> None:
        if isinstance(body.get("id"), str):
            self.final[body["id"]] = body

    def _ended(self, rec, body: dict) -> None:
        self.open.pop(body.get("tx"), None)
        for row in body.get("actions", ()) if rec.type == RecordType.COMMIT else ():
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                self.committed[row["id"]] = row

    def _point(self, rec, body: dict) -> None:
        """Restore points named (or dropped) in the log; the last word per name wins."""
        name = body.get("name")
        if isinstance(name, str):
            self.points[name] = None if body.get("drop") else {
                "name": name, "lsn": rec.lsn, "ts": body.get("ts", 0.0)}

    def rows_to_write(self, losers: list[int]) -> list[Action]:
        rows = {aid: Action.from_row(row) for aid, row in self.final.items()}
        for txid in losers:
            for a in self.open.get(txid, {}).values():
                if a.id not in rows and a.compensate:
                    a.state = PENDING
                    a.error = "its transaction did not commit before a crash"
                    rows[a.id] = a
        return list(rows.values())
