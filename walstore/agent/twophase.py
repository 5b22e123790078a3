"""Two-phase commit: prepared (in-doubt) transactions that survive crashes.

``tx.prepare(gid)`` validates the transaction and logs a PREPARE record with its writes,
reads, scanned ranges, action ids and the scopes it works for (durable before it
returns); from then on it is *held*: conflicting transactions cannot commit over it
(:class:`PreparedSet`), and it takes no more writes or actions; a rewind reaching into a
scope it works for (its own, its undo fence's, one of its actions was declared in), or a
purge across one, is refused until it is decided (``PreparedSet.check_undo``).  After a
crash the prepared set is rebuilt from LMDB (PREPARE rows are applied like any event) and
recovery leaves it in doubt: neither undone nor compensated.

Deciding goes through the same places as everything else: ``commit_prepared`` is an
ordinary commit through the one pipeline (its COMMIT carries ``gid``; applying it records
the decision); ``rollback_prepared`` logs ROLLBACK_PREPARED — durable — *then*
compensates the transaction's actions and puts back its files (newest first), so a crash
in a compensator leaves them ``pending`` (and the files owed) for the next open, never
forgotten; an interrupt (Ctrl-C) from the decision's append on does not skip the undo:
the files go back and the interrupt is raised after (the compensations not yet run stay
owed).  Decisions are kept so a coordinator
(:mod:`walstore.agent.coordinator`) can be asked after a crash what it decided: for good,
one ``d:<gid>`` row each, which retention never trims (under presumed abort a forgotten
commit would read as an abort, and a late participant would roll back what committed).

In a copy (backup, restore), a transaction prepared in the source (``Engine.inherited``:
its txid is below the first one the copy gave) is the source's: its fate and its side
effects are decided there.  Rolling it back here rolls back its state as usual but runs
none of its compensations and puts back none of its files (CONTRACT 4.10): a
FILE_RESTORED ``held`` for its file effects, then its ROLLBACK_PREPARED with ``copied``,
whose apply makes its actions ``pending`` and ``held`` (listed, never run automatically:
``store.resolve``, ``retry_compensations(include_held=True)``), as the first open of the
copy does with the debts it inherited (``Engine._hold_copied_debts``).  A transaction
prepared in the copy itself is undone as anywhere else.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import fileio
from ..errors import CompensationFailed, EmptyArgumentError, UnknownGid
from ..log.format import RecordType
from ..engine.conflicts import Prepared, works_for
from ..engine.pipeline import CommitRequest
from ..signals import deferred
from .actions import Action, Saga, UndoProgress
from .scope import check_scope

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
        # (a str of the wrong length is the right type with a bad value: both, so
        # ``except ValueError`` catches it as it does an empty key's, and ``except
        # TypeError`` as it always did)
        raise (EmptyArgumentError if isinstance(gid, str) else TypeError)(
            f"a gid must be a non-empty str of at most 200 bytes, not {_short(gid)}")
    return gid


def _short(gid: Any) -> str:
    text = repr(gid)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _summary(p: Prepared) -> dict[str, Any]:
    held = {f: sum(len(rels) for _root, rels in p.extra.get(f) or ())
            for f in ("file_reads", "file_lists")}
    return {"gid": p.gid, "txid": p.txid, "keys": len(p.writes), "ts": p.ts,
            "meta": p.meta, "files_read": held["file_reads"],
            "dirs_listed": held["file_lists"]}


class TwoPhase:
    def __init__(self, engine: "Engine", saga: Saga, undo_files=None) -> None:
        self.engine = engine
        self.saga = saga
        # (txid, effects, UndoProgress) -> None: undo an ended transaction's effects (its
        # owed actions and file effects, AgentHooks.undo_ended); (txid) -> list: its file
        # effects still owed (Files.effects_of)
        self.undo_files = undo_files
        self.effects_of = None
        # (txid) -> list: the LSNs of its file effects still owed, read from its rows only
        # (Files.step_lsns_of: no workspace is read, a copy's may be on another machine)
        self.file_lsns_of = None
        # txids whose decision is logged and whose undo runs: they keep their file claims
        # (shared with agent.files.Files, which reads it)
        self.undoing: set[int] = set()

    def prepare(self, tx: "Transaction", gid: str, file_fields: dict | None = None) -> None:
        check_gid(gid)
        tx.check_writable()
        live = [a for a in tx.effects if isinstance(a, Action)]
        extra = self.saga.commit_fields(tx)
        extra.pop("actions", None)
        extra.update(file_fields or {})  # the COMMIT of the decision names its file effects
        # the scopes it works for besides its own: a rewind reaching into one waits for
        # its decision (PreparedSet.check_undo), after a crash too (the PREPARE says them)
        fence = works_for(None, tx.undo_fence, [a.scope for a in live])
        for scope in fence:  # (a fence is set by hand: one that is no scope, logged, made
            try:             # the PREPARE's row unreadable and the store unopenable)
                check_scope(scope)
            except (TypeError, ValueError) as e:
                raise type(e)(f"transaction {tx.id} cannot be prepared: its undo fence "
                              f"{tx.undo_fence!r} holds what is no scope ({e}); nothing "
                              f"was logged") from None
        p = Prepared(gid, tx.id, tx.seal_writes(), sorted(tx.read_keys),
                     list(tx.read_ranges), tx.meta, [a.id for a in live],
                     self.engine.clock(), extra, tx.scope, fence=fence)
        tx.logged = True
        self.engine.pipeline.prepare(p, tx.read_set(), tx.commit_check)

    def prepared(self) -> list[str]:
        eng = self.engine
        eng.check_open()
        if not eng.readonly:
            return sorted(eng.prepared.by_gid)
        eng.refresh()  # (the gids only: no prepared transaction's write set is kept)
        return sorted(eng.views.prepared_summaries(lambda row: row["gid"]))

    def summaries(self) -> list[dict[str, Any]]:
        """Every prepared transaction in one pass, sorted by gid, as a summary (gid, txid,
        number of writes, prepare time, meta, workspace paths read and directories
        listed): what ``walstore prepared`` lists.  (It asked ``details`` per gid, and a
        read-only store rebuilt every prepared row, write sets and all, for each: N in
        doubt cost N x N — 2,000 took 34 s.)"""
        eng = self.engine
        eng.check_open()
        if not eng.readonly:
            rows = [_summary(p) for p in list(eng.prepared.by_gid.values())]
        else:
            eng.refresh()
            rows = eng.views.prepared_summaries(lambda row: _summary(Prepared.from_row(row)))
        rows.sort(key=lambda r: r["gid"])
        return rows

    def _lookup(self, gid: str, values: bool = True) -> Prepared | None:
        """The prepared transaction ``gid`` (None: none), without building the others: a
        read-only store read every prepared row, write sets and all, to answer for one
        gid (``decision`` and ``prepared_details`` per gid over 2,000 in doubt: 27 ms a
        call, a loop over them quadratic)."""
        eng = self.engine
        if not eng.readonly:
            p = eng.prepared.by_gid.get(gid)
            if p is None or p.values or not values:
                return p
            # (the prepared set keeps keys only: the values from the PREPARE's row)
            row = eng.views.prepared_row(gid, include_unpublished=True, prepare_only=True)
            return None if row is None else Prepared.from_row(row)
        eng.refresh()
        row = eng.views.prepared_row(gid)
        return None if row is None else Prepared.from_row(row)

    def details(self, gid: str) -> Prepared:
        return self._get(gid)

    def _get(self, gid: str, values: bool = True) -> Prepared:
        """``values``: with its written values (else, on a writer, the keys only: what a
        rollback needs, without reading what may be a huge row)."""
        check_gid(gid)
        self.engine.check_open()
        p = self._lookup(gid, values)
        if p is None:
            raise UnknownGid(f"no prepared transaction with gid {gid!r}; "
                             f"{self._fate(gid)}", gid)
        return p

    def _fate(self, gid: str) -> str:
        """What became of a gid that is not prepared, for UnknownGid's message.  (It said
        "no prepared transaction with gid 'g'" alone, of a gid committed or rolled back
        a moment before as of one never seen: a coordinator retrying its commit after a
        crash could not tell "done already" from "its prepare was lost" — audit 58.)"""
        try:
            decided = self.engine.views.decision(gid)
        except Exception:  # (the message only: the refusal stands as it is)
            decided = None
        if decided == "commit":
            return "it was committed already (nothing changed now)"
        if decided == "abort":
            return "it was rolled back already (nothing changed now)"
        if decided == "prepared":
            return "another caller's decision of it is being made durable (nothing changed now)"
        return "none was prepared or decided under it in this store (nothing changed)"

    def commit_prepared(self, gid: str) -> int:
        """Commit a prepared transaction through the commit pipeline; returns its LSN."""
        p = self._get(gid)
        self.engine.check_writable()  # (a read-only store has no pipeline: ReadOnlyError)
        body = dict(p.extra, gid=gid)
        body.pop("file_reads", None)  # (what it read was held until now: not the COMMIT's)
        body.pop("file_lists", None)
        legacy = {str(r["id"]): r for r in p.legacy_actions}
        rows = [self.engine.views.action_row(aid) or legacy.get(aid) for aid in p.actions]
        actions = [dict(r, state="committed") for r in rows if r is not None]
        if actions:
            body["actions"] = actions
        req = CommitRequest(p.txid, list(p.writes), p.meta, None, body, gid=gid)
        return self.engine.pipeline.commit(req).lsn

    def rollback_prepared(self, gid: str) -> None:
        """Log the decision (durable), release the holds, then undo the transaction's
        effects (compensate its actions, put back its files, newest first).

        Once the decision is appended the undo is owed, and an interrupt (Ctrl-C, a
        raising timer: walstore.signals) does not skip it: the append, the release and
        the wait for the decision's fsync are one ``deferred()`` section (an interrupt
        the mask could not hold off there is kept, as the commit pipeline keeps one in
        its fsync wait), and one that lands after it — reading the effects, entering the
        undo — is kept in the undo's ``UndoProgress``: the files still go back, the
        compensations not yet run stay owed (``pending_compensations()``), and the
        interrupt is raised at the end (as ``Saga.end_without_commit`` does after an
        ABORT).  Before, an interrupt there left the state rolled back while the file
        held the prepared content, its path claimed (ConflictError for every later
        writer), ``decision(gid)`` reading "prepared", the charge neither compensated
        nor listed as owed, until the store was closed and reopened.

        In a copy, a transaction prepared in its source is rolled back without undoing
        anything outside the state: its actions and file effects are held (see the
        module docstring)."""
        p = self._get(gid, values=False)
        eng = self.engine
        eng.check_writable()
        inherited = eng.inherited(p.txid)  # (a copy's, from its source: held, not undone)
        held_files = self.file_lsns_of(p.txid) if inherited and self.file_lsns_of else []
        progress = UndoProgress()
        decided = False
        effects: list | None = None
        # its actions' compensations are this thread's from the decision (which makes them
        # owed) to the end of the undo (Saga.reserved): another thread's
        # retry_compensations ran them in the window between the two — older ones before
        # the newer ones' file changes went back, and this call returned before their
        # outcome was known.  Read here (a prepared transaction's actions cannot change),
        # reserved with the decision, in its deferred section: no interruptible step is
        # added between the decision and its durability wait
        mine = [] if inherited else [Action.from_row(dict(r, id=str(r["id"]), tx=p.txid))
                                     for r in (*self.engine.views.action_rows_of(p.txid),
                                               *p.legacy_actions)]
        claimed: list[str] = []
        try:
            while True:
                try:
                    if not decided:
                        with deferred():
                            event = self._log_decision(p, gid, inherited, held_files,
                                                       mine, claimed)
                            decided = True
                            self._decision_durable(event, p, progress)
                            fileio.fault_point("rollback_prepared.decided")  # (tests: a
                            # retry racing the undo; in the deferred section, no new
                            # interrupt point)
                    if effects is None:  # (the same objects on a call again: the
                        # undo tracks them by id)
                        effects = self._owed_effects(p.txid, inherited)
                    self._undo(p.txid, effects, progress)
                    return
                except CompensationFailed as e:
                    if not decided:
                        raise
                    # the decision stands (durable before any compensation ran): say so,
                    # else it read as a rollback_prepared that had failed, to be retried
                    # (UnknownGid then) — the gid is no longer in doubt
                    e.args = (f"{e.args[0] if e.args else e}; the rollback of gid {gid!r} "
                              f"is decided (no longer prepared), only these "
                              f"compensations are still owed",) + tuple(e.args[1:])
                    raise
                except Exception:
                    raise  # (CommitOutcomeUnknown, FileConflictError)
                except BaseException as e:  # an interrupt: the undo still runs
                    if not decided or progress.finished:
                        raise  # (before the decision: still prepared, nothing changed)
                    progress.interrupt = progress.interrupt or e
        finally:
            if decided:  # (first: one C call, its effect made before any interrupt point)
                self.undoing.discard(p.txid)
            if claimed:  # (an interrupt at release's very call released nothing: once more)
                try:
                    self.saga.release(claimed)
                except BaseException:
                    self.saga.release(claimed)
                    raise

    def _log_decision(self, p: Prepared, gid: str, inherited: bool = False,
                      held_files: list | None = None, reserve: list | None = None,
                      claimed: list[str] | None = None):
        """Append the ROLLBACK_PREPARED and take the gid out of the prepared set, under
        the journal lock (inside the caller's ``deferred()`` section); returns its event.
        ``inherited`` (a copy's transaction from its source): its file effects
        (``held_files``, their LSNs) are held first, then the decision carries ``copied``
        (its actions held): any prefix of the two a crash leaves undoes nothing here.
        ``reserve``: actions whose compensations are reserved for this thread (ids into
        ``claimed``) just before the decision makes them owed."""
        eng = self.engine
        with eng.journal.lock:
            eng.check_writable()
            if gid not in eng.prepared:  # (decided meanwhile, by another thread: its
                raise UnknownGid(          # decision stands, and one is logged, not two)
                    f"no prepared transaction with gid {gid!r} (it was just decided by "
                    f"another caller); nothing was rolled back", gid)
            if reserve:
                self.saga.reserve(reserve, claimed if claimed is not None else [])
            self._log_legacy_actions(p)
            body: dict[str, Any] = {"tx": p.txid, "gid": gid}
            if inherited:
                if held_files:
                    eng.journal.append(RecordType.FILE_RESTORED, {
                        "tx": p.txid, "effects": sorted(held_files), "held": True}, p.txid)
                body["copied"] = True
            event = eng.journal.append(RecordType.ROLLBACK_PREPARED, body, p.txid)
            self.undoing.add(p.txid)  # (its paths stay claimed until they are put back)
            eng.prepared.remove(gid)
            return event

    def _decision_durable(self, event, p: Prepared, progress: UndoProgress) -> None:
        """Wait for the decision's fsync (a failed one: in doubt again, CommitOutcomeUnknown).
        An interrupt that lands in the wait anyway (another thread took the signal) does
        not end it: kept in ``progress``, raised once the undo is done."""
        eng = self.engine
        ticket, event.ticket = event.ticket, None  # (kept here for a second wait)
        while True:
            try:
                eng.pipeline.durable_or_unknown(eng.journal.force_durable, event, p.txid,
                                                f"the rollback of {p.gid!r}", "the decision",
                                                ticket, undecided=p)
                return
            except Exception:
                raise
            except BaseException as e:
                progress.interrupt = progress.interrupt or e

    def _owed_effects(self, txid: int, inherited: bool = False) -> list:
        """What the decided transaction owes here: its owed actions, then its file
        effects, held ones excepted — nothing for one a copy ``inherited`` (its decision
        and the FILE_RESTORED before it hold them all)."""
        if inherited:
            return []
        owed = [a for a in (Action.from_row(r) for r in self.engine.views.action_rows_of(txid))
                if a.owed and not a.held]
        if self.effects_of is not None:
            return owed + self.effects_of(txid)
        return owed

    def _undo(self, txid: int, effects: list, progress: UndoProgress) -> None:
        if self.undo_files is not None:
            self.undo_files(txid, effects, progress)  # (AgentHooks.undo_ended)
            return
        if progress.interrupt is None:
            self.saga.compensate([a for a in effects if isinstance(a, Action)])
        progress.finished = True
        if progress.interrupt is not None:
            raise progress.interrupt

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
        # (a read-only store's prepared set is the one it reads: its engine's in-memory
        # one stays empty)
        if self._lookup(gid, values=False) is not None:
            return "prepared"
        return self.engine.views.decision(gid)

    def settled_decision(self, gid: str, timeout: float = 60.0) -> str | None:
        """``decision(gid)`` once no decision of it is being made durable: while another
        caller's COMMIT or ROLLBACK_PREPARED of it waits for its fsync (it reads
        "prepared" then under durability="full", and "commit"/"abort" at its append,
        before that fsync, under "normal") this waits, up to ``timeout`` seconds, as
        ``Transaction._await_decision`` does.  "unknown": that fsync failed (the gid is
        back in doubt, the next open decides), the store closed meanwhile, or the
        decision was still not durable after ``timeout``.  (resolve_atomic read the
        coordinator's COMMIT in flight as "prepared", took it for "roll back", and rolled
        back the participants of a group the coordinator then committed — audit 68.)"""
        check_gid(gid)
        eng = self.engine
        eng.check_open()
        if eng.readonly:  # (no decision is made in this process)
            return self.decision(gid)
        deadline = time.monotonic() + timeout
        while True:
            if gid in eng.pipeline.in_doubt:  # (its decision's fsync failed)
                return "unknown"
            if gid in eng.prepared:  # (in doubt, no decision under way)
                return "prepared"
            synced = eng.wal.synced_lsn if eng.journal.durability == "normal" else None
            decided = eng.views.decision(gid, synced)
            if decided != "prepared":
                return decided
            if eng.closed or time.monotonic() >= deadline:
                return "unknown"
            time.sleep(0.001)
