"""Consistent online backup: a copy of a store that opens as the store was at one moment.

Order is what makes it consistent while a writer keeps committing and checkpointing (a
writer in another process: nothing here can hold its checkpoints back):

1. open every WAL segment (a checkpoint may remove one from the directory meanwhile: its
   bytes stay readable through the open file);
2. begin an LMDB read transaction (the snapshot, at its ``applied`` LSN ``A``) and open the
   segments made since step 1: every segment that existed at the snapshot is held now
   (the oldest reaches down to ``A``: a checkpoint trims only below LMDB's ``applied``),
   unless one was trimmed in the instant between the snapshot and the listing (then
   start over); copy LMDB from that transaction (``env.copy``, compacting);
3. copy the held segments' bytes, then check every byte of the copy (read with
   walstore.log.reader): damage anywhere in them, below ``A`` too, refuses the backup
   naming file, offset and LSN; the last segment ends at its valid end (a record a live
   writer was writing, or a SEAL whose successor was made after the listing, is cut).

(LMDB was copied first and the WAL listed after it: under steady load a checkpoint
trimmed the segments from ``A`` during every copy, and each of the 5 attempts refused a
healthy store as damaged — probe55.)

The copy's identity file carries ``origin: {"kind": "backup"}``: its first open runs
recovery, which REDOes the WAL from ``A`` and ends the transactions that were in flight in
the source — but never runs their compensations (the source machine did or will): they
are listed as pending, ``held`` (promise 10).  Files 0600, directories 0700; a
destination inside the source is refused.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from typing import Iterator

import lmdb

from .. import fileio
from ..errors import CorruptionError, NotAStore, StoreIOError, WalstoreError
from ..engine.engine import check_not_inside
from ..engine.layout import Layout
from ..engine.lmdb_state import LmdbState
from ..log.reader import LogEvent, LogReader, damage_that_stays
from ..log.segment import list_segments
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
    held: dict[int, tuple[str, int]] = {}  # start LSN -> (source path, open fd)
    try:
        try:
            fileio.make_dir(out.root)
            fileio.make_dir(out.wal)
            fileio.make_dir(out.db)
        except OSError as e:
            if isinstance(e, WalstoreError):
                raise
            raise _writing_dest("the backup's directory", out.root, e) from e
        _hold(layout.wal, held, before_snapshot=True)
        raced = False
        with state.read() as txn:  # LMDB's snapshot (and no map resize meanwhile)
            # every segment that exists at the snapshot is held now: those of the first
            # listing, those made since (a segment trimmed between the two is wholly
            # below the snapshot's applied LSN, unless it goes in the instant between the
            # snapshot and this listing: then try again)
            raced = not _hold(layout.wal, held, before_snapshot=False)
            if not raced:
                try:
                    state.env.copy(out.db, compact=True, txn=txn)
                except (OSError, lmdb.Error) as e:
                    if isinstance(e, WalstoreError):
                        raise
                    raise _writing_dest("the backup's LMDB copy", out.db, e) from e
        if raced:
            return None
        for name in os.listdir(out.db):
            os.chmod(os.path.join(out.db, name), fileio.FILE_MODE)
        copied_state = LmdbState(out.db, readonly=True)
        try:
            applied = copied_state.applied_lsn()
        finally:
            copied_state.close()
        segs = sorted(held.items())
        if segs and segs[0][0] > applied:  # (held since before the snapshot: never trimmed
            return (f"the WAL begins at LSN {segs[0][0]} but LMDB is applied only up to "
                    f"{applied}")  # meanwhile; the segment is lost)
        # the bytes of the held segments, as they are now (a trimmed one's too: the open
        # file keeps them), copied first and then checked where they lie, in the copy
        sizes = {}
        for i, (start, (path, fd)) in enumerate(segs):
            target = os.path.join(out.wal, os.path.basename(path))
            sizes[target] = _copy_fd(fd, path, target)
            if progress:
                progress(i + 1, len(segs))
    finally:
        for _path, fd in held.values():
            os.close(fd)
    return _check_and_finish(layout, out, store_id, applied, sizes)


def _hold(wal_dir: str, held: dict, before_snapshot: bool) -> bool:
    """Open every segment listed in ``wal_dir`` not held yet (an open file's bytes stay
    readable after a checkpoint removes it).  False when a segment went between the
    listing and its open.  Before the snapshot, that is a checkpoint's trim, wholly
    below the applied LSN the snapshot will have: the held segments older than it are
    let go too (the chain copied begins after it, without a hole)."""
    try:
        listed = list_segments(wal_dir)
    except OSError as e:
        raise StoreIOError(e.errno, f"cannot list the WAL directory of the store to back "
                                    f"it up: {e.strerror or e}", wal_dir) from e
    _room_for_files(len(held) + len(listed))
    gone = None
    for start, path in listed:
        if start in held:
            continue
        try:
            held[start] = (path, os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except FileNotFoundError:
            gone = start
        except OSError as e:
            raise StoreIOError(e.errno, f"cannot open the store's WAL segment to back it "
                                        f"up: {e.strerror or e}", path) from e
    if gone is not None and before_snapshot:
        for start in [s for s in held if s < gone]:
            os.close(held.pop(start)[1])
        return True
    return gone is None


def _room_for_files(n: int) -> None:
    """Let this process open ``n`` more files than it has (a store keeping thousands of
    small segments: the soft limit is often 1,024), as far as the hard limit allows."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = n + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (
                want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ImportError, ValueError, OSError):
        pass  # (then an open that fails says so)


def _copy_fd(fd: int, src: str, dst: str) -> int:
    """Copy the whole segment ``src``, open as ``fd``, to ``dst`` (not synced yet: see
    ``_check_and_finish``); returns its size."""
    out = fileio.open_file(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    n = 0
    try:
        while True:
            try:
                chunk = os.pread(fd, 1 << 20, n)
            except OSError as e:
                raise StoreIOError(e.errno, f"reading the store's WAL segment failed "
                                            f"({e.strerror or e}); the partial copy was "
                                            f"removed", src) from e
            if not chunk:
                break
            try:
                fileio.pwrite_all(out, chunk, n)
            except OSError as e:
                if isinstance(e, WalstoreError):
                    raise
                raise _writing_dest("the backup's WAL segment", dst, e) from e
            n += len(chunk)
    finally:
        os.close(out)
    return n


def _check_and_finish(layout: Layout, out: Layout, store_id: bytes, applied: int,
                      sizes: dict[str, int]) -> dict | str | None:
    """Check every byte of the copied WAL (read with walstore.log.reader), end it cleanly,
    sync it and write the copy's identity: the summary; or the damage met (a str)."""
    log = LogReader(out.wal, store_id, applied)
    segs = log.segments
    # the end of the valid log, as the copy holds it (the last segment's tail); any damage
    # on the way is refused, never copied as an ordinary end (the copy's log would end at
    # it: a backup that verifies clean yet lacks every commit behind the damage)
    sealed_end = False
    # walked from the first segment copied, not from ``applied``: every byte copied is
    # checked (damage below ``applied`` copied unchecked made a copy no open accepts)
    for item in log.walk(from_lsn=segs[0][0] if segs else applied):
        if not isinstance(item, LogEvent):
            continue
        source = os.path.join(layout.wal, os.path.basename(item.path))
        if item.kind == "end" and item.scan is not None:
            sealed_end = item.scan.sealed  # (of the last segment walked, in the end)
        if item.kind == "end" and item.verdict == "corrupt" and item.last \
                and item.scan is not None and item.reader is not None \
                and damage_that_stays(source, store_id, item.reader.start_lsn,
                                      item.scan.offset) is None:
            continue  # a live writer's record caught half copied in: the copy ends before
        if item.kind == "missing-next" and _log_went_on(layout.wal, item.lsn):
            continue  # the last segment copied was sealed since the listing (below)
        if item.kind in ("gap", "bad-segment", "missing-next", "vanished") \
                or item.kind == "end" and item.verdict == "corrupt":
            where = f", offset {item.scan.offset}," if item.scan is not None else ""
            return (f"{item.kind if item.kind != 'end' else 'corrupt record'} at LSN "
                    f"{item.lsn} in {source}{where} {item.reason}")
    # the last segment copied was sealed meanwhile (a live writer rotated to a segment
    # made after the listing): with its SEAL, the copy's log would end in a sealed
    # segment without a successor, which no open accepts (a probe: 2 bad copies in 16
    # backups beside two writer threads); without it, the copy's log ends cleanly there;
    # what lies after the valid end (a record being written) is not part of the copy
    copied = 0
    for start, path in segs:
        if start == log.end_segment:
            end = log.end_offset - SEAL_RECORD_SIZE if sealed_end else log.end_offset
            _zero_from(path, end, sizes[path])
            copied += end
        else:
            copied += sizes[path]
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            with _writing("the backup's WAL segment", path):
                fileio.fsync(fd)
        finally:
            os.close(fd)
    with _writing("the backup's identity file", out.identity):
        out.write_identity(store_id, origin={"kind": "backup", "from": layout.root,
                                             "ts": time.time()})
    fileio.fsync_dir(out.wal)
    fileio.fsync_dir(out.root)
    return {"source": layout.root, "dest": out.root, "applied_lsn": applied,
            "segments": len(segs), "wal_bytes": copied}


def _log_went_on(wal_dir: str, lsn: int) -> bool:
    """Does the store's log reach ``lsn`` now (a segment starts there or after it: made
    since the listing, maybe trimmed again since)?  Else its newest segment is missing."""
    try:
        return any(start >= lsn for start, _path in list_segments(wal_dir))
    except OSError:
        return False


def _zero_from(path: str, offset: int, size: int) -> None:
    """Zeros over ``path``'s [offset, size): a segment keeps its preallocated size, and the
    bytes after the copy's valid end are not part of it."""
    fd = fileio.open_file(path, os.O_WRONLY)
    try:
        with _writing("the backup's WAL segment", path):
            n = offset
            while n < size:
                zeros = bytes(min(1 << 20, size - n))
                fileio.pwrite_all(fd, zeros, n)
                n += len(zeros)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _writing(what: str, path: str) -> Iterator[None]:
    """An OSError writing the copy: StoreIOError naming the destination (``_writing_dest``;
    a WalstoreError goes through as it is)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, WalstoreError):
            raise
        raise _writing_dest(what, path, e) from e
