"""Plans: what a change WILL do to each path, with every before-image stored first.

This module owns the write-ahead half of a file operation.  Each ``plan_*`` function
changes nothing in the workspace; it returns the ``Change`` steps (path, before-image,
intended after-image) of the matching ``apply`` primitive, in the order the primitive
makes them, after putting every content they refer to in the blob store (durable):

- the before-image of every path the operation touches (``capture``: ``lstat``,
  ``readlink``, or the file's content stored through ``BlobStore.put_fd`` from an
  ``O_NOFOLLOW`` descriptor, so the Entry's hash is exactly the stored content);
- the after-image's content too (a write's data): ``at(point)`` reads and a revert of a
  revert need it;
- missing parents as their own steps (absent -> directory of the default mode), first.

The engine logs the steps (one durable record), then calls the primitive, then compares
``Applied.after`` with the last step's ``after`` (a stranger may have raced it).  To undo,
``undo_steps`` restores them newest first (children before parents on the way back,
because the plan lists parents first).  A directory rename or rmtree is planned path by
path (its whole subtree is captured): its undo needs nothing but the steps.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Iterable

from .apply import (FileConflict, _refuse_moving_excluded, default_dir_mode, default_file_mode,
                    open_to_read)
from .blobs import BlobStore
from .entries import Entry, UnsupportedFileType, entry_from_stat
from .paths import PathLike, Workspace, display
from .watch import Change, restore_in_order, walk

__all__ = ["capture", "capture_reachable", "plan_write", "plan_mkdir", "plan_symlink", "plan_mode", "plan_delete",
           "plan_rename", "plan_rmtree", "undo_steps"]

_RETRIES = 3


def capture(ws: Workspace, path: PathLike, blobs: BlobStore) -> Entry:
    """The before-image of ``path`` now, a file's content stored (durable) in ``blobs``;
    never follows a symlink.  UnsupportedFileType for a special file.  The root itself
    may be captured (its mode: a watch's step), never planned for."""
    rel, abs_path = ws.resolve(path, allow_root=True)
    for _attempt in range(_RETRIES):
        try:
            st = os.lstat(abs_path)
        except FileNotFoundError:
            return Entry.absent()
        if stat.S_ISLNK(st.st_mode):
            try:
                return entry_from_stat(st, target=os.readlink(abs_path))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINVAL):
                    continue  # replaced meanwhile: look again
                raise
        if not stat.S_ISREG(st.st_mode):
            return entry_from_stat(st, path=abs_path)
        try:  # (in its parent pinned: by its absolute path, a parent swapped for a
            fd = open_to_read(ws, rel)  # symlink since the resolve stored a file outside)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                continue
            raise type(e)(e.errno, f"cannot read {display(rel)!r} in workspace {ws.root!r} "
                                   f"to keep its before-image: {e.strerror}",
                          os.fsdecode(abs_path)) from e
        try:
            got = blobs.put_fd(fd, os.fsdecode(abs_path))
        except OSError as e:  # (disk full, I/O error in the blob store: name the file)
            if type(e).__module__ != "builtins" or e.filename == os.fsdecode(abs_path):
                raise  # (a walstore error, or one naming the file already)
            raise OSError(e.errno, f"cannot keep the before-image of {display(rel)!r} in "
                                   f"workspace {ws.root!r}: {e.strerror or e}",
                          os.fsdecode(abs_path)) from e
        finally:
            os.close(fd)
        return entry_from_stat(got.stat or st, sha256=got.digest)
    return Entry.absent() if not os.path.lexists(abs_path) else entry_from_stat(
        os.lstat(abs_path), path=abs_path)


def _parents(ws: Workspace, rel: bytes) -> list[Change]:
    return [Change.of(p, Entry.absent(), Entry.dir(default_dir_mode()))
            for p in ws.check_parents(rel)]


def capture_reachable(ws: Workspace, path: PathLike, blobs: BlobStore) -> Entry:
    """``capture``, except that a path under a parent that is a file or a symlink now is
    absent (nothing is there as the workspace sees it) rather than an error: what an
    undo starts from when a later commit replaced a directory by a file."""
    root = not ws.rel(path, allow_root=True)
    try:
        ws.resolve(path, allow_root=root)
    except (NotADirectoryError, ValueError):
        if root:
            raise
        return Entry.absent()
    return capture(ws, path, blobs)


def plan_write(ws: Workspace, path: PathLike, data: bytes | str, blobs: BlobStore,
               mode: int | None = None) -> list[Change]:
    """The steps of ``apply.write_file(ws, path, data, mode)``; stores the data too."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    rel, abs_path = ws.resolve(path)
    before = capture(ws, rel, blobs)
    if before.is_dir:
        raise IsADirectoryError(errno.EISDIR, f"cannot write {display(rel)!r} in workspace "
                                f"{ws.root!r}: it is a directory", os.fsdecode(abs_path))
    if mode is None:
        mode = before.mode if before.is_file else default_file_mode()
    after = Entry.file(mode, len(data), blobs.put_bytes(data).digest)
    return _parents(ws, rel) + [Change.of(rel, before, after)]


def plan_mkdir(ws: Workspace, path: PathLike, blobs: BlobStore,
               mode: int | None = None) -> list[Change]:
    """The steps of ``apply.make_dir``."""
    rel, abs_path = ws.resolve(path)
    if os.path.lexists(abs_path):
        raise FileExistsError(errno.EEXIST, f"cannot create directory {display(rel)!r} in "
                              f"workspace {ws.root!r}: it exists", os.fsdecode(abs_path))
    after = Entry.dir(default_dir_mode() if mode is None else mode)
    return _parents(ws, rel) + [Change.of(rel, Entry.absent(), after)]


def plan_symlink(ws: Workspace, path: PathLike, target: str | bytes,
                 blobs: BlobStore) -> list[Change]:
    """The steps of ``apply.make_symlink``."""
    rel, abs_path = ws.resolve(path)
    before = capture(ws, rel, blobs)
    if before.is_dir:
        raise IsADirectoryError(errno.EISDIR, f"cannot make {display(rel)!r} in workspace "
                                f"{ws.root!r} a symlink: it is a directory",
                                os.fsdecode(abs_path))
    return _parents(ws, rel) + [Change.of(rel, before, Entry.symlink(target))]


def plan_mode(ws: Workspace, path: PathLike, mode: int, blobs: BlobStore) -> list[Change]:
    """The step of ``apply.set_mode``."""
    rel, abs_path = ws.resolve(path)
    before = capture(ws, rel, blobs)
    if not before.exists:
        raise FileNotFoundError(errno.ENOENT, f"{display(rel)!r} does not exist in workspace "
                                f"{ws.root!r}", os.fsdecode(abs_path))
    if before.is_symlink:
        raise ValueError(f"{display(rel)!r} is a symlink; a symlink has no mode of its own")
    return [Change.of(rel, before, dataclasses.replace(before, mode=stat.S_IMODE(mode)))]


def plan_delete(ws: Workspace, path: PathLike, blobs: BlobStore) -> list[Change]:
    """The step of ``apply.delete`` (a file, a symlink or an empty directory)."""
    rel, abs_path = ws.resolve(path)
    before = capture(ws, rel, blobs)
    if not before.exists:
        raise FileNotFoundError(errno.ENOENT, f"cannot delete {display(rel)!r} in workspace "
                                f"{ws.root!r}: it does not exist", os.fsdecode(abs_path))
    if before.is_dir and os.listdir(abs_path):
        raise OSError(errno.ENOTEMPTY, f"cannot delete {display(rel)!r} in workspace "
                      f"{ws.root!r}: the directory is not empty (use rmtree)",
                      os.fsdecode(abs_path))
    return [Change.of(rel, before, Entry.absent())]


def capture_subtree(ws: Workspace, rel: bytes, top: Entry, blobs: BlobStore,
             specials: list[bytes] | None = None) -> list[tuple[bytes, Entry]]:
    """``rel`` and everything under it (ignored paths too), parents first, captured.
    ``specials``: given, a FIFO, socket or device found is listed there and left out
    (else UnsupportedFileType)."""
    out = [(rel, top)]
    if top.is_dir:
        with blobs.batch():  # one sync pass for the whole subtree's content
            for p, _st in walk(ws, rel, use_ignore=False):
                try:
                    out.append((p, capture(ws, p, blobs)))
                except UnsupportedFileType:
                    if specials is None:
                        raise
                    specials.append(p)
    return [(p, e) for p, e in out if e.exists]


def plan_rmtree(ws: Workspace, path: PathLike, blobs: BlobStore) -> list[Change]:
    """The steps of ``apply.rmtree``: every path under ``path`` (and it) becomes absent,
    children first.  Pass ``{c.path: c.before for c in steps}`` as rmtree's ``expected``
    so that only what was captured is removed."""
    rel, abs_path = ws.resolve(path)
    top = capture(ws, rel, blobs)
    if not top.exists:
        raise FileNotFoundError(errno.ENOENT, f"cannot remove {display(rel)!r} in workspace "
                                f"{ws.root!r}: it does not exist", os.fsdecode(abs_path))
    return [Change.of(p, e, Entry.absent())
            for p, e in reversed(capture_subtree(ws, rel, top, blobs))]


def plan_rename(ws: Workspace, src: PathLike, dst: PathLike, blobs: BlobStore
                ) -> list[Change]:
    """The steps of ``apply.rename``: missing parents of ``dst``; every path of the
    moved subtree appearing under ``dst`` (parents first; ``dst`` itself replaced); then
    every path under ``src`` becoming absent (children first)."""
    srel, sabs = ws.resolve(src)
    drel, dabs = ws.resolve(dst)
    if srel == drel or drel.startswith(srel + b"/"):
        raise ValueError(f"cannot move {display(srel)!r} onto or into itself "
                         f"({display(drel)!r})")
    _refuse_moving_excluded(ws, srel)
    top = capture(ws, srel, blobs)
    if not top.exists:
        raise FileNotFoundError(errno.ENOENT, f"cannot rename {display(srel)!r} in workspace "
                                f"{ws.root!r}: it does not exist", os.fsdecode(sabs))
    old_dst = capture(ws, drel, blobs)
    if old_dst.is_dir and not top.is_dir:
        raise IsADirectoryError(errno.EISDIR, f"cannot rename {display(srel)!r} onto "
                                f"directory {display(drel)!r}", os.fsdecode(dabs))
    if top.is_dir and old_dst.exists and not old_dst.is_dir:
        raise NotADirectoryError(errno.ENOTDIR, f"cannot rename directory {display(srel)!r} "
                                 f"onto {display(drel)!r}: it is not a directory",
                                 os.fsdecode(dabs))
    if old_dst.is_dir and os.listdir(dabs):
        raise OSError(errno.ENOTEMPTY, f"cannot rename {display(srel)!r} onto "
                      f"{display(drel)!r}: the directory is not empty", os.fsdecode(dabs))
    moved = capture_subtree(ws, srel, top, blobs)
    arrive = [Change.of(drel + p[len(srel):], old_dst if p == srel else Entry.absent(), e)
              for p, e in moved]
    leave = [Change.of(p, e, Entry.absent()) for p, e in reversed(moved)]
    return _parents(ws, drel) + arrive + leave


def undo_steps(ws: Workspace, steps: Iterable[Change], blobs: BlobStore,
               quarantine: str | bytes | None, check: bool = True,
               durable: bool = True,
               done: Callable[[Change], Iterable[Entry]] | None = None,
               after_crash: bool = False,
               since_ns: int | None = None,
               keep: Callable[[Change], Entry | None] | None = None) -> list[FileConflict]:
    """Restore the before-image of every step, newest first (steps in the order they
    were planned and logged).  ``check``: a path no longer in its after-image is a
    conflict (kept, reported); False: any current state is walstore's own (recovery of
    a crash in the middle of the operation, a forced revert).  ``done(step)``: states
    that count as undone already — when an undo of several operations is run again
    after a crash, a path an older operation also changed may be further back than this
    step's before-image (give the before-images of the older steps on that path).
    ``since_ns``: when the steps began; ``keep(step)``: walstore's version to keep on a
    conflict when not the step's before-image (``apply.restore``)."""
    return restore_in_order(ws, list(reversed(list(steps))), blobs, quarantine, check,
                            durable, done, after_crash, since_ns, keep)
