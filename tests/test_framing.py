"""WAL framing at the byte level (walstore.log.format): round trips, the documented layout,
checksums, salts, and the bounds every length read from disk must respect.

These tests check the format against its written description (the module docstring and
docs/FORMAT.md) with an independent CRC-32C (crcmod's Castagnoli) and ``struct``, so a
change to the on-disk format shows up here as a failure, not as a silent re-agreement of
the engine with itself.
"""
from __future__ import annotations

import struct
import tracemalloc
import uuid

import crcmod.predefined
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walstore.errors import NotAStore
from walstore.log import format as framing
from walstore.log.format import (MAX_PAYLOAD, RECORD_HEADER_SIZE, RECORD_MAGIC, SEGMENT_HEADER_SIZE,
                              SEGMENT_MAGIC, RecordType, check_record, crc32c,
                              decode_segment_header, encode_record, encode_segment_header,
                              parse_record_header, segment_salt)
from walstore.log.reader import SegmentReader
from walstore.log.segment import segment_name

# An independent CRC-32C: crcmod's predefined Castagnoli polynomial.
_crc32c_ref = crcmod.predefined.mkPredefinedCrcFun("crc-32c")

STORE_A = uuid.UUID("11111111-2222-3333-4444-555555555555").bytes
STORE_B = uuid.UUID("99999999-8888-7777-6666-555555555555").bytes

PAYLOAD_SIZES = [0, 1, 2, 27, 28, 29, 63, 64, 65, 255, 256, 4095, 4096, 4097, 65535, 65536,
                 1 << 20, MAX_PAYLOAD - 1, MAX_PAYLOAD]


def _payload(n: int) -> bytes:
    """Deterministic, non-periodic-looking bytes of length n (cheap for large n)."""
    seed = bytes(range(251))  # prime length so the pattern does not align with anything
    return (seed * (n // len(seed) + 1))[:n]


# ---- CRC-32C ------------------------------------------------------------------------------

def test_crc32c_check_value() -> None:
    # The standard check value of CRC-32C (Castagnoli), e.g. RFC 3720 / iSCSI.
    assert crc32c(b"123456789") == 0xE3069283
    assert _crc32c_ref(b"123456789") == 0xE3069283


def test_crc32c_empty_and_incremental() -> None:
    assert crc32c(b"") == 0
    data = _payload(10_000)
    for cut in (0, 1, 4, 999, 9_999, 10_000):
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data) == _crc32c_ref(data)


def test_crc32c_accepts_memoryview() -> None:
    data = _payload(5000)
    assert crc32c(memoryview(data)[17:4000]) == _crc32c_ref(data[17:4000])


def test_crc32c_is_the_hardware_one_and_agrees_with_crcmod() -> None:
    """The log frames with google-crc32c's C extension (a dependency): the same values
    as crcmod's on every shape of input the log hands it (bytes, a memoryview of a
    segment, a bytearray), continued or not."""
    import google_crc32c
    assert google_crc32c.implementation == "c"
    assert crc32c.__module__ == framing.__name__ and crc32c.__name__ == "crc"
    import random
    rng = random.Random(7)
    for n in (0, 1, 3, 28, 181, 4096, 1 << 20):
        data = rng.randbytes(n)
        seed = rng.getrandbits(32)
        want = _crc32c_ref(data, seed)
        assert crc32c(data, seed) == want
        assert crc32c(memoryview(b"xx" + data)[2:], seed) == want
        assert crc32c(bytearray(data), seed) == want


# ---- segment header -----------------------------------------------------------------------

@pytest.mark.parametrize("start_lsn", [0, 1, 64490, 2**40 + 7, 2**64 - 1])
def test_segment_header_round_trip(start_lsn: int) -> None:
    created = 1_700_000_000_123_456_789
    raw = encode_segment_header(STORE_A, start_lsn, created)
    assert len(raw) == SEGMENT_HEADER_SIZE == 64
    h = decode_segment_header(raw)
    assert h.version == framing.FORMAT_VERSION == 1
    assert h.store_id == STORE_A
    assert h.start_lsn == start_lsn
    assert h.created_ns == created
    # extra bytes after the header are not the header's business
    assert decode_segment_header(raw + b"\xff" * 100) == h


def test_segment_header_documented_layout() -> None:
    raw = encode_segment_header(STORE_A, 123456, 987654321)
    assert raw[0:8] == SEGMENT_MAGIC == b"WALSTSEG"
    assert struct.unpack_from("<H", raw, 8)[0] == 1          # format version
    assert struct.unpack_from("<H", raw, 10)[0] == 64         # header size
    assert raw[12:16] == bytes(4)                             # reserved
    assert raw[16:32] == STORE_A                              # store id
    assert struct.unpack_from("<Q", raw, 32)[0] == 123456     # start LSN
    assert struct.unpack_from("<Q", raw, 40)[0] == 987654321  # created (ns)
    assert raw[48:60] == bytes(12)                            # reserved
    assert struct.unpack_from("<I", raw, 60)[0] == _crc32c_ref(raw[:60])


def test_segment_header_truncated() -> None:
    raw = encode_segment_header(STORE_A, 0, 0)
    for n in (0, 1, 32, 63):
        with pytest.raises(ValueError, match="truncated"):
            decode_segment_header(raw[:n])


def test_segment_header_every_byte_is_checked() -> None:
    raw = encode_segment_header(STORE_A, 4242, 99)
    for i in range(SEGMENT_HEADER_SIZE):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(ValueError):
            decode_segment_header(bytes(bad))


def test_segment_header_zeros_are_refused() -> None:
    with pytest.raises(ValueError, match="magic"):
        decode_segment_header(bytes(64))


def _reheader(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Change one field and recompute the header CRC (so only that field is wrong)."""
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    struct.pack_into("<I", b, 60, _crc32c_ref(bytes(b[:60])))
    return bytes(b)


def test_segment_header_unknown_version_refused() -> None:
    raw = _reheader(encode_segment_header(STORE_A, 0, 0), 8, "<H", 0)
    with pytest.raises(ValueError, match="version 0"):
        decode_segment_header(raw)


def test_segment_header_of_a_newer_version_is_a_newer_writers() -> None:
    """A whole header (its CRC checks) of a larger version: a newer walstore's segment,
    refused as such (NotAStore), never taken for a damaged header (ValueError: a bad
    segment, which a salvage mode drops to quarantine)."""
    raw = _reheader(encode_segment_header(STORE_A, 0, 0), 8, "<H", 2)
    with pytest.raises(NotAStore, match="unsupported segment format version 2: the segment "
                                        "was written by a newer walstore .*upgrade walstore"):
        decode_segment_header(raw)


def test_segment_header_wrong_header_size_refused() -> None:
    raw = _reheader(encode_segment_header(STORE_A, 0, 0), 10, "<H", 128)
    with pytest.raises(ValueError, match="header size 128"):
        decode_segment_header(raw)


# ---- records ------------------------------------------------------------------------------

def test_segment_salt_is_crc_of_store_id_and_start() -> None:
    assert segment_salt(STORE_A, 77) == _crc32c_ref(STORE_A + struct.pack("<Q", 77))
    assert segment_salt(STORE_A, 77) != segment_salt(STORE_A, 78)
    assert segment_salt(STORE_A, 77) != segment_salt(STORE_B, 77)


@pytest.mark.parametrize("size", PAYLOAD_SIZES)
def test_record_round_trip(size: int) -> None:
    salt = segment_salt(STORE_A, 1000)
    payload = _payload(size)
    lsn, synced = 1000 + 3 * size + 5, 1000 + size
    frame = encode_record(salt, RecordType.COMMIT, lsn, synced, payload)
    assert len(frame) == RECORD_HEADER_SIZE + size
    # inside a larger buffer, at a non-zero offset, with garbage after it
    prefix, suffix = b"\xaa" * 13, b"\x55" * 40
    buf = prefix + frame + suffix
    h, reason = check_record(buf, len(prefix), salt, lsn, len(buf))
    assert reason is None
    assert (h.length, h.type, h.flags, h.magic, h.lsn, h.synced_lsn) == (
        size, RecordType.COMMIT, 0, RECORD_MAGIC, lsn, synced)
    start = len(prefix) + RECORD_HEADER_SIZE
    assert buf[start:start + h.length] == payload
    # and exactly at the limit (no trailing bytes at all)
    assert check_record(frame, 0, salt, lsn, len(frame))[1] is None


def test_record_documented_layout() -> None:
    salt = segment_salt(STORE_A, 64)
    payload = b"\x81\xa2tx\x07"
    frame = encode_record(salt, RecordType.ABORT, 4096, 2048, payload)
    crc, length, rtype, flags, magic, lsn, synced = struct.unpack_from("<IIBB2sQQ", frame, 0)
    assert (length, rtype, flags, magic, lsn, synced) == (len(payload), 4, 0, b"WR", 4096, 2048)
    assert frame[28:] == payload
    # CRC-32C of SALT + bytes 4..27 + payload: seeded with the segment salt
    assert crc == _crc32c_ref(frame[4:], salt)
    assert crc == _crc32c_ref(frame[4:], _crc32c_ref(STORE_A + struct.pack("<Q", 64)))
    assert parse_record_header(frame, 0) == (crc, length, rtype, flags, magic, lsn, synced)


@pytest.mark.parametrize("rtype", sorted(int(t) for t in RecordType))
def test_every_record_type_round_trips(rtype: int) -> None:
    salt = segment_salt(STORE_B, 0)
    frame = encode_record(salt, rtype, 0, 0, b"\x80")
    h, reason = check_record(frame, 0, salt, 0, len(frame))
    assert reason is None and h.type == rtype


def test_record_type_values_are_frozen() -> None:
    # on-disk values: renumbering would misread every existing WAL
    assert {t.name: int(t) for t in RecordType} == {
        "COMMIT": 1, "WRITES": 2, "CHECKPOINT": 3, "ABORT": 4, "ACTION_INTENT": 5,
        "ACTION_RESULT": 6, "COMPENSATED": 7, "PREPARE": 8, "COMMIT_PREPARED": 9,
        "ROLLBACK_PREPARED": 10, "RESTORE_POINT": 11, "SEAL": 12, "WORKSPACE": 13,
        "FILE_STEPS": 14, "WATCH_BEGIN": 15, "WATCH_END": 16, "FILE_RESTORED": 17,
        "FILE_CONFLICT": 18}


def test_records_pack_back_to_back() -> None:
    salt = segment_salt(STORE_A, 500)
    buf, lsn, expect = b"", 500, []
    for n in (0, 3, 100, 0, 7):
        frame = encode_record(salt, RecordType.COMMIT, lsn, lsn, _payload(n))
        expect.append((lsn, n))
        buf += frame
        lsn += len(frame)
    off, lsn, seen = 0, 500, []
    while off < len(buf):
        h, reason = check_record(buf, off, salt, lsn, len(buf))
        assert reason is None
        seen.append((h.lsn, h.length))
        off += RECORD_HEADER_SIZE + h.length
        lsn += RECORD_HEADER_SIZE + h.length
    assert seen == expect and off == len(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=3000), rtype=st.sampled_from(sorted(framing.VALID_TYPES)),
       lsn=st.integers(0, 2**64 - 1), synced=st.integers(0, 2**64 - 1),
       start=st.integers(0, 2**64 - 1), pad=st.integers(0, 50))
def test_record_round_trip_property(payload, rtype, lsn, synced, start, pad) -> None:
    salt = segment_salt(STORE_A, start)
    frame = encode_record(salt, rtype, lsn, synced, payload)
    buf = b"\x00" * pad + frame
    h, reason = check_record(buf, pad, salt, lsn, len(buf))
    assert reason is None
    assert (h.type, h.lsn, h.synced_lsn) == (rtype, lsn, synced)
    assert buf[pad + RECORD_HEADER_SIZE:] == payload


def test_encode_refuses_payload_over_bound() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_record(0, RecordType.COMMIT, 0, 0, bytes(MAX_PAYLOAD + 1))


# ---- what must not validate ---------------------------------------------------------------

def test_wrong_salt_other_store_fails() -> None:
    frame = encode_record(segment_salt(STORE_A, 64), RecordType.COMMIT, 64, 0, b"\x80")
    h, reason = check_record(frame, 0, segment_salt(STORE_B, 64), 64, len(frame))
    assert reason == "record checksum mismatch"


def test_wrong_salt_other_segment_start_fails() -> None:
    # the same bytes copied into a segment that starts elsewhere (a recycled or renamed file)
    frame = encode_record(segment_salt(STORE_A, 0), RecordType.COMMIT, 500, 0, b"\x80")
    h, reason = check_record(frame, 0, segment_salt(STORE_A, 400), 500, len(frame))
    assert reason == "record checksum mismatch"


def test_wrong_position_lsn_fails() -> None:
    salt = segment_salt(STORE_A, 0)
    frame = encode_record(salt, RecordType.COMMIT, 100, 0, b"\x80")
    h, reason = check_record(frame, 0, salt, 101, len(frame))
    assert reason == "record LSN 100 does not match its position 101"


def test_every_single_bit_flip_is_detected() -> None:
    salt = segment_salt(STORE_A, 64)
    frame = encode_record(salt, RecordType.COMMIT, 64, 32, b"\x82\xa2tx\x05\xa1w\x90")
    for i in range(len(frame)):
        for bit in range(8):
            bad = bytearray(frame)
            bad[i] ^= 1 << bit
            h, reason = check_record(bytes(bad), 0, salt, 64, len(bad))
            assert reason is not None, f"flip of bit {bit} of byte {i} went unnoticed"


@pytest.mark.parametrize("rtype", [0, 19, 99, 255])
def test_unknown_type_with_valid_crc_is_a_newer_writers(rtype: int) -> None:
    """A whole record (CRC valid) of a type this code does not know: a newer walstore
    wrote it; refused as such, never a reason to cut it as a torn tail."""
    salt = segment_salt(STORE_A, 0)
    frame = encode_record(salt, rtype, 0, 0, b"\x80")
    with pytest.raises(NotAStore, match=f"the log holds a record of type {rtype} "
                                        f"\\(LSN 0, file seg, offset 0\\) written by a newer "
                                        f"walstore.*upgrade walstore"):
        check_record(frame, 0, salt, 0, len(frame), "seg")


def test_nonzero_flags_with_valid_crc_are_a_newer_writers() -> None:
    salt = segment_salt(STORE_A, 0)
    b = bytearray(encode_record(salt, RecordType.COMMIT, 0, 0, b"\x80"))
    b[9] = 0x04
    struct.pack_into("<I", b, 0, _crc32c_ref(bytes(b[4:]), salt))
    with pytest.raises(NotAStore, match="a record of type 1 with flags 4 \\(LSN 0\\) "
                                        "written by a newer walstore"):
        check_record(bytes(b), 0, salt, 0, len(b))
    b[0] ^= 1  # the same bytes with a bad CRC: damage, judged as such (no exception)
    assert check_record(bytes(b), 0, salt, 0, len(b))[1] == "record checksum mismatch"


def test_bad_magic_with_valid_crc_fails() -> None:
    salt = segment_salt(STORE_A, 0)
    b = bytearray(encode_record(salt, RecordType.COMMIT, 0, 0, b"\x80"))
    b[10:12] = b"XX"
    struct.pack_into("<I", b, 0, _crc32c_ref(bytes(b[4:]), salt))
    assert check_record(bytes(b), 0, salt, 0, len(b))[1] == "bad record magic"


def test_zero_filled_bytes_never_validate() -> None:
    # a zero header has payload CRC 0 only by accident of salt; the magic rules it out anyway
    for salt in (0, segment_salt(STORE_A, 0)):
        h, reason = check_record(bytes(4096), 0, salt, 0, 4096)
        assert reason == "bad record magic"


def test_every_truncation_is_reported_as_truncation() -> None:
    salt = segment_salt(STORE_A, 0)
    payload = b"\x81\xa1k\xa5value"
    frame = encode_record(salt, RecordType.COMMIT, 0, 0, payload)
    for cut in range(len(frame)):
        # the bytes are all there in the buffer, but ``limit`` says they are not: honour it
        h, reason = check_record(frame, 0, salt, 0, cut)
        if cut < RECORD_HEADER_SIZE:
            assert h is None and reason == "truncated record header", cut
        else:
            assert reason == (f"truncated record payload ({cut - RECORD_HEADER_SIZE} of "
                              f"{len(payload)} bytes)"), cut


# ---- bounded allocation ---------------------------------------------------------------------

def _header_with_length(salt: int, length: int) -> bytes:
    b = bytearray(encode_record(salt, RecordType.COMMIT, 0, 0, b""))
    struct.pack_into("<I", b, 4, length)
    struct.pack_into("<I", b, 0, _crc32c_ref(bytes(b[4:]), salt))
    return bytes(b)


def test_length_0xffffffff_is_refused_without_allocating() -> None:
    salt = segment_salt(STORE_A, 0)
    buf = _header_with_length(salt, 0xFFFFFFFF) + b"\x01" * 1000
    tracemalloc.start()
    try:
        h, reason = check_record(buf, 0, salt, 0, len(buf))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.length == 0xFFFFFFFF
    assert reason == f"record length 4294967295 exceeds the {MAX_PAYLOAD} byte bound"
    assert peak < 64 * 1024


def test_length_at_bound_but_beyond_data_is_truncation_without_allocating() -> None:
    salt = segment_salt(STORE_A, 0)
    buf = _header_with_length(salt, MAX_PAYLOAD) + b"\x01" * 1000
    tracemalloc.start()
    try:
        h, reason = check_record(buf, 0, salt, 0, len(buf))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason == f"truncated record payload (1000 of {MAX_PAYLOAD} bytes)"
    assert peak < 64 * 1024


def test_segment_reader_bound_error_on_huge_length(tmp_path) -> None:
    """The reader reports the bound error for a 0xFFFFFFFF length and allocates nothing big."""
    salt = segment_salt(STORE_A, 0)
    good = encode_record(salt, RecordType.COMMIT, 0, 0, b"\x81\xa2tx\x01")
    bad = bytearray(_header_with_length(salt, 0xFFFFFFFF))
    struct.pack_into("<Q", bad, 12, len(good))  # its own LSN, re-CRC'd: only the length is bad
    struct.pack_into("<I", bad, 0, _crc32c_ref(bytes(bad[4:]), salt))
    path = tmp_path / segment_name(0)
    path.write_bytes(encode_segment_header(STORE_A, 0, 0) + good + bytes(bad) + b"\x07" * 4000)
    reader = SegmentReader(str(path), STORE_A, 0)
    tracemalloc.start()
    try:
        recs = list(reader.records())
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.lsn for r in recs] == [0]
    assert reader.end.kind == "torn"
    assert reader.end.offset == SEGMENT_HEADER_SIZE + len(good)
    assert reader.end.lsn == len(good)
    assert reader.end.reason == f"record length 4294967295 exceeds the {MAX_PAYLOAD} byte bound"
    assert peak < 256 * 1024


# ---- segment identity checks in the reader ------------------------------------------------

def _segment(tmp_path, store_id: bytes, start: int, name_start: int | None = None):
    salt = segment_salt(store_id, start)
    body = encode_segment_header(store_id, start, 0)
    body += encode_record(salt, RecordType.COMMIT, start, start, b"\x81\xa2tx\x01")
    path = tmp_path / segment_name(start if name_start is None else name_start)
    path.write_bytes(body + bytes(1024))
    return str(path)


def test_reader_accepts_own_segment(tmp_path) -> None:
    reader = SegmentReader(_segment(tmp_path, STORE_A, 300), STORE_A, 300)
    assert reader.header_error is None
    recs = list(reader.records())
    assert [(r.lsn, r.type, r.offset) for r in recs] == [(300, RecordType.COMMIT, 64)]
    assert reader.end.kind == "clean" and reader.end.offset == 64 + 28 + 5


def test_reader_refuses_segment_of_another_store(tmp_path) -> None:
    reader = SegmentReader(_segment(tmp_path, STORE_B, 300), STORE_A, 300)
    assert reader.header_error == "segment belongs to another store (store id differs)"
    with pytest.raises(ValueError, match="another store"):
        list(reader.records())


def test_reader_refuses_segment_under_another_name(tmp_path) -> None:
    reader = SegmentReader(_segment(tmp_path, STORE_A, 300, name_start=900), STORE_A, 900)
    assert reader.header_error == ("segment header says start LSN 300 but the file is named "
                                   "for 900")
    with pytest.raises(ValueError):
        list(reader.records())


def test_forged_header_does_not_make_foreign_records_valid(tmp_path) -> None:
    """A header rewritten to claim our id and position does not validate the old records."""
    salt_b = segment_salt(STORE_B, 0)
    body = encode_segment_header(STORE_A, 0, 0)
    body += encode_record(salt_b, RecordType.COMMIT, 0, 0, b"\x81\xa2tx\x01")
    path = tmp_path / segment_name(0)
    path.write_bytes(body + bytes(512))
    reader = SegmentReader(str(path), STORE_A, 0)
    assert reader.header_error is None
    assert list(reader.records()) == []
    assert reader.end.reason == "record checksum mismatch"


def test_crc32c_refuses_what_has_no_buffer() -> None:
    """Only bytes-like input: an int or a list is a caller's bug, refused (a wrapper that
    called ``bytes(x)`` took 5 for five zero bytes; review of stop 41)."""
    for bad in (5, [1, 2], "text", None):
        with pytest.raises(TypeError):
            crc32c(bad)
