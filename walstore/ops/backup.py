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
   naming file, offset and LSN, and so do a segment shorter than it was made (no live
   writer's is: it was truncated) and a log whose valid end lies below ``A`` (as
   ``verify`` says it: records LMDB holds are gone); the last segment ends at its valid
   end (a record a live writer was writing, or a SEAL whose successor was made after the
   listing, is cut);
4. copy the file content (``files/blobs``, the reversible files' content store), after
   the WAL: every blob the copy's LMDB snapshot and WAL can name existed before the WAL
   was copied (a blob is durable before a record names it), so the listing taken now
   holds it, unless the writer's blob gc removed it meanwhile (retention moved on, a
   transaction ended).  Blobs are immutable and named by their sha256: each is streamed
   through walstore.files.blobs (hashed; content that does not hash to its name is not
   copied), blobs added since the snapshot are harmless extras, and one that vanished
   while listed is skipped.  The writer's blob gc is held off from before the snapshot
   to the end (``files/gc.lock`` held shared; a gc holds it exclusive, and skips its run
   while a backup holds it: under a writer whose retention moved every few commits, a
   gc removed blobs the snapshot named in every attempt; a gc under way is waited for
   up to ``GC_WAIT_S``, then the copy goes on unheld, checked as below).  Then the copy is opened
   read-only and every blob it refers to (``Files.referenced``: what its own gc would
   keep) must be there; one a gc took (the lock could not be had: a read-only source)
   is a race: the attempt is made again (the blobs copied are kept: same name, same
   bytes); one missing while no gc could run (the lock held, or, after the attempts, no
   writer running) or damaged in the source refuses the backup naming it (a retry
   cannot find it).  (Only db/ and wal/ were
   copied: a backup verified clean, listed file versions, yet could read none of them
   and could not rewind — probe57.)

(LMDB was copied first and the WAL listed after it: under steady load a checkpoint
trimmed the segments from ``A`` during every copy, and each of the 5 attempts refused a
healthy store as damaged — probe55.)

The copy's identity file carries ``origin: {"kind": "backup"}``: its first open runs
recovery, which REDOes the WAL from ``A`` and ends the transactions that were in flight in
the source — but never runs their compensations (the source machine did or will): they
are listed as pending, ``held`` (promise 10); a transaction prepared there stays in doubt,
and rolling it back in the copy holds its actions and file changes too
(walstore.agent.twophase).  Files 0600, directories 0700; a
destination inside the source is refused.  All of it is made in a staging directory
beside the destination and renamed into place when complete (inside an empty destination
that is a mount point, and moved up: see ``backup``): a backup killed mid-way leaves
nothing at the destination that opens as a store.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import os
import stat
import shutil
import tempfile
import time
from typing import Callable, Iterator

import lmdb
import msgpack

from .. import fileio
from ..errors import CorruptionError, NotAStore, StoreIOError, WalstoreError
from ..engine.engine import check_not_inside
from ..engine.layout import Layout, held_flock, let_go_flock, unlock_and_close, writer_alive
from ..engine.lmdb_state import LmdbState
from ..agent.files import GC_LOCK
from ..files.blobs import BlobStore
from ..log.reader import LogEvent, LogReader, damage_that_stays
from ..log.segment import SPARE_NAME, list_segments
from ..log.format import SEAL_RECORD_SIZE, RecordType
from ..signals import deferred

MAX_ATTEMPTS = 5


def backup(src: str, dest: str, progress: Callable[[int, int], None] | None = None) -> dict:
    """Copy the store at ``src`` to the new directory ``dest``; returns a summary.
    ``progress(done, total)``: bytes copied of the LMDB copy and the WAL segments (an
    attempt that must start again starts its count again).

    The copy is made in a staging directory and put into place once complete, file
    content included: a backup killed or failed mid-way leaves no ``dest`` that opens as
    a store (it wrote STORE before copying the file content, so a backup killed then left
    a ``dest`` that opened as a good store lacking the content of its file versions —
    probe-follow45): staged beside ``dest`` (``<dest>.incomplete-backup-<pid>-...``) and
    renamed over it; or, for an empty directory given as ``dest`` that is a mount point
    (a mounted volume's root: a rename over it fails) or whose parent cannot be written,
    staged inside it (``.incomplete-backup-<pid>-...``) and moved up, STORE last
    (``fileio.move_up``).  A staging directory a killed backup left is removed by the
    next backup to ``dest``."""
    from ..replication.shipper import remove_scratch, sweep_dead_scratch  # (no client
    # library imported)
    layout = Layout(src)
    store_id = layout.read_identity()
    check_not_inside(src, dest)
    if os.path.islink(dest):  # (the link's target is the destination, as before)
        dest = os.path.realpath(dest)
    dest = os.path.abspath(dest)
    inside = fileio.stage_inside(dest)  # (a mount point's root, an unwritable parent)
    if inside:
        with _writing("the backup's directory", dest, NO_COPY):
            sweep_dead_scratch(dest, STAGING)  # (a killed backup's, before the check)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise NotAStore(f"backup destination {dest} exists and is not empty"
                        + what_dest_holds(dest, "backup"))
    base = dest if inside else os.path.dirname(dest)
    with _writing("the backup's directory", base, NO_COPY):
        fileio.make_dir(base, own=inside)  # (DEST's parent is the user's: its mode stays)
        stem = fileio.scratch_stem(os.path.basename(dest))  # (within NAME_MAX)
        prefix = STAGING if inside else f"{stem}{STAGING}"
        if not inside:
            sweep_dead_scratch(base, prefix)
        try:
            stage = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
        except OSError as e:  # (its chained error named the staging name it tried — never
            # made, never asked for — after the line naming ``base``: probe-audit70)
            raise _writing_dest("the backup's directory", base, e, NO_COPY
                                ).with_traceback(e.__traceback__) from None
    staged = stage  # (``stage`` is None once the copy is in place)
    state: LmdbState | None = None
    damage = None
    gc_held: int | None = None
    try:  # (LMDB opened, gc held inside: a source whose LMDB cannot be opened, or a Ctrl-C
        # while a gc is waited for, left the empty staging directory beside DEST for good)
        state = LmdbState(layout.db, readonly=True)
        gc_held = hold_blob_gc(layout)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if gc_held is None and attempt > 1:  # (a gc that held it has ended by now?)
                gc_held = hold_blob_gc(layout, wait=0)
            summary = _attempt(layout, store_id, state, stage, progress)
            if isinstance(summary, dict):
                gone = _copy_blobs(layout, out_root=stage)
                if gone is not None and gc_held is not None:
                    raise _blob_missing(src, gone)  # (no gc ran meanwhile: it is damage)
                if gone is not None:  # (the writer's blob gc may have taken one the copy
                    damage = gone     # names: the lock could not be had)
                    time.sleep(0.05 * attempt)
                    continue
                summary.update(_blob_summary(stage))
                summary["attempts"] = attempt
                if summary.pop("owes_erasure", False):
                    _finish_erasure(stage)
                summary["dest"] = dest
                if inside:
                    with _writing("the backup into place", dest):
                        fileio.move_up(stage, dest, lambda: NotAStore(
                            f"backup destination {dest} exists and is not empty (filled "
                            f"while the backup ran)"))
                else:
                    _install(stage, dest)
                stage = None
                return summary
            damage = summary  # (None: raced with a checkpoint; a str: damage seen)
            time.sleep(0.05 * attempt)
        if isinstance(damage, _BlobGone) and not writer_alive(layout):
            raise _blob_missing(src, damage)  # (no writer: no gc could have taken it)
        if isinstance(damage, _BlobGone):
            raise WalstoreError(f"backup of {src} kept racing with the file content's "
                                f"garbage collection ({damage}); try again")
        if damage is not None:
            raise CorruptionError(f"backup of {src} refused: its WAL is damaged ({damage}); "
                                  f"a copy would silently lack the commits behind it")
        raise WalstoreError(f"backup of {src} kept racing with checkpoints; try again")
    except OSError as e:
        named = named_at_dest(e, staged, dest)
        if named is e:
            raise
        # (its frames kept, not its message: `walstore --debug` shows where the copy failed
        # — it showed only this line)
        raise named.with_traceback(e.__traceback__) from None
    except WalstoreError as e:  # (not an OS error: damage, a refusal, met in the staged copy)
        named = named_for_user(e, staged, layout.root, dest)
        if named is e:
            raise
        raise named.with_traceback(e.__traceback__) from None
    finally:
        if state is not None:
            state.close()
        if gc_held is not None:
            let_go_blob_gc(gc_held)  # (the writer's blob gc may run again)
        if stage is not None:  # (a full disk, damage, an interrupt: no half-made copy left
            remove_scratch(stage)  # behind; ``dest`` was not touched)


STAGING = ".incomplete-backup-"  # <dest><STAGING><pid>-...: the copy until it is complete


def what_dest_holds(dest: str, verb: str) -> str:
    """The note on a DEST refused as not empty (``verb``: "backup" or "restore") when it
    holds a walstore store: whether it opens (read-only), and what to do.  A backup or
    restore killed right after it moved its complete copy in place leaves one, and the
    run again was refused "exists and is not empty" with no word of it (audit 68).
    "" when DEST holds no store."""
    if not os.path.isdir(dest) or not os.path.exists(os.path.join(dest, "STORE")):
        return ""
    if writer_alive(Layout(dest)):  # (a live store: no copy cut off, nothing to remove;
        # it was said to owe its recovery, "or remove it and run the backup again")
        return (": it holds a walstore store, and a writer has it open (a live store, not "
                "a copy cut off): choose another destination")
    from .. import open as open_store  # (the package's open: a read-only look)
    try:
        with open_store(dest, readonly=True) as s:
            owed = s.needs_recovery()
    except WalstoreError as e:
        # (it said "remove it and run the backup again" of what may be a user's only copy
        # of a store a newer walstore wrote, or a damaged one `walstore recover` salvages)
        return (f": it holds a walstore store that does not open ({e}): if it is a store "
                f"you keep, leave it and choose another destination (`walstore verify "
                f"{dest}` says more); only if it is no store you keep, remove it and run the "
                f"{verb} again")
    if owed:
        # (a crashed writer's own store owes one too: it was said to be a cut-off copy)
        return (f": it holds a walstore store, which opens and owes its recovery (a writer "
                f"that crashed leaves one, or a {verb} cut off once its copy was in place): "
                f"`walstore recover {dest}` "
                f"finishes it; only if it is no store you keep, remove it and run the {verb} "
                f"again")
    return (f": it holds a walstore store, which opens (perhaps the complete copy of a "
            f"{verb} cut off once it was in place): check it (`walstore verify {dest}`) "
            f"and keep it; only if it is no store you keep, remove it and run the {verb} "
            f"again")


def named_at_dest(e: OSError, stage: str, dest: str) -> OSError:
    """``e``, an OS error of a backup staged in ``stage``, as its user is told
    it: a path in the staging directory (removed: nobody asked for it) named as the same
    path under ``dest``, and what was being written said (a StoreIOError), the OS error it
    chains not said again.  ``e`` itself when it names no staged path.  (It said "backup
    failed: ... [ENOSPC]: DEST.incomplete-backup-123-x/wal/...wal (... : .../STORE.tmp)".)"""
    def moved(p: object) -> object:
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if isinstance(p, str) and (p == stage or p.startswith(stage + os.sep)):
            return dest + p[len(stage):]
        return p

    text = e.strerror or str(e)
    if stage not in text and moved(e.filename) == e.filename \
            and moved(e.filename2) == e.filename2:
        return e
    if "backup" not in text.replace(stage, ""):  # (a bare OS error, or another's naming the
        # staged path — "backup" in its name: say what was being written; not "writing the
        # backup failed", which `walstore backup` said after its own "backup failed: ")
        text = f"writing the copy failed ({text}); {PARTIAL}"
    named = StoreIOError(e.errno or errno.EIO, text.replace(stage, dest), moved(e.filename))
    if e.filename2 is not None and moved(e.filename2) != dest:  # (a rename into place:
        named.filename2 = moved(e.filename2)                    # DEST once is enough)
    return named


def named_for_user(e: WalstoreError, stage: str, src: str, dest: str) -> WalstoreError:
    """``e``, a walstore error other than an OS error met in the staged copy (its LMDB
    read by the copy's own open), as its user is told it: damage (CorruptionError) is
    the source's — the copy holds what the source held — so the staged path is named as
    the source's, and the backup said refused; another error names the staged path as
    the same path under ``dest``.  ``e`` itself when it names no staged path.  (It said
    "backup failed: corruption: ... (file DEST.incomplete-backup-123-x/db/data.mdb)", a
    directory nobody asked for, removed by then, where `walstore verify SRC` names the
    row in SRC/db/data.mdb: probe-audit70.)"""
    if stage not in str(e):
        return e
    if isinstance(e, CorruptionError):
        def source(text: str | None) -> str | None:
            return None if text is None else text.replace(stage, src)
        reason = source(e.reason) or ""
        if not reason.startswith("backup of "):
            reason = f"backup of {src} refused: {reason}"
        named: WalstoreError = CorruptionError(reason, source(e.file), e.offset, e.lsn)
    else:
        named = copy.copy(e)
        named.args = tuple(a.replace(stage, dest) if isinstance(a, str) else a
                           for a in e.args)
    return named


def _install(stage: str, dest: str) -> None:
    """Rename the complete, synced ``stage`` to ``dest`` (absent, or an empty directory,
    which the rename replaces), then make that durable in the parent."""
    fileio.fsync_dir(stage)
    with deferred():  # (a Ctrl-C between the rename and the parent's fsync left a copy
        try:          # in place that a power cut could still take back: it lands after)
            os.rename(stage, dest)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(dest) \
                    and os.listdir(dest):
                raise NotAStore(f"backup destination {dest} exists and is not empty "
                                f"(filled while the backup ran)") from None
            raise _writing_dest("the backup into place", dest, e) from e
        with _writing("the backup's directory", dest, IN_PLACE):
            fileio.fsync_dir(os.path.dirname(dest))


GC_WAIT_S = 5.0  # how long backup/verify wait for a writer's blob gc under way to end


def hold_blob_gc(layout: Layout, create: bool = True, wait: float = GC_WAIT_S) -> int | None:
    """Hold ``files/gc.lock`` shared (waiting, up to ``wait`` seconds, for a gc under way
    to end): no writer's blob gc runs until it is let go, so every blob the snapshot and
    the WAL copied name is still there when the blobs are copied.  The fd; None when the
    store keeps no files, the lock cannot be made (a read-only source), or a gc held it
    all the while: the check after the copy still catches a blob a gc took, and the
    attempt is made again.  (The wait was unbounded: a writer stopped in the middle of
    its gc — Ctrl-Z, SIGSTOP, a debugger, a hung disk — held the lock exclusive, and
    `walstore backup` and `walstore verify` hung without a word until it went on:
    probe-audit61.)"""
    import fcntl
    files_dir = os.path.join(layout.root, "files")
    if not os.path.isdir(files_dir):
        return None  # (a gc needs files/ first; one that begins later is caught after)
    path = os.path.join(files_dir, GC_LOCK)
    try:  # (O_NONBLOCK: a FIFO in its place blocked verify and backup forever in open())
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if not create:  # (verify writes nothing: no writer made one, so none gc'd yet)
            return None
        try:
            fd = fileio.open_file(path, os.O_RDONLY | os.O_CREAT)
        except OSError:
            return None
    except OSError:
        return None
    held_flock(fd)  # (a child forked meanwhile closes its copy: see layout._forked)
    deadline = time.monotonic() + wait
    pause = 0.002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
        except OSError:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    let_go_flock(fd)
    os.close(fd)
    return None


def let_go_blob_gc(fd: int) -> None:
    """Unlock and close what ``hold_blob_gc`` returned (the writer's blob gc may run again,
    whatever a child forked meanwhile still holds: ``layout.unlock_and_close``)."""
    unlock_and_close(fd)


def _clear_but_blobs(dest: str) -> None:
    """Before an attempt: remove what an earlier attempt made at ``dest``, but the blobs it
    copied (content named by its hash: still right for the next snapshot)."""
    if not os.path.exists(dest):
        return
    for name in os.listdir(dest):
        p = os.path.join(dest, name)
        if name == "files" and os.path.isdir(p) and not os.path.islink(p):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


# what an error writing the copy left (``_writing_dest``'s ``left``)
PARTIAL = "the partial copy was removed"
NO_COPY = "no copy was made (nothing was written)"
IN_PLACE = ("the complete copy is in place, but its name may not be durable yet (a power "
            "loss could take it back)")


def _writing_dest(what: str, path: str, e: Exception, left: str = PARTIAL) -> StoreIOError:
    """An error writing the copy, naming the destination (an LMDB copy's error named no
    file: the CLI named the source's LMDB, whose device was fine).  ``left``: what the
    failure left (a backup into a directory it may not write said "the partial copy was
    removed" when none had been made, audit 68)."""
    code = getattr(e, "errno", None) or _ERRNO_BY_TEXT.get(str(e).rsplit(": ", 1)[-1],
                                                             errno.EIO)
    return StoreIOError(code, f"writing {what} failed ({getattr(e, 'strerror', None) or e}); "
                              f"{left}", path)


_ERRNO_BY_TEXT = {os.strerror(n): n for n in errno.errorcode}


def _attempt(layout: Layout, store_id: bytes, state: LmdbState, dest: str, progress
             ) -> dict | str | None:
    """One try: the summary; None (raced with a checkpoint: try again); or what damage of
    the source's log it met (tried again too: a live writer's tail can look torn)."""
    _clear_but_blobs(dest)
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
        fileio.fault_point("backup.segments_held")  # (a checkpoint, a purge may go now)
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
        _fsync_files_of(out.db)  # (LMDB's copy writes, never fsyncs: durable before the
        copied_state = LmdbState(out.db, readonly=True)  # backup says it is done)
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
        if progress:
            done = sum(os.path.getsize(os.path.join(out.db, n)) for n in os.listdir(out.db))
            total = done + sum(os.fstat(fd).st_size for _p, fd in held.values())
            progress(done, total)
        for start, (path, fd) in segs:
            target = os.path.join(out.wal, os.path.basename(path))
            # (counted per MiB copied: per segment, a 16 MiB one jumped the count from
            # 20% to 47% with no line between, against docs/CLI.md's "one each time
            # another 5% is done": probe-audit59)
            at = done if progress else 0
            sizes[target] = _copy_fd(fd, path, target, progress and (
                lambda n, at=at: progress(min(at + n, total), total)))
            if progress:
                done += sizes[target]
                progress(min(done, total), total)
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
        try:  # (O_NONBLOCK: a FIFO under a segment's name blocked the backup forever)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            gone = start
            continue
        except OSError as e:
            raise StoreIOError(e.errno, f"cannot open the store's WAL segment to back it "
                                        f"up: {e.strerror or e}", path) from e
        held[start] = (path, fd)  # (closed by the caller, also after the refusal below)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # (damage, as verify names it)
            raise CorruptionError("the WAL is damaged: the segment's name leads to no "
                                  "regular file (a FIFO or a directory)", file=path)
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


def _copy_fd(fd: int, src: str, dst: str,
             copied: Callable[[int], None] | None = None) -> int:
    """Copy the whole segment ``src``, open as ``fd``, to ``dst`` (not synced yet: see
    ``_check_and_finish``); returns its size.  ``copied(bytes so far)`` after each MiB."""
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
            if copied is not None:
                copied(n)
    finally:
        os.close(out)
    return n


def _check_and_finish(layout: Layout, out: Layout, store_id: bytes, applied: int,
                      sizes: dict[str, int]) -> dict | str | None:
    """Check every byte of the copied WAL (read with walstore.log.reader), end it cleanly,
    sync it and write the copy's identity: the summary; or the damage met (a str)."""
    try:
        return _check_copied_log(layout, out, store_id, applied, sizes)
    except (NotAStore, CorruptionError) as e:  # (raised by the reader, naming the copy's
        raise _naming_source(e, layout, out) from e  # segment, which goes with the copy)


def _naming_source(e: NotAStore | CorruptionError, layout: Layout, out: Layout
                   ) -> NotAStore | CorruptionError:
    """``e``, met reading the copy's log, naming the source's segment in place of the
    copy's (removed on the failure) and saying it was a backup that was refused."""
    def source(text: str) -> str:
        return text.replace(os.path.join(out.wal, ""), os.path.join(layout.wal, ""))
    if isinstance(e, CorruptionError):
        return CorruptionError(f"backup of {layout.root} refused: {e.reason}",
                               source(e.file) if e.file else e.file, e.offset, e.lsn)
    return NotAStore(f"backup of {layout.root} refused: {source(str(e))}")


def _check_copied_log(layout: Layout, out: Layout, store_id: bytes, applied: int,
                      sizes: dict[str, int]) -> dict | str | None:
    """``_check_and_finish`` itself."""
    log = LogReader(out.wal, store_id, applied)
    segs = log.segments
    # the end of the valid log, as the copy holds it (the last segment's tail); any damage
    # on the way is refused, never copied as an ordinary end (the copy's log would end at
    # it: a backup that verifies clean yet lacks every commit behind the damage)
    sealed_end = False
    # walked from the first segment copied, not from ``applied``: every byte copied is
    # checked (damage below ``applied`` copied unchecked made a copy no open accepts)
    owes = False  # (a purge the copy's log holds past LMDB's snapshot: see _finish_erasure)
    for item in log.walk(from_lsn=segs[0][0] if segs else applied):
        if not isinstance(item, LogEvent):
            owes = owes or (item.lsn >= applied and item.type == RecordType.COMMIT
                            and _PURGE_RANGE in item.payload)
            continue
        source = os.path.join(layout.wal, os.path.basename(item.path))
        if item.kind == "end" and item.scan is not None:
            sealed_end = item.scan.sealed  # (of the last segment walked, in the end)
        if item.kind == "end" and item.verdict == "corrupt" and item.last \
                and item.scan is not None and item.reader is not None \
                and item.scan.kind != "truncated" \
                and damage_that_stays(source, store_id, item.reader.start_lsn,
                                      item.scan.offset) is None:
            continue  # a live writer's record caught half copied in: the copy ends before
            # (never a segment shorter than it was made: no writer's tail is, it was cut)
        if item.kind == "missing-next" and _log_went_on(layout.wal, item.lsn):
            continue  # the last segment copied was sealed since the listing (below)
        if item.kind in ("gap", "bad-segment", "missing-next", "vanished") \
                or item.kind == "end" and item.verdict == "corrupt":
            where = f", offset {item.scan.offset}," if item.scan is not None else ""
            what = item.kind if item.kind != "end" else (
                "truncated segment" if item.scan.kind == "truncated" else "corrupt record")
            return f"{what} at LSN {item.lsn} in {source}{where} {item.reason}"
    short = log.short_of_applied()  # (as verify: records LMDB's snapshot holds are gone
    if short is not None:           # from the log; a live writer logs before it applies)
        return short
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
        _fsync_file(path, "the backup's WAL segment")
    with _writing("the backup's identity file", out.identity):
        out.write_identity(store_id, origin={"kind": "backup", "from": layout.root,
                                             "ts": time.time()}, source=layout)
    fileio.fsync_dir(out.wal)
    fileio.fsync_dir(out.root)
    return {"source": layout.root, "dest": out.root, "applied_lsn": applied,
            "segments": len(segs), "wal_bytes": copied,
            "owes_erasure": owes or _erasure_owed_in(out.db)}


_PURGE_RANGE = msgpack.packb("purge_range")  # (in a purge's COMMIT payload, its name packed)


def _erasure_owed_in(db: str) -> bool:
    """Does the copied LMDB hold a purge's owed erasure (applied, not yet compacted)?"""
    from ..engine.apply import ERASE_OWED
    state = LmdbState(db, readonly=True)
    try:
        return state.get(ERASE_OWED, "meta") is not None
    finally:
        state.close()


def _finish_erasure(stage: str) -> None:
    """The staged copy holds the bytes of a purge whose erasure the source owed (it
    crashed between the purge's commit and its compacting checkpoint, or a purge ran
    beside the backup): its first writable open and a checkpoint erase them, as the
    source's next checkpoint does, before DEST exists — a backup made after the purge
    kept its erased keys' bytes in its WAL and LMDB (invisible, "0 keys") until its
    first writable open (probe-audit67; a restore finishes it the same way).  That open
    holds the copy's inherited debts as DEST's own first open would."""
    from ..store import Store
    try:
        with Store(stage, durability="full") as store:
            store.checkpoint()
    except OSError as e:
        if not isinstance(e, WalstoreError) or not isinstance(e.__cause__, OSError):
            raise
        # (the staged store's own words — "rewriting the LMDB data file ... failed: [Errno
        # 28] ...: '<staged path>' ...; the erasure stays owed: the next checkpoint or
        # writable open tries again" — said of a copy that is removed now, inside "backup
        # failed: writing the backup failed (...)": what failed, in the backup's words)
        raise _writing_dest("the backup's LMDB copy without the bytes a purge erased",
                            e.filename or stage, e.__cause__) from e
    # (and not the spare segment that open prepared: 16 MiB of zeros by default in every
    # such backup, which never held one — DEST's first writable open makes its own)
    wal = os.path.join(stage, "wal")
    fileio.remove_quietly(os.path.join(wal, SPARE_NAME))
    with _writing("the backup's WAL directory", wal):
        fileio.fsync_dir(wal)


def _fsync_file(path: str, what: str) -> None:
    """fsync one file of the copy (an error: StoreIOError naming ``what``)."""
    with _writing(what, path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fileio.fsync(fd)
        finally:
            os.close(fd)


def _fsync_files_of(directory: str) -> None:
    """fsync every regular file in ``directory``, then the directory."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            _fsync_file(path, "the backup's LMDB copy")
    with _writing("the backup's LMDB copy", directory):
        fileio.fsync_dir(directory)


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
def _writing(what: str, path: str, left: str = PARTIAL) -> Iterator[None]:
    """An OSError writing the copy: StoreIOError naming the destination (``_writing_dest``;
    a WalstoreError goes through as it is)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, WalstoreError):
            raise
        raise _writing_dest(what, path, e, left) from e


class _BlobGone(str):
    """A blob the copy refers to is not in the source: its gc removed it while it was
    copied (when the gc could run: ``hold_blob_gc`` could not hold it off), else damage."""

    digest: str
    path: str


def _blob_gone(digest: str, path: str, src_dir: str) -> _BlobGone:
    gone = _BlobGone(f"sha256:{digest} went from {src_dir} while it was copied")
    gone.digest, gone.path = digest, path
    return gone


def _blob_missing(src: str, gone: _BlobGone) -> CorruptionError:
    """A blob the copy refers to that no gc can have taken (the gc was held off, or no
    writer runs): the source lacks it, and a retry cannot find it (as ``verify`` names
    it)."""
    return CorruptionError(f"backup of {src} refused: file content sha256:{gone.digest} is "
                           f"missing from the store's content store: a file version or "
                           f"undo needs it (run `walstore verify`)", file=gone.path)


def _copy_blobs(layout: Layout, out_root: str) -> _BlobGone | None:
    """Step 4 (see the module docstring): copy the source's blobs not in the copy yet, then
    check the copy holds every blob it refers to.  None when it does; a _BlobGone when the
    source's gc removed one meanwhile (try again); CorruptionError when one is damaged in
    the source (or missing there for good: the source itself cannot read it)."""
    src_dir = os.path.join(layout.root, "files", "blobs")
    out = Layout(out_root)
    dst_dir = os.path.join(out.root, "files", "blobs")
    if os.path.isdir(src_dir):
        with _writing("the backup's file content", dst_dir):
            fileio.make_dir(os.path.join(out.root, "files"))
        src_blobs = BlobStore(src_dir, readonly=True)
        with _writing("the backup's file content", dst_dir):
            dst_blobs = BlobStore(dst_dir, copy="auto")
        damaged = {}
        try:
            names = list(src_blobs)
        except OSError as e:
            raise StoreIOError(e.errno, f"cannot list the store's file content to back it "
                                        f"up: {e.strerror or e}", src_dir) from e
        for digest in names:
            if os.path.exists(dst_blobs.path(digest)):
                continue  # (an earlier attempt copied it)
            why = _copy_blob(src_blobs, dst_blobs, digest)
            if why is not None:
                damaged[digest] = why
    else:
        damaged = {}
    refs = referenced_blobs(out.root)
    missing = sorted(d for d in refs
                     if not os.path.isfile(os.path.join(dst_dir, d[:2], d[2:])))
    for digest in missing:
        path = os.path.join(src_dir, digest[:2], digest[2:])
        if digest in damaged:
            raise CorruptionError(f"backup of {layout.root} refused: stored file content "
                                  f"sha256:{digest} is damaged ({damaged[digest]}); a copy "
                                  f"could not read the file versions that need it", file=path)
        if os.path.exists(path):  # (not listed yet: copy it now)
            why = _copy_blob(BlobStore(src_dir, readonly=True), BlobStore(dst_dir), digest)
            if why is None:
                continue
            raise CorruptionError(f"backup of {layout.root} refused: stored file content "
                                  f"sha256:{digest} is damaged ({why})", file=path)
        return _blob_gone(digest, path, src_dir)
    return None


def _copy_blob(src: BlobStore, dst: BlobStore, digest: str) -> str | None:
    """Stream one blob (hashed on the way: its name must be its content's sha256).
    None when copied or gone from the source meanwhile; else why it was not copied."""
    path = src.path(digest)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None  # (removed by the source's gc since the listing: checked after)
    except OSError as e:
        raise StoreIOError(e.errno, f"cannot open the store's file content to back it up: "
                                    f"{e.strerror or e}", path) from e
    try:
        try:
            got = dst.put_fd(fd, path)
        except OSError as e:
            if isinstance(e, WalstoreError):
                raise
            if os.fsdecode(getattr(e, "filename", None) or "").startswith(dst.dir):
                raise _writing_dest("the backup's file content", dst.dir, e) from e
            raise StoreIOError(e.errno, f"copying the store's file content to the backup "
                                        f"failed ({e.strerror or e}); the partial copy was "
                                        f"removed", path) from e
    finally:
        os.close(fd)
    if got.digest != digest:
        with contextlib.suppress(OSError):  # (its true name in the copy: not kept)
            fileio.unlink(dst.path(got.digest))
        return f"its content hashes to sha256:{got.digest}"
    return None


def referenced_blobs(root: str, manifests: set[str] | None = None) -> set[str]:
    """The blobs the copy at ``root`` refers to (what its own gc keeps), read through a
    read-only open of it (its LMDB snapshot and the WAL after it).  ``manifests``: given,
    the digests among them that are saved watch manifests are added to it."""
    from ..store import Store  # (late: the store imports the engine's operations)
    store = Store(root, readonly=True)
    try:
        return store.reversible_files.referenced(manifests)
    finally:
        store.close()


def _blob_summary(dest: str) -> dict:
    d = os.path.join(dest, "files", "blobs")
    if not os.path.isdir(d):
        return {"blobs": 0, "blob_bytes": 0}
    b = BlobStore(d, readonly=True)
    n = size = 0
    for digest in b:
        n += 1
        size += b.size(digest)
    return {"blobs": n, "blob_bytes": size}
