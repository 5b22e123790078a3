"""Audit 69, a review of the signal-section fixes (walstore/signals.py) and the history
pins' give-back (walstore/engine/pins.py).

- ``HistoryPins._give_back``: an interrupt raised as its section ENDS (a signal that
  arrived inside it, its handler run as the signals are let in again) came after the
  count was given back; the loop, taking it for one raised as the section began, gave the
  count back again: with two undos pinning one horizon, the other undo's pin was gone and
  a checkpoint's trim could delete the history it was still reading
  (``test_a_pin_given_back_once_when_an_interrupt_lands_as_its_section_ends``).
- A program's own handler installed inside a section (with another thread running) was
  replaced at the section's end by the handler the stand-in had stood in for: the
  program's handler was gone for good
  (``test_a_handler_installed_inside_a_section_stays_installed_after_it``).
- A handler no stand-in replaces (a SIGWINCH's) raising as a section's end let the
  signals in lost the list of handlers to give back: the stand-in stayed in place of
  SIGINT's for good, a Ctrl-C of the idle program noted and never delivered — one way a
  stand-in is left installed outside any section
  (``test_a_handler_raising_as_a_section_ends_leaves_no_stand_in_in_place``); and the
  fix's list, shared with a section a handler begins meanwhile, must not raise
  (``test_a_handler_beginning_a_section_as_the_handlers_come_back_raises_nothing_foreign``).
- ``store.settled_decision``'s timeout (``test_settled_decision_says_what_a_timeout_must_be``).
"""
from __future__ import annotations

import os
import signal

import pytest

from walstore.engine.pins import HistoryPins

from test_audit69_signals import _run


class _SignalsAtItsRead(dict):
    """The pins' table: its first ``get`` (inside the give-back's section) sends this
    process a real SIGINT, held off until the section ends, where its handler raises."""

    armed = True

    def get(self, key, default=None):
        if self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGINT)
        return dict.get(self, key, default)


def test_a_pin_given_back_once_when_an_interrupt_lands_as_its_section_ends():
    """Two undos pin horizon 5; the second's give-back is interrupted by a Ctrl-C that
    arrived inside its section.  Before the fix the count was taken down twice: the first
    undo's pin was gone (``{}``), a trim free to delete what it still read."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        pins = HistoryPins()
        first, second = pins.hold(lambda: 5), pins.hold(lambda: 5)
        assert first.__enter__() == 5 and second.__enter__() == 5
        pins._held = _SignalsAtItsRead(pins._held)
        with pytest.raises(KeyboardInterrupt):
            second.__exit__(None, None, None)
        assert dict(pins._held) == {5: 1}  # (the first undo's pin still there)
        first.__exit__(None, None, None)
        assert dict(pins._held) == {}
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_handler_installed_inside_a_section_stays_installed_after_it():
    """With another thread running (stand-ins in place), the program installs its own
    SIGINT and SIGTERM handlers inside a section; after it they are the program's (before
    the fix the section's end put the older ones back over them), and a signal reaches
    the program's handler."""
    out = _run(
        "def mine(signum, frame):\n"
        "    print('MINE', signum)\n"
        "with signals.deferred():\n"
        "    signal.signal(signal.SIGINT, mine)\n"
        "    signal.signal(signal.SIGTERM, mine)\n"
        "print('INT', signal.getsignal(signal.SIGINT) is mine)\n"
        "print('TERM', signal.getsignal(signal.SIGTERM) is mine)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.05)\n")
    assert out == ["INT", "True", "TERM", "True", "MINE", str(int(signal.SIGTERM))], out


def test_a_handler_raising_as_a_section_ends_leaves_no_stand_in_in_place():
    """A program's SIGWINCH handler (a signal no stand-in takes) raising as a section's
    end let the signals in (the terminal resized inside the section: placed here by a
    signal sent to the main thread, held off until then): the list of what to give back
    was lost and the stand-in stayed in place of SIGINT's handler for good — a Ctrl-C
    of the idle program after it was noted and never delivered."""
    out = _run(
        "class Resized(Exception):\n"
        "    pass\n"
        "def resized(signum, frame):\n"
        "    raise Resized\n"
        "signal.signal(signal.SIGWINCH, resized)\n"
        "try:\n"
        "    with signals.deferred():\n"
        "        signal.pthread_kill(threading.main_thread().ident, signal.SIGWINCH)\n"
        "except Resized:\n"
        "    print('RESIZED')\n"
        "print('HANDLER', signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('NOT-DELIVERED')\n"
        "except KeyboardInterrupt:\n"
        "    print('DELIVERED')\n")
    assert out == ["RESIZED", "HANDLER", "True", "DELIVERED"], out


def test_a_handler_beginning_a_section_as_the_handlers_come_back_raises_nothing_foreign():
    """A program's SIGUSR1 handler that uses the store (a section of its own) runs as a
    section's end gives the handlers back (placed by a wrapper around ``signal.signal``:
    the signal sent just after SIGUSR1's handler came back).  Its section shares the
    list of handlers to give back; the outer end must neither raise (an IndexError from
    an emptied list, seen while the give-back list stayed the section's own) nor leave a
    stand-in in place."""
    out = _run(
        "ran = []\n"
        "def mine(signum, frame):\n"
        "    with signals.deferred():\n"
        "        ran.append(signum)\n"
        "signal.signal(signal.SIGUSR1, mine)\n"
        "real, armed = signal, [True]\n"
        "class Placing:\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(real, name)\n"
        "    def signal(self, sig, handler):\n"
        "        old = real.signal(sig, handler)\n"
        "        if armed[0] and handler is mine:\n"
        "            armed[0] = False\n"
        "            os.kill(os.getpid(), real.SIGUSR1)\n"
        "            for _ in range(200_000):\n"
        "                pass\n"
        "            time.sleep(0.05)\n"
        "        return old\n"
        "signals.signal = Placing()\n"
        "try:\n"
        "    with signals.deferred():\n"
        "        pass\n"
        "    print('ENDED', ran == [signal.SIGUSR1])\n"
        "except BaseException as e:\n"
        "    print('RAISED', type(e).__name__)\n"
        "signals.signal = real\n"
        "print('INT', signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "print('USR1', signal.getsignal(signal.SIGUSR1) is mine)\n")
    assert out == ["ENDED", "True", "INT", "True", "USR1", "True"], out


@pytest.mark.parametrize("timeout", [None, "5", float("nan"), -1, 10 ** 400])
def test_settled_decision_says_what_a_timeout_must_be(tmp_path, timeout):
    """``store.settled_decision(gid, timeout)`` (new public method): ``None`` (as in
    ``sync_replica``: no limit) and "5" raised ``TypeError: unsupported operand type(s)
    for +: 'float' and 'NoneType'`` naming no parameter, NaN meant no limit and -1 "at
    once" silently, 10**400 an OverflowError.  Now: None and huge numbers wait without
    limit (answered at once here: nothing is being decided), the others are refused
    naming ``timeout``."""
    import walstore
    with walstore.open(str(tmp_path / "s")) as s:
        tx = s.transaction()
        tx.put("a", 1)
        tx.prepare("g1")
        if timeout is None or timeout == 10 ** 400:
            assert s.settled_decision("g1", timeout) == "prepared"
        else:
            with pytest.raises(ValueError, match="timeout must be a number of seconds"):
                s.settled_decision("g1", timeout)
        s.rollback_prepared("g1")
