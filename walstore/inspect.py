"""WAL inspection for ``walstore dump`` and the tools: records as plain dicts.

Read-only: walks segments from a given LSN, stops at the end of the valid records of
each segment, and describes each record (type, LSN, length, a one-line summary and the
decoded payload with values unpacked).
"""
from __future__ import annotations

from typing import Iterator

from . import records
from .codec import decode_key, unpack_value
from .framing import RecordType
from .layout import Layout
from .segments import SegmentReader, list_segments


def iter_wal(path: str, from_lsn: int = 0) -> Iterator[dict]:
    layout = Layout(path)
    store_id = layout.read_identity()
    segs = list_segments(layout.wal)
    for i, (start, seg_path) in enumerate(segs):
        nxt = segs[i + 1][0] if i + 1 < len(segs) else None
        if nxt is not None and nxt <= from_lsn:
            continue
        reader = SegmentReader(seg_path, store_id, start)
        if reader.header_error:
            yield {"lsn": start, "type": "BAD-SEGMENT", "length": 0, "file": seg_path,
                   "summary": reader.header_error}
            continue
        for rec in reader.records():
            if rec.lsn >= from_lsn:
                yield describe(rec, seg_path)
        if reader.end.kind != "clean":
            yield {"lsn": reader.end.lsn, "type": reader.end.kind.upper(), "length":
                   reader.end.damaged_bytes, "file": seg_path, "summary": reader.end.reason}


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
                      "deleted": v is None} for k, v, _b in writes]
    out["payload"] = body
    out["summary"] = _summary(name, body)
    return out


def _key(k: bytes):
    k = decode_key(k)
    return k if isinstance(k, str) else "0x" + k.hex()


def _summary(name: str, body: dict) -> str:
    if "w" in body:
        keys = [w["key"] for w in body["w"]]
        shown = ", ".join(map(str, keys[:4])) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")
        return f"tx {body.get('tx')}: {len(keys)} write(s): {shown}"
    if "tx" in body:
        return f"tx {body['tx']}"
    return ", ".join(f"{k}={v}" for k, v in body.items() if not isinstance(v, (list, dict)))
