"""Making a workspace path BECOME something, crash-safely, in place.

This module owns every change walstore makes inside a workspace.  Each primitive moves a
path from one state to the next in ONE atomic step (a kill -9 at any point leaves the old
state or the new one, plus at most a stray temporary name, never a mix):

- a file: temp file (``TEMP_PREFIX``, same directory) -> write -> fchmod -> fsync ->
  rename over the path -> fsync the directory;
- a directory: temp directory -> chmod (when mkdir's bits differ) -> rename into place -> fsync the parent (so it
  appears with its final mode);
- a symlink: temp link -> rename over the path -> fsync the directory;
- a mode: ``fchmod`` of the path opened with ``O_NOFOLLOW`` (one step); a file with
  other hard links (one may be outside the root) becomes a copy with the new mode
  instead, as a file is written (the other names keep their mode);
- delete: ``unlink`` / ``rmdir`` -> fsync the directory;
- rmtree: children before parents, through directory descriptors opened relative to
  their parent with ``O_NOFOLLOW`` (a directory swapped for a symlink meanwhile is never
  gone through: ``WorkspaceChanged``).

Missing parent directories are created one by one the same way and REPORTED
(``Applied.created``), so the caller can log their absence and undo them; when the change
itself then fails, the parents it created are removed again before the error is raised
(nothing half-done).  Errors are the OS's own exception types (PermissionError, ...),
re-raised with a message naming the workspace path and what was being done.

``restore`` puts a before-image back (idempotent: a path already in its before-image is
left alone), and keeps both versions when the path is neither walstore's after-image nor
the before-image (changed behind walstore's back): the stranger's version stays, the
before-image is saved under a quarantine directory, and a ``FileConflict`` says so.
``remove_stray_temps`` removes the temporary names a crash left behind.

``durable=False`` skips the fsyncs (a store opened with durability="none"): a process
crash still leaves old-or-new; only power loss can lose the change, until the store's
``sync()`` or a checkpoint syncs the workspace's file system (``Files.sync_workspaces``).  All writes go through
``walstore.fileio`` (the fault seam), directory, symlink and mode changes through
``fsops`` (the same seam); paths are checked by ``Workspace.resolve`` first.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from .. import fileio
from ..errors import WorkspaceChanged
from . import fsops
from .blobs import BlobStore
from .entries import (ABSENT, DIR, FILE, SYMLINK, Entry, UnsupportedFileType, entry_from_stat,
                      read_entry)
from .paths import TEMP_PREFIX, PathLike, Workspace, display, is_temp_name, parent_of

__all__ = ["Applied", "FileConflict", "RestoreStatus", "write_file", "write_blob", "set_mode",
           "make_dir", "make_symlink", "delete", "rename", "rmtree", "ensure_parents",
           "restore", "restore_status", "remove_stray_temps", "default_file_mode",
           "default_dir_mode", "WorkspaceChanged"]

_umask: int | None = None


def _get_umask() -> int:
    """The process's umask now, read from /proc each time (kept from the first call, an
    ``os.umask(0o077)`` the application set later to keep what it writes private still
    gave new files 0644); without /proc, the racy way (set and reset), once."""
    global _umask
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return _umask


def overrides_modes() -> bool:
    """Does this process pass permission bits by (CAP_DAC_OVERRIDE in its effective
    set, read from /proc each time; without /proc: euid 0)?  Then a read-only directory
    needs no opening for an undo to change what it holds (``watch.passages``)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 1))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def default_file_mode() -> int:
    """What ``open(..., "w")`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~_get_umask()


def default_dir_mode() -> int:
    """What ``mkdir`` would give a new directory: 0o777 less the umask."""
    return 0o777 & ~_get_umask()


@dataclass
class Applied:
    """What a change did: the path's new state (``after``) and the parent directories it
    created, shallowest first (``created``: their before-image is absence)."""

    path: bytes
    after: Entry
    created: list[bytes] = field(default_factory=list)


@dataclass
class FileConflict:
    """A path changed behind walstore's back: its state (``current``) is neither the
    before-image walstore wanted to restore (``before``) nor the state walstore left it in
    (``expected``).  The stranger's version stays; ``saved_as`` is where the before-image
    was kept (None: it was absence, or no quarantine was given)."""

    path: bytes
    before: Entry
    expected: Entry | None
    current: Entry
    saved_as: str | None
    reason: str

    def to_row(self) -> dict:
        return {"path": self.path, "before": self.before.to_row(),
                "expected": None if self.expected is None else self.expected.to_row(),
                "current": self.current.to_row(), "saved_as": self.saved_as,
                "reason": self.reason}

    @classmethod
    def from_row(cls, row: dict) -> "FileConflict":
        exp = row.get("expected")
        return cls(bytes(row["path"]), Entry.from_row(row["before"]),
                   None if exp is None else Entry.from_row(exp),
                   Entry.from_row(row["current"]), row.get("saved_as"), str(row["reason"]))

    def __str__(self) -> str:
        where = f"; walstore's version kept at {self.saved_as}" if self.saved_as else ""
        return f"{display(self.path)}: {self.reason}{where}"


@dataclass
class RestoreStatus:
    """What ``restore`` would do: ``state`` is ``"done"`` (already the before-image),
    ``"apply"`` (walstore's own change: restore it), or ``"conflict"``."""

    state: str
    current: Entry


# ---- small helpers ----------------------------------------------------------------------
def _s(p: bytes) -> str:
    return os.fsdecode(p)


def _fail(e: OSError, doing: str, ws: Workspace, rel: bytes, to: bytes | None = None
          ) -> OSError:
    """The same exception type, with a message naming the workspace path (``to``: where a
    rename moved it).  Its file name is the path in the workspace, unless the OS named
    another real file: a call through a pinned parent named ``/proc/self/fd/N/<name>``
    (or a temp name there), one relative to a directory descriptor a bare ``b'name'``,
    meaningless to the user (audit 58)."""
    where = f" to {display(to)!r}" if to is not None else ""
    msg = (f"cannot {doing} {display(rel)!r}{where} in workspace {ws.root!r}: "
           f"{e.strerror or e}")
    name = e.filename
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str) or not name.startswith("/") \
            or name.startswith("/proc/self/fd/"):
        name = _s(ws.abspath(rel))
    try:
        new = type(e)(e.errno, msg, name) if e.errno is not None else type(e)(msg)
    except TypeError:
        new = OSError(e.errno, msg)
    return new


def _temp_name(parent_abs: bytes) -> bytes:
    return parent_abs + b"/" + TEMP_PREFIX + b"%x-" % os.getpid() + os.urandom(6).hex().encode()


def check_mode(mode: int) -> int:
    """``mode`` when it is a file mode (an int 0..0o7777, not a bool); ValueError naming
    it otherwise.  (agent.files checks a caller's mode with it.)"""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be an int between 0 and 0o7777, not {mode!r}")
    return mode


def _lstat(abs_path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(abs_path)
    except FileNotFoundError:
        return None


def _is_root() -> bool:
    return os.geteuid() == 0


def _chown(path_or_fd, entry: Entry | None, follow: bool = False) -> None:
    if entry is None or entry.uid is None or not _is_root():
        return
    if isinstance(path_or_fd, int):
        os.fchown(path_or_fd, entry.uid, entry.gid if entry.gid is not None else -1)
    else:
        os.lchown(path_or_fd, entry.uid, entry.gid if entry.gid is not None else -1)


def _fsync_dir(abs_dir: bytes, durable: bool) -> None:
    if durable:
        fileio.fsync_dir(_s(abs_dir))


def _rmdir(abs_path: bytes) -> None:
    fsops.rmdir(abs_path)


def _undo_created(ws: Workspace, created: list[bytes], durable: bool) -> None:
    """Remove parents this call created (deepest first), best effort: the error that
    made us undo them is the one the caller sees."""
    for rel in reversed(created):
        try:
            with pinned_parent(ws, rel) as (parent, path):
                _rmdir(path)
                _fsync_dir(parent, durable)
        except (OSError, ValueError):
            pass


def _mkdir_atomic(ws: Workspace, rel: bytes, mode: int, owner: Entry | None,
                  durable: bool) -> None:
    """Create the directory ``rel`` with exactly ``mode`` in one visible step, in its
    parent pinned (``pinned_parent``)."""
    with pinned_parent(ws, rel) as (parent, path):
        tmp = _temp_name(parent)
        # made with its permission bits, and chmod-ed only when they differ (the umask):
        # mkdir(2) keeps the setgid bit a setgid parent passes on, where a chmod by a
        # process outside the directory's group (no CAP_FSETID) drops it, so a setgid
        # directory put back by a rollback came back without it
        fsops.mkdir(tmp, mode & 0o777)
        try:
            _chown(tmp, owner)  # (first: a chown clears the setuid/setgid bits a chmod set)
            if stat.S_IMODE(os.lstat(tmp).st_mode) != mode:
                fsops.chmod(tmp, mode)
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "exists")
            fileio.rename(_s(tmp), _s(path))
        except BaseException:
            try:
                _rmdir(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(parent, durable)


def _make_parents(ws: Workspace, rel: bytes, durable: bool) -> list[bytes]:
    missing = ws.check_parents(rel)
    created: list[bytes] = []
    try:
        for p in missing:
            _mkdir_atomic(ws, p, default_dir_mode(), None, durable)
            created.append(p)
    except OSError as e:
        _undo_created(ws, created, durable)
        raise _fail(e, "create the parent directories of", ws, rel) from e
    except ValueError:  # (WorkspaceChanged: a directory on the way swapped meanwhile)
        _undo_created(ws, created, durable)
        raise
    return created


def ensure_parents(ws: Workspace, path: PathLike, durable: bool = True) -> list[bytes]:
    """Create the missing parent directories of ``path`` (default mode); returns them,
    shallowest first."""
    rel = ws.rel(path)
    return _make_parents(ws, rel, durable)


def _replace_file(ws: Workspace, rel: bytes, fill, mode: int | None, owner: Entry | None,
                  durable: bool, doing: str = "write") -> Applied:
    """The file primitive (see the module docstring).  ``fill(fd) -> (sha256, size)``."""
    abs_path = ws.abspath(rel)
    st = _lstat(abs_path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot {doing} {display(rel)!r} in workspace "
                                f"{ws.root!r}: it is a directory", _s(abs_path))
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UnsupportedFileType(f"cannot {doing} {display(rel)!r} in workspace {ws.root!r}: "
                                  f"it is a special file")
    if mode is None:
        mode = stat.S_IMODE(st.st_mode) if st is not None and stat.S_ISREG(st.st_mode) \
            else default_file_mode()
    if owner is None and st is not None and stat.S_ISREG(st.st_mode):
        # a file replaced keeps its owner, as a write in place keeps the inode's (as root:
        # the temp file was root's, so another user's file setuid to them became setuid
        # ROOT with the mode kept, and its owner could no longer write it)
        owner = entry_from_stat(st)
    check_mode(mode)
    created = _make_parents(ws, rel, durable)
    # the parent pinned (walked from the root, no symlink followed) and named through
    # /proc/self/fd: a directory on the way swapped for a symlink by another process
    # after the checks above made the write land in the symlink's target, outside the
    # root; now the walk refuses it, and one swapped after the walk changes nothing
    try:
        pin = pin_dir(ws, parent_of(rel))
    except BaseException as e:
        _undo_created(ws, created, durable)
        if isinstance(e, OSError):  # (a parent gone meanwhile, EIO: as the write's own)
            raise _fail(e, doing, ws, rel) from e
        raise
    parent = pin.path if pin is not None else ws.abspath(parent_of(rel))
    target = parent + b"/" + rel.rpartition(b"/")[2] if pin is not None else abs_path
    tmp = _temp_name(parent)
    fd = -1
    try:
        fd = fileio.open_file(_s(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
        digest, _size = fill(fd)
        _chown(fd, owner)  # (first: a chown clears the setuid/setgid bits a chmod set)
        fsops.fchmod(fd, mode)
        if durable:
            fileio.fsync(fd)
        st_new = os.fstat(fd)
        closing, fd = fd, -1  # (forgotten first: an interrupt right after the close left
        os.close(closing)     # it to be closed again below, perhaps another thread's file)
        fileio.rename(_s(tmp), _s(target))
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        try:
            fileio.unlink(_s(tmp))
        except OSError:
            pass
        if pin is not None:
            pin.close()
        _undo_created(ws, created, durable)
        if isinstance(e, OSError) and not isinstance(e, UnsupportedFileType):
            raise _fail(e, doing, ws, rel) from e
        raise
    try:
        _fsync_dir(parent, durable)
    finally:
        if pin is not None:
            pin.close()
    return Applied(rel, entry_from_stat(st_new, sha256=digest), created)


class _PinnedDir:
    """A directory held open; ``path`` names it through /proc/self/fd (whatever is at its
    old path now)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.path = b"/proc/self/fd/%d" % fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


_PROC_FD = os.path.isdir("/proc/self/fd")


def pin_dir(ws: Workspace, rel_dir: bytes) -> "_PinnedDir | None":
    """Open ``rel_dir`` of ``ws`` component by component from the root, following no
    symlink (None where /proc is not mounted: the absolute path is used, as before).  A
    component that is a symlink (or no directory) now: WorkspaceChanged (a ValueError),
    nothing done there."""
    if not _PROC_FD:
        return None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(ws.root_b, flags)
    try:
        for part in rel_dir.split(b"/") if rel_dir else ():
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise WorkspaceChanged(f"{display(rel_dir)!r} in workspace {ws.root!r} is "
                                       f"no longer a directory inside it (a symlink put "
                                       f"there by another process?); walstore never goes "
                                       f"through one, so nothing was done there") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return _PinnedDir(fd)


def open_to_read(ws: Workspace, rel: bytes) -> int:
    """Open the file ``rel`` for reading (O_NONBLOCK: a FIFO swapped in does not block)
    in its parent pinned from the root (``pin_dir``: no symlink followed on the way,
    WorkspaceChanged): opened by its absolute path after the caller's checks, a parent
    swapped for a symlink to outside the root in between made a read return a file
    outside the root."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        pin = pin_dir(ws, parent_of(rel))
        if pin is None:  # (no /proc/self/fd: by path, as before)
            return os.open(ws.abspath(rel), flags)
        try:
            return os.open(rel.rpartition(b"/")[2], flags, dir_fd=pin.fd)
        finally:
            pin.close()
    except OSError as e:  # (opened through the descriptor, it named a bare b'name')
        raise _fail(e, "read", ws, rel) from e


@contextlib.contextmanager
def pinned_parent(ws: Workspace, rel: bytes):
    """``with pinned_parent(ws, rel) as (parent, path):`` ``rel``'s parent pinned
    (``pin_dir``) and both named through it, so a directory on the way swapped for a
    symlink by another process after walstore's checks is refused (WorkspaceChanged),
    never gone through: nothing outside the root is created, changed or removed."""
    if not rel:  # the root itself (a watch's mode change): pinned as it is
        pin = pin_dir(ws, b"")
        try:
            # (b"/.": the directory itself; /proc/self/fd/N alone lstats as a symlink)
            yield ((pin.path + b"/.", pin.path + b"/.") if pin is not None
                   else (ws.root_b, ws.root_b))
        finally:
            if pin is not None:
                pin.close()
        return
    pin = pin_dir(ws, parent_of(rel))
    try:
        if pin is None:
            yield ws.abspath(parent_of(rel)), ws.abspath(rel)
        else:
            yield pin.path, pin.path + b"/" + rel.rpartition(b"/")[2]
    finally:
        if pin is not None:
            pin.close()


# ---- the primitives ---------------------------------------------------------------------
def write_file(ws: Workspace, path: PathLike, data: bytes | str, mode: int | None = None,
               durable: bool = True) -> Applied:
    """Make ``path`` a file holding ``data`` (str: UTF-8).  ``mode``: default the current
    file's mode, else 0o666 less the umask.  IsADirectoryError over a directory."""
    import hashlib
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"file content is str or bytes, not {type(data).__name__}")
    rel, _abs = ws.resolve(path)

    def fill(fd: int) -> tuple[str, int]:
        if len(data):
            fileio.pwrite_all(fd, data, 0)
        return hashlib.sha256(data).hexdigest(), len(data)
    return _replace_file(ws, rel, fill, mode, None, durable)


def write_blob(ws: Workspace, path: PathLike, blobs: BlobStore, digest: str,
               mode: int | None = None, owner: Entry | None = None,
               durable: bool = True) -> Applied:
    """Make ``path`` a file holding the stored content ``digest`` (streamed, verified:
    CorruptionError leaves the path untouched)."""
    rel, _abs = ws.resolve(path)

    def fill(fd: int) -> tuple[str, int]:
        return digest, blobs.copy_to(digest, fd)
    return _replace_file(ws, rel, fill, mode, owner, durable)


def set_mode(ws: Workspace, path: PathLike, mode: int, durable: bool = True) -> Applied:
    """Change the permission bits of a file or directory (a symlink has none: ValueError).
    A file with other hard links (``st_nlink`` > 1: perhaps one outside the workspace)
    is made an independent copy with the new mode (temp file, rename over: the write
    primitive), so the other names keep theirs."""
    check_mode(mode)
    rel, abs_path = ws.resolve(path)
    try:
        with pinned_parent(ws, rel) as (_parent, pinned):
            _chmod_nofollow(pinned, mode, durable, ws, rel)
    except OSError as e:
        if isinstance(e, UnsupportedFileType):
            raise
        raise _fail(e, "change the mode of", ws, rel) from e
    return Applied(rel, read_entry(abs_path, hash=True))


def _chmod_nofollow(abs_path: bytes, mode: int, durable: bool,
                    ws: Workspace | None = None, rel: bytes | None = None) -> None:
    st = os.lstat(abs_path)
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{_s(abs_path)!r} is a symlink; a symlink has no mode of its own")
    if ws is not None and rel is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # a fchmod would change the shared inode: every other name of it too, one
        # outside the root included (a hard link to an outside file)
        _unshare(ws, rel, mode, entry_from_stat(st), durable)
        return
    try:
        fd = fileio.open_file(_s(abs_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except PermissionError:  # unreadable for us: change it through an O_PATH handle
        fd = os.open(abs_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fsops.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
        return
    try:
        fsops.fchmod(fd, mode)
        if durable:
            fileio.fsync(fd)
    finally:
        os.close(fd)


def _unshare(ws: Workspace, rel: bytes, mode: int, owner: Entry, durable: bool) -> None:
    """Replace the hard-linked file ``rel`` by a copy of its content with ``mode`` (and,
    as root, its owner), in one visible step (``_replace_file``)."""
    import hashlib
    src = fileio.open_file(_s(ws.abspath(rel)), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        def fill(fd: int) -> tuple[str, int]:
            h = hashlib.sha256()
            n = 0
            while True:
                chunk = os.pread(src, 1 << 20, n)
                if not chunk:
                    return h.hexdigest(), n
                fileio.pwrite_all(fd, chunk, n)
                h.update(chunk)
                n += len(chunk)
        _replace_file(ws, rel, fill, mode, owner, durable, doing="change the mode of")
    finally:
        os.close(src)


def make_dir(ws: Workspace, path: PathLike, mode: int | None = None,
             durable: bool = True) -> Applied:
    """Create the directory ``path`` (and its missing parents); FileExistsError when
    anything is there."""
    rel, abs_path = ws.resolve(path)
    mode = default_dir_mode() if mode is None else check_mode(mode)
    if _lstat(abs_path) is not None:
        raise FileExistsError(errno.EEXIST, f"cannot create directory {display(rel)!r} in "
                              f"workspace {ws.root!r}: it exists", _s(abs_path))
    created = _make_parents(ws, rel, durable)
    try:
        _mkdir_atomic(ws, rel, mode, None, durable)
    except OSError as e:
        _undo_created(ws, created, durable)
        raise _fail(e, "create directory", ws, rel) from e
    return Applied(rel, read_entry(abs_path), created)


def make_symlink(ws: Workspace, path: PathLike, target: str | bytes,
                 durable: bool = True, owner: Entry | None = None) -> Applied:
    """Make ``path`` a symlink to ``target`` (replacing a file or symlink atomically;
    IsADirectoryError over a directory).  The target is data: never followed."""
    rel, abs_path = ws.resolve(path)
    target_b = os.fsencode(target)
    if not target_b or b"\0" in target_b:
        raise ValueError("a symlink target must be non-empty and contain no NUL byte")
    st = _lstat(abs_path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot make {display(rel)!r} in workspace "
                                f"{ws.root!r} a symlink: it is a directory", _s(abs_path))
    created = _make_parents(ws, rel, durable)
    try:
        with pinned_parent(ws, rel) as (parent, pinned):  # (see pinned_parent)
            tmp = _temp_name(parent)
            try:
                fsops.symlink(target_b, tmp)
                _chown(tmp, owner)
                fileio.rename(_s(tmp), _s(pinned))
            except OSError:
                try:
                    fileio.unlink(_s(tmp))
                except OSError:
                    pass
                raise
            _fsync_dir(parent, durable)
    except OSError as e:
        _undo_created(ws, created, durable)
        raise _fail(e, "create symlink", ws, rel) from e
    except ValueError:
        _undo_created(ws, created, durable)
        raise
    return Applied(rel, read_entry(abs_path), created)


def delete(ws: Workspace, path: PathLike, durable: bool = True) -> Entry:
    """Remove a file, a symlink or an EMPTY directory; returns what was there (without a
    content hash).  FileNotFoundError when nothing is."""
    rel, abs_path = ws.resolve(path)
    st = _lstat(abs_path)
    if st is None:
        raise FileNotFoundError(errno.ENOENT, f"cannot delete {display(rel)!r} in workspace "
                                f"{ws.root!r}: it does not exist", _s(abs_path))
    gone = read_entry(abs_path, hash=False)
    _remove(ws, rel, stat.S_ISDIR(st.st_mode), durable)
    return gone


def _remove(ws: Workspace, rel: bytes, is_dir: bool, durable: bool) -> None:
    """unlink (rmdir) ``rel``, then fsync its directory; errors name the path.  In its
    parent pinned (``pin_dir``): a directory on the way swapped for a symlink after the
    checks made the unlink remove a file outside the root."""
    try:
        pin = pin_dir(ws, parent_of(rel))
    except OSError as e:
        raise _fail(e, "delete", ws, rel) from e
    try:
        parent = pin.path if pin is not None else ws.abspath(parent_of(rel))
        abs_path = parent + b"/" + rel.rpartition(b"/")[2]
        try:
            if is_dir:
                _rmdir(abs_path)
            else:
                fileio.unlink(_s(abs_path))
        except OSError as e:
            raise _fail(e, "delete", ws, rel) from e
        _fsync_dir(parent, durable)
    finally:
        if pin is not None:
            pin.close()


def rename(ws: Workspace, src: PathLike, dst: PathLike, durable: bool = True) -> Applied:
    """Move ``src`` to ``dst`` (one ``rename``; for the record it is a delete of ``src``
    and a create of ``dst``).  Missing parents of ``dst`` are created and reported.
    ``dst`` may be an existing file or symlink (replaced), or an empty directory when
    ``src`` is one."""
    srel, sabs = ws.resolve(src)
    drel, dabs = ws.resolve(dst)
    if srel == drel:
        raise ValueError(f"cannot rename {display(srel)!r} onto itself")
    _refuse_moving_excluded(ws, srel)
    if drel.startswith(srel + b"/"):
        raise ValueError(f"cannot move {display(srel)!r} into itself ({display(drel)!r})")
    sst = _lstat(sabs)
    if sst is None:
        raise FileNotFoundError(errno.ENOENT, f"cannot rename {display(srel)!r} in workspace "
                                f"{ws.root!r}: it does not exist", _s(sabs))
    dst_st = _lstat(dabs)
    if dst_st is not None and stat.S_ISDIR(dst_st.st_mode) and not stat.S_ISDIR(sst.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot rename {display(srel)!r} onto "
                                f"directory {display(drel)!r}", _s(dabs))
    if dst_st is not None and not stat.S_ISDIR(sst.st_mode) \
            and (sst.st_dev, sst.st_ino) == (dst_st.st_dev, dst_st.st_ino):
        # two names of one inode (hard links): rename(2) does nothing and succeeds, so
        # ``src`` stayed while the steps logged said it was gone (the store's view and
        # the disk disagreed from the commit on).  ``dst`` already is the file: the
        # move's one effect is ``src``'s removal (as coreutils' mv does).
        _remove(ws, srel, False, durable)  # (in its parent pinned, as any removal)
        return Applied(drel, read_entry(dabs, hash=False))
    created = _make_parents(ws, drel, durable)
    # both parents pinned (see _replace_file): a directory on the way swapped for a
    # symlink after the checks above made the rename take a file from, or put it,
    # outside the root
    pins: list = []
    try:
        for rel_dir in (parent_of(srel), parent_of(drel)):
            try:
                pins.append(pin_dir(ws, rel_dir))
            except OSError as e:  # (a parent gone meanwhile, EIO: the rename's own error)
                _undo_created(ws, created, durable)
                raise _fail(e, "rename", ws, srel, drel) from e
        src_dir = pins[0].path if pins[0] is not None else ws.abspath(parent_of(srel))
        dst_dir = pins[1].path if pins[1] is not None else ws.abspath(parent_of(drel))
        try:
            fileio.rename(_s(src_dir + b"/" + srel.rpartition(b"/")[2]),
                          _s(dst_dir + b"/" + drel.rpartition(b"/")[2]))
        except OSError as e:
            _undo_created(ws, created, durable)
            raise _fail(e, "rename", ws, srel, drel) from e
        _fsync_dir(src_dir, durable)
        if parent_of(drel) != parent_of(srel):
            _fsync_dir(dst_dir, durable)
    except WorkspaceChanged:
        if len(pins) < 2:  # (refused before the rename: what it created goes)
            _undo_created(ws, created, durable)
        raise
    finally:
        for pin in pins:
            if pin is not None:
                pin.close()
    return Applied(drel, read_entry(dabs, hash=False), created)


def _refuse_moving_excluded(ws: Workspace, rel: bytes) -> None:
    """ValueError when ``rel`` holds walstore's own directory (the store inside the
    workspace): a rename would move the store with it (rmtree keeps it, and a delete of
    a directory that is not empty is refused anyway)."""
    held = ws.holding_excluded(rel)
    if held is not None:
        raise ValueError(f"cannot rename {display(rel)!r} in workspace {ws.root!r}: it "
                         f"holds walstore's own directory {display(held)!r}; nothing was "
                         f"changed")


def rmtree(ws: Workspace, path: PathLike, expected: dict[bytes, Entry] | None = None,
           durable: bool = True) -> tuple[list[bytes], list[bytes]]:
    """Remove ``path`` and everything under it, children before parents, never following
    a symlink.  With ``expected`` (rel -> Entry captured before, e.g. the before-images
    just logged) only paths still in that state are removed (kind, mode, size, target):
    anything new or changed is kept, and so are its parents.  Returns (removed, kept).

    The tree is walked through directory descriptors, each opened relative to its parent
    with ``O_NOFOLLOW``, and every name is looked at and removed relative to its
    directory's descriptor (``fsops.unlink_at`` / ``rmdir_at``): a directory that another
    process swaps for a symlink while this runs is never gone through, so nothing outside
    the root is removed.  A directory ``expected`` holds that is a symlink now (or that is
    swapped between its ``lstat`` and its opening) raises ``WorkspaceChanged`` (a
    ValueError) naming it; what was removed before stays removed (the caller's undo puts
    it back: the steps logged describe it)."""
    rel, abs_path = ws.resolve(path)
    pfd = open_dir(ws, parent_of(rel))
    try:
        name = rel.rpartition(b"/")[2]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"cannot remove {display(rel)!r} in "
                                    f"workspace {ws.root!r}: it does not exist",
                                    _s(abs_path)) from None
        run = _Rmtree(ws, expected)
        try:
            run.remove(pfd, name, rel, st)
        finally:
            if durable:
                for d in sorted(run.dirs_done, key=len, reverse=True):
                    if os.path.isdir(ws.abspath(d)):
                        _fsync_dir(ws.abspath(d), durable)
    finally:
        os.close(pfd)
    return run.removed, run.kept




_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# a file system stamps ctime from a coarse clock (one kernel tick, 1-10 ms, behind the
# clock an undone change's time was read from): a path made right after that change may
# carry a ctime this much older than it
CTIME_SLACK_NS = 20_000_000


def _clear_ignored(ws: Workspace, rel: bytes, since_ns: int | None = None) -> bool:
    """Empty the directory ``rel`` that an undo must remove when every name in it is one
    of the workspace's ignored paths (``ignore=``: untracked by declaration, e.g. the
    ``__pycache__`` a test run left in a package the transaction created): they are
    removed with it, as ``git clean -X`` would.  Anything not ignored in it: False and
    nothing removed (the caller reports a conflict).  Walked through directory
    descriptors, never following a symlink (``_Rmtree``).

    ``since_ns``: when the undone change that made the directory ran (None: not known,
    every ignored path goes).  The directory did not exist in the before-image, but what
    it holds may predate it: a watched ``mv src dst`` moves ``src``'s ignored ``.env``,
    ``.venv/``, ``__pycache__/`` along, and its undo removes ``dst`` and makes ``src``
    anew from the steps, which never name ignored paths — they were deleted for good.  So
    a path anywhere under an ignored name whose ctime is older than ``since_ns`` (less
    ``CTIME_SLACK_NS``; ctime cannot be set back, and a rename or link of it moves it
    forward) keeps the directory: a conflict, nothing removed."""
    if not ws.ignore:
        return False
    try:
        fd = open_dir(ws, rel)
    except (OSError, ValueError):
        return False
    try:
        children = []
        for child in sorted(os.fsencode(n) for n in os.listdir(fd)):
            try:
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            crel = rel + b"/" + child
            if (ws.exclude and ws.excluded(crel)) \
                    or not ws.ignored(crel, stat.S_ISDIR(cst.st_mode)):
                return False
            children.append((child, crel, cst))
        if since_ns is not None and any(
                older_inside(fd, child, cst, since_ns - CTIME_SLACK_NS)
                for child, _crel, cst in children):
            return False
        run = _Rmtree(ws, None)
        return all([run.remove(fd, child, crel, cst) for child, crel, cst in children])
    finally:
        os.close(fd)


def older_inside(pfd: int, name: bytes, st: os.stat_result, bound_ns: int) -> bool:
    """Is ``name`` (in the directory ``pfd``, ``st`` its lstat), or anything under it, of
    a ctime older than ``bound_ns``?  Never follows a symlink; a name gone meanwhile is
    not older; a directory that cannot be opened is (kept rather than lost)."""
    if st.st_ctime_ns < bound_ns:
        return True
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        for child in os.listdir(fd):
            try:
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if older_inside(fd, os.fsencode(child), cst, bound_ns):
                return True
        return False
    except OSError:
        return True  # (what cannot be looked at is kept, not removed unseen)
    finally:
        os.close(fd)


def open_dir(ws: Workspace, rel: bytes) -> int:
    """A descriptor of the workspace directory ``rel`` (b"": the root), opened component
    by component from the root, each relative to its parent with ``O_NOFOLLOW``: a
    symlink on the way (even one swapped in after ``resolve``) raises ValueError, a file
    NotADirectoryError, as ``Workspace.check_parents`` does."""
    ws.check_root()
    fd = os.open(ws.root_b, _DIR_FLAGS)
    cur = b""
    try:
        for comp in rel.split(b"/") if rel else ():
            cur = cur + b"/" + comp if cur else comp
            try:
                nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ValueError(f"{display(cur)!r} in workspace {ws.root!r} is a "
                                     f"symlink; walstore never follows a symlink on the way "
                                     f"to a path") from None
                if e.errno == errno.ENOTDIR:
                    raise NotADirectoryError(errno.ENOTDIR, f"{display(cur)!r} in workspace "
                                             f"{ws.root!r} is not a directory") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Rmtree:
    """One ``rmtree`` run: what it removed and kept, the directories to fsync."""

    def __init__(self, ws: Workspace, expected: dict[bytes, Entry] | None) -> None:
        self.ws = ws
        self.expected = expected
        self.removed: list[bytes] = []
        self.kept: list[bytes] = []
        self.dirs_done: set[bytes] = set()

    def _swapped(self, rel: bytes, what: str) -> WorkspaceChanged:
        return WorkspaceChanged(
            f"cannot remove {display(rel)!r} in workspace {self.ws.root!r}: the directory "
            f"{what} while rmtree ran (another process changed it); walstore never goes "
            f"through a symlink, so it stopped there ({len(self.removed)} path(s) were "
            f"removed before)")

    def _keep(self, rel: bytes) -> bool:
        self.kept.append(rel)
        return False

    def remove(self, pfd: int, name: bytes, rel: bytes, st: os.stat_result) -> bool:
        """Remove ``rel`` (``name`` in the directory ``pfd``, ``st`` its lstat) and what
        it holds; False when it (or something under it) is kept."""
        ws = self.ws
        if ws.exclude and ws.excluded(rel):
            return self._keep(rel)
        is_dir = stat.S_ISDIR(st.st_mode)
        if self.expected is not None:
            want = self.expected.get(rel)
            if want is not None and want.kind == DIR and not is_dir \
                    and stat.S_ISLNK(st.st_mode):
                raise self._swapped(rel, "was replaced by a symlink")
            if want is None or not _still_at(want, st, pfd, name):
                return self._keep(rel)
        a = ws.abspath(rel)
        if is_dir:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise self._swapped(rel, "was replaced (by a symlink or a file)") from None
                raise _fail(e, "remove", ws, rel) from e
            try:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                    raise self._swapped(rel, "was replaced by another one")
                all_gone = True
                for child in sorted(os.fsencode(n) for n in os.listdir(fd)):
                    try:
                        cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not self.remove(fd, child, rel + b"/" + child, cst):
                        all_gone = False
            finally:
                os.close(fd)
            if not all_gone:
                return self._keep(rel)
        try:
            if is_dir:
                fsops.rmdir_at(pfd, name, a)
            else:
                fsops.unlink_at(pfd, name, _s(a))
        except FileNotFoundError:
            return True
        except OSError as e:
            if is_dir and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return self._keep(rel)  # (something new in it, or replaced meanwhile)
            raise _fail(e, "remove", ws, rel) from e
        self.removed.append(rel)
        self.dirs_done.add(parent_of(rel))
        return True


def _still_at(entry: Entry, st: os.stat_result, dir_fd: int, name: bytes) -> bool:
    """Is the path (``name`` in ``dir_fd``, lstat ``st``) still in the state ``entry``
    (a file: kind, mode and size; else ``Entry.same``)?  A special file never is."""
    m = st.st_mode
    if stat.S_ISREG(m):
        return entry.kind == FILE and (stat.S_IMODE(m), st.st_size) == (entry.mode, entry.size)
    if stat.S_ISDIR(m):
        return entry.kind == DIR and stat.S_IMODE(m) == entry.mode
    if stat.S_ISLNK(m):
        if entry.kind != SYMLINK:
            return False
        try:
            return os.readlink(name, dir_fd=dir_fd) == entry.target
        except OSError:
            return False
    return False


# ---- restore ----------------------------------------------------------------------------
def restore_status(ws: Workspace, path: PathLike, before: Entry,
                   expected_current: Entry | None,
                   done: Iterable[Entry] = (), after_crash: bool = False,
                   current: Entry | None = None) -> RestoreStatus:
    """Classify ``path`` for a restore without changing anything (a revert checks every
    path first and raises RevertConflict naming the conflicts).  ``done``: states that
    count as restored already (the before-images of older steps of the same path, when
    an interrupted undo is run again: it had gone further back) — unless the path is in
    ``expected_current`` (this step's after-image): then it is put back, so a live undo
    goes back step by step, newest first.  ``after_crash``: an
    undo run again by recovery, which may find a path in the state walstore's own restore
    passes through (``_between``); anywhere else that state is a stranger's change.
    ``current``: what the path holds, in place of reading it (a dry run's stand-in for
    bytes a dropped transaction left there, which the real undo puts back first)."""
    root = not ws.rel(path, allow_root=True)  # (the root itself: a watch's mode change)
    if current is None:
        try:
            _rel, abs_path = ws.resolve(path, allow_root=root)
        except (NotADirectoryError, ValueError):
            # a parent is a file or a symlink now: nothing is at this path as the workspace
            # sees it (walstore never goes through either); a restore that must put
            # something here puts the parent back first (an undo runs newest first), or
            # finds it a conflict.  (A revert of a commit that replaced c/ by a file c
            # could not even be planned: NotADirectoryError for c/x.)
            if root:
                raise
            current = Entry.absent()
        else:
            current = read_entry(abs_path, hash=True)
    if before.same(current):
        return RestoreStatus("done", current)
    # walstore's own after-image first: a path a later step changed back to an older
    # before-image (created, then deleted) is still in THIS step's after-image, so it is
    # put back now, not when the older step's undo comes (a compensation logged between
    # the two must see the file).  A re-run after a crash may find that state after the
    # undo had gone further back: restoring it again is a detour the older steps' undo
    # takes back (each step ends in its before-image, the next older step's after-image)
    if expected_current is not None and expected_current.same(current):
        return RestoreStatus("apply", current)
    if any(d.same(current) for d in done):
        return RestoreStatus("done", current)
    if expected_current is not None and not expected_current.exists and current.is_dir \
            and not root and ws.ignored(ws.rel(path), True):
        # a directory the workspace ignores reads as absent to a watch (its manifests
        # leave ignored paths out): a watched ``rm cache; mkdir cache`` under ``cache/``
        # is the step "cache: file -> absent", and its undo called the block's own
        # directory a stranger's change (a conflict: the file not put back).  It is
        # removed like a directory the transaction made (``restore``: the ignored paths in
        # it go when made since the change, else it is kept, a conflict then)
        return RestoreStatus("apply", current)
    if expected_current is not None \
            and not (after_crash and _between(before, expected_current, current)):
        return RestoreStatus("conflict", current)
    return RestoreStatus("apply", current)


def _between(before: Entry, after: Entry, current: Entry) -> bool:
    """``current`` is the state walstore's own restore passes through between ``after``
    and ``before`` when one is a directory and the other is not: the old one is removed,
    then the new one made (two visible steps), so a crash between them leaves the path
    absent.  An undo run again after that crash (recovery of an interrupted revert) used
    to call it "changed behind walstore's back" and leave the path absent for good.  Only
    after a crash: a live revert finding the path absent found a stranger's delete."""
    return (not current.exists and before.exists and after.exists
            and before.is_dir != after.is_dir)


def restore(ws: Workspace, path: PathLike, before: Entry, expected_current: Entry | None,
            blobs: BlobStore, quarantine: str | bytes | None = None,
            durable: bool = True, done: Iterable[Entry] = (),
            after_crash: bool = False, since_ns: int | None = None,
            keep: Entry | None = None) -> FileConflict | None:
    """Put the before-image ``before`` back at ``path``.

    ``expected_current``: the state walstore left the path in (its after-image); when the
    path is neither that nor ``before``, nothing is changed: the before-image is saved
    under ``quarantine`` (``<quarantine>/<path>``, a numbered suffix if taken) and a
    FileConflict is returned.  None means any current state is walstore's own (a crashed
    watch, or a forced revert).  A directory that must go but holds something walstore
    does not know is kept, as a conflict too.  Returns None when the path is (now) in its
    before-image (or in one of the ``done`` states: see ``restore_status``).  Missing
    parents are created (default mode).  ``since_ns``: when the undone change ran (a
    directory to remove keeps ignored paths older than it: ``_clear_ignored``).
    ``keep``: walstore's version to keep and report on a conflict when it is not
    ``before`` (an undo of several steps of one path: the oldest one's before-image)."""
    root = not ws.rel(path, allow_root=True)  # (the root itself: a watch's mode change)
    try:  # (ValueError: a symlink on the way, never gone through)
        ws.resolve(path, allow_root=root)
    except NotADirectoryError:
        pass  # a file on the way: nothing is at the path (restore_status says absent)
    if expected_current is None and not root:
        remove_special(ws, path, durable)
    status = restore_status(ws, path, before, expected_current, done, after_crash)
    current = status.current
    if status.state == "done":  # (also a path to stay absent under a parent that is a
        return None             # file now: a failed rename's undo found conflicts there)
    rel, abs_path = ws.resolve(path, allow_root=root)
    if status.state == "conflict":
        return _conflict(ws, rel, keep or before, expected_current, current, blobs, quarantine,
                         "changed behind walstore's back (neither walstore's version nor "
                         "the one to restore)")
    if root and not (before.kind == current.kind == DIR):
        # the root is only ever restored to its mode: it is never created or removed
        return FileConflict(rel, before, expected_current, current, None,
                            "the workspace root itself is only put back to its mode")
    if current.kind == DIR and before.kind != DIR:
        try:
            with pinned_parent(ws, rel) as (_parent, pinned):
                try:
                    _rmdir(pinned)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) \
                            or not _clear_ignored(ws, rel, since_ns):
                        raise
                    _rmdir(pinned)  # (it held only ignored paths, now removed)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise _fail(e, "remove directory", ws, rel) from e
            return _conflict(ws, rel, keep or before, expected_current, current, blobs, quarantine,
                             "a directory to remove holds files walstore does not know")
        _fsync_dir(ws.abspath(parent_of(rel)), durable)
        current = Entry.absent()
    if before.kind == ABSENT:
        if current.exists:
            _remove(ws, rel, False, durable)
        return None
    if before.kind == FILE:
        if current.kind == FILE and current.sha256 == before.sha256:
            try:  # only the mode differs: one chmod (after the chown, which clears
                if os.lstat(abs_path).st_nlink > 1:  # setuid/setgid bits); a hard link:
                    _unshare(ws, rel, before.mode, before, durable)  # a copy (set_mode)
                else:
                    with pinned_parent(ws, rel) as (_parent, pinned):
                        _chown(pinned, before)
                        _chmod_nofollow(pinned, before.mode, durable)
            except OSError as e:
                raise _fail(e, "change the mode of", ws, rel) from e
            return None
        write_blob(ws, rel, blobs, before.sha256 or "", before.mode, before, durable)
        return None
    if before.kind == SYMLINK:
        make_symlink(ws, rel, before.target or b"", durable, owner=before)
        return None
    # a directory
    if current.kind == DIR:
        try:
            with pinned_parent(ws, rel) as (_parent, pinned):
                _chown(pinned, before)  # (first: a chown clears setuid/setgid bits)
                _chmod_nofollow(pinned, before.mode, durable)
        except OSError as e:
            raise _fail(e, "change the mode of", ws, rel) from e
        return None
    if current.exists:  # a file or symlink where the directory was
        _remove(ws, rel, False, durable)
    _make_parents(ws, rel, durable)
    try:
        _mkdir_atomic(ws, rel, before.mode, before, durable)
    except OSError as e:
        raise _fail(e, "create directory", ws, rel) from e
    return None


def remove_special(ws: Workspace, path: PathLike, durable: bool) -> None:
    """A restore over any current state (``expected_current`` None: a forced revert, a
    crashed watch) puts the before-image over a FIFO, socket or device too: it is removed
    first (walstore tracks none; its manifests skip them, so no step describes one).  It
    was UnsupportedFileType, and a forced revert of such a path could not be done."""
    try:
        rel, abs_path = ws.resolve(path)
    except (NotADirectoryError, ValueError):
        return  # (nothing reachable there: restore_status says so)
    st = _lstat(abs_path)
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                               or stat.S_ISLNK(st.st_mode)):
        _remove(ws, rel, False, durable)


def _conflict(ws: Workspace, rel: bytes, before: Entry, expected: Entry | None,
              current: Entry, blobs: BlobStore, quarantine: str | bytes | None,
              reason: str) -> FileConflict:
    saved = None
    if quarantine is not None and before.exists and rel:  # (the root: a mode, no copy)
        saved = save_aside(rel, before, blobs, os.fsencode(quarantine))
    return FileConflict(rel, before, expected, current, saved, reason)


def save_aside(rel: bytes, before: Entry, blobs: BlobStore, quarantine: bytes) -> str:
    """Keep the before-image at ``<quarantine>/<rel>`` (walstore's file: 0600/0700).  A
    name taken there gets a numbered suffix (``b.1``), and so does a directory on the way
    taken by a file or symlink kept earlier (``a`` kept, then ``a/b``: ``a.1/b``; the copy
    could not be made, FileExistsError, and the undo failed at every open)."""
    if not os.path.isabs(quarantine):
        raise ValueError("the quarantine directory must be an absolute path")
    *ways, name = rel.split(b"/")
    where = quarantine
    for part in ways:
        n = 0
        step = where + b"/" + part
        while os.path.lexists(step) and (os.path.islink(step) or not os.path.isdir(step)):
            n += 1
            step = where + b"/" + _suffixed(part, n)
        where = step
    dest = where + b"/" + name
    _make_aside_dirs(os.path.dirname(dest))
    n = 0
    candidate = dest
    while os.path.lexists(candidate):
        n += 1
        candidate = where + b"/" + _suffixed(name, n)
    tmp = _temp_name(os.path.dirname(candidate))
    if before.kind == FILE:
        fd = fileio.open_file(_s(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
        try:
            blobs.copy_to(before.sha256 or "", fd)
            fileio.fsync(fd)
        except BaseException:
            os.close(fd)
            fileio.unlink(_s(tmp))
            raise
        os.close(fd)
        fileio.rename(_s(tmp), _s(candidate))
    elif before.kind == SYMLINK:
        fsops.symlink(before.target or b"", tmp)
        fileio.rename(_s(tmp), _s(candidate))
    else:
        _make_aside_dirs(candidate)
    fileio.fsync_dir(_s(os.path.dirname(candidate)))
    return _s(candidate)


def _suffixed(name: bytes, n: int) -> bytes:
    """``name.<n>``, within NAME_MAX: the end of a long name gives way to the suffix (a
    255-byte name's ``.1`` made the copy fail with ENAMETOOLONG, and the undo stayed owed
    at every open after, failing the same way; audit 58)."""
    suffix = b".%d" % n
    return name[:fileio.NAME_MAX - len(suffix)] + suffix


def _make_aside_dirs(path: bytes) -> None:
    """The directories of a conflict's copy, each fsynced into its parent: the
    FILE_CONFLICT record naming the copy is durable, and a power loss dropped
    ``quarantine/files/tx<N>/`` and the copy with it (only the copy's own directory was
    fsynced)."""
    fsops.make_dirs(path, durable=True)


# ---- crash leftovers --------------------------------------------------------------------
def remove_stray_temps(ws: Workspace, dirs: Iterable[PathLike] | None = None,
                       durable: bool = True) -> list[bytes]:
    """Remove the temporary names (``TEMP_PREFIX``) a crashed apply left in ``dirs``
    (relative directories; None: the whole workspace, ignored paths included).  A temp
    directory that is not empty is kept (walstore only ever leaves empty ones).  Returns
    the relative paths removed."""
    if dirs is None:
        todo = [b""]
        recurse = True
    else:
        todo = sorted({ws.rel(d, allow_root=True) for d in dirs})
        recurse = False
    gone: list[bytes] = []
    while todo:
        d = todo.pop()
        try:
            ws.check_parents(d + b"/x" if d else b"x")
            it = os.scandir(ws.abspath(d))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        touched = False
        with it:
            for de in it:
                child = d + b"/" + de.name if d else de.name
                is_dir = de.is_dir(follow_symlinks=False)
                if is_temp_name(de.name):
                    # removed in its parent pinned from the root: by its absolute path, a
                    # directory swapped for a symlink to outside since the check above
                    # made this remove a temp name outside the root (WorkspaceChanged)
                    try:
                        with pinned_parent(ws, child) as (_parent, pinned):
                            if is_dir:
                                _rmdir(pinned)
                            else:
                                fileio.unlink(_s(pinned))
                    except (OSError, ValueError):
                        continue
                    gone.append(child)
                    touched = True
                elif is_dir and recurse:
                    todo.append(child)
        if touched:
            _fsync_dir(ws.abspath(d), durable)
    return sorted(gone)
