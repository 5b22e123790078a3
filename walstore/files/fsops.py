"""The directory, symlink and mode calls of the files package, through the fault seam.

``walstore.fileio`` routes opens, writes, syncs, renames and unlinks to its backend
(``fileio.set_backend``), but not ``mkdir``, ``rmdir``, ``symlink`` or ``chmod``: the WAL
never needs them, a workspace does.  So that a backend (``tools/powerloss.py`` recording
a workspace's I/O for power-loss images, a fault injector) sees every change the files
package makes, these calls go to the installed backend when it implements a method of
the same name (``mkdir(path, mode)``, ``rmdir(path)``, ``symlink(target, path)``,
``chmod(path, mode)``, ``fchmod(fd, mode)``), else straight to ``os``.  Paths are bytes
or str, as ``os`` takes them.

``unlink_at`` / ``rmdir_at`` remove a name relative to an open directory (``dir_fd``), so
that a directory on the way swapped for a symlink meanwhile is never gone through
(``apply.rmtree``).  A backend sees them as ``unlinkat(dir_fd, name)`` /
``rmdirat(dir_fd, name)`` when it has those methods; otherwise an installed backend (a
test tool: it records or fails paths) gets the path form, ``unlink(path)`` /
``rmdir(path)``, with the absolute path the caller names; with no backend installed the
``os`` call takes ``dir_fd=``.

(When ``walstore.fileio`` grows these seam calls itself, this module becomes aliases.)
"""
from __future__ import annotations

import os

from .. import fileio

__all__ = ["mkdir", "rmdir", "symlink", "chmod", "fchmod", "make_dirs", "unlink_at",
           "rmdir_at"]


def _backend_call(name: str):
    return getattr(fileio._backend, name, None)  # the backend installed right now


def mkdir(path: str | bytes, mode: int = 0o777) -> None:
    fn = _backend_call("mkdir")
    (fn or os.mkdir)(path, mode)


def rmdir(path: str | bytes) -> None:
    fn = _backend_call("rmdir")
    (fn or os.rmdir)(path)


def unlink_at(dir_fd: int, name: bytes, path: str | bytes) -> None:
    """Unlink ``name`` in the open directory ``dir_fd`` (``path``: its absolute form, for
    a backend without ``unlinkat``; see the module docstring)."""
    fn = _backend_call("unlinkat")
    if fn is not None:
        fn(dir_fd, name)
    elif fileio.faults_installed:
        fileio.unlink(os.fsdecode(path))
    else:
        os.unlink(name, dir_fd=dir_fd)


def rmdir_at(dir_fd: int, name: bytes, path: str | bytes) -> None:
    """Remove the empty directory ``name`` in the open directory ``dir_fd`` (``path``: its
    absolute form, for a backend without ``rmdirat``)."""
    fn = _backend_call("rmdirat")
    if fn is not None:
        fn(dir_fd, name)
        return
    fn = _backend_call("rmdir")
    if fn is not None:
        fn(path)
    else:
        os.rmdir(name, dir_fd=dir_fd)


def symlink(target: str | bytes, path: str | bytes) -> None:
    fn = _backend_call("symlink")
    (fn or os.symlink)(target, path)


def chmod(path: str | bytes, mode: int) -> None:
    fn = _backend_call("chmod")
    (fn or os.chmod)(path, mode)


def fchmod(fd: int, mode: int) -> None:
    fn = _backend_call("fchmod")
    (fn or os.fchmod)(fd, mode)


def make_dirs(path: str | bytes, mode: int = fileio.DIR_MODE, durable: bool = False) -> None:
    """``fileio.make_dir`` through the seam: every missing component created (0700 for
    walstore's own directories), an existing directory kept.  ``durable``: each one
    created is fsynced into its parent (a durable record naming a file in it)."""
    path = os.fsdecode(path)
    missing = []
    cur = path
    while cur and not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for p in reversed(missing):
        try:
            mkdir(p, mode)
        except FileExistsError:
            if not os.path.isdir(p):
                raise
            continue
        chmod(p, mode)
        if durable:
            fileio.fsync_dir(os.path.dirname(p))
