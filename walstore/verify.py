"""Read-only consistency checks of a store: ``walstore verify`` and tests call these.

Checks, without writing a byte: the identity file; every segment header; every record's
checksum, LSN and payload; the continuity of segments; that LMDB's ``applied`` LSN lies
inside the log; that for every key written in the retained WAL at or below ``applied``,
LMDB holds exactly the last value the WAL gave it (WAL vs LMDB); that every LMDB value
and txns row decodes.  A torn tail is reported as a warning (it is what recovery cuts),
anything else as an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from . import records
from .codec import decode_key, unpack, unpack_value
from .errors import NotAStore
from .kv import LmdbState
from .layout import Layout
from .segments import SegmentReader, judge_end, list_segments


@dataclass
class VerifyReport:
    path: str
    segments: int = 0
    records: int = 0
    commits: int = 0
    wal_bytes: int = 0
    lmdb_keys: int = 0
    keys_checked: int = 0
    applied_lsn: int = 0
    wal_start: int = 0
    wal_end_lsn: int = 0
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


def verify_store(path: str, progress: Callable[[int, int], None] | None = None,
                 state: LmdbState | None = None) -> VerifyReport:
    layout = Layout(path)
    store_id = layout.read_identity()
    own_state = state is None
    if own_state:
        state = LmdbState(layout.db, readonly=True)
    try:
        rep = VerifyReport(layout.root)
        # One read snapshot for `applied` and the values compared against the WAL, so a
        # writer applying meanwhile cannot make the comparison lie.
        with state.gate, state.begin() as snap:
            raw = snap.get(b"applied", db=state.meta)
            rep.applied_lsn = int.from_bytes(raw, "big") if raw else 0
            raw = snap.get(b"wal_start", db=state.meta)
            rep.wal_start = int.from_bytes(raw, "big") if raw else 0
            last_values = _check_wal(layout, store_id, rep, progress, state.applied_lsn)
            _compare(snap, state, rep, last_values)
        _check_lmdb(state, rep)
        return rep
    finally:
        if own_state:
            state.close()


def _check_wal(layout: Layout, store_id: bytes, rep: VerifyReport, progress,
               current_applied=lambda: 0) -> dict:
    """Walk every record; return {key: last value logged at or below applied}.

    A writer may be running: a segment its checkpoint trims while we walk is skipped, and a
    log that now begins past our snapshot's applied LSN is fine when LMDB's *current*
    applied LSN reaches it (``current_applied``).
    """
    segs = [(s, p) for s, p in list_segments(layout.wal) if os.path.exists(p)]
    rep.segments = len(segs)
    rep.wal_bytes = sum(_size(p) for _, p in segs)
    last: dict[bytes, bytes | None] = {}
    assembler = records.CommitAssembler()
    expected = None
    done = 0
    for i, (start, path) in enumerate(segs):
        if expected is not None and start != expected:
            rep.errors.append(f"{path}: starts at LSN {start}, previous segment ends at {expected}")
        elif expected is None and start > max(rep.applied_lsn, rep.wal_start,
                                                current_applied()):
            rep.errors.append(f"{path}: WAL starts at LSN {start} beyond LMDB's applied "
                              f"{rep.applied_lsn}")
        try:
            reader = SegmentReader(path, store_id, start)
        except FileNotFoundError:
            rep.warnings.append(f"{path}: trimmed by a checkpoint while verify ran")
            expected = None
            continue
        if reader.header_error:
            rep.errors.append(f"{path}: {reader.header_error}")
            expected = None
            continue
        try:
            for rec in reader.records():
                rep.records += 1
                _feed(rec, rep, path, last, assembler)
        except FileNotFoundError:
            rep.warnings.append(f"{path}: trimmed by a checkpoint while verify ran")
            expected = None
            continue
        end = reader.end
        expected = end.lsn
        next_start = segs[i + 1][0] if i + 1 < len(segs) else None
        verdict, reason = judge_end(end, i == len(segs) - 1, rep.applied_lsn, next_start)
        if verdict == "stale":
            rep.warnings.append(f"{path}: {end.damaged_bytes} stale bytes behind the end of a "
                                f"sealed segment (a failed write); recovery will cut them")
        elif verdict == "torn":
            rep.warnings.append(f"{path}: torn tail of {end.damaged_bytes} bytes at offset "
                                f"{end.offset} (LSN {end.lsn}): {reason}; recovery will cut it")
        elif verdict == "corrupt":
            rep.errors.append(f"{path}: {end.kind} at offset {end.offset} (LSN {end.lsn}): "
                              f"{reason}")
        done += reader.file_size
        if progress:
            progress(done, rep.wal_bytes)
    rep.wal_end_lsn = expected or 0
    if segs and rep.wal_end_lsn < rep.applied_lsn:
        rep.errors.append(f"WAL ends at LSN {rep.wal_end_lsn} but LMDB is applied up to "
                          f"{rep.applied_lsn}")
    return last


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _feed(rec, rep: VerifyReport, path: str, last: dict,
          assembler: records.CommitAssembler) -> None:
    try:
        writes = assembler.feed(rec.type, records.decode(rec.payload))
        if writes is not None:
            rep.commits += 1
            if rec.end_lsn <= rep.applied_lsn:
                for k, v, _b in writes:
                    last[k] = v
    except ValueError as e:
        rep.errors.append(f"{path}: record at LSN {rec.lsn} (offset {rec.offset}): {e}")


def _compare(snap, state: LmdbState, rep: VerifyReport, last: dict) -> None:
    for k, want in last.items():
        rep.keys_checked += 1
        have = snap.get(k, db=state.data)
        if have != want:
            rep.errors.append(f"LMDB disagrees with the WAL for key {k[:40]!r}: WAL says "
                              f"{_short(want)}, LMDB has {_short(have)}")


def _check_lmdb(state: LmdbState, rep: VerifyReport) -> None:
    for k, v in state.scan(b"", None):
        rep.lmdb_keys += 1
        try:
            decode_key(k)
            unpack_value(v)
        except Exception as e:  # any decode failure is damage
            rep.errors.append(f"LMDB key {k[:40]!r}: undecodable ({type(e).__name__}: {e})")
    for k, raw in state.scan(b"", None, db=state.txns):
        try:
            unpack(raw)
        except ValueError as e:
            rep.errors.append(f"txns row {k.hex()}: {e}")


def _short(v: bytes | None) -> str:
    return "nothing (deleted)" if v is None else f"{len(v)} bytes"


__all__ = ["verify_store", "VerifyReport", "NotAStore"]
