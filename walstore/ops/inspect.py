"""WAL inspection for ``walstore dump`` and the tools: records as plain dicts.

Read-only: walks segments from a given LSN, stops at the end of the valid records of
each segment, and describes each record (type, LSN, length, a one-line summary and the
decoded payload with values unpacked).
"""
from __future__ import annotations

from typing import Iterator

from ..codec import decode_key, unpack_value
from ..engine.layout import Layout
from ..log import records
from ..log.format import RecordType
from ..log.reader import LogReader, Record


DAMAGE = frozenset({"CORRUPT", "TRUNCATED", "GAP", "BAD-SEGMENT", "MISSING-NEXT"})


def iter_wal(path: str, from_lsn: int = 0) -> Iterator[dict]:
    """Every record from ``from_lsn`` described, and a pseudo-record for each segment end
    that is not clean (TORN, STALE: crash outcomes recovery cuts; CORRUPT, TRUNCATED:
    damage) or each gap / bad header / missing segment (GAP, BAD-SEGMENT, MISSING-NEXT:
    damage; VANISHED: trimmed while read).  DAMAGE names the damage types."""
    layout = Layout(path)
    log = LogReader(layout.wal, layout.read_identity())
    for item in log.walk(from_lsn):
        if isinstance(item, Record):
            yield describe(item, _segment_path(log, item.lsn))
        elif item.kind == "end":
            if item.verdict != "clean":  # TORN and STALE are crash outcomes; the rest damage
                kind = (item.verdict if item.verdict in ("stale", "corrupt")
                        and item.scan.kind != "truncated" else item.scan.kind)
                yield {"lsn": item.lsn, "type": kind.upper(), "length":
                       item.scan.damaged_bytes, "file": item.path, "summary": item.reason}
        else:
            yield {"lsn": item.lsn, "type": item.kind.upper(), "length": 0, "file": item.path,
                   "summary": item.reason}


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
    try:
        body = records.decode(rec.payload)
    except ValueError as e:
        out["summary"] = f"undecodable payload: {e}"
        return out
    if "w" in body:
        writes = records.parse_writes(body)
        body = dict(body)
        body["w"] = [{"key": _key(k), "value": None if v is None else unpack_value(v),
                      "deleted": v is None} for k, v in writes]
    out["payload"] = body
    out["summary"] = _summary(name, body)
    return out


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
