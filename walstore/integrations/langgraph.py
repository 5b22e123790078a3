"""A LangGraph checkpoint saver on walstore: ``WalstoreSaver``.

::

    from walstore.integrations.langgraph import WalstoreSaver
    saver = WalstoreSaver.from_path("agent-state")        # or WalstoreSaver(store)
    graph = builder.compile(checkpointer=saver)
    graph.invoke(inputs, {"configurable": {"thread_id": "t1"}})

What it adds to LangGraph's stock savers:

- **Crash safety and transactions**: every ``put`` / ``put_writes`` / delete is one walstore
  transaction (durable per the store's ``durability``), so a checkpoint, its channel blobs
  and the thread's head move together or not at all.
- **Write fencing**: a ``put`` reads the thread's head (its newest checkpoint) inside its
  transaction.  Two writers racing from the same parent cannot both succeed: the loser's
  commit fails optimistic validation, or the head it builds on is no longer the head; it
  gets :class:`StaleCheckpointError`, a :class:`walstore.ConflictError`.  Deliberate
  branches (LangGraph's time travel and ``update_state``: metadata ``source`` ``"fork"`` /
  ``"update"``) are allowed from any checkpoint.  ``fencing=False`` turns the check off.
  Fencing refuses the loser's *checkpoint*; its nodes have already run by then, so their
  external effects belong in walstore actions with compensations.
- **Storage that does not bloat**: channel values are stored once per (channel, version)
  and checkpoints reference versions, so a step stores only the channels it changed.  A
  list channel that grew by appending (a ``messages`` list) is stored as a delta: only the
  appended items, with a full copy every ``delta_depth`` versions to bound reads.
  Serialized values of 256 bytes or more are zlib-compressed when that saves a tenth.
- **Undo**: :meth:`WalstoreSaver.rewind` rewinds the whole store to the moment a checkpoint
  was saved.  The agent's own walstore transactions made after it are undone too, and the
  compensations of their actions (``tx.action(..., compensate=...)``) run, newest first,
  instead of LangGraph replaying side effects blindly.  See ``examples/langgraph_agent.py``.

Key layout (walstore bytes keys; ``T``, ``N``, ... are msgpack-encoded strings, or a 16-byte
hash for components longer than 120 bytes, which then are kept in the record; every
``bytes`` payload below may instead be ``[zlib bytes, length]``)::

    lg c T N <checkpoint_id>                -> {"c": [type, bytes] checkpoint without values,
                                                "m": [type, bytes] metadata, "p": parent id}
    lg h T N                                -> newest checkpoint id of the thread/namespace
    lg b T N <channel> <version>            -> [type, bytes]  (a full value), or
                                               {"b": base version, "d": depth, "n": items,
                                                "a": appended msgpack items}
    lg w T N <checkpoint_id> 0 <task> <idx> -> [task_id, channel, type, bytes, task_path, idx]
    lg r <run_id> T N <checkpoint_id>       -> [thread_id, checkpoint_ns, checkpoint_id]

Values go through LangGraph's serde (``dumps_typed``); walstore stores the resulting bytes
in msgpack.  Nothing here pickles.  The default serde is LangGraph's JsonPlusSerializer in
strict mode: LangGraph's default one rebuilds any ``module.callable`` named in the data,
so a crafted store could make it run code; the strict one rebuilds only LangGraph's safe
types plus ``allowed_types`` (or, with ``LANGGRAPH_STRICT_MSGPACK=true``, the compiled
graph's schema types).  A serde with ``pickle_fallback`` is refused, and so is a
``"pickle"``-typed value, on write and on read.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Callable

import msgpack

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (WRITES_IDX_MAP, BaseCheckpointSaver,
                                           ChannelVersions, Checkpoint, CheckpointMetadata,
                                           CheckpointTuple, get_checkpoint_id,
                                           get_checkpoint_metadata)
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("walstore.integrations.langgraph needs LangGraph: "
                      "pip install 'walstore[langgraph]'") from e

try:
    from langgraph.checkpoint.base import writes_sort_key
except ImportError:  # pragma: no cover - older langgraph-checkpoint
    def writes_sort_key(task_path: str, task_id: str = "", idx: int = 0):
        return (task_path, task_id, idx)

import walstore
from walstore.codec import prefix_end
from walstore.log.format import LSN
from walstore.errors import ConflictError

__all__ = ["WalstoreSaver", "StaleCheckpointError"]

DEFAULT_PREFIX = b"lg"
MAX_PART = 120           # longer key components are hashed (walstore keys are <= 500 bytes)
DEFAULT_DELTA_DEPTH = 128
COMPRESS_MIN = 256       # compress serialized values at least this long (zlib)
MAX_INFLATED = 1 << 30   # refuse a compressed value claiming more (a damaged length)
_PUT_RETRIES = 8
_READ_RETRIES = 20
_DELTA_CACHE_SIZE = 1024
_FORK_SOURCES = ("fork", "update")


class StaleCheckpointError(ConflictError):
    """A ``put`` lost the race for a thread: another writer moved the thread's head.

    ``parent`` is the checkpoint this writer built on, ``head`` the thread's newest
    checkpoint now.  Nothing of the refused put was written.
    """

    def __init__(self, message: str, thread_id: str, checkpoint_ns: str,
                 parent: str | None, head: str | None) -> None:
        super().__init__(message, [])
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.parent = parent
        self.head = head


# ---- key encoding -------------------------------------------------------------------------
def _part(s: Any) -> bytes:
    """A self-delimiting key component: msgpack str, or bin(16) hash when long."""
    s = str(s)
    raw = s.encode("utf-8")
    if len(raw) <= MAX_PART:
        return msgpack.packb(s, use_bin_type=True)
    return b"\xc4\x10" + hashlib.blake2b(raw, digest_size=16).digest()


def _hashed(s: Any) -> bool:
    return len(str(s).encode("utf-8")) > MAX_PART


def _read_part(key: bytes, i: int) -> tuple[str | None, int]:
    """Parse one component at ``key[i:]``: (text or None when hashed, next index)."""
    b0 = key[i]
    if 0xA0 <= b0 <= 0xBF:
        n = b0 & 0x1F
        return key[i + 1:i + 1 + n].decode("utf-8"), i + 1 + n
    if b0 == 0xD9:
        n = key[i + 1]
        return key[i + 2:i + 2 + n].decode("utf-8"), i + 2 + n
    if b0 == 0xC4:
        n = key[i + 1]
        return None, i + 2 + n
    raise ValueError(f"malformed walstore LangGraph key component at {i}: {key!r}")


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
    b0 = data[0]
    if 0x90 <= b0 <= 0x9F:
        return data[1:]
    if b0 == 0xDC:
        return data[3:]
    if b0 == 0xDD:
        return data[5:]
    raise ValueError("a delta base is not a msgpack array")


class _Keys:
    """Builds the saver's walstore keys under one prefix."""

    def __init__(self, prefix: bytes) -> None:
        self.p = bytes(prefix)

    def scope(self, thread_id: str, ns: str) -> bytes:
        return _part(thread_id) + _part(ns)

    def ckpt_scope(self, scope: bytes) -> bytes:
        return self.p + b"c" + scope

    def ckpt(self, scope: bytes, cid: str) -> bytes:
        return self.p + b"c" + scope + cid.encode("utf-8")

    def head(self, scope: bytes) -> bytes:
        return self.p + b"h" + scope

    def blob_scope(self, scope: bytes) -> bytes:
        return self.p + b"b" + scope

    def blob(self, scope: bytes, channel: str, version: Any) -> bytes:
        return self.p + b"b" + scope + _part(channel) + _part(version)

    def writes_of(self, scope: bytes, cid: str) -> bytes:
        return self.p + b"w" + scope + cid.encode("utf-8") + b"\x00"

    def write(self, scope: bytes, cid: str, task_id: str, idx: int) -> bytes:
        return self.writes_of(scope, cid) + _part(task_id) + msgpack.packb(idx)

    def writes_scope(self, scope: bytes) -> bytes:
        return self.p + b"w" + scope

    def run(self, run_id: str, scope: bytes, cid: str) -> bytes:
        return self.p + b"r" + _part(run_id) + scope + cid.encode("utf-8")

    def run_prefix(self, run_id: str) -> bytes:
        return self.p + b"r" + _part(run_id)

    def parse_ckpt(self, key: bytes) -> tuple[str | None, str | None, str]:
        """(thread_id, ns, checkpoint_id) of a checkpoint key (None for hashed parts)."""
        i = len(self.p) + 1
        t, i = _read_part(key, i)
        n, i = _read_part(key, i)
        return t, n, key[i:].decode("utf-8")


def _conf(config: RunnableConfig) -> dict:
    return config.get("configurable", {}) if config else {}


def _config(thread_id: str, ns: str, cid: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": cid}}


class WalstoreSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpoint saver storing threads in a walstore store.

    ``WalstoreSaver(store)`` uses an open :class:`walstore.Store` (the caller closes it);
    ``WalstoreSaver.from_path(path, **open_kwargs)`` opens one and closes it on
    :meth:`close` / ``with``.  Every method has an ``a``-prefixed async twin that runs the
    blocking call (fsync) in a worker thread.

    Options: ``serde`` (default: LangGraph's JsonPlusSerializer in strict mode: values of
    classes other than LangGraph's safe types come back as plain dicts unless listed in
    ``allowed_types``, e.g. ``allowed_types=[MyState]``, or the environment sets
    ``LANGGRAPH_STRICT_MSGPACK=true``, which makes ``compile()`` pass the graph's schema
    types); ``fencing`` (default True, see the module doc); ``deltas`` (store grown lists
    as appended items, default True);
    ``delta_depth`` (a full copy every that many versions, default 128); ``compress``
    (zlib for serialized values of 256 bytes or more, default True); ``key_prefix``
    (bytes, default ``b"lg"``: the saver owns every bytes key starting with it; several
    savers can share one store under different prefixes);
    ``txn_meta`` (label each walstore transaction, visible in ``walstore log``).
    """

    def __init__(self, store: "walstore.Store", *, serde=None, fencing: bool = True,
                 deltas: bool = True, delta_depth: int = DEFAULT_DELTA_DEPTH,
                 key_prefix: bytes = DEFAULT_PREFIX, txn_meta: bool = True,
                 compress: bool = True, allowed_types: Sequence = ()) -> None:
        if getattr(serde, "pickle_fallback", False):
            raise ValueError("WalstoreSaver refuses a serde with pickle_fallback=True: a store "
                             "must never be able to run code when read")
        if serde is not None and allowed_types:
            raise TypeError("pass allowed_types or serde, not both")
        if serde is None:
            serde = JsonPlusSerializer(allowed_msgpack_modules=list(allowed_types) or None)
        super().__init__(serde=serde)
        if not isinstance(key_prefix, (bytes, bytearray)) or not key_prefix:
            raise TypeError("key_prefix must be non-empty bytes")
        if delta_depth < 1:
            raise ValueError("delta_depth must be at least 1")
        self.store = store
        self.fencing = fencing
        self.deltas = deltas
        self.delta_depth = delta_depth
        self.txn_meta = txn_meta
        self.compress = compress
        self.keys = _Keys(bytes(key_prefix))
        self._owns_store = False
        self._cache_lock = threading.Lock()
        # (scope, channel) -> (version, item count, byte length and digest of the items'
        # encoding, delta depth) of the last list value this process stored for that
        # channel: the candidate base of the next delta (checked against the store).
        self._delta_cache: OrderedDict = OrderedDict()

    @classmethod
    def from_path(cls, path: str, *, saver_options: dict | None = None,
                  **open_kwargs: Any) -> "WalstoreSaver":
        """Open (creating) the store at ``path`` and wrap it; ``close()`` closes it."""
        saver = cls(walstore.open(path, **open_kwargs), **(saver_options or {}))
        saver._owns_store = True
        return saver

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "WalstoreSaver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "WalstoreSaver":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    # ---- serialization ---------------------------------------------------------------
    def _dumps(self, obj: Any) -> list:
        type_, data = self.serde.dumps_typed(obj)
        if type_ == "pickle":
            raise TypeError("WalstoreSaver refuses pickled values (a store must never be able "
                            "to run code); use a serde without pickle_fallback")
        return [type_, self._squeeze(bytes(data))]

    def _loads(self, typed: Sequence) -> Any:
        type_, data = typed[0], _unsqueeze(typed[1])
        if type_ == "pickle":
            raise ValueError("refusing to unpickle a value found in the store")
        return self.serde.loads_typed((type_, data))

    def _squeeze(self, data: bytes) -> bytes | list:
        """``data``, or ``[zlib(data), len(data)]`` when compression saves a tenth."""
        if not self.compress or len(data) < COMPRESS_MIN:
            return data
        z = zlib.compress(data, 6)
        return [z, len(data)] if len(z) <= len(data) * 0.9 else data

    def _meta(self, op: str, **fields: Any) -> dict | None:
        if not self.txn_meta:
            return None
        return {"langgraph": op, **{k: v for k, v in fields.items() if v is not None}}

    # ---- reading -----------------------------------------------------------------------
    def _read(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(tx)`` in a read-only transaction validated at its end (retried)."""
        return self.store.run(fn, retries=_READ_RETRIES, backoff=0.001)

    def _blob_items(self, get, scope: bytes, channel: str, version: Any,
                    memo: dict) -> tuple[str, bytes] | None:
        """(type, bytes) of a channel value; deltas are rebuilt into one msgpack array."""
        key = self.keys.blob(scope, channel, version)
        if key in memo:
            return memo[key]
        raw = get(key)
        if raw is None:
            out = None
        elif isinstance(raw, dict):
            chain = [_unsqueeze(raw["a"])]
            seen = {str(version)}
            base = raw
            while isinstance(base, dict):
                base_version = base["b"]
                if str(base_version) in seen:
                    raise ValueError(f"the delta chain of {channel!r}@{version!r} loops")
                seen.add(str(base_version))
                base = get(self.keys.blob(scope, channel, base_version))
                if base is None:
                    raise ValueError(f"the delta base {channel!r}@{base_version!r} of version "
                                     f"{version!r} is missing from the store")
                if isinstance(base, dict):
                    chain.append(_unsqueeze(base["a"]))
            if base[0] != "msgpack":
                raise ValueError(f"delta base of {channel!r} is {base[0]!r}, not msgpack")
            items = _array_items(_unsqueeze(base[1])) + b"".join(reversed(chain))
            out = ("msgpack", _array_header(raw["n"]) + items)
        else:
            out = (raw[0], _unsqueeze(raw[1]))
        memo[key] = out
        return out

    def _load_values(self, get, scope: bytes, versions: dict, memo: dict) -> dict:
        values = {}
        for ch, ver in versions.items():
            typed = self._blob_items(get, scope, ch, ver, memo)
            if typed is None or typed[0] == "empty":
                continue
            values[ch] = self._loads(typed)
        return values

    def _pending_writes(self, scan, scope: bytes, cid: str) -> list:
        rows = []
        for _key, row in scan(self.keys.writes_of(scope, cid)):
            task_id, channel, type_, data, task_path, idx = row
            rows.append((writes_sort_key(task_path, task_id, idx), task_id, channel,
                         [type_, data]))
        rows.sort(key=lambda r: r[0])
        return [(task_id, channel, self._loads(v)) for _k, task_id, channel, v in rows]

    def _tuple(self, get, scan, thread_id: str, ns: str, cid: str, rec: dict,
               memo: dict, metadata: Any = None) -> CheckpointTuple:
        scope = self.keys.scope(thread_id, ns)
        checkpoint = self._loads(rec["c"])
        checkpoint["channel_values"] = self._load_values(
            get, scope, checkpoint.get("channel_versions", {}), memo)
        parent = rec.get("p")
        return CheckpointTuple(
            config=_config(thread_id, ns, cid),
            checkpoint=checkpoint,
            metadata=metadata if metadata is not None else self._loads(rec["m"]),
            parent_config=_config(thread_id, ns, parent) if parent else None,
            pending_writes=self._pending_writes(scan, scope, cid),
        )

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        conf = _conf(config)
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "") or ""
        cid = get_checkpoint_id(config)
        scope = self.keys.scope(thread_id, ns)

        def read(tx):
            if cid:
                found, rec = cid, tx.get(self.keys.ckpt(scope, cid))
            else:
                found = rec = None
                prefix = self.keys.ckpt_scope(scope)
                it = tx.scan(prefix=prefix, reverse=True)
                try:
                    for key, rec in it:
                        found = key[len(prefix):].decode("utf-8")
                        break
                finally:
                    it.close()
            if rec is None:
                return None
            return self._tuple(tx.get, lambda p: tx.scan(prefix=p), thread_id, ns, found,
                               rec, {})
        return self._read(read)

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first (by checkpoint id), filtered by thread, namespace,
        ``filter`` (metadata equality on every given key), ``before`` and ``limit``."""
        conf = _conf(config) if config else {}
        thread_id = str(conf["thread_id"]) if conf.get("thread_id") is not None else None
        ns = conf.get("checkpoint_ns") if config else None
        want_id = conf.get("checkpoint_id")
        before_id = get_checkpoint_id(before) if before else None
        if limit is not None and limit <= 0:
            return
        store = self.store
        if thread_id is not None and ns is not None:
            prefix = self.keys.ckpt_scope(self.keys.scope(thread_id, ns))
            end = prefix + before_id.encode("utf-8") if before_id else prefix_end(prefix)
            rows = self._scan_batched(prefix, end, reverse=True)
            candidates = ((thread_id, ns, k[len(prefix):].decode("utf-8"), rec)
                          for k, rec in rows)
        else:
            prefix = self.keys.p + b"c" + (_part(thread_id) if thread_id is not None else b"")
            found = []
            for k, rec in self._scan_batched(prefix, prefix_end(prefix)):
                t, n, cid = self.keys.parse_ckpt(k)
                t = rec.get("t", t)
                n = rec.get("n", n)
                if before_id and cid >= before_id:
                    continue
                found.append((t, n, cid, rec))
            found.sort(key=lambda r: r[2], reverse=True)
            candidates = iter(found)
        memo: dict = {}
        get = store.get
        scan = lambda p: store.scan(prefix=p)  # noqa: E731
        for t, n, cid, rec in candidates:
            if want_id and cid != want_id:
                continue
            metadata = self._loads(rec["m"])
            if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                continue
            yield self._tuple(get, scan, t, n, cid, rec, memo, metadata)
            if limit is not None:
                limit -= 1
                if limit <= 0:
                    return

    def _scan_batched(self, lo: bytes, hi: bytes | None, reverse: bool = False,
                      batch: int = 64) -> Iterator[tuple[bytes, Any]]:
        """Committed rows lo <= key < hi, read in short scans (no read transaction stays
        open while the caller works on a row)."""
        while True:
            rows = []
            it = self.store.scan(start=lo, end=hi, reverse=reverse)
            try:
                for row in it:
                    rows.append(row)
                    if len(rows) >= batch:
                        break
            finally:
                it.close()
            yield from rows
            if len(rows) < batch:
                return
            if reverse:
                hi = rows[-1][0]
            else:
                lo = rows[-1][0] + b"\x00"

    # ---- writing -----------------------------------------------------------------------
    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        conf = _conf(config)
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "") or ""
        parent = conf.get("checkpoint_id")
        cid = checkpoint["id"]
        scope = self.keys.scope(thread_id, ns)
        c = dict(checkpoint)
        values = c.pop("channel_values", {}) or {}
        md = get_checkpoint_metadata(config, metadata)
        record = {"c": self._dumps(c), "m": self._dumps(md), "p": parent}
        self._name_record(record, thread_id, ns)
        run_id = md.get("run_id")
        if run_id is not None:
            record["r"] = str(run_id)
        blobs = [(ch, ver, self._blob_plan(scope, ch, ver, values[ch]) if ch in values
                  else ("full", "empty", b"", None))
                 for ch, ver in new_versions.items()]
        forkish = md.get("source") in _FORK_SOURCES
        hkey = self.keys.head(scope)
        ckey = self.keys.ckpt(scope, cid)
        seen_head: Any = _UNSEEN
        for attempt in range(_PUT_RETRIES + 1):
            tx = self.store.transaction(meta=self._meta("put", thread_id=thread_id,
                                                        checkpoint_ns=ns or None,
                                                        checkpoint_id=cid))
            try:
                with tx:
                    head = tx.get(hkey)
                    if seen_head is _UNSEEN:
                        seen_head = head
                    self._fence(thread_id, ns, parent, head, seen_head, forkish)
                    cache_updates = []
                    for ch, ver, plan in blobs:
                        value = self._resolve_plan(tx, scope, ch, ver, plan, cache_updates)
                        tx.put(self.keys.blob(scope, ch, ver), value)
                    tx.put(ckey, record)
                    if head is None or cid >= head:
                        tx.put(hkey, cid)
                    if run_id is not None:
                        tx.put(self.keys.run(str(run_id), scope, cid), [thread_id, ns, cid])
            except StaleCheckpointError:
                raise
            except ConflictError:
                if attempt >= _PUT_RETRIES:
                    raise
                continue
            self._remember(cache_updates)
            return _config(thread_id, ns, cid)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fence(self, thread_id: str, ns: str, parent: str | None, head: str | None,
               seen_head: str | None, forkish: bool) -> None:
        if not self.fencing or forkish:
            return
        stale = (parent is not None and head is not None and head != parent) or \
                head != seen_head
        if stale:
            raise StaleCheckpointError(
                f"thread {thread_id!r} (namespace {ns!r}) moved on: this writer built on "
                f"checkpoint {parent!r} but the thread's head is now {head!r}; another "
                f"writer won (reload the thread and retry, or fork deliberately)",
                thread_id, ns, parent, head)

    @staticmethod
    def _name_record(record: dict, thread_id: str, ns: str) -> None:
        if _hashed(thread_id):
            record["t"] = thread_id
        if _hashed(ns):
            record["n"] = ns

    def _blob_plan(self, scope: bytes, channel: str, version: Any, value: Any) -> tuple:
        """How to store one new channel version, decided outside the transaction:
        ("full", type, bytes, cache entry or None) or ("delta", type, bytes, cache entry,
        delta) — a delta holds the items appended to the list last stored for this
        channel, whose encoding must be a byte-exact prefix of this one."""
        type_, data = self.serde.dumps_typed(value)
        if type_ == "pickle":
            raise TypeError("WalstoreSaver refuses pickled values (a store must never be able "
                            "to run code); use a serde without pickle_fallback")
        data = bytes(data)
        if not (self.deltas and type_ == "msgpack" and type(value) is list and value
                and isinstance(self.serde, JsonPlusSerializer)):
            return ("full", type_, data, None)
        count, header = _array_info(data)
        if count != len(value):
            return ("full", type_, data, None)
        items = memoryview(data)[header:]
        me = (version, count, len(items), hashlib.blake2b(items, digest_size=16).digest())
        with self._cache_lock:
            cached = self._delta_cache.get((scope, channel))
        if cached is None:
            return ("full", type_, data, me + (0,))
        base_version, base_n, base_len, base_digest, base_depth = cached
        if (base_version == version or base_n > count or base_len > len(items)
                or base_depth + 1 > self.delta_depth
                or hashlib.blake2b(items[:base_len], digest_size=16).digest() != base_digest):
            return ("full", type_, data, me + (0,))
        delta = {"b": base_version, "d": base_depth + 1, "n": count,
                 "a": self._squeeze(bytes(items[base_len:]))}
        return ("delta", type_, data, me, delta)

    def _resolve_plan(self, tx, scope: bytes, channel: str, version: Any, plan: tuple,
                      cache_updates: list) -> Any:
        if plan[0] == "full":
            _kind, type_, data, me = plan
            if me is not None:
                cache_updates.append(((scope, channel), me))
            return [type_, self._squeeze(data)]
        _kind, type_, data, me, delta = plan
        # the base must still be there (a rewind or prune may have removed it); reading it
        # also puts it in this transaction's read set, so a concurrent delete conflicts
        if tx.get(self.keys.blob(scope, channel, delta["b"])) is None:
            cache_updates.append(((scope, channel), me + (0,)))
            return [type_, self._squeeze(data)]
        cache_updates.append(((scope, channel), me + (delta["d"],)))
        return delta

    def _remember(self, updates: list) -> None:
        if not updates:
            return
        with self._cache_lock:
            for k, v in updates:
                self._delta_cache[k] = v
                self._delta_cache.move_to_end(k)
            while len(self._delta_cache) > _DELTA_CACHE_SIZE:
                self._delta_cache.popitem(last=False)

    def _forget(self, scope_prefix: bytes | None = None) -> None:
        with self._cache_lock:
            if scope_prefix is None:
                self._delta_cache.clear()
            else:
                for k in [k for k in self._delta_cache if k[0].startswith(scope_prefix)]:
                    del self._delta_cache[k]

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        conf = _conf(config)
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "") or ""
        cid = conf["checkpoint_id"]
        scope = self.keys.scope(thread_id, ns)
        rows = []
        for idx, (channel, value) in enumerate(writes):
            widx = WRITES_IDX_MAP.get(channel, idx)
            t, data = self._dumps(value)
            rows.append((widx, self.keys.write(scope, cid, task_id, widx),
                         [task_id, channel, t, data, task_path, widx]))

        def write(tx):
            for widx, key, row in rows:
                # a retried task's regular writes are kept as first written (idempotent);
                # special writes (errors, interrupts) are replaced, as LangGraph expects
                if widx >= 0 and tx.get(key) is not None:
                    continue
                tx.put(key, row)
        self.store.run(write, retries=_PUT_RETRIES,
                       meta=self._meta("put_writes", thread_id=thread_id, checkpoint_id=cid,
                                       task_id=task_id))

    # ---- deleting, copying, pruning ----------------------------------------------------
    def _delete_keys(self, tx, prefix: bytes) -> int:
        keys = [k for k, _v in tx.scan(prefix=prefix)]
        for k in keys:
            tx.delete(k)
        return len(keys)

    def delete_thread(self, thread_id: str) -> None:
        t = _part(str(thread_id))
        p = self.keys.p

        def delete(tx):
            for k, rec in list(tx.scan(prefix=p + b"c" + t)):
                run = rec.get("r")
                if run is not None:
                    _t, n, cid = self.keys.parse_ckpt(k)
                    scope = k[len(p) + 1:len(k) - len(cid.encode("utf-8"))]
                    tx.delete(self.keys.run(run, scope, cid))
                tx.delete(k)
            for kind in (b"h", b"b", b"w"):
                self._delete_keys(tx, p + kind + t)
        self.store.run(delete, retries=_PUT_RETRIES,
                       meta=self._meta("delete_thread", thread_id=str(thread_id)))
        self._forget(t)

    def _scopes_of(self, tx, thread_id: str) -> dict[bytes, list]:
        """scope -> [(checkpoint_id, key, record)] of a thread, oldest first."""
        p = self.keys.p
        out: dict[bytes, list] = {}
        for k, rec in tx.scan(prefix=p + b"c" + _part(thread_id)):
            _t, _n, cid = self.keys.parse_ckpt(k)
            scope = k[len(p) + 1:len(k) - len(cid.encode("utf-8"))]
            out.setdefault(scope, []).append((cid, k, rec))
        return out

    def _drop_checkpoint(self, tx, scope: bytes, cid: str, key: bytes, rec: dict) -> None:
        tx.delete(key)
        self._delete_keys(tx, self.keys.writes_of(scope, cid))
        if rec.get("r") is not None:
            tx.delete(self.keys.run(rec["r"], scope, cid))

    def _collect_blobs(self, tx, scope: bytes, kept: list[dict]) -> None:
        """Delete the scope's blobs no kept checkpoint needs (delta bases included)."""
        need: set[bytes] = set()
        for rec in kept:
            versions = self._loads(rec["c"]).get("channel_versions", {})
            for ch, ver in versions.items():
                key = self.keys.blob(scope, ch, ver)
                while key not in need:
                    need.add(key)
                    raw = tx.get(key)
                    if not isinstance(raw, dict):
                        break
                    key = self.keys.blob(scope, ch, raw["b"])
        for k, _v in list(tx.scan(prefix=self.keys.blob_scope(scope))):
            if k not in need:
                tx.delete(k)

    def _fix_head(self, tx, scope: bytes, remaining: list[str]) -> None:
        if remaining:
            newest = max(remaining)
            if tx.get(self.keys.head(scope)) != newest:
                tx.put(self.keys.head(scope), newest)
        elif tx.get(self.keys.head(scope)) is not None:
            tx.delete(self.keys.head(scope))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        run_ids = [str(r) for r in run_ids]
        if not run_ids:
            return

        def delete(tx):
            touched: set[bytes] = set()
            for run in run_ids:
                for _k, target in list(tx.scan(prefix=self.keys.run_prefix(run))):
                    thread_id, ns, cid = target
                    scope = self.keys.scope(thread_id, ns)
                    key = self.keys.ckpt(scope, cid)
                    rec = tx.get(key)
                    if rec is not None:
                        self._drop_checkpoint(tx, scope, cid, key, rec)
                    tx.delete(_k)
                    touched.add(scope)
            for scope in touched:
                rows = list(tx.scan(prefix=self.keys.ckpt_scope(scope)))
                prefix_len = len(self.keys.ckpt_scope(scope))
                self._fix_head(tx, scope, [k[prefix_len:].decode("utf-8") for k, _ in rows])
                self._collect_blobs(tx, scope, [rec for _k, rec in rows])
        self.store.run(delete, retries=_PUT_RETRIES, meta=self._meta("delete_for_runs"))
        self._forget()

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        src, dst = str(source_thread_id), str(target_thread_id)
        p = self.keys.p
        src_t, dst_t = _part(src), _part(dst)

        def copy(tx):
            heads: dict[bytes, str] = {}
            for k, rec in list(tx.scan(prefix=p + b"c" + src_t)):
                _t, n, cid = self.keys.parse_ckpt(k)
                ns = rec.get("n", n)
                new = dict(rec)
                new.pop("t", None)
                new.pop("n", None)
                self._name_record(new, dst, ns)
                dscope = self.keys.scope(dst, ns)
                tx.put(self.keys.ckpt(dscope, cid), new)
                if rec.get("r") is not None:
                    tx.put(self.keys.run(rec["r"], dscope, cid), [dst, ns, cid])
                if cid > heads.get(dscope, ""):
                    heads[dscope] = cid
            for kind in (b"b", b"w"):
                for k, v in list(tx.scan(prefix=p + kind + src_t)):
                    tx.put(p + kind + dst_t + k[len(p) + 1 + len(src_t):], v)
            for dscope, cid in heads.items():
                cur = tx.get(self.keys.head(dscope))
                if cur is None or cid > cur:
                    tx.put(self.keys.head(dscope), cid)
        self.store.run(copy, retries=_PUT_RETRIES,
                       meta=self._meta("copy_thread", source=src, target=dst))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep each namespace's newest checkpoint (and its writes and
        the blobs it needs); ``"delete"``: delete the threads."""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r} "
                             f"(use 'keep_latest' or 'delete')")
        thread_ids = [str(t) for t in thread_ids]
        if strategy == "delete":
            for t in thread_ids:
                self.delete_thread(t)
            return

        def prune(tx):
            for t in thread_ids:
                for scope, rows in self._scopes_of(tx, t).items():
                    rows.sort(key=lambda r: r[0])
                    for cid, key, rec in rows[:-1]:
                        self._drop_checkpoint(tx, scope, cid, key, rec)
                    self._fix_head(tx, scope, [rows[-1][0]])
                    self._collect_blobs(tx, scope, [rows[-1][2]])
        if thread_ids:
            self.store.run(prune, retries=_PUT_RETRIES, meta=self._meta("prune"))

    # ---- versions ----------------------------------------------------------------------
    def get_next_version(self, current: str | int | float | None, channel: None = None) -> str:
        """``<counter, 10 digits>.<12 random hex>``: increasing, and unique across forks.

        Shorter than LangGraph's stock 49-character versions (they are repeated in every
        checkpoint's ``channel_versions`` and ``versions_seen``); a thread begun with the
        stock format continues correctly (the counter is read from either)."""
        if current is None:
            n = 0
        elif isinstance(current, (int, float)):
            n = int(current)
        else:
            n = int(str(current).split(".")[0])
        return f"{n + 1:010d}.{random.getrandbits(48):012x}"

    # ---- rewinding (walstore's undo) ---------------------------------------------------
    def checkpoint_lsn(self, config: RunnableConfig) -> LSN:
        """The walstore log position at which this checkpoint was saved."""
        conf = _conf(config)
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "") or ""
        cid = get_checkpoint_id(config)
        if not cid:
            tup = self.get_tuple(config)
            if tup is None:
                raise KeyError(f"thread {thread_id!r} has no checkpoint")
            cid = tup.config["configurable"]["checkpoint_id"]
        key = self.keys.ckpt(self.keys.scope(thread_id, ns), cid)
        versions = self.store.history(key)
        if not versions or versions[0].deleted:
            raise KeyError(f"no checkpoint {cid!r} in thread {thread_id!r} "
                           f"(namespace {ns!r})")
        return versions[0].lsn

    def rewind(self, config: RunnableConfig, meta: Any = None):
        """Rewind the store to the moment the checkpoint ``config`` names was saved.

        Every walstore transaction committed after it is undone as one new transaction
        (later checkpoints and pending writes of every thread in this store, and the
        agent's own state), and the compensations of the actions those transactions ran
        are run, newest first.  The thread's head is that checkpoint again, so the graph
        resumes from it.  History is kept: the rewind itself can be reverted
        (``store.revert(info.txid)``).  Returns the rewind's :class:`walstore.TxnInfo`
        (None when nothing came after the checkpoint).

        Exact when the graph saves checkpoints synchronously (``durability="sync"``):
        with LangGraph's default ``"async"``, a task of the next step may commit before
        the checkpoint itself does and would then survive the rewind.
        """
        lsn = self.checkpoint_lsn(config)
        conf = _conf(config)
        info = self.store.rewind(LSN(lsn), meta=meta if meta is not None else self._meta(
            "rewind", thread_id=str(conf["thread_id"]),
            checkpoint_id=get_checkpoint_id(config)))
        self._forget()
        return info

    # ---- async twins -------------------------------------------------------------------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None
                    ) -> AsyncIterator[CheckpointTuple]:
        items = await asyncio.to_thread(
            lambda: list(self.list(config, filter=filter, before=before, limit=limit)))
        for item in items:
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await asyncio.to_thread(self.prune, thread_ids, strategy=strategy)

    async def arewind(self, config: RunnableConfig, meta: Any = None):
        return await asyncio.to_thread(self.rewind, config, meta)


_UNSEEN = object()


def _unsqueeze(data: bytes | list) -> bytes:
    """Inverse of ``WalstoreSaver._squeeze``; the recorded length bounds the output."""
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


