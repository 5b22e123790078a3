"""The wall clock as decisions that delete by age read it (history retention, a replica's
retention and delete grace).

``deleting_now()`` is ``time.time()``, except that it never runs ahead of the elapsed-time
clock's count since the reading it is anchored to: a forward jump of the wall clock (a bad
NTP source, a VM's clock, a step soon stepped back) deletes nothing a correct clock keeps —
it trimmed a replica's whole point-in-time history at once (audit 67).  A jump that holds
for ``TRUST_AFTER`` seconds of the elapsed-time clock is taken as the clock's correction (a
VM restored from a snapshot, its clock set right): the anchor moves to it.  A step back is
followed at once, and the anchor moves to it: it keeps more, never less.  (Anchored for
good where the process began, a process begun while the clock ran a day ahead followed
that same jump at once again after the clock was set right; and the correction of a step
back was followed at once, so the commits made during the step, stamped early, were
trimmed as if that much older: audit 67 review.  Only a step back some deletion saw moves
the anchor.)  Stamps that are only shown or compared for order read ``time.time()`` as
before.

The elapsed-time clock is ``CLOCK_BOOTTIME`` where there is one (Linux): it counts a
suspend, as the wall clock does (``time.monotonic`` does not there: after a laptop slept
two hours, retention kept two hours more than ``retain_seconds`` for an hour); elsewhere
``time.monotonic``.
"""
from __future__ import annotations

import os
import threading
import time

TRUST_AFTER = 3600.0  # s of the elapsed-time clock a forward jump must hold to be followed
_SLACK = 1.0          # s the wall clock may run ahead of the count (drift, slewing)

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)
if _BOOTTIME is not None:
    try:
        time.clock_gettime(_BOOTTIME)
    except OSError:  # (a kernel before 2.6.39)
        _BOOTTIME = None


def elapsed() -> float:
    """Seconds on the elapsed-time clock (suspend counted where the system can): what an
    age that must not follow the wall clock's steps is counted on (deleting_now, a
    shipper's lag)."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


_lock = threading.Lock()
_anchor = (time.time(), elapsed())  # (wall, elapsed) read together
_ahead_since: float | None = None    # elapsed: since when the wall clock runs ahead


def _forked() -> None:
    # (a thread of the parent inside deleting_now at the fork left the child's copy of
    # the lock held for good: its next retention hung)
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


def deleting_now() -> float:
    """The wall-clock time a deletion by age may assume now (see the module's comment)."""
    global _anchor, _ahead_since
    wall, mono = time.time(), elapsed()
    with _lock:
        counted = _anchor[0] + (mono - _anchor[1])
        if wall <= counted + _SLACK:
            _ahead_since = None
            if wall < counted - _SLACK:
                _anchor = (wall, mono)  # (a step back: followed, and counted from)
            return wall
        if _ahead_since is None:
            _ahead_since = mono
        if mono - _ahead_since < TRUST_AFTER:
            return counted
        _anchor, _ahead_since = (wall, mono), None  # (held: a correction, followed)
        return wall
