"""The transaction log as users see it: ``LSN`` (a log position) and ``TxnInfo`` (one
committed transaction, what ``store.log()`` returns and ``walstore log`` prints).

A TxnInfo is built from a ``txns`` row (see :mod:`walstore.engine.tables`), whether the
row is in LMDB or folded from an event not applied yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..codec import decode_key, pack, unpack
from ..log.format import LSN


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
    scope: Any = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict:
        """Plain data (keys stay str or bytes: the CLI renders bytes unambiguously)."""
        return {"txid": self.txid, "lsn": int(self.lsn), "timestamp": self.timestamp,
                "meta": self.meta, "keys": list(self.keys), "actions": list(self.actions),
                "scope": self.scope}


def info_from_row(row: dict) -> TxnInfo:
    """A TxnInfo whose ``meta`` and ``actions`` are the caller's own copies (a row folded
    from an unapplied COMMIT shares them with the event: changed in place, they changed
    what the next ``log()`` showed and the action rows applied from it — audit 61)."""
    keys = tuple(decode_key(w[0]) for w in row.get("w", []))
    meta, actions = row.get("meta"), row.get("actions", ())
    if isinstance(meta, (dict, list)) or actions:
        meta, actions = unpack(pack([meta, list(actions)]))
    return TxnInfo(row["tx"], LSN(row["lsn"]), row.get("ts", 0.0), meta, keys,
                   tuple(actions), row.get("end", 0), row.get("scope"), row)
