"""Transactions and savepoints: the unit of work an agent does against the store.

A transaction buffers its writes in memory (nothing reaches the WAL before commit, so a
rollback costs nothing on disk) and reads its own writes.  Reads of committed state are
tracked for optimistic validation at commit (see ``Store._validate``).

Savepoints follow SQLite: ``savepoint(name)`` pushes one; ``rollback_to(sp)`` undoes every
write made after ``sp`` and discards savepoints newer than it while ``sp`` stays usable;
``release(sp)`` pops ``sp`` and every newer savepoint and keeps their writes; a name
refers to the innermost savepoint of that name.  ``with tx.savepoint(...)`` releases on a
normal exit, and on an exception rolls back to it, releases it and re-raises.

Invariants: ``_undo`` holds, in order, the previous state of every write made while a
savepoint existed, so rolling back to a savepoint restores exactly the write set it saw;
a transaction is used by one thread; once committed or rolled back, every call raises
TransactionClosed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from .codec import Key, decode_key, encode_key, pack_value, unpack_value
from .errors import TransactionClosed
from .txlog import LSN

if TYPE_CHECKING:
    from .store import Store

_MISSING = object()
ACTIVE, COMMITTED, ROLLED_BACK = "active", "committed", "rolled back"


class Savepoint:
    """A named point inside a transaction.  Use it with ``rollback_to`` / ``release``."""

    def __init__(self, tx: "Transaction", name: str | None, undo_len: int, serial: int) -> None:
        self.name = name
        self._tx = tx
        self._undo_len = undo_len
        self._serial = serial
        self.active = True
        self.action_mark = 0  # how many actions existed when it was taken (agent layer)

    def __enter__(self) -> "Savepoint":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active or self._tx.state != ACTIVE:
            return False
        if exc_type is not None:
            self._tx.rollback_to(self)
        self._tx.release(self)
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "gone"
        return f"<Savepoint {self.name!r} #{self._serial} {state}>"


class Transaction:
    """A unit of work; commit on ``with`` exit, roll back on an exception."""

    def __init__(self, store: "Store", txid: int, meta: Any, start_lsn: int) -> None:
        self._store = store
        self.id = txid
        self.meta = meta
        self.lsn: int | None = None
        self.state = ACTIVE
        self.start_lsn = start_lsn
        self._writes: dict[bytes, bytes | None] = {}
        self._undo: list[tuple[bytes, Any]] = []
        self._savepoints: list[Savepoint] = []
        self._serial = 0
        self.read_keys: set[bytes] = set()
        self.read_ranges: list[tuple[bytes, bytes | None]] = []
        self.actions: list = []  # agent layer: live actions (rolled-back ones removed)
        self.actions_ever: list = []  # every action begun (numbers action ids)
        self.commit_extra: dict | None = None  # agent layer: extra commit record fields
        self.gid: str | None = None  # set by prepare()
        self.snapshot = None  # read-only stores: the consistent view this transaction reads
        self.first_logged_lsn: int | None = None  # set once the tx logs a record before commit

    # ---- context manager ---------------------------------------------------------------
    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.state != ACTIVE:
            return False
        if exc_type is not None:
            self.rollback()
        else:
            self.commit()
        return False

    def _check_active(self) -> None:
        if self.state != ACTIVE:
            raise TransactionClosed(f"transaction {self.id} is already {self.state}")
        self._store._check_open()

    # ---- reads and writes --------------------------------------------------------------
    def get(self, key: Key, default: Any = None) -> Any:
        self._check_active()
        k = encode_key(key)
        if k in self._writes:
            v = self._writes[k]
        else:
            self.read_keys.add(k)
            v = self._store._tx_read(self, k)
        return default if v is None else unpack_value(v)

    def __getitem__(self, key: Key) -> Any:
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def __contains__(self, key: Key) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def put(self, key: Key, value: Any) -> None:
        store = self._store
        if (self.state != ACTIVE or store._closed or store.readonly
                or store.wal.failed is not None):  # one test on the hot path; raise below
            self._check_active()
            store._check_writable()
        self._set(encode_key(key), pack_value(value, key))

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: Key) -> None:
        self._check_active()
        self._store._check_writable()
        self._set(encode_key(key), None)

    def __delitem__(self, key: Key) -> None:
        self.delete(key)

    def _set(self, k: bytes, packed: bytes | None) -> None:
        if self.gid is not None:
            raise TransactionClosed(f"transaction {self.id} is prepared as {self.gid!r}; "
                                    f"it takes no more writes")
        if self._savepoints:
            self._undo.append((k, self._writes.get(k, _MISSING)))
        self._writes[k] = packed

    def scan(self, prefix: Key | None = None, start: Key | None = None, end: Key | None = None,
             reverse: bool = False) -> Iterator[tuple[Key, Any]]:
        """(key, value) in key order within the bounds (start inclusive, end exclusive)."""
        self._check_active()
        lo, hi = self._store._scan_bounds(prefix, start, end)
        self.read_ranges.append((lo, hi))
        mine = sorted((k, v) for k, v in self._writes.items()
                      if k >= lo and (hi is None or k < hi))
        for k, v in self._store._merged_scan(lo, hi, reverse, mine, self.snapshot):
            yield decode_key(k), unpack_value(v)

    # ---- external side effects ---------------------------------------------------------
    def action(self, name: str, args: Any = None, compensate: str | None = None):
        """``with tx.action("charge", args=..., compensate="refund") as act:`` (Saga).

        Entering logs a durable intent before the body runs; ``act.key`` is a stable
        idempotency key; set ``act.result``.  See walstore.actions.
        """
        from .actions import ActionScope
        self._check_active()
        self._store._check_writable()
        return ActionScope(self, self._store._new_action(self, name, args, compensate))

    # ---- savepoints --------------------------------------------------------------------
    def savepoint(self, name: str | None = None) -> Savepoint:
        self._check_active()
        self._serial += 1
        sp = Savepoint(self, name, len(self._undo), self._serial)
        sp.action_mark = len(self.actions)
        self._savepoints.append(sp)
        return sp

    def _find(self, sp: Savepoint | str) -> int:
        if isinstance(sp, Savepoint):
            for i in range(len(self._savepoints) - 1, -1, -1):
                if self._savepoints[i] is sp:
                    return i
            raise ValueError(f"{sp!r} is no longer active in transaction {self.id} "
                             f"(released, or discarded by a rollback to an outer savepoint)")
        if isinstance(sp, str):
            for i in range(len(self._savepoints) - 1, -1, -1):
                if self._savepoints[i].name == sp:
                    return i
            raise ValueError(f"no active savepoint named {sp!r} in transaction {self.id}")
        raise TypeError(f"expected a Savepoint or its name, not {type(sp).__name__}")

    def rollback_to(self, sp: Savepoint | str) -> None:
        """Undo everything after ``sp``; ``sp`` stays usable, newer savepoints are gone."""
        self._check_active()
        i = self._find(sp)
        target = self._savepoints[i]
        while len(self._undo) > target._undo_len:
            k, prev = self._undo.pop()
            if prev is _MISSING:
                self._writes.pop(k, None)
            else:
                self._writes[k] = prev
        for gone in self._savepoints[i + 1:]:
            gone.active = False
        del self._savepoints[i + 1:]
        self._store._after_partial_rollback(self, target.action_mark)

    def release(self, sp: Savepoint | str) -> None:
        """Forget ``sp`` and every newer savepoint; their writes are kept."""
        self._check_active()
        i = self._find(sp)
        for gone in self._savepoints[i:]:
            gone.active = False
        del self._savepoints[i:]
        if not self._savepoints:
            self._undo.clear()

    # ---- two-phase commit --------------------------------------------------------------
    def prepare(self, gid: str) -> None:
        """Phase one: validate and make the transaction durable as prepared (in doubt).

        Its keys stay held against other transactions until ``commit()`` /
        ``store.commit_prepared(gid)`` or ``rollback()`` / ``store.rollback_prepared(gid)``.
        """
        self._check_active()
        if self.gid is not None:
            raise ValueError(f"transaction {self.id} is already prepared as {self.gid!r}")
        self._store._prepare(self, gid)
        self.gid = gid

    # ---- the end -----------------------------------------------------------------------
    def commit(self) -> int | None:
        """Make the writes durable (per the store's durability) and visible.

        Returns the commit record's LSN (None for a transaction that wrote nothing).
        Raises ConflictError (nothing written) when validation fails.
        """
        self._check_active()
        if self.gid is not None:
            self.lsn = LSN(self._store.commit_prepared(self.gid))
            self._finish(COMMITTED, run_compensations=False)
            return self.lsn
        try:
            lsn = self._store._commit(self)
            self.lsn = None if lsn is None else LSN(lsn)
        except BaseException:
            if self.state == ACTIVE:
                self._finish(ROLLED_BACK, run_compensations=True)
            raise
        self._finish(COMMITTED, run_compensations=False)
        return self.lsn

    def rollback(self) -> None:
        """Discard every write; compensate the actions this transaction ran."""
        if self.state != ACTIVE:
            raise TransactionClosed(f"transaction {self.id} is already {self.state}")
        if self.gid is not None:
            self._store.rollback_prepared(self.gid)  # compensates the actions itself
            self._finish(ROLLED_BACK, run_compensations=False)
            return
        self._finish(ROLLED_BACK, run_compensations=True)

    def _finish(self, state: str, run_compensations: bool) -> None:
        self.state = state
        for sp in self._savepoints:
            sp.active = False
        self._savepoints.clear()
        self._writes = {}
        self._undo.clear()
        self._store._end_transaction(self, committed=state == COMMITTED,
                                     run_compensations=run_compensations)

    @property
    def writes(self) -> dict[bytes, bytes | None]:
        """The buffered write set (stored key -> packed value, None for a delete)."""
        return self._writes

    def __repr__(self) -> str:
        return f"<Transaction {self.id} {self.state}>"
