"""WalstoreSession's scope guard under review (stop 75, helper h1): work declared in the
scopes of two sessions, or in a session's scope inside a transaction already fenced for
another scope (a LangGraph thread's, set by its scope provider).

The guard fenced a transaction only when it had no fence yet (``tx.undo_fence is None``),
so a booking declared in the second session's scope was fenced against nothing of that
session: a rewind of it committing while the tool's transaction ran let the booking
commit after the rewind and stand for good (the first session's fence does not reach
it).  A fence now names every scope the transaction works for (a tuple).  Orderings are
forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, store, user  # noqa: E402,F401


def states(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


@pytest.mark.parametrize("first", ["session", "app"])
def test_a_booking_in_a_second_scope_is_fenced_against_that_sessions_rewind(store, first):
    """A tool books in session u's scope (or its transaction is already fenced for an app
    scope, as a LangGraph node's is for its thread), then in session v's; v is rewound
    by another caller while the tool's transaction is open.  Before: the commit went
    through after the rewind, 'v-oslo' booked for good beside a conversation rewound
    past it.  Now it conflicts and both bookings are compensated, once each."""
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    entered, go_on = threading.Event(), threading.Event()

    async def go():
        u, v = WalstoreSession("u", store), WalstoreSession("v", store)
        for s in (u, v):
            await s.add_items([user("hi")])
            await s.restore_point("p")
            await s.get_items()
            await s.add_items([user("book oslo")])

        def tool():
            with store.transaction() as tx:
                if first == "app":
                    tx.undo_fence = "app/thread-1/"   # (as a scope provider's on_begin)
                    tx.snapshot
                scopes = [(v, "v-oslo")] if first == "app" else [(u, "u-oslo"),
                                                                   (v, "v-oslo")]
                for s, what in scopes:
                    with tx.action("book", args={"what": what}, compensate="cancel",
                                   scope=s.scope) as act:
                        world.append(f"book {what}")
                        act.result = what
                entered.set()
                assert go_on.wait(WAIT_S)
        booking = asyncio.ensure_future(asyncio.to_thread(tool))
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        assert await asyncio.create_task(WalstoreSession("v", store).rewind("p"))
        go_on.set()
        with pytest.raises(walstore.ConflictError, match="rewound"):
            await booking
    asyncio.run(go())
    if first == "app":
        assert world == ["book v-oslo", "cancel v-oslo"]
        assert states(store) == [("v-oslo", "compensated")]
    else:
        assert world == ["book u-oslo", "book v-oslo", "cancel v-oslo", "cancel u-oslo"]
        assert states(store) == [("u-oslo", "compensated"), ("v-oslo", "compensated")]

