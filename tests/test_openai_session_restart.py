"""WalstoreSession after a restart: a turn killed (SIGKILL) while its tool ran (stop 78 h2).

SDK 0.24's Runner reads the session, saves the turn's input, calls the model, and saves
a step's tool calls with their outputs only after its tools ran.  A process killed in a
tool, after the tool's booking committed, left the conversation holding the user's request
and no record of the call, while the booking stood in the outside ledger; the request
retried after the restart (the model calling the tool again) booked a second time, the
conversation recording one booking.  Now the session's first use in a new open of the
store (the retried run's history read, before its model and tools) reverts the work in the
session's scope that the earlier open committed after the session's last write, its
actions compensated once.

Real child processes (``agent_scripts/openai_turn_child.py``, the SDK's real Runner and a
scripted model), real files, an outside ledger (``ws_ledger``: charges and refunds by
idempotency key, fsynced).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from walstore.integrations.openai_agents import RestartUndo, WalstoreSession  # noqa: E402
from session_support import (ROOT, WAIT_S, book, cut_short_turn, example, texts,  # noqa: E402
                             user)

SCRIPTS = Path(__file__).resolve().parent / "agent_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import openai_turn_child as child  # noqa: E402
import ws_ledger  # noqa: E402

HELLO = ["hi", "hello"]


class Killed:
    """The files of one store and its outside ledger; ``run(mode)`` starts the child in
    ``mode`` and SIGKILLs it once it wrote its marker (a booking committed in a tool, or
    the restart's undo compensating)."""

    def __init__(self, tmp: Path) -> None:
        self.store, self.ledger = str(tmp / "store"), str(tmp / "ledger.jsonl")
        self.calls, self.marker = str(tmp / "calls.jsonl"), str(tmp / "marker")

    def run(self, mode: str) -> str:
        if os.path.exists(self.marker):
            os.unlink(self.marker)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "openai_turn_child.py"),
                                 self.store, self.ledger, self.calls, mode, self.marker],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + WAIT_S
            while not os.path.exists(self.marker):
                assert proc.poll() is None, f"child died: {proc.stderr.read().decode()}"
                assert time.monotonic() < deadline, "the child never reached its kill point"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        return Path(self.marker).read_text()   # the key of the booking it stopped at

    def open(self, **kw) -> walstore.Store:
        calls = self.calls

        def refund(action) -> None:
            ws_ledger.note_call(calls, action, where="test")
            ws_ledger.refund(self.ledger, action.key)
        if kw.get("readonly"):
            return walstore.open(self.store, **kw)
        return walstore.open(self.store, compensators={"refund": refund}, **kw)

    def records(self) -> list[tuple[str, str]]:
        return [(r["op"], r["key"]) for r in ws_ledger.records(self.ledger)]

    def live(self) -> list[str]:
        """The keys of the bookings standing in the ledger."""
        recs = self.records()
        return [k for op, k in recs if op == "charge" and ("refund", k) not in recs]

    def refunds(self, key: str) -> int:
        return ws_ledger.count(self.ledger, "refund", key)


def txid_of(key: str) -> int:
    """The txid of the booking whose action has idempotency key ``key`` ("ws-...-7.1")."""
    return int(key.rsplit("-", 1)[1].split(".")[0])


def retry(store, session, ledger: str, calls: str) -> list:
    """The user's request again, the model calling book_hotel: the session's items after."""
    from agents import Agent, RunConfig, Runner
    ex = example()
    model = ex.ScriptedModel([[ex.call("book_hotel", {"city": "Oslo"}, 12)],
                              [ex.say("booked a hotel in Oslo", 13)]])
    agent = Agent(name="travel", tools=child.tools(store, session, ledger, calls),
                  model=model)

    async def go():
        await Runner.run(agent, child.REQUEST, session=session,
                         run_config=RunConfig(tracing_disabled=True))
        return await session.get_items()
    return asyncio.run(go())


def recorded(items: list) -> list[str]:
    """The tool calls the conversation records answered: "book_hotel", ..."""
    answered = {i["call_id"] for i in items if i.get("type") == "function_call_output"}
    return [i["name"] for i in items
            if i.get("type") == "function_call" and i["call_id"] in answered]


def test_a_request_retried_after_a_kill_in_its_tool_books_once(tmp_path, caplog):
    """Before: after the restart the session held [hi, hello, request] (no call), the
    killed turn's booking stood, and the retried request booked again: two live bookings
    in the ledger, the conversation recording one."""
    w = Killed(tmp_path)
    killed = w.run("turn")
    assert w.live() == [killed]
    store = w.open()
    try:
        session = WalstoreSession("u", store)
        with caplog.at_level(logging.WARNING, "walstore.integrations.openai_agents"):
            items = retry(store, session, w.ledger, w.calls)
        undo = session.restart_undo
    finally:
        store.close()
    # the killed turn's request stays (the user asked it), no call of it was saved
    assert texts(items, kinds=True)[:4] == ["user: hi", "message: hello",
                                            f"user: {child.REQUEST}", f"user: {child.REQUEST}"]
    assert recorded(items) == ["book_hotel"]
    new = [k for op, k in w.records() if op == "charge" and k != killed]
    assert w.records() == [("charge", killed), ("refund", killed), ("charge", new[0])]
    assert w.live() == new                       # one booking, the one the session records
    assert undo == RestartUndo(reverted=(txid_of(killed),))
    said = [r.getMessage() for r in caplog.records if "earlier open" in r.getMessage()]
    assert len(said) == 1 and "'u'" in said[0] and f"[{txid_of(killed)}]" in said[0]


@pytest.mark.parametrize("mode", ["two", "both"])
def test_a_kill_between_two_tools_of_one_turn(tmp_path, mode):
    """``two``: the model called book_hotel, its call and output saved, then book_car,
    killed in it: the car's booking is undone, the hotel's (recorded) kept.  ``both``:
    one response called both, neither saved: both undone.  Before: both stood."""
    w = Killed(tmp_path)
    car = w.run(mode)
    hotel = next(k for op, k in w.records() if op == "charge" and k != car)
    store = w.open()
    try:
        session = WalstoreSession("u", store)
        items = asyncio.run(session.get_items())
        undo = session.restart_undo
    finally:
        store.close()
    if mode == "two":
        assert recorded(items) == ["book_hotel"]
        assert w.live() == [hotel]
        assert undo.reverted == (txid_of(car),)
    else:
        assert recorded(items) == []
        assert w.live() == []
        assert undo.reverted == tuple(sorted((txid_of(car), txid_of(hotel))))
    assert w.refunds(car) == 1 and undo.already == () and undo.failed == ()


def test_a_kill_during_the_undos_compensation_then_a_restart(tmp_path):
    """The restart's undo committed, its compensation refunded and was killed before it
    was recorded; the next open finishes it (recovery) and the session's first use finds
    the booking undone already: one refund, the retried request books once.  Before:
    the retry booked a second time, the first booking standing."""
    w = Killed(tmp_path)
    killed = w.run("turn")
    assert w.run("hold") == killed               # killed inside the refund
    store = w.open()
    try:
        session = WalstoreSession("u", store)
        items = retry(store, session, w.ledger, w.calls)
        undo = session.restart_undo
    finally:
        store.close()
    assert w.refunds(killed) == 1
    assert len(w.live()) == 1 and killed not in w.live()
    assert recorded(items) == ["book_hotel"]
    # (taken back by the killed open's undo: recognised, not compensated again)
    assert undo == RestartUndo(already=(txid_of(killed),))


def test_a_read_only_open_undoes_nothing_and_the_writer_then_does(tmp_path):
    """A read-only open reads the session as the kill left it and writes nothing; the
    next writer's first use undoes the booking once.  Before: the writer left it too."""
    w = Killed(tmp_path)
    killed = w.run("turn")
    ro = w.open(readonly=True)
    try:
        before = len(ro.log())
        session = WalstoreSession("u", ro)
        items = asyncio.run(session.get_items())
        assert session.restart_undo is None and len(ro.log()) == before
    finally:
        ro.close()
    assert texts(items) == HELLO + [child.REQUEST]
    assert w.live() == [killed]
    store = w.open()
    try:
        session = WalstoreSession("u", store)
        assert asyncio.run(session.get_items()) == items
        assert asyncio.run(session.get_items()) == items
        assert session.restart_undo.reverted == (txid_of(killed),)
    finally:
        store.close()
    assert w.live() == [] and w.refunds(killed) == 1


def test_two_concurrent_first_uses_undo_once_and_both_read_after_it(tmp_path, monkeypatch):
    """Two tasks read the session at once after the restart: one undo, one refund, and
    the second's read waits for it (it would run its turn's tools before the refund).
    Before: nothing was undone."""
    import walstore.integrations.openai_agents as oa
    w = Killed(tmp_path)
    killed = w.run("turn")
    store = walstore.open(w.store)
    said: list[str] = []
    compensating, release = threading.Event(), threading.Event()

    @store.compensator("refund")
    def refund(action):
        said.append("refund")
        ws_ledger.refund(w.ledger, action.key)
        compensating.set()
        release.wait(WAIT_S)
        said.append("refunded")

    undos: list[int] = []
    entered = threading.Event()
    orig_undo, orig_settle = oa.WalstoreSession._revert_work, oa.WalstoreSession._settle_restart

    def revert_work(self, txids, op):
        undos.append(len(txids))
        return orig_undo(self, txids, op)

    def settle(self, *args):
        if compensating.is_set():
            entered.set()
        return orig_settle(self, *args)
    monkeypatch.setattr(oa.WalstoreSession, "_revert_work", revert_work)
    monkeypatch.setattr(oa.WalstoreSession, "_settle_restart", settle)

    async def reader(session, name):
        items = await session.get_items()
        said.append(name)
        return items

    async def go():
        first = asyncio.ensure_future(reader(WalstoreSession("u", store), "read 1"))
        assert await asyncio.to_thread(compensating.wait, WAIT_S)
        second = asyncio.ensure_future(reader(WalstoreSession("u", store), "read 2"))
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        # (a second that did not wait had read by now: give it the chance)
        await asyncio.sleep(0.3)
        release.set()
        return await first, await second
    try:
        one, two = asyncio.run(go())
    finally:
        store.close()
    assert one == two and texts(one) == HELLO + [child.REQUEST]
    assert undos == [1]
    assert said[:2] == ["refund", "refunded"] and sorted(said[2:]) == ["read 1", "read 2"]
    assert w.live() == [] and w.refunds(killed) == 1


def test_work_of_this_open_is_never_undone(tmp_path):
    """Work in the session's scope committed in this open before the session's first
    call (a run resumed from a RunState runs its approved tools first) is kept: it may
    be a turn in flight.  Only an earlier open's is undone."""
    path = str(tmp_path / "store")
    world: list[str] = []
    store = walstore.open(path)
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    s = WalstoreSession("u", store)
    cut_short_turn(s, lambda: book(store, s, "rome", world), "book rome")
    store.close()
    store = walstore.open(path)
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    try:
        s = WalstoreSession("u", store)
        # this open's: kept (its work in the scope is the session's first use here: the
        # earlier open's undone before it, stop 78 h3)
        book(store, s, "oslo", world)
        assert texts(asyncio.run(s.get_items())) == ["book rome"]
        assert s.restart_undo.reverted and world == ["book rome", "cancel rome", "book oslo"]
        assert store.get(s.key("bookings/oslo")) == "confirmed"
        assert store.get(s.key("bookings/rome")) is None
    finally:
        store.close()


def test_two_tools_writing_one_key_are_both_undone_each_compensated_once(tmp_path):
    """Two bookings of a cut-short turn that both wrote the session's key "cart": the
    older one's revert alone is refused (a later writer), so it takes the newer one back
    with it (``cascade``), each compensated once.  Before the cascade: reverting it
    failed, its booking standing."""
    path = str(tmp_path / "store")
    world: list[str] = []

    def opened():
        st = walstore.open(path)
        st.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
        return st
    store = opened()
    s = WalstoreSession("u", store)
    asyncio.run(s.add_items([user("hi")]))

    def both() -> None:
        for what in ("rome", "oslo"):
            with store.transaction() as tx:
                with tx.action("book", args={"what": what}, compensate="cancel",
                               scope=s.scope):
                    world.append(f"book {what}")
                tx.put(s.key("cart"), what)
    cut_short_turn(s, both, "book both")
    store.close()
    store = opened()
    try:
        s = WalstoreSession("u", store)
        asyncio.run(s.get_items())
        undo = s.restart_undo
        assert undo.failed == () and len(undo.reverted) == 2
        assert store.get(s.key("cart")) is None
    finally:
        store.close()
    assert world == ["book rome", "book oslo", "cancel oslo", "cancel rome"]


def test_a_finished_turn_keeps_the_work_after_it(tmp_path):
    """Work in the session's scope after a turn's final answer is the application's
    (between turns), not a tool's of a turn cut short: kept."""
    path = str(tmp_path / "store")
    world: list[str] = []
    store = walstore.open(path)
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    s = WalstoreSession("u", store)
    asyncio.run(s.add_items([user("hi"), {"role": "assistant", "content": "hello",
                                          "type": "message"}]))
    book(store, s, "rome", world)
    store.close()
    store = walstore.open(path)
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))
    try:
        s = WalstoreSession("u", store)
        assert texts(asyncio.run(s.get_items())) == ["hi", "hello"]
        assert s.restart_undo is None and world == ["book rome"]
    finally:
        store.close()
