"""The async twins of the integrations' mutating calls: run the blocking call in a worker
thread and, when the awaiting task is cancelled, wait for its outcome before raising the
cancellation.

A cancelled ``await asyncio.to_thread(...)`` does not stop the thread: the commit may
still happen after the caller was told ``CancelledError`` (a probe saw a cancelled
``WalstoreStore.aput`` land 0.1 s later: the caller then retries or gives up on a write
that stands).  SQLiteSession does the same wait.
"""
from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

_T = TypeVar("_T")


async def finish_despite_cancel(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a worker thread; its result, or, if we were cancelled meanwhile, the
    cancellation — raised only once ``fn`` has finished (committed or not)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as e:
            cancelled = cancelled or e
    if cancelled is not None:
        if not task.cancelled():
            task.exception()   # retrieved: the cancellation is what the caller sees
        raise cancelled
    return task.result()
