"""The content store: file contents by sha256, under one directory of the store.

This module owns every byte of file content walstore keeps (before-images, after-images,
saved manifests).  Layout: ``<dir>/<2 hex>/<62 hex>`` (files 0600, directories 0700),
and ``<dir>/tmp/`` for puts in progress.  Rules:

- **Streamed**: content moves 1 MiB at a time through one buffer (``entries.iter_content``);
  a GiB file costs a GiB of I/O, never a GiB of memory.  Holes of sparse files are neither
  read nor written (the blob stays sparse).
- **Durable before it is named**: temp file -> write -> fsync -> rename to its hash ->
  fsync the directory.  A blob that exists under its name is complete.  ``batch()``
  groups many puts into one pass (all temps fsynced, then all named, each directory
  fsynced once): a first manifest of a large tree costs one sync pass, not two fsyncs a
  file.
- **Deduplicated**: content already stored writes nothing (not even a temp file) through
  ``put_file``/``put_fd``/``put_bytes``: a put hashes first and copies only new content
  (``put_chunks``, which can only hash a stream as it writes it, drops its unsynced temp
  file instead), then hashes the copy (it must be what was
  hashed; a file written to meanwhile is tried again).  A file of at most one chunk is
  read once and written from that buffer.
- **Reflinks** where the file system offers them: ``copy="auto"`` tries FICLONE (the blob
  shares the file's blocks, no data is written) and falls back cleanly, once and for all
  (EOPNOTSUPP, EXDEV, ...), to streaming; ``"copy_range"`` uses ``os.copy_file_range``
  (server-side copy on NFS/CIFS, reflink on some file systems); ``"stream"`` never asks
  the kernel to copy.
- **Verified on the way out**: ``get``/``copy_to`` hash what they stream and raise
  ``CorruptionError`` naming the blob when it does not match its name.
- **An fsync error is final**: every fsync of a blob, a temp or a directory goes through
  ``_sync``/``_sync_dir``; a failure fails this blob store for good (``failed``: every
  later put raises, naming it; reads go on).  After a failed fsync the kernel may have
  dropped the dirty pages and a later fsync reports success: no later put may then trust
  a blob, or a directory entry, it cannot know is durable (a put of content already
  stored writes nothing).
  Blobs named before the failure were durable when named, so undoing with them goes on
  (the store's log is not this store's: a transaction's rollback still logs and undoes
  its file changes and runs its compensations at once).
- **Garbage collection** (``gc``) removes every blob not in the given referenced set.  The
  caller must make sure no put whose reference is not yet recorded is running (the engine
  runs it under the lock it logs before-images with; this class serializes gc against its
  own puts).

All writes go through ``walstore.fileio`` (the fault seam); reads are plain ``os``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .. import fileio
from . import fsops
from ..errors import CorruptionError
from .entries import (CHUNK, FileBusyError, iter_content, open_nofollow, read_whole,
                      stamp as _stamp)

__all__ = ["BlobStore", "PutResult", "GcResult", "EMPTY_SHA256"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
COPY_MODES = ("auto", "clone", "copy_range", "stream")
_HEX = frozenset("0123456789abcdef")
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                  errno.EBADF, errno.EPERM)
PUT_RETRIES = 3


@dataclass
class PutResult:
    """``digest`` (sha256 hex) and ``size`` of what was stored; ``written``: bytes this put
    wrote (0 when the content was already there); ``method``: ``"dedup"``, ``"clone"``,
    ``"copy_range"`` or ``"stream"``."""

    digest: str
    size: int
    written: int
    method: str
    stat: os.stat_result | None = None  # put_fd: the file's fstat, unchanged while read


@dataclass
class GcResult:
    removed: int
    freed: int
    kept: int
    kept_bytes: int = 0


def check_digest(digest: str) -> str:
    if not (isinstance(digest, str) and len(digest) == 64 and _HEX.issuperset(digest)):
        raise ValueError(f"not a sha256 hex digest: {digest!r:.80}")
    return digest


class BlobStore:
    """Content by sha256 under ``directory`` (created 0700 if missing, unless
    ``readonly``: then only reads are made).  Once an fsync of it failed, every put
    raises (``failed``)."""

    def __init__(self, directory: str | bytes, copy: str = "auto",
                 readonly: bool = False) -> None:
        if copy not in COPY_MODES:
            raise ValueError(f"copy must be one of {COPY_MODES}, not {copy!r}")
        self.dir = os.path.abspath(os.fsdecode(directory))
        self.tmp = os.path.join(self.dir, "tmp")
        self.copy = copy
        self.failed: OSError | None = None  # an fsync failed: no put from then on
        self._clone_ok = copy in ("auto", "clone")
        self._lock = threading.Lock()
        self._known: set[str] = set()      # digests seen present by this process
        self._sizes: dict[str, int] = {}    # the last gc's kept blobs -> their sizes
        self._fanout: set[str] = set()     # fan-out directories known to exist
        self._vouched: set[str] = set()    # directories fsynced by this process (has())
        self.readonly = readonly
        self._active: set[str] = set()     # temp files being written now
        self._pending: dict[str, str] | None = None  # batch: digest -> complete temp file
        self._seq = itertools.count()
        # counters, for tests and benchmarks
        self.bytes_hashed = 0
        self.bytes_written = 0
        self.files_written = 0
        if not readonly:  # (a read-only store's reader creates nothing)
            fileio.make_dir(self.dir)
            fileio.make_dir(self.tmp)

    def __repr__(self) -> str:
        return f"BlobStore({self.dir!r})"

    # ---- names --------------------------------------------------------------------------
    def path(self, digest: str) -> str:
        check_digest(digest)
        return os.path.join(self.dir, digest[:2], digest[2:])

    def has(self, digest: str) -> bool:
        if digest in self._known or (self._pending is not None and digest in self._pending):
            return True
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if not self.readonly:
            self._vouch_for(digest)
        self._known.add(digest)
        return True

    def _vouch_for(self, digest: str) -> None:
        """A blob this process did not name (an earlier one did) is trusted — a put of its
        content writes nothing — only once its directory entries are durable: a writer
        killed between naming a blob and fsyncing its directory left an entry a power loss
        could still drop (probe-review40).  Its fan-out directory (and the store's, once)
        is fsynced the first time this process trusts a blob in it."""
        sub = os.path.join(self.dir, digest[:2])
        if sub in self._vouched:
            return
        with self._lock:
            if not self._vouched:
                self._sync_dir(self.dir)
                self._vouched.add(self.dir)
            if sub not in self._vouched:
                self._sync_dir(sub)
                self._vouched.add(sub)

    def size(self, digest: str) -> int:
        return os.stat(self.path(digest)).st_size

    def __iter__(self) -> Iterator[str]:
        """Every stored digest (a directory walk)."""
        for digest, _path in self._stored():
            yield digest

    def _stored(self) -> Iterator[tuple[str, str]]:
        """(digest, path) of every stored blob, in digest order (a directory walk)."""
        for sub in sorted(os.listdir(self.dir)):
            if len(sub) != 2 or not _HEX.issuperset(sub):
                continue
            subdir = os.path.join(self.dir, sub) + os.sep
            for name in sorted(os.listdir(subdir)):
                if len(name) == 62 and _HEX.issuperset(name):
                    yield sub + name, subdir + name

    def disk_usage(self) -> int:
        """Bytes the blobs occupy on disk (allocated blocks: a sparse blob's holes cost
        nothing; extents shared with a reflinked source are counted in full)."""
        total = 0
        for d in self:
            total += os.stat(self.path(d)).st_blocks * 512
        return total

    # ---- put ----------------------------------------------------------------------------
    def _check_usable(self) -> None:
        """OSError naming the failed fsync, once one failed (see the module docstring)."""
        e = self.failed
        if e is not None:
            raise OSError(e.errno, f"an earlier fsync of the store's file content failed "
                                   f"({e.strerror or e}): no file content can be stored "
                                   f"until the store is reopened", e.filename or self.dir)

    def put_bytes(self, data: bytes | bytearray | memoryview) -> PutResult:
        """Store ``data`` (already in memory)."""
        self._check_usable()
        digest = hashlib.sha256(data).hexdigest()
        self.bytes_hashed += len(data)
        if self.has(digest):
            return PutResult(digest, len(data), 0, "dedup")
        return self._write_new(lambda fd: self._write_buffer(fd, data), digest)

    def put_chunks(self, chunks: Iterable[bytes]) -> PutResult:
        """Store a stream of byte chunks (written as they come, hashed on the way; a
        duplicate's temp file is dropped unsynced)."""
        self._check_usable()
        h = hashlib.sha256()
        size = 0
        with self._writing() as (tmp, fd):
            for chunk in chunks:
                h.update(chunk)
                fileio.pwrite_all(fd, chunk, size)
                size += len(chunk)
            digest = h.hexdigest()
            self.bytes_hashed += size
            duplicate = self.has(digest)
            if not duplicate:
                self._durable(fd)
        if duplicate:
            self._drop(tmp)
            return PutResult(digest, size, 0, "dedup")
        self._name(tmp, digest, size)
        return PutResult(digest, size, size, "stream")

    def put_file(self, path: str | bytes) -> PutResult:
        """Store the content of the regular file ``path`` (never following a symlink:
        ELOOP).  Retries when the file changes while it is read; FileBusyError after
        that."""
        bpath = os.fsencode(path)
        src = open_nofollow(bpath)
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise ValueError(f"{os.fsdecode(bpath)!r} is not a regular file")
            return self.put_fd(src, os.fsdecode(bpath))
        finally:
            os.close(src)

    def put_fd(self, src: int, name: str = "<fd>") -> PutResult:
        """Store the content of an open regular file (see ``put_file``)."""
        self._check_usable()
        for _attempt in range(PUT_RETRIES):
            got = self._put_once(src)
            if got is not None:
                return got
        raise FileBusyError(errno.EBUSY, f"{name!r} kept changing while walstore stored "
                            f"it ({PUT_RETRIES} tries)", name)

    def _put_once(self, src: int) -> PutResult | None:
        """Hash first (known content: nothing written, no temp file), then copy new
        content (clone, copy_range or stream) and hash the copy: it must be what was
        hashed.  A file of one chunk is written from the buffer it was hashed from.
        None: the file changed meanwhile (try again)."""
        st0 = os.fstat(src)
        buf = bytearray(CHUNK)
        h = hashlib.sha256()
        size = 0
        single: memoryview | None = None
        for off, chunk, hole in iter_content(src, buf):
            h.update(chunk)
            size += len(chunk)
            single = chunk if off == 0 and not hole else None
        self.bytes_hashed += size
        digest = h.hexdigest()
        if _stamp(os.fstat(src)) != _stamp(st0) or size != st0.st_size:
            return None
        if self.has(digest):
            return PutResult(digest, size, 0, "dedup", st0)
        if single is not None and size == len(single):
            data = single
            got = self._write_new(lambda fd: self._write_buffer(fd, data), digest)
            got.stat = st0
            return got
        with self._writing() as (tmp, fd):
            method, copied = self._copy_new(src, fd, buf, st0.st_size)
            got, n = copied if copied is not None else self._hash(fd)
            same = got == digest and _stamp(os.fstat(src)) == _stamp(st0)
            if same:
                self._durable(fd)
        if not same:
            self._drop(tmp)
            return None
        self._name(tmp, digest, n)
        return PutResult(digest, n, n, method, st0)

    def _copy_new(self, src: int, fd: int, buf: bytearray, size: int
                  ) -> tuple[str, tuple[str, int] | None]:
        """Copy ``src`` into the empty temp ``fd``: (method, (sha256, size) of the copy
        when the method hashed it on the way, else None)."""
        if self._clone_ok:
            try:
                fileio.clone(src, fd)
                return "clone", None
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                self._clone_ok = False
                if self.copy == "clone":
                    raise OSError(e.errno, f"the file system of {self.dir!r} cannot clone "
                                           f"(FICLONE): {e.strerror}") from e
        if self.copy == "copy_range":
            off = 0
            while off < size:
                n = fileio.copy_range(src, fd, min(size - off, 1 << 30), off, off)
                if n == 0:
                    break
                off += n
            return "copy_range", None
        return "stream", self._copy_stream(src, fd, buf)

    def _copy_stream(self, src: int, fd: int, buf: bytearray) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        tail_hole = False
        for off, chunk, hole in iter_content(src, buf):
            h.update(chunk)
            n = len(chunk)
            if not hole:
                fileio.pwrite_all(fd, chunk, off)
            tail_hole = hole
            size = off + n
        if tail_hole:
            fileio.pwrite_all(fd, b"\0", size - 1)  # the size, without filling the hole
        self.bytes_hashed += size
        return h.hexdigest(), size

    def _hash(self, fd: int) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        for _off, chunk, _hole in iter_content(fd):
            h.update(chunk)
            size += len(chunk)
        self.bytes_hashed += size
        return h.hexdigest(), size

    def _write_buffer(self, fd: int, data) -> int:
        if len(data):
            fileio.pwrite_all(fd, data, 0)
        return len(data)

    def _write_new(self, write, digest: str) -> PutResult:
        with self._writing() as (tmp, fd):
            n = write(fd)
            self._durable(fd)
        self._name(tmp, digest, n)
        return PutResult(digest, n, n, "stream")

    def _temp(self) -> tuple[str, int]:
        name = os.path.join(self.tmp, f"{os.getpid()}-{next(self._seq)}-{os.urandom(4).hex()}")
        fd = fileio.open_file(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        self._active.add(name)
        return name, fd

    @contextlib.contextmanager
    def _writing(self) -> Iterator[tuple[str, int]]:
        """A new temp file (path, fd); the fd is closed on the way out, and on an
        exception the file is removed too."""
        tmp, fd = self._temp()
        try:
            yield tmp, fd
        except BaseException as e:
            os.close(fd)
            self._drop(tmp)
            if isinstance(e, OSError) and e.filename is None and e.errno is not None:
                # (a write to the temp file: a pwrite's error names no file, and a full
                # disk under a file change said only "[Errno 28] No space left on device")
                raise OSError(e.errno, f"storing file content in the store's content "
                                       f"store failed: {e.strerror or e}", tmp) from e
            raise
        os.close(fd)

    def _drop(self, tmp: str) -> None:
        self._active.discard(tmp)
        try:
            fileio.unlink(tmp)
        except FileNotFoundError:
            pass

    def _durable(self, fd: int) -> None:
        if self._pending is None:  # in a batch, the flush fsyncs every temp at once
            self._sync(fd)

    def _sync(self, fd: int) -> None:
        self._synced(fileio.fsync, fd)

    def _sync_dir(self, path: str) -> None:
        self._synced(fileio.fsync_dir, path)

    def _synced(self, sync: Callable, target: int | str) -> None:
        """``sync(target)``; a failure fails the store (``failed``) before it is raised."""
        try:
            sync(target)
        except OSError as e:
            if self.failed is None:
                self.failed = e
            raise

    def _name(self, tmp: str, digest: str, size: int) -> None:
        """A complete temp file becomes the blob ``digest`` (in a batch: at the flush)."""
        if self._pending is not None:
            if digest in self._pending:
                self._drop(tmp)  # the same content twice in one batch
                return
            self._pending[digest] = tmp
        else:
            with self._lock:
                try:
                    sub = self._rename_in(tmp, digest)
                except BaseException:
                    self._drop(tmp)
                    raise
                self._sync_dir(sub)
        self.bytes_written += size
        self.files_written += 1

    def _rename_in(self, tmp: str, digest: str) -> str:
        """Rename ``tmp`` to its name (creating the fan-out directory); call with the lock
        held.  Returns the directory to fsync."""
        sub = os.path.join(self.dir, digest[:2])
        if sub not in self._fanout:
            if not os.path.isdir(sub):
                fsops.make_dirs(sub)
                self._sync_dir(self.dir)
            self._fanout.add(sub)
        fileio.rename(tmp, os.path.join(sub, digest[2:]))
        self._active.discard(tmp)
        self._known.add(digest)
        return sub

    @contextlib.contextmanager
    def batch(self) -> Iterator["BlobStore"]:
        """Many puts, one sync pass: inside, new blobs stay temp files without an fsync
        each; at the end every temp is fsynced, then all are named, then each directory
        is fsynced once (a blob still only exists under its name once complete and
        durable).  Meanwhile ``has`` knows them, ``get`` does not.  On an exception the
        temps are dropped.  Nested batches join the outer one."""
        if self._pending is not None:
            yield self
            return
        self._pending = {}
        try:
            yield self
        except BaseException:
            pending, self._pending = self._pending, None
            for tmp in pending.values():
                self._drop(tmp)
            raise
        pending, self._pending = self._pending, None
        try:
            for tmp in pending.values():
                fd = fileio.open_file(tmp, os.O_RDONLY)  # (the seam knows the fd's file)
                try:
                    self._sync(fd)
                finally:
                    os.close(fd)
            subs = set()
            with self._lock:
                try:
                    for digest, tmp in pending.items():
                        subs.add(self._rename_in(tmp, digest))
                finally:
                    # (also when a rename or a new fan-out directory failed half-way: the
                    # blobs named so far are known, and a later put of their content
                    # trusts them; their directories were never fsynced: probe-review40)
                    for sub in sorted(subs):
                        self._sync_dir(sub)
        except BaseException:
            for tmp in pending.values():
                if tmp in self._active:
                    self._drop(tmp)
            raise

    def clock_tick(self) -> tuple[int, int]:
        """(device, mtime_ns) of a marker file created now in the temp directory: the
        file system's own clock, at its own granularity (what a manifest's racy check
        compares mtimes with).  The marker is removed at once; nothing is synced."""
        tmp, fd = self._temp()
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
            self._drop(tmp)
        return st.st_dev, st.st_mtime_ns

    # ---- get ----------------------------------------------------------------------------
    def get(self, digest: str) -> Iterator[bytes]:
        """The content of ``digest`` in chunks of at most 1 MiB (each a new bytes object);
        CorruptionError (after the last chunk) when it does not hash to ``digest``;
        FileNotFoundError when it is not stored."""
        path = self.path(digest)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            h = hashlib.sha256()
            for _off, chunk, _hole in iter_content(fd):
                h.update(chunk)
                yield bytes(chunk)
            if h.hexdigest() != digest:
                raise CorruptionError("blob content does not match its sha256 "
                                      "(stored content damaged)", file=path)
        finally:
            os.close(fd)

    def read_bytes(self, digest: str, limit: int = 64 << 20) -> bytes:
        """The whole content (for small files): ValueError above ``limit`` bytes."""
        n = self.size(digest)
        if n > limit:
            raise ValueError(f"blob {digest[:12]} is {n} bytes, more than {limit}: stream "
                             f"it with get()")
        path = self.path(digest)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = read_whole(fd)  # (one copy in memory: chunks joined held two)
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptionError("blob content does not match its sha256 (stored content "
                                  "damaged)", file=path)
        return data

    def copy_to(self, digest: str, dst_fd: int) -> int:
        """Write the content of ``digest`` into the empty file ``dst_fd`` (through
        ``fileio``; holes stay holes), verified: CorruptionError names the blob if it does
        not hash to ``digest`` (the caller must then discard ``dst_fd``).  Returns the
        size.  Does not fsync."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptionError(f"blob sha256:{digest} is missing from the content store",
                                  file=path) from None
        try:
            got, size = self._copy_stream(fd, dst_fd, bytearray(CHUNK))
        finally:
            os.close(fd)
        if got != digest:
            raise CorruptionError("blob content does not match its sha256 (stored content "
                                  "damaged)", file=path)
        return size

    def verify(self, digest: str) -> bool:
        """Does the stored blob hash to its name?"""
        fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._hash(fd)[0] == digest
        finally:
            os.close(fd)

    # ---- upkeep -------------------------------------------------------------------------
    def gc(self, referenced: Iterable[str]) -> GcResult:
        """Remove every blob whose digest is not in ``referenced`` (see the module
        docstring for what the caller must guarantee)."""
        keep = set(referenced)
        removed = freed = kept = kept_bytes = 0
        if self.failed is not None:  # (its removals would need fsyncs of directories one
            # of which failed already: never retried in this process — sweep-files)
            return GcResult(0, 0, 0, 0)
        touched: set[str] = set()
        known, sizes = self._sizes, {}  # (a blob's content never changes, nor its size:
        with self._lock:                # a kept blob is stat-ed by the first gc only)
            for digest, path in list(self._stored()):
                if digest in keep:
                    kept += 1
                    size = known.get(digest)
                    if size is None:
                        try:
                            size = os.stat(path).st_size
                        except FileNotFoundError:
                            continue
                    sizes[digest] = size
                    kept_bytes += size
                    continue
                try:
                    size = os.stat(path).st_size
                    fileio.unlink(path)
                except FileNotFoundError:
                    continue
                self._known.discard(digest)
                touched.add(os.path.dirname(path))
                removed += 1
                freed += size
            self._sizes = sizes  # (bounded: the blobs kept now)
            for sub in sorted(touched):
                self._sync_dir(sub)
        return GcResult(removed, freed, kept, kept_bytes)

    def remove_temps(self) -> list[str]:
        """Remove leftovers of puts that did not finish (a crash); returns their paths.
        Temp files this process is writing right now are kept."""
        gone = []
        for name in os.listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            if path in self._active:
                continue
            try:
                fileio.unlink(path)
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                continue
            gone.append(path)
        return gone

