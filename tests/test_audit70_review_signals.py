"""Audit 70, review of stop 70's signal fixes (walstore/signals.py, commit ccec179).

Each test runs in a process of its own (``_run``: another thread running, so sections put
stand-ins in place of the Python handlers), with a handler's exception placed by a profile
hook at a point where CPython runs handlers (a function's start: its "call" event).

- The stand-in's frame walk (``_ending``) ran before the signal was noted: a handler
  raising at the walk's call (or at its loop's back edge) dropped the signal the stand-in
  was taking -- its handler never ran, not at the section's end nor later
  (``test_a_signal_whose_stand_in_is_cut_at_its_walk_is_still_delivered``).
- ``_forked`` cleared the parent's noted signals last: a handler raising in the child
  before that (a Ctrl-C to the process group just after the fork, at the give-back
  loop's ``signal.getsignal``) left them, and the child's next section end raised the
  parent's signal in the child
  (``test_a_signal_noted_in_the_parent_is_not_raised_again_in_a_forked_child``).
"""
from __future__ import annotations

from test_audit69_signals import _run
from test_audit70_signals import CUT


def test_a_signal_whose_stand_in_is_cut_at_its_walk_is_still_delivered():
    """A SIGUSR1 taken by its stand-in as a section ends (let in by the mask's restore,
    the stand-ins still in place), and another handler raises at the first point of the
    stand-in's frame walk; then, after a section cut short (stand-ins left), one taken
    by the stand-in of the idle program, cut the same way.  Each is delivered once (at
    the section's end, or by the next signal).  Before the fix: ``0`` both times (the
    signal dropped before it was noted)."""
    out = _run(CUT + (
        "count = [0]\n"
        "def mine(signum, frame):\n"
        "    count[0] += 1\n"
        "signal.signal(signal.SIGUSR1, mine)\n"
        "signal.signal(signal.SIGUSR2, lambda signum, frame: None)  # (the next signal)\n"
        "ENDING = signals._ending.__code__\n"
        "def walk_cut(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code is ENDING:\n"
        "        sys.setprofile(None)\n"
        "        raise Cut\n"
        "main = threading.main_thread().ident\n"
        "sys.setprofile(walk_cut)\n"
        "try:\n"
        "    with signals.deferred():\n"
        "        signal.pthread_kill(main, signal.SIGUSR1)  # (pending till the end)\n"
        "except Cut:\n"
        "    print('CUT')\n"
        "finally:\n"
        "    sys.setprofile(None)\n"
        "print('END', count[0])\n"
        "count[0] = 0\n"
        "section_cut_short()\n"
        "sys.setprofile(walk_cut)\n"
        "try:\n"
        "    signal.raise_signal(signal.SIGUSR1)\n"
        "except Cut:\n"
        "    print('CUT')\n"
        "finally:\n"
        "    sys.setprofile(None)\n"
        "signal.raise_signal(signal.SIGUSR2)  # (the next signal: its stand-in gives back)\n"
        "print('IDLE', count[0])\n"
        "ok = (signal.getsignal(signal.SIGUSR1) is mine and not signals._HELD\n"
        "      and signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "print('BACK', ok)\n"))
    assert out == ["CUT", "END", "1", "CUT", "CUT", "IDLE", "1", "BACK", "True"], out


def test_a_signal_noted_in_the_parent_is_not_raised_again_in_a_forked_child():
    """The main thread in a section has noted a SIGUSR1 (taken by another thread); a
    third thread forks, and in the child a handler raises at the give-back loop's first
    ``signal.getsignal`` (a process group's Ctrl-C landing there).  The child's next
    section end must not raise the parent's SIGUSR1 in the child (the parent's handler
    runs once, in the parent).  Before the fix: ``CHILD 1`` (``_HELD`` cleared last,
    after the loop the exception left)."""
    out = _run(
        "import warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "count = [0]\n"
        "def mine(signum, frame):\n"
        "    count[0] += 1\n"
        "signal.signal(signal.SIGUSR1, mine)\n"
        "FORKED, GET = signals._forked.__code__, signal.getsignal.__code__\n"
        "def hook(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code is GET and frame.f_back.f_code is FORKED:\n"
        "        sys.setprofile(None)\n"
        "        raise KeyboardInterrupt\n"
        "inside, done = threading.Event(), threading.Event()\n"
        "def forker():\n"
        "    inside.wait(10)\n"
        "    sys.setprofile(hook)\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        sys.setprofile(None)\n"
        "        with signals.deferred():\n"
        "            pass\n"
        "        time.sleep(0.05)\n"
        "        os.write(1, f'CHILD {count[0]}\\n'.encode())\n"
        "        os._exit(0)\n"
        "    sys.setprofile(None)\n"
        "    os.waitpid(pid, 0)\n"
        "    done.set()\n"
        "threading.Thread(target=forker).start()\n"
        "with signals.deferred():\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)  # (another thread takes it: noted)\n"
        "    for _ in range(200):\n"
        "        if signals._HELD:\n"
        "            break\n"
        "        time.sleep(0.005)\n"
        "    print('NOTED', signals._HELD == [signal.SIGUSR1])\n"
        "    inside.set()\n"
        "    done.wait(10)\n"
        "time.sleep(0.05)\n"
        "print('PARENT', count[0])\n")
    assert out == ["NOTED", "True", "CHILD", "0", "PARENT", "1"], out
