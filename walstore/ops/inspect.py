"""WAL inspection for ``walstore dump`` and the tools: records as plain dicts.

Read-only: walks segments from a given LSN, stops at the end of the valid records of
each segment, and describes each record (type, LSN, length, a one-line summary and the
decoded payload with values unpacked).
"""
from __future__ import annotations

import time
from typing import Iterator

from ..codec import decode_key, unpack_value
from ..engine.layout import Layout, writer_alive
from ..engine.lmdb_state import LmdbState
from ..errors import UnknownPoint, WalstoreError
from ..log import records
from ..log.format import RecordType
from ..log.reader import LogReader, Record
from ..log.segment import list_segments


DAMAGE = frozenset({"CORRUPT", "TRUNCATED", "GAP", "BAD-SEGMENT", "MISSING-NEXT",
                    "BAD-PAYLOAD"})


def iter_wal(path: str, from_lsn: int = 0) -> Iterator[dict]:
    """Every record from ``from_lsn`` described, and a pseudo-record for each segment end
    that is not clean (TORN, STALE: crash outcomes recovery cuts; CORRUPT, TRUNCATED:
    damage) or each gap / bad header / missing segment (GAP, BAD-SEGMENT, MISSING-NEXT:
    damage; VANISHED: trimmed while read).  A record whose checksum is right but whose
    payload recovery would refuse is BAD-PAYLOAD (``record_type`` its type): damage.
    DAMAGE names the damage types.

    The log is read as the store's state knows it (its ``applied`` LSN and where its log
    starts: segments trimmed below them are no gap).  Beside a live writer a tail caught
    mid-write reads like damage: it is read again, a moment later, from where it looked
    damaged (up to SETTLE_WALKS times) before it is reported."""
    layout = Layout(path)
    store_id = layout.read_identity()
    applied, wal_start = _state_marks(layout)
    retries, walks, last_bad = SETTLE_WALKS, 0, -1
    listed = False
    while True:
        walks += 1
        log = LogReader(layout.wal, store_id, applied, wal_start)
        again = None
        for item in log.walk(from_lsn):
            if isinstance(item, Record):
                listed = True
                yield describe(item, _segment_path(log, item.lsn))
                continue
            if item.kind == "end":
                if item.verdict == "clean":
                    continue
                # TORN and STALE are crash outcomes; the rest damage
                kind = (item.verdict if item.verdict in ("stale", "corrupt")
                        and item.scan.kind != "truncated" else item.scan.kind)
                out = {"lsn": item.lsn, "type": kind.upper(), "length":
                       item.scan.damaged_bytes, "file": item.path,
                       "offset": item.scan.offset, "summary": item.reason}
            else:
                out = {"lsn": item.lsn, "type": item.kind.upper(), "length": 0,
                       "file": item.path, "summary": item.reason}
            if writer_alive(layout):
                if item.lsn != last_bad:  # further on: the tail moved (a new chance)
                    retries, last_bad = SETTLE_WALKS, item.lsn
                if walks >= MAX_WALKS:
                    return  # (chasing a writer faster than us: stop at its tail)
                if retries:
                    again = item.lsn
                    break
            listed = True
            yield out
        if again is None:
            end = log.end_lsn or 0
            if not listed and from_lsn > end:
                # (an N past the end named nothing and listed none, exit 0, as a poller's
                # N at the end does: `dump --from 999999` of a log ending at 5000 said the
                # same as "nothing new"; a point past the end is UnknownPoint everywhere)
                raise UnknownPoint(f"LSN {from_lsn} is past the end of the log (it ends "
                                   f"at LSN {end}): no record is there")
            return
        retries -= 1
        time.sleep(SETTLE_PAUSE)
        from_lsn = max(from_lsn, again)
        applied, wal_start = _state_marks(layout)


SETTLE_WALKS, SETTLE_PAUSE = 3, 0.05  # the same damage seen this many times beside a writer
MAX_WALKS = 20  # walks at most, beside a writer that keeps appending


def _state_marks(layout: Layout) -> tuple[int, int]:
    """(applied LSN, where the log starts) as the store's LMDB state holds them; when it
    cannot be read, (0, the first segment's start): the log is walked on its own, from
    where it begins (``verify`` says why LMDB is unreadable).  (0, 0) there made a log
    trimmed by checkpoints read as "the WAL begins at LSN N but LMDB is applied only up to
    0: log records are missing", a GAP, exit 1: records missing that were not.)"""
    try:
        state = LmdbState(layout.db, readonly=True)
    except WalstoreError:
        return 0, _first_segment(layout)
    try:
        return state.applied_lsn(), state.meta_int(b"wal_start")
    except WalstoreError:
        return 0, _first_segment(layout)
    finally:
        state.close()


def _first_segment(layout: Layout) -> int:
    segs = list_segments(layout.wal)
    return segs[0][0] if segs else 0


def _segment_path(log: LogReader, lsn: int) -> str:
    path = ""
    for start, p in log.segments:
        if start <= lsn:
            path = p
    return path


def describe(rec, path: str) -> dict:
    try:
        name = RecordType(rec.type).name
    except ValueError:
        name = str(rec.type)
    out = {"lsn": rec.lsn, "end_lsn": rec.end_lsn, "type": name, "length": len(rec.payload),
           "synced_lsn": rec.synced_lsn, "file": path, "offset": rec.offset}
    try:  # what recovery, verify and open check of a payload: its failure is damage
        body = records.decode(rec.payload)
        if rec.type in records.TX_RECORDS:
            records.txid_of(body)
        records.check_fields(rec.type, body)
        writes = (records.parse_writes(body) if "w" in body or rec.type in _WRITE_LISTS
                  else None)
    except ValueError as e:
        out.update(type="BAD-PAYLOAD", record_type=name,
                   summary=f"record of type {name} has a valid checksum but a bad payload: "
                           f"{e}")
        return out
    if writes is not None:
        body = dict(body)
        body["w"] = [{"key": _key(k), "value": None if v is None else unpack_value(v),
                      "deleted": v is None} for k, v in writes]
    out["payload"] = body
    out["summary"] = _summary(name, body)
    return out


_WRITE_LISTS = frozenset({RecordType.COMMIT, RecordType.WRITES, RecordType.PREPARE})


def _key(k: bytes):
    return decode_key(k)  # str or bytes: the CLI renders bytes unambiguously


def _summary(name: str, body: dict) -> str:
    if "w" in body:
        keys = [w["key"] for w in body["w"]]
        shown = ", ".join(map(str, keys[:4])) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")
        return f"tx {body.get('tx')}: {len(keys)} write(s): {shown}"
    if "tx" in body:
        return f"tx {body['tx']}"
    return ", ".join(f"{k}={v}" for k, v in body.items() if not isinstance(v, (list, dict)))
