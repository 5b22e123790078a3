"""Rebuild a store's LMDB state from its WAL (``walstore recover PATH --rebuild-state``).

LMDB holds nothing the log did not say first, so when LMDB's data file is lost or
damaged and the WAL is still whole from LSN 0 (no checkpoint trimmed its head, no
salvage sealed it: a young store, or one opened with a large ``checkpoint_bytes``), a
fresh LMDB brought forward by recovery's REDO over the whole log is the store again.
When the log does not reach back to LSN 0, or is damaged, nothing can rebuild what
LMDB held: the only way back is a backup or a replica, and :func:`rebuild_refusal` says
so.

The damaged ``db/`` directory is not deleted here: it moves to ``quarantine/`` (evidence,
``db.damaged.<stamp>.<pid>``), and the new LMDB is made beside it before it takes its
place, under the writer lock.  A later ``store.purge`` removes it (it may hold the erased
keys and cannot be read with certainty: walstore.engine.scrub).
"""
from __future__ import annotations

import os
import shutil
import time

from .. import fileio
from ..engine.layout import Layout, ProcessLock
from ..engine.lmdb_state import LmdbState
from ..errors import CorruptionError
from ..log.reader import LogEvent, LogReader
from ..log.segment import list_segments


def rebuild_refusal(path: str) -> str | None:
    """Why LMDB cannot be rebuilt from the WAL at ``path`` (None: it can)."""
    layout = Layout(path)
    store_id = layout.read_identity(lmdb_lost_ok=True)
    segs = list_segments(layout.wal)
    if not segs:
        return "the store has no WAL segment"
    if segs[0][0] != 0:
        return (f"the WAL begins at LSN {segs[0][0]}, not 0 (checkpoints removed the log "
                f"before it: only LMDB held those commits)")
    log = LogReader(layout.wal, store_id)
    for item in log.walk():
        if not isinstance(item, LogEvent):
            continue
        if item.kind in ("gap", "bad-segment", "missing-next", "vanished") or (
                item.kind == "end" and item.verdict == "corrupt"):
            where = f" offset {item.scan.offset}" if item.scan is not None else ""
            return (f"the WAL is damaged at LSN {item.lsn} ({item.path}{where}: "
                    f"{item.reason})")
    return None


def rebuild_state(path: str) -> str:
    """Move the damaged ``db/`` to quarantine and put an empty LMDB in its place (the next
    writer open REDOes the whole WAL into it); returns where the old one went.
    CorruptionError (nothing changed) when the WAL cannot rebuild it."""
    layout = Layout(path)
    lock = ProcessLock(layout)  # (StoreLocked while a writer runs: nothing changed)
    try:
        why = rebuild_refusal(path)
        if why is not None:
            raise CorruptionError(f"LMDB's state cannot be rebuilt from the log: {why}; "
                                  f"nothing was changed: restore the store from a backup "
                                  f"(walstore backup) or a replica", file=layout.wal)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        fileio.make_dir(layout.quarantine)
        work = os.path.join(layout.quarantine, f"rebuild.{stamp}.{os.getpid()}")
        fresh = os.path.join(work, "db")  # (no wal/ beside it: LMDB is made new there)
        LmdbState(fresh).close()
        old = os.path.join(layout.quarantine, f"db.damaged.{stamp}.{os.getpid()}")
        if os.path.lexists(layout.db):
            fileio.rename(layout.db, old)
        fileio.rename(fresh, layout.db)
        fileio.fsync_dir(layout.quarantine)
        fileio.fsync_dir(layout.root)
        shutil.rmtree(work, ignore_errors=True)
        return old
    finally:
        lock.release()
