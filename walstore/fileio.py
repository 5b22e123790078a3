"""Every byte walstore writes to its WAL and store files goes through this module.

It owns three things: the permissions of what walstore creates (files 0600, directories
0700), writes that never stop half way without an error (``pwrite_all``), and one seam,
``set_backend``, through which the fault-injection tools (``tools/faults.py``) record
writes and fsyncs, drop unsynced bytes, or fail a call with ENOSPC / EIO.  The same seam
reaches the I/O walstore does not do itself: ``lmdb_io`` is called before every LMDB
commit and sync (a backend may raise ``lmdb.Error`` there), and ``fault_point`` marks named
places in the commit pipeline (e.g. between the commit point and the return) where a
backend may raise anything.  Nothing in the package installs another backend by itself.
``clone`` / ``copy_range`` are the kernel-side copies (FICLONE, copy_file_range) of the
reversible-files blob store (``walstore.files.blobs``): bytes they move never pass through
``pwrite``, so they go through the seam too, where a backend can fail or record them.
``stage_inside`` / ``move_up`` / ``scratch_stem``: where a copy (backup, restore) is staged.
"""
from __future__ import annotations

import errno
import os

FILE_MODE = 0o600
DIR_MODE = 0o700
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


class OSBackend:
    """The real thing: plain ``os`` calls."""

    def open(self, path: str, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    def pwrite(self, fd: int, data, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def clone(self, src_fd: int, dst_fd: int) -> None:
        """Make ``dst_fd`` share ``src_fd``'s blocks (FICLONE); OSError (EOPNOTSUPP,
        EXDEV, ...) where the file system cannot."""
        import fcntl
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)

    def copy_range(self, src_fd: int, dst_fd: int, count: int, src_offset: int,
                   dst_offset: int) -> int:
        """os.copy_file_range: a kernel-side copy (a reflink on some file systems)."""
        return os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)

    def write_back(self, fd: int, offset: int, length: int) -> bool:
        """Write the range's dirty pages to the device and wait for them (Linux
        ``sync_file_range`` WAIT_BEFORE|WRITE|WAIT_AFTER).  Not durable: no cache flush,
        no metadata.  False where the call does not exist or the file system refuses it;
        OSError for an I/O error."""
        fn = _sync_file_range()
        if fn is None:
            return False
        if fn(fd, offset, length, _SFR_WAIT_WRITE_WAIT) == 0:
            return True
        import ctypes
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
            return False
        raise OSError(err, os.strerror(err))

    def syncfs(self, path: str) -> None:
        """Make everything written to the file system holding ``path`` durable (Linux
        ``syncfs``; ``os.sync`` where it does not exist): file data, renames, removals,
        modes.  OSError for an I/O error the file system reports."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fn = _syncfs()
            if fn is None:
                os.sync()
                return
            if fn(fd) != 0:
                import ctypes
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
        finally:
            os.close(fd)

    def lmdb_io(self, op: str, path: str) -> None:
        """Called before an LMDB ``commit`` or ``sync`` of the environment at ``path``."""

    def fault_point(self, name: str) -> None:
        """Called at a named place of the commit pipeline."""


_SFR_WAIT_WRITE_WAIT = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER
_libc_fns: dict = {}  # name -> the libc function or None, looked up once


def _libc(name: str, argtypes: tuple, restype_name: str = "c_int"):
    """libc's ``name`` (ctypes, errno kept), or None where it does not exist (not Linux,
    no ctypes)."""
    if name not in _libc_fns:
        fn = None
        try:
            import ctypes
            fn = getattr(ctypes.CDLL(None, use_errno=True), name)
            fn.argtypes = tuple(getattr(ctypes, t) for t in argtypes)
            fn.restype = getattr(ctypes, restype_name)
        except (ImportError, OSError, AttributeError):
            fn = None
        _libc_fns[name] = fn
    return _libc_fns[name]


def _sync_file_range():
    return _libc("sync_file_range", ("c_int", "c_int64", "c_int64", "c_uint"))


def _syncfs():
    return _libc("syncfs", ("c_int",))


_backend: OSBackend = OSBackend()
faults_installed = False  # a test's backend is installed: fault points are live (else free)


def set_backend(backend: OSBackend | None) -> OSBackend:
    """Install ``backend`` (None restores the OS); returns the previous one."""
    global _backend, faults_installed
    previous = _backend
    _backend = backend if backend is not None else OSBackend()
    faults_installed = type(_backend) is not OSBackend
    return previous


def open_file(path: str, flags: int) -> int:
    return _backend.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``; on failure the OSError raised carries
    ``written``: how many bytes from the start of ``data`` were written before it."""
    # (an error here: nothing written, or a test backend's ``written`` prefix; the OS
    # called directly unless a test backend is installed: one call less per commit)
    n = _backend.pwrite(fd, data, offset) if faults_installed else os.pwrite(fd, data, offset)
    if n == len(data):
        return
    done = 0
    view = memoryview(data)
    try:
        while True:
            if n <= 0:
                raise OSError(f"short write at offset {offset + done}")
            done += n
            view = view[n:]
            if not view:
                return
            n = _backend.pwrite(fd, view, offset + done)
    except OSError as e:
        e.written = done + getattr(e, "written", 0)
        raise


def fsync(fd: int) -> None:
    _backend.fsync(fd)


def fdatasync(fd: int) -> None:
    _backend.fdatasync(fd)


def write_back(fd: int, offset: int, length: int) -> bool:
    """Push a range of written pages to the device now, waiting for them (not durable:
    see ``OSBackend.write_back``); False where the platform cannot."""
    return _backend.write_back(fd, offset, length)


def rename(src: str, dst: str) -> None:
    _backend.rename(src, dst)


def unlink(path: str) -> None:
    _backend.unlink(path)


def fsync_dir(path: str) -> None:
    _backend.fsync_dir(path)


def syncfs(path: str) -> None:
    """Everything written on the file system of directory ``path`` made durable."""
    _backend.syncfs(path)


def free_bytes(path: str) -> int | None:
    """Bytes free to an unprivileged writer on ``path``'s file system (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def remove_quietly(path: str) -> None:
    """Unlink ``path`` if it can be (a leftover temp file: not being there is fine).
    Through the backend like every other unlink: a recording backend (the power-loss
    tool) must see the old file go, or it takes a file created again at the same name
    (the WAL's spare, replaced by a bigger one) for the old one truncated."""
    if not os.path.lexists(path):
        return
    try:
        _backend.unlink(path)
    except OSError:
        pass


def clone(src_fd: int, dst_fd: int) -> None:
    _backend.clone(src_fd, dst_fd)


def copy_range(src_fd: int, dst_fd: int, count: int, src_offset: int, dst_offset: int) -> int:
    return _backend.copy_range(src_fd, dst_fd, count, src_offset, dst_offset)


def lmdb_io(op: str, path: str) -> None:
    _backend.lmdb_io(op, path)


def fault_point(name: str) -> None:
    _backend.fault_point(name)


def make_dir(path: str, own: bool = True) -> None:
    """Create ``path`` and its missing parents, each with mode 0700 (``os.makedirs`` gives
    the mode to the last one only: parents came out 0755 under umask 022); an existing
    directory is kept (an existing parent's mode is not changed).  ``own``: ``path`` is
    the store's own (its root, ``wal/``, a staging copy): made 0700 even when it existed
    (an empty directory the user made for the store).  ``own=False`` for a directory that
    only holds what walstore makes (a backup's parent, a file:// replica's folders): an
    existing one keeps its mode — `walstore backup SRC /tmp/copy` made /tmp itself 0700,
    sticky bit gone, and every other user of the machine lost /tmp (stop 48).  Each directory made is
    durable in its parent before the next is made and before this returns (the parent
    fsynced): a file fsynced into it later is durable with its whole path.  (A power loss
    could drop a new ``files/`` with every before-image in it, or a new ``quarantine/``
    with the cut bytes: only the innermost directory was ever fsynced.)"""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not missing and not os.path.isdir(path):
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", path)
    for p in reversed(missing):  # (under a file: NotADirectoryError, as os.makedirs)
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(p):
                raise
            continue
        os.chmod(p, DIR_MODE)  # (the umask may have cut bits of 0700: set it exactly)
        try:
            fsync_dir(os.path.dirname(p))
        except OSError as e:
            e.walstore_sync_failed = True  # type: ignore[attr-defined]  (see is_sync_failure)
            raise
    if own and not missing:  # (an existing directory that is the store's own; one made
        os.chmod(path, DIR_MODE)  # above has its mode set already)


def is_sync_failure(e: BaseException) -> bool:
    """Did ``make_dir`` raise ``e`` because an fsync of a parent directory failed (not the
    mkdir itself)?  Such a failure is final for what the directory holds: the entry may
    not survive a power loss, and a later fsync may report success all the same."""
    return bool(getattr(e, "walstore_sync_failed", False))


def write_file_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably (temp file, fsync, rename, dir fsync).

    A write or fsync that fails (a full disk) removes the temp file and raises the
    OSError naming ``path``: a recovery's quarantine copy that met ENOSPC left a partial
    ``X.bin.tmp`` behind for good, and its error named only the store (probe-audit59)."""
    tmp = path + ".tmp"
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            pwrite_all(fd, data, 0)
            fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        _discard_temp(tmp, e, path)
        raise
    rename(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _discard_temp(tmp: str, e: OSError, name: str) -> None:
    """A temp file whose write failed is no copy of anything: remove it (best effort),
    and let ``e`` name the file it was to become when it names none (pwrite, fsync)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
    if e.filename is None:
        e.filename = name


COPY_CHUNK = 1 << 20


def copy_file_atomic(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` durably: a temp file made 0600 (never the umask's mode),
    streamed 1 MiB at a time, fsynced, renamed, the directory fsynced.  A failure removes
    the temp file; the OSError names ``dest`` when writing failed (a full disk), ``src``
    when reading did.  (recovery's copy of a salvaged log: ``shutil.copyfile`` made
    ``*.salvaged.*.bin.tmp`` 0644 and left it, partial, when the disk filled, the error
    naming the WAL segment it read: probe-audit59.)"""
    tmp = dest + ".tmp"
    with open(src, "rb", buffering=0) as f:
        fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            try:
                os.fchmod(fd, FILE_MODE)  # (an existing temp file keeps its old mode)
                offset = 0
                while True:
                    try:
                        chunk = f.read(COPY_CHUNK)
                    except OSError as e:
                        if e.filename is None:
                            e.filename = src
                        raise
                    if not chunk:
                        break
                    pwrite_all(fd, chunk, offset)
                    offset += len(chunk)
                fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            _discard_temp(tmp, e, dest)
            raise
    rename(tmp, dest)
    fsync_dir(os.path.dirname(os.path.abspath(dest)))


NAME_MAX = 255  # bytes of one file name (Linux, macOS)


def scratch_stem(name: str, room: int = 64) -> str:
    """``name`` (the base name of a copy's destination) as the stem of the name of the
    scratch directory staged beside it, leaving ``room`` bytes for what is added (a
    ``.restoring-<pid>-<random>`` suffix): a valid destination name of 230 to 255 bytes
    made a staging name past NAME_MAX, and the restore or backup failed with
    ENAMETOOLONG.  A long name keeps its start and gets a digest of the whole (the same
    for the same destination: a killed copy's scratch is still found and swept)."""
    raw = os.fsencode(name)
    if len(raw) + room <= NAME_MAX:
        return name
    import hashlib
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return os.fsdecode(raw[:NAME_MAX - room - len(digest) - 1]) + "~" + digest


def stage_inside(dest: str) -> bool:
    """Must a copy meant for ``dest`` (an existing empty directory) be made inside it and
    moved up (``move_up``), rather than beside it and renamed over it?  Yes when ``dest``
    is a mount point (a rename over it fails, EBUSY; beside it is another file system) or
    its parent cannot be written (nothing can be made beside it)."""
    parent = os.path.dirname(os.path.abspath(dest))
    return os.path.isdir(dest) and (os.path.ismount(dest) or not os.access(parent, os.W_OK))


def move_up(stage: str, dest: str, taken) -> None:
    """Move every entry of ``stage`` (a complete, synced copy made inside ``dest``) up into
    ``dest``, ``STORE`` last (until it is there ``dest`` is no store: a kill in between
    leaves one that open refuses), then remove the empty ``stage``, durably.  Under an
    exclusive lock of ``dest`` (flock): of two copies racing into it, the second finds
    the first's entries and raises ``taken()`` (what its rename over ``dest`` would
    have met), moving nothing.  One step for a Ctrl-C (signals held off: it lands after):
    one between two moves left ``dest`` holding part of the copy and no ``STORE`` — the
    command said it was interrupted, and the next copy refused ``dest`` as not empty
    (audit67 review)."""
    import fcntl
    from .signals import deferred
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stage_name = os.path.basename(stage)
        if [n for n in os.listdir(dest) if n != stage_name]:
            raise taken()
        names = sorted(os.listdir(stage), key=lambda n: n == "STORE")
        with deferred():
            for name in names:
                if name == "STORE":  # (everything else durable in ``dest`` before it)
                    fsync_dir(dest)
                rename(os.path.join(stage, name), os.path.join(dest, name))
            os.rmdir(stage)
            fsync_dir(dest)
    finally:
        os.close(fd)  # (the lock goes with it)
