"""A workspace's change monitor on Linux's inotify: which paths changed since a snapshot.

This module owns the inotify descriptor of one workspace and what its events say; the
snapshot itself (``watch.snapshot``) decides what to walk.  Contract:

- ``WorkspaceMonitor.start_full()`` opens a fresh inotify instance (the previous one and
  its queue are closed); the full walk that follows calls ``arm(dir_fd, rel)`` for every
  directory it enters, BEFORE listing it, so any change to a name in it from then on is an
  event; ``arm_name(dir_fd, name, rel)`` watches each path's own inode before it is
  ``lstat``ed (a file written, chmod-ed or linked through a name outside the workspace
  is an event only there).  ``finish(manifest, key, place)`` makes the manifest the
  "clean since" base.
- ``take(previous, key, place)``: for a snapshot whose ``previous`` is exactly the base (same
  ignore patterns, same exclusions, same blob store), drains the
  queue (read until EAGAIN) and hands over the dirty set — paths to re-examine and
  directories to walk whole — leaving an empty one for the next round; otherwise, or when
  the root's path names another directory, or the mounts at or under it changed (no
  event says either: ``place``, ``mounts_at_or_under``), or anything made the events
  incomplete (queue overflow, an unmount, the root moved or
  deleted, a watch that could not be added: ENOSPC/EMFILE, a malformed event, more than
  ``MAX_DIRTY`` dirty paths, a fork), None and the reason: the caller walks everything.
- One descriptor per monitor (``close()``; also at garbage collection).  Not Linux, no
  ``/proc/self/fd``, or inotify unavailable: ``available()`` is False, never an error.

Blind spots of inotify itself (the reason ``WALSTORE_WATCH_FULL_WALK=1`` forces the full
walk; docs/FILES.md): any write through a shared ``mmap`` (its descriptor open or
closed), and changes made by another machine (or another kernel: a VM's shared folder, a
container's overlay lower layer changed underneath) to a network file system.  Files known
to have several links are also re-examined every time (``linked`` in the snapshot).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
import weakref

__all__ = ["WorkspaceMonitor", "available", "forced_full_walk", "watch_budget",
           "instance_budget", "MAX_DIRTY",
           "FULL_WALK_ENV"]

FULL_WALK_ENV = "WALSTORE_WATCH_FULL_WALK"
MAX_DIRTY = 100_000  # dirty paths past which a round is a full walk (bounded memory)
# A monitor holds at most this share of the user's inotify watches (one per directory and
# per tracked path): a larger tree is walked instead, leaving the rest to the user's other
# watchers (an editor's, a build tool's), which fail when the budget is spent
WATCH_SHARE = 4  # a quarter of fs.inotify.max_user_watches
_MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
              | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
# each path's own inode (a file's: a write or a new link made through a name OUTSIDE the
# workspace reaches only the inode's watchers, never the directory's); added to what a
# directory's watch has when the name is a directory
NAME_MASK = IN_MODIFY | IN_ATTRIB | IN_DONT_FOLLOW | IN_MASK_ADD
_NAMED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
          | IN_DELETE)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
_NAME_MAX = 4096  # a name is at most 255 bytes; anything past this is a malformed event

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.inotify_rm_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


_budget: int | None = None
_instance_budget: int | None = None
_MAX_USER_INSTANCES = "/proc/sys/fs/inotify/max_user_instances"
_LIVE: "weakref.WeakSet[WorkspaceMonitor]" = weakref.WeakSet()  # this process's monitors


def _limit(path: str, default: int) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read(32).strip())
    except (OSError, ValueError):
        return default


def watch_budget() -> int:
    """The most watches this process's monitors may hold together (``WATCH_SHARE`` of
    the user's limit)."""
    global _budget
    if _budget is None:
        _budget = max(1, _limit(_MAX_USER_WATCHES, 8192) // WATCH_SHARE)  # (old default)
    return _budget


def instance_budget() -> int:
    """The most inotify instances this process's monitors may hold together (one per
    monitored workspace; half the user's limit: an editor or a build tool takes one or
    a few)."""
    global _instance_budget
    if _instance_budget is None:
        _instance_budget = max(1, _limit(_MAX_USER_INSTANCES, 128) // 2)
    return _instance_budget


def _held_by_others(me: "WorkspaceMonitor") -> int:
    return sum(m.watches for m in list(_LIVE) if m is not me)


_MOUNTINFO = "/proc/self/mountinfo"
_MOUNTINFO_MAX = 16 << 20  # (bounded read: a mount table this large is not walked, it is refused)


def _unescape(field: bytes) -> bytes:
    """A mountinfo path field: space, tab, newline and backslash are written as \\ooo."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(int(field[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mounts_at_or_under(root: bytes) -> frozenset | None:
    """The mounts of this process's mount namespace at ``root`` or below it, as (mount id,
    mount point); None when the table cannot be read.  inotify says nothing when a file
    system is mounted on a watched directory (its watch stays on the covered one): a
    snapshot compares this with its base's and walks everything when it changed."""
    try:
        with open(_MOUNTINFO, "rb") as f:
            table = f.read(_MOUNTINFO_MAX + 1)
    except OSError:
        return None
    if len(table) > _MOUNTINFO_MAX:
        return None
    below = root.rstrip(b"/") + b"/"
    found = set()
    for line in table.split(b"\n"):
        fields = line.split(b" ", 5)
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == root or point.startswith(below):
            found.add((fields[0], point))
    return frozenset(found)


def forced_full_walk() -> bool:
    """``WALSTORE_WATCH_FULL_WALK`` set to anything but "" or "0": never use a monitor."""
    return os.environ.get(FULL_WALK_ENV, "") not in ("", "0")


def available() -> bool:
    """Can a monitor run here (Linux, libc with inotify, ``/proc/self/fd``)?"""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        lib = _load_libc()
        return hasattr(lib, "inotify_init1")
    except (OSError, AttributeError):
        return False


class WorkspaceMonitor:
    """The inotify state of one workspace (see the module docstring).  Not thread-safe:
    its caller holds the workspace's lock."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pid = os.getpid()
        self._others = 0  # the watches the process's other monitors held, last counted
        self._wd_rel: dict[int, bytes] = {}
        self._rel_wd: dict[bytes, int] = {}
        # the watches of files' own inodes: wd -> the rels of that inode, rel -> wd
        self._wd_names: dict[int, set[bytes]] = {}
        self._rel_name_wd: dict[bytes, int] = {}
        self._dirty: set[bytes] = set()       # paths (names in a watched dir) to re-examine
        self._subtrees: set[bytes] = set()    # directories to walk whole
        self._lost: str | None = "no full walk yet"  # why the next round must walk all
        self._disabled: str | None = None     # never again (watch limit reached, ...)
        self.base = None                      # the Manifest clean since the arming
        self._base_key: tuple | None = None
        self._base_place: tuple | None = None  # (root's (dev, ino), mounts at or under it)
        # of the base: directory rel -> the rels of its entries; paths with several links
        # (rel -> (dev, ino)); racy paths (re-hashed next time)
        self.children: dict[bytes, set[bytes]] = {}
        self.linked: dict[bytes, tuple[int, int]] = {}
        self.racy: set[bytes] = set()

    def __del__(self) -> None:
        self.close()

    @property
    def lost(self) -> str | None:
        """Why the next round must be a full walk (None: it need not)."""
        return self._lost

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def watches(self) -> int:
        """The inotify watches this monitor holds (directories, and paths' own inodes)."""
        return len(self._wd_rel) + len(self._wd_names)

    def close(self) -> None:
        """Close the inotify descriptor (every watch goes with it); forget the base."""
        fd, self._fd = self._fd, None
        self._wd_rel.clear()
        self._rel_wd.clear()
        self._wd_names.clear()
        self._rel_name_wd.clear()
        self._new_round()
        self.base = None
        self._base_key = None
        self._lost = "monitor closed"
        if fd is not None and self._pid == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- arming (the full walk) -----------------------------------------------------
    def start_full(self) -> bool:
        """A fresh inotify instance for a full walk; False when none can be had (the
        walk goes on unmonitored; the reason is ``last_reason``)."""
        self.close()
        if self._disabled is not None or self._pid != os.getpid():
            self._lost = self._disabled or "forked process"
            return False
        if sum(1 for m in list(_LIVE) if not m.closed) >= instance_budget():
            self._lost = (f"this process already monitors {instance_budget()} workspaces, "
                          f"half of fs.inotify.max_user_instances (the rest kept for the "
                          f"user's other watchers)")
            return False
        lib = _load_libc()
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            self._lost = f"inotify_init1 failed: {os.strerror(err)}"
            if err in (errno.EMFILE, errno.ENFILE, errno.ENOSYS):
                self._disabled = self._lost
            return False
        self._fd = fd
        self._lost = None
        _LIVE.add(self)
        return True

    def _add_watch(self, path: bytes, mask: int, missing_ok: bool = False) -> int | None:
        mine = self.watches
        if mine % 256 == 0:  # (the others' count, now and then: their sum is not free)
            self._others = _held_by_others(self)
        if mine + self._others >= watch_budget():
            self._disable(f"this process's workspaces need more than {watch_budget()} "
                          f"inotify watches, a {WATCH_SHARE}th of "
                          f"fs.inotify.max_user_watches (kept for the user's other "
                          f"watchers)")
            return None
        wd = _load_libc().inotify_add_watch(self._fd, path, mask)
        if wd >= 0:
            return wd
        err = ctypes.get_errno()
        if missing_ok and err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
            # (a name that went, or one this user may not read: an ignored root-only
            # lost+found, another user's 0600 file — unwatched; such a path, tracked, fails
            # the snapshot anyway when its content is read.  It made every snapshot a full
            # walk: probe-review40)
            return None
        if err in (errno.ENOSPC, errno.EMFILE, errno.ENOMEM):
            self._disable(f"inotify_add_watch failed: {os.strerror(err)} (raise "
                          f"fs.inotify.max_user_watches or max_user_instances)")
        else:
            self._lost = f"inotify_add_watch failed: {os.strerror(err)}"
        return None

    def _disable(self, reason: str) -> None:
        """Off until the store is reopened; the watches held so far are let go at once."""
        self._disabled = reason
        self.close()
        self._lost = reason

    def arm_name(self, dir_fd: int, name: bytes, rel: bytes) -> None:
        """Watch the inode of ``name`` in the directory open as ``dir_fd`` (workspace path
        ``rel``), never following it — call before ``lstat``-ing it: a file changed
        through a link outside the workspace is an event from then on."""
        if self._fd is None or self._lost is not None:
            return
        wd = self._add_watch(b"/proc/self/fd/%d/%s" % (dir_fd, name), NAME_MASK,
                             missing_ok=True)
        if wd is None or wd in self._wd_rel:
            return  # (a directory's: watched as one already)
        old = self._rel_name_wd.get(rel)
        if old == wd:
            return
        if old is not None:
            self.drop_name(rel)
        self._wd_names.setdefault(wd, set()).add(rel)
        self._rel_name_wd[rel] = wd

    def drop_name(self, rel: bytes) -> None:
        """``rel`` left the manifest (or is another inode now): its inode's watch goes
        when no other name of it is known."""
        wd = self._rel_name_wd.pop(rel, None)
        if wd is None:
            return
        names = self._wd_names.get(wd)
        if names is not None:
            names.discard(rel)
            if not names:
                del self._wd_names[wd]
                if wd not in self._wd_rel and self._fd is not None:
                    _load_libc().inotify_rm_watch(self._fd, wd)

    def arm(self, dir_fd: int, rel: bytes) -> None:
        """Watch the directory open as ``dir_fd`` (workspace path ``rel``) — call before
        listing it.  A failure makes the monitor lost (ENOSPC/EMFILE: disabled)."""
        if self._fd is None or self._lost is not None:
            return
        wd = self._add_watch(b"/proc/self/fd/%d" % dir_fd, WATCH_MASK)
        if wd is None:
            return
        for r in self._wd_names.pop(wd, ()):  # (its name's watch: the same inode)
            self._rel_name_wd.pop(r, None)
        old = self._wd_rel.get(wd)
        if old is not None and old != rel and self._rel_wd.get(old) == wd:
            del self._rel_wd[old]  # the same directory, moved: its watch follows it
        self._wd_rel[wd] = rel
        self._rel_wd[rel] = wd

    def drop_watch(self, rel: bytes) -> None:
        """Forget (and remove) the watch of directory ``rel`` (gone from the manifest),
        unless it follows another path now (the same directory, moved and re-armed)."""
        wd = self._rel_wd.pop(rel, None)
        if wd is not None and self._wd_rel.get(wd) == rel:
            del self._wd_rel[wd]
            if self._fd is not None:
                _load_libc().inotify_rm_watch(self._fd, wd)

    def is_armed(self, rel: bytes) -> bool:
        return rel in self._rel_wd

    # ---- rounds -----------------------------------------------------------------------
    def finish(self, manifest, key: tuple, place: tuple) -> None:
        """``manifest`` (just taken, with this monitor) is the new clean base; ``place``:
        the root directory's (dev, ino) and the mounts at or under it, read before the
        snapshot walked (see ``take``)."""
        if self._fd is None or self._lost is not None:
            self.base, self._base_key, self._base_place = None, None, None
            return
        self.base, self._base_key, self._base_place = manifest, key, place

    def invalidate(self, reason: str) -> None:
        """The base cannot be trusted (a snapshot failed half-way): walk all next time."""
        self.base, self._base_key = None, None
        if self._lost is None:
            self._lost = reason

    def _new_round(self) -> None:
        self._dirty, self._subtrees = set(), set()

    def take(self, previous, key: tuple, place: tuple | None = None
             ) -> tuple[set[bytes], set[bytes]] | str:
        """The dirty paths and the subtrees to walk whole since the base, when
        ``previous`` is the base, ``key`` its key and ``place`` its place; otherwise the
        reason for a full walk.  inotify is silent when the root's path comes to name
        another directory (a parent moved aside and made anew, or exchanged: the watches
        follow the old directories) or a file system is mounted at or under it: the
        place, read before each snapshot, says so."""
        if self._pid != os.getpid():
            return "forked process"
        if self._fd is None or self._lost is not None:
            return self._lost or "no inotify descriptor"
        if previous is None or previous is not self.base or key != self._base_key:
            return "previous manifest is not the monitor's base"
        if place is None or self._base_place is None:
            return "the mount table could not be read"
        if place[0] != self._base_place[0]:
            return ("the workspace root is another directory now (a directory above it "
                    "moved or was replaced, or a mount over it)")
        if place[1] is None or place[1] != self._base_place[1]:
            return "a file system was mounted or unmounted at or under the workspace"
        try:
            self._drain()
        except OSError as e:
            self._lost = f"reading inotify events failed: {e.strerror or e}"
        if self._lost is not None:
            return self._lost
        dirty, subtrees = self._dirty, self._subtrees
        self._new_round()
        return dirty, subtrees

    def _drain(self) -> None:
        fd = self._fd
        while self._lost is None:
            try:
                buf = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not buf:
                return
            self._parse(buf)
            if len(self._dirty) + len(self._subtrees) > MAX_DIRTY:
                self._lost = f"more than {MAX_DIRTY} changed paths"

    def _parse(self, buf: bytes) -> None:
        pos, end = 0, len(buf)
        while pos < end:
            if end - pos < _EVENT.size:
                self._lost = "malformed inotify event (short header)"
                return
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
            pos += _EVENT.size
            if length > _NAME_MAX or length > end - pos:
                self._lost = "malformed inotify event (name length)"
                return
            name = bytes(buf[pos:pos + length]).split(b"\0", 1)[0]
            pos += length
            self._event(wd, mask, name)
            if self._lost is not None:
                return

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            self._lost = "inotify queue overflow"
            return
        if mask & IN_UNMOUNT:
            self._lost = "a file system under the workspace was unmounted"
            return
        rel = self._wd_rel.get(wd)
        if rel is None:
            names = self._wd_names.get(wd)
            if names is not None:  # a file's own inode: each of its names is dirty
                self._dirty.update(names)
                if mask & IN_IGNORED:
                    for r in self._wd_names.pop(wd):
                        self._rel_name_wd.pop(r, None)
            return  # (else a watch already removed: its IN_IGNORED, or late events)
        if name:
            if b"/" in name or name in (b".", b".."):
                self._lost = "malformed inotify event (name)"
                return
            path = rel + b"/" + name if rel else name
            if rel:
                self._dirty.add(rel)  # its own mtime/ctime changed
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_DELETE | IN_MOVED_FROM
                                           | IN_MOVED_TO):
                self._subtrees.add(path)
            elif mask & _NAMED:
                self._dirty.add(path)
            return
        # an event on the watched directory itself
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            if not rel:
                self._lost = "the workspace root was moved or deleted"
                return
            # the directory went (or moved): its watch no longer names ``rel``
            del self._wd_rel[wd]
            if self._rel_wd.get(rel) == wd:
                del self._rel_wd[rel]
            if mask & IN_MOVE_SELF and self._fd is not None:
                _load_libc().inotify_rm_watch(self._fd, wd)
            self._subtrees.add(rel)
            return
        if rel:
            self._dirty.add(rel)  # IN_ATTRIB & co. on the directory itself
