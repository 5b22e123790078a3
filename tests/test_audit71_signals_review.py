"""Audit 71, review of helper 1's signal change (walstore/signals.py, 9a96c1f).

9a96c1f has a section's end give the handlers back and raise the noted signals while the
mask still blocks them, so a handler that raises leaves the other held signals to
CPython (pending in the kernel) rather than to ``_HELD``, which a second exception at
the give-back loop's back edge could leave stranded.  A stand-in that takes a signal
outside any section, after a section's end was cut short, runs the same give-back: it
still raised the held signals with the mask off, one handler at a time.

- A section's give-back cut short (stand-ins left, SIGUSR1 and SIGTERM held); then the
  idle program takes SIGUSR2, whose stand-in gives everything back: SIGUSR1's handler
  raised, and a Ctrl-C at the give-back's outer back edge left SIGTERM in ``_HELD``,
  the handlers back -- never delivered to the idle program
  (``test_a_held_signal_given_back_by_a_stand_in_is_delivered_wherever_a_back_edge_is_interrupted``).
  The give-back with the signals blocked, where ctypes is not, takes ``_signal``'s C call
  (``test_a_ctrl_c_in_deep_recursion_after_a_cut_short_end_is_delivered_with_the_stdlib_masks``).
- 9a96c1f kept the mask on through a section's give-back: a signal sent to the process
  inside the section was taken meanwhile by another thread, and its handler ran in the
  main thread only at its next GIL switch -- after the section, at some later point of
  the program (``test_a_ctrl_c_inside_a_section_is_raised_as_it_ends_not_after``).  The
  mask now comes off first, as before 9a96c1f, and the give-back blocks the signals again
  around itself (``_give_back_blocked``).

Each runs in a process of its own (``_run``: another thread running, so the section puts
its stand-ins in place).
"""
from __future__ import annotations

import pytest

import test_audit70_review_signals
from test_audit69_signals import _run
from test_audit70_signals import CUT
from test_audit71_signals import BACK_EDGES, COUNTING_HANDLERS, NEXT_RUN, assert_every_run_ok

# the helper's sweep with a Ctrl-C's effect at the back edge: whatever SIGINT's handler
# is then runs (its stand-in, still in place, notes it -- a KeyboardInterrupt raised
# there would be one no Ctrl-C could raise)
RAISE = "            raise KeyboardInterrupt(at['where'])\n"
assert RAISE in BACK_EDGES
CTRL_C_AT_BACK_EDGES = BACK_EDGES.replace(
    RAISE, "            signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)\n"
           "            return local\n")


# the masks set by the stdlib's call (``signal.pthread_sigmask``, as where ctypes is not):
# the few signals programs install handlers for
STDLIB = "signals._LIBC = None\nsignals._CHECK_SIGNALS = None\n"


@pytest.mark.parametrize("masks", ["ctypes", "stdlib"])
def test_a_held_signal_given_back_by_a_stand_in_is_delivered_wherever_a_back_edge_is_interrupted(
        masks):
    """A section holds SIGUSR1 (its handler raises) and SIGTERM (its handler counts);
    its give-back is cut at its first line, so both stay held and the stand-ins stay.
    The idle program then takes SIGUSR2, whose stand-in gives the handlers back and
    the held signals to them, while a Ctrl-C lands at the k-th back edge of signals.py's
    loops (one per run: SIGINT's handler then runs there).  After a moment idle (no further section) each
    handler ran exactly once, no stand-in is left, nothing held or pending.  Before the
    fix, at the give-back's outer back edge after SIGUSR1's handler raised: ``10``,
    SIGTERM left in ``_HELD``."""
    out = _run((STDLIB if masks == "stdlib" else "") + CUT + CTRL_C_AT_BACK_EDGES + (
        COUNTING_HANDLERS +
        "def usr2(signum, frame):\n"
        "    count['USR2'] = count.get('USR2', 0) + 1\n"
        "signal.signal(signal.SIGUSR1, usr1)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "signal.signal(signal.SIGUSR2, usr2)\n"
        "BOTH = {signal.SIGUSR1, signal.SIGTERM}\n"
        "for k in range(300):\n"
        "    count.clear()\n"
        "    sys.setprofile(cut_hook)\n"
        "    try:\n"
        "        with signals.deferred():\n"
        "            os.kill(os.getpid(), signal.SIGUSR1)\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            t = time.monotonic() + 5\n"
        "            while not BOTH <= set(signals._HELD) and time.monotonic() < t:\n"
        "                time.sleep(0.001)\n"
        "    except Cut:\n"
        "        pass\n"
        "    finally:\n"
        "        sys.setprofile(None)\n"
        "    held = BOTH <= set(signals._HELD)\n"
        "    at.update(k=k, n=0, where=None)\n"
        "    got = []\n"
        "    for step in range(6):  # (then idle: a handler still due runs here, at once;\n"
        "        try:  # two raising handlers, the second at the first's except: nested)\n"
        "            try:\n"
        "                if step == 0:\n"
        "                    sys.settrace(tracer)\n"
        "                    signal.raise_signal(signal.SIGUSR2)  # (its stand-in gives back)\n"
        "                else:\n"
        "                    time.sleep(0.01)\n"
        "            except (KeyboardInterrupt, Handled) as e:\n"
        "                got.append(type(e).__name__)\n"
        "            finally:\n"
        "                sys.settrace(None)\n"
        "                at['k'] = -1\n"
        "        except (KeyboardInterrupt, Handled) as e:\n"
        "            got.append(type(e).__name__)\n"
        "    got = '+'.join(got) or '-'\n"
        "    ok = (signal.getsignal(signal.SIGUSR1) is usr1\n"
        "          and signal.getsignal(signal.SIGTERM) is term\n"
        "          and signal.getsignal(signal.SIGUSR2) is usr2\n"
        "          and all(signal.getsignal(s) is not signals._stand_in for s in signals._FEW))\n"
        "    left = ','.join(str(int(s)) for s in sorted(set(signals._HELD) | signal.sigpending()))\n"
        "    have = f\"{count.get('USR1', 0)}{count.get('TERM', 0)}{count.get('USR2', 0)}\"\n"
        "    verdict = 'OK' if (held and have == '111' and ok and not left) else 'BAD'\n"
        + NEXT_RUN))
    assert_every_run_ok(out)


def test_a_ctrl_c_in_deep_recursion_after_a_cut_short_end_is_delivered_with_the_stdlib_masks(
        monkeypatch):
    """test_audit70_review_signals's deep-recursion sweep with the stdlib's mask calls
    (where ctypes is not): a stand-in gives the handlers back, with the signals blocked,
    a few frames short of the recursion limit.  (``signal.pthread_sigmask`` is a Python
    function: its call raised RecursionError there -- the restore never made, the mask
    left blocked and every later Ctrl-C with it: ``none``.  Seen with a first version of
    the fix, never landed.)"""
    monkeypatch.setattr(test_audit70_review_signals, "_run", lambda code: _run(STDLIB + code))
    test_audit70_review_signals.test_a_ctrl_c_in_deep_recursion_after_a_cut_short_end_does_not_hang()


def test_a_ctrl_c_inside_a_section_is_raised_as_it_ends_not_after():
    """With another thread waiting in a read (as an xdist worker's I/O thread), the
    process sends itself SIGINT inside a section, 150 times: its KeyboardInterrupt must
    come out of the ``with`` statement -- "the interrupt arrives just after the
    section" -- not at some later point of the code after it (at most 2 late: a trip
    the other thread took inside the section).  9a96c1f kept the mask on while the
    section's end gave the handlers back: the other thread, not blocking SIGINT, took
    the signal meanwhile, and CPython runs a handler whose signal another thread took
    only at the main thread's next GIL switch or explicit check -- here at a later
    ``time.sleep``: 0 to 15 late of 150 here, load permitting -- the test fails 2 runs
    in 3 on 9a96c1f (177 of 1,000 in a probe, 0 to 2 before it and after the fix);
    test_audit69_review_signals's pin test, run in a process with an I/O thread, failed
    1 time in 5 that way, and crashed an xdist worker with the late KeyboardInterrupt."""
    out = _run(
        "r, w = os.pipe()  # (a thread waiting in a read, as an xdist worker's I/O thread)\n"
        "threading.Thread(target=os.read, args=(r, 1), daemon=True).start()\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "late = 0\n"
        "for i in range(150):\n"
        "    try:\n"
        "        try:\n"
        "            with signals.deferred():\n"
        "                os.kill(os.getpid(), signal.SIGINT)\n"
        "            at_end = False\n"
        "        except KeyboardInterrupt:\n"
        "            at_end = True\n"
        "        for _ in range(200):  # (a trip still due lands here)\n"
        "            time.sleep(0.0001)\n"
        "    except KeyboardInterrupt:\n"
        "        at_end = False\n"
        "    late += not at_end\n"
        "print('LATE', late)\n")
    assert out[0] == "LATE" and int(out[1]) <= 2, out
