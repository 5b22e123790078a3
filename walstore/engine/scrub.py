"""A purge's erasure in ``quarantine/``: which quarantined copies may hold erased keys.

This module owns that decision (``Engine.erase_old_bytes`` calls :func:`scrub_quarantine`
and reports what went).  Recovery and ``walstore recover --rebuild-state`` keep evidence
there, never deleting it themselves; a purge must not leave its keys' bytes in it:

* ``*.bin`` (a torn tail or a corrupt range cut from the WAL, a dropped or salvaged
  segment; its note ``*.bin.json`` goes with it) is read whole, in bounded memory (chunks;
  one record at a time, at most MAX_PAYLOAD).  It is removed when it holds an erased key's
  name or the purged prefix as raw bytes, or a logged write whose key is in a purged
  range, or bytes that cannot be attributed to keys: a write whose stored key is damaged
  (a str key that is not UTF-8, an unknown type tag), a record body that is not a map of
  writes, non-zero bytes where no record frame parses, or a key cut off at the end that
  could begin one in the range.  What it cannot see: damage that turned a key under the
  prefix into another valid key outside it (the record's checksum fails, but every byte
  of it may be; the bytes of its value then stay).
* ``*.bin.tmp`` (the temp file of such a copy, left by a recovery killed before it named
  it: the next recovery copies the same bytes again under another name, and the temp
  stays for good) is judged as a ``*.bin``: a purge kept the erased values in it.
* ``db.damaged.*/`` (the LMDB that ``--rebuild-state`` moved aside) is removed by every
  purge: a damaged database cannot be read with certainty, and even an intact one keeps
  values in freed and overflow pages with no key name beside them.  The store was rebuilt
  from the WAL without it; it was evidence only.
* ``files/`` (reversible files' saved versions) is file content, not keys: never touched.
"""
from __future__ import annotations

import os
import shutil

import msgpack

from .. import fileio
from ..log.format import (MAX_PAYLOAD, RECORD_HEADER_SIZE, RECORD_MAGIC, SEGMENT_HEADER_SIZE,
                          SEGMENT_MAGIC)

CHUNK = 8 << 20        # raw bytes read at a time
DAMAGED_DB = "db.damaged."
_TAGS = (b"s", b"b")   # a stored key's type tag (walstore.codec): str, bytes


class _Doomed(Exception):
    """The file holds (or may hold) bytes of an erased key."""


def scrub_quarantine(qdir: str, needles: list[bytes], ranges: list) -> list[str]:
    """Remove from ``qdir`` what may hold erased keys: ``needles`` (erased stored keys and
    purged prefixes, as raw bytes), ``ranges`` (the purged stored-key ranges, [lo, hi),
    hi None: unbounded).  Returns the names removed (a ``.bin``'s note not counted)."""
    if not (needles or ranges) or not os.path.isdir(qdir):
        return []
    needles = _minimal(needles)
    removed = []
    for name in sorted(os.listdir(qdir)):
        path = os.path.join(qdir, name)
        if name.startswith(DAMAGED_DB) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(name)
        elif (name.endswith(".bin") or name.endswith(".bin.tmp")) and os.path.isfile(
                path) and not os.path.islink(path):
            if _holds_raw(path, needles) or _holds_key(path, ranges):
                for victim in ((path, path + ".json") if name.endswith(".bin")
                               else (path,)):
                    if os.path.exists(victim):
                        fileio.unlink(victim)
                removed.append(name)
    if removed:
        fileio.fsync_dir(qdir)
    return removed


def _minimal(needles: list[bytes]) -> list[bytes]:
    """Needles none of which begins with another (an erased key begins with its prefix:
    searching for the prefix finds it too)."""
    out: list[bytes] = []
    for n in sorted({bytes(n) for n in needles if n}):
        if not out or not n.startswith(out[-1]):
            out.append(n)
    return out


def _holds_raw(path: str, needles: list[bytes]) -> bool:
    """Any needle anywhere in the file (read in chunks that overlap by a needle's length)."""
    if not needles:
        return False
    keep = max(len(n) for n in needles) - 1
    tail = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return False
            data = tail + chunk
            if any(n in data for n in needles):
                return True
            tail = data[-keep:] if keep else b""


def _holds_key(path: str, ranges: list) -> bool:
    """Walk the file's records (from a segment header, or from a record: a range cut from
    a segment); True when one writes a key in ``ranges`` or cannot be attributed."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SEGMENT_MAGIC))
            f.seek(SEGMENT_HEADER_SIZE if head == SEGMENT_MAGIC else 0)
            while True:
                header = f.read(RECORD_HEADER_SIZE)
                if len(header) < RECORD_HEADER_SIZE:  # (a header holds no key)
                    return False
                length = int.from_bytes(header[4:8], "little")
                if header[10:12] != RECORD_MAGIC or length > MAX_PAYLOAD:
                    if not any(header) and _zeros_to_end(f):
                        return False  # (the zeroed rest of a segment)
                    raise _Doomed  # no record frame: bytes no key can be told for
                _check_payload(f.read(length), length, ranges)
    except _Doomed:
        return True


def _zeros_to_end(f) -> bool:
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False


def _check_payload(payload: bytes, length: int, ranges: list) -> None:
    """A record's payload (cut short when the file ends first): a msgpack map whose ``w``
    entry lists ``[stored key, value]`` writes.  Raises _Doomed for a key in ``ranges``
    or bytes that cannot be attributed."""
    if not payload:
        return
    u = msgpack.Unpacker(raw=True, max_buffer_size=max(length, len(payload), 1))
    u.feed(payload)
    try:
        for _ in range(u.read_map_header()):
            name = u.unpack()
            if name != b"w":
                u.skip()
                continue
            for _ in range(u.read_array_header()):
                n = u.read_array_header()
                if n < 1:
                    raise _Doomed
                at = u.tell()
                try:
                    key = u.unpack()
                except msgpack.OutOfData:
                    _check_cut_key(payload[at:], ranges)
                    raise
                _check_key(key, ranges)
                for _ in range(n - 1):
                    u.skip()
    except msgpack.OutOfData:
        if len(payload) == length:
            raise _Doomed from None  # a whole payload that is not a whole map
        return  # the file ends inside it: every key present was read (and checked)
    except _Doomed:
        raise
    except Exception:  # (not a map, not an array, a bad byte: msgpack's own errors)
        raise _Doomed from None
    if any(payload[u.tell():]):
        raise _Doomed  # bytes after the map: a damaged length swallowed other records


def _check_key(key, ranges: list) -> None:
    if not isinstance(key, bytes) or len(key) < 2 or key[:1] not in _TAGS:
        raise _Doomed
    if key[:1] == b"s":
        try:
            key[1:].decode("utf-8")
        except UnicodeDecodeError:
            raise _Doomed from None
    for lo, hi in ranges:
        if key >= lo and (hi is None or key < hi):
            raise _Doomed


def _check_cut_key(raw: bytes, ranges: list) -> None:
    """A stored key the end of the file cut: its bytes present could begin one in the
    range (or be one)."""
    size = {0xc4: 1, 0xc5: 2, 0xc6: 4}.get(raw[0] if raw else -1)
    if size is None:
        if raw:
            raise _Doomed  # (not a bin: nothing a stored key looks like)
        return
    part = bytes(raw[1 + size:])
    if len(part) < 2:
        return  # (at most the type tag: no byte of a key)
    for lo, _hi in ranges:
        if part.startswith(lo) or bytes(lo).startswith(part):
            raise _Doomed
