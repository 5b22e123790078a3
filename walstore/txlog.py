"""The transaction log index: what ``store.log()`` returns and ``walstore log`` prints.

Every committed transaction gets a row in LMDB's ``txns`` database (written in the same
LMDB transaction as its data, see walstore.kv) keyed by its txid; commits not yet applied
to LMDB are read from the store's apply queue, so the log is complete at all times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codec import decode_key, unpack


class LSN(int):
    """An int that is a log position, so ``rewind``/``at``/``log(since=)`` never take it
    for a txid (``tx.lsn``, ``TxnInfo.lsn`` and ``restore_point()`` return LSNs)."""

    def __repr__(self) -> str:
        return f"LSN({int(self)})"

    __str__ = int.__repr__


@dataclass(frozen=True)
class TxnInfo:
    """One committed transaction."""

    txid: int
    lsn: int
    timestamp: float
    meta: Any
    keys: tuple
    actions: tuple = ()
    end_lsn: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {"txid": self.txid, "lsn": self.lsn, "timestamp": self.timestamp,
                "meta": self.meta, "keys": [_jsonable_key(k) for k in self.keys],
                "actions": list(self.actions)}


def _jsonable_key(k):
    return k if isinstance(k, str) else "0x" + k.hex()


def info_from_row(raw: bytes) -> TxnInfo:
    row = unpack(raw)
    keys = tuple(decode_key(w[0]) for w in row.get("w", []))
    return TxnInfo(row["tx"], LSN(row["lsn"]), row.get("ts", 0.0), row.get("meta"), keys,
                   tuple(row.get("actions", ())), row.get("end", 0), row)
