"""Review of the first-use undo after a restart (stop 78 h5): what it still got wrong.

- A tool whose booking runs in a thread that does not carry the run's context (a
  ``ThreadPoolExecutor``, ``loop.run_in_executor``, a ``threading.Thread``; the SDK runs a
  sync tool through ``asyncio.to_thread``, which does): its commit was not tagged
  ``"openai-run"``, so after a kill in the tool the booking was taken for the
  application's and kept, and the retried request booked again.
- A held-back pause (output guardrails with a stopping ``tool_use_behavior``) made and
  resumed in THIS open, after the session's first use had undone an earlier open's killed
  turn: its resume was refused as if its own step's booking had been undone, its approved
  payment reverted and its booking left standing with no item recording it.

The SDK's real Runner, a scripted model, restarts as the store closed and opened again (a
new store object: an earlier open).
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from session_support import assistant, book, cut_short_turn, texts, user  # noqa: E402
from test_openai_session_restart_review import Opens  # noqa: E402
from test_openai_session_resume import Trip  # noqa: E402


@pytest.mark.parametrize("how", ["thread", "executor"])
def test_a_tools_booking_in_a_thread_without_the_runs_context_is_undone(tmp_path, how):
    """The killed turn's tool books in a bare thread or an executor's (no context of the
    run).  Before: its commit carried no "openai-run" tag, the first use after the
    restart kept it (restart_undo None), and the retried request booked a second time."""
    o = Opens(tmp_path)
    store = o.open()
    s = WalstoreSession("u", store)
    asyncio.run(s.add_items([user("hi"), assistant("hello")]))

    def work() -> None:
        if how == "thread":
            t = threading.Thread(target=book, args=(store, s, "rome", o.world))
            t.start()
            t.join()
        else:
            with ThreadPoolExecutor(1) as pool:
                pool.submit(book, store, s, "rome", o.world).result()
    cut_short_turn(s, work, "book rome")
    store.close()
    store = o.open()
    try:
        s = WalstoreSession("u", store)
        assert texts(asyncio.run(s.get_items())) == ["hi", "hello", "book rome"]
        assert s.restart_undo is not None and len(s.restart_undo.reverted) == 1
        assert store.get(s.key("bookings/rome")) is None
    finally:
        store.close()
    assert o.world == ["book rome", "cancel rome"]


def test_a_held_back_pause_resumed_in_the_open_that_undid_a_killed_turn_is_saved(tmp_path):
    """Open 1: a turn killed in its tool (booking "oslo").  Open 2: the first use undoes
    it; then a run with output guardrails and ``stop_on_first_tool`` books "rome" and
    pauses for ``pay`` (its step held back from the session), and is resumed from its
    JSON: it saves the held step and pay's output.  Before: the resume's first write was
    refused ("the session's first use after the restart undid ... that step's
    bookings"): pay's booking reverted, "rome" booked and standing with no item
    recording it."""
    o = Opens(tmp_path)
    store = o.open()
    s = WalstoreSession("u", store)
    cut_short_turn(s, lambda: book(store, s, "oslo", o.world), "book oslo")
    store.close()
    store = o.open()
    try:
        first = WalstoreSession("u", store)
        assert texts(asyncio.run(first.get_items())) == ["book oslo"]
        assert len(first.restart_undo.reverted) == 1 and o.world[-1] == "cancel oslo"
        trip = Trip(store, held=True)
        state = asyncio.run(trip.pause())

        async def resume():
            return await trip.resume(state, serialized=True)
        assert asyncio.run(resume()).final_output == "booked rome"
        items = texts(asyncio.run(trip.session.get_items()), kinds=True)
        assert items == ["user: book oslo", "user: hi", "user: book rome",
                         'function_call: {"city": "rome"}',
                         'function_call: {"city": "rome"}',
                         "function_call_output: booked rome",
                         "function_call_output: paid rome"]
        assert trip.world == ["book rome", "book pay rome"]   # nothing cancelled
        assert store.get(trip.session.key("bookings/rome")) == "confirmed"
        assert store.get(trip.session.key("bookings/pay rome")) == "confirmed"
    finally:
        store.close()


def test_a_copys_first_use_leaves_its_sources_killed_turn_to_the_source(tmp_path):
    """A backup taken of a store holding a turn killed in its tool.  Before: the copy's
    first use reverted the booking, calling the refund (``cancel``) from the copy, and
    the source's first use then cancelled it again: two refunds of one booking.  Now the
    copy leaves it (its actions held, as the debts a copy inherits are), the source
    undoes it once."""
    from walstore.ops.backup import backup
    o = Opens(tmp_path)
    store = o.open()
    s = WalstoreSession("u", store)
    cut_short_turn(s, lambda: book(store, s, "rome", o.world), "book rome")
    store.close()
    copy = str(tmp_path / "copy")
    backup(o.path, copy)
    store = walstore.open(copy)
    store.compensator("cancel")(lambda a: o.world.append(f"copy cancel {a.args['what']}"))
    try:
        s = WalstoreSession("u", store)
        assert texts(asyncio.run(s.get_items())) == ["book rome"]
        assert s.restart_undo is None
        assert store.get(s.key("bookings/rome")) == "confirmed"
    finally:
        store.close()
    store = o.open()
    try:
        s = WalstoreSession("u", store)
        asyncio.run(s.get_items())
        assert len(s.restart_undo.reverted) == 1
    finally:
        store.close()
    assert o.world == ["book rome", "cancel rome"]


def test_a_commits_tags_survive_redo_a_prepared_commit_and_a_backup(tmp_path):
    """The COMMIT field the restart's undo reads (``tags``, de4c0531) on the paths a commit
    takes: recovery's REDO of a process killed after it (os._exit), a transaction
    prepared before that kill and committed after it (the PREPARE carries it), and a
    backup of the store.  (Review: it passed; the txns row kept no tags before de4c0531.)"""
    import os
    import subprocess
    import sys
    from walstore.ops.backup import backup
    from session_support import ROOT
    path = str(tmp_path / "store")
    code = (
        "import os, walstore\n"
        "from walstore.agent.scope import add_commit_tag\n"
        f"s = walstore.open({path!r}, durability='full')\n"
        "with s.transaction() as tx:\n"
        "    tx.put('a', 1)\n"
        "    add_commit_tag(tx, 'openai-run'); add_commit_tag(tx, 'openai-run')\n"
        "tx = s.transaction(); tx.put('q', 1); add_commit_tag(tx, 'x'); tx.prepare('g')\n"
        "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    with walstore.open(path) as s:
        assert s.last_recovery.redone >= 1 and s.prepared() == ["g"]
        s.commit_prepared("g")
        assert [i.extra.get("tags") for i in s.log()] == [["x"], ["openai-run"]]
    backup(path, str(tmp_path / "copy"))
    with walstore.open(str(tmp_path / "copy")) as c:
        assert [i.extra.get("tags") for i in c.log()] == [["x"], ["openai-run"]]
