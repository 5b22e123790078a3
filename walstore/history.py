"""History indexes in LMDB: versions of keys, transactions by LSN, restore points.

Owns three named databases of the LMDB environment (see walstore.kv):

- ``hist``:   u16 len(key) ‖ stored key ‖ u64 LSN (big endian) -> msgpack [txid, before|None]
  (the key's value just *before* that committed transaction changed it — its
  before-image; None: the key was absent).  The value a version set is the next newer
  version's before-image, or, for the newest, the current value in ``data``: so no value
  is stored twice, and a key written once costs one small row;
- ``bylsn``:  u64 commit LSN -> u64 txid (transactions in log order);
- ``hkeys``:  stored key -> b"" for every key that has history (so a view's scan of a key
  range walks only keys in that range);
- ``points``: restore point name (UTF-8) -> msgpack {"lsn", "ts"}.

They are written in the same LMDB transaction as the data they describe (by
``apply_commits``), so they are exactly as current as ``applied``.  Invariants: every
committed write has a ``hist`` row until retention trims it; the state as of a point P is
found in the first version after P (its before-image) or, when there is none, in ``data``,
so trimming every row below the horizon keeps any view at or after the horizon exact;
restore points pin the horizon below them.
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


def apply_commits(txn, dbs, entries) -> None:
    """Apply committed transactions (in LSN order) to ``data`` and record their history,
    inside one LMDB write transaction.  Rows are gathered first and written with
    ``putmulti`` (one C loop per table); a key's before-image is the value an earlier
    commit of the same batch gave it, else its value in ``data``."""
    latest: dict[bytes, bytes | None] = {}
    hist_rows, bylsn_rows, new_keys = [], [], []
    get = txn.get
    data = dbs.data
    for e in entries:
        bylsn_rows.append((_U64.pack(e.lsn), _U64.pack(e.txid)))
        lsn_raw = _U64.pack(e.lsn)
        for k, v, _b in e.writes:
            before = latest[k] if k in latest else get(k, db=data)
            hist_rows.append((_U16.pack(len(k)) + k + lsn_raw, pack([e.txid, before])))
            if before is None:
                new_keys.append((k, b""))
            latest[k] = v
    txn.cursor(db=data).putmulti([(k, v) for k, v in latest.items() if v is not None])
    for k, v in latest.items():
        if v is None:
            txn.delete(k, db=data)
    txn.cursor(db=dbs.hist).putmulti(hist_rows)
    txn.cursor(db=dbs.bylsn).putmulti(bylsn_rows)
    if new_keys:
        txn.cursor(db=dbs.hkeys).putmulti(new_keys, overwrite=False)


def versions(state, key: bytes) -> Iterator[tuple[int, int, bytes | None]]:
    """(lsn, txid, packed value it set or None) of every retained version, newest first."""
    prefix = hist_prefix(key)
    after = state.get(key)  # the newest version set the current value
    for raw, row in state.scan(prefix, prefix + b"\xff" * 9, reverse=True, db=state.hist):
        if len(raw) != len(prefix) + 8:
            continue
        _k, lsn = split_hist_key(raw)
        txid, before = unpack(row)
        yield lsn, txid, after
        after = before


def value_at(state, key: bytes, lsn: int) -> tuple[bool, bytes | None]:
    """(present, packed value) of ``key`` as of just before log position ``lsn``: the
    before-image of its first version at or after ``lsn``, else its current value."""
    prefix = hist_prefix(key)
    with state.gate, state.begin(state.hist) as txn:
        cur = txn.cursor()
        if cur.set_range(hist_key(key, lsn)) and cur.key().startswith(prefix) \
                and len(cur.key()) == len(prefix) + 8:
            value = unpack(cur.value())[1]
        else:
            value = txn.get(key, db=state.data)
    return value is not None, value


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
