"""Payload schemas of WAL records, and the committed-transaction entry built from them.

Every payload is a msgpack map with short string keys; readers ignore keys they do not
know (so a newer writer can add fields) and treat a missing required key as corruption.

COMMIT / WRITES: ``{"tx": txid, "w": [[key, value|None], ...]}`` and, for COMMIT, ``"ts"``
(unix seconds, float) and ``"meta"``.  ``value`` None is a delete.  (A third element per
write is tolerated and ignored: before-images come from the history index.)  A
large transaction writes WRITES chunks first and its COMMIT last; all are contiguous.
CHECKPOINT: ``{"applied": lsn, "keep": lsn, "ts": t}``.  ABORT: ``{"tx": txid}``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .codec import pack, unpack
from .framing import RecordType

_WRITES, _COMMIT = RecordType.WRITES, RecordType.COMMIT
_ENDS = frozenset({RecordType.ABORT, RecordType.ROLLBACK_PREPARED})

Write = tuple  # (stored key, packed value or None, None: the unused before-image slot)


@dataclass
class CommitEntry:
    """A committed transaction as the store and recovery handle it."""

    txid: int
    lsn: int
    end_lsn: int
    ts: float
    meta: Any
    writes: list
    extra: dict = field(default_factory=dict)

    def txn_row(self) -> bytes:
        """The row of the ``txns`` index in LMDB (what ``store.log()`` reads)."""
        row = {"tx": self.txid, "lsn": self.lsn, "end": self.end_lsn, "ts": self.ts,
               "meta": self.meta, "w": [[k, None] for k, _v, _b in self.writes]}
        row.update(self.extra)
        return pack(row)


def commit_payload(txid: int, writes: list, meta: Any, extra: dict | None = None,
                   ts: float | None = None) -> bytes:
    body = {"tx": txid, "ts": time.time() if ts is None else ts, "meta": meta, "w": writes}
    if extra:
        body.update(extra)
    return pack(body)


def writes_payload(txid: int, writes: list) -> bytes:
    return pack({"tx": txid, "w": writes})


def decode(payload: bytes) -> dict:
    """Unpack a payload; ValueError when it is not a msgpack map."""
    body = unpack(payload)
    if not isinstance(body, dict):
        raise ValueError(f"record payload is a {type(body).__name__}, not a map")
    return body


def parse_writes(body: dict) -> list:
    writes = body.get("w")
    if not isinstance(writes, list):
        raise ValueError("record has no write list")
    out = []
    for w in writes:
        if (not isinstance(w, list) or len(w) < 2 or not isinstance(w[0], bytes)
                or not (w[1] is None or isinstance(w[1], bytes))):
            raise ValueError("malformed write entry")
        before = w[2] if len(w) > 2 and isinstance(w[2], bytes) else None
        out.append((w[0], w[1], before))
    return out


class CommitAssembler:
    """Turns the stream of WRITES / COMMIT / ABORT records into whole committed write sets.

    ``feed`` returns a transaction's complete write list at its COMMIT (earlier WRITES
    chunks first), and None for every other record; an ABORT or ROLLBACK_PREPARED drops
    the chunks.  ``max_bytes`` bounds what one unfinished transaction may accumulate.
    Recovery, verify and read-only followers all read the log through it.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.chunks: dict[int, list] = {}
        self.sizes: dict[int, int] = {}
        self.max_bytes = max_bytes

    def feed(self, rtype: int, body: dict, payload_len: int = 0) -> list | None:
        if rtype == _WRITES:
            txid = txid_of(body)
            size = self.sizes.get(txid, 0) + payload_len
            if self.max_bytes is not None and size > self.max_bytes:
                raise ValueError(f"transaction {txid} exceeds {self.max_bytes} bytes of writes")
            self.sizes[txid] = size
            self.chunks.setdefault(txid, []).extend(parse_writes(body))
        elif rtype == _COMMIT:
            txid = txid_of(body)
            self.sizes.pop(txid, None)
            return self.chunks.pop(txid, []) + parse_writes(body)
        elif rtype in _ENDS:
            txid = txid_of(body)
            self.sizes.pop(txid, None)
            self.chunks.pop(txid, None)
        return None


def txid_of(body: dict) -> int:
    txid = body.get("tx")
    if not isinstance(txid, int) or txid < 0:
        raise ValueError("record has no valid transaction id")
    return txid
