"""History pins: readers of history that retention must not trim under.

An undo (``revert``, ``rewind``) plans from history rows and then commits a COMMIT that
claims the undone transactions' actions; the applier applies that claim to their action
rows, and the undo then runs the compensations.  A checkpoint's retention trim in another
thread deletes the history and the settled action rows of transactions below its new
horizon.  Between the undo's check that what it read is retained and the claim's apply, a
trim deleted the claimed rows: the revert committed, its key reverted, and its
compensation was dropped with the rows (the charge stood: probe-undo42).

``HistoryPins.hold`` pins history at the horizon recorded when it begins, for as long as
the undo runs (planning, commit, compensations): a trim's horizon never passes the lowest
pin.  ``lock`` is held by the trim from reading the pins to recording its horizon, and by
``hold`` while it reads the recorded horizon and takes its pin, so every trim either sees
the pin or recorded its horizon before the pin was taken (the undo's own check of what it
read, against the recorded horizon, then catches it: HistoryTrimmed, nothing changed).
Bounded: one entry per undo in flight.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from ..signals import deferred


class HistoryPins:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._held: dict[int, int] = {}  # horizon -> undos pinning it (never 0: removed)

    @contextmanager
    def hold(self, recorded_horizon: Callable[[], int]) -> Iterator[int]:
        """Pin history at ``recorded_horizon()`` (read under ``lock``) while the block
        runs; yields that horizon.  The pin is given back whatever interrupts it: its
        count changes with asynchronous signals held off (walstore.signals), and an
        interrupt raised as such a section begins or ends (a signal that was pending)
        still finds the pin given back — once left behind (waiting for ``lock``, which a
        trim holds through its horizon's reads and write), retention never trimmed again
        in the process (review42)."""
        taken = None  # the pinned horizon, once counted
        try:
            with deferred():
                with self.lock:
                    horizon = recorded_horizon()
                    self._held[horizon] = self._held.get(horizon, 0) + 1
                    taken = horizon
            yield taken
        finally:
            if taken is not None:
                self._give_back(taken)

    def _give_back(self, horizon: int) -> None:
        interrupt: BaseException | None = None
        given = False  # (an interrupt raised as the section ends finds it given back:
        while not given:  # once, the loop gave it back again -- another undo's pin)
            try:
                with deferred():
                    with self.lock:
                        n = self._held.get(horizon, 0) - 1
                        if n > 0:
                            self._held[horizon] = n
                        else:
                            self._held.pop(horizon, None)
                        given = True
            except BaseException as e:  # (a pending signal's handler, as the section
                if interrupt is None:   # began or ended: given back once, either way)
                    interrupt = e
        if interrupt is not None:
            raise interrupt

    def lowest(self) -> int | None:
        """The lowest pin (call with ``lock`` held), or None."""
        return min(self._held) if self._held else None
