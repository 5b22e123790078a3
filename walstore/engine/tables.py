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
  ``held``: owed but never run automatically (a copy of another store).

Invariants: ``action_changes`` depends only on the event and the rows it names, so
applying the same events to the same rows gives the same rows (REDO is idempotent); a
final state (``compensated``, ``resolved``) is never left except by ``redo`` marking.
"""
from __future__ import annotations

import struct
from typing import Callable

from ..log.format import RecordType
from ..log.records import Event, commit_ts

_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")

IN_FLIGHT, COMMITTED, PENDING, FAILED = "in-flight", "committed", "pending", "failed"
COMPENSATED, RESOLVED, NEEDS_REDO = "compensated", "resolved", "needs-redo"
OWED_STATES = (PENDING, FAILED)
FINAL_STATES = (COMPENSATED, RESOLVED)


# ---- history keys ---------------------------------------------------------------------
def hist_prefix(key: bytes) -> bytes:
    return _U16.pack(len(key)) + key


def hist_key(key: bytes, lsn: int) -> bytes:
    return _U16.pack(len(key)) + key + _U64.pack(lsn)


def split_hist_key(raw: bytes) -> tuple[bytes, int]:
    n = _U16.unpack_from(raw)[0]
    return raw[2:2 + n], _U64.unpack_from(raw, 2 + n)[0]


def is_version_of(raw: bytes, prefix: bytes) -> bool:
    return raw.startswith(prefix) and len(raw) == len(prefix) + 8


def txid_key(txid: int) -> bytes:
    return _U64.pack(txid)


# ---- transaction log rows -------------------------------------------------------------
TXN_ROW_FIELDS = ("actions", "scope", "compensate", "redo", "gid", "reverts", "rewound_to",
                  "purge", "purge_range", "files")


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


# ---- action rows ----------------------------------------------------------------------
def action_prefix(txid: int) -> bytes:
    """Action ids are ``"<txid>.<seq>"``: the rows of one transaction share this prefix."""
    return f"{txid}.".encode()


def action_changes(event: Event, get_row: Callable[[str], dict | None],
                   rows_of_txid: Callable[[int], list[dict]]) -> list[dict]:
    """The action rows ``event`` creates or changes (whole new rows), given the current
    rows (``get_row(id)``, ``rows_of_txid(txid)``)."""
    t, b = event.type, event.body
    if t == RecordType.ACTION_INTENT:
        if get_row(str(b.get("id"))) is not None:
            return []  # REDO of an intent already applied
        return [{"id": str(b["id"]), "tx": event.txid, "name": b.get("name"),
                 "args": b.get("args"), "result": None, "key": b.get("key", ""),
                 "compensate": b.get("compensate"), "scope": b.get("scope"),
                 "state": IN_FLIGHT, "error": None, "attempts": 0, "ts": b.get("ts", 0.0),
                 "lsn": event.lsn}]
    if t == RecordType.ACTION_RESULT:
        row = get_row(str(b.get("id")))
        if row is None:
            return []
        return [dict(row, result=b.get("result"), error=b.get("error"))]
    if t == RecordType.COMMIT:  # reads only "actions", "compensate", "redo" (the applier
        out = []                # skips commits with none of them: keep apply._ACTION_FIELDS)
        for a in b.get("actions", ()):
            row = get_row(a["id"]) or {}
            if row.get("state") in FINAL_STATES:
                continue  # compensated by a partial rollback before the commit
            new = dict(row)
            new.update(a)
            new["state"] = COMMITTED
            out.append(new)
        undone_by = f"undone by transaction {event.txid}"
        for aid in b.get("compensate", ()):
            row = get_row(aid)
            if row is not None and row.get("state") == COMMITTED:
                out.append(dict(row, state=PENDING, error=undone_by))
        for aid in b.get("redo", ()):
            row = get_row(aid)
            if row is not None:
                out.append(dict(row, state=NEEDS_REDO,
                                error=f"its compensation was reverted by transaction "
                                      f"{event.txid}: redo it by hand"))
        return out
    if t in (RecordType.ABORT, RecordType.ROLLBACK_PREPARED):
        why = ("in flight in the source store when it was copied: never run automatically"
               if b.get("copied") else "its transaction did not commit before a crash"
               if b.get("recovered") else "its transaction rolled back")
        out = []
        for row in rows_of_txid(event.txid):
            if row.get("state") not in (IN_FLIGHT, COMMITTED):
                continue
            if not row.get("compensate"):  # nothing was declared to undo it: nothing owed
                out.append(dict(row, state=RESOLVED, error=why + "; it declares no compensation"))
                continue
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

