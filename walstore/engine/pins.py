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
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator


class HistoryPins:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._held: Counter[int] = Counter()

    @contextmanager
    def hold(self, recorded_horizon: Callable[[], int]) -> Iterator[int]:
        """Pin history at ``recorded_horizon()`` (read under ``lock``) while the block
        runs; yields that horizon."""
        with self.lock:
            horizon = recorded_horizon()
            self._held[horizon] += 1
        try:
            yield horizon
        finally:
            with self.lock:
                self._held[horizon] -= 1
                if not self._held[horizon]:
                    del self._held[horizon]

    def lowest(self) -> int | None:
        """The lowest pin (call with ``lock`` held), or None."""
        return min(self._held) if self._held else None
