"""Fault injection and I/O recording for walstore tests: a ``walstore.fileio`` backend.

This module owns the test-side half of the I/O seam (``walstore.fileio.set_backend``):
``FaultBackend`` passes every call on to the real OS (it subclasses ``OSBackend``) and can

* **fail** the Nth matching ``open`` / ``pwrite`` / ``fsync`` / ``fdatasync`` /
  ``fsync_dir`` / ``rename`` / ``unlink`` with an errno (ENOSPC, EIO, ...), selected by
  operation, path pattern and call count (``fail``); a failing pwrite can first write a
  prefix of its bytes (``partial=``), as a short write followed by an error does;
* **fail LMDB**: the Nth LMDB commit (``lmdb_commit``) or sync (``lmdb_sync``) of an
  environment, or the commit creating its tables at a writable open (``lmdb_tables``),
  raises ``lmdb.Error`` as LMDB itself would (``"mdb_txn_commit:
  Input/output error"``) before it happens (``fail_lmdb``; the seam is
  ``fileio.lmdb_io``, called inside the write transaction, so the commit is aborted);
* **raise at a fault point**: the Nth hit of a named place (``fileio.fault_point(name)``,
  e.g. ``"commit.after_durable"``) raises any exception (``fail_point``);
* **log** every call (``calls``: op, path, fd, ok or errno; LMDB calls as ``lmdb_commit``
  / ``lmdb_sync`` with the environment's path, fault points as ``fault_point`` with the
  point's name as ``path``), so a test can assert, e.g., that a failed fsync was never
  retried on that descriptor, or count the hits of every fault point;
* **record** (``record=True``) every write with its bytes and every sync / rename /
  unlink / open-with-truncate in order (``events``), plus test marks (``mark``), the raw
  material for building power-loss images of the files.

It does not decide what a crash leaves behind and never touches walstore's code: it is
installed with ``installed(backend)`` (or ``fileio.set_backend``) and removed afterwards.
Only I/O that walstore routes through ``walstore.fileio`` is seen: of LMDB's own I/O,
only its commits and syncs, as calls (never as recorded ``events``).

Ordering semantics of ``events`` (for power-loss images): a ``pwrite`` event gets its
sequence number when the write has *completed* (its bytes are in the page cache); a sync
event (``fsync`` / ``fdatasync`` / ``fsync_dir``) gets its number when the sync *starts*
and ``done_seq`` when it returned successfully (``None``: failed or still running).  So a
sync whose ``done_seq`` is set makes durable every write to the same file whose ``seq`` is
smaller than the sync's ``seq``; writes completing during the sync may or may not be
covered.  ``mark`` events are numbered when made.

Example::

    fb = FaultBackend()
    rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal")   # the next WAL write fails once
    fb.fail_lmdb("sync", nth=2)                  # the second LMDB sync raises lmdb.Error
    fb.fail_point("commit.after_durable", RuntimeError("boom"))   # the next hit raises
    with installed(fb):
        ...
    assert rule.fired == 1
"""
from __future__ import annotations

import contextlib
import copy
import errno as _errno
import fnmatch
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import lmdb

from walstore import fileio
from walstore.fileio import OSBackend

# the files package's directory, symlink and mode calls (walstore.files.fsops): they reach
# a backend only when it implements them (FaultBackend does not; the files fault sweep's
# backend, tools/faultsweep_files.py, does), so they are sites of their own
DIR_OPS = ("mkdir", "rmdir", "symlink", "chmod", "fchmod")
OPS = ("open", "pwrite", "fsync", "fdatasync", "fsync_dir", "rename", "unlink",
       "write_back", "syncfs") + DIR_OPS
SYNC_OPS = ("fsync", "fdatasync", "fsync_dir", "syncfs")
LMDB_OPS = ("lmdb_commit", "lmdb_sync")   # fileio.lmdb_io("commit" | "sync", env path)
# the commit that creates the tables at a writable open (``lmdb_io("tables", ...)``): a site
# of its own, failed by ``fail_lmdb("tables")``, not swept with the commits of the store's
# writes (every reopen of a sweep would add one)
LMDB_TABLES_OP = "lmdb_tables"
POINT_OP = "fault_point"                  # fileio.fault_point(name): path is the name
ALL_OPS = OPS + LMDB_OPS + (LMDB_TABLES_OP, POINT_OP)
LMDB_CALL = {"lmdb_commit": "mdb_txn_commit", "lmdb_sync": "mdb_env_sync",
             LMDB_TABLES_OP: "mdb_txn_commit"}


@dataclass
class Rule:
    """Fail matching calls: the ``nth`` matching call and the ``times - 1`` after it.

    ``ops``: operation names; ``path``: an fnmatch pattern tried against the full path and
    against the base name (None: any path; for ``rename`` the source or the destination);
    ``times``: how many calls fail (None: every one from the nth on, until removed);
    ``partial``: for pwrite, write this many bytes of the data before raising;
    ``raises``: raise this instead of the errno's error (an exception instance, copied
    per firing, or a class / factory called with no argument).  Without it a file
    operation raises ``OSError(error)`` and an LMDB one ``lmdb.Error`` naming the LMDB
    call and the errno's message.
    Rules are independent: each counts every call it matches; when several fire on one
    call, the oldest rule gives the error and ``partial``.
    """

    ops: tuple
    error: int = _errno.EIO
    path: str | None = None
    nth: int = 1
    times: int | None = 1
    partial: int | None = None
    raises: Any = None
    effect: Any = None   # at_point: call this (with the place's name) instead of raising
    seen: int = 0        # matching calls so far
    fired: int = 0       # calls this rule failed
    failed_calls: list = field(default_factory=list)  # Call objects it failed

    def matches(self, op: str, paths: tuple) -> bool:
        if op not in self.ops:
            return False
        if self.path is None:
            return True
        for p in paths:
            if p is not None and (fnmatch.fnmatch(p, self.path)
                                  or fnmatch.fnmatch(os.path.basename(p), self.path)):
                return True
        return False

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def should_fail(self) -> bool:
        """Count one matching call; True when this one is to fail."""
        self.seen += 1
        if self.seen < self.nth or self.exhausted:
            return False
        self.fired += 1
        return True

    def exception(self, op: str, path: str | None) -> BaseException:
        """The exception this rule raises for a call of ``op`` on ``path``."""
        r = self.raises
        if isinstance(r, BaseException):
            return copy.copy(r)
        if r is not None:
            return r()
        if op in LMDB_CALL:
            return lmdb.Error(f"{LMDB_CALL[op]}: {os.strerror(self.error)}")
        return OSError(self.error, os.strerror(self.error), path)


@dataclass
class Call:
    """One call that reached the backend (always logged, bytes not kept)."""

    seq: int
    op: str
    path: str | None
    fd: int | None = None
    offset: int | None = None
    size: int | None = None
    dst: str | None = None
    error: int | None = None  # errno when the call failed (injected or real)
    injected: bool = False
    raised: str | None = None  # the injected exception's type name (LMDB calls, points)


@dataclass
class Event:
    """One recorded I/O event (``record=True``) or a test mark."""

    seq: int
    op: str                      # an OPS name, or "mark"
    path: str | None = None
    offset: int | None = None
    data: bytes | None = None    # pwrite: the bytes that reached the file
    dst: str | None = None       # rename: the new name
    flags: int | None = None     # open: the flags
    fd: int | None = None
    done_seq: int | None = None  # syncs: set when the sync returned successfully
    label: str | None = None     # mark: its label
    info: Any = None             # mark: anything the test attaches


class FaultBackend(OSBackend):
    """An ``OSBackend`` that can fail chosen calls and log / record all of them."""

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.rules: list[Rule] = []
        self.calls: list[Call] = []
        self.events: list[Event] = []
        self._fd_paths: dict[int, str] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._last_seq = 0

    # ---- configuring faults ------------------------------------------------------------
    def fail(self, ops, error: int = _errno.EIO, path: str | None = None, nth: int = 1,
             times: int | None = 1, partial: int | None = None, raises: Any = None) -> Rule:
        """Arm a rule (see :class:`Rule`); ``ops`` is one op name or a tuple of them
        (any of ``ALL_OPS``; ``fail_lmdb`` and ``fail_point`` are the short forms).

        Counting starts now: ``nth=1`` fails the next matching call.
        """
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        unknown = set(ops) - set(ALL_OPS)
        if unknown:
            raise ValueError(f"unknown operation(s) {sorted(unknown)}; known: {ALL_OPS}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        rule = Rule(ops, error, path, nth, times, partial, raises)
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail_lmdb(self, ops=("commit", "sync"), error: int = _errno.EIO,
                  path: str | None = None, nth: int = 1, times: int | None = 1,
                  raises: Any = None) -> Rule:
        """Make the Nth LMDB ``commit`` and/or ``sync`` (of an environment whose path
        matches ``path``) raise ``lmdb.Error`` ("mdb_txn_commit: <strerror(error)>"), or
        ``raises``.  ``ops``: "commit", "sync" or both."""
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        return self.fail(tuple(o if o.startswith("lmdb_") else f"lmdb_{o}" for o in ops),
                         error, path, nth, times, raises=raises)

    def fail_point(self, name: str | None, raises: Any = RuntimeError, nth: int = 1,
                   times: int | None = 1) -> Rule:
        """Make the Nth hit of fault point ``name`` (an fnmatch pattern; None: any point)
        raise ``raises`` (an exception instance, class or factory)."""
        return self.fail(POINT_OP, path=name, nth=nth, times=times, raises=raises)

    def at_point(self, name: str, effect: Any, nth: int = 1, times: int | None = 1) -> Rule:
        """At fault point ``name`` (an fnmatch pattern), the nth matching hit and the
        ``times - 1`` after it: raise ``effect`` when it is an exception, else call
        ``effect(name)`` there (e.g. to wait for another thread)."""
        if isinstance(effect, BaseException):
            return self.fail_point(name, raises=effect, nth=nth, times=times)
        rule = self.fail_point(name, nth=nth, times=times)
        rule.effect = effect
        return rule

    def clear(self) -> None:
        """Remove every rule (calls go straight to the OS again)."""
        with self._lock:
            self.rules.clear()

    # ---- logs --------------------------------------------------------------------------
    def mark(self, label: str, info: Any = None) -> Event:
        """Put a test mark in the event stream (e.g. ``mark("ack", txid)``)."""
        with self._lock:
            ev = Event(self._next(), "mark", label=label, info=info)
            self.events.append(ev)
        return ev

    def now(self) -> int:
        """The last sequence number handed out (calls and events share one counter): pass
        it as ``after=`` to ``calls_to`` to look only at what happens from here on."""
        with self._lock:
            return self._last_seq

    def _next(self) -> int:  # call with self._lock held
        self._last_seq = next(self._seq)
        return self._last_seq

    def calls_to(self, ops, path: str | None = None, fd: int | None = None,
                 after: int = 0) -> list[Call]:
        """Logged calls of ``ops`` (a name or tuple), optionally on a path pattern / fd,
        with a sequence number greater than ``after``."""
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        probe = Rule(ops, path=path)
        with self._lock:
            calls = list(self.calls)
        return [c for c in calls if c.seq > after and c.op in ops
                and (fd is None or c.fd == fd) and probe.matches(c.op, (c.path, c.dst))]

    def writes(self, path: str | None = None) -> list[Event]:
        return [e for e in self.events if e.op == "pwrite"
                and (path is None or Rule(("pwrite",), path=path).matches("pwrite", (e.path,)))]

    def syncs(self) -> list[Event]:
        return [e for e in self.events if e.op in SYNC_OPS]

    def path_of(self, fd: int) -> str | None:
        p = self._fd_paths.get(fd)
        if p is None:
            try:
                p = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return None
        return p

    # ---- the machinery -----------------------------------------------------------------
    def _check(self, op: str, paths: tuple, call: Call) -> Rule | None:
        """Log the call; return the rule that makes it fail, if any."""
        with self._lock:
            call.seq = self._next()
            self.calls.append(call)
            firing = [r for r in self.rules if r.matches(op, paths) and r.should_fail()]
            for rule in firing:  # every rule counts every call it matches
                rule.failed_calls.append(call)
            if firing:
                call.error = firing[0].error
                call.injected = True
                return firing[0]  # the oldest firing rule decides errno and partial
        return None

    @staticmethod
    def _raise(rule: Rule, path: str | None, op: str = "open"):
        raise rule.exception(op, path)

    def _event(self, **kw) -> Event | None:
        if not self.record:
            return None
        with self._lock:
            ev = Event(self._next(), **kw)
            self.events.append(ev)
        return ev

    def _sync(self, op: str, fd: int | None, path: str | None, real) -> None:
        call = Call(0, op, path, fd=fd)
        rule = self._check(op, (path,), call)
        if rule is not None:
            self._event(op=op, path=path, fd=fd)  # a failed sync: done_seq stays None
            self._raise(rule, path)
        ev = self._event(op=op, path=path, fd=fd)
        try:
            real()
        except OSError as e:
            call.error = e.errno
            raise
        if ev is not None:
            with self._lock:
                ev.done_seq = self._next()

    # ---- the OSBackend interface -------------------------------------------------------
    def open(self, path: str, flags: int, mode: int) -> int:
        real, path = path, real_path(path)
        call = Call(0, "open", path)
        rule = self._check("open", (path,), call)
        if rule is not None:
            self._raise(rule, path)
        try:
            fd = super().open(real, flags, mode)
        except OSError as e:
            call.error = e.errno
            raise
        call.fd = fd
        with self._lock:
            self._fd_paths[fd] = path
        if flags & (os.O_CREAT | os.O_TRUNC):
            self._event(op="open", path=path, flags=flags, fd=fd)
        return fd

    def pwrite(self, fd: int, data, offset: int) -> int:
        path = self.path_of(fd)
        size = len(data)
        call = Call(0, "pwrite", path, fd=fd, offset=offset, size=size)
        rule = self._check("pwrite", (path,), call)
        if rule is not None:
            n = 0
            if rule.partial:
                part = bytes(data[: min(rule.partial, size)])
                n = super().pwrite(fd, part, offset)
                self._event(op="pwrite", path=path, offset=offset, data=part[:n], fd=fd)
            try:
                self._raise(rule, path)
            except OSError as e:  # a short write, then the error: say how much was written
                e.written = n     # (as fileio.pwrite_all does when a later call fails)
                raise
        try:
            n = super().pwrite(fd, data, offset)
        except OSError as e:
            call.error = e.errno
            raise
        self._event(op="pwrite", path=path, offset=offset, data=bytes(data[:n]), fd=fd)
        return n

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd, self.path_of(fd), lambda: OSBackend.fsync(self, fd))

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd, self.path_of(fd), lambda: OSBackend.fdatasync(self, fd))

    def write_back(self, fd: int, offset: int, length: int) -> bool:
        """Logged and failable; no event recorded (it makes nothing durable)."""
        path = self.path_of(fd)
        call = Call(0, "write_back", path, fd=fd, offset=offset, size=length)
        rule = self._check("write_back", (path,), call)
        if rule is not None:
            self._raise(rule, path)
        try:
            return super().write_back(fd, offset, length)
        except OSError as e:
            call.error = e.errno
            raise

    def fsync_dir(self, path: str) -> None:
        self._sync("fsync_dir", None, real_path(path), lambda: OSBackend.fsync_dir(self, path))

    def syncfs(self, path: str) -> None:
        self._sync("syncfs", None, real_path(path), lambda: OSBackend.syncfs(self, path))

    def rename(self, src: str, dst: str) -> None:
        real_src, real_dst = src, dst
        src, dst = real_path(src), real_path(dst)
        call = Call(0, "rename", src, dst=dst)
        rule = self._check("rename", (src, dst), call)
        if rule is not None:
            self._raise(rule, src)
        try:
            super().rename(real_src, real_dst)
        except OSError as e:
            call.error = e.errno
            raise
        with self._lock:
            for fd, p in self._fd_paths.items():
                if p == src:
                    self._fd_paths[fd] = dst
        self._event(op="rename", path=src, dst=dst)

    def lmdb_io(self, op: str, path: str) -> None:
        """Before an LMDB commit or sync: logged as ``lmdb_<op>``; may raise."""
        self._injected(f"lmdb_{op}", path)

    def fault_point(self, name: str) -> None:
        """A named place in walstore: logged as ``fault_point`` (path = name); may raise."""
        self._injected(POINT_OP, name)

    def _injected(self, op: str, path: str) -> None:
        call = Call(0, op, path)
        rule = self._check(op, (path,), call)
        if rule is not None and rule.effect is not None:
            rule.effect(path)  # an action at the place, not a failure
            return
        if rule is not None:
            exc = rule.exception(op, path)
            call.raised = type(exc).__name__
            call.error = rule.error if rule.raises is None else None
            raise exc

    def point_hits(self, name: str | None = None) -> dict[str, int]:
        """How many times each fault point (matching ``name``) was hit so far."""
        hits: dict[str, int] = {}
        for c in self.calls_to(POINT_OP, path=name):
            hits[c.path] = hits.get(c.path, 0) + 1
        return hits

    def unlink(self, path: str) -> None:
        real, path = path, real_path(path)
        call = Call(0, "unlink", path)
        rule = self._check("unlink", (path,), call)
        if rule is not None:
            self._raise(rule, path)
        try:
            super().unlink(real)
        except OSError as e:
            call.error = e.errno
            raise
        self._event(op="unlink", path=path)


def real_path(path: str) -> str:
    """``path`` as the file system names it: walstore names a directory it holds open
    (a workspace file's parent, pinned against a symlink swapped in) through
    ``/proc/self/fd/N``; the calls are logged, matched by rules and recorded under the
    directory's own path, as before the pinning."""
    if not isinstance(path, str) or not path.startswith("/proc/self/fd/"):
        return path
    num, _, tail = path[len("/proc/self/fd/"):].partition("/")
    try:
        base = os.readlink(f"/proc/self/fd/{num}")
    except OSError:
        return path
    return base + "/" + tail if tail else base


@contextlib.contextmanager
def installed(backend: OSBackend) -> Iterator[OSBackend]:
    """Install ``backend`` as walstore's I/O backend for the ``with`` block."""
    previous = fileio.set_backend(backend)
    try:
        yield backend
    finally:
        fileio.set_backend(previous)


__all__ = ["FaultBackend", "Rule", "Call", "Event", "installed", "OPS", "SYNC_OPS", "LMDB_OPS",
           "POINT_OP", "ALL_OPS", "DIR_OPS", "LMDB_TABLES_OP"]
