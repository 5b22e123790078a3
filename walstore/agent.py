"""Action rollback for agents: log, history, revert, restore points, rewind, time travel.

Built on the history indexes (walstore.history) and the Saga layer (walstore.actions):

- ``revert(txid)`` applies a committed transaction's before-images (the versions just
  below its LSN in the history index) as a *new* transaction
  and compensates its actions (newest first).  Later transactions that touched the same
  keys make it raise RevertConflict (``cascade=True`` reverts them first, newest first).
- ``restore_point(name)`` logs a named point; ``rewind(to)`` undoes every transaction
  committed after it, as one new transaction, compensating their actions newest first.
- ``at(point)`` is a read-only view of the state as of a point.

Points are a restore point name, an LSN (``walstore.LSN``, e.g. ``tx.lsn`` or what
``restore_point`` returns), or a txid (a plain int: "as of just after that transaction").
Costs grow with what is undone or read (index lookups by key and by LSN), never with the
age of the store.  History is kept per ``Options.retain_transactions`` / ``retain_seconds``
(default: everything); restore points pin what they need; a point below the retained
horizon raises HistoryTrimmed naming it.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from . import history
from .actions import COMMITTED, Action
from .codec import Key, decode_key, encode_key, pack, unpack, unpack_value
from .errors import HistoryTrimmed, RevertConflict
from .framing import RecordType
from .kv import txid_key
from .txlog import LSN, TxnInfo, info_from_row

if TYPE_CHECKING:
    from .txn import Transaction

_U64 = struct.Struct(">Q")
TRIM_BATCH = 1000


@dataclass(frozen=True)
class Version:
    """One version of a key: what transaction ``txid`` (commit at ``lsn``) set it to."""

    txid: int
    lsn: int
    value: Any
    deleted: bool


class HistoricalView:
    """Read-only state as of a point (``store.at(point)``)."""

    def __init__(self, store, boundary: int) -> None:
        self._store = store
        self.lsn = LSN(boundary)

    def get(self, key: Key, default: Any = None) -> Any:
        found, v = history.value_at(self._store.state, encode_key(key), self.lsn + 1)
        return default if not found or v is None else unpack_value(v)

    def __getitem__(self, key: Key) -> Any:
        marker = object()
        v = self.get(key, marker)
        if v is marker:
            raise KeyError(key)
        return v

    def __contains__(self, key: Key) -> bool:
        marker = object()
        return self.get(key, marker) is not marker

    def scan(self, prefix: Key | None = None, start: Key | None = None, end: Key | None = None,
             reverse: bool = False) -> Iterator[tuple[Key, Any]]:
        lo, hi = self._store._scan_bounds(prefix, start, end)
        for k in history.keys_in_range(self._store.state, lo, hi, reverse):
            found, v = history.value_at(self._store.state, k, self.lsn + 1)
            if found and v is not None:
                yield decode_key(k), unpack_value(v)


class AgentMixin:
    """The Store's action-rollback API (mixed into walstore.Store)."""

    # ---- reading the past --------------------------------------------------------------
    def history(self, key: Key) -> list[Version]:
        """Every retained version of ``key``, newest first."""
        self._check_open()
        k = encode_key(key)
        self._apply_pending()
        return [Version(txid, LSN(lsn), None if v is None else unpack_value(v), v is None)
                for lsn, txid, v in history.versions(self.state, k)]

    def at(self, point: Any) -> HistoricalView:
        """A read-only view of the state as of ``point`` (name, LSN or txid)."""
        self._check_open()
        self._apply_pending()
        return HistoricalView(self, self._resolve_point(point))

    def txn_info(self, txid: int) -> TxnInfo:
        """The log entry of one committed transaction."""
        self._check_open()
        raw = self.state.get(txid_key(int(txid)), self.state.txns)
        if raw is None:
            for e in self._unapplied_commits():
                if e.txid == txid:
                    return info_from_row(e.txn_row())
            self._raise_unknown_txid(txid)
        return info_from_row(raw)

    def _raise_unknown_txid(self, txid: int) -> None:
        horizon = self.state.get_meta_int(b"horizon")
        if horizon:
            raise HistoryTrimmed(f"transaction {txid} is unknown or older than the retained "
                                 f"history (horizon LSN {horizon})")
        raise KeyError(f"no committed transaction with txid {txid}")

    # ---- restore points ----------------------------------------------------------------
    def restore_point(self, name: str) -> LSN:
        """Name the current state; returns the point's LSN.  It pins history until dropped."""
        self._check_open()
        self._check_writable()
        if not isinstance(name, str) or not name:
            raise TypeError("a restore point name must be a non-empty str")
        if name.isdigit():
            raise ValueError("a restore point name must not be all digits (it would read as a txid)")
        ts = time.time()
        with self._lock:
            lsn, end = self.wal.append(RecordType.RESTORE_POINT, pack({"name": name, "ts": ts}))
        if self.durability != "none":
            self.wal.sync_to(end)
        history.put_point(self.state, name, lsn, ts)
        return LSN(lsn)

    def restore_points(self) -> dict[str, LSN]:
        self._check_open()
        return {n: LSN(p["lsn"]) for n, p in history.all_points(self.state).items()}

    def drop_restore_point(self, name: str) -> None:
        self._check_open()
        self._check_writable()
        if history.get_point(self.state, name) is None:
            raise KeyError(f"no restore point named {name!r}")
        with self._lock:  # logged, so recovery's replay of the log does not bring it back
            _lsn, end = self.wal.append(RecordType.RESTORE_POINT,
                                        pack({"name": name, "drop": True, "ts": time.time()}))
        if self.durability != "none":
            self.wal.sync_to(end)
        history.drop_point(self.state, name)

    def _resolve_point(self, point: Any) -> int:
        """The boundary LSN: commits at or below it are 'in', later ones 'after'."""
        if isinstance(point, str):
            p = history.get_point(self.state, point)
            if p is not None:
                boundary = p["lsn"]
            elif point.isdigit():
                return self._resolve_point(int(point))
            else:
                raise KeyError(f"no restore point named {point!r}")
        elif isinstance(point, LSN):
            boundary = int(point)
        elif isinstance(point, int) and not isinstance(point, bool):
            try:  # a plain int is a txid when one exists, else a log position
                boundary = self.txn_info(point).lsn
            except KeyError:
                boundary = int(point)
        else:
            raise TypeError(f"a point is a restore point name, an LSN or a txid, not "
                            f"{type(point).__name__}")
        horizon = self.state.get_meta_int(b"horizon")
        if boundary < horizon:
            raise HistoryTrimmed(f"point {point!r} (LSN {boundary}) is older than the retained "
                                 f"history (horizon LSN {horizon})")
        return boundary

    # ---- undoing committed work --------------------------------------------------------
    def revert(self, txid: int, cascade: bool = False, meta: Any = None) -> TxnInfo | None:
        """Undo one committed transaction as a new transaction (and compensate its actions)."""
        self._check_open()
        self._check_writable()
        tx = self.transaction(meta=meta if meta is not None else {"revert": int(txid)})
        # Everything committed before tx began is applied now, so the history index sees
        # it; anything committed later touches keys tx marks as read and so conflicts.
        self._apply_pending()
        with tx:
            target = self.txn_info(txid)
            undo = {target.txid: target}
            frontier = [target]
            while frontier:
                later = self._later_writers(frontier.pop())
                new = [i for i in later if i.txid not in undo]
                if new and not cascade:
                    ids = sorted({i.txid for i in later}, reverse=True)
                    raise RevertConflict(f"transaction {target.txid} cannot be reverted alone: "
                                         f"later transactions {ids} changed the same keys "
                                         f"(use cascade=True to revert them too)", ids)
                for i in new:
                    undo[i.txid] = i
                    frontier.append(i)
            return self._undo_into(tx, sorted(undo.values(), key=lambda i: i.lsn, reverse=True),
                                   {"reverts": sorted(undo, reverse=True)})

    def rewind(self, to: Any, meta: Any = None) -> TxnInfo | None:
        """Undo every transaction committed after ``to``, as one new transaction."""
        self._check_open()
        self._check_writable()
        tx = self.transaction(meta=meta if meta is not None else {"rewind": _jsonable_point(to)})
        tx.read_ranges.append((b"", None))  # any commit after tx began is a conflict
        self._apply_pending()
        with tx:
            boundary = self._resolve_point(to)
            infos = [self.txn_info(t) for _lsn, t in history.txids_after(self.state, boundary)]
            if not infos:
                tx.rollback()
                return None
            return self._undo_into(tx, infos, {"rewound_to": boundary,
                                               "reverts": [i.txid for i in infos]})

    def _later_writers(self, info: TxnInfo) -> list[TxnInfo]:
        out = {}
        for key in info.keys:
            for lsn, txid, _v in history.versions(self.state, encode_key(key)):
                if lsn <= info.lsn:
                    break
                if txid not in out:
                    out[txid] = self.txn_info(txid)
        return list(out.values())

    def _undo_into(self, tx: "Transaction", infos: list[TxnInfo], extra: dict) -> TxnInfo | None:
        """Apply before-images newest first inside ``tx``, commit, then compensate."""
        owed: list[Action] = []
        for info in infos:
            for key, _unused in info.extra.get("w", ()):
                _found, before = history.value_at(self.state, key, info.lsn)  # just before it
                tx.read_keys.add(key)
                tx._set(key, before)
            for row in reversed(info.extra.get("actions", ())):
                action = self._current_action(row)
                if action.state == COMMITTED and action.compensate:
                    owed.append(action)
        extra["compensate"] = [a.id for a in owed]
        tx.commit_extra = extra
        tx.commit()
        if owed:
            self._compensate(owed)
        return self.txn_info(tx.id) if tx.lsn is not None else None

    def _current_action(self, row: dict) -> Action:
        try:
            return self.get_action(row["id"])
        except KeyError:
            return Action.from_row(row)

    # ---- retention ---------------------------------------------------------------------
    def _trim_history(self) -> int:
        """Drop history older than the retention allows (restore points pin it)."""
        opts = self.options
        if opts.retain_transactions is None and opts.retain_seconds is None:
            return 0
        horizon = self._retention_horizon()
        pins = [p["lsn"] for p in history.all_points(self.state).values()]
        if pins:
            horizon = min(horizon, min(pins))
        old = self.state.get_meta_int(b"horizon")
        if horizon <= old:
            return 0
        trimmed = 0
        while True:
            batch = [(lsn, txid) for lsn, txid in self._oldest_commits(old, horizon)]
            if not batch:
                break
            self.state.write(lambda txn: _trim_batch(self.state, txn, batch, horizon))
            trimmed += len(batch)
            old = batch[-1][0] + 1
        self.state.set_meta_int(b"horizon", horizon)
        return trimmed

    def _oldest_commits(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out = []
        for raw, txid in self.state.scan(_U64.pack(lo), _U64.pack(hi), db=self.state.bylsn):
            out.append((_U64.unpack(raw)[0], _U64.unpack(txid)[0]))
            if len(out) >= TRIM_BATCH:
                break
        return out

    def _retention_horizon(self) -> int:
        opts = self.options
        candidates = [self.state.applied_lsn()]
        if opts.retain_transactions is not None:
            n = 0
            for raw, _t in self.state.scan(b"", None, reverse=True, db=self.state.bylsn):
                n += 1
                if n >= opts.retain_transactions:
                    candidates.append(_U64.unpack(raw)[0])
                    break
            else:
                candidates.append(0)
        if opts.retain_seconds is not None:
            cutoff = time.time() - opts.retain_seconds
            first_young = 0
            for raw, txid in self.state.scan(b"", None, db=self.state.bylsn):
                row = self.state.get(txid, self.state.txns)
                if row is not None and unpack(row).get("ts", 0) >= cutoff:
                    first_young = _U64.unpack(raw)[0]
                    break
            else:
                first_young = self.state.applied_lsn()
            candidates.append(first_young)
        return min(candidates)


def _trim_batch(state, txn, batch: list[tuple[int, int]], horizon: int) -> None:
    """Delete the history of commits below ``horizon`` (views at or after the horizon need
    only versions after it: see walstore.history), but keep each key's newest version."""
    for lsn, txid in batch:
        raw = txn.get(txid_key(txid), db=state.txns)
        row = unpack(raw) if raw is not None else {"w": []}
        for key, _unused in row.get("w", []):
            if _has_newer_below(txn, state, key, lsn, horizon):
                txn.delete(history.hist_key(key, lsn), db=state.hist)
        for a in row.get("actions", []):
            araw = txn.get(a["id"].encode(), db=state.actions)
            if araw is not None and unpack(araw).get("state") in (COMMITTED, "compensated",
                                                                  "resolved"):
                txn.delete(a["id"].encode(), db=state.actions)
        txn.delete(txid_key(txid), db=state.txns)
        txn.delete(_U64.pack(lsn), db=state.bylsn)


def _has_newer_below(txn, state, key: bytes, lsn: int, horizon: int) -> bool:
    """Is there a version of ``key`` after ``lsn`` and still below the horizon?  (The
    newest version below the horizon is kept, so ``history(key)`` still names it.)"""
    cur = txn.cursor(db=state.hist)
    prefix = history.hist_prefix(key)
    if not cur.set_range(history.hist_key(key, lsn + 1)):
        return False
    k = cur.key()
    if not k.startswith(prefix) or len(k) != len(prefix) + 8:
        return False
    return history.split_hist_key(k)[1] < horizon


def _jsonable_point(point: Any) -> Any:
    return int(point) if isinstance(point, int) else str(point)


__all__ = ["AgentMixin", "HistoricalView", "LSN", "Version"]
