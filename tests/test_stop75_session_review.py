"""WalstoreSession: review of stop 75's undo watchers and branch pinning (h3).

1. An undo that committed and was then interrupted (Ctrl-C in a compensator: a
   KeyboardInterrupt out of ``store.rewind``) was taken for one that changed nothing (the
   undo watchers and ``session.rewind`` counted only walstore's own errors as committed):
   a turn in flight saved "booked oslo" after the rewind had retracted its turn and left
   its booking's cancellation owed.  An exception out of a compensation now carries
   ``undo_committed``.
2. One undo watcher's ``end`` raising skipped the others: the session stayed "rewind
   under way" for good (its writes waited 120 s each, its tools were refused).
3. Branch pinning: a caller's writes left its branch (for the current one, another
   caller's) after it read a branch it named (``get_items(branch=...)``,
   ``get_conversation_turns(branch_id=...)``), deleted another branch, or ran a rewind
   that failed (an unknown point): the turn's answer landed on a branch that never held
   its question.
4. Automatic compaction (``OpenAIResponsesCompactionSession``) read and replaced the
   current branch, not the one the run wrote to: a branch another caller made while the
   run went on was replaced by the summary of a run it never held.

Orderings are forced with events, on real stores and real threads.
"""
from __future__ import annotations

import asyncio
import threading
import types

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.agent import scope as agent_scope  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import WAIT_S, assistant, book, store, user  # noqa: E402,F401


# ---- 1. an interrupted undo that committed ------------------------------------------------
@pytest.mark.parametrize("how", ["store.rewind", "session.rewind"])
def test_a_rewind_interrupted_in_its_compensations_still_cuts_off_a_turn_in_flight(
        store, how):
    """Before: the KeyboardInterrupt out of the compensator made the rewind count as
    one that changed nothing, and the turn saved 'booked oslo' after it."""
    world: list[str] = []

    @store.compensator("cancel")
    def cancel(action):
        raise KeyboardInterrupt   # (Ctrl-C while the hotel's API is called)

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.get_items()                      # the turn begins
        await s.add_items([user("book oslo")])
        await asyncio.to_thread(book, store, s, "oslo", world)
        raised = []

        def undo():   # (another thread: another caller)
            try:
                if how == "store.rewind":
                    store.rewind(s.scope + "p", scope=s.scope)
                else:
                    asyncio.run(WalstoreSession("u", store).rewind("p"))
            except BaseException as e:  # noqa: BLE001
                raised.append(e)
        t = threading.Thread(target=undo)
        t.start()
        await asyncio.to_thread(t.join, WAIT_S)
        assert [type(e) for e in raised] == [KeyboardInterrupt]
        with pytest.raises(walstore.ConflictError, match="was rewound by another caller"):
            await s.add_items([assistant("booked oslo")])
        assert raised[0].undo_committed is not None   # (the rewind stands)
        assert await s.get_items() == [user("hi")]
    asyncio.run(go())
    assert [a.state for a in store.actions()] == ["pending"]   # (its cancellation owed)


# ---- 2. a failing watcher ---------------------------------------------------------------
def test_an_undo_watcher_whose_end_raises_leaves_no_session_under_way(store):
    """Before: the session's own watcher, told after the failing one, was never told of
    the end: every later write of a caller that had read the session waited for a
    rewind that had ended (120 s), and its tools were refused."""
    def failing(_store, _scope):
        def end(_committed):
            raise RuntimeError("a watcher's end failed")
        return end

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi")])
        await s.restore_point("p")
        await s.add_items([user("more")])
        await s.get_items()
        agent_scope.register_undo_watcher(failing)
        try:
            with pytest.raises(RuntimeError, match="a watcher's end failed"):
                await asyncio.to_thread(store.rewind, s.scope + "p", scope=s.scope)
        finally:
            agent_scope.UNDO_WATCHERS.remove(failing)
        assert s._lock.underway == []
        await s.get_items()
        await s.add_items([assistant("hello")])
        assert await s.get_items() == [user("hi"), assistant("hello")]
    asyncio.run(go())


# ---- 3. a caller's writes stay on its branch --------------------------------------------
@pytest.mark.parametrize("op", ["get_items(branch=A)", "get_items(branch=main)",
                                "get_conversation_turns(main)", "delete_branch(other)",
                                "session.rewind(unknown)", "store.rewind(unknown)"])
def test_a_callers_read_of_a_named_branch_or_failed_rewind_keeps_its_turn_on_its_branch(
        store, op):
    """The turn runs on A; another caller switches the session to main; then the turn's
    caller does ``op``, which is no switch of its own.  Before: the answer landed on
    main, A kept the question unanswered."""
    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([user("hi"), assistant("hello")])
        await s.create_branch_from_turn(1, "other")
        await s.switch_to_branch("main")
        await s.create_branch_from_turn(1, "A")
        await s.get_items()                      # the turn begins, on A
        await s.add_items([user("book oslo")])
        await asyncio.create_task(WalstoreSession("u", store).switch_to_branch("main"))
        if op == "get_items(branch=A)":
            assert await s.get_items(branch="A") == [user("book oslo")]
        elif op == "get_items(branch=main)":
            assert await s.get_items(branch="main") == [user("hi"), assistant("hello")]
        elif op == "get_conversation_turns(main)":
            assert len(await s.get_conversation_turns("main")) == 1
        elif op == "delete_branch(other)":
            await s.delete_branch("other")
        elif op == "session.rewind(unknown)":
            with pytest.raises(walstore.UnknownPoint):
                await s.rewind("typo")
        else:
            with pytest.raises(walstore.UnknownPoint):
                store.rewind(s.scope + "typo", scope=s.scope)   # (in the turn's task)
        assert s._lock.underway == [] and s._lock.epoch == 0
        await s.add_items([assistant("booked oslo")])
        reader = WalstoreSession("u", store)
        assert await reader.get_items(branch="A") == [user("book oslo"),
                                                      assistant("booked oslo")]
        assert await reader.get_items(branch="main") == [user("hi"), assistant("hello")]
        assert await reader.current_branch() == "main"
        # the caller's own read of the current branch moves it there
        await s.get_items()
        await s.add_items([user("next")])
        assert (await reader.get_items(branch="main"))[-1] == user("next")
    asyncio.run(go())


# ---- 4. compaction compacts the branch the run wrote to --------------------------------
def _exchange(i):
    return [{"type": "message", "role": "user", "content": f"q{i}"},
            {"type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": f"a{i}", "annotations": []}]}]


def test_automatic_compaction_replaces_the_branch_the_run_wrote_to(store):
    """The run's items went to A (its branch); another caller branched A at turn 3 to
    B meanwhile (the current branch now).  Before: the SDK's automatic compaction after
    the run read B (whose items are all in the run's exchange) and replaced them with
    the summary of the run, turn 3 included, which B never held; A stayed uncompacted."""
    from agents.memory.openai_responses_compaction_session import (
        OpenAIResponsesCompactionSession)
    from agents.run_internal.items import digest_input_item
    summary = {"type": "message", "role": "user", "content": "summary"}
    sent = []

    class Responses:
        async def compact(self, **kw):
            sent.append(kw)
            return types.SimpleNamespace(output=[summary], usage=None)

    async def go():
        s = WalstoreSession("u", store)
        history = [it for i in range(3) for it in _exchange(i)]
        await s.get_items()
        await s.add_items([user("hi")])
        await s.create_branch_from_turn(1, "A")
        comp = OpenAIResponsesCompactionSession(
            "u", s, client=types.SimpleNamespace(responses=Responses()),
            should_trigger_compaction=lambda ctx: True)
        await comp.get_items()
        await comp._ensure_compaction_candidates()   # (read once: it keeps them since)
        await comp.add_items(history)            # the run, on A
        await asyncio.create_task(WalstoreSession("u", store).create_branch_from_turn(3, "B"))
        wrapper = types.SimpleNamespace(
            _session_compaction_is_automatic=True, usage=None,
            _session_compaction_model_exchange=(
                tuple(digest_input_item(i) for i in history), None))
        await comp._run_compaction({"response_id": "resp_1",
                                    "compaction_mode": "previous_response_id"},
                                   wrapper=wrapper)
        assert [kw.get("previous_response_id") for kw in sent] == ["resp_1"]
        reader = WalstoreSession("u", store)
        assert await reader.get_items(branch="A") == [summary]
        assert await reader.get_items(branch="B") == history[:4]
        assert await reader.get_items(branch="main") == [user("hi")]
        # the caller's own switch since: its snapshot's branch is no longer its own
        snap = await s._get_compaction_snapshot(5)
        await s.switch_to_branch("B")
        assert await snap.replace_suffix(0, [user("S")]) is False
        # its branch deleted by another caller: nothing to compact
        await asyncio.create_task(WalstoreSession("u", store).delete_branch("B", force=True))
        snap = await s._get_compaction_snapshot(5)
        assert snap.items == [] and await snap.replace_suffix(0, [user("S")]) is False
        assert await reader.get_items(branch="A") == [summary]
    asyncio.run(go())
