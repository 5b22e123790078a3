"""Two-phase commit: prepared (in-doubt) transactions that survive crashes.

``tx.prepare(gid)`` validates the transaction and logs a PREPARE record with its writes,
reads, scanned ranges and action ids (durable before it returns); from then on it is
*held*: conflicting transactions cannot commit over it (:class:`PreparedSet`), and it
takes no more writes or actions.  After a crash the prepared set is rebuilt from LMDB
(PREPARE rows are applied like any event) and recovery leaves it in doubt: neither undone
nor compensated.

Deciding goes through the same places as everything else: ``commit_prepared`` is an
ordinary commit through the one pipeline (its COMMIT carries ``gid``; applying it records
the decision); ``rollback_prepared`` logs ROLLBACK_PREPARED — durable — *then*
compensates the transaction's actions and puts back its files (newest first), so a crash
in a compensator leaves them ``pending`` (and the files owed) for the next open, never
forgotten.  Decisions are kept so a coordinator
(:mod:`walstore.agent.coordinator`) can be asked after a crash what it decided: for good,
one ``d:<gid>`` row each, which retention never trims (under presumed abort a forgotten
commit would read as an abort, and a late participant would roll back what committed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnknownGid
from ..log.format import RecordType
from ..engine.conflicts import Prepared
from ..engine.pipeline import CommitRequest
from .actions import Action, Saga

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..engine.transaction import Transaction


def check_gid(gid: Any) -> str:
    if isinstance(gid, str) and not gid.isascii():
        try:
            gid.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"gid {gid!r} is not valid UTF-8 text: {e.reason}; nothing "
                             f"changed") from None
    if not isinstance(gid, str) or not gid or len(gid.encode()) > 200:
        raise TypeError(f"a gid must be a non-empty str of at most 200 bytes, not "
                        f"{_short(gid)}")
    return gid


def _short(gid: Any) -> str:
    text = repr(gid)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


class TwoPhase:
    def __init__(self, engine: "Engine", saga: Saga, undo_files=None) -> None:
        self.engine = engine
        self.saga = saga
        self.undo_files = undo_files  # (txid) -> None: put back an ended txn's file effects
        # txids whose decision is logged and whose undo runs: they keep their file claims
        # (shared with agent.files.Files, which reads it)
        self.undoing: set[int] = set()

    def prepare(self, tx: "Transaction", gid: str, file_fields: dict | None = None) -> None:
        check_gid(gid)
        tx._check_writable()
        live = [a for a in tx.effects if isinstance(a, Action)]
        extra = self.saga.commit_fields(tx)
        extra.pop("actions", None)
        extra.update(file_fields or {})  # the COMMIT of the decision names its file effects
        p = Prepared(gid, tx.id, list(tx.writes.items()), sorted(tx.read_keys),
                     list(tx.read_ranges), tx.meta, [a.id for a in live],
                     self.engine.clock(), extra, tx.scope)
        tx.logged = True
        self.engine.pipeline.prepare(p, tx.read_set())

    def prepared(self) -> list[str]:
        self.engine.check_open()
        return sorted(self._current())

    def _current(self) -> dict[str, Prepared]:
        """gid -> Prepared: the writer's in-memory set, or (a read-only store, beside a
        writer or not) the prepared rows of LMDB and the log it follows."""
        eng = self.engine
        if not eng.readonly:
            return eng.prepared.by_gid
        eng.refresh()
        return {gid: Prepared.from_row(row) for gid, row in eng.views.prepared_rows().items()}

    def details(self, gid: str) -> Prepared:
        return self._get(gid)

    def _get(self, gid: str) -> Prepared:
        check_gid(gid)
        self.engine.check_open()
        p = self._current().get(gid)
        if p is None:
            raise UnknownGid(f"no prepared transaction with gid {gid!r}", gid)
        return p

    def commit_prepared(self, gid: str) -> int:
        """Commit a prepared transaction through the commit pipeline; returns its LSN."""
        p = self._get(gid)
        self.engine.check_writable()  # (a read-only store has no pipeline: ReadOnlyError)
        body = dict(p.extra, gid=gid)
        legacy = {str(r["id"]): r for r in p.legacy_actions}
        rows = [self.engine.views.action_row(aid) or legacy.get(aid) for aid in p.actions]
        actions = [dict(r, state="committed") for r in rows if r is not None]
        if actions:
            body["actions"] = actions
        req = CommitRequest(p.txid, list(p.writes), p.meta, None, body, gid=gid)
        return self.engine.pipeline.commit(req).lsn

    def rollback_prepared(self, gid: str) -> None:
        """Log the decision (durable), release the holds, then compensate the actions."""
        p = self._get(gid)
        eng = self.engine
        eng.check_writable()
        with eng.journal.lock:
            eng.check_writable()
            if gid not in eng.prepared:  # (decided meanwhile, by another thread: its
                raise UnknownGid(          # decision stands, and one is logged, not two)
                    f"no prepared transaction with gid {gid!r} (it was just decided by "
                    f"another caller); nothing was rolled back", gid)
            self._log_legacy_actions(p)
            event = eng.journal.append(RecordType.ROLLBACK_PREPARED, {"tx": p.txid, "gid": gid},
                                       p.txid)
            self.undoing.add(p.txid)  # (its paths stay claimed until they are put back)
            eng.prepared.remove(gid)
        try:
            eng.pipeline.durable_or_unknown(eng.journal.force_durable, event, p.txid,
                                            f"the rollback of {gid!r}", "the decision",
                                            undecided=p)  # (a failed fsync: in doubt again)
            owed = [Action.from_row(r) for r in eng.views.action_rows_of(p.txid)]
            if self.undo_files is not None:
                self.undo_files(p.txid, [a for a in owed if a.owed])
            else:
                self.saga.compensate([a for a in owed if a.owed])
        finally:
            self.undoing.discard(p.txid)

    def _log_legacy_actions(self, p: Prepared) -> None:
        """The actions of a transaction prepared by walstore 0.1.0 (only its PREPARE row
        holds them, ``Prepared.legacy_actions``): log their intents and results as this
        version does at ``tx.action``, so the ROLLBACK_PREPARED that follows makes them
        owed and compensating records them, like any other (without them it compensated
        nothing and listed nothing: the side effect stayed done, unsaid).  Under the
        journal lock; an action whose row exists (logged by an earlier rollback that
        crashed before its decision) is not logged again."""
        eng = self.engine
        for row in p.legacy_actions:
            aid = str(row["id"])
            if eng.views.action_row(aid, include_unpublished=True) is not None:
                continue
            body = {"tx": p.txid, "id": aid, "name": row.get("name"),
                    "args": row.get("args"), "key": row.get("key", ""),
                    "compensate": row.get("compensate"), "ts": row.get("ts", 0.0)}
            eng.journal.append(RecordType.ACTION_INTENT, body, p.txid)
            if row.get("result") is not None or row.get("error") is not None:
                eng.journal.append(RecordType.ACTION_RESULT, {
                    "tx": p.txid, "id": aid, "result": row.get("result"),
                    "error": row.get("error")}, p.txid)

    def decision(self, gid: str) -> str | None:
        """What this store decided for ``gid``: "commit", "abort", "prepared" or None."""
        check_gid(gid)  # (as prepared_details: a gid no prepare can have is a TypeError)
        self.engine.check_open()
        if gid in self._current():  # (a read-only store's prepared set is the one it reads:
            return "prepared"         # its engine's in-memory one stays empty)
        return self.engine.views.decision(gid)
