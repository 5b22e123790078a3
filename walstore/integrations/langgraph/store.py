"""``WalstoreStore``: LangGraph's long-term memory (``BaseStore``) in a walstore store.

This module owns the memory store: items addressed by ``(namespace tuple, key)`` with a
dict value, ``get``/``put``/``delete``, ``search`` (namespace prefix, ``filter`` with
LangGraph's operators, ``limit``/``offset``; a ``query`` is accepted and, with no vector
index, ignored as InMemoryStore does without embeddings), ``list_namespaces`` (prefix and
suffix patterns with ``*``, ``max_depth``, ``limit``/``offset``), ``batch``/``abatch`` and
TTL (``ttl`` minutes per item, ``TTLConfig`` ``default_ttl``/``refresh_on_read``/
``omit_expired``, ``sweep_ttl`` and a sweeper thread).

It lives in the same walstore store as the checkpoints, so memory is crash-safe and
transactional with them, and a memory write made inside a graph node belongs to that
node's thread (the transaction's scope comes from the run config, see ``saver.py``): a
thread's rewind undoes the memories its undone steps wrote.

Semantics follow InMemoryStore where LangGraph leaves them open, except: an update keeps
the item's ``created_at`` (InMemoryStore resets it; SqliteStore keeps it), search results
and namespace listings are in key order (InMemoryStore: insertion order; SqliteStore:
newest update first), only namespaces that hold items are listed, and a ``ttl`` must be
a number of minutes from 0 to ``MAX_TTL_MINUTES`` (None: no expiry): inf, NaN, a negative
one (SqliteStore stores it as already expired) are refused before anything is written.
A namespace label or key that is not UTF-8 text (a lone surrogate) is a ValueError naming
it (``keys.py``), at put as at get or search.  A read on a read-only store (a replica, a
reader process) renews no TTL: the items keep the expiry their writer gave them.
Values are stored as msgpack (JSON-like data, as LangGraph documents), and come back as
InMemoryStore gives them: a tuple (at any depth) as a tuple, not a list.  A value that
would come back as another type is refused at put with a TypeError naming the type and
where it is in the value (``_refuse_changed_types``): a subclass of dict, list, tuple, str,
bytes, int or float (a ``Profile(dict)``, a str Enum, a NamedTuple) comes back as its plain
base, a bytearray or memoryview as bytes; other types msgpack has no encoding for (a date,
a set, an Enum, a dataclass) the codec refuses, as it refuses a value over 16 MiB packed
or an int beyond 64 bits (the error names the item, ``_put``).  msgpack writes
a tuple as an array, so a value holding tuples keeps, beside it in the item's record, where
they were (``"tp"``: a flat list of paths, ``_tuple_marks``, so a value with tuples nests
as deep as a plain one can); the value itself stays plain data (readable as it was by
anything that reads the rows), and a record without ``"tp"`` (every item an older walstore
wrote) reads as before.  Key layout: ``keys.py``.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import numbers
import operator
import os
import random
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from langgraph.store.base import (BaseStore, GetOp, Item, ListNamespacesOp, MatchCondition,
                                  Op, PutOp, Result, SearchItem, SearchOp, TTLConfig,
                                  validate_op_namespace)

from walstore.agent.scope import NO_SCOPE
from walstore.errors import ConflictError, StoreClosed, WalstoreError, type_and_message
from walstore.signals import Flag, deferred

from .._async import finish_despite_cancel
from .._checks import check_store as _check_store
from .keys import MemoryKeys, prefix_end

__all__ = ["WalstoreStore"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RETRIES = 8
_WRITE_RETRIES = 64    # a batch that writes: conflicts are retried, never shown to callers
_SWEEP_BATCH = 512
_STRIPES = [threading.Lock() for _ in range(64)]


def _forked() -> None:  # (a stripe a parent's thread held at the fork stays held)
    _STRIPES[:] = [threading.Lock() for _ in range(len(_STRIPES))]


os.register_at_fork(after_in_child=_forked)
# A TTL's expiry (µs since the epoch) is stored as a 64-bit int and renewed on reads: a TTL
# is at most ~19,000 years, so every expiry fits with room to spare (None: no expiry).
MAX_TTL_MINUTES = 1e10


class _ItemLocks:
    """In this process, writers of one item take turns (a striped lock per item key), so
    threads hammering one item do not make each other's transactions conflict again and
    again; other processes' writers are met by the transaction's own retries."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.locks = [_STRIPES[i] for i in sorted({hash(k) % len(_STRIPES) for k in keys})]

    # Held with the asynchronous signals held off (walstore.signals): an interrupt between
    # two acquires, or at the start of __exit__, left stripes held and every later writer
    # of those items waiting for ever.  The section is walstore's own work (a transaction
    # of store operations, its retries); a Ctrl-C arrives as it ends.
    def __enter__(self) -> None:
        deferred().__enter__()
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        try:
            for lock in reversed(self.locks):
                lock.release()
        finally:
            deferred().__exit__(None, None, None)


def _check_ttl(ttl: Any, what: str = "ttl", outcome: str = "nothing was written") -> None:
    """Refuse a TTL that has no expiry to store (inf, NaN, beyond MAX_TTL_MINUTES: an
    OverflowError, or the codec's "Integer value out of range" naming no TTL) or a
    negative one (an item born expired)."""
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise TypeError(f"{what} must be a number of minutes or None, not "
                        f"{type(ttl).__name__}; {outcome}")
    if not 0 <= ttl <= MAX_TTL_MINUTES:  # (NaN fails both comparisons)
        raise ValueError(f"{what} must be a finite number of minutes from 0 to "
                         f"{MAX_TTL_MINUTES:g} (None: no expiry), not {ttl!r}; {outcome}")


def _backoff(attempt: int) -> None:
    time.sleep(min(0.001 * (2 ** min(attempt, 6)), 0.05) * (0.5 + random.random()))


def _now_us() -> int:
    return time.time_ns() // 1000


def _when(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# ---- tuples: where a value holds them (msgpack has no tuple) ---------------------------
# Both walks below use an explicit stack (a value may nest as deep as msgpack stores: about
# 1,000 levels, past Python's recursion limit).  Marking stops at _WALK_DEPTH, beyond
# msgpack's 1,024 levels: a value deeper than that (or holding itself) is left to the codec,
# which refuses it ("it nests too deeply").
_WALK_DEPTH = 2048


def _containers(value: dict | list | tuple) -> Iterable[tuple[int, Any]]:
    """(position, child) for each list, tuple or dict directly in ``value`` (a dict's
    position is its key's place in the dict's order, which msgpack keeps)."""
    items = value.values() if isinstance(value, dict) else value
    return ((i, v) for i, v in enumerate(items) if isinstance(v, (dict, list, tuple)))


def _tuple_marks(value: Any) -> list | None:
    """Where ``value`` holds tuples: None when nowhere; else a flat list of marks, one per
    tuple in depth-first order, each ``[keep, slot, ...]``: the tuple's path from
    ``value`` (a slot is a position in a list, tuple or dict) is the first ``keep`` slots
    of the previous mark's path followed by the slots given.  Two levels of msgpack
    whatever the value's depth, and each step of a path is written once (marks grow with
    the value, never with its depth squared)."""
    if not isinstance(value, (dict, list, tuple)):
        return None
    marks: list[list] = [[0]] if isinstance(value, tuple) else []
    path: list[int] = []     # slots from value to the container whose children are walked
    keep = 0                 # how many of path's first slots the last mark's path shares
    walk = [iter(_containers(value))]
    while walk:
        step = next(walk[-1], None)
        if step is None:
            walk.pop()
            if path:
                path.pop()
            keep = min(keep, len(path))
            continue
        if len(walk) > _WALK_DEPTH:  # deeper than msgpack stores: the codec refuses it
            break                    # (a value holding itself twice: 2**depth paths)
        slot, child = step
        path.append(slot)
        if isinstance(child, tuple):
            marks.append([keep, *path[keep:]])
            keep = len(path)
        walk.append(iter(_containers(child)))
    return marks or None


class _Open:
    """A container on the path being given its tuples back: a new copy of the one read,
    put in its parent (as a tuple when marked) when the path leaves it."""
    __slots__ = ("copy", "keys", "slot", "is_tuple")

    def __init__(self, value: dict | list, slot: Any) -> None:
        self.copy: dict | list = dict(value) if isinstance(value, dict) else list(value)
        self.keys = list(value) if isinstance(value, dict) else None
        self.slot = slot
        self.is_tuple = False

    def child(self, pos: Any) -> tuple[Any, Any] | None:
        """(slot, child) at position ``pos``; None when there is no such position."""
        if type(pos) is not int or not 0 <= pos < len(self.copy):
            return None
        slot = pos if self.keys is None else self.keys[pos]
        return slot, self.copy[slot]  # type: ignore[index]

    def done(self) -> Any:
        return tuple(self.copy) if self.is_tuple else self.copy


def _close(chain: list[_Open], depth: int) -> None:
    """Leave the path down to ``depth`` containers, each put back in its parent."""
    while len(chain) > depth:
        node = chain.pop()
        chain[-1].copy[node.slot] = node.done()  # type: ignore[index]


def _with_tuples(value: Any, marks: Any) -> Any:
    """``value`` as read (lists) with the tuples ``marks`` names given back: new
    containers along the marked paths (the record read is left as it is); a mark that
    does not fit the value is ignored."""
    if not isinstance(value, (dict, list)) or not isinstance(marks, list):
        return value
    chain = [_Open(value, None)]  # (always a prefix of the last mark's path)
    for mark in marks:
        if not (isinstance(mark, list) and mark and type(mark[0]) is int and mark[0] >= 0):
            _close(chain, 1)  # (a path unknown: only the empty prefix is sure)
            continue
        if mark[0] >= len(chain):  # (its path's prefix was not found: neither is it)
            continue
        _close(chain, mark[0] + 1)
        for pos in mark[1:]:
            found = chain[-1].child(pos)
            if found is None or not isinstance(found[1], (dict, list)):
                break
            chain.append(_Open(found[1], found[0]))
        else:
            chain[-1].is_tuple = isinstance(chain[-1].copy, list)
    _close(chain, 1)
    return chain[0].done()


# ---- types msgpack would give back as others -------------------------------------------
_EXACT = frozenset({str, bytes, int, float, bool, type(None)})
_NESTING = frozenset({dict, list, tuple})
_FLATTENED = (dict, list, tuple, str, bytes, int, float)


def _slot_text(path: tuple) -> str:
    return "".join(f"[{slot!r}]" for slot in path)


def _refuse_changed_types(value: Any, namespace: tuple, key: str) -> None:
    """TypeError for anything in ``value`` msgpack stores but gives back as another type:
    a subclass of dict, list, tuple, str, bytes, int or float (as its base), a bytearray
    or memoryview (as bytes), a dict key that is such a subclass.  Types msgpack cannot
    store at all are left to the codec, which refuses them."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    seen: set[int] = set()  # (a value holding itself: the codec refuses it)
    while stack:
        container, path = stack.pop()
        if id(container) in seen:
            continue
        seen.add(id(container))
        is_dict = isinstance(container, Mapping)
        if is_dict:
            for k in container:
                if type(k) not in _EXACT and isinstance(k, _FLATTENED):
                    _refuse_type(k, path, namespace, key, as_key=True)
        pairs = container.items() if is_dict else enumerate(container)
        for slot, child in pairs:
            cls = type(child)
            if cls in _EXACT:
                continue
            if cls in _NESTING:
                stack.append((child, path + (slot,)))
            elif isinstance(child, (*_FLATTENED, bytearray, memoryview)):
                _refuse_type(child, path + (slot,), namespace, key)


def _refuse_type(obj: Any, path: tuple, namespace: tuple, key: str,
                 as_key: bool = False) -> None:
    cls = type(obj)
    base = next((b for b in _FLATTENED if isinstance(obj, b)), bytes)
    where = (f"a key of value{_slot_text(path)}" if as_key else f"value{_slot_text(path)}")
    raise TypeError(
        f"WalstoreStore refuses to store item {tuple(namespace)!r}/{key!r}: {where} is a "
        f"{cls.__module__}.{cls.__qualname__}, which msgpack stores as a plain "
        f"{base.__name__}, so it would come back as another type; nothing was written "
        f"(store a plain {base.__name__}: {base.__name__}(x))")


def _value(rec: dict) -> dict:
    """An item record's value, tuples given back."""
    marks = rec.get("tp")
    return rec["v"] if marks is None else _with_tuples(rec["v"], marks)


# ---- filters (LangGraph's JSONB-like comparison, as InMemoryStore applies it) -----------
def _filter_matches(value: dict, flt: dict) -> bool:
    """A search ``filter``: every top-level entry names a field of the item's value (a
    field name may begin with ``$``: operators are recognised only inside a field's
    value dict, never at the top level), as InMemoryStore's ``filter_func``."""
    return all(_matches(value.get(field), wanted) for field, wanted in flt.items())


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        if any(k.startswith("$") for k in wanted):
            return all(_compare(value, op, operand) for op, operand in wanted.items())
        return isinstance(value, dict) and all(_matches(value.get(k), v)
                                               for k, v in wanted.items())
    if isinstance(wanted, (list, tuple)):
        return (isinstance(value, (list, tuple)) and len(value) == len(wanted)
                and all(_matches(a, b) for a, b in zip(value, wanted)))
    return value == wanted


_ORDERINGS = {"$gt": float.__gt__, "$gte": float.__ge__, "$lt": float.__lt__,
              "$lte": float.__le__}


def _compare(value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return value == operand
    if op == "$ne":
        return value != operand
    if op in _ORDERINGS:
        return _ORDERINGS[op](float(value), float(operand))
    raise ValueError(f"Unsupported operator: {op}")


def _namespace_matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        pairs = zip(namespace, path)
    elif condition.match_type == "suffix":
        pairs = zip(reversed(namespace), reversed(path))
    else:
        raise ValueError(f"Unsupported match type: {condition.match_type}")
    return all(p == "*" or label == p for label, p in pairs)


def _writer_scope(rec: Any) -> Any:
    """The scope the item's writer recorded (``s``; None: written in none)."""
    scope = rec.get("s") if isinstance(rec, dict) else None
    return tuple(scope) if isinstance(scope, list) else scope


def _upkeep_groups(records: dict[bytes, dict]) -> dict[Any, list[bytes]]:
    """Keys grouped by the scope their item's writer recorded: TTL upkeep of an item
    runs in its writer's scope (``_upkeep_scope``)."""
    groups: dict[Any, list[bytes]] = {}
    for key, rec in records.items():
        groups.setdefault(_writer_scope(rec), []).append(key)
    return groups


def _upkeep_scope(scope: Any) -> Any:
    """The ``scope=`` of an upkeep transaction for items of writer scope ``scope``: an
    item written in no scope is kept up in none, never in the scope provider's (the graph
    thread whose node read or swept it: its rewind moved the app-wide item's expiry back,
    or was refused once the app updated the item)."""
    return NO_SCOPE if scope is None else scope


class WalstoreStore(BaseStore):
    """LangGraph ``BaseStore`` over a walstore store (see the module doc).

    ``WalstoreStore(store, ttl=None, key_prefix=b"lg")``; pass it to
    ``builder.compile(checkpointer=WalstoreSaver(store), store=WalstoreStore(store))``.
    The store owns the keys starting with ``key_prefix + b"\\x01"`` and ``b"\\x02"``.
    """

    supports_ttl = True

    def __init__(self, store: Any, *, ttl: TTLConfig | None = None,
                 key_prefix: bytes = b"lg", txn_meta: bool = True) -> None:
        _check_store(store, "WalstoreStore")
        if not isinstance(key_prefix, (bytes, bytearray)) or not key_prefix:
            raise TypeError("key_prefix must be non-empty bytes")
        if ttl and ttl.get("default_ttl") is not None:
            _check_ttl(ttl["default_ttl"], "the ttl config's default_ttl",
                       "no store was made")
        self.store = store
        self.ttl_config = ttl
        self.keys = MemoryKeys(bytes(key_prefix))
        self.txn_meta = txn_meta
        self._sweeper: threading.Thread | None = None
        self._sweeper_stop = Flag()  # (walstore.signals: set by close in the main thread)
        self._sweeper_futures: list[concurrent.futures.Future] = []
        self._sweeper_futures_done = True
        self._sweeper_lock = threading.Lock()

    # ---- batches ------------------------------------------------------------------------
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` in one walstore transaction: reads see the state before the
        batch; the last put of a (namespace, key) wins (as InMemoryStore).

        A batch without puts reads at one snapshot (a transaction rolled back: it cannot
        conflict) and then renews the TTL of the items it read with ``refresh_ttl`` in a
        transaction of its own (none on a read-only store: the items keep their
        expiry).  In a batch with puts, an item read with ``refresh_ttl`` that another
        scope wrote (another graph thread, or none) is renewed after the batch commits,
        in its writer's scope, as a read-only batch does.  A renewal that cannot be
        written (a full disk, a failed fsync) leaves those items their expiry: the
        batch's answers, and its committed puts, stand.  A conflict
        (another writer got to the same item first) is retried, never raised: writers of
        one item in this process take turns."""
        ops = list(ops)
        for op in ops:
            validate_op_namespace(op)
            if isinstance(op, PutOp) and op.value is not None:
                if op.ttl is not None:
                    _check_ttl(op.ttl)
                if isinstance(op.value, dict) and type(op.value) is not dict:
                    _refuse_type(op.value, (), op.namespace, op.key)  # (the item's own)
                if isinstance(op.value, Mapping):  # (else _put's dict() says what it is)
                    _refuse_changed_types(op.value, op.namespace, op.key)
        if not any(isinstance(op, PutOp) for op in ops):
            results, touched = self._read_batch(ops)
            # a read-only store (opened readonly=True, a replica, or turned read-only by a
            # failed fsync) cannot renew expiries: the items read keep the expiry their
            # writer gave them (the refresh raised ReadOnlyError, and the read's answer
            # was lost, for every item with a TTL)
            if touched and not self.store.readonly:
                self._renew(touched)
            return results
        meta = {"langgraph": "store"} if self.txn_meta else None
        keys = [self.keys.item(op.namespace, op.key) for op in ops
                if isinstance(op, (PutOp, GetOp))]
        with _ItemLocks(keys):
            for attempt in range(_WRITE_RETRIES + 1):
                tx = self.store.transaction(meta=meta)
                others: dict[bytes, dict] = {}
                try:
                    with tx:
                        results = self._batch(tx, ops, others)
                    break
                except ConflictError:
                    if attempt >= _WRITE_RETRIES:
                        raise
                    _backoff(attempt)
        if others:  # (after the item locks are released: _refresh_scope takes them)
            self._renew(others)  # (the batch committed: its outcome stands)
        return results

    def _read_batch(self, ops: list[Op]) -> tuple[list[Result], dict[bytes, dict]]:
        """The results of a batch without puts, and the items to refresh."""
        for attempt in range(_RETRIES + 1):
            tx = self.store.transaction(meta=None, scope=NO_SCOPE)  # (reads only)
            try:
                touched: dict[bytes, dict] = {}
                return self._reads(tx, ops, _now_us(), touched), touched
            except ConflictError:  # (SnapshotTooOld: history trimmed under a long read)
                if attempt >= _RETRIES:
                    raise
            finally:
                if tx.state == "active":
                    tx.rollback()
        raise AssertionError("unreachable")  # pragma: no cover

    def _renew(self, touched: dict[bytes, dict]) -> None:
        """``_refresh_items`` after a batch's reads (and its commit): a refresh that cannot
        be written (a full disk; a failed fsync, the store read-only from then on) leaves
        the items the expiry they had, as on a read-only store, and is no failure of the
        batch.  (It raised out of ``batch``: a get lost its answer to a WalWriteError or
        a CommitOutcomeUnknown, and a batch whose puts had committed was reported failed,
        "nothing of it was logged" — audit 67.)  The failure is said, as a RuntimeWarning
        naming the items and the cause (it was swallowed without a word: the items went
        on to expire on their old schedule unseen, audit 68)."""
        try:
            self._refresh_items(touched)
        except WalstoreError as e:
            named = []
            for key, rec in list(touched.items())[:3]:
                try:
                    named.append("{!r}/{!r}".format(*self._names(key, rec)))
                except (KeyError, IndexError, TypeError, ValueError):  # (not its layout)
                    named.append(repr(key))
            more = f" and {len(touched) - 3} more" if len(touched) > 3 else ""
            warnings.warn(f"walstore store {self.store.path}: renewing the TTL of "
                          f"{', '.join(named)}{more} on read failed "
                          f"({type_and_message(e)}); the read's answer stands, and the "
                          f"items keep the expiry they had", RuntimeWarning, stacklevel=3)

    def _refresh_items(self, touched: dict[bytes, dict]) -> None:
        """Renew the TTL of items a read returned, each as it is now: one transaction per
        scope of the items' writers (``_upkeep_groups``)."""
        for scope, keys in _upkeep_groups(touched).items():
            self._refresh_scope(scope, keys)

    def _refresh_scope(self, scope: Any, touched: list[bytes]) -> None:
        meta = {"langgraph": "store ttl refresh"} if self.txn_meta else None

        def refresh(tx):
            now = _now_us()
            for key in touched:
                rec = tx.get(key)
                if rec is not None and rec.get("t") is not None:
                    self._refresh(tx, key, rec, now)
        with _ItemLocks(touched):
            for attempt in range(_WRITE_RETRIES + 1):
                tx = self.store.transaction(meta=meta, scope=_upkeep_scope(scope))
                try:
                    with tx:
                        refresh(tx)
                    return
                except ConflictError:
                    if attempt >= _WRITE_RETRIES:
                        # every try met another writer of these items; each such writer
                        # (a put, a refresh, a delete, the sweeper) set the item's expiry
                        # itself just now, so there is nothing left to renew
                        return
                    _backoff(attempt)

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        ops = list(ops)
        # a cancelled batch still finishes (its puts, deletes, TTL refreshes): the caller
        # learns of the cancellation after, never of a write that lands later
        return await finish_despite_cancel(lambda: self.batch(ops))

    def _reads(self, tx: Any, ops: list[Op], now: int, touched: dict,
               puts: dict[bytes, PutOp] | None = None) -> list[Result]:
        results: list[Result] = []
        for op in ops:
            if isinstance(op, GetOp):
                results.append(self._get(tx, op, now, touched))
            elif isinstance(op, SearchOp):
                results.append(self._search(tx, op, now, touched))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(tx, op, now))
            elif isinstance(op, PutOp) and puts is not None:
                puts[self.keys.item(op.namespace, op.key)] = op
                results.append(None)
            else:
                raise ValueError(f"Unknown operation type: {type(op)}")
        return results

    def _batch(self, tx: Any, ops: list[Op], others: dict[bytes, dict]) -> list[Result]:
        """Run ``ops`` in ``tx``; items read with ``refresh_ttl`` (and not put) whose
        writer's scope is not ``tx``'s go into ``others``: renewed in ``tx``, their refresh
        belonged to this batch's thread, and the writer thread's rewind met it as a
        stranger's later write (RevertConflict)."""
        now = _now_us()
        puts: dict[bytes, PutOp] = {}
        touched: dict[bytes, dict] = {}   # items read with refresh_ttl: key -> record
        results = self._reads(tx, ops, now, touched, puts)
        for key, rec in touched.items():
            if key in puts:
                continue
            if _writer_scope(rec) == tx.scope:
                self._refresh(tx, key, rec, now)
            else:
                others[key] = rec
        for key, op in puts.items():
            self._put(tx, key, op, now)
        return results

    # ---- reading ------------------------------------------------------------------------
    def _omit(self, rec: dict, now: int) -> bool:
        return bool(self.ttl_config and self.ttl_config.get("omit_expired")
                    and rec.get("e") is not None and rec["e"] <= now)

    def _names(self, key: bytes, rec: dict) -> tuple[tuple[str, ...], str]:
        namespace, name = self.keys.parse_item(key)
        return (tuple(rec["ns"]) if namespace is None else namespace,
                rec["k"] if name is None else name)

    def _get(self, tx: Any, op: GetOp, now: int, touched: dict) -> Item | None:
        key = self.keys.item(op.namespace, op.key)
        rec = tx.get(key)
        if rec is None or self._omit(rec, now):
            return None
        if op.refresh_ttl and rec.get("t") is not None:
            touched[key] = rec
        return Item(value=_value(rec), key=op.key, namespace=tuple(op.namespace),
                    created_at=_when(rec["c"]), updated_at=_when(rec["u"]))

    def _search(self, tx: Any, op: SearchOp, now: int, touched: dict) -> list[SearchItem]:
        # With a non-negative offset and limit the page is matches offset..offset+limit,
        # and only the page is kept (a filtered search kept every match of the
        # namespace, values decoded, before slicing: memory grew with the namespace, not
        # with the page).  Without a filter the scan stops at the page's end; with one it
        # goes on testing the filter, not keeping, so a filter that fails on a later item
        # (``$gt`` on a str) raises as InMemoryStore's does.  A negative offset or limit
        # is a Python slice bound, as InMemoryStore applies it: every match is kept.
        paged = min(op.offset, op.limit) >= 0
        if paged:  # (a float bound: TypeError, as InMemoryStore's slice raises)
            end = operator.index(op.offset) + operator.index(op.limit)
        else:
            end = None
        found: list[tuple[bytes, dict, Any]] = []
        matched = 0
        if end != 0 or op.filter:
            for key, rec in tx.scan(prefix=self.keys.namespace(op.namespace_prefix)):
                if self._omit(rec, now):
                    continue
                value = None  # (given back below, for the page only)
                if op.filter:
                    value = _value(rec)  # (filtered as given back: a tuple is no list)
                    if not _filter_matches(value, op.filter):
                        continue
                matched += 1
                if not paged or op.offset < matched <= end:
                    found.append((key, rec, value))
                if matched == end and not op.filter:
                    break
        page = found if paged else found[op.offset:op.offset + op.limit]
        out = []
        for key, rec, value in page:
            if value is None:
                value = _value(rec)
            namespace, name = self._names(key, rec)
            if op.refresh_ttl and rec.get("t") is not None:
                touched[key] = rec
            out.append(SearchItem(namespace=namespace, key=name, value=value,
                                  created_at=_when(rec["c"]), updated_at=_when(rec["u"])))
        return out

    def _list_namespaces(self, tx: Any, op: ListNamespacesOp,
                         now: int) -> list[tuple[str, ...]]:
        conditions = tuple(op.match_conditions or ())
        fixed: list[str] = []  # the leading labels every prefix condition pins down
        for cond in conditions:
            if cond.match_type == "prefix":
                lead = []
                for label in cond.path:
                    if label == "*":
                        break
                    lead.append(label)
                fixed = lead if len(lead) > len(fixed) else fixed
        start = self.keys.namespace(tuple(fixed))
        end = prefix_end(start)
        depth = op.max_depth
        # A max_depth >= 0 truncates every namespace under a found one's first ``depth``
        # labels to the same answer: the scan skips that whole key range (it visited
        # every namespace under it: max_depth=1 over 20,000 users' namespaces read
        # 20,000 to answer one).  Each answer is then found once, and only the page
        # (the offset + limit smallest, in Python's order) is held, not every namespace.
        skips = depth is None or depth >= 0

        def found() -> Iterable[tuple[str, ...]]:
            at = start
            while True:
                row = self._first_live(tx, at, end, now)
                if row is None:
                    return
                ns_bytes = self.keys.namespace_of(row[0])
                namespace, _name = self._names(row[0], row[1])
                at = self.keys.deeper(ns_bytes)
                if not all(_namespace_matches(c, namespace) for c in conditions):
                    continue
                if depth is None:
                    yield namespace
                    continue
                yield namespace[:depth]
                if skips and len(namespace) >= depth:
                    after = prefix_end(self.keys.namespace(namespace[:depth]))
                    if after is None or (end is not None and after >= end):
                        return
                    at = after

        if skips and min(op.offset, op.limit) >= 0:
            return heapq.nsmallest(op.offset + op.limit, found())[op.offset:]
        return sorted(set(found()))[op.offset:op.offset + op.limit]

    def _first_live(self, tx: Any, start: bytes, end: bytes | None,
                    now: int) -> tuple[bytes, dict] | None:
        """The first item at or after ``start`` that is not an omitted expired one."""
        rows = tx.scan(start=start, end=end)
        try:
            for key, rec in rows:
                if not self._omit(rec, now):
                    return key, rec
            return None
        finally:
            rows.close()

    # ---- writing ------------------------------------------------------------------------
    def _expiry(self, tx: Any, key: bytes, old: dict | None, new_expiry: int | None) -> None:
        if old is not None and old.get("e") is not None and old["e"] != new_expiry:
            tx.delete(self.keys.expiry_entry(old["e"], key))
        if new_expiry is not None:
            tx.put(self.keys.expiry_entry(new_expiry, key), b"")

    def _put(self, tx: Any, key: bytes, op: PutOp, now: int) -> None:
        old = tx.get(key)
        if op.value is None:
            if old is not None:
                tx.delete(key)
                self._expiry(tx, key, old, None)
            return
        # (an update is never dated before the version it replaces: after a step back of
        # the clock, updated_at came before created_at: audit 67)
        rec: dict = {"v": dict(op.value), "c": now, "u": now} if old is None else \
            {"v": dict(op.value), "c": old["c"], "u": max(now, old["u"])}
        marks = _tuple_marks(rec["v"])
        if marks is not None:  # (where the tuples are: msgpack writes them as arrays)
            rec["tp"] = marks
        if op.ttl is not None:
            rec["t"] = float(op.ttl)
            rec["e"] = now + int(op.ttl * 60_000_000)
        if self.keys.needs_names(op.namespace, op.key):
            rec["ns"], rec["k"] = list(op.namespace), op.key
        if tx.scope is not None:  # the writer's thread: TTL upkeep runs in its scope
            rec["s"] = tx.scope
        try:
            tx.put(key, rec)
        except (TypeError, ValueError) as e:  # (over 16 MiB, an int beyond 64 bits, a set)
            if type(e) not in (TypeError, ValueError):  # (TransactionTooLarge ...: as is)
                raise
            # named as the caller put it, not by walstore's key for it (in a batch of
            # many puts, which one failed could not be told); the batch writes nothing
            item = f"item {tuple(op.namespace)!r}/{op.key!r}"
            raise type(e)(str(e).replace(f"value for key {key!r}", f"the value of {item}", 1)
                          + "; nothing of the batch was written") from None
        self._expiry(tx, key, old, rec.get("e"))

    def _refresh(self, tx: Any, key: bytes, rec: dict, now: int) -> None:
        expiry = now + int(rec["t"] * 60_000_000)
        if expiry != rec.get("e"):
            tx.put(key, {**rec, "e": expiry})
            self._expiry(tx, key, rec, expiry)

    # ---- TTL ------------------------------------------------------------------------------
    def sweep_ttl(self) -> int:
        """Delete every item whose TTL has expired; returns how many were deleted."""
        deleted = 0
        while True:
            now = _now_us()
            cut = self.keys.expiry_entry(now + 1, self.keys.items)
            found = self._expired(cut)
            for scope, entries in _upkeep_groups(found).items():
                deleted += self._sweep_scope(scope, entries, found)
            if len(found) < _SWEEP_BATCH:
                return deleted

    def _expired(self, cut: bytes) -> dict[bytes, dict]:
        """Up to _SWEEP_BATCH expiry entries before ``cut``: entry -> the item's writer
        scope as a record (``{"s": scope}``; {} when written in none or gone), read at one
        snapshot.  Only the scope is kept: the whole records held a batch's values at
        once (80 expired items of 500 KB: 41 MB; a batch is up to 512 items of up to 16
        MiB)."""
        with self.store.transaction(scope=NO_SCOPE) as tx:  # (reads only)
            found: dict[bytes, dict] = {}
            for entry, _v in tx.scan(start=self.keys.expiry, end=cut):
                _at, key = self.keys.parse_expiry(entry)
                rec = tx.get(key)
                found[entry] = ({"s": rec["s"]} if isinstance(rec, dict) and "s" in rec
                                else {})
                if len(found) >= _SWEEP_BATCH:
                    break
            tx.rollback()
        return found

    def _sweep_scope(self, scope: Any, entries: list[bytes], found: dict) -> int:
        """Delete the expired items of one writer's scope, in that scope (a thread's
        rewind then counts the sweep of its own items as its own, not as a stranger's
        later write: a sweep, or a TTL refresh by another thread's read, made the rewind
        of the writer's thread raise RevertConflict)."""
        def sweep(tx):
            n = 0
            for entry in entries:
                if tx.get(entry) is None:
                    continue  # (swept or refreshed meanwhile)
                _at, key = self.keys.parse_expiry(entry)
                tx.delete(entry)
                if tx.get(key) is not None:
                    tx.delete(key)
                    n += 1
            return n
        for attempt in range(_WRITE_RETRIES + 1):
            tx = self.store.transaction(meta={"langgraph": "store ttl sweep"},
                                        scope=_upkeep_scope(scope))
            try:
                with tx:
                    return sweep(tx)
            except ConflictError:
                if attempt >= _WRITE_RETRIES:
                    raise
                _backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def start_ttl_sweeper(self, sweep_interval_minutes: float | None = None
                          ) -> concurrent.futures.Future:
        """Sweep expired items every ``sweep_interval_minutes`` (default: the TTL
        config's ``sweep_interval_minutes``, else 5) in a daemon thread.

        As SqliteStore's sweeper: a sweep that fails (a conflict its retries did not get
        past, e.g. an expired item held by an in-doubt prepared transaction; a full disk)
        is reported (``RuntimeWarning``) and the next interval sweeps again; the returned
        Future's ``cancel()`` stops the sweeper, as ``stop_ttl_sweeper()`` does, and so
        does closing the store.  (The thread ended at the first failed sweep: expired
        items were never swept again, the error left in a Future nobody reads.)"""
        interval = sweep_interval_minutes or (self.ttl_config or {}).get(
            "sweep_interval_minutes") or 5
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._sweeper_lock:
            stop = self._sweeper_stop
            if self._sweeper is not None and self._sweeper.is_alive() \
                    and not self._sweeper_futures_done and not stop.is_set():
                # (running: this Future's cancel() stops it, as SqliteStore's, and it is
                # done when the sweeper ends)
                done.add_done_callback(lambda f: stop.set() if f.cancelled() else None)
                self._sweeper_futures.append(done)
                return done
            # (a flag of its own: one still stopping is never revived by a clear)
            stop = self._sweeper_stop = Flag()
            futures = self._sweeper_futures = [done]
            self._sweeper_futures_done = False
        done.add_done_callback(lambda f: stop.set() if f.cancelled() else None)

        def finish(error: BaseException | None = None) -> None:
            with self._sweeper_lock:
                if self._sweeper_futures is futures:  # (not a newer sweeper's)
                    self._sweeper_futures_done = True
                for f in futures:
                    try:
                        if error is None:
                            f.set_result(None)
                        else:
                            f.set_exception(error)
                    except concurrent.futures.InvalidStateError:
                        pass  # (cancelled)

        def loop():
            try:
                while not stop.wait(interval * 60):
                    try:
                        self.sweep_ttl()
                    except StoreClosed:
                        break  # (the store is closed: nothing more to sweep)
                    except Exception as e:
                        if self.store.closed:
                            break
                        warnings.warn(f"walstore TTL sweep of store {self.store.path} "
                                      f"failed ({type_and_message(e)}); expired items "
                                      f"stay until the next sweep, in "
                                      f"{interval * 60:g} s", RuntimeWarning, stacklevel=1)
                finish()
            except BaseException as e:  # reported through the future
                finish(e)
        thread = threading.Thread(target=loop, name="walstore-ttl-sweeper", daemon=True)
        try:
            thread.start()
        except RuntimeError as e:  # "can't start new thread" (a thread or process limit):
            # kept unstarted, it made stop_ttl_sweeper() (and so a later start) raise
            # "cannot join thread before it is started"
            from ...engine.engine import thread_start_error
            finish(e)  # (its Future is done, with the error)
            raise thread_start_error(e, "starting the TTL sweeper",
                                     "nothing is swept; start it again once threads "
                                     "can start") from e
        self._sweeper = thread
        return done

    def stop_ttl_sweeper(self, timeout: float | None = None) -> bool:
        """Stop the sweeper thread; True when it has stopped."""
        if self._sweeper is None:
            return True
        self._sweeper_stop.set()
        self._sweeper.join(timeout)
        stopped = not self._sweeper.is_alive()
        if stopped:
            self._sweeper = None
        return stopped
