"""Keys and values: validation at the API boundary and their byte encodings.

Keys are ``str`` or ``bytes``.  They are stored with a one-byte type tag (``s`` for str as
UTF-8, ``b`` for bytes) so a key comes back as the type it went in, and ``"a"`` and
``b"a"`` are different keys, as in a Python dict.  Within one type, scan order is the
byte order of the encoding (for str: code point order).

Values are anything msgpack encodes (None, bool, int, float, str, bytes, list, dict).
They are packed at ``put`` time, so a bad value fails there and never at commit.  No
pickle, no ext types: unpacking never runs code.  Unpacking bytes from disk is bounded by
the size of those bytes (msgpack's limits default to the buffer length).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Union

import msgpack

from .errors import CorruptionError, type_and_message

Key = Union[str, bytes]

# LMDB's default max key size is 511 bytes; the history index stores a key as
# u16 length + type tag + key + u64 LSN, so a key may have at most 511 - 11 bytes.
MAX_KEY_BYTES = 500
MAX_VALUE_BYTES = 16 * 1024 * 1024
# transaction meta, packed: it is logged in the COMMIT record beside the last chunk of the
# writes (up to one 16 MiB value), and a record holds at most 32 MiB (log.format)
MAX_META_BYTES = 1024 * 1024
# the actions of one transaction (the args and results of every action begun in it, packed,
# with their names): its COMMIT record carries their rows beside meta (the writes go into
# chunks when they would not fit), so a commit of parts each within its limit fits 32 MiB
MAX_ACTION_BYTES = 24 * 1024 * 1024
# the writes of one transaction, counted as ``log.records.chunk_writes`` counts them (key,
# value, WRITE_OVERHEAD bytes each), refused at the put that would pass it: recovery takes
# back at most 512 MiB of one transaction's WRITES chunks (log.records'
# MAX_OPEN_TXN_BYTES, the bound that keeps a damaged log from exhausting memory), and a
# bigger commit was acknowledged, then could not be recovered after a crash
MAX_TXN_WRITE_BYTES = 480 * 1024 * 1024
WRITE_OVERHEAD = 16
ACTION_ROW_BYTES = 256  # what an action's row adds besides those (ids, key, state, ts...)

_STR, _BYTES = b"s", b"b"
# (the two tags are on-disk format: Store.get and Transaction.get write ``_BYTES + key`` out)
_local = threading.local()
# a Packer keeps its buffer's capacity after packing (about twice the largest output it
# ever made) for its thread's life: past this many bytes out, the thread's Packer is
# dropped, so a big value's memory goes with it (a pool of idle threads that each
# committed a 16 MiB value once held 32 MiB apiece)
RELEASE_PACKER_BYTES = 1024 * 1024


def _packer() -> msgpack.Packer:
    """This thread's Packer (msgpack.packb builds a new one per call: 4x slower).  A Packer
    resets its buffer when packing raises, so one bad value cannot spoil the next — except
    when the packing is done and making the output's bytes fails (MemoryError): msgpack
    1.2.4 then keeps the whole output in its buffer, and the next ``pack`` returned it in
    front of its own (an acknowledged commit whose every value read back "does not
    decode").  So every packing error drops the thread's Packer (``_release_packer``)."""
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True, datetime=False)
        return _local.packer


def _release_packer() -> None:
    """Drop this thread's Packer (it just packed more than ``RELEASE_PACKER_BYTES``)."""
    _local.__dict__.pop("packer", None)


_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})
_BIN8 = tuple(b"\xc4" + bytes((n,)) for n in range(256))  # msgpack's bin 8 heads by length


def encode_key(key: Any) -> bytes:
    """Validate a user key and return its stored form; TypeError/ValueError name the problem."""
    t = type(key)  # the common keys first (every point read comes here): plain bytes, ASCII
    if t is bytes and 0 < len(key) <= MAX_KEY_BYTES:
        return _BYTES + key
    if t is str and 0 < len(key) <= MAX_KEY_BYTES and key.isascii():
        return _STR + key.encode()
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"key {key!r} is not valid UTF-8 text: {e.reason}") from None
        tag = _STR
    elif isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        tag = _BYTES
    else:
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}: {key!r}")
    if not raw:
        raise ValueError("key must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key is {len(raw)} bytes long; the limit is {MAX_KEY_BYTES} bytes "
                         f"(LMDB's maximum key size less walstore's history index overhead)")
    return tag + raw


def decode_key(stored: bytes) -> Key:
    tag, raw = stored[:1], stored[1:]
    if tag == _STR:
        try:  # (free when it decodes; a damaged row escaped as a bare UnicodeDecodeError)
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptionError(f"stored key {stored[:24]!r} is tagged str and is not "
                                  f"UTF-8 ({e.reason})") from None
    if tag == _BYTES:
        return raw
    raise CorruptionError(f"stored key has unknown type tag {tag!r}")


def check_stored(k: Any, packed: Any) -> None:
    """TypeError/ValueError unless ``k`` is a key's stored form (``encode_key``'s: its type
    tag and 1 to MAX_KEY_BYTES bytes) and ``packed`` a packed value (bytes, at most
    MAX_VALUE_BYTES) or None: what ``Transaction.write_stored`` takes.  (It took
    anything: a key of 600 bytes, one with no tag, a ``str`` key or value — the commit
    was acknowledged, the applier failed, and every later open refused the log record
    holding it: one call bricked the store, review of issue 10.)  What the log's own
    parse refuses (``records.parse_writes``), no more: a str-tagged key that is not
    UTF-8, or a value that is no msgpack, fails only that key's reads (CorruptionError),
    and a purge of a range holding such a damaged key still erases it."""
    if type(k) is not bytes or not (packed is None or type(packed) is bytes):
        raise TypeError(f"a stored pair is (bytes, bytes or None), not "
                        f"({type(k).__name__}, {type(packed).__name__})")
    tag = k[:1]
    if not 1 < len(k) <= MAX_KEY_BYTES + 1 or (tag != _BYTES and tag != _STR):
        raise ValueError(f"{k[:24]!r} is no stored key (a type tag {_STR!r} or {_BYTES!r} "
                         f"and 1 to {MAX_KEY_BYTES} bytes)")
    if packed is not None and len(packed) > MAX_VALUE_BYTES:
        raise ValueError(f"the value for stored key {k[:24]!r} is {len(packed)} bytes "
                         f"packed; the limit is {MAX_VALUE_BYTES}")


def utf8(text: str, what: str) -> bytes:
    """``text`` in UTF-8; ValueError naming ``what`` when it cannot be (a lone surrogate:
    msgpack and LMDB would raise a bare codec error naming nothing)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {text!r} is not valid UTF-8 text: {e.reason}") from None


def encode_prefix(prefix: Any) -> bytes:
    """Stored form of a scan bound or prefix (may be empty, unlike a key)."""
    if isinstance(prefix, str):
        return _STR + utf8(prefix, "scan bound")
    if isinstance(prefix, (bytes, bytearray, memoryview)):
        return _BYTES + bytes(prefix)
    raise TypeError(f"scan bound must be str or bytes, not {type(prefix).__name__}")


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``
    (None: there is none, the range is open-ended)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


def pack_value(value: Any, key: Any = None) -> bytes:
    """msgpack a user value, raising TypeError/ValueError that names the key and the problem."""
    try:
        try:
            packer = _local.packer
        except AttributeError:
            packer = _packer()
        packed = packer.pack(value)
    except TypeError as e:
        raise TypeError(f"value for key {key!r} cannot be stored: {e} "
                        f"(allowed: None, bool, int, float, str, bytes, list, dict)") from None
    except BufferError as e:  # (msgpack takes a memoryview's buffer whole, or not at all)
        raise TypeError(f"value for key {key!r} cannot be stored: {_buffer_problem(e)}") \
            from None
    except (OverflowError, ValueError) as e:
        if "recursion limit" in str(e):  # (msgpack's: lists and dicts past 1,024 levels)
            raise _too_deep(f"value for key {key!r}") from None
        raise ValueError(f"value for key {key!r} cannot be stored: {e}") from None
    except BaseException:  # (MemoryError: the Packer may hold its output, see _packer)
        _release_packer()
        raise
    if len(packed) > RELEASE_PACKER_BYTES:
        _release_packer()
        if len(packed) > MAX_VALUE_BYTES:
            raise ValueError(f"value for key {key!r} is {len(packed)} bytes packed; "
                             f"the limit is {MAX_VALUE_BYTES}")
    if type(value) in _SCALARS:
        return packed  # no map inside: nothing that could fail to read back
    _read_back(packed, f"value for key {key!r}")  # (raises TypeError)
    return packed


class _Extension(TypeError):
    pass


def _too_deep(what: str) -> ValueError:
    """A value nested past what msgpack reads back: its packer takes one level more than its
    unpacker (1,025 levels of lists packed, then failed to read back with a bare
    ``StackError``, refused as "would not read back (); dict keys must be ..." — audit53)."""
    return ValueError(f"{what} cannot be stored: it nests too deeply (msgpack stores about "
                      f"1,000 levels of lists and dicts)")


def _no_extension(code: int, data: bytes) -> Any:
    raise _Extension(f"a msgpack extension type (code {code})")


# how a msgpack Timestamp (extension -1) begins: fixext 4, fixext 8, ext 8 of 12 bytes
_TIMESTAMP_HEADS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")


def _read_back(packed: bytes, what: str) -> Any:
    """What ``packed`` (a user value: not a bare scalar) reads back as; TypeError naming
    ``what`` when it would not read back (a dict with a tuple key packs, yet its record
    would then fail every reader, recovery included), or when it holds a msgpack
    extension type (``msgpack.ExtType``, ``msgpack.Timestamp``): not among the values a
    store takes (None, bool, int, float, str, bytes, list, dict), packed by msgpack as
    they are, and then read back as types no reader of the store (its CLI's JSON
    included) renders (probe-api42)."""
    try:
        back = msgpack.unpackb(packed, raw=False, strict_map_key=False,
                               ext_hook=_no_extension)
    except _Extension as e:
        raise TypeError(f"{what} cannot be stored: it holds {e} (allowed: None, bool, "
                        f"int, float, str, bytes, list, dict)") from None
    except msgpack.StackError:  # (a ValueError: nested past the unpacker's limit)
        raise _too_deep(what) from None
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} cannot be stored: it would not read back ({e}); dict "
                        f"keys must be str, bytes, int, float, bool or None") from None
    if any(head in packed for head in _TIMESTAMP_HEADS) and _holds_timestamp(back):
        raise TypeError(f"{what} cannot be stored: it holds a msgpack.Timestamp (allowed: "
                        f"None, bool, int, float, str, bytes, list, dict; store a time as "
                        f"a number or a string)")
    return back


def _holds_timestamp(obj: Any) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is list:
            stack.extend(x)
        elif t is dict:
            stack.extend(x)
            stack.extend(x.values())
        elif t is msgpack.Timestamp:
            return True
    return False


def pack_items(pairs: Iterable, limit: int | None = None,
               over: Callable[[int], Any] | None = None) -> dict[bytes, bytes]:
    """``{encode_key(k): pack_value(v, k)}`` of many (key, value) pairs (``tx.update``),
    with the common keys and scalar values done in line; anything else, and every
    error, goes through ``encode_key``/``pack_value`` (the same checks, the same
    messages).

    ``limit``: once the pairs packed so far pass this many bytes (as a write set counts
    them: key, value, WRITE_OVERHEAD each, a repeated key once), ``over(size)`` is called
    (it raises) before another pair is read: a generator far past the bound is not
    packed whole first (an update() of a multi-GiB stream held it all in memory, then
    was refused by the write-set bound — probe-audit54)."""
    try:
        packb = _local.packer.pack
    except AttributeError:
        packb = _packer().pack
    out: dict[bytes, bytes] = {}
    size = 0
    exact = False  # (an upper bound until it first passes ``limit``; then counted exactly)
    if limit is None:
        limit = 1 << 62
    overhead = WRITE_OVERHEAD
    for pair in pairs:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise TypeError(f"update() takes a mapping or (key, value) pairs, not "
                            f"{pair!r}") from None
        if (type(value) is bytes and len(value) < 256 and type(key) is bytes
                and 0 < len(key) <= MAX_KEY_BYTES):  # (a bulk load's pairs, in short)
            k = _BYTES + key
            packed = _BIN8[len(value)] + value  # (bin 8: what packb gives, no call)
        else:
            t = type(key)
            if t is bytes and 0 < len(key) <= MAX_KEY_BYTES:
                k = _BYTES + key
            elif t is str and 0 < len(key) <= MAX_KEY_BYTES and key.isascii():
                k = _STR + key.encode()
            else:
                k = encode_key(key)
            if type(value) in _SCALARS:  # (no map inside: nothing that could fail to
                try:                        # read back)
                    packed = packb(value)
                except BaseException:  # (a new Packer: a MemoryError may leave the old
                    _release_packer()  # one's output in its buffer, see _packer)
                    packb = _packer().pack
                    packed = pack_value(value, key)  # (raises, naming the key and the
                    # problem)
                if len(packed) > RELEASE_PACKER_BYTES:
                    _release_packer()
                    packb = _packer().pack
                    if len(packed) > MAX_VALUE_BYTES:
                        pack_value(value, key)  # (raises)
            else:
                packed = pack_value(value, key)
        if exact:
            old = out.get(k)
            if old is not None:  # (a key repeated: its earlier value goes)
                size -= len(k) + len(old) + WRITE_OVERHEAD
        out[k] = packed
        size += len(k) + len(packed) + overhead  # (a repeated key: an upper bound)
        if size > limit:
            if not exact:
                exact = True  # (rare: an update near the bound; each pair looked up now)
                size = sum(len(x) + len(y) for x, y in out.items()) \
                    + WRITE_OVERHEAD * len(out)
            if size > limit and over is not None:
                over(size)
    return out


# msgpack's ``unpackb`` with its defaults (msgpack >= 1.0: ``raw=False``; map keys only
# str or bytes): the first try of every value read.  Keyword arguments cost ~56 ns a call
# in its argument parsing (218 against 162 ns for a 100 B value), a twentieth of a point
# read; a value with other map keys (ints) raises ValueError there and is decoded again by
# ``unpack_value``'s lenient call, which gives the same value (strictness only refuses).
unpack_common = msgpack.unpackb

# What msgpack raises on bytes that are no valid document: its own errors (ValueError
# subclasses, and UnpackException), TypeError (a map key it cannot hash), OverflowError.
# Only these mean "damaged".  Every decode caught Exception before: CPython runs a
# signal's handler at its first check after a C call returns, still inside the call's
# ``try``, so an exception a program's handler raised while a decode ran (a SIGALRM
# timeout, say) came out as ValueError "undecodable msgpack" or CorruptionError — the
# program's own exception lost, a sound record or row called damaged, a read of a good
# value retried and the exception swallowed (audit 64).
DECODE_ERRORS = (ValueError, TypeError, OverflowError, msgpack.exceptions.UnpackException)


def unpack_value(packed: bytes) -> Any:
    """A stored value (from LMDB or the log); CorruptionError when it does not decode."""
    try:
        return unpack_common(packed)
    except DECODE_ERRORS:  # (no cost on the common path: a try is free in 3.11)
        pass
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=False)
    except DECODE_ERRORS as e:
        raise CorruptionError(f"a stored value does not decode: "
                              f"{type_and_message(e)}") from e


def pack(obj: Any) -> bytes:
    """msgpack an internal structure (record payloads, metadata)."""
    try:
        packer = _local.packer  # (``_packer`` written out: every commit packs twice)
    except AttributeError:
        packer = _packer()
    try:
        packed = packer.pack(obj)
    except BaseException:  # (MemoryError: the Packer may hold its output, see _packer)
        _release_packer()
        raise
    if len(packed) > RELEASE_PACKER_BYTES:
        _release_packer()
    return packed


def pack_two(a: Any, b: Any) -> tuple[bytes, bytes]:
    """``(pack(a), pack(b))`` with one look-up of this thread's Packer (a commit packs its
    body and its writes: every commit comes here)."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _packer()
    try:
        packed_a = packer.pack(a)
        if len(packed_a) > RELEASE_PACKER_BYTES:  # (as ``pack``: a new one packs ``b``)
            _release_packer()
            return packed_a, pack(b)
        packed_b = packer.pack(b)
    except BaseException:  # (MemoryError: the Packer may hold its output, see _packer)
        _release_packer()
        raise
    if len(packed_b) > RELEASE_PACKER_BYTES:
        _release_packer()
    return packed_a, packed_b


def unpack(data: bytes) -> Any:
    """Unpack an internal structure read from disk; any damage raises ValueError.  (LMDB
    rows decode through ``walstore.engine.tables.unpack_row``: a CorruptionError naming
    the table and the key.)"""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except DECODE_ERRORS as e:  # (the types msgpack raises on damaged input)
        raise ValueError(f"undecodable msgpack: {type_and_message(e)}") from None


def _buffer_problem(e: BufferError) -> str:
    return f"{e} (a memoryview must be C-contiguous: pass bytes(view), a copy)"


def storable(what: str, value: Any, limit: int | None = None) -> Any:
    """``value`` as it will read back from the log (TypeError naming ``what`` when msgpack
    cannot store it, or when what it stores would not read back: a dict with a tuple
    key is packed, yet its record would then fail every reader, recovery included;
    ValueError when it packs to more than ``limit`` bytes)."""
    try:
        packed = pack(value)
    except (OverflowError, ValueError) as e:
        if "recursion limit" in str(e):
            raise _too_deep(what) from None
        raise TypeError(f"{what} cannot be stored: {e}") from None
    except TypeError as e:
        raise TypeError(f"{what} cannot be stored: {e}") from None
    except BufferError as e:
        raise TypeError(f"{what} cannot be stored: {_buffer_problem(e)}") from None
    if limit is not None and len(packed) > limit:
        raise ValueError(f"{what} is {len(packed):,} bytes packed; the limit is {limit:,} "
                         f"bytes; nothing changed")
    return _read_back(packed, what)


def check_meta(meta: Any) -> Any:
    """Validate transaction metadata (any msgpack-able value) at transaction start; the
    copy it returns is what the commit logs (a change the caller makes to its own object
    later cannot make the commit record unreadable).  Too large a meta is refused here,
    at the call, not by the log at commit."""
    if meta is None:
        return None
    return storable("transaction meta", meta, MAX_META_BYTES)
