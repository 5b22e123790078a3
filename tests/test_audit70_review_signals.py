"""Audit 70, review of stop 70's signal fixes (walstore/signals.py, commit ccec179).

Each test runs in a process of its own (``_run``: another thread running, so sections put
stand-ins in place of the Python handlers), with a handler's exception placed by a profile
hook at a point where CPython runs handlers (a function's start, its "call" event, and
right after a call into C returns, its "c_return").

- The stand-in's frame walk (``_ending``) ran before the signal was noted: a handler
  raising at the walk's call (or at its loop's back edge) dropped the signal the stand-in
  was taking -- its handler never ran, not at the section's end nor later
  (``test_a_signal_whose_stand_in_is_cut_at_its_walk_is_still_delivered``).
- ``_forked`` (the at-fork hook) made calls before it reset anything: a handler raising
  in the child at one (a Ctrl-C to the process group just after the fork) left the
  parent's main thread recorded and its section open in the child -- the child's
  stand-ins then noted every Ctrl-C for good -- and, at the give-back loop's, the
  parent's noted signals, raised again in the child at its next section's end
  (``test_a_child_interrupted_in_its_fork_hook_takes_its_ctrl_c_not_the_parents_signal``).
- The stand-in's give-back (ccec179) runs where the signal landed: a few frames short of
  the recursion limit, ``signal.getsignal`` raised RecursionError at every retry of the
  give-back loop, which spun for good
  (``test_a_ctrl_c_in_deep_recursion_after_a_cut_short_end_does_not_hang``).
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
        "signal.raise_signal(signal.SIGUSR2)  # (the next signal: its stand-in gives all)\n"
        "print('IDLE', count[0])\n"
        "ok = (signal.getsignal(signal.SIGUSR1) is mine and not signals._HELD\n"
        "      and signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "print('BACK', ok)\n"))
    assert out == ["CUT", "END", "1", "CUT", "CUT", "IDLE", "1", "BACK", "True"], out


def test_a_child_interrupted_in_its_fork_hook_takes_its_ctrl_c_not_the_parents_signal():
    """The main thread in a section has noted a SIGUSR1 (taken by another thread); a
    third thread forks, and in the child a handler raises at the k-th point of the
    at-fork hook ``_forked`` (every "call" and "c_return" in it but its own start, one
    fork per k: a process group's Ctrl-C landing there).  Each child then ends a section
    of its own, and: the parent's SIGUSR1 is not raised in it, a Ctrl-C reaches it, and
    its thread is the one recorded as main.  Before the fix: at the points before the
    reset (``get_ident``, ``main_thread``, ``ident``, ``allocate_lock``) the child's
    stand-ins noted every Ctrl-C for good (``ctrlc=False``, ``main=False``), and at the
    give-back loop's the parent's SIGUSR1 ran in the child (``usr1=1``)."""
    out = _run(
        "import warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "count = [0]\n"
        "def mine(signum, frame):\n"
        "    count[0] += 1\n"
        "signal.signal(signal.SIGUSR1, mine)\n"
        "FORKED = signals._forked.__code__\n"
        "at = {'k': -1, 'n': 0, 'where': None}\n"
        "def hook(frame, event, arg):\n"
        "    if at['k'] < 0 or event not in ('call', 'c_return'):\n"
        "        return\n"
        "    if frame.f_code is not FORKED and (event != 'call' or frame.f_back is None\n"
        "                                       or frame.f_back.f_code is not FORKED):\n"
        "        return\n"
        "    if frame.f_code is FORKED and event == 'call':\n"
        "        return  # (its own start: any at-fork hook's, not to be helped)\n"
        "    if at['n'] == at['k']:\n"
        "        name = getattr(arg, '__name__', frame.f_code.co_name)\n"
        "        at['where'] = f'{event}:{name}'\n"
        "        at['k'] = -1\n"
        "        sys.setprofile(None)\n"
        "        raise KeyboardInterrupt\n"
        "    at['n'] += 1\n"
        "def child():\n"
        "    sys.setprofile(None)\n"
        "    with signals.deferred():\n"
        "        pass\n"
        "    try:\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "        time.sleep(0.01)\n"
        "        ki = False\n"
        "    except KeyboardInterrupt:\n"
        "        ki = True\n"
        "    main = signals._MAIN[0] == threading.get_ident()\n"
        "    line = f\"{at['where']}:usr1={count[0]}:ctrlc={ki}:main={main}\\n\"\n"
        "    os.write(1, line.encode())\n"
        "    os._exit(3 if at['where'] is None else 0)  # (3: it ran through)\n"
        "through = [False]\n"
        "for k in range(40):\n"
        "    inside, done = threading.Event(), threading.Event()\n"
        "    def forker():\n"
        "        inside.wait(10)\n"
        "        at.update(k=k, n=0, where=None)\n"
        "        sys.setprofile(hook)\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            child()\n"
        "        sys.setprofile(None)\n"
        "        through[0] = os.waitpid(pid, 0)[1] == 3 << 8\n"
        "        done.set()\n"
        "    threading.Thread(target=forker).start()\n"
        "    count[0] = 0\n"
        "    with signals.deferred():\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)  # (another thread takes it: noted)\n"
        "        for _ in range(200):\n"
        "            if signals._HELD:\n"
        "                break\n"
        "            time.sleep(0.005)\n"
        "        inside.set()\n"
        "        done.wait(10)\n"
        "    print('PARENT', count[0], flush=True)\n"
        "    if through[0]:\n"
        "        break\n")
    children = [line for line in out if line != "PARENT" and not line.isdigit()]
    assert len(children) >= 4 and children[-1].startswith("None:"), out
    assert all(c.endswith(":usr1=0:ctrlc=True:main=True") for c in children), children
    assert out.count("PARENT") == len(children) and all(
        out[i + 1] == "1" for i, line in enumerate(out) if line == "PARENT"), out


def test_a_ctrl_c_in_deep_recursion_after_a_cut_short_end_does_not_hang():
    """Stand-ins left by a section's end cut short; a Ctrl-C lands in code a few frames
    short of the recursion limit (every depth from the limit down to where it is
    delivered at once).  The stand-in gives the handlers back from there, where
    ``signal.getsignal`` (a Python function) raises RecursionError: the give-back loop
    retried it for ever, at 100% CPU (the process hung).  Now each Ctrl-C the stand-in
    took is delivered once: at once or, too deep for that, at the next section's end,
    its handler back."""
    out = _run(CUT + (
        "sys.setrecursionlimit(200)\n"
        "def deep(n):\n"
        "    if n:\n"
        "        return deep(n - 1)\n"
        "    try:\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "        return 'none'\n"
        "    except KeyboardInterrupt:\n"
        "        return 'now'\n"
        "    except RecursionError:\n"
        "        return 'deep'\n"
        "seen = []\n"
        "for depth in range(200, 150, -1):\n"
        "    section_cut_short()\n"
        "    try:\n"
        "        got = deep(depth)\n"
        "    except RecursionError:\n"
        "        got = 'deep'\n"
        "    try:\n"
        "        with signals.deferred():\n"
        "            pass\n"
        "        later = ''\n"
        "    except KeyboardInterrupt:\n"
        "        later = '+later'\n"
        "    back = signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "    seen.append(got + later + ('' if back else '-stand-in'))\n"
        "    if got == 'now':\n"
        "        break\n"
        "print(' '.join(sorted(set(seen))))\n"))
    seen = [s for s in out if s != "CUT"]  # ("deep": too deep for any handler to run)
    assert seen[-1] == "now" and set(seen) <= {"deep", "deep+later", "now"}, seen
