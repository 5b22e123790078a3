"""Sections an asynchronous signal must not cut short.

Python runs a signal's handler (KeyboardInterrupt for SIGINT, whatever a program installs
for SIGALRM or SIGTERM) in the main thread, between two bytecodes, wherever that thread
happens to be.  A few sections of walstore must not be left half done by such an
exception: from the moment a commit record may reach the log until the transaction knows
it committed (an interrupt there compensated a transaction whose record was durable: a
refund for a charge that stands), and the group commit's leadership (an interrupt there
left the leader's flag set, and every later commit of the process waited for ever).

``deferred()`` blocks the asynchronous signals for the section (``pthread_sigmask``: they
stay pending in the kernel) and lets them in when it ends, where their handlers then run:
the interrupt arrives just after the section instead of inside it.  Only the main thread
runs handlers, so only there is anything done (two system calls); nested sections cost
nothing more.  Signals a program raises itself for faults (SIGSEGV, SIGBUS, SIGFPE,
SIGILL, SIGABRT, SIGTRAP, SIGSYS) are never blocked.
"""
from __future__ import annotations

import signal
import threading

_SYNCHRONOUS = {getattr(signal, n) for n in ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS",
                                              "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP",
                                              "SIGSYS") if hasattr(signal, n)}
ASYNCHRONOUS = frozenset(signal.valid_signals()) - _SYNCHRONOUS
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")
_main = threading.main_thread
_ident = threading.get_ident


def _nothing() -> None:
    """A Python call: the interpreter runs a handler already pending here (a signal that
    arrived just before the mask was set), before the section begins."""


class _Deferred:
    """The context manager ``deferred()`` returns (one object, reentrant per thread:
    only the main thread's outermost section does anything)."""

    __slots__ = ("depth", "old")

    def __init__(self) -> None:
        self.depth = 0
        self.old = None

    def __enter__(self) -> None:
        if _ident() != _main().ident:
            return
        if self.depth:
            self.depth += 1
            return
        if _CAN_BLOCK:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNCHRONOUS)
            try:
                _nothing()  # (a handler pending from before runs now, outside the section)
            except BaseException:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                raise
            self.old = old
        self.depth = 1

    def __exit__(self, *exc) -> None:
        if not self.depth or _ident() != _main().ident:
            return
        self.depth -= 1
        if not self.depth and self.old is not None:
            old, self.old = self.old, None
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # (pending ones run after this)


_DEFERRED = _Deferred()


def deferred() -> _Deferred:
    """Hold asynchronous signals off for a ``with`` block (see the module docstring)."""
    return _DEFERRED


def start_thread(thread: threading.Thread) -> None:
    """Start one of walstore's own threads with the asynchronous signals blocked in it (a
    thread inherits the mask of the thread that starts it): the kernel then gives a
    process-directed signal (a timer's SIGALRM, a terminal's SIGINT) to a thread that runs
    the program's code, never to ours, and one our thread took cannot make the main
    thread's handler run inside a section ``deferred()`` holds."""
    if not _CAN_BLOCK:
        thread.start()
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNCHRONOUS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
