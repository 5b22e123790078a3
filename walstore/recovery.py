"""Crash recovery: analysis, REDO and UNDO over the WAL, in one streaming pass.

Owns the decision of what the log *is* after a crash: where it ends, which bytes are a
torn tail (cut and kept in ``<store>/quarantine``), which damage is real corruption, and
what each recovery mode gives up.  It brings LMDB forward to the last committed
transaction (REDO, idempotent thanks to LMDB's ``applied`` LSN) and finds the losers:
transactions that logged records but neither committed nor aborted (UNDO: their logged
writes are discarded; their actions are handed to the agent layer to compensate).

Modes (after RocksDB's WAL recovery modes):

``strict`` (default)
    A torn tail is cut (normal crash outcome).  Anything else refuses with a
    CorruptionError naming file, offset, LSN and reason; nothing is changed.
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
fsynced); recovery never reads more than it has bounded (segment reader); the pass costs
what the retained WAL costs, which checkpoints keep small; running it twice is harmless.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import fileio, records
from .errors import CorruptionError
from .framing import SEGMENT_HEADER_SIZE, RecordType
from .kv import LmdbState
from .records import CommitEntry
from .segments import Record, SegmentReader, judge_end, last_nonzero_end, list_segments

_TX_RECORDS = frozenset({RecordType.COMMIT, RecordType.WRITES, RecordType.ABORT,
                         RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                         RecordType.PREPARE, RecordType.ROLLBACK_PREPARED})
_OPENING_RECORDS = frozenset({RecordType.WRITES, RecordType.ACTION_INTENT})
MODES = ("strict", "tolerate-tail", "point-in-time", "skip-corrupt")
REDO_BATCH = 2000
MAX_OPEN_TXN_BYTES = 512 * 1024 * 1024  # bound on one uncommitted transaction's chunks


@dataclass
class Problem:
    """One thing recovery found wrong, and what it did about it."""

    kind: str  # torn-tail | stale-bytes | corrupt-record | bad-segment | gap | lmdb-ahead | bad-payload
    file: str
    offset: int
    lsn: int
    reason: str
    bytes: int = 0
    action: str = ""    # cut | refused | skipped | dropped
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
    salvaged: bool = False  # holes were skipped: the store seals this log after recovery
    compensated: list = field(default_factory=list)
    pending_compensations: list = field(default_factory=list)
    in_doubt: list = field(default_factory=list)
    seconds: float = 0.0

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


class _Analysis:
    """What the pass learns from the records, record by record."""

    def __init__(self, applied: int) -> None:
        self.applied = applied
        self.assembler = records.CommitAssembler(MAX_OPEN_TXN_BYTES)
        self.open_txids: dict[int, int] = {}  # txid -> first LSN, for logged-but-unfinished
        self.redo: list[CommitEntry] = []
        self.max_txid = 0
        self.commits = 0
        self.last_checkpoint: dict | None = None
        self.handlers: dict[int, Callable[[Record, dict], None]] = {}

    def feed(self, rec: Record, body: dict) -> None:
        t = rec.type
        txid = -1
        if t in _TX_RECORDS:
            txid = records.txid_of(body)
            self.max_txid = max(self.max_txid, txid)
        if t in _OPENING_RECORDS:
            self.open_txids.setdefault(txid, rec.lsn)
        writes = self.assembler.feed(t, body, len(rec.payload))
        if writes is not None:
            self.open_txids.pop(txid, None)
            self.commits += 1
            if rec.lsn >= self.applied:
                extra = {k: v for k, v in body.items() if k not in ("tx", "ts", "meta", "w")}
                self.redo.append(CommitEntry(txid, rec.lsn, rec.end_lsn, body.get("ts", 0.0),
                                             body.get("meta"), writes, extra))
        elif t in (RecordType.ABORT, RecordType.ROLLBACK_PREPARED):
            self.open_txids.pop(txid, None)
        elif t == RecordType.CHECKPOINT:
            self.last_checkpoint = body
        handler = self.handlers.get(t)
        if handler is not None:
            handler(rec, body)


class Recovery:
    """One recovery run over a store's WAL and LMDB state."""

    def __init__(self, root: str, store_id: bytes, state: LmdbState, mode: str = "strict",
                 progress: Callable[[int, int], None] | None = None,
                 handlers: dict | None = None, dry_run: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown recovery mode {mode!r}; choose one of {', '.join(MODES)}")
        self.root = root
        self.wal_dir = os.path.join(root, "wal")
        self.qdir = os.path.join(root, "quarantine")
        self.store_id = store_id
        self.state = state
        self.mode = mode
        self.progress = progress
        self.dry_run = dry_run  # walk and judge only: no file, no LMDB row is changed
        self.report = RecoveryReport(mode=mode)
        self.analysis = _Analysis(state.applied_lsn())
        self.analysis.handlers.update(handlers or {})
        self.on_apply = None  # agent layer: extra rows per applied commit
        self.wal_start = state.get_meta_int(b"wal_start")  # where a sealed log begins
        self._stopped = False  # point-in-time: everything after the first damage is dropped
        self._done_bytes = 0

    # ---- the pass ----------------------------------------------------------------------
    def run(self) -> LogPosition:
        t0 = time.monotonic()
        rep = self.report
        rep.applied_before = applied = self.analysis.applied
        self._remove_temp_files()
        segs = list_segments(self.wal_dir)
        rep.segments = len(segs)
        rep.wal_bytes = sum(os.path.getsize(p) for _, p in segs)
        expected: int | None = None
        position: LogPosition | None = None
        for i, (start, path) in enumerate(segs):
            last = i == len(segs) - 1
            if self._stopped:
                self._drop_segment(path, start, "after the point-in-time cut")
                continue
            if expected is None and start > max(applied, self.wal_start):
                self._damage("gap", path, 0, start, f"the WAL begins at LSN {start} but LMDB is "
                             f"applied only up to {applied}: log records are missing", False)
            elif expected is not None and start != expected:
                self._damage("gap", path, 0, start, f"segment starts at LSN {start} but the "
                             f"previous one ends at {expected}: a segment is missing or damaged",
                             False)
                if self._stopped:
                    self._drop_segment(path, start, "after the point-in-time cut")
                    continue
            reader = SegmentReader(path, self.store_id, start)
            if reader.header_error is not None:
                self._damage("bad-segment", path, 0, start, reader.header_error, last)
                self._drop_segment(path, start, reader.header_error)
                continue
            next_start = segs[i + 1][0] if not last else None
            end_lsn, end_off = self._read_segment(reader, last, applied, next_start)
            expected = end_lsn
            position = LogPosition(start, end_off)
            self._done_bytes += reader.file_size
            if self.progress:
                self.progress(self._done_bytes, rep.wal_bytes)
        self._flush_redo()
        rep.end_lsn = expected if expected is not None else applied
        if rep.end_lsn < max(applied, self.state.applied_lsn()):
            self._lmdb_ahead(position)
            position = None
        if position is None:
            position = LogPosition(max(rep.end_lsn, self.state.applied_lsn()), SEGMENT_HEADER_SIZE,
                                   create_new=True)
        else:
            self._sync_tail(position)
        rep.losers = sorted(self.analysis.open_txids)
        rep.applied_after = self.state.applied_lsn()
        rep.seconds = time.monotonic() - t0
        return position

    def _read_segment(self, reader: SegmentReader, last: bool, applied: int,
                      next_start: int | None) -> tuple[int, int]:
        """Feed the segment's records; handle how it ends.  Returns (end LSN, end offset)."""
        offset = SEGMENT_HEADER_SIZE
        while True:
            for rec in reader.records(offset):
                bad = self._feed(reader, rec, last)
                if bad is not None:  # a valid-checksum record with a bad payload: cut here
                    return self._cut(reader, rec.offset, bad)
            end = reader.end
            verdict, reason = judge_end(end, last, applied, next_start)
            if verdict == "clean":
                return end.lsn, end.offset
            if verdict in ("stale", "torn"):  # ordinary outcomes: cut, keep in quarantine
                kind = "stale-bytes" if verdict == "stale" else "torn-tail"
                self._quarantine_range(reader, end.offset, end.damaged_end, kind, reason, "cut")
                if verdict == "torn":
                    self.report.torn_bytes += end.damaged_bytes
                return end.lsn, end.offset
            self._damage("corrupt-record", reader.path, end.offset, end.lsn, reason, last)
            if self.mode == "skip-corrupt" and end.next_valid is not None:
                self._quarantine_range(reader, end.offset, end.next_valid.offset, "corrupt-record",
                                       reason, "skipped", zero=False)
                self.report.salvaged = True
                offset = end.next_valid.offset
                continue
            return self._cut(reader, end.offset, reason)

    def _cut(self, reader: SegmentReader, offset: int, reason: str) -> tuple[int, int]:
        """Give up everything from ``offset`` to the end of this segment (quarantined)."""
        import mmap
        self._give_up_rest_of(reader, offset - 1)
        with open(reader.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            damaged_end = last_nonzero_end(mm, offset, len(mm))
        self._quarantine_range(reader, offset, damaged_end, "corrupt-record", reason, "cut")
        if self.mode == "point-in-time":
            self._stopped = True
        return reader.lsn_at(offset), offset

    def _feed(self, reader: SegmentReader, rec: Record, last: bool) -> str | None:
        """Feed one record; returns a reason when a bad payload must be cut off here."""
        self.report.records += 1
        try:
            body = records.decode(rec.payload)
            self.analysis.feed(rec, body)
        except ValueError as e:
            reason = f"record of type {rec.type} has a valid checksum but a bad payload: {e}"
            self._damage("bad-payload", reader.path, rec.offset, rec.lsn, reason, last)
            if self.mode != "skip-corrupt":
                return reason
            self.report.problems[-1].action = "skipped"
            self.report.salvaged = True
            return None
        if len(self.analysis.redo) >= REDO_BATCH:
            self._flush_redo()
        return None

    def _flush_redo(self) -> None:
        batch = self.analysis.redo
        if not batch:
            return
        self.analysis.redo = []
        if self.dry_run:
            return
        self.state.apply(batch, batch[-1].end_lsn, next_txid=self.analysis.max_txid + 1,
                         on_entry=self.on_apply)
        self.report.redone += len(batch)
        self.report.commits_seen = self.analysis.commits

    # ---- damage handling ---------------------------------------------------------------
    def _damage(self, kind: str, path: str, offset: int, lsn: int, reason: str, last: bool) -> None:
        """Record a problem; refuse unless the mode accepts giving this up."""
        accepted = (self.mode in ("point-in-time", "skip-corrupt")
                    or (self.mode == "tolerate-tail" and last))
        self.report.problems.append(Problem(kind, path, offset, lsn, reason,
                                            action="" if accepted else "refused"))
        if not accepted:
            raise CorruptionError(f"{kind}: {reason}", file=path, offset=offset, lsn=lsn)
        if self.mode == "point-in-time" and kind in ("gap", "bad-segment"):
            self._stopped = True
        if self.mode == "skip-corrupt" and kind in ("gap", "bad-segment"):
            self.report.salvaged = True

    def _give_up_rest_of(self, reader: SegmentReader, offset: int) -> None:
        """Count the valid records behind a cut (they are quarantined, not applied)."""
        import mmap
        with open(reader.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = offset + 1
            while True:
                rec, _exhausted = reader.find_valid_after(mm, pos, len(mm))
                if rec is None:
                    return
                self._count_given_up(rec)
                pos = rec.offset + 1

    def _count_given_up(self, rec: Record) -> None:
        if rec.end_lsn <= self.analysis.applied:
            return  # LMDB already holds it: nothing is lost
        self.report.given_up_records += 1
        if rec.type == RecordType.COMMIT:
            try:
                self.report.given_up_txids.append(records.txid_of(records.decode(rec.payload)))
            except ValueError:
                pass

    def _drop_segment(self, path: str, start: int, reason: str) -> None:
        reader = SegmentReader(path, self.store_id, start)
        if reader.header_error is None:
            for rec in reader.records():
                self._count_given_up(rec)
        if self.dry_run:
            return
        dest = self._quarantine_name(os.path.basename(path))
        fileio.make_dir(self.qdir)
        fileio.rename(path, dest)
        fileio.fsync_dir(self.qdir)
        fileio.fsync_dir(self.wal_dir)
        self._write_note(dest, {"file": path, "reason": reason, "action": "dropped"})
        self.report.problems.append(Problem("dropped-segment", path, 0, start, reason,
                                            os.path.getsize(dest), "dropped", dest))

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
            fd = fileio.open_file(reader.path, os.O_RDWR)
            try:
                fileio.pwrite_all(fd, bytes(len(data)), start)
                fileio.fdatasync(fd)
            finally:
                os.close(fd)
        prob = Problem(kind, reader.path, start, reader.lsn_at(start), reason, len(data), action,
                       dest)
        # replace the matching un-actioned entry, or add one (torn tails are not "damage")
        for i, p in enumerate(self.report.problems):
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

    def _lmdb_ahead(self, position: LogPosition | None) -> None:
        applied = self.state.applied_lsn()
        reason = (f"the WAL ends at LSN {self.report.end_lsn} but LMDB has applied commits up to "
                  f"{applied}: acknowledged log records were lost")
        path = self.wal_dir
        self.report.problems.append(Problem("lmdb-ahead", path, 0, self.report.end_lsn, reason,
                                            action="" if self.mode != "strict" else "refused"))
        if self.mode == "strict":
            raise CorruptionError(reason, file=path, lsn=self.report.end_lsn)

    def _remove_temp_files(self) -> None:
        """A ``.tmp`` segment is a creation cut short: it never held a record."""
        if self.dry_run:
            return
        for name in os.listdir(self.wal_dir):
            if name.endswith(".tmp"):
                fileio.unlink(os.path.join(self.wal_dir, name))

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
