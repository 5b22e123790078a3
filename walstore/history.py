"""History indexes in LMDB: versions of keys, transactions by LSN, restore points.

Owns three named databases of the LMDB environment (see walstore.kv):

- ``hist``:   u16 len(key) ‖ stored key ‖ u64 LSN (big endian) -> msgpack [txid, value|None]
  (the value a committed transaction gave the key; None for a delete);
- ``bylsn``:  u64 commit LSN -> u64 txid (transactions in log order);
- ``hkeys``:  stored key -> b"" for every key that has history (so a view's scan of a key
  range walks only keys in that range);
- ``points``: restore point name (UTF-8) -> msgpack {"lsn", "ts"}.

They are written in the same LMDB transaction as the data they describe (by
``index_commit``), so they are exactly as current as ``applied``.  Invariants: every
committed write has a ``hist`` row until retention trims it; trimming keeps, for every
key, the newest version at or below the horizon, so a view as of any point at or after the
horizon is exact; restore points pin the horizon below them.
"""
from __future__ import annotations

import struct
from typing import Iterator

from .codec import pack, unpack

_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")


def hist_prefix(key: bytes) -> bytes:
    return _U16.pack(len(key)) + key


def hist_key(key: bytes, lsn: int) -> bytes:
    return _U16.pack(len(key)) + key + _U64.pack(lsn)


def split_hist_key(raw: bytes) -> tuple[bytes, int]:
    n = _U16.unpack_from(raw)[0]
    return raw[2:2 + n], _U64.unpack_from(raw, 2 + n)[0]


def index_commit(txn, dbs, entry) -> None:
    """Write the history rows of one committed transaction (inside the apply txn)."""
    txid_raw = _U64.pack(entry.txid)
    txn.put(_U64.pack(entry.lsn), txid_raw, db=dbs.bylsn)
    for k, v, _b in entry.writes:
        txn.put(hist_key(k, entry.lsn), pack([entry.txid, v]), db=dbs.hist)
        txn.put(k, b"", db=dbs.hkeys, overwrite=False)


def versions(state, key: bytes) -> Iterator[tuple[int, int, bytes | None]]:
    """(lsn, txid, packed value or None) of every retained version of ``key``, newest first."""
    prefix = hist_prefix(key)
    for raw, row in state.scan(prefix, prefix + b"\xff" * 9, reverse=True, db=state.hist):
        if len(raw) != len(prefix) + 8:
            continue
        _k, lsn = split_hist_key(raw)
        txid, value = unpack(row)
        yield lsn, txid, value


def value_at(state, key: bytes, lsn: int) -> tuple[bool, bytes | None]:
    """(found, packed value) of ``key`` as of just before log position ``lsn``."""
    prefix = hist_prefix(key)
    with state.gate, state.begin(state.hist) as txn:
        cur = txn.cursor()
        target = hist_key(key, lsn)  # versions strictly below lsn count
        ok = cur.set_range(target)
        ok = cur.prev() if ok else cur.last()
        if ok and cur.key().startswith(prefix) and len(cur.key()) == len(prefix) + 8:
            return True, unpack(cur.value())[1]
    return False, None


def keys_in_range(state, lo: bytes, hi: bytes | None, reverse: bool = False
                  ) -> Iterator[bytes]:
    """Every stored key that has (or had) history, lo <= key < hi, in key order."""
    for k, _v in state.scan(lo, hi, reverse, db=state.hkeys):
        yield k


def txids_after(state, lsn: int) -> Iterator[tuple[int, int]]:
    """(commit lsn, txid) of every applied transaction with commit LSN > ``lsn``, newest first."""
    for raw, txid in state.scan(_U64.pack(lsn + 1), None, reverse=True, db=state.bylsn):
        yield _U64.unpack(raw)[0], _U64.unpack(txid)[0]


def put_point(state, name: str, lsn: int, ts: float) -> None:
    state.write(lambda txn: txn.put(name.encode("utf-8"), pack({"lsn": lsn, "ts": ts}),
                                    db=state.points))


def get_point(state, name: str) -> dict | None:
    raw = state.get(name.encode("utf-8"), state.points)
    return None if raw is None else unpack(raw)


def all_points(state) -> dict[str, dict]:
    return {k.decode("utf-8"): unpack(v) for k, v in state.scan(b"", None, db=state.points)}


def drop_point(state, name: str) -> bool:
    found = []
    state.write(lambda txn: found.append(txn.delete(name.encode("utf-8"), db=state.points)))
    return bool(found and found[0])
