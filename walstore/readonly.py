"""Read-only opens: LMDB plus the committed WAL tail that LMDB does not hold yet.

A read-only process never writes a byte: it opens LMDB read-only and reads the WAL from
LMDB's ``applied`` LSN to the end of the valid records (the writer may be appending; a
partly written record simply ends the scan), building an overlay of committed writes.
So it sees every commit the writer acknowledged before ``refresh()`` (called at open).
"""
from __future__ import annotations

from . import records
from .framing import RecordType
from .kv import LmdbState
from .layout import Layout
from .segments import SegmentReader, list_segments


def load_wal_tail(layout: Layout, store_id: bytes, state: LmdbState
                  ) -> tuple[dict[bytes, tuple[int, bytes | None]], int]:
    """(overlay of commits past ``applied``, end LSN of the last one)."""
    applied = state.applied_lsn()
    overlay: dict[bytes, tuple[int, bytes | None]] = {}
    chunks: dict[int, list] = {}
    published = applied
    for start, path in list_segments(layout.wal):
        try:
            reader = SegmentReader(path, store_id, start)
        except FileNotFoundError:  # trimmed by a checkpoint while we listed
            continue
        if reader.header_error is not None:
            break
        for rec in reader.records():
            if rec.end_lsn <= applied or rec.type not in (RecordType.WRITES, RecordType.COMMIT,
                                                          RecordType.ABORT):
                continue
            body = records.decode(rec.payload)
            txid = records.txid_of(body)
            if rec.type == RecordType.WRITES:
                chunks.setdefault(txid, []).extend(records.parse_writes(body))
            elif rec.type == RecordType.ABORT:
                chunks.pop(txid, None)
            else:
                for k, v, _b in chunks.pop(txid, []) + records.parse_writes(body):
                    overlay[k] = (rec.lsn, v)
                published = rec.end_lsn
        if reader.end is not None and reader.end.kind != "clean":
            break
    return overlay, published
