"""Audit 69: a close() beside an action body in another thread deadlocked the process.

``close()`` waits for action bodies running in other threads, and asks whether a body's
frame is still on its thread's stack through ``sys._current_frames()``.  On CPython 3.11
that call holds the runtime's lock of thread states while it builds its dict; a garbage
collection started by that allocation finalizes objects that take the same lock (a
``threading.local`` in a cycle, say) and the process deadlocks with every thread asleep
(CPython gh-106883, fixed in 3.12).  Seen in a CI-like run: the worker running
``test_audit60_saga``'s close-beside-a-body test hung, the closing thread inside
``gc_collect_main`` under ``_PyThread_CurrentFrames``.  walstore now reads the frames
with the collector held off.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from store_support import cli_env

CYCLES_WITH_THREAD_LOCALS = """
import gc, sys, threading
from walstore.agent import actions
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
enabled = gc.isenabled()
gc.set_threshold(1, 1, 1)  # (a collection at nearly every allocation)
for i in range(3000):
    a = [threading.local()]  # (a cycle whose collection finalizes a thread-local)
    a.append(a)
    del a
    actions._frame_on_stack(t.ident, None)
print("DONE", gc.isenabled() == enabled)
gc.disable()  # (left as the program had it: not turned on behind its back)
actions._frame_on_stack(t.ident, None)
print("STILL-OFF", not gc.isenabled())
stop.set()
"""


def test_asking_whether_an_action_body_runs_never_deadlocks_the_process():
    try:
        r = subprocess.run([sys.executable, "-c", CYCLES_WITH_THREAD_LOCALS], env=cli_env(),
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process deadlocked (60 s)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["DONE", "True", "STILL-OFF", "True"], (r.stdout, r.stderr)
