"""Fault injection and I/O recording for walstore tests: a ``walstore.fileio`` backend.

This module owns the test-side half of the I/O seam (``walstore.fileio.set_backend``):
``FaultBackend`` passes every call on to the real OS (it subclasses ``OSBackend``) and can

* **fail** the Nth matching ``open`` / ``pwrite`` / ``fsync`` / ``fdatasync`` /
  ``fsync_dir`` / ``rename`` / ``unlink`` with an errno (ENOSPC, EIO, ...), selected by
  operation, path pattern and call count (``fail``); a failing pwrite can first write a
  prefix of its bytes (``partial=``), as a short write followed by an error does;
* **log** every call (``calls``: op, path, fd, ok or errno), so a test can assert, e.g.,
  that a failed fsync was never retried on that descriptor;
* **record** (``record=True``) every write with its bytes and every sync / rename /
  unlink / open-with-truncate in order (``events``), plus test marks (``mark``), the raw
  material for building power-loss images of the files;
* reach the seam's two other hooks: make an LMDB ``commit`` / ``sync`` raise
  ``lmdb.Error`` (``fail_lmdb``), and act at a named place of the commit pipeline, e.g.
  ``"commit.after_durable"`` (``at_point``: raise an exception, or call a function there).

It does not decide what a crash leaves behind and never touches walstore's code: it is
installed with ``installed(backend)`` (or ``fileio.set_backend``) and removed afterwards.
Only I/O that walstore routes through ``walstore.fileio`` is seen (LMDB's own I/O only as
the ``lmdb_commit`` / ``lmdb_sync`` calls walstore announces before it).

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
    with installed(fb):
        ...
    assert rule.fired == 1
"""
from __future__ import annotations

import contextlib
import errno as _errno
import fnmatch
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from walstore import fileio
from walstore.fileio import OSBackend

OPS = ("open", "pwrite", "fsync", "fdatasync", "fsync_dir", "rename", "unlink")
SYNC_OPS = ("fsync", "fdatasync", "fsync_dir")
LMDB_OPS = ("commit", "sync")  # logged and matched as "lmdb_commit" / "lmdb_sync"
POINT_OP = "point"             # fault_point(name): logged with the name as its path


@dataclass
class Rule:
    """Fail matching calls: the ``nth`` matching call and the ``times - 1`` after it.

    ``ops``: operation names; ``path``: an fnmatch pattern tried against the full path and
    against the base name (None: any path; for ``rename`` the source or the destination);
    ``times``: how many calls fail (None: every one from the nth on, until removed);
    ``partial``: for pwrite, write this many bytes of the data before raising.
    Rules are independent: each counts every call it matches; when several fire on one
    call, the oldest rule gives the errno and ``partial``.
    """

    ops: tuple
    error: int = _errno.EIO
    path: str | None = None
    nth: int = 1
    times: int | None = 1
    partial: int | None = None
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


@dataclass
class PointRule(Rule):
    """A rule on a named place (``at_point``): ``effect`` is raised when it is an exception,
    else called with the place's name."""

    effect: Any = None


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
             times: int | None = 1, partial: int | None = None) -> Rule:
        """Arm a rule (see :class:`Rule`); ``ops`` is one op name or a tuple of them.

        Counting starts now: ``nth=1`` fails the next matching call.
        """
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown operation(s) {sorted(unknown)}; known: {OPS}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        rule = Rule(ops, error, path, nth, times, partial)
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail_lmdb(self, op: str = "commit", path: str | None = None, nth: int = 1,
                  times: int | None = 1) -> Rule:
        """Make the nth matching LMDB ``commit`` or ``sync`` (``op``; ``path``: a pattern for
        the LMDB environment's directory) raise ``lmdb.Error``, before LMDB does it."""
        if op not in LMDB_OPS:
            raise ValueError(f"unknown LMDB operation {op!r}; known: {LMDB_OPS}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        rule = Rule((f"lmdb_{op}",), _errno.EIO, path, nth, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def at_point(self, name: str, effect, nth: int = 1, times: int | None = 1) -> PointRule:
        """At ``fault_point(name)`` (``name``: an fnmatch pattern), the nth matching time and
        the ``times - 1`` after it: raise ``effect`` if it is an exception, else call
        ``effect(name)`` (e.g. to wait there for another thread)."""
        if nth < 1:
            raise ValueError("nth counts from 1")
        rule = PointRule((POINT_OP,), _errno.EIO, name, nth, times, effect=effect)
        with self._lock:
            self.rules.append(rule)
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
    def _raise(rule: Rule, path: str | None):
        raise OSError(rule.error, os.strerror(rule.error), path)

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
        call = Call(0, "open", path)
        rule = self._check("open", (path,), call)
        if rule is not None:
            self._raise(rule, path)
        try:
            fd = super().open(path, flags, mode)
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
            if rule.partial:
                part = bytes(data[: min(rule.partial, size)])
                n = super().pwrite(fd, part, offset)
                self._event(op="pwrite", path=path, offset=offset, data=part[:n], fd=fd)
            self._raise(rule, path)
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

    def fsync_dir(self, path: str) -> None:
        self._sync("fsync_dir", None, path, lambda: OSBackend.fsync_dir(self, path))

    def rename(self, src: str, dst: str) -> None:
        call = Call(0, "rename", src, dst=dst)
        rule = self._check("rename", (src, dst), call)
        if rule is not None:
            self._raise(rule, src)
        try:
            super().rename(src, dst)
        except OSError as e:
            call.error = e.errno
            raise
        with self._lock:
            for fd, p in self._fd_paths.items():
                if p == src:
                    self._fd_paths[fd] = dst
        self._event(op="rename", path=src, dst=dst)

    def unlink(self, path: str) -> None:
        call = Call(0, "unlink", path)
        rule = self._check("unlink", (path,), call)
        if rule is not None:
            self._raise(rule, path)
        try:
            super().unlink(path)
        except OSError as e:
            call.error = e.errno
            raise
        self._event(op="unlink", path=path)

    def lmdb_io(self, op: str, path: str) -> None:
        call = Call(0, f"lmdb_{op}", path)
        if self._check(f"lmdb_{op}", (path,), call) is not None:
            import lmdb  # walstore's own dependency; imported only when a rule fires
            raise lmdb.Error(f"injected LMDB {op} failure ({path})")

    def fault_point(self, name: str) -> None:
        call = Call(0, POINT_OP, name)
        rule = self._check(POINT_OP, (name,), call)
        if rule is None:
            return
        effect = getattr(rule, "effect", None)
        if isinstance(effect, BaseException):
            raise effect
        if effect is not None:
            effect(name)


@contextlib.contextmanager
def installed(backend: OSBackend) -> Iterator[OSBackend]:
    """Install ``backend`` as walstore's I/O backend for the ``with`` block."""
    previous = fileio.set_backend(backend)
    try:
        yield backend
    finally:
        fileio.set_backend(previous)


__all__ = ["FaultBackend", "Rule", "PointRule", "Call", "Event", "installed", "OPS",
           "SYNC_OPS", "LMDB_OPS", "POINT_OP"]
