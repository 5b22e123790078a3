"""Consistent online backup: a copy of a store that opens as the store was at one moment.

Order is what makes it consistent while a writer keeps committing:

1. copy LMDB with ``env.copy`` (a consistent snapshot at its ``applied`` LSN ``A``);
2. copy every retained WAL segment, the last one only up to the end of its valid
   records, each byte of them checked first (read with walstore.log.reader): damage
   anywhere in them, below ``A`` too, refuses the backup naming file, offset and LSN;
3. check that the copied WAL still reaches down to ``A`` (a checkpoint may have trimmed
   a segment in between; then start over).

The copy's identity file carries ``origin: {"kind": "backup"}``: its first open runs
recovery, which REDOes the WAL from ``A`` and ends the transactions that were in flight in
the source — but never runs their compensations (the source machine did or will): they
are listed as pending, ``held`` (promise 10).  Files 0600, directories 0700; a
destination inside the source is refused.
"""
from __future__ import annotations

import errno
import os
import shutil
import time

import lmdb

from .. import fileio
from ..errors import CorruptionError, NotAStore, StoreIOError, WalstoreError
from ..engine.engine import check_not_inside
from ..engine.layout import Layout
from ..engine.lmdb_state import LmdbState
from ..log.reader import LogEvent, LogReader, damage_that_stays
from ..log.writer import SEAL_RECORD_SIZE

MAX_ATTEMPTS = 5


def backup(src: str, dest: str, progress=None) -> dict:
    """Copy the store at ``src`` to the new directory ``dest``; returns a summary."""
    layout = Layout(src)
    store_id = layout.read_identity()
    check_not_inside(src, dest)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise NotAStore(f"backup destination {dest} exists and is not empty")
    existed = os.path.isdir(dest)  # (an empty directory given: it is kept on failure)
    state = LmdbState(layout.db, readonly=True)
    damage = None
    done = False
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            summary = _attempt(layout, store_id, state, dest, progress)
            if isinstance(summary, dict):
                summary["attempts"] = attempt
                done = True
                return summary
            damage = summary  # (None: raced with a checkpoint; a str: damage seen)
            time.sleep(0.05 * attempt)
        if damage is not None:
            raise CorruptionError(f"backup of {src} refused: its WAL is damaged ({damage}); "
                                  f"a copy would silently lack the commits behind it")
        raise WalstoreError(f"backup of {src} kept racing with checkpoints; try again")
    finally:
        state.close()
        if not done:  # (a full disk, damage, an interrupt: no half-made copy left behind,
            _remove_made(dest, existed)  # which a retry would refuse as not empty)


def _remove_made(dest: str, existed: bool) -> None:
    """Remove what a failed backup made at ``dest``: all of it, or, when ``dest`` was an
    empty directory given to it, what it made inside."""
    if not os.path.lexists(dest):
        return
    if not existed:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for name in os.listdir(dest):
        p = os.path.join(dest, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def _writing_dest(what: str, path: str, e: Exception) -> StoreIOError:
    """An error writing the copy, naming the destination (an LMDB copy's error named no
    file: the CLI named the source's LMDB, whose device was fine)."""
    code = getattr(e, "errno", None) or _ERRNO_BY_TEXT.get(str(e).rsplit(": ", 1)[-1],
                                                             errno.EIO)
    return StoreIOError(code, f"writing {what} failed ({getattr(e, 'strerror', None) or e}); "
                              f"the partial copy was removed", path)


_ERRNO_BY_TEXT = {os.strerror(n): n for n in errno.errorcode}


def _attempt(layout: Layout, store_id: bytes, state: LmdbState, dest: str, progress
             ) -> dict | str | None:
    """One try: the summary; None (raced with a checkpoint: try again); or what damage of
    the source's log it met (tried again too: a live writer's tail can look torn)."""
    if os.path.exists(dest):
        shutil.rmtree(dest)
    out = Layout(dest)
    try:
        fileio.make_dir(out.root)
        fileio.make_dir(out.wal)
        fileio.make_dir(out.db)
        # no map resize while LMDB copies itself
        state.gate.call(lambda: state.env.copy(out.db, compact=True))
    except (OSError, lmdb.Error) as e:
        if isinstance(e, WalstoreError):
            raise
        raise _writing_dest("the backup's LMDB copy", out.db, e) from e
    for name in os.listdir(out.db):
        os.chmod(os.path.join(out.db, name), fileio.FILE_MODE)
    copied_state = LmdbState(out.db, readonly=True)
    try:
        applied = copied_state.applied_lsn()
    finally:
        copied_state.close()
    log = LogReader(layout.wal, store_id, applied)
    segs = log.segments
    if segs and segs[0][0] > applied:  # (a checkpoint trimmed it meanwhile, or it is lost)
        return (f"the WAL begins at LSN {segs[0][0]} but LMDB is applied only up to "
                f"{applied}")
    # the end of the valid log, as the reader sees it now (the last segment's tail); any
    # damage on the way is refused, never copied as an ordinary end (the copy's log would
    # end at it: a backup that verifies clean yet lacks every commit behind the damage)
    sealed_end = False
    # walked from the first segment copied, not from ``applied``: every byte copied is
    # checked (damage below ``applied`` copied unchecked made a copy no open accepts)
    for item in log.walk(from_lsn=segs[0][0] if segs else applied):
        if not isinstance(item, LogEvent):
            continue
        if item.kind == "end" and item.scan is not None:
            sealed_end = item.scan.sealed  # (of the last segment walked, in the end)
        if item.kind == "vanished":
            return None
        if item.kind == "end" and item.verdict == "corrupt" and item.last \
                and item.scan is not None and item.reader is not None \
                and damage_that_stays(item.path, store_id, item.reader.start_lsn,
                                      item.scan.offset) is None:
            continue  # a live writer's record caught half copied in: the copy ends before
        if item.kind in ("gap", "bad-segment", "missing-next") \
                or item.kind == "end" and item.verdict == "corrupt":
            where = f", offset {item.scan.offset}," if item.scan is not None else ""
            return (f"{item.kind if item.kind != 'end' else 'corrupt record'} at LSN "
                    f"{item.lsn} in {item.path}{where} {item.reason}")
    # the last segment listed was sealed meanwhile (a live writer rotated to a segment
    # made after the listing): copied with its SEAL, the copy's log would end in a sealed
    # segment without a successor, which no open accepts (a probe: 2 bad copies in 16
    # backups beside two writer threads); without it, the copy's log ends cleanly there
    end_limit = log.end_offset - SEAL_RECORD_SIZE if sealed_end else log.end_offset
    copied = 0
    for i, (start, path) in enumerate(segs):
        limit = end_limit if start == log.end_segment else None
        target = os.path.join(out.wal, os.path.basename(path))
        try:
            copied += _copy_file(path, target, limit)
        except FileNotFoundError:  # trimmed under us
            return None
        except OSError as e:
            if isinstance(e, WalstoreError) or not os.path.exists(path):
                raise
            raise _writing_dest("the backup's WAL segment", target, e) from e
        if progress:
            progress(i + 1, len(segs))
    try:
        out.write_identity(store_id, origin={"kind": "backup", "from": layout.root,
                                             "ts": time.time()})
    except OSError as e:
        if isinstance(e, WalstoreError):
            raise
        raise _writing_dest("the backup's identity file", out.identity, e) from e
    fileio.fsync_dir(out.wal)
    fileio.fsync_dir(out.root)
    return {"source": layout.root, "dest": out.root, "applied_lsn": applied,
            "segments": len(segs), "wal_bytes": copied}


def _copy_file(src: str, dst: str, limit: int | None) -> int:
    """Copy ``src`` (only its first ``limit`` bytes, the rest as zeros: a segment keeps its
    preallocated size, and bytes written after the valid end are not part of the copy)."""
    fd = fileio.open_file(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    n = 0
    size = os.path.getsize(src)
    try:
        with open(src, "rb") as f:
            while limit is None or n < limit:
                want = 1 << 20 if limit is None else min(1 << 20, limit - n)
                chunk = f.read(want)
                if not chunk:
                    break
                fileio.pwrite_all(fd, chunk, n)
                n += len(chunk)
        copied = n
        while n < size:
            zeros = bytes(min(1 << 20, size - n))
            fileio.pwrite_all(fd, zeros, n)
            n += len(zeros)
        fileio.fsync(fd)
    finally:
        os.close(fd)
    return copied
