"""Audit 71, signal sections (walstore/signals.py): interrupts at a loop's back edge.

CPython runs a pending signal's handler at a function's start, after a call into C
returns (the points tests/test_interrupt_points.py visits with a profile hook), and also
at a loop's back edge (a backward jump's check).  The sweep here visits every back edge
in walstore/signals.py's own frames (a trace hook with opcode events) while a section
holds two signals a stand-in took, and raises KeyboardInterrupt there: a second handler
raising while the first's exception is in flight.

- A held signal's handler raising as the section's end gave it its signal, then a Ctrl-C
  at the give-back's outer loop's back edge (outside its ``try``): the other held signal
  stayed in the Python list, its handler back in place, and was delivered only when some
  later section ended -- never, for an idle program (a SIGTERM held while a Ctrl-C came)
  (``test_a_held_signal_is_delivered_at_once_wherever_a_back_edge_is_interrupted``).
  Fixed by giving the handlers back and raising the held signals with the signals
  blocked (``_give_back_blocked``: the section's own mask comes off first, then the
  give-back blocks them again): the kernel keeps them pending, all come in as the mask
  comes off, and CPython itself runs the rest when one handler raises.  (A first version
  kept the section's mask on through the give-back: a signal sent inside the section
  was then taken by another thread and ran late -- tests/test_audit71_signals_review.py.)
- A stand-in taking a signal in ``__exit__`` (a give-back cut short) took it for an end
  still to give back, and returned: the signal noted, never delivered, stand-ins left
  (``test_a_signal_coming_in_after_a_cut_short_give_back_is_delivered_at_once``; the
  same before the fix, the stand-in taking it at the mask's restore) -- and a handler
  ending a section of its own in the give-back wrote the blocked mask into the one
  buffer the ending section restored (seen with the first fix, never landed:
  ``test_the_mask_comes_off_when_a_handler_runs_a_section_during_the_give_back``).
- The demo's worker unblocked every asynchronous signal where it should take back the
  mask ``walstore demo`` had before the section it was started in (a supervisor that
  blocked SIGUSR1 for it saw it unblocked in the worker)
  (``test_the_demo_worker_keeps_the_mask_its_parent_had_before_the_section``).

Each sweep runs in a process of its own (``_run``: another thread running, so the
section puts its stand-ins in place; SIGINT's default handler).
"""
from __future__ import annotations

import sys

import pytest

import walstore

from test_audit69_signals import _run
from test_audit70_signals import give_back_hook, CUT

BACK_EDGES = (
    "import dis\n"
    "FILE = signals.__file__\n"
    "EDGES = {}\n"
    "def edges(code):  # (offsets of the backward jumps a handler can run at)\n"
    "    e = EDGES.get(code)\n"
    "    if e is None:\n"
    "        e = EDGES[code] = set()\n"
    "        start = None\n"
    "        for i in dis.get_instructions(code):  # (a jump's EXTENDED_ARG: its event's)\n"
    "            if i.opname == 'EXTENDED_ARG':\n"
    "                start = i.offset if start is None else start\n"
    "                continue\n"
    "            if ((i.opcode in dis.hasjrel or i.opcode in dis.hasjabs)\n"
    "                    and isinstance(i.argval, int) and i.argval < i.offset\n"
    "                    and 'NO_INTERRUPT' not in i.opname):\n"
    "                e.add(i.offset if start is None else start)\n"
    "            start = None\n"
    "    return e\n"
    "at = {'k': -1, 'n': 0, 'where': None}\n"
    "def local(frame, event, arg):\n"
    "    if event == 'opcode' and at['k'] >= 0 and frame.f_lasti in edges(frame.f_code):\n"
    "        if at['n'] == at['k']:\n"
    "            at['where'] = f'{frame.f_code.co_name}:{frame.f_lineno}@{frame.f_lasti}'\n"
    "            at['k'] = -1\n"
    "            raise KeyboardInterrupt(at['where'])\n"
    "        at['n'] += 1\n"
    "    return local\n"
    "def tracer(frame, event, arg):  # (signals.py's frames only, opcode by opcode)\n"
    "    if frame.f_code.co_filename != FILE:\n"
    "        return None\n"
    "    frame.f_trace_opcodes = True\n"
    "    return local\n")



# a back-edge sweep child's handlers: SIGUSR1's counts and raises, SIGTERM's counts
COUNTING_HANDLERS = (
    "class Handled(Exception):\n"
    "    pass\n"
    "count = {}\n"
    "def usr1(signum, frame):\n"
    "    count['USR1'] = count.get('USR1', 0) + 1\n"
    "    raise Handled\n"
    "def term(signum, frame):\n"
    "    count['TERM'] = count.get('TERM', 0) + 1\n")

# the end of each run of a back-edge sweep's child (its verdict line, whatever was left
# delivered before the next run, the sweep's end once a run visited every point)
NEXT_RUN = (
    "    print(f\"{verdict}|{at['where']}|{got}|{have}|handlers-{ok}|left-{left}\")\n"
    "    try:  # (whatever was left, delivered before the next run)\n"
    "        with signals.deferred():\n"
    "            pass\n"
    "        time.sleep(0.01)\n"
    "    except Handled:\n"
    "        pass\n"
    "    if at['where'] is None:\n"
    "        break\n")


def assert_every_run_ok(out: list) -> None:
    assert out[-1].startswith("OK|None|") and len(out) >= 3, out
    assert all(line.startswith("OK|") for line in out), [p for p in out if "BAD" in p]


def test_a_held_signal_is_delivered_at_once_wherever_a_back_edge_is_interrupted():
    """Inside a section (stand-ins in place) the process takes SIGUSR1, whose handler
    raises, and SIGTERM, whose handler counts: both held.  A KeyboardInterrupt is raised
    at the k-th back edge of signals.py's loops (one per run, k = 0, 1, ... until a run
    visits them all).  Once the exception is caught and the program idles a moment (no
    further section), each handler ran exactly once, every program handler is in place,
    no stand-in is left, nothing is held or pending.  Before the fix, at the
    give-back's outer back edge after SIGUSR1's handler raised: SIGTERM's handler never
    ran (``10``), SIGTERM left in ``_HELD`` until a later section's end."""
    out = _run(BACK_EDGES + (
        COUNTING_HANDLERS +
        "signal.signal(signal.SIGUSR1, usr1)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "BOTH = {signal.SIGUSR1, signal.SIGTERM}\n"
        "def taken():  # (noted by a stand-in, or pending in the kernel)\n"
        "    return BOTH <= set(signals._HELD) | signal.sigpending()\n"
        "for k in range(300):\n"
        "    count.clear()\n"
        "    sent, got = False, '-'\n"
        "    at.update(k=k, n=0, where=None)\n"
        "    sys.settrace(tracer)\n"
        "    try:\n"
        "        with signals.deferred():\n"
        "            sent = True\n"
        "            os.kill(os.getpid(), signal.SIGUSR1)\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            t = time.monotonic() + 5\n"
        "            while not taken() and time.monotonic() < t:\n"
        "                time.sleep(0.001)\n"
        "    except (KeyboardInterrupt, Handled) as e:\n"
        "        got = type(e).__name__\n"
        "    finally:\n"
        "        sys.settrace(None)\n"
        "        at['k'] = -1\n"
        "    for _ in range(5):  # (idle: a handler still due runs here, at once)\n"
        "        try:\n"
        "            time.sleep(0.01)\n"
        "        except Handled:\n"
        "            got += '+late'\n"
        "    ok = (signal.getsignal(signal.SIGUSR1) is usr1\n"
        "          and signal.getsignal(signal.SIGTERM) is term\n"
        "          and signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "          and all(signal.getsignal(s) is not signals._stand_in for s in signals._FEW))\n"
        "    left = sorted(set(signals._HELD) | signal.sigpending())\n"
        "    want = '11' if sent else '00'\n"
        "    have = f\"{count.get('USR1', 0)}{count.get('TERM', 0)}\"\n"
        "    verdict = 'OK' if (have == want and ok and not left) else 'BAD'\n"
        + NEXT_RUN))
    assert_every_run_ok(out)


def test_a_signal_coming_in_after_a_cut_short_give_back_is_delivered_at_once():
    """Inside a section (stand-ins in place) another thread sends SIGTERM to the main
    thread (pending in the kernel, the mask blocks it); the section's give-back is cut
    at its first line (a handler raising at its call).  The mask comes off all the same,
    SIGTERM reaches the stand-in still in place, and it must give the handlers back and
    hand SIGTERM to the program's handler at once (once; no stand-in left).  Before,
    the stand-in, called inside ``__exit__``, took that for a section's end that would
    give back and raise what it noted, and returned: ``TERM 0``, the stand-ins left."""
    out = _run(CUT + (
        "terms = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: terms.append(s))\n"
        "main = threading.main_thread().ident\n"
        "def to_main():\n"
        "    signal.pthread_kill(main, signal.SIGTERM)\n"
        "sys.setprofile(cut_hook)\n"
        "try:\n"
        "    with signals.deferred():\n"
        "        t = threading.Thread(target=to_main)\n"
        "        t.start()\n"
        "        t.join()\n"
        "except Cut:\n"
        "    print('CUT')\n"
        "sys.setprofile(None)\n"
        "time.sleep(0.05)\n"
        "print('TERM', len(terms))\n"
        "print('HANDLERS', signal.getsignal(signal.SIGINT) is signal.default_int_handler,\n"
        "      all(signal.getsignal(s) is not signals._stand_in for s in signals._FEW))\n"
        "with signals.deferred():\n"
        "    pass\n"
        "time.sleep(0.05)\n"
        "print('AFTER', len(terms))\n"))
    assert out == ["CUT", "TERM", "1", "HANDLERS", "True", "True", "AFTER", "1"], out


def test_the_mask_comes_off_when_a_handler_runs_a_section_during_the_give_back():
    """A section's end gives the handlers back while the signals are still blocked (see
    the first test); a handler that runs there -- at the give-back's first point, or
    at any point of its loops -- and ends a section of its own (a commit in a SIGTERM
    handler) must not leave the main thread's signals blocked.  (Seen while fixing the
    first: the nested section wrote the blocked mask into the one buffer the ending
    section then restored -- every Ctrl-C blocked for good.)  Swept over every "call"
    and "c_return" of the give-back, one per run."""
    out = _run(
        "signal.signal(signal.SIGUSR1, lambda s, f: None)\n"
        "GIVE_BACK = signals._give_back_handlers.__code__\n"
        + give_back_hook("        with signals.deferred():  # (a handler that opens and "
                         "ends a section)\n"
                         "            pass\n") +
        "before = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "main = threading.main_thread().ident\n"
        "for k in range(200):\n"
        "    at.update(k=k, n=0, where=None)\n"
        "    sys.setprofile(hook)\n"
        "    try:\n"
        "        with signals.deferred():\n"
        "            os.kill(os.getpid(), signal.SIGUSR1)  # (noted: a give-back to do)\n"
        "            t = time.monotonic() + 5\n"
        "            while not signals._HELD and time.monotonic() < t:\n"
        "                time.sleep(0.001)\n"
        "    finally:\n"
        "        sys.setprofile(None)\n"
        "        at['k'] = -1\n"
        "    same = signal.pthread_sigmask(signal.SIG_BLOCK, []) == before\n"
        "    print(f\"{at['where']}={'clean' if same else 'BLOCKED'}\")\n"
        "    if not same:\n"
        "        signal.pthread_sigmask(signal.SIG_SETMASK, before)\n"
        "    if at['where'] is None:\n"
        "        break\n")
    assert out[-1] == "None=clean" and len(out) >= 3, out
    assert all(p.endswith("=clean") for p in out), out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/status")
def test_the_demo_worker_keeps_the_mask_its_parent_had_before_the_section(tmp_path):
    """``walstore demo`` run with SIGUSR1 blocked (a supervisor's choice, inherited
    across exec) starts its worker inside a ``deferred()`` section; the worker, between
    its commits, must run with the demo's mask from before the section: SIGUSR1 still
    blocked, SIGINT and SIGTERM not.  Before the fix it unblocked every asynchronous
    signal (``USR1-False``)."""
    path, ledger = str(tmp_path / "s"), str(tmp_path / "ledger.json")
    with walstore.open(path) as store, store.transaction() as tx:
        for key, value in (("plan/steps_done", 0), ("budget/available", 100),
                           ("budget/spent", 0)):
            tx.put(key, value)
    out = _run(
        "from walstore import demo\n"
        "def _blocked(pid):  # (SigBlk of /proc/<pid>/status)\n"
        "    with open(f'/proc/{pid}/status') as f:\n"
        "        return int([x for x in f if x.startswith('SigBlk:')][0].split()[1], 16)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "masks = []\n"
        "def watch():  # (the worker's mask, read from /proc while it runs)\n"
        "    me, t = os.getpid(), time.monotonic() + 20\n"
        "    while not done.is_set() and time.monotonic() < t:\n"
        "        for pid in os.listdir('/proc'):\n"
        "            try:\n"
        "                with open(f'/proc/{pid}/cmdline', 'rb') as f:\n"
        "                    if pid == str(me) or b'\\0--worker\\0' not in f.read():\n"
        "                        continue\n"
        "                masks.append(_blocked(int(pid)))\n"
        "            except (OSError, ValueError):\n"
        "                pass\n"
        "        time.sleep(0.002)\n"
        "done = threading.Event()\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        f"demo._crash_story({path!r}, {ledger!r})\n"
        "done.set()\n"
        "bit = lambda s: 1 << (s - 1)\n"
        "idle = [m for m in masks if not m & bit(signal.SIGINT)]  # (between commits)\n"
        "print('IDLE-SEEN', bool(idle))\n"
        "print('USR1', all(m & bit(signal.SIGUSR1) for m in idle))\n"
        "print('TERM-IN', all(not m & bit(signal.SIGTERM) for m in idle))\n")
    got = out[out.index("IDLE-SEEN"):]
    assert got == ["IDLE-SEEN", "True", "USR1", "True", "TERM-IN", "True"], out[-12:]
