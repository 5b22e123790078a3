"""The WAL's byte format: the layout of segment headers and records, and their checksums.

This module owns the on-disk format of the write-ahead log at the byte level and nothing
else (no files, no policy).  ``docs/FORMAT.md`` tells the same story for humans.

Segment header (64 bytes, at offset 0 of every segment file)::

    off size field
      0    8 magic            b"WALSTSEG"
      8    2 format version   1   (u16, little endian, as every integer here); a larger
                              one (with a valid CRC) was written by a newer walstore:
                              NotAStore, never damage
     10    2 header size      64
     12    4 reserved         0
     16   16 store id         the store's UUID (bytes)
     32    8 start LSN        must equal the number in the file name
     40    8 created          unix time in nanoseconds
     48    8 size             the file's preallocated size (0: not recorded); a shorter
                              file was truncated, which is damage, never a torn tail
     56    4 reserved         0
     60    4 crc32c           CRC-32C of bytes 0..59

Record (a 28-byte header followed by ``length`` payload bytes, packed back to back after
the segment header; the LSN of a record is ``segment start LSN + (file offset - 64)``)::

    off size field
      0    4 crc32c           CRC-32C of SALT + bytes 4..27 + payload
      4    4 length           payload length, at most MAX_PAYLOAD
      8    1 type             a RecordType, never 0
      9    1 flags            0 (reserved)

A record whose CRC checks but whose type this code does not know, or whose flags are not
0, was written whole by a newer walstore (no crash and no bit flip yields a valid CRC):
:func:`check_record` raises NotAStore naming it instead of calling it bad, so no reader
takes it for a torn tail and cuts it (that destroyed what the newer version wrote).
     10    2 magic            b"WR"
     12    8 lsn              this record's own LSN (its log position)
     20    8 synced lsn       end of the log known durable (fsynced) when it was written
     28    n payload          msgpack

SALT is the segment's store id (16 bytes) followed by its start LSN (8 bytes), so bytes
from another store, from an older incarnation of a recycled file, or a segment copied
under another name never validate.  The magic and type are under the CRC and non-zero, so
a zero-filled header (whose payload CRC would be 0) never validates either.

The *synced lsn* lets recovery tell a torn tail from a corrupt middle: a valid record
written after a bad one proves the bad one was damaged after it was made durable when
its synced lsn lies beyond the bad record's position; otherwise both were in the last
unsynced write window, and the bad record is an ordinary torn write.

Invariants: every length read from disk is checked against MAX_PAYLOAD and against the
bytes that remain in the file before anything is allocated; every integer is unsigned.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from ..errors import NotAStore

def _checked(fn):
    """``fn`` when it computes CRC-32C (the check value, and chaining), else None."""
    try:
        if fn(b"123456789") == 0xE3069283 and fn(b"6789", fn(b"12345")) == 0xE3069283:
            return fn
    except Exception:  # (a package of another shape: not this one)
        pass
    return None


def _choose_crc32c():
    """The fastest CRC-32C at hand: google-crc32c's C extension (a dependency: SSE4.2 or
    ARMv8 CRC instructions, a table in C elsewhere; ~0.2 us for a 180-byte commit record
    and ~45 us for 1 MiB here), else crcmod's table-driven C routine, called directly
    (~0.7 us and ~2.4 ms: a bulk load's 14 MB of log spent ~33 ms in it).  The same
    Castagnoli values either way (docs/FORMAT.md)."""
    try:
        import google_crc32c
        if google_crc32c.implementation == "c":  # (its pure-Python fallback is slow)
            extend = google_crc32c.extend

            def crc(data, crc: int = 0) -> int:  # (it takes bytes only: a memoryview
                if type(data) is not bytes:      # of a segment is copied, ~50 us a MiB;
                    data = bytes(memoryview(data))  # what has no buffer is refused)
                return extend(crc, data)
            fn = _checked(crc)
            if fn is not None:
                fn.bytes_extend = extend  # (its C call, for bytes: ``_bytes_crc``)
                return fn
    except ImportError:  # pragma: no cover - an install without the dependency
        pass
    import crcmod.predefined
    wrapped = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
    try:  # crcmod's C routine without its Python wrapper
        _, table, fun = wrapped.__defaults__
        fn = _checked(lambda data, crc=0: 0xFFFFFFFF ^ fun(data, 0xFFFFFFFF ^ crc, table))
        if fn is not None:
            return fn
    except (TypeError, ValueError, AttributeError):  # another crcmod: keep the wrapper
        pass
    return wrapped


crc32c = _choose_crc32c()
"""CRC-32C (Castagnoli) of ``data``, continuing ``crc``: ``crc32c(b, crc32c(a))`` is
``crc32c(a + b)``."""


def _choose_bytes_crc():
    """``crc32c`` for ``bytes`` data, arguments as (crc, data): google-crc32c's C
    ``extend`` itself when ``crc32c`` is its wrapper (no Python frame for each record
    ``encode_record`` frames: its data is always ``bytes``), else ``crc32c`` wrapped."""
    extend = getattr(crc32c, "bytes_extend", None)
    if extend is not None:
        return extend
    return lambda crc, data: crc32c(data, crc)


_bytes_crc = _choose_bytes_crc()


FORMAT_VERSION = 1
SEGMENT_MAGIC = b"WALSTSEG"
SEGMENT_HEADER_SIZE = 64
RECORD_MAGIC = b"WR"
RECORD_HEADER_SIZE = 28
MAX_PAYLOAD = 32 * 1024 * 1024  # bound on any payload length read from disk
# a segment ends with a SEAL record whose body is the empty map (msgpack 0x80): the next
# segment starts where it ends
SEAL_PAYLOAD = b"\x80"
SEAL_RECORD_SIZE = RECORD_HEADER_SIZE + len(SEAL_PAYLOAD)
# bound on a segment header's made size (the largest ``segment_size``, 1 GiB, or one record
# past it): a size beyond it is no writer's, and recovery extended a truncated segment to it
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024 + MAX_PAYLOAD + 1024 * 1024

_SEG = struct.Struct("<8sHHI16sQQQ4s")  # 60 bytes, then the u32 crc
_CRC = struct.Struct("<I")
_REC = struct.Struct("<IIBB2sQQ")  # crc, length, type, flags, magic, lsn, synced lsn
_HEAD = struct.Struct("<IBB2sQQ")  # the same without the crc: what the crc covers first
assert _SEG.size == SEGMENT_HEADER_SIZE - 4 and _REC.size == RECORD_HEADER_SIZE


class RecordType(enum.IntEnum):
    """Kinds of WAL record.  Values are part of the on-disk format: never renumber."""

    COMMIT = 1            # a transaction's writes (last chunk) and its commit
    WRITES = 2            # an earlier chunk of a large transaction's writes
    CHECKPOINT = 3        # LMDB is synced up to ``applied``; older segments may go
    ABORT = 4             # a transaction that logged records rolled back
    ACTION_INTENT = 5     # an external side effect is about to run
    ACTION_RESULT = 6     # its body finished; the result
    COMPENSATED = 7       # its compensation ran (or was resolved by hand / failed)
    PREPARE = 8           # two-phase commit: a transaction is prepared (in doubt)
    COMMIT_PREPARED = 9   # the decision for a prepared transaction: commit
    ROLLBACK_PREPARED = 10  # the decision for a prepared transaction: roll back
    RESTORE_POINT = 11    # a named point in history
    SEAL = 12             # the last record of a segment: the next one starts where it ends
    WORKSPACE = 13        # a directory tree registered for reversible files
    FILE_STEPS = 14       # before-images of a file operation, logged before it happens
    WATCH_BEGIN = 15      # a watch() began: the workspace's manifest before it
    WATCH_END = 16        # a watch() ended: its changes were logged (as FILE_STEPS)
    FILE_RESTORED = 17    # the file effects named were undone (or are held)
    FILE_CONFLICT = 18    # a path changed behind walstore's back: both versions kept


VALID_TYPES = frozenset(int(t) for t in RecordType)


class LSN(int):
    """An int that is a log position, so ``rewind``/``at``/``log(since=)`` never take it
    for a txid (``tx.lsn``, ``TxnInfo.lsn`` and ``restore_point()`` return LSNs).  Made
    only from an int (not a bool, float or str: ``LSN(1.5)`` was silently LSN 1)."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> "LSN":
        if type(value) is not int and type(value) is not cls:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"an LSN is made from an int, not {type(value).__name__} "
                                f"({value!r})")
        return int.__new__(cls, value)  # (a negative one names nothing: UnknownPoint)

    # Arithmetic keeps the kind: an LSN moved by a number of bytes is still a log position
    # (``store.rewind(tx.lsn - 1)``, "just before this commit", became an int, i.e. a
    # txid: it rewound to whichever transaction had that number); the distance between
    # two LSNs is a plain int.
    def __add__(self, other):
        if type(other) is int:
            return LSN(int(self) + other)
        return int.__add__(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        if type(other) is int:
            return LSN(int(self) - other)
        return int.__sub__(self, other)  # (LSN - LSN: a distance; an int)

    def __repr__(self) -> str:
        return f"LSN({int(self)})"
    __str__ = int.__repr__


class SegmentHeader(NamedTuple):
    version: int
    store_id: bytes
    start_lsn: int
    created_ns: int
    size: int = 0


class RecordHeader(NamedTuple):
    crc: int
    length: int
    type: int
    flags: int
    magic: bytes
    lsn: int
    synced_lsn: int


def segment_salt(store_id: bytes, start_lsn: int) -> int:
    """CRC state that seeds every record CRC of one segment."""
    return crc32c(store_id + struct.pack("<Q", start_lsn))


def encode_segment_header(store_id: bytes, start_lsn: int, created_ns: int,
                          size: int = 0) -> bytes:
    body = _SEG.pack(SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER_SIZE, 0, store_id,
                     start_lsn, created_ns, size, bytes(4))
    return body + _CRC.pack(crc32c(body))


def decode_segment_header(data: bytes) -> SegmentHeader:
    """Parse a segment header; raise ValueError with the reason when it is not valid."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise ValueError(f"segment header truncated ({len(data)} of {SEGMENT_HEADER_SIZE} bytes)")
    body, (crc,) = data[:60], _CRC.unpack_from(data, 60)
    magic, version, hsize, _r, store_id, start, created, size, _pad = _SEG.unpack(body)
    if magic != SEGMENT_MAGIC:
        raise ValueError("bad segment magic")
    if crc32c(body) != crc:
        raise ValueError("segment header checksum mismatch")
    if version > FORMAT_VERSION:  # (whole: the CRC checked) a newer writer's, not damage
        raise NotAStore(f"unsupported segment format version {version}: the segment was "
                        f"written by a newer walstore (this one reads version "
                        f"{FORMAT_VERSION}); upgrade walstore to open this store")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported segment format version {version}")
    if hsize != SEGMENT_HEADER_SIZE:
        raise ValueError(f"unexpected segment header size {hsize}")
    return SegmentHeader(version, store_id, start, created, size)


def encode_record(salt: int, rtype: int, lsn: int, synced_lsn: int, payload: bytes) -> bytes:
    """Frame one record.  ``salt`` comes from :func:`segment_salt`."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD} limit")
    data = _HEAD.pack(len(payload), rtype, 0, RECORD_MAGIC, lsn, synced_lsn) + payload
    return _CRC.pack(_bytes_crc(salt, data)) + data  # (the CRC covers header and payload)


def parse_record_header(buf, offset: int) -> RecordHeader:
    return RecordHeader(*_REC.unpack_from(buf, offset))


def check_record(buf, offset: int, salt: int, expected_lsn: int, limit: int,
                 where: str | None = None, base: int = 0):
    """Validate the record at ``offset`` of ``buf`` (which holds bytes up to ``limit``;
    ``buf`` begins at file offset ``base``, for messages: a reader's window of a file).

    Returns ``(header, None)`` when it is a whole, valid record with the expected LSN, or
    ``(header_or_None, reason)`` naming the first thing wrong.  Never allocates more than
    the bytes that are really there.  A record with a valid CRC but an unknown type or
    non-zero flags raises NotAStore (a newer walstore wrote it; ``where``, the file, is
    named in the message).
    """
    if offset + RECORD_HEADER_SIZE > limit:
        return None, "truncated record header"
    h = parse_record_header(buf, offset)
    if h.magic != RECORD_MAGIC:
        return h, "bad record magic"
    if h.length > MAX_PAYLOAD:
        return h, f"record length {h.length} exceeds the {MAX_PAYLOAD} byte bound"
    end = offset + RECORD_HEADER_SIZE + h.length
    if end > limit:
        return h, f"truncated record payload ({limit - offset - RECORD_HEADER_SIZE} of {h.length} bytes)"
    if h.lsn != expected_lsn:  # cheap, and checked before the CRC pays for the payload
        return h, f"record LSN {h.lsn} does not match its position {expected_lsn}"
    crc = crc32c(memoryview(buf)[offset + 4:end], salt)
    if crc != h.crc:
        return h, "record checksum mismatch"
    if h.type not in VALID_TYPES or h.flags != 0:
        raise NotAStore(newer_record_message(h, where, base + offset))
    return h, None


def newer_record_message(h: RecordHeader, where: str | None = None,
                         offset: int | None = None) -> str:
    """Why a whole record (its CRC checks) of an unknown type or flags is refused."""
    what = (f"a record of type {h.type}" if h.type not in VALID_TYPES
            else f"a record of type {h.type} with flags {h.flags}")
    place = f"LSN {h.lsn}" + (f", file {where}, offset {offset}" if where else "")
    return (f"the log holds {what} ({place}) written by a newer walstore: this walstore "
            f"knows record types {min(VALID_TYPES)}-{max(VALID_TYPES)} and flags 0; "
            f"upgrade walstore to open this store (nothing was changed)")
