"""Crash recovery: analysis and REDO over the WAL in one streaming pass, and the judgement
of what a damaged log gives up.  (UNDO is the engine's: it ends every loser found here the
way a rollback ends, see ``Engine._undo_losers``.)

Owns the decision of what the log *is* after a crash: where it ends, which bytes are a
torn tail (cut and kept in ``<store>/quarantine``), which damage is real corruption, and
what each recovery mode gives up; and whether LMDB's state is this store's at all
(``check_owner``: its ``meta`` ``owner`` stamp).  REDO brings LMDB forward by applying
every log event past LMDB's ``applied`` LSN with the same ``Applier.apply`` the live
store uses; the losers are the transactions with logged intents (LMDB's ``inflight`` table, plus intents
in the redone tail) that neither committed nor ended, minus the prepared (in doubt) ones.

Modes (after RocksDB's WAL recovery modes):

``strict`` (default)
    A torn tail is cut (normal crash outcome).  Anything else refuses with a
    CorruptionError naming file, offset, LSN and reason; nothing is changed (the engine
    judges the whole log read-only first).
``tolerate-tail``
    Like strict, but corruption inside the *last* segment is cut there too, and every
    valid record behind the cut is reported as given up.  Damage elsewhere still refuses.
``point-in-time``
    Stop at the first damage anywhere; keep the consistent prefix; quarantine the rest
    (later segments included) and report what was given up.
``skip-corrupt``
    Skip damaged regions and go on with the next valid record (salvage).  Each skipped
    region is quarantined and reported; prefix consistency may be lost.

Invariants: nothing is deleted (cut bytes and dropped segments go to quarantine first,
fsynced); nothing of the log is cut or moved before REDO holds, durably, what the pass
learnt from it (the actions it owes), so a pass killed half-way and run again owes the
same; all reading goes through walstore.log.reader; the pass costs what the retained WAL
costs, which checkpoints keep small; running it twice is harmless.
"""
from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .. import fileio
from ..errors import CorruptionError
from ..log import records
from ..log.format import SEGMENT_HEADER_SIZE, RecordType
from ..log.reader import LogEvent, LogReader, Record, SegmentReader, WalProgress
from ..log.segment import SPARE_NAME, stray_entries
from . import tables
from .apply import PREPARED_PREFIX, Applier
from .lmdb_check import check_lmdb_paths, walk_lmdb_data_file
from .lmdb_state import LmdbState, from_u64, iter_rows, read_chunk, u64

MODES = ("strict", "tolerate-tail", "point-in-time", "skip-corrupt")
# meta: the store LMDB's state belongs to (the first 8 bytes of its store id, a u64), put
# by every writable open; 0 or absent: not known (a store written before it, a rebuild)
OWNER = b"owner"
REDO_BATCH = 2000
_ENDS = frozenset({RecordType.COMMIT, RecordType.ABORT, RecordType.ROLLBACK_PREPARED})
# the records of a transaction's write set: its WRITES chunks, then its COMMIT or PREPARE
_CHUNKED = frozenset({RecordType.WRITES, RecordType.COMMIT, RecordType.PREPARE})


@dataclass
class Problem:
    """One thing recovery found wrong, and what it did about it."""

    kind: str  # torn-tail | stale-bytes | corrupt-record | bad-segment | gap | lmdb-ahead
    #            | bad-payload | missing-segment | truncated | dropped-segment
    #            | given-up-action (an action in records given up: owed, ``_owe_given_up``)
    #            | stray-file (an entry of wal/ the log does not read: ``_check_strays``)
    file: str
    offset: int
    lsn: int
    reason: str
    bytes: int = 0
    action: str = ""    # cut | refused | skipped | dropped | owed | left
    quarantined: str | None = None


@dataclass
class RecoveryReport:
    mode: str = "strict"
    segments: int = 0
    records: int = 0
    wal_bytes: int = 0
    applied_before: int = 0
    applied_after: int = 0
    end_lsn: int = 0
    commits_seen: int = 0
    redone: int = 0
    losers: list = field(default_factory=list)
    torn_bytes: int = 0
    problems: list = field(default_factory=list)
    given_up_records: int = 0
    given_up_txids: list = field(default_factory=list)
    # bytes of segments dropped whole that no valid record of this store could be read
    # from (past LMDB's applied LSN): given up without knowing what they held
    given_up_unreadable_bytes: int = 0
    salvaged: bool = False  # holes were skipped: the store seals this log after recovery
    compensated: list = field(default_factory=list)
    pending_compensations: list = field(default_factory=list)
    in_doubt: list = field(default_factory=list)
    seconds: float = 0.0
    lmdb_pages_checked: int = 0  # LMDB pages read and checked before REDO wrote (crash)
    unclean: bool = False  # the last writer had not closed the store cleanly

    @property
    def clean(self) -> bool:
        return not self.problems and not self.losers and not self.in_doubt

    def as_dict(self) -> dict:
        d = asdict(self)
        d["clean"] = self.clean
        return d


@dataclass
class LogPosition:
    """Where appending resumes: the last segment and the file offset of its end."""

    segment_start: int
    offset: int
    create_new: bool = False  # no usable segment: create one at ``segment_start``


def owner_of(store_id: bytes) -> int:
    """The ``meta`` ``owner`` value of the store ``store_id`` (never 0: 0 is "not known")."""
    return int.from_bytes(store_id[:8], "big") or 1


def check_owner(state: LmdbState, store_id: bytes) -> None:
    """CorruptionError naming the data file when LMDB's state belongs to another store (a
    ``db/`` put back from another store: two stores of one script make the same LSNs and
    txids, so the log's anchor check passed, and the open showed the other store's values
    over this one's log, exit 0; verify alone saw it, and only in keys the log still
    held)."""
    owner = state.meta_int(OWNER, 0)
    if owner and owner != owner_of(store_id):
        reason = (f"LMDB's state belongs to another store (its owner stamp {owner:016x} is "
                  f"not this store's {owner_of(store_id):016x}: a db/ copied from another "
                  f"store?): put this store's own db/ back, or restore from a backup")
        raise CorruptionError(f"foreign-state: {reason}", file=state.data_file)


class _Stop(Exception):
    """Point-in-time recovery met damage: everything after it is given up."""


class Recovery:
    """One recovery run over a store's WAL and LMDB state."""

    def __init__(self, root: str, store_id: bytes, state: LmdbState, mode: str = "strict",
                 progress: Callable[[int, int], None] | None = None,
                 dry_run: bool = False, check_lmdb: bool = False,
                 action_key: Callable[[int, str], str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown recovery mode {mode!r}; choose one of {', '.join(MODES)}")
        self.root = root
        self.wal_dir = os.path.join(root, "wal")
        self.qdir = os.path.join(root, "quarantine")
        self.store_id = store_id
        self.state = state
        self.applier = Applier(state)
        self.mode = mode
        self.progress = progress
        self.dry_run = dry_run  # walk and judge only: no file, no LMDB row is changed
        # after an unclean shutdown: check the LMDB pages each REDO batch will touch first
        self.check_lmdb = check_lmdb and not dry_run
        self._walked = False  # the whole file was checked (an event the key list can't map)
        self.report = RecoveryReport(mode=mode)
        # the idempotency key the action of (txid, id) was given (the engine's: its store's
        # key namespace), for one whose intent record was lost: "" when not known
        self.action_key = action_key or (lambda _txid, _aid: "")
        self.applied = state.applied_lsn()
        self.wal_start = state.meta_int(b"wal_start")  # where a sealed log begins
        self.max_txid = 0
        self.redo: list[records.Event] = []
        self.tail_events: list[records.Event] = []  # dry run: the events REDO would apply
        self.open_txids: set[int] = set()
        self.prepared_txids: set[int] = set()
        self._intents: set[str] = set()  # action ids whose ACTION_INTENT this pass redid
        self._orphans: dict[str, tuple[int, int]] = {}  # action id -> (txid, result LSN)
        # the actions whose ACTION_INTENT a cut or a dropped segment gave up (valid records
        # past the damage): txid -> {action id -> [intent body, result body, state]}; an
        # intent is durable before the action's body runs, so each may have run while its
        # transaction's commit is given up with it (``_owe_given_up``)
        self._given_up_actions: dict[int, dict[str, list]] = {}
        self._redo_end = 0  # end LSN of the newest event given to REDO
        # what the pass destroys in the log (a cut's zeroing, a dropped segment's move to
        # quarantine), done only once REDO made durable what the walk learnt from those
        # bytes (``_destroy_after_redo``): see ``run``
        self._destroy: list[Callable[[], None]] = []
        # (LSN, txid) of the last commit LMDB applied: the log must hold that commit there
        self._anchor: tuple[int, int] | None = self._last_applied_commit()
        # ... and no commit that wrote keys after it may end at or below ``applied``: LMDB
        # holds every such commit it applied (its ``bylsn`` row, in the same LMDB
        # transaction as ``applied``; every commit's since 4481ba1), so one it does not
        # hold below ``applied`` means that LSN is wrong
        self._anchor_lsn = self._anchor[0] if self._anchor is not None else None
        self._assembler = records.CommitAssembler()
        self._early: dict[int, list] = {}  # txid -> raw write lists of chunks before applied
        self._new_segment_at: int | None = None
        self._end: tuple[int, int, int] | None = None  # (segment start, offset, LSN)
        self._log: LogReader | None = None

    # ---- the pass ----------------------------------------------------------------------
    def run(self) -> LogPosition:
        t0 = time.monotonic()
        check_owner(self.state, self.store_id)
        rep = self.report
        rep.applied_before = self.applied
        self._check_strays()  # (first, dry run too: a refusal changes nothing)
        self._load_open_transactions()
        log = LogReader(self.wal_dir, self.store_id, self.applied, self.wal_start,
                        resume_after_corruption=self.mode == "skip-corrupt")
        rep.segments = len(log.segments)
        rep.wal_bytes = log.total_bytes
        self._log = log
        self._sync_segments(log.segments)  # (before REDO writes LMDB: see there)
        if self._anchor is not None and (not log.segments
                                         or self._anchor[0] < log.segments[0][0]):
            self._anchor = None  # (its segment was trimmed: nothing to compare)
        progress = self.progress
        step = WalProgress(log, progress, rep.wal_bytes)
        try:
            for item in log.walk():
                if isinstance(item, Record):
                    self._feed(item)
                    if progress is not None and item.offset >= step.next_at:
                        step.inside(item.offset)
                    continue
                self._handle(item)
                if item.kind == "end" and progress:
                    # (bytes_done counts a segment once the walk has left it: at its own
                    # "end" it held only the segments before, so the last call was short
                    # of the total by a segment — (0, total) for a one-segment log)
                    step.ended(item.reader.file_size)
        except _Stop as stop:
            self._drop_after(log, *stop.args)
        self._owe_given_up()  # (first: an action known by its given-up result alone is
        self._owe_orphans()   # owed as an orphan is)
        self._flush_redo()
        self._destroy_after_redo()
        position = None
        rep.end_lsn = self.applied
        if self._end is not None:
            seg_start, offset, rep.end_lsn = self._end
            position = LogPosition(seg_start, offset)
        if self._new_segment_at is not None:
            position = None
        if rep.end_lsn < max(self.applied, self.state.applied_lsn()):
            self._lmdb_ahead()
            position = None
        if position is None:
            position = LogPosition(max(rep.end_lsn, self.state.applied_lsn()),
                                   SEGMENT_HEADER_SIZE, create_new=True)
        else:
            self._sync_tail(position)
        self._remove_temp_files()  # (after the walk: a refusal leaves every file as it was)
        rep.losers = sorted(self.open_txids - self.prepared_txids)
        rep.applied_after = self.state.applied_lsn()
        rep.seconds = time.monotonic() - t0
        return position

    def _destroy_after_redo(self) -> None:
        """Zero the cut bytes and move the dropped segments away, now that REDO holds,
        durably, what the walk learnt from them: a salvage mode's owed actions (their
        intents, ``_owe_given_up``) are known only from the bytes it gives up.  Done while
        walking, a recovery killed between the cut and REDO left a log that no longer
        showed them, and the next run (harmless, it is promised) forgot charges that had
        run: neither compensated nor listed (a SIGKILL at the point-in-time cut's renames:
        56 of 77 refunds, then 20).  The quarantine copies are made while walking."""
        if not self._destroy or self.dry_run:
            return
        self.state.sync()  # (LMDB's meta page too: REDO's last commit survives a power loss)
        todo, self._destroy = self._destroy, []
        for step in todo:
            step()

    def _handle(self, ev: LogEvent) -> None:
        """React to one non-record item of the walk."""
        rep = self.report
        # (a gap by where its hole begins: the next segment's start lies past the anchor
        # when the hole swallowed it, and the check then refused a salvage as foreign-log)
        at = ev.expected if ev.kind == "gap" and ev.expected is not None else ev.lsn
        if self._anchor is not None and at <= self._anchor[0] and not (
                ev.kind == "end" and ev.verdict == "clean"):
            self._anchor = None  # (damage before it: the mode judges that, not this check)
        if ev.kind == "gap":
            self._damage("gap", ev.path, 0, ev.lsn, ev.reason, False)
            if self.mode == "point-in-time":
                raise _Stop(ev.lsn, True, ev.reason)
            return
        if ev.kind in ("bad-segment", "vanished"):
            self._damage("bad-segment", ev.path, 0, ev.lsn, ev.reason, ev.last)
            if self.mode == "point-in-time":
                raise _Stop(ev.lsn, True, ev.reason)
            self._drop_segment(ev.path, ev.lsn, ev.reason)
            return
        if ev.kind == "missing-next":
            self._damage("missing-segment", ev.path, 0, ev.lsn, ev.reason, True)
            self._new_segment_at = ev.lsn  # accepted: the log goes on in a new segment
            return
        # a segment's end
        end, reader = ev.scan, ev.reader
        self._end = (reader.start_lsn, end.offset, end.lsn)
        if ev.verdict == "clean":
            return
        if ev.verdict in ("stale", "torn"):
            kind = "stale-bytes" if ev.verdict == "stale" else "torn-tail"
            self._quarantine_range(reader, end.offset, end.damaged_end, kind, ev.reason, "cut")
            if ev.verdict == "torn":
                rep.torn_bytes += end.damaged_bytes
            return
        kind = "truncated" if end.kind == "truncated" else "corrupt-record"
        self._damage(kind, reader.path, end.offset, end.lsn, ev.reason, ev.last)
        if self.mode == "skip-corrupt" and end.next_valid is not None:
            self._quarantine_range(reader, end.offset, end.next_valid.offset, "corrupt-record",
                                   ev.reason, "skipped", zero=False)
            rep.salvaged = True
            return
        self._cut(reader, end.offset, ev.reason)
        if self.mode == "point-in-time":
            raise _Stop(reader.start_lsn, False)

    def _feed(self, rec: Record) -> None:
        self.report.records += 1
        if self._anchor is not None and rec.end_lsn > self._anchor[0]:
            self._check_anchor(rec)  # (first: another log in place of this one, foreign-log,
            # also puts ``applied`` off its records)
        if rec.lsn < self.applied < rec.end_lsn:
            self._applied_damaged(rec)
        try:
            body = records.decode(rec.payload)
            early = self._early_writes(rec, body)
            ev = self._assembler.feed(rec.type, rec.lsn, rec.end_lsn, body, len(rec.payload))
            if rec.type == RecordType.WRITES and len(self._early) > 1:
                # (chunk sets the assembler dropped as a crash's leftovers, its bound
                # passed: their raw lists go too — the same bound on them all)
                for txid in [t for t in self._early if t not in self._assembler.sizes]:
                    del self._early[txid]
            if (ev is not None and ev.writes and ev.type == RecordType.COMMIT
                    and self._anchor_lsn is not None and self._anchor_lsn < ev.lsn
                    and ev.end <= self.applied):
                self._applied_damaged(rec)  # (one that wrote keys: older walstores wrote
                # no bylsn row for a commit of actions alone in a batch without key writes)
            if early and ev is not None and ev.writes is not None:
                ev.writes = [w for raw in early for w in records.parse_writes(raw)] + ev.writes
        except ValueError as e:
            reason = f"record of type {rec.type} has a valid checksum but a bad payload: {e}"
            self._bad_payload(rec, reason)
            return
        if ev is None:
            return
        self.max_txid = max(self.max_txid, ev.txid)
        if ev.type == RecordType.COMMIT:
            self.report.commits_seen += 1
        if ev.lsn < self.applied:
            return
        t = ev.type
        if t == RecordType.ACTION_INTENT:
            self.open_txids.add(ev.txid)
            self._intents.add(str(ev.body.get("id")))
        elif t == RecordType.ACTION_RESULT:
            self._orphan_result(ev)
        elif t in _ENDS:
            self.open_txids.discard(ev.txid)
            self.prepared_txids.discard(ev.txid)
            if self._given_up_actions:  # (a segment dropped before its end: it ended)
                self._given_up_actions.pop(ev.txid, None)
        elif t == RecordType.PREPARE:
            self.prepared_txids.add(ev.txid)
        self.redo.append(ev)
        self._redo_end = ev.end
        if len(self.redo) >= REDO_BATCH:
            self._flush_redo()

    def _early_writes(self, rec: Record, body: dict) -> list | None:
        """The write lists of a record wholly before LMDB's applied LSN are not parsed:
        LMDB holds them (a checkpoint's segment starts with what it applied, tens of MB of
        writes parsed and thrown away on every crash, twice in strict mode).  Framing,
        checksum, the payload map and the txid are checked as for any record; the keys are
        ``verify``'s.  A chunk (WRITES) may belong to a commit REDO applies: its list is
        kept raw and parsed when that commit comes (``_feed``), dropped when the commit
        was applied or the transaction ended.  Returns the raw lists to put before the
        writes of the event this record completes."""
        t = rec.type
        if t not in _CHUNKED and t not in _ENDS:
            return None
        txid = records.txid_of(body)
        if t == RecordType.WRITES:
            if rec.end_lsn <= self.applied and isinstance(body.get("w"), list):
                self._early.setdefault(txid, []).append({"w": body["w"]})
                body["w"] = []
            return None
        early = self._early.pop(txid, None)
        if t in _CHUNKED and rec.end_lsn <= self.applied:
            if isinstance(body.get("w"), list):
                body["w"] = []  # (an event before ``applied``: dropped by _feed anyway)
            return None
        return early if t in _CHUNKED else None

    def _last_applied_commit(self) -> tuple[int, int] | None:
        """(LSN, txid) of the newest commit LMDB applied (its ``bylsn`` row), or None."""
        st = self.state
        with st.read() as txn:
            cur = txn.cursor(db=st.bylsn)
            # the last row below ``applied`` (a commit at L is applied once its end is)
            found = cur.prev() if cur.set_range(u64(self.applied)) else cur.last()
            if not found:
                return None
            key = cur.key()
            lsn, txid = (from_u64(key, 0, "bylsn", None, st),
                         from_u64(cur.value(), 0, "bylsn", key, st))
        return (lsn, txid) if lsn < self.applied else None

    def _applied_damaged(self, rec: Record) -> None:
        """LMDB's ``applied`` LSN is not where an apply can leave it: inside a record (an
        apply ends at a record's end), or past a commit LMDB does not hold.  One flipped
        bit there made REDO skip acknowledged commits, the open reporting nothing (or a
        read-only open hide the whole tail; probe-disk42).  Refused in every mode: which
        records LMDB holds is unknown, and REDO of one applied already is not harmless."""
        where = (f"inside the record at LSN {rec.lsn} (it ends at {rec.end_lsn})"
                 if rec.lsn < self.applied < rec.end_lsn else
                 f"past the commit at LSN {rec.lsn}, which LMDB does not hold (the last "
                 f"commit it holds is at LSN {self._anchor_lsn})")
        path = self._segment_of(rec.lsn)
        reason = (f"LMDB's applied LSN {self.applied} lies {where}: its meta row is damaged; "
                  f"nothing was changed: restore from a backup or a replica, or rebuild "
                  f"LMDB from the log (`walstore recover PATH --rebuild-state`, when the log "
                  f"reaches back to LSN 0)")
        self.report.problems.append(Problem("applied-damaged", path, rec.offset, rec.lsn,
                                            reason, action="refused"))
        raise CorruptionError(f"applied-damaged: {reason}", file=path, offset=rec.offset,
                              lsn=rec.lsn)

    def _check_anchor(self, rec: Record) -> None:
        """The first record reaching past LMDB's last applied commit must be that commit.
        A segment copied from a backup or restored copy of this store (the same store id,
        so its records validate here) that diverged before it would else be REDOne over
        LMDB as if it were this store's log: two histories mixed, acknowledged commits
        replaced.  Refused in every mode (no mode gives up a log that is not this one)."""
        lsn, txid = self._anchor
        self._anchor = None
        found = None
        if rec.lsn == lsn and rec.type == RecordType.COMMIT:
            try:
                found = records.txid_of(records.decode(rec.payload))
            except ValueError:
                pass
        if found == txid:
            return
        try:
            name = RecordType(rec.type).name
        except ValueError:
            name = str(rec.type)
        what = (f"a {name} record at LSN {rec.lsn}" if rec.lsn != lsn
                or rec.type != RecordType.COMMIT else f"the commit of transaction {found}")
        path = self._segment_of(rec.lsn)
        reason = (f"the WAL is not the log LMDB applied: LMDB's last applied commit is "
                  f"transaction {txid} at LSN {lsn}, but the log holds {what} there (a "
                  f"segment from another copy of this store, a backup or a restored one, in "
                  f"place of its own?); nothing was changed: put the store's own segment back, "
                  f"or restore from a backup")
        self.report.problems.append(Problem("foreign-log", path, rec.offset, rec.lsn, reason,
                                            action="refused"))
        raise CorruptionError(f"foreign-log: {reason}", file=path, offset=rec.offset,
                              lsn=rec.lsn)

    def _segment_of(self, lsn: int) -> str:
        path = self.wal_dir
        for start, p in self._log.segments if self._log is not None else ():
            if start <= lsn:
                path = p
        return path

    def _orphan_result(self, ev: records.Event) -> None:
        """An ACTION_RESULT whose ACTION_INTENT is neither in LMDB nor redone in this pass
        (skip-corrupt skipped it, or it was cut): the action ran, so its transaction is in
        flight like any with an intent, and the action gets a row from what is known (REDO
        of the result alone changed nothing: the charge was listed nowhere)."""
        aid = str(ev.body.get("id"))
        if aid in self._intents:
            return
        st = self.state
        with st.read() as txn:
            if txn.get(aid.encode(), db=st.actions) is not None:
                return
        self._intents.add(aid)
        self._orphans[aid] = (ev.txid, ev.lsn)
        self.open_txids.add(ev.txid)
        self.redo.append(records.Event(ev.lsn, ev.lsn, RecordType.ACTION_INTENT, ev.txid, {
            "tx": ev.txid, "id": aid, "name": None, "args": None,
            "key": self.action_key(ev.txid, aid),  # (the one thing an operator settling
            "compensate": None, "ts": 0.0, "intent_lost": True}))  # it can ask the
        # external system about: it is made from the id, so known without the intent)

    def _owe_orphans(self) -> None:
        """An action whose intent was lost, in a transaction that did not commit, is owed
        (``pending``): what compensates it is unknown, so it is listed, never run, and the
        ABORT that ends its transaction would call it 'declares no compensation'."""
        losers = self.open_txids - self.prepared_txids
        for aid, (txid, lsn) in self._orphans.items():
            if txid not in losers:
                continue
            key = self.action_key(txid, aid)
            ask = (f"; its idempotency key was {key}: ask the external system whether it "
                   f"acted under it" if key else "")
            self.redo.append(records.Event(self._redo_end, self._redo_end,
                                           RecordType.COMPENSATED, txid, {
                "id": aid, "state": "pending",
                "error": f"its ACTION_INTENT record was lost to damage in the log, but its "
                         f"ACTION_RESULT (LSN {lsn}) survives: it ran; its name, arguments "
                         f"and compensation are unknown, and its transaction did not commit"
                         f"{ask}: settle it by hand (walstore resolve)"}))

    def _bad_payload(self, rec: Record, reason: str) -> None:
        """A record whose checksum is right but whose payload does not decode: skipped
        (skip-corrupt), or the log is cut there (when the mode accepts it)."""
        segs = self._log.segments
        i = max(j for j, (start, _p) in enumerate(segs) if start <= rec.lsn)
        start, path = segs[i]
        self._damage("bad-payload", path, rec.offset, rec.lsn, reason, i == len(segs) - 1)
        if self.mode == "skip-corrupt":
            self.report.problems[-1].action = "skipped"
            self.report.salvaged = True
            self._count_given_up(rec)  # (skipped: given up, as a cut's records are)
            return
        reader = SegmentReader(path, self.store_id, start)
        self._cut(reader, rec.offset, reason)
        self._end = (start, rec.offset, rec.lsn)
        raise _Stop(start, False)

    def _flush_redo(self) -> None:
        batch = self.redo
        if not batch:
            return
        self.redo = []
        if self.dry_run:
            self.tail_events.extend(batch)
            return
        if self.check_lmdb and not self._walked:
            self._check_pages(batch)
        self.applier.apply(batch, batch[-1].end)
        self.report.redone += sum(1 for e in batch if e.type == RecordType.COMMIT)

    def _check_pages(self, batch: list) -> None:
        """Before REDO writes a batch into LMDB after a crash: read and check (in Python,
        lmdb_check) the pages it will touch, so a damaged page is a CorruptionError naming
        data.mdb, never LMDB dying of SIGBUS/SIGABRT inside the write.  The pages are those
        on the paths to the keys below (what ``Applier`` reads and writes for these event
        types); an event this list does not map checks the whole file once instead."""
        keys = _touched_keys(batch)
        rep = self.report
        if keys is None:
            rep.lmdb_pages_checked += walk_lmdb_data_file(self.state.data_file)
            self._walked = True
            return
        rep.lmdb_pages_checked += check_lmdb_paths(self.state.data_file, keys)

    def _load_open_transactions(self) -> None:
        """Transactions LMDB knows to be in flight (intents applied, no end yet) and
        prepared ones (in doubt: never losers)."""
        st = self.state
        with st.read() as txn:
            for raw, _v in read_chunk(txn, st.inflight, b"", None, False, None, limit=1 << 62):
                self.open_txids.add(from_u64(raw, 0, "inflight", None, st))
            # (one row at a time: a list of them all held every in-doubt transaction's
            # write set at once — audit 58)
            for k, raw in iter_rows(txn, st.twophase, PREPARED_PREFIX, b"p;"):
                row = tables.unpack_row(raw, "twophase", k, st.data_file)
                self.prepared_txids.add(row.get("tx"))
            self.max_txid = max(0, from_u64(txn.get(b"next_txid", db=st.meta), 0, "meta",
                                            b"next_txid", st) - 1)

    # ---- damage handling ---------------------------------------------------------------
    def _damage(self, kind: str, path: str, offset: int, lsn: int, reason: str, last: bool) -> None:
        """Record a problem; refuse unless the mode accepts giving this up."""
        accepted = (self.mode in ("point-in-time", "skip-corrupt")
                    or (self.mode == "tolerate-tail" and last))
        self.report.problems.append(Problem(kind, path, offset, lsn, reason,
                                            action="" if accepted else "refused"))
        if not accepted:
            raise CorruptionError(f"{kind}: {reason}", file=path, offset=offset, lsn=lsn)
        if self.mode == "skip-corrupt" and kind in ("gap", "bad-segment"):
            self.report.salvaged = True

    def _cut(self, reader: SegmentReader, offset: int, reason: str) -> None:
        """Give up everything from ``offset`` to the end of this segment (quarantined).  A
        truncated segment is given back its made size, zero-filled, so the log can go on."""
        for rec in reader.valid_records_after(offset - 1):
            self._count_given_up(rec)
        self._quarantine_range(reader, offset, reader.nonzero_end(offset), "corrupt-record",
                               reason, "cut")
        if not self.dry_run and reader.made_size > reader.file_size:
            def regrow(path: str = reader.path, size: int = reader.made_size) -> None:
                fd = fileio.open_file(path, os.O_RDWR)  # (after REDO, as the cut's zeroing:
                try:                                     # the truncation stays evidence
                    os.ftruncate(fd, size)               # until then)
                    fileio.fsync(fd)
                finally:
                    os.close(fd)
            self._destroy.append(regrow)

    def _count_given_up(self, rec: Record) -> None:
        if rec.end_lsn <= self.applied or rec.type == RecordType.SEAL:
            return  # LMDB already holds it (or it is structure): nothing is lost
        self.report.given_up_records += 1
        if rec.type in records.TX_RECORDS:  # every record of a transaction, not only
            try:                            # COMMITs: a cut intent or result gives it up too
                body = records.decode(rec.payload)
                txid = records.txid_of(body)
            except ValueError:
                return
            if txid not in self.report.given_up_txids:
                self.report.given_up_txids.append(txid)
            try:  # (a record whose fields fail their check is the bad payload the cut
                records.check_fields(rec.type, body)  # gave up, not an action: its id "x"
            except ValueError:  # was REDOne as an owed action row no reader could take,
                return          # probe-audit60)
            self._note_given_up_action(rec.type, txid, body, rec.lsn)

    def _note_given_up_action(self, rtype: int, txid: int, body: dict, lsn: int) -> None:
        """Keep what a given-up ACTION_INTENT, ACTION_RESULT or COMPENSATED record says
        of its action (``_owe_given_up``)."""
        if rtype not in (RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                         RecordType.COMPENSATED):
            return
        aid = body.get("id")
        if not isinstance(aid, str):
            return
        acts = self._given_up_actions.setdefault(txid, {})
        row = acts.setdefault(aid, [None, None, None, lsn])
        row[{RecordType.ACTION_INTENT: 0, RecordType.ACTION_RESULT: 1}.get(rtype, 2)] = body
        if rtype == RecordType.ACTION_RESULT:
            row[3] = lsn

    def _owe_given_up(self) -> None:
        """The actions a salvage mode gave up with the log past damage (a cut, a segment
        dropped) whose transaction did not end in the log kept: their intents were durable
        before their bodies ran, so each may have run, and its transaction is not in the
        recovered state.  Each is REDOne from its given-up records (intent, and result when
        there) as the loser it now is: UNDO compensates it (its compensator registered) or
        lists it pending, and the report names it.  (Given up silently, its side effect
        stood with nothing owed, and `verify` said ok: probe-audit51.)  One a given-up
        COMPENSATED record says was compensated or resolved is settled: nothing is owed."""
        if not self._given_up_actions or self.dry_run:
            return
        st = self.state
        for txid, acts in sorted(self._given_up_actions.items()):
            owed = []
            for aid, (intent, result, ended, lsn) in acts.items():
                if (intent is None and result is None) or aid in self._intents:
                    continue
                if ended is not None and ended.get("state") in ("compensated", "resolved"):
                    continue
                with st.read() as txn:
                    if txn.get(aid.encode(), db=st.actions) is not None:
                        continue
                owed.append((aid, intent, result, lsn))
            if not owed:
                continue
            self.open_txids.add(txid)
            self.max_txid = max(self.max_txid, txid)
            for aid, intent, result, lsn in owed:
                self._intents.add(aid)
                at = max(self._redo_end, self.applied)  # (never below what LMDB holds)
                if intent is None:  # (only its result was readable: owed as an orphan,
                    self._orphans[aid] = (txid, lsn)  # its name and compensation unknown)
                    intent = {"tx": txid, "id": aid, "name": None, "args": None,
                              "key": self.action_key(txid, aid), "compensate": None,
                              "ts": 0.0, "intent_lost": True}
                self.redo.append(records.Event(at, at, RecordType.ACTION_INTENT, txid,
                                               dict(intent)))
                if result is not None:
                    self.redo.append(records.Event(at, at, RecordType.ACTION_RESULT, txid,
                                                   dict(result)))
                self.report.problems.append(Problem(
                    "given-up-action", self.wal_dir, 0, at,
                    f"action {aid} ({intent.get('name')!r}) of transaction {txid} was in the "
                    f"log given up: it may have run, and its transaction is not in the "
                    f"recovered state; it is compensated now, or listed pending",
                    action="owed"))

    def _drop_after(self, log: LogReader, lsn: int, inclusive: bool, reason: str = "") -> None:
        """Everything after a cut is given up: drop every segment after the one that starts
        at ``lsn`` (and that one too when ``inclusive``: a gap or a bad header there)."""
        for start, path in log.segments:
            if (start >= lsn if inclusive else start > lsn) and os.path.lexists(path):
                why = reason if start == lsn and reason else "after the point-in-time cut"
                self._drop_segment(path, start, why)

    def _drop_segment(self, path: str, start: int, reason: str) -> None:
        try:
            reader = SegmentReader(path, self.store_id, start)
            held = self._count_dropped(reader)
        except FileNotFoundError:
            if not os.path.lexists(path):
                return  # (gone: nothing to drop)
            # its name leads to no file (a symlink to a disk not mounted): the name is
            # dropped, else the recovery "accepted" it and left a log no open could read
            held = " (its name leads to no file; what it held is unknown)"
        if self.dry_run:
            return
        dest = self._quarantine_name(os.path.basename(path))
        self.report.problems.append(Problem("dropped-segment", path, 0, start,
                                            reason + held, os.lstat(path).st_size, "dropped",
                                            dest))

        def move() -> None:  # (after REDO: ``_destroy_after_redo``)
            fileio.make_dir(self.qdir)
            fileio.rename(path, dest)
            fileio.fsync_dir(self.qdir)
            fileio.fsync_dir(self.wal_dir)
            self._write_note(dest, {"file": path, "reason": reason, "action": "dropped"})
        self._destroy.append(move)

    def _count_dropped(self, reader: SegmentReader) -> str:
        """Count what a segment given up whole held (given_up_records, given_up_txids):
        its records, read by the one reader, behind a header that failed its check too
        (best effort, as this store's segment at the position its name says: a damaged
        header does not damage the records behind it), and the valid records behind
        damage inside it, as a cut counts them.  Non-zero bytes past LMDB's applied LSN
        that no valid record covers are counted as given_up_unreadable_bytes.  Returns
        what to add to the dropped-segment problem's reason."""
        if reader.header_error is not None and not reader.read_past_bad_header():
            return ""  # (no store id to read it as: never so in recovery)
        before = self.report.given_up_records
        floor = max(SEGMENT_HEADER_SIZE, reader.offset_of(self.applied))
        pos = SEGMENT_HEADER_SIZE  # file offset up to which the bytes are accounted for
        unreadable = 0
        first = last = None

        def held(rec: Record) -> None:
            nonlocal pos, unreadable, first, last
            if rec.offset >= pos:
                unreadable += max(0, rec.offset - max(pos, floor))
            pos = max(pos, reader.offset_of(rec.end_lsn))
            if rec.end_lsn > self.applied and rec.type != RecordType.SEAL:
                first = rec.lsn if first is None else first
                last = rec.end_lsn
            self._count_given_up(rec)

        for rec in reader.records():
            held(rec)
        end = reader.end
        if end.kind != "clean" and not end.sealed:  # damage inside it: what lies behind
            for rec in reader.valid_records_after(end.offset):
                held(rec)
        unreadable += max(0, reader.nonzero_end(pos) - max(pos, floor))
        self.report.given_up_unreadable_bytes += unreadable
        n = self.report.given_up_records - before
        notes = []
        if reader.past_bad_header:
            notes.append("read behind its damaged header as this store's segment at LSN "
                         f"{reader.start_lsn}")
        if n:
            notes.append(f"{n} valid records given up (LSN {first} to {last})")
        if unreadable:
            notes.append(f"{unreadable} bytes no valid record could be read from, given "
                         f"up unread")
        elif not n:
            notes.append("nothing in it past LMDB's applied LSN was given up")
        return " (" + "; ".join(notes) + ")"

    def _quarantine_range(self, reader: SegmentReader, start: int, end: int, kind: str,
                          reason: str, action: str, zero: bool = True) -> None:
        """Copy bytes [start, end) of a segment to quarantine, then zero them in place.

        ``zero=False`` leaves them (a salvaged hole: the store seals that log afterwards).
        """
        if end <= start or self.dry_run:
            return
        with open(reader.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        dest = self._quarantine_name(f"{os.path.basename(reader.path)}@{start}")
        fileio.make_dir(self.qdir)
        fileio.write_file_atomic(dest, data)
        self._write_note(dest, {"file": reader.path, "offset": start, "lsn": reader.lsn_at(start),
                                "bytes": len(data), "kind": kind, "reason": reason,
                                "action": action})
        if zero:
            def wipe(path: str = reader.path, n: int = len(data)) -> None:  # (after REDO:
                fd = fileio.open_file(path, os.O_RDWR)                      # see
                try:                                                        # _destroy_after_redo)
                    fileio.pwrite_all(fd, bytes(n), start)
                    fileio.fdatasync(fd)
                finally:
                    os.close(fd)
            self._destroy.append(wipe)
        prob = Problem(kind, reader.path, start, reader.lsn_at(start), reason, len(data), action,
                       dest)
        for i, p in enumerate(self.report.problems):  # replace the un-actioned entry, if any
            if p.file == reader.path and p.offset == start and not p.action:
                self.report.problems[i] = prob
                break
        else:
            self.report.problems.append(prob)

    def _quarantine_name(self, base: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dest = os.path.join(self.qdir, f"{base}.{stamp}.bin")
        n = 1
        while os.path.exists(dest):
            n += 1
            dest = os.path.join(self.qdir, f"{base}.{stamp}.{n}.bin")
        return dest

    @staticmethod
    def _write_note(dest: str, note: dict) -> None:
        fileio.write_file_atomic(dest + ".json", json.dumps(note, indent=2).encode())

    def _lmdb_ahead(self) -> None:
        applied = self.state.applied_lsn()
        reason = (f"the WAL ends at LSN {self.report.end_lsn} but LMDB has applied events up "
                  f"to {applied}: acknowledged log records were lost")
        self.report.problems.append(Problem("lmdb-ahead", self.wal_dir, 0, self.report.end_lsn,
                                            reason,
                                            action="" if self.mode != "strict" else "refused"))
        if self.mode == "strict":
            raise CorruptionError(reason, file=self.wal_dir, lsn=self.report.end_lsn)

    def _check_strays(self) -> None:
        """Name every entry of ``wal/`` the log does not read (``stray_entries``): a
        segment renamed was silently left out (its records given up, or a "gap" beside
        the very file that fills it, never named).  One in the way of the temp files this
        pass removes (a directory named ``spare.tmp``) refuses, in every mode, before
        anything changes: the open died of a bare EISDIR after REDO.  Nothing is moved."""
        for path, why, blocking in stray_entries(self.wal_dir, self.store_id):
            self.report.problems.append(Problem("stray-file", path, 0, 0, why,
                                                action="refused" if blocking else "left"))
            if blocking:
                raise CorruptionError(f"stray-file: {why}", file=path)

    def _remove_temp_files(self) -> None:
        """A ``.tmp`` segment is a creation cut short, the spare an unused preallocation:
        neither ever held a record."""
        if self.dry_run:
            return
        for name in os.listdir(self.wal_dir):
            if name.endswith(".tmp") or name == SPARE_NAME:
                fileio.unlink(os.path.join(self.wal_dir, name))

    def _sync_segments(self, segments: list) -> None:
        """Make durable every segment that may hold records past LMDB's ``applied``,
        before REDO commits any of them to LMDB (which syncs): the log before the data,
        as the live store does.  A crashed writer's last records (durability "normal" or
        "none", or a "full" commit killed before its fsync) may sit only in the page
        cache; REDO made LMDB durable first and fdatasynced the tail after, so a power
        loss in between left LMDB ahead of the log, and strict recovery refused the
        store for good ("LMDB has applied events up to ...: acknowledged log records
        were lost")."""
        if self.dry_run:
            return
        for (_start, path), (next_start, _) in zip(segments, segments[1:] + [(None, None)]):
            if next_start is not None and next_start <= self.applied:
                continue  # (wholly applied: nothing of it goes to LMDB)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue  # (a FIFO or directory by that name: the walk judges it)
                fd = fileio.open_file(path, os.O_RDONLY)
            except OSError:
                continue  # (missing or unreadable: the walk names it)
            try:
                fileio.fdatasync(fd)
            finally:
                os.close(fd)

    def _sync_tail(self, position: LogPosition) -> None:
        """What the last segment holds may sit only in the page cache: make it durable."""
        if self.dry_run:
            return
        path = os.path.join(self.wal_dir, f"{position.segment_start:020d}.wal")
        fd = fileio.open_file(path, os.O_RDWR)
        try:
            fileio.fdatasync(fd)
        finally:
            os.close(fd)


_MAPPED = frozenset({RecordType.COMMIT, RecordType.ABORT, RecordType.ROLLBACK_PREPARED,
                     RecordType.PREPARE, RecordType.COMMIT_PREPARED,
                     RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                     RecordType.COMPENSATED})


def _touched_keys(batch: list) -> dict[bytes, list[bytes]] | None:
    """The keys, per LMDB table, REDO of ``batch`` reads or writes in the tables that grow
    with the store (the small ones are checked whole); None when an event is of a kind
    (a purge, file steps, a restore point...) this does not map."""
    keys: dict[bytes, list[bytes]] = {name: [] for name in (
        b"data", b"hist", b"hkeys", b"txns", b"bylsn", b"actions", b"aended", b"inflight")}
    for e in batch:
        if e.type not in _MAPPED:
            return None
        if e.type == RecordType.COMMIT and e.packed_body is None and "purge" in e.body:
            return None
        keys[b"bylsn"].append(u64(e.lsn))
        keys[b"aended"].append(u64(e.lsn))
        if e.txid >= 0:
            txk = tables.txid_key(e.txid)
            keys[b"txns"].append(txk)
            keys[b"inflight"].append(txk)
            keys[b"actions"].append(tables.action_prefix(e.txid))
        if e.type in (RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                      RecordType.COMPENSATED):
            keys[b"actions"].append(str(e.body.get("id")).encode())
        elif e.type == RecordType.COMMIT:  # (rows of older transactions an undo or a
            for name in ("crossed", "compensate", "redo", "unredo"):  # savepoint names)
                keys[b"actions"].extend(str(a).encode() for a in e.field(name, ()) or ())
            keys[b"actions"].extend(str(a.get("id")).encode()
                                    for a in e.field("actions", ()) or ()
                                    if isinstance(a, dict))
        for k, _v in e.writes or ():
            keys[b"data"].append(k)
            keys[b"hkeys"].append(k)
            keys[b"hist"].append(tables.hist_key(k, 0))
            keys[b"hist"].append(tables.hist_key(k, e.lsn))
    # the ``owed`` index follows the action rows (the same ids, prefixes) and its stamp
    keys[b"owed"] = keys[b"actions"] + [tables.OWED_STAMP]
    return keys
