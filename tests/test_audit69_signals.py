"""Audit 69, signal sections (walstore/signals.py): a stand-in handler left in place.

While another thread runs, a section that holds asynchronous signals off puts a stand-in
in place of the Python handlers (it notes the signal; the section's end gives the
handlers back and raises each noted signal again).  Found when a CI-like run hung for good
in ``test_undo_retention_race.py`` (an xdist worker spinning in ``_give_back_handlers``):

- A stand-in that was in place when a section began (put back by a program that read it
  with ``signal.getsignal`` inside a section, or left by a section's end that an exception
  cut short: test_audit68_review3's profiling hook raises there, in the same worker) was
  never given back, and each section's end raised the signal it noted into it again —
  noted again, raised again, for ever: the process hung at 100% CPU
  (``test_a_stand_in_left_in_place_is_given_back_not_raised_into``,
  test_audit69_review_signals.py, a section's end cut short).
- A fork inside a section left the child's handlers as stand-ins and its signals blocked
  for good (the child's section end did nothing): a Ctrl-C of the child was noted and
  never delivered (``test_a_child_forked_inside_a_section_gets_its_handlers_back``).

Each runs in a process of its own (a hang is a timeout there, not of the test run).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from store_support import cli_env, ctrl_c_reaches_it

ANOTHER_THREAD = (
    "import os, signal, sys, threading, time\n"
    "from walstore import signals\n"
    "stop = threading.Event()\n"
    "threading.Thread(target=stop.wait, daemon=True).start()  # (stand-ins go in)\n")


def _run(code: str) -> list[str]:
    try:
        r = subprocess.run([sys.executable, "-c", ANOTHER_THREAD + code], env=cli_env(),
                           capture_output=True, text=True, timeout=30,
                           preexec_fn=ctrl_c_reaches_it)  # (an xdist worker ignores SIGINT)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung (30 s)")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_a_stand_in_left_in_place_is_given_back_not_raised_into():
    """Put back by a program after the section: a Ctrl-C outside any section reaches
    its handler at once (the stand-in gives the handler back and hands it the signal);
    found in place as a section begins, it is given back at that section's end, and a
    Ctrl-C inside the section is delivered there."""
    out = _run(
        "def leak():\n"
        "    with signals.deferred():\n"
        "        captured = signal.getsignal(signal.SIGINT)\n"
        "    print('CAPTURED', captured is signals._stand_in)\n"
        "    signal.signal(signal.SIGINT, captured)  # (a program putting back what it read)\n"
        "def ctrl_c(inside):\n"
        "    try:\n"
        "        if inside:\n"
        "            with signals.deferred():\n"
        "                os.kill(os.getpid(), signal.SIGINT)\n"
        "                time.sleep(0.05)\n"
        "        else:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            time.sleep(0.05)\n"
        "        print('NOT-DELIVERED')\n"
        "    except KeyboardInterrupt:\n"
        "        print('DELIVERED')\n"
        "    print('HANDLER', signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "leak()\n"
        "ctrl_c(False)\n"
        "leak()\n"
        "ctrl_c(True)\n")
    assert out == ["CAPTURED", "True", "DELIVERED", "HANDLER", "True"] * 2, out


CHILD_REPORTS = (
    "def report():\n"
    "    ok = signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
    "    try:\n"
    "        os.kill(os.getpid(), signal.SIGINT)\n"
    "        time.sleep(0.05)\n"
    "        got = 'NOT-DELIVERED'\n"
    "    except KeyboardInterrupt:\n"
    "        got = 'DELIVERED'\n"
    "    os.write(1, f'CHILD {ok} {got}\\n'.encode())\n"
    "    os._exit(0)\n")


@pytest.mark.parametrize("forker", ["main-thread", "another-thread"])
def test_a_child_forked_inside_a_section_gets_its_handlers_back(forker):
    """The main thread forks inside the section (the child ends the section itself), or
    another thread forks while the main thread is inside one (the section is not the
    child's): either way the child's SIGINT handler is its own and a Ctrl-C reaches it."""
    if forker == "main-thread":
        body = ("with signals.deferred():\n"
                "    pid = os.fork()\n"
                "if pid == 0:\n"
                "    report()\n"
                "os.waitpid(pid, 0)\n")
    else:
        body = ("inside, done = threading.Event(), threading.Event()\n"
                "def forker():\n"
                "    inside.wait(10)\n"
                "    pid = os.fork()\n"
                "    if pid == 0:\n"
                "        report()\n"
                "    os.waitpid(pid, 0)\n"
                "    done.set()\n"
                "threading.Thread(target=forker).start()\n"
                "with signals.deferred():\n"
                "    inside.set()\n"
                "    done.wait(10)\n")
    out = _run("import warnings\nwarnings.simplefilter('ignore', DeprecationWarning)\n"
               + CHILD_REPORTS + body)
    assert out == ["CHILD", "True", "DELIVERED"], out
