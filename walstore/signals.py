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
SIGILL, SIGABRT, SIGTRAP, SIGSYS) are never blocked.  The mask is the main thread's: a
signal it blocks goes to another thread if one runs that does not block it, and CPython
then runs the main thread's handler anyway — so while such threads run
(``_other_threads``) the section also puts a stand-in in place of the Python handlers,
which notes the signal; the section's end lets the signals in (one sent to the process
inside it comes in there, to this thread, not later through another), then gives the
handlers back and raises the noted signals with the signals blocked again, so the kernel
holds them pending and they come in with the mask, together: a handler that raises
leaves the others to CPython, which runs them at its next check, not to a list of ours a
second exception could cut short.

The same exception can land between a lock's acquisition and the ``with`` block that
would release it, when the lock is taken through a Python ``__enter__``: a
``threading.Condition``'s or an ``Event``'s (``Event.set`` enters one).  The handler runs
at the check after the C acquire returns, the block never begins, and the lock stays held
for ever (a probe: the applier and then ``close()`` waited on the applier's wake-up
condition, 1 in 7 runs of a 20-300 µs timer under load).  So code a main thread may run
takes a condition's lock by a ``with`` on the C lock itself (no check between the
acquire and the block) and calls ``notify``/``wait`` inside it, and uses ``Flag`` below
where it would use an ``Event``.

Two more habits follow from the same fact: a descriptor is forgotten before it is closed
(``fd, self.fd = self.fd, -1`` then ``os.close(fd)``: the other order let an interrupt
between them close the number twice, perhaps another thread's file by then), and what
must follow a step that already happened (the ABORT and the transaction's end, a
compensation that ran and its record, a file put back and its record) is written in one
deferred section or is picked up again by the code that catches the interrupt.
``tests/test_interrupt_points.py`` raises an interrupt at every point a handler could run
and holds these to account.
"""
from __future__ import annotations

import _signal
import os
import signal
import sys
import threading
import time

_SYNCHRONOUS = {getattr(signal, n) for n in ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS",
                                              "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP",
                                              "SIGSYS") if hasattr(signal, n)}
ASYNCHRONOUS = frozenset(signal.valid_signals()) - _SYNCHRONOUS
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")
_ident = threading.get_ident
_MAIN = [threading.main_thread().ident]  # the thread that runs signal handlers (see fork)


def _forked() -> None:
    global _OWN_LOCK
    # (up to the section's reset, no call: a handler raising in the child as this runs --
    # a Ctrl-C to the process group just after a fork -- skipped what followed it: the
    # parent's noted signals raised again in the child at its next section's end, or the
    # parent's main thread still recorded and its section still open in the child, whose
    # stand-ins then noted every Ctrl-C for good and whose sections did nothing)
    _OWN[0] = 0  # (the forking thread alone goes on in the child)
    _TASKS[0] = -1.0
    del _HELD[:]  # (the parent's signals, delivered to the parent)
    # (the child's main thread, the one that forked, as threading's own at-fork hook --
    # run before this one -- recorded it)
    me = threading._main_thread._ident  # type: ignore[attr-defined]
    # (the main thread forked inside a section: the child goes on inside it and ends it,
    # giving its handlers back; reset, the section's end did nothing in the child and the
    # stand-ins stayed in place for good -- every later Ctrl-C noted, never delivered)
    in_section = _DEFERRED.depth != 0 and me == _MAIN[0]
    _MAIN[0] = me
    saved = _DEFERRED.saved
    if not in_section:  # (another thread forked: the main thread's section is not the
        _DEFERRED.depth, _DEFERRED.old, _DEFERRED.saved = 0, None, []  # child's; its
        # stand-ins are given back below -- or, cut short, by the first signal they take)
    _OWN_LOCK = threading.Lock()  # (one a parent's thread held at the fork — one of ours
    # starting or ending — stayed held: every thread the child started hung at its start)
    if not in_section:
        for sig, handler in reversed(saved):
            try:
                if signal.getsignal(sig) is _stand_in:  # (one the program installed in
                    signal.signal(sig, handler)  # the section stays, as at its end)
            except (ValueError, OSError):  # (not the main interpreter: nothing to give)
                break


os.register_at_fork(after_in_child=_forked)


def _libc_sigmask():
    """``pthread_sigmask`` through ctypes with a prebuilt mask (glibc/musl on Linux: a
    sigset_t of 1,024 bits, SIG_BLOCK 0, SIG_SETMASK 2): two calls cost about 1 µs,
    where ``signal.pthread_sigmask`` costs 70 µs (it turns each mask into a set of
    ``Signals`` objects).  None elsewhere (the stdlib call is used)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        # (PyDLL: the call keeps the GIL -- a CDLL call let it go and took it back, twice
        # a commit, handing it to any thread that waited; no errno kept: it returns it)
        fn = ctypes.PyDLL(None).pthread_sigmask
    except (OSError, AttributeError):
        return None
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = 1024 // bits
    block, old = (ctypes.c_ulong * words)(), (ctypes.c_ulong * words)()
    for sig in ASYNCHRONOUS:
        block[(sig - 1) // bits] |= 1 << ((sig - 1) % bits)
    return fn, block, old


_LIBC = _libc_sigmask()


def _block():
    """Block the asynchronous signals in this thread; returns what ``_restore`` takes."""
    if _LIBC is not None:
        fn, block, old = _LIBC
        fn(0, block, old)  # SIG_BLOCK
        return old
    return signal.pthread_sigmask(signal.SIG_BLOCK, _FEW)


def _restore_after_failure(old) -> None:
    """Undo ``_block`` when a handler raised in it or right after it (``old`` None: its
    result never arrived).  ctypes: the C call wrote the mask before it into the one
    buffer (or, cut short before it ran, the buffer holds the mask of the last section's
    start, the same); the stdlib call: the few signals it blocked are let in again."""
    if _LIBC is not None:
        _LIBC[0](2, _LIBC[2], None)
    elif old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FEW)


def _restore(old) -> None:
    if _LIBC is not None:
        _LIBC[0](2, old, None)  # SIG_SETMASK
    else:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# without ctypes: the signals programs install handlers for (a mask of every signal costs
# the stdlib call 70 µs a section; these few, 6 µs)
_FEW = frozenset(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGALRM", "SIGHUP",
                                              "SIGUSR1", "SIGUSR2", "SIGQUIT", "SIGVTALRM",
                                              "SIGPROF") if hasattr(signal, n))


def _run_pending() -> None:
    """Run the handlers of signals that arrived just before the mask was set, now, before
    the section begins (the stdlib ``pthread_sigmask`` does so itself; a ctypes call does
    not, and a plain Python call was not enough: a probe saw handlers run inside)."""
    if _CHECK_SIGNALS is not None:
        _CHECK_SIGNALS()  # (raises what a handler raised)


def _check_signals():
    try:
        import ctypes
        fn = ctypes.pythonapi.PyErr_CheckSignals  # (PyDLL: an exception set is raised)
        fn.restype = ctypes.c_int
        fn.argtypes = ()
        return fn
    except (ImportError, AttributeError):
        return None


_CHECK_SIGNALS = _check_signals() if _LIBC is not None else None


# walstore's own threads running with the asynchronous signals blocked (start_thread)
_OWN = [0]
_OWN_LOCK = threading.Lock()
_HELD: list[int] = []  # signals a section's stand-in handler took (see _hold_handlers)
_REPLACED: dict = {}  # signal -> the handler its stand-in last stood in for


def _other_threads() -> bool:
    """Does a thread run that may take a process-directed signal: one not started by
    ``start_thread`` (the program's, a library's pool, walstore's shipper)?  The kernel
    gives a signal the main thread blocks to such a thread, and CPython then runs the
    main thread's handler at its next bytecode anyway — inside the section: the mask
    alone held nothing off (seen under pytest-xdist, whose worker runs I/O threads: a
    Ctrl-C inside a purge's LMDB swap left the store unreadable).  Counted from
    ``threading``'s tables and from the kernel's (``/proc/self/task``, read at most every
    0.1 s: threads started by ``_thread`` or C code, as execnet's, are in no table)."""
    known = len(_active) + len(_limbo)
    if known == _TASKS[2] and _OWN[0] == _TASKS[3] and _monotonic() < _TASKS[0]:
        return _TASKS[1]  # (as at the last count: the commit path pays ~0.1 µs)
    answer = max(_os_threads(), known) > 1 + _OWN[0]
    _TASKS[1:] = [answer, known, _OWN[0]]
    return answer


# the last count: (monotonic time it holds until, its answer, threading's tables then,
# walstore's own threads then)
_TASKS: list = [-1.0, False, -1, -1]
_active = threading._active  # type: ignore[attr-defined]  # (threading's tables: the same
_limbo = threading._limbo  # type: ignore[attr-defined]  # dicts for the process's life)
_monotonic = time.monotonic


def _os_threads() -> int:
    """The process's threads, from the kernel (read at most every 0.1 s)."""
    _TASKS[0] = time.monotonic() + 0.1
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1  # (no /proc: threading's tables alone)


def _stand_in(signum: int, frame) -> None:
    if _DEFERRED.depth or _DEFERRED.saved:  # (in a section, or handlers to give back)
        _HELD.append(signum)  # (noted first: a handler raising at the walk's call or
        # its loop, before the note, dropped this signal -- its handler never ran)
        if _DEFERRED.depth or _ending(frame):  # (in a section, or in its end, which
            return  # gives the handlers back and raises it)
        # (a section's end cut short before it gave the handlers back -- an exception at
        # its give-back's first line: they stayed in place, and this signal was noted and
        # delivered only when some later section ended, a Ctrl-C of the idle program lost
        # meanwhile): given back now, this signal raised again with any the section noted
        _give_back_blocked(_DEFERRED.saved)
        return
    # in place outside any section, never to be given back (a program read it with
    # ``signal.getsignal`` inside a section and put it back after it): the handler it
    # stood in for goes back and takes the signal now (before, it noted the signal and
    # stayed: a Ctrl-C waited for the next section, whose end raised it into the stand-in
    # again, for ever -- a hang)
    _give_back_one(signum)
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # (its default action: the process ends)


def _ending(frame) -> bool:
    """Is ``frame`` (where a stand-in's signal landed) inside a section's give-back?
    Asked only by a stand-in outside any section with handlers to give back (never by
    the commit path).  ``__exit__`` alone is not: a stand-in that takes a signal there
    (at the mask's restore, or as a give-back cut short lets the signals in) gives back
    itself -- taken for an end still to give back, it noted the signal and returned
    after a give-back cut short: the signal and the stand-ins stayed."""
    while frame is not None:
        if frame.f_code is _END:
            return True
        frame = frame.f_back
    return False


def _hold_handlers(saved: list) -> None:
    """With other threads running: the Python handlers of the signals programs install
    handlers for, replaced by a stand-in that notes the signal (the originals come back
    at the section's end and the noted signals are raised again then).  Each original
    goes into ``saved`` before its swap: a handler that raises between two swaps leaves
    the caller the list of what to give back (the stand-in stayed in place of SIGINT's
    for good).  Costs two ``signal.signal`` calls per handler (~6 µs), paid only when
    such threads run.

    A stand-in found in place as a section begins was left there (a program read it with
    ``signal.getsignal`` inside a section and put it back after it): the handler it stood
    in for comes back at this section's end (before, it stayed for good, and the section's
    end raised each signal it took into it again, for ever: a hang)."""
    for sig in _FEW:
        handler = signal.getsignal(sig)
        if handler is _stand_in:
            if sig in _REPLACED:
                saved.append((sig, _REPLACED[sig]))
        elif callable(handler):
            _REPLACED[sig] = handler
            saved.append((sig, handler))
            signal.signal(sig, _stand_in)


def _give_back_handlers(saved: list) -> None:
    """The section ended: the original handlers back, then each signal the stand-in took
    raised again in this thread (its signals still blocked, by a section's end or by
    ``_give_back_blocked``: pending in the kernel, delivered as the mask comes off).  A
    handler that raises (a Ctrl-C's KeyboardInterrupt: one taken in the section, or one
    landing here, the handlers being back) stops neither: every handler still comes back
    and every signal taken still reaches its handler, then the last exception is raised
    (a SIGTERM taken with a Ctrl-C was dropped, and a stand-in left in place for good).
    A handler the program installed inside the section stays (it was replaced by the one
    the stand-in stood in for: the program's handler gone for good)."""
    raised = None
    while saved or _HELD:
        try:
            while saved:
                entry = saved[-1]
                if signal.getsignal(entry[0]) is _stand_in:  # (not one the program put
                    signal.signal(*entry)  # in its place inside the section: kept)
                if saved and saved[-1] is entry:  # (a handler that ran meanwhile may
                    saved.pop()  # have begun and ended a section: one list, given back)
            while _HELD:
                if signal.getsignal(_HELD[0]) is _stand_in:  # (still in place: raised into
                    _give_back_one(_HELD[0])  # it, it would note it again, for ever)
                # (taken off and raised with no call between, where another handler
                # could raise: ``raise_signal(_HELD.pop(0))`` dropped it when one did
                # at the pop's return; a handler raising after the raise, its own, must
                # not find it still listed: raised again, it ran twice)
                sig = _HELD[0]
                del _HELD[0]
                signal.raise_signal(sig)
        except BaseException as e:  # noqa: B036 (a handler's: raised once all is given back)
            raised = e
            if e.__class__ is RecursionError:  # (too deep to call ``signal.getsignal``:
                break  # retried, it spun here for good -- a stand-in's Ctrl-C in deep
                # recursion hung the program; what is left goes back at the next section's
                # end or the next signal a stand-in takes)
    if raised is not None:
        raise raised


def _give_back_blocked(saved: list) -> None:
    """A give-back (a section's end, once its mask is off; a stand-in's, outside any
    section) with the signals blocked, so the noted ones go back to the kernel, pending,
    and come in together as the mask comes off.  (With the mask off, a held handler
    raised in the give-back, then a Ctrl-C at its loop's back edge -- SIGINT's handler
    back by then -- left the rest in ``_HELD``, every handler back: never delivered to
    the idle program.)  A mask buffer of its own: the one buffer may be a section's,
    still to be restored (a stand-in taking a signal in a section's ``__enter__``), and a
    handler running in the give-back may begin and end a section (a commit)."""
    if _LIBC is not None:
        fn, block, _ = _LIBC
        old = type(block)()
        try:  # (no point a handler runs at between here and the call's return)
            fn(0, block, old)  # SIG_BLOCK
            _give_back_handlers(saved)
        finally:
            fn(2, old, None)  # SIG_SETMASK (the noted signals come in here)
    elif _CAN_BLOCK:  # (the C calls: ``signal.pthread_sigmask`` is a Python function,
        # whose call raised RecursionError where a stand-in took a signal a few frames
        # short of the limit -- the mask's restore never made: blocked for good)
        old = None
        try:
            old = _signal.pthread_sigmask(signal.SIG_BLOCK, _FEW)
            _give_back_handlers(saved)
        finally:  # (``old`` None: a pending handler raised in the block's call)
            if old is not None:
                _signal.pthread_sigmask(signal.SIG_SETMASK, old)
            else:
                _signal.pthread_sigmask(signal.SIG_UNBLOCK, _FEW)
    else:
        _give_back_handlers(saved)


def _give_back_one(sig: int) -> None:
    """The handler ``sig``'s stand-in stood in for put back (the default one if none is
    known)."""
    default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    signal.signal(sig, _REPLACED.get(sig, default))


class _Deferred:
    """The context manager ``deferred()`` returns (one object, reentrant per thread:
    only the main thread's outermost section does anything)."""

    __slots__ = ("depth", "old", "saved")

    def __init__(self) -> None:
        self.depth = 0
        self.old = None
        self.saved: list = []

    def __enter__(self) -> None:
        if _ident() != _MAIN[0]:
            return
        if self.depth:
            self.depth += 1
            return
        self.depth = 1  # (first: a handler that runs below and uses the store nests)
        if _CAN_BLOCK:
            try:
                # (``_block`` and ``_run_pending`` written out: every commit comes here)
                if _LIBC is not None:
                    fn, block, old = _LIBC
                    fn(0, block, old)  # SIG_BLOCK
                    self.old = old  # (one buffer: never blocked again while it is held)
                else:
                    self.old = signal.pthread_sigmask(signal.SIG_BLOCK, _FEW)
                if _CHECK_SIGNALS is not None:  # (a handler pending from before runs
                    _CHECK_SIGNALS()  # now, before the section)
            except BaseException:  # (a handler raised: the section never began)
                old, self.old = self.old, None
                self.depth = 0
                _restore_after_failure(old)
                raise
        try:  # (the count too: with the mask set, another thread may take a signal now)
            # (``_other_threads``'s cached answer written out, its call when stale)
            if (len(_active) + len(_limbo) == _TASKS[2] and _OWN[0] == _TASKS[3]
                    and _monotonic() < _TASKS[0]):
                others = _TASKS[1]
            else:
                others = _other_threads()
            if others:
                _hold_handlers(self.saved)  # (filled as it swaps)
        except BaseException:  # (a handler raised, in the count or between two swaps: undo)
            self.depth = 1  # (the whole section ends, whatever a handler nested meanwhile)
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if not self.depth or _ident() != _MAIN[0]:
            return
        self.depth -= 1
        if not self.depth:
            old, self.old = self.old, None
            try:
                if old is not None:
                    if _LIBC is not None:
                        _LIBC[0](2, old, None)  # SIG_SETMASK (pending ones run after this)
                    else:
                        signal.pthread_sigmask(signal.SIG_SETMASK, old)
            finally:  # (a handler no stand-in replaced -- a SIGWINCH's -- raising as the
                # signals came in lost the list: the stand-ins stayed for good, a Ctrl-C
                # noted and never delivered.  Emptied as it is given back: what a handler
                # cut short before its call is given back at the next section's end.
                # With the signals blocked again, not kept blocked through it: the mask
                # comes off at once, so a signal sent to the process in the section comes
                # in here, to this thread -- kept on through the give-back, another
                # thread took it meanwhile and its handler ran after the section, at
                # some later point of the program, 1 time in 5 with an I/O thread)
                if self.saved or _HELD:
                    _give_back_blocked(self.saved)


_DEFERRED = _Deferred()
_END = _give_back_handlers.__code__  # (see _ending)


def deferred() -> _Deferred:
    """Hold asynchronous signals off for a ``with`` block (see the module docstring)."""
    return _DEFERRED


class Flag:
    """``threading.Event``'s job (``set``, ``clear``, ``is_set``, ``wait``) without its
    Python-level lock entry (see the module docstring).  Its lock is reentrant, so a
    signal handler may ``set`` a Flag the interrupted code was waiting on or setting."""

    __slots__ = ("_lock", "_cond", "_flag")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._lock:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """Until set or ``timeout`` seconds have passed; returns whether it is set."""
        with self._lock:
            if not self._flag:
                self._cond.wait(timeout)
            return self._flag


def start_thread(thread: threading.Thread) -> None:
    """Start one of walstore's own threads with the asynchronous signals blocked in it (a
    thread inherits the mask of the thread that starts it): the kernel then gives a
    process-directed signal (a timer's SIGALRM, a terminal's SIGINT) to a thread that runs
    the program's code, never to ours, and one our thread took cannot make the main
    thread's handler run inside a section ``deferred()`` holds.  Only for threads that
    run walstore's own code (the applier, the spare, the flusher): a process started from
    such a thread would inherit the mask (a shell's ``wait`` never sees its SIGCHLD), so
    the replication shipper and LangGraph's TTL sweeper, which run boto3 and the
    program's code, start as plain threads."""
    if not _CAN_BLOCK:
        thread.start()
        return
    run = thread.run

    def counted_run() -> None:  # (counted while it runs: see _other_threads)
        with _OWN_LOCK:
            _OWN[0] += 1
        try:
            run()
        finally:
            with _OWN_LOCK:
                _OWN[0] -= 1

    thread.run = counted_run  # type: ignore[method-assign]
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNCHRONOUS)  # (rare: the stdlib call)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
