"""walstore: an embedded, crash-safe, transactional key-value store for agent state.

A CRC-32C-checksummed msgpack write-ahead log sits in front of LMDB.  Start with
:func:`open`; the promises are in the contract (docs/ and README.md).
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import (CompensationFailed, ConflictError, CorruptionError, HistoryTrimmed,
                     NeedsRecovery, NotAStore, ReadOnlyError, ReplicationError, RevertConflict,
                     StoreClosed, StoreLocked, TransactionClosed, WalstoreError)
from .actions import Action
from .agent import HistoricalView, Version
from .coordinator import atomic, resolve_atomic
from .recovery import RecoveryReport
from .txlog import LSN, TxnInfo
from .store import Options, Store
from .txn import Savepoint, Transaction

__version__ = "0.1.0"

__all__ = [
    "open", "Store", "Transaction", "Savepoint", "Options", "RecoveryReport", "TxnInfo",
    "Action", "LSN", "Version", "HistoricalView", "atomic", "resolve_atomic",
    "WalstoreError", "ConflictError", "RevertConflict", "CompensationFailed", "NeedsRecovery",
    "CorruptionError", "StoreLocked", "ReadOnlyError", "StoreClosed", "NotAStore",
    "TransactionClosed", "HistoryTrimmed", "ReplicationError", "restore",
]


def open(path: str, *, durability: str = "full", create: bool = True, readonly: bool = False,
         recover: str = "auto", compensators: dict[str, Callable] | None = None,
         map_size: int | None = None, options: Options | None = None,
         replicate_to: str | None = None, replicate_options: Any = None,
         **tuning: Any) -> Store:
    """Open (creating if missing) the store at ``path``.

    durability: "full" (fsync before commit returns), "normal" (fsync within
    ``Options.sync_interval``, 0.2 s by default) or "none".  recover: "auto" recovers an
    unclean shutdown on open; "manual" raises NeedsRecovery instead.  Extra keyword
    arguments are Options fields (segment_size, checkpoint_bytes, ...).
    """
    if tuning:
        if options is not None:
            raise TypeError("pass either options= or tuning keywords, not both")
        options = Options(**tuning)
    return Store(path, durability=durability, create=create, readonly=readonly, recover=recover,
                 compensators=compensators, map_size=map_size, options=options,
                 replicate_to=replicate_to, replicate_options=replicate_options)


def restore(url: str, dest: str, to: Any = None, replicate_options: Any = None) -> dict:
    """[replication wiring] A new store at ``dest`` from the replica at ``url``, cut at
    ``to`` (a txid, walstore.LSN, a restore point name, an aware datetime; None: all)."""
    from .replication import restore as _restore
    return _restore(url, dest, to, replicate_options)
