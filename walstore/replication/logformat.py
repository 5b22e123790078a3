"""Record decoding for replication: the WAL byte format as the shipper and restore see it.

Owns (1) reading and validating records of a segment (CRC salted with the segment's store
id and start LSN, the LSN of each record equal to its position), tolerant of the SEAL
record (type 12) and of a segment header that records its preallocated size (bytes
48..55, u64 little endian, 0 = not recorded); (2) re-framing a record under another
segment's salt (a restored log may start a segment where the original had none); (3) the
few payload fields replication needs, decoded without building the whole payload
(``tx``, ``ts``, ``name``, ``drop``), what a file record says (:func:`file_record`:
the file effects a restore reports owed), and whether a commit is a purge
(:func:`is_purge`); (4) the WAL *object* format shipped to storage.

This module and :mod:`walstore.replication.source` are the only ones importing walstore
internals; the lead re-points them to ``walstore.log.*``.

WAL object (immutable, named by its LSN range)::

    8   magic b"WSREPWAL"
    4   header length h (u32 LE, at most MAX_OBJECT_HEADER)
    h   msgpack header {"v": 1, "store_id": bytes16, "lineage": str, "seg": segment start,
                        "first": LSN, "end": LSN, "records": n}
    4   CRC-32C of the 12 + h bytes above
    end-first   the records, byte for byte as in the segment (each with its own CRC)

A restore checks the header CRC, that the object holds exactly ``end - first`` record
bytes, and every record's CRC and LSN under the salt (store id, seg).
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, NamedTuple

import msgpack

from ..codec import DECODE_ERRORS
from ..log.format import (MAX_PAYLOAD, RECORD_HEADER_SIZE, SEAL_PAYLOAD, SEAL_RECORD_SIZE,
                          SEGMENT_HEADER_SIZE, RecordType, crc32c,
                          decode_segment_header, encode_record, encode_segment_header,
                          segment_salt)
from ..log.format import check_record as _check_record
from ..log.reader import FileBytes, check_at

SEAL = int(RecordType.SEAL)
CHECKPOINT = int(RecordType.CHECKPOINT)
COMMIT, WRITES, ABORT = int(RecordType.COMMIT), int(RecordType.WRITES), int(RecordType.ABORT)
ACTION_INTENT, PREPARE = int(RecordType.ACTION_INTENT), int(RecordType.PREPARE)
ROLLBACK_PREPARED = int(RecordType.ROLLBACK_PREPARED)
RESTORE_POINT = int(RecordType.RESTORE_POINT)
FILE_STEPS, WATCH_BEGIN = int(RecordType.FILE_STEPS), int(RecordType.WATCH_BEGIN)
WATCH_END, FILE_RESTORED = int(RecordType.WATCH_END), int(RecordType.FILE_RESTORED)
FILE_CONFLICT = int(RecordType.FILE_CONFLICT)
# a transaction is in flight after one of these (the records the engine's ``inflight`` table
# counts: a transaction whose only effects are file changes is in flight too, and a restore
# cut there leaves its changes on disk, owed) ...
OPENING = frozenset({WRITES, ACTION_INTENT, PREPARE, FILE_STEPS, WATCH_BEGIN})
ENDING = frozenset({COMMIT, ABORT, ROLLBACK_PREPARED})  # ... and no longer after one of these
FILE_RECORDS = frozenset({FILE_STEPS, WATCH_BEGIN, WATCH_END, FILE_RESTORED})

OBJ_MAGIC = b"WSREPWAL"
MAX_OBJECT_HEADER = 1 << 20
_REC = struct.Struct("<IIBB2sQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
HEADER_SIZE = SEGMENT_HEADER_SIZE
__all__ = ["Rec", "check_record", "iter_records", "reframe", "salt", "summarize",
           "segment_header", "read_segment_header", "encode_object_header",
           "read_object_header", "file_record", "is_purge", "purge_prefix",
           "purge_prefix_of", "HEADER_SIZE",
           "RECORD_HEADER_SIZE", "SEAL"]


class Rec(NamedTuple):
    offset: int      # offset of the record in the buffer it was read from
    lsn: int
    type: int
    end: int         # LSN just past it
    synced: int      # the writer's durable frontier when it was written
    size: int        # header + payload bytes


def salt(store_id: bytes, seg_start: int) -> int:
    return segment_salt(store_id, seg_start)


def seal_record(salt_: int, lsn: int) -> bytes:
    """The SEAL record the writer ends a segment with, at ``lsn``."""
    return encode_record(salt_, SEAL, lsn, lsn, SEAL_PAYLOAD)


def segment_header(store_id: bytes, start: int, created_ns: int = 0) -> bytes:
    return encode_segment_header(store_id, start, created_ns)


def read_segment_header(data: bytes) -> tuple[bytes, int, int]:
    """(store id, start LSN, preallocated size or 0); ValueError when not valid."""
    h = decode_segment_header(data)
    return h.store_id, h.start_lsn, _U64.unpack_from(data, 48)[0]


def check_record(buf, off: int, salt_: int, lsn: int, limit: int) -> tuple[Rec | None, str]:
    """The whole valid record at ``off`` of ``buf`` (bytes up to ``limit``), or (None, why):
    the log's own record check (walstore.log.format), on a buffer — or on a segment file
    read through ``walstore.log.reader.FileBytes`` (``pread``, a window at a time: never
    a mapping, which dies of SIGBUS when the file is cut under it; CONTRACT 4.9)."""
    if isinstance(buf, FileBytes):
        h, why, _b, _i = check_at(buf, off, salt_, lsn, limit, "")
    else:
        h, why = _check_record(buf, off, salt_, lsn, limit)
    if why is not None:
        return None, why
    size = RECORD_HEADER_SIZE + h.length
    return Rec(off, lsn, h.type, lsn + size, h.synced_lsn, size), ""


def iter_records(buf, off: int, lsn: int, salt_: int, limit: int
                 ) -> Iterator[Rec]:
    """Valid records from ``off`` (at LSN ``lsn``) until the first that does not validate."""
    while True:
        rec, _why = check_record(buf, off, salt_, lsn, limit)
        if rec is None:
            return
        yield rec
        off += rec.size
        lsn = rec.end


def reframe(raw: bytes, new_salt: int) -> bytes:
    """The same record (header fields and payload unchanged) with its CRC under ``new_salt``."""
    return _U32.pack(crc32c(memoryview(raw)[4:], new_salt)) + raw[4:]


def payload(buf, rec: Rec):
    if isinstance(buf, FileBytes):
        return buf[rec.offset + RECORD_HEADER_SIZE:rec.offset + rec.size]
    return memoryview(buf)[rec.offset + RECORD_HEADER_SIZE:rec.offset + rec.size]


_WANTED = {"tx", "ts", "name", "drop", "gid"}


def summarize(rtype: int, body) -> dict:
    """The few fields replication tracks (tx, ts, name, drop, gid) of a record payload,
    skipping every other value unread; {} for records it does not track or cannot parse."""
    if rtype not in OPENING and rtype not in ENDING and rtype != RESTORE_POINT:
        return {}
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(body), 1))
    try:
        up.feed(body)
        n = up.read_map_header()
        out = {}
        for _ in range(n):
            k = up.unpack()
            if k in _WANTED:
                out[k] = up.unpack()
            else:
                up.skip()
        return out
    except Exception:  # a payload the engine's own recovery will judge; not ours to refuse
        return {}


def is_purge(rtype: int, raw: bytes) -> bool:
    """Is this record (``raw``: header and payload) a purge's commit, a COMMIT whose
    payload has ``purge_range``?  A follower that appends one applies and erases promptly
    (restore ``_follow_rounds``).  A commit without that name among its bytes is never
    decoded."""
    if rtype != COMMIT or _PURGE_KEY not in raw:
        return False
    body = bytes(raw[RECORD_HEADER_SIZE:])
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(body), 1))
    try:
        up.feed(body)
        for _ in range(up.read_map_header()):
            if up.unpack() == "purge_range":
                return True
            up.skip()
    except Exception:  # a payload the engine's own recovery will judge
        return False
    return False


_PURGE_KEY = msgpack.packb("purge_range")


def purge_prefix(rtype: int, buf, rec: "Rec"):
    """The prefix a purge's commit erased (its payload's ``purge``: str or bytes), or None
    for any other record; ``buf`` holds ``rec`` (an mmap: searched, not copied, unless
    the name is among its bytes).  The shipper marks each WAL object with the purges in
    it (manifest ``pg``), so a restore to a point before a purge can apply it."""
    if rtype != COMMIT:
        return None
    start = rec.offset + RECORD_HEADER_SIZE
    if buf.find(_PURGE_KEY, start, rec.offset + rec.size) < 0:
        return None
    body = bytes(buf[start:rec.offset + rec.size])
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(body), 1))
    try:
        up.feed(body)
        found, prefix = False, None
        for _ in range(up.read_map_header()):
            k = up.unpack()
            if k == "purge_range":
                found = True
                up.skip()
            elif k == "purge":
                prefix = up.unpack()
            else:
                up.skip()
    except Exception:  # a payload the engine's own recovery will judge
        return None
    return prefix if found and isinstance(prefix, (str, bytes)) and prefix else None


def purge_prefix_of(rtype: int, raw: bytes):
    """``purge_prefix`` of one whole record's bytes (header and payload)."""
    return purge_prefix(rtype, raw, Rec(0, 0, rtype, len(raw), 0, len(raw)))


def file_record(rtype: int, body) -> dict:
    """What a file record (FILE_STEPS, WATCH_BEGIN, WATCH_END, FILE_RESTORED) says, for
    tracking the file effects in flight: ``tx``, ``ws`` (root, bytes), ``op``, ``paths``
    (the workspace paths a FILE_STEPS changes, bytes), ``watch`` / ``begin`` (the
    WATCH_BEGIN LSN a watch's steps or end name), ``effects`` and ``held`` (FILE_RESTORED);
    {} for other records or a payload that does not parse (recovery judges those)."""
    if rtype not in FILE_RECORDS:
        return {}
    try:
        doc = msgpack.unpackb(bytes(body), raw=False, strict_map_key=False)
    except DECODE_ERRORS:
        return {}
    if not isinstance(doc, dict):
        return {}
    out = {k: doc.get(k) for k in ("tx", "ws", "op", "watch", "begin", "effects", "held")}
    if rtype == FILE_STEPS:
        steps = doc.get("steps")
        out["paths"] = [s[0] for s in steps if isinstance(s, (list, tuple)) and s] \
            if isinstance(steps, (list, tuple)) else []
    return out


# ---- WAL objects ---------------------------------------------------------------------
def encode_object_header(store_id: bytes, lineage: str, seg: int, first: int, end: int,
                         n: int) -> bytes:
    head = msgpack.packb({"v": 1, "store_id": store_id, "lineage": lineage, "seg": seg,
                          "first": first, "end": end, "records": n}, use_bin_type=True)
    body = OBJ_MAGIC + _U32.pack(len(head)) + head
    return body + _U32.pack(crc32c(body))


def read_object_header(f: BinaryIO) -> tuple[dict, int]:
    """Parse a WAL object's header from the start of ``f``; (header, its size in bytes).

    ValueError names what is wrong.  The header length is bounded before it is read."""
    fixed = f.read(12)
    if len(fixed) < 12 or fixed[:8] != OBJ_MAGIC:
        raise ValueError("not a walstore WAL object (bad magic)")
    (hlen,) = _U32.unpack_from(fixed, 8)
    if hlen > MAX_OBJECT_HEADER:
        raise ValueError(f"WAL object header length {hlen} exceeds {MAX_OBJECT_HEADER}")
    head = f.read(hlen)
    crc = f.read(4)
    if len(head) < hlen or len(crc) < 4:
        raise ValueError("WAL object header truncated")
    if crc32c(fixed + head) != _U32.unpack(crc)[0]:
        raise ValueError("WAL object header checksum mismatch")
    try:
        doc = msgpack.unpackb(head, raw=False, strict_map_key=False)
    except DECODE_ERRORS as e:
        raise ValueError(f"WAL object header undecodable: {e}") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise ValueError("WAL object header of an unknown version")
    for k in ("seg", "first", "end"):
        if not isinstance(doc.get(k), int) or doc[k] < 0:
            raise ValueError(f"WAL object header lacks {k}")
    if not isinstance(doc.get("store_id"), bytes) or doc["end"] < doc["first"]:
        raise ValueError("WAL object header is inconsistent")
    return doc, 16 + hlen


def iter_object_records(f: BinaryIO, head: dict, store_id: bytes, where: str
                        ) -> Iterator[tuple[int, int, bytes, int]]:
    """(lsn, type, raw record bytes, synced) of every record of a WAL object whose header
    was just read from ``f``; ValueError naming the object and LSN at the first problem.

    Reads one record at a time (each bounded by MAX_PAYLOAD before allocation) and checks
    that the records fill exactly [first, end) and nothing follows them."""
    if head["store_id"] != store_id:
        raise ValueError(f"{where} belongs to another store")
    salt_ = segment_salt(store_id, head["seg"])
    lsn, end = head["first"], head["end"]
    while lsn < end:
        h = f.read(RECORD_HEADER_SIZE)
        if len(h) < RECORD_HEADER_SIZE:
            raise ValueError(f"{where} is truncated at LSN {lsn}")
        _crc, length, _t, _f, _m, _l, _s = _REC.unpack(h)
        if length > MAX_PAYLOAD or lsn + RECORD_HEADER_SIZE + length > end:
            raise ValueError(f"{where}: record at LSN {lsn} overruns the object")
        raw = h + f.read(length)
        rec, why = check_record(raw, 0, salt_, lsn, len(raw))
        if rec is None:
            raise ValueError(f"{where}: record at LSN {lsn}: {why}")
        yield lsn, rec.type, raw, rec.synced
        lsn = rec.end
    if f.read(1):
        raise ValueError(f"{where} has bytes after its last record")
