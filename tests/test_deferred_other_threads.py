"""``signals.deferred()`` holds a Ctrl-C off also while other threads run.

The section blocked the asynchronous signals in the main thread only.  A process-directed
signal (a terminal's SIGINT, a timer's SIGALRM) that the main thread blocks goes to any
other thread that does not — the program's, a library's pool, walstore's replication
shipper, pytest-xdist's I/O threads — and CPython then runs the main thread's Python
handler at its next bytecode anyway: inside the section.  Seen under pytest-xdist: a
Ctrl-C inside a purge's LMDB swap left the store unreadable.  With such threads running,
a section now also stands in for the Python handlers and raises what it took just after.
"""
from __future__ import annotations

import _thread
import os
import signal
import threading
import time

import pytest

from walstore import signals


def _interrupt_inside_a_section() -> list[str]:
    """SIGINT sent to the process inside a deferred section; what happened, in order."""
    seen = []
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(200_000):  # (bytecodes: a handler would run among them)
                    pass
                time.sleep(0.05)
                seen.append("section ended")
        except KeyboardInterrupt:
            seen.append("interrupt")
        if "interrupt" not in seen:
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:
                seen.append("interrupt")
    finally:
        signal.signal(signal.SIGINT, old)
    return seen


@pytest.mark.parametrize("how", ["threading", "_thread"])
def test_a_ctrl_c_waits_for_the_section_with_another_thread_running(how):
    stop = threading.Event()
    done = threading.Event()

    def idle():
        stop.wait(10)
        done.set()

    if how == "threading":
        t = threading.Thread(target=idle, daemon=True)
        t.start()
    else:  # (no threading table knows it: as execnet's or a C extension's threads)
        _thread.start_new_thread(idle, ())
        signals._TASKS[0] = -1.0  # (the kernel's count is read at most every 0.1 s)
    try:
        time.sleep(0.01)
        for _ in range(5):
            assert _interrupt_inside_a_section() == ["section ended", "interrupt"]
    finally:
        stop.set()
        done.wait(5)


def test_the_handlers_are_the_programs_again_after_a_section():
    t = threading.Thread(target=time.sleep, args=(0.5,), daemon=True)
    t.start()
    mine = lambda signum, frame: None  # noqa: E731
    old = signal.signal(signal.SIGUSR1, mine)
    try:
        with signals.deferred():
            assert signal.getsignal(signal.SIGUSR1) is signals._stand_in
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, old)
        t.join()
