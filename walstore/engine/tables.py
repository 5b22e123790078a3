"""The materialized tables: their row layouts, and how each log event changes them.

LMDB is a pure function of the log: every table row is written by applying events in
LSN order (:mod:`walstore.engine.apply`).  This module holds the pure part of that
function, shared by the LMDB applier and by views that fold events not yet applied
(the in-memory tail of a live store, a read-only follower's tail):

- ``hist`` rows: ``u16 len(key) | key | u64 commit LSN`` -> msgpack ``[txid, before]``
  (the key's value just *before* that commit; None: absent).  The value a version set is
  the next newer version's before-image, or, for the newest, the current value in
  ``data``: no value is stored twice.
- ``txns`` rows: the log entry of a committed transaction (``txn_row``).
- ``actions`` rows: one per external side effect (``action_changes``); states
  ``in-flight`` (intent logged, its transaction not ended), ``committed``, ``pending``
  (compensation owed), ``failed``, ``compensated``, ``resolved``, ``needs-redo``;
  ``held``: owed but never run automatically (a copy of another store).  The ``owed``
  table indexes the rows in flight, pending or failed (``OWED_INDEX_STATES``).

- file rows (reversible files): ``workspaces``, ``fsteps``, ``fversions``, ``fchanges``,
  ``fconflicts`` — their layouts are at the end of this module.

A row whose bytes do not decode (damage inside a value: LMDB's pages are sound) is a
``CorruptionError`` naming the table and the row's key (``unpack_row``, ``row_damaged``):
every reader of LMDB rows decodes through them, never through a bare msgpack call.  The
u64 rows (``U64_KEYS``, ``U64_VALUES``, ``meta``'s counters) decode through
``lmdb_state.from_u64``, which names them the same way (``u64_damaged``): a key or value
of another length than 8.

Invariants: ``action_changes`` depends only on the event and the rows it names, so
applying the same events to the same rows gives the same rows (REDO is idempotent); a
final state (``compensated``, ``resolved``) is never left except by ``redo`` marking.
"""
from __future__ import annotations

import itertools
import operator
import struct
from typing import Any, Callable

import msgpack

from ..codec import DECODE_ERRORS, decode_key, pack, unpack
from ..errors import CorruptionError, type_and_message
from ..log.format import RecordType
from ..log import records
from ..log.records import Event, commit_ts, extend_map

_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")

IN_FLIGHT, COMMITTED, PENDING, FAILED = "in-flight", "committed", "pending", "failed"
# an action row's error between its live transaction's ABORT (or ROLLBACK_PREPARED) and the
# record of its compensation's outcome: the writer is running it (``compensation_under_way``)
ROLLED_BACK = "its transaction rolled back"
COMPENSATED, RESOLVED, NEEDS_REDO = "compensated", "resolved", "needs-redo"
OWED_STATES = (PENDING, FAILED)
FINAL_STATES = (COMPENSATED, RESOLVED)
# the ``owed`` table: action id -> b"" for every action row in one of these states (owed,
# or owed once its transaction ends without committing: what settle and
# ``pending_compensations()`` read, never every row).  The applier keeps it in the LMDB
# transaction that writes the rows, and notes there (``OWED_STAMP``: u64) the ``applied``
# LSN it is exact at; a stamp other than ``meta`` ``applied`` (a store written before the
# table, or since by a walstore without it) means "not exact": readers scan every action
# row instead, and the next writable open builds it again (``Applier.build_owed_index``).
OWED_INDEX_STATES = frozenset({IN_FLIGHT, PENDING, FAILED})
OWED_STAMP = b"~applied"  # (no action id starts so: an id is "<txid>.<seq>")


# ---- decoding rows read from LMDB ----------------------------------------------------
def unpack_row(raw: bytes, table: str, key: bytes, file: str | None = None,
               shape: bool = True) -> Any:
    """Row ``key`` of ``table`` as LMDB holds it (``raw``), decoded; CorruptionError naming
    the table, the key and ``file`` (the LMDB data file: ``LmdbState.data_file``) when its
    bytes do not decode, or decode to no row of ``table`` (``ROW_CHECKS``).  (A try costs
    nothing when nothing is raised: callers on a hot path keep their own decode in a try
    and raise ``row_damaged`` instead; ``shape=False``: such a caller that uses the row
    inside a try of its own, raising ``row_damaged`` on a TypeError/ValueError there.)"""
    try:
        row = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except DECODE_ERRORS as e:  # (the types msgpack raises on damaged bytes)
        raise row_damaged(table, key, e, file) from e
    check = ROW_CHECKS.get(table if table != "meta" else bytes(key)) if shape else None
    if check is not None:
        try:
            check(row)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            why = ValueError(f"not a row walstore writes: {e}")
            raise row_damaged(table, key, why, file) from e
    return row


def row_damaged(table: str, key: bytes, e: BaseException, file: str | None = None
                ) -> CorruptionError:
    """The CorruptionError of row ``key`` of ``table`` whose value did not decode (``e``;
    raise it ``from e``)."""
    cause = e.__cause__ if isinstance(e, CorruptionError) and e.__cause__ else e
    return CorruptionError(
        f"LMDB table {table!r}: the row of {describe_row_key(table, key)} does not decode "
        f"({type_and_message(cause)}): the state is damaged", file=file)


# ---- the shape of a decoded row ---------------------------------------------------------
# Bytes that decode can still be no row walstore writes (damage that yields valid msgpack,
# a file edited by hand, a store written by a buggy build): a str where a dict belongs, an
# LSN that is a str, a ``w`` that is an int.  Readers index rows without a try, so such a
# row escaped as a raw TypeError / AttributeError / IndexError from ``log()``, ``at()``,
# ``history()``, ``actions()``, ``rewind(dry_run=True)`` ... (probe-audit60).  Each check
# below raises ValueError naming the field; ``unpack_row`` turns it into the row's
# CorruptionError (and ``verify``, which decodes every row through it, lists it).  They
# check what readers index (types of the fields they use), never more: a few isinstance
# calls per row, O(its fields).

_U64_END = 1 << 64


def _is_u64(x: Any) -> bool:
    return type(x) is int and 0 <= x < _U64_END


def _need_map(row: Any) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"a {type(row).__name__} where a map belongs")
    return row


def _need_u64(row: dict, *names: str, required: bool = True) -> None:
    for name in names:
        if name in row or required:
            if not _is_u64(row.get(name)):
                raise ValueError(f"field {name!r} is not an unsigned integer "
                                 f"({row.get(name)!r:.40})")


def _need_ts(row: dict) -> None:
    ts = row.get("ts", 0.0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ValueError(f"field 'ts' is not a time ({ts!r:.40})")


_PLAIN_TXN_ROW = 6  # (tx, lsn, end, ts, meta, w: a plain commit's row; more: check_fields)


def _txns_row(row: Any) -> None:
    # (the commit path's range-conflict walk decodes these rows: the plain case inline)
    _need_map(row)
    tx, lsn, end = row.get("tx"), row.get("lsn"), row.get("end")
    if not (type(tx) is int and type(lsn) is int and type(end) is int
            and 0 <= tx < _U64_END and 0 <= lsn < _U64_END and 0 <= end < _U64_END):
        _need_u64(row, "tx", "lsn", "end")
    if type(row.get("ts")) is not float:
        _need_ts(row)
    w = row.get("w", ())
    if type(w) is not list and w != ():
        raise ValueError("field 'w' is not a list of [key, ...] entries")
    for e in w:
        if type(e) is not list or not e or type(e[0]) is not bytes:
            raise ValueError("field 'w' is not a list of [key, ...] entries")
    if len(row) > _PLAIN_TXN_ROW:
        records.check_fields(RecordType.COMMIT, row)
        _need_u64(row, "rewound_to", required=False)


_ACTION_STATES = frozenset({IN_FLIGHT, COMMITTED, PENDING, FAILED, COMPENSATED, RESOLVED,
                            NEEDS_REDO})


def _actions_row(row: Any) -> None:
    _need_map(row)
    if not records._action_id(row.get("id")):
        raise ValueError(f"field 'id' is not an action id ({row.get('id')!r:.40})")
    _need_u64(row, "tx")
    _need_u64(row, "attempts", "lsn", "undone_by", "marked_by", required=False)
    _need_ts(row)
    if row.get("state") not in _ACTION_STATES:
        raise ValueError(f"field 'state' is not an action state ({row.get('state')!r:.40})")
    for name in ("compensate", "name", "key", "error", "raised"):
        v = row.get(name)
        if v is not None and not isinstance(v, str) and not (
                name == "error" and row.get("state") == RESOLVED):  # (an old resolve
            raise ValueError(f"field {name!r} is not a str ({v!r:.40})")  # note: records)


def _points_row(row: Any) -> None:
    _need_map(row)
    _need_u64(row, "lsn")
    _need_ts(row)


def _hist_row(row: Any) -> None:
    if (type(row) is not list or len(row) != 2 or not _is_u64(row[0])
            or not (row[1] is None or type(row[1]) is bytes)):
        raise ValueError(f"not [txid, before-image] ({row!r:.60})")


def _fversions_row(row: Any) -> None:
    from ..files.entries import Entry
    if type(row) is not list or len(row) != 3 or not _is_u64(row[0]):
        raise ValueError(f"not [txid, before row, after row] ({row!r:.60})")
    Entry.from_row(row[1])
    Entry.from_row(row[2])


def _fsteps_row(row: Any) -> None:
    _need_map(row)
    if "steps" in row:  # (a FILE_STEPS row: a watch's changes say op "watch" too)
        records.check_fields(RecordType.FILE_STEPS, row)
    else:  # (a WATCH_BEGIN's: its manifest)
        records.check_fields(RecordType.WATCH_BEGIN, row)
    _need_ts(row)


def _workspaces_row(row: Any) -> None:
    _need_map(row)
    if "lsn" in row or "ignore" in row:  # (a WATCH_BEGIN before its WORKSPACE: root only)
        records.check_fields(RecordType.WORKSPACE, row)
        _need_u64(row, "lsn", required=False)
    elif not isinstance(row.get("root"), bytes):
        raise ValueError("field 'root' is not a path (bytes)")
    m = row.get("manifest")
    if m is not None and not isinstance(m, str):
        raise ValueError("field 'manifest' is not a digest")
    _need_ts(row)


def _twophase_row(row: Any) -> None:
    _need_map(row)
    _need_u64(row, "tx")
    records.parse_writes(row)
    records.check_fields(RecordType.PREPARE, row)
    for name in ("r", "rr"):
        if not isinstance(row.get(name, []), list):
            raise ValueError(f"field {name!r} is not a list")
    if not isinstance(row.get("extra") or {}, dict):
        raise ValueError("field 'extra' is not a map")
    _need_ts(row)


def _fconflicts_row(row: Any) -> None:
    _need_map(row)
    _need_u64(row, "tx")
    records.check_fields(RecordType.FILE_CONFLICT, row)
    _need_ts(row)


def _meta_ranges(width: int) -> Callable[[Any], None]:
    def check(row: Any) -> None:  # [[lsn,] lo, hi], ...: keys bytes, hi None = no end
        if type(row) is not list:
            raise ValueError(f"a {type(row).__name__} where a list belongs")
        for e in row:
            if (type(e) is not list or len(e) != width
                    or (width == 3 and not _is_u64(e[0]))
                    or type(e[-2]) is not bytes
                    or not (e[-1] is None or type(e[-1]) is bytes)):
                raise ValueError(f"an entry that is not [{'lsn, ' if width == 3 else ''}"
                                 f"lo, hi] ({e!r:.60})")
    return check


# table (or, for ``meta``, the row's key) -> its check
ROW_CHECKS: dict[Any, Callable[[Any], None]] = {
    "txns": _txns_row, "actions": _actions_row, "points": _points_row, "hist": _hist_row,
    "fversions": _fversions_row, "fsteps": _fsteps_row, "workspaces": _workspaces_row,
    "twophase": _twophase_row, "fconflicts": _fconflicts_row,
    b"erase_owed": _meta_ranges(2), b"recent_purges": _meta_ranges(3)}


# the LMDB rows that are msgpack (``unpack_row``; ``data``'s are values): table -> the
# (lo, hi) range of their keys; and the ``meta`` rows that are (its others are u64s)
PACKED_ROWS = {"txns": (b"", None), "actions": (b"", None), "points": (b"", None),
               "hist": (b"", None), "workspaces": (b"", None), "fsteps": (b"", None),
               "fversions": (b"", None), "fconflicts": (b"", None),
               "twophase": (b"p:", b"p;")}  # (apply.PREPARED_PREFIX; decisions are text)
PACKED_META = (b"erase_owed", b"recent_purges")  # (apply.ERASE_OWED, RECENT_PURGES)
# the tables whose keys are a u64 (txid or LSN) and those whose values are (a txid); every
# ``meta`` row not in PACKED_META is a u64 too (``applied``, ``next_txid``, ``horizon``...)
U64_KEYS = ("txns", "bylsn", "inflight", "aended", "fconflicts")
U64_VALUES = ("bylsn", "aended")


def u64_damaged(table: str, key: bytes, raw: bytes, is_key: bool = False,
                file: str | None = None) -> CorruptionError:
    """The CorruptionError of a u64 row of ``table`` (its key ``key``) whose key
    (``is_key``) or value ``raw`` is not 8 bytes long (raise it ``from`` the struct error).
    """
    what = "its key" if is_key else "its value"
    return CorruptionError(
        f"LMDB table {table!r}: the row of {describe_row_key(table, key)} does not decode "
        f"({what} is {len(raw)} bytes where a u64 (8) belongs): the state is damaged",
        file=file)


AS_OF = "data or hist"  # (a value read as of a point: the data row or a before-image)


def describe_row_key(table: str, key: bytes) -> str:
    """A row's key as a person reads it (for error messages: never raises)."""
    try:
        if table in ("data", AS_OF):
            return f"key {decode_key(key)!r}"
        if table in ("txns", "inflight", "aended", "bylsn", "fconflicts"):
            lsn = table in ("bylsn", "aended", "fconflicts")
            return f"{'LSN' if lsn else 'txid'} {_U64.unpack(key)[0]}"
        if table == "hist":
            k, lsn = split_hist_key(key)
            return f"key {decode_key(k)!r} at LSN {lsn}"
        if table in ("actions", "points", "twophase"):
            return f"{'action ' if table == 'actions' else ''}{key.decode('utf-8')!r}"
        if table == "meta":
            return f"{key.decode('utf-8')!r}"
    except Exception:
        pass
    return f"key {bytes(key)!r}"


# ---- history keys ---------------------------------------------------------------------
def hist_prefix(key: bytes) -> bytes:
    return _U16.pack(len(key)) + key


def hist_key(key: bytes, lsn: int) -> bytes:
    return _U16.pack(len(key)) + key + _U64.pack(lsn)


def key_damaged(table: str, raw: bytes, file: str | None = None) -> CorruptionError:
    """The CorruptionError of a key of ``table`` (one of MULTIPART_KEYS) whose parts do
    not add up to its length: damaged bytes (a raw struct.error before)."""
    return CorruptionError(
        f"LMDB table {table!r}: the key {bytes(raw[:64])!r}{'...' if len(raw) > 64 else ''} "
        f"({len(raw)} bytes) does not decode (its parts do not add up to its length): the "
        f"state is damaged", file=file)


def split_hist_key(raw: bytes) -> tuple[bytes, int]:
    """(key, LSN) of a ``hist`` key; CorruptionError when its parts do not add up."""
    if len(raw) < 10 or len(raw) != 10 + _U16.unpack_from(raw)[0]:
        raise key_damaged("hist", raw)
    return raw[2:-8], _U64.unpack_from(raw, len(raw) - 8)[0]


def is_version_of(raw: bytes, prefix: bytes) -> bool:
    return raw.startswith(prefix) and len(raw) == len(prefix) + 8


def txid_key(txid: int) -> bytes:
    return _U64.pack(txid)


# ---- transaction log rows -------------------------------------------------------------
TXN_ROW_FIELDS = ("actions", "scope", "compensate", "redo", "unredo", "gid", "reverts",
                  "rewound_to",
                  "purge", "purge_range", "files", "tags")


def txn_row(event: Event) -> dict:
    """The ``txns`` row of a commit event (what ``store.log()`` shows)."""
    b = event.body
    erased = "purge" in b  # a purge logs what was purged (its prefix), never the keys
    row = {"tx": event.txid, "lsn": event.lsn, "end": event.end, "ts": commit_ts(b),
           "meta": b.get("meta"),
           "w": [] if erased else [[k, None] for k, _v in event.writes or ()]}
    for f in TXN_ROW_FIELDS:
        if f in b:
            row[f] = b[f]
    return row


def plain_txn_row(event: Event, packed_body: bytes) -> bytes:
    """``pack(txn_row(event))`` of a plain commit (``event.packed_body``), without decoding
    its body: a plain body holds only ``tx``, ``ts`` (the clock's float), ``meta`` and
    perhaps ``scope`` (the pipeline writes all but ``scope`` for every commit), which
    ``txn_row`` copies as they are; the row adds ``lsn``, ``end`` and the keys."""
    writes = event.writes or ()
    packed_w = _packed_key_list(writes) if len(writes) >= _JOINED_KEYS else None
    if packed_w is None:
        tail = pack({"lsn": event.lsn, "end": event.end,  # (pairs pack as arrays)
                     "w": list(zip(map(_first, writes), _NONES))})
    else:  # (the same bytes: "w" last, its array packed by _packed_key_list)
        tail = b"".join((b"\x83", pack({"lsn": event.lsn, "end": event.end})[1:],
                         _W_KEY, packed_w))  # (a fixmap of three: its header, then them)
    n = packed_body[0] - 0x80
    if 0 <= n <= 12:  # a fixmap, as a plain body always is: the three entries join it
        return b"".join((_FIXMAP_3[n], packed_body[1:], tail[1:]))
    return extend_map(packed_body, unpack(tail))


def _packed_key_list(writes) -> bytes | None:
    """``pack([[k, None] for k, _v in writes])`` of many writes whose keys are all bytes
    of one length below 256 (a bulk load's, usually), joined in one C call: each pair is
    the same 3-byte head (a 2-array, a bin 8 of that length), the key, then nil: the
    keys joined with nil and the next head between them — no
    tuple per key (for the collector to scan, then free) and no packing of 100,000
    pairs one by one.  None when the keys are not so (the caller packs them)."""
    keys = list(map(_first, writes))
    lengths = set(map(len, keys))
    if len(lengths) != 1 or type(keys[0]) is not bytes:
        return None
    size = lengths.pop()
    if size >= 256:
        return None
    n = len(keys)
    try:
        body = bytes((0xC0, 0x92, 0xC4, size)).join(keys)
    except TypeError:  # (a key not bytes-like: packed the usual way)
        return None
    if len(body) != n * size + (n - 1) * 4:  # (a key of another type: not all bytes)
        return None
    head = (bytes((0x90 | n,)) if n < 16 else b"\xdc" + _U16.pack(n) if n < 0x10000
            else b"\xdd" + _U32.pack(n))
    return b"".join((head, b"\x92\xc4", bytes((size,)), body, b"\xc0"))


_JOINED_KEYS = 64  # from this many writes a plain commit's "w" is joined (_packed_key_list)
_W_KEY = pack("w")
_U32 = struct.Struct(">I")
_first = operator.itemgetter(0)
_NONES = itertools.repeat(None)  # (endless: zip stops at the keys' end)
_FIXMAP_3 = tuple(bytes((0x80 + n + 3,)) for n in range(13))  # a fixmap's header, 3 more


# ---- action rows ----------------------------------------------------------------------
class ActionRows(dict):
    """Action rows by id (the rows a fold changed so far) that know each transaction's ids
    too: ``items_of(txid)`` is that transaction's rows alone.  A pass over every changed
    row per ABORT made an apply batch, a recovery, or a view (``store.actions()``) of N
    rolled-back transactions cost N^2 (4,000 in one batch: 0.5 s; a view beside them:
    0.46 s).  Rows are only ever set, never removed."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        super().__init__()
        self._ids: dict[Any, dict[str, None]] = {}

    def __setitem__(self, aid: str, row: dict) -> None:
        dict.__setitem__(self, aid, row)
        self._ids.setdefault(row.get("tx"), {})[aid] = None

    def items_of(self, txid: Any) -> list[tuple[str, dict]]:
        """(id, row) of the rows whose ``tx`` is ``txid``, in the order they were first
        set (as a pass over the whole dict finds them)."""
        out = []
        for aid in self._ids.get(txid, ()):
            row = dict.__getitem__(self, aid)
            if row.get("tx") == txid:
                out.append((aid, row))
        return out


def action_prefix(txid: int) -> bytes:
    """Action ids are ``"<txid>.<seq>"``: the rows of one transaction share this prefix."""
    return f"{txid}.".encode()


def declares_no_compensation(row: dict) -> bool:
    """Whether an action row declares no compensation, so ending its transaction owes
    nothing.  Not a row recovery made for an action whose ACTION_INTENT was lost to damage
    (``intent_lost``): its compensator is unknown, not absent, and the action ran (its
    result survived) — a prepared transaction's rollback settled it as "resolved", the
    charge standing with nothing owed."""
    return not row.get("compensate") and not row.get("intent_lost")


def action_changes(event: Event, get_row: Callable[[str], dict | None],
                   rows_of_txid: Callable[[int], list[dict]]) -> list[dict]:
    """The action rows ``event`` creates or changes (whole new rows), given the current
    rows (``get_row(id)``, ``rows_of_txid(txid)``)."""
    t = event.type
    b = event.body if t != RecordType.COMMIT else None  # (a commit: see below)
    if t == RecordType.ACTION_INTENT:
        if get_row(str(b.get("id"))) is not None:
            return []  # REDO of an intent already applied
        row = {"id": str(b["id"]), "tx": event.txid, "name": b.get("name"),
               "args": b.get("args"), "result": None, "key": b.get("key", ""),
               "compensate": b.get("compensate"), "scope": b.get("scope"),
               "state": IN_FLIGHT, "error": None, "attempts": 0, "ts": b.get("ts", 0.0),
               "lsn": event.lsn}
        if b.get("intent_lost"):  # (recovery's, for an intent lost to damage: its
            row["intent_lost"] = True  # compensation is unknown, not absent)
        return [row]
    if t == RecordType.ACTION_RESULT:
        row = get_row(str(b.get("id")))
        if row is None:
            return []
        new = dict(row, result=b.get("result"), error=b.get("error"))
        if b.get("error") is not None:  # (what the body raised, kept past the ABORT's and
            new["raised"] = b["error"]  # the compensation's errors: Action.raised)
        return [new]
    if t == RecordType.COMMIT:  # reads only "actions", "crossed", "compensate", "redo",
        out = []                # "unredo" (apply skips commits with none of them: keep
        field = event.field     # apply._ACTION_FIELDS; a plain commit's body is not decoded)
        for a in field("actions", ()):
            row = get_row(a["id"]) or {}
            if row.get("state") in FINAL_STATES:
                continue  # compensated by a partial rollback before the commit
            new = dict(row)
            new.update(a)
            new["state"] = COMMITTED
            out.append(new)
        for aid in field("crossed", ()):  # rolled back to a savepoint: still in flight
            row = get_row(aid)            # means its compensation did not finish (an
            if row is not None and row.get("state") == IN_FLIGHT:  # interrupt): owed
                if declares_no_compensation(row):  # (declaring none, its "resolved" record
                    out.append(dict(row, state=RESOLVED,  # failed: nothing is owed)
                                    error="undone by a rollback to a savepoint; it "
                                          "declares no compensation"))
                    continue
                out.append(dict(row, state=PENDING,
                                error="a rollback to a savepoint undid it, and its "
                                      "compensation did not finish"))
        undone_by = f"undone by transaction {event.txid}"
        for aid in field("compensate", ()):
            row = get_row(aid)
            if row is not None and row.get("state") == COMMITTED:
                out.append(dict(row, state=PENDING, error=undone_by, undone_by=event.txid))
        for aid in field("redo", ()):
            row = get_row(aid)
            if row is not None:
                # (``marked_from``: how it ended before the mark, what ``unredo`` restores:
                # one resolved by hand read "compensated" after it, its note gone)
                prior = row.get("marked_from") if row.get("state") == NEEDS_REDO else \
                    [row.get("state"), row.get("error")]
                # (``marked_by``: redone by hand later — committed again — the row
                # outlives its transaction's trim while this undo is kept, as a
                # compensated one does while its claiming undo is: apply._trim_actions)
                out.append(dict(row, state=NEEDS_REDO, marked_from=prior, marked_by=event.txid,
                                error=f"its compensation was reverted by transaction "
                                      f"{event.txid}: redo it by hand, then "
                                      f"`walstore resolve` it (store.resolve)"))
        for aid in field("unredo", ()):  # the undo that marked it needs-redo is undone:
            row = get_row(aid)           # the state matches the compensated world again
            if row is not None and row.get("state") == COMMITTED:
                # redone by hand (resolved) after this undo was planned against the mark:
                # the world is charged again and this undo takes the charged state away,
                # so its compensation is owed (as a ``compensate`` claim's)
                out.append(dict(row, state=PENDING, undone_by=event.txid,
                                error=f"undone by transaction {event.txid} (after it was "
                                      f"redone by hand)"))
                continue
            if row is not None and row.get("state") == NEEDS_REDO:
                new = dict(row)
                prior = new.pop("marked_from", None)
                if isinstance(prior, list) and len(prior) == 2 and prior[0] == RESOLVED:
                    new.update(state=RESOLVED, error=prior[1])  # (its note back)
                else:
                    new.update(state=COMPENSATED,
                               error=f"its needs-redo mark was undone by transaction "
                                     f"{event.txid} (the state is back to the compensated "
                                     f"one)")
                out.append(new)
        return out
    if t in (RecordType.ABORT, RecordType.ROLLBACK_PREPARED):
        if b.get("copied"):  # (a copy's: a loser, or one prepared in its source)
            why = ("prepared in the source store when it was copied, rolled back here"
                   if t == RecordType.ROLLBACK_PREPARED else
                   "in flight in the source store when it was copied") + \
                ": never run automatically"
        else:
            why = ("its transaction did not commit before a crash" if b.get("recovered")
                   else ROLLED_BACK)
        out = []
        for row in rows_of_txid(event.txid):
            if row.get("state") not in (IN_FLIGHT, COMMITTED):
                continue
            if declares_no_compensation(row):  # nothing was declared to undo it: nothing owed
                out.append(dict(row, state=RESOLVED, error=why + "; it declares no compensation"))
                continue
            if row.get("intent_lost") and not row.get("compensate"):
                why += ("; its ACTION_INTENT record was lost to damage in the log (it ran: "
                        "its result survives), so what compensates it is unknown: settle "
                        "it by hand (walstore resolve)")
            new = dict(row, state=PENDING, error=why)
            if b.get("copied"):
                new["held"] = True
            out.append(new)
        return out
    if t == RecordType.COMPENSATED:
        row = get_row(str(b.get("id")))
        if row is None:
            return []
        new = dict(row)
        for f in ("state", "error", "attempts", "held"):
            if f in b:
                new[f] = b[f]
        return [new]
    return []


_NAMED_BY_ID = frozenset({RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                          RecordType.COMPENSATED})
ACTION_FIELDS = ("actions", "crossed", "compensate", "redo", "unredo")  # (a COMMIT's)


def actions_named(event: Event) -> list[tuple[str, Event]]:
    """The actions ``event`` names by id, each with the part of ``event`` that concerns it
    alone: (id, event) for an intent, a result or a COMPENSATED record; for a COMMIT, per
    id its fields name (``ACTION_FIELDS``), a copy of the event whose body holds only that
    id's entries, in their order.  ``action_changes`` gives that id the same row from the
    part as from the whole event (each field reads the row as it was before the event),
    so a view of one action folds only its parts (``Views.action_row``: folding an undo's
    COMMIT that claims N actions once per action made N compensations cost N^2).  An
    ABORT or ROLLBACK_PREPARED names a transaction, not actions (none here).  Only str ids
    (every action id is one; no other can be looked up)."""
    t = event.type
    if t in _NAMED_BY_ID:
        return [(str(event.body.get("id")), event)]
    if t != RecordType.COMMIT or event.packed_body is not None:
        return []  # (a plain commit names no action: its body is not decoded)
    body = event.body
    parts: dict[str, dict[str, list]] = {}
    for f in ACTION_FIELDS:
        if f not in body:
            continue
        entries = body[f]
        if not isinstance(entries, (list, tuple)):
            continue  # (no such commit is written; ``action_changes`` would fail on it)
        for entry in entries:
            aid = entry.get("id") if f == "actions" and isinstance(entry, dict) else entry
            if type(aid) is str:
                parts.setdefault(aid, {}).setdefault(f, []).append(entry)
    return [(aid, Event(event.lsn, event.end, t, event.txid, part))
            for aid, part in parts.items()]


# ---- reversible files -----------------------------------------------------------------
# ``workspaces``: root (bytes) -> {root, ignore, scope, lsn, ts, manifest}: registered trees;
#   ``manifest`` is the digest of the newest saved manifest (a watch's "before"), so the
#   next process's first snapshot is incremental.
# ``fsteps``:     u64 txid | u64 LSN -> {ws, op, steps} (a FILE_STEPS record) or {ws, op:
#   "watch", manifest} (a WATCH_BEGIN not ended yet): the file effects of transactions that
#   have not committed.  A row of a live transaction is its write-ahead before-image; a row
#   of an ended one (ABORT, a loser) is an undo still owed, until FILE_RESTORED.
# ``fversions``:  u16 len(ws) | ws | u16 len(path) | path | u64 commit LSN ->
#   [txid, before row, after row]: what a committed transaction did to one path (its
#   first before-image and last after-image there).
#   A path left absent has the after row ``[ABSENT_ROW]`` (``Entry.absent().to_row()``).
# ``fchanges``:   u64 txid | u16 len(ws) | ws | path -> b"" or u64 (when the
#                 transaction's first step on the path began, ns: ``steps_began``): the
#   paths a committed transaction changed (the index revert, rewind and diff read).
# ``fconflicts``: u64 LSN of the FILE_CONFLICT record -> {tx, ws, effect, conflict, ts}.
ABSENT_ROW = "a"  # (walstore.files.entries: the kind code of an absent path's row)


def fsteps_prefix(txid: int) -> bytes:
    return _U64.pack(txid)


def fsteps_key(txid: int, lsn: int) -> bytes:
    return _U64.pack(txid) + _U64.pack(lsn)


def split_fsteps_key(raw: bytes) -> tuple[int, int]:
    """(txid, LSN) of an ``fsteps`` key; CorruptionError when it is not 16 bytes."""
    if len(raw) != 16:
        raise key_damaged("fsteps", raw)
    return _U64.unpack_from(raw)[0], _U64.unpack_from(raw, 8)[0]


def fpath_prefix(ws: bytes, path: bytes) -> bytes:
    return _U16.pack(len(ws)) + ws + _U16.pack(len(path)) + path


def fversion_key(ws: bytes, path: bytes, lsn: int) -> bytes:
    return fpath_prefix(ws, path) + _U64.pack(lsn)


def fws_prefix(ws: bytes) -> bytes:
    return _U16.pack(len(ws)) + ws


def split_fversion_key(raw: bytes) -> tuple[bytes, bytes, int]:
    """(workspace, path, LSN) of an ``fversions`` key; CorruptionError when its parts do
    not add up to its length."""
    n = _U16.unpack_from(raw)[0] if len(raw) >= 2 else len(raw)
    if len(raw) < 4 + n + 8:
        raise key_damaged("fversions", raw)
    m = _U16.unpack_from(raw, 2 + n)[0]
    if len(raw) != 4 + n + m + 8:
        raise key_damaged("fversions", raw)
    return raw[2:2 + n], raw[4 + n:4 + n + m], _U64.unpack_from(raw, 4 + n + m)[0]


def is_fversion_of(raw: bytes, prefix: bytes) -> bool:
    return raw.startswith(prefix) and len(raw) == len(prefix) + 8


def fchange_key(txid: int, ws: bytes, path: bytes) -> bytes:
    return _U64.pack(txid) + _U16.pack(len(ws)) + ws + path


def split_fchange_key(raw: bytes) -> tuple[int, bytes, bytes]:
    """(txid, workspace, path) of an ``fchanges`` key; CorruptionError when its parts do
    not add up to its length."""
    if len(raw) < 10 or len(raw) < 10 + _U16.unpack_from(raw, 8)[0]:
        raise key_damaged("fchanges", raw)
    n = _U16.unpack_from(raw, 8)[0]
    return _U64.unpack_from(raw)[0], raw[10:10 + n], raw[10 + n:]


# the tables whose keys are made of parts (a length-prefixed key or path, u64s): each
# one's split, which checks the parts add up (``verify`` checks every key with it)
MULTIPART_KEYS = {"hist": split_hist_key, "fsteps": split_fsteps_key,
                  "fversions": split_fversion_key, "fchanges": split_fchange_key}


def workspace_row(event: Event, old: dict | None) -> dict:
    """The ``workspaces`` row after a WORKSPACE or WATCH_BEGIN event."""
    b = event.body
    if event.type == RecordType.WATCH_BEGIN:
        return dict(old or {"root": b.get("ws")}, manifest=b.get("manifest"))
    row = {"root": b.get("root"), "ignore": list(b.get("ignore") or ()),
           "scope": b.get("scope"), "lsn": event.lsn, "ts": b.get("ts", 0.0)}
    if old and old.get("manifest"):
        row["manifest"] = old["manifest"]
    return row


def fsteps_row(event: Event) -> dict:
    """The ``fsteps`` row of a FILE_STEPS or WATCH_BEGIN event."""
    b = event.body
    if event.type == RecordType.WATCH_BEGIN:
        return {"ws": b.get("ws"), "op": "watch", "manifest": b.get("manifest")}
    row = {"ws": b.get("ws"), "op": b.get("op"), "steps": b.get("steps") or []}
    if "watch" in b:
        row["watch"] = b["watch"]
    # when the steps began (an undo keeps the ignored paths older than that in a
    # directory it removes: agent.files.FileEffect.since_ns)
    for f in ("ts", "began"):
        if f in b:
            row[f] = b[f]
    return row


def steps_began(rows: list[dict]) -> dict[tuple[bytes, bytes], int]:
    """(ws, path) -> when the first of these ``fsteps`` rows that changed it began (ns:
    its ``began``, a watch's block, else its ``ts``); a path whose rows keep neither
    (logged before they were) is left out.  An undo keeps the ignored paths older than
    that in a directory it removes (agent.files.FileEffect.since_ns)."""
    out: dict[tuple[bytes, bytes], int] = {}
    for row in rows:
        began = row.get("began")
        if not (isinstance(began, int) and not isinstance(began, bool)):
            ts = row.get("ts")
            if not (isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0):
                continue
            began = int(ts * 1e9)
        for step in row.get("steps") or ():
            key = (row.get("ws"), step[0])
            out[key] = min(out.get(key, began), began)
    return out


def collapse_steps(rows: list[dict]) -> dict[tuple[bytes, bytes], list]:
    """(ws, path) -> [first before row, last after row] over the ``fsteps`` rows of one
    committed transaction, in LSN order: what it did to each path."""
    out: dict[tuple[bytes, bytes], list] = {}
    for row in rows:
        ws = row.get("ws")
        for step in row.get("steps") or ():
            path, before, after = step
            key = (ws, path)
            if key in out:
                out[key][1] = after
            else:
                out[key] = [before, after]
    return out
