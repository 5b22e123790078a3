"""Manifests of a workspace, and what changed between two of them (``watch()``).

This module owns change detection for changes walstore did not make itself (a build, a
test run, any subprocess):

- ``snapshot(ws, blobs, previous)`` walks the workspace with ``lstat`` (never following a
  symlink, never descending into an ignored directory, skipping walstore's temp names)
  and returns a ``Manifest``: per path its type, mode, size, mtime_ns, ctime_ns, inode,
  device, owner, symlink target, and a file's sha256.  With a ``BlobStore`` the content of
  every tracked file is IN the store, durable, when ``snapshot`` returns (one
  ``BlobStore.batch``): a manifest taken before a watched block holds the before-image of
  everything the block may change.
- Incremental: a file whose (inode, device, size, mtime_ns, ctime_ns) equal the previous
  manifest's, and whose content is still stored, keeps its hash without being read.  What
  is read grows with what changed, not with the tree (``Manifest.stats`` counts it).
  Exception, the "racy git" problem: a file whose mtime falls in the snapshot's own
  clock tick could change again within that tick without its metadata changing; such
  files are re-hashed by the next snapshot.  The tick is read as git reads it (the mtime
  of a file written as the snapshot begins: a marker in the blob store's temp directory
  when it is on the same file system, so the file system's own clock and granularity);
  otherwise, conservatively, the wall clock less ``RACY_WINDOW_NS`` (2 s).
- Monitored (``monitor=``, a ``monitor.WorkspaceMonitor`` on Linux inotify): when
  ``previous`` is the manifest the monitor made last, only the paths its events name,
  new or replaced directories (walked whole, by the same walk), files with several links
  and racy files are examined; every other record is ``previous``'s.  Otherwise (or when
  the monitor lost events) the walk is full and arms the monitor: each directory watched
  before it is listed, each path's inode before it is ``lstat``ed.  The result equals a
  full walk's (``tests/test_files_monitor.py``).
- ``diff(old, new)``: created, deleted, modified (content), mode, symlink (target), type
  (e.g. a file replaced by a directory) changes; a rename is a delete plus a create; the
  root's own mode (``Manifest.top``) as a mode change of path ``b""``.  Each
  ``Change`` carries the before- and after-``Entry``.
- ``undo_order`` / ``restore_changes``: put a change set back, removals deepest first,
  then re-creations shallowest first (children before parents when removing, parents
  before children when creating); a directory's mode that opens it first, one that
  closes it last.
- ``Manifest.save`` / ``Manifest.load``: a manifest as one msgpack blob, streamed.

A file that keeps changing while it is stored raises ``FileBusyError`` (ignore it, e.g. a
log file); one that cannot be read raises the OS error naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import msgpack

from .apply import FileConflict, save_aside, overrides_modes, restore
from .blobs import BlobStore
from .entries import ABSENT, DIR, FILE, SYMLINK, Entry, hash_fd
from .ignore import IgnoreRules
from .monitor import WorkspaceMonitor, mounts_at_or_under
from .paths import Workspace, depth, display, is_temp_name, parent_of

__all__ = ["Record", "Manifest", "SnapshotStats", "Change", "snapshot", "diff", "walk",
           "undo_order", "restore_changes", "restore_in_order", "passages", "RACY_WINDOW_NS"]

# A file modified this close to (or after) a snapshot's start is re-hashed next time:
# covers timestamp granularities up to 2 s (FAT) and the coarse kernel clock.
RACY_WINDOW_NS = 2_000_000_000
# directory fds an incremental snapshot keeps open at once (the oldest closed first; the
# full walk holds one per level of the tree)
MAX_OPEN_DIRS = 64
MANIFEST_VERSION = 1
_CODES = {FILE: "f", DIR: "d", SYMLINK: "l"}
_KINDS = {v: k for k, v in _CODES.items()}


@dataclass(slots=True)
class Record:
    """One path of a manifest (an lstat plus what is needed to restore it)."""

    kind: str
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    uid: int
    gid: int
    sha256: str | None = None
    target: bytes | None = None

    def entry(self) -> Entry:
        if self.kind == FILE:
            return Entry(FILE, self.mode, self.size, self.sha256, None, self.uid, self.gid)
        if self.kind == DIR:
            return Entry(DIR, self.mode, 0, None, None, self.uid, self.gid)
        return Entry(SYMLINK, 0, 0, None, self.target, self.uid, self.gid)

    def same_stat(self, st: os.stat_result) -> bool:
        return (self.ino, self.dev, self.size, self.mtime_ns, self.ctime_ns) == (
            st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def row(self, rel: bytes) -> list:
        return [rel, _CODES[self.kind], self.mode, self.size, self.mtime_ns, self.ctime_ns,
                self.ino, self.dev, self.uid, self.gid, self.sha256, self.target]

    @classmethod
    def from_row(cls, row: list) -> tuple[bytes, "Record"]:
        rel, code, *rest = row
        if not isinstance(rel, bytes) or code not in _KINDS:
            raise ValueError(f"not a manifest row: {row!r:.200}")
        return rel, cls(_KINDS[code], *rest)


def _record(st: os.stat_result, sha256: str | None = None,
            target: bytes | None = None) -> Record:
    m = st.st_mode
    kind = FILE if stat.S_ISREG(m) else DIR if stat.S_ISDIR(m) else SYMLINK
    return Record(kind, 0 if kind == SYMLINK else stat.S_IMODE(m),
                  st.st_size if kind == FILE else 0, st.st_mtime_ns, st.st_ctime_ns,
                  st.st_ino, st.st_dev, st.st_uid, st.st_gid, sha256, target)


@dataclass
class SnapshotStats:
    """What a snapshot cost: paths walked (lstat), files whose content was read and their
    bytes, files and bytes newly written to the blob store, files whose hash was reused,
    files left racy (re-hashed next time), special files skipped (those examined: an
    incremental snapshot lists only those it looked at), seconds; ``mode`` and
    ``full_walk_reason`` (see ``snapshot``'s ``monitor``)."""

    walked: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    stored_files: int = 0
    stored_bytes: int = 0
    reused: int = 0
    racy: int = 0
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    # "walk" (no monitor), "full" (a full walk that armed the monitor), "incremental"
    # (only what the monitor's events named, plus linked and racy files); why not
    # incremental when a monitor was given
    mode: str = "walk"
    full_walk_reason: str | None = None


class Manifest:
    """A workspace's state at one time: ``records`` (rel -> Record), ``taken_ns`` (wall
    clock when the walk began), ``racy_ns`` (files with an mtime at or after it are
    re-hashed by the next snapshot), ``stats`` (of the snapshot that made it)."""

    def __init__(self, root: bytes, records: dict[bytes, Record], taken_ns: int,
                 racy_ns: int, stats: SnapshotStats | None = None,
                 tick_dev: int | None = None, racy_other_ns: int | None = None,
                 ignore: list[bytes] | None = None, top: Record | None = None) -> None:
        self.root = root
        # the root directory itself (None: not known, a manifest saved before it was
        # kept), for its mode only: a watched ``chmod -R go-rwx .`` changed it, and the
        # rollback put back every path but the root (``diff`` reports it as path b"")
        self.top = top
        # the ignore patterns it was taken with (None: not known, a manifest saved before
        # they were kept): a watch compares its end with its start through these, not
        # through the registration's patterns of the moment
        self.ignore = ignore
        self.records = records
        self.taken_ns = taken_ns
        self.racy_ns = racy_ns
        self.tick_dev = tick_dev
        self.racy_other_ns = racy_ns if racy_other_ns is None else racy_other_ns
        self.stats = stats or SnapshotStats()
        # rel -> (Record, its packed manifest row), from the last save of this manifest or
        # of the one it was built from (``snapshot(previous=...)``): a record is never
        # changed once made, so the same Record object packs the same; ``save`` packs only
        # the others (a 20,000-path manifest: 30 ms -> 15 ms a save)
        self.packed_rows: dict[bytes, tuple[Record, bytes]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, rel: object) -> bool:
        return rel in self.records

    def __repr__(self) -> str:
        return f"<Manifest {os.fsdecode(self.root)!r} {len(self.records)} paths>"

    def entry(self, rel: bytes) -> Entry:
        r = self.records.get(rel)
        return Entry.absent() if r is None else r.entry()

    def digests(self) -> set[str]:
        """Every content hash the manifest refers to (what a gc must keep)."""
        return {r.sha256 for r in self.records.values() if r.sha256 is not None}

    def is_racy(self, r: Record) -> bool:
        """Could ``r``'s file have changed after the snapshot without its metadata
        changing?  Its mtime is at or after the snapshot's own clock tick: the mtime of
        a marker file created on the same file system as the snapshot began
        (``racy_ns``, for files on device ``tick_dev``), else the wall clock less
        ``RACY_WINDOW_NS`` (``racy_other_ns``)."""
        if r.kind != FILE:
            return False
        return r.mtime_ns >= (self.racy_ns if r.dev == self.tick_dev else
                              self.racy_other_ns)

    # ---- persistence ------------------------------------------------------------------
    def save(self, blobs: BlobStore) -> str:
        """Store the manifest as one msgpack blob (streamed); returns its digest."""
        def chunks() -> Iterator[bytes]:
            packer = msgpack.Packer(use_bin_type=True)
            yield packer.pack({"v": MANIFEST_VERSION, "root": self.root,
                               "taken_ns": self.taken_ns, "racy_ns": self.racy_ns,
                               "tick_dev": self.tick_dev,
                               "racy_other_ns": self.racy_other_ns,
                               "ignore": self.ignore,
                               "top": None if self.top is None else self.top.row(b""),
                               "n": len(self.records)})
            buf: list[bytes] = []
            size = 0
            records, known, packed = self.records, self.packed_rows, {}
            for rel in sorted(records):
                r = records[rel]
                got = known.get(rel)
                if got is None or got[0] is not r:
                    got = (r, packer.pack(r.row(rel)))
                packed[rel] = got
                b = got[1]
                buf.append(b)
                size += len(b)
                if size >= 1 << 20:
                    yield b"".join(buf)
                    buf, size = [], 0
            if buf:
                yield b"".join(buf)
            self.packed_rows = packed  # (bounded: this manifest's paths)
        return blobs.put_chunks(chunks()).digest

    @classmethod
    def load(cls, blobs: BlobStore, digest: str) -> "Manifest":
        chunks = blobs.get(digest)
        try:
            return cls._load(chunks, digest)
        except (ValueError, TypeError, KeyError):
            # (parsed as it streams in, the blob's sha256 checked after its last chunk: a
            # damaged manifest blob failed its parse first, "blob … is not a manifest" —
            # read to its end, its damage is a CorruptionError naming the file)
            for _chunk in chunks:
                pass
            raise

    @classmethod
    def _load(cls, chunks: Iterator[bytes], digest: str) -> "Manifest":
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=16 << 20)
        header = None
        records: dict[bytes, Record] = {}
        for chunk in chunks:
            unpacker.feed(chunk)
            for obj in unpacker:
                if header is None:
                    if not isinstance(obj, dict) or obj.get("v") != MANIFEST_VERSION:
                        raise ValueError(f"blob {digest[:12]} is not a manifest")
                    header = obj
                    continue
                rel, rec = Record.from_row(obj)
                records[rel] = rec
        if header is None or header.get("n") != len(records):
            raise ValueError(f"manifest blob {digest[:12]} is incomplete")
        ignore, top = header.get("ignore"), header.get("top")
        return cls(header["root"], records, header["taken_ns"], header["racy_ns"],
                   tick_dev=header.get("tick_dev"), racy_other_ns=header.get("racy_other_ns"),
                   ignore=None if ignore is None else [bytes(x) for x in ignore],
                   top=None if top is None else Record.from_row(top)[1])

    def workspace(self, ws: Workspace) -> Workspace:
        """``ws`` seen through the ignore patterns this manifest was taken with (a
        snapshot to compare with it must leave out exactly what it left out)."""
        return ws if self.ignore is None else ws.with_ignore(IgnoreRules(self.ignore))


# ---- walking ----------------------------------------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def walk(ws: Workspace, start: bytes = b"", use_ignore: bool = True
         ) -> Iterator[tuple[bytes, os.stat_result]]:
    """(rel, lstat) of every path under ``start`` (excluded; b"": the root), parents
    before children, names in byte order; never follows a symlink, never descends into an
    ignored directory (``use_ignore``), skips walstore's temp names.  Paths that vanish
    during the walk are skipped."""
    for rel, st, _dir_fd, _name in _walk_fd(ws, start, use_ignore):
        yield rel, st


def _walk_fd(ws: Workspace, start: bytes, use_ignore: bool,
             monitor: WorkspaceMonitor | None = None
             ) -> Iterator[tuple[bytes, os.stat_result, int, bytes]]:
    """``walk``, also giving each path's parent directory fd and name (valid until the
    next step).  Directories are opened relative to their parent with ``O_NOFOLLOW``, so
    a directory swapped for a symlink during the walk is never entered; at most one fd
    per level is open.  ``monitor``: each directory entered (``start`` included) is armed
    after it is opened and BEFORE it is listed, each name before it is ``lstat``ed (the
    watch of its inode; dropped again when the name is ignored)."""
    arm = monitor.arm if monitor is not None else None
    ignore = ws.ignore if use_ignore else IgnoreRules()
    ws.check_parents(start + b"/x" if start else b"x")
    try:
        top = os.open(ws.abspath(start), _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            return  # ``start`` is a symlink (now): nothing under it is the workspace's
        raise
    # a stack of (directory fd, its rel, the names still to visit in it)
    stack: list[tuple[int, bytes, Iterator[bytes]]] = []
    try:
        if arm is not None:
            arm(top, start)
        stack.append((top, start, iter(_names(top))))
        while stack:
            fd, d, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            rel = d + b"/" + name if d else name
            if monitor is not None:
                monitor.arm_name(fd, name, rel)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if monitor is not None:
                    monitor.drop_name(rel)
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if (ignore and ignore.ignored_here(rel, is_dir)) or (
                    ws.exclude and ws.excluded(rel)):
                if monitor is not None:
                    monitor.drop_name(rel)
                continue
            yield rel, st, fd, name
            if is_dir:
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        continue  # became a symlink since the stat: not entered
                    raise
                if arm is not None:
                    try:
                        arm(sub, rel)
                    except BaseException:
                        os.close(sub)
                        raise
                stack.append((sub, rel, iter(_names(sub))))
    finally:
        for fd, _d, _n in stack:
            os.close(fd)


def _names(fd: int) -> list[bytes]:
    """The names in the open directory ``fd`` (bytes, sorted), temp names left out."""
    with os.scandir(fd) as it:
        names = sorted(os.fsencode(de.name) for de in it)
    return [n for n in names if not is_temp_name(n)]


def snapshot(ws: Workspace, blobs: BlobStore | None = None, previous: Manifest | None = None,
             racy_window_ns: int = RACY_WINDOW_NS,
             monitor: WorkspaceMonitor | None = None) -> Manifest:
    """The manifest of ``ws`` now (see the module docstring).  With ``blobs``, every
    tracked file's content is stored; ``previous`` makes it incremental.  ``monitor``
    (one per workspace, see ``monitor.py``): when ``previous`` is the manifest the monitor
    made last (same patterns, same blob store), only what its events name is examined;
    otherwise the walk is full and arms it (``stats.mode``, ``stats.full_walk_reason``).
    With a monitor, the caller keeps every blob the previous manifest names (its records
    are reused without ``has``)."""
    t0 = time.perf_counter()
    taken_ns = time.time_ns()
    window_ns = taken_ns - racy_window_ns
    tick_dev, tick_ns = None, window_ns
    if blobs is not None:
        try:
            tick_dev, tick_ns = blobs.clock_tick()
        except OSError:
            pass
    stats = SnapshotStats()
    if previous is not None and previous.root != ws.root_b:
        previous = None
    top = None
    with contextlib.suppress(FileNotFoundError):
        st_root = os.lstat(ws.root_b)
        if stat.S_ISDIR(st_root.st_mode):
            top = _record(st_root)
    key = _monitor_key(ws, blobs)
    plan = place = None
    if monitor is not None:
        # (read before the walk: what changes during it differs from it next time)
        place = (None if top is None else (top.dev, top.ino), mounts_at_or_under(ws.root_b))
        got = monitor.take(previous, key, place)
        if isinstance(got, str):
            stats.full_walk_reason = got
        else:
            plan = got
    examined: set[bytes] | None = None
    try:
        with blobs.batch() if blobs is not None else contextlib.nullcontext():
            if plan is not None:
                records = dict(previous.records)
                examined = _walk_dirty(ws, blobs, previous, records, stats, monitor, *plan)
                stats.mode = "incremental"
            else:
                records = {}
                armed = monitor is not None and monitor.start_full()
                if monitor is not None and not armed:
                    stats.full_walk_reason = monitor.take(None, key)
                linked: dict[bytes, tuple[int, int]] = {}
                _walk_into(ws, blobs, previous, records, stats,
                           monitor if armed else None, linked)
                stats.mode = "full" if armed else "walk"
                if armed and monitor.lost is not None:
                    stats.full_walk_reason = monitor.lost  # (arming failed: next is full)
                elif armed:
                    children: dict[bytes, set[bytes]] = {}
                    for rel in records:
                        children.setdefault(parent_of(rel), set()).add(rel)
                    monitor.children, monitor.linked = children, linked
    except BaseException:
        if monitor is not None:
            monitor.invalidate("a snapshot failed half-way")
        raise
    m = Manifest(ws.root_b, records, taken_ns, tick_ns, stats, tick_dev, window_ns,
                 list(ws.ignore.sources), top)
    if previous is not None:
        m.packed_rows = previous.packed_rows  # (read only: a save makes its own)
    if examined is not None and previous is not None and tick_dev == previous.tick_dev \
            and m.racy_ns >= previous.racy_ns and m.racy_other_ns >= previous.racy_other_ns:
        # a record no event named kept its mtime, under the old tick and so the new one
        racy = {rel for rel in (monitor.racy | examined)
                if rel in records and m.is_racy(records[rel])}
    else:
        racy = {rel for rel, r in records.items() if m.is_racy(r)}
    stats.racy = len(racy)
    if monitor is not None:
        monitor.racy = racy
        monitor.finish(m, key, place)
    stats.seconds = time.perf_counter() - t0
    return m


def _monitor_key(ws: Workspace, blobs: BlobStore | None) -> tuple:
    """What a monitored base must share with the snapshot that reuses it: the patterns,
    the exclusions, the blob store.  (Its records' content is trusted without ``has``:
    the caller keeps every blob the base names — ``Files``' gc keeps those of every
    manifest it holds in memory, and the base is one.  Any blob removed made the next
    snapshot a full walk, and a store's inline gc ran every few watches of a large tree:
    a 20,000-file walk every fourth watch.)"""
    return (ws.root_b, tuple(ws.ignore.sources), ws.exclude, blobs)


def _examine(ws: Workspace, blobs: BlobStore | None, previous: Manifest | None,
             rel: bytes, st: os.stat_result, dir_fd: int, name: bytes,
             stats: SnapshotStats) -> Record | None:
    """The record of one path the walk reached (None: none, it went or is special)."""
    m = st.st_mode
    if stat.S_ISDIR(m):
        return _record(st)
    if stat.S_ISLNK(m):
        try:
            return _record(st, target=os.readlink(name, dir_fd=dir_fd))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise
            return None  # it went away (or changed type) during the walk
    if stat.S_ISREG(m):
        old = previous.records.get(rel) if previous is not None else None
        if (old is not None and old.kind == FILE and old.same_stat(st)
                and not previous.is_racy(old) and old.sha256 is not None
                and (blobs is None or blobs.has(old.sha256))):
            stats.reused += 1
            return old if old.mode == stat.S_IMODE(m) and (old.uid, old.gid) == (
                st.st_uid, st.st_gid) else _record(st, sha256=old.sha256)
        return _hash_file(ws, rel, dir_fd, name, blobs, stats)
    stats.skipped.append(rel)
    return None


def _walk_into(ws: Workspace, blobs: BlobStore | None, previous: Manifest | None,
               records: dict[bytes, Record], stats: SnapshotStats,
               monitor: WorkspaceMonitor | None = None,
               linked: dict[bytes, tuple[int, int]] | None = None,
               start: bytes = b"") -> None:
    """Walk ``start``'s subtree (b"": all) into ``records`` (arming ``monitor``);
    ``linked`` collects the files with several links."""
    for rel, st, dir_fd, name in _walk_fd(ws, start, True, monitor):
        stats.walked += 1
        rec = _examine(ws, blobs, previous, rel, st, dir_fd, name, stats)
        if rec is not None:
            records[rel] = rec
            if linked is not None and rec.kind == FILE and st.st_nlink > 1:
                linked[rel] = (st.st_dev, st.st_ino)


def _walk_dirty(ws: Workspace, blobs: BlobStore | None, previous: Manifest,
                records: dict[bytes, Record], stats: SnapshotStats,
                monitor: WorkspaceMonitor, dirty: set[bytes], subtrees: set[bytes]
                ) -> set[bytes]:
    """Bring ``records`` (a copy of ``previous``'s, the monitor's base) up to date by
    examining only what the monitor's events name, the files with several links and the
    racy files; the paths examined."""
    ws.check_root()
    children, linked = monitor.children, monitor.linked
    linked_inodes = set(linked.values())
    ignore = ws.ignore
    examined: set[bytes] = set()
    walked_whole: set[bytes] = set()
    dir_fds: dict[bytes, int | None] = {}
    heap: list[tuple[int, bytes, bool]] = []
    for rel in subtrees:
        heapq.heappush(heap, (depth(rel), rel, True))
    for rel in dirty | set(linked) | monitor.racy:
        heapq.heappush(heap, (depth(rel), rel, False))

    def index_add(rel: bytes, rec: Record) -> None:
        records[rel] = rec
        children.setdefault(parent_of(rel), set()).add(rel)

    def forget(rel: bytes) -> None:
        """``rel`` and everything under it leave the manifest (and their watches go)."""
        old = records.pop(rel, None)
        sibs = children.get(parent_of(rel))
        if sibs is not None:
            sibs.discard(rel)
        linked.pop(rel, None)
        monitor.drop_name(rel)
        if old is not None and old.kind == DIR:
            stack = [rel]
            while stack:
                d = stack.pop()
                monitor.drop_watch(d)
                for c in children.pop(d, ()):
                    r = records.pop(c, None)
                    linked.pop(c, None)
                    monitor.drop_name(c)
                    if r is not None and r.kind == DIR:
                        stack.append(c)

    def open_dir(rel: bytes) -> int | None:
        if rel in dir_fds:
            return dir_fds[rel]
        fd = None
        if not rel:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                fd = os.open(ws.root_b, _DIR_FLAGS)
        else:
            up = open_dir(parent_of(rel))
            if up is not None:
                try:
                    fd = os.open(rel.rpartition(b"/")[2], _DIR_FLAGS, dir_fd=up)
                except (FileNotFoundError, NotADirectoryError):
                    pass
                except OSError as e:
                    if e.errno != errno.ELOOP:
                        raise
        if fd is not None:  # (bounded: a round over thousands of directories held an fd
            held = [r for r, f in dir_fds.items() if f is not None]  # each, up to EMFILE,
            for r in held[:max(0, len(held) + 1 - MAX_OPEN_DIRS)]:    # probe-review40)
                os.close(dir_fds.pop(r))
        dir_fds[rel] = fd
        return fd

    def mark_linked(rel: bytes, ident: tuple[int, int]) -> None:
        """``rel`` has several links: re-examined every round from now on (sticky while
        it is that inode); when the inode is new to that list, its other names here
        (which no event named) are examined this round too (one pass over the records)."""
        if ident not in linked_inodes:
            linked_inodes.add(ident)
            for other, r in records.items():
                if r.kind == FILE and (r.dev, r.ino) == ident and other != rel:
                    linked[other] = ident
                    if other not in examined:
                        heapq.heappush(heap, (depth(other), other, False))
        linked[rel] = ident

    def note_links(rel: bytes, st: os.stat_result) -> None:
        ident = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 or linked.get(rel) == ident:
            mark_linked(rel, ident)
        else:
            linked.pop(rel, None)

    try:
        while heap:
            _d, rel, whole = heapq.heappop(heap)
            if any(a in walked_whole for a in _ancestors(rel)) or rel in walked_whole:
                continue  # walked whole already this round
            if not whole and rel in examined:
                continue
            examined.add(rel)
            up = parent_of(rel)
            name = rel.rpartition(b"/")[2]
            parent = records.get(up) if up else None
            dfd = open_dir(up) if not up or (parent is not None and parent.kind == DIR) \
                else None
            st = None
            if dfd is not None:
                monitor.arm_name(dfd, name, rel)
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                stats.walked += 1
            if st is None:
                forget(rel)
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_temp_name(name) or (ignore and ignore.ignored_here(rel, is_dir)) or (
                    ws.exclude and ws.excluded(rel)):
                forget(rel)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    note_links(rel, st)  # an ignored name of a tracked file
                    linked.pop(rel, None)
                continue
            old = records.get(rel)
            if is_dir:
                if whole or old is None or old.kind != DIR or (old.ino, old.dev) != (
                        st.st_ino, st.st_dev) or not monitor.is_armed(rel):
                    forget(rel)
                    index_add(rel, _record(st))
                    walked: dict[bytes, Record] = {}
                    found: dict[bytes, tuple[int, int]] = {}
                    _walk_into(ws, blobs, previous, walked, stats, monitor, found, rel)
                    for r, rec in walked.items():
                        index_add(r, rec)
                    examined.update(walked)
                    for r, ident in found.items():
                        mark_linked(r, ident)
                    walked_whole.add(rel)
                else:
                    index_add(rel, _record(st))
                continue
            if old is not None and old.kind == DIR:
                forget(rel)
            rec = _examine(ws, blobs, previous, rel, st, dfd, name, stats)
            if rec is None:
                forget(rel)
                continue
            index_add(rel, rec)
            if rec.kind == FILE:
                note_links(rel, st)
            else:
                linked.pop(rel, None)
    finally:
        for fd in dir_fds.values():
            if fd is not None:
                os.close(fd)
    return examined


def _ancestors(rel: bytes) -> Iterator[bytes]:
    cut = rel.rfind(b"/")
    while cut > 0:
        rel = rel[:cut]
        yield rel
        cut = rel.rfind(b"/")


def _hash_file(ws: Workspace, rel: bytes, dir_fd: int, name: bytes,
               blobs: BlobStore | None, stats: SnapshotStats) -> Record | None:
    """Read (and store) one file, opened relative to its directory without following a
    symlink; its record from the fstat of what was read.  None: it is no longer a
    regular file (the next snapshot sees what it became)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        path = os.fsdecode(ws.abspath(rel))
        raise type(e)(e.errno, f"cannot read {display(rel)!r} in workspace {ws.root!r} (a "
                               f"watch needs every tracked file readable; ignore it "
                               f"otherwise): {e.strerror}", path) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if blobs is None:
            # if it changes while being hashed, the stat taken before no longer matches
            # it, so the next snapshot hashes it again
            digest, size = hash_fd(fd)
        else:
            got = blobs.put_fd(fd, os.fsdecode(ws.abspath(rel)))
            digest, size = got.digest, got.size
            st = got.stat or st
            if got.written:
                stats.stored_files += 1
                stats.stored_bytes += got.written
    finally:
        os.close(fd)
    stats.hashed_files += 1
    stats.hashed_bytes += size
    rec = _record(st, sha256=digest)
    rec.size = size
    return rec


# ---- differences ------------------------------------------------------------------------
CREATED, DELETED, MODIFIED, MODE, SYMLINK_CHANGED, TYPE = (
    "created", "deleted", "modified", "mode", "symlink", "type")


@dataclass(frozen=True)
class Change:
    """One path that differs: ``kind`` is created | deleted | modified | mode | symlink |
    type; ``before`` and ``after`` are its Entries (absence included)."""

    path: bytes
    kind: str
    before: Entry
    after: Entry

    def __str__(self) -> str:
        return f"{self.kind:8} {display(self.path)}"

    @classmethod
    def of(cls, path: bytes, before: Entry, after: Entry) -> "Change":
        """The change from ``before`` to ``after`` (kind "same" when nothing differs)."""
        return cls(path, _classify(before, after) or "same", before, after)

    def to_row(self) -> list:
        """``[path, before row, after row]`` (msgpack-able; the kind is derived)."""
        return [self.path, self.before.to_row(), self.after.to_row()]

    @classmethod
    def from_row(cls, row: list) -> "Change":
        try:
            path, before, after = row
        except (TypeError, ValueError):
            raise ValueError(f"not a change row: {row!r:.200}") from None
        if not isinstance(path, bytes):
            raise ValueError(f"not a change row: {row!r:.200}")
        return cls.of(path, Entry.from_row(before), Entry.from_row(after))


def _classify(before: Entry, after: Entry) -> str | None:
    if before.kind == ABSENT:
        return CREATED
    if after.kind == ABSENT:
        return DELETED
    if before.kind != after.kind:
        return TYPE
    if before.kind == FILE:
        if (before.sha256, before.size) != (after.sha256, after.size):
            return MODIFIED
        return MODE if before.mode != after.mode else None
    if before.kind == DIR:
        return MODE if before.mode != after.mode else None
    return SYMLINK_CHANGED if before.target != after.target else None


def diff(old: Manifest, new: Manifest, ignore: IgnoreRules | None = None) -> list[Change]:
    """Every path that differs between ``old`` and ``new``, in path order; ``ignore``
    drops paths it matches (the manifests already skip the workspace's own patterns)."""
    out: list[Change] = []
    if old.top is not None and new.top is not None and old.top.mode != new.top.mode:
        # the root itself: only its mode (it is never created, deleted or replaced)
        out.append(Change(b"", MODE, old.top.entry(), new.top.entry()))
    a, b = old.records, new.records
    # A path whose record is the same object in both cannot differ (a Record never changes
    # once made; an incremental snapshot keeps its previous manifest's records for every
    # path it did not examine): only the others are compared and sorted (20,000 paths,
    # one changed: the union's sort took most of a watch's diff)
    get_a = a.get
    candidates = [rel for rel, rb in b.items() if get_a(rel) is not rb]
    if len(a) > len(b) - len(candidates):  # (else every path of ``a`` is one of ``b``'s)
        candidates.extend(a.keys() - b.keys())
    for rel in sorted(candidates):
        ra, rb = a.get(rel), b.get(rel)
        if ra is not None and rb is not None and ra.kind == rb.kind == FILE and \
                ra.sha256 == rb.sha256 and ra.mode == rb.mode:
            continue
        before = ra.entry() if ra is not None else Entry.absent()
        after = rb.entry() if rb is not None else Entry.absent()
        kind = _classify(before, after)
        if kind is None:
            continue
        if ignore and ignore.ignored(rel, DIR in (before.kind, after.kind)):
            continue
        out.append(Change(rel, kind, before, after))
    return out


def undo_order(changes: Iterable[Change]) -> list[Change]:
    """The order to put ``changes`` back in: first what must disappear (created paths, and
    directories that replaced something), deepest first; then the rest (re-creations,
    content, modes), shallowest first.

    A directory's own mode goes back where its contents need it (audit 58): one that
    gets owner write or search permission back (``chmod a-w d`` undone) is opened
    before anything (shallowest first), one that loses them (``chmod u+w d`` undone)
    is closed after everything (deepest first).  In the middle, a process without
    CAP_DAC_OVERRIDE could not remove a file the undone change made in ``d`` nor put
    back one it removed from it (``PermissionError``: a revert or rewind of such a
    transaction could not be done at all, where its rollback, newest first, could)."""
    changes = _through_writable(list(changes))
    opening, first, then, closing = [], [], [], []
    for c in changes:
        if c.before.kind == ABSENT or (c.after.kind == DIR and c.before.kind != DIR):
            first.append(c)
        elif c.before.kind == DIR and c.after.kind == DIR and _opens(c.after, c.before):
            opening.append(c)
        elif c.before.kind == DIR and c.after.kind == DIR and _opens(c.before, c.after):
            closing.append(c)
        else:
            then.append(c)
    opening.sort(key=lambda c: (depth(c.path), c.path))
    first.sort(key=lambda c: (-depth(c.path), c.path))
    then.sort(key=lambda c: (depth(c.path), c.path))
    closing.sort(key=lambda c: (-depth(c.path), c.path))
    return opening + first + then + closing


def _through_writable(changes: list[Change]) -> list[Change]:
    """A directory to remove whose mode denies its owner write or search permission
    (a watched ``mkdir n; touch n/a; chmod a-w n``, a revert of ``mkdir`` + ``write`` +
    ``chmod``), with changes under it, is removed in two steps: opened (``chmod u+wx``, an
    opening mode change, first), then removed.  One to make anew with such a mode is made
    with owner write and search permission, then given its mode (a closing change,
    last).  Without CAP_DAC_OVERRIDE nothing inside could be removed or made
    (PermissionError: the undo failed, audit 58).  The steps logged from this order
    describe a history that could have been (made writable, filled, made read-only), so
    they undo, are rolled back and recovered like any other."""
    under = {parent_of(c.path) for c in changes if c.path}
    for p in list(under):  # (every directory above a change has changes under it)
        while p:
            p = parent_of(p)
            under.add(p)
    out: list[Change] = []
    for c in changes:
        if not c.path or c.path not in under:
            out.append(c)
            continue
        if c.after.kind == DIR and c.before.kind != DIR and c.after.mode & 0o300 != 0o300:
            opened = dataclasses.replace(c.after, mode=c.after.mode | 0o300)
            out += [Change.of(c.path, opened, c.after), Change.of(c.path, c.before, opened)]
        elif c.before.kind == DIR and c.after.kind != DIR and c.before.mode & 0o300 != 0o300:
            opened = dataclasses.replace(c.before, mode=c.before.mode | 0o300)
            out += [Change.of(c.path, opened, c.after), Change.of(c.path, c.before, opened)]
        elif c.before.kind == DIR and c.after.kind == DIR and c.after.mode & 0o300 != 0o300 \
                and not _opens(c.after, c.before):
            # (a mode change from one read-only mode to another, 0o500 -> 0o555: opened
            # first, given its mode last)
            opened = dataclasses.replace(c.after, mode=c.after.mode | 0o300)
            out += [Change.of(c.path, opened, c.after), Change.of(c.path, c.before, opened)]
        else:
            out.append(c)
    return out


def passages(changes: list[Change], now: "Manifest") -> list[Change]:
    """The read-only directories (mode without owner write or search permission) of
    ``now`` — the tree as it is — that hold a change of ``changes`` and are no change of
    their own, each as a change to itself: ``undo_order`` opens it before what it holds
    is put back and closes it after (a watched ``chmod u+w d; touch d/x; chmod u-w d``
    leaves ``d`` as it was, and without CAP_DAC_OVERRIDE its undo could not remove
    ``d/x``: PermissionError, audit 58).  Not changes of the watch (not in ``w.changes``,
    not claimed): steps of its undo.  None for a process that passes permission bits by
    (root): it needs no opening, and the extra steps would name the directories as
    changed by the watch (a later writer for a revert of an older change of them)."""
    if overrides_modes():
        return []
    changed = {c.path for c in changes}
    out: list[Change] = []
    seen: set[bytes] = set()
    for c in changes:
        p = c.path
        while p:
            p = parent_of(p)
            if p in seen or p in changed:
                continue
            seen.add(p)
            rec = now.records.get(p) if p else None
            if rec is not None and rec.kind == DIR and rec.mode & 0o300 != 0o300:
                e = rec.entry()
                out.append(Change.of(p, e, e))
    return out


def _opens(now: Entry, to: Entry) -> bool:
    """Does changing a directory's mode from ``now``'s to ``to``'s give its owner write or
    search permission it lacks, and take none away?"""
    a, b = now.mode & 0o300, to.mode & 0o300
    return a != b and a & b == a


def restore_changes(ws: Workspace, changes: Iterable[Change], blobs: BlobStore,
                    quarantine: str | bytes | None, check: bool = True,
                    durable: bool = True, since_ns: int | None = None
                    ) -> list[FileConflict]:
    """Put every change of a change set (a watch's diff) back to its before-image, in
    ``undo_order``.  ``check``: a path no longer in the change's after-image is a
    conflict (kept, reported); False: every current state is walstore's own (a crashed
    watch, a forced revert).  ``since_ns``: when the changes began (``apply.restore``)."""
    return restore_in_order(ws, undo_order(changes), blobs, quarantine, check, durable,
                            since_ns=since_ns)


def restore_in_order(ws: Workspace, ordered: Iterable[Change], blobs: BlobStore,
                     quarantine: str | bytes | None, check: bool = True,
                     durable: bool = True,
                     done: Callable[[Change], Iterable[Entry]] | None = None,
                     after_crash: bool = False,
                     since_ns: int | None = None,
                     keep: Callable[[Change], Entry | None] | None = None
                     ) -> list[FileConflict]:
    """Restore each change's before-image in the order given; the conflicts.  A path
    that cannot be reached (a parent is a symlink or a file now, e.g. kept as a
    conflict) is reported as a conflict too, and nothing is written through it (its
    before-image is kept under ``quarantine``, as any conflict's).
    ``done(change)``: states that count as restored already for that change (see
    ``apply.restore_status``).  ``since_ns``: when the changes began (a directory to
    remove keeps the ignored paths older than that: ``apply._clear_ignored``).
    ``keep(change)``: walstore's version to keep on a conflict, when not the change's
    before-image (``apply.restore``'s ``keep``)."""
    conflicts: list[FileConflict] = []
    for c in ordered:
        expected = c.after if check else None
        kept = (keep(c) if keep is not None else None) or c.before
        try:
            got = restore(ws, c.path, c.before, expected, blobs, quarantine, durable,
                          done(c) if done is not None else (), after_crash, since_ns,
                          kept)
        except (ValueError, NotADirectoryError) as e:
            # walstore's version is kept all the same, as any conflict's (it was kept
            # nowhere: the content the transaction had overwritten was lost to the user)
            saved = None
            if quarantine is not None and kept.exists and c.path:
                saved = save_aside(c.path, kept, blobs, os.fsencode(quarantine))
            got = FileConflict(c.path, kept, expected, Entry.absent(), saved,
                               f"cannot be restored: {e}")
        if got is not None:
            conflicts.append(got)
    return conflicts
