"""WalstoreSession: the stop-75 pieces read as one (h1, stop 75).

1. ``erase()`` is several store calls (a purge, the drop of each restore point, a second
   purge).  Only an error out of the first purge was judged for "committed": one raised
   after it had committed (the drop of a restore point failing: a full disk) was taken
   for an erase that changed nothing, so the rewind epoch was not counted and a turn in
   flight (a context that had read the session) wrote its items into the erased session.

Orderings are forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import errno

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, assistant, store, user  # noqa: E402,F401


def test_an_erase_failing_after_its_purge_committed_still_cuts_off_a_turn_in_flight(store):
    session = WalstoreSession("u1", store)
    failed: list[BaseException] = []

    def full_disk(name):  # (the drop record's write fails: the purge has committed)
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main():
        await session.add_items([user("book oslo")])
        await session.restore_point("before")
        read = asyncio.Event()
        erased = asyncio.Event()

        async def turn():
            assert await session.get_items() == [user("book oslo")]
            read.set()
            await asyncio.wait_for(erased.wait(), WAIT_S)
            await session.add_items([assistant("booked oslo")])

        async def eraser():
            await asyncio.wait_for(read.wait(), WAIT_S)
            store.drop_restore_point = full_disk   # (this store object only)
            try:
                await session.erase()
            except OSError as e:
                failed.append(e)
            finally:
                del store.drop_restore_point
                erased.set()

        results = await asyncio.gather(turn(), eraser(), return_exceptions=True)
        return results, await session.get_items()

    (turn_result, _), items = asyncio.run(main())
    assert failed and failed[0].errno == errno.ENOSPC
    assert isinstance(turn_result, walstore.ConflictError), turn_result
    assert items == []   # (erased: the turn's answer did not land in it)
