"""Two-phase commit: prepared (in-doubt) transactions that survive crashes.

``tx.prepare(gid)`` validates the transaction, logs a PREPARE record with its writes
(fsynced) and stores it in LMDB's ``prepared`` database; from then on its keys (written
and read) and scanned ranges are *held*: another transaction that writes one of them, or
reads a key it wrote, fails to commit with ConflictError, until ``commit_prepared(gid)`` or ``rollback_prepared(gid)``
decides, from this process or a later one.  After a crash the prepared set is rebuilt
from LMDB and the WAL (the holds are re-established, unlike RocksDB), and recovery leaves
it in doubt: it is neither undone nor compensated.

``commit_prepared`` logs an ordinary COMMIT record carrying ``gid`` (REDO treats it like
any commit; applying it deletes the prepared row in the same LMDB transaction);
``rollback_prepared`` logs ROLLBACK_PREPARED, compensates the transaction's actions and
drops the row.  Decisions are kept in the ``decisions`` rows (gid -> "commit"/"abort") so
a coordinator (walstore.atomic) can be asked after a crash what it decided.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import records
from .actions import Action
from .codec import pack, unpack
from .errors import WalstoreError
from .framing import RecordType
from .records import CommitEntry

if TYPE_CHECKING:
    from .txn import Transaction

PREPARED_PREFIX = b"p:"
DECISION_PREFIX = b"d:"


@dataclass
class PreparedTxn:
    gid: str
    txid: int
    writes: list                    # [(key, value|None, None)]
    read_keys: list
    meta: Any = None
    read_ranges: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    ts: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"gid": self.gid, "tx": self.txid, "w": [list(w) for w in self.writes],
                "r": self.read_keys, "rr": [list(r) for r in self.read_ranges],
                "meta": self.meta, "actions": self.actions, "ts": self.ts, "extra": self.extra}

    @classmethod
    def from_row(cls, row: dict) -> "PreparedTxn":
        return cls(row["gid"], row["tx"], records.parse_writes(row), list(row.get("r", [])),
                   row.get("meta"), [tuple(r) for r in row.get("rr", [])],
                   list(row.get("actions", [])), row.get("ts", 0.0), dict(row.get("extra") or {}))

    @property
    def keys(self) -> set:
        return {w[0] for w in self.writes} | set(self.read_keys)


def check_gid(gid: Any) -> str:
    if not isinstance(gid, str) or not gid or len(gid.encode()) > 200:
        raise TypeError("a gid must be a non-empty str of at most 200 bytes")
    return gid


class TwoPhaseMixin:
    """The Store's prepared-transaction API (mixed into walstore.Store)."""

    def _init_twophase(self) -> None:
        self._prepared: dict[str, PreparedTxn] = {}
        self._held: dict[bytes, str] = {}

    def _held_conflicts(self, tx: "Transaction") -> list[tuple[bytes, str]]:
        """Keys of ``tx`` that collide with a prepared transaction (serializability).

        A prepared transaction P holds what it read and wrote: another transaction may not
        write P's keys or into P's scanned ranges, may not read a key P wrote, and may not
        scan a range holding one of P's writes.  Reading what P only read is fine.
        """
        if not self._prepared:
            return []
        mine = getattr(tx, "gid", None)
        out = [(k, self._held[k]) for k in tx.writes
               if k in self._held and self._held[k] != mine]
        for p in self._prepared.values():
            if p.gid == mine:
                continue
            written = {w[0] for w in p.writes}
            out += [(k, p.gid) for k in tx.read_keys if k in written]
            out += [(k, p.gid) for k in tx.writes if _in_ranges(k, p.read_ranges)]
            out += [(k, p.gid) for k in written if _in_ranges(k, tx.read_ranges)]
        return out

    def _prepare(self, tx: "Transaction", gid: str) -> None:
        check_gid(gid)
        self._check_writable()
        with self._lock:
            if gid in self._prepared or self._decision(gid) is not None:
                raise WalstoreError(f"gid {gid!r} is already used in this store")
            self._validate(tx)
            writes = [(k, v, None) for k, v in tx.writes.items()]
            p = PreparedTxn(gid, tx.id, writes, sorted(tx.read_keys), tx.meta,
                            list(tx.read_ranges), [a.row() for a in tx.actions],
                            extra=dict(tx.commit_extra or {}))
            lsn, end = self.wal.append(RecordType.PREPARE, pack(p.row()))
            if tx.first_logged_lsn is None:
                tx.first_logged_lsn = lsn
            self._hold(p)
        if self.durability != "none":
            self.wal.sync_to(end)
        self.state.write(lambda txn: txn.put(PREPARED_PREFIX + gid.encode(), pack(p.row()),
                                             db=self.state.meta2))

    def _hold(self, p: PreparedTxn) -> None:
        self._prepared[p.gid] = p
        for k in p.keys:
            self._held[k] = p.gid

    def _release(self, gid: str) -> PreparedTxn:
        p = self._prepared.pop(gid)
        for k in p.keys:
            if self._held.get(k) == gid:
                del self._held[k]
        return p

    def prepared(self) -> list[str]:
        """The gids of prepared (in-doubt) transactions."""
        self._check_open()
        return sorted(self._prepared)

    def commit_prepared(self, gid: str) -> int:
        """Commit a prepared transaction; returns its commit LSN."""
        self._check_open()
        self._check_writable()
        p = self._get_prepared(gid)
        extra = dict(p.extra)
        extra["gid"] = gid
        if p.actions:
            extra["actions"] = [dict(a, state="committed") for a in p.actions]
        with self._lock:
            payload = records.commit_payload(p.txid, [list(w) for w in p.writes], p.meta, extra)
            lsn, end = self.wal.append(RecordType.COMMIT, payload)
            entry = CommitEntry(p.txid, lsn, end, time.time(), p.meta, p.writes, extra)
            self._note_commit(entry)
            self._release(gid)
            if self.durability != "full":
                self._publish(self.wal.written_lsn)
        if self.durability == "full":
            self.wal.sync_to(end)
            with self._lock:
                self._publish(self.wal.synced_lsn)
        self._put_decision(gid, "commit")
        return lsn

    def rollback_prepared(self, gid: str) -> None:
        """Roll back a prepared transaction (compensating its actions)."""
        self._check_open()
        self._check_writable()
        p = self._get_prepared(gid)
        with self._lock:
            _lsn, end = self.wal.append(RecordType.ROLLBACK_PREPARED,
                                        pack({"tx": p.txid, "gid": gid}))
            self._release(gid)
        self.wal.sync_to(end)
        self.state.write(lambda txn: txn.delete(PREPARED_PREFIX + gid.encode(),
                                                db=self.state.meta2))
        self._put_decision(gid, "abort")
        if p.actions:
            self._compensate([Action.from_row(dict(a, state="pending")) for a in p.actions])

    def _get_prepared(self, gid: str) -> PreparedTxn:
        check_gid(gid)
        if gid not in self._prepared:
            raise KeyError(f"no prepared transaction with gid {gid!r}")
        return self._prepared[gid]

    def _put_decision(self, gid: str, decision: str) -> None:
        self.state.write(lambda txn: txn.put(DECISION_PREFIX + gid.encode(), decision.encode(),
                                             db=self.state.meta2))

    def _decision(self, gid: str) -> str | None:
        raw = self.state.get(DECISION_PREFIX + gid.encode(), self.state.meta2)
        return None if raw is None else raw.decode()

    def decision(self, gid: str) -> str | None:
        """What this store decided for ``gid``: "commit", "abort", "prepared" or None."""
        self._check_open()
        if gid in self._prepared:
            return "prepared"
        return self._decision(gid)

    def _index_prepared(self, txn, entry) -> None:
        gid = entry.extra.get("gid")
        if gid:
            txn.delete(PREPARED_PREFIX + gid.encode(), db=self.state.meta2)
            txn.put(DECISION_PREFIX + gid.encode(), b"commit", db=self.state.meta2)

    def _load_prepared(self, recovered: "PrepareRecovery") -> list[str]:
        """Rebuild the in-doubt set after recovery; returns the gids."""
        rows = {}
        for k, raw in self.state.scan(PREPARED_PREFIX, PREPARED_PREFIX[:-1] + b";",
                                      db=self.state.meta2):
            row = unpack(raw)
            rows[row["gid"]] = row
        for gid, row in recovered.open.items():
            if gid not in rows:
                rows[gid] = row
        for gid in recovered.ended:
            rows.pop(gid, None)
        if rows:
            def body(txn) -> None:
                for gid, row in rows.items():
                    txn.put(PREPARED_PREFIX + gid.encode(), pack(row), db=self.state.meta2)
                for gid in recovered.ended:
                    txn.delete(PREPARED_PREFIX + gid.encode(), db=self.state.meta2)
            self.state.write(body)
        for row in rows.values():
            self._hold(PreparedTxn.from_row(row))
        return sorted(rows)


def _in_ranges(key: bytes, ranges) -> bool:
    return any(key >= lo and (hi is None or key < hi) for lo, hi in ranges)


class PrepareRecovery:
    """Recovery's view of two-phase records: PREPAREs not followed by a decision."""

    def __init__(self) -> None:
        self.open: dict[str, dict] = {}
        self.ended: set[str] = set()
        self.txids: dict[int, str] = {}

    def handlers(self) -> dict:
        return {RecordType.PREPARE: self._prepare, RecordType.ROLLBACK_PREPARED: self._end,
                RecordType.COMMIT: self._end}

    def _prepare(self, rec, body: dict) -> None:
        gid = body.get("gid")
        if isinstance(gid, str):
            self.open[gid] = body
            self.ended.discard(gid)
            self.txids[body.get("tx")] = gid

    def _end(self, rec, body: dict) -> None:
        gid = body.get("gid")
        if isinstance(gid, str):
            self.open.pop(gid, None)
            self.ended.add(gid)
