"""The async twins of the integrations' mutating calls: run the blocking call in a worker
thread and, when the awaiting task is cancelled, wait for its outcome before raising the
cancellation.

A cancelled ``await asyncio.to_thread(...)`` does not stop the thread: the commit may
still happen after the caller was told ``CancelledError`` (a probe saw a cancelled
``WalstoreStore.aput`` land 0.1 s later: the caller then retries or gives up on a write
that stands).  SQLiteSession does the same wait.

The worker's outcome is awaited as a plain Future (``run_in_executor``), never as a Task:
a Task is in ``asyncio.all_tasks()``, and a server's graceful shutdown that cancels every
task (``asyncio.run``'s own end does too) cancelled it, which ended the wait while the
thread still committed (audit 61: 10 of 10 cancelled ``add_items`` landed after the
caller's ``gather`` of the cancelled tasks had returned).

A call cancelled while still queued for a worker thread (the loop's default executor has
a few threads; many sessions writing on a slow disk fill them) never runs: the
cancellation is raised at once, nothing written.  It waited its turn, then committed
(audit 61: 60 sessions' ``add_items`` cancelled 10 ms in, on a disk of 50 ms fsyncs:
all 60 committed, the cancellation heard after 1 s).
"""
from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Callable, TypeVar

_T = TypeVar("_T")


class _Slot:
    """Whether the worker began ``fn`` or the caller dropped it first (decided once)."""
    __slots__ = ("lock", "started", "dropped")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = False
        self.dropped = False

    def start(self) -> bool:
        with self.lock:
            if not self.dropped:
                self.started = True
            return self.started

    def drop(self) -> bool:
        """True when ``fn`` will never run (it had not started)."""
        with self.lock:
            if not self.started:
                self.dropped = True
            return self.dropped


async def finish_despite_cancel(fn: Callable[[], _T], *, run_if_cancelled: bool = False) -> _T:
    """``fn()`` in a worker thread (with this task's context, as ``asyncio.to_thread``);
    its result, or, if we were cancelled meanwhile, the cancellation — raised only once
    ``fn`` has finished (committed or not), or at once if no worker had begun it (then it
    never runs; ``run_if_cancelled=True``: it runs anyway, and is waited for)."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    slot = _Slot()

    def work() -> _T | None:
        if not slot.start():
            return None   # (dropped: the caller was told CancelledError, nothing ran)
        return ctx.run(fn)

    fut = loop.run_in_executor(None, work)
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait({fut})
        except asyncio.CancelledError as e:
            cancelled = cancelled or e
            if not run_if_cancelled and slot.drop():
                raise
    if cancelled is not None:
        if not fut.cancelled():
            fut.exception()   # retrieved: the cancellation is what the caller sees
        raise cancelled
    return fut.result()
