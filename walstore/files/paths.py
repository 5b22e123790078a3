"""Workspaces and safe relative paths: the only way a path inside a workspace is named.

This module owns the boundary between "a path an agent gave us" and "a file walstore may
touch".  A ``Workspace`` is an absolute, realpath'd root directory plus its ignore
patterns and the directories inside it that are walstore's own (``exclude``: the store,
when it lives in the tree; never tracked, never written through the workspace).  Every path of the files package is RELATIVE to a root and goes through
``Workspace.rel`` (lexical checks: not absolute, no NUL, no ``..`` leaving the root) and,
before any operation, ``Workspace.resolve`` (physical checks: every existing component on
the way is a real directory, ``lstat``-ed, never followed: a symlink on the way raises
ValueError, even one pointing inside the root).  The last component may be anything (a
symlink is operated on, never through).

Paths are ``bytes`` internally (``os.fsencode``), so names with newlines or bytes that are
not UTF-8 work; ``display`` gives a printable ``str`` (surrogate escapes), ``to_str`` the
lossless ``str`` form for JSON-ish records.

Residual race (documented in docs/FILES.md): the checks are ``lstat``s made just before
each operation; a directory on the way swapped for a symlink between the check and the
system calls of that one primitive is not caught.  Nothing in walstore's own sequence
opens such a window for longer than one primitive: ``apply.rmtree``, which runs long,
goes by directory descriptors opened with ``O_NOFOLLOW`` instead, as the watch's walk
does.
"""
from __future__ import annotations

import copy
import errno
import os
import re
import stat
from collections.abc import Iterable
from typing import Union

from ..errors import as_store_error, shown
from .ignore import IgnoreRules

__all__ = ["Workspace", "PathLike", "TEMP_PREFIX", "is_temp_name", "display", "to_str",
           "from_str", "fs_bytes", "depth", "parent_of"]

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# Every temporary name the files package creates inside a workspace is TEMP_PREFIX, the
# creating process's pid in hex, "-", 12 random hex digits (``apply._temp_name``), so a
# crashed apply's leftovers are recognisable (``apply.remove_stray_temps``) and manifests
# never track them.  Only that exact form is walstore's: a user's ``.walstore-tmp-notes``
# is an ordinary file (recovery used to delete any name with the prefix, committed files
# included), and a path of that form is refused to tx.files (``Workspace.rel``).
TEMP_PREFIX = b".walstore-tmp-"
_TEMP_NAME = re.compile(rb"\.walstore-tmp-[0-9a-f]{1,16}-[0-9a-f]{12}\Z")


def is_temp_name(name: bytes) -> bool:
    return name.startswith(TEMP_PREFIX) and _TEMP_NAME.match(name) is not None


def display(rel: bytes) -> str:
    """A printable form of a relative path (for messages only)."""
    return repr(os.fsdecode(rel))[1:-1] if rel else "."


def to_str(rel: bytes) -> str:
    """The lossless str form (surrogate escapes for non-UTF-8 bytes)."""
    return os.fsdecode(rel)


def from_str(s: str | bytes) -> bytes:
    return fs_bytes(s)


def fs_bytes(value: "PathLike", what: str = "path") -> bytes:
    """``os.fsencode(value)``; a str no file name can hold (a lone surrogate outside the
    surrogate escapes, e.g. ``"\\ud800"``) is a ValueError naming ``what`` and the value:
    the bare UnicodeEncodeError named neither (the contract: bad input is a ValueError
    naming the problem, no codec error escapes); a non-path a TypeError naming ``what``."""
    try:
        return os.fsencode(value)
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {shown(value, 240)} is not a valid file name ({e.reason} at "
                         f"character {e.start})") from None
    except TypeError:  # (os.fsencode's message does not say which argument it was)
        raise TypeError(f"a {what} is a str, bytes or os.PathLike, not "
                        f"{type(value).__name__}") from None


def depth(rel: bytes) -> int:
    return rel.count(b"/") + 1 if rel else 0


def _root_error(real: bytes, e: OSError) -> Exception:
    """A root the OS refuses to look at: a name too long for it is bad input
    (ValueError, as a root that does not exist); any other error (no permission, I/O) a
    StoreIOError keeping the OS error's class — never a bare OSError out of the API."""
    if e.errno == errno.ENAMETOOLONG:
        return ValueError(f"workspace root {shown(os.fsdecode(real))} is too long for the "
                          f"file system ({e.strerror})")
    return as_store_error(e)


def parent_of(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


# a file version's LMDB key is u16 len(root) | root | u16 len(path) | path | u64 LSN, and
# LMDB's keys are at most 511 bytes: the root and the path together at most 499 (a longer
# one, refused nowhere, committed and then failed the apply: every open failed after it)
MAX_ROOT_AND_PATH_BYTES = 511 - 12


def check_length(root_b: bytes, rel: bytes) -> None:
    """ValueError when a workspace root and a path in it are too long together for the
    file history's keys (``MAX_ROOT_AND_PATH_BYTES``)."""
    if len(root_b) + len(rel) > MAX_ROOT_AND_PATH_BYTES:
        raise ValueError(
            f"path {display(rel)!r} is too long for walstore's file history: with the "
            f"workspace root {display(root_b)!r} it is {len(root_b) + len(rel)} bytes, at "
            f"most {MAX_ROOT_AND_PATH_BYTES} (LMDB's keys are at most 511 bytes); nothing "
            f"was changed")


class Workspace:
    """A registered directory tree: ``root`` (absolute, realpath'd str), ``root_b`` (its
    bytes), ``ignore`` (an IgnoreRules), ``scope`` (the key prefix a scoped rewind counts
    it in; None: none).  The root must exist and be a directory.  ``registered``: the
    root is a store's registered one, taken as it is (see ``check_root``)."""

    # paths over ``MAX_ROOT_AND_PATH_BYTES`` are refused (``rel``); False only in the copy
    # ``without_length_limit`` gives, which puts back what a watched process made there
    length_limit = True

    def __init__(self, root: PathLike, ignore: Iterable[str | bytes] | str | None = None,
                 exclude: Iterable[PathLike] = (), scope: str | bytes | None = None,
                 registered: bool = False, missing_ok: bool = False) -> None:
        raw = fs_bytes(root, "workspace root")
        if b"\0" in raw:
            raise ValueError("a workspace root must not contain a NUL byte")
        if not raw:
            raise ValueError("a workspace root must not be empty")
        # ``registered``: the root as the store registered it (realpath'd then), taken as
        # it is: resolving it again would follow a symlink that replaced the root since
        # (recovery wrote and deleted in the symlink's target); ``check_root`` refuses it
        real = os.path.normpath(os.path.abspath(raw)) if registered else \
            os.path.realpath(os.path.abspath(raw))
        if real == b"/":
            raise ValueError("the file system root cannot be a workspace")
        # ``missing_ok`` (with ``registered``): a registered root that no longer exists or
        # is no directory (a copy restored on another machine, a deleted tree) is taken,
        # to read its recorded history (``Files.registered(root, gone_ok=True)``); its
        # identity is unknown (None), so ``check_root`` refuses it until it is a directory
        # again, and every change of the live tree meets the OS's error
        try:
            st = os.stat(real)
        except FileNotFoundError:
            if not (registered and missing_ok):
                raise ValueError(f"workspace root {os.fsdecode(real)!r} does not exist") \
                    from None
            st = None
        except OSError as e:
            raise _root_error(real, e) from e
        if st is not None and not stat.S_ISDIR(st.st_mode) and not (registered and missing_ok):
            raise ValueError(f"workspace root {os.fsdecode(real)!r} is not a directory")
        try:
            lst = os.lstat(real)
        except FileNotFoundError:  # (missing_ok: checked above)
            lst = None
        except OSError as e:
            raise _root_error(real, e) from e
        # the root directory's identity (see ``check_root``); None: not a real directory,
        # or (``registered``) one reached through a symlink now: a directory on the way
        # to the registered root swapped for a symlink between two opens was taken as
        # the root (its identity adopted here), and every change went through the
        # symlink into another tree (probe audit48); ``check_root`` refuses it instead
        self._root_id: tuple[int, int] | None = (
            (lst.st_dev, lst.st_ino) if lst is not None and stat.S_ISDIR(lst.st_mode)
            and not (registered and os.path.realpath(real) != real) else None)
        self.root_b: bytes = real
        self.root: str = os.fsdecode(real)
        self.ignore = ignore if isinstance(ignore, IgnoreRules) else IgnoreRules(ignore)
        self.scope = scope
        # absolute paths inside the root that are walstore's own (the store, its blobs):
        # never tracked, never written through the workspace
        self.exclude: frozenset[bytes] = frozenset(
            os.path.relpath(os.path.realpath(os.fsencode(p)), real)
            for p in exclude if self.contains(os.path.realpath(os.fsencode(p)))
            and os.path.realpath(os.fsencode(p)) != real)

    def __repr__(self) -> str:
        return f"Workspace({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workspace) and other.root_b == self.root_b

    def __hash__(self) -> int:
        return hash(self.root_b)

    # ---- lexical ------------------------------------------------------------------------
    def rel(self, path: PathLike, allow_root: bool = False) -> bytes:
        """The normalized relative form of ``path`` (``a/b``; ``b""`` is the root itself,
        refused unless ``allow_root``).  ValueError for an absolute path, a NUL byte, or a
        ``..`` that leaves the root; TypeError for a non-path."""
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, (str, bytes)):
            raise TypeError(f"a workspace path is a str or bytes, not {type(path).__name__}")
        raw = fs_bytes(path)
        if b"\0" in raw:
            raise ValueError(f"path {display(raw)!r} contains a NUL byte")
        if raw.startswith(b"/"):
            raise ValueError(f"path {display(raw)!r} is absolute; workspace paths are "
                             f"relative to {self.root!r}")
        parts: list[bytes] = []
        for comp in raw.split(b"/"):
            if comp in (b"", b"."):
                continue
            if comp == b"..":
                if not parts:
                    raise ValueError(f"path {display(raw)!r} leaves the workspace "
                                     f"{self.root!r}")
                # ``x/..`` is ``x``'s parent only when ``x`` is not a symlink: the OS would
                # go up from the link's target, so the lexical answer would name another
                # file than every other tool does.  Refused, as any symlink on the way is.
                if os.path.islink(self.abspath(b"/".join(parts))):
                    raise ValueError(f"path {display(raw)!r} goes up ('..') from the symlink "
                                     f"{display(b'/'.join(parts))!r}; walstore never follows "
                                     f"a symlink on the way to a path")
                parts.pop()
                continue
            parts.append(comp)
        rel = b"/".join(parts)
        if parts and is_temp_name(parts[-1]):
            raise ValueError(f"path {display(raw)!r} has the form of walstore's temporary "
                             f"files ({TEMP_PREFIX.decode()}<pid>-<12 hex digits>), which "
                             f"recovery removes; choose another name")
        if not rel and not allow_root:
            raise ValueError(f"path {display(raw)!r} names the workspace root itself")
        if self.length_limit:
            check_length(self.root_b, rel)
        if self.exclude and self.excluded(rel):
            raise ValueError(f"path {display(raw)!r} is inside walstore's own directory")
        return rel

    def excluded(self, rel: bytes) -> bool:
        """Is ``rel`` one of the excluded directories (walstore's own) or inside one?"""
        return any(rel == x or rel.startswith(x + b"/") for x in self.exclude)

    def holding_excluded(self, rel: bytes) -> bytes | None:
        """The excluded directory (walstore's own) that ``rel`` holds (is an ancestor of),
        if any: moving ``rel`` would move the store with it."""
        for x in sorted(self.exclude):
            if not rel or x.startswith(rel + b"/"):
                return x
        return None

    def abspath(self, rel: bytes) -> bytes:
        """The absolute bytes path of an already normalized ``rel`` (no checks)."""
        return self.root_b + b"/" + rel if rel else self.root_b

    # ---- physical -----------------------------------------------------------------------
    def resolve(self, path: PathLike, allow_root: bool = False) -> tuple[bytes, bytes]:
        """(rel, absolute path) after checking every existing parent component with
        ``lstat``: each must be a real directory.  ValueError names a symlink on the way;
        NotADirectoryError a file on the way.  Missing components are allowed (they may be
        created as parents); the last component is not looked at."""
        rel = self.rel(path, allow_root)
        self.check_parents(rel)
        return rel, self.abspath(rel)

    def check_root(self) -> None:
        """ValueError when the root is no longer a real directory reached without a
        symlink (replaced by a symlink, or a directory on the way to it was): walstore
        would write and delete outside the registered root.  A root that is missing is
        left to the operation itself (the OS says so).  One ``lstat`` when the directory
        is the one seen before; a directory made anew at the same path is taken when the
        path still resolves to itself."""
        try:
            st = os.lstat(self.root_b)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            ident = (st.st_dev, st.st_ino)
            if ident == self._root_id:
                return
            if os.path.realpath(self.root_b) == self.root_b:
                self._root_id = ident
                return
            what = f"reached through a symlink, to {os.fsdecode(os.path.realpath(self.root_b))!r}"
        elif stat.S_ISLNK(st.st_mode):
            what = f"a symlink to {os.fsdecode(os.readlink(self.root_b))!r}"
        else:
            what = "not a directory"
        raise ValueError(f"workspace root {self.root!r} is no longer the directory "
                         f"registered (it is {what}); walstore never writes through it, "
                         f"nothing was changed")

    def check_parents(self, rel: bytes) -> list[bytes]:
        """Check the root (``check_root``) and the components above ``rel`` (see
        ``resolve``); returns the missing ones, shallowest first (the parents a create
        must make)."""
        self.check_root()
        parts = rel.split(b"/")[:-1] if rel else []
        cur = b""
        missing: list[bytes] = []
        for comp in parts:
            cur = cur + b"/" + comp if cur else comp
            if missing:
                missing.append(cur)
                continue
            try:
                st = os.lstat(self.abspath(cur))
            except FileNotFoundError:
                missing.append(cur)
                continue
            except NotADirectoryError:
                raise NotADirectoryError(f"{display(cur)!r} in workspace {self.root!r} is "
                                         f"not a directory") from None
            if stat.S_ISLNK(st.st_mode):
                raise ValueError(f"{display(cur)!r} in workspace {self.root!r} is a symlink; "
                                 f"walstore never follows a symlink on the way to a path")
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{display(cur)!r} in workspace {self.root!r} is "
                                         f"not a directory")
        return missing

    def contains(self, abs_path: PathLike) -> bool:
        """Is the absolute ``abs_path`` lexically inside the root (or the root)?"""
        p = os.path.normpath(os.fsencode(abs_path))
        return p == self.root_b or p.startswith(self.root_b.rstrip(b"/") + b"/")

    def with_ignore(self, ignore: IgnoreRules) -> "Workspace":
        """The same workspace seen through other ignore patterns (a watch keeps those it
        began with, whatever the registration says meanwhile)."""
        if list(ignore.sources) == list(self.ignore.sources):
            return self
        other = copy.copy(self)
        other.ignore = ignore
        return other

    def without_length_limit(self) -> "Workspace":
        """The same workspace with paths over the file history's length limit allowed
        (``check_length``): only to put back what a watched process made there, which no
        history can record (``Files._end_watch``, ``Files._undo_open_watch``)."""
        if not self.length_limit:
            return self
        other = copy.copy(self)
        other.length_limit = False
        return other

    def ignored(self, rel: bytes, is_dir: bool) -> bool:
        """Ignored by the workspace's patterns, excluded, or a walstore temp name."""
        if is_temp_name(rel.rpartition(b"/")[2]) or (self.exclude and self.excluded(rel)):
            return True
        return self.ignore.ignored(rel, is_dir)
