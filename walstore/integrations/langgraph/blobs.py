"""The LangGraph integration's blob codec: how values become stored bytes, compactly.

This module owns the stored form of every serialized value of the saver:

- **typed values**: ``[type, bytes]`` from the serde (``msgpack``, ``null``, ``bytes`` ...),
  where ``bytes`` may be ``[zlib bytes, length]`` when compression saves a tenth (values of
  :data:`COMPRESS_MIN` bytes or more).  A ``"pickle"`` value is refused both ways;
- **channel values once per channel version**: a checkpoint references versions, so a step
  stores only the channels it changed; an empty channel version is not stored at all;
- **list deltas**: a list channel that grew by appending (a ``messages`` list) is stored
  as ``{"b": base version, "d": depth, "n": item count, "a": appended items}``, whose
  base is the list last stored for that channel; a full copy every ``delta_depth``
  versions bounds a read.

The codec decides a delta outside the transaction from a small per-process cache of the
last list stored per channel (``plan``) and confirms the base inside it (``resolve``).
That the new list extends the base is checked byte for byte against the value cache's
copy of the base (a memcmp), or against the base's blake2b digest when the cache does not
keep it (off, too large, or dropped for room: the digest is taken as it is dropped), so
hashing a long list twice per put is the exception, not the rule.

Reading a delta walks its chain, one point read per link (up to ``delta_depth``).  A
:class:`ValueCache` (bounded in bytes) keeps, per channel of a namespace, the rebuilt
bytes of the newest version this process wrote or read, so the next invoke of a thread
reads its head blob and nothing else.  Its safety rests on one invariant: **a blob key
never holds two different values** — its version is one this saver made (a counter and
48 random bits, :data:`UNIQUE_VERSION`), so a key is written once and may later only be
deleted (rewind, prune, purge) or put back as it was (revert).  Versions of any other form
(a caller's own ints) are never cached.  The head's stored form is read every time and
must equal the cached one; an erased thread's entries are dropped (``forget``).
"""
from __future__ import annotations

import hashlib
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from .keys import Namespace
from .serde import StateSerializer

COMPRESS_MIN = 1024      # compress serialized values at least this long (zlib): a delta of a
                         # message or two stays raw (decompressing a chain of small pieces
                         # cost more per read than it saved on disk)
MAX_INFLATED = 1 << 30   # refuse a compressed value claiming more (a damaged length)
DEFAULT_DELTA_DEPTH = 128
_DELTA_CACHE_SIZE = 1024
DEFAULT_VALUE_CACHE_BYTES = 32 << 20
# the versions WalstoreSaver.get_next_version makes: unique (a fork draws new random bits)
UNIQUE_VERSION = re.compile(r"[0-9]{10}\.[0-9a-f]{12}")

Getter = Callable[[bytes], Any]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 0x10000:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def _array_info(data: bytes) -> tuple[int, int]:
    """(item count, header length) of a msgpack array; (-1, 0) for anything else."""
    b0 = data[0] if data else 0
    if 0x90 <= b0 <= 0x9F:
        return b0 & 0x0F, 1
    if b0 == 0xDC and len(data) >= 3:
        return struct.unpack_from(">H", data, 1)[0], 3
    if b0 == 0xDD and len(data) >= 5:
        return struct.unpack_from(">I", data, 1)[0], 5
    return -1, 0


def _array_items(data: bytes) -> bytes:
    """The concatenated item encodings of a msgpack array (its header stripped)."""
    count, header = _array_info(data)
    if count < 0:
        raise ValueError("a delta base is not a msgpack array")
    return data[header:]


def unsqueeze(data: bytes | list) -> bytes:
    """Inverse of :meth:`BlobCodec.squeeze`; the recorded length bounds the output."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    z, n = data
    if not isinstance(n, int) or not 0 <= n <= MAX_INFLATED:
        raise ValueError(f"compressed value claims {n!r} bytes (limit {MAX_INFLATED})")
    d = zlib.decompressobj()
    out = d.decompress(z, n)
    if len(out) != n or d.unconsumed_tail or not d.eof:
        raise ValueError("a compressed value in the store is damaged")
    return out


def _refuse_pickle(type_: str) -> None:
    if type_ == "pickle":
        raise TypeError("WalstoreSaver refuses pickled values (a store must never be able "
                        "to run code); use a serde without pickle_fallback")


# what one cache entry costs beyond its value bytes, measured (tracemalloc, CPython 3.11):
# the OrderedDict slot, the key and entry tuples, the version string, the typed tuple and
# the bytes objects' headers — counting 64 here made 4 MiB of "cache" take 22 MiB
ENTRY_OVERHEAD = 420


class ValueCache:
    """The rebuilt value of the newest cached version per (namespace blobs prefix,
    channel): ``(version, stored form, (type, bytes))``, least recently used dropped first
    once the entries' bytes pass ``max_bytes`` (0: nothing cached).  Only versions
    matching :data:`UNIQUE_VERSION` enter (see the module doc).  Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_VALUE_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("value_cache_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0    # reads answered from the cache
        self.misses = 0  # delta reads that walked their chain (to its base or a cached link)
        self.links = 0   # chain links read from the store by those walks
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()
        # called (key, version, (type, bytes)) for each entry dropped for room
        self.on_evict: Callable[[tuple, Any, tuple], None] | None = None

    @staticmethod
    def cacheable(version: Any) -> bool:
        return type(version) is str and UNIQUE_VERSION.fullmatch(version) is not None

    def keeps(self, version: Any, size: int) -> bool:
        """Would :meth:`put` keep a value of ``size`` bytes at ``version``?"""
        return bool(self.max_bytes) and size + ENTRY_OVERHEAD <= self.max_bytes // 4 and \
            self.cacheable(version)

    def get(self, scope: bytes, channel: str, version: Any) -> tuple | None:
        """(stored form, (type, bytes)) of ``version`` if it is the cached one."""
        with self._lock:
            entry = self._entries.get((scope, channel))
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end((scope, channel))
            return entry[1], entry[2]

    def put(self, scope: bytes, channel: str, version: Any, stored: Any,
            typed: tuple[str, bytes]) -> None:
        """Cache ``version`` unless a newer version of the channel is cached (a read of
        an older checkpoint does not displace the head)."""
        if not self.keeps(version, len(typed[1])):
            return
        size = len(typed[1]) + ENTRY_OVERHEAD + len(scope) + len(channel) + len(version)
        if not isinstance(stored, dict):  # a full value: its stored form is kept too
            size += len(stored[1]) if isinstance(stored[1], bytes) else len(stored[1][0])
        key = (scope, channel)
        evicted = []
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                if old[0][:10] > version[:10]:  # (the counter part; a fork's equal
                    return                      # counter: the last one written wins)
                self.bytes -= old[3]
            self._entries[key] = (version, stored, typed, size)
            self._entries.move_to_end(key)
            self.bytes += size
            while self.bytes > self.max_bytes:
                k, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped[3]
                evicted.append((k, dropped[0], dropped[2]))
        if self.on_evict is not None:
            for k, v, t in evicted:
                self.on_evict(k, v, t)

    def forget(self, scope_prefix: bytes | None = None) -> None:
        with self._lock:
            if scope_prefix is None:
                self._entries.clear()
                self.bytes = 0
                return
            for k in [k for k in self._entries if k[0].startswith(scope_prefix)]:
                self.bytes -= self._entries.pop(k)[3]


class BlobCodec:
    """Serialized values and channel blobs of one saver (see the module doc)."""

    def __init__(self, serde: Any, *, deltas: bool = True,
                 delta_depth: int = DEFAULT_DELTA_DEPTH, compress: bool = True,
                 value_cache_bytes: int = DEFAULT_VALUE_CACHE_BYTES) -> None:
        if delta_depth < 1:
            raise ValueError("delta_depth must be at least 1")
        self.values = ValueCache(value_cache_bytes)  # shared by with_allowlist's copies
        self.values.on_evict = self._evicted
        self.serde = serde
        self.deltas = deltas
        self.delta_depth = delta_depth
        self.compress = compress
        self._lock = threading.Lock()
        # (cache scope, channel) -> (version, item count, byte length and digest of the
        # items' encoding, delta depth) of the last list value this process stored for
        # that channel: the candidate base of the next delta (checked in the store).
        self._cache: OrderedDict = OrderedDict()

    # ---- typed values -------------------------------------------------------------------
    def dumps(self, obj: Any) -> list:
        type_, data = self.serde.dumps_typed(obj)
        _refuse_pickle(type_)
        return [type_, self.squeeze(bytes(data))]

    def loads(self, typed: list) -> Any:
        type_, data = typed[0], unsqueeze(typed[1])
        if type_ == "pickle":
            raise ValueError("refusing to unpickle a value found in the store")
        return self.serde.loads_typed((type_, data))

    def squeeze(self, data: bytes) -> bytes | list:
        """``data``, or ``[zlib(data), len(data)]`` when compression saves a tenth.  Never
        compressed past MAX_INFLATED, the length every reader refuses (``unsqueeze``): such
        a value stays raw, and the store refuses it at the put (over its value limit)
        instead of storing what no read could inflate."""
        if not self.compress or not COMPRESS_MIN <= len(data) <= MAX_INFLATED:
            return data
        z = zlib.compress(data, 6)
        return [z, len(data)] if len(z) <= len(data) * 0.9 else data

    def _encode(self, value: Any) -> tuple[str, bytes]:
        if isinstance(self.serde, StateSerializer):
            type_, data = self.serde.encode(value)  # audited by the caller (plan)
        else:
            type_, data = self.serde.dumps_typed(value)
        _refuse_pickle(type_)
        return type_, bytes(data)

    def _audit(self, type_: str, data: bytes) -> None:
        if isinstance(self.serde, StateSerializer):
            self.serde.audit(type_, data)

    # ---- channel blobs: planned outside the transaction, resolved inside --------------
    def plan(self, cache_scope: bytes, channel: str, version: Any, value: Any) -> tuple:
        """How to store one new channel version: ("full", type, bytes, cache entry or
        None) or ("delta", type, bytes, cache entry, delta).  A delta holds the items
        appended to the list last stored for this channel, whose encoding must be a
        byte-exact prefix of this one."""
        type_, data = self._encode(value)
        if not (self.deltas and type_ == "msgpack" and type(value) is list and value
                and isinstance(self.serde, JsonPlusSerializer)):
            self._audit(type_, data)
            return ("full", type_, data, None)
        count, header = _array_info(data)
        if count != len(value):
            self._audit(type_, data)
            return ("full", type_, data, None)
        items = memoryview(data)[header:]
        # the next put compares its encoding with this one: byte for byte against the
        # value cache's copy (a memcmp), or, when the cache will not keep it, by digest
        digest = (None if self.values.keeps(version, len(data))
                  else hashlib.blake2b(items, digest_size=16).digest())
        me = (version, count, len(items), digest)
        with self._lock:
            cached = self._cache.get((cache_scope, channel))
        if cached is None:
            self._audit(type_, data)
            return ("full", type_, data, me + (0,))
        base_version, base_n, base_len, base_digest, base_depth = cached
        if (base_version == version or base_n > count or base_len > len(items)
                or base_depth + 1 > self.delta_depth
                or not self._extends(cache_scope, channel, base_version, base_len,
                                     base_digest, data, header)):
            self._audit(type_, data)
            return ("full", type_, data, me + (0,))
        appended = bytes(items[base_len:])
        self._audit(type_, _array_header(count - base_n) + appended)  # the base passed
        delta = {"b": base_version, "d": base_depth + 1, "n": count,
                 "a": self.squeeze(appended)}
        return ("delta", type_, data, me, delta)

    def _evicted(self, key: tuple, version: Any, typed: tuple[str, bytes]) -> None:
        """The value cache dropped ``version``'s bytes: if it is still the channel's delta
        base, keep its digest instead (so the next put can still store a delta)."""
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry[0] != version or entry[3] is not None:
                return
        _n, header = _array_info(typed[1])
        digest = hashlib.blake2b(memoryview(typed[1])[header:], digest_size=16).digest()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry[0] == version and entry[3] is None:
                self._cache[key] = entry[:3] + (digest,) + entry[4:]

    def _extends(self, scope: bytes, channel: str, base_version: Any, base_len: int,
                 base_digest: bytes | None, data: bytes, header: int) -> bool:
        """Do ``data``'s items begin with the items of the base version (``base_len``
        bytes)?  Compared with the cached bytes of the base, else by its digest; False when
        neither is at hand (the value cache dropped the base: a full copy)."""
        if base_digest is not None:
            return hashlib.blake2b(memoryview(data)[header:header + base_len],
                                   digest_size=16).digest() == base_digest
        got = self.values.get(scope, channel, base_version)
        if got is None or got[1][0] != "msgpack":
            return False
        base = got[1][1]
        _n, base_header = _array_info(base)
        return (len(base) - base_header == base_len
                and data.startswith(memoryview(base)[base_header:], header))

    def resolve(self, get: Getter, ns: Namespace, cache_scope: bytes, channel: str,
                plan: tuple, cache_updates: list) -> Any:
        """The stored form of a planned blob, decided inside the writing transaction."""
        if plan[0] == "full":
            _kind, type_, data, me = plan
            stored = [type_, self.squeeze(data)]
            if me is not None:
                cache_updates.append(((cache_scope, channel), me, stored, (type_, data)))
            return stored
        _kind, type_, data, me, delta = plan
        # the base must still be there (a rewind or prune may have removed it); reading it
        # also puts it in this transaction's read set, so a concurrent delete conflicts
        if get(ns.blob(channel, delta["b"])) is None:
            stored = [type_, self.squeeze(data)]
            cache_updates.append(((cache_scope, channel), me + (0,), stored, (type_, data)))
            return stored
        cache_updates.append(((cache_scope, channel), me + (delta["d"],), delta,
                              (type_, data)))
        return delta

    def remember(self, updates: list) -> None:
        """After the writing transaction committed: the delta bases and the values it
        stored become the caches' newest (``resolve`` collected them)."""
        if not updates:
            return
        with self._lock:
            for k, me, _stored, _typed in updates:
                self._cache[k] = me
                self._cache.move_to_end(k)
            while len(self._cache) > _DELTA_CACHE_SIZE:
                self._cache.popitem(last=False)
        for (scope, channel), me, stored, typed in updates:
            self.values.put(scope, channel, me[0], stored, typed)

    def forget(self, scope_prefix: bytes | None = None) -> None:
        """Drop cached delta bases (all, or those under ``scope_prefix``): after a rewind,
        purge or prune their blobs may be gone."""
        with self._lock:
            if scope_prefix is None:
                self._cache.clear()
            else:
                for k in [k for k in self._cache if k[0].startswith(scope_prefix)]:
                    del self._cache[k]
        self.values.forget(scope_prefix)

    # ---- reading ------------------------------------------------------------------------
    def read(self, get: Getter, ns: Namespace, channel: str, version: Any,
             memo: dict) -> tuple[str, bytes] | None:
        """(type, bytes) of a channel version (None: empty); deltas are rebuilt into one
        msgpack array."""
        key = ns.blob(channel, version)
        if key in memo:
            return memo[key]
        raw = get(key)
        if raw is None:
            out = None
        else:
            scope = ns.blobs()
            cached = self.values.get(scope, channel, version)
            if cached is not None and cached[0] == raw:
                self.values.hits += 1
                out = cached[1]
            else:
                out = self._rebuild(get, ns, scope, channel, version, raw)
                if isinstance(raw, dict):
                    self.values.misses += 1
                    self.values.put(scope, channel, version, raw, out)
        memo[key] = out
        return out

    def _rebuild(self, get: Getter, ns: Namespace, scope: bytes, channel: str,
                 version: Any, raw: Any) -> tuple[str, bytes]:
        """(type, bytes) of a stored blob: a delta's chain is read back to its full base,
        or to the cached version of the channel, whichever comes first."""
        if not isinstance(raw, dict):
            return (raw[0], unsqueeze(raw[1]))
        chain = [unsqueeze(raw["a"])]
        seen = {str(version)}
        base = raw
        base_items = None
        while isinstance(base, dict):
            base_version = base["b"]
            if str(base_version) in seen:
                raise ValueError(f"the delta chain of {channel!r}@{version!r} loops")
            seen.add(str(base_version))
            cached = self.values.get(scope, channel, base_version)
            if cached is not None and cached[1][0] == "msgpack":
                base_items = _array_items(cached[1][1])  # (a key never changes value)
                break
            base = get(ns.blob(channel, base_version))
            self.values.links += 1
            if base is None:
                raise ValueError(f"the delta base {channel!r}@{base_version!r} of version "
                                 f"{version!r} is missing from the store")
            if isinstance(base, dict):
                chain.append(unsqueeze(base["a"]))
        if base_items is None:
            if base[0] != "msgpack":
                raise ValueError(f"delta base of {channel!r} is {base[0]!r}, not msgpack")
            base_items = _array_items(unsqueeze(base[1]))
        items = base_items + b"".join(reversed(chain))
        return ("msgpack", _array_header(raw["n"]) + items)

    def load_values(self, get: Getter, ns: Namespace, versions: dict, memo: dict) -> dict:
        """The channel values of a checkpoint from its ``channel_versions``."""
        values = {}
        for ch, ver in versions.items():
            typed = self.read(get, ns, ch, ver, memo)
            if typed is None or typed[0] == "empty":
                continue
            values[ch] = self.loads(typed)
        return values

    @staticmethod
    def chain_keys(get: Getter, ns: Namespace, channel: str, version: Any) -> list[bytes]:
        """The blob keys a channel version is read from (itself and its delta bases)."""
        keys = [ns.blob(channel, version)]
        raw = get(keys[0])
        while isinstance(raw, dict) and len(keys) <= MAX_CHAIN:
            keys.append(ns.blob(channel, raw["b"]))
            raw = get(keys[-1])
        return keys


MAX_CHAIN = 1 << 16  # a delta chain is at most delta_depth long; bounds a damaged loop
