"""walstore: an embedded, crash-safe, transactional key-value store for agent state.

A CRC-32C-checksummed msgpack write-ahead log sits in front of LMDB.  Start with
:func:`open`; the promises are in the README and docs/.  The package's folders show its
architecture: ``log/`` (the WAL), ``engine/`` (commit pipeline, LMDB, snapshots,
recovery, transactions), ``agent/`` (actions, history, undo, 2PC), ``ops/`` (verify,
backup, inspection), ``cli/``, ``integrations/``; ``store.py`` is the facade.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import (CommitOutcomeUnknown, CompensationFailed, ConflictError,
                     CorruptionError, ErasureOwed, HistoryTrimmed, NeedsRecovery, NotAStore, ReadOnlyError,
                     FileConflictError, ReplicationError, RevertConflict, StoreClosed, StoreIOError,
                     StoreLocked,
                     TransactionClosed, TransactionTooLarge, UnknownAction, UnknownGid,
                     UnknownPoint, PointTypeError, UnsupportedFileType,
                     WalstoreError, WorkspaceChanged, UnknownRestorePoint)
from .options import Options, check_flag
from .engine.recovery import RecoveryReport
from .engine.transaction import Savepoint, Transaction
from .agent.actions import Action
from .agent.coordinator import atomic, resolve_atomic
from .agent.history import HistoricalView, Version
from .agent.txlog import LSN, TxnInfo
from .agent.undo import UndoPlan
from .store import Store
# (errors README names that their own modules own; both are loaded by .store already)
from .engine.snapshot import SnapshotTooOld
from .log.writer import WalWriteError

__version__ = "0.2.0"

__all__ = [
    "open", "Store", "Transaction", "Savepoint", "Options", "RecoveryReport", "TxnInfo",
    "Action", "LSN", "Version", "HistoricalView", "UndoPlan", "atomic", "resolve_atomic",
    "WalstoreError", "ConflictError", "RevertConflict", "CompensationFailed", "NeedsRecovery",
    "CorruptionError", "StoreLocked", "ReadOnlyError", "StoreClosed", "NotAStore",
    "TransactionClosed", "TransactionTooLarge", "HistoryTrimmed", "CommitOutcomeUnknown", "UnknownPoint", "PointTypeError",
    "ReplicationError", "FileConflictError", "StoreIOError", "ErasureOwed", "SnapshotTooOld",
    "WalWriteError", "UnknownGid", "UnknownAction", "WorkspaceChanged", "UnknownRestorePoint", "restore",
    "UnsupportedFileType",
]


def open(path: str, *, durability: str = "full", create: bool = True, readonly: bool = False,
         recover: str = "auto", compensators: dict[str, Callable] | None = None,
         map_size: int | None = None, options: Options | None = None,
         replicate_to: str | None = None, replicate_options: Any = None,
         progress: Callable[[int, int], None] | None = None, **tuning: Any) -> Store:
    """Open (creating if missing) the store at ``path``.

    durability: "full" (fsync before commit returns), "normal" (fsync within
    ``Options.sync_interval``, 0.2 s by default) or "none".  recover: "auto" recovers an
    unclean shutdown on open; "manual" raises NeedsRecovery instead.  Extra keyword
    arguments are Options fields (segment_size, checkpoint_bytes, ...), validated.
    ``replicate_to``: an ``s3://bucket/prefix`` or ``file:///dir`` URL the log ships to in
    the background (see ``Store.replication()``, ``sync_replica()``; the [s3] extra).
    ``progress(done, total)``: called as the open's recovery reads the log (bytes), so a
    long one can be shown.
    """
    check_flag("create", create)
    check_flag("readonly", readonly)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress= is a callable progress(done, total) or None, not "
                        f"{type(progress).__name__}")
    if tuning:
        if options is not None:
            raise TypeError("pass either options= or tuning keywords, not both")
        options = Options.from_keywords(tuning)
    return Store(path, durability=durability, create=create, readonly=readonly, recover=recover,
                 compensators=compensators, map_size=map_size, options=options,
                 replicate_to=replicate_to, replicate_options=replicate_options,
                 progress=progress)


def restore(url: str, dest: str, to: Any = None, replicate_options: Any = None, *,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """A new store at ``dest`` from the replica at ``url``, cut exactly at ``to`` (a txid,
    a walstore.LSN, a restore point name, an aware datetime; None: everything shipped).
    Transactions in flight at the cut are listed as pending, never run automatically.
    ``progress(done, total)``: called as the snapshot is downloaded and the WAL replayed
    (bytes), as docs/GUIDE.md documents (it was refused here: only the internal
    ``walstore.replication.restore`` took it)."""
    from .replication import restore as _restore
    return _restore(url, dest, to, replicate_options, progress=progress)
