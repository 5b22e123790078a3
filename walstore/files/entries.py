"""What a path IS: an ``Entry`` (absent | file | dir | symlink), and how it is read.

This module owns the description of one path's state, as before- and after-images carry
it, and the one streaming reader of file content (``iter_content`` / ``hash_fd``) the
whole package uses:

- ``Entry``: ``kind``; ``mode`` (permission bits, ``S_IMODE``); for a file ``size`` and
  ``sha256`` (hex); for a symlink ``target`` (bytes, never followed); ``uid``/``gid``
  (restored only when running as root).  ``same`` compares what a restore must put back
  (kind, mode, content, target; not ownership).  ``to_row``/``from_row``: a compact
  msgpack-able list, validated on the way back in (rows come from disk).
- ``read_entry``: ``lstat``, ``readlink``, ``O_NOFOLLOW``: a symlink is described, never
  followed; a file's content is hashed in 1 MiB chunks (holes of sparse files are hashed
  as zeros without reading them); a file that keeps changing while it is read raises
  ``FileBusyError`` rather than describe content that never existed.
- Special files (FIFOs, sockets, devices) are not supported: ``UnsupportedFileType``.

mtimes are deliberately not part of an Entry: a restored file gets a new mtime (as git's
checkout does), so a build tool never trusts an output older than a restored input.
"""
from __future__ import annotations

import errno
import io
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UnsupportedFileType  # (defined there: a public walstore error)

__all__ = ["Entry", "ABSENT", "FILE", "DIR", "SYMLINK", "CHUNK", "read_entry",
           "entry_from_stat", "iter_content", "hash_fd", "stamp", "FileBusyError",
           "UnsupportedFileType", "open_nofollow"]

ABSENT, FILE, DIR, SYMLINK = "absent", "file", "dir", "symlink"
_CODE = {ABSENT: "a", FILE: "f", DIR: "d", SYMLINK: "l"}
_KIND = {v: k for k, v in _CODE.items()}

CHUNK = 1 << 20          # every content stream moves 1 MiB at a time
ZEROS = bytes(CHUNK)     # what a hole reads as
READ_RETRIES = 3
MAX_TARGET = 4096        # PATH_MAX: a symlink target in a row is bounded


class FileBusyError(OSError):
    """A file kept changing while walstore read it (a writer is active on it)."""


@dataclass(frozen=True)
class Entry:
    """One path's state (see the module docstring)."""

    kind: str
    mode: int = 0
    size: int = 0
    sha256: str | None = None
    target: bytes | None = None
    uid: int | None = None
    gid: int | None = None

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def absent(cls) -> "Entry":
        return cls(ABSENT)

    @classmethod
    def file(cls, mode: int, size: int, sha256: str, uid: int | None = None,
             gid: int | None = None) -> "Entry":
        return cls(FILE, stat.S_IMODE(mode), size, sha256, None, uid, gid)

    @classmethod
    def dir(cls, mode: int, uid: int | None = None, gid: int | None = None) -> "Entry":
        return cls(DIR, stat.S_IMODE(mode), 0, None, None, uid, gid)

    @classmethod
    def symlink(cls, target: bytes | str, uid: int | None = None,
                gid: int | None = None) -> "Entry":
        return cls(SYMLINK, 0, 0, None, os.fsencode(target), uid, gid)

    # ---- predicates -----------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return self.kind != ABSENT

    @property
    def is_file(self) -> bool:
        return self.kind == FILE

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def is_symlink(self) -> bool:
        return self.kind == SYMLINK

    def same(self, other: "Entry | None") -> bool:
        """Same state for a restore: kind, mode, content and target (not ownership)."""
        if other is None or other.kind != self.kind:
            return False
        if self.kind == FILE:
            return (self.mode, self.size, self.sha256) == (other.mode, other.size,
                                                           other.sha256)
        if self.kind == DIR:
            return self.mode == other.mode
        if self.kind == SYMLINK:
            return self.target == other.target
        return True

    def describe(self) -> str:
        if self.kind == FILE:
            return f"file {oct(self.mode)} {self.size} B sha256:{(self.sha256 or '')[:12]}"
        if self.kind == DIR:
            return f"dir {oct(self.mode)}"
        if self.kind == SYMLINK:
            return f"symlink -> {os.fsdecode(self.target or b'')!r}"
        return "absent"

    # ---- rows -----------------------------------------------------------------------
    def to_row(self) -> list:
        """A msgpack-able list: ``["a"]``, ``["f", mode, size, sha256, uid, gid]``,
        ``["d", mode, uid, gid]``, ``["l", target, uid, gid]``."""
        code = _CODE[self.kind]
        if self.kind == FILE:
            return [code, self.mode, self.size, self.sha256, self.uid, self.gid]
        if self.kind == DIR:
            return [code, self.mode, self.uid, self.gid]
        if self.kind == SYMLINK:
            return [code, self.target, self.uid, self.gid]
        return [code]

    @classmethod
    def from_row(cls, row: list) -> "Entry":
        """The inverse of ``to_row``; ValueError for a malformed row."""
        try:
            kind = _KIND[row[0]]
            if kind == ABSENT:
                if len(row) != 1:
                    raise ValueError
                return cls(ABSENT)
            if kind == FILE:
                _c, mode, size, digest, uid, gid = row
                if not (isinstance(size, int) and size >= 0 and _is_hex(digest)):
                    raise ValueError
                e = cls(FILE, _mode(mode), size, digest, None, _id(uid), _id(gid))
            elif kind == DIR:
                _c, mode, uid, gid = row
                e = cls(DIR, _mode(mode), 0, None, None, _id(uid), _id(gid))
            else:
                _c, target, uid, gid = row
                if not (isinstance(target, bytes) and 0 < len(target) <= MAX_TARGET
                        and b"\0" not in target):
                    raise ValueError
                e = cls(SYMLINK, 0, 0, None, target, _id(uid), _id(gid))
            return e
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"not an entry row: {row!r:.200}") from None


def _is_hex(d: object) -> bool:
    return isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)


def _mode(m: object) -> int:
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= 0o7777:
        raise ValueError
    return m


def _id(v: object) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError
    return v


# ---- reading content --------------------------------------------------------------------
def read_whole(fd: int) -> bytes:
    """The rest of an open file (from its position) as ONE bytes object, read into it
    directly (``FileIO.readall`` sizes it from ``fstat``): peak memory the content once,
    where collecting 1 MiB chunks and joining them held it twice (a 256 MiB read cost
    512 MiB).  The caller keeps ``fd``."""
    with io.FileIO(fd, "rb", closefd=False) as f:
        return f.readall()


def iter_content(fd: int, buf: bytearray | None = None
                 ) -> Iterator[tuple[int, memoryview, bool]]:
    """(offset, bytes, is_hole) of an open file from offset 0 to its end, at most 1 MiB
    at a time, reading into ONE buffer (each view is valid until the next step).  Holes
    (``SEEK_DATA``) are yielded as zeros without being read."""
    if buf is None:
        buf = bytearray(CHUNK)
    view = memoryview(buf)
    zeros = memoryview(ZEROS)
    off = 0
    sparse = hasattr(os, "SEEK_DATA")
    while True:
        if sparse:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole (or nothing) from here on
                    data = max(off, os.fstat(fd).st_size)
                else:
                    sparse, data = False, off
            while off < data:
                n = min(CHUNK, data - off)
                yield off, zeros[:n], True
                off += n
        n = os.preadv(fd, [view], off)
        if n == 0:
            return
        yield off, view[:n], False
        off += n


def hash_fd(fd: int, buf: bytearray | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of an open file's content, streamed."""
    h = hashlib.sha256()
    size = 0
    for _off, chunk, _hole in iter_content(fd, buf):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def stamp(st: os.stat_result) -> tuple:
    """What changes when a file's content may have changed (identity, size, times)."""
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_nofollow(path: bytes) -> int:
    """Open a regular file for reading without following a final symlink (ELOOP /
    a non-regular file: UnsupportedFileType or ValueError)."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def entry_from_stat(st: os.stat_result, target: bytes | None = None,
                    sha256: str | None = None, path: bytes | None = None) -> Entry:
    """An Entry from an lstat result (no I/O); a file's hash must be supplied."""
    m = st.st_mode
    uid, gid = st.st_uid, st.st_gid
    if stat.S_ISREG(m):
        return Entry(FILE, stat.S_IMODE(m), st.st_size, sha256, None, uid, gid)
    if stat.S_ISDIR(m):
        return Entry(DIR, stat.S_IMODE(m), 0, None, None, uid, gid)
    if stat.S_ISLNK(m):
        return Entry(SYMLINK, 0, 0, None, target, uid, gid)
    where = f" {os.fsdecode(path)!r}" if path else ""
    raise UnsupportedFileType(f"{where.strip() or 'path'} is a special file (FIFO, socket or "
                              f"device); walstore tracks files, directories and symlinks")


def read_entry(path: bytes, hash: bool = True) -> Entry:
    """The Entry of the absolute ``path`` (never following a symlink).  ``hash=False``
    leaves a file's ``sha256`` None."""
    for _attempt in range(READ_RETRIES + 1):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Entry.absent()
        m = st.st_mode
        if stat.S_ISLNK(m):
            try:
                target = os.readlink(path)
            except (FileNotFoundError, OSError) as e:
                if getattr(e, "errno", None) in (errno.ENOENT, errno.EINVAL):
                    continue  # replaced between lstat and readlink: look again
                raise
            return entry_from_stat(st, target=target)
        if not stat.S_ISREG(m) or not hash:
            return entry_from_stat(st, path=path)
        try:
            fd = open_nofollow(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                continue  # became a symlink: look again
            raise
        try:
            before = os.fstat(fd)
            if stamp(before)[:2] != stamp(st)[:2]:
                continue  # another file took its place
            digest, size = hash_fd(fd)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if stamp(before) == stamp(after) and size == after.st_size:
            return entry_from_stat(after, sha256=digest)
    raise FileBusyError(errno.EBUSY, f"{os.fsdecode(path)!r} kept changing while walstore "
                        f"read it ({READ_RETRIES + 1} tries)", os.fsdecode(path))
