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
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Callable, TypeVar

_T = TypeVar("_T")


async def finish_despite_cancel(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a worker thread (with this task's context, as ``asyncio.to_thread``);
    its result, or, if we were cancelled meanwhile, the cancellation — raised only once
    ``fn`` has finished (committed or not)."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    fut = loop.run_in_executor(None, functools.partial(ctx.run, fn))
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait({fut})
        except asyncio.CancelledError as e:
            cancelled = cancelled or e
    if cancelled is not None:
        if not fut.cancelled():
            fut.exception()   # retrieved: the cancellation is what the caller sees
        raise cancelled
    return fut.result()
