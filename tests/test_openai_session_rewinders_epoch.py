"""WalstoreSession: the caller that rewound the session, and another caller's rewind right
after its own (review of stop 75's tests for races, helper h1).

The rewinding caller is not cut off by its own rewind: once it ended, its context noted
the session's rewind count as it was then.  It read the count when its task resumed
(``session.rewind``: after the worker thread's end reached the event loop) or after
telling the session the undo ended (``store.rewind``), so another caller's rewind that
began and committed after the first one's end but before that read was counted as its
own: the caller went on writing the turn that rewind retracted (a busy event loop
resumes a task milliseconds later; a whole rewind fits).  The count noted is now the one
its own end left.  The ordering is forced on real stores and threads: the other caller's
rewind runs, in another thread, from inside the first one's end.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
import walstore.integrations.openai_agents as oa  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, assistant, store, user  # noqa: E402,F401


@pytest.mark.parametrize("how", ["session.rewind", "store.rewind"])
def test_another_callers_rewind_just_after_the_callers_own_cuts_it_off(store, monkeypatch,
                                                                       how):
    """Before: the caller's own rewind to p2 ended, another caller rewound to p1 (its
    turn 'one' retracted), and the caller's next write went through: [hi, 'answer to
    two'] saved after a rewind it never saw."""
    end = oa._WriterLock.end
    others: list = []
    hooked: list = []

    def other_caller_rewinds() -> None:
        others.append(asyncio.run(WalstoreSession("u", store).rewind("p1")))

    def ending(self, token, committed):
        out = end(self, token, committed)
        if not hooked:   # (the first end: the caller's own rewind)
            hooked.append(True)
            t = threading.Thread(target=other_caller_rewinds)
            t.start()
            t.join(WAIT_S)
        return out
    monkeypatch.setattr(oa._WriterLock, "end", ending)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p1")
        await s.add_items([user("one")])
        await s.restore_point("p2")
        await s.get_items()
        await s.add_items([user("two")])
        if how == "session.rewind":
            assert await s.rewind("p2") is not None
        else:   # (in the caller's own task: not cut off by it)
            assert store.rewind(s.scope + "p2", scope=s.scope) is not None
        assert len(others) == 1 and others[0] is not None
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await s.add_items([assistant("answer to two")])
        assert await s.get_items() == [user("hi")]
        await s.add_items([user("again")])   # (read again: writes on)
    asyncio.run(go())
