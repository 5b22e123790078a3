"""Consistent online backup: a copy of a store that opens as the store was at one moment.

Order is what makes it consistent while a writer keeps committing:

1. copy LMDB with ``env.copy`` (a consistent snapshot at its ``applied`` LSN ``A``);
2. copy the WAL segments, the last one only up to the end of its valid records;
3. check that the copied WAL still reaches down to ``A`` (a checkpoint may have trimmed
   a segment in between; then start over).

Opening the copy runs recovery, which REDOes the WAL from ``A``: the copy holds every
commit acknowledged before step 2 finished.  Files are created 0600, directories 0700.
"""
from __future__ import annotations

import os
import shutil
import time

import lmdb

from . import fileio
from .errors import NotAStore, WalstoreError
from .layout import Layout
from .segments import SegmentReader, list_segments

MAX_ATTEMPTS = 5


def backup(src: str, dest: str, env: lmdb.Environment | None = None, progress=None) -> dict:
    """Copy the store at ``src`` to the new directory ``dest``; returns a summary."""
    layout = Layout(src)
    store_id = layout.read_identity()
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise NotAStore(f"backup destination {dest} exists and is not empty")
    own_env = env is None
    if own_env:
        env = lmdb.open(layout.db, readonly=True, lock=True, max_dbs=8, subdir=True)
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            summary = _attempt(layout, store_id, env, dest, progress)
            if summary is not None:
                summary["attempts"] = attempt
                return summary
            time.sleep(0.05 * attempt)
        raise WalstoreError(f"backup of {src} kept racing with checkpoints; try again")
    finally:
        if own_env:
            env.close()


def _attempt(layout: Layout, store_id: bytes, env, dest: str, progress) -> dict | None:
    if os.path.exists(dest):
        shutil.rmtree(dest)
    out = Layout(dest)
    fileio.make_dir(out.root)
    fileio.make_dir(out.wal)
    fileio.make_dir(out.db)
    env.copy(out.db, compact=True)
    for name in os.listdir(out.db):
        os.chmod(os.path.join(out.db, name), fileio.FILE_MODE)
    applied = _applied(out.db)
    segs = list_segments(layout.wal)
    if segs and segs[0][0] > applied:
        return None
    copied = 0
    for i, (start, path) in enumerate(segs):
        try:
            limit = None
            if i == len(segs) - 1:
                reader = SegmentReader(path, store_id, start)
                for _ in reader.records():
                    pass
                limit = reader.end.offset
            copied += _copy_file(path, os.path.join(out.wal, os.path.basename(path)), limit)
        except FileNotFoundError:  # trimmed under us
            return None
        if progress:
            progress(i + 1, len(segs))
    fileio.write_file_atomic(out.identity, open(layout.identity, "rb").read())
    fileio.fsync_dir(out.wal)
    fileio.fsync_dir(out.root)
    return {"source": layout.root, "dest": out.root, "applied_lsn": applied,
            "segments": len(segs), "wal_bytes": copied}


def _applied(db_dir: str) -> int:
    env = lmdb.open(db_dir, readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(db=meta) as txn:
            raw = txn.get(b"applied")
        return int.from_bytes(raw, "big") if raw else 0
    finally:
        env.close()


def _copy_file(src: str, dst: str, limit: int | None) -> int:
    fd = fileio.open_file(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    n = 0
    try:
        with open(src, "rb") as f:
            while limit is None or n < limit:
                want = 1 << 20 if limit is None else min(1 << 20, limit - n)
                chunk = f.read(want)
                if not chunk:
                    break
                fileio.pwrite_all(fd, chunk, n)
                n += len(chunk)
        fileio.fsync(fd)
    finally:
        os.close(fd)
    return n
