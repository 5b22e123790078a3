"""Read-only consistency checks of a store: ``walstore verify`` and tests call these.

Checks, without writing a byte: the identity file; every segment header; every record's
checksum, LSN and payload; that every blob of file content the store refers to (what its
blob gc keeps: ``Files.referenced``, read through a read-only open) is in files/blobs (a
backup that lacked them verified clean — probe57; so did one lacking the whole files/
directory, which was taken for a store without files; the writer's gc is held off
meanwhile, as ``walstore backup`` does) and hashes to its name, and that each one that is
a watch's saved manifest loads (a damaged blob verified clean while reading it raised
CorruptionError — probe-disk; this reads every referenced blob once); the continuity of
the segment chain (and a sealed last segment, which proves a newer one went missing); that
LMDB's ``applied`` LSN lies inside the log; that for every key written by a commit in the
retained WAL at or below ``applied``, LMDB holds exactly the last value the WAL gave it as
of that point (WAL vs LMDB, read through the history index in short read transactions, so
a writer may run meanwhile: a key whose history its purge or retention erased after
``applied`` was read is counted in a warning, not compared); that every LMDB value and
row decodes (history before-images too: damage inside a row is named by table and key),
every u64 key and value 8 bytes long
(a damaged ``applied`` or ``wal_start`` is listed, and the WAL vs LMDB comparison, which
needs ``applied``, skipped when it is the one damaged).  A torn tail is a warning (it is
what recovery cuts), anything else an error.  All log reading goes through
walstore.log.reader.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

from ..codec import decode_key, unpack_value
from ..errors import CorruptionError, WalstoreError, type_and_message
from ..engine.lmdb_check import SnapshotMissed, walk_lmdb_data_file
from ..log import records
from ..log.format import RecordType
from ..log.reader import LogReader, Record, WalProgress
from ..log.segment import stray_entries
from ..engine.layout import Layout, writer_alive
from ..engine import tables
from ..engine.lmdb_state import LmdbState
from ..engine.recovery import check_owner
from ..engine.snapshot import SnapshotTooOld, lmdb_value_as_of
from ..agent.actions import compensation_under_way

COMPARE_BATCH = 512
SETTLE_WALKS = 2     # with a live writer: walks that must find an error again (see _settle)
SETTLE_PAUSE = 0.05  # seconds between them
PIN_ATTEMPTS = 8     # read transactions begun to pin the LMDB walk (see _walk_pinned)
MAX_LISTED = 1000    # problems a report names word for word; past it they are counted


class ProblemList(list):
    """The problems a check found: the first ``limit`` kept word for word, the rest only
    counted in ``omitted`` (a store with a million damaged rows made verify build a
    million strings, and ``--json`` print them all: memory grew with the damage)."""

    def __init__(self, items=(), limit: int = MAX_LISTED) -> None:
        super().__init__()
        self.limit, self.omitted = limit, 0
        for x in items:
            self.append(x)

    def append(self, item) -> None:
        if len(self) < self.limit:
            super().append(item)
        else:
            self.omitted += 1

    @property
    def total(self) -> int:
        """Every problem found, listed or not."""
        return len(self) + self.omitted


@dataclass
class VerifyReport:
    """The figures are None for what was not checked (the WAL's when its walk never ran,
    LMDB's when its data file could not be opened or walked, the blobs' when damage found
    before stopped their check): a garbage data.mdb was reported "segments 0, records 0,
    LMDB keys 0" above its error, of a store whose log held every record."""
    path: str
    segments: int | None = None
    records: int | None = None
    commits: int | None = None
    wal_bytes: int | None = None
    lmdb_keys: int | None = None
    keys_checked: int | None = None
    blobs_checked: int | None = None
    blob_bytes_hashed: int | None = None
    applied_lsn: int | None = None
    wal_start: int | None = None
    wal_end_lsn: int | None = None
    errors: ProblemList = field(default_factory=ProblemList)
    warnings: list = field(default_factory=list)
    # what needs a decision, no damage (CONTRACT 3: exit 1 all the same): in-doubt gids,
    # owed compensations (``Action.as_dict()``), and whether the last writer crashed
    in_doubt: list = field(default_factory=list)
    pending_compensations: list = field(default_factory=list)
    # file changes of ended transactions an undo could not put back (their workspace
    # gone, a manifest unreadable): owed, retried at every open ({"txid", "workspace",
    # "changes"}; read only when no writer lives and the last one closed or recovered)
    owed_file_undos: list = field(default_factory=list)
    needs_recovery: bool = False

    @property
    def ok(self) -> bool:
        """Nothing damaged and nothing owed (``settled``)."""
        return not self.errors and self.settled

    @property
    def settled(self) -> bool:
        """No in-doubt transaction and no owed compensation waits for a decision."""
        return not self.in_doubt and not self.pending_compensations \
            and not self.owed_file_undos

    def attention(self, show_gid: Callable[[str], str] = repr) -> list[str]:
        """One line per thing that needs a decision (not damage); ``show_gid`` writes a
        gid (the CLI's: as an operator types it back to ``commit-prepared``)."""
        said = [f"in-doubt prepared transaction {show_gid(gid)}: needs `walstore "
                f"commit-prepared` or `rollback-prepared`" for gid in self.in_doubt]
        for a in self.pending_compensations:
            why = a.get("error") or a.get("state")
            said.append(f"compensation owed: action {a['id']} ({a['name']}, compensator "
                        f"{a.get('compensate')!r}, txid {a['txid']}): {why}")
        for f in self.owed_file_undos:
            said.append(f"file undo owed: {f['changes']} file change(s) of transaction "
                        f"{f['txid']} in workspace {f['workspace']} were not put back "
                        f"(the next open tries again; `walstore recover` says why)")
        return said

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["errors"] = list(self.errors)
        d["errors_omitted"] = self.errors.omitted  # found beyond the MAX_LISTED listed
        d["ok"] = self.ok
        d["settled"] = self.settled
        return d


def verify_store(path: str, progress: Callable[[int, int], None] | None = None,
                 state: LmdbState | None = None,
                 blob_progress: Callable[[int, int], None] | None = None,
                 lmdb_progress: Callable[[int, int], None] | None = None,
                 rows_progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """``progress(bytes done, total)``: the walk of the log; ``blob_progress(bytes
    hashed, total)``: the hashing of the file content the store refers to;
    ``lmdb_progress(bytes, total)``: the walk of LMDB's pages; ``rows_progress(bytes,
    total)``: the decoding of its rows (the rows read as a share of the data file's
    size).  A store of GBs in LMDB with a short WAL (checkpointed) took seconds a GB in
    those two, with nothing shown."""
    layout = Layout(path)
    own_state = state is None
    store_id = None
    try:
        store_id = layout.read_identity()  # (NotAStore: not a store at all, raised)
        if own_state:
            state = LmdbState(layout.db, readonly=True)
    except CorruptionError as e:  # a store whose LMDB state or log cannot even be opened:
        rep = VerifyReport(layout.root)  # the report says so (``--json`` prints it too)
        rep.errors.append(str(e))
        if store_id is not None:  # (its log is checked all the same, on its own)
            _check_wal_alone(layout, store_id, rep, progress)
        return rep
    try:
        rep = VerifyReport(layout.root)
        unreadable = applied_unread = None  # (a damaged u64 row: _check_u64_rows lists it)
        try:
            rep.applied_lsn = state.applied_lsn()
        except CorruptionError as e:
            unreadable = applied_unread = e
        try:
            rep.wal_start = state.meta_int(b"wal_start")
        except CorruptionError as e:  # (0: as if the log never began sealed)
            unreadable = unreadable or e
            rep.wal_start = 0
        try:  # (another store's LMDB: said once, not as every key disagreeing with the log)
            check_owner(state, store_id)
        except CorruptionError as e:
            rep.errors.append(str(e))
            rep.applied_lsn = rep.wal_start = None  # (that store's, not this log's)
            _check_wal_alone(layout, store_id, rep, progress)
            return rep
        last_values = _check_wal(layout, store_id, rep, progress)
        if rep.errors and writer_alive(layout) and unreadable is None:
            last_values = _settle(layout, store_id, rep, state)
        _check_quarantine_dir(layout, rep)  # (after _settle: not a walk's finding)
        try:  # every page of LMDB's trees, in Python, before LMDB's cursors walk them (it
            _walk_pinned(state, os.path.join(layout.db, "data.mdb"),  # asserts on damage)
                         lmdb_progress)
        except CorruptionError as e:
            rep.errors.append(f"LMDB: {e}")
            if unreadable is not None:
                rep.errors.append(str(unreadable))
            return rep  # (comparing would make LMDB walk the damaged pages: SIGABRT)
        if applied_unread is None:  # (else LMDB's position in the log is unknown)
            _compare(state, rep, last_values)
        _check_lmdb(state, rep, rows_progress)
        if not rep.errors:  # (not on damage: the errors above say it.  Not only when
            _check_blobs(layout, rep, blob_progress)  # files/ exists: a copy without it
            # passed — probe)
        if not rep.errors:
            _check_settled(layout, rep, state)
        return rep
    finally:
        if own_state:
            state.close()


def _check_quarantine_dir(layout: Layout, rep: VerifyReport) -> None:
    """``quarantine/`` that is there but no directory (a file, a dangling symlink): every
    recovery that must keep bytes — a torn tail's, a salvage's — fails on it ("exists and
    is not a directory"), while verify said "ok" and "the next open recovers it"
    (probe-audit59)."""
    q = layout.quarantine
    if os.path.lexists(q) and not os.path.isdir(q):
        what = "a dangling symlink" if os.path.islink(q) else "not a directory"
        rep.errors.append(f"{q}: the store's quarantine/ is {what}: a recovery that must "
                          f"keep bytes it cuts (a torn tail, a salvage) fails on it; move "
                          f"it out of the store")


def _check_wal_alone(layout: Layout, store_id: bytes, rep: VerifyReport, progress) -> None:
    """The log checked without LMDB (its data file unreadable, or another store's): every
    record's checksum and payload, and the segment chain from its first segment on;
    whether records below that segment are missing, and LMDB against the log, are not
    known (a warning says so)."""
    rep.applied_lsn = None
    if rep.wal_start is None:  # (nothing says where the log began: its first segment)
        from ..log.segment import list_segments
        segs = list_segments(layout.wal)
        rep.wal_start = segs[0][0] if segs else 0
    _check_wal(layout, store_id, rep, progress)
    rep.warnings.append("the WAL was checked on its own, LMDB being unreadable or another "
                        "store's (whether records before its first segment are missing, "
                        "and LMDB against it, were not)")


def _check_settled(layout: Layout, rep: VerifyReport, state: LmdbState) -> None:
    """What waits for a decision, read through a read-only open (it changes nothing):
    in-doubt prepared transactions and owed compensations (a live writer's actions still
    in flight are not owed).  `walstore verify` said "ok", exit 0, of a store holding an
    in-doubt transaction and a refund owed (CONTRACT 3: exit 1 for those).  A store whose
    writer died is said too (a warning: the next open recovers it; its unfinished
    transactions' actions are listed owed, as `walstore recover` would leave them with
    no compensator registered); ``needs_recovery`` says it, not a warning."""
    from ..store import Store  # (late: the store imports the engine's operations)
    try:
        store = Store(layout.root, readonly=True)
    except WalstoreError as e:  # (what keeps a read-only open out is not this check's)
        rep.warnings.append(f"in-doubt transactions and owed compensations not checked: "
                            f"a read-only open of the store failed ({e})")
        return
    try:
        rep.in_doubt = sorted(store.prepared())
        owed, going = owed_beside_writer(store, lambda: [
            a for a in store.pending_compensations() if not a.in_flight])
        rep.warnings.extend(under_way_text(a) + " (`walstore actions --pending` says when "
                            "it is done)" for a in going)
        rep.pending_compensations = [a.as_dict() for a in owed]
        # (the txids in doubt, from the prepared rows: a read-only handle's in-memory
        # prepared set stays empty, so a prepared transaction's file changes — held
        # until its decision — were said "file undo owed ... the next open tries again"
        # — audit 58)
        in_doubt = set(store.engine.views.prepared_summaries(lambda row: row.get("tx")))
    finally:
        store.close()
    alive = writer_alive(layout)
    rep.needs_recovery = state.meta_int(b"open") == 1 and not alive
    if not alive and not rep.needs_recovery:
        # (a live writer's rows are its open transactions' changes; a crashed store's
        # are undone by the next open: ``needs_recovery`` says so.  A closed or recovered
        # store's rows are undos that failed: `walstore verify` said "ok", exit 0, while
        # `walstore recover` listed them owed, exit 1 — probe-audit54)
        rep.owed_file_undos = _owed_file_undos(state, in_doubt)


def owed_beside_writer(store, fetch) -> tuple[list, list]:
    """(owed, under way): the actions ``fetch()`` lists owed (a read-only ``store``'s),
    less those its live writer is running right now (``compensation_under_way``: its
    rollback logged the ABORT, the outcome is not recorded yet), looked at again a moment
    later (``SETTLE_WALKS``, the store refreshed); those still under way then are the
    second list.  (Counted owed, `walstore verify` of a healthy live store said "needs a
    decision: compensation owed ... its transaction rolled back", exit 1, in 2 runs of 68
    beside a writer whose refunds take a millisecond; a refund through a payment API
    takes hundreds: probe-audit61.)"""
    owed = fetch()
    if not any(map(compensation_under_way, owed)) or not writer_alive(Layout(store.path)):
        return owed, []
    for _ in range(SETTLE_WALKS):
        time.sleep(SETTLE_PAUSE)
        store.refresh()
        owed = fetch()
        if not any(map(compensation_under_way, owed)):
            return owed, []
    return ([a for a in owed if not compensation_under_way(a)],
            [a for a in owed if compensation_under_way(a)])


def under_way_text(a) -> str:
    """How verify's warning and `actions --pending`'s note name one under way."""
    return (f"compensation of action {a.id} ({a.name}, compensator {a.compensate!r}, txid "
            f"{a.txid}) is under way in the live writer (its transaction rolled back; no "
            f"outcome recorded yet): not counted as owed")


def _owed_file_undos(state: LmdbState, in_doubt: set) -> list[dict]:
    """The ``fsteps`` rows no undo put back, per transaction (a prepared one's and a
    copy's held ones are not owed)."""
    by_tx: dict[int, dict] = {}
    for raw, v in state.scan(b"", None, db="fsteps"):
        txid, _lsn = tables.split_fsteps_key(raw)
        row = tables.unpack_row(v, "fsteps", raw, state.data_file)
        if txid in in_doubt or row.get("held"):
            continue
        ws = row.get("ws")
        entry = by_tx.setdefault(txid, {"txid": txid, "workspace": os.fsdecode(ws)
                                        if isinstance(ws, (bytes, str)) else None,
                                        "changes": 0})
        entry["changes"] += 1
    return [by_tx[t] for t in sorted(by_tx)]


def _walk_pinned(state: LmdbState, data_file: str,
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Walk LMDB's pages with a read transaction held open, so a live writer cannot
    recycle a page of the snapshot walked (see ``walk_lmdb_data_file``)."""
    for _attempt in range(PIN_ATTEMPTS):
        try:
            with state.read() as txn:
                return walk_lmdb_data_file(data_file, snapshot=txn.id(), progress=progress)
        except SnapshotMissed:
            continue  # (two commits between the begin and the meta read: again)
    return walk_lmdb_data_file(data_file, progress=progress)  # (unpinned, with its own
    # re-checks)


def _settle(layout: Layout, store_id: bytes, rep: VerifyReport, state: LmdbState) -> dict:
    """A writer is appending while we read: the log's tail may be caught mid-write (a
    record half copied in when we looked, records written after it by the time we looked
    further), which reads exactly like damage followed by valid records; and a checkpoint
    may trim the log's head past the ``applied`` LSN read before.  Real damage stays
    where it is: walk again (twice, a moment apart, each with ``applied`` read anew) and
    keep only the errors every walk found, word for word; counts come from the last."""
    errors = rep.errors
    last: dict = {}
    for _ in range(SETTLE_WALKS):
        time.sleep(SETTLE_PAUSE)
        rep.applied_lsn = state.applied_lsn()  # (``_compare`` reads LMDB as of it)
        again = VerifyReport(rep.path, applied_lsn=rep.applied_lsn, wal_start=rep.wal_start)
        last = _check_wal(layout, store_id, again, None)
        kept = ProblemList(e for e in errors if e in again.errors)
        kept.omitted = min(getattr(errors, "omitted", 0), again.errors.omitted)
        errors = kept
        for f in ("segments", "records", "commits", "wal_bytes", "wal_end_lsn"):
            setattr(rep, f, getattr(again, f))
        rep.warnings = again.warnings
    rep.errors = errors
    return last


def _check_wal(layout: Layout, store_id: bytes, rep: VerifyReport, progress) -> dict:
    """Walk every record; return {key: the ``_digest`` of the last value logged by a commit
    at or below applied} (a digest, not the value: verify's memory grew with the log's
    values, 1.3 GB beside recovery's 55 MB on a 190 MB log)."""
    applied = rep.applied_lsn or 0  # (None: LMDB unread; its position unknown)
    log = LogReader(layout.wal, store_id, applied, rep.wal_start or 0)
    rep.segments = len(log.segments)
    rep.wal_bytes = log.total_bytes
    rep.records = rep.commits = 0
    last: dict[bytes, bytes | None] = {}
    assembler = records.CommitAssembler()
    step = WalProgress(log, progress, rep.wal_bytes)
    for item in log.walk():
        if isinstance(item, Record):
            rep.records += 1
            if progress is not None and item.offset >= step.next_at:
                step.inside(item.offset)
            if item.lsn < applied < item.end_lsn:  # (an apply ends at a record's end)
                rep.errors.append(f"LMDB's applied LSN {applied} lies inside the "
                                  f"record at LSN {item.lsn} (it ends at {item.end_lsn}): "
                                  f"its meta row is damaged")
            try:
                ev = assembler.feed(item.type, item.lsn, item.end_lsn,
                                    records.decode(item.payload), len(item.payload))
            except ValueError as e:
                rep.errors.append(f"record at LSN {item.lsn} (offset {item.offset}): {e}")
                continue
            if ev is not None and ev.type == RecordType.COMMIT:
                rep.commits += 1
                for k, v in ev.writes:
                    if v is not None:  # (recovery checks keys, not value encodings: here)
                        try:
                            unpack_value(v)
                        except CorruptionError as e:
                            rep.errors.append(f"record at LSN {item.lsn} (offset "
                                              f"{item.offset}): key {k[:40]!r}: {e}")
                if ev.end <= applied:
                    for k, v in ev.writes:
                        last[k] = _digest(v)
            continue
        if item.kind == "vanished" and os.path.lexists(item.path):  # (a trim unlinks the
            # name; one still there that opens nothing — a symlink to a disk not mounted —
            # is damage: strict recovery refuses it, and verify said "ok", exit 0)
            rep.errors.append(f"{item.path}: the segment cannot be opened: its name leads to "
                              f"no file (a dangling symlink?)")
        elif item.kind == "vanished":
            rep.warnings.append(f"{item.path}: trimmed by a checkpoint while verify ran")
            last.clear()  # (values gathered before it may be older than ones it held)
        elif item.kind in ("gap", "bad-segment", "missing-next"):
            rep.errors.append(f"{item.path}: {item.reason}")
        elif item.verdict == "stale":
            rep.warnings.append(f"{item.path}: {item.scan.damaged_bytes} stale bytes behind the "
                                f"end of a sealed segment (a failed write); recovery will cut "
                                f"them")
        elif item.verdict == "torn":
            rep.warnings.append(f"{item.path}: torn tail of {item.scan.damaged_bytes} bytes at "
                                f"offset {item.scan.offset} (LSN {item.lsn}): {item.reason}; "
                                f"recovery will cut it")
        elif item.verdict == "corrupt":
            rep.errors.append(f"{item.path}: {item.scan.kind} at offset {item.scan.offset} "
                              f"(LSN {item.lsn}): {item.reason}")
        if item.kind == "end" and progress:  # (this segment included: see Recovery.run)
            step.ended(item.reader.file_size)
    rep.wal_end_lsn = log.end_lsn or 0
    # entries of wal/ the log does not read: a renamed segment (it may be the one a gap
    # lacks), or one in the way of recovery's temp-file cleanup (every open refused
    # with EISDIR while this said ok); recovery names them too (``Recovery._check_strays``)
    for path, why, _blocking in stray_entries(layout.wal, store_id):
        rep.errors.append(f"{path}: {why}")
    short = log.short_of_applied()
    if short is not None:
        rep.errors.append(short)
    return last


def _compare(state: LmdbState, rep: VerifyReport, last: dict) -> None:
    """LMDB's value of each key as of ``applied`` (history makes later applies by a live
    writer invisible) must be the WAL's."""
    at = rep.applied_lsn
    rep.keys_checked = 0
    items = iter(last.items())  # (no copy of the dict: batches taken as it is walked)
    moved_on = 0  # keys whose history a live writer's purge (or retention) erased after
    # ``applied`` was read: not comparable, and not damage (each was reported "disagrees")
    while True:
        batch = list(itertools.islice(items, COMPARE_BATCH))
        if not batch:
            break
        with state.read() as txn:
            for k, want in batch:
                rep.keys_checked += 1
                try:
                    have = _digest(lmdb_value_as_of(txn, state, k, at, purges=True))
                except SnapshotTooOld:
                    moved_on += 1
                    continue
                if have != want:
                    rep.errors.append(f"LMDB disagrees with the WAL for key {k[:40]!r}: WAL "
                                      f"says {_short(want)}, LMDB has {_short(have)}")
    if moved_on:
        rep.warnings.append(f"{moved_on} key(s) not compared with the WAL: the writer purged "
                            f"them, or trimmed their history, while verify ran")


ROWS_PROGRESS = 1024  # rows between two progress calls of the row check


def _check_lmdb(state: LmdbState, rep: VerifyReport,
                progress: Callable[[int, int], None] | None = None) -> None:
    if progress is not None:  # (rows as a share of the data file: bytes, as every count)
        total = max(state.count(), 1)
        size = os.path.getsize(state.data_file)
    rep.lmdb_keys = 0
    for k, v in state.scan(b"", None):
        rep.lmdb_keys += 1
        if progress is not None and not rep.lmdb_keys % ROWS_PROGRESS:
            progress(min(size, size * rep.lmdb_keys // total), size)
        try:
            decode_key(k)
            unpack_value(v)
        except Exception as e:  # any decode failure is damage
            rep.errors.append(str(tables.row_damaged("data", k, e, state.data_file)))
    if progress is not None:
        progress(size, size)
    _check_rows(state, rep)
    _check_u64_rows(state, rep)
    _check_owed(state, rep)


def _check_owed(state: LmdbState, rep: VerifyReport) -> None:
    """When the ``owed`` index is stamped exact (``apply.owed_index_current``), it names
    exactly the action rows in flight, pending or failed (``tables.OWED_INDEX_STATES``),
    read in one LMDB snapshot (the applier changes both in one transaction).  An owed
    row it misses is an error: the open settles what the index names, so that action's
    compensation would never run, nor be listed as pending (a review of the index)."""
    if getattr(state, "owed", None) is None:
        return  # (a store from before the index: every action row is read instead)
    from ..engine.apply import owed_index_current
    file = state.data_file
    with state.read() as txn:
        if not owed_index_current(txn, state):
            return  # (not exact: the next writable open rebuilds it; readers scan all)
        listed = {bytes(k) for k, _v in txn.cursor(db=state.owed).iternext()
                  if bytes(k) != tables.OWED_STAMP}
        owed: dict[bytes, str] = {}
        for k, raw in txn.cursor(db=state.actions).iternext():
            try:
                row = tables.unpack_row(raw, "actions", k, file)
            except CorruptionError:
                continue  # (_check_rows lists it)
            if row.get("state") in tables.OWED_INDEX_STATES:
                owed[bytes(k)] = row.get("state")
    for k in sorted(set(owed) - listed):
        rep.errors.append(f"LMDB {file}: action {k.decode('utf-8', 'replace')} is "
                          f"{owed[k]!r} but the 'owed' index does not list it: the next "
                          f"open would neither compensate it nor list it as pending "
                          f"(the index is damaged)")
    for k in sorted(listed - set(owed)):
        rep.errors.append(f"LMDB {file}: the 'owed' index lists action "
                          f"{k.decode('utf-8', 'replace')}, which is not in flight, "
                          f"pending or failed")


def _check_u64_rows(state: LmdbState, rep: VerifyReport) -> None:
    """Every u64 key and value of LMDB's tables (``tables.U64_KEYS``, ``U64_VALUES``, the
    ``meta`` counters) is 8 bytes: each one that is not is listed by table and key."""
    file = state.data_file
    for table in sorted(set(tables.U64_KEYS) | set(tables.U64_VALUES) | {"meta"}):
        keys, values = table in tables.U64_KEYS, table in tables.U64_VALUES or table == "meta"
        for k, raw in state.scan(b"", None, db=table):
            if keys and len(k) != 8:
                rep.errors.append(str(tables.u64_damaged(table, k, k, True, file)))
            elif values and len(raw) != 8 and k not in (
                    tables.PACKED_META if table == "meta" else ()):
                rep.errors.append(str(tables.u64_damaged(table, k, raw, False, file)))


def _check_rows(state: LmdbState, rep: VerifyReport) -> None:
    """Every msgpack row of LMDB's other tables decodes, and so does each history row's
    before-image (a value): damage inside a row's bytes, LMDB's pages sound, is named by
    its table and key here rather than met by the read that needs the row; and so is a
    key of a table whose keys are made of parts (MULTIPART_KEYS) when they do not add up."""
    file = state.data_file
    for table in sorted(set(tables.MULTIPART_KEYS) - set(tables.PACKED_ROWS)):
        for k, _raw in state.scan(b"", None, db=table):
            _check_key(table, k, rep, file)
    for table, (lo, hi) in tables.PACKED_ROWS.items():
        multipart = table in tables.MULTIPART_KEYS
        for k, raw in state.scan(lo, hi, db=table):
            if multipart:
                _check_key(table, k, rep, file)
            try:
                row = tables.unpack_row(raw, table, k, file)
            except CorruptionError as e:
                rep.errors.append(str(e))
                continue
            if table == "hist":
                try:
                    if row[1] is not None:
                        unpack_value(row[1])
                except Exception as e:  # (its before-image, or not a [txid, before] row)
                    rep.errors.append(str(tables.row_damaged(table, k, e, file)))
    for name in tables.PACKED_META:
        raw = state.get(name, "meta")
        if raw is not None:
            try:
                tables.unpack_row(raw, "meta", name, file)
            except CorruptionError as e:
                rep.errors.append(str(e))


def _check_key(table: str, k: bytes, rep: VerifyReport, file: str | None) -> None:
    """A key of a MULTIPART_KEYS table whose parts do not add up is listed."""
    try:
        tables.MULTIPART_KEYS[table](k)
    except CorruptionError:
        rep.errors.append(str(tables.key_damaged(table, k, file)))


def _check_blobs(layout: Layout, rep: VerifyReport, progress=None) -> None:
    """Every blob the store refers to is in its content store and hashes to its name, and
    each one that is a watch's saved manifest loads.  The cost: every referenced blob is
    read once, streamed (``iter_content``: one 1 MiB buffer, never a whole blob in
    memory), a manifest through ``Manifest.load`` (which hashes what it streams; its
    records are held, as the open's ``referenced`` held them a moment before);
    ``progress(bytes hashed, bytes of the blobs present)``."""
    from .backup import hold_blob_gc, let_go_blob_gc, referenced_blobs
    rep.blobs_checked = rep.blob_bytes_hashed = 0
    held = hold_blob_gc(layout, create=False)
    try:
        manifests: set[str] = set()
        try:
            refs = referenced_blobs(layout.root, manifests)
        except WalstoreError as e:  # (what keeps a read-only open out is not this check's)
            rep.warnings.append(f"file content not checked: a read-only open of the store "
                                f"failed ({e})")
            return
        blobs = os.path.join(layout.root, "files", "blobs")
        if refs and not os.path.isdir(blobs):  # (one error, not one per blob)
            rep.blobs_checked += len(refs)
            rep.errors.append(f"the store refers to {len(refs)} blob(s) of file content "
                              f"but has no content store ({blobs} is missing: a copy made "
                              f"without its file content?): its file versions and undos "
                              f"cannot be read")
            return
        present: list[tuple[str, str, int]] = []
        gone: list[tuple[str, str]] = []  # (digest, error): missing, or gone meanwhile
        for digest in sorted(refs):
            rep.blobs_checked += 1
            path = os.path.join(blobs, digest[:2], digest[2:])
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            except OSError as e:
                rep.errors.append(_blob_problem(digest, path, f"cannot be read ({e})",
                                                digest in manifests))
                continue
            if st is None or not stat.S_ISREG(st.st_mode):
                gone.append((digest, f"file content sha256:{digest} is missing from the "
                                     f"content store ({path}): a file version or undo "
                                     f"needs it"))
                continue
            present.append((digest, path, st.st_size))
        _hash_blobs(blobs, present, manifests, rep, progress, gone)
        if gone and held is None and writer_alive(layout):
            # the writer's gc held the lock past the wait (hold_blob_gc) and may have
            # removed, while they were checked, blobs retention had let go since the
            # listing: only those the store refers to still are missing
            try:
                still = referenced_blobs(layout.root)
            except WalstoreError:
                still = None
            if still is not None:
                gone = [(d, why) for d, why in gone
                        if d in still and not os.path.isfile(
                            os.path.join(blobs, d[:2], d[2:]))]
        rep.errors.extend(why for _d, why in gone)
    finally:
        if held is not None:
            let_go_blob_gc(held)


def _hash_blobs(blobs: str, present: list, manifests: set, rep: VerifyReport,
                progress, gone: list) -> None:
    """Hash each present blob (``(digest, path, size)``) against its name; load each
    manifest among them.  Each blob is read once."""
    from ..files.blobs import BlobStore
    from ..files.entries import CHUNK, iter_content
    store = BlobStore(blobs, readonly=True)
    total = sum(size for _d, _p, size in present)
    buf = bytearray(CHUNK)

    def sha256_of(path: str) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            h = hashlib.sha256()
            for _off, chunk, _hole in iter_content(fd, buf):
                h.update(chunk)
                rep.blob_bytes_hashed += len(chunk)
                if progress:
                    progress(rep.blob_bytes_hashed, max(total, rep.blob_bytes_hashed))
            return h.hexdigest()
        finally:
            os.close(fd)

    for digest, path, size in present:
        manifest = digest in manifests
        try:
            if not manifest:
                sound = sha256_of(path) == digest
                bad_load = None
            else:
                before = rep.blob_bytes_hashed
                sound, bad_load = _load_manifest(store, digest, path, sha256_of)
                if rep.blob_bytes_hashed == before:  # (else hashed again after the load)
                    rep.blob_bytes_hashed += size
                if progress:
                    progress(rep.blob_bytes_hashed, max(total, rep.blob_bytes_hashed))
        except FileNotFoundError as e:  # (a blob gone meanwhile: ``gone`` judges it)
            gone.append((digest, _blob_problem(digest, path, f"cannot be read ({e})",
                                               manifest)))
            continue
        except OSError as e:  # (EIO on a damaged disk: named)
            why = f"cannot be read ({e})"
        else:
            why = ("content does not match its sha256 (the stored content is damaged)"
                   if not sound else None if bad_load is None else
                   f"does not load as a watch's saved manifest ({bad_load})")
        if why is not None:
            rep.errors.append(_blob_problem(digest, path, why, manifest))


def _load_manifest(store, digest: str, path: str, sha256_of) -> tuple[bool, str | None]:
    """(does the manifest blob hash to its name, why it does not load or None): loaded
    once, hashed by the load; a load that fails before its end is told from damage by
    hashing the blob."""
    from ..files.watch import Manifest
    try:
        Manifest.load(store, digest)
        return True, None
    except CorruptionError:  # (BlobStore.get: the content does not match its sha256)
        return False, None
    except OSError:
        raise
    except Exception as e:  # any decode failure: damaged, or not a manifest
        if sha256_of(path) != digest:
            return False, None
        return True, f"{type_and_message(e)}"


def _blob_problem(digest: str, path: str, reason: str, manifest: bool) -> str:
    """A referenced blob that is there but cannot serve its readers, as verify lists it."""
    if manifest:
        return (f"file content sha256:{digest} in the content store ({path}): {reason}: it "
                f"is a watch's saved manifest (the blobs it names could not be listed, "
                f"nor checked)")
    return (f"file content sha256:{digest} in the content store ({path}): {reason}: a file "
            f"version or undo needs it")


def _digest(v: bytes | None) -> tuple[int, bytes] | None:
    """What verify keeps of a value: its length and a 16-byte BLAKE2b digest."""
    return None if v is None else (len(v), hashlib.blake2b(v, digest_size=16).digest())


def _short(v: tuple[int, bytes] | None) -> str:
    return "nothing (deleted)" if v is None else f"{v[0]} bytes ({v[1].hex()[:12]}..)"


__all__ = ["verify_store", "VerifyReport"]
